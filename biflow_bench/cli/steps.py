"""`biflow-bench train / sample / eval`: one step of one variant at a pixel scale (F and G from the cache, trained on a
miss); under torchrun the training is DDP and the sampling sharded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..config import ConfigError, scale_config
from ..paths import default_results_dir
from .args import (Ablation, DataDir, Overrides, Scale, Seed, Variant, check_out_file, check_scale, parse_overrides,
                   positive, run_options)

steps_app = typer.Typer()


def _trained(ablation: str, variant: str, scale: str, seed: int, data_dir: Path | None, overrides: list[str] | None):
    """The runner, this process's place in a torchrun job (one process: the default) and the trained variant (F and
    G from the cache, trained on a miss; under torchrun with DDP)."""
    from .. import runner
    from ..ablations import get_spec
    from ..distributed import init_from_env

    check_scale(scale)
    if scale_config(scale).dataset == "latents":
        raise ConfigError(f"scale {scale!r} trains on VAE latents: `run ABLATION --scale {scale} --vae DIR --ref-stats "
                          "NPZ` makes a table's records, `train-dist` and `sample-dist` train and sample one variant")
    opts = run_options(default_results_dir(), data_dir, False, overrides)
    cfg = get_spec(ablation).resolve(variant, scale, opts.overrides)
    runner.preflight(cfg, seed)
    opts.env = init_from_env("cpu")
    return runner, opts.env, runner.train_variant(cfg, seed, opts)


@steps_app.command()
def train(ablation: Ablation, variant: Variant, scale: Scale = "tiny", seed: Seed = 0, data_dir: DataDir = None,
          set_: Overrides = None) -> None:
    """Train (or load from the artifact cache) F and G of one variant (under torchrun: with DDP)."""
    from ..distributed import shutdown

    _, env, t = _trained(ablation, variant, scale, seed, data_dir, set_)
    if env.is_main:
        typer.echo(json.dumps(t.train, indent=2))
    shutdown()


@steps_app.command()
def sample(ablation: Ablation, variant: Variant, scale: Scale = "tiny", seed: Seed = 0,
           num: Annotated[int, typer.Option("--num", "--num-images",
                                            help="images in the grid (under torchrun: --num-images)")] = 100,
           out: Annotated[Path | None, typer.Option(help="PNG grid to write (default: runs/samples/ABLATION-VARIANT-"
                                                         "SCALE-seedN.png of the project, git-ignored)")] = None,
           data_dir: DataDir = None, set_: Overrides = None) -> None:
    """Sample a grid of every one of --num images from one variant (trains it first when not cached; under torchrun
    each process samples its share and rank 0 writes the grid)."""
    from ..data import grid_columns, save_image_grid
    from ..distributed import shutdown
    from ..paths import default_samples_dir

    positive("--num", num)
    out = out or default_samples_dir() / f"{ablation}-{variant}-{scale}-seed{seed}.png"
    check_out_file(out, (".png",))
    runner, env, t = _trained(ablation, variant, scale, seed, data_dir, set_)
    images, ms = runner.sample_variant(t, seed, num, env=env)
    if images is not None:
        save_image_grid(images, out)
        cols = grid_columns(num)
        typer.echo(f"wrote {num} images to {out} ({cols} to a row, {-(-num // cols)} rows; {ms:.3f} ms per image)")
    shutdown()


@steps_app.command("eval")
def eval_(ablation: Ablation, variant: Variant, scale: Scale = "tiny", seed: Seed = 0, data_dir: DataDir = None,
          set_: Overrides = None) -> None:
    """Evaluate one variant and print its metrics (no record written; under torchrun the sampling is shared and
    rank 0 evaluates)."""
    from ..distributed import shutdown

    runner, env, t = _trained(ablation, variant, scale, seed, data_dir, set_)
    images, ms = runner.sample_variant(t, seed, env=env)
    if images is not None:
        typer.echo(json.dumps({**runner.evaluate(t, images, seed, data_dir), "ms_per_image": ms}, indent=2))
    shutdown()


@steps_app.command()
def edit(ablation: Ablation, variant: Variant, scale: Scale = "tiny", seed: Seed = 0,
         mask: Annotated[str, typer.Option(help="the hidden region: centre, left, right, top, bottom or "
                                                "random-<percent> (patches hidden at random, e.g. random-25)")] = "centre",
         target_class: Annotated[int | None, typer.Option(help="a class edit instead: re-decode with this class")] = None,
         decoder: Annotated[str, typer.Option(help="G (one pass), exact (F's serial inverse) or exact+score")] = "G",
         num: Annotated[int, typer.Option(help="held-out test images edited")] = 10,
         out: Annotated[Path | None, typer.Option(help="PNG grid to write: sources, inputs (masked), edits (default: "
                                                       "runs/samples/edit-ABLATION-VARIANT-SCALE-seedN.png)")] = None,
         data_dir: DataDir = None, set_: Overrides = None) -> None:
    """Edit held-out test images through one variant's inverse pair (BiFlow eq. 6): encode with F, replace the
    hidden region's noise by the prior's (or, with --target-class, change the class) and decode; writes a grid and
    prints the kept region's PSNR."""
    import torch

    from ..ablations import get_spec
    from ..data import dataset_splits, save_image_grid
    from ..editing import DECODERS, compose, decode, encode, kept_error, pixel_keep, token_keep, tokens_to_pixels
    from ..paths import default_samples_dir

    positive("--num", num)
    pixel_keep(mask, 8, 2, torch.Generator())  # the mask's name, checked before any training
    if decoder not in DECODERS:
        raise ConfigError(f"--decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    check_scale(scale)
    cfg = get_spec(ablation).resolve(variant, scale, parse_overrides(set_))
    if decoder == "G" and cfg.inverse != "learned":
        raise ConfigError(f"--decoder G: {ablation}/{variant} has no learned inverse (inverse={cfg.inverse!r}); use "
                          "--decoder exact or a variant with a G")
    if target_class is not None and not 0 <= target_class < cfg.flow.num_classes:
        raise ConfigError(f"--target-class {target_class}: the data's classes are 0 to {cfg.flow.num_classes - 1}"
                          if cfg.flow.num_classes else "--target-class: this variant's F has no classes")
    out = out or default_samples_dir() / f"edit-{ablation}-{variant}-{scale}-seed{seed}.png"
    check_out_file(out, (".png",))
    _, _, t = _trained(ablation, variant, scale, seed, data_dir, set_)
    test = dataset_splits(cfg.dataset, str(data_dir) if data_dir else None).test
    x = test.images[-num:]  # the split's last images: far from the metrics' reference set at its start
    y = test.labels[-num:] if cfg.flow.num_classes else None
    size, patch = cfg.flow.image_size, cfg.flow.patch_size
    z, gen = encode(t.flow, x, y), torch.Generator().manual_seed(seed)
    if target_class is None:
        keep = tokens_to_pixels(token_keep(pixel_keep(mask, size, patch, gen), patch), patch, size)
        shown = torch.where(keep, x, torch.full_like(x, -1.0))
        edited = decode(decoder, t.flow, t.g, compose(z, torch.randn(x.shape, generator=gen), keep), y,
                        cfg.stage1.noise_sigma)
        _, psnr = kept_error(edited, x, keep)
        what = f"kept region PSNR {psnr:.2f} dB"
    else:
        shown, what = x, f"class {target_class}"
        edited = decode(decoder, t.flow, t.g, z, torch.full((num,), target_class, dtype=torch.long),
                        cfg.stage1.noise_sigma)
    save_image_grid(torch.cat([x, shown, edited]), out, nrow=num)
    typer.echo(f"wrote {out}: rows of sources, inputs, edits ({decoder}; {what})")

"""`biflow-bench prepare-latents / train-dist / sample-dist`: the torchrun jobs of the latent scales (also on one
process): encode an image folder, train one variant with DDP, sample it sharded and score it (FID / IS)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .args import (Ablation, DataDir, Device, Overrides, RefStats, Scale, Seed, VaePath, Variant, check_device,
                   check_out_file, check_scale, parse_overrides, positive)

dist_app = typer.Typer()


@dist_app.command("prepare-latents")
def prepare_latents(
    image_dir: Annotated[Path, typer.Argument(help="ImageNet-style folder: one subfolder of images per class")],
    out_dir: Annotated[Path, typer.Argument(help="where meta.json and the latent shards go")],
    vae: VaePath = None,
    image_size: int = 256,
    batch_size: int = 64,
    shard_size: int = 5000,
    workers: Annotated[int, typer.Option(help="image-decoding worker processes per rank")] = 4,
    device: Device = None,
) -> None:
    """Encode an image folder into VAE posterior moments (resumable; under torchrun rank r takes shards r, r+W, ...)."""
    from ..distributed import barrier, init_from_env, shutdown
    from ..latents import load_vae
    from ..latents import prepare_latents as prepare

    check_device(device)
    env = init_from_env(device)
    model = load_vae(vae, env.device)
    written = prepare(image_dir, out_dir, model, image_size, batch_size, env.rank, env.world_size, shard_size, workers,
                      progress=sys.stderr.isatty())
    barrier(env)
    typer.echo(f"[rank {env.rank}] wrote {len(written)} shards to {out_dir}")
    shutdown()


@dist_app.command("train-dist")
def train_dist(
    ablation: Ablation,
    variant: Variant,
    scale: Scale = "tiny",
    seed: Seed = 0,
    data_dir: DataDir = None,
    micro_batch: Annotated[int | None, typer.Option(help="rows per forward pass (default: the global batch / number "
                                                        "of processes); the same value on any number of processes "
                                                        "gives the same training")] = None,
    device: Device = None,
    set_: Overrides = None,
) -> None:
    """Train F and G of one variant with DDP on every process of a torchrun job (or on one process); rank 0 writes
    the checkpoints and the artifacts to the cache that `run`, `sample` and `sample-dist` read."""
    from ..ablations import get_spec
    from ..data import load_dataset
    from ..distributed import init_from_env, shutdown
    from ..paths import default_cache_dir
    from ..training.cache import train_stages

    check_scale(scale)
    check_device(device)
    if micro_batch is not None:
        positive("--micro-batch", micro_batch)
    cfg = get_spec(ablation).resolve(variant, scale, parse_overrides(set_))
    dataset = load_dataset(cfg.dataset, data_dir).train
    env = init_from_env(device)
    summary = train_stages(cfg, seed, dataset, default_cache_dir(), env, micro_batch)[2]
    if env.is_main:
        typer.echo(json.dumps(summary, indent=2))
    shutdown()


@dist_app.command("sample-dist")
def sample_dist(
    ablation: Ablation,
    variant: Variant,
    scale: Scale = "tiny",
    seed: Seed = 0,
    num: Annotated[int | None, typer.Option("--num-images", help="images (default: the scale's, 50,000 at paper "
                                                               "scale); not --num, which torchrun would take")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per forward pass and process")] = None,
    vae: VaePath = None,
    ref_stats: RefStats = None,
    out: Annotated[Path | None, typer.Option(help=".npz (uint8 NHWC arr_0 + labels: ADM's format) or .png")] = None,
    device: Device = None,
    set_: Overrides = None,
    micro_batch: Annotated[int | None, typer.Option(help="the micro-batch the variant was trained with (default: "
                                                        "its batch split over these processes, as train-dist does)")
                           ] = None,
) -> None:
    """Sample a trained variant on every process of a torchrun job (image i from seed (seed, i), class i mod K);
    rank 0 gathers the images in order, writes --out and, with --ref-stats, prints FID / IS (Inception)."""
    from ..ablations import get_spec
    from ..distributed import init_from_env, shutdown
    from ..sample import sample_trained

    check_scale(scale)
    check_device(device)
    for option, value in (("--num-images", num), ("--batch-size", batch_size), ("--micro-batch", micro_batch)):
        if value is not None:
            positive(option, value)
    if out is not None:
        check_out_file(out, (".npz", ".png"))
    cfg = get_spec(ablation).resolve(variant, scale, parse_overrides(set_))
    env = init_from_env(device)
    result = sample_trained(cfg, seed, env, num=num, batch_size=batch_size, vae=vae, ref_stats=ref_stats, out=out,
                            micro_batch=micro_batch)
    if env.is_main:
        typer.echo(json.dumps(result, indent=2))
    shutdown()

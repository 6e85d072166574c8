"""`biflow-bench prepare-latents / train-dist / sample-dist`: the torchrun jobs of the latent scales (also on one
process): encode an image folder, train one variant with DDP, sample it sharded and score it (FID / IS)."""

from __future__ import annotations

import json
import os
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
    from ..latents import latent_inputs
    from ..paths import default_cache_dir
    from ..training.cache import train_stages

    check_scale(scale)
    check_device(device)
    if micro_batch is not None:
        positive("--micro-batch", micro_batch)
    cfg = get_spec(ablation).resolve(variant, scale, parse_overrides(set_))
    env = init_from_env(device)
    data_dir, vae, _ = latent_inputs(scale, data_dir, None, None, default_cache_dir(), env)
    if vae is not None:  # tiny-latent's own VAE for stage 2's perceptual terms (training/stages.py)
        os.environ["BIFLOW_VAE"] = str(vae)
    dataset = load_dataset(cfg.dataset, data_dir).train
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
    from ..latents import latent_inputs
    from ..paths import default_cache_dir
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
    if ref_stats is None:  # tiny-latent decodes with its own VAE (latent_inputs) unless told otherwise
        vae = latent_inputs(scale, None, vae, None, default_cache_dir(), env)[1]
    result = sample_trained(cfg, seed, env, num=num, batch_size=batch_size, vae=vae, ref_stats=ref_stats, out=out,
                            micro_batch=micro_batch)
    if env.is_main:
        typer.echo(json.dumps(result, indent=2))
    shutdown()


@dist_app.command()
def rehearse(
    scale: Annotated[str, typer.Option(help="latent scale whose real shapes are rehearsed")] = "paper",
    out: Annotated[Path | None, typer.Option(help="the rehearsal record (.json); default: "
                                                  "<cache>/rehearsal/<scale>.json")] = None,
    random_weights: Annotated[str, typer.Option(help="comma-separated networks that get random weights of the real "
                                                     "architecture here alone: vae, inception (default: none; the "
                                                     "real weights are then required)")] = "",
    vae: VaePath = None,
    num_images: Annotated[int, typer.Option(help="images trained on and sampled by each decoder")] = 4,
    device: Device = None,
) -> None:
    """Rehearse a latent scale's whole path at its real shapes in minutes (run it under torchrun): a few DDP steps of
    F and G, a few images through every decoder (serial, Jacobi, compiled, score step, G; with CFG), decoded by
    the VAE and scored by the scale's extractor. Writes a record marked as a rehearsal; its numbers measure the
    path, not the models."""
    from ..distributed import init_from_env, shutdown
    from ..paths import default_cache_dir
    from ..rehearsal import check_random_weights, rehearsal_config, rehearse as run_rehearsal, write_rehearsal

    check_scale(scale)
    check_device(device)
    positive("--num-images", num_images)
    names = [n.strip() for n in random_weights.split(",") if n.strip()]
    check_random_weights(names)
    rehearsal_config(scale)  # a scale without a latent path: one line, before anything starts
    root = default_cache_dir() / "rehearsal" / scale
    out = out or root.parent / f"{scale}.json"
    check_out_file(out, (".json",))
    env = init_from_env(device)
    try:
        record = run_rehearsal(scale, root, env, vae=vae, random_weights=names, num_images=num_images)
    finally:
        shutdown()
    if record is not None:
        write_rehearsal(record, out)
        typer.echo(str(out))

"""Samplers. Image i is always drawn from noise seeded by (seed, i), so samples never depend on the batch size,
the number of processes or the order of work (edm2's per-image seeds)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import threads
from .config import RunConfig
from .distributed import DistEnv, gather_rows
from .models.biflow import BiFlow
from .models.tarflow import TARFlow


def image_noise(seeds: range | list[int], shape: tuple[int, ...], base_seed: int = 0) -> Tensor:
    """One standard normal draw of `shape` per image seed."""
    gen = torch.Generator()
    out = torch.empty(len(seeds), *shape)
    for row, s in enumerate(seeds):
        gen.manual_seed(base_seed * 1_000_003 + s)
        out[row] = torch.randn(shape, generator=gen)
    return out


@dataclass(frozen=True)
class Sampler:
    """The sampling recipe of a run: which inverse, which denoising, which guidance."""

    inverse: str  # "learned" | "exact"
    denoise: str  # "learned" | "score" | "none"
    cfg_scale: float
    sigma: float  # noise level F was trained with (score denoising)
    guidance_temperature: float | None = None
    annealed: bool = False
    decoder: str = "serial"  # exact inverse: "serial", "jacobi" (TARFlow.reverse_jacobi) or "compiled"
    jacobi_tol: float = 1e-3
    jacobi_group: int = 64
    peer: str = ""  # inverse "peer": "meanflow" or "flow-matching", in G's place (no F: no score step)
    steps: int = 1  # a peer's steps from noise
    solver: str = "euler"  # flow matching's

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Sampler:
        s, peer = cfg.sample, cfg.peer.kind if cfg.inverse == "peer" else ""
        return cls(cfg.inverse, "none" if peer else cfg.backward.denoise, s.cfg_scale, cfg.stage1.noise_sigma,
                   s.guidance_temperature, s.annealed, s.decoder, s.jacobi_tol, s.jacobi_group, peer, s.steps,
                   s.solver)

    @property
    def jacobi(self) -> bool:
        return self.inverse == "exact" and self.decoder == "jacobi"

    @torch.no_grad()
    def __call__(self, flow: TARFlow, g: BiFlow | None, z: Tensor, y: Tensor | None,
                 stats: dict[str, Any] | None = None) -> Tensor:
        """Images from noise z. Jacobi decoding writes its parallel passes per flow block into `stats`
        ("jacobi_iterations") when given."""
        if self.jacobi:
            result = flow.reverse_jacobi(z, y, guidance=self.cfg_scale, guidance_temperature=self.guidance_temperature,
                                         annealed=self.annealed, tol=self.jacobi_tol, group=self.jacobi_group)
            x = result.x
            if stats is not None:
                stats["jacobi_iterations"] = result.iterations
        elif self.inverse == "exact":
            x = flow.reverse(z, y, guidance=self.cfg_scale, guidance_temperature=self.guidance_temperature,
                             annealed=self.annealed, compiled=self.decoder == "compiled")
        elif self.peer:
            solver = {"solver": self.solver} if self.peer == "flow-matching" else {}
            x = g.sample(z, y, steps=self.steps, cfg_scale=self.cfg_scale, **solver)  # type: ignore[union-attr]
        else:
            assert g is not None, "the learned inverse needs a backward model"
            x = g.sample(z, y, cfg_scale=self.cfg_scale)
        if self.denoise == "score":
            x = flow.denoise(x, y, self.sigma)
        return x

    def _guided(self) -> str:
        """The exact inverse's guided pass doubles its evaluations: CFG's, or attention temperature's (TARFlow)."""
        if not self.cfg_scale:
            return ""
        return " x2 (attention temperature)" if self.guidance_temperature is not None else " x2 (CFG)"

    def nfe(self, flow: TARFlow, g: BiFlow | None, jacobi_iterations: list[int] | None = None) -> tuple[int, str]:
        """Sequential network evaluations per image and a readable label ("1", "2", "4x15 serial + score").

        Jacobi decoding's count depends on the data: the passes of a measured call (`jacobi_iterations`, from
        `__call__`'s stats), else the bound, one pass per token and block, which it never exceeds."""
        if self.jacobi:
            bound = flow.num_serial_steps()
            steps = sum(jacobi_iterations) if jacobi_iterations is not None else bound
            label = f"{steps} Jacobi passes" if jacobi_iterations is not None else f"<= {bound} Jacobi passes"
            label += f" (group {self.jacobi_group}, tol {self.jacobi_tol:g})" + self._guided()
        elif self.inverse == "exact":
            steps = flow.num_serial_steps()
            label = f"{flow.config.num_blocks}x{steps // flow.config.num_blocks} serial" + self._guided()
        elif self.peer == "flow-matching":
            steps = g.nfe(self.steps, self.solver, self.cfg_scale)  # type: ignore[union-attr]
            plural = "s" if self.steps != 1 else ""
            label = f"{steps} ({self.steps} {self.solver} step{plural}" + (", CFG x2)" if self.cfg_scale else ")")
        elif self.peer:
            steps = g.nfe(self.steps)  # type: ignore[union-attr]
            label = str(steps)
        else:
            assert g is not None
            steps = g.nfe(self.cfg_scale)
            label = str(steps)
        if self.denoise == "score":  # one forward + backward pass through F
            steps, label = steps + 1, label + " + score step"
        return steps, label


def guidance_scales(cfg: RunConfig) -> tuple[float, ...]:
    """The guidance scales a run is evaluated at: the sweep for a guided row (cfg_scale > 0), else its cfg_scale."""
    return cfg.sample.cfg_sweep if cfg.sample.cfg_scale > 0 and cfg.sample.cfg_sweep else (cfg.sample.cfg_scale,)


def generate(sampler: Sampler, flow: TARFlow, g: BiFlow | None, labels: Tensor | None, seeds: range | list[int],
             batch_size: int, base_seed: int = 0, env: DistEnv | None = None,
             postprocess: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
    """Images for `seeds` (one per seed, labels[i] for seeds[i]) in batches of `batch_size`, each batch passed through
    `postprocess` (default: clamp to [-1, 1]; latent scales decode with the VAE, see latents.sample_postprocess).

    With a DistEnv of W processes rank r makes images r, r + W, ... and rank 0 returns all of them in seed order
    (the other ranks None): the result is the same for any W and any batch size. Runs on the flow's device."""
    env = env or DistEnv()
    postprocess = postprocess or (lambda x: x.clamp(-1, 1))
    model = flow if flow is not None else g  # a peer has no F
    device = next(model.parameters()).device  # type: ignore[union-attr]
    shape = (model.config.in_channels, model.config.image_size, model.config.image_size)  # type: ignore[union-attr]
    mine = range(env.rank, len(seeds), env.world_size)
    out = []
    for i in range(0, len(mine), batch_size):
        threads.rebalance()
        rows = mine[i : i + batch_size]
        z = image_noise([seeds[r] for r in rows], shape, base_seed).to(device)
        y = None if labels is None else labels[list(rows)].to(device)
        out.append(postprocess(sampler(flow, g, z, y)).cpu())
    return gather_rows(torch.cat(out) if out else None, env)


def sample_trained(cfg: RunConfig, seed: int, env: DistEnv | None = None, *, num: int | None = None,
                   batch_size: int | None = None, vae: str | Path | None = None, ref_stats: str | Path | None = None,
                   out: Path | None = None, cache_dir: Path | None = None,
                   micro_batch: int | None = None) -> dict[str, Any]:
    """`num` class-balanced samples (image i of class i mod K) of a variant trained into the artifact cache, split
    over the processes of `env`; latent scales are decoded by the VAE. Rank 0 gathers them as uint8, writes `out`
    (.npz: arr_0 uint8 NHWC + labels, ADM's evaluator format; .png: a grid) and, given reference statistics,
    computes FID / IS with torch-fidelity's Inception (the FID-50K protocol at num=50,000). Everything that can be
    missing (VAE, Inception weights, reference statistics, the trained models) is checked before sampling starts,
    each with a one-line error. Returns (on rank 0) what it did and measured."""
    from .config import ConfigError
    from .data import class_balanced_labels, save_image_grid, to_uint8
    from .files import atomic_write_bytes
    from .latents import load_vae, sample_postprocess
    from .metrics.extractors import INCEPTION_NAME
    from .metrics.fidelity import compute_fidelity
    from .metrics.reference import load_reference
    from .paths import default_cache_dir
    from .training.cache import distributed_micro_batch, load_model, stage1_dir, stage2_dir
    from .weights import resolve_weights

    env = env or DistEnv()
    decoder = load_vae(vae, env.device) if cfg.dataset == "latents" else None
    reference = None
    if ref_stats is not None:
        resolve_weights(INCEPTION_NAME)
        upsample = 2 ** (len(decoder.config.block_out_channels) - 1) if decoder is not None else 1
        reference = load_reference(ref_stats, cfg.flow.image_size * upsample, cache_dir=cache_dir)
    cache = cache_dir or default_cache_dir()
    micro_batch = distributed_micro_batch(cfg, env, micro_batch)  # what train-dist trained with (train_stages)
    paths = [stage1_dir(cache, cfg, micro_batch, env.device.type) / "flow.pt"]
    if cfg.inverse == "learned":
        paths.append(stage2_dir(cache, cfg, seed, micro_batch, env.device.type) / "backward.pt")
    for p in paths:
        if not p.exists():
            raise ConfigError(f"{cfg.scale}: no trained model at {p}; train this variant first (biflow-bench "
                              "train-dist ... with the same scale, seed, --micro-batch, device and --set overrides)")
    flow = load_model(paths[0])[0].to(env.device)
    g = load_model(paths[1])[0].to(env.device) if len(paths) > 1 else None
    num = num or cfg.sample.num_samples
    labels = class_balanced_labels(num, cfg.flow.num_classes) if cfg.flow.num_classes else None
    post = sample_postprocess(decoder) if decoder is not None else (lambda x: to_uint8(x.clamp(-1, 1)))
    start = time.perf_counter()
    images = generate(Sampler.from_config(cfg), flow, g, labels, range(num), batch_size or cfg.sample.batch_size,
                      seed, env, post)
    seconds = time.perf_counter() - start
    if images is None:
        return {}
    result: dict[str, Any] = {"num_images": num, "processes": env.world_size, "seconds": seconds,
                              "ms_per_image": 1000 * seconds / num}  # wall time of the whole job
    if out is not None:
        if out.suffix == ".npz":
            buf = io.BytesIO()
            np.savez(buf, arr_0=images.permute(0, 2, 3, 1).numpy(),
                     labels=(labels if labels is not None else torch.zeros(0)).numpy())
            atomic_write_bytes(out, buf.getvalue())
        else:
            save_image_grid(images.float() / 127.5 - 1, out)  # every image, near-square
        result["out"] = str(out)
    if reference is not None:
        result["metrics"] = compute_fidelity(images, reference, extractor=INCEPTION_NAME)
    return result

"""Where the paper's speed-up comes from: the exact inverse needs tokens x blocks serial steps, G one pass, so the gap
grows with the sequence length. Randomly initialised F and G (timing needs no training) at the paper-B/2 widths
over latent sizes up to the paper's 32x32x4 (patch 2: 16, 64, 256 tokens), on this machine.

Per shape: serial steps of the exact inverse, FLOPs per image of (exact inverse + CFG + score step) and of one pass
of G (training-time CFG: one pass), their ratio, and the measured ms per image of both at one batch size; the
measured ratio beside the FLOP ratio says how much of the gap is arithmetic and how much is serial latency.
"""

from __future__ import annotations

import datetime as dt
import statistics
from typing import Any

import torch

from ..config import SCALES, RunConfig, apply_delta
from ..provenance import environment
from ..sample import Sampler
from .benchmark import FLOP_BATCH
from .flops import count_flops
from .harness import build_variant_models, sampler_call, sampler_inputs
from .timing import time_calls

# latent side -> tokens at patch 2: 16, 64, 256 (the paper's shape)
LATENT_SIDES = (8, 16, 32)


def scaling_config(side: int, scale: str = "paper") -> RunConfig:
    """The models of `scale` (default the paper-B/2 ones) on side x side latents."""
    return apply_delta(SCALES[scale], {"flow.image_size": side, "backward.image_size": side})


def scaling_rows(sides: tuple[int, ...] = LATENT_SIDES, batch: int = 1, repeats: int = 3, warmup: int = 1,
                 cfg_scale: float = 1.0, seed: int = 0, progress: bool = False,
                 scale: str = "paper") -> list[dict[str, Any]]:
    """One row per latent side: tokens, blocks, serial steps, FLOPs and ms per image of the exact inverse (+ CFG +
    score step) and of G's one pass, their FLOP ratio and measured ratio (timed calls interleaved)."""
    dev = torch.device("cpu")
    rows = []
    for side in sides:
        base = scaling_config(side, scale)
        exact_cfg = apply_delta(base, {"inverse": "exact", "backward.denoise": "score", "sample.cfg_scale": cfg_scale})
        g_cfg = apply_delta(base, {"backward.cfg_mode": "training-time", "sample.cfg_scale": cfg_scale})
        calls, flops, serial = {}, {}, 0
        for name, cfg in (("exact", exact_cfg), ("learned", g_cfg)):
            sampler = Sampler.from_config(cfg)
            flow, g = build_variant_models(cfg, dev, seed)
            serial = flow.num_serial_steps() if name == "exact" else serial
            z, y = sampler_inputs(cfg, FLOP_BATCH, dev)
            flops[name] = count_flops(sampler_call(sampler, flow, g, z, y, False, inference=False)) / FLOP_BATCH
            z, y = sampler_inputs(cfg, batch, dev)
            calls[name] = sampler_call(sampler, flow, g, z, y, False)
            time_calls(calls[name], dev, 0, warmup)
        times: dict[str, list[float]] = {n: [] for n in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                times[name] += time_calls(call, dev, 1, 0)
        ms = {n: statistics.median(t) / batch * 1e3 for n, t in times.items()}
        row = {"latent_side": side, "tokens": exact_cfg.flow.num_tokens, "blocks": exact_cfg.flow.num_blocks,
               "serial_steps": serial, "batch_size": batch,
               "flops_exact": flops["exact"], "flops_learned": flops["learned"],
               "flop_ratio": flops["exact"] / flops["learned"], "ms_exact": ms["exact"], "ms_learned": ms["learned"],
               "speedup": ms["exact"] / ms["learned"]}
        if progress:
            print(f"side {side}: {row['serial_steps']} serial steps, exact {ms['exact']:.1f} ms, G {ms['learned']:.1f} ms, "
                  f"x{row['speedup']:.1f} measured, x{row['flop_ratio']:.2f} in FLOPs", flush=True)
        rows.append(row)
    return rows


def scaling_record(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of `scaling_rows`: results/paper/speed/scaling__seed0.json (the paper's models, timed here)."""
    return {"kind": "scaling", "scale": "paper", "ablation": "speed", "variant": "scaling", "seed": 0,
            "label": "Speed-up of one pass of G against the exact inverse's serial steps", "rows": rows,
            "env": environment(), "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}

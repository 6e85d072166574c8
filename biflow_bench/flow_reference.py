"""F beside a reference TARFlow: both trained the same way, bits/dim on the same held-out images.

`biflow-bench bench flow-reference --reference DIR` imports the model of apple/ml-tarflow from a checkout the user
provides (DIR/transformer_flow.py; nothing of it is copied into this project), and trains it beside our F at one
config (28x28 Fashion-MNIST, patch 4, width 128, 4 blocks x 2 layers, 2 heads, 10 classes, no clip) with one loop
(`loop.fit`: the same batches, noise sigma = 0.05, label drop, AdamW 1e-3 (0.9, 0.95), warm-up 100 + cosine,
batch 64). Each variant starts from seed `seed`; bits/dim is measured on the first 1,000 test images plus
sigma-noise (seeded), as `runner.evaluate` does.

Variants of our F toggle one initialisation choice each against the current code, so the comparison that fixed
F's initialisation can be repeated after any change:

    ours                   F as built by TARFlow(cfg)
    ours-embed-std1        the class embedding initialised N(0, 1) (nn.Embedding's default) instead of N(0, 0.01^2)
    ours-no-out-norm       without the LayerNorm before the output projection (the reference has none)
    ours-out-bias-default  the output projection's bias left at nn.Linear's default instead of zero (as the reference)
    reference              the reference implementation's Model
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from .config import ConfigError, Stage1Config
from .data import ImageDataset, add_noise, drop_labels, load_dataset
from .training.losses import nll_loss
from .metrics.likelihood import bits_per_dim, count_params
from .models.tarflow import TARFlow, TARFlowConfig
from .training.loop import fit

CONFIG = TARFlowConfig(in_channels=1, image_size=28, patch_size=4, channels=128, num_blocks=4, layers_per_block=2,
                       num_heads=2, num_classes=10, clip=None)
SIGMA = 0.05
EVAL_IMAGES = 1000


def training(steps: int) -> Stage1Config:
    return Stage1Config(steps=steps, batch_size=64, lr=1e-3, warmup=100, noise_sigma=SIGMA)


def load_reference_module(directory: Path | str) -> ModuleType:
    """transformer_flow.py of an apple/ml-tarflow checkout, imported by path (not installed, not copied)."""
    path = Path(directory) / "transformer_flow.py"
    if not path.is_file():
        raise ConfigError(f"--reference {directory}: no transformer_flow.py there; pass a checkout of "
                          "apple/ml-tarflow (git clone https://github.com/apple/ml-tarflow)")
    spec = importlib.util.spec_from_file_location("_reference_transformer_flow", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, "Model"):
        raise ConfigError(f"--reference {directory}: transformer_flow.py has no Model class; not an ml-tarflow "
                          "checkout")
    return module


class ReferenceFlow(nn.Module):
    """The reference Model behind our F's interface (`config`, `log_prob`). Its dropped label is -1 (the mean class
    embedding); ours is the null class `num_classes`, mapped here. Its blocks return the log-determinant divided by
    the number of dimensions D, so log p(x) = -|z|^2 / 2 - D log(2 pi) / 2 + D * sum of the blocks' values."""

    def __init__(self, module: ModuleType, cfg: TARFlowConfig):
        super().__init__()
        self.config = cfg
        self.model = module.Model(in_channels=cfg.in_channels, img_size=cfg.image_size, patch_size=cfg.patch_size,
                                  channels=cfg.channels, num_blocks=cfg.num_blocks,
                                  layers_per_block=cfg.layers_per_block, nvp=cfg.nvp, num_classes=cfg.num_classes)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if y is not None:
            y = torch.where(y == self.config.num_classes, torch.full_like(y, -1), y)
        z, _, logdet = self.model(x, y)
        d = self.config.num_dims
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi) + d * logdet


def _embed_std1(flow: TARFlow, gen: torch.Generator) -> None:
    for block in flow.blocks:
        with torch.no_grad():
            block.class_embed.weight.normal_(0.0, 1.0, generator=gen)


def _no_out_norm(flow: TARFlow, gen: torch.Generator) -> None:
    for block in flow.blocks:
        block.norm_out = nn.Identity()


def _out_bias_default(flow: TARFlow, gen: torch.Generator) -> None:
    for block in flow.blocks:
        bound = 1 / math.sqrt(block.proj_out.in_features)  # nn.Linear's default bias initialisation
        with torch.no_grad():
            block.proj_out.bias.uniform_(-bound, bound, generator=gen)


OUR_VARIANTS: dict[str, Callable[[TARFlow, torch.Generator], None] | None] = {
    "ours": None, "ours-embed-std1": _embed_std1, "ours-no-out-norm": _no_out_norm,
    "ours-out-bias-default": _out_bias_default,
}
VARIANTS = (*OUR_VARIANTS, "reference")


def build(variant: str, seed: int, reference: ModuleType | None) -> nn.Module:
    torch.manual_seed(seed)
    if variant == "reference":
        if reference is None:
            raise ConfigError("variant 'reference' needs --reference DIR (a checkout of apple/ml-tarflow)")
        return ReferenceFlow(reference, CONFIG)
    if variant not in OUR_VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    flow = TARFlow(CONFIG)
    change = OUR_VARIANTS[variant]
    if change is not None:
        change(flow, torch.Generator().manual_seed(seed + 1))
    return flow


def train_and_score(model: nn.Module, train: ImageDataset, test: ImageDataset, steps: int, seed: int,
                    progress: bool = False) -> dict[str, Any]:
    """Stage-1 training of `model` (our loss, our loop) and its bits/dim on EVAL_IMAGES noisy test images."""
    s1 = training(steps)
    num_classes = CONFIG.num_classes

    def loss_fn(m: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x = add_noise(x, s1.noise_sigma, gen)
        loss = nll_loss(m, x, drop_labels(y, s1.label_drop, num_classes, gen))  # type: ignore[arg-type]
        return loss, {"nll": float(loss.detach())}

    result = fit(model, loss_fn, train, s1, seed=seed, desc="flow-reference", progress=progress)
    n = min(EVAL_IMAGES, len(test))
    noisy = add_noise(test.images[:n], SIGMA, torch.Generator().manual_seed(seed))
    bpd = bits_per_dim(model, noisy, test.labels[:n], test.levels)  # type: ignore[arg-type]
    return {"bpd": bpd, "seconds": result.seconds, "params": count_params(model),
            "skipped_steps": result.skipped_steps}


def run_flow_reference(reference_dir: Path | None, variants: list[str], steps: int, seed: int = 0,
                       data_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Train each variant for `steps` and return {config, steps, seed, rows: [{variant, bpd, seconds, params}]}."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    if "reference" in variants and reference_dir is None:
        raise ConfigError("variant 'reference' needs --reference DIR (a checkout of apple/ml-tarflow)")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: must be a positive integer")
    reference = load_reference_module(reference_dir) if reference_dir is not None else None
    splits = load_dataset("fashion-mnist", data_dir)
    rows = []
    for variant in variants:
        start = time.perf_counter()
        model = build(variant, seed, reference)
        row = {"variant": variant, **train_and_score(model, splits.train, splits.test, steps, seed, progress)}
        print(f"[flow-reference] {variant}: {row['bpd']:.4f} bits/dim ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
        rows.append(row)
    return {"config": CONFIG.to_dict(), "training": dataclasses.asdict(training(steps)), "eval_images": EVAL_IMAGES,
            "seed": seed, "rows": rows}


def format_rows(result: dict[str, Any]) -> str:
    lines = [f"{'variant':<24}{'bits/dim':>10}{'params':>10}{'train s':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['variant']:<24}{r['bpd']:>10.4f}{r['params']:>10}{r['seconds']:>10.1f}")
    return "\n".join(lines)

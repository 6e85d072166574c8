"""Named model presets, one per scale (edm2-style): the forward flow F and the backward model G side by side.

`paper-*` sizes follow BiFlow Table 1 on ImageNet 256 as 32x32x4 VAE latents with patch size 2 (256 tokens of 16
values, 1000 classes). The paper gives parameter counts, not widths and depths: the shapes below are ours, chosen so
the counts match (`PAPER_PARAMS`, checked to 5% by tests/test_paper_scale.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .biflow import BiFlow, BiFlowConfig
from .tarflow import TARFlow, TARFlowConfig

# scale -> (forward flow, backward model); G has one stage group per flow block.
PRESETS: dict[str, tuple[TARFlowConfig, BiFlowConfig]] = {
    # 8x8 digits, 16 tokens of 4 values; seconds on a laptop CPU
    "tiny": (
        TARFlowConfig(in_channels=1, image_size=8, patch_size=2, channels=64, num_blocks=4, layers_per_block=1,
                      num_heads=4, num_classes=10, clip=3.0),
        BiFlowConfig(in_channels=1, image_size=8, patch_size=2, width=64, num_groups=4, layers_per_group=1,
                     num_heads=4, num_classes=10),
    ),
    # 28x28 Fashion-MNIST, 49 tokens of 16 values; the CPU reproduction of every ablation table (config.SCALES sets
    # its training lengths). Norm control's c = 1.5 binds on the largest of the unclipped F's parameters, where
    # c = 3 never bound (docs/decisions.md; every record carries the clip's percentile, metrics/flow_norms.py).
    "small": (
        TARFlowConfig(in_channels=1, image_size=28, patch_size=4, channels=96, num_blocks=4, layers_per_block=1,
                      num_heads=4, num_classes=10, clip=1.5),
        BiFlowConfig(in_channels=1, image_size=28, patch_size=4, width=96, num_groups=4, layers_per_group=1,
                     num_heads=4, num_classes=10),
    ),
    # 16x16x4 latents of a tiny random AutoencoderKL (32x32 RGB digits, 10 classes); the latent pipeline end to end
    "tiny-latent": (
        TARFlowConfig(in_channels=4, image_size=16, patch_size=2, channels=64, num_blocks=4, layers_per_block=1,
                      num_heads=4, num_classes=10, clip=3.0),
        BiFlowConfig(in_channels=4, image_size=16, patch_size=2, width=64, num_groups=4, layers_per_group=1,
                     num_heads=4, num_classes=10),
    ),
    # iTARFlow-B/2: 8 flow blocks (BiFlow sec. 1: "8 blocks x 256 tokens") x 2 causal layers, width 768 -> 121.4M
    #   (paper: 120M). BiFlow-B/2: one stage per flow block + the learned-denoising stage = 9 bidirectional blocks,
    #   width 896 -> 133.0M (paper: 133M).
    "paper-B/2": (
        TARFlowConfig(in_channels=4, image_size=32, patch_size=2, channels=768, num_blocks=8, layers_per_block=2,
                      num_heads=12, num_classes=1000, clip=3.0),
        BiFlowConfig(in_channels=4, image_size=32, patch_size=2, width=896, num_groups=8, layers_per_group=1,
                     num_heads=14, num_classes=1000),
    ),
    # iTARFlow-XL/2: 8 blocks x 4 layers, width 1344 -> 708.3M (paper: 690M). BiFlow-XL/2: the paper's count is not
    #   in our summaries; G is the usual XL/2 backbone (width 1152, 9 stages x 3 = 27 blocks, cf. DiT-XL/2's 28)
    #   -> 649.6M.
    "paper-XL/2": (
        TARFlowConfig(in_channels=4, image_size=32, patch_size=2, channels=1344, num_blocks=8, layers_per_block=4,
                      num_heads=21, num_classes=1000, clip=3.0),
        BiFlowConfig(in_channels=4, image_size=32, patch_size=2, width=1152, num_groups=8, layers_per_group=3,
                     num_heads=16, num_classes=1000),
    ),
}

# The paper's parameter counts (BiFlow Table 1), (F, G); None where the paper's number is not known to us.
PAPER_PARAMS: dict[str, tuple[int | None, int | None]] = {
    "paper-B/2": (120_000_000, 133_000_000),  # iTARFlow-B/2 120M, BiFlow-B/2 133M
    "paper-XL/2": (690_000_000, None),  # iTARFlow-XL/2 690M
}


def preset_configs(scale: str, **overrides: Any) -> tuple[TARFlowConfig, BiFlowConfig]:
    """The two configs of a preset with keyword overrides applied to whichever config has the field (both when
    both do, e.g. num_classes)."""
    if scale not in PRESETS:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(PRESETS)}")
    flow_cfg, g_cfg = PRESETS[scale]
    flow_fields = {f.name for f in dataclasses.fields(flow_cfg)}
    g_fields = {f.name for f in dataclasses.fields(g_cfg)}
    unknown = set(overrides) - flow_fields - g_fields
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(flow_fields | g_fields))}")
    flow_cfg = dataclasses.replace(flow_cfg, **{k: v for k, v in overrides.items() if k in flow_fields})
    g_cfg = dataclasses.replace(g_cfg, **{k: v for k, v in overrides.items() if k in g_fields})
    return flow_cfg, g_cfg


def build_models(scale: str, **overrides: Any) -> tuple[TARFlow, BiFlow]:
    """Forward flow and backward model of a named scale preset, randomly initialised (on the default device: wrap in
    `with torch.device("meta"):` to size a paper preset without allocating it)."""
    flow_cfg, g_cfg = preset_configs(scale, **overrides)
    return TARFlow(flow_cfg), BiFlow(g_cfg)

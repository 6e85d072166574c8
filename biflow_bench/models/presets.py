"""Named model presets, one per scale (edm2-style): the forward flow F and the backward model G side by side.

`paper` sizes follow BiFlow Table 1 on ImageNet 256 as 32x32x4 VAE latents with patch size 2 (256 tokens).
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
    # 28x28 Fashion-MNIST, 49 tokens of 16 values; the CPU reproduction of every ablation table (sized so that
    # all of them fit in an hour on 2 cores)
    "small": (
        TARFlowConfig(in_channels=1, image_size=28, patch_size=4, channels=96, num_blocks=4, layers_per_block=1,
                      num_heads=4, num_classes=10, clip=3.0),
        BiFlowConfig(in_channels=1, image_size=28, patch_size=4, width=96, num_groups=4, layers_per_group=1,
                     num_heads=4, num_classes=10),
    ),
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
    """Forward flow and backward model of a named scale preset, randomly initialised."""
    flow_cfg, g_cfg = preset_configs(scale, **overrides)
    return TARFlow(flow_cfg), BiFlow(g_cfg)

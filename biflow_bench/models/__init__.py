"""Model library: the forward flow F (TARFlow) and the backward model G (BiFlow)."""

from .biflow import BackwardOutput, BiFlow, BiFlowConfig
from .presets import PRESETS, build_models, preset_configs
from .tarflow import FlowOutput, TARFlow, TARFlowConfig

__all__ = [
    "PRESETS", "BackwardOutput", "BiFlow", "BiFlowConfig", "FlowOutput", "TARFlow", "TARFlowConfig",
    "build_models", "preset_configs",
]

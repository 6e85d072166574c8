"""The backward model G of Bidirectional Normalizing Flow (BiFlow, CVPR 2026): noise z -> data x in one pass.

G is a bidirectional Transformer with one stage (a group of blocks) per forward-flow block, so the state after stage k
corresponds to the forward state x_{B-k} (B = number of flow blocks); with learned denoising one extra stage maps the
noisy x~ = x_0 to the clean x (BiFlow sec. 3.2). How the stages are supervised is the inverse strategy (sec. 3.1):

- naive:          only the output, D(x, G(z)).
- hidden-distill: every stage's state is forced back into input space and re-embedded by the next stage:
                  sum_k D(x_{B-k}, s_k) (the paper's reading; `distill_residual` keeps a zero-initialised residual
                  update in input space instead, so each stage starts as the identity map).
- hidden-align:   states stay in G's hidden space; a learnable head phi_k projects each one for the loss,
                  sum_k D(x_{B-k}, phi_k(h_k)), with phi = identity on the output (the paper's method).

Guidance (sec. 3.4): `inference` runs a conditional and an unconditional branch in lockstep and extrapolates after each
stage, h_{k+1} = (1 + w) G_k(h_k | c) - w G_k(h_k) (NFE 2); `training-time` feeds w to G as a condition and is trained
so that one pass gives the guided result (NFE 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import AdaLNBlock, ImageTokens, patchify, timestep_embedding, unpatchify

STRATEGIES = ("naive", "hidden-distill", "hidden-align")
DENOISE_MODES = ("learned", "score", "none")
CFG_MODES = ("training-time", "inference", "none")


@dataclass(frozen=True)
class BiFlowConfig(ImageTokens):
    in_channels: int = 1
    image_size: int = 8
    patch_size: int = 2
    width: int = 64
    num_groups: int = 4  # one per forward-flow block
    layers_per_group: int = 1
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0
    strategy: str = "hidden-align"
    denoise: str = "learned"
    cfg_mode: str = "training-time"
    normalize_hidden: bool = True  # norm control on G's side: states normalised before alignment (sec. 3.3)
    distill_residual: bool = False  # hidden-distill only: stages update input space residually (not the paper's)

    def __post_init__(self) -> None:
        for field, value, valid in (
            ("strategy", self.strategy, STRATEGIES),
            ("denoise", self.denoise, DENOISE_MODES),
            ("cfg_mode", self.cfg_mode, CFG_MODES),
        ):
            if value not in valid:
                raise ValueError(f"BiFlowConfig.{field}={value!r} is not one of {', '.join(valid)}")
        if self.cfg_mode != "none" and not self.num_classes:
            raise ValueError(f"cfg_mode={self.cfg_mode!r} needs class labels (num_classes > 0)")

    @property
    def num_stages(self) -> int:
        return self.num_groups + (self.denoise == "learned")


class BackwardOutput(NamedTuple):
    x: Tensor  # (B, C, H, W): the clean sample (learned denoising) or x~ (score / none)
    states: list[Tensor]  # supervised intermediate states, image-shaped, aligned with x_{B-1}, x_{B-2}, ...


class Stage(nn.Module):
    """A group of bidirectional blocks. For hidden-distill it reads input-space tokens, embeds them, and writes
    input-space tokens through its read-out (or, with `distill_residual`, adds the read-out to its input); otherwise
    it maps hidden states to hidden states."""

    def __init__(self, cfg: BiFlowConfig, token_io: bool):
        super().__init__()
        width = cfg.width
        self.blocks = nn.ModuleList(AdaLNBlock(width, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.layers_per_group))
        self.token_io, self.residual = token_io, cfg.distill_residual
        if token_io:
            self.embed = nn.Linear(cfg.token_dim, width)
            self.pos = nn.Parameter(torch.randn(cfg.num_tokens, width) * 0.02)
            self.readout = ReadOut(width, cfg.token_dim, zero_init=self.residual)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        x = self.embed(h) + self.pos if self.token_io else h
        for block in self.blocks:
            x = block(x, cond)
        if not self.token_io:
            return x
        return h + self.readout(x) if self.residual else self.readout(x)


class ReadOut(nn.Module):
    """Hidden state -> input-space tokens: RMSNorm + linear (zero-initialised unless a stage's whole output)."""

    def __init__(self, width: int, token_dim: int, zero_init: bool = True):
        super().__init__()
        self.norm = nn.RMSNorm(width)
        self.proj = nn.Linear(width, token_dim)
        if zero_init:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(self.norm(h))


class BiFlow(nn.Module):
    def __init__(self, cfg: BiFlowConfig):
        super().__init__()
        self.config = cfg
        width, distill = cfg.width, cfg.strategy == "hidden-distill"
        self.class_embed = nn.Embedding(cfg.num_classes + 1, width) if cfg.num_classes else None
        if self.class_embed is not None:  # small, as in TARFlow's reference code (N(0, 1) swamps the condition)
            nn.init.normal_(self.class_embed.weight, std=0.01)
        self.base_cond = nn.Parameter(torch.zeros(width))
        self.cfg_embed = (
            nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            if cfg.cfg_mode == "training-time"
            else None
        )
        if not distill:
            self.embed = nn.Linear(cfg.token_dim, width)
            self.pos = nn.Parameter(torch.randn(cfg.num_tokens, width) * 0.02)
            self.out = ReadOut(width, cfg.token_dim)  # phi_0: the output head
        self.stages = nn.ModuleList(Stage(cfg, token_io=distill) for _ in range(cfg.num_stages))
        # hidden-align's projection heads phi_k, one per supervised intermediate state
        n_heads = cfg.num_stages - 1 if cfg.strategy == "hidden-align" else 0
        self.heads = nn.ModuleList(ReadOut(width, cfg.token_dim) for _ in range(n_heads))

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def _image(self, tokens: Tensor) -> Tensor:
        c = self.config
        return unpatchify(tokens, c.patch_size, c.in_channels, c.image_size, c.image_size)

    def _cond(self, y: Tensor | None, w: Tensor | None, batch: int) -> Tensor:
        cond = self.base_cond.expand(batch, -1)
        if self.class_embed is not None:
            labels = y if y is not None else torch.full((batch,), self.null_class, device=cond.device)
            cond = cond + self.class_embed(labels)
        if self.cfg_embed is not None:
            w = torch.zeros(batch, device=cond.device) if w is None else w
            cond = cond + self.cfg_embed(timestep_embedding(w, self.config.width).to(cond.dtype))
        return F.silu(cond)

    def forward(self, z: Tensor, y: Tensor | None = None, w: Tensor | float | None = None,
                with_states: bool = True) -> BackwardOutput:
        """One pass of G. `w`: the guidance scale, a float or (B,) tensor (a condition for training-time CFG; the
        extrapolation weight of the two lockstep branches for inference CFG). `with_states=False` skips the
        projection heads of the supervised states, which only training needs."""
        b, cfg = z.shape[0], self.config
        if isinstance(w, (int, float)):
            w = torch.full((b,), float(w), device=z.device, dtype=z.dtype)
        guided = cfg.cfg_mode == "inference" and w is not None and bool((w != 0).any())
        tokens = patchify(z, cfg.patch_size)
        if guided:  # rows [:b] conditional, [b:] unconditional (null class)
            if y is None:
                raise ValueError("inference-time CFG needs class labels y")
            null = torch.full((b,), self.null_class, dtype=torch.long, device=z.device)
            cond = self._cond(torch.cat([y, null]), None, 2 * b)
            tokens, wk = torch.cat([tokens, tokens]), w.view(b, 1, 1)
        else:
            cond = self._cond(y, w if cfg.cfg_mode == "training-time" else None, b)
        h = tokens if cfg.strategy == "hidden-distill" else self.embed(tokens) + self.pos
        states = []
        for k, stage in enumerate(self.stages):
            h = stage(h, cond)
            if guided:
                h_guided = (1 + wk) * h[:b] - wk * h[b:]
                h = torch.cat([h_guided, h_guided])
            if with_states and k < len(self.stages) - 1 and cfg.strategy != "naive":
                state = h[:b] if cfg.strategy == "hidden-distill" else self.heads[k](h[:b])
                states.append(self._image(state))
        out = h[:b] if cfg.strategy == "hidden-distill" else self.out(h[:b])
        return BackwardOutput(self._image(out), states)

    def nfe(self, cfg_scale: float = 0.0) -> int:
        """Network evaluations per sample: 1, or 2 for inference-time CFG (two branches)."""
        return 2 if self.config.cfg_mode == "inference" and cfg_scale != 0 else 1

    @torch.no_grad()
    def sample(self, z: Tensor, y: Tensor | None = None, cfg_scale: float = 0.0) -> Tensor:
        """x = G(z | y, w): one pass; no module of the forward flow is touched. With denoise='score' the result is
        the noisy x~, and the sampler applies F's Tweedie step afterwards."""
        if cfg_scale and self.config.cfg_mode == "none":
            raise ValueError("cfg_scale needs a model trained with cfg_mode 'training-time' or 'inference'")
        return self(z, y, cfg_scale if self.config.cfg_mode != "none" else None, with_states=False).x

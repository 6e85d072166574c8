"""Channel coupling, the flow step TARFlow's ablation puts in place of its autoregressive one (TARFlow sec. 4: FID
20.4 against 5.7): each token's channels are cut in two halves; a bidirectional Transformer over every token's kept
half predicts a scale and shift of the other half (RealNVP's affine coupling), and the halves swap from one block to
the next. Its inverse is one pass, like its forward: x_B = z_B exp(alpha(x_A)) + mu(x_A), x_A = z_A."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import CausalBlock, affine_params


class CouplingBlock(nn.Module):
    """One coupling step on (B, N, D) tokens; `flip` chooses which half of each token is transformed."""

    def __init__(self, cfg, flip: bool):  # cfg: TARFlowConfig (coupling = "channel")
        super().__init__()
        self.cfg, self.flip = cfg, flip
        d, width = cfg.token_dim, cfg.channels
        if d < 2:
            raise ValueError(f"channel coupling needs tokens of at least 2 values (patch_size^2 x channels = {d})")
        self.half = d // 2
        self.proj_in = nn.Linear(d, width)
        self.pos = nn.Parameter(torch.randn(cfg.num_tokens, width) * 0.02)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, width) if cfg.num_classes else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.01)
        self.layers = nn.ModuleList(CausalBlock(width, cfg.num_heads, cfg.mlp_ratio, causal=False)
                                    for _ in range(cfg.layers_per_block))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, 2 * (d - self.half))
        nn.init.zeros_(self.proj_out.weight)  # every step starts as the identity map
        nn.init.zeros_(self.proj_out.bias)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(kept half, transformed half) of each token."""
        a, b = x[..., : self.half], x[..., self.half :]
        return (b, a) if self.flip else (a, b)

    def _join(self, kept: Tensor, moved: Tensor) -> Tensor:
        return torch.cat([moved, kept] if self.flip else [kept, moved], dim=-1)

    def _params(self, kept: Tensor, y: Tensor | None, temperature: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
        """alpha, mu of the transformed half from the kept half (the transformed half zeroed at the input)."""
        h = self.proj_in(self._join(kept, torch.zeros_like(kept[..., :1]).expand(*kept.shape[:-1],
                                                                                   self.cfg.token_dim - self.half)))
        h = h + self.pos
        if self.class_embed is not None:
            h = h + self.class_embed(y)[:, None]
        for layer in self.layers:
            h = layer(h, temperature)
        return affine_params(self.proj_out(self.norm_out(h)), self.cfg.clip, self.cfg.nvp)

    def forward(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        kept, moved = self._split(x)
        alpha, mu = self._params(kept, y)
        return self._join(kept, (moved - mu) * torch.exp(-alpha)), -alpha.flatten(1).sum(1)

    @torch.no_grad()
    def reverse(self, z: Tensor, y: Tensor | None, y_uncond: Tensor | None = None, guidance: float = 0.0,
                temperature: float = 1.0, annealed: bool = False, kv_cache: bool = True,
                compiled: bool = False) -> Tensor:
        """The exact inverse in one pass; with guidance > 0 alpha and mu are extrapolated from the guiding pass as
        the autoregressive step's are: (1 + w) p(. | y) - w p(. | y_uncond, temperature). `annealed` has no token
        order to grow over here: w throughout."""
        kept, moved = self._split(z)
        if guidance > 0:
            b = z.shape[0]
            ys = None if y is None else torch.cat([y, y_uncond])  # type: ignore[list-item]
            temp = torch.ones(2 * b, 1, 1, 1, dtype=z.dtype, device=z.device)
            temp[b:] = temperature
            alpha, mu = self._params(torch.cat([kept, kept]), ys, temp)
            alpha = (1 + guidance) * alpha[:b] - guidance * alpha[b:]
            mu = (1 + guidance) * mu[:b] - guidance * mu[b:]
        else:
            alpha, mu = self._params(kept, y)
        return self._join(kept, moved * torch.exp(alpha) + mu)

    def reverse_jacobi(self, z: Tensor, y: Tensor | None, y_uncond: Tensor | None = None, guidance: float = 0.0,
                       temperature: float = 1.0, annealed: bool = False, tol: float = 1e-3,
                       group: int = 16) -> tuple[Tensor, int]:
        """Nothing to iterate: the one-pass inverse, one pass."""
        return self.reverse(z, y, y_uncond, guidance, temperature, annealed), 1

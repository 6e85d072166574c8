"""Transformer parts shared by the forward flow F and the backward model G.

Pure torch. Attention runs through scaled_dot_product_attention (SDPA) and supports a preallocated KV cache that is
written in place, which the exact serial inverse of F uses to decode one token at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# torch.compile's backend wherever the suite compiles (training's `compile` switches, the compiled exact decoder,
# the speed bench's compiled rows); the tests swap in "aot_eager" (the same tracing, without inductor's slow C++
# compilation)
COMPILE_BACKEND = "inductor"


def compile_options(backend: str, cpp_wrapper: bool) -> dict | None:
    """torch.compile's options: inductor's C++ wrapper calls the compiled kernels from C++ instead of Python, which
    pays where a call is a few small kernels, as in batch-1 sampling (timings: docs/decisions.md); other backends
    take no options."""
    return {"cpp_wrapper": True} if cpp_wrapper and backend == "inductor" else None


class ImageTokens:
    """Shared by the model configs (dataclasses with in_channels, image_size, patch_size): the token grid of
    patchify, and a plain dict for checkpoints."""

    in_channels: int
    image_size: int
    patch_size: int

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C*p*p) with N = (H/p) * (W/p), raster order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: Tensor, p: int, c: int, h: int, w: int) -> Tensor:
    """Inverse of `patchify`."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


class KVCache:
    """Keys and values of one attention layer, preallocated for the whole sequence and filled in place."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, like: Tensor):
        self.k = like.new_empty(batch, heads, length, head_dim)
        self.v = like.new_empty(batch, heads, length, head_dim)
        self.pos = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n = k.shape[2]
        self.k[:, :, self.pos : self.pos + n] = k
        self.v[:, :, self.pos : self.pos + n] = v
        self.pos += n
        return self.k[:, :, : self.pos], self.v[:, :, : self.pos]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool, qk_norm: bool = False):
        super().__init__()
        assert dim % heads == 0, "width must be divisible by the number of heads"
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, cache: KVCache | None = None, temperature: Tensor | float = 1.0) -> Tensor:
        """`temperature` > 1 flattens attention (TARFlow sec. 2.6, attention-temperature guidance); a (B, 1, 1, 1)
        tensor gives each sample its own. With a cache, new tokens attend to every cached token."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if not (isinstance(temperature, float) and temperature == 1.0):
            q = q / temperature
        mask, causal = None, self.causal
        if cache is not None:
            start = cache.pos
            k, v = cache.append(k, v)
            if start > 0:  # causal among the new tokens, full view of the cached ones
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start) if causal and t > 1 else None
                causal = False
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # bf16 autocast on the CPU: attention in float32 (autocast off: it would cast SDPA back to bf16), whose
            # flash-attention backward is far faster than bf16's there (docs/decisions.md); the matmuls keep bf16
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """GELU MLP (TARFlow blocks)."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (G's blocks); hidden size 2/3 of ratio*dim keeps the parameter count of a GELU MLP."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * dim * ratio / 3)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class CausalBlock(nn.Module):
    """Pre-norm causal Transformer block of a TARFlow flow step (TARFlow sec. 2.3)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal=True)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: Tensor, cache: KVCache | None = None, temperature: Tensor | float = 1.0) -> Tensor:
        x = x + self.attn(self.norm1(x), cache, temperature)
        return x + self.mlp(self.norm2(x))


class AdaLNBlock(nn.Module):
    """Bidirectional block of G: RMSNorm, qk-norm attention, SwiGLU, and adaLN modulation by the condition vector
    with zero-initialised residual gates, so every block starts as the identity."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, elementwise_affine=False)
        self.norm2 = nn.RMSNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, heads, causal=False, qk_norm=True)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


def guidance_weights(guidance: float, n: int, annealed: bool) -> list[float]:
    """The CFG weight w of each token 1..N-1 an exact inverse decodes: `guidance` throughout, or, annealed, growing
    linearly to it at the last token (TARFlow sec. 2.6)."""
    return [guidance * t / (n - 1) if annealed else guidance for t in range(1, n)]


def timestep_embedding(w: Tensor, dim: int, max_period: float = 100.0) -> Tensor:
    """Sinusoidal embedding of a scalar per sample (G's guidance-scale condition)."""
    half = dim // 2
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32  # at least float32 (under bf16 autocast)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=w.device, dtype=dtype) / half)
    args = w.to(dtype)[:, None] * freqs[None] * 10.0
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(w.dtype if w.is_floating_point() else torch.float32)


class ConditionedTransformer(nn.Module):
    """G's backbone as a field network (the 1-NFE peers): patch embedding + positions, `depth` bidirectional AdaLN
    blocks modulated by one condition vector (class, with a null class for CFG, plus each named scalar condition
    through its own sinusoidal embedding and MLP), and a read-out to tokens, zero-initialised so the field starts at 0."""

    def __init__(self, tokens: ImageTokens, width: int, depth: int, num_heads: int, mlp_ratio: float,
                 num_classes: int, scalars: tuple[str, ...]):
        super().__init__()
        self.tokens, self.width, self.num_classes = tokens, width, num_classes
        self.embed = nn.Linear(tokens.token_dim, width)
        self.pos = nn.Parameter(torch.randn(tokens.num_tokens, width) * 0.02)
        self.class_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        if self.class_embed is not None:  # small, as G's and F's class embeddings
            nn.init.normal_(self.class_embed.weight, std=0.01)
        self.scalar_embed = nn.ModuleDict(
            {name: nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)) for name in scalars})
        self.blocks = nn.ModuleList(AdaLNBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.RMSNorm(width)
        self.readout = nn.Linear(width, tokens.token_dim)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    def forward(self, x: Tensor, y: Tensor | None, **scalars: Tensor) -> Tensor:
        """x (B, C, H, W) -> a field of the same shape; `y` None or the null class (num_classes): unconditional;
        `scalars`: each named condition as a (B,) tensor."""
        t = self.tokens
        b = x.shape[0]
        cond = sum((mlp(timestep_embedding(scalars[name], self.width).to(x.dtype))
                    for name, mlp in self.scalar_embed.items()), torch.zeros(b, self.width, device=x.device,
                                                                               dtype=x.dtype))
        if self.class_embed is not None:
            labels = y if y is not None else torch.full((b,), self.num_classes, device=x.device)
            cond = cond + self.class_embed(labels)
        cond = F.silu(cond)
        h = self.embed(patchify(x, t.patch_size)) + self.pos
        for block in self.blocks:
            h = block(h, cond)
        return unpatchify(self.readout(self.norm(h)), t.patch_size, t.in_channels, t.image_size, t.image_size)

"""Transformer parts shared by the forward flow F and the backward model G.

Pure torch. Attention runs through scaled_dot_product_attention (SDPA). A causal block also decodes: its step
(`CausalBlock.decode`) runs new tokens against a preallocated KV cache written in place (`DecodeCache`), the one step
of F's exact inverse in every decoder (tarflow.FlowBlock: serial, compiled, Jacobi).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool, qk_norm: bool = False):
        super().__init__()
        assert dim % heads == 0, "width must be divisible by the number of heads"
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, temperature: Tensor | float = 1.0) -> Tensor:
        """`temperature` > 1 flattens attention (TARFlow sec. 2.6, attention-temperature guidance); a (B, 1, 1, 1)
        tensor gives each sample its own."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if not (isinstance(temperature, float) and temperature == 1.0):
            q = q / temperature
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # bf16 autocast on the CPU: attention in float32 (autocast off: it would cast SDPA back to bf16), whose
            # flash-attention backward is far faster than bf16's there (docs/decisions.md); the matmuls keep bf16
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=self.causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
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


def affine_params(p: Tensor, clip: float | None, nvp: bool) -> tuple[Tensor, Tensor]:
    """A flow step's read-out (..., 2D) -> alpha, mu: with norm control a smooth clip to (-clip, clip) (BiFlow sec.
    3.3); volume preserving (not nvp, TARFlow's VP ablation): alpha = 0."""
    alpha, mu = p.chunk(2, dim=-1)
    if clip is not None:
        alpha, mu = clip * torch.tanh(alpha / clip), clip * torch.tanh(mu / clip)
    if not nvp:
        alpha = torch.zeros_like(alpha)
    return alpha, mu


class CausalBlock(nn.Module):
    """Pre-norm causal Transformer block of a TARFlow flow step (TARFlow sec. 2.3); `causal=False` for the channel
    coupling step of TARFlow's ablation (models/coupling.py), which never decodes token by token."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, causal: bool = True):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal=causal)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: Tensor, temperature: Tensor | float = 1.0) -> Tensor:
        x = x + self.attn(self.norm1(x), temperature)
        return x + self.mlp(self.norm2(x))

    def decode_cache(self, rows: int, length: int, like: Tensor, row_scale: Tensor | None = None,
                     bmm: bool = False, masked: bool = False) -> DecodeCache:
        """The state `decode` carries from token to token over a sequence of `length` (see DecodeCache)."""
        return DecodeCache(self, rows, length, like, row_scale, bmm, masked)

    def decode(self, h: Tensor, cache: DecodeCache, start: int | Tensor) -> Tensor:
        """`forward` on t new tokens at positions [start, start + t) of a sequence being decoded, given the keys and
        values of the tokens before them in `cache`, into which it writes the new tokens' own: h (rows * t, width),
        each row's tokens in order, -> the same. An int `start` attends to the cache's prefix, causally among the
        new tokens (eager decoders); a tensor (one token: the compiled decoder) to all N slots with those after it
        masked, so that one graph serves every position. One token at an int position runs through the cache's
        preallocated buffers (the serial decoder's hot loop)."""
        c = cache
        rows, width = c.rows, c.width
        t = h.shape[0] // rows
        x = F.layer_norm(h, (width,), *c.ln1)
        if t == 1 and isinstance(start, int):
            torch.addmm(c.b_qkv, x, c.w_qkv, out=c.qkv)  # q and the new keys and values are views of c.qkv
            c.slots[start].copy_(c.kv_new)
            q = c.q
        else:
            qkv = torch.addmm(c.b_qkv, x, c.w_qkv).view(rows, t, 3, c.heads, c.head_dim)
            q, kv_new = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1:].permute(2, 0, 3, 1, 4)
            if isinstance(start, int):
                c.kv[:, :, :, start : start + t] = kv_new
            else:
                c.kv.index_copy_(3, start.view(1), kv_new)
        if c.row_scale is not None:
            q = q * c.row_scale
        att = c.attend(q, start, t)
        h = h + torch.addmm(c.b_proj, att.view(rows, width) if t == 1 else att.transpose(1, 2).reshape(-1, width),
                            c.w_proj)
        u = F.gelu(torch.addmm(c.b_1, F.layer_norm(h, (width,), *c.ln2), c.w_1))
        return h + torch.addmm(c.b_2, u, c.w_2)


class DecodeCache:
    """What a CausalBlock's `decode` carries from token to token, made once per decode: the keys [0] and values [1]
    of the whole sequence, (2, rows, heads, N, head_dim), preallocated and written in place; the block's weights as
    the step takes them, read from its modules here (transposed for addmm, the softmax scale folded into the query
    rows) because per token the module look-ups and the folding would cost small batches more than the math;
    each row's 1 / attention temperature (`row_scale` (rows, 1, 1, 1), None when all are 1: TARFlow's
    attention-temperature guidance); which kernel attends one query (`bmm`: batched matmuls, else SDPA); and, unless
    `masked` (the compiled decoder, whose cache must start at zero: its masked slots are read, and 0 x NaN would leak
    through the softmax), one token's qkv buffer with its q and new keys and values as views."""

    def __init__(self, block: CausalBlock, rows: int, length: int, like: Tensor, row_scale: Tensor | None,
                 bmm: bool, masked: bool):
        attn, mlp = block.attn, block.mlp
        heads, head_dim = attn.heads, attn.head_dim
        width = heads * head_dim
        self.rows, self.heads, self.head_dim, self.width = rows, heads, head_dim, width
        self.row_scale, self.bmm = row_scale, bmm
        self.kv = (like.new_zeros if masked else like.new_empty)(2, rows, heads, length, head_dim)
        if not masked:
            qkv = like.new_empty(rows, 3, heads, head_dim)
            self.qkv, self.q = qkv.view(rows, 3 * width), qkv[:, 0].unsqueeze(2)
            self.kv_new = qkv[:, 1:].transpose(0, 1)
            self.slots = self.kv.unbind(3)  # each position's keys and values
        scale = like.new_ones(3 * width)
        scale[:width] = head_dim**-0.5
        self.ln1 = (block.norm1.weight, block.norm1.bias, block.norm1.eps)
        self.w_qkv, self.b_qkv = (attn.qkv.weight * scale[:, None]).t(), attn.qkv.bias * scale
        self.w_proj, self.b_proj = attn.proj.weight.t(), attn.proj.bias
        self.ln2 = (block.norm2.weight, block.norm2.bias, block.norm2.eps)
        self.w_1, self.b_1, self.w_2, self.b_2 = mlp.fc1.weight.t(), mlp.fc1.bias, mlp.fc2.weight.t(), mlp.fc2.bias

    def attend(self, q: Tensor, start: int | Tensor, t: int) -> Tensor:
        """Attention of the t new tokens' queries q (rows, heads, t, head_dim), already scaled, over the cache, whose
        slots [start, start + t) hold their keys and values: (rows, heads, t, head_dim), or (rows * heads, 1,
        head_dim) from the batched matmuls."""
        if not isinstance(start, int):  # every slot, those after the new token masked
            hidden = torch.arange(self.kv.shape[3], device=q.device) > start
            return (q @ self.kv[0].transpose(2, 3)).masked_fill(hidden, float("-inf")).softmax(-1) @ self.kv[1]
        keys, values = self.kv[:, :, :, : start + t]  # (rows, heads, start + t, head_dim) views of the cache
        if self.bmm and t == 1:
            # one query against a short cache: batched matmuls beat SDPA's CPU kernel once there are many (row,
            # head) pairs; for a handful SDPA is fewer calls
            pairs, head_dim = self.rows * self.heads, self.head_dim
            s = torch.bmm(q.reshape(pairs, 1, head_dim), keys.reshape(pairs, start + 1, head_dim).transpose(1, 2))
            return torch.bmm(s.softmax(-1), values.reshape(pairs, start + 1, head_dim))
        mask = torch.ones(t, start + t, dtype=torch.bool, device=q.device).tril(start) if start and t > 1 else None
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=t > 1 and not start,
                                              scale=1.0)


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


@dataclass(frozen=True)
class BackboneConfig(ImageTokens):
    """The 1-NFE peers' shape (ConditionedTransformer): G's width, heads and classes, `depth` blocks."""

    in_channels: int = 1
    image_size: int = 8
    patch_size: int = 2
    width: int = 64
    depth: int = 5  # bidirectional blocks (G's stages x layers per stage, for G's parameter count)
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0


class ConditionedTransformer(nn.Module):
    """G's backbone as a field network (the 1-NFE peers): patch embedding + positions, `depth` bidirectional AdaLN
    blocks modulated by one condition vector (class, with a null class for CFG, plus each named scalar condition
    through its own sinusoidal embedding and MLP), and a read-out to tokens, zero-initialised: the field starts at 0."""

    def __init__(self, cfg: BackboneConfig, scalars: tuple[str, ...]):
        super().__init__()
        self.cfg, width = cfg, cfg.width
        self.embed = nn.Linear(cfg.token_dim, width)
        self.pos = nn.Parameter(torch.randn(cfg.num_tokens, width) * 0.02)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, width) if cfg.num_classes else None
        if self.class_embed is not None:  # small, as G's and F's class embeddings
            nn.init.normal_(self.class_embed.weight, std=0.01)
        self.scalar_embed = nn.ModuleDict(
            {name: nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)) for name in scalars})
        self.blocks = nn.ModuleList(AdaLNBlock(width, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(width)
        self.readout = nn.Linear(width, cfg.token_dim)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    def forward(self, x: Tensor, y: Tensor | None, **scalars: Tensor) -> Tensor:
        """x (B, C, H, W) -> a field of the same shape; `y` None or the null class (num_classes): unconditional;
        `scalars`: each named condition as a (B,) tensor."""
        t, b = self.cfg, x.shape[0]
        cond = torch.zeros(b, t.width, device=x.device, dtype=x.dtype)
        for name, mlp in self.scalar_embed.items():
            cond = cond + mlp(timestep_embedding(scalars[name], t.width).to(x.dtype))
        if self.class_embed is not None:
            labels = y if y is not None else torch.full((b,), t.num_classes, device=x.device)
            cond = cond + self.class_embed(labels)
        cond = F.silu(cond)
        h = self.embed(patchify(x, t.patch_size)) + self.pos
        for block in self.blocks:
            h = block(h, cond)
        return unpatchify(self.readout(self.norm(h)), t.patch_size, t.in_channels, t.image_size, t.image_size)

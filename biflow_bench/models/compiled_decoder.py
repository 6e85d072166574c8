"""The exact inverse of a flow block (tarflow.FlowBlock) with each token's step under torch.compile: the same math
as the block's cached decoder (`FlowBlock._reverse_cached`, weights from `_decode_weights`), the per-operator
overhead of small batches fused away by the compiler."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import layers


def reverse_compiled(block: nn.Module, z: Tensor, y: Tensor | None, y_uncond: Tensor | None, guidance: float,
                     temperature: float, annealed: bool) -> Tensor:
    """The fast inverse with each token's step (every layer, the read-out, guidance and the update) as one
    torch.compile'd function, `_token_step`: the per-operator overhead that dominates small batches is fused
    away. Every step has the same shapes (the cache has all N slots, the step masks those not yet written), so
    one compiled graph serves every position, block and call at a batch size; the new keys and values come back
    and are written into the cache here."""
    cfg = block.cfg
    b, n, _ = z.shape
    guided = guidance > 0
    x = z.clone()
    if n == 1:
        return x
    table, w_in, layer_weights, readout = block._decode_weights(b, y, y_uncond, guided, z.dtype)
    heads = cfg.num_heads
    # zeros: the masked slots must hold finite values (0 x NaN would leak through the softmax)
    caches = [z.new_zeros(2, 2 * b if guided else b, heads, n, cfg.channels // heads) for _ in layer_weights]
    weights = z.new_tensor(layers.guidance_weights(guidance, n, annealed)) if guided else None  # tokens 1..N-1
    row_scale = block._row_scale(b, guided, temperature, z)
    step = _compiled_token_step(layers.COMPILE_BACKEND)
    positions = torch.arange(n, device=z.device).unbind()
    for i in range(n - 1):
        x_next, new_kv = step(x, z, table, positions[i], w_in, layer_weights, caches, readout, row_scale, weights,
                              cfg.clip, cfg.nvp)
        x[:, i + 1] = x_next
        for cache, kv in zip(caches, new_kv):
            cache[:, :, :, i] = kv
    return x


def _token_step(x: Tensor, z: Tensor, table: Tensor, pos: Tensor, w_in: Tensor, layer_weights: list[tuple],
                caches: list[Tensor], readout: tuple, row_scale: Tensor | None, weights: Tensor | None,
                clip: float | None, nvp: bool) -> tuple[Tensor, list[Tensor]]:
    """One step of the exact inverse (`reverse_compiled`, weights from FlowBlock._decode_weights): token `pos` of
    the ordered sequence x (B, N, D) -> token pos + 1, and the new token's (keys, values) of each layer. caches:
    (2, rows, heads, N, head_dim) per layer, slots < pos written; table (rows, N, width)."""
    b, n, _ = x.shape
    rows, heads, head_dim = caches[0].shape[1], caches[0].shape[2], caches[0].shape[4]
    width = heads * head_dim
    index = pos.view(1)
    h = table.index_select(1, index)[:, 0] + (x.index_select(1, index)[:, 0] @ w_in).repeat(rows // b, 1)
    hidden = torch.arange(n, device=x.device) >= pos  # cache slots not yet written (the new token comes apart)
    new_kv = []
    for (ln1, w_qkv, b_qkv, w_proj, b_proj, ln2, w_1, b_1, w_2, b_2), cache in zip(layer_weights, caches):
        q, k, v = torch.addmm(b_qkv, F.layer_norm(h, (width,), *ln1), w_qkv).view(rows, 3, heads, head_dim).unbind(1)
        if row_scale is not None:
            q = q * row_scale
        new_kv.append(torch.stack([k, v]))
        s_cache = torch.einsum("rhd,rhnd->rhn", q, cache[0]).masked_fill(hidden, float("-inf"))
        s = torch.cat([s_cache, (q * k).sum(-1, keepdim=True)], -1).softmax(-1)  # (rows, heads, N + 1)
        att = torch.einsum("rhn,rhnd->rhd", s[..., :n], cache[1]) + s[..., n:] * v
        h = h + torch.addmm(b_proj, att.reshape(rows, width), w_proj)
        h = h + torch.addmm(b_2, F.gelu(torch.addmm(b_1, F.layer_norm(h, (width,), *ln2), w_1)), w_2)
    norm, w_out, b_out = readout
    p = torch.addmm(b_out, F.layer_norm(h, (width,), *norm), w_out)
    if clip is not None:
        p = clip * torch.tanh(p)
    if weights is not None:  # (1 + w) p_c - w p_u
        p = torch.lerp(p[b:], p[:b], 1.0 + weights[pos])
    alpha, mu = p.chunk(2, dim=-1)
    z_next = z.index_select(1, index + 1)[:, 0]
    return (mu + z_next * torch.exp(alpha) if nvp else mu + z_next), new_kv


@functools.cache
def _compiled_token_step(backend: str):
    options = layers.compile_options(backend, cpp_wrapper=True)
    # one graph per batch size, guidance on or off, temperature rows and grad mode: more than dynamo's default 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(_token_step, backend=backend, dynamic=False, fullgraph=True, options=options)

"""The exact inverse's one decoding step (CausalBlock.decode; FlowBlock._encode / _update) in each of its modes
against `forward`, the serial decoder bit for bit against the decoder the committed records were sampled with,
and one compiled graph for every position and block. The serial, compiled and Jacobi decoders against the plain
reference: tests/test_flow.py, tests/test_bench.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize

import biflow_bench.models.tarflow as tarflow
from biflow_bench.models import TARFlow, layers, preset_configs
from biflow_bench.models.layers import CausalBlock, guidance_weights


def _block(seed: int = 0) -> CausalBlock:
    return randomize(CausalBlock(16, 2), scale=1.0, seed=seed).double().eval()


@pytest.mark.parametrize("bmm", [False, True])
@pytest.mark.parametrize("temperature", [None, 0.5])
def test_block_decode_at_int_positions_equals_forward(bmm, temperature):
    """Groups of t tokens at int positions (one token: the buffers and bmm or SDPA; several: causal among them,
    from position 0 and past it) give the rows of `forward` over the whole sequence, and fill the cache."""
    block, rows, n = _block(), 3, 9
    h = torch.randn(rows, n, 16, dtype=torch.float64)
    row_scale = None if temperature is None else torch.tensor([1.0, 1 / temperature, 1.0]).double().view(3, 1, 1, 1)
    with torch.no_grad():
        expected = block(h, 1.0 if row_scale is None else 1 / row_scale)
        cache = block.decode_cache(rows, n, h, row_scale, bmm=bmm)
        out, start = [], 0
        for t in (3, 1, 2, 1, 2):
            out.append(block.decode(h[:, start : start + t].reshape(rows * t, 16), cache, start).view(rows, t, 16))
            start += t
    assert torch.allclose(torch.cat(out, 1), expected, atol=1e-12)
    k = F.linear(block.norm1(h), block.attn.qkv.weight, block.attn.qkv.bias)[..., 16:32]
    assert torch.allclose(cache.kv[0].transpose(1, 2).reshape(rows, n, 16), k, atol=1e-12)


def test_block_decode_at_tensor_positions_equals_forward():
    """The compiled decoder's mode, eagerly: one token at a 0-d tensor position, all N slots attended to with those
    past it masked (the cache starts at zero), gives `forward`'s rows."""
    block, rows, n = _block(1), 2, 6
    h = torch.randn(rows, n, 16, dtype=torch.float64)
    with torch.no_grad():
        cache = block.decode_cache(rows, n, h, masked=True)
        out = [block.decode(h[:, i], cache, torch.tensor(i)) for i in range(n)]
        assert torch.allclose(torch.stack(out, 1), block(h), atol=1e-12)


def _flow(scale: str, **overrides) -> TARFlow:
    cfg = dataclasses.replace(preset_configs(scale)[0], **overrides)
    return randomize(TARFlow(cfg), scale=0.5).eval()


@pytest.mark.parametrize("sdpa_max_pairs", [10**9, 0], ids=["sdpa", "bmm"])
@pytest.mark.parametrize("scale,overrides", [("tiny", {}), ("small", {}), ("tiny", dict(num_classes=0)),
                                             ("tiny", dict(clip=None, nvp=False)),
                                             ("tiny", dict(layers_per_block=2, num_heads=2))])
def test_serial_decoder_samples_bit_for_bit_as_recorded(monkeypatch, sdpa_max_pairs, scale, overrides):
    """The committed records were sampled by the serial decoder as it was before the decoders shared one step
    (`_recorded_reverse`, kept below): the samples must not move by one bit, in float32 as sampled."""
    monkeypatch.setattr(tarflow, "_SDPA_MAX_PAIRS", sdpa_max_pairs)
    flow = _flow(scale, **overrides)
    c = flow.config
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, c.in_channels, c.image_size, c.image_size, generator=gen)
    y = torch.tensor([1, 7, c.num_classes]) if c.num_classes else None  # the last: the null class
    guides = [(0.0, None, False), (1.0, 0.6, False), (2.0, 0.6, True)]  # attention-temperature guidance
    guides += [(1.5, None, False), (1.5, None, True)] if c.num_classes else []  # CFG, annealed
    for guidance, temperature, annealed in guides:
        new = flow.reverse(z, y, guidance=guidance, guidance_temperature=temperature, annealed=annealed)
        recorded = _recorded_reverse(flow, z, y, guidance, temperature, annealed, sdpa_max_pairs)
        assert torch.equal(new, recorded), (guidance, temperature, annealed, (new - recorded).abs().max())


def test_compiled_decoder_is_one_graph_for_every_position_and_block(monkeypatch):
    """The step reads nothing that differs between positions or blocks: one graph per batch size and guidance
    mode, however many blocks and calls."""
    graphs = []
    monkeypatch.setattr(layers, "COMPILE_BACKEND", lambda gm, _inputs: graphs.append(gm) or gm.forward)
    torch._dynamo.reset()
    flow = _flow("tiny")
    z, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    for _ in range(2):
        for guidance in (0.0, 1.0):
            assert torch.allclose(flow.reverse(z, y, guidance=guidance, compiled=True),
                                  flow.reverse(z, y, guidance=guidance), atol=1e-5)
    torch._dynamo.reset()
    assert len(graphs) == 2


# ----------------------------------------------------------------------------------------------------------------------
# the serial decoder as the records were sampled with it (FlowBlock._reverse_cached, _decode_weights and _row_scale
# before issue 41 item 1), frozen: only the ops and their order matter, not the code's shape


def _recorded_reverse(flow: TARFlow, z, y, guidance, guidance_temperature, annealed, sdpa_max_pairs):
    y, y_uncond = flow._guidance_labels(z, y, guidance, guidance_temperature)
    tokens = flow._tokens(z)
    for block in reversed(flow.blocks):
        x = _recorded_block(block, block._order(tokens), y, y_uncond, guidance, guidance_temperature or 1.0,
                            annealed, sdpa_max_pairs)
        tokens = block._order(x)
    return flow._image(tokens)


@torch.no_grad()
def _recorded_block(block, z, y, y_uncond, guidance, temperature, annealed, sdpa_max_pairs):
    cfg = block.cfg
    b, n, d = z.shape
    guided = guidance > 0
    rows = 2 * b if guided else b
    width, heads = cfg.channels, cfg.num_heads
    head_dim = width // heads
    x = z.clone()
    if n == 1:
        return x
    dtype = z.dtype
    pos = block.pos.flip(0) if block.flip else block.pos
    table = (pos + block.proj_in.bias).to(dtype)
    if block.class_embed is not None:
        ys = torch.cat([y, y_uncond]) if guided else y
        table = table[None] + block.class_embed(ys)[:, None].to(dtype)
    else:
        table = table[None].expand(2 * b if guided else b, -1, -1)
    weights_per_layer = []
    for layer in block.layers:
        attn, mlp = layer.attn, layer.mlp
        scale = torch.ones(3 * width, device=table.device, dtype=dtype)
        scale[:width] = head_dim**-0.5
        weights_per_layer.append((
            (layer.norm1.weight, layer.norm1.bias, layer.norm1.eps), (attn.qkv.weight * scale[:, None]).t(),
            attn.qkv.bias * scale, attn.proj.weight.t(), attn.proj.bias,
            (layer.norm2.weight, layer.norm2.bias, layer.norm2.eps), mlp.fc1.weight.t(), mlp.fc1.bias,
            mlp.fc2.weight.t(), mlp.fc2.bias,
        ))
    w_out, b_out = block.proj_out.weight, block.proj_out.bias
    if cfg.clip is not None:
        w_out, b_out = w_out / cfg.clip, b_out / cfg.clip
    norm_w, norm_b, norm_eps = block.norm_out.weight, block.norm_out.bias, block.norm_out.eps
    w_in, w_out = block.proj_in.weight.t(), w_out.t()
    row_scale = None
    if guided and temperature != 1.0:
        row_scale = torch.cat([z.new_ones(b, 1, 1), z.new_full((b, 1, 1), 1.0 / temperature)])
    use_bmm = rows * heads > sdpa_max_pairs
    buffers = []
    for _ in weights_per_layer:
        qkv = z.new_empty(rows, 3, heads, head_dim)
        kv = z.new_empty(2, rows, heads, n, head_dim)
        buffers.append((qkv.view(rows, 3 * width), qkv[:, 0], qkv[:, 1:].transpose(0, 1), kv, kv.unbind(3)))
    pairs = rows * heads
    xs, zs = x.unbind(1), z.unbind(1)
    tables = table.view(2, b, n, width).unbind(2) if guided else table.unbind(1)
    p_all = z.new_empty(rows, 2 * d)
    p_cond, p_unc = p_all[:b], p_all[b:]
    p_guided = z.new_empty(b, 2 * d) if guided else p_all
    alpha, mu = p_guided[:, :d], p_guided[:, d:]
    weights = guidance_weights(guidance, n, annealed)
    for i in range(n - 1):
        if guided:
            h = (tables[i] + torch.mm(xs[i], w_in)).view(rows, width)
        else:
            h = torch.addmm(tables[i], xs[i], w_in)
        for (ln1, w_qkv, b_qkv, w_proj, b_proj, ln2, w_1, b_1, w_2, b_2), (qkv, q, kv_new, kv, slots) \
                in zip(weights_per_layer, buffers):
            torch.addmm(b_qkv, F.layer_norm(h, (width,), *ln1), w_qkv, out=qkv)
            slots[i].copy_(kv_new)
            qi = q if row_scale is None else q * row_scale
            keys, values = kv[:, :, :, : i + 1]
            if use_bmm:
                s = torch.bmm(qi.reshape(pairs, 1, head_dim), keys.reshape(pairs, i + 1, head_dim).transpose(1, 2))
                att = torch.bmm(s.softmax(-1), values.reshape(pairs, i + 1, head_dim))
            else:
                att = F.scaled_dot_product_attention(qi.unsqueeze(2), keys, values, scale=1.0)
            h = h + torch.addmm(b_proj, att.view(rows, width), w_proj)
            u = F.gelu(torch.addmm(b_1, F.layer_norm(h, (width,), *ln2), w_1))
            h = h + torch.addmm(b_2, u, w_2)
        torch.addmm(b_out, F.layer_norm(h, (width,), norm_w, norm_b, norm_eps), w_out, out=p_all)
        if cfg.clip is not None:
            p_all.tanh_().mul_(cfg.clip)
        if guided:
            torch.lerp(p_unc, p_cond, 1.0 + weights[i], out=p_guided)
        if cfg.nvp:
            torch.addcmul(mu, zs[i + 1], alpha.exp(), out=xs[i + 1])
        else:
            torch.add(mu, zs[i + 1], out=xs[i + 1])
    return x

"""The forward flow F: an improved TARFlow (Zhai et al., ICML 2025) with BiFlow's norm control.

x (B, C, H, W) is cut into N patches of D = C*p*p values. Each of the `num_blocks` flow steps is a causal Transformer
over the (alternately reversed) patch sequence that predicts, from the tokens before i, the parameters of an affine
update of token i (TARFlow eq. 4):

    z_i = (x_i - mu_i(x_<i)) * exp(-alpha_i(x_<i)),     log|det dz/dx| = -sum_i sum_j alpha_ij     (eq. 5)

Token 0 passes unchanged. The inverse is exact and serial: token i needs x_<i, so decoding runs token by token,
block by block (with a preallocated KV cache, see FlowBlock._reverse_cached). Norm control (BiFlow sec. 3.3) bounds alpha and mu to (-c, c).

The same inverse can be solved in parallel (`TARFlow.reverse_jacobi`): x = mu(x) + z exp(alpha(x)) is a fixed point
of one causal pass over a whole group of tokens, and Jacobi iteration from the guess x = z reaches it exactly in at
most as many passes as the group has tokens (after k passes the first k tokens are exact), usually far fewer at a
tolerance. Groups of `group` tokens decoded one after the other are Gauss-Seidel-Jacobi; group = 1 is the serial
decoder, group >= N - 1 plain Jacobi over the whole block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compiled_decoder import reverse_compiled
from .layers import CausalBlock, ImageTokens, KVCache, guidance_weights, patchify, unpatchify


@dataclass(frozen=True)
class TARFlowConfig(ImageTokens):
    in_channels: int = 1
    image_size: int = 8
    patch_size: int = 2
    channels: int = 64  # Transformer width
    num_blocks: int = 4  # T flow steps (TARFlow sec. 2.3)
    layers_per_block: int = 1  # K Transformer layers per flow step
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0: unconditional; else class-conditional with a null class for CFG
    clip: float | None = None  # BiFlow norm control: alpha, mu bounded to (-clip, clip); None turns it off
    nvp: bool = True  # False: volume preserving, alpha = 0 (TARFlow's VP ablation)

    @property
    def num_dims(self) -> int:
        return self.in_channels * self.image_size**2


class FlowOutput(NamedTuple):
    z: Tensor  # (B, C, H, W)
    logdet: Tensor  # (B,) log|det dz/dx| in nats
    trajectory: list[Tensor]  # num_blocks + 1 states, x_0 = x ... x_B = z


class JacobiResult(NamedTuple):
    x: Tensor  # (B, C, H, W)
    iterations: list[int]  # parallel passes per flow block, in decoding order (the last block first)


class FlowBlock(nn.Module):
    """One autoregressive flow step: a causal Transformer over the sequence, reversed when `flip`."""

    def __init__(self, cfg: TARFlowConfig, flip: bool):
        super().__init__()
        self.cfg, self.flip = cfg, flip
        width = cfg.channels
        self.proj_in = nn.Linear(cfg.token_dim, width)
        self.pos = nn.Parameter(torch.randn(cfg.num_tokens, width) * 0.02)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, width) if cfg.num_classes else None
        if self.class_embed is not None:  # small, like the positions: N(0, 1) rows drown the first steps' signal
            nn.init.normal_(self.class_embed.weight, std=0.01)
        self.layers = nn.ModuleList(CausalBlock(width, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.layers_per_block))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, 2 * cfg.token_dim)
        nn.init.zeros_(self.proj_out.weight)  # every step starts as the identity map
        nn.init.zeros_(self.proj_out.bias)

    def _order(self, t: Tensor) -> Tensor:
        return t.flip(1) if self.flip else t

    def _embed(self, x: Tensor, start: int, y: Tensor | None) -> Tensor:
        pos = self.pos.flip(0) if self.flip else self.pos
        h = self.proj_in(x) + pos[start : start + x.shape[1]]
        if self.class_embed is not None:
            h = h + self.class_embed(y)[:, None]
        return h

    def _params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """alpha, mu predicted from each position (for the next token)."""
        alpha, mu = self.proj_out(self.norm_out(h)).chunk(2, dim=-1)
        if self.cfg.clip is not None:  # norm control: a smooth clip to (-c, c)
            c = self.cfg.clip
            alpha, mu = c * torch.tanh(alpha / c), c * torch.tanh(mu / c)
        if not self.cfg.nvp:
            alpha = torch.zeros_like(alpha)
        return alpha, mu

    def forward(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        x = self._order(x)
        h = self._embed(x, 0, y)
        for layer in self.layers:
            h = layer(h)
        alpha, mu = self._params(h)
        alpha = torch.cat([torch.zeros_like(alpha[:, :1]), alpha[:, :-1]], dim=1)  # token i from tokens < i
        mu = torch.cat([torch.zeros_like(mu[:, :1]), mu[:, :-1]], dim=1)
        z = (x - mu) * torch.exp(-alpha)
        return self._order(z), -alpha.flatten(1).sum(1)

    @torch.no_grad()
    def reverse(
        self,
        z: Tensor,
        y: Tensor | None,
        y_uncond: Tensor | None = None,
        guidance: float = 0.0,
        temperature: float = 1.0,
        annealed: bool = False,
        kv_cache: bool = True,
        compiled: bool = False,
    ) -> Tensor:
        """Serial inverse of `forward`. With guidance > 0 the conditional and the guiding pass (class `y_uncond`,
        attention temperature `temperature`) run as one batch of 2B and mu, alpha are extrapolated (TARFlow sec. 2.6):
        p~ = (1 + w) p(. | y) - w p(. | y_uncond).

        kv_cache=True is the fast decoder (`_reverse_cached`; with `compiled`, its token step under torch.compile,
        compiled_decoder.reverse_compiled); kv_cache=False is the plain reference that re-runs the whole prefix through the
        modules at every step (the tests check that all agree)."""
        z = self._order(z)
        if compiled and kv_cache:
            return self._order(reverse_compiled(self, z, y, y_uncond, guidance, temperature, annealed))
        decode = self._reverse_cached if kv_cache else self._reverse_reference
        return self._order(decode(z, y, y_uncond, guidance, temperature, annealed))

    def _reverse_reference(self, z: Tensor, y: Tensor | None, y_uncond: Tensor | None, guidance: float,
                           temperature: float, annealed: bool) -> Tensor:
        """Uncached reference inverse on the ordered sequence: step i embeds x_<=i and runs every module on it."""
        b, n, _ = z.shape
        x = z.clone()
        guided = guidance > 0
        ys, temp = y, 1.0
        if guided:
            ys = None if y is None else torch.cat([y, y_uncond])
            temp = torch.ones(2 * b, 1, 1, 1, device=z.device, dtype=z.dtype)
            temp[b:] = temperature
        weights = guidance_weights(guidance, n, annealed)
        for i in range(n - 1):
            inp = x[:, : i + 1]
            if guided:
                inp = torch.cat([inp, inp])
            h = self._embed(inp, 0, ys)
            for layer in self.layers:
                h = layer(h, None, temp)
            alpha, mu = self._params(h[:, -1])
            if guided:
                w = weights[i]
                alpha = (1 + w) * alpha[:b] - w * alpha[b:]
                mu = (1 + w) * mu[:b] - w * mu[b:]
            x[:, i + 1] = z[:, i + 1] * torch.exp(alpha) + mu
        return x

    def _decode_weights(self, b: int, y: Tensor | None, y_uncond: Tensor | None, guided: bool,
                        dtype: torch.dtype) -> tuple[Tensor, Tensor, list[tuple], tuple]:
        """What the fast decoders hoist out of their token loop: proj_in's bias + positional (+ class) embedding as
        one (rows, N, width) table (rows = 2B with guidance: the conditional rows, then the guiding ones),
        proj_in's transposed weight, and per layer its transposed weights with the softmax scale folded into the
        query rows; the read-out with the clip's 1/c folded in."""
        cfg = self.cfg
        width, head_dim = cfg.channels, cfg.channels // cfg.num_heads
        pos = self.pos.flip(0) if self.flip else self.pos
        table = (pos + self.proj_in.bias).to(dtype)
        if self.class_embed is not None:
            ys = torch.cat([y, y_uncond]) if guided else y  # type: ignore[list-item]
            table = table[None] + self.class_embed(ys)[:, None].to(dtype)
        else:
            table = table[None].expand(2 * b if guided else b, -1, -1)
        layers = []
        for layer in self.layers:
            attn, mlp = layer.attn, layer.mlp
            scale = torch.ones(3 * width, device=table.device, dtype=dtype)
            scale[:width] = head_dim**-0.5
            layers.append((
                (layer.norm1.weight, layer.norm1.bias, layer.norm1.eps), (attn.qkv.weight * scale[:, None]).t(),
                attn.qkv.bias * scale, attn.proj.weight.t(), attn.proj.bias,
                (layer.norm2.weight, layer.norm2.bias, layer.norm2.eps), mlp.fc1.weight.t(), mlp.fc1.bias,
                mlp.fc2.weight.t(), mlp.fc2.bias,
            ))
        w_out, b_out = self.proj_out.weight, self.proj_out.bias
        if cfg.clip is not None:  # c * tanh(p / c) with 1/c folded into the read-out
            w_out, b_out = w_out / cfg.clip, b_out / cfg.clip
        norm = (self.norm_out.weight, self.norm_out.bias, self.norm_out.eps)
        return table, self.proj_in.weight.t(), layers, (norm, w_out.t(), b_out)

    def _row_scale(self, b: int, guided: bool, temperature: float, like: Tensor) -> Tensor | None:
        """1 / temperature of each of the 2B rows (TARFlow's attention-temperature guidance), None when all are 1."""
        if not guided or temperature == 1.0:
            return None
        return torch.cat([like.new_ones(b, 1, 1), like.new_full((b, 1, 1), 1.0 / temperature)])

    def _reverse_cached(self, z: Tensor, y: Tensor | None, y_uncond: Tensor | None, guidance: float,
                        temperature: float, annealed: bool) -> Tensor:
        """Fast exact inverse on the ordered sequence: one token per step through a preallocated KV cache.

        The math of `forward` / `CausalBlock` in functional form, with everything that does not depend on the
        decoded token hoisted out of the loop (`_decode_weights`). Per token and layer: layer norm, one qkv matmul
        whose k and v go into the cache in one in-place copy, attention of the new query over the cache prefix (no
        mask: the cache holds only earlier tokens), output projection, MLP. With guidance the 2B rows share one
        input projection, the guiding rows' attention temperature scales their queries, and the extrapolation
        (1 + w) p_c - w p_u is one lerp."""
        cfg = self.cfg
        b, n, d = z.shape
        guided = guidance > 0
        rows = 2 * b if guided else b
        width, heads = cfg.channels, cfg.num_heads
        head_dim = width // heads
        x = z.clone()
        if n == 1:
            return x
        table, w_in, layers, ((norm_w, norm_b, norm_eps), w_out, b_out) = self._decode_weights(
            b, y, y_uncond, guided, z.dtype)
        row_scale = self._row_scale(b, guided, temperature, z)
        # one query against a short cache: batched matmuls beat SDPA's CPU kernel once there are many (row, head)
        # pairs; for a handful SDPA is fewer calls
        use_bmm = rows * heads > _SDPA_MAX_PAIRS
        buffers = []
        for _ in layers:
            qkv = z.new_empty(rows, 3, heads, head_dim)  # written by every step's qkv matmul (out=)
            kv = z.new_empty(2, rows, heads, n, head_dim)  # the KV cache: keys [0], values [1], filled in place
            buffers.append((qkv.view(rows, 3 * width), qkv[:, 0], qkv[:, 1:].transpose(0, 1), kv, kv.unbind(3)))
        clip = cfg.clip
        layer_norm, sdpa, gelu, addmm, bmm = F.layer_norm, F.scaled_dot_product_attention, F.gelu, torch.addmm, torch.bmm
        pairs = rows * heads
        # per-position views, taken once
        xs, zs = x.unbind(1), z.unbind(1)
        tables = table.view(2, b, n, width).unbind(2) if guided else table.unbind(1)
        p_all = z.new_empty(rows, 2 * d)  # the read-out (alpha, mu) of every row, then of each sample
        p_cond, p_unc = p_all[:b], p_all[b:]
        p_guided = z.new_empty(b, 2 * d) if guided else p_all
        alpha, mu = p_guided[:, :d], p_guided[:, d:]
        weights = guidance_weights(guidance, n, annealed)

        for i in range(n - 1):
            if guided:  # one (b, width) projection, shared by both passes
                h = (tables[i] + torch.mm(xs[i], w_in)).view(rows, width)
            else:
                h = addmm(tables[i], xs[i], w_in)
            for (ln1, w_qkv, b_qkv, w_proj, b_proj, ln2, w_1, b_1, w_2, b_2), (qkv, q, kv_new, kv, slots) \
                    in zip(layers, buffers):
                addmm(b_qkv, layer_norm(h, (width,), *ln1), w_qkv, out=qkv)
                slots[i].copy_(kv_new)
                qi = q if row_scale is None else q * row_scale
                keys, values = kv[:, :, :, : i + 1]  # (rows, heads, i + 1, head_dim) views of the cache
                if use_bmm:
                    s = bmm(qi.reshape(pairs, 1, head_dim), keys.reshape(pairs, i + 1, head_dim).transpose(1, 2))
                    att = bmm(s.softmax(-1), values.reshape(pairs, i + 1, head_dim))
                else:
                    att = sdpa(qi.unsqueeze(2), keys, values, scale=1.0)
                h = h + addmm(b_proj, att.view(rows, width), w_proj)
                u = gelu(addmm(b_1, layer_norm(h, (width,), *ln2), w_1))
                h = h + addmm(b_2, u, w_2)
            addmm(b_out, layer_norm(h, (width,), norm_w, norm_b, norm_eps), w_out, out=p_all)
            if clip is not None:
                p_all.tanh_().mul_(clip)
            if guided:  # (1 + w) p_c - w p_u = lerp(p_u, p_c, 1 + w), alpha and mu at once
                torch.lerp(p_unc, p_cond, 1.0 + weights[i], out=p_guided)
            if cfg.nvp:
                torch.addcmul(mu, zs[i + 1], alpha.exp(), out=xs[i + 1])
            else:
                torch.add(mu, zs[i + 1], out=xs[i + 1])
        return x

    @torch.no_grad()
    def reverse_jacobi(self, z: Tensor, y: Tensor | None, y_uncond: Tensor | None = None, guidance: float = 0.0,
                       temperature: float = 1.0, annealed: bool = False, tol: float = 1e-3,
                       group: int = 16) -> tuple[Tensor, int]:
        """Inverse of `forward` by (Gauss-Seidel-)Jacobi iteration; returns it and the number of parallel passes.

        Tokens 1..N-1 are cut into groups of `group`, decoded one group after the other. Within a group every pass
        runs the causal Transformer over the group's inputs (the tokens before it come from a KV cache) and
        updates all of its tokens at once, x_i <- mu_i(x_<i) + z_i exp(alpha_i(x_<i)), starting from x = z; the
        group stops when no value changed by more than `tol` in the last pass, and after at most as many passes
        as it has tokens, where it equals the serial inverse (tol = 0: up to float rounding). The next group's
        first pass re-encodes the tokens that moved in the last pass, so every group sees the final values of
        the tokens before it.
        The convergence test is over the whole batch. Guidance as in `reverse`: the 2B rows are one batch and
        alpha, mu are extrapolated per token."""
        z = self._order(z)
        b, n, _ = z.shape
        x = z.clone()
        guided = guidance > 0
        ys: Tensor | None = y
        temp: Tensor | float = 1.0
        if guided:
            ys = None if y is None else torch.cat([y, y_uncond])  # type: ignore[list-item]
            temp = torch.ones(2 * b, 1, 1, 1, device=z.device, dtype=z.dtype)
            temp[b:] = temperature
        rows, heads = (2 * b if guided else b), self.cfg.num_heads
        caches = [KVCache(rows, heads, n, self.cfg.channels // heads, z) for _ in self.layers]
        weights = z.new_tensor(guidance_weights(guidance, n, annealed))  # of each decoded token 1..N-1
        passes, valid = 0, 0  # the caches' keys and values at positions < valid are those of the final tokens
        for start in range(1, n, group):
            end = min(start + group, n)
            for _ in range(end - start):
                # position j predicts token j + 1; the pass re-encodes from the first stale cache position (the
                # previous group's tokens moved in its last pass) and rewrites the group's own keys and values
                lo = min(valid, start - 1)
                inp = x[:, lo : end - 1]
                for cache in caches:
                    cache.pos = lo
                h = self._embed(torch.cat([inp, inp]) if guided else inp, lo, ys)
                for layer, cache in zip(self.layers, caches, strict=True):
                    h = layer(h, cache, temp)
                alpha, mu = self._params(h[:, start - 1 - lo :])
                if guided:
                    w = weights[start - 1 : end - 1].view(1, -1, 1)
                    alpha = (1 + w) * alpha[:b] - w * alpha[b:]
                    mu = (1 + w) * mu[:b] - w * mu[b:]
                new = z[:, start:end] * torch.exp(alpha) + mu
                change = (new - x[:, start:end]).abs().max()
                x[:, start:end] = new
                passes += 1
                valid = end - 1 if change == 0 else start  # the inputs of this pass, up to the moved tokens
                if change <= tol:
                    break
        return self._order(x), passes


# exact decoding's attention: SDPA up to this many (row, head) pairs, batched matmuls above
_SDPA_MAX_PAIRS = 16


class TARFlow(nn.Module):
    def __init__(self, cfg: TARFlowConfig):
        super().__init__()
        self.config = cfg
        self.blocks = nn.ModuleList(FlowBlock(cfg, flip=bool(t % 2)) for t in range(cfg.num_blocks))

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def _labels(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if not self.config.num_classes:
            return None
        if y is None:  # unconditional: the null class learned through label drop
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        return y

    def _tokens(self, x: Tensor) -> Tensor:
        return patchify(x, self.config.patch_size)

    def _image(self, t: Tensor) -> Tensor:
        c = self.config
        return unpatchify(t, c.patch_size, c.in_channels, c.image_size, c.image_size)

    def forward(self, x: Tensor, y: Tensor | None = None) -> FlowOutput:
        y = self._labels(y, x.shape[0], x.device)
        tokens, logdet, trajectory = self._tokens(x), x.new_zeros(x.shape[0]), [x]
        for block in self.blocks:
            tokens, ld = block(tokens, y)
            logdet = logdet + ld
            trajectory.append(self._image(tokens))
        return FlowOutput(trajectory[-1], logdet, trajectory)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x) in nats under the standard normal prior (change of variables, TARFlow eq. 1)."""
        z, logdet, _ = self(x, y)
        d = self.config.num_dims
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi) + logdet

    @torch.no_grad()
    def reverse(
        self,
        z: Tensor,
        y: Tensor | None = None,
        guidance: float = 0.0,
        kv_cache: bool = True,
        guidance_temperature: float | None = None,
        annealed: bool = False,
        compiled: bool = False,
    ) -> Tensor:
        """Exact inverse x = F^-1(z): num_blocks x (N - 1) serial decoding steps (`compiled`: each step one
        torch.compile'd function, see compiled_decoder.reverse_compiled).

        guidance > 0 with guidance_temperature None: classifier-free guidance against the null class; with a
        temperature: TARFlow's attention-temperature guidance (the guiding pass keeps the class, attention flattened).
        """
        y, y_uncond = self._guidance_labels(z, y, guidance, guidance_temperature)
        tokens = self._tokens(z)
        for block in reversed(self.blocks):
            tokens = block.reverse(
                tokens, y, y_uncond, guidance, guidance_temperature or 1.0, annealed, kv_cache, compiled
            )
        return self._image(tokens)

    @torch.no_grad()
    def reverse_jacobi(
        self,
        z: Tensor,
        y: Tensor | None = None,
        guidance: float = 0.0,
        guidance_temperature: float | None = None,
        annealed: bool = False,
        tol: float = 1e-3,
        group: int = 16,
    ) -> JacobiResult:
        """x = F^-1(z) by Gauss-Seidel-Jacobi iteration over groups of `group` tokens (FlowBlock.reverse_jacobi),
        with the guidance of `reverse`; also returns the parallel passes each block took."""
        if group < 1 or tol < 0:
            raise ValueError(f"Jacobi decoding needs group >= 1 and tol >= 0 (got group={group}, tol={tol})")
        y, y_uncond = self._guidance_labels(z, y, guidance, guidance_temperature)
        tokens, iterations = self._tokens(z), []
        for block in reversed(self.blocks):
            tokens, passes = block.reverse_jacobi(tokens, y, y_uncond, guidance, guidance_temperature or 1.0,
                                                  annealed, tol, group)
            iterations.append(passes)
        return JacobiResult(self._image(tokens), iterations)

    def _guidance_labels(self, z: Tensor, y: Tensor | None, guidance: float,
                         guidance_temperature: float | None) -> tuple[Tensor | None, Tensor | None]:
        """The labels of the conditional rows and (guidance > 0) of the guiding rows: the null class for CFG, the
        same class for attention-temperature guidance."""
        b = z.shape[0]
        y = self._labels(y, b, z.device)
        y_uncond = None
        if guidance > 0:
            if guidance_temperature is None and not self.config.num_classes:
                raise ValueError("classifier-free guidance needs a class-conditional flow (num_classes > 0)")
            y_uncond = y if guidance_temperature is not None else self._labels(None, b, z.device)
        return y, y_uncond

    def denoise(self, x: Tensor, y: Tensor | None = None, sigma: float = 0.05, batch_size: int = 256) -> Tensor:
        """One Tweedie step x + sigma^2 grad_x log p(x) (TARFlow sec. 2.5), by autograd through F in micro-batches
        of `batch_size`; only the input gets a gradient, F's parameters are untouched."""
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].detach().requires_grad_(True)
            yb = None if y is None else y[i : i + batch_size]
            with torch.enable_grad():
                (score,) = torch.autograd.grad(self.log_prob(xb, yb).sum(), xb)
            out.append((xb + sigma**2 * score).detach())
        return torch.cat(out)

    def num_serial_steps(self) -> int:
        """Network evaluations of the exact inverse: one per decoded token per block (TARFlow: 256 x 8 at paper scale)."""
        return self.config.num_blocks * (self.config.num_tokens - 1)

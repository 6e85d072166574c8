"""The forward flow F: an improved TARFlow (Zhai et al., ICML 2025) with BiFlow's norm control.

x (B, C, H, W) is cut into N patches of D = C*p*p values. Each of the `num_blocks` flow steps is a causal Transformer
over the (alternately reversed) patch sequence that predicts, from the tokens before i, the parameters of an affine
update of token i (TARFlow eq. 4):

    z_i = (x_i - mu_i(x_<i)) * exp(-alpha_i(x_<i)),     log|det dz/dx| = -sum_i sum_j alpha_ij     (eq. 5)

Token 0 passes unchanged. The inverse is exact and serial: token i needs x_<i, so decoding runs token by token,
block by block. Norm control (BiFlow sec. 3.3) bounds alpha and mu to (-c, c).

The fast decoders share one step: `FlowBlock._encode` embeds the decoded tokens and runs each layer's
`CausalBlock.decode` against that layer's preallocated KV cache, `FlowBlock._update` reads out alpha, mu, applies
guidance and the affine update. The serial decoder (`FlowBlock._reverse_cached`) takes it eagerly, one token at a time
through buffers and views made once; the compiled one (`compiled=True`) under torch.compile, one graph for every
position (compiled_decoder.py); Jacobi a group of tokens at a time. `_reverse_reference` re-runs the modules on the
whole prefix at every step: the tests' plain reference.

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

from . import layers
from .compiled_decoder import compiled_step
from .coupling import CouplingBlock
from .layers import CausalBlock, ImageTokens, affine_params, guidance_weights, patchify, unpatchify

COUPLINGS = ("autoregressive", "channel")


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
    # "autoregressive" (TARFlow) or "channel": affine coupling of each token's channel halves, TARFlow's ablation
    coupling: str = "autoregressive"

    def __post_init__(self) -> None:
        if self.coupling not in COUPLINGS:
            raise ValueError(f"flow.coupling={self.coupling!r} is not one of {', '.join(COUPLINGS)}")

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
        return affine_params(self.proj_out(self.norm_out(h)), self.cfg.clip, self.cfg.nvp)

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

        kv_cache=True is the fast decoder (`_reverse_cached`; with `compiled`, each token's step under
        torch.compile); kv_cache=False is the plain reference that re-runs the whole prefix through the modules at
        every step (the tests check that all agree)."""
        z = self._order(z)
        if kv_cache:
            return self._order(self._reverse_cached(z, y, y_uncond, guidance, temperature, annealed, compiled))
        return self._order(self._reverse_reference(z, y, y_uncond, guidance, temperature, annealed))

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
                h = layer(h, temp)
            alpha, mu = self._params(h[:, -1])
            if guided:
                w = weights[i]
                alpha = (1 + w) * alpha[:b] - w * alpha[b:]
                mu = (1 + w) * mu[:b] - w * mu[b:]
            x[:, i + 1] = z[:, i + 1] * torch.exp(alpha) + mu
        return x

    # the decoding step, shared by the serial, compiled and Jacobi decoders: `_encode` runs decoded tokens through
    # the layers (writing their keys and values into the caches), `_update` turns the result into the next tokens

    def _encode(self, dec: _Decoding, x: Tensor, table: Tensor, start: int | Tensor) -> Tensor:
        """The causal Transformer on t decoded tokens at positions [start, start + t): x (B * t, D) and their rows of
        dec.table, (2, B * t, width) with guidance, else (B * t, width) -> h (rows * t, width)."""
        if dec.guided:  # one input projection, shared by the conditional and the guiding rows
            h = (table + torch.mm(x, dec.w_in)).view(-1, dec.width)
        else:
            h = torch.addmm(table, x, dec.w_in)
        for layer, cache in dec.layers:
            h = layer.decode(h, cache, start)
        return h

    def _update(self, dec: _Decoding, h: Tensor, z_next: Tensor, w: float | Tensor,
                out: Tensor | None = None) -> Tensor:
        """The tokens that h (rows * t, width) predicts, x = mu + z exp(alpha) (B * t, D) from their noise z_next;
        with guidance the extrapolation (1 + w) p_c - w p_u = lerp(p_u, p_c, 1 + w) of alpha and mu at once (w: a
        float, or one per row of the conditional half). The serial decoder writes into dec's buffers and `out`."""
        p = torch.addmm(dec.b_out, F.layer_norm(h, (dec.width,), *dec.norm), dec.w_out, out=dec.p)
        if self.cfg.clip is not None:  # c * tanh(p / c), the 1/c folded into the read-out
            p.tanh_().mul_(self.cfg.clip)
        if dec.guided:
            p_cond, p_unc = dec.halves or p.chunk(2)
            p = torch.lerp(p_unc, p_cond, 1.0 + w, out=dec.p_guided)
        alpha, mu = dec.alpha_mu or p.chunk(2, dim=-1)
        if self.cfg.nvp:
            return torch.addcmul(mu, z_next, alpha.exp(), out=out)
        return torch.add(mu, z_next, out=out)

    def _reverse_cached(self, z: Tensor, y: Tensor | None, y_uncond: Tensor | None, guidance: float,
                        temperature: float, annealed: bool, compiled: bool) -> Tensor:
        """Fast exact inverse on the ordered sequence: one token per step, its keys and values kept in the layers'
        preallocated caches. Eagerly, the step writes into buffers and per-position views taken once; `compiled`,
        it is one torch.compile'd function (`_token_step`) of the same shapes at every position (the cache masked
        past the new token), so one graph serves every position, block and call at a batch size."""
        b, n, _ = z.shape
        x = z.clone()
        if n == 1:
            return x
        dec = _Decoding(self, z, y, y_uncond, guidance, temperature, "compiled" if compiled else "serial")
        weights = guidance_weights(guidance, n, annealed)
        if compiled:
            step, weights_t = compiled_step(FlowBlock._token_step, layers.COMPILE_BACKEND), z.new_tensor(weights)
            for i, pos in enumerate(torch.arange(n - 1, device=z.device).unbind()):
                x[:, i + 1] = step(self, dec, x, z, pos, weights_t)
            return x
        xs, zs, tables = x.unbind(1), z.unbind(1), dec.table.unbind(-2)  # per-position views, taken once
        for i in range(n - 1):
            self._update(dec, self._encode(dec, xs[i], tables[i], i), zs[i + 1], weights[i], out=xs[i + 1])
        return x

    def _token_step(self, dec: _Decoding, x: Tensor, z: Tensor, pos: Tensor, weights: Tensor) -> Tensor:
        """The compiled decoder's step: token pos + 1 of the ordered sequence from token `pos` (a 0-d tensor)."""
        index = pos.view(1)
        h = self._encode(dec, x.index_select(1, index)[:, 0], dec.table.index_select(-2, index).squeeze(-2), pos)
        return self._update(dec, h, z.index_select(1, index + 1)[:, 0], weights[pos])

    @torch.no_grad()
    def reverse_jacobi(self, z: Tensor, y: Tensor | None, y_uncond: Tensor | None = None, guidance: float = 0.0,
                       temperature: float = 1.0, annealed: bool = False, tol: float = 1e-3,
                       group: int = 16) -> tuple[Tensor, int]:
        """Inverse of `forward` by (Gauss-Seidel-)Jacobi iteration; returns it and the number of parallel passes.

        Tokens 1..N-1 are cut into groups of `group`, decoded one group after the other. Within a group every pass
        runs the causal Transformer over the group's inputs (the tokens before it come from the KV caches) and
        updates all of its tokens at once, x_i <- mu_i(x_<i) + z_i exp(alpha_i(x_<i)), starting from x = z; the
        group stops when no value changed by more than `tol` in the last pass, and after at most as many passes
        as it has tokens, where it equals the serial inverse (tol = 0: up to float rounding). The next group's
        first pass re-encodes the tokens that moved in the last pass, so every group sees the final values of
        the tokens before it.
        The convergence test is over the whole batch. Guidance as in `reverse`: the 2B rows are one batch and
        alpha, mu are extrapolated per token."""
        z = self._order(z)
        b, n, d = z.shape
        x = z.clone()
        dec = _Decoding(self, z, y, y_uncond, guidance, temperature, "jacobi")
        weights = z.new_tensor(guidance_weights(guidance, n, annealed))  # of each decoded token 1..N-1
        passes, valid = 0, 0  # the caches' keys and values at positions < valid are those of the final tokens
        for start in range(1, n, group):
            end = min(start + group, n)
            m = end - start
            z_next, w = z[:, start:end].reshape(b * m, d), weights[start - 1 : end - 1].repeat(b)[:, None]
            for _ in range(m):
                # position j predicts token j + 1; the pass re-encodes from the first stale cache position (the
                # previous group's tokens moved in its last pass) and rewrites the group's own keys and values
                lo = min(valid, start - 1)
                t = end - 1 - lo
                h = self._encode(dec, x[:, lo : end - 1].reshape(b * t, d),
                                 dec.table[..., lo : end - 1, :].flatten(-3, -2), lo)
                h = h.view(-1, t, dec.width)[:, t - m :].reshape(-1, dec.width)  # the positions of the group's tokens
                new = self._update(dec, h, z_next, w).view(b, m, d)
                change = (new - x[:, start:end]).abs().max()
                x[:, start:end] = new
                passes += 1
                valid = end - 1 if change == 0 else start  # the inputs of this pass, up to the moved tokens
                if change <= tol:
                    break
        return self._order(x), passes


class _Decoding:
    """What a FlowBlock's decoding step carries from token to token, made once per decode from the block's
    modules: the input embedding before the input projection (proj_in's bias + positions (+ class)) as one table
    (B, N, width), or with guidance (2, B, N, width): the conditional rows, then the guiding ones (rows = 2B);
    proj_in's transposed weight; the read-out's, with the clip's 1/c folded in; each layer with its DecodeCache
    (`decoder`: "serial", "compiled" or "jacobi"); and for the serial decoder the read-out's buffers, written in
    place: (alpha, mu) of every row, then of each sample, and their views."""

    def __init__(self, block: FlowBlock, z: Tensor, y: Tensor | None, y_uncond: Tensor | None, guidance: float,
                 temperature: float, decoder: str):
        cfg = block.cfg
        b, n, d = z.shape
        self.guided = guided = guidance > 0
        rows = 2 * b if guided else b
        self.width = cfg.channels
        pos = block.pos.flip(0) if block.flip else block.pos
        table = (pos + block.proj_in.bias).to(z.dtype)
        if block.class_embed is not None:
            ys = torch.cat([y, y_uncond]) if guided else y  # type: ignore[list-item]
            table = table[None] + block.class_embed(ys)[:, None].to(z.dtype)
        else:
            table = table[None].expand(rows, -1, -1)
        self.table = table.view(2, b, n, self.width) if guided else table
        self.w_in = block.proj_in.weight.t()
        w_out, b_out = block.proj_out.weight, block.proj_out.bias
        if cfg.clip is not None:
            w_out, b_out = w_out / cfg.clip, b_out / cfg.clip
        self.w_out, self.b_out = w_out.t(), b_out
        self.norm = (block.norm_out.weight, block.norm_out.bias, block.norm_out.eps)
        row_scale = None
        if guided and temperature != 1.0:  # the guiding rows' queries / temperature
            row_scale = torch.cat([z.new_ones(b, 1, 1, 1), z.new_full((b, 1, 1, 1), 1.0 / temperature)])
        bmm = rows * cfg.num_heads > _SDPA_MAX_PAIRS
        masked = decoder == "compiled"
        self.layers = [(layer, layer.decode_cache(rows, n, z, row_scale, bmm, masked)) for layer in block.layers]
        self.p = self.p_guided = self.halves = self.alpha_mu = None
        if decoder == "serial":
            self.p = z.new_empty(rows, 2 * d)
            self.p_guided = z.new_empty(b, 2 * d) if guided else self.p
            self.halves, self.alpha_mu = (self.p[:b], self.p[b:]), (self.p_guided[:, :d], self.p_guided[:, d:])


# exact decoding's attention of one query: SDPA up to this many (row, head) pairs, batched matmuls above
_SDPA_MAX_PAIRS = 16


class TARFlow(nn.Module):
    def __init__(self, cfg: TARFlowConfig):
        super().__init__()
        self.config = cfg
        block = CouplingBlock if cfg.coupling == "channel" else FlowBlock
        self.blocks = nn.ModuleList(block(cfg, flip=bool(t % 2)) for t in range(cfg.num_blocks))

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
        torch.compile'd function, see FlowBlock._reverse_cached).

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
        """Network evaluations of the exact inverse: one per decoded token per block (TARFlow: 256 x 8 at paper scale);
        one per block for channel coupling."""
        per_block = 1 if self.config.coupling == "channel" else self.config.num_tokens - 1
        return self.config.num_blocks * per_block

"""The forward flow F: exact log-determinant, exact inverse, KV cache, causality, norm control, denoising."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import randomize, small_flow

from biflow_bench.models import TARFlow, TARFlowConfig


def _jacobian_logdet(flow: TARFlow, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(x.shape[0]):
        f = lambda v, i=i: flow(v.view(1, *x.shape[1:]), y[i : i + 1]).z.flatten()  # noqa: E731
        jac = torch.autograd.functional.jacobian(f, x[i].flatten())
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("nvp", [True, False])
def test_logdet_equals_autograd_jacobian(clip, nvp):
    flow = small_flow(clip=clip, nvp=nvp)
    x, y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    logdet = flow(x, y).logdet
    assert torch.allclose(logdet, _jacobian_logdet(flow, x, y), atol=1e-10)
    if nvp:
        assert logdet.abs().min() > 1e-3  # non-trivial: the check above is not 0 == 0
    else:
        assert torch.allclose(logdet, torch.zeros_like(logdet))


def test_log_prob_is_change_of_variables():
    flow = small_flow()
    x, y = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([1, 2])
    out = flow(x, y)
    expected = -0.5 * out.z.flatten(1).pow(2).sum(1) - 8 * math.log(2 * math.pi) + out.logdet
    assert torch.allclose(flow.log_prob(x, y), expected)


def test_trajectory_runs_from_x_to_z():
    flow = small_flow()
    x, y = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1])
    out = flow(x, y)
    assert len(out.trajectory) == flow.config.num_blocks + 1
    assert out.trajectory[0] is x and torch.equal(out.trajectory[-1], out.z)
    assert all(t.shape == x.shape for t in out.trajectory)


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_reverse_round_trips(clip, kv_cache):
    flow = small_flow(clip=clip)
    x, y = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3])  # 3: the null class
    assert (flow.reverse(flow(x, y).z, y, kv_cache=kv_cache) - x).abs().max() < 1e-10
    flow32 = small_flow(torch.float32, clip=clip, image_size=8, channels=32)
    x32 = torch.randn(4, 1, 8, 8)
    assert (flow32.reverse(flow32(x32, y).z, y, kv_cache=kv_cache) - x32).abs().max() < 1e-4


@pytest.mark.parametrize("guidance,temperature,annealed", [(0.0, None, False), (1.5, None, False),
                                                           (1.5, None, True), (1.0, 0.5, False)])
def test_cached_inverse_equals_uncached(guidance, temperature, annealed):
    flow = small_flow(clip=1.0)
    z, y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    kw = dict(guidance=guidance, guidance_temperature=temperature, annealed=annealed)
    cached, uncached = flow.reverse(z, y, kv_cache=True, **kw), flow.reverse(z, y, kv_cache=False, **kw)
    assert torch.allclose(cached, uncached, atol=1e-12)
    if guidance:  # guidance changes the sample, so the comparison above is not vacuous
        assert not torch.allclose(cached, flow.reverse(z, y), atol=1e-6)


def test_output_token_depends_only_on_earlier_inputs():
    flow = small_flow(num_blocks=1)  # within one block (no flip): z_i depends on x_<=i only
    c = flow.config
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    tokens = flow(x, torch.tensor([0])).z  # (1, 1, 4, 4); patch tokens of 4 values, 4 tokens
    from biflow_bench.models.layers import patchify

    zt = patchify(tokens, c.patch_size)[0]
    for i in range(c.num_tokens):
        (grad,) = torch.autograd.grad(zt[i].sum(), x, retain_graph=True)
        g = patchify(grad, c.patch_size)[0].abs().sum(-1)
        assert torch.all(g[i + 1 :] == 0), f"token {i} depends on later tokens"
        if i > 0:
            assert g[:i].sum() > 0  # and it does depend on earlier ones


def test_clip_bounds_alpha_and_mu():
    flow = small_flow(clip=0.2)
    randomize(flow, scale=30.0)  # huge weights: unclipped parameters would be far beyond 0.2
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    out = flow(x, torch.zeros(8, dtype=torch.long))
    per_token_bound = 0.2 * flow.config.token_dim * (flow.config.num_tokens - 1) * flow.config.num_blocks
    assert out.logdet.abs().max() <= per_token_bound + 1e-9
    for before, after in zip(out.trajectory[:-1], out.trajectory[1:], strict=True):  # |z| <= (|x| + c) e^c
        assert (after.abs() <= (before.abs() + 0.2) * math.exp(0.2) + 1e-9).all()


def test_denoise_equals_tweedie_step():
    flow = small_flow()
    x, y = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    xg = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(flow.log_prob(xg, y).sum(), xg)
    params_before = [p.clone() for p in flow.parameters()]
    out = flow.denoise(x, y, sigma=0.3, batch_size=2)  # micro-batches of 2
    assert torch.allclose(out, x + 0.09 * score, atol=1e-12)
    assert all(p.grad is None for p in flow.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params_before, flow.parameters(), strict=True))


def test_unconditional_flow_and_serial_step_count():
    flow = small_flow(num_classes=0)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert (flow.reverse(flow(x).z) - x).abs().max() < 1e-10
    assert flow.num_serial_steps() == 3 * 3
    with pytest.raises(ValueError, match="class-conditional"):
        flow.reverse(x, guidance=1.0)


def test_public_api_example():
    cfg = TARFlowConfig(in_channels=1, image_size=8, patch_size=2, channels=64, num_blocks=4, layers_per_block=1,
                        num_classes=10, clip=None)
    flow = TARFlow(cfg)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    out = flow(x, y)
    assert out.z.shape == x.shape and out.logdet.shape == (2,) and len(out.trajectory) == 5
    assert flow.log_prob(x, y).shape == (2,)
    assert flow.reverse(out.z, y, guidance=0.0, kv_cache=True).shape == x.shape
    assert flow.denoise(x, y, 0.1).shape == x.shape


# ----------------------------------------------------------------------------------------------------------------------
# parallel decoding of the exact inverse (Jacobi / Gauss-Seidel-Jacobi) against the serial inverse


def _jacobi_reference(block, z: torch.Tensor, y: torch.Tensor | None, group: int, passes: int,
                      guidance: float = 0.0) -> torch.Tensor:
    """Plain GS-Jacobi on one flow block: for each group of tokens in turn, `passes` times, run the whole causal
    block over the current sequence (no cache) and set the group's tokens to mu(x_<i) + z_i exp(alpha(x_<i));
    CFG as (1 + w) p(. | y) - w p(. | null)."""
    zo = block._order(z)
    x = zo.clone()
    n = x.shape[1]

    def params(seq, labels):
        h = block._embed(seq, 0, labels)
        for layer in block.layers:
            h = layer(h)
        return block._params(h)  # position j: the parameters of token j + 1

    for start in range(1, n, group):
        end = min(start + group, n)
        for _ in range(passes):
            alpha, mu = params(x, y)
            if guidance:
                alpha_u, mu_u = params(x, torch.full_like(y, block.cfg.num_classes))
                alpha, mu = (1 + guidance) * alpha - guidance * alpha_u, (1 + guidance) * mu - guidance * mu_u
            x[:, start:end] = zo[:, start:end] * torch.exp(alpha[:, start - 1 : end - 1]) + mu[:, start - 1 : end - 1]
    return block._order(x)


@pytest.mark.parametrize("group", [1, 2, 5])
@pytest.mark.parametrize("guidance", [0.0, 1.5])
@pytest.mark.parametrize("flip", [0, 1])
def test_jacobi_passes_equal_plain_reference(group, guidance, flip):
    """One pass per group (tol = inf) and two passes per group against the plain uncached GS-Jacobi."""
    flow = small_flow(image_size=8, clip=1.0)  # 16 tokens
    block = flow.blocks[flip]
    from biflow_bench.models.layers import patchify

    z = patchify(torch.randn(3, 1, 8, 8, dtype=torch.float64), 2)
    y = torch.tensor([0, 1, 2])
    y_unc = torch.full_like(y, flow.null_class)
    one, passes = block.reverse_jacobi(z, y, y_unc, guidance, tol=math.inf, group=group)
    assert passes == len(range(1, 16, group))  # one pass per group
    assert torch.allclose(one, _jacobi_reference(block, z, y, group, 1, guidance), atol=1e-12)
    if group > 1:  # one pass per group is not yet the inverse: the comparison below is not vacuous
        assert not torch.allclose(one, block.reverse(z, y, y_unc, guidance), atol=1e-6)


@pytest.mark.parametrize("group", [1, 2, 3, 7, 15, 100])
@pytest.mark.parametrize("guidance,temperature,annealed", [(0.0, None, False), (1.5, None, False),
                                                           (1.5, None, True), (1.0, 0.5, False)])
def test_jacobi_at_convergence_equals_serial_inverse(group, guidance, temperature, annealed):
    flow = small_flow(image_size=8, clip=1.0)  # 16 tokens per block
    z, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    kw = dict(guidance=guidance, guidance_temperature=temperature, annealed=annealed)
    result = flow.reverse_jacobi(z, y, tol=0.0, group=group, **kw)
    assert torch.allclose(result.x, flow.reverse(z, y, **kw), atol=1e-10)
    # tol = 0: each group runs at most its bound, one pass per token (fewer where the values stop moving)
    bound = flow.config.num_tokens - 1
    assert len(result.iterations) == flow.config.num_blocks and all(1 <= k <= bound for k in result.iterations)
    if group == 1:
        assert result.iterations == [bound] * flow.config.num_blocks


def test_jacobi_at_a_tolerance_takes_fewer_passes():
    flow = small_flow(torch.float32, image_size=8, clip=1.0)
    z, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    serial = flow.reverse(z, y, guidance=1.0)
    result = flow.reverse_jacobi(z, y, guidance=1.0, tol=1e-4, group=100)
    assert sum(result.iterations) < flow.num_serial_steps()
    assert (result.x - serial).abs().max() < 1e-3
    x = torch.randn(4, 1, 8, 8)  # and it inverts forward
    assert (flow.reverse_jacobi(flow(x, y).z, y, tol=1e-6).x - x).abs().max() < 1e-4
    with pytest.raises(ValueError, match="group"):
        flow.reverse_jacobi(z, y, group=0)

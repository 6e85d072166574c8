"""What TARFlow's ablations add to the flow: channel coupling (inverse, log-determinant, coupling structure, against a
plainly written step), attention-temperature guidance's mix, the VP flow's zero log-determinant, and the noise
table's sigma section."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import small_flow

from biflow_bench.report.tarflow import noise_points, noise_summary


def _jacobian(flow, x, y):
    f = lambda v: flow(v.view(1, *x.shape[1:]), y).z.flatten()  # noqa: E731
    return torch.autograd.functional.jacobian(f, x.flatten())


@pytest.mark.parametrize("nvp", [True, False])
def test_channel_coupling_inverts_exactly_and_its_logdet_is_the_jacobians(nvp):
    flow = small_flow(coupling="channel", nvp=nvp)
    x, y = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 2])
    out = flow(x, y)
    torch.testing.assert_close(flow.reverse(out.z, y), x, rtol=0, atol=1e-12)
    for i in range(2):
        logdet = torch.linalg.slogdet(_jacobian(flow, x[i : i + 1], y[i : i + 1])).logabsdet
        torch.testing.assert_close(out.logdet[i], logdet, rtol=0, atol=1e-10)
    if nvp:
        assert out.logdet.abs().min() > 1e-3  # not 0 == 0
    else:  # volume preserving: every step a shift
        assert torch.equal(out.logdet, torch.zeros_like(out.logdet))
    assert flow.num_serial_steps() == flow.config.num_blocks  # one pass per block


def test_a_coupling_step_is_the_plain_affine_coupling():
    """One block by hand: the kept half passes, the other half is (x_b - mu) exp(-alpha) with (alpha, mu) read from
    the kept half of every token (the moved half zeroed at the input), the halves swapping when flipped."""
    flow = small_flow(coupling="channel", num_blocks=2)
    x, y = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([1, 2])
    tokens = flow._tokens(x)  # (B, 4, 4): four values per token, halves of two
    for block in flow.blocks:
        kept, moved = (tokens[..., 2:], tokens[..., :2]) if block.flip else (tokens[..., :2], tokens[..., 2:])
        inp = torch.cat([torch.zeros_like(moved), kept], -1) if block.flip else torch.cat([kept, torch.zeros_like(moved)], -1)
        h = block.proj_in(inp) + block.pos + block.class_embed(y)[:, None]
        for layer in block.layers:
            h = layer(h)
        alpha, mu = block.proj_out(block.norm_out(h)).chunk(2, -1)
        new = (moved - mu) * torch.exp(-alpha)
        expected = torch.cat([new, kept], -1) if block.flip else torch.cat([kept, new], -1)
        got, logdet = block(tokens, y)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(logdet, -alpha.flatten(1).sum(1), rtol=0, atol=1e-12)
        tokens = got


def test_attention_temperature_guidance_mixes_the_two_passes_by_hand():
    """TARFlow sec. 2.6 without classes: mu~ = (1 + w) mu(.; 1) - w mu(.; tau), alpha likewise, token by token."""
    flow = small_flow(num_blocks=1, num_classes=0)
    block = flow.blocks[0]
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    w, tau = 1.5, 0.5
    zt = flow._tokens(z)
    x = zt.clone()
    for i in range(zt.shape[1] - 1):
        params = []
        for temperature in (1.0, tau):
            h = block._embed(x[:, : i + 1], 0, None)
            for layer in block.layers:
                h = layer(h, temperature)
            params.append(block._params(h[:, -1]))
        (a1, m1), (at, mt) = params
        alpha, mu = (1 + w) * a1 - w * at, (1 + w) * m1 - w * mt
        x[:, i + 1] = zt[:, i + 1] * torch.exp(alpha) + mu
    got = flow.reverse(z, None, guidance=w, guidance_temperature=tau)
    torch.testing.assert_close(got, flow._image(x), rtol=0, atol=1e-10)
    assert (got - flow.reverse(z, None)).abs().max() > 1e-6  # guidance moved them, far beyond the tolerance


def test_noise_points_read_sigma_kind_and_denoising_from_the_records():
    records = [{"variant": v, "config": {"stage1": {"noise_sigma": s, "noise": k}, "backward": {"denoise": d}}}
               for v, s, k, d in (("u", 0.0023, "uniform", "score"), ("a", 0.05, "gaussian", "none"))]
    table = pd.DataFrame([{"variant": "a", "ours": 3.0, "ours_std": 0.5}, {"variant": "u", "ours": 9.0,
                                                                         "ours_std": 1.0}])
    got = noise_points(records, table).set_index("variant")
    assert got.loc["u", ["sigma", "noise", "denoise", "ours"]].tolist() == [0.0023, "uniform", "score", 9.0]
    assert got.loc["a", ["sigma", "noise", "denoise"]].tolist() == [0.05, "gaussian", "none"]


def test_tarflow_tables_seed_f_by_the_run():
    """stage1.seed -1: a table's seed is an F of its own (its key that of F at that seed); alone it is refused."""
    import dataclasses

    from biflow_bench.ablations import get_spec
    from biflow_bench.config import ConfigError
    from biflow_bench.identity import flow_key
    from biflow_bench.training.cache import seeded_flow
    from biflow_bench.training.stages import train_flow

    cfg = get_spec("tarflow-vp").resolve("nvp", "tiny")
    assert cfg.stage1.seed == -1
    for seed in (0, 1):
        explicit = dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, seed=seed))
        assert flow_key(seeded_flow(cfg, seed)) == flow_key(explicit)
    assert flow_key(seeded_flow(cfg, 0)) != flow_key(seeded_flow(cfg, 1))
    with pytest.raises(ConfigError, match="resolved by a table's run"):
        train_flow(cfg, None)


def test_noise_summary_reads_the_gaussian_levels_alone():
    """Best sigma, best metric and worst / best per denoising mode, over the Gaussian levels: the uniform row (the
    worst here) is left out, as TARFlow's claim is about sigma."""
    points = pd.DataFrame({"variant": list("abcde"), "sigma": [0.0023, 0.01, 0.05, 0.01, 0.05],
                           "noise": ["uniform", "gaussian", "gaussian", "gaussian", "gaussian"],
                           "denoise": ["score", "score", "score", "none", "none"],
                           "ours": [50.0, 12.0, 8.0, 9.0, float("nan")], "ours_std": [1.0] * 5})
    got = noise_summary(points)
    assert got["score"] == (0.05, 8.0, 1.5)  # 12 / 8, not 50 / 8
    assert got["none"] == (0.01, 9.0, None)  # one level with a number
    assert noise_summary(points[points["denoise"] == "score"])["none"] is None

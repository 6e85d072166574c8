"""Golden values for stage 2's objective, each against a plainly written reference on tiny tensors: adaptive
re-weighting (eq. 7), the training-time CFG distribution and mix (eq. 5), the stage-2 loss of each strategy (which
states are supervised, target order, normalisation), which branch of eq. 5 gets gradient, G's inference-CFG mixing
per stage (eq. 4), the hidden-distillation stage, the config's defaults, and which term drives G (per-term and
per-LPIPS-stage gradients). The perceptual distances themselves: test_stage2_formulas.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import randomize

from biflow_bench.config import Stage2Config
from biflow_bench.training.losses import adaptive_weight, cfg_mix, sample_guidance, stage2_loss
from biflow_bench.models import build_models
from biflow_bench.models.layers import patchify, unpatchify
from biflow_bench.training.perceptual import EffNetLPIPS

TINY = dict(channels=16, width=16, num_blocks=2, num_groups=2, num_heads=2)


# ----------------------------------------------------------------------------------------------------------------------
# eq. 7 and eq. 5 on hand-made numbers


def test_adaptive_weight_value_and_gradient():
    d = torch.tensor([0.5, 2.0, 0.0], requires_grad=True)
    out = adaptive_weight(d, c=0.01, p=1.0)
    torch.testing.assert_close(out, torch.tensor([0.5 / 0.51, 2.0 / 2.01, 0.0]))
    out.sum().backward()  # the weight is a constant: d out / d D = 1 / (D + c)^p
    torch.testing.assert_close(d.grad, torch.tensor([1 / 0.51, 1 / 2.01, 1 / 0.01]))
    d2 = torch.tensor([3.0], requires_grad=True)
    adaptive_weight(d2, c=1.0, p=0.5).sum().backward()
    torch.testing.assert_close(d2.grad, torch.tensor([1 / 2.0]))
    torch.testing.assert_close(adaptive_weight(torch.tensor([3.0]), c=1.0, p=0.0), torch.tensor([3.0]))


def test_guidance_distribution_inverse_and_uniform():
    dropped = torch.tensor([False, True, False, False])
    u = torch.rand(4, generator=torch.Generator().manual_seed(3))
    w = sample_guidance(dropped, 7.0, "inverse", torch.Generator().manual_seed(3))
    expected = [0.0 if dr else 8.0 ** float(ui) - 1 for dr, ui in zip(dropped, u)]  # omega = 8^u: density ~ 1/omega
    torch.testing.assert_close(w, torch.tensor(expected))
    w = sample_guidance(dropped, 3.0, "uniform", torch.Generator().manual_seed(3))
    torch.testing.assert_close(w, torch.tensor([0.0 if dr else 3.0 * float(ui) for dr, ui in zip(dropped, u)]))


def test_cfg_mix_equals_the_reparameterised_target():
    g, u, t = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    w = torch.tensor([0.0, 1.0, 2.5])
    mix = cfg_mix(g, u, w)
    for i in range(3):
        wi = float(w[i])
        torch.testing.assert_close(mix[i], (g[i] + wi * u[i]) / (1 + wi))
        # eq. 5 as a regression: |mix - t|^2 = |G_w - ((1 + w) t - w u)|^2 / (1 + w)^2
        torch.testing.assert_close((mix[i] - t[i]).pow(2).sum(),
                                   (g[i] - ((1 + wi) * t[i] - wi * u[i])).pow(2).sum() / (1 + wi) ** 2)


def test_stage2_config_defaults_are_the_authors_conventions():
    s2 = Stage2Config()
    assert (s2.adaptive_c, s2.adaptive_p, s2.cfg_distribution, s2.cfg_max) == (0.01, 1.0, "inverse", 7.0)
    assert (s2.lpips_net, s2.convnext_net, s2.perceptual_size, s2.perceptual_crop_min) == \
        ("vgg16", "convnextv2", 224, 0.08)
    assert dataclasses.replace(s2, cfg_uncond_grad=True).cfg_uncond_grad


# ----------------------------------------------------------------------------------------------------------------------
# The stage-2 loss against a plain reference


def _models(**kw):
    flow, g = build_models("tiny", **TINY, **kw)
    return randomize(flow, scale=0.5).eval().requires_grad_(False), randomize(g, scale=0.5, seed=1)


def _rms(t):
    return t / torch.sqrt(t.pow(2).mean() + 1e-6)


def _reference_loss(g, flow, x, y, s2, sigma, seed, uncond_grad=False):
    """Stage 2 written out per sample: the same random draws in the same order (noise, label drop, w), then
    sum over supervised terms of mean_b D_b / (D_b + c)^p with D = squared distance summed over dimensions."""
    gen = torch.Generator().manual_seed(seed)
    noisy = x + sigma * torch.randn(x.shape, generator=gen)
    traj = flow(noisy, y).trajectory  # x~ = x_0, ..., x_B = z
    cfg = g.config
    targets = [traj[k] for k in range(len(traj) - 2, -1, -1)]  # x_{B-1}, ..., x_0
    if cfg.denoise == "learned":
        targets.append(x)
    y_g, w = y, None
    if cfg.cfg_mode != "none":
        drop = torch.rand(y.shape, generator=gen) < s2.label_drop
        y_g = torch.where(drop, torch.full_like(y, g.null_class), y)
        if cfg.cfg_mode == "training-time":
            u = torch.rand(y.shape, generator=gen)
            w = torch.where(drop, 0.0, (1 + s2.cfg_max) ** u - 1)
    out = g(traj[-1], y_g, w)
    preds = ([] if cfg.strategy == "naive" else out.states) + [out.x]
    if w is not None:
        unc = g(traj[-1], None, torch.zeros_like(w))
        uncs = ([] if cfg.strategy == "naive" else unc.states) + [unc.x]
        preds = [(p + w.view(-1, 1, 1, 1) * (uu if uncond_grad else uu.detach())) / (1 + w.view(-1, 1, 1, 1))
                 for p, uu in zip(preds, uncs)]
    supervised = targets[len(targets) - len(preds):]
    total = 0.0
    for k, (p, t) in enumerate(zip(preds, supervised)):
        per_sample = []
        for i in range(x.shape[0]):
            a, b = p[i], t[i]
            if k < len(preds) - 1 and cfg.normalize_hidden:
                a, b = _rms(a), _rms(b)
            d = ((a - b) ** 2).sum()
            per_sample.append(d / (d.detach() + s2.adaptive_c) ** s2.adaptive_p)
        weight = s2.hidden_weight if k < len(preds) - 1 else 1.0
        total = total + weight * torch.stack(per_sample).mean()
    return total, len(preds)


@pytest.mark.parametrize("strategy,denoise,normalize", [
    ("naive", "learned", True), ("naive", "none", True), ("hidden-align", "learned", True),
    ("hidden-align", "score", False), ("hidden-distill", "learned", True), ("hidden-distill", "none", False),
])
def test_stage2_loss_matches_the_reference(strategy, denoise, normalize):
    flow, g = _models(strategy=strategy, denoise=denoise, cfg_mode="none", normalize_hidden=normalize)
    x, y = torch.randn(3, 1, 8, 8) * 0.5, torch.tensor([0, 4, 9])
    s2 = Stage2Config(adaptive_c=0.05, adaptive_p=1.0, hidden_weight=0.7)
    loss, shown = stage2_loss(g, flow, x, y, s2, sigma=0.1, perceptual={}, generator=torch.Generator().manual_seed(5))
    ref, n_terms = _reference_loss(g, flow, x, y, s2, 0.1, seed=5)
    torch.testing.assert_close(loss, ref)
    assert n_terms == (1 if strategy == "naive" else g.config.num_stages)
    assert set(shown) == ({"mse"} if strategy == "naive" else {"mse", "hidden"})


@pytest.mark.parametrize("uncond_grad", [False, True])
def test_training_time_cfg_objective_value_and_gradient_branch(uncond_grad):
    flow, g = _models(cfg_mode="training-time")
    x, y = torch.randn(4, 1, 8, 8) * 0.5, torch.tensor([0, 1, 2, 3])
    s2 = Stage2Config(label_drop=0.3, cfg_max=3.0, cfg_uncond_grad=uncond_grad, adaptive_p=1.0)
    loss, _ = stage2_loss(g, flow, x, y, s2, sigma=0.1, perceptual={}, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(loss, list(g.parameters()), allow_unused=True)
    refs = {}
    for flag in (False, True):
        ref, _ = _reference_loss(g, flow, x, y, s2, 0.1, seed=2, uncond_grad=flag)
        refs[flag] = torch.autograd.grad(ref, list(g.parameters()), allow_unused=True)
        torch.testing.assert_close(loss, ref)  # the value does not depend on where the gradient flows
    # the unconditional branch gets gradient exactly when asked: the two references' gradients differ
    differ = any(a is not None and not torch.allclose(a, b, atol=1e-7) for a, b in zip(refs[False], refs[True]))
    assert differ
    for a, b in zip(grads, refs[uncond_grad]):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b)


def test_perceptual_terms_compare_the_prediction_with_the_real_image():
    """With training-time CFG the perceptual distance sees G's guided output and the clean image, not the eq. 5 mix
    nor an extrapolated target."""
    flow, g = _models(cfg_mode="training-time")
    x, y = torch.randn(2, 1, 8, 8) * 0.5, torch.tensor([1, 2])
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, image, real, generator=None):
            seen.append((image.detach().clone(), real.clone()))
            return (image - real).flatten(1).pow(2).sum(1)

    s2 = Stage2Config(label_drop=0.0, cfg_max=3.0)
    stage2_loss(g, flow, x, y, s2, sigma=0.1, perceptual={"lpips": Probe()}, generator=torch.Generator().manual_seed(0))
    # at latent scales both sides are decoded first (a stand-in decoder: any differentiable map)
    stage2_loss(g, flow, x, y, s2, sigma=0.1, perceptual={"lpips": Probe()}, generator=torch.Generator().manual_seed(0),
                decode=lambda t: 2 * t + 1)
    gen = torch.Generator().manual_seed(0)
    noisy = x + 0.1 * torch.randn(x.shape, generator=gen)
    torch.rand(y.shape, generator=gen)  # label drop
    w = (1 + 3.0) ** torch.rand(y.shape, generator=gen) - 1
    with torch.no_grad():
        guided = g(flow(noisy, y).z, y, w).x
    torch.testing.assert_close(seen[0][0], guided)
    torch.testing.assert_close(seen[0][1], x)
    torch.testing.assert_close(seen[1][0], 2 * guided + 1)
    torch.testing.assert_close(seen[1][1], 2 * x + 1)


# ----------------------------------------------------------------------------------------------------------------------
# G's forward pass: inference-CFG mixing per stage (eq. 4), the hidden-distillation stage


def test_inference_cfg_mixes_after_every_stage():
    _, g = _models(cfg_mode="inference")
    g.eval()
    z, y, w = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), 1.5
    with torch.no_grad():
        tokens = patchify(z, 2)
        h = g.embed(tokens) + g.pos
        cond_c = g._cond(y, None, 2)
        cond_u = g._cond(torch.full((2,), g.null_class), None, 2)
        for stage in g.stages:  # h_{k+1} = (1 + w) G_k(h_k | c) - w G_k(h_k | null)
            h = (1 + w) * stage(h, cond_c) - w * stage(h, cond_u)
        expected = unpatchify(g.out(h), 2, 1, 8, 8)
    torch.testing.assert_close(g.sample(z, y, cfg_scale=w), expected)


@pytest.mark.parametrize("residual", [False, True])
def test_hidden_distill_stage_reembeds_input_space(residual):
    _, g = _models(strategy="hidden-distill", cfg_mode="none", distill_residual=residual)
    g.eval()
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        h, cond = patchify(z, 2), g._cond(None, None, 2)
        states = []
        for stage in g.stages:  # s_{k+1} = readout(blocks(embed(s_k) + pos)) (+ s_k with the residual option)
            a = stage.embed(h) + stage.pos
            for block in stage.blocks:
                a = block(a, cond)
            h = stage.readout(a) + (h if residual else 0)
            states.append(unpatchify(h, 2, 1, 8, 8))
        out = g(z)
    torch.testing.assert_close(out.x, states[-1])
    for got, want in zip(out.states, states[:-1]):
        torch.testing.assert_close(got, want)


def test_hidden_distill_paper_form_is_not_the_identity_at_initialisation():
    _, g_paper = build_models("tiny", **TINY, strategy="hidden-distill", cfg_mode="none")
    _, g_residual = build_models("tiny", **TINY, strategy="hidden-distill", cfg_mode="none", distill_residual=True)
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(g_residual(z).x, z)  # zero-initialised residual read-outs: the identity
        assert not torch.allclose(g_paper(z).x, z, atol=1e-3)


def test_class_embedding_starts_small():
    flow, g = build_models("tiny")
    assert g.class_embed.weight.std() < 0.02


# ----------------------------------------------------------------------------------------------------------------------
# Which term drives G (training/term_gradients.py)


def test_term_shares_by_hand():
    from biflow_bench.training.term_gradients import term_shares

    rows = term_shares({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0, 4.0])})
    # norms 3 and 4; the whole gradient is (3, 4), norm 5: cosines 3/5 and 4/5
    assert rows["a"] == pytest.approx({"norm": 3.0, "share": 3 / 7, "cosine": 0.6})
    assert rows["b"] == pytest.approx({"norm": 4.0, "share": 4 / 7, "cosine": 0.8})


def test_term_gradients_are_the_named_terms_of_the_loss_and_sum_to_its_gradient():
    from biflow_bench.training.losses import inverse_terms, stage2_targets, total
    from biflow_bench.training.term_gradients import term_gradients

    flow, g = _models(strategy="hidden-align", denoise="learned", cfg_mode="none")
    x, y = torch.randn(3, 1, 8, 8) * 0.5, torch.tensor([0, 4, 9])
    s2 = Stage2Config(adaptive_c=0.05, hidden_weight=0.7)
    z, targets = stage2_targets(flow, x, y, 0.1, "learned", torch.Generator().manual_seed(5))
    terms, _ = inverse_terms(g, z, targets, y, s2, perceptual={}, generator=torch.Generator().manual_seed(6))
    hidden = [f"hidden {i}" for i in range(1, g.config.num_stages)]
    assert list(terms) == [*hidden, "output"]
    loss, _ = stage2_loss(g, flow, x, y, s2, sigma=0.1, perceptual={}, generator=torch.Generator().manual_seed(5))
    ref, _ = _reference_loss(g, flow, x, y, s2, 0.1, seed=5)
    torch.testing.assert_close(loss, ref)
    grads = term_gradients(g, terms)
    whole = torch.autograd.grad(total(terms), list(g.parameters()), allow_unused=True,
                                retain_graph=True)
    whole = torch.cat([(torch.zeros_like(p) if gr is None else gr).flatten() for p, gr in zip(g.parameters(), whole)])
    torch.testing.assert_close(torch.stack(list(grads.values())).sum(0), whole)
    one = torch.autograd.grad(terms["output"], list(g.parameters()), allow_unused=True)
    one = torch.cat([(torch.zeros_like(p) if gr is None else gr).flatten() for p, gr in zip(g.parameters(), one)])
    torch.testing.assert_close(grads["output"], one)
    assert not torch.allclose(grads["output"], grads["hidden 1"])


def test_measured_term_shares_cover_every_term_and_sum_to_one():
    from biflow_bench.data import ImageDataset
    from biflow_bench.training.term_gradients import measure_term_shares

    flow, g = _models(strategy="hidden-align", denoise="learned", cfg_mode="none")
    data = ImageDataset("toy", torch.randn(16, 1, 8, 8).clamp(-1, 1), torch.arange(16) % 10, 10, 256)
    s2 = Stage2Config(batch_size=4)
    shares = measure_term_shares(g, flow, data, s2, sigma=0.1, perceptual={}, batches=2)
    assert list(shares) == [*(f"hidden {i}" for i in range(1, g.config.num_stages)), "output"]
    assert sum(r["share"] for r in shares.values()) == pytest.approx(1.0)
    assert all(r["norm"] > 0 and -1 <= r["cosine"] <= 1 for r in shares.values())


def test_lpips_stage_terms_split_the_term_and_its_gradient():
    # "which layer's features drive G": the per-stage terms sum to the LPIPS term of eq. 7, each is
    # weight * mean_b D_s / (D + c)^p by hand, and their gradients sum to the term's
    from biflow_bench.training.losses import inverse_terms, stage2_targets
    from biflow_bench.training.term_gradients import measure_term_shares, stage_terms, term_gradients

    # in float64: float32 sums of these gradients (norms ~1e10) differ by ~1e-5 with the thread count
    flow, g = (m.double() for m in _models(strategy="hidden-align", denoise="learned", cfg_mode="none"))
    net = EffNetLPIPS(weights="random", size=32, crop_min=0.5)
    randomize(net.net, scale=1.0)
    net.double()
    s2 = Stage2Config(metric="mse+lpips", adaptive_c=0.05, adaptive_p=0.7, lpips_weight=0.6, batch_size=4)
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64) * 0.5, torch.tensor([0, 4, 9])
    z, targets = stage2_targets(flow, x, y, 0.1, "learned", torch.Generator().manual_seed(5))
    terms, _ = inverse_terms(g, z, targets, y, s2, perceptual={"lpips": net}, generator=torch.Generator().manual_seed(6))
    parts = net.last_stages
    assert len(parts) >= 3 and all(p.shape == (3,) for p in parts)
    split = stage_terms(parts, s2, 0.6)
    d = sum(p.detach() for p in parts)
    for i, p in enumerate(parts):
        torch.testing.assert_close(split[f"stage {i + 1}"], 0.6 * (p / (d + 0.05) ** 0.7).mean())
    torch.testing.assert_close(torch.stack(list(split.values())).sum(), terms["lpips"])
    whole = term_gradients(g, {"lpips": terms["lpips"]})["lpips"]
    summed = torch.stack(list(term_gradients(g, split).values())).sum(0)
    # computed in float64, each rounded once to float32 (term_gradients): a few float32 ulps on any thread count
    assert float((summed - whole).norm() / whole.norm()) < 8 * torch.finfo(torch.float32).eps

    from biflow_bench.data import ImageDataset
    images = torch.randn(16, 1, 8, 8, dtype=torch.float64).clamp(-1, 1)
    data = ImageDataset("toy", images, torch.arange(16) % 10, 10, 256)
    shares = measure_term_shares(g, flow, data, s2, sigma=0.1, perceptual={"lpips": net}, batches=1)
    stage_rows = [r for name, r in shares.items() if name.startswith("lpips stage")]
    assert len(stage_rows) == len(parts) and sum(r["share"] for r in stage_rows) == pytest.approx(1.0)
    assert sum(r["share"] for n, r in shares.items() if not n.startswith("lpips stage")) == pytest.approx(1.0)

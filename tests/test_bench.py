"""Speed benchmark record (every field of every row) and the fast exact inverse against the plain reference.

No timing assertions: which sampler is faster is what the benchmark measures, not what a unit test checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from conftest import randomize

import biflow_bench.models.tarflow as tarflow
from biflow_bench.ablations import get_spec
from biflow_bench.speed.benchmark import run_speed_bench
from biflow_bench.speed.flops import count_flops
from biflow_bench.speed.table import format_speed_table
from biflow_bench.config import ConfigError, TrainingConfig, apply_delta, scale_config
from biflow_bench.models import TARFlow, preset_configs
from biflow_bench.results import validation_error
from biflow_bench.sample import Sampler

ROW_KEYS = {
    "sampler": str, "label": str, "nfe": int, "nfe_label": str, "params": int, "flops_per_image": float,
    "batch_size": int, "ms_per_image": float, "images_per_s": float, "speedup": float, "peak_fraction": float,
}
OPTIONAL_FLOAT_KEYS = ("peak_memory_mb", "paper_ms", "paper_speedup")
RECORD_KEYS = ("schema", "kind", "ablation", "variant", "label", "scale", "seed", "spec_version", "config", "rows",
               "machine", "metrics", "timing", "paper", "notes", "env", "wall_time_s", "created")


@pytest.fixture(scope="module")
def tiny_record() -> dict:
    return run_speed_bench("tiny", batch_sizes=(1, 4), repeats=1, warmup=1)


def _check_row(row: dict) -> None:
    for key, typ in ROW_KEYS.items():
        assert key in row, f"row lacks {key}"
        assert isinstance(row[key], typ) and not isinstance(row[key], bool), f"{key}={row[key]!r} is not {typ}"
        if typ is float:
            assert math.isfinite(row[key]), f"{key} is not finite"
    for key in OPTIONAL_FLOAT_KEYS:
        assert key in row and (row[key] is None or isinstance(row[key], float))
    assert row["ms_per_image"] > 0 and row["images_per_s"] > 0 and row["speedup"] > 0
    assert row["flops_per_image"] > 0 and row["params"] > 0 and row["peak_fraction"] > 0


def test_tiny_speed_record_has_every_field(tiny_record):
    rec = tiny_record
    for key in RECORD_KEYS:
        assert key in rec, f"record lacks {key}"
    spec = get_spec("speed")
    assert (rec["schema"], rec["kind"], rec["ablation"], rec["variant"], rec["scale"], rec["seed"]) == \
           (1, "speed", "speed", "bench", "tiny", 0)
    assert rec["spec_version"] == spec.version and rec["paper"]["table"] == spec.paper_table
    assert rec["config"] == {"batch_sizes": [1, 4], "device": "cpu", "repeats": 1, "warmup": 1, "what": "sample",
                             "amp": False}
    machine = rec["machine"]
    assert isinstance(machine["device"], str) and machine["matmul_peak_flops"] > 0
    assert isinstance(machine["threads"], int) and machine["torch"] == torch.__version__
    assert isinstance(rec["notes"], list) and all(isinstance(n, str) for n in rec["notes"])
    assert any("random" in n for n in rec["notes"])  # says the weights are random and why that is fine
    assert rec["wall_time_s"] > 0 and rec["created"].endswith("Z")
    assert validation_error(rec) is None  # the results module accepts it as a speed record


def test_tiny_speed_rows(tiny_record):
    rows = tiny_record["rows"]
    spec = get_spec("speed")
    assert [(r["sampler"], r["batch_size"]) for r in rows] == [(v, b) for v in spec.variants for b in (1, 4)]
    flow_cfg, _ = preset_configs("tiny")
    serial = flow_cfg.num_blocks * (flow_cfg.num_tokens - 1)
    for row in rows:
        _check_row(row)
        variant = spec.variants[row["sampler"]]
        assert row["label"] == (variant.label or variant.name)
        cfg = spec.resolve(row["sampler"], "tiny")
        score = cfg.backward.denoise == "score"
        if cfg.sample.decoder == "jacobi":  # the passes of the timed batch, never more than the serial steps
            assert 1 <= row["nfe"] <= serial
            assert row["nfe_label"].startswith(f"{row['nfe']} Jacobi passes")
        elif cfg.inverse == "exact":
            assert row["nfe"] == serial + score
            assert "serial" in row["nfe_label"]
        elif cfg.inverse == "peer":  # its steps; Heun's two evaluations; flow matching's CFG two branches
            heun = 2 if cfg.sample.solver == "heun" and cfg.peer.kind == "flow-matching" else 1
            branches = 2 if cfg.peer.kind == "flow-matching" and cfg.sample.cfg_scale else 1
            assert row["nfe"] == cfg.sample.steps * heun * branches
        else:
            assert row["nfe"] == 1 and row["nfe_label"] == "1"
        if row["sampler"] == "exact":
            assert row["speedup"] == 1.0
        assert row["paper_ms"] == variant.paper.get("ms_per_image")
        assert row["paper_speedup"] == variant.paper.get("speedup")
        assert row["peak_memory_mb"] is None  # not measured on CPU
    by = {(r["sampler"], r["batch_size"]): r for r in rows}
    for b in (1, 4):  # speed-up is exact's ms over this row's ms at the same batch size
        for name in spec.variants:
            assert by[name, b]["speedup"] == pytest.approx(by["exact", b]["ms_per_image"] / by[name, b]["ms_per_image"])
    # cost accounting: CFG doubles the exact inverse's work, the score step adds F's forward and backward
    assert by["exact-cfg", 1]["flops_per_image"] == pytest.approx(2 * by["exact", 1]["flops_per_image"], rel=0.05)
    assert by["exact-score", 1]["flops_per_image"] > 2 * by["exact", 1]["flops_per_image"]


def test_format_speed_table(tiny_record):
    text = format_speed_table(tiny_record)
    lines = text.splitlines()
    assert "matmul peak" in lines[0]
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + len(tiny_record["rows"])  # header, separator, one line per row
    for name in get_spec("speed").variants:
        assert f"| {name} " in text
    exact = next(r for r in tiny_record["rows"] if r["sampler"] == "exact")
    cells = [c.strip() for c in next(ln for ln in table if ln.startswith("| exact ")).split("|")[1:-1]]
    blocks, tokens = (int(v) for v in str(exact["nfe_label"]).split()[0].split("x"))  # "4x15 serial"
    assert cells[2] == str(exact["nfe"]) == str(blocks * tokens)  # serial steps: one per token and block


def test_training_rows():
    rec = run_speed_bench("tiny", batch_sizes=(2,), repeats=1, warmup=0, what="train")
    assert [r["sampler"] for r in rec["rows"]] == ["train-flow", "train-backward"]
    for row in rec["rows"]:
        _check_row(row)
        assert row["batch_size"] == 2
    assert rec["rows"][0]["speedup"] == 1.0
    assert validation_error(rec) is None
    assert "train-backward" in format_speed_table(rec)


def test_all_times_training_at_its_own_batch_sizes():
    rec = run_speed_bench("tiny", batch_sizes=(1,), train_batch_sizes=(3,), repeats=1, warmup=0, what="all")
    sizes = {r["sampler"]: r["batch_size"] for r in rec["rows"]}
    assert sizes["train-flow"] == sizes["train-backward"] == 3
    assert {b for s, b in sizes.items() if not s.startswith("train-")} == {1}


def test_latent_scale_times_the_vae_decoder_apart(monkeypatch, tmp_path):
    monkeypatch.setenv("BIFLOW_VAE", str(tmp_path / "absent"))  # no VAE here: a random one of the same architecture
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rec = run_speed_bench("tiny-latent", batch_sizes=(2,), repeats=1, warmup=0)
    rows = {r["sampler"]: r for r in rec["rows"]}
    assert set(rows) == {*get_spec("speed").variants, "vae-decoder"}
    decoder = rows.pop("vae-decoder")
    assert set(ROW_KEYS) <= set(decoder)
    assert "random weights" in decoder["label"] and decoder["speedup"] is None
    assert decoder["params"] > 0 and decoder["flops_per_image"] > 0 and decoder["ms_per_image"] > 0
    assert validation_error(rec) is None and "vae-decoder" in format_speed_table(rec)


def test_bad_arguments():
    with pytest.raises(ValueError, match="what"):
        run_speed_bench("tiny", batch_sizes=(1,), what="bogus")
    with pytest.raises(ValueError, match="batch"):
        run_speed_bench("tiny", batch_sizes=(0,))


def test_flop_count_of_a_linear_layer():
    lin = nn.Linear(8, 16)
    x = torch.randn(3, 8)
    assert count_flops(lambda: lin(x)) == 2 * 3 * 8 * 16


# ----------------------------------------------------------------------------------------------------------------------
# the fast exact inverse (kv_cache=True) against the plain reference (kv_cache=False)


def _tiny_flow(dtype=torch.float32, **overrides) -> TARFlow:
    cfg = dataclasses.replace(preset_configs("tiny")[0], **overrides)
    return randomize(TARFlow(cfg), scale=0.5).to(dtype).eval()


@pytest.fixture(params=["sdpa", "bmm"])
def attention_path(request, monkeypatch):
    """Run the fast decoder with either of its attention implementations."""
    monkeypatch.setattr(tarflow, "_SDPA_MAX_PAIRS", 10**9 if request.param == "sdpa" else 0)
    return request.param


@pytest.mark.parametrize("guidance,temperature,annealed", [(0.0, None, False), (1.5, None, False),
                                                           (1.5, None, True), (1.0, 0.6, False), (2.0, 0.6, True)])
def test_fast_inverse_equals_reference_float32(attention_path, guidance, temperature, annealed):
    flow = _tiny_flow()
    z, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 9, 10, 4])  # 10: the null class
    kw = dict(guidance=guidance, guidance_temperature=temperature, annealed=annealed)
    fast, ref = flow.reverse(z, y, kv_cache=True, **kw), flow.reverse(z, y, kv_cache=False, **kw)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4), (fast - ref).abs().max()
    if guidance:  # guidance changes the sample: the comparison is not vacuous
        assert not torch.allclose(fast, flow.reverse(z, y), atol=1e-3)


@pytest.mark.parametrize("overrides", [dict(num_classes=0), dict(clip=None), dict(nvp=False),
                                       dict(layers_per_block=2, num_heads=2)])
def test_fast_inverse_equals_reference_variants(attention_path, overrides):
    flow = _tiny_flow(torch.float64, **overrides)
    z = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 2, 3]) if flow.config.num_classes else None
    assert torch.allclose(flow.reverse(z, y), flow.reverse(z, y, kv_cache=False), atol=1e-10)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)  # and it is the inverse of forward
    assert (flow.reverse(flow(x, y).z, y) - x).abs().max() < 1e-9
    kw = dict(guidance=1.5, guidance_temperature=0.5, annealed=True)  # temperature guidance needs no class
    assert torch.allclose(flow.reverse(z, y, **kw), flow.reverse(z, y, kv_cache=False, **kw), atol=1e-10)


@pytest.mark.parametrize("overrides", [dict(), dict(num_classes=0, clip=None), dict(nvp=False),
                                       dict(layers_per_block=2, num_heads=2)])
def test_compiled_inverse_equals_reference(fast_compile, overrides):
    """The compiled per-token step (one graph for every position: masked cache slots) is the same inverse."""
    flow = _tiny_flow(torch.float64, **overrides)
    z = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 2, 10]) if flow.config.num_classes else None
    guides = [dict(), dict(guidance=1.0, guidance_temperature=0.5, annealed=True)]
    guides += [dict(guidance=1.5)] if flow.config.num_classes else []
    for kw in guides:
        ref = flow.reverse(z, y, kv_cache=False, **kw)
        assert torch.allclose(flow.reverse(z, y, compiled=True, **kw), ref, atol=1e-10)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert (flow.reverse(flow(x, y).z, y, compiled=True) - x).abs().max() < 1e-9


def test_fast_inverse_batch_independent(attention_path):
    """Each sample's decode depends on its own noise only (guided rows do not leak across the 2B batch)."""
    flow = _tiny_flow()
    z, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    full = flow.reverse(z, y, guidance=1.0)
    single = torch.cat([flow.reverse(z[i : i + 1], y[i : i + 1], guidance=1.0) for i in range(4)])
    assert torch.allclose(full, single, rtol=1e-5, atol=1e-5)


def test_sampler_runs_jacobi_decoding_from_the_config():
    cfg = apply_delta(scale_config("tiny"), {"inverse": "exact", "backward.denoise": "none", "sample.cfg_scale": 1.0,
                                             "sample.decoder": "jacobi", "sample.jacobi_tol": 0.0,
                                             "sample.jacobi_group": 4})
    sampler = Sampler.from_config(cfg)
    assert (sampler.decoder, sampler.jacobi_tol, sampler.jacobi_group) == ("jacobi", 0.0, 4)
    flow = _tiny_flow()
    z, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    stats: dict = {}
    x = sampler(flow, None, z, y, stats)
    assert torch.allclose(x, flow.reverse(z, y, guidance=1.0), atol=1e-4)  # tol 0: the serial inverse
    passes = stats["jacobi_iterations"]
    assert len(passes) == flow.config.num_blocks and all(1 <= k <= flow.config.num_tokens - 1 for k in passes)
    assert sampler.nfe(flow, None, passes) == (sum(passes), f"{sum(passes)} Jacobi passes (group 4, tol 0) x2 (CFG)")
    assert sampler.nfe(flow, None)[0] == flow.num_serial_steps()  # unmeasured: the bound
    serial = dataclasses.replace(sampler, decoder="serial")
    assert serial.nfe(flow, None) == (flow.num_serial_steps(), "4x15 serial x2 (CFG)")
    tempered = dataclasses.replace(serial, guidance_temperature=2.0)  # TARFlow's guidance without classes
    assert tempered.nfe(flow, None)[1] == "4x15 serial x2 (attention temperature)"
    for key, value in (("sample.decoder", "parallel"), ("sample.jacobi_group", 0), ("sample.jacobi_tol", -1.0)):
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            apply_delta(scale_config("tiny"), {key: value})


# ----------------------------------------------------------------------------------------------------------------------
# training switches (TrainingConfig.precision / .compile) in loop.fit and in the training-step benchmark


@pytest.fixture
def fast_compile(monkeypatch):
    """torch.compile through aot_eager: the same dynamo tracing and AOT forward/backward graphs as inductor, without
    its C++ code generation (a minute per model on a small CPU)."""
    from biflow_bench.models import layers

    monkeypatch.setattr(layers, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_training_settings_side_by_side(fast_compile):
    rec = run_speed_bench("tiny", batch_sizes=(2,), repeats=2, warmup=0, what="train",
                          train_settings=("fp32", "bf16", "fp32+compile"))
    names = [r["sampler"] for r in rec["rows"]]
    assert names == ["train-flow", "train-backward", "train-flow:bf16", "train-backward:bf16",
                     "train-flow:fp32+compile", "train-backward:fp32+compile"]
    peak, peak_bf16 = rec["machine"]["matmul_peak_flops"], rec["machine"]["matmul_peak_flops_bf16"]
    assert peak > 0 and peak_bf16 > 0
    by = {r["sampler"]: r for r in rec["rows"]}
    for row in rec["rows"]:
        _check_row(row)
        stage = row["sampler"].split(":")[0]
        assert row["speedup"] == pytest.approx(by[stage]["ms_per_image"] / row["ms_per_image"])
        assert row["flops_per_image"] == by[stage]["flops_per_image"]  # the same math in every setting
        row_peak = peak_bf16 if row["setting"] == "bf16" else peak
        assert row["peak_fraction"] == pytest.approx(row["flops_per_image"] * row["images_per_s"] / row_peak)
        assert row["peak_fraction_fp32"] == pytest.approx(row["flops_per_image"] * row["images_per_s"] / peak)
    assert rec["config"]["train_settings"] == ["fp32", "bf16", "fp32+compile"]
    assert "bf16" in format_speed_table(rec).splitlines()[0]
    with pytest.raises(ValueError, match="training setting"):
        run_speed_bench("tiny", batch_sizes=(2,), what="train", train_settings=("fp16",))


def test_bench_training_step_uses_the_training_optimizer():
    """The bench's step is loop.fit's: AdamW groups with no weight decay on biases (1-d parameters)."""
    from biflow_bench.speed.harness import training_calls

    cfg = get_spec("speed").resolve("learned", "tiny")
    step, model, _ = training_calls(cfg, torch.device("cpu"), 2, 0)["train-flow"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    opt_groups = [c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.optim.Optimizer)]
    (opt,) = opt_groups
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay[id(p)] == (cfg.stage1.weight_decay if p.dim() >= 2 else 0.0), name
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # it did step


@pytest.mark.parametrize("precision,compile", [("bf16", False), ("fp32", True)])
def test_fit_precision_and_compile_switches(fast_compile, precision, compile):
    """fit under each switch trains like float32 eager (same seed): compile gives the same losses to float
    rounding, bf16 autocast close ones; the returned model is a plain module with unchanged state_dict keys."""
    from biflow_bench.data import load_digits
    from biflow_bench.training.losses import nll_loss
    from biflow_bench.training.loop import fit

    data = load_digits().train

    def loss_fn(model, x, y, gen):
        loss = nll_loss(model, x + 0.1 * torch.randn(x.shape, generator=gen), y)
        return loss, {"nll": float(loss.detach())}

    def run(**switches):
        torch.manual_seed(0)
        model = TARFlow(preset_configs("tiny")[0])
        train = TrainingConfig(steps=6, batch_size=16, lr=1e-3, warmup=2, weight_decay=1e-4, **switches)
        result = fit(model, loss_fn, data, train, seed=0, progress=False)
        return model, result

    base, base_result = run()
    model, result = run(precision=precision, compile=compile)
    assert set(model.state_dict()) == set(base.state_dict())
    assert model._compiled_call_impl is None  # handed back uncompiled
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert result.terms["nll"] == pytest.approx(base_result.terms["nll"], abs=tol)
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), base.parameters(), strict=True))
    assert diff < (1e-4 if precision == "fp32" else 5e-2)
    if precision == "bf16":  # autocast did run: the result is not bit-identical to float32
        assert diff > 0


def test_compiled_inverse_serves_more_shapes_than_dynamo_recompiles_by_default(fast_compile):
    """One graph per batch size (and guidance mode): a benchmark's sweep needs more than dynamo's default 8."""
    flow = _tiny_flow()
    for b in range(1, 7):
        z, y = torch.randn(b, 1, 8, 8), torch.arange(b) % 10
        for w in (0.0, 1.0):
            assert flow.reverse(z, y, guidance=w, compiled=True).shape == z.shape


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_autocast_keeps_attention_in_float32(causal):
    """Under CPU bf16 autocast the attention itself runs in float32 (bf16's flash-attention backward is several
    times slower on the CPU); the projections around it stay bf16."""
    import torch.nn.functional as F

    from biflow_bench.models.layers import Attention

    attn = Attention(16, 2, causal=causal, qk_norm=not causal)
    x = torch.randn(3, 5, 16)
    with torch.autocast("cpu", torch.bfloat16):
        out = attn(x)
        q, k, v = attn.qkv(x).view(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        assert q.dtype == torch.bfloat16  # the projections did run in bf16
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        ref = attn.proj(y.transpose(1, 2).reshape(3, 5, 16))
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_compiled_sampling_pass_equals_eager_and_gets_rows(fast_compile):
    """G's pass under torch.compile (aot_eager here: dynamo's capture and AOT graphs, not inductor's codegen)
    gives eager's images, and the bench times it beside the eager row."""
    import copy

    from biflow_bench.models import BiFlow
    from biflow_bench.training.loop import compile_in_place

    _, g_cfg = preset_configs("tiny")
    g = randomize(BiFlow(g_cfg), scale=0.5).eval()
    compiled = copy.deepcopy(g)
    compile_in_place(compiled, cpp_wrapper=True)  # as the speed bench compiles G's pass
    z, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.inference_mode():
        for w in (0.0, 1.5):
            eager, comp = g.sample(z, y, cfg_scale=w), compiled.sample(z, y, cfg_scale=w)
            assert torch.allclose(comp, eager, atol=1e-5), (comp - eager).abs().max()
    assert not torch.allclose(g.sample(z, y, 0.0), g.sample(z, y, 1.5), atol=1e-3)  # w matters: not vacuous
    rec = run_speed_bench("tiny", batch_sizes=(1,), repeats=1, warmup=0, compile=True)
    by = {r["sampler"]: r for r in rec["rows"]}
    assert {"learned:compiled", "learned-cfg:compiled", "exact:compiled", "exact-cfg:compiled"} <= set(by)
    assert "exact-jacobi:compiled" not in by and "learned-score:compiled" not in by
    for name in ("learned", "learned-cfg", "exact", "exact-cfg"):
        row = by[f"{name}:compiled"]
        _check_row(row)
        assert row["nfe"] == by[name]["nfe"] and row["flops_per_image"] == by[name]["flops_per_image"]
        assert row["speedup"] == pytest.approx(by["exact"]["ms_per_image"] / row["ms_per_image"])
        assert "torch.compile" in row["label"] and row["paper_ms"] is None
    assert rec["config"]["compile"] is True and validation_error(rec) is None

"""Registry-parametrized end-to-end runs: every registered variant of every quality ablation trains, samples,
evaluates and writes a valid record at the tiny scale (with short schedules); plus the spec registry's validation."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing

import pytest

from biflow_bench import runner
from biflow_bench.ablations import SpecError, load_registry, load_spec
from biflow_bench.config import RANGES, SCALES, ConfigError, RunConfig, apply_delta
from biflow_bench.identity import backward_key, flow_key
from biflow_bench.report.frames import load_results
from biflow_bench.results import is_done, read_record

REGISTRY = load_registry()
QUICK = {"stage1.steps": 30, "stage1.batch_size": 32, "stage2.steps": 12, "stage2.batch_size": 32,
         "stage2.perceptual_batch": 4, "sample.num_samples": 60, "eval.num_real": 60, "eval.nll_samples": 60,
         "eval.resize": 32}
CASES = [(a, v) for a, spec in REGISTRY.items() if spec.kind == "quality" for v in spec.variants]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One artifact cache for the module: variants that share F reuse it, as in a real run."""
    root = tmp_path_factory.mktemp("e2e")
    return runner.RunOptions(results_dir=root / "results", cache_dir=root / "cache", overrides=QUICK, progress=False)


def test_registry_has_every_table_of_the_paper():
    assert {"inverse-strategy", "denoise", "norm-control", "distance-metric", "training-cfg", "main",
            "speed"} <= set(REGISTRY)
    assert list(REGISTRY["inverse-strategy"].variants) == ["exact", "naive", "hidden-distill", "hidden-align"]
    assert REGISTRY["denoise"].variants["score"].paper["fid"] == 42.62


@pytest.mark.parametrize("ablation,variant", CASES, ids=[f"{a}/{v}" for a, v in CASES])
@pytest.mark.slow
def test_variant_runs_end_to_end(ablation, variant, shared):
    (path,) = runner.run(ablation, [variant], scale="tiny", seed=0, opts=shared)
    record = read_record(path)
    spec = REGISTRY[ablation]
    cfg = spec.resolve(variant, "tiny", QUICK)
    assert record["config"] == cfg.to_dict() and record["metric"] == "fd_effnet"
    assert all(v == v for v in record["metrics"].values()) and record["metrics"]["fd_effnet"] > 0
    assert record["paper"]["table"] == spec.paper_table
    score_step = cfg.backward.denoise == "score"  # one more pass, through F
    if cfg.inverse == "exact":  # serial: one evaluation per decoded token per block
        per_block = 1 if cfg.flow.coupling == "channel" else cfg.flow.num_tokens - 1  # coupling: one pass
        serial = cfg.flow.num_blocks * per_block
        assert record["nfe"] == serial + score_step and record["params"]["backward"] == 0
    elif cfg.inverse == "peer":  # its steps (Heun: two evaluations each; flow matching's CFG: two branches)
        branches = 2 if cfg.peer.kind == "flow-matching" and record["guidance"]["best_w"] else 1
        evaluations = 2 if cfg.sample.solver == "heun" and cfg.peer.kind == "flow-matching" else 1
        assert record["nfe"] == cfg.sample.steps * evaluations * branches and record["params"]["flow"] == 0
    else:
        two_branch = cfg.backward.cfg_mode == "inference" and record["guidance"]["best_w"]
        assert record["nfe"] == (2 if two_branch else 1) + score_step and record["params"]["backward"] > 0
    if "lpips" in cfg.stage2.metric:  # the offline stand-in with ImageNet weights, named in the record
        assert any("lpips: effnet-lite1 (ImageNet weights, offline stand-in for vgg16)" in n for n in record["notes"])
    guided = cfg.sample.cfg_scale > 0
    curve = record["guidance"]["curve"]
    extended = record["guidance"].get("extended", [])  # past the sweep's edge while its best w is the largest
    assert [p["w"] for p in curve] == (list(cfg.sample.cfg_sweep) + extended if guided else [cfg.sample.cfg_scale])
    best = min(curve, key=lambda p: p["metrics"]["fd_effnet"])
    assert record["guidance"]["best_w"] == best["w"] and record["metrics"]["fd_effnet"] == best["metrics"]["fd_effnet"]
    assert (shared.results_dir / "tiny" / record["samples_png"]).exists()
    assert is_done(shared.results_dir, "tiny", ablation, variant, 0, record["config_hash"])


@pytest.mark.slow
def test_denoise_none_and_score_share_one_g_and_sample_differently(shared):
    """One G serves both rows (trained once, as 'score'); the rows differ by F's score step at sampling."""
    score, none = runner.run("denoise", ["score", "none"], scale="tiny", seed=0, opts=shared)
    rec_score, rec_none = (json.loads(p.read_text()) for p in (score, none))
    assert rec_score["train"]["stage2"]["key"] == rec_none["train"]["stage2"]["key"]
    assert rec_none["train"]["stage2"]["cached"] and rec_none["params"] == rec_score["params"]
    assert rec_score["metrics"]["fd_effnet"] != rec_none["metrics"]["fd_effnet"]


@pytest.mark.slow
def test_recorded_runs_are_skipped_and_results_load(shared):
    (path,) = runner.run("denoise", ["learned"], scale="tiny", seed=0, opts=shared)
    stamp = path.stat().st_mtime_ns
    runner.run("denoise", ["learned"], scale="tiny", seed=0, opts=shared)
    assert path.stat().st_mtime_ns == stamp  # skipped, not re-run
    df, skipped = load_results(shared.results_dir)
    assert not skipped and ("denoise", "learned") in set(zip(df.ablation, df.variant, strict=True))


def test_variants_sharing_f_share_the_artifact(shared):
    cfgs = [REGISTRY["denoise"].resolve(v, "tiny", QUICK) for v in ("learned", "score", "none")]
    assert len({flow_key(c) for c in cfgs}) == 1
    learned, score, none = (backward_key(c, 0) for c in cfgs)
    assert score == none != learned  # score and none differ only at sampling: one G without a denoising stage
    clip, none = (REGISTRY["norm-control"].resolve(v, "tiny", QUICK) for v in ("clip", "none"))
    assert flow_key(clip) != flow_key(none)  # norm control changes F: its own forward flow


@pytest.mark.parametrize("text,message", [
    ('name = "x"\nversion = 1\ntitle = "t"\npaper_table = "p"\n[variants.a]\nset = { "stage2.nope" = 1 }',
     "unknown key 'stage2.nope'"),
    ('name = "x"\nversion = 1\ntitle = "t"\npaper_table = "p"\n[variants.a]\nset = { "stage2.steps" = "many" }',
     "wrong type"),
    ('name = "x"\nversion = 1\ntitle = "t"\npaper_table = "p"\n[variants.a]\nbogus = 1', "unknown key"),
    ('name = "x"\nversion = "one"\ntitle = "t"\npaper_table = "p"\n[variants.a]', "version"),
    ('name = "x"\nversion = 1\ntitle = "t"\npaper_table = "p"', "at least one"),
    ("name = [", "not valid TOML"),
    ('name = "x"\nversion = 1\ntitle = "t"\npaper_table = "p"\nkind = "study"\njudge = { lr = "fid" }\n[variants.a]',
     "'judge'"),
    ('name = "x"\nversion = 1\ntitle = "t"\npaper_table = "p"\njudge = { lr = "fd_cls" }\n[variants.a]', "'judge'"),
    ('name = "x"\nversion = 1\ntitle = "t"\npaper_table = "p"\n[variants.a]\npaper = { order = 0 }', "'order'"),
])
def test_malformed_specs_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as e:
        load_spec(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_duplicate_names_refused(tmp_path):
    spec = 'name = "same"\nversion = 1\ntitle = "t"\npaper_table = "p"\n[variants.a]\n'
    (tmp_path / "a.toml").write_text(spec)
    (tmp_path / "b.toml").write_text(spec)
    with pytest.raises(SpecError, match="duplicate ablation name 'same'"):
        load_registry(tmp_path)


def test_specs_are_json_serialisable_configs():
    for spec in REGISTRY.values():
        for v in spec.variants:
            cfg = spec.resolve(v, "tiny")  # a record's config reads back as the run's own
            assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, (spec.name, v)


def _out_of_range(low: float, high: float, low_in: bool, high_in: bool, kind: type) -> list:
    """Values just outside [low, high] (as the range's ends admit) and NaN, of the field's type."""
    below = low - 1 if low_in else low
    values = [kind(below)] if kind is float or below == int(below) else []
    if not math.isinf(high):
        values.append(kind(high + 1 if high_in else high))
    return values + ([float("nan")] if kind is float else [])


def _numeric_fields(cfg, prefix=""):
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_fields(value, f"{prefix}{f.name}.")
        elif f.name in RANGES or isinstance(value, (int, float)) and not isinstance(value, bool):
            kind = float if "float" in str(hints[f.name]) else int
            yield f"{prefix}{f.name}", f.name, kind


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_numeric_setting_rejects_out_of_range_values(scale):
    """Each numeric field of every section, at every scale, refuses a value just outside its range (and NaN) with one
    line naming the key, before any work; the preset itself is within range."""
    cfg = SCALES[scale]
    checked = 0
    for key, name, kind in _numeric_fields(cfg):
        assert name in RANGES, f"{key} has no valid range in config.RANGES"
        for bad in _out_of_range(*RANGES[name], kind):
            value = [bad] if name == "cfg_sweep" else bad
            with pytest.raises(ConfigError, match=rf"^override: {re.escape(key)}=.* is out of range: it must be "):
                apply_delta(cfg, {key: value})
            checked += 1
    assert checked > 60

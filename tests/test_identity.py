"""A run's identity (identity.py): the record hash covers what a run reads and nothing else, the artifact keys stay
put and change with what a stage trains with (micro-batch, device, the perceptual code; a seed varies G, not F), and
archived records leave the lookups and the report unless asked for."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
from PIL import Image

from biflow_bench.ablations import get_spec
from biflow_bench.config import PERCEPTUAL_NETWORKS, SCALES, apply_delta
from biflow_bench.identity import backward_key, config_id, config_overrides, flow_key
from biflow_bench.report.configs import split_configs
from biflow_bench.report.frames import load_results
from biflow_bench.report.render import render_report
from biflow_bench.results import ARCHIVE, RESULT_SCHEMA, find_measurement, find_record, record_path, write_record

TINY = SCALES["tiny"]
GUIDED = {"sample.cfg_scale": 1.0, "sample.cfg_sweep": [0.0, 1.0]}


def record_hash(base, delta: dict) -> str:
    return config_id(apply_delta(base, delta).to_dict())


@pytest.mark.parametrize("base,unread", [
    ({}, {"sample.cfg_sweep": [0.0, 2.0, 4.0]}),  # unguided: sampled at w = 0 alone
    ({"inverse": "exact", "backward.denoise": "score"}, {"stage2.steps": 7, "backward.width": 32,
                                                         "backward.strategy": "naive"}),  # no G
    ({"inverse": "exact", "backward.denoise": "score"}, {"sample.jacobi_tol": 0.5}),  # the serial decoder
    ({}, {"sample.decoder": "jacobi", "sample.annealed": True, "sample.guidance_temperature": 2.0}),  # G's sampler
    ({"backward.cfg_mode": "none"}, {"stage2.cfg_max": 3.0, "stage2.label_drop": 0.3}),  # no CFG in training
    ({"backward.strategy": "hidden-align"}, {"backward.distill_residual": True}),
])
def test_settings_a_run_does_not_read_are_not_part_of_its_record_hash(base: dict, unread: dict) -> None:
    """Two configs that differ only in settings the run never reads are one run: one hash, no overrides (so one
    readable record name); the artifact keys are left as they were (trained models are stored under them)."""
    cfg = apply_delta(TINY, base)
    other = apply_delta(cfg, unread)
    assert config_id(other.to_dict()) == config_id(cfg.to_dict())
    assert config_overrides(other.to_dict(), cfg.to_dict()) == {}


@pytest.mark.parametrize("base,read", [
    (GUIDED, {"sample.cfg_sweep": [0.0, 2.0]}),  # a guided row is evaluated at every w of its sweep
    ({"inverse": "exact", "backward.denoise": "score", "sample.decoder": "jacobi"}, {"sample.jacobi_tol": 0.5}),
    ({"inverse": "exact", "backward.denoise": "score"}, {"backward.denoise": "none", "stage1.steps": 7}),
    ({}, {"stage2.steps": 7}),
    ({"backward.cfg_mode": "training-time"}, {"stage2.cfg_max": 3.0}),
    ({"backward.strategy": "hidden-distill"}, {"backward.distill_residual": True}),
])
def test_settings_a_run_reads_change_its_record_hash(base: dict, read: dict) -> None:
    cfg = apply_delta(TINY, base)
    assert config_id(apply_delta(cfg, read).to_dict()) != config_id(cfg.to_dict())
    assert set(config_overrides(apply_delta(cfg, read).to_dict(), cfg.to_dict())) == set(read)


def test_artifact_keys_of_the_small_rows_are_unchanged() -> None:
    """Trained models in the cache are stored under these keys: a change retrains every model (on purpose only)."""
    spec = get_spec("denoise")
    learned, score = spec.resolve("learned", "small"), spec.resolve("score", "small")
    assert (flow_key(learned), backward_key(learned, 0), backward_key(score, 1)) == \
        ("f7d48c57cc2f1cc7", "081a4dddde16eb2f", "f9c434536e9b9351")  # G: the preset of the G study
    exact = get_spec("main").resolve("itarflow", "small")
    assert (flow_key(exact), backward_key(exact, 0)) == ("f7d48c57cc2f1cc7", "b105378fb22b9bb7")
    # the study pins its centre: the former preset's G keeps its key (and its cached artifact)
    assert backward_key(get_spec("g-training").resolve("centre", "small"), 0) == "5201685739b923af"


def test_perceptual_network_names_match_the_networks_built() -> None:
    from biflow_bench.training.perceptual import NETWORKS

    assert {term: tuple(nets) for term, nets in NETWORKS.items()} == PERCEPTUAL_NETWORKS


def test_stage_keys_cover_micro_batch_and_device() -> None:
    cfg = SCALES["small"]  # both stages at batch 128
    assert flow_key(cfg, cfg.stage1.batch_size) == flow_key(cfg)  # one pass per batch: the same training
    assert flow_key(cfg, 32) != flow_key(cfg) and backward_key(cfg, 0, 32) != backward_key(cfg, 0)
    assert flow_key(cfg, device="cuda") != flow_key(cfg)  # bf16 autocast on CUDA
    assert cfg.effective_micro_batch(cfg.stage1.batch_size) is None and cfg.effective_micro_batch(32) == 32


def test_perceptual_code_version_keys_only_the_gs_trained_with_perceptual_terms(monkeypatch) -> None:
    """A change to the perceptual terms' code retrains the Gs that use them, and no other model."""
    import biflow_bench.identity as identity

    mse, lpips = SCALES["tiny"], apply_delta(SCALES["tiny"], {"stage2.metric": "mse+lpips"})
    before = (flow_key(mse), backward_key(mse, 0), backward_key(lpips, 0))
    monkeypatch.setattr(identity, "PERCEPTUAL_CODE_VERSION", identity.PERCEPTUAL_CODE_VERSION + 1)
    assert (flow_key(mse), backward_key(mse, 0)) == before[:2] and backward_key(lpips, 0) != before[2]


def test_perceptual_settings_a_metric_never_reads_are_not_part_of_a_runs_identity() -> None:
    """An MSE run is the same run whatever its (unused) perceptual settings: the same record hash and G; an LPIPS
    run ignores the ConvNeXt term's settings but not the crop size it trains with."""
    def ids(delta: dict) -> tuple[str, str]:
        cfg = apply_delta(SCALES["tiny"], delta)
        return config_id(cfg.to_dict()), backward_key(cfg, 0)

    mse, lpips = {"stage2.metric": "mse"}, {"stage2.metric": "mse+lpips"}
    assert ids({**mse, "stage2.perceptual_size": 32, "stage2.lpips_net": "vgg16"}) == ids(mse)
    assert ids({**lpips, "stage2.convnext_net": "convnextv2", "stage2.convnext_weight": 2.0}) == ids(lpips)
    assert all(a != b for a, b in zip(ids({**lpips, "stage2.perceptual_size": 48}), ids(lpips)))
    assert config_overrides(apply_delta(SCALES["tiny"], {"stage2.perceptual_batch": 4}).to_dict(),
                            SCALES["tiny"].to_dict()) == {}


def test_seeds_of_g_share_one_f() -> None:
    """A run's seed varies G (and sampling), not F: F is trained once per F config, its seed is stage1.seed."""
    cfg = SCALES["tiny"]
    assert backward_key(cfg, 1) != backward_key(cfg, 0)
    other_f = apply_delta(cfg, {"stage1.seed": 1})
    assert flow_key(other_f) != flow_key(cfg) and backward_key(other_f, 0) != backward_key(cfg, 0)


# ------------------------------------------------------------------------------------------------------ the archive

def _record(cfg, seed: int, value: float, samples_png: str) -> dict:
    return {"schema": RESULT_SCHEMA, "kind": "ablation", "ablation": "denoise", "variant": "learned",
            "label": "Learned", "scale": "tiny", "seed": seed, "spec_version": 2, "config": cfg.to_dict(),
            "overrides": {}, "metric": "fd_effnet", "metrics": {"fd_effnet": value, "fd_effnet_std": 0.1},
            "diagnostics": {"noise_sensitivity": 0.5}, "nfe": 1, "nfe_label": "1", "samples_png": samples_png,
            "created": "2026-12-01T00:00:00Z"}


def _archived_results(tmp_path: Path) -> tuple[Path, str]:
    """Today's default record of tiny denoise/learned, and an archived record of an older config (6 F steps)."""
    rdir = tmp_path / "results"
    today = get_spec("denoise").resolve("learned", "tiny")
    older = apply_delta(today, {"stage1.steps": 6, "sample.cfg_sweep": [0.0, 9.0]})  # the sweep is unread here
    for root, cfg, value in ((rdir / ARCHIVE, older, 900.0), (rdir, today, 500.0)):
        h = config_id(cfg.to_dict())
        name = record_path(root, "tiny", "denoise", "learned", 0, h if root != rdir else None).stem
        grid = root / "tiny" / "samples" / "denoise" / f"{name}.png"
        grid.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(grid)
        path = write_record(rdir, _record(cfg, 0, value, f"samples/denoise/{name}.png"))
        if root != rdir:  # archived: moved under results/archive with its hashed name
            target = record_path(root, "tiny", "denoise", "learned", 0, h)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    return rdir, config_id(older.to_dict())


def test_archived_records_are_not_found_nor_reported_unless_asked(tmp_path: Path, monkeypatch, capsys) -> None:
    rdir, old_hash = _archived_results(tmp_path)
    assert find_record(rdir, "tiny", "denoise", "learned", 0, old_hash) is None
    assert find_measurement(rdir, "tiny", 0, old_hash) is None
    assert find_record(rdir, "tiny", "denoise", "learned", 0, config_id(get_spec("denoise").resolve(
        "learned", "tiny").to_dict())) is not None
    assert len(load_results(rdir)[0]) == 1 and len(load_results(rdir, include_archive=True)[0]) == 2

    render_report(rdir, tmp_path / "plain", registry={"denoise": get_spec("denoise")})
    page = (tmp_path / "plain" / "tiny" / "denoise.md").read_text()
    assert "Other configurations" not in page and "900.0" not in page

    from biflow_bench import cli

    monkeypatch.setattr(sys, "argv", ["biflow-bench", "report", "--results-dir", str(rdir), "--out",
                                      str(tmp_path / "all"), "--include-archive", "--scales", "tiny"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0, capsys.readouterr().err
    main, other = (tmp_path / "all" / "tiny" / "denoise.md").read_text().split("## Other configurations")
    assert "500.0 ± 0.1" in main and "900.0" not in main
    assert "| stage1.steps=6 | 900.0 ± 0.1 |" in other  # by the key that differs; the unread sweep is no difference
    assert "default of spec" not in other


def test_split_labels_records_by_the_keys_that_differ_from_todays_default(tmp_path: Path) -> None:
    rdir, _ = _archived_results(tmp_path)
    df, _ = load_results(rdir, include_archive=True)
    rows, others = split_configs(df, {"denoise": get_spec("denoise")})
    assert list(rows["value"]) == [500.0] and list(others["overrides"]) == ["stage1.steps=6"]

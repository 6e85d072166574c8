"""Result records on disk (results.py): write, read and validation, bad files rejected and skipped, the flat table
of records, and records of other configs beside the default's: hashed names, the archive, superseded runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from biflow_bench.config import config_hash
from biflow_bench.files import atomic_write_json
from biflow_bench.identity import config_id, config_overrides
from biflow_bench.report.frames import load_results, load_speed_records
from biflow_bench.results import (
    RESULT_SCHEMA, BadRecord, find_record, is_done, read_record, record_path, scan_records, write_record,
)
from report_records import add_bad_files, make_record, speed_record, variant_of

# ----------------------------------------------------------------------------------------------------------------------
# writing, reading and validating records


def test_record_round_trip(tmp_path: Path) -> None:
    rec = make_record("denoise", "learned", 2, 12.3, label="Learned", paper_fid=31.88)
    del rec["schema"]  # stamped by the writer
    path = write_record(tmp_path, rec)
    assert path == tmp_path / "tiny" / "denoise" / "learned__seed2.json"
    assert read_record(path) == {**rec, "schema": RESULT_SCHEMA, "config_hash": config_id(rec["config"])}
    assert is_done(tmp_path, "tiny", "denoise", "learned", 2)
    assert not is_done(tmp_path, "tiny", "denoise", "learned", 3)  # no file


def test_write_refuses_invalid_records(tmp_path: Path) -> None:
    rec = make_record("denoise", "learned", 0, 1.0, label="x")
    with pytest.raises(BadRecord, match="metrics"):
        write_record(tmp_path, {k: v for k, v in rec.items() if k != "metrics"})
    with pytest.raises(BadRecord, match="variant"):
        write_record(tmp_path, {**rec, "variant": "../escape"})
    with pytest.raises(BadRecord, match="primary metric"):
        write_record(tmp_path, {**rec, "metric": "fid"})
    with pytest.raises(BadRecord, match="schema 2"):
        write_record(tmp_path, {**rec, "schema": 2})
    with pytest.raises(BadRecord, match=r"rows\[0\]"):
        write_record(tmp_path, {**speed_record(), "rows": [{"sampler": "exact", "batch_size": 1}]})
    assert not list(tmp_path.rglob("*.json"))


def test_bad_files_are_rejected_and_skipped(results: Path) -> None:
    bad = add_bad_files(results)
    expected_reason = {"truncated": "not valid JSON", "foreign": "no 'schema' key", "schema": "schema 99"}
    for key, reason in expected_reason.items():
        with pytest.raises(BadRecord, match=re.escape(reason)) as err:
            read_record(bad[key])
        assert str(bad[key]) in str(err.value) and "\n" not in str(err.value)
    assert not is_done(results, "tiny", "denoise", "score", 7)  # truncated
    assert not is_done(results, "tiny", "main", "biflow", 3)  # wrong schema
    assert not is_done(results, "tiny", "main", "biflow", 4)  # valid JSON, but a copy of seed 0's record

    df, skipped = load_results(results)
    reasons = {p: why for p, why in skipped}
    assert set(reasons) == set(bad.values())
    assert "belongs at tiny/main/biflow__seed0.json" in reasons[bad["moved"]]
    assert len(df) == 6 and set(df["kind"]) == {"ablation"}  # the 6 good quality records, nothing else


def test_load_results_flattens_records(results: Path) -> None:
    df, skipped = load_results(results)
    assert skipped == []
    row = df[(df["ablation"] == "denoise") & (df["variant"] == "score")].iloc[0]
    assert (row["value"], row["value_std"], row["metric_is_effnet"], row["metric_bpd"]) == (30.0, 0.5, 3.0, 1.5)
    assert (row["paper_fid"], row["paper_table"], row["params_total"]) == (42.62, "Table 3", 150.0)
    assert row["nfe_label"] == "2"
    assert list(df[df["variant"] == "learned"]["seed"]) == [0, 1]

    both, _ = load_results(results, kinds=("ablation", "speed"))
    assert set(both["kind"]) == {"ablation", "speed"}
    speed, _ = load_speed_records(results)
    assert len(speed) == 4 and set(speed["sampler"]) == {"exact", "learned"}
    assert speed[speed["sampler"] == "exact"]["batch_size"].tolist() == [1.0, 8.0]


# ----------------------------------------------------------------------------------------------------------------------
# records keyed by config


def test_records_of_other_configs_sit_side_by_side(tmp_path: Path) -> None:
    base = make_record("denoise", "learned", 0, 10.0, label="Learned")
    default, short = {"inverse": "learned", "stage2": {"steps": 400}}, {"inverse": "learned", "stage2": {"steps": 100}}
    assert config_overrides(short, default) == {"stage2.steps": 100}
    h_default, h_short = config_id(default), config_id(short)
    assert h_default != h_short and config_id(default, micro_batch=8) not in (h_default, h_short)

    plain = write_record(tmp_path, variant_of(base, 0, 10.0, default))
    hashed = write_record(tmp_path, variant_of(base, 0, 2000.0, short, {"stage2.steps": 100}))
    assert plain == record_path(tmp_path, "tiny", "denoise", "learned", 0)
    assert hashed == record_path(tmp_path, "tiny", "denoise", "learned", 0, h_short) != plain
    assert hashed.name == f"learned__seed0__{h_short}.json"
    assert find_record(tmp_path, "tiny", "denoise", "learned", 0, h_default) == plain
    assert find_record(tmp_path, "tiny", "denoise", "learned", 0, h_short) == hashed
    assert find_record(tmp_path, "tiny", "denoise", "learned", 1, h_short) is None  # another seed: not done
    assert read_record(plain)["metrics"]["fd_effnet"] == 10.0  # the override did not replace the default record

    # the spec's default changes: the new default record takes the readable name, the old one moves to the archive
    # under its hash, with its grid
    grid = tmp_path / "tiny" / "samples" / "denoise" / "learned__seed0.png"
    grid.parent.mkdir(parents=True)
    grid.write_bytes(b"old grid")
    atomic_write_json(plain, {**read_record(plain), "samples_png": "samples/denoise/learned__seed0.png"})
    newer = {"inverse": "learned", "stage2": {"steps": 500}}
    assert write_record(tmp_path, variant_of(base, 0, 7.0, newer, version=2)) == plain
    aside = record_path(tmp_path / "archive", "tiny", "denoise", "learned", 0, h_default)
    assert read_record(aside)["metrics"]["fd_effnet"] == 10.0 and read_record(plain)["metrics"]["fd_effnet"] == 7.0
    archived_grid = tmp_path / "archive" / "tiny" / read_record(aside)["samples_png"]
    assert archived_grid.read_bytes() == b"old grid" and not grid.exists()
    assert find_record(tmp_path, "tiny", "denoise", "learned", 0, h_default) is None  # superseded: not done today
    records, skipped = scan_records(tmp_path)
    assert skipped == [] and len(records) == 2 and len(scan_records(tmp_path, include_archive=True)[0]) == 3


def test_a_run_of_todays_config_archives_the_old_default_record_with_its_own_grid(tmp_path: Path) -> None:
    """A new run writes its grid under the readable name the old default record's grid has: the old record and
    its grid go to the archive first, so the archived record still shows its own samples."""
    import time

    from biflow_bench.ablations import get_spec
    from biflow_bench.identity import run_identity
    from biflow_bench.results import write_variant_record

    spec = get_spec("denoise")
    cfg = spec.resolve("learned", "tiny")
    old = {**make_record("denoise", "learned", 0, 900.0, label="Learned", samples_png="samples/denoise/learned__seed0.png"),
           "config": {**cfg.to_dict(), "stage2": {**cfg.to_dict()["stage2"], "steps": 7}}}
    old_path = write_record(tmp_path, old)
    (tmp_path / "tiny" / "samples" / "denoise").mkdir(parents=True)
    (tmp_path / "tiny" / old["samples_png"]).write_bytes(b"old grid")
    ident = run_identity(cfg, spec.resolve("learned", "tiny"), None)
    measurement = {**make_record("denoise", "learned", 0, 500.0, label="Learned"), "config": cfg.to_dict(),
                   "guidance": {"scales": [0.0], "best_w": 0.0}}
    path = write_variant_record(spec, "learned", "tiny", 0, tmp_path, ident, measurement, b"new grid", time.perf_counter())
    assert path == old_path and (tmp_path / "tiny" / read_record(path)["samples_png"]).read_bytes() == b"new grid"
    (archived, rec), = scan_records(tmp_path / "archive")[0]
    assert rec["metrics"]["fd_effnet"] == 900.0 and (tmp_path / "archive" / "tiny" / rec["samples_png"]).read_bytes() == b"old grid"


def test_an_earlier_archived_run_of_the_same_config_is_kept_not_overwritten(tmp_path: Path) -> None:
    """Two runs of one config superseded in turn (a table re-run before a preset change): the archive keeps both,
    each with its own grid; the latest takes the hashed name the report reads, the earlier one a name stamped with
    its creation time."""
    from biflow_bench.results import archive_superseded

    def superseded_run(created: str, value: float, grid: bytes) -> None:
        png = "samples/denoise/learned__seed0.png"
        write_record(tmp_path, {**make_record("denoise", "learned", 0, value, label="Learned", samples_png=png),
                                "created": created})
        (tmp_path / "tiny" / png).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tiny" / png).write_bytes(grid)
        assert archive_superseded(record_path(tmp_path, "tiny", "denoise", "learned", 0), tmp_path, "a-newer-config")

    superseded_run("2026-12-03T03:02:21Z", 900.0, b"first grid")
    superseded_run("2026-12-03T12:45:20Z", 800.0, b"second grid")
    (latest, rec), = scan_records(tmp_path, include_archive=True)[0]
    assert scan_records(tmp_path, include_archive=True)[1] == []
    assert rec["metrics"]["fd_effnet"] == 800.0 and (tmp_path / "archive" / "tiny" / rec["samples_png"]).read_bytes() == b"second grid"
    earlier = latest.with_name(f"{latest.stem}__20261203T030221Z.json")
    first = read_record(earlier)
    assert first["metrics"]["fd_effnet"] == 900.0 and (tmp_path / "archive" / "tiny" / first["samples_png"]).read_bytes() == b"first grid"
    assert not (tmp_path / "tiny" / "denoise" / "learned__seed0.json").exists()


def test_a_record_moved_aside_under_its_whole_config_hash_still_counts(tmp_path: Path) -> None:
    """Records moved aside before the hash left out unused perceptual settings carry the whole config's hash in
    their names: they still read, and still count as done."""
    old = {"inverse": "learned", "stage2": {"metric": "mse", "steps": 400, "perceptual_size": 64}}
    base = make_record("denoise", "learned", 0, 10.0, label="Learned")
    plain = write_record(tmp_path, variant_of(base, 0, 10.0, old))
    whole = record_path(tmp_path, "tiny", "denoise", "learned", 0, config_hash(old))
    assert config_hash(old) != config_id(old)
    plain.rename(whole)
    records, skipped = scan_records(tmp_path)
    assert skipped == [] and len(records) == 1
    assert find_record(tmp_path, "tiny", "denoise", "learned", 0, config_id(old)) == whole

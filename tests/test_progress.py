"""`biflow-bench progress`: which rows of a reproduction are recorded at the current config, the time they took and
the estimate of the time left (golden values on hand-made records)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from biflow_bench.ablations import get_spec, load_registry
from biflow_bench.cli import app
from biflow_bench.progress import Row, estimate_left, format_progress, progress_rows, run_plan
from biflow_bench.results import write_record


def _record(ablation: str, variant: str, seed: int, wall_s: float, config: dict) -> dict:
    return {"kind": "ablation", "ablation": ablation, "variant": variant, "scale": "tiny", "seed": seed,
            "config": config, "metric": "fd_effnet", "metrics": {"fd_effnet": 1.0}, "wall_time_s": wall_s}


def test_progress_counts_current_records_and_estimates_the_rest(tmp_path: Path):
    registry = {"denoise": get_spec("denoise")}  # learned, score, none
    spec = registry["denoise"]
    write_record(tmp_path, _record("denoise", "learned", 0, 600.0, spec.resolve("learned", "tiny").to_dict()))
    write_record(tmp_path, _record("denoise", "score", 0, 60.0, spec.resolve("score", "tiny").to_dict()))
    write_record(tmp_path, _record("denoise", "learned", 1, 300.0, spec.resolve("learned", "tiny").to_dict()))
    stale = spec.resolve("none", "tiny").to_dict() | {"scale": "old"}  # a record of another config: not done
    write_record(tmp_path, _record("denoise", "none", 0, 5.0, stale))
    rows = progress_rows(tmp_path, "tiny", [0, 1], registry)
    assert [(r.variant, r.seed, r.wall_s) for r in rows] == [
        ("learned", 0, 600.0), ("score", 0, 60.0), ("none", 0, None),
        ("learned", 1, 300.0), ("score", 1, None), ("none", 1, None)]
    # missing rows: the same variant at another seed when recorded (score: 60), else the median of the recorded
    # rows (300; their mean would be 320)
    assert estimate_left(rows) == 300.0 + 60.0 + 300.0
    text = format_progress(rows, "tiny")
    assert "denoise                 0    2 of 3      11.0  none" in text
    assert "3 of 6 rows recorded, 16.0 min spent; about 11 min of job time left" in text
    assert estimate_left([r for r in rows if r.wall_s is None]) is None  # nothing recorded: no estimate
    assert "0 of 3 rows recorded, 0.0 min spent; no estimate of the time left yet" in format_progress(
        [r for r in rows if r.wall_s is None], "tiny")


def test_a_reference_run_estimates_a_reproduction_measured_anew(tmp_path: Path):
    registry = {"denoise": get_spec("denoise")}
    spec, reference, anew = registry["denoise"], tmp_path / "reference", tmp_path / "anew"
    for variant, wall in (("learned", 600.0), ("score", 60.0), ("none", 30.0)):
        write_record(reference, _record("denoise", variant, 0, wall, spec.resolve(variant, "tiny").to_dict()))
    stale = spec.resolve("none", "tiny").to_dict() | {"scale": "old"}
    write_record(reference, _record("denoise", "none", 1, 5.0, stale))  # another config: no reference
    rows = progress_rows(anew, "tiny", [0], registry, reference_dir=reference)
    assert [r.reference_s for r in rows] == [600.0, 60.0, 30.0]
    assert estimate_left(rows) == 690.0  # from its first minute, nothing recorded yet
    seed1 = write_record(reference, _record("denoise", "learned", 1, 300.0, spec.resolve("learned", "tiny").to_dict()))
    both = progress_rows(anew, "tiny", [0, 1], registry, reference_dir=reference)
    assert estimate_left(both) == 690.0 + 300.0 + 60.0 + 30.0  # each row its own reference; else its variant's
    seed1.unlink()
    assert "0 of 3 rows recorded, 0.0 min spent; about 12 min of job time left" in format_progress(rows, "tiny")
    write_record(anew, _record("denoise", "learned", 0, 900.0, spec.resolve("learned", "tiny").to_dict()))
    assert estimate_left(progress_rows(anew, "tiny", [0], registry, reference_dir=reference)) == 90.0
    # a row the reference lacks, with nothing recorded anew: no estimate; once a row is recorded, its median
    rows = progress_rows(anew, "tiny", [1], registry, reference_dir=reference)
    assert [r.reference_s for r in rows] == [None, None, None] and estimate_left(rows) is None
    rows = progress_rows(anew, "tiny", [0, 1], registry, reference_dir=reference)
    assert estimate_left(rows) == 60.0 + 30.0 + 900.0 + 60.0 + 30.0  # seed 1: learned's seed 0, score's, none's


def test_progress_command_lists_every_quality_ablation(tmp_path: Path):
    result = CliRunner().invoke(app, ["progress", "--scale", "tiny", "--seeds", "3", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    quality = [s.name for s in load_registry().values() if s.kind == "quality"]
    assert all(f"  {name:20s}    3    0 of" in result.output for name in quality)


def test_progress_command_estimates_from_a_reference_directory(tmp_path: Path):
    spec = get_spec("denoise")
    write_record(tmp_path / "ref", _record("denoise", "learned", 0, 600.0, spec.resolve("learned", "tiny").to_dict()))
    args = ["progress", "--scale", "tiny", "--seeds", "0", "--results-dir", str(tmp_path / "anew")]
    assert "no estimate" in CliRunner().invoke(app, args).output
    result = CliRunner().invoke(app, [*args, "--estimate-from", str(tmp_path / "ref")])
    rows = sum(len(s.variants) for s in load_registry().values() if s.kind == "quality")
    # learned's 600 s for every row of every table: its own, then the reference's median for the rest
    assert result.exit_code == 0 and f"0 of {rows} rows recorded, 0.0 min spent; about {rows * 10} min of job time " \
        "left" in result.output


def test_only_the_small_scale_names_make_reproduce_small():
    rows = [Row("denoise", "learned", 0, 60.0), Row("denoise", "score", 0, None)]
    assert "about 1 min of job time left (rough: from recorded wall times; `make reproduce-small` runs two jobs" \
        in format_progress(rows, "small")
    assert format_progress(rows, "tiny").endswith("about 1 min of job time left (rough: from recorded wall times)\n")


def test_run_prints_its_plan_then_a_running_count(tmp_path: Path, monkeypatch, capsys):
    """Before its first variant, `run` says how many it will run and about how long they take (the recorded wall
    times, as `progress` estimates); then [k/N] as each starts. Records on stdout alone."""
    from biflow_bench import runner
    from test_cli import invoke

    spec = get_spec("denoise")
    for variant, wall in (("learned", 600.0), ("score", 120.0)):
        write_record(tmp_path, _record("denoise", variant, 0, wall, spec.resolve(variant, "tiny").to_dict()))
    monkeypatch.setattr(runner, "run_variant", lambda spec, name, *_: tmp_path / f"{name}.json")
    code, out, err = invoke(["run", "denoise", "--results-dir", str(tmp_path)], monkeypatch, capsys)
    recorded = [next(tmp_path.glob(f"tiny/denoise/{v}__seed0*.json")) for v in ("learned", "score")]
    assert code == 0 and out.split() == [str(p) for p in (*recorded, tmp_path / "none.json")]
    lines = err.splitlines()
    # none at the median of the recorded rows, 360 s
    assert lines[0] == ("denoise at scale tiny, seed 0: 1 of 3 variants to run, 2 recorded; about 6 min (rough: "
                        "from recorded wall times)")
    assert [line for line in lines if line.startswith("[") and line[1].isdigit()] == [
        "[1/3] denoise/learned", "[2/3] denoise/score", "[3/3] denoise/none"]
    # --force runs the recorded ones again, each in its own time; at another seed, in its seed 0's time
    for seed in (0, 3):
        opts = runner.RunOptions(results_dir=tmp_path, force=seed == 0)
        assert run_plan(spec, ["learned", "none"], "tiny", seed, opts).endswith(
            "2 of 2 variants to run, 0 recorded; about 16 min (rough: from recorded wall times)")
    assert run_plan(spec, ["none"], "tiny", 0, runner.RunOptions(results_dir=tmp_path / "new")).endswith(
        "1 of 1 variants to run, 0 recorded; nothing recorded at scale tiny to estimate their time from")

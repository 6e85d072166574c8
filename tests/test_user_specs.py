"""Your own ablations (docs/your-own-ablation.md): specs outside the package, named by BIFLOW_SPECS or --specs, join
the built-in ones, are checked like them, and run and report like them. The specs are the walk-through's own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from biflow_bench.ablations import default_spec_dir, load_registry
from test_cli import FAST, invoke

DOC = Path(__file__).resolve().parents[1] / "docs" / "your-own-ablation.md"
HEAD = 'name = "mine"\nversion = 1\ntitle = "Mine"\n'


@pytest.fixture
def specs(tmp_path, monkeypatch) -> Path:
    """The walk-through's TOML blocks, written where their first-line comment says, and named by BIFLOW_SPECS."""
    blocks = re.findall(r"```toml\n# (\S+\.toml)\n(.*?)```", DOC.read_text(), re.S)
    assert [name for name, _ in blocks] == ["my-ablations/denoise-plus.toml", "my-ablations/noise-sigma.toml"]
    for name, text in blocks:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setenv("BIFLOW_SPECS", str(tmp_path / "my-ablations"))
    return tmp_path / "my-ablations"


def test_user_tables_join_the_registry(specs):
    registry = load_registry()
    denoise, plus, sigma = registry["denoise"], registry["denoise-plus"], registry["noise-sigma"]
    assert list(registry)[-2:] == ["denoise-plus", "noise-sigma"] and {"main", "speed"} <= set(registry)
    # an included paper table gives its rows (paper numbers and labels too) and its paper_table; yours follow
    assert list(plus.variants) == [*denoise.variants, "learned-lpips"] and plus.paper_table == denoise.paper_table
    assert plus.variants["score"] == denoise.variants["score"] and plus.variants["learned-lpips"].paper == {}
    assert plus.resolve("none", "small") == denoise.resolve("none", "small")
    assert plus.resolve("learned-lpips", "tiny").stage2.metric == "mse+lpips"
    # a table of its own: _base.toml found among the built-in specs, no paper numbers
    assert sigma.paper_table == "" and all(not v.paper for v in sigma.variants.values())
    assert [sigma.resolve(v, "small").stage1.noise_sigma for v in sigma.variants] == [0.025, 0.05, 0.1]
    assert sigma.resolve("low", "tiny").backward == denoise.resolve("learned", "tiny").backward
    # the report's overall tally counts the paper's tables alone: yours may repeat a paper table's pairs
    assert denoise.builtin and registry["main"].builtin and not plus.builtin and not sigma.builtin


def test_list_shows_your_tables_with_their_files(specs, monkeypatch, capsys):
    code, out, err = invoke(["list"], monkeypatch, capsys)
    assert code == 0, err
    assert f"noise-sigma (v1, quality): F's training noise, with learned denoising  [{specs / 'noise-sigma.toml'}]" \
        in out.splitlines()
    assert re.search(r"^  learned-lpips +Learned denoising, G trained with MSE \+ LPIPS$", out, re.M)
    assert "denoise (v2, quality): Denoising mode -- BiFlow Table 3a" in out and "[/" not in out.split("denoise-plus")[0]
    # --specs names a file (or folder) for one command, ahead of BIFLOW_SPECS
    monkeypatch.setenv("BIFLOW_SPECS", "")
    code, out, _ = invoke(["--specs", str(specs / "noise-sigma.toml"), "list"], monkeypatch, capsys)
    assert code == 0 and "noise-sigma (v1" in out and "denoise-plus" not in out


def test_user_table_runs_beside_the_paper_table_and_reports(specs, tmp_path, monkeypatch, capsys):
    """Your row is trained; the paper's row, recorded by its own table at the same config and seed, is taken over;
    `report` with the same BIFLOW_SPECS labels your table from its spec."""
    results = tmp_path / "results"
    fast = [*FAST, "--set", "stage2.perceptual_batch=4", "--results-dir", str(results)]
    code, _, err = invoke(["run", "denoise", "--variants", "learned", *fast], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = invoke(["run", "denoise-plus", "--variants", "learned,learned-lpips", *fast], monkeypatch, capsys)
    assert code == 0, err
    learned, lpips = (json.loads(Path(p).read_text()) for p in out.split())
    assert learned["measured_in"].startswith("denoise/learned") and "measured_in" not in lpips
    assert lpips["train"]["stage1"]["cached"] and lpips["config"]["stage2"]["metric"] == "mse+lpips"
    assert learned["paper"] == {"fid": 31.88, "nfe": 1, "table": "BiFlow Table 3a: denoising (BiFlow-B/2, FID-50K "
                                "w/o CFG)"} and lpips["paper"]["table"] == learned["paper"]["table"]
    for env, title in ((str(specs), "# Denoising mode, and learned denoising with + LPIPS: scale `tiny`"),
                       ("", "# denoise-plus: scale `tiny`")):  # without the spec: from the records alone
        monkeypatch.setenv("BIFLOW_SPECS", env)
        out_dir = tmp_path / f"report{len(env)}"
        code, _, err = invoke(["report", "--results-dir", str(results), "--scales", "tiny", "--out", str(out_dir)],
                              monkeypatch, capsys)
        assert code == 0, err
        page = (out_dir / "tiny" / "denoise-plus.md").read_text()
        assert page.startswith(title) and ("| No denoising | — | 0 | — | 100.51 |" in page) == bool(env), page


def _write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


ERRORS = {  # files of a user's folder -> what the one line says ({me}: the folder, {builtin}: ablations/)
    "same name as a built-in": ({"d.toml": 'name = "denoise"\nversion = 1\ntitle = "t"\n[variants.a]'},
                                "{me}/d.toml: duplicate ablation name 'denoise' (also in {builtin}/denoise.toml)"),
    "same name twice": ({"a.toml": HEAD + "[variants.a]", "b.toml": HEAD + "[variants.b]"},
                        "{me}/b.toml: duplicate ablation name 'mine' (also in {me}/a.toml)"),
    "unknown key": ({"m.toml": HEAD + 'titel = "x"\n[variants.a]'}, "unknown key(s) titel; valid: at_scale, baseline, "),
    "unknown key, did you mean": ({"m.toml": HEAD + 'titel = "x"\n[variants.a]'}, "; did you mean 'title'?"),
    "unknown variant key": ({"m.toml": HEAD + '[variants.a]\nlable = "x"'},
                            "{me}/m.toml: [variants.a]: unknown key(s) lable; valid: label, paper, set; did you mean "
                            "'label'?"),
    "unknown paper key": ({"m.toml": HEAD + "[variants.a]\npaper = { fdi = 3.0 }"},
                          "[variants.a].paper: unknown key(s) fdi; valid: fid, is, ms_per_image, nfe, note, order, "
                          "params_m, speedup; did you mean 'fid'?"),
    "redefines an included variant": ({"m.toml": HEAD + 'include = "denoise.toml"\n[variants.learned]'},
                                      "{me}/m.toml: [variants.learned]: variant 'learned' is already defined in "
                                      "{builtin}/denoise.toml (included); give yours another name"),
    "include cycle": ({"m.toml": HEAD + 'include = "_x.toml"\n[variants.a]', "_x.toml": 'include = "m.toml"'},
                      "{me}/_x.toml: include {me}/m.toml is a cycle (m.toml -> _x.toml -> m.toml)"),
    "include not found": ({"m.toml": HEAD + 'include = "_nope.toml"\n[variants.a]'},
                          "{me}/m.toml: include {me}/_nope.toml: file not found (nor among the built-in specs, "
                          "{builtin})"),
    "include not a name": ({"m.toml": HEAD + "include = 3\n[variants.a]"}, "{me}/m.toml: 'include' must name a spec"),
    "not TOML": ({"m.toml": HEAD + "[variants.a"}, "{me}/m.toml: not valid TOML"),
    "bad override": ({"m.toml": HEAD + '[variants.a]\nset = { "stage2.steps" = "many" }'},
                     "{me}/m.toml [variants.a]: stage2.steps = 'many' has the wrong type"),
    "no such folder": (None, "BIFLOW_SPECS (or --specs): {me}: no such spec file or folder"),
}


@pytest.mark.parametrize("case", list(ERRORS))
@pytest.mark.parametrize("command", ["list", "run"])
def test_a_broken_user_spec_is_one_line_and_exit_2(case, command, tmp_path, monkeypatch, capsys):
    files, message = ERRORS[case]
    me = tmp_path / "mine"
    if files is not None:
        _write(me, files)
    monkeypatch.setenv("BIFLOW_SPECS", str(me))
    args = ["run", "denoise", *FAST, "--results-dir", str(tmp_path / "r")] if command == "run" else ["list"]
    code, out, err = invoke(args, monkeypatch, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert message.format(me=me, builtin=default_spec_dir()) in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()  # nothing done


def test_report_renders_despite_a_broken_user_spec(tmp_path, monkeypatch, capsys):
    from biflow_bench.results import write_record
    from report_records import make_record

    _write(tmp_path / "mine", {"m.toml": HEAD + "[variants.a"})
    monkeypatch.setenv("BIFLOW_SPECS", str(tmp_path / "mine"))
    write_record(tmp_path / "results", make_record("denoise", "learned", 0, 10.0, label="learned"))
    code, _, err = invoke(["report", "--results-dir", str(tmp_path / "results"), "--scales", "tiny", "--out",
                           str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 0, err
    readme = (tmp_path / "out" / "README.md").read_text()
    assert f"The ablation specs could not be loaded ({tmp_path / 'mine' / 'm.toml'}: not valid TOML" in readme

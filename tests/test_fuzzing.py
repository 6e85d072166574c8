"""Fuzzing: mutated spec files raise a one-line SpecError naming the file, or load (with the defects the fuzzer once
found as fixed cases); random argument lists run the real commands and exit 0 or 2, never with a traceback."""

from __future__ import annotations

import collections
import copy
import json
import random
import shutil
import sys
from pathlib import Path

import pytest

from biflow_bench import cli
from biflow_bench.ablations import SpecError, load_spec
from cli_helpers import FAST

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------------------------
# spec files


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def _toml(doc: dict) -> str:
    """Top-level scalars, then each table (values inline), enough for the spec format."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            if k == "variants" and all(isinstance(x, dict) for x in v.values()):
                for name, body in v.items():
                    lines.append(f"[variants.{json.dumps(name)}]")
                    lines += [f"{json.dumps(kk)} = {_toml_value(vv)}" for kk, vv in body.items()]
            else:
                lines.append(f"[{json.dumps(k)}]")
                lines += [f"{json.dumps(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


VALID_SPEC = {
    "name": "fuzz", "version": 1, "title": "Fuzzed", "paper_table": "none", "include": "_base.toml",
    "baseline": {"stage2.metric": "mse", "sample.cfg_scale": 0.0},
    "variants": {"a": {"label": "A", "paper": {"fid": 1.5, "nfe": 1}, "set": {"backward.denoise": "learned"}},
                 "b": {"set": {"backward.denoise": "none", "stage1.steps": 10, "flow.clip": "none"}}},
}
ODD_VALUES = ["", " ", ".", "..", "none", 0, -1, 2**63 - 1, 1.5, float("nan"), float("inf"), True, [], [1, "a"],
              {}, {"x": 1}, {"stage1": {"steps": "x"}}, "stage1.steps", "\u00e9\u4e2d", "a/b", "../_base.toml"]
ODD_KEYS = ["", "x", "stage1", "stage1.", ".steps", "stage1.steps.x", "stage9.steps", "flow.nope", "inverse",
            "scale", "version", "VARIANTS", "include", "set", "paper", "label", "kind", "\u00e9"]


def _paths(doc, prefix=()):
    """Every (path to a key) in the nested document."""
    for k, v in doc.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


def _mutate_doc(rng: random.Random) -> str:
    doc = copy.deepcopy(VALID_SPEC)
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(doc))
        if not paths:
            break
        *parent_path, key = rng.choice(paths)
        parent = doc
        for p in parent_path:
            parent = parent[p]
        op = rng.choice(["value", "delete", "add", "rename"])
        if op == "value":
            parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif op == "delete":
            del parent[key]
        elif op == "add":
            parent[rng.choice(ODD_KEYS)] = copy.deepcopy(rng.choice(ODD_VALUES + ["mse", 3]))
        else:
            parent[rng.choice(ODD_KEYS)] = parent.pop(key)
    return _toml(doc)


def _mutate_text(rng: random.Random) -> bytes:
    data = bytearray(_toml(VALID_SPEC).encode())
    op = rng.choice(["truncate", "delete", "insert", "flip", "random", "swap-lines", "duplicate-line"])
    i = rng.randrange(len(data))
    if op == "truncate":
        return bytes(data[:i])
    if op == "delete":
        del data[i:i + rng.randint(1, 20)]
    elif op == "insert":
        data[i:i] = bytes(rng.choice(b'[]{}="\'.,#\n\\ \x00\xff\xfeabc123') for _ in range(rng.randint(1, 8)))
    elif op == "flip":
        data[i] ^= 1 << rng.randrange(8)
    elif op == "random":
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    else:
        lines = bytes(data).split(b"\n")
        a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
        if op == "swap-lines":
            lines[a], lines[b] = lines[b], lines[a]
        else:
            lines.insert(b, lines[a])
        return b"\n".join(lines)
    return bytes(data)


# Defects the fuzzer once found: each must now be a one-line SpecError that names the spec file to fix.
SPEC_DEFECTS = {
    "include-empty": 'include = ""\n[variants.a]',  # was IsADirectoryError
    "include-dot": 'include = "."\n[variants.a]',
    "dunder-section": '[variants.a]\nset = { "__class__.steps" = 1 }',  # was TypeError
    "post-init-unnamed": '[variants.a]\nset = { "stage2.metric" = "bogus" }',  # RunConfig.__post_init__'s check
    "include-unnamed": 'include = "missing.toml"\n[variants.a]',  # must name the including spec too
    "zero-checkpoint-every": '[variants.a]\nset = { "stage1.checkpoint_every" = 0 }',  # was ZeroDivisionError
    "variant-path": '[variants."../a"]',  # variant names become file names
}


@pytest.mark.parametrize("case", list(SPEC_DEFECTS))
def test_spec_loader_defects_are_spec_errors_naming_the_file(case, tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(f'name = "x"\nversion = 1\ntitle = "t"\npaper_table = "p"\n{SPEC_DEFECTS[case]}\n')
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_fuzzed_specs_raise_spec_error_or_load(tmp_path):
    shutil.copy(ROOT / "ablations" / "_base.toml", tmp_path / "_base.toml")
    rng = random.Random(20260523)
    outcomes = {"loaded": 0, "SpecError": 0}
    for i in range(300):
        path = tmp_path / f"spec{i}.toml"
        data = _mutate_doc(rng).encode() if i % 2 else _mutate_text(rng)
        path.write_bytes(data)
        try:
            load_spec(path)
            outcomes["loaded"] += 1
        except SpecError as e:
            assert "\n" not in str(e), (data, str(e))
            outcomes["SpecError"] += 1
        except Exception as e:
            raise AssertionError(f"case {i}: {type(e).__name__}: {e}\n{data!r}") from e
    assert outcomes["loaded"] >= 20 and outcomes["SpecError"] >= 150, outcomes  # both paths were exercised


# ----------------------------------------------------------------------------------------------------------------------
# argument lists

# FAST (cli_helpers) is prepended to every fuzzed command that trains, samples or evaluates, FAST_SPEED to every
# `bench speed`, so the real command runs in a second or two; the fuzzed options come after and win where they name
# the same option or key.
FAST_SPEED = ["--batch-sizes", "1", "--repeats", "1"]


def _random_argv(rng: random.Random, tmp: Path, one_change: bool = False) -> list[str]:
    """A command with mostly its own options (random values, some malformed), sometimes a foreign option or token;
    `one_change`: a valid command (its first positional choices) with a single option set to a random value, so
    that each bad value meets the code on its own rather than behind another refusal."""
    values = {
        "--scale": ["tiny", "small", "huge", ""], "--seed": ["0", "3", "-1", "x", "1e3", "99999999999999999999"],
        "--variants": ["learned", "learned,,score", ",", "bogus", "learned,bogus", "../x", "exact,naive"],
        "--set": ["stage1.steps=1", "stage1.steps=x", "oops", "=1", "stage9.x=1", "flow.clip=none", "a.b.c=1",
                  "sample.cfg_scale=inf", 'stage2.metric="mse+lpips"', "inverse=exact", "stage2.metric=[1",
                  "stage2.perceptual_weights=random", "eval.extractor=nope", "backward.denoise=score"],
        "--results-dir": [str(tmp / "r"), str(tmp / "file" / "r"), "/proc/no/such", ""],
        "--out": [str(tmp / "o.png"), str(tmp / "reports"), str(tmp / "file" / "x"), "/proc/no/such"],
        "--batch-sizes": ["1,2", "x", "", "0", "1,,2"], "--device": ["cpu", "tpu", "cuda"],
        "--num": ["0", "-5", "3", "x"], "--repeats": ["0", "-1", "2"], "--what": ["sample", "train", "nope"],
        "--data-dir": [str(tmp / "none"), str(tmp / "file")],
    }
    step_opts = ["--scale", "--seed", "--data-dir", "--set"]
    commands = {  # name: (positionals, options, flags)
        "list": ([], [], []),
        "run": ([["denoise", "main", "speed", "nope", "", "norm-control"]],
                ["--variants", "--scale", "--seed", "--results-dir", "--data-dir", "--set"], ["--force"]),
        "report": ([], ["--results-dir", "--out"], []),
        "train": ([["denoise", "nope"], ["learned", "exact", "x"]], step_opts, []),
        "sample": ([["main", "nope"], ["biflow", "learned"]], [*step_opts, "--num", "--out"], []),
        "eval": ([["inverse-strategy"], ["exact", "naive", ""]], step_opts, []),
        "bench speed": ([], ["--scale", "--batch-sizes", "--device", "--what", "--repeats", "--results-dir"],
                        ["--json"]),
    }
    if one_change:
        name = rng.choice([c for c in commands if commands[c][1]])
        positionals, options, _ = commands[name]
        opt = rng.choice(options)
        return [*name.split(), *(choices[0] for choices in positionals), opt, rng.choice(values[opt])]
    name = rng.choice([*commands, "bogus", ""])
    argv = name.split() if name else []
    positionals, options, flags = commands.get(name, ([], list(values), []))
    for choices in positionals:
        if rng.random() < 0.9:
            argv.append(rng.choice(choices))
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.08:
            argv.append(rng.choice(["--help", "--bogus", "-x", "--", "d\u00e9noise", *flags, *flags]))
        elif r < 0.15:
            argv.append(rng.choice(list(values)))  # an option of another command, or one without its value
        elif options:
            opt = rng.choice(options)
            argv += [opt, rng.choice(values[opt])]
    return argv


@pytest.mark.slow  # random commands that run for real: trains, samples and evaluates tiny runs end to end
def test_fuzzed_argument_lists_exit_0_or_2(tmp_path, monkeypatch, capsys):
    """Random argument lists run the real commands (tiny scale, FAST schedules): each ends in exit 0, or in exit 2
    with a message, never in a traceback."""
    import functools

    from biflow_bench import paths
    from biflow_bench.speed import benchmark as bench

    monkeypatch.setattr(paths, "project_root", lambda: tmp_path)  # default results, reports, samples: not the checkout's
    # `run speed` has no options to shorten it: the real benchmark at one batch size and one timed call
    monkeypatch.setattr(bench, "run_speed_bench", functools.partial(bench.run_speed_bench, batch_sizes=(1,),
                                                                    repeats=1, warmup=0))
    monkeypatch.setenv("BIFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    rng = random.Random(7)
    codes: dict[int, int] = {}
    ran: collections.Counter = collections.Counter()
    for i in range(100):
        argv = _random_argv(rng, tmp_path, one_change=i % 2 == 1)
        if argv[:1] in (["run"], ["train"], ["sample"], ["eval"]):
            argv = [argv[0], *FAST, *argv[1:]]
        elif argv[:2] == ["bench", "speed"]:
            argv = [*argv[:2], *FAST_SPEED, *argv[2:]]
        monkeypatch.setattr(sys, "argv", ["biflow-bench", *argv])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # noqa: BLE001 -- anything else would reach the user as a traceback
            raise AssertionError(f"case {i} {argv}: {type(e).__name__}: {e}") from e
        out, err = capsys.readouterr()
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:  # a message, or the help (no_args_is_help prints it to stdout and exits 2)
            assert err.strip() or "Usage:" in out, argv
        codes[code] = codes.get(code, 0) + 1
        ran[argv[0] if argv else ""] += code == 0
    assert codes.get(0, 0) >= 10 and codes.get(2, 0) >= 20, (codes, ran)  # both outcomes were exercised
    assert sum(ran[c] for c in ("run", "train", "sample", "eval")) >= 4, ran  # real work, not only refusals

"""The command line in-process: `invoke` (exit code, stdout, stderr), the one-line error every user mistake must be,
and FAST, the short schedules that make a command that trains, samples or evaluates run in a second or two."""

from __future__ import annotations

import sys

import pytest

from biflow_bench import cli

FAST = ["--set", "stage1.steps=2", "--set", "stage2.steps=2", "--set", "sample.num_samples=20",
        "--set", "eval.num_real=20", "--set", "eval.nll_samples=20", "--set", "eval.resize=32"]


def invoke(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """The CLI entry point in-process: (exit code, stdout, stderr); any other exception escapes (a traceback)."""
    monkeypatch.setattr(sys, "argv", ["biflow-bench", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    code = e.value.code
    return (code if isinstance(code, int) else (0 if code is None else 1)), out.out, out.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]

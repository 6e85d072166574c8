"""Cell and table formatting shared by every report page: numbers (fixed decimals, significant digits for tiny
ones), mean ± noise cells, Markdown and LaTeX tables, relative links.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd


DASH = "—"


def fmt_num(x: Any, digits: int = 2) -> str:
    """Fixed decimals for ordinary magnitudes, significant digits for tiny ones (a 0.004 std is not "0.00")."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    x = float(x)
    if not math.isfinite(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and abs(x) < 0.1:
        return f"{x:.{digits + 1}g}"
    return f"{x:.{digits}f}"


def fmt_count(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    x = float(x)
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def fmt_text(x: Any) -> str:
    """A string cell; pandas turns missing strings into NaN, which is truthy, so `x or DASH` is not enough."""
    return x if isinstance(x, str) and x else DASH


def fmt_rank(x: Any) -> str:
    return DASH if x is None or pd.isna(x) else str(int(x))


def fmt_sig(x: Any, digits: int = 3) -> str:
    """`digits` significant digits, never rounding an integer part to zeros (54.7 ms, 0.0259, 1056)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return fmt_num(x)
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def noise_decimals(std: float) -> int:
    """Decimal places that show a ± to one significant digit, two where one would misstate it by more than a fifth
    (1.27 -> 1.3, 7.39 -> 7, 0.0117 -> 0.01); never fewer than none (70, not 7e1)."""
    exp = math.floor(math.log10(std))
    sig = 1 if abs(round(std, -exp) - std) <= 0.2 * std else 2
    return max(0, sig - 1 - exp)


def fmt_ours(mean: float, std: float, tex: bool = False) -> str:
    """mean ± std, both to the decimal place the std supports ("0.81 ± 0.01", "425 ± 7"); no std: the mean alone."""
    if math.isnan(mean):
        return DASH
    pm = r" $\pm$ " if tex else " ± "
    if math.isnan(std):
        return fmt_num(mean)
    if std <= 0 or not math.isfinite(std) or not math.isfinite(mean):
        return fmt_num(mean) + pm + fmt_num(std)
    d = noise_decimals(std)
    return f"{mean:.{d}f}{pm}{std:.{d}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A GitHub pipe table; `align` has one of l/r per column. Hand-written so cells are never re-parsed as
    numbers (tabulate would turn "12.30" into "12.3")."""
    esc = [[str(c).replace("|", r"\|") for c in r] for r in [header, *rows]]
    sep = [":--" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(r) + " |" for r in [esc[0], sep, *esc[1:]]]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: Any) -> str:
    out = "".join(_TEX.get(c, c) for c in str(s))
    for uni, tex in (("±", r"$\pm$"), ("—", "--"), ("×", r"$\times$"), ("↓", r"$\downarrow$"), ("↑", r"$\uparrow$"),
                     ("τ", r"$\tau$")):
        out = out.replace(uni, tex)
    return out


def tex_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str, caption: str, label: str,
               raw_cols: Sequence[int] = ()) -> str:
    """booktabs table via pandas (jinja2 ships with torch); cells are escaped here, except columns already TeX."""
    body = [[c if i in raw_cols else tex_escape(c) for i, c in enumerate(r)] for r in rows]
    df = pd.DataFrame(body, columns=[tex_escape(h) for h in header])
    return df.to_latex(index=False, escape=False, column_format=align, caption=tex_escape(caption), label=label)


def rel_link(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def first_value(values: pd.Series) -> Any:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return vals[0] if vals else None


def float_or_nan(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def notes_block(notes: Sequence[str]) -> str:
    return "".join(f"- {n}\n" for n in notes)


def dedup(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def rel_or_abs(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)

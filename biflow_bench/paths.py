"""Where biflow-bench writes when no path is given: inside the checkout it runs from (the folder holding
pyproject.toml and ablations/, found from this package's location), whatever the working directory, so every
command finds the same cache and records; installed outside a checkout, in the user's folders (XDG base directories).
A path given by an option or by BIFLOW_CACHE is taken as given (relative to the working directory).

                in a checkout          installed elsewhere
    cache       <root>/runs/cache      $XDG_CACHE_HOME/biflow-bench         (~/.cache/biflow-bench)
    results     <root>/results         $XDG_DATA_HOME/biflow-bench/results  (~/.local/share/biflow-bench/results)
    samples     <root>/runs/samples    $XDG_DATA_HOME/biflow-bench/samples
    reports     <root>/reports         $XDG_DATA_HOME/biflow-bench/reports  (the committed scales)
                <root>/runs/reports    $XDG_DATA_HOME/biflow-bench/runs-reports  (with a LOCAL_SCALES scale)

runs/ and the tiny scales' results/ are git-ignored: the defaults leave the tracked tree clean.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "biflow-bench"


def find_checkout() -> Path | None:
    """The checkout this package is imported from, or None when it is installed elsewhere (site-packages)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "ablations").is_dir() else None


project_root = find_checkout  # what the defaults below resolve against (the tests point it at a temporary folder)


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback  # the spec ignores relative ones


def default_cache_dir() -> Path:
    """Trained models and reference statistics: BIFLOW_CACHE, else runs/cache of the checkout, else the user cache."""
    if env := os.environ.get("BIFLOW_CACHE"):
        return Path(env)
    root = project_root()
    return root / "runs" / "cache" if root else _xdg("XDG_CACHE_HOME", ".cache") / APP


def default_results_dir() -> Path:
    """Where records are written and read when --results-dir is not given."""
    root = project_root()
    return root / "results" if root else _xdg("XDG_DATA_HOME", ".local/share") / APP / "results"


def default_samples_dir() -> Path:
    """Where `sample` writes its grid when --out is not given."""
    root = project_root()
    return root / "runs" / "samples" if root else _xdg("XDG_DATA_HOME", ".local/share") / APP / "samples"


# The smoke-test scales, whose records are git-ignored (results/tiny/, results/tiny-latent/): `report` of the
# checkout's own results renders them only when asked, and then into runs/reports by default, so the committed report
# stays as committed
LOCAL_SCALES = ("tiny", "tiny-latent")


def is_checkout_results(path: Path) -> bool:
    """Whether `path` is results/ of the checkout, the one directory whose LOCAL_SCALES git ignores."""
    root = project_root()
    return root is not None and path.resolve() == (root / "results").resolve()


def default_reports_dir(local: bool) -> Path:
    """Where `report` writes when --out is not given: reports/ of the checkout, or runs/reports with a local scale."""
    root = project_root()
    if root:
        return root / "runs" / "reports" if local else root / "reports"
    return _xdg("XDG_DATA_HOME", ".local/share") / APP / ("runs-reports" if local else "reports")

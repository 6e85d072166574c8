"""The report's split of one scale's records into each variant's default config (a table row, seeds averaged
within one config hash) and every other config, shown apart under a label of the dotted keys that differ."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from ..ablations import AblationSpec
from ..identity import config_id, config_overrides, overrides_label


def default_config(registry: Mapping[str, AblationSpec] | None, ablation: str, variant: str,
                   scale: str) -> dict[str, Any] | None:
    """The config a run of the variant would record today, or None where the specs do not know it."""
    spec = (registry or {}).get(ablation)
    try:
        return spec.resolve(variant, scale).to_dict() if spec and variant in spec.variants else None
    except ValueError:  # ConfigError: a scale the spec does not resolve
        return None


SAME_SETTINGS = "an earlier run of the same settings"  # a superseded record that differs in no setting it reads


def difference_label(config: Mapping[str, Any], micro_batch: Any, reference: Mapping[str, Any]) -> str:
    """How a record's config differs from `reference` (today's default, else its row's config), as dotted keys."""
    overrides = config_overrides(config, reference)
    if isinstance(micro_batch, (int, float)) and not isinstance(micro_batch, bool) and micro_batch == micro_batch:
        overrides["micro_batch"] = int(micro_batch)  # a frame column with gaps holds it as a float (NaN: none)
    return overrides_label(overrides) or SAME_SETTINGS


def split_configs(df: pd.DataFrame, registry: Mapping[str, AblationSpec] | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records of each variant's default config, records of every other config) of one scale (the records frame of
    report/frames.results_frame).

    A variant's table row averages seeds of one config hash only: of the records without overrides (archived ones
    never), those of the config a run would record today (the `registry`'s spec), else, when they hold one config
    only (today's not yet run), that one, else the newest spec version's (then the most seeds). The rest is shown
    apart, labelled by the dotted keys whose values differ from today's default (else from the row's config)."""
    df = df.assign(overrides=df["overrides"].fillna("") if "overrides" in df else "")
    archived = df["archived"].fillna(False).astype(bool) if "archived" in df else pd.Series(False, index=df.index)
    keep = pd.Series(False, index=df.index)
    labels = df["overrides"].copy()
    for (ablation, variant), g in df.groupby(["ablation", "variant"], sort=True):  # a variant name recurs by table
        reference = default_config(registry, ablation, variant, g["scale"].iloc[0])
        current = config_id(reference) if reference is not None else None
        candidates = g[~archived[g.index] & (g["overrides"] == "")]
        if len(candidates) and current not in set(candidates["config_hash"]):
            ranked = sorted(candidates.groupby("config_hash"), key=lambda kv: (-_version(kv[1]), -len(kv[1]), kv[0]))
            current = ranked[0][0]
        row = candidates[candidates["config_hash"] == current]
        keep[row.index] = True
        if reference is None and len(row) and "config" in df:
            reference = row["config"].iloc[0]
        for i in g.index.difference(row.index):
            config = df.at[i, "config"] if "config" in df else None
            micro = df.at[i, "micro_batch"] if "micro_batch" in df else None
            if reference is not None and isinstance(config, dict):
                labels[i] = difference_label(config, micro, reference)
    df = df.assign(overrides=labels)
    return df[keep], df[~keep]


def _version(g: pd.DataFrame) -> int:
    versions = [int(v) for v in g["spec_version"] if isinstance(v, (int, float)) and v == v]  # v == v: not NaN
    return max(versions, default=0)

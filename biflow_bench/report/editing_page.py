"""The editing table's page (records of kind "editing", edit_table.py): per variant, inpainting per mask and decoder
(kept-region fidelity, realism with KID, distance to the source), class edits, round trips and edit speed, seeds
averaged, with the grids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .format import DASH, fmt_num, md_table, rel_link
from .writer import ReportWriter


def _mean(values: Sequence[Any]) -> float:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and np.isfinite(v)]
    return float(np.mean(nums)) if nums else float("nan")


def _rows(records: Sequence[dict[str, Any]], edit: str) -> dict[tuple[str, str, bool], list[dict[str, Any]]]:
    out: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    for rec in records:
        for row in rec["rows"]:
            if row["edit"] == edit:
                out.setdefault((row["mask"], row["decoder"], row["pasted"]), []).append(row)
    return out


def _metric(rows: list[dict[str, Any]], key: str) -> float:
    return _mean([r["metrics"].get(key) for r in rows])


def editing_page(w: ReportWriter, results_dir, scale: str, records: Sequence[dict[str, Any]], title: str,
                 description: str) -> str:
    """Write <scale>/editing.md; returns its path relative to the report."""
    md = [f"# {title}: scale `{scale}`\n", " ".join(description.split()) + "\n",
          "Kept PSNR: the decoder's output on the kept pixels against the source (dB, [-1, 1] images), before any "
          "paste: how much of the region kept in noise space survives decoding. Realism against the held-out "
          "reference images: fd_effnet and fd_cls (biased at this n), KID ± its std over subsets. LPIPS: the "
          "EfficientNet-Lite1 stand-in's distance to the source. Seeds averaged; n source images per seed.\n"]
    for variant in dict.fromkeys(r["variant"] for r in records):
        recs = [r for r in records if r["variant"] == variant]
        seeds = ", ".join(str(r["seed"]) for r in recs)
        md.append(f"## {recs[0].get('label') or variant} (`{variant}`; seeds {seeds}; n = {recs[0]['n']})\n")
        cells = []
        for (mask, decoder, pasted), rows in _rows(recs, "inpaint").items():
            cells.append([mask, decoder + (" + paste" if pasted else ""),
                          fmt_num(_mean([r["kept_fraction"] for r in rows]), 2),
                          DASH if pasted else fmt_num(_mean([r["kept_psnr"] for r in rows]), 1),
                          fmt_num(_metric(rows, "fd_effnet"), 1), fmt_num(_metric(rows, "fd_cls"), 1),
                          f"{fmt_num(1e3 * _metric(rows, 'kid_effnet'), 1)} ± {fmt_num(1e3 * _metric(rows, 'kid_effnet_std'), 1)}",
                          fmt_num(_metric(rows, "acc_cls"), 3), fmt_num(_metric(rows, "lpips_to_source"), 2)])
        md.append("### Inpainting (eq. 6)\n\n" + md_table(
            ["Mask", "Decoder", "Kept share", "Kept PSNR (dB) ↑", "fd_effnet ↓", "fd_cls ↓", "KID x10³ ↓", "acc_cls ↑",
             "LPIPS to source"], cells, "llrrrrrrr"))
        classes = _rows(recs, "class")
        if classes:
            md.append("### Class edits (z = F(x | c), decoded with every other class)\n\n" + md_table(
                ["Decoder", "acc_cls (target class) ↑", "PSNR to source (dB)", "fd_effnet ↓", "fd_cls ↓", "KID x10³ ↓",
                 "LPIPS to source"],
                [[decoder, fmt_num(_metric(rows, "acc_cls"), 3), fmt_num(_mean([r["kept_psnr"] for r in rows]), 1),
                  fmt_num(_metric(rows, "fd_effnet"), 1),
                  fmt_num(_metric(rows, "fd_cls"), 1), fmt_num(1e3 * _metric(rows, "kid_effnet"), 1),
                  fmt_num(_metric(rows, "lpips_to_source"), 2)] for (_, decoder, _), rows in classes.items()],
                "lrrrrrr"))
        trips = {k: _mean([r["round_trip"].get(k) for r in recs]) for k in recs[0]["round_trip"]}
        timing = {k: _mean([r["timing"].get(k) for r in recs]) for k in recs[0]["timing"]}
        md.append("### Round trips and speed\n\n"
                  + ", ".join(f"`{k}` {fmt_num(v, 4)}" for k, v in trips.items()) + " (mean squared error per value: "
                  "G(F(x)) against x, F(G(z)) against z, F's exact inverse against x).\n\n"
                  + "ms per edit (encode, compose, decode; timed inside the run, indicative): "
                  + ", ".join(f"{k.replace('_ms_batch', ' at batch ')} {fmt_num(v, 2)}" for k, v in timing.items())
                  + ".\n")
        for rec in recs:
            for name, png in rec.get("grids", {}).items():
                what = ("rows: per mask, the sources, the masked sources, then each decoder's completion"
                        if name == "inpaint" else "one row per source, column j edited to class j")
                md.append(f"- {name} grid, seed {rec['seed']} ({what}):\n\n"
                          f"  ![{name}]({rel_link(results_dir / scale / png, w.out_dir / scale)})\n")
    return w.text(f"{scale}/editing.md", "\n".join(md))

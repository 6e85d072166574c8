"""The report, the pipeline's last step (spec -> config -> train -> cache -> sample -> metrics -> record -> **report**):
Markdown, CSV and LaTeX tables and PNG figures regenerated from the result records alone.

    <out>/README.md                          on top, one line per scale over every table (stats.overall); then per
                                               scale: headline (`main`), each table's lead line and link, speed,
                                               skipped files
    <out>/<scale>/<ablation>.{md,csv,tex,png}  ours (mean ± noise) beside the paper's FID and the judged domain
                                               metrics, Kendall's tau, the table's reading (its COMMENTARY.md, checked
                                               against the records); real-data calibration rows on top
                                               (results/<scale>/calibration.json); ranks, precision / recall and
                                               confidence in a second table and the CSV
    <out>/<scale>/speed.{md,csv,tex,png}       ms per image and speed-up per sampler at each batch size timed
    <out>/<scale>/speed_quality.png            our metric against ms per image of the `main` variants (when speed
                                               records exist at that scale too), beside the paper's where known

Seeds are averaged only within one config hash (identity.py): each table row is a variant's default config; records
of other configs (--set overrides, a micro-batch, an older spec's default) are rows of their own under "Other
configurations", labelled by the keys whose values differ from today's default, and the report says what it
separated. Superseded records under results/archive/ are read only with `include_archive` (--include-archive).

Output is a pure function of the records (and the spec registry, for variant order and labels): no timestamps,
sorted iteration and fixed figure metadata, so regenerating an unchanged results directory is byte-identical.
Every file is written atomically; files a previous render wrote that this one no longer produces are removed
(only those listed in the previous render's manifest, never anything else in the output directory).

    stats.py    the statistics: a table's noise rule, Kendall's tau, the verdict on the paper's ordering
    tables.py   the tables as DataFrames (ablation, other configurations, headline, calibration and extra columns)
    figures.py  the figures as PNG bytes
    format.py   cell and table formatting (numbers, mean ± noise, Markdown, LaTeX, links)
    pages.py    one page per ablation table: its .md / .csv / .tex / .png
    reading.py  a table's reading (COMMENTARY.md) checked against its records
    bench_pages.py  the benchmark pages: speed, quality against training time, speed-up against sequence length
    render.py   `render_report`: every page of every scale and the index README
    writer.py   atomic writes under the output directory and the manifest-based stale-file sweep
    doc_tables.py  the tables of docs/ pages (docs/g-study.md) rendered from the records they quote
"""

"""The cohort's own outputs of ``dcepk batch``: one tidy statistics table (CSV and Parquet), the subjects'
states, a Markdown report with a figure, and the batch record; published together (``OutputSet``).

The table has one row per subject, session, method (``fit`` / ``network``), label and map: the core's
label statistics (``analysis.stats``: voxel counts by fit status, mean, SD, median, IQR, 5th and 95th
percentiles) of every map, uncertainties (``<p>_se`` of a fit, ``<p>_sd`` of a network) included. It is
gathered from the finished subjects' own ``statistics.csv``, so a resumed batch gives the whole cohort.
"""

import csv
import io
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..analysis.stats import stage_table
from ..core.output_files import OutputSet
from .batch_subject import STATISTICS_FILE

TABLE = "cohort_statistics"
BATCH_RECORD = "dcepk_batch.json"
SUBJECTS_TABLE = "subjects.csv"
REPORT = "report.md"
FIGURE = "report_distributions.png"
FIGURE_MAPS = ("Ktrans", "ve", "vp", "kep")
TEXT_COLUMNS = {"subject", "session", "method", "model", "segment", "map", "unit", "voxels"}
SUBJECT_COLUMNS = ("key", "subject", "session", "state", "reason", "seconds", "error", "log")
FINISHED = ("done", "up to date")


def _typed(column: str, text: str):
    if column in TEXT_COLUMNS:
        return text
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def read_statistics(path: Path) -> List[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [{column: _typed(column, text) for column, text in row.items()} for row in csv.DictReader(handle)]


def cohort_rows(out_dir: Path, specs, outcomes: List[dict]) -> List[dict]:
    """Every finished subject's statistics rows, in manifest order, on one set of columns."""
    finished = {o["key"] for o in outcomes if o["state"] in FINISHED}
    rows = []
    for spec in specs:
        if spec.key in finished:
            rows += read_statistics(out_dir / "subjects" / spec.folder / STATISTICS_FILE)
    columns = list(dict.fromkeys(column for row in rows for column in row))
    return [{column: row.get(column) for column in columns} for row in rows]


def write_cohort_outputs(out_dir: Path, specs, outcomes: List[dict], record: dict) -> List[Path]:
    rows = cohort_rows(out_dir, specs, outcomes)
    with OutputSet(overwrite=True) as outputs:
        if rows:
            stage_table(outputs, [{k: ("" if v is None else v) for k, v in row.items()} for row in rows],
                        out_dir / f"{TABLE}.csv")
            _stage_parquet(outputs, rows, out_dir / f"{TABLE}.parquet")
            _stage_figure(outputs, rows, out_dir / FIGURE)
        outputs.add_text(out_dir / SUBJECTS_TABLE, _subjects_csv(outcomes))
        outputs.add_text(out_dir / REPORT, markdown_report(rows, outcomes, record))
        outputs.add_text(out_dir / BATCH_RECORD, json.dumps(record, indent=2, default=str) + "\n")
        return outputs.commit()


def _stage_parquet(outputs: OutputSet, rows: List[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist(rows)

    def verify(staged: Path) -> None:
        if pq.read_metadata(staged).num_rows != len(rows):
            raise OSError(f"{path.name} read back with another number of rows")
    outputs.add_file(path, lambda staged: pq.write_table(table, staged), verify)


def _subjects_csv(outcomes: List[dict]) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(SUBJECT_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for outcome in outcomes:
        writer.writerow({**outcome, "seconds": round(outcome.get("seconds") or 0.0, 3)})
    return text.getvalue()


def subject_medians(rows: List[dict]) -> Dict[tuple, List[float]]:
    """(method, segment, map, unit) -> each subject's median of the map in the label."""
    medians: Dict[tuple, List[float]] = {}
    for row in rows:
        if row["median"] is not None and np.isfinite(row["median"]):
            medians.setdefault((row["method"], row["segment"], row["map"], row["unit"]), []).append(row["median"])
    return medians


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_report(rows: List[dict], outcomes: List[dict], record: dict) -> str:
    counts = record["counts"]
    lines = ["# DCEPK batch report", "",
             f"- manifest: `{record.get('source', '')}`; started {record['started']}, {record['seconds']:.1f} s; "
             f"device {record['device']}",
             f"- subjects: {len(outcomes)}: {counts['done']} computed in this run, {counts['up to date']} up to "
             f"date (kept from an earlier run), {counts['failed']} failed, {counts['invalid']} invalid in the manifest",
             f"- exit status {record['exit_code']} (0: every subject finished, 1: some failed)"]
    if record.get("dashboard"):
        lines.append(f"- Dask dashboard (while it ran): {record['dashboard']}")
    memory = {k: v for k, v in record.get("worker_peak_memory_bytes", {}).items() if v}
    if memory:
        lines.append("- peak memory per worker: " + ", ".join(f"{v / 2**20:.0f} MiB" for v in memory.values()))
    lines += ["", "## Distribution across subjects", "",
              "Each subject's median of the map in the label (fit statistics over the fitted voxels only); "
              "the table `cohort_statistics.csv` / `.parquet` has every statistic of every map, uncertainties "
              "included.", ""]
    if rows:
        lines += [f"![distribution of each map per label across subjects]({FIGURE})", "",
                  "| method | label | map | unit | subjects | median | 25th pct | 75th pct |", "|---|---|---|---|---|---|---|---|"]
        for (method, segment, name, unit), values in sorted(subject_medians(rows).items()):
            if name not in FIGURE_MAPS:
                continue
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            lines.append(f"| {method} | {_cell(segment)} | {name} | {unit} | {len(values)} | {median:.4g} | {q1:.4g} "
                         f"| {q3:.4g} |")
    else:
        lines.append("No subject finished: no statistics.")
    failures = [o for o in outcomes if o["state"] in ("failed", "invalid")]
    lines += ["", "## Failures", ""]
    if failures:
        lines += ["| subject | session | state | error | log |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(o['subject'])} | {_cell(o['session'])} | {o['state']} | {_cell(o['error'])} | "
                  f"{o.get('log', '')} |" for o in failures]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _stage_figure(outputs: OutputSet, rows: List[dict], path: Path) -> None:
    """Box plots of each subject's median per label, one panel per map and method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = subject_medians(rows)
    methods = sorted({key[0] for key in medians})
    names = [name for name in FIGURE_MAPS if any(key[2] == name for key in medians)]
    if not names:
        return
    figure, axes = plt.subplots(len(methods), len(names), figsize=(3.4 * len(names), 3.2 * len(methods)),
                                squeeze=False)
    for row, method in enumerate(methods):
        for col, name in enumerate(names):
            axis = axes[row, col]
            groups = [(key[1], values, key[3]) for key, values in sorted(medians.items())
                      if key[0] == method and key[2] == name]
            if groups:
                axis.boxplot([values for _, values, _ in groups], showfliers=False)
                for position, (_, values, _) in enumerate(groups, start=1):
                    axis.plot(np.full(len(values), position), values, ".", alpha=0.6, color="tab:blue")
                axis.set_xticks(range(1, len(groups) + 1))
                axis.set_xticklabels([segment for segment, _, _ in groups], rotation=45, ha="right", fontsize=7)
                unit = groups[0][2]
                axis.set_title(f"{method}: {name}" + (f" ({unit})" if unit and unit != "fraction" else ""), fontsize=9)
    figure.suptitle("Median per label, one point per subject")
    figure.tight_layout()
    try:
        outputs.add_stream(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(figure)

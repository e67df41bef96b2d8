"""The evaluation report: a paper-style markdown table, and the same numbers as CSV.

Written to an output folder, atomically:

* ``results.md``: the headline table as the papers print it (depth AbsRel and δ1 in %; normal mean/median error in
  degrees and the share under 11.25°/22.5°/30° in %; matting MSE, SAD, Grad, Conn), then every metric per suite, the
  settings and the skipped samples;
* ``results.csv``: one row per (suite, metric) with the raw value (depth δ as fractions, as ``e2p_core.metrics``
  returns them) and the protocol that produced it (for matting: which Conn);
* ``per_image.csv``: one row per evaluated sample.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..checkpoints import write_atomically
from .runner import EvaluationSettings, SuiteResult

# (metric key, column title, factor, decimals) of the papers' tables.
HEADLINE_COLUMNS = {
    "depth": [("abs_rel", "AbsRel↓", 100, 1), ("delta1", "δ1↑", 100, 1)],
    "normal": [("mean", "Mean↓", 1, 1), ("median", "Med↓", 1, 1), ("below_11_25", "11.25°↑", 1, 1),
               ("below_22_5", "22.5°↑", 1, 1), ("below_30", "30°↑", 1, 1)],
    "matting": [("mse", "MSE↓", 1, 4), ("sad", "SAD↓", 1, 2), ("grad", "Grad↓", 1, 2), ("conn", "Conn↓", 1, 2)],
}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def headline_table(results: list[SuiteResult], method: str) -> str:
    """The one-row paper table: ``| Method | <suite> <metric> | ... |``."""
    header, cells = ["Method"], [method]
    for result in results:
        for key, title, factor, decimals in HEADLINE_COLUMNS[result.suite.task]:
            header.append(f"{result.suite.title} {title}")
            cells.append(f"{result.metrics[key] * factor:.{decimals}f}")
    return "\n".join([_row(header), _row(["---"] * len(header)), _row(cells)])


def full_table(results: list[SuiteResult]) -> str:
    keys = list(results[0].metrics)
    lines = [_row(["Suite", "images", "skipped", *keys]), _row(["---"] * (len(keys) + 3))]
    for result in results:
        values = [f"{result.metrics[key]:.4g}" for key in keys]
        lines.append(_row([result.suite.title, str(len(result.per_image)), str(len(result.skipped)), *values]))
    return "\n".join(lines)


def settings_line(settings: EvaluationSettings, task: str) -> str:
    parts = [f"{settings.steps} step(s)", f"seed {settings.seed}", f"{settings.resize} resize {settings.resolution}",
             settings.protocol.describe(task)]
    if task == "matting":
        parts.append(f"10 seed-42 points from the ground-truth alpha, σ = {settings.point_sigma_px:g} px")
    if settings.limit is not None:
        parts.append(f"first {settings.limit} samples only")
    return ", ".join(parts)


def markdown_report(results: list[SuiteResult], method: str, settings: EvaluationSettings) -> str:
    task = results[0].suite.task
    lines = [f"# {task.capitalize()} evaluation ({settings.protocol.title} protocol)", "",
             headline_table(results, method), ""]
    if task == "depth":
        lines += ["AbsRel and δ1 in %.", ""]
    lines += [f"Settings: {settings_line(settings, task)}.", "", "## All metrics", "", full_table(results), ""]
    notes = [f"* {result.suite.title}: {result.note}" for result in results if result.note]
    if notes:
        lines += ["## Scope", "", *notes, ""]
    skipped = [(result.suite.title, name, why) for result in results for name, why in result.skipped]
    if skipped:
        lines += ["## Skipped samples", ""] + [f"* {suite}: `{name}`: {why}" for suite, name, why in skipped] + [""]
    return "\n".join(lines)


def _csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_report(results: list[SuiteResult], out_dir: str | Path, method: str,
                 settings: EvaluationSettings) -> list[Path]:
    """Write ``results.md``, ``results.csv`` and ``per_image.csv`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = [["task", "suite", "metric", "value", "images", "skipped", "protocol"]]
    per_image = [["task", "suite", "sample", *results[0].metrics]]
    for result in results:
        suite = result.suite
        summary += [[suite.task, suite.name, key, repr(value), len(result.per_image), len(result.skipped),
                     settings.protocol.describe(suite.task)] for key, value in result.metrics.items()]
        per_image += [[suite.task, suite.name, name, *(repr(metrics[key]) for key in results[0].metrics)]
                      for name, metrics in result.per_image]
    contents = {
        "results.md": markdown_report(results, method, settings),
        "results.csv": _csv_text(summary),
        "per_image.csv": _csv_text(per_image),
    }
    paths = []
    for name, text in contents.items():
        path = out_dir / name
        write_atomically(path, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
        paths.append(path)
    return paths

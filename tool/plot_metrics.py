"""Training curves of a run, drawn from the metrics JSON lines that RunLog writes.

    python -m tool.plot_metrics runs/ --out curves.png        # the one <session>metrics.jsonl in runs/
    python -m tool.plot_metrics runs/ --session RRM_           # runs/RRM_metrics.jsonl -> runs/RRM_curves.png
    python -m tool.plot_metrics runs/RRM_metrics.jsonl

One figure: the loss terms (strictly positive ones on a log scale where they span a wide range,
the dense energy and the total, which turn negative, on a linear one), the learning rate of each
parameter group, and the reliable-region precision / coverage against ground truth (every key
containing 'precision' or 'coverage'; the panel says so when the run had no ground truth).
Classification-only updates (phase 1 of train_from_init) are shaded.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tool.cli import run_cli

METRICS_SUFFIX = "metrics.jsonl"
# Keys of a RunLog record that are not loss terms; every other numeric key is one.
RECORD_KEYS = frozenset({"step", "time", "lr", "classification_only"})
QUALITY_WORDS = ("precision", "coverage")
# A panel gets a log scale when its positive values span more than this factor.
LOG_SCALE_RANGE = 20.0
PHASE1_SHADE = "#ececec"
COLOURS: tuple[str, ...] = tuple(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"])


@dataclass
class Run:
    """The records of the last run in a metrics file (steps increasing), and what was skipped."""
    path: str
    records: list[dict]
    unreadable_lines: int
    earlier_records: int


def find_metrics_file(source: str, session: str | None = None) -> str:
    """`source` itself if it is a file, else `<source>/<session>metrics.jsonl`, or the only
    `*metrics.jsonl` in the directory `source` when no session is given."""
    if os.path.isfile(source):
        if session is not None:
            raise ValueError(f"--session {session} chooses a file in a run directory, but {source} is a file")
        return source
    if not os.path.isdir(source):
        raise FileNotFoundError(f"metrics file or run directory not found: {source}")
    if session is not None:
        path = os.path.join(source, f"{session}{METRICS_SUFFIX}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--session {session}: no {session}{METRICS_SUFFIX} in {source}")
        return path
    found = sorted(glob.glob(os.path.join(glob.escape(source), f"*{METRICS_SUFFIX}")))
    if not found:
        raise FileNotFoundError(f"no *{METRICS_SUFFIX} in the run directory {source}")
    if len(found) > 1:
        sessions = ", ".join(os.path.basename(path)[:-len(METRICS_SUFFIX)] or "''" for path in found)
        raise ValueError(f"{source} holds several metrics files (sessions {sessions}): choose one with --session")
    return found[0]


def _step_of(record: object) -> int | None:
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_run(path: str) -> Run:
    """Records of `path`, one JSON object per line with an int 'step'. Lines that are not (a line torn
    by a crash) are skipped and counted. A session name reused for a fresh run appends a run that
    starts again from a lower step: only the last run is kept."""
    records, unreadable = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if _step_of(record) is None:
                unreadable += 1
                continue
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no metrics records (JSON lines with a 'step')")
    start = max((i for i in range(1, len(records)) if records[i]["step"] <= records[i - 1]["step"]), default=0)
    return Run(path, records[start:], unreadable, start)


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, values, phases) of the records that have `key` as a number; null -> NaN (a gap in the
    line); phases numbers the runs of equal 'classification_only' (0, 1, ... as it changes)."""
    steps, values, phases = [], [], []
    phase, previous = 0, None
    for record in records:
        mode = record.get("classification_only")
        if previous is not None and mode != previous:
            phase += 1
        previous = mode
        value = record.get(key, "absent")
        if value is None:
            value = math.nan
        elif not isinstance(value, numbers.Real) or isinstance(value, bool):
            continue
        steps.append(record["step"])
        values.append(float(value))
        phases.append(phase)
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64), np.asarray(phases, dtype=np.int64)


def _numeric_keys(records: Sequence[dict]) -> list[str]:
    """Keys outside RECORD_KEYS holding a number or null (a figure undefined at that step), in first-seen order."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in RECORD_KEYS and (value is None or isinstance(value, numbers.Real)
                                           and not isinstance(value, bool)):
                keys[key] = None
    return list(keys)


def _smoothed(values: np.ndarray, phases: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values of the same phase (a phase switch changes the loss
    abruptly: a mean across it would smear the jump), NaNs left out."""
    return np.concatenate([_trailing_mean(values[phases == phase], window) for phase in np.unique(phases)]) \
        if values.size else values


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (fewer at the start), NaNs left out."""
    finite = np.isfinite(values)
    sums = np.concatenate(([0.0], np.cumsum(np.where(finite, values, 0.0))))
    counts = np.concatenate(([0], np.cumsum(finite)))
    index = np.arange(1, values.size + 1)
    low = np.maximum(index - window, 0)
    count = counts[index] - counts[low]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (sums[index] - sums[low]) / count, np.nan)


def _auto_window(num_records: int) -> int:
    # About 60 independent points across the run: noisy per-step losses become readable trends.
    return max(1, num_records // 60)


def _scale_for(axes: Axes, values: Sequence[np.ndarray]) -> None:
    """Log scale when no value is negative and the positive ones span more than LOG_SCALE_RANGE (a
    zero, e.g. the lr of the released extra update at max_step, is then just not drawn)."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    positive = finite[finite > 0]
    if positive.size and finite.min() >= 0 and positive.max() / positive.min() > LOG_SCALE_RANGE:
        axes.set_yscale("log")
        axes.set_ylabel(axes.get_ylabel() + " (log scale)")


def _shade_classification_only(axes: Axes, records: Sequence[dict], label: bool) -> None:
    """Grey background over each run of classification-only updates."""
    steps = [record["step"] for record in records if record.get("classification_only") is True]
    if not steps:
        return
    runs, start = [], steps[0]
    for previous, step in zip(steps, steps[1:]):
        if step != previous + 1:
            runs.append((start, previous))
            start = step
    runs.append((start, steps[-1]))
    for index, (first, last) in enumerate(runs):
        axes.axvspan(first - 0.5, last + 0.5, color=PHASE1_SHADE, zorder=0,
                     label="classification only" if label and index == 0 else None)


def _plot_terms(axes: Axes, records: Sequence[dict], keys: Sequence[str], colour_of: dict[str, str], window: int,
                title: str) -> None:
    plotted = []
    for key in keys:
        steps, values, phases = _series(records, key)
        colour = colour_of[key]
        if window > 1:
            axes.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            axes.plot(steps, _smoothed(values, phases, window), color=colour, linewidth=1.8, label=key)
        else:
            axes.plot(steps, values, color=colour, linewidth=1.2, label=key)
        plotted.append(values)
    axes.set_title(title if window == 1 else f"{title}, mean of {window} updates (faint: each update)")
    axes.set_ylabel("loss")
    _scale_for(axes, plotted)


def _plot_lr(axes: Axes, records: Sequence[dict]) -> None:
    with_lr = [r for r in records if isinstance(r.get("lr"), list)]
    series = []
    for group in range(max((len(r["lr"]) for r in with_lr), default=0)):
        steps = [r["step"] for r in with_lr if len(r["lr"]) > group]
        values = np.asarray([r["lr"][group] for r in with_lr if len(r["lr"]) > group], dtype=np.float64)
        axes.plot(steps, values, color=COLOURS[group % len(COLOURS)], linewidth=1.5, label=f"group {group}")
        series.append(values)
    axes.set_title("Learning rate per parameter group")
    axes.set_ylabel("learning rate")
    if not series:
        axes.text(0.5, 0.5, "no lr in this log", ha="center", va="center", transform=axes.transAxes)
    _scale_for(axes, series)
    if axes.get_yscale() == "linear":
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))  # 7e-4, not 0.00070 with an offset


def _plot_quality(axes: Axes, records: Sequence[dict], keys: Sequence[str], window: int) -> None:
    axes.set_title("Reliable-region quality vs ground truth")
    if not keys:
        axes.text(0.5, 0.5, "no ground truth in this run\n(no precision / coverage in the log)", ha="center",
                  va="center", transform=axes.transAxes, fontsize=11, color="#555555")
        axes.set_yticks([])
        return
    # One colour per label map (prefix), solid precision, dashed coverage.
    colour_of: dict[str, str] = {}
    for key in keys:
        word = next(w for w in QUALITY_WORDS if w in key)
        prefix = key.replace(word, "")
        colour_of.setdefault(prefix, COLOURS[len(colour_of) % len(COLOURS)])
        steps, values, phases = _series(records, key)
        style = {"color": colour_of[prefix], "linestyle": "-" if word == "precision" else "--"}
        # Per-update figures of a batch are noisy: a trailing mean over the logged values, raw ones faint.
        if window > 1:
            axes.plot(steps, values, alpha=0.25, linewidth=0.8, **style)
            axes.plot(steps, _smoothed(values, phases, window), linewidth=1.6, label=key, **style)
        else:
            few = np.isfinite(values).sum() <= 30
            axes.plot(steps, values, marker="o" if few else None, markersize=3, linewidth=1.6, label=key, **style)
    if window > 1:
        axes.set_title(f"Reliable-region quality vs ground truth, mean of {window} logged values")
    axes.set_ylim(0, 1.02)
    axes.set_ylabel("fraction of pixels")


def plot_run(run: Run, out: str, window: int | None = None) -> str:
    """Draw the curves of `run` (see `build_figure`) into the PNG `out` (its folder is created); returns `out`."""
    figure = build_figure(run, window)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out)
    return out


def build_figure(run: Run, window: int | None = None) -> Figure:
    """The figure of `run`: loss terms, lr, reliable-region quality. `window`: values per trailing
    mean of the losses and quality figures (None: about 60 means across the run, 1: raw values only)."""
    records = run.records
    window = _auto_window(len(records)) if window is None else window
    if window < 1:
        raise ValueError(f"--smooth must be >= 1, got {window}")
    numeric = _numeric_keys(records)
    quality = [key for key in numeric if any(word in key for word in QUALITY_WORDS)]
    losses = [key for key in numeric if key not in quality]
    positive = [key for key in losses if np.all(np.nan_to_num(_series(records, key)[1], nan=1.0) > 0)]
    signed = [key for key in losses if key not in positive]
    colour_of = {key: COLOURS[index % len(COLOURS)] for index, key in enumerate(losses)}

    figure = Figure(figsize=(14, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2)
    loss_axes = [figure.add_subplot(grid[0, :])] if not signed else [figure.add_subplot(grid[0, 0]),
                                                                      figure.add_subplot(grid[0, 1])]
    lr_axes = figure.add_subplot(grid[1, 0], sharex=loss_axes[0])
    quality_axes = figure.add_subplot(grid[1, 1], sharex=loss_axes[0])
    for axes in loss_axes[1:]:
        axes.sharex(loss_axes[0])
    _plot_terms(loss_axes[0], records, positive, colour_of, window, "Loss terms")
    if signed:
        _plot_terms(loss_axes[1], records, signed, colour_of, window, "Loss terms that reach ≤ 0")
        loss_axes[1].axhline(0.0, color="black", linewidth=0.6)
    _plot_lr(lr_axes, records)
    _plot_quality(quality_axes, records, quality, window)
    for index, axes in enumerate([*loss_axes, lr_axes, quality_axes]):
        _shade_classification_only(axes, records, label=index == 0)
        axes.set_xlabel("update (step)")
        axes.grid(True, which="major", alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize=9)
    figure.suptitle(_title(run), fontsize=12)
    return figure


def _title(run: Run) -> str:
    first, last = run.records[0], run.records[-1]
    text = f"{run.path}: updates {first['step']}-{last['step']} ({len(run.records)} records"
    times = [r["time"] for r in (first, last) if isinstance(r.get("time"), numbers.Real)]
    if len(times) == 2:
        text += f", {(times[1] - times[0]) / 60:.1f} min"
    return text + ")"


def default_output(metrics_path: str) -> str:
    """`<dir>/<session>curves.png` beside `<dir>/<session>metrics.jsonl`."""
    name = os.path.basename(metrics_path)
    stem = name[:-len(METRICS_SUFFIX)] if name.endswith(METRICS_SUFFIX) else os.path.splitext(name)[0] + "_"
    return os.path.join(os.path.dirname(metrics_path), f"{stem}curves.png")


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a <session>metrics.jsonl file, or the run directory (--save_dir) holding it")
    parser.add_argument("--session", default=None, help="in a run directory: the --session_name whose metrics to draw")
    parser.add_argument("--out", default=None, help="PNG to write (default <session>curves.png beside the metrics)")
    parser.add_argument("--smooth", type=int, default=None,
                        help="logged values per trailing mean of the losses and region-quality figures "
                             "(default: about 60 means per run; 1 = raw)")
    args = parser.parse_args(argv)
    path = find_metrics_file(args.source, args.session)
    run = read_run(path)
    out = plot_run(run, args.out or default_output(path), args.smooth)
    if run.unreadable_lines or run.earlier_records:
        print(f"{path}: skipped {run.unreadable_lines} unreadable line(s) and {run.earlier_records} record(s) "
              f"of earlier runs of the session", file=sys.stderr)
    print(out)
    return out


if __name__ == "__main__":
    run_cli("tool.plot_metrics", main)

"""Training curves from RunLog's metrics JSON lines: the CLI writes a PNG, the figure shows what the log holds."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from tool.plot_metrics import _smoothed, build_figure, default_output, find_metrics_file, main, read_run


def write_metrics(path, steps=60, cls_steps=30, quality=True, torn_tail=False):
    """RunLog-format records of a two-phase run: phase 1 only 'cls', phase 2 'cls', 'ce', 'dense' (< 0)."""
    with open(path, "w") as handle:
        for t in range(steps):
            phase1 = t < cls_steps
            record = {"step": t, "lr": [0.01 * (1 - t / steps), 0.1 * (1 - t / steps)] if phase1 else [7e-4] * 2,
                      "classification_only": phase1, "time": 100.0 + t, "cls": 0.7 * math.exp(-t / 10) + 0.02}
            if not phase1:
                record.update(ce=2.0 * math.exp(-(t - cls_steps) / 10) + 0.3, dense=-0.05 * (t - cls_steps))
                if quality and t % 5 == 0:
                    record.update(precision=None if t == cls_steps else 0.8, coverage=0.4,
                                  cam_precision=0.6, cam_coverage=1.0)
            record["total"] = sum(record.get(k, 0.0) for k in ("cls", "ce", "dense"))
            handle.write(json.dumps(record) + "\n")
        if torn_tail:
            handle.write('{"step": %d, "lr": [0.0' % steps)  # a crash mid-line
    return path


def axes_by_title(figure):
    return {axes.get_title().split(",")[0]: axes for axes in figure.axes}


@pytest.mark.parametrize("quality", [True, False], ids=["with ground truth", "without"])
def test_cli_writes_a_png_of_the_run(tmp_path, quality):
    metrics = write_metrics(tmp_path / "RRM_metrics.jsonl", quality=quality)
    out = main([str(tmp_path), "--out", str(tmp_path / "plots" / "curves.png")])
    assert out == str(tmp_path / "plots" / "curves.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1400, 900)
        image.load()
    assert main([str(metrics)]) == str(tmp_path / "RRM_curves.png")  # default: beside the metrics
    assert Image.open(tmp_path / "RRM_curves.png").size == (1400, 900)


def test_figure_panels_follow_the_records(tmp_path):
    run = read_run(str(write_metrics(tmp_path / "s_metrics.jsonl")))
    panels = axes_by_title(build_figure(run, window=5))
    assert set(panels) == {"Loss terms", "Loss terms that reach ≤ 0", "Learning rate per parameter group",
                           "Reliable-region quality vs ground truth"}
    positive, signed = panels["Loss terms"], panels["Loss terms that reach ≤ 0"]
    assert positive.get_legend_handles_labels()[1] == ["cls", "ce", "classification only"]
    assert positive.get_yscale() == "log"  # cls falls from 0.72 to 0.02: more than 20x
    assert signed.get_legend_handles_labels()[1] == ["total", "dense"] and signed.get_yscale() == "linear"
    # Phase 1 of ce is absent: its line starts at the first joint update.
    ce_raw = positive.get_lines()[2]
    assert ce_raw.get_xdata()[0] == 30 and len(ce_raw.get_xdata()) == 30
    lr = panels["Learning rate per parameter group"]
    assert [line.get_label() for line in lr.get_lines()] == ["group 0", "group 1"]
    quality = panels["Reliable-region quality vs ground truth"]
    lines = {line.get_label(): line for line in quality.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"precision", "coverage", "cam_precision", "cam_coverage"}
    assert lines["precision"].get_xdata().tolist() == list(range(30, 60, 5))
    assert np.isnan(lines["precision"].get_ydata()[0])  # null: a gap, not a point
    assert lines["coverage"].get_linestyle() == "--" and lines["precision"].get_color() == lines["coverage"].get_color()
    assert lines["cam_precision"].get_color() != lines["precision"].get_color()


def test_without_ground_truth_the_quality_panel_says_so(tmp_path):
    run = read_run(str(write_metrics(tmp_path / "s_metrics.jsonl", quality=False)))
    quality = axes_by_title(build_figure(run))["Reliable-region quality vs ground truth"]
    assert quality.get_lines() == []
    assert any("no ground truth" in text.get_text() for text in quality.texts)


def test_smoothing_is_a_trailing_mean_within_each_phase():
    values = np.array([1.0, 3.0, np.nan, 5.0, 10.0, 20.0, 30.0])
    phases = np.array([0, 0, 0, 0, 1, 1, 1])
    # Window 2, by hand: phase 0 -> 1, 2, 3 (NaN left out), 5; phase 1 starts afresh -> 10, 15, 25.
    assert _smoothed(values, phases, 2).tolist() == [1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 25.0]


def test_quality_curves_are_trailing_means_of_the_logged_values(tmp_path):
    path = tmp_path / "s_metrics.jsonl"
    with open(path, "w") as handle:
        for step, precision in enumerate([None, None, 0.2, 0.4, 0.9, 0.5]):
            record = {"step": step, "classification_only": False, "cls": 0.1}
            if precision is not None:
                record.update(precision=precision, coverage=precision / 2)
            handle.write(json.dumps(record) + "\n")
    quality = axes_by_title(build_figure(read_run(str(path)), window=2))["Reliable-region quality vs ground truth"]
    lines = {line.get_label(): line for line in quality.get_lines() if not line.get_label().startswith("_")}
    # Window 2 over the four logged values, by hand: 0.2, (0.2+0.4)/2, (0.4+0.9)/2, (0.9+0.5)/2.
    np.testing.assert_allclose(lines["precision"].get_ydata(), [0.2, 0.3, 0.65, 0.7])
    np.testing.assert_allclose(lines["coverage"].get_ydata(), [0.1, 0.15, 0.325, 0.35])
    assert lines["precision"].get_xdata().tolist() == [2, 3, 4, 5]
    raw = [line for line in quality.get_lines() if line.get_label().startswith("_")]
    assert sorted(line.get_ydata().tolist() for line in raw) == [[0.1, 0.2, 0.45, 0.25], [0.2, 0.4, 0.9, 0.5]]
    assert quality.get_title().endswith("mean of 2 logged values")
    raw_only = axes_by_title(build_figure(read_run(str(path)), window=1))["Reliable-region quality vs ground truth"]
    assert [line.get_label() for line in raw_only.get_lines()] == ["precision", "coverage"]


def test_reading_keeps_the_last_run_and_skips_torn_lines(tmp_path):
    path = tmp_path / "x_metrics.jsonl"
    write_metrics(path, steps=8, cls_steps=4)
    earlier = path.read_text()
    write_metrics(path, steps=6, cls_steps=4, torn_tail=True)
    path.write_text(earlier + path.read_text())  # a fresh run under the same session name, then a crash
    run = read_run(str(path))
    assert [record["step"] for record in run.records] == list(range(6))
    assert (run.unreadable_lines, run.earlier_records) == (1, 8)


def test_a_run_directory_needs_exactly_one_metrics_file_or_a_session(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no \\*metrics.jsonl in the run directory {tmp_path}"):
        find_metrics_file(str(tmp_path))
    write_metrics(tmp_path / "a_metrics.jsonl", steps=4, cls_steps=2)
    assert find_metrics_file(str(tmp_path)) == str(tmp_path / "a_metrics.jsonl")
    write_metrics(tmp_path / "b_metrics.jsonl", steps=4, cls_steps=2)
    with pytest.raises(ValueError, match=r"several metrics files \(sessions a_, b_\): choose one with --session"):
        main([str(tmp_path)])
    assert main([str(tmp_path), "--session", "b_"]) == str(tmp_path / "b_curves.png")
    with pytest.raises(FileNotFoundError, match=f"--session c_: no c_metrics.jsonl in {tmp_path}"):
        main([str(tmp_path), "--session", "c_"])
    assert default_output("runs/plain.jsonl") == "runs/plain_curves.png"


def test_missing_or_empty_logs_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"metrics file or run directory not found: {tmp_path / 'nope'}"):
        main([str(tmp_path / "nope")])
    empty = tmp_path / "e_metrics.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"{empty} holds no metrics records"):
        main([str(empty)])
    empty.write_text('{"step": 3, "lr"\n{"no": "step"}\n')
    with pytest.raises(ValueError, match=f"{empty} holds no metrics records"):
        main([str(empty)])
    write_metrics(empty, steps=4, cls_steps=2)
    with pytest.raises(ValueError, match="--smooth must be >= 1"):
        main([str(empty), "--smooth", "0"])

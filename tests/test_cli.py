"""run_cli: bad input ends a script with one error line and status 1; other errors keep their traceback."""
import os
import subprocess
import sys

import pytest

from tool.cli import inputs_checked, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail_with(error):
    raise error


def test_bad_input_exits_with_the_message():
    calls = []
    run_cli("prog", calls.append, "ok")
    assert calls == ["ok"]
    with pytest.raises(SystemExit) as info:
        run_cli("prog", fail_with, FileNotFoundError("--weights: weights file not found: w.pth"))
    assert info.value.code == "prog: error: --weights: weights file not found: w.pth"
    with pytest.raises(SystemExit) as info:
        run_cli("tool.evaluate", fail_with, ValueError("--scales must be positive"))
    assert info.value.code == "tool.evaluate: error: --scales must be positive"
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli("prog", fail_with, RuntimeError("a bug"))


def checked_then_fail_with(error):
    inputs_checked()
    raise error


def test_errors_after_the_inputs_are_checked_keep_their_traceback():
    # A ValueError at update 15,000 is a bug or a data fault to debug, not a bad flag.
    with pytest.raises(ValueError, match="nan in the loss"):
        run_cli("prog", checked_then_fail_with, ValueError("nan in the loss"))
    with pytest.raises(FileNotFoundError, match="image 2007_000032.jpg vanished"):
        run_cli("prog", checked_then_fail_with, FileNotFoundError("image 2007_000032.jpg vanished"))
    with pytest.raises(SystemExit) as info:  # the next run starts in the input phase again
        run_cli("prog", fail_with, ValueError("--scales must be positive"))
    assert info.value.code == "prog: error: --scales must be positive"


def test_training_script_reports_a_missing_root(tmp_path):
    missing = str(tmp_path / "no_voc")
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_from_cls_weight.py"), "--voc12_root", missing,
         "--weights", "none", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 1
    expected = f"train_from_cls_weight.py: error: --voc12_root not found: {missing} is not a directory"
    assert completed.stderr.strip() == expected

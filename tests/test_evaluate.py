import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_metrics import loop_iou
from tool.evaluate import evaluate_folders, main
from voc12.lists import write_palette_mask, write_plain_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def folders(tmp_path):
    """Three hand-made prediction/ground-truth pairs: palette GT with 255 borders, plain 8-bit predictions."""
    rng = np.random.default_rng(11)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    pairs = []
    for index, shape in enumerate([(20, 30), (25, 17), (33, 33)]):
        gt = rng.choice([0, 3, 8, 12, 15], size=shape).astype(np.uint8)
        gt[:, 0] = 255
        pred = np.where(rng.random(shape) < 0.7, gt, rng.choice([0, 3, 8, 19], size=shape)).astype(np.uint8)
        pred[pred == 255] = 0
        write_palette_mask(gt_dir / f"img{index}.png", gt)
        write_plain_mask(pred_dir / f"img{index}.png", pred)
        pairs.append((gt, pred))
    (tmp_path / "list.txt").write_text("img0\nimg1\nimg2\n")
    return tmp_path, pairs


def test_cli_matches_independent_loop(folders):
    root, pairs = folders
    completed = subprocess.run(
        [sys.executable, "-m", "tool.evaluate", "--pred_dir", str(root / "pred"), "--gt_dir", str(root / "gt"),
         "--list", str(root / "list.txt"), "--summary", str(root / "eval.json")],
        cwd=REPO, capture_output=True, text=True, check=True)
    iou, mean, accuracy = loop_iou(pairs)
    result = json.loads((root / "eval.json").read_text())
    assert result["num_images"] == 3
    assert result["mean_iou"] == pytest.approx(mean, rel=1e-12)
    assert result["pixel_accuracy"] == pytest.approx(accuracy, rel=1e-12)
    assert result["iou"]["bird"] == pytest.approx(iou[3], rel=1e-12)
    assert result["iou"]["train"] == pytest.approx(0.0)  # 19 predicted, never in the ground truth
    assert result["iou"]["bottle"] is None  # absent from both: not in the mean
    table = {line.rsplit(None, 1)[0]: line.rsplit(None, 1)[1] for line in completed.stdout.splitlines()[1:-1]}
    assert table["mean IoU"] == f"{100 * mean:.2f}%"
    assert table["pixel accuracy"] == f"{100 * accuracy:.2f}%"
    assert table["bottle"] == "n/a" and len(table) == 23
    assert "(3 images)" in completed.stdout


def test_default_list_is_every_prediction(folders):
    root, pairs = folders
    result = main(["--pred_dir", str(root / "pred"), "--gt_dir", str(root / "gt")])
    assert result["num_images"] == 3
    assert result["mean_iou"] == pytest.approx(loop_iou(pairs)[1], rel=1e-12)


def test_errors_name_files(folders):
    root, _ = folders
    with pytest.raises(FileNotFoundError, match="--gt_dir: folder not found"):
        evaluate_folders(str(root / "pred"), str(root / "nogt"), ["img0"])
    with pytest.raises(FileNotFoundError, match="mask not found: .*pred.img9.png"):
        evaluate_folders(str(root / "pred"), str(root / "gt"), ["img9"])
    write_plain_mask(root / "pred" / "img1.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match="img1.png is 5x5 but .*img1.png is 17x25"):
        evaluate_folders(str(root / "pred"), str(root / "gt"), ["img1"])
    write_plain_mask(root / "pred" / "img2.png", np.full((33, 33), 40, np.uint8))
    with pytest.raises(ValueError, match="img2.png: .*pred has labels outside 0..20"):
        evaluate_folders(str(root / "pred"), str(root / "gt"), ["img2"])

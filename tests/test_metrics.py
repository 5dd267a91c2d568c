import math

import numpy as np
import pytest
import torch

from tool.metrics import ConfusionMatrix, MetricLogger, SmoothedValue


def loop_iou(pairs, num_classes=21, ignore=255):
    """Independent IoU: per class, count pixels over all maps with explicit loops over classes."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    correct = total = 0
    for gt, pred in pairs:
        valid = gt != ignore
        correct += int(np.sum((gt == pred) & valid))
        total += int(valid.sum())
        for c in range(num_classes):
            g = (gt == c) & valid
            p = (pred == c) & valid
            inter[c] += np.sum(g & p)
            union[c] += np.sum(g | p)
    iou = [inter[c] / union[c] if union[c] > 0 else math.nan for c in range(num_classes)]
    present = [v for v in iou if not math.isnan(v)]
    return iou, sum(present) / len(present), correct / total


def test_hand_worked_three_classes():
    gt = np.array([[0, 0, 1],
                   [1, 2, 255]])
    pred = np.array([[0, 1, 1],
                     [1, 0, 2]])  # the last pixel is ignored whatever it predicts
    cm = ConfusionMatrix(num_classes=3)
    cm.update(gt, pred)
    result = cm.compute()
    # class 0: TP 1, FP 1 (gt 2 -> 0), FN 1 (gt 0 -> 1): 1/3; class 1: TP 2, FP 1: 2/3; class 2: TP 0: 0.
    assert result["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert result["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert result["pixel_accuracy"] == pytest.approx(3 / 5)
    assert result["num_pixels"] == 5
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_random_maps_match_loop_with_ignore_and_absent_classes():
    rng = np.random.default_rng(3)
    pairs = []
    for shape in [(17, 23), (31, 9), (40, 40)]:
        # Only classes 0..9 and 15 appear, so 10..14 and 16..20 are absent from gt and prediction.
        classes = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15])
        gt = rng.choice(classes, size=shape)
        gt[rng.random(shape) < 0.15] = 255
        pred = np.where(rng.random(shape) < 0.6, gt, rng.choice(classes, size=shape))
        pred[pred == 255] = 0
        pairs.append((gt, pred))
    cm = ConfusionMatrix()
    for gt, pred in pairs:
        cm.update(torch.from_numpy(gt), pred.astype(np.uint8))
    result = cm.compute()
    expected_iou, expected_mean, expected_acc = loop_iou(pairs)
    np.testing.assert_allclose(result["iou"], expected_iou, rtol=1e-12, equal_nan=True)
    assert all(math.isnan(result["iou"][c]) for c in (10, 11, 12, 13, 14, 16, 17, 18, 19, 20))
    assert result["mean_iou"] == pytest.approx(expected_mean, rel=1e-12)
    assert result["pixel_accuracy"] == pytest.approx(expected_acc, rel=1e-12)


def test_class_only_predicted_counts_with_iou_zero():
    gt = np.zeros((4, 4), dtype=np.int64)
    pred = gt.copy()
    pred[0, 0] = 7  # class 7 never in gt: union 1, IoU 0, so it lowers the mean
    cm = ConfusionMatrix()
    cm.update(gt, pred)
    result = cm.compute()
    assert result["iou"][7] == 0.0
    assert result["iou"][0] == pytest.approx(15 / 16)
    assert result["mean_iou"] == pytest.approx((15 / 16 + 0.0) / 2)


def test_merge_equals_single_matrix_and_reduce_is_noop_without_process_group():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 21, (2, 10, 12)), rng.integers(0, 21, (2, 10, 12))
    whole, part1, part2 = ConfusionMatrix(), ConfusionMatrix(), ConfusionMatrix()
    whole.update(a[0], a[1])
    part1.update(a[0][0], a[1][0])
    part2.update(a[0][1], a[1][1])
    part1.merge(part2)
    part1.reduce_from_all_processes()
    assert torch.equal(whole.mat, part1.mat)


def test_bad_inputs_are_named():
    cm = ConfusionMatrix()
    with pytest.raises(ValueError, match="gt shape"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="pred has labels outside 0..20"):
        cm.update(np.zeros((2, 2), int), np.full((2, 2), 21))
    with pytest.raises(ValueError, match="integer labels"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 2), int))


def test_str_table_lists_every_class_and_the_mean():
    names = ["background", "cat", "dog"]
    cm = ConfusionMatrix(num_classes=3, class_names=names)
    cm.update(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    lines = str(cm).splitlines()
    assert [line.split()[0] for line in lines[1:4]] == names
    assert lines[1].split()[1] == "66.67%"  # background: TP 2, FP 1
    assert lines[2].split()[1] == "50.00%"
    assert lines[3].split()[1] == "n/a"
    assert lines[4].split()[-1] == f"{100 * (2 / 3 + 1 / 2) / 2:.2f}%"


def test_smoothed_value_and_metric_logger():
    value = SmoothedValue(window_size=3)
    for v in [1.0, 2.0, 3.0, 10.0]:
        value.update(v)
    assert value.median == 3.0
    assert value.avg == pytest.approx(5.0)
    assert value.global_avg == pytest.approx(4.0)
    assert value.max == 10.0 and value.value == 10.0
    logger = MetricLogger()
    printed = []
    seen = list(logger.log_every(range(5), print_freq=2, header="eval", print_fn=printed.append))
    assert seen == [0, 1, 2, 3, 4]
    # items 0, 2 and the last one, then the total line
    assert len(printed) == 4 and printed[0].startswith("eval  [0/5]") and "Total time" in printed[-1]
    logger.update(loss=torch.tensor(0.5), lr=0.1)
    assert logger.loss.value == 0.5 and "lr: 0.1000" in str(logger)
    with pytest.raises(ValueError, match="loss must be a number"):
        logger.update(loss="x")

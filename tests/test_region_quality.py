"""Reliable-region quality against ground truth: hand-worked counts, a brute-force recount, edge cases."""
import json

import numpy as np
import pytest
import torch

from tool.region_quality import (RegionCounts, count_region_quality, per_class_precision, quality_summary,
                                 region_figures, summary_counts)

# 3 labels; 255 in MINED = not kept, in GT = void; ROI 0 = padding.
GT = np.array([[[0, 0, 1, 1],
                [0, 2, 2, 255],
                [1, 1, 2, 0]]])
MINED = np.array([[[0, 255, 1, 2],
                   [1, 2, 255, 0],
                   [255, 1, 2, 0]]])
ROI = np.array([[[1, 1, 1, 1],
                 [1, 1, 1, 1],
                 [1, 1, 1, 0]]], np.float32)


def brute_force(mined, gt, roi, num_labels):
    """Pixel by pixel in Python: (valid, kept, correct, kept per class, correct per class)."""
    valid = kept = correct = 0
    kept_c, correct_c = [0] * num_labels, [0] * num_labels
    for b in range(mined.shape[0]):
        for y in range(mined.shape[1]):
            for x in range(mined.shape[2]):
                if roi[b, y, x] == 0 or gt[b, y, x] == 255:
                    continue
                valid += 1
                label = int(mined[b, y, x])
                if label == 255:
                    continue
                kept += 1
                kept_c[label] += 1
                if label == gt[b, y, x]:
                    correct += 1
                    correct_c[label] += 1
    return valid, kept, correct, kept_c, correct_c


def as_lists(counts):
    return (int(counts.valid), int(counts.kept), int(counts.correct), counts.kept_per_class.tolist(),
            counts.correct_per_class.tolist())


def random_batch(seed, batch=3, height=7, width=9, num_labels=5):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, num_labels, (batch, height, width))
    mined = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, num_labels, gt.shape))
    mined[rng.random(gt.shape) < 0.3] = 255
    gt[rng.random(gt.shape) < 0.15] = 255
    roi = (rng.random(gt.shape) < 0.8).astype(np.float32)
    return mined, gt, roi


def test_hand_worked_3x4_case():
    counts = count_region_quality(MINED, GT, 3, ROI)
    # valid: 12 pixels minus (1,3) void gt and (2,3) outside the roi = 10; of those, 7 are not 255 in
    # MINED: (0,0) (0,2) (0,3) (1,0) (1,1) (2,1) (2,2), of which (0,3) [2 vs 1] and (1,0) [1 vs 0] are wrong.
    assert as_lists(counts) == (10, 7, 5, [1, 3, 3], [1, 2, 2])
    assert region_figures(counts) == {"precision": 5 / 7, "coverage": 7 / 10}
    assert per_class_precision(counts) == {0: 1.0, 1: 2 / 3, 2: 2 / 3}
    # Without the roi, (2,3) mined 0 on gt 0 counts as well.
    assert region_figures(count_region_quality(MINED, GT, 3)) == {"precision": 6 / 8, "coverage": 8 / 11}


def test_prefix_names_the_cam_figures_and_a_class_never_kept_is_left_out():
    counts = count_region_quality(MINED, GT, 4, ROI)
    assert region_figures(counts, prefix="cam_") == {"cam_precision": 5 / 7, "cam_coverage": 7 / 10}
    assert per_class_precision(counts) == {0: 1.0, 1: 2 / 3, 2: 2 / 3}  # label 3: no kept pixel


@pytest.mark.parametrize("kind", ["numpy", "torch", "numpy mined, torch gt and roi"])
def test_random_batches_match_a_brute_force_recount(kind):
    num_labels = 5
    for seed in range(3):
        mined, gt, roi = random_batch(seed, num_labels=num_labels)
        expected = brute_force(mined, gt, roi, num_labels)
        if kind == "numpy":
            counts = count_region_quality(mined, gt, num_labels, roi)
            assert isinstance(counts.kept, np.ndarray) and isinstance(counts.kept_per_class, np.ndarray)
        elif kind == "torch":
            counts = count_region_quality(torch.from_numpy(mined), torch.from_numpy(gt.astype(np.uint8)),
                                          num_labels, torch.from_numpy(roi > 0))
            assert isinstance(counts.kept, torch.Tensor) and counts.kept_per_class.dtype == torch.int64
        else:
            counts = count_region_quality(mined, torch.from_numpy(gt), num_labels, torch.from_numpy(roi))
            assert isinstance(counts.kept, torch.Tensor)
        assert as_lists(counts) == expected
        valid, kept, correct, kept_c, correct_c = expected
        assert region_figures(counts) == {"precision": correct / kept, "coverage": kept / valid}
        assert per_class_precision(counts) == {c: correct_c[c] / kept_c[c] for c in range(num_labels) if kept_c[c]}


@pytest.mark.parametrize("to_input", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
def test_counts_accumulate_over_steps_like_one_batch(to_input):
    first, second = random_batch(10), random_batch(11)
    total = None
    for mined, gt, roi in (first, second):
        counts = count_region_quality(to_input(mined), to_input(gt), 5, to_input(roi))
        total = counts if total is None else total + counts
    joined = [np.concatenate(parts) for parts in zip(first, second)]
    assert as_lists(total) == brute_force(*joined, 5)


@pytest.mark.parametrize("to_input", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
def test_one_vector_carries_the_counts_and_a_summary_restores_them(to_input):
    mined, gt, roi = random_batch(12)
    counts = count_region_quality(to_input(mined), to_input(gt), 5, to_input(roi))
    vector = counts.as_vector()
    valid, kept, correct, kept_c, correct_c = brute_force(mined, gt, roi, 5)
    assert vector.dtype == torch.int64 and vector.tolist() == [valid, kept, correct, *kept_c, *correct_c]
    assert as_lists(RegionCounts.from_vector(vector.tolist(), 5)) == as_lists(counts)
    names = ("bg", "a", "b", "c", "d")
    summary = json.loads(json.dumps(quality_summary({"": counts, "cam_": counts + counts}, names)))
    assert summary["precision"] == summary["cam_precision"] == pytest.approx(correct / kept)
    assert summary["per_class_precision"] == {names[c]: pytest.approx(correct_c[c] / kept_c[c])
                                              for c in range(5) if kept_c[c]}
    restored = summary_counts(summary, 5)
    assert as_lists(restored["cam_"]) == as_lists(counts + counts)
    with pytest.raises(ValueError, match="expected 13 values for 5 labels"):
        RegionCounts.from_vector(vector.tolist()[:-1], 5)
    with pytest.raises(ValueError, match="2 label names for counts of 5 labels"):
        quality_summary({"": counts}, names[:2])


def test_all_ignored_and_all_void_batches_give_none_not_nan():
    gt = np.zeros((2, 3, 4), np.int64)
    nothing_kept = count_region_quality(np.full(gt.shape, 255), gt, 3)
    assert region_figures(nothing_kept) == {"precision": None, "coverage": 0.0}
    assert per_class_precision(nothing_kept) == {}
    nothing_valid = count_region_quality(torch.zeros(gt.shape, dtype=torch.long), torch.full(gt.shape, 255), 3)
    assert region_figures(nothing_valid) == {"precision": None, "coverage": None}
    outside_roi = count_region_quality(gt, gt, 3, roi=np.zeros(gt.shape))
    assert region_figures(outside_roi, "cam_") == {"cam_precision": None, "cam_coverage": None}


def test_tensor_counts_never_read_the_device():
    # Meta tensors have no values: any read (a check, .item(), bincount sizing) would raise.
    shape = (2, 5, 6)
    mined = torch.empty(shape, dtype=torch.int64, device="meta")
    counts = count_region_quality(mined, torch.empty(shape, dtype=torch.uint8, device="meta"), 81,
                                  torch.empty(shape, device="meta"))
    assert counts.kept.device.type == "meta" and counts.kept_per_class.shape == (81,)
    total = counts + counts
    assert total.valid.device.type == "meta"


@pytest.mark.cuda
def test_cuda_counts_equal_the_cpu_ones_without_synchronising():
    mined, gt, roi = random_batch(4)
    device = torch.device("cuda")
    inputs = [torch.from_numpy(a).to(device) for a in (mined, gt, roi)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counts = count_region_quality(inputs[0], inputs[1], 5, inputs[2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counts.kept.device.type == "cuda"
    assert as_lists(counts) == brute_force(mined, gt, roi, 5)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"gt shape \(1, 3, 3\) != mined shape \(1, 3, 4\)"):
        count_region_quality(MINED, GT[:, :, :3], 3)
    with pytest.raises(ValueError, match=r"mined must be \(B,H,W\)"):
        count_region_quality(MINED[0], GT[0], 3)
    with pytest.raises(ValueError, match="mined must hold integer labels"):
        count_region_quality(MINED.astype(np.float32), GT, 3)
    with pytest.raises(ValueError, match=r"mined has labels outside 0..1 and 255: \[2\]"):
        count_region_quality(MINED, np.minimum(GT, 1), 2)
    with pytest.raises(ValueError, match=r"gt has labels outside 0..2 and 255: \[7\]"):
        count_region_quality(MINED, np.where(GT == 1, 7, GT), 3)
    with pytest.raises(ValueError, match=r"roi shape \(3, 4\) != mined shape"):
        count_region_quality(MINED, GT, 3, ROI[0])
    with pytest.raises(ValueError, match="num_labels must be a positive int"):
        count_region_quality(MINED, GT, 0)
    with pytest.raises(ValueError, match="gt must be a numpy array or torch tensor"):
        count_region_quality(MINED, GT.tolist(), 3)
    counts = count_region_quality(MINED, GT, 3)
    with pytest.raises(ValueError, match="counts of 4 labels to counts of 3"):
        counts + count_region_quality(MINED, GT, 4)
    with pytest.raises(ValueError, match="numpy counts to torch counts"):
        counts + count_region_quality(torch.from_numpy(MINED), torch.from_numpy(GT), 3)

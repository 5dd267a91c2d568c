"""How good the reliable regions are, measured against ground-truth masks during training.

For a batch of mined pseudo labels (B,H,W) in {0..C-1, 255 = unreliable} and its ground truth
(B,H,W) with 255 = void, over the *valid* pixels (inside the crop's roi, ground truth known):

- precision = kept pixels whose mined label equals the ground truth / kept pixels;
- coverage  = kept pixels / valid pixels;

where a *kept* pixel is a valid pixel the mining gave a class label (not 255). Coverage divides by
the valid pixels, not by all pixels of the crop, because padding outside the roi holds no image and
void (boundary) pixels cannot be judged: both figures are then taken over the same pixels, and
precision × coverage is the fraction of valid pixels that are labelled correctly. A kept pixel on
void ground truth is in neither figure.

The same functions score any label map: the CAM pseudo label before the CRFs gives the
`cam_precision` / `cam_coverage` figures (`region_figures(counts, prefix="cam_")`). Without
ground truth there is nothing to score: the caller does not call these functions.

`count_region_quality` returns integer counts that add up over steps (`counts_a + counts_b`);
the ratios are taken only when read (`region_figures`, `per_class_precision`). For torch tensors the
counts stay on the tensors' device, so counting never waits for it; reading the figures does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from tool.metrics import integer_label_tensor
from voc12.lists import IGNORE_LABEL  # 255: unreliable in mined labels, void in ground truth

Array = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class RegionCounts:
    """Pixel counts of one or more batches; numpy int64 for numpy inputs, int64 tensors on the
    inputs' device for torch inputs. The per-class arrays have one entry per label 0..C-1, indexed
    by the *mined* label."""
    valid: Array              # 0-d: pixels inside the roi with known ground truth
    kept: Array               # 0-d: valid pixels with a mined class label
    correct: Array            # 0-d: kept pixels whose mined label equals the ground truth
    kept_per_class: Array     # (C,): kept pixels mined as class c
    correct_per_class: Array  # (C,): correct pixels mined as class c

    @property
    def num_labels(self) -> int:
        return int(self.kept_per_class.shape[0])

    def __add__(self, other: "RegionCounts") -> "RegionCounts":
        if not isinstance(other, RegionCounts):
            return NotImplemented
        if other.num_labels != self.num_labels:
            raise ValueError(f"RegionCounts: cannot add counts of {other.num_labels} labels to counts of "
                             f"{self.num_labels}")
        if isinstance(other.kept, torch.Tensor) != isinstance(self.kept, torch.Tensor):
            raise ValueError("RegionCounts: cannot add numpy counts to torch counts")
        return RegionCounts(self.valid + other.valid, self.kept + other.kept, self.correct + other.correct,
                            self.kept_per_class + other.kept_per_class,
                            self.correct_per_class + other.correct_per_class)

    def as_vector(self) -> torch.Tensor:
        """[valid, kept, correct, kept per class..., correct per class...] as one (3 + 2C,) int64
        tensor on the counts' device, so that one copy reads them all (`from_vector` inverts it)."""
        parts = [torch.as_tensor(part).reshape(-1) for part in
                 (self.valid, self.kept, self.correct, self.kept_per_class, self.correct_per_class)]
        return torch.cat(parts).to(torch.int64)

    @staticmethod
    def from_vector(values: Sequence[int] | np.ndarray, num_labels: int) -> "RegionCounts":
        """The numpy counts of an `as_vector` read back (e.g. `.tolist()`), for `num_labels` labels."""
        values = np.asarray(values, dtype=np.int64)
        if values.shape != (3 + 2 * num_labels,):
            raise ValueError(f"RegionCounts.from_vector: expected {3 + 2 * num_labels} values for {num_labels} "
                             f"labels, got shape {values.shape}")
        return RegionCounts(values[0], values[1], values[2], values[3:3 + num_labels], values[3 + num_labels:])


def _check_host_labels(values: torch.Tensor, name: str, num_labels: int) -> None:
    """Array must be 0..C-1 or 255. Only checked on the host: on an accelerator reading the
    result of the check would wait for the device."""
    if values.device.type != "cpu" or values.numel() == 0:
        return
    bad = (values < 0) | ((values >= num_labels) & (values != IGNORE_LABEL))
    if bool(bad.any()):
        found = torch.unique(values[bad])[:5].tolist()
        raise ValueError(f"count_region_quality: {name} has labels outside 0..{num_labels - 1} and "
                         f"{IGNORE_LABEL}: {found}")


def _roi_tensor(roi: Array, shape: torch.Size, device: torch.device) -> torch.Tensor:
    if isinstance(roi, np.ndarray):
        roi = torch.from_numpy(np.ascontiguousarray(roi))
    if not isinstance(roi, torch.Tensor) or roi.is_complex():
        raise ValueError(f"count_region_quality: roi must be a numpy array or torch tensor of 0/1 or bool, "
                         f"got {type(roi).__name__}")
    if roi.shape != shape:
        raise ValueError(f"count_region_quality: roi shape {tuple(roi.shape)} != mined shape {tuple(shape)}")
    return roi.to(device, non_blocking=True) != 0


def _per_label_counts(labels: torch.Tensor, selected: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(C,) int64: how many selected pixels carry each label. scatter_add, not bincount: CUDA's
    bincount reads the maximum back to the host to size its output."""
    index = torch.where(selected, labels, torch.full((), num_labels, dtype=labels.dtype, device=labels.device))
    counts = torch.zeros(num_labels + 1, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(0, index.reshape(-1).to(torch.int64), torch.ones(index.numel(), dtype=torch.int64,
                                                                          device=labels.device))
    return counts[:num_labels]


def count_region_quality(mined: Array, gt: Array, num_labels: int, roi: Array | None = None) -> RegionCounts:
    """Counts of the quality of the mined labels of one batch (see the module docstring).

    mined (B,H,W) integer in {0..num_labels-1, 255 = not kept}; gt (B,H,W) integer in
    {0..num_labels-1, 255 = void}; roi (B,H,W) optional, nonzero = a real pixel of the crop (all
    pixels when None); num_labels C, background included (21 for VOC).

    If mined or gt is a torch tensor, the counting runs in torch on mined's device (gt's when only
    gt is a tensor) and returns tensors there, without waiting for the device; else numpy arrays.
    Array outside the allowed values raise ValueError on the host (numpy, CPU tensors); on an
    accelerator they are not checked (that would wait for the device) and such a mined pixel is
    not kept.
    """
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"count_region_quality: num_labels must be a positive int, got {num_labels!r}")
    if num_labels > IGNORE_LABEL:
        raise ValueError(f"count_region_quality: num_labels must be <= {IGNORE_LABEL} (255 marks ignored "
                         f"pixels), got {num_labels}")
    as_torch = isinstance(mined, torch.Tensor) or isinstance(gt, torch.Tensor)
    device = mined.device if isinstance(mined, torch.Tensor) else gt.device if isinstance(gt, torch.Tensor) else None
    mined_t = integer_label_tensor(mined, "mined", "count_region_quality")
    mined_t = mined_t if device is None else mined_t.to(device, non_blocking=True)
    gt_t = integer_label_tensor(gt, "gt", "count_region_quality").to(mined_t.device, non_blocking=True)
    if mined_t.ndim != 3:
        raise ValueError(f"count_region_quality: mined must be (B,H,W), got shape {tuple(mined_t.shape)}")
    if gt_t.shape != mined_t.shape:
        raise ValueError(f"count_region_quality: gt shape {tuple(gt_t.shape)} != mined shape "
                         f"{tuple(mined_t.shape)}")
    _check_host_labels(mined_t, "mined", num_labels)
    _check_host_labels(gt_t, "gt", num_labels)

    valid = gt_t != IGNORE_LABEL
    if roi is not None:
        valid = valid & _roi_tensor(roi, mined_t.shape, mined_t.device)
    kept = valid & (mined_t >= 0) & (mined_t < num_labels)
    correct = kept & (mined_t == gt_t)
    kept_per_class = _per_label_counts(mined_t, kept, num_labels)
    correct_per_class = _per_label_counts(mined_t, correct, num_labels)
    counts = (valid.sum(), kept_per_class.sum(), correct_per_class.sum(), kept_per_class, correct_per_class)
    if not as_torch:
        counts = tuple(value.numpy() for value in counts)
    return RegionCounts(*counts)


def _ratio(numerator: Array, denominator: Array) -> float | None:
    denominator = int(denominator)
    return None if denominator == 0 else int(numerator) / denominator


def region_figures(counts: RegionCounts, prefix: str = "") -> dict[str, float | None]:
    """{prefix + 'precision', prefix + 'coverage'} as floats in 0..1 (reads the counts: for tensors on
    an accelerator, this is where the host waits). A figure whose denominator is 0 is None: precision
    when no valid pixel was kept (e.g. everything mined 255), coverage when no pixel was valid.
    Use prefix 'cam_' for the CAM pseudo label's counts."""
    if not isinstance(counts, RegionCounts):
        raise ValueError(f"region_figures: counts must be RegionCounts, got {type(counts).__name__}")
    return {f"{prefix}precision": _ratio(counts.correct, counts.kept),
            f"{prefix}coverage": _ratio(counts.kept, counts.valid)}


def region_figures_by_prefix(counts: Mapping[str, RegionCounts]) -> dict[str, float | None]:
    """The `region_figures` of each prefix's counts ('' = mined labels, 'cam_' = CAM labels), in one dict."""
    return {key: value for prefix, total in counts.items() for key, value in region_figures(total, prefix).items()}


def per_class_precision(counts: RegionCounts) -> dict[int, float]:
    """{label: precision over the kept pixels mined as that label}; labels with no kept pixel are left out."""
    if not isinstance(counts, RegionCounts):
        raise ValueError(f"per_class_precision: counts must be RegionCounts, got {type(counts).__name__}")
    kept = np.asarray(counts.kept_per_class.tolist(), dtype=np.int64)
    correct = np.asarray(counts.correct_per_class.tolist(), dtype=np.int64)
    return {int(label): int(correct[label]) / int(kept[label]) for label in np.flatnonzero(kept)}


def quality_summary(counts: Mapping[str, RegionCounts], label_names: Sequence[str]) -> dict:
    """JSON-ready summary of accumulated counts by prefix ('' = mined labels, 'cam_' = CAM labels):
    the figures of each, `<prefix>per_class_precision` {label name: precision}, and the raw
    `counts` {prefix: `as_vector` list} from which `summary_counts` restores them."""
    summary: dict = {}
    for prefix, total in counts.items():
        if total.num_labels != len(label_names):
            raise ValueError(f"quality_summary: {len(label_names)} label names for counts of {total.num_labels} labels")
        summary.update(region_figures(total, prefix))
        summary[f"{prefix}per_class_precision"] = {label_names[label]: value
                                                   for label, value in per_class_precision(total).items()}
    summary["counts"] = {prefix: total.as_vector().tolist() for prefix, total in counts.items()}
    return summary


def summary_counts(summary: Mapping, num_labels: int) -> dict[str, RegionCounts]:
    """The counts a `quality_summary` holds (ValueError when they are not counts of `num_labels` labels)."""
    stored = summary.get("counts")
    if not isinstance(stored, dict):
        raise ValueError("quality summary without 'counts'")
    return {prefix: RegionCounts.from_vector(values, num_labels) for prefix, values in stored.items()}

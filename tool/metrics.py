"""Segmentation metrics (confusion matrix, IoU) and torchvision-references-style logging helpers."""
from __future__ import annotations

import datetime
import math
import time
from collections import defaultdict, deque
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from voc12.lists import IGNORE_LABEL, VOC12, DatasetInfo


def _is_dist_initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def integer_label_tensor(values: np.ndarray | torch.Tensor, name: str, caller: str) -> torch.Tensor:
    """values as a tensor of integer labels (numpy arrays wrapped without a copy); else a ValueError
    naming `caller` and the argument `name`."""
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(np.ascontiguousarray(values))
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{caller}: {name} must be a numpy array or torch tensor, got {type(values).__name__}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"{caller}: {name} must hold integer labels, got {values.dtype}")
    return values


class ConfusionMatrix:
    """Pixel confusion matrix `mat[gt, pred]` over `num_classes` labels; `ignore_index` in gt is skipped.

    IoU of class c = TP / (TP + FP + FN). A class whose union is 0 (absent from both ground truth
    and prediction over the whole set) has IoU NaN and is left out of the mean (nan-aware mean).
    """

    def __init__(self, num_classes: int = 21, ignore_index: int = 255,
                 class_names: Sequence[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"ConfusionMatrix: {len(class_names)} class_names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, gt: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor) -> None:
        """Add one label map pair (any equal shapes). Pixels where gt == ignore_index are skipped."""
        gt_t = integer_label_tensor(gt, "gt", "ConfusionMatrix.update").to(torch.int64)
        pred_t = integer_label_tensor(pred, "pred", "ConfusionMatrix.update").to(device=gt_t.device, dtype=torch.int64)
        if gt_t.shape != pred_t.shape:
            raise ValueError(f"ConfusionMatrix.update: gt shape {tuple(gt_t.shape)} != "
                             f"pred shape {tuple(pred_t.shape)}")
        n = self.num_classes
        valid = gt_t != self.ignore_index
        gt_v, pred_v = gt_t[valid], pred_t[valid]
        for name, values in (("gt", gt_v), ("pred", pred_v)):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= n):
                raise ValueError(f"ConfusionMatrix.update: {name} has labels outside 0..{n - 1} "
                                 f"(min {int(values.min())}, max {int(values.max())}) "
                                 f"besides ignore_index {self.ignore_index}")
        counts = torch.bincount(gt_v * n + pred_v, minlength=n * n).reshape(n, n)
        self.mat = self.mat.to(counts.device) + counts

    def merge(self, other: "ConfusionMatrix") -> None:
        """Add the counts of another matrix with the same number of classes."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"ConfusionMatrix.merge: {other.num_classes} classes vs {self.num_classes}")
        self.mat = self.mat + other.mat.to(self.mat.device)

    def reset(self) -> None:
        self.mat.zero_()

    def reduce_from_all_processes(self) -> None:
        """Sum the matrix over all ranks of an initialised process group (no-op otherwise)."""
        if not _is_dist_initialised():
            return
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        mat = self.mat.to(device)
        dist.barrier()
        dist.all_reduce(mat)
        self.mat = mat.cpu()

    def compute(self) -> dict:
        """{'iou': list per class (NaN where union is 0), 'mean_iou', 'pixel_accuracy',
        'class_accuracy': per-class recall, 'num_pixels'}; fractions in 0..1."""
        h = self.mat.double().cpu()
        true_positive = torch.diag(h)
        gt_count, pred_count = h.sum(1), h.sum(0)
        union = gt_count + pred_count - true_positive
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), nan)
        class_accuracy = torch.where(gt_count > 0, true_positive / gt_count.clamp(min=1), nan)
        total = h.sum()
        present = ~torch.isnan(iou)
        return {
            "iou": iou.tolist(),
            "mean_iou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
            "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else float("nan"),
            "class_accuracy": class_accuracy.tolist(),
            "num_pixels": int(total),
        }

    def names(self) -> list[str]:
        return self.class_names or [str(c) for c in range(self.num_classes)]

    def as_dict(self) -> dict:
        """JSON-ready result: mean_iou, pixel_accuracy, num_pixels, iou {class name: IoU}; NaN -> None."""
        result = self.compute()

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else value
        return {"mean_iou": clean(result["mean_iou"]), "pixel_accuracy": clean(result["pixel_accuracy"]),
                "num_pixels": result["num_pixels"],
                "iou": {name: clean(v) for name, v in zip(self.names(), result["iou"])}}

    def __str__(self) -> str:
        result = self.compute()
        names = self.names()
        width = max(len("pixel accuracy"), *(len(name) for name in names))
        lines = [f"{'class':<{width}}  {'IoU':>7}"]
        for name, iou in zip(names, result["iou"]):
            lines.append(f"{name:<{width}}  {'n/a' if math.isnan(iou) else f'{100 * iou:6.2f}%':>7}")
        lines.append(f"{'mean IoU':<{width}}  {100 * result['mean_iou']:6.2f}%")
        lines.append(f"{'pixel accuracy':<{width}}  {100 * result['pixel_accuracy']:6.2f}%")
        return "\n".join(lines)


def segmentation_confusion_matrix(info: DatasetInfo = VOC12) -> ConfusionMatrix:
    """The matrix every mIoU here is scored with: background + the data set's classes (VOC 20,
    COCO 80), 255 ignored."""
    return ConfusionMatrix(info.num_seg_classes, IGNORE_LABEL, info.seg_class_names)


class SmoothedValue:
    """Tracks a series of values; gives smoothed values over a window and the global average."""

    def __init__(self, window_size: int = 20, fmt: str | None = None) -> None:
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over ranks (the window stays local)."""
        if not _is_dist_initialised():
            return
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.barrier()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else float("nan")

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else float("nan")

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else float("nan")

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Named SmoothedValues plus `log_every`, an iterator wrapper printing progress and timings."""

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: float | torch.Tensor) -> None:
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (float, int)):
                raise ValueError(f"MetricLogger.update: {name} must be a number, got {type(value).__name__}")
            self.meters[name].update(value)

    def __getattr__(self, attr: str) -> SmoothedValue:
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "",
                  print_fn: Callable[[str], Any] = print) -> Iterator:
        """Yield from `iterable`, printing meters, ETA and iteration/data times every `print_freq` items."""
        start = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        total = len(iterable) if hasattr(iterable, "__len__") else None
        count_width = len(str(total)) if total else 1
        i = 0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or (total is not None and i == total - 1):
                position = f"[{i:>{count_width}}/{total}]" if total else f"[{i}]"
                eta = ""
                if total is not None:
                    eta_seconds = iter_time.global_avg * (total - i - 1)
                    eta = f"eta: {datetime.timedelta(seconds=int(eta_seconds))}"
                print_fn(self.delimiter.join(part for part in (
                    header, position, eta, str(self), f"time: {iter_time}", f"data: {data_time}") if part))
            i += 1
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        per_item = (time.time() - start) / max(i, 1)
        print_fn(f"{header} Total time: {elapsed} ({per_item:.4f} s / it)")

"""Reliable region mining (SPEC §5): CAM + two dense CRFs -> pseudo label with 255 = unreliable.

The class count is the label vectors' length (VOC's 20, COCO's 80): CAMs and labels must agree on
it, and only the present classes reach the CRFs."""
import multiprocessing
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from tool.crf import TRAINING_CRF_PARAMS, dense_crf_same_image, resolve_crf_backend
from tool.crf_torch import training_crf_torch
from tool.lattice import float32_value
from tool.device import cores_per_process
from voc12.lists import IGNORE_LABEL

CAM_FLOOR = 0.1          # CAM values at or below this never set a class threshold
CAM_QUANTILE = 0.6       # position of the class threshold among the sorted CAM values
BG_CAM_SURE = 0.8        # bg score above which background pixels are sure
CRF_SURE = 0.8           # CRF marginal below which a pixel is not sure
BG_POWER_CAM = 32        # bg = (1 - max)^32 in the CAM map
LOW_ALPHA, HIGH_ALPHA = 4, 32
# Libraries in the workers must not spawn one thread per core each: the pool already does.
_SINGLE_THREAD_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                             "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


def normalise_cam(cam: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Zero the absent classes of an upsampled CAM (C,H,W) and divide each map by (max + 1e-5);
    label (C,) multi-hot, C the class count."""
    cam = np.asarray(cam)
    label = np.asarray(label)
    if label.ndim != 1 or label.size < 1:
        raise ValueError(f"normalise_cam: label must be a (C,) vector, got shape {label.shape}")
    num_classes = label.shape[0]
    if cam.ndim != 3 or cam.shape[0] != num_classes:
        raise ValueError(f"normalise_cam: cam must be ({num_classes}, H, W) for a label of {num_classes} "
                         f"classes, got shape {cam.shape}")
    present = (label > 1e-5).reshape(num_classes, 1, 1)
    masked = np.where(present, cam, 0).astype(cam.dtype, copy=False)
    return masked / (masked.max(axis=(1, 2), keepdims=True) + 1e-5)


def _check_mining_inputs(image: np.ndarray, label: np.ndarray, norm_cam: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        raise ValueError(f"mine_reliable_regions: image must be uint8 H x W x 3, got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    if len(np.shape(label)) != 1 or np.size(label) < 1:
        raise ValueError(f"mine_reliable_regions: label must be a (C,) vector, got shape {np.shape(label)}")
    num_classes = np.shape(label)[0]
    if np.shape(norm_cam) != (num_classes,) + image.shape[:2]:
        raise ValueError(f"mine_reliable_regions: norm_cam must have shape "
                         f"({num_classes}, {image.shape[0]}, {image.shape[1]}) for a label of {num_classes} "
                         f"classes, got {np.shape(norm_cam)}")


def _class_thresholds(classes: np.ndarray, cam_img: np.ndarray, cam_value: np.ndarray) -> np.ndarray:
    """Per-label threshold, indexed by label (0 = bg) up to the largest of cam_img and classes: a
    pixel of cam_img class c is CAM-sure iff its score > thr[c]."""
    # Same dtype as the scores: the released code compares float32 maps with Python floats in float32.
    largest_label = int(max(cam_img.max(initial=0), classes.max(initial=0)))
    thresholds = np.full(largest_label + 1, np.inf, dtype=cam_value.dtype)
    for class_index in classes:
        if class_index == 0:
            thresholds[0] = BG_CAM_SURE
            continue
        values = cam_value[(cam_img == class_index) & (cam_value > CAM_FLOOR)]
        if values.size == 0:
            continue  # the released code crashes here; the class simply has no sure pixel
        position = int(values.size * CAM_QUANTILE)
        thresholds[class_index] = np.partition(values, position)[position]
    return thresholds


def mine_reliable_regions(image: np.ndarray, label: np.ndarray, norm_cam: np.ndarray,
                          backend: str = "auto") -> np.ndarray:
    """Pseudo label (H,W) int64 in {0..C, 255} of one crop, SPEC §5; label (C,), norm_cam (C,H,W).

    Works on [bg; present classes] channels only: absent classes are 0 in the released (C+1)-channel
    maps and never win an argmax there (the winner is > 0), so the labels are identical.
    backend: a --crf_backend value; these are CPU arrays, so auto = pydensecrf (released); torch runs
    `mine_reliable_regions_torch` with the torch CRF on the CPU.
    """
    _check_mining_inputs(image, label, norm_cam)
    if resolve_crf_backend(backend, "cpu") == "torch":
        image_tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        norm_cams = torch.from_numpy(np.ascontiguousarray(norm_cam, dtype=np.float32))[None]
        return mine_reliable_regions_torch(image_tensor, np.asarray(label)[None], norm_cams,
                                           training_crf_torch)[0].numpy()
    present = np.flatnonzero(np.asarray(label) > 1e-5)
    if present.size == 0:
        # A one-label CRF has marginal 1 everywhere and bg CAM is 1: everything is sure background.
        return np.zeros(image.shape[:2], dtype=np.int64)
    channel_label = np.concatenate(([0], present + 1))
    present_cams = norm_cam[present]
    present_max = np.max(present_cams, axis=0, keepdims=True)
    # The CAM bg takes the max over all C channels, absent ones being 0.
    all_max = present_max if present.size == len(label) else np.maximum(present_max, 0)
    cam_all = np.concatenate((np.power(1 - all_max, BG_POWER_CAM), present_cams))
    cam_img = channel_label[np.argmax(cam_all, axis=0)]
    cam_value = np.max(cam_all, axis=0)

    crf_la, crf_ha = dense_crf_same_image(
        image, [np.concatenate((np.power(1 - present_max, alpha), present_cams))
                for alpha in (LOW_ALPHA, HIGH_ALPHA)], **TRAINING_CRF_PARAMS)
    crf_la_label = channel_label[np.argmax(crf_la, axis=0)]

    pseudo_label = np.where(crf_la_label == 0, IGNORE_LABEL, crf_la_label)
    # Thresholds exceed 0 so "score > thr[cam_img]" also restricts class c to pixels where cam_img == c.
    thresholds = _class_thresholds(np.unique(crf_la_label), cam_img, cam_value)
    cam_sure = cam_value > thresholds[cam_img]

    pseudo_label[np.argmax(crf_ha, axis=0) == 0] = 0
    # The released code compares float64 copies of the marginals with 0.8.
    crf_confidence = np.maximum(crf_ha[0], crf_la[1:].max(axis=0)).astype(np.float64)
    not_sure = ~cam_sure | (crf_confidence < CRF_SURE)
    pseudo_label[not_sure] = IGNORE_LABEL
    return pseudo_label


def _mine_packed(image: np.ndarray, label: np.ndarray, present: np.ndarray,
                 present_cams: np.ndarray) -> np.ndarray:
    """Worker entry: rebuild the full C-channel CAM from the present channels sent over the pipe."""
    norm_cam = np.zeros((len(label),) + present_cams.shape[1:], dtype=present_cams.dtype)
    norm_cam[present] = present_cams
    return mine_reliable_regions(image, label, norm_cam)


@contextmanager
def _single_thread_environment() -> Iterator[None]:
    """Spawned children inherit the environment at start: set 1 thread for their native libs."""
    saved = {name: os.environ.get(name) for name in _SINGLE_THREAD_ENV}
    os.environ.update(_SINGLE_THREAD_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ReliableRegionMiner:
    """Mines a batch of pseudo labels in a persistent pool of worker processes.

    workers: None = this process's share of the node's usable cores (`cores_per_process`: affinity,
    cgroup quota, divided among torchrun's local processes), 0 = in-process. Workers are spawned (not
    forked), so a parent that already runs torch/OpenMP threads cannot deadlock them.
    """

    def __init__(self, workers: int | None = None) -> None:
        if workers is None:
            workers = cores_per_process()
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"ReliableRegionMiner: mining_workers must be an int >= 0, got {workers!r}")
        self.workers = workers
        self._pool = None
        if workers > 0:
            with _single_thread_environment():
                self._pool = multiprocessing.get_context("spawn").Pool(processes=workers)

    def __call__(self, images: np.ndarray, labels: np.ndarray, norm_cams: np.ndarray) -> np.ndarray:
        images, labels, norm_cams = np.asarray(images), np.asarray(labels), np.asarray(norm_cams)
        if images.ndim != 4 or labels.ndim != 2 or norm_cams.ndim != 4 \
                or not images.shape[0] == labels.shape[0] == norm_cams.shape[0]:
            raise ValueError(f"ReliableRegionMiner: expected images (B,H,W,3), labels (B,C), "
                             f"norm_cams (B,C,H,W); got {images.shape}, {labels.shape}, {norm_cams.shape}")
        if self.workers > 0 and self._pool is None:
            raise RuntimeError("ReliableRegionMiner: the worker pool was closed")
        if self._pool is None:
            results = [mine_reliable_regions(*item) for item in zip(images, labels, norm_cams)]
        else:
            # Only the present classes' maps travel to the workers. Longest jobs first (a CRF's time
            # grows with its labels), so no worker is left with a long image at the end.
            jobs = [(image, label, np.flatnonzero(label > 1e-5), norm_cam[label > 1e-5])
                    for image, label, norm_cam in zip(images, labels, norm_cams)]
            order = sorted(range(len(jobs)), key=lambda index: -jobs[index][2].size)
            mined = self._pool.starmap(_mine_packed, [jobs[index] for index in order], chunksize=1)
            results = [None] * len(jobs)
            for index, label_map in zip(order, mined):
                results[index] = label_map
        return np.stack(results) if results else np.zeros((0,) + images.shape[1:3], dtype=np.int64)

    def close(self) -> None:
        """Stop the worker processes; the miner cannot be used afterwards (unless in-process)."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "ReliableRegionMiner":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# Batched torch mining (SPEC §5) that stays on the inputs' device, without host-device syncs.
# ------------------------------------------------------------------------------------------------

# A CRF over a batch: images (B,3,H,W) uint8, probs (B,2,K,H,W) for alpha 4 and 32 with channels
# [bg; present classes ascending; padding], label_mask (B,K) bool (False = padding, an absent label)
# -> marginals (B,2,K,H,W) on probs' device (tool/crf_torch.py is to provide one on the GPU).
BatchCRF = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PowerMode = Literal["auto", "numpy", "float64"]

# Constants rounded to float32 once: comparing a float32 tensor with them gives the NEP 50 float32
# comparison of the numpy path whether torch compares in float32 or float64.
_F32_CAM_FLOOR = float32_value(CAM_FLOOR)
_F32_BG_CAM_SURE = float32_value(BG_CAM_SURE)
_LABEL_PRESENT = 1e-5


def _present_classes_host(labels: "torch.Tensor | np.ndarray", name: str) -> np.ndarray:
    """labels (B,C) on the host -> bool (B,C) with numpy's `label > 1e-5` (in labels' dtype)."""
    if isinstance(labels, torch.Tensor):
        if labels.device.type != "cpu":
            raise ValueError(f"{name}: labels must be a host (CPU) tensor or numpy array, the channel "
                             f"layout is decided on the host; got a tensor on {labels.device} (pass "
                             f"the loader's CPU copy: reading a device tensor would synchronise)")
        labels = labels.detach().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] < 1:
        raise ValueError(f"{name}: labels must be (B, C), got shape {labels.shape}")
    return labels > _LABEL_PRESENT


def normalise_cams_torch(cams: torch.Tensor, labels: "torch.Tensor | np.ndarray") -> torch.Tensor:
    """`normalise_cam` of each image of a batch: cams (B,C,H,W) float32/float64 on any device,
    labels (B,C) (any device, or numpy) -> (B,C,H,W) on cams' device, same dtype.

    Absent classes (label <= 1e-5) become 0, each map is divided by (its spatial max + 1e-5), all in
    cams' dtype as numpy does (NEP 50: the Python 1e-5 is rounded to that dtype), so the result equals
    `normalise_cam` bit for bit. No host-device synchronisation.
    """
    if not isinstance(cams, torch.Tensor) or cams.ndim != 4:
        raise ValueError(f"normalise_cams_torch: cams must be a (B, C, H, W) tensor, got "
                         f"{type(cams).__name__} {tuple(getattr(cams, 'shape', ()))}")
    if cams.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"normalise_cams_torch: cams must be float32 or float64, got {cams.dtype}")
    if not isinstance(labels, torch.Tensor):
        labels = torch.from_numpy(np.asarray(labels))
    if labels.shape != cams.shape[:2]:
        raise ValueError(f"normalise_cams_torch: labels must be ({cams.shape[0]}, {cams.shape[1]}) to "
                         f"match cams, got {tuple(labels.shape)}")
    if labels.is_floating_point():
        # numpy compares in the labels' dtype: round 1e-5 to it.
        present = labels > torch.tensor(_LABEL_PRESENT, dtype=labels.dtype)
    else:
        present = labels > 0
    present = present.to(cams.device, non_blocking=True)[:, :, None, None]
    masked = torch.where(present, cams, torch.zeros((), dtype=cams.dtype, device=cams.device))
    return masked / (masked.amax(dim=(2, 3), keepdim=True) + _LABEL_PRESENT)


def _power_float64(base: torch.Tensor, exponent: int) -> torch.Tensor:
    """base**exponent (non-negative int) by square-and-multiply in float64, rounded once to base's
    dtype. IEEE float64 products are the same on every device, so the result is too; for
    float32 bases 1 - m it equals the correctly rounded power (checked for every float32 1 - m,
    m in [0, 1], for exponents 4 and 32)."""
    result = torch.ones_like(base, dtype=torch.float64)
    square = base.to(torch.float64)
    while exponent:
        if exponent & 1:
            result = result * square
        exponent >>= 1
        if exponent:
            square = square * square
    return result.to(base.dtype)


def _power(base: torch.Tensor, exponent: int, mode: PowerMode) -> torch.Tensor:
    """The bg powers (1 - max)^alpha. 'numpy': numpy's own float32 power on the CPU tensor's memory
    (numpy uses SVML on AVX-512 CPUs, which is off by 1 ulp from the correctly rounded value for ~20%
    of inputs, so only numpy itself reproduces the numpy path); 'float64': `_power_float64`, the same
    on every device; 'auto': numpy on CPU tensors, float64 elsewhere."""
    if mode == "auto":
        mode = "numpy" if base.device.type == "cpu" else "float64"
    if mode == "float64":
        return _power_float64(base, exponent)
    if base.device.type != "cpu":
        raise ValueError(f"mine_reliable_regions_torch: power='numpy' needs CPU tensors, got {base.device}")
    return torch.from_numpy(np.power(base.detach().numpy(), exponent))


def _first_argmax(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, argmax) over dim 1 of (B,K,H,W) with numpy's rules: the first maximal index, and the
    first NaN if there is one. A loop over the few channels: torch's CPU argmax over a non-inner
    dimension is several times slower than these K elementwise steps (the same on a GPU)."""
    best = maps[:, 0]
    index = torch.zeros(best.shape, dtype=torch.int64, device=maps.device)
    for channel in range(1, maps.shape[1]):
        value = maps[:, channel]
        better = (value > best) | (torch.isnan(value) & ~torch.isnan(best))
        best = torch.where(better, value, best)
        index = torch.where(better, torch.full((), channel, dtype=torch.int64, device=maps.device), index)
    return best, index


def _check_torch_mining_inputs(images: torch.Tensor, norm_cams: torch.Tensor, crf: BatchCRF,
                               power: str) -> None:
    name = "mine_reliable_regions_torch"
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] != 3:
        raise ValueError(f"{name}: images must be a uint8 (B, 3, H, W) tensor, got "
                         f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    batch, _, height, width = images.shape
    if not isinstance(norm_cams, torch.Tensor) or norm_cams.ndim != 4 \
            or (norm_cams.shape[0], *norm_cams.shape[2:]) != (batch, height, width):
        raise ValueError(f"{name}: norm_cams must be a ({batch}, C, {height}, {width}) tensor "
                         f"to match images, got {type(norm_cams).__name__} "
                         f"{tuple(getattr(norm_cams, 'shape', ()))}")
    if norm_cams.dtype != torch.float32:
        raise ValueError(f"{name}: norm_cams must be float32 (the numpy path's dtype), got {norm_cams.dtype}")
    if norm_cams.device != images.device:
        raise ValueError(f"{name}: norm_cams is on {norm_cams.device} but images on {images.device}")
    if not callable(crf):
        raise ValueError(f"{name}: crf must be callable (images, probs, label_mask) -> marginals")
    if power not in ("auto", "numpy", "float64"):
        raise ValueError(f"{name}: power must be 'auto', 'numpy' or 'float64', got {power!r}")


def _channel_layout(present: np.ndarray) -> tuple[np.ndarray, int]:
    """Host table (B, 2, K) int64 of the padded [bg; present...] channels, K = 1 + most present:
    row 0 = the norm_cam channel each channel gathers (0 for bg and padding), row 1 = its label
    (0 for bg, class + 1, -1 for padding)."""
    counts = present.sum(axis=1)
    channels = 1 + int(counts.max(initial=0))
    table = np.zeros((present.shape[0], 2, channels), dtype=np.int64)
    table[:, 1, 1:] = -1
    for image_index, row in enumerate(present):
        classes = np.flatnonzero(row)
        table[image_index, 0, 1:1 + classes.size] = classes
        table[image_index, 1, 1:1 + classes.size] = classes + 1
    return table, channels


def _class_thresholds_torch(channel: torch.Tensor, cam_value: torch.Tensor, in_la_map: torch.Tensor
                            ) -> torch.Tensor:
    """Batched `_class_thresholds` by channel: channel (B,N) argmax channel of cam_all, cam_value (B,N)
    float32, in_la_map (B,K) bool (channel present in the low-alpha CRF label map) -> (B,K) float32.

    Channel j >= 1: the value at position int(count * 0.6) of the ascending CAM values of its pixels
    with value > 0.1 (+inf if none, or if j is not in the map); bg: 0.8 if in the map, else +inf.
    One sort of int64 keys (channel << 32 | float32 bits) per image: a member's value is > 0.1 > 0,
    and positive float32 bit patterns are ordered as the floats, so each channel's members form one
    ascending run, located with searchsorted; non-members get the key K << 32, after every run.
    """
    batch, pixels = channel.shape
    channels = in_la_map.shape[1]
    member = (channel >= 1) & (cam_value > _F32_CAM_FLOOR)
    bits = cam_value.view(torch.int32).to(torch.int64)
    keys = torch.where(member, torch.bitwise_left_shift(channel, 32) | bits,
                       torch.full((), channels << 32, dtype=torch.int64, device=channel.device))
    keys = torch.sort(keys, dim=1).values
    bounds = torch.bitwise_left_shift(torch.arange(channels + 1, device=channel.device), 32)
    starts = torch.searchsorted(keys, bounds.expand(batch, channels + 1).contiguous())
    counts = starts[:, 1:] - starts[:, :-1]
    # int(count * 0.6) in float64 like Python; counts >= 0, so floor is int()'s truncation.
    position = starts[:, :-1] + torch.floor(counts.to(torch.float64) * CAM_QUANTILE).to(torch.int64)
    picked = keys.gather(1, position.clamp(max=pixels - 1)) & 0xFFFFFFFF
    values = picked.to(torch.int32).view(torch.float32)
    infinity = torch.full((), float("inf"), dtype=torch.float32, device=channel.device)
    thresholds = torch.where((counts > 0) & in_la_map, values, infinity)
    bg = torch.where(in_la_map[:, 0], torch.full((), _F32_BG_CAM_SURE, dtype=torch.float32,
                                                 device=channel.device), infinity)
    return torch.cat((bg[:, None], thresholds[:, 1:]), dim=1)


class _CamMap(NamedTuple):
    """The CAM pseudo label of a batch on the padded [bg; present...] channels (`_channel_layout`)."""
    valid: torch.Tensor          # (B,K) bool: a real channel (False = padding)
    channel_label: torch.Tensor  # (B,K) int64: the label of each channel (0 = bg, class + 1, -1 padding)
    empty: torch.Tensor          # (B,1,1) bool: the image has no present class
    present_cams: torch.Tensor   # (B,K-1,H,W): the present classes' maps (padding: channel 0's map)
    present_max: torch.Tensor    # (B,H,W): their maximum (0 for an empty image)
    cam_value: torch.Tensor      # (B,H,W): the winning score of [(1 - max)^32; present cams]
    cam_channel: torch.Tensor    # (B,H,W) int64: its channel (first maximum)


def _cam_map(norm_cams: torch.Tensor, present: np.ndarray, power: PowerMode) -> _CamMap | None:
    """argmax of [(1 - max)^32; present cams] per pixel (SPEC §5 step 1), the bg using the max over all
    C channels, absent ones being 0 (so it equals the full-channel map); None when no image of the
    batch has a present class. No host-device synchronisation."""
    batch, _, height, width = norm_cams.shape
    device = norm_cams.device
    table_host, channels = _channel_layout(present)
    if channels == 1:
        return None
    table = torch.from_numpy(table_host).to(device, non_blocking=True)
    gather_index, channel_label = table[:, 0], table[:, 1]
    valid = channel_label >= 0
    num_present = valid.sum(dim=1) - 1
    empty = (num_present == 0)[:, None, None]
    has_absent = (num_present < present.shape[1])[:, None, None]

    index = gather_index[:, 1:, None, None].expand(batch, channels - 1, height, width)
    present_cams = norm_cams.gather(1, index)
    valid_cls = valid[:, 1:, None, None]
    zero = torch.zeros((), dtype=norm_cams.dtype, device=device)
    minus_inf = torch.full((), float("-inf"), dtype=norm_cams.dtype, device=device)
    present_max = torch.where(valid_cls, present_cams, minus_inf).amax(dim=1)
    present_max = torch.where(empty, zero, present_max)           # no class: probs [1], ignored
    all_max = torch.where(has_absent, torch.maximum(present_max, zero), present_max)
    cam_all = torch.cat((_power(1 - all_max, BG_POWER_CAM, power)[:, None],
                         torch.where(valid_cls, present_cams, minus_inf)), dim=1)
    cam_value, cam_channel = _first_argmax(cam_all)
    return _CamMap(valid, channel_label, empty, present_cams, present_max, cam_value, cam_channel)


def cam_label_maps(norm_cams: torch.Tensor | np.ndarray, labels: "torch.Tensor | np.ndarray", *,
                   power: PowerMode = "auto") -> torch.Tensor:
    """The CAM pseudo label before the CRFs (SPEC §5 step 1) of each image: argmax of
    [(1 - max_c norm_cam_c)^32; norm_cam_1..C] as (B,H,W) int64 in 0..C, on norm_cams' device (a
    numpy batch is read in place, on the CPU). norm_cams (B,C,H,W) with the absent classes 0, as
    `crop_norm_cams` leaves them; labels (B,C) on the host say which are present, and only those
    channels are read. No host-device synchronisation."""
    if isinstance(norm_cams, np.ndarray):
        norm_cams = torch.from_numpy(norm_cams)
    if not isinstance(norm_cams, torch.Tensor) or norm_cams.ndim != 4 or not norm_cams.is_floating_point():
        raise ValueError(f"cam_label_maps: norm_cams must be a float (B, C, H, W) array, got "
                         f"{type(norm_cams).__name__} {tuple(getattr(norm_cams, 'shape', ()))}")
    present = _present_classes_host(labels, "cam_label_maps")
    if present.shape != norm_cams.shape[:2]:
        raise ValueError(f"cam_label_maps: labels must be {tuple(norm_cams.shape[:2])} to match norm_cams, "
                         f"got {present.shape}")
    batch, _, height, width = norm_cams.shape
    cam_map = _cam_map(norm_cams, present, power)
    if cam_map is None:  # no class anywhere: bg (1 - 0)^32 = 1 wins every pixel
        return torch.zeros((batch, height, width), dtype=torch.int64, device=norm_cams.device)
    return cam_map.channel_label.gather(1, cam_map.cam_channel.flatten(1)).view(batch, height, width)


@torch.no_grad()
def mine_reliable_regions_torch(images: torch.Tensor, labels: "torch.Tensor | np.ndarray",
                                norm_cams: torch.Tensor, crf: BatchCRF, *,
                                power: PowerMode = "auto") -> torch.Tensor:
    """Batched `mine_reliable_regions` (SPEC §5) on the inputs' device, with no host-device sync.

    images (B,3,H,W) uint8 (the crops, `batch["original"]`); labels (B,C) on the host (CPU tensor or
    numpy: it decides the channel layout); norm_cams (B,C,H,W) float32 on images' device (see
    `normalise_cams_torch`); crf: `BatchCRF`, called once with probs (B,2,K,H,W) = the alpha 4 and 32
    maps [(1 - max)^alpha; present cams ascending; 0 padding], K = 1 + the batch's most present
    classes, and label_mask (B,K). Returns (B,H,W) int64 in {0..C, 255} on images' device.

    With marginals equal to `dense_crf_same_image`'s the result equals `mine_reliable_regions` pixel
    for pixel: float32 throughout, comparisons with 0.1/0.8 in float32, the CRF confidence compared
    with 0.8 in float64, first-index argmax, the CAM bg using max(present max, 0) unless all C
    classes are present, and an image without a present class all background (its CRF output is
    ignored). `power` picks the (1 - max)^alpha implementation (see `_power`): the default is exact
    on CPU; on other devices float64 squaring, within 1 ulp of numpy's float32 power.
    """
    name = "mine_reliable_regions_torch"
    _check_torch_mining_inputs(images, norm_cams, crf, power)
    present = _present_classes_host(labels, name)
    batch, _, height, width = images.shape
    if present.shape != norm_cams.shape[:2]:
        raise ValueError(f"{name}: labels must be ({batch}, {norm_cams.shape[1]}) to match images and "
                         f"norm_cams, got {present.shape}")
    device = images.device
    cam_map = _cam_map(norm_cams, present, power)
    if cam_map is None:  # no image has a present class: all sure background, no CRF
        return torch.zeros((batch, height, width), dtype=torch.int64, device=device)
    valid, channel_label, empty, present_cams, present_max, cam_value, cam_channel = cam_map
    channels = valid.shape[1]
    valid_cls = valid[:, 1:, None, None]
    zero = torch.zeros((), dtype=torch.float32, device=device)

    class_probs = torch.where(valid_cls, present_cams, zero)
    probs = torch.stack([torch.cat((_power(1 - present_max, alpha, power)[:, None], class_probs), dim=1)
                         for alpha in (LOW_ALPHA, HIGH_ALPHA)], dim=1)
    marginals = crf(images, probs, valid)
    if not isinstance(marginals, torch.Tensor) or marginals.shape != probs.shape \
            or marginals.device != probs.device:
        raise ValueError(f"{name}: crf must return marginals of shape {tuple(probs.shape)} on {device}, "
                         f"got {type(marginals).__name__} {tuple(getattr(marginals, 'shape', ()))} "
                         f"on {getattr(marginals, 'device', None)}")
    marginals = torch.where(valid[:, None, :, None, None], marginals,
                            torch.full((), float("-inf"), dtype=marginals.dtype, device=marginals.device))
    crf_la, crf_ha = marginals[:, 0], marginals[:, 1]
    la_channel = _first_argmax(crf_la)[1]                         # (B,H,W)
    la_label = channel_label.gather(1, la_channel.flatten(1)).view(batch, height, width)

    ignore = torch.full((), IGNORE_LABEL, dtype=torch.int64, device=device)
    pseudo_label = torch.where(la_channel == 0, ignore, la_label)
    # One scatter marks the channels the map uses (no any(): CUDA any/all have synchronised, pytorch 84291).
    in_la_map = torch.zeros((batch, channels), dtype=torch.bool, device=device).scatter_(1, la_channel.flatten(1), True)
    thresholds = _class_thresholds_torch(cam_channel.flatten(1), cam_value.flatten(1), in_la_map)
    cam_sure = cam_value > thresholds.gather(1, cam_channel.flatten(1)).view(batch, height, width)

    pseudo_label = torch.where(_first_argmax(crf_ha)[1] == 0, torch.zeros_like(pseudo_label), pseudo_label)
    # The numpy path compares float64 copies of the marginals with 0.8.
    crf_confidence = torch.maximum(crf_ha[:, 0], crf_la[:, 1:].amax(dim=1)).to(torch.float64)
    not_sure = ~cam_sure | (crf_confidence < CRF_SURE)
    pseudo_label = torch.where(not_sure, ignore, pseudo_label)
    return torch.where(empty, torch.zeros_like(pseudo_label), pseudo_label)


# ------------------------------------------------------------------------------------------------
# A training batch: the network's CAM -> crop size -> normalised -> mined (SPEC §9).
# ------------------------------------------------------------------------------------------------

def crop_norm_cams(cam: torch.Tensor, labels: "torch.Tensor | np.ndarray", size: tuple[int, int],
                   on_device: bool) -> np.ndarray | torch.Tensor:
    """CAM (B,C,h,w) -> `size` (bilinear, align_corners False), absent classes zeroed and each map
    normalised: (B,C,H,W) float32, a tensor on cam's device if `on_device`, else a numpy array.

    One image at a time, and only its present classes normalised into a zero-filled array:
    normalising leaves the others 0, and on the host their pages are never touched (with COCO's 80
    classes the full upsampled and normalised stacks were most of mining's memory). The upsampling
    takes all C channels, as a batch's does: with fewer, the CPU kernel rounds differently."""
    batch, num_classes = cam.shape[:2]
    height, width = size
    labels_np = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    shape = (batch, num_classes, height, width)
    norm_cams = torch.zeros(shape, dtype=torch.float32, device=cam.device) if on_device else np.zeros(shape, np.float32)
    for index in range(batch):
        present = np.flatnonzero(labels_np[index] > 1e-5)
        if present.size == 0:
            continue
        cam_up = F.interpolate(cam[index:index + 1].detach().float(), size=(height, width), mode="bilinear",
                               align_corners=False)
        if on_device:
            # The channel index goes to the device without waiting (a blocking copy would synchronise).
            channels = torch.from_numpy(present).to(cam.device, non_blocking=True)
            normalised = normalise_cams_torch(cam_up.index_select(1, channels), labels_np[index:index + 1, present])
            norm_cams[index].index_copy_(0, channels, normalised[0])
        else:
            present_up = cam_up[0].index_select(0, torch.from_numpy(present).to(cam.device)).cpu().numpy()
            norm_cams[index, present] = normalise_cam(present_up, labels_np[index, present])
    return norm_cams


def mine_norm_cams(norm_cams: np.ndarray | torch.Tensor, labels: torch.Tensor, originals: torch.Tensor,
                   miner: "ReliableRegionMiner | Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None"
                   ) -> np.ndarray | torch.Tensor:
    """Reliable-region mining of a batch on its uint8 crops `originals` (B,3,H,W): (B,H,W) in
    {0..C,255}. miner None = the torch backend: norm_cams a tensor (`crop_norm_cams(on_device=True)`),
    everything on its device (labels: the loader's CPU copy, which lays out the CRF channels on the
    host), a tensor there; else norm_cams a numpy array and a numpy array from the CPU miner."""
    if miner is None:
        return mine_reliable_regions_torch(originals.to(norm_cams.device, non_blocking=True), labels, norm_cams,
                                           training_crf_torch)
    images = np.ascontiguousarray(originals.cpu().numpy().transpose(0, 2, 3, 1), dtype=np.uint8)
    return miner(images, labels.detach().cpu().numpy(), norm_cams)


def mine_pseudo_labels(cam: torch.Tensor, labels: torch.Tensor, originals: torch.Tensor,
                       miner: "ReliableRegionMiner | Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None"
                       ) -> np.ndarray | torch.Tensor:
    """`crop_norm_cams` at the crops' size, then `mine_norm_cams` (miner None: on cam's device)."""
    return mine_norm_cams(crop_norm_cams(cam, labels, originals.shape[-2:], miner is None), labels, originals, miner)

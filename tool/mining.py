"""Reliable region mining (SPEC §5): CAM + two dense CRFs -> pseudo label with 255 = unreliable."""
import multiprocessing
import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from tool.crf import TRAINING_CRF_PARAMS, dense_crf_same_image
from tool.device import cores_per_process
from voc12.lists import IGNORE_LABEL, NUM_CLASSES

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
    """Zero the absent classes of an upsampled CAM (20,H,W) and divide each map by (max + 1e-5)."""
    cam = np.asarray(cam)
    label = np.asarray(label)
    if cam.ndim != 3 or cam.shape[0] != NUM_CLASSES:
        raise ValueError(f"normalise_cam: cam must be ({NUM_CLASSES}, H, W), got shape {cam.shape}")
    if label.shape != (NUM_CLASSES,):
        raise ValueError(f"normalise_cam: label must have shape ({NUM_CLASSES},), got {label.shape}")
    present = (label > 1e-5).reshape(NUM_CLASSES, 1, 1)
    masked = np.where(present, cam, 0).astype(cam.dtype, copy=False)
    return masked / (masked.max(axis=(1, 2), keepdims=True) + 1e-5)


def _check_mining_inputs(image: np.ndarray, label: np.ndarray, norm_cam: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        raise ValueError(f"mine_reliable_regions: image must be uint8 H x W x 3, got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    if np.shape(label) != (NUM_CLASSES,):
        raise ValueError(f"mine_reliable_regions: label must have shape ({NUM_CLASSES},), "
                         f"got {np.shape(label)}")
    if np.shape(norm_cam) != (NUM_CLASSES,) + image.shape[:2]:
        raise ValueError(f"mine_reliable_regions: norm_cam must have shape "
                         f"({NUM_CLASSES}, {image.shape[0]}, {image.shape[1]}), got {np.shape(norm_cam)}")


def _class_thresholds(classes: np.ndarray, cam_img: np.ndarray, cam_value: np.ndarray) -> np.ndarray:
    """Per-label threshold (21,): a pixel of cam_img class c is CAM-sure iff its score > thr[c]."""
    # Same dtype as the scores: the released code compares float32 maps with Python floats in float32.
    thresholds = np.full(NUM_CLASSES + 1, np.inf, dtype=cam_value.dtype)
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


def mine_reliable_regions(image: np.ndarray, label: np.ndarray, norm_cam: np.ndarray) -> np.ndarray:
    """Pseudo label (H,W) int64 in {0..20, 255} of one crop, SPEC §5.

    Works on [bg; present classes] channels only: absent classes are 0 in the released 21-channel
    maps and never win an argmax there (the winner is > 0), so the labels are identical.
    """
    _check_mining_inputs(image, label, norm_cam)
    present = np.flatnonzero(np.asarray(label) > 1e-5)
    if present.size == 0:
        # A one-label CRF has marginal 1 everywhere and bg CAM is 1: everything is sure background.
        return np.zeros(image.shape[:2], dtype=np.int64)
    channel_label = np.concatenate(([0], present + 1))
    present_cams = norm_cam[present]
    present_max = np.max(present_cams, axis=0, keepdims=True)
    # The CAM bg takes the max over all 20 channels, absent ones being 0.
    all_max = present_max if present.size == NUM_CLASSES else np.maximum(present_max, 0)
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
    """Worker entry: rebuild the full 20-channel CAM from the present channels sent over the pipe."""
    norm_cam = np.zeros((NUM_CLASSES,) + present_cams.shape[1:], dtype=present_cams.dtype)
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
            raise ValueError(f"ReliableRegionMiner: expected images (B,H,W,3), labels (B,20), "
                             f"norm_cams (B,20,H,W); got {images.shape}, {labels.shape}, {norm_cams.shape}")
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

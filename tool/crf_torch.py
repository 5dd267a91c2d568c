"""Mean-field dense CRF (Krähenbühl & Koltun) on the torch permutohedral lattice, as pydensecrf.

Computes what `tool.crf.dense_crf` / pydensecrf's `DenseCRF2D` computes for our calls: a Gaussian
(x/sxy, y/sxy) and a bilateral (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) kernel, x = column, each
with NORMALIZE_SYMMETRIC (norm = 1/sqrt(K·1 + 1e-20) in double, stored as float, applied before
and after filtering) and a Potts compatibility w (message −w·K̃Q); unary −log(clip(p, 1e-5, 1))
in the probabilities' dtype, cast to float32; Q0 = softmax(−unary); then per iteration
logits = −unary − (−w_g·K̃_g Q) − (−w_b·K̃_b Q) (Gaussian first, as added) and Q = exp(logits −
max) / Σ. The lattice filter includes each pixel's own contribution, as pydensecrf's does.

Batched over images and over several probability maps per image that share the kernels (one
lattice build per kernel and image): probs (B, M, K, H, W). Images of a batch may have different
label counts: label_mask (B, K) marks the real labels; padded labels get no probability mass and
leave the others' marginals exactly as if they were absent (their logits are −inf; channels are
filtered independently; densecrf's ≤ 2-label slice arithmetic is chosen per image from the real
count). No host–device synchronisation on CUDA.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from tool.crf import INFERENCE_CRF_PARAMS, PROB_CLIP, TRAINING_CRF_PARAMS
from tool.lattice import (
    DEFAULT_MEMORY_BUDGET,
    PermutohedralLattice,
    float32_value,
    bilateral_features,
    estimate_lattice_bytes,
)

_CRF_KEYS = ("iterations", "gauss_sxy", "gauss_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat")


def crf_bytes_per_image(height: int, width: int, num_maps: int, num_labels: int) -> int:
    """Approximate peak bytes per image of dense_crf_torch (both lattices, state, one filter)."""
    points = height * width
    channels = num_maps * num_labels
    lattices = estimate_lattice_bytes(1, points, 5, channels) + estimate_lattice_bytes(1, points, 2, channels)
    state = 4 * points * channels * 6  # unary, Q, logits, filter input/output, exp
    return lattices + state


def _check_images(images: object, batch: int, height: int, width: int) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise TypeError(f"images must be uint8 or floating point (0..255), got {images.dtype}")
    if tuple(images.shape) != (batch, 3, height, width):
        raise ValueError(f"images must have shape {(batch, 3, height, width)} to match probs, "
                         f"got {tuple(images.shape)}")
    return images


def _softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """pydensecrf's expAndNormalize over labels (dim 2) of (B, M, K, N); masked labels get 0."""
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    peak = logits.amax(dim=2, keepdim=True)
    if mask is not None:
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # no real label
    exp = torch.exp(logits - peak)
    total = exp.sum(dim=2, keepdim=True)
    if mask is not None:
        total = total.clamp_min(1e-30)  # >= 1 wherever a real label exists
    return exp / total


def _crf_chunk(images: Tensor, probs: Tensor, mask: Tensor | None, iterations: int,
               kernels: Sequence[tuple[float | None, float, float]], static_shapes: bool | None) -> Tensor:
    batch, maps, labels, height, width = probs.shape
    points = height * width
    channels = maps * labels
    value_size: int | Tensor = labels if mask is None else mask.sum(dim=1)
    lattices = []
    ones = torch.ones(batch, 1, points, dtype=torch.float32, device=images.device)
    for srgb, sxy, compat in kernels:
        lattice = PermutohedralLattice(bilateral_features(images, srgb, sxy), flavour="densecrf",
                                       static_shapes=static_shapes)
        filtered = lattice.filter(ones, value_size=1)
        norm = (1.0 / torch.sqrt(filtered.to(torch.float64) + 1e-20)).to(torch.float32)
        lattices.append((lattice, norm.view(batch, 1, 1, points), -float32_value(compat)))

    # Clip and log in the caller's dtype, then cast, as pydensecrf.utils.unary_from_softmax does.
    unary = -torch.log(torch.clamp(probs, PROB_CLIP, 1.0))
    neg_unary = (-unary.to(torch.float32)).reshape(batch, maps, labels, points)
    del unary
    label_mask = None if mask is None else mask.view(batch, 1, labels, 1)
    q = _softmax(neg_unary, label_mask)
    for _ in range(iterations):
        logits = neg_unary
        for lattice, norm, negative_compat in lattices:
            message = lattice.filter((q * norm).view(batch, channels, points), value_size=value_size)
            message = (message.view(batch, maps, labels, points) * norm) * negative_compat
            logits = logits - message
        q = _softmax(logits, label_mask)
    return q.view(batch, maps, labels, height, width)


def dense_crf_torch(images: Tensor, probs: Tensor, label_mask: Tensor | None = None, *,
                    iterations: int = 10, gauss_sxy: float = 3, gauss_compat: float = 3,
                    bilateral_sxy: float = 80, bilateral_srgb: float = 13, bilateral_compat: float = 10,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET, static_shapes: bool | None = None) -> Tensor:
    """Mean-field marginals of pydensecrf's dense CRF, float32, on the inputs' device.

    images: (B, 3, H, W) uint8 or float 0..255 (RGB); probs: (B, M, K, H, W) float (M maps per image
    sharing the kernels) or (B, K, H, W); label_mask: (B, K) bool, False = padding label, or None.
    Returns probs' shape. Images are processed in chunks within memory_budget bytes.
    """
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    single_map = probs.dim() == 4
    if single_map:
        probs = probs.unsqueeze(1)
    if probs.dim() != 5:
        raise ValueError(f"probs must have shape (B, M, K, H, W) or (B, K, H, W), got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be floating point, got {probs.dtype}")
    batch, maps, labels, height, width = probs.shape
    if min(batch, maps, labels, height, width) < 1:
        raise ValueError(f"probs must have no empty dimension, got {tuple(probs.shape)}")
    images = _check_images(images, batch, height, width)
    if images.device != probs.device:
        raise ValueError(f"images is on {images.device}, probs on {probs.device}")
    if label_mask is not None:
        if not isinstance(label_mask, Tensor) or label_mask.dtype != torch.bool \
                or tuple(label_mask.shape) != (batch, labels):
            raise ValueError(f"label_mask must be a bool tensor of shape {(batch, labels)}, got "
                             f"{getattr(label_mask, 'dtype', type(label_mask).__name__)} "
                             f"{tuple(getattr(label_mask, 'shape', ()))}")
        label_mask = label_mask.to(probs.device)
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations}")
    for name, value in (("gauss_sxy", gauss_sxy), ("bilateral_sxy", bilateral_sxy),
                        ("bilateral_srgb", bilateral_srgb)):
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    kernels = [(None, float(gauss_sxy), float(gauss_compat)),
               (float(bilateral_srgb), float(bilateral_sxy), float(bilateral_compat))]
    chunk = max(1, int(memory_budget) // crf_bytes_per_image(height, width, maps, labels))
    outputs = []
    for start in range(0, batch, chunk):
        part = slice(start, start + chunk)
        outputs.append(_crf_chunk(images[part], probs[part], None if label_mask is None else label_mask[part],
                                  int(iterations), kernels, static_shapes))
    result = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return result.squeeze(1) if single_map else result


def dense_crf_torch_params(images: Tensor, probs: Tensor, label_mask: Tensor | None = None,
                           params: Mapping[str, float] = TRAINING_CRF_PARAMS, **options) -> Tensor:
    """dense_crf_torch with a parameter dict of tool/crf.py (TRAINING_ / INFERENCE_CRF_PARAMS)."""
    unknown = set(params) - set(_CRF_KEYS)
    if unknown:
        raise ValueError(f"params has unknown CRF parameters {sorted(unknown)}; expected {_CRF_KEYS}")
    return dense_crf_torch(images, probs, label_mask, **params, **options)


def training_crf_torch(images: Tensor, probs: Tensor, label_mask: Tensor | None = None, **options) -> Tensor:
    """The mining CRF (SPEC §5, TRAINING_CRF_PARAMS) in torch."""
    return dense_crf_torch_params(images, probs, label_mask, TRAINING_CRF_PARAMS, **options)


def inference_crf_torch(images: Tensor, probs: Tensor, label_mask: Tensor | None = None, **options) -> Tensor:
    """The test-time CRF (SPEC §10, INFERENCE_CRF_PARAMS) in torch."""
    return dense_crf_torch_params(images, probs, label_mask, INFERENCE_CRF_PARAMS, **options)


def dense_crf_same_image_torch(image: np.ndarray, probs_list: Sequence[np.ndarray], *,
                               device: str | torch.device | None = None, **params) -> list[np.ndarray]:
    """`tool.crf.dense_crf_same_image` (H×W×3 uint8 image, K×H×W maps) through dense_crf_torch."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an H x W x 3 uint8 numpy array, got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    if not probs_list:
        raise ValueError("probs_list is empty")
    shapes = {np.shape(p) for p in probs_list}
    if len(shapes) != 1:
        raise ValueError(f"all probs must share one shape, got {sorted(shapes)}")
    images = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).unsqueeze(0).to(device)
    probs = torch.from_numpy(np.stack([np.asarray(p) for p in probs_list])).unsqueeze(0).to(device)
    marginals = dense_crf_torch(images, probs, **params)[0].cpu().numpy()
    return list(marginals)

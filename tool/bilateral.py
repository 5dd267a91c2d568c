"""Typed front end of the C++ `bilateralfilter` module (permutohedral lattice, SPEC §7)."""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

import bilateralfilter as _lattice

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_float32_array(name: str, data: ArrayLike) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if not isinstance(data, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(data).__name__}")
    if data.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (N, C, H, W), got shape {data.shape}")
    # Copies only when the dtype or layout differs; the filter itself never writes its inputs.
    return np.ascontiguousarray(data, dtype=np.float32)


def bilateral_filter(images: ArrayLike, values: ArrayLike, sigma_rgb: float, sigma_xy: float) -> np.ndarray:
    """Gaussian-weighted sums Σ_j exp(-½‖f_i − f_j‖²)·v_j (self included) over pixels of each image.

    images: (N, 3, H, W) colour in 0..255; values: (N, K, H, W); features per pixel are
    (x/sigma_xy, y/sigma_xy, r/sigma_rgb, g/sigma_rgb, b/sigma_rgb) with x the column.
    Returns a new float32 array (N, K, H, W).
    """
    image_array = _as_float32_array("images", images)
    value_array = _as_float32_array("values", values)
    n, channels, height, width = value_array.shape
    if image_array.shape != (n, 3, height, width):
        raise ValueError(
            f"images must have shape (N, 3, H, W) = {(n, 3, height, width)} to match values {value_array.shape}, "
            f"got {image_array.shape}"
        )
    filtered = np.empty_like(value_array)
    _lattice.bilateralfilter_batch(
        image_array, value_array, filtered, n, channels, height, width, float(sigma_rgb), float(sigma_xy)
    )
    return filtered

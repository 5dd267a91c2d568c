"""Fully connected CRF (Krähenbühl & Koltun) over softmax-like probabilities, via pydensecrf.

The backend choice (`--crf_backend`) lives here too: `pydensecrf` is the released CPU path
(pydensecrf CRFs, the C++ lattice for the dense energy), `torch` the PyTorch lattice on the
tensors' device (`tool.lattice`, `tool.crf_torch`), `auto` = torch on CUDA, else pydensecrf.
"""
import argparse

import numpy as np
import pydensecrf.densecrf as dcrf
import torch

PROB_CLIP = 1e-5
# SPEC §5 (mining) and SPEC §10 (test-time post-processing).
TRAINING_CRF_PARAMS = dict(iterations=10, gauss_sxy=3, gauss_compat=3, bilateral_sxy=80,
                           bilateral_srgb=13, bilateral_compat=10)
INFERENCE_CRF_PARAMS = dict(iterations=10, gauss_sxy=3, gauss_compat=3, bilateral_sxy=83,
                            bilateral_srgb=5, bilateral_compat=4)
CRF_BACKENDS = ("auto", "pydensecrf", "torch")


def resolve_crf_backend(backend: str, device: torch.device | str) -> str:
    """'pydensecrf' or 'torch' for a --crf_backend value on `device` (auto: torch on CUDA only)."""
    if backend not in CRF_BACKENDS:
        raise ValueError(f"--crf_backend must be one of {', '.join(CRF_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "torch" if torch.device(device).type == "cuda" else "pydensecrf"
    return backend


def add_crf_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crf_backend", choices=CRF_BACKENDS, default="auto",
                        help="dense CRFs (mining, inference) and the dense energy filter: pydensecrf = the released "
                             "CPU path (pydensecrf, C++ lattice), torch = PyTorch lattice on the run's device; "
                             "auto (default) = torch on CUDA, pydensecrf on the CPU")


def _check_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"dense_crf: image must be a uint8 numpy array, got "
                         f"{type(image).__name__} of dtype {getattr(image, 'dtype', None)}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf: image must be H x W x 3 (RGB), got shape {image.shape}")
    if not isinstance(probs, np.ndarray) or not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"dense_crf: probs must be a float numpy array, got "
                         f"{type(probs).__name__} of dtype {getattr(probs, 'dtype', None)}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"dense_crf: probs must be K x H x W matching the image's H x W "
                         f"{image.shape[:2]}, got shape {probs.shape}")
    if probs.shape[0] < 1:
        raise ValueError("dense_crf: probs must have at least one label channel, got K = 0")


def dense_crf_same_image(image: np.ndarray, probs_list: list[np.ndarray], *, iterations: int = 10,
                         gauss_sxy: float = 3, gauss_compat: float = 3, bilateral_sxy: float = 80,
                         bilateral_srgb: float = 13, bilateral_compat: float = 10) -> list[np.ndarray]:
    """dense_crf for several K x H x W probability maps of one image, building the kernels once.

    Mean-field inference restarts from the unary each time, so the marginals equal separate runs.
    """
    if not probs_list:
        raise ValueError("dense_crf_same_image: probs_list is empty")
    for probs in probs_list:
        _check_inputs(image, probs)
        if probs.shape != probs_list[0].shape:
            raise ValueError(f"dense_crf_same_image: all probs must share one shape, got "
                             f"{probs_list[0].shape} and {probs.shape}")
    num_labels, height, width = probs_list[0].shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=bilateral_compat)
    marginals = []
    for probs in probs_list:
        # Clip and log in the caller's dtype, then cast, as pydensecrf.utils.unary_from_softmax does.
        unary = -np.log(np.clip(probs, PROB_CLIP, 1.0)).reshape(num_labels, -1).astype(np.float32)
        crf.setUnaryEnergy(np.ascontiguousarray(unary))
        result = crf.inference(iterations)
        marginals.append(np.asarray(result, dtype=np.float32).reshape(num_labels, height, width))
    return marginals


def dense_crf(image: np.ndarray, probs: np.ndarray, *, iterations: int = 10,
              gauss_sxy: float = 3, gauss_compat: float = 3, bilateral_sxy: float = 80,
              bilateral_srgb: float = 13, bilateral_compat: float = 10) -> np.ndarray:
    """Mean-field marginals (K, H, W) float32 of a dense CRF with unary -log(clip(probs, 1e-5, 1))."""
    return dense_crf_same_image(image, [probs], iterations=iterations, gauss_sxy=gauss_sxy,
                                gauss_compat=gauss_compat, bilateral_sxy=bilateral_sxy,
                                bilateral_srgb=bilateral_srgb, bilateral_compat=bilateral_compat)[0]


def training_crf(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """CRF used by reliable-region mining (SPEC §5)."""
    return dense_crf(image, probs, **TRAINING_CRF_PARAMS)


def inference_crf(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """CRF post-processing of the segmentation softmax at test time (SPEC §10)."""
    return dense_crf(image, probs, **INFERENCE_CRF_PARAMS)

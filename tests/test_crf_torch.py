"""The torch dense CRF (tool/crf_torch.py) against pydensecrf (tool/crf.py)."""
import os

import numpy as np
import pytest
import torch
from skimage import data, transform

from tool import mining
from tool.crf import (
    INFERENCE_CRF_PARAMS,
    TRAINING_CRF_PARAMS,
    dense_crf,
    dense_crf_same_image,
)
from tool.crf_torch import (
    dense_crf_same_image_torch,
    dense_crf_torch,
    dense_crf_torch_params,
    inference_crf_torch,
    training_crf_torch,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
MINING_CASES = ["two_blobs", "overlap", "one_class_large", "three"]
PARAMS = {"training": TRAINING_CRF_PARAMS, "inference": INFERENCE_CRF_PARAMS}


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def photo(name: str, height: int, width: int) -> np.ndarray:
    """A scikit-image photograph resized (anti-aliased): H x W x 3 uint8."""
    image = transform.resize(getattr(data, name)(), (height, width), anti_aliasing=True)
    return np.round(image * 255).astype(np.uint8)


def smooth_probs(labels: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    logits = np.stack([3 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * cols + rng.uniform()))
                       * np.cos(2 * np.pi * (rng.uniform(0.5, 2) * rows + rng.uniform()))
                       for _ in range(labels)])
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def mining_maps(case: str):
    """The image and the two probability maps tool/mining.py gives the CRFs for a vector case."""
    vectors = np.load(os.path.join(DATA, "mining.npz"))
    image, label, norm_cam = (vectors[f"{case}__{key}"] for key in ("image", "label", "norm_cam"))
    present = np.flatnonzero(label > 1e-5)
    present_cams = norm_cam[present]
    present_max = np.max(present_cams, axis=0, keepdims=True)
    maps = [np.concatenate((np.power(1 - present_max, alpha), present_cams))
            for alpha in (mining.LOW_ALPHA, mining.HIGH_ALPHA)]
    return image, maps


def to_torch(image: np.ndarray, maps) -> tuple:
    images = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    return images, torch.from_numpy(np.stack(maps))[None]


def check_marginals(ours: np.ndarray, ref: np.ndarray, labels_axis: int = 0) -> None:
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
    assert (ours.argmax(labels_axis) == ref.argmax(labels_axis)).mean() >= 0.999


# ------------------------------------------------------------------------ against pydensecrf
@pytest.mark.parametrize("params", ["training", "inference"])
@pytest.mark.parametrize("case", MINING_CASES)
def test_matches_pydensecrf_on_mining_vectors(case, params):
    image, maps = mining_maps(case)
    ref = np.stack(dense_crf_same_image(image, maps, **PARAMS[params]))
    images, probs = to_torch(image, maps)
    for static in (False, True):
        out = dense_crf_torch(images, probs, **PARAMS[params], static_shapes=static)
        assert out.shape == (1, 2) + maps[0].shape
        check_marginals(out[0].numpy(), ref, labels_axis=1)


@pytest.mark.parametrize("case", MINING_CASES)
def test_mining_with_torch_crf_gives_the_released_labels(case, monkeypatch):
    vectors = np.load(os.path.join(DATA, "mining.npz"))
    monkeypatch.setattr(mining, "dense_crf_same_image", dense_crf_same_image_torch)
    mined = mining.mine_reliable_regions(*(vectors[f"{case}__{key}"] for key in ("image", "label", "norm_cam")))
    np.testing.assert_array_equal(mined, vectors[f"{case}__expected"])


@pytest.mark.parametrize("params", ["training", "inference"])
@pytest.mark.parametrize("name, size, labels, static", [
    ("astronaut", (321, 321), 3, False),
    ("chelsea", (240, 320), 4, False),
    ("coffee", (200, 300), 2, False),
    ("coffee", (161, 241), 3, True),
])
def test_matches_pydensecrf_on_photographs(name, size, labels, static, params):
    image = photo(name, *size)
    probs = smooth_probs(labels, *size, seed=labels)
    ref = dense_crf(image, probs, **PARAMS[params])
    images, probs_t = to_torch(image, [probs])
    out = dense_crf_torch(images, probs_t[:, 0], **PARAMS[params], static_shapes=static)
    assert out.shape == (1, labels) + size
    check_marginals(out[0].numpy(), ref)


def test_float64_probabilities_and_float_images():
    image = photo("chelsea", 90, 120)
    probs = smooth_probs(3, 90, 120, seed=5).astype(np.float64)
    ref = dense_crf(image, probs)
    images, probs_t = to_torch(image, [probs])
    out = dense_crf_torch(images.double(), probs_t[:, 0])
    check_marginals(out[0].numpy(), ref)


# ---------------------------------------------------------------------------------- batching
def test_maps_sharing_kernels_equal_separate_runs():
    image = photo("astronaut", 100, 130)
    maps = [smooth_probs(3, 100, 130, seed=s) for s in (6, 7, 8)]
    images, probs = to_torch(image, maps)
    shared = dense_crf_torch(images, probs)[0]
    for m, probs_m in enumerate(maps):
        alone = dense_crf_torch(images, torch.from_numpy(probs_m)[None])[0]
        torch.testing.assert_close(shared[m], alone, rtol=0, atol=1e-7)


@pytest.mark.parametrize("static", [False, True])
def test_padded_batch_equals_per_image_runs(static):
    size = (96, 128)
    names, counts = ["astronaut", "chelsea", "coffee"], [2, 4, 3]
    # Real labels of each image inside a 5-label batch: padding at the end and in the middle.
    slots = [[0, 1], [0, 1, 2, 4], [0, 2, 3]]
    images = np.stack([photo(name, *size).transpose(2, 0, 1) for name in names])
    probs = np.zeros((3, 2, 5) + size, np.float32)
    mask = np.zeros((3, 5), bool)
    singles = []
    for i, (count, slot) in enumerate(zip(counts, slots)):
        maps = np.stack([smooth_probs(count, *size, seed=10 * i + m) for m in range(2)])
        probs[i][:, slot] = maps
        probs[i][:, [s for s in range(5) if s not in slot]] = 0.3  # garbage in the padding
        mask[i, slot] = True
        singles.append((maps, slot))
    out = dense_crf_torch(torch.from_numpy(images), torch.from_numpy(probs), torch.from_numpy(mask),
                          **TRAINING_CRF_PARAMS, static_shapes=static)
    for i, (maps, slot) in enumerate(singles):
        alone = dense_crf_torch(torch.from_numpy(images[i:i + 1]), torch.from_numpy(maps[None]),
                                **TRAINING_CRF_PARAMS, static_shapes=static)[0]
        padding = [s for s in range(5) if s not in slot]
        assert (out[i][:, padding] == 0).all()
        if static:  # channels filtered independently, label sums unchanged by zeros: bit-equal
            assert torch.equal(out[i][:, slot], alone)
        else:  # MKL's sparse products block the channels differently: float32 rounding only
            assert (out[i][:, slot] - alone).abs().max() <= 1e-5
        ref = np.stack(dense_crf_same_image(images[i].transpose(1, 2, 0).copy(), list(maps), **TRAINING_CRF_PARAMS))
        check_marginals(out[i][:, slot].numpy(), ref, labels_axis=1)


def test_chunked_batch_equals_one_chunk():
    size = (64, 80)
    images = np.stack([photo(name, *size).transpose(2, 0, 1) for name in ("astronaut", "coffee")])
    probs = np.stack([smooth_probs(3, *size, seed=s) for s in (20, 21)])[:, None]
    whole = dense_crf_torch(torch.from_numpy(images), torch.from_numpy(probs))
    chunked = dense_crf_torch(torch.from_numpy(images), torch.from_numpy(probs), memory_budget=1)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------- wrappers
def test_parameter_dict_wrappers():
    image = photo("coffee", 60, 90)
    probs = smooth_probs(3, 60, 90, seed=30)
    images, probs_t = to_torch(image, [probs])
    for wrapper, params in ((training_crf_torch, TRAINING_CRF_PARAMS), (inference_crf_torch, INFERENCE_CRF_PARAMS)):
        out = wrapper(images, probs_t)
        assert torch.equal(out, dense_crf_torch(images, probs_t, **params))
        assert torch.equal(out, dense_crf_torch_params(images, probs_t, params=params))
        check_marginals(out[0, 0].numpy(), dense_crf(image, probs, **params))
    assert not torch.equal(training_crf_torch(images, probs_t), inference_crf_torch(images, probs_t))
    listed = dense_crf_same_image_torch(image, [probs, probs[::-1].copy()], **INFERENCE_CRF_PARAMS)
    refs = dense_crf_same_image(image, [probs, probs[::-1].copy()], **INFERENCE_CRF_PARAMS)
    assert isinstance(listed, list) and len(listed) == 2
    for ours, ref in zip(listed, refs):
        check_marginals(ours, ref)
    with pytest.raises(ValueError, match="unknown CRF parameters"):
        dense_crf_torch_params(images, probs_t, params=dict(TRAINING_CRF_PARAMS, sigma=3))


def test_zero_iterations_return_normalised_clipped_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 7, 9)).astype(np.float32)
    probs[0, 0, 0] = 0.0
    image = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    images, probs_t = to_torch(image, [probs])
    out = dense_crf_torch(images, probs_t[:, 0], iterations=0)[0].numpy()
    np.testing.assert_allclose(out, dense_crf(image, probs, iterations=0), rtol=0, atol=1e-7)


def test_errors_name_the_argument():
    images = torch.zeros(1, 3, 5, 6, dtype=torch.uint8)
    probs = torch.full((1, 2, 3, 5, 6), 1 / 3)
    with pytest.raises(ValueError, match="probs must have shape"):
        dense_crf_torch(images, probs[0, 0])
    with pytest.raises(TypeError, match="probs must be floating point"):
        dense_crf_torch(images, probs.long())
    with pytest.raises(ValueError, match="images must have shape"):
        dense_crf_torch(images[:, :, :4], probs)
    with pytest.raises(TypeError, match="images must be uint8 or floating"):
        dense_crf_torch(images.int(), probs)
    with pytest.raises(ValueError, match="label_mask must be a bool tensor"):
        dense_crf_torch(images, probs, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="iterations"):
        dense_crf_torch(images, probs, iterations=-1)
    with pytest.raises(ValueError, match="bilateral_srgb"):
        dense_crf_torch(images, probs, bilateral_srgb=0)


# -------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_matches_cpu():
    image, maps = mining_maps("three")
    images, probs = to_torch(image, maps)
    cpu = dense_crf_torch(images, probs)
    gpu = dense_crf_torch(images.cuda(), probs.cuda())
    assert gpu.is_cuda
    assert (gpu.cpu() - cpu).abs().max() <= 1e-5
    check_marginals(gpu[0].cpu().numpy(), np.stack(dense_crf_same_image(image, maps, **TRAINING_CRF_PARAMS)),
                    labels_axis=1)
    photo_image = photo("astronaut", 161, 241)
    probs = smooth_probs(4, 161, 241, seed=40)
    images, probs_t = to_torch(photo_image, [probs])
    mask = torch.tensor([[True, True, False, True]])
    cpu = dense_crf_torch(images, probs_t, mask, **INFERENCE_CRF_PARAMS)
    gpu = dense_crf_torch(images.cuda(), probs_t.cuda(), mask.cuda(), **INFERENCE_CRF_PARAMS)
    assert (gpu.cpu() - cpu).abs().max() <= 1e-5


@pytest.mark.cuda
def test_cuda_crf_never_synchronises():
    image, maps = mining_maps("overlap")
    images, probs = (t.cuda() for t in to_torch(image, maps))
    probs = torch.cat([probs, torch.zeros_like(probs[:, :, :1])], dim=2)  # a padding label
    mask = torch.ones(1, probs.shape[2], dtype=torch.bool, device="cuda")
    mask[:, -1] = False
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode is on: a synchronising op fails
            probs.sum().item()
        out = dense_crf_torch(images, probs, mask)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    ref = np.stack(dense_crf_same_image(image, maps, **TRAINING_CRF_PARAMS))
    check_marginals(out[0, :, :-1].cpu().numpy(), ref, labels_axis=1)
    assert (out[0, :, -1] == 0).all()

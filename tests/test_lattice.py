"""The torch permutohedral lattice (tool/lattice.py) against the C++ filters it reimplements.

"rel max" = max|ours − ref| / max|ref|, "rel mean" = mean|ours − ref| / max|ref|.
"""
import os

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
from skimage import data, transform

from tool.bilateral import bilateral_filter
from tool.lattice import (
    DEFAULT_MEMORY_BUDGET,
    PermutohedralLattice,
    bilateral_features,
    bilateral_filter_torch,
    estimate_lattice_bytes,
    images_per_chunk,
    lattice_filter,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
LAYOUTS = [False, True]  # static_shapes: compact (CPU default) and the sync-free CUDA layout


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def rel_max(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def rel_mean(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).mean() / np.abs(ref).max())


def assert_close(ours, ref, max_tol=1e-4, mean_tol=1e-6):
    assert np.isfinite(ours).all()
    assert np.abs(ref).max() > 0
    assert rel_max(ours, ref) <= max_tol, rel_max(ours, ref)
    assert rel_mean(ours, ref) <= mean_tol, rel_mean(ours, ref)


_PHOTO_SIZES = {"astronaut": (161, 161), "chelsea": (150, 200), "coffee": (120, 180)}
_photo_cache: dict = {}


def photo(name: str) -> np.ndarray:
    """A scikit-image photograph resized (anti-aliased), (3, H, W) uint8."""
    if name not in _photo_cache:
        image = transform.resize(getattr(data, name)(), _PHOTO_SIZES[name], anti_aliasing=True)
        _photo_cache[name] = np.round(image * 255).astype(np.uint8).transpose(2, 0, 1).copy()
    return _photo_cache[name]


def smooth_softmax(num: int, channels: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    maps = []
    for _ in range(num):
        logits = np.stack([3 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * cols + rng.uniform()))
                           * np.cos(2 * np.pi * (rng.uniform(0.5, 2) * rows + rng.uniform()))
                           for _ in range(channels)])
        e = np.exp(logits - logits.max(0))
        maps.append(e / e.sum(0))
    return np.stack(maps).astype(np.float32)


def torch_filter(images, values, sigma_rgb, sigma_xy, static):
    return bilateral_filter_torch(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(values),
                                  sigma_rgb, sigma_xy, static_shapes=static).numpy()


# ------------------------------------------------------------------ the released filter (d = 5)
@pytest.mark.parametrize("static", LAYOUTS)
@pytest.mark.parametrize("sigma_xy", [5, 50])
def test_matches_released_vectors(sigma_xy, static):
    vectors = np.load(os.path.join(DATA, "bilateral.npz"))
    out = torch_filter(vectors["images"], vectors["values"], float(vectors["sigma_rgb"]), sigma_xy, static)
    assert_close(out, vectors[f"out_sxy{sigma_xy}"])
    if static:  # the static layout sums in the C++ order
        np.testing.assert_array_equal(out, vectors[f"out_sxy{sigma_xy}"])


@pytest.mark.parametrize("static", LAYOUTS)
@pytest.mark.parametrize("case", ["a", "b"])
def test_matches_released_photo_vectors(case, static):
    # Case a: 161×161 pixels (not a multiple of four: the padding-lane vertices matter).
    vectors = np.load(os.path.join(DATA, "bilateral_photo.npz"))
    out = torch_filter(vectors[f"{case}__images"], vectors[f"{case}__values"], 15.0, 50.0, static)
    assert_close(out, vectors[f"{case}__out"], max_tol=1e-5)


@pytest.mark.parametrize("sigma_xy", [5, 50])
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_matches_cpp_filter_on_photographs(name, sigma_xy):
    image = photo(name)[None]
    values = smooth_softmax(1, 5, *image.shape[2:], seed=1)
    ref = bilateral_filter(image.astype(np.float32), values, 15.0, sigma_xy)
    for static in LAYOUTS if name == "astronaut" else [False]:
        assert_close(torch_filter(image, values, 15.0, sigma_xy, static), ref)


@pytest.mark.parametrize("sigma_xy", [5, 50])
def test_xy_dominated_features_match_cpp(sigma_xy):
    # A huge sigma_rgb: colour features ~1e-6, the d = 5 lattice of (nearly) xy-only features.
    image = photo("chelsea")[None]
    values = smooth_softmax(1, 3, *image.shape[2:], seed=2)
    ref = bilateral_filter(image.astype(np.float32), values, 1e8, sigma_xy)
    for static in LAYOUTS:
        assert_close(torch_filter(image, values, 1e8, sigma_xy, static), ref)


# ---------------------------------------------------------------- pydensecrf's lattice (any d)
def densecrf_lattice_filter(features: np.ndarray, values: np.ndarray):
    """pydensecrf's own lattice filter of its Q0, read back from one mean-field step.

    features (d, N) float32; values (K, N) positive, summing to 1 per point. With K >= 3 a
    reference label of probability ~e^-18 is added (Q1_l / Q1_0 then gives w·(K·Q0)_l); with K = 2
    (densecrf's sequential code) the ratio gives w·K(Q0_1 − Q0_0). NO_NORMALIZATION filters raw.
    Returns (Q0 (K, N) as pydensecrf computed it, the filtered quantity).
    """
    n = features.shape[1]
    k = values.shape[0]
    labels = k if k == 2 else k + 1
    unary = np.empty((labels, n), np.float32)
    unary[labels - k:] = -np.log(values)
    if labels > k:
        unary[0] = 18.0
    crf = dcrf.DenseCRF(n, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    q0 = np.array(crf.inference(0)).reshape(labels, n)
    # A message of O(1): Σ_j exp(−½|f_i − f_j|²) is at most ~ (2π)^(d/2)·(points per unit volume).
    bound = float(torch_lattice(features, np.ones((1, n), np.float32), "rrm", False).max())
    w = float(np.float32(4.0 / bound))
    crf = dcrf.DenseCRF(n, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseEnergy(np.ascontiguousarray(features), compat=w, kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NO_NORMALIZATION)
    q1 = np.array(crf.inference(1)).reshape(labels, n).astype(np.float64)
    logits = np.log(q1) + unary  # w·(K·Q0) up to a per-point constant
    filtered = (logits[1] - logits[0]) / w if k == 2 else (logits[1:] - logits[0]) / w
    return q0[labels - k:], filtered


def torch_lattice(features: np.ndarray, values: np.ndarray, flavour: str, static: bool) -> np.ndarray:
    return lattice_filter(torch.from_numpy(features[None]), torch.from_numpy(np.ascontiguousarray(values[None])),
                          flavour=flavour, static_shapes=static)[0].numpy()


@pytest.mark.parametrize("sigma_xy", [5, 50])
@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_xy_only_lattice_matches_pydensecrf(name, sigma_xy):
    # d = 2: pydensecrf's Gaussian kernel features.
    image = torch.from_numpy(photo(name)[None])
    features = bilateral_features(image, None, sigma_xy)[0].reshape(2, -1).numpy()
    values = smooth_softmax(1, 3, *image.shape[2:], seed=3)[0].reshape(3, -1)
    q0, ref = densecrf_lattice_filter(features, values)
    for flavour, static in [("densecrf", False), ("densecrf", True), ("rrm", False)]:
        assert_close(torch_lattice(features, q0, flavour, static), ref)


@pytest.mark.parametrize("sigma_xy", [5, 50])
def test_two_channel_sequential_arithmetic_matches_pydensecrf(sigma_xy):
    # K = 2: densecrf slices (w·v)·alpha; the quantity read back is K(Q0_1 − Q0_0), so compare
    # relative to the filtered channels' own size.
    image = torch.from_numpy(photo("chelsea")[None])
    features = bilateral_features(image, None, sigma_xy)[0].reshape(2, -1).numpy()
    values = smooth_softmax(1, 2, *image.shape[2:], seed=4)[0].reshape(2, -1)
    q0, ref = densecrf_lattice_filter(features, values)
    for static in LAYOUTS:
        out = torch_lattice(features, q0, "densecrf", static)
        scale = np.abs(out).max()
        assert np.abs((out[1] - out[0]) - ref).max() / scale <= 1e-5
        assert np.abs((out[1] - out[0]) - ref).mean() / scale <= 1e-6


@pytest.mark.parametrize("sigma_xy", [5, 50])
def test_bilateral_densecrf_flavour_matches_pydensecrf(sigma_xy):
    image = torch.from_numpy(photo("astronaut")[None])
    features = bilateral_features(image, 13.0, sigma_xy)[0].reshape(5, -1).numpy()
    values = smooth_softmax(1, 3, *image.shape[2:], seed=5)[0].reshape(3, -1)
    q0, ref = densecrf_lattice_filter(features, values)
    for static in LAYOUTS:
        assert_close(torch_lattice(features, q0, "densecrf", static), ref)


def test_flavours_differ_only_in_two_channel_slice_order():
    image = torch.from_numpy(photo("coffee")[None])
    features = bilateral_features(image, 13.0, 5.0)
    values = torch.from_numpy(smooth_softmax(1, 3, *image.shape[2:], seed=6))
    rrm = PermutohedralLattice(features, flavour="rrm", static_shapes=True)
    crf = PermutohedralLattice(features, flavour="densecrf", static_shapes=True)
    assert torch.equal(rrm.filter(values), crf.filter(values))
    two = values[:, :2].contiguous()
    sequential = crf.filter(two)
    assert not torch.equal(rrm.filter(two), sequential)  # the ulps of (w·v)·alpha vs (w·alpha)·v
    assert rel_max(sequential, rrm.filter(two)) <= 1e-6
    assert torch.equal(crf.filter(two, value_size=3), rrm.filter(two))


def test_xy_only_lattice_approximates_gaussian_sums():
    # The lattice is an approximation: only coarse agreement with the exact Gaussian is meaningful.
    height, width = 24, 32
    rows, cols = np.mgrid[0:height, 0:width]
    values = np.stack([np.ones((height, width)), 0.5 + 0.5 * np.sin(cols / 5) * np.cos(rows / 4)])
    values = values.astype(np.float32).reshape(2, -1)
    for sigma_xy in [2.0, 5.0, 50.0]:
        features = np.stack([cols.ravel() / sigma_xy, rows.ravel() / sigma_xy]).astype(np.float32)
        out = torch_lattice(features, values, "rrm", False)
        f = features.T.astype(np.float64)
        exact = values @ np.exp(-0.5 * ((f[:, None] - f[None]) ** 2).sum(-1))
        ratio = out[0] / exact[0]
        assert 0.6 < ratio.min() and ratio.max() < 1.0
        assert np.abs(out[1] / out[0] - exact[1] / exact[0]).max() < 0.05


# --------------------------------------------------------------------------- batches, shapes
def test_batch_equals_images_one_by_one():
    images = np.stack([photo("chelsea"), photo("chelsea")[:, ::-1].copy(), 255 - photo("chelsea")])
    values = smooth_softmax(3, 4, *images.shape[2:], seed=7)
    for static in LAYOUTS:
        batch = torch_filter(images, values, 15.0, 5.0, static)
        for i in range(3):
            single = torch_filter(images[i:i + 1], values[i:i + 1], 15.0, 5.0, static)
            assert rel_max(batch[i:i + 1], single) <= 1e-6
        assert_close(batch, bilateral_filter(images.astype(np.float32), values, 15.0, 5.0))


def test_vertices_of_different_images_never_merge():
    # Two identical images: one build must hold twice the vertices of one image.
    image = photo("coffee")[None]
    features = bilateral_features(torch.from_numpy(np.concatenate([image, image])), 15.0, 5.0)
    for static in LAYOUTS:
        pair = PermutohedralLattice(features, static_shapes=static)
        one = PermutohedralLattice(features[:1], static_shapes=static)
        assert int(pair.num_vertices) == 2 * int(one.num_vertices)


@pytest.mark.parametrize("height, width", [(1, 1), (1, 3), (3, 1), (2, 2), (5, 7)])
def test_tiny_images(height, width):
    rng = np.random.default_rng(height * 10 + width)
    images = rng.integers(0, 256, (2, 3, height, width)).astype(np.float32)
    values = rng.random((2, 3, height, width)).astype(np.float32)
    ref = bilateral_filter(images, values, 15.0, 5.0)
    for static in LAYOUTS:
        assert_close(torch_filter(images, values, 15.0, 5.0, static), ref)


def test_constant_image_and_one_channel():
    images = np.full((1, 3, 40, 52), 77, np.float32)
    values = smooth_softmax(1, 2, 40, 52, seed=8)[:, :1].copy()
    for sigma_xy in [5, 50]:
        ref = bilateral_filter(images, values, 15.0, sigma_xy)
        for static in LAYOUTS:
            assert_close(torch_filter(images, values, 15.0, sigma_xy, static), ref)


def test_non_contiguous_inputs():
    rng = np.random.default_rng(9)
    images = torch.from_numpy(rng.integers(0, 256, (2, 30, 41, 3)).astype(np.float32)).permute(0, 3, 1, 2)
    values = torch.from_numpy(rng.random((2, 41, 30, 6)).astype(np.float32)).permute(0, 3, 2, 1)
    values = values[:, ::2]
    assert not images.is_contiguous() and not values.is_contiguous()
    ref = bilateral_filter(images.contiguous().numpy(), values.contiguous().numpy(), 15.0, 5.0)
    for static in LAYOUTS:
        out = bilateral_filter_torch(images, values, 15.0, 5.0, static_shapes=static)
        assert out.is_contiguous() and out.shape == values.shape
        assert_close(out.numpy(), ref)


def test_features_as_points_or_grid_and_any_dimension():
    rng = np.random.default_rng(10)
    grid = torch.from_numpy(rng.normal(0, 3, (2, 3, 9, 11)).astype(np.float32))
    values = torch.from_numpy(rng.random((2, 4, 9, 11)).astype(np.float32))
    out_grid = lattice_filter(grid, values)
    out_points = lattice_filter(grid.reshape(2, 3, -1), values.reshape(2, 4, -1))
    assert out_grid.shape == values.shape
    torch.testing.assert_close(out_grid.reshape(2, 4, -1), out_points, rtol=0, atol=0)
    for dim in (1, 4, 7, 10):  # beyond the C++ limit of 8 too
        features = torch.from_numpy(rng.normal(0, 2, (1, dim, 60)).astype(np.float32))
        compact = lattice_filter(features, values[:1].reshape(1, 4, -1)[:, :, :60].contiguous())
        static = lattice_filter(features, values[:1].reshape(1, 4, -1)[:, :, :60].contiguous(), static_shapes=True)
        assert rel_max(compact, static) <= 1e-6
        assert (compact.numpy() > 0).all()


def test_sixteen_bit_keys_wrap_like_the_cpp():
    # sigma_xy 0.002 puts lattice coordinates beyond ±2^15: the C++ keys wrap (and may alias).
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (1, 3, 24, 32)).astype(np.float32)
    values = rng.random((1, 2, 24, 32)).astype(np.float32)
    ref = bilateral_filter(images, values, 15.0, 0.002)
    lattice = PermutohedralLattice(bilateral_features(torch.from_numpy(images), 15.0, 0.002))
    assert any(offset is None for offset, _ in lattice._digits)  # some lane is on 16 wrapped bits
    for static in LAYOUTS:
        assert_close(torch_filter(images, values, 15.0, 0.002, static), ref)


def test_sixteen_bit_keys_alias_far_points_like_pydensecrf():
    # d = 1: two clusters 65536 lattice units apart share their wrapped 16-bit keys, so the C++
    # lattices merge their vertices and the clusters exchange mass; so must we.
    step = np.arange(40) * 0.3
    features = np.concatenate([step, 56755.3 + step]).astype(np.float32)[None]  # 65536 / (2/√3)
    values = smooth_softmax(1, 3, 1, 80, seed=16)[0].reshape(3, -1)
    q0, ref = densecrf_lattice_filter(features, values)
    for static in LAYOUTS:
        assert_close(torch_lattice(features, q0, "densecrf", static), ref)
    alone = torch_lattice(features[:, :40].copy(), np.ascontiguousarray(q0[:, :40]), "densecrf", False)
    assert rel_max(alone, ref[:, :40]) > 0.3


def test_static_and_compact_layouts_agree():
    image = torch.from_numpy(photo("astronaut")[None])
    features = bilateral_features(image, 15.0, 50.0)
    values = torch.from_numpy(smooth_softmax(1, 21, *image.shape[2:], seed=12))
    compact = PermutohedralLattice(features, static_shapes=False)
    static = PermutohedralLattice(features, static_shapes=True)
    assert isinstance(compact.num_vertices, int) and isinstance(static.num_vertices, torch.Tensor)
    assert int(static.num_vertices) == compact.num_vertices
    assert static.num_rows == (161 * 161 + 1) * 6 + 1  # the upper bound, padding point included
    assert rel_max(compact.filter(values), static.filter(values)) <= 1e-6


# ---------------------------------------------------------------------------------- memory
def test_chunking_equals_one_build():
    images = np.stack([photo("coffee"), photo("coffee")[:, ::-1].copy(), 255 - photo("coffee")])
    values = torch.from_numpy(smooth_softmax(3, 3, *images.shape[2:], seed=13))
    images_t = torch.from_numpy(images)
    needed = estimate_lattice_bytes(1, images.shape[2] * images.shape[3], 5, 3)
    assert images_per_chunk(images.shape[2] * images.shape[3], 5, 3, needed) == 1
    assert images_per_chunk(images.shape[2] * images.shape[3], 5, 3, 3 * needed) == 3
    for static in LAYOUTS:
        whole = bilateral_filter_torch(images_t, values, 15.0, 5.0, static_shapes=static)
        chunked = bilateral_filter_torch(images_t, values, 15.0, 5.0, memory_budget=needed, static_shapes=static)
        assert rel_max(chunked, whole) <= 1e-6


def test_memory_estimate():
    per_image = estimate_lattice_bytes(1, 321 * 321, 5, 21)
    assert estimate_lattice_bytes(4, 321 * 321, 5, 21) == pytest.approx(4 * per_image, rel=0.01)
    assert estimate_lattice_bytes(1, 321 * 321, 5, 42) > per_image > estimate_lattice_bytes(1, 321 * 321, 2, 21)
    assert 1e8 < per_image < 1e9  # ~0.2-0.3 GB per 321² image with 21 channels on the static layout
    assert images_per_chunk(321 * 321, 5, 21) == DEFAULT_MEMORY_BUDGET // per_image
    assert images_per_chunk(321 * 321, 5, 21, memory_budget=1) == 1


# ------------------------------------------------------------------------------------ errors
def test_errors_name_the_argument():
    features = torch.zeros(1, 2, 10)
    values = torch.zeros(1, 3, 10)
    with pytest.raises(TypeError, match="features must be float32"):
        PermutohedralLattice(features.double())
    with pytest.raises(ValueError, match="features must have shape"):
        PermutohedralLattice(torch.zeros(2, 10))
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        PermutohedralLattice(np.zeros((1, 2, 10), np.float32))
    with pytest.raises(ValueError, match="flavour"):
        PermutohedralLattice(features, flavour="released")
    with pytest.raises(ValueError, match="features must be finite"):
        PermutohedralLattice(torch.full((1, 2, 10), float("nan")))
    lattice = PermutohedralLattice(features)
    with pytest.raises(TypeError, match="values must be float32"):
        lattice.filter(values.half())
    with pytest.raises(ValueError, match="values must have shape"):
        lattice.filter(torch.zeros(1, 3, 11))
    with pytest.raises(ValueError, match="values must have shape"):
        lattice.filter(torch.zeros(2, 3, 10))
    with pytest.raises(ValueError, match="value_size"):
        PermutohedralLattice(features, flavour="densecrf").filter(values, value_size=torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="images must have shape"):
        bilateral_filter_torch(torch.zeros(1, 3, 4, 5), torch.zeros(1, 2, 4, 6), 15.0, 5.0)
    with pytest.raises(ValueError, match="sigma_xy"):
        bilateral_filter_torch(torch.zeros(1, 3, 4, 5), torch.zeros(1, 2, 4, 5), 15.0, 0.0)
    with pytest.raises(TypeError, match="images must be uint8 or floating"):
        bilateral_filter_torch(torch.zeros(1, 3, 4, 5, dtype=torch.int32), torch.zeros(1, 2, 4, 5), 15.0, 5.0)
    with pytest.raises(ValueError, match="must share"):
        lattice_filter(features, torch.zeros(2, 3, 10))


# -------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_matches_cpu():
    vectors = np.load(os.path.join(DATA, "bilateral_photo.npz"))
    for case in "ab":
        images = torch.from_numpy(vectors[f"{case}__images"])
        values = torch.from_numpy(vectors[f"{case}__values"])
        out = bilateral_filter_torch(images.cuda(), values.cuda(), 15.0, 50.0)
        assert out.is_cuda and out.shape == values.shape
        cpu = bilateral_filter_torch(images, values, 15.0, 50.0)
        assert rel_max(out.cpu(), cpu) <= 1e-5
        assert_close(out.cpu().numpy(), vectors[f"{case}__out"], max_tol=1e-5)
    image = torch.from_numpy(photo("astronaut")[None])
    features = bilateral_features(image, None, 5.0)
    values = torch.from_numpy(smooth_softmax(1, 2, *image.shape[2:], seed=14))
    cpu = lattice_filter(features, values, flavour="densecrf")
    gpu = lattice_filter(features.cuda(), values.cuda(), flavour="densecrf")
    assert rel_max(gpu.cpu(), cpu) <= 1e-5


@pytest.mark.cuda
def test_cuda_build_and_filter_never_synchronise():
    image = torch.from_numpy(photo("coffee")[None]).cuda()
    values = torch.from_numpy(smooth_softmax(1, 3, *image.shape[2:], seed=15)).cuda()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode is on: a synchronising op fails
            (values > 0.5).nonzero()
        features = bilateral_features(image, 15.0, 5.0)
        lattice = PermutohedralLattice(features, flavour="densecrf")
        out = lattice.filter(values)
        out_sequential = lattice.filter(values, value_size=torch.full((1,), 2, device="cuda"))
        out_wrapper = bilateral_filter_torch(image, values, 15.0, 5.0)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert lattice.static_shapes
    ref = bilateral_filter(image.float().cpu().numpy(), values.cpu().numpy(), 15.0, 5.0)
    assert_close(out.cpu().numpy(), ref)
    assert_close(out_wrapper.cpu().numpy(), ref)
    assert rel_max(out_sequential.cpu(), out.cpu()) <= 1e-6

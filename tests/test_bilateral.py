"""The C++ permutohedral bilateral filter (`bilateralfilter` module) and its typed helper."""
import concurrent.futures
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bilateralfilter
from tool.bilateral import bilateral_filter

DATA = os.path.join(os.path.dirname(__file__), "data")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


def smooth_image(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    images = [
        [120 + 80 * np.sin(cols / 4.0 + c + i) * np.cos(rows / 5.0) + rng.normal(0, 8, (height, width)) for c in range(3)]
        for i in range(n)
    ]
    return np.clip(images, 0, 255).astype(np.float32)


def brute_force_filter(images: np.ndarray, values: np.ndarray, sigma_rgb: float, sigma_xy: float) -> np.ndarray:
    """Σ_j exp(−½‖f_i − f_j‖²)·v_j over all pixel pairs, features (x, y)/σxy, rgb/σrgb, x = column."""
    n, channels, height, width = values.shape
    rows, cols = np.mgrid[0:height, 0:width]
    result = []
    for i in range(n):
        features = np.concatenate(
            [cols.reshape(1, -1) / sigma_xy, rows.reshape(1, -1) / sigma_xy, images[i].reshape(3, -1) / sigma_rgb]
        ).T.astype(np.float64)
        kernel = np.exp(-0.5 * ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1))
        result.append((values[i].reshape(channels, -1).astype(np.float64) @ kernel.T).reshape(channels, height, width))
    return np.stack(result)


def filter_flat(images: np.ndarray, values: np.ndarray, sigma_rgb: float, sigma_xy: float) -> np.ndarray:
    n, channels, height, width = values.shape
    out = np.zeros(values.size, np.float32)
    bilateralfilter.bilateralfilter_batch(np.ascontiguousarray(images, np.float32).ravel(), values.ravel(), out, n,
                                          channels, height, width, float(sigma_rgb), float(sigma_xy))
    return out.reshape(values.shape)


@pytest.mark.parametrize("sigma_xy", [5, 50])
def test_matches_released_outputs(sigma_xy):
    vectors = np.load(os.path.join(DATA, "bilateral.npz"))
    out = filter_flat(vectors["images"], vectors["values"], float(vectors["sigma_rgb"]), sigma_xy)
    # The released arithmetic, operation for operation: bit-equal (the vectors allow 1e-4).
    np.testing.assert_array_equal(out, vectors[f"out_sxy{sigma_xy}"])


@pytest.mark.parametrize("case", ["a", "b"])
def test_matches_released_outputs_on_photographs(case):
    # Integer colours put features on the lattice's rounding ties: round half to even, float rank
    # and weights, and (case a: 161×161 pixels, not a multiple of four) the vertices the released
    # code inserts for the zero-feature lanes that pad its last group of four points.
    vectors = np.load(os.path.join(DATA, "bilateral_photo.npz"))
    out = filter_flat(vectors[f"{case}__images"], vectors[f"{case}__values"], 15.0, 50.0)
    np.testing.assert_array_equal(out, vectors[f"{case}__out"])


def test_bench_baseline_reproduces_released_outputs(tmp_path):
    # bench_bilateral.py times against bench/released_bilateral.cpp; it must be the released filter.
    bench = importlib.import_module("bench_bilateral")
    released = bench.load_baseline(bench.build_baseline(str(tmp_path)))
    photo = np.load(os.path.join(DATA, "bilateral_photo.npz"))
    for case in "ab":
        images = np.ascontiguousarray(photo[f"{case}__images"], np.float32)
        values = photo[f"{case}__values"]
        out = bench.released_filter(released, images, values, 50.0, np.zeros_like(values))
        np.testing.assert_array_equal(out, photo[f"{case}__out"])


@pytest.mark.parametrize("sigma_xy, pixel", [(1e-8, 0.0), (50.0, float("nan"))])
def test_rejects_features_the_lattice_cannot_round(sigma_xy, pixel):
    # x/σ = 4e8 is past 2^22 lattice units; a NaN colour has no simplex.
    images = np.full((1, 3, 4, 5), 100.0, np.float32)
    images[0, 1, 2, 3] = pixel
    with pytest.raises(ValueError, match="lattice features are too large"):
        bilateral_filter(images, np.ones((1, 2, 4, 5), np.float32), 15.0, sigma_xy)


def test_single_image_call_matches_released_outputs():
    vectors = np.load(os.path.join(DATA, "bilateral.npz"))
    images, values, expected = vectors["images"], vectors["values"], vectors["out_sxy5"]
    _, _, height, width = values.shape
    out = np.zeros(height * width, np.float32)
    bilateralfilter.bilateralfilter(images[1].ravel(), values[1, 2].ravel(), out, height, width, 15.0, 5.0)
    assert np.abs(out.reshape(height, width) - expected[1, 2]).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("sigma_xy", [5.0, 50.0])
def test_approximates_brute_force_gaussian(sigma_xy):
    rng = np.random.default_rng(0)
    images = smooth_image(rng, 1, 12, 14)
    values = rng.uniform(0, 1, (1, 3, 12, 14)).astype(np.float32)
    ours = bilateral_filter(images, values, 15.0, sigma_xy).astype(np.float64)
    exact = brute_force_filter(images, values, 15.0, sigma_xy)
    # The lattice (released constants) is about half the continuous Gaussian sum with an
    # approximate kernel: measured correlation 0.984 / 0.992, gain 2.29 / 1.86, relative RMS
    # error after the gain 0.090 / 0.077 (σxy 5 / 50).
    correlation = np.corrcoef(ours.ravel(), exact.ravel())[0, 1]
    gain = (ours * exact).sum() / (ours * ours).sum()
    relative_rms = np.linalg.norm(gain * ours - exact) / np.linalg.norm(exact)
    assert correlation >= 0.975
    assert 1.6 <= gain <= 2.5
    assert relative_rms <= 0.11


def test_linear_in_values():
    rng = np.random.default_rng(1)
    images = smooth_image(rng, 1, 15, 17)
    a, b = rng.normal(size=(2, 1, 2, 15, 17)).astype(np.float32)
    combined = bilateral_filter(images, 2.5 * a - 0.75 * b, 15.0, 10.0)
    separate = 2.5 * bilateral_filter(images, a, 15.0, 10.0) - 0.75 * bilateral_filter(images, b, 15.0, 10.0)
    assert np.abs(combined - separate).max() <= 1e-5 * np.abs(separate).max()


def test_nearly_symmetric():
    # Each axis blur is symmetric, but on the sparse lattice the d+1 axis blurs do not commute,
    # so the released filter is symmetric only approximately: measured 0.33% of ‖a‖·‖Wb‖.
    rng = np.random.default_rng(0)
    images = smooth_image(rng, 1, 12, 14)
    a, b = rng.normal(size=(2, 1, 1, 12, 14)).astype(np.float32)
    filtered_a = bilateral_filter(images, a, 15.0, 5.0).astype(np.float64)
    filtered_b = bilateral_filter(images, b, 15.0, 5.0).astype(np.float64)
    asymmetry = abs((a * filtered_b).sum() - (filtered_a * b).sum())
    assert asymmetry <= 0.01 * np.linalg.norm(a) * np.linalg.norm(filtered_b)


def random_case(seed: int, n: int, channels: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return smooth_image(rng, n, height, width), rng.uniform(0, 1, (n, channels, height, width)).astype(np.float32)


@pytest.mark.parametrize("channels", [5, 40, 81])  # one group of 32, two with a partial one, COCO's 81
def test_all_channels_in_one_pass_equal_channel_by_channel(channels):
    images, values = random_case(2, 1, channels, 20, 23)
    together = bilateral_filter(images, values, 15.0, 8.0)
    for k in range(channels):
        alone = np.zeros(20 * 23, np.float32)
        bilateralfilter.bilateralfilter(images[0].ravel(), values[0, k].ravel(), alone, 20, 23, 15.0, 8.0)
        np.testing.assert_array_equal(together[0, k], alone.reshape(20, 23))


def test_batch_equals_image_by_image():
    # A batch runs one task per image; a single image's loops run in pieces on all threads.
    images, values = random_case(3, 2, 3, 90, 96)
    batch = bilateral_filter(images, values, 15.0, 8.0)
    for n in range(2):
        np.testing.assert_array_equal(batch[n], bilateral_filter(images[n : n + 1], values[n : n + 1], 15.0, 8.0)[0])


def run_fresh(code: str, threads: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)


FILTER_SCRIPT = """
import hashlib, sys, numpy as np, bilateralfilter
assert 'torch' not in sys.modules
rng = np.random.default_rng(4)
images = rng.uniform(0, 255, (2, 3, 90, 96)).astype(np.float32)
values = rng.uniform(0, 1, (2, 4, 90, 96)).astype(np.float32)
batch = np.zeros(values.size, np.float32)
bilateralfilter.bilateralfilter_batch(images.ravel(), values.ravel(), batch, 2, 4, 90, 96, 15.0, 10.0)
first = np.zeros(4 * 90 * 96, np.float32)
bilateralfilter.bilateralfilter_batch(images[0].ravel(), values[0].ravel(), first, 1, 4, 90, 96, 15.0, 10.0)
single = np.zeros(90 * 96, np.float32)
bilateralfilter.bilateralfilter(images[1].ravel(), values[1, 0].ravel(), single, 90, 96, 15.0, 10.0)
assert np.abs(single).max() > 0
print(*(hashlib.sha256(a.tobytes()).hexdigest() for a in (batch, first, single)))
"""


def test_imports_and_filters_in_fresh_interpreter_without_torch():
    assert len(run_fresh(FILTER_SCRIPT).stdout.split()) == 3


def test_results_do_not_depend_on_thread_count():
    assert run_fresh(FILTER_SCRIPT, threads="1").stdout == run_fresh(FILTER_SCRIPT, threads="2").stdout


PHOTOGRAPH_SCRIPT = """
import sys, numpy as np, bilateralfilter
vectors = np.load({path!r})
for case in "ab":
    values = vectors[case + "__values"]
    for n in (1, 2):  # one image: every thread works on it; two: threads share what is left
        out = np.zeros(values[:n].size, np.float32)
        bilateralfilter.bilateralfilter_batch(np.ascontiguousarray(vectors[case + "__images"][:n], np.float32).ravel(),
                                              values[:n].ravel(), out, n, *values.shape[1:], 15.0, 50.0)
        np.testing.assert_array_equal(out.reshape(values[:n].shape), vectors[case + "__out"][:n])
print("equal")
"""


@pytest.mark.parametrize("threads", ["1", "3", "8"])
def test_released_photograph_outputs_at_any_thread_count(threads):
    # Pieces of one image's blur, slice and neighbour search run on other threads, in any order.
    script = PHOTOGRAPH_SCRIPT.format(path=os.path.join(DATA, "bilateral_photo.npz"))
    assert run_fresh(script, threads=threads).stdout.split() == ["equal"]


def test_concurrent_calls_from_python_threads_match_released_outputs():
    # The filter releases the GIL: each caller's OpenMP team and tasks stay its own.
    vectors = np.load(os.path.join(DATA, "bilateral_photo.npz"))
    cases = [(vectors[f"{c}__images"], vectors[f"{c}__values"], vectors[f"{c}__out"]) for c in "ab"] * 3
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        outputs = list(pool.map(lambda case: filter_flat(case[0], case[1], 15.0, 50.0), cases))
    for (_, _, expected), out in zip(cases, outputs):
        np.testing.assert_array_equal(out, expected)


def test_error_in_one_image_of_a_threaded_batch_is_raised():
    images = np.full((4, 3, 30, 40), 100.0, np.float32)
    images[2, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="lattice features are too large"):
        bilateral_filter(images, np.ones((4, 3, 30, 40), np.float32), 15.0, 10.0)


def test_helper_accepts_tensors_and_leaves_inputs_untouched():
    rng = np.random.default_rng(5)
    images = smooth_image(rng, 2, 9, 11)
    values = rng.uniform(0, 1, (2, 3, 9, 11)).astype(np.float64)
    images_before, values_before = images.copy(), values.copy()
    from_arrays = bilateral_filter(images, values, 15.0, 5.0)
    from_tensors = bilateral_filter(torch.from_numpy(images), torch.from_numpy(values), 15.0, 5.0)
    assert from_arrays.dtype == np.float32 and from_arrays.shape == (2, 3, 9, 11)
    np.testing.assert_array_equal(from_arrays, from_tensors)
    np.testing.assert_array_equal(images, images_before)
    np.testing.assert_array_equal(values, values_before)


def flat(size: int, dtype=np.float32) -> np.ndarray:
    return np.ones(size, dtype)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((flat(3 * 20), flat(20), flat(20), 4, 6, 15.0, 5.0), ValueError, "image has 60 elements, expected 3\\*H\\*W = 72"),
        ((flat(72), flat(23), flat(24), 4, 6, 15.0, 5.0), ValueError, "in has 23 elements, expected H\\*W = 24"),
        ((flat(72), flat(24), flat(25), 4, 6, 15.0, 5.0), ValueError, "out has 25 elements"),
        ((flat(72), flat(24, np.float64), flat(24), 4, 6, 15.0, 5.0), TypeError, "in must have dtype float32"),
        ((flat(72), flat(24), [0.0] * 24, 4, 6, 15.0, 5.0), TypeError, "out must be a numpy.ndarray of float32"),
        ((flat(144)[::2], flat(24), flat(24), 4, 6, 15.0, 5.0), ValueError, "image must be C-contiguous"),
        ((flat(72), flat(24), flat(24), 0, 6, 15.0, 5.0), ValueError, "H must be >= 1"),
        ((flat(72), flat(24), flat(24), 4, 6, -1.0, 5.0), ValueError, "sigma_rgb must be a finite number > 0"),
    ],
)
def test_single_call_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        bilateralfilter.bilateralfilter(*args)


def test_batch_call_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ins has 47 elements, expected N\\*K\\*H\\*W = 48"):
        bilateralfilter.bilateralfilter_batch(flat(144), flat(47), flat(48), 2, 1, 4, 6, 15.0, 5.0)
    with pytest.raises(ValueError, match="images has 72 elements, expected N\\*3\\*H\\*W = 144"):
        bilateralfilter.bilateralfilter_batch(flat(72), flat(48), flat(48), 2, 1, 4, 6, 15.0, 5.0)
    read_only = flat(48)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="outs must be writeable"):
        bilateralfilter.bilateralfilter_batch(flat(144), flat(48), read_only, 2, 1, 4, 6, 15.0, 5.0)
    with pytest.raises(ValueError, match="K must be >= 1"):
        bilateralfilter.bilateralfilter_batch(flat(144), flat(48), flat(48), 2, 0, 4, 6, 15.0, 5.0)


def test_helper_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="images must have shape \\(N, 3, H, W\\) = \\(1, 3, 4, 6\\)"):
        bilateral_filter(np.zeros((1, 3, 4, 5)), np.zeros((1, 2, 4, 6)), 15.0, 5.0)
    with pytest.raises(ValueError, match="values must have 4 dimensions"):
        bilateral_filter(np.zeros((1, 3, 4, 6)), np.zeros((2, 4, 6)), 15.0, 5.0)
    with pytest.raises(TypeError, match="images must be a numpy array or torch tensor"):
        bilateral_filter([[0.0]], np.zeros((1, 2, 4, 6)), 15.0, 5.0)

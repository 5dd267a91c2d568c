"""Bilateral filter speed and memory: ours vs the released filter's algorithm, side by side.

Baseline = `bench/released_bilateral.cpp`: the released rloss/RRM `bilateralfilter_batch` as it
runs on x86-64 (SSE branch: one lattice per image, then one `compute(out, in, 1)` per channel,
OpenMP over the N images capped at N threads), compiled here with Python's own flags plus
-fopenmp as the released setup.py does. It reproduces the released outputs bit for bit
(`../shared/vectors/bilateral*.npz`), which this bench checks before timing.

Setting of the dense energy loss: N=2 real photographs (scikit-image's bundled astronaut and
chelsea, resized), K=21 smooth softmax channels, sigma_rgb 15, sigma_xy 50·H/161, at 161×161 and
321×321; whole filter calls (lattice build included), median of alternating calls. Memory: peak
resident growth of one call at N=8, K=21, 224×224 (train_from_init), each filter in a fresh
process (Linux: /proc/self/status after resetting the peak through /proc/self/clear_refs).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time

import cv2
import numpy as np
from skimage import data as photographs

import bilateralfilter

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE_SOURCE = os.path.join(HERE, "released_bilateral.cpp")
VECTORS = os.path.join(HERE, os.pardir, "tests", "data")
CHANNELS = 21
SIGMA_RGB = 15.0
SIZES = (161, 321)
TARGET_RATIO = 5.0
TARGET_DIFFERENCE = 1e-5
MEMORY_SETTING = (8, 224)  # N, side


def build_baseline(directory: str) -> str:
    """Compiles the released algorithm with the flags the released setup.py gets from Python."""
    library = os.path.join(directory, "released_bilateral.so")
    compiler = sysconfig.get_config_var("CXX").split()
    flags = sysconfig.get_config_var("CFLAGS").split() + sysconfig.get_config_var("CCSHARED").split()
    subprocess.run([*compiler, *flags, "-fopenmp", "-shared", BASELINE_SOURCE, "-o", library], check=True)
    return library


def load_baseline(library: str) -> ctypes.CDLL:
    released = ctypes.CDLL(library)
    pointer = ctypes.POINTER(ctypes.c_float)
    released.released_bilateralfilter_batch.argtypes = [pointer] * 3 + [ctypes.c_int] * 4 + [ctypes.c_float] * 2
    return released


def released_filter(released: ctypes.CDLL, images: np.ndarray, values: np.ndarray, sigma_xy: float,
                    out: np.ndarray, sigma_rgb: float = SIGMA_RGB) -> np.ndarray:
    """All arrays C-contiguous float32; the result is written into out."""
    pointer = ctypes.POINTER(ctypes.c_float)
    released.released_bilateralfilter_batch(
        images.ctypes.data_as(pointer), values.ctypes.data_as(pointer), out.ctypes.data_as(pointer),
        *values.shape, sigma_rgb, sigma_xy,
    )
    return out


def our_filter(images: np.ndarray, values: np.ndarray, sigma_xy: float, out: np.ndarray) -> np.ndarray:
    """All arrays C-contiguous float32; the result is written into out."""
    bilateralfilter.bilateralfilter_batch(images.ravel(), values.ravel(), out.ravel(), *values.shape, SIGMA_RGB, sigma_xy)
    return out


def photograph_batch(count: int, size: int) -> np.ndarray:
    """(count, 3, size, size) float32: scikit-image's bundled photographs, resized."""
    pictures = [photographs.astronaut(), photographs.chelsea(), photographs.coffee(), photographs.rocket()]
    resized = [cv2.resize(pictures[i % len(pictures)], (size, size), interpolation=cv2.INTER_AREA) for i in range(count)]
    return np.ascontiguousarray(np.stack(resized).transpose(0, 3, 1, 2), np.float32)


def softmax_maps(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """(count, CHANNELS, size, size) float32 smooth softmax maps, like upsampled segmentation output."""
    coarse = rng.normal(scale=3.0, size=(count, CHANNELS, size // 8 + 2, size // 8 + 2))
    logits = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)[:, :, :size, :size]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.ascontiguousarray(exp / exp.sum(axis=1, keepdims=True), np.float32)


def resident_kib(field: str) -> int:
    """A size from /proc/self/status in KiB (VmRSS: resident now; VmHWM: its peak)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_resident() -> None:
    """Resets the peak resident size (VmHWM) to the current one (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def check_vectors(released: ctypes.CDLL) -> float:
    """Both filters against the released outputs; returns our largest difference on the photographs."""
    photo = np.load(os.path.join(VECTORS, "bilateral_photo.npz"))
    random = np.load(os.path.join(VECTORS, "bilateral.npz"))
    cases = [(photo[f"{c}__images"], photo[f"{c}__values"], 50.0, photo[f"{c}__out"]) for c in "ab"]
    cases += [(random["images"], random["values"], float(s), random[f"out_sxy{s}"]) for s in (5, 50)]
    photo_difference = 0.0
    for index, (images, values, sigma_xy, expected) in enumerate(cases):
        images = np.ascontiguousarray(images, np.float32)
        baseline = relative_difference(released_filter(released, images, values, sigma_xy, np.zeros_like(values)), expected)
        if baseline != 0.0:
            sys.exit(f"bench_bilateral: the baseline differs from the released outputs ({baseline:.1e}): not the released algorithm")
        ours = relative_difference(our_filter(images, values, sigma_xy, np.zeros_like(values)), expected)
        if index < 2:
            photo_difference = max(photo_difference, ours)
    return photo_difference


def bench_size(released: ctypes.CDLL, size: int, rounds: int) -> tuple[float, float]:
    images = photograph_batch(2, size)
    values = softmax_maps(np.random.default_rng(size), 2, size)
    sigma_xy = 50.0 * size / 161
    ours_out = our_filter(images, values, sigma_xy, np.zeros_like(values))  # warm-up, and the outputs to compare
    released_out = released_filter(released, images, values, sigma_xy, np.zeros_like(values))
    out = np.zeros_like(values)
    ours_times, released_times = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        released_filter(released, images, values, sigma_xy, out)
        released_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        our_filter(images, values, sigma_xy, out)
        ours_times.append(time.perf_counter() - start)
    ours_s, released_s = float(np.median(ours_times)), float(np.median(released_times))
    difference = relative_difference(ours_out, released_out)
    print(
        f"N=2 K={CHANNELS} {size}x{size} sigma_xy {sigma_xy:.1f}: released {released_s * 1e3:7.1f} ms | "
        f"ours {ours_s * 1e3:6.1f} ms | ratio {released_s / ours_s:5.2f}x | max rel diff {difference:.1e}"
    )
    return released_s / ours_s, difference


MEMORY_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, {here!r})
import bench_bilateral as bench
n, size = {setting!r}
images = bench.photograph_batch(n, size)
values = bench.softmax_maps(np.random.default_rng(0), n, size)
out = np.ones_like(values)  # written, so resident before the call
released = bench.load_baseline({library!r}) if {library!r} else None
bench.reset_peak_resident()
before = bench.resident_kib("VmRSS")
if released:
    bench.released_filter(released, images, values, 50.0, out)
else:
    bench.our_filter(images, values, 50.0, out)
print(bench.resident_kib("VmHWM") - before)
"""


def peak_memory_mib(library: str) -> float:
    """Peak resident growth during one filter call in a fresh process ('' = ours, else the baseline)."""
    script = MEMORY_SCRIPT.format(here=HERE, setting=MEMORY_SETTING, library=library)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return f"{model} ({isa}), {os.cpu_count()} logical CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating calls per filter and size")
    args = parser.parse_args()
    print(f"bench_bilateral: {cpu_description()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory() as directory:
        library = build_baseline(directory)
        released = load_baseline(library)
        photo_difference = check_vectors(released)
        print(f"released outputs (shared vectors): baseline bit-equal; ours max rel diff on photographs {photo_difference:.1e}")
        ratios = [bench_size(released, size, args.rounds)[0] for size in SIZES]
        n, side = MEMORY_SETTING
        released_mib, ours_mib = peak_memory_mib(library), peak_memory_mib("")
        print(f"peak memory of one call, N={n} K={CHANNELS} {side}x{side}: released {released_mib:.1f} MiB | ours {ours_mib:.1f} MiB")
    met = min(ratios) >= TARGET_RATIO and photo_difference <= TARGET_DIFFERENCE
    print(f"targets (>= {TARGET_RATIO:.0f}x at both sizes, <= {TARGET_DIFFERENCE:.0e} on photographs): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()

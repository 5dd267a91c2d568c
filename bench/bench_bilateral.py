"""Bilateral filter speed: all K channels in one lattice pass (ours) vs the released way, a
channel-by-channel loop of one-channel `bilateralfilter` calls, measured side by side.

Setting of the dense energy loss: N=2, K=21, sigma_rgb 15, sigma_xy 100·0.5, at 161×161 (321
crop at scale 0.5) and 321×321, on a synthetic natural-looking image (1/f colour texture with
objects) and softmax probabilities. Target: ≥ 5× faster on 2 cores, difference ≤ 1e-5 relative.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable

import numpy as np

import bilateralfilter

BATCH = 2
CHANNELS = 21
SIGMA_RGB = 15.0
SIGMA_XY = 100.0 * 0.5
SIZES = (161, 321)
REPEATS = 3
THREADS_VARIABLE = "OMP_NUM_THREADS"


def natural_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """(3, size, size) float32 in 0..255: 1/f-spectrum colour texture plus a few flat objects."""
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    freq[0, 0] = 1.0
    spectrum = (rng.normal(size=(3, size, size)) + 1j * rng.normal(size=(3, size, size))) / freq
    texture = np.fft.ifft2(spectrum).real
    mixing = np.array([[1.0, 0.3, 0.2], [0.3, 1.0, 0.3], [0.2, 0.3, 1.0]])
    texture = np.einsum("cd,dhw->chw", mixing, texture)
    texture = (texture - texture.mean()) / texture.std() * 35.0 + 120.0
    rows, cols = np.mgrid[0:size, 0:size]
    for _ in range(5):
        centre = rng.uniform(0, size, 2)
        radii = rng.uniform(size / 10, size / 4, 2)
        inside = ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 < 1
        texture[:, inside] = texture[:, inside] * 0.3 + rng.uniform(0, 255, (3, 1))
    return np.clip(texture, 0, 255).astype(np.float32)


def softmax_probs(rng: np.random.Generator, size: int) -> np.ndarray:
    """(CHANNELS, size, size) float32 smooth softmax maps, like upsampled segmentation output."""
    coarse = rng.normal(scale=3.0, size=(CHANNELS, size // 8 + 2, size // 8 + 2))
    logits = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :size, :size]
    exp = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (exp / exp.sum(axis=0, keepdims=True)).astype(np.float32)


def best_time(run: Callable[[], None]) -> tuple[float, float]:
    """Best wall time of REPEATS runs, and process CPU time / wall time over all of them."""
    run()  # warm-up
    times = []
    cpu_start = time.process_time()
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), (time.process_time() - cpu_start) / sum(times)


def bench_size(size: int) -> None:
    rng = np.random.default_rng(size)
    images = np.stack([natural_image(rng, size) for _ in range(BATCH)])
    values = np.stack([softmax_probs(rng, size) for _ in range(BATCH)])
    flat_images, flat_values = images.ravel(), values.ravel()
    ours = np.zeros_like(flat_values)
    channelwise = np.zeros_like(values)

    def run_ours() -> None:
        bilateralfilter.bilateralfilter_batch(
            flat_images, flat_values, ours, BATCH, CHANNELS, size, size, SIGMA_RGB, SIGMA_XY
        )

    def run_channelwise() -> None:
        for n in range(BATCH):
            for k in range(CHANNELS):
                out = np.zeros(size * size, np.float32)
                bilateralfilter.bilateralfilter(
                    images[n].ravel(), values[n, k].ravel(), out, size, size, SIGMA_RGB, SIGMA_XY
                )
                channelwise[n, k] = out.reshape(size, size)

    ours_s, ours_cores = best_time(run_ours)
    channelwise_s, _ = best_time(run_channelwise)
    difference = np.abs(ours.reshape(values.shape) - channelwise).max() / np.abs(channelwise).max()
    print(
        f"N={BATCH} K={CHANNELS} {size}x{size}: ours {ours_s * 1e3:7.1f} ms (cpu/wall {ours_cores:.2f}) | "
        f"channel-by-channel {channelwise_s * 1e3:8.1f} ms | ratio {channelwise_s / ours_s:5.1f}x | "
        f"max rel diff {difference:.2e}"
    )


def main() -> None:
    threads = os.environ.get(THREADS_VARIABLE)
    print(f"bench_bilateral: best of {REPEATS}, {THREADS_VARIABLE}={threads or 'unset'}, {os.cpu_count()} CPUs")
    for size in SIZES:
        bench_size(size)
    if threads is None:
        # Same comparison on one thread: the gain of the one-pass lattice alone.
        subprocess.run([sys.executable, __file__], env={**os.environ, THREADS_VARIABLE: "1"}, check=True)


if __name__ == "__main__":
    main()

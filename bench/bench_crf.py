"""Dense CRFs and the dense-energy filter: the released CPU path vs the torch lattice, side by side.

Each row runs both on the same inputs in the same process and prints the median of --repeats
calls (after one warm-up call each), the ratio, the peak memory of one call and how far the
results agree:
- mining: a batch of real photographs (scikit-image's bundled ones, resized) with smooth synthetic
  CAMs of 1–3 classes each, B = 4 at 321² and B = 8 at 448². Released = `mine_reliable_regions`
  (two pydensecrf CRFs) image after image in the training process, as the released training loop
  does; torch = `mine_reliable_regions_torch` with the torch CRF, the whole batch at once.
- inference CRF: one VOC-sized image (500×375) with a 21-class softmax, `crf_label_map`.
- dense energy filter: N = 2, K = 21 at 161² and 321² (sigma_rgb 15, sigma_xy 50·H/161): our C++
  lattice (bit-equal to the released filter; `bench_bilateral.py` times that against the released
  algorithm) vs the torch lattice.
Memory: CUDA: peak allocated by torch during the call; CPU: peak resident growth of the process
during the call (Linux: /proc/self/status after resetting the peak through /proc/self/clear_refs).
GPU targets: mining a batch of 8 at 448 in <= 50 ms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import cv2
import numpy as np
import torch
from skimage import data as photographs

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from bench_bilateral import cpu_description

from tool.bilateral import bilateral_filter
from tool.crf_pool import crf_label_map
from tool.crf_torch import training_crf_torch
from tool.lattice import bilateral_filter_torch
from tool.mining import mine_reliable_regions, mine_reliable_regions_torch
from voc12.lists import NUM_CLASSES

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel")
MINING_SETTINGS = ((4, 321), (8, 448))
FILTER_SIDES = (161, 321)
MINING_TARGET_S = 0.050


def photo(index: int, height: int, width: int) -> np.ndarray:
    image = getattr(photographs, PHOTOS[index % len(PHOTOS)])()[..., :3]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def smooth_cams(count: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """labels (B,20) with 1–3 classes each, normalised CAMs (B,20,H,W): blurred random blobs in [0,1]."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((count, NUM_CLASSES), np.float32)
    cams = np.zeros((count, NUM_CLASSES, side, side), np.float32)
    for image_index in range(count):
        for class_index in rng.choice(NUM_CLASSES, size=1 + image_index % 3, replace=False):
            labels[image_index, class_index] = 1
            blob = np.zeros((side, side), np.float32)
            centre = rng.integers(side // 5, 4 * side // 5, size=2)
            cv2.circle(blob, (int(centre[0]), int(centre[1])), int(side * rng.uniform(0.15, 0.3)), 1.0, -1)
            blob = cv2.GaussianBlur(blob, (0, 0), side / 12)
            cams[image_index, class_index] = blob / (blob.max() + 1e-5)
    return labels, cams


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return resident_kib("VmRSS") * 1024


def peak_since(device: torch.device, start: int) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    return (resident_kib("VmHWM") * 1024 - start) / 2**20


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(call: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float, object]:
    """(median seconds, peak MiB of the first timed call, result) after one warm-up call."""
    result = call()
    synchronise(device)
    times, peak = [], None
    for _ in range(repeats):
        start_memory = reset_peak(device)
        start = time.perf_counter()
        result = call()
        synchronise(device)
        times.append(time.perf_counter() - start)
        if peak is None:
            peak = peak_since(device, start_memory)
    return statistics.median(times), peak, result


def row(name: str, released: tuple, ours: tuple, agreement: str) -> float:
    ratio = released[0] / ours[0]
    print(f"{name:34s} released {released[0] * 1e3:9.1f} ms {released[1]:7.1f} MiB | torch {ours[0] * 1e3:9.1f} ms "
          f"{ours[1]:7.1f} MiB | {ratio:6.2f}x | {agreement}", flush=True)
    return ratio


def bench_mining(batch: int, side: int, repeats: int, device: torch.device) -> float:
    images = np.stack([photo(i, side, side) for i in range(batch)])
    labels, cams = smooth_cams(batch, side, seed=side)
    cpu = torch.device("cpu")
    released = measure(lambda: np.stack([mine_reliable_regions(images[i], labels[i], cams[i], backend="pydensecrf")
                                         for i in range(batch)]), repeats, cpu)
    images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    cams_t = torch.from_numpy(cams).to(device)
    ours = measure(lambda: mine_reliable_regions_torch(images_t, labels, cams_t, training_crf_torch), repeats, device)
    same = (ours[2].cpu().numpy() == released[2]).mean()
    row(f"mining B={batch} {side}x{side}", released, ours, f"same label {100 * same:.3f}% of pixels")
    return ours[0]


def bench_inference_crf(repeats: int, device: torch.device) -> None:
    height, width = 375, 500
    image = photo(2, height, width)
    generator = torch.Generator().manual_seed(7)
    logits = torch.nn.functional.avg_pool2d(6 * torch.randn(1, 21, height, width, generator=generator), 31,
                                            stride=1, padding=15)[0]
    probs = torch.softmax(4 * logits, 0)
    released = measure(lambda: crf_label_map(image, probs.numpy()), repeats, torch.device("cpu"))
    image_t, probs_t = torch.from_numpy(image).to(device), probs.to(device)
    ours = measure(lambda: crf_label_map(image_t, probs_t), repeats, device)
    row(f"inference CRF {width}x{height} K=21", released, ours, f"same label {100 * (ours[2] == released[2]).mean():.3f}%")


def bench_filter(side: int, repeats: int, device: torch.device) -> None:
    images = np.stack([photo(i, side, side) for i in range(2)]).transpose(0, 3, 1, 2).astype(np.float32)
    generator = torch.Generator().manual_seed(side)
    values = torch.softmax(torch.nn.functional.avg_pool2d(4 * torch.randn(2, 21, side, side, generator=generator),
                                                          9, stride=1, padding=4), 1).numpy()
    sigma_xy = 50.0 * side / 161
    released = measure(lambda: bilateral_filter(images, values, 15.0, sigma_xy), repeats, torch.device("cpu"))
    images_t, values_t = torch.from_numpy(images).to(device), torch.from_numpy(values).to(device)
    ours = measure(lambda: bilateral_filter_torch(images_t, values_t, 15.0, sigma_xy), repeats, device)
    scale = np.abs(released[2]).max()
    difference = np.abs(ours[2].cpu().numpy() - released[2])
    row(f"dense energy filter N=2 K=21 {side}x{side}", released, ours,
        f"max rel diff {difference.max() / scale:.1e}, mean {difference.mean() / scale:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the torch path (default: cuda if available)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path and row (median)")
    parser.add_argument("--mining", default=",".join(f"{b}x{s}" for b, s in MINING_SETTINGS),
                        help="mining settings BATCHxSIDE, comma-separated")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    print(f"bench_crf: torch path on {device} ({name}); released path on {cpu_description()}, "
          f"{torch.get_num_threads()} torch threads; load {os.getloadavg()[0]:.2f}", flush=True)
    mining_times = {}
    for setting in args.mining.split(","):
        batch, side = (int(part) for part in setting.split("x"))
        mining_times[(batch, side)] = bench_mining(batch, side, args.repeats, device)
    bench_inference_crf(args.repeats, device)
    for side in FILTER_SIDES:
        bench_filter(side, args.repeats, device)
    if device.type == "cuda" and (8, 448) in mining_times:
        seconds = mining_times[(8, 448)]
        print(f"GPU target: mining B=8 448x448 {seconds * 1e3:.1f} ms (<= {MINING_TARGET_S * 1e3:.0f} ms: "
              f"{'met' if seconds <= MINING_TARGET_S else 'NOT met'})")


if __name__ == "__main__":
    main()

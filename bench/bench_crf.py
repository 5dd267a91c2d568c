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
Memory: one call of each path in a fresh process: on CUDA the peak allocated by torch, on the CPU
the peak resident growth (Linux: /proc/self/status after resetting the peak through
/proc/self/clear_refs).
GPU targets: mining a batch of 8 at 448 in <= 50 ms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import cv2
import numpy as np
import torch
from skimage import data as photographs

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from bench_bilateral import cpu_description, photograph_batch, relative_difference

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


Case = tuple[Callable[[], object], Callable[[], object], Callable[[object, object], str]]


def mining_case(batch: int, side: int, device: torch.device) -> Case:
    images = np.stack([photo(i, side, side) for i in range(batch)])
    labels, cams = smooth_cams(batch, side, seed=side)
    images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    cams_t = torch.from_numpy(cams).to(device)
    return (lambda: np.stack([mine_reliable_regions(images[i], labels[i], cams[i], backend="pydensecrf")
                              for i in range(batch)]),
            lambda: mine_reliable_regions_torch(images_t, labels, cams_t, training_crf_torch),
            lambda released, ours: f"same label {100 * (ours.cpu().numpy() == released).mean():.3f}% of pixels")


def inference_case(device: torch.device) -> Case:
    height, width = 375, 500
    image = photo(2, height, width)
    generator = torch.Generator().manual_seed(7)
    logits = torch.nn.functional.avg_pool2d(6 * torch.randn(1, 21, height, width, generator=generator), 31,
                                            stride=1, padding=15)[0]
    probs = torch.softmax(4 * logits, 0)
    image_t, probs_t = torch.from_numpy(image).to(device), probs.to(device)
    return (lambda: crf_label_map(image, probs.numpy()), lambda: crf_label_map(image_t, probs_t),
            lambda released, ours: f"same label {100 * (ours == released).mean():.3f}% of pixels")


def filter_case(side: int, device: torch.device) -> Case:
    images = photograph_batch(2, side)
    generator = torch.Generator().manual_seed(side)
    values = torch.softmax(torch.nn.functional.avg_pool2d(4 * torch.randn(2, 21, side, side, generator=generator),
                                                          9, stride=1, padding=4), 1).numpy()
    sigma_xy = 50.0 * side / 161
    images_t, values_t = torch.from_numpy(images).to(device), torch.from_numpy(values).to(device)

    def agreement(released: np.ndarray, ours: torch.Tensor) -> str:
        ours = ours.cpu().numpy()
        mean = np.abs(ours - released).mean() / np.abs(released).max()
        return f"max rel diff {relative_difference(ours, released):.1e}, mean {mean:.1e}"

    return (lambda: bilateral_filter(images, values, 15.0, sigma_xy),
            lambda: bilateral_filter_torch(images_t, values_t, 15.0, sigma_xy), agreement)


def build_case(name: str, device: torch.device) -> Case:
    """Cases by name: mining:BxS, inference, filter:S."""
    kind, _, setting = name.partition(":")
    if kind == "mining":
        batch, side = (int(part) for part in setting.split("x"))
        return mining_case(batch, side, device)
    if kind == "filter":
        return filter_case(int(setting), device)
    if kind == "inference":
        return inference_case(device)
    raise ValueError(f"unknown case {name!r}: mining:BxS, inference or filter:S")


def time_call(call: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """(median seconds, result) of `repeats` calls after one warm-up call."""
    result = call()
    synchronise(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_mib(case: str, path: int, device: torch.device) -> float:
    """Peak memory of one call of path 0 (released) or 1 (torch) of a case, in a fresh process:
    CUDA: peak allocated by torch; CPU: peak resident growth (VmHWM after /proc/self/clear_refs)."""
    script = MEMORY_SCRIPT.format(here=HERE, case=case, path=path, device=str(device))
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(completed.stdout.split()[-1])


MEMORY_SCRIPT = """
import sys
import torch
sys.path.insert(0, {here!r})
import bench_bilateral
import bench_crf
device = torch.device({device!r})
call = bench_crf.build_case({case!r}, device)[{path}]
if device.type == "cuda" and {path} == 1:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    print((torch.cuda.max_memory_allocated(device) - start) / 2**20)
else:
    bench_bilateral.reset_peak_resident()
    start = bench_bilateral.resident_kib("VmRSS")
    call()
    print((bench_bilateral.resident_kib("VmHWM") - start) / 1024)
"""


def run_case(name: str, label: str, repeats: int, device: torch.device) -> float:
    """Times both paths side by side, measures their memory, prints one row; returns torch seconds."""
    released_call, torch_call, agreement = build_case(name, device)
    released_s, released_out = time_call(released_call, repeats, torch.device("cpu"))
    torch_s, torch_out = time_call(torch_call, repeats, device)
    released_mib, torch_mib = peak_mib(name, 0, device), peak_mib(name, 1, device)
    print(f"{label:34s} released {released_s * 1e3:9.1f} ms {released_mib:7.1f} MiB | torch {torch_s * 1e3:9.1f} ms "
          f"{torch_mib:7.1f} MiB | {released_s / torch_s:6.2f}x | {agreement(released_out, torch_out)}", flush=True)
    return torch_s


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
        mining_times[(batch, side)] = run_case(f"mining:{setting}", f"mining B={batch} {side}x{side}", args.repeats,
                                               device)
    run_case("inference", "inference CRF 500x375 K=21", args.repeats, device)
    for side in FILTER_SIDES:
        run_case(f"filter:{side}", f"dense energy filter N=2 K=21 {side}x{side}", args.repeats, device)
    if device.type == "cuda" and (8, 448) in mining_times:
        seconds = mining_times[(8, 448)]
        print(f"GPU target: mining B=8 448x448 {seconds * 1e3:.1f} ms (<= {MINING_TARGET_S * 1e3:.0f} ms: "
              f"{'met' if seconds <= MINING_TARGET_S else 'NOT met'})")

if __name__ == "__main__":
    main()

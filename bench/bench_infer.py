"""Inference speed: the engine of infer_RRM.py vs the released script's serial loop, side by side.

VOC-sized synthetic images (375-500 px sides), RRM at width 1.0 (random weights, seeded), CPU.
"released serial": per image, read with cv2, normalise, one plain fp32 forward (oneDNN direct
convolutions, `network.fast_conv.plain_convolution`), upsample, softmax, argmax, write the PNG,
then the inference CRF and its PNG, one after the other (as released infer_RRM.py), with the
C library's default allocator settings.
"engine": `tool.inference.run_inference` as infer_RRM.py runs it (`retain_freed_memory`; default
forward: Winograd 3x3 convolutions via NNPACK; DataLoader worker; CRF in `--crf_workers`
processes while the network runs). Each is timed in a fresh process of its own (after one
warm-up forward), with and without CRF, alternating; the predictions of the two are compared
pixel for pixel. Target: engine/serial >= 1.5x with CRF.
Run: .venv/bin/python bench/bench_infer.py [--images 3] [--crf_workers 1] [--width 1.0]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from network.fast_conv import plain_convolution  # noqa: E402
from tool.allocator import retain_freed_memory  # noqa: E402
from tool.crf import inference_crf  # noqa: E402
from tool.inference import load_model, run_inference  # noqa: E402
from voc12.data import EvalDataset  # noqa: E402
from voc12.lists import write_plain_mask  # noqa: E402
from voc12.synthetic import generate_dataset  # noqa: E402

TARGET_WITH_CRF = 1.5
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (CRF workers, loader workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def released_serial_loop(model: torch.nn.Module, ids: list[str], image_dir: str, out_dir: str, crf: bool) -> None:
    """The released infer_RRM.py loop body, image after image, with the plain convolutions."""
    with plain_convolution():
        _released_loop_body(model, ids, image_dir, out_dir, crf)


def _released_loop_body(model: torch.nn.Module, ids: list[str], image_dir: str, out_dir: str, crf: bool) -> None:
    for image_id in ids:
        bgr = cv2.imread(os.path.join(image_dir, image_id + ".jpg"))
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float64)
        original = rgb.astype(np.uint8)
        normalised = (rgb / 255.0 - MEAN) / STD
        x = torch.from_numpy(normalised[np.newaxis].transpose(0, 3, 1, 2)).float()
        with torch.no_grad():
            output = model(x, require_mcam=False, require_seg=True)
            output = F.interpolate(output, rgb.shape[:2], mode="bilinear", align_corners=False)[0]
            probs = torch.softmax(output, dim=0)
            prediction = torch.argmax(output, dim=0).numpy()
        cv2.imwrite(os.path.join(out_dir, "no_crf", image_id + ".png"), prediction.astype(np.uint8))
        if crf:
            labels = np.argmax(inference_crf(original, probs.numpy()), 0)
            write_plain_mask(os.path.join(out_dir, "crf", image_id + ".png"), labels)


def agreement(dir_a: str, dir_b: str, ids: list[str]) -> float:
    same = total = 0
    for image_id in ids:
        a = cv2.imread(os.path.join(dir_a, image_id + ".png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(os.path.join(dir_b, image_id + ".png"), cv2.IMREAD_UNCHANGED)
        same += int((a == b).sum())
        total += a.size
    return same / total


def time_one_path(args: argparse.Namespace) -> None:
    """Child process: build the seeded model, warm up, time one path over the list, print JSON."""
    with open(os.path.join(args.work, "ImageSets", "Segmentation", "val.txt")) as handle:
        ids = handle.read().split()
    image_dir = os.path.join(args.work, "JPEGImages")
    out_dir = os.path.join(args.work, f"{args.child}_{'crf' if args.crf else 'no_crf'}")
    for folder in ("no_crf", "crf"):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    if args.child == "engine":
        retain_freed_memory()
    torch.manual_seed(0)
    model = load_model("network.RRM", None, args.width, "cpu")
    first = cv2.imread(os.path.join(image_dir, ids[0] + ".jpg")).shape[:2]
    # Warm-up of the timed path: oneDNN primitive creation, NNPACK initialisation.
    with torch.no_grad(), plain_convolution() if args.child == "serial" else contextlib.nullcontext():
        model.predict_seg(torch.zeros(1, 3, *first))
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    if args.child == "serial":
        released_serial_loop(model, ids, image_dir, out_dir, args.crf)
    else:
        run_inference(model, EvalDataset(ids=ids, image_dir=image_dir), out_pred_dir=os.path.join(out_dir, "no_crf"),
                      out_crf_dir=os.path.join(out_dir, "crf"), crf=args.crf, crf_workers=args.crf_workers,
                      num_workers=args.num_workers, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": cpu_seconds() - cpu0, "out_dir": out_dir}))


def run_child(args: argparse.Namespace, role: str, crf: bool) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", role, "--work", args.work,
               "--width", str(args.width), "--crf_workers", str(args.crf_workers),
               "--num_workers", str(args.num_workers)] + (["--crf"] if crf else [])
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--crf_workers", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--width", type=float, default=1.0,
                        help="below 1.0 the network is cheap next to the CRF, as on a GPU")
    parser.add_argument("--child", choices=("serial", "engine"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--crf", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        time_one_path(args)
        return
    args.work = tempfile.mkdtemp(prefix="bench_infer_")
    generate_dataset(args.work, num_train=1, num_val=args.images, seed=0, size_min=375, size_max=500)
    with open(os.path.join(args.work, "ImageSets", "Segmentation", "val.txt")) as handle:
        ids = handle.read().split()
    sizes = [cv2.imread(os.path.join(args.work, "JPEGImages", i + ".jpg")).shape[:2] for i in ids]
    print(f"{len(ids)} images {', '.join(f'{w}x{h}' for h, w in sizes)}; RRM width {args.width}; "
          f"{args.crf_workers} CRF worker(s); torch threads {torch.get_num_threads()}; load avg {os.getloadavg()[0]:.1f}")
    results = {}
    for crf in (True, False):
        tag = "crf" if crf else "no_crf"
        serial, engine = run_child(args, "serial", crf), run_child(args, "engine", crf)
        same = agreement(os.path.join(serial["out_dir"], tag), os.path.join(engine["out_dir"], tag), ids)
        n = len(ids)
        results[tag] = serial["seconds"] / engine["seconds"]
        print(f"{tag:>6}: released serial {n / serial['seconds']:.3f} img/s ({serial['seconds'] / n:.1f} s/img, "
              f"cpu {serial['cpu'] / n:.1f} s/img) | engine {n / engine['seconds']:.3f} img/s "
              f"({engine['seconds'] / n:.1f} s/img, cpu {engine['cpu'] / n:.1f} s/img) | "
              f"engine/serial {results[tag]:.2f}x | same pixels {100 * same:.3f}%")
    print(f"load avg after: {os.getloadavg()[0]:.1f}; with-CRF speed-up {results['crf']:.2f}x "
          f"(target >= {TARGET_WITH_CRF}x: {'met' if results['crf'] >= TARGET_WITH_CRF else 'NOT met'})")


if __name__ == "__main__":
    main()

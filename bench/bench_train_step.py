"""One training step (train_from_cls_weight, RRM, width 1.0, batch 2, crop 321) split by stage.

Modes, each in its own process (so peak RSS is per mode), measured side by side in one run:
- released: the released computation: fp32, plain convolutions (`plain_convolution()`), mining
  serial in the training process with pydensecrf, the released bilateral filter's algorithm for
  the dense energy (`bench/released_bilateral.cpp`: one lattice per image, one pass per channel),
  and the C library's default allocator settings (`--release_memory`);
- ours:     the engine's defaults: fp32, NNPACK fast convolutions on the CPU, `--crf_backend auto`
  (CPU: mining pool of one worker per core and our C++ lattice; CUDA: mining and the dense energy
  on the GPU through the torch lattice), freed memory kept (`tool.allocator`);
- ours_cpu_crf: ours with --crf_backend pydensecrf (on CUDA: the same step with CPU mining);
- ours_bf16: ours with --amp bf16 (mining and dense energy stay float32);
- ours_watch: ours with --region_quality --tensorboard (issue 16), its steps alternating in one
  process with unwatched ones (best of each reported): the batch carries the ground truth, the
  step counts the quality of the mined and the CAM labels ("quality" stage), and each step's
  scalars go to a TensorBoard writer ("monitor" stage); the training panels, drawn every
  --vis_every steps, are timed once and reported amortised over the default 500.
Each mode runs a warm-up step (not timed: pool start-up, allocator, NNPACK init), then
--repeats timed steps (the fastest is reported). Prints wall and CPU time per stage, peak RSS,
the load average and the ratios to released. Released code: ~53 s per step on this machine
(41 s forward, 0.6 s mining, 11 s backward); target ours <= 0.7x.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = {"released": ["--mining_workers", "0", "--crf_backend", "pydensecrf", "--release_memory"], "ours": [],
         "ours_cpu_crf": ["--crf_backend", "pydensecrf"], "ours_bf16": ["--amp", "bf16"],
         "ours_watch": ["--region_quality", "--tensorboard"]}
STAGES = ("forward", "mining", "quality", "losses", "backward", "step", "monitor")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them bf16 autocast is emulated and several times slower than fp32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = set(handle.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def released_dense_energy_filter(directory: str):
    """The dense-energy filter through the released algorithm, compiled into directory."""
    import torch

    import bench_bilateral

    released = bench_bilateral.load_baseline(bench_bilateral.build_baseline(directory))

    def bilateral_filter(images, values, sigma_rgb: float, sigma_xy: float) -> np.ndarray:
        as_array = (lambda data: data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else data)
        images = np.ascontiguousarray(as_array(images), dtype=np.float32)
        values = np.ascontiguousarray(as_array(values), dtype=np.float32)
        return bench_bilateral.released_filter(released, images, values, float(sigma_xy), np.empty_like(values),
                                               sigma_rgb=float(sigma_rgb))

    return bilateral_filter


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process's live child processes (the pool)."""
    total = 0
    for listing in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(listing) as handle:
            for pid in handle.read().split():
                try:
                    with open(f"/proc/{pid}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                    total += int(fields[11]) + int(fields[12])
                except FileNotFoundError:
                    continue
    return total / CLOCK_TICKS


def measure(mode: str, voc_root: str, width: float, crop: int, repeats: int, device: str = "cpu",
            batch_size: int = 2) -> dict:
    import torch
    from torch.utils.data import default_collate

    import tool.dense_energy
    import train_from_cls_weight
    from network.fast_conv import plain_convolution
    from tool.checkpoint import unwrap_model
    from tool.engine import MINED, VIS_EVERY, VIS_IMAGES, Trainer, build_parser, finalize_args, setup_runtime
    from tool.region_quality import region_figures, region_figures_by_prefix
    from tool.run_monitor import RunMonitor, training_scalars
    from tool.visualize import fixed_batch, training_panels
    from voc12.data import TrainDatasetScaled

    argv = ["--voc12_root", voc_root, "--weights", "none", "--width", str(width), "--crop_size", str(crop),
            "--batch_size", str(batch_size), "--num_workers", "0", "--device", device, *MODES[mode]]
    args = finalize_args(build_parser(train_from_cls_weight.DEFAULTS).parse_args(argv))
    released = mode == "released"
    baseline_build = tempfile.TemporaryDirectory(prefix="released_filter_")
    if released:
        tool.dense_energy.bilateral_filter = released_dense_energy_filter(baseline_build.name)
    trainer = Trainer(args, setup_runtime(args), max_step=1000)
    dataset = TrainDatasetScaled(voc_root, crop_size=crop, seed=0, load_gt=args.region_quality)
    batch = default_collate([dataset[(i, 1.0)] for i in range(batch_size)])
    events = tempfile.TemporaryDirectory(prefix="bench_events_")
    monitor = RunMonitor(events.name) if args.tensorboard else None
    # ours_watch alternates steps without (the batch without 'gt', no scalars) and with the watching in
    # this one process, so that a few per cent are not lost in the noise between processes.
    watched_steps = [False, True] * (repeats + 1) if monitor is not None else [False] * (repeats + 1)
    best: dict[bool, dict] = {}
    with plain_convolution() if released else contextlib.nullcontext():
        for t, watched in enumerate(watched_steps):
            workers_cpu = children_cpu_seconds()
            step_batch = batch if watched else {key: value for key, value in batch.items() if key != "gt"}
            result = trainer.step(step_batch, t, timed=True)
            workers_cpu = children_cpu_seconds() - workers_cpu
            if watched:  # RunLog's share: the figures and the step's scalars
                wall, cpu = time.perf_counter(), time.process_time()
                figures = region_figures_by_prefix(result.quality)
                monitor.log_scalars(t, training_scalars(result.terms, [g["lr"] for g in trainer.optimizer.param_groups],
                                                        10.0, figures))
                result.timings["monitor"] = time.perf_counter() - wall
                result.cpu_timings["monitor"] = time.process_time() - cpu
            if t < len(watched_steps) // (repeats + 1):
                continue  # warm-up
            total = sum(result.timings.values())
            if watched not in best or total < best[watched]["total"]:
                best[watched] = {"timings": result.timings, "cpu": result.cpu_timings, "total": total,
                                 "cpu_total": sum(result.cpu_timings.values()), "workers_cpu": workers_cpu,
                                 "loss": result.terms["total"]}
    measured = best[monitor is not None]
    if monitor is not None:
        started = time.perf_counter()
        panel_set = fixed_batch(dataset, range(min(VIS_IMAGES, len(dataset))))
        monitor.log_panels(len(watched_steps), training_panels(unwrap_model(trainer.model), panel_set, trainer.miner))
        measured.update(panels_seconds=time.perf_counter() - started, panels_every=VIS_EVERY,
                        unwatched_total=best[False]["total"],
                        precision=region_figures(result.quality[MINED])["precision"])
        monitor.close()
    events.cleanup()
    trainer.close()
    baseline_build.cleanup()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**measured, "peak_rss_mib": peak_mib, "threads": torch.get_num_threads(),
            "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per mode after the warm-up "
                                                                 "(the fastest is reported)")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated, of {', '.join(MODES)} (default: all; ours_bf16 only on a "
                             "CPU with native bf16)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (bf16 modes: on CUDA too)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--voc_root", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(json.dumps(measure(options.child, options.voc_root, options.width, options.crop, options.repeats,
                                 options.device, options.batch)))
        return
    if options.modes is None:
        on_cpu = options.device == "cpu"
        options.modes = ",".join(m for m in MODES if not (on_cpu and m == "ours_cpu_crf")
                                 and (m != "ours_bf16" or not on_cpu or cpu_has_native_bf16()))
    modes = options.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ValueError(f"--modes: unknown {unknown}; valid: {', '.join(MODES)}")
    from voc12.synthetic import generate_dataset
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        voc_root = os.path.join(tmp, "VOC2012")
        generate_dataset(voc_root, num_train=options.batch, num_val=1, seed=0, size_min=options.crop + 40,
                         size_max=options.crop + 120)
        results = {}
        for mode in modes:
            completed = subprocess.run([sys.executable, __file__, "--child", mode, "--voc_root", voc_root,
                                        "--width", str(options.width), "--crop", str(options.crop),
                                        "--repeats", str(options.repeats), "--device", options.device,
                                        "--batch", str(options.batch)],
                                       capture_output=True, text=True, check=True)
            results[mode] = json.loads(completed.stdout.strip().splitlines()[-1])
            print(f"{mode}: {json.dumps(results[mode])}", flush=True)
    first = results[modes[0]]
    print(f"\ntrain step: width {options.width}, batch {options.batch}, crop {options.crop}, {options.device} ({first['threads']} torch "
          f"threads, {os.cpu_count()} cores); warm-up excluded, best of {options.repeats}; "
          f"{time.time() - started:.0f} s in all; load average at end: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("wall seconds per stage (CPU seconds of the training process in brackets; workers = mining pool CPU)")
    print(f"{'mode':10s}" + "".join(f"{s:>16s}" for s in STAGES)
          + f"{'total':>16s}{'workers':>9s}{'peak MiB':>9s}{'load':>6s}")
    for mode, result in results.items():
        cells = [f"{result['timings'].get(s, 0.0):7.2f} ({result['cpu'].get(s, 0.0):6.2f})" for s in STAGES]
        print(f"{mode:10s}" + "".join(f"{cell:>16s}" for cell in cells)
              + f"{result['total']:7.2f} ({result['cpu_total']:6.2f})".rjust(16)
              + f"{result['workers_cpu']:9.2f}{result['peak_rss_mib']:9.0f}{result['load']:6.2f}")
    if "released" in results:
        for mode in results:
            if mode != "released":
                wall = results[mode]["total"] / results["released"]["total"]
                cpu = ((results[mode]["cpu_total"] + results[mode]["workers_cpu"])
                       / (results["released"]["cpu_total"] + results["released"]["workers_cpu"]))
                print(f"ratio {mode}/released: wall {wall:.3f}, CPU {cpu:.3f}   (target wall <= 0.7)")
    if "ours_watch" in results:
        watch = results["ours_watch"]
        panels = watch["panels_seconds"] / watch["panels_every"]
        added = sum(watch["timings"].get(stage, 0.0) for stage in ("quality", "monitor")) + panels
        print(f"ours_watch, steps alternately without and with --region_quality --tensorboard in one process: "
              f"{watch['unwatched_total']:.3f} s vs {watch['total']:.3f} s, ratio "
              f"{watch['total'] / watch['unwatched_total']:.3f}; with the panels ({watch['panels_seconds']:.2f} s every "
              f"{watch['panels_every']} steps) {(watch['total'] + panels) / watch['unwatched_total']:.3f} (target "
              f"<= 1.03); the stages watching adds (quality, monitor, panels amortised): {added:.4f} s = "
              f"{100 * added / watch['unwatched_total']:.2f}%")
    if "ours" in results and "ours_cpu_crf" in results:
        speedup = results["ours_cpu_crf"]["total"] / results["ours"]["total"]
        print(f"step with CPU mining / step with mining on {options.device}: {speedup:.2f}x (target on a GPU >= 5)")


if __name__ == "__main__":
    main()

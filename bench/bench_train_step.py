"""One training step (train_from_cls_weight, RRM, width 1.0, batch 2, crop 321) split by stage.

Modes, each in its own process (so peak RSS is per mode), measured side by side in one run:
- released: fp32, mining serial in the training process (as the released loop);
- engine:   fp32, mining in the parallel ReliableRegionMiner (--mining_workers = cores);
- bf16:     the engine with --amp bf16 (mining and dense energy stay float32).
Prints the stage times, peak memory and the ratios engine/released, bf16/released.
The released code measured ~53 s on this machine (41 s forward, 0.6 s mining, 11 s backward).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = {"released": ["--mining_workers", "0"], "engine": [], "bf16": ["--amp", "bf16"]}
STAGES = ("forward", "mining", "losses", "backward", "step")


def measure(mode_flags: list[str], voc_root: str, width: float, crop: int, repeats: int) -> dict:
    import torch
    from torch.utils.data import default_collate

    import train_from_cls_weight
    from tool.engine import Trainer, build_parser, finalize_args, setup_runtime
    from voc12.data import TrainDatasetScaled

    argv = ["--voc12_root", voc_root, "--weights", "none", "--width", str(width), "--crop_size", str(crop),
            "--batch_size", "2", "--num_workers", "0", "--device", "cpu", *mode_flags]
    args = finalize_args(build_parser(train_from_cls_weight.DEFAULTS).parse_args(argv))
    trainer = Trainer(args, setup_runtime(args), max_step=1000)
    dataset = TrainDatasetScaled(voc_root, crop_size=crop, seed=0)
    batch = default_collate([dataset[(i, 1.0)] for i in range(2)])
    best: dict[str, float] | None = None
    for t in range(repeats):
        timings = trainer.step(batch, t, timed=True).timings
        if best is None or sum(timings.values()) < sum(best.values()):
            best = timings
    trainer.close()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"timings": best, "total": sum(best.values()), "peak_rss_mib": peak_mib,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--repeats", type=int, default=1, help="steps per mode (the fastest is reported)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--voc_root", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(json.dumps(measure(MODES[options.child], options.voc_root, options.width, options.crop,
                                 options.repeats)))
        return
    from voc12.synthetic import generate_dataset
    with tempfile.TemporaryDirectory() as tmp:
        voc_root = os.path.join(tmp, "VOC2012")
        generate_dataset(voc_root, num_train=2, num_val=1, seed=0, size_min=options.crop + 40,
                         size_max=options.crop + 120)
        results = {}
        for mode in options.modes.split(","):
            completed = subprocess.run([sys.executable, __file__, "--child", mode, "--voc_root", voc_root,
                                        "--width", str(options.width), "--crop", str(options.crop),
                                        "--repeats", str(options.repeats)],
                                       capture_output=True, text=True, check=True)
            results[mode] = json.loads(completed.stdout.strip().splitlines()[-1])
            print(f"{mode}: {json.dumps(results[mode])}", flush=True)
    print(f"train step: width {options.width}, batch 2, crop {options.crop}, CPU "
          f"({results[next(iter(results))]['threads']} torch threads, {os.cpu_count()} cores)")
    print(f"{'mode':10s}" + "".join(f"{s:>10s}" for s in STAGES) + f"{'total s':>10s}{'peak MiB':>10s}")
    for mode, result in results.items():
        print(f"{mode:10s}" + "".join(f"{result['timings'].get(s, 0.0):10.2f}" for s in STAGES)
              + f"{result['total']:10.2f}{result['peak_rss_mib']:10.0f}")
    if "released" in results:
        for mode in results:
            if mode != "released":
                print(f"ratio {mode}/released: {results[mode]['total'] / results['released']['total']:.3f}"
                      f"   (target <= 0.7)")


if __name__ == "__main__":
    main()

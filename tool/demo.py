"""`make demo`: RRM end to end on the CPU in minutes, on the embedded synthetic data set.

    python -m tool.demo [--out demo] [--max_step N] [--width W] ...

1. generate the synthetic VOC-format data set into <out>/data (kept when already there with the
   same options);
2. train from scratch with train_from_init.py's engine, both phases (classification, then joint
   RRM training: reliable-region mining + CE + dense energy), at a small width and crop.
   Documented departures, all flags of the engine/generator whose released defaults stay
   untouched there: AdamW (--optimizer adam) and learning BatchNorms (--train_bn) — a randomly
   initialised ResNet-38 with the released SGD and frozen BatchNorms learns the classifier several
   times slower; 800 classification updates then 250 joint ones (--cls_steps; released: half
   each); dropout off (--dropout_scale 0); dense energy weight 1.6e-5 (released 1e-7 at crop 321:
   the energy sums over pixel pairs, ~160x fewer at crop 80); objects of 3 classes with distinct
   colours on clutter-free backgrounds;
   The run is watched (`--region_quality --tensorboard`: the synthetic set has masks): the metrics
   of each joint update carry the precision and coverage of the reliable regions and of the CAM
   labels, TensorBoard events go to <out>/run/tensorboard/demo_, and the curves to
   <out>/run/demo_curves.png (tool.plot_metrics);
3. evaluate on the synthetic val set: the CAM pseudo labels of the final model, the RRM
   segmentation without and with CRF (tool.inference, as infer_RRM.py);
4. print the table, write <out>/results.json and panels <out>/panels/<id>_panel.png.

"CAM pseudo-label mIoU" = mIoU of argmax([(1 - max_c cam_c)^32; cam_1..cam_20]) (SPEC §5 step 1)
where cam is the final model's 4-scale training CAM of the full val image, upsampled, restricted
to the image's classes and each map divided by its maximum: the label map that reliable-region
mining starts from, scored before its CRFs and its reliability filter.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import train_from_init
from tool.engine import build_parser as build_training_parser
from tool.engine import run_training, session_path
from tool.inference import evaluate_cam, load_model, run_inference
from tool.plot_metrics import plot_run, read_run
from tool.schedule import OPTIMIZERS
from tool.visualize import write_panels
from voc12.data import EvalDataset
from voc12.lists import IMAGE_DIR, MASK_DIR, default_cls_labels_path, default_list_path, read_id_list
from voc12.synthetic import MAX_CLUTTER, OBJECT_SCALE, generate_dataset, parse_classes

# Three classes of distinct colours, no clutter shapes and objects that leave background around
# them: a width-0.125 model from random weights learns CAMs with true zero regions (which mining
# needs to label background) within the demo's ~800 classification updates.
DEMO_CLASSES = "person,bus,sofa"
DEMO_OBJECT_SCALE = (0.25, 0.45)
DEMO_MAX_CLUTTER = 0
DEMO_OPTIMIZER = "adam"
DEMO_DENSE_ENERGY_WEIGHT = 1.6e-5
DATA_STAMP = "demo_data.json"  # the generation options of <out>/data, to know when to regenerate
RESULT_KEYS = ("cam_miou", "rrm_miou", "rrm_crf_miou")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo", help="folder for data/, run/, predictions, panels, results.json")
    data = parser.add_argument_group("synthetic data (voc12.synthetic)")
    data.add_argument("--num_train", type=int, default=400)
    data.add_argument("--num_val", type=int, default=60)
    data.add_argument("--size_min", type=int, default=64, help="smallest image side")
    data.add_argument("--size_max", type=int, default=80, help="largest image side")
    data.add_argument("--classes", default=DEMO_CLASSES, help="VOC class names of the objects")
    data.add_argument("--object_scale", type=float, nargs=2, default=DEMO_OBJECT_SCALE, metavar=("MIN", "MAX"),
                      help=f"range of an object's half-size, fraction of the short image side "
                           f"(generator default {OBJECT_SCALE[0]} {OBJECT_SCALE[1]})")
    data.add_argument("--max_clutter", type=int, default=DEMO_MAX_CLUTTER,
                      help=f"most background clutter shapes per image (generator default {MAX_CLUTTER})")
    data.add_argument("--data_seed", type=int, default=0)
    train = parser.add_argument_group("training (train_from_init.py flags)")
    train.add_argument("--width", type=float, default=0.125, help="ResNet-38 channel multiplier")
    train.add_argument("--crop_size", type=int, default=80)
    train.add_argument("--dropout_scale", type=float, default=0.0,
                       help="multiplies the network's dropout probabilities (1 = released; 0: off, learns faster)")
    train.add_argument("--batch_size", type=int, default=8)
    train.add_argument("--max_step", type=int, default=1050, help="updates of both phases")
    train.add_argument("--cls_steps", type=int, default=800,
                       help="updates of phase 1 (classification only; released: max_step / 2); a joint update "
                            "costs ~4 classification updates, and CAMs need a trained classifier")
    train.add_argument("--lr", type=float, default=0.001)
    train.add_argument("--seg_lr", type=float, default=0.0002, help="base lr of phase 2 (released 0.0007 with SGD)")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=DEMO_OPTIMIZER,
                       help="adam: AdamW (a random-init classifier learns several times faster); sgd: released")
    train.add_argument("--momentum", type=float, default=None,
                       help="SGD momentum, with --optimizer sgd only (default: the released quirk, = weight decay)")
    train.add_argument("--densecrfloss", type=float, default=DEMO_DENSE_ENERGY_WEIGHT,
                       help="dense energy weight (released 1e-7 at crop 321; the energy sums over pixel pairs, "
                            "~160x fewer at crop 80, so the demo scales the weight by that)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--num_workers", type=int, default=1, help="DataLoader processes")
    train.add_argument("--mining_workers", type=int, default=None, help="mining processes (default: cores)")
    output = parser.add_argument_group("evaluation")
    output.add_argument("--num_panels", type=int, default=4, help="val images drawn as panels")
    output.add_argument("--crf_workers", type=int, default=1, help="processes solving the inference CRFs")
    output.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"num_train": args.num_train, "num_val": args.num_val, "seed": args.data_seed,
            "size_min": args.size_min, "size_max": args.size_max, "classes": list(parse_classes(args.classes)),
            "object_scale": list(args.object_scale), "max_clutter": args.max_clutter}


def ensure_dataset(root: str, options: dict[str, Any]) -> bool:
    """Generate the synthetic set under `root` unless its stamp says it has these options; True if generated."""
    stamp = os.path.join(root, DATA_STAMP)
    if os.path.isfile(stamp) and os.path.isfile(default_cls_labels_path(root)):
        with open(stamp) as handle:
            if json.load(handle) == options:
                return False
    generate_dataset(root, options["num_train"], options["num_val"], options["seed"], size_min=options["size_min"],
                     size_max=options["size_max"], classes=options["classes"],
                     object_scale=tuple(options["object_scale"]), max_clutter=options["max_clutter"])
    with open(stamp, "w") as handle:
        json.dump(options, handle)
    return True


def training_argv(args: argparse.Namespace, data_root: str, run_dir: str) -> list[str]:
    """train_from_init.py flags of the demo run: random init, small width and crop, CPU."""
    argv = ["--voc12_root", data_root, "--weights", "none", "--width", str(args.width), "--train_bn",
            "--dropout_scale", str(args.dropout_scale),
            "--crop_size", str(args.crop_size), "--batch_size", str(args.batch_size), "--max_step", str(args.max_step),
            "--cls_steps", str(args.cls_steps),
            "--lr", str(args.lr), "--seg_lr", str(args.seg_lr), "--optimizer", args.optimizer,
            "--densecrfloss", str(args.densecrfloss), "--seed", str(args.seed),
            "--num_workers", str(args.num_workers), "--device", "cpu", "--save_dir", run_dir,
            "--session_name", "demo_", "--log_every", str(max(1, args.max_step // 10)),
            "--save_every", str(args.max_step), "--region_quality", "--tensorboard"]
    if args.momentum is not None:
        argv += ["--momentum", str(args.momentum)]
    if args.mining_workers is not None:
        argv += ["--mining_workers", str(args.mining_workers)]
    if args.no_progress:
        argv.append("--no_progress")
    return argv


def format_results(results: dict[str, Any]) -> str:
    rows = [("CAM pseudo labels (4-scale CAM, SPEC §5 step 1)", results["cam_miou"]),
            ("RRM segmentation, no CRF", results["rrm_miou"]),
            ("RRM segmentation + CRF", results["rrm_crf_miou"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'synthetic val (' + str(results['num_val_images']) + ' images)':<{width}}   mIoU",
             *(f"{name:<{width}}  {100 * value:5.1f}" for name, value in rows)]
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """All four steps; returns the results written to <out>/results.json."""
    progress = not args.no_progress
    start = time.perf_counter()
    data_root = os.path.join(args.out, "data")
    print(f"[1/4] synthetic data set in {data_root}", flush=True)
    generated = ensure_dataset(data_root, data_options(args))
    print("      generated" if generated else "      already there, reused", flush=True)
    data_seconds = time.perf_counter() - start

    print(f"[2/4] training from scratch, both phases of train_from_init.py ({args.max_step} updates)", flush=True)
    run_dir = os.path.join(args.out, "run")
    training_args = build_training_parser(train_from_init.DEFAULTS, train_from_init.__doc__).parse_args(
        training_argv(args, data_root, run_dir))
    trained = run_training(training_args)
    curves = plot_run(read_run(session_path(training_args, "metrics.jsonl")), session_path(training_args, "curves.png"))
    with open(session_path(training_args, "region_quality.json")) as handle:
        regions = json.load(handle)
    train_seconds = time.perf_counter() - start - data_seconds

    print("[3/4] evaluating on the synthetic val set", flush=True)
    model = load_model("network.RRM", trained.final_weights, args.width, "cpu")
    val_ids = read_id_list(default_list_path(data_root, "val"))
    dataset = EvalDataset(ids=val_ids, image_dir=os.path.join(data_root, IMAGE_DIR),
                          gt_dir=os.path.join(data_root, MASK_DIR), require_gt=True)
    cam = evaluate_cam(model, dataset, progress=progress)
    segmentation = run_inference(model, dataset, out_pred_dir=os.path.join(args.out, "pred", "no_crf"),
                                 out_crf_dir=os.path.join(args.out, "pred", "crf"), crf_workers=args.crf_workers,
                                 summary_path=os.path.join(args.out, "inference_summary.json"), progress=progress)
    print("[4/4] panels", flush=True)
    panels = write_panels(model, dataset, val_ids[:args.num_panels], os.path.join(args.out, "panels"))

    results: dict[str, Any] = {
        "cam_miou": cam["mean_iou"], "rrm_miou": segmentation["no_crf"]["mean_iou"],
        "rrm_crf_miou": segmentation["crf"]["mean_iou"], "num_val_images": len(dataset),
        "cam_definition": "argmax of [(1 - max_c cam_c)^32; cam] (SPEC §5 step 1) of the final model's 4-scale "
                          "CAM, image classes only, each map divided by its maximum",
        "per_class_iou": {"cam": cam["iou"], "rrm": segmentation["no_crf"]["iou"],
                          "rrm_crf": segmentation["crf"]["iou"]},
        "reliable_regions": {key: regions[key] for key in ("precision", "coverage", "cam_precision")},
        "weights": trained.final_weights, "panels": panels, "curves": curves,
        "config": {**vars(args), "training_argv": training_argv(args, data_root, run_dir)},
        "seconds": {"data": data_seconds, "train": train_seconds,
                    "evaluate": time.perf_counter() - start - data_seconds - train_seconds,
                    "total": time.perf_counter() - start},
    }
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(format_results(results))
    print(f"results: {os.path.join(args.out, 'results.json')}; panels: {os.path.join(args.out, 'panels')}; "
          f"{results['seconds']['total']:.0f} s")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val", "max_step", "batch_size", "crop_size", "num_panels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.cls_steps < args.max_step:
        parser.error(f"--cls_steps {args.cls_steps} must be in 1..max_step-1 ({args.max_step - 1})")
    if args.num_panels > args.num_val:
        parser.error(f"--num_panels {args.num_panels} exceeds --num_val {args.num_val}")
    return run_demo(args)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"tool.demo: error: {error}")

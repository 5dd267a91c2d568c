"""Segment a list of images with a trained RRM model, as the released infer_RRM.py, plus mIoU.

Writes no-CRF and CRF predictions as 8-bit class-index PNGs; when ground truth exists (`--gt_dir`,
or `SegmentationClass` under `--voc12_root`; COCO: `SegmentationClass/<split>` under `--data_root`)
prints per-class IoU, mean IoU and pixel accuracy for both, and writes them to a summary JSON.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import network
from tool.allocator import add_memory_argument, apply_memory_choice
from tool.cli import inputs_checked, run_cli
from tool.crf import add_crf_backend_argument, resolve_crf_backend
from tool.datasets import add_dataset_arguments, data_module, resolve_data_root, resolve_dataset
from tool.device import add_device_arguments, pick_device
from tool.inference import evaluation_inputs, format_summary, load_model, run_inference

RELEASED_WEIGHTS = {"rrm": "./netWeights/RRM_final.pth", "rrm_attention": "./netWeights/RRM(attention)_final.pth"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None,
                        help="trained .pth (default: the released file of --network in ./netWeights)")
    parser.add_argument("--network", default="network.RRM", help='network.RRM or "network.RRM(attention)"')
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier the weights were trained with")
    parser.add_argument("--out_cam_pred", default="./output/result/no_crf", help="folder of no-CRF predictions")
    parser.add_argument("--out_la_crf", default="./output/result/crf",
                        help="folder of CRF predictions; '' or 'none' skips the CRF")
    parser.add_argument("--out_color", default=None, help="also write VOC-palette PNGs to <dir>/no_crf and <dir>/crf")
    add_dataset_arguments(parser, "data set root: VOC2012 folder (JPEGImages, SegmentationClass, ImageSets), or the "
                                  "COCO root as `python -m coco14.prepare` leaves it")
    parser.add_argument("--split", default=None,
                        help="the list <root>/<list folder>/<split>.txt read by default (VOC val, COCO val2014); "
                             "COCO: also the folders of every image, <root>/<split>/ and "
                             "<root>/SegmentationClass/<split>/ (default: the split each file name says)")
    parser.add_argument("--LISTpath", default=None,
                        help="image list, ids or released pairs (default: the val list under the root)")
    parser.add_argument("--IMpath", "--IM_path", dest="IMpath", default=None,
                        help="folder of <id>.jpg (default: JPEGImages under --voc12_root; COCO: <root>/<split>)")
    parser.add_argument("--gt_dir", default=None,
                        help="folder of <id>.png ground truth (default: SegmentationClass under --voc12_root, if any; "
                             "COCO: <root>/SegmentationClass/<split>)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="input scales whose logits are averaged (released: 1.0)")
    parser.add_argument("--flip", action="store_true", help="also average the horizontally mirrored input")
    parser.add_argument("--crf_workers", type=int, default=None,
                        help="processes solving pydensecrf CRFs while the network runs (0: serially, as released; "
                             "default 1, and 0 with the torch backend, which solves them on the device)")
    add_crf_backend_argument(parser)
    add_device_arguments(parser)
    add_memory_argument(parser)
    parser.add_argument("--num_workers", type=int, default=1, help="DataLoader processes reading images")
    parser.add_argument("--summary", default=None,
                        help="summary JSON path (default: summary.json beside --out_cam_pred)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def resolve_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The EvalDataset arguments from the flags (`evaluation_inputs`), each path checked and named."""
    info = resolve_dataset(args.dataset)
    root, root_flag = resolve_data_root(args, None)
    if root is not None and not os.path.isdir(root):
        raise FileNotFoundError(f"{root_flag}: folder not found: {root}")
    if args.split is not None and args.LISTpath is not None and not info.has_split_folders:
        raise ValueError(f"--split {args.split} only picks the default list, and --LISTpath {args.LISTpath} is given")
    if args.LISTpath is None and root is None:
        raise ValueError(f"give --LISTpath (the image list) or {root_flag} (uses its {info.val_split} list)")
    if args.IMpath is None and root is None:
        raise ValueError(f"give --IMpath (the folder of <id>.jpg) or {root_flag} (uses its image folders)")
    if args.gt_dir is not None and not os.path.isdir(args.gt_dir):
        raise FileNotFoundError(f"--gt_dir: ground-truth folder not found: {args.gt_dir}")
    inputs = evaluation_inputs(info, root, split=args.split, list_path=args.LISTpath, image_dir=args.IMpath,
                               gt_dir=args.gt_dir)
    if not os.path.isfile(inputs["list_path"]):
        raise FileNotFoundError(f"--LISTpath: image list not found: {inputs['list_path']}")
    if inputs["image_dir"] is not None and not os.path.isdir(inputs["image_dir"]):
        raise FileNotFoundError(f"--IMpath: image folder not found: {inputs['image_dir']}")
    return inputs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.crf_workers is not None and args.crf_workers < 0:
        parser.error(f"--crf_workers must be >= 0, got {args.crf_workers}")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be >= 0, got {args.num_workers}")
    if any(scale <= 0 for scale in args.scales):
        parser.error(f"--scales must be positive, got {args.scales}")
    weights = args.weights or RELEASED_WEIGHTS[network.resolve_network(args.network).SegNet.variant]
    use_crf = args.out_la_crf not in ("", "none", "None")
    inputs = resolve_inputs(args)
    info = resolve_dataset(args.dataset)
    dataset = data_module(args.dataset).EvalDataset(**inputs, require_gt=args.gt_dir is not None)
    device = pick_device(args.device)
    crf_backend = resolve_crf_backend(args.crf_backend, device)
    if crf_backend == "torch" and args.crf_workers:
        parser.error(f"--crf_workers {args.crf_workers} applies to --crf_backend pydensecrf; the torch backend "
                     f"solves the CRFs on {device} in this process")
    crf_workers = args.crf_workers if args.crf_workers is not None else int(crf_backend == "pydensecrf")
    apply_memory_choice(args.release_memory)
    model = load_model(args.network, weights, args.width, device, info.num_classes)
    summary_path = args.summary or os.path.join(os.path.dirname(os.path.abspath(args.out_cam_pred)), "summary.json")
    inputs_checked()  # from here on an error is the run's own: run_cli keeps its traceback
    summary = run_inference(
        model, dataset, out_pred_dir=args.out_cam_pred, out_crf_dir=args.out_la_crf if use_crf else None,
        out_color_dir=args.out_color, crf=use_crf, scales=args.scales, flip=args.flip,
        crf_workers=crf_workers, crf_backend=crf_backend, amp=args.amp, num_workers=args.num_workers, summary_path=summary_path,
        progress=not args.no_progress,
        extra_summary={"network": args.network, "weights": weights, "width": args.width, "device": str(device),
                       "crf_backend": crf_backend, "dataset": args.dataset, "list": inputs["list_path"],
                       "image_dir": inputs["image_dir"] or info.image_dir(inputs["root"], "{split}"),
                       "gt_dir": inputs["gt_dir"] or (info.mask_dirs(inputs["root"], "{split}")[0]
                                                      if inputs["root"] else None)})
    print(format_summary(summary))
    print(f"{summary['num_images']} images in {summary['seconds']:.1f} s "
          f"({summary['images_per_second']:.2f} images/s); summary: {summary_path}")
    return summary


if __name__ == "__main__":
    run_cli("infer_RRM.py", main)

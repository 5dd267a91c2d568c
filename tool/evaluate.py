"""mIoU of a folder of predicted class-index PNGs against a folder of ground-truth PNGs.

    python -m tool.evaluate --pred_dir output/result/crf --gt_dir VOC2012/SegmentationClass \\
        --list VOC2012/ImageSets/Segmentation/val.txt [--summary eval.json]

Same confusion matrix as infer_RRM.py: background + the classes of `--dataset` (VOC 21 labels, COCO
81), 255 in the ground truth ignored, classes absent from both ground truth and predictions left out
of the mean.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from tool.cli import run_cli
from tool.datasets import DATASETS, resolve_dataset
from tool.metrics import ConfusionMatrix, segmentation_confusion_matrix
from voc12.lists import VOC12, DatasetInfo, read_id_list, read_mask


def evaluate_folders(pred_dir: str, gt_dir: str, ids: Sequence[str], info: DatasetInfo = VOC12) -> ConfusionMatrix:
    """Confusion matrix over `info`'s classes of `<pred_dir>/<id>.png` against `<gt_dir>/<id>.png` over `ids`."""
    for flag, folder in (("--pred_dir", pred_dir), ("--gt_dir", gt_dir)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag}: folder not found: {folder}")
    matrix = segmentation_confusion_matrix(info)
    for image_id in ids:
        pred_path = os.path.join(pred_dir, image_id + ".png")
        gt_path = os.path.join(gt_dir, image_id + ".png")
        pred, gt = read_mask(pred_path), read_mask(gt_path)
        if pred.shape != gt.shape:
            raise ValueError(f"{pred_path} is {pred.shape[1]}x{pred.shape[0]} but {gt_path} is "
                             f"{gt.shape[1]}x{gt.shape[0]}")
        try:
            matrix.update(gt, pred)
        except ValueError as error:
            raise ValueError(f"{pred_path}: {error}") from error
    return matrix


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred_dir", required=True, help="folder of predicted <id>.png (class indices)")
    parser.add_argument("--gt_dir", required=True,
                        help="folder of ground-truth <id>.png (0..20 for VOC, 0..80 for COCO; 255 ignored)")
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="voc12", help="whose classes the labels are")
    parser.add_argument("--list", default=None, help="image list (ids or released pairs); default: every PNG in --pred_dir")
    parser.add_argument("--summary", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.list is not None:
        ids = read_id_list(args.list)
    elif os.path.isdir(args.pred_dir):
        ids = sorted(name[:-4] for name in os.listdir(args.pred_dir) if name.endswith(".png"))
        if not ids:
            raise ValueError(f"--pred_dir: no .png files in {args.pred_dir}")
    else:
        raise FileNotFoundError(f"--pred_dir: folder not found: {args.pred_dir}")
    matrix = evaluate_folders(args.pred_dir, args.gt_dir, ids, resolve_dataset(args.dataset))
    result = {"num_images": len(ids), **matrix.as_dict()}
    print(matrix)
    print(f"({len(ids)} images)")
    if args.summary:
        os.makedirs(os.path.dirname(os.path.abspath(args.summary)), exist_ok=True)
        with open(args.summary, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    run_cli("tool.evaluate", main)

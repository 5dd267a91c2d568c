"""Panels for chosen images: input | ground truth | CAM heatmap | mined reliable labels | prediction | + CRF.

    python -m tool.visualize --network network.RRM --weights RRM_final.pth --voc12_root VOC2012 \\
        --ids 2007_000033 2007_000129 --out_dir panels
    python -m tool.visualize --dataset coco14 --data_root COCO --weights coco_final.pth --num 4

Label maps use the VOC palette (COCO's masks use it too); ignore (255) is shown white.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from tool.cli import run_cli
from tool.crf_pool import crf_label_map
from tool.datasets import add_dataset_arguments, data_module, resolve_data_root, resolve_dataset
from tool.device import add_device_arguments, pick_device
from tool.inference import evaluation_inputs, image_label, load_model, multiscale_norm_cam, predict_probs
from tool.mining import mine_reliable_regions
from voc12.data import EvalDataset
from voc12.lists import IGNORE_LABEL, VOC_PALETTE

PANEL_TITLES: tuple[str, ...] = ("input", "ground truth", "CAM", "reliable labels", "prediction", "prediction + CRF")
TITLE_HEIGHT = 20
GAP = 4
WHITE = (255, 255, 255)
MISSING_GREY = (128, 128, 128)


def colorize(labels: np.ndarray, ignore_color: tuple[int, int, int] = WHITE) -> np.ndarray:
    """Class-index map (H,W) -> RGB (H,W,3) uint8 in the VOC palette, 255 (ignore) in `ignore_color`."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"colorize: labels must be (H,W), got shape {labels.shape}")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"colorize: labels must lie in 0..255, got {labels.min()}..{labels.max()}")
    rgb = VOC_PALETTE[labels.astype(np.uint8)]
    rgb[labels == IGNORE_LABEL] = ignore_color
    return rgb


def cam_heatmap(image: np.ndarray, norm_cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """JET colour map of the per-pixel maximum of a normalised CAM (C,H,W) in 0..1, blended over the image."""
    strength = np.clip(np.asarray(norm_cam, np.float32).max(axis=0), 0.0, 1.0)
    jet_bgr = cv2.applyColorMap(np.rint(strength * 255).astype(np.uint8), cv2.COLORMAP_JET)
    jet = cv2.cvtColor(jet_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    return np.rint(alpha * jet + (1 - alpha) * image.astype(np.float32)).astype(np.uint8)


def _missing_tile(height: int, width: int) -> np.ndarray:
    tile = np.full((height, width, 3), MISSING_GREY, np.uint8)
    cv2.putText(tile, "n/a", (max(2, width // 2 - 12), height // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, WHITE, 1,
                cv2.LINE_AA)
    return tile


def render_panel(tiles: Sequence[np.ndarray | None], titles: Sequence[str] = PANEL_TITLES) -> np.ndarray:
    """Tiles (H,W,3) uint8 side by side, GAP white pixels apart, under a TITLE_HEIGHT title strip.

    A None tile is drawn grey with "n/a". Result: (TITLE_HEIGHT + H, n·W + (n-1)·GAP, 3) uint8.
    """
    if len(tiles) != len(titles):
        raise ValueError(f"render_panel: {len(tiles)} tiles for {len(titles)} titles")
    shapes = {tile.shape for tile in tiles if tile is not None}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise ValueError(f"render_panel: tiles must be non-empty (H,W,3) arrays of one size, got {sorted(shapes)}")
    height, width, _ = next(iter(shapes))
    count = len(tiles)
    panel = np.full((TITLE_HEIGHT + height, count * width + (count - 1) * GAP, 3), 255, np.uint8)
    for index, (tile, title) in enumerate(zip(tiles, titles)):
        left = index * (width + GAP)
        panel[TITLE_HEIGHT:, left:left + width] = _missing_tile(height, width) if tile is None else tile
        panel[:TITLE_HEIGHT, left:left + width] = _title_strip(title, width)
    return panel


def _title_strip(title: str, width: int) -> np.ndarray:
    """A white TITLE_HEIGHT x width strip with `title`, shrunk to fit (and clipped to the strip)."""
    strip = np.full((TITLE_HEIGHT, width, 3), 255, np.uint8)
    text_width = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0]
    scale = 0.4 * min(1.0, max(width - 4, 1) / text_width)
    cv2.putText(strip, title, (2, TITLE_HEIGHT - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def panel_for_item(model: nn.Module, item: dict, crf: bool = True, scales: Sequence[float] = (1.0,),
                   flip: bool = False) -> np.ndarray:
    """The six-tile panel of one evaluation item (see `render_panel` for the size)."""
    device = next(model.parameters()).device
    model.eval()
    original = np.ascontiguousarray(np.asarray(item["original"], np.uint8))
    image = torch.as_tensor(item["image"])[None].to(device)
    label = image_label(item, model.num_classes)
    heatmap = reliable = None
    if label is not None:
        norm_cam = multiscale_norm_cam(model, image, label)
        heatmap = cam_heatmap(original, norm_cam)
        reliable = colorize(mine_reliable_regions(original, label, norm_cam))
    probs = predict_probs(model, image, scales, flip)
    prediction = probs.argmax(0).cpu().numpy().astype(np.uint8)
    with_crf = colorize(crf_label_map(original, probs.cpu().numpy())) if crf else None
    gt = colorize(np.asarray(item["gt"])) if "gt" in item else None
    return render_panel([original, gt, heatmap, reliable, colorize(prediction), with_crf])


def write_panels(model: nn.Module, dataset: EvalDataset, ids: Sequence[str], out_dir: str,
                 crf: bool = True, scales: Sequence[float] = (1.0,), flip: bool = False) -> list[str]:
    """Write `<out_dir>/<id>_panel.png` for each id of `dataset` (an item list with an `ids` attribute)."""
    unknown = [image_id for image_id in ids if image_id not in dataset.ids]
    if unknown:
        raise ValueError(f"ids not in the image list: {', '.join(unknown)}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for image_id in ids:
        panel = panel_for_item(model, dataset[dataset.ids.index(image_id)], crf, scales, flip)
        paths.append(os.path.join(out_dir, f"{image_id}_panel.png"))
        Image.fromarray(panel).save(paths[-1])
    return paths


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="trained .pth")
    parser.add_argument("--network", default="network.RRM", help='network.RRM or "network.RRM(attention)"')
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier the weights were trained with")
    add_dataset_arguments(parser, "data set root (VOC2012 folder with JPEGImages, SegmentationClass; or the COCO "
                                  "root as `python -m coco14.prepare` leaves it); this or --voc12_root is needed")
    parser.add_argument("--split", default=None,
                        help="as infer_RRM.py: the default list's split; COCO: also the image and mask folders")
    parser.add_argument("--list", default=None, help="image list (default: the val list under the root)")
    parser.add_argument("--ids", nargs="+", default=None, help="images to draw (default: the first --num of the list)")
    parser.add_argument("--num", type=int, default=4, help="how many images when --ids is not given")
    parser.add_argument("--out_dir", default="./output/panels", help="where <id>_panel.png go")
    parser.add_argument("--no_crf", action="store_true", help="leave the CRF tile empty")
    add_device_arguments(parser, amp=False)
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    root, root_flag = resolve_data_root(args, None)
    if root is None:
        parser.error("give --data_root (or, for VOC, --voc12_root)")
    info = resolve_dataset(args.dataset)
    dataset = data_module(args.dataset).EvalDataset(**evaluation_inputs(info, root, split=args.split,
                                                                        list_path=args.list))
    model = load_model(args.network, args.weights, args.width, pick_device(args.device), info.num_classes)
    paths = write_panels(model, dataset, args.ids or dataset.ids[:args.num], args.out_dir, crf=not args.no_crf)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    run_cli("tool.visualize", main)

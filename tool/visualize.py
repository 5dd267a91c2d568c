"""Panels for chosen images: input | ground truth | CAM heatmap | mined reliable labels | prediction | + CRF.

    python -m tool.visualize --network network.RRM --weights RRM_final.pth --voc12_root VOC2012 \\
        --ids 2007_000033 2007_000129 --out_dir panels
    python -m tool.visualize --dataset coco14 --data_root COCO --weights coco_final.pth --num 4

With --training_panels, the panels --tensorboard logs during training (input | CAM | reliable labels
| prediction of the un-augmented centre crop of training ids), from any weights of a run:

    python -m tool.visualize --training_panels --weights runs/RRM_resume.pt --ids 2007_000032
    python -m tool.visualize --training_panels --weights runs/RRM_12000.pth --voc12_root VOC2012 --crop_size 321

Label maps use the VOC palette (COCO's masks use it too); ignore (255) is shown white.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, default_collate

from tool.checkpoint import load_resume_checkpoint
from tool.cli import run_cli
from tool.crf import resolve_crf_backend
from tool.crf_pool import crf_label_map
from tool.datasets import add_dataset_arguments, data_module, resolve_data_root, resolve_dataset
from tool.device import add_device_arguments, pick_device
from tool.inference import evaluation_inputs, image_label, load_model, multiscale_norm_cam, predict_probs
from tool.mining import ReliableRegionMiner, crop_norm_cams, mine_norm_cams, mine_reliable_regions
from voc12.data import EvalDataset
from voc12.lists import IGNORE_LABEL, VOC_PALETTE

PANEL_TITLES: tuple[str, ...] = ("input", "ground truth", "CAM", "reliable labels", "prediction", "prediction + CRF")
TRAINING_PANEL_TITLES: tuple[str, ...] = ("input", "CAM", "reliable labels", "prediction")
DEFAULT_NETWORK = "network.RRM"
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


def training_panel(image: np.ndarray, norm_cam: np.ndarray | None, reliable: np.ndarray | None,
                   prediction: np.ndarray | None,
                   colorize_labels: Callable[[np.ndarray], np.ndarray] = colorize) -> np.ndarray:
    """input | CAM | reliable labels | prediction of one training crop, with titles (`render_panel`'s
    layout: (TITLE_HEIGHT + H, 4·W + 3·GAP, 3) uint8).

    image (H,W,3) uint8; norm_cam (C,H,W) normalised CAM in 0..1 with the absent classes zeroed, drawn
    as a JET heat map of the per-pixel maximum (= the maximum over the present classes) over the image;
    reliable (H,W) mined labels with 255 = unreliable; prediction (H,W) segmentation labels.
    `colorize_labels` turns a label map into RGB (default: VOC palette, 255 white); pass one with the
    data set's palette for another class count (COCO's 81). A None tile is drawn grey "n/a" (e.g.
    phase 1 of train_from_init, which has no reliable labels or segmentation yet).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"training_panel: image must be (H,W,3) uint8, got {image.dtype} {image.shape}")
    size = image.shape[:2]
    for name, labels in (("reliable", reliable), ("prediction", prediction)):
        if labels is not None and np.shape(labels) != size:
            raise ValueError(f"training_panel: {name} must be (H,W) = {size} like image, got {np.shape(labels)}")
    if norm_cam is not None and (np.ndim(norm_cam) != 3 or np.shape(norm_cam)[1:] != size):
        raise ValueError(f"training_panel: norm_cam must be (C,{size[0]},{size[1]}) like image, "
                         f"got {np.shape(norm_cam)}")
    tiles = [image,
             None if norm_cam is None else cam_heatmap(image, norm_cam),
             None if reliable is None else colorize_labels(np.asarray(reliable)),
             None if prediction is None else colorize_labels(np.asarray(prediction))]
    return render_panel(tiles, TRAINING_PANEL_TITLES)


@torch.no_grad()
def training_panels(model: nn.Module, batch: Mapping[str, Any], miner: ReliableRegionMiner | None,
                    classification_only: bool = False) -> list[tuple[str, np.ndarray]]:
    """(id, `training_panel`) of each item of a training batch (the data set's items collated), as
    the training step sees them: the 4-scale training CAM at crop size, mined as the engine mines
    (`miner` None = the torch backend on the model's device, else the CPU miner), and the
    segmentation head's argmax at crop size. The forward runs in eval mode (no dropout, BatchNorms
    on their running statistics), the model's mode restored after. `classification_only` (phase 1
    of train_from_init): the reliable-label and prediction tiles are drawn "n/a"."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        outputs = model(batch["image"].to(device))
    finally:
        model.train(was_training)
    cam, seg = outputs[1], outputs[2]
    seg = seg[0] if isinstance(seg, (list, tuple)) else seg
    size = tuple(batch["original"].shape[-2:])
    norm_cams = crop_norm_cams(cam, batch["label"], size, on_device=miner is None)
    reliable = prediction = None
    if not classification_only:
        reliable = np.asarray(torch.as_tensor(mine_norm_cams(norm_cams, batch["label"], batch["original"],
                                                             miner)).cpu())
        logits = F.interpolate(seg.float(), size=size, mode="bilinear", align_corners=False)
        prediction = logits.argmax(1).cpu().numpy()
    norm_cams = norm_cams.cpu().numpy() if isinstance(norm_cams, torch.Tensor) else norm_cams
    originals = np.ascontiguousarray(batch["original"].numpy().transpose(0, 2, 3, 1))
    return [(image_id, training_panel(originals[index], norm_cams[index],
                                      None if reliable is None else reliable[index],
                                      None if prediction is None else prediction[index]))
            for index, image_id in enumerate(batch["id"])]


def fixed_batch(dataset: Dataset, indices: Sequence[int]) -> dict[str, Any]:
    """The un-augmented centre crops (`fixed_item`) of a training data set's items, collated: the
    fixed panel set of a run."""
    return default_collate([dataset.fixed_item(index) for index in indices])


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


def _indices_of(dataset: Dataset, ids: Sequence[str]) -> list[int]:
    unknown = [image_id for image_id in ids if image_id not in dataset.ids]
    if unknown:
        raise ValueError(f"ids not in the image list: {', '.join(unknown)}")
    return [dataset.ids.index(image_id) for image_id in ids]


def _write_each(dataset: Dataset, ids: Sequence[str], out_dir: str, suffix: str,
                panel_of: Callable[[int], np.ndarray]) -> list[str]:
    """`<out_dir>/<id><suffix>.png` = panel_of(the id's index in dataset), for each id."""
    indices = _indices_of(dataset, ids)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for image_id, index in zip(ids, indices):
        panel = panel_of(index)
        paths.append(os.path.join(out_dir, f"{image_id}{suffix}.png"))
        Image.fromarray(panel).save(paths[-1])
    return paths


def write_panels(model: nn.Module, dataset: EvalDataset, ids: Sequence[str], out_dir: str,
                 crf: bool = True, scales: Sequence[float] = (1.0,), flip: bool = False) -> list[str]:
    """Write `<out_dir>/<id>_panel.png` for each id of `dataset` (an item list with an `ids` attribute)."""
    return _write_each(dataset, ids, out_dir, "_panel",
                       lambda index: panel_for_item(model, dataset[index], crf, scales, flip))


def write_training_panels(model: nn.Module, dataset: Dataset, ids: Sequence[str], out_dir: str,
                          miner: ReliableRegionMiner | None) -> list[str]:
    """Write `<out_dir>/<id>_training_panel.png` (`training_panels` of the id's fixed crop) for each
    id of a training data set."""
    return _write_each(dataset, ids, out_dir, "_training_panel",
                       lambda index: training_panels(model, fixed_batch(dataset, [index]), miner)[0][1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True,
                        help="trained .pth; with --training_panels also a resume checkpoint <session>resume.pt")
    parser.add_argument("--network", default=None,
                        help='network.RRM (default) or "network.RRM(attention)"; --training_panels: default the '
                             "resume checkpoint's")
    parser.add_argument("--width", type=float, default=None,
                        help="channel multiplier the weights were trained with (default 1.0; --training_panels: "
                             "the resume checkpoint's)")
    add_dataset_arguments(parser, "data set root (VOC2012 folder with JPEGImages, SegmentationClass; or the COCO "
                                  "root as `python -m coco14.prepare` leaves it); this or --voc12_root is needed "
                                  "(--training_panels: default the resume checkpoint's)")
    parser.add_argument("--split", default=None,
                        help="as infer_RRM.py: the default list's split; COCO: also the image and mask folders")
    parser.add_argument("--list", default=None,
                        help="image list (default: the val list under the root; --training_panels: the training "
                             "list, the resume checkpoint's if given)")
    parser.add_argument("--ids", nargs="+", default=None, help="images to draw (default: the first --num of the list)")
    parser.add_argument("--num", type=int, default=4, help="how many images when --ids is not given")
    parser.add_argument("--out_dir", default="./output/panels", help="where <id>_panel.png go")
    parser.add_argument("--no_crf", action="store_true", help="leave the CRF tile empty")
    training = parser.add_argument_group(
        "training panels (input | CAM | reliable labels | prediction of a training crop, as --tensorboard logs them)")
    training.add_argument("--training_panels", action="store_true",
                          help="draw <id>_training_panel.png of training ids: the centre crop without "
                               "augmentation, the CAM and the reliable labels as the training step mines them")
    training.add_argument("--crop_size", type=int, default=None,
                          help="the training crop (default: the resume checkpoint's; needed with a .pth)")
    training.add_argument("--augmentation", choices=("init", "scaled"), default=None,
                          help="whose padding the crop has: init (train_from_init.py, black) or scaled "
                               "(train_from_cls_weight.py, the mean colour); default the resume checkpoint's, "
                               "else scaled")
    add_device_arguments(parser, amp=False)
    return parser


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    paths = _training_panel_files(parser, args) if args.training_panels else _evaluation_panel_files(parser, args)
    for path in paths:
        print(path)
    return paths


def _evaluation_panel_files(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    for name in ("crop_size", "augmentation"):
        if getattr(args, name) is not None:
            parser.error(f"--{name} applies to --training_panels only")
    root, _ = resolve_data_root(args, None)
    if root is None:
        parser.error("give --data_root (or, for VOC, --voc12_root)")
    info = resolve_dataset(args.dataset)
    dataset = data_module(args.dataset).EvalDataset(**evaluation_inputs(info, root, split=args.split,
                                                                        list_path=args.list))
    model = load_model(args.network or DEFAULT_NETWORK, args.weights, args.width or 1.0, pick_device(args.device),
                       info.num_classes)
    return write_panels(model, dataset, args.ids or dataset.ids[:args.num], args.out_dir, crf=not args.no_crf)


def _training_panel_files(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """--training_panels: the run's settings from a resume checkpoint, the flags overriding them."""
    for flag, given in (("--no_crf", args.no_crf), ("--split", args.split is not None)):
        if given:
            parser.error(f"{flag} applies to the evaluation panels, not to --training_panels")
    recorded: dict[str, Any] = {}
    state = None
    if args.weights.endswith(".pt"):
        checkpoint = load_resume_checkpoint(args.weights, flag="--weights")
        recorded, state = checkpoint["run_config"], checkpoint["model"]
    if recorded.get("dataset", args.dataset) != args.dataset:
        parser.error(f"--weights {args.weights} was trained with --dataset {recorded['dataset']}; give that "
                     f"--dataset")
    root, _ = resolve_data_root(args, recorded.get("data_root"))
    if root is None:
        parser.error("give --data_root (or, for VOC, --voc12_root)")
    crop_size = args.crop_size or recorded.get("crop_size")
    if crop_size is None:
        parser.error("give --crop_size (the training crop) with a weights file; a resume checkpoint records it")
    info = resolve_dataset(args.dataset)
    datasets = data_module(args.dataset)
    augmentation = args.augmentation or recorded.get("augmentation", "scaled")
    dataset_class = datasets.TrainDatasetInit if augmentation == "init" else datasets.TrainDatasetScaled
    dataset = dataset_class(root, args.list or recorded.get("train_list"), recorded.get("cls_labels"), crop_size)
    device = pick_device(args.device)
    model = load_model(args.network or recorded.get("network", DEFAULT_NETWORK), None if state else args.weights,
                       args.width or recorded.get("width", 1.0), device, info.num_classes)
    if state is not None:
        model.load_state_dict(state)
    with ReliableRegionMiner(0) as miner:  # in-process: a few crops
        return write_training_panels(model, dataset, args.ids or dataset.ids[:args.num], args.out_dir,
                                     miner if resolve_crf_backend("auto", device) == "pydensecrf" else None)


if __name__ == "__main__":
    run_cli("tool.visualize", main)

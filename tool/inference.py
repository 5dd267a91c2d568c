"""Inference engine of infer_RRM.py: model loading, (multi-scale + flip) forward, CRF, PNGs, mIoU.

Per image, as released (SPEC §10): full image, no resizing, `predict_seg`, logits upsampled
bilinearly (align_corners False) to the image size, softmax; no-CRF prediction = argmax; CRF
prediction = argmax of the inference CRF on that softmax. With several scales and/or flip the
upsampled logits of every pass are averaged before the softmax (one scale, no flip = released).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import network
from tool.crf_pool import CrfPool
from tool.device import autocast_context
from tool.metrics import segmentation_confusion_matrix
from tool.mining import cam_label_maps, normalise_cam
from tool.weights import load_weights
from voc12.lists import NUM_CLASSES as VOC_NUM_CLASSES
from voc12.lists import DatasetInfo, write_palette_mask, write_plain_mask


def evaluation_inputs(info: DatasetInfo, root: str | None, *, split: str | None = None,
                      list_path: str | None = None, image_dir: str | None = None,
                      gt_dir: str | None = None) -> dict[str, Any]:
    """EvalDataset arguments for the images of a list as infer_RRM.py reads them: the list (default
    `<root>/<list folder>/<split or val split>.txt`), one image folder (`image_dir`, else the
    layout's, of `split` for COCO) and the evaluation masks (`gt_dir`, else the layout's first mask
    folder if it exists: VOC's SegmentationClass, not the training set SegmentationClassAug). COCO
    without `split` reads each image's split from its name: image and mask folders are then looked
    up under the root per image (`root` is set, `image_dir`/`gt_dir` None unless given)."""
    per_image_split = info.has_split_folders and split is None
    if image_dir is None and not per_image_split:
        image_dir = info.image_dir(root, split)
    if gt_dir is None and root is not None and not per_image_split:
        evaluation_masks = info.mask_dirs(root, split)[0]
        gt_dir = evaluation_masks if os.path.isdir(evaluation_masks) else None
    return {"root": root if per_image_split else None,
            "list_path": list_path or info.list_path(root, split or info.val_split),
            "image_dir": image_dir, "gt_dir": gt_dir, "split": split if info.has_split_folders else None}


def load_model(network_name: str, weights: str | None, width: float = 1.0,
               device: torch.device | str = "cpu", num_classes: int = VOC_NUM_CLASSES) -> nn.Module:
    """SegNet of `network_name` for `num_classes` classes in eval mode on `device`, with `weights`
    (.pth/.params) loaded strictly (the segmentation head must be in the file, sized for those
    classes); `weights=None` keeps the random initialisation."""
    model = network.build_segnet(network_name, width, num_classes)
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--weights: weights file not found: {weights}")
        load_weights(model, weights, allow_missing_heads=False)
    return model.eval().to(device)


def _single_item(batch: list[dict]) -> dict:
    # Full images differ in size, so the loader hands over one item at a time, uncollated.
    return batch[0]


@torch.inference_mode()
def predict_probs(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,),
                  flip: bool = False, amp: str = "none") -> torch.Tensor:
    """Softmax (C+1,H,W) float32 for one normalised image (1,3,H,W) (or (3,H,W)) on the model's device.

    Every scale s runs `predict_seg` on the image resized to (int(H·s), int(W·s)) (bilinear), and
    with `flip` also on its mirror (batched with it, output mirrored back); the logits, upsampled to
    (H,W), are averaged, then softmaxed.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"predict_probs: image must be (1,3,H,W), got {tuple(image.shape)}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"--scales must be positive numbers, got {list(scales)}")
    height, width = image.shape[2:]
    total = None
    for scale in scales:
        size = (max(1, int(height * scale)), max(1, int(width * scale)))
        scaled = image if size == (height, width) else F.interpolate(
            image, size=size, mode="bilinear", align_corners=False)
        if flip:
            scaled = torch.cat([scaled, scaled.flip(-1)])
        with autocast_context(amp, image.device):
            logits = model.predict_seg(scaled)
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        summed = logits[0] + logits[1].flip(-1) if flip else logits[0]
        total = summed if total is None else total + summed
    return torch.softmax(total / (len(scales) * (2 if flip else 1)), dim=0)


def image_label(item: dict, num_classes: int = VOC_NUM_CLASSES) -> np.ndarray | None:
    """The image label (num_classes,): 'label' of the item, else the classes of its ground truth, else None."""
    if "label" in item:
        return np.asarray(item["label"], np.float32)
    if "gt" in item:
        present = np.unique(np.asarray(item["gt"]))
        label = np.zeros(num_classes, np.float32)
        label[present[(present >= 1) & (present <= num_classes)] - 1] = 1.0
        return label
    return None


@torch.inference_mode()
def multiscale_norm_cam(model: nn.Module, image: torch.Tensor, label: np.ndarray) -> np.ndarray:
    """The training CAM (SegNet's 4-scale CAM) upsampled to the image size and normalised (C,H,W)."""
    cam = model(image)[1]
    cam = F.interpolate(cam.float(), size=image.shape[2:], mode="bilinear", align_corners=False)[0]
    return normalise_cam(cam.cpu().numpy(), label)


def cam_label_map(norm_cam: np.ndarray) -> np.ndarray:
    """CAM pseudo label (SPEC §5 step 1): argmax of [(1 - max_c norm_cam)^32; norm_cam] as uint8 (H,W)
    (`cam_label_maps` of one image, every channel read)."""
    every_class = np.ones((1, norm_cam.shape[0]), np.float32)
    return cam_label_maps(np.ascontiguousarray(norm_cam)[None], every_class)[0].numpy().astype(np.uint8)


def check_class_count(model: nn.Module, info: DatasetInfo) -> None:
    """A model must have the data set's classes (a VOC model cannot score COCO, nor the reverse)."""
    if model.num_classes != info.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes but {info.title} has {info.num_classes}: "
                         f"give the --dataset it was trained on")


def evaluate_cam(model: nn.Module, dataset: Dataset, progress: bool = True) -> dict[str, Any]:
    """mIoU of the CAM pseudo labels (`cam_label_map` of the 4-scale training CAM, image labels from
    'label' or the ground truth) over the items with 'gt': ConfusionMatrix.as_dict() + num_images.
    `dataset`: an EvalDataset (its `info` gives the classes)."""
    device = next(model.parameters()).device
    check_class_count(model, dataset.info)
    model.eval()
    matrix = segmentation_confusion_matrix(dataset.info)
    num_images = 0
    for index in tqdm(range(len(dataset)), desc="CAM", unit="img", disable=not progress):
        item = dataset[index]
        label = image_label(item, dataset.info.num_classes)
        if "gt" not in item or label is None:
            continue
        image = torch.as_tensor(item["image"])[None].to(device)
        matrix.update(np.asarray(item["gt"]), cam_label_map(multiscale_norm_cam(model, image, label)))
        num_images += 1
    return {"num_images": num_images, **matrix.as_dict()}


def format_summary(summary: dict[str, Any]) -> str:
    """Per-class IoU table (no CRF | CRF columns), then mean IoU and pixel accuracy, in percent."""
    columns = [(title, summary[key]) for key, title in (("no_crf", "no CRF"), ("crf", "CRF"))
               if summary.get(key) is not None]
    if not columns:
        return f"{summary['num_images']} images; no ground truth, so no mIoU"
    names = list(columns[0][1]["iou"])  # the data set's classes, background first
    name_width = max(len(name) for name in names + ["pixel accuracy"])

    def percent(value: float | None) -> str:
        return f"{'n/a' if value is None else f'{100 * value:.2f}':>8}"

    lines = [f"{'class':<{name_width}}" + "".join(f"{title:>8}" for title, _ in columns)]
    for name in names:
        lines.append(f"{name:<{name_width}}" + "".join(percent(m["iou"][name]) for _, m in columns))
    lines.append(f"{'mean IoU':<{name_width}}" + "".join(percent(m["mean_iou"]) for _, m in columns))
    lines.append(f"{'pixel accuracy':<{name_width}}" + "".join(percent(m["pixel_accuracy"]) for _, m in columns))
    lines.append(f"({summary['num_images_with_gt']} of {summary['num_images']} images with ground truth)")
    return "\n".join(lines)


def _png_path(folder: str | None, image_id: str) -> str | None:
    return os.path.join(folder, image_id + ".png") if folder else None


def run_inference(model: nn.Module, dataset: Dataset, *, out_pred_dir: str | None = None,
                  out_crf_dir: str | None = None, out_color_dir: str | None = None, crf: bool = True,
                  scales: Sequence[float] = (1.0,), flip: bool = False, crf_workers: int = 1,
                  crf_backend: str = "pydensecrf",
                  amp: str = "none", num_workers: int = 0, summary_path: str | None = None,
                  progress: bool = True, extra_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict every item of `dataset` (an EvalDataset, whose `info` gives the classes), write PNGs,
    score against 'gt' when present.

    Writes `<out_pred_dir>/<id>.png` (no CRF) and, with `crf`, `<out_crf_dir>/<id>.png`, as 8-bit
    class-index PNGs; `out_color_dir` adds VOC-palette copies under `no_crf/` and `crf/`. Any
    output folder may be None (nothing written). CRFs run on `crf_workers` processes (0: in this
    process, after each forward); crf_backend 'torch' solves them on the model's device instead
    (crf_workers must then be 0). Returns the summary dict (also written to `summary_path` as JSON):
    num_images, num_images_with_gt, seconds, images_per_second, scales, flip, crf_applied, and 'no_crf' /
    'crf' metrics ({mean_iou, pixel_accuracy, num_pixels, iou: {class: IoU or None}}, fractions;
    None without ground truth or without CRF).
    """
    device = next(model.parameters()).device
    if crf_backend not in ("pydensecrf", "torch"):
        raise ValueError(f"run_inference: crf_backend must be 'pydensecrf' or 'torch' (resolved), got {crf_backend!r}")
    if crf_backend == "torch" and crf and crf_workers != 0:
        raise ValueError(f"--crf_workers {crf_workers}: the torch CRF runs in this process on {device}; "
                         f"CRF worker processes apply to --crf_backend pydensecrf")
    color_dirs = {kind: os.path.join(out_color_dir, kind) if out_color_dir else None for kind in ("no_crf", "crf")}
    for folder in (out_pred_dir, out_crf_dir if crf else None, color_dirs["no_crf"], color_dirs["crf"] if crf else None):
        if folder:
            os.makedirs(folder, exist_ok=True)
    check_class_count(model, dataset.info)
    matrices = {kind: segmentation_confusion_matrix(dataset.info) for kind in ("no_crf", "crf")}
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers,
                        collate_fn=_single_item, pin_memory=device.type == "cuda")
    num_images = num_with_gt = 0
    waiting_gt: dict[str, np.ndarray] = {}

    def score_crf(finished: list) -> None:
        for image_id, labels in finished:
            if image_id in waiting_gt:
                matrices["crf"].update(waiting_gt.pop(image_id), labels)

    model.eval()
    start = time.perf_counter()
    with CrfPool(crf_workers if crf else 0) as pool:
        for item in tqdm(loader, total=len(dataset), desc="infer", unit="img", disable=not progress):
            image_id = item["id"]
            image = torch.as_tensor(item["image"]).to(device, non_blocking=True)
            probs = predict_probs(model, image, scales, flip, amp)
            prediction = probs.argmax(0).to(torch.uint8).cpu().numpy()
            if out_pred_dir:
                write_plain_mask(_png_path(out_pred_dir, image_id), prediction)
            if color_dirs["no_crf"]:
                write_palette_mask(_png_path(color_dirs["no_crf"], image_id), prediction)
            gt = item.get("gt")
            num_images += 1
            if gt is not None:
                num_with_gt += 1
                matrices["no_crf"].update(np.asarray(gt), prediction)
            if crf:
                if gt is not None:
                    waiting_gt[image_id] = np.asarray(gt)
                original = np.ascontiguousarray(np.asarray(item["original"], dtype=np.uint8))
                crf_input = probs if crf_backend == "torch" else probs.cpu().numpy()
                score_crf(pool.submit(image_id, original, crf_input,
                                      _png_path(out_crf_dir, image_id), _png_path(color_dirs["crf"], image_id)))
        score_crf(pool.drain())
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = dict(extra_summary or {})
    summary.update({
        "num_images": num_images, "num_images_with_gt": num_with_gt, "seconds": seconds,
        "images_per_second": num_images / seconds if seconds > 0 else None,
        "scales": [float(s) for s in scales], "flip": flip, "crf_applied": crf,
        "no_crf": matrices["no_crf"].as_dict() if num_with_gt else None,
        "crf": matrices["crf"].as_dict() if num_with_gt and crf else None,
    })
    if summary_path:
        os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
        with open(summary_path, "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary

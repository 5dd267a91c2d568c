"""VOC12 datasets for RRM training and evaluation; with another `info` (coco14.data) those of COCO-2014.

Randomness: every dataset draws from its own `numpy.random.Generator` (flip, crop offsets, scale,
and the seed of torchvision's ColorJitter, run inside a forked torch RNG), restarted by
`reseed(seed)`. The training engine (tool.train_batches) reseeds it from each item's position in
the run, so one seed reproduces every augmentation whatever the DataLoader workers.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import ColorJitter

from voc12.lists import (
    CLASS_NAMES, IGNORE_LABEL, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES, VOC12, VOC_PALETTE, DatasetInfo, PathLike,
    check_decodable, labels_for_ids, load_cls_labels, read_id_list, read_mask, read_rgb, require_dir,
)

__all__ = [
    "CLASS_NAMES", "IGNORE_LABEL", "IMAGENET_MEAN", "IMAGENET_STD", "NUM_CLASSES", "VOC_PALETTE", "EvalDataset",
    "TrainDatasetInit", "TrainDatasetScaled", "load_cls_labels", "read_id_list",
]

# train_from_cls_weight's random scale, one per batch (SPEC §9).
SCALE_RANGE: tuple[float, float] = (0.7, 1.3)
_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)


def normalise(image: np.ndarray) -> np.ndarray:
    """RGB (H,W,3) in 0..255 -> float32 `(x/255 - mean) / std`."""
    return (np.asarray(image, np.float32) / 255.0 - _MEAN) / _STD


def denormalise_to_uint8(image: np.ndarray) -> np.ndarray:
    """Inverse of `normalise`, truncated to uint8 as released (a normalised 0 becomes the mean colour)."""
    return np.clip((image * _STD + _MEAN) * 255.0, 0, 255).astype(np.uint8)


def crop_box(height: int, width: int, crop_size: int,
             offset: Callable[[int], int]) -> tuple[slice, slice, slice, slice]:
    """The released crop: a window of a large side, an offset in the canvas of a small one, each
    chosen by `offset(space)` in 0..space (rows first, then columns).

    Returns (canvas rows, canvas cols, image rows, image cols) slices of equal extent.
    """
    def axis(length: int) -> tuple[slice, slice]:
        extent = min(crop_size, length)
        space = length - crop_size
        if space > 0:
            canvas_start, image_start = 0, offset(space)
        else:
            canvas_start, image_start = offset(-space), 0
        return slice(canvas_start, canvas_start + extent), slice(image_start, image_start + extent)

    canvas_rows, image_rows = axis(height)
    canvas_cols, image_cols = axis(width)
    return canvas_rows, canvas_cols, image_rows, image_cols


def random_crop_box(height: int, width: int, crop_size: int,
                    rng: np.random.Generator) -> tuple[slice, slice, slice, slice]:
    """Released random crop (`crop_box` with uniform offsets)."""
    return crop_box(height, width, crop_size, lambda space: int(rng.integers(space + 1)))


def centre_crop_box(height: int, width: int, crop_size: int) -> tuple[slice, slice, slice, slice]:
    """The centred `crop_box` (the fixed crops of the training panels)."""
    return crop_box(height, width, crop_size, lambda space: space // 2)


def place_in_canvas(image: np.ndarray, box: tuple[slice, slice, slice, slice], crop_size: int,
                    dtype: type, fill: int = 0) -> np.ndarray:
    """Copy the crop window of an (H,W,C) or (H,W) image into a (crop,crop[,C]) canvas of `fill`."""
    canvas_rows, canvas_cols, image_rows, image_cols = box
    canvas = np.full((crop_size, crop_size) + image.shape[2:], fill, dtype)
    canvas[canvas_rows, canvas_cols] = image[image_rows, image_cols]
    return canvas


def roi_of(box: tuple[slice, slice, slice, slice], crop_size: int) -> np.ndarray:
    roi = np.zeros((crop_size, crop_size), np.float32)
    roi[box[0], box[1]] = 1.0
    return roi


def to_chw(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def read_mask_of_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """The mask at `path` (H,W) uint8, which must have its image's `size` (H,W)."""
    mask = read_mask(path)
    if mask.shape != tuple(size):
        raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is {size[1]}x{size[0]}")
    return mask


class _ImageList(Dataset):
    """Ids of a list with checked image files and an own random generator.

    The list is `ids`, else the file `list_path`, else `<root>/<list folder>/<default_split>.txt`;
    images are `<image_dir>/<id>.jpg` when `image_dir` is given, else in the folder the data set's
    layout (`info`) gives under the root: for COCO that of `split`, else of the split the id names.
    Without a root, give the image folder and the ids or list.
    """

    info: DatasetInfo = VOC12

    def __init__(self, root: PathLike | None, list_path: PathLike | None, default_split: str,
                 seed: int | None, *, ids: Sequence[str] | None = None, image_dir: PathLike | None = None,
                 split: str | None = None) -> None:
        if root is None and (image_dir is None or (ids is None and list_path is None)):
            raise ValueError(f"without a {self.info.title} root, give the image folder and the ids or the list file")
        if ids is not None and list_path is not None:
            raise ValueError(f"give ids or a list file ({list_path}), not both")
        if root is not None:
            require_dir(root, f"{self.info.title} root")
        self.root = os.fspath(root) if root is not None else None
        self.split = split
        if image_dir is None and (split is not None or not self.info.has_split_folders):
            image_dir = self.info.image_dir(self.root, split)
        self.image_dir = os.fspath(image_dir) if image_dir is not None else None  # None: each id's split folder
        if self.image_dir is not None:
            require_dir(self.image_dir, "image folder")
        if ids is not None:
            self.list_path = None
            self.ids = list(ids)
        else:
            self.list_path = os.fspath(list_path) if list_path is not None else self.info.list_path(root, default_split)
            self.ids = read_id_list(self.list_path)
        missing = [self._image_path(i) for i in self.ids if not os.path.isfile(self._image_path(i))]
        if missing:
            source = self.list_path or "the id list"
            raise FileNotFoundError(f"{len(missing)} image(s) of {source} not found, first: {missing[0]}")
        self.rng = np.random.default_rng(seed)

    def _image_path(self, image_id: str) -> str:
        if self.image_dir is not None:
            return os.path.join(self.image_dir, image_id + ".jpg")
        return self.info.image_path(self.root, image_id, self.split)

    def check_images(self, num_workers: int = 0, part: int = 0, parts: int = 1) -> None:
        """Decode every listed image (in `num_workers` DataLoader processes) before training starts,
        so that a corrupt file stops the run at once with its name, not hours into it. Under DDP each
        of the `parts` processes decodes its own share (`part`) instead of all of them."""
        paths = [self._image_path(image_id) for image_id in self.ids[part::parts]]
        loader = DataLoader(_DecodeCheck(paths), batch_size=64, num_workers=num_workers, collate_fn=list)
        failures = [failure for batch in loader for failure in batch if failure]
        if failures:
            source = self.list_path or "the id list"
            raise ValueError(f"{len(failures)} image(s) of {source} cannot be decoded, first: {failures[0]}")

    def reseed(self, seed: int) -> None:
        """Restart this dataset's random stream (per item by tool.train_batches)."""
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, index: int) -> tuple[str, Image.Image]:
        image_id = self.ids[index]
        return image_id, read_rgb(self._image_path(image_id))


class _DecodeCheck(Dataset):
    """Item i: '' if image i decodes, else its error message (which names the file)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        try:
            check_decodable(self.paths[index])
        except ValueError as error:
            return str(error)
        return ""


class _LabelledImageList(_ImageList):
    """An image list whose every id must have a class-label vector (of the data set's class count).

    `load_gt=True` adds 'gt' to every item: the id's ground-truth mask (`DatasetInfo.mask_path`:
    VOC's SegmentationClass, then SegmentationClassAug; COCO's prepared masks) through the image's
    own flip, resize and crop, nearest-neighbour, the padding 255 (void); an id without a mask gets
    all 255. The augmentation draws the same random numbers with or without it. `mask_paths` says
    which ids have one (None without load_gt); when none has, items carry no 'gt'.
    """

    def __init__(self, root: PathLike, list_path: PathLike | None, cls_labels_path: PathLike | None,
                 crop_size: int, seed: int | None, load_gt: bool = False) -> None:
        super().__init__(root, list_path, self.info.train_split, seed)
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.crop_size = crop_size
        self.cls_labels_path = (os.fspath(cls_labels_path) if cls_labels_path is not None
                                else self.info.cls_labels_path(root))
        self.labels = labels_for_ids(load_cls_labels(self.cls_labels_path, self.info.num_classes), self.ids,
                                     self.cls_labels_path)
        self.mask_paths = [self.info.mask_path(self.root, image_id) for image_id in self.ids] if load_gt else None
        self.gives_gt = self.mask_paths is not None and any(self.mask_paths)

    def _read_gt(self, index: int, size: tuple[int, int]) -> np.ndarray | None:
        """The mask of item `index` whose image is `size` (H,W) (all 255 if it has none), or None
        when items carry no 'gt'. Labels must be 0..C or 255 (void)."""
        if not self.gives_gt:
            return None
        path = self.mask_paths[index]
        if path is None:
            return np.full(size, IGNORE_LABEL, np.uint8)
        mask = read_mask_of_image(path, size)
        bad = (mask > self.info.num_classes) & (mask != IGNORE_LABEL)
        if bad.any():
            raise ValueError(f"mask {path} has labels {np.unique(mask[bad])[:5].tolist()} outside "
                             f"0..{self.info.num_classes} and {IGNORE_LABEL} ({self.info.title})")
        return mask


class TrainDatasetInit(_LabelledImageList):
    """train_from_init augmentation (SPEC §9): PIL image, hflip 0.5, ColorJitter(0.3, 0.3, 0.3, 0.1),
    normalise, random crop; 'original' is the jittered crop with black padding.

    The released random resize of the long side to 256..512 is drawn but not applied; pass
    `apply_random_resize=True` to apply it (bicubic, long side uniform in `resize_long`; the mask
    of `load_gt` nearest). `fixed_item` is the un-augmented centre crop.
    """

    def __init__(self, root: PathLike, list_path: PathLike | None = None,
                 cls_labels_path: PathLike | None = None, crop_size: int = 448, *,
                 apply_random_resize: bool = False, resize_long: tuple[int, int] = (256, 512),
                 seed: int | None = None, load_gt: bool = False) -> None:
        super().__init__(root, list_path, cls_labels_path, crop_size, seed, load_gt)
        if not 0 < resize_long[0] <= resize_long[1]:
            raise ValueError(f"resize_long must be (min, max) with 0 < min <= max, got {resize_long}")
        self.apply_random_resize = apply_random_resize
        self.resize_long = resize_long
        self.color_jitter = ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)

    def _long_side_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) with the long side drawn uniformly in resize_long."""
        target_long = int(self.rng.integers(self.resize_long[0], self.resize_long[1] + 1))
        if width < height:
            return int(round(width * target_long / height)), target_long
        return target_long, int(round(height * target_long / width))

    def _jitter(self, image: Image.Image) -> Image.Image:
        # ColorJitter draws from torch's global RNG; fork it so our generator alone decides.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.rng.integers(2**63)))
            return self.color_jitter(image)

    def __getitem__(self, index: int) -> dict:
        return self._item(index, augment=True)

    def fixed_item(self, index: int) -> dict:
        """Item `index` without augmentation: no resize, flip or jitter, the centred crop."""
        return self._item(index, augment=False)

    def _item(self, index: int, augment: bool) -> dict:
        image_id, image = self._read(index)
        gt = self._read_gt(index, (image.height, image.width))
        mask = None if gt is None else Image.fromarray(gt)
        if augment and self.apply_random_resize:
            size = self._long_side_size(*image.size)
            image = image.resize(size, resample=Image.BICUBIC)
            mask = None if mask is None else mask.resize(size, resample=Image.NEAREST)
        if augment and self.rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            mask = None if mask is None else mask.transpose(Image.FLIP_LEFT_RIGHT)
        original = np.asarray(self._jitter(image) if augment else image)
        box = (random_crop_box(original.shape[0], original.shape[1], self.crop_size, self.rng) if augment
               else centre_crop_box(original.shape[0], original.shape[1], self.crop_size))
        item = {
            "id": image_id,
            "image": to_chw(place_in_canvas(normalise(original), box, self.crop_size, np.float32)),
            "original": to_chw(place_in_canvas(original, box, self.crop_size, np.uint8)),
            "roi": roi_of(box, self.crop_size),
            "label": self.labels[index].copy(),
        }
        if mask is not None:
            item["gt"] = place_in_canvas(np.asarray(mask), box, self.crop_size, np.uint8, fill=IGNORE_LABEL)
        return item


class TrainDatasetScaled(_LabelledImageList):
    """train_from_cls_weight augmentation (SPEC §9): OpenCV bilinear resize of the float image by the
    batch's scale to (int(w*s), int(h*s)), hflip 0.5, normalise, random crop; 'original' is the crop
    de-normalised to uint8, so its padding is the mean colour (the mask of `load_gt`: nearest resize).

    Items are fetched with `(index, scale)` pairs (tool.train_batches.StepBatchSampler shares one
    scale per batch); a plain index draws a scale of its own from `scale_range`. `fixed_item` is the
    un-augmented centre crop.
    """

    def __init__(self, root: PathLike, list_path: PathLike | None = None,
                 cls_labels_path: PathLike | None = None, crop_size: int = 321, *,
                 scale_range: tuple[float, float] = SCALE_RANGE, seed: int | None = None,
                 load_gt: bool = False) -> None:
        super().__init__(root, list_path, cls_labels_path, crop_size, seed, load_gt)
        self.scale_range = _check_scale_range(scale_range)

    def __getitem__(self, item: int | tuple[int, float]) -> dict:
        if isinstance(item, tuple):
            index, scale = item
        else:
            index, scale = item, float(self.rng.uniform(*self.scale_range))
        return self._item(index, scale, augment=True)

    def fixed_item(self, index: int) -> dict:
        """Item `index` without augmentation: scale 1, no flip, the centred crop."""
        return self._item(index, 1.0, augment=False)

    def _item(self, index: int, scale: float, augment: bool) -> dict:
        image_id, image = self._read(index)
        image = np.asarray(image, np.float32)
        height, width = image.shape[:2]
        gt = self._read_gt(index, (height, width))
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        image = cv2.resize(image, size)
        # INTER_NEAREST samples at floor(x / s), up to a pixel off the bilinear image's half-pixel centres.
        gt = None if gt is None else cv2.resize(gt, size, interpolation=cv2.INTER_NEAREST_EXACT)
        if augment and self.rng.random() < 0.5:
            image = image[:, ::-1]
            gt = None if gt is None else gt[:, ::-1]
        box = (random_crop_box(image.shape[0], image.shape[1], self.crop_size, self.rng) if augment
               else centre_crop_box(image.shape[0], image.shape[1], self.crop_size))
        crop = place_in_canvas(normalise(image), box, self.crop_size, np.float32)
        item = {
            "id": image_id,
            "image": to_chw(crop),
            "original": to_chw(denormalise_to_uint8(crop)),
            "roi": roi_of(box, self.crop_size),
            "label": self.labels[index].copy(),
        }
        if gt is not None:
            item["gt"] = place_in_canvas(gt, box, self.crop_size, np.uint8, fill=IGNORE_LABEL)
        return item


def _check_scale_range(scale_range: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in scale_range)
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {tuple(scale_range)}")
    return low, high


class EvalDataset(_ImageList):
    """Full images for inference/evaluation: id, normalised image (3,H,W), original (H,W,3) uint8,
    'gt' int64 (H,W) when a mask exists, and 'label' when the id is in the class-label file.

    Masks are `<gt_dir>/<id>.png` when `gt_dir` is given, else in the layout's mask folders under
    the root (VOC: SegmentationClass, then SegmentationClassAug; COCO: SegmentationClass/<split>),
    else none. `require_gt=True` makes a missing mask an error (checked here for every id).
    `cls_labels_path=None` uses `<root>/cls_labels.npy` if that file exists. Without a root
    (`root=None`) give `image_dir` and `ids` or `list_path` (infer_RRM.py's --IMpath and
    --LISTpath); the list defaults to the root's val list. `split` fixes the split folder of a
    layout that has them (COCO; default: the split each id names).
    """

    def __init__(self, root: PathLike | None = None, list_path: PathLike | None = None,
                 cls_labels_path: PathLike | None = None, *, ids: Sequence[str] | None = None,
                 image_dir: PathLike | None = None, gt_dir: PathLike | None = None,
                 require_gt: bool = False, split: str | None = None) -> None:
        super().__init__(root, list_path, self.info.val_split, seed=None, ids=ids, image_dir=image_dir, split=split)
        if gt_dir is not None:
            require_dir(gt_dir, "ground-truth folder")
        self.gt_dir = os.fspath(gt_dir) if gt_dir is not None else None
        self.require_gt = require_gt
        if require_gt:
            for image_id in self.ids:
                self._require_mask(image_id)
        if cls_labels_path is None and root is not None and os.path.isfile(self.info.cls_labels_path(root)):
            cls_labels_path = self.info.cls_labels_path(root)
        self.labels = load_cls_labels(cls_labels_path, self.info.num_classes) if cls_labels_path is not None else {}

    def _mask_path(self, image_id: str) -> str | None:
        if self.gt_dir is not None:
            path = os.path.join(self.gt_dir, image_id + ".png")
            return path if os.path.isfile(path) else None
        return self.info.mask_path(self.root, image_id, self.split) if self.root is not None else None

    def _require_mask(self, image_id: str) -> str:
        mask_path = self._mask_path(image_id)
        if mask_path is None:
            if self.gt_dir is not None:
                where = f"{self.gt_dir} has no {image_id}.png"
            elif self.root is not None:
                split = self.info.image_split(image_id, self.split)
                folders = [os.path.relpath(folder, self.root) for folder in self.info.mask_dirs(self.root, split)]
                folders_text = ("neither " if len(folders) > 1 else "") + " nor ".join(folders)
                where = f"{folders_text} under {self.root} has {image_id}.png"
            else:
                where = "no ground-truth folder was given"
            raise FileNotFoundError(f"mask not found for {image_id}: {where}")
        return mask_path

    def __getitem__(self, index: int) -> dict:
        image_id, image = self._read(index)
        original = np.array(image)  # writable: DataLoader turns it into a tensor
        item = {"id": image_id, "image": to_chw(normalise(original)), "original": original}
        mask_path = self._require_mask(image_id) if self.require_gt else self._mask_path(image_id)
        if mask_path is not None:
            item["gt"] = read_mask_of_image(mask_path, original.shape[:2]).astype(np.int64)
        if image_id in self.labels:
            item["label"] = self.labels[image_id].copy()
        return item

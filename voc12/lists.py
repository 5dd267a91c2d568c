"""PASCAL VOC 2012 file formats: class names, palette, id lists, label vectors, XML and masks.

Every reader raises an error that names the offending file, so a bad data set is reported as
such and not as a trace from deep inside PIL, numpy or the XML parser.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
from PIL import Image

PathLike = str | os.PathLike

CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
NUM_CLASSES = len(CLASS_NAMES)
# The labels of a segmentation mask: 0 = background, then the classes.
SEG_CLASS_NAMES: tuple[str, ...] = ("background",) + CLASS_NAMES
NUM_SEG_CLASSES = len(SEG_CLASS_NAMES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
IGNORE_LABEL = 255

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

IMAGE_DIR = "JPEGImages"
ANNOTATION_DIR = "Annotations"
MASK_DIR = "SegmentationClass"
AUG_MASK_DIR = "SegmentationClassAug"
LIST_DIR = os.path.join("ImageSets", "Segmentation")
CLS_LABELS_FILE = "cls_labels.npy"


def _voc_palette() -> np.ndarray:
    """The 256-entry VOC colour map: bits of the index spread over the high bits of R, G, B."""
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    return palette


VOC_PALETTE: np.ndarray = _voc_palette()


@dataclass(frozen=True)
class DatasetInfo:
    """A data set as the tools see it: its classes and where its files lie under a root.

    Folders are relative to the root; `{split}` in one stands for the split of the image, which is
    the `split` a caller gives, else `split_of_id(image_id)` (COCO names the split in every file
    name). VOC's layout has no split folders. Label vectors have `num_classes` entries; masks hold
    0 = background, 1..num_classes, and IGNORE_LABEL.
    """

    name: str
    title: str  # how messages name it ("VOC12", "COCO-2014")
    class_names: tuple[str, ...]
    default_root: str
    train_split: str
    val_split: str
    image_folder: str
    mask_folders: tuple[str, ...]  # looked up in this order
    list_folder: str
    split_of_id: Callable[[str], str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def seg_class_names(self) -> tuple[str, ...]:
        return ("background",) + self.class_names

    @property
    def num_seg_classes(self) -> int:
        return self.num_classes + 1

    @property
    def has_split_folders(self) -> bool:
        """Whether each split has its own image folder (then an image's split must be known)."""
        return "{split}" in self.image_folder

    def image_split(self, image_id: str, split: str | None = None) -> str | None:
        """The split whose folders hold `image_id`: `split` if given, else the one its name says."""
        if split is not None or self.split_of_id is None:
            return split
        return self.split_of_id(image_id)

    def _folder(self, root: PathLike, folder: str, split: str | None) -> str:
        if "{split}" in folder:
            if split is None:
                raise ValueError(f"{self.title}: {folder} under {root} needs the split of the image")
            folder = folder.format(split=split)
        return os.path.join(root, folder)

    def image_dir(self, root: PathLike, split: str | None = None) -> str:
        """The image folder of `split` (a layout without split folders needs none)."""
        return self._folder(root, self.image_folder, split)

    def image_path(self, root: PathLike, image_id: str, split: str | None = None) -> str:
        return os.path.join(self.image_dir(root, self.image_split(image_id, split)), image_id + ".jpg")

    def mask_dirs(self, root: PathLike, split: str | None = None) -> list[str]:
        """The folders that may hold the masks of `split`, in the order they are looked in (the first
        holds the evaluation masks: VOC's SegmentationClassAug is the augmented training set)."""
        return [self._folder(root, folder, split) for folder in self.mask_folders]

    def mask_path(self, root: PathLike, image_id: str, split: str | None = None) -> str | None:
        """The first existing `<mask folder>/<id>.png` under the root, else None."""
        for folder in self.mask_dirs(root, self.image_split(image_id, split)):
            candidate = os.path.join(folder, image_id + ".png")
            if os.path.isfile(candidate):
                return candidate
        return None

    def list_path(self, root: PathLike, split: str) -> str:
        return os.path.join(root, self.list_folder, split + ".txt")

    def cls_labels_path(self, root: PathLike) -> str:
        return os.path.join(root, CLS_LABELS_FILE)


VOC12 = DatasetInfo(name="voc12", title="VOC12", class_names=CLASS_NAMES, default_root="VOC2012",
                    train_split="train_aug", val_split="val", image_folder=IMAGE_DIR,
                    mask_folders=(MASK_DIR, AUG_MASK_DIR), list_folder=LIST_DIR)


def annotation_path(root: PathLike, image_id: str) -> str:
    return os.path.join(root, ANNOTATION_DIR, image_id + ".xml")


def default_list_path(root: PathLike, split: str) -> str:
    """`<root>/ImageSets/Segmentation/<split>.txt` (split: train, val, train_aug, ...)."""
    return VOC12.list_path(root, split)


def default_cls_labels_path(root: PathLike) -> str:
    return VOC12.cls_labels_path(root)


def require_dir(path: PathLike, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path} is not a directory")


def _id_from_token(token: str) -> str:
    # `/JPEGImages/x.jpg ...` lines name a file; a bare id may itself contain dots.
    if "/" in token or os.sep in token or token.lower().endswith((".jpg", ".jpeg", ".png")):
        return Path(token).stem
    return token


def read_id_list(path: PathLike) -> list[str]:
    """Ids of a list file: one id per line, or `/JPEGImages/<id>.jpg /Segmentation.../<id>.png`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image list not found: {path}")
    with open(path) as handle:
        ids = [_id_from_token(line.split()[0]) for line in handle if line.strip()]
    if not ids:
        raise ValueError(f"image list {path} contains no ids")
    return ids


def write_id_list(path: PathLike, ids: Iterable[str], pairs: bool = False) -> None:
    """Write one id per line, or with `pairs` the released `/JPEGImages/.. /SegmentationClassAug/..` form."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        for image_id in ids:
            if pairs:
                handle.write(f"/{IMAGE_DIR}/{image_id}.jpg /{AUG_MASK_DIR}/{image_id}.png\n")
            else:
                handle.write(image_id + "\n")


def load_cls_labels(path: PathLike, num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
    """`cls_labels.npy`: a numpy pickle of a dict id -> float32 multi-hot vector of `num_classes`
    (VOC's 20, COCO's 80)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class label file not found: {path}")
    try:
        labels = np.load(path, allow_pickle=True).item()
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read class labels from {path}: {err}") from err
    if not isinstance(labels, dict):
        raise ValueError(f"{path} must hold a dict id -> label vector, found {type(labels).__name__}")
    converted = {}
    for image_id, vector in labels.items():
        vector = np.asarray(vector, np.float32)
        if vector.shape != (num_classes,):
            raise ValueError(f"{path}: label of {image_id!r} has shape {vector.shape}, expected ({num_classes},)")
        converted[str(image_id)] = vector
    return converted


def save_cls_labels(path: PathLike, labels: Mapping[str, np.ndarray]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, {image_id: np.asarray(v, np.float32) for image_id, v in labels.items()})


def labels_for_ids(labels: Mapping[str, np.ndarray], ids: Iterable[str], labels_path: PathLike) -> list[np.ndarray]:
    """The label vectors of `ids`, or a ValueError naming the label file and the missing ids."""
    ids = list(ids)
    missing = [image_id for image_id in ids if image_id not in labels]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} id(s) absent from {labels_path}: {shown}")
    return [labels[image_id] for image_id in ids]


def label_from_xml(path: PathLike) -> np.ndarray:
    """Multi-hot float32[20]: every `<object><name>` that is a VOC class sets its entry."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"cannot parse annotation {path}: {err}") from err
    label = np.zeros(NUM_CLASSES, np.float32)
    for name in root.iter("name"):
        class_name = (name.text or "").strip()
        if class_name in CLASS_INDEX:
            label[CLASS_INDEX[class_name]] = 1.0
    return label


def read_rgb(path: PathLike) -> Image.Image:
    """The image at `path` as an RGB PIL image, fully decoded (a corrupt file fails here)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err


def check_decodable(path: PathLike) -> None:
    """Raise ValueError naming `path` unless the image decodes. A JPEG decodes at 1/8 scale (every
    coded block is still read, so truncation is caught) in about half the time of a full decode."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err


def read_mask(path: PathLike) -> np.ndarray:
    """Class-index mask (H,W) uint8 from a palette PNG (SegmentationClass) or a plain 8-bit PNG (Aug)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask not found: {path}")
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                raise ValueError(f"mask {path} has mode {mask.mode}; expected a palette (P) or 8-bit (L) PNG")
            return np.array(mask, dtype=np.uint8)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot decode mask {path}: {err}") from err


def write_palette_mask(path: PathLike, mask: np.ndarray) -> None:
    """Save class indices as a palette PNG with the VOC colour map (as SegmentationClass)."""
    mask = np.ascontiguousarray(mask, np.uint8)
    image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    image.putpalette(VOC_PALETTE.reshape(-1).tolist())
    image.save(path)


def write_plain_mask(path: PathLike, mask: np.ndarray) -> None:
    """Save class indices as a plain 8-bit PNG (as SegmentationClassAug)."""
    Image.fromarray(np.ascontiguousarray(mask, np.uint8)).save(path)

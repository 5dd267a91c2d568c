"""MS-COCO 2014 as RRM reads it: the 80 classes, the prepared layout and the file names COCO ships.

`python -m coco14.prepare` turns COCO's files into the layout below; every reader and writer of
masks, lists and label vectors is voc12.lists's, with COCO's class count.

    ROOT/train2014/COCO_train2014_000000000009.jpg        (as COCO ships them; also val2014/)
    ROOT/annotations/instances_{train,val}2014.json       (as COCO ships them)
    ROOT/SegmentationClass/{train2014,val2014}/<stem>.png  class-index masks, 0 = background,
                                                           1..80 = the classes below, 255 = crowd only
    ROOT/ImageSets/{train2014,val2014}.txt                 stems with a non-crowd annotation
    ROOT/cls_labels.npy                                    stem -> float32[80] multi-hot
"""

from __future__ import annotations

import os
import re

from voc12.lists import MASK_DIR, DatasetInfo, PathLike

# COCO's category ids (1..90 with gaps) and names, in ascending id order: class index i is CATEGORY_IDS[i].
CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
CATEGORY_IDS: tuple[int, ...] = tuple(category_id for category_id, _ in CATEGORIES)
CLASS_NAMES: tuple[str, ...] = tuple(name for _, name in CATEGORIES)
NUM_CLASSES = len(CLASS_NAMES)

SPLITS: tuple[str, ...] = ("train2014", "val2014")
ANNOTATION_DIR = "annotations"
LIST_DIR = "ImageSets"
_STEM = re.compile(r"COCO_([a-z]+\d{4})_\d+")


def split_of_id(image_id: str) -> str:
    """The split a COCO file stem names: `COCO_val2014_000000000042` -> `val2014`."""
    match = _STEM.fullmatch(image_id)
    if match is None:
        raise ValueError(f"cannot tell the split of image {image_id!r} from its name (expected "
                         f"COCO_<split>_<number>, e.g. COCO_val2014_000000000042); give the split (--split)")
    return match.group(1)


def image_stem(split: str, image_id: int) -> str:
    """The stem of COCO's file name of image `image_id` of `split`."""
    return f"COCO_{split}_{image_id:012d}"


def annotation_path(root: PathLike, split: str) -> str:
    """`ROOT/annotations/instances_<split>.json`."""
    return os.path.join(root, ANNOTATION_DIR, f"instances_{split}.json")


COCO14 = DatasetInfo(name="coco14", title="COCO-2014", class_names=CLASS_NAMES, default_root="COCO2014",
                     train_split="train2014", val_split="val2014", image_folder="{split}",
                     mask_folders=(os.path.join(MASK_DIR, "{split}"),), list_folder=LIST_DIR,
                     split_of_id=split_of_id)

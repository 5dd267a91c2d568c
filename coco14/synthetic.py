"""Synthetic MS-COCO-2014-format data set: the files COCO ships (JPEGs and instances JSON), for tests.

The images are voc12.synthetic's (its shapes, colours and layouts, for the COCO classes that are VOC
classes under other names). Each object becomes one annotation of its whole shape, in drawing
order, so that later annotations overlap earlier ones as the objects drawn over them do; the
segmentations take turns as polygons, compressed RLE and uncompressed RLE. Every third image also
has a crowd (iscrowd 1, uncompressed RLE as COCO writes crowds): small copies of one class behind
the objects; every sixth has only the crowd, no object.

    python -m coco14.synthetic --out ROOT --num_train N --num_val M --seed S [--classes a,b,...]

writes ROOT/{train2014,val2014}/COCO_<split>_<id>.jpg and ROOT/annotations/instances_<split>.json,
the input of `python -m coco14.prepare --coco_root ROOT`. Output is a pure function of the options.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from coco14.lists import CATEGORIES, CLASS_NAMES, SPLITS, annotation_path, image_stem
from voc12.lists import PathLike
from voc12.synthetic import (OBJECT_SCALE, Placement, add_generator_arguments, check_generator_options,
                             generate_sample, object_masks, paint_object, render_background)

# COCO's names of the VOC classes, whose voc12.synthetic shapes draw them.
VOC_NAME: dict[str, str] = {
    "airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat", "bottle": "bottle",
    "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow", "dining table": "diningtable",
    "dog": "dog", "horse": "horse", "motorcycle": "motorbike", "person": "person", "potted plant": "pottedplant",
    "sheep": "sheep", "couch": "sofa", "train": "train", "tv": "tvmonitor",
}
# The COCO category id of each VOC class name the shapes are drawn as.
CATEGORY_OF_VOC_NAME: dict[str, int] = {VOC_NAME[name]: category_id for category_id, name in CATEGORIES
                                        if name in VOC_NAME}
DEFAULT_CLASSES: tuple[str, ...] = ("person", "bus", "dog", "tv")
SEGMENTATION_KINDS = ("polygon", "rle", "uncompressed_rle")
CROWD_EVERY = 3  # images 0, 3, 6, ... of a split have a crowd
CROWD_ONLY_EVERY = 6  # images 5, 11, ... have nothing but a crowd
CROWD_MEMBERS = (3, 6)
CROWD_SCALE = (0.08, 0.14)  # half-size of a crowd member, in short image sides
# COCO's image ids are not consecutive: image i of a split gets FIRST_ID + i * ID_STEP (+ 1 for val).
FIRST_ID, ID_STEP = 9, 7


def parse_classes(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """COCO class names (comma-separated or a sequence) that the generator can draw."""
    if spec is None:
        return DEFAULT_CLASSES
    names = [name.strip() for name in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [name for name in names if name not in VOC_NAME]
    if unknown or not names:
        raise ValueError(f"--classes: {unknown or 'none'} cannot be drawn; the synthetic set draws the COCO "
                         f"classes that are VOC classes: {', '.join(VOC_NAME)}")
    return tuple(dict.fromkeys(names))


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a binary mask: run lengths in column-major order, a 0-run first."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def polygons(mask: np.ndarray) -> list[list[float]]:
    """The outer contours of a binary mask as COCO polygons [x1, y1, x2, y2, ...] (pixel centres)."""
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [contour.reshape(-1).astype(float).tolist() for contour in contours if len(contour) >= 3]


def encode_segmentation(mask: np.ndarray, kind: str) -> list[list[float]] | dict[str, Any]:
    if kind == "polygon":
        return polygons(mask)
    if kind == "rle":
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    if kind == "uncompressed_rle":
        return uncompressed_rle(mask)
    raise ValueError(f"unknown segmentation kind {kind!r}; valid: {', '.join(SEGMENTATION_KINDS)}")


def _annotation(segmentation: Any, mask: np.ndarray, category_id: int, crowd: bool) -> dict[str, Any]:
    rows, cols = np.nonzero(mask)
    box = [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)]
    return {"segmentation": segmentation, "area": float(mask.sum()), "bbox": box, "category_id": category_id,
            "iscrowd": int(crowd)}


def paint_crowd(image: np.ndarray, covered: np.ndarray, voc_class: str, rng: np.random.Generator
                ) -> np.ndarray | None:
    """Paint a group of small `voc_class` objects over the pixels of `image` not `covered` (objects
    stay in front); returns the group's whole mask (under the objects too), or None if it missed."""
    height, width = image.shape[:2]
    short_side = min(height, width)
    centre = rng.uniform(0.25, 0.75, 2) * (width, height)
    crowd = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(*CROWD_MEMBERS))):
        offset = rng.normal(0, 0.12 * short_side, 2)
        member = Placement(voc_class, tuple(centre + offset), rng.uniform(*CROWD_SCALE) * short_side,
                           rng.uniform(-0.4, 0.4), 1.0, bool(rng.random() < 0.5))
        whole, accent = object_masks(member, height, width)
        image[:] = paint_object(image, member, whole & ~covered, accent & whole & ~covered, rng)
        crowd |= whole
    return crowd if crowd.any() else None


def generate_image(rng: np.random.Generator, classes: Sequence[str], index: int, size_min: int, size_max: int
                   ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image and its annotations (without ids), objects in drawing order, then the crowd."""
    voc_classes = [VOC_NAME[name] for name in classes]
    if index % CROWD_ONLY_EVERY == CROWD_ONLY_EVERY - 1:
        height, width = (int(v) for v in rng.integers(size_min, size_max + 1, 2))
        image, placements = render_background(height, width, rng), []
        covered = np.zeros((height, width), bool)
    else:
        sample = generate_sample(rng, voc_classes, size_min, size_max, object_scale=OBJECT_SCALE)
        image, placements = sample.image.astype(np.float32), sample.placements
        covered = sample.instances > 0
        height, width = covered.shape
    annotations = []
    for k, placement in enumerate(placements):
        whole = object_masks(placement, height, width)[0]
        kind = SEGMENTATION_KINDS[(index + k) % len(SEGMENTATION_KINDS)]
        annotations.append(_annotation(encode_segmentation(whole, kind), whole,
                                       CATEGORY_OF_VOC_NAME[placement.class_name], crowd=False))
    if index % CROWD_EVERY == 0 or not placements:
        crowd_class = str(rng.choice(voc_classes))
        crowd = paint_crowd(image, covered, crowd_class, rng)
        if crowd is not None:
            annotations.append(_annotation(uncompressed_rle(crowd), crowd, CATEGORY_OF_VOC_NAME[crowd_class],
                                           crowd=True))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), annotations


def generate_dataset(out: PathLike, num_train: int, num_val: int, seed: int = 0, *, size_min: int = 96,
                     size_max: int = 144, classes: str | Sequence[str] | None = None,
                     jpeg_quality: int = 92) -> dict[str, int]:
    """Write the synthetic COCO files under `out`; returns the image count of each split."""
    check_generator_options(num_train, num_val, size_min, size_max)
    class_subset = parse_classes(classes)
    counts = {}
    for split_code, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image_id = FIRST_ID + index * ID_STEP + split_code
            # one stream per image: an image does not change when the other split's size changes
            rng = np.random.default_rng([seed, split_code, index])
            pixels, image_annotations = generate_image(rng, class_subset, index, size_min, size_max)
            file_name = image_stem(split, image_id) + ".jpg"
            Image.fromarray(pixels).save(os.path.join(out, split, file_name), quality=jpeg_quality)
            images.append({"id": image_id, "file_name": file_name, "height": pixels.shape[0],
                           "width": pixels.shape[1]})
            for annotation in image_annotations:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
        document = {"info": {"description": f"synthetic COCO-format {split} (coco14.synthetic, seed {seed})"},
                    "images": images, "annotations": annotations,
                    "categories": [{"id": category_id, "name": name, "supercategory": name}
                                   for category_id, name in CATEGORIES]}
        os.makedirs(os.path.dirname(annotation_path(out, split)), exist_ok=True)
        with open(annotation_path(out, split), "w") as handle:
            json.dump(document, handle)
        counts[split] = count
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_arguments(parser, "the COCO root to write (the --coco_root of coco14.prepare)", SPLITS, (60, 20),
                            (96, 144))
    parser.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                        help=f"comma-separated COCO class names, of: {', '.join(VOC_NAME)}")
    args = parser.parse_args(argv)
    try:
        counts = generate_dataset(args.out, args.num_train, args.num_val, args.seed, size_min=args.size_min,
                                  size_max=args.size_max, classes=args.classes)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.out}: " + ", ".join(f"{split} {count} images" for split, count in counts.items())
          + f"; classes: {', '.join(parse_classes(args.classes))} (of COCO's {len(CLASS_NAMES)})")


if __name__ == "__main__":
    main()

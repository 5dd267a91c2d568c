"""Prepare MS-COCO 2014 for RRM from the files COCO ships: class-index masks, label vectors, image lists.

    python -m coco14.prepare --coco_root ROOT [--splits train2014 val2014] [--workers N]

ROOT holds train2014/ and val2014/ (COCO's JPEGs) and annotations/instances_{train,val}2014.json.
Writes (see coco14.lists for the layout):
- ROOT/SegmentationClass/<split>/<stem>.png for every image of the JSON: VOC-palette masks, 0 =
  background, 1..80 = COCO's category ids in ascending order; instances drawn in annotation order
  (a later one overwrites an earlier one, as the usual conversion scripts do); pixels covered only
  by crowd annotations are 255. Masks already there are kept (an interrupted run resumes), each
  written atomically;
- ROOT/cls_labels.npy: stem -> float32[80] multi-hot of the image's non-crowd categories;
- ROOT/ImageSets/<split>.txt: the stems of the images with at least one non-crowd annotation.
Masks are rendered by pycocotools (polygons, compressed and uncompressed RLE) in worker processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coco14.lists import (  # noqa: E402
    CATEGORIES, COCO14, NUM_CLASSES, SPLITS, annotation_path, split_of_id,
)
from voc12.lists import (  # noqa: E402
    IGNORE_LABEL, PathLike, load_cls_labels, require_dir, save_cls_labels, write_id_list, write_palette_mask,
)

CLASS_OF_CATEGORY: dict[int, int] = {category_id: index for index, (category_id, _) in enumerate(CATEGORIES)}


@dataclass
class ImageJob:
    """What a worker needs to render one mask: size, instances in annotation order, where to write."""
    stem: str
    height: int
    width: int
    instances: list[tuple[int, bool, Any]]  # (class index 0..79, iscrowd, segmentation)
    mask_path: str


def _rle(segmentation: Any, height: int, width: int) -> dict:
    """One RLE of a polygon list, an uncompressed RLE or a compressed RLE (as pycocotools' annToRLE)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def render_mask(height: int, width: int, instances: Sequence[tuple[int, bool, Any]]) -> np.ndarray:
    """Class-index mask (H,W) uint8: instances drawn in order (class index + 1), later over earlier;
    pixels that only crowd annotations cover are IGNORE_LABEL."""
    mask = np.zeros((height, width), np.uint8)
    crowd = np.zeros((height, width), bool)
    for class_index, is_crowd, segmentation in instances:
        covered = mask_utils.decode(_rle(segmentation, height, width)).astype(bool)
        if is_crowd:
            crowd |= covered
        else:
            mask[covered] = class_index + 1
    mask[crowd & (mask == 0)] = IGNORE_LABEL
    return mask


def _write_mask(job: ImageJob) -> None:
    """Worker entry: render and write one mask, atomically (a killed run leaves no half-written PNG)."""
    try:
        mask = render_mask(job.height, job.width, job.instances)
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{job.stem}: cannot render its segmentations: {error}") from error
    partial = job.mask_path + ".partial.png"
    write_palette_mask(partial, mask)
    os.replace(partial, job.mask_path)


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path) as handle:
            document = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read COCO annotations from {path}: {error}") from error
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise ValueError(f"{path} is not a COCO instances file: no '{key}' list")
    return document


def _check_categories(document: dict, path: str) -> None:
    """The JSON's categories must be COCO's 80 (ids and names), which fix the class indices."""
    found = sorted((int(c["id"]), str(c["name"])) for c in document["categories"])
    if found != list(CATEGORIES):
        expected = dict(CATEGORIES)
        differences = [f"{i}: {n!r}" for i, n in found if expected.get(i) != n][:5]
        missing = sorted(set(expected) - {i for i, _ in found})[:5]
        raise ValueError(f"{path}: categories are not COCO 2014's 80 classes (unexpected or renamed: "
                         f"{differences or 'none'}; missing ids: {missing or 'none'})")


def split_jobs(root: PathLike, split: str) -> tuple[list[ImageJob], dict[str, np.ndarray], list[str], dict[str, int]]:
    """(mask jobs, label vectors, listed stems, counts) of one split, its files checked first."""
    path = annotation_path(root, split)
    document = _load_json(path)
    _check_categories(document, path)
    image_dir = COCO14.image_dir(root, split)
    require_dir(image_dir, f"{split} image folder")
    images = {}
    for image in document["images"]:
        stem = os.path.splitext(image["file_name"])[0]
        # The data sets find an image's folders by the split its name says.
        try:
            named_split = split_of_id(stem)
        except ValueError:
            named_split = None
        if named_split != split:
            raise ValueError(f"{path}: image {image['file_name']} does not name the split {split} "
                             f"(COCO_{split}_<number>.jpg)")
        images[image["id"]] = (stem, int(image["height"]), int(image["width"]))
    missing = [stem for stem, _, _ in images.values() if not os.path.isfile(os.path.join(image_dir, stem + ".jpg"))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {path} are not in {image_dir}, first: "
                                f"{os.path.join(image_dir, missing[0] + '.jpg')}")
    instances: dict[int, list[tuple[int, bool, Any]]] = {image_id: [] for image_id in images}
    counts = {"images": len(images), "annotations": 0, "crowd": 0}
    for annotation in document["annotations"]:
        category_id = annotation["category_id"]
        if category_id not in CLASS_OF_CATEGORY:
            raise ValueError(f"{path}: annotation {annotation.get('id')} has category_id {category_id}, "
                             f"which is not among the file's categories")
        if annotation["image_id"] not in instances:
            raise ValueError(f"{path}: annotation {annotation.get('id')} is of image_id {annotation['image_id']}, "
                             f"which is not among the file's images")
        is_crowd = bool(annotation.get("iscrowd", 0))
        counts["crowd" if is_crowd else "annotations"] += 1
        instances[annotation["image_id"]].append((CLASS_OF_CATEGORY[category_id], is_crowd,
                                                  annotation["segmentation"]))
    mask_dir = COCO14.mask_dirs(root, split)[0]
    jobs, labels, listed = [], {}, []
    for image_id, (stem, height, width) in images.items():
        label = np.zeros(NUM_CLASSES, np.float32)
        for class_index, is_crowd, _ in instances[image_id]:
            if not is_crowd:
                label[class_index] = 1.0
        labels[stem] = label
        if label.any():
            listed.append(stem)
        jobs.append(ImageJob(stem, height, width, instances[image_id], os.path.join(mask_dir, stem + ".png")))
    return jobs, labels, listed, counts


def _check_image_sizes(jobs: Sequence[ImageJob], image_dir: str) -> None:
    """A mask must be its image's size: the JSON's height and width against each JPEG's header."""
    for job in jobs:
        path = os.path.join(image_dir, job.stem + ".jpg")
        try:
            with Image.open(path) as image:
                size = image.size
        except (OSError, SyntaxError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from error
        if size != (job.width, job.height):
            raise ValueError(f"{path} is {size[0]}x{size[1]} but its annotation file says {job.width}x{job.height}")


def prepare(root: PathLike, splits: Sequence[str] = SPLITS, workers: int | None = None,
            progress: bool = True) -> dict[str, dict[str, int]]:
    """Write masks, lists and `cls_labels.npy` for `splits`; returns per split its counts: images,
    listed, annotations (non-crowd), crowd, masks written, masks kept (already there)."""
    require_dir(root, "--coco_root")
    prepared = {split: split_jobs(root, split) for split in splits}  # every input checked before writing
    for split, (jobs, _, _, _) in prepared.items():
        _check_image_sizes(jobs, COCO14.image_dir(root, split))
    labels_path = COCO14.cls_labels_path(root)
    # Labels of splits not prepared now (an earlier run's) stay in the file.
    labels = load_cls_labels(labels_path, NUM_CLASSES) if os.path.isfile(labels_path) else {}
    summary = {}
    if workers is None:
        workers = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    for split, (jobs, split_labels, listed, counts) in prepared.items():
        os.makedirs(COCO14.mask_dirs(root, split)[0], exist_ok=True)
        todo = [job for job in jobs if not os.path.isfile(job.mask_path)]
        bar = tqdm(total=len(todo), desc=f"{split} masks", unit="img", disable=not progress)
        if workers > 0 and len(todo) > 1:
            with context.Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_mask, todo, chunksize=16):
                    bar.update(1)
        else:
            for job in todo:
                _write_mask(job)
                bar.update(1)
        bar.close()
        write_id_list(COCO14.list_path(root, split), listed)
        labels.update(split_labels)
        summary[split] = {**counts, "listed": len(listed), "masks_written": len(todo),
                          "masks_kept": len(jobs) - len(todo)}
    save_cls_labels(labels_path, labels)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco_root", required=True,
                        help="folder with train2014/, val2014/ and annotations/instances_<split>.json")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to prepare")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes rendering masks (default: the cores; 0 = in this process)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    try:
        summary = prepare(args.coco_root, args.splits, args.workers, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for split, counts in summary.items():
        print(f"{split}: {counts['images']} images, {counts['listed']} listed (with a non-crowd annotation), "
              f"{counts['annotations']} annotations + {counts['crowd']} crowd; masks: {counts['masks_written']} "
              f"written, {counts['masks_kept']} already there")
    return summary


if __name__ == "__main__":
    main()

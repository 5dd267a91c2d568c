"""Build `cls_labels.npy` (id -> float32[20] multi-hot) from `Annotations/<id>.xml` of the listed ids.

    python -m voc12.make_cls_labels --voc12_root R [--train_list L1] [--val_list L2] [--out F]
    python voc12/make_cls_labels.py ...   (same)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from voc12.lists import (  # noqa: E402
    PathLike, annotation_path, default_cls_labels_path, default_list_path, label_from_xml, read_id_list,
    require_dir, save_cls_labels,
)


def build_cls_labels(voc12_root: PathLike, list_paths: Sequence[PathLike]) -> dict:
    """Label vectors of every id of the given lists, read from the VOC XML annotations."""
    require_dir(voc12_root, "VOC12 root")
    ids = dict.fromkeys(image_id for path in list_paths for image_id in read_id_list(path))
    return {image_id: label_from_xml(annotation_path(voc12_root, image_id)) for image_id in ids}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voc12_root", required=True, help="VOC2012 folder with Annotations/")
    parser.add_argument("--train_list", default=None,
                        help="default <voc12_root>/ImageSets/Segmentation/train_aug.txt")
    parser.add_argument("--val_list", default=None, help="default <voc12_root>/ImageSets/Segmentation/val.txt")
    parser.add_argument("--out", default=None, help="default <voc12_root>/cls_labels.npy")
    args = parser.parse_args(argv)
    train_list = args.train_list or default_list_path(args.voc12_root, "train_aug")
    val_list = args.val_list or default_list_path(args.voc12_root, "val")
    out = args.out or default_cls_labels_path(args.voc12_root)
    try:
        labels = build_cls_labels(args.voc12_root, [train_list, val_list])
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    save_cls_labels(out, labels)
    with_objects = sum(1 for v in labels.values() if v.any())
    print(f"wrote {out}: {len(labels)} ids ({with_objects} with at least one class) from {train_list} and {val_list}")


if __name__ == "__main__":
    main()

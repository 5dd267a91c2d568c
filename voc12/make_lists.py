"""Write train.txt, val.txt and train_aug.txt for a VOC2012 root.

train_aug = (SBD train + SBD val + VOC12 seg train) - VOC12 seg val, taken either from an SBD
`benchmark_RELEASE/dataset` folder (`--sbd_root`, whose `cls/<id>.mat` masks are converted to
plain PNGs in `<voc12_root>/SegmentationClassAug`, VOC12's own masks taking precedence) or, without
`--sbd_root`, from the masks already in `<voc12_root>/SegmentationClassAug` minus val.

    python -m voc12.make_lists --voc12_root R [--sbd_root S] [--out_dir D]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Sequence

import numpy as np
import scipy.io

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from voc12.lists import (  # noqa: E402
    AUG_MASK_DIR, LIST_DIR, MASK_DIR, PathLike, default_list_path, read_id_list, read_mask, require_dir,
    write_id_list, write_plain_mask,
)


def read_sbd_mask(path: PathLike) -> np.ndarray:
    """The class-index mask of an SBD `cls/<id>.mat` file (struct GTcls, field Segmentation)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SBD mask not found: {path}")
    try:
        mask = scipy.io.loadmat(path)["GTcls"]["Segmentation"][0, 0]
    except (KeyError, ValueError, IndexError, OSError, TypeError) as err:
        raise ValueError(f"cannot read GTcls.Segmentation from {path}: {err}") from err
    if mask.ndim != 2 or (mask.size and (mask.min() < 0 or mask.max() > 255)):
        raise ValueError(f"{path}: GTcls.Segmentation must be a 2-D array of class indices 0..255")
    return mask.astype(np.uint8)


def convert_sbd(sbd_root: PathLike, voc12_root: PathLike, voc_ids: Sequence[str], overwrite: bool = False) -> list[str]:
    """Write SegmentationClassAug PNGs from SBD's .mat masks and VOC12's own masks; returns the SBD ids."""
    require_dir(sbd_root, "SBD dataset folder")
    cls_dir = os.path.join(sbd_root, "cls")
    require_dir(cls_dir, "SBD cls/ folder")
    sbd_lists = [os.path.join(sbd_root, name) for name in ("train.txt", "val.txt")]
    if all(os.path.isfile(p) for p in sbd_lists):
        sbd_ids = list(dict.fromkeys(i for p in sbd_lists for i in read_id_list(p)))
    else:
        sbd_ids = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(cls_dir, "*.mat")))
    if not sbd_ids:
        raise ValueError(f"no SBD masks found in {cls_dir}")
    aug_dir = os.path.join(voc12_root, AUG_MASK_DIR)
    os.makedirs(aug_dir, exist_ok=True)
    for image_id in sbd_ids:
        target = os.path.join(aug_dir, image_id + ".png")
        if overwrite or not os.path.isfile(target):
            write_plain_mask(target, read_sbd_mask(os.path.join(cls_dir, image_id + ".mat")))
    # VOC12's masks (with their 255 borders) replace SBD's where both exist, as in the usual Aug set.
    for image_id in voc_ids:
        write_plain_mask(os.path.join(aug_dir, image_id + ".png"),
                         read_mask(os.path.join(voc12_root, MASK_DIR, image_id + ".png")))
    return sbd_ids


def make_lists(voc12_root: PathLike, sbd_root: PathLike | None = None, out_dir: PathLike | None = None,
               pairs: bool = False, overwrite: bool = False) -> dict[str, int]:
    """Write the three lists and return their lengths (and the number of SBD ids converted)."""
    require_dir(voc12_root, "VOC12 root")
    voc_train = read_id_list(default_list_path(voc12_root, "train"))
    voc_val = read_id_list(default_list_path(voc12_root, "val"))
    val_set = set(voc_val)
    if sbd_root is not None:
        sbd_ids = convert_sbd(sbd_root, voc12_root, voc_train + voc_val, overwrite)
        candidates = sbd_ids + voc_train
    else:
        aug_dir = os.path.join(voc12_root, AUG_MASK_DIR)
        if not os.path.isdir(aug_dir):
            raise FileNotFoundError(f"train_aug needs --sbd_root or a mask folder {aug_dir}; neither was found")
        sbd_ids = []
        candidates = [os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(aug_dir, "*.png"))]
    train_aug = sorted(set(candidates) - val_set)
    out_dir = out_dir if out_dir is not None else os.path.join(voc12_root, LIST_DIR)
    for name, ids in (("train", voc_train), ("val", voc_val), ("train_aug", train_aug)):
        write_id_list(os.path.join(out_dir, name + ".txt"), ids, pairs=pairs)
    return {"train": len(voc_train), "val": len(voc_val), "train_aug": len(train_aug), "sbd_converted": len(sbd_ids)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voc12_root", required=True, help="VOC2012 folder with ImageSets/Segmentation/{train,val}.txt")
    parser.add_argument("--sbd_root", default=None, help="SBD benchmark_RELEASE/dataset folder (with cls/*.mat)")
    parser.add_argument("--out_dir", default=None, help="default <voc12_root>/ImageSets/Segmentation")
    parser.add_argument("--pairs", action="store_true",
                        help="write '/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png' lines instead of ids")
    parser.add_argument("--overwrite", action="store_true", help="re-convert SBD masks that already exist as PNGs")
    args = parser.parse_args(argv)
    try:
        counts = make_lists(args.voc12_root, args.sbd_root, args.out_dir, args.pairs, args.overwrite)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"train: {counts['train']}, val: {counts['val']}, train_aug: {counts['train_aug']}"
          + (f" (converted {counts['sbd_converted']} SBD masks)" if args.sbd_root else ""))


if __name__ == "__main__":
    main()

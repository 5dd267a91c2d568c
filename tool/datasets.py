"""The data sets every script can train on or evaluate (`--dataset`): their description and data classes.

The class count flows from here: `DatasetInfo.num_classes` sizes the networks' classifier (and
segmentation head, one more for the background), the label vectors, mining, the losses and the
confusion matrices.
"""
from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from coco14.lists import COCO14
from voc12.lists import VOC12, DatasetInfo

# By name; each package's `data` module has TrainDatasetInit, TrainDatasetScaled and EvalDataset,
# imported when asked for (torchvision).
DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (VOC12, COCO14)}


def resolve_dataset(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown --dataset {name!r}; valid: {', '.join(DATASETS)}") from None


def data_module(name: str) -> ModuleType:
    """The module of `name`'s data set classes (TrainDatasetInit, TrainDatasetScaled, EvalDataset)."""
    return importlib.import_module(f"{resolve_dataset(name).name}.data")


def add_dataset_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, root_help: str) -> None:
    """--dataset, --data_root and its VOC spelling --voc12_root (the released flag)."""
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="voc12",
                        help="voc12 (PASCAL VOC 2012, 20 classes; released) or coco14 (MS-COCO 2014, 80 classes)")
    parser.add_argument("--data_root", default=None, help=root_help)
    parser.add_argument("--voc12_root", default=None, help="--data_root of --dataset voc12 (the released spelling)")


def resolve_data_root(args: argparse.Namespace, default: str | None) -> tuple[str | None, str]:
    """(root, the flag that gave it) from --data_root / --voc12_root; `default` when neither is given.

    --voc12_root names a VOC root: with another --dataset, or beside --data_root, it is an error."""
    if args.voc12_root is not None:
        if args.data_root is not None:
            raise ValueError(f"--voc12_root {args.voc12_root} and --data_root {args.data_root}: give one "
                             f"(--voc12_root is the VOC spelling of --data_root)")
        if args.dataset != "voc12":
            raise ValueError(f"--voc12_root is the VOC spelling of --data_root; with --dataset {args.dataset} "
                             f"give --data_root")
        return args.voc12_root, "--voc12_root"
    if args.data_root is not None:
        return args.data_root, "--data_root"
    return default, "--voc12_root" if args.dataset == "voc12" else "--data_root"

"""COCO-2014 data sets: voc12.data's, with COCO's layout and 80 classes (augmentation as for VOC, SPEC §9).

Images are `ROOT/<split>/<stem>.jpg`, the split taken from the stem (COCO_train2014_...) unless
`split=` fixes it (EvalDataset); masks `ROOT/SegmentationClass/<split>/<stem>.png`.
"""

from __future__ import annotations

from coco14.lists import COCO14
from voc12 import data


class TrainDatasetInit(data.TrainDatasetInit):
    __doc__ = data.TrainDatasetInit.__doc__
    info = COCO14


class TrainDatasetScaled(data.TrainDatasetScaled):
    __doc__ = data.TrainDatasetScaled.__doc__
    info = COCO14


class EvalDataset(data.EvalDataset):
    __doc__ = data.EvalDataset.__doc__
    info = COCO14

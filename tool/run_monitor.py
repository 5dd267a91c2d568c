"""TensorBoard view of a training run (rank 0 only): scalars per step and image panels.

    with RunMonitor(os.path.join(args.save_dir, "tensorboard", args.session_name)) as monitor:
        monitor.log_scalars(t, training_scalars(terms, lrs, images_per_second, quality))
        monitor.log_panels(t, [(image_id, training_panel(image, norm_cam, reliable, prediction))])

    tensorboard --logdir runs/tensorboard
"""
from __future__ import annotations

import numbers
import os
from types import TracebackType
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from tool.visualize import cam_heatmap, colorize, render_panel

TRAINING_PANEL_TITLES: tuple[str, ...] = ("input", "CAM", "reliable labels", "prediction")
Scalar = float | int | np.number | torch.Tensor


def training_scalars(terms: Mapping[str, Scalar], lrs: Sequence[float], images_per_second: float | None = None,
                     quality: Mapping[str, float | None] | None = None) -> dict[str, Scalar | None]:
    """The tags of one step: `loss/<term>` for each loss term ('cls', 'ce', 'dense', 'total', ...),
    `lr/group<i>` for each parameter group, `speed/images_per_second`, and `regions/<figure>` for
    each reliable-region figure ('precision', 'coverage', 'cam_precision', ...; None = undefined
    this step, not written)."""
    scalars: dict[str, Scalar | None] = {f"loss/{name}": value for name, value in terms.items()}
    scalars.update({f"lr/group{index}": lr for index, lr in enumerate(lrs)})
    if images_per_second is not None:
        scalars["speed/images_per_second"] = images_per_second
    scalars.update({f"regions/{name}": value for name, value in (quality or {}).items()})
    return scalars


def training_panel(image: np.ndarray, norm_cam: np.ndarray | None, reliable: np.ndarray | None,
                   prediction: np.ndarray | None,
                   colorize_labels: Callable[[np.ndarray], np.ndarray] = colorize) -> np.ndarray:
    """input | CAM | reliable labels | prediction of one training crop, with titles (tool.visualize's
    `render_panel` layout: (TITLE_HEIGHT + H, 4·W + 3·GAP, 3) uint8).

    image (H,W,3) uint8; norm_cam (C,H,W) normalised CAM in 0..1 with the absent classes zeroed, drawn
    as a JET heat map of the per-pixel maximum (= the maximum over the present classes) over the image;
    reliable (H,W) mined labels with 255 = unreliable; prediction (H,W) segmentation labels.
    `colorize_labels` turns a label map into RGB (default: VOC palette, 255 white); pass one with the
    data set's palette for another class count (COCO's 81). A None tile is drawn grey "n/a" (e.g.
    phase 1 of train_from_init, which has no reliable labels or segmentation yet).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"training_panel: image must be (H,W,3) uint8, got {image.dtype} {image.shape}")
    size = image.shape[:2]
    for name, labels in (("reliable", reliable), ("prediction", prediction)):
        if labels is not None and np.shape(labels) != size:
            raise ValueError(f"training_panel: {name} must be (H,W) = {size} like image, got {np.shape(labels)}")
    if norm_cam is not None and (np.ndim(norm_cam) != 3 or np.shape(norm_cam)[1:] != size):
        raise ValueError(f"training_panel: norm_cam must be (C,{size[0]},{size[1]}) like image, "
                         f"got {np.shape(norm_cam)}")
    tiles = [image,
             None if norm_cam is None else cam_heatmap(image, norm_cam),
             None if reliable is None else colorize_labels(np.asarray(reliable)),
             None if prediction is None else colorize_labels(np.asarray(prediction))]
    return render_panel(tiles, TRAINING_PANEL_TITLES)


class RunMonitor:
    """TensorBoard event files under `log_dir` (created). Meant for rank 0 only.

    `purge_step`: on a resumed run the step it resumes from, so that TensorBoard hides what the
    interrupted run wrote from that step on (its updates are redone), as RunLog does for its files.
    """

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            # ValueError: a flag this installation cannot honour, which run_cli reports in one line.
            raise ValueError(f"--tensorboard needs the tensorboard package, which is not installed "
                             f"(pip install tensorboard): {error}") from error
        if purge_step is not None and purge_step < 0:
            raise ValueError(f"RunMonitor: purge_step must be >= 0, got {purge_step}")
        self.writer = SummaryWriter(log_dir=os.fspath(log_dir), purge_step=purge_step, flush_secs=flush_secs)

    def log_scalars(self, step: int, scalars: Mapping[str, Scalar | None]) -> None:
        """One point per tag at `step`; a None value is skipped (a figure undefined at this step).
        0-d tensors are read here (for a GPU tensor: the host waits for it)."""
        _check_step(step)
        for tag, value in scalars.items():
            if value is None:
                continue
            if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"RunMonitor.log_scalars: {tag} must be a number or None, got {value!r}")
            self.writer.add_scalar(tag, float(value), step)

    def log_panels(self, step: int, panels: Sequence[tuple[str, np.ndarray]]) -> None:
        """Each (name, (H,W,3) uint8 panel) as the image `panels/<name>` at `step`."""
        _check_step(step)
        for name, panel in panels:
            panel = np.asarray(panel)
            if panel.dtype != np.uint8 or panel.ndim != 3 or panel.shape[2] != 3:
                raise ValueError(f"RunMonitor.log_panels: panel {name} must be (H,W,3) uint8, "
                                 f"got {panel.dtype} {panel.shape}")
            self.writer.add_image(f"panels/{name}", panel, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "RunMonitor":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"RunMonitor: step must be an int >= 0, got {step!r}")

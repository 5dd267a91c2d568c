"""TensorBoard view of a training run (rank 0 only): scalars per step and image panels.

    with RunMonitor(os.path.join(args.save_dir, "tensorboard", args.session_name)) as monitor:
        monitor.log_scalars(t, training_scalars(terms, lrs, images_per_second, quality))
        monitor.log_panels(t, training_panels(model, batch, miner))   # tool.visualize

    tensorboard --logdir runs/tensorboard
"""
from __future__ import annotations

import numbers
import os
from types import TracebackType
from typing import Mapping, Sequence

import numpy as np
import torch

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

"""Test-time dense CRF in worker processes, so the network keeps running while CRFs are solved."""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from typing import Hashable

import numpy as np
import torch

from tool.crf import inference_crf
from tool.crf_torch import inference_crf_torch
from voc12.lists import write_palette_mask, write_plain_mask


def crf_label_map(image: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor, plain_path: str | None = None,
                  color_path: str | None = None) -> np.ndarray:
    """argmax of the inference CRF (SPEC §10) as uint8 (H,W); optionally written as index/palette PNGs.

    image (H,W,3) uint8 and probs (K,H,W): numpy arrays for pydensecrf, or tensors for the torch CRF
    on their device (the label map alone comes back to the host)."""
    if isinstance(probs, torch.Tensor):
        image_chw = torch.as_tensor(image).to(probs.device).permute(2, 0, 1)[None]
        labels = inference_crf_torch(image_chw, probs[None].float())[0].argmax(0).to(torch.uint8).cpu().numpy()
    else:
        labels = np.argmax(inference_crf(image, probs), axis=0).astype(np.uint8)
    if plain_path is not None:
        write_plain_mask(plain_path, labels)
    if color_path is not None:
        write_palette_mask(color_path, labels)
    return labels


def _start_context() -> multiprocessing.context.BaseContext:
    # The pool starts after torch, OpenMP and maybe CUDA are initialised: a fork would copy their
    # locks and threads mid-state. forkserver forks from a clean server process (spawn elsewhere).
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


class CrfPool:
    """Runs `crf_label_map` jobs on `workers` processes (0: in the calling process, when submitted).

    At most `max_pending` jobs are in flight; `submit` waits for the oldest beyond that, which bounds
    the memory held by queued probability maps. Results come back in submission order. Tensors
    (the torch backend) are solved in this process on their device: workers must be 0.
    """

    def __init__(self, workers: int, max_pending: int | None = None) -> None:
        if workers < 0:
            raise ValueError(f"--crf_workers must be >= 0, got {workers}")
        self.workers = workers
        self.max_pending = max_pending if max_pending is not None else 2 * max(workers, 1)
        if self.max_pending < 1:
            raise ValueError(f"CrfPool: max_pending must be >= 1, got {self.max_pending}")
        # Niced workers yield a shared core to the network's forward, the critical path.
        self._pool = _start_context().Pool(workers, initializer=os.nice, initargs=(5,)) if workers > 0 else None
        self._pending: deque = deque()

    def submit(self, key: Hashable, image: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor,
               plain_path: str | None = None,
               color_path: str | None = None) -> list[tuple[Hashable, np.ndarray]]:
        """Queue one CRF; returns the (key, label map) pairs that are finished by now (in order)."""
        args = (image, probs, plain_path, color_path)
        if isinstance(probs, torch.Tensor) and self._pool is not None:
            raise ValueError("CrfPool: the torch CRF runs in this process on the tensors' device; use 0 workers")
        if self._pool is None:
            return [(key, crf_label_map(*args))]
        self._pending.append((key, self._pool.apply_async(crf_label_map, args)))
        finished = []
        while self._pending and (len(self._pending) > self.max_pending or self._pending[0][1].ready()):
            finished.append(self._pop())
        return finished

    def _pop(self) -> tuple[Hashable, np.ndarray]:
        key, result = self._pending.popleft()
        return key, result.get()

    def drain(self) -> list[tuple[Hashable, np.ndarray]]:
        """Wait for every queued job; returns their (key, label map) pairs in order."""
        return [self._pop() for _ in range(len(self._pending))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        self._pending.clear()

    def __enter__(self) -> "CrfPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""Atomic resume checkpoints (model, optimiser, step, RNG states, data position) and released-style weight files."""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

RESUME_FORMAT = "rrm-resume-v1"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DataParallel / DistributedDataParallel (so names carry no `module.`)."""
    return model.module if hasattr(model, "module") else model


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp_path)
    os.replace(tmp_path, path)


def save_model_weights(model: torch.nn.Module, path: str) -> None:
    """Released-style weights: the plain state dict with the released parameter names."""
    atomic_save(unwrap_model(model).state_dict(), path)


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training step draws from, in types that torch.load(weights_only=True) accepts."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_checkpoint(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                           data_position: dict[str, int], grad_scaler: torch.amp.GradScaler | None = None,
                           run_config: dict[str, Any] | None = None) -> None:
    """Everything needed to continue so that the result equals an uninterrupted run."""
    atomic_save({
        "format": RESUME_FORMAT,
        "step": step,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "rng": capture_rng_state(),
        "data_position": dict(data_position),
        "run_config": dict(run_config or {}),
    }, path)


def load_resume_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != RESUME_FORMAT:
        raise ValueError(f"--resume: {path} is not a resume checkpoint written by this trainer "
                         f"(a released-style weight file goes to --weights instead)")
    return checkpoint

"""Atomic, checksummed resume checkpoints (model, optimiser, step, RNG states, data position) and
released-style weight files."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
from typing import Any, Callable

import numpy as np
import torch

# v2: the payload carries a SHA-256 digest of its content (v1 files had none).
RESUME_FORMAT = "rrm-resume-v2"
CHECKSUM_SUFFIX = ".sha256"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DataParallel / DistributedDataParallel (so names carry no `module.`)."""
    return model.module if hasattr(model, "module") else model


def _fsync_folder(folder: str) -> None:
    # The rename is durable only once the folder entry is on disk (POSIX; Windows cannot open folders).
    if os.name != "posix":
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """`write` into a temporary file of the same folder, fsync it, rename it over `path`, fsync the
    folder: a crash leaves the old file or the new one, never half a file; on error the temporary
    file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp_path, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_folder(folder)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save through `atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model_weights(model: torch.nn.Module, path: str) -> None:
    """Released-style weights: the plain state dict with the released parameter names, plus a
    `sha256sum`-format sidecar `<path>.sha256` that `verify_checksum_file` checks on load."""
    sidecar = path + CHECKSUM_SUFFIX
    # Old sidecar first: a crash before the new one is written leaves an unverified file, not a false alarm.
    if os.path.exists(sidecar):
        os.remove(sidecar)
    atomic_save(unwrap_model(model).state_dict(), path)
    atomic_write_text(f"{file_sha256(path)}  {os.path.basename(path)}\n", sidecar)


def verify_checksum_file(path: str) -> None:
    """Raise ValueError naming `path` when its `<path>.sha256` sidecar exists and does not match its bytes
    (a file without a sidecar, such as a released download, passes)."""
    sidecar = path + CHECKSUM_SUFFIX
    if not os.path.isfile(sidecar):
        return
    with open(sidecar, encoding="utf-8") as handle:
        fields = handle.read().split()
    if not fields or len(fields[0]) != 64:
        raise ValueError(f"{path}: checksum file {sidecar} is not in sha256sum format")
    actual = file_sha256(path)
    if actual != fields[0].lower():
        raise ValueError(f"{path} is corrupt: its SHA-256 {actual} does not match {sidecar} ({fields[0]})")


def _update_digest(digest: Any, value: Any) -> None:
    """Feed `value` into `digest` by type and content, so that a loaded payload hashes like the saved one."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {value.dtype} {tuple(value.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}|".encode())
        for key, item in value.items():
            _update_digest(digest, key)
            _update_digest(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq {len(value)}|".encode())
        for item in value:
            _update_digest(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__} {value!r}|".encode())
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__} in a resume checkpoint")


def payload_sha256(payload: dict[str, Any]) -> str:
    """SHA-256 over every key, tensor byte and value of `payload`, in order."""
    digest = hashlib.sha256()
    _update_digest(digest, payload)
    return digest.hexdigest()


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
    """Everything needed to continue so that the result equals an uninterrupted run, with its SHA-256."""
    payload = {
        "format": RESUME_FORMAT,
        "step": step,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "rng": capture_rng_state(),
        "data_position": dict(data_position),
        "run_config": dict(run_config or {}),
    }
    atomic_save({**payload, "sha256": payload_sha256(payload)}, path)


def load_resume_checkpoint(path: str, flag: str = "--resume") -> dict[str, Any]:
    """The payload of a resume checkpoint; ValueError naming `flag` and `path` for a foreign, old or corrupt file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{flag}: {path} is corrupt or not a PyTorch checkpoint "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    if isinstance(checkpoint, dict) and checkpoint.get("format") == "rrm-resume-v1":
        raise ValueError(f"{flag}: {path} was written by an older version of this trainer (no checksum, "
                         f"incomplete run settings); it cannot be resumed exactly")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != RESUME_FORMAT:
        raise ValueError(f"{flag}: {path} is not a resume checkpoint written by this trainer "
                         f"(released-style weight files are .pth or .params, for --weights)")
    stored = checkpoint.pop("sha256", None)
    try:
        actual = payload_sha256(checkpoint)
    except TypeError as error:
        raise ValueError(f"{flag}: {path} is corrupt: {error}") from error
    if stored != actual:
        raise ValueError(f"{flag}: {path} is corrupt: its content's SHA-256 {actual} does not match the "
                         f"stored {stored}")
    return checkpoint

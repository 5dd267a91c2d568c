"""Device and mixed-precision choice shared by training and inference (`--device`, `--amp`).

`--amp` takes none | bf16 | fp16; the bare flag (`auto`) is the device's half type: fp16 on CUDA,
bf16 elsewhere. fp16 needs CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os

import torch

AMP_MODES: tuple[str, ...] = ("none", "bf16", "fp16")
AMP_AUTO = "auto"  # what a bare `--amp` stands for


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cpu_count(cgroup_cpu_max: str = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its CPU affinity (cpusets included) and a cgroup v2 CPU quota,
    which `os.cpu_count()` both ignore."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        with open(cgroup_cpu_max) as handle:
            quota, period = handle.read().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def cores_per_process() -> int:
    """The usable cores shared among the training processes of this node (torchrun's LOCAL_WORLD_SIZE)."""
    return max(1, usable_cpu_count() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def add_device_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, amp: bool = True) -> None:
    """The `--device` flag and (with `amp`) the `--amp` flag, identical in every script."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    if amp:
        parser.add_argument("--amp", nargs="?", const=AMP_AUTO, default="none", choices=AMP_MODES + (AMP_AUTO,),
                            help="mixed precision: none, bf16, or fp16 (CUDA only; training adds a grad scaler); "
                                 "bare --amp: fp16 on CUDA, bf16 on CPU")


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when available, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: not a device name ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """The mode `amp` means on `device`: none, bf16 or fp16 (`auto` resolved; fp16 off CUDA is an error)."""
    if amp == AMP_AUTO:
        return "fp16" if device.type == "cuda" else "bf16"
    if amp not in AMP_MODES:
        raise ValueError(f"--amp {amp!r}: expected one of {', '.join(AMP_MODES)} (or a bare --amp)")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a GPU (use --amp bf16 on CPU)")
    return amp


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast of `resolve_amp(amp, device)`; a no-op for `none`."""
    mode = resolve_amp(amp, device)
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)

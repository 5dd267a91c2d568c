"""Keep freed memory in the process, so that large tensors stop page-faulting anew.

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps
it on free, and trims the heap top above 2x that threshold. A ResNet-38 forward at VOC size
allocates ~0.7 GiB of such blocks, so each forward touched ~170k fresh pages: ~5% of its CPU
time on this 2-core machine (bench/RESULTS.md). PyTorch's CPU tuning guide gets the same effect
by preloading jemalloc or tcmalloc; `mallopt` does it in-process. Results are unchanged; the
process keeps its peak heap instead of returning it to the system (`--release_memory` keeps
glibc's default instead).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import platform

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


@functools.cache
def retain_freed_memory() -> bool:
    """Serve all allocations from the heap and never trim it (glibc only). Returns whether the
    setting took effect: False on other C libraries, where nothing changes."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def add_memory_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The `--release_memory` flag, identical in training and inference."""
    parser.add_argument("--release_memory", action="store_true",
                        help="hand freed memory back to the system as glibc does by default: a lower peak "
                             "RSS, but every large tensor page-faults anew (slower on the CPU)")


def apply_memory_choice(release_memory: bool) -> bool:
    """`retain_freed_memory()` unless `--release_memory`; returns whether memory is retained."""
    return False if release_memory else retain_freed_memory()

"""tool.allocator: after retain_freed_memory, repeated forwards stop page-faulting (freed pages are
reused), which they do with glibc's default settings."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TENSOR_PAGES = 64 * 256 * 256 * 4 // 4096  # one 16 MiB activation, in 4 KiB pages

# Runs a 3-conv forward on 16 MiB activations 8 times; prints the page faults of the last 6 runs.
PROBE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from tool.allocator import retain_freed_memory
if {retain}:
    assert retain_freed_memory()
torch.set_num_threads(1)
conv = torch.nn.Conv2d(64, 64, 3, padding=1)
faults = 0
with torch.no_grad():
    for run in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = torch.ones(1, 64, 256, 256)
        for _ in range(3):
            y = torch.relu(conv(y))
        faults += (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) if run >= 2 else 0
print(faults)
"""


def late_forward_faults(retain: bool) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT, retain=retain)],
                            check=True, capture_output=True, text=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_repeated_forwards_reuse_freed_pages():
    assert late_forward_faults(retain=False) > 6 * TENSOR_PAGES  # glibc's default: fresh pages each run
    # At most one fresh activation (glibc aligned allocations may place one above the freed ones).
    assert late_forward_faults(retain=True) <= TENSOR_PAGES + 64

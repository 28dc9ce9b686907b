"""What a result runs on: the device chosen from ``--device``, and the CPU model or GPU name recorded in
provenance and perf runs."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from bench.errors import BenchError

# Until a GPU has run the Triton kernels and their measured results are committed (issue 17), a CUDA run
# is the first execution of that code on hardware; the user should know before spending GPU hours on it.
CUDA_UNVERIFIED = ("warning: the CUDA kernels have not yet been verified on GPU hardware (only under Triton's "
                   "CPU interpreter); treat --device cuda results as unverified")


def resolve_device(name: str) -> torch.device:
    """The device for ``--device auto|cpu|cuda``; prints the warning above on stderr when it is CUDA."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda requested but no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise BenchError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "cuda":
        print(CUDA_UNVERIFIED, file=sys.stderr)
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"

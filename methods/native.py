"""C++ extensions of the project (the ℓp-distance kernels, the bound engine's fused steps), compiled on first use.

``torch.utils.cpp_extension.load`` builds each into torch's extension cache (``$TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``); later processes load the cached library in well under a second.
An extension's name carries a hash of its sources (and their folder), the compiler flags, the CPU's feature
flags and the torch version, so an edit, another checkout or a different CPU gets its own build, never a
stale or illegal-instruction one. The sources include only ATen/Parallel.h and pybind11 (tensors are passed
as pointers), so a first build takes ~30 s instead of ~2 min with torch/extension.h. If a build fails (no
compiler, ...) one warning is issued and the caller's torch implementation is used for the rest of the
process.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

from methods.base import MethodError

ENV_VAR = "CERTBENCH_KERNELS"
"""``auto`` (default): each extension where it applies; ``reference``: the torch code everywhere; ``fast``:
the extension or an error if it cannot be built, never a silent fallback. Read at every call."""
MODES = ("auto", "fast", "reference")


def mode() -> str:
    """The kernel mode from ``CERTBENCH_KERNELS`` (``auto`` when unset or empty)."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(MODES)}")
    return value


ISA_ENV = "BENCH_CPU_ISA"
"""Picks the instruction set the extensions are built for on x86-64. "native" (the default) uses every
feature of this CPU; "avx2" / "avx512" build the 8- / 16-lane code of the x86-64-v3 / -v4 levels, so one
machine can reproduce the numerics of another CPU (the CI gate's "different CPU" check builds AVX2 on an
AVX-512 machine; ATEN_CPU_CAPABILITY=avx2 does the same for torch's own kernels). The flags are part of
each extension's name, so builds for different ISAs never collide in the cache."""
_X86_ARCH = {"native": "-march=native", "avx2": "-march=x86-64-v3", "avx512": "-march=x86-64-v4"}


def cpu_signature() -> str:
    """The CPU's feature flags (the default build is -march=native): part of each extension's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + platform.processor()


def compiler_flags() -> list[str]:
    """-O3 for the ISA that ``BENCH_CPU_ISA`` names; ``-ffp-contract=off`` so that no multiply-add is fused
    behind the code's back (the kernels' rounding is part of their contract)."""
    isa = os.environ.get(ISA_ENV, "native").strip().lower() or "native"
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
        if isa not in _X86_ARCH:
            raise MethodError(f"{ISA_ENV}={isa!r}: choose one of {', '.join(_X86_ARCH)}")
        arch = _X86_ARCH[isa]
    elif isa == "native":
        arch = "-mcpu=native"
    else:
        raise MethodError(f"{ISA_ENV}={isa!r}: only 'native' exists on {platform.machine()}")
    return ["-O3", arch, "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17"]


def _build(prefix: str, source: Path, headers: Sequence[Path], flags: list[str]) -> ModuleType:
    # A CUDA build of torch on a machine without CUDA warns "No CUDA runtime is found" when this module is
    # imported; the extensions are CPU code, so that line is only noise on every run.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import _get_build_directory, load

    digest = hashlib.sha256()
    # Every load runs ninja, which rebuilds when the build command changed, and the command holds the sources'
    # path: two checkouts sharing one cache would rebuild the library in turn, each waiting on the other's lock.
    digest.update(str(source.parent).encode())
    for path in (source, *headers):
        digest.update(path.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(cpu_signature().encode())
    digest.update(torch.__version__.encode())
    name = f"{prefix}_{digest.hexdigest()[:16]}"
    build_dir = Path(_get_build_directory(name, verbose=False))
    # torch's own build lock is a plain file that other processes wait on until it vanishes, so a build killed
    # mid-way (Ctrl-C, a time limit) would hang every later run. Our builds serialise on an flock, which the
    # kernel releases when its holder dies: whoever holds it knows no build is running, so a torch lock file
    # found then was left by a killed build and is removed.
    with open(build_dir / "certbench-build.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        return load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)


class Extension:
    """One C++ extension, built on the first ``get()`` of the process; ``what`` names it in the warning."""

    def __init__(self, prefix: str, source: Path, headers: Sequence[Path], what: str):
        self.prefix, self.source, self.headers, self.what = prefix, source, tuple(headers), what
        self.error: str | None = None
        self._module: ModuleType | None = None
        self._lock = threading.Lock()

    def require(self) -> ModuleType:
        """The compiled module, or a RuntimeError naming why it cannot be built (``CERTBENCH_KERNELS=fast``)."""
        module = self.get()
        if module is None:
            raise RuntimeError(f"{ENV_VAR}=fast but the {self.what} could not be built: {self.error}")
        return module

    def get(self) -> ModuleType | None:
        """The compiled module, or None (after one warning) if it cannot be built."""
        if self._module is not None or self.error is not None:
            return self._module
        flags = compiler_flags()  # a misspelt BENCH_CPU_ISA is an error, not a silent fall-back
        with self._lock:
            if self._module is None and self.error is None:
                try:
                    self._module = _build(self.prefix, self.source, self.headers, flags)
                except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch code
                    text = str(exc).strip()
                    self.error = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
                    warnings.warn(f"{self.what} could not be built ({self.error}); using the (slower) torch code",
                                  RuntimeWarning, stacklevel=3)
        return self._module

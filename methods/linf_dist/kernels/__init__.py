"""Backend selection for the ℓp-distance op.

``backend_for(t)`` returns a module-like object exposing ``lp_dist_forward``, ``lp_dist_backward``,
``linf_dist_forward``, ``linf_dist_backward`` and ``linf_dist_interval`` (signatures and semantics as in
``methods.linf_dist.reference``) for the device of ``t``:

- CPU: ``kernels.cpu``, fused multi-threaded C++ kernels built on first use (design and measurements in
  its docstring). Each of its functions runs the fast path for contiguous-able, finite float32 CPU
  tensors and hands anything else (float64, non-finite values, empty shapes) to the reference.
- CUDA: ``kernels.cuda``, Triton kernels with the same contract (when ``triton`` imports).
- Anything else, or when the fast path cannot be built (one warning, then the reference for the rest of
  the process): ``methods.linf_dist.reference``.

The environment variable ``CERTBENCH_KERNELS`` (``methods.native``) forces the choice and is read at every call:
``auto`` (default) as above; ``reference`` always the reference; ``fast`` the fast backend or an error
(``RuntimeError``) if it cannot be built, never a silent fallback.
"""

from __future__ import annotations

from types import ModuleType

import torch

from methods.linf_dist import reference
from methods.native import ENV_VAR, mode

def backend_for(t: torch.Tensor) -> ModuleType:
    """The backend module for tensors on ``t``'s device (see the module docstring)."""
    chosen = mode()
    if chosen == "reference":
        return reference
    strict = chosen == "fast"
    if t.device.type == "cpu":
        from methods.linf_dist.kernels import cpu

        return cpu if cpu.available(strict=strict) else reference
    if t.device.type == "cuda":
        from methods.linf_dist.kernels import cuda

        return cuda if cuda.available(strict=strict) else reference
    if strict:
        raise RuntimeError(f"{ENV_VAR}=fast: no fast ℓp-distance kernels for device {t.device.type!r}")
    return reference

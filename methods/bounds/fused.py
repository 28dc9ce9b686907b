"""Steps of the bound engine as fused C++ loops (``csrc/relaxation.cpp``): two of the CROWN backward pass (the
ReLU relaxation and the final concretisation over the input box) and the interval step through a ReLU.

Why: after the batch was sliced (``engine.COEFFICIENT_BLOCK_BYTES``), the ReLU relaxation and the autograd
pass through it were still about a quarter of a CROWN-IBP training step on DM-small (torch.profiler, torch
1.13, one thread): in torch it takes four passes and two coefficient-sized temporaries forward and about
ten passes and four temporaries backward, each a trip through memory. The loop reads each coefficient once
forward (writing the relaxed one and summing the offset) and once backward (writing its gradient and
summing the slope and intercept gradients). Same values: every relaxed coefficient and gradient entry is
the same rounded product (sum) as in torch; the offsets and the summed gradients add the same terms in
another order.

The interval step through a ReLU (IBP in centre–radius form, ``functional.interval_relu``) is the same
story on a smaller scale: in torch the ends C ∓ R, their two relus and the next layer's centre and radius
are six passes forward and about ten backward (the box-form IBP step took about a third of an IBP training
step's CPU time on DM-small MNIST, torch.profiler, torch 1.13, one thread); fused, one each way, and every
value and gradient entry is the same (two-term sums, in the same operations), bit for bit.

Used for contiguous float32 CPU tensors when the extension builds (``methods.native``; ``CERTBENCH_KERNELS``
selects as for the ℓp-distance kernels); float64 (the tests' and the rounding analysis' reference) and any
other device run the torch formulation in ``functional``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from methods.native import Extension, mode

_CSRC = Path(__file__).resolve().parent / "csrc"
_EXTENSION = Extension("certbench_bounds", _CSRC / "relaxation.cpp", [], "fused CPU bound kernels")


def extension_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The extension when every tensor is a contiguous float32 CPU tensor and the mode allows it."""
    chosen = mode()
    if chosen == "reference":
        return None
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return _EXTENSION.require() if chosen == "fast" else _EXTENSION.get()


def relu_forward(
    ext: ModuleType, lam: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, intercept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam_in, offset) of ``functional.relu_relaxation`` for lam (B, S, N) and lines (B, N)."""
    batch, specs, n = lam.shape
    out, offset = torch.empty_like(lam), lam.new_empty(batch, specs)
    ext.relu_forward(lam.data_ptr(), lower.data_ptr(), upper.data_ptr(), intercept.data_ptr(), batch, specs, n,
                     out.data_ptr(), offset.data_ptr())
    return out, offset


def relu_backward(
    ext: ModuleType, lam: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, intercept: torch.Tensor,
    grad: torch.Tensor, grad_offset: torch.Tensor, needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``relu_forward`` for (lam, upper, intercept), each only where ``needs`` says."""
    batch, specs, n = lam.shape
    grad_lam = torch.empty_like(lam) if needs[0] else None
    grad_upper = lower.new_empty(batch, n) if needs[1] else None
    grad_intercept = lower.new_empty(batch, n) if needs[2] else None
    ext.relu_backward(
        lam.data_ptr(), lower.data_ptr(), upper.data_ptr(), intercept.data_ptr(), grad.data_ptr(),
        grad_offset.data_ptr(), batch, specs, n,
        *(0 if t is None else t.data_ptr() for t in (grad_lam, grad_upper, grad_intercept)),
    )
    return grad_lam, grad_upper, grad_intercept


def concretize_forward(ext: ModuleType, lam: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """``functional.concretize``: lam·c − |lam|·r, (B, S), for lam (B, S, N) and the box (B, N)."""
    batch, specs, n = lam.shape
    out = lam.new_empty(batch, specs)
    ext.concretize_forward(lam.data_ptr(), centre.data_ptr(), radius.data_ptr(), batch, specs, n, out.data_ptr())
    return out


def concretize_backward(
    ext: ModuleType, lam: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """The gradient of ``concretize_forward`` in lam: g·(c − r·sign(lam))."""
    batch, specs, n = lam.shape
    grad_lam = torch.empty_like(lam)
    ext.concretize_backward(lam.data_ptr(), centre.data_ptr(), radius.data_ptr(), grad.data_ptr(), batch, specs, n,
                            grad_lam.data_ptr())
    return grad_lam


def interval_relu_forward(ext: ModuleType, centre: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``functional.interval_relu``: centre and radius of the ReLU's output box, any shape."""
    out_centre, out_radius = torch.empty_like(centre), torch.empty_like(radius)
    ext.interval_relu_forward(centre.data_ptr(), radius.data_ptr(), centre.numel(), out_centre.data_ptr(),
                              out_radius.data_ptr())
    return out_centre, out_radius


def interval_relu_backward(
    ext: ModuleType, centre: torch.Tensor, radius: torch.Tensor, grad_centre: torch.Tensor, grad_radius: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``interval_relu_forward`` in its input's centre and radius."""
    out_centre, out_radius = torch.empty_like(centre), torch.empty_like(radius)
    ext.interval_relu_backward(centre.data_ptr(), radius.data_ptr(), grad_centre.data_ptr(), grad_radius.data_ptr(),
                               centre.numel(), out_centre.data_ptr(), out_radius.data_ptr())
    return out_centre, out_radius

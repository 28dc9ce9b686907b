"""Backend selection for the ℓp-distance op.

``backend_for(t)`` returns a module-like object exposing ``lp_dist_forward``, ``lp_dist_backward``,
``linf_dist_forward``, ``linf_dist_backward`` and ``linf_dist_interval`` (signatures as in
``methods.linf_dist.reference``) for the device of ``t``. Until fused kernels exist, every device uses
the reference path.
"""

from __future__ import annotations

from types import ModuleType

import torch

from methods.linf_dist import reference


def backend_for(t: torch.Tensor) -> ModuleType:
    return reference

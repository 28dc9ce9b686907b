"""Fixtures of the auto_LiRPA cross-checks (run by ``tox -e lirpa``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def float64():
    # auto_LiRPA 0.3 builds its identity specifications in the default dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

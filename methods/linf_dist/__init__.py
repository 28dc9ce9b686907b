"""ℓ∞-distance nets: the ℓp-distance op (``ops``), layers, models, losses, schedules and the registered
methods ``linf-dist``, ``linf-dist-hinge`` and ``linf-dist-mlp`` (``method``)."""

from methods.linf_dist import method as _method  # noqa: F401  (registers the methods)

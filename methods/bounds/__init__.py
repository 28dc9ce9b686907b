"""The project's bound engine: IBP, CROWN-IBP, CROWN and α-CROWN lower bounds of classification margins.

Layout: ``layers`` holds the bound rules, one class per layer kind; ``engine`` runs them over a
sequential model (IBP forward, CROWN backward, full-CROWN intermediate bounds); ``alpha`` optimises
the lower ReLU slopes of the last backward pass (α-CROWN); ``margins`` builds the
margin specification and the input box and is the entry point. It runs on torch 1.13 as well as 2.x, so
auto_LiRPA 0.3 can cross-check it (tests/lirpa).
"""

from methods.bounds.margins import (
    BOUND_METHODS,
    MarginBounds,
    certified,
    certify_margins,
    compute_margin_bounds,
    input_box,
    margin_lower_bounds,
    margin_spec,
    require_eval,
)

__all__ = [
    "BOUND_METHODS",
    "MarginBounds",
    "certified",
    "certify_margins",
    "compute_margin_bounds",
    "input_box",
    "margin_lower_bounds",
    "margin_spec",
    "require_eval",
]

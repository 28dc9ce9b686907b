"""``python -m bench list``: suites (dataset, ε, methods, scales), methods (with their papers) and scales."""

from __future__ import annotations

import argparse

from bench.config import list_suites, load_suite
from bench.store import format_eps
from methods import base as registry


def list_command(args: argparse.Namespace) -> int:
    print("methods:")
    for method in registry.iter_methods():
        card = method.card
        print(f"  {method.name:16s} {card.title} — {card.venue}; certifiers: {', '.join(method.certifiers)}")
    print("suites:")
    for name in list_suites():
        suite = load_suite(name)
        print(f"  {name}: dataset {suite.dataset}, ε {', '.join(format_eps(e) for e in suite.eps)}")
        print(f"    methods: {', '.join(suite.methods)}")
        for scale in suite.scales.values():
            lo, hi = scale.test_range
            print(f"    scale {scale.name:6s} test [{lo}, {hi}), PGD-{scale.pgd_steps}×{scale.pgd_restarts}: "
                  f"{scale.description}")
    return 0


def register_verb(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list suites, methods and scales")
    p.set_defaults(func=list_command)

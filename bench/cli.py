"""``python -m bench <verb> ...``: one sub-command per verb module.

Each verb lives in the module that owns its work and exposes ``register_verb(subparsers)``, which adds
its parser and sets ``func(args) -> int``. Errors meant for users (``BenchError``, ``MethodError``) are
printed as one line with a non-zero exit; finished results are never touched by an error path.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bench.distributed import error_stream
from bench.errors import BenchError
from methods.base import MethodError

_VERB_MODULES = (
    "bench.runner",
    "bench.catalog",
    "bench.report",
    "bench.regress",
    "bench.status",
    "bench.cascade",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in _VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register_verb(sub)
    return parser


def run_guarded(args: argparse.Namespace, interrupted: str) -> int:
    """``args.func(args)`` with user errors as one line and Ctrl-C as ``interrupted``, never a traceback
    (also for the tools that live beside a method, such as ``python -m methods.linf_dist.perf``)."""
    try:
        return int(args.func(args))
    except (BenchError, MethodError) as exc:
        print(f"error: {exc}", file=error_stream())
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`bench list | head`): nothing to report. Point stdout at /dev/null so that the
        # interpreter's final flush cannot fail again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(args, "interrupted: finished cells are kept; run the same command again to resume")

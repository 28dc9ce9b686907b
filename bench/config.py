"""Suites as data: TOML files under ``bench/suites/<suite>/`` expanded into typed, validated cells.

A suite folder holds ``suite.toml`` (dataset, ε values, methods, and per-scale harness settings) and one
``<method>.toml`` per method (its hyper-parameters). A method file is layered, most specific last::

    key = value                  # base values (the published, ``paper``-scale recipe)
    [eps."3/10"]                 # overrides for one test ε
    [scales.small]               # overrides for one scale
    [scales.small.eps."3/10"]    # overrides for one scale and ε

and command-line ``--set key=value`` overrides are applied on top (values parsed as TOML literals).
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

from bench.errors import BenchError
from bench.store import format_eps, parse_eps
from methods import base as method_registry

SUITES_DIR = Path(__file__).resolve().parent / "suites"
SCALE_KEYS = {
    "description": str,
    "train_examples": int,
    "test_range": list,
    "pgd_steps": int,
    "pgd_restarts": int,
    "eval_batch_size": int,
    "attack": str,
    "apgd_steps": int,
}
SCALE_DEFAULTS = {"attack": "pgd", "apgd_steps": 100}
"""Keys a suite file may omit. ``attack = "apgd"`` adds the APGD-CE + APGD-T ensemble (``apgd_steps`` per
run; AutoAttack's standard is 100) beside the scale's PGD; ``"pgd"`` runs PGD alone."""
ATTACKS = ("pgd", "apgd")


@dataclass(frozen=True)
class ScaleConfig:
    """Harness settings shared by every method at one scale.

    ``train_examples``: first N training images (0 = all). ``test_range``: test indices [start, stop).
    PGD uses step ε/4 and the spec's random start; ``pgd_steps`` / ``pgd_restarts`` set its strength.
    """

    name: str
    description: str
    train_examples: int
    test_range: tuple[int, int]
    pgd_steps: int
    pgd_restarts: int
    eval_batch_size: int
    attack: str = SCALE_DEFAULTS["attack"]
    apgd_steps: int = SCALE_DEFAULTS["apgd_steps"]

    def with_attack(self, attack: str | None) -> ScaleConfig:
        """This scale with its attack replaced (``--attack``); ``None`` keeps it."""
        if attack is None:
            return self
        if attack not in ATTACKS:
            raise BenchError(f"unknown attack {attack!r}; use {' or '.join(ATTACKS)}")
        return replace(self, attack=attack)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "train_examples": self.train_examples,
            "test_range": list(self.test_range),
            "pgd_steps": self.pgd_steps,
            "pgd_restarts": self.pgd_restarts,
            "eval_batch_size": self.eval_batch_size,
            "attack": self.attack,
            "apgd_steps": self.apgd_steps,
        }


@dataclass(frozen=True)
class Cell:
    """One unit of work: (suite, dataset, ε, method, scale, seed) plus its effective configuration."""

    suite: str
    dataset: str
    eps: Fraction
    method: str
    scale: ScaleConfig
    seed: int
    config: Mapping[str, Any] = field(hash=False, compare=False)

    @property
    def label(self) -> str:
        return f"{self.dataset} ε={format_eps(self.eps)} {self.method} seed {self.seed}"


@dataclass(frozen=True)
class Suite:
    name: str
    dataset: str
    eps: tuple[Fraction, ...]
    methods: tuple[str, ...]
    scales: Mapping[str, ScaleConfig]
    method_files: Mapping[str, Mapping[str, Any]]
    folder: Path

    def method_config(self, method: str, scale: str, eps: Fraction, overrides: Mapping[str, Any]) -> dict[str, Any]:
        raw = self.method_files[method]
        scale_table = raw.get("scales", {}).get(scale, {})
        cfg = {k: v for k, v in raw.items() if k not in ("scales", "eps")}
        layers = (
            scale_table,
            _eps_table(raw.get("eps", {}), eps, self.folder / f"{method}.toml"),
            _eps_table(scale_table.get("eps", {}), eps, self.folder / f"{method}.toml"),
            overrides,
        )
        for layer in layers:
            cfg.update({k: copy.deepcopy(v) for k, v in layer.items() if k != "eps"})
        return cfg

    def cells(
        self,
        scale: str,
        methods: list[str] | None = None,
        eps: list[Fraction] | None = None,
        seeds: list[int] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> list[Cell]:
        if scale not in self.scales:
            raise BenchError(f"unknown scale {scale!r} for suite {self.name}; known: {', '.join(self.scales)}")
        chosen_methods = list(methods) if methods else list(self.methods)
        for m in chosen_methods:
            if m not in self.methods:
                method_registry.get(m)  # unknown anywhere -> MethodError naming the known ones
                raise BenchError(f"method {m!r} is not part of suite {self.name} (has: {', '.join(self.methods)})")
        chosen_eps = list(eps) if eps else list(self.eps)
        out = []
        for e in chosen_eps:
            for m in chosen_methods:
                cfg = self.method_config(m, scale, e, overrides or {})
                method_registry.get(m).validate_config(cfg)
                for seed in seeds or [0]:
                    out.append(Cell(self.name, self.dataset, e, m, self.scales[scale], seed, cfg))
        return out


def list_suites() -> list[str]:
    return sorted(p.name for p in SUITES_DIR.iterdir() if (p / "suite.toml").is_file())


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise BenchError(f"missing suite file {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"{path}: invalid TOML ({exc})") from None


def _eps_table(tables: Mapping[str, Any], eps: Fraction, path: Path) -> Mapping[str, Any]:
    for key, table in tables.items():
        if parse_eps(key) == eps:
            return table
    return {}


def _scale(name: str, table: Mapping[str, Any], path: Path) -> ScaleConfig:
    table = {**SCALE_DEFAULTS, **table}
    for key, typ in SCALE_KEYS.items():
        if key not in table:
            raise BenchError(f"{path}: scale {name!r} lacks {key}")
        if not isinstance(table[key], typ):
            raise BenchError(f"{path}: scales.{name}.{key} must be {typ.__name__}")
    unknown = set(table) - set(SCALE_KEYS)
    if unknown:
        raise BenchError(f"{path}: scales.{name} has unknown keys {', '.join(sorted(unknown))}")
    start, stop = table["test_range"]
    if not 0 <= start < stop:
        raise BenchError(f"{path}: scales.{name}.test_range must be [start, stop) with 0 <= start < stop")
    if table["attack"] not in ATTACKS:
        raise BenchError(f"{path}: scales.{name}.attack must be one of {', '.join(ATTACKS)}")
    if table["apgd_steps"] < 1:
        raise BenchError(f"{path}: scales.{name}.apgd_steps must be at least 1")
    return ScaleConfig(
        name=name,
        description=table["description"],
        train_examples=table["train_examples"],
        test_range=(int(start), int(stop)),
        pgd_steps=table["pgd_steps"],
        pgd_restarts=table["pgd_restarts"],
        eval_batch_size=table["eval_batch_size"],
        attack=table["attack"],
        apgd_steps=table["apgd_steps"],
    )


def load_suite(name: str) -> Suite:
    folder = SUITES_DIR / name
    if not (folder / "suite.toml").is_file():
        raise BenchError(f"unknown suite {name!r}; known: {', '.join(list_suites())}")
    path = folder / "suite.toml"
    raw = _read_toml(path)
    for key in ("dataset", "eps", "methods", "scales"):
        if key not in raw:
            raise BenchError(f"{path}: missing {key}")
    methods = tuple(raw["methods"])
    known = set(method_registry.list_methods())
    method_files = {}
    for m in methods:
        if m not in known:
            raise BenchError(f"{path}: method {m!r} is not registered; known: {', '.join(sorted(known))}")
        method_files[m] = _read_toml(folder / f"{m}.toml")
    return Suite(
        name=name,
        dataset=raw["dataset"],
        eps=tuple(parse_eps(e) for e in raw["eps"]),
        methods=methods,
        scales={k: _scale(k, v, path) for k, v in raw["scales"].items()},
        method_files=method_files,
        folder=folder,
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are TOML literals (``width=256``, ``eps_train="1/2"``, ``lr=0.01``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out

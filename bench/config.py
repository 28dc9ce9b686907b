"""Suites as data: TOML files under ``bench/suites/<suite>/`` expanded into typed, validated cells.

A suite folder holds ``suite.toml`` (dataset, ε values, methods, and per-scale harness settings) and one
``<method>.toml`` per method (its hyper-parameters). A method file is layered, most specific last::

    key = value                  # base values (the published, ``paper``-scale recipe)
    [eps."3/10"]                 # overrides for one test ε
    [scales.small]               # overrides for one scale
    [scales.small.eps."3/10"]    # overrides for one scale and ε

and command-line ``--set key=value`` overrides are applied on top (values parsed as TOML literals).

A value that no published source gives is marked in the file's ``[assumed]`` table, which mirrors the
layers (``[assumed]``, ``[assumed.eps."3/10"]``, ``[assumed.scales.small]``, ...) and maps a key to the
reason: a cell depends on the assumption when its value of that key comes from the marked layer (or,
for a key the file never sets, when the marked layer applies to the cell and the method's default is used).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

from bench.errors import BenchError
from bench.store import dump_config, format_eps, parse_eps
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
    assumed: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    """Config keys whose value is our assumption (the method file's ``[assumed]`` table) -> the reason."""
    variant: str = ""
    """The ``--set`` overrides that change this cell's config from the suite's, as ``key=value,...``
    (``""`` for the suite's own recipe). Part of the cell's identity: a variant is a cell of its own, in a
    folder of its own, and never replaces the result of the suite's recipe."""

    @property
    def method_folder(self) -> str:
        """The method's folder name: ``linf-dist``, or ``linf-dist+width=512`` for a variant."""
        return f"{self.method}+{self.variant}" if self.variant else self.method

    @property
    def label(self) -> str:
        return f"{self.dataset} ε={format_eps(self.eps)} {self.method_folder} seed {self.seed}"


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
        cfg = {k: v for k, v in raw.items() if k not in ("scales", "eps", ASSUMED)}
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
                tag = variant_name(self.method_config(m, scale, e, {}), cfg)
                assumed = assumptions(self.method_files[m], scale, e, overrides or {}, self.folder / f"{m}.toml")
                for seed in seeds or [0]:
                    out.append(Cell(self.name, self.dataset, e, m, self.scales[scale], seed, cfg, assumed, tag))
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


def _check_layers(raw: Mapping[str, Any], path: Path) -> None:
    """``[eps.<e>]``, ``[scales.<s>]`` and ``[scales.<s>.eps.<e>]`` are tables keyed by valid ε / scales."""
    tables = [("eps", raw.get("eps", {})), ("scales", raw.get("scales", {}))]
    tables += [(f"scales.{s}.eps", t.get("eps", {})) for s, t in raw.get("scales", {}).items() if isinstance(t, dict)]
    for name, table in tables:
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise BenchError(f"{path}: {name} must hold tables such as [{name}.<key>], got {table!r}")
        if name.endswith("eps"):
            for key in table:
                try:
                    parse_eps(key)
                except BenchError as exc:
                    raise BenchError(f"{path}: [{name}.{key!r}]: {exc}") from None


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
        if not isinstance(table[key], typ) or isinstance(table[key], bool):
            raise BenchError(f"{path}: scales.{name}.{key} must be {typ.__name__}, got {table[key]!r}")
    unknown = set(table) - set(SCALE_KEYS)
    if unknown:
        raise BenchError(f"{path}: scales.{name} has unknown keys {', '.join(sorted(unknown))}")
    bounds = table["test_range"]
    if len(bounds) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
        raise BenchError(f"{path}: scales.{name}.test_range must be [start, stop] (two integers), got {bounds!r}")
    start, stop = bounds
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


_SUITE_KEYS = {"dataset": str, "eps": list, "methods": list, "scales": dict}
_SUITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def suite_folder(name: str) -> Path:
    """A built-in suite by name, or a suite folder (or its ``suite.toml``) given as a path."""
    if "/" not in name and not name.startswith("."):
        folder = SUITES_DIR / name
        if not (folder / "suite.toml").is_file():
            raise BenchError(f"unknown suite {name!r}; known: {', '.join(list_suites())} (or a path to a suite folder)")
        return folder
    path = Path(name).expanduser().resolve()
    folder = path.parent if path.name == "suite.toml" else path
    if not (folder / "suite.toml").is_file():
        raise BenchError(f"{name}: no suite.toml there; give a built-in suite ({', '.join(list_suites())}) "
                         "or a folder holding suite.toml and one <method>.toml per method")
    if not _SUITE_NAME.fullmatch(folder.name):
        raise BenchError(f"{folder}: a suite folder's name is the suite's name in the results layout; "
                         "use letters, digits, '-' and '_'")
    return folder


def load_suite(name: str) -> Suite:
    folder = suite_folder(name)
    path = folder / "suite.toml"
    raw = _read_toml(path)
    for key, typ in _SUITE_KEYS.items():
        if key not in raw:
            raise BenchError(f"{path}: missing {key}")
        if not isinstance(raw[key], typ) or not raw[key]:
            kind = {str: "a string", list: "a non-empty list", dict: "a table of scales"}[typ]
            raise BenchError(f"{path}: {key} must be {kind}, got {raw[key]!r}")
    unknown = sorted(set(raw) - set(_SUITE_KEYS))
    if unknown:
        raise BenchError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(_SUITE_KEYS)}")
    from bench.data import dataset_info

    dataset_info(raw["dataset"])
    if not all(isinstance(m, str) for m in raw["methods"]):
        raise BenchError(f"{path}: methods must be a list of method names, got {raw['methods']!r}")
    for scale, table in raw["scales"].items():
        if not isinstance(table, dict):
            raise BenchError(f"{path}: scales.{scale} must be a table, got {table!r}")
    methods = tuple(raw["methods"])
    known = set(method_registry.list_methods())
    method_files = {}
    for m in methods:
        if m not in known:
            raise BenchError(f"{path}: method {m!r} is not registered; known: {', '.join(sorted(known))}")
        method_files[m] = _read_toml(folder / f"{m}.toml")
        _check_layers(method_files[m], folder / f"{m}.toml")
        _check_assumed(method_files[m], folder / f"{m}.toml")
    return Suite(
        name=folder.name,
        dataset=raw["dataset"],
        eps=tuple(parse_eps(e) for e in raw["eps"]),
        methods=methods,
        scales={k: _scale(k, v, path) for k, v in raw["scales"].items()},
        method_files=method_files,
        folder=folder,
    )


ASSUMED = "assumed"
_NESTED = ("scales", "eps", ASSUMED)


_Marked = tuple[str, Mapping[str, Any], Mapping[str, Any], list[Mapping[str, Any]]]


def _marked_layers(raw: Mapping[str, Any]) -> list[_Marked]:
    """(name, values, reasons, values of the layers applied before it) of every layer an ``[assumed]``
    table marks."""
    marks = raw.get(ASSUMED, {})
    scales, eps = raw.get("scales", {}), raw.get("eps", {})
    out = [("", raw, marks, [])]
    for scale, reasons in marks.get("scales", {}).items():
        table = scales.get(scale, {})
        out.append((f"scales.{scale}.", table, reasons, [raw]))
        out += [(f"scales.{scale}.eps.{e}.", table.get("eps", {}).get(e, {}), r, [raw, table, eps.get(e, {})])
                for e, r in reasons.get("eps", {}).items()]
    out += [(f"eps.{e}.", eps.get(e, {}), r, [raw, *scales.values()]) for e, r in marks.get("eps", {}).items()]
    return out


def _check_assumed(raw: Mapping[str, Any], path: Path) -> None:
    """Every marker gives a reason and names a key its layer sets, or one that no layer applied before it
    sets (then it marks the method's default)."""
    if not isinstance(raw.get(ASSUMED, {}), dict):
        raise BenchError(f"{path}: [{ASSUMED}] must be a table")
    for name, values, reasons, before in _marked_layers(raw):
        for e in reasons.get("eps", {}):
            parse_eps(e)
        for key, reason in reasons.items():
            if key in _NESTED:
                continue
            if not isinstance(reason, str) or not reason.strip():
                raise BenchError(f"{path}: {ASSUMED}.{name}{key} must be a non-empty reason string")
            if key not in values and any(key in layer for layer in before):
                raise BenchError(f"{path}: {ASSUMED}.{name}{key} marks a value that layer {name or 'base'} "
                                 "does not set (mark the layer that sets it)")


def assumptions(raw: Mapping[str, Any], scale: str, eps: Fraction, overrides: Mapping[str, Any], path: Path
                ) -> dict[str, str]:
    """The keys of one cell's config that are marked as our assumptions, with the reasons; the layers are
    walked as ``Suite.method_config`` walks them, and a value set by a later layer or by ``--set`` clears
    an earlier marker."""
    marks = raw.get(ASSUMED, {})
    scale_table = raw.get("scales", {}).get(scale, {})
    scale_marks = marks.get("scales", {}).get(scale, {})
    layers = (
        (raw, marks),
        (scale_table, scale_marks),
        (_eps_table(raw.get("eps", {}), eps, path), _eps_table(marks.get("eps", {}), eps, path)),
        (_eps_table(scale_table.get("eps", {}), eps, path), _eps_table(scale_marks.get("eps", {}), eps, path)),
        (overrides, {}),
    )
    out: dict[str, str] = {}
    for values, reasons in layers:
        for key in values:
            out.pop(key, None)
        out.update({k: r for k, r in reasons.items() if k not in _NESTED})
    return out


_SAFE_VARIANT = re.compile(r"[A-Za-z0-9_.=,-]{1,64}")


def variant_name(base: Mapping[str, Any], cfg: Mapping[str, Any]) -> str:
    """``key=value,...`` over the keys where ``cfg`` differs from the suite's ``base`` config (sorted), or
    ``cfg-<hash>`` of them when that is not a short, path-safe name; ``""`` when nothing differs (an
    override that repeats the suite's value is the suite's own cell)."""
    changed = {k: v for k, v in sorted(cfg.items()) if k not in base or base[k] != v}
    if not changed:
        return ""
    readable = ",".join(f"{k}={v}" for k, v in changed.items())
    if _SAFE_VARIANT.fullmatch(readable):
        return readable
    digest = hashlib.sha256(json.dumps(dump_config(changed), sort_keys=True).encode()).hexdigest()
    return f"cfg-{digest[:10]}"


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

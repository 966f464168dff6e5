"""Run configuration: one TOML file describes a federation; validated with clear errors.

::

    name = "quick"                 # optional; the default output dir is runs/<name>
    rounds = 3
    clients_per_round = 10
    min_clients = 1                # a round aggregates only if at least this many succeeded
    eval_every = 1                 # server-side evaluation on the test set every k rounds
    seed = 0
    threads = 1                    # Numba threads per client (same seed + threads = same run)
    keep_checkpoints = 2

    [data]
    name = "mnist_small"           # fl_core.data.DATASETS
    path = ""                      # local files for datasets that need them
    partition = "lda"              # iid, lda, per_class, pathological, natural
    alpha = 0.5                    # lda / per_class
    k = 2                          # pathological
    num_clients = 10
    test_samples = 0               # evaluate on the first N test samples (0 = all)
    options = {}                   # loader options (e.g. normalize = "standard")

    [model]
    name = "lenet5"                # a builder name or a ModelSpec .json path

    [strategy]
    name = "zerofl"                # and the strategy's own parameters, e.g.
    sparsity = 0.9

    [train]                        # embedded.train.TrainConfig fields
    lr = 0.05
    batch_size = 32

    [fleet]                        # fl_core.fleet.FleetConfig fields
    devices = { pixel4 = 0.4, rpi4 = 0.3, "jetson-nano-5w" = 0.3 }

    [output]
    dir = "runs/quick"

Unknown keys, wrong types and unknown datasets, models, strategies or devices raise
:class:`ConfigError` naming the key (``[fleet] devices``) and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

from .fleet import FleetConfig

#: Strategy names known before the registry is importable (the registry's list wins).
_FALLBACK_STRATEGIES = ("fedavg", "fedavgm", "swat_fl", "zerofl", "feddst", "flash",
                        "hetero_flash")
BUNDLED_QUICK = Path(__file__).with_name("examples") / "quick.toml"
#: the main job: ``sparsefl run`` without a config
BUNDLED_DEMO = Path(__file__).with_name("examples") / "demo.toml"


class ConfigError(ValueError):
    """A run config is invalid; the message names the key and what is expected."""


@dataclass
class DataConfig:
    name: str = "mnist_small"
    path: str = ""
    partition: str = "iid"
    alpha: float = 0.5
    k: int = 2
    num_clients: int = 10
    test_samples: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """A whole run (see the module docstring for the TOML layout)."""

    name: str = "run"
    rounds: int = 3
    clients_per_round: int = 10
    min_clients: int = 1
    eval_every: int = 1
    seed: int = 0
    threads: int = 1
    keep_checkpoints: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"name": "lenet5"})
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    train: dict[str, Any] = field(default_factory=dict)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    output: dict[str, Any] = field(default_factory=dict)
    #: strategy tables to compare: one run per entry (fl_core.compare), sharing data and boards
    compare: list[dict[str, Any]] = field(default_factory=list)
    source: str = field(default="", compare=False)

    @property
    def strategy_name(self) -> str:
        return str(self.strategy["name"])

    @property
    def strategy_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.strategy.items() if k != "name"}

    def train_config(self) -> Any:
        """The TrainConfig of the run (``threads`` from the top level)."""
        from embedded.train import TrainConfig

        d = dict(self.train)
        d.setdefault("threads", self.threads)
        d.setdefault("seed", self.seed)
        return TrainConfig.from_dict(d, "[train]")

    def output_dir(self) -> str:
        return str(self.output.get("dir") or os.path.join("runs", self.name))

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("name", "rounds", "clients_per_round", "min_clients",
                                           "eval_every", "seed", "threads", "keep_checkpoints")}
        d["data"] = dataclasses.asdict(self.data)
        d["model"] = dict(self.model)
        d["strategy"] = dict(self.strategy)
        d["train"] = self.train_config().to_dict()
        d["fleet"] = dataclasses.asdict(self.fleet)
        d["output"] = {"dir": self.output_dir()}
        if self.compare:
            d["compare"] = [dict(c) for c in self.compare]
        return d


# ------------------------------------------------------------------------------ parsing
_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          dict: "a table", list: "a list"}


def _check_type(where: str, v: Any, t: Any) -> Any:
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if (t is int and (isinstance(v, bool) or not isinstance(v, int))) or \
            (t is not int and not isinstance(v, t)) or (t is float and isinstance(v, bool)):
        raise ConfigError(f"{where}: expected {_TYPES.get(t, t)}, got {type(v).__name__} "
                          f"{v!r}")
    return v


def _fill(where: str, target: Any, table: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Set dataclass fields of ``target`` from ``table``; unknown keys and wrong types raise."""
    import typing

    hints = typing.get_type_hints(type(target))
    known = [f.name for f in dataclasses.fields(target) if f.name not in skip]
    for key, v in table.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(known)}")
        t = hints[key]
        args = typing.get_args(t)
        if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in args:
            t = next(a for a in args if a is not type(None))
        base = typing.get_origin(t) or t
        setattr(target, key, _check_type(f"{where} {key}", v, base))


def _positive_int(where: str, v: int, lo: int = 1) -> None:
    if v < lo:
        raise ConfigError(f"{where}: expected an integer >= {lo}, got {v}")


def strategy_names() -> tuple[str, ...]:
    """Registered strategy names (the registry's, when it is importable)."""
    try:
        from .strategies import STRATEGIES  # type: ignore[attr-defined]

        return tuple(STRATEGIES)
    except ImportError:
        return _FALLBACK_STRATEGIES


def parse_config(doc: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a parsed TOML document into a :class:`RunConfig`."""
    from hwmodel.models import BUILDERS

    from .data import DATASETS, SCHEMES, dataset_options

    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a TOML document")
    doc = copy.deepcopy(doc)
    cfg = RunConfig(source=source)
    tables = {"data", "model", "strategy", "train", "fleet", "output"}
    top = {k: v for k, v in doc.items() if k not in tables}
    _fill(source, cfg, top, skip=tuple(tables) + ("source",))
    for i, entry in enumerate(cfg.compare):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{source}: compare[{i}] must be a strategy table with a name, "
                              f"e.g. [[compare]] name = \"zerofl\" sparsity = 0.9")
        if entry["name"] not in strategy_names():
            raise ConfigError(f"{source}: compare[{i}] name: unknown strategy "
                              f"{entry['name']!r}; allowed: {', '.join(strategy_names())}")
    for key in ("rounds", "clients_per_round", "min_clients", "eval_every", "threads",
                "keep_checkpoints"):
        _positive_int(f"{source}: {key}", getattr(cfg, key))
    _positive_int(f"{source}: seed", cfg.seed, 0)
    for t in tables:
        if t in doc and not isinstance(doc[t], dict):
            raise ConfigError(f"{source}: [{t}] must be a table, got {type(doc[t]).__name__}")

    # [data]
    _fill(f"{source} [data]", cfg.data, doc.get("data", {}))
    d = cfg.data
    if d.name not in DATASETS:
        raise ConfigError(f"{source} [data] name: unknown dataset {d.name!r}; allowed: "
                          f"{', '.join(DATASETS)}")
    if d.partition not in SCHEMES:
        raise ConfigError(f"{source} [data] partition: unknown scheme {d.partition!r}; "
                          f"allowed: {', '.join(SCHEMES)}")
    bad = sorted(set(d.options) - set(dataset_options(d.name)))
    if bad:
        raise ConfigError(f"{source} [data] options: unknown option(s) {', '.join(bad)} for "
                          f"{d.name!r}; allowed: {', '.join(dataset_options(d.name))}")
    _positive_int(f"{source} [data] num_clients", d.num_clients)
    _positive_int(f"{source} [data] test_samples", d.test_samples, 0)
    if not (d.alpha > 0 and math.isfinite(d.alpha)):
        raise ConfigError(f"{source} [data] alpha: expected a positive number, got {d.alpha}")
    if cfg.clients_per_round > d.num_clients:
        raise ConfigError(f"{source}: clients_per_round ({cfg.clients_per_round}) exceeds "
                          f"[data] num_clients ({d.num_clients})")
    if cfg.min_clients > cfg.clients_per_round:
        raise ConfigError(f"{source}: min_clients ({cfg.min_clients}) exceeds "
                          f"clients_per_round ({cfg.clients_per_round})")

    # [model]
    model = doc.get("model", {"name": "lenet5"})
    unknown = set(model) - {"name"}
    if unknown:
        raise ConfigError(f"{source} [model]: unknown key(s) {sorted(unknown)}; allowed: name")
    name = _check_type(f"{source} [model] name", model.get("name", "lenet5"), str)
    if name not in BUILDERS and not name.endswith(".json"):
        raise ConfigError(f"{source} [model] name: unknown model {name!r}; allowed: "
                          f"{', '.join(sorted(BUILDERS))} (or a ModelSpec .json path)")
    cfg.model = {"name": name}

    # [strategy]
    strat = dict(doc.get("strategy", {"name": "fedavg"}))
    if "name" not in strat:
        raise ConfigError(f"{source} [strategy]: missing key 'name'; allowed: "
                          f"{', '.join(strategy_names())}")
    sname = _check_type(f"{source} [strategy] name", strat["name"], str)
    if sname not in strategy_names():
        raise ConfigError(f"{source} [strategy] name: unknown strategy {sname!r}; allowed: "
                          f"{', '.join(strategy_names())}")
    cfg.strategy = strat

    # [train]
    cfg.train = dict(doc.get("train", {}))
    try:
        cfg.train_config()
    except ValueError as e:
        raise ConfigError(f"{source} {e}") from None

    # [fleet]
    fleet = dict(doc.get("fleet", {}))
    _fill(f"{source} [fleet]", cfg.fleet, fleet)
    try:
        cfg.fleet.validate()
    except ValueError as e:
        raise ConfigError(f"{source} [{e}".replace("[fleet.", "[fleet] ", 1)) from None

    nb = len(cfg.fleet.boards)
    always = sum(1 for b in cfg.fleet.boards if b.get("every_round", True))
    if nb and nb >= d.num_clients:
        raise ConfigError(f"{source} [data] num_clients ({d.num_clients}) must exceed the "
                          f"number of [[fleet.boards]] ({nb}): boards are clients too")
    if always > cfg.clients_per_round:
        raise ConfigError(f"{source}: clients_per_round ({cfg.clients_per_round}) is smaller "
                          f"than the {always} board(s) that train every round")

    # [output]
    out = dict(doc.get("output", {}))
    unknown = set(out) - {"dir"}
    if unknown:
        raise ConfigError(f"{source} [output]: unknown key(s) {sorted(unknown)}; allowed: dir")
    if "dir" in out:
        _check_type(f"{source} [output] dir", out["dir"], str)
    cfg.output = out
    return cfg


def load_config(path: str | os.PathLike | None = None) -> RunConfig:
    """Read and validate a TOML run config (``None``: the bundled quick example)."""
    p = Path(path) if path is not None else BUNDLED_QUICK
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        doc = tomllib.loads(p.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    return parse_config(doc, str(p))


# ------------------------------------------------------------------------------ writing
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    import re

    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def to_toml(d: dict[str, Any]) -> str:
    """A small TOML writer for config dicts (top-level scalars, then one level of tables).
    ``None`` values are left out (TOML has no null; absent means the default None)."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items()
             if not isinstance(v, dict) and v is not None]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append("")
            lines.append(f"[{_toml_key(k)}]")
            lines += [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items()
                      if vv is not None]
    return "\n".join(lines) + "\n"


def resolved_toml(cfg: RunConfig) -> str:
    """The resolved config (every default filled in) as TOML; it parses back to ``cfg``."""
    return "# resolved sparsefl run config\n" + to_toml(cfg.to_dict())


__all__ = ["BUNDLED_DEMO", "BUNDLED_QUICK", "ConfigError", "DataConfig", "RunConfig", "load_config",
           "parse_config", "resolved_toml", "strategy_names", "to_toml"]

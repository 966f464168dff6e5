"""Device profiles on disk: load, validate, list, save (TOML, one file per device).

A profile file gives every figure as ``{ value = ..., unit = "...", source = "..." }``; the
schema is in ``docs/profiles.md``. The value paths (also the keys of
:attr:`DeviceProfile.sources` and the entries of ``fitted``) are::

    overhead_s
    clusters.<name>.cores | freq_ghz | peak_gflops
    memory.ram_bytes | bandwidth_gbs
    power.idle_w | busy_w | battery_wh (optional)
    efficiency.conv | gemm | elementwise
    efficiency.<finer key> (optional, see hwmodel.profile.EFFICIENCY_KEYS)
    sparse_efficiency.densities | efficiency
    memory.cache_bytes | cache_bandwidth_gbs | overlap (optional)
    sparse_kernels.<class>_<phase> | compress_nnz_s (optional)
    overheads.<kind> (optional)
    radios.<name>.up_j_per_byte | down_j_per_byte | session_j | up_mbps | down_mbps

Shipped profiles live in the ``profiles`` package (found through importlib.resources, so an
installed wheel finds them); a user's own board loads by path: ``load_profile("./my-board.toml")``.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .profile import (
    EFFICIENCY_KEYS,
    OP_CLASSES,
    OVERHEAD_KEYS,
    SPARSE_KERNEL_KEYS,
    Cluster,
    DeviceProfile,
    Radio,
    SparseEfficiency,
    SparseKernel,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ProfileError", "check_sparse_efficiency", "efficiency_at", "list_profiles", "load_profile",
    "profile_dir", "profile_from_dict", "profile_to_toml", "save_profile", "value_paths",
]


class ProfileError(ValueError):
    """A profile that cannot be found or does not follow the schema (message names file and field)."""


@dataclass(frozen=True)
class _Spec:
    """What one value table must hold."""

    unit: str
    kind: str  # "int", "float" or "floats" (a non-empty list of numbers)
    bound: str  # "pos" (> 0), "nonneg" (>= 0), "frac" (in (0, 1]) or "unit" (in [0, 1])
    required: bool = True


_CLUSTER = {
    "cores": _Spec("cores", "int", "pos"),
    "freq_ghz": _Spec("GHz", "float", "pos"),
    "peak_gflops": _Spec("GFLOPS", "float", "pos"),
}
_MEMORY = {
    "ram_bytes": _Spec("B", "int", "pos"),
    "bandwidth_gbs": _Spec("GB/s", "float", "pos"),
    # optional refinements (absent: no cache term, the roofline max)
    "cache_bytes": _Spec("B", "int", "nonneg", required=False),
    "cache_bandwidth_gbs": _Spec("GB/s", "float", "pos", required=False),
    "overlap": _Spec("fraction", "float", "unit", required=False),
}
_POWER = {
    "idle_w": _Spec("W", "float", "pos"),
    "busy_w": _Spec("W", "float", "pos"),
    "battery_wh": _Spec("Wh", "float", "pos", required=False),
}
_EFFICIENCY = {c: _Spec("fraction", "float", "frac") for c in OP_CLASSES}
_EFFICIENCY.update({k: _Spec("fraction", "float", "frac", required=False) for k in EFFICIENCY_KEYS})
_SPARSE_KERNELS = {k: _Spec("ratio", "floats", "nonneg", required=False) for k in SPARSE_KERNEL_KEYS}
_SPARSE_KERNELS["compress_nnz_s"] = _Spec("s", "float", "nonneg", required=False)
_OVERHEADS = {k: _Spec("s", "float", "nonneg", required=False) for k in OVERHEAD_KEYS}
_SPARSE = {
    "densities": _Spec("fraction", "floats", "frac"),
    "efficiency": _Spec("fraction", "floats", "frac"),
}
_RADIO = {
    "up_j_per_byte": _Spec("J/B", "float", "nonneg"),
    "down_j_per_byte": _Spec("J/B", "float", "nonneg"),
    "session_j": _Spec("J", "float", "nonneg"),
    "up_mbps": _Spec("Mbit/s", "float", "pos"),
    "down_mbps": _Spec("Mbit/s", "float", "pos"),
}
_OVERHEAD = _Spec("s", "float", "nonneg")
_TOP_KEYS = (
    "name", "description", "train_cluster", "fitted", "overhead_s",
    "clusters", "memory", "power", "efficiency", "sparse_efficiency", "radios",
    "sparse_kernels", "overheads",
)
_VALUE_KEYS = ("value", "unit", "source")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_BOUND_TEXT = {"pos": "> 0", "nonneg": ">= 0", "frac": "in (0, 1]", "unit": "in [0, 1]"}


# --------------------------------------------------------------------------- locating files

def profile_dir() -> Path:
    """The directory of the shipped ``profiles`` package (works from an installed wheel)."""
    return Path(str(resources.files("profiles")))


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.stem for p in profile_dir().glob("*.toml"))


def _is_path(name_or_path: str | Path) -> bool:
    if isinstance(name_or_path, Path):
        return True
    s = str(name_or_path)
    return s.endswith(".toml") or "/" in s or "\\" in s


def load_profile(name_or_path: str | Path | DeviceProfile) -> DeviceProfile:
    """Load a shipped profile by name (``"rpi4"``) or any profile file by path.

    A path is anything ending in ``.toml`` or containing a directory separator. An unknown
    name raises :class:`ProfileError` listing the known names; a malformed file raises it
    naming the file, the field and what was expected. A DeviceProfile passes through.
    """
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(f"{path}: no such profile file")
        return _load_file(path)
    name = str(name_or_path)
    known = list_profiles()
    if name not in known:
        raise ProfileError(
            f"unknown device {name!r}; known profiles: {', '.join(known)} "
            "(or give the path of a .toml profile file)"
        )
    prof = _load_file(profile_dir() / f"{name}.toml")
    if prof.name != name:
        raise ProfileError(f"{prof.path}: name: expected {name!r} (the file name), got {prof.name!r}")
    return prof


def _load_file(path: Path) -> DeviceProfile:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not UTF-8 text: {e}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: malformed TOML: {e}") from None
    prof = profile_from_dict(doc, where=str(path))
    prof.path = str(path)
    return prof


# --------------------------------------------------------------------------- validation

class _Ctx:
    """Collects the sources while walking one document; formats errors."""

    def __init__(self, where: str):
        self.where = where
        self.sources: dict[str, str] = {}

    def fail(self, field: str, msg: str) -> ProfileError:
        return ProfileError(f"{self.where}: {field}: {msg}")


def _table(ctx: _Ctx, parent: dict, key: str, prefix: str, required: bool = True) -> dict | None:
    field = f"{prefix}{key}"
    if key not in parent:
        if required:
            raise ctx.fail(field, "missing table")
        return None
    t = parent[key]
    if not isinstance(t, dict):
        raise ctx.fail(field, f"expected a table, got {type(t).__name__}")
    return t


def _no_unknown(ctx: _Ctx, table: dict, allowed, prefix: str) -> None:
    for k in table:
        if k not in allowed:
            raise ctx.fail(f"{prefix}{k}", f"unknown key; expected one of: {', '.join(allowed)}")


def _number(ctx: _Ctx, field: str, v: Any, kind: str) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        want = "an integer" if kind == "int" else "a number"
        raise ctx.fail(field, f"expected {want}, got {type(v).__name__} {v!r}")
    if kind == "int" and not isinstance(v, int):
        raise ctx.fail(field, f"expected an integer, got {v!r}")
    if not math.isfinite(v):
        raise ctx.fail(field, f"expected a finite number, got {v!r}")
    return v if kind == "int" else float(v)


def _check_bound(ctx: _Ctx, field: str, x: float, spec: _Spec) -> None:
    ok = {"pos": x > 0, "nonneg": x >= 0, "frac": 0 < x <= 1, "unit": 0 <= x <= 1}[spec.bound]
    if not ok:
        raise ctx.fail(field, f"expected a value {_BOUND_TEXT[spec.bound]} ({spec.unit}), got {x!r}")


def _value(ctx: _Ctx, parent: dict, key: str, spec: _Spec, prefix: str):
    """Read one ``{value, unit, source}`` table; record its source; return the value (or None)."""
    path = f"{prefix}{key}"
    if key not in parent:
        if spec.required:
            raise ctx.fail(path, f"missing field (expected {{ value = ..., unit = \"{spec.unit}\", source = \"...\" }})")
        return None
    t = parent[key]
    if not isinstance(t, dict):
        raise ctx.fail(path, f"expected a table {{ value, unit = \"{spec.unit}\", source }}, got {type(t).__name__} {t!r}")
    _no_unknown(ctx, t, _VALUE_KEYS, f"{path}.")
    for k in _VALUE_KEYS:
        if k not in t:
            raise ctx.fail(f"{path}.{k}", "missing" + (" (every value needs a source: a URL, a citation or 'measured: how')" if k == "source" else ""))
    unit, source = t["unit"], t["source"]
    if unit != spec.unit:
        raise ctx.fail(f"{path}.unit", f"expected {spec.unit!r}, got {unit!r}")
    if not isinstance(source, str) or not source.strip():
        raise ctx.fail(f"{path}.source", f"expected a non-empty string, got {source!r}")
    raw = t["value"]
    if spec.kind == "floats":
        if not isinstance(raw, list) or not raw:
            raise ctx.fail(f"{path}.value", f"expected a non-empty list of numbers, got {raw!r}")
        val = tuple(_number(ctx, f"{path}.value[{i}]", v, "float") for i, v in enumerate(raw))
        for i, x in enumerate(val):
            _check_bound(ctx, f"{path}.value[{i}]", x, spec)
    else:
        val = _number(ctx, f"{path}.value", raw, spec.kind)
        _check_bound(ctx, f"{path}.value", val, spec)
    ctx.sources[path] = source
    return val


def _values(ctx: _Ctx, table: dict, specs: dict[str, _Spec], prefix: str) -> dict[str, Any]:
    _no_unknown(ctx, table, tuple(specs), prefix)
    return {k: _value(ctx, table, k, s, prefix) for k, s in specs.items()}


def _string(ctx: _Ctx, doc: dict, key: str) -> str:
    if key not in doc:
        raise ctx.fail(key, "missing field (expected a string)")
    v = doc[key]
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(key, f"expected a non-empty string, got {v!r}")
    return v


def _named_tables(ctx: _Ctx, doc: dict, key: str, required: bool) -> dict[str, dict]:
    t = _table(ctx, doc, key, "", required=required)
    if t is None:
        return {}
    if required and not t:
        raise ctx.fail(key, "expected at least one entry")
    for name, sub in t.items():
        if not _NAME_RE.match(name):
            raise ctx.fail(f"{key}.{name}", "expected a name of letters, digits, '_' or '-'")
        if not isinstance(sub, dict):
            raise ctx.fail(f"{key}.{name}", f"expected a table, got {type(sub).__name__}")
    return t


def check_sparse_efficiency(se: SparseEfficiency, where: str = "sparse_efficiency") -> None:
    """Raise ProfileError unless the table is usable: equal lengths, densities strictly
    increasing in (0, 1], efficiencies in (0, 1], and efficiency 1.0 at density 1 if listed."""
    d, e = tuple(se.densities), tuple(se.efficiency)
    if len(d) != len(e):
        raise ProfileError(
            f"{where}: densities and efficiency have different lengths ({len(d)} vs {len(e)}); "
            "expected one efficiency per density"
        )
    if not d:
        raise ProfileError(f"{where}: expected at least one (density, efficiency) point")
    for i in range(1, len(d)):
        if not d[i] > d[i - 1]:
            raise ProfileError(
                f"{where}: densities must be strictly increasing, got {list(d)} "
                f"(position {i}: {d[i]!r} after {d[i - 1]!r})"
            )
    for name, xs in (("densities", d), ("efficiency", e)):
        for i, x in enumerate(xs):
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0 < x <= 1:
                raise ProfileError(f"{where}.{name}[{i}]: expected a value in (0, 1], got {x!r}")
    if d[-1] == 1.0 and e[-1] != 1.0:
        raise ProfileError(
            f"{where}.efficiency[{len(e) - 1}]: expected 1.0 at density 1 (a dense layer runs the "
            f"dense kernel), got {e[-1]!r}"
        )


def profile_from_dict(doc: dict, where: str = "<profile>") -> DeviceProfile:
    """Validate a parsed TOML document and build the DeviceProfile (``where`` names it in errors)."""
    ctx = _Ctx(where)
    if not isinstance(doc, dict):
        raise ctx.fail("<top>", "expected a table")
    _no_unknown(ctx, doc, _TOP_KEYS, "")
    name = _string(ctx, doc, "name")
    description = _string(ctx, doc, "description")
    train_cluster = _string(ctx, doc, "train_cluster")
    overhead = _value(ctx, doc, "overhead_s", _OVERHEAD, "")

    clusters = []
    for cname, ct in _named_tables(ctx, doc, "clusters", required=True).items():
        v = _values(ctx, ct, _CLUSTER, f"clusters.{cname}.")
        clusters.append(Cluster(cname, v["cores"], v["freq_ghz"], v["peak_gflops"]))
    names = [c.name for c in clusters]
    if train_cluster not in names:
        raise ctx.fail("train_cluster", f"expected one of the clusters {names}, got {train_cluster!r}")

    mem = _values(ctx, _table(ctx, doc, "memory", ""), _MEMORY, "memory.")
    power = _values(ctx, _table(ctx, doc, "power", ""), _POWER, "power.")
    if power["busy_w"] < power["idle_w"]:
        raise ctx.fail("power.busy_w.value", f"expected busy_w >= idle_w ({power['idle_w']} W), got {power['busy_w']}")
    eff = {k: v for k, v in _values(ctx, _table(ctx, doc, "efficiency", ""), _EFFICIENCY,
                                    "efficiency.").items() if v is not None}
    kernels: dict[str, SparseKernel] = {}
    nnz_s = 0.0
    skt = _table(ctx, doc, "sparse_kernels", "", required=False)
    if skt is not None:
        sk = _values(ctx, skt, _SPARSE_KERNELS, "sparse_kernels.")
        for k in SPARSE_KERNEL_KEYS:
            if sk[k] is not None:
                if len(sk[k]) != 2:
                    raise ctx.fail(f"sparse_kernels.{k}.value", "expected two numbers [efficiency "
                                   f"per kept MAC, fixed fraction of dense time], got {list(sk[k])!r}")
                if not sk[k][0] > 0:
                    raise ctx.fail(f"sparse_kernels.{k}.value[0]", "expected an efficiency > 0 "
                                   f"(ratio), got {sk[k][0]!r}")
                kernels[k] = SparseKernel(float(sk[k][0]), float(sk[k][1]))
        nnz_s = sk["compress_nnz_s"] or 0.0
    ovt = _table(ctx, doc, "overheads", "", required=False)
    overheads = {}
    if ovt is not None:
        overheads = {k: v for k, v in _values(ctx, ovt, _OVERHEADS, "overheads.").items()
                     if v is not None}
    sp = _values(ctx, _table(ctx, doc, "sparse_efficiency", ""), _SPARSE, "sparse_efficiency.")
    sparse = SparseEfficiency(sp["densities"], sp["efficiency"])
    try:
        check_sparse_efficiency(sparse)
    except ProfileError as e:
        raise ProfileError(f"{where}: {e}") from None

    radios = {}
    for rname, rt in _named_tables(ctx, doc, "radios", required=False).items():
        v = _values(ctx, rt, _RADIO, f"radios.{rname}.")
        radios[rname] = Radio(rname, **v)

    fitted_raw = doc.get("fitted", [])
    if not isinstance(fitted_raw, list) or not all(isinstance(f, str) for f in fitted_raw):
        raise ctx.fail("fitted", f"expected a list of field paths (strings), got {fitted_raw!r}")
    for f in fitted_raw:
        if f not in ctx.sources:
            raise ctx.fail("fitted", f"{f!r} is not a value path of this profile; expected one of: {', '.join(ctx.sources)}")
        if not ctx.sources[f].lstrip().lower().startswith("measured"):
            raise ctx.fail(f"{f}.source", f"a fitted field's source must start with 'measured: ...', got {ctx.sources[f]!r}")
    if len(set(fitted_raw)) != len(fitted_raw):
        raise ctx.fail("fitted", f"duplicate entries in {fitted_raw!r}")

    return DeviceProfile(
        name=name,
        description=description,
        clusters=clusters,
        train_cluster=train_cluster,
        ram_bytes=mem["ram_bytes"],
        mem_bandwidth_gbs=mem["bandwidth_gbs"],
        efficiency=eff,
        sparse_efficiency=sparse,
        overhead_s=overhead,
        idle_w=power["idle_w"],
        busy_w=power["busy_w"],
        radios=radios,
        battery_wh=power["battery_wh"],
        sources=ctx.sources,
        fitted=tuple(fitted_raw),
        sparse_kernels=kernels,
        compress_nnz_s=float(nnz_s),
        overheads=overheads,
        cache_bytes=int(mem["cache_bytes"] or 0),
        cache_bandwidth_gbs=mem["cache_bandwidth_gbs"],
        overlap=1.0 if mem["overlap"] is None else float(mem["overlap"]),
    )


# --------------------------------------------------------------------------- writing

def value_paths(profile: DeviceProfile) -> list[tuple[str, str, Any]]:
    """Every (path, unit, value) of a profile, in file order (the keys ``sources`` must cover)."""
    out: list[tuple[str, str, Any]] = [("overhead_s", _OVERHEAD.unit, profile.overhead_s)]
    for c in profile.clusters:
        out += [(f"clusters.{c.name}.{k}", s.unit, getattr(c, k)) for k, s in _CLUSTER.items()]
    out += [("memory.ram_bytes", "B", profile.ram_bytes),
            ("memory.bandwidth_gbs", "GB/s", profile.mem_bandwidth_gbs),
            *([("memory.cache_bytes", "B", int(profile.cache_bytes))] if profile.cache_bytes else []),
            *([("memory.cache_bandwidth_gbs", "GB/s", profile.cache_bandwidth_gbs)]
              if profile.cache_bandwidth_gbs is not None else []),
            *([("memory.overlap", "fraction", profile.overlap)] if profile.overlap != 1.0 else []),
            ("power.idle_w", "W", profile.idle_w), ("power.busy_w", "W", profile.busy_w)]
    if profile.battery_wh is not None:
        out.append(("power.battery_wh", "Wh", profile.battery_wh))
    out += [(f"efficiency.{k}", "fraction", v) for k, v in profile.efficiency.items()]
    out += [(f"sparse_kernels.{k}", "ratio", (sk.efficiency, sk.fixed))
            for k, sk in profile.sparse_kernels.items()]
    if profile.compress_nnz_s or "sparse_kernels.compress_nnz_s" in profile.sources:
        out.append(("sparse_kernels.compress_nnz_s", "s", profile.compress_nnz_s))
    out += [(f"overheads.{k}", "s", v) for k, v in profile.overheads.items()]
    out += [("sparse_efficiency.densities", "fraction", tuple(profile.sparse_efficiency.densities)),
            ("sparse_efficiency.efficiency", "fraction", tuple(profile.sparse_efficiency.efficiency))]
    for rname, r in profile.radios.items():
        out += [(f"radios.{rname}.{k}", s.unit, getattr(r, k)) for k, s in _RADIO.items()]
    return out


def _toml_str(s: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; DEL must be escaped in TOML too.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_num(x: Any) -> str:
    if isinstance(x, bool):
        raise TypeError("bool is not a number")
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return repr(float(x))


def profile_to_toml(profile: DeviceProfile) -> str:
    """Serialise a profile as TOML that :func:`load_profile` reads back equal.

    Every value path needs a source in ``profile.sources`` (a stray source key is an error);
    the text is validated before it is returned.
    """
    where = f"profile {profile.name!r}"
    rows = value_paths(profile)
    paths = {p for p, _, _ in rows}
    missing = [p for p in paths if not str(profile.sources.get(p, "")).strip()]
    if missing:
        raise ProfileError(f"{where}: {sorted(missing)[0]}: missing source (every value needs one)")
    stray = sorted(set(profile.sources) - paths)
    if stray:
        raise ProfileError(f"{where}: sources: {stray[0]!r} is not a value path of this profile")

    def entry(path: str, unit: str, v: Any) -> str:
        key = path.rsplit(".", 1)[-1]
        val = "[" + ", ".join(_toml_num(x) for x in v) + "]" if isinstance(v, tuple) else _toml_num(v)
        return f"{key} = {{ value = {val}, unit = {_toml_str(unit)}, source = {_toml_str(profile.sources[path])} }}"

    lines = [
        "# sparsefl device profile (schema: docs/profiles.md). Every figure: value, unit, source.",
        f"name = {_toml_str(profile.name)}",
        f"description = {_toml_str(profile.description)}",
        f"train_cluster = {_toml_str(profile.train_cluster)}",
        "fitted = [" + ", ".join(_toml_str(f) for f in profile.fitted) + "]",
    ]
    current = ""
    for path, unit, v in rows:
        section = path.rsplit(".", 1)[0] if "." in path else ""
        if section != current:
            lines += ["", f"[{section}]"]
            current = section
        lines.append(entry(path, unit, v))
    text = "\n".join(lines) + "\n"
    profile_from_dict(tomllib.loads(text), where=where)  # never write what we cannot read
    return text


def save_profile(profile: DeviceProfile, path: str | Path) -> Path:
    """Write ``profile`` as TOML to ``path`` (validated first); returns the path."""
    path = Path(path)
    text = profile_to_toml(profile)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- sparse efficiency

def efficiency_at(se: SparseEfficiency, density):
    """Sparse-kernel efficiency at ``density`` (a float or a numpy array of densities).

    Linear interpolation in log-density between the table points; below the first point the
    first efficiency (clamped); between the last point and density 1 towards (1, 1.0) when the
    table stops short of 1; exactly 1.0 at density >= 1 (the dense kernel). NaN stays NaN.
    Sparse time = dense time × density / efficiency.
    """
    check_sparse_efficiency(se)
    xs = [float(x) for x in se.densities]
    ys = [float(y) for y in se.efficiency]
    if xs[-1] < 1.0:
        xs.append(1.0)
        ys.append(1.0)
    d = np.asarray(density, dtype=float)
    logd = np.log(np.clip(d, xs[0], 1.0))
    out = np.interp(logd, np.log(xs), ys)
    out = np.where(d >= 1.0, 1.0, out)
    out = np.where(np.isnan(d), np.nan, out)
    if np.ndim(density) == 0:
        return float(out)
    return out

"""UplinkRule: what a client sends back after local training, encoded with ``embedded.codec``.

Kinds (see ../shared/ALGORITHMS.md):

* ``dense`` — FedAvg, SWAT-FL: every tensor, absolute values.
* ``topk_weights`` — ZeroFL: per sparse layer, the top-K ``|w_E|`` weights (absolute values;
  unsent entries are 0 for the server).
* ``diff_topk_weights`` — ZeroFL: positions of the top-K ``|w_E|``, values ``d = w_E - w_global``.
* ``topk_diff`` — ZeroFL: the top-K of ``|d|``, values ``d``.
* ``masked`` — FedDST / FLASH: the values under the client's mask, plus the mask itself only
  when it differs from the global mask the client received.

``K = round((1 - sp + mask_ratio) · N)`` per layer (half up, clipped to [1, N]); ``sp`` is
``sparsity`` if given, else the layer's planned sparsity ``1 - weight_density``. Only the
weights of the plan's sparse layers are sparsified; biases, batch-norm parameters and running
statistics and the weights of dense layers travel dense and absolute (for the diff kinds too:
``w_global + mean(d)`` equals ``mean(w)`` for a tensor every client sends whole).
``num_batches_tracked`` is not sent (the server keeps its own counter). Ties in magnitude are
broken by the lower flat index, so the selection is platform independent.

Wire format: one state frame (``hwmodel/wire.py``) whose entries are

* ``@uplink`` — int32 ``[version, kind index]`` (dense32, 12 body bytes);
* ``<name>`` — a dense absolute tensor, full shape, ``dense32``;
* ``<name>:topk`` — ``topk_weights``: the top-K absolute weights, full shape, zeros elsewhere,
  encoded with ``codec`` (``"best"`` = ``embedded.codec.best_codec`` per tensor);
* ``<name>:diff`` — the diff kinds: ``w_local - w_global`` at the K positions, full shape,
  zeros elsewhere, encoded with ``codec``;
* ``<layer>.weight:values`` — masked kind: the weights at the mask's positions, row-major,
  1-D ``dense32`` (the server knows the positions from the global mask or the sent mask);
* ``<layer>.weight:mask`` — masked kind, only when changed: the mask as packed bits, int32
  words, bit ``i`` of the flattened mask = bit ``i % 32`` of word ``i // 32`` (LSB first, the
  same bit order as the ``bitmap`` codec).

Float values use ``dtype`` (``f32`` or ``f16``); integers stay exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from hwmodel import wire

KINDS = ("dense", "topk_weights", "diff_topk_weights", "topk_diff", "masked")
META = "@uplink"
FORMAT_VERSION = 1
SKIP_SUFFIXES = (".num_batches_tracked",)
MAX_MASK_ELEMENTS = 2_000_000_000


class UplinkError(ValueError):
    """An UplinkRule is malformed, or an update cannot be made or decoded."""


# ---------------------------------------------------------------------------------- helpers
def topk_count(n: int, fraction: float) -> int:
    """ZeroFL's K for a layer of ``n`` weights: ``round(fraction · n)`` half up, in [1, n]."""
    if n <= 0:
        return 0
    return max(1, min(n, int(math.floor(fraction * n + 0.5))))


def topk_indices(score: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the ``k`` largest ``|score|``; ties go to the lower index."""
    a = np.abs(np.asarray(score)).ravel()
    n = a.size
    k = max(0, min(int(k), n))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    t = np.partition(a, n - k)[n - k]          # the k-th largest magnitude
    above = np.flatnonzero(a > t)
    tied = np.flatnonzero(a == t)[: k - above.size]
    return np.sort(np.concatenate([above, tied])).astype(np.int64)


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Bool mask -> int32 words (bit i of the flat mask = bit i%32 of word i//32)."""
    bits = np.packbits(np.asarray(mask, dtype=bool).ravel(), bitorder="little")
    pad = (-bits.size) % 4
    if pad:
        bits = np.concatenate([bits, np.zeros(pad, dtype=np.uint8)])
    return bits.view("<i4").copy()


def unpack_mask(words: np.ndarray, shape: tuple[int, ...], what: str = "mask") -> np.ndarray:
    """Inverse of :func:`pack_mask`; checks the word count and that padding bits are 0."""
    n = math.prod(shape)
    if n > MAX_MASK_ELEMENTS:
        raise UplinkError(f"{what}: shape {shape} is too large for a mask")
    w = np.asarray(words)
    if w.ndim != 1 or w.dtype.kind not in "iu":
        raise UplinkError(f"{what}: expected a 1-D integer tensor of packed bits, got "
                          f"{w.dtype} {w.shape}")
    if w.size != (n + 31) // 32:
        raise UplinkError(f"{what}: {w.size} words cannot hold a mask of shape {shape} "
                          f"(expected {(n + 31) // 32})")
    bits = np.unpackbits(w.astype("<i4").view(np.uint8), bitorder="little")
    if bits[n:].any():
        raise UplinkError(f"{what}: padding bits beyond {n} elements are set")
    return bits[:n].astype(bool).reshape(shape)


def encode_frame(entries: list[tuple[str, np.ndarray, str, str | None]]) -> bytes:
    """A state frame (``embedded.codec.encode_state``) from ``(name, array, codec, dtype)``."""
    from embedded import codec as _codec

    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise UplinkError(f"duplicate tensor names in an update: {names}")
    return _codec.encode_state({n: a for n, a, _, _ in entries},
                               codecs={n: c for n, _, c, _ in entries},
                               dtype={n: d for n, _, _, d in entries if d is not None})


def _value_dtype(arr: np.ndarray, dtype: str) -> str | None:
    return dtype if np.asarray(arr).dtype.kind == "f" else None


def encode_masks(masks: Mapping[str, np.ndarray]) -> bytes:
    """Encode per-layer bool masks as a state frame of packed-bit int32 tensors (``<layer>``)."""
    return encode_frame([(n, pack_mask(m), "dense32", "i32") for n, m in masks.items()])


def decode_masks(data: bytes, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Decode :func:`encode_masks` output; ``shapes`` maps layer name -> weight shape.

    An entry may also be a full-shape tensor (any codec): its non-zeros are the mask.
    """
    from embedded import codec as _codec

    out = {}
    for name, t in _codec.decode_state(data).items():
        if name not in shapes:
            raise UplinkError(f"masks: layer {name!r} is not a weighted layer of the model; "
                              f"known: {', '.join(shapes)}")
        shape = tuple(shapes[name])
        if tuple(t.shape) == shape and len(shape) > 1:
            out[name] = np.asarray(t) != 0
        else:
            out[name] = unpack_mask(t, shape, f"masks[{name!r}]")
    return out


# ---------------------------------------------------------------------------------- update
@dataclass
class Update:
    """A decoded client update.

    ``tensors``: full-shape arrays by state_dict name; ``diff``: the names whose tensor is
    ``w_local - w_global`` (the others are absolute); ``sparsified``: names where unsent
    entries are zero; ``masks``: masked kind — the client's mask per layer (the sent one, or
    the global one when it did not change), else ``None``; ``mask_sent``: layers whose mask
    travelled.
    """

    kind: str
    tensors: dict[str, np.ndarray]
    diff: frozenset[str] = frozenset()
    sparsified: frozenset[str] = frozenset()
    masks: dict[str, np.ndarray] | None = None
    mask_sent: frozenset[str] = frozenset()

    def absolute(self, global_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Tensors with every diff turned back into local weights ``w_global + d``."""
        out = dict(self.tensors)
        for n in self.diff:
            out[n] = (np.asarray(global_state[n], dtype=np.float32) + out[n]).astype(np.float32)
        return out


@dataclass
class UplinkRule:
    """The client half of a method's uplink (JSON-serialisable)."""

    kind: str = "dense"
    mask_ratio: float = 0.0
    sparsity: float | None = None
    codec: str = "best"
    dtype: str = "f32"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UplinkError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if not _is_num(self.mask_ratio) or not 0.0 <= float(self.mask_ratio) <= 1.0:
            raise UplinkError(f"mask_ratio: expected a number in [0, 1], got {self.mask_ratio!r}")
        if self.sparsity is not None and (not _is_num(self.sparsity)
                                          or not 0.0 <= float(self.sparsity) < 1.0):
            raise UplinkError(f"sparsity: expected null or a number in [0, 1), "
                              f"got {self.sparsity!r}")
        if self.codec != "best" and self.codec not in wire.CODECS:
            raise UplinkError(f"codec: expected 'best' or one of {wire.CODECS}, got {self.codec!r}")
        if self.dtype not in ("f32", "f16"):
            raise UplinkError(f"dtype: expected 'f32' or 'f16', got {self.dtype!r}")

    # ------------------------------------------------------------------ selection
    def fraction(self, plan: Any, layer: str) -> float:
        """Fraction of a sparse layer's weights sent by the top-K kinds."""
        sp = self.sparsity if self.sparsity is not None else 1.0 - plan.weight_density(layer)
        return min(1.0, 1.0 - float(sp) + float(self.mask_ratio))

    def make_update(self, local_state: Mapping[str, np.ndarray],
                    global_state: Mapping[str, np.ndarray] | None, plan: Any,
                    global_masks: Mapping[str, np.ndarray] | None = None,
                    local_masks: Mapping[str, np.ndarray] | None = None) -> bytes:
        """Encode what this client sends back: one state frame (see the module docstring)."""
        sparse_layers = list(plan.layers) if plan is not None else []
        weights = {f"{n}.weight": n for n in sparse_layers}
        for key in weights:
            if key not in local_state:
                raise UplinkError(f"plan layer {weights[key]!r} has no {key!r} in the local state")
        needs_global = self.kind in ("diff_topk_weights", "topk_diff")
        if needs_global and global_state is None:
            raise UplinkError(f"kind {self.kind!r} needs the global state to take differences")
        entries: list[tuple[str, np.ndarray, str, str | None]] = [
            (META, np.array([FORMAT_VERSION, KINDS.index(self.kind)], dtype=np.int32),
             "dense32", "i32")]
        for name, value in local_state.items():
            if name.endswith(SKIP_SUFFIXES):
                continue
            arr = np.asarray(value)
            layer = weights.get(name)
            if layer is None or self.kind == "dense":
                entries.append((name, arr, "dense32", _value_dtype(arr, self.dtype)))
                continue
            w = arr.astype(np.float32, copy=False)
            if self.kind == "masked":
                m = None if local_masks is None else local_masks.get(layer)
                if m is None:
                    entries.append((name, w, "dense32", self.dtype))
                    continue
                m = np.asarray(m, dtype=bool)
                if m.shape != w.shape:
                    raise UplinkError(f"local mask of {layer!r} has shape {m.shape}, weight "
                                      f"{w.shape}")
                entries.append((f"{name}:values", np.ascontiguousarray(w[m]), "dense32",
                                self.dtype))
                g = None if global_masks is None else global_masks.get(layer)
                if g is None or not np.array_equal(np.asarray(g, dtype=bool), m):
                    entries.append((f"{name}:mask", pack_mask(m), "dense32", "i32"))
                continue
            k = topk_count(w.size, self.fraction(plan, layer))
            if self.kind == "topk_weights":
                idx = topk_indices(w, k)
                out, key = np.zeros(w.size, dtype=np.float32), f"{name}:topk"
                out[idx] = w.ravel()[idx]
            else:
                if name not in global_state:
                    raise UplinkError(f"global state has no {name!r} to take the difference from")
                gw = np.asarray(global_state[name], dtype=np.float32)
                if gw.shape != w.shape:
                    raise UplinkError(f"global {name!r} has shape {gw.shape}, local {w.shape}")
                d = (w - gw).ravel()
                idx = topk_indices(w if self.kind == "diff_topk_weights" else d, k)
                out, key = np.zeros(w.size, dtype=np.float32), f"{name}:diff"
                out[idx] = d[idx]
            out = out.reshape(w.shape)
            entries.append((key, out, self.codec, self.dtype))
        return encode_frame(entries)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": "sparsefl.uplinkrule/1",
                **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, d: Any, source: str = "uplink rule") -> UplinkRule:
        if not isinstance(d, dict):
            raise UplinkError(f"{source}: expected a JSON object")
        d = dict(d)
        fmt = d.pop("format", "sparsefl.uplinkrule/1")
        if fmt != "sparsefl.uplinkrule/1":
            raise UplinkError(f"{source}: unknown format {fmt!r}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UplinkError(f"{source}: unknown field(s) {sorted(unknown)}")
        try:
            return cls(**d)
        except UplinkError as e:
            raise UplinkError(f"{source}: {e}") from None


def decode_update(data: bytes, shapes: Mapping[str, tuple[int, ...]] | None = None,
                  global_masks: Mapping[str, np.ndarray] | None = None) -> Update:
    """Decode :meth:`UplinkRule.make_update` bytes.

    A masked update carries values in mask order: to scatter them the decoder needs each
    layer's mask — the sent one, else ``global_masks[layer]`` — and the weight shape, from the
    mask or from ``shapes`` (state_dict name -> shape, e.g. ``spec.param_shapes()``).
    """
    from embedded import codec as _codec

    try:
        entries = _codec.decode_state(data)
    except ValueError as e:
        raise UplinkError(f"update: not a valid state frame ({e})") from None
    meta = entries.pop(META, None)
    if meta is None:
        raise UplinkError(f"update: missing the {META!r} entry; not an uplink update")
    meta = np.asarray(meta)
    if meta.shape != (2,) or meta.dtype.kind not in "iu" or int(meta[0]) != FORMAT_VERSION \
            or not 0 <= int(meta[1]) < len(KINDS):
        raise UplinkError(f"update: {META!r} entry {meta.tolist()} is not "
                          f"[{FORMAT_VERSION}, kind 0..{len(KINDS) - 1}]")
    kind = KINDS[int(meta[1])]
    tensors: dict[str, np.ndarray] = {}
    diff, sparsified, sent = set(), set(), set()
    values: dict[str, np.ndarray] = {}
    packed: dict[str, np.ndarray] = {}
    for key, t in entries.items():
        name, _, tag = key.partition(":")
        if tag == "":
            tensors[name] = t
        elif tag == "topk" and kind == "topk_weights":
            tensors[name] = np.asarray(t, dtype=np.float32)
            sparsified.add(name)
        elif tag == "diff":
            tensors[name] = np.asarray(t, dtype=np.float32)
            diff.add(name)
            sparsified.add(name)
        elif tag == "values" and kind == "masked":
            values[name] = np.asarray(t, dtype=np.float32)
        elif tag == "mask" and kind == "masked":
            packed[name] = t
        else:
            raise UplinkError(f"update: entry {key!r} is not valid in a {kind!r} update")
    masks: dict[str, np.ndarray] | None = None
    if kind == "masked":
        masks = {}
        for name, v in values.items():
            layer = name[: -len(".weight")] if name.endswith(".weight") else name
            shape = None if shapes is None else shapes.get(name)
            g = None if global_masks is None else global_masks.get(layer)
            if shape is None and g is not None:
                shape = np.shape(g)
            if name in packed:
                if shape is None:
                    raise UplinkError(f"update: the mask of {layer!r} was sent but its shape is "
                                      "unknown; pass shapes= (spec.param_shapes())")
                m = unpack_mask(packed.pop(name), tuple(shape), f"update mask of {layer!r}")
                sent.add(layer)
            elif g is not None:
                m = np.asarray(g, dtype=bool)
                if shape is not None and m.shape != tuple(shape):
                    raise UplinkError(f"update: global mask of {layer!r} has shape {m.shape}, "
                                      f"expected {tuple(shape)}")
            else:
                raise UplinkError(f"update: {layer!r} kept the global mask; pass global_masks= "
                                  "to place its values")
            if int(m.sum()) != v.size:
                raise UplinkError(f"update: {layer!r} sent {v.size} values for a mask with "
                                  f"{int(m.sum())} positions")
            full = np.zeros(m.shape, dtype=np.float32)
            full[m] = v
            tensors[name] = full
            masks[layer] = m
            sparsified.add(name)
        if packed:
            raise UplinkError(f"update: mask(s) without values: {sorted(packed)}")
    return Update(kind, tensors, frozenset(diff), frozenset(sparsified), masks, frozenset(sent))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


__all__ = ["KINDS", "Update", "UplinkError", "UplinkRule", "decode_masks", "decode_update",
           "encode_frame", "encode_masks", "pack_mask", "topk_count", "topk_indices",
           "unpack_mask"]

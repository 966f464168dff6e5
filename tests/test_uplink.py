"""UplinkRule against hand-made weights: K per layer, positions, values or diffs, dense tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedded.uplink import (
    UplinkError,
    UplinkRule,
    decode_masks,
    decode_update,
    encode_masks,
    pack_mask,
    topk_count,
    topk_indices,
    unpack_mask,
)
from hwmodel import LayerSparsity, SparsityPlan, wire

codec = pytest.importorskip("embedded.codec")


# ------------------------------------------------------------------------------ selection
def test_topk_count_zerofl_by_hand():
    # K = (1 - sp + mask_ratio) * N
    assert topk_count(100, 1 - 0.9 + 0.0) == 10
    assert topk_count(100, 1 - 0.9 + 0.1) == 20
    assert topk_count(100, 1 - 0.95 + 0.2) == 25
    assert topk_count(100, 1.0) == 100
    assert topk_count(10, 0.25) == 3          # 2.5 rounds half up
    assert topk_count(10, 0.01) == 1          # at least one


def test_topk_indices_matches_sorted_reference_with_ties():
    rng = np.random.default_rng(1)
    for n, k in [(50, 7), (64, 64), (33, 1), (20, 0)]:
        a = rng.standard_normal(n).astype(np.float32)
        a[rng.random(n) < 0.3] = 0.5
        a[rng.random(n) < 0.2] = -0.5              # |a| ties across signs
        ref = sorted(sorted(range(n), key=lambda i: (-abs(float(a[i])), i))[:k])
        assert topk_indices(a, k).tolist() == ref


def test_pack_mask_bit_order_by_hand():
    m = np.zeros(40, bool)
    m[[0, 3, 33]] = True
    words = pack_mask(m)
    assert words.dtype == np.dtype("<i4")
    assert words.tolist() == [0b1001, 0b10]       # bit i -> word i//32, bit i%32, LSB first
    np.testing.assert_array_equal(unpack_mask(words, (5, 8)), m.reshape(5, 8))
    with pytest.raises(UplinkError, match="words"):
        unpack_mask(words, (10, 8))
    bad = words.copy()
    bad[1] |= 1 << 20                              # a bit beyond element 40
    with pytest.raises(UplinkError, match="padding"):
        unpack_mask(bad, (5, 8))


# ------------------------------------------------------------------------------ hand-made model
W = np.array([[0.9, -0.1, 0.4, 0.05],
              [-0.8, 0.2, -0.3, 0.6],
              [0.01, -0.7, 0.15, -0.02]], dtype=np.float32)       # "conv.weight", 12 values
G = np.array([[0.8, 0.0, 0.0, 0.5],
              [-0.8, 0.25, 0.3, 0.6],
              [0.0, -0.1, 0.15, 0.3]], dtype=np.float32)           # its global value


def _states():
    local = {"conv.weight": W.copy(), "conv.bias": np.array([0.1, -0.2, 0.3], np.float32),
             "bn.weight": np.array([1.0, 0.9], np.float32),
             "bn.running_mean": np.array([0.01, -0.02], np.float32),
             "bn.num_batches_tracked": np.array(7, dtype=np.int64),
             "fc.weight": np.arange(8, dtype=np.float32).reshape(2, 4) / 10}
    glob = {k: v.copy() for k, v in local.items()}
    glob["conv.weight"] = G.copy()
    glob["conv.bias"] = np.zeros(3, np.float32)
    return local, glob


PLAN = SparsityPlan("swat", {"conv": LayerSparsity(0.25, 0.25)})   # sp = 0.75; fc stays dense


def _dense_untouched(upd, local):
    for name in ("conv.bias", "bn.weight", "bn.running_mean", "fc.weight"):
        np.testing.assert_array_equal(upd.tensors[name], local[name])
        assert name not in upd.diff and name not in upd.sparsified
    assert "bn.num_batches_tracked" not in upd.tensors   # the server keeps its own counter


def test_dense_sends_everything_absolute():
    local, glob = _states()
    upd = decode_update(UplinkRule("dense").make_update(local, glob, PLAN))
    assert upd.kind == "dense" and not upd.diff and upd.masks is None
    np.testing.assert_array_equal(upd.tensors["conv.weight"], W)
    _dense_untouched(upd, local)


def test_topk_weights_by_hand():
    local, glob = _states()
    # K = (1 - 0.75 + 0.25) * 12 = 6: largest |w| are 0.9, -0.8, -0.7, 0.6, 0.4, -0.3
    upd = decode_update(UplinkRule("topk_weights", mask_ratio=0.25).make_update(local, glob, PLAN))
    expect = np.zeros_like(W)
    for pos in [(0, 0), (1, 0), (2, 1), (1, 3), (0, 2), (1, 2)]:
        expect[pos] = W[pos]
    np.testing.assert_array_equal(upd.tensors["conv.weight"], expect)
    assert upd.sparsified == {"conv.weight"} and not upd.diff
    _dense_untouched(upd, local)
    # an explicit sparsity overrides the plan's: sp = 0.9, ratio 0 -> K = round(1.2) = 1
    upd = decode_update(UplinkRule("topk_weights", sparsity=0.9).make_update(local, glob, PLAN))
    assert np.count_nonzero(upd.tensors["conv.weight"]) == 1
    assert upd.tensors["conv.weight"][0, 0] == np.float32(0.9)


def test_diff_topk_weights_by_hand():
    local, glob = _states()
    upd = decode_update(UplinkRule("diff_topk_weights", mask_ratio=0.0).make_update(
        local, glob, PLAN))
    # K = 0.25 * 12 = 3 at the largest |w|: (0,0) 0.9, (1,0) -0.8, (2,1) -0.7; values w - g
    expect = np.zeros_like(W)
    for pos in [(0, 0), (1, 0), (2, 1)]:
        expect[pos] = W[pos] - G[pos]
    np.testing.assert_array_equal(upd.tensors["conv.weight"], expect)
    assert upd.diff == {"conv.weight"}
    _dense_untouched(upd, local)                    # dense tensors absolute, not diffs
    back = upd.absolute(glob)["conv.weight"]
    np.testing.assert_allclose(back[(0, 0)], W[0, 0])


def test_topk_diff_by_hand():
    local, glob = _states()
    d = W - G
    # d = w - g by hand: |d| = (1,2) 0.6, (2,1) 0.6, (0,3) 0.45, (0,2) 0.4, (2,3) 0.32, ...
    # K = 3 -> flat indices 3, 6, 9 (the values are d, not w).
    upd = decode_update(UplinkRule("topk_diff", mask_ratio=0.0).make_update(local, glob, PLAN))
    order = sorted(range(12), key=lambda i: (-abs(float(d.ravel()[i])), i))[:3]
    assert sorted(order) == [3, 6, 9]
    expect = np.zeros(12, np.float32)
    expect[order] = d.ravel()[order]
    np.testing.assert_array_equal(upd.tensors["conv.weight"].ravel(), expect)
    assert upd.diff == {"conv.weight"}


@pytest.mark.parametrize("cdc", wire.CODECS)
def test_every_codec_carries_the_same_update_and_its_exact_size(cdc):
    local, glob = _states()
    rule = UplinkRule("topk_weights", mask_ratio=0.25, codec=cdc)
    data = rule.make_update(local, glob, PLAN)
    upd = decode_update(data)
    assert np.count_nonzero(upd.tensors["conv.weight"]) == 6
    # byte count from hwmodel's formulas, independently of the encoder
    sent = upd.tensors["conv.weight"]
    idx = np.flatnonzero(sent)
    entries = [("@uplink", wire.tensor_bytes("dense32", (2,), dtype="i32")),
               ("conv.weight:topk", wire.tensor_bytes(cdc, (3, 4), nnz=6, indices=idx))]
    for name in ("conv.bias", "bn.weight", "bn.running_mean", "fc.weight"):
        entries.append((name, wire.tensor_bytes("dense32", local[name].shape)))
    assert len(data) == wire.state_bytes(entries)


def test_f16_values():
    local, glob = _states()
    upd = decode_update(UplinkRule("topk_weights", mask_ratio=0.25, dtype="f16").make_update(
        local, glob, PLAN))
    np.testing.assert_array_equal(upd.tensors["conv.bias"],
                                  local["conv.bias"].astype(np.float16).astype(np.float32))
    assert upd.tensors["conv.weight"][0, 0] == np.float32(np.float16(0.9))


def test_masked_sends_mask_only_when_changed():
    local, glob = _states()
    mask = np.abs(W) >= 0.3
    local["conv.weight"] = W * mask
    plan = SparsityPlan("masked", {"conv": LayerSparsity(0.5, 1.0)})
    rule = UplinkRule("masked")
    same = rule.make_update(local, glob, plan, global_masks={"conv": mask},
                            local_masks={"conv": mask})
    assert "conv.weight:mask" not in codec.decode_state(same)
    vals = codec.decode_state(same)["conv.weight:values"]
    np.testing.assert_array_equal(vals, W[mask])          # row-major values under the mask
    with pytest.raises(UplinkError, match="global_masks"):
        decode_update(same)
    upd = decode_update(same, global_masks={"conv": mask})
    np.testing.assert_array_equal(upd.tensors["conv.weight"], W * mask)
    assert upd.mask_sent == frozenset() and upd.masks["conv"] is not None
    _dense_untouched(upd, local)

    new = mask.copy()
    new[0, 0], new[2, 0] = False, True                    # the client readjusted
    local["conv.weight"] = W * new
    changed = rule.make_update(local, glob, plan, global_masks={"conv": mask},
                               local_masks={"conv": new})
    ents = codec.decode_state(changed)
    assert "conv.weight:mask" in ents
    # the mask costs 1 bit per weight: ceil(12 / 32) int32 words
    assert len(changed) - len(same) == wire.state_entry_overhead("conv.weight:mask") + \
        wire.tensor_bytes("dense32", (1,), dtype="i32")
    upd = decode_update(changed, shapes={"conv.weight": (3, 4)})
    np.testing.assert_array_equal(upd.masks["conv"], new)
    np.testing.assert_array_equal(upd.tensors["conv.weight"], W * new)
    assert upd.mask_sent == {"conv"}


def test_masks_frame_roundtrip():
    rng = np.random.default_rng(0)
    masks = {"a": rng.random((5, 7)) < 0.3, "b": rng.random((2, 3, 3, 3)) < 0.5}
    out = decode_masks(encode_masks(masks), {"a": (5, 7), "b": (2, 3, 3, 3)})
    for k in masks:
        np.testing.assert_array_equal(out[k], masks[k])
    with pytest.raises(UplinkError, match="not a weighted layer"):
        decode_masks(encode_masks(masks), {"a": (5, 7)})


def test_rule_json_and_validation():
    r = UplinkRule("diff_topk_weights", mask_ratio=0.1, sparsity=0.9, codec="bitmap", dtype="f16")
    assert UplinkRule.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    for bad, field in [({"kind": "gzip"}, "kind"), ({"mask_ratio": 2}, "mask_ratio"),
                       ({"sparsity": 1.0}, "sparsity"), ({"codec": "zip"}, "codec"),
                       ({"dtype": "f64"}, "dtype"), ({"k": 3}, "unknown")]:
        with pytest.raises(UplinkError, match=field):
            UplinkRule.from_dict(bad)
    local, _ = _states()
    with pytest.raises(UplinkError, match="global state"):
        UplinkRule("topk_diff").make_update(local, None, PLAN)


def test_malformed_update_bytes():
    with pytest.raises(UplinkError):
        decode_update(b"garbage")
    plain = codec.encode_state({"x": np.zeros(3, np.float32)})
    with pytest.raises(UplinkError, match="@uplink"):
        decode_update(plain)
    local, glob = _states()
    good = UplinkRule("dense").make_update(local, glob, PLAN)
    with pytest.raises(UplinkError):
        decode_update(good[:-3])

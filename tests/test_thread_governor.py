"""The ThreadGovernor (embedded.runtime) on made-up step times, and the property it relies on:
a training run's weights do not depend on the thread count, whatever count each step ran."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from test_train import digits_cnn

from embedded.network import Network
from embedded.runtime import ThreadGovernor
from embedded.train import TrainConfig, train_local
from hwmodel import SparsityPlan


def _drive(gov: ThreadGovernor, times_at) -> list[int]:
    """Run 200 steps; ``times_at(step, threads)`` gives each step's time. Returns the thread
    count of every step."""
    seen = []
    for step in range(200):
        th = gov.threads
        seen.append(th)
        gov.record(times_at(step, th))
    return seen


def _isolated_ones(seen: list[int], start: int = 0) -> list[int]:
    """Indices of the 1-thread steps from ``start`` on, asserting each is a lone check."""
    ones = [i for i in range(start, len(seen)) if seen[i] == 1]
    for i in ones:
        assert seen[i - 1] == 2 and (i + 1 == len(seen) or seen[i + 1] == 2), (i, seen)
    return ones


def test_quiet_host_stays_at_max_threads_but_for_its_checks():
    rng = np.random.default_rng(0)
    gov = ThreadGovernor(2)
    seen = _drive(gov, lambda step, th: 5e-3 * (1 + 0.1 * rng.random()) * (1 if th == 2 else 1.6))
    # one check at 1 thread after the first 10 steps, then one every 96 steps at 2
    assert _isolated_ones(seen) == [10, 107] and gov.switches == 0
    assert gov.steps_at_one == 2


def test_a_lost_core_falls_back_to_one_thread_and_comes_back():
    # steps 60-139: the second core is gone (2 threads 11 ms, 1 thread 8.4 ms)
    def times(step, th):
        gone = 60 <= step < 140
        return (11e-3 if gone else 5.5e-3) if th == 2 else 8.4e-3

    gov = ThreadGovernor(2, window=5, probe_every=8)
    seen = _drive(gov, times)
    assert _isolated_ones(seen[:60]) == [10]
    assert gov.switches == 1
    gone = seen[60:140]
    # noticed once most of a window is slow, then 8 steps at 1 thread to a probe at 2, and
    # twice as many before each next probe while the probes lose
    assert gone[:3] == [2] * 3
    assert gone[3:3 + 8 + 1 + 16 + 1 + 32 + 1] == [1] * 8 + [2] + [1] * 16 + [2] + [1] * 32 + [2]
    # back at 2 threads at the first probe after the core returns, and there to stay
    back = seen.index(2, 140)
    assert back <= 140 + 64 and gov.switches == 1
    _isolated_ones(seen, back)
    assert gov.steps_at_one == seen.count(1)


def test_a_run_that_starts_with_the_core_gone_finds_one_thread_at_its_first_check():
    gov = ThreadGovernor(2)
    seen = _drive(gov, lambda step, th: 11e-3 if th == 2 else 8.4e-3)
    assert seen[:10] == [2] * 10 and seen[10:19] == [1] * 9 and gov.switches == 1
    assert seen[10:].count(1) >= 180


def test_a_slow_spell_that_one_thread_does_not_beat_returns_to_max_threads():
    # everything twice as slow (a throttled clock): one fallback, and the first probe ends it
    def times(step, th):
        f = 2.0 if step >= 50 else 1.0
        return f * (5e-3 if th == 2 else 8e-3)

    gov = ThreadGovernor(2, probe_every=4)
    seen = _drive(gov, times)
    assert gov.switches == 1 and seen[53:58] == [1, 1, 1, 1, 2]
    _isolated_ones(seen, 58)


def test_one_thread_budget_and_bad_parameters():
    gov = ThreadGovernor(1)
    assert set(_drive(gov, lambda s, t: 1.0 + s)) == {1} and gov.steps_at_one == 0
    for kw, field in (({"max_threads": 0}, "max_threads"), ({"max_threads": True}, "max_threads"),
                      ({"max_threads": 2, "window": 0}, "window"),
                      ({"max_threads": 2, "slow": 1.0}, "slow"),
                      ({"max_threads": 2, "probe_every": 1}, "probe_every"),
                      ({"max_threads": 2, "check_every": 1}, "check_every"),
                      ({"max_threads": 2, "margin": 0.0}, "margin")):
        with pytest.raises(ValueError, match=f"ThreadGovernor.{field}"):
            ThreadGovernor(**kw)
    with pytest.raises(ValueError, match="TrainConfig.adaptive_threads"):
        TrainConfig(adaptive_threads="yes")


@pytest.mark.parametrize("mode", ["dense", "swat", "masked"])
def test_weights_do_not_depend_on_the_thread_count(mode, monkeypatch):
    """1 thread, 2 threads, and 2 threads with the count switched every other step (what the
    governor does) train bitwise equal weights: every kernel's result is independent of how
    its work is split (the sparse linear input gradient's private accumulators and the dense
    GEMM's column blocks included, which followed the thread count before)."""
    from embedded.kernels import sparse

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    monkeypatch.setattr(sparse, "PAR_MIN_WORK", 0)   # parallel kernels even on small layers
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:240, None] / 16.0).astype(np.float32)
    y = d.target[:240].astype(np.int64)
    spec = digits_cnn(16)
    plan = (SparsityPlan.dense() if mode == "dense" else
            SparsityPlan.uniform(spec, 0.8, mode=mode, layers="all"))
    states = []
    for threads, flip in ((1, False), (2, False), (2, True)):
        net = Network.from_spec(spec, seed=3)
        net.set_plan(plan)
        if mode == "masked":
            rng = np.random.default_rng(0)
            net.set_masks({n: rng.random(net.layers[n].params["weight"].shape) < 0.3
                           for n in plan.layers})
        cfg = TrainConfig(lr=0.05, batch_size=16, max_steps=12, seed=1, threads=threads,
                          adaptive_threads=False)
        if flip:   # the count changes between steps, as under the governor
            calls = {"n": 0}

            def flip_after_step(net_, step, xb, yb, calls=calls):
                calls["n"] += 1
                numba.set_num_threads(1 if calls["n"] % 2 else 2)

            sched = type("Flip", (), {"begin": lambda self, *a: None,
                                      "after_step": lambda self, *a: flip_after_step(*a)})()
            train_local(net, x, y, cfg, mask_schedule=sched)
            assert calls["n"] == 12
        else:
            train_local(net, x, y, cfg)
        states.append(net.state_dict())
    for other in states[1:]:
        for k, v in states[0].items():
            assert np.array_equal(v, other[k]), (mode, k)


def test_train_local_reports_the_steps_it_ran_at_one_thread(monkeypatch):
    """A governor that always falls back: the run counts those steps, its measurements come
    from the steps at the configured count, and the configured count is restored after."""
    import embedded.train as tr

    class Always(ThreadGovernor):
        def record(self, seconds):
            self.threads = 1 if self.threads == self.max_threads else self.max_threads
            return self.threads

    monkeypatch.setattr(tr, "ThreadGovernor", Always)
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:160, None] / 16.0).astype(np.float32)
    y = d.target[:160].astype(np.int64)
    net = Network.from_spec(digits_cnn(8), seed=0)
    before = numba.get_num_threads()
    stats = train_local(net, x, y, TrainConfig(batch_size=16, max_steps=10, threads=2))
    assert stats.steps_at_one_thread == 5
    step_rec = [m for m in stats.measurements if m.phase == "step"][0]
    assert step_rec.repeats == 5 and step_rec.threads == 2
    assert numba.get_num_threads() == 2
    numba.set_num_threads(before)
    # and with adaptive_threads off, no step leaves the configured count
    stats = train_local(net, x, y, TrainConfig(batch_size=16, max_steps=10, threads=2,
                                               adaptive_threads=False))
    assert stats.steps_at_one_thread == 0

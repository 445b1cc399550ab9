"""The task sampler against its definitions (flaxpals/mtl/sampler.py; formulas re-derived
here)."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from flaxpals.config_lib import SAMPLING_METHODS as METHODS
from flaxpals.mtl.sampler import TaskSampler

# Train batches per epoch of SST, Quora (stand-in), STS at batch size 32.
SIZES = {"sst": 267, "quora": 506, "sts": 188}


def _expected_p(alpha):
    n = np.array(list(SIZES.values()), np.float64)
    return n ** alpha / (n ** alpha).sum()


def _draw_counts(sampler, epoch):
    counts = dict.fromkeys(SIZES, 0)
    for _ in range(sampler.steps_per_epoch):
        assert sampler.epoch == epoch
        (name,) = sampler.next()
        counts[name] += 1
    return np.array(list(counts.values()))


@pytest.mark.parametrize("method, alpha", [("proportional", 1.0), ("sqrt", 0.5),
                                           ("uniform", 0.0), ("temperature", 1 / 3)])
def test_sampled_frequencies_follow_n_to_the_alpha(method, alpha):
    s = TaskSampler(method, SIZES, num_epochs=1, steps_per_epoch=30_000, temperature=3.0,
                    seed=0)
    assert s.alpha(1) == pytest.approx(alpha)
    p = _expected_p(alpha)
    assert list(s.probabilities(1).values()) == pytest.approx(p.tolist())
    counts = _draw_counts(s, 1)
    assert stats.chisquare(counts, p * counts.sum()).pvalue > 1e-3
    # The test has power: another alpha's frequencies are rejected.
    wrong = _expected_p(alpha + 0.25)
    assert stats.chisquare(counts, wrong * counts.sum()).pvalue < 1e-6


def test_annealed_alpha_follows_the_formula_each_epoch():
    E = 5
    s = TaskSampler("annealed", SIZES, num_epochs=E, steps_per_epoch=20_000, seed=1)
    assert s.alpha(1) == 1.0 and s.alpha(E) == pytest.approx(0.2)
    for e in range(1, E + 1):
        alpha = 1 - 0.8 * (e - 1) / (E - 1)
        assert s.alpha(e) == pytest.approx(alpha)
        counts = _draw_counts(s, e)
        assert stats.chisquare(counts, _expected_p(alpha) * counts.sum()).pvalue > 1e-3
    assert s.done and s.step == s.total_steps == 5 * 20_000
    assert TaskSampler("annealed", SIZES, num_epochs=1).alpha(1) == 1.0


def test_deterministic_orders_are_exact():
    sizes = {"a": 3, "b": 2, "c": 1}
    seq = TaskSampler("sequential", sizes, num_epochs=2)
    assert seq.steps_per_epoch == 6
    assert ["".join(x) for x in seq] == list("aaabbc" * 2)
    rr = TaskSampler("round_robin", sizes, num_epochs=2, steps_per_epoch=4)
    assert ["".join(x) for x in rr] == list("abcabcab")
    add = TaskSampler("additive", sizes, num_epochs=3)
    assert add.steps_per_epoch == 2  # ceil(6 / 3)
    assert list(add) == [("a", "b", "c")] * 6 and add.positions == {"a": 6, "b": 6, "c": 6}
    # sequential with another S splits it in proportion to N_i, blocks in task order
    short = TaskSampler("sequential", {"a": 30, "b": 20, "c": 10}, num_epochs=1,
                        steps_per_epoch=7)
    assert ["".join(x) for x in short] == list("aaaabbc")


def test_default_steps_per_epoch():
    total = sum(SIZES.values())
    for method in METHODS:
        s = TaskSampler(method, SIZES, num_epochs=2)
        want = math.ceil(total / 3) if method == "additive" else total
        assert s.steps_per_epoch == want and s.total_steps == 2 * want


def test_positions_count_batches_per_task():
    s = TaskSampler("sqrt", SIZES, num_epochs=2, seed=4)
    drawn = [s.next()[0] for _ in range(1000)]
    assert s.positions == {n: drawn.count(n) for n in SIZES} and s.step == 1000
    assert s.epoch == 1 + 1000 // s.steps_per_epoch


@pytest.mark.parametrize("method", METHODS)
def test_restored_sampler_continues_identically(method):
    kw = dict(num_epochs=3, seed=7, temperature=2.5)
    full = [tuple(x) for x in TaskSampler(method, SIZES, **kw)]
    first = TaskSampler(method, SIZES, **kw)
    cut = len(full) // 2 + 13  # mid-epoch
    head = [first.next() for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    restored = TaskSampler(method, SIZES, **kw)
    restored.load_state_dict(state)
    assert restored.step == cut and restored.positions == first.positions
    assert head + list(restored) == full
    with pytest.raises(StopIteration):
        restored.next()


def test_same_seed_same_draws_other_seed_other_draws():
    a = list(TaskSampler("proportional", SIZES, num_epochs=1, seed=0))
    assert a == list(TaskSampler("proportional", SIZES, num_epochs=1, seed=0))
    assert a != list(TaskSampler("proportional", SIZES, num_epochs=1, seed=1))


def test_state_from_another_configuration_is_refused():
    s = TaskSampler("sqrt", SIZES, num_epochs=2, seed=0)
    for _ in range(10):
        s.next()
    state = s.state_dict()
    with pytest.raises(ValueError, match="seed"):
        TaskSampler("sqrt", SIZES, num_epochs=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="method or task names"):
        TaskSampler("uniform", SIZES, num_epochs=2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="positions"):
        TaskSampler("sqrt", SIZES, num_epochs=2, seed=0).load_state_dict(
            {**state, "positions": [10, 0, 0]})


@pytest.mark.parametrize("args, error", [
    (("mixed", SIZES), "unknown sampling method"),
    (("sqrt", {}), "empty"),
    (("sqrt", {"a": 0}), "positive batch count"),
])
def test_bad_arguments(args, error):
    with pytest.raises(ValueError, match=error):
        TaskSampler(*args, num_epochs=1)
    with pytest.raises(ValueError, match="no alpha"):
        TaskSampler("sequential", SIZES, num_epochs=1).alpha(1)

"""Per-task masks, isolation of other tasks under AdamW, parameter accounting."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxpals.model import bert
from flaxpals.model.adapters import TaskAdapters
from flaxpals.mtl.task_params import (
    format_accounting,
    keep_other_tasks,
    owner,
    param_accounting,
    shared_param_mask,
    task_param_mask,
)

TASKS = ("sst", "para", "sts")
CONFIG = bert.tiny_config(vocab_size=128)
HEAD_SIZES = {"sst": 5, "para": 1, "sts": 1}


@pytest.fixture(scope="module")
def params():
    """A model tree as the trainer builds it: encoder, adapters, heads (random values)."""
    x = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    shapes = {
        "encoder": jax.eval_shape(lambda k, x: bert.BertModel(CONFIG).init(k, x, x, x),
                                  jax.random.key(0), x)["params"],
        "adapters": jax.eval_shape(
            lambda k: TaskAdapters(CONFIG, TASKS, "pal").init(k, method="init_all"),
            jax.random.key(0))["params"],
        "heads": {t: {"kernel": jax.ShapeDtypeStruct((64, n), jnp.float32),
                      "bias": jax.ShapeDtypeStruct((n,), jnp.float32)}
                  for t, n in HEAD_SIZES.items()},
    }
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32), shapes)


def _flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_masks(params):
    mask = _flat(task_param_mask(params, "sst", TASKS))
    shared = _flat(shared_param_mask(params, TASKS))
    assert mask.keys() == shared.keys() == _flat(params).keys()
    for path, m in mask.items():
        top, second = path.split("']")[0][2:], path.split("']")[1][2:]
        if top == "encoder":
            assert m and shared[path], path
        else:
            assert m == (second == "sst") and not shared[path], path
    assert sum(shared.values()) == len(jax.tree_util.tree_leaves(params["encoder"]))
    with pytest.raises(ValueError, match="unknown task"):
        task_param_mask(params, "quora", TASKS)
    with pytest.raises(ValueError, match="several task names"):
        owner(jax.tree_util.tree_leaves_with_path({"sst": {"sts": 1}})[0][0], TASKS)


def _loss(p, task):
    """Depends on the shared leaves and `task`'s own, as a real task's loss does,
    so every other task's gradient is exactly zero."""
    use = task_param_mask(p, task, TASKS)
    terms = jax.tree_util.tree_map(lambda x, u: jnp.sum(jnp.sin(x)) if u else 0.0, p, use)
    return sum(jax.tree_util.tree_leaves(terms))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _run(params, schedule, isolate):
    """AdamW steps on the tasks of `schedule`; returns the states before and after
    the last step. One compilation (eager optax ops compile one by one: slow)."""
    tx = optax.adamw(1e-2, weight_decay=0.1)
    state = tx.init(params)
    for task in schedule:
        grads = jax.grad(_loss)(params, task)
        updates, new_state = tx.update(grads, state, params)
        new_params = optax.apply_updates(params, updates)
        if isolate:
            new_params, new_state = keep_other_tasks((new_params, new_state),
                                                     (params, state), task, TASKS)
        before = (params, state)
        params, state = new_params, new_state
    return before, (params, state)


@pytest.mark.parametrize("isolate", [True, False])
def test_step_leaves_other_tasks_bit_identical(params, isolate):
    # The same layout with fewer leaves (compiling AdamW over ~100 leaves x 4 steps
    # takes ~10 s here): part of the encoder, each task's V^E / V^D, the heads.
    params = {"encoder": {"pooler": params["encoder"]["pooler"],
                          "layer_1": {"output": params["encoder"]["layer_1"]["output"]}},
              "adapters": {t: {k: params["adapters"][t][k] for k in ("encoder", "decoder")}
                           for t in TASKS},
              "heads": params["heads"]}
    # Warm Adam's moments on the other tasks, then one step on "sst".
    (p0, s0), (p1, s1) = _run(params, ("para", "sts", "para", "sst"), isolate)
    mu0, mu1 = s0[0].mu, s1[0].mu
    assert int(s1[0].count) == 4
    moved = []
    for t in ("para", "sts"):
        for key in ("adapters", "heads"):
            for a, b, ma, mb in zip(jax.tree_util.tree_leaves(p0[key][t]),
                                    jax.tree_util.tree_leaves(p1[key][t]),
                                    jax.tree_util.tree_leaves(mu0[key][t]),
                                    jax.tree_util.tree_leaves(mu1[key][t]), strict=True):
                moved.append(np.any(a != b) or np.any(ma != mb))
    if isolate:
        assert not any(moved)
    else:  # without the helper, momentum and weight decay do move them
        assert all(moved)
    # The step's own task and the encoder did change.
    for key in (("adapters", "sst"), ("heads", "sst"), ("encoder", "pooler")):
        a, b = p0[key[0]][key[1]], p1[key[0]][key[1]]
        assert all(np.any(x != y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                   jax.tree_util.tree_leaves(b), strict=True))


def test_keep_other_tasks_under_jit(params):
    new = jax.tree_util.tree_map(lambda x: x + 1, params)
    out = jax.jit(keep_other_tasks, static_argnums=(2, 3))(new, params, "sts", TASKS)
    np.testing.assert_array_equal(out["heads"]["sst"]["bias"], params["heads"]["sst"]["bias"])
    np.testing.assert_array_equal(out["heads"]["sts"]["bias"], new["heads"]["sts"]["bias"])
    np.testing.assert_array_equal(out["encoder"]["pooler"]["bias"],
                                  new["encoder"]["pooler"]["bias"])


def test_accounting(params):
    acc = param_accounting(params, TASKS)
    n = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
    assert acc["encoder"] == acc["shared"] == n(params["encoder"])
    assert acc["total"] == n(params)
    for t in TASKS:
        assert acc["tasks"][t]["adapters"] == n(params["adapters"][t])
        assert acc["tasks"][t]["heads"] == 64 * HEAD_SIZES[t] + HEAD_SIZES[t]
    assert acc["ratio"] == pytest.approx(n(params) / n(params["encoder"]))
    assert acc["ratio_by_key"]["adapters"] == pytest.approx(
        (n(params["encoder"]) + n(params["adapters"])) / n(params["encoder"]))
    text = format_accounting(acc)
    assert "task sst" in text and f"{acc['total']:,}" in text
    with pytest.raises(KeyError, match="encoder"):
        param_accounting({"adapters": params["adapters"]}, TASKS)

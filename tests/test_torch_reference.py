"""The PyTorch reference of benchmarks.bench_steps does the same work as flaxpals' steps.

Same weights and batch, dropout off: the two frameworks must give the same loss
for every task, pooling and pair head, and the same losses over a few AdamW
steps (same gradients, learning rate, Adam moments and decoupled weight decay
with its mask; a reference that decays biases and LayerNorms fails it).
Otherwise the bench would compare different computations.
"""

import numpy as np
import pytest

from benchmarks import bench_steps as bench
from benchmarks import step_sides
from flaxpals import config_lib
from flaxpals.model import heads
from tests.conftest import require


def build(pooling, pair_encoding, similarity, **train):
    require("torch")
    require("transformers")
    from benchmarks import torch_reference as bench_torch

    args = bench.parse_args(["--checkpoint=tiny", "--batch=4", "--lengths=12", "--no-dropout",
                             f"--pooling={pooling}", f"--pair-encoding={pair_encoding}",
                             f"--similarity={similarity}"])
    config = step_sides.bench_config(args)
    for key, value in train.items():
        config.train[key] = value
    config_lib.validate(config)
    flax = step_sides.FlaxSide(config, num_steps=10)
    model = bench_torch.build_model(flax.model, flax.params)
    steps = bench_torch.TorchSteps(model, config.train, num_steps=10)
    rng = np.random.default_rng(0)
    batches = {t: step_sides.synthetic_batch(flax.specs[t], pair_encoding, 4, 12,
                                             flax.model.config.vocab_size, rng)
               for t in flax.specs}
    return args, flax, steps, batches


# Between them: mean and [CLS] pooling, the classifier, the bi-encoder dot head (Quora),
# the cosine head (STS) and the cross-encoder heads (Quora, STS).
@pytest.mark.parametrize("pooling,pair_encoding,similarity",
                         [("mean", "bi", "cosine"), ("cls", "cross", "dot")])
def test_same_loss_for_every_head(pooling, pair_encoding, similarity):
    from benchmarks import torch_reference as bench_torch

    args, flax, steps, batches = build(pooling, pair_encoding, similarity)
    torch_side = type("T", (), {"model": steps.model,
                                "to_torch": staticmethod(bench_torch.to_torch)})()
    result = bench.parity(args, flax, torch_side)
    assert set(result) == {"sst", "quora", "sts"}
    for task, r in result.items():
        assert np.isfinite(r["flaxpals"]), task
        assert r["abs_diff"] <= 1e-5 * max(1.0, abs(r["pytorch"])), (task, r)


def test_same_losses_over_adamw_steps():
    # Constant lr large enough to move the weights; a weight decay strong enough that a
    # different decay mask or decoupling changes the losses; clipping on.
    import jax
    import torch

    from benchmarks import torch_reference as bench_torch

    _, flax, steps, batches = build("cls", "bi", "dot", schedule="constant",
                                    learning_rate=1e-3, weight_decay=5.0, grad_clip=0.5)
    call = flax.compile("train/sst", batches["sst"])[0]
    tb = bench_torch.to_torch(batches["sst"])
    ours, theirs = [], []
    for _ in range(4):
        call()  # one flaxpals train step, then the loss of its new params, dropout off
        params = flax.states["sum"].params
        out = flax.model.apply({"params": params}, jax.device_put(batches["sst"]), "sst")
        ours.append(float(heads.loss_fn("classification", out, batches["sst"]["labels"],
                                        batches["sst"]["mask"])))
        steps.train_step(tb, "sst")
        steps.model.eval()
        with torch.no_grad():
            theirs.append(float(bench_torch.loss_fn("classification",
                                                    steps.model(tb, "sst"), tb["labels"])))
    assert ours[-1] < ours[0] - 0.01, f"the steps did not train: {ours}"
    np.testing.assert_allclose(ours, theirs, rtol=2e-4)


def test_ops_bench_compares_equal_functions():
    # benchmarks/bench_ops.py times each encoder part against a PyTorch op: the two must
    # compute the same output (dropout excepted), and both timing modes must run.
    require("torch")
    from benchmarks import bench_ops
    result = bench_ops.main(["--hidden=16", "--heads=4", "--ffn=32", "--length=8", "--batch=2",
                             "--eval-batch=3", "--reps=1", "--warmup=0"])
    assert set(result["parity"]) == set(bench_ops.OPS) - {"dropout"}
    for op, diff in result["parity"].items():
        assert diff < 1e-5, (op, diff)
    modes = {(r["op"], r["mode"]) for r in result["rows"]}
    assert len(modes) == 2 * len(bench_ops.OPS) - 1  # dropout: forward only
    assert all(r["ratio"] > 0 for r in result["rows"])

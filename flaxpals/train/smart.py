"""SMART regularisation (Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning
for Pre-trained Natural Language Models through Principled Regularized Optimization").

`regularised_loss` is the training loss of one task's batch with SMART on:

    loss(θ) = task_loss(f(x; θ))
            + weight         * D(f(x; θ), f(x + δ; θ))    δ held fixed (no gradient)
            + bregman_weight * D(f(x; θ), f(x; θ̃))        θ̃ held fixed

x is the embedding layer's output (`MultiTaskModel.embed`: one array per
sentence of an example, two for a bi-encoded pair), f the rest of the model up
to the task's outputs, θ̃ the EMA of the params (optim.ema_params; the paper's
momentum β is train.ema_decay), and D the divergence of the task's kind, per
example, then averaged over real examples (`mask`):

    classification          symmetric KL of the two softmax distributions
    pair_classification     symmetric KL of the two Bernoulli distributions of the logit
    pair_regression         squared difference of the two scores

δ approximately maximises D(f(x), f(x + δ)) in the ball ||δ_i|| <= eps of each
example i (the paper's Algorithm 1): it starts as Gaussian noise of std `noise`,
then each of `steps` power-iteration steps does

    g   = ∇_δ D(f(x), f(x + δ))             params, x and f(x) held fixed
    δ_i <- Π(δ_i + step_size * g_i / ||g_i||)

where || || is `norm` (inf, as the paper, or l2) over all of example i's
embeddings and Π projects onto the eps-ball in that norm (inf: each entry
clipped to [-eps, eps]; l2: δ_i rescaled to norm eps when longer). That is
`projection="ball"`. The authors' released code (mt-dnn's perturbation.py)
does something else, `projection="token"`: each step sets

    δ   <- eps * (δ + step_size * g) / ||δ + step_size * g||

the norm taken over each token's hidden vector, so every token's perturbation
has norm exactly eps, and that code's radius is 1 (its "epsilon" only guards
the division). With the paper's eps of 1e-5 the ball's term is below float32's
resolution beside the task loss: a MiniLM run with it (weight 1) matched the
run without it to 7 digits in every epoch-1 loss (docs/results/PLAN.md).

Every forward pass of one loss uses its dropout key, so they share dropout
masks: the divergence is exactly 0 at δ = 0 and at θ̃ = θ, and the clean
forward (embed, then the rest from those embeddings) is the plain forward.

Notes. The perturbation of padding tokens is not masked: attention and pooling
never read padding positions, so it changes no output (and gets no gradient).
The paper's eps and noise (1e-5) are below bfloat16's resolution of O(1)
embeddings: with model.dtype=bfloat16 the layers' first cast rounds such a
perturbation away; use float32. Cost per step: steps + 2 forward passes and
steps + 1 backward passes more than the plain loss (one more forward for the
Bregman term). The trainer's loss/<task> figures are this whole loss, SMART
terms included.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flaxpals import config_lib
from flaxpals.model import heads

# The noise's key: the loss's dropout key folded with this constant.
_NOISE_STREAM = 0x534D5254


@dataclasses.dataclass(frozen=True)
class SmartOptions:
    """The train.smart_* config fields (config_lib.base)."""

    weight: float = 1.0
    steps: int = 1
    eps: float = 1e-5
    step_size: float = 1e-3
    noise: float = 1e-5
    norm: str = "inf"
    projection: str = "ball"
    bregman_weight: float = 0.0

    def __post_init__(self):
        if self.norm not in config_lib.SMART_NORMS:
            raise ValueError(f"train.smart_norm={self.norm!r} is not one of "
                             f"{config_lib.SMART_NORMS}")
        if self.projection not in config_lib.SMART_PROJECTIONS:
            raise ValueError(f"train.smart_projection={self.projection!r} is not one of "
                             f"{config_lib.SMART_PROJECTIONS}")
        if self.steps < 1:
            raise ValueError(f"train.smart_steps={self.steps} must be >= 1")


def from_config(cfg) -> SmartOptions | None:
    """The options of the `train` config, or None when both SMART weights are 0 (off)."""
    if cfg.smart_weight == 0 and cfg.smart_bregman_weight == 0:
        return None
    return SmartOptions(weight=cfg.smart_weight, steps=cfg.smart_steps, eps=cfg.smart_eps,
                        step_size=cfg.smart_step_size, noise=cfg.smart_noise,
                        norm=cfg.smart_norm, projection=cfg.smart_projection,
                        bregman_weight=cfg.smart_bregman_weight)


def per_example_divergence(kind: str, p: jax.Array, q: jax.Array) -> jax.Array:
    """D(p, q) [batch] of two model outputs (logits [batch, classes] or [batch]).

    The symmetric KL of two distributions with log-probabilities a - lse(a) and
    b - lse(b) is sum_k (p_k - q_k)(a_k - b_k) (the lse terms cancel since both
    sum to 1), and that of two Bernoullis with logits a, b is
    (sigmoid(a) - sigmoid(b)) (a - b): no log of a probability is taken.
    """
    p, q = p.astype(jnp.float32), q.astype(jnp.float32)
    if kind == "classification":
        return ((jax.nn.softmax(p, -1) - jax.nn.softmax(q, -1)) * (p - q)).sum(-1)
    if kind == "pair_classification":
        return (jax.nn.sigmoid(p) - jax.nn.sigmoid(q)) * (p - q)
    if kind == "pair_regression":
        return jnp.square(p - q)
    raise ValueError(f"unknown task kind {kind!r}")


def divergence(kind: str, p: jax.Array, q: jax.Array, mask: jax.Array) -> jax.Array:
    """The mean of `per_example_divergence` over real examples (mask 1)."""
    mask = mask.astype(jnp.float32)
    return (per_example_divergence(kind, p, q) * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def example_norms(tree, norm: str) -> jax.Array:
    """[batch]: the `norm` of each example's entries over every array of `tree`
    (arrays [batch, ...], e.g. the two sentences of a bi-encoded pair)."""
    flat = [x.reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)]
    if norm == "inf":
        return jnp.max(jnp.stack([jnp.abs(x).max(1) for x in flat]), 0)
    return jnp.sqrt(sum(jnp.square(x).sum(1) for x in flat))


def _times(tree, per_example: jax.Array):
    return jax.tree.map(
        lambda x: x * per_example.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), tree)


def _safe(n: jax.Array) -> jax.Array:
    return jnp.maximum(n, jnp.finfo(n.dtype).tiny)  # a zero gradient stays zero


def token_norms(x: jax.Array, norm: str) -> jax.Array:
    """[..., 1]: the `norm` of each token's vector (the last axis) of x [..., hidden]."""
    if norm == "inf":
        return jnp.abs(x).max(-1, keepdims=True)
    return jnp.sqrt(jnp.square(x).sum(-1, keepdims=True))


def ascent_step(delta, grad, options: SmartOptions):
    """One power-iteration step: δ_i <- Π(δ_i + step_size * g_i / ||g_i||) ("ball"), or
    δ <- eps * (δ + step_size * g) / ||δ + step_size * g|| per token ("token")."""
    if options.projection == "token":
        def rescaled(d, g):
            moved = d + options.step_size * g
            return options.eps * moved / _safe(token_norms(moved, options.norm))

        return jax.tree.map(rescaled, delta, grad)
    direction = _times(grad, 1.0 / _safe(example_norms(grad, options.norm)))
    delta = jax.tree.map(lambda d, g: d + options.step_size * g, delta, direction)
    if options.norm == "inf":
        return jax.tree.map(lambda d: jnp.clip(d, -options.eps, options.eps), delta)
    n = example_norms(delta, "l2")
    return _times(delta, jnp.minimum(1.0, options.eps / _safe(n)))


def initial_noise(embeds, key: jax.Array, std: float):
    """Gaussian noise of `std`, float32, one array per array of `embeds`."""
    keys = jax.random.split(key, len(embeds))
    return tuple(std * jax.random.normal(k, x.shape, jnp.float32)
                 for k, x in zip(keys, embeds, strict=True))


def perturbation(divergence_of, embeds, key: jax.Array, options: SmartOptions):
    """δ for `embeds` (a tuple of [batch, ...]): noise, then options.steps ascent steps
    on `divergence_of(δ)` (a scalar, the clean outputs held fixed). No gradient flows
    out of δ."""
    delta = initial_noise(embeds, key, options.noise)
    for _ in range(options.steps):
        delta = ascent_step(delta, jax.grad(divergence_of)(delta), options)
    return jax.tree.map(jax.lax.stop_gradient, delta)


def regularised_loss(model, params, batch, task, key: jax.Array,
                     options: SmartOptions, anchor=None) -> jax.Array:
    """The task loss plus the SMART terms (module docstring) of one batch.

    model: a MultiTaskModel; task: a name, or a traced index (the divergence of the
    task's kind is then chosen by `heads.by_task`); key: the dropout key of every
    forward pass (the noise's key is derived from it); anchor: the EMA params, needed
    when bregman_weight > 0.
    """
    specs, sg = model.tasks, jax.lax.stop_gradient

    def run(p, embeds=None):
        return model.apply({"params": p}, batch, task, deterministic=False,
                           rngs={"dropout": key}, inputs_embeds=embeds)

    def task_divergence(p, q, mask):
        def one(spec, p, q, mask):
            if not heads.is_static(task):
                p, q = (heads.unpad(spec.kind, spec.num_labels, x) for x in (p, q))
            return divergence(spec.kind, p, q, mask)

        return heads.by_task(specs, task, one, p, q, mask)

    embeds = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": key},
                         method="embed")
    outputs = run(params, embeds)
    mask = batch["mask"]
    total = heads.task_loss(specs, task, outputs, batch["labels"], mask)
    if options.weight > 0:
        fixed_params, fixed_embeds, fixed_outputs = sg(params), sg(embeds), sg(outputs)

        def divergence_of(delta):
            moved = run(fixed_params, jax.tree.map(jnp.add, fixed_embeds, delta))
            return task_divergence(fixed_outputs, moved, mask)

        delta = perturbation(divergence_of, fixed_embeds,
                             jax.random.fold_in(key, _NOISE_STREAM), options)
        adversarial = run(params, jax.tree.map(jnp.add, embeds, delta))
        total = total + options.weight * task_divergence(outputs, adversarial, mask)
    if options.bregman_weight > 0:
        if anchor is None:
            raise ValueError("train.smart_bregman_weight > 0 needs the EMA params "
                             "(train.ema_decay > 0)")
        total = total + options.bregman_weight * task_divergence(outputs, sg(run(anchor)), mask)
    return total

"""The two sides of a step benchmark: flaxpals' steps as the trainer builds them, and
the PyTorch reference doing the same work; synthetic batches for both.

    side = FlaxSide(bench_config(args))             # model, optimisers, jitted steps
    call, lower_s, compile_s, memory = side.compile("train/sst", batch)
    call()                                           # one step, blocking

Used by `benchmarks.bench_steps` (against PyTorch), `bench_pcgrad` (combiners against
the plain sum) and `bench_cores`. `args` is `bench_steps.parse_args`' namespace. JAX
and torch are imported inside, after `bench_steps.configure_process` has set threads.
"""

from __future__ import annotations

import time


def synthetic_batch(spec, pair_encoding: str, batch: int, length: int, vocab: int,
                    rng) -> dict:
    """A NumPy batch of `spec`'s task at padded length `length`: random token ids, each
    row with a random real length in [length/2, length] (attention masked after it)."""
    import numpy as np

    def sequences(two_segments: bool):
        ids = rng.integers(1000, vocab, size=(batch, length)).astype(np.int32)
        real = rng.integers(length // 2, length + 1, size=batch)
        real[0] = length
        pos = np.arange(length)[None, :]
        mask = (pos < real[:, None]).astype(np.int32)
        ids[:, 0] = 101
        ids[np.arange(batch), real - 1] = 102
        ids[mask == 0] = 0
        types = np.zeros_like(ids)
        if two_segments:  # [CLS] a [SEP] b [SEP]: the second half of the real tokens is b
            types = ((pos >= (real[:, None] // 2)) & (mask == 1)).astype(np.int32)
        return ids, mask, types

    out = {}
    pair = spec.kind != "classification"
    ids, mask, types = sequences(pair and pair_encoding == "cross")
    out.update(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if pair and pair_encoding == "bi":
        ids, mask, types = sequences(False)
        out.update(input_ids_2=ids, attention_mask_2=mask, token_type_ids_2=types)
    if spec.kind == "pair_regression":
        out["labels"] = rng.uniform(0, 5, size=batch).astype(np.float32)
    else:
        out["labels"] = rng.integers(0, max(spec.num_labels, 2), size=batch).astype(np.int32)
    out["mask"] = np.ones(batch, np.float32)
    return out


def bench_config(args):
    from flaxpals import config_lib

    c = config_lib.base()
    c.tasks = tuple(args.tasks)
    c.model.encoder = args.checkpoint
    c.model.dtype = args.dtype
    c.model.pooling = args.pooling
    c.model.pair_encoding = args.pair_encoding
    c.model.similarity = args.similarity
    if args.no_dropout:
        c.model.hidden_dropout = 0.0
        c.model.head_dropout = 0.0
    c.train.batch_size = args.batch
    c.eval.batch_size = args.eval_batch
    config_lib.validate(c)
    return c


def families() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the combiners beside sum and PCGrad, the loss weightings): FlaxSide's families
    beyond sum, pcgrad and stacked_sum. (Imports JAX: call after configure_process.)"""
    from flaxpals import config_lib

    return (tuple(n for n in config_lib.COMBINERS if n not in ("sum", "pcgrad")),
            config_lib.LOSS_WEIGHTINGS[1:])


def _stacked_sum():
    """PCGrad's step without the projection: per-task gradients stacked, then summed over
    the task axis (`pcgrad.sum_combine`)."""
    import optax

    from flaxpals.mtl import pcgrad

    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (pcgrad.sum_combine(updates), state))


class FlaxSide:
    """flaxpals' model, jitted steps and train states, as the trainer builds them.

    A "family" is one optimiser and its train state: "sum" (the plain optimiser:
    train_step, additive_step summing the per-task gradients, predict_step), "pcgrad"
    (combiner pcgrad.pcgrad, per-task gradients stacked) and, for
    benchmarks/bench_pcgrad.py, "stacked_sum" (per-task gradients stacked, then
    summed: PCGrad's step without the projection), and one per
    other combiner and loss weighting (`families()`), each as the trainer
    builds it from the config (`combiners.from_config`), on stacked gradients.
    """

    def __init__(self, config, num_steps: int = 1000, share_task_grads: bool = False):
        """share_task_grads: compile each task's gradient program once for all families
        (it reads no optimiser state, so it is the same program), as the trainer's
        persistent cache would; a family's compile time then counts it only if that
        family compiled it first."""
        import jax

        from flaxpals.model import build
        from flaxpals.mtl import combiners, pcgrad, task_params
        from flaxpals.train.steps import Steps

        self.jax, self.config, self.num_steps = jax, config, num_steps
        self.model, self.params, self.tokenizer, self.tasks = build.build_model(config)
        self.specs = {s.name: s for s in self.model.tasks}
        shared = task_params.shared_param_mask(self.params, tuple(self.specs))
        self._combiners = {"sum": None, "pcgrad": pcgrad.pcgrad(shared, seed=config.seed,
                                                                num_tasks=len(self.specs)),
                           "stacked_sum": _stacked_sum()}
        combiner_names, weighting_names = families()
        for family in combiner_names + weighting_names:
            cfg = config.train.copy_and_resolve_references()
            cfg.method = "additive"  # the method whose combiner is train.combiner
            cfg["loss_weighting" if family in weighting_names else "combiner"] = family
            self._combiners[family] = combiners.from_config(cfg, shared, len(self.specs),
                                                            config.seed)
        self._families, self.states = {}, {}
        self._shared_grads = {} if share_task_grads else None
        tx = self._tx("sum")
        self.train_step, additive, self.predict_step = Steps(self.model, tx).jitted()
        self._families["sum"] = (tx, additive)

    def _tx(self, family):
        from flaxpals.train import optim

        return optim.make_optimizer(self.config.train, self.params, self.num_steps,
                                    self._combiners[family])

    def state(self, family: str):
        """The family's train state, made on first use (params copied from the initial ones)."""
        import jax
        import jax.numpy as jnp

        from flaxpals.train.steps import Steps, TrainState

        if family not in self._families:
            tx = self._tx(family)
            self._families[family] = (tx, Steps(self.model, tx, stacked=True).jitted()[1])
        if family not in self.states:
            tx = self._families[family][0]
            p = jax.tree.map(jnp.asarray, self.params)
            self.states[family] = TrainState(
                step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                rng=jax.random.key_data(jax.random.key(self.config.seed + 1)))
        return self.states[family]

    def compile(self, name: str, batch):
        """(call, lower_s, compile_s, memory) of a workload; call() runs one step, blocking.

        name: train/<task> | predict/<task> (family "sum") | additive ("sum") |
        pcgrad | stacked_sum | one of `families()`. batch: a NumPy batch, or
        task -> batch for the additive kinds.
        """
        jax = self.jax
        dev = jax.device_put
        kind, _, task = name.partition("/")
        family = "sum" if kind in ("train", "predict", "additive") else kind
        self.state(family)
        if kind not in ("train", "predict"):
            return self._compile_additive(family, {t: dev(b) for t, b in batch.items()})
        # The task as data, as the trainer passes it (a traced index).
        index = self.jax.numpy.int32(self.model.task_index(task))
        fn = self.train_step if kind == "train" else self.predict_step
        args = (dev(batch), index)
        first = self.states[family].params if kind == "predict" else self.states[family]
        t0 = time.perf_counter()
        lowered = fn.lower(first, *args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()

        def call():
            if kind == "predict":
                jax.block_until_ready(compiled(self.states[family].params, *args))
            else:
                state, metrics = compiled(self.states[family], *args)
                self.states[family] = state
                jax.block_until_ready((state, metrics))

        return call, t1 - t0, t2 - t1, memory_of(compiled)

    def _compile_additive(self, family: str, batches: dict):
        """compile() for the additive kinds: the trainer's parts (steps.Steps.jitted),
        task_grads once per task and apply_combined once; times summed over the
        parts, memory summed field by field (an upper bound: the parts run one
        after another, and only the gradients outlive their part)."""
        from flaxpals.train.steps import additive_from_parts, for_gradients

        jax = self.jax
        grads_fn, apply_fn = self._families[family][1].parts
        state = self.states[family]
        lower_s = compile_s = 0.0
        compiled_grads, out_info = {}, {}
        for t, b in batches.items():
            key = (t, tuple((k, v.shape, str(v.dtype)) for k, v in sorted(b.items())))
            if self._shared_grads is not None and key in self._shared_grads:
                compiled_grads[t], out_info[t] = self._shared_grads[key]
                continue
            t0 = time.perf_counter()
            lowered = grads_fn.lower(for_gradients(state), b,
                                     self.jax.numpy.int32(self.model.task_index(t)))
            t1 = time.perf_counter()
            compiled_grads[t] = lowered.compile()
            lower_s, compile_s = lower_s + t1 - t0, compile_s + time.perf_counter() - t1
            out_info[t] = lowered.out_info
            if self._shared_grads is not None:
                self._shared_grads[key] = compiled_grads[t], out_info[t]
        t0 = time.perf_counter()
        lowered = apply_fn.lower(state, {t: o[0] for t, o in out_info.items()},
                                 {t: o[1] for t, o in out_info.items()})
        t1 = time.perf_counter()
        compiled_apply = lowered.compile()
        lower_s, compile_s = lower_s + t1 - t0, compile_s + time.perf_counter() - t1

        def call():  # the trainer's composition, on the compiled parts
            state, metrics = additive_from_parts(
                lambda s, b, t: compiled_grads[t](s, b, self.jax.numpy.int32(
                    self.model.task_index(t))), compiled_apply, tuple(batches),
                self.states[family], batches, lambda t: t)
            self.states[family] = state
            jax.block_until_ready((state, metrics))

        parts = [memory_of(c) for c in (*compiled_grads.values(), compiled_apply)]
        memory = None if None in parts else {k: sum(m[k] for m in parts) for k in parts[0]}
        return call, lower_s, compile_s, memory

    def drop(self, family: str) -> None:
        """Frees a family's train state (params and optimiser moments)."""
        self.states.pop(family, None)


def memory_of(compiled) -> dict | None:
    """The compiled executable's memory analysis in bytes (None where unavailable)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if ma is None:
        return None
    out = {k: int(getattr(ma, f"{k}_size_in_bytes", 0))
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


class TorchSide:
    def __init__(self, flax: FlaxSide, config, args, num_steps: int = 1000):
        import transformers

        from benchmarks import torch_reference as bench_torch
        from flaxpals.model import hf_checkpoint

        transformers.logging.set_verbosity_error()
        pretrained = (hf_checkpoint.resolve_checkpoint(args.checkpoint)
                      if args.checkpoint != "tiny" else None)
        import jax
        import torch

        device = args.torch_device
        if device == "auto":
            device = ("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available()
                      else "cpu")
        self.device = device
        self.model = bench_torch.build_model(flax.model, flax.params, pretrained,
                                             args.torch_attn, device)
        self.steps = bench_torch.TorchSteps(self.model, config.train, num_steps, args.dtype,
                                            args.torch_optimizer, seed=config.seed)
        self.to_torch = lambda batch: bench_torch.to_torch(batch, device)

    def prepare(self, name: str, batch):
        kind, _, task = name.partition("/")
        s = self.steps
        if kind == "train":
            b = self.to_torch(batch)
            return lambda: s.train_step(b, task)
        if kind in ("additive", "pcgrad"):
            bs = {t: self.to_torch(x) for t, x in batch.items()}
            return (lambda: s.additive_step(bs)) if kind == "additive" else \
                (lambda: s.pcgrad_step(bs))
        b = self.to_torch(batch)
        return lambda: s.predict_step(b, task)

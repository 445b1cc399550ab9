"""Training and evaluation: `train_and_evaluate(config, workdir)`, read top to bottom.

1. Load the encoder and tokenizer; build tasks, data, model, params.
2. Build the sampler, the optimiser and the jitted steps; resume from the
   latest checkpoint in the workdir if there is one.
3. Loop: the sampler picks the task(s) of each step; a NaN or Inf loss stops
   the run (the last checkpoint stays the last good one); every N steps and at
   each epoch's end a checkpoint; at each epoch's end an evaluation on dev and
   on a fixed train sample, written to TensorBoard and metrics.jsonl, and the
   best checkpoint by `config.eval.best_metric`.

A run killed or stopped mid-epoch resumes from its latest checkpoint, which
also holds the epoch's running loss sums, so the epoch's line is what an
uninterrupted run writes. `flaxpals/serve/restore.py` restores a run for eval, predict and export.

Every device of every process takes part (parallel.py): the state lives on a
('data',) mesh, every process plans the same global batches of every task and
reads its batch_size / process_count rows of each (batching.py), and the rows of
all processes form one global batch. Only process 0 writes config, metrics,
best.json and prediction files; all processes write and restore the orbax
checkpoints. The workdir may be a
local path or, for a multi-host job, shared storage such as gs://bucket/run.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from flaxpals import config_lib, workdir_format
from flaxpals.data import batching, input_pipeline
from flaxpals.model import build
from flaxpals.mtl import core, task_params
from flaxpals.mtl import sampler as sampler_lib
from flaxpals.train import compilation, optim, parallel, preflight, workdir_lock
from flaxpals.train import smart as smart_lib
from flaxpals.train.checkpointing import RESUME_HINT, CheckpointMismatchError, Checkpoints
from flaxpals.train.evaluate import EvalSets, eval_record, record_splits, split_limit
from flaxpals.train.preemption import Stopper
from flaxpals.train.programs import Programs, train_shapes
from flaxpals.train.steps import Steps, TrainState, device_batch
from flaxpals.train.summary_writer import SummaryWriter
from flaxpals.train.timing import RunTimer

log = logging.getLogger(__name__)

# The key, in a checkpoint's sampler JSON, of the shape policy and compute dtype in force.
RESOLVED_KEY = "resolved"


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, ...)."""


# ---------------------------------------------------------------- training


class LossSums:
    """Running sums of an epoch's train losses and combiner statistics (core.step_stats):
    {"loss/<task>": [sum, count], "coef/<task>": ...}.

    Saved with the sampler state in every checkpoint, so an epoch resumed after
    a kill logs the mean over all its steps, not only those after the restore.
    """

    KEY = "epoch_losses"  # the key in the checkpoint's sampler JSON

    def __init__(self, sums: dict | None = None):
        self.sums = {k: [float(v[0]), int(v[1])] for k, v in (sums or {}).items()}

    def add(self, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            total = self.sums.setdefault(k, [0.0, 0])
            total[0] += v
            total[1] += 1

    def means(self) -> dict[str, float]:
        return {k: total / count for k, (total, count) in self.sums.items() if count}


def _save_config(workdir: epath.Path, config) -> None:
    """Writes config.json; a run resumed with another model stops here, and a changed
    training config keeps the earlier file as config.<n>.json. A workdir without a
    checkpoint has no model to protect: any config may replace its config.json."""
    # Decided by process 0 before it writes, and read by all before it moves the file: a
    # process looking on its own could find process 0's file half-written.
    if parallel.host0_decides(workdir_format.has_run(workdir)):
        saved = workdir_format.read_config(workdir)
        if parallel.host0_decides(workdir_format.has_checkpoints(workdir)):
            workdir_format.check_same_model(saved, config, str(workdir / "config.json"),
                                        workdir_format.TRAIN_FIX)
        parallel.barrier("flaxpals-config-read")
        if saved.to_dict() != config.to_dict() and workdir_format.is_host0():
            n = len(list(workdir.glob("config.*.json"))) + 1
            (workdir / "config.json").rename(workdir / f"config.{n}.json")
            log.info("the config differs from the saved run's: the earlier one is now "
                     "config.%d.json", n)
    workdir_format.write_config(workdir, config)


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains per `config`, writing checkpoints, metrics and logs under `workdir`.

    SIGTERM, SIGHUP, SIGINT or `config.train.time_budget` stop it after the steps in flight
    (at most AHEAD + 1) with a checkpoint of the last: it raises `preemption.Stopped`
    (flaxpals/train/preemption.py)."""
    config_lib.validate(config)
    try:  # encoder and data files: nothing is written before they exist
        preflight.check(config)
    except Exception as e:  # noqa: BLE001 -- on every process, so none waits for the rest
        parallel.raise_together(e)
    parallel.raise_together(None)
    compilation.enable_cache(config)
    with workdir_lock.hold(workdir), Stopper(config.train.time_budget) as stop:
        workdir_format.repair_records(workdir)  # a metrics line cut short by a kill
        return _train(config, workdir, stop)


def _train(config, workdir: str | os.PathLike, stop: Stopper) -> dict[str, float]:
    timer = RunTimer(compilation.STATS)
    mesh = parallel.make_mesh()
    batch_size = parallel.process_batch_size(config.train.batch_size, mesh, "train.batch_size")
    parallel.process_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _save_config(workdir, config)
    writer = SummaryWriter(workdir / "tensorboard", enabled=workdir_format.is_host0())

    model, params, tokenizer, tasks = build.build_model(config)
    names = tuple(t.name for t in tasks)
    accounting = task_params.param_accounting(params, names)
    workdir_format.write_json(workdir / "params.json", accounting)
    log.info("%s", task_params.format_accounting(accounting))
    policy, lengths = config_lib.shape_policy(config.data), config_lib.padded_lengths(config.data)
    log.info("shapes: %s (padded lengths %s); compute dtype %s, params float32", policy,
             ", ".join(map(str, lengths)), model.options.dtype)

    data = build.load_data(config, tasks, tokenizer)
    eval_sets = EvalSets(data, config, mesh)
    processes = jax.process_count()
    sizes = {}
    for t in tasks:
        n = input_pipeline.batches_per_epoch(data[t.name]["train"], batch_size,
                                             process_count=processes)
        if n == 0:
            raise config_lib.ConfigError(
                f"task {t.name}: {len(data[t.name]['train'])} training examples make no "
                f"full batch of train.batch_size={config.train.batch_size} "
                f"({processes} process(es))")
        sizes[t.name] = n
    sampler = sampler_lib.TaskSampler(
        config_lib.task_schedule(config.train), sizes, num_epochs=config.train.num_epochs,
        steps_per_epoch=None if config.train.steps_per_epoch < 0 else config.train.steps_per_epoch,
        temperature=config.train.temperature, seed=config.seed)

    from flaxpals.mtl import combiners

    # None for the plain sum: the additive step sums the gradients itself.
    combiner = combiners.from_config(config.train, task_params.shared_param_mask(params, names),
                                     len(names), config.seed)
    tx = optim.make_optimizer(config.train, params, sampler.total_steps, combiner)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(config.seed + 1)))
    state_sharding = parallel.state_shardings(state, mesh, config.parallel.fsdp)
    state = parallel.put(state, state_sharding)
    log.info("%s", parallel.describe(state, state_sharding, mesh))
    steps = Steps(model, tx, combiner is not None, smart_lib.from_config(config.train))
    programs = Programs(steps, mesh, state_sharding, fixed_shapes=policy != "buckets",
                        symbolic_length=config.symbolic_length)

    ckpts = Checkpoints(workdir, config.checkpoint.keep, workdir_format.fingerprint(config),
                        for_training=True)
    restored = ckpts.restore_latest(state)
    loss_sums = LossSums()
    if restored is not None:
        step0, state, sampler_state = restored
        loss_sums = LossSums(sampler_state.pop(LossSums.KEY, None))
        resolved = sampler_state.pop(RESOLVED_KEY, None)
        if resolved is not None and resolved != {"shapes": policy, "dtype": model.options.dtype}:
            log.warning("resuming with shapes %s and compute dtype %s where the checkpoint's "
                        "run had %s (data.shapes / model.dtype auto resolve per platform): the "
                        "batches and numerics from here on differ from an uninterrupted run's",
                        policy, model.options.dtype, resolved)
        try:
            sampler.load_state_dict(sampler_state)
        except ValueError as e:  # another epoch count, batch size, seed or method
            raise CheckpointMismatchError(f"checkpoint {workdir}/checkpoints/{step0}: {e}; "
                                          f"{RESUME_HINT}") from None
        log.info("resumed from checkpoint step %d (epoch %d)", step0, sampler.epoch)
    plans = {t: batching.TrainPlan(data[t]["train"].lengths(), lengths, batch_size,
                                   seed=config.seed + i, process_index=jax.process_index(),
                                   process_count=processes)
             for i, t in enumerate(names)}

    def to_device(batch):  # on the batch threads: each step's batches wait on the devices
        return parallel.global_batch(device_batch(batch), mesh)

    packing = None
    if policy == "packed":  # rows enough for every batch the run can draw, every task's
        (length,) = lengths
        rows = max(input_pipeline.packed_rows(
            data[t]["train"], plans[t], -(-sampler.total_steps // plans[t].batches_per_epoch),
            length, jax.local_device_count()) for t in names)
        packing = input_pipeline.Packing(length, rows, jax.local_device_count())
        log.info("packed: %d rows of %d tokens per device hold its %d examples", rows, length,
                 batch_size // packing.groups)
    iters = {t: input_pipeline.planned_batches(data[t]["train"], plans[t],
                                               start_batch=sampler.positions[t],
                                               to_device=to_device, packing=packing)
             for t in names}

    best = ckpts.best_score(config.eval.best_metric)  # what best/ holds, not best.json
    history = []

    def progress() -> dict:
        """What a checkpoint keeps beside the arrays: the sampler, the loss sums, and the
        shape policy and compute dtype the run resolved."""
        return {**sampler.state_dict(), LossSums.KEY: loss_sums.sums,
                RESOLVED_KEY: {"shapes": policy, "dtype": model.options.dtype}}

    def finish_epoch(epoch: int, step: int, losses: LossSums) -> None:
        """Evaluates, writes the epoch's metrics line, and keeps the best checkpoint."""
        nonlocal best
        record = {"epoch": epoch, "step": step, **losses.means()}
        kept = {}  # tag -> split -> task -> outputs: the best's go to best-outputs.npz
        with timer.evaluating():
            for tag, evaluated in optim.eval_weights(state.params, state.opt_state,
                                                     config.eval.use_ema).items():
                record.update(eval_record(programs.predict, evaluated, eval_sets, tasks,
                                          config, record_splits(config, tag),
                                          kept.setdefault(tag, {})))
        history.append(record)
        compiled = compilation.STATS.since(timer.compiled_at_start)
        writer.write_scalars(step, {**{k: v for k, v in record.items() if "/" in k},
                                    "compile/programs": compiled.programs,
                                    "compile/seconds": compiled.seconds,
                                    "compile/cache_hits": compiled.cache_hits})
        workdir_format.append_metrics(workdir, record)
        bar.clear()  # the message goes above the progress bar, not into it
        log.info("epoch %d: %s", epoch, "  ".join(
            f"{k} {v:.4f}" for k, v in record.items() if k.startswith("dev/")))
        bar.refresh()
        score = record.get(config.eval.best_metric)
        if score is None:
            raise ValueError(f"config.eval.best_metric={config.eval.best_metric!r} is not "
                             f"among the eval metrics {sorted(record)}")
        if best is None or score > best:
            best = score
            scored = optim.scored_weights(state.params, state.opt_state, config.eval.best_metric)
            ckpts.save_best(step, state.replace(params=scored), progress(), score,
                            config.eval.best_metric)
            workdir_format.write_outputs(workdir, step, config.eval.best_metric, config,
                               kept[optim.scored_tag(config.eval.best_metric)])

    bar = tqdm(total=sampler.total_steps, initial=sampler.step, desc="train", unit="step",
               disable=not workdir_format.is_host0(), dynamic_ncols=True)
    # A run killed between an epoch's last checkpoint and its metrics line
    # resumes exactly at that epoch's end: evaluate it now so no epoch goes
    # missing (its loss sums came with the checkpoint).
    at_epoch_end = sampler.step > 0 and sampler.step % sampler.steps_per_epoch == 0
    logged = {r["step"] for r in workdir_format.read_metrics(workdir)}
    if at_epoch_end and parallel.host0_decides(sampler.step not in logged):
        log.info("epoch %d ended before its evaluation was written: evaluating it now",
                 sampler.step // sampler.steps_per_epoch)
        with sync_point():
            finish_epoch(sampler.step // sampler.steps_per_epoch, sampler.step, loss_sums)
    if at_epoch_end:
        loss_sums = LossSums()

    window = Window()  # the steps whose metrics are still on the device
    stop.install(lambda: ckpts.slowest_save)

    def write_timings() -> None:
        record = timer.record()
        workdir_format.append_timings(workdir, record)
        log.info(RunTimer.summary(record))

    def flush(step: int) -> None:
        """Fetches the window's metrics: stops at a non-finite loss or gradient (whose update
        would have left the params non-finite), naming the window; adds them to the epoch's
        sums and writes their means to TensorBoard."""
        fetched = window.fetch()
        if not fetched:
            return
        seconds = timer.steps_done(len(fetched))
        first, last = fetched[0][0], fetched[-1][0]
        for at, losses, other in fetched:
            bad = [k.split("/", 1)[1] for k, v in losses.items() if not np.isfinite(v)]
            if not bad and not np.isfinite(other["grad_norm"]):
                bad = [k.split("/", 1)[1] for k in losses]  # the step's tasks
            if bad:
                ckpts.wait()
                raise TrainingError(
                    f"non-finite loss or gradient in steps {first}-{last} (first at step "
                    f"{at}, epoch {(at - 1) // sampler.steps_per_epoch + 1}) for task(s) "
                    f"{', '.join(bad)}: {losses}, grad_norm {other['grad_norm']}; the newest "
                    "checkpoint in "
                    f"{workdir / 'checkpoints'} (step {ckpts.latest.latest_step()}) is the "
                    "last good state")
        for _, losses, stats in fetched:
            # The combiner's statistics (core.step_stats) are averaged like the losses.
            loss_sums.add({**losses, **{k: v for k, v in stats.items()
                                        if k.startswith(core.STAT_PREFIXES)}})
        means = Window.means(fetched)
        bar.set_postfix({k.split("/", 1)[1]: f"{v:.3f}" for k, v in means.items()
                         if k.startswith("loss/")}, refresh=False)
        if workdir_format.is_host0():
            rate = {"steps_per_second": len(fetched) / seconds} if seconds > 0 else {}
            writer.write_scalars(step, {**means, **rate})

    timer.loop_started()
    first_step = None
    try:
        while not sampler.done:
            epoch = sampler.epoch
            chosen = sampler.next()
            state, step_metrics = programs.train(state, {t: next(iters[t]) for t in chosen})
            step = sampler.step
            window.add(step, step_metrics)
            window.wait_behind(AHEAD)
            bar.update(1)
            if first_step is None:  # after the first step: compile the rest meanwhile
                first_step = step
                if config.compile_ahead:
                    programs.compile_ahead(
                        state, [] if packing else train_shapes(plans, sampler.positions),
                        config.train.batch_size,
                        [(t, n) for t in names for split, _ in record_splits(config)
                         for n in eval_sets.lengths(t, split, split_limit(config, split))],
                        config.eval.batch_size,
                        additive=config_lib.task_schedule(config.train) == "additive")
            epoch_end = sampler.done or sampler.epoch != epoch
            # Waits for the device only here: the first step, every log_every_steps, and
            # the checkpoints (whose state must have finite losses).
            sync = (step == first_step or step % config.log_every_steps == 0 or epoch_end
                    or step % config.checkpoint.every_steps == 0)
            # A signal or the time budget; on several processes a collective, so all
            # agree: made at the waits only.
            stopping = stop.check(step) if sync or processes == 1 else False
            if sync or stopping:
                with sync_point():
                    flush(step)
                    if step % config.checkpoint.every_steps == 0 or epoch_end or stopping:
                        ckpts.save(step, state, progress(), force=epoch_end or stopping)
            if stopping:  # this step is being saved: write it and go
                bar.close()
                programs.close()  # its compile in flight counts in the timings
                write_timings()
                raise stop.stopped(step, ckpts)
            if epoch_end:
                with sync_point():
                    finish_epoch(epoch, step, loss_sums)
                loss_sums = LossSums()
    finally:  # a compile still running when the process exits aborts it
        # Closed here, however the loop ends: a bar closed at exit would print after
        # the error line.
        bar.close()
        programs.close()
        writer.close()  # however the loop ends: a stop or an error keeps the events too
    ckpts.wait()
    ckpts.close()
    write_timings()
    return history[-1] if history else {}


def sync_point():
    """Where the loop may read the device (metrics, checkpoints, evaluation). On an
    accelerator, a run under `jax.transfer_guard_device_to_host("disallow_explicit")`
    stops at any read elsewhere; tests/test_train_e2e.py counts the reads on a CPU."""
    return jax.transfer_guard_device_to_host("allow")


# Steps the host may dispatch ahead of the device: enough to keep it busy, few enough that
# a stop (which saves the state after them) and the batches held wait for little.
AHEAD = 2


class Window:
    """The metrics of the steps since the last fetch, left on the device until `fetch`."""

    def __init__(self):
        self._steps: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        self._steps.append((step, metrics))

    def wait_behind(self, ahead: int) -> None:
        """Waits until the step `ahead` steps before the newest has run on the device (no
        transfer: its metrics stay there), so the host runs at most that far ahead."""
        if len(self._steps) > ahead:
            jax.block_until_ready(self._steps[-1 - ahead][1])

    def fetch(self) -> list[tuple[int, dict[str, float], dict[str, float]]]:
        """[(step, {loss/<task>: value}, {other metric: value})] of every step held, in
        order, fetched in one transfer; the window is then empty."""
        held, self._steps = self._steps, []
        values = jax.device_get([m for _, m in held])
        out = []
        for (step, _), m in zip(held, values, strict=True):
            m = {k: float(v) for k, v in m.items()}
            out.append((step, {k: v for k, v in m.items() if k.startswith("loss/")},
                        {k: v for k, v in m.items() if not k.startswith("loss/")}))
        return out

    @staticmethod
    def means(fetched) -> dict[str, float]:
        """Each metric's mean over the steps that have it."""
        sums = LossSums()
        for _, losses, other in fetched:
            sums.add({**losses, **other})
        return sums.means()

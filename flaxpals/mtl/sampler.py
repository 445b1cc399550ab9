"""Which task(s) each training step trains on (host side, identical on every host).

    sampler = TaskSampler("annealed", {"sst": 267, "quora": 506, "sts": 188}, num_epochs=3)
    for names in sampler:              # ("quora",), ("sst",), ... ; all names for "additive"
        for name in names:
            batch = next(iterators[name])

task_sizes: the number of TRAIN BATCHES per epoch of each task, in task order
(`input_pipeline.batches_per_epoch`). N_i below is task i's size, T the number
of tasks, E num_epochs, S steps_per_epoch.

Methods, and the default S of each (every method trains on sum(N_i) batches per
epoch by default, so methods compare at equal compute):

  sequential    each epoch: task 1 for n_1 steps, then task 2 for n_2, ...; with
                the default S = sum(N_i), n_i = N_i (one pass over each task);
                another S splits it in proportion to N_i (largest remainders).
  round_robin   one batch of each task in turn: task (step mod T), across epochs.
                Default S = sum(N_i).
  additive      every step one batch of every task (the caller sums the losses).
                Default S = ceil(sum(N_i) / T).
  proportional  draws with replacement, p_i ∝ N_i^α with α = 1;
  sqrt          α = 0.5;   uniform: α = 0;   temperature: α = 1 / temperature;
  annealed      α(e) = 1 - 0.8 (e - 1) / (E - 1) for epochs e = 1..E (1.0 at e = 1,
                0.2 at e = E; 1.0 when E = 1).
                Default S = sum(N_i) for every sampled method.

Randomness: the draws of epoch e come from numpy's PCG64 seeded with
SeedSequence([seed, e]), all of the epoch at once. So the generator's state at
any step is a function of (seed, step): `state_dict()` holds the step, the
per-task positions and the configuration, and a sampler restored from it draws
exactly what the uninterrupted one would have; every host of a multi-host job
draws the same sequence.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np

from flaxpals import config_lib

# config_lib.SAMPLING_METHODS: these, then the sampled ones.
DETERMINISTIC = ("sequential", "round_robin", "additive")
SAMPLED = config_lib.SAMPLING_METHODS[len(DETERMINISTIC):]
assert config_lib.SAMPLING_METHODS[:len(DETERMINISTIC)] == DETERMINISTIC
_FIXED_ALPHA = {"proportional": 1.0, "sqrt": 0.5, "uniform": 0.0}


def annealed_alpha(epoch: int, num_epochs: int) -> float:
    """α = 1 - 0.8 (e - 1) / (E - 1), e = 1..E (Stickland & Murray's annealed sampling)."""
    if num_epochs == 1:
        return 1.0
    return 1.0 - 0.8 * (epoch - 1) / (num_epochs - 1)


def default_steps_per_epoch(method: str, sizes) -> int:
    """The documented default S of a method (module docstring)."""
    total = int(sum(sizes))
    return math.ceil(total / len(sizes)) if method == "additive" else total


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to weights summing to total (largest remainders, ties by order)."""
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    rest = total - out.sum()
    out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return out


class TaskSampler:
    """Decides the task(s) of every step; see the module docstring."""

    def __init__(self, method: str, task_sizes: Mapping[str, int], *, num_epochs: int,
                 steps_per_epoch: int | None = None, temperature: float = 2.0, seed: int = 0):
        if method not in config_lib.SAMPLING_METHODS:
            raise ValueError(f"unknown sampling method {method!r}; known: "
                             f"{list(config_lib.SAMPLING_METHODS)}")
        if not task_sizes:
            raise ValueError("task_sizes is empty")
        for name, n in task_sizes.items():
            if int(n) != n or n < 1:
                raise ValueError(f"task {name!r}: size {n!r} is not a positive batch count")
        if int(num_epochs) != num_epochs or num_epochs < 1:
            raise ValueError(f"num_epochs must be a positive integer, got {num_epochs!r}")
        if steps_per_epoch is not None and (int(steps_per_epoch) != steps_per_epoch
                                            or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be a positive integer, got "
                             f"{steps_per_epoch!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.method = method
        self.names = tuple(task_sizes)
        self.sizes = np.asarray([int(task_sizes[n]) for n in self.names], np.int64)
        self.num_epochs = int(num_epochs)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self._steps_per_epoch = int(steps_per_epoch or
                                    default_steps_per_epoch(method, self.sizes))
        self._step = 0
        self._positions = np.zeros(len(self.names), np.int64)
        self._cache: tuple[int, np.ndarray] | None = None

    # ---------------------------------------------------------------- schedule

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self._steps_per_epoch * self.num_epochs

    @property
    def step(self) -> int:
        """Steps drawn so far (the 0-based number of the next step)."""
        return self._step

    @property
    def epoch(self) -> int:
        """1-based epoch of the next step (num_epochs once done)."""
        return min(self._step // self._steps_per_epoch + 1, self.num_epochs)

    @property
    def done(self) -> bool:
        return self._step >= self.total_steps

    @property
    def positions(self) -> dict[str, int]:
        """Batches drawn so far per task: the `start_batch` of its train iterator."""
        return {n: int(p) for n, p in zip(self.names, self._positions, strict=True)}

    def alpha(self, epoch: int) -> float:
        """The exponent α of p_i ∝ N_i^α in `epoch` (sampled methods only)."""
        self._check_epoch(epoch)
        if self.method in _FIXED_ALPHA:
            return _FIXED_ALPHA[self.method]
        if self.method == "temperature":
            return 1.0 / self.temperature
        if self.method == "annealed":
            return annealed_alpha(epoch, self.num_epochs)
        raise ValueError(f"method {self.method!r} does not sample: no alpha")

    def probabilities(self, epoch: int) -> dict[str, float]:
        """Sampled methods: p_i ∝ N_i^α. Others: each task's share of the epoch's steps
        (sequential, round_robin), or 1.0 for every task (additive: all, every step)."""
        self._check_epoch(epoch)
        if self.method in SAMPLED:
            w = self.sizes.astype(np.float64) ** self.alpha(epoch)
            p = w / w.sum()
        elif self.method == "additive":
            p = np.ones(len(self.names))
        else:
            p = self._counts(epoch) / self._steps_per_epoch
        return {n: float(x) for n, x in zip(self.names, p, strict=True)}

    def _check_epoch(self, epoch: int) -> None:
        if not 1 <= epoch <= self.num_epochs:
            raise ValueError(f"epoch {epoch} is not in 1..{self.num_epochs}")

    def schedule(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch] task index of each step of `epoch` (-1: all tasks, additive)."""
        self._check_epoch(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        s, t = self._steps_per_epoch, len(self.names)
        if self.method == "sequential":
            out = np.repeat(np.arange(t), _apportion(s, self.sizes.astype(np.float64)))
        elif self.method == "round_robin":
            out = (np.arange(s) + (epoch - 1) * s) % t
        elif self.method == "additive":
            out = np.full(s, -1)
        else:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                [self.seed, epoch])))
            p = np.asarray(list(self.probabilities(epoch).values()))
            out = rng.choice(t, size=s, replace=True, p=p)
        out = out.astype(np.int64)
        self._cache = (epoch, out)
        return out

    def _counts(self, epoch: int, upto: int | None = None) -> np.ndarray:
        """Steps per task in the first `upto` steps of `epoch` (all tasks count for -1)."""
        sched = self.schedule(epoch)[:upto]
        if self.method == "additive":
            return np.full(len(self.names), len(sched), np.int64)
        return np.bincount(sched, minlength=len(self.names)).astype(np.int64)

    # ---------------------------------------------------------------- drawing

    def next(self) -> tuple[str, ...]:
        """The task name(s) of the next step; StopIteration once total_steps are drawn."""
        if self.done:
            raise StopIteration
        e, i = divmod(self._step, self._steps_per_epoch)
        k = int(self.schedule(e + 1)[i])
        self._step += 1
        if k < 0:
            self._positions += 1
            return self.names
        self._positions[k] += 1
        return (self.names[k],)

    __next__ = next

    def __iter__(self):
        return self

    # ---------------------------------------------------------------- state

    def _config_hash(self) -> int:
        text = "\0".join((self.method, *self.names))
        return zlib.crc32(text.encode())

    def state_dict(self) -> dict:
        """Plain ints, floats and lists of ints: JSON- and orbax-savable."""
        return {"step": self._step, "epoch": self.epoch,
                "positions": [int(p) for p in self._positions],
                "seed": self.seed, "task_sizes": [int(n) for n in self.sizes],
                "num_epochs": self.num_epochs, "steps_per_epoch": self._steps_per_epoch,
                "temperature": self.temperature, "config_hash": self._config_hash()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restores a state_dict() of a sampler with the same configuration."""
        mine = self.state_dict()
        for key in ("config_hash", "seed", "task_sizes", "num_epochs", "steps_per_epoch",
                    "temperature"):
            theirs = state[key]
            if isinstance(mine[key], list):
                theirs = [int(x) for x in np.asarray(theirs).ravel()]
            elif isinstance(mine[key], int):
                theirs = int(theirs)
            else:
                theirs = float(theirs)
            if theirs != mine[key]:
                what = "method or task names" if key == "config_hash" else key
                raise ValueError(f"sampler state was saved with another {what}: "
                                 f"{theirs!r} there, {mine[key]!r} here")
        step = int(state["step"])
        if not 0 <= step <= self.total_steps:
            raise ValueError(f"sampler state step {step} is not in 0..{self.total_steps}")
        positions = np.zeros(len(self.names), np.int64)
        full, rest = divmod(step, self._steps_per_epoch)
        for e in range(1, full + 1):
            positions += self._counts(e)
        if rest:
            positions += self._counts(full + 1, rest)
        saved = np.asarray(state["positions"], np.int64).ravel()
        if not np.array_equal(saved, positions):
            raise ValueError(f"sampler state positions {saved.tolist()} disagree with step "
                             f"{step}, which gives {positions.tolist()}")
        self._step, self._positions = step, positions

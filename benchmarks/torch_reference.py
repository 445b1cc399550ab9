"""The PyTorch reference of `benchmarks.bench_steps`: the same model, optimiser and steps.

- Encoder: `transformers.BertModel` built from flaxpals' `BertConfig.to_dict()`
  (so the same sizes, activation and dropout rates) and loaded with
  `from_pretrained` from the same weights as the Flax encoder.
- Heads, equal to `flaxpals.model.heads` and initialised with the Flax heads' weights:
  classification: dropout + linear on the sentence vector; cross-encoded pair:
  dropout + linear to one output; bi-encoded pair: the two sentences through
  the encoder in one call (concatenated, as `MultiTaskModel` does), then
  `dot` (dropout + a shared linear projection of each, their dot product) or
  `cosine` (mapped from [-1, 1] to [0, 5]). Sentence vector: the tanh pooler
  over [CLS] (`cls`) or the mean over real tokens (`mean`; then the pooler is
  not built, as XLA drops it from the Flax graph).
- Losses: cross entropy, BCE with logits, MSE, as `heads.loss_fn`.
- Optimiser: `torch.optim.AdamW` with flaxpals' hyper-parameters and decay
  mask (no decay on biases and LayerNorms), the warm-up + linear-decay
  schedule, gradient clipping by global norm.
- Steps: one task (`train_step`), the summed loss of all tasks
  (`additive_step`), PCGrad (`pcgrad_step`: one backward pass per task,
  Algorithm 1 of Yu et al. on the flattened shared gradients, as the popular
  PyTorch ports do it, but over the encoder only), inference (`predict_step`).

bfloat16: parameters stay float32 and the forward pass runs under
`torch.autocast(device, bfloat16)`, as flaxpals computes in bfloat16 with
float32 params. On "cuda" every step ends synchronised (`.item()` or
`torch.cuda.synchronize()`), so that wall-clock timing is fair.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from flaxpals import config_lib
from flaxpals.model import hf_checkpoint

_NO_DECAY = re.compile(r"(^|\.)bias$|LayerNorm")  # the HF names of what flaxpals does not decay


def hf_config(flax_config) -> transformers.BertConfig:
    """A transformers BertConfig from a flaxpals BertConfig (same sizes and dropout rates)."""
    d = {k: v for k, v in flax_config.to_dict().items() if k != "model_type"}
    return transformers.BertConfig(**d)


def head_outputs(kind: str, num_labels: int, hidden: int, pair_encoding: str,
                 similarity: str) -> int | None:
    """Output width of a task's linear head, or None for the parameter-free cosine head."""
    if kind == "classification":
        return num_labels
    if pair_encoding == "cross":
        return 1
    if kind == "pair_regression" and similarity == "cosine":
        return None
    return hidden


class TorchMultiTask(torch.nn.Module):
    """One BertModel, one head per task; `forward(batch, task)` as `MultiTaskModel.__call__`."""

    def __init__(self, encoder, specs, options):
        super().__init__()
        self.encoder = encoder
        self.specs = {s.name: s for s in specs}
        self.options = options
        self.drop = torch.nn.Dropout(options.head_dropout)
        hidden = encoder.config.hidden_size
        self.heads = torch.nn.ModuleDict()
        for s in specs:
            n = head_outputs(s.kind, s.num_labels, hidden, options.pair_encoding,
                             options.similarity)
            if n is not None:
                self.heads[s.name] = torch.nn.Linear(hidden, n)

    def load_flax_heads(self, heads: Mapping[str, Any]) -> None:
        """Copies the Flax heads' weights (kernel [in, out] -> weight [out, in])."""
        with torch.no_grad():
            for name, linear in self.heads.items():
                dense = heads[name]["dense"]
                linear.weight.copy_(torch.from_numpy(np.asarray(dense["kernel"]).T.copy()))
                linear.bias.copy_(torch.from_numpy(np.asarray(dense["bias"]).copy()))

    def encode(self, ids, mask, types):
        """[batch, length] x3 -> sentence vectors [batch, hidden]."""
        out = self.encoder(input_ids=ids, attention_mask=mask, token_type_ids=types)
        if self.options.pooling == "cls":
            return out.pooler_output
        m = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
        if "input_ids_2" not in batch:
            a = self.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            out = self.heads[task](self.drop(a)).float()
            return out[:, 0] if out.shape[-1] == 1 else out
        keys = ("input_ids", "attention_mask", "token_type_ids")
        both = [torch.cat([batch[k], batch[k + "_2"]]) for k in keys]  # same padded length
        a, b = self.encode(*both).chunk(2)
        if task not in self.heads:  # cosine
            a, b = a.float(), b.float()
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)
            return 2.5 * (cos + 1.0)
        proj = self.heads[task]
        return (proj(self.drop(a)).float() * proj(self.drop(b)).float()).sum(-1)


def loss_fn(kind: str, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "classification":
        return F.cross_entropy(out, labels)
    if kind == "pair_classification":
        return F.binary_cross_entropy_with_logits(out, labels.float())
    return F.mse_loss(out, labels.float())


def predictions(kind: str, out: torch.Tensor) -> torch.Tensor:
    if kind == "classification":
        return out.argmax(-1)
    if kind == "pair_classification":
        return (out > 0).int()
    return out


def build_model(flax_model, flax_params, pretrained_dir=None,
                attn_implementation: str = "sdpa", device: str = "cpu") -> TorchMultiTask:
    """The PyTorch twin of a `MultiTaskModel` and its params.

    pretrained_dir: a Hugging Face checkpoint directory holding the same encoder
    weights (the embedded MiniLM); None writes the Flax encoder's params to a
    temporary checkpoint first (random-init encoders).
    """
    cfg = hf_config(flax_model.config)
    with tempfile.TemporaryDirectory() as tmp:
        if pretrained_dir is None:
            pretrained_dir = hf_checkpoint.save_pretrained(
                flax_params["encoder"], flax_model.config,
                                                     tmp)
        encoder = transformers.BertModel.from_pretrained(
            str(pretrained_dir), config=cfg, attn_implementation=attn_implementation,
            add_pooling_layer=flax_model.options.pooling == "cls")
    model = TorchMultiTask(encoder, flax_model.tasks, flax_model.options)
    model.load_flax_heads(flax_params["heads"])
    return model.to(device)


def warmup_linear(learning_rate: float, warmup_fraction: float, num_steps: int):
    """The LambdaLR factor of flaxpals' warmup_linear schedule (optim.schedule)."""
    warmup = int(round(warmup_fraction * num_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(warmup, 1)
        return max(0.0, 1.0 - (step - warmup) / max(num_steps - warmup, 1))

    return factor


class TorchSteps:
    """train / additive / pcgrad / predict steps of a TorchMultiTask (one shared optimiser)."""

    def __init__(self, model: TorchMultiTask, train_cfg, num_steps: int, dtype: str = "float32",
                 optimizer_impl: str = "default", seed: int = 0):
        self.model, self.cfg = model, train_cfg
        self.device = next(model.parameters()).device.type  # cpu | cuda
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if _NO_DECAY.search(name) else decay).append(p)
        impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        if optimizer_impl not in impl:
            raise ValueError(f"optimizer_impl={optimizer_impl!r} is not one of {sorted(impl)}")
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=train_cfg.learning_rate, betas=(train_cfg.adam_b1, train_cfg.adam_b2),
            eps=train_cfg.adam_eps, **impl[optimizer_impl])
        if config_lib.lr_schedule(train_cfg) == "warmup_linear":
            factor = warmup_linear(train_cfg.learning_rate, train_cfg.warmup_fraction, num_steps)
        else:
            factor = lambda step: 1.0
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.autocast = dtype == "bfloat16"
        self.gen = torch.Generator().manual_seed(seed)
        self.shared = [p for p in model.encoder.parameters() if p.requires_grad]

    def _loss(self, batch, task: str) -> torch.Tensor:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(batch, task)
        return loss_fn(self.model.specs[task].kind, out.float(), batch["labels"])

    def _update(self) -> None:
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()

    def train_step(self, batch, task: str) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(batch, task)
        loss.backward()
        self._update()
        return loss.item()

    def additive_step(self, batches: Mapping[str, Any]) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = sum(self._loss(b, t) for t, b in batches.items())
        loss.backward()
        self._update()
        return loss.item()

    def pcgrad_step(self, batches: Mapping[str, Any], eps: float = 1e-12) -> float:
        """PCGrad over the encoder's parameters; each head keeps its own task's gradient."""
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        flat, total = [], 0.0
        for task, batch in batches.items():
            loss = self._loss(batch, task)
            head = list(self.model.heads[task].parameters()) if task in self.model.heads else []
            grads = torch.autograd.grad(loss, self.shared + head, allow_unused=True)
            flat.append(torch.cat([torch.zeros_like(p).reshape(-1) if g is None
                                   else g.reshape(-1) for p, g in
                                   zip(self.shared, grads[:len(self.shared)], strict=True)]))
            for p, g in zip(head, grads[len(self.shared):], strict=True):
                p.grad = g
            total += loss.item()
        combined = torch.zeros_like(flat[0])
        for i, g_i in enumerate(flat):
            g = g_i.clone()
            others = [j for j in range(len(flat)) if j != i]
            for k in torch.randperm(len(others), generator=self.gen).tolist():
                g_j = flat[others[k]]
                dot = torch.dot(g, g_j)
                if dot < 0:
                    g -= dot / (torch.dot(g_j, g_j) + eps) * g_j
            combined += g
        offset = 0
        for p in self.shared:
            n = p.numel()
            p.grad = combined[offset:offset + n].view_as(p).clone()
            offset += n
        self._update()
        return total

    def predict_step(self, batch, task: str) -> torch.Tensor:
        self.model.eval()
        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16,
                                                    enabled=self.autocast):
            out = predictions(self.model.specs[task].kind, self.model(batch, task))
        if self.device == "cuda":
            torch.cuda.synchronize()
        return out


def to_torch(batch: Mapping[str, np.ndarray], device: str = "cpu") -> dict[str, torch.Tensor]:
    """A NumPy batch -> torch tensors on `device` (int64 token ids, as transformers expects)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        t = torch.from_numpy(v.astype(np.int64) if v.dtype.kind in "iu" else v.copy())
        out[k] = t.to(device)
    return out

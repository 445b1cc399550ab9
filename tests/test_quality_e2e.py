"""The trainer with every option of the validation rows on: layer decay, EMA (evaluated), SMART with
its Bregman term, and a held-out validation split selecting the best epoch.

Tiny random-init config on the real files; minutes on a 2-core machine, so `slow`.
"""

import json

import numpy as np
import pytest

from flaxpals import config_lib
from flaxpals.serve import eval_files
from flaxpals.train import loop


@pytest.mark.slow
@pytest.mark.parametrize("method", ["annealed", "additive"])
def test_trainer_with_every_option_on(tmp_path, method):
    c = config_lib.base()
    config_lib.tiny(c)
    config_lib.set_method(c, method)
    c.data.train_limit, c.data.validation_fraction = 64, 0.25
    c.train.num_epochs, c.train.steps_per_epoch = 2, 3
    c.train.layer_decay, c.train.ema_decay = 0.8, 0.9
    c.train.smart_weight, c.train.smart_bregman_weight = 1.0, 1.0
    c.eval.use_ema, c.eval.best_metric = True, "val_ema/average"
    c.checkpoint.every_steps = 100
    loop.train_and_evaluate(c, tmp_path)
    records = [json.loads(line)
               for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        for prefix in ("dev", "val", "train", "dev_ema", "val_ema"):
            for key in ("sst", "quora", "sts", "average"):
                assert np.isfinite(r[f"{prefix}/{key}"]), f"{prefix}/{key}"
        assert "train_ema/average" not in r
        assert all(np.isfinite(v) for k, v in r.items() if k.startswith("loss/"))
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["metric"] == "val_ema/average"
    assert best["score"] == max(r["val_ema/average"] for r in records)
    # The EMA's figures are its own (after 6 steps at decay 0.9 it is mostly the init).
    assert any(records[-1][f"dev_ema/{t}"] != records[-1][f"dev/{t}"]
               for t in ("sst", "quora", "sts"))
    # The best checkpoint holds the weights its metric scored: --mode=eval of it gives
    # the EMA's figures of that epoch.
    logged = [r for r in records if r["step"] == best["step"]][0]
    record = eval_files.evaluate_checkpoint(tmp_path)
    for split in ("dev", "val"):
        assert record[f"{split}/average"] == pytest.approx(logged[f"{split}_ema/average"],
                                                           abs=1e-6)

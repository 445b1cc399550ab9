"""A single-task classifier (the seed's baseline): SST or CFIMDB alone.

    python -m flaxpals.main --config=configs/classifier.py:task=cfimdb,option=finetune --workdir=DIR

Arguments: task=sst|cfimdb (default sst); option=pretrain (encoder frozen, only
the head trains) | finetune (default); plus `tiny` or `bert_base`.
"""

from flaxpals import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg)
    task = args.pop("task", "sst")
    option = args.pop("option", "finetune")
    if task not in ("sst", "cfimdb"):
        raise ValueError(f"task={task!r}: the classifier config takes sst or cfimdb")
    if option not in ("pretrain", "finetune"):
        raise ValueError(f"option={option!r} is not pretrain or finetune")
    c = config_lib.base()
    c.tasks = (task,)
    c.model.adapter = "none"
    c.train.trainable = "head_only" if option == "pretrain" else "finetune"
    c.train.learning_rate = 1e-3 if option == "pretrain" else 1e-5
    c.train.num_epochs = 10
    c.train.batch_size = 8 if task == "cfimdb" else 64
    c.eval.best_metric = f"dev/{task}"
    rest = ",".join(k if v is True else f"{k}={v}" for k, v in args.items())
    return config_lib.apply_arg(c, rest, allowed=("tiny", "bert_base"))

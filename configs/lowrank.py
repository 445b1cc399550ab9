"""Low-rank task-specific layers in every layer (the seed's "low-rank" rows).

    python -m flaxpals.main --config=configs/lowrank.py --workdir=DIR

Argument: method=<one of flaxpals.config_lib.METHODS>, plus `tiny` or `bert_base`.
"""

from flaxpals import config_lib


def get_config(arg=None):
    c = config_lib.base()
    c.model.adapter = "lowrank"
    return config_lib.apply_arg(c, arg)

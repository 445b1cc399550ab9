"""The shared encoder with no adapters (the seed's "BERT" rows).

    python -m flaxpals.main --config=configs/baseline.py:method=additive --workdir=DIR

Argument: method=<one of flaxpals.config_lib.METHODS>, plus `tiny` or `bert_base`.
"""

from flaxpals import config_lib


def get_config(arg=None):
    c = config_lib.base()
    c.model.adapter = "none"
    return config_lib.apply_arg(c, arg)

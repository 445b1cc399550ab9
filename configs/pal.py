"""Projected Attention Layers in every layer (the seed's "PAL" rows).

    python -m flaxpals.main --config=configs/pal.py --workdir=DIR
    # PAL + grad surgery:
    python -m flaxpals.main --config=configs/pal.py:method=pcgrad --workdir=DIR

Argument: method=<one of flaxpals.config_lib.METHODS>, plus `tiny` or `bert_base`.
"""

from flaxpals import config_lib


def get_config(arg=None):
    c = config_lib.base()
    c.model.adapter = "pal"
    return config_lib.apply_arg(c, arg)

"""`flaxpals.ensemble.Ensemble`, where it was before the library had wings: the
implementation is flaxpals/serve/ensemble.py."""

from flaxpals.serve.ensemble import Ensemble

__all__ = ["Ensemble"]

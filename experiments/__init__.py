"""Experiments beside the library: the sweep, the PyTorch reference, analyses.

Run from the repository root, e.g. `python -m experiments.sweep --results=results`.
The library (`flaxpals`) never imports this package.
"""

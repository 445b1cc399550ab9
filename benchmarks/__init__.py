"""Benchmarks of the library against PyTorch and of its parts.

Run from the repository root, e.g. `python -m benchmarks.bench_steps`. The library
(`flaxpals`) never imports this package.
"""

"""Benchmark baselines that are not kernels of ours (third-party call paths)."""

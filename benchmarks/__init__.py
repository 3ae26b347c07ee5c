"""Benchmarks: commands that measure the gateway and write their figures to results/."""

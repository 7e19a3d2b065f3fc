"""Benchmarks: each runs its own ceiling in the same run and reports ratios."""

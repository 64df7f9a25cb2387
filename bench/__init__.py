"""Benchmarks: per-frame latency, concurrency, kernels, static audit (see README)."""

"""Benchmarks with same-run baselines: `bench/run` or `.venv/bin/python -m bench`."""

"""Benchmarks: run as modules (``python -m bench.jobs_bench``); they print, they do not assert."""

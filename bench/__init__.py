"""Throughput benchmarks (`python -m bench.NAME`); results go to bench/RESULTS.md."""

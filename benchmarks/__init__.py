"""Benchmarks (`make bench`): not tests. Each prints a table and writes JSON to bench-results/."""

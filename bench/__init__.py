"""Benchmarks (`make bench`) and the reliability suite (`make reliability`)."""

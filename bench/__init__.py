"""Benchmarks that run replicad as an application would and print markdown tables."""

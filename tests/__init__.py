"""Tests mirroring the replicad package, and the harness the benchmarks share."""

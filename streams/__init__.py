"""Continual streams (Avalanche benchmarks) and the data sources they are built from."""

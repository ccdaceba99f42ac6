"""Continual-learning strategies: one file per method or baseline."""

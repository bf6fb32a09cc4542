"""Evaluation: pass@1 and mean accuracy of the base model and its adapters on math benchmarks."""

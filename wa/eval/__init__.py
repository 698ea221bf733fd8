"""Metrics, splits and permutation checks for learners that read weights."""

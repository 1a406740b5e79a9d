"""Evaluation: generation, scoring answers against key terms, metrics, the retention check."""

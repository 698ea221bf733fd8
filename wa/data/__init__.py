"""Corpora, tokenizers and deterministic batching."""

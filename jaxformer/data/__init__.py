"""Tokenizers, synthetic tasks and grain pipelines."""

"""Evaluation apps: perplexity on a text file, and an lm-evaluation-harness model adapter."""

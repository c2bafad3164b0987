"""Evaluation: scorers, LLM judges, statistics, eval runs, comparisons and the CI gate."""

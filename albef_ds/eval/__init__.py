"""Evaluation: retrieval metrics and the ITC retrieval evaluation."""

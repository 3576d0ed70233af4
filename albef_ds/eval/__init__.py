"""Evaluation: retrieval metrics and the ITC retrieval evaluation, VQA scoring, classification accuracy,
Grad-CAM maps and the weakly-supervised grounding evaluation (with its pictures)."""

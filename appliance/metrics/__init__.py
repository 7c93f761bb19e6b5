"""Metrics, below both training and evaluation: language-model scores (lm, needs torch) and scores
of answers and predictions (scores)."""

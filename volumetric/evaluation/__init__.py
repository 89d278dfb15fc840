"""Evaluation: a model's probabilities over a data set, metrics, plots and prediction rows.

Shared by training (validation), ``volumetric-evaluate`` and ``volumetric-infer``; nothing here
depends on the training loop.
"""

"""Training loop, evaluation, metrics and checkpoints."""

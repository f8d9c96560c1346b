"""Training: the ignite trainer, checkpoints, DDP helpers, training curves, baselines and ablations."""

"""Contrastive training: losses, data, sampling, loop, checkpoints, modes."""

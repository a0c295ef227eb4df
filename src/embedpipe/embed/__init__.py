"""Batch embedding of images and texts with a registered model."""

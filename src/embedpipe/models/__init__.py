"""Model registry and loading. ``registry`` needs no torch; ``loading`` does."""

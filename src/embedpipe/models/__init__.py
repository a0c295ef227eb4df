"""Model registry and loading. ``registry`` needs no torch; ``loading`` and ``backends`` do."""

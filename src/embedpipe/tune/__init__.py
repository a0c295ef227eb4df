"""Hyperparameter search over [train] settings: one space (``space``), searched by Optuna
in this process (``study``) or by a Katib Experiment on the cluster (``katib``)."""

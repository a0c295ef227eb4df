"""evaluate: zero-shot, retrieval, probes, anomalies, plots and the report."""

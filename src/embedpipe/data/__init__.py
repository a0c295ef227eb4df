"""Data stages: sources, ingest, catalog, split, dedup, demo data. No torch here."""

"""Per-category hard-negative mining: partition, mine, combine, Hugging Face export."""

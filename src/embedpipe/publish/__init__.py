"""Publishing trained models: open_clip's Hugging Face layout or a transformers custom
model, a model card, a reload check, and an optional upload to the Hub."""

"""File formats read without torch (GGUF metadata, tensors and tokenizer), so that the frontend's
tokenizer and the model loader share them without the frontend importing models."""

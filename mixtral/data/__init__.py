"""Data: Mixtral's tokenizer, Megatron-compatible indexed datasets, preprocessing and the training loader."""

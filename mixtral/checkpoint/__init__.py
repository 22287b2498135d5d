"""Checkpoints: HF safetensors directories in and out (hf), native sharded checkpoints."""

"""Training: the trainer loop, AdamW and schedules, atomic checkpoints, metrics and plots."""

"""Training: optimizers (CAME, AdamW), learning-rate schedules, EMA; the train step and checkpoints."""

"""Supervised fine-tuning: the loss, the optimizer and schedule, the loop, checkpoints."""

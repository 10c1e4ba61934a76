"""Supervised fine-tuning: cross-entropy on response tokens only (`method: sft`)."""

from qatune.methods.sft.method import SFT

__all__ = ["SFT"]

"""GRPO (`method: grpo`): a group of sampled responses per prompt, advantages relative to the
group, the clipped surrogate with the KL to the reference in the loss."""

from qatune.methods.grpo.method import GRPO

__all__ = ["GRPO"]

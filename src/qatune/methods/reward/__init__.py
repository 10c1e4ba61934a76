"""A Bradley-Terry reward model (`method: reward`): a scalar head scores chosen above rejected.
`loss` holds the loss and metrics, `method` the data plan, the step and the export."""

from qatune.methods.reward.method import Reward

__all__ = ["Reward"]

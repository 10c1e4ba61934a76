"""PPO (`method: ppo`): sampled rollouts, per-token KL-penalized rewards, GAE advantages from a
value head, the clipped surrogate and value losses."""

from qatune.methods.ppo.method import PPO

__all__ = ["PPO"]

"""What the online methods (PPO, GRPO) share as methods: the `rl:` config section and `OnlineRL`,
the base whose plan samples each rollout from the policy being trained. The sampling, reward,
KL and advantage computations themselves are the library `qatune.rl`."""

from qatune.methods.online.config import RLConfig
from qatune.methods.online.loss import policy_loss
from qatune.methods.online.method import OnlineRL

__all__ = ["OnlineRL", "RLConfig", "policy_loss"]

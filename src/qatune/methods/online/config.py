"""`rl:` in the train config: the settings of `method: ppo` and `method: grpo`.

One optimizer step of an RL run takes its share of a rollout batch: `prompts_per_rollout` prompts
(all ranks together) x `group_size` responses each are sampled with the current policy, scored,
turned into per-token advantages, then trained on for `epochs` passes of `minibatches` optimizer
steps each (PPO's "several minibatch epochs per rollout"; GRPO's usual 1 x 1). A minibatch is
split into micro-batches of `batch.size` responses (or tokens, with `batch.unit: tokens`); the
loss is normalized by the response tokens of the whole minibatch, so the split does not change
the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qatune.errors import UserError
from qatune.rl.rollout import RolloutConfig


@dataclass
class RLConfig:
    # What is rewarded: a programmatic check of the answer against the record's reference
    # (exact_match, f1, numeric = GSM8K's "#### N"), or a reward model: a folder exported by
    # `method: reward` (a transformers GPT2ForSequenceClassification).
    reward: str = "exact_match"
    no_eos_penalty: float = 0.0  # subtracted from the reward of a response cut at max_new_tokens
    # --- sampling
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    prompts_per_rollout: int = 16  # prompts per rollout batch, all ranks together
    # Responses per prompt. Unset: the method's choice, 8 for grpo (its advantages are relative to
    # the group: it needs >= 2), 1 for ppo (its value model is the baseline).
    group_size: int | None = None
    generation_batch: int = 64  # responses decoded together (bounds the KV cache's memory)
    # --- optimization on each rollout batch
    epochs: int = 1  # passes over the rollout batch (PPO: typically 4)
    minibatches: int = 1  # optimizer steps per pass
    clip: float = 0.2  # PPO/GRPO ratio clip: the ratio pi/pi_old is kept within 1 +- clip
    # --- KL to the reference (the starting model)
    kl_coef: float = 0.05  # beta: PPO puts -beta*KL in every token's reward, GRPO beta*KL in the loss
    kl_target: float | None = None  # adaptive beta toward this KL (nats per response); None = fixed
    kl_horizon: int = 10000  # responses over which the adaptive controller moves beta by at most 20%
    # The run stops (with a checkpoint) when a rollout's mean KL per response leaves this band.
    # The lower bound catches a broken estimate: the KL estimate of a batch is a mean of
    # log-ratios, near 0 or positive unless the recorded log-probs are wrong.
    kl_band: list[float] = field(default_factory=lambda: [-1.0, 20.0])
    # --- PPO only
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE lambda
    value_coef: float = 0.1  # weight of the value loss
    value_clip: float = 0.2  # how far a value prediction may move from its rollout-time value
    # The critic: "policy" = a value head on the policy's own last hidden state (one network);
    # otherwise a model (size name, hub name or folder, e.g. the reward model's or the SFT model's
    # export) whose hidden states feed a separate value head.
    value_model: str = "policy"
    whiten_rewards: bool = False  # normalize the scores over the rollout batch before the KL term
    whiten_advantages: bool = True  # normalize the advantages to mean 0, std 1 over the rollout batch
    # --- GRPO only
    scale_rewards: bool = True  # divide each group's centered rewards by the group's std

    def __post_init__(self) -> None:
        for name in ("prompts_per_rollout", "group_size", "generation_batch", "epochs", "minibatches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.kl_band) != 2 or self.kl_band[0] >= self.kl_band[1]:
            raise UserError(f"rl.kl_band must be [low, high] with low < high, got {self.kl_band}")
        if self.clip <= 0:
            raise UserError(f"rl.clip must be > 0, got {self.clip}")

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches

"""Reinforcement learning from a reward: the parts PPO and GRPO share.

    rollout.py     sample responses with the KV-cache decoder, recording policy and reference
                   log-probs (and values) token by token as they are generated
    rewards.py     programmatic rewards against the record's reference answer (exact match, F1,
                   GSM8K's "#### N"), or a reward model
    kl.py          the per-token KL penalty to the reference and its fixed / adaptive controller
    advantages.py  GAE, whitening, GRPO's group-normalized advantages
    losses.py      the clipped surrogate and the clipped value loss

The methods themselves (`method: ppo`, `method: grpo`) are steps on the shared training runtime:
`qatune.train.methods.ppo` and `qatune.train.methods.grpo`.
"""

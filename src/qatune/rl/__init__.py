"""Reinforcement learning from a reward: the library PPO and GRPO build on, with no notion of a
training run.

    rollout.py     sample responses with the KV-cache decoder, recording policy and reference
                   log-probs (and values) token by token as they are generated
    rewards.py     programmatic rewards against the record's reference answer (exact match, F1,
                   GSM8K's "#### N"), or a reward model (`make_reward` picks one by name)
    kl.py          the per-token KL penalty to the reference and its fixed / adaptive controller
    advantages.py  GAE, whitening, GRPO's group-normalized advantages
    losses.py      the clipped surrogate and the clipped value loss
    experience.py  sampled responses with their advantages, collated into training batches
    prompts.py     the prompts a rollout samples from, encoded

The methods themselves (`method: ppo`, `method: grpo`) are `qatune.methods.ppo` and
`qatune.methods.grpo`, on the rollout plan of `qatune.methods.online`.
"""

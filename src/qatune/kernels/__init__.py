"""The LM-head kernels every method and the evaluation share: the response-only cross-entropy
(`loss`) and per-token log-probabilities (`logprobs`), both through the tied head in chunks, so
no tokens x vocabulary tensor outlives one chunk."""

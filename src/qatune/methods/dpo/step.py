"""One forward of a packed pair batch -> the DPO loss sum and metric sums.

DPO: the policy's hidden states of both responses of every pair come from one forward; the LM
head scores only response positions, chunk by chunk over whole pairs, with the gradients formed
in the same pass (`fused_logprob_loss`): no `tokens x vocab` tensor lives beyond one chunk. The
reference's log-probs come from a no-grad forward of the reference model (or from a cache).
"""

from __future__ import annotations

import bisect

import torch

from qatune.data.preference.batching import PairBatch
from qatune.kernels.logprobs import DEFAULT_CHUNK, fused_logprob_loss, segment_sum, token_logprobs
from qatune.kernels.loss import select_labelled
from qatune.methods.dpo.loss import DPOConfig, dpo_losses, dpo_metric_sums


@torch.no_grad()
def sequence_logps(hidden, lm_weight, batch: PairBatch, chunk_size=DEFAULT_CHUNK, head_dtype=None) -> torch.Tensor:
    """log pi(response | prompt) per sequence (2P,), interleaved chosen/rejected; no gradient."""
    rows, targets = select_labelled(hidden, batch.targets, batch.label_index)
    logp = token_logprobs(rows, lm_weight, targets, chunk_size, head_dtype)
    return segment_sum(logp, batch.row_seq, 2 * batch.n_pairs)


def dpo_loss_sum(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    batch: PairBatch,
    ref_logps: torch.Tensor,
    cfg: DPOConfig,
    chunk_size: int = DEFAULT_CHUNK,
    head_dtype: torch.dtype | None = None,
    weight_grad_into_grad: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of the per-pair DPO losses, metric sums) for the policy's hidden states of `batch`.
    weight_grad_into_grad: as `qatune.kernels.loss.rows_loss_sum`."""
    rows, targets = select_labelled(hidden, batch.targets, batch.label_index)
    n_seq = 2 * batch.n_pairs
    acc = torch.promote_types(hidden.dtype, torch.float32)  # the log-probs' dtype (fp32 under autocast)
    ref_logps = ref_logps.to(device=hidden.device, dtype=acc)
    tokens = batch.seq_tokens.to(hidden.device, acc)
    policy = torch.zeros(n_seq, dtype=acc, device=hidden.device)

    def pair_losses(logp: torch.Tensor, start: int, end: int) -> torch.Tensor:
        # Rows start:end hold whole pairs k0 .. k1-1, i.e. sequences 2*k0 .. 2*k1-1 (host arithmetic: no sync).
        k0, k1 = bisect.bisect_left(batch.bounds, start), bisect.bisect_left(batch.bounds, end)
        first, n = 2 * k0, 2 * (k1 - k0)
        seq = segment_sum(logp, batch.row_seq[start:end] - first, n)
        policy[first : first + n] = seq.detach()
        ratio = seq - ref_logps[first : first + n]
        t = tokens[first : first + n]
        return dpo_losses(ratio[0::2], ratio[1::2], cfg, t[0::2], t[1::2], seq[0::2]).sum()

    args = (rows, lm_weight, targets, batch.bounds, pair_losses, chunk_size, head_dtype)
    loss = fused_logprob_loss(*args, weight_grad_into_grad=weight_grad_into_grad)
    return loss, dpo_metric_sums(policy, ref_logps, cfg.beta)

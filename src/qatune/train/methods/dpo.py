"""Direct Preference Optimization (Rafailov et al. 2023) on the shared runtime.

Step: one forward of the policy over a packed batch of pairs (chosen and rejected side by side,
block-causal), the LM head only at response positions, chunk by chunk over whole pairs, loss and
gradients in the same pass (`qatune.train.preference_step.dpo_loss_sum`). The reference's
sequence log-probs come from a no-grad forward of the reference — the runtime's frozen copy of
the initial weights, or under LoRA the same model with its adapters disabled (no second copy) —
or, with `dpo.precompute_reference`, from one pass over the whole data set before training,
cached in the run folder (`reference_logps.pt`) and reused on resume.

Metrics per step (TRL's definitions, `qatune.train.preference_loss`): loss, reward_accuracy,
margin, reward_chosen / reward_rejected, logp_chosen / logp_rejected, logratio; the same with `eval_`
on the held-out pairs at eval steps. Export: the policy as a transformers GPT-2 LM.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from qatune.data.preference.batching import PairBatch
from qatune.train.methods.base import RunContext, StepOutput
from qatune.train.methods.preference import PairItem, PairMethod
from qatune.train.preference_loss import dpo_summary
from qatune.train.preference_step import dpo_loss_sum, model_inputs, sequence_logps
from qatune.train.step import lm_weight, scored_rows_only
from qatune.utils.files import atomic_write

REFERENCE_CACHE = "reference_logps.pt"


class DPO(PairMethod):
    name = "dpo"
    needs_reference = True
    plots = {
        "reward_accuracy": (("reward_accuracy",), "reward accuracy (chosen reward > rejected)"),
        "rewards": (("reward_chosen", "reward_rejected", "margin"), "implicit reward beta log pi/pi_ref"),
        "logps": (("logp_chosen", "logp_rejected"), "log pi(response | prompt)"),
        "logratio": (("logratio",), "mean log pi/pi_ref of the responses (chosen and rejected)"),
    }

    def setup(self, run: RunContext) -> None:
        super().setup(run)
        self.dpo = run.cfg.dpo
        self.ref_cache: torch.Tensor | None = None  # (pairs, 2): chosen, rejected
        if self.dpo.precompute_reference:
            self.ref_cache = self._cached_reference(run)
            run.reference = None  # no reference forward from here on: free the copy

    # --- the reference -------------------------------------------------------------------

    def reference_logps(self, model, batch: PairBatch) -> torch.Tensor:
        """log pi_ref of every sequence of `batch` (2P,), chosen/rejected interleaved."""
        if self.ref_cache is not None:
            ids = torch.tensor(batch.pair_ids)
            return self.ref_cache[ids].reshape(-1).to(batch.input_ids.device)
        return self._reference_pass(self.run.reference, batch)

    @torch.no_grad()
    def _reference_pass(self, reference, batch: PairBatch) -> torch.Tensor:
        """log pi_ref per sequence from `reference` (the frozen copy, or under LoRA the base with
        adapters off), its forward cut to the response rows."""
        hidden = reference(**model_inputs(batch), **scored_rows_only(reference, batch.label_index, tied_head=False))
        return sequence_logps(hidden, lm_weight(reference), batch, self.chunk_size)

    def _cached_reference(self, run: RunContext) -> torch.Tensor:
        """Every pair's reference log-probs, from the run folder if this data's are there, else
        computed once (rank 0, the others wait) and written there."""
        path = Path(run.run_dir) / REFERENCE_CACHE
        pairs = self.all_pairs()
        key = fingerprint(pairs)
        if run.is_main and not _matches(path, key):
            items = [PairItem(i, p) for i, p in enumerate(pairs)]
            size = run.cfg.eval.batch_size
            out = torch.empty(len(items), 2, dtype=torch.float64)
            reference = run.reference.to(run.device)
            for s in range(0, len(items), size):
                batch = self.collate(items[s : s + size]).to(run.device)
                with run.precision.autocast():
                    logps = self._reference_pass(reference, batch)
                out[torch.tensor(batch.pair_ids)] = logps.double().cpu().view(-1, 2)  # rows reorder pairs
            with atomic_write(path, "wb", encoding=None) as f:
                torch.save({"fingerprint": key, "logps": out}, f)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        return torch.load(path, weights_only=True)["logps"].to(run.device)

    # --- the step --------------------------------------------------------------------------

    def step(self, model, batch: PairBatch, monitor: bool = False) -> StepOutput:
        ref = self.reference_logps(model, batch)
        cut = scored_rows_only(model, batch.label_index)
        hidden = model(**model_inputs(batch), **cut)
        into_grad = cut.get("sparse_embedding_grad", False)
        loss_sum, sums = dpo_loss_sum(
            hidden, lm_weight(model), batch, ref, self.dpo, self.chunk_size, weight_grad_into_grad=into_grad
        )
        return StepOutput(loss_sum, batch.count, sums)

    def summarize(self, totals: dict[str, float], count: int) -> dict:
        return {"pairs": count, **dpo_summary(totals, count)} if count else {}

    def export_info(self) -> dict:
        return {**super().export_info(), "dpo": vars(self.dpo)}


def fingerprint(pairs) -> str:
    """A hash of every pair's token ids: a cache computed for other data is never reused."""
    h = hashlib.sha256()
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()


def _matches(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        return torch.load(path, weights_only=True).get("fingerprint") == key
    except Exception:  # a truncated or foreign file: compute it again
        return False

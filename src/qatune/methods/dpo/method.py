"""Direct Preference Optimization (Rafailov et al. 2023) on the shared runtime.

Step: one forward of the policy over a packed batch of pairs (chosen and rejected side by side,
block-causal), the LM head only at response positions, chunk by chunk over whole pairs, loss and
gradients in the same pass (`qatune.methods.dpo.step.dpo_loss_sum`). The reference's
sequence log-probs come from a no-grad forward of the reference — the runtime's frozen copy of
the initial weights, or under LoRA the same model with its adapters disabled (no second copy) —
or, with `dpo.precompute_reference`, from one pass over the whole data set before training,
cached in the run folder (`reference_logps.pt`) and reused on resume, or by a run started again
under the same name, when computed for the same pairs, reference weights, tokenizer, template,
max_len, truncation and precision (`DPO.cache_key`; a mismatch recomputes and says so).

Metrics per step (TRL's definitions, `qatune.methods.dpo.loss`): loss, reward_accuracy,
margin, reward_chosen / reward_rejected, logp_chosen / logp_rejected, logratio; the same with `eval_`
on the held-out pairs at eval steps. Export: the policy as a transformers GPT-2 LM.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from qatune.data.batching import model_inputs
from qatune.data.preference.batching import PairBatch
from qatune.methods.dpo.loss import DPOConfig, dpo_summary
from qatune.methods.dpo.step import dpo_loss_sum, sequence_logps
from qatune.methods.pairs import PairItem, PairMethod
from qatune.model.fingerprint import state_fingerprint, tokenizer_fingerprint
from qatune.model.lora import is_adapter_key
from qatune.train.method import STEP_FIELDS, RunContext, StepOutput
from qatune.train.step import lm_weight, scored_rows_only
from qatune.utils.files import atomic_write

REFERENCE_CACHE = "reference_logps.pt"


class DPO(PairMethod):
    name = "dpo"
    title = "Direct Preference Optimization (Rafailov et al. 2023)"
    needs_reference = True
    config_sections = ("dpo",)
    progress_fields = (
        *STEP_FIELDS,
        ("reward_accuracy", "acc {:.2f}"),
        ("margin", "margin {:.3f}"),
        ("eval_loss", "eval {:.4f}"),
        ("eval_reward_accuracy", "eval acc {:.2f}"),
    )
    summary_fields = (
        ("eval_loss", "held-out DPO loss"),
        ("eval_reward_accuracy", "held-out reward accuracy (implicit reward of chosen > rejected)"),
        ("eval_margin", "held-out implicit reward margin"),
        ("loss", "training loss (last step)"),
        ("reward_accuracy", "training reward accuracy (last step)"),
    )
    plots = {
        "reward_accuracy": (("reward_accuracy",), "reward accuracy (chosen reward > rejected)"),
        "rewards": (("reward_chosen", "reward_rejected", "margin"), "implicit reward beta log pi/pi_ref"),
        "logps": (("logp_chosen", "logp_rejected"), "log pi(response | prompt)"),
        "logratio": (("logratio",), "mean log pi/pi_ref of the responses (chosen and rejected)"),
    }

    def setup(self, run: RunContext) -> None:
        super().setup(run)
        self.dpo: DPOConfig = run.section
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
        """Every pair's reference log-probs, from the run folder if they were computed there for
        this data and this reference, else computed once (rank 0, the others wait) and written."""
        path = Path(run.run_dir) / REFERENCE_CACHE
        pairs = self.all_pairs()
        key = self.cache_key(run, pairs) if run.is_main else {}
        stale = _stale(path, key) if run.is_main else []
        if stale:
            if path.exists():
                print(f"dpo: {path} was computed for another {', '.join(stale)}: computing it again", file=sys.stderr)
            items = [PairItem(i, p) for i, p in enumerate(pairs)]
            size = run.settings.eval.batch_size
            out = torch.empty(len(items), 2, dtype=torch.float64)
            reference = run.reference.to(run.device)
            for s in range(0, len(items), size):
                batch = self.collate(items[s : s + size]).to(run.device)
                with run.precision.autocast():
                    logps = self._reference_pass(reference, batch)
                out[torch.tensor(batch.pair_ids)] = logps.double().cpu().view(-1, 2)  # rows reorder pairs
            with atomic_write(path, "wb", encoding=None) as f:
                torch.save({"key": key, "logps": out}, f)
        run.barrier()
        return torch.load(path, weights_only=True)["logps"].to(run.device)

    def cache_key(self, run: RunContext, pairs) -> dict[str, str]:
        """What the cached values depend on, part by part (a mismatch names the part). The pairs'
        token ids already reflect the tokenizer, template, max_len and truncation; those are
        keyed too, so that a change to any of them is reported as what it is."""
        from qatune.data.preference.truncation import pair_policy

        # The reference is the initial weights (under LoRA: the base, adapters off); at setup the
        # model still holds them (a resumed run loads its checkpoint after setup).
        weights = {k: v for k, v in run.model.state_dict().items() if not is_adapter_key(k)}
        return {
            "pairs": fingerprint(pairs),
            "reference weights": state_fingerprint(weights),
            "tokenizer": tokenizer_fingerprint(run.tokenizer),
            "template": json.dumps(self.template, sort_keys=True),
            "max_len": str(self.max_len),
            "truncation": pair_policy(run.settings.data.truncation),
            "precision": run.precision.name,
        }

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


def _stale(path: Path, key: dict[str, str]) -> list[str]:
    """The parts of `key` the cache at `path` was not computed for (all of them without one)."""
    try:
        saved = torch.load(path, weights_only=True).get("key") if path.is_file() else None
    except Exception:  # a truncated or foreign file: compute it again
        saved = None
    if not isinstance(saved, dict):  # none, or an older cache keyed by the pairs only
        return list(key)
    return [part for part in key if saved.get(part) != key[part]]

"""A reward model on the shared runtime: a language model + a scalar head, Bradley-Terry on preference pairs.

Step: one forward of a packed batch of pairs; the head reads each response's last token (before
its EOS); loss -log sigma(s_chosen - s_rejected - margin) (+ optional centering), a mean over the
pairs of the step. Metrics: loss, accuracy (chosen scores higher), margin, mean scores and their
spread; `eval_` the same on the held-out pairs. Export: a transformers
*ForSequenceClassification of the model's family (GPT2…, Llama…, Qwen2…; num_labels=1) that
gives the same scores.

`model.name` may be a reward model folder (a *ForSequenceClassification, e.g. one exported
here): its head is loaded too, so training continues from it; otherwise the head starts random.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qatune.data.batching import model_inputs
from qatune.data.preference.batching import PairBatch
from qatune.methods.pairs import PairMethod
from qatune.methods.reward.loss import RewardConfig, reward_loss_sum, reward_summary
from qatune.model.reward import SCORE_KEY, RewardModel, is_reward_model
from qatune.runs import EXPORT_DIR
from qatune.train.method import STEP_FIELDS, RunContext, StepOutput


class Reward(PairMethod):
    name = "reward"
    title = "a reward model: the language model with a scalar head, Bradley-Terry on preference pairs"
    config_sections = ("reward",)
    progress_fields = (
        *STEP_FIELDS,
        ("accuracy", "acc {:.2f}"),
        ("margin", "margin {:.3f}"),
        ("eval_loss", "eval {:.4f}"),
        ("eval_accuracy", "eval acc {:.2f}"),
    )
    pipeline_tag = "text-classification"  # the export is a *ForSequenceClassification
    summary_fields = (
        ("eval_loss", "held-out Bradley-Terry loss"),
        ("eval_accuracy", "held-out pair accuracy (chosen scores higher)"),
        ("eval_margin", "held-out score margin (chosen - rejected)"),
        ("loss", "training loss (last step)"),
        ("accuracy", "training pair accuracy (last step)"),
    )
    plots = {
        "accuracy": (("accuracy",), "pair accuracy (chosen scores higher)"),
        "scores": (("score_chosen", "score_rejected", "margin"), "reward model score"),
    }

    def setup(self, run: RunContext) -> None:
        super().setup(run)
        self.head = None
        name = run.settings.model.name
        if Path(name).is_dir() and is_reward_model(name):
            from qatune.model.hf_io import read_hf_state_dict

            self.head = read_hf_state_dict(Path(name))[SCORE_KEY]

    def wrap(self, model) -> RewardModel:
        rm = RewardModel(model).to(next(model.parameters()).device)
        if self.head is not None and not rm.score.weight.is_meta:
            with torch.no_grad():
                rm.score.weight.copy_(self.head)
        return rm

    def step(self, model, batch: PairBatch, monitor: bool = False) -> StepOutput:
        scores = model(**model_inputs(batch), last_token=batch.last_token)
        cfg: RewardConfig = self.run.section
        loss_sum, sums = reward_loss_sum(scores, batch, cfg, cfg.use_margin)
        return StepOutput(loss_sum, batch.count, sums)

    def summarize(self, totals: dict[str, float], count: int) -> dict:
        return {"pairs": count, **reward_summary(totals, count)} if count else {}

    def export(self, model, run: RunContext, info: dict, files: dict[str, str]) -> Path:
        """Under LoRA the export is the merged model (a *ForSequenceClassification has no place
        for adapters: unmerged, transformers would load the base weights and drop them)."""
        from qatune.model.reward import export_reward_hf, merge_reward_lora

        target, template, max_len = run.run_dir / EXPORT_DIR, info.get("template"), info.get("max_len")
        return export_reward_hf(merge_reward_lora(model), target, run.tokenizer, files, template, max_len)

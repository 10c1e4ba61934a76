"""A reward model: a language model of any family with a scalar head on the last token of the response.

The head is transformers' `*ForSequenceClassification`'s (`score`: Linear(d, 1) without bias;
GPT2ForSequenceClassification, LlamaForSequenceClassification, Qwen2ForSequenceClassification …),
so the export is a `transformers` folder that `AutoModelForSequenceClassification` loads and that
gives the same scores. The scored token is the last one *before* a final EOS: `transformers`
picks the rightmost token that is not `pad_token_id`, the export sets pad_token_id = EOS (GPT-2
has no pad token), so a sequence scores the same with or without its EOS and with any amount of
EOS padding — the convention of TRL's GPT-2 reward models too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from qatune.model import families
from qatune.model.attention import DecoderLM
from qatune.model.hf_io import CheckpointError, read_hf_state_dict, resolve_checkpoint_dir, write_hf_folder
from qatune.model.llama_hf_io import ARCHITECTURES
from qatune.model.lora import has_lora, merge_lora

SCORE_KEY = "score.weight"
# config.json's model_type -> the transformers class of its reward model
CLASSIFIERS = {
    "gpt2": "GPT2ForSequenceClassification",
    **{t: a.replace("ForCausalLM", "ForSequenceClassification") for t, a in ARCHITECTURES.items()},
}


class RewardModel(nn.Module):
    def __init__(self, backbone: DecoderLM) -> None:
        super().__init__()
        self.backbone = backbone  # the name the runtime looks for (qatune.train.step.backbone)
        self.score = nn.Linear(backbone.config.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)  # transformers' initializer_range

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids, position_ids=None, doc_ids=None, attention_mask=None, last_token=None):
        """Scores (N,) of the positions `last_token` (flat indices into B*T); without it, the
        score of every position (B, T)."""
        # outputs=last_token: the backbone's last block and final norm run on those rows only
        hidden = self.backbone(
            input_ids, position_ids=position_ids, doc_ids=doc_ids, attention_mask=attention_mask, outputs=last_token
        )
        return self.score(hidden).squeeze(-1)

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], eos_id: int, batch_size: int = 16) -> torch.Tensor:
        """Scores (B,) of prompt + response id lists; a final EOS (or several) is not scored."""
        device = self.score.weight.device
        out = []
        for start in range(0, len(sequences), batch_size):
            chunk = [strip_eos(s, eos_id) for s in sequences[start : start + batch_size]]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), eos_id, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
            last = torch.tensor([i * width + len(s) - 1 for i, s in enumerate(chunk)])
            # Right padding needs no mask: causal attention never lets a real token see a pad.
            out.append(self.forward(ids.to(device), last_token=last.to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def merge_reward_lora(model: RewardModel) -> RewardModel:
    """The reward model with its backbone's LoRA adapters merged (`lora.merge_lora`), the score
    head shared: what its export holds. Unchanged without adapters."""
    if not has_lora(model.backbone):
        return model
    merged = RewardModel(merge_lora(model.backbone))
    merged.score = model.score
    return merged


def strip_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    ids = list(ids)
    while len(ids) > 1 and ids[-1] == eos_id:
        ids.pop()
    return ids


def export_reward_hf(
    model: RewardModel,
    out_dir: str | os.PathLike,
    tokenizer=None,
    extra_files: dict[str, str] | None = None,
    template: dict | None = None,
    max_len: int | None = None,
) -> Path:
    """A `transformers` *ForSequenceClassification folder of the backbone's family (num_labels=1,
    pad_token_id = EOS; `hf_io.write_hf_folder`: the run's template as the tokenizer's chat
    template, else the tokenizer's own). An untied LM head is not part of a reward model: it is
    left out."""
    family = families.family_of(model.backbone)
    hf = family.hf_config(model.backbone, tokenizer.eos_token_id if tokenizer is not None else None)
    eos = tokenizer.eos_token_id if tokenizer is not None else hf.get("eos_token_id")
    pad = eos[0] if isinstance(eos, list) else eos
    hf.update(architectures=[CLASSIFIERS[hf["model_type"]]], pad_token_id=pad)
    hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    state = family.hf_state(model.backbone)
    state.pop("lm_head.weight", None)
    state[SCORE_KEY] = model.score.weight.detach().cpu().contiguous()
    max_len = max_len or model.config.n_positions
    return write_hf_folder(out_dir, hf, state, tokenizer, template, max_len, extra_files=extra_files)


def load_reward_model(name_or_path: str | os.PathLike) -> RewardModel:
    """A reward model from a *ForSequenceClassification folder (num_labels=1) of a known family."""
    folder = resolve_checkpoint_dir(name_or_path)
    hf = json.loads((folder / "config.json").read_text())
    labels = hf.get("num_labels", len(hf.get("id2label") or {}) or None)
    if labels not in (None, 1) or not _is_classifier(hf):
        raise CheckpointError(
            f"{folder} is not a reward model (a {' / '.join(sorted(set(CLASSIFIERS.values())))} with num_labels=1)"
        )
    score = read_hf_state_dict(folder).get(SCORE_KEY)
    if score is None:
        raise CheckpointError(f"{folder}: tensor {SCORE_KEY!r} (the reward head) is missing")
    model = RewardModel(families.from_pretrained(folder))  # the family's loader leaves the score out
    if score.shape != model.score.weight.shape:
        want = tuple(model.score.weight.shape)
        raise CheckpointError(f"{folder}: tensor {SCORE_KEY!r} has shape {tuple(score.shape)}, expected {want}")
    with torch.no_grad():
        model.score.weight.copy_(score)
    return model.float()


def _is_classifier(hf: dict) -> bool:
    return bool(set(CLASSIFIERS.values()) & set(hf.get("architectures") or []))


def is_reward_model(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return _is_classifier(json.loads(config.read_text()))

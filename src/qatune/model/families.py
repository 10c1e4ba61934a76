"""Which model file serves a checkpoint: the one place that dispatches on config.json's model_type.

Every family's model has the same interface (`GPT2` is the reference): `forward(input_ids,
position_ids, doc_ids, attention_mask, kv_cache, outputs, sparse_embedding_grad)` returning the
final-norm hidden states, `lm_head(hidden)`, `head_weight`, `new_kv_cache(batch, max_len)`,
`num_parameters()`, and the `activation_checkpointing` and `attention_kernel` attributes. GPT-2
is the default: a config.json without model_type is GPT-2's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qatune.errors import UserError
from qatune.model import gpt2, llama, llama_hf_io
from qatune.model import hf_io as gpt2_hf_io
from qatune.model.gpt2 import GPT2
from qatune.model.hf_io import CheckpointError, resolve_checkpoint_dir
from qatune.model.llama import Llama

# Every named size a random-init run can start from: GPT-2's and the Llama family's.
SIZE_NAMES: tuple[str, ...] = (*gpt2.SIZES, *llama.SIZES)


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type[nn.Module]
    from_pretrained: Callable[..., nn.Module]  # (folder or hub name, dtype, dropout) -> model
    export_hf: Callable[..., Path]  # (model, out_dir, tokenizer, extra_files, template, max_len) -> out_dir
    hf_config: Callable[[nn.Module, int | None], dict]  # (model, eos id) -> its config.json
    hf_state: Callable[[nn.Module], dict[str, torch.Tensor]]  # model -> tensors by checkpoint name


GPT2_FAMILY = Family(
    "gpt2",
    GPT2,
    gpt2_hf_io.from_pretrained,
    gpt2_hf_io.export_hf,
    lambda model, eos_id: gpt2_hf_io.config_to_hf(model.config, eos_id),
    gpt2_hf_io.qatune_to_hf,
)
LLAMA_FAMILY = Family(
    "llama",
    Llama,
    llama_hf_io.from_pretrained,
    llama_hf_io.export_hf,
    lambda model, eos_id: llama_hf_io.config_to_hf(model.config),  # the config's own eos ids
    llama_hf_io.qatune_to_hf,
)
# config.json's model_type -> family
FAMILIES: dict[str, Family] = {"gpt2": GPT2_FAMILY, **dict.fromkeys(llama_hf_io.ARCHITECTURES, LLAMA_FAMILY)}


def family_for(model_type: str | None, source: str = "config.json") -> Family:
    family = FAMILIES.get(model_type or "gpt2")
    if family is None:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})"
        )
    return family


def family_of(model: nn.Module) -> Family:
    for family in (GPT2_FAMILY, LLAMA_FAMILY):
        if isinstance(model, family.model_class):
            return family
    raise TypeError(f"{type(model).__name__} is not a model of a known family")


def model_type(model: nn.Module) -> str:
    """config.json's model_type of `model` (GPT-2's config has none: "gpt2")."""
    return getattr(model.config, "model_type", "gpt2")


def context_length(config) -> int:
    """Positions a model of `config` runs: its n_positions, or a shorter sliding window (Mistral,
    Qwen: positions past the window are refused rather than attended differently, see llama.py)."""
    window = getattr(config, "sliding_window", None)
    return min(config.n_positions, window or config.n_positions)


def read_config(folder: str | os.PathLike):
    """The model config (GPT2Config or LlamaConfig) a local folder's config.json describes, without
    reading its weights."""
    config_file = Path(folder) / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{folder} has no config.json")
    hf = json.loads(config_file.read_text())
    if family_for(hf.get("model_type"), str(config_file)) is LLAMA_FAMILY:
        return llama_hf_io.config_from_hf(hf, source=str(config_file))
    return gpt2_hf_io.config_from_hf(hf)


def from_pretrained(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, dropout: float | None = None
) -> nn.Module:
    """A model of whichever family the checkpoint's config.json names, with its weights."""
    folder = resolve_checkpoint_dir(name_or_path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{folder} has no config.json")
    model_type = json.loads(config_file.read_text()).get("model_type")
    return family_for(model_type, str(config_file)).from_pretrained(folder, dtype=dtype, dropout=dropout)


def export_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    extra_files=None,
    template: dict | None = None,
    max_len: int | None = None,
) -> Path:
    """Write `model` as the transformers folder of its own family; with a tokenizer, `template`
    becomes its Jinja chat_template and `max_len` its model_max_length (`qatune.model.hf_io.export_hf`)."""
    return family_of(model).export_hf(model, out_dir, tokenizer, extra_files, template=template, max_len=max_len)


def build_model(name_or_path: str, random_init: bool = False, **overrides) -> nn.Module:
    """A named size with random weights (`random_init`; the family is the one whose SIZES holds
    the name), or pretrained weights of whichever family the folder's config.json names.
    `overrides` are shape fields (n_layer, n_embd, n_head, n_kv_head, n_positions, vocab_size;
    random init only) and dropout."""
    if random_init:
        if name_or_path in llama.SIZES:
            return random_llama(name_or_path, **overrides)
        if name_or_path not in gpt2.SIZES:
            raise UserError(f"random init needs a named size ({', '.join(SIZE_NAMES)}), got {name_or_path!r}")
        if overrides.get("n_kv_head") is not None:
            raise UserError(f"n_kv_head applies to Llama-family sizes; {name_or_path} has one key/value per head")
        overrides.pop("n_kv_head", None)
        return gpt2_hf_io.build_model(name_or_path, random_init=True, **overrides)
    shape = sorted(set(overrides) - {"dropout"})
    if shape:
        raise UserError(f"{shape[0]} only applies to a randomly initialised model")
    return from_pretrained(name_or_path, dropout=overrides.get("dropout"))


def random_llama(name: str, **overrides) -> Llama:
    """A Llama-family size with fresh weights. A new width or head count keeps head_dim =
    n_embd / n_head (as these models are built), and a new width keeps the size's MLP ratio
    (SmolLM2's d_ff is 8/3 d), so a shrunken model is the same architecture, smaller."""
    config = llama.SIZES[name]
    fields = {k: v for k, v in overrides.items() if v is not None}
    n_embd, n_head = fields.get("n_embd", config.n_embd), fields.get("n_head", config.n_head)
    if "n_embd" in fields or "n_head" in fields:
        if n_embd % n_head:
            raise UserError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        fields["head_dim"] = n_embd // n_head
    if "n_embd" in fields:
        fields["d_ff"] = round(config.d_ff * n_embd / config.n_embd)
    return Llama(dataclasses.replace(config, **fields))

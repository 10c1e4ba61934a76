"""Hugging Face `transformers` GPT-2 folders in and out (weights and config; not the training
checkpoints of a run, which are `qatune.train.checkpoints`).

In: a hub name (`gpt2-large`, through huggingface_hub, safetensors preferred) or a local folder in
the `transformers` layout. Every key is mapped strictly: a missing, unexpected or mis-shaped
tensor is an error that names it. HF's GPT-2 stores its projections as `Conv1D` (in, out); ours
are `nn.Linear` (out, in), so those four weights are transposed both ways.

Out: `export_hf` writes a folder `transformers.AutoModelForCausalLM.from_pretrained` loads with
no missing or unexpected weights, plus the tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qatune.data.chat_template import to_jinja
from qatune.data.templates import Template
from qatune.errors import UserError
from qatune.model.gpt2 import GPT2, SIZES, GPT2Config
from qatune.utils.files import atomic_dir
from qatune.utils.hub import (
    looks_like_local_path,
    model_download_hint,
    offline_mode,
    unreachable_message,
    unreachable_reason,
)

# Conv1D weights in HF's GPT-2: stored (in, out).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers that older HF checkpoints carry (the causal mask); safe to ignore.
_BUFFERS = (".attn.bias", ".attn.masked_bias")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SHARD_INDEX = "model.safetensors.index.json"


class CheckpointError(UserError):
    pass


def config_from_hf(hf: dict) -> GPT2Config:
    """Our config from a `config.json` dict written by transformers."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise CheckpointError(f"n_inner={hf['n_inner']} is not 4*n_embd; qatune's GPT-2 uses d_ff = 4*d")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"activation_function={hf['activation_function']!r} is not GELU(tanh)")
    if hf.get("tie_word_embeddings", True) is False:
        raise CheckpointError("tie_word_embeddings=false: qatune's LM head is tied to the token embedding")
    return GPT2Config(
        n_layer=hf.get("n_layer", 12),
        n_embd=n_embd,
        n_head=hf.get("n_head", 12),
        n_positions=hf.get("n_positions", 1024),
        vocab_size=hf.get("vocab_size", 50257),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )


def config_to_hf(config: GPT2Config, eos_id: int | None = None) -> dict:
    from transformers import GPT2Config as HFConfig

    eos_id = config.vocab_size - 1 if eos_id is None else eos_id  # GPT-2's <|endoftext|> is the last id

    hf = HFConfig(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        layer_norm_epsilon=config.layer_norm_epsilon,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )
    return hf.to_dict()


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise config + weights of a hub repo (safetensors first): from the
    local cache when there, else downloaded. A name that looks like a path is never sent to the
    hub, and an unreachable hub is one line within seconds, not minutes of retries."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a folder with config.json and weights")
    repo = str(name_or_path)
    if looks_like_local_path(repo):
        raise CheckpointError(f"{repo}: no such folder")
    cached = _hub_files(repo, local_files_only=True)
    if cached is not None:
        return cached
    if offline_mode():
        raise CheckpointError(
            f"{repo!r} is not a local folder and not in the local cache (HF_HUB_OFFLINE is set); "
            f"{model_download_hint(repo)}"
        )
    reason = unreachable_reason()
    if reason:
        raise CheckpointError(unreachable_message(repo, "folder", reason, model_download_hint(repo)))
    try:
        return _hub_files(repo, local_files_only=False)
    except Exception as e:  # unknown repo, no permission, network cut mid-way: say which and why
        raise CheckpointError(
            f"{repo!r} is neither a local folder nor a loadable hub model ({type(e).__name__}: {e})"
        ) from e


def _hub_files(repo: str, local_files_only: bool) -> Path | None:
    """The snapshot folder holding config.json and the weights (safetensors first); None when
    `local_files_only` and the cache lacks them."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config_file = huggingface_hub.hf_hub_download(repo, "config.json", local_files_only=local_files_only)
        for weights in _WEIGHT_FILES:
            try:
                huggingface_hub.hf_hub_download(repo, weights, local_files_only=local_files_only)
                return Path(config_file).parent
            except EntryNotFoundError:  # LocalEntryNotFoundError too: try the next weights file
                continue
        if _hub_shards(repo, local_files_only):
            return Path(config_file).parent
    except Exception:
        if local_files_only:  # not cached, an invalid repo id, a broken cache: the real attempt says what
            return None
        raise
    if local_files_only:
        return None
    return Path(config_file).parent  # no weights on the hub: read_hf_state_dict names the folder


def _hub_shards(repo: str, local_files_only: bool) -> bool:
    """Download a sharded checkpoint (models over a few GB: the index and every shard it names);
    False when the repo has no safetensors index."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index = huggingface_hub.hf_hub_download(repo, _SHARD_INDEX, local_files_only=local_files_only)
    except EntryNotFoundError:
        return False
    for shard in sorted(set(json.loads(Path(index).read_text())["weight_map"].values())):
        huggingface_hub.hf_hub_download(repo, shard, local_files_only=local_files_only)
    return True


def read_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        f = folder / name
        if f.exists():
            if name.endswith(".safetensors"):
                return load_file(str(f))
            return torch.load(f, map_location="cpu", weights_only=True)
    if (folder / _SHARD_INDEX).exists():
        return _read_shards(folder, folder / _SHARD_INDEX)
    raise CheckpointError(f"{folder} holds no weights (looked for {', '.join(_WEIGHT_FILES)})")


def _read_shards(folder: Path, index_file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint; every tensor the index names must be in its shard."""
    weight_map = json.loads(index_file.read_text())["weight_map"]
    sd = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).exists():
            raise CheckpointError(f"{index_file}: shard {shard!r} is missing")
        tensors = load_file(str(folder / shard))
        absent = [k for k, f in weight_map.items() if f == shard and k not in tensors]
        if absent:
            raise CheckpointError(
                f"{folder / shard}: holds no tensor {absent[0]!r}, which {index_file.name} places there"
            )
        sd.update(tensors)
    return sd


def check_keys(source: str, missing: list[str], unexpected: list[str]) -> None:
    """One error naming the checkpoint's missing and unexpected tensors (the first 8 of each)."""
    if not (missing or unexpected):
        return
    named = [(what, keys) for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    parts = [f"{what} keys: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}" for what, keys in named]
    raise CheckpointError(f"{source}: " + "; ".join(parts))


def hf_to_qatune(hf_sd: dict[str, torch.Tensor], model: GPT2, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map HF GPT-2 keys to ours, strictly: every parameter present once, right shape."""
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    tied_head = None
    for key, tensor in hf_sd.items():
        k = key.removeprefix("transformer.")
        if k == "lm_head.weight":
            tied_head = tensor
            continue
        if k.endswith(_BUFFERS) and k not in expected:
            continue
        if k not in expected:
            unexpected.append(key)
            continue
        want = tuple(expected[k].shape)
        if k.endswith(_CONV1D):
            want = want[::-1]  # stored as Conv1D (in, out)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {want}")
        out[k] = (tensor.t() if k.endswith(_CONV1D) else tensor).contiguous()
    check_keys(source, [k for k in expected if k not in out], unexpected)
    if tied_head is not None and not torch.equal(tied_head, out["wte.weight"]):
        raise CheckpointError(f"{source}: lm_head.weight differs from the token embedding; qatune ties them")
    return out


def qatune_to_hf(model: GPT2) -> dict[str, torch.Tensor]:
    sd = {}
    for k, t in model.state_dict().items():
        if k.endswith(_CONV1D):
            t = t.t()
        sd["transformer." + k] = t.detach().to("cpu").contiguous()
    return sd


def from_pretrained(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, dropout: float | None = None
) -> GPT2:
    """Load GPT-2 weights from a hub name or a local transformers-layout folder; `dropout` sets the
    rate for fine-tuning (the checkpoint's own pdrop values are not read: qatune has one rate)."""
    folder = resolve_checkpoint_dir(name_or_path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{folder} has no config.json")
    hf = json.loads(config_file.read_text())
    config = config_from_hf(hf)
    if dropout is not None:
        config = dataclasses.replace(config, dropout=dropout)
    with torch.device("meta"):
        model = GPT2(config)
    state = read_hf_state_dict(folder)
    if "GPT2ForSequenceClassification" in (hf.get("architectures") or []):
        state.pop("score.weight", None)  # a reward model's backbone; its head: qatune.model.reward
    sd = hf_to_qatune(state, model, source=str(folder))
    model.load_state_dict(sd, assign=True)
    return model.to(dtype)


def build_model(name_or_path: str, random_init: bool = False, **overrides) -> GPT2:
    """A named size with random weights (`random_init`), or pretrained weights from hub/folder."""
    if random_init:
        if name_or_path not in SIZES:
            raise UserError(f"random_init needs a named size ({', '.join(SIZES)}), got {name_or_path!r}")
        config = SIZES[name_or_path]
        if overrides:
            config = GPT2Config(**{**config.to_dict(), **overrides})
        return GPT2(config)
    shape = sorted(set(overrides) - {"dropout"})
    if shape:
        raise UserError(f"{shape[0]} only applies to a randomly initialised model")
    return from_pretrained(name_or_path, dropout=overrides.get("dropout"))


def write_hf_folder(
    out_dir: str | os.PathLike,
    hf_config: dict,
    state: dict[str, torch.Tensor],
    tokenizer=None,
    template: dict | None = None,
    max_len: int | None = None,
    generation: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a transformers folder atomically, for every family and head: config.json,
    generation_config.json (when given), model.safetensors, the tokenizer, `extra_files`.

    template: the run's prompt template (`Template.to_dict()`), written into the tokenizer config
    as a Jinja `chat_template`, so `tokenizer.apply_chat_template` prompts the model as qatune
    does; without one (or with `template: model`) the tokenizer's own chat template stays.
    max_len: the context the model was trained for, as the tokenizer's `model_max_length`."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            _tokenizer_settings(tmp, template, max_len)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir


def _tokenizer_settings(folder: Path, template: dict | None, max_len: int | None) -> None:
    """Put the run's chat template and the context size into the saved tokenizer_config.json (a
    separate chat_template.jinja from the source tokenizer would take precedence, so it is removed
    when the run's template replaces it)."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    if max_len is not None:
        config["model_max_length"] = max_len
    jinja = to_jinja(Template.from_dict(template)) if template is not None else None
    if jinja is not None:  # None: no template, or `template: model` never bound: the tokenizer's own stays
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        config.pop("chat_template", None)
    if jinja:
        config["chat_template"] = jinja
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(
    model: GPT2,
    out_dir: str | os.PathLike,
    tokenizer=None,
    extra_files: dict[str, str] | None = None,
    template: dict | None = None,
    max_len: int | None = None,
) -> Path:
    """A transformers GPT-2 folder (`write_hf_folder`); `model_max_length` is `max_len`, else the
    model's context. GPT-2 has no BOS or pad token of its own: EOS serves as both."""
    eos_id = tokenizer.eos_token_id if tokenizer is not None else None
    hf_config = config_to_hf(model.config, eos_id)
    eos_id = hf_config["eos_token_id"]
    generation = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    state = qatune_to_hf(model)
    max_len = max_len or model.config.n_positions
    return write_hf_folder(out_dir, hf_config, state, tokenizer, template, max_len, generation, extra_files)

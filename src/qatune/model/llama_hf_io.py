"""Llama-family checkpoints (llama, mistral, qwen2, qwen3) in and out of the transformers layout.

In: config.json is read field by field into `LlamaConfig`; what qatune does not compute (another
activation, YaRN or dynamic rotary scaling, partial rotary) is refused by name. Weights are
mapped strictly, one or many safetensors shards: a missing, unexpected or mis-shaped tensor is
an error that names it by its checkpoint name. Our parameter names are the checkpoint's without
`model.`; only the untied head differs (`lm_head.weight` there, `output.weight` here).

Out: `export_hf` writes config.json with the source's model_type and the fields its transformers
class reads, and model.safetensors, so `AutoModelForCausalLM.from_pretrained` rebuilds the same
network (tests/test_llama.py checks equal logits).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from qatune.model.hf_io import (
    CheckpointError,
    check_keys,
    read_hf_state_dict,
    resolve_checkpoint_dir,
    write_hf_folder,
)
from qatune.model.llama import ROPE_TYPES, Llama, LlamaConfig, Rope

# model_type -> the transformers class export names in `architectures`.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_HEAD = ("lm_head.weight", "output.weight")  # (checkpoint name, ours)
# Buffers older checkpoints carry (Llama 2's rotary frequencies): recomputed, never loaded.
_BUFFERS = (".rotary_emb.inv_freq",)


def config_from_hf(hf: dict, source: str = "config.json") -> LlamaConfig:
    """Our config from a `config.json` dict written by transformers (v4 or v5 rope fields)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not one of {', '.join(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r}; the SwiGLU MLP here uses silu")

    def need(key: str):
        if key not in hf:
            raise CheckpointError(f"{source}: field {key!r} is missing")
        return hf[key]

    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    n_layer = need("num_hidden_layers")
    qkv_bias, out_bias = _biases_from_hf(hf, model_type)
    eos = hf.get("eos_token_id")
    return LlamaConfig(
        model_type=model_type,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or n_embd // n_head,
        d_ff=need("intermediate_size"),
        n_positions=need("max_position_embeddings"),
        vocab_size=need("vocab_size"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=_rope_from_hf(hf, source),
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window(hf, n_layer),
        dropout=float(hf.get("attention_dropout", 0.0)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )


def _biases_from_hf(hf: dict, model_type: str) -> tuple[bool, bool]:
    """(q/k/v bias, output projection bias): Qwen2 always has the first and never the second;
    Llama and Qwen3 switch both with attention_bias; Mistral has neither."""
    if model_type == "qwen2":
        return True, False
    if model_type in ("llama", "qwen3"):
        bias = bool(hf.get("attention_bias", False))
        return bias, bias
    return False, False


def _rope_from_hf(hf: dict, source: str) -> Rope:
    # transformers v5 writes `rope_parameters` (theta inside); v4 wrote `rope_theta` + `rope_scaling`.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "dynamic":
        raise CheckpointError(
            f"{source}: rope_type 'dynamic' is not supported: its frequencies depend on the longest "
            "sequence in the batch, so a packed document would not attend as it does alone"
        )
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor={partial} is not supported (every dimension rotates)")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return Rope(theta=theta)
    if "factor" not in params:
        raise CheckpointError(f"{source}: rope_type {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return Rope(theta=theta, type="linear", factor=float(params["factor"]))
    return Rope(
        theta=theta,
        type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        ),
    )


def _sliding_window(hf: dict, n_layer: int) -> int | None:
    """The window of the layers that slide, None when none does. Mistral: every layer when
    sliding_window is set; Qwen2/3: layers from max_window_layers on, when use_sliding_window
    (transformers v5 also spells it out as layer_types)."""
    window = hf.get("sliding_window")
    if window is None:
        return None
    if hf.get("layer_types"):
        return window if "sliding_attention" in hf["layer_types"] else None
    if "use_sliding_window" in hf or hf.get("model_type") in ("qwen2", "qwen3"):
        slides = hf.get("use_sliding_window", False) and hf.get("max_window_layers", 28) < n_layer
        return window if slides else None
    return window


def config_to_hf(config: LlamaConfig) -> dict:
    """config.json for `config.model_type`'s transformers class, rope fields in the v4 spelling
    (`rope_theta`, `rope_scaling`), which transformers v4 and v5 both read."""
    c = config
    if c.model_type not in ARCHITECTURES:
        raise CheckpointError(f"model_type {c.model_type!r} is not one of {', '.join(ARCHITECTURES)}")
    if (c.qkv_bias, c.out_bias) != _biases_from_hf({"attention_bias": c.qkv_bias}, c.model_type):
        raise CheckpointError(f"{c.model_type} cannot express qkv_bias={c.qkv_bias}, out_bias={c.out_bias}")
    if c.qk_norm != (c.model_type == "qwen3") or (c.mlp_bias and c.model_type != "llama"):
        raise CheckpointError(f"{c.model_type} cannot express qk_norm={c.qk_norm}, mlp_bias={c.mlp_bias}")
    hf = {
        "architectures": [ARCHITECTURES[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.n_positions,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope.theta,
        "rope_scaling": _rope_to_hf(c.rope),
        "tie_word_embeddings": c.tie_embeddings,
        "attention_dropout": c.dropout,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
    }
    if c.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = c.qkv_bias
    if c.model_type == "llama":
        hf["mlp_bias"] = c.mlp_bias
    hf["sliding_window"] = c.sliding_window
    if c.model_type in ("qwen2", "qwen3"):  # every layer slides: the same below the window
        hf.update(use_sliding_window=c.sliding_window is not None, max_window_layers=0)
    return hf


def _rope_to_hf(rope: Rope) -> dict | None:
    if rope.type == "default":
        return None
    if rope.type == "linear":
        return {"rope_type": "linear", "factor": rope.factor}
    return {
        "rope_type": "llama3",
        "factor": rope.factor,
        "low_freq_factor": rope.low_freq_factor,
        "high_freq_factor": rope.high_freq_factor,
        "original_max_position_embeddings": rope.original_max_position_embeddings,
    }


def _ours(key: str) -> str | None:
    if key == _HEAD[0]:
        return _HEAD[1]
    return key.removeprefix("model.") if key.startswith("model.") else None


def _theirs(key: str) -> str:
    return _HEAD[0] if key == _HEAD[1] else "model." + key


def hf_to_qatune(hf_sd: dict[str, torch.Tensor], model: Llama, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map checkpoint keys to ours, strictly: every parameter present once, right shape."""
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    tied_head = None
    for key, tensor in hf_sd.items():
        k = _ours(key)
        if key.endswith(_BUFFERS):
            continue
        if k == _HEAD[1] and model.output is None:  # tied: a saved head must be the embedding
            tied_head = tensor
            continue
        if k not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[k].shape)}"
            )
        out[k] = tensor
    check_keys(source, [_theirs(k) for k in expected if k not in out], unexpected)
    if tied_head is not None and not torch.equal(tied_head, out["embed_tokens.weight"]):
        raise CheckpointError(
            f"{source}: lm_head.weight differs from the token embedding but tie_word_embeddings is true"
        )
    return out


def qatune_to_hf(model: Llama) -> dict[str, torch.Tensor]:
    # A tied head is not written: transformers ties it again from tie_word_embeddings.
    return {_theirs(k): t.detach().to("cpu").contiguous() for k, t in model.state_dict().items()}


def from_pretrained(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, dropout: float | None = None
) -> Llama:
    """A Llama-family model from a hub name or a local transformers-layout folder; `dropout`
    replaces the checkpoint's attention_dropout for fine-tuning."""
    folder = resolve_checkpoint_dir(name_or_path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{folder} has no config.json")
    hf = json.loads(config_file.read_text())
    config = config_from_hf(hf, source=str(config_file))
    if dropout is not None:
        config = dataclasses.replace(config, dropout=dropout)
    state = read_hf_state_dict(folder)
    if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        # a reward model's backbone (its head: qatune.model.reward): it has no LM head, so the
        # embedding serves as one
        state.pop("score.weight", None)
        config = dataclasses.replace(config, tie_embeddings=True)
    with torch.device("meta"):
        model = Llama(config)
    sd = hf_to_qatune(state, model, source=str(folder))
    model.load_state_dict(sd, assign=True)
    return model.to(dtype)


def export_hf(
    model: Llama,
    out_dir: str | os.PathLike,
    tokenizer=None,
    extra_files: dict[str, str] | None = None,
    template: dict | None = None,
    max_len: int | None = None,
) -> Path:
    """A transformers folder of the model's own architecture (`hf_io.write_hf_folder`); without a
    run template the tokenizer's own chat template stays, and `model_max_length` is `max_len`,
    else the model's context."""
    hf_config = config_to_hf(model.config)
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config[k] is not None}
    state = qatune_to_hf(model)
    max_len = max_len or model.config.n_positions
    return write_hf_folder(out_dir, hf_config, state, tokenizer, template, max_len, generation, extra_files)

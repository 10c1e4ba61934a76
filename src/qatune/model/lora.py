"""LoRA adapters on qatune's GPT-2 and Llama-family models: apply, disable, merge, and save/load
in peft's format.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a weight W (out x in) and learns
a low-rank update: y = x W^T + b + (alpha / r) * B(A(dropout(x))), with A (r x in) and B (out x r).
A starts Kaiming-uniform and B at zero (as peft, torchtune and microsoft/LoRA do), so the adapted
model computes exactly the base model at step 0.

`LoRALinear` keeps the base layer's own `weight` and `bias` Parameters under their old names, so
`h.0.attn.c_attn.weight` stays where every checkpoint mapping expects it; the adapter adds
`h.0.attn.c_attn.lora_A.weight` and `.lora_B.weight`, peft's names without the adapter name.

    apply_lora(model, LoRAConfig(r=16, alpha=32))   # in place; every base parameter frozen
    with adapters_disabled(model): ...              # the base model (DPO/PPO/GRPO reference)
    plain = merge_lora(model)                       # a plain model with W + (alpha/r) B @ A
    save_adapter(model, "run/adapter", cfg, base_model="gpt2")   # peft.PeftModel.from_pretrained loads it
    load_adapter(model, "run/adapter")              # and back onto our model

Targets are named per family (`Layout`): GPT-2's `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
`mlp.c_proj`; the Llama family's `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
`down_proj`, as peft and TRL configs name them. By default every one of them is adapted.

peft's layout: tensors `base_model.model.<transformers module name>.lora_A.weight` (r x in) and
`.lora_B.weight` (out x r), e.g. `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight` for
GPT2LMHeadModel and `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` for
LlamaForCausalLM (and Qwen2/Qwen3/Mistral, which name their modules alike). HF's GPT-2 stores its
projections as Conv1D (in x out), so its adapter config says `fan_in_fan_out: true`; the factors
themselves have the same shapes as for a Linear, which is why they are saved untransposed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qatune.errors import UserError
from qatune.model.attention import DecoderLM
from qatune.model.gpt2 import GPT2
from qatune.model.llama import Llama
from qatune.model.names import LLAMA_LORA_TARGETS
from qatune.model.names import LORA_TARGETS as TARGETS
from qatune.model.unwrap import plain_name
from qatune.utils.files import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_MODEL = "base_model.model."  # peft's prefix before the transformers model's own module names


@dataclass(frozen=True)
class Layout:
    """Where a family keeps the matrices LoRA adapts, and what peft calls them."""

    family: str
    blocks: str  # the ModuleList of blocks in qatune's model
    targets: dict[str, str]  # target name (as `lora.targets` says it) -> module path inside a block
    hf_root: str  # transformers' module holding the blocks: our `h.0...` is its `transformer.h.0...`
    fan_in_fan_out: bool  # transformers stores the weights in x out (GPT-2's Conv1D)

    @property
    def peft_prefix(self) -> str:
        return f"{PEFT_MODEL}{self.hf_root}."

    def resolve(self, targets: list[str] | None) -> list[str]:
        """The configured targets (None: all of this family's), checked against this family."""
        if targets is None:
            return list(self.targets)
        wrong = [t for t in targets if t not in self.targets]
        if wrong:
            raise UserError(
                f"lora.targets {wrong} are not {self.family} matrices; {self.family}'s are {', '.join(self.targets)}"
            )
        return list(targets)

    def module_names(self, n_layer: int, targets: list[str]) -> list[str]:
        return [f"{self.blocks}.{i}.{self.targets[t]}" for i in range(n_layer) for t in targets]


GPT2_LORA = Layout("GPT-2", "h", {t: t for t in TARGETS}, "transformer", fan_in_fan_out=True)
LLAMA_LORA = Layout("Llama-family", "layers", dict(LLAMA_LORA_TARGETS), "model", fan_in_fan_out=False)


def layout_of(model: nn.Module) -> Layout:
    if isinstance(model, GPT2):
        return GPT2_LORA
    if isinstance(model, Llama):
        return LLAMA_LORA
    raise TypeError(f"LoRA does not know where the matrices of a {type(model).__name__} are")


@dataclass
class LoRAConfig:
    """`model.lora` in the train config; None there means full fine-tuning."""

    r: int = 16  # rank of the update
    alpha: float = 32.0  # the update is scaled by alpha / r, so lr need not change with r
    dropout: float = 0.0  # dropout on the adapter's input only (train mode); the base path has none
    # Which matrices of every block get an adapter: GPT-2's attn.c_attn, attn.c_proj, mlp.c_fc,
    # mlp.c_proj; the Llama family's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    # None = every one of the model's (peft's "all-linear"): adapting only attention (the LoRA
    # paper's choice) trails full fine-tuning on instruction data, adapting every linear layer
    # closes most of the gap (QLoRA, Dettmers et al. 2023, section 4).
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.targets is None:
            return
        self.targets = list(self.targets)
        known = (*TARGETS, *LLAMA_LORA_TARGETS)
        unknown = [t for t in self.targets if t not in known]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise UserError(f"lora.targets {self.targets} must be distinct names among {', '.join(known)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: no copy, names unchanged
        self.bias = base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # nn.Linear's own default for A (kaiming_uniform with a=sqrt(5)), zero for B: step 0 = base.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        # Same order of operations as peft's lora.Linear, so the two agree to rounding.
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) of every adapter, names as in the plain model (wrapper prefixes removed)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield plain_name(name), module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_modules(model))


def apply_lora(model: DecoderLM, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and put an adapter on each target of every block, in place.

    Call it on the plain model, before DDP/FSDP/compile wrap it. Returns the adapted modules' names
    (`h.0.attn.c_attn`, `layers.0.self_attn.q_proj`, ...)."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    layout = layout_of(model)
    names = layout.module_names(model.config.n_layer, layout.resolve(cfg.targets))
    model.requires_grad_(False)
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, not an nn.Linear")
        setattr(parent, child, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout))
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under our names (`h.0.attn.c_attn.lora_A.weight`, ...)."""
    out = {}
    for name, module in lora_modules(model):
        out[f"{name}.lora_A.weight"] = module.lora_A.weight
        out[f"{name}.lora_B.weight"] = module.lora_B.weight
    return out


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run `model` as its base: every adapter skipped, nothing copied. The reference model of
    DPO/PPO/GRPO under LoRA. Restores each adapter's previous state on exit."""
    modules = [m for _, m in lora_modules(model)]
    if not modules:
        raise ValueError("the model has no LoRA adapters to disable")
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(modules, before):
            m.disabled = state


class BaseModelView(nn.Module):
    """The adapted model seen as its frozen base, without a second copy: every call runs `model`
    in eval mode with its adapters disabled (the reference model of DPO/PPO/GRPO under LoRA).

    `model` is deliberately not a submodule, so that `.eval()`, `.to()` or `.requires_grad_()` on
    the view never reach the model being trained; other attributes (`wte`, `lm_head`, `config`,
    `new_kv_cache` …) are the model's own, which are frozen anyway."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_base_model", model)

    def forward(self, *args, **kwargs):
        model = self._base_model
        training = model.training
        model.eval()
        try:
            with adapters_disabled(model):
                return model(*args, **kwargs)
        finally:
            model.train(training)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_base_model"), name)


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A plain model's state dict from an adapted one: W += scaling * B @ A (in fp32, cast back
    to W's dtype), adapter keys dropped. Works on a gathered (e.g. FSDP full) state dict."""
    out = {k: v for k, v in state.items() if not is_adapter_key(k)}
    for key in state:
        if key.endswith(".lora_A.weight"):
            prefix = key.removesuffix(".lora_A.weight")
            a, b, w = state[key], state[f"{prefix}.lora_B.weight"], state[f"{prefix}.weight"]
            delta = (b.float() @ a.float()) * scaling
            out[f"{prefix}.weight"] = (w.float() + delta.to(w.device)).to(w.dtype)
    return out


def merge_lora(model: DecoderLM) -> DecoderLM:
    """A plain model of the same family (no adapters) whose targeted weights are W + (alpha/r) B @ A;
    the export.

    The adapted model is left as it is; tensors that merging does not change are shared, not
    copied. A model without adapters is returned unchanged."""
    modules = list(lora_modules(model))
    if not modules:
        return model
    scaling = {m.scaling for _, m in modules}
    if len(scaling) != 1:
        raise ValueError(f"adapters with different alpha/r ({sorted(scaling)}) cannot be merged as one")
    with torch.no_grad():
        state = merged_state_dict(dict(model.state_dict()), scaling.pop())
    with torch.device("meta"):
        plain = type(model)(model.config)
    plain.load_state_dict(state, assign=True)
    plain.train(model.training)
    return plain.requires_grad_(False)


# --- peft's format --------------------------------------------------------------------------


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, cfg: LoRAConfig, base_model: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` atomically, in peft's layout for
    the model's transformers class (GPT2LMHeadModel, LlamaForCausalLM, ...). `base_model` is
    recorded as `base_model_name_or_path`."""
    from peft import LoraConfig  # the config file is peft's own serialization of its config

    layout = layout_of(model)
    state = adapter_state_dict(model)
    tensors = {layout.peft_prefix + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        # matched by suffix: GPT-2's "attn.c_proj" is not "mlp.c_proj"; Llama's names are unique
        target_modules=layout.resolve(cfg.targets),
        fan_in_fan_out=layout.fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        peft_cfg.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


# Fields of a peft LoRA config that change the computation in ways qatune's adapter does not do,
# when set to anything but their neutral value (absent, null, false, "none", empty).
_UNSUPPORTED = (
    "use_dora",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layer_replication",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "lora_bias",
    "bias",
)


def _neutral(value) -> bool:
    return value is None or value is False or value == "none" or (isinstance(value, (dict, list)) and not value)


def read_adapter_config(adapter_dir: str | os.PathLike, model: nn.Module | None = None) -> LoRAConfig:
    """Our LoRAConfig from a peft `adapter_config.json` for `model`'s family (GPT-2 when no model is
    given); anything we cannot reproduce is an error."""
    layout = GPT2_LORA if model is None else layout_of(model)
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON: {e}") from e
    if raw.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {raw.get('peft_type')!r}, not 'LORA'")
    for key in _UNSUPPORTED:
        if not _neutral(raw.get(key)):
            raise UserError(f"{path}: {key}={raw[key]!r} is not supported by qatune's LoRA")
    if bool(raw.get("fan_in_fan_out")) != layout.fan_in_fan_out:
        stored = "in x out (Conv1D)" if layout.fan_in_fan_out else "out x in (nn.Linear)"
        raise UserError(
            f"{path}: fan_in_fan_out={raw.get('fan_in_fan_out')!r}, but {layout.family} weights are stored {stored}"
        )
    first_block = f"{layout.hf_root}.{layout.blocks}.0"
    wanted = raw.get("target_modules")
    targets = [t for t, where in layout.targets.items() if _peft_matches(wanted, f"{first_block}.{where}")]
    if not targets:
        raise UserError(
            f"{path}: target_modules={wanted!r} match none of {layout.family}'s {', '.join(layout.targets)}"
        )
    try:
        r, alpha, dropout = int(raw["r"]), float(raw["lora_alpha"]), float(raw.get("lora_dropout") or 0.0)
        return LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=targets)
    except KeyError as e:
        raise UserError(f"{path}: missing field {e.args[0]!r}") from None
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def _peft_matches(target_modules, key: str) -> bool:
    """peft's rule: a string is a regex matched against the whole module name; a list matches a
    name equal to an entry or ending in "." + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return any(key == t or key.endswith(f".{t}") for t in target_modules or ())


def load_adapter(model: DecoderLM, adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Load a peft LoRA adapter (saved by `save_adapter`, or by peft for the model's transformers
    class) onto `model`: adapters are applied first if the model has none. Strict: every adapter
    tensor present once, with its shape. Returns the adapter's config."""
    adapter_dir = Path(adapter_dir)
    layout = layout_of(model)
    cfg = read_adapter_config(adapter_dir, model)
    if not has_lora(model):
        apply_lora(model, cfg)
    have = {name: m for name, m in lora_modules(model)}
    want = set(layout.module_names(model.config.n_layer, cfg.targets))
    if set(have) != want or any(m.r != cfg.r or m.scaling != cfg.scaling for m in have.values()):
        raise UserError(f"{adapter_dir}: the model's adapters differ from the adapter's config (r, alpha, targets)")
    file = adapter_dir / ADAPTER_WEIGHTS
    if not file.exists():
        raise UserError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    saved = load_file(str(file))
    expected = adapter_state_dict(model)
    # peft writes its keys without the adapter name; some versions keep ".default": accept both.
    by_name = {_strip_peft(k, layout): k for k in saved}
    missing = [k for k in expected if k not in by_name]
    unexpected = [by_name[k] for k in by_name if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{file}: "
            + "; ".join(
                f"{what}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected))
                if keys
            )
        )
    with torch.no_grad():
        for name, param in expected.items():
            tensor = saved[by_name[name]]
            if tensor.shape != param.shape:
                shapes = f"{tuple(tensor.shape)}, expected {tuple(param.shape)}"
                raise UserError(f"{file}: {by_name[name]} has shape {shapes}")
            param.copy_(tensor)
    return cfg


def _strip_peft(key: str, layout: Layout) -> str:
    key = key.removeprefix(layout.peft_prefix)
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")

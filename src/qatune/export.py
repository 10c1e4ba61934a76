"""`qatune export`: any saved model as a transformers folder (`export_saved`): a run folder (its
final export), an exported folder, a hub name, or a training checkpoint
(`<run>/checkpoints/step_*/`, single-process or sharded) loaded as a plain model plus what an
export needs (the run's template, max_len and the step), with a model card made from its run.
(The export at the end of a run is `qatune.train.export`; both write the folder with
`qatune.model.families.export_hf`, as the model's own family.)

    model, meta = load_checkpoint_model(Path("runs/x/checkpoints/step_00000400"))
    export_hf(model, out, tokenizer, {"qatune.json": ...}, meta["template"], meta["max_len"])

A GPT-2's shape is read from the saved tensors (no base model download); only the number of
heads is not in a tensor's shape: it comes from the run's config (a shape override or the named
size) or the base model folder's config.json. A Llama-family model (rotary settings, GQA, norms:
more than shapes say) takes its config from the base model folder's config.json, and the saved
tensors must have the shapes it gives. A LoRA run's checkpoint holds the adapters only: the
base is rebuilt as training built it (`model.name`, or the seed for random init), the adapters are
loaded onto it and merged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from qatune.config import load_config
from qatune.data.templates import Template, bind_template
from qatune.errors import UserError
from qatune.methods import METHODS, method_class
from qatune.methods.config import TrainConfig
from qatune.model import llama_hf_io
from qatune.model.attention import DecoderLM
from qatune.model.families import context_length, export_hf, from_pretrained, model_type
from qatune.model.gpt2 import GPT2, SIZES, GPT2Config
from qatune.model.llama import Llama
from qatune.model.lora import apply_lora, load_adapter, merge_lora
from qatune.model.reward import (
    SCORE_KEY,
    RewardModel,
    export_reward_hf,
    is_reward_model,
    load_reward_model,
    merge_reward_lora,
)
from qatune.model.tokenizer import load_tokenizer
from qatune.runs import EXPORT_DIR, META_FILE, load_tokenizer_for, read_meta, resolve_model_path
from qatune.train.checkpoints import STATE_FILE, load_trainable_state_dict
from qatune.train.method import Method
from qatune.train.model_card import CARD_FILE, final_metrics, model_card
from qatune.train.runtime import make_model

STEP_NAME = re.compile(r"^step_(\d{8})$")
BACKBONE = "backbone."  # RewardModel's language model, by its attribute name
DCP_DIR = "dcp"  # as in sharded_checkpoints (imported lazily here: it pulls torch.distributed.checkpoint)


class CheckpointFolderError(UserError):
    pass


def is_checkpoint_folder(path: Path) -> bool:
    """A folder written as a training checkpoint (or named like one)."""
    return path.is_dir() and (bool(STEP_NAME.match(path.name)) or (path / STATE_FILE).is_file())


def load_checkpoint_model(path: Path) -> tuple[DecoderLM | RewardModel, dict]:
    """The model weights of checkpoint `path` (a reward run's: the language model with its score
    head, a `RewardModel`), and {template, max_len, steps, truncation, tokenizer}."""
    path = Path(path)
    if not (path / STATE_FILE).is_file() or not (path / "config.yaml").is_file():
        raise CheckpointFolderError(f"{path}: not a complete checkpoint (no {STATE_FILE} and config.yaml)")
    cfg = load_config(TrainConfig, path / "config.yaml")
    if cfg.model.lora is not None:
        model, step = _lora_checkpoint_model(path, cfg)
        return model, _meta(cfg, model, step)
    sharded = (path / DCP_DIR).is_dir()
    shapes = _dcp_shapes(path) if sharded else None
    state = None
    if not sharded:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        shapes = {k: tuple(v.shape) for k, v in state["model"].items()}
    reward = SCORE_KEY in shapes  # a reward run saves RewardModel's keys: backbone.* and the head
    if reward:
        shapes = {k.removeprefix(BACKBONE): v for k, v in shapes.items() if k.startswith(BACKBONE)}
    model = _model_from_shapes(shapes, cfg, path)
    if reward:
        with torch.device("meta"):
            model = RewardModel(model)
    model = model.to_empty(device="cpu")
    if sharded:
        from qatune.train.sharded_checkpoints import load_sharded

        step = load_sharded(path, model)["step"]
    else:
        model.load_state_dict(state["model"])
        step = state["step"]
    return model, _meta(cfg, model, step)


def _meta(cfg, model: DecoderLM | RewardModel, step: int) -> dict:
    model = model.backbone if isinstance(model, RewardModel) else model
    return {
        "model_type": model_type(model),
        "template": cfg.data.get_template().to_dict(),
        "max_len": min(cfg.data.max_len, context_length(model.config)),
        "steps": step,
        "truncation": cfg.data.truncation,
        "tokenizer": cfg.tokenizer,
    }


def _lora_checkpoint_model(path: Path, cfg) -> tuple[DecoderLM, int]:
    """The base built as `train` builds it (seeded, so a random init is the same), the checkpoint's
    adapters loaded onto it, merged."""
    vocab = len(load_tokenizer(cfg.tokenizer)) if cfg.model.init == "random" else 0
    torch.manual_seed(cfg.seed)
    lm = make_model(cfg.model, vocab)
    apply_lora(lm, cfg.model.lora)
    # a reward run trains its score head beside the adapters (saved with them, under RewardModel's names)
    model = RewardModel(lm) if cfg.method == "reward" else lm
    if (path / DCP_DIR).is_dir():
        from qatune.train.sharded_checkpoints import load_sharded

        step = load_sharded(path, model)["step"]
    else:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        load_trainable_state_dict(model, state["model"], path)
        step = state["step"]
    return (merge_reward_lora(model) if isinstance(model, RewardModel) else merge_lora(model)), step


def _dcp_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    prefix = "model."
    return {k[len(prefix) :]: tuple(v.size) for k, v in metadata.items() if k.startswith(prefix) and hasattr(v, "size")}


def _model_from_shapes(shapes: dict[str, tuple[int, ...]], cfg, path: Path) -> DecoderLM:
    """The saved model on the meta device: a Llama-family one (embed_tokens) as its base folder's
    config.json says, checked against the saved shapes; else a GPT-2 of the saved shapes."""
    if "embed_tokens.weight" not in shapes:
        with torch.device("meta"):
            return GPT2(_config_from_shapes(shapes, cfg, path))
    base = Path(cfg.model.name) / "config.json"
    if not base.is_file():
        raise CheckpointFolderError(
            f"{path}: a Llama-family checkpoint needs its base model's config.json; model.name "
            f"{cfg.model.name!r} is not a local folder with one"
        )
    with torch.device("meta"):
        model = Llama(llama_hf_io.config_from_hf(json.loads(base.read_text()), source=str(base)))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(k for k in want.keys() | shapes.keys() if want.get(k) != shapes.get(k))
    if wrong:
        k = wrong[0]
        raise CheckpointFolderError(f"{path}: tensor {k!r} is saved as {shapes.get(k)}, but {base} gives {want.get(k)}")
    return model


def _config_from_shapes(shapes: dict[str, tuple[int, ...]], cfg, path: Path) -> GPT2Config:
    if "wte.weight" not in shapes or "wpe.weight" not in shapes:
        raise CheckpointFolderError(f"{path}: the saved model has no wte/wpe weights; not a qatune GPT-2 checkpoint")
    vocab_size, n_embd = shapes["wte.weight"]
    n_layer = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("h.")), default=-1)
    base = _base_config(cfg.model.name)
    n_head = cfg.model.n_head or (base or {}).get("n_head")
    if n_head is None:
        raise CheckpointFolderError(
            f"{path}: cannot tell the number of heads: model.name {cfg.model.name!r} is neither a GPT-2 size "
            "nor a local folder with config.json"
        )
    return GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=shapes["wpe.weight"][0],
        vocab_size=vocab_size,
        layer_norm_epsilon=(base or {}).get("layer_norm_epsilon", 1e-5),
    )


def _base_config(name: str) -> dict | None:
    if name in SIZES:
        return SIZES[name].to_dict()
    config = Path(name) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def exported_card(source: Path, meta: dict) -> str | None:
    """The model card `qatune export` writes beside what it exports from `source`: for a training
    checkpoint, one made from its run (the checkpoint's config, the run's metrics.jsonl up to its
    step, the data counts of the run's own export when there is one); for an exported folder, its
    own card; None for a folder without one (a hub model's files)."""
    source = Path(source)
    if not is_checkpoint_folder(source):
        card = source / CARD_FILE
        return card.read_text(encoding="utf-8") if card.is_file() else None
    cfg = load_config(TrainConfig, source / "config.yaml")
    run_dir = source.parent.parent
    run_meta = read_meta(str(run_dir / EXPORT_DIR)) or {}
    info = {k: run_meta[k] for k in ("data_report", "prompts") if k in run_meta}
    info.update(meta, method=cfg.method)
    method = method_class(cfg.method) if cfg.method in METHODS else Method
    metrics = final_metrics(run_dir, meta.get("steps"))
    return model_card(cfg, info, metrics, method)


def export_saved(model: str, out: str, tokenizer: str | None = None, adapter: str | None = None) -> tuple[Path, int]:
    """`qatune export`: what `model` names (a run folder, an exported folder, a checkpoint of a
    run or a hub name) as a transformers folder `out`, with its qatune.json and model card; the
    tokenizer config gets the run's template and context. `adapter`: a LoRA adapter in peft's
    format (a run's adapter/, or one peft saved) merged into `model` first; the base's model card
    is then not copied (it describes other weights). Returns (out, parameter count)."""
    source = Path(model)
    if adapter is not None and is_checkpoint_folder(source):
        raise UserError(f"{source}: --adapter merges into a model folder or hub name, not a training checkpoint")
    if is_checkpoint_folder(source):
        lm, meta = load_checkpoint_model(source)
        tok = checkpoint_tokenizer(source, tokenizer, meta.pop("tokenizer"))
        # `template: model` is the tokenizer's own chat template: saved bound, as a run's export is
        meta["template"] = bind_template(Template.from_dict(meta["template"]), tok).to_dict()
        card = exported_card(source, meta)
    else:
        path = resolve_model_path(model)
        reward = is_reward_model(path)
        if adapter is not None and reward:
            raise UserError(f"{model}: --adapter merges into a language model; this is a reward model")
        lm = load_reward_model(path) if reward else from_pretrained(path)
        meta = read_meta(path)
        tok = load_tokenizer_for(model, tokenizer)
        card = exported_card(Path(path), meta or {}) if Path(path).is_dir() and adapter is None else None
        if adapter is not None:
            load_adapter(lm, adapter)
            lm = merge_lora(lm)
    extra = {META_FILE: json.dumps(meta, indent=2, ensure_ascii=False) + "\n"} if meta else {}
    if card is not None:  # the model card: what the weights are, as the hub shows it
        extra[CARD_FILE] = card
    meta = meta or {}
    if isinstance(lm, RewardModel):  # a *ForSequenceClassification, as the reward run exports it
        written = export_reward_hf(lm, out, tok, extra, template=meta.get("template"), max_len=meta.get("max_len"))
        return written, sum(p.numel() for p in lm.parameters())
    written = export_hf(lm, out, tok, extra, template=meta.get("template"), max_len=meta.get("max_len"))
    return written, lm.num_parameters()


def checkpoint_tokenizer(checkpoint: Path, explicit: str | None, configured: str | None):
    """--tokenizer, else the run's own export's tokenizer, else the run config's setting."""
    run_export = checkpoint.parent.parent / EXPORT_DIR
    if explicit is None and (run_export / "tokenizer_config.json").exists():
        return load_tokenizer(run_export)
    return load_tokenizer(explicit or configured)

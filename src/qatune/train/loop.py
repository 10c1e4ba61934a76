"""The training loop, top to bottom: data in, steps, eval, checkpoints, plots, export.

    result = train(load_config(TrainConfig, "configs/tiny-cpu.yaml"))

`train` loads the tokenizer, the data and the model, then hands them to `fit`, which any caller
holding its own examples (the demo, tests, benchmarks) can use directly. Everything one optimizer
step does lives in `qatune.train.step` (train_step + optimizer_step), shared with distributed
training and the memory planner.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qatune.config import dump_yaml
from qatune.data.example import EncodedExample
from qatune.model.checkpoint import build_model, export_hf
from qatune.model.gpt2 import GPT2, SIZES
from qatune.train.config import ModelConfig, TrainConfig
from qatune.train.data import eval_batches, plan_run, split_holdout, step_batches
from qatune.train.dist_checkpoint import full_state_dict, is_sharded, load_sharded, save_sharded, saved_world_size
from qatune.train.distributed import check_plan_split, check_precision, rank_eval_batches, wrap_ddp, wrap_fsdp
from qatune.train.metrics import MetricsLogger, read_metrics
from qatune.train.optim import build_optimizer, build_scheduler
from qatune.train.plots import write_plots
from qatune.train.state import latest_checkpoint, load_checkpoint, save_checkpoint
from qatune.train.step import Precision, evaluate, optimizer_step, train_step
from qatune.utils.files import write_text_atomic

CHECKPOINTS = "checkpoints"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimizer steps completed
    final_eval: dict = field(default_factory=dict)
    export_dir: Path | None = None
    history: list[dict] = field(default_factory=list)  # the records logged by this process


def pick_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"  # CPU: bf16 autocast is slower than fp32 on most CPUs, and less exact


def make_model(cfg: ModelConfig, vocab_size: int) -> GPT2:
    """Random init of a named size (shape overrides allowed, vocab sized to the tokenizer), or
    pretrained weights from a hub name / local folder."""
    if cfg.init == "random":
        if cfg.name not in SIZES:
            raise ValueError(f"model.init=random needs a size name ({', '.join(SIZES)}), got {cfg.name!r}")
        shape = cfg.shape_overrides()
        return build_model(cfg.name, random_init=True, vocab_size=vocab_size, dropout=cfg.dropout, **shape)
    if cfg.shape_overrides():
        raise ValueError(f"model.{next(iter(cfg.shape_overrides()))} only applies to model.init=random")
    model = build_model(cfg.name)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but {cfg.name} only {model.config.vocab_size}")
    return model


def train(cfg: TrainConfig, resume: bool = False, rank: int = 0, world_size: int = 1, progress: bool = True):
    """Load tokenizer, data and model as `cfg` says, then `fit`."""
    from qatune.data.pipeline import load_examples
    from qatune.model.tokenizer import load_tokenizer

    if cfg.model.lora is not None:  # the adapters exist (qatune.model.lora); the loop does not apply them yet
        raise ValueError("model.lora: LoRA training is not available in this version of qatune train yet")
    if resume and latest_checkpoint(Path(cfg.out_dir) / cfg.name / CHECKPOINTS) is None:
        raise ValueError(f"--resume: no checkpoint in {Path(cfg.out_dir) / cfg.name / CHECKPOINTS}")
    tokenizer = load_tokenizer(cfg.tokenizer)
    loaded = load_examples(cfg.data, tokenizer)
    if rank == 0:
        print(f"data: {loaded.report.summary()}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model, len(tokenizer))
    meta = {"data_report": loaded.report.to_dict()}
    return fit(
        model, tokenizer, loaded.examples, cfg, loaded.template.to_dict(), resume, rank, world_size, progress, meta
    )


def fit(
    model: GPT2,
    tokenizer,
    examples: Sequence[EncodedExample],
    cfg: TrainConfig,
    template: dict | None = None,
    resume: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    meta: dict | None = None,
    on_step: Callable[[dict], None] | None = None,
    eval_examples: Sequence[EncodedExample] | None = None,
) -> TrainResult:
    """Train `model` on `examples` and write the run folder. The held-out set is `eval_examples`
    when given, else a seeded split of `examples` (cfg.eval.fraction)."""
    run_dir = Path(cfg.out_dir) / cfg.name
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device) if cfg.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = Precision(pick_precision(cfg.precision, device), device)
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    max_len = min(cfg.data.max_len, model.config.n_positions)
    too_long = [i for i, e in enumerate(examples) if len(e) > max_len]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {len(examples[too_long[0]])} tokens, over max_len {max_len}")

    if eval_examples is not None:  # the caller brings its own held-out set: no split
        train_set, eval_set = list(examples), list(eval_examples)
    else:
        train_idx, eval_idx = split_holdout(len(examples), cfg.eval.fraction, cfg.eval.max_examples, cfg.seed)
        train_set = [examples[i] for i in train_idx]
        eval_set = [examples[i] for i in eval_idx]
    ckpt_dir = run_dir / CHECKPOINTS
    ckpt = latest_checkpoint(ckpt_dir) if resume else None
    if resume and ckpt is None:
        raise ValueError(f"--resume: no checkpoint in {ckpt_dir}")
    # The global batch of every step is fixed by the world size the run started with, so a run
    # resumed on another number of ranks deals the same micro-batches out differently.
    plan_world = saved_world_size(ckpt, world_size)
    plan = plan_run([len(e) for e in train_set], cfg.batch, cfg.seed, cfg.epochs, cfg.max_steps, plan_world)
    check_plan_split(plan, world_size, plan_world, cfg.batch.accumulation)
    if plan_world != world_size and rank == 0:
        per_rank = cfg.batch.accumulation * plan_world // world_size
        print(
            f"resuming a run batched for {plan_world} rank(s) on {world_size}: {per_rank} micro-batches per rank",
            file=sys.stderr,
        )
    held_out = eval_batches(eval_set, cfg.batch.strategy, max_len, pad_id, cfg.eval.batch_size)
    held_out = rank_eval_batches(held_out, rank, world_size)

    model.to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.strategy == "fsdp":
        check_precision(cfg.strategy, precision.name)
        model = wrap_fsdp(model, cfg.fsdp)  # in place: the optimizer is built over the shards
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, len(plan))
    start, elapsed_before = 0, 0.0
    sharded = cfg.strategy != "none"  # DDP/FSDP: every rank writes its part of each checkpoint
    if resume:
        if is_sharded(ckpt):
            state = load_sharded(ckpt, model, optimizer, scheduler, precision.scaler, rank)
        elif cfg.strategy == "fsdp":
            raise ValueError(f"{ckpt} was written by a single process; resume it with strategy none or ddp")
        else:
            state = load_checkpoint(ckpt, model, optimizer, scheduler, precision.scaler)
        start, elapsed_before = state["step"], state["extra"].get("elapsed", 0.0)
    is_main = rank == 0
    config_yaml = dump_yaml(cfg)
    logger = None
    if is_main:
        write_text_atomic(run_dir / "config.yaml", config_yaml)
        logger = MetricsLogger(run_dir, resume_step=start if resume else None, tensorboard=cfg.tensorboard)
    step_model = torch.compile(model) if cfg.compile else model
    if cfg.strategy == "ddp":
        step_model = wrap_ddp(step_model, device)  # `model` stays the plain module (eval, export)

    def save(step: int, elapsed: float) -> None:
        extra = {"elapsed": elapsed}
        scaler = precision.scaler
        if sharded:
            keep, ranks = cfg.keep_checkpoints, (rank, world_size, plan_world)
            save_sharded(ckpt_dir, step, model, optimizer, scheduler, scaler, config_yaml, extra, keep, *ranks)
            return
        if plan_world != 1:  # a multi-rank run resumed on one process: keep its global batch
            extra["batch_world_size"] = plan_world
        save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, scaler, config_yaml, extra, cfg.keep_checkpoints)

    history: list[dict] = []
    clip_history = _clip_window(run_dir, start, cfg.monitor.clip_window, resume and is_main)
    final_eval: dict = {}
    bar = _Progress(len(plan), start, enabled=progress and is_main)
    t_start = time.perf_counter() - elapsed_before
    model.train()
    try:
        for step in range(start, len(plan)):
            t0 = time.perf_counter()
            batches = step_batches(plan, step, train_set, cfg.batch, max_len, pad_id, rank, world_size)
            watch = cfg.monitor.every > 0 and (step == 0 or (step + 1) % cfg.monitor.every == 0)
            stats = train_step(step_model, batches, precision, cfg.loss_chunk, measure_prompt_loss=watch)
            layer_norms = layer_grad_norms(model, precision, sharded=cfg.strategy == "fsdp") if watch else None
            update = optimizer_step(model, optimizer, scheduler, precision, cfg.optim.grad_clip)
            clip_history.append(update.clipped)
            dt = time.perf_counter() - t0
            done = step + 1
            record = {
                "step": done,
                "epoch": plan.epoch_of_step[step],
                "loss": stats.loss,
                "lr": update.lr,
                "grad_norm": update.grad_norm,
                "clipped": update.clipped,
                "tokens": stats.tokens,
                "label_tokens": stats.label_tokens,
                "examples": stats.examples,
                "tokens_per_s": stats.tokens / dt,
                "elapsed": time.perf_counter() - t_start,
            }
            record["clip_rate"] = sum(clip_history) / len(clip_history)
            if watch:
                record["prompt_loss"] = stats.prompt_loss  # measured on prompt tokens, not trained on
                record["grad_norm_layers"] = layer_norms
            if update.skipped:
                record["skipped"] = True
            last = done == len(plan)
            if held_out and (last or (cfg.eval.every and done % cfg.eval.every == 0)):
                record.update(evaluate(model, held_out, precision, cfg.loss_chunk))
                final_eval = {k: v for k, v in record.items() if k.startswith("eval_")}
            if logger and (done % cfg.log_every == 0 or last or "eval_loss" in record):
                logger.log(record)
            history.append(record)
            bar.update(record)
            if on_step:
                on_step(record)
            if cfg.save_every and done % cfg.save_every == 0 and not last and (is_main or sharded):
                save(done, record["elapsed"])
                if cfg.plots and is_main:
                    write_plots(run_dir)
    finally:
        bar.close()
        if logger:
            logger.close()
    steps = len(plan)
    export_dir = None
    if is_main or sharded:
        save(steps, time.perf_counter() - t_start)
    if cfg.export and cfg.strategy == "fsdp":
        model = _gathered(model, rank)  # collective; rank 0 gets a plain model with the full weights
    if is_main:
        if cfg.plots:
            write_plots(run_dir)
        if cfg.export:
            meta = {"truncation": cfg.data.truncation, **(meta or {})}
            export_dir = _export(model, tokenizer, run_dir, template, max_len, steps, final_eval, meta)
    return TrainResult(run_dir, steps, final_eval, export_dir, history)


def _clip_window(run_dir: Path, start: int, size: int, from_metrics: bool) -> deque:
    """The clipped flags of the last `size` steps; on resume, refilled from metrics.jsonl."""
    window: deque = deque(maxlen=max(1, size))
    if from_metrics:
        window.extend(bool(r.get("clipped")) for r in read_metrics(run_dir) if r.get("step", 0) <= start)
    return window


def layer_grad_norms(model, precision, sharded: bool) -> dict[str, float]:
    """Per-layer norms of the accumulated gradients, unscaled (fp16) and, under FSDP, summed over
    the shards of every rank."""
    from qatune.analysis.grads import layer_sq_norms
    from qatune.train.step import _global_sum

    sq = layer_sq_norms(model)
    names = sorted(sq)
    values = [sq[n] for n in names]
    if sharded:
        values = _global_sum(values, next(model.parameters()).device)
    scale = precision.scaler.get_scale() if precision.scaler is not None else 1.0
    return {n: math.sqrt(v) / scale for n, v in zip(names, values)}


def _export(model, tokenizer, run_dir: Path, template, max_len, steps, final_eval, meta) -> Path:
    info = {"template": template, "max_len": max_len, "steps": steps, **final_eval, **(meta or {})}
    text = json.dumps(info, indent=2, default=_json_default) + "\n"
    return export_hf(model, run_dir / "export", tokenizer, extra_files={"qatune.json": text})


def _gathered(model, rank: int) -> GPT2 | None:
    full = full_state_dict(model)
    if rank != 0:
        return None
    with torch.device("meta"):
        plain = GPT2(model.config)
    plain.load_state_dict(full, assign=True)
    return plain


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


class _Progress:
    """A rich progress bar with loss, lr and tokens/s; plain lines when stderr is not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.enabled, self._bar = total, enabled, None
        self._last_line = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, r: dict) -> None:
        if not self.enabled:
            return
        info = f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s"
        if "eval_loss" in r:
            info += f"  eval {r['eval_loss']:.4f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=r["step"], info=info)
        elif "eval_loss" in r or r["step"] == self.total or time.perf_counter() - self._last_line > 10:
            self._last_line = time.perf_counter()
            print(f"step {r['step']}/{self.total}  {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

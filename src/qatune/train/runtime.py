"""The training runtime: one loop for every method, top to bottom.

    result = run(method, model, tokenizer, cfg)

`run` trains `model` with a method (`qatune.train.method.Method`) as the config says
(`qatune.methods.config.TrainConfig`; `qatune.launch.train` builds the method a config names and
calls this). The runtime owns what every method shares — device and precision, wrapping (DDP,
FSDP2, activation checkpointing, compile), the optimizer and schedule, accumulation with global
normalization (`qatune.train.step.accumulate`), clipping, checkpoints and resume, metrics, plots,
eval calls, stop signals and export; a method (`qatune.methods`) supplies its data plan and its
step, and reads only its typed settings and its own config section (`RunContext`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from qatune.config import dump_yaml, from_dict, to_dict
from qatune.errors import MethodStop, RunError, TrainingStopped, UserError
from qatune.model import families
from qatune.model.attention import DecoderLM
from qatune.model.dropout import disable_dropout
from qatune.model.families import SIZE_NAMES, build_model
from qatune.model.lora import BaseModelView, apply_lora, has_lora
from qatune.model.unwrap import backbone
from qatune.runs import CHECKPOINTS_DIR
from qatune.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from qatune.train.config import ModelConfig
from qatune.train.distributed import check_precision, wrap_ddp, wrap_fsdp
from qatune.train.export import export_files, gathered
from qatune.train.grad_norms import layer_grad_norms
from qatune.train.method import Method, RunContext
from qatune.train.metrics import MetricsLogger, read_metrics
from qatune.train.optim import build_optimizer, build_scheduler
from qatune.train.plots import write_plots
from qatune.train.progress import Progress
from qatune.train.run_dir import RunLock, check_resume, prepare_fresh
from qatune.train.sharded_checkpoints import is_sharded, load_sharded, save_sharded, saved_world_size
from qatune.train.step import Precision, accumulate, model_device, optimizer_step, phase
from qatune.utils.device import default_device, warn_slow_cpu_precision
from qatune.utils.files import write_text_atomic
from qatune.utils.malloc import bound_kernel_caches, configure_cpu_allocator
from qatune.utils.precision_probe import RECORDED, PrecisionChoice, choose_precision


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimizer steps completed
    final_eval: dict = field(default_factory=dict)
    export_dir: Path | None = None
    history: list[dict] = field(default_factory=list)  # the records logged by this process


def pick_precision(name: str, device: torch.device, recorded: str | None = None) -> str:
    """`name`, or for `auto` what `qatune.utils.precision_probe` picks: bf16 on a CUDA GPU that
    supports it and on a CPU whose bf16 matmul measured clearly faster than fp32, else fp32.
    `recorded`: the precision the checkpoint a run resumes from saved (an auto run keeps it)."""
    return choose_precision(name, device, recorded).precision


def resolved_config(cfg, method: type[Method], device: torch.device, recorded_precision: str | None = None):
    """The settings a run uses: `method`'s own defaults filled in, precision `auto` as picked for
    `device` (or as the resumed checkpoint recorded it). What the run folder's config.yaml and every
    checkpoint record, and what a resume is compared against. Resolving twice changes nothing, so a
    saved config.yaml trains the same run."""
    cfg = method.resolve_config(cfg)
    dropout_off = method.train_without_dropout if cfg.model.disable_dropout is None else cfg.model.disable_dropout
    model = replace(cfg.model, disable_dropout=dropout_off)
    return replace(cfg, model=model, precision=pick_precision(cfg.precision, device, recorded_precision))


def recorded_precision(checkpoint: Path | None) -> str | None:
    """The precision a checkpoint's config.yaml saved, if any."""
    config_file = checkpoint / "config.yaml" if checkpoint is not None else None
    if config_file is None or not config_file.is_file():
        return None
    saved = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    return saved.get("precision") if isinstance(saved, dict) else None


PRECISION_FILE = "precision.json"


def record_precision_choice(run_dir: Path, choice: PrecisionChoice) -> None:
    """precision.json in the run folder: how `auto` picked (the probe's matmul rates on a CPU). A
    resumed run keeps the file its start wrote."""
    if choice.requested == "auto" and not choice.reason.startswith(RECORDED):
        write_text_atomic(run_dir / PRECISION_FILE, json.dumps(choice.to_json(), indent=1) + "\n")


def make_model(cfg: ModelConfig, vocab_size: int) -> DecoderLM:
    """Random init of a named size of either family (shape overrides allowed, vocab sized to the
    tokenizer), or pretrained weights of whichever family a hub name / local folder holds."""
    if cfg.init == "random":
        if cfg.name not in SIZE_NAMES:
            raise UserError(f"model.init=random needs a size name ({', '.join(SIZE_NAMES)}), got {cfg.name!r}")
        shape = cfg.shape_overrides()
        return build_model(cfg.name, random_init=True, vocab_size=vocab_size, dropout=cfg.dropout, **shape)
    if cfg.shape_overrides():
        raise UserError(f"model.{next(iter(cfg.shape_overrides()))} only applies to model.init=random")
    model = families.from_pretrained(cfg.name, dropout=cfg.dropout)
    if model.config.vocab_size < vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but {cfg.name} only {model.config.vocab_size}")
    return model


def model_tokenizer(cfg: ModelConfig) -> str | None:
    """The tokenizer saved beside pretrained weights in a local folder, the default when the config
    names none (then $QATUNE_TOKENIZER, then the hub's "gpt2": `load_tokenizer(None)`)."""
    folder = Path(cfg.name)
    if cfg.init == "pretrained" and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return str(folder)
    return None


def dropout_seed(seed: int, rank: int) -> int:
    """The seed of `rank`'s random stream once the weights exist (dropout masks, sampling). The
    weights are initialised from `seed` on every rank alike; the masks must differ per rank, or
    data parallelism applies one mask to every rank's examples. seed + 1 + rank: never the init
    seed itself."""
    return seed + 1 + rank


def run(
    method: Method,
    model: DecoderLM,
    tokenizer,
    cfg,
    resume: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train `model` with `method` as `cfg` says; rank 0 holds the run folder's lock throughout."""
    run_dir = Path(cfg.out_dir) / cfg.name
    with RunLock(run_dir) if rank == 0 else contextlib.nullcontext():
        if rank == 0 and not resume:
            prepare_fresh(run_dir, overwrite)
        return _Run(method, model, tokenizer, cfg, resume, rank, world_size).loop(progress, on_step)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """`compile: true`: torch.compile with the token dimension dynamic from the first batch. Packed
    rows change length every batch; compiled for one length, the graph would be recompiled for
    the next (automatic dynamic shapes then follow, one recompile later). The forward has no graph
    break under compile (tests/test_compile.py)."""
    return torch.compile(model, dynamic=True)


class _Run:
    """The state of one training run: built once, then `loop`."""

    def __init__(self, method: Method, model: DecoderLM, tokenizer, cfg, resume, rank, world_size) -> None:
        device = default_device(cfg.device)
        if device.type == "cpu":
            bound_kernel_caches()  # before the precision probe's first bf16 matmul (utils/malloc.py)
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.ckpt_dir = self.run_dir / CHECKPOINTS_DIR
        self.ckpt = latest_checkpoint(self.ckpt_dir) if resume else None
        if resume and self.ckpt is None:
            raise UserError(f"--resume: no checkpoint in {self.ckpt_dir}")
        self.recorded_precision = recorded_precision(self.ckpt)
        self.precision_choice = choose_precision(cfg.precision, device, self.recorded_precision)
        cfg = resolved_config(cfg, type(method), device, self.recorded_precision)
        self.cfg, self.method, self.resume = cfg, method, resume
        if rank == 0 and self.precision_choice.requested == "auto":
            print(self.precision_choice.describe(), file=sys.stderr)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        precision = Precision(cfg.precision, device)
        if device.type == "cpu":
            warn_slow_cpu_precision(precision.name)
            configure_cpu_allocator()  # $QATUNE_MALLOC: keep freed memory mapped, or glibc's policy (utils/malloc.py)
        # The global batch of every step is fixed by the world size the run started with, so a run
        # resumed on another number of ranks deals the same micro-batches out differently.
        plan_world = saved_world_size(self.ckpt, world_size)
        ctx_args = (tokenizer, device, precision, rank, world_size, plan_world, self.run_dir, model)
        self.ctx = RunContext.for_method(cfg, method, *ctx_args)
        model.to(device)
        if cfg.model.lora is not None:  # base frozen, adapters added: before any copy, wrap or load
            apply_lora(model, cfg.model.lora)
        if method.needs_reference:  # the initial weights, before any checkpoint is loaded
            self.ctx.reference = reference_model(model)
        check_method_fits(method, cfg, plan_world, world_size)
        method.setup(self.ctx)
        self.plan = method.plan(self.ctx)
        if plan_world != world_size and rank == 0:
            per_rank = cfg.batch.accumulation * plan_world // world_size
            print(
                f"resuming a run batched for {plan_world} rank(s) on {world_size}: {per_rank} micro-batches per rank",
                file=sys.stderr,
            )
        self.trainable = self._wrap(without_dropout(method.wrap(model), method, cfg.model, rank == 0))
        torch.manual_seed(dropout_seed(cfg.seed, rank))  # after every weight exists; a resume restores its own
        self.optimizer = build_optimizer(self.trainable, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, len(self.plan))
        self.sharded = cfg.strategy != "none"  # DDP/FSDP: every rank writes its part of each checkpoint
        self.config_yaml = dump_yaml(cfg)
        self.start, self.elapsed_before = 0, 0.0
        if resume:
            self._restore()
        self.step_model = compile_model(self.trainable) if cfg.compile else self.trainable
        if cfg.strategy == "ddp":
            self.step_model = wrap_ddp(self.step_model, device)  # `trainable` stays unwrapped (eval, export)

    def _plain_model(self) -> DecoderLM:
        """A model of the run's family and shape (adapters included) to gather the trained weights into."""
        model = type(self.ctx.model)(self.ctx.model.config)
        if self.cfg.model.lora is not None:
            apply_lora(model, self.cfg.model.lora)
        return model

    def _wrap(self, trainable: torch.nn.Module) -> torch.nn.Module:
        trainable.to(self.ctx.device)
        for module in trainable.modules():  # the policy, and a separate critic when a method wraps one in
            if hasattr(module, "activation_checkpointing"):
                module.activation_checkpointing = self.cfg.activation_checkpointing
        backbone(trainable).attention_kernel = self.cfg.attention
        if self.cfg.strategy == "fsdp":
            check_precision(self.cfg.strategy, self.ctx.precision.name)
            trainable = wrap_fsdp(trainable, self.cfg.fsdp)  # in place: the optimizer is built over the shards
        return trainable

    # --- checkpoints ----------------------------------------------------------------------

    def _restore(self) -> None:
        ctx, scaler = self.ctx, self.ctx.precision.scaler
        if is_sharded(self.ckpt):
            state = load_sharded(self.ckpt, self.trainable, self.optimizer, self.scheduler, scaler, ctx.rank)
        elif self.cfg.strategy == "fsdp":
            raise UserError(f"{self.ckpt} was written by a single process; resume it with strategy none or ddp")
        else:
            state = load_checkpoint(self.ckpt, self.trainable, self.optimizer, self.scheduler, scaler)
        extra = state["extra"]
        config_class, method = type(self.cfg), type(self.method)  # the saved mapping loads as this run's config
        recorded = self.recorded_precision
        resolve = lambda saved: dump_yaml(resolved_config(from_dict(config_class, saved), method, ctx.device, recorded))
        check_resume(self.ckpt, state["step"], self.config_yaml, len(self.plan), extra.get("plan_steps"), resolve)
        self.method.load_state_dict(state.get("rank_extra", extra).get("method", {}))
        self.start, self.elapsed_before = state["step"], extra.get("elapsed", 0.0)

    def save(self, step: int, elapsed: float) -> None:
        """Checkpoint `step` (collective when sharded). A full disk is one clear line; the write is
        atomic, so the previous checkpoint stays the latest loadable one."""
        ctx, cfg = self.ctx, self.cfg
        extra = {"elapsed": elapsed, "plan_steps": len(self.plan)}
        method_state = {"method": self.method.state_dict()}
        scaler = ctx.precision.scaler
        # The last step's checkpoint goes without the optimizer's state: no step follows it (a
        # resumed finished run only exports), and AdamW's two moments are 2/3 of a full
        # fine-tune's checkpoint (GPT-2 small: 1.5 GB -> 0.5 GB written and fsynced).
        optimizer = self.optimizer if step < len(self.plan) else None
        try:
            if self.sharded:
                ranks = (ctx.rank, ctx.world_size, ctx.plan_world)
                args = (optimizer, self.scheduler, scaler, self.config_yaml, extra, cfg.keep_checkpoints)
                save_sharded(self.ckpt_dir, step, self.trainable, *args, *ranks, rank_extra=method_state)
                return
            if ctx.plan_world != 1:  # a multi-rank run resumed on one process: keep its global batch
                extra["batch_world_size"] = ctx.plan_world
            extra.update(method_state)
            args = (optimizer, self.scheduler, scaler, self.config_yaml, extra, cfg.keep_checkpoints)
            save_checkpoint(self.ckpt_dir, step, self.trainable, *args)
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise RunError(f"disk full writing the step-{step} checkpoint into {self.ckpt_dir}: {e}") from None
            raise

    # --- the loop ---------------------------------------------------------------------------

    def loop(self, progress: bool, on_step) -> TrainResult:
        cfg, ctx, plan = self.cfg, self.ctx, self.plan
        logger = None
        if ctx.is_main:
            write_text_atomic(self.run_dir / "config.yaml", self.config_yaml)
            record_precision_choice(self.run_dir, self.precision_choice)
            resume_step = self.start if self.resume else None
            logger = MetricsLogger(self.run_dir, resume_step, cfg.trackers, to_dict(cfg))
        history: list[dict] = []
        self.clip_history = _clip_window(self.run_dir, self.start, cfg.monitor.clip_window, self.resume and ctx.is_main)
        final_eval: dict = {}
        bar = Progress(len(plan), self.start, progress and ctx.is_main, self.method.progress_fields)
        self.t_start = time.perf_counter() - self.elapsed_before
        batches = _Prefetcher(plan, ctx, self.start)
        self.trainable.train()
        try:
            with _StopSignals() as stop:
                for step in range(self.start, len(plan)):
                    try:
                        with phase("data"):  # waits for the prefetch; an online method samples its rollouts here
                            micro = batches.get(step)
                        record = self._train_step(step, micro)
                    except MethodStop:
                        self._checkpoint(step, time.perf_counter() - self.t_start)  # the steps done
                        raise
                    done, last = step + 1, step + 1 == len(plan)
                    if last or (cfg.eval.every and done % cfg.eval.every == 0):
                        with phase("eval"):
                            evaluated = self.method.evaluate(self.trainable)
                        record.update(evaluated)
                        final_eval = evaluated or final_eval
                    with phase("logging"):
                        if logger and (done % cfg.log_every == 0 or last or "eval_loss" in record):
                            logger.log(record)
                        history.append(record)
                        bar.update(record)
                    if on_step:
                        on_step(record)
                    signum = stop.agreed(model_device(self.trainable))
                    if signum and not last:
                        self._stop(done, record["elapsed"], signum)
                    if cfg.save_every and done % cfg.save_every == 0 and not last:
                        with phase("checkpoint"):
                            self._checkpoint(done, record["elapsed"])
            return self._finish(final_eval, history)
        finally:
            batches.close()
            bar.close()
            if logger:  # after _finish: the trackers take the final plots as artifacts
                logger.close()

    def _train_step(self, step: int, micro: list) -> dict:
        """One optimizer step over this rank's micro-batches; returns its metrics record."""
        cfg, precision, t0 = self.cfg, self.ctx.precision, time.perf_counter()
        watch = cfg.monitor.every > 0 and (step == 0 or (step + 1) % cfg.monitor.every == 0)
        try:
            totals = accumulate(self.step_model, self.method, micro, precision, monitor=watch)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            _raise_if_out_of_memory(e, step, micro)
            raise
        layer_norms = None
        if watch:
            with phase("monitor"):
                layer_norms = layer_grad_norms(self.trainable, precision, cfg.strategy == "fsdp")
        update = optimizer_step(self.trainable, self.optimizer, self.scheduler, precision, cfg.optim.grad_clip)
        self.clip_history.append(update.clipped)
        record = {
            "step": step + 1,
            "epoch": self.plan.epoch_of(step),
            "loss": totals.loss,
            "lr": update.lr,
            "grad_norm": update.grad_norm,
            "clipped": update.clipped,
            "tokens": totals.tokens,
            **self.method.summarize(totals.totals, totals.count),
            "examples": totals.examples,
            "tokens_per_s": totals.tokens / (time.perf_counter() - t0),
            "elapsed": time.perf_counter() - self.t_start,
            "clip_rate": sum(self.clip_history) / len(self.clip_history),
        }
        if layer_norms is not None:
            record["grad_norm_layers"] = layer_norms
        if update.skipped:
            record["skipped"] = True
        return record

    def _checkpoint(self, step: int, elapsed: float) -> None:
        if self.ctx.is_main or self.sharded:
            self.save(step, elapsed)
            if self.cfg.plots and self.ctx.is_main:
                write_plots(self.run_dir, self.method.plots)

    def _stop(self, step: int, elapsed: float, signum: int) -> None:
        self._checkpoint(step, elapsed)
        name = signal.Signals(signum).name
        raise TrainingStopped(
            f"stopped by {name} after step {step}/{len(self.plan)}; checkpoint in {self.ckpt_dir}: "
            "continue with --resume",
            signum,
        )

    def _finish(self, final_eval: dict, history: list[dict]) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        steps = len(self.plan)
        if ctx.is_main or self.sharded:
            with phase("checkpoint"):
                self.save(steps, time.perf_counter() - self.t_start)
        model = self.trainable
        if cfg.export and cfg.strategy == "fsdp":  # collective; rank 0 gets a plain model with the full weights
            model = gathered(model, ctx.rank, lambda: self.method.wrap(self._plain_model()))
        export_dir = None
        if ctx.is_main:
            if cfg.plots:
                write_plots(self.run_dir, self.method.plots)
            if cfg.export:
                info = {**self.method.export_info(), "model_type": families.model_type(self.ctx.model), "steps": steps}
                info.update(final_eval)
                files = export_files(cfg, self.run_dir, info, self.method)
                export_dir = self.method.export(model, ctx, info, files)
        return TrainResult(self.run_dir, steps, final_eval, export_dir, history)


def check_method_fits(method: Method, cfg, plan_world: int, world_size: int) -> None:
    """What the runtime refuses for `method` (its declared `*_unsupported`), before its setup."""
    if cfg.strategy == "fsdp" and method.fsdp_unsupported:
        raise UserError(f"method {method.name}: strategy fsdp is not supported ({method.fsdp_unsupported}); use ddp")
    if cfg.batch.accumulation != 1 and method.accumulation_unsupported:
        raise UserError(f"batch.accumulation does not apply to method {method.name}: {method.accumulation_unsupported}")
    if method.fixed_world_size and plan_world != world_size:
        raise UserError(f"this {method.name} run was started on {plan_world} rank(s); resume it on as many")


def without_dropout(module: torch.nn.Module, method: Method, cfg: ModelConfig, main: bool) -> torch.nn.Module:
    """`module` with dropout off when model.disable_dropout (resolved: the method's preference when
    the config left it unset) says so."""
    if cfg.disable_dropout and disable_dropout(module) and main:
        print(
            f"method {method.name} trains without dropout (model.dropout={cfg.dropout} and any other rate set to 0: "
            "its loss compares the training forward with an eval-mode one); model.disable_dropout=false keeps it",
            file=sys.stderr,
        )
    return module


def reference_model(model: DecoderLM) -> torch.nn.Module:
    """The frozen initial model: under LoRA the base itself with its adapters off (no copy),
    otherwise a frozen copy of the initial weights."""
    if has_lora(model):
        return BaseModelView(model)
    return copy.deepcopy(model).eval().requires_grad_(False)


def _raise_if_out_of_memory(e: Exception, step: int, micro_batches: Sequence) -> None:
    """Turn an allocation failure into one line that says what to change."""
    if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
        return
    shapes = ", ".join(
        f"{tuple(b.input_ids.shape)}" for b in micro_batches if hasattr(b, "input_ids")
    )  # fmt: skip
    raise RunError(
        f"out of memory in step {step + 1} (micro-batches of shape {shapes or '?'}): lower batch.size or "
        "data.max_len, or set activation_checkpointing=true; `qatune plan` shows where the memory goes "
        "for a model, sequence length and micro-batch",
        exit_code=2,
    ) from None


def _clip_window(run_dir: Path, start: int, size: int, from_metrics: bool) -> deque:
    """The clipped flags of the last `size` steps; on resume, refilled from metrics.jsonl."""
    window: deque = deque(maxlen=max(1, size))
    if from_metrics:
        window.extend(bool(r.get("clipped")) for r in read_metrics(run_dir) if r.get("step", 0) <= start)
    return window


class _Prefetcher:
    """The micro-batches of step k+1 are collated in a background thread while step k runs (when
    the plan allows it: an online method's batches depend on the model being trained)."""

    def __init__(self, plan, ctx: RunContext, start: int) -> None:
        self.plan, self.rank, self.world = plan, ctx.rank, ctx.world_size
        self.pin = ctx.device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qatune-batches") if plan.prefetch else None
        self._next: tuple[int, object] | None = None

    def _build(self, step: int) -> list:
        batches = self.plan.micro_batches(step, self.rank, self.world)
        if self.pin:  # page-locked host memory lets the copy to the GPU run asynchronously
            batches = [b.pin_memory() if hasattr(b, "pin_memory") else b for b in batches]
        return batches

    def get(self, step: int) -> list:
        if self._pool is None:
            return self._build(step)
        pending = self._next
        batches = pending[1].result() if pending is not None and pending[0] == step else self._build(step)
        self._next = (step + 1, self._pool.submit(self._build, step + 1)) if step + 1 < len(self.plan) else None
        return batches

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _StopSignals:
    """SIGINT/SIGTERM ask the run to stop: the step in flight finishes, a checkpoint is written,
    then the run ends with TrainingStopped. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint", file=sys.stderr)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (all ranks stop after the same step)."""
        from qatune.train.distributed import distributed

        if not distributed():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)

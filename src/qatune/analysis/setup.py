"""What a plan is about: a model, a batch shape and a training recipe, as one frozen dataclass.

The precision table says, per mode, how many bytes each kind of tensor takes, and what "master
weights" means in that mode:
- fp32: weights, gradients and Adam moments in fp32; no master copy (the weights are fp32).
- bf16 / fp16 (autocast, what `qatune train` does): the parameters stay fp32 and *are* the master
  weights; autocast makes a bf16/fp16 copy of each matmul weight per forward (kept for backward)
  and runs the matmuls, and the activations they produce, in 16 bits. fp16 adds loss scaling.
- bf16-master / fp16-master: 16-bit parameters and gradients plus a separate fp32 master copy in
  the optimizer (the DeepSpeed/Megatron layout behind the usual "16 bytes/param" figure:
  2 weights + 4 master + 2 grads + 8 Adam moments). fp32 gradient accumulation would make it 18.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from qatune.errors import UserError
from qatune.model.names import LORA_TARGETS as TARGETS

if TYPE_CHECKING:  # torch-free at import: `qatune plan --help` reads this module's tables
    from qatune.model.info import ModelConfig


@dataclass(frozen=True)
class Precision:
    weight: int  # bytes per parameter as stored on the device
    grad: int  # bytes per gradient element
    master: int  # bytes per parameter of a separate fp32 master copy (0: none)
    act: int  # bytes per element of matmul inputs/outputs (activations)
    residual: int  # bytes per element of the residual stream (LayerNorm inputs)
    autocast: bool  # matmul weights cast to 16 bits on the fly (copies kept for backward)
    note: str


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(4, 4, 0, 4, 4, False, "fp32 weights, grads and moments; no master copy"),
    "bf16": Precision(4, 4, 0, 2, 4, True, "autocast: fp32 weights are the master; bf16 matmuls and activations"),
    "fp16": Precision(4, 4, 0, 2, 4, True, "autocast + loss scaling: fp32 weights are the master; fp16 matmuls"),
    "bf16-master": Precision(2, 2, 4, 2, 2, False, "bf16 weights and grads + separate fp32 master copy"),
    "fp16-master": Precision(2, 2, 4, 2, 2, False, "fp16 weights and grads + separate fp32 master copy"),
}

# Optimizer state bytes per trainable parameter, and whether qatune's trainer supports it.
OPTIMIZERS: dict[str, tuple[float, str]] = {
    "adamw": (8.0, "two fp32 moments (supported)"),
    "adamw-8bit": (
        2.0 + 8 / 2048,
        "two 8-bit moments + one fp32 scale per 2048-block each (bitsandbytes; not supported by qatune train)",
    ),
    "sgd-momentum": (4.0, "one fp32 momentum buffer (not supported by qatune train)"),
    "sgd": (0.0, "no state (not supported by qatune train)"),
}

OFFLOADS = ("none", "optimizer", "all")
LOSSES = ("chunked", "full")
ATTENTION = ("flash", "efficient", "math")
# GPT-2's matrices LoRA can adapt, by their name inside a block (the Llama family's: `shapes.lora_targets`).
LORA_TARGETS = TARGETS


@dataclass(frozen=True)
class PlanSetup:
    config: ModelConfig  # GPT-2 or the Llama family
    seq_len: int = 1024
    micro_batch: int = 1
    accum: int = 1
    precision: str = "bf16"
    optimizer: str = "adamw"
    zero: int = 0  # 0 = none/DDP, 1 = optimizer state, 2 = + gradients, 3 = + parameters (FSDP full shard)
    gpus: int = 1
    offload: str = "none"  # "optimizer": optimizer state (+ master, + sharded grads) on the host; "all": + params
    checkpointing: bool = False
    lora_r: int = 0  # 0 = full fine-tuning
    # None: all of the family's (GPT-2's four, the Llama family's seven), as `model.lora` adapts by default
    lora_targets: tuple[str, ...] | None = None
    loss: str = "chunked"  # "chunked": our response-only fused loss; "full": B x T x V logits
    label_fraction: float = 0.5  # share of positions that carry a label (the response)
    packed: bool = False  # rows hold several examples: a (B, 1, T, T) block-causal mask is built
    attention: str = "flash"  # which SDPA kernel: what it saves for backward
    device: str = "cuda"
    chunk_size: int = 2048  # the LM head's chunk: kernels.loss.DEFAULT_CHUNK (not imported: this stays torch-free)
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        from qatune.analysis.shapes import lora_targets

        family_targets = lora_targets(self.config)
        if self.lora_targets is None:
            object.__setattr__(self, "lora_targets", family_targets)
        checks = [
            (self.precision in PRECISIONS, f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}"),
            (self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"),
            (self.zero in (0, 1, 2, 3), f"zero stage {self.zero} is not 0, 1, 2 or 3"),
            (self.offload in OFFLOADS, f"offload {self.offload!r} is not one of {', '.join(OFFLOADS)}"),
            (self.loss in LOSSES, f"loss {self.loss!r} is not one of {', '.join(LOSSES)}"),
            (self.attention in ATTENTION, f"attention {self.attention!r} is not one of {', '.join(ATTENTION)}"),
            (self.device in ("cuda", "cpu"), f"device {self.device!r} is not 'cuda' or 'cpu'"),
            (self.gpus >= 1 and self.micro_batch >= 1 and self.accum >= 1, "gpus, micro-batch and accum must be >= 1"),
            (
                1 <= self.seq_len <= self.config.n_positions,
                f"seq_len {self.seq_len} is outside 1..{self.config.n_positions}",
            ),
            (0.0 <= self.label_fraction <= 1.0, f"label_fraction {self.label_fraction} is outside [0, 1]"),
            (self.lora_r >= 0, f"lora_r {self.lora_r} is negative"),
            (
                all(t in family_targets for t in self.lora_targets) and (len(self.lora_targets) > 0 or not self.lora_r),
                f"LoRA targets must be among this model's {', '.join(family_targets)}; got {self.lora_targets}",
            ),
            (
                self.offload == "none" or self.zero >= 1 or self.gpus == 1,
                "offload needs a ZeRO stage >= 1 (or one GPU)",
            ),
            (
                self.seq_len <= (getattr(self.config, "sliding_window", None) or self.seq_len),
                f"seq_len {self.seq_len} exceeds the sliding window of {getattr(self.config, 'sliding_window', 0)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def prec(self) -> Precision:
        return PRECISIONS[self.precision]

    @property
    def tokens(self) -> int:
        """Positions computed per micro-batch (rows x width, padding included)."""
        return self.micro_batch * self.seq_len

    @property
    def label_tokens(self) -> int:
        return round(self.label_fraction * self.tokens)

    @property
    def head_rows(self) -> int:
        """Positions whose final hidden state is computed: with the chunked loss the model returns
        only the label rows (`outputs=`), so the final LayerNorm runs on those alone."""
        return self.label_tokens if self.loss == "chunked" else self.tokens

    @property
    def last_block_cut(self) -> bool:
        """Whether the last block runs its queries, MLP and LayerNorms on the label spans only:
        the chunked loss on packed rows with per-document attention (`LastBlockRows`)."""
        from qatune.model.gpt2 import packed_attention_kernel

        return self.loss == "chunked" and self.packed and packed_attention_kernel(self.device) == "documents"

    @property
    def last_block_rows(self) -> int:
        """Rows the last block computes after its keys and values. The plan's rows carry their
        labels at the end (as `measure`'s synthetic batch): the spans are exactly the labels."""
        return self.label_tokens if self.last_block_cut else self.tokens

    def label_spans(self) -> list[tuple[int, int]]:
        """(queries m, keys n) of each document's span in the last block, for the plan's layout:
        rows of two documents (T/2 each), labels at the end of each row."""
        B, T = self.micro_batch, self.seq_len
        per_row = [self.label_tokens // B + (r < self.label_tokens % B) for r in range(B)]
        docs = [(0, T // 2), (T // 2, T)]
        return [(end - max(start, T - k), end - start) for k in per_row if k for start, end in docs if T - k < end]

    def with_(self, **changes) -> PlanSetup:
        return replace(self, **changes)

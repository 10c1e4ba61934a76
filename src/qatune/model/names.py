"""Names of a GPT-2's parts, as data. Torch-free: `qatune plan --help` lists them as choices."""

from __future__ import annotations

# The matrices of a block LoRA can adapt, by their name inside the block.
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

"""Names of a model's parts, as data. Torch-free: `qatune plan --help` lists them as choices."""

from __future__ import annotations

# The matrices of a GPT-2 block LoRA can adapt, by their name inside the block ("c_proj" alone
# would be ambiguous: attention and MLP both have one).
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# The same for the Llama family, by the names peft, TRL and the model cards use (each is unique in
# a block), and where each lives inside the block.
LLAMA_LORA_TARGETS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}

"""The demo's tokenizer: GPT-2's when it is on this machine, else a byte-level BPE trained here.

Looked for, in order: --tokenizer, $QATUNE_TOKENIZER, ../shared/tokenizer/gpt2 (beside the
working directory or beside the source checkout). No network is ever used: on a fresh machine
the demo trains a small byte-level BPE (GPT-2's algorithm, a few hundred tokens) on its own
questions and answers, with <|endoftext|> as EOS.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from qatune.data.example import EOS_TEXT
from qatune.errors import UserError
from qatune.model.tokenizer import ENV_VAR, load_tokenizer

BUILTIN = "builtin"  # --tokenizer builtin: always train the small BPE


def local_gpt2_candidates() -> list[Path]:
    here = Path(__file__).resolve()
    return [Path.cwd().parent / "shared/tokenizer/gpt2", here.parents[3].parent / "shared/tokenizer/gpt2"]


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()


def find_local_gpt2(explicit: str | None = None) -> Path | None:
    """The first local folder with tokenizer files among the places above; None if none has."""
    for c in [explicit, os.environ.get(ENV_VAR), *local_gpt2_candidates()]:
        if c and c != BUILTIN and _has_tokenizer_files(Path(c)):
            return Path(c)
    return None


def train_bpe(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE trained on `texts`, as a transformers fast tokenizer with EOS = pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, any text
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TEXT, pad_token=EOS_TEXT, bos_token=EOS_TEXT)
    tok.padding_side = "left"
    return tok


def demo_tokenizer(explicit: str | None, corpus: Iterable[str]) -> tuple[object, str]:
    """(tokenizer, where it came from)."""
    if explicit != BUILTIN:
        found = find_local_gpt2(explicit)
        if found is not None:
            return load_tokenizer(found), str(found)
        if explicit:
            raise UserError(f"--tokenizer {explicit}: no tokenizer files there (use 'builtin' to train one)")
    return train_bpe(corpus), "byte-level BPE trained on the demo's own text"

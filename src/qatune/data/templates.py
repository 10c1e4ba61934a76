"""Prompt templates: the text the model sees before each answer.

A template is data (a few format strings), so it can be written in a config, saved in `qatune.json`
beside an exported model (`to_dict`) and rebuilt at generation time (`Template.from_dict`): the model
is always prompted exactly as it was trained.

    tpl = get_template("alpaca")
    tpl.render_prompt("Name a colour.")                  # the prompt text, response follows directly
    tpl.render_response("Blue")                           # the response text as trained ("plain": " Blue")
    tpl.render_conversation(messages)                     # [(text, trainable), ...] for training
    tpl.generation_pieces(history_ending_in_user_turn)    # the segments to continue, for `qatune chat`

`get_template("model")` is the model's own Jinja chat template instead (`model_template.ModelTemplate`,
bound to a tokenizer with `bind_template`): same method names, whole-conversation rendering.

The response is never part of a template string: it is tokenized separately and EOS is appended.
A template whose prompt ends in a word or punctuation mark ("Answer:") sets `response_prefix`
" ": GPT-2 writes a space before the next word as part of that word's token (" Paris"), so the
answer is trained as the token sequence the pretrained model itself would produce there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qatune.data.example import EOS_TEXT
from qatune.data.format_fields import check_fields
from qatune.data.model_template import MODEL, ModelTemplate
from qatune.data.records import DataError, Message

ALPACA_HEAD = "Below is an instruction that describes a task"


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str  # format string with {prompt}
    prompt_with_context: str  # with {prompt} and {context}, for records that carry an input/context
    system: str = "{system}\n\n"  # how a system message is written, once, before the first user turn
    system_prompt: str | None = None  # system text used when a record brings none
    response_prefix: str = ""  # put before a response that does not already start with whitespace

    def render_prompt(self, prompt: str, context: str = "", system_prompt: str | None = None) -> str:
        """System part (if any) + the prompt part; the response starts right after this text."""
        system = system_prompt if system_prompt is not None else self.system_prompt
        head = self.system.format(system=system) if system else ""
        return head + self.render_user(prompt, context)

    def render_user(self, prompt: str, context: str = "") -> str:
        """One user turn: `prompt_with_context` when the turn carries a passage, else `prompt`."""
        if context:
            return self.prompt_with_context.format(prompt=prompt, context=context)
        return self.prompt.format(prompt=prompt)

    def render_response(self, response: str) -> str:
        if not self.response_prefix or response[:1].isspace():
            return response
        return self.response_prefix + response

    def render_conversation(self, messages: list[Message]) -> list[tuple[str, bool]]:
        """(text, trainable) segments: system and user turns masked, assistant turns trainable.
        EOS is not in the texts: the encoder appends it after every trainable segment."""
        system = next((m.content for m in messages if m.role == "system"), self.system_prompt)
        segments: list[tuple[str, bool]] = []
        pending = self.system.format(system=system) if system else ""
        for m in messages:
            if m.role == "user":
                pending += self.render_user(m.content, m.context)
            elif m.role == "assistant":
                segments.append((pending, False))
                segments.append((self.render_response(m.content), True))
                pending = ""
        if pending:
            segments.append((pending, False))
        return segments

    def generation_pieces(self, messages: list[Message]) -> list[str]:
        """The segments to continue for a history that ends in a user turn, each to be tokenized on
        its own as training does (`encode.encode_pieces`). Earlier answers end with the literal EOS
        text, which the GPT-2 tokenizer maps to the EOS id, as in training."""
        if not messages or messages[-1].role != "user":
            raise ValueError("a generation prompt needs a conversation that ends with a user turn")
        return [text + (EOS_TEXT if trainable else "") for text, trainable in self.render_conversation(messages)]

    def generation_prompt(self, messages: list[Message]) -> str:
        """`generation_pieces` as one text (to show it; tokenize the pieces)."""
        return "".join(self.generation_pieces(messages))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Template | ModelTemplate:
        """A template saved by `to_dict` or written in a config; `name: model` (or a saved Jinja
        `chat_template`) is the model's own chat template (`ModelTemplate`)."""
        if not isinstance(d, dict):
            raise DataError(f"template: expected a name or a mapping, got {type(d).__name__}")
        if d.get("name") == MODEL or "chat_template" in d:
            return ModelTemplate.from_dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise DataError(f"template: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields))}")
        if not isinstance(d.get("prompt"), str):
            raise DataError("template: field 'prompt' (a format string with {prompt}) is missing")
        d = dict(d)
        d.setdefault("name", "custom")
        d.setdefault("prompt_with_context", d["prompt"].replace("{prompt}", "{prompt}\n\n{context}", 1))
        tpl = cls(**d)
        tpl.validate()
        return tpl

    def validate(self) -> None:
        check_fields("prompt", self.prompt, {"prompt"}, {"prompt"})
        check_fields("prompt_with_context", self.prompt_with_context, {"prompt", "context"}, {"prompt", "context"})
        check_fields("system", self.system, {"system"}, {"system"})
        if not isinstance(self.response_prefix, str):
            raise DataError("template: field 'response_prefix' must be a string")


TEMPLATES: dict[str, Template] = {
    # Question/answer. The space after "Answer:" belongs to the answer's first token (" Paris"), as
    # GPT-2 tokenizes running text; a prompt ending in "Answer: " would end in a lone " " token.
    "plain": Template(
        "plain", "Question: {prompt}\nAnswer:", "Question: {prompt}\n{context}\nAnswer:", response_prefix=" "
    ),
    # The data's prompt as it is: for sets like t0 whose prompts are already written out in full.
    "raw": Template("raw", "{prompt}", "{prompt}\n{context}"),
    "alpaca": Template(
        "alpaca",
        f"{ALPACA_HEAD}. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{prompt}\n\n### Response:\n",
        f"{ALPACA_HEAD}, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{prompt}\n\n### Input:\n{context}\n\n### Response:\n",
    ),
    "chat": Template(
        "chat",
        "### User:\n{prompt}\n\n### Assistant:\n",
        "### User:\n{prompt}\n\n{context}\n\n### Assistant:\n",
        system="### System:\n{system}\n\n",
    ),
    # Anthropic HH-RLHF's dialogue format; like `plain`, the space after "Assistant:" is the
    # answer's own (" No, sorry!"), as the data's text tokenizes.
    "hh": Template(
        "hh",
        "\n\nHuman: {prompt}\n\nAssistant:",
        "\n\nHuman: {prompt}\n\n{context}\n\nAssistant:",
        response_prefix=" ",
    ),
}


def get_template(
    name_or_dict: str | dict | Template | ModelTemplate, system_prompt: str | None = None
) -> Template | ModelTemplate:
    """A named template ("plain", "raw", "alpaca", "chat", "hh"), the model's own chat template
    ("model", see `model_template`), or one defined by a dict; `system_prompt` sets the system text
    used when a record brings none."""
    if isinstance(name_or_dict, (Template, ModelTemplate)):
        tpl = name_or_dict
    elif isinstance(name_or_dict, str):
        if name_or_dict == MODEL:
            tpl = ModelTemplate()
        elif name_or_dict not in TEMPLATES:
            names = ", ".join([*TEMPLATES, MODEL])
            raise DataError(f"unknown template {name_or_dict!r}; named templates: {names}")
        else:
            tpl = TEMPLATES[name_or_dict]
    else:
        tpl = Template.from_dict(name_or_dict)
    return dataclasses.replace(tpl, system_prompt=system_prompt) if system_prompt is not None else tpl


def bind_template(template: Template | ModelTemplate, tokenizer) -> Template | ModelTemplate:
    """The template ready to render with `tokenizer`: `model` takes the tokenizer's chat template
    and special tokens; qatune's own templates need nothing from it."""
    return template.bind(tokenizer) if isinstance(template, ModelTemplate) else template

"""`template: model`: conversations rendered by the model's own Jinja chat template, exactly as
`tokenizer.apply_chat_template` renders them, with the loss on the assistant turns it writes.

    tpl = get_template("model").bind(tokenizer)    # the tokenizer's chat_template, as it is
    text, spans = tpl.render_with_spans(messages)   # [start, end) characters of each assistant turn
    tpl.generation_prompt(history)                  # = apply_chat_template(history, add_generation_prompt=True)
    tpl.end_of_turn()                               # what the template writes after an answer: "<|im_end|>"

A turn's trained text is
- the template's `{% generation %}` ... `{% endgeneration %}` blocks, when it has them (what
  `apply_chat_template(..., return_assistant_tokens_mask=True)` marks);
- else what the turn adds to the conversation: render(messages[:i+1]) after
  render(messages[:i], add_generation_prompt=True). That is the answer and the end-of-turn token the
  template writes after it (`<|im_end|>`, `<|eot_id|>`), less the whitespace that follows the token
  (ChatML's newline before the next `<|im_start|>`): the model stops at the token, and TRL's
  training templates leave that newline out of their generation blocks too. This needs each
  prefix of the conversation to render as the start of the whole; a template that renders an
  earlier turn differently once later turns follow (Qwen3's drops earlier reasoning) is refused,
  naming the turn, unless it has generation markers.

Messages: a (prompt, response) record is the conversation [user, assistant]. A passage (`context`)
goes into the user message through `prompt_with_context`, by default "{prompt}\\n\\n{context}": the
question, a blank line, the passage, in the order qatune's own templates write them. `system_prompt`
is a system message put first when the conversation has none; with neither, the template writes
its own default (Qwen2.5's "You are Qwen ...", Llama 3's header with today's date).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from qatune.data.format_fields import check_fields
from qatune.data.records import DataError, Message

MODEL = "model"
DEFAULT_WITH_CONTEXT = "{prompt}\n\n{context}"
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # transformers' own test for the markers
PROBE = ("Hi", "Yes")  # a user turn and an answer no template trims or rewrites


class ChatTemplateError(DataError):
    """A chat template that cannot render a conversation, or whose assistant turns cannot be found."""


def tokenizer_template(tokenizer) -> str:
    """The tokenizer's Jinja chat template (tokenizer_config.json's `chat_template` or
    chat_template.jinja), or a one-line error naming the tokenizer."""
    jinja = getattr(tokenizer, "chat_template", None)
    if isinstance(jinja, dict):  # several named templates: apply_chat_template's default is "default"
        jinja = jinja.get("default")
    if not isinstance(jinja, str) or not jinja:
        raise ChatTemplateError(
            f"template 'model': the tokenizer {getattr(tokenizer, 'name_or_path', '') or ''!r} has no chat template "
            "(no chat_template in tokenizer_config.json, no chat_template.jinja); use one of qatune's templates "
            "(plain, raw, alpaca, chat, hh)"
        )
    return jinja


@dataclass(frozen=True)
class ModelTemplate:
    name: str = MODEL
    chat_template: str | None = None  # the Jinja text; None until `bind`: the tokenizer's own
    # The tokenizer's special tokens (bos_token, eos_token ...), which apply_chat_template passes to the template.
    special_tokens: dict[str, str] = field(default_factory=dict)
    prompt_with_context: str = DEFAULT_WITH_CONTEXT
    system_prompt: str | None = None
    source: str = ""  # where the template came from (the tokenizer's folder), for error messages

    # --- binding and rendering ------------------------------------------------------------------

    @property
    def bound(self) -> bool:
        return self.chat_template is not None

    def bind(self, tokenizer) -> ModelTemplate:
        """This template with the tokenizer's chat template and special tokens (a template already
        bound, e.g. read back from a run's qatune.json, keeps its own Jinja text)."""
        if self.bound and self.special_tokens:
            return self
        specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        jinja = self.chat_template or tokenizer_template(tokenizer)
        source = self.source or str(getattr(tokenizer, "name_or_path", "") or "")
        return dataclasses.replace(self, chat_template=jinja, special_tokens=specials, source=source)

    def _jinja(self) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(
                "template 'model' renders through a tokenizer's chat template: bind it to the tokenizer first "
                "(qatune.data.templates.bind_template, or DataConfig.get_template(tokenizer))"
            )
        return self.chat_template

    def _render(self, messages: list[dict], add_generation_prompt: bool, marked: bool) -> tuple[str, list]:
        # transformers' own renderer, with the arguments apply_chat_template gives it, so the text
        # (and the generation blocks) are apply_chat_template's.
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(
                conversations=[messages],
                chat_template=self._jinja(),
                add_generation_prompt=add_generation_prompt,
                return_assistant_tokens_mask=marked,
                **self.special_tokens,
            )
        except Exception as e:  # jinja2's errors, and the template's own raise_exception(...)
            what = f"the chat template{self.of_source()} cannot render the conversation"
            raise ChatTemplateError(f"{what} ({type(e).__name__}: {e})") from e
        return texts[0], indices[0] if marked else []

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._render(messages, add_generation_prompt, marked=False)[0]

    def of_source(self) -> str:
        """ " of FOLDER" for messages about the template, "" when its source is unknown."""
        return f" of {self.source}" if self.source else ""

    @property
    def has_generation_markers(self) -> bool:
        return bool(GENERATION_MARKER.search(self._jinja()))

    def render_with_spans(self, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the [start, end) characters of each assistant turn."""
        if self.has_generation_markers:
            text, spans = self._render(messages, False, marked=True)
            return text, [(a, b) for a, b in spans if b > a]
        try:
            text = self.render(messages)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{where}: {e}" if where else str(e)) from e
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                turn = sum(m["role"] == "assistant" for m in messages[: i + 1])
                at = f"{where}: " if where else ""
                raise ChatTemplateError(
                    f"{at}the chat template{self.of_source()} renders the conversation up to "
                    f"assistant turn {turn} differently from the start of the whole conversation, so the turn's "
                    "trained tokens cannot be found; put {% generation %} ... {% endgeneration %} around the "
                    "assistant text in the template, or use one of qatune's templates"
                )
            spans.append((len(before), len(before) + len(upto[len(before) :].rstrip())))
        return text, spans

    # --- records and messages --------------------------------------------------------------------

    def user_content(self, prompt: str, context: str = "") -> str:
        return self.prompt_with_context.format(prompt=prompt, context=context) if context else prompt

    def chat(self, messages: list[Message], system_prompt: str | None = None) -> list[dict]:
        """Records' messages as chat messages: passages into the user text, the system prompt first
        when the conversation brings none."""
        out = [
            {"role": m.role, "content": self.user_content(m.content, m.context) if m.role == "user" else m.content}
            for m in messages
        ]
        system = system_prompt if system_prompt is not None else self.system_prompt
        if system is not None and not any(m["role"] == "system" for m in out):
            out.insert(0, {"role": "system", "content": system})
        return out

    # --- what generation and evaluation call (the same names as qatune's Template) ----------------

    def render_prompt(self, prompt: str, context: str = "", system_prompt: str | None = None) -> str:
        """One user turn and the generation prompt: the text the answer follows."""
        return self.render(self.chat([Message("user", prompt, context)], system_prompt), add_generation_prompt=True)

    def generation_prompt(self, messages: list[Message]) -> str:
        """The text a model continues for a history ending in a user turn: apply_chat_template(history,
        add_generation_prompt=True). Tokenize it whole, with no special tokens added."""
        if not messages or messages[-1].role != "user":
            raise ValueError("a generation prompt needs a conversation that ends with a user turn")
        return self.render(self.chat(messages), add_generation_prompt=True)

    def generation_pieces(self, messages: list[Message]) -> list[str]:
        """`generation_prompt` as the one piece it is (qatune's templates give one per segment)."""
        return [self.generation_prompt(messages)]

    def end_of_turn(self) -> str:
        """The text the template writes after an answer, inside the trained span ("<|im_end|>",
        "<|eot_id|>"; "" for a template that writes nothing there)."""
        user, answer = PROBE
        text, spans = self.render_with_spans(self.chat([Message("user", user), Message("assistant", answer)]))
        if not spans:
            return ""
        trained = text[spans[-1][0] : spans[-1][1]]
        at = trained.rfind(answer)
        return trained[at + len(answer) :] if at >= 0 else ""

    def render_response(self, response: str) -> str:
        raise ChatTemplateError(
            "template 'model' renders whole conversations, not an answer alone (preference pairs render each "
            "[prompt, response] conversation whole: qatune.data.preference.encode); the demo uses qatune's templates"
        )

    def render_conversation(self, messages: list[Message]) -> list[tuple[str, bool]]:
        raise ChatTemplateError("template 'model' is encoded whole (qatune.data.encode), not segment by segment")

    # --- saving ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelTemplate:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise DataError(f"template 'model': unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields))}")
        tpl = cls(**{"name": MODEL, **d})
        tpl.validate()
        return tpl

    def validate(self) -> None:
        check_fields("prompt_with_context", self.prompt_with_context, {"prompt", "context"}, {"prompt", "context"})
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise DataError("template 'model': field 'chat_template' must be the Jinja text")
        if not isinstance(self.special_tokens, dict):
            raise DataError("template 'model': field 'special_tokens' must be a mapping")

"""A chat session: the conversation rendered through the run's template, kept within the context
(oldest exchanges dropped, the system prompt kept), replies streamed as they are generated."""

from __future__ import annotations

from collections.abc import Callable

from qatune.data.encode import generation_ids, stop_ids
from qatune.data.model_template import ModelTemplate
from qatune.data.records import Message
from qatune.data.templates import Template, bind_template
from qatune.errors import UserError
from qatune.generation.sampling import Generation, SamplingConfig, generate_ids
from qatune.model.attention import DecoderLM
from qatune.model.families import context_length


class StreamDecoder:
    """Turns generated ids into text as they arrive. GPT-2's byte-level tokens can split one
    character (a Vietnamese letter with two diacritics, an emoji) across tokens; text is written
    only once it decodes without a replacement character, so nothing half-made is ever shown."""

    def __init__(self, tokenizer, write: Callable[[str], None], stops: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.write = write
        self.stops = stops if stops is not None else [tokenizer.eos_token_id]  # never shown
        self.ids: list[int] = []
        self.shown = 0  # characters written so far

    def push(self, token: int) -> None:
        if token in self.stops:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def flush(self) -> None:
        self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> None:
        if len(text) > self.shown:
            self.write(text[self.shown :])
            self.shown = len(text)


class ChatSession:
    """The conversation so far; `reply` adds a user turn and the model's answer, which ends at EOS
    or at the template's end-of-turn token (`<|im_end|>` for ChatML: a model trained on its chat
    template writes that, not EOS, when it is done)."""

    def __init__(
        self,
        model: DecoderLM,
        tokenizer,
        template: Template | ModelTemplate,
        sampling: SamplingConfig,
        context: int | None = None,
    ):
        template = bind_template(template, tokenizer)
        self.model, self.tokenizer, self.template, self.sampling = model, tokenizer, template, sampling
        self.stops = stop_ids(template, tokenizer)
        self.context = min(context or context_length(model.config), context_length(model.config))
        self.prompt_budget = self.context - sampling.max_new_tokens
        if self.prompt_budget < 1:
            raise UserError(
                f"replies of up to {sampling.max_new_tokens} tokens leave no room in a {self.context}-token context"
            )
        self.history: list[Message] = []
        self.dropped = 0  # exchanges dropped to make the last prompt fit

    def reset(self) -> None:
        self.history = []

    def encode(self, messages: list[Message]) -> list[int]:
        """Exactly as training tokenizes the same conversation (qatune's templates segment by
        segment; the model's chat template whole, = apply_chat_template with the generation prompt)."""
        return generation_ids(self.template, messages, self.tokenizer)

    def prompt_ids(self) -> list[int]:
        """The generation prompt of the history, dropping the oldest user/assistant exchanges until
        it fits the prompt budget. The system prompt is part of the template, so it always stays."""
        self.dropped = 0
        while True:
            ids = self.encode(self.history)
            if len(ids) <= self.prompt_budget:
                return ids
            if len(self.history) < 3:  # only the new user turn is left
                raise UserError(
                    f"this message makes a prompt of {len(ids)} tokens; the context leaves {self.prompt_budget} "
                    f"({self.context} minus {self.sampling.max_new_tokens} for the reply)"
                )
            del self.history[:2]
            self.dropped += 1

    def reply(self, text: str, write: Callable[[str], None] = lambda s: None) -> Generation:
        """Answer `text`, streaming the reply through `write`; the history keeps both turns."""
        self.history.append(Message("user", text))
        try:
            ids = self.prompt_ids()
        except ValueError:
            self.history.pop()
            raise
        stream = StreamDecoder(self.tokenizer, write, self.stops)
        [gen] = generate_ids(self.model, [ids], self.stops, self.sampling, on_token=lambda t: stream.push(t[0]))
        stream.flush()
        self.history.append(Message("assistant", self.tokenizer.decode(gen.ids)))
        return gen

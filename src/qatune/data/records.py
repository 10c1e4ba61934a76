"""A record: one (prompt, response) pair or one conversation, still as text, with where it came from.

Readers turn every supported file format and layout into records; templates and tokenization only
ever see records. `where` names the place a user can open ("train.jsonl:17", "tatsu-lab/alpaca:train[3]")
so every later error can point back at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qatune.errors import UserError

ROLES = ("system", "user", "assistant")


class DataError(UserError):
    """Bad input a user can fix; the message names file, line/record and field."""


@dataclass
class Message:
    role: str  # one of ROLES
    content: str
    # A user turn's passage (Alpaca `input`, a SQuAD context): rendered through the template's
    # `prompt_with_context`, as a (prompt, context) record's prompt is.
    context: str = ""


@dataclass
class Record:
    source: str  # file name or dataset name
    where: str  # file:line, file:record N, or dataset:split[index]
    prompt: str = ""  # the instruction / question
    response: str = ""  # the answer the model is trained to give
    context: str = ""  # Alpaca `input`, Dolly `context`: extra text the prompt refers to
    messages: list[Message] | None = None  # set for conversations instead of prompt/response
    references: list[str] | None = None  # every accepted answer (SQuAD-style sets); the first is `response`
    extra: dict = field(default_factory=dict)  # untouched fields (id, category …) for eval reports

    @property
    def is_conversation(self) -> bool:
        return self.messages is not None

    @property
    def reference(self) -> str:
        """The response an evaluation compares a generation with: the (last) assistant turn."""
        if self.messages is None:
            return self.response
        return next(m.content for m in reversed(self.messages) if m.role == "assistant")

    @property
    def all_references(self) -> list[str]:
        """Every answer an evaluation accepts: EM/F1 take the best over them."""
        return self.references or [self.reference]

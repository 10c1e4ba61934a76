"""`qatune chat MODEL_OR_RUN`: talk to a model in the terminal, through the template it was trained
with. Replies stream as they are generated; the oldest exchanges are dropped when the conversation
outgrows the context (the system prompt stays). Commands: /reset starts over, /exit quits."""

from __future__ import annotations

import argparse
import sys

from qatune.cli.common import add_device_option, add_tokenizer_option
from qatune.cli.generate import add_sampling_options, fit_max_new_tokens, model_template, sampling_from_args
from qatune.errors import UserError

HELP = "/reset clears the conversation, /exit quits"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with a tuned model", description=__doc__)
    p.add_argument("model", help="a run folder (its export/ is used), a checkpoint folder or a hub name")
    p.add_argument("--template", help="template name; default: the one saved with the model, else 'chat'")
    p.add_argument("--system-prompt", default=None, help="system text (for templates with a system part)")
    p.add_argument("--context", type=int, help="token limit of prompt + reply (default: the model's context)")
    add_sampling_options(p)
    # A chat samples by default; --temperature 0 makes it greedy.
    p.set_defaults(temperature=0.7, top_p=0.9, max_new_tokens=None)
    add_tokenizer_option(p)
    add_device_option(p)
    p.set_defaults(func=run)


def make_session(args: argparse.Namespace):
    from qatune.generation.chat import ChatSession
    from qatune.model.families import context_length
    from qatune.runs import load_model, load_tokenizer_for, read_meta, resolve_model_path
    from qatune.utils.device import default_device

    meta = read_meta(resolve_model_path(args.model)) or {}
    tokenizer = load_tokenizer_for(args.model, args.tokenizer)
    template = model_template(args, meta, tokenizer, "chat")
    model = load_model(args.model, default_device(args.device))
    limit = context_length(model.config)
    context = min(args.context or limit, limit)
    fit_max_new_tokens(args, context, cap=256)  # a chat reply may run longer than generate's default
    return ChatSession(model, tokenizer, template, sampling_from_args(args), context)


def run(args: argparse.Namespace) -> int:
    session = make_session(args)
    out = sys.stdout
    echo = not sys.stdin.isatty()  # piped input: show it, so the transcript reads as a dialogue
    out.write(
        f"chat with {args.model} (template '{session.template.name}', context {session.context} tokens, "
        f"replies up to {session.sampling.max_new_tokens}); {HELP}\n"
    )
    while True:
        text = read_line(echo)
        if text is None:  # end of input
            out.write("\n")
            break
        command = text.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if command.startswith("/"):
            out.write(f"(unknown command {command}; {HELP})\n")
            continue
        answer(session, text, out)
    return 0


def read_line(piped: bool) -> str | None:
    """One line of user input, or None at end of input. On a terminal, `input` gives line editing;
    piped input is echoed so that the transcript shows both sides."""
    if not piped:
        try:
            return input("you> ")
        except EOFError:
            return None
    sys.stdout.write("you> ")
    line = sys.stdin.readline()
    if not line:
        return None
    text = line.rstrip("\n")
    sys.stdout.write(text + "\n")
    return text


def answer(session, text: str, out) -> None:
    def write(s: str) -> None:
        out.write(s)
        out.flush()

    out.write("bot> ")
    try:
        gen = session.reply(text, write)
    except UserError as e:  # a message too long for the context: say so, keep chatting (a bug still stops)
        out.write(f"({e})\n")
        return
    out.write("\n")
    if session.dropped:
        out.write(f"(dropped the {session.dropped} oldest exchange(s) to stay within {session.context} tokens)\n")
    if not gen.stopped_at_eos:
        out.write(f"(reply cut at {session.sampling.max_new_tokens} tokens: the model emitted no EOS)\n")

"""`qatune serve MODEL_OR_RUN`: an OpenAI-compatible HTTP server (chat completions, completions,
models, health) with a chat page at `/`. Chat messages are rendered through the template the model
was trained with; concurrent requests share one continuously batched decode loop on the KV cache.
Needs the `serve` extra: pip install 'qatune[serve]'."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from qatune.cli.common import add_device_option, add_tokenizer_option
from qatune.cli.generate import model_template
from qatune.errors import UserError

API_KEY_ENV = "QATUNE_API_KEY"
# The default context when the model's is longer: the KV cache is preallocated for max_batch rows
# of 1.25 x context tokens, which at Llama 3's 131,072 would be tens of GB before the first request.
DEFAULT_MAX_CONTEXT = 8192


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server and chat page", description=__doc__)
    p.add_argument("model", help="a run folder (its export/ is used), a checkpoint folder or a hub name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every route but /health and the page (default: ${API_KEY_ENV})",
    )
    p.add_argument("--name", help="the model id clients send (default: the run or model folder's name)")
    p.add_argument("--template", help="template name; default: the one saved with the model, else 'chat'")
    p.add_argument("--system-prompt", default=None, help="system text used when a conversation brings none")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences allowed to wait; beyond, 429 (default 64)")
    p.add_argument(
        "--context",
        type=int,
        help=f"tokens one request may hold, prompt and reply (default: the model's, at most {DEFAULT_MAX_CONTEXT:,})",
    )
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    add_tokenizer_option(p)
    add_device_option(p)
    p.set_defaults(func=run)


def model_name(model: str) -> str:
    path = Path(model)
    return path.resolve().name if path.exists() else model


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, made here so that --port 0 can report the port it got."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock


def build_server(args: argparse.Namespace):
    """The app, its engine (not started) and the served model's description, from the options."""
    import torch

    from qatune.data.encode import stop_ids
    from qatune.generation.continuous import ContinuousBatcher
    from qatune.model.families import context_length
    from qatune.runs import load_model, load_tokenizer_for, read_meta, resolve_model_path
    from qatune.serve.app import ServedModel, create_app
    from qatune.serve.engine import AsyncEngine
    from qatune.utils.device import default_device

    if args.max_batch < 1 or args.max_queue < 1 or (args.context is not None and args.context < 2):
        raise UserError("--max-batch and --max-queue must be at least 1, --context at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = read_meta(resolve_model_path(args.model)) or {}
    tokenizer = load_tokenizer_for(args.model, args.tokenizer)
    template = model_template(args, meta, tokenizer, "chat")
    model = load_model(args.model, default_device(args.device))
    context = min(args.context or DEFAULT_MAX_CONTEXT, context_length(model.config))
    served = ServedModel(
        args.name or model_name(args.model),
        tokenizer,
        template,
        context,
        model.config.vocab_size,
        int(time.time()),
    )
    # Chat and completions alike end at EOS or the template's end of turn (a ChatML-trained model
    # writes `<|im_end|>` when done; a completion prompt in that format ends there too).
    stops = stop_ids(template, tokenizer)
    engine = AsyncEngine(ContinuousBatcher(model, tokenizer, args.max_batch, args.max_queue, context, stops))
    return create_app(engine, served, args.api_key), engine, served


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UserError("qatune serve needs the serve extra: pip install 'qatune[serve]'") from None

    app, engine, served = build_server(args)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"serving {served.name} (template '{served.template.name}', context {served.context} tokens) on {url}")
    print(f"chat page: {url}/   API: {url}/v1   (Ctrl-C stops)", flush=True)
    engine.start()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly on Ctrl-C, then re-raises it: a normal stop
        pass
    finally:
        engine.stop()
        sock.close()
    print("server stopped", file=sys.stderr)
    return 0

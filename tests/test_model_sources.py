"""Models and tokenizers: a name that looks like a local path never reaches the hub, and a hub name
without network fails in seconds with one line saying how to point at a local folder. The hub
boundary (huggingface_hub, the socket) is faked: no test touches the network."""

from __future__ import annotations

import socket
import time

import huggingface_hub
import pytest

from qatune.cli import main
from qatune.model.hf_io import CheckpointError, from_pretrained
from qatune.model.tokenizer import TokenizerError, load_tokenizer


@pytest.fixture
def no_hub(monkeypatch):
    def called(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", called)
    monkeypatch.setattr(socket, "create_connection", called)


@pytest.fixture
def offline_network(monkeypatch):
    """No HF_HUB_OFFLINE, and no route to any host (as on a machine without network)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(address, timeout=None, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def download(*args, local_files_only=False, **kwargs):
        if not local_files_only:
            raise AssertionError("a download was attempted although the hub is unreachable")
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


@pytest.mark.parametrize("name", ["/nonexistent", "./runs/nope", "../nope", "~/nope", "runs/a/export"])
def test_a_missing_model_path_is_an_error_at_once(no_hub, name):
    with pytest.raises(CheckpointError, match=r": no such folder"):
        from_pretrained(name)


def test_a_missing_tokenizer_path_is_an_error_at_once(no_hub):
    with pytest.raises(TokenizerError, match=r"is not a folder with tokenizer files"):
        load_tokenizer("runs/a/export")


def test_eval_of_a_missing_model_is_one_line_in_a_second(no_hub, tmp_path, capsys):
    data = tmp_path / "x.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    t0 = time.perf_counter()
    assert main(["eval", "/nonexistent", str(data)]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert err == "qatune eval: error: /nonexistent: no such folder\n"


def test_a_hub_model_without_network_fails_fast(offline_network):
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        from_pretrained("gpt2-large")
    assert time.perf_counter() - t0 < 5
    message = str(e.value)
    assert message.startswith("'gpt2-large' is not a local folder, and the Hugging Face hub")
    assert "cannot be reached" in message and "--local-dir" in message and "\n" not in message


def test_a_hub_tokenizer_without_network_fails_fast(offline_network, monkeypatch):
    monkeypatch.delenv("QATUNE_TOKENIZER", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(TokenizerError, match=r"^'gpt2' is not a local folder, and the Hugging Face hub .* cannot"):
        load_tokenizer("gpt2")
    assert time.perf_counter() - t0 < 5


def test_offline_mode_names_the_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def download(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(CheckpointError, match=r"^'org/model' is not a local folder and not in the local cache"):
        from_pretrained("org/model")


def test_a_sharded_hub_checkpoint_loads_from_the_hub_cache(tmp_path, monkeypatch):
    """Models of a few GB are sharded on the hub (an index + shards, no model.safetensors): the hub
    path fetches the index and every shard it names. Here the real huggingface_hub reads a cache
    laid out as its downloads leave it."""
    import shutil

    import torch
    import transformers

    from qatune.model import families

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**shape, vocab_size=256))
    hf.save_pretrained(tmp_path / "written", max_shard_size="40KB")
    assert not (tmp_path / "written" / "model.safetensors").exists()
    repo = tmp_path / "cache" / "models--org--tiny-llama"
    commit = "0" * 40
    shutil.copytree(tmp_path / "written", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    model = families.from_pretrained("org/tiny-llama")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model(ids)), hf.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    # A shard missing from the cache: the model is not there, and the message says where to look.
    next((repo / "snapshots" / commit).glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="not in the local cache"):
        families.from_pretrained("org/tiny-llama")

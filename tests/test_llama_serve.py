"""Generation, continuous batching, chat, eval, serve and export on Llama-family models.

Greedy KV-cache generation of a left-padded batch equals transformers' own `generate` token for
token (Llama, Llama 3 rotary with a tied head, Qwen2, Qwen3, Mistral). A Llama run folder (an
untied head, so that nothing can read GPT-2's tied embedding by mistake; the GPT-2 tokenizer with a
vocabulary of 50,257, since the model's own tokenizer is not what is tested here) is served, chatted
with, evaluated and exported through the CLI as the docs print the commands."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from tests.serve_helpers import ServerThread, one_thread
from tests.test_llama import hf_dirs  # noqa: F401  (the fixture: random folders written by transformers)
from tests.tiny_models import hf_llama_shape

from qatune.cli import main
from qatune.data.encode import tokenize_with_eos
from qatune.data.records import Message
from qatune.data.templates import get_template
from qatune.generation.continuous import ContinuousBatcher, Sequence
from qatune.generation.sampling import SamplingConfig, generate_ids
from qatune.model.families import context_length, from_pretrained
from qatune.model.llama import Llama

QUESTION = "What is the boiling point of water?"


@pytest.fixture(scope="module", autouse=True)
def _threads():
    yield from one_thread()


@pytest.fixture(scope="module")
def llama_run(gpt2_tokenizer, tmp_path_factory):
    """A run folder whose export/ is a random LlamaForCausalLM written by transformers (GQA,
    untied head), with the GPT-2 tokenizer and a qatune.json (template plain, max_len 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **hf_llama_shape(50257, 256, tie_word_embeddings=False, initializer_range=0.1),
        bos_token_id=50256,
        eos_token_id=50256,
    )
    model = LlamaForCausalLM(config)
    run = tmp_path_factory.mktemp("llama_run")
    model.save_pretrained(run / "export")
    gpt2_tokenizer.save_pretrained(run / "export")
    meta = {"template": get_template("plain").to_dict(), "max_len": 128}
    (run / "export" / "qatune.json").write_text(json.dumps(meta))
    return run


def reference(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def hf_greedy(ref, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    """transformers' greedy generate on one unpadded prompt; with eos, cut before it."""
    out = ref.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0 if eos is None else eos,
    )[0, len(ids) :].tolist()
    return out[: out.index(eos)] if eos in out else out


@pytest.mark.parametrize("name", ["llama", "llama3-rope-tied", "qwen2", "qwen3", "mistral"])
def test_greedy_kv_cache_generation_equals_transformers_generate(hf_dirs, name):  # noqa: F811
    folder = hf_dirs(name)
    model, ref = from_pretrained(folder), reference(folder)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 11, 2)]
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    batched = generate_ids(model, prompts, 0, cfg)  # left padded: 6, 0 and 9 pad tokens
    assert [g.ids for g in batched] == [g.ids for g in generate_ids(model, prompts, 0, cfg, use_cache=False)]
    for p, got in zip(prompts, batched):
        assert got.ids == hf_greedy(ref, p, 12)
    assert len({tuple(g.ids) for g in batched}) == 3  # the prompts really lead different ways
    if name == "mistral":  # generation stays within the sliding window, the positions it runs
        assert context_length(model.config) == 64
        with pytest.raises(ValueError, match="leaves no room in the 64-token context"):
            generate_ids(model, [[1] * 64], 0, cfg)


def test_continuous_batching_on_a_llama_generates_what_each_would_alone(llama_run, gpt2_tokenizer):
    model = from_pretrained(llama_run / "export")
    assert isinstance(model, Llama)
    batcher = ContinuousBatcher(model, gpt2_tokenizer, max_batch=2)
    assert batcher.context == 256 and batcher.cache.k.shape[2] == 2  # key/value heads only
    g = torch.Generator().manual_seed(1)
    plan = [(0, 7, 20), (0, 30, 9), (4, 3, 25), (12, 50, 14)]  # (joins at step, prompt length, new tokens)
    seqs = {}
    for step in range(200):
        for i, (at, n, new) in enumerate(plan):
            if at == step:
                p = torch.randint(0, 50000, (n,), generator=g).tolist()
                seqs[i] = Sequence(p, SamplingConfig(max_new_tokens=new, stop_at_eos=False), lambda out: None)
                batcher.submit([seqs[i]])
        batcher.step()
    assert not batcher.running and not batcher.waiting and batcher.stats["prefills"] == len(plan)
    for i, seq in seqs.items():
        [alone] = generate_ids(model, [seq.prompt], 50256, SamplingConfig(max_new_tokens=plan[i][2], stop_at_eos=False))
        assert seq.tokens == alone.ids, f"sequence {i}"


def test_serve_context_is_the_models_unless_set(llama_run):
    from qatune.cli import build_parser
    from qatune.cli.serve import build_server

    for options, context in (([], 256), (["--context", "100"], 100), (["--context", "4096"], 256)):
        _, engine, served = build_server(build_parser().parse_args(["serve", str(llama_run), *options]))
        assert served.context == engine.batcher.context == context
        assert engine.batcher.cache.k.shape[3] == context + context // 4  # the cache is sized by it


def test_serve_answers_a_chat_request_from_a_llama_run(llama_run, gpt2_tokenizer, capsys):
    with ServerThread(llama_run) as server:
        assert server.served.context == 256
        client = server.client()
        messages = [{"role": "user", "content": QUESTION}]
        chat = client.chat.completions.create(model=server.served.name, messages=messages, max_tokens=12, temperature=0)
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=server.served.name, messages=messages, max_tokens=12, temperature=0, stream=True
            )
            if c.choices
        )
    rendered = get_template("plain").render_prompt(QUESTION)  # the run's template
    [ids] = tokenize_with_eos([rendered], gpt2_tokenizer)
    expected = gpt2_tokenizer.decode(hf_greedy(reference(llama_run / "export"), ids, 12, eos=50256))
    answer = chat.choices[0].message.content
    assert answer and answer == streamed == expected
    assert chat.usage.prompt_tokens == len(ids)

    # `qatune generate` on the same run prints the same answer
    assert main(["generate", str(llama_run), "--prompt", QUESTION, "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out.removesuffix("\n").removesuffix("\n[no EOS within 12 tokens]")
    assert printed == rendered + expected


def test_chat_cli_on_a_llama_run(llama_run, gpt2_tokenizer, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nhow are you?\n/exit\n"))
    argv = ["chat", str(llama_run), "--template", "chat", "--temperature", "0", "--max-new-tokens", "6"]
    assert main(argv) == 0
    transcript = capsys.readouterr().out
    ref = reference(llama_run / "export")
    template = get_template("chat")
    history = [Message("user", "hello there")]
    replies = []
    for turn in ("hello there", "how are you?"):
        if replies:
            history += [Message("assistant", replies[-1]), Message("user", turn)]
        [ids] = tokenize_with_eos([template.generation_prompt(history)], gpt2_tokenizer)
        replies.append(gpt2_tokenizer.decode(hf_greedy(ref, ids, 6, eos=50256)))
    assert "context 256 tokens" in transcript
    assert f"you> hello there\nbot> {replies[0]}\n" in transcript
    assert f"you> how are you?\nbot> {replies[1]}\n" in transcript


def test_eval_loss_on_a_llama_run_equals_transformers(llama_run, gpt2_tokenizer, tmp_path):
    rows = [{"question": "What is two plus two?", "answer": "four"}, {"question": "Say hi.", "answer": "hi there"}]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    assert main(["eval", str(llama_run), str(data), "--out", str(out), "--max-new-tokens", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    ref, template = reference(llama_run / "export"), get_template("plain")
    total, count = 0.0, 0
    for r in rows:  # answer tokens + EOS, predicted with transformers' full logits (the untied head)
        prompt = gpt2_tokenizer(template.render_prompt(r["question"])).input_ids
        answer = gpt2_tokenizer(template.render_response(r["answer"])).input_ids + [50256]
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        total += float(F.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
        count += len(answer)
    assert report["loss"]["response_loss"] == pytest.approx(total / count, rel=1e-5)
    records = {r["index"]: r for r in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}
    for i, r in enumerate(rows):
        [ids] = tokenize_with_eos([template.render_prompt(r["question"])], gpt2_tokenizer)
        assert records[i]["generation"] == gpt2_tokenizer.decode(hf_greedy(ref, ids, 4, eos=50256))


def test_export_cli_writes_the_llama_architecture(llama_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(llama_run), str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    ref = reference(out)
    assert type(ref).__name__ == "LlamaForCausalLM"
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 128 and "chat_template" in tokenizer_config
    assert json.loads((out / "qatune.json").read_text())["max_len"] == 128
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, reference(llama_run / "export")(ids).logits)


def test_a_llama_training_checkpoint_exports_with_its_base_folders_shape(llama_run, tmp_path):
    from qatune.config import dump_yaml
    from qatune.methods.config import TrainConfig
    from qatune.train.checkpoints import save_checkpoint
    from qatune.train.config import ModelConfig

    model = from_pretrained(llama_run / "export")
    with torch.no_grad():  # weights that differ from the base, as after training
        model.layers[1].mlp.up_proj.weight.mul_(1.5)
        model.output.weight.add_(0.01)
    cfg = TrainConfig(model=ModelConfig(name=str(llama_run / "export")))
    optimizer = torch.optim.AdamW(model.parameters())
    folder = save_checkpoint(tmp_path / "checkpoints", 5, model, optimizer, None, config_yaml=dump_yaml(cfg))
    assert main(["export", str(folder), str(tmp_path / "out")]) == 0
    exported = from_pretrained(tmp_path / "out")
    assert isinstance(exported, Llama) and exported.config == model.config
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "out" / "qatune.json").read_text())["steps"] == 5

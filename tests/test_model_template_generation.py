"""Generation on a run trained with the model's own chat template (`template: model`): `generate`,
`eval`, `chat` and `serve` prompt with apply_chat_template(history, add_generation_prompt=True)'s
ids and stop at the template's end-of-turn token.

The run: a tiny GPT-2 with the packaged Qwen2.5 tokenizer (ChatML; its EOS is `<|endoftext|>`, so
EOS alone never stops a ChatML-trained model). Its weights are set so that greedy decoding answers
"Yes" and then writes `<|im_end|>` forever (attention and MLP outputs zero, no position embedding:
the next token depends on the last one only, through the tied embedding): a generation that does
not stop at `<|im_end|>` shows it, and runs to max_new_tokens."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from tests.chat_templates import hf_ids, qwen_cache, qwen_folder  # noqa: F401  (fixtures)
from tests.serve_helpers import ServerThread, one_thread

import qatune.generation.batch as batch_mod
import qatune.generation.chat as chat_mod
import qatune.generation.sampling as sampling_mod
from qatune.cli import main
from qatune.data.templates import bind_template, get_template
from qatune.model.gpt2 import GPT2, GPT2Config
from qatune.model.hf_io import export_hf
from qatune.model.tokenizer import load_tokenizer

QUESTION = "Is water wet?"
END = "<|im_end|>"


@pytest.fixture(scope="module", autouse=True)
def _threads():
    yield from one_thread()


@pytest.fixture(scope="module")
def tok(qwen_folder):  # noqa: F811
    return load_tokenizer(qwen_folder)


def ids_of(tok, text: str) -> int:
    [i] = tok(text, add_special_tokens=False)["input_ids"]
    return i


def yes_then_end(tok) -> GPT2:
    """Greedy: after "\\n" (the generation prompt's last token) "Yes", after "Yes" `<|im_end|>`,
    after `<|im_end|>` `<|im_end|>` again. With attention and MLP writing zero and no position
    embedding, the last hidden state is LayerNorm(wte[token]) and the logits are wte @ that: the
    rows below make each next token the largest dot product (worked out in the comments)."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=128, vocab_size=len(tok)))
    e = torch.eye(16)
    with torch.no_grad():
        for block in model.h:
            for layer in (block.attn.c_proj, block.mlp.c_proj):
                layer.weight.zero_()
                layer.bias.zero_()
        model.wpe.weight.zero_()
        model.ln_f.weight.fill_(1.0)
        model.ln_f.bias.zero_()
        wte = model.wte.weight
        wte.normal_(0.0, 0.01)
        wte[ids_of(tok, "\n")] = e[0] - e[1]  # logits ~ "\n" 2, Yes 4, im_end 0
        wte[ids_of(tok, "Yes")] = 2 * (e[0] - e[1]) + (e[2] - e[3])  # Yes 10, im_end 20, "\n" 4
        wte[tok.convert_tokens_to_ids(END)] = 10 * (e[2] - e[3])  # im_end 200, Yes 20
    return model


@pytest.fixture(scope="module")
def chatml_run(tok, tmp_path_factory):
    """A run folder whose export/ is the model above, the Qwen tokenizer and a qatune.json with
    the bound `model` template (as training writes it)."""
    template = bind_template(get_template("model"), tok).to_dict()
    run = tmp_path_factory.mktemp("chatml_run")
    meta = {"template": template, "max_len": 128}
    export_hf(yes_then_end(tok), run / "export", tok, {"qatune.json": json.dumps(meta)}, template=template)
    return run


def chat_ids(tok, messages: list[dict]) -> list[int]:
    return hf_ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def spy(monkeypatch, module) -> list[tuple[list[list[int]], list[int]]]:
    """Record (prompts, stop ids) of every generate_ids call made through `module`."""
    seen = []
    real = module.generate_ids

    def record(model, prompts, stop, cfg, **kw):
        seen.append((prompts, list(stop) if not isinstance(stop, int) else [stop]))
        return real(model, prompts, stop, cfg, **kw)

    monkeypatch.setattr(module, "generate_ids", record)
    return seen


def test_the_model_answers_yes_and_then_only_ends_turns(chatml_run, tok):
    """The premise: without the end-of-turn stop, greedy decoding writes `<|im_end|>` after "Yes"
    until max_new_tokens (the packaged Qwen EOS, `<|endoftext|>`, never comes)."""
    from qatune.model.hf_io import from_pretrained

    model = from_pretrained(chatml_run / "export")
    prompt = chat_ids(tok, [{"role": "user", "content": QUESTION}])
    [g] = sampling_mod.generate_ids(model, [prompt], tok.eos_token_id, sampling_mod.SamplingConfig(max_new_tokens=4))
    assert tok.decode(g.ids) == "Yes" + END * 3 and not g.stopped_at_eos
    assert tok.eos_token == "<|endoftext|>"


def test_generate_prompts_with_the_chat_template_and_stops_at_im_end(chatml_run, tok, monkeypatch, capsys):
    seen = spy(monkeypatch, sampling_mod)
    assert main(["generate", str(chatml_run), "--prompt", QUESTION, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    messages = [{"role": "user", "content": QUESTION}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out == rendered + "Yes\n"  # stopped: no "[no EOS within 8 tokens]", no <|im_end|> in the answer
    [(prompts, stops)] = seen
    assert prompts == [chat_ids(tok, messages)]
    assert stops == [tok.eos_token_id, tok.convert_tokens_to_ids(END)]


def test_generate_template_model_binds_the_tokenizers_template(chatml_run, tok, tmp_path, monkeypatch, capsys):
    """A model folder with no qatune.json: `--template model` takes the tokenizer's chat template."""
    folder = shutil.copytree(chatml_run / "export", tmp_path / "model")
    (folder / "qatune.json").unlink()
    seen = spy(monkeypatch, sampling_mod)
    argv = ["generate", str(folder), "--template", "model", "--prompt", QUESTION, "--max-new-tokens", "8"]
    assert main(argv) == 0
    assert capsys.readouterr().out.endswith("<|im_start|>assistant\nYes\n")
    assert seen[0][0] == [chat_ids(tok, [{"role": "user", "content": QUESTION}])]


def test_eval_and_generate_out_prompt_with_the_chat_template_and_stop_at_im_end(chatml_run, tok, tmp_path, monkeypatch):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": QUESTION, "answer": "Yes"}) + "\n")
    chats = tmp_path / "chats.jsonl"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Yes"},
    ]
    chats.write_text(json.dumps({"messages": conversation}) + "\n")
    seen = spy(monkeypatch, batch_mod)
    out = tmp_path / "eval"
    argv = ["eval", str(chatml_run), str(qa), str(chats), "--out", str(out), "--max-new-tokens", "8"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["generation"], r["stopped_at_eos"], r["exact_match"]) for r in records] == [("Yes", True, 1.0)] * 2
    prompts = sorted(p for call in seen for p in call[0])
    expected = [chat_ids(tok, [{"role": "user", "content": QUESTION}]), chat_ids(tok, conversation[:-1])]
    assert prompts == sorted(expected)
    assert all(stops == [tok.eos_token_id, tok.convert_tokens_to_ids(END)] for _, stops in seen)

    seen.clear()
    gen_out = tmp_path / "gen.jsonl"
    assert main(["generate", str(chatml_run), "--file", str(chats), "--out", str(gen_out)]) == 0
    [record] = [json.loads(line) for line in gen_out.read_text().splitlines()]
    assert record["generation"] == "Yes" and record["stopped_at_eos"]
    assert seen[0][0] == [chat_ids(tok, conversation[:-1])]


def test_chat_prompts_each_turn_with_the_chat_template_and_stops_at_im_end(chatml_run, tok, monkeypatch, capsys):
    seen = spy(monkeypatch, chat_mod)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAgain?\n/exit\n"))
    assert main(["chat", str(chatml_run), "--temperature", "0", "--max-new-tokens", "8"]) == 0
    transcript = capsys.readouterr().out
    assert "you> Hi\nbot> Yes\nyou> Again?\nbot> Yes\n" in transcript
    assert END not in transcript and "reply cut" not in transcript
    history = [{"role": "user", "content": "Hi"}]
    second = [*history, {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "Again?"}]
    assert [prompts[0] for prompts, _ in seen] == [chat_ids(tok, history), chat_ids(tok, second)]


def test_serve_prompts_with_the_chat_template_and_stops_at_im_end(chatml_run, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    with ServerThread(chatml_run) as server:
        assert server.batcher.stop_ids == {tok.eos_token_id, tok.convert_tokens_to_ids(END)}
        submitted = []
        real = server.batcher.submit
        server.batcher.submit = lambda seqs: submitted.extend(s.prompt for s in seqs) or real(seqs)
        client = server.client()
        name = server.served.name
        chat = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
        chunks = list(
            client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0, stream=True)
        )
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        completion = client.completions.create(model=name, prompt=rendered, max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chat.choices[0].message.content == streamed == completion.choices[0].text == "Yes"
    assert chat.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"
    assert completion.choices[0].finish_reason == "stop"
    assert submitted[:2] == [chat_ids(tok, messages)] * 2 and chat.usage.prompt_tokens == len(submitted[0])
    assert chat.usage.completion_tokens == 2  # "Yes" and the <|im_end|> that ended it

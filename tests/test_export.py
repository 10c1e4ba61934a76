"""`qatune export`: the run's template as a Jinja chat template that `transformers` renders to the
same ids qatune feeds the model, the context size as `model_max_length`, qatune.json kept, and
intermediate checkpoints exported like final ones."""

from __future__ import annotations

import json

import pytest
import torch

from qatune.cli import main
from qatune.data.encode import encode_pieces
from qatune.data.records import Message
from qatune.data.templates import TEMPLATES, get_template
from qatune.model.hf_io import export_hf, from_pretrained


def as_dicts(messages: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def conversations(name: str) -> dict[str, list[Message]]:
    # `raw` has no text between a prompt and its answer; its data (t0) end every prompt with a
    # newline, so no BPE merge crosses that boundary (docs/eval.md says when one would).
    end = "\n" if name == "raw" else ""
    q1, q2 = f"What is the capital of France?{end}", f"And of Peru?{end}"
    return {
        "single": [Message("user", q1)],
        "multi": [Message("user", q1), Message("assistant", "Paris"), Message("user", q2)],
        "system": [
            Message("system", "Answer in one word."),
            Message("user", q1),
            Message("assistant", "Paris"),
            Message("user", q2),
        ],
        "unicode": [Message("user", f'Thủ đô của Việt Nam là gì? {{x}} 100% "quoted" \\ 👋{end}')],
    }


@pytest.mark.parametrize("system_prompt", [None, "Be brief."], ids=["no_system", "system_prompt"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_gives_the_ids_qatune_renders(name, system_prompt, hf_tiny_dir, gpt2_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    template = get_template(name, system_prompt)
    export_hf(from_pretrained(hf_tiny_dir), tmp_path / "out", gpt2_tokenizer, template=template.to_dict(), max_len=96)
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    for kind, messages in conversations(name).items():
        got = hf.apply_chat_template(as_dicts(messages), add_generation_prompt=True)
        got = got["input_ids"] if hasattr(got, "keys") else got  # transformers 5: a BatchEncoding
        want = encode_pieces(template.generation_pieces(messages), gpt2_tokenizer)
        assert list(got) == want, f"{name} {kind}"
    assert hf.model_max_length == 96


def test_export_of_a_run_keeps_qatune_json_and_the_context(make_tiny_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    run = make_tiny_run("alpaca")
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "qatune.json").read_text()) == json.loads(
        (run / "export" / "qatune.json").read_text()
    )
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf.model_max_length == 128
    msgs = [{"role": "user", "content": "Name a colour."}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == get_template(
        "alpaca"
    ).render_prompt("Name a colour.")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("export_run")
    data = tmp / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a} plus 3?", "answer": str(a + 3)}) + "\n" for a in range(40)))
    cfg = tmp / "run.yaml"
    cfg.write_text(
        f"name: r\nout_dir: {tmp / 'runs'}\ntokenizer: {tokenizer_dir}\n"
        "model: {name: gpt2, init: random, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64}\n"
        f"data: {{sources: [{data}], template: plain, max_len: 48}}\n"
        "batch: {size: 8}\noptim: {lr: 1e-3, warmup_steps: 1}\neval: {fraction: 0.1, every: 0}\n"
        "max_steps: 4\nsave_every: 2\nkeep_checkpoints: 3\nthreads: 1\nplots: false\ntensorboard: false\n"
    )
    assert main(["train", str(cfg), "--no-progress"]) == 0
    return tmp / "runs" / "r"


def test_an_intermediate_checkpoint_exports_like_the_final_model(trained_run, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    step2 = trained_run / "checkpoints" / "step_00000002"
    assert main(["export", str(step2), str(tmp_path / "s2")]) == 0
    state = torch.load(step2 / "state.pt", weights_only=False)["model"]
    ours = from_pretrained(tmp_path / "s2")
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in state.items())
    final = from_pretrained(trained_run / "export")
    assert not torch.equal(final.wte.weight, ours.wte.weight)  # step 2, not the end of the run
    meta = json.loads((tmp_path / "s2" / "qatune.json").read_text())
    assert meta["steps"] == 2 and meta["template"] == get_template("plain").to_dict() and meta["max_len"] == 48
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "s2").eval()
    ids = torch.tensor([[464, 2068, 7586, 21831]])
    with torch.no_grad():  # two fp32 implementations of the same forward, O(1) logits: rounding ~1e-7
        assert torch.allclose(hf(ids).logits, ours.lm_head(ours(ids)), atol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "s2")
    assert tok.model_max_length == 48 and tok.chat_template is not None


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "step_00000002").mkdir()
    assert main(["export", str(tmp_path / "step_00000002"), str(tmp_path / "out")]) == 2
    assert "step_00000002" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_sharded_checkpoint_exports_too(tiny_model, tokenizer_dir, tmp_path):
    from qatune.config import dump_yaml
    from qatune.methods.config import TrainConfig
    from qatune.train.config import ModelConfig
    from qatune.train.sharded_checkpoints import save_sharded

    cfg = TrainConfig(model=ModelConfig(init="random", n_layer=2, n_embd=64, n_head=4, n_positions=128))
    optimizer = torch.optim.AdamW(tiny_model.parameters())
    folder = save_sharded(tmp_path / "checkpoints", 3, tiny_model, optimizer, None, None, dump_yaml(cfg), {}, 1, 0, 1)
    assert (folder / "dcp").is_dir()
    assert main(["export", str(folder), str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)]) == 0
    exported = from_pretrained(tmp_path / "out")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in tiny_model.state_dict().items())
    assert json.loads((tmp_path / "out" / "qatune.json").read_text())["steps"] == 3

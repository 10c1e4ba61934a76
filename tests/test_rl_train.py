"""PPO and GRPO as methods of the training runtime, end to end on the demo's facts task.

One SFT model (the demo's recipe, stopped early: about half the held-out questions right; the
session's `facts` fixture, tests/rl_facts.py) is the starting point of every run here: GRPO must
raise its held-out exact match while the KL stays in its band (PPO: tests/test_ppo_learning.py);
a KL that leaves the band stops the run with a checkpoint; a run killed with SIGKILL resumes
bit-identically (PPO killed between the steps of one rollout: the rollout buffer comes back from
the checkpoint); two gloo ranks train what one process does.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tests.processes import kill_in_optimizer_step, run_cli
from tests.rl_facts import facts_config, items, sft_model
from tests.tiny_models import FAMILIES, tiny_lm
from tests.tolerances import assert_weights_match, lrs_of

from qatune.config import load_config
from qatune.methods.config import TrainConfig
from qatune.train.checkpoints import list_checkpoints
from qatune.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_grpo_raises_held_out_exact_match_while_kl_stays_in_band(facts):
    """Held-out exact match of greedy answers rises, and more so that of answers sampled as in
    training (8 per held-out question, the same random draws before and after): measured over 3
    seeds, greedy 0.425 -> 0.50-0.55, sampled 0.14-0.16 -> 0.34-0.37, KL to the start ~1 nat."""
    from qatune.methods.grpo import GRPO
    from qatune.train.runtime import run

    cfg = facts_config(
        facts, "name=grpo", "method=grpo", "max_steps=20", "eval.every=0", "save_every=0", "plots=true",
        "optim.lr=1e-3", "optim.lr_min=1e-3", "batch.size=128", "rl.prompts_per_rollout=64", "rl.group_size=8",
        "rl.generation_batch=256", "rl.rollout.max_new_tokens=8", "rl.rollout.temperature=1.0",
        "rl.kl_band=[-0.5,5.0]",
    )  # fmt: skip
    method = GRPO(items(facts["train"], facts["template"]), items(facts["test"], facts["template"]))
    result = run(method, sft_model(facts), facts["tok"], cfg, progress=False)
    start, end = method.evaluate(sft_model(facts)), result.final_eval
    assert 0.3 <= start["eval_exact_match"] <= 0.7  # the starting point has room to improve
    assert end["eval_exact_match"] >= start["eval_exact_match"] + 0.05, (start, end)
    assert end["eval_sampled_exact_match"] >= start["eval_sampled_exact_match"] + 0.1, (start, end)
    assert abs(start["eval_kl"]) < 1e-4 < end["eval_kl"] <= 5.0
    history = result.history
    assert abs(history[0]["kl"]) < 1e-4  # the first rollout is sampled by the reference's own weights
    assert all(-0.5 <= r["kl"] <= 5.0 for r in history)
    for r in history:  # every step samples its own rollout and logs what it saw
        assert {"reward", "reward_std", "entropy", "response_length", "eos_rate", "gen_tokens_per_s"} <= set(r)
        assert 0 <= r["reward"] <= 1 and r["eos_rate"] > 0.9 and r["tokens_per_s"] > 0
    assert history[-1]["reward"] > history[0]["reward"]
    logged = read_metrics(result.run_dir)
    assert [r["step"] for r in logged] == list(range(1, 21)) and "eval_exact_match" in logged[-1]
    plots = {p.name for p in (result.run_dir / "plots").iterdir()}
    assert {"reward.png", "kl.png", "entropy.png", "response_length.png", "gen_tokens_per_s.png"} <= plots


def test_kl_leaving_its_band_stops_the_run_with_a_checkpoint(facts):
    from qatune.errors import MethodStop
    from qatune.methods.grpo import GRPO
    from qatune.train.runtime import run

    cfg = facts_config(facts, "name=kl_stop", "method=grpo", "optim.lr=3e-2", "rl.kl_band=[-1.0,0.05]", "save_every=0")
    method = GRPO(items(facts["train"], facts["template"]), items(facts["test"][:8], facts["template"]))
    with pytest.raises(
        MethodStop,
        match=r"KL to the reference is [-0-9.]+ nats per response at step \d, outside rl.kl_band \[-1.0, 0.05\]",
    ) as stop:
        run(method, sft_model(facts), facts["tok"], cfg, progress=False)
    step = int(str(stop.value).split(" at step ")[1].split(",")[0])
    assert step >= 2  # the first rollout is sampled by the reference itself: KL 0
    ckpts = list_checkpoints(Path(cfg.out_dir) / "kl_stop" / "checkpoints")
    assert [s for s, _ in ckpts] == [step - 1]  # the steps done before the drifted rollout
    assert len(read_metrics(Path(cfg.out_dir) / "kl_stop")) == step - 1


# after the step-3 checkpoint, in step 5's update
KILL_AT_STEP_5 = kill_in_optimizer_step(5)

# A short PPO run: one epoch over single-sample rollouts of 8 prompts.
METHODS_ARGS = {"ppo": ["rl.group_size=1", "rl.prompts_per_rollout=8"], "grpo": []}

# PPO: 2 optimizer steps per rollout, so the step-3 checkpoint falls between the two steps of the
# second rollout, and the resumed run trains on the rollout buffer the checkpoint kept.
METHODS = {"ppo": ["rl.epochs=2", "rl.group_size=1", "rl.prompts_per_rollout=8"], "grpo": []}


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_then_resume_is_bit_identical(facts, method):
    cfg = str(facts["config"])
    common = [f"method={method}", *METHODS[method], "--no-progress"]
    straight = run_cli("train", cfg, f"name={method}_straight", *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "held-out reward" in straight.stdout
    killed = run_cli("train", cfg, f"name={method}_killed", *common, killer=KILL_AT_STEP_5)
    assert killed.returncode == -signal.SIGKILL
    runs = Path(facts["root"]) / "runs"
    assert [s for s, _ in list_checkpoints(runs / f"{method}_killed" / "checkpoints")] == [3]
    resumed = run_cli("train", cfg, f"name={method}_killed", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(runs / f"{method}_straight" / "export" / "model.safetensors"))
    b = load_file(str(runs / f"{method}_killed" / "export" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(runs / f"{method}_straight"), read_metrics(runs / f"{method}_killed")
    assert [r["step"] for r in mb] == list(range(1, 7))
    keys = ("loss", "grad_norm", "kl_coef", "reward", "kl", "clip_frac", "eval_reward", "eval_kl")
    for ra, rb in zip(ma, mb):
        assert {k: ra.get(k) for k in keys} == {k: rb.get(k) for k in keys}
    kl = [r["kl"] for r in ma if "kl" in r]  # logged at the steps that sampled a rollout
    assert len(kl) == {"ppo": 3, "grpo": 6}[method] and abs(kl[0]) < 1e-4 < abs(kl[-1])
    assert all(r["grad_norm"] > 0 for r in ma)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_RUN = ["strategy=ddp", "max_steps=4", "save_every=2", "eval.every=2"]
# rl.generation_batch divides each rank's share of a rollout (PPO 8 x 1 responses, GRPO 4 x 4, over
# 2 ranks), so one process decodes the same chunks with the same generators as the two ranks.
DDP_METHODS = {"ppo": [*METHODS["ppo"], "rl.generation_batch=4"], "grpo": ["rl.generation_batch=8"]}


def _ddp_worker(rank: int, config: str, port: int, method: str) -> None:
    from qatune.launch import run_training

    env = {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()})
    cfg = load_config(TrainConfig, config, [f"method={method}", *DDP_METHODS[method], *DDP_RUN, f"name={method}_ddp"])
    run_training(cfg, progress=False)


@pytest.mark.parametrize("method", DDP_METHODS)
def test_two_gloo_ranks_train_what_one_process_does(facts, method):
    """Each rank samples its half of every rollout with the generators one process would use for
    those responses, so the 2-rank run sees the same samples, rewards and KL, and ends with the
    same weights (to float summation order) as one process with the same global batch."""
    from qatune.launch import run_training

    config = str(facts["config"])
    overrides = [f"method={method}", *DDP_METHODS[method], *DDP_RUN]
    single = load_config(TrainConfig, config, [*overrides, f"name={method}_one_process", "strategy=none"])
    run_training(single, progress=False)
    mp.spawn(_ddp_worker, args=(config, _free_port(), method), nprocs=2, join=True)
    runs = Path(facts["root"]) / "runs"
    one, two = read_metrics(runs / f"{method}_one_process"), read_metrics(runs / f"{method}_ddp")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["step"] for r in one if "reward" in r] == [r["step"] for r in two if "reward" in r]
    for a, b in zip(one, two):  # the rollout's metrics at the steps that sample one (PPO: every 2nd)
        assert b.get("reward") == a.get("reward") and b.get("response_length") == a.get("response_length")
        # fp32 policy losses of O(0.1): measured <= 3e-7 on AVX-512/AVX2/plain kernels
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-3
        )
        # Adam turns float-summation noise in near-zero gradients into lr-sized steps, so the
        # weights (and the log-probs they give) agree to ~1e-4, not to rounding
        assert b.get("kl", 0.0) == pytest.approx(a.get("kl", 0.0), abs=1e-3)
    start = load_file(str(Path(facts["root"]) / "sft" / "export" / "model.safetensors"))
    wa = load_file(str(runs / f"{method}_one_process" / "export" / "model.safetensors"))
    wb = load_file(str(runs / f"{method}_ddp" / "export" / "model.safetensors"))
    assert_weights_match(wa, wb, lrs_of(one))  # bounds relative to the steps' lr: see tests/tolerances.py
    update_a = torch.cat([(wa[k] - start[k]).flatten() for k in wa])
    update_b = torch.cat([(wb[k] - start[k]).flatten() for k in wa])
    assert float((update_a - update_b).norm() / update_a.norm()) <= 0.01
    step2 = runs / f"{method}_ddp" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (step2 / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]


def test_ppo_with_a_separate_critic_reads_its_values_per_response(facts, tmp_path):
    """rl.value_model: a critic GPT-2 scores the sampled responses in one packed forward; each
    response gets the values of its own positions (those that predict its tokens)."""
    from qatune.methods.ppo import PPO
    from qatune.train.method import RunContext
    from qatune.train.step import Precision

    critic_dir = Path(facts["root"]) / "sft" / "export"
    cfg = facts_config(facts, "method=ppo", f"rl.value_model={critic_dir}", "rl.rollout.max_new_tokens=6")
    cpu = torch.device("cpu")
    model, reference = sft_model(facts), sft_model(facts)
    ctx = RunContext.for_method(
        cfg, PPO, facts["tok"], cpu, Precision("fp32", cpu), 0, 1, 1, tmp_path, model, reference
    )
    ppo = PPO(items(facts["train"][:7], facts["template"]), items(facts["test"][:2], facts["template"]))
    ppo.setup(ctx)
    wrapped = ppo.wrap(model)
    assert wrapped.critic is not None and wrapped.critic is not model
    with torch.no_grad():
        wrapped.value_head.weight.normal_(0, 0.1)  # values that differ from position to position
    sampled, _ = ppo.sample(ppo.train_prompts[:7], rollout=0)
    values = ppo.critic_values(sampled)
    with torch.no_grad():
        for i, (prompt, response) in enumerate(zip(sampled.prompt_ids, sampled.response_ids)):
            hidden = wrapped.critic(torch.tensor([prompt + response]))[0, len(prompt) - 1 : -1]
            expected = wrapped.value_head(hidden).squeeze(-1)
            # batched vs one sequence, fp32 values of O(1): measured <= 1e-6
            torch.testing.assert_close(values[i, : len(response)], expected, atol=1e-5, rtol=0)
            assert (values[i, len(response) :] == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reward_model_folder_as_critic_gives_its_trunk_and_score_head(tmp_path, family):
    """rl.value_model=<reward model export>: the critic is the reward model's language model (GPT-2,
    or a Llama whose untied LM head the export leaves out) and the value head starts from its score
    head (PPO's value initialized from the reward, as in InstructGPT)."""
    from qatune.methods.ppo.method import load_critic
    from qatune.model.reward import RewardModel, export_reward_hf

    rm = RewardModel(tiny_lm(family, vocab_size=64, n_positions=16, n_embd=16))
    critic, score = load_critic(str(export_reward_hf(rm, tmp_path / "rm")))
    assert type(critic) is type(rm.backbone)
    assert torch.equal(score, rm.score.weight)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(critic(ids), rm.backbone(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_rl_with_lora_trains_the_adapters_against_the_base_with_adapters_off(facts, method):
    """model.lora: only adapter weights (and PPO's value head) are trained and checkpointed; the KL
    anchor is the same model with its adapters off (no second copy), so the first rollout's KL is
    0 and later ones not."""
    from qatune.methods import method_class
    from qatune.train.runtime import run

    cfg = facts_config(
        facts, f"name={method}_lora", f"method={method}", "max_steps=3", "save_every=0", "optim.lr=1e-2",
        "model.lora={r: 4, alpha: 8}", *METHODS_ARGS[method],
    )  # fmt: skip
    rl = method_class(method)(items(facts["train"], facts["template"]), items(facts["test"][:8], facts["template"]))
    result = run(rl, sft_model(facts), facts["tok"], cfg, progress=False)
    kl = [r["kl"] for r in result.history]
    assert abs(kl[0]) < 1e-4 < abs(kl[-1])
    (_, last), *_ = reversed(list_checkpoints(result.run_dir / "checkpoints"))
    state = torch.load(last / "state.pt", map_location="cpu", weights_only=False)["model"]
    assert state and all(".lora_" in k or k.startswith("value_head.") for k in state)
    assert any(".lora_" in k for k in state) and (method == "ppo") == any("value_head" in k for k in state)
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    start = load_file(str(Path(facts["root"]) / "sft" / "export" / "model.safetensors"))
    merged = load_file(str(result.export_dir / "model.safetensors"))
    assert any(not torch.equal(start[k], merged[k]) for k in start)  # the adapters merged into the export

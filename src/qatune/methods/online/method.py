"""What PPO and GRPO share as methods on the training runtime: the online plan.

The runtime asks the plan for each optimizer step's micro-batches. Step s belongs to rollout
r = s // steps_per_rollout; the first step of a rollout samples it with the policy as it is now
(`collect`), scores it, and turns it into experiences; every step of the rollout then trains on
one minibatch of them. So the loop, accumulation, clipping and checkpoints stay the runtime's.

Everything a resumed run needs to continue bit-identically is either derived or checkpointed:
- the prompts of rollout r: a stream of the training prompts, reshuffled every pass with
  seed + pass, each rank taking its block of every rollout;
- the sampling generator of rollout r on rank k: seeded from (seed, r, k), so a rollout sampled
  again after a restart (from the same weights) is the same rollout;
- the rollout buffer (the experiences being trained on) and the KL controller: in `state_dict`,
  kept in each checkpoint, so a kill between the steps of one rollout resumes on the same data.

Per step the metrics of the rollout sampled at that step (reward, KL to the reference, entropy,
response length, EOS rate, generation tokens/s) ride on its first micro-batch and are summed over
ranks by the runtime like any other metric. A rollout whose mean KL per response leaves
`rl.kl_band` stops the run (`KLOutOfBand`) before it is trained on; the runtime checkpoints the
steps already done.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from qatune.data.batching import pad_id
from qatune.data.plan import held_out_split
from qatune.errors import MethodStop, UserError
from qatune.generation.sampling import SamplingConfig, generate_ids
from qatune.methods.online.config import RLConfig
from qatune.model.families import context_length
from qatune.model.unwrap import backbone
from qatune.rl.experience import PER_TOKEN, Experience, RLBatch, make_batch
from qatune.rl.kl import KLController, kl_k1
from qatune.rl.prompts import Prompt, encode_prompts
from qatune.rl.rewards import RewardFn, Sample, make_reward, score
from qatune.rl.rollout import Rollout, sample_rollout
from qatune.train.method import STEP_FIELDS, Method, RunContext, RunSettings


class KLOutOfBand(MethodStop):
    """A rollout's KL to the reference left `rl.kl_band`."""


@dataclass
class OnlinePlan:
    """The StepPlan of an online method: batches are sampled from the model being trained, so
    they are built on demand, in order, never prefetched."""

    method: OnlineRL
    n_steps: int
    prefetch: bool = False

    def __len__(self) -> int:
        return self.n_steps

    def epoch_of(self, step: int) -> int:
        return self.method.pass_of(step)

    def micro_batches(self, step: int, rank: int, world_size: int) -> list[RLBatch]:
        return self.method.micro_batches(step)


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """One rollout from several decoded chunks: per-token tensors padded to the longest response."""
    width = max(p.mask.shape[1] for p in parts)
    pad = lambda t: None if t is None else torch.nn.functional.pad(t, (0, width - t.shape[1]))
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([pad(getattr(p, name)) for p in parts])
    return Rollout(
        prompt_ids=[x for p in parts for x in p.prompt_ids],
        response_ids=[x for p in parts for x in p.response_ids],
        logprobs=cat("logprobs"),
        ref_logprobs=cat("ref_logprobs"),
        entropy=cat("entropy"),
        values=cat("values"),
        mask=cat("mask"),
        stopped_at_eos=[x for p in parts for x in p.stopped_at_eos],
        generated_tokens=sum(p.generated_tokens for p in parts),
    )


class OnlineRL(Method):
    """The shared part of PPO and GRPO. A subclass supplies `experiences` (rollout + scores ->
    per-token advantages) and `step` (the loss of a micro-batch)."""

    needs_reference = True
    config_sections = ("rl",)
    default_group_size = 1  # rl.group_size when the config leaves it unset
    progress_fields = (
        *STEP_FIELDS,
        ("reward", "reward {:.3f}"),
        ("kl", "KL {:.3f}"),
        ("eval_reward", "eval reward {:.3f}"),
        ("eval_kl", "eval KL {:.3f}"),
    )
    summary_fields = (
        ("eval_reward", "held-out reward of greedy answers"),
        ("eval_exact_match", "held-out exact match of greedy answers"),
        ("eval_sampled_reward", "held-out reward of sampled answers"),
        ("eval_kl", "held-out KL to the starting model (nats / response)"),
        ("reward", "training reward (last rollout)"),
        ("kl", "training KL to the starting model (last rollout)"),
    )
    train_without_dropout = True  # the ratio pi / pi_old compares it with the rollout's eval forward
    fsdp_unsupported = "rollouts decode with the whole model on every rank"
    accumulation_unsupported = (
        "an optimizer step trains on its share of the rollout (rl.prompts_per_rollout x rl.group_size / "
        "rl.minibatches responses), split into micro-batches of batch.size; set rl.minibatches for more steps "
        "per rollout"
    )
    fixed_world_size = True  # the rollouts' prompt streams and generators are per rank
    # name -> (metric keys, y label): each key's curve, its held-out `eval_<key>` as markers
    plots = {
        "reward": (("reward", "sampled_reward"), "reward (held-out: greedy, sampled)"),
        "exact_match": (("exact_match", "sampled_exact_match"), "held-out exact match"),
        "kl": (("kl",), "KL to the reference (nats / response)"),
        "entropy": (("entropy",), "policy entropy while sampling (nats / token)"),
        "response_length": (("response_length",), "response tokens (EOS included)"),
        "eos_rate": (("eos_rate",), "share of responses that end with EOS"),
        "clip_frac": (("clip_frac",), "share of response tokens with a clipped ratio"),
        "gen_tokens_per_s": (("gen_tokens_per_s", "tokens_per_s"), "tokens / s (generation, training)"),
    }

    def __init__(self, items, eval_items=None, template: dict | None = None, reward_fn: RewardFn | None = None):
        """items / eval_items: `PromptItem`s (prompt text through the template, reference answer);
        without eval_items the held-out prompts are a seeded split of `items` (eval.fraction)."""
        self.items, self.eval_items, self.template = list(items), eval_items, template
        self.reward_fn = reward_fn
        self.buffer: list[Experience] = []
        self.buffer_rollout = -1  # which rollout the buffer holds
        self.pending_stats: dict | None = None  # the rollout metrics of the step being built

    @classmethod
    def resolve_config(cls, cfg):
        if cfg.rl.group_size is not None:
            return replace(cfg)
        return replace(cfg, rl=replace(cfg.rl, group_size=cls.default_group_size))

    @classmethod
    def from_config(cls, settings: RunSettings, tokenizer, rank: int = 0):
        from qatune.data.readers import read_records
        from qatune.generation.evaluate import prompt_item

        if not settings.data.sources:
            raise UserError("data.sources is empty: give the prompts (with reference answers) to sample from")
        read = read_records(settings.data.sources, settings.data.mapping, settings.data.skip_bad, settings.data.limit)
        template = settings.data.get_template(tokenizer)  # `model`: the tokenizer's chat template, bound
        return cls([prompt_item(r, template) for r in read.records], template=template.to_dict())

    # --- setup ------------------------------------------------------------------------------

    def setup(self, run: RunContext) -> None:
        super().setup(run)
        cfg, rl = run.settings, run.section
        self.rl: RLConfig = rl
        if rl.prompts_per_rollout % run.world_size:
            n = rl.prompts_per_rollout
            raise UserError(f"rl.prompts_per_rollout={n} does not split evenly over {run.world_size} ranks")
        model = run.model
        self.context = min(cfg.data.max_len, context_length(model.config))
        budget = self.context - rl.rollout.max_new_tokens
        if budget < 1:
            n = rl.rollout.max_new_tokens
            raise UserError(f"rl.rollout.max_new_tokens={n} leaves no prompt room in {self.context} tokens")
        prompts, cut = encode_prompts(self.items, run.tokenizer, budget)
        given = None
        if self.eval_items is not None:
            given, eval_cut = encode_prompts(list(self.eval_items), run.tokenizer, budget)
            cut += eval_cut
        split = (cfg.eval.fraction, cfg.eval.max_examples, cfg.seed)
        self.train_prompts, self.eval_prompts = held_out_split(prompts, given, *split)
        self.prompts_cut = cut
        if self.reward_fn is None:
            self.reward_fn = make_reward(rl.reward, run.tokenizer.eos_token_id, run.device)
        self.kl = KLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
        tok = run.tokenizer
        self.eos_id = tok.eos_token_id
        self.stop_ids = self.stops(tok)  # EOS first (it pads), then a chat template's end-of-turn
        self.pad_id = pad_id(tok)
        self.seed = cfg.seed
        self.local_prompts = rl.prompts_per_rollout // run.world_size
        self.policy_module = model  # subclasses that wrap the model point this at the wrapper

    def stops(self, tokenizer) -> list[int]:
        """The ids that end a response: EOS, and with `template: model` the end-of-turn token the
        chat template writes after an answer (a chat model's "done"; its EOS may never come)."""
        from qatune.data.encode import stop_ids
        from qatune.data.templates import get_template

        return stop_ids(get_template(self.template), tokenizer) if self.template else [tokenizer.eos_token_id]

    def plan(self, run: RunContext) -> OnlinePlan:
        cfg, rl = run.settings, self.rl
        if cfg.max_steps is not None:
            steps = cfg.max_steps
        else:
            rollouts = math.ceil(cfg.epochs * len(self.train_prompts) / rl.prompts_per_rollout)
            steps = rollouts * rl.steps_per_rollout
        return OnlinePlan(self, steps)

    # --- the prompt stream and the micro-batches ---------------------------------------------

    def pass_of(self, step: int) -> int:
        """Which pass over the training prompts the step's rollout starts in."""
        rollout = step // self.rl.steps_per_rollout
        return rollout * self.rl.prompts_per_rollout // len(self.train_prompts)

    def rollout_prompts(self, rollout: int) -> list[Prompt]:
        """This rank's prompts of `rollout`: positions of the endless stream of passes, each pass
        shuffled with seed + pass."""
        n = len(self.train_prompts)
        start = rollout * self.rl.prompts_per_rollout + self.run.rank * self.local_prompts
        out, orders = [], {}
        for position in range(start, start + self.local_prompts):
            p, i = divmod(position, n)
            if p not in orders:
                orders[p] = list(range(n))
                random.Random(self.seed + p).shuffle(orders[p])
            out.append(self.train_prompts[orders[p][i]])
        return out

    def micro_batches(self, step: int) -> list[RLBatch]:
        rl = self.rl
        rollout, k = divmod(step, rl.steps_per_rollout)
        if self.buffer_rollout != rollout:
            self.collect(rollout)
        epoch, minibatch = divmod(k, rl.minibatches)
        order = list(range(len(self.buffer)))
        random.Random(f"{self.seed}:{rollout}:{epoch}").shuffle(order)
        share = [order[i] for i in range(minibatch, len(order), rl.minibatches)]
        micro = self._split([self.buffer[i] for i in share])
        if k == 0 and self.pending_stats is not None:  # the rollout sampled for this step
            micro[0] = replace(micro[0], rollout_stats=self.pending_stats)
            self.pending_stats = None
        return micro

    def _split(self, experiences: list[Experience]) -> list[RLBatch]:
        """Micro-batches of batch.size responses (or tokens), each packed into rows."""
        size, by_tokens = self.run.settings.batch.size, self.run.settings.batch.unit == "tokens"
        groups, current, used = [], [], 0
        for e in experiences:
            n = len(e) if by_tokens else 1
            if current and used + n > size:
                groups.append(current)
                current, used = [], 0
            current.append(e)
            used += n
        if current:
            groups.append(current)
        return [make_batch(g, self.context, self.pad_id) for g in groups]

    # --- sampling a rollout -------------------------------------------------------------------

    def rollout_value_head(self):
        """A value head that reads the policy's hidden states while sampling (PPO), or None."""
        return None

    def sample(self, prompts: list[Prompt], rollout: int) -> tuple[Rollout, list[Prompt]]:
        """`group_size` responses for each prompt (a group's responses are consecutive), decoded
        `generation_batch` at a time. Each chunk's generator is seeded from its first response's
        place in the whole rollout (all ranks), so N ranks sample what one process would when
        `generation_batch` divides each rank's share."""
        run, rl = self.run, self.rl
        seqs = [p for p in prompts for _ in range(rl.group_size)]
        first = run.rank * len(seqs)  # this rank's first response in the rollout
        policy = backbone(self.policy_module)
        parts = []
        for start in range(0, len(seqs), rl.generation_batch):
            chunk = seqs[start : start + rl.generation_batch]
            generator = self.generator(rollout, first + start)
            args = (rl.rollout, generator, self.run.reference, self.rollout_value_head(), run.precision.autocast)
            parts.append(sample_rollout(policy, [p.ids for p in chunk], self.stop_ids, *args))
        return concat_rollouts(parts), seqs

    def generator(self, rollout: int, position: int) -> torch.Generator:
        """The sampling generator of the chunk starting at response `position` of `rollout` (-1:
        evaluation): derived, not carried, so a restarted run samples the same responses."""
        seed = (self.seed * 1_000_003 + (rollout + 1) * 1_000_033 + position) % (2**63)
        return torch.Generator(device=self.run.device).manual_seed(seed)

    def collect(self, rollout: int) -> None:
        """Sample, score and turn rollout `rollout` into this rank's experiences; check its KL
        against the band before anything is kept."""
        run, rl = self.run, self.rl
        t0 = time.perf_counter()
        sampled, seqs = self.sample(self.rollout_prompts(rollout), rollout)
        gen_s = time.perf_counter() - t0
        samples = self.samples(sampled, seqs)
        scores = score(self.reward_fn, samples, rl.no_eos_penalty)
        experiences, extra = self.experiences(sampled, scores)
        mask = sampled.mask
        kl = (kl_k1(sampled.logprobs, sampled.ref_logprobs) * mask).sum(-1)
        stats = {
            "rollout_responses": float(len(samples)),
            "reward_sum": float(scores.sum()),
            "reward_sq_sum": float((scores.double() ** 2).sum()),
            "kl_sum": float(kl.sum()),
            "entropy_sum": float((sampled.entropy * mask).sum()),
            "response_tokens": float(mask.sum()),
            "eos_count": float(sum(sampled.stopped_at_eos)),
            "generated_tokens": float(sampled.generated_tokens),
            "generation_s": gen_s,
            "collect_s": time.perf_counter() - t0,
            **extra,
        }
        local = torch.tensor([len(samples), float(kl.sum())], dtype=torch.float64, device=run.device)
        n_all, kl_all = run.sum_over_ranks(local).tolist()
        mean_kl = kl_all / n_all
        low, high = rl.kl_band
        if not low <= mean_kl <= high:
            raise KLOutOfBand(
                f"KL to the reference is {mean_kl:.3f} nats per response at step {rollout * rl.steps_per_rollout + 1}, "
                f"outside rl.kl_band [{low}, {high}]: the policy drifted too far from where it started (lower "
                "optim.lr, raise rl.kl_coef or set rl.kl_target), or widen the band"
            )
        self.kl.update(mean_kl, int(n_all))
        self.buffer, self.buffer_rollout, self.pending_stats = experiences, rollout, stats

    def samples(self, sampled: Rollout, seqs: list[Prompt]) -> list[Sample]:
        tok = self.run.tokenizer
        out = []
        for prompt, ids, stopped in zip(seqs, sampled.response_ids, sampled.stopped_at_eos):
            text = tok.decode(ids[:-1] if stopped else ids)
            out.append(Sample(prompt.where, prompt.text, text, prompt.reference, prompt.ids, ids, stopped))
        return out

    def experiences(self, sampled: Rollout, scores: torch.Tensor) -> tuple[list[Experience], dict]:
        raise NotImplementedError

    # --- metrics, evaluation, state -------------------------------------------------------------

    def summarize(self, totals: dict[str, float], count: int) -> dict:
        out = {"response_tokens_trained": count, "kl_coef": self.kl.value}
        if count:
            out["clip_frac"] = totals.get("clipped_tokens", 0.0) / count
            out["policy_loss"] = totals.get("policy_loss_sum", 0.0) / count
        n = totals.get("rollout_responses")
        if n:
            mean = totals["reward_sum"] / n
            tokens = max(totals["response_tokens"], 1.0)
            out.update(
                reward=mean,
                reward_std=math.sqrt(max(totals["reward_sq_sum"] / n - mean * mean, 0.0)),
                kl=totals["kl_sum"] / n,
                entropy=totals["entropy_sum"] / tokens,
                response_length=totals["response_tokens"] / n,
                eos_rate=totals["eos_count"] / n,
                # generation runs on every rank at once: throughput = all tokens / the mean rank time
                gen_tokens_per_s=totals["generated_tokens"] / (totals["generation_s"] / self.run.world_size),
                collect_s=totals["collect_s"] / self.run.world_size,
            )
        return out

    def evaluate(self, model) -> dict:
        """On the held-out prompts (each rank a block): the reward and exact match of greedy answers,
        their length and EOS rate; the mean reward and exact match of `rl.group_size` answers per
        prompt sampled as in training (fixed seed: the policy's expected reward, which RL maximizes),
        and their KL to the reference in nats per response."""
        if not self.eval_prompts:
            return {}
        run, rl = self.run, self.rl
        policy = backbone(model)
        was_training = policy.training
        per_rank = math.ceil(len(self.eval_prompts) / run.world_size)
        first = run.rank * per_rank  # a contiguous block per rank, chunked as one process would
        mine = self.eval_prompts[first : first + per_rank]
        sums = torch.zeros(8, dtype=torch.float64)
        greedy = SamplingConfig(max_new_tokens=rl.rollout.max_new_tokens)
        for start in range(0, len(mine), rl.generation_batch):
            chunk = mine[start : start + rl.generation_batch]
            ids = [p.ids for p in chunk]
            group = [p for p in chunk for _ in range(rl.group_size)]  # rl.group_size samples per prompt
            with run.precision.autocast():
                gens = generate_ids(policy, ids, self.stop_ids, greedy)
                generator = self.generator(-1, (first + start) * rl.group_size)
                sampled = sample_rollout(
                    policy, [p.ids for p in group], self.stop_ids, rl.rollout, generator, run.reference
                )
            answers = [
                Sample(p.where, p.text, run.tokenizer.decode(g.ids), p.reference, p.ids, g.ids, g.stopped_at_eos)
                for p, g in zip(chunk, gens)
            ]
            kl = (kl_k1(sampled.logprobs, sampled.ref_logprobs) * sampled.mask).sum(-1) / rl.group_size
            graded = [x / rl.group_size for x in self._graded(self.samples(sampled, group))]
            part = [len(chunk), *self._graded(answers), *graded]
            part += [sum(len(g.ids) for g in gens), sum(g.stopped_at_eos for g in gens), float(kl.sum())]
            sums += torch.tensor(part, dtype=torch.float64)
        policy.train(was_training)
        n, reward, exact, s_reward, s_exact, length, eos, kl = run.sum_over_ranks(sums.to(run.device)).tolist()
        out = {"eval_reward": reward / n, "eval_sampled_reward": s_reward / n, "eval_kl": kl / n}
        out.update(eval_response_length=length / n, eval_eos_rate=eos / n)
        if any(p.reference is not None for p in self.eval_prompts):
            out.update(eval_exact_match=exact / n, eval_sampled_exact_match=s_exact / n)
        return out

    def _graded(self, samples: list[Sample]) -> tuple[float, float]:
        """(sum of rewards, sum of exact matches against the references) of some answers."""
        exact = sum(s.reference is not None and _exact(s.response, s.reference) for s in samples)
        return float(score(self.reward_fn, samples).sum()), float(exact)

    def state_dict(self) -> dict:
        return {
            "kl": self.kl.state_dict(),
            "buffer_rollout": self.buffer_rollout,
            "buffer": [experience_state(e) for e in self.buffer],
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.kl.load_state_dict(state["kl"])
        self.buffer_rollout = state["buffer_rollout"]
        self.buffer = [Experience(**e) for e in state["buffer"]]

    def export_info(self) -> dict:
        prompts = {"train": len(self.train_prompts), "held_out": len(self.eval_prompts)}
        return {
            "template": self.template,
            "max_len": self.context,
            "method": self.name,
            "reward": self.rl.reward,
            "prompts": prompts,
        }


def _exact(prediction: str, reference: str) -> bool:
    from qatune.generation.metrics import exact_match

    return bool(exact_match(prediction, reference))


def experience_state(e: Experience) -> dict:
    state = {"prompt_ids": e.prompt_ids, "response_ids": e.response_ids}
    state.update({name: getattr(e, name) for name in PER_TOKEN})
    return state

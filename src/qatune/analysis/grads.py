"""Gradient dynamics on a real model and real examples: common claims about them, measured.

- Per-example gradient norms against response length and total length, under two per-example
  normalizations: `sum` (the loss summed over the example's label tokens, what a token-normalized
  batch loss gives each example up to a constant) and `mean` (averaged over its label tokens).
  A claim "Var(grad) ∝ T" depends on which one is meant, so both are fitted.
- Segment shares: with the instruction unmasked, how much of the gradient comes from instruction
  tokens vs response tokens (norm of each part, and the cosine between them).
- Gradient noise scale B_simple = tr(Σ) / |G|² from per-example gradients (McCandlish et al., 2018).
- Per-layer gradient norms and update-to-weight ratios for one AdamW step.

Any model family (GPT-2, Llama): the loss runs through the model's `head_weight` (the tied
embedding, or the untied head), and layers are named as the family names them.

Per-example gradients are computed one example at a time (one backward each, exact) and folded
into running sums, so memory stays at a few copies of the parameters, whatever the sample size.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qatune.data.example import IGNORE, EncodedExample
from qatune.errors import UserError
from qatune.kernels.loss import response_loss_sum
from qatune.train.grad_norms import layer_of

NORMALIZATIONS = ("sum", "mean")


def _example_tensors(ex: EncodedExample, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([ex.input_ids], device=device)
    targets = torch.tensor([ex.shifted_targets()], device=device)
    return ids, targets


def segment_targets(ex: EncodedExample) -> tuple[list[int], list[int]]:
    """Shifted targets for (instruction tokens only, response tokens only), with the instruction
    unmasked: position i predicts token i+1, counted in the segment that token belongs to."""
    prompt, response = [], []
    for nxt, label in zip(ex.input_ids[1:], ex.labels[1:]):
        in_response = label != IGNORE
        prompt.append(IGNORE if in_response else nxt)
        response.append(nxt if in_response else IGNORE)
    return prompt + [IGNORE], response + [IGNORE]


def _flat_grad(model: nn.Module, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def example_gradient(model: nn.Module, ex: EncodedExample) -> tuple[torch.Tensor, int]:
    """(gradient of the example's summed response loss as one flat fp32 vector, label count)."""
    ids, targets = _example_tensors(ex, model.head_weight.device)
    hidden = model(ids)
    loss, n = response_loss_sum(hidden, model.head_weight, targets)
    return _flat_grad(model, loss).float(), n


# ---------------------------------------------------------------- per-example norms and noise scale


@dataclass
class PowerLawFit:
    """log y = log a + slope * log x, fitted by least squares; slope_se is its standard error."""

    slope: float
    slope_se: float
    intercept: float
    n: int

    def to_dict(self) -> dict:
        return {"slope": self.slope, "slope_se": self.slope_se, "intercept": self.intercept, "n": self.n}


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if a > 0 and b > 0]
    n = len(pts)
    if n < 3:
        raise ValueError(f"a power-law fit needs at least 3 positive points, got {n}")
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        raise ValueError("all x values are equal; cannot fit a slope")
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    intercept = my - slope * mx
    resid = sum((p[1] - intercept - slope * p[0]) ** 2 for p in pts)
    se = math.sqrt(resid / (n - 2) / sxx)
    return PowerLawFit(slope, se, intercept, n)


@dataclass
class NoiseScale:
    """From B per-example gradients g_i: tr(Σ) = Σ|g_i - ḡ|² / (B-1); E|ḡ|² = |G|² + tr(Σ)/B, so
    |G|² is estimated by |ḡ|² - tr(Σ)/B (unbiased). B_simple = tr(Σ)/|G|² is the batch size (in
    examples) at which gradient noise and signal are about equal."""

    trace_sigma: float
    grad_sq: float
    batch: int

    @property
    def b_simple(self) -> float:
        return self.trace_sigma / self.grad_sq if self.grad_sq > 0 else math.inf

    def to_dict(self) -> dict:
        return {"trace_sigma": self.trace_sigma, "grad_sq": self.grad_sq, "b_simple": self.b_simple, "n": self.batch}


class GradientMoments:
    """Running sum and sum of squared norms of gradient vectors: enough for the noise scale."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.total: torch.Tensor | None = None
        self.sq_norms = 0.0
        self.count = 0

    def add(self, g: torch.Tensor) -> None:
        self.sq_norms += float(g.double().dot(g.double()))
        g = g.to(self.dtype)
        self.total = g.clone() if self.total is None else self.total.add_(g)
        self.count += 1

    def noise_scale(self) -> NoiseScale:
        B = self.count
        if B < 2:
            raise ValueError("the noise scale needs at least 2 gradients")
        mean = self.total.double() / B
        mean_sq = float(mean.dot(mean))
        trace = (self.sq_norms - B * mean_sq) / (B - 1)
        return NoiseScale(trace, mean_sq - trace / B, B)


@dataclass
class PerExampleResult:
    response_len: list[int] = field(default_factory=list)
    total_len: list[int] = field(default_factory=list)
    sq_norm_sum: list[float] = field(default_factory=list)  # |g|² with the example's loss summed

    def sq_norms(self, normalization: str) -> list[float]:
        if normalization == "sum":
            return list(self.sq_norm_sum)
        return [s / n**2 for s, n in zip(self.sq_norm_sum, self.response_len)]


def length_bins(lengths: Sequence[int], n_bins: int) -> list[list[int]]:
    """Indices grouped into `n_bins` bins of (nearly) equal count by increasing length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    size = len(order) / n_bins
    return [order[round(b * size) : round((b + 1) * size)] for b in range(n_bins)]


def per_example_analysis(
    model: nn.Module, examples: Sequence[EncodedExample], n_bins: int = 4, progress: Iterable | None = None
) -> dict:
    """Per-example squared norms, their power-law fits against length, the variance across
    examples per length bin, and the noise scale — under both normalizations.

    Memory: 2 float64 + 2·n_bins float32 copies of the parameters (n_bins=0 skips the bins)."""
    examples = [e for e in examples if e.n_label_tokens > 0]
    if len(examples) < max(3, 2 * n_bins):
        raise UserError(f"need at least {max(3, 2 * n_bins)} examples with a response, got {len(examples)}")
    res = PerExampleResult()
    bins = length_bins([e.n_label_tokens for e in examples], n_bins) if n_bins else []
    bin_of = {i: b for b, idx in enumerate(bins) for i in idx}
    moments = {norm: GradientMoments() for norm in NORMALIZATIONS}
    bin_moments = {norm: [GradientMoments(torch.float32) for _ in bins] for norm in NORMALIZATIONS}
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deterministic loss
    for i, ex in enumerate(progress or examples):
        g, n = example_gradient(model, ex)
        res.response_len.append(n)
        res.total_len.append(len(ex))
        res.sq_norm_sum.append(float(g.double().dot(g.double())))
        for norm in NORMALIZATIONS:
            gi = g if norm == "sum" else g / n
            moments[norm].add(gi)
            if bins:
                bin_moments[norm][bin_of[i]].add(gi)
    model.train(was_training)
    out: dict = {"n_examples": len(examples), "response_len": res.response_len, "total_len": res.total_len}
    for norm in NORMALIZATIONS:
        sq = res.sq_norms(norm)
        per_bin = []
        for b, idx in enumerate(bins):
            ns = bin_moments[norm][b].noise_scale()
            per_bin.append(
                {
                    "mean_response_len": sum(res.response_len[i] for i in idx) / len(idx),
                    "n": len(idx),
                    "trace_sigma": ns.trace_sigma,
                }
            )
        out[norm] = {
            "sq_norm": sq,
            "fit_sq_norm_vs_response_len": fit_power_law(res.response_len, sq).to_dict(),
            "fit_sq_norm_vs_total_len": fit_power_law(res.total_len, sq).to_dict(),
            "variance_by_length_bin": per_bin,
            "fit_variance_vs_response_len": fit_power_law(
                [b["mean_response_len"] for b in per_bin], [b["trace_sigma"] for b in per_bin]
            ).to_dict()
            if n_bins >= 3
            else None,
            "noise_scale": moments[norm].noise_scale().to_dict(),
        }
    mean_labels = sum(res.response_len) / len(res.response_len)
    # A token-normalized batch loss weighs examples like `sum`; its B_simple in tokens:
    out["suggested_batch"] = {
        "examples": out["sum"]["noise_scale"]["b_simple"],
        "label_tokens": out["sum"]["noise_scale"]["b_simple"] * mean_labels,
    }
    return out


# ---------------------------------------------------------------- segment shares (unmasked)


def segment_gradients(
    model: nn.Module, examples: Sequence[EncodedExample]
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Gradients of the summed instruction-token loss and of the summed response-token loss over
    the examples, from ONE forward pass and two backward passes through it."""
    device = model.head_weight.device
    g_prompt = g_resp = None
    n_prompt = n_resp = 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids], device=device)
        tp, tr = (torch.tensor([t], device=device) for t in segment_targets(ex))
        hidden = model(ids)
        lp, np_ = response_loss_sum(hidden, model.head_weight, tp)
        lr, nr = response_loss_sum(hidden, model.head_weight, tr)
        gp = _flat_grad(model, lp, retain_graph=True).double()
        gr = _flat_grad(model, lr).double()
        g_prompt = gp if g_prompt is None else g_prompt + gp
        g_resp = gr if g_resp is None else g_resp + gr
        n_prompt, n_resp = n_prompt + np_, n_resp + nr
    return g_prompt, g_resp, n_prompt, n_resp


def segment_shares(model: nn.Module, examples: Sequence[EncodedExample]) -> dict:
    """With the loss on all tokens (normalized by all of them), the instruction's and the
    response's parts of the gradient: their norms, their share of the summed norms, the cosine."""
    was_training = model.training
    model.eval()
    gp, gr, n_prompt, n_resp = segment_gradients(model, examples)
    model.train(was_training)
    total = n_prompt + n_resp
    gp, gr = gp / total, gr / total
    norm_p, norm_r = float(gp.norm()), float(gr.norm())
    cos = float(gp.dot(gr) / (norm_p * norm_r)) if norm_p and norm_r else 0.0
    return {
        "instruction_tokens": n_prompt,
        "response_tokens": n_resp,
        "instruction_grad_norm": norm_p,
        "response_grad_norm": norm_r,
        "total_grad_norm": float((gp + gr).norm()),
        "instruction_share": norm_p / (norm_p + norm_r) if norm_p + norm_r else 0.0,
        "cosine": cos,
    }


# ---------------------------------------------------------------- per-layer norms and updates


def per_layer_step(
    model: nn.Module, examples: Sequence[EncodedExample], lr: float = 1e-4, weight_decay: float = 0.0
) -> list[dict]:
    """One optimizer step of training (the runtime's `accumulate` with the SFT step, then
    `optimizer_step`: AdamW, no clipping) on the response-only, token-normalized loss of
    `examples`, on a copy of the model: per layer, the gradient norm, the weight norm, and the
    update-to-weight ratio."""
    from qatune.data.batching import collate
    from qatune.methods.sft import SFT
    from qatune.train.optim import OptimConfig, build_optimizer
    from qatune.train.step import Precision, accumulate, optimizer_step

    work = copy.deepcopy(model)
    work.eval()
    device = work.head_weight.device
    if sum(e.n_label_tokens for e in examples) == 0:
        raise UserError("the examples carry no label tokens")
    precision = Precision("fp32", device)
    accumulate(work, SFT.stepper(), [collate([[ex]], pad_id=0) for ex in examples], precision)
    grads = {n: p.grad.detach().clone() for n, p in work.named_parameters()}
    before = {n: p.detach().clone() for n, p in work.named_parameters()}
    optimizer = build_optimizer(work, OptimConfig(lr=lr, weight_decay=weight_decay, warmup_steps=0, grad_clip=0.0))
    optimizer_step(work, optimizer, None, precision, grad_clip=0.0)
    rows: dict[str, dict] = {}
    for name, p in work.named_parameters():
        r = rows.setdefault(layer_of(name), {"layer": layer_of(name), "grad_sq": 0.0, "w_sq": 0.0, "dw_sq": 0.0})
        r["grad_sq"] += float(grads[name].double().pow(2).sum())
        r["w_sq"] += float(before[name].double().pow(2).sum())
        r["dw_sq"] += float((p.detach() - before[name]).double().pow(2).sum())
    out = []
    for r in rows.values():
        w = math.sqrt(r["w_sq"])
        out.append(
            {
                "layer": r["layer"],
                "grad_norm": math.sqrt(r["grad_sq"]),
                "weight_norm": w,
                "update_norm": math.sqrt(r["dw_sq"]),
                "update_to_weight": math.sqrt(r["dw_sq"]) / w if w else 0.0,
            }
        )
    return out

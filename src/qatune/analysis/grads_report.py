"""`qatune grads` outputs: a terminal summary, the JSON, PNG plots (scatter with fit, per-layer bars)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qatune.utils.files import atomic_write, write_text_atomic


def summary_lines(result: dict) -> list[str]:
    lines = [f"examples: {result['per_example']['n_examples']}"]
    lines.append("per-example gradient, power-law fits  |g|^2 ~ length^slope  (slope ± s.e.)")
    lines.append(f"  {'normalization':<14}{'vs response len':>20}{'vs total len':>20}{'Var vs resp. len':>20}")
    for norm in ("sum", "mean"):
        r = result["per_example"][norm]
        var_fit = r["fit_variance_vs_response_len"]
        lines.append(
            f"  {norm:<14}{_slope(r['fit_sq_norm_vs_response_len']):>20}{_slope(r['fit_sq_norm_vs_total_len']):>20}"
            f"{_slope(var_fit) if var_fit else '-':>20}"
        )
    ns = result["per_example"]["sum"]["noise_scale"]
    sb = result["per_example"]["suggested_batch"]
    lines.append(
        f"noise scale B_simple = tr(Σ)/|G|² = {ns['b_simple']:.3g} examples"
        f" (≈ {sb['label_tokens']:.3g} label tokens per step)"
    )
    seg = result.get("segments")
    if seg:
        lines.append(
            f"instruction unmasked: instruction tokens {seg['instruction_tokens']}, response tokens "
            f"{seg['response_tokens']}; |g_instr| = {seg['instruction_grad_norm']:.3g}, "
            f"|g_resp| = {seg['response_grad_norm']:.3g} (instruction share {100 * seg['instruction_share']:.1f}%), "
            f"cosine {seg['cosine']:.3f}"
        )
    lines.append(f"one AdamW step at lr={result['lr']:g}:")
    lines.append(f"  {'layer':<12}{'grad norm':>12}{'weight norm':>14}{'update/weight':>15}")
    for r in result["layers"]:
        lines.append(
            f"  {r['layer']:<12}{r['grad_norm']:>12.4g}{r['weight_norm']:>14.4g}{r['update_to_weight']:>15.3e}"
        )
    return lines


def _slope(fit: dict) -> str:
    return f"{fit['slope']:.2f} ± {fit['slope_se']:.2f}"


def write_outputs(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "grads.json", json.dumps(result, indent=2) + "\n")
    return [out_dir / "grads.json", *write_plots(result, out_dir)]


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pe = result["per_example"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, norm in zip(axes, ("sum", "mean")):
        x, y = pe["response_len"], pe[norm]["sq_norm"]
        fit = pe[norm]["fit_sq_norm_vs_response_len"]
        ax.scatter(x, y, s=10, alpha=0.6)
        xs = sorted(v for v in x if v > 0)
        ax.plot(
            xs,
            [math.exp(fit["intercept"]) * v ** fit["slope"] for v in xs],
            color="C3",
            label=f"fit: slope {fit['slope']:.2f} ± {fit['slope_se']:.2f}",
        )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="response tokens",
            ylabel="|g|²",
            title=f"per-example gradient, loss {'summed' if norm == 'sum' else 'averaged'} over tokens",
        )
        ax.legend()
    fig.tight_layout()
    paths = [_save(fig, out_dir / "grad_norm_vs_length.png")]
    plt.close(fig)

    layers = result["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["layer"] for r in layers]
    axes[0].bar(names, [r["grad_norm"] for r in layers])
    axes[0].set(title="gradient norm per layer", yscale="log")
    axes[1].bar(names, [r["update_to_weight"] for r in layers], color="C1")
    axes[1].set(title=f"update / weight after one AdamW step (lr={result['lr']:g})", yscale="log")
    for ax in axes:
        ax.tick_params(axis="x", rotation=90)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "per_layer.png"))
    plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path

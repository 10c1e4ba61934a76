"""PNG plots of a run from its metrics.jsonl: loss (with eval loss), lr, grad norm, tokens/s, and
the plots a method declares (`Method.plots`: name -> (metric keys, y label); each key's training
curve, with its held-out `eval_<key>` values as markers where logged)."""

from __future__ import annotations

from pathlib import Path

from qatune.train.metrics import read_metrics
from qatune.utils.files import atomic_write

PLOTS = {
    "loss": ("loss", "response-token loss"),
    "lr": ("lr", "learning rate"),
    "grad_norm": ("grad_norm", "global grad norm (pre-clip)"),
    "tokens_per_s": ("tokens_per_s", "tokens / s"),
    "clip_rate": ("clip_rate", "share of recent steps clipped"),
}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_plots(run_dir: Path, method_plots: dict | None = None) -> list[Path]:
    """One PNG per metric under run_dir/plots/, then the method's; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(run_dir) / "plots"
    written = []
    for name, (key, label) in PLOTS.items():
        steps, values = _series(records, key)
        if not steps:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, values, label="train" if name == "loss" else None, lw=1)
        if name == "loss":
            ev_steps, ev = _series(records, "eval_loss")
            if ev_steps:
                ax.plot(ev_steps, ev, "o-", label="held-out", ms=3)
            pr_steps, pr = _series(records, "prompt_loss")
            if pr_steps:
                ax.plot(pr_steps, pr, "s--", label="prompt tokens (measured, not trained)", ms=3, lw=1)
            ax.legend()
        if name == "grad_norm":
            clipped = [r["step"] for r in records if r.get("clipped")]
            if clipped:
                by_step = dict(zip(steps, values))
                ax.plot(clipped, [by_step.get(s, 0) for s in clipped], "rx", ms=3, label="clipped")
                ax.legend()
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{name}.png"
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        written.append(path)
    for name, (keys, label) in (method_plots or {}).items():
        path = _metrics_plot(records, keys, label, out / f"{name}.png", plt)
        if path:
            written.append(path)
    layers = _layer_plot(records, out, plt)
    return written + ([layers] if layers else [])


def _metrics_plot(records: list[dict], keys, label: str, path: Path, plt) -> Path | None:
    """Training curves of `keys` on one axis, held-out values (eval_<key>) as markers."""
    drawn = False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, key in enumerate(keys):
        color = f"C{i}"
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, lw=1, color=color, label=key)
        ev_steps, ev = _series(records, f"eval_{key}")
        if ev_steps:
            ax.plot(ev_steps, ev, "o--", ms=3, lw=1, color=color, label=f"held-out {key}")
        drawn = drawn or bool(steps or ev_steps)
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="optimizer step", ylabel=label)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def _layer_plot(records: list[dict], out: Path, plt) -> Path | None:
    """Per-layer gradient norms over training (logged every `monitor.every` steps)."""
    rows = [(r["step"], r["grad_norm_layers"]) for r in records if r.get("grad_norm_layers")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(rows[-1][1])
    cmap = plt.get_cmap("viridis", max(2, len(names)))
    for i, name in enumerate(names):
        ax.plot(
            [s for s, _ in rows],
            [n.get(name) for _, n in rows],
            color=cmap(i),
            lw=1,
            label=name if name in (names[0], names[-1]) or len(names) <= 6 else None,
        )
    ax.set(xlabel="optimizer step", ylabel="grad norm per layer (pre-clip)", yscale="log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "grad_norm_layers.png"
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path

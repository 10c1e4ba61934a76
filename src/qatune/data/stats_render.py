"""`qatune stats` output: the same tables for the terminal (rich) and the Markdown report, and the
PNG plots (length histograms on log-x, CDF with the max_len line)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qatune.utils.files import atomic_write

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows
MAX_TERMINAL_SOURCES = 20


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def tables(stats: dict) -> list[Table]:
    keys = ("sum", "mean", "median", "p90", "p99", "max")
    lengths = [
        [label, *(num(stats[field][k]) for k in keys)]
        for label, field in (
            ("prompt Q (no loss)", "prompt_tokens"),
            ("response A (loss, with EOS)", "response_tokens"),
            ("total", "total_tokens"),
        )
    ]
    ratio = stats["response_to_prompt_ratio"]
    over = stats["over_max_len"]
    summary = [
        ["examples", f"{stats['examples']:,}"],
        ["E[A] / E[Q]", "n/a" if ratio is None else f"{ratio:.3f}"],
        ["share of tokens with loss", pct(stats["loss_token_share"])],
        [f"over max_len {stats['max_len']}", f"{over['count']:,} ({pct(over['share'])})"],
    ]
    best = stats.get("best_truncation")
    if best:
        kept = f"{best['policy']}: {best['kept']:,} of {best['examples']:,}"
        if best["kept"] > best["default_kept"]:
            kept += f" (default cut_response: {best['default_kept']:,})"
        summary.append(["truncation keeping the most examples", kept])
    trunc = [
        [
            policy,
            f"{t['kept']:,}",
            f"{t['truncated']:,}",
            f"{t['dropped']:,}",
            f"{t['no_loss']:,}",
            f"{t['eos_lost']:,}",
            f"{t['errors']:,}" if policy == "error" else "-",
            pct(t["label_tokens_out"] / t["label_tokens_in"]) if t["label_tokens_in"] else "-",
        ]
        for policy, t in stats["truncation"].items()
    ]
    pad = stats["padding"]
    size = f"{pad['batch_size']:,} tokens" if pad.get("batch_unit") == "tokens" else f"{pad['batch_size']}"
    padding = [
        ["pad every example to max_len", pct(pad["pad_to_max_len"])],
        [f"pad to longest, random batches of {size}", pct(pad["pad_to_longest_random"])],
        [f"length-grouped batches of {size} (training: grouped)", pct(pad["length_grouped"])],
        [f"packed micro-batches of {size}, {pad['packing_rows']:,} rows (training: packed)", pct(pad["packing"])],
    ]
    out: list[Table] = [
        ("Token lengths (before truncation)", ["tokens", *keys], lengths),
        ("Summary", ["", "value"], summary),
        (
            f"Truncation at max_len {stats['max_len']}, every policy",
            ["policy", "kept", "truncated", "dropped", "no loss left", "EOS lost", "would fail", "loss tokens kept"],
            trunc,
        ),
        ("Padding (examples the default policy keeps)", ["batching", "padding"], padding),
    ]
    if stats.get("chars_per_token"):
        out.insert(2, cost_table(stats["chars_per_token"]))
    if stats.get("tokenizers"):
        from qatune.data.stats_compare import comparison_table

        out.insert(3 if stats.get("chars_per_token") else 2, comparison_table(stats["tokenizers"], stats["max_len"]))
    if "per_source" in stats:
        rows = [
            [
                name,
                f"{s['examples']:,}",
                num(round(s["prompt_tokens"]["mean"], 1)),
                num(round(s["response_tokens"]["mean"], 1)),
                "n/a" if s["response_to_prompt_ratio"] is None else f"{s['response_to_prompt_ratio']:.3f}",
                num(s["total_tokens"]["p99"]),
                f"{s['total_tokens']['max']:,}",
                f"{s['over_max_len']['count']:,}",
            ]
            for name, s in stats["per_source"].items()
        ]
        head = ["source", "examples", "mean Q", "mean A", "E[A]/E[Q]", "p99 total", "max total", "> max_len"]
        out.append(("Per source", head, rows))
    return out


def cost_table(cost: dict[str, dict]) -> Table:
    from qatune.data.token_cost import ENGLISH_CHARS_PER_TOKEN

    rows = []
    for name, c in cost.items():
        cpt = c["chars_per_token"]
        note = "-" if cpt is None else f"{ENGLISH_CHARS_PER_TOKEN / cpt:.1f}x"
        if c["far_more_than_english"]:
            note += " (far more than English)"
        shown = "n/a" if cpt is None else f"{cpt:.2f}"
        rows.append([name, f"{c['texts']:,}", f"{c['chars']:,}", f"{c['tokens']:,}", shown, note])
    title = f"Characters per token (each field tokenized alone; English text ~{ENGLISH_CHARS_PER_TOKEN})"
    return title, ["field", "texts", "characters", "tokens", "chars/token", "tokens vs English"], rows


def markdown(stats: dict, meta: dict, make_tables=tables) -> str:
    lines = ["# Data statistics", ""]
    lines += [f"- sources: {', '.join(f'`{s}`' for s in meta['sources'])}"]
    lines += [f"- layouts: {', '.join(sorted(set(meta['layouts'].values())))}"]
    lines += [f"- template: `{meta['template']['name']}`; tokenizer: `{meta['tokenizer']}`; max_len {stats['max_len']}"]
    lines += [f"- records read: {meta['records']:,}; bad records skipped: {meta['skipped']:,}"]
    lines += [f"  - {r}" for r in meta["skip_reasons"]]
    lines += [f"- **warning**: {w}" for w in meta.get("warnings", [])]
    for title, head, rows in make_tables(stats):
        lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += ["", "![token lengths](lengths_hist.png)", "", "![CDF](lengths_cdf.png)", ""]
    return "\n".join(lines)


def print_tables(stats: dict, console, make_tables=tables) -> None:
    from rich.table import Table as RichTable

    for title, head, rows in make_tables(stats):
        t = RichTable(title=title, title_justify="left")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 else "right")
        shown = rows if title != "Per source" else rows[:MAX_TERMINAL_SOURCES]
        for row in shown:
            t.add_row(*row)
        console.print(t)
        if len(shown) < len(rows):
            console.print(f"... and {len(rows) - len(shown)} more sources in the Markdown/JSON report")


def save_plots(prompt: Sequence[int], response: Sequence[int], max_len: int, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    total = np.asarray(prompt) + np.asarray(response)
    top = max(int(total.max()), max_len, 2)
    bins = np.unique(np.round(np.logspace(0, np.log10(top + 1), 60))) - 0.5  # whole tokens per bin
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(np.maximum(prompt, 1), bins=bins, alpha=0.6, label=f"prompt Q (mean {np.mean(prompt):.0f})")
    ax.hist(np.maximum(response, 1), bins=bins, alpha=0.6, label=f"response A (mean {np.mean(response):.0f})")
    ax.set_xscale("log")
    ax.set_xlabel("tokens (log scale)")
    ax.set_ylabel("examples")
    ax.set_title("Prompt and response lengths")
    ax.legend()
    paths = [out_dir / "lengths_hist.png", out_dir / "lengths_cdf.png"]
    save(fig, paths[0])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for values, label in ((prompt, "prompt Q"), (response, "response A"), (total, "total")):
        xs = np.sort(values)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    over = float(np.mean(total > max_len))
    ax.axvline(max_len, color="red", linestyle="--", label=f"max_len {max_len} ({100 * over:.1f}% over)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("share of examples at or below")
    ax.set_title("Cumulative distribution of lengths")
    ax.legend()
    save(fig, paths[1])
    return paths


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)

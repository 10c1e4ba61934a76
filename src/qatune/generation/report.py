"""The eval report as Markdown: a summary table (side by side with a base model when compared),
a per-source breakdown, warnings, and a few example generations."""

from __future__ import annotations

import math

# (label, section, key, format) of the summary rows
ROWS = [
    ("response loss", "loss", "response_loss", "{:.4f}"),
    ("perplexity", "loss", "perplexity", "{:.2f}"),
    ("exact match", "generation", "exact_match", "{:.1%}"),
    ("token F1", "generation", "f1", "{:.1%}"),
    ("ROUGE-L", "generation", "rouge_l", "{:.1%}"),
    ("answer tokens (mean)", "generation", "answer_tokens", "{:.1f}"),
    ("reference tokens (mean)", "generation", "reference_tokens", "{:.1f}"),
    ("stopped with EOS", "generation", "stopped_at_eos", "{:.1%}"),
    ("no EOS before the limit", "generation", "no_eos", "{:d}"),
]


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return spec.format(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def delta(a, b, spec: str) -> str:
    if a is None or b is None or any(isinstance(v, float) and math.isnan(v) for v in (a, b)):
        return "n/a"
    d = a - b
    if spec.endswith("%}"):
        return f"{d * 100:+.1f} pt"
    return f"{d:+d}" if isinstance(d, int) else f"{d:+.4g}"


def summary_table(report: dict, base: dict | None) -> list[str]:
    rows = []
    for label, section, key, spec in ROWS:
        a = report[section].get(key)
        row = [label, fmt(a, spec)]
        if base is not None:
            b = base[section].get(key)
            row += [fmt(b, spec), delta(a, b, spec)]
        rows.append(row)
    header = ["metric", "model"] + (["base", "model − base"] if base is not None else [])
    return table(header, rows)


def source_table(report: dict, base: dict | None) -> list[str]:
    loss, gen = report["loss"]["by_source"], report["generation"]["by_source"]
    rows = []
    for source in sorted(set(loss) | set(gen)):
        lo, g = loss.get(source, {}), gen.get(source, {})
        row = [source, str(g.get("n", 0)), fmt(lo.get("response_loss"), "{:.4f}"), fmt(g.get("exact_match"), "{:.1%}")]
        if base is not None:
            row.append(fmt(base["generation"]["by_source"].get(source, {}).get("exact_match"), "{:.1%}"))
        row += [fmt(g.get("f1"), "{:.1%}"), fmt(g.get("rouge_l"), "{:.1%}"), fmt(g.get("stopped_at_eos"), "{:.1%}")]
        rows.append(row)
    header = ["source", "n", "loss", "EM"] + (["EM base"] if base is not None else []) + ["F1", "ROUGE-L", "EOS"]
    return table(header, rows)


def quote(text: str) -> str:
    if not text.strip():
        return "> (empty)" if not text else "> (whitespace only)"
    return "\n".join("> " + line for line in text.splitlines() or [""])


def examples_section(report: dict, base: dict | None) -> list[str]:
    lines = []
    base_by_index = {e["index"]: e for e in base["examples"]} if base is not None else {}
    for e in report["examples"]:
        lines += [f"### {e['where']}", "", "**Prompt**", "", quote(e["prompt"]), "", "**Reference**", ""]
        lines += [quote(e["reference"] or ""), "", f"**Model** (EM {e['exact_match']:.0f}, F1 {e['f1']:.2f})", ""]
        lines += [quote(e["generation"]), ""]
        b = base_by_index.get(e["index"])
        if b is not None:
            lines += [f"**Base** (EM {b['exact_match']:.0f}, F1 {b['f1']:.2f})", "", quote(b["generation"]), ""]
    return lines


def describe_sampling(s: dict) -> str:
    how = "greedy" if s["temperature"] <= 0 else f"sampled (temperature {s['temperature']}, top-k {s['top_k']}, "
    if s["temperature"] > 0:
        how += f"top-p {s['top_p']}, seed {s['seed']})"
    return f"{how} decoding, up to {s['max_new_tokens']} new tokens"


def render_markdown(report: dict, base: dict | None = None) -> str:
    d = report["data_report"]["truncation"]
    lines = [f"# Evaluation of `{report['model']}`", ""]
    if base is not None:
        lines += [f"Compared with the base model `{base['model']}` on the same prompts.", ""]
    lines += [
        f"Data: {', '.join(report['data'])} — {report['generation']['n']} records; template `{report['template']}`, "
        f"max_len {report['max_len']}, truncation `{report['truncation']}` ({d['truncated']} truncated, "
        f"{d['dropped']} dropped for the loss); {describe_sampling(report['sampling'])}.",
        "",
    ]
    lines += summary_table(report, base) + [""]
    warnings = report["warnings"] + ([f"base: {w}" for w in base["warnings"]] if base is not None else [])
    if warnings:
        lines += ["**Warnings**", ""] + [f"- {w}" for w in warnings] + [""]
    lines += ["## By source", ""] + source_table(report, base) + [""]
    lines += ["## Example generations", ""] + examples_section(report, base)
    return "\n".join(lines).rstrip() + "\n"

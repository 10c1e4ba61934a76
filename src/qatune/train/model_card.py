"""The model card of an export: `README.md` as the Hugging Face hub reads it.

YAML front matter (library_name, base_model, license where the base's is known, tags, datasets,
pipeline_tag), then what the weights are: the base model, the data (sources, records read,
examples kept), the method and the settings it ran with, and the run's final metrics as its
metrics.jsonl holds them.

    text = model_card(cfg, info, final_metrics(run_dir, steps), method)
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from qatune.config import to_dict
from qatune.train.metrics import read_metrics

CARD_FILE = "README.md"

# Licenses of the bases this tool names by size; the hub's GPT-2 repositories state MIT.
# qatune.json's model_type (config.json's) -> how the card names the architecture
DISPLAY_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
KNOWN_LICENSES = {**{n: "mit" for n in GPT2_NAMES}, **{f"openai-community/{n}": "mit" for n in GPT2_NAMES}}

# The settings sections every method's card shows; a method adds its own (`Method.config_sections`).
COMMON_SECTIONS = ("model", "batch", "optim", "epochs", "max_steps", "precision", "seed")
DATA_KEYS = ("max_len", "truncation", "template", "system_prompt", "train_on_turns", "limit")


def final_metrics(run_dir: Path, step: int | None = None) -> dict:
    """The last record of `run_dir`'s metrics.jsonl up to `step`, with the held-out (eval_*) values
    of the last record that has them."""
    records = [r for r in read_metrics(run_dir) if step is None or r.get("step", 0) <= step]
    if not records:
        return {}
    out = {k: v for k, v in records[-1].items() if not k.startswith("eval_")}
    evaluated = [r for r in records if any(k.startswith("eval_") for k in r)]
    if evaluated:
        out.update({k: v for k, v in evaluated[-1].items() if k.startswith("eval_")})
    return out


def base_model(cfg) -> tuple[str | None, str | None]:
    """(the hub name of the base, its license): None for random init; a local folder passes on
    what its own card's front matter says (a qatune export's card names its base)."""
    name = cfg.model.name
    if cfg.model.init == "random":
        return None, None
    folder = Path(name)
    if folder.is_dir():
        front = read_front_matter(folder / CARD_FILE)
        return front.get("base_model"), front.get("license")
    return name, KNOWN_LICENSES.get(name)


def read_front_matter(path: Path) -> dict:
    """The YAML front matter of a model card, {} when there is none (or it does not parse)."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    try:
        data = yaml.safe_load(text[4:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def hub_datasets(sources: list) -> list[str]:
    """The hub data set names among the sources (a local file has no hub id to list)."""
    from qatune.data.records import DataError
    from qatune.data.sources import HubSource, expand_sources

    try:
        expanded = expand_sources(list(sources))
    except DataError:  # files that were there for training and are not now: list none
        return []
    return list(dict.fromkeys(s.name for s in expanded if isinstance(s, HubSource)))


def front_matter(cfg, info: dict, pipeline_tag: str) -> str:
    base, license_ = base_model(cfg)
    method = info.get("method", cfg.method)
    front: dict = {"library_name": "transformers"}
    if base:
        front["base_model"] = base
    if license_:
        front["license"] = license_
    front["tags"] = ["qatune", info.get("model_type", "gpt2"), method]
    datasets = hub_datasets(cfg.data.sources)
    if datasets:
        front["datasets"] = datasets
    front["pipeline_tag"] = pipeline_tag
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"


def data_lines(cfg, info: dict) -> list[str]:
    lines = ["## Data", ""]
    report = info.get("data_report") or {}
    layouts = report.get("layouts") or {}
    for source in cfg.data.sources:
        shown = source if isinstance(source, str) else yaml.safe_dump(source, default_flow_style=True).strip()
        lines.append(f"- `{shown}`")
    for file, layout in layouts.items():
        lines.append(f"  - `{file}`: layout {layout}")
    lines.append("")
    if report:
        t = report.get("truncation") or {}
        unit = "pairs" if "identical" in report else "records"
        text = f"{report.get('records', 0):,} {unit} read"
        if report.get("skipped"):
            text += f" ({report['skipped']:,} bad records skipped)"
        if t:
            policy = f"policy `{t.get('policy')}`, max_len {t.get('max_len')}"
            text += f"; {t.get('kept', 0):,} kept after truncation ({policy}): "
            text += f"{t.get('truncated', 0):,} truncated, {t.get('dropped', 0):,} dropped"
        lines.append(text + ".")
    prompts = info.get("prompts")
    if prompts:
        lines.append(f"{prompts['train']:,} training prompts, {prompts['held_out']:,} held out.")
    return lines


def settings_yaml(cfg, sections: tuple[str, ...]) -> str:
    full = to_dict(cfg)
    chosen = {"method": full["method"]}
    chosen.update({k: full[k] for k in COMMON_SECTIONS if k in full})
    chosen["data"] = {k: full["data"][k] for k in DATA_KEYS if k in full["data"]}
    chosen.update({k: full[k] for k in sections if k in full})
    return yaml.safe_dump(chosen, sort_keys=False, allow_unicode=True)


def metric_lines(metrics: dict, fields) -> list[str]:
    rows = [(label, key, metrics[key]) for key, label in fields if _number(metrics.get(key))]
    if not rows:
        return ["No metrics were recorded."]
    lines = ["| metric | key | value |", "| --- | --- | --- |"]
    lines += [f"| {label} | `{key}` | {value:.4g} |" for label, key, value in rows]
    return lines


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def model_card(cfg, info: dict, metrics: dict, method_class) -> str:
    """The card of an export of a run with resolved config `cfg`. info: the export's qatune.json
    (method, data_report …); metrics: `final_metrics` of the run; method_class: the Method (class
    or instance) whose declared summary fields, title, config sections and pipeline tag it shows."""
    fields, title, sections = method_class.summary_fields, method_class.title, method_class.config_sections
    method = info.get("method", cfg.method)
    architecture = DISPLAY_NAMES.get(info.get("model_type", "gpt2"), info.get("model_type"))
    base, _ = base_model(cfg)
    start = f"`{cfg.model.name}`" + (f" (base model `{base}`)" if base and base != cfg.model.name else "")
    if cfg.model.init == "random":
        start = f"a randomly initialized `{cfg.model.name}`-shaped {architecture} (seed {cfg.seed})"
    steps = metrics.get("step", info.get("steps"))
    lines = [
        f"# {cfg.name}",
        "",
        f"{architecture} trained with qatune, method `{method}`{f' ({title})' if title else ''}, starting from {start}"
        + (f"; {steps} optimizer steps." if steps is not None else "."),
        "",
        *data_lines(cfg, info),
        "",
        "## Method and settings",
        "",
        "```yaml",
        settings_yaml(cfg, sections).rstrip(),
        "```",
        "",
        f"## Final metrics{f' (step {steps})' if steps is not None else ''}",
        "",
        *metric_lines(metrics, fields),
        "",
    ]
    return front_matter(cfg, info, method_class.pipeline_tag) + "\n" + "\n".join(lines)

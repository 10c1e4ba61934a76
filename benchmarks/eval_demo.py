"""Before/after report of the demo model: train `qatune demo`, export its untrained initial weights
(the same seed, so exactly the model the demo scores "before"), and run
`qatune eval RUN held_out.jsonl --compare INIT` on the demo's held-out questions.

    python -m benchmarks.eval_demo [--out-dir /tmp/qatune-eval-demo] [--tokenizer DIR] [--steps N]

Prints the eval report's summary table and per-source table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.harness import emit
from qatune.cli import main as qatune
from qatune.demo.run import DemoSettings, run_demo, train_config
from qatune.demo.task import make_task
from qatune.model.hf_io import export_hf
from qatune.model.tokenizer import load_tokenizer
from qatune.train.runtime import make_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="/tmp/qatune-eval-demo")
    p.add_argument("--tokenizer", default=None, help="as for `qatune demo` (default: GPT-2's if found)")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    out = Path(args.out_dir)
    settings = DemoSettings(out_dir=str(out), tokenizer=args.tokenizer)
    if args.steps:
        settings.steps = args.steps

    t0 = time.perf_counter()
    demo = run_demo(settings)
    run = Path(demo.train.run_dir)
    tokenizer = load_tokenizer(run / "export")
    torch.manual_seed(settings.seed)  # as run_demo does before building its model
    init = make_model(train_config(settings).model, len(tokenizer))
    export_hf(init, out / "demo-init", tokenizer)

    _, held_out = make_task(settings.seed)
    data = out / "held_out.jsonl"
    data.write_text("".join(json.dumps({"question": q.question, "answer": q.answer}) + "\n" for q in held_out))
    t1 = time.perf_counter()
    qatune(["eval", str(run), str(data), "--compare", str(out / "demo-init"), "--max-new-tokens", "8"])
    t2 = time.perf_counter()

    report = json.loads((run / "eval" / "report.json").read_text())
    print((run / "eval" / "report.md").read_text())
    g, b = report["generation"], report["base"]["generation"]
    summary = {
        "steps": settings.steps,
        "template": report["template"],
        "n": g["n"],
        "exact_match": g["exact_match"],
        "exact_match_init": b["exact_match"],
        "f1": g["f1"],
        "response_loss": report["loss"]["response_loss"],
        "response_loss_init": report["base"]["loss"]["response_loss"],
        "stopped_at_eos": g["stopped_at_eos"],
        "demo_accuracy_after": demo.accuracy_after,
        "train_s": round(t1 - t0, 1),
        "eval_s": round(t2 - t1, 1),
    }
    emit(summary)


if __name__ == "__main__":
    main()

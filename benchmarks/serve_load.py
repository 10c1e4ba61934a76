"""`qatune serve` under load: aggregate tokens/s and latency percentiles at 1, 4, 8 and 16
concurrent clients, continuous batching side by side with one-at-a-time serving.

Two servers of the same model run at once, each in its own process with the same number of
PyTorch threads: the shipped server (`--max-batch 16`: requests join and leave one running batch)
and the same server with `--max-batch 1` (every request waits for the one before it). At each
level, C client threads share a fixed total of requests (closed loop: a client sends its next
request when the previous answer is complete), all streaming chat completions of distinct
questions, greedy, `max_tokens` fixed. The levels alternate which server goes first, so a change
in the machine's load during the run does not favour one side. Tokens are the server's own
`usage.completion_tokens`; latency is request sent -> last token received, TTFT request sent ->
first text chunk. The model is a random-init GPT-2 (fp32), the real GPT-2 tokenizer.

    python -m benchmarks.serve_load                       # 6 layers, d=384, 1 thread
    python -m benchmarks.serve_load --layers 12 --d-model 768 --heads 12 --requests 16
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from benchmarks.harness import SHARED, emit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--levels", default="1,4,8,16", help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=32, help="requests per level, shared by its clients")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    # One thread for both servers: the same compute on each side; on a shared 2-core machine more
    # threads make every step wait on the slowest (measured 4-5x slower in sft_vs_trl.py).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokenizer", default=os.environ.get("QATUNE_TOKENIZER", str(SHARED / "tokenizer" / "gpt2")))
    return p.parse_args(argv)


def make_model(args, folder: Path) -> Path:
    """A random-init GPT-2 of the requested shape, exported like a run (template 'plain')."""
    import torch

    from qatune.data.templates import get_template
    from qatune.model.gpt2 import GPT2, GPT2Config
    from qatune.model.hf_io import export_hf
    from qatune.model.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=args.heads, n_positions=args.context)
    meta = {"template": get_template("plain").to_dict(), "max_len": args.context}
    export_hf(GPT2(config), folder / "export", load_tokenizer(args.tokenizer), {"qatune.json": json.dumps(meta)})
    return folder


class Server:
    def __init__(self, run: Path, max_batch: int, threads: int, name: str) -> None:
        cmd = [sys.executable, "-m", "qatune", "serve", str(run), "--port", "0", "--name", name]
        cmd += ["--threads", str(threads), "--max-batch", str(max_batch), "--max-queue", "1024"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline()
        if " on http://" not in first:
            self.proc.kill()
            raise SystemExit(f"server did not start: {first!r}")
        self.url = urlparse(first.split(" on ")[1].strip())
        self.name = name

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)


def ask(server: Server, question: str, max_tokens: int) -> dict:
    """One streaming chat completion; timings and the server's token count."""
    body = {
        "model": server.name,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection(server.url.hostname, server.url.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"{server.name}: HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens = None, None
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


def load(server: Server, clients: int, n_requests: int, max_tokens: int) -> dict:
    """`clients` threads share `n_requests` (closed loop); aggregate tokens/s and percentiles."""
    questions = iter([f"Question {i}: what is the capital of country number {i}?" for i in range(n_requests)])
    lock, results = threading.Lock(), []

    def client() -> None:
        while True:
            with lock:
                question = next(questions, None)
            if question is None:
                return
            r = ask(server, question, max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "latency_p50": round(percentile(latencies, 50), 3),
        "latency_p90": round(percentile(latencies, 90), 3),
        "latency_p99": round(percentile(latencies, 99), 3),
        "ttft_p50": round(statistics.median(r["ttft"] for r in results), 3),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def main(argv=None) -> None:
    args = parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        run = make_model(args, Path(tmp) / "run")
        servers = {
            "batched": Server(run, args.max_batch, args.threads, "batched"),
            "one_at_a_time": Server(run, 1, args.threads, "one-at-a-time"),
        }
        try:
            for s in servers.values():  # warm up: first-call allocations, lazy imports
                load(s, 2, 2, 4)
            rows = []
            for i, clients in enumerate(levels):
                order = list(servers) if i % 2 == 0 else list(servers)[::-1]
                row = {"clients": clients}
                for side in order:
                    row[side] = load(servers[side], clients, args.requests, args.max_tokens)
                row["ratio"] = round(row["batched"]["tokens_per_s"] / row["one_at_a_time"]["tokens_per_s"], 2)
                rows.append(row)
                print(f"  {clients:>2} clients: {row['ratio']}x", file=sys.stderr, flush=True)
        finally:
            for s in servers.values():
                s.stop()
    report(args, rows, load_before, os.getloadavg())


def report(args, rows, load_before, load_after) -> None:
    import torch

    print(
        f"qatune serve, GPT-2 {args.layers} layers d={args.d_model} (random init, fp32), {args.threads} PyTorch "
        f"thread(s) per server; {args.requests} streaming chat requests x {args.max_tokens} tokens per level, "
        f"greedy; batched = --max-batch {args.max_batch}, one-at-a-time = --max-batch 1"
    )
    head = "| clients | batched tok/s | one-at-a-time tok/s | ratio | batched latency p50 / p90 / p99 (s) "
    head += "| one-at-a-time latency p50 / p90 / p99 (s) | TTFT p50 batched / one-at-a-time (s) |"
    print(head)
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b, o = r["batched"], r["one_at_a_time"]
        lat = lambda x: f"{x['latency_p50']:.2f} / {x['latency_p90']:.2f} / {x['latency_p99']:.2f}"
        print(
            f"| {r['clients']} | {b['tokens_per_s']:.1f} | {o['tokens_per_s']:.1f} | {r['ratio']:.2f}x | {lat(b)} "
            f"| {lat(o)} | {b['ttft_p50']:.2f} / {o['ttft_p50']:.2f} |"
        )
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min; {os.cpu_count()} CPUs)")
    result = {
        "bench": "serve_load",
        "model": {"n_layer": args.layers, "n_embd": args.d_model, "n_head": args.heads, "n_positions": args.context},
        "precision": "fp32",
        "threads": args.threads,
        "requests_per_level": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "levels": rows,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    emit(result)


if __name__ == "__main__":
    main()

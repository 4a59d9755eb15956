"""The server under 1, 4 and 16 concurrent streaming clients: aggregate tokens/s and latency percentiles.

Starts `dsv3 serve` in a subprocess on 127.0.0.1 (a free port), then for each concurrency level runs that
many clients with the official `openai` client, each streaming --requests completions one after another
(greedy, --max-tokens each, token counts from the streamed usage). Aggregate tokens/s is all completion
tokens over the level's wall time; latency is per request (first token and whole request), p50 and p99.
Continuous batching is what should make 16 clients cost about as many decode steps as one.

    .venv/bin/python benchmarks/bench_serve.py --preset small
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

LEVELS = (1, 4, 16)
PROMPT = "The latent cache holds the compressed keys and values of every token, so decoding reads"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"dsv3 serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return json.load(r)["model"]
        except OSError:
            time.sleep(0.3)
    raise SystemExit("dsv3 serve did not come up")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def run_level(client, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    def one_client(_):
        out = []
        for _ in range(requests):
            t0 = time.perf_counter()
            first, tokens = None, 0
            stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            out.append((first or 0.0, time.perf_counter() - t0, tokens))
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(one_client, range(clients), timeout=1800) for r in rs]
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    latency = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "latency_p50": percentile(latency, 50), "latency_p99": percentile(latency, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR")
    src.add_argument("--preset", default="small")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    try:
        import openai
    except ImportError:
        raise SystemExit("this benchmark drives the server with the openai client: pip install openai") from None

    port = free_port()
    source = ["--model", args.model] if args.model else ["--preset", args.preset]
    cmd = [sys.executable, "-m", "dsv3.cli", "serve", *source, "--port", str(port), "--dtype", args.dtype,
           "--threads", str(args.threads), "--max-batch", "16", "--cache-dtype", args.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        model = wait_up(port, proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        run_level(client, model, 1, 1, 4)  # warm-up
        print(f"# dsv3 serve {' '.join(source)}: {args.dtype}, {args.threads} thread(s), {args.max_tokens} tokens per "
              f"request, {args.requests} requests per client")
        rows = []
        for clients in LEVELS:
            row = run_level(client, model, clients, args.requests, args.max_tokens)
            rows.append(row)
            print(f"{clients:>2} clients: {row['tok_s']:7.1f} tok/s aggregate ({row['tokens']} tokens in "
                  f"{row['wall_s']:.1f} s); first token p50 {row['ttft_p50'] * 1e3:.0f} ms p99 "
                  f"{row['ttft_p99'] * 1e3:.0f} ms; request p50 {row['latency_p50']:.2f} s "
                  f"p99 {row['latency_p99']:.2f} s",
                  flush=True)
        print(f"16 clients / 1 client aggregate throughput: {rows[-1]['tok_s'] / rows[0]['tok_s']:.2f}x")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()

"""Serving load test: `jaxpatience serve` on loopback, a fixed number of requests at each concurrency level.

    python scripts/bench_serve.py --size small --requests 48 --concurrency 1 8 32 --max-tokens 64

Starts the server in a subprocess on a free 127.0.0.1 port (never another address) with a random checkpoint of
--size (tiny: the `jaxpatience tiny` preset; small: 8 layers, hidden 512, ~25M parameters, the same 320-token
BPE tokenizer), or --model DIR, and --slots = the largest concurrency. Then, per level C:

* --warm-passes untimed passes (default 2) of --requests requests as below, during which the server compiles
  the slot buckets, insert groupings and attention windows the level meets (arrivals group differently from one
  pass to the next; on the tiny model one pass left a second one 30x slower than the third). The first pass's
  wall time is reported as cold_wall_s, the losses of all of them as warm_lost;
* the timed pass: the same --requests streaming completions, at most C in flight (asyncio + httpx), each a
  random prompt of --prompt-len token ids (numpy default_rng(level)) with max_tokens = --max-tokens, temperature
  0 and ignore_eos, so every answer is exactly --max-tokens tokens (the usage chunk says how many came).

Bounded: each request times out after --timeout s, and a level stops starting requests after --time-limit s, so
the script always ends. Per level: requests/s and output tokens/s (completed requests and their tokens over the
level's wall time), latency p50 / p99 (send -> `data: [DONE]`), time to first token p50 / p99 (send -> first
chunk with text), and lost requests (an error status, a timeout, or a wrong token count; goal 0). With
--baseline, the same --requests prompts also go through one in-process `generate` call (batch_size = the largest
concurrency, after the server has stopped): the engine's throughput without HTTP, streaming or arrivals. A table
is printed and, as the last line, one JSON object with every level's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(size: str, directory: Path) -> Path:
    """A random checkpoint of `size` with the tiny preset's tokenizer."""
    from flax import nnx

    from jaxpatience.config import preset
    from jaxpatience.model.qwen2 import Qwen2ForCausalLM
    from jaxpatience.model.tokenizer import train_bpe_tokenizer
    from jaxpatience.model.weights import TINY_CORPUS, save_pretrained

    tokenizer = train_bpe_tokenizer(TINY_CORPUS, vocab_size=320)
    config = preset("tiny").replace(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048)
    if size == "small":
        config = config.replace(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                                num_key_value_heads=2)  # fmt: skip
    return save_pretrained(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), tokenizer, directory / size)


def start_server(model: Path, slots: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "jaxpatience", "serve", "--model", str(model), "--port", str(port),
               "--slots", str(slots), "--max-queue", "1024"]  # fmt: skip
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not start")


async def one_request(http: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streaming completion: its latency, time to first token and token count (or its failure)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens = time.perf_counter(), None, None
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "why": f"status {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        return {"ok": False, "why": type(err).__name__}
    ok = tokens == max_tokens
    return {"ok": ok, "why": None if ok else f"{tokens} tokens", "latency": time.perf_counter() - start,
            "ttft": first, "tokens": tokens or 0}  # fmt: skip


async def run_level(url: str, concurrency: int, count: int, args: argparse.Namespace, vocab: int) -> dict:
    rng = np.random.default_rng(concurrency)
    prompts = [rng.integers(0, vocab, args.prompt_len).tolist() for _ in range(count)]
    gate = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + args.time_limit
    limits = httpx.Limits(max_connections=concurrency + 4)

    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:

        async def gated(prompt):
            async with gate:
                if time.monotonic() > deadline:
                    return {"ok": False, "why": "not sent: time limit"}
                return await one_request(http, url, prompt, args.max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(prompt) for prompt in prompts))
        wall = time.perf_counter() - start
    done = [r for r in results if r["ok"]]
    pct = lambda key, q: round(float(np.percentile([r[key] for r in done], q)), 3) if done else None
    return {"concurrency": concurrency, "requests": count, "completed": len(done), "lost": count - len(done),
            "lost_why": sorted({r["why"] for r in results if not r["ok"]}), "wall_s": round(wall, 2),
            "requests_per_s": round(len(done) / wall, 3),
            "tokens_per_s": round(sum(r["tokens"] for r in done) / wall, 1),
            "latency_p50_s": pct("latency", 50), "latency_p99_s": pct("latency", 99),
            "ttft_p50_s": pct("ttft", 50), "ttft_p99_s": pct("ttft", 99)}  # fmt: skip


def generate_baseline(model: Path, args: argparse.Namespace, vocab: int) -> dict:
    """The same work without HTTP: one `generate` call on --requests prompts with batch_size = the largest
    concurrency, in this process after the server is gone (best of two calls; the first compiles)."""
    from jaxpatience import generate, load_pretrained

    loaded, tokenizer = load_pretrained(model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, args.prompt_len).tolist() for _ in range(args.requests)]
    walls = []
    for _ in range(2):
        start = time.perf_counter()
        out = generate(loaded, tokenizer, prompts, max_new_tokens=args.max_tokens, stop_tokens=[],
                       batch_size=max(args.concurrency), progress=False)  # fmt: skip
        walls.append(time.perf_counter() - start)
    assert all(len(g.token_ids) == args.max_tokens for g in out)
    return {"batch_size": max(args.concurrency), "wall_s": round(min(walls), 2),
            "tokens_per_s": round(len(prompts) * args.max_tokens / min(walls), 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="small", help="random checkpoint to serve")
    parser.add_argument("--model", help="serve this HF checkpoint directory instead")
    parser.add_argument("--requests", type=int, default=48, help="timed requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per level before it stops sending")
    parser.add_argument("--warm-passes", type=int, default=2, help="untimed passes per level before the timed one")
    parser.add_argument("--baseline", action="store_true", help="also time generate() on the same work, no HTTP")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else make_checkpoint(args.size, Path(tmp))
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        process, url = start_server(model, max(args.concurrency))
        try:
            levels = []
            for concurrency in args.concurrency:
                # Untimed passes first: the server compiles as it meets new shapes (arrivals group differently
                # from one pass to the next, so one pass does not meet them all).
                warm = [asyncio.run(run_level(url, concurrency, args.requests, args, vocab))
                        for _ in range(args.warm_passes)]  # fmt: skip
                levels.append({**asyncio.run(run_level(url, concurrency, args.requests, args, vocab)),
                               "cold_wall_s": warm[0]["wall_s"] if warm else None,
                               "warm_lost": sum(w["lost"] for w in warm)})  # fmt: skip
        finally:
            process.terminate()
            process.wait(timeout=30)
        baseline = generate_baseline(model, args, vocab) if args.baseline else None
    print(f"{'C':>3} {'done':>5} {'lost':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'ttft50':>7} "
          f"{'ttft99':>7} {'cold s':>7}")  # fmt: skip
    for level in levels:
        print(f"{level['concurrency']:>3} {level['completed']:>5} {level['lost']:>4} {level['requests_per_s']:>7} "
              f"{level['tokens_per_s']:>7} {level['latency_p50_s']:>7} {level['latency_p99_s']:>7} "
              f"{level['ttft_p50_s']:>7} {level['ttft_p99_s']:>7} {level['cold_wall_s']:>7}")  # fmt: skip
    if baseline:
        print(f"generate(), batch_size {baseline['batch_size']}, no HTTP: {baseline['tokens_per_s']} tokens/s")
    print(json.dumps({"model": str(args.model or args.size), "prompt_len": args.prompt_len,
                      "max_tokens": args.max_tokens, "levels": levels, "generate_baseline": baseline}))  # fmt: skip


if __name__ == "__main__":
    main()

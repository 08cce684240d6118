"""Load benchmark of `dvlm serve`: the real server on loopback, a fixed request mix, several
concurrency levels, for each decoder; plus the same requests through `model.generate`, one at a
time, as the direct-call baseline. Every ratio printed is between figures measured in this run.

    python benchmarks/serve_load.py                          # tiny-dvlm, ar/block/spec, 1/4/16/32
    python benchmarks/serve_load.py --decoders block --concurrency 1,16 --requests 64
    python benchmarks/serve_load.py --model random-0.5b --decoders block,spec --concurrency 1,16 \
        --requests 32 --max-tokens 32                        # a forward of tens of ms (built once)

Per decoder and concurrency it reports total tokens/s, requests/s, time to first token and
per-request latency (p50, p99), the mean number of rows an engine step advanced (from the
server's /metrics) and tokens per forward, and the failed requests; then the targets' ratios. Needs
the `serve` extra. `random-0.5b` is a random model with Qwen2.5-0.5B's language-model shape in
bfloat16 (the built-in tokenizer and a small vision tower), converted with the fast-dvlm preset and
kept under --cache: its answers run to max_tokens, its forward is real-size work.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from dvlm.tasks.builtin import IMAGE_PLACEHOLDER, get_task

MIX = {"shapes-caption": 0.5, "shapes-qa": 0.25, "digits-read": 0.25}  # long and short answers
RANDOM_SHAPES = {
    # Qwen2.5-0.5B's language model; the vision tower is small (the task images are 4-16 tokens).
    "random-0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                        vision_hidden_size=256, vision_depth=4, vision_heads=4),
}


@dataclass
class Request:
    question: str
    image_url: str


@dataclass
class Result:
    ok: bool
    tokens: int = 0
    nfe: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    error: str = ""


def request_mix(count: int, seed: int) -> list[Request]:
    """`count` test-split requests in a fixed order: captions, short questions, digit strips."""
    per_task = {task: max(1, round(count * share)) for task, share in MIX.items()}
    requests = []
    for task, n in per_task.items():
        for sample in get_task(task).generate("test", n, seed):
            question = sample.conversations[-2]["value"].split(IMAGE_PLACEHOLDER, 1)[-1].strip()
            requests.append(Request(question, data_url(sample.images[0])))
    order = sorted(range(len(requests)), key=lambda i: (i * 7919) % len(requests))  # interleave the tasks
    return [requests[i] for i in order][:count]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(request: Request, decoder: str, model: str, max_tokens: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": request.image_url}},
               {"type": "text", "text": request.question}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "decoder": decoder}


async def one_request(client: httpx.AsyncClient, request: Request, decoder: str, setup: Setup) -> Result:
    start = time.perf_counter()
    first = None
    usage, dvlm = {}, {}
    payload = body(request, decoder, setup.model, setup.max_tokens)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            if response.status_code != 200:
                return Result(False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    return Result(False, error=str(chunk["error"])[:200])
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter()
                usage = chunk.get("usage") or usage
                dvlm = chunk.get("dvlm") or dvlm
    except httpx.HTTPError as err:
        return Result(False, error=repr(err))
    end = time.perf_counter()
    return Result(True, usage.get("completion_tokens", 0), dvlm.get("nfe", 0), (first or end) - start, end - start)


async def run_level(url: str, setup: Setup, requests: list[Request], decoder: str,
                    concurrency: int) -> tuple[list[Result], float]:
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    results: list[Result] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await one_request(client, queue.get_nowait(), decoder, setup))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return results, time.perf_counter() - start


def step_rows(url: str) -> tuple[float, float]:
    """(sum, count) of the server's dvlm_step_rows histogram: rows advanced per engine step."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {name: float(v) for name, v in re.findall(r"^(dvlm_step_rows_(?:sum|count)) (\S+)$", text, re.M)}
    return values.get("dvlm_step_rows_sum", 0.0), values.get("dvlm_step_rows_count", 0.0)


def summarise(decoder: str, concurrency: int, results: list[Result], wall: float, rows: float) -> dict:
    done = [r for r in results if r.ok]
    latencies = sorted(r.latency_s for r in done) or [0.0]
    tokens = sum(r.tokens for r in done)
    nfe = sum(r.nfe for r in done)
    return {"decoder": decoder, "concurrency": concurrency, "requests": len(results), "failed": len(results) - len(done),
            "tokens_per_s": tokens / wall, "requests_per_s": len(done) / wall,
            "ttft_p50_ms": 1000 * statistics.median(r.ttft_s for r in done) if done else 0.0,
            "latency_p50_ms": 1000 * statistics.median(latencies),
            "latency_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "mean_step_rows": rows, "tokens_per_forward": tokens / nfe if nfe else 0.0,
            "errors": sorted({r.error for r in results if not r.ok})[:3]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, decoder: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    return launch_server(["--model", model, "--decoder", decoder, "--max-batch-size", str(max_batch),
                          "--max-queue", "1024",
                          # The caches off: every level sends the same prompts, which later levels would
                          # find kept, and the direct-call baseline has no cache (benchmarks/multi_turn.py
                          # measures the caches).
                          "--prefix-cache-mb", "0", "--vision-cache-mb", "0"])


def launch_server(options: list[str], ready_s: float = 120) -> tuple[subprocess.Popen, str]:
    """`dvlm serve OPTIONS` on a free loopback port, once its /health answers (within `ready_s`)."""
    port = free_port()
    command = [sys.executable, "-m", "dvlm", "serve", "--port", str(port), *options]
    # stderr to a file, not a pipe nobody reads while the server runs (a full pipe would block it).
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + ready_s
    while time.time() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"dvlm serve exited: {log.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.3)
    server.kill()
    raise RuntimeError(f"dvlm serve did not become ready in {ready_s:g} s")


def serve_levels(setup: Setup, decoder: str, requests: list[Request], levels: list[int]) -> list[dict]:
    server, url = start_server(setup.model, decoder, max(levels))
    try:
        asyncio.run(run_level(url, setup, requests[:4], decoder, 2))  # warm-up
        rows = []
        for concurrency in levels:
            before = step_rows(url)
            results, wall = asyncio.run(run_level(url, setup, requests, decoder, concurrency))
            after = step_rows(url)
            mean_rows = (after[0] - before[0]) / max(after[1] - before[1], 1)
            rows.append(summarise(decoder, concurrency, results, wall, mean_rows))
            print(format_row(rows[-1]), flush=True)
        return rows
    finally:
        server.terminate()
        server.wait(timeout=30)


def direct_baseline(setup: Setup, decoder: str, requests: list[Request]) -> dict:
    """The same requests through `model.generate`, one at a time, in this process."""
    import dvlm

    lm = dvlm.load(setup.model)
    images = [base64.b64decode(r.image_url.split(",", 1)[1]) for r in requests]
    for request, image in list(zip(requests, images))[:4]:  # warm-up
        lm.generate(request.question, images=image, decoder=decoder, max_new_tokens=setup.max_tokens)
    latencies, tokens, nfe = [], 0, 0
    start = time.perf_counter()
    for request, image in zip(requests, images):
        tick = time.perf_counter()
        out = lm.generate(request.question, images=image, decoder=decoder, max_new_tokens=setup.max_tokens)
        latencies.append(time.perf_counter() - tick)
        tokens, nfe = tokens + out.num_tokens, nfe + out.nfe
    wall = time.perf_counter() - start
    return {"decoder": decoder, "concurrency": "direct", "requests": len(requests), "failed": 0,
            "tokens_per_s": tokens / wall, "requests_per_s": len(requests) / wall, "ttft_p50_ms": 0.0,
            "latency_p50_ms": 1000 * statistics.median(latencies),
            "latency_p99_ms": 1000 * sorted(latencies)[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "mean_step_rows": 1.0, "tokens_per_forward": tokens / nfe, "errors": []}


def format_row(row: dict) -> str:
    return (f"{row['decoder']:<6}{str(row['concurrency']):>7}{row['requests']:>5}{row['failed']:>5}"
            f"{row['tokens_per_s']:>10.1f}{row['requests_per_s']:>8.2f}{row['ttft_p50_ms']:>9.1f}"
            f"{row['latency_p50_ms']:>10.1f}{row['latency_p99_ms']:>10.1f}{row['mean_step_rows']:>8.2f}"
            f"{row['tokens_per_forward']:>8.2f}")


HEADER = (f"{'dec':<6}{'conc':>7}{'req':>5}{'fail':>5}{'tok/s':>10}{'req/s':>8}{'ttft50':>9}{'lat50':>10}"
          f"{'lat99':>10}{'rows':>8}{'tok/fw':>8}")


OVERHEAD_TARGET = 0.15  # concurrency 1: the server adds at most this to the direct call's p50 latency
BATCHING_TARGET = 3.0  # concurrency 16: at least this many times concurrency 1's tokens/s (a >= 20 ms forward)


def ratios(rows: list[dict]) -> list[str]:
    """The targets' ratios, each between two rows of this run, with the target beside it."""
    def find(decoder, concurrency):
        return next((r for r in rows if r["decoder"] == decoder and r["concurrency"] == concurrency), None)

    lines = []
    for decoder in dict.fromkeys(r["decoder"] for r in rows):
        direct, one = find(decoder, "direct"), find(decoder, 1)
        if direct and one and one["latency_p50_ms"] and direct["latency_p50_ms"]:
            overhead = one["latency_p50_ms"] / direct["latency_p50_ms"] - 1
            lines.append(f"{decoder}: concurrency 1 adds {100 * overhead:+.1f}% to the direct call's p50 latency "
                         f"(target <= {100 * OVERHEAD_TARGET:.0f}%: {'met' if overhead <= OVERHEAD_TARGET else 'missed'})")
        sixteen = find(decoder, 16)
        if one and sixteen and one["tokens_per_s"]:
            gain = sixteen["tokens_per_s"] / one["tokens_per_s"]
            lines.append(f"{decoder}: tokens/s at concurrency 16 = {gain:.2f}x concurrency 1 (target >= "
                         f"{BATCHING_TARGET:g}x: {'met' if gain >= BATCHING_TARGET else 'missed'})")
    block, ar = find("block", 16), find("ar", 16)
    if block and ar and ar["tokens_per_s"]:
        lines.append(f"block vs ar at concurrency 16: {block['tokens_per_s'] / ar['tokens_per_s']:.2f}x tokens/s, "
                     f"p50 latency {block['latency_p50_ms']:.0f} ms vs {ar['latency_p50_ms']:.0f} ms")
    return lines


@dataclass(frozen=True)
class Setup:
    model: str  # what the server serves (and requests name) and the baseline loads
    max_tokens: int


def random_model(name: str, cache: Path) -> Path:
    """The converted random model `name` (RANDOM_SHAPES) in bfloat16, built under `cache` once."""
    import torch

    from dvlm.convert.conversion import convert_checkpoint
    from dvlm.model.adapters.base import TinyShape
    from dvlm.model.adapters.registry import reference_adapter
    from dvlm.runtime import seed_everything
    from dvlm.zoo.tiny import tiny_image_processor
    from dvlm.zoo.tokenizer import build_tokenizer

    out = cache / name
    if (out / "config.json").is_file():
        return out
    print(f"building {name} under {out} (once)", flush=True)
    adapter, tokenizer = reference_adapter(), build_tokenizer()
    seed_everything(0)
    model = adapter.random_model(tokenizer, TinyShape(**RANDOM_SHAPES[name])).to(torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="dvlm-bench-") as tmp:
        source = Path(tmp) / "ar"
        model.save_pretrained(source, safe_serialization=True)
        tokenizer.save_pretrained(source)
        tiny_image_processor(adapter=adapter).save_pretrained(source)
        del model
        convert_checkpoint(source, out, preset="fast-dvlm", log=lambda _: None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-dvlm",
                        help=f"model to serve, or one of {', '.join(RANDOM_SHAPES)} (default: %(default)s)")
    parser.add_argument("--decoders", default="ar,block,spec", help="comma-separated (default: %(default)s)")
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated levels (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=96, help="max_tokens of each request (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=5, help="test-split sample seed (default: %(default)s)")
    parser.add_argument("--threads", type=int,
                        help="torch threads of the server and of the direct call alike (default: torch's own)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dvlm-bench-models",
                        help="where random models are built (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads is not None:  # the server reads it at start; the direct call runs here
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    model = str(random_model(args.model, args.cache)) if args.model in RANDOM_SHAPES else args.model
    setup = Setup(model, args.max_tokens)
    requests = request_mix(args.requests, args.seed)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    threads = f"{args.threads} torch threads" if args.threads is not None else "torch's default threads"
    print(f"model {args.model}, {args.requests} requests per level, max_tokens {args.max_tokens}, {threads} "
          "(server and direct call)")
    print(HEADER, flush=True)
    for decoder in args.decoders.split(","):
        rows.append(direct_baseline(setup, decoder, requests))
        print(format_row(rows[-1]), flush=True)
        rows += serve_levels(setup, decoder, requests, levels)
    print("\n".join(ratios(rows)))
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "rows": rows, "requests": len(requests),
                                        "max_tokens": args.max_tokens}, indent=2) + "\n")


if __name__ == "__main__":
    main()

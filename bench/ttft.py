"""Time to first token through HAIA versus straight to the upstream, at 1 and N streams.

Starts the fake upstream, web and worker as real processes (as the tests do), then streams the
same answer directly from the fake and through HAIA and prints percentiles. No assertions: the
numbers are the result.

    uv run python bench/ttft.py [--concurrency 1,100] [--tokens 50] [--database-url postgres://…]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import redis

from tests.conftest import stack_env
from tests.procs import Stack, free_port, spawn, wait_until

REDIS_URL = "redis://127.0.0.1:6379/14"


async def one_stream(
    http: httpx.AsyncClient, url: str, model: str, prompt: str
) -> tuple[float, float]:
    """(seconds to the first content chunk, seconds to [DONE]) for one streamed answer."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    start = time.perf_counter()
    first = None
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - start
            elif line == "data: [DONE]":
                break
    return first or float("nan"), time.perf_counter() - start


async def measure(
    url: str, model: str, prompt: str, concurrency: int, rounds: int
) -> list[tuple[float, float]]:
    limits = httpx.Limits(
        max_connections=concurrency + 10, max_keepalive_connections=concurrency + 10
    )
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(
            *(one_stream(http, url, model, prompt) for _ in range(min(concurrency, 10)))
        )
        results: list[tuple[float, float]] = []
        for _ in range(rounds):
            results += await asyncio.gather(
                *(one_stream(http, url, model, prompt) for _ in range(concurrency))
            )
        return results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(name: str, concurrency: int, results: list[tuple[float, float]]) -> dict[str, float]:
    ttft = [r[0] for r in results]
    total = [r[1] for r in results]
    row = {
        "p50": pct(ttft, 0.5),
        "p95": pct(ttft, 0.95),
        "max": max(ttft) * 1000,
        "total_p50": statistics.median(total) * 1000,
    }
    print(
        f"{name:8} N={concurrency:<4} n={len(results):<5} TTFT p50 {row['p50']:7.1f} ms  "
        f"p95 {row['p95']:7.1f} ms  max {row['max']:7.1f} ms   total p50 {row['total_p50']:7.1f} ms"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", default="1,100")
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.005)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--workers", type=int, default=1, help="worker processes to start")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="haia-bench-"))
    database_url = args.database_url or f"sqlite://{work / 'haia.sqlite3'}"
    redis.Redis.from_url(REDIS_URL).flushdb()
    port = free_port()
    fake = spawn("fake-upstream", ["python", "-m", "tests.fake_upstream", str(port)], {}, work)
    upstream = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{upstream}/v1/models").status_code == 200, 30, "fake", [fake])
    web_port = free_port()
    env = stack_env(
        port=web_port,
        database_url=database_url,
        upstream=upstream,
        redis_url=REDIS_URL,
        HAIA_LOG_LEVEL="WARNING",
    )
    stack = Stack(f"http://127.0.0.1:{web_port}", env, work, database_url, upstream)
    prompt = f"#fake tokens={args.tokens} delay={args.delay}"
    print(
        f"machine: {os.cpu_count()} cores; database {database_url.split(':')[0]}; "
        f"{args.tokens} tokens, {args.delay * 1000:g} ms apart"
    )
    try:
        stack.start_web()
        stack.start_worker()
        for _ in range(args.workers - 1):
            stack.start_extra_worker()
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            rounds = 30 if concurrency == 1 else 3
            direct = asyncio.run(
                measure(
                    f"{upstream}/v1/chat/completions", "fake-model", prompt, concurrency, rounds
                )
            )
            haia = asyncio.run(
                measure(
                    f"{stack.base_url}/v1/chat/completions",
                    "ollama:fake-model",
                    prompt,
                    concurrency,
                    rounds,
                )
            )
            d = report("direct", concurrency, direct)
            h = report("HAIA", concurrency, haia)
            print(
                f"{'overhead':8} N={concurrency:<4} TTFT p50 +{h['p50'] - d['p50']:.1f} ms, "
                f"p95 +{h['p95'] - d['p95']:.1f} ms\n"
            )
        assert stack.web
        assert stack.worker
        print(
            f"peak RSS: web {peak_rss_mb(stack.web.process.pid):.0f} MB, "
            f"worker {peak_rss_mb(stack.worker.process.pid):.0f} MB"
        )
    finally:
        stack.stop()
        fake.stop()


if __name__ == "__main__":
    main()

"""What one Redis command costs through redis-py's asyncio pool and through HAIA's
`QuickCheckoutPool` (`app/redis_pool.py`), one after the other, on the same Redis.

    uv run python bench/redis_checkout.py [--redis-url redis://127.0.0.1:6379/14] [--commands 20000]

Prints, per pool: wall and CPU µs per GET, sent one after the other and from 100 tasks at once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import uvloop
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.redis_pool import quick_checkout  # noqa: E402


async def measure(client: Redis, commands: int) -> tuple[float, float, float, float]:
    await client.set("haia:bench:checkout", "v", ex=60)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(commands):
        await client.get("haia:bench:checkout")
    one_wall, one_cpu = time.perf_counter() - wall, time.process_time() - cpu

    async def task() -> None:
        for _ in range(commands // 100):
            await client.get("haia:bench:checkout")

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(task() for _ in range(100)))
    many_wall, many_cpu = time.perf_counter() - wall, time.process_time() - cpu
    per = 1e6 / commands
    return one_wall * per, one_cpu * per, many_wall * per, many_cpu * per


async def main(url: str, commands: int) -> None:
    print("| pool | one at a time: wall µs | CPU µs | 100 tasks: wall µs | CPU µs |")
    print("|---|---|---|---|---|")
    for name, quick in (("redis-py", False), ("QuickCheckoutPool", True)):
        client = Redis.from_url(url)
        if quick:
            quick_checkout(client)
        figures = await measure(client, commands)
        await client.aclose()
        print(f"| {name} | " + " | ".join(f"{value:.1f}" for value in figures) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--commands", type=int, default=20000)
    args = parser.parse_args()
    uvloop.run(main(args.redis_url, args.commands))

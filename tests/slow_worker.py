"""The real worker, with one deliberately slow delta callback: its event loop is blocked.

`python -m tests.slow_worker` runs `workers.main.main()` after wrapping the publisher so that
the `HAIA_TEST_BLOCK_AT`-th delta of the process blocks the whole event loop (a synchronous
sleep, as CPU-bound work or a long GC pause would) for `HAIA_TEST_BLOCK_SECONDS`.
"""

from __future__ import annotations

import os
import time

from app.publish import Publisher
from workers.main import main

_original = Publisher.delta
_seen = 0


def _slow_delta(self: Publisher, text: str) -> None:
    global _seen
    _seen += 1
    if _seen == int(os.environ.get("HAIA_TEST_BLOCK_AT", "5")):
        time.sleep(float(os.environ["HAIA_TEST_BLOCK_SECONDS"]))  # blocks the loop on purpose
    _original(self, text)


Publisher.delta = _slow_delta  # type: ignore[method-assign]

if __name__ == "__main__":
    main()

"""What one ended generation adds to HAIA's metrics, as Redis increments.

Kept apart from `app.metrics` (the web's Prometheus exposition): the worker counts its
generations in the script that appends their `end`, and has no use for prometheus_client
(about 1.3 MB of memory and 30 modules).
"""

from __future__ import annotations

import json

from app import keys

TTFT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the time-to-first-token histogram; `+Inf` follows."""
INF = "+Inf"


def labels_field(*labels: str) -> str:
    """A hash field naming a metric's labels (what `app.metrics` reads back)."""
    return json.dumps(labels)


def _bucket(seconds: float) -> str:
    return next((str(bound) for bound in TTFT_BUCKETS if seconds <= bound), INF)


Counter = tuple[str, str, str]
"""(hash, field, amount) of one increment; an amount with a `.` is a float (HINCRBYFLOAT)."""


def generation_counters(
    *,
    model: str,
    status: str,
    ttft_seconds: float | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
) -> list[Counter]:
    """The increments that count one ended generation, its tokens and its time to first
    token. They are applied by the script that appends the generation's `end` (no round trip
    of their own), and only if that `end` is accepted: a generation is counted once."""
    counters: list[Counter] = [(keys.METRICS_GENERATIONS, labels_field(model, status), "1")]
    for kind, tokens in (("prompt", prompt_tokens), ("completion", completion_tokens)):
        if tokens:
            counters.append((keys.METRICS_TOKENS, labels_field(model, kind), str(int(tokens))))
    if ttft_seconds is not None:
        seconds = max(ttft_seconds, 0.0)
        counters += [
            (keys.METRICS_TTFT, labels_field(model, _bucket(seconds)), "1"),
            (keys.METRICS_TTFT, labels_field(model, "sum"), f"{seconds:.6f}"),
            (keys.METRICS_TTFT, labels_field(model, "count"), "1"),
        ]
    return counters

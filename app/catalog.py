"""Which models HAIA offers, and which one a request gets.

Every upstream that can be asked is asked for its models, all at once with a short timeout,
every `REFRESH_EVERY` seconds by a background task of each web process, and again (in the
background) when a request finds the list older than `STALE_AFTER`. Each upstream's answer is
kept as soon as it comes. Requests are answered from the last known lists and never wait on a
probe, except the first one of a process, which waits at most `FIRST_WAIT` for the first
round (a slow or silent upstream is then missing from it). An unreachable upstream's models
are left out until it answers again.

Per process rather than shared in Redis: a probe is one small GET per upstream every half
minute, so sharing would save nothing worth a second source of truth, and the list keeps
working while Redis is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from app.config import Settings
from app.errors import ModelNotFound, Unavailable
from app.http1 import SSEClient
from app.llm import Refused, Unanswered, discover
from app.upstreams import Upstream, split_model_id

log = logging.getLogger(__name__)

REFRESH_EVERY = 30.0
STALE_AFTER = 5.0
PROBE_TIMEOUT = 2.0
FIRST_WAIT = 0.5


@dataclass
class Found:
    """What one upstream said when last asked."""

    models: list[str] = field(default_factory=list)
    reachable: bool = False
    error: str | None = None


class Catalog:
    """The models of every upstream, HAIA_MODEL, HAIA_MODELS and HAIA_ALIASES."""

    def __init__(self, settings: Settings, http: SSEClient) -> None:
        self._settings = settings
        self._http = http
        self._found: dict[str, Found] = {}
        self._refreshed_at: float | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._waited = False

    @property
    def _probed(self) -> list[Upstream]:
        return [u for u in self._settings.upstreams.values() if u.discoverable]

    async def refresh(self) -> None:
        """Ask every upstream for its models, concurrently; keep what each said as it comes."""
        await asyncio.gather(*(self._refresh(upstream) for upstream in self._probed))
        self._refreshed_at = time.monotonic()

    async def _refresh(self, upstream: Upstream) -> None:
        self._found[upstream.name] = await self._probe(upstream)

    async def _probe(self, upstream: Upstream) -> Found:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                models = await discover(upstream, self._http, wait=PROBE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever an upstream does, the list goes on
            expected = isinstance(exc, Unanswered)  # anything else is worth a warning
            log.log(
                logging.DEBUG if expected else logging.WARNING,
                "model discovery of %s failed: %s",
                upstream.name,
                type(exc).__name__,
            )
            where = f" at {upstream.base_url}" if upstream.base_url else ""
            if isinstance(exc, Refused):
                return Found(error=f"{upstream.name}{where} answered {exc.status} to a model list")
            return Found(error=f"{upstream.name}{where} is unreachable")
        return Found(models=models, reachable=True)

    async def run_forever(self) -> None:
        """Refresh every REFRESH_EVERY seconds (the web runs this as a background task)."""
        while True:
            with contextlib.suppress(Exception):
                await self._start_refresh()
            await asyncio.sleep(REFRESH_EVERY)

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self.refresh(), name="haia-discovery-probe")
        return self._refreshing

    async def _current(self) -> None:
        """Make sure the lists are known; refresh stale ones in the background."""
        if self._refreshed_at is None:
            task = self._start_refresh()
            if not self._waited:
                self._waited = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), FIRST_WAIT)
        elif time.monotonic() - self._refreshed_at >= STALE_AFTER:
            self._start_refresh()

    async def models(self) -> list[str]:
        """The default first, then HAIA_MODELS, every reachable upstream's models, the aliases."""
        await self._current()
        discovered = [
            model
            for upstream in self._settings.upstreams
            for model in self._found.get(upstream, Found()).models
        ]
        ordered = [*self._settings.configured_models, *discovered, *self._settings.aliases]
        return list(dict.fromkeys(ordered))

    def owner(self, model_id: str) -> str:
        """What `/v1/models` shows as `owned_by`: the upstream, or `haia` for an alias."""
        split = split_model_id(model_id, self._settings.upstreams)
        return split[0].name if split else "haia"

    @property
    def upstream_errors(self) -> list[str]:
        """Why upstreams were not reachable when last asked."""
        return [found.error for found in self._found.values() if found.error]

    @property
    def all_unreachable(self) -> bool:
        return bool(self._found) and not any(found.reachable for found in self._found.values())

    async def resolve(self, requested: str | None) -> str:
        """The model id (or alias) a request gets: the one it names, or the default."""
        offered = await self.models()
        if not requested:
            if self._settings.model:
                return self._settings.model
            if not offered:
                raise self._nothing_offered()
            return offered[0]
        if requested in self._settings.aliases:
            return requested
        split = split_model_id(requested, self._settings.upstreams)
        if split is not None:
            found = self._found.get(split[0].name)
            if requested in offered or found is None or not found.reachable:
                return requested  # listed, or its upstream cannot say: let it answer
            raise ModelNotFound(
                f"The model {requested!r} does not exist on upstream {split[0].name!r}; "
                "GET /v1/models lists the ones offered.",
                param="model",
            )
        return self._bare(requested, offered)

    def _bare(self, requested: str, offered: list[str]) -> str:
        """A name without `upstream:`: the one upstream that offers it, else a 404."""
        names: dict[str, list[str]] = {}
        for model_id in offered:
            split = split_model_id(model_id, self._settings.upstreams)
            if split is not None:
                names.setdefault(split[1], []).append(model_id)
        candidates = names.get(requested) or names.get(f"{requested}:latest") or []
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            raise ModelNotFound(
                f"The model {requested!r} is offered by several upstreams: "
                f"{', '.join(candidates)}; name one of them.",
                param="model",
            )
        if self.all_unreachable:  # nothing could be asked: say so, not "does not exist"
            upstreams = self._settings.upstreams
            variables = [upstreams[name].url_variable for name in self._found if name in upstreams]
            where = " or ".join(variable for variable in variables if variable) or "its URL"
            raise Unavailable(
                f"The model {requested!r} cannot be looked up: "
                f"{'; '.join(self.upstream_errors)}. Start the model server or check {where}."
            )
        raise ModelNotFound(
            f"The model {requested!r} does not exist; GET /v1/models lists the ones offered.",
            param="model",
        )

    def _nothing_offered(self) -> Unavailable:
        return Unavailable(
            "No model is available: HAIA_MODEL is not set and no upstream offers a model "
            f"({'; '.join(self.upstream_errors) or 'none answered'}). Start Ollama, set "
            "OLLAMA_BASE_URL or HAIA_UPSTREAM_<NAME>, or set HAIA_MODEL (e.g. "
            "HAIA_MODEL=ollama:llama3.2, HAIA_MODEL=anthropic:claude-sonnet-4-5, "
            "HAIA_MODEL=openai-chat:gpt-4o-mini).",
            code="no_model_configured",
        )

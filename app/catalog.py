"""Which models HAIA offers, and which one a request gets."""

from __future__ import annotations

import logging
import time

import httpx

from app.config import Settings
from app.errors import ModelNotFound, Unavailable
from app.llm import discover_ollama_models

log = logging.getLogger(__name__)

DISCOVERY_TTL = 30.0


class Catalog:
    """Configured models (HAIA_MODEL, HAIA_MODELS), or else the ones Ollama offers."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self._settings = settings
        self._http = http
        self._discovered: list[str] = []
        self._discovered_at = -DISCOVERY_TTL
        self.upstream_error: str | None = None

    @property
    def discovers(self) -> bool:
        """True when no HAIA_MODEL is set and the default comes from Ollama."""
        return self._settings.model is None

    async def models(self) -> list[str]:
        if not self.discovers:
            return self._settings.configured_models
        if time.monotonic() - self._discovered_at >= DISCOVERY_TTL or not self._discovered:
            await self._discover()
        return list(dict.fromkeys([*self._discovered, *self._settings.configured_models]))

    async def _discover(self) -> None:
        try:
            self._discovered = await discover_ollama_models(self._settings, self._http)
            self.upstream_error = None if self._discovered else "Ollama offers no models"
        except (httpx.HTTPError, ValueError) as exc:
            self._discovered = []
            self.upstream_error = f"Ollama at {self._settings.ollama_base_url} is unreachable"
            log.debug("model discovery failed: %s", type(exc).__name__)
        self._discovered_at = time.monotonic()

    async def resolve(self, requested: str | None) -> str:
        """The model id a request gets: the one it names, or the default."""
        offered = await self.models()
        if not offered:
            raise Unavailable(
                f"No model is available: HAIA_MODEL is not set and Ollama at "
                f"{self._settings.ollama_base_url} offers none. Start Ollama, set OLLAMA_BASE_URL, "
                "or set HAIA_MODEL (e.g. HAIA_MODEL=ollama:llama3.2, "
                "HAIA_MODEL=anthropic:claude-sonnet-4-5, HAIA_MODEL=openai-chat:gpt-4o-mini).",
                code="no_model_configured",
            )
        if not requested:
            return offered[0]
        if requested in offered:
            return requested
        for model_id in offered:  # a bare name, as some clients send it
            if model_id.partition(":")[2] == requested:
                return model_id
        raise ModelNotFound(
            f"The model {requested!r} does not exist; GET /v1/models lists the ones offered.",
            param="model",
        )

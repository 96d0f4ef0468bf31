#!/usr/bin/env bash
# Create .venv (if missing), install maturin and the test dependencies listed in
# pyproject.toml [project.optional-dependencies].test and .bench, build the release wheel into
# dist/ and install it into .venv. Idempotent; quick when nothing changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"

if [[ ! -x "$VPY" ]]; then
    echo "setup: creating $VENV"
    "$PY" -m venv "$VENV"
fi

# Dependencies: re-run pip only when pyproject.toml changed (or the marker is missing).
deps_marker="$VENV/.tenso-ray-deps"
deps_key="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$deps_marker" || "$(cat "$deps_marker")" != "$deps_key" ]] \
    || ! "$VPY" -c "import maturin, pytest, numpy" >/dev/null 2>&1; then
    mapfile -t deps < <("$VPY" - <<'PYEOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    doc = tomllib.load(f)
for req in doc["build-system"]["requires"]:
    print(req)
for req in doc["project"].get("dependencies", []):
    print(req)
for extra in ("test", "bench"):
    for req in doc["project"]["optional-dependencies"][extra]:
        print(req)
PYEOF
    )
    echo "setup: installing ${#deps[@]} dependencies into .venv"
    "$VPY" -m pip install -q --disable-pip-version-check "${deps[@]}"
    echo "$deps_key" > "$deps_marker"
fi

# Build the wheel (cargo keeps target/ between runs, so an unchanged tree relinks nothing).
rm -f dist/tenso_ray-*.whl
"$VENV/bin/maturin" build --release -o dist --interpreter "$VPY"
shopt -s nullglob
wheels=(dist/tenso_ray-*.whl)
if [[ ${#wheels[@]} -ne 1 ]]; then
    echo "setup: expected exactly one wheel in dist/, found ${#wheels[@]}" >&2
    exit 1
fi
"$VPY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "${wheels[0]}"
# Sanity: the installed package (not the source tree) must be what `import tenso` finds.
(cd / && "$VPY" -c "import tenso, tenso.tenso_rs; print('setup: installed', tenso.__file__)")

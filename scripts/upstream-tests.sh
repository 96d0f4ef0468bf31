#!/usr/bin/env bash
# Upstream's own contract tests: the tests/ folders of the tenso 0.24.0 and 0.19.4 sdists, run against OUR installed
# package (.venv, as scripts/setup.sh installs it). The sdists are downloaded once into .refvenvs/upstream-tests/
# (ignored by git; re-runs reuse them). Differences we keep on purpose are listed, each with its reason, in
# tests/upstream/expected-failures.txt and marked strict xfail by tests/upstream/tenso_upstream_plugin.py.
#
#   bash scripts/upstream-tests.sh            # both versions
#   bash scripts/upstream-tests.sh 0.19.4     # one version (extra arguments go to pytest)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
CACHE="$ROOT/.refvenvs/upstream-tests"
VERSIONS=(0.24.0 0.19.4)
if [[ $# -gt 0 && $1 =~ ^0\.[0-9]+\.[0-9]+$ ]]; then
    VERSIONS=("$1")
    shift
fi

fetch() {  # fetch VERSION: leaves the sdist's tests/ in $CACHE/tenso-VERSION/tests
    local v=$1 dir="$CACHE/tenso-$1"
    [[ -f "$dir/.complete" ]] && return 0
    mkdir -p "$CACHE"
    local tmp
    tmp="$(mktemp -d "$CACHE/.download.XXXXXX")"
    # --no-build-isolation: pip reads the sdist's metadata with the maturin of .venv instead of building one.
    if ! PATH="$ROOT/.venv/bin:$PATH" "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        "tenso==$v" -d "$tmp"; then
        rm -rf "$tmp"
        echo "upstream-tests: could not download the tenso $v sdist from the package index (network?)" >&2
        return 1
    fi
    tar -xzf "$tmp/tenso-$v.tar.gz" -C "$tmp" "tenso-$v/tests"
    rm -rf "$dir"
    mv "$tmp/tenso-$v" "$dir"
    rm -rf "$tmp"
    touch "$dir/.complete"
}

status=0
for v in "${VERSIONS[@]}"; do
    fetch "$v"
    printf '\n==> upstream tenso %s tests against the installed tenso-ray\n' "$v"
    # Run from the extracted folder, which holds tests/ only: `import tenso` can only find the installed package.
    (cd "$CACHE/tenso-$v" && PYTHONPATH="$ROOT/tests/upstream" TENSO_UPSTREAM_VERSION="$v" \
        "$PY" -m pytest -q -c "$ROOT/tests/upstream/pytest.ini" --rootdir "$CACHE/tenso-$v" tests "$@") || status=$?
done
exit $status

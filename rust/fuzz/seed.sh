#!/usr/bin/env bash
# Fills corpus/<target>/ with seeds from tests/golden (packets written by the reference implementations)
# and tests/hostile (malformed packets). Run from anywhere; then, from the repository root:
#   cargo +nightly fuzz run -O --fuzz-dir rust/fuzz <target> -- -max_total_time=300
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
targets=(fuzz_packet fuzz_bundle fuzz_sparse fuzz_quantized fuzz_frame)
for t in "${targets[@]}"; do mkdir -p "$here/corpus/$t"; done

copy() {  # copy <file> <target>...: store under a name that keeps the version folder apart
    local f="$1"; shift
    local name
    name="$(basename "$(dirname "$f")")-$(basename "$f")"
    for t in "$@"; do cp "$f" "$here/corpus/$t/$name"; done
}

shopt -s nullglob
for f in "$root"/tests/golden/*/*.tenso; do
    case "$(basename "$f")" in
        bundle_*|ragged_*) copy "$f" fuzz_packet fuzz_frame fuzz_bundle ;;
        sparse_*)          copy "$f" fuzz_packet fuzz_frame fuzz_sparse ;;
        quant_*)           copy "$f" fuzz_packet fuzz_frame fuzz_quantized ;;
        large_*)           ;;  # 1 MB seeds slow the fuzzer down for nothing
        *)                 copy "$f" fuzz_packet fuzz_frame ;;
    esac
done
if [ -d "$root/tests/hostile" ]; then
    while IFS= read -r -d '' f; do
        copy "$f" "${targets[@]}"
    done < <(find "$root/tests/hostile" -type f ! -path '*/__pycache__/*' ! -name '*.json' ! -name '*.md' ! -name '*.py' -print0)
fi
for t in "${targets[@]}"; do
    echo "$t: $(find "$here/corpus/$t" -type f | wc -l) seeds"
done

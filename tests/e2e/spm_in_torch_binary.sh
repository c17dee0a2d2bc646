#!/usr/bin/env bash
# SentencePiece inside the real (torch-linked) `archipelago` binary.
#
# Guards the start-up crash where Debian's libsentencepiece (which exports a
# bundled protobuf-lite) and libtorch's libprotobuf.so.32 shared one global
# symbol scope: the binary must start, train an spm tokenizer, re-run
# byte-identically and inspect the result. See docs/data.md ("Why
# SentencePiece sits behind a dlopen()ed shim").
#
# Usage: spm_in_torch_binary.sh BINARY [SOURCE_DIR]
set -euo pipefail

bin=${1:?usage: $0 BINARY [SOURCE_DIR]}
work=$(mktemp -d "${TMPDIR:-/tmp}/archipelago-e2e-spm.XXXXXX")
trap 'rm -rf "$work"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }

"$bin" --help > "$work/help.txt" || fail "'$bin --help' exited with $?"

# A small deterministic corpus: ~180 KiB of pseudo-words (ASCII and UTF-8)
# and numbers, enough distinct pieces for a 400-token vocabulary.
mkdir -p "$work/corpus"
awk -v dir="$work/corpus" 'BEGIN {
  srand(7)
  n = split("ka to ri mo na shi lu ve dra qu pel zor mi an el or ith ung é ö 日 本 語", syl, " ")
  for (w = 0; w < 3000; ++w) {
    s = ""; k = 1 + int(rand() * 4)
    for (j = 0; j < k; ++j) s = s syl[1 + int(rand() * n)]
    words[w] = s
  }
  for (f = 0; f < 3; ++f) {
    out = dir "/doc" f ".txt"
    for (p = 0; p < 150; ++p) {
      for (l = 0; l < 6; ++l) {
        line = ""; k = 3 + int(rand() * 13)
        for (j = 0; j < k; ++j) line = line words[int(rand() * 3000)] " "
        print line int(rand() * 100000) > out
      }
      print "" > out
    }
    close(out)
  }
}'

for run in a b; do
  "$bin" data prepare --input "$work/corpus" --out "$work/prep_$run" --tokenizer spm --vocab 400 --quiet \
    > "$work/prepare_$run.txt" 2>&1 || { cat "$work/prepare_$run.txt" >&2; fail "data prepare --tokenizer spm (run $run)"; }
done
diff -r "$work/prep_a" "$work/prep_b" > /dev/null || fail "two spm prepare runs differ (must be byte-identical)"
[[ -s "$work/prep_a/tokenizer.model" ]] || fail "no tokenizer.model written"

"$bin" data inspect "$work/prep_a" > "$work/inspect.txt" 2>&1 || { cat "$work/inspect.txt" >&2; fail "data inspect"; }
grep -q "tokenizer  *spm .*vocab 400" "$work/inspect.txt" || { cat "$work/inspect.txt" >&2; fail "inspect does not report the spm tokenizer with vocab 400"; }
grep -q "checksums verified" "$work/inspect.txt" || { cat "$work/inspect.txt" >&2; fail "inspect did not verify checksums"; }

echo "PASS: spm prepare + inspect in $(basename "$bin")"

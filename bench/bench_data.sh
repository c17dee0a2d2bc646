# Sourced by the shell benches: bench_data BIN TMP prints the prepared
# dataset to use: $ARCHIPELAGO_BENCH_DATA, or a small generated corpus
# prepared with BIN under TMP.
bench_data() {
  local bin="$1" tmp="$2" data="${ARCHIPELAGO_BENCH_DATA:-}"
  if [ -z "$data" ]; then
    mkdir -p "$tmp/corpus"
    for d in $(seq 0 79); do
      for l in $(seq 0 59); do echo "Document $d line $l: the union is strong and the people are free, patient and hopeful."; done > "$tmp/corpus/doc$d.txt"
    done
    "$bin" data prepare --input "$tmp/corpus" --out "$tmp/data" --tokenizer byte >/dev/null 2>&1
    data="$tmp/data"
  fi
  realpath "$data"
}

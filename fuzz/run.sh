#!/usr/bin/env bash
# Coverage-guided fuzzing of the C++ readers with libFuzzer + AddressSanitizer + UBSan (Debian's clang):
# the GGUF reader, the safetensors reader, its JSON parser, and the model build (plus two forward
# passes) from a parsed GGUF file. Not part of CI: run it by hand, a few minutes per target.
#
#   bash fuzz/run.sh [RUNS]     # RUNS executions per target (default 1000000)
#
# Needs clang and libclang-rt-14-dev (apt-get install clang libclang-rt-14-dev) and the tokenmill
# package importable (for the seed models). Crashes land in fuzz/out/crashes/; every one found so
# far has become a test in tests/ (see the README's section on what you can rely on).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1000000}
OUT=fuzz/out
mkdir -p "$OUT/obj" "$OUT/crashes" "$OUT/corpus"
command -v clang++ > /dev/null || { echo "fuzz: clang++ is missing (apt-get install clang libclang-rt-14-dev)" >&2; exit 1; }

FLAGS="-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -Icpp"
objs=()
# the core's sources, as CMakeLists.txt lists them
for src in $(sed -n '/^set(TOKENMILL_CORE_SOURCES/,/^)/p' CMakeLists.txt | grep -o 'cpp/[a-z_/0-9]*\.cpp'); do
  obj="$OUT/obj/$(echo "$src" | tr / _).o"
  extra=""
  case "$src" in
    *kernels_avx2.cpp) extra="-mavx2 -mfma -mf16c" ;;
    *kernels_avx512.cpp) extra="-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni" ;;
  esac
  if [[ ! -f "$obj" || "$src" -nt "$obj" ]]; then
    clang++ $FLAGS $extra -c "$src" -o "$obj"
  fi
  objs+=("$obj")
done

targets=(gguf safetensors json model)
for t in "${targets[@]}"; do
  clang++ $FLAGS -fsanitize=fuzzer "fuzz/fuzz_$t.cpp" "${objs[@]}" -lpthread -o "$OUT/fuzz_$t"
done

python3 fuzz/make_seeds.py "$OUT/seeds"

echo "| target | executions | seconds | crashes |"
echo "|---|---:|---:|---:|"
for t in "${targets[@]}"; do
  mkdir -p "$OUT/corpus/$t"
  seeds="$OUT/seeds/$t"
  log="$OUT/$t.log"
  start=$(date +%s)
  "$OUT/fuzz_$t" -runs="$RUNS" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
      -artifact_prefix="$OUT/crashes/$t-" "$OUT/corpus/$t" "$seeds" > "$log" 2>&1 || true
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  crashes=$(ls "$OUT/crashes" | grep -c "^$t-" || true)
  echo "| $t | $execs | $(( $(date +%s) - start )) | $crashes |"
done

#!/usr/bin/env bash
# Flame graph of one append path, client and server together: runs
# `proclog-bench --profile PATH` against a throwaway Postgres (or DATABASE_URL) while
# `perf record` samples every CPU, then folds the stacks with inferno.
#
#   tools/flamegraph.sh pod 16            # -> docs/flamegraphs/pod-x16.svg
#   tools/flamegraph.sh group 64 30       # 30 s of group commit with 64 appenders
#
# Needs perf (Debian's linux-perf) and inferno (`cargo install inferno`). The bench is
# built with frame pointers and line tables (profile `profiling`) in target/fp, so that
# stacks are whole. The root frame of every stack is the program: `postgres` (the server's
# backends), or the bench's threads (`tokio-runtime-w`: the client, proclog itself).
set -euo pipefail
cd "$(dirname "$0")/.."
path="${1:?usage: tools/flamegraph.sh pod|group|single|batch|raw [concurrency] [seconds]}"
concurrency="${2:-64}"
seconds="${3:-20}"
out="docs/flamegraphs/${path}-x${concurrency}.svg"

RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=target/fp \
    cargo build --profile profiling --bin proclog-bench
# The samples and folded stacks stay here, for reading beside the picture.
work="target/flamegraphs/${path}-x${concurrency}"
rm -rf "$work" && mkdir -p "$work"

target/fp/profiling/proclog-bench --profile "$path" --concurrency "$concurrency" \
    --seconds "$((seconds + 3))" > "$work/rate.txt" &
bench=$!
# Past the start of Postgres, the registrations and the warm-up.
sleep 4
perf record -F 499 -a -g -o "$work/perf.data" -- sleep "$seconds" 2> "$work/perf.log"
wait "$bench"
perf script -i "$work/perf.data" 2> /dev/null \
    | inferno-collapse-perf --all > "$work/folded.txt"
# The idle loop of the kernel is not work: leave it out.
grep -v '^swapper' "$work/folded.txt" > "$work/busy.txt" || true
inferno-flamegraph --title "proclog ${path}, ${concurrency} appenders: $(cat "$work/rate.txt")" \
    --subtitle "perf record -a -F 499 for ${seconds} s, client and Postgres on one 2-core machine" \
    < "$work/busy.txt" > "$out"
# Where the samples went, by program.
awk '{ n = $NF; split($1, f, ";"); by[f[1]] += n; all += n }
     END { for (p in by) printf "%6.1f%%  %s\n", 100 * by[p] / all, p }' "$work/busy.txt" \
    | sort -rn | head -8
echo "wrote $out"

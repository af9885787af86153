#!/bin/bash
# What sonde's syscall hooks cost processes it does NOT trace: getppid (hooked by neither design)
# and 1-byte read+write pairs (data syscalls, hooked by both), with no agent, the paired
# enter/exit tracepoints (--paired-syscalls) and the exit hook (default), 3 interleaved rounds.
# FLOOR=--floor measures the same with programs that only return. Needs root, perf
# (apt-get install linux-perf) and a release build (target/release/sonde).
# Results and discussion: BENCHMARKS.md, "Data syscalls captured at their exit".
set -euo pipefail
S=${SONDE_BIN:-$(dirname "$0")/../../target/release/sonde}
sleep 10000 &
IDLE=$!
trap 'kill $IDLE' EXIT
one() {
  local g t0 t1
  g=$(perf bench syscall basic -l 5000000 2>&1 | awk '/usecs\/op/{print $1}')
  t0=$(date +%s.%N)
  dd if=/dev/zero of=/dev/null bs=1 count=2000000 2>/dev/null
  t1=$(date +%s.%N)
  printf "%-6s getppid %.3f us/op, dd bs=1 (read+write) %.3f us/byte\n" "$1" "$g" "$(echo "($t1-$t0)/2" | bc -l)"
}
for round in 1 2 3; do
  one off
  for mode in paired exit; do
    extra=()
    [ "$mode" = paired ] && extra=(--paired-syscalls)
    "$S" run --pid "$IDLE" --print none "${extra[@]}" ${FLOOR:-} 2>/dev/null &
    agent=$!
    sleep 3
    one "$mode"
    kill -INT $agent
    wait $agent
  done
done

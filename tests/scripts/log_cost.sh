#!/bin/bash
# sonde CPU and the service's throughput, tracing log_app.py with and without --capture-logs.
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
set -e
D=$(mktemp -d); PORT=18555
python3 $ROOT/tests/fixtures/log_app.py $PORT $D > $D/out.txt 2> $D/err.txt &
APP=$!; sleep 1
for round in 1 2; do
for mode in off on; do
  ARGS="--open-ports $PORT --print none"
  CFG=$D/cfg.yaml; echo "logs: {files: [\"$D/*.log\"]}" > $CFG
  [ $mode = on ] && ARGS="$ARGS --capture-logs"
  $ROOT/target/release/sonde run --config $CFG $ARGS > $D/s.out 2> $D/s.err &
  S=$!; sleep 3
  T0=$(awk '{print $14+$15}' /proc/$S/stat)
  R=$(wrk -t1 -c8 -d10s http://127.0.0.1:$PORT/ok/1 | awk '/Requests\/sec/ {print $2}')
  T1=$(awk '{print $14+$15}' /proc/$S/stat)
  kill -INT $S; wait $S || true
  N=$(echo "$R*10" | bc)
  echo "round $round logs=$mode req/s=$R sonde_cpu_s=$(echo "($T1-$T0)/100" | bc -l | cut -c1-5) us_per_req=$(echo "($T1-$T0)*10000/$N" | bc -l | cut -c1-6) $(grep -o 'logs_captured=[0-9]*' $D/s.err) $(grep -o 'logs_dropped_kernel=[0-9]*' $D/s.err)"
done
done
kill $APP; rm -rf $D

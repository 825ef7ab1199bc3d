#!/usr/bin/env bash
# Steady training rate of `dare train` for a fixed wall time: last tqdm line (steps done, elapsed) of old vs new code.
# usage: OLD_DARE=... OLD_DATA=... NEW_DATA=... rate.sh OUTDIR SECONDS REPS -- train args...
set -u
OUT=$1; SECS=$2; REPS=$3; shift 4
mkdir -p $OUT
for i in $(seq 1 $REPS); do
  for who in old new; do
    if [ $who = old ]; then BIN=${OLD_DARE:?the previous code's dare}; DATA=$OLD_DATA; else BIN=${NEW_DARE:-dare}; DATA=$NEW_DATA; fi
    load=$(cut -d' ' -f1 /proc/loadavg)
    /usr/bin/time -f "%e s wall, %M KB maxrss" timeout $SECS $BIN train --data $DATA --out $OUT/$who-$i "$@" > $OUT/$who-$i.log 2>&1
    last=$(tr '\r' '\n' < $OUT/$who-$i.log | grep -E "^train .*[0-9]+/[0-9]+ \[" | tail -1)
    echo "$who $i load=$load | $last | $(tail -1 $OUT/$who-$i.log)"
  done
done

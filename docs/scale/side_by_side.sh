#!/usr/bin/env bash
# The previous code ($OLD_DARE on $OLD_DATA, [S, L] layout) vs this one ($NEW_DARE on $NEW_DATA) `dare train`, alternating.
# usage: REPS=N OLD_DARE=... OLD_DATA=... NEW_DATA=... side_by_side.sh OUTDIR train-args...
set -u
OUT=$1; shift
ARGS="$@"
for i in $(seq 1 ${REPS:-2}); do
  for who in old new; do
    if [ $who = old ]; then BIN=${OLD_DARE:?the previous code's dare}; DATA=$OLD_DATA; else BIN=${NEW_DARE:-dare}; DATA=$NEW_DATA; fi
    rm -rf $OUT/$who-$i
    load=$(cut -d' ' -f1 /proc/loadavg)
    /usr/bin/time -f "%e s wall, %M KB maxrss" $BIN train --data $DATA --out $OUT/$who-$i $ARGS --quiet > $OUT/$who-$i.log 2>&1
    echo "$who run $i load_before=$load $(tail -2 $OUT/$who-$i.log | tr '\n' ' ')"
  done
done

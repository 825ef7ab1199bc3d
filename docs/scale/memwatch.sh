#!/usr/bin/env bash
# Run a command and sample its memory every 0.5 s from /proc/PID/status: seconds since start, VmHWM (peak RSS),
# RssAnon (its own memory), RssFile (file pages mapped into it: the memory-mapped folder, libraries), in kB.
# Prints the maxima when the command ends; the samples stay in LOGFILE.
# usage: memwatch.sh LOGFILE command args...
out=$1; shift
: > "$out"
"$@" &
pid=$!
start=$(date +%s.%N)
while kill -0 $pid 2>/dev/null; do
  awk -v t="$(echo "$(date +%s.%N) - $start" | bc)" '/^(VmHWM|RssAnon|RssFile):/{v[$1]=$2} END{if (length(v)) printf "%.1f %s %s %s\n", t, v["VmHWM:"], v["RssAnon:"], v["RssFile:"]}' /proc/$pid/status >> "$out" 2>/dev/null
  sleep 0.5
done
wait $pid; rc=$?
awk '{h=($2>h)?$2:h; if ($3+$4>s) {s=$3+$4; a=$3; f=$4}; ma=($3>ma)?$3:ma; mf=($4>mf)?$4:mf}
     END{printf "peak RSS (VmHWM) %d kB; at the largest sample RssAnon %d + RssFile %d kB; max RssAnon %d kB, max RssFile %d kB\n", h, a, f, ma, mf}' "$out"
exit $rc

#!/usr/bin/env bash
# Sample VmHWM, RssAnon, RssFile of the newest process matching $1 every 0.5 s until it exits; print the maxima.
# usage: memwatch.sh PATTERN LOGFILE   (start it right after the command it watches)
pat=$1; out=$2; : > $out
sleep 2; P=$(pgrep -n -f "$pat")
while kill -0 $P 2>/dev/null; do
  awk '/RssAnon|RssFile|VmHWM/{printf "%s %s ", $1, $2} END{print ""}' /proc/$P/status >> $out 2>/dev/null; sleep 0.5
done
awk '{h=($2>h)?$2:h; a=($4>a)?$4:a; f=($6>f)?$6:f} END{print "VmHWM", h, "kB; max RssAnon", a, "kB; max RssFile", f, "kB"}' $out

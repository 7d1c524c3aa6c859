#!/bin/bash
# relayd CPU per request under saturating load, for quick A/B of two checkouts.
#
#   bench/cpu_per_request.sh CODE_DIR stored|accepted [LUA_SCRIPT] [DURATION]
#
# Starts redis-server and one relayd (code from CODE_DIR, this checkout's .venv) on core 0,
# warms up 2 s, then runs wrk -t1 -c50 for DURATION s (default 8) on core 1 with
# bench/LUA_SCRIPT (default post.lua; ndjson.lua for 1000-line batches) and prints req/s and
# relayd's CPU (utime + stime from /proc) per request over the measured run, and its user share.  Interleave two
# checkouts (git worktree add --detach ../base <commit>) round by round: the box drifts.
set -e
CODE=$(cd "$1" && pwd); ACK=$2; SCRIPT=${3:-post.lua}; DUR=${4:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=$(mktemp -d /tmp/relayd-cpu-XXXXXX); mkdir -p "$D/spool"
fp() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
RP=$(fp); P=$(fp); A=$(fp)
taskset -c 0 redis-server --port "$RP" --save '' --appendonly no --daemonize yes --logfile "$D/redis.log"
cat > "$D/relayd.conf" <<EOT
[server]
listen = "tcp:$P:interface=127.0.0.1"
admin = "tcp:$A:interface=127.0.0.1"
workers = 1
[redis]
url = "redis://127.0.0.1:$RP/0"
[spool]
dir = "$D/spool"
[[route]]
path = "/leads"
list = "leads"
ack = "$ACK"
EOT
cd "$D"
PYTHONPATH=$CODE taskset -c 0 "$ROOT/.venv/bin/twistd" -n --pidfile= relayd --config "$D/relayd.conf" > "$D/relayd.log" 2>&1 &
TP=$!
trap 'kill -TERM $TP 2>/dev/null; wait $TP 2>/dev/null; redis-cli -p $RP shutdown nosave >/dev/null 2>&1; rm -rf "$D"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$A/readyz" && break; sleep 0.1; done
taskset -c 1 wrk -t1 -c50 -d2s -s "$ROOT/bench/$SCRIPT" "http://127.0.0.1:$P/leads" > /dev/null
C0=$(awk '{print $14+$15}' /proc/$TP/stat); U0=$(awk '{print $14}' /proc/$TP/stat)
taskset -c 1 wrk -t1 -c50 -d"${DUR}s" -s "$ROOT/bench/$SCRIPT" "http://127.0.0.1:$P/leads" > "$D/wrk.txt"
C1=$(awk '{print $14+$15}' /proc/$TP/stat); U1=$(awk '{print $14}' /proc/$TP/stat)
RS=$(awk '/Requests\/sec/ {print $2}' "$D/wrk.txt")
python3 -c "import os; t=os.sysconf('SC_CLK_TCK'); print(f'$ACK $SCRIPT: {float($RS):,.0f} req/s, relayd CPU {($C1-$C0)/t/(float($RS)*$DUR)*1e6:.1f} us per request ({($U1-$U0)/max(1,$C1-$C0):.0%} of it user time)')"

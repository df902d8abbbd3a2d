#!/usr/bin/env bash
# Load the running local server with wrk; compare with the origin directly and with
# nginx proxy_pass. Needs: wrk, nginx (Debian packages), curl, python3.
#   bash bench/run.sh            # results to stdout; see docs/performance.md
# Options (environment): DUR=10s per run; CONNS="32 64"; ONLY="authorize proxy direct nginx"
# (add "bare" for a baseline: local/examples/bare_forwarder.rs, PayFence's HTTP shape with nothing else);
# PROFILE=release (PROFILE=profiling keeps symbols for perf); UPLOAD=1 (the 1 GiB RSS check);
# BIN=path/to/payfence-local (a binary built elsewhere, e.g. to compare two commits; build the
# other commit in a git worktree with its own CARGO_TARGET_DIR: cargo fingerprints workspace
# members by paths relative to the workspace, so in a shared target dir the next build here
# can take the other commit's artifacts as fresh);
# PAUSED=1 adds runs at a fixed, moderate load: PAUSED_CONNS=64 connections, each pausing
# 0 to 2 x PAUSE_MS=10 ms (uniformly) between requests, so arrivals are spread rather than
# in waves (latency added by the proxy without saturating the machine).
# ROUNDS=3: each set of runs (authorize, proxy, direct, nginx) is repeated, interleaved, and
# the targets are judged on the median over rounds of each round's figures (one run on a
# shared VM is good to about +-20 %); every round's rows are printed too.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/payfence-target}"
DUR="${DUR:-10s}"
PROFILE="${PROFILE:-release}"
CONNS="${CONNS:-32 64}"
ONLY="${ONLY:-authorize proxy direct nginx}"
UPLOAD="${UPLOAD:-1}"
ROUNDS="${ROUNDS:-3}"
PAUSED="${PAUSED:-1}"; PAUSED_CONNS="${PAUSED_CONNS:-64}"; PAUSE_MS="${PAUSE_MS:-10}"
want() { [[ " $ONLY " == *" $1 "* ]]; }
if [ -z "${BIN:-}" ]; then
  cargo build --profile "$PROFILE" -q -p payfence-local
  BIN="$CARGO_TARGET_DIR/$PROFILE/payfence-local"
fi
if want bare; then
  cargo build --profile "$PROFILE" -q -p payfence-local --example bare_forwarder
fi
WORK=$(mktemp -d)
PF=127.0.0.1:18787; ORIGIN=127.0.0.1:18081; NGINX_PROXY=127.0.0.1:18082; BARE=127.0.0.1:18083
PF_PID= BARE_PID=
cleanup() { kill "$PF_PID" $BARE_PID 2>/dev/null || true; nginx -p "$WORK" -c nginx.conf -s stop 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# The origin (nginx answering "ok"), and nginx proxy_pass to it for comparison.
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_max_body_size 0;
  client_body_temp_path $WORK;
  proxy_temp_path $WORK;
  upstream origin { server $ORIGIN; keepalive 256; }
  server { listen $ORIGIN; location / { return 200 "ok\n"; } }
  server { listen $NGINX_PROXY; location / {
      proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
NGINX
nginx -p "$WORK" -c nginx.conf

"$BIN" --listen $PF --data-dir "$WORK/data" --allow-http-origins >"$WORK/pf.out" 2>/dev/null &
PF_PID=$!
if want bare; then
  "$CARGO_TARGET_DIR/$PROFILE/examples/bare_forwarder" $BARE "http://$ORIGIN" >/dev/null &
  BARE_PID=$!
fi
echo "payfence-local pid $PF_PID" >&2
for _ in $(seq 100); do grep -q "PayFence listening" "$WORK/pf.out" 2>/dev/null && break; sleep 0.1; done

JWT=$("$BIN" dev-token --data-dir "$WORK/data" --sub bench --role site_owner)
api() { curl -sf "http://$PF$1" -H "Authorization: Bearer $JWT" -H 'Content-Type: application/json' -d "$2"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
SITE=$(api /api/sites "{\"name\":\"bench\",\"origin_url\":\"http://$ORIGIN\",\"site_requests_per_second\":100000}" | field site_id)
PLAN=$(api /api/sites/$SITE/plans '{"name":"bench","requests_per_minute":10000,"monthly_quota":1000000000}' | field plan_id)
KEY=$(curl -sf -X POST "http://$PF/api/sites/$SITE/api-keys" -H "Authorization: Bearer $JWT" | field key)
# 300 tokens so the 10,000/min per-token limit never binds: every request is a full allow.
for _ in $(seq 300); do api /api/sites/$SITE/tokens "{\"plan_id\":\"$PLAN\"}" | field token; done > "$WORK/tokens.txt"

cat > "$WORK/tokens.lua" <<LUA
local tokens = {}
for line in io.lines("$WORK/tokens.txt") do tokens[#tokens + 1] = line end
math.randomseed(os.time())
local mode = os.getenv("MODE")
request = function()
  local t = tokens[math.random(#tokens)]
  if mode == "authorize" then
    return wrk.format("POST", "/v1/authorize",
      {["Authorization"] = "Bearer $KEY", ["Content-Type"] = "application/json"},
      '{"token":"' .. t .. '","method":"GET","path":"/v1/flights"}')
  end
  -- The origin and nginx get the same request, minus the proxy's path prefix.
  local prefix = mode == "proxy" and "/p/$SITE" or ""
  return wrk.format("GET", prefix .. "/v1/flights?from=OSL", {["Authorization"] = "Bearer " .. t})
end
if os.getenv("PAUSE") then dofile("$WORK/pause.lua") end
LUA
echo "delay = function() return math.random(0, 2 * $PAUSE_MS) end" > "$WORK/pause.lua"

# CPU time (user + system) of a process (payfence-local unless named), in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/${1:-$PF_PID}/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
# Every target gets its requests from the same script (a random token each), so that
# wrk's own work per request, which shares the two cores, is the same in every run.
run() { # key name url conns
  local key=$1; shift
  local out t0 cpu=- pid=$PF_PID
  if [ "$key" = bare ]; then pid=$BARE_PID; fi
  t0=$(ticks "$pid")
  out=$(MODE=$key wrk -t2 -c"$3" -d"$DUR" --latency -s "$WORK/tokens.lua" "$2")
  local rps p50 p99 non2xx
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  # PayFence's own CPU per request (the bare forwarder's, on its row): steadier than
  # req/s on a shared, noisy machine.
  if [ "$key" = authorize ] || [ "$key" = proxy ] || [ "$key" = bare ]; then
    cpu=$(echo "$out" | awk -v t="$(( $(ticks "$pid") - t0 ))" -v us="$TICK_US" '/^ +[0-9]+ requests in/ {printf "%.1f", t * us / $1}')
  fi
  printf '| %-22s | %3s | %10s | %8s | %8s | %s | %s |\n' "${PAUSE:+paused }$1" "$3" "$rps" "$p50" "$p99" "${non2xx:-0}" "$cpu"
  echo "${PAUSE:+paused-}$key $3 $ROUND $rps $(ms "$p50") $(ms "$p99") ${non2xx:-0} $cpu" >> "$WORK/rows"
}
ms() { echo "$1" | awk '/us$/ {print $1 / 1000; next} /ms$/ {print $1 + 0; next} /s$/ {print $1 * 1000}'; }
runs() { # conns
  if want authorize; then run authorize "authorize (middleware)" "http://$PF" "$1"; fi
  if want proxy; then run proxy "proxy (PayFence)" "http://$PF" "$1"; fi
  if want direct; then run direct "origin directly" "http://$ORIGIN" "$1"; fi
  if want nginx; then run nginx "nginx proxy_pass" "http://$NGINX_PROXY" "$1"; fi
  if want bare; then run bare "bare hyper forwarder" "http://$BARE" "$1"; fi
}
for ROUND in $(seq "$ROUNDS"); do
  echo "Round $ROUND of $ROUNDS (\"paused\": at the fixed load)"
  echo
  echo "| target | conns | req/s | p50 | p99 | non-2xx | PayFence CPU µs/req |"
  echo "|---|---|---|---|---|---|---|"
  for c in $CONNS; do runs "$c"; done
  if [ "$PAUSED" = 1 ]; then PAUSE=1 runs "$PAUSED_CONNS"; fi
  echo
done

# Medians over rounds, and the targets judged on them. A ratio or difference is taken
# within each round (runs minutes apart see the same machine) and its median reported.
# median of a list of space-separated numbers
MEDIAN='function median(list,   a, n, i, j, t) {
  n = split(list, a, " ")
  for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
  return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}'
echo "Medians of $ROUNDS rounds:"
echo
echo "| target | conns | req/s | p50 ms | p99 ms | non-2xx | PayFence CPU µs/req |"
echo "|---|---|---|---|---|---|---|"
awk "$MEDIAN"'
  { k = $1 " " $2; if (!(k in seen)) { seen[k] = 1; order[++n] = k }
    rps[k] = rps[k] " " $4; p50[k] = p50[k] " " $5; p99[k] = p99[k] " " $6; bad[k] += $7
    if ($8 != "-") cpu[k] = cpu[k] " " $8 }
  END { for (i = 1; i <= n; i++) { k = order[i]; split(k, f, " ")
      printf "| %-16s | %3s | %8.0f | %6.2f | %6.2f | %s | %s |\n", f[1], f[2], median(rps[k]), median(p50[k]), median(p99[k]), bad[k], (k in cpu) ? sprintf("%.1f", median(cpu[k])) : "-" } }
' "$WORK/rows"
echo
echo "| target | conns | median over rounds | rounds met | verdict |"
echo "|---|---|---|---|---|"
awk -v rounds="$ROUNDS" -v conns_list="$CONNS" "$MEDIAN"'
  function verdict(ok) { return ok ? "met" : "NOT met" }
  { k = $1 " " $2 " " $3; rps[k] = $4; p99[k] = $6 }
  END {
    nc = split(conns_list, cl, " ")
    for (ci = 1; ci <= nc; ci++) {
      c = cl[ci]; a = ""; ar = ""; r = ""; d = ""; b = ""; am = 0; rm = 0; dm = 0; bm = 0
      for (i = 1; i <= rounds; i++) {
        if (("authorize " c " " i) in rps) { x = rps["authorize " c " " i]; y = p99["authorize " c " " i]
          a = a " " y; am += (x >= 20000 && y <= 5); ar = ar " " x }
        if (("proxy " c " " i) in rps && ("nginx " c " " i) in rps) {
          x = rps["proxy " c " " i] / rps["nginx " c " " i]; r = r " " x; rm += (x >= 0.5) }
        if (("proxy " c " " i) in rps && ("direct " c " " i) in rps) {
          x = p99["proxy " c " " i] - p99["direct " c " " i]; d = d " " x; dm += (x <= 1) }
        if (("bare " c " " i) in rps && ("direct " c " " i) in rps) {
          x = p99["bare " c " " i] - p99["direct " c " " i]; b = b " " x; bm += (x <= 1) }
      }
      if (a != "") printf "| authorize >= 20,000 req/s, p99 <= 5 ms | %s | %.0f req/s, p99 %.2f ms | %d of %d | %s |\n", c, median(ar), median(a), am, rounds, verdict(median(ar) >= 20000 && median(a) <= 5)
      if (r != "") printf "| proxy >= 0.5x nginx req/s | %s | %.2fx | %d of %d | %s |\n", c, median(r), rm, rounds, verdict(median(r) >= 0.5)
      if (d != "") printf "| proxy adds <= 1 ms p99 over direct | %s | %+.2f ms | %d of %d | %s |\n", c, median(d), dm, rounds, verdict(median(d) <= 1)
      if (b != "") printf "| (baseline) bare hyper forwarder adds <= 1 ms p99 over direct | %s | %+.2f ms | %d of %d | %s |\n", c, median(b), bm, rounds, verdict(median(b) <= 1)
    }
  }
' <(grep -v '^paused-' "$WORK/rows")
if [ "$PAUSED" = 1 ]; then
  awk -v rounds="$ROUNDS" '$1 == "paused-proxy" {p[$3] = $6} $1 == "paused-direct" {d[$3] = $6}
    END { for (i = 1; i <= rounds; i++) if ((i in p) && (i in d)) l = l sprintf(" %+.2f", p[i] - d[i])
      if (l != "") print "\nAt the fixed load, p99 added by the proxy in each round (ms):" l }' "$WORK/rows"
fi
[ "$UPLOAD" = 1 ] || exit 0

# RSS while streaming a 1 GiB upload through the proxy.
TOKEN=$(head -1 "$WORK/tokens.txt")
rss() { awk '/VmRSS/ {print $2}' /proc/$PF_PID/status; }
echo
echo "RSS before upload: $(rss) kB"
( head -c 1073741824 /dev/zero | curl -s -o /dev/null -w 'upload: HTTP %{http_code}, %{size_upload} bytes in %{time_total} s\n' \
    -X PUT -T - "http://$PF/p/$SITE/upload" -H "Authorization: Bearer $TOKEN" ) &
UP=$!
max=0
while kill -0 $UP 2>/dev/null; do r=$(rss); [ "$r" -gt "$max" ] && max=$r; sleep 0.2; done
wait $UP
echo "RSS peak during upload: $max kB; after: $(rss) kB"

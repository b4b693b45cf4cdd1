#!/bin/sh
# make compare: the same charge (check the balance, debit, append a record,
# durable before the answer) against walletd, Redis and PostgreSQL, in one
# run on this machine, at the same client counts.  Installs redis-server and
# postgresql from Debian if they are missing (as root).  Cleans up after itself.
#   Redis 7: AOF with appendfsync always; a Lua script (EVALSHA) that checks the
#            balance, DECRBYs it and RPUSHes a record; redis-benchmark over a Unix socket.
#   PostgreSQL 15: synchronous_commit=on; UPDATE ... WHERE balance >= 35 RETURNING
#            plus an INSERT into a log table, one transaction; pgbench -M prepared
#            over a Unix socket.
set -eu
top=$(cd "$(dirname "$0")/../.." && pwd)
ctl=$top/walletctl
py=/usr/bin/python3
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
need=""
command -v redis-server >/dev/null || need="$need redis-server"
[ -x /usr/lib/postgresql/15/bin/pgbench ] || need="$need postgresql postgresql-contrib"
if [ -n "$need" ]; then
  [ "$(id -u)" = 0 ] || { echo "compare needs:$need (run as root to install)"; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi
pgbin=/usr/lib/postgresql/15/bin
dir=$(mktemp -d /tmp/walletd-compare-XXXXXX)
chmod 755 "$dir"
pids=""
cleanup() {
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  [ -d "$dir/pg" ] && runuser -u postgres -- "$pgbin/pg_ctl" -D "$dir/pg" -m immediate stop >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
results=$dir/results.tsv

# --- walletd: the journal (the default), then durability = lmdb (LMDB's two syncs a commit)
$py "$top/contrib/bench/fsync_floor.py" "$dir" > "$dir/floor.json"
for durability in journal lmdb; do
  name=walletd; [ $durability = lmdb ] && name=walletd-lmdb
  printf 'durability = %s\n' $durability > "$dir/$durability.conf"
  "$top/walletd" -f -c "$dir/$durability.conf" -d "$dir/wd-$durability" -s "$dir/walletd.sock" >"$dir/walletd.log" 2>&1 &
  wpid=$!
  pids="$pids $wpid"
  export WALLETD_SOCKET="$dir/walletd.sock"
  i=0; until "$ctl" ping >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done
  for c in 1 16 64; do
    n=$((c * 2500)); [ $c = 1 ] && n=3000
    "$ctl" bench --json -c $c -n $n > "$dir/wd.json"
    printf '%s\t-c %s\t%s\n' $name $c "$($py -c 'import json,sys; print(json.load(open(sys.argv[1]))["charges_per_s"])' "$dir/wd.json")" >> "$results"
    [ $c = 1 ] && printf '%s\tp50 -c 1\t%s\n' $name "$($py -c 'import json,sys; print(json.load(open(sys.argv[1]))["latency_ms"]["p50"] * 1000)' "$dir/wd.json")" >> "$results"
  done
  "$ctl" bench --json -c 64 -P 16 -n 400000 > "$dir/wd.json"
  printf '%s\t-c 64 -P 16\t%s\n' $name "$($py -c 'import json,sys; print(json.load(open(sys.argv[1]))["charges_per_s"])' "$dir/wd.json")" >> "$results"
  "$ctl" bench --json -c 4 --batch 1000 -n 400 > "$dir/wd.json"
  printf '%s\t--batch 1000\t%s\n' $name "$($py -c 'import json,sys; print(json.load(open(sys.argv[1]))["charges_per_s"])' "$dir/wd.json")" >> "$results"
  kill $wpid; wait $wpid 2>/dev/null || true
done
# walletd replicated: three nodes on three nats-servers (R3), on this machine
$py "$top/contrib/bench/replicated.py" --json > "$dir/repl.json"
$py - "$dir/repl.json" >> "$results" <<'PYEOF'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    if r["label"].startswith("3 nodes, via the leader, "):
        print("walletd\t%s (3 nodes, R3)\t%s" % (r["label"].rsplit(", ", 1)[1], r["charges_per_s"]))
PYEOF

# --- Redis: AOF, fsync before every answer
mkdir -p "$dir/redis"
redis-server --port 0 --unixsocket "$dir/redis.sock" --unixsocketperm 700 --dir "$dir/redis" \
  --appendonly yes --appendfsync always --save "" --daemonize no >"$dir/redis.log" 2>&1 &
pids="$pids $!"
i=0; until redis-cli -s "$dir/redis.sock" ping >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done
lua='local b = tonumber(redis.call("GET", KEYS[1]) or "0")
if b < 35 then return redis.error_reply("insufficient_balance") end
local after = redis.call("DECRBY", KEYS[1], 35)
redis.call("RPUSH", KEYS[1] .. ":log", ARGV[1] .. ":" .. after)
return after'
sha=$(redis-cli -s "$dir/redis.sock" SCRIPT LOAD "$lua")
for w in $(seq 0 99); do redis-cli -s "$dir/redis.sock" SET "wallet:0000000000$(printf %02d $w)" 1000000000000 >/dev/null; done
for c in 1 16 64; do
  n=$((c * 2500)); [ $c = 1 ] && n=3000
  rps=$(redis-benchmark -s "$dir/redis.sock" -c $c -n $n -r 100 --csv EVALSHA "$sha" 1 "wallet:__rand_int__" "m" 2>/dev/null | tail -1 | cut -d, -f2 | tr -d '"')
  printf 'Redis\t-c %s\t%s\n' $c "$rps" >> "$results"
done
rps=$(redis-benchmark -s "$dir/redis.sock" -c 64 -P 16 -n 400000 -r 100 --csv EVALSHA "$sha" 1 "wallet:__rand_int__" "m" 2>/dev/null | tail -1 | cut -d, -f2 | tr -d '"')
printf 'Redis\t-c 64 -P 16\t%s\n' "$rps" >> "$results"

# --- PostgreSQL: synchronous_commit=on
mkdir -p "$dir/pg" "$dir/pgsock"
chown postgres "$dir/pg" "$dir/pgsock"
runuser -u postgres -- "$pgbin/initdb" -D "$dir/pg" -A trust -U postgres >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$dir/pg" -l "$dir/pg/server.log" -w \
  -o "-k $dir/pgsock -c listen_addresses='' -c synchronous_commit=on -c fsync=on -c max_connections=100 -c shared_buffers=256MB" start >/dev/null
psql="psql -h $dir/pgsock -U postgres -q -v ON_ERROR_STOP=1"
$psql -c "CREATE TABLE wallets (id int PRIMARY KEY, balance bigint NOT NULL);
          CREATE TABLE log (id bigserial PRIMARY KEY, wallet int NOT NULL, amount bigint NOT NULL, balance_after bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
          INSERT INTO wallets SELECT g, 1000000000000 FROM generate_series(0, 99) g;"
cat > "$dir/charge.sql" <<'SQL'
\set w random(0, 99)
BEGIN;
UPDATE wallets SET balance = balance - 35 WHERE id = :w AND balance >= 35 RETURNING balance;
INSERT INTO log (wallet, amount, balance_after) VALUES (:w, -35, 0);
COMMIT;
SQL
for c in 1 16 64; do
  tps=$(PGHOST=$dir/pgsock "$pgbin/pgbench" -U postgres -n -M prepared -c $c -j 2 -T "$SECONDS_PER_RUN" -f "$dir/charge.sql" postgres 2>/dev/null |
        sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
  printf 'PostgreSQL\t-c %s\t%s\n' $c "$tps" >> "$results"
done

$py - "$results" "$dir/floor.json" <<'PYEOF'
import json, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
floor = json.load(open(sys.argv[2]))
data = {}
for system, setting, value in rows:
    data.setdefault(setting, {})[system] = float(value) if value else 0.0
print("disk: a one-page fdatasync takes p50 %.0f us; walletd -c 1 p50: %.0f us with the journal (%.1fx), "
      "%.0f us with durability = lmdb" % (floor["p50_us"], data["p50 -c 1"]["walletd"],
      data["p50 -c 1"]["walletd"] / floor["p50_us"], data["p50 -c 1"]["walletd-lmdb"]))
print()
print("| charge workload | walletd charges/s | walletd, durability = lmdb | Redis 7 (AOF always + Lua) | PostgreSQL 15 (sync commit) | walletd / Redis | walletd / PostgreSQL |")
print("|---|---:|---:|---:|---:|---:|---:|")
for setting in ["-c 1", "-c 16", "-c 64", "-c 64 -P 16", "--batch 1000", "-c 64 (3 nodes, R3)",
                "-c 64 -P 16 (3 nodes, R3)"]:
    d = data.get(setting, {})
    w, l, r, p = d.get("walletd"), d.get("walletd-lmdb"), d.get("Redis"), d.get("PostgreSQL")
    f = lambda v: "%.0f" % v if v else "-"
    ratio = lambda a, b: "%.2fx" % (a / b) if a and b else "-"
    print("| %s | %s | %s | %s | %s | %s | %s |" % (setting, f(w), f(l), f(r), f(p), ratio(w, r), ratio(w, p)))
PYEOF

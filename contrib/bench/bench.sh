#!/bin/sh
# make bench: a fresh walletd on a temporary store, then one table of
# throughput and latency, then the replicated rows (contrib/bench/replicated.py).
# Run time: about three minutes.
set -eu
top=$(cd "$(dirname "$0")/../.." && pwd)
ctl=$top/walletctl
py=/usr/bin/python3
dir=$(mktemp -d /tmp/walletd-bench-XXXXXX)
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT INT TERM
"$top/walletd" -f -d "$dir/db" -s "$dir/walletd.sock" >"$dir/log" 2>&1 &
pid=$!
export WALLETD_SOCKET="$dir/walletd.sock"
i=0; until "$ctl" ping >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 100 ] || { cat "$dir/log"; exit 1; }; sleep 0.1; done

out=$dir/results.jsonl
$py "$top/contrib/bench/fsync_floor.py" "$dir" > "$dir/floor.json"
run() { label=$1; shift; printf '%s\t' "$label" >> "$out"; "$ctl" bench --json "$@" >> "$out"; }
run "charge -c 1"           -c 1 -n 3000
run "charge -c 16"          -c 16 -n 60000
run "charge -c 64"          -c 64 -n 150000
run "charge -c 64, spend controls set" -c 64 -n 150000 --controls
run "charge -c 64, fraud brake on" -c 64 -n 150000 --guard
run "charge -c 64, under a hold" -c 64 -n 150000 --hold
run "charge -c 64, random refs" -c 64 -n 100000 --random-refs
run "charge -c 64 -P 16"    -c 64 -P 16 -n 400000
run "charge -c 64 -P 16, spend controls set" -c 64 -P 16 -n 400000 --controls
run "charge -c 64 -P 16, fraud brake on" -c 64 -P 16 -n 400000 --guard
run "charge -c 64 -P 16, under a hold" -c 64 -P 16 -n 400000 --hold
run "charge --batch 1000"   -c 4 --batch 1000 -n 400
run "history page of 50"    -c 16 -n 50000 --method history --wallets 10
$py "$top/contrib/bench/rates_csv.py" loaded 100000 > "$dir/rates.csv"
"$ctl" rate import "$dir/rates.csv" > /dev/null
run "rate lookup, 100k prefixes" -c 16 -n 100000 --method lookup --wallets 10
run "precheck 100k recipients, one-prefix plan" -c 1 -n 20 --method precheck --recipients 100000 --wallets 1
$py "$top/contrib/bench/rates_csv.py" deck 5000 > "$dir/deck.csv"
t0=$(date +%s%N)
"$ctl" rate import --format mccmnc --plan deck "$dir/deck.csv" > /dev/null
t1=$(date +%s%N)

$py - "$out" "$dir/floor.json" <<'PYEOF'
import json, sys
rows = [l.split("\t", 1) for l in open(sys.argv[1])]
floor = json.load(open(sys.argv[2]))
print("disk fdatasync floor: p50 %.0f us, p99 %.0f us" % (floor["p50_us"], floor["p99_us"]))
print()
print("| workload | requests/s | charges/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | commits/s | mean batch | batch us | commit us | errors | self-check |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
for label, data in rows:
    r = json.loads(data)
    l = r["latency_ms"]
    print("| %s | %.0f | %.0f | %.3f | %.3f | %.3f | %.3f | %.3f | %.0f | %.1f | %.0f | %.0f | %s | %s |" % (
        label, r["requests_per_s"], r["charges_per_s"], l["p50"], l["p90"], l["p99"], l["p999"], l["max"],
        r["commits_per_s"], r["mean_batch"], r["mean_batch_us"], r["mean_commit_us"],
        sum(r["errors"].values()) or "0", "ok" if r["self_check"] else "FAILED"))
PYEOF
echo "rate import --format mccmnc of an operator's deck of 5,000 networks, one commit: $(( (t1 - t0) / 1000000 )) ms"

# The hash chain's cost: charge -c 64 on this walletd and on the release
# before the chain (built from the git history with the same flags), on
# fresh stores, five runs each, alternating, so that the box's noise falls on both.
kill $pid; wait $pid 2>/dev/null || true
before=688ed99
if git -C "$top" cat-file -e "$before:walletd.c" 2>/dev/null; then
  mkdir "$dir/src"
  for f in walletd.c protocol.h; do git -C "$top" show "$before:$f" > "$dir/src/$f"; done
  cc -std=c11 -O2 -g $(pkg-config --cflags msgpack lmdb libcurl jansson libcrypto libnats) -o "$dir/walletd-$before" \
    "$dir/src/walletd.c" $(pkg-config --libs msgpack lmdb libcurl jansson libcrypto libnats) -lpthread
  for i in 1 2 3 4 5; do
    for bin in "$top/walletd" "$dir/walletd-$before"; do
      rm -rf "$dir/db"
      "$bin" -f -d "$dir/db" -s "$dir/walletd.sock" >"$dir/log" 2>&1 &
      pid=$!
      j=0; until "$ctl" ping >/dev/null 2>&1; do j=$((j+1)); [ $j -lt 100 ] || { cat "$dir/log"; exit 1; }; sleep 0.1; done
      printf '%s\t' "$bin" >> "$dir/chain.tsv"
      "$ctl" bench --json -c 64 -n 150000 >> "$dir/chain.tsv"
      kill $pid; wait $pid 2>/dev/null || true
    done
  done
  $py - "$dir/chain.tsv" "$top/walletd" <<'PYEOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    binary, data = line.split("\t", 1)
    runs.setdefault(binary == sys.argv[2], []).append(json.loads(data)["charges_per_s"])
now, before = statistics.median(runs[True]), statistics.median(runs[False])
print("hash chain's cost, charge -c 64 (medians of 5 alternating runs): %.0f charges/s with it, %.0f in "
      "the release before it: %.1f %%" % (now, before, (before - now) / before * 100))
PYEOF
else
  echo "hash chain's cost: needs the git history ($before)"
fi

# The cost of credit lots and automatic top-up: charge -c 64 on wallets
# whose money is a lot and with automatic top-up set (never reached), and
# on plain ones, on fresh stores, five runs each, alternating.
printf 'paystack_secret_file = %s\npaystack_api_url = http://127.0.0.1:9\n' "$dir/paystack.secret" > "$dir/auto.conf"
echo sk_bench > "$dir/paystack.secret"
for i in 1 2 3 4 5; do
  for auto in "--auto-topup --lots" ""; do
    rm -rf "$dir/db"
    "$top/walletd" -f -c "$dir/auto.conf" -d "$dir/db" -s "$dir/walletd.sock" >"$dir/log" 2>&1 &
    pid=$!
    j=0; until "$ctl" ping >/dev/null 2>&1; do j=$((j+1)); [ $j -lt 100 ] || { cat "$dir/log"; exit 1; }; sleep 0.1; done
    printf '%s\t' "${auto:-none}" >> "$dir/auto.tsv"
    "$ctl" bench --json -c 64 -n 150000 $auto >> "$dir/auto.tsv"
    kill $pid; wait $pid 2>/dev/null || true
  done
done
$py - "$dir/auto.tsv" <<'PYEOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    kind, data = line.split("\t", 1)
    runs.setdefault(kind, []).append(json.loads(data)["charges_per_s"])
on, off = statistics.median(runs["--auto-topup --lots"]), statistics.median(runs["none"])
print("credit lots and automatic top-up, their cost, charge -c 64 (medians of 5 alternating runs): %.0f charges/s "
      "with both, %.0f without: %.1f %%" % (on, off, (off - on) / off * 100))
PYEOF

echo
echo "replicated (three walletd nodes, three nats-servers, R3), beside one node in the same run:"
$py "$top/contrib/bench/replicated.py"

#!/usr/bin/env bash
# vhu bench against qemu-storage-daemon (null-co, read-zeroes=on) and
# vhost-user-blk --null, alternately in one run: 4 KiB random reads at
# iodepth 1, 32 and 128, interrupt and --poll, REPS repetitions each.
# Prints per setting the median IOPS of each, the ratio ours/qsd, the
# back-end's CPU time per request (utime + stime from /proc), the ratio of
# IOPS per back-end core (qsd's CPU per request / ours) and the median p50
# latency. Each measurement holds /tmp/vhu-bench.lock.
#
#   REPS=5 RUNTIME=2 bash examples/bench/blk.sh
#
# Builds into $CARGO_TARGET_DIR (default target/).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${REPS:-5}
RUNTIME=${RUNTIME:-2}
cargo build --release -q -p vhu-examples --bins
tdir=${CARGO_TARGET_DIR:-target}
VHU=$tdir/release/vhu
OURS=$tdir/release/vhost-user-blk
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT

wait_sock() { for _ in $(seq 500); do [ -S "$1" ] && return; sleep 0.01; done; echo "no socket $1" >&2; exit 1; }

qemu-storage-daemon --blockdev driver=null-co,node-name=n0,size=1073741824,read-zeroes=on \
    --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$dir/qsd.sock",writable=on,num-queues=1 &
qsd=$!
"$OURS" --socket-path "$dir/ours.sock" --null --size 1G --log-level warn &
ours=$!
wait_sock "$dir/qsd.sock"; wait_sock "$dir/ours.sock"
sleep 0.2

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# One run: prints "iops cpu_us_per_request p50_us".
one() { # pid sock depth pollflag
    local t0 t1 out
    t0=$(ticks "$1")
    out=$("$VHU" bench --socket-path "$2" --rw randread --bs 4096 --iodepth "$3" --runtime "$RUNTIME" $4 --json)
    t1=$(ticks "$1")
    python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(r['iops'], (int(sys.argv[2])-int(sys.argv[3]))*1e6/int(sys.argv[4])/max(r['requests'],1), r['p50_ns']/1e3)" "$out" "$t1" "$t0" "$hz"
}

printf '%-9s %-7s %10s %10s %6s %10s %11s %9s %8s %9s\n' mode iodepth "qsd IOPS" "ours IOPS" ratio "qsd us/req" "ours us/req" "per-core" "qsd p50" "ours p50"
for mode in interrupt poll; do
    flag=""; [ $mode = poll ] && flag="--poll"
    for depth in 1 32 128; do
        q=(); o=(); qc=(); oc=(); ql=(); ol=()
        for _ in $(seq "$REPS"); do
            read -r a b c < <(flock /tmp/vhu-bench.lock bash -c "$(declare -f one ticks); VHU=$VHU RUNTIME=$RUNTIME hz=$hz one $qsd $dir/qsd.sock $depth '$flag'")
            q+=("$a"); qc+=("$b"); ql+=("$c")
            read -r a b c < <(flock /tmp/vhu-bench.lock bash -c "$(declare -f one ticks); VHU=$VHU RUNTIME=$RUNTIME hz=$hz one $ours $dir/ours.sock $depth '$flag'")
            o+=("$a"); oc+=("$b"); ol+=("$c")
        done
        python3 - "$mode" "$depth" "${q[*]}" "${o[*]}" "${qc[*]}" "${oc[*]}" "${ql[*]}" "${ol[*]}" <<'PY'
import statistics as s, sys
mode, depth = sys.argv[1], sys.argv[2]
q, o, qc, oc, ql, ol = ([float(x) for x in a.split()] for a in sys.argv[3:9])
mq, mo, mqc, moc = s.median(q), s.median(o), s.median(qc), s.median(oc)
per_core = mqc / moc if moc > 0 else float("inf")
print(f"{mode:<9} {depth:<7} {mq:10.0f} {mo:10.0f} {mo/mq:6.2f} {mqc:10.2f} {moc:11.2f} {per_core:9.2f} {s.median(ql):6.1f}us {s.median(ol):7.1f}us")
PY
    done
done

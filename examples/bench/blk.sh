#!/usr/bin/env bash
# vhu bench against qemu-storage-daemon (null-co, read-zeroes=on) and
# vhost-user-blk --null, alternately in one run: 4 KiB random reads at
# iodepth 1, 32 and 128, interrupt and --poll, REPS repetitions each.
# Prints per setting the median IOPS of each, the ratio ours/qsd and the
# back-end's CPU time per request (utime + stime from /proc).
#
#   REPS=5 RUNTIME=2 bash examples/bench/blk.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${REPS:-5}
RUNTIME=${RUNTIME:-2}
cargo build --release -q -p vhu-examples --bins
VHU=target/release/vhu
OURS=target/release/vhost-user-blk
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

# One run: prints "iops cpu_us_per_request".
one() { # pid sock depth pollflag
    local t0 t1 out
    t0=$(ticks "$1")
    out=$("$VHU" bench --socket-path "$2" --rw randread --bs 4096 --iodepth "$3" --runtime "$RUNTIME" $4 --json)
    t1=$(ticks "$1")
    python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(r['iops'], (int(sys.argv[2])-int(sys.argv[3]))*1e6/int(sys.argv[4])/max(r['requests'],1))" "$out" "$t1" "$t0" "$hz"
}

printf '%-8s %-9s %12s %12s %8s %14s %14s\n' mode iodepth "qsd IOPS" "ours IOPS" ratio "qsd us/req" "ours us/req"
for mode in interrupt poll; do
    flag=""; [ $mode = poll ] && flag="--poll"
    for depth in 1 32 128; do
        q=(); o=(); qc=(); oc=()
        for _ in $(seq "$REPS"); do
            read -r a b < <(flock /tmp/vhu-bench.lock bash -c "$(declare -f one ticks); VHU=$VHU RUNTIME=$RUNTIME hz=$hz one $qsd $dir/qsd.sock $depth '$flag'")
            q+=("$a"); qc+=("$b")
            read -r a b < <(flock /tmp/vhu-bench.lock bash -c "$(declare -f one ticks); VHU=$VHU RUNTIME=$RUNTIME hz=$hz one $ours $dir/ours.sock $depth '$flag'")
            o+=("$a"); oc+=("$b")
        done
        python3 - "$mode" "$depth" "${q[*]}" "${o[*]}" "${qc[*]}" "${oc[*]}" <<'PY'
import statistics as s, sys
mode, depth = sys.argv[1], sys.argv[2]
q, o, qc, oc = ([float(x) for x in a.split()] for a in sys.argv[3:7])
mq, mo = s.median(q), s.median(o)
print(f"{mode:<8} {depth:<9} {mq:12.0f} {mo:12.0f} {mo/mq:8.2f} {s.median(qc):14.2f} {s.median(oc):14.2f}")
PY
    done
done

#!/usr/bin/env bash
# Two builds of vhost-user-blk (A and B, e.g. a commit and its parent)
# against each other, alternately in one run, on the same preallocated
# image with --blk-file, driven by vhu bench: 4 KiB random I/O at each
# iodepth and queue count, REPS repetitions. Prints per setting the
# median IOPS of each, the ratio B/A, the back-end's CPU time per request
# (utime + stime of all its threads, from /proc) and the ratio A/B of
# those (above 1: B needs less CPU per request), then each run's numbers
# (a machine shared with other work shows as outliers in them). Each
# measurement holds /tmp/vhu-bench.lock.
#
#   bash examples/bench/blk-ab.sh OLD/vhost-user-blk NEW/vhost-user-blk
#   AIO=threads CACHE=writeback RW=randread DEPTHS="1" QUEUES="1 2" REPS=7 ...
#
# DAEMON_QUEUES gives the daemons more queues than the bench drives (the
# bench uses the first QUEUES of them): DAEMON_QUEUES=2 QUEUES=1 is a
# guest that keeps one queue of two busy.
#
# IMG_DIR (default: the temporary directory) must be on a file system
# that does O_DIRECT for CACHE=none. Uses $CARGO_TARGET_DIR's vhu (built).
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2")
cd "$(dirname "$0")/../.."
REPS=${REPS:-7}
RUNTIME=${RUNTIME:-2}
SIZE_MB=${SIZE_MB:-256}
AIO=${AIO:-io_uring}
CACHE=${CACHE:-writeback}
RW=${RW:-randread}
DEPTHS=${DEPTHS:-"1 32 128"}
QUEUES=${QUEUES:-1}
cargo build --release -q -p vhu-examples --bin vhu
VHU=${CARGO_TARGET_DIR:-target}/release/vhu
. examples/bench/blk-common.sh vhu-blk-ab

printf '%-9s %-10s %-9s %2s %5s %10s %10s %6s %9s %9s %7s\n' aio cache rw q depth "A IOPS" "B IOPS" B/A "A us/req" "B us/req" "A/B cpu"
for queues in $QUEUES; do
    rm -f "$dir/a.sock" "$dir/b.sock"
    for x in a b; do
        bin=$A; [ "$x" = b ] && bin=$B
        "$bin" --socket-path "$dir/$x.sock" --blk-file "$img" --cache "$CACHE" --aio "$AIO" \
            --num-queues "${DAEMON_QUEUES:-$queues}" --log-level warn &
        pids+=("$!")
    done
    pa=${pids[0]}; pb=${pids[1]}
    wait_sock "$dir/a.sock"; wait_sock "$dir/b.sock"
    sleep 0.2
    for rw in $RW; do
        for depth in $DEPTHS; do
            a=(); b=(); ac=(); bc=()
            for _ in $(seq "$REPS"); do
                read -r x y _ < <(flock /tmp/vhu-bench.lock bash -c "$(declare -f one ticks); VHU=$VHU RUNTIME=$RUNTIME hz=$hz one $pa $dir/a.sock $rw $depth $queues")
                a+=("$x"); ac+=("$y")
                read -r x y _ < <(flock /tmp/vhu-bench.lock bash -c "$(declare -f one ticks); VHU=$VHU RUNTIME=$RUNTIME hz=$hz one $pb $dir/b.sock $rw $depth $queues")
                b+=("$x"); bc+=("$y")
            done
            python3 - "$AIO" "$CACHE" "$rw" "$queues" "$depth" "${a[*]}" "${b[*]}" "${ac[*]}" "${bc[*]}" <<'PY'
import statistics as s, sys
aio, cache, rw, queues, depth = sys.argv[1:6]
a, b, ac, bc = ([float(x) for x in v.split()] for v in sys.argv[6:10])
ma, mb, mac, mbc = s.median(a), s.median(b), s.median(ac), s.median(bc)
print(f"{aio:<9} {cache:<10} {rw:<9} {queues:>2} {depth:>5} {ma:10.0f} {mb:10.0f} {mb/ma:6.2f} {mac:9.2f} {mbc:9.2f} {mac/mbc:7.2f}")
print("    A kIOPS", [round(x / 1000) for x in a], "us/req", [round(x, 2) for x in ac])
print("    B kIOPS", [round(x / 1000) for x in b], "us/req", [round(x, 2) for x in bc])
PY
        done
    done
    stop
done

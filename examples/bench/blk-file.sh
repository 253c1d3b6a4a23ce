#!/usr/bin/env bash
# vhu bench against qemu-storage-daemon (driver=file) and vhost-user-blk
# (--blk-file) on the same preallocated image, in matching modes,
# alternately in one run: for each I/O engine (qsd aio=io_uring / ours
# --aio io_uring; qsd aio=threads / ours --aio threads) and cache mode
# (qsd cache.direct=on / ours --cache none; cache.direct=off / --cache
# writeback), 4 KiB randread and randwrite at each iodepth and queue
# count, REPS repetitions. Prints per setting the median IOPS of each, the
# ratio ours/qsd, the back-end's CPU time per request (utime + stime of
# all its threads, io_uring workers included, from /proc), the ratio of
# IOPS per back-end core (qsd's CPU per request / ours), the median of
# that ratio taken per repetition (each of ours against the qsd run just
# before it: steadier than the ratio of medians on a machine whose speed
# drifts between runs) with its lowest and highest, and the median p50
# latency. With aio=threads and O_DIRECT, each setting also runs
# pread-floor.c (as many threads doing blocking 4 KiB O_DIRECT I/O on the
# image as the pools would have, nothing else) in the same alternation,
# and prints its CPU per request: no thread-pool back-end can go below it,
# so qsd's CPU per request over it bounds the per-core ratio any such
# back-end can reach. vhu bench negotiates what a Linux guest does (FLUSH, so
# writes are not writethrough). Each measurement holds
# /tmp/vhu-bench.lock.
#
#   REPS=5 RUNTIME=2 bash examples/bench/blk-file.sh
#   AIO="io_uring" CACHE="none" RW="randread" DEPTHS="1 32" QUEUES="1" ...
#   OURS_ARGS="--io-threads 16" ...   (more options for our daemon)
#
# IMG_DIR (default: the temporary directory) must be on a file system
# that does O_DIRECT (not tmpfs). Builds into $CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${REPS:-5}
RUNTIME=${RUNTIME:-2}
SIZE_MB=${SIZE_MB:-256}
AIO=${AIO:-"io_uring threads"}
CACHE=${CACHE:-"none writeback"}
RW=${RW:-"randread randwrite"}
DEPTHS=${DEPTHS:-"1 32 128"}
QUEUES=${QUEUES:-"1 2"}
cargo build --release -q -p vhu-examples --bins
tdir=${CARGO_TARGET_DIR:-target}
VHU=$tdir/release/vhu
OURS=$tdir/release/vhost-user-blk
. examples/bench/blk-common.sh vhu-blk-file
FLOOR=$dir/pread-floor
gcc -O2 -pthread -o "$FLOOR" examples/bench/pread-floor.c

printf '%-9s %-10s %-9s %2s %5s %10s %10s %6s %10s %11s %8s %9s %9s  %s\n' aio cache rw q depth "qsd IOPS" "ours IOPS" ratio "qsd us/req" "ours us/req" per-core "qsd p50" "ours p50" "per-core paired (min-max)"
for aio in $AIO; do
    for cache in $CACHE; do
        direct=off; [ "$cache" = none ] && direct=on
        for queues in $QUEUES; do
            rm -f "$dir/qsd.sock" "$dir/ours.sock"
            qemu-storage-daemon \
                --blockdev driver=file,node-name=n0,filename="$img",aio="$aio",cache.direct="$direct" \
                --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$dir/qsd.sock",writable=on,num-queues="$queues" &
            qsd=$!; pids+=("$qsd")
            "$OURS" --socket-path "$dir/ours.sock" --blk-file "$img" --cache "$cache" --aio "$aio" \
                --num-queues "$queues" --log-level warn ${OURS_ARGS:-} &
            ours=$!; pids+=("$ours")
            wait_sock "$dir/qsd.sock"; wait_sock "$dir/ours.sock"
            sleep 0.2
            for rw in $RW; do
                for depth in $DEPTHS; do
                    q=(); o=(); qc=(); oc=(); ql=(); ol=(); fl=()
                    # The pools' threads: one per request in flight, up to
                    # 64 in all (both daemons' default maximum).
                    nthreads=$(( depth * queues < 64 ? depth * queues : 64 ))
                    for _ in $(seq "$REPS"); do
                        read -r a b c < <(flock /tmp/vhu-bench.lock bash -c "$(declare -f one ticks); VHU=$VHU RUNTIME=$RUNTIME hz=$hz one $qsd $dir/qsd.sock $rw $depth $queues")
                        q+=("$a"); qc+=("$b"); ql+=("$c")
                        read -r a b c < <(flock /tmp/vhu-bench.lock bash -c "$(declare -f one ticks); VHU=$VHU RUNTIME=$RUNTIME hz=$hz one $ours $dir/ours.sock $rw $depth $queues")
                        o+=("$a"); oc+=("$b"); ol+=("$c")
                        if [ "$aio" = threads ] && [ "$cache" = none ]; then
                            read -r a b c < <(flock /tmp/vhu-bench.lock "$FLOOR" "$img" "$nthreads" "$RUNTIME" "$rw")
                            fl+=("$b")
                        fi
                    done
                    python3 - "$aio" "$cache" "$rw" "$queues" "$depth" "${q[*]}" "${o[*]}" "${qc[*]}" "${oc[*]}" "${ql[*]}" "${ol[*]}" "${fl[*]}" "$nthreads" <<'PY'
import statistics as s, sys
aio, cache, rw, queues, depth = sys.argv[1:6]
q, o, qc, oc, ql, ol, fl = ([float(x) for x in a.split()] for a in sys.argv[6:13])
mq, mo, mqc, moc = s.median(q), s.median(o), s.median(qc), s.median(oc)
per_core = (mqc / moc) if moc > 0 else float("inf")
paired = [a / b for a, b in zip(qc, oc) if b > 0] or [float("inf")]
print(f"{aio:<9} {cache:<10} {rw:<9} {queues:>2} {depth:>5} {mq:10.0f} {mo:10.0f} {mo/mq:6.2f} {mqc:10.2f} {moc:11.2f} {per_core:8.2f} {s.median(ql):7.1f}us {s.median(ol):7.1f}us"
      f"  {s.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f})")
if fl:
    f = s.median(fl)
    print(f"{'':<9} floor: {sys.argv[13]} threads of bare {rw[4:]}s, {f:.2f} us/req;"
          f" per-core bound of a thread pool {mqc / f:.2f}")
PY
                done
            done
            stop
        done
    done
done

# Sourced by blk-file.sh and blk-ab.sh (from the repository's root, with
# SIZE_MB, RUNTIME and VHU set): a temporary directory named after $1
# holding a preallocated image ($img), clean-up of the daemons started
# ($pids, `stop`), and one measured `vhu bench` run (`one`).

dir=$(mktemp -d "${IMG_DIR:-${TMPDIR:-/tmp}}/$1.XXXXXX")
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
trap 'stop; rm -rf "$dir"' EXIT

# Preallocated with written blocks (not fallocate's unwritten extents,
# which O_DIRECT reads as zeroes without touching the disk).
img=$dir/disk.img
dd if=/dev/zero of="$img" bs=1M count="$SIZE_MB" oflag=direct conv=fsync status=none

wait_sock() { for _ in $(seq 500); do [ -S "$1" ] && return; sleep 0.01; done; echo "no socket $1" >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# One run: prints "iops cpu_us_per_request p50_us".
one() { # pid sock rw depth queues
    local t0 t1 out
    t0=$(ticks "$1")
    out=$("$VHU" bench --socket-path "$2" --rw "$3" --bs 4096 --iodepth "$4" --queues "$5" --runtime "$RUNTIME" --json)
    t1=$(ticks "$1")
    python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(r['iops'], (int(sys.argv[2])-int(sys.argv[3]))*1e6/int(sys.argv[4])/max(r['requests'],1), r['p50_ns']/1e3)" "$out" "$t1" "$t0" "$hz"
}

#!/usr/bin/env bash
# record-vectors.sh: record QEMU's real vhost-user message sequence against
# qemu-storage-daemon (vhost-user-blk back-end), through vu-proxy.py, while a
# tiny Linux guest (build-guest.sh) boots, reads a few blocks from /dev/vda
# and powers off.
#
#   record-vectors.sh [OUT_DIR]     (default: <repo>/core/tests/vectors)
#
# Writes OUT_DIR/qemu-start-qsd.txt            (num-queues=1, split ring, -smp 1)
#        OUT_DIR/qemu-start-qsd-mq-packed.txt  (num-queues=2, packed=on, -smp 2)
# Each file: '#' header lines (versions, exact commands, line format, guest
# output), then one line per message as logged by vu-proxy.py:
#   <dir> <request id> <flags 0x..> <size> <nfds> <payload hex>
# Needs root on a fresh machine (build-guest.sh installs packages).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
OUT_DIR=${1:-$REPO/core/tests/vectors}
mkdir -p "$OUT_DIR"

eval "$("$HERE/build-guest.sh")"
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon missing" >&2; exit 1; }

GUEST_SCRIPT='set -e
echo "vda: $(cat /sys/block/vda/size) sectors, mq: $(ls /sys/block/vda/mq | tr "\n" " ")"
for d in /sys/bus/virtio/devices/*; do echo "virtio $(basename $d) device=$(cat $d/device) features=$(cat $d/features)"; done
dd if=/dev/vda of=/dev/null bs=4096 count=8 iflag=direct 2>&1 | head -n1
vhu-dio read /dev/vda 0 65536
vhu-dio read /dev/vda 1048576 4096'
GUEST_B64=$(printf '%s\n' "$GUEST_SCRIPT" | base64 -w0)

# Request names for the legend (front-end -> back-end ids, main socket).
declare -A NAME=(
    [1]=GET_FEATURES [2]=SET_FEATURES [3]=SET_OWNER [4]=RESET_OWNER
    [5]=SET_MEM_TABLE [6]=SET_LOG_BASE [7]=SET_LOG_FD [8]=SET_VRING_NUM
    [9]=SET_VRING_ADDR [10]=SET_VRING_BASE [11]=GET_VRING_BASE
    [12]=SET_VRING_KICK [13]=SET_VRING_CALL [14]=SET_VRING_ERR
    [15]=GET_PROTOCOL_FEATURES [16]=SET_PROTOCOL_FEATURES [17]=GET_QUEUE_NUM
    [18]=SET_VRING_ENABLE [19]=SEND_RARP [20]=NET_SET_MTU
    [21]=SET_BACKEND_REQ_FD [22]=IOTLB_MSG [23]=SET_VRING_ENDIAN
    [24]=GET_CONFIG [25]=SET_CONFIG [26]=CREATE_CRYPTO_SESSION
    [27]=CLOSE_CRYPTO_SESSION [28]=POSTCOPY_ADVISE [29]=POSTCOPY_LISTEN
    [30]=POSTCOPY_END [31]=GET_INFLIGHT_FD [32]=SET_INFLIGHT_FD
    [33]=GPU_SET_SOCKET [34]=RESET_DEVICE [35]=VRING_KICK
    [36]=GET_MAX_MEM_SLOTS [37]=ADD_MEM_REG [38]=REM_MEM_REG
    [39]=SET_STATUS [40]=GET_STATUS [41]=GET_SHARED_OBJECT
    [42]=SET_DEVICE_STATE_FD [43]=CHECK_DEVICE_STATE
)

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -n ${TMP:-} ]] && rm -rf "$TMP"
}
trap cleanup EXIT

quote_args() { # print args space-separated, single-quoting those with spaces
    local a out=()
    for a in "$@"; do
        if [[ $a == *' '* ]]; then out+=("'$a'"); else out+=("$a"); fi
    done
    echo "${out[*]}"
}

wait_sock() { # wait_sock PATH PID
    local i
    for i in $(seq 1 500); do
        [[ -S $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || { echo "process $2 died before creating $1" >&2; return 1; }
        sleep 0.01
    done
    echo "timeout waiting for $1" >&2
    return 1
}

record() { # record OUTFILE QSD_QUEUES DEVICE_EXTRA SMP
    local out=$1 qq=$2 devextra=$3 smp=$4
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/vhu-rec.XXXXXX")
    local qsd_sock="$TMP/qsd.sock" proxy_sock="$TMP/proxy.sock" log="$TMP/msgs.log"
    local qsd_args=(--blockdev driver=null-co,node-name=n0,size=67108864,read-zeroes=on
        --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$qsd_sock,writable=on,num-queues=$qq")
    local qemu_args=(-accel tcg -m 256 -smp "$smp" -nographic -no-reboot -nic none
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem
        -kernel "$VHU_GUEST_KERNEL" -initrd "$VHU_GUEST_INITRD"
        -append "console=ttyS0 panic=-1 quiet vhu.timeout=60 vhu.test=$GUEST_B64"
        -chardev "socket,id=c0,path=$proxy_sock"
        -device "vhost-user-blk-pci,chardev=c0$devextra")

    qemu-storage-daemon "${qsd_args[@]}" > "$TMP/qsd.out" 2>&1 &
    local qsd_pid=$!
    PIDS+=("$qsd_pid")
    wait_sock "$qsd_sock" "$qsd_pid"

    python3 "$HERE/vu-proxy.py" --listen "$proxy_sock" --connect "$qsd_sock" --log "$log" \
        > "$TMP/proxy.out" 2>&1 &
    local proxy_pid=$!
    PIDS+=("$proxy_pid")
    wait_sock "$proxy_sock" "$proxy_pid"

    local t0 t1 rc=0
    t0=$(date +%s.%N)
    timeout 180 qemu-system-x86_64 "${qemu_args[@]}" > "$TMP/console.log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    # The proxy exits by itself once QEMU and qsd have both closed.
    local i proxy_rc=0
    for i in $(seq 1 500); do kill -0 "$proxy_pid" 2>/dev/null || break; sleep 0.01; done
    if kill -0 "$proxy_pid" 2>/dev/null; then
        echo "warning: vu-proxy.py did not exit by itself; killing it" >&2
        kill "$proxy_pid" 2>/dev/null || true
    fi
    wait "$proxy_pid" 2>/dev/null || proxy_rc=$?
    [[ $proxy_rc == 0 ]] || echo "warning: vu-proxy.py exited with $proxy_rc" >&2
    kill "$qsd_pid" 2>/dev/null || true
    wait "$qsd_pid" 2>/dev/null || true

    if ! grep -q 'VHU-GUEST: RESULT PASS' "$TMP/console.log"; then
        echo "guest did not pass (qemu rc=$rc); console:" >&2
        cat "$TMP/console.log" >&2
        echo "qsd:" >&2; cat "$TMP/qsd.out" >&2
        echo "proxy:" >&2; cat "$TMP/proxy.out" >&2
        exit 1
    fi

    local ids legend="" id
    ids=$(grep -v '^#' "$log" | awk '{print $2}' | sort -n | uniq)
    for id in $ids; do legend+=" $id=${NAME[$id]:-?}"; done
    {
        echo "# vhost-user messages on the main socket, QEMU front-end <-> qemu-storage-daemon back-end,"
        echo "# recorded by examples/tests/guest/record-vectors.sh through examples/tests/guest/vu-proxy.py."
        echo "# QEMU: $(qemu-system-x86_64 --version | head -n1)"
        echo "# qsd:  $(qemu-storage-daemon --version | head -n1)"
        echo "# guest kernel: $(sed -n 's/^kernel_release=//p' "$(dirname "$VHU_GUEST_KERNEL")/stamp")"
        echo "# recorded: $(date -u +%Y-%m-%d) (guest booted, read /dev/vda, powered off in $(awk "BEGIN{printf \"%.1f\", $t1-$t0}") s)"
        echo "# qsd command: qemu-storage-daemon ${qsd_args[*]//$TMP/TMP}"
        echo "# proxy command: vu-proxy.py --listen TMP/proxy.sock --connect TMP/qsd.sock --log LOG"
        echo "# qemu command: qemu-system-x86_64 $(quote_args "${qemu_args[@]//$TMP/TMP}" |
            sed -e "s|$VHU_GUEST_KERNEL|VMLINUZ|; s|$VHU_GUEST_INITRD|INITRD|; s|vhu.test=[^ ']*|vhu.test=<base64 of guest script>|")"
        echo "# guest script (vhu.test):"
        printf '%s\n' "$GUEST_SCRIPT" | sed 's/^/#   | /'
        echo "# guest console (VHU-GUEST markers and test output):"
        sed -n '/VHU-GUEST: TEST-START/,/VHU-GUEST: POWEROFF/p' "$TMP/console.log" | tr -d '\r' | sed 's/^/#   > /'
        echo "# line format: <dir> <request id> <flags 0x..> <size> <nfds> <payload hex|->"
        echo "#   dir F>B = front-end (QEMU) to back-end, B>F = back-end reply. Payload integers are little endian."
        echo "# request ids seen:$legend"
        python3 - "$log" <<'PY'
import sys
offered = acked = pf_offered = pf_acked = None
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) < 6 or f[0].startswith("#") or f[5] == "-":
        continue
    v = int.from_bytes(bytes.fromhex(f[5])[:8], "little")
    if f[:2] == ["B>F", "1"]: offered = v
    if f[:2] == ["F>B", "2"]: acked = v
    if f[:2] == ["B>F", "15"]: pf_offered = v
    if f[:2] == ["F>B", "16"]: pf_acked = v
h = lambda v: "none" if v is None else "0x%x" % v
print("# features: back-end offered %s, last SET_FEATURES %s (RING_PACKED bit 34 offered: %s, acked: %s)"
      % (h(offered), h(acked), bool(offered and offered >> 34 & 1), bool(acked and acked >> 34 & 1)))
print("# protocol features: back-end offered %s, front-end acked %s" % (h(pf_offered), h(pf_acked)))
PY
        cat "$log"
    } > "$out"
    echo "wrote $out ($(grep -vc '^#' "$out") messages)" >&2
    rm -rf "$TMP"
    TMP=
    PIDS=()
}

record "$OUT_DIR/qemu-start-qsd.txt" 1 ",num-queues=1" 1
record "$OUT_DIR/qemu-start-qsd-mq-packed.txt" 2 ",num-queues=2,packed=on" 2

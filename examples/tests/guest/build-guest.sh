#!/usr/bin/env bash
# build-guest.sh: build and cache a tiny Linux guest (Debian 6.1 cloud kernel +
# busybox-static initramfs) for vhost-user tests under QEMU TCG.
#
# USAGE
#   build-guest.sh
#       Build (or reuse) the cached guest. Prints two lines on stdout, all
#       logging goes to stderr:
#           VHU_GUEST_KERNEL=<cache>/guest/vmlinuz
#           VHU_GUEST_INITRD=<cache>/guest/initramfs.cpio.gz
#       so `eval "$(build-guest.sh)"` works. The same two variables are also
#       written as `export` lines to <cache>/guest/env, which can be sourced.
#       <cache> is ${VHU_CACHE:-$HOME/.cache/vhu}. When the cache is valid the
#       script does no apt work and returns in well under a second.
#   build-guest.sh --test-initrd SCRIPT OUT
#       As above, then write OUT = cached initramfs + a small uncompressed cpio
#       holding SCRIPT as /test.sh (see "PER-TEST SCRIPTS").
#   build-guest.sh --boot-check
#       As above, then boot the guest once under TCG with a self-test script
#       (O_DIRECT helper, markers) and report the wall-clock boot time.
#
# ENVIRONMENT
#   VHU_CACHE             cache root (default $HOME/.cache/vhu)
#   VHU_GUEST_REBUILD=1   ignore the cache and rebuild
#   VHU_GUEST_KERNEL_PKG  kernel package to use (default: newest
#                         linux-image-6.1.*-cloud-amd64 known to apt)
#   VHU_NO_APT=1          never run apt-get (fail if something is missing)
#
# PACKAGES (installed with apt-get when missing; root needed then)
#   busybox-static, cpio, gcc + libc6-dev (static O_DIRECT helper), and
#   qemu-system-x86 + qemu-utils preferably from bookworm-backports (QEMU 10,
#   matching qemu-storage-daemon 10.0.2). The backports apt source is derived
#   from the machine's own entry in /etc/apt/sources.list.d/debian.sources
#   (same URIs, Suites: bookworm-backports), so no host name appears here.
#   If backports fails, bookworm's qemu-system-x86 (7.2) is installed instead.
#
# GUEST /init (busybox sh), all output on the serial console (console=ttyS0):
#   mounts proc, sysfs, devtmpfs, tmpfs on /tmp; loads virtio, virtio_ring,
#   virtio_pci(+_modern_dev/_legacy_dev), virtio_blk, failover, net_failover,
#   virtio_net, fuse/virtiofs, virtio_rng, virtio_console, virtio vsock and loop in
#   dependency order; brings up lo; runs the test; powers off with
#   `poweroff -f` (QEMU exits). Markers, one per line, each starting with
#   "VHU-GUEST: " (t= is guest uptime in seconds):
#       VHU-GUEST: INIT <kernel release> t=..
#       VHU-GUEST: MODULE-FAIL <name>            (only on failure)
#       VHU-GUEST: MODULES-OK t=..  |  VHU-GUEST: MODULES-FAILED t=..
#       VHU-GUEST: TEST-START <cmdline|/test.sh|builtin> t=..
#       ... whatever the test prints ...
#       VHU-GUEST: TEST-EXIT <rc> t=..
#       VHU-GUEST: RESULT PASS   |   VHU-GUEST: RESULT FAIL rc=<rc>
#       VHU-GUEST: POWEROFF
#   The test's exit status decides PASS (0) or FAIL. A test killed by
#   vhu.timeout reports rc=137 (SIGKILL) or 143 (SIGTERM).
#
# PER-TEST SCRIPTS (no rebuild of the cached initramfs), first match wins:
#   1. kernel command line `vhu.test=<base64 of the script>` (the x86 command
#      line is limited to 2047 bytes, so keep scripts under ~1.3 KiB there);
#   2. /test.sh from an appended cpio: the kernel unpacks concatenated cpio
#      archives, compressed or not. Either `build-guest.sh --test-initrd
#      SCRIPT OUT`, or do it yourself: copy initramfs.cpio.gz, pad with NUL
#      bytes to a multiple of 4, append an uncompressed "newc" cpio holding
#      `test.sh` (mode 0100755) and a TRAILER!!! entry; or append a gzip'd
#      cpio (no padding needed);
#   3. the built-in self-test (prints devices, exits 0).
#   Other command-line knobs: vhu.timeout=<secs> (kill the test after secs),
#   vhu.debug=1 (run the test with sh -x).
#
# IN THE GUEST: busybox applets (sh, dd, hexdump, md5sum, ip, ...), and
#   /bin/vhu-dio (static, from vhu-dio.c) for O_DIRECT I/O that fails loudly:
#       vhu-dio write|verify DEV OFFSET LEN SEED; vhu-dio read DEV OFFSET LEN;
#       vhu-dio flush DEV
#   busybox dd also has iflag=direct/oflag=direct, but it needs bs>=4096 for
#   an aligned buffer and silently falls back to buffered I/O on EINVAL.
#
# TYPICAL QEMU COMMAND (TCG; memfd so a vhost-user back-end can map RAM):
#   qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot \
#     -object memory-backend-memfd,id=mem,size=256M,share=on \
#     -numa node,memdev=mem -kernel "$VHU_GUEST_KERNEL" \
#     -initrd "$VHU_GUEST_INITRD" \
#     -append 'console=ttyS0 panic=-1 quiet vhu.test=<base64>' \
#     -chardev socket,id=c0,path=SOCK -device vhost-user-blk-pci,chardev=c0
#   (`quiet` saves ~0.5 s of serial output; markers are printed regardless.)
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$SELF_DIR/$(basename "${BASH_SOURCE[0]}")"
DIO_SRC="$SELF_DIR/vhu-dio.c"
CACHE_ROOT="${VHU_CACHE:-$HOME/.cache/vhu}"
OUT_DIR="$CACHE_ROOT/guest"
KERNEL="$OUT_DIR/vmlinuz"
INITRD="$OUT_DIR/initramfs.cpio.gz"
STAMP="$OUT_DIR/stamp"

# Required modules (name as in modinfo, "_" not "-") and optional extras.
REQUIRED_MODULES="virtio_pci virtio_blk virtio_net"
OPTIONAL_MODULES="virtiofs virtio_rng virtio_console vmw_vsock_virtio_transport loop"

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- packages
APT_UPDATED=0
apt_get() {
    [[ "${VHU_NO_APT:-0}" != 1 ]] || die "VHU_NO_APT=1 but apt-get needed: apt-get $*"
    [[ $(id -u) == 0 ]] || die "not root; cannot run apt-get $*"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q "$@"
}
apt_update_once() {
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        apt_get update >&2
        APT_UPDATED=1
    fi
}

# Print a deb822 stanza for bookworm-backports derived from the stanza that
# carries the plain "bookworm" suite (same URIs, components, signing key).
derive_backports_source() {
    local src=/etc/apt/sources.list.d/debian.sources
    if [[ -r $src ]]; then
        awk 'BEGIN { RS = ""; FS = "\n" }
        {
            uri = ""; suites = ""; comp = ""; sig = ""; types = ""
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/) uri = $i
                if ($i ~ /^Suites:/) suites = $i
                if ($i ~ /^Components:/) comp = $i
                if ($i ~ /^Signed-By:/) sig = $i
                if ($i ~ /^Types:/) types = $i
            }
            if (types ~ /deb([ \t]|$)/ && suites ~ /[ \t]bookworm([ \t]|$)/) {
                print "Types: deb"; print uri; print "Suites: bookworm-backports"
                print comp; if (sig != "") print sig
                found = 1; exit
            }
        }
        END { exit found ? 0 : 1 }' "$src" && return 0
    fi
    # One-line format fallback: "deb [opts] URI bookworm comps..."
    local line
    line=$(grep -hE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+[[:space:]]+bookworm[[:space:]]' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1) || true
    [[ -n $line ]] || return 1
    echo "$line" | awk '{ for (i = 1; i <= NF; i++) if ($i == "bookworm") { $i = "bookworm-backports"; break } print }'
}

setup_backports() {
    if apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
        return 0
    fi
    local body dest
    body=$(derive_backports_source) || { log "cannot derive a bookworm-backports source"; return 1; }
    if [[ $body == Types:* ]]; then
        dest=/etc/apt/sources.list.d/vhu-bookworm-backports.sources
    else
        dest=/etc/apt/sources.list.d/vhu-bookworm-backports.list
    fi
    log "adding $dest"
    printf '%s\n' "$body" > "$dest"
    APT_UPDATED=0
    apt_update_once
}

install_qemu() {
    apt_update_once
    if setup_backports &&
        apt_get install -y --no-install-recommends -t bookworm-backports \
            qemu-system-x86 qemu-utils >&2; then
        :
    else
        log "bookworm-backports QEMU failed; falling back to bookworm's qemu-system-x86"
        apt_get install -y --no-install-recommends qemu-system-x86 >&2
        command -v qemu-storage-daemon >/dev/null || apt_get install -y --no-install-recommends qemu-utils >&2
    fi
}

ensure_packages() {
    local need=()
    command -v busybox >/dev/null && busybox --list 2>/dev/null | grep -qx poweroff &&
        [[ -x /bin/busybox ]] && file_is_static /bin/busybox || need+=(busybox-static)
    command -v cpio >/dev/null || need+=(cpio)
    command -v gzip >/dev/null || need+=(gzip)
    command -v gcc >/dev/null || need+=(gcc)
    [[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || need+=(libc6-dev)
    if ((${#need[@]})); then
        apt_update_once
        apt_get install -y --no-install-recommends "${need[@]}" >&2
    fi
    if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-storage-daemon >/dev/null; then
        install_qemu
    fi
}

# busybox-static's /bin/busybox is static; the dynamic "busybox" package's is
# not, and would not run in the initramfs.
file_is_static() {
    # ELF with no PT_INTERP program header == static. readelf may be absent.
    if command -v readelf >/dev/null; then
        ! readelf -l "$1" 2>/dev/null | grep -q 'INTERP'
    else
        ! grep -q 'ld-linux' "$1"
    fi
}

# ---------------------------------------------------------------- cache key
cache_key() {
    {
        cat "$SELF" "$DIO_SRC"
        echo "kernel_pkg=${VHU_GUEST_KERNEL_PKG:-newest-6.1-cloud}"
    } | sha256sum | cut -c1-16
}

cache_valid() {
    [[ "${VHU_GUEST_REBUILD:-0}" != 1 && -s $KERNEL && -s $INITRD && -s $STAMP ]] &&
        [[ $(head -n1 "$STAMP") == "key=$(cache_key)" ]]
}

# ---------------------------------------------------------------- modules
# Resolve module dependencies from the "depends=" field embedded in each
# .ko's .modinfo section (no depmod needed; matches modules.dep).
declare -A MOD_PATH=() MOD_SEEN=()
MOD_ORDER=()
index_modules() {
    local root=$1 f base
    while IFS= read -r f; do
        base=$(basename "$f")
        base=${base%%.ko*}
        MOD_PATH[${base//-/_}]=$f
    done < <(find "$root" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
}
mod_depends() {
    local f=$1
    case $f in
        *.ko.xz) xz -dc "$f" ;;
        *.ko.zst) zstd -dc "$f" ;;
        *.ko.gz) gzip -dc "$f" ;;
        *) cat "$f" ;;
    esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}
add_module() { # add_module NAME REQUIRED(0/1): DFS, dependencies first
    local m=${1//-/_} req=$2 d
    [[ -n ${MOD_SEEN[$m]:-} ]] && return 0
    if [[ -z ${MOD_PATH[$m]:-} ]]; then
        if grep -qE "/${m//_/[-_]}\.ko" "$BUILTIN" 2>/dev/null; then
            log "module $m is built in"
            MOD_SEEN[$m]=builtin
            return 0
        fi
        [[ $req == 1 ]] && die "module $m not found in kernel package"
        log "optional module $m not found; skipped"
        return 0
    fi
    MOD_SEEN[$m]=visiting
    for d in $(mod_depends "${MOD_PATH[$m]}"); do
        add_module "$d" 1
    done
    MOD_SEEN[$m]=done
    MOD_ORDER+=("$m")
}

# ---------------------------------------------------------------- init
write_init() {
    cat > "$1" <<'INIT'
#!/bin/sh
# vhu test guest /init (generated by build-guest.sh)
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
up() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "VHU-GUEST: $*"; }
echo  # the BIOS leaves escape sequences on the console line: start a fresh one
mark "INIT $(uname -r) t=$(up)"

modok=1
while read -r m; do
    [ -n "$m" ] || continue
    if ! insmod "/lib/modules/$m.ko" 2>/tmp/insmod.err; then
        if ! grep -q 'File exists' /tmp/insmod.err; then
            cat /tmp/insmod.err
            mark "MODULE-FAIL $m"
            modok=0
        fi
    fi
done < /etc/vhu-modules
if [ $modok = 1 ]; then mark "MODULES-OK t=$(up)"; else mark "MODULES-FAILED t=$(up)"; fi
ip link set lo up 2>/dev/null

test_src=builtin
timeout_s=
debug=
for w in $(cat /proc/cmdline); do
    case "$w" in
        vhu.test=*)
            if echo "${w#vhu.test=}" | base64 -d > /tmp/vhu-test.sh 2>/dev/null; then
                test_src=cmdline
            else
                mark "BAD-BASE64 in vhu.test"
            fi ;;
        vhu.timeout=*) timeout_s=${w#vhu.timeout=} ;;
        vhu.debug=1) debug=-x ;;
    esac
done
if [ $test_src = builtin ] && [ -f /test.sh ]; then
    cp /test.sh /tmp/vhu-test.sh
    test_src=/test.sh
fi
if [ $test_src = builtin ]; then
    cp /etc/vhu-builtin-test.sh /tmp/vhu-test.sh
fi
chmod +x /tmp/vhu-test.sh

mark "TEST-START $test_src t=$(up)"
if [ -n "$timeout_s" ]; then
    timeout -s KILL "$timeout_s" sh $debug /tmp/vhu-test.sh
else
    sh $debug /tmp/vhu-test.sh
fi
rc=$?
mark "TEST-EXIT $rc t=$(up)"
if [ $rc = 0 ]; then mark "RESULT PASS"; else mark "RESULT FAIL rc=$rc"; fi
sync
mark "POWEROFF"
poweroff -f
# Not reached unless poweroff failed; a dying init panics (panic=-1 reboots,
# and -no-reboot then makes QEMU exit).
sleep 1
exit 1
INIT
}

write_builtin_test() {
    cat > "$1" <<'EOF'
#!/bin/sh
# Built-in guest test: show what the guest sees.
echo "block devices: $(ls /sys/block | tr '\n' ' ')"
echo "net devices: $(ls /sys/class/net | tr '\n' ' ')"
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d" ] && echo "virtio $(basename "$d") device=$(cat "$d/device") features=$(cat "$d/features")"
done
exit 0
EOF
}

# ---------------------------------------------------------------- build
build() {
    local work kpkg deb kroot kver vmlinuz stage m applet
    work=$(mktemp -d "${TMPDIR:-/tmp}/vhu-guest-build.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT

    kpkg=${VHU_GUEST_KERNEL_PKG:-}
    if [[ -z $kpkg ]]; then
        kpkg=$(apt-cache search --names-only '^linux-image-6\.1\.[0-9]+-[0-9]+-cloud-amd64$' 2>/dev/null |
            awk '{print $1}' | sort -V | tail -n1)
        if [[ -z $kpkg ]]; then
            apt_update_once
            kpkg=$(apt-cache search --names-only '^linux-image-6\.1\.[0-9]+-[0-9]+-cloud-amd64$' |
                awk '{print $1}' | sort -V | tail -n1)
        fi
        [[ -n $kpkg ]] || die "no linux-image-6.1.*-cloud-amd64 package known to apt"
    fi
    log "kernel package: $kpkg"
    # apt-get download writes to the current directory; _apt may not be able
    # to write into a root-only mktemp dir, which only costs a warning.
    (cd "$work" && apt-get -q download "$kpkg" >&2 2>"$work/download.err") || {
        cat "$work/download.err" >&2
        apt_update_once
        (cd "$work" && apt-get -q download "$kpkg" >&2)
    }
    deb=$(ls "$work"/linux-image-*.deb)
    kroot="$work/kroot"
    dpkg -x "$deb" "$kroot"
    vmlinuz=$(ls "$kroot"/boot/vmlinuz-* | head -n1)
    kver=${vmlinuz##*/vmlinuz-}
    [[ -d $kroot/lib/modules/$kver ]] || die "no modules for $kver in $deb"
    BUILTIN="$kroot/lib/modules/$kver/modules.builtin"

    index_modules "$kroot/lib/modules/$kver"
    for m in $REQUIRED_MODULES; do add_module "$m" 1; done
    for m in $OPTIONAL_MODULES; do add_module "$m" 0; done
    log "module load order: ${MOD_ORDER[*]}"

    stage="$work/stage"
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules,mnt,root}
    cp /bin/busybox "$stage/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$stage/bin/$applet"
    done
    # Kernel opens /dev/console for init before devtmpfs is mounted.
    mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || log "mknod /dev/console failed (not root?)"
    mknod -m 666 "$stage/dev/null" c 1 3 2>/dev/null || true

    : > "$stage/etc/vhu-modules"
    for m in "${MOD_ORDER[@]}"; do
        case ${MOD_PATH[$m]} in
            *.ko.xz) xz -dc "${MOD_PATH[$m]}" > "$stage/lib/modules/$m.ko" ;;
            *.ko.zst) zstd -dc "${MOD_PATH[$m]}" > "$stage/lib/modules/$m.ko" ;;
            *.ko.gz) gzip -dc "${MOD_PATH[$m]}" > "$stage/lib/modules/$m.ko" ;;
            *) cp "${MOD_PATH[$m]}" "$stage/lib/modules/$m.ko" ;;
        esac
        echo "$m" >> "$stage/etc/vhu-modules"
    done

    log "compiling vhu-dio (static)"
    gcc -static -O2 -Wall -Wextra -o "$stage/bin/vhu-dio" "$DIO_SRC"
    strip "$stage/bin/vhu-dio" 2>/dev/null || true

    write_init "$stage/init"
    write_builtin_test "$stage/etc/vhu-builtin-test.sh"
    chmod 755 "$stage/init" "$stage/etc/vhu-builtin-test.sh"
    echo "$kver" > "$stage/etc/vhu-kernel-release"

    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0) | gzip -9n > "$work/initramfs.cpio.gz"

    mkdir -p "$OUT_DIR"
    cp "$vmlinuz" "$OUT_DIR/vmlinuz.tmp" && mv -f "$OUT_DIR/vmlinuz.tmp" "$KERNEL"
    cp "$work/initramfs.cpio.gz" "$OUT_DIR/initramfs.tmp" && mv -f "$OUT_DIR/initramfs.tmp" "$INITRD"
    {
        echo "key=$(cache_key)"
        echo "kernel_pkg=$kpkg"
        echo "kernel_release=$kver"
        echo "modules=${MOD_ORDER[*]}"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } > "$STAMP"
    rm -rf "$work"
    trap - EXIT
    log "built $INITRD ($(stat -c %s "$INITRD") bytes), kernel $kver"
}

write_env() {
    printf 'export VHU_GUEST_KERNEL=%q\nexport VHU_GUEST_INITRD=%q\n' "$KERNEL" "$INITRD" \
        > "$OUT_DIR/env.tmp"
    mv -f "$OUT_DIR/env.tmp" "$OUT_DIR/env"
}

# OUT = cached initrd + NUL padding to 4 bytes + newc cpio with /test.sh.
make_test_initrd() {
    local script=$1 out=$2 tdir size pad
    [[ -r $script ]] || die "cannot read test script $script"
    tdir=$(mktemp -d "${TMPDIR:-/tmp}/vhu-test-cpio.XXXXXX")
    install -m 0755 "$script" "$tdir/test.sh"
    cp "$INITRD" "$out.tmp"
    size=$(stat -c %s "$out.tmp")
    pad=$(( (4 - size % 4) % 4 ))
    if ((pad)); then head -c "$pad" /dev/zero >> "$out.tmp"; fi
    (cd "$tdir" && echo test.sh | cpio --quiet -o -H newc -R 0:0) >> "$out.tmp"
    mv -f "$out.tmp" "$out"
    rm -rf "$tdir"
}

boot_check() {
    local script tmp start end
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/vhu-boot-check.XXXXXX")
    script="$tmp/test.sh"
    cat > "$script" <<'EOF'
#!/bin/sh
set -e
echo "boot-check: kernel $(uname -r), $(nproc) cpu(s)"
ls /lib/modules
lsmod | awk '{print $1}' | tr '\n' ' '; echo
# O_DIRECT helper on a RAM-backed loop device (no virtio disk here).
dd if=/dev/zero of=/tmp/disk.img bs=1M count=4 2>/dev/null
losetup /dev/loop0 /tmp/disk.img 2>/dev/null || { mknod /dev/loop0 b 7 0; losetup /dev/loop0 /tmp/disk.img; }
vhu-dio write /dev/loop0 4096 65536 7
vhu-dio verify /dev/loop0 4096 65536 7
if vhu-dio verify /dev/loop0 4096 65536 8 2>/dev/null; then echo "verify should fail"; exit 1; fi
dd if=/dev/loop0 of=/dev/null bs=4096 count=4 iflag=direct 2>/dev/null
echo "boot-check: O_DIRECT ok"
EOF
    # Case 1: appended cpio.
    make_test_initrd "$script" "$tmp/initrd"
    start=$(date +%s.%N)
    timeout 120 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$KERNEL" -initrd "$tmp/initrd" \
        -append 'console=ttyS0 panic=-1 quiet' > "$tmp/console.log" 2>&1 || true
    end=$(date +%s.%N)
    cat "$tmp/console.log" >&2
    grep -q 'VHU-GUEST: RESULT PASS' "$tmp/console.log" || die "boot-check (appended cpio) failed"
    log "boot-check appended-cpio: PASS in $(awk "BEGIN{print $end-$start}") s"
    # Case 2: script on the kernel command line.
    start=$(date +%s.%N)
    timeout 120 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 quiet vhu.test=$(printf 'echo hello-from-cmdline; exit 3\n' | base64 -w0)" \
        > "$tmp/console2.log" 2>&1 || true
    end=$(date +%s.%N)
    cat "$tmp/console2.log" >&2
    grep -q 'VHU-GUEST: RESULT FAIL rc=3' "$tmp/console2.log" &&
        grep -q 'hello-from-cmdline' "$tmp/console2.log" || die "boot-check (cmdline) failed"
    log "boot-check cmdline: PASS (expected rc=3) in $(awk "BEGIN{print $end-$start}") s"
    rm -rf "$tmp"
}

# ---------------------------------------------------------------- main
mode=build
case "${1:-}" in
    "") ;;
    --test-initrd) [[ $# == 3 ]] || die "usage: $0 --test-initrd SCRIPT OUT"; mode=test-initrd ;;
    --boot-check) mode=boot-check ;;
    -h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (try --help)" ;;
esac

mkdir -p "$OUT_DIR"
exec 9>"$OUT_DIR/.lock"
flock 9
if cache_valid && command -v qemu-system-x86_64 >/dev/null && command -v qemu-storage-daemon >/dev/null; then
    :
else
    ensure_packages
    cache_valid || build
fi
write_env
exec 9>&-

case $mode in
    test-initrd) make_test_initrd "$2" "$3" ;;
    boot-check) boot_check ;;
esac
echo "VHU_GUEST_KERNEL=$KERNEL"
echo "VHU_GUEST_INITRD=$INITRD"

#!/usr/bin/env bash
# vhost-user-net against DPDK's own vhost back-end (testpmd's net_vhost
# PMD), alternately in one run, driven by DPDK's virtio_user front-end
# (testpmd, no hugepages):
#
#   tx: virtio_user `txonly` -> back-end that drops (net_vhost `rxonly` /
#       ours `--backend null`): packets per second the front-end gets out;
#   rx: back-end that sources (net_vhost `txonly` / ours `--backend null`,
#       whose receive buffers all get a template frame) -> virtio_user
#       `rxonly`: packets per second the front-end receives.
#
# For each direction, packet size (SIZES, bytes without the CRC) and ring
# layout (split, packed) it runs REPS repetitions, each one run of DPDK's
# back-end and one of ours, and prints the median Mpps of each, the ratio
# ours/DPDK, and Gbit/s (frame bytes only); then the median, lowest and
# highest of the per-repetition ratios (each of ours over the DPDK run
# just before it: steadier than the ratio of medians on a machine whose
# speed drifts between runs). Rates are measured between two
# `show port stats` snapshots RUNTIME seconds apart, after WARMUP seconds.
#
# Cores: the front-end's forwarding lcore is core 1, the back-end runs on
# core 0 (testpmd's forwarding lcore; our daemon under taskset, both
# queues on one worker, --threads 1, which busy-polls, --spin-us).
# Each measurement holds /tmp/vhu-bench.lock.
#
#   REPS=9 RUNTIME=3 bash examples/bench/net.sh
#   DIRS="tx" SIZES="64" RINGS="split" REPS=3 bash examples/bench/net.sh
#
# Builds into $CARGO_TARGET_DIR (default target/). DPDK is installed by
# examples/tests/dpdk/install-dpdk.sh when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
export REPS=${REPS:-9}
export RUNTIME=${RUNTIME:-3}
export WARMUP=${WARMUP:-1}
export SIZES=${SIZES:-"64 1500"}
export RINGS=${RINGS:-"split packed"}
export DIRS=${DIRS:-"tx rx"}
export SPIN_US=${SPIN_US:-1000000}
cargo build --release -q -p vhu-examples --bins
tdir=${CARGO_TARGET_DIR:-target}
export OURS=$tdir/release/vhost-user-net
export TESTPMD
TESTPMD=$(bash examples/tests/dpdk/install-dpdk.sh)
exec python3 - <<'EOF'
import os, re, signal, statistics, subprocess, sys, tempfile, threading, time, fcntl

REPS = int(os.environ["REPS"]); RUNTIME = float(os.environ["RUNTIME"])
WARMUP = float(os.environ["WARMUP"]); SIZES = [int(s) for s in os.environ["SIZES"].split()]
RINGS = os.environ["RINGS"].split(); DIRS = os.environ["DIRS"].split()
OURS = os.environ["OURS"]; TESTPMD = os.environ["TESTPMD"]; SPIN_US = os.environ["SPIN_US"]
EAL = ["--no-huge", "-m", "512", "--no-pci", "--iova-mode=va"]


class Testpmd:
    """testpmd in interactive mode; its output read by a thread."""

    def __init__(self, prefix, lcores, main, vdev, args):
        # stdio is fully buffered on a pipe: line-buffer it (the stats).
        cmd = ["stdbuf", "-oL", TESTPMD, "-l", lcores, "--main-lcore", main, *EAL, "--file-prefix", prefix,
               "--vdev", vdev, "--", "-i", "--total-num-mbufs=16384", *args]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.out = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait("testpmd> ", 0, 30)

    def _read(self):
        for line in iter(lambda: self.p.stdout.read(1), ""):
            with self.lock:
                self.out.append(line)

    def text(self):
        with self.lock:
            return "".join(self.out)

    def wait(self, pattern, after, timeout=20):
        t0 = time.time()
        while self.text().count(pattern) <= after:
            if time.time() - t0 > timeout or self.p.poll() is not None:
                raise RuntimeError(f"testpmd: no {pattern!r}:\n{self.text()[-3000:]}")
            time.sleep(0.01)

    def command(self, cmd):
        n = self.text().count("testpmd> ")
        start = len(self.text())
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        self.wait("testpmd> ", n)
        return self.text()[start:]

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
            self.p.wait(10)
        except Exception:
            pass
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def packets(stats, key):
    """The port's RX-packets or TX-packets in `show port stats` output."""
    m = re.search(key + r":\s+(\d+)", stats)
    if not m:
        raise RuntimeError(f"no {key} in:\n{stats}")
    return int(m.group(1))


def wait_sock(path, proc):
    for _ in range(1000):
        if os.path.exists(path):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"back-end exited ({proc.returncode})")
        time.sleep(0.01)
    raise RuntimeError(f"no socket {path}")


def run(who, direction, size, ring, tmp):
    """One measurement: packets per second at the front-end."""
    sock = os.path.join(tmp, f"{who}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    backend = daemon = None
    try:
        if who == "dpdk":
            mode = "rxonly" if direction == "tx" else "txonly"
            backend = Testpmd(f"vhu-be-{os.getpid()}", "0,1", "1", f"net_vhost0,iface={sock},queues=1",
                              [f"--forward-mode={mode}", f"--txpkts={size}"])
            backend.command("start")
        else:
            daemon = subprocess.Popen(
                ["taskset", "-c", "0", OURS, "--socket-path", sock, "--backend", "null",
                 "--frame-size", str(size), "--trust-unsealable-memfd", "--spin-us", SPIN_US,
                 "--threads", "1",
                 "--log-level", "warn"], stderr=subprocess.DEVNULL)
        wait_sock(sock, daemon)
        mode = "txonly" if direction == "tx" else "rxonly"
        packed = ",packed_vq=1" if ring == "packed" else ""
        front = Testpmd(f"vhu-fe-{os.getpid()}", "0,1", "0",
                        f"net_virtio_user0,path={sock},queue_size=1024{packed}",
                        [f"--forward-mode={mode}", f"--txpkts={size}"])
        try:
            front.command("start")
            time.sleep(WARMUP)
            key = "TX-packets" if direction == "tx" else "RX-packets"
            a, t0 = packets(front.command("show port stats 0"), key), time.time()
            time.sleep(RUNTIME)
            b, t1 = packets(front.command("show port stats 0"), key), time.time()
            front.command("stop")
        finally:
            front.close()
        return (b - a) / (t1 - t0)
    finally:
        if backend is not None:
            backend.close()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(5)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def main():
    print(f"{'dir':3} {'ring':6} {'bytes':>5} {'DPDK Mpps':>10} {'ours Mpps':>10} {'ratio':>6} "
          f"{'DPDK Gbit/s':>11} {'ours Gbit/s':>11}  (medians of {REPS}; paired ratio median, min-max)", flush=True)
    with tempfile.TemporaryDirectory(prefix="vhu-net-bench.") as tmp, \
            open("/tmp/vhu-bench.lock", "w") as lock:
        for direction in DIRS:
            for size in SIZES:
                for ring in RINGS:
                    res = {"dpdk": [], "ours": []}
                    for _ in range(REPS):
                        fcntl.flock(lock, fcntl.LOCK_EX)
                        try:
                            for who in ("dpdk", "ours"):
                                res[who].append(run(who, direction, size, ring, tmp))
                        finally:
                            fcntl.flock(lock, fcntl.LOCK_UN)
                    d, o = statistics.median(res["dpdk"]), statistics.median(res["ours"])
                    ratios = [b / a for a, b in zip(res["dpdk"], res["ours"]) if a > 0]
                    gb = lambda pps: pps * size * 8 / 1e9
                    print(f"{direction:3} {ring:6} {size:5} {d/1e6:10.3f} {o/1e6:10.3f} {o/d if d else 0:6.2f} "
                          f"{gb(d):11.2f} {gb(o):11.2f}  ({statistics.median(ratios):.2f}, {min(ratios):.2f}-{max(ratios):.2f})",
                          flush=True)


main()
EOF

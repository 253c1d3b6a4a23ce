//! DPDK's testpmd as the front-end of our `vhost-user-net`
//! (`--vdev net_virtio_user0,path=SOCK`): `txonly` into the null and the
//! loopback backends, `rxonly` from the null backend, `io` forwarding
//! through the loopback (split and packed rings, 1 and 2 queue pairs).
//! Each run reads testpmd's port statistics and our daemon's per-queue
//! counters (logged when testpmd leaves) and checks that both sides
//! counted the packets, with none lost in the loopback. testpmd's
//! virtio_user negotiates VIRTIO_F_IN_ORDER by default (`in_order=1`) and
//! our daemon offers it: the runs check it was acked, and one runs
//! without it (`in_order=0`).
//!
//! testpmd runs without hugepages (memory is an unsealable memfd, so the
//! daemon runs with `--trust-unsealable-memfd`); it is installed by
//! `tests/dpdk/install-dpdk.sh` if missing. About a second of traffic per
//! run; the runs are serialised (testpmd busy-polls a core).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TempDir;

/// One testpmd at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn testpmd_path() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dpdk/install-dpdk.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run install-dpdk.sh");
    assert!(
        out.status.success(),
        "install-dpdk.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Our daemon on a socket in `dir`, its log in `dir/net.log`.
fn daemon(dir: &Path, args: &[&str]) -> (Kill, PathBuf) {
    let sock = dir.join("net.sock");
    let log = std::fs::File::create(dir.join("net.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhost-user-net"))
        .arg("--socket-path")
        .arg(&sock)
        .arg("--trust-unsealable-memfd")
        .args(args)
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start vhost-user-net");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    (Kill(child), sock)
}

/// testpmd in interactive mode, its output collected by a thread.
struct Testpmd {
    child: Kill,
    stdin: ChildStdin,
    out: Arc<Mutex<String>>,
}

impl Testpmd {
    fn start(dir: &Path, sock: &Path, vdev_extra: &str, args: &[&str]) -> Testpmd {
        // The temporary directory's name is unique: so is the prefix of
        // testpmd's runtime files.
        let prefix = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut child = Command::new(testpmd_path())
            .args(["-l", "0,1", "--no-huge", "-m", "512", "--no-pci"])
            .args(["--iova-mode=va", "--file-prefix", &prefix])
            .arg("--vdev")
            .arg(format!(
                "net_virtio_user0,path={},queue_size=1024{vdev_extra}",
                sock.display()
            ))
            .args(["--", "-i", "--total-num-mbufs=16384"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dpdk-testpmd");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let t = Testpmd {
            child: Kill(child),
            stdin,
            out,
        };
        t.wait_for("testpmd> ", 0);
        t
    }

    /// Waits until the output has `pattern` more than `after` times.
    fn wait_for(&self, pattern: &str, after: usize) {
        let t0 = Instant::now();
        loop {
            let out = self.out.lock().unwrap().clone();
            if out.matches(pattern).count() > after {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "testpmd did not print {pattern:?}:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a command and waits for the next prompt.
    fn command(&mut self, cmd: &str) -> String {
        let prompts = self.out.lock().unwrap().matches("testpmd> ").count();
        writeln!(self.stdin, "{cmd}").unwrap();
        self.wait_for("testpmd> ", prompts);
        self.out.lock().unwrap().clone()
    }

    /// Forwards for `secs`, stops, reads the port statistics and quits:
    /// (RX-packets, TX-packets) of port 0.
    fn run(mut self, start: &str, traffic: Duration) -> (u64, u64) {
        self.command(start);
        std::thread::sleep(traffic);
        self.command("stop");
        self.command("show port stats all");
        writeln!(self.stdin, "quit").unwrap();
        let t0 = Instant::now();
        while self.child.0.try_wait().unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "testpmd did not quit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // testpmd's own lines are buffered in a pipe: read them once it
        // has exited (and its output thread has seen the end).
        std::thread::sleep(Duration::from_millis(100));
        let out = self.out.lock().unwrap().clone();
        let stats = out
            .rsplit("NIC statistics for port 0")
            .next()
            .unwrap_or_default();
        let field = |name: &str| -> u64 {
            let at = stats
                .find(name)
                .unwrap_or_else(|| panic!("no {name} in testpmd's output:\n{out}"));
            stats[at + name.len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let rx_tx = (field("RX-packets:"), field("TX-packets:"));
        for l in stats.lines().take(4) {
            eprintln!("testpmd: {l}");
        }
        rx_tx
    }
}

/// Our per-queue counters, summed by direction, from the daemon's log at
/// disconnect: (rx packets, tx packets, drops, errors).
#[derive(Debug, Default)]
struct Ours {
    rx: u64,
    tx: u64,
    drops: u64,
    errors: u64,
    /// The front-end acked VIRTIO_F_IN_ORDER.
    in_order: bool,
}

fn our_counters(dir: &Path, queues: usize) -> Ours {
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("net.log")).unwrap();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("vhu_examples::net: queue "))
            .collect();
        if lines.len() >= queues {
            let mut o = Ours::default();
            for l in &lines[lines.len() - queues..] {
                eprintln!("{l}");
                let n: Vec<u64> = l
                    .split("): ")
                    .nth(1)
                    .unwrap()
                    .split(", ")
                    .map(|w| w.split(' ').next().unwrap().parse().unwrap())
                    .collect();
                if l.contains("(rx)") {
                    o.rx += n[0];
                } else {
                    o.tx += n[0];
                }
                o.drops += n[2];
                o.errors += n[3];
            }
            for l in log.lines().filter(|l| l.contains("stopped:")) {
                eprintln!("{l}");
            }
            let acked = log
                .lines()
                .rfind(|l| l.contains("front-end acked virtio features"))
                .unwrap_or_else(|| panic!("no acked features in the log:\n{log}"));
            eprintln!("{acked}");
            o.in_order = acked.contains("IN_ORDER");
            return o;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no counters in the daemon's log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const TRAFFIC: Duration = Duration::from_millis(1000);

/// One run: our daemon with `daemon_args`, testpmd with `vdev_extra` and
/// `args`, forwarding started with `start`.
fn run(
    daemon_args: &[&str],
    pairs: usize,
    vdev_extra: &str,
    args: &[&str],
    start: &str,
) -> (u64, u64, Ours) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("net-dpdk");
    let (_d, sock) = daemon(&dir.0, daemon_args);
    let pmd = Testpmd::start(&dir.0, &sock, vdev_extra, args);
    let (rx, tx) = pmd.run(start, TRAFFIC);
    let ours = our_counters(&dir.0, pairs * 2);
    (rx, tx, ours)
}

/// Transmit completions write nothing into read-only chains: with
/// IN_ORDER they are published in runs of one used entry (split) or
/// descriptor (packed) each, which testpmd's in-order clean-up walks.
#[test]
fn txonly_into_null() {
    for packed in ["", ",packed_vq=1"] {
        for in_order in [",in_order=1", ",in_order=0"] {
            let (_, tx, ours) = run(
                &["--backend", "null"],
                1,
                &format!("{packed}{in_order}"),
                &["--forward-mode=txonly"],
                "start",
            );
            assert!(tx > 10_000, "testpmd sent {tx}");
            assert_eq!(ours.tx, tx, "every packet testpmd sent was counted");
            assert_eq!((ours.drops, ours.errors), (0, 0));
            assert_eq!(ours.in_order, in_order.ends_with('1'), "{packed}{in_order}");
        }
    }
}

#[test]
fn txonly_into_loopback() {
    let (_, tx, ours) = run(
        &["--backend", "loopback"],
        1,
        "",
        &["--forward-mode=txonly"],
        "start",
    );
    assert!(tx > 10_000, "testpmd sent {tx}");
    assert_eq!(ours.tx, tx);
    // txonly never receives: the receive ring fills, the loopback queue
    // fills, the rest is dropped and counted.
    assert!(ours.rx > 0);
    assert!(ours.drops > 0);
    assert!(ours.rx + ours.drops <= ours.tx);
    assert!(ours.tx - (ours.rx + ours.drops) <= vhu_examples::net::LOOPBACK_FRAMES as u64);
}

#[test]
fn rxonly_from_null() {
    for packed in ["", ",packed_vq=1"] {
        let (rx, _, ours) = run(
            &["--backend", "null", "--frame-size", "60"],
            1,
            packed,
            &["--forward-mode=rxonly"],
            "start",
        );
        assert!(rx > 10_000, "testpmd received {rx}");
        // What we delivered and testpmd had not taken when it stopped is
        // at most a ring's worth.
        assert!(
            ours.rx >= rx && ours.rx - rx <= 1024,
            "ours {} theirs {rx}",
            ours.rx
        );
        assert_eq!(ours.errors, 0);
    }
}

/// `io` forwarding with a first burst: packets circulate testpmd → our TX
/// → loopback → our RX → testpmd, none lost; IN_ORDER acked or not as
/// asked.
fn io_loopback(pairs: usize, packed: bool, in_order: bool) {
    let mut vdev = String::new();
    if packed {
        vdev.push_str(",packed_vq=1");
    }
    vdev.push_str(if in_order {
        ",in_order=1"
    } else {
        ",in_order=0"
    });
    let queues = pairs.to_string();
    if pairs > 1 {
        vdev.push_str(&format!(",queues={pairs}"));
    }
    let rxq = format!("--rxq={pairs}");
    let txq = format!("--txq={pairs}");
    let (rx, tx, ours) = run(
        &["--backend", "loopback", "--queue-pairs", &queues],
        pairs,
        &vdev,
        &["--forward-mode=io", &rxq, &txq],
        "start tx_first",
    );
    assert!(tx > 1000 && rx > 1000, "testpmd RX {rx} TX {tx}");
    assert_eq!(ours.in_order, in_order, "IN_ORDER acked");
    assert_eq!(ours.drops, 0, "nothing lost in the loopback");
    assert_eq!(ours.errors, 0);
    assert_eq!(ours.tx, tx, "we took every packet testpmd sent");
    assert_eq!(ours.rx, ours.tx, "and gave every one back");
    // testpmd stops with its first bursts (32 per queue) still on the way.
    assert!(tx >= rx && tx - rx <= 32 * pairs as u64, "RX {rx} TX {tx}");
}

#[test]
fn io_through_loopback_split() {
    io_loopback(1, false, true);
}

#[test]
fn io_through_loopback_packed() {
    io_loopback(1, true, true);
}

#[test]
fn io_through_loopback_two_pairs() {
    io_loopback(2, false, true);
}

#[test]
fn io_through_loopback_two_pairs_packed() {
    io_loopback(2, true, true);
}

#[test]
fn io_through_loopback_without_in_order() {
    io_loopback(1, false, false);
    io_loopback(1, true, false);
}

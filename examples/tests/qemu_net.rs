//! A Linux guest under QEMU (TCG) with `virtio-net-pci` on our
//! `vhost-user-net` daemon.
//!
//! - Tap: the daemon attaches a tap in a network namespace the test
//!   creates (so the host's own networking is untouched), the host end is
//!   10.77.0.1/24, the guest's eth0 10.77.0.2/24. The guest pings the
//!   host, sends 4 MiB over TCP to a sink on the host and reads 4 MiB
//!   from a source there (offloads on: partial checksums, TSO both
//!   ways). QEMU offers `host_mtu=1400`, so it sends NET_SET_MTU (the
//!   daemon's `--mtu 1500` is the maximum); the guest's eth0 gets that
//!   MTU. A QMP `announce-self` makes QEMU send SEND_RARP (our daemon
//!   does not offer GUEST_ANNOUNCE), which the daemon writes to the tap.
//!   The host checks the daemon's per-queue counters (frames above the
//!   MTU both ways: TSO passes) and the tap's. With one queue pair, and
//!   with two on a multi-queue tap (two vCPUs).
//! - Loopback: the guest's frames come back to it; it sends three ARP
//!   requests and counts what it received. Again with the device's
//!   `in_order=on` (split, and packed): QEMU's offer to the guest (QMP
//!   `x-query-virtio-status`) has VIRTIO_F_IN_ORDER, and the daemon is
//!   told exactly what the guest accepted (its 6.1 kernel declines
//!   IN_ORDER, so bit 35 is negotiated only with a newer guest).
//!
//! The guest (a Debian cloud kernel and a busybox initramfs) is built and
//! cached by `tests/guest/build-guest.sh`, which also installs QEMU. The
//! tap test needs root (network namespaces, a tap) and `python3` for the
//! host's TCP ends.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::guest::{base64, guest, wait_for, Kill, Qmp};
use common::netns::Netns;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:12:34:56";
const TAP: &str = "vhutap0";
/// Bytes each way over TCP.
const BULK: usize = 4 << 20;

/// The host's TCP ends: a sink on port 5001 that prints the bytes it
/// got, and a source on port 5002 that sends `BULK` bytes.
const SERVERS: &str = r#"
import socket, sys, threading
def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.77.0.1", port))
    s.listen(1)
    return s
def sink(s):
    c, _ = s.accept()
    n = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        n += len(b)
    print("sink", n, flush=True)
def source(s, n):
    c, _ = s.accept()
    c.sendall(b"\x5a" * n)
    c.close()
    print("source", n, flush=True)
a, b = listen(5001), listen(5002)
threading.Thread(target=sink, args=(a,)).start()
threading.Thread(target=source, args=(b, int(sys.argv[1]))).start()
print("ready", flush=True)
"#;

/// A queue's line of the daemon's counters at disconnect: (packets,
/// bytes, drops, errors, largest frame).
fn counters(log: &str, queue: u16) -> Option<(u64, u64, u64, u64, u64)> {
    let dir = if queue % 2 == 0 { "rx" } else { "tx" };
    let prefix = format!("queue {queue} ({dir}): ");
    let line = log.lines().rev().find_map(|l| {
        let at = l.find(&prefix)?;
        Some(&l[at + prefix.len()..])
    })?;
    let n: Vec<u64> = line
        .split(", ")
        .filter_map(|f| f.split(' ').next()?.parse().ok())
        .collect();
    (n.len() == 5).then(|| (n[0], n[1], n[2], n[3], n[4]))
}

struct Run {
    console: String,
    daemon_log: String,
    /// What QMP `announce-self` answered.
    announced: Option<String>,
    /// What QMP `x-query-virtio-status` said of the net device then.
    virtio_status: Option<String>,
}

/// Boots the guest on the daemon listening at `sock` (logging to `log`);
/// the guest runs `script`. When the guest prints `VHU-NET: ANNOUNCE`
/// the host asks QEMU to announce the guest. Waits for the daemon's
/// counters after QEMU left.
fn boot(dir: &Path, sock: &Path, log: &Path, pairs: u16, device: &str, script: &str) -> Run {
    // One guest at a time: TCG guests on a loaded machine miss their
    // timers (and a kernel that checks the IO-APIC timer at boot panics,
    // hence `no_timer_check`).
    static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_GUEST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let g = guest();
    let qmp = dir.join("qmp.sock");
    let append = format!(
        "console=ttyS0 panic=-1 quiet no_timer_check vhu.timeout=200 vhu.test={}",
        base64(script.as_bytes())
    );
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-smp", &pairs.to_string()])
        .args(["-nographic", "-no-reboot"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args(["-append", &append])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .args([
            "-netdev",
            &format!("vhost-user,id=n0,chardev=c0,queues={pairs}"),
        ])
        .args([
            "-device",
            &if pairs > 1 {
                format!(
                    "virtio-net-pci,netdev=n0,mac={MAC},host_mtu=1400,mq=on,vectors={}{device}",
                    2 * pairs + 2
                )
            } else {
                format!("virtio-net-pci,netdev=n0,mac={MAC},host_mtu=1400{device}")
            },
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let out = qemu.stdout.take().unwrap();
    let mut qemu = Kill(qemu);
    let mut q = Qmp::connect(&qmp, &mut qemu.0);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut console = String::new();
    let mut announced = None;
    let mut virtio_status = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains("VHU-NET: ANNOUNCE") {
                    virtio_status = Some(query_virtio_net(&mut q));
                    announced = Some(q.cmd(
                        r#"{"execute":"announce-self","arguments":{"initial":50,"max":550,"rounds":2,"step":100}}"#,
                    ));
                }
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("guest timed out:\n{console}"),
        }
    }
    let status = qemu.0.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = qemu.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    // The daemon logs its counters when the front-end has gone.
    let t0 = Instant::now();
    let mut daemon_log = String::new();
    while t0.elapsed() < Duration::from_secs(20) {
        daemon_log = std::fs::read_to_string(log).unwrap_or_default();
        if counters(&daemon_log, 2 * pairs - 1).is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        status.success(),
        "qemu failed ({status}): {err}\n{console}\n{daemon_log}"
    );
    Run {
        console,
        daemon_log,
        announced,
        virtio_status,
    }
}

/// QMP `x-query-virtio-status` of the (one) virtio-net device.
fn query_virtio_net(q: &mut Qmp) -> String {
    let list = q.cmd(r#"{"execute":"x-query-virtio"}"#);
    let at = list
        .find("\"path\": \"")
        .unwrap_or_else(|| panic!("no virtio device: {list}"));
    let rest = &list[at + 9..];
    let path = &rest[..rest.find('"').unwrap()];
    q.cmd(&format!(
        r#"{{"execute":"x-query-virtio-status","arguments":{{"path":"{path}"}}}}"#
    ))
}

fn spawn_daemon(mut c: Command, sock: &Path, log: &Path, args: &[&str]) -> Kill {
    let log = std::fs::File::create(log).unwrap();
    let mut d = c
        .arg("--socket-path")
        .arg(sock)
        .args(["--mac", MAC, "--mtu", "1500", "--log-level", "info"])
        .args(args)
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start vhost-user-net");
    wait_for(sock, &mut d, "vhost-user-net");
    Kill(d)
}

fn show(run: &Run) {
    println!("--- guest console ---\n{}", run.console);
    println!("--- daemon log ---\n{}", run.daemon_log);
}

/// The marker line of the guest's console that starts with `prefix`.
fn marker<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console.lines().find_map(|l| l.strip_prefix(prefix))
}

#[test]
fn guest_pings_and_moves_tcp_through_a_tap() {
    tap_guest(1);
}

/// Two queue pairs: a multi-queue tap, one queue of it per pair; the
/// guest (two vCPUs) uses both pairs.
#[test]
fn guest_pings_and_moves_tcp_through_a_multi_queue_tap() {
    tap_guest(2);
}

fn tap_guest(pairs: u16) {
    let ns = Netns::new(&format!("tap{pairs}"));
    let dir = common::TempDir::new("qemu-net-tap");
    let sock = dir.0.join("net.sock");
    let log = dir.0.join("daemon.log");
    // The socket appears once the tap is attached.
    let daemon = spawn_daemon(
        ns.exec(env!("CARGO_BIN_EXE_vhost-user-net")),
        &sock,
        &log,
        &[
            "--backend",
            "tap",
            "--tap",
            TAP,
            "--queue-pairs",
            &pairs.to_string(),
        ],
    );
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", TAP]);
    ns.ip(&["link", "set", TAP, "up"]);
    let mut servers = ns
        .exec("python3")
        .args(["-c", SERVERS, &BULK.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3");
    let mut server_out = BufReader::new(servers.stdout.take().unwrap());
    let servers = Kill(servers);
    let mut ready = String::new();
    server_out.read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");

    let script = format!(
        "set -e\n\
         ip link set eth0 up\n\
         ip addr add 10.77.0.2/24 dev eth0\n\
         echo \"VHU-NET: MTU $(cat /sys/class/net/eth0/mtu)\"\n\
         echo \"VHU-NET: QUEUES $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')\"\n\
         ping -c 5 -W 5 10.77.0.1\n\
         dd if=/dev/zero bs=64k count={} 2>/dev/null | nc -w 3 10.77.0.1 5001 || true\n\
         got=$(nc -w 10 10.77.0.1 5002 </dev/null | wc -c)\n\
         echo \"VHU-NET: RECEIVED $got\"\n\
         test \"$got\" = {BULK}\n\
         echo \"VHU-NET: ANNOUNCE\"\n\
         sleep 3\n\
         cat /sys/class/net/eth0/statistics/rx_packets /sys/class/net/eth0/statistics/tx_packets\n",
        BULK / 65536
    );
    let run = boot(&dir.0, &sock, &log, pairs, "", &script);
    let tap_rx = ns.stat(TAP, "rx_packets");
    let tap_tx = ns.stat(TAP, "tx_packets");
    drop(daemon);
    drop(servers);
    let mut rest = String::new();
    let _ = server_out.read_to_string(&mut rest);
    show(&run);
    println!("--- host ---\nservers: {rest}tap {TAP}: rx_packets {tap_rx}, tx_packets {tap_tx}");

    assert!(
        run.console.contains("VHU-GUEST: RESULT PASS"),
        "guest test failed:\n{}\n--- daemon ---\n{}",
        run.console,
        run.daemon_log
    );
    // NET_SET_MTU: QEMU's host_mtu, at most the daemon's --mtu.
    assert_eq!(marker(&run.console, "VHU-NET: MTU "), Some("1400"));
    assert!(
        run.daemon_log
            .contains("NET_SET_MTU: the front-end advertises MTU 1400 (at most 1500)"),
        "{}",
        run.daemon_log
    );
    // The guest's offloads reached the tap: 12-byte headers, partial
    // checksums, TSO4, TSO6 and ECN (0xf).
    assert!(
        run.daemon_log
            .contains("tap vhutap0: virtio-net header 12 bytes, offloads 0xf"),
        "{}",
        run.daemon_log
    );
    // Every byte arrived both ways.
    assert!(rest.contains(&format!("sink {BULK}")), "{rest}");
    assert!(rest.contains(&format!("source {BULK}")), "{rest}");
    // SEND_RARP went out on the tap.
    let answer = run
        .announced
        .expect("the guest never asked for the announcement");
    assert!(answer.contains("\"return\""), "{answer}");
    assert!(
        run.daemon_log
            .contains(&format!("SEND_RARP: announced {MAC} on tap {TAP}")),
        "{}",
        run.daemon_log
    );
    // The guest has a queue of each kind per pair.
    let queues: String = (0..pairs)
        .map(|k| format!("rx-{k} "))
        .chain((0..pairs).map(|k| format!("tx-{k} ")))
        .collect();
    assert_eq!(
        marker(&run.console, "VHU-NET: QUEUES ").map(str::trim),
        Some(queues.trim())
    );
    // Our counters, summed over the pairs: the guest sent and received at
    // least the pings and the bulk data, with no errors and no drops.
    let (mut rx, mut rx_bytes, mut rx_drops, mut rx_errors) = (0, 0, 0, 0);
    let (mut tx, mut tx_bytes, mut tx_drops, mut tx_errors) = (0, 0, 0, 0);
    let (mut rx_largest, mut tx_largest) = (0, 0);
    for k in 0..pairs {
        let r = counters(&run.daemon_log, 2 * k).unwrap();
        let t = counters(&run.daemon_log, 2 * k + 1).unwrap();
        println!(
            "daemon: pair {k}: rx {} packets {} bytes (largest {}), tx {} packets {} bytes (largest {})",
            r.0, r.1, r.4, t.0, t.1, t.4
        );
        rx_largest = rx_largest.max(r.4);
        tx_largest = tx_largest.max(t.4);
        (rx, rx_bytes, rx_drops, rx_errors) =
            (rx + r.0, rx_bytes + r.1, rx_drops + r.2, rx_errors + r.3);
        (tx, tx_bytes, tx_drops, tx_errors) =
            (tx + t.0, tx_bytes + t.1, tx_drops + t.2, tx_errors + t.3);
    }
    assert!(rx >= 5 && rx_bytes >= BULK as u64, "rx {rx} / {rx_bytes}");
    assert!(tx >= 5 && tx_bytes >= BULK as u64, "tx {tx} / {tx_bytes}");
    assert_eq!((rx_drops, rx_errors, tx_drops, tx_errors), (0, 0, 0, 0));
    // Segmentation offloads at work both ways: frames longer than the
    // 1400-byte MTU allows (1414 with the Ethernet header) went from the
    // guest to the tap (HOST_TSO) and from the tap to the guest
    // (GUEST_TSO, TUNSETOFFLOAD).
    assert!(
        tx_largest > 1414,
        "no TSO frame from the guest: {tx_largest}"
    );
    assert!(rx_largest > 1414, "no TSO frame to the guest: {rx_largest}");
    // The host's side of the tap saw what we wrote (the guest's frames
    // and the RARPs) and what we read.
    assert!(tap_rx >= tx, "tap rx {tap_rx} < our tx {tx}");
    assert!(tap_tx >= rx, "tap tx {tap_tx} < our rx {rx}");
}

#[test]
fn guest_receives_its_own_frames_through_loopback() {
    let run = loopback_guest("");
    // One per round of the announcement (two asked for); at least one.
    let rarps: u64 = run
        .daemon_log
        .lines()
        .find_map(|l| {
            l.split("SEND_RARP: ")
                .nth(1)?
                .strip_suffix(" received")?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    println!("daemon: {rarps} SEND_RARP");
    assert!(rarps >= 1, "{}", run.daemon_log);
}

/// The virtio features the daemon logged as acked last.
fn acked_features(log: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.split("front-end acked virtio features 0x").nth(1))
        .unwrap_or_else(|| panic!("no acked features: {log}"));
    let hex = line.split(' ').next().unwrap();
    u64::from_str_radix(hex, 16).unwrap()
}

/// VIRTIO_F_IN_ORDER.
const IN_ORDER: u64 = 1 << 35;
/// VIRTIO_F_RING_PACKED.
const RING_PACKED: u64 = 1 << 34;

/// The feature names of object `key` of QMP `x-query-virtio-status`
/// (`{"dev-features": [...], "transports": [...]}`, no braces inside).
fn qmp_features<'a>(status: &'a str, key: &str) -> &'a str {
    let at = status
        .find(&format!("\"{key}\": {{"))
        .unwrap_or_else(|| panic!("no {key}: {status}"));
    let rest = &status[at..];
    &rest[..rest.find('}').unwrap()]
}

/// QEMU's device with `in_order=on` (and `packed=on` if `packed`) on our
/// daemon: the exchange works, and VIRTIO_F_IN_ORDER reaches the guest's
/// offer (the daemon offers it, QEMU passes it on). The guest's kernel
/// (6.1) does not implement IN_ORDER and declines it; whatever it
/// accepts is what the daemon was told (bit 35 included, with a guest
/// that takes it).
fn in_order_guest(packed: bool) {
    let run = loopback_guest(if packed {
        ",in_order=on,packed=on"
    } else {
        ",in_order=on"
    });
    let acked = acked_features(&run.daemon_log);
    let status = run.virtio_status.as_deref().expect("no virtio status");
    let offered = qmp_features(status, "host-features");
    let accepted = qmp_features(status, "guest-features");
    println!("daemon: acked {acked:#x}\noffered: {offered}\naccepted: {accepted}");
    assert!(offered.contains("VIRTIO_F_IN_ORDER"), "{status}");
    assert_eq!(
        acked & IN_ORDER != 0,
        accepted.contains("VIRTIO_F_IN_ORDER"),
        "{acked:#x}: {status}"
    );
    assert_eq!(acked & RING_PACKED != 0, packed, "{acked:#x}");
    assert_eq!(
        accepted.contains("VIRTIO_F_RING_PACKED"),
        packed,
        "{status}"
    );
}

#[test]
fn guest_loopback_with_in_order_split() {
    in_order_guest(false);
}

#[test]
fn guest_loopback_with_in_order_packed() {
    in_order_guest(true);
}

/// The guest on the loopback with `device` appended to its device's
/// properties: it sends three ARP requests and receives them back.
fn loopback_guest(device: &str) -> Run {
    let dir = common::TempDir::new("qemu-net-loop");
    let sock = dir.0.join("net.sock");
    let log = dir.0.join("daemon.log");
    let daemon = spawn_daemon(
        Command::new(env!("CARGO_BIN_EXE_vhost-user-net")),
        &sock,
        &log,
        &["--backend", "loopback"],
    );
    let script = "set -e\n\
         ip link set eth0 up\n\
         ip addr add 10.78.0.2/24 dev eth0\n\
         rx0=$(cat /sys/class/net/eth0/statistics/rx_packets)\n\
         arping -c 3 -w 5 -I eth0 10.78.0.1 || true\n\
         rx=$(cat /sys/class/net/eth0/statistics/rx_packets)\n\
         tx=$(cat /sys/class/net/eth0/statistics/tx_packets)\n\
         echo \"VHU-NET: LOOPBACK tx=$tx rx=$rx before=$rx0\"\n\
         test $((rx - rx0)) -ge 3\n\
         echo \"VHU-NET: ANNOUNCE\"\n\
         sleep 3\n";
    let run = boot(&dir.0, &sock, &log, 1, device, script);
    drop(daemon);
    show(&run);
    assert!(
        run.console.contains("VHU-GUEST: RESULT PASS"),
        "guest test failed:\n{}\n--- daemon ---\n{}",
        run.console,
        run.daemon_log
    );
    let (rx, _, _, rx_errors, _) = counters(&run.daemon_log, 0).unwrap();
    let (tx, _, _, tx_errors, _) = counters(&run.daemon_log, 1).unwrap();
    println!("daemon: rx {rx} packets, tx {tx} packets");
    assert!(rx >= 3 && tx >= rx, "rx {rx}, tx {tx}");
    assert_eq!((rx_errors, tx_errors), (0, 0));
    // SEND_RARP is counted (there is no network to announce on).
    assert!(
        run.daemon_log.contains(&format!(
            "SEND_RARP: {MAC} (counted: no network to announce it on)"
        )),
        "{}",
        run.daemon_log
    );
    run
}

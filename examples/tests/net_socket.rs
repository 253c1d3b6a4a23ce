//! virtio-net's two protocol messages against the `vhost-user-net`
//! daemon over its socket: NET_SET_MTU (acked up to `--mtu`, refused
//! above it, outside 68..=65535, and when MTU was not offered; with a
//! tap, the tap's MTU follows or the request is refused) and SEND_RARP
//! (counted with the loopback; with a tap, the gratuitous RARP as bytes
//! on the host's side of the tap). Then the tap backend's data path
//! driven by our front-end engine: frames the host sends before the
//! receive ring runs wait in the tap, and transmit headers that are
//! nonsense or not negotiated are refused before they reach it.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::guest::{wait_for, Kill};
use common::netns::Netns;
use common::{front, handshake, recv_reply, send, u64_of, TempDir};

use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vhost_user_core::device::net::NetFeatures;
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{FrontendReq, Request};
use vhost_user_linux::frontend::FrontendLink;
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_linux::sys::socket::Stream;
use vhost_user_test::driver::{Buf, SplitDriver, Used};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn daemon(mut c: Command, dir: &Path, args: &[&str]) -> Kill {
    let sock = dir.join("net.sock");
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut d = c
        .arg("--socket-path")
        .arg(&sock)
        .args(["--log-level", "info"])
        .args(args)
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start vhost-user-net");
    wait_for(&sock, &mut d, "vhost-user-net");
    Kill(d)
}

/// Connects; the socket file appears at bind, a moment before listen.
fn connect(dir: &Path) -> Stream {
    let t0 = Instant::now();
    loop {
        match Stream::connect(dir.join("net.sock")) {
            Ok(s) => return s,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(5), "connect: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Sends `req` with NEED_REPLY; the ack's value.
fn ack(s: &Stream, req: &Request<'_>) -> u64 {
    send(s, req, true, &[]);
    u64_of(req.code(), &recv_reply(s, req.code()).unwrap())
}

/// The daemon's log once it has `text` (at most 5 s).
fn log_with(dir: &Path, text: &str) -> String {
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
        if log.contains(text) || t0.elapsed() > Duration::from_secs(5) {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn net_set_mtu_and_send_rarp_over_the_socket() {
    let dir = TempDir::new("net-socket");
    let _d = daemon(
        Command::new(env!("CARGO_BIN_EXE_vhost-user-net")),
        &dir.0,
        &["--backend", "loopback", "--mtu", "1500"],
    );
    let s = connect(&dir.0);
    let p = P::from_bits_retain(handshake(&s));
    assert!(p.contains(P::RARP | P::MTU | P::REPLY_ACK), "{p:?}");

    assert_eq!(ack(&s, &Request::NetSetMtu(1400)), 0);
    assert_eq!(ack(&s, &Request::NetSetMtu(1500)), 0);
    // Above --mtu, below 68, above 65535: failed acks, the connection
    // goes on.
    for mtu in [1501, 67, 65536] {
        assert_ne!(ack(&s, &Request::NetSetMtu(mtu)), 0, "{mtu}");
    }
    // SEND_RARP as QEMU sends it, without NEED_REPLY: no reply; the next
    // request is answered.
    send(&s, &Request::SendRarp(MAC), false, &[]);
    assert_eq!(ack(&s, &Request::SendRarp(MAC)), 0);
    let log = log_with(&dir.0, "SEND_RARP: 52:54:00:12:34:56 (counted");
    assert!(
        log.contains("NET_SET_MTU: the front-end advertises MTU 1400 (at most 1500)"),
        "{log}"
    );
    assert!(log.contains("NET_SET_MTU 1501 refused"), "{log}");
    // The session refused these itself: the device never heard of them.
    assert!(
        !log.contains("NET_SET_MTU 67") && !log.contains("NET_SET_MTU 65536"),
        "{log}"
    );
    assert_eq!(
        log.matches("SEND_RARP: 52:54:00:12:34:56 (counted").count(),
        2,
        "{log}"
    );
    drop(s);
    let log = log_with(&dir.0, "SEND_RARP: 2 received");
    assert!(log.contains("SEND_RARP: 2 received"), "{log}");
}

#[test]
fn net_set_mtu_is_not_offered_without_an_mtu() {
    let dir = TempDir::new("net-socket-nomtu");
    let _d = daemon(
        Command::new(env!("CARGO_BIN_EXE_vhost-user-net")),
        &dir.0,
        &["--backend", "null"],
    );
    let s = connect(&dir.0);
    let p = P::from_bits_retain(handshake(&s));
    assert!(p.contains(P::RARP) && !p.contains(P::MTU), "{p:?}");
    assert_ne!(ack(&s, &Request::NetSetMtu(1500)), 0);
    // Still served.
    send(&s, &Request::GetFeatures, false, &[]);
    assert!(recv_reply(&s, FrontendReq::GetFeatures).is_some());
}

/// The host's side of the tap receives the RARP our daemon writes: a
/// packet socket on the tap prints the first RARP frame it sees.
const CAPTURE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
s.bind((sys.argv[1], 0))
s.settimeout(20)
print("ready", flush=True)
print(s.recv(2048).hex(), flush=True)
"#;

#[test]
fn send_rarp_puts_a_gratuitous_rarp_on_the_tap() {
    let ns = Netns::new("rarp");
    let dir = TempDir::new("net-socket-tap");
    let _d = daemon(
        ns.exec(env!("CARGO_BIN_EXE_vhost-user-net")),
        &dir.0,
        &["--backend", "tap", "--tap", "vhutap1"],
    );
    // A tap that is down drops what is written to it.
    ns.ip(&["link", "set", "vhutap1", "up"]);
    let mut cap = ns
        .exec("python3")
        .args(["-c", CAPTURE, "vhutap1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut out = BufReader::new(cap.stdout.take().unwrap());
    let _cap = Kill(cap);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let s = connect(&dir.0);
    handshake(&s);
    assert_eq!(ack(&s, &Request::SendRarp(MAC)), 0);
    line.clear();
    out.read_line(&mut line).unwrap();
    let mac = "525400123456";
    let want = format!(
        "ffffffffffff{mac}8035\
         0001080006040003{mac}00000000{mac}00000000{}",
        "00".repeat(18)
    );
    assert_eq!(line.trim(), want);
    let log = log_with(&dir.0, "SEND_RARP: announced");
    assert!(
        log.contains("SEND_RARP: announced 52:54:00:12:34:56 on tap vhutap1"),
        "{log}"
    );
}

/// What the daemon printed when it refused to start, after checking it
/// exited with a failure and left no socket behind.
fn refused_start(mut c: Command, dir: &Path, args: &[&str]) -> String {
    let sock = dir.join("refused.sock");
    let out = c
        .arg("--socket-path")
        .arg(&sock)
        .args(args)
        .output()
        .expect("run vhost-user-net");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} started: {err}");
    assert!(!sock.exists(), "{args:?} left its socket");
    err
}

#[test]
fn tap_startup_errors_are_clean() {
    let bin = env!("CARGO_BIN_EXE_vhost-user-net");
    let ns = Netns::new("taperr");
    let dir = TempDir::new("net-tap-errors");
    // A persistent single-queue tap cannot serve two queue pairs.
    ns.ip(&["tuntap", "add", "dev", "vhutap2", "mode", "tap"]);
    let err = refused_start(
        ns.exec(bin),
        &dir.0,
        &["--backend", "tap", "--tap", "vhutap2", "--queue-pairs", "2"],
    );
    assert!(
        err.contains("several queue pairs need a multi_queue tap"),
        "{err}"
    );
    let err = refused_start(Command::new(bin), &dir.0, &["--backend", "tap"]);
    assert!(err.contains("--backend tap needs --tap NAME"), "{err}");
    let err = refused_start(
        Command::new(bin),
        &dir.0,
        &["--backend", "tap", "--tap", "a-name-too-long-for-linux"],
    );
    assert!(err.contains("invalid interface name"), "{err}");
    // Without CAP_NET_ADMIN a tap cannot be made (as `nobody`, running a
    // copy of the daemon where `nobody` may execute it).
    let copy = dir.0.join("vhost-user-net");
    std::fs::copy(bin, &copy).unwrap();
    let mut c = ns.exec("setpriv");
    c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&copy);
    let err = refused_start(c, &dir.0, &["--backend", "tap", "--tap", "vhutap3"]);
    assert!(
        err.contains("no permission to attach to tap \"vhutap3\""),
        "{err}"
    );
}

/// The tap's MTU, as the namespace's sysfs shows it.
fn tap_mtu(ns: &Netns, dev: &str) -> u32 {
    let out = ns
        .exec("cat")
        .arg(format!("/sys/class/net/{dev}/mtu"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn net_set_mtu_sets_the_taps_mtu() {
    let ns = Netns::new("mtu");
    let dir = TempDir::new("net-socket-mtu");
    let _d = daemon(
        ns.exec(env!("CARGO_BIN_EXE_vhost-user-net")),
        &dir.0,
        &["--backend", "tap", "--tap", "vhutap6", "--mtu", "65535"],
    );
    let s = connect(&dir.0);
    let p = handshake(&s);
    assert_eq!(tap_mtu(&ns, "vhutap6"), 1500);
    assert_eq!(ack(&s, &Request::NetSetMtu(1400)), 0);
    assert_eq!(tap_mtu(&ns, "vhutap6"), 1400);
    assert_eq!(ack(&s, &Request::NetSetMtu(9000)), 0);
    assert_eq!(tap_mtu(&ns, "vhutap6"), 9000);
    // Within --mtu but above what a tap carries (65521): refused, the
    // tap keeps its MTU, and the connection goes on.
    assert_ne!(ack(&s, &Request::NetSetMtu(65530)), 0);
    assert_eq!(tap_mtu(&ns, "vhutap6"), 9000);
    assert_eq!(ack(&s, &Request::NetSetMtu(1400)), 0);
    assert_eq!(tap_mtu(&ns, "vhutap6"), 1400);
    let log = log_with(&dir.0, "NET_SET_MTU 65530 refused");
    assert!(
        log.contains("NET_SET_MTU 65530 refused: cannot set tap vhutap6's MTU"),
        "{log}"
    );
    assert!(
        log.contains("NET_SET_MTU: tap vhutap6 MTU set to 9000"),
        "{log}"
    );
    // A device reset puts the tap's MTU back as it found it (1500), and
    // so does a disconnect: the next front-end, or none, finds the tap as
    // the operator left it.
    assert!(P::from_bits_retain(p).contains(P::RESET_DEVICE));
    assert_eq!(ack(&s, &Request::ResetDevice), 0);
    assert_eq!(tap_mtu(&ns, "vhutap6"), 1500);
    handshake(&s);
    assert_eq!(ack(&s, &Request::NetSetMtu(9000)), 0);
    assert_eq!(tap_mtu(&ns, "vhutap6"), 9000);
    drop(s);
    let t0 = Instant::now();
    while tap_mtu(&ns, "vhutap6") != 1500 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "tap MTU {} 5 s after the disconnect",
            tap_mtu(&ns, "vhutap6")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = log_with(&dir.0, "tap vhutap6 MTU put back to 1500");
    assert_eq!(
        log.matches("tap vhutap6 MTU put back to 1500").count(),
        2,
        "{log}"
    );
}

const MIB: u64 = 1 << 20;
const VA: u64 = 0x7f00_0000_0000;
const RING: u16 = 64;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
/// The VERSION_1 header.
const HDR: usize = 12;

/// Our front-end engine on one queue pair of the daemon at `dir`, both
/// rings split and started, with `features` wanted.
struct Front {
    link: FrontendLink<2, 1>,
    mem: LinuxGuestMemory,
    rx: SplitDriver,
    tx: SplitDriver,
}

impl Front {
    fn start(dir: &Path, features: V) -> Front {
        let (mem, region, fd) = front::guest_ram("net-socket", 4 * MIB, VA);
        let fds: Vec<OwnedFd> = vec![fd];
        let mut cfg: FrontendConfig<2, 1> = FrontendConfig::new(features, P::MQ | P::REPLY_ACK);
        let _ = cfg.regions.push(region);
        let mut rings = Vec::new();
        for q in 0..2u64 {
            let r = SplitDriver::new(&mem, RING, 0x1000 + 0x8000 * q, false).unwrap();
            let a = r.addrs();
            let _ = cfg.queues.push(front::queue(RING, a, VA, 0));
            rings.push(r);
        }
        let link = front::start(&dir.join("net.sock"), cfg, fds);
        let tx = rings.pop().unwrap();
        let rx = rings.pop().unwrap();
        Front { link, mem, rx, tx }
    }

    /// Transmits one chain of these bytes; waits until it is used.
    fn transmit(&mut self, at: u64, bytes: &[u8]) {
        self.mem.write(TX_BUFS + at, bytes).unwrap();
        self.tx
            .post(
                &self.mem,
                &[Buf::readable(TX_BUFS + at, bytes.len() as u32)],
            )
            .unwrap();
        assert!(self.link.kick(1));
        let used = wait_used(&mut self.tx, &self.mem, 1);
        assert_eq!(used[0].len, 0);
    }
}

/// Waits until `ring` has given back `n` more used entries (at most 10 s).
fn wait_used(ring: &mut SplitDriver, mem: &LinuxGuestMemory, n: usize) -> Vec<Used> {
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < n {
        got.extend(ring.harvest_all(mem).unwrap());
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} of {n} used entries",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

/// A 60-byte broadcast frame of EtherType 0x88b5 whose payload is `i`s.
fn test_frame(i: u8) -> Vec<u8> {
    let mut f = vec![i; 60];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// Sends `argv[2]` frames `test_frame(0..)` into the tap `argv[1]` from
/// the host's side.
const INJECT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for i in range(int(sys.argv[2])):
    s.send(b"\xff" * 6 + bytes.fromhex("525400000002") + b"\x88\xb5" + bytes([i]) * 46)
"#;

/// A namespace without IPv6 (whose link-up chatter would reach the
/// guest), a daemon on tap `tap` in it, the tap up.
fn tap_daemon(tag: &str, tap: &str) -> (Netns, TempDir, Kill) {
    let ns = Netns::new(tag);
    for k in ["all", "default"] {
        common::netns::run(
            ns.exec("sysctl")
                .args(["-qw", &format!("net.ipv6.conf.{k}.disable_ipv6=1")]),
        );
    }
    let dir = TempDir::new(tag);
    let d = daemon(
        ns.exec(env!("CARGO_BIN_EXE_vhost-user-net")),
        &dir.0,
        &["--backend", "tap", "--tap", tap, "--no-mrg-rxbuf"],
    );
    ns.ip(&["link", "set", tap, "up"]);
    (ns, dir, d)
}

/// The counters line the daemon logs for `queue` when the front-end
/// leaves.
fn counters_line(dir: &Path, queue: u16) -> String {
    let want = format!("queue {queue} (");
    let log = log_with(dir, &want);
    log.lines()
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("no counters of queue {queue}: {log}"))
        .to_owned()
}

#[test]
fn tap_frames_wait_in_the_tap_until_the_receive_ring_runs() {
    let (ns, dir, _d) = tap_daemon("tapwait", "vhutap7");
    // Five frames from the host before any front-end is there: the tap
    // queues them (its reader must not take them, to lose them when the
    // driver's features reset the header length).
    common::netns::run(ns.exec("python3").args(["-c", INJECT, "vhutap7", "5"]));
    // Time for a reader that reads regardless to have done so.
    std::thread::sleep(Duration::from_millis(300));

    let mut f = Front::start(&dir.0, V::VERSION_1 | V::PROTOCOL_FEATURES);
    let ids: Vec<u16> = (0..8u64)
        .map(|i| {
            f.rx.post(&f.mem, &[Buf::writable(RX_BUFS + 0x800 * i, 0x800)])
                .unwrap()
        })
        .collect();
    assert!(f.link.kick(0));
    let got = wait_used(&mut f.rx, &f.mem, 5);
    for (i, u) in got.iter().enumerate() {
        assert_eq!((u.id, u.len as usize), (ids[i], HDR + 60), "frame {i}");
        let mut b = vec![0u8; 60];
        f.mem
            .read(RX_BUFS + 0x800 * i as u64 + HDR as u64, &mut b)
            .unwrap();
        assert_eq!(b, test_frame(i as u8), "frame {i}");
    }
    // The tap counts a frame sent when its reader takes it.
    assert_eq!(ns.stat("vhutap7", "tx_packets"), 5);
    assert_eq!(ns.stat("vhutap7", "tx_dropped"), 0);
    drop(f);
    let rx = counters_line(&dir.0, 0);
    assert!(
        rx.contains("5 packets, 300 bytes, 0 drops, 0 errors"),
        "{rx}"
    );
}

#[test]
fn hostile_transmit_headers_do_not_reach_the_tap() {
    let (ns, dir, _d) = tap_daemon("taphdr", "vhutap8");
    // Partial checksums and TCPv6 segmentation; not TCPv4's.
    let offloads = NetFeatures::CSUM | NetFeatures::HOST_TSO6;
    let mut f = Front::start(
        &dir.0,
        V::VERSION_1 | V::PROTOCOL_FEATURES | offloads.to_virtio(),
    );
    let acked = NetFeatures::from_virtio(f.link.engine().features());
    assert!(
        acked.contains(offloads) && !acked.contains(NetFeatures::HOST_TSO4),
        "{acked:?}"
    );
    // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
    let hdr = |v: [u16; 6]| {
        let mut h = vec![v[0] as u8, v[1] as u8];
        for x in &v[2..] {
            h.extend_from_slice(&x.to_le_bytes());
        }
        h.extend_from_slice(&[0, 0]);
        h
    };
    // A TCP/IPv4 or v6 frame as far as the offsets go: 60 bytes.
    let cases: &[(&str, Vec<u8>)] = &[
        ("unknown gso_type", hdr([1, 2, 54, 1448, 34, 16])),
        (
            "ECN without a segmentation type",
            hdr([0, 0x80, 0, 0, 0, 0]),
        ),
        ("hdr_len beyond the frame", hdr([0, 0, 61, 0, 0, 0])),
        ("csum_start beyond the frame", hdr([1, 0, 0, 0, 70, 0])),
        ("csum_offset past the end", hdr([1, 0, 0, 0, 34, 25])),
        ("gso with gso_size 0", hdr([1, 4, 54, 0, 54, 16])),
        ("gso without NEEDS_CSUM", hdr([0, 4, 54, 1428, 0, 0])),
        ("TSO4, not negotiated", hdr([1, 1, 54, 1448, 34, 16])),
        ("DATA_VALID from the driver", hdr([2, 0, 0, 0, 0, 0])),
    ];
    let good = {
        let mut g = hdr([0; 6]);
        g.extend_from_slice(&test_frame(0xaa));
        g
    };
    let rx0 = ns.stat("vhutap8", "rx_packets");
    for (i, (what, h)) in cases.iter().enumerate() {
        let mut chain = h.clone();
        chain.extend_from_slice(&test_frame(i as u8));
        f.transmit(0x1000 * i as u64, &chain);
        f.transmit(0x1000 * i as u64 + 0x800, &good);
        assert_eq!(
            ns.stat("vhutap8", "rx_packets"),
            rx0 + i as u64 + 1,
            "after {what}"
        );
    }
    // A chain shorter than the negotiated header (8 of 12 bytes).
    f.transmit(0x10_0000, &good[..8]);
    f.transmit(0x10_0800, &good);
    let n = cases.len() as u64 + 1;
    assert_eq!(ns.stat("vhutap8", "rx_packets"), rx0 + n);
    assert_eq!(ns.stat("vhutap8", "rx_errors"), 0);
    drop(f);
    let tx = counters_line(&dir.0, 1);
    assert!(
        tx.contains(&format!(
            "{n} packets, {} bytes, 0 drops, {n} errors",
            60 * n
        )),
        "{tx}"
    );
}

#[test]
fn a_front_end_that_trickles_a_message_is_left_after_message_timeout_ms() {
    let dir = TempDir::new("net-trickle");
    let bin = env!("CARGO_BIN_EXE_vhost-user-net");
    let args = ["--backend", "null", "--message-timeout-ms"];
    let d = daemon(Command::new(bin), &dir.0, &[&args[..], &["300"]].concat());
    assert!(
        common::trickled_out(&dir.0.join("net.sock"), Duration::from_secs(3)),
        "still connected: {}",
        log_with(&dir.0, "too slow")
    );
    assert!(log_with(&dir.0, "too slow").contains("too slow"));
    // The daemon goes on: the next front-end is served.
    let s = connect(&dir.0);
    assert!(handshake(&s) != 0);
    drop((s, d));
    // With no limit the same front-end stays connected.
    let dir = TempDir::new("net-trickle-0");
    let _d = daemon(Command::new(bin), &dir.0, &[&args[..], &["0"]].concat());
    assert!(!common::trickled_out(
        &dir.0.join("net.sock"),
        Duration::from_millis(1200)
    ));
}

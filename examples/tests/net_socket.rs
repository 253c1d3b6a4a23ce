//! virtio-net's two protocol messages against the `vhost-user-net`
//! daemon over its socket: NET_SET_MTU (acked up to `--mtu`, refused
//! above it, outside 68..=65535, and when MTU was not offered; with a
//! tap, the tap's MTU follows or the request is refused) and SEND_RARP
//! (counted with the loopback; with a tap, the gratuitous RARP as bytes
//! on the host's side of the tap).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::guest::{wait_for, Kill};
use common::netns::Netns;
use common::{handshake, recv_reply, send, u64_of, TempDir};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vhost_user_core::feature::ProtocolFeatures as P;
use vhost_user_core::message::{FrontendReq, Request};
use vhost_user_linux::sys::socket::Stream;

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
    handshake(&s);
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
}

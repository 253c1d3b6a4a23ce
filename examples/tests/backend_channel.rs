//! The back-end channel over real sockets: the `vhost-user-blk` daemon
//! announces a grown image with BACKEND_CONFIG_CHANGE_MSG (on SIGHUP, or by
//! itself with `--watch`) and our front-end link reads the new capacity; a
//! front-end that never acks loses its connection, and the daemon serves the
//! next one. The C back-end `examples/c/blk.c` announces a grown image on
//! SIGHUP the same way (its `vhu_channel`).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{handshake, recv_reply, send, u64_of, CBlk, Daemon, TempDir};
use vhost_user_core::feature::ProtocolFeatures as P;
use vhost_user_core::frontend::{Event, FrontendConfig};
use vhost_user_core::message::{FrontendReq, Request, HEADER_SIZE, MAX_MESSAGE};
use vhost_user_linux::frontend::FrontendLink;
use vhost_user_linux::sys::socket::Stream;

const MIB: u64 = 1 << 20;

fn sighup(d: &Daemon) {
    hup(d.child.id());
}

fn hup(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// A probe-like link that also serves the back-end channel.
fn link(d: &Daemon) -> FrontendLink<1, 1> {
    // The socket file appears at bind, a moment before the daemon listens.
    drop(d.connect());
    link_at(&d.sock)
}

fn link_at(sock: &std::path::Path) -> FrontendLink<1, 1> {
    let mut cfg: FrontendConfig<1, 1> = FrontendConfig::probe();
    cfg.protocol_features |= P::BACKEND_REQ;
    let mut l = FrontendLink::connect(sock, cfg, Vec::new(), Vec::new(), Vec::new()).unwrap();
    l.drive().unwrap();
    assert!(l
        .engine()
        .protocol_features()
        .contains(P::BACKEND_REQ | P::CONFIG));
    l
}

/// The capacity (sectors) in the config space, read with GET_CONFIG.
fn capacity(l: &mut FrontendLink<1, 1>) -> u64 {
    l.engine().read_config(0, 8).unwrap();
    l.drive().unwrap();
    for e in l.take_events() {
        if let Event::Config { data, .. } = e {
            return u64::from_le_bytes(data[..8].try_into().unwrap());
        }
    }
    panic!("no config read")
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn grown_image_is_announced(watch: bool) {
    let dir = TempDir::new("channel");
    let (path, file) = dir.image(MIB);
    let mut args = vec!["--blk-file", path.to_str().unwrap()];
    if watch {
        args.push("--watch");
    }
    let d = Daemon::start_with(&args);
    let mut l = link(&d);
    assert_eq!(capacity(&mut l), MIB / 512);
    let counters = l.channel_counters().unwrap();

    file.set_len(3 * MIB).unwrap();
    if !watch {
        sighup(&d);
    }
    wait_for("the config change reaches the front-end", || {
        counters
            .config_changes
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    });
    assert_eq!(capacity(&mut l), 3 * MIB / 512);
    // The daemon got the ack and says so.
    wait_for("the daemon logs the ack", || {
        d.log().contains("front-end told of the new capacity")
    });
    // Nothing changed: no second message.
    if !watch {
        sighup(&d);
    }
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        counters
            .config_changes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn the_c_backend_announces_a_grown_image_on_sighup() {
    let b = CBlk::start(1);
    let mut l = link_at(&b.sock);
    assert_eq!(capacity(&mut l), 32 * MIB / 512);
    let counters = l.channel_counters().unwrap();
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(b.dir.join("disk.img"))
        .unwrap();
    image.set_len(48 * MIB).unwrap();
    hup(b.child.id());
    wait_for("the config change reaches the front-end", || {
        counters
            .config_changes
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    });
    assert_eq!(capacity(&mut l), 48 * MIB / 512);
    wait_for("the back-end logs the ack", || {
        b.log().contains("front-end told of the new capacity")
    });
    // The same size again: nothing to tell.
    hup(b.child.id());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        counters
            .config_changes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        b.log().contains("image resized: 50331648 bytes"),
        "{}",
        b.log()
    );
}

#[test]
fn a_grown_image_is_announced_on_sighup() {
    grown_image_is_announced(false);
}

#[test]
fn a_grown_image_is_announced_with_watch() {
    grown_image_is_announced(true);
}

#[test]
fn a_front_end_that_never_acks_loses_its_connection_not_the_daemon() {
    let dir = TempDir::new("noack");
    let (path, file) = dir.image(MIB);
    let d = Daemon::start_with(&[
        "--blk-file",
        path.to_str().unwrap(),
        "--channel-timeout-ms",
        "300",
    ]);
    let s = d.connect();
    let p = handshake(&s);
    assert!(p & (P::BACKEND_REQ | P::REPLY_ACK | P::CONFIG).bits() != 0);
    let (ours, theirs) = Stream::pair().unwrap();
    use std::os::fd::AsFd;
    send(&s, &Request::SetBackendReqFd, true, &[theirs.as_fd()]);
    let ack = recv_reply(&s, FrontendReq::SetBackendReqFd).unwrap();
    assert_eq!(u64_of(FrontendReq::SetBackendReqFd, &ack), 0);
    drop(theirs);

    file.set_len(2 * MIB).unwrap();
    sighup(&d);
    // The request arrives, asking for an ack that never comes.
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let rx = ours.recv_message(&mut buf).unwrap().unwrap();
    assert_eq!(rx.header.request, 2, "BACKEND_CONFIG_CHANGE_MSG");
    assert!(rx.header.need_reply());
    assert_eq!(rx.header.size as usize, 0);
    let _ = &buf[..HEADER_SIZE];
    // The daemon ends this connection after its timeout...
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t0 = Instant::now();
    assert!(matches!(s.recv_message(&mut buf), Ok(None) | Err(_)));
    assert!(t0.elapsed() < Duration::from_secs(4));
    assert!(d.log().contains("no ack in time"), "{}", d.log());
    // ...and serves the next front-end, which sees the new size.
    let mut l = link(&d);
    assert_eq!(capacity(&mut l), 2 * MIB / 512);
}

/// [`common::trickled_out`] against the daemon with
/// `--message-timeout-ms limit_ms`.
fn trickler_is_left(limit_ms: &str, within: Duration) -> (bool, Daemon) {
    let d = Daemon::start_with(&["--size", "1M", "--message-timeout-ms", limit_ms]);
    drop(d.connect()); // Listening.
    (common::trickled_out(&d.sock, within), d)
}

#[test]
fn a_front_end_that_trickles_a_message_is_left_after_message_timeout_ms() {
    let (left, d) = trickler_is_left("300", Duration::from_secs(3));
    assert!(left, "still connected: {}", d.log());
    assert!(d.log().contains("too slow"), "{}", d.log());
    // The daemon goes on: the next front-end is served.
    let s = d.connect();
    assert!(handshake(&s) != 0);
    // With no limit the same front-end stays connected.
    let (left, d) = trickler_is_left("0", Duration::from_millis(1200));
    assert!(!left, "{}", d.log());
}

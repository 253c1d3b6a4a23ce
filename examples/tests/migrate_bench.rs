//! Live migration between two `vhost-user-blk` daemons under load, as
//! `vhu` does it: the front-end link saves the device state into a pipe
//! and loads it (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE), and `vhu bench
//! --migrate-every --to` moves a verified load between two daemons on one
//! image, twenty times and more, stopping with GET_VRING_BASE_INFLIGHT
//! (bit 20) or with message 45: every request completes exactly once, the
//! requests suspended in flight resubmitted by the destination; each
//! source logs the pages it dirtied (SET_LOG_BASE, VHOST_F_LOG_ALL,
//! VHOST_VRING_F_LOG) and `vhu` reads and checks the bitmap at the switch.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Daemon, TempDir};
use vhost_user_core::device::blk::state as blk_state;
use vhost_user_core::feature::ProtocolFeatures as P;
use vhost_user_core::frontend::{FrontendConfig, FrontendError, State};
use vhost_user_core::message::FrontendReq;
use vhost_user_linux::frontend::{FrontendLink, LinkError};

/// A link that negotiated what the daemon offers of DEVICE_STATE.
fn link(d: &Daemon) -> FrontendLink<1, 1> {
    drop(d.connect());
    let mut cfg: FrontendConfig<1, 1> = FrontendConfig::probe();
    cfg.protocol_features |= P::DEVICE_STATE;
    let mut l = FrontendLink::connect(&d.sock, cfg, Vec::new(), Vec::new(), Vec::new()).unwrap();
    l.drive().unwrap();
    l
}

#[test]
fn the_front_end_link_saves_and_loads_through_a_pipe() {
    let plain = Daemon::start_with(&["--size", "16M", "--no-migration"]);
    let mut l = link(&plain);
    assert!(!l.engine().protocol_features().contains(P::DEVICE_STATE));
    assert!(l.save_state(1 << 20).is_err(), "not negotiated");

    let d = Daemon::start_with(&["--size", "16M"]);
    let mut l = link(&d);
    let saved = l.save_state(1 << 20).unwrap();
    let s = blk_state::load(&saved, &mut []).unwrap();
    assert_eq!(s.capacity, 16 << 11, "16 MiB in sectors");
    l.load_state(&saved).unwrap();
    assert_eq!(l.save_state(1 << 20).unwrap(), saved);
    // More than the limit: refused by the link, which still ends the
    // back-end's transfer (CHECK_DEVICE_STATE), so the next one is taken.
    assert!(l.save_state(8).is_err());
    // A refused state leaves the link going, as a failed migration leaves
    // a VMM's device: the state it had loads on the same link.
    match l.load_state(b"not a state") {
        Err(LinkError::Engine(FrontendError::StateRefused {
            request: FrontendReq::CheckDeviceState,
            value: 1,
        })) => {}
        other => panic!("expected CHECK_DEVICE_STATE to fail, got {other:?}"),
    }
    // A state past the daemon's limit: it stops reading and closes its
    // end, the link's write breaks, and the check says why.
    let big = vec![0u8; (65 << 20) as usize];
    match l.load_state(&big) {
        Err(LinkError::Engine(FrontendError::StateRefused {
            request: FrontendReq::CheckDeviceState,
            value: 1,
        })) => {}
        other => panic!("expected CHECK_DEVICE_STATE to fail, got {other:?}"),
    }
    l.load_state(&saved).unwrap();
    assert_eq!(l.save_state(1 << 20).unwrap(), saved);
    assert_eq!(l.engine().state(), State::Ready);
}

/// Two daemons on one image, each holding every request 500 µs (so that
/// requests are in flight at every stop).
fn pair(dir: &TempDir) -> (Daemon, Daemon) {
    let (img, _) = dir.image(64 << 20);
    let img = img.to_str().unwrap().to_string();
    let args = [
        "--blk-file",
        &img,
        "--num-queues",
        "2",
        "--io-delay-us",
        "500",
    ];
    let a = Daemon::start_with(&args);
    let b = Daemon::start_with(&args);
    drop(a.connect());
    drop(b.connect());
    (a, b)
}

fn field(json: &str, name: &str) -> u64 {
    let at = json
        .find(&format!("\"{name}\": "))
        .unwrap_or_else(|| panic!("{name} in {json}"));
    json[at + name.len() + 4..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `vhu bench` moving a verified randrw load over two queues from `a` to
/// `b` and back every 0.2 s for `runtime` seconds, with `extra` options;
/// asserts it succeeds. Its JSON report and its stderr.
fn bench_migrating(a: &Daemon, b: &Daemon, runtime: &str, extra: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["bench", "--socket-path"])
        .arg(&a.sock)
        .arg("--to")
        .arg(&b.sock)
        .args([
            "--migrate-every",
            "0.2",
            "--runtime",
            runtime,
            "--rw",
            "randrw",
            "--verify",
            "--iodepth",
            "16",
            "--queues",
            "2",
            "--timeout",
            "10",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap();
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{json}{err}\n{}\n{}",
        a.log(),
        b.log()
    );
    (json, err)
}

fn migrate_under_load(message_45: bool) {
    let dir = TempDir::new("migrate-bench");
    let (a, b) = pair(&dir);
    let extra: &[&str] = if message_45 { &["--message-45"] } else { &[] };
    let (json, _) = bench_migrating(&a, &b, "6", extra);
    let migrations = field(&json, "migrations");
    assert!(migrations >= 20, "{json}");
    assert_eq!(field(&json, "lost"), 0, "{json}");
    assert_eq!(field(&json, "duplicated"), 0, "{json}");
    assert!(field(&json, "carried") > 0, "{json}");
    // Every source logged the pages it wrote (the bench checked each
    // migration's pages are ones the back-end may write: used rings,
    // status bytes, data buffers; never a descriptor table).
    assert!(field(&json, "dirty_pages") > 0, "{json}");
    assert!(field(&json, "dirty_pages_min") > 0, "{json}");
    // Each daemon was a destination about half of the times, and resubmitted
    // the requests the source suspended (with message 45 in that mode: a
    // plain GET_VRING_BASE would have drained them).
    let log = a.log() + &b.log();
    let loads = log.matches("device state loaded").count() as u64;
    assert_eq!(loads, migrations, "one load each\n{log}");
    let resubmits = log.matches("resubmitting").count() as u64;
    assert!(
        resubmits >= migrations,
        "{resubmits} resubmitting starts\n{log}"
    );
    eprintln!("{json}");
}

#[test]
fn vhu_bench_migrates_twenty_times_with_get_vring_base_inflight() {
    migrate_under_load(false);
}

#[test]
fn vhu_bench_migrates_twenty_times_with_message_45() {
    migrate_under_load(true);
}

/// A destination that refuses every state (its disk is another size): each
/// migration fails at CHECK_DEVICE_STATE, and the bench resumes the source
/// on the same connection, as a VMM resumes its guest after a failed
/// migration; the source resubmits the requests it suspended at the stop,
/// and the verified load goes on, none lost or completed twice.
#[test]
fn vhu_bench_resumes_the_source_when_the_destination_refuses_the_state() {
    let dir = TempDir::new("migrate-refused");
    let (img, _) = dir.image(64 << 20);
    let a = Daemon::start_with(&[
        "--blk-file",
        img.to_str().unwrap(),
        "--num-queues",
        "2",
        "--io-delay-us",
        "500",
    ]);
    let b = Daemon::start_with(&["--size", "32M", "--num-queues", "2"]);
    drop(a.connect());
    drop(b.connect());
    let (json, err) = bench_migrating(&a, &b, "2", &[]);
    assert_eq!(field(&json, "migrations"), 0, "{json}");
    let failed = field(&json, "failed_migrations");
    assert!(failed >= 5, "{json}");
    assert_eq!(field(&json, "lost"), 0, "{json}");
    assert_eq!(field(&json, "duplicated"), 0, "{json}");
    assert_eq!(
        err.matches("the source resumed").count() as u64,
        failed,
        "{err}"
    );
    assert!(err.contains("CHECK_DEVICE_STATE"), "{err}");
    // The source stopped with requests in flight each time and resubmitted
    // them when it started again.
    let resubmits = a.log().matches("resubmitting").count() as u64;
    assert!(
        resubmits >= failed,
        "{resubmits} resubmitting starts\n{}",
        a.log()
    );
    assert_eq!(b.log().matches("device state loaded").count(), 0);
    eprintln!("{json}");
}

#[test]
fn vhu_bench_refuses_to_migrate_without_device_state() {
    let a = Daemon::start_with(&["--size", "16M", "--no-migration"]);
    let b = Daemon::start_with(&["--size", "16M", "--no-migration"]);
    drop(a.connect());
    drop(b.connect());
    let out = Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["bench", "--socket-path"])
        .arg(&a.sock)
        .arg("--to")
        .arg(&b.sock)
        .args(["--migrate-every", "0.2", "--runtime", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEVICE_STATE"), "{err}");
}

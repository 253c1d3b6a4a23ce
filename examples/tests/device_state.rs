//! Device state transfer with the `vhost-user-blk` daemon over real
//! sockets and pipes (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE), by
//! hand-written messages: offered unless `--no-migration`; the state saved
//! into a pipe is the blk state format; a malformed or foreign state is
//! refused at CHECK_DEVICE_STATE and the connection goes on; a good one
//! loads. The same against the C back-end `examples/c/blk.c` (the C ABI's
//! transfer and blk state).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use common::{handshake, recv_reply, send, CBlk, Daemon};
use vhost_user_core::device::blk::state::{self as blk_state, BlkState};
use vhost_user_core::feature::ProtocolFeatures as P;
use vhost_user_core::message::{DeviceStateDirection as Dir, FrontendReq, Request, HEADER_SIZE};
use vhost_user_linux::sys::socket::Stream;

/// A pipe as files: (read end, write end).
fn pipe() -> (std::fs::File, std::fs::File) {
    let (r, w) = vhost_user_linux::sys::pipe::pipe().unwrap();
    (r.into(), w.into())
}

fn reply_u64(s: &Stream, code: FrontendReq) -> u64 {
    let r = recv_reply(s, code).unwrap();
    assert_eq!(r.len(), HEADER_SIZE + 8);
    u64::from_le_bytes(r[HEADER_SIZE..].try_into().unwrap())
}

/// SET_DEVICE_STATE_FD with `theirs`; the reply's u64.
fn transfer(s: &Stream, dir: Dir, theirs: OwnedFd) -> u64 {
    send(s, &Request::SetDeviceStateFd(dir), false, &[theirs.as_fd()]);
    drop(theirs);
    reply_u64(s, FrontendReq::SetDeviceStateFd)
}

fn check(s: &Stream) -> u64 {
    send(s, &Request::CheckDeviceState, false, &[]);
    reply_u64(s, FrontendReq::CheckDeviceState)
}

fn save(s: &Stream) -> Vec<u8> {
    let (mut r, w) = pipe();
    assert_eq!(transfer(s, Dir::Save, w.into()), 0x100, "ok, no fd");
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes).unwrap();
    assert_eq!(check(s), 0);
    bytes
}

fn load(s: &Stream, bytes: &[u8]) -> u64 {
    let (r, mut w) = pipe();
    assert_eq!(transfer(s, Dir::Load, r.into()), 0x100, "ok, no fd");
    w.write_all(bytes).unwrap();
    drop(w);
    check(s)
}

#[test]
fn device_state_is_offered_unless_no_migration() {
    let plain = Daemon::start_with(&["--size", "16M", "--no-migration"]);
    drop(plain.connect());
    let p = handshake(&plain.connect());
    assert_eq!(p & (P::DEVICE_STATE | P::LOG_SHMFD).bits(), 0);
    let mig = Daemon::start_with(&["--size", "16M"]);
    drop(mig.connect());
    let p = handshake(&mig.connect());
    assert_ne!(p & P::DEVICE_STATE.bits(), 0);
    assert_ne!(p & P::LOG_SHMFD.bits(), 0);
    // --migration, the old way to ask, is the default.
    let old = Daemon::start_with(&["--size", "16M", "--migration"]);
    drop(old.connect());
    assert_eq!(handshake(&old.connect()), p);
}

#[test]
fn a_malformed_or_foreign_state_is_refused_and_a_good_one_taken() {
    let d = Daemon::start_with(&["--size", "16M"]);
    drop(d.connect());
    let s = d.connect();
    refuses_bad_states_and_takes_a_good_one(&s, 16 << 11);
    let log = d.log();
    assert_eq!(log.matches("device state of").count(), 5, "{log}");
}

#[test]
fn the_c_backend_refuses_a_bad_state_and_takes_a_good_one() {
    let b = CBlk::start(1);
    let s = Stream::connect(&b.sock).unwrap();
    refuses_bad_states_and_takes_a_good_one(&s, 32 << 11);
    let log = b.log();
    assert_eq!(
        log.matches("load state: VHU_ERR_INVALID").count(),
        4,
        "{log}"
    );
    assert_eq!(
        log.matches("device state loaded: 48 bytes").count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("device state saved: 48 bytes").count(),
        3,
        "{log}"
    );
}

/// Over a connection `s` (handshake to come) to a back-end serving a disk
/// of `capacity` sectors: a saved state is the blk format; four bad ones
/// are refused at CHECK_DEVICE_STATE, a second transfer before the check
/// too, and the connection goes on to load the good one.
fn refuses_bad_states_and_takes_a_good_one(s: &Stream, capacity: u64) {
    let p = handshake(s);
    assert_ne!(p & P::DEVICE_STATE.bits(), 0);
    let saved = save(s);
    let st = blk_state::load(&saved, &mut []).unwrap();
    assert_eq!(st.capacity, capacity);
    assert_eq!(st.area, None, "no inflight area was set");

    assert_eq!(load(s, b"not a state"), 1);
    let mut flipped = saved.clone();
    flipped[20] ^= 1;
    assert_eq!(load(s, &flipped), 1);
    // Another disk size.
    let foreign = BlkState { capacity: 99, ..st };
    let mut bytes = vec![0u8; blk_state::state_len(0)];
    blk_state::save(&mut &mut bytes[..], &foreign, &[]).unwrap();
    assert_eq!(load(s, &bytes), 1);
    // An inflight area this connection does not have.
    let with_area = BlkState {
        area: Some(blk_state::AreaShape {
            num_queues: 1,
            queue_size: 16,
        }),
        ..st
    };
    let area = vec![0u8; vhost_user_core::inflight::area_size(1, 16).unwrap() as usize];
    let mut bytes = vec![0u8; blk_state::state_len(area.len())];
    blk_state::save(&mut &mut bytes[..], &with_area, &area).unwrap();
    assert_eq!(load(s, &bytes), 1);

    // A second transfer before CHECK is refused (error, no fd).
    let (mut r, w) = pipe();
    assert_eq!(transfer(s, Dir::Save, w.into()), 0x100);
    let (r2, _w2) = pipe();
    assert_eq!(transfer(s, Dir::Load, r2.into()), 0x101);
    let mut first = Vec::new();
    r.read_to_end(&mut first).unwrap();
    assert_eq!(first, saved);
    assert_eq!(check(s), 0);

    // The connection went on through every refusal: the good state loads.
    assert_eq!(load(s, &saved), 0);
    assert_eq!(save(s), saved);
}

/// A front-end that never closes its end of the pipe cannot hold the
/// daemon: the transfer gives up at its deadline, CHECK_DEVICE_STATE
/// fails, and the connection goes on (a save as well: nobody reads).
#[test]
fn a_transfer_the_front_end_never_ends_fails_at_its_deadline() {
    let d = Daemon::start_with(&["--size", "16M", "--state-timeout-ms", "300"]);
    drop(d.connect());
    let s = d.connect();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    handshake(&s);
    // Load: the write end stays open, nothing is written.
    let (r, w) = pipe();
    assert_eq!(transfer(&s, Dir::Load, OwnedFd::from(r)), 0x100);
    let t0 = std::time::Instant::now();
    assert_eq!(check(&s), 1, "the load failed");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    // Save into a pipe nobody reads, bigger than the pipe buffer would
    // need for a state: the daemon's end is closed at the deadline, so
    // the front-end sees end of file after what was written.
    let (r2, w2) = pipe();
    assert_eq!(transfer(&s, Dir::Save, OwnedFd::from(w2)), 0x100);
    let t0 = std::time::Instant::now();
    let result = check(&s);
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    // A state fits the pipe's buffer: the save completes without a reader.
    assert_eq!(result, 0);
    let mut got = Vec::new();
    let mut r2 = r2;
    r2.read_to_end(&mut got).unwrap();
    assert!(blk_state::load(&got, &mut []).is_ok());
    drop(w);
    // The connection goes on.
    send(&s, &Request::GetFeatures, false, &[]);
    assert!(recv_reply(&s, FrontendReq::GetFeatures).is_some());
    assert!(
        d.log()
            .contains("did not finish the device state transfer in time"),
        "{}",
        d.log()
    );
}

/// The C back-end runs a transfer on its one thread: a front-end that
/// never closes its end of the pipe fails the load at the back-end's
/// deadline (5 s), CHECK_DEVICE_STATE says so, and the connection goes on.
#[test]
fn the_c_backend_gives_up_a_transfer_the_front_end_never_ends() {
    let b = CBlk::start(1);
    let s = Stream::connect(&b.sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    handshake(&s);
    let (r, w) = pipe();
    let t0 = std::time::Instant::now();
    assert_eq!(transfer(&s, Dir::Load, OwnedFd::from(r)), 0x100);
    assert_eq!(check(&s), 1, "the load failed");
    let took = t0.elapsed();
    assert!(
        took >= std::time::Duration::from_secs(4) && took < std::time::Duration::from_secs(15),
        "{took:?}"
    );
    drop(w);
    // The connection goes on: a save works.
    let saved = save(&s);
    assert!(blk_state::load(&saved, &mut []).is_ok());
    let log = b.log();
    assert!(log.contains("did not finish it in time"), "{log}");
}

//! The front-end engine's half of dirty logging, against the back-end
//! engine in memory: `Frontend::start_logging` / `stop_logging` send
//! exactly SET_LOG_BASE (with the log's fd), SET_FEATURES with or without
//! VHOST_F_LOG_ALL and SET_VRING_ADDR with or without VHOST_VRING_F_LOG
//! for the running ring (acked with REPLY_ACK, else closed by a
//! GET_FEATURES round trip); the back-end then marks the pages it writes
//! and only those; SET_LOG_BASE's reply is taken whatever its content;
//! every command refused in a state that does not allow it, with a typed
//! error that changes nothing.

#![allow(clippy::unwrap_used)]

use vhost_user_core::backend::{BackendConfig, SUPPORTED_PROTOCOL_FEATURES};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{log_size, Event, FdRef, FrontendConfig, FrontendError, State};
use vhost_user_core::log::bitmap_bytes;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{FrontendReq as C, Header, LogMsg, Request, WireError, HEADER_SIZE};
use vhost_user_test::pair::DriveError;
use vhost_user_test::{region, Backend, Buf, GuestRing, Pair, RingSpec, TestDevice};

const MIB: u64 = 1 << 20;
const RAM: u64 = 4 * MIB;
const PAGE: u64 = 4096;

type Rig = (Pair<TestDevice, 1, 8>, GuestRing, RingSpec);

/// A split ring of 256 at 0x1000 (descriptors on page 1 alone, the avail
/// and used rings on page 2) in 4 MiB, the back-end offering `offer`, the
/// front-end wanting `protocol`; initialised, not started.
fn rig(offer: V, protocol: P) -> Rig {
    let config = BackendConfig {
        features: offer,
        protocol_features: SUPPORTED_PROTOCOL_FEATURES,
        num_queues: 1,
        max_queue_size: 256,
    };
    let dev = TestDevice {
        fill: 0xab,
        ..TestDevice::default()
    };
    let be = Backend::new(config, dev, &[(0, RAM)]).unwrap();
    let ring = RingSpec::split(256, 0x1000);
    let mut fc = FrontendConfig::new(V::VERSION_1 | V::PROTOCOL_FEATURES, protocol);
    fc.queues.push(ring.queue(0)).unwrap();
    fc.regions.push(region(0, RAM)).unwrap();
    let mut p = Pair::new(be, fc).unwrap();
    let guest = ring.lay_out(&p.be.mem).unwrap();
    p.drive();
    assert_eq!(p.fe.state(), State::Ready);
    (p, guest, ring)
}

fn offer() -> V {
    V::VERSION_1 | V::PROTOCOL_FEATURES | V::LOG_ALL
}

fn started(protocol: P) -> Rig {
    let (mut p, guest, ring) = rig(offer(), protocol);
    p.start().unwrap();
    p.sent.clear();
    p.events.clear();
    (p, guest, ring)
}

/// One request: a readable buffer on page 0x40, writable ones on page
/// 0x80 and across pages 0x81-0x82; the back-end serves it.
fn request(p: &mut Pair<TestDevice, 1, 8>, guest: &mut GuestRing) {
    guest
        .post(
            &p.be.mem,
            &[
                Buf::readable(0x40 * PAGE, 16),
                Buf::writable(0x80 * PAGE + 8, 8),
                Buf::writable(0x82 * PAGE - 8, 16),
            ],
        )
        .unwrap();
    assert_eq!(p.be.serve(0).unwrap(), 1);
    assert!(guest.harvest(&p.be.mem).unwrap().is_some());
}

/// Reads and clears the log as a front-end does: the dirty pages.
fn take_dirty(p: &Pair<TestDevice, 1, 8>) -> Vec<u64> {
    let log = p.be.log.as_ref().unwrap();
    let bytes = log.read_vec(0, p.be.log_size as usize).unwrap();
    log.write(0, &vec![0; bytes.len()]).unwrap();
    (0..p.be.log_size * 8)
        .filter(|&pg| bytes[(pg / 8) as usize] >> (pg % 8) & 1 == 1)
        .collect()
}

fn codes(p: &Pair<TestDevice, 1, 8>) -> Vec<(C, bool)> {
    p.codes()
}

fn features_sent(p: &Pair<TestDevice, 1, 8>, i: usize) -> V {
    match p.sent[i].request() {
        Request::SetFeatures(v) => V::from_bits_retain(v),
        r => panic!("not SET_FEATURES: {r:?}"),
    }
}

#[test]
fn log_size_covers_the_highest_region_in_whole_words() {
    assert_eq!(log_size(&[]), 0);
    // 4 MiB: 1024 pages, 128 bytes.
    assert_eq!(log_size(&[region(0, RAM)]), 128);
    // One page: one byte, rounded up to a word.
    assert_eq!(log_size(&[region(0, PAGE)]), 8);
    // A region high up: from address 0 to its end.
    let high = [region(0, MIB), region(1 << 32, MIB)];
    assert_eq!(log_size(&high), bitmap_bytes((1 << 32) + MIB));
    assert_eq!(log_size(&high) % 8, 0);
    assert_eq!(log_size(&[region(0, PAGE * 65)]), 16);
}

#[test]
fn logging_on_and_off_while_the_ring_runs_with_reply_ack() {
    let (mut p, mut guest, ring) = started(P::MQ | P::REPLY_ACK | P::LOG_SHMFD);
    let used = ring.addrs().device;
    assert_eq!(used / PAGE, 2);
    // Before: nothing mapped, nothing logged.
    request(&mut p, &mut guest);
    assert!(p.be.log.is_none() && !p.be.log_all);

    let size = log_size(p.fe.regions());
    p.fe.start_logging(size).unwrap();
    assert_eq!(p.fe.logging(), Some(size));
    p.try_drive().unwrap();
    assert_eq!(
        codes(&p),
        [
            (C::SetLogBase, false),
            (C::SetFeatures, true),
            (C::SetVringAddr, true),
        ]
    );
    assert_eq!(p.sent[0].fds, [FdRef::Log]);
    assert_eq!(
        p.sent[0].request(),
        Request::SetLogBase(LogMsg { size, offset: 0 })
    );
    assert_eq!(
        features_sent(&p, 1),
        V::VERSION_1 | V::PROTOCOL_FEATURES | V::LOG_ALL
    );
    let Request::SetVringAddr(a) = p.sent[2].request() else {
        panic!("SET_VRING_ADDR");
    };
    let u = ring.user_addrs();
    assert!(a.log);
    assert_eq!(
        (a.index, a.desc, a.avail, a.used),
        (0, u.desc, u.driver, u.device)
    );
    assert_eq!(a.log_addr, used, "the used ring's guest physical address");
    assert_eq!(p.events, [Event::Logging(true)]);
    assert_eq!(p.fe.state(), State::Started);
    // The features the session acked do not carry the log bit.
    assert!(!p.fe.features().contains(V::LOG_ALL));
    assert!(p.be.log_all);
    assert_eq!(p.be.ring_log[0], Some(used));
    assert_eq!(p.be.log_size, size);

    // The back-end marks exactly what it wrote: the two writable buffers'
    // pages and the used ring's; not the readable buffer, not the
    // descriptor table.
    request(&mut p, &mut guest);
    assert_eq!(take_dirty(&p), [2, 0x80, 0x81, 0x82]);
    assert_eq!(take_dirty(&p), Vec::<u64>::new(), "read and cleared");
    request(&mut p, &mut guest);
    assert_eq!(take_dirty(&p), [2, 0x80, 0x81, 0x82]);

    // Twice: refused, nothing sent.
    p.sent.clear();
    p.events.clear();
    assert_eq!(p.fe.start_logging(size), Err(FrontendError::AlreadyLogging));
    p.try_drive().unwrap();
    assert!(p.sent.is_empty());

    p.fe.stop_logging().unwrap();
    assert_eq!(p.fe.logging(), None);
    p.try_drive().unwrap();
    assert_eq!(codes(&p), [(C::SetFeatures, true), (C::SetVringAddr, true)]);
    assert_eq!(features_sent(&p, 0), V::VERSION_1 | V::PROTOCOL_FEATURES);
    let Request::SetVringAddr(a) = p.sent[1].request() else {
        panic!("SET_VRING_ADDR");
    };
    assert!(!a.log);
    assert_eq!(p.events, [Event::Logging(false)]);
    assert!(!p.be.log_all);
    assert_eq!(p.be.ring_log[0], None);
    request(&mut p, &mut guest);
    assert_eq!(take_dirty(&p), Vec::<u64>::new(), "logging is off");
    assert_eq!(p.fe.stop_logging(), Err(FrontendError::NotLogging));
    assert_eq!(p.be.log_failed, 0);
}

#[test]
fn without_reply_ack_a_get_features_round_trip_ends_each_switch() {
    let (mut p, mut guest, _) = started(P::MQ | P::LOG_SHMFD);
    p.fe.start_logging(log_size(p.fe.regions())).unwrap();
    p.try_drive().unwrap();
    assert_eq!(
        codes(&p),
        [
            (C::SetLogBase, false),
            (C::SetFeatures, false),
            (C::SetVringAddr, false),
            (C::GetFeatures, false),
        ]
    );
    assert_eq!(p.events, [Event::Logging(true)]);
    request(&mut p, &mut guest);
    assert_eq!(take_dirty(&p), [2, 0x80, 0x81, 0x82]);
    p.sent.clear();
    p.fe.stop_logging().unwrap();
    p.try_drive().unwrap();
    assert_eq!(
        codes(&p),
        [
            (C::SetFeatures, false),
            (C::SetVringAddr, false),
            (C::GetFeatures, false),
        ]
    );
}

#[test]
fn logging_switched_on_while_stopped_is_kept_by_the_next_start() {
    let (mut p, mut guest, ring) = started(P::MQ | P::REPLY_ACK | P::LOG_SHMFD);
    p.stop().unwrap();
    p.sent.clear();
    p.events.clear();
    let size = log_size(p.fe.regions());
    p.fe.start_logging(size).unwrap();
    p.try_drive().unwrap();
    // No ring runs: no SET_VRING_ADDR now.
    assert_eq!(codes(&p), [(C::SetLogBase, false), (C::SetFeatures, true)]);
    assert_eq!(p.events, [Event::Logging(true)]);
    p.sent.clear();
    p.start().unwrap();
    let addr = p
        .sent
        .iter()
        .find_map(|s| match s.request() {
            Request::SetVringAddr(a) => Some(a),
            _ => None,
        })
        .unwrap();
    assert!(addr.log);
    assert!(features_sent(&p, 0).contains(V::LOG_ALL));
    assert_eq!(p.be.ring_log[0], Some(ring.addrs().device));
    request(&mut p, &mut guest);
    assert_eq!(take_dirty(&p), [2, 0x80, 0x81, 0x82]);
    // Off while stopped: SET_FEATURES only; the restart has no flag.
    p.stop().unwrap();
    p.sent.clear();
    p.fe.stop_logging().unwrap();
    p.try_drive().unwrap();
    assert_eq!(codes(&p), [(C::SetFeatures, true)]);
    p.start().unwrap();
    assert!(!p.be.log_all);
    assert_eq!(p.be.ring_log[0], None);
}

/// A refused command is typed, not fatal, and sends nothing.
fn refused(p: &mut Pair<TestDevice, 1, 8>, r: Result<(), FrontendError>, want: FrontendError) {
    assert_eq!(r, Err(want));
    assert!(!want.is_fatal());
    assert_ne!(p.fe.state(), State::Failed);
    let n = p.sent.len();
    p.try_drive().unwrap();
    assert_eq!(p.sent.len(), n, "a refused command sent something");
}

#[test]
fn logging_commands_are_refused_where_they_do_not_apply() {
    let protocol = P::MQ | P::REPLY_ACK | P::LOG_SHMFD;
    // Before features were set.
    let (mut p, _, _) = rig(offer(), protocol);
    let r = p.fe.start_logging(128);
    refused(&mut p, r, FrontendError::WrongState(State::Ready));
    let r = p.fe.stop_logging();
    refused(&mut p, r, FrontendError::WrongState(State::Ready));

    // The back-end does not offer VHOST_F_LOG_ALL.
    let (mut p, _, _) = rig(V::VERSION_1 | V::PROTOCOL_FEATURES, protocol);
    p.start().unwrap();
    let r = p.fe.start_logging(128);
    refused(&mut p, r, FrontendError::LogAllNotOffered);

    // LOG_SHMFD not negotiated (the front-end did not want it).
    let (mut p, _, _) = started(P::MQ | P::REPLY_ACK);
    let r = p.fe.start_logging(128);
    refused(&mut p, r, FrontendError::NotNegotiated(C::SetLogBase));

    // A log too small for the memory.
    let (mut p, _, _) = started(protocol);
    let r = p.fe.start_logging(127);
    refused(
        &mut p,
        r,
        FrontendError::LogTooSmall {
            size: 127,
            needed: 128,
        },
    );
    assert_eq!(p.fe.logging(), None);
    // Not logging: nothing to stop.
    let r = p.fe.stop_logging();
    refused(&mut p, r, FrontendError::NotLogging);
    // While another flow runs.
    p.fe.start_logging(128).unwrap();
    assert_eq!(p.fe.stop_logging(), Err(FrontendError::Busy));
    assert_eq!(p.fe.start_logging(128), Err(FrontendError::Busy));
    p.try_drive().unwrap();
    assert_eq!(p.fe.logging(), Some(128));
    // Memory the log does not cover.
    let r = p.fe.set_memory(&[region(0, RAM), region(RAM, MIB)]);
    refused(
        &mut p,
        r,
        FrontendError::LogTooSmall {
            size: 128,
            needed: 160,
        },
    );
    assert_eq!(p.fe.regions(), [region(0, RAM)]);

    // Stopped without memory: no log to size (an empty SET_LOG_BASE would
    // be malformed).
    let (mut p, _, _) = started(protocol);
    p.stop().unwrap();
    p.fe.set_memory(&[]).unwrap();
    let r = p.fe.start_logging(0);
    refused(&mut p, r, FrontendError::NoRegions);
}

/// The reply to SET_LOG_BASE, in the engine's hands: `payload` after a
/// header with `size`, `nfds` fds.
fn log_base_reply(payload: &[u8], nfds: usize) -> Result<Pair<TestDevice, 1, 8>, FrontendError> {
    let (mut p, _, _) = started(P::MQ | P::REPLY_ACK | P::LOG_SHMFD);
    p.hold_at = Some(C::SetLogBase);
    p.fe.start_logging(128).unwrap();
    p.try_drive().unwrap();
    let held = p.held_reply.take().expect("SET_LOG_BASE's reply held");
    assert_eq!(held.len(), HEADER_SIZE + 8, "our back-end replies a u64");
    let mut r = Vec::new();
    r.extend_from_slice(&C::SetLogBase.id().to_le_bytes());
    r.extend_from_slice(&0x5u32.to_le_bytes());
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(payload);
    p.deliver(&r, nfds)?;
    p.hold_at = None;
    p.try_drive().unwrap();
    Ok(p)
}

#[test]
fn the_reply_to_set_log_base_is_taken_whatever_it_says() {
    // Empty (DPDK), a u64 of any value (libvhost-user echoes the size),
    // the 16 bytes echoed (rust-vmm): the flow goes on.
    for payload in [&[][..], &[0; 8], &128u64.to_le_bytes(), &[7; 16]] {
        let p = log_base_reply(payload, 0).unwrap();
        assert_eq!(
            p.codes(),
            [
                (C::SetLogBase, false),
                (C::SetFeatures, true),
                (C::SetVringAddr, true),
            ]
        );
        assert!(p.events.contains(&Event::Logging(true)));
    }
    // Another size, or an fd: a malformed reply, fatal.
    let e = log_base_reply(&[0; 4], 0).err().unwrap();
    assert_eq!(
        e,
        FrontendError::Wire(WireError::BadSize {
            request: 6,
            size: 4
        })
    );
    assert!(e.is_fatal());
    let e = log_base_reply(&[0; 8], 1).err().unwrap();
    assert_eq!(
        e,
        FrontendError::Wire(WireError::TooManyFds { allowed: 0, got: 1 })
    );
}

#[test]
fn a_failed_ack_of_the_log_switch_fails_the_session() {
    let (mut p, _, _) = started(P::MQ | P::REPLY_ACK | P::LOG_SHMFD);
    // The first acked SET_FEATURES is the one that switches the log on.
    p.hold_at = Some(C::SetFeatures);
    p.fe.start_logging(128).unwrap();
    p.try_drive().unwrap();
    let mut r = p.held_reply.take().unwrap();
    let h = Header::parse(&r).unwrap();
    assert_eq!(h.request, C::SetFeatures.id());
    r[HEADER_SIZE..].copy_from_slice(&1u64.to_le_bytes());
    assert_eq!(
        p.deliver(&r, 0),
        Err(FrontendError::Nack {
            request: C::SetFeatures,
            value: 1
        })
    );
    assert_eq!(p.fe.state(), State::Failed);
    assert_eq!(p.fe.stop_logging(), Err(FrontendError::Failed));
}

#[test]
fn a_back_end_that_refuses_the_log_ends_the_connection() {
    // The in-memory back-end finds the log's fd too short to map: it
    // ends the connection (our daemon does the same).
    let (mut p, _, _) = started(P::MQ | P::REPLY_ACK | P::LOG_SHMFD);
    p.be.log_fd = vhost_user_test::pair::LogFd::Shared(64);
    p.fe.start_logging(128).unwrap();
    assert!(matches!(p.try_drive(), Err(DriveError::Backend(_))));
    assert!(p.be.log.is_none());
}

//! Dirty-page logging over the in-memory pair: the front-end engine starts
//! a ring, then migration begins as QEMU does it (LOG_SHMFD, SET_LOG_BASE,
//! SET_FEATURES with VHOST_F_LOG_ALL, SET_VRING_ADDR with
//! VHOST_VRING_F_LOG, all while the ring runs), by hand-written messages.
//! The bits of the device's writes and of the used ring are checked, with
//! logging on and off, split and packed; and hostile SET_LOG_BASEs are
//! refused.

#![allow(clippy::unwrap_used)]

use vhost_user_core::backend::{Action, BackendConfig, BackendError, SUPPORTED_PROTOCOL_FEATURES};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_core::log::bitmap_bytes;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{
    FrontendReq, Header, LogMsg, Request, VringAddrMsg, WireError, HEADER_SIZE,
};
use vhost_user_core::vring::RingAddrs;
use vhost_user_test::pair::LogFd;
use vhost_user_test::{region, Backend, Buf, GuestRing, Pair, RingSpec, TestDevice};

const MIB: u64 = 1 << 20;
const RAM: u64 = 4 * MIB;
const PAGE: u64 = 4096;

type Rig = (Pair<TestDevice, 1, 8>, GuestRing, RingSpec);

fn offered() -> V {
    V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED | V::LOG_ALL
}

/// A running ring (16 entries at 0x1000) started by the front-end
/// engine, which did not negotiate logging.
fn running(packed: bool) -> Rig {
    let config = BackendConfig {
        features: offered(),
        protocol_features: SUPPORTED_PROTOCOL_FEATURES,
        num_queues: 1,
        max_queue_size: 64,
    };
    let dev = TestDevice {
        fill: 0xab,
        ..TestDevice::default()
    };
    let be = Backend::new(config, dev, &[(0, RAM)]).unwrap();
    let ring = if packed {
        RingSpec::packed(16, 0x1000)
    } else {
        RingSpec::split(16, 0x1000)
    };
    let mut want = V::VERSION_1 | V::PROTOCOL_FEATURES;
    if packed {
        want |= V::RING_PACKED;
    }
    let mut fc = FrontendConfig::new(want, P::MQ | P::REPLY_ACK);
    let base = if packed { 1 << 15 | 1 << 31 } else { 0 };
    fc.queues.push(ring.queue(base)).unwrap();
    fc.regions.push(region(0, RAM)).unwrap();
    let mut p = Pair::new(be, fc).unwrap();
    let guest = ring.lay_out(&p.be.mem).unwrap();
    p.drive();
    p.start().unwrap();
    assert!(p.be.ring(0).is_some());
    (p, guest, ring)
}

fn u64_reply(reply: &[u8]) -> u64 {
    assert_eq!(reply.len(), HEADER_SIZE + 8, "a u64 reply");
    let h = Header::parse(reply).unwrap();
    assert_eq!(h.flags.bits(), 0x5, "version 1 | REPLY");
    u64::from_le_bytes(reply[HEADER_SIZE..].try_into().unwrap())
}

/// LOG_SHMFD negotiated on top of what the engine acked.
fn negotiate(be: &mut Backend<TestDevice, 1, 8>) {
    let p = P::MQ | P::REPLY_ACK | P::LOG_SHMFD;
    let (_, ack) = be.ack(Request::SetProtocolFeatures(p.bits()));
    assert_eq!(ack, 0);
}

/// SET_LOG_BASE of `size` bytes: the reply is a u64 0.
fn set_log(be: &mut Backend<TestDevice, 1, 8>, size: u64) {
    let (o, reply) = be
        .send(&Request::SetLogBase(LogMsg { size, offset: 0 }), false)
        .unwrap();
    assert_eq!(u64_reply(&reply), 0);
    assert!(matches!(
        o.actions.as_slice(),
        [Action::MapLog { fd: 0, offset: 0, size: s }] if *s == size
    ));
}

/// SET_FEATURES with VHOST_F_LOG_ALL on or off (acked).
fn log_all(be: &mut Backend<TestDevice, 1, 8>, on: bool) {
    let mut f = be.session.features();
    f.set(V::LOG_ALL, on);
    let (o, ack) = be.ack(Request::SetFeatures(f.bits()));
    assert_eq!(ack, 0, "{:?}", o.refused);
    assert_eq!(be.log_all, on);
}

/// SET_VRING_ADDR with the ring's addresses and `log` (acked).
fn ring_log(be: &mut Backend<TestDevice, 1, 8>, ring: &RingSpec, log: Option<u64>) {
    let a = ring.user_addrs();
    let msg = VringAddrMsg {
        index: 0,
        log: log.is_some(),
        desc: a.desc,
        used: a.device,
        avail: a.driver,
        log_addr: log.unwrap_or(0),
    };
    let (o, ack) = be.ack(Request::SetVringAddr(msg));
    assert_eq!(ack, 0, "{:?}", o.refused);
    assert_eq!(be.ring_log[0], log);
}

fn bit(be: &Backend<TestDevice, 1, 8>, gpa: u64) -> bool {
    let page = gpa / PAGE;
    let byte = be.log.as_ref().unwrap().read_vec(page / 8, 1).unwrap()[0];
    byte >> (page % 8) & 1 == 1
}

/// The pages whose bits are set.
fn dirty(be: &Backend<TestDevice, 1, 8>) -> Vec<u64> {
    let log = be.log.as_ref().unwrap();
    let bytes = log.read_vec(0, be.log_size as usize).unwrap();
    (0..be.log_size * 8)
        .filter(|&p| bytes[(p / 8) as usize] >> (p % 8) & 1 == 1)
        .collect()
}

/// The front-end reads and clears the bitmap.
fn clear(be: &Backend<TestDevice, 1, 8>) {
    let log = be.log.as_ref().unwrap();
    log.write(0, &vec![0; be.log_size as usize]).unwrap();
}

/// One request: a readable buffer on page 0x40, two writable ones on
/// pages 0x80 and 0x81..=0x82 (crossing into 0x82).
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
    assert_eq!(guest.harvest(&p.be.mem).unwrap().unwrap().len, 24);
}

/// The pages of the ring's used ring (split) or descriptor ring (packed).
fn ring_pages(ring: &RingSpec) -> Vec<u64> {
    let a: RingAddrs = ring.addrs();
    let n = u64::from(ring.size);
    let (start, len) = if ring.packed {
        (a.desc, 16 * n)
    } else {
        (a.device, 6 + 8 * n)
    };
    (start / PAGE..=(start + len - 1) / PAGE).collect()
}

fn migration(packed: bool) {
    let (mut p, mut guest, ring) = running(packed);
    negotiate(&mut p.be);
    let need = bitmap_bytes(RAM);
    assert_eq!(need, 128);
    set_log(&mut p.be, need);

    // A log, but neither LOG_ALL nor F_LOG: nothing is marked.
    request(&mut p, &mut guest);
    assert_eq!(dirty(&p.be), Vec::<u64>::new());
    assert_eq!(p.be.dirty_pages, 0);

    // LOG_ALL on, while the ring runs: the device's writes are marked, the
    // readable buffer's page is not.
    log_all(&mut p.be, true);
    request(&mut p, &mut guest);
    assert_eq!(dirty(&p.be), [0x80, 0x81, 0x82]);
    assert!(!bit(&p.be, 0x40 * PAGE));

    // F_LOG on: the used ring too, where the front-end said it is.
    clear(&p.be);
    let used = ring.addrs().device;
    ring_log(&mut p.be, &ring, Some(used));
    request(&mut p, &mut guest);
    let mut want = vec![0x80, 0x81, 0x82];
    want.extend(ring_pages(&ring));
    want.push(used / PAGE);
    want.sort_unstable();
    want.dedup();
    assert_eq!(dirty(&p.be), want);

    // LOG_ALL off, F_LOG still on, at a log address of its own: only the
    // ring's log range is marked, at that address.
    clear(&p.be);
    log_all(&mut p.be, false);
    let elsewhere = 0x300 * PAGE;
    ring_log(&mut p.be, &ring, Some(elsewhere));
    request(&mut p, &mut guest);
    let marked = dirty(&p.be);
    if packed {
        // Descriptors at their own address, the device area at the log
        // address.
        let mut want = ring_pages(&ring);
        want.push(0x300);
        assert_eq!(marked, want);
    } else {
        assert_eq!(marked, [0x300]);
    }

    // Both off: nothing.
    clear(&p.be);
    ring_log(&mut p.be, &ring, None);
    request(&mut p, &mut guest);
    assert_eq!(dirty(&p.be), Vec::<u64>::new());

    // Logging on again; the stop marks the used ring (the last writes
    // before the front-end's final pass).
    log_all(&mut p.be, true);
    ring_log(&mut p.be, &ring, Some(used));
    clear(&p.be);
    assert_eq!(p.stop().unwrap(), [0]);
    assert!(bit(&p.be, used));
    assert_eq!(p.be.log_failed, 0);
    assert!(p.be.dirty_pages > 0);
}

#[test]
fn split_ring_marks_device_writes_and_the_used_ring() {
    migration(false);
}

#[test]
fn packed_ring_marks_device_writes_and_the_written_back_descriptors() {
    migration(true);
}

#[test]
fn log_fd_is_signalled_after_bits_are_set() {
    let (mut p, mut guest, _) = running(false);
    negotiate(&mut p.be);
    set_log(&mut p.be, 128);
    let (o, ack) = p.be.ack(Request::SetLogFd);
    assert_eq!(ack, 0);
    assert!(matches!(o.actions.as_slice(), [Action::SetLogFd { fd: 0 }]));
    request(&mut p, &mut guest);
    assert_eq!(p.be.log_signals, Some(0), "nothing marked, nothing said");
    log_all(&mut p.be, true);
    request(&mut p, &mut guest);
    assert_eq!(p.be.log_signals, Some(1));
}

#[test]
fn logging_starts_a_ring_with_its_log_address_and_keeps_other_features_fixed() {
    let (mut p, mut guest, ring) = running(false);
    negotiate(&mut p.be);
    // LOG_ALL and F_LOG before the log (QEMU's order when a device starts
    // during a migration): accepted, nothing marked until the log comes.
    log_all(&mut p.be, true);
    let used = ring.addrs().device;
    ring_log(&mut p.be, &ring, Some(used));
    request(&mut p, &mut guest);
    assert_eq!(p.be.dirty_pages, 0);
    set_log(&mut p.be, 256);
    request(&mut p, &mut guest);
    assert!(bit(&p.be, 0x80 * PAGE) && bit(&p.be, used));
    // Other features still cannot change under a running ring.
    let f = p.be.session.features() | V::RING_PACKED;
    let (o, ack) = p.be.ack(Request::SetFeatures(f.bits()));
    assert_eq!(ack, 1);
    assert_eq!(o.refused, Some(BackendError::FeaturesWhileRunning));
    // Nor its addresses (only the log fields).
    let a = ring.user_addrs();
    let moved = VringAddrMsg {
        index: 0,
        log: true,
        desc: a.desc + 0x10000,
        used: a.device,
        avail: a.driver,
        log_addr: used,
    };
    let (o, ack) = p.be.ack(Request::SetVringAddr(moved));
    assert_eq!(ack, 1);
    assert_eq!(o.refused, Some(BackendError::RingRunning(0)));
    // Stopped and started again: the ring keeps its log address.
    assert_eq!(p.stop().unwrap(), [0]);
    p.start().unwrap();
    assert_eq!(
        p.be.ring_log[0], None,
        "the engine's SET_VRING_ADDR has no F_LOG"
    );
    ring_log(&mut p.be, &ring, Some(used));
    p.be.kill();
    assert!(p.be.log.is_none());
}

#[test]
fn marks_beyond_the_log_are_refused_and_counted() {
    let (mut p, mut guest, ring) = running(false);
    negotiate(&mut p.be);
    set_log(&mut p.be, 128);
    // A used-ring log address past the guest memory the log covers (the
    // front-end's mistake): refused, counted, nothing else set.
    ring_log(&mut p.be, &ring, Some(64 * MIB));
    request(&mut p, &mut guest);
    assert_eq!(p.be.log_failed, 1);
    assert_eq!(dirty(&p.be), Vec::<u64>::new());
    // An address whose range overflows: refused the same way.
    ring_log(&mut p.be, &ring, Some(u64::MAX - 8));
    request(&mut p, &mut guest);
    assert_eq!(p.be.log_failed, 2);
}

/// A SET_LOG_BASE message with any size and offset, as bytes.
fn log_base_bytes(size: u64, offset: u64) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&(FrontendReq::SetLogBase as u32).to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&16u32.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(&offset.to_le_bytes());
    m
}

#[test]
fn hostile_log_bases_are_refused() {
    // (size, offset, fd as mapping finds it, fds sent, the refusal)
    let cases: [(u64, u64, LogFd, usize, BackendError); 7] = [
        // Too small for 4 MiB of guest memory (128 bytes needed).
        (127, 0, LogFd::Shared(4096), 1, BackendError::LogTooSmall),
        // Size plus offset overflows.
        (
            128,
            u64::MAX - 64,
            LogFd::Shared(4096),
            1,
            BackendError::Wire(WireError::RangeOverflow),
        ),
        // Empty.
        (
            0,
            0,
            LogFd::Shared(4096),
            1,
            BackendError::Wire(WireError::EmptyRegion),
        ),
        // No fd.
        (
            128,
            0,
            LogFd::Shared(4096),
            0,
            BackendError::Wire(WireError::MissingFds { needed: 1, got: 0 }),
        ),
        // Offset past the end of the fd, and a range that ends past it.
        (128, 4096, LogFd::Shared(4096), 1, BackendError::LogTooSmall),
        (128, 4000, LogFd::Shared(4096), 1, BackendError::LogTooSmall),
        // Not shared memory.
        (128, 0, LogFd::NotShared, 1, BackendError::LogTooSmall),
    ];
    for (size, offset, fd, nfds, want) in cases {
        let (mut p, _, _) = running(false);
        negotiate(&mut p.be);
        p.be.log_fd = fd;
        let r = p.be.send_raw(&log_base_bytes(size, offset), nfds);
        let got = r.err();
        assert_eq!(got, Some(want), "size {size} offset {offset} {fd:?}");
        assert!(p.be.log.is_none(), "no log mapped");
    }
    // A good one after all that, on a fresh connection: mapped.
    let (mut p, _, _) = running(false);
    negotiate(&mut p.be);
    p.be.log_fd = LogFd::Shared(4096);
    let (_, reply) = p.be.send_raw(&log_base_bytes(128, 4096 - 128), 1).unwrap();
    assert_eq!(u64_reply(&reply), 0);
    assert!(p.be.log.is_some());
}

#[test]
fn logging_is_refused_without_log_shmfd() {
    let (mut p, _, ring) = running(false);
    // The engine negotiated MQ and REPLY_ACK only.
    let r = p.be.send(
        &Request::SetLogBase(LogMsg {
            size: 128,
            offset: 0,
        }),
        false,
    );
    assert_eq!(
        r.err(),
        Some(BackendError::NotNegotiated(FrontendReq::SetLogBase))
    );
    let (o, ack) = p.be.ack(Request::SetLogFd);
    assert_eq!(ack, 1);
    assert_eq!(
        o.refused,
        Some(BackendError::NotNegotiated(FrontendReq::SetLogFd))
    );
    let a = ring.user_addrs();
    let msg = VringAddrMsg {
        index: 0,
        log: true,
        desc: a.desc,
        used: a.device,
        avail: a.driver,
        log_addr: ring.addrs().device,
    };
    let (o, ack) = p.be.ack(Request::SetVringAddr(msg));
    assert_eq!(ack, 1);
    assert_eq!(o.refused, Some(BackendError::LoggingNotSupported));
}

//! Dirty logging end to end over a real socket: our front-end link
//! (`FrontendLink::start_logging`: a sealed memfd shared by SET_LOG_BASE,
//! VHOST_F_LOG_ALL, VHOST_VRING_F_LOG on the running ring) against the
//! `vhost-user-blk` daemon and against the C back-end `examples/c/blk.c`
//! (the C ABI's dirty log), driving blk requests on a split ring in memfd
//! guest memory. The bitmap must hold exactly the pages the daemon wrote
//! (read data buffers, status bytes, the used ring), never those it only
//! read (request headers, write data buffers, the descriptor table, the
//! avail ring), and be empty after it was read and cleared.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{front, CBlk, Daemon};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{FrontendConfig, FrontendError, State};
use vhost_user_core::memory::GuestMemory;
use vhost_user_linux::frontend::{FrontendLink, LinkError};
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_linux::sys::eventfd::EventFd;
use vhost_user_test::driver::{Buf, SplitDriver};

const PAGE: u64 = 4096;
const RAM: u64 = 4 << 20;
const VA: u64 = 0x7f00_0000_0000;
const RING: u16 = 256;
/// Descriptor table on page 1 alone; avail and used rings on page 2.
const RING_AT: u64 = 0x1000;

struct Rig {
    link: FrontendLink<1, 1>,
    mem: LinuxGuestMemory,
    ring: SplitDriver,
}

fn rig(d: &Daemon, protocol: P) -> Rig {
    drop(d.connect());
    rig_at(&d.sock, protocol)
}

fn rig_at(sock: &Path, protocol: P) -> Rig {
    let (mem, region, fd) = front::guest_ram("vhu-dirty-log-test", RAM, VA);
    let ring = SplitDriver::new(&mem, RING, RING_AT, false).unwrap();
    let a = ring.addrs();
    let mut cfg: FrontendConfig<1, 1> =
        FrontendConfig::new(V::VERSION_1 | V::PROTOCOL_FEATURES, protocol);
    cfg.regions.push(region).unwrap();
    cfg.queues.push(front::queue(RING, a, VA, 0)).unwrap();
    let regions: Vec<OwnedFd> = vec![fd];
    let kick = EventFd::new(true).unwrap();
    let call = EventFd::new(true).unwrap();
    let mut link =
        FrontendLink::connect(sock, cfg, regions, vec![Some(kick)], vec![Some(call)]).unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Ready);
    link.engine().start().unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Started);
    Rig { link, mem, ring }
}

/// A blk request: header (type, sector) on `hdr`'s page, `data` bytes at
/// `data` (the device reads them for a write, writes them for a read),
/// the status byte at `status`. Waits for its completion; returns the
/// status.
fn request(r: &mut Rig, write: bool, hdr: u64, data: u64, len: u32, status: u64) -> u8 {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&u32::from(write).to_le_bytes());
    h[8..16].copy_from_slice(&8u64.to_le_bytes());
    r.mem.write(hdr, &h).unwrap();
    r.mem.write(status, &[0xff]).unwrap();
    if write {
        r.mem.write(data, &vec![0x5a; len as usize]).unwrap();
    }
    let d = if write {
        Buf::readable(data, len)
    } else {
        Buf::writable(data, len)
    };
    r.ring
        .post(
            &r.mem,
            &[Buf::readable(hdr, 16), d, Buf::writable(status, 1)],
        )
        .unwrap();
    assert!(r.link.kick(0));
    let t0 = Instant::now();
    loop {
        if r.ring.harvest(&r.mem).unwrap().is_some() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no completion");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut st = [0u8; 1];
    r.mem.read(status, &mut st).unwrap();
    st[0]
}

/// Reads and clears the log until it has shown every page of `want` (the
/// daemon sets a bit after the write it reports, so the used ring's may
/// trail its completion), then once more a moment later: the pages seen.
fn dirty_until(r: &Rig, want: &[u64]) -> Vec<u64> {
    let mut seen = BTreeSet::new();
    let t0 = Instant::now();
    while !want.iter().all(|p| seen.contains(p)) && t0.elapsed() < Duration::from_secs(5) {
        seen.extend(r.link.take_dirty_pages());
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(20));
    seen.extend(r.link.take_dirty_pages());
    seen.into_iter().collect()
}

#[test]
fn the_log_holds_exactly_the_pages_the_daemon_wrote() {
    let d = Daemon::start();
    let r = rig(&d, P::MQ | P::REPLY_ACK | P::LOG_SHMFD);
    logs_exactly_the_pages_written(r, &|| d.log());
}

#[test]
fn the_log_holds_exactly_the_pages_the_c_backend_wrote() {
    let b = CBlk::start(1);
    let r = rig_at(&b.sock, P::MQ | P::REPLY_ACK | P::LOG_SHMFD);
    logs_exactly_the_pages_written(r, &|| b.log());
}

/// Requests before, while and after logging: the log holds the pages the
/// back-end wrote and no other; `log` gives what the back-end logged.
fn logs_exactly_the_pages_written(mut r: Rig, log: &dyn Fn() -> String) {
    let used = r.ring.addrs().device / PAGE;
    assert_eq!(used, 2);
    assert_eq!(r.ring.addrs().desc / PAGE, 1);
    // Before logging: requests leave no trace (there is no log).
    assert_eq!(
        request(&mut r, true, 0x40 * PAGE, 0x50 * PAGE, 4096, 0x60 * PAGE),
        0
    );
    assert!(r.link.take_dirty_pages().is_empty());

    let size = r.link.start_logging().unwrap();
    assert_eq!(size, 128, "4 MiB of guest memory: 1024 bits");
    assert!(r.link.is_logging());
    assert!(r.link.take_dirty_pages().is_empty(), "nothing written yet");

    // A write: the daemon reads the header and the data, writes the
    // status byte and the used ring.
    assert_eq!(
        request(&mut r, true, 0x41 * PAGE, 0x51 * PAGE, 4096, 0x61 * PAGE),
        0
    );
    let want = [used, 0x61];
    assert_eq!(dirty_until(&r, &want), want);

    // A read of 8 KiB across three pages: the data pages too.
    let data = 0x70 * PAGE + 0x800;
    assert_eq!(
        request(&mut r, false, 0x42 * PAGE, data, 8192, 0x62 * PAGE),
        0
    );
    let mut got = vec![0u8; 8192];
    r.mem.read(data, &mut got).unwrap();
    assert!(
        got[..4096].iter().all(|b| *b == 0x5a),
        "the sectors written before read back"
    );
    let want = [used, 0x62, 0x70, 0x71, 0x72];
    assert_eq!(dirty_until(&r, &want), want);
    // Read and cleared.
    assert!(r.link.take_dirty_pages().is_empty());

    // Twice on: refused, logging goes on.
    assert!(matches!(
        r.link.start_logging(),
        Err(LinkError::Engine(FrontendError::AlreadyLogging))
    ));
    assert_eq!(
        request(&mut r, false, 0x43 * PAGE, 0x80 * PAGE, 512, 0x63 * PAGE),
        0
    );
    let want = [used, 0x63, 0x80];
    assert_eq!(dirty_until(&r, &want), want);

    // A ring that starts logged (stopped and started again while logging:
    // its SET_VRING_ADDR carries VHOST_VRING_F_LOG before it runs) marks
    // its used ring too.
    r.link.engine().stop().unwrap();
    r.link.drive().unwrap();
    assert_eq!(r.link.engine().state(), State::Stopped);
    r.link.engine().start().unwrap();
    r.link.drive().unwrap();
    assert_eq!(r.link.engine().state(), State::Started);
    r.link.take_dirty_pages();
    assert_eq!(
        request(&mut r, false, 0x46 * PAGE, 0x84 * PAGE, 512, 0x66 * PAGE),
        0
    );
    let want = [used, 0x66, 0x84];
    assert_eq!(dirty_until(&r, &want), want);

    r.link.stop_logging().unwrap();
    assert!(!r.link.is_logging());
    assert!(matches!(
        r.link.stop_logging(),
        Err(LinkError::Engine(FrontendError::NotLogging))
    ));
    // The daemon goes on serving without a log.
    assert_eq!(
        request(&mut r, false, 0x44 * PAGE, 0x81 * PAGE, 512, 0x64 * PAGE),
        0
    );
    // And logging can start again, with a fresh log.
    r.link.start_logging().unwrap();
    assert!(r.link.take_dirty_pages().is_empty());
    assert_eq!(
        request(&mut r, false, 0x45 * PAGE, 0x82 * PAGE, 512, 0x65 * PAGE),
        0
    );
    let want = [used, 0x65, 0x82];
    assert_eq!(dirty_until(&r, &want), want);
    let log = log();
    assert!(log.contains("dirty log of 128 bytes mapped"), "{log}");
    assert!(log.contains("dirty logging off"), "{log}");
}

#[test]
fn logging_is_refused_by_a_daemon_that_does_not_offer_it() {
    let d = Daemon::start_with(&["--size", "16M", "--no-migration"]);
    let mut r = rig(&d, P::MQ | P::REPLY_ACK | P::LOG_SHMFD);
    assert!(matches!(
        r.link.start_logging(),
        Err(LinkError::Engine(FrontendError::LogAllNotOffered))
    ));
    assert!(!r.link.is_logging());
    // The session goes on.
    assert_eq!(
        request(&mut r, false, 0x40 * PAGE, 0x50 * PAGE, 512, 0x60 * PAGE),
        0
    );

    // Offered, but the front-end did not negotiate LOG_SHMFD.
    let d = Daemon::start();
    let mut r = rig(&d, P::MQ | P::REPLY_ACK);
    assert!(matches!(
        r.link.start_logging(),
        Err(LinkError::Engine(FrontendError::NotNegotiated(_)))
    ));
    assert_eq!(
        request(&mut r, false, 0x40 * PAGE, 0x50 * PAGE, 512, 0x60 * PAGE),
        0
    );
}

//! A blk worker spins (`--spin-us`) after requests it finished at once,
//! with kicks suppressed, but not after requests that waited for the disk
//! (O_DIRECT): their next request comes at the disk's pace, so the worker
//! asks for kicks again and sleeps as soon as the completion is published.
//! Through io_uring and through the thread pool; a quick request after
//! disk I/O brings the spin back.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use common::front;
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_core::memory::GuestMemory;
use vhost_user_linux::frontend::FrontendLink;
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_test::driver::{Buf, SplitDriver};

const MIB: u64 = 1 << 20;
const VA: u64 = 0x7f00_0000_0000;
const SIZE: u16 = 64;
/// Request header, data and status of the one request in flight.
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x12_0000;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// How long the daemon spins before it sleeps.
const SPIN: Duration = Duration::from_secs(2);

fn connect(sock: &std::path::Path) -> (FrontendLink<1, 1>, LinuxGuestMemory, SplitDriver) {
    let (mem, region, fd) = front::guest_ram("blk-notify", 4 * MIB, VA);
    let fds: Vec<OwnedFd> = vec![fd];
    let mut cfg: FrontendConfig<1, 1> =
        FrontendConfig::new(V::VERSION_1 | V::PROTOCOL_FEATURES, P::REPLY_ACK);
    let _ = cfg.regions.push(region);
    let ring = SplitDriver::new(&mem, SIZE, 0x1000, false).unwrap();
    let _ = cfg.queues.push(front::queue(SIZE, ring.addrs(), VA, 0));
    (front::start(sock, cfg, fds), mem, ring)
}

/// Posts one request of `ty` (a 4 KiB read at `sector`, or GET_ID),
/// kicks, and waits for it to be used with status OK.
fn request(
    ring: &mut SplitDriver,
    mem: &LinuxGuestMemory,
    link: &FrontendLink<1, 1>,
    ty: u32,
    sector: u64,
) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write(HDR, &h).unwrap();
    mem.write(STATUS, &[0xff]).unwrap();
    let len = if ty == VIRTIO_BLK_T_GET_ID { 20 } else { 4096 };
    let bufs = [
        Buf::readable(HDR, 16),
        Buf::writable(DATA, len),
        Buf::writable(STATUS, 1),
    ];
    ring.post(mem, &bufs).unwrap();
    assert!(link.kick(0));
    let t0 = Instant::now();
    while ring.harvest_all(mem).unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "request not used");
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut status = [0u8; 1];
    mem.read(STATUS, &mut status).unwrap();
    assert_eq!(status, [0], "request type {ty}");
}

/// Whether the worker asks not to be kicked (used ring NO_NOTIFY).
fn suppressed(ring: &SplitDriver, mem: &LinuxGuestMemory) -> bool {
    ring.used_flags(mem).unwrap() & 1 != 0
}

/// How long kicks stay suppressed from now (at most `limit`).
fn suppressed_for(ring: &SplitDriver, mem: &LinuxGuestMemory, limit: Duration) -> Duration {
    let t0 = Instant::now();
    while suppressed(ring, mem) && t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(1));
    }
    t0.elapsed()
}

#[test]
fn a_worker_does_not_spin_after_disk_io() {
    for aio in ["io_uring", "threads"] {
        // Written blocks: O_DIRECT reads holes or unwritten extents as
        // zeroes without going to the disk (at once, as a GET_ID).
        let dir = common::TempDir::new("blk-notify");
        let (img, mut file) = dir.image(0);
        file.write_all(&vec![0x5a; MIB as usize]).unwrap();
        file.sync_all().unwrap();
        let img = img.to_str().unwrap();
        let spin = SPIN.as_micros().to_string();
        let args = ["--blk-file", img, "--cache", "none", "--aio", aio];
        let mut d = common::Daemon::start_with(&[&args[..], &["--spin-us", &spin]].concat());
        drop(d.connect_retry());
        let (link, mem, mut ring) = connect(&d.sock);

        // Answered at once: the worker spins, kicks suppressed.
        request(&mut ring, &mem, &link, VIRTIO_BLK_T_GET_ID, 0);
        assert!(
            suppressed(&ring, &mem),
            "{aio}: kicks asked for while spinning"
        );
        // After the spin it sleeps: kicks asked for.
        let t = suppressed_for(&ring, &mem, SPIN * 5);
        assert!(t < SPIN * 5, "{aio}: still spinning after {t:?}");

        // A read that waited for the disk: no spin after it.
        for sector in [0, 64, 8] {
            request(&mut ring, &mem, &link, VIRTIO_BLK_T_IN, sector);
            let mut data = [0u8; 4096];
            mem.read(DATA, &mut data).unwrap();
            assert_eq!(data, [0x5a; 4096], "{aio}: sector {sector}");
            let t = suppressed_for(&ring, &mem, SPIN);
            assert!(
                t < SPIN / 4,
                "{aio}: kicks suppressed {t:?} after an O_DIRECT read"
            );
        }

        // A quick request again: the spin is back.
        request(&mut ring, &mem, &link, VIRTIO_BLK_T_GET_ID, 0);
        assert!(suppressed(&ring, &mem), "{aio}: no spin after GET_ID");
        let log = d.log();
        assert!(log.contains(&format!("{aio} I/O")), "{aio}: {log}");
    }
}

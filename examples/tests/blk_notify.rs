//! A blk worker spins (`--spin-us`) after requests it finished at once,
//! with kicks suppressed, but not after requests that waited for the disk
//! (O_DIRECT): their next request comes at the disk's pace, so the worker
//! asks for kicks again and sleeps as soon as the completion is published.
//! Through io_uring and through the thread pool; a quick request after
//! disk I/O brings the spin back. A thread serving a spinning ring and a
//! disk-bound one reaps the latter's completions while it spins.

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
/// Request header, data and status of queue 0's one request in flight;
/// queue `q`'s are `q * QUEUE_STRIDE` further.
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x12_0000;
/// Between the rings, and between the queues' request buffers.
const QUEUE_STRIDE: u64 = 0x4_0000;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// How long the daemon spins before it sleeps.
const SPIN: Duration = Duration::from_secs(2);

/// A front-end with `Q` queues (rings of SIZE) on the daemon at `sock`.
fn connect<const Q: usize>(
    sock: &std::path::Path,
) -> (FrontendLink<Q, 1>, LinuxGuestMemory, Vec<SplitDriver>) {
    let (mem, region, fd) = front::guest_ram("blk-notify", 4 * MIB, VA);
    let fds: Vec<OwnedFd> = vec![fd];
    let mut cfg: FrontendConfig<Q, 1> =
        FrontendConfig::new(V::VERSION_1 | V::PROTOCOL_FEATURES, P::REPLY_ACK);
    let _ = cfg.regions.push(region);
    let mut rings = Vec::new();
    for q in 0..Q as u64 {
        let ring = SplitDriver::new(&mem, SIZE, 0x1000 + q * QUEUE_STRIDE, false).unwrap();
        let _ = cfg.queues.push(front::queue(SIZE, ring.addrs(), VA, 0));
        rings.push(ring);
    }
    (front::start(sock, cfg, fds), mem, rings)
}

/// Where queue `q`'s request puts its header, data and status.
fn bufs_of(q: u16) -> (u64, u64, u64) {
    let at = u64::from(q) * QUEUE_STRIDE;
    (HDR + at, DATA + at, STATUS + at)
}

/// Posts one request of `ty` (a 4 KiB read at `sector`, or GET_ID) on
/// queue `q` and kicks it.
fn post<const Q: usize>(
    ring: &mut SplitDriver,
    mem: &LinuxGuestMemory,
    link: &FrontendLink<Q, 1>,
    q: u16,
    ty: u32,
    sector: u64,
) {
    let (hdr, data, status) = bufs_of(q);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write(hdr, &h).unwrap();
    mem.write(status, &[0xff]).unwrap();
    let len = if ty == VIRTIO_BLK_T_GET_ID { 20 } else { 4096 };
    let bufs = [
        Buf::readable(hdr, 16),
        Buf::writable(data, len),
        Buf::writable(status, 1),
    ];
    ring.post(mem, &bufs).unwrap();
    assert!(link.kick(q));
}

/// Waits for queue `q`'s request to be used with status OK; returns how
/// long that took.
fn wait_used(ring: &mut SplitDriver, mem: &LinuxGuestMemory, q: u16, ty: u32) -> Duration {
    let t0 = Instant::now();
    while ring.harvest_all(mem).unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "request not used");
        std::thread::sleep(Duration::from_micros(200));
    }
    let t = t0.elapsed();
    let mut status = [0u8; 1];
    mem.read(bufs_of(q).2, &mut status).unwrap();
    assert_eq!(status, [0], "request type {ty} on queue {q}");
    t
}

/// [`post`], then [`wait_used`].
fn request<const Q: usize>(
    ring: &mut SplitDriver,
    mem: &LinuxGuestMemory,
    link: &FrontendLink<Q, 1>,
    q: u16,
    ty: u32,
    sector: u64,
) {
    post(ring, mem, link, q, ty, sector);
    wait_used(ring, mem, q, ty);
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

/// An image of written blocks: O_DIRECT reads holes or unwritten
/// extents as zeroes without going to the disk (at once, as a GET_ID).
fn written_image(dir: &common::TempDir) -> String {
    let (img, mut file) = dir.image(0);
    file.write_all(&vec![0x5a; MIB as usize]).unwrap();
    file.sync_all().unwrap();
    img.to_str().unwrap().to_string()
}

#[test]
fn a_worker_does_not_spin_after_disk_io() {
    for aio in ["io_uring", "threads"] {
        let dir = common::TempDir::new("blk-notify");
        let img = written_image(&dir);
        let img = img.as_str();
        let spin = SPIN.as_micros().to_string();
        let args = ["--blk-file", img, "--cache", "none", "--aio", aio];
        let mut d = common::Daemon::start_with(&[&args[..], &["--spin-us", &spin]].concat());
        drop(d.connect_retry());
        let (link, mem, mut rings) = connect::<1>(&d.sock);
        let ring = &mut rings[0];

        // Answered at once: the worker spins, kicks suppressed.
        request(ring, &mem, &link, 0, VIRTIO_BLK_T_GET_ID, 0);
        assert!(
            suppressed(ring, &mem),
            "{aio}: kicks asked for while spinning"
        );
        // After the spin it sleeps: kicks asked for.
        let t = suppressed_for(ring, &mem, SPIN * 5);
        assert!(t < SPIN * 5, "{aio}: still spinning after {t:?}");

        // A read that waited for the disk: no spin after it.
        for sector in [0, 64, 8] {
            request(ring, &mem, &link, 0, VIRTIO_BLK_T_IN, sector);
            let mut data = [0u8; 4096];
            mem.read(DATA, &mut data).unwrap();
            assert_eq!(data, [0x5a; 4096], "{aio}: sector {sector}");
            let t = suppressed_for(ring, &mem, SPIN);
            assert!(
                t < SPIN / 4,
                "{aio}: kicks suppressed {t:?} after an O_DIRECT read"
            );
        }

        // A quick request again: the spin is back.
        request(ring, &mem, &link, 0, VIRTIO_BLK_T_GET_ID, 0);
        assert!(suppressed(ring, &mem), "{aio}: no spin after GET_ID");
        let log = d.log();
        assert!(log.contains(&format!("{aio} I/O")), "{aio}: {log}");
    }
}

/// One worker thread serving two rings: one spinning after a GET_ID, one
/// whose requests go to the disk. The thread spins for the first; the
/// second's O_DIRECT reads complete during that spin (their completions
/// are reaped by it, not left until it sleeps), and once the spin is over
/// both rings ask for kicks again and are served on them.
#[test]
fn a_spinning_thread_serves_a_disk_bound_ring_beside_it() {
    for aio in ["io_uring", "threads"] {
        let dir = common::TempDir::new("blk-notify-mixed");
        let img = written_image(&dir);
        // A long spin: a read that waited for it to end would take
        // seconds.
        let spin = Duration::from_secs(6);
        let spin_us = spin.as_micros().to_string();
        let args = [
            "--blk-file",
            &img,
            "--cache",
            "none",
            "--aio",
            aio,
            "--num-queues",
            "2",
            "--threads",
            "1",
            "--spin-us",
            &spin_us,
        ];
        let mut d = common::Daemon::start_with(&args);
        drop(d.connect_retry());
        let (link, mem, mut rings) = connect::<2>(&d.sock);
        let (r0, r1) = rings.split_at_mut(1);
        let (quick, disk) = (&mut r0[0], &mut r1[0]);

        let t0 = Instant::now();
        request(quick, &mem, &link, 0, VIRTIO_BLK_T_GET_ID, 0);
        assert!(suppressed(quick, &mem), "{aio}: no spin after GET_ID");
        for sector in [0, 64, 8, 128] {
            post(disk, &mem, &link, 1, VIRTIO_BLK_T_IN, sector);
            let t = wait_used(disk, &mem, 1, VIRTIO_BLK_T_IN);
            assert!(
                t < spin / 3,
                "{aio}: a read took {t:?} beside a spinning ring"
            );
            let mut data = [0u8; 4096];
            mem.read(bufs_of(1).1, &mut data).unwrap();
            assert_eq!(data, [0x5a; 4096], "{aio}: sector {sector}");
        }
        // Still inside the spin: the thread polls both rings. (Each read
        // took a third of the spin at most, against the rest of the spin
        // had it waited for the spin's end; on a loaded machine the four
        // may take half of it together.)
        let elapsed = t0.elapsed();
        assert!(
            suppressed(quick, &mem),
            "{aio}: the spin ended early ({elapsed:?} in)"
        );

        // The spin runs out (no request on the quick ring since): both
        // rings ask for kicks, and a kick on each is served.
        for r in [&*quick, &*disk] {
            let t = suppressed_for(r, &mem, spin * 3);
            assert!(t < spin * 3, "{aio}: still spinning after {t:?}");
        }
        request(disk, &mem, &link, 1, VIRTIO_BLK_T_IN, 256);
        request(quick, &mem, &link, 0, VIRTIO_BLK_T_GET_ID, 0);
        let log = d.log();
        assert!(log.contains("queue 0,1 -> thread 0"), "{aio}: {log}");
        assert!(!log.contains("ERROR"), "{aio}: {log}");
    }
}

//! A worker that busy-polls (`--spin-us`) keeps the driver from kicking
//! while it polls and asks for kicks again before it sleeps: a front-end
//! without EVENT_IDX (DPDK's virtio_user) otherwise makes a system call
//! per batch for kicks nobody waits for (and a guest a VM exit). Split
//! (used ring flags NO_NOTIFY; with EVENT_IDX avail_event left behind)
//! and packed (device event suppression DISABLE/ENABLE); a
//! kick after the worker slept still wakes it; a worker that does not
//! poll never suppresses kicks. And what the null backend writes into
//! receive buffers, whole or split.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{front, TempDir};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_core::memory::GuestMemory;
use vhost_user_linux::frontend::FrontendLink;
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_test::driver::{Buf, PackedDriver, SplitDriver};

const MIB: u64 = 1 << 20;
const VA: u64 = 0x7f00_0000_0000;
const SIZE: u16 = 64;
const TX_BUFS: u64 = 0x20_0000;
/// VERSION_1 header and a minimal Ethernet frame.
const LEN: u32 = 12 + 60;
/// How long the polling daemon spins before it sleeps.
const SPIN: Duration = Duration::from_secs(1);

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon(dir: &Path, sock: &Path, spin_us: u128) -> Kill {
    let log = std::fs::File::create(dir.join("net.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vhost-user-net"))
        .arg("--socket-path")
        .arg(sock)
        .args(["--backend", "null", "--threads", "1"])
        .args(["--spin-us", &spin_us.to_string()])
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start vhost-user-net");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    Kill(child)
}

enum Ring {
    Split(SplitDriver, bool),
    Packed(PackedDriver),
}

impl Ring {
    fn post(&mut self, mem: &LinuxGuestMemory) {
        let b = Buf::readable(TX_BUFS, LEN);
        match self {
            Ring::Split(d, _) => d.post(mem, &[b]).map(drop).unwrap(),
            Ring::Packed(d) => d.post(mem, &[b]).map(drop).unwrap(),
        }
    }

    fn harvest(&mut self, mem: &LinuxGuestMemory) -> usize {
        match self {
            Ring::Split(d, _) => d.harvest_all(mem).unwrap().len(),
            Ring::Packed(d) => d.harvest_all(mem).unwrap().len(),
        }
    }

    /// Whether the device asks not to be kicked now.
    fn suppressed(&self, mem: &LinuxGuestMemory) -> bool {
        match self {
            Ring::Split(d, false) => d.used_flags(mem).unwrap() & 1 != 0,
            Ring::Split(d, true) => {
                // The driver's next post (idx -> idx + 1) kicks only if
                // avail_event is idx.
                let mut idx = [0u8; 2];
                mem.read(d.addrs().driver + 2, &mut idx).unwrap();
                d.avail_event(mem).unwrap() != u16::from_le_bytes(idx)
            }
            Ring::Packed(d) => {
                let mut f = [0u8; 2];
                mem.read(d.addrs().device + 2, &mut f).unwrap();
                // 0 ENABLE, 1 DISABLE, 2 DESC (EVENT_IDX, not negotiated).
                match u16::from_le_bytes(f) {
                    0 => false,
                    1 => true,
                    v => panic!("device event flags {v}"),
                }
            }
        }
    }
}

/// Posts one transmit chain, kicks if asked, and waits for it to be used.
fn send(ring: &mut Ring, mem: &LinuxGuestMemory, link: &FrontendLink<2, 1>, kick: bool) {
    ring.post(mem);
    if kick {
        assert!(link.kick(1));
    }
    let t0 = Instant::now();
    while ring.harvest(mem) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the chain was not used"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A started link to the daemon at `sock`; its receive and transmit
/// rings.
fn connect(
    sock: &Path,
    packed: bool,
    event_idx: bool,
) -> (FrontendLink<2, 1>, LinuxGuestMemory, Ring, Ring) {
    let (mem, region, fd) = front::guest_ram("net-notify", 4 * MIB, VA);
    let fds: Vec<OwnedFd> = vec![fd];
    let mut features = V::VERSION_1 | V::PROTOCOL_FEATURES;
    if packed {
        features |= V::RING_PACKED;
    }
    if event_idx {
        features |= V::EVENT_IDX;
    }
    let mut cfg: FrontendConfig<2, 1> = FrontendConfig::new(features, P::MQ | P::REPLY_ACK);
    let _ = cfg.regions.push(region);
    let mut rings = Vec::new();
    for q in 0..2u64 {
        let at = 0x1000 + 0x8000 * q;
        let (ring, a, base) = if packed {
            let r = PackedDriver::new(&mem, SIZE, at).unwrap();
            let a = r.addrs();
            (Ring::Packed(r), a, 1 << 15 | 1 << 31)
        } else {
            let r = SplitDriver::new(&mem, SIZE, at, event_idx).unwrap();
            let a = r.addrs();
            (Ring::Split(r, event_idx), a, 0)
        };
        let _ = cfg.queues.push(front::queue(SIZE, a, VA, base));
        rings.push(ring);
    }
    let mut link = front::start(sock, cfg, fds);
    assert_eq!(link.engine().features().contains(V::EVENT_IDX), event_idx);
    let tx = rings.pop().unwrap();
    (link, mem, rings.pop().unwrap(), tx)
}

fn polling(packed: bool, event_idx: bool) {
    let dir = TempDir::new("net-notify");
    let sock = dir.0.join("net.sock");
    let _d = daemon(&dir.0, &sock, SPIN.as_micros());
    let (link, mem, _, mut tx) = connect(&sock, packed, event_idx);

    // Kicked once, the worker works and then polls: kicks suppressed.
    send(&mut tx, &mem, &link, true);
    assert!(
        tx.suppressed(&mem),
        "kicks asked for while the worker polls"
    );
    // Polled, not kicked: it is still served while the worker spins.
    send(&mut tx, &mem, &link, false);
    assert!(tx.suppressed(&mem));

    // After the spin the worker sleeps: kicks asked for again.
    let t0 = Instant::now();
    while tx.suppressed(&mem) {
        assert!(
            t0.elapsed() < SPIN * 10,
            "kicks still suppressed {:?} after the last request",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // And a kick wakes it.
    send(&mut tx, &mem, &link, true);
    assert!(tx.suppressed(&mem));
}

#[test]
fn a_polling_worker_suppresses_kicks_split() {
    polling(false, false);
}

#[test]
fn a_polling_worker_suppresses_kicks_split_event_idx() {
    polling(false, true);
}

#[test]
fn a_polling_worker_suppresses_kicks_packed() {
    polling(true, false);
}

#[test]
fn a_worker_that_does_not_poll_keeps_kicks_on() {
    for (packed, event_idx) in [(false, false), (false, true), (true, false)] {
        let dir = TempDir::new("net-notify");
        let sock = dir.0.join("net.sock");
        let _d = daemon(&dir.0, &sock, 0);
        let (link, mem, _, mut tx) = connect(&sock, packed, event_idx);
        for _ in 0..3 {
            send(&mut tx, &mem, &link, true);
            assert!(!tx.suppressed(&mem), "packed {packed}");
        }
    }
}

/// The null backend's frame in a receive buffer: the 12-byte header
/// (`num_buffers` 1, the rest 0) and the template (broadcast, our MAC,
/// EtherType 0x88b5, the payload counting up), the same whether the
/// buffer is one descriptor or the header has one of its own; a buffer
/// too small for both gets nothing.
#[test]
fn null_receive_buffers_get_the_header_and_the_template() {
    const RX_BUFS: u64 = 0x30_0000;
    for packed in [false, true] {
        let dir = TempDir::new("net-null-rx");
        let sock = dir.0.join("net.sock");
        let _d = daemon(&dir.0, &sock, 0);
        let (link, mem, mut rx, _) = connect(&sock, packed, false);
        let mut expect = [0u8; 12 + 60];
        expect[10] = 1;
        expect[12..18].copy_from_slice(&[0xff; 6]);
        expect[18..24].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        expect[24..26].copy_from_slice(&[0x88, 0xb5]);
        for (i, b) in expect[26..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let (one, hdr, rest, small) = (
            RX_BUFS,
            RX_BUFS + 0x1000,
            RX_BUFS + 0x2000,
            RX_BUFS + 0x3000,
        );
        mem.write(one, &[0xee; 0x4000]).unwrap();
        let chains: [&[Buf]; 3] = [
            &[Buf::writable(one, 2048)],
            &[Buf::writable(hdr, 12), Buf::writable(rest, 2048)],
            &[Buf::writable(small, 71)],
        ];
        for bufs in chains {
            match &mut rx {
                Ring::Split(d, _) => d.post(&mem, bufs).map(drop).unwrap(),
                Ring::Packed(d) => d.post(&mem, bufs).map(drop).unwrap(),
            }
        }
        assert!(link.kick(0));
        let t0 = Instant::now();
        let mut used = Vec::new();
        while used.len() < 3 {
            assert!(t0.elapsed() < Duration::from_secs(10), "used {used:?}");
            used.extend(match &mut rx {
                Ring::Split(d, _) => d.harvest_all(&mem).unwrap(),
                Ring::Packed(d) => d.harvest_all(&mem).unwrap(),
            });
            std::thread::sleep(Duration::from_millis(1));
        }
        let lens: Vec<u32> = used.iter().map(|u| u.len).collect();
        assert_eq!(lens, [72, 72, 0], "packed {packed}");
        let read = |at: u64, len: usize| {
            let mut b = vec![0u8; len];
            mem.read(at, &mut b).unwrap();
            b
        };
        assert_eq!(
            read(one, 73)[..72],
            expect[..],
            "packed {packed}: one buffer"
        );
        assert_eq!(
            read(one + 72, 1),
            [0xee],
            "packed {packed}: nothing past the frame"
        );
        assert_eq!(
            read(hdr, 12),
            expect[..12],
            "packed {packed}: the header's own"
        );
        assert_eq!(
            read(rest, 60),
            expect[12..],
            "packed {packed}: the frame's own"
        );
        assert_eq!(read(small, 71), [0xee; 71], "packed {packed}: too small");
    }
}

/// The null backend drops what is transmitted without reading it, and
/// counts it as a copy would: a frame's bytes, and an error for a chain
/// with a device-writable buffer, one shorter than a header and an
/// Ethernet header, or one longer than the largest frame.
#[test]
fn null_transmit_counts_frames_and_refuses_bad_chains() {
    let dir = TempDir::new("net-null-tx");
    let sock = dir.0.join("net.sock");
    let d = daemon(&dir.0, &sock, 0);
    let (link, mem, _, mut tx) = connect(&sock, false, false);
    let Ring::Split(ring, _) = &mut tx else {
        unreachable!()
    };
    let chains: [&[Buf]; 5] = [
        &[Buf::readable(TX_BUFS, LEN)],
        &[
            Buf::readable(TX_BUFS, 12),
            Buf::readable(TX_BUFS + 0x1000, 1000),
        ],
        &[Buf::readable(TX_BUFS, 12 + 13)],
        &[
            Buf::readable(TX_BUFS, 12),
            Buf::writable(TX_BUFS + 0x1000, 60),
        ],
        &[Buf::readable(TX_BUFS, 12 + 4000)],
    ];
    for bufs in chains {
        ring.post(&mem, bufs).unwrap();
    }
    assert!(link.kick(1));
    let t0 = Instant::now();
    let mut used = 0;
    while used < chains.len() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{used} used");
        used += ring.harvest_all(&mem).unwrap().len();
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(link);
    let t0 = Instant::now();
    let log = loop {
        let log = std::fs::read_to_string(dir.0.join("net.log")).unwrap();
        if log.contains("queue 1 (tx)") {
            break log;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{log}");
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(d);
    assert!(
        log.contains("queue 1 (tx): 2 packets, 1060 bytes, 0 drops, 3 errors"),
        "{log}"
    );
}

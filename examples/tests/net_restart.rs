//! A vhost-user-net daemon killed (SIGKILL) while it holds receive chains,
//! restarted, and reconnected from the used index (as QEMU restarts a
//! crashed back-end; the net daemon offers no inflight area): with
//! IN_ORDER the new daemon takes back exactly the chains that were in
//! flight, so every receive buffer posted before the crash is filled
//! afterwards, in order, and no descriptor is lost (split and packed).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{front, TempDir};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{FrontendConfig, State};
use vhost_user_core::memory::GuestMemory;
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_test::driver::{Buf, PackedDriver, SplitDriver, Used};

const MIB: u64 = 1 << 20;
const VA: u64 = 0x7f00_0000_0000;
const SIZE: u16 = 64;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
/// VERSION_1 header.
const HDR: usize = 12;
const FRAME: usize = 60;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon on `sock`, its log appended to `dir/net.log`.
fn daemon(dir: &Path, sock: &Path) -> Kill {
    let _ = std::fs::remove_file(sock);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("net.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vhost-user-net"))
        .arg("--socket-path")
        .arg(sock)
        .args(["--backend", "loopback", "--no-mrg-rxbuf"])
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
    Split(SplitDriver),
    Packed(PackedDriver),
}

impl Ring {
    fn post(&mut self, mem: &LinuxGuestMemory, b: Buf) -> u16 {
        match self {
            Ring::Split(d) => d.post(mem, &[b]).unwrap(),
            Ring::Packed(d) => d.post(mem, &[b]).unwrap(),
        }
    }

    fn harvest(&mut self, mem: &LinuxGuestMemory) -> Vec<Used> {
        match self {
            Ring::Split(d) => d.harvest_all(mem).unwrap(),
            Ring::Packed(d) => d.harvest_all(mem).unwrap(),
        }
    }

    /// The base to restart a dead back-end from: the used position (packed:
    /// in the 16-bit form, used = avail there).
    fn restart_base(&self, mem: &LinuxGuestMemory) -> u32 {
        match self {
            Ring::Split(d) => u32::from(d.used_idx(mem).unwrap()),
            Ring::Packed(d) => {
                let (pos, wrap) = d.next_used();
                u32::from(pos) | u32::from(wrap) << 15
            }
        }
    }
}

fn frame(i: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR + FRAME];
    f[HDR..HDR + 6].copy_from_slice(&[0xff; 6]);
    f[HDR + 12..HDR + 14].copy_from_slice(&[0x88, 0xb5]);
    for (k, b) in f[HDR + 14..].iter_mut().enumerate() {
        *b = i.wrapping_add(k as u8);
    }
    f
}

/// Waits until `ring` has given back `n` more used entries.
fn wait_used(ring: &mut Ring, mem: &LinuxGuestMemory, n: usize) -> Vec<Used> {
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < n {
        got.extend(ring.harvest(mem));
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} of {n} used entries",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

fn run(packed: bool) {
    let dir = TempDir::new("net-restart");
    let sock: PathBuf = dir.0.join("net.sock");
    let d = daemon(&dir.0, &sock);

    let (mem, region, fd) = front::guest_ram("net-restart", 4 * MIB, VA);
    let fds: Vec<OwnedFd> = vec![fd.try_clone().unwrap()];

    let mut features = V::VERSION_1 | V::PROTOCOL_FEATURES | V::IN_ORDER;
    if packed {
        features |= V::RING_PACKED;
    }
    let mut cfg: FrontendConfig<2, 1> = FrontendConfig::new(features, P::MQ | P::REPLY_ACK);
    let _ = cfg.regions.push(region);
    let mut rings = Vec::new();
    for q in 0..2u64 {
        let at = 0x1000 + 0x8000 * q;
        let (ring, a, base) = if packed {
            let mut r = PackedDriver::new(&mem, SIZE, at).unwrap();
            r.set_in_order();
            let a = r.addrs();
            (Ring::Packed(r), a, 1 << 15 | 1 << 31)
        } else {
            let mut r = SplitDriver::new(&mem, SIZE, at, false).unwrap();
            r.set_in_order();
            let a = r.addrs();
            (Ring::Split(r), a, 0)
        };
        let _ = cfg.queues.push(front::queue(SIZE, a, VA, base));
        rings.push(ring);
    }
    let mut link = front::start(&sock, cfg, fds);
    assert!(link.engine().features().contains(V::IN_ORDER));

    // Eight receive buffers, taken and held by the daemon (nothing to
    // receive yet).
    let rx_ids: Vec<u16> = (0..8)
        .map(|i| rings[0].post(&mem, Buf::writable(RX_BUFS + 0x800 * i, 0x800)))
        .collect();
    assert!(link.kick(0));
    // One frame through, so the daemon is known to hold the buffers.
    let f = frame(0);
    mem.write(TX_BUFS, &f).unwrap();
    rings[1].post(&mem, Buf::readable(TX_BUFS, f.len() as u32));
    assert!(link.kick(1));
    let first = wait_used(&mut rings[0], &mem, 1);
    assert_eq!(
        (first[0].id, first[0].len as usize),
        (rx_ids[0], HDR + FRAME)
    );
    wait_used(&mut rings[1], &mem, 1);

    // The daemon dies holding seven receive chains.
    drop(d);
    let _d = daemon(&dir.0, &sock);
    let bases: Vec<u32> = rings.iter().map(|r| r.restart_base(&mem)).collect();
    link.reconnect(&sock, &bases, Duration::from_secs(10))
        .unwrap();
    assert_eq!(link.engine().state(), State::Started);

    // Seven frames: each fills the next buffer posted before the crash.
    for i in 1..8u8 {
        let f = frame(i);
        let at = TX_BUFS + 0x100 * u64::from(i);
        mem.write(at, &f).unwrap();
        rings[1].post(&mem, Buf::readable(at, f.len() as u32));
    }
    assert!(link.kick(1));
    let got = wait_used(&mut rings[0], &mem, 7);
    let ids: Vec<u16> = got.iter().map(|u| u.id).collect();
    assert_eq!(
        ids,
        rx_ids[1..],
        "every held buffer, in order (packed {packed})"
    );
    for (i, u) in got.iter().enumerate() {
        assert_eq!(u.len as usize, HDR + FRAME);
        let at = RX_BUFS + 0x800 * (i as u64 + 1) + HDR as u64;
        let mut b = vec![0u8; FRAME];
        mem.read(at, &mut b).unwrap();
        assert_eq!(b, frame(i as u8 + 1)[HDR..], "frame {}", i + 1);
    }
    assert_eq!(wait_used(&mut rings[1], &mem, 7).len(), 7);
    std::thread::sleep(Duration::from_millis(50));
    assert!(rings[0].harvest(&mem).is_empty(), "nothing twice");
}

#[test]
fn a_killed_net_daemon_takes_back_the_receive_chains_it_held_split() {
    run(false);
}

#[test]
fn a_killed_net_daemon_takes_back_the_receive_chains_it_held_packed() {
    run(true);
}

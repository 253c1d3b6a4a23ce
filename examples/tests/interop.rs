//! Our front-end (the core engine driven by `adapter-linux`'s
//! `FrontendLink`) against real back-ends started by the test:
//! qemu-storage-daemon on a raw file, and our `vhost-user-blk`. Guest
//! memory is two memfd regions at distinct guest addresses with non-zero
//! fd offsets; rings are split, with EVENT_IDX and indirect descriptors.
//! Each test writes, reads back and compares, and checks the file from the
//! host side (or, on null-co and our `--null`, that reads return zeroes);
//! with CONFIGURE_MEM_SLOTS the memory goes by ADD_MEM_REG; runs start the
//! rings at 65530 so the 16-bit indices wrap, stop and restart from the
//! bases GET_VRING_BASE returned, and (our daemon only) use packed rings.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{Event, FrontendConfig, NotifyMode, QueueConfig, State};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::MemRegionMsg;
use vhost_user_core::vring::RingAddrs;
use vhost_user_linux::frontend::FrontendLink;
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_linux::sys::eventfd::EventFd;
use vhost_user_linux::sys::memfd;
use vhost_user_test::{Buf, PackedDriver, SplitDriver, Used};

const MIB: u64 = 1 << 20;
/// Two regions: guest addresses and fd offsets both non-zero for one.
const REGIONS: [(u64, u64); 2] = [(0, MIB), (0x4000_0000, MIB)];
/// Front-end virtual addresses: guest address + this.
const VA: u64 = 0x7f00_0000_0000;
const QS: u16 = 64;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Qsd,
    Ours,
}

/// What the peer serves.
#[derive(Clone, Copy, PartialEq)]
enum Backing {
    /// A raw file (checked from the host side).
    File,
    /// No data: qsd's null-co with read-zeroes=on, our `--null`; writes
    /// are dropped and reads return zeroes.
    Null,
}

fn start_peer(peer: Peer, backing: Backing, sock: &Path, image: &Path, queues: u16) -> Kill {
    let mut child = match peer {
        Peer::Qsd => Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(match backing {
                Backing::File => format!("driver=file,node-name=n0,filename={}", image.display()),
                Backing::Null => "driver=null-co,node-name=n0,size=16777216,read-zeroes=on".into(),
            })
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon"),
        Peer::Ours => Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
            .arg("--socket-path")
            .arg(sock)
            .args(match backing {
                Backing::File => vec!["--blk-file".into(), image.as_os_str().to_owned()],
                Backing::Null => vec!["--null".into(), "--size".into(), "16M".into()],
            })
            .args(["--num-queues", &queues.to_string(), "--log-level", "warn"])
            .stderr(Stdio::null())
            .spawn()
            .expect("vhost-user-blk"),
    };
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(child.try_wait().unwrap().is_none(), "back-end exited");
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    Kill(child)
}

/// Guest memory: one memfd of 3 MiB; region i is its MiB i + 1.
fn memory() -> (LinuxGuestMemory, Vec<OwnedFd>, Vec<MemRegionMsg>) {
    let fd = memfd::create("guest", 3 * MIB).unwrap();
    let mut mem = LinuxGuestMemory::new();
    let mut fds = Vec::new();
    let mut regions = Vec::new();
    for (i, (gpa, size)) in REGIONS.iter().enumerate() {
        let r = MemRegionMsg {
            guest_addr: *gpa,
            size: *size,
            user_addr: gpa + VA,
            mmap_offset: (i as u64 + 1) * MIB,
            xen: None,
        };
        mem.map(i, r, fd.try_clone().unwrap()).unwrap();
        fds.push(fd.try_clone().unwrap());
        regions.push(r);
    }
    (mem, fds, regions)
}

fn va(a: RingAddrs) -> RingAddrs {
    RingAddrs {
        desc: a.desc + VA,
        driver: a.driver + VA,
        device: a.device + VA,
    }
}

/// One ring's driver side.
enum Ring {
    Split(SplitDriver),
    Packed(PackedDriver),
}

impl Ring {
    /// Posts `bufs` (through an indirect table at `table` if `indirect`).
    fn post(&mut self, mem: &LinuxGuestMemory, bufs: &[Buf], indirect: bool, table: u64) -> u16 {
        match (self, indirect) {
            (Ring::Split(d), false) => d.post(mem, bufs).unwrap(),
            (Ring::Split(d), true) => {
                let h = d.add_indirect(mem, table, bufs).unwrap();
                d.publish(mem).unwrap();
                h
            }
            (Ring::Packed(d), false) => d.post(mem, bufs).unwrap(),
            (Ring::Packed(d), true) => d.post_indirect(mem, table, bufs).unwrap(),
        }
    }

    fn kick_needed(&mut self, mem: &LinuxGuestMemory) -> bool {
        match self {
            Ring::Split(d) => d.kick_needed(mem).unwrap(),
            Ring::Packed(d) => d.kick_needed(mem).unwrap(),
        }
    }

    fn harvest(&mut self, mem: &LinuxGuestMemory) -> Option<Used> {
        match self {
            Ring::Split(d) => d.harvest(mem).unwrap(),
            Ring::Packed(d) => d.harvest(mem).unwrap(),
        }
    }

    /// The base GET_VRING_BASE must return once every request completed
    /// (packed: avail and used positions with their wrap counters).
    fn base(&self) -> u32 {
        match self {
            Ring::Split(d) => u32::from(d.last_used()),
            Ring::Packed(d) => {
                let (idx, wrap) = d.next_avail();
                let half = u32::from(idx) | u32::from(wrap) << 15;
                half | half << 16
            }
        }
    }
}

/// One interop run.
#[derive(Clone, Copy)]
struct Run {
    peer: Peer,
    backing: Backing,
    queues: u16,
    /// Negotiate CONFIGURE_MEM_SLOTS (memory by ADD_MEM_REG).
    slots: bool,
    /// Split rings start at this index (65530: the indices wrap).
    base: u16,
    packed: bool,
    /// Stop, start again from the returned bases and run more rounds.
    restart: bool,
}

const RUN: Run = Run {
    peer: Peer::Qsd,
    backing: Backing::File,
    queues: 1,
    slots: false,
    base: 0,
    packed: false,
    restart: false,
};

/// Rounds of write-then-read per queue and start; with base 65530 they
/// cross 65535.
const ROUNDS: u64 = 40;

/// Runs [`ROUNDS`] of write-then-read on every queue and checks the data
/// in guest memory and (for a file) on the image; stops and checks the
/// bases GET_VRING_BASE returns; with `restart`, does it all once more.
fn exchange(run: Run) {
    let d = common::TempDir::new("interop");
    let image = d.0.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let sock = d.0.join("blk.sock");
    let _peer = start_peer(run.peer, run.backing, &sock, &image, run.queues);

    let (mem, fds, regions) = memory();
    let mut features = V::VERSION_1 | V::PROTOCOL_FEATURES | V::EVENT_IDX | V::INDIRECT_DESC;
    if run.packed {
        features |= V::RING_PACKED;
    }
    let mut protocol = P::MQ | P::REPLY_ACK | P::CONFIG | P::STATUS;
    if run.slots {
        protocol |= P::CONFIGURE_MEM_SLOTS;
    }
    let mut cfg: FrontendConfig<4, 2> = FrontendConfig::new(features, protocol);
    for r in &regions {
        cfg.regions.push(*r).unwrap();
    }
    // Ring q lives in region q % 2.
    let mut rings = Vec::new();
    for q in 0..run.queues {
        let at = REGIONS[usize::from(q % 2)].0 + 0x1000 + 0x8000 * u64::from(q / 2);
        let (ring, addrs, base) = if run.packed {
            let drv = PackedDriver::new(&mem, QS, at).unwrap();
            let a = drv.addrs();
            // Avail and used at 0, both wrap counters 1.
            (Ring::Packed(drv), a, 1 << 15 | 1 << 31)
        } else {
            let mut drv = SplitDriver::new(&mem, QS, at, true).unwrap();
            drv.start_at(&mem, run.base).unwrap();
            let a = drv.addrs();
            (Ring::Split(drv), a, u32::from(run.base))
        };
        cfg.queues
            .push(QueueConfig {
                size: QS,
                addrs: va(addrs),
                base,
                kick: NotifyMode::Eventfd,
                call: NotifyMode::Eventfd,
            })
            .unwrap();
        rings.push(ring);
    }
    let kicks: Vec<Option<EventFd>> = (0..run.queues)
        .map(|_| Some(EventFd::new(true).unwrap()))
        .collect();
    let calls: Vec<EventFd> = (0..run.queues)
        .map(|_| EventFd::new(true).unwrap())
        .collect();
    let call_dups: Vec<Option<EventFd>> = calls
        .iter()
        .map(|c| {
            Some(EventFd::from(
                std::os::fd::AsFd::as_fd(c).try_clone_to_owned().unwrap(),
            ))
        })
        .collect();
    // The socket file may appear just before the peer listens on it.
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "peer never listened"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut link = FrontendLink::connect(&sock, cfg, fds, kicks, call_dups).unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Ready);
    assert_eq!(
        link.engine().features() & features,
        features,
        "the peer offers what we test"
    );
    if run.slots {
        assert!(link
            .engine()
            .protocol_features()
            .contains(P::CONFIGURE_MEM_SLOTS));
    }
    let starts = if run.restart { 2 } else { 1 };
    for start in 0..starts {
        link.engine().start().unwrap();
        link.drive().unwrap();
        assert_eq!(link.engine().state(), State::Started);
        assert!(link.take_events().contains(&Event::Started));
        for q in 0..run.queues {
            rounds(&run, &mem, &mut link, &calls, &mut rings, &image, q, start);
        }
        link.engine().stop().unwrap();
        link.drive().unwrap();
        assert_eq!(link.engine().state(), State::Stopped);
        for (q, ring) in rings.iter().enumerate() {
            assert_eq!(
                link.engine().ring_base(q as u16),
                Some(ring.base()),
                "GET_VRING_BASE of queue {q}, start {start}"
            );
        }
    }
    if !run.packed {
        let expect = run.base.wrapping_add((2 * ROUNDS * starts) as u16);
        assert_eq!(link.engine().ring_base(0), Some(u32::from(expect)));
    }
}

/// [`ROUNDS`] of write-then-read on queue `q`.
#[allow(clippy::too_many_arguments)]
fn rounds(
    run: &Run,
    mem: &LinuxGuestMemory,
    link: &mut FrontendLink<4, 2>,
    calls: &[EventFd],
    rings: &mut [Ring],
    image: &Path,
    q: u16,
    start: u64,
) {
    let ring = &mut rings[usize::from(q)];
    for r in 0..ROUNDS {
        let sector = ((start * u64::from(run.queues) + u64::from(q)) * ROUNDS + r) * 8;
        let pattern: Vec<u8> = (0..4096u32)
            .map(|i| (i as u8) ^ (r as u8) ^ (q as u8 * 17) ^ (start as u8 * 101))
            .collect();
        for write in [true, false] {
            // Data buffers in region 1 (high guest addresses), headers in
            // region 0.
            let hdr = 0x10_0000 - 0x1000 * (u64::from(q) + 1);
            let data = REGIONS[1].0 + 0x10000 * (u64::from(q) + 1);
            let status = hdr + 0x100;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&u32::from(write).to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write(hdr, &h).unwrap();
            mem.write(status, &[0xff]).unwrap();
            if write {
                mem.write(data, &pattern).unwrap();
            } else {
                mem.write(data, &[0xa5u8; 4096]).unwrap();
            }
            let bufs = [
                Buf::readable(hdr, 16),
                if write {
                    Buf::readable(data, 4096)
                } else {
                    Buf::writable(data, 4096)
                },
                Buf::writable(status, 1),
            ];
            // Every other request through an indirect table.
            let id = ring.post(mem, &bufs, r % 2 == 1, hdr + 0x200);
            if ring.kick_needed(mem) {
                assert!(link.kick(q));
            }
            let t0 = Instant::now();
            let used = loop {
                if let Some(u) = ring.harvest(mem) {
                    break u;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "no completion on queue {q}"
                );
                let _ = calls[usize::from(q)].wait(Some(Duration::from_millis(5)));
            };
            assert_eq!(used.id, id, "queue {q} round {r}: the request posted");
            let mut st = [0u8; 1];
            mem.read(status, &mut st).unwrap();
            assert_eq!(st[0], 0, "status, queue {q} round {r}");
            if write {
                assert_eq!(used.len, 1);
            } else {
                assert_eq!(used.len, 4097);
                let mut got = vec![0u8; 4096];
                mem.read(data, &mut got).unwrap();
                let want = match run.backing {
                    Backing::File => pattern.clone(),
                    Backing::Null => vec![0u8; 4096],
                };
                assert_eq!(got, want, "read back, queue {q} round {r}");
            }
        }
        if run.backing == Backing::File {
            // The host side of the file agrees.
            let mut disk = vec![0u8; 4096];
            std::fs::File::open(image)
                .unwrap()
                .read_exact_at(&mut disk, sector * 512)
                .unwrap();
            assert_eq!(disk, pattern, "image, queue {q} round {r}");
        }
    }
}

#[test]
fn qsd_two_queues_set_mem_table() {
    exchange(Run { queues: 2, ..RUN });
}

#[test]
fn qsd_add_mem_reg_and_index_wrap_then_restart() {
    exchange(Run {
        slots: true,
        base: 65530,
        restart: true,
        ..RUN
    });
}

#[test]
fn qsd_null_co_two_queues_restart() {
    exchange(Run {
        backing: Backing::Null,
        queues: 2,
        restart: true,
        ..RUN
    });
}

#[test]
fn ours_two_queues_set_mem_table() {
    exchange(Run {
        peer: Peer::Ours,
        queues: 2,
        ..RUN
    });
}

#[test]
fn ours_add_mem_reg_and_index_wrap_then_restart() {
    exchange(Run {
        peer: Peer::Ours,
        slots: true,
        base: 65530,
        restart: true,
        ..RUN
    });
}

#[test]
fn ours_null_two_queues_restart() {
    exchange(Run {
        peer: Peer::Ours,
        backing: Backing::Null,
        queues: 2,
        restart: true,
        ..RUN
    });
}

/// Packed rings (qemu-storage-daemon does not offer them): the rings wrap
/// several times, direct and indirect, two queues, a restart.
#[test]
fn ours_packed_two_queues_wrap_and_restart() {
    exchange(Run {
        peer: Peer::Ours,
        queues: 2,
        packed: true,
        restart: true,
        ..RUN
    });
}

#[test]
fn ours_packed_null_add_mem_reg() {
    exchange(Run {
        peer: Peer::Ours,
        backing: Backing::Null,
        slots: true,
        packed: true,
        ..RUN
    });
}

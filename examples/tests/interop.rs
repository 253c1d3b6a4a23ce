//! Our front-end (the core engine driven by `adapter-linux`'s
//! `FrontendLink`) against real back-ends started by the test:
//! qemu-storage-daemon on a raw file, and our `vhost-user-blk`. Guest
//! memory is two memfd regions at distinct guest addresses with non-zero
//! fd offsets; rings are split, with EVENT_IDX and indirect descriptors.
//! Each test writes, reads back and compares, and checks the file from the
//! host side; with CONFIGURE_MEM_SLOTS the memory goes by ADD_MEM_REG, and
//! one run starts the rings at 65530 so the 16-bit indices wrap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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
use vhost_user_test::{Buf, SplitDriver};

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

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let p = std::env::temp_dir().join(format!(
        "vhu-interop-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&p).unwrap();
    Dir(p)
}

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Qsd,
    Ours,
}

fn start_peer(peer: Peer, sock: &Path, image: &Path, queues: u16) -> Kill {
    let mut child = match peer {
        Peer::Qsd => Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=n0,filename={}", image.display()))
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
            .arg("--blk-file")
            .arg(image)
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

/// Runs `rounds` of write-then-read on every queue and checks the data
/// in guest memory and on the image.
fn exchange(peer: Peer, queues: u16, slots: bool, base: u16) {
    let d = dir("x");
    let image = d.0.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let sock = d.0.join("blk.sock");
    let _peer = start_peer(peer, &sock, &image, queues);

    let (mem, fds, regions) = memory();
    let features = V::VERSION_1 | V::PROTOCOL_FEATURES | V::EVENT_IDX | V::INDIRECT_DESC;
    let mut protocol = P::MQ | P::REPLY_ACK | P::CONFIG | P::STATUS;
    if slots {
        protocol |= P::CONFIGURE_MEM_SLOTS;
    }
    let mut cfg: FrontendConfig<4, 2> = FrontendConfig::new(features, protocol);
    for r in &regions {
        cfg.regions.push(*r).unwrap();
    }
    // Ring q lives in region q % 2.
    let mut drivers = Vec::new();
    for q in 0..queues {
        let at = REGIONS[usize::from(q % 2)].0 + 0x1000 + 0x8000 * u64::from(q / 2);
        let mut drv = SplitDriver::new(&mem, QS, at, true).unwrap();
        drv.start_at(&mem, base).unwrap();
        cfg.queues
            .push(QueueConfig {
                size: QS,
                addrs: va(drv.addrs()),
                base: u32::from(base),
                kick: NotifyMode::Eventfd,
                call: NotifyMode::Eventfd,
            })
            .unwrap();
        drivers.push(drv);
    }
    let kicks: Vec<Option<EventFd>> = (0..queues)
        .map(|_| Some(EventFd::new(true).unwrap()))
        .collect();
    let calls: Vec<EventFd> = (0..queues).map(|_| EventFd::new(true).unwrap()).collect();
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
    if slots {
        assert!(link
            .engine()
            .protocol_features()
            .contains(P::CONFIGURE_MEM_SLOTS));
    }
    link.engine().start().unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Started);
    assert!(link.take_events().contains(&Event::Started));

    // Data buffers in region 1 (high guest addresses), headers in region 0.
    let rounds = 40u64; // with base 65530 this crosses 65535
    for q in 0..queues {
        let drv = &mut drivers[usize::from(q)];
        for r in 0..rounds {
            let sector = (u64::from(q) * rounds + r) * 8;
            let pattern: Vec<u8> = (0..4096u32)
                .map(|i| (i as u8) ^ (r as u8) ^ (q as u8 * 17))
                .collect();
            for write in [true, false] {
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
                    mem.write(data, &[0u8; 4096]).unwrap();
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
                if r % 2 == 0 {
                    drv.post(&mem, &bufs).unwrap();
                } else {
                    drv.add_indirect(&mem, hdr + 0x200, &bufs).unwrap();
                    drv.publish(&mem).unwrap();
                }
                if drv.kick_needed(&mem).unwrap() {
                    assert!(link.kick(q));
                }
                let t0 = Instant::now();
                let used = loop {
                    if let Some(u) = drv.harvest(&mem).unwrap() {
                        break u;
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(10),
                        "no completion on queue {q}"
                    );
                    let _ = calls[usize::from(q)].wait(Some(Duration::from_millis(5)));
                };
                let mut st = [0u8; 1];
                mem.read(status, &mut st).unwrap();
                assert_eq!(st[0], 0, "status, queue {q} round {r}");
                if write {
                    assert_eq!(used.len, 1);
                } else {
                    assert_eq!(used.len, 4097);
                    let mut got = vec![0u8; 4096];
                    mem.read(data, &mut got).unwrap();
                    assert_eq!(got, pattern, "read back, queue {q} round {r}");
                }
            }
            // The host side of the file agrees.
            let mut disk = vec![0u8; 4096];
            std::fs::File::open(&image)
                .unwrap()
                .read_exact_at(&mut disk, sector * 512)
                .unwrap();
            assert_eq!(disk, pattern, "image, queue {q} round {r}");
        }
    }
    link.engine().stop().unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Stopped);
    for q in 0..queues {
        let expect = u32::from(base.wrapping_add(2 * rounds as u16));
        assert_eq!(
            link.engine().ring_base(q),
            Some(expect),
            "GET_VRING_BASE of queue {q}"
        );
    }
}

#[test]
fn qsd_two_queues_set_mem_table() {
    exchange(Peer::Qsd, 2, false, 0);
}

#[test]
fn qsd_add_mem_reg_and_index_wrap() {
    exchange(Peer::Qsd, 1, true, 65530);
}

#[test]
fn ours_two_queues_set_mem_table() {
    exchange(Peer::Ours, 2, false, 0);
}

#[test]
fn ours_add_mem_reg_and_index_wrap() {
    exchange(Peer::Ours, 1, true, 65530);
}

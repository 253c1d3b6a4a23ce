//! Stopping a ring with requests in flight, over a real socket, against the
//! `vhost-user-blk` daemon slowed down with `--io-delay-us`:
//!
//! - with GET_VRING_BASE_INFLIGHT (bit 20) GET_VRING_BASE replies without
//!   waiting for the requests the ring had taken; they stay recorded in the
//!   inflight area and complete after SET_INFLIGHT_FD and SET_VRING_KICK;
//! - with GET_VRING_BASE_SKIP_DRAIN (bit 23) as well, plain GET_VRING_BASE
//!   drains and message 45 suspends;
//! - without bit 20, GET_VRING_BASE replies only once they completed.
//!
//! Every request completes exactly once, with its data on the image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{recv_reply, send, u64_of, Daemon};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{
    FrontendReq, Header, InflightMsg, MemRegionMsg, MemTable, ParseOptions, Reply, Request,
    VringAddrMsg, VringFdMsg, VringStateMsg, HEADER_SIZE, MAX_MESSAGE,
};
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_linux::sys::eventfd::EventFd;
use vhost_user_linux::sys::memfd;
use vhost_user_linux::sys::socket::Stream;
use vhost_user_test::{Buf, SplitDriver, USER_ADDR_OFFSET};

const RAM: u64 = 1 << 20;
const QS: u16 = 16;
const DELAY_US: &str = "150000";
const N: u64 = 4;

struct Fe {
    _d: Daemon,
    s: Stream,
    mem: LinuxGuestMemory,
    ram: OwnedFd,
    region: MemRegionMsg,
    inflight: Option<(OwnedFd, InflightMsg)>,
    drv: SplitDriver,
    kick: EventFd,
    call: EventFd,
    image: std::fs::File,
    _dir: tempdir::Dir,
}

/// A tiny self-removing temporary directory.
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "vhu-{tag}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn ack(s: &Stream, req: Request<'_>, fds: &[std::os::fd::BorrowedFd<'_>]) {
    let code = req.code();
    send(s, &req, true, fds);
    assert_eq!(
        u64_of(code, &recv_reply(s, code).unwrap()),
        0,
        "{code:?} acked"
    );
}

impl Fe {
    fn new(protocol: P) -> Fe {
        let dir = tempdir::Dir::new("inflight-stop");
        let img = dir.0.join("disk.img");
        let image = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)
            .unwrap();
        image.set_len(16 << 20).unwrap();
        let d = Daemon::start_with(&[
            "--blk-file",
            img.to_str().unwrap(),
            "--num-queues",
            "1",
            "--io-delay-us",
            DELAY_US,
        ]);
        let s = d.connect();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        send(&s, &Request::GetFeatures, false, &[]);
        let f = u64_of(
            FrontendReq::GetFeatures,
            &recv_reply(&s, FrontendReq::GetFeatures).unwrap(),
        );
        send(&s, &Request::GetProtocolFeatures, false, &[]);
        let offered = u64_of(
            FrontendReq::GetProtocolFeatures,
            &recv_reply(&s, FrontendReq::GetProtocolFeatures).unwrap(),
        );
        assert_eq!(
            offered & protocol.bits(),
            protocol.bits(),
            "the daemon offers {protocol:?}"
        );
        send(
            &s,
            &Request::SetProtocolFeatures(protocol.bits()),
            false,
            &[],
        );
        send(&s, &Request::SetOwner, false, &[]);
        let want = V::VERSION_1 | V::PROTOCOL_FEATURES;
        assert_eq!(f & want.bits(), want.bits());
        send(&s, &Request::SetFeatures(want.bits()), false, &[]);

        let ram = memfd::create("guest", RAM).unwrap();
        let region = MemRegionMsg {
            guest_addr: 0,
            size: RAM,
            user_addr: USER_ADDR_OFFSET,
            mmap_offset: 0,
            xen: None,
        };
        let mut mem = LinuxGuestMemory::new();
        mem.map(0, region, ram.try_clone().unwrap()).unwrap();
        ack(
            &s,
            Request::SetMemTable(MemTable::new(&[region]).unwrap()),
            &[ram.as_fd()],
        );
        let drv = SplitDriver::new(&mem, QS, 0x1000, false).unwrap();
        let mut fe = Fe {
            _d: d,
            s,
            mem,
            ram,
            region,
            inflight: None,
            drv,
            kick: EventFd::new(false).unwrap(),
            call: EventFd::new(false).unwrap(),
            image,
            _dir: dir,
        };
        if protocol.contains(P::INFLIGHT_SHMFD) {
            fe.get_inflight();
        }
        fe
    }

    /// GET_INFLIGHT_FD: the back-end's area and its fd.
    fn get_inflight(&mut self) {
        let desc = InflightMsg {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: QS,
        };
        send(&self.s, &Request::GetInflightFd(desc), false, &[]);
        let mut buf = Box::new([0u8; MAX_MESSAGE]);
        let rx = self.s.recv_message(&mut buf).unwrap().unwrap();
        let h = Header::parse(&buf[..HEADER_SIZE]).unwrap();
        let reply = Reply::parse(
            FrontendReq::GetInflightFd,
            &h,
            &buf[HEADER_SIZE..HEADER_SIZE + rx.header.size as usize],
            rx.fds.len(),
            &ParseOptions::default(),
        )
        .unwrap();
        let Reply::Inflight(m) = reply else {
            panic!("{reply:?}")
        };
        assert!(m.mmap_size > 0);
        let fd = rx.fds.into_iter().next().expect("the area's fd");
        self.inflight = Some((fd, m));
    }

    /// The start sequence for ring 0 from `base`.
    fn start(&mut self, base: u32) {
        if let Some((fd, m)) = &self.inflight {
            ack(&self.s, Request::SetInflightFd(*m), &[fd.as_fd()]);
        }
        send(
            &self.s,
            &Request::SetVringNum(VringStateMsg {
                index: 0,
                num: QS.into(),
            }),
            false,
            &[],
        );
        send(
            &self.s,
            &Request::SetVringBase(VringStateMsg {
                index: 0,
                num: base,
            }),
            false,
            &[],
        );
        let a = self.drv.user_addrs();
        send(
            &self.s,
            &Request::SetVringAddr(VringAddrMsg {
                index: 0,
                log: false,
                desc: a.desc,
                used: a.device,
                avail: a.driver,
                log_addr: 0,
            }),
            false,
            &[],
        );
        ack(
            &self.s,
            Request::SetVringCall(VringFdMsg {
                index: 0,
                no_fd: false,
            }),
            &[self.call.as_fd()],
        );
        ack(
            &self.s,
            Request::SetVringKick(VringFdMsg {
                index: 0,
                no_fd: false,
            }),
            &[self.kick.as_fd()],
        );
        ack(
            &self.s,
            Request::SetVringEnable {
                index: 0,
                enable: true,
            },
            &[],
        );
    }

    /// Stops ring 0 with `req`; returns the base and the guest's used index
    /// at the moment the reply arrived.
    fn stop(&mut self, req: Request<'_>) -> (u32, u16) {
        let code = req.code();
        ack(
            &self.s,
            Request::SetVringEnable {
                index: 0,
                enable: false,
            },
            &[],
        );
        send(&self.s, &req, false, &[]);
        let r = recv_reply(&self.s, code).unwrap();
        let used = self.drv.used_idx(&self.mem).unwrap();
        let h = Header::parse(&r).unwrap();
        match Reply::parse(code, &h, &r[HEADER_SIZE..], 0, &ParseOptions::default()).unwrap() {
            Reply::VringState { index: 0, num } => (num, used),
            other => panic!("{other:?}"),
        }
    }

    /// Posts `N` writes of one sector each at sectors `first..first + N`.
    fn post_writes(&mut self, first: u64) {
        for i in 0..N {
            let at = 0x10000 + 0x1000 * (first + i);
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&1u32.to_le_bytes());
            h[8..16].copy_from_slice(&(first + i).to_le_bytes());
            self.mem.write(at, &h).unwrap();
            self.mem
                .write(at + 0x100, &[(first + i) as u8 | 0x80; 512])
                .unwrap();
            self.mem.write(at + 0x800, &[0xff]).unwrap();
            self.drv
                .post(
                    &self.mem,
                    &[
                        Buf::readable(at, 16),
                        Buf::readable(at + 0x100, 512),
                        Buf::writable(at + 0x800, 1),
                    ],
                )
                .unwrap();
        }
    }

    /// Waits until the guest's used index is `n`.
    fn wait_used(&self, n: u16) {
        let t0 = Instant::now();
        while self.drv.used_idx(&self.mem).unwrap() != n {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "requests never completed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Harvests everything and checks that requests `first..first + N`
    /// each completed exactly once with status OK and their data on disk.
    fn check(&mut self, first: u64) {
        let used = self.drv.harvest_all(&self.mem).unwrap();
        let mut ids: Vec<u16> = used.iter().map(|u| u.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), used.len(), "a request completed twice: {used:?}");
        assert_eq!(used.len() as u64, N, "{used:?}");
        for i in 0..N {
            let at = 0x10000 + 0x1000 * (first + i);
            assert_eq!(
                self.mem.read_vec_status(at + 0x800),
                0,
                "status of request {i}"
            );
            let mut b = [0u8; 512];
            self.image.read_exact_at(&mut b, (first + i) * 512).unwrap();
            assert_eq!(b, [(first + i) as u8 | 0x80; 512], "sector {}", first + i);
        }
        let _ = (&self.ram, &self.region);
    }
}

trait Status {
    fn read_vec_status(&self, at: u64) -> u8;
}

impl Status for LinuxGuestMemory {
    fn read_vec_status(&self, at: u64) -> u8 {
        let mut b = [0u8; 1];
        self.read(at, &mut b).unwrap();
        b[0]
    }
}

fn base_protocol() -> P {
    P::MQ | P::REPLY_ACK | P::CONFIG
}

#[test]
fn get_vring_base_inflight_suspends_and_the_restart_resubmits() {
    let mut fe = Fe::new(base_protocol() | P::INFLIGHT_SHMFD | P::GET_VRING_BASE_INFLIGHT);
    fe.post_writes(0);
    fe.start(0);
    // The worker has taken all four; the first is being carried out.
    std::thread::sleep(Duration::from_millis(50));
    let (base, used) = fe.stop(Request::GetVringBase(0));
    assert_eq!(base, N as u32, "the base counts every request taken");
    assert!(
        u64::from(used) < N,
        "the reply did not wait for all of them (used {used})"
    );
    // Restart from the base, with the area: the rest complete.
    fe.start(base);
    fe.wait_used(N as u16);
    fe.check(0);
}

#[test]
fn skip_drain_suspends_only_with_message_45() {
    let mut fe = Fe::new(
        base_protocol()
            | P::INFLIGHT_SHMFD
            | P::GET_VRING_BASE_INFLIGHT
            | P::GET_VRING_BASE_SKIP_DRAIN,
    );
    fe.post_writes(0);
    fe.start(0);
    std::thread::sleep(Duration::from_millis(50));
    // Plain GET_VRING_BASE drains.
    let (base, used) = fe.stop(Request::GetVringBase(0));
    assert_eq!((base, u64::from(used)), (N as u32, N));
    fe.check(0);
    // Message 45 suspends.
    fe.post_writes(N);
    fe.start(base);
    std::thread::sleep(Duration::from_millis(50));
    let (base, used) = fe.stop(Request::GetVringBaseSkipDrain(0));
    assert_eq!(base, 2 * N as u32);
    assert!(
        u64::from(used) < 2 * N,
        "message 45 did not wait (used {used})"
    );
    fe.start(base);
    fe.wait_used(2 * N as u16);
    fe.check(N);
}

#[test]
fn without_bit_20_get_vring_base_waits_for_every_request() {
    let mut fe = Fe::new(base_protocol() | P::INFLIGHT_SHMFD);
    fe.post_writes(0);
    fe.start(0);
    std::thread::sleep(Duration::from_millis(50));
    let (base, used) = fe.stop(Request::GetVringBase(0));
    assert_eq!((base, u64::from(used)), (N as u32, N));
    fe.check(0);
}

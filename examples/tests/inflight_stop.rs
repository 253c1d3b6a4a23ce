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
//!
//! And the refusals around a ring's life: a corrupt inflight area is
//! refused before the ring starts, and a ring the guest breaks signals the
//! err eventfd (SET_VRING_ERR) and stops serving.

#![forbid(unsafe_code)]
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
    d: Daemon,
    protocol: P,
    s: Stream,
    mem: LinuxGuestMemory,
    ram: OwnedFd,
    region: MemRegionMsg,
    inflight: Option<(OwnedFd, InflightMsg)>,
    drv: SplitDriver,
    kick: EventFd,
    call: EventFd,
    err: EventFd,
    image: std::fs::File,
    _dir: common::TempDir,
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
        Fe::with(protocol, &["--io-delay-us", DELAY_US])
    }

    fn with(protocol: P, extra: &[&str]) -> Fe {
        let dir = common::TempDir::new("inflight-stop");
        let (img, image) = dir.image(16 << 20);
        let mut args = vec!["--blk-file", img.to_str().unwrap(), "--num-queues", "1"];
        args.extend_from_slice(extra);
        let d = Daemon::start_with(&args);
        let s = d.connect();
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
        let drv = SplitDriver::new(&mem, QS, 0x1000, false).unwrap();
        let mut fe = Fe {
            d,
            protocol,
            s,
            mem,
            ram,
            region,
            inflight: None,
            drv,
            kick: EventFd::new(false).unwrap(),
            call: EventFd::new(false).unwrap(),
            err: EventFd::new(false).unwrap(),
            image,
            _dir: dir,
        };
        fe.handshake();
        if protocol.contains(P::INFLIGHT_SHMFD) {
            fe.get_inflight();
        }
        fe
    }

    /// Features, protocol features, owner and memory.
    fn handshake(&mut self) {
        let (s, protocol) = (&self.s, self.protocol);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        send(s, &Request::GetFeatures, false, &[]);
        let f = u64_of(
            FrontendReq::GetFeatures,
            &recv_reply(s, FrontendReq::GetFeatures).unwrap(),
        );
        send(s, &Request::GetProtocolFeatures, false, &[]);
        let offered = u64_of(
            FrontendReq::GetProtocolFeatures,
            &recv_reply(s, FrontendReq::GetProtocolFeatures).unwrap(),
        );
        assert_eq!(
            offered & protocol.bits(),
            protocol.bits(),
            "the daemon offers {protocol:?}"
        );
        send(
            s,
            &Request::SetProtocolFeatures(protocol.bits()),
            false,
            &[],
        );
        send(s, &Request::SetOwner, false, &[]);
        let want = V::VERSION_1 | V::PROTOCOL_FEATURES;
        assert_eq!(f & want.bits(), want.bits());
        send(s, &Request::SetFeatures(want.bits()), false, &[]);
        ack(
            s,
            Request::SetMemTable(MemTable::new(&[self.region]).unwrap()),
            &[self.ram.as_fd()],
        );
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
        self.configure(base);
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

    /// The start sequence up to SET_VRING_KICK (not sent).
    fn configure(&mut self, base: u32) {
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
            Request::SetVringErr(VringFdMsg {
                index: 0,
                no_fd: false,
            }),
            &[self.err.as_fd()],
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

/// A small xorshift generator (deterministic per seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug)]
struct Outstanding {
    /// Request number: `0..SLOTS` write slot n, `SLOTS..2*SLOTS` read it.
    req: u64,
    /// Buffer set in guest memory.
    tag: u64,
}

fn slot_pattern(slot: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (slot as u8).wrapping_mul(37) ^ (i as u8).wrapping_mul(11) ^ 0x5a;
    }
    b
}

/// issue: kill -9 at random moments, 20 times, while requests are in
/// flight; the front-end reconnects, replays the handshake, hands the
/// inflight area back and restarts the ring from the used index. Every
/// request completes exactly once with the right data.
#[test]
fn kill_9_twenty_times_loses_and_duplicates_nothing() {
    const SLOTS: u64 = 150;
    const DEPTH: usize = 4;
    const KILLS: usize = 20;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    println!("seed {seed:#x}");
    let mut fe = Fe::with(
        base_protocol() | P::INFLIGHT_SHMFD,
        &["--io-delay-us", "3000"],
    );
    fe.start(0);
    // Kill points: after this many completions (sorted), each followed by
    // a random delay so the kill lands inside a request.
    let mut kill_at: Vec<u64> = (0..KILLS).map(|_| rng.below(2 * SLOTS - 8)).collect();
    kill_at.sort_unstable();
    let total = 2 * SLOTS;
    let mut outstanding: std::collections::HashMap<u16, Outstanding> = Default::default();
    let mut free_tags: Vec<u64> = (0..DEPTH as u64).collect();
    let (mut next, mut completed, mut kills) = (0u64, 0u64, 0usize);
    let (mut duplicated, mut bad_status, mut verify_errors) = (0u64, 0u64, 0u64);
    let mut restarts: Vec<Duration> = Vec::new();
    let (mut connect, mut rtt, mut handshake) = (Vec::new(), Vec::new(), Vec::new());
    let mut pending_restart: Option<Instant> = None;
    let buf = |tag: u64| 0x20000 + 0x3000 * tag;
    while completed < total {
        // Keep DEPTH requests in flight; reads start once every write is
        // done.
        while outstanding.len() < DEPTH && next < total && (next < SLOTS || completed >= SLOTS) {
            let tag = free_tags.pop().unwrap();
            let at = buf(tag);
            let (ty, slot) = if next < SLOTS {
                (1u32, next)
            } else {
                (0, next - SLOTS)
            };
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&(slot * 8).to_le_bytes());
            fe.mem.write(at, &h).unwrap();
            fe.mem.write(at + 0x2000, &[0xff]).unwrap();
            let data = if ty == 1 {
                fe.mem.write(at + 0x1000, &slot_pattern(slot)).unwrap();
                Buf::readable(at + 0x1000, 4096)
            } else {
                fe.mem.write(at + 0x1000, &[0xee; 4096]).unwrap();
                Buf::writable(at + 0x1000, 4096)
            };
            let head = fe
                .drv
                .post(
                    &fe.mem,
                    &[Buf::readable(at, 16), data, Buf::writable(at + 0x2000, 1)],
                )
                .unwrap();
            outstanding.insert(head, Outstanding { req: next, tag });
            next += 1;
            let _ = fe.kick.write(1);
        }
        if kills < KILLS && completed >= kill_at[kills] && !outstanding.is_empty() {
            std::thread::sleep(Duration::from_micros(rng.below(4000)));
            let t0 = Instant::now();
            fe.d.kill_and_restart();
            fe.s = fe.d.connect_retry();
            connect.push(t0.elapsed());
            // The socket round trip, the floor of each handshake message.
            let r = Instant::now();
            for _ in 0..8 {
                send(&fe.s, &Request::GetFeatures, false, &[]);
                recv_reply(&fe.s, FrontendReq::GetFeatures).unwrap();
            }
            rtt.push(r.elapsed() / 8);
            let h = Instant::now();
            fe.handshake();
            let used = fe.drv.used_idx(&fe.mem).unwrap();
            fe.start(u32::from(used));
            handshake.push(h.elapsed());
            pending_restart = Some(t0);
            kills += 1;
        }
        let _ = fe.call.wait(Some(Duration::from_millis(20))).unwrap();
        for u in fe.drv.harvest_all(&fe.mem).unwrap() {
            let Some(o) = outstanding.remove(&u.id) else {
                duplicated += 1;
                continue;
            };
            if let Some(t0) = pending_restart.take() {
                restarts.push(t0.elapsed());
            }
            let at = buf(o.tag);
            if fe.mem.read_vec_status(at + 0x2000) != 0 {
                bad_status += 1;
            }
            if o.req >= SLOTS {
                let mut got = [0u8; 4096];
                fe.mem.read(at + 0x1000, &mut got).unwrap();
                if got != slot_pattern(o.req - SLOTS) {
                    verify_errors += 1;
                }
            }
            free_tags.push(o.tag);
            completed += 1;
        }
    }
    // Host side: every write is on the image.
    for slot in 0..SLOTS {
        let mut b = [0u8; 4096];
        fe.image.read_exact_at(&mut b, slot * 4096).unwrap();
        if b != slot_pattern(slot) {
            verify_errors += 1;
        }
    }
    let lost = total - completed;
    for v in [&mut restarts, &mut connect, &mut rtt, &mut handshake] {
        v.sort_unstable();
    }
    let median = |v: &Vec<Duration>| v.get(v.len() / 2).copied().unwrap_or_default();
    // 13 messages: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER,
    // SET_FEATURES, SET_MEM_TABLE, SET_INFLIGHT_FD, SET_VRING_NUM/BASE/ADDR/
    // CALL/KICK/ENABLE.
    println!(
        "restart: spawn to connected {:?}, handshake of 13 messages {:?} (floor 13 x round trip {:?} = {:?})",
        median(&connect),
        median(&handshake),
        median(&rtt),
        median(&rtt) * 13
    );
    println!(
        "kills {kills}, requests {total}, lost {lost}, duplicated {duplicated}, bad status {bad_status}, verify errors {verify_errors}"
    );
    if let Some(m) = restarts.get(restarts.len() / 2) {
        println!(
            "restart to first completion: median {m:?} over {} restarts (includes a 3 ms request)",
            restarts.len()
        );
    }
    assert_eq!(kills, KILLS);
    assert_eq!((lost, duplicated, bad_status, verify_errors), (0, 0, 0, 0));
    let log = std::fs::read_to_string(fe.d.dir.join("daemon.log")).unwrap();
    assert!(
        log.contains("resubmitting"),
        "no restart found requests in flight"
    );
}

/// An inflight area the front-end hands over whose recorded state cannot be
/// recovered is refused before the ring starts: SET_VRING_KICK ends the
/// connection (no ack), the daemon logs why and serves the next front-end.
#[test]
fn a_hostile_inflight_area_is_refused_before_the_ring_starts() {
    // (what, version, desc_num, used_idx, entry 3's flag, the log's words)
    let cases: [(&str, u16, u16, u16, u8, &str); 4] = [
        ("unknown version", 7, 16, 0, 0, "version"),
        ("desc_num of another ring size", 1, 8, 0, 0, "16"),
        ("used index a ring away", 1, 16, 0x8000, 0, "used index"),
        ("entry flag neither 0 nor 1", 1, 16, 0, 2, "flag"),
    ];
    for (what, version, desc_num, used, flag, words) in cases {
        let mut fe = Fe::with(base_protocol() | P::INFLIGHT_SHMFD, &[]);
        let (fd, m) = fe.inflight.as_ref().unwrap();
        let area = LinuxGuestMemory::single(fd.try_clone().unwrap(), 0, m.mmap_size).unwrap();
        area.write_u16(8, version).unwrap();
        area.write_u16(10, desc_num).unwrap();
        area.write_u16(14, used).unwrap();
        area.write(16 + 3 * 16, &[flag]).unwrap();
        fe.configure(0);
        send(
            &fe.s,
            &Request::SetVringKick(VringFdMsg {
                index: 0,
                no_fd: false,
            }),
            true,
            &[fe.kick.as_fd()],
        );
        let mut buf = Box::new([0u8; MAX_MESSAGE]);
        assert!(
            matches!(fe.s.recv_message(&mut buf), Ok(None) | Err(_)),
            "{what}: the ring started"
        );
        let log = fe.d.log();
        assert!(
            log.contains("inflight area") && log.contains(words),
            "{what}: {log}"
        );
        // The next front-end is served.
        let s = fe.d.connect();
        send(&s, &Request::GetFeatures, false, &[]);
        assert!(recv_reply(&s, FrontendReq::GetFeatures).is_some(), "{what}");
    }
}

/// A guest that breaks its ring (a head index beyond the ring) gets the err
/// eventfd written once; the ring serves nothing more until it is
/// restarted, and the connection goes on.
#[test]
fn a_ring_broken_by_the_guest_signals_its_err_eventfd() {
    let mut fe = Fe::with(base_protocol(), &[]);
    fe.start(0);
    // One good request is served.
    fe.post_writes(0);
    fe.kick.write(1).unwrap();
    fe.wait_used(N as u16);
    assert_eq!(fe.drv.harvest_all(&fe.mem).unwrap().len() as u64, N);
    assert!(!fe.err.is_signalled().unwrap());
    // Then a head the ring does not have.
    fe.drv.push_head(&fe.mem, 99).unwrap();
    fe.drv.publish(&fe.mem).unwrap();
    fe.kick.write(1).unwrap();
    let t0 = Instant::now();
    while !fe.err.is_signalled().unwrap() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no err signal");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(fe.err.read().unwrap(), 1, "signalled once");
    // Nothing more is served, and nothing more is signalled.
    fe.post_writes(N);
    fe.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fe.drv.used_idx(&fe.mem).unwrap(), N as u16);
    assert!(!fe.err.is_signalled().unwrap());
    // The connection goes on.
    send(&fe.s, &Request::GetFeatures, false, &[]);
    assert!(recv_reply(&fe.s, FrontendReq::GetFeatures).is_some());
    assert!(fe.d.log().contains("the ring is stopped until restarted"));
}

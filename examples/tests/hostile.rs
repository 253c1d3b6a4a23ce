//! A hostile front-end against the `vhost-user-blk` daemon over a real
//! socket: every malformed-input class of the notes (§7.2) that reaches a
//! back-end. For each, the daemon drops that connection (or answers with a
//! failed REPLY_ACK when one was asked for), logs an error, leaks no fd, does
//! not grow on repeated allocating messages, and serves the next front-end.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::message::{
    FrontendReq, MemRegionMsg, MemTable, Request, VringAddrMsg, VringFdMsg, VringStateMsg,
    HEADER_SIZE, MAX_MESSAGE,
};
use vhost_user_linux::sys::eventfd::EventFd;
use vhost_user_linux::sys::memfd;
use vhost_user_linux::sys::socket::Stream;

mod common;

use common::{handshake, recv_reply, send, send_raw, u64_of, Daemon};

/// The connection was closed by the daemon.
fn assert_dropped(s: &Stream) {
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let t0 = Instant::now();
    // A daemon that keeps the connection fails the test instead of hanging
    // it.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    loop {
        match s.recv_message(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the daemon kept the connection")
            }
            Ok(None) | Err(_) => return,
            Ok(Some(rx)) => {
                // A reply to something sent before the bad message is fine.
                assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", rx.header);
            }
        }
    }
}

/// The daemon still serves: a fresh connection gets GET_FEATURES answered.
fn assert_serves(d: &Daemon) {
    let s = d.connect();
    send(&s, &Request::GetFeatures, false, &[]);
    let r = recv_reply(&s, FrontendReq::GetFeatures).expect("daemon answers the next front-end");
    assert!(u64_of(FrontendReq::GetFeatures, &r) & V::VERSION_1.bits() != 0);
}

fn head(id: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [id, flags, size] {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    v
}

fn memory(size: u64) -> (OwnedFd, MemRegionMsg) {
    let m = memfd::create("guest", size).unwrap();
    let r = MemRegionMsg {
        guest_addr: 0,
        size,
        user_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        xen: None,
    };
    (m, r)
}

/// One malformed case: what to send after an optional handshake.
struct Case {
    name: &'static str,
    handshake: bool,
    send: Box<dyn Fn(&Stream)>,
}

fn cases() -> Vec<Case> {
    let raw = |name: &'static str, bytes: Vec<u8>| Case {
        name,
        handshake: false,
        send: Box::new(move |s| send_raw(s, &bytes, &[])),
    };
    let mut v = vec![
        raw("version bits 0", head(1, 0, 0)),
        raw("version bits 2", head(1, 2, 0)),
        raw("reserved flag bits", head(1, 0x101, 0)),
        raw("REPLY bit on a request", head(1, 5, 0)),
        raw("request id 0", head(0, 1, 0)),
        raw("unknown request id", head(46, 1, 0)),
        raw("crosvm-private id", head(1002, 1, 0)),
        raw("size above the cap", head(5, 1, 0x10_0000)),
        raw("size wrong for the id", {
            let mut m = head(2, 1, 4);
            m.extend_from_slice(&[0; 4]);
            m
        }),
        Case {
            // Half a payload, then the front-end stops sending: the
            // daemon sees end of file in the middle of a message.
            name: "truncated payload",
            handshake: false,
            send: Box::new(|s| {
                let mut m = head(2, 1, 8);
                m.extend_from_slice(&[0; 4]);
                send_raw(s, &m, &[]);
                s.shutdown_write().unwrap();
            }),
        },
        raw("ring index above the queues (u32)", {
            let mut m = head(8, 1, 8);
            m.extend_from_slice(&2u32.to_ne_bytes());
            m.extend_from_slice(&64u32.to_ne_bytes());
            m
        }),
        raw("ring index 0x10000+n (u16 truncation)", {
            let mut m = head(10, 1, 8);
            m.extend_from_slice(&0x1_0000u32.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m
        }),
        raw("kick index above the queues (u8 in u64)", {
            let mut m = head(12, 1, 8);
            m.extend_from_slice(&0x105u64.to_ne_bytes());
            m
        }),
        raw("kick reserved bits (index 256+)", {
            let mut m = head(12, 1, 8);
            m.extend_from_slice(&0x200u64.to_ne_bytes());
            m
        }),
        raw("config offset+size overflow", {
            let mut m = head(24, 1, 12);
            m.extend_from_slice(&u32::MAX.to_ne_bytes());
            m.extend_from_slice(&2u32.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m
        }),
        raw("nregions 0", {
            let mut m = head(5, 1, 8);
            m.extend_from_slice(&[0; 8]);
            m
        }),
        raw("nregions 9", {
            let mut m = head(5, 1, 8 + 9 * 32);
            m.extend_from_slice(&9u32.to_ne_bytes());
            m.extend_from_slice(&[0; 4 + 9 * 32]);
            m
        }),
    ];
    v.push(Case {
        name: "SET_PROTOCOL_FEATURES with bits never offered",
        handshake: false,
        send: Box::new(|s| {
            send(
                s,
                &Request::SetProtocolFeatures(P::RARP.bits() | P::MQ.bits()),
                false,
                &[],
            )
        }),
    });
    v.push(Case {
        name: "SET_FEATURES with bits never offered",
        handshake: false,
        send: Box::new(|s| {
            send(
                s,
                &Request::SetFeatures(V::ACCESS_PLATFORM.bits()),
                false,
                &[],
            )
        }),
    });
    v.push(Case {
        name: "message gated by a feature never negotiated (GET_SHMEM_CONFIG)",
        handshake: true,
        send: Box::new(|s| send(s, &Request::GetShmemConfig, false, &[])),
    });
    let inflight = |size: u64, num_queues: u16| vhost_user_core::message::InflightMsg {
        mmap_size: size,
        mmap_offset: 0,
        num_queues,
        queue_size: 256,
    };
    v.push(Case {
        name: "inflight area smaller than its layout",
        handshake: true,
        send: Box::new(move |s| {
            let (m, _) = memory(1 << 20);
            send(
                s,
                &Request::SetInflightFd(inflight(4096, 2)),
                false,
                &[m.as_fd()],
            );
        }),
    });
    v.push(Case {
        name: "inflight area larger than its fd (mmap beyond the file)",
        handshake: true,
        send: Box::new(move |s| {
            let (m, _) = memory(4096);
            send(
                s,
                &Request::SetInflightFd(inflight(1 << 20, 2)),
                false,
                &[m.as_fd()],
            );
        }),
    });
    // Dirty logs (SET_LOG_BASE) over 1 MiB of guest memory, which needs
    // 32 bytes of bitmap.
    let log_base = |s: &Stream, size: u64, offset: u64, fd: Option<BorrowedFd<'_>>| {
        let (m, r) = memory(1 << 20);
        let t = [r];
        send(
            s,
            &Request::SetMemTable(MemTable::new(&t).unwrap()),
            false,
            &[m.as_fd()],
        );
        let log = vhost_user_core::message::LogMsg { size, offset };
        let mut buf = [0u8; MAX_MESSAGE];
        let n = Request::SetLogBase(log).encode(false, &mut buf).unwrap();
        send_raw(s, &buf[..n], fd.as_slice());
    };
    v.push(Case {
        name: "dirty log too small for guest memory",
        handshake: true,
        send: Box::new(move |s| {
            let log = memfd::create("log", 4096).unwrap();
            log_base(s, 31, 0, Some(log.as_fd()));
        }),
    });
    v.push(Case {
        name: "dirty log at an offset past the end of its fd",
        handshake: true,
        send: Box::new(move |s| {
            let log = memfd::create("log", 4096).unwrap();
            log_base(s, 32, 4096, Some(log.as_fd()));
        }),
    });
    v.push(Case {
        name: "dirty log whose fd is not shared memory (a socket)",
        handshake: true,
        send: Box::new(move |s| {
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            log_base(s, 32, 0, Some(a.as_fd()));
        }),
    });
    v.push(Case {
        name: "dirty log without its fd",
        handshake: true,
        send: Box::new(move |s| log_base(s, 32, 0, None)),
    });
    v.push(Case {
        name: "dirty log whose offset plus size overflows",
        handshake: true,
        send: Box::new(move |s| {
            let log = memfd::create("log", 4096).unwrap();
            let mut m = head(6, 1, 16);
            m.extend_from_slice(&32u64.to_ne_bytes());
            m.extend_from_slice(&(u64::MAX - 16).to_ne_bytes());
            send_raw(s, &m, &[log.as_fd()]);
        }),
    });
    v.push(Case {
        name: "inflight area for more queues than the device",
        handshake: true,
        send: Box::new(move |s| send(s, &Request::GetInflightFd(inflight(0, 3)), false, &[])),
    });
    v.push(Case {
        name: "inflight num_queues 0",
        handshake: true,
        send: Box::new(|s| {
            let mut m = head(31, 1, 24);
            m.extend_from_slice(&[0; 16]);
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&256u16.to_ne_bytes());
            m.extend_from_slice(&[0; 4]);
            send_raw(s, &m, &[]);
        }),
    });
    v.push(Case {
        name: "an fd on a message that takes none",
        handshake: false,
        send: Box::new(|s| {
            let e = EventFd::new(false).unwrap();
            send_raw(s, &head(1, 1, 0), &[e.as_fd()]);
        }),
    });
    v.push(Case {
        name: "too many fds (9)",
        handshake: false,
        send: Box::new(|s| {
            let es: Vec<EventFd> = (0..9).map(|_| EventFd::new(false).unwrap()).collect();
            let fds: Vec<BorrowedFd<'_>> = es.iter().map(|e| e.as_fd()).collect();
            let _ = s.send_message_with_excess_fd(&head(21, 1, 0), &fds);
        }),
    });
    v.push(Case {
        name: "nregions different from the fd count",
        handshake: true,
        send: Box::new(|s| {
            let (m, r) = memory(1 << 20);
            let r2 = MemRegionMsg {
                guest_addr: 1 << 20,
                user_addr: 0x7f00_1000_0000,
                ..r
            };
            let t = [r, r2];
            send(
                s,
                &Request::SetMemTable(MemTable::new(&t).unwrap()),
                false,
                &[m.as_fd()],
            );
        }),
    });
    v.push(Case {
        name: "region address + size overflow",
        handshake: true,
        send: Box::new(|s| {
            let (m, mut r) = memory(1 << 20);
            r.guest_addr = u64::MAX - 0xfff;
            let mut buf = [0u8; MAX_MESSAGE];
            let t = [MemRegionMsg { guest_addr: 0, ..r }];
            let n = Request::SetMemTable(MemTable::new(&t).unwrap())
                .encode(false, &mut buf)
                .unwrap();
            buf[HEADER_SIZE + 8..HEADER_SIZE + 16].copy_from_slice(&r.guest_addr.to_ne_bytes());
            send_raw(s, &buf[..n], &[m.as_fd()]);
        }),
    });
    v.push(Case {
        name: "overlapping regions",
        handshake: true,
        send: Box::new(|s| {
            let (m1, r) = memory(1 << 20);
            let (m2, _) = memory(1 << 20);
            let r2 = MemRegionMsg {
                guest_addr: 1 << 19,
                user_addr: 0x7f00_1000_0000,
                ..r
            };
            let t = [r, r2];
            send(
                s,
                &Request::SetMemTable(MemTable::new(&t).unwrap()),
                false,
                &[m1.as_fd(), m2.as_fd()],
            );
        }),
    });
    v.push(Case {
        name: "region larger than its fd (mmap beyond the file)",
        handshake: true,
        send: Box::new(|s| {
            let (m, mut r) = memory(1 << 20);
            r.mmap_offset = 1 << 40;
            let t = [r];
            send(
                s,
                &Request::SetMemTable(MemTable::new(&t).unwrap()),
                false,
                &[m.as_fd()],
            );
        }),
    });
    v.push(Case {
        name: "REM_MEM_REG of an unknown region",
        handshake: true,
        send: Box::new(|s| {
            let (_, r) = memory(1 << 20);
            send(s, &Request::RemMemReg(r), false, &[]);
        }),
    });
    // Ring sizes and addresses are refused on the message that sets them:
    // no SET_VRING_KICK is ever sent in these cases.
    for (name, bad) in ring_refusals() {
        v.push(Case {
            name,
            handshake: true,
            send: Box::new(move |s| bad.send(s, false)),
        });
    }
    v.push(Case {
        name: "SET_FEATURES without bit 30 after SET_PROTOCOL_FEATURES",
        handshake: true,
        send: Box::new(|s| send(s, &Request::SetFeatures(V::VERSION_1.bits()), false, &[])),
    });
    v
}

/// A bad ring message after a valid memory table (1 MiB at user address
/// 0x7f00_0000_0000, and with `two_regions` another adjacent MiB).
struct BadRing {
    two_regions: bool,
    /// Ring 0's size, sent first (and checked) unless it is the bad one.
    size: u32,
    /// The addresses of ring 0, or `None` when the size is the bad one.
    addr: Option<(u64, u64, u64)>,
}

impl BadRing {
    /// Sends the memory table and the ring messages; the last one is the
    /// bad one, sent with `need_reply`. The good ones are acked (0).
    fn send(&self, s: &Stream, need_reply: bool) {
        let (m, r) = memory(1 << 20);
        let (m2, _) = memory(1 << 20);
        let r2 = MemRegionMsg {
            guest_addr: 1 << 20,
            user_addr: r.user_addr + (1 << 20),
            ..r
        };
        let (t, fds) = if self.two_regions {
            (vec![r, r2], vec![m.as_fd(), m2.as_fd()])
        } else {
            (vec![r], vec![m.as_fd()])
        };
        send(
            s,
            &Request::SetMemTable(MemTable::new(&t).unwrap()),
            true,
            &fds,
        );
        let a = recv_reply(s, FrontendReq::SetMemTable).unwrap();
        assert_eq!(u64_of(FrontendReq::SetMemTable, &a), 0);
        let num = Request::SetVringNum(VringStateMsg {
            index: 0,
            num: self.size,
        });
        let Some((desc, avail, used)) = self.addr else {
            return send_lax(s, &num, need_reply);
        };
        send(s, &num, true, &[]);
        let a = recv_reply(s, FrontendReq::SetVringNum).unwrap();
        assert_eq!(u64_of(FrontendReq::SetVringNum, &a), 0);
        let addr = Request::SetVringAddr(VringAddrMsg {
            index: 0,
            log: false,
            desc,
            used,
            avail,
            log_addr: 0,
        });
        send_lax(s, &addr, need_reply);
    }
}

/// The ring size and address refusals, each on its own message.
fn ring_refusals() -> Vec<(&'static str, BadRing)> {
    const U: u64 = 0x7f00_0000_0000;
    let addr = |d, a, u| BadRing {
        two_regions: false,
        size: 64,
        addr: Some((U + d, U + a, U + u)),
    };
    let size = |n| BadRing {
        two_regions: false,
        size: n,
        addr: None,
    };
    vec![
        ("ring size not a power of two (split)", size(100)),
        ("ring size above the maximum", size(4096)),
        (
            "ring addresses outside guest memory",
            addr(0x1000_0000, 0x4000, 0x8000),
        ),
        (
            "used ring past the end of guest memory",
            addr(0x1000, 0x4000, 0xf_ff00),
        ),
        (
            "descriptor table straddling two regions",
            BadRing {
                two_regions: true,
                ..addr(0xf_ff00, 0x4000, 0x8000)
            },
        ),
        ("misaligned descriptor table", addr(0x1008, 0x4000, 0x8000)),
        ("misaligned avail ring", addr(0x1000, 0x4001, 0x8000)),
        ("misaligned used ring", addr(0x1000, 0x4000, 0x8002)),
    ]
}

/// Sends a message that the daemon may refuse by closing the connection.
fn send_lax(s: &Stream, req: &Request<'_>, need_reply: bool) {
    let mut buf = [0u8; MAX_MESSAGE];
    let n = req.encode(need_reply, &mut buf).unwrap();
    send_raw(s, &buf[..n], &[]);
}

#[test]
fn hostile_front_end_every_class() {
    let d = Daemon::start();
    // Warm up: one good connection, then measure the idle fd count.
    assert_serves(&d);
    let idle = d.stable_fds();
    for case in cases() {
        eprintln!("case {}", case.name);
        let s = d.connect();
        if case.handshake {
            handshake(&s);
        }
        (case.send)(&s);
        assert_dropped(&s);
        drop(s);
        let now = d.settle_fds(idle);
        assert_eq!(now, idle, "{}: fd leak ({idle} → {now})", case.name);
        assert_serves(&d);
    }
    let log = d.log();
    let errors = log.lines().filter(|l| l.starts_with("ERROR")).count();
    assert!(
        errors >= cases().len(),
        "every refusal is logged as an error:\n{log}"
    );
}

#[test]
fn failed_ack_keeps_the_connection() {
    let d = Daemon::start();
    let s = d.connect();
    let p = handshake(&s);
    assert!(p & P::REPLY_ACK.bits() != 0);
    // Ring size above the maximum, with NEED_REPLY: a failed ack, and the
    // connection goes on.
    send(
        &s,
        &Request::SetVringNum(VringStateMsg {
            index: 0,
            num: 4096,
        }),
        true,
        &[],
    );
    let r = recv_reply(&s, FrontendReq::SetVringNum).unwrap();
    assert_ne!(u64_of(FrontendReq::SetVringNum, &r), 0);
    send(&s, &Request::GetQueueNum, false, &[]);
    let r = recv_reply(&s, FrontendReq::GetQueueNum).unwrap();
    assert_eq!(u64_of(FrontendReq::GetQueueNum, &r), 2);
}

#[test]
fn ring_refusals_are_failed_acks_on_their_message() {
    let d = Daemon::start();
    for (name, bad) in ring_refusals() {
        eprintln!("case {name}");
        let s = d.connect();
        handshake(&s);
        bad.send(&s, true);
        let code = if bad.addr.is_some() {
            FrontendReq::SetVringAddr
        } else {
            FrontendReq::SetVringNum
        };
        let r = recv_reply(&s, code).expect(name);
        assert_ne!(u64_of(code, &r), 0, "{name}");
        // The connection goes on.
        send(&s, &Request::GetQueueNum, false, &[]);
        let r = recv_reply(&s, FrontendReq::GetQueueNum).expect(name);
        assert_eq!(u64_of(FrontendReq::GetQueueNum, &r), 2);
    }
}

#[test]
fn ring_set_before_set_features_is_checked_there() {
    // Packed rings are offered, so before SET_FEATURES a size of 100 may
    // be a packed ring's; SET_FEATURES choosing split rings is refused.
    let d = Daemon::start();
    let s = d.connect();
    send(&s, &Request::GetFeatures, false, &[]);
    let f = u64_of(
        FrontendReq::GetFeatures,
        &recv_reply(&s, FrontendReq::GetFeatures).unwrap(),
    );
    assert!(f & V::RING_PACKED.bits() != 0);
    send(
        &s,
        &Request::SetProtocolFeatures(P::REPLY_ACK.bits()),
        false,
        &[],
    );
    send(&s, &Request::SetOwner, false, &[]);
    BadRing {
        two_regions: false,
        size: 100,
        addr: None,
    }
    .send(&s, true);
    let r = recv_reply(&s, FrontendReq::SetVringNum).unwrap();
    assert_eq!(u64_of(FrontendReq::SetVringNum, &r), 0);
    let split = V::VERSION_1 | V::PROTOCOL_FEATURES;
    send(&s, &Request::SetFeatures(split.bits()), true, &[]);
    let r = recv_reply(&s, FrontendReq::SetFeatures).unwrap();
    assert_ne!(u64_of(FrontendReq::SetFeatures, &r), 0);
    send(
        &s,
        &Request::SetFeatures((split | V::RING_PACKED).bits()),
        true,
        &[],
    );
    let r = recv_reply(&s, FrontendReq::SetFeatures).unwrap();
    assert_eq!(u64_of(FrontendReq::SetFeatures, &r), 0);
    // Without NEED_REPLY the refusal ends the connection.
    drop(s);
    let s = d.connect();
    send(
        &s,
        &Request::SetProtocolFeatures(P::REPLY_ACK.bits()),
        false,
        &[],
    );
    BadRing {
        two_regions: false,
        size: 100,
        addr: None,
    }
    .send(&s, false);
    send_lax(&s, &Request::SetFeatures(split.bits()), false);
    assert_dropped(&s);
    assert_serves(&d);
}

#[test]
fn set_features_without_bit_30_is_a_failed_ack() {
    let d = Daemon::start();
    let s = d.connect();
    let p = handshake(&s);
    assert!(p & P::REPLY_ACK.bits() != 0);
    send(&s, &Request::SetFeatures(V::VERSION_1.bits()), true, &[]);
    let r = recv_reply(&s, FrontendReq::SetFeatures).unwrap();
    assert_ne!(u64_of(FrontendReq::SetFeatures, &r), 0);
    // Protocol features still hold: REPLY_ACK acks the next message.
    send(&s, &Request::SetOwner, true, &[]);
    let r = recv_reply(&s, FrontendReq::SetOwner).unwrap();
    assert_eq!(u64_of(FrontendReq::SetOwner, &r), 0);
}

#[test]
fn repeated_allocating_messages_do_not_grow() {
    let d = Daemon::start();
    let s = d.connect();
    handshake(&s);
    let (m, r) = memory(1 << 20);
    let t = [r];
    let round = |n: usize| {
        for _ in 0..n {
            send(
                &s,
                &Request::SetMemTable(MemTable::new(&t).unwrap()),
                true,
                &[m.as_fd()],
            );
            let a = recv_reply(&s, FrontendReq::SetMemTable).unwrap();
            assert_eq!(u64_of(FrontendReq::SetMemTable, &a), 0);
            send(
                &s,
                &Request::SetVringNum(VringStateMsg { index: 1, num: 256 }),
                true,
                &[],
            );
            recv_reply(&s, FrontendReq::SetVringNum).unwrap();
            let k = EventFd::new(false).unwrap();
            send(
                &s,
                &Request::SetVringCall(VringFdMsg {
                    index: 1,
                    no_fd: false,
                }),
                true,
                &[k.as_fd()],
            );
            recv_reply(&s, FrontendReq::SetVringCall).unwrap();
        }
    };
    round(50);
    let (fds, rss) = (d.fds(), d.rss_kib());
    round(500);
    let (fds2, rss2) = (d.fds(), d.rss_kib());
    assert_eq!(fds2, fds, "fds grew over 500 rounds");
    assert!(
        rss2 < rss + 2048,
        "RSS grew from {rss} KiB to {rss2} KiB over 500 rounds"
    );
}

#[test]
fn disconnect_unmaps_guest_memory_and_closes_its_fds() {
    let d = Daemon::start();
    assert_serves(&d);
    let idle = d.stable_fds();
    let s = d.connect();
    handshake(&s);
    let (m, r) = memory(1 << 20);
    let t = [r];
    send(
        &s,
        &Request::SetMemTable(MemTable::new(&t).unwrap()),
        true,
        &[m.as_fd()],
    );
    assert_eq!(
        u64_of(
            FrontendReq::SetMemTable,
            &recv_reply(&s, FrontendReq::SetMemTable).unwrap()
        ),
        0
    );
    let k = EventFd::new(false).unwrap();
    send(
        &s,
        &Request::SetVringCall(VringFdMsg {
            index: 0,
            no_fd: false,
        }),
        true,
        &[k.as_fd()],
    );
    recv_reply(&s, FrontendReq::SetVringCall).unwrap();
    assert_eq!(d.guest_mappings(), 1, "the region is mapped");
    assert_eq!(
        d.fds(),
        idle + 2,
        "the connection and the call fd (the memfd is closed once mapped)"
    );
    drop(s);
    assert_eq!(d.settle_fds(idle), idle);
    assert_eq!(
        d.guest_mappings(),
        0,
        "the mapping is gone after the front-end left"
    );
    assert_serves(&d);
}

#[test]
fn unix_socket_path_is_required_and_capabilities_print() {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\"type\": \"block\""), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket-path"));
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .args(["--socket-path", "/nonexistent-dir/x.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .args([
            "--socket-path",
            "/tmp/x.sock",
            "--blk-file",
            "/nonexistent/img",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn sigterm_exits_cleanly_and_removes_the_socket() {
    let mut d = Daemon::start();
    assert_serves(&d);
    // SAFETY-free: kill(1) from the shell.
    let st = Command::new("kill")
        .args(["-TERM", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "daemon ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    assert!(!Path::new(&d.sock).exists());
}

#[allow(dead_code)]
fn unused(_: OwnedFd) {}

/// A good dirty log: SET_LOG_BASE is answered with a u64 0 (flags 0x5,
/// the request's id), the log is mapped, and VHOST_F_LOG_ALL can be
/// switched on and off with acks while the connection goes on.
#[test]
fn dirty_log_base_is_answered_and_logging_switches() {
    let d = Daemon::start();
    let s = d.connect();
    let p = handshake(&s);
    assert!(p & P::LOG_SHMFD.bits() != 0, "LOG_SHMFD offered");
    send(&s, &Request::GetFeatures, false, &[]);
    let f = u64_of(
        FrontendReq::GetFeatures,
        &recv_reply(&s, FrontendReq::GetFeatures).unwrap(),
    );
    assert!(f & V::LOG_ALL.bits() != 0, "VHOST_F_LOG_ALL offered");
    let (m, r) = memory(1 << 20);
    let t = [r];
    send(
        &s,
        &Request::SetMemTable(MemTable::new(&t).unwrap()),
        true,
        &[m.as_fd()],
    );
    let ack = recv_reply(&s, FrontendReq::SetMemTable).unwrap();
    assert_eq!(u64_of(FrontendReq::SetMemTable, &ack), 0);
    let log = memfd::create("log", 4096).unwrap();
    let msg = vhost_user_core::message::LogMsg {
        size: 64,
        offset: 0,
    };
    send(&s, &Request::SetLogBase(msg), false, &[log.as_fd()]);
    let reply = recv_reply(&s, FrontendReq::SetLogBase).expect("SET_LOG_BASE has a reply");
    assert_eq!(
        &reply[4..8],
        &5u32.to_ne_bytes(),
        "flags: version 1 | REPLY"
    );
    assert_eq!(reply.len(), HEADER_SIZE + 8, "a u64 reply");
    assert_eq!(&reply[HEADER_SIZE..], &0u64.to_ne_bytes());
    for on in [true, false] {
        let mut f = V::VERSION_1 | V::PROTOCOL_FEATURES;
        f.set(V::LOG_ALL, on);
        send(&s, &Request::SetFeatures(f.bits()), true, &[]);
        let ack = recv_reply(&s, FrontendReq::SetFeatures).unwrap();
        assert_eq!(u64_of(FrontendReq::SetFeatures, &ack), 0, "LOG_ALL {on}");
    }
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    let log = d.log();
    assert!(log.contains("dirty log of 64 bytes mapped"), "{log}");
    assert!(log.contains("dirty logging on"), "{log}");
    assert!(log.contains("dirty logging off"), "{log}");
}

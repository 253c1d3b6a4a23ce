//! Stopping one ring of a worker thread that serves several (the
//! runtime's `threads` option) does not stall the others: while ring 0
//! drains a request its device holds for a long time (GET_VRING_BASE
//! waits for it), ring 1, on the same thread, goes on completing its
//! requests at once. The reply to ring 0's GET_VRING_BASE comes only once
//! its request completed, with its base.
//!
//! The runtime runs in this process with a test device, over a real
//! socket, set up by our front-end link; both ways a device may hold
//! requests are covered: with a completion fd (the thread sleeps on it)
//! and without (the thread polls the device).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{front, recv_reply, send, u64_of, TempDir};
use vhost_user_core::backend::BackendConfig;
use vhost_user_core::dataplane::Token;
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{FrontendConfig, State};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{
    ConfigWriteKind, FrontendReq, Header, ParseOptions, Reply, Request, HEADER_SIZE,
};
use vhost_user_core::vring::Chain;
use vhost_user_linux::backend::{serve_one, RuntimeOptions, SharedDevice};
use vhost_user_linux::channel::Control;
use vhost_user_linux::frontend::FrontendLink;
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_linux::sys::eventfd::EventFd;
use vhost_user_linux::sys::socket::{Listener, Stream};
use vhost_user_test::driver::{Buf, SplitDriver};

const RAM: u64 = 1 << 20;
const VA: u64 = 0x7f00_0000_0000;
const SIZE: u16 = 64;
/// Where each ring lies in guest memory.
const RING_AT: [u64; 2] = [0x1000, 0x4000];
/// How long the device holds ring 0's requests.
const HOLD: Duration = Duration::from_millis(1500);
/// Ring 1's requests served while ring 0 drains.
const N: u16 = 5;

/// Ring 0's requests complete `HOLD` after they arrived; ring 1's at
/// once.
#[derive(Clone)]
struct Holder {
    /// Signal completions on an eventfd (else the runtime polls).
    with_fd: bool,
    /// Ring 0's request arrived (the device holds it).
    held: Arc<AtomicBool>,
    /// Ring 0 was told it stops (its drain began).
    stopping: Arc<AtomicBool>,
    /// Ring 0's draining rounds (the runtime tells the device before
    /// each).
    drain_rounds: Arc<AtomicU64>,
}

#[derive(Default)]
struct Held {
    /// Requests held, and when they complete.
    due: Vec<(Token, Instant)>,
    /// The completion fd, with `with_fd`: written by a timer thread.
    fd: Option<Arc<EventFd>>,
    /// Timer threads.
    timers: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        for t in self.timers.drain(..) {
            let _ = t.join();
        }
    }
}

impl Device for Holder {
    type Scratch = Held;

    fn read_config(&self, _offset: u32, _dst: &mut [u8]) -> bool {
        false
    }

    fn write_config(&mut self, _offset: u32, _src: &[u8], _kind: ConfigWriteKind) -> bool {
        false
    }

    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        queue: u16,
        _chain: &Chain<S>,
        token: Token,
        _mem: &M,
        scratch: &mut Self::Scratch,
    ) -> Completion {
        if queue != 0 {
            return Completion::Done(0);
        }
        let held = scratch;
        let due = Instant::now() + HOLD;
        held.due.push((token, due));
        self.held.store(true, Ordering::Release);
        if self.with_fd {
            let fd =
                Arc::clone(held.fd.get_or_insert_with(|| {
                    Arc::new(EventFd::new(true).expect("completion eventfd"))
                }));
            held.timers.push(std::thread::spawn(move || {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                fd.write(1).unwrap();
            }));
        }
        Completion::Later
    }

    fn poll<M: GuestMemory + ?Sized>(
        &self,
        _queue: u16,
        _mem: &M,
        scratch: &mut Self::Scratch,
        done: &mut dyn FnMut(Token, u32),
    ) {
        let now = Instant::now();
        scratch.due.retain(|&(t, due)| {
            if due <= now {
                done(t, 0);
            }
            due > now
        });
    }

    fn stopping(&self, queue: u16, _scratch: &mut Self::Scratch) {
        if queue == 0 {
            self.stopping.store(true, Ordering::Release);
            self.drain_rounds.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl SharedDevice for Holder {
    fn completion_fd<'a>(&self, _queue: u16, scratch: &'a Held) -> Option<BorrowedFd<'a>> {
        // Made with the first request held, then kept for the scratch's
        // life.
        scratch.fd.as_deref().map(AsFd::as_fd)
    }
}

/// The runtime serving one connection on `sock`, both rings on one
/// worker thread.
fn runtime(sock: &std::path::Path, device: Holder) -> std::thread::JoinHandle<()> {
    let listener = Listener::bind(sock).unwrap();
    let config = BackendConfig {
        features: V::VERSION_1 | V::PROTOCOL_FEATURES,
        protocol_features: P::MQ | P::REPLY_ACK,
        num_queues: 2,
        max_queue_size: 256,
    };
    let options = RuntimeOptions {
        threads: 1,
        ..RuntimeOptions::default()
    };
    std::thread::spawn(move || {
        let stream = listener.accept().unwrap();
        serve_one::<Holder, 2, 1>(&stream, config, device, options, &Control::new());
    })
}

struct Rig {
    link: FrontendLink<2, 1>,
    /// The link's socket, for the messages sent by hand.
    s: Stream,
    mem: LinuxGuestMemory,
    rings: [SplitDriver; 2],
    /// Ring 1's kick eventfd (the link has its own handle).
    kick1: EventFd,
}

fn rig(sock: &std::path::Path) -> Rig {
    let (mem, region, fd) = front::guest_ram("vhu-shared-thread-stop", RAM, VA);
    let rings = RING_AT.map(|at| SplitDriver::new(&mem, SIZE, at, false).unwrap());
    let mut cfg: FrontendConfig<2, 1> =
        FrontendConfig::new(V::VERSION_1 | V::PROTOCOL_FEATURES, P::MQ | P::REPLY_ACK);
    cfg.regions.push(region).unwrap();
    for r in &rings {
        let a = r.addrs();
        cfg.queues.push(front::queue(SIZE, a, VA, 0)).unwrap();
    }
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(true).unwrap()).collect();
    let kick1 = EventFd::from(kicks[1].as_fd().try_clone_to_owned().unwrap());
    let calls = (0..2).map(|_| Some(EventFd::new(true).unwrap())).collect();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let regions: Vec<OwnedFd> = vec![fd];
    let mut link = FrontendLink::connect(
        sock,
        cfg,
        regions,
        kicks.into_iter().map(Some).collect(),
        calls,
    )
    .unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Ready);
    link.engine().start().unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Started);
    let s = Stream::try_from(link.socket().try_clone_to_owned().unwrap()).unwrap();
    // A back-end that does not answer fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Rig {
        link,
        s,
        mem,
        rings,
        kick1,
    }
}

/// Sends `req` and returns its reply's ring state (index, num).
fn vring_state(s: &Stream, req: &Request<'_>) -> (u32, u32) {
    let code = req.code();
    send(s, req, false, &[]);
    let r = recv_reply(s, code).unwrap();
    let h = Header::parse(&r).unwrap();
    match Reply::parse(code, &h, &r[HEADER_SIZE..], 0, &ParseOptions::default()).unwrap() {
        Reply::VringState { index, num } => (index, num),
        other => panic!("{other:?}"),
    }
}

/// Disables ring `q` (acked), as a front-end does before GET_VRING_BASE.
fn disable(s: &Stream, q: u32) {
    let req = Request::SetVringEnable {
        index: q,
        enable: false,
    };
    send(s, &req, true, &[]);
    let code = FrontendReq::SetVringEnable;
    assert_eq!(u64_of(code, &recv_reply(s, code).unwrap()), 0);
}

fn ring_1_runs_while_ring_0_drains(with_fd: bool) {
    let dir = TempDir::new("shared-thread-stop");
    let sock = dir.0.join("s.sock");
    let held = Arc::new(AtomicBool::new(false));
    let stopping = Arc::new(AtomicBool::new(false));
    let drain_rounds = Arc::new(AtomicU64::new(0));
    let server = runtime(
        &sock,
        Holder {
            with_fd,
            held: Arc::clone(&held),
            stopping: Arc::clone(&stopping),
            drain_rounds: Arc::clone(&drain_rounds),
        },
    );
    let mut r = rig(&sock);

    // Ring 0: one request, which the device holds.
    r.rings[0]
        .post(&r.mem, &[Buf::writable(0x8000, 16)])
        .unwrap();
    let held_at = Instant::now();
    assert!(r.link.kick(0));
    while !held.load(Ordering::Acquire) {
        assert!(held_at.elapsed() < HOLD / 2, "ring 0's request not taken");
        std::thread::sleep(Duration::from_millis(1));
    }

    // Ring 0 stopped while it holds it: the reply waits for the drain.
    let s0 = r.s.try_clone().unwrap();
    let stop = std::thread::spawn(move || {
        disable(&s0, 0);
        let state = vring_state(&s0, &Request::GetVringBase(0));
        (state, Instant::now())
    });
    let t0 = Instant::now();
    while !stopping.load(Ordering::Acquire) {
        assert!(t0.elapsed() < HOLD / 2, "ring 0's drain did not begin");
        std::thread::sleep(Duration::from_millis(1));
    }

    // Meanwhile ring 1's requests complete at once, one after another.
    let mut slowest = Duration::ZERO;
    for i in 0..N {
        r.rings[1]
            .post(&r.mem, &[Buf::writable(0x9000 + 0x100 * u64::from(i), 16)])
            .unwrap();
        let posted = Instant::now();
        r.kick1.write(1).unwrap();
        while r.rings[1].harvest(&r.mem).unwrap().is_none() {
            assert!(
                posted.elapsed() < HOLD / 3,
                "ring 1's request {i} waited for ring 0's drain"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        slowest = slowest.max(posted.elapsed());
    }
    assert!(
        !stop.is_finished(),
        "ring 0 stopped before its request completed"
    );
    assert!(
        r.rings[0].harvest(&r.mem).unwrap().is_none(),
        "ring 0's request completed early"
    );

    // Ring 0's reply: after its request completed, with its base.
    let ((index, base), replied) = stop.join().unwrap();
    assert_eq!((index, base), (0, 1), "ring 0's base counts its request");
    assert!(
        replied.duration_since(held_at) >= HOLD,
        "GET_VRING_BASE answered before the request completed"
    );
    let used = r.rings[0].harvest(&r.mem).unwrap();
    assert!(
        used.is_some(),
        "ring 0's request completed before the reply"
    );
    let rounds = drain_rounds.load(Ordering::Relaxed);
    if with_fd {
        // The thread slept on the completion fd, woken by ring 1's kicks
        // and the completion: a few rounds, not one per poll interval.
        assert!(rounds < 200, "{rounds} draining rounds: the thread polled");
    }

    // Ring 1 stops as usual, with every request counted.
    disable(&r.s, 1);
    assert_eq!(
        vring_state(&r.s, &Request::GetVringBase(1)),
        (1, u32::from(N))
    );
    eprintln!(
        "ring 0 drained in {rounds} rounds; the slowest of ring 1's requests meanwhile took {slowest:?}"
    );

    drop(r);
    server.join().unwrap();
}

#[test]
fn a_ring_draining_on_its_completion_fd_does_not_stall_its_thread() {
    ring_1_runs_while_ring_0_drains(true);
}

#[test]
fn a_ring_draining_by_polling_does_not_stall_its_thread() {
    ring_1_runs_while_ring_0_drains(false);
}

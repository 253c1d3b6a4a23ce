//! How much of a ring's queue a worker's round takes before it gives the
//! completions back (one publish, one call each): half of what the
//! driver has in flight for a ring alone on its thread (the driver
//! refills while the other half is served), all of it once the thread's
//! other rings are busy too (their turns give each driver that time).
//!
//! The runtime runs in this process with a device that completes every
//! request at once, over a real socket set up by our front-end link;
//! both rings are on one worker thread. The driver makes 128 requests
//! available on a ring before one kick, and counts the calls: every
//! round that publishes calls (no EVENT_IDX), and the call eventfd adds
//! them up.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{front, TempDir};
use vhost_user_core::backend::BackendConfig;
use vhost_user_core::dataplane::Token;
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{FrontendConfig, State};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::ConfigWriteKind;
use vhost_user_core::vring::Chain;
use vhost_user_linux::backend::{serve_one, RuntimeOptions, SharedDevice};
use vhost_user_linux::channel::Control;
use vhost_user_linux::frontend::FrontendLink;
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_linux::sys::eventfd::EventFd;
use vhost_user_linux::sys::socket::Listener;
use vhost_user_test::driver::{Buf, SplitDriver};

const RAM: u64 = 1 << 20;
const VA: u64 = 0x7f00_0000_0000;
const SIZE: u16 = 128;
/// Where each ring lies in guest memory.
const RING_AT: [u64; 2] = [0x1000, 0x8000];

/// Completes every request at once, writing nothing.
#[derive(Clone)]
struct Nop;

impl Device for Nop {
    type Scratch = ();

    fn read_config(&self, _offset: u32, _dst: &mut [u8]) -> bool {
        false
    }

    fn write_config(&mut self, _offset: u32, _src: &[u8], _kind: ConfigWriteKind) -> bool {
        false
    }

    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _queue: u16,
        _chain: &Chain<S>,
        _token: Token,
        _mem: &M,
        _scratch: &mut (),
    ) -> Completion {
        Completion::Done(0)
    }
}

impl SharedDevice for Nop {}

struct Rig {
    link: FrontendLink<2, 1>,
    mem: LinuxGuestMemory,
    rings: [SplitDriver; 2],
    /// The rings' call eventfds (the link has its own handles).
    calls: Vec<EventFd>,
    server: std::thread::JoinHandle<()>,
}

/// The runtime serving one connection, both rings on one worker thread
/// (without a spin, so it sleeps on the kicks once idle), and our
/// front-end with both rings started.
fn rig(dir: &TempDir) -> Rig {
    let sock = dir.0.join("s.sock");
    let listener = Listener::bind(&sock).unwrap();
    let config = BackendConfig {
        features: V::VERSION_1 | V::PROTOCOL_FEATURES,
        protocol_features: P::MQ | P::REPLY_ACK,
        num_queues: 2,
        max_queue_size: 256,
    };
    let options = RuntimeOptions {
        threads: 1,
        spin: Duration::ZERO,
        ..RuntimeOptions::default()
    };
    let server = std::thread::spawn(move || {
        let stream = listener.accept().unwrap();
        serve_one::<Nop, 2, 1>(&stream, config, Nop, options, &Control::new());
    });
    let (mem, region, fd) = front::guest_ram("vhu-round-batches", RAM, VA);
    let rings = RING_AT.map(|at| SplitDriver::new(&mem, SIZE, at, false).unwrap());
    let mut cfg: FrontendConfig<2, 1> =
        FrontendConfig::new(V::VERSION_1 | V::PROTOCOL_FEATURES, P::MQ | P::REPLY_ACK);
    cfg.regions.push(region).unwrap();
    for r in &rings {
        cfg.queues
            .push(front::queue(SIZE, r.addrs(), VA, 0))
            .unwrap();
    }
    let kicks = (0..2).map(|_| Some(EventFd::new(true).unwrap())).collect();
    let calls: Vec<EventFd> = (0..2).map(|_| EventFd::new(true).unwrap()).collect();
    let theirs = calls
        .iter()
        .map(|c| Some(EventFd::from(c.as_fd().try_clone_to_owned().unwrap())))
        .collect();
    let regions: Vec<OwnedFd> = vec![fd];
    let mut link = FrontendLink::connect(&sock, cfg, regions, kicks, theirs).unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Ready);
    link.engine().start().unwrap();
    link.drive().unwrap();
    assert_eq!(link.engine().state(), State::Started);
    Rig {
        link,
        mem,
        rings,
        calls,
        server,
    }
}

impl Rig {
    /// Makes `SIZE` requests available on each of `rings` (all written
    /// before the first kick: the worker, asleep, finds them all), kicks
    /// them, waits until every one is used and returns each ring's calls.
    fn serve(&mut self, rings: &[usize]) -> Vec<u64> {
        // The worker went to sleep on the kicks after the rings started
        // (nothing to pop).
        std::thread::sleep(Duration::from_millis(50));
        for &q in rings {
            for i in 0..u64::from(SIZE) {
                let at = 0x20000 + 0x10000 * q as u64 + 0x100 * i;
                self.rings[q]
                    .add(&self.mem, &[Buf::writable(at, 16)])
                    .unwrap();
            }
            self.rings[q].publish(&self.mem).unwrap();
        }
        for &q in rings {
            assert!(self.link.kick(q as u16));
        }
        let t0 = Instant::now();
        for &q in rings {
            let mut used = 0;
            while used < SIZE {
                match self.rings[q].harvest(&self.mem).unwrap() {
                    Some(_) => used += 1,
                    None => {
                        assert!(
                            t0.elapsed() < Duration::from_secs(10),
                            "requests not served"
                        );
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        (0..2).map(|q| self.calls[q].read().unwrap_or(0)).collect()
    }

    fn end(self) {
        drop(self.link);
        self.server.join().unwrap();
    }
}

#[test]
fn a_ring_alone_on_its_thread_gives_back_half_its_depth_per_round() {
    let dir = TempDir::new("round-batches-alone");
    let mut r = rig(&dir);
    // 128 in flight: 64 (half), then half of what is left each round,
    // at least 16: 32, 16, 16.
    assert_eq!(r.serve(&[0]), [4, 0]);
    r.end();
}

#[test]
fn busy_rings_sharing_a_thread_give_back_their_whole_depth_per_round() {
    let dir = TempDir::new("round-batches-shared");
    let mut r = rig(&dir);
    // The first round of each takes half (neither had worked before);
    // once both have, each takes all it has left: 64, then 64.
    assert_eq!(r.serve(&[0, 1]), [2, 2]);
    // Again after the thread slept (its last turn found both idle).
    assert_eq!(r.serve(&[0, 1]), [2, 2]);
    // One ring busy, the other idle: halves again.
    assert_eq!(r.serve(&[1]), [0, 4]);
    r.end();
}

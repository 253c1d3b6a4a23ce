//! The front-end engine against a hostile back-end: every reply it awaits
//! is made from the fuzz bytes, a sane one with fuzzed values (features,
//! protocol features, queue count, memory slots, ring bases, the inflight
//! area, config bytes, acks), a reply of the wrong kind with fuzzed fields,
//! or raw bytes; commands (start, stop, suspending stop, config reads,
//! memory changes) arrive at any time, and sometimes events are left
//! undrained and the output buffer is short.
//!
//! Invariants (a panic is a bug): nothing panics; a message fits the buffer
//! it was written into, parses as the request it claims to be, names only
//! fds it has, awaits a reply exactly when the protocol says; a reply is
//! accepted, or refused with an error that is fatal and leaves the engine
//! failed, after which every call answers `Failed`; a refused command is
//! not fatal and changes nothing; the features acked are offered and
//! wanted; events are never lost (every ring reports started and stopped
//! before the flow ends) and report what the back-end answered; a start
//! resumes each ring from the base of the last stop.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{
    log_size, Event, FdRef, Frontend, FrontendConfig, FrontendError, NotifyMode, QueueConfig,
    State, MAX_TRANSMIT, SUPPORTED_PROTOCOL_FEATURES,
};
use vhost_user_core::message::{
    ConfigMsg, ConfigWriteKind, FrontendReq, Header, InflightMsg, MemRegionMsg, ParseOptions,
    Reply, Request, WireError, HEADER_SIZE, MAX_CONFIG_SIZE, MAX_MESSAGE, REPLY_FLAGS,
};
use vhost_user_core::vring::RingAddrs;

#[path = "common/input.rs"]
mod input;
use input::In;

const NQ: usize = 2;
const NR: usize = 4;
const OPS: usize = 300;
const USER: u64 = 0x7f00_0000_0000;

/// What the message in flight asked.
#[derive(Clone, Copy, Debug)]
struct Asked {
    code: FrontendReq,
    need_reply: bool,
    /// GET_VRING_BASE: the ring.
    ring: u32,
    /// GET_CONFIG: the range.
    config: (u32, u32),
}

/// The back-end as the fuzz bytes play it, and what the harness expects
/// of the engine.
struct Harness {
    fe: Frontend<NQ, NR>,
    wanted: V,
    wanted_protocol: P,
    queues: usize,
    /// What the back-end offers (fuzzed once, sometimes changed).
    offer: u64,
    protocol_offer: u64,
    /// What the engine accepted as the offers (the first answers).
    offered: Option<u64>,
    protocol_offered: Option<u64>,
    asked: Option<Asked>,
    /// Events seen in the current flow.
    started: [bool; NQ],
    stopped: [bool; NQ],
    /// Per ring: the base the next start must send.
    next_base: [u32; NQ],
    /// The bases accepted, in order, for the RingStopped events to come.
    stops: VecDeque<(u16, u32)>,
    /// The config bytes accepted, for the Config events to come.
    configs: VecDeque<(u32, Vec<u8>)>,
    negotiated: Option<(V, P)>,
}

fn region(i: &mut In<'_>) -> MemRegionMsg {
    match i.u8() % 8 {
        0 => MemRegionMsg {
            guest_addr: i.u64(),
            size: i.u64(),
            user_addr: i.u64(),
            mmap_offset: i.u64(),
            xen: None,
        },
        v => {
            let gpa = u64::from(v) << 20;
            MemRegionMsg {
                guest_addr: gpa,
                size: 1 << 20,
                user_addr: gpa + USER,
                mmap_offset: 0,
                xen: None,
            }
        }
    }
}

fn regions(i: &mut In<'_>) -> Vec<MemRegionMsg> {
    let n = match i.u8() % 8 {
        0 => 0,
        7 => usize::from(i.u8() % 8),
        v => usize::from(v % 3 + 1),
    };
    (0..n).map(|_| region(i)).collect()
}

impl Harness {
    fn new(i: &mut In<'_>) -> Option<Harness> {
        let c = i.u8();
        let mut wanted = V::VERSION_1 | V::from_bits_retain(u64::from(i.u8() & 0xf));
        for (bit, f) in [
            V::PROTOCOL_FEATURES,
            V::EVENT_IDX,
            V::INDIRECT_DESC,
            V::RING_PACKED,
        ]
        .into_iter()
        .enumerate()
        {
            if (c >> bit) & 1 == u8::from(bit != 0) {
                wanted |= f;
            }
        }
        let withheld = P::from_bits_retain(u64::from(i.u32() & i.u32()));
        let wanted_protocol = SUPPORTED_PROTOCOL_FEATURES.difference(withheld);
        let mut cfg = FrontendConfig::<NQ, NR>::new(wanted, wanted_protocol);
        let queues = usize::from(c >> 4 & 1) + 1;
        for q in 0..queues {
            let size = match i.u8() % 8 {
                0 => i.u16(),
                v => 1 << (v + 1),
            };
            let at = USER + q as u64 * 0x10000;
            let _ = cfg.queues.push(QueueConfig {
                size,
                addrs: RingAddrs {
                    desc: at,
                    driver: at + 0x8000,
                    device: at + 0xc000,
                },
                base: if wanted.contains(V::RING_PACKED) {
                    0x8000_8000
                } else {
                    0
                },
                kick: if i.bool() {
                    NotifyMode::Polling
                } else {
                    NotifyMode::Eventfd
                },
                call: if i.bool() {
                    NotifyMode::Polling
                } else {
                    NotifyMode::Eventfd
                },
            });
        }
        for r in regions(i) {
            let _ = cfg.regions.push(r);
        }
        if c & 0x20 != 0 {
            cfg.inflight = Some(InflightMsg {
                mmap_size: u64::from(i.u16()) + 1,
                mmap_offset: 0,
                num_queues: queues as u16,
                queue_size: cfg.queues[0].size,
            });
        }
        let next_base = core::array::from_fn(|q| cfg.queues.get(q).map_or(0, |c| c.base));
        let fe = match Frontend::new(cfg) {
            Ok(fe) => fe,
            Err(e) => {
                assert!(!e.is_fatal(), "a refused configuration is fatal: {e:?}");
                return None;
            }
        };
        assert_eq!(fe.state(), State::Initializing);
        let offer = match c >> 6 {
            0 => i.u64(),
            _ => {
                (V::VERSION_1
                    | V::PROTOCOL_FEATURES
                    | V::EVENT_IDX
                    | V::INDIRECT_DESC
                    | V::RING_PACKED
                    | V::LOG_ALL)
                    .bits()
                    | u64::from(i.u8())
            }
        };
        let protocol_offer = match i.u8() % 4 {
            0 => i.u64(),
            _ => SUPPORTED_PROTOCOL_FEATURES.bits() & !u64::from(i.u32() & i.u32()),
        };
        Some(Harness {
            fe,
            wanted,
            wanted_protocol,
            queues,
            offer,
            protocol_offer,
            offered: None,
            protocol_offered: None,
            asked: None,
            started: [false; NQ],
            stopped: [false; NQ],
            next_base,
            stops: VecDeque::new(),
            configs: VecDeque::new(),
            negotiated: None,
        })
    }

    fn failed(&self) -> bool {
        self.fe.state() == State::Failed
    }

    /// After a fatal error every call answers `Failed`.
    fn check_failed(&mut self) {
        assert_eq!(self.fe.state(), State::Failed);
        assert!(self.fe.is_idle() && !self.fe.awaits_reply());
        let mut buf = [0u8; MAX_TRANSMIT];
        assert_eq!(self.fe.poll_transmit(&mut buf), Err(FrontendError::Failed));
        let h = Header::reply(FrontendReq::GetFeatures.id(), 8);
        assert_eq!(
            self.fe.handle_reply(&h, &[0; 8], 0),
            Err(FrontendError::Failed)
        );
        assert_eq!(self.fe.start(), Err(FrontendError::Failed));
        assert_eq!(self.fe.stop(), Err(FrontendError::Failed));
        assert_eq!(self.fe.read_config(0, 4), Err(FrontendError::Failed));
    }

    fn drain(&mut self) {
        while let Some(e) = self.fe.poll_event() {
            match e {
                Event::Negotiated {
                    features,
                    protocol_features,
                } => {
                    let offered = self.offered.expect("negotiated before an offer");
                    assert_eq!(features.bits() & !offered, 0, "acked but not offered");
                    assert!(self.wanted.contains(features), "acked but not wanted");
                    let p = self.protocol_offered.unwrap_or(0);
                    assert_eq!(protocol_features.bits() & !p, 0);
                    assert!(self.wanted_protocol.contains(protocol_features));
                    protocol_features
                        .check_dependencies()
                        .expect("acked protocol features keep their dependencies");
                    self.negotiated = Some((features, protocol_features));
                }
                Event::InjectKick(q) | Event::RingStarted(q) => {
                    assert!(usize::from(q) < self.queues);
                    if matches!(e, Event::RingStarted(_)) {
                        self.started[usize::from(q)] = true;
                    }
                }
                Event::Started => {
                    assert!(
                        self.started[..self.queues].iter().all(|s| *s),
                        "started without every ring: {:?}",
                        self.started
                    );
                    self.started = [false; NQ];
                }
                Event::RingStopped { queue, base } => {
                    let q = usize::from(queue);
                    assert!(q < self.queues);
                    assert_eq!(
                        Some((queue, base)),
                        self.stops.pop_front(),
                        "a base not answered"
                    );
                    self.stopped[q] = true;
                }
                Event::Stopped => {
                    assert!(
                        self.stopped[..self.queues].iter().all(|s| *s),
                        "stopped without every ring: {:?}",
                        self.stopped
                    );
                    self.stopped = [false; NQ];
                }
                Event::MemoryUpdated => {}
                Event::Config { offset, data } => {
                    let got = (offset, data.to_vec());
                    assert_eq!(Some(got), self.configs.pop_front(), "config not answered");
                }
                Event::ConfigFailed { .. } => {}
                Event::StateTransfer { .. } | Event::StateChecked => {}
                Event::Logging(_) => {}
            }
        }
    }

    /// Takes the next message, if any, and checks it.
    fn transmit(&mut self, i: &mut In<'_>) {
        let short = i.u8() == 0xff;
        let mut buf = [0u8; MAX_TRANSMIT];
        let len = if short {
            usize::from(i.u8()) % MAX_TRANSMIT
        } else {
            MAX_TRANSMIT
        };
        let was = (self.fe.state(), self.fe.awaits_reply(), self.fe.is_idle());
        let t = match self.fe.poll_transmit(&mut buf[..len]) {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(FrontendError::Failed) => return self.check_failed(),
            Err(e) => {
                assert!(
                    matches!(e, FrontendError::Wire(WireError::BufferTooSmall { .. })),
                    "poll_transmit: {e:?}"
                );
                assert!(short && !e.is_fatal());
                let now = (self.fe.state(), self.fe.awaits_reply(), self.fe.is_idle());
                assert_eq!(was, now, "a refused transmit changed the engine");
                return;
            }
        };
        assert!(!was.1, "a message while a reply is awaited");
        assert!(t.len <= len, "a message of {} bytes in {len}", t.len);
        let msg = &buf[..t.len];
        let h = Header::parse(msg).expect("our header parses");
        assert_eq!(h.request, t.request.id());
        assert_eq!(h.size as usize + HEADER_SIZE, t.len);
        h.check_request().expect("a request header");
        let opts = ParseOptions::default();
        let req = Request::parse(&h, &msg[HEADER_SIZE..], t.fds.len(), &opts)
            .unwrap_or_else(|e| panic!("our {:?} does not parse: {e}", t.request));
        assert_eq!(req.code(), t.request);
        assert_eq!(t.awaits_reply, t.request.has_reply() || h.need_reply());
        assert_eq!(t.awaits_reply, self.fe.awaits_reply());
        for fd in &t.fds {
            match *fd {
                FdRef::Region(r) => assert!(usize::from(r) < self.fe.regions().len()),
                FdRef::Kick(q) | FdRef::Call(q) => assert!(usize::from(q) < self.queues),
                FdRef::Inflight => assert_eq!(t.request, FrontendReq::SetInflightFd),
                FdRef::BackendChannel => assert_eq!(t.request, FrontendReq::SetBackendReqFd),
                FdRef::DeviceState => assert_eq!(t.request, FrontendReq::SetDeviceStateFd),
                FdRef::Log => assert_eq!(t.request, FrontendReq::SetLogBase),
            }
        }
        let mut asked = Asked {
            code: t.request,
            need_reply: h.need_reply(),
            ring: 0,
            config: (0, 0),
        };
        match req {
            Request::SetFeatures(v) => {
                // VHOST_F_LOG_ALL exactly while logging (offered, not
                // necessarily wanted: start_logging asks for it).
                let log = V::LOG_ALL.bits();
                assert_eq!(v & !log, self.fe.features().bits());
                assert_eq!(v & log != 0, self.fe.logging().is_some());
                assert_eq!(v & !self.offered.expect("SET_FEATURES after an offer"), 0);
                assert!(self.wanted.contains(V::from_bits_retain(v & !log)));
            }
            Request::SetProtocolFeatures(v) => {
                let p = self
                    .protocol_offered
                    .expect("SET_PROTOCOL_FEATURES after an offer");
                assert_eq!(v & !p, 0);
                assert!(self.wanted_protocol.contains(P::from_bits_retain(v)));
            }
            Request::SetVringBase(s) => {
                let q = s.index as usize;
                assert!(q < self.queues);
                assert_eq!(s.num, self.next_base[q], "a start does not resume ring {q}");
            }
            Request::GetVringBase(q) | Request::GetVringBaseSkipDrain(q) => {
                assert!((q as usize) < self.queues);
                asked.ring = q;
            }
            Request::GetConfig(c) => asked.config = (c.offset, c.data.len() as u32),
            Request::SetVringAddr(a) => assert_eq!(a.log, self.fe.logging().is_some()),
            Request::SetLogBase(l) => {
                assert_eq!(Some(l.size), self.fe.logging());
                assert_eq!(l.offset, 0);
            }
            _ => {}
        }
        if t.awaits_reply {
            self.asked = Some(asked);
        }
    }

    /// The back-end's answer to the message in flight.
    fn reply(&mut self, i: &mut In<'_>) {
        assert_eq!(self.asked.is_some(), self.fe.awaits_reply());
        let Some(a) = self.asked else {
            // A reply nobody asked for.
            let h = Header::reply(u32::from(i.u8() % 46), 8);
            let failed = self.failed();
            let r = self.fe.handle_reply(&h, &i.u64().to_le_bytes(), 0);
            if failed {
                assert_eq!(r, Err(FrontendError::Failed));
            } else {
                assert!(matches!(r, Err(FrontendError::UnexpectedReply { .. })));
            }
            return self.check_failed();
        };
        let mut out = [0u8; MAX_MESSAGE];
        let mut data = [0u8; MAX_CONFIG_SIZE as usize];
        let mode = i.u8() % 8;
        let (n, nfds) = match mode {
            0..=5 => {
                let (r, nfds) = self.sane(a, i, &mut data);
                let n = r.encode(a.code, &mut out).expect("a reply encodes");
                let nfds = if mode == 5 {
                    usize::from(i.u8() % 3)
                } else {
                    nfds
                };
                (n, nfds)
            }
            6 => {
                // Another kind of reply, with fuzzed fields.
                let r = match i.u8() % 5 {
                    0 => Reply::U64(i.u64()),
                    1 => Reply::VringState {
                        index: i.u32(),
                        num: i.u32(),
                    },
                    2 => {
                        let len = usize::from(i.u8()).min(data.len());
                        data[..len].copy_from_slice(&[0x5a; 256][..len]);
                        Reply::Config(ConfigMsg {
                            offset: u32::from(i.u8()),
                            kind: ConfigWriteKind::Frontend,
                            data: &data[..len],
                        })
                    }
                    3 => Reply::ConfigFailed,
                    _ => Reply::Inflight(InflightMsg {
                        mmap_size: i.u64(),
                        mmap_offset: i.u64(),
                        num_queues: i.u16(),
                        queue_size: i.u16(),
                    }),
                };
                let Ok(n) = r.encode(a.code, &mut out) else {
                    return;
                };
                (n, usize::from(i.u8() % 3))
            }
            _ => {
                // Raw bytes after a header that parses (a framer refuses
                // any other).
                let request = if i.bool() { a.code.id() } else { i.u32() };
                let flags = if i.bool() { REPLY_FLAGS } else { i.u32() };
                let size = usize::from(i.u8()) % 64;
                out[0..4].copy_from_slice(&request.to_le_bytes());
                out[4..8].copy_from_slice(&flags.to_le_bytes());
                out[8..12].copy_from_slice(&(size as u32).to_le_bytes());
                let b = i.bytes(size);
                out[HEADER_SIZE..HEADER_SIZE + b.len()].copy_from_slice(b);
                (HEADER_SIZE + size, usize::from(i.u8() % 3))
            }
        };
        let Ok(h) = Header::parse(&out[..n]) else {
            return;
        };
        let payload = &out[HEADER_SIZE..HEADER_SIZE + h.size as usize];
        let phase = self.fe.state();
        match self.fe.handle_reply(&h, payload, nfds) {
            Ok(()) => {
                self.asked = None;
                assert!(!self.fe.awaits_reply());
                assert!(!self.failed());
                // What the engine accepted, for the checks of what follows.
                let r = Reply::parse(a.code, &h, payload, nfds, &ParseOptions::default())
                    .expect("an accepted reply parses");
                match (a.code, r) {
                    (FrontendReq::GetFeatures, Reply::U64(v)) => {
                        if phase == State::Initializing && self.offered.is_none() {
                            self.offered = Some(v);
                        }
                        assert_eq!(Some(v), self.offered, "the offer changed");
                    }
                    (FrontendReq::GetProtocolFeatures, Reply::U64(v)) => {
                        self.protocol_offered = Some(v);
                    }
                    (_, Reply::VringState { index, num }) => {
                        assert_eq!(index, a.ring, "a base of another ring accepted");
                        self.stops.push_back((index as u16, num));
                        // The next start resumes from here.
                        self.next_base[index as usize] = num;
                    }
                    (_, Reply::Config(c)) => {
                        assert_eq!((c.offset, c.data.len() as u32), a.config);
                        self.configs.push_back((c.offset, c.data.to_vec()));
                    }
                    (_, Reply::Inflight(_)) => {
                        assert_eq!(a.code, FrontendReq::GetInflightFd);
                    }
                    (c, Reply::U64(v)) => {
                        if a.need_reply && !c.has_reply() {
                            assert_eq!(v, 0, "a failed ack accepted");
                        }
                    }
                    (FrontendReq::SetLogBase, Reply::LogBaseDone) => {}
                    (c, r) => {
                        assert!(
                            matches!(r, Reply::ConfigFailed) && c == FrontendReq::GetConfig,
                            "{r:?} accepted for {c:?}"
                        );
                    }
                }
            }
            Err(e @ FrontendError::StateRefused { request, .. }) => {
                // A refused device state transfer ends its flow and leaves
                // the session as it was.
                self.asked = None;
                assert!(!e.is_fatal());
                assert_eq!(request, a.code);
                assert!(matches!(
                    request,
                    FrontendReq::SetDeviceStateFd | FrontendReq::CheckDeviceState
                ));
                assert_eq!(self.fe.state(), phase, "a refused transfer moved the engine");
                assert!(!self.failed() && self.fe.is_idle() && !self.fe.awaits_reply());
            }
            Err(e) => {
                self.asked = None;
                assert!(e.is_fatal(), "a refused reply is not fatal: {e:?}");
                self.check_failed();
            }
        }
    }

    /// A reply of the kind the request expects, with fuzzed values.
    fn sane<'d>(&mut self, a: Asked, i: &mut In<'_>, data: &'d mut [u8]) -> (Reply<'d>, usize) {
        use FrontendReq as C;
        let ack = |i: &mut In<'_>| {
            Reply::U64(if i.u8().is_multiple_of(16) {
                i.u64()
            } else {
                0
            })
        };
        let r = match a.code {
            C::GetFeatures => Reply::U64(match i.u8() % 8 {
                0 => i.u64(),
                _ => self.offer,
            }),
            C::GetProtocolFeatures => Reply::U64(match i.u8() % 8 {
                0 => i.u64(),
                _ => self.protocol_offer,
            }),
            C::GetQueueNum => Reply::U64(match i.u8() % 8 {
                0 => i.u64(),
                v => u64::from(v),
            }),
            C::GetMaxMemSlots => Reply::U64(match i.u8() % 4 {
                0 => i.u64(),
                v => 8 << v,
            }),
            C::GetVringBase | C::GetVringBaseSkipDrain => {
                let q = a.ring as usize;
                let size = self
                    .fe
                    .config()
                    .queues
                    .get(q)
                    .map_or(1, |c| u32::from(c.size));
                let num = match i.u8() % 4 {
                    0 => i.u32(),
                    1 => u32::from(i.u16()),
                    _ => {
                        let av = i.u32() % size;
                        let us = i.u32() % size;
                        av | us << 16
                            | u32::from(i.u8() & 0x80) << 8
                            | u32::from(i.u8() & 0x80) << 24
                    }
                };
                let index = if i.u8() == 0xff { i.u32() % 4 } else { a.ring };
                Reply::VringState { index, num }
            }
            C::GetConfig => {
                let (offset, len) = a.config;
                if i.u8().is_multiple_of(8) {
                    Reply::ConfigFailed
                } else {
                    let len = (len as usize).min(data.len());
                    for b in data[..len].iter_mut() {
                        *b = i.u8();
                    }
                    Reply::Config(ConfigMsg {
                        offset,
                        kind: ConfigWriteKind::Frontend,
                        data: &data[..len],
                    })
                }
            }
            C::GetInflightFd => {
                let m = InflightMsg {
                    mmap_size: match i.u8() % 4 {
                        0 => 0,
                        1 => i.u64() >> 1,
                        _ => u64::from(i.u16()) + 1,
                    },
                    mmap_offset: if i.u8() == 0xff { i.u32().into() } else { 0 },
                    num_queues: i.u16(),
                    queue_size: i.u16(),
                };
                let nfds = usize::from(m.mmap_size != 0);
                return (Reply::Inflight(m), nfds);
            }
            C::SetLogBase => Reply::LogBaseDone,
            _ if a.need_reply => ack(i),
            // A reply to a message that awaits none is never asked for.
            c => unreachable!("{c:?} awaits a reply"),
        };
        (r, 0)
    }

    fn command(&mut self, i: &mut In<'_>) {
        let before = (self.fe.state(), self.fe.is_idle(), self.fe.awaits_reply());
        let (r, range) = match i.u8() % 8 {
            0 | 1 => (self.fe.start(), false),
            2 => (self.fe.stop(), false),
            3 => (self.fe.stop_suspending(), false),
            4 => {
                let offset = u32::from(i.u8());
                let len = match i.u8() {
                    0xff => i.u32(),
                    v => u32::from(v % 64),
                };
                let r = self.fe.read_config(offset, len);
                let bad_range =
                    offset.checked_add(len).is_none_or(|e| e > MAX_CONFIG_SIZE) || len == 0;
                (r, bad_range)
            }
            5 => {
                let list = regions(i);
                (self.fe.set_memory(&list), false)
            }
            6 => {
                let needed = log_size(self.fe.regions());
                let size = match i.u8() % 4 {
                    0 => i.u64(),
                    1 => needed.saturating_sub(1),
                    _ => needed,
                };
                (self.fe.start_logging(size), false)
            }
            _ => (self.fe.stop_logging(), false),
        };
        match r {
            Ok(()) => {
                assert_ne!(before.0, State::Failed);
                assert!(!range, "a config range past the space was accepted");
            }
            Err(FrontendError::Failed) => self.check_failed(),
            Err(e) => {
                let now = (self.fe.state(), self.fe.is_idle(), self.fe.awaits_reply());
                assert_eq!(before, now, "a refused command changed the engine: {e:?}");
                assert!(!e.is_fatal(), "a refused command is fatal: {e:?}");
            }
        }
    }

    /// Sends and answers until the engine has nothing more to say.
    fn run(&mut self, i: &mut In<'_>) {
        for _ in 0..64 {
            if self.failed() || i.is_empty() {
                return;
            }
            if self.fe.awaits_reply() {
                self.reply(i);
            } else {
                let idle = self.fe.is_idle();
                self.transmit(i);
                self.drain();
                if idle && !self.fe.awaits_reply() {
                    return;
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut i = In(data);
    let Some(mut h) = Harness::new(&mut i) else {
        return;
    };
    for _ in 0..OPS {
        if i.is_empty() {
            break;
        }
        match i.u8() % 8 {
            0 | 1 => h.transmit(&mut i),
            2 => h.reply(&mut i),
            3 => h.command(&mut i),
            4 => {
                // The back-end's offer changes (a new GET_FEATURES answer).
                h.offer ^= 1 << (i.u8() % 64);
            }
            _ => h.run(&mut i),
        }
        if i.u8() % 8 != 0 {
            h.drain();
        }
        if h.failed() {
            h.check_failed();
        }
    }
    h.drain();
    assert!(h.stops.is_empty() && h.configs.is_empty(), "events lost");
});

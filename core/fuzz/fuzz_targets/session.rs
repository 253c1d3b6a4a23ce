//! The back-end session and its data planes, driven like an adapter drives
//! them, by a hostile front-end and a hostile guest at once.
//!
//! The fuzz bytes are a program of operations (see [`World::step`]):
//! messages (raw bytes, a real request code with a fuzzed payload, or a
//! well-formed request built from a few choices so deep states come
//! quickly), guest writes (raw bytes, ring indices, descriptor chains
//! posted on split and packed rings, indirect tables), serving a ring (pop,
//! complete out of order, hold, publish), and killing or disconnecting the
//! back-end and starting a new session that replays a start sequence and
//! resubmits from the inflight area.
//!
//! The harness carries out the session's actions as `adapter-linux` does,
//! against one `TestMemory` holding the whole guest RAM (mapping a region is
//! a no-op: every region the table may name is backed, or accesses fail)
//! and inflight areas held in `TestMemory`s that outlive sessions.
//!
//! Invariants (a panic is a bug): nothing panics; a reply fits the buffer
//! and parses as a reply to its request; actions only name fds the message
//! carried, each once; a ring starts only when it is not running and every
//! running ring has a data plane; the harness completes each token once and
//! `outstanding()` equals tokens handed out minus completions accepted; a
//! drain makes progress and ends with nothing outstanding; a stopped data
//! plane refuses stale tokens; the finish_stop reply parses as the
//! VringState of the request.
#![no_main]

use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use vhost_user_core::backend::{
    Action, BackendConfig, Reply as BeReply, Session, SUPPORTED_PROTOCOL_FEATURES,
};
use vhost_user_core::dataplane::{DataPlane, DataPlaneError, Stop, Token};
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::inflight;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{
    ConfigMsg, ConfigWriteKind, FrontendReq, Header, InflightMsg, MemRegionMsg, MemTable,
    Reply as WireReply, Request, VringAddrMsg, VringFdMsg, VringStateMsg, HEADER_SIZE,
    MAX_CONFIG_SIZE, MAX_MESSAGE,
};
use vhost_user_core::vring::Chain;
use vhost_user_test::{region, TestMemory, USER_ADDR_OFFSET};

/// Guest memory and inflight areas.
type Mem = TestMemory<2>;

#[path = "common/input.rs"]
mod input;
use input::In;

/// Guest RAM: `[0, RAM)`.
const RAM: u64 = 0x10000;
/// Rings of the device (the session may hold more).
const NQ: usize = 2;
const MAX_QUEUE_SIZE: u16 = 256;
/// Ring `q`'s layout in guest RAM: `q * RING_SPAN` + the offsets below,
/// room for 256 entries of either layout.
const RING_SPAN: u64 = 0x2000;
const DRIVER_OFF: u64 = 0x1000;
const DEVICE_OFF: u64 = 0x1400;
/// Buffers live in `[DATA, RAM)`.
const DATA: u64 = 0x4000;
/// Largest inflight area the harness creates or maps (a bigger one is an
/// adapter failure: the connection ends).
const AREA_CAP: u64 = 1 << 20;
const OPS: usize = 200;

/// A device with a 64-byte config space whose second half is writable; it
/// fills writable segments with a pattern (or writes nothing).
struct Dev {
    config: [u8; 64],
    consume_disabled: bool,
    write: bool,
}

impl Device for Dev {
    type Scratch = ();
    fn read_config(&self, offset: u32, dst: &mut [u8]) -> bool {
        match self
            .config
            .get(offset as usize..offset as usize + dst.len())
        {
            Some(s) => {
                dst.copy_from_slice(s);
                true
            }
            None => false,
        }
    }
    fn write_config(&mut self, offset: u32, src: &[u8], kind: ConfigWriteKind) -> bool {
        if offset < 32 && kind == ConfigWriteKind::Frontend {
            return false;
        }
        match self
            .config
            .get_mut(offset as usize..offset as usize + src.len())
        {
            Some(d) => {
                d.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
    fn reset(&mut self) {
        self.config[32..].fill(0);
    }
    fn consume_while_disabled(&self) -> bool {
        self.consume_disabled
    }
    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _: u16,
        chain: &Chain<S>,
        token: Token,
        mem: &M,
        _: &mut (),
    ) -> Completion {
        if !token.side_effects() || !self.write {
            return Completion::Done(0);
        }
        let mut n = 0u32;
        for s in chain.writable() {
            let len = s.len.min(64) as usize;
            // Guest RAM never changes shape: a validated segment stays
            // writable.
            mem.write(s.addr, &[0xa5; 64][..len])
                .expect("a validated segment is writable");
            n += len as u32;
        }
        Completion::Done(n)
    }
}

/// A token the harness holds, with the writable bytes of its chain.
#[derive(Clone, Copy)]
struct Held {
    token: Token,
    writable: u32,
}

/// A running ring as a worker holds it.
struct Ring {
    dp: DataPlane,
    /// The inflight area the ring started with (workers keep theirs).
    area: Option<Rc<Mem>>,
    held: Vec<Held>,
}

/// One connection: the session, the device, the workers.
struct Host {
    session: Session<4, 8>,
    dev: Dev,
    rings: Vec<Option<Ring>>,
    /// The area of the last SET_INFLIGHT_FD, as mapped.
    area: Option<Rc<Mem>>,
    suspend: [bool; NQ],
}

/// What the front-end last set up successfully, for replays.
#[derive(Clone, Default)]
struct FrontView {
    features: Option<u64>,
    protocol: Option<u64>,
    regions: Vec<MemRegionMsg>,
    inflight: Option<InflightMsg>,
    rings: [FrontRing; NQ],
}

#[derive(Clone, Copy, Default)]
struct FrontRing {
    num: Option<u32>,
    addr: Option<VringAddrMsg>,
    base: u32,
    kick_no_fd: bool,
    enabled: bool,
}

/// The guest's position on a packed ring.
#[derive(Clone, Copy)]
struct GuestPacked {
    slot: u16,
    wrap: bool,
    next_id: u16,
}

fn ring_of(f: &mut FrontView, i: u32) -> Option<&mut FrontRing> {
    f.rings.get_mut(i as usize)
}

/// How a message went.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sent {
    /// Accepted (and answered, if it has a reply).
    Accepted,
    /// Refused with a failed REPLY_ACK.
    Refused,
    /// The connection ended (the session or the adapter refused).
    Ended,
    /// Never reached the session (a header the framer refuses).
    Dropped,
}

struct World {
    ram: Mem,
    host: Host,
    cfg: BackendConfig,
    consume_disabled: bool,
    /// The area fd the front-end holds (from GET_INFLIGHT_FD's reply, or
    /// the one it sent with SET_INFLIGHT_FD); survives sessions.
    held_area: Option<Rc<Mem>>,
    front: FrontView,
    guest: [GuestPacked; NQ],
}

fn new_area(size: u64) -> Option<Rc<Mem>> {
    if size == 0 || size > AREA_CAP {
        return None;
    }
    Some(Rc::new(Mem::new(&[(0, size.next_multiple_of(4))]).ok()?))
}

fn area_len(a: &Mem) -> u64 {
    a.table().iter().map(|(_, r)| r.size).sum()
}

/// A ring's default layout, as user addresses.
fn layout(q: usize) -> VringAddrMsg {
    let base = q as u64 * RING_SPAN + USER_ADDR_OFFSET;
    VringAddrMsg {
        index: q as u32,
        log: false,
        desc: base,
        avail: base + DRIVER_OFF,
        used: base + DEVICE_OFF,
        log_addr: 0,
    }
}

/// A guest physical address from a user address of the front-end's
/// convention.
fn gpa(user: u64) -> u64 {
    user.wrapping_sub(USER_ADDR_OFFSET)
}

/// A buffer address: mostly in the data area, sometimes anywhere.
fn buf_addr(i: &mut In<'_>) -> u64 {
    let b = i.u8();
    match b {
        0xff => i.u64(),
        0xfe => u64::from(i.u16()),
        _ => DATA + u64::from(b) * 0xc0,
    }
}

fn buf_len(i: &mut In<'_>) -> u32 {
    match i.u8() {
        0xff => i.u32(),
        0xfe => 0,
        v => u32::from(v) + 1,
    }
}

impl Host {
    fn new(cfg: BackendConfig, consume_disabled: bool) -> Host {
        Host {
            session: Session::new(cfg).expect("the harness's configuration is valid"),
            dev: Dev {
                config: core::array::from_fn(|i| i as u8),
                consume_disabled,
                write: true,
            },
            rings: (0..NQ).map(|_| None).collect(),
            area: None,
            suspend: [false; NQ],
        }
    }
}

/// Pops one request from `ring` and checks what the data plane says about
/// it; returns its token.
fn pop(ring: &mut Ring, ram: &Mem, dev: &Dev, small: bool) -> Option<Held> {
    let area = ring.area.as_deref();
    let before = ring.dp.outstanding();
    let mut big: Chain = Chain::new();
    let mut little: Chain<4> = Chain::new();
    let popped = if small {
        ring.dp.pop(ram, area, &mut little)
    } else {
        ring.dp.pop(ram, area, &mut big)
    };
    let token = match popped {
        Ok(Some(t)) => t,
        Ok(None) | Err(_) => {
            assert_eq!(
                ring.dp.outstanding(),
                before,
                "a refused pop hands out nothing"
            );
            return None;
        }
    };
    assert_eq!(ring.dp.outstanding(), before + 1);
    let segments = if small {
        little.segments()
    } else {
        big.segments()
    };
    for s in segments {
        // Every segment was validated against guest memory.
        ram.check(s.addr, u64::from(s.len))
            .expect("a popped segment is in guest memory");
        assert_ne!(s.len, 0, "zero-length segments are skipped");
    }
    if !token.side_effects() {
        assert!(
            dev.consume_disabled && !ring.dp.enabled(),
            "a request without side effects from a ring that is not consumed while disabled"
        );
    }
    let completion = if small {
        dev.process(0, &little, token, ram, &mut ())
    } else {
        dev.process(0, &big, token, ram, &mut ())
    };
    let Completion::Done(writable) = completion else {
        unreachable!("the harness device completes at once");
    };
    Some(Held { token, writable })
}

/// Completes the held token at `at`; keeps it if the data plane refuses.
fn complete(ring: &mut Ring, ram: &Mem, at: usize, len: u32) {
    let area = ring.area.as_deref();
    let h = ring.held[at];
    let before = ring.dp.outstanding();
    match ring.dp.complete(ram, area, h.token, len) {
        Ok(_) => {
            assert_eq!(ring.dp.outstanding() + 1, before);
            ring.held.swap_remove(at);
        }
        Err(e) => {
            assert_eq!(ring.dp.outstanding(), before);
            assert!(
                !matches!(
                    e,
                    DataPlaneError::NotOutstanding
                        | DataPlaneError::Stopped
                        | DataPlaneError::NoInflightArea
                ),
                "a held token of a running ring refused: {e:?}"
            );
        }
    }
}

/// Stops a ring as a worker does (drain, or suspend), returns its base.
fn stop_ring(mut ring: Ring, ram: &Mem, dev: &Dev, suspend: bool, order: u8) -> u32 {
    let tracked = ring.dp.tracked();
    loop {
        let (stop, _) = ring.dp.stop(ram, ring.area.as_deref(), suspend);
        let base = match stop {
            Stop::Stopped { base } => base,
            Stop::Draining => {
                assert!(
                    !(suspend && tracked),
                    "a suspend with an area stops at once"
                );
                let before = u32::from(ring.dp.outstanding()) + u32::from(ring.dp.resubmits_left());
                assert_ne!(before, 0, "draining with nothing to drain");
                assert!(ring.dp.paused());
                while let Some(h) = pop(&mut ring, ram, dev, false) {
                    ring.held.push(h);
                }
                // Complete everything held, from either end.
                while !ring.held.is_empty() {
                    let at = if order & 1 == 0 {
                        0
                    } else {
                        ring.held.len() - 1
                    };
                    let n = ring.held.len();
                    let len = ring.held[at].writable;
                    complete(&mut ring, ram, at, len);
                    if ring.held.len() == n {
                        break;
                    }
                }
                let _ = ring.dp.publish(ram, ring.area.as_deref());
                let after = u32::from(ring.dp.outstanding()) + u32::from(ring.dp.resubmits_left());
                assert!(
                    after < before || ring.dp.error().is_some(),
                    "a drain makes no progress ({before} left)"
                );
                continue;
            }
        };
        let area = ring.area.as_deref();
        if !(suspend && tracked) && ring.dp.error().is_none() {
            assert_eq!(
                ring.dp.outstanding(),
                0,
                "drained with requests outstanding"
            );
            assert_eq!(ring.dp.resubmits_left(), 0, "drained with resubmits left");
        }
        assert!(ring.dp.is_stopped());
        // A stopped data plane hands out nothing and refuses stale tokens.
        let mut chain: Chain = Chain::new();
        assert!(!matches!(ring.dp.pop(ram, area, &mut chain), Ok(Some(_))));
        if let Some(h) = ring.held.first() {
            assert_eq!(
                ring.dp.complete(ram, area, h.token, 0),
                Err(DataPlaneError::Stopped)
            );
        }
        assert_eq!(ring.dp.stop(ram, area, suspend).0, Stop::Stopped { base });
        return base;
    }
}

impl World {
    fn new(i: &mut In<'_>) -> World {
        let c = i.u8();
        let mut features = V::VERSION_1 | V::from_bits_retain(0b1011);
        for (bit, f) in [
            V::PROTOCOL_FEATURES,
            V::EVENT_IDX,
            V::INDIRECT_DESC,
            V::RING_PACKED,
        ]
        .into_iter()
        .enumerate()
        {
            // Protocol features offered unless bit 0 is set; the rest on
            // their own bits.
            if (c >> bit) & 1 == u8::from(bit != 0) {
                features |= f;
            }
        }
        let protocol = if features.contains(V::PROTOCOL_FEATURES) {
            // Each implemented feature withheld with probability 1/4.
            let mask = P::from_bits_retain(u64::from(i.u32() & i.u32()));
            SUPPORTED_PROTOCOL_FEATURES
                .difference(mask)
                .without_unmet_dependencies()
        } else {
            P::empty()
        };
        let cfg = BackendConfig {
            features,
            protocol_features: protocol,
            num_queues: NQ as u16,
            max_queue_size: MAX_QUEUE_SIZE,
        };
        let consume_disabled = c & 0x20 != 0;
        World {
            ram: Mem::new(&[(0, RAM / 2), (RAM / 2, RAM / 2)]).expect("guest RAM"),
            host: Host::new(cfg, consume_disabled),
            cfg,
            consume_disabled,
            held_area: None,
            front: FrontView::default(),
            guest: [GuestPacked {
                slot: 0,
                wrap: true,
                next_id: 0,
            }; NQ],
        }
    }

    fn check(&self) {
        for (q, r) in self.host.rings.iter().enumerate() {
            let running = self.host.session.ring(q as u16).is_some_and(|s| s.running);
            assert_eq!(
                running,
                r.is_some(),
                "ring {q}: session and workers disagree"
            );
            if let Some(r) = r {
                assert_eq!(
                    usize::from(r.dp.outstanding()),
                    r.held.len(),
                    "ring {q}: outstanding is not handed out minus completed"
                );
            }
        }
    }

    /// The connection ends: workers stop as `adapter-linux` stops them
    /// (suspending when an area is mapped), or the back-end is killed
    /// (nothing stops). A new session comes up either way.
    fn disconnect(&mut self, kill: bool) {
        let keep = self.host.area.is_some();
        let rings = std::mem::take(&mut self.host.rings);
        if !kill {
            for r in rings.into_iter().flatten() {
                stop_ring(r, &self.ram, &self.host.dev, keep, 0);
            }
        }
        self.host = Host::new(self.cfg, self.consume_disabled);
    }

    /// Sends one message; `fd0` is the area behind its first fd, if the
    /// front-end sends one.
    fn send(&mut self, msg: &[u8], nfds: usize, out_len: usize, fd0: Option<Rc<Mem>>) -> Sent {
        let Ok(h) = Header::parse(msg) else {
            return Sent::Dropped;
        };
        // The framer hands the session exactly `size` payload bytes.
        let mut payload = msg[HEADER_SIZE..].to_vec();
        payload.resize(h.size as usize, 0);
        let mut out = vec![0u8; out_len];
        let outcome = match self.host.session.handle(
            &h,
            &payload,
            &nfds,
            &self.ram,
            &mut self.host.dev,
            &mut out,
        ) {
            Ok(o) => o,
            Err(_) => {
                self.disconnect(false);
                return Sent::Ended;
            }
        };
        if outcome.refused.is_some() {
            assert!(outcome.actions.is_empty(), "a refused request acts");
            assert!(
                matches!(outcome.reply, BeReply::Ready(_)),
                "a refusal is acked"
            );
        }
        // Fds: each action takes one the message carried, at most once.
        let mut taken = [false; 8];
        let mut take = |fd: u8| {
            let i = usize::from(fd);
            assert!(i < nfds, "an action names fd {fd} of {nfds}");
            assert!(!taken[i], "fd {fd} taken twice");
            taken[i] = true;
        };
        for a in &outcome.actions {
            match *a {
                Action::MapRegion { fd, .. } | Action::MapInflight { fd, .. } => take(fd),
                Action::SetKick { fd: Some(fd), .. }
                | Action::SetCall { fd: Some(fd), .. }
                | Action::SetErr { fd: Some(fd), .. } => take(fd),
                _ => {}
            }
        }
        let code = FrontendReq::try_from(h.request).ok();
        let mut created = None;
        for a in outcome.actions.iter().cloned() {
            if !self.apply(a, &fd0, &mut created) {
                self.disconnect(false);
                return Sent::Ended;
            }
        }
        match outcome.reply {
            BeReply::None => {}
            BeReply::Ready(n) => {
                assert!(n <= out.len(), "reply of {n} bytes in {}", out.len());
                let code = code.expect("a reply answers a known request");
                let rh = Header::parse(&out[..n]).expect("the reply header parses");
                assert_eq!(rh.size as usize + HEADER_SIZE, n);
                let rfds = usize::from(created.is_some());
                let r = WireReply::parse(
                    code,
                    &rh,
                    &out[HEADER_SIZE..n],
                    rfds,
                    &self.host.session.parse_options(),
                )
                .unwrap_or_else(|e| panic!("the reply to {code:?} does not parse: {e}"));
                if !code.has_reply() {
                    let ok = outcome.refused.is_none();
                    assert!(
                        matches!(r, WireReply::U64(v) if (v == 0) == ok),
                        "ack {r:?} for refused: {:?}",
                        outcome.refused
                    );
                }
                if let WireReply::Inflight(m) = r {
                    assert_eq!(Some(m.mmap_size), created.as_deref().map(area_len));
                }
            }
            BeReply::TransferPending => {
                unreachable!("CHECK_DEVICE_STATE pending without the `migration` feature")
            }
            BeReply::Pending { queue } => {
                let q = usize::from(queue);
                let ring = self.host.rings.get_mut(q).and_then(Option::take);
                let ring = ring.expect("GET_VRING_BASE pending on a ring without a worker");
                let suspend = self.host.suspend[q];
                let base = stop_ring(ring, &self.ram, &self.host.dev, suspend, out_len as u8);
                match self.host.session.finish_stop(queue, base, &mut out) {
                    Ok(n) => {
                        assert!(n <= out.len());
                        let code = code.expect("GET_VRING_BASE");
                        let rh = Header::parse(&out[..n]).expect("the reply header parses");
                        let r = WireReply::parse(
                            code,
                            &rh,
                            &out[HEADER_SIZE..n],
                            0,
                            &self.host.session.parse_options(),
                        )
                        .expect("finish_stop's reply parses");
                        assert_eq!(
                            r,
                            WireReply::VringState {
                                index: queue.into(),
                                num: base
                            }
                        );
                    }
                    Err(e) => {
                        assert!(out.len() < MAX_MESSAGE, "finish_stop refused: {e:?}");
                        self.disconnect(false);
                        return Sent::Ended;
                    }
                }
            }
        }
        // The front-end receives GET_INFLIGHT_FD's fd with the reply.
        if let Some(a) = created {
            self.held_area = Some(a);
        }
        if outcome.refused.is_some() {
            Sent::Refused
        } else {
            Sent::Accepted
        }
    }

    /// Carries out one action; `false` if the adapter fails (the
    /// connection ends).
    fn apply(&mut self, a: Action, fd0: &Option<Rc<Mem>>, created: &mut Option<Rc<Mem>>) -> bool {
        let host = &mut self.host;
        match a {
            Action::UnmapAll
            | Action::MapRegion { .. }
            | Action::UnmapRegion { .. }
            | Action::SetKick { .. }
            | Action::SetCall { .. }
            | Action::SetErr { .. } => {}
            Action::SetBackendChannel { .. } => {
                // The channel exists and encodes within a small buffer.
                let mut ch = host
                    .session
                    .channel()
                    .expect("a channel after SET_BACKEND_REQ_FD");
                let mut b = [0u8; 64];
                let _ = ch.config_change(&mut b);
            }
            Action::Kick { queue } => {
                assert!(
                    host.rings[usize::from(queue)].is_some(),
                    "an in-band kick for ring {queue}, which is not running"
                );
            }
            Action::RemapRings => {
                for (q, r) in host.rings.iter_mut().enumerate() {
                    if let Some(r) = r {
                        let addrs = host
                            .session
                            .ring_addrs(q as u16)
                            .expect("a running ring translates in the new table");
                        let _ = r.dp.set_addrs(addrs);
                    }
                }
            }
            Action::StartRing { queue } => {
                let q = usize::from(queue);
                assert!(host.rings[q].is_none(), "ring {q} started twice");
                let area = host.area.clone();
                let dp = match host.session.start_ring(
                    queue,
                    &self.ram,
                    area.as_deref(),
                    host.dev.consume_while_disabled(),
                ) {
                    Ok(dp) => dp,
                    Err(_) => return false,
                };
                assert_eq!(dp.outstanding(), 0);
                assert_eq!(
                    Some(u32::from(dp.size())),
                    host.session.ring(queue).map(|s| u32::from(s.num))
                );
                let area = if dp.tracked() { area } else { None };
                host.rings[q] = Some(Ring {
                    dp,
                    area,
                    held: Vec::new(),
                });
            }
            Action::StopRing { queue, suspend } => host.suspend[usize::from(queue)] = suspend,
            Action::MapLog { size, offset, .. } => {
                // The session checked what it can: the log covers the
                // memory table, and offset + size does not overflow.
                assert!(
                    vhost_user_core::log::bitmap_bytes(host.session.memory().end()) <= size,
                    "a log of {size} bytes for memory up to {:#x}",
                    host.session.memory().end()
                );
                assert!(offset.checked_add(size).is_some());
            }
            Action::SetLogFd { .. }
            | Action::SetLogging { .. }
            | Action::SetRingLog { .. }
            | Action::TransferState { .. } => {}
            Action::CreateInflight { size } => match new_area(size) {
                Some(a) => *created = Some(a),
                None => return false,
            },
            Action::MapInflight { offset, size, .. } => {
                let same = fd0
                    .as_ref()
                    .filter(|a| offset == 0 && area_len(a) == size.next_multiple_of(4));
                let a = match same {
                    Some(a) => a.clone(),
                    None => match new_area(size) {
                        Some(a) => a,
                        None => return false,
                    },
                };
                self.held_area = Some(a.clone());
                host.area = Some(a);
            }
            Action::UnmapInflight => host.area = None,
            Action::SetEnabled { queue, enabled } => {
                if let Some(r) = &mut host.rings[usize::from(queue)] {
                    r.dp.set_enabled(enabled);
                }
            }
            Action::ResetRings => {
                let rings = std::mem::replace(&mut host.rings, (0..NQ).map(|_| None).collect());
                for r in rings.into_iter().flatten() {
                    stop_ring(r, &self.ram, &host.dev, false, 0);
                }
                host.session.rings_reset();
            }
        }
        true
    }

    /// Encodes and sends a well-formed request; records what it set up.
    fn send_request(
        &mut self,
        req: &Request<'_>,
        need_reply: bool,
        out_len: usize,
        fd0: Option<Rc<Mem>>,
    ) -> Sent {
        let mut buf = vec![0u8; MAX_MESSAGE];
        // A fuzzed region may break what the encoder accepts.
        let Ok(n) = req.encode(need_reply, &mut buf) else {
            return Sent::Dropped;
        };
        let nfds = usize::from(req.fd_rule().min);
        let sent = self.send(&buf[..n], nfds, out_len, fd0);
        if sent == Sent::Accepted {
            self.record(req);
        }
        sent
    }

    fn record(&mut self, req: &Request<'_>) {
        let f = &mut self.front;
        match *req {
            Request::SetFeatures(v) => f.features = Some(v),
            Request::SetProtocolFeatures(v) => f.protocol = Some(v),
            Request::SetMemTable(ref t) => f.regions = t.iter().collect(),
            Request::AddMemReg(r) => f.regions.push(r),
            Request::RemMemReg(r) => f.regions.retain(|x| {
                (x.guest_addr, x.user_addr, x.size) != (r.guest_addr, r.user_addr, r.size)
            }),
            Request::SetInflightFd(m) => f.inflight = Some(m),
            Request::GetInflightFd(m) => {
                f.inflight = inflight::area_size(m.num_queues, m.queue_size)
                    .ok()
                    .map(|size| InflightMsg {
                        mmap_size: size,
                        mmap_offset: 0,
                        ..m
                    })
            }
            Request::SetVringNum(s) => {
                if let Some(r) = ring_of(f, s.index) {
                    r.num = Some(s.num)
                }
            }
            Request::SetVringBase(s) => {
                if let Some(r) = ring_of(f, s.index) {
                    r.base = s.num;
                }
                if let Some(g) = self.guest.get_mut(s.index as usize) {
                    g.slot = (s.num & 0x7fff) as u16;
                    g.wrap = s.num & 0x8000 != 0;
                }
            }
            Request::SetVringAddr(a) => {
                if let Some(r) = ring_of(f, a.index) {
                    r.addr = Some(a)
                }
            }
            Request::SetVringKick(v) => {
                if let Some(r) = ring_of(f, v.index) {
                    r.kick_no_fd = v.no_fd
                }
            }
            Request::SetVringEnable { index, enable } => {
                if let Some(r) = ring_of(f, index) {
                    r.enabled = enable
                }
            }
            Request::ResetDevice => {
                f.features = None;
                f.inflight = None;
                f.rings = Default::default();
            }
            _ => {}
        }
    }

    fn out_len(i: &mut In<'_>) -> usize {
        if i.u8() == 0xff {
            usize::from(i.u8() % 64)
        } else {
            MAX_MESSAGE
        }
    }

    /// A region inside guest RAM (mostly), with the test convention for
    /// user addresses.
    fn fuzz_region(i: &mut In<'_>) -> MemRegionMsg {
        match i.u8() % 8 {
            0 => MemRegionMsg {
                guest_addr: i.u64(),
                size: i.u64(),
                user_addr: i.u64(),
                mmap_offset: i.u64(),
                xen: None,
            },
            1 | 2 => {
                let gpa = u64::from(i.u8() % 16) * 0x1000;
                let size = u64::from(i.u8() % 16 + 1) * 0x1000;
                let mut r = region(gpa, size);
                if i.bool() {
                    r.user_addr = r.user_addr.wrapping_add(u64::from(i.u16()) << 4);
                }
                r
            }
            _ => region(0, RAM),
        }
    }

    fn ring_num(i: &mut In<'_>) -> u32 {
        match i.u8() % 8 {
            0 => u32::from(i.u16()),
            1 => u32::from(i.u8() % 255 + 1),
            v => 1 << (v + 1),
        }
    }

    /// A well-formed request from a few choices.
    fn structured(&mut self, i: &mut In<'_>) {
        let kind = i.u8() % 28;
        let need_reply = i.u8().is_multiple_of(4);
        let out_len = Self::out_len(i);
        let q = u32::from(i.u8() % (NQ as u8 + 1)).min(NQ as u32 - 1);
        let offered = self.cfg.features.bits();
        let poffered = self.cfg.protocol_features.bits();
        let mut regions = Vec::new();
        let mut cfg_data = [0u8; MAX_CONFIG_SIZE as usize];
        let mut fd0 = None;
        let req = match kind {
            0 => Request::GetFeatures,
            1 => Request::SetFeatures(match i.u8() % 8 {
                0 => i.u64(),
                _ => offered & (u64::from(i.u8()) << 28 | 0xf | u64::from(i.u8() & 0x7) << 32),
            }),
            2 => Request::GetProtocolFeatures,
            3 => Request::SetProtocolFeatures(match i.u8() % 8 {
                0 => i.u64(),
                1 => poffered,
                _ => poffered & u64::from(i.u32()),
            }),
            4 => Request::SetOwner,
            5 => {
                let n = i.u8() % 4;
                for _ in 0..n {
                    regions.push(Self::fuzz_region(i));
                }
                match MemTable::new(&regions) {
                    Ok(t) => Request::SetMemTable(t),
                    Err(_) => return,
                }
            }
            6 => Request::AddMemReg(Self::fuzz_region(i)),
            7 => Request::RemMemReg(match self.front.regions.first() {
                Some(r) if i.bool() => *r,
                _ => Self::fuzz_region(i),
            }),
            8 => Request::GetMaxMemSlots,
            9 | 10 => Request::SetVringNum(VringStateMsg {
                index: q,
                num: Self::ring_num(i),
            }),
            11 => Request::SetVringBase(VringStateMsg {
                index: q,
                num: match i.u8() % 4 {
                    0 => i.u32(),
                    1 => 0x8000_8000,
                    2 => u32::from(i.u16()),
                    _ => {
                        let n = self.front.rings[q as usize].num.unwrap_or(1).max(1);
                        let a = i.u32() % n;
                        let u = i.u32() % n;
                        a | u << 16 | u32::from(i.u8() & 0x80) << 8 | u32::from(i.u8() & 0x80) << 24
                    }
                },
            }),
            12 | 13 => {
                let mut a = layout(q as usize);
                if i.u8().is_multiple_of(4) {
                    a.desc = a.desc.wrapping_add(u64::from(i.u16()));
                    a.avail = a.avail.wrapping_add(u64::from(i.u16()));
                    a.used = a.used.wrapping_add(u64::from(i.u16()));
                }
                a.log = i.u8() == 0xff;
                Request::SetVringAddr(a)
            }
            14 | 15 => Request::SetVringKick(VringFdMsg {
                index: q,
                no_fd: i.bool(),
            }),
            16 => Request::SetVringCall(VringFdMsg {
                index: q,
                no_fd: i.bool(),
            }),
            17 => Request::SetVringErr(VringFdMsg {
                index: q,
                no_fd: i.bool(),
            }),
            18 => Request::SetVringEnable {
                index: q,
                enable: !i.u8().is_multiple_of(4),
            },
            19 => Request::GetVringBase(q),
            20 => Request::GetVringBaseSkipDrain(q),
            21 => {
                let nq = match i.u8() % 4 {
                    0 => i.u16(),
                    v => u16::from(v),
                };
                let qs = match i.u8() % 4 {
                    0 => i.u16(),
                    _ => self.front.rings[0].num.unwrap_or(256) as u16,
                };
                if nq == 0 || qs == 0 {
                    return;
                }
                Request::GetInflightFd(InflightMsg {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: nq,
                    queue_size: qs,
                })
            }
            22 => {
                let held = self.front.inflight.filter(|_| !i.u8().is_multiple_of(4));
                let m = match held {
                    Some(m) => {
                        fd0 = self.held_area.clone();
                        m
                    }
                    None => {
                        let nq = u16::from(i.u8() % 3).max(1);
                        let qs = match i.u8() % 4 {
                            0 => i.u16().max(1),
                            _ => self.front.rings[0].num.unwrap_or(256).clamp(1, 0x8000) as u16,
                        };
                        let size = match i.u8() % 4 {
                            0 => i.u64() % (2 * AREA_CAP),
                            _ => inflight::area_size(nq, qs).unwrap_or(64),
                        };
                        InflightMsg {
                            mmap_size: size,
                            mmap_offset: if i.u8() == 0xff {
                                u64::from(i.u16())
                            } else {
                                0
                            },
                            num_queues: nq,
                            queue_size: qs,
                        }
                    }
                };
                Request::SetInflightFd(m)
            }
            23 => Request::ResetDevice,
            24 | 25 => {
                let off = u32::from(i.u8()) % MAX_CONFIG_SIZE;
                let len = (u32::from(i.u8()) % 72 + 1).min(MAX_CONFIG_SIZE - off);
                let data = &mut cfg_data[..len as usize];
                let set = kind == 25;
                if set {
                    for b in data.iter_mut() {
                        *b = i.u8();
                    }
                }
                let c = ConfigMsg {
                    offset: off,
                    kind: if i.u8().is_multiple_of(4) {
                        ConfigWriteKind::Migration
                    } else {
                        ConfigWriteKind::Frontend
                    },
                    data,
                };
                if set {
                    Request::SetConfig(c)
                } else {
                    Request::GetConfig(c)
                }
            }
            26 => Request::SetStatus(i.u8()),
            _ => match i.u8() % 4 {
                0 => Request::GetStatus,
                1 => Request::GetQueueNum,
                2 => Request::ResetOwner,
                _ => Request::VringKick(q),
            },
        };
        self.send_request(&req, need_reply, out_len, fd0);
    }

    /// A real request code with a fuzzed payload and fd count, or raw
    /// bytes.
    fn raw(&mut self, i: &mut In<'_>) {
        let out_len = Self::out_len(i);
        let nfds = usize::from(i.u8() % 4);
        if i.bool() {
            let len = usize::from(i.u16() % 300);
            let msg = i.bytes(len).to_vec();
            self.send(&msg, nfds, out_len, None);
            return;
        }
        let codes = FrontendReq::ALL;
        let code = codes[usize::from(i.u8()) % codes.len()];
        let len = match i.u8() % 4 {
            0 => usize::from(i.u8()),
            1 => 8,
            2 => 40,
            _ => 24,
        };
        let mut msg = vec![0u8; HEADER_SIZE];
        let flags = 1u32 | if i.bool() { 8 } else { 0 };
        msg[0..4].copy_from_slice(&code.id().to_le_bytes());
        msg[4..8].copy_from_slice(&flags.to_le_bytes());
        msg[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        msg.extend_from_slice(i.bytes(len));
        self.send(&msg, nfds, out_len, None);
    }

    /// Where the guest finds ring `q` (as the front-end set it up).
    fn ring_view(&self, q: usize) -> (u16, VringAddrMsg) {
        let r = &self.front.rings[q];
        let num = r.num.unwrap_or(u32::from(MAX_QUEUE_SIZE)).clamp(1, 0x8000) as u16;
        (num, r.addr.unwrap_or(layout(q)))
    }

    fn packed(&self) -> bool {
        self.front
            .features
            .is_some_and(|f| f & V::RING_PACKED.bits() != 0)
    }

    /// The guest writes raw bytes, a ring index, a chain, or a table.
    fn guest(&mut self, i: &mut In<'_>) {
        let q = usize::from(i.u8()) % NQ;
        let (num, addr) = self.ring_view(q);
        let (avail, used) = (gpa(addr.avail), gpa(addr.used));
        let ram = &self.ram;
        match i.u8() % 8 {
            0 => {
                let at = u64::from(i.u16()) % RAM;
                let len = usize::from(i.u8() % 33);
                let _ = ram.write(at, i.bytes(len));
            }
            1 => {
                // A ring field: avail flags/idx/used_event, used
                // flags/idx/avail_event (split), or the event areas.
                let at = match i.u8() % 6 {
                    0 => avail,
                    1 => avail + 2,
                    2 => avail + 4 + 2 * u64::from(num),
                    3 => used,
                    4 => used + 2,
                    _ => used + 4 + 8 * u64::from(num),
                };
                let v = match i.u8() % 4 {
                    0 => i.u16(),
                    d => ram
                        .read_u16(at)
                        .unwrap_or(0)
                        .wrapping_add(u16::from(d))
                        .wrapping_sub(2),
                };
                let _ = ram.store_u16_release(at, v);
            }
            2..=4 => {
                // A chain of up to 4 descriptors (split: from a chosen
                // head; packed: at the guest's position).
                let k = i.u8() % 4 + 1;
                let head = i.u16();
                let id = i.u8().is_multiple_of(4).then(|| i.u16());
                let descs: Vec<(u64, u32, u16)> = (0..k)
                    .map(|_| {
                        let f = i.u8();
                        let mut flags = u16::from(f & 0x2); // WRITE
                        if f & 0xf0 == 0xf0 {
                            flags |= 4; // INDIRECT
                        }
                        if f & 0x0c == 0x0c {
                            flags |= 1 << 7; // a wrong AVAIL bit (packed)
                        }
                        (buf_addr(i), buf_len(i), flags)
                    })
                    .collect();
                let force = i.u8() == 0xff;
                self.post(q, head, id, &descs, force);
            }
            5 | 6 => {
                // An indirect table in the data area, split or packed
                // layout (same 16-byte entries, fields differ).
                let at = buf_addr(i);
                let k = u64::from(i.u8() % 5 + 1);
                let packed = self.packed();
                for j in 0..k {
                    let mut b = [0u8; 16];
                    b[..8].copy_from_slice(&buf_addr(i).to_le_bytes());
                    b[8..12].copy_from_slice(&buf_len(i).to_le_bytes());
                    let f = u16::from(i.u8() & 0x7);
                    if packed {
                        b[12..14].copy_from_slice(&0u16.to_le_bytes());
                        b[14..].copy_from_slice(&(f & 0x6).to_le_bytes());
                    } else {
                        let flags = f & 0x6 | u16::from(j + 1 < k);
                        b[12..14].copy_from_slice(&flags.to_le_bytes());
                        b[14..].copy_from_slice(&((j + 1) as u16).to_le_bytes());
                    }
                    let _ = ram.write(at.wrapping_add(16 * j), &b);
                }
            }
            _ => {
                // The inflight area, as a hostile front-end may write it.
                if let Some(a) = &self.held_area {
                    let at = u64::from(i.u16()) % area_len(a).max(1);
                    let len = usize::from(i.u8() % 17);
                    let _ = a.write(at, i.bytes(len));
                }
            }
        }
    }

    /// The guest posts a chain on ring `q`: split, its descriptors from
    /// `head` on and its avail entry (unless the ring is full and not
    /// `force`d); packed, at the guest's position under `id` (or the next
    /// one), the head's flags written last. Flags bit 7 flips the AVAIL bit
    /// of a packed descriptor.
    fn post(
        &mut self,
        q: usize,
        head: u16,
        id: Option<u16>,
        descs: &[(u64, u32, u16)],
        force: bool,
    ) {
        let (num, addr) = self.ring_view(q);
        let (desc, avail, used) = (gpa(addr.desc), gpa(addr.avail), gpa(addr.used));
        let ram = &self.ram;
        let k = descs.len();
        if !self.packed() {
            let head = head % num;
            for (j, &(a, len, f)) in descs.iter().enumerate() {
                let d = (u32::from(head) + j as u32) % u32::from(num);
                let next = (d + 1) % u32::from(num);
                let flags = f & 0x6 | u16::from(j + 1 < k);
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&a.to_le_bytes());
                b[8..12].copy_from_slice(&len.to_le_bytes());
                b[12..14].copy_from_slice(&flags.to_le_bytes());
                b[14..].copy_from_slice(&(next as u16).to_le_bytes());
                let _ = ram.write(desc + 16 * u64::from(d), &b);
            }
            let idx = ram.read_u16(avail + 2).unwrap_or(0);
            let uidx = ram.read_u16(used + 2).unwrap_or(0);
            if idx.wrapping_sub(uidx) < num || force {
                let _ = ram.write(avail + 4 + 2 * u64::from(idx % num), &head.to_le_bytes());
                let _ = ram.store_u16_release(avail + 2, idx.wrapping_add(1));
            }
            return;
        }
        let g = &mut self.guest[q];
        let id = id.unwrap_or_else(|| {
            g.next_id = g.next_id.wrapping_add(1) % num;
            g.next_id
        });
        let mut head_flags = None;
        for (j, &(a, len, f)) in descs.iter().enumerate() {
            let slot = g.slot % num;
            let mut flags = f & 0x6 | u16::from(j + 1 < k);
            flags |= if g.wrap { 1 << 7 } else { 1 << 15 };
            flags ^= f & (1 << 7);
            let at = desc + 16 * u64::from(slot);
            let mut b = [0u8; 14];
            b[..8].copy_from_slice(&a.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&id.to_le_bytes());
            let _ = ram.write(at, &b);
            if j == 0 {
                head_flags = Some((at + 14, flags));
            } else {
                let _ = ram.store_u16_release(at + 14, flags);
            }
            g.slot = slot + 1;
            if g.slot == num {
                g.slot = 0;
                g.wrap = !g.wrap;
            }
        }
        if let Some((at, flags)) = head_flags {
            let _ = ram.store_u16_release(at, flags);
        }
    }

    /// Traffic: the guest posts a few well-formed requests (a readable
    /// header, a writable buffer) on a ring, then a worker round runs.
    fn traffic(&mut self, i: &mut In<'_>) {
        let q = usize::from(i.u8()) % NQ;
        let m = i.u8() % 8 + 1;
        for _ in 0..m {
            let (num, addr) = self.ring_view(q);
            let idx = self.ram.read_u16(gpa(addr.avail) + 2).unwrap_or(0);
            let head = idx.wrapping_mul(2) % num;
            let at = DATA + u64::from(i.u8()) * 0xc0;
            let descs = [(at, 16, 0), (at + 16, 64, 2)];
            self.post(q, head, None, &descs, false);
        }
        self.serve_ring(q, i);
    }

    /// A worker round: pop some, complete some now, hold the rest,
    /// complete held ones in a chosen order, publish.
    fn serve(&mut self, i: &mut In<'_>) {
        let q = usize::from(i.u8()) % NQ;
        self.serve_ring(q, i);
    }

    fn serve_ring(&mut self, q: usize, i: &mut In<'_>) {
        let Some(ring) = self.host.rings[q].as_mut() else {
            return;
        };
        let ram = &self.ram;
        let dev = &self.host.dev;
        let n = i.u8() % 16;
        let small = i.u8() == 0xff;
        for _ in 0..n {
            let Some(h) = pop(ring, ram, dev, small) else {
                break;
            };
            ring.held.push(h);
            if i.bool() {
                let at = ring.held.len() - 1;
                complete(ring, ram, at, h.writable);
            }
        }
        let k = i.u8() % 8;
        for _ in 0..k {
            if ring.held.is_empty() {
                break;
            }
            let at = usize::from(i.u8()) % ring.held.len();
            let len = match i.u8() % 8 {
                0 => i.u32(),
                _ => ring.held[at].writable,
            };
            complete(ring, ram, at, len);
        }
        let area = ring.area.as_deref();
        match i.u8() % 4 {
            0 => {}
            1 => {
                let _ = ring.dp.enable_notification(ram);
            }
            2 => {
                let _ = ring.dp.disable_notification(ram);
            }
            _ => {
                let _ = ring.dp.publish(ram, area);
            }
        }
    }

    /// A new session after a kill or a disconnect, set up again from what
    /// the front-end knows, so the rings resubmit from the area.
    fn restart(&mut self, i: &mut In<'_>) {
        self.disconnect(i.bool());
        self.replay(i, false);
    }

    /// A fresh front-end set-up from a few choices, sent in QEMU's order
    /// (with GET_INFLIGHT_FD for a new area if asked): a short way to
    /// running rings.
    fn bring_up(&mut self, i: &mut In<'_>) {
        let c = i.u8();
        let offered = self.cfg.features.bits();
        let mut f = FrontView {
            features: Some(match c & 3 {
                0 => offered & !(u64::from(i.u8() & 0xf) << 28),
                _ => offered & !V::RING_PACKED.bits(),
            }),
            ..FrontView::default()
        };
        if c & 4 != 0 {
            f.features = f.features.map(|v| v | (offered & V::RING_PACKED.bits()));
        }
        f.protocol = Some(match i.u8() % 4 {
            0 => self.cfg.protocol_features.bits() & u64::from(i.u32()),
            _ => self.cfg.protocol_features.bits(),
        });
        f.regions = match c >> 3 & 3 {
            0 => vec![region(0, RAM / 2), region(RAM / 2, RAM / 2)],
            _ => vec![region(0, RAM)],
        };
        let num = match i.u8() % 8 {
            0 => u32::from(i.u8()) + 1,
            v => 1 << (v + 1),
        };
        let packed = f.features.is_some_and(|v| v & V::RING_PACKED.bits() != 0);
        for (q, r) in f.rings.iter_mut().enumerate() {
            *r = FrontRing {
                num: Some(num),
                addr: Some(layout(q)),
                base: if packed { 0x8000_8000 } else { 0 },
                kick_no_fd: i.bool(),
                enabled: !i.u8().is_multiple_of(8),
            };
            self.guest[q] = GuestPacked {
                slot: 0,
                wrap: true,
                next_id: 0,
            };
        }
        // Zeroed rings: the guest starts over.
        for q in 0..NQ {
            let at = q as u64 * RING_SPAN;
            let _ = self.ram.write(at, &[0u8; RING_SPAN as usize]);
        }
        let get_inflight = c & 0x40 != 0;
        if get_inflight || c & 0x80 != 0 {
            f.inflight = None;
        } else {
            f.inflight = self.front.inflight;
        }
        self.front = f;
        self.replay(i, get_inflight);
    }

    /// Sends the set-up the front-end knows (the new session after a
    /// restart; rings resubmit from the area).
    fn replay(&mut self, i: &mut In<'_>, get_inflight: bool) {
        let f = self.front.clone();
        let ok = |w: &mut World, req: Request<'_>, fd0: Option<Rc<Mem>>| {
            w.send_request(&req, false, MAX_MESSAGE, fd0) != Sent::Ended
        };
        if !ok(self, Request::SetOwner, None) {
            return;
        }
        if let Some(v) = f.features {
            if !ok(self, Request::SetFeatures(v), None) {
                return;
            }
        }
        if let Some(v) = f.protocol {
            if !ok(self, Request::SetProtocolFeatures(v), None) {
                return;
            }
        }
        let regions: Vec<MemRegionMsg> = if f.regions.is_empty() {
            vec![region(0, RAM)]
        } else {
            f.regions.iter().take(8).copied().collect()
        };
        let Ok(t) = MemTable::new(&regions) else {
            return;
        };
        if !ok(self, Request::SetMemTable(t), None) {
            return;
        }
        if get_inflight {
            let num = f.rings[0].num.unwrap_or(1).clamp(1, 0x8000) as u16;
            let req = Request::GetInflightFd(InflightMsg {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: NQ as u16,
                queue_size: num,
            });
            if !ok(self, req, None) {
                return;
            }
        }
        if let Some(m) = self.front.inflight {
            let a = self.held_area.clone();
            if !ok(self, Request::SetInflightFd(m), a) {
                return;
            }
        }
        for (q, r) in f.rings.iter().enumerate() {
            let (Some(num), Some(addr)) = (r.num, r.addr) else {
                continue;
            };
            let base = match i.u8() % 4 {
                // What QEMU does after a back-end crash: resume from the
                // used index.
                0 | 1 if !self.packed() => {
                    u32::from(self.ram.read_u16(gpa(addr.used) + 2).unwrap_or(0))
                }
                2 => i.u32(),
                _ => r.base,
            };
            let index = q as u32;
            for req in [
                Request::SetVringNum(VringStateMsg { index, num }),
                Request::SetVringBase(VringStateMsg { index, num: base }),
                Request::SetVringAddr(addr),
                Request::SetVringCall(VringFdMsg { index, no_fd: true }),
                Request::SetVringKick(VringFdMsg {
                    index,
                    no_fd: r.kick_no_fd,
                }),
                Request::SetVringEnable {
                    index,
                    enable: r.enabled,
                },
            ] {
                if !ok(self, req, None) {
                    return;
                }
            }
        }
    }

    fn step(&mut self, i: &mut In<'_>) {
        match i.u8() % 16 {
            0..=3 => self.structured(i),
            4 => self.bring_up(i),
            5 => self.raw(i),
            6..=8 => self.guest(i),
            9 => self.traffic(i),
            10..=13 => self.serve(i),
            14 => self.restart(i),
            _ => {
                let kill = i.bool();
                self.disconnect(kill);
            }
        }
        self.check();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut i = In(data);
    let mut w = World::new(&mut i);
    for _ in 0..OPS {
        if i.is_empty() {
            break;
        }
        w.step(&mut i);
    }
    w.check();
});

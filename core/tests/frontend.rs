//! The front-end engine driven against the back-end engine in memory (the
//! quinn-proto `Pair`): every message is encoded by one side and parsed by
//! the other, fds travel as counts and are checked by index, the guest is
//! `adapter-test`'s memory and drivers, and a hand-rolled worker loop serves
//! the rings the back-end starts.

#![allow(clippy::unwrap_used)]

use vhost_user_core::backend::{
    Action, BackendConfig, Reply as BeReply, Session, SUPPORTED_PROTOCOL_FEATURES,
};
use vhost_user_core::dataplane::{DataPlane, Stop, Token};
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{
    Event, FdRef, Frontend, FrontendConfig, FrontendError, NotifyMode, QueueConfig, State,
    MAX_TRANSMIT,
};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{
    ConfigWriteKind, FrontendReq as C, Header, MemRegionMsg, ParseOptions, Reply as WireReply,
    Request, WireError, HEADER_SIZE, MAX_MESSAGE,
};
use vhost_user_core::vring::state::Processing;
use vhost_user_core::vring::{Chain, RingAddrs};
use vhost_user_test::{region, Buf, PackedDriver, SplitDriver, TestMemory, USER_ADDR_OFFSET};

/// A 16-byte config space: 0, 1, 2, …
struct Dev {
    config: [u8; 16],
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
    fn write_config(&mut self, _: u32, _: &[u8], _: ConfigWriteKind) -> bool {
        false
    }
    // The pair serves rings itself (`Pair::serve`).
    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _: u16,
        _: &Chain<S>,
        _: Token,
        _: &M,
        _: &mut (),
    ) -> Completion {
        Completion::Done(0)
    }
}

const MIB: u64 = 1 << 20;

fn backend_config(protocol: P) -> BackendConfig {
    BackendConfig {
        features: V::VERSION_1
            | V::PROTOCOL_FEATURES
            | V::EVENT_IDX
            | V::INDIRECT_DESC
            | V::RING_PACKED
            | V::from_bits_retain(1 << 9),
        protocol_features: protocol,
        num_queues: 4,
        max_queue_size: 256,
    }
}

/// One message the front-end sent, as the back-end parsed it.
#[derive(Debug)]
struct Sent {
    code: C,
    need_reply: bool,
    bytes: Vec<u8>,
    fds: Vec<FdRef>,
}

impl Sent {
    fn request(&self) -> Request<'_> {
        let h = Header::parse(&self.bytes).unwrap();
        Request::parse(
            &h,
            &self.bytes[HEADER_SIZE..],
            self.fds.len(),
            &ParseOptions::default(),
        )
        .unwrap()
    }
}

/// A request a worker holds: its token and writable buffers.
type Taken = (Token, Vec<(u64, u32)>);

struct Pair {
    fe: Frontend<4, 8>,
    be: Session<4, 8>,
    mem: TestMemory,
    dev: Dev,
    /// The rings the back-end's worker runs (from `Action::StartRing`).
    workers: Vec<Option<DataPlane>>,
    /// The inflight area the back-end created (shared with the front-end
    /// through its fd, so the same bytes come back with SET_INFLIGHT_FD).
    area: Option<TestMemory>,
    /// Per ring: requests taken and not completed, with their writable
    /// buffers.
    taken: Vec<Vec<Taken>>,
    /// Per ring: the pending stop suspends (`Action::StopRing`).
    suspend: [bool; 4],
    sent: Vec<Sent>,
    events: Vec<Event>,
    /// A GET_VRING_BASE the back-end answered with `Reply::Pending`.
    pending: Option<u16>,
    /// Stop delivering at the first request with this code: its reply is
    /// kept in `held` instead of being handed to the front-end.
    hold_at: Option<C>,
    held: Option<Vec<u8>>,
}

impl Pair {
    fn new(be_protocol: P, cfg: FrontendConfig<4, 8>, ram: &[(u64, u64)]) -> Pair {
        Pair::with_backend(backend_config(be_protocol), cfg, ram)
    }

    fn with_backend(bc: BackendConfig, cfg: FrontendConfig<4, 8>, ram: &[(u64, u64)]) -> Pair {
        Pair {
            fe: Frontend::new(cfg).unwrap(),
            be: Session::new(bc).unwrap(),
            mem: TestMemory::new(ram).unwrap(),
            dev: Dev {
                config: core::array::from_fn(|i| i as u8),
            },
            workers: vec![None; 4],
            area: None,
            suspend: [false; 4],
            taken: (0..4).map(|_| Vec::new()).collect(),
            sent: Vec::new(),
            events: Vec::new(),
            pending: None,
            hold_at: None,
            held: None,
        }
    }

    fn drain_events(&mut self) {
        while let Some(e) = self.fe.poll_event() {
            self.events.push(e);
        }
    }

    /// Runs the two engines until the front-end has nothing to send, a stop
    /// is pending in the back-end, or a held reply was captured.
    fn drive(&mut self) {
        let mut buf = [0u8; MAX_TRANSMIT];
        let mut out = [0u8; MAX_MESSAGE];
        loop {
            self.drain_events();
            if self.pending.is_some() || self.held.is_some() {
                return;
            }
            let Some(t) = self.fe.poll_transmit(&mut buf).unwrap() else {
                assert!(!self.fe.awaits_reply(), "reply awaited but none came");
                self.drain_events();
                return;
            };
            let msg = &buf[..t.len];
            let h = Header::parse(msg).unwrap();
            assert_eq!(h.request, t.request.id());
            let sent = Sent {
                code: t.request,
                need_reply: h.need_reply(),
                bytes: msg.to_vec(),
                fds: t.fds.iter().copied().collect(),
            };
            // Every reply-less message that asks for an ack awaits it.
            assert_eq!(
                t.awaits_reply,
                t.request.has_reply() || h.need_reply(),
                "{sent:?}"
            );
            let o = self
                .be
                .handle(
                    &h,
                    &msg[HEADER_SIZE..],
                    t.fds.len(),
                    &self.mem,
                    &mut self.dev,
                    &mut out,
                )
                .unwrap_or_else(|e| panic!("back-end refused {:?}: {e}", sent.request()));
            self.carry_out(&o.actions, &sent.fds);
            self.sent.push(sent);
            match o.reply {
                BeReply::None => assert!(!t.awaits_reply),
                BeReply::Ready(n) => {
                    assert!(t.awaits_reply, "unexpected reply to {:?}", t.request);
                    if self.hold_at == Some(t.request) {
                        self.held = Some(out[..n].to_vec());
                        continue;
                    }
                    // The adapter attaches the area it created for
                    // GET_INFLIGHT_FD to the reply.
                    let nfds = usize::from(
                        o.actions
                            .iter()
                            .any(|a| matches!(a, Action::CreateInflight { .. })),
                    );
                    self.deliver_with(&out[..n], nfds);
                }
                BeReply::Pending { queue } => {
                    assert!(t.awaits_reply);
                    self.pending = Some(queue);
                }
            }
        }
    }

    fn deliver(&mut self, reply: &[u8]) {
        self.deliver_with(reply, 0)
    }

    fn deliver_with(&mut self, reply: &[u8], nfds: usize) {
        let h = Header::parse(reply).unwrap();
        self.fe
            .handle_reply(&h, &reply[HEADER_SIZE..], nfds)
            .unwrap_or_else(|e| panic!("front-end refused reply to {}: {e}", h.request));
    }

    /// What a Linux adapter does with the back-end's actions; the fd indices
    /// must name the fds the front-end attached.
    fn carry_out(&mut self, actions: &[Action], fds: &[FdRef]) {
        for a in actions {
            match a {
                Action::MapRegion { fd, region, .. } => {
                    let FdRef::Region(i) = fds[usize::from(*fd)] else {
                        panic!("region mapped from {:?}", fds[usize::from(*fd)]);
                    };
                    assert_eq!(self.fe.regions()[usize::from(i)], *region);
                }
                Action::SetKick { queue, fd } => {
                    assert_eq!(
                        fd.map(|i| fds[usize::from(i)]),
                        fd.map(|_| FdRef::Kick(*queue))
                    )
                }
                Action::SetCall { queue, fd } => {
                    assert_eq!(
                        fd.map(|i| fds[usize::from(i)]),
                        fd.map(|_| FdRef::Call(*queue))
                    )
                }
                Action::StopRing { queue, suspend } => {
                    self.suspend[usize::from(*queue)] = *suspend;
                }
                Action::CreateInflight { size } => {
                    self.area = Some(TestMemory::new(&[(0, *size)]).unwrap())
                }
                Action::MapInflight { size, .. } => match &self.area {
                    // The area the back-end created comes back.
                    Some(a) => assert!(a.check(0, *size).is_ok() && a.check(*size, 1).is_err()),
                    // A back-end that did not create it maps the
                    // front-end's (fresh in this pair).
                    None => self.area = Some(TestMemory::new(&[(0, *size)]).unwrap()),
                },
                Action::StartRing { queue } => {
                    let dp = self
                        .be
                        .start_ring(*queue, &self.mem, self.area.as_ref(), false)
                        .unwrap();
                    self.workers[usize::from(*queue)] = Some(dp)
                }
                Action::SetEnabled { queue, enabled } => {
                    if let Some(r) = self.workers[usize::from(*queue)].as_mut() {
                        r.set_enabled(*enabled);
                    }
                }
                Action::RemapRings => {
                    for (q, r) in self.workers.iter_mut().enumerate() {
                        if let Some(r) = r {
                            r.set_addrs(self.be.ring_addrs(q as u16).unwrap()).unwrap();
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The worker: pops and completes everything available on ring `q`,
    /// filling writable buffers with `fill`.
    fn serve(&mut self, q: usize, fill: u8) -> usize {
        let ring = self.workers[q].as_mut().expect("ring running");
        let mut chain: Chain = Chain::new();
        let area = self.area.as_ref();
        let mut n = 0;
        while let Some(t) = ring.pop(&self.mem, area, &mut chain).unwrap() {
            let mut written = 0;
            for s in chain.writable() {
                self.mem.write(s.addr, &vec![fill; s.len as usize]).unwrap();
                written += s.len;
            }
            ring.complete(&self.mem, area, t, written).unwrap();
            n += 1;
        }
        ring.publish(&self.mem, area).unwrap();
        n
    }

    /// The worker takes every available request of ring `q` and holds it
    /// (a device with requests in flight).
    fn take(&mut self, q: usize) {
        let Some(ring) = self.workers[q].as_mut() else {
            return;
        };
        let mut chain: Chain = Chain::new();
        while let Some(t) = ring.pop(&self.mem, self.area.as_ref(), &mut chain).unwrap() {
            let bufs = chain.writable().iter().map(|s| (s.addr, s.len)).collect();
            self.taken[q].push((t, bufs));
        }
    }

    /// The worker of the ring being stopped drains it (completes what is
    /// available), hands its ring back, and the reply goes to the
    /// front-end. Returns how many requests the drain completed.
    fn finish_stop(&mut self, fill: u8) -> usize {
        let q = self.pending.take().expect("a stop is pending");
        let suspend = self.suspend[usize::from(q)];
        let mut ring = self.workers[usize::from(q)].take().unwrap();
        let area = self.area.as_ref();
        let mut drained = 0;
        let base = loop {
            match ring.stop(&self.mem, area, suspend).0 {
                Stop::Stopped { base } => break base,
                Stop::Draining => {
                    for (t, bufs) in self.taken[usize::from(q)].drain(..) {
                        let mut written = 0;
                        for (a, l) in bufs {
                            self.mem.write(a, &vec![fill; l as usize]).unwrap();
                            written += l;
                        }
                        ring.complete(&self.mem, area, t, written).unwrap();
                        drained += 1;
                    }
                }
            }
        };
        self.taken[usize::from(q)].clear();
        let mut out = [0u8; 64];
        let n = self.be.finish_stop(q, base, &mut out).unwrap();
        self.deliver(&out[..n]);
        drained
    }

    /// `stop()`, draining every pending ring with `fill`; returns the
    /// requests drained per ring.
    fn stop(&mut self, fill: u8) -> Vec<usize> {
        for q in 0..self.workers.len() {
            self.take(q);
        }
        self.fe.stop().unwrap();
        let mut drained = Vec::new();
        loop {
            self.drive();
            if self.pending.is_none() {
                return drained;
            }
            drained.push(self.finish_stop(fill));
        }
    }

    fn codes(&self) -> Vec<(C, bool)> {
        self.sent.iter().map(|s| (s.code, s.need_reply)).collect()
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
}

fn queue(size: u16, addrs: RingAddrs, base: u32) -> QueueConfig {
    QueueConfig {
        size,
        addrs,
        base,
        kick: NotifyMode::Eventfd,
        call: NotifyMode::Eventfd,
    }
}

fn fe_config(
    protocol: P,
    features: V,
    queues: &[QueueConfig],
    regions: &[MemRegionMsg],
) -> FrontendConfig<4, 8> {
    let mut c = FrontendConfig::new(features, protocol);
    for q in queues {
        c.queues.push(*q).unwrap();
    }
    for r in regions {
        c.regions.push(*r).unwrap();
    }
    c
}

fn ring_codes(n: u16, ack: bool) -> Vec<(C, bool)> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.extend([
            (C::SetVringNum, false),
            (C::SetVringBase, false),
            (C::SetVringAddr, false),
            (C::SetVringKick, ack),
            (C::SetVringCall, ack),
        ]);
    }
    v
}

/// The payload u64 / vring state of a sent message.
fn word(s: &Sent) -> u64 {
    u64::from_ne_bytes(s.bytes[HEADER_SIZE..HEADER_SIZE + 8].try_into().unwrap())
}

#[test]
fn two_split_rings_mem_table_start_stop_restart() {
    let layout = TestMemory::<8>::new(&[(0, MIB)]).unwrap();
    let u0 = SplitDriver::new(&layout, 16, 0x1000, false)
        .unwrap()
        .user_addrs();
    let u1 = SplitDriver::new(&layout, 32, 0x2000, false)
        .unwrap()
        .user_addrs();
    let protocol = P::MQ | P::REPLY_ACK | P::CONFIG | P::STATUS;
    let cfg = fe_config(
        protocol,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[queue(16, u0, 0), queue(32, u1, 0)],
        &[region(0, MIB)],
    );
    let mut p = Pair::new(SUPPORTED_PROTOCOL_FEATURES, cfg, &[(0, MIB)]);
    let mut d0 = SplitDriver::new(&p.mem, 16, 0x1000, false).unwrap();
    let mut d1 = SplitDriver::new(&p.mem, 32, 0x2000, false).unwrap();

    p.drive();
    assert_eq!(p.fe.state(), State::Ready);
    assert_eq!(
        p.take_events(),
        vec![Event::Negotiated {
            features: V::VERSION_1 | V::PROTOCOL_FEATURES,
            protocol_features: protocol,
        }]
    );
    let init = [
        (C::GetFeatures, false),
        (C::GetProtocolFeatures, false),
        (C::SetProtocolFeatures, false),
        (C::GetQueueNum, false),
        (C::SetOwner, false),
        (C::GetFeatures, false),
    ];
    assert_eq!(p.codes(), init);
    assert_eq!(word(&p.sent[2]), protocol.bits());
    assert_eq!(p.fe.backend_info().queue_num, Some(4));
    assert_eq!(p.fe.backend_info().max_mem_slots, None);

    // Requests posted before the start are served without a guest kick.
    d0.post(
        &p.mem,
        &[Buf::readable(0x8000, 16), Buf::writable(0x9000, 32)],
    )
    .unwrap();
    d1.post(&p.mem, &[Buf::writable(0xa000, 8)]).unwrap();
    p.sent.clear();
    p.fe.start().unwrap();
    assert_eq!(p.fe.start(), Err(FrontendError::Busy));
    p.drive();
    assert_eq!(p.fe.state(), State::Started);
    let mut expected = vec![
        (C::SetFeatures, false),
        (C::SetStatus, true),
        (C::SetMemTable, true),
    ];
    expected.extend(ring_codes(2, true));
    expected.extend([
        (C::SetVringEnable, true),
        (C::SetVringEnable, true),
        (C::SetStatus, true),
    ]);
    assert_eq!(p.codes(), expected);
    assert_eq!(
        word(&p.sent[0]),
        (V::VERSION_1 | V::PROTOCOL_FEATURES).bits()
    );
    assert_eq!(word(&p.sent[1]), 0xb);
    assert_eq!(word(&p.sent[15]), 0xf);
    assert_eq!(p.sent[2].fds, [FdRef::Region(0)]);
    assert_eq!(p.sent[6].fds, [FdRef::Kick(0)]);
    assert_eq!(p.sent[12].fds, [FdRef::Call(1)]);
    assert_eq!(
        p.take_events(),
        vec![
            Event::InjectKick(0),
            Event::RingStarted(0),
            Event::InjectKick(1),
            Event::RingStarted(1),
            Event::Started
        ]
    );
    assert_eq!(p.be.status(), 0xf);
    assert_eq!(p.be.processing(0), Processing::Normal);
    assert_eq!(p.be.processing(1), Processing::Normal);

    assert_eq!(p.serve(0, 0xab), 1);
    assert_eq!(p.serve(1, 0xcd), 1);
    assert_eq!(d0.harvest_all(&p.mem).unwrap().len(), 1);
    assert_eq!(d1.harvest(&p.mem).unwrap().unwrap().len, 8);
    assert_eq!(p.mem.read_vec(0x9000, 32).unwrap(), vec![0xab; 32]);
    assert_eq!(p.mem.read_vec(0xa000, 8).unwrap(), vec![0xcd; 8]);

    // Stop while requests are in flight: each GET_VRING_BASE waits for its
    // ring's worker to drain.
    d0.post(&p.mem, &[Buf::writable(0x9100, 8)]).unwrap();
    d0.post(&p.mem, &[Buf::writable(0x9200, 8)]).unwrap();
    d1.post(&p.mem, &[Buf::writable(0xa100, 8)]).unwrap();
    p.sent.clear();
    assert_eq!(p.stop(0x11), [2, 1]);
    assert_eq!(p.fe.state(), State::Stopped);
    assert_eq!(
        p.codes(),
        [
            (C::SetVringEnable, true),
            (C::SetVringEnable, true),
            (C::GetVringBase, false),
            (C::GetVringBase, false),
            (C::SetStatus, true),
        ]
    );
    assert_eq!(word(&p.sent[4]), 0);
    assert_eq!(
        p.take_events(),
        vec![
            Event::RingStopped { queue: 0, base: 3 },
            Event::RingStopped { queue: 1, base: 2 },
            Event::Stopped
        ]
    );
    assert_eq!(p.be.processing(0), Processing::Stopped);
    assert_eq!((p.fe.ring_base(0), p.fe.ring_base(1)), (Some(3), Some(2)));
    assert_eq!(d0.harvest_all(&p.mem).unwrap().len(), 2);
    assert_eq!(d1.harvest_all(&p.mem).unwrap().len(), 1);

    // Posted while stopped: the restart resumes from the stopped bases and
    // serves them. The memory table is unchanged, so it is not resent.
    d0.post(&p.mem, &[Buf::writable(0x9300, 8)]).unwrap();
    d1.post(&p.mem, &[Buf::writable(0xa200, 8)]).unwrap();
    p.sent.clear();
    p.fe.start().unwrap();
    p.drive();
    let mut expected = vec![(C::SetFeatures, false), (C::SetStatus, true)];
    expected.extend(ring_codes(2, true));
    expected.extend([
        (C::SetVringEnable, true),
        (C::SetVringEnable, true),
        (C::SetStatus, true),
    ]);
    assert_eq!(p.codes(), expected);
    assert_eq!(
        p.sent[3].request(),
        Request::SetVringBase(vhost_user_core::message::VringStateMsg { index: 0, num: 3 })
    );
    assert_eq!(
        p.sent[8].request(),
        Request::SetVringBase(vhost_user_core::message::VringStateMsg { index: 1, num: 2 })
    );
    assert_eq!(p.serve(0, 0x22), 1);
    assert_eq!(p.serve(1, 0x33), 1);
    assert_eq!(d0.harvest_all(&p.mem).unwrap().len(), 1);
    assert_eq!(d1.harvest_all(&p.mem).unwrap().len(), 1);
    assert_eq!(p.mem.read_vec(0x9300, 8).unwrap(), vec![0x22; 8]);
    assert_eq!(p.mem.read_vec(0xa200, 8).unwrap(), vec![0x33; 8]);
}

#[test]
fn add_mem_reg_mode_and_memory_changes() {
    const A: u64 = 512 << 10;
    let ram = [(0, A), (A, A), (2 * A, A)];
    let (r0, r1, r2) = (region(0, A), region(A, A), region(2 * A, A));
    let protocol = P::MQ | P::REPLY_ACK | P::CONFIGURE_MEM_SLOTS;
    let layout = TestMemory::<8>::new(&ram).unwrap();
    let user = SplitDriver::new(&layout, 8, 0x1000, false)
        .unwrap()
        .user_addrs();
    let user1 = SplitDriver::new(&layout, 8, A + 0x1000, false)
        .unwrap()
        .user_addrs();
    let cfg = fe_config(
        protocol,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[queue(8, user, 0), queue(8, user1, 0)],
        &[r0, r1],
    );
    let mut p = Pair::new(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    let mut d1 = SplitDriver::new(&p.mem, 8, A + 0x1000, false).unwrap();
    SplitDriver::new(&p.mem, 8, 0x1000, false).unwrap();
    p.drive();
    assert_eq!(
        p.codes()[3..5],
        [(C::GetQueueNum, false), (C::GetMaxMemSlots, false)]
    );
    assert_eq!(p.fe.backend_info().max_mem_slots, Some(8));
    p.sent.clear();
    p.fe.start().unwrap();
    p.drive();
    let mut expected = vec![
        (C::SetFeatures, false),
        (C::AddMemReg, true),
        (C::AddMemReg, true),
    ];
    expected.extend(ring_codes(2, true));
    expected.extend([(C::SetVringEnable, true), (C::SetVringEnable, true)]);
    assert_eq!(p.codes(), expected);
    assert_eq!(p.sent[1].fds, [FdRef::Region(0)]);
    assert_eq!(p.sent[2].fds, [FdRef::Region(1)]);
    assert_eq!(p.sent[1].request(), Request::AddMemReg(r0));
    assert_eq!(p.be.memory().len(), 2);
    d1.post(&p.mem, &[Buf::writable(A + 0x8000, 4)]).unwrap();
    assert_eq!(p.serve(1, 7), 1);
    assert_eq!(p.mem.read_vec(A + 0x8000, 4).unwrap(), [7; 4]);
    p.take_events();

    // Hot-plug while running: one ADD_MEM_REG, with the fd of the new list.
    p.sent.clear();
    p.fe.set_memory(&[r0, r1, r2]).unwrap();
    p.drive();
    assert_eq!(p.codes(), [(C::AddMemReg, true)]);
    assert_eq!(p.sent[0].fds, [FdRef::Region(2)]);
    assert_eq!(p.take_events(), [Event::MemoryUpdated]);
    assert_eq!(p.be.memory().len(), 3);
    // Unplug r1 and reorder: one REM_MEM_REG (no fd), nothing re-added.
    p.sent.clear();
    let moved = [r2, r0];
    let with_r1 = [r2, r0, r1];
    p.fe.set_memory(&with_r1).unwrap();
    p.drive();
    assert!(p.sent.is_empty(), "a reordering sends nothing");
    // Ring 1 lives in r1: the back-end refuses to remove it with a failed
    // ack, which the engine reports naming the request.
    p.fe.set_memory(&moved).unwrap();
    p.hold_at = Some(C::RemMemReg);
    p.drive();
    let reply = p.held.take().unwrap();
    assert_eq!(p.sent.last().unwrap().request(), Request::RemMemReg(r1));
    assert!(p.sent.last().unwrap().fds.is_empty());
    let h = Header::parse(&reply).unwrap();
    assert_eq!(
        p.fe.handle_reply(&h, &reply[HEADER_SIZE..], 0),
        Err(FrontendError::Nack {
            request: C::RemMemReg,
            value: 1
        })
    );
    assert_eq!(p.fe.state(), State::Failed);
    let mut buf = [0u8; MAX_TRANSMIT];
    assert_eq!(p.fe.poll_transmit(&mut buf), Err(FrontendError::Failed));
}

#[test]
fn stopped_memory_change_is_sent_by_the_restart() {
    const A: u64 = 512 << 10;
    let ram = [(0, A), (A, A)];
    let (r0, r1) = (region(0, A), region(A, A));
    let layout = TestMemory::<8>::new(&ram).unwrap();
    let user = SplitDriver::new(&layout, 8, 0x1000, false)
        .unwrap()
        .user_addrs();
    let cfg = fe_config(
        P::REPLY_ACK | P::CONFIGURE_MEM_SLOTS,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[queue(8, user, 0)],
        &[r0, r1],
    );
    let mut p = Pair::new(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    SplitDriver::new(&p.mem, 8, 0x1000, false).unwrap();
    p.drive();
    p.fe.start().unwrap();
    p.drive();
    p.stop(0);
    p.fe.set_memory(&[r0]).unwrap();
    p.sent.clear();
    p.fe.start().unwrap();
    p.drive();
    assert_eq!(
        &p.codes()[..2],
        [(C::SetFeatures, false), (C::RemMemReg, true)]
    );
    assert_eq!(p.sent[1].request(), Request::RemMemReg(r1));
    assert_eq!(p.be.memory().len(), 1);
    assert_eq!(p.fe.state(), State::Started);
}

#[test]
fn split_base_near_65535_wraps() {
    let ram = [(0, MIB)];
    let layout = TestMemory::<8>::new(&ram).unwrap();
    let user = SplitDriver::new(&layout, 16, 0x1000, false)
        .unwrap()
        .user_addrs();
    let cfg = fe_config(
        P::REPLY_ACK,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[queue(16, user, 65530)],
        &[region(0, MIB)],
    );
    let mut p = Pair::new(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    let mut d = SplitDriver::new(&p.mem, 16, 0x1000, false).unwrap();
    // The guest's avail index is where the front-end says the ring is.
    d.set_avail_idx(&p.mem, 65530).unwrap();
    for i in 0..10 {
        d.post(&p.mem, &[Buf::writable(0x8000 + 0x10 * i, 4)])
            .unwrap();
    }
    p.drive();
    p.fe.start().unwrap();
    p.drive();
    assert_eq!(p.serve(0, 1), 10);
    assert_eq!(d.harvest_all(&p.mem).unwrap().len(), 10);
    for i in 0..3 {
        d.post(&p.mem, &[Buf::writable(0x9000 + 0x10 * i, 4)])
            .unwrap();
    }
    p.take_events();
    assert_eq!(p.stop(2), [3]);
    // 65530 + 13, wrapped to 16 bits.
    assert_eq!(
        p.take_events(),
        [Event::RingStopped { queue: 0, base: 7 }, Event::Stopped]
    );
    d.post(&p.mem, &[Buf::writable(0xa000, 4)]).unwrap();
    p.fe.start().unwrap();
    p.drive();
    assert_eq!(p.serve(0, 3), 1);
    assert_eq!(p.mem.read_vec(0xa000, 4).unwrap(), [3; 4]);
    assert_eq!(d.harvest_all(&p.mem).unwrap().len(), 4);
    p.stop(0);
    assert_eq!(p.fe.ring_base(0), Some(8));
}

#[test]
fn packed_ring_start_stop_restart_across_the_wrap() {
    let ram = [(0, MIB)];
    let layout = TestMemory::<8>::new(&ram).unwrap();
    let a = PackedDriver::new(&layout, 8, 0x2000).unwrap().addrs();
    let user = RingAddrs {
        desc: a.desc + USER_ADDR_OFFSET,
        driver: a.driver + USER_ADDR_OFFSET,
        device: a.device + USER_ADDR_OFFSET,
    };
    let wrap = 1 << 15 | 1 << 31;
    let cfg = fe_config(
        P::REPLY_ACK | P::STATUS,
        V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED,
        &[queue(8, user, wrap)],
        &[region(0, MIB)],
    );
    let mut p = Pair::new(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    let mut d = PackedDriver::new(&p.mem, 8, 0x2000).unwrap();
    for i in 0..3 {
        d.post(&p.mem, &[Buf::writable(0x8000 + 0x100 * i, 16)])
            .unwrap();
    }
    p.drive();
    assert!(p.fe.features().contains(V::RING_PACKED));
    p.fe.start().unwrap();
    p.drive();
    assert!(p.workers[0].is_some());
    assert_eq!(p.serve(0, 1), 3);
    assert_eq!(d.harvest_all(&p.mem).unwrap().len(), 3);
    d.post(&p.mem, &[Buf::writable(0x9000, 16)]).unwrap();
    d.post(&p.mem, &[Buf::writable(0x9100, 16)]).unwrap();
    p.take_events();
    assert_eq!(p.stop(2), [2]);
    // 5 avail and 5 used, both wrap counters still 1.
    let base = 5 | 5 << 16 | wrap;
    assert_eq!(
        p.take_events(),
        [Event::RingStopped { queue: 0, base }, Event::Stopped]
    );
    assert_eq!(d.harvest_all(&p.mem).unwrap().len(), 2);

    // Posted while stopped, and enough later to wrap the 8-entry ring.
    d.post(&p.mem, &[Buf::writable(0xa000, 16)]).unwrap();
    p.sent.clear();
    p.fe.start().unwrap();
    p.drive();
    assert_eq!(
        p.sent[3].request(),
        Request::SetVringBase(vhost_user_core::message::VringStateMsg {
            index: 0,
            num: base
        })
    );
    assert_eq!(p.serve(0, 3), 1);
    assert_eq!(p.mem.read_vec(0xa000, 16).unwrap(), [3; 16]);
    for i in 0..4 {
        d.post(&p.mem, &[Buf::writable(0xb000 + 0x100 * i, 16)])
            .unwrap();
    }
    assert_eq!(p.serve(0, 4), 4);
    assert_eq!(d.harvest_all(&p.mem).unwrap().len(), 5);
    p.take_events();
    p.stop(0);
    // 10 = one lap of 8 and 2: both wrap counters flipped to 0.
    assert_eq!(
        p.take_events(),
        [
            Event::RingStopped {
                queue: 0,
                base: 2 | 2 << 16
            },
            Event::Stopped
        ]
    );
}

#[test]
fn backend_without_protocol_features() {
    let ram = [(0, MIB)];
    let layout = TestMemory::<8>::new(&ram).unwrap();
    let user = SplitDriver::new(&layout, 16, 0x1000, false)
        .unwrap()
        .user_addrs();
    let cfg = fe_config(
        P::MQ | P::REPLY_ACK | P::STATUS,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[queue(16, user, 0)],
        &[region(0, MIB)],
    );
    let mut bc = backend_config(P::empty());
    bc.features = V::VERSION_1;
    let mut p = Pair::with_backend(bc, cfg, &ram);
    let mut d = SplitDriver::new(&p.mem, 16, 0x1000, false).unwrap();
    p.drive();
    assert_eq!(
        p.codes(),
        [
            (C::GetFeatures, false),
            (C::SetOwner, false),
            (C::GetFeatures, false)
        ]
    );
    assert_eq!(p.fe.backend_info().protocol_features, None);
    assert_eq!(p.fe.protocol_features(), P::empty());
    p.sent.clear();
    p.fe.start().unwrap();
    p.drive();
    // No SET_VRING_ENABLE, no SET_STATUS, no acks: the back-end enables
    // the rings itself on SET_FEATURES without bit 30.
    let mut expected = vec![(C::SetFeatures, false), (C::SetMemTable, false)];
    expected.extend(ring_codes(1, false));
    assert_eq!(p.codes(), expected);
    assert_eq!(word(&p.sent[0]), V::VERSION_1.bits());
    assert_eq!(p.be.processing(0), Processing::Normal);
    d.post(&p.mem, &[Buf::writable(0x8000, 4)]).unwrap();
    assert_eq!(p.serve(0, 9), 1);
    p.take_events();
    p.sent.clear();
    assert_eq!(p.stop(0), [0]);
    assert_eq!(p.codes(), [(C::GetVringBase, false)]);
    assert_eq!(
        p.take_events(),
        [Event::RingStopped { queue: 0, base: 1 }, Event::Stopped]
    );
}

#[test]
fn polling_kick_and_call() {
    let ram = [(0, MIB)];
    let layout = TestMemory::<8>::new(&ram).unwrap();
    let user = SplitDriver::new(&layout, 16, 0x1000, false)
        .unwrap()
        .user_addrs();
    let mut q = queue(16, user, 0);
    q.kick = NotifyMode::Polling;
    q.call = NotifyMode::Polling;
    let cfg = fe_config(
        P::REPLY_ACK,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[q],
        &[region(0, MIB)],
    );
    let mut p = Pair::new(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    let mut d = SplitDriver::new(&p.mem, 16, 0x1000, false).unwrap();
    p.drive();
    p.take_events();
    p.sent.clear();
    p.fe.start().unwrap();
    p.drive();
    let kick = p.sent.iter().find(|s| s.code == C::SetVringKick).unwrap();
    assert!(kick.fds.is_empty());
    assert_eq!(
        kick.request(),
        Request::SetVringKick(vhost_user_core::message::VringFdMsg {
            index: 0,
            no_fd: true
        })
    );
    // Nothing to inject without a kick fd.
    assert_eq!(p.take_events(), [Event::RingStarted(0), Event::Started]);
    d.post(&p.mem, &[Buf::writable(0x8000, 4)]).unwrap();
    assert_eq!(p.serve(0, 5), 1);
    assert_eq!(d.harvest_all(&p.mem).unwrap().len(), 1);
}

#[test]
fn probe_reads_offer_and_config() {
    let mut p = Pair::new(
        SUPPORTED_PROTOCOL_FEATURES,
        FrontendConfig::probe(),
        &[(0, MIB)],
    );
    p.drive();
    let info = *p.fe.backend_info();
    assert_eq!(info.features, backend_config(P::empty()).features);
    assert_eq!(info.protocol_features, Some(SUPPORTED_PROTOCOL_FEATURES));
    assert_eq!(info.queue_num, Some(4));
    assert_eq!(info.max_mem_slots, Some(8));
    // What the back-end offers and the front-end implements (not
    // RESET_DEVICE, nor the inflight features yet).
    assert_eq!(
        p.fe.protocol_features(),
        SUPPORTED_PROTOCOL_FEATURES & vhost_user_core::frontend::SUPPORTED_PROTOCOL_FEATURES
    );
    assert!(!p.fe.protocol_features().contains(P::RESET_DEVICE));
    p.take_events();
    p.fe.read_config(4, 8).unwrap();
    p.drive();
    let data: Vec<u8> = (4..12).collect();
    assert_eq!(
        p.take_events(),
        [Event::Config {
            offset: 4,
            data: heapless::Vec::from_slice(&data).unwrap()
        }]
    );
    // Outside the device's 16 bytes: the back-end answers an empty config.
    p.fe.read_config(8, 16).unwrap();
    p.drive();
    assert_eq!(
        p.take_events(),
        [Event::ConfigFailed { offset: 8, len: 16 }]
    );
    assert_eq!(
        p.fe.read_config(250, 16),
        Err(FrontendError::Wire(WireError::ConfigRange {
            offset: 250,
            size: 16
        }))
    );
    // A probe has nothing to start.
    assert_eq!(p.fe.start(), Err(FrontendError::NoQueues));
    assert_eq!(p.fe.stop(), Err(FrontendError::WrongState(State::Ready)));
}

#[test]
fn read_config_needs_config_negotiated() {
    let mut p = Pair::new(P::MQ, FrontendConfig::probe(), &[(0, MIB)]);
    p.drive();
    assert_eq!(
        p.fe.read_config(0, 4),
        Err(FrontendError::NotNegotiated(C::GetConfig))
    );
}

/// Two split rings of 16 in 1 MiB, MQ, REPLY_ACK and CONFIG; not driven.
fn two_queue_pair() -> Pair {
    let ram = [(0, MIB)];
    let layout = TestMemory::<8>::new(&ram).unwrap();
    let u0 = SplitDriver::new(&layout, 16, 0x1000, false)
        .unwrap()
        .user_addrs();
    let u1 = SplitDriver::new(&layout, 16, 0x2000, false)
        .unwrap()
        .user_addrs();
    let cfg = fe_config(
        P::MQ | P::REPLY_ACK | P::CONFIG,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[queue(16, u0, 0), queue(16, u1, 0)],
        &[region(0, MIB)],
    );
    let p = Pair::new(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    SplitDriver::new(&p.mem, 16, 0x1000, false).unwrap();
    SplitDriver::new(&p.mem, 16, 0x2000, false).unwrap();
    p
}

/// Runs the init (and the start if `start`) up to the reply to the first
/// `code`, and returns the pair and the back-end's genuine reply, not yet
/// delivered.
fn held_reply(code: C, start: bool) -> (Pair, Vec<u8>) {
    let mut p = two_queue_pair();
    p.hold_at = Some(code);
    p.drive();
    if start && p.held.is_none() {
        p.fe.start().unwrap();
        p.drive();
    }
    let r = p.held.take().expect("reply held");
    (p, r)
}

fn feed(p: &mut Pair, bytes: &[u8], nfds: usize) -> Result<(), FrontendError> {
    let h = Header::parse(bytes).unwrap();
    p.fe.handle_reply(&h, &bytes[HEADER_SIZE..], nfds)
}

fn set_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

#[test]
fn malformed_replies_are_typed_errors() {
    // Wrong request id.
    let (mut p, mut r) = held_reply(C::GetFeatures, false);
    set_u32(&mut r, 0, C::GetProtocolFeatures.id());
    assert_eq!(
        feed(&mut p, &r, 0),
        Err(FrontendError::Wire(WireError::ReplyMismatch {
            expected: 1,
            got: 15
        }))
    );
    assert_eq!(p.fe.state(), State::Failed);
    assert_eq!(feed(&mut p, &r, 0), Err(FrontendError::Failed));
    assert_eq!(p.fe.start(), Err(FrontendError::Failed));

    // NEED_REPLY left set in the reply (flags 0xd).
    let (mut p, mut r) = held_reply(C::GetProtocolFeatures, false);
    set_u32(&mut r, 4, 0xd);
    assert_eq!(
        feed(&mut p, &r, 0),
        Err(FrontendError::Wire(WireError::BadReplyFlags(0xd)))
    );

    // Wrong size: 4 bytes for a u64.
    let (mut p, mut r) = held_reply(C::GetQueueNum, false);
    set_u32(&mut r, 8, 4);
    assert_eq!(
        feed(&mut p, &r[..HEADER_SIZE + 4], 0),
        Err(FrontendError::Wire(WireError::BadSize {
            request: 17,
            size: 4
        }))
    );

    // An fd with a reply that allows none.
    let (mut p, r) = held_reply(C::GetFeatures, false);
    assert_eq!(
        feed(&mut p, &r, 1),
        Err(FrontendError::Wire(WireError::TooManyFds {
            allowed: 0,
            got: 1
        }))
    );

    // GET_QUEUE_NUM below the two queues configured.
    let (mut p, mut r) = held_reply(C::GetQueueNum, false);
    r[HEADER_SIZE..].copy_from_slice(&1u64.to_ne_bytes());
    assert_eq!(
        feed(&mut p, &r, 0),
        Err(FrontendError::TooFewQueues {
            needed: 2,
            offered: 1
        })
    );

    // A failed ack names the request.
    let (mut p, mut r) = held_reply(C::SetVringEnable, true);
    r[HEADER_SIZE..].copy_from_slice(&1u64.to_ne_bytes());
    assert_eq!(
        feed(&mut p, &r, 0),
        Err(FrontendError::Nack {
            request: C::SetVringEnable,
            value: 1
        })
    );
}

#[test]
fn reply_when_none_is_awaited() {
    let (mut p, r) = held_reply(C::GetFeatures, false);
    feed(&mut p, &r, 0).unwrap();
    // The same reply again: GET_PROTOCOL_FEATURES is not even sent yet.
    assert!(!p.fe.awaits_reply());
    assert_eq!(
        feed(&mut p, &r, 0),
        Err(FrontendError::UnexpectedReply { request: 1 })
    );
    assert_eq!(p.fe.state(), State::Failed);
}

#[test]
fn get_vring_base_reply_is_checked() {
    let cases = [
        // Ring 1's state answered for ring 0.
        (
            1,
            0,
            FrontendError::WrongRing {
                expected: 0,
                got: 1,
            },
        ),
        // A split ring's base has reserved bits 16-31.
        (
            0,
            0x1_0000,
            FrontendError::BadBase {
                queue: 0,
                base: 0x1_0000,
            },
        ),
    ];
    for (index, num, err) in cases {
        let mut p = two_queue_pair();
        p.drive();
        p.fe.start().unwrap();
        p.drive();
        p.fe.stop().unwrap();
        p.drive();
        assert_eq!(p.pending, Some(0));
        assert!(p.fe.awaits_reply());
        let mut out = [0u8; 64];
        let n = WireReply::VringState { index, num }
            .encode(C::GetVringBase, &mut out)
            .unwrap();
        assert_eq!(feed(&mut p, &out[..n], 0), Err(err));
        assert_eq!(p.fe.state(), State::Failed);
    }
}

#[test]
fn config_reply_must_match_the_range_asked() {
    let (mut p, mut r) = {
        let mut p = two_queue_pair();
        p.drive();
        p.hold_at = Some(C::GetConfig);
        p.fe.read_config(0, 8).unwrap();
        p.drive();
        let r = p.held.take().unwrap();
        (p, r)
    };
    // Offset 1 instead of 0, same length.
    set_u32(&mut r, HEADER_SIZE, 1);
    assert_eq!(
        feed(&mut p, &r, 0),
        Err(FrontendError::ConfigMismatch { offset: 1, len: 8 })
    );
}

#[test]
fn second_get_features_must_agree() {
    let mut p = two_queue_pair();
    // Hold the first GET_FEATURES reply, deliver it, hold the second.
    p.hold_at = Some(C::GetFeatures);
    p.drive();
    let first = p.held.take().unwrap();
    p.deliver(&first);
    p.drive();
    assert_eq!(p.sent.last().unwrap().code, C::GetFeatures);
    assert_eq!(p.sent[p.sent.len() - 2].code, C::SetOwner);
    let mut r = p.held.take().unwrap();
    r[HEADER_SIZE..].copy_from_slice(&V::VERSION_1.bits().to_ne_bytes());
    assert!(matches!(
        feed(&mut p, &r, 0),
        Err(FrontendError::FeaturesChanged { .. })
    ));
}

#[test]
fn inflight_area_is_asked_once_and_handed_over_at_every_start() {
    let layout = TestMemory::<8>::new(&[(0, MIB)]).unwrap();
    let u0 = SplitDriver::new(&layout, 16, 0x1000, false)
        .unwrap()
        .user_addrs();
    let protocol = P::MQ | P::REPLY_ACK | P::INFLIGHT_SHMFD;
    let cfg = fe_config(
        protocol,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[queue(16, u0, 0)],
        &[region(0, MIB)],
    );
    let mut p = Pair::new(protocol, cfg.clone(), &[(0, MIB)]);
    p.drive();
    assert!(p.fe.protocol_features().contains(P::INFLIGHT_SHMFD));
    p.fe.start().unwrap();
    p.drive();
    let codes: Vec<C> = p.sent.iter().map(|s| s.code).collect();
    let get = codes.iter().position(|c| *c == C::GetInflightFd).unwrap();
    let set = codes.iter().position(|c| *c == C::SetInflightFd).unwrap();
    let num = codes.iter().position(|c| *c == C::SetVringNum).unwrap();
    assert!(get < set && set < num, "{codes:?}");
    // SET_INFLIGHT_FD carries the area the back-end described, and its fd.
    let area = p.fe.inflight().expect("an area");
    assert_eq!(
        area.mmap_size,
        vhost_user_core::inflight::area_size(1, 16).unwrap()
    );
    assert_eq!((area.num_queues, area.queue_size), (1, 16));
    assert_eq!(p.sent[set].fds, [FdRef::Inflight]);
    assert_eq!(p.sent[set].request(), Request::SetInflightFd(area));

    // A restart hands the same area over again, without asking anew.
    p.stop(0);
    p.sent.clear();
    p.fe.start().unwrap();
    p.drive();
    let codes: Vec<C> = p.sent.iter().map(|s| s.code).collect();
    assert!(!codes.contains(&C::GetInflightFd), "{codes:?}");
    assert!(codes.contains(&C::SetInflightFd), "{codes:?}");

    // A new connection given the area (a reconnect) never asks for one.
    let mut again = cfg;
    again.inflight = Some(area);
    let mut p = Pair::new(protocol, again, &[(0, MIB)]);
    p.drive();
    p.fe.start().unwrap();
    p.drive();
    let codes: Vec<C> = p.sent.iter().map(|s| s.code).collect();
    assert!(!codes.contains(&C::GetInflightFd), "{codes:?}");
    assert!(codes.contains(&C::SetInflightFd), "{codes:?}");
}

#[test]
fn suspending_stop_uses_bit_20_or_message_45() {
    let layout = TestMemory::<8>::new(&[(0, MIB)]).unwrap();
    let u0 = SplitDriver::new(&layout, 16, 0x1000, false)
        .unwrap()
        .user_addrs();
    let run = |protocol: P| -> Result<Vec<C>, FrontendError> {
        let cfg = fe_config(
            protocol,
            V::VERSION_1 | V::PROTOCOL_FEATURES,
            &[queue(16, u0, 0)],
            &[region(0, MIB)],
        );
        let mut p = Pair::new(protocol, cfg, &[(0, MIB)]);
        p.drive();
        p.fe.start().unwrap();
        p.drive();
        p.sent.clear();
        p.fe.stop_suspending()?;
        loop {
            p.drive();
            if p.pending.is_none() {
                break;
            }
            p.finish_stop(0);
        }
        assert_eq!(p.fe.state(), State::Stopped);
        Ok(p.sent.iter().map(|s| s.code).collect())
    };
    let base = P::MQ | P::REPLY_ACK | P::INFLIGHT_SHMFD;
    // Bit 20: GET_VRING_BASE suspends.
    let codes = run(base | P::GET_VRING_BASE_INFLIGHT).unwrap();
    assert!(codes.contains(&C::GetVringBase), "{codes:?}");
    // Bits 20 and 23: message 45.
    let codes = run(base | P::GET_VRING_BASE_INFLIGHT | P::GET_VRING_BASE_SKIP_DRAIN).unwrap();
    assert!(codes.contains(&C::GetVringBaseSkipDrain), "{codes:?}");
    assert!(!codes.contains(&C::GetVringBase), "{codes:?}");
    // Without bit 20 there is no suspending stop.
    assert!(matches!(run(base), Err(FrontendError::Unsupported(_))));
}

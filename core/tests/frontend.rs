//! The front-end engine driven against the back-end engine in memory:
//! `adapter-test`'s [`Pair`] (every message encoded by one side and parsed
//! by the other, fds travelling as counts and checked by index, the guest
//! as `adapter-test`'s memory and drivers), with its [`TestDevice`] filling
//! the writable buffers of each request.

#![allow(clippy::unwrap_used)]

use vhost_user_core::backend::{BackendConfig, SUPPORTED_PROTOCOL_FEATURES};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{
    Event, FdRef, FrontendConfig, FrontendError, NotifyMode, QueueConfig, State, MAX_TRANSMIT,
};
use vhost_user_core::message::{
    FrontendReq as C, Header, MemRegionMsg, Reply as WireReply, Request, WireError, HEADER_SIZE,
};
use vhost_user_core::vring::state::Processing;
use vhost_user_test::pair::{Backend, Sent};
use vhost_user_test::{region, Buf, PackedDriver, RingSpec, SplitDriver, TestDevice};

type Pair = vhost_user_test::Pair<TestDevice, 4, 8>;

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

fn pair(be_protocol: P, cfg: FrontendConfig<4, 8>, ram: &[(u64, u64)]) -> Pair {
    pair_with(backend_config(be_protocol), cfg, ram)
}

fn pair_with(bc: BackendConfig, cfg: FrontendConfig<4, 8>, ram: &[(u64, u64)]) -> Pair {
    let be = Backend::new(bc, TestDevice::default(), ram).unwrap();
    Pair::new(be, cfg).unwrap()
}

/// The worker serves ring `q`, filling writable buffers with `fill`.
fn serve(p: &mut Pair, q: u16, fill: u8) -> usize {
    p.be.device.fill = fill;
    p.be.serve(q).unwrap()
}

/// `stop()` with the requests available on every ring in flight (taken by
/// the worker), so each GET_VRING_BASE drains them with `fill`; returns
/// the requests drained per ring.
fn stop(p: &mut Pair, fill: u8) -> Vec<usize> {
    for q in 0..4 {
        if p.be.ring(q).is_some() {
            p.be.take(q).unwrap();
        }
    }
    p.be.device.fill = fill;
    p.stop().unwrap()
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
    let s0 = RingSpec::split(16, 0x1000);
    let s1 = RingSpec::split(32, 0x2000);
    let protocol = P::MQ | P::REPLY_ACK | P::CONFIG | P::STATUS;
    let cfg = fe_config(
        protocol,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[s0.queue(0), s1.queue(0)],
        &[region(0, MIB)],
    );
    let mut p = pair(SUPPORTED_PROTOCOL_FEATURES, cfg, &[(0, MIB)]);
    let mut d0 = SplitDriver::new(&p.be.mem, 16, 0x1000, false).unwrap();
    let mut d1 = SplitDriver::new(&p.be.mem, 32, 0x2000, false).unwrap();

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
        &p.be.mem,
        &[Buf::readable(0x8000, 16), Buf::writable(0x9000, 32)],
    )
    .unwrap();
    d1.post(&p.be.mem, &[Buf::writable(0xa000, 8)]).unwrap();
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
    assert_eq!(p.be.session.status(), 0xf);
    assert_eq!(p.be.session.processing(0), Processing::Normal);
    assert_eq!(p.be.session.processing(1), Processing::Normal);

    assert_eq!(serve(&mut p, 0, 0xab), 1);
    assert_eq!(serve(&mut p, 1, 0xcd), 1);
    assert_eq!(d0.harvest_all(&p.be.mem).unwrap().len(), 1);
    assert_eq!(d1.harvest(&p.be.mem).unwrap().unwrap().len, 8);
    assert_eq!(p.be.mem.read_vec(0x9000, 32).unwrap(), vec![0xab; 32]);
    assert_eq!(p.be.mem.read_vec(0xa000, 8).unwrap(), vec![0xcd; 8]);

    // Stop while requests are in flight: each GET_VRING_BASE waits for its
    // ring's worker to drain.
    d0.post(&p.be.mem, &[Buf::writable(0x9100, 8)]).unwrap();
    d0.post(&p.be.mem, &[Buf::writable(0x9200, 8)]).unwrap();
    d1.post(&p.be.mem, &[Buf::writable(0xa100, 8)]).unwrap();
    p.sent.clear();
    assert_eq!(stop(&mut p, 0x11), [2, 1]);
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
    assert_eq!(p.be.session.processing(0), Processing::Stopped);
    assert_eq!((p.fe.ring_base(0), p.fe.ring_base(1)), (Some(3), Some(2)));
    assert_eq!(d0.harvest_all(&p.be.mem).unwrap().len(), 2);
    assert_eq!(d1.harvest_all(&p.be.mem).unwrap().len(), 1);

    // Posted while stopped: the restart resumes from the stopped bases and
    // serves them. The memory table is unchanged, so it is not resent.
    d0.post(&p.be.mem, &[Buf::writable(0x9300, 8)]).unwrap();
    d1.post(&p.be.mem, &[Buf::writable(0xa200, 8)]).unwrap();
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
    assert_eq!(serve(&mut p, 0, 0x22), 1);
    assert_eq!(serve(&mut p, 1, 0x33), 1);
    assert_eq!(d0.harvest_all(&p.be.mem).unwrap().len(), 1);
    assert_eq!(d1.harvest_all(&p.be.mem).unwrap().len(), 1);
    assert_eq!(p.be.mem.read_vec(0x9300, 8).unwrap(), vec![0x22; 8]);
    assert_eq!(p.be.mem.read_vec(0xa200, 8).unwrap(), vec![0x33; 8]);
}

#[test]
fn add_mem_reg_mode_and_memory_changes() {
    const A: u64 = 512 << 10;
    let ram = [(0, A), (A, A), (2 * A, A)];
    let (r0, r1, r2) = (region(0, A), region(A, A), region(2 * A, A));
    let protocol = P::MQ | P::REPLY_ACK | P::CONFIGURE_MEM_SLOTS;
    let spec = RingSpec::split(8, 0x1000);
    let spec1 = RingSpec::split(8, A + 0x1000);
    let cfg = fe_config(
        protocol,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[spec.queue(0), spec1.queue(0)],
        &[r0, r1],
    );
    let mut p = pair(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    let mut d1 = SplitDriver::new(&p.be.mem, 8, A + 0x1000, false).unwrap();
    SplitDriver::new(&p.be.mem, 8, 0x1000, false).unwrap();
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
    assert_eq!(p.be.session.memory().len(), 2);
    d1.post(&p.be.mem, &[Buf::writable(A + 0x8000, 4)]).unwrap();
    assert_eq!(serve(&mut p, 1, 7), 1);
    assert_eq!(p.be.mem.read_vec(A + 0x8000, 4).unwrap(), [7; 4]);
    p.take_events();

    // Hot-plug while running: one ADD_MEM_REG, with the fd of the new list.
    p.sent.clear();
    p.fe.set_memory(&[r0, r1, r2]).unwrap();
    p.drive();
    assert_eq!(p.codes(), [(C::AddMemReg, true)]);
    assert_eq!(p.sent[0].fds, [FdRef::Region(2)]);
    assert_eq!(p.take_events(), [Event::MemoryUpdated]);
    assert_eq!(p.be.session.memory().len(), 3);
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
    let reply = p.held_reply.take().unwrap();
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
    let spec = RingSpec::split(8, 0x1000);
    let cfg = fe_config(
        P::REPLY_ACK | P::CONFIGURE_MEM_SLOTS,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[spec.queue(0)],
        &[r0, r1],
    );
    let mut p = pair(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    SplitDriver::new(&p.be.mem, 8, 0x1000, false).unwrap();
    p.drive();
    p.fe.start().unwrap();
    p.drive();
    stop(&mut p, 0);
    p.fe.set_memory(&[r0]).unwrap();
    p.sent.clear();
    p.fe.start().unwrap();
    p.drive();
    assert_eq!(
        &p.codes()[..2],
        [(C::SetFeatures, false), (C::RemMemReg, true)]
    );
    assert_eq!(p.sent[1].request(), Request::RemMemReg(r1));
    assert_eq!(p.be.session.memory().len(), 1);
    assert_eq!(p.fe.state(), State::Started);
}

#[test]
fn split_base_near_65535_wraps() {
    let ram = [(0, MIB)];
    let spec = RingSpec::split(16, 0x1000);
    let cfg = fe_config(
        P::REPLY_ACK,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[spec.queue(65530)],
        &[region(0, MIB)],
    );
    let mut p = pair(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    let mut d = SplitDriver::new(&p.be.mem, 16, 0x1000, false).unwrap();
    // The guest's avail index is where the front-end says the ring is.
    d.set_avail_idx(&p.be.mem, 65530).unwrap();
    for i in 0..10 {
        d.post(&p.be.mem, &[Buf::writable(0x8000 + 0x10 * i, 4)])
            .unwrap();
    }
    p.drive();
    p.fe.start().unwrap();
    p.drive();
    assert_eq!(serve(&mut p, 0, 1), 10);
    assert_eq!(d.harvest_all(&p.be.mem).unwrap().len(), 10);
    for i in 0..3 {
        d.post(&p.be.mem, &[Buf::writable(0x9000 + 0x10 * i, 4)])
            .unwrap();
    }
    p.take_events();
    assert_eq!(stop(&mut p, 2), [3]);
    // 65530 + 13, wrapped to 16 bits.
    assert_eq!(
        p.take_events(),
        [Event::RingStopped { queue: 0, base: 7 }, Event::Stopped]
    );
    d.post(&p.be.mem, &[Buf::writable(0xa000, 4)]).unwrap();
    p.fe.start().unwrap();
    p.drive();
    assert_eq!(serve(&mut p, 0, 3), 1);
    assert_eq!(p.be.mem.read_vec(0xa000, 4).unwrap(), [3; 4]);
    assert_eq!(d.harvest_all(&p.be.mem).unwrap().len(), 4);
    stop(&mut p, 0);
    assert_eq!(p.fe.ring_base(0), Some(8));
}

#[test]
fn packed_ring_start_stop_restart_across_the_wrap() {
    let ram = [(0, MIB)];
    let spec = RingSpec::packed(8, 0x2000);
    let wrap = 1 << 15 | 1 << 31;
    let cfg = fe_config(
        P::REPLY_ACK | P::STATUS,
        V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED,
        &[spec.queue(wrap)],
        &[region(0, MIB)],
    );
    let mut p = pair(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    let mut d = PackedDriver::new(&p.be.mem, 8, 0x2000).unwrap();
    for i in 0..3 {
        d.post(&p.be.mem, &[Buf::writable(0x8000 + 0x100 * i, 16)])
            .unwrap();
    }
    p.drive();
    assert!(p.fe.features().contains(V::RING_PACKED));
    p.fe.start().unwrap();
    p.drive();
    assert!(p.be.ring(0).is_some());
    assert_eq!(serve(&mut p, 0, 1), 3);
    assert_eq!(d.harvest_all(&p.be.mem).unwrap().len(), 3);
    d.post(&p.be.mem, &[Buf::writable(0x9000, 16)]).unwrap();
    d.post(&p.be.mem, &[Buf::writable(0x9100, 16)]).unwrap();
    p.take_events();
    assert_eq!(stop(&mut p, 2), [2]);
    // 5 avail and 5 used, both wrap counters still 1.
    let base = 5 | 5 << 16 | wrap;
    assert_eq!(
        p.take_events(),
        [Event::RingStopped { queue: 0, base }, Event::Stopped]
    );
    assert_eq!(d.harvest_all(&p.be.mem).unwrap().len(), 2);

    // Posted while stopped, and enough later to wrap the 8-entry ring.
    d.post(&p.be.mem, &[Buf::writable(0xa000, 16)]).unwrap();
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
    assert_eq!(serve(&mut p, 0, 3), 1);
    assert_eq!(p.be.mem.read_vec(0xa000, 16).unwrap(), [3; 16]);
    for i in 0..4 {
        d.post(&p.be.mem, &[Buf::writable(0xb000 + 0x100 * i, 16)])
            .unwrap();
    }
    assert_eq!(serve(&mut p, 0, 4), 4);
    assert_eq!(d.harvest_all(&p.be.mem).unwrap().len(), 5);
    p.take_events();
    stop(&mut p, 0);
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
    let spec = RingSpec::split(16, 0x1000);
    let cfg = fe_config(
        P::MQ | P::REPLY_ACK | P::STATUS,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[spec.queue(0)],
        &[region(0, MIB)],
    );
    let mut bc = backend_config(P::empty());
    bc.features = V::VERSION_1;
    let mut p = pair_with(bc, cfg, &ram);
    let mut d = SplitDriver::new(&p.be.mem, 16, 0x1000, false).unwrap();
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
    assert_eq!(p.be.session.processing(0), Processing::Normal);
    d.post(&p.be.mem, &[Buf::writable(0x8000, 4)]).unwrap();
    assert_eq!(serve(&mut p, 0, 9), 1);
    p.take_events();
    p.sent.clear();
    assert_eq!(stop(&mut p, 0), [0]);
    assert_eq!(p.codes(), [(C::GetVringBase, false)]);
    assert_eq!(
        p.take_events(),
        [Event::RingStopped { queue: 0, base: 1 }, Event::Stopped]
    );
}

#[test]
fn polling_kick_and_call() {
    let ram = [(0, MIB)];
    let spec = RingSpec::split(16, 0x1000);
    let mut q = spec.queue(0);
    q.kick = NotifyMode::Polling;
    q.call = NotifyMode::Polling;
    let cfg = fe_config(
        P::REPLY_ACK,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[q],
        &[region(0, MIB)],
    );
    let mut p = pair(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    let mut d = SplitDriver::new(&p.be.mem, 16, 0x1000, false).unwrap();
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
    d.post(&p.be.mem, &[Buf::writable(0x8000, 4)]).unwrap();
    assert_eq!(serve(&mut p, 0, 5), 1);
    assert_eq!(d.harvest_all(&p.be.mem).unwrap().len(), 1);
}

#[test]
fn probe_reads_offer_and_config() {
    let mut p = pair(
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
    // RESET_DEVICE), minus the back-end channel a probe does not have.
    assert_eq!(
        p.fe.protocol_features(),
        (SUPPORTED_PROTOCOL_FEATURES & vhost_user_core::frontend::SUPPORTED_PROTOCOL_FEATURES)
            .difference(P::BACKEND_REQ | P::INBAND_NOTIFICATIONS)
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
    // A range past the config space is refused before anything is sent,
    // and the session goes on (the same error in a reply would end it).
    let e = p.fe.read_config(250, 16).unwrap_err();
    assert_eq!(
        e,
        FrontendError::BadConfigRange {
            offset: 250,
            len: 16
        }
    );
    assert!(!e.is_fatal());
    assert_eq!(p.fe.state(), State::Ready);
    assert!(p.fe.is_idle());
    // A probe has nothing to start.
    assert_eq!(p.fe.start(), Err(FrontendError::NoQueues));
    assert_eq!(p.fe.stop(), Err(FrontendError::WrongState(State::Ready)));
}

#[test]
fn read_config_needs_config_negotiated() {
    let mut p = pair(P::MQ, FrontendConfig::probe(), &[(0, MIB)]);
    p.drive();
    assert_eq!(
        p.fe.read_config(0, 4),
        Err(FrontendError::NotNegotiated(C::GetConfig))
    );
}

/// Two split rings of 16 in 1 MiB, MQ, REPLY_ACK and CONFIG; not driven.
fn two_queue_pair() -> Pair {
    let ram = [(0, MIB)];
    let s0 = RingSpec::split(16, 0x1000);
    let s1 = RingSpec::split(16, 0x2000);
    let cfg = fe_config(
        P::MQ | P::REPLY_ACK | P::CONFIG,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[s0.queue(0), s1.queue(0)],
        &[region(0, MIB)],
    );
    let p = pair(SUPPORTED_PROTOCOL_FEATURES, cfg, &ram);
    SplitDriver::new(&p.be.mem, 16, 0x1000, false).unwrap();
    SplitDriver::new(&p.be.mem, 16, 0x2000, false).unwrap();
    p
}

/// Runs the init (and the start if `start`) up to the reply to the first
/// `code`, and returns the pair and the back-end's genuine reply, not yet
/// delivered.
fn held_reply(code: C, start: bool) -> (Pair, Vec<u8>) {
    let mut p = two_queue_pair();
    p.hold_at = Some(code);
    p.drive();
    if start && p.held_reply.is_none() {
        p.fe.start().unwrap();
        p.drive();
    }
    let r = p.held_reply.take().expect("reply held");
    (p, r)
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
        p.deliver(&r, 0),
        Err(FrontendError::Wire(WireError::ReplyMismatch {
            expected: 1,
            got: 15
        }))
    );
    assert_eq!(p.fe.state(), State::Failed);
    assert_eq!(p.deliver(&r, 0), Err(FrontendError::Failed));
    assert_eq!(p.fe.start(), Err(FrontendError::Failed));

    // NEED_REPLY left set in the reply (flags 0xd).
    let (mut p, mut r) = held_reply(C::GetProtocolFeatures, false);
    set_u32(&mut r, 4, 0xd);
    assert_eq!(
        p.deliver(&r, 0),
        Err(FrontendError::Wire(WireError::BadReplyFlags(0xd)))
    );

    // Wrong size: 4 bytes for a u64.
    let (mut p, mut r) = held_reply(C::GetQueueNum, false);
    set_u32(&mut r, 8, 4);
    assert_eq!(
        p.deliver(&r[..HEADER_SIZE + 4], 0),
        Err(FrontendError::Wire(WireError::BadSize {
            request: 17,
            size: 4
        }))
    );

    // An fd with a reply that allows none.
    let (mut p, r) = held_reply(C::GetFeatures, false);
    assert_eq!(
        p.deliver(&r, 1),
        Err(FrontendError::Wire(WireError::TooManyFds {
            allowed: 0,
            got: 1
        }))
    );

    // GET_QUEUE_NUM below the two queues configured.
    let (mut p, mut r) = held_reply(C::GetQueueNum, false);
    r[HEADER_SIZE..].copy_from_slice(&1u64.to_ne_bytes());
    assert_eq!(
        p.deliver(&r, 0),
        Err(FrontendError::TooFewQueues {
            needed: 2,
            offered: 1
        })
    );

    // A failed ack names the request.
    let (mut p, mut r) = held_reply(C::SetVringEnable, true);
    r[HEADER_SIZE..].copy_from_slice(&1u64.to_ne_bytes());
    assert_eq!(
        p.deliver(&r, 0),
        Err(FrontendError::Nack {
            request: C::SetVringEnable,
            value: 1
        })
    );
}

#[test]
fn reply_when_none_is_awaited() {
    let (mut p, r) = held_reply(C::GetFeatures, false);
    p.deliver(&r, 0).unwrap();
    // The same reply again: GET_PROTOCOL_FEATURES is not even sent yet.
    assert!(!p.fe.awaits_reply());
    assert_eq!(
        p.deliver(&r, 0),
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
        // The back-end stops ring 0 for GET_VRING_BASE; its reply is held.
        p.hold_at = Some(C::GetVringBase);
        p.fe.stop().unwrap();
        p.drive();
        assert_eq!(p.be.stops.last().unwrap().queue, 0);
        assert!(p.held_reply.is_some());
        assert!(p.fe.awaits_reply());
        let mut out = [0u8; 64];
        let n = WireReply::VringState { index, num }
            .encode(C::GetVringBase, &mut out)
            .unwrap();
        assert_eq!(p.deliver(&out[..n], 0), Err(err));
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
        let r = p.held_reply.take().unwrap();
        (p, r)
    };
    // Offset 1 instead of 0, same length.
    set_u32(&mut r, HEADER_SIZE, 1);
    assert_eq!(
        p.deliver(&r, 0),
        Err(FrontendError::ConfigMismatch { offset: 1, len: 8 })
    );
}

#[test]
fn second_get_features_must_agree() {
    let mut p = two_queue_pair();
    // Hold the first GET_FEATURES reply, deliver it, hold the second.
    p.hold_at = Some(C::GetFeatures);
    p.drive();
    let first = p.held_reply.take().unwrap();
    p.deliver(&first, 0).unwrap();
    p.drive();
    assert_eq!(p.sent.last().unwrap().code, C::GetFeatures);
    assert_eq!(p.sent[p.sent.len() - 2].code, C::SetOwner);
    let mut r = p.held_reply.take().unwrap();
    r[HEADER_SIZE..].copy_from_slice(&V::VERSION_1.bits().to_ne_bytes());
    assert!(matches!(
        p.deliver(&r, 0),
        Err(FrontendError::FeaturesChanged { .. })
    ));
}

#[test]
fn inflight_area_is_asked_once_and_handed_over_at_every_start() {
    let s0 = RingSpec::split(16, 0x1000);
    let protocol = P::MQ | P::REPLY_ACK | P::INFLIGHT_SHMFD;
    let cfg = fe_config(
        protocol,
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        &[s0.queue(0)],
        &[region(0, MIB)],
    );
    let mut p = pair(protocol, cfg.clone(), &[(0, MIB)]);
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
    stop(&mut p, 0);
    p.sent.clear();
    p.fe.start().unwrap();
    p.drive();
    let codes: Vec<C> = p.sent.iter().map(|s| s.code).collect();
    assert!(!codes.contains(&C::GetInflightFd), "{codes:?}");
    assert!(codes.contains(&C::SetInflightFd), "{codes:?}");

    // A new connection given the area (a reconnect) never asks for one.
    let mut again = cfg;
    again.inflight = Some(area);
    let mut p = pair(protocol, again, &[(0, MIB)]);
    p.drive();
    p.fe.start().unwrap();
    p.drive();
    let codes: Vec<C> = p.sent.iter().map(|s| s.code).collect();
    assert!(!codes.contains(&C::GetInflightFd), "{codes:?}");
    assert!(codes.contains(&C::SetInflightFd), "{codes:?}");
}

#[test]
fn suspending_stop_uses_bit_20_or_message_45() {
    let s0 = RingSpec::split(16, 0x1000);
    let run = |protocol: P| -> Result<Vec<C>, FrontendError> {
        let cfg = fe_config(
            protocol,
            V::VERSION_1 | V::PROTOCOL_FEATURES,
            &[s0.queue(0)],
            &[region(0, MIB)],
        );
        let mut p = pair(protocol, cfg, &[(0, MIB)]);
        p.drive();
        p.fe.start().unwrap();
        p.drive();
        p.sent.clear();
        p.fe.stop_suspending()?;
        p.drive();
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

//! Device state transfer (DEVICE_STATE, SET_DEVICE_STATE_FD and
//! CHECK_DEVICE_STATE) in the back-end session, over the in-memory pair:
//! offered only when the configuration asks; a transfer only while the
//! device is suspended (every ring stopped), one at a time, each ended by
//! CHECK_DEVICE_STATE with what the adapter reports; the reply's error
//! and no-fd bits; no ring starts while a transfer is unchecked.

#![allow(clippy::unwrap_used)]

use vhost_user_core::backend::{
    Action, BackendConfig, BackendError, Outcome, SUPPORTED_PROTOCOL_FEATURES,
};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_core::message::{
    DeviceStateDirection as Dir, FrontendReq, Header, Request, VringFdMsg, VringStateMsg,
    WireError, HEADER_SIZE,
};
use vhost_user_test::{region, Backend, Pair, RingSpec, TestDevice};

const RAM: u64 = 1 << 20;

fn config(protocol: P) -> BackendConfig {
    BackendConfig {
        features: V::VERSION_1 | V::PROTOCOL_FEATURES,
        protocol_features: protocol,
        num_queues: 1,
        max_queue_size: 64,
    }
}

/// A running ring started by the front-end engine, then DEVICE_STATE
/// negotiated on top of what the engine acked.
fn running() -> Pair<TestDevice, 1, 8> {
    let be = Backend::new(
        config(SUPPORTED_PROTOCOL_FEATURES),
        TestDevice::default(),
        &[(0, RAM)],
    )
    .unwrap();
    let ring = RingSpec::split(16, 0x1000);
    let mut fc = FrontendConfig::new(V::VERSION_1 | V::PROTOCOL_FEATURES, P::MQ | P::REPLY_ACK);
    fc.queues.push(ring.queue(0)).unwrap();
    fc.regions.push(region(0, RAM)).unwrap();
    let mut p = Pair::new(be, fc).unwrap();
    ring.lay_out(&p.be.mem).unwrap();
    p.drive();
    p.start().unwrap();
    assert!(p.be.ring(0).is_some());
    let (_, ack) = p.be.ack(Request::SetProtocolFeatures(
        (P::MQ | P::REPLY_ACK | P::DEVICE_STATE).bits(),
    ));
    assert_eq!(ack, 0);
    p
}

fn u64_of(reply: &[u8]) -> u64 {
    assert_eq!(reply.len(), HEADER_SIZE + 8, "a u64 reply");
    let h = Header::parse(reply).unwrap();
    assert_eq!(h.flags.bits(), 0x5, "version 1 | REPLY");
    u64::from_le_bytes(reply[HEADER_SIZE..].try_into().unwrap())
}

fn transfer(be: &mut Backend<TestDevice, 1, 8>, dir: Dir) -> (Outcome, u64) {
    let (o, reply) = be.send(&Request::SetDeviceStateFd(dir), false).unwrap();
    (o, u64_of(&reply))
}

fn transfers(o: &Outcome) -> Vec<Dir> {
    o.actions
        .iter()
        .filter_map(|a| match a {
            Action::TransferState { fd: 0, direction } => Some(*direction),
            _ => None,
        })
        .collect()
}

/// Stops ring 0 with GET_VRING_BASE (the device is then suspended).
fn stop(be: &mut Backend<TestDevice, 1, 8>) {
    let (_, reply) = be.send(&Request::GetVringBase(0), false).unwrap();
    assert!(reply.is_empty(), "the stop waits for the ring");
    be.finish_stop(0).unwrap();
    assert!(be.ring(0).is_none());
}

fn kick(be: &mut Backend<TestDevice, 1, 8>) -> u64 {
    be.ack(Request::SetVringKick(VringFdMsg {
        index: 0,
        no_fd: true,
    }))
    .1
}

#[test]
fn device_state_is_offered_only_when_the_configuration_asks() {
    let mut be = Backend::<TestDevice, 1, 8>::new(
        config(P::MQ | P::REPLY_ACK),
        TestDevice::default(),
        &[(0, RAM)],
    )
    .unwrap();
    let offered = be.u64_reply(Request::GetProtocolFeatures);
    assert_eq!(offered & P::DEVICE_STATE.bits(), 0);
    be.ack(Request::SetProtocolFeatures((P::MQ | P::REPLY_ACK).bits()));
    let e = be
        .send(&Request::SetDeviceStateFd(Dir::Save), false)
        .unwrap_err();
    assert_eq!(
        e,
        BackendError::NotNegotiated(FrontendReq::SetDeviceStateFd)
    );
    let e = be.send(&Request::CheckDeviceState, false).unwrap_err();
    assert_eq!(
        e,
        BackendError::NotNegotiated(FrontendReq::CheckDeviceState)
    );

    let mut be = Backend::<TestDevice, 1, 8>::new(
        config(P::MQ | P::REPLY_ACK | P::DEVICE_STATE),
        TestDevice::default(),
        &[(0, RAM)],
    )
    .unwrap();
    let offered = be.u64_reply(Request::GetProtocolFeatures);
    assert_ne!(offered & P::DEVICE_STATE.bits(), 0);
}

#[test]
fn a_transfer_while_a_ring_runs_is_refused_with_an_error_and_no_fd() {
    let mut p = running();
    let (o, v) = transfer(&mut p.be, Dir::Save);
    assert_eq!(v, 0x101, "error 1, bit 8: no fd");
    assert_eq!(o.refused, Some(BackendError::NotSuspended));
    assert!(transfers(&o).is_empty());
    assert!(p.be.transfers.is_empty());
    // Nothing to check, and the ring still runs.
    let (o, reply) = p.be.send(&Request::CheckDeviceState, false).unwrap();
    assert_eq!(u64_of(&reply), 1);
    assert_eq!(o.refused, Some(BackendError::NoTransfer));
    assert!(p.be.ring(0).is_some());
}

#[test]
fn save_then_load_each_ended_by_check_device_state() {
    let mut p = running();
    stop(&mut p.be);
    let (o, v) = transfer(&mut p.be, Dir::Save);
    assert_eq!(v, 0x100, "success, no fd of the back-end's");
    assert_eq!(o.refused, None);
    assert_eq!(transfers(&o), [Dir::Save]);
    assert_eq!(p.be.session.transfer(), Some(Dir::Save));

    // A second transfer before CHECK_DEVICE_STATE is refused.
    let (o, v) = transfer(&mut p.be, Dir::Load);
    assert_eq!(v, 0x101);
    assert_eq!(o.refused, Some(BackendError::TransferPending));
    assert!(transfers(&o).is_empty());
    // So is a ring start: the device stays suspended.
    assert_ne!(kick(&mut p.be), 0);
    assert!(p.be.ring(0).is_none());

    // CHECK waits for the adapter's word; a failed transfer answers 1.
    let (_, reply) = p.be.send(&Request::CheckDeviceState, false).unwrap();
    assert!(
        reply.is_empty(),
        "CHECK_DEVICE_STATE waits for the transfer"
    );
    assert!(p.be.check_pending);
    assert_eq!(u64_of(&p.be.finish_transfer(false).unwrap()), 1);
    assert_eq!(p.be.session.transfer(), None);
    // Reported twice: refused.
    assert_eq!(
        p.be.finish_transfer(true).unwrap_err(),
        BackendError::NoTransfer
    );

    // A new transfer may follow; this one goes well.
    let (o, v) = transfer(&mut p.be, Dir::Load);
    assert_eq!(v, 0x100);
    assert_eq!(transfers(&o), [Dir::Load]);
    let (_, reply) = p.be.send(&Request::CheckDeviceState, false).unwrap();
    assert!(reply.is_empty());
    assert_eq!(u64_of(&p.be.finish_transfer(true).unwrap()), 0);
    assert_eq!(p.be.transfers, [Dir::Save, Dir::Load]);

    // Checked: the ring starts again.
    assert_eq!(kick(&mut p.be), 0);
    assert!(p.be.ring(0).is_some());
}

#[test]
fn reset_device_forgets_an_unchecked_transfer() {
    let mut p = running();
    stop(&mut p.be);
    transfer(&mut p.be, Dir::Save);
    let (_, ack) = p.be.ack(Request::SetProtocolFeatures(
        (P::MQ | P::REPLY_ACK | P::DEVICE_STATE | P::RESET_DEVICE).bits(),
    ));
    assert_eq!(ack, 0);
    p.be.send(&Request::ResetDevice, false).unwrap();
    assert_eq!(p.be.session.transfer(), None);
    let (_, v) = transfer(&mut p.be, Dir::Load);
    assert_eq!(v, 0x100);
}

#[test]
fn a_transfer_phase_other_than_stopped_ends_the_connection() {
    let mut p = running();
    stop(&mut p.be);
    // SET_DEVICE_STATE_FD, 8 bytes: direction 0 (save), phase 1.
    let mut msg = vec![42, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0];
    msg.extend_from_slice(&0u32.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    let e = p.be.send_raw(&msg, 1).unwrap_err();
    assert_eq!(e, BackendError::Wire(WireError::BadValue(1)));
    assert!(p.be.transfers.is_empty());
    // A base for the next start is still accepted (the session goes on
    // in the in-memory pair; a Linux adapter would end the connection).
    p.be.send(
        &Request::SetVringBase(VringStateMsg { index: 0, num: 0 }),
        false,
    )
    .unwrap();
}

/// The front-end engine's side: with DEVICE_STATE negotiated, a save
/// after the stop and a load into a prepared (memory and no ring) device,
/// each checked; refused by the engine itself while the rings run.
#[test]
fn the_front_end_engine_saves_and_loads_around_a_stop() {
    use vhost_user_core::frontend::{Event, FrontendError, State};
    let be = Backend::new(
        config(SUPPORTED_PROTOCOL_FEATURES),
        TestDevice::default(),
        &[(0, RAM)],
    )
    .unwrap();
    let ring = RingSpec::split(16, 0x1000);
    let mut fc: FrontendConfig<1, 8> = FrontendConfig::new(
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        P::MQ | P::REPLY_ACK | P::DEVICE_STATE,
    );
    fc.queues.push(ring.queue(0)).unwrap();
    fc.regions.push(region(0, RAM)).unwrap();
    let mut p = Pair::new(be, fc).unwrap();
    ring.lay_out(&p.be.mem).unwrap();
    p.drive();
    assert!(p.fe.protocol_features().contains(P::DEVICE_STATE));
    p.start().unwrap();
    assert_eq!(
        p.fe.transfer_state(Dir::Save),
        Err(FrontendError::WrongState(State::Started))
    );
    p.stop().unwrap();
    p.take_events();

    p.fe.transfer_state(Dir::Save).unwrap();
    p.drive();
    assert_eq!(
        p.take_events(),
        [Event::StateTransfer {
            direction: Dir::Save,
            backend_fd: false
        }]
    );
    let sent = p.sent.last().unwrap();
    assert_eq!(sent.code, FrontendReq::SetDeviceStateFd);
    p.fe.check_state().unwrap();
    p.drive();
    assert_eq!(p.take_events(), [Event::StateChecked]);

    // A destination: the base of the source, the memory, no ring; load;
    // then the start.
    p.fe.set_ring_base(0, 0).unwrap();
    p.fe.prepare().unwrap();
    p.drive();
    assert!(p.be.ring(0).is_none(), "prepare starts no ring");
    assert_eq!(p.fe.state(), State::Stopped);
    p.fe.transfer_state(Dir::Load).unwrap();
    p.drive();
    p.fe.check_state().unwrap();
    p.drive();
    assert_eq!(p.be.transfers, [Dir::Save, Dir::Load]);
    p.start().unwrap();
    assert!(p.be.ring(0).is_some());
    // A base no split ring has is refused.
    p.stop().unwrap();
    assert!(p.fe.set_ring_base(0, 1 << 16).is_err());
}

/// A started and stopped engine with DEVICE_STATE, over the pair.
fn stopped_engine() -> Pair<TestDevice, 1, 8> {
    let be = Backend::new(
        config(SUPPORTED_PROTOCOL_FEATURES),
        TestDevice::default(),
        &[(0, RAM)],
    )
    .unwrap();
    let ring = RingSpec::split(16, 0x1000);
    let mut fc: FrontendConfig<1, 8> = FrontendConfig::new(
        V::VERSION_1 | V::PROTOCOL_FEATURES,
        P::MQ | P::REPLY_ACK | P::DEVICE_STATE,
    );
    fc.queues.push(ring.queue(0)).unwrap();
    fc.regions.push(region(0, RAM)).unwrap();
    let mut p = Pair::new(be, fc).unwrap();
    ring.lay_out(&p.be.mem).unwrap();
    p.drive();
    p.start().unwrap();
    p.stop().unwrap();
    p
}

fn reply_u64(code: FrontendReq, v: u64) -> Vec<u8> {
    let mut out = [0u8; HEADER_SIZE + 8];
    let n = vhost_user_core::message::Reply::encode_u64(code, v, &mut out).unwrap();
    out[..n].to_vec()
}

/// Error bits in SET_DEVICE_STATE_FD's reply, or a failed
/// CHECK_DEVICE_STATE: refused with the value, and the session goes on
/// (a source whose save failed starts its device again, as after a
/// failed migration; the transfer can be tried again); an fd with an
/// error is malformed, and fatal.
#[test]
fn a_refused_or_failed_transfer_leaves_the_front_end_engine_going() {
    use vhost_user_core::frontend::{Event, FrontendError, State};
    let code = FrontendReq::SetDeviceStateFd;
    let mut p = stopped_engine();
    p.take_events();
    p.hold_at = Some(code);
    p.fe.transfer_state(Dir::Save).unwrap();
    p.drive();
    let e = p.deliver(&reply_u64(code, 0x101), 0).unwrap_err();
    assert_eq!(
        e,
        FrontendError::StateRefused {
            request: code,
            value: 1
        }
    );
    assert!(!e.is_fatal());
    assert_eq!(p.fe.state(), State::Stopped);
    assert!(p.fe.is_idle() && !p.fe.awaits_reply());
    assert_eq!(p.take_events(), []);
    // The back-end took the message (the refusal was forged in place of
    // its reply, which is dropped): it drops the transfer, as one that
    // refused never had it.
    p.held_reply = None;
    let mut buf = [0u8; HEADER_SIZE + 8];
    p.be.session.finish_transfer(false, &mut buf).unwrap();
    // The device starts again, and a later save goes through.
    p.hold_at = None;
    p.start().unwrap();
    assert!(p.be.ring(0).is_some());
    p.stop().unwrap();
    p.take_events();
    p.fe.transfer_state(Dir::Save).unwrap();
    p.drive();
    p.fe.check_state().unwrap();
    p.drive();
    assert_eq!(
        p.take_events(),
        [
            Event::StateTransfer {
                direction: Dir::Save,
                backend_fd: false
            },
            Event::StateChecked
        ]
    );

    let mut p = stopped_engine();
    p.hold_at = Some(code);
    p.fe.transfer_state(Dir::Load).unwrap();
    p.drive();
    // Error 1 without bit 8 says an fd comes with it: never both.
    assert!(p.deliver(&reply_u64(code, 0x1), 1).is_err());
    assert_eq!(p.fe.state(), State::Failed);

    let check = FrontendReq::CheckDeviceState;
    let mut p = stopped_engine();
    p.fe.transfer_state(Dir::Save).unwrap();
    p.drive();
    p.hold_at = Some(check);
    p.fe.check_state().unwrap();
    p.drive();
    assert_eq!(
        p.deliver(&reply_u64(check, 1), 0),
        Err(FrontendError::StateRefused {
            request: check,
            value: 1
        })
    );
    assert_eq!(p.fe.state(), State::Stopped);
    assert!(p.fe.is_idle());
    assert!(!p.take_events().contains(&Event::StateChecked));
    // A destination may try another state: the next transfer is taken.
    p.held_reply = None;
    p.hold_at = None;
    p.fe.transfer_state(Dir::Load).unwrap();
    p.drive();
    p.fe.check_state().unwrap();
    p.drive();
    assert_eq!(p.be.transfers, [Dir::Save, Dir::Load]);
    assert_eq!(p.take_events().last(), Some(&Event::StateChecked));
}

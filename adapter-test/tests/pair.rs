//! The pair itself: the front-end engine against the back-end host, the
//! worker steps, out-of-order and later completions, stops that drain or
//! suspend, a back-end killed and restarted over the same inflight area,
//! hand-written messages, and determinism.

#![allow(clippy::unwrap_used)]

use vhost_user_core::backend::{BackendConfig, BackendError, SUPPORTED_PROTOCOL_FEATURES};
use vhost_user_core::dataplane::DataPlaneError;
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{Event, FrontendConfig};
use vhost_user_core::inflight::InflightError;
use vhost_user_core::message::{FrontendReq as C, InflightMsg, Request, VringFdMsg, WireError};
use vhost_user_test::pair::{DriveError, RingStop};
use vhost_user_test::{region, Backend, Buf, GuestRing, Pair, RingSpec, TestDevice};

const MIB: u64 = 1 << 20;

fn backend_config(protocol: P) -> BackendConfig {
    BackendConfig {
        features: V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED,
        protocol_features: protocol,
        num_queues: 1,
        max_queue_size: 64,
    }
}

/// One ring of 16 at 0x1000, split or packed, in 1 MiB of RAM; the
/// front-end wants `protocol`, the back-end offers everything. Driven
/// through the init; not started.
fn pair(packed: bool, protocol: P) -> (Pair<TestDevice, 1, 8>, GuestRing) {
    let be = Backend::new(
        backend_config(SUPPORTED_PROTOCOL_FEATURES),
        TestDevice::default(),
        &[(0, MIB)],
    )
    .unwrap();
    let (ring, features) = if packed {
        let f = V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED;
        (RingSpec::packed(16, 0x1000), f)
    } else {
        (
            RingSpec::split(16, 0x1000),
            V::VERSION_1 | V::PROTOCOL_FEATURES,
        )
    };
    let base = if packed { 1 << 15 | 1 << 31 } else { 0 };
    let mut fc = FrontendConfig::new(features, protocol);
    fc.queues.push(ring.queue(base)).unwrap();
    fc.regions.push(region(0, MIB)).unwrap();
    let mut p = Pair::new(be, fc).unwrap();
    let guest = ring.lay_out(&p.be.mem).unwrap();
    p.drive();
    (p, guest)
}

/// Posts one 4-byte writable buffer per address.
fn post(p: &Pair<TestDevice, 1, 8>, guest: &mut GuestRing, at: &[u64]) -> Vec<u16> {
    at.iter()
        .map(|&a| guest.post(&p.be.mem, &[Buf::writable(a, 4)]).unwrap())
        .collect()
}

fn used_ids(p: &Pair<TestDevice, 1, 8>, guest: &mut GuestRing) -> Vec<u16> {
    let used = guest.harvest_all(&p.be.mem).unwrap();
    used.iter().map(|u| u.id).collect()
}

#[test]
fn start_serve_stop_on_split_and_packed_rings() {
    for packed in [false, true] {
        let (mut p, mut guest) = pair(packed, P::MQ | P::REPLY_ACK);
        assert!(matches!(p.take_events()[..], [Event::Negotiated { .. }]));
        assert_eq!(p.be.serve(0), Err(DataPlaneError::Stopped));
        p.start().unwrap();
        assert_eq!(p.take_events().last(), Some(&Event::Started));
        let ids = post(&p, &mut guest, &[0x8000, 0x8010]);
        p.be.device.fill = 0x5a;
        assert_eq!(p.be.serve(0).unwrap(), 2);
        assert_eq!(p.be.calls(0), 1, "one publish, one notification");
        assert_eq!(used_ids(&p, &mut guest), ids);
        assert_eq!(p.be.mem.read_vec(0x8010, 4).unwrap(), [0x5a; 4]);
        // Nothing outstanding: the stop drains nothing.
        assert_eq!(p.stop().unwrap(), [0]);
        let base = if packed {
            2 | 1 << 15 | 2 << 16 | 1 << 31
        } else {
            2
        };
        assert_eq!(
            p.be.stops,
            [RingStop {
                queue: 0,
                base,
                drained: 0,
                suspend: false
            }]
        );
        assert_eq!(
            p.take_events(),
            [Event::RingStopped { queue: 0, base }, Event::Stopped]
        );
        assert!(p.be.ring(0).is_none());
    }
}

#[test]
fn held_requests_complete_in_any_order_and_the_rest_drain_at_the_stop() {
    for packed in [false, true] {
        let (mut p, mut guest) = pair(packed, P::MQ | P::REPLY_ACK);
        p.start().unwrap();
        let ids = post(&p, &mut guest, &[0x8000, 0x8010, 0x8020]);
        assert_eq!(p.be.take(0).unwrap(), 3);
        let held: Vec<u16> = p.be.held(0).iter().map(|h| h.token.id()).collect();
        assert_eq!(held, ids);
        assert!(used_ids(&p, &mut guest).is_empty());
        // The third, then the first.
        p.be.device.fill = 1;
        assert_eq!(p.be.complete_held(0, &[2, 0]).unwrap(), 2);
        assert_eq!(used_ids(&p, &mut guest), [ids[2], ids[0]]);
        assert_eq!(p.be.held(0).len(), 1);
        // The stop waits for the one still held.
        p.be.device.fill = 2;
        assert_eq!(p.stop().unwrap(), [1]);
        assert_eq!(used_ids(&p, &mut guest), [ids[1]]);
        assert_eq!(p.be.mem.read_vec(0x8010, 4).unwrap(), [2; 4]);
        assert_eq!(p.be.mem.read_vec(0x8020, 4).unwrap(), [1; 4]);
    }
}

#[test]
#[should_panic(expected = "no held request 1")]
fn a_held_request_is_completed_once() {
    let (mut p, mut guest) = pair(false, P::MQ | P::REPLY_ACK);
    p.start().unwrap();
    post(&p, &mut guest, &[0x8000, 0x8010]);
    p.be.take(0).unwrap();
    let _ = p.be.complete_held(0, &[1, 1]);
}

#[test]
fn a_device_completing_later_is_polled() {
    for packed in [false, true] {
        let (mut p, mut guest) = pair(packed, P::MQ | P::REPLY_ACK);
        p.be.device.later = true;
        p.start().unwrap();
        let ids = post(&p, &mut guest, &[0x8000, 0x8010, 0x8020]);
        assert_eq!(p.be.serve(0).unwrap(), 3);
        let mut reversed = ids.clone();
        reversed.reverse();
        assert_eq!(used_ids(&p, &mut guest), reversed);
        // Held requests handed over at the stop complete through poll too.
        let ids = post(&p, &mut guest, &[0x9000, 0x9010]);
        p.be.take(0).unwrap();
        assert_eq!(p.stop().unwrap(), [2]);
        assert_eq!(used_ids(&p, &mut guest), [ids[1], ids[0]]);
    }
}

#[test]
fn a_killed_backend_resubmits_what_was_in_flight_after_the_restart() {
    for packed in [false, true] {
        let (mut p, mut guest) = pair(packed, P::MQ | P::REPLY_ACK | P::INFLIGHT_SHMFD);
        p.start().unwrap();
        assert!(p.be.ring(0).unwrap().tracked());
        let ids = post(&p, &mut guest, &[0x8000, 0x8010]);
        assert_eq!(p.be.take(0).unwrap(), 2);
        // The back-end dies with both requests in flight.
        p.restart().unwrap();
        assert!(p.be.ring(0).is_none() && p.be.area.is_some());
        p.sent.clear();
        p.drive();
        p.start().unwrap();
        let codes: Vec<C> = p.sent.iter().map(|s| s.code).collect();
        assert!(!codes.contains(&C::GetInflightFd), "{codes:?}");
        assert!(codes.contains(&C::SetInflightFd), "{codes:?}");
        assert_eq!(p.be.ring(0).unwrap().resubmits_left(), 2);
        let later = post(&p, &mut guest, &[0x8020]);
        p.be.device.fill = 7;
        assert_eq!(p.be.serve(0).unwrap(), 3);
        assert_eq!(used_ids(&p, &mut guest), [ids[0], ids[1], later[0]]);
        assert_eq!(p.be.mem.read_vec(0x8000, 4).unwrap(), [7; 4]);
    }
}

#[test]
fn a_suspending_stop_leaves_the_requests_recorded() {
    let protocol = P::MQ | P::REPLY_ACK | P::INFLIGHT_SHMFD | P::GET_VRING_BASE_INFLIGHT;
    let (mut p, mut guest) = pair(false, protocol);
    p.start().unwrap();
    let ids = post(&p, &mut guest, &[0x8000, 0x8010]);
    p.be.take(0).unwrap();
    p.fe.stop_suspending().unwrap();
    p.drive();
    let stop = p.be.stops[0];
    assert!(stop.suspend);
    // Nothing drained; the base is past the two, which the area keeps.
    assert_eq!((stop.drained, stop.base), (0, 2));
    assert!(used_ids(&p, &mut guest).is_empty());
    // The next start hands them out again, first.
    p.start().unwrap();
    assert_eq!(p.be.serve(0).unwrap(), 2);
    assert_eq!(used_ids(&p, &mut guest), ids);
}

#[test]
fn a_held_reply_is_delivered_by_hand() {
    let (mut p, _) = pair(false, P::MQ | P::REPLY_ACK);
    p.hold_at = Some(C::GetVringBase);
    p.start().unwrap();
    p.fe.stop().unwrap();
    p.drive();
    let reply = p.held_reply.take().unwrap();
    assert!(p.fe.awaits_reply());
    assert_eq!(p.be.stops.len(), 1, "the back-end stopped the ring");
    p.deliver(&reply, 0).unwrap();
    p.hold_at = None;
    p.drive();
    assert_eq!(p.take_events().last(), Some(&Event::Stopped));
}

#[test]
fn hand_written_messages_reach_the_session() {
    let mut be = Backend::<_, 1, 8>::new(
        backend_config(SUPPORTED_PROTOCOL_FEATURES),
        TestDevice::default(),
        &[(0, MIB)],
    )
    .unwrap();
    assert_eq!(
        be.send_raw(&[1, 0, 0], 0).err(),
        Some(BackendError::Wire(WireError::Truncated {
            needed: 12,
            got: 3
        }))
    );
    let kick = Request::SetVringKick(VringFdMsg {
        index: 0,
        no_fd: false,
    });
    assert_eq!(
        be.send(&kick, false).err(),
        Some(BackendError::RingNotConfigured(0))
    );
    let offered = be.u64_reply(Request::GetProtocolFeatures);
    be.send(&Request::SetProtocolFeatures(offered), false)
        .unwrap();
    // An inflight area far too large for the test host is refused.
    let huge = InflightMsg {
        mmap_size: 1 << 40,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 16,
    };
    assert_eq!(
        be.send(&Request::SetInflightFd(huge), false).err(),
        Some(BackendError::Inflight(InflightError::TooSmall))
    );
    let (o, v) = be.ack(Request::SetVringNum(
        vhost_user_core::message::VringStateMsg { index: 0, num: 128 },
    ));
    assert_eq!((v, o.refused), (1, Some(BackendError::QueueSize(128))));
}

#[test]
fn the_same_script_sends_the_same_bytes() {
    let run = || {
        let (mut p, mut guest) = pair(true, P::MQ | P::REPLY_ACK | P::INFLIGHT_SHMFD);
        p.start().unwrap();
        post(&p, &mut guest, &[0x8000, 0x8010]);
        p.be.take(0).unwrap();
        p.stop().unwrap();
        let bytes: Vec<Vec<u8>> = p.sent.iter().map(|s| s.bytes.clone()).collect();
        (bytes, p.events, p.be.stops)
    };
    assert_eq!(run(), run());
}

#[test]
fn a_refusal_stops_the_drive() {
    // The back-end offers a smaller ring than the front-end sets.
    let be = Backend::<_, 1, 8>::new(
        BackendConfig {
            max_queue_size: 8,
            ..backend_config(SUPPORTED_PROTOCOL_FEATURES)
        },
        TestDevice::default(),
        &[(0, MIB)],
    )
    .unwrap();
    let mut fc = FrontendConfig::new(V::VERSION_1 | V::PROTOCOL_FEATURES, P::MQ);
    fc.queues
        .push(RingSpec::split(16, 0x1000).queue(0))
        .unwrap();
    fc.regions.push(region(0, MIB)).unwrap();
    let mut p = Pair::new(be, fc).unwrap();
    p.drive();
    assert_eq!(
        p.start(),
        Err(DriveError::Backend(BackendError::QueueSize(16)))
    );
    assert_eq!(p.sent.last().unwrap().code, C::SetVringNum);
}

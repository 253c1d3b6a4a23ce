//! In-band notifications and the back-end channel over the in-memory pair:
//! a whole session with no fds but the memory regions' (rings started and
//! kicked with VRING_KICK, calls and errors as back-end messages), the
//! config-change message, and the refusals when the features are missing.

#![allow(clippy::unwrap_used)]

use vhost_user_core::backend::{
    BackendConfig, BackendError, Channel, ChannelError, SUPPORTED_PROTOCOL_FEATURES,
};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{BackendNotice, Event, FdRef, FrontendConfig, NotifyMode};
use vhost_user_core::message::{BackendReq, FrontendReq as C, Request};
use vhost_user_test::pair::DriveError;
use vhost_user_test::{region, Backend, Buf, GuestRing, Pair, RingSpec, TestDevice};

const MIB: u64 = 1 << 20;
const INBAND: P = P::REPLY_ACK
    .union(P::BACKEND_REQ)
    .union(P::INBAND_NOTIFICATIONS)
    .union(P::CONFIG);

fn pair(packed: bool, protocol: P, mode: NotifyMode) -> (Pair<TestDevice, 1, 8>, GuestRing) {
    let config = BackendConfig {
        features: V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED,
        protocol_features: SUPPORTED_PROTOCOL_FEATURES,
        num_queues: 1,
        max_queue_size: 64,
    };
    let be = Backend::new(config, TestDevice::default(), &[(0, MIB)]).unwrap();
    let (ring, features, base) = if packed {
        let f = V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED;
        (RingSpec::packed(16, 0x1000), f, 1 << 15 | 1 << 31)
    } else {
        let f = V::VERSION_1 | V::PROTOCOL_FEATURES;
        (RingSpec::split(16, 0x1000), f, 0)
    };
    let mut fc = FrontendConfig::new(features, protocol);
    let mut q = ring.queue(base);
    q.kick = mode;
    q.call = mode;
    fc.queues.push(q).unwrap();
    fc.regions.push(region(0, MIB)).unwrap();
    let mut p = Pair::new(be, fc).unwrap();
    let guest = ring.lay_out(&p.be.mem).unwrap();
    p.drive();
    (p, guest)
}

#[test]
fn a_whole_session_runs_on_in_band_notifications_without_eventfds() {
    for packed in [false, true] {
        let (mut p, mut guest) = pair(packed, INBAND, NotifyMode::InBand);
        assert!(p.be.channel.is_some(), "SET_BACKEND_REQ_FD kept");
        p.start().unwrap();
        assert_eq!(p.take_events().last(), Some(&Event::Started));
        // Started by VRING_KICK; SET_VRING_KICK never sent; the only fds
        // are the memory region's and the back-end channel.
        let codes: Vec<C> = p.sent.iter().map(|s| s.code).collect();
        assert!(codes.contains(&C::VringKick), "{codes:?}");
        assert!(!codes.contains(&C::SetVringKick), "{codes:?}");
        for s in &p.sent {
            for f in &s.fds {
                assert!(
                    matches!(f, FdRef::Region(_) | FdRef::BackendChannel),
                    "{:?} carried {f:?}",
                    s.code
                );
            }
        }
        assert!(p.be.session.call_in_band(0));

        for round in 1..=3u32 {
            guest.post(&p.be.mem, &[Buf::writable(0x8000, 4)]).unwrap();
            // An in-band kick of the running ring: acked, reaches the worker.
            p.fe.kick(0).unwrap();
            p.drive();
            assert_eq!(p.be.kicks[0], round);
            assert_eq!(p.be.serve(0).unwrap(), 1);
            assert_eq!(p.be.outbox.len(), 1, "one BACKEND_VRING_CALL");
            p.deliver_backend().unwrap();
            assert_eq!(p.notices.last(), Some(&BackendNotice::Call(0)));
            assert_eq!(guest.harvest(&p.be.mem).unwrap().unwrap().len, 4);
        }
        assert_eq!(p.notices.len(), 3);
        // Each call was acked: the channel is free for the next.
        assert_eq!(p.be.channel.unwrap().awaiting(), None);

        p.be.config_changed();
        p.deliver_backend().unwrap();
        assert_eq!(p.notices.last(), Some(&BackendNotice::ConfigChanged));

        assert_eq!(p.stop().unwrap(), [0]);
        // Restarted in-band again.
        p.start().unwrap();
        assert_eq!(p.take_events().last(), Some(&Event::Started));
        assert_eq!(
            p.sent.iter().filter(|s| s.code == C::VringKick).count(),
            5,
            "start, three kicks, restart"
        );
    }
}

#[test]
fn a_ring_broken_by_the_guest_is_reported_in_band_once() {
    let (mut p, guest) = pair(false, INBAND, NotifyMode::InBand);
    p.start().unwrap();
    let GuestRing::Split(mut d) = guest else {
        unreachable!()
    };
    // A head index beyond the ring: a guest bug the ring cannot serve.
    d.push_head(&p.be.mem, 99).unwrap();
    d.publish(&p.be.mem).unwrap();
    assert!(p.be.serve(0).is_err());
    assert!(p.be.serve(0).is_err(), "still broken");
    assert_eq!(p.be.errors[0], 1);
    p.deliver_backend().unwrap();
    assert_eq!(p.notices, [BackendNotice::RingError(0)]);
}

#[test]
fn eventfds_take_precedence_over_in_band_notifications() {
    let (mut p, mut guest) = pair(false, INBAND, NotifyMode::Eventfd);
    p.start().unwrap();
    assert!(!p.be.session.call_in_band(0));
    // No SET_VRING_ERR was sent (no err eventfd): errors go in-band.
    assert!(p.be.session.err_in_band(0));
    guest.post(&p.be.mem, &[Buf::writable(0x8000, 4)]).unwrap();
    assert_eq!(p.be.serve(0).unwrap(), 1);
    assert_eq!(p.be.calls(0), 1);
    assert!(p.be.outbox.is_empty(), "the call went to the eventfd");
    // A front-end that kicks by eventfd cannot kick in-band.
    assert!(p.fe.kick(0).is_err());
}

#[test]
fn in_band_notifications_need_their_feature() {
    // The front-end refuses in-band rings without the feature.
    let (mut p, _) = pair(false, P::REPLY_ACK | P::BACKEND_REQ, NotifyMode::InBand);
    assert!(matches!(
        p.start(),
        Err(DriveError::Frontend(vhost_user_core::frontend::FrontendError::Unsupported(b)))
            if b == P::INBAND_NOTIFICATIONS.bits()
    ));
    // The back-end refuses VRING_KICK without it (a failed ack here).
    let (o, ack) = p.be.ack(Request::VringKick(0));
    assert_ne!(ack, 0);
    assert!(matches!(
        o.refused,
        Some(BackendError::NotNegotiated(C::VringKick))
    ));
    // Its channel sends no in-band message, nor a config change without
    // CONFIG.
    let mut ch = p.be.session.channel().unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        ch.vring_call(0, &mut buf),
        Err(ChannelError::NotNegotiated(BackendReq::VringCall))
    );
    assert_eq!(
        ch.config_change(&mut buf),
        Err(ChannelError::NotNegotiated(BackendReq::ConfigChangeMsg))
    );
    // And without SET_BACKEND_REQ_FD there is no channel at all.
    let (p2, _) = pair(false, P::REPLY_ACK, NotifyMode::Eventfd);
    assert!(p2.be.session.channel().is_none());
}

#[test]
fn the_channel_waits_for_each_ack_and_checks_it() {
    let mut ch = Channel::new(INBAND);
    let mut buf = [0u8; 64];
    let sent = ch.vring_call(3, &mut buf).unwrap();
    assert!(sent.awaits_reply);
    assert_eq!(ch.vring_err(3, &mut buf), Err(ChannelError::Busy));
    // A reply to another request is malformed; the channel is free again.
    let mut reply = [0u8; 64];
    let n = vhost_user_core::message::BackendRequest::encode_reply(
        BackendReq::ConfigChangeMsg,
        0,
        &mut reply,
    )
    .unwrap();
    let h = vhost_user_core::message::Header::parse(&reply[..n]).unwrap();
    assert!(matches!(
        ch.reply(&h, &reply[12..n], 0),
        Err(ChannelError::Wire(_))
    ));
    assert_eq!(
        ch.reply(&h, &reply[12..n], 0),
        Err(ChannelError::Unexpected)
    );
    // A failed ack is reported with its value.
    ch.config_change(&mut buf).unwrap();
    let n = vhost_user_core::message::BackendRequest::encode_reply(
        BackendReq::ConfigChangeMsg,
        7,
        &mut reply,
    )
    .unwrap();
    let h = vhost_user_core::message::Header::parse(&reply[..n]).unwrap();
    assert_eq!(ch.reply(&h, &reply[12..n], 0), Err(ChannelError::Failed(7)));
    // Without REPLY_ACK nothing is awaited.
    let mut quiet = Channel::new(P::BACKEND_REQ | P::CONFIG);
    assert!(!quiet.config_change(&mut buf).unwrap().awaits_reply);
    assert!(quiet.config_change(&mut buf).is_ok());
}

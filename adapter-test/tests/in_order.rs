//! VIRTIO_F_IN_ORDER through the session: negotiated by the front-end
//! engine, turned on by `start_ring`, completions held until those before
//! them are done, and a back-end killed with completions held resubmits
//! them after the restart (split and packed).

#![allow(clippy::unwrap_used)]

use vhost_user_core::backend::{BackendConfig, SUPPORTED_PROTOCOL_FEATURES};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_test::{region, Backend, Buf, GuestRing, Pair, RingSpec, TestDevice};

const MIB: u64 = 1 << 20;

/// One ring of 16 at 0x1000; the back-end offers IN_ORDER, the front-end
/// wants it if `in_order`.
fn pair(packed: bool, in_order: bool, protocol: P) -> (Pair<TestDevice, 1, 8>, GuestRing) {
    let config = BackendConfig {
        features: V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED | V::IN_ORDER,
        protocol_features: SUPPORTED_PROTOCOL_FEATURES,
        num_queues: 1,
        max_queue_size: 64,
    };
    let be = Backend::new(config, TestDevice::default(), &[(0, MIB)]).unwrap();
    let mut features = V::VERSION_1 | V::PROTOCOL_FEATURES;
    if in_order {
        features |= V::IN_ORDER;
    }
    let (ring, base) = if packed {
        features |= V::RING_PACKED;
        (RingSpec::packed(16, 0x1000), 1 << 15 | 1 << 31)
    } else {
        (RingSpec::split(16, 0x1000), 0)
    };
    let mut fc = FrontendConfig::new(features, protocol);
    let _ = fc.queues.push(ring.queue(base));
    let _ = fc.regions.push(region(0, MIB));
    let mut p = Pair::new(be, fc).unwrap();
    let mut guest = ring.lay_out(&p.be.mem).unwrap();
    if in_order {
        match &mut guest {
            GuestRing::Split(d) => d.set_in_order(),
            GuestRing::Packed(d) => d.set_in_order(),
        }
    }
    p.drive();
    (p, guest)
}

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
fn negotiated_in_order_holds_early_completions() {
    for packed in [false, true] {
        let (mut p, mut guest) = pair(packed, true, P::MQ | P::REPLY_ACK);
        assert!(p.fe.features().contains(V::IN_ORDER));
        p.start().unwrap();
        assert!(p.be.ring(0).unwrap().in_order());
        let ids = post(&p, &mut guest, &[0x8000, 0x8010, 0x8020]);
        assert_eq!(p.be.take(0).unwrap(), 3);
        // The third and the first: only the first reaches the guest.
        p.be.device.fill = 1;
        p.be.complete_held(0, &[2, 0]).unwrap();
        assert_eq!(used_ids(&p, &mut guest), [ids[0]], "packed {packed}");
        // The second brings the third.
        p.be.complete_held(0, &[0]).unwrap();
        assert_eq!(used_ids(&p, &mut guest), [ids[1], ids[2]]);
        assert_eq!(p.stop().unwrap(), [0]);
    }
}

#[test]
fn without_the_front_end_asking_the_ring_completes_in_any_order() {
    for packed in [false, true] {
        let (mut p, mut guest) = pair(packed, false, P::MQ | P::REPLY_ACK);
        assert!(!p.fe.features().contains(V::IN_ORDER));
        p.start().unwrap();
        assert!(!p.be.ring(0).unwrap().in_order());
        let ids = post(&p, &mut guest, &[0x8000, 0x8010]);
        p.be.take(0).unwrap();
        p.be.complete_held(0, &[1]).unwrap();
        assert_eq!(used_ids(&p, &mut guest), [ids[1]]);
        p.be.complete_held(0, &[0]).unwrap();
        assert_eq!(used_ids(&p, &mut guest), [ids[0]]);
    }
}

/// Killed with the second request completed but held behind the first:
/// the guest saw neither, so the restart resubmits both, in order.
#[test]
fn a_backend_killed_with_a_held_completion_resubmits_it() {
    for packed in [false, true] {
        let (mut p, mut guest) = pair(packed, true, P::MQ | P::REPLY_ACK | P::INFLIGHT_SHMFD);
        p.start().unwrap();
        let ids = post(&p, &mut guest, &[0x8000, 0x8010, 0x8020]);
        assert_eq!(p.be.take(0).unwrap(), 3);
        p.be.complete_held(0, &[1]).unwrap();
        assert!(used_ids(&p, &mut guest).is_empty());
        p.restart().unwrap();
        p.drive();
        p.start().unwrap();
        assert!(p.be.ring(0).unwrap().in_order());
        assert_eq!(p.be.ring(0).unwrap().resubmits_left(), 3, "packed {packed}");
        p.be.device.fill = 9;
        assert_eq!(p.be.serve(0).unwrap(), 3);
        assert_eq!(used_ids(&p, &mut guest), ids, "each once, in order");
        assert_eq!(p.be.mem.read_vec(0x8010, 4).unwrap(), [9; 4]);
    }
}

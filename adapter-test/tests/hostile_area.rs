//! An inflight area whose recorded state cannot be recovered is refused
//! before the ring starts (the adapter ends the connection), split and
//! packed: header fields, the last batch's links, entry flags, and packed
//! requests whose descriptor links leave the area or do not end where the
//! request says. The same area, repaired, starts and resubmits.

#![allow(clippy::unwrap_used)]

use vhost_user_core::backend::{BackendConfig, BackendError, SUPPORTED_PROTOCOL_FEATURES};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_core::inflight::InflightError;
use vhost_user_core::memory::GuestMemory;
use vhost_user_test::pair::DriveError;
use vhost_user_test::{region, Backend, Buf, Pair, RingSpec, TestDevice};

const MIB: u64 = 1 << 20;

/// A pair whose back-end died with two requests in flight, reconnected and
/// negotiated again, not started.
fn crashed(packed: bool) -> Pair<TestDevice, 1, 8> {
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
    let mut fc = FrontendConfig::new(features, P::MQ | P::REPLY_ACK | P::INFLIGHT_SHMFD);
    fc.queues.push(ring.queue(base)).unwrap();
    fc.regions.push(region(0, MIB)).unwrap();
    let mut p = Pair::new(be, fc).unwrap();
    let mut guest = ring.lay_out(&p.be.mem).unwrap();
    p.drive();
    p.start().unwrap();
    for a in [0x8000, 0x8010] {
        guest.post(&p.be.mem, &[Buf::writable(a, 4)]).unwrap();
    }
    assert_eq!(p.be.take(0).unwrap(), 2);
    p.restart().unwrap();
    p.drive();
    p.sent.clear();
    p
}

fn refused(p: &mut Pair<TestDevice, 1, 8>) -> InflightError {
    match p.start() {
        Err(DriveError::Backend(BackendError::Inflight(e))) => {
            assert!(p.be.ring(0).is_none(), "the ring did not start");
            e
        }
        other => panic!("the area was taken: {other:?}"),
    }
}

#[test]
fn split_area_fields_are_checked_before_the_ring_starts() {
    // (field offset, value, what recovery must say)
    type Check = fn(&InflightError) -> bool;
    let cases: [(u64, u16, Check); 4] = [
        (8, 9, |e| matches!(e, InflightError::Version(9))),
        (10, 32, |e| matches!(e, InflightError::SizeMismatch { .. })),
        (14, 0x100, |e| matches!(e, InflightError::UsedIndex { .. })),
        // One batch published but not recorded, whose head is beyond the
        // ring.
        (14, 0xffff, |e| matches!(e, InflightError::OutOfRange(_))),
    ];
    for (at, v, check) in cases {
        let mut p = crashed(false);
        let area = p.be.area.as_ref().unwrap();
        area.write_u16(at, v).unwrap();
        if v == 0xffff {
            area.write_u16(12, 99).unwrap();
        }
        let e = refused(&mut p);
        assert!(check(&e), "offset {at} = {v:#x}: {e:?}");
    }
    // A flag neither 0 nor 1.
    let mut p = crashed(false);
    p.be.area
        .as_ref()
        .unwrap()
        .write(16 + 5 * 16, &[3])
        .unwrap();
    assert_eq!(refused(&mut p), InflightError::BadFlag(5));
}

#[test]
fn packed_requests_whose_links_are_broken_are_refused() {
    // Entry 0 is the first request's head (one descriptor, last = 0).
    const E0: u64 = 32;
    // Two descriptors, the second link past the area's entries.
    let mut p = crashed(true);
    let area = p.be.area.as_ref().unwrap();
    area.write_u16(E0 + 6, 2).unwrap();
    area.write_u16(E0 + 2, 16).unwrap();
    assert!(matches!(refused(&mut p), InflightError::OutOfRange(16)));
    // Two descriptors whose chain does not end at the recorded last one.
    let mut p = crashed(true);
    let area = p.be.area.as_ref().unwrap();
    area.write_u16(E0 + 6, 2).unwrap();
    area.write_u16(E0 + 2, 7).unwrap();
    assert!(matches!(refused(&mut p), InflightError::OutOfRange(_)));
    // A count of zero.
    let mut p = crashed(true);
    p.be.area.as_ref().unwrap().write_u16(E0 + 6, 0).unwrap();
    assert!(matches!(refused(&mut p), InflightError::BadCount(0)));
}

#[test]
fn an_intact_area_still_starts_and_resubmits() {
    for packed in [false, true] {
        let mut p = crashed(packed);
        p.start().unwrap();
        assert_eq!(p.be.ring(0).unwrap().resubmits_left(), 2);
        assert_eq!(p.be.serve(0).unwrap(), 2);
    }
}

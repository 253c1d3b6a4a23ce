//! The data plane in memory: out-of-order completion, batching, inflight
//! recovery after a crash at any point, drain and suspend, ring states and
//! the errors a caller or a guest can cause, on split and packed rings.

#![allow(clippy::unwrap_used)]

use vhost_user_core::dataplane::{
    DataPlane, DataPlaneError, Published, Stop, Token, PUBLISH_BATCH,
};
use vhost_user_core::feature::VirtioFeatures as V;
use vhost_user_core::inflight::{queue_stride, InflightError};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::vring::{Chain, Queue, VringError};
use vhost_user_test::{Buf, PackedDriver, SplitDriver, TestMemory};

const QS: u16 = 32;
const RING: u64 = 0x1000;
const BUFS: u64 = 0x10000;

/// The guest's side of one ring, either layout.
enum Drv {
    Split(SplitDriver),
    Packed(PackedDriver),
}

impl Drv {
    fn post(&mut self, m: &TestMemory, bufs: &[Buf]) -> u16 {
        match self {
            Drv::Split(d) => d.post(m, bufs).unwrap(),
            Drv::Packed(d) => d.post(m, bufs).unwrap(),
        }
    }

    /// Ids of the used entries the guest sees, in ring order.
    fn harvest(&mut self, m: &TestMemory) -> Vec<(u16, u32)> {
        let v = match self {
            Drv::Split(d) => d.harvest_all(m).unwrap(),
            Drv::Packed(d) => d.harvest_all(m).unwrap(),
        };
        v.into_iter().map(|u| (u.id, u.len)).collect()
    }
}

struct Rig {
    mem: TestMemory,
    area: TestMemory,
    drv: Drv,
    packed: bool,
    tracked: bool,
}

impl Rig {
    fn new(packed: bool, tracked: bool) -> Rig {
        let mem = TestMemory::new(&[(0, 1 << 20)]).unwrap();
        let drv = if packed {
            Drv::Packed(PackedDriver::new(&mem, QS, RING).unwrap())
        } else {
            Drv::Split(SplitDriver::new(&mem, QS, RING, false).unwrap())
        };
        let area = TestMemory::new(&[(0, queue_stride(QS))]).unwrap();
        Rig {
            mem,
            area,
            drv,
            packed,
            tracked,
        }
    }

    fn queue(&self, base: u32) -> Queue {
        let (addrs, mut f) = match &self.drv {
            Drv::Split(d) => (d.addrs(), V::VERSION_1),
            Drv::Packed(d) => (d.addrs(), V::VERSION_1 | V::RING_PACKED),
        };
        f |= V::INDIRECT_DESC;
        let mut q = Queue::new(QS, addrs, f).unwrap();
        q.set_base(base).unwrap();
        if let Queue::Split(s) = &mut q {
            s.sync_used(&self.mem).unwrap();
        }
        q
    }

    fn base0(&self) -> u32 {
        if self.packed {
            1 << 15 | 1 << 31
        } else {
            0
        }
    }

    /// A data plane started on the ring at `base` (with the area if
    /// tracked), as the session builds it at SET_VRING_KICK.
    fn start(&self, base: u32) -> DataPlane {
        let area = self.tracked.then_some((&self.area, 0));
        DataPlane::start(self.queue(base), true, false, &self.mem, area)
    }

    fn area(&self) -> Option<&TestMemory> {
        self.tracked.then_some(&self.area)
    }

    /// Posts `n` one-buffer requests; buffer `i` is 16 writable bytes.
    fn post(&mut self, first: u64, n: u64) -> Vec<u16> {
        (first..first + n)
            .map(|i| {
                let b = Buf::writable(BUFS + 0x100 * i, 16);
                self.drv.post(&self.mem, &[b])
            })
            .collect()
    }

    fn pop(&self, dp: &mut DataPlane) -> Option<(Token, u64)> {
        let mut c: Chain = Chain::new();
        dp.pop(&self.mem, self.area(), &mut c)
            .unwrap()
            .map(|t| (t, c.writable()[0].addr))
    }

    /// Completes a request the way a device would: fills its buffer with
    /// `fill` and reports 16 bytes written.
    fn complete(&self, dp: &mut DataPlane, (t, addr): (Token, u64), fill: u8) -> Published {
        self.mem.write(addr, &[fill; 16]).unwrap();
        dp.complete(&self.mem, self.area(), t, 16).unwrap()
    }

    fn publish(&self, dp: &mut DataPlane) -> Published {
        dp.publish(&self.mem, self.area()).unwrap()
    }

    fn stop(&self, dp: &mut DataPlane, suspend: bool) -> Stop {
        let (s, p) = dp.stop(&self.mem, self.area(), suspend);
        p.unwrap();
        s
    }
}

fn layouts() -> [(bool, bool); 4] {
    [(false, false), (false, true), (true, false), (true, true)]
}

#[test]
fn completions_in_any_order_reach_the_guest_in_completion_order() {
    for (packed, tracked) in layouts() {
        let mut r = Rig::new(packed, tracked);
        let ids = r.post(0, 3);
        let mut dp = r.start(r.base0());
        let a = r.pop(&mut dp).unwrap();
        let b = r.pop(&mut dp).unwrap();
        let c = r.pop(&mut dp).unwrap();
        assert!(r.pop(&mut dp).is_none());
        assert_eq!([a.0.id(), b.0.id(), c.0.id()], [ids[0], ids[1], ids[2]]);
        assert_eq!(dp.outstanding(), 3);
        // The last one first: it does not wait for the slowest.
        r.complete(&mut dp, c, 3);
        assert_eq!(r.publish(&mut dp), Published::Notify);
        assert_eq!(r.drv.harvest(&r.mem), [(ids[2], 16)], "{packed} {tracked}");
        // Nothing waiting: a publish does nothing.
        assert_eq!(r.publish(&mut dp), Published::Nothing);
        // Then two in one batch, in reverse order.
        r.complete(&mut dp, b, 2);
        r.complete(&mut dp, a, 1);
        assert_eq!(
            r.drv.harvest(&r.mem),
            [],
            "unpublished entries are not seen"
        );
        assert_eq!(r.publish(&mut dp), Published::Notify);
        assert_eq!(r.drv.harvest(&r.mem), [(ids[1], 16), (ids[0], 16)]);
        assert_eq!(dp.outstanding(), 0);
        for (i, fill) in [1u8, 2, 3].iter().enumerate() {
            let got = r.mem.read_vec(BUFS + 0x100 * i as u64, 16).unwrap();
            assert_eq!(got, [*fill; 16]);
        }
    }
}

#[test]
fn a_tracked_ring_publishes_by_itself_when_its_batch_is_full() {
    for packed in [false, true] {
        let mut r = Rig::new(packed, true);
        let n = PUBLISH_BATCH as u64 + 2;
        r.post(0, n);
        let mut dp = r.start(r.base0());
        let taken: Vec<_> = (0..n).map(|_| r.pop(&mut dp).unwrap()).collect();
        let mut published = Vec::new();
        for t in taken {
            published.push(r.complete(&mut dp, t, 7));
        }
        // The completion after a full batch published the batch first.
        let auto: Vec<_> = published
            .iter()
            .enumerate()
            .filter(|(_, p)| **p != Published::Nothing)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(auto, [PUBLISH_BATCH]);
        assert_eq!(r.drv.harvest(&r.mem).len(), PUBLISH_BATCH);
        assert_eq!(r.publish(&mut dp), Published::Notify);
        assert_eq!(r.drv.harvest(&r.mem).len(), 2);
    }
}

#[test]
fn an_untracked_ring_batches_without_bound() {
    let mut r = Rig::new(false, false);
    r.post(0, 30);
    let mut dp = r.start(0);
    while let Some(t) = r.pop(&mut dp) {
        assert_eq!(r.complete(&mut dp, t, 1), Published::Nothing);
    }
    assert_eq!(r.drv.harvest(&r.mem), []);
    assert_eq!(r.publish(&mut dp), Published::Notify);
    assert_eq!(r.drv.harvest(&r.mem).len(), 30);
}

/// A crash (the data plane dropped) with requests fetched, some completed
/// and published, some completed but unpublished, and some not completed:
/// the restart resubmits exactly those the guest has not seen, in fetch
/// order, before any new request, and positions the ring after them.
#[test]
fn a_restart_resubmits_what_the_guest_has_not_seen_in_fetch_order() {
    for packed in [false, true] {
        let mut r = Rig::new(packed, true);
        let ids = r.post(0, 5);
        let mut dp = r.start(r.base0());
        let t: Vec<_> = (0..5).map(|_| r.pop(&mut dp).unwrap()).collect();
        // 1 and 3 reach the guest; 4 is completed but never published;
        // 0 and 2 are in progress.
        r.complete(&mut dp, t[3], 3);
        r.complete(&mut dp, t[1], 1);
        r.publish(&mut dp);
        r.complete(&mut dp, t[4], 4);
        let seen = r.drv.harvest(&r.mem);
        assert_eq!(seen, [(ids[3], 16), (ids[1], 16)]);
        drop(dp);
        // A new request posted while the back-end was down.
        let late = r.post(5, 1);

        let mut dp = r.start(r.base0());
        assert_eq!(dp.error(), None);
        assert_eq!(dp.resubmits_left(), 3);
        let again: Vec<_> = (0..3).map(|_| r.pop(&mut dp).unwrap()).collect();
        let got: Vec<u16> = again.iter().map(|(t, _)| t.id()).collect();
        assert_eq!(got, [ids[0], ids[2], ids[4]], "fetch order ({packed})");
        assert!(again.iter().all(|(t, _)| t.side_effects()));
        // Then the ring goes on with what is new.
        let next = r.pop(&mut dp).unwrap();
        assert_eq!(next.0.id(), late[0]);
        for t in again.into_iter().chain([next]) {
            r.complete(&mut dp, t, 9);
        }
        r.publish(&mut dp);
        let mut rest: Vec<u16> = r.drv.harvest(&r.mem).iter().map(|u| u.0).collect();
        rest.sort_unstable();
        let mut want = vec![ids[0], ids[2], ids[4], late[0]];
        want.sort_unstable();
        assert_eq!(rest, want, "each request completes exactly once");
        // A second restart finds nothing in flight.
        drop(dp);
        let dp = r.start(r.base0());
        assert_eq!(dp.resubmits_left(), 0);
    }
}

#[test]
fn a_suspending_stop_leaves_outstanding_requests_recorded() {
    for packed in [false, true] {
        let mut r = Rig::new(packed, true);
        let ids = r.post(0, 3);
        let mut dp = r.start(r.base0());
        let a = r.pop(&mut dp).unwrap();
        let b = r.pop(&mut dp).unwrap();
        r.complete(&mut dp, a, 1);
        // The completion is published by the stop; b stays suspended; the
        // third request was never taken.
        let Stop::Stopped { base } = r.stop(&mut dp, true) else {
            panic!("a suspending stop does not wait")
        };
        assert_eq!(r.drv.harvest(&r.mem), [(ids[0], 16)]);
        let expect = if packed {
            2 | 1 << 15 | 1 << 16 | 1 << 31
        } else {
            2
        };
        assert_eq!(base, expect, "the base counts what was taken");
        assert_eq!(
            dp.complete(&r.mem, r.area(), b.0, 16),
            Err(DataPlaneError::Stopped),
            "a suspended request's token is void"
        );
        assert!(r.pop(&mut dp).is_none(), "a stopped ring is not touched");
        // The restart from that base resubmits b, then takes the third.
        let mut dp = r.start(base);
        assert_eq!(dp.resubmits_left(), 1);
        let b2 = r.pop(&mut dp).unwrap();
        assert_eq!(b2.0.id(), ids[1]);
        let c = r.pop(&mut dp).unwrap();
        assert_eq!(c.0.id(), ids[2]);
        r.complete(&mut dp, c, 3);
        r.complete(&mut dp, b2, 2);
        r.publish(&mut dp);
        assert_eq!(r.drv.harvest(&r.mem), [(ids[2], 16), (ids[1], 16)]);
    }
}

#[test]
fn a_draining_stop_waits_for_every_token_and_takes_nothing_new() {
    for (packed, tracked) in layouts() {
        let mut r = Rig::new(packed, tracked);
        r.post(0, 3);
        let mut dp = r.start(r.base0());
        let a = r.pop(&mut dp).unwrap();
        let b = r.pop(&mut dp).unwrap();
        assert_eq!(r.stop(&mut dp, false), Stop::Draining);
        // The third request stays in the ring.
        assert!(r.pop(&mut dp).is_none());
        r.complete(&mut dp, b, 2);
        assert_eq!(r.stop(&mut dp, false), Stop::Draining);
        r.complete(&mut dp, a, 1);
        let Stop::Stopped { base } = r.stop(&mut dp, false) else {
            panic!("drained")
        };
        assert_eq!(r.drv.harvest(&r.mem).len(), 2);
        let expect = if packed {
            2 | 1 << 15 | 2 << 16 | 1 << 31
        } else {
            2
        };
        assert_eq!(base, expect);
        // Asked again, the answer stays.
        assert_eq!(r.stop(&mut dp, false), Stop::Stopped { base });
        // Without an area, a suspending stop drains too.
        if !tracked {
            let mut dp = r.start(base);
            let c = r.pop(&mut dp).unwrap();
            assert_eq!(r.stop(&mut dp, true), Stop::Draining);
            r.complete(&mut dp, c, 3);
            assert!(matches!(r.stop(&mut dp, true), Stop::Stopped { .. }));
        }
    }
}

#[test]
fn a_draining_stop_hands_out_recorded_requests_first() {
    for packed in [false, true] {
        let mut r = Rig::new(packed, true);
        let ids = r.post(0, 2);
        let mut dp = r.start(r.base0());
        r.pop(&mut dp).unwrap();
        r.pop(&mut dp).unwrap();
        drop(dp);
        // The restarted ring is stopped before it resubmitted anything:
        // the drain hands both out, and only then is the ring stopped.
        let mut dp = r.start(r.base0());
        assert_eq!(r.stop(&mut dp, false), Stop::Draining);
        let a = r.pop(&mut dp).unwrap();
        let b = r.pop(&mut dp).unwrap();
        assert_eq!([a.0.id(), b.0.id()], [ids[0], ids[1]]);
        r.complete(&mut dp, a, 1);
        r.complete(&mut dp, b, 2);
        assert!(matches!(r.stop(&mut dp, false), Stop::Stopped { .. }));
        assert_eq!(r.drv.harvest(&r.mem).len(), 2);
    }
}

#[test]
fn a_disabled_ring_pauses_or_is_consumed_without_side_effects() {
    for packed in [false, true] {
        let mut r = Rig::new(packed, false);
        r.post(0, 2);
        let q = r.queue(r.base0());
        let mut dp = DataPlane::start(q, false, false, &r.mem, None);
        assert!(dp.paused());
        assert!(r.pop(&mut dp).is_none(), "paused");
        assert!(!dp.enable_notification(&r.mem).unwrap());
        dp.set_enabled(true);
        let t = r.pop(&mut dp).unwrap();
        assert!(t.0.side_effects());
        r.complete(&mut dp, t, 1);
        // A device that consumes a disabled ring gets requests without
        // side effects.
        let q = r.queue(if packed {
            1 | 1 << 15 | 1 << 16 | 1 << 31
        } else {
            1
        });
        let mut dp = DataPlane::start(q, false, true, &r.mem, None);
        assert!(!dp.paused());
        let t = r.pop(&mut dp).unwrap();
        assert!(!t.0.side_effects());
    }
}

#[test]
fn a_broken_chain_breaks_the_ring_until_it_is_restarted() {
    let mut r = Rig::new(false, true);
    let Drv::Split(d) = &mut r.drv else {
        unreachable!()
    };
    // A head out of range.
    d.push_head(&r.mem, QS + 3).unwrap();
    d.publish(&r.mem).unwrap();
    let mut dp = r.start(0);
    let mut c: Chain = Chain::new();
    let e = Err(DataPlaneError::Vring(VringError::HeadOutOfRange(QS + 3)));
    assert_eq!(dp.pop(&r.mem, r.area(), &mut c), e);
    assert_eq!(dp.pop(&r.mem, r.area(), &mut c), e, "it stays broken");
    assert_eq!(dp.error(), e.err());
    assert!(dp.paused());
    // The stop answers at once, at the position before the bad chain.
    assert_eq!(r.stop(&mut dp, false), Stop::Stopped { base: 0 });
}

#[test]
fn caller_mistakes_are_typed_errors() {
    let mut r = Rig::new(false, true);
    r.post(0, 1);
    let mut dp = r.start(0);
    let mut c: Chain = Chain::new();
    // A tracked ring needs its area.
    assert_eq!(
        dp.pop::<TestMemory, 64>(&r.mem, None, &mut c),
        Err(DataPlaneError::NoInflightArea)
    );
    let t = r.pop(&mut dp).unwrap();
    r.complete(&mut dp, t, 1);
    // Completing more than was handed out.
    assert_eq!(
        dp.complete(&r.mem, r.area(), t.0, 16),
        Err(DataPlaneError::NotOutstanding)
    );
    assert_eq!(
        dp.error(),
        None,
        "a caller's mistake does not break the ring"
    );
}

#[test]
fn a_hostile_area_breaks_the_ring_at_start() {
    let mut r = Rig::new(false, true);
    r.post(0, 1);
    let mut dp = r.start(0);
    r.pop(&mut dp).unwrap();
    drop(dp);
    // Version 1, desc_num wrong for the ring.
    r.area.write_u16(10, QS + 1).unwrap();
    let mut dp = r.start(0);
    let e = Some(DataPlaneError::Inflight(InflightError::SizeMismatch {
        area: QS + 1,
        ring: QS,
    }));
    assert_eq!(dp.error(), e);
    let mut c: Chain = Chain::new();
    assert_eq!(dp.pop(&r.mem, r.area(), &mut c).err(), e);
    assert!(matches!(r.stop(&mut dp, true), Stop::Stopped { .. }));
}

#[test]
fn notification_suppression_is_returned_as_a_value() {
    let mut r = Rig::new(false, false);
    r.post(0, 2);
    let mut dp = r.start(0);
    let Drv::Split(d) = &mut r.drv else {
        unreachable!()
    };
    d.set_avail_flags(&r.mem, 1).unwrap();
    let t = r.pop(&mut dp).unwrap();
    r.complete(&mut dp, t, 1);
    assert_eq!(r.publish(&mut dp), Published::Suppressed);
    let Drv::Split(d) = &mut r.drv else {
        unreachable!()
    };
    d.set_avail_flags(&r.mem, 0).unwrap();
    let t = r.pop(&mut dp).unwrap();
    assert_eq!(
        r.complete(&mut dp, t, 1) | r.publish(&mut dp),
        Published::Notify
    );
}

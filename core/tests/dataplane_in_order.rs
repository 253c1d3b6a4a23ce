//! VIRTIO_F_IN_ORDER in the data plane, in memory, split and packed, with
//! and without an inflight area: completions that come out of order reach
//! the guest in pop order; runs of completions into read-only chains are
//! one used entry (split) or descriptor (packed) naming the run's last
//! buffer; the packed ring wraps with such runs; a crash or a suspending
//! stop in the middle of a held run loses nothing; a split driver that
//! breaks table order breaks the ring; the holding window is bounded.

#![cfg(feature = "in-order")]
#![allow(clippy::unwrap_used)]

use vhost_user_core::dataplane::{
    DataPlane, DataPlaneError, Published, Stop, Token, IN_ORDER_WINDOW,
};
use vhost_user_core::feature::VirtioFeatures as V;
use vhost_user_core::inflight::queue_stride;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::vring::packed::{DESC_F_AVAIL, DESC_F_USED};
use vhost_user_core::vring::{Chain, Queue, VringError};
use vhost_user_test::{Buf, PackedDriver, SplitDriver, TestMemory};

const RING: u64 = 0x1000;
const BUFS: u64 = 0x80000;

enum Drv {
    Split(SplitDriver),
    Packed(PackedDriver),
}

struct Rig {
    mem: TestMemory,
    area: TestMemory,
    drv: Drv,
    size: u16,
    packed: bool,
    tracked: bool,
}

impl Rig {
    fn new(size: u16, packed: bool, tracked: bool) -> Rig {
        let mem = TestMemory::new(&[(0, 1 << 22)]).unwrap();
        let drv = if packed {
            let mut d = PackedDriver::new(&mem, size, RING).unwrap();
            d.set_in_order();
            Drv::Packed(d)
        } else {
            let mut d = SplitDriver::new(&mem, size, RING, false).unwrap();
            d.set_in_order();
            Drv::Split(d)
        };
        let area = TestMemory::new(&[(0, queue_stride(size))]).unwrap();
        Rig {
            mem,
            area,
            drv,
            size,
            packed,
            tracked,
        }
    }

    fn base0(&self) -> u32 {
        if self.packed {
            1 << 15 | 1 << 31
        } else {
            0
        }
    }

    fn start(&self, base: u32) -> DataPlane {
        let (addrs, mut f) = match &self.drv {
            Drv::Split(d) => (d.addrs(), V::VERSION_1),
            Drv::Packed(d) => (d.addrs(), V::VERSION_1 | V::RING_PACKED),
        };
        f |= V::INDIRECT_DESC | V::IN_ORDER;
        let mut q = Queue::new(self.size, addrs, f).unwrap();
        q.set_base(base).unwrap();
        if let Queue::Split(s) = &mut q {
            s.sync_used(&self.mem).unwrap();
        }
        let area = self.tracked.then_some((&self.area, 0));
        let mut dp = DataPlane::start(q, true, false, &self.mem, area);
        dp.set_in_order();
        dp
    }

    fn area(&self) -> Option<&TestMemory> {
        self.tracked.then_some(&self.area)
    }

    /// Posts a request of `descs` buffers of 16 bytes (writable or not);
    /// returns its id.
    fn post(&mut self, i: u64, descs: u64, writable: bool) -> u16 {
        let bufs: Vec<Buf> = (0..descs)
            .map(|k| {
                let a = BUFS + 0x100 * (i % 1024) + 16 * k;
                if writable {
                    Buf::writable(a, 16)
                } else {
                    Buf::readable(a, 16)
                }
            })
            .collect();
        match &mut self.drv {
            Drv::Split(d) => d.post(&self.mem, &bufs).unwrap(),
            Drv::Packed(d) => d.post(&self.mem, &bufs).unwrap(),
        }
    }

    fn pop(&self, dp: &mut DataPlane) -> Option<Token> {
        let mut c: Chain = Chain::new();
        dp.pop(&self.mem, self.area(), &mut c).unwrap()
    }

    fn complete(&self, dp: &mut DataPlane, t: Token, len: u32) -> Published {
        dp.complete(&self.mem, self.area(), t, len).unwrap()
    }

    fn publish(&self, dp: &mut DataPlane) -> Published {
        dp.publish(&self.mem, self.area()).unwrap()
    }

    fn harvest(&mut self) -> Vec<(u16, u32)> {
        let v = match &mut self.drv {
            Drv::Split(d) => d.harvest_all(&self.mem).unwrap(),
            Drv::Packed(d) => d.harvest_all(&self.mem).unwrap(),
        };
        v.into_iter().map(|u| (u.id, u.len)).collect()
    }

    /// Split: used.idx and the used entry at position `i`.
    fn split_used(&self, i: u16) -> (u16, u16, u32) {
        let Drv::Split(d) = &self.drv else {
            unreachable!()
        };
        let dev = d.addrs().device;
        let idx = self.mem.read_u16(dev + 2).unwrap();
        let e = self
            .mem
            .read_vec(dev + 4 + 8 * u64::from(i % self.size), 8)
            .unwrap();
        let id = u16::from_le_bytes([e[0], e[1]]);
        let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        (idx, id, len)
    }

    /// Packed: the descriptor at `slot`: (id, len, flags).
    fn packed_desc(&self, slot: u16) -> (u16, u32, u16) {
        let Drv::Packed(d) = &self.drv else {
            unreachable!()
        };
        let e = self
            .mem
            .read_16(d.addrs().desc + 16 * u64::from(slot))
            .unwrap();
        (
            u16::from_le_bytes([e[12], e[13]]),
            u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
            u16::from_le_bytes([e[14], e[15]]),
        )
    }
}

fn layouts() -> [(bool, bool); 4] {
    [(false, false), (false, true), (true, false), (true, true)]
}

#[test]
fn out_of_order_completions_reach_the_guest_in_pop_order() {
    for (packed, tracked) in layouts() {
        let ctx = format!("packed {packed} tracked {tracked}");
        let mut r = Rig::new(32, packed, tracked);
        let ids: Vec<u16> = (0..4).map(|i| r.post(i, 1, true)).collect();
        let mut dp = r.start(r.base0());
        let t: Vec<Token> = (0..4).map(|_| r.pop(&mut dp).unwrap()).collect();
        // The last and the second finish first: held, nothing to publish.
        assert_eq!(r.complete(&mut dp, t[3], 13), Published::Nothing);
        assert_eq!(r.complete(&mut dp, t[1], 11), Published::Nothing);
        assert_eq!(r.publish(&mut dp), Published::Nothing, "{ctx}");
        assert_eq!(r.harvest(), [], "{ctx}");
        assert_eq!(dp.outstanding(), 2, "held completions are given back");
        // The oldest brings the second with it; the fourth waits for the
        // third.
        r.complete(&mut dp, t[0], 10);
        assert_eq!(r.publish(&mut dp), Published::Notify);
        assert_eq!(r.harvest(), [(ids[0], 10), (ids[1], 11)], "{ctx}");
        if !packed {
            // Chains with writable buffers: one used entry each.
            assert_eq!(r.split_used(0), (2, ids[0], 10));
            assert_eq!(r.split_used(1), (2, ids[1], 11));
        }
        r.complete(&mut dp, t[2], 12);
        r.publish(&mut dp);
        assert_eq!(r.harvest(), [(ids[2], 12), (ids[3], 13)], "{ctx}");
        assert_eq!(dp.outstanding(), 0);
        // A token given back twice is refused, held or not.
        assert_eq!(
            dp.complete(&r.mem, r.area(), t[2], 1),
            Err(DataPlaneError::NotOutstanding)
        );
    }
}

#[test]
fn a_run_of_read_only_completions_is_one_used_entry() {
    for (packed, tracked) in layouts() {
        let ctx = format!("packed {packed} tracked {tracked}");
        let mut r = Rig::new(32, packed, tracked);
        // Five transmit-like requests (nothing for the device to write),
        // then one with a writable buffer, then two read-only again.
        let mut ids: Vec<u16> = (0..5).map(|i| r.post(i, 1, false)).collect();
        ids.push(r.post(5, 1, true));
        ids.push(r.post(6, 1, false));
        ids.push(r.post(7, 1, false));
        let mut dp = r.start(r.base0());
        let t: Vec<Token> = (0..8).map(|_| r.pop(&mut dp).unwrap()).collect();
        for i in (0..8).rev() {
            let len = if i == 5 { 9 } else { 0 };
            r.complete(&mut dp, t[i], len);
        }
        assert_eq!(r.publish(&mut dp), Published::Notify);
        if packed {
            // Slot 0 names the run's last buffer, 4; slots 1..4 are not
            // marked used; 5 has its own; 6 names 7; 7 is skipped.
            let used = DESC_F_AVAIL | DESC_F_USED;
            assert_eq!(r.packed_desc(0), (ids[4], 0, used), "{ctx}");
            for s in 1..5 {
                assert_ne!(r.packed_desc(s).2 & DESC_F_USED, DESC_F_USED, "{ctx} {s}");
            }
            assert_eq!(r.packed_desc(5), (ids[5], 9, used));
            assert_eq!(r.packed_desc(6), (ids[7], 0, used));
            assert_ne!(r.packed_desc(7).2 & DESC_F_USED, DESC_F_USED);
        } else {
            // used.idx moved by all eight; entry 0 names the run's last
            // head, 5 its own, 6 names 7.
            assert_eq!(r.split_used(0), (8, ids[4], 0), "{ctx}");
            assert_eq!(r.split_used(5), (8, ids[5], 9));
            assert_eq!(r.split_used(6), (8, ids[7], 0));
        }
        let want: Vec<(u16, u32)> = (0..8)
            .map(|i| (ids[i], if i == 5 { 9 } else { 0 }))
            .collect();
        assert_eq!(r.harvest(), want, "{ctx}");
        // A read-only chain completed with a length is never elided.
        let a = r.post(8, 1, false);
        let b = r.post(9, 1, false);
        let ta = r.pop(&mut dp).unwrap();
        let tb = r.pop(&mut dp).unwrap();
        r.complete(&mut dp, ta, 0);
        r.complete(&mut dp, tb, 3);
        r.publish(&mut dp);
        if !packed {
            assert_eq!(r.split_used(8), (10, a, 0));
            assert_eq!(r.split_used(9), (10, b, 3));
        }
        assert_eq!(r.harvest(), [(a, 0), (b, 3)], "{ctx}");
    }
}

/// A run never spans a publish: what the guest may already have read is
/// not rewritten.
#[test]
fn a_published_run_is_not_extended() {
    for packed in [false, true] {
        let mut r = Rig::new(16, packed, false);
        let ids: Vec<u16> = (0..3).map(|i| r.post(i, 1, false)).collect();
        let mut dp = r.start(r.base0());
        let t: Vec<Token> = (0..3).map(|_| r.pop(&mut dp).unwrap()).collect();
        r.complete(&mut dp, t[0], 0);
        r.complete(&mut dp, t[1], 0);
        r.publish(&mut dp);
        r.complete(&mut dp, t[2], 0);
        r.publish(&mut dp);
        if packed {
            assert_eq!(r.packed_desc(0).0, ids[1]);
            assert_eq!(r.packed_desc(2).0, ids[2]);
        } else {
            assert_eq!(r.split_used(0), (3, ids[1], 0));
            assert_eq!(r.split_used(2), (3, ids[2], 0));
        }
        assert_eq!(r.harvest(), [(ids[0], 0), (ids[1], 0), (ids[2], 0)]);
    }
}

/// Chains of three descriptors in a ring of 32 slots, read-only and
/// writable mixed, each round completed backwards: the ring wraps many
/// times (its wrap counters flip inside runs) and the guest gets every
/// buffer once, in order, with its length.
#[test]
fn rings_wrap_with_runs_and_held_completions() {
    for (packed, tracked) in layouts() {
        let ctx = format!("packed {packed} tracked {tracked}");
        let mut r = Rig::new(32, packed, tracked);
        let mut dp = r.start(r.base0());
        let mut n = 0u64;
        for round in 0..60u64 {
            let k = 1 + (round % 9);
            let mut posted = Vec::new();
            for _ in 0..k {
                let writable = n % 4 == 3;
                posted.push((r.post(n, 3, writable), writable));
                n += 1;
            }
            let t: Vec<Token> = (0..k).map(|_| r.pop(&mut dp).unwrap()).collect();
            assert!(r.pop(&mut dp).is_none());
            for (i, tok) in t.iter().enumerate().rev() {
                let len = if posted[i].1 { 48 } else { 0 };
                r.complete(&mut dp, *tok, len);
            }
            r.publish(&mut dp);
            let want: Vec<(u16, u32)> = posted
                .iter()
                .map(|&(id, w)| (id, if w { 48 } else { 0 }))
                .collect();
            assert_eq!(r.harvest(), want, "{ctx} round {round}");
        }
        // 3 slots a request, 60 rounds of 1..9: the ring wrapped often.
        assert!(3 * n > 10 * 32, "{n}");
        assert_eq!(dp.outstanding(), 0);
    }
}

/// A crash while completions are held: the guest has seen none of the
/// run (in order, the oldest was not finished), so the restart resubmits
/// every request of it, in order, and each completes exactly once.
#[test]
fn a_crash_in_the_middle_of_a_held_run_resubmits_all_of_it() {
    for packed in [false, true] {
        let mut r = Rig::new(32, packed, true);
        let ids: Vec<u16> = (0..5).map(|i| r.post(i, 2, true)).collect();
        let mut dp = r.start(r.base0());
        let t: Vec<Token> = (0..5).map(|_| r.pop(&mut dp).unwrap()).collect();
        // 0 reaches the guest; 2 and 3 finish but wait for 1; 4 runs.
        r.complete(&mut dp, t[0], 5);
        r.publish(&mut dp);
        r.complete(&mut dp, t[3], 5);
        r.complete(&mut dp, t[2], 5);
        r.publish(&mut dp);
        assert_eq!(r.harvest(), [(ids[0], 5)]);
        drop(dp);

        let mut dp = r.start(r.base0());
        assert_eq!(dp.error(), None);
        assert_eq!(dp.resubmits_left(), 4, "packed {packed}");
        let again: Vec<Token> = (0..4).map(|_| r.pop(&mut dp).unwrap()).collect();
        let got: Vec<u16> = again.iter().map(|t| t.id()).collect();
        assert_eq!(got, ids[1..], "pop order again (packed {packed})");
        assert!(r.pop(&mut dp).is_none());
        // Out of order again: still in order for the guest.
        for tok in again.iter().rev() {
            r.complete(&mut dp, *tok, 7);
        }
        r.publish(&mut dp);
        let want: Vec<(u16, u32)> = ids[1..].iter().map(|&i| (i, 7)).collect();
        assert_eq!(r.harvest(), want);
        drop(dp);
        assert_eq!(r.start(r.base0()).resubmits_left(), 0);
    }
}

/// GET_VRING_BASE with suspension while a completion is held: the stop
/// does not wait, the held one stays recorded with the unfinished one
/// before it, the base is where the guest's view ends.
#[test]
fn a_suspending_stop_keeps_held_completions_recorded() {
    for packed in [false, true] {
        let mut r = Rig::new(32, packed, true);
        let ids: Vec<u16> = (0..3).map(|i| r.post(i, 1, true)).collect();
        let mut dp = r.start(r.base0());
        let t: Vec<Token> = (0..3).map(|_| r.pop(&mut dp).unwrap()).collect();
        r.complete(&mut dp, t[0], 1);
        r.complete(&mut dp, t[2], 3);
        let (s, p) = dp.stop(&r.mem, r.area(), true);
        assert_eq!(p.unwrap(), Published::Notify);
        let Stop::Stopped { base } = s else {
            panic!("a suspending stop does not wait")
        };
        assert_eq!(r.harvest(), [(ids[0], 1)]);
        let expect = if packed {
            3 | 1 << 15 | 1 << 16 | 1 << 31
        } else {
            3
        };
        assert_eq!(base, expect);
        let mut dp = r.start(base);
        assert_eq!(dp.resubmits_left(), 2);
        let b = r.pop(&mut dp).unwrap();
        let c = r.pop(&mut dp).unwrap();
        assert_eq!([b.id(), c.id()], [ids[1], ids[2]]);
        r.complete(&mut dp, c, 3);
        r.complete(&mut dp, b, 2);
        r.publish(&mut dp);
        assert_eq!(r.harvest(), [(ids[1], 2), (ids[2], 3)]);
    }
}

/// A draining stop waits for the unfinished request before a held one
/// and publishes both in order.
#[test]
fn a_draining_stop_waits_for_the_run() {
    for (packed, tracked) in layouts() {
        let mut r = Rig::new(32, packed, tracked);
        let ids: Vec<u16> = (0..2).map(|i| r.post(i, 1, true)).collect();
        let mut dp = r.start(r.base0());
        let a = r.pop(&mut dp).unwrap();
        let b = r.pop(&mut dp).unwrap();
        r.complete(&mut dp, b, 2);
        let (s, _) = dp.stop(&r.mem, r.area(), false);
        assert_eq!(s, Stop::Draining);
        r.complete(&mut dp, a, 1);
        let (s, p) = dp.stop(&r.mem, r.area(), false);
        assert!(matches!(s, Stop::Stopped { .. }));
        assert_eq!(p.unwrap(), Published::Notify);
        assert_eq!(r.harvest(), [(ids[0], 1), (ids[1], 2)]);
    }
}

/// A split driver that makes a chain available out of table order (with
/// IN_ORDER the device may rely on the order, and a batched used entry
/// would name the wrong buffers): the ring is broken, nothing is
/// consumed, and it stays broken.
#[test]
fn a_split_chain_out_of_table_order_breaks_the_ring() {
    for tracked in [false, true] {
        let mut r = Rig::new(16, false, tracked);
        let a = r.post(0, 2, false);
        assert_eq!(a, 0);
        let mut dp = r.start(0);
        let ta = r.pop(&mut dp).unwrap();
        // The next chain must start at descriptor 2; the driver puts 5.
        let Drv::Split(d) = &mut r.drv else {
            unreachable!()
        };
        d.write_desc(&r.mem, 5, BUFS, 16, 0, 0).unwrap();
        d.push_head(&r.mem, 5).unwrap();
        d.publish(&r.mem).unwrap();
        let mut c: Chain = Chain::new();
        let e = dp.pop(&r.mem, r.area(), &mut c);
        assert_eq!(e, Err(DataPlaneError::Vring(VringError::OutOfOrder(5))));
        assert_eq!(dp.pop(&r.mem, r.area(), &mut c), e, "it stays broken");
        let (s, _) = dp.stop(&r.mem, r.area(), false);
        assert_eq!(
            s,
            Stop::Stopped { base: 1 },
            "the refused chain is not consumed"
        );
        let _ = ta;
    }
}

/// The first chain after a start may begin anywhere (the ring resumes at
/// a base); from then on the order holds, across the table's end.
#[test]
fn table_order_wraps_and_starts_anywhere() {
    let mut r = Rig::new(8, false, false);
    let Drv::Split(d) = &mut r.drv else {
        unreachable!()
    };
    // A ring resumed at avail index 6: the driver's next descriptor is 6.
    d.start_at(&r.mem, 6).unwrap();
    d.set_in_order();
    let ids: Vec<u16> = (0..3).map(|i| r.post(i, 2, true)).collect();
    assert_eq!(ids, [6, 0, 2], "2 descriptors each, wrapping at 8");
    let mut dp = r.start(6);
    let t: Vec<Token> = (0..3).map(|_| r.pop(&mut dp).unwrap()).collect();
    for tok in t.iter().rev() {
        r.complete(&mut dp, *tok, 4);
    }
    r.publish(&mut dp);
    assert_eq!(r.harvest(), [(6, 4), (0, 4), (2, 4)]);
}

/// A ring larger than the window: at most IN_ORDER_WINDOW requests past
/// the oldest unfinished one are handed out; finishing it makes room.
#[test]
fn the_holding_window_bounds_what_is_handed_out() {
    let w = IN_ORDER_WINDOW as u16;
    for packed in [false, true] {
        let mut r = Rig::new(2 * w, packed, false);
        for i in 0..u64::from(w) + 2 {
            r.post(i, 1, false);
        }
        let mut dp = r.start(r.base0());
        let t: Vec<Token> = (0..w).map(|_| r.pop(&mut dp).unwrap()).collect();
        assert!(r.pop(&mut dp).is_none(), "window full (packed {packed})");
        assert!(
            !dp.enable_notification(&r.mem).unwrap(),
            "nothing to pop until a completion"
        );
        // A later one finishing does not make room; the oldest does.
        r.complete(&mut dp, t[5], 0);
        assert!(r.pop(&mut dp).is_none());
        r.complete(&mut dp, t[0], 0);
        assert!(r.pop(&mut dp).is_some());
        assert!(r.pop(&mut dp).is_none());
    }
}

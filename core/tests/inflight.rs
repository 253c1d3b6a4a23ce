//! Inflight area recovery in memory: requests fetched and completed out of
//! order, crashes at every step of a completion, and hostile areas.

#![allow(clippy::unwrap_used)]

use heapless::Vec;
use vhost_user_core::inflight::{
    area_size, check_area, packed_chain, queue_stride, InflightError, PackedDescCopy,
    PackedInflight, PackedPosition, Resubmit, SplitInflight,
};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::vring::{Chain, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vhost_user_test::TestMemory;

const QS: u16 = 8;
const BASE: u64 = 0x1000;

fn mem() -> TestMemory {
    TestMemory::new(&[(0, 0x10000)]).unwrap()
}

fn heads<const N: usize>(l: &Vec<Resubmit, N>) -> std::vec::Vec<u16> {
    l.iter().map(|r| r.head).collect()
}

#[test]
fn stride_and_area_description() {
    assert_eq!(queue_stride(128), 4160);
    assert_eq!(queue_stride(1), 64);
    assert_eq!(area_size(2, 128), Ok(8320));
    assert_eq!(area_size(0, 128), Err(InflightError::NumQueues(0)));
    assert_eq!(area_size(257, 128), Err(InflightError::NumQueues(257)));
    assert_eq!(area_size(1, 0), Err(InflightError::QueueSize(0)));
    assert_eq!(check_area(2, 128, 8320), Ok(4160));
    assert_eq!(check_area(2, 128, 8319), Err(InflightError::TooSmall));
    // Both layouts fit in a stride.
    for qs in [1u16, 2, 256, 32768] {
        assert!(16 + 16 * u64::from(qs) <= queue_stride(qs));
        assert!(32 + 32 * u64::from(qs) <= queue_stride(qs));
    }
}

/// A split ring's used.idx after `n` completions, as the guest sees it.
fn split_fetch(m: &TestMemory, q: &mut SplitInflight, hs: &[u16]) {
    for &h in hs {
        q.fetched(m, h).unwrap();
    }
}

fn split_complete(m: &TestMemory, q: &SplitInflight, hs: &[u16], used_after: u16) {
    q.batch_begin(m, hs).unwrap();
    // (the ring's used.idx is published here)
    q.batch_end(m, hs, used_after).unwrap();
}

#[test]
fn split_fresh_area_is_initialised_and_has_nothing_to_resubmit() {
    let m = mem();
    let (mut q, fresh) = SplitInflight::open(&m, BASE, QS).unwrap();
    assert!(fresh);
    assert_eq!(m.read_u16(BASE + 8).unwrap(), 1, "version");
    assert_eq!(m.read_u16(BASE + 10).unwrap(), QS, "desc_num");
    let mut out: Vec<Resubmit, 16> = Vec::new();
    q.recover(&m, 0, &mut out).unwrap();
    assert!(out.is_empty());
    let (_, fresh) = SplitInflight::open(&m, BASE, QS).unwrap();
    assert!(!fresh, "a second open finds the area in use");
}

#[test]
fn split_out_of_order_completion_resubmits_the_rest_in_fetch_order() {
    let m = mem();
    let (mut q, _) = SplitInflight::open(&m, BASE, QS).unwrap();
    split_fetch(&m, &mut q, &[5, 2, 7, 0]);
    split_complete(&m, &q, &[2], 1);
    split_complete(&m, &q, &[0], 2);
    // Restart: a new view of the same area.
    let (mut r, fresh) = SplitInflight::open(&m, BASE, QS).unwrap();
    assert!(!fresh);
    let mut out: Vec<Resubmit, 16> = Vec::new();
    r.recover(&m, 2, &mut out).unwrap();
    assert_eq!(heads(&out), [5, 7]);
    assert!(out[0].counter < out[1].counter);
    // The counter continues: a new fetch sorts after the survivors.
    r.fetched(&m, 3).unwrap();
    let mut again: Vec<Resubmit, 16> = Vec::new();
    r.recover(&m, 2, &mut again).unwrap();
    assert_eq!(heads(&again), [5, 7, 3]);
}

#[test]
fn split_crash_after_publishing_before_recording() {
    let m = mem();
    let (mut q, _) = SplitInflight::open(&m, BASE, QS).unwrap();
    split_fetch(&m, &mut q, &[4, 1, 6]);
    // A batch of two is linked and published (used.idx 0 -> 2), then the
    // back-end dies before clearing the flags.
    q.batch_begin(&m, &[1, 6]).unwrap();
    let mut out: Vec<Resubmit, 16> = Vec::new();
    let (mut r, _) = SplitInflight::open(&m, BASE, QS).unwrap();
    r.recover(&m, 2, &mut out).unwrap();
    assert_eq!(heads(&out), [4], "the published batch is complete");
    assert_eq!(m.read_u16(BASE + 14).unwrap(), 2, "used_idx repaired");
}

#[test]
fn split_crash_before_publishing_resubmits_the_batch() {
    let m = mem();
    let (mut q, _) = SplitInflight::open(&m, BASE, QS).unwrap();
    split_fetch(&m, &mut q, &[4, 1, 6]);
    q.batch_begin(&m, &[1, 6]).unwrap();
    // used.idx never moved.
    let mut out: Vec<Resubmit, 16> = Vec::new();
    let (mut r, _) = SplitInflight::open(&m, BASE, QS).unwrap();
    r.recover(&m, 0, &mut out).unwrap();
    assert_eq!(heads(&out), [4, 1, 6]);
}

#[test]
fn split_hostile_areas_are_refused() {
    let m = mem();
    let mut out: Vec<Resubmit, 16> = Vec::new();
    // Unknown version.
    m.write_u16(BASE + 8, 7).unwrap();
    assert_eq!(
        SplitInflight::open(&m, BASE, QS).unwrap_err(),
        InflightError::Version(7)
    );
    // desc_num different from the ring.
    m.write_u16(BASE + 8, 1).unwrap();
    m.write_u16(BASE + 10, 16).unwrap();
    assert_eq!(
        SplitInflight::open(&m, BASE, QS).unwrap_err(),
        InflightError::SizeMismatch { area: 16, ring: QS }
    );
    m.write_u16(BASE + 10, QS).unwrap();
    // An inflight flag of 2.
    let (mut q, _) = SplitInflight::open(&m, BASE, QS).unwrap();
    m.write(BASE + 16 + 16 * 3, &[2]).unwrap();
    assert_eq!(q.recover(&m, 0, &mut out), Err(InflightError::BadFlag(3)));
    m.write(BASE + 16 + 16 * 3, &[0]).unwrap();
    // A used index further away than the ring size.
    assert_eq!(
        q.recover(&m, 100, &mut out),
        Err(InflightError::UsedIndex { area: 0, ring: 100 })
    );
    // A last-batch list running out of range.
    m.write_u16(BASE + 12, 9).unwrap();
    assert_eq!(
        q.recover(&m, 1, &mut out),
        Err(InflightError::OutOfRange(9))
    );
    // Heads out of range, and a list too short for the requests.
    assert_eq!(q.fetched(&m, QS), Err(InflightError::OutOfRange(QS)));
    m.write_u16(BASE + 12, 0).unwrap();
    for h in 0..QS {
        q.fetched(&m, h).unwrap();
    }
    let mut small: Vec<Resubmit, 4> = Vec::new();
    assert_eq!(q.recover(&m, 0, &mut small), Err(InflightError::ListFull));
    // An area outside memory.
    assert!(matches!(
        SplitInflight::open(&m, 0xfff0, QS),
        Err(InflightError::Memory(_))
    ));
}

fn d(addr: u64, len: u32, id: u16, flags: u16) -> PackedDescCopy {
    PackedDescCopy {
        addr,
        len,
        id,
        flags,
    }
}

/// A packed test ring whose "used" check is driven by the test.
fn packed_recover(
    m: &TestMemory,
    reached_guest: bool,
) -> (PackedInflight, Vec<Resubmit, 16>, PackedPosition) {
    let (mut r, fresh) = PackedInflight::open(m, BASE, QS, (0, true)).unwrap();
    assert!(!fresh);
    let mut out = Vec::new();
    let pos = r.recover(m, |_, _| Ok(reached_guest), &mut out).unwrap();
    (r, out, pos)
}

#[test]
fn packed_out_of_order_completion_and_positions() {
    let m = mem();
    let (mut q, fresh) = PackedInflight::open(&m, BASE, QS, (0, true)).unwrap();
    assert!(fresh);
    // A: two descriptors (id on the last), B and C: one each.
    let a = q
        .fetched(
            &m,
            &[
                d(0x100, 16, 0, DESC_F_NEXT),
                d(0x200, 512, 10, DESC_F_WRITE),
            ],
        )
        .unwrap();
    let b = q.fetched(&m, &[d(0x300, 16, 11, 0)]).unwrap();
    let c = q.fetched(&m, &[d(0x400, 16, 12, 0)]).unwrap();
    assert_eq!(q.entry_of(&m, 10).unwrap(), Some(a));
    assert_eq!(q.entry_of(&m, 11).unwrap(), Some(b));
    assert_eq!(q.entry_of(&m, 12).unwrap(), Some(c));
    assert_eq!(q.entry_of(&m, 99).unwrap(), None);
    // B completes first.
    q.batch_begin(&m, &[b]).unwrap();
    q.batch_end(&m, &[b]).unwrap();
    let (r, out, pos) = packed_recover(&m, false);
    assert_eq!(heads(&out), [a, c]);
    assert_eq!(pos.used, (1, true), "B's one slot is used");
    assert_eq!(pos.avail, (4, true), "A's two and C's one slot follow");
    // The recorded descriptors rebuild the chain.
    let mut descs: Vec<PackedDescCopy, 8> = Vec::new();
    r.descriptors(&m, a, &mut descs).unwrap();
    assert_eq!(descs.len(), 2);
    assert_eq!(descs[1], d(0x200, 512, 10, DESC_F_WRITE));
    let mut chain: Chain = Chain::new();
    packed_chain(&m, false, &descs, &mut chain).unwrap();
    assert_eq!(chain.head().id, 10);
    assert_eq!(chain.head().descs, 2);
    assert_eq!(chain.readable_len(), 16);
    assert_eq!(chain.writable_len(), 512);
}

#[test]
fn packed_entries_are_reused_after_completion_and_wrap() {
    let m = mem();
    let (mut q, _) = PackedInflight::open(&m, BASE, QS, (6, false)).unwrap();
    // More requests over time than the area has entries.
    for round in 0..5u16 {
        q.fetched(
            &m,
            &[
                d(0x100, 8, round, 0),
                d(0x200, 8, 100 + round, DESC_F_WRITE),
            ],
        )
        .unwrap();
        let e = q.entry_of(&m, 100 + round).unwrap().unwrap();
        q.batch_begin(&m, &[e]).unwrap();
        q.batch_end(&m, &[e]).unwrap();
    }
    let (_, out, pos) = packed_recover(&m, false);
    assert!(out.is_empty());
    // 5 requests of 2 slots from slot 6 (wrap false): 16 slots = 2 wraps.
    assert_eq!(pos.used, (0, false));
    assert_eq!(pos.avail, pos.used);
}

#[test]
fn packed_crash_between_recording_and_publishing() {
    let m = mem();
    let (mut q, _) = PackedInflight::open(&m, BASE, QS, (0, true)).unwrap();
    q.fetched(&m, &[d(0x100, 8, 1, 0)]).unwrap();
    q.fetched(&m, &[d(0x200, 8, 2, 0)]).unwrap();
    let e = q.entry_of(&m, 2).unwrap().unwrap();
    q.batch_begin(&m, &[e]).unwrap();
    // Not published: rolled back, both resubmitted.
    let snapshot = m.read_vec(BASE, 32 + 32 * usize::from(QS)).unwrap();
    let (_, out, pos) = packed_recover(&m, false);
    assert_eq!(out.len(), 2);
    assert_eq!(pos.used, (0, true));
    assert_eq!(pos.avail, (2, true));
    // Published (the ring shows the used descriptor): committed.
    m.write(BASE, &snapshot).unwrap();
    let (_, out, pos) = packed_recover(&m, true);
    assert_eq!(heads(&out).len(), 1);
    assert_eq!(pos.used, (1, true));
    assert_eq!(pos.avail, (2, true));
}

#[test]
fn packed_fetch_cut_short_is_not_resubmitted() {
    let m = mem();
    let (mut q, _) = PackedInflight::open(&m, BASE, QS, (0, true)).unwrap();
    q.fetched(&m, &[d(0x100, 8, 1, 0)]).unwrap();
    // The next fetch got as far as flagging its head entry (the committed
    // free head) and then the back-end died.
    let old_free_head = m.read_u16(BASE + 14).unwrap();
    m.write(BASE + 32 + 32 * u64::from(old_free_head), &[1])
        .unwrap();
    let (_, out, _) = packed_recover(&m, false);
    assert_eq!(out.len(), 1);
}

#[test]
fn packed_hostile_areas_are_refused() {
    let m = mem();
    let (mut q, _) = PackedInflight::open(&m, BASE, QS, (0, true)).unwrap();
    let mut out: Vec<Resubmit, 16> = Vec::new();
    // A free list that loops.
    let free = m.read_u16(BASE + 14).unwrap();
    m.write_u16(BASE + 32 + 32 * u64::from(free) + 2, free)
        .unwrap();
    assert_eq!(
        q.recover(&m, |_, _| Ok(false), &mut out),
        Err(InflightError::Cycle)
    );
    // A link beyond the ring.
    m.write_u16(BASE + 32 + 32 * u64::from(free) + 2, 200)
        .unwrap();
    assert_eq!(
        q.recover(&m, |_, _| Ok(false), &mut out),
        Err(InflightError::OutOfRange(200))
    );
    m.write_u16(BASE + 32 + 32 * u64::from(free) + 2, free + 1)
        .unwrap();
    // An in-flight entry claiming 0 descriptors.
    q.fetched(&m, &[d(0x100, 8, 1, 0)]).unwrap();
    let e = q.entry_of(&m, 1).unwrap().unwrap();
    m.write_u16(BASE + 32 + 32 * u64::from(e) + 6, 0).unwrap();
    assert_eq!(
        q.recover(&m, |_, _| Ok(false), &mut out),
        Err(InflightError::BadCount(0))
    );
    // Used index out of range.
    m.write_u16(BASE + 18, QS).unwrap();
    assert_eq!(
        q.recover(&m, |_, _| Ok(false), &mut out),
        Err(InflightError::OutOfRange(QS))
    );
    // Empty fetch, and an indirect copy that is nested.
    assert_eq!(q.fetched(&m, &[]), Err(InflightError::BadCount(0)));
    let table = 0x3000;
    let mut nested = [0u8; 16];
    nested[14..16].copy_from_slice(&DESC_F_INDIRECT.to_le_bytes());
    m.write(table, &nested).unwrap();
    let mut chain: Chain = Chain::new();
    assert!(packed_chain(&m, true, &[d(table, 16, 0, DESC_F_INDIRECT)], &mut chain).is_err());
    assert!(packed_chain(&m, false, &[d(table, 16, 0, DESC_F_INDIRECT)], &mut chain).is_err());
}

//! Split ring: the engine against the test adapter's guest driver,
//! including every hostile-descriptor class of the notes (§7.2).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::cell::RefCell;
use std::collections::HashMap;

use vhost_user_core::memory::{GuestMemory, MemoryError};
use vhost_user_core::vring::{
    Chain, Head, RingFeatures, Segment, SplitQueue, VringError, DESC_F_INDIRECT, DESC_F_NEXT,
    DESC_F_WRITE, MAX_INDIRECT_DESCS,
};
use vhost_user_test::{Buf, SplitDriver, TestMemory};

const RING: u64 = 0x1000;
const DATA: u64 = 0x8_0000;
const TABLE: u64 = 0x4_0000;
/// Region 0 is [0, 1 MiB), region 1 is [1 MiB, 1 MiB + 64 KiB), then a hole.
const REGION1: u64 = 0x10_0000;
const END: u64 = 0x11_0000;

fn mem() -> TestMemory {
    TestMemory::new(&[(0, REGION1), (REGION1, END - REGION1)]).unwrap()
}

fn feats(event_idx: bool, indirect: bool) -> RingFeatures {
    RingFeatures {
        event_idx,
        indirect,
    }
}

fn setup(size: u16, f: RingFeatures) -> (TestMemory, SplitDriver, SplitQueue) {
    let m = mem();
    let d = SplitDriver::new(&m, size, RING, f.event_idx).unwrap();
    let q = SplitQueue::new(size, d.addrs(), f).unwrap();
    q.check_areas(&m).unwrap();
    (m, d, q)
}

fn seg(addr: u64, len: u32, writable: bool) -> Segment {
    Segment {
        addr,
        len,
        writable,
    }
}

fn pop(q: &mut SplitQueue, m: &impl GuestMemory) -> Result<Option<Chain>, VringError> {
    q.pop(m)
}

/// The heads of every chain left in the ring, popped in order.
fn pop_heads(q: &mut SplitQueue, m: &impl GuestMemory) -> Vec<u16> {
    std::iter::from_fn(|| pop(q, m).unwrap().map(|c| c.head().id)).collect()
}

#[test]
fn direct_chain_pops_validated_and_completes() {
    let (m, mut d, mut q) = setup(8, feats(false, false));
    let head = d
        .post(
            &m,
            &[
                Buf::readable(DATA, 16),
                Buf::readable(DATA + 0x100, 512),
                Buf::writable(DATA + 0x1000, 1),
            ],
        )
        .unwrap();
    let c = pop(&mut q, &m).unwrap().unwrap();
    assert_eq!(c.head().id, head);
    assert_eq!(
        c.readable(),
        [seg(DATA, 16, false), seg(DATA + 0x100, 512, false)]
    );
    assert_eq!(c.writable(), [seg(DATA + 0x1000, 1, true)]);
    assert_eq!((c.readable_len(), c.writable_len()), (528, 1));
    assert!(pop(&mut q, &m).unwrap().is_none());
    q.add_used(&m, c.head(), 1).unwrap();
    assert!(q.flush_used(&m).unwrap());
    let used = d.harvest_all(&m).unwrap();
    assert_eq!(used.len(), 1);
    assert_eq!((used[0].id, used[0].len), (head, 1));
    assert_eq!(d.free_descs(), 8);
}

#[test]
fn indirect_chain_pops() {
    let (m, mut d, mut q) = setup(4, feats(false, true));
    let bufs = [
        Buf::readable(DATA, 8),
        Buf::writable(DATA + 8, 8),
        Buf::writable(DATA + 16, 8),
    ];
    let head = d.add_indirect(&m, TABLE, &bufs).unwrap();
    d.publish(&m).unwrap();
    let c = pop(&mut q, &m).unwrap().unwrap();
    assert_eq!(c.head(), Head { id: head, descs: 1 });
    assert_eq!(
        c.segments(),
        [
            seg(DATA, 8, false),
            seg(DATA + 8, 8, true),
            seg(DATA + 16, 8, true)
        ]
    );
}

#[test]
fn direct_descriptors_may_end_in_an_indirect_one() {
    let (m, d, mut q) = setup(4, feats(false, true));
    let mut d = d;
    vhost_user_test::driver::write_indirect_table(&m, TABLE, &[Buf::writable(DATA + 64, 4)])
        .unwrap();
    d.write_desc(&m, 0, DATA, 4, DESC_F_NEXT, 1).unwrap();
    d.write_desc(&m, 1, TABLE, 16, DESC_F_INDIRECT, 0).unwrap();
    d.push_head(&m, 0).unwrap();
    d.publish(&m).unwrap();
    let c = pop(&mut q, &m).unwrap().unwrap();
    assert_eq!(c.segments(), [seg(DATA, 4, false), seg(DATA + 64, 4, true)]);
}

#[test]
fn used_entries_are_published_once_per_batch() {
    let (m, mut d, mut q) = setup(8, feats(false, false));
    for i in 0..5 {
        d.add(&m, &[Buf::writable(DATA + 64 * i, 64)]).unwrap();
    }
    d.publish(&m).unwrap();
    let mut chain = Chain::<4>::new();
    let mut n = 0;
    while q.pop_into(&m, &mut chain).unwrap() {
        q.add_used(&m, chain.head(), 10 + n).unwrap();
        n += 1;
        assert_eq!(d.used_idx(&m).unwrap(), 0, "not visible before flush");
    }
    assert_eq!(n, 5);
    assert!(q.flush_used(&m).unwrap());
    assert_eq!(d.used_idx(&m).unwrap(), 5);
    let lens: Vec<u32> = d.harvest_all(&m).unwrap().iter().map(|u| u.len).collect();
    assert_eq!(lens, [10, 11, 12, 13, 14]);
    // Nothing new: no store, no call.
    assert!(!q.flush_used(&m).unwrap());
}

#[test]
fn indices_wrap_at_16_bits() {
    let (m, mut d, mut q) = setup(4, feats(false, false));
    let mut chain = Chain::<4>::new();
    for i in 0..70_000u32 {
        d.post(&m, &[Buf::readable(DATA, 1 + i % 7)]).unwrap();
        assert!(q.pop_into(&m, &mut chain).unwrap());
        assert_eq!(chain.readable_len(), 1 + i % 7);
        q.add_used(&m, chain.head(), i).unwrap();
        q.flush_used(&m).unwrap();
        assert_eq!(d.harvest(&m).unwrap().unwrap().len, i);
    }
    assert_eq!(q.next_avail(), (70_000u32 % 65_536) as u16);
    assert_eq!(q.next_used(), q.next_avail());
}

#[test]
fn no_interrupt_flag_suppresses_call_without_event_idx() {
    let (m, mut d, mut q) = setup(4, feats(false, false));
    d.set_avail_flags(&m, 1).unwrap();
    d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
    let c = pop(&mut q, &m).unwrap().unwrap();
    q.add_used(&m, c.head(), 0).unwrap();
    assert!(!q.flush_used(&m).unwrap());
    d.set_avail_flags(&m, 0).unwrap();
    d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
    let c = pop(&mut q, &m).unwrap().unwrap();
    q.add_used(&m, c.head(), 0).unwrap();
    assert!(q.flush_used(&m).unwrap());
}

#[test]
fn event_idx_used_event_decides_the_call() {
    let (m, mut d, mut q) = setup(8, feats(true, false));
    // NO_INTERRUPT is ignored with EVENT_IDX.
    d.set_avail_flags(&m, 1).unwrap();
    let complete = |d: &mut SplitDriver, q: &mut SplitQueue, n: usize| {
        for _ in 0..n {
            d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
            let c = q.pop::<_, 4>(&m).unwrap().unwrap();
            q.add_used(&m, c.head(), 0).unwrap();
        }
        let call = q.flush_used(&m).unwrap();
        d.harvest_all(&m).unwrap();
        call
    };
    // The first flush always calls (no previous signal).
    assert!(complete(&mut d, &mut q, 1));
    d.set_used_event(&m, 3).unwrap();
    // used idx 1 -> 3: event 3 not crossed (needs new > 3).
    assert!(!complete(&mut d, &mut q, 2));
    // 3 -> 4 crosses 3.
    assert!(complete(&mut d, &mut q, 1));
    // 4 -> 6, event still 3: already passed, no call.
    assert!(!complete(&mut d, &mut q, 2));
}

#[test]
fn event_idx_empty_ring_rearms_avail_event() {
    let (m, mut d, mut q) = setup(8, feats(true, false));
    for _ in 0..3 {
        d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
    }
    while pop(&mut q, &m).unwrap().is_some() {}
    assert_eq!(d.avail_event(&m).unwrap(), 3);
    // The driver's next publish (3 -> 4) crosses avail_event 3: kick.
    d.kick_needed(&m).unwrap();
    d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
    assert!(d.kick_needed(&m).unwrap());
    d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
    assert!(!d.kick_needed(&m).unwrap(), "device did not re-arm");
}

#[test]
fn event_idx_disabled_notifications_stay_off_when_the_ring_empties() {
    let (m, mut d, mut q) = setup(8, feats(true, false));
    q.disable_notification(&m).unwrap();
    for round in 0..3u16 {
        for _ in 0..2 {
            d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
        }
        while pop(&mut q, &m).unwrap().is_some() {}
        // A polling device left avail_event alone: the driver's posts
        // do not kick.
        assert_eq!(d.avail_event(&m).unwrap(), 0, "round {round}");
    }
    d.kick_needed(&m).unwrap();
    d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
    assert!(!d.kick_needed(&m).unwrap());
    while pop(&mut q, &m).unwrap().is_some() {}
    // Enabled again: avail_event is the next index, re-checked, and
    // finding the ring empty re-arms it again from then on.
    assert!(!q.enable_notification(&m).unwrap());
    assert_eq!(d.avail_event(&m).unwrap(), 7);
    d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
    assert!(d.kick_needed(&m).unwrap());
    while pop(&mut q, &m).unwrap().is_some() {}
    assert_eq!(d.avail_event(&m).unwrap(), 8);
}

#[test]
fn notification_enable_disable_without_event_idx() {
    let (m, mut d, mut q) = setup(4, feats(false, false));
    q.disable_notification(&m).unwrap();
    assert_eq!(d.used_flags(&m).unwrap(), 1);
    assert!(!q.enable_notification(&m).unwrap());
    assert_eq!(d.used_flags(&m).unwrap(), 0);
    d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
    assert!(
        q.enable_notification(&m).unwrap(),
        "re-check sees the chain"
    );
}

/// An 8-entry ring with three one-buffer chains posted, and their heads.
fn three_posted() -> (TestMemory, SplitDriver, SplitQueue, Vec<u16>) {
    let (m, mut d, q) = setup(8, feats(false, false));
    let h = (0..3)
        .map(|i| d.post(&m, &[Buf::readable(DATA + i, 1)]).unwrap())
        .collect();
    (m, d, q, h)
}

#[test]
fn stop_and_restart_resume_requests_already_in_the_ring() {
    let (m, d, mut q, h) = three_posted();
    let c = pop(&mut q, &m).unwrap().unwrap();
    q.add_used(&m, c.head(), 0).unwrap();
    q.flush_used(&m).unwrap();
    // GET_VRING_BASE.
    let base = q.next_avail();
    assert_eq!(base, 1);
    // SET_VRING_BASE on a fresh queue value, used index read from the guest.
    let mut q2 = SplitQueue::new(8, d.addrs(), feats(false, false)).unwrap();
    q2.set_next_avail(base);
    assert_eq!(q2.sync_used(&m).unwrap(), 1);
    assert_eq!(pop_heads(&mut q2, &m), h[1..]);
}

#[test]
fn a_new_base_rereads_the_avail_ring() {
    // Heads are read ahead in runs; SET_VRING_BASE must not serve stale ones.
    let (m, d, mut q, h) = three_posted();
    assert_eq!(pop(&mut q, &m).unwrap().unwrap().head().id, h[0]);
    // The front-end rewrites the entries not yet taken, then rewinds.
    let avail = d.addrs().driver;
    m.write_u16(avail + 4 + 2, h[2]).unwrap();
    m.write_u16(avail + 4 + 4, h[1]).unwrap();
    q.set_next_avail(1);
    assert_eq!(pop_heads(&mut q, &m), [h[2], h[1]]);
}

#[test]
fn zero_length_descriptor_with_valid_address_is_skipped() {
    let (m, mut d, mut q) = setup(4, feats(false, false));
    d.post(&m, &[Buf::readable(DATA, 0), Buf::writable(DATA, 4)])
        .unwrap();
    let c = pop(&mut q, &m).unwrap().unwrap();
    assert_eq!(c.segments(), [seg(DATA, 4, true)]);
}

#[test]
fn buffers_spanning_adjacent_regions_are_accepted() {
    let (m, mut d, mut q) = setup(4, feats(false, false));
    d.post(&m, &[Buf::readable(REGION1 - 8, 16)]).unwrap();
    let c = pop(&mut q, &m).unwrap().unwrap();
    assert_eq!(c.segments(), [seg(REGION1 - 8, 16, false)]);
}

#[test]
fn indirect_table_spanning_adjacent_regions_is_read_by_split_copy() {
    let (m, mut d, mut q) = setup(4, feats(false, true));
    // A max-size table straddling the region boundary.
    let bufs: Vec<Buf> = (0..1024).map(|i| Buf::readable(DATA + i, 1)).collect();
    let table = REGION1 - 16 * 512 - 8;
    d.add_indirect(&m, table, &bufs).unwrap();
    d.publish(&m).unwrap();
    let mut q64 = q.clone();
    // Capacity 64 is too small: refused, not truncated.
    assert_eq!(q64.pop::<_, 64>(&m).err(), Some(VringError::ChainTooLong));
    let c = q.pop::<_, 1024>(&m).unwrap().unwrap();
    assert_eq!(c.segments().len(), 1024);
    assert_eq!(c.segments()[600], seg(DATA + 600, 1, false));
}

#[test]
fn indirect_descriptor_split_8_8_across_regions_is_read_whole() {
    let (m, mut d, mut q) = setup(4, feats(false, true));
    // Descriptor 2 of the table has its address word in region 0 and its
    // length, flags and next in region 1; its buffer spans the boundary.
    let table = REGION1 - 2 * 16 - 8;
    let bufs = [
        Buf::readable(DATA, 16),
        Buf::readable(DATA + 0x100, 0x200),
        Buf::readable(REGION1 - 4, 8),
        Buf::writable(REGION1 + 0x100, 1),
    ];
    let head = d.add_indirect(&m, table, &bufs).unwrap();
    d.publish(&m).unwrap();
    let c = pop(&mut q, &m).unwrap().unwrap();
    assert_eq!(c.head(), Head { id: head, descs: 1 });
    assert_eq!(
        c.segments(),
        [
            seg(DATA, 16, false),
            seg(DATA + 0x100, 0x200, false),
            seg(REGION1 - 4, 8, false),
            seg(REGION1 + 0x100, 1, true),
        ]
    );
    // The same table ending 8 bytes past the last region is refused whole.
    let (m, mut d, mut q) = setup(4, feats(false, true));
    let table = END - 4 * 16 + 8;
    write_raw_table(&m, table, &bufs[..3]);
    d.write_desc(&m, 0, table, 16 * 4, DESC_F_INDIRECT, 0)
        .unwrap();
    d.push_head(&m, 0).unwrap();
    d.publish(&m).unwrap();
    assert_eq!(pop(&mut q, &m).err(), Some(VringError::BadBuffer));
}

/// Writes split descriptors for `bufs` at `table` (chained by NEXT).
fn write_raw_table(m: &TestMemory, table: u64, bufs: &[Buf]) {
    vhost_user_test::driver::write_indirect_table(m, table, bufs).unwrap();
}

// ---- hostile cases -------------------------------------------------------

/// Post a chain written with raw descriptors (head 0).
fn hostile(
    f: RingFeatures,
    descs: &[(u64, u32, u16, u16)],
) -> (TestMemory, SplitDriver, SplitQueue) {
    let (m, mut d, q) = setup(8, f);
    for (i, &(a, l, fl, n)) in descs.iter().enumerate() {
        d.write_desc(&m, i as u16, a, l, fl, n).unwrap();
    }
    d.push_head(&m, 0).unwrap();
    d.publish(&m).unwrap();
    (m, d, q)
}

fn refused(f: RingFeatures, descs: &[(u64, u32, u16, u16)]) -> VringError {
    let (m, _d, mut q) = hostile(f, descs);
    let e = pop(&mut q, &m).unwrap_err();
    // Refused cleanly: nothing consumed, same answer again.
    assert_eq!(pop(&mut q, &m).unwrap_err(), e);
    assert_eq!(q.next_avail(), 0);
    e
}

const RD: u16 = 0;
const WR: u16 = DESC_F_WRITE;
const NX: u16 = DESC_F_NEXT;
const IND: u16 = DESC_F_INDIRECT;

#[test]
fn hostile_head_out_of_range() {
    let (m, mut d, mut q) = setup(8, feats(false, false));
    d.push_head(&m, 8).unwrap();
    d.publish(&m).unwrap();
    assert_eq!(pop(&mut q, &m).err(), Some(VringError::HeadOutOfRange(8)));
}

#[test]
fn hostile_next_out_of_range() {
    assert_eq!(
        refused(feats(false, false), &[(DATA, 4, RD | NX, 8)]),
        VringError::NextOutOfRange(8)
    );
}

#[test]
fn hostile_descriptor_loop() {
    assert_eq!(
        refused(
            feats(false, false),
            &[
                (DATA, 4, RD | NX, 1),
                (DATA, 4, RD | NX, 2),
                (DATA, 4, RD | NX, 0)
            ]
        ),
        VringError::ChainLoop
    );
    assert_eq!(
        refused(feats(false, false), &[(DATA, 4, RD | NX, 0)]),
        VringError::ChainLoop
    );
}

#[test]
fn hostile_chain_longer_than_the_ring_via_indirect_loop() {
    let (m, mut d, mut q) = setup(8, feats(false, true));
    // Indirect table of 2 entries that point at each other.
    m.write(TABLE, &vhost_user_test::driver::encode_desc(DATA, 1, NX, 1))
        .unwrap();
    m.write(
        TABLE + 16,
        &vhost_user_test::driver::encode_desc(DATA, 1, NX, 0),
    )
    .unwrap();
    d.write_desc(&m, 0, TABLE, 32, IND, 0).unwrap();
    d.push_head(&m, 0).unwrap();
    d.publish(&m).unwrap();
    assert_eq!(pop(&mut q, &m).err(), Some(VringError::ChainLoop));
}

#[test]
fn hostile_indirect_next_out_of_table() {
    let (m, mut d, mut q) = setup(8, feats(false, true));
    m.write(TABLE, &vhost_user_test::driver::encode_desc(DATA, 1, NX, 2))
        .unwrap();
    d.write_desc(&m, 0, TABLE, 32, IND, 0).unwrap();
    d.push_head(&m, 0).unwrap();
    d.publish(&m).unwrap();
    assert_eq!(pop(&mut q, &m).err(), Some(VringError::NextOutOfRange(2)));
}

#[test]
fn hostile_chain_longer_than_chain_capacity() {
    let (m, mut d, mut q) = setup(8, feats(false, false));
    d.post(&m, &[Buf::readable(DATA, 1); 5]).unwrap();
    assert_eq!(q.pop::<_, 4>(&m).err(), Some(VringError::ChainTooLong));
    assert_eq!(q.pop::<_, 5>(&m).unwrap().unwrap().segments().len(), 5);
}

#[test]
fn hostile_indirect_length_zero() {
    assert_eq!(
        refused(feats(false, true), &[(TABLE, 0, IND, 0)]),
        VringError::IndirectBadLength(0)
    );
}

#[test]
fn hostile_indirect_length_not_multiple_of_16() {
    assert_eq!(
        refused(feats(false, true), &[(TABLE, 24, IND, 0)]),
        VringError::IndirectBadLength(24)
    );
}

#[test]
fn hostile_indirect_length_above_maximum() {
    let len = 16 * (MAX_INDIRECT_DESCS + 1);
    assert_eq!(
        refused(feats(false, true), &[(0, len, IND, 0)]),
        VringError::IndirectBadLength(u16::MAX)
    );
}

#[test]
fn hostile_indirect_table_outside_memory() {
    assert_eq!(
        refused(feats(false, true), &[(END - 16, 32, IND, 0)]),
        VringError::BadBuffer
    );
}

#[test]
fn hostile_nested_indirect() {
    let (m, mut d, mut q) = setup(8, feats(false, true));
    m.write(
        TABLE,
        &vhost_user_test::driver::encode_desc(TABLE + 0x100, 16, IND, 0),
    )
    .unwrap();
    d.write_desc(&m, 0, TABLE, 16, IND, 0).unwrap();
    d.push_head(&m, 0).unwrap();
    d.publish(&m).unwrap();
    assert_eq!(pop(&mut q, &m).err(), Some(VringError::IndirectNested));
}

#[test]
fn hostile_indirect_with_next() {
    assert_eq!(
        refused(
            feats(false, true),
            &[(TABLE, 16, IND | NX, 1), (DATA, 1, RD, 0)]
        ),
        VringError::IndirectWithNext
    );
}

#[test]
fn hostile_indirect_not_negotiated() {
    assert_eq!(
        refused(feats(false, false), &[(TABLE, 16, IND, 0)]),
        VringError::IndirectNotNegotiated
    );
}

#[test]
fn hostile_zero_length_descriptor_with_bad_address() {
    assert_eq!(
        refused(feats(false, false), &[(END + 0x1000, 0, RD, 0)]),
        VringError::BadBuffer
    );
}

#[test]
fn hostile_buffer_outside_guest_memory() {
    assert_eq!(
        refused(feats(false, false), &[(END, 1, WR, 0)]),
        VringError::BadBuffer
    );
}

#[test]
fn hostile_buffer_crossing_the_last_region_end() {
    assert_eq!(
        refused(feats(false, false), &[(END - 8, 9, RD, 0)]),
        VringError::BadBuffer
    );
}

#[test]
fn hostile_buffer_address_overflow() {
    assert_eq!(
        refused(feats(false, false), &[(u64::MAX - 2, 8, RD, 0)]),
        VringError::BadBuffer
    );
}

#[test]
fn hostile_readable_after_writable() {
    assert_eq!(
        refused(
            feats(false, false),
            &[(DATA, 4, WR | NX, 1), (DATA, 4, RD, 0)]
        ),
        VringError::ReadableAfterWritable
    );
    // A zero-length writable head is skipped but still orders the chain;
    // and the rule holds past the second descriptor.
    for descs in [
        &[(DATA, 0, WR | NX, 1), (DATA, 4, RD, 0)][..],
        &[
            (DATA, 4, RD | NX, 1),
            (DATA, 4, WR | NX, 2),
            (DATA, 4, RD, 0),
        ],
        &[
            (DATA, 4, RD | NX, 1),
            (DATA, 0, WR | NX, 2),
            (DATA, 4, RD, 0),
        ],
    ] {
        assert_eq!(
            refused(feats(false, false), descs),
            VringError::ReadableAfterWritable
        );
    }
}

#[test]
fn hostile_avail_index_jump() {
    let (m, mut d, mut q) = setup(8, feats(false, false));
    d.set_avail_idx(&m, 9).unwrap();
    assert_eq!(
        pop(&mut q, &m).err(),
        Some(VringError::AvailIndexJump { avail: 9, next: 0 })
    );
    // Exactly the ring size is fine (a full ring).
    for _ in 0..8 {
        d.push_head(&m, 0).unwrap();
    }
    d.set_avail_idx(&m, 8).unwrap();
    assert!(pop(&mut q, &m).is_ok());
}

#[test]
fn hostile_ring_areas_outside_memory() {
    let m = mem();
    let d = SplitDriver::new(&m, 8, RING, false).unwrap();
    let mut a = d.addrs();
    a.device = END - 4;
    let mut q = SplitQueue::new(8, a, feats(false, false)).unwrap();
    assert!(matches!(q.check_areas(&m), Err(VringError::Memory(_))));
    a = d.addrs();
    a.driver = END + 0x100;
    let mut q2 = SplitQueue::new(8, a, feats(false, false)).unwrap();
    assert!(matches!(pop(&mut q2, &m), Err(VringError::Memory(_))));
    // A used ring outside memory: completing fails cleanly.
    q.set_next_avail(0);
    assert!(matches!(
        q.add_used(&m, Head { id: 0, descs: 1 }, 0),
        Err(VringError::Memory(_))
    ));
}

#[test]
fn hostile_used_head_out_of_range() {
    let (m, _d, mut q) = setup(8, feats(false, false));
    assert_eq!(
        q.add_used(&m, Head { id: 8, descs: 1 }, 0),
        Err(VringError::BadUsedHead(8))
    );
}

/// Memory that claims 1 TiB, with only the first 1 MiB stored: lets a
/// chain's total length exceed 4 GiB.
struct Sparse(TestMemory);

impl GuestMemory for Sparse {
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        self.0.read(gpa, dst)
    }
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        self.0.write(gpa, src)
    }
    fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError> {
        self.0.load_u16_acquire(gpa)
    }
    fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        self.0.store_u16_release(gpa, v)
    }
    fn fence(&self) {}
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        match gpa.checked_add(len) {
            Some(end) if end <= 1 << 40 => Ok(()),
            _ => Err(MemoryError::unmapped(gpa, len)),
        }
    }
}

#[test]
fn hostile_chain_longer_than_4_gib() {
    let (m, _d, mut q) = hostile(
        feats(false, false),
        &[
            (0x1_0000_0000, u32::MAX, RD | NX, 1),
            (0x2_0000_0000, 1, RD, 0),
        ],
    );
    assert_eq!(pop(&mut q, &Sparse(m)).err(), Some(VringError::ChainTooBig));
}

/// Counts reads per address and serves a different descriptor on any
/// second read of the same descriptor (a guest racing the device).
struct Racing {
    inner: TestMemory,
    table: (u64, u64),
    reads: RefCell<HashMap<u64, u32>>,
}

impl GuestMemory for Racing {
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let n = {
            let mut r = self.reads.borrow_mut();
            let n = r.entry(gpa).or_default();
            *n += 1;
            *n
        };
        self.inner.read(gpa, dst)?;
        if n > 1 && gpa >= self.table.0 && gpa < self.table.1 {
            // Second fetch: a hostile rewrite to an unmapped buffer.
            dst.fill(0xff);
        }
        Ok(())
    }
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        self.inner.write(gpa, src)
    }
    fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError> {
        self.inner.load_u16_acquire(gpa)
    }
    fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        self.inner.store_u16_release(gpa, v)
    }
    fn fence(&self) {}
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.inner.check(gpa, len)
    }
    fn read_16(&self, gpa: u64) -> Result<[u8; 16], MemoryError> {
        let mut b = [0; 16];
        self.read(gpa, &mut b)?;
        Ok(b)
    }
}

#[test]
fn hostile_guest_rewriting_descriptors_is_never_refetched() {
    let (m, mut d, mut q) = setup(8, feats(false, true));
    let bufs = [Buf::readable(DATA, 4), Buf::writable(DATA + 4, 4)];
    d.add(&m, &bufs).unwrap();
    d.add_indirect(&m, TABLE, &bufs).unwrap();
    d.publish(&m).unwrap();
    let desc = d.addrs().desc;
    let r = Racing {
        inner: m,
        table: (desc, desc + 16 * 8),
        reads: RefCell::default(),
    };
    for _ in 0..2 {
        let c = pop(&mut q, &r).unwrap().unwrap();
        assert_eq!(c.segments(), [seg(DATA, 4, false), seg(DATA + 4, 4, true)]);
    }
    let reads = r.reads.borrow();
    for a in [desc, desc + 16, desc + 32, TABLE, TABLE + 16] {
        assert_eq!(reads.get(&a), Some(&1), "descriptor at {a:#x} fetched once");
    }
}

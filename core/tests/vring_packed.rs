//! Packed ring: the engine against the test adapter's packed driver,
//! including hostile descriptors.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use vhost_user_core::memory::GuestMemory;
use vhost_user_core::vring::packed::{
    DESC_F_AVAIL, DESC_F_USED, EVENT_FLAG_DESC, EVENT_FLAG_DISABLE, EVENT_FLAG_ENABLE,
};
use vhost_user_core::vring::{
    Chain, Head, PackedQueue, RingFeatures, Segment, VringError, DESC_F_INDIRECT, DESC_F_NEXT,
    DESC_F_WRITE,
};
use vhost_user_test::{Buf, PackedDesc, PackedDriver, TestMemory};

const RING: u64 = 0x1000;
const DATA: u64 = 0x8_0000;
const TABLE: u64 = 0x4_0000;
const END: u64 = 0x10_0000;

fn setup(size: u16, event_idx: bool, indirect: bool) -> (TestMemory, PackedDriver, PackedQueue) {
    let m = TestMemory::new(&[(0, END)]).unwrap();
    let d = PackedDriver::new(&m, size, RING).unwrap();
    let q = PackedQueue::new(
        size,
        d.addrs(),
        RingFeatures {
            event_idx,
            indirect,
        },
    )
    .unwrap();
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

fn pop(q: &mut PackedQueue, m: &impl GuestMemory) -> Result<Option<Chain>, VringError> {
    q.pop(m)
}

#[test]
fn chains_pop_with_id_and_slot_count() {
    let (m, mut d, mut q) = setup(8, false, false);
    let a = d.post(&m, &[Buf::readable(DATA, 4)]).unwrap();
    let b = d
        .post(
            &m,
            &[Buf::readable(DATA + 4, 4), Buf::writable(DATA + 8, 8)],
        )
        .unwrap();
    let c1 = pop(&mut q, &m).unwrap().unwrap();
    assert_eq!(c1.head(), Head { id: a, descs: 1 });
    let c2 = pop(&mut q, &m).unwrap().unwrap();
    assert_eq!(c2.head(), Head { id: b, descs: 2 });
    assert_eq!(
        c2.segments(),
        [seg(DATA + 4, 4, false), seg(DATA + 8, 8, true)]
    );
    assert!(pop(&mut q, &m).unwrap().is_none());
    assert_eq!(q.next_avail(), (3, true));
}

#[test]
fn buffer_id_comes_from_the_last_descriptor() {
    let (m, mut d, mut q) = setup(8, false, false);
    d.post_raw(
        &m,
        &[
            PackedDesc {
                addr: DATA,
                len: 1,
                id: 7,
                flags: DESC_F_NEXT,
            },
            PackedDesc {
                addr: DATA,
                len: 1,
                id: 3,
                flags: 0,
            },
        ],
    )
    .unwrap();
    assert_eq!(pop(&mut q, &m).unwrap().unwrap().head().id, 3);
}

#[test]
fn used_descriptors_written_in_order_and_published_by_flush() {
    let (m, mut d, mut q) = setup(8, false, false);
    let ids: Vec<u16> = (0..3)
        .map(|i| {
            let bufs = vec![Buf::writable(DATA, 4); i + 1];
            d.post(&m, &bufs).unwrap()
        })
        .collect();
    let mut chain = Chain::<8>::new();
    let mut n = 0;
    while q.pop_into(&m, &mut chain).unwrap() {
        q.add_used(&m, chain.head(), 100 + n).unwrap();
        n += 1;
    }
    assert_eq!(n, 3);
    assert!(
        d.harvest(&m).unwrap().is_none(),
        "nothing visible before flush"
    );
    assert!(q.flush_used(&m).unwrap());
    let used = d.harvest_all(&m).unwrap();
    let got: Vec<(u16, u32)> = used.iter().map(|u| (u.id, u.len)).collect();
    assert_eq!(got, [(ids[0], 100), (ids[1], 101), (ids[2], 102)]);
    // Used descriptors at slots 0, 1, 3 with AVAIL = USED = wrap (1).
    for slot in [0u64, 1, 3] {
        let f = m.read_u16(RING + 16 * slot + 14).unwrap();
        assert_eq!(f & (DESC_F_AVAIL | DESC_F_USED), DESC_F_AVAIL | DESC_F_USED);
    }
    assert_eq!(q.next_used(), (6, true));
}

#[test]
fn wrap_counters_flip_on_odd_sized_ring() {
    let (m, mut d, mut q) = setup(5, false, true);
    let mut chain = Chain::<8>::new();
    for i in 0..200u32 {
        let id = if i % 3 == 0 {
            d.post_indirect(
                &m,
                TABLE,
                &[Buf::readable(DATA, 2), Buf::writable(DATA + 2, 2)],
            )
            .unwrap()
        } else {
            d.post(&m, &[Buf::readable(DATA, 1), Buf::writable(DATA + 1, 1)])
                .unwrap()
        };
        assert!(q.pop_into(&m, &mut chain).unwrap(), "round {i}");
        assert_eq!(chain.head().id, id);
        assert_eq!(chain.segments().len(), 2);
        q.add_used(&m, chain.head(), i).unwrap();
        q.flush_used(&m).unwrap();
        let u = d.harvest(&m).unwrap().unwrap();
        assert_eq!((u.id, u.len), (id, i));
    }
    assert_eq!(q.next_avail(), d.next_avail());
}

#[test]
fn event_suppression_flags() {
    let (m, mut d, mut q) = setup(8, false, false);
    let round = |d: &mut PackedDriver, q: &mut PackedQueue| {
        d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
        let c = q.pop::<_, 4>(&m).unwrap().unwrap();
        q.add_used(&m, c.head(), 0).unwrap();
        let call = q.flush_used(&m).unwrap();
        d.harvest_all(&m).unwrap();
        call
    };
    assert!(round(&mut d, &mut q));
    d.set_driver_event(&m, 0, EVENT_FLAG_DISABLE).unwrap();
    assert!(!round(&mut d, &mut q));
    d.set_driver_event(&m, 0, EVENT_FLAG_ENABLE).unwrap();
    assert!(round(&mut d, &mut q));
    // DESC without EVENT_IDX negotiated: treated as enabled.
    d.set_driver_event(&m, 0x7fff, EVENT_FLAG_DESC).unwrap();
    assert!(round(&mut d, &mut q));
}

#[test]
fn event_idx_desc_event_decides_the_call() {
    let (m, mut d, mut q) = setup(4, true, false);
    let complete = |d: &mut PackedDriver, q: &mut PackedQueue, n: usize| {
        for _ in 0..n {
            d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
            let c = q.pop::<_, 4>(&m).unwrap().unwrap();
            q.add_used(&m, c.head(), 0).unwrap();
        }
        let call = q.flush_used(&m).unwrap();
        d.harvest_all(&m).unwrap();
        call
    };
    // First flush always calls.
    assert!(complete(&mut d, &mut q, 1));
    // Ask for a call once descriptor 2 (wrap 1) is used.
    d.set_driver_event(&m, 2 | 1 << 15, EVENT_FLAG_DESC)
        .unwrap();
    // Used position 1 -> 2: slot 2 not yet used.
    assert!(!complete(&mut d, &mut q, 1));
    // 2 -> 3: slot 2 used.
    assert!(complete(&mut d, &mut q, 1));
    // 3 -> 0 (wrap flips to 0): event (2, wrap 1) already passed.
    assert!(!complete(&mut d, &mut q, 1));
    // Event at slot 1 of the next lap (wrap 0): 0 -> 2 crosses it.
    d.set_driver_event(&m, 1, EVENT_FLAG_DESC).unwrap();
    assert!(complete(&mut d, &mut q, 2));
}

#[test]
fn enable_notification_writes_device_area() {
    let (m, mut d, mut q) = setup(8, true, false);
    q.disable_notification(&m).unwrap();
    assert_eq!(d.device_event(&m).unwrap().1, EVENT_FLAG_DISABLE);
    assert!(!d.kick_needed(&m).unwrap());
    d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
    q.pop::<_, 4>(&m).unwrap().unwrap();
    assert!(!q.enable_notification(&m).unwrap());
    assert_eq!(d.device_event(&m).unwrap(), (1 | 1 << 15, EVENT_FLAG_DESC));
    d.kick_needed(&m).unwrap();
    d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
    assert!(d.kick_needed(&m).unwrap());
    assert!(
        q.enable_notification(&m).unwrap(),
        "re-check sees the chain"
    );

    let (m, _d, mut q) = setup(8, false, false);
    q.disable_notification(&m).unwrap();
    q.enable_notification(&m).unwrap();
    assert_eq!(_d.device_event(&m).unwrap().1, EVENT_FLAG_ENABLE);
}

#[test]
fn get_and_set_base_resume_on_a_new_queue() {
    let (m, mut d, mut q) = setup(4, false, false);
    let mut ids = Vec::new();
    // Go round the ring once so the wrap counters are 0.
    for _ in 0..4 {
        d.post(&m, &[Buf::readable(DATA, 1)]).unwrap();
        let c = q.pop::<_, 4>(&m).unwrap().unwrap();
        q.add_used(&m, c.head(), 0).unwrap();
        q.flush_used(&m).unwrap();
        d.harvest_all(&m).unwrap();
    }
    for _ in 0..2 {
        ids.push(d.post(&m, &[Buf::readable(DATA, 1)]).unwrap());
    }
    let c = q.pop::<_, 4>(&m).unwrap().unwrap();
    assert_eq!(c.head().id, ids[0]);
    let base = q.base();
    // avail 1 wrap 0, used 0 wrap 0.
    assert_eq!(base, 1);
    let mut q2 = PackedQueue::new(4, d.addrs(), RingFeatures::default()).unwrap();
    q2.set_base(base).unwrap();
    assert_eq!(q2.pop::<_, 4>(&m).unwrap().unwrap().head().id, ids[1]);
    // The first chain is still completed at used slot 0.
    q2.add_used(&m, c.head(), 9).unwrap();
    q2.flush_used(&m).unwrap();
    assert_eq!(d.harvest(&m).unwrap().unwrap().id, ids[0]);
}

// ---- hostile cases -------------------------------------------------------

fn raw(addr: u64, len: u32, flags: u16) -> PackedDesc {
    PackedDesc {
        addr,
        len,
        id: 0,
        flags,
    }
}

fn refused(indirect: bool, descs: &[PackedDesc]) -> VringError {
    let (m, mut d, mut q) = setup(8, false, indirect);
    d.post_raw(&m, descs).unwrap();
    let e = pop(&mut q, &m).unwrap_err();
    assert_eq!(pop(&mut q, &m).unwrap_err(), e, "nothing consumed");
    assert_eq!(q.next_avail(), (0, true));
    e
}

const NX: u16 = DESC_F_NEXT;
const WR: u16 = DESC_F_WRITE;
const IND: u16 = DESC_F_INDIRECT;

#[test]
fn hostile_chain_longer_than_the_ring() {
    let (m, mut d, mut q) = setup(4, false, false);
    // Every slot has NEXT: the chain never ends within the ring.
    d.post_raw(&m, &[raw(DATA, 1, NX); 4]).unwrap();
    assert_eq!(pop(&mut q, &m).err(), Some(VringError::ChainLoop));
}

#[test]
fn hostile_packed_indirect_bad_lengths() {
    for len in [0u16, 8, 24] {
        assert_eq!(
            refused(true, &[raw(TABLE, len.into(), IND)]),
            VringError::IndirectBadLength(len)
        );
    }
    let len = 16 * (vhost_user_core::vring::MAX_INDIRECT_DESCS + 1);
    assert_eq!(
        refused(true, &[raw(0, len, IND)]),
        VringError::IndirectBadLength(u16::MAX)
    );
}

#[test]
fn hostile_packed_nested_indirect() {
    let (m, mut d, mut q) = setup(8, false, true);
    m.write(
        TABLE,
        &vhost_user_test::driver::encode_desc(TABLE + 0x100, 16, 0, IND),
    )
    .unwrap();
    d.post_raw(&m, &[raw(TABLE, 16, IND)]).unwrap();
    assert_eq!(pop(&mut q, &m).err(), Some(VringError::IndirectNested));
}

#[test]
fn hostile_packed_indirect_with_next_or_not_negotiated() {
    assert_eq!(
        refused(true, &[raw(TABLE, 16, IND | NX), raw(DATA, 1, 0)]),
        VringError::IndirectWithNext
    );
    assert_eq!(
        refused(false, &[raw(TABLE, 16, IND)]),
        VringError::IndirectNotNegotiated
    );
}

#[test]
fn hostile_packed_readable_after_writable() {
    assert_eq!(
        refused(false, &[raw(DATA, 1, WR | NX), raw(DATA, 1, 0)]),
        VringError::ReadableAfterWritable
    );
}

#[test]
fn hostile_packed_buffers_outside_memory() {
    assert_eq!(
        refused(false, &[raw(END - 1, 2, WR)]),
        VringError::BadBuffer
    );
    assert_eq!(refused(false, &[raw(END, 0, 0)]), VringError::BadBuffer);
    assert_eq!(
        refused(true, &[raw(END - 16, 32, IND)]),
        VringError::BadBuffer
    );
}

#[test]
fn hostile_packed_used_head_with_bad_slot_count() {
    let (m, _d, mut q) = setup(8, false, false);
    assert_eq!(
        q.add_used(&m, Head { id: 1, descs: 0 }, 0),
        Err(VringError::BadUsedHead(1))
    );
    assert_eq!(
        q.add_used(&m, Head { id: 1, descs: 9 }, 0),
        Err(VringError::BadUsedHead(1))
    );
}

#[test]
fn indirect_table_spanning_adjacent_regions_is_read_by_split_copy() {
    // Two adjacent regions (as two fds would be, with memory hotplug):
    // [0, END) and [END, END + 64 KiB).
    let m: TestMemory = TestMemory::new(&[(0, END), (END, 0x1_0000)]).unwrap();
    let mut d = PackedDriver::new(&m, 8, RING).unwrap();
    let mut q = PackedQueue::new(
        8,
        d.addrs(),
        RingFeatures {
            event_idx: false,
            indirect: true,
        },
    )
    .unwrap();
    // Eight descriptors; the fourth is split 8/8 across the boundary (its
    // address word in region 0, its length, id and flags in region 1), and
    // its buffer spans the boundary too.
    let table = END - 3 * 16 - 8;
    let mut bufs: Vec<Buf> = (0..8).map(|i| Buf::readable(DATA + 16 * i, 16)).collect();
    bufs[3] = Buf::readable(END - 4, 8);
    bufs[7] = Buf::writable(END + 0x100, 32);
    let id = d.post_indirect(&m, table, &bufs).unwrap();
    let c = pop(&mut q, &m).unwrap().unwrap();
    assert_eq!(c.head(), Head { id, descs: 1 });
    let want: Vec<Segment> = bufs
        .iter()
        .map(|b| seg(b.addr, b.len, b.writable))
        .collect();
    assert_eq!(c.segments(), want);
}

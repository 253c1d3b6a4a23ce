//! Cross-check: random valid chains go through our split ring and through
//! rust-vmm's `virtio-queue` (used only as an oracle) on identical guest
//! memory images; both must yield the same chains and write the same used
//! ring.
#![cfg(target_pointer_width = "64")] // rust-vmm's crates build for 64-bit hosts only
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use proptest::prelude::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vhost_user_core::memory::GuestMemory;
use vhost_user_core::vring::{Chain, RingFeatures, SplitQueue};
use vhost_user_test::{Buf, SplitDriver, TestMemory};

const MEM: u64 = 0x10_0000;
const RING: u64 = 0x1000;
const TABLES: u64 = 0x2_0000;
const DATA: u64 = 0x4_0000;

#[derive(Clone, Debug)]
struct ChainSpec {
    indirect: bool,
    /// (offset into data area, len), readable count first.
    bufs: Vec<(u32, u32)>,
    readable: usize,
}

fn chain_spec() -> impl Strategy<Value = ChainSpec> {
    (
        any::<bool>(),
        prop::collection::vec((0u32..0xb_0000, 1u32..0x1000), 1..6),
        0usize..6,
    )
        .prop_map(|(indirect, bufs, r)| ChainSpec {
            indirect,
            readable: r.min(bufs.len()),
            bufs,
        })
}

type Seg = (u64, u32, bool);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn split_ring_matches_virtio_queue(
        size_log in 1u32..6,
        start in any::<u16>(),
        chains in prop::collection::vec(chain_spec(), 1..40),
        lens in prop::collection::vec(any::<u32>(), 40),
    ) {
        let size = 1u16 << size_log;
        let m = TestMemory::<1>::new(&[(0, MEM)]).unwrap();
        let mut d = SplitDriver::new(&m, size, RING, false).unwrap();
        // Start both sides at an arbitrary index so 16-bit wrap is covered.
        d.set_avail_idx(&m, start).unwrap();
        m.store_u16_release(d.addrs().device + 2, start).unwrap();

        let mut posted = 0;
        for (i, c) in chains.iter().enumerate() {
            let bufs: Vec<Buf> = c
                .bufs
                .iter()
                .enumerate()
                .map(|(k, &(off, len))| Buf {
                    addr: DATA + u64::from(off),
                    len,
                    writable: k >= c.readable,
                })
                .collect();
            let r = if c.indirect {
                d.add_indirect(&m, TABLES + 0x100 * i as u64, &bufs)
            } else {
                d.add(&m, &bufs)
            };
            if r.is_err() {
                break;
            }
            posted += 1;
        }
        d.publish(&m).unwrap();

        // Same image for the oracle.
        let image = m.read_vec(0, MEM as usize).unwrap();
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        gm.write_slice(&image, GuestAddress(0)).unwrap();

        let a = d.addrs();
        let mut ours = SplitQueue::new(size, a, RingFeatures { event_idx: false, indirect: true }).unwrap();
        ours.set_next_avail(start);
        ours.sync_used(&m).unwrap();
        let mut theirs = Queue::new(size).unwrap();
        theirs.set_desc_table_address(Some(a.desc as u32), Some((a.desc >> 32) as u32));
        theirs.set_avail_ring_address(Some(a.driver as u32), Some((a.driver >> 32) as u32));
        theirs.set_used_ring_address(Some(a.device as u32), Some((a.device >> 32) as u32));
        theirs.set_next_avail(start);
        theirs.set_next_used(start);
        theirs.set_ready(true);
        prop_assert!(theirs.is_valid(&gm));

        let mut chain = Chain::<8>::new();
        let mut n = 0;
        loop {
            let got = ours.pop_into(&m, &mut chain).unwrap();
            let want = theirs.pop_descriptor_chain(&gm);
            prop_assert_eq!(got, want.is_some());
            let Some(want) = want else { break };
            prop_assert_eq!(chain.head().id, want.head_index());
            let want_segs: Vec<Seg> = want
                .clone()
                .map(|dsc| (dsc.addr().0, dsc.len(), dsc.is_write_only()))
                .collect();
            let got_segs: Vec<Seg> = chain
                .segments()
                .iter()
                .map(|s| (s.addr, s.len, s.writable))
                .collect();
            prop_assert_eq!(got_segs, want_segs);
            ours.add_used(&m, chain.head(), lens[n % lens.len()]).unwrap();
            theirs.add_used(&gm, want.head_index(), lens[n % lens.len()]).unwrap();
            n += 1;
        }
        prop_assert_eq!(n, posted);
        ours.flush_used(&m).unwrap();
        // Same used ring bytes (flags, idx, entries).
        let used_len = 4 + 8 * usize::from(size);
        let mut theirs_used = vec![0u8; used_len];
        gm.read_slice(&mut theirs_used, GuestAddress(a.device)).unwrap();
        prop_assert_eq!(m.read_vec(a.device, used_len).unwrap(), theirs_used);
        prop_assert_eq!(ours.next_avail(), theirs.next_avail());
    }
}

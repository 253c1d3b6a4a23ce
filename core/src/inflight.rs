//! Inflight I/O tracking (protocol feature INFLIGHT_SHMFD): the shared area
//! in which a back-end records the requests it fetched and has not
//! completed, so that a restarted back-end (or one stopped with
//! GET_VRING_BASE_INFLIGHT) resubmits them.
//!
//! The area is reached through the [`GuestMemory`] trait with addresses
//! that are byte offsets into the area; the core never holds a reference
//! into it. Everything read from the area is validated: a front-end (or a
//! crashed back-end) may have left anything there.
//!
//! # Layout
//!
//! Queue *i* starts at `i * stride` with
//! `stride = align_up(32 * (queue_size + 1), 64)` ([`queue_stride`]): room
//! for the larger of the two per-queue layouts (a 32-byte packed header and
//! 32-byte packed entries), so the area's size does not depend on the ring
//! format. Within a queue the layouts are those of the vhost-user
//! specification:
//!
//! - split ([`SplitInflight`]): a 16-byte header (features u64, version
//!   u16, desc_num u16, last_batch_head u16, used_idx u16), then one
//!   16-byte entry per descriptor (inflight u8, 5 padding bytes, next u16,
//!   counter u64);
//! - packed ([`PackedInflight`]): a header of features u64, version u16,
//!   desc_num u16, free_head u16, old_free_head u16, used_idx u16,
//!   old_used_idx u16, used_wrap_counter u8, old_used_wrap_counter u8, with
//!   the entries at byte 32 (natural C alignment), each 32 bytes: inflight
//!   u8, padding u8, next u16, last u16, num u16, counter u64, then a copy
//!   of the ring descriptor (id u16, flags u16, len u32, addr u64).
//!
//! All fields are little-endian. Version 0 is a fresh area.

use core::fmt;

use heapless::Vec;

use crate::memory::{GuestMemory, MemoryError};
use crate::vring::packed::{PackedQueue, DESC_F_AVAIL, DESC_F_USED};
use crate::vring::{Chain, VringError, DESC_F_INDIRECT, DESC_F_WRITE, MAX_QUEUE_SIZE};

/// Alignment of each queue's region.
pub const QUEUE_ALIGN: u64 = 64;

/// Most queues an area may describe (the protocol's limit on rings).
pub const MAX_INFLIGHT_QUEUES: u16 = 256;

/// The version we write into a fresh queue region.
pub const VERSION: u16 = 1;

/// Why an inflight area or an operation on it was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum InflightError {
    /// num_queues 0 or above [`MAX_INFLIGHT_QUEUES`].
    NumQueues(u16),
    /// queue_size 0 or above [`MAX_QUEUE_SIZE`].
    QueueSize(u16),
    /// The area is smaller than the layout needs (both sizes are logged).
    TooSmall,
    /// The region's desc_num differs from the ring size.
    SizeMismatch {
        /// desc_num recorded in the area.
        area: u16,
        /// The ring's size.
        ring: u16,
    },
    /// A version other than 0 (fresh) and 1.
    Version(u16),
    /// An inflight flag other than 0 or 1.
    BadFlag(u16),
    /// A list link or entry index at or above the ring size.
    OutOfRange(u16),
    /// A list visits more entries than the ring has.
    Cycle,
    /// The used index recorded in the area is further from the ring's
    /// than one ring's worth.
    UsedIndex {
        /// Recorded in the area.
        area: u16,
        /// Found in the ring.
        ring: u16,
    },
    /// More requests to resubmit than the caller's list holds.
    ListFull,
    /// A packed request records 0 descriptors or more than the ring size.
    BadCount(u16),
    /// The area is not accessible.
    Memory(MemoryError),
    /// A resubmitted request's descriptors are invalid.
    Vring(VringError),
}

const _: () = assert!(core::mem::size_of::<InflightError>() <= 8);

impl fmt::Display for InflightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InflightError::NumQueues(n) => write!(f, "inflight area for {n} queues"),
            InflightError::QueueSize(n) => write!(f, "inflight area for queue size {n}"),
            InflightError::TooSmall => f.write_str("inflight area smaller than its layout"),
            InflightError::SizeMismatch { area, ring } => {
                write!(
                    f,
                    "inflight area records {area} descriptors, the ring has {ring}"
                )
            }
            InflightError::Version(v) => write!(f, "inflight area version {v}"),
            InflightError::BadFlag(i) => write!(f, "inflight entry {i} has a bad flag"),
            InflightError::OutOfRange(i) => write!(f, "inflight link {i} out of range"),
            InflightError::Cycle => f.write_str("inflight list has a cycle"),
            InflightError::UsedIndex { area, ring } => {
                write!(
                    f,
                    "inflight used index {area} is far from the ring's {ring}"
                )
            }
            InflightError::ListFull => f.write_str("too many inflight requests for the list"),
            InflightError::BadCount(n) => write!(f, "inflight request of {n} descriptors"),
            InflightError::Memory(e) => write!(f, "inflight area: {e}"),
            InflightError::Vring(e) => write!(f, "resubmitted request: {e}"),
        }
    }
}

impl core::error::Error for InflightError {}

impl From<MemoryError> for InflightError {
    fn from(e: MemoryError) -> Self {
        InflightError::Memory(e)
    }
}

impl From<VringError> for InflightError {
    fn from(e: VringError) -> Self {
        InflightError::Vring(e)
    }
}

fn check_queue_size(queue_size: u16) -> Result<(), InflightError> {
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::QueueSize(queue_size));
    }
    Ok(())
}

/// Bytes of one queue's region: `align_up(32 * (queue_size + 1), 64)`.
pub fn queue_stride(queue_size: u16) -> u64 {
    (32 * (u64::from(queue_size) + 1)).next_multiple_of(QUEUE_ALIGN)
}

/// Bytes of the whole area for `num_queues` rings of `queue_size`.
pub fn area_size(num_queues: u16, queue_size: u16) -> Result<u64, InflightError> {
    if num_queues == 0 || num_queues > MAX_INFLIGHT_QUEUES {
        return Err(InflightError::NumQueues(num_queues));
    }
    check_queue_size(queue_size)?;
    Ok(u64::from(num_queues) * queue_stride(queue_size))
}

/// Checks an area description (SET_INFLIGHT_FD) and returns the offset of
/// each queue's region: queue *i* at `i * stride`.
pub fn check_area(num_queues: u16, queue_size: u16, mmap_size: u64) -> Result<u64, InflightError> {
    let need = area_size(num_queues, queue_size)?;
    if mmap_size < need {
        debug!(
            "inflight area of {} bytes, the layout needs {}",
            mmap_size, need
        );
        return Err(InflightError::TooSmall);
    }
    Ok(queue_stride(queue_size))
}

/// A request to resubmit: its head (split: head descriptor index; packed:
/// entry index in the area) and its fetch order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Resubmit {
    /// Split: head descriptor index. Packed: area entry of the request.
    pub head: u16,
    /// Fetch counter.
    pub counter: u64,
}

/// Where a region's entries are: entry `i` at `first + i * stride`, for
/// `i < size` (one type for both layouts, so the scans are compiled once).
#[derive(Clone, Copy, Debug)]
struct Entries {
    first: u64,
    stride: u64,
    size: u16,
}

impl Entries {
    fn at(&self, i: u16) -> u64 {
        self.first + self.stride * u64::from(i)
    }
}

/// Visits the entries of a region flagged in flight (byte 0 is 1; the fetch
/// counter is at byte 8, as in both layouts): `f` sees each one's index,
/// first 16 bytes and counter. Any other flag value is refused. Returns the
/// counter to continue from (one past the largest seen).
fn visit_in_flight<M: GuestMemory + ?Sized>(
    mem: &M,
    entries: Entries,
    mut f: impl FnMut(u16, &[u8; 16], u64) -> Result<(), InflightError>,
) -> Result<u64, InflightError> {
    let mut max = None;
    for i in 0..entries.size {
        let e = mem.read_16(entries.at(i))?;
        match e[0] {
            0 => {}
            1 => {
                let counter = entry_counter(&e);
                f(i, &e, counter)?;
                max = max.max(Some(counter));
            }
            _ => return Err(InflightError::BadFlag(i)),
        }
    }
    Ok(max.map_or(0, |m| m.wrapping_add(1)))
}

fn entry_counter(e: &[u8; 16]) -> u64 {
    let mut c = [0u8; 8];
    c.copy_from_slice(&e[8..16]);
    u64::from_le_bytes(c)
}

/// Lists into `out`, in fetch order, the entries of a region in flight;
/// `check` sees each one first. Returns the counter to continue from.
fn collect_in_flight<M: GuestMemory + ?Sized, const N: usize>(
    mem: &M,
    entries: Entries,
    out: &mut Vec<Resubmit, N>,
    mut check: impl FnMut(u16, &[u8; 16]) -> Result<(), InflightError>,
) -> Result<u64, InflightError> {
    let next = visit_in_flight(mem, entries, |head, e, counter| {
        check(head, e)?;
        out.push(Resubmit { head, counter })
            .map_err(|_| InflightError::ListFull)
    })?;
    out.sort_unstable_by_key(|r| (r.counter, r.head));
    Ok(next)
}

/// The entry in flight that comes next in fetch order after `after`
/// (ordered by counter, then index), without a list: one pass over the
/// region. This is how a data plane resubmits recorded requests one at a
/// time in the spec's order while holding no more than the last one.
fn next_in_flight<M: GuestMemory + ?Sized>(
    mem: &M,
    entries: Entries,
    after: Option<Resubmit>,
) -> Result<Option<Resubmit>, InflightError> {
    let floor = after.map(|r| (r.counter, r.head));
    let mut best: Option<Resubmit> = None;
    for i in 0..entries.size {
        let e = mem.read_16(entries.at(i))?;
        if e[0] != 1 {
            continue;
        }
        let key = (entry_counter(&e), i);
        if floor.is_some_and(|f| key <= f) {
            continue;
        }
        if best.is_none_or(|b| key < (b.counter, b.head)) {
            best = Some(Resubmit {
                head: i,
                counter: key.0,
            });
        }
    }
    Ok(best)
}

// ---------------------------------------------------------------- split --

const S_VERSION: u64 = 8;
const S_DESC_NUM: u64 = 10;
const S_LAST_BATCH_HEAD: u64 = 12;
const S_USED_IDX: u64 = 14;
const S_DESC: u64 = 16;
const S_ENTRY: u64 = 16;

/// One split ring's region of the area.
#[derive(Clone, Copy, Debug)]
pub struct SplitInflight {
    base: u64,
    size: u16,
    counter: u64,
}

impl SplitInflight {
    fn entry(&self, i: u16) -> u64 {
        self.entries().at(i)
    }

    fn entries(&self) -> Entries {
        Entries {
            first: self.base + S_DESC,
            stride: S_ENTRY,
            size: self.size,
        }
    }

    /// Opens the region at `base` for a ring of `size`. A fresh region
    /// (version 0) is initialised; otherwise its desc_num must be `size`.
    /// Returns the view and whether the region was fresh.
    pub fn open<M: GuestMemory + ?Sized>(
        mem: &M,
        base: u64,
        size: u16,
    ) -> Result<(Self, bool), InflightError> {
        check_queue_size(size)?;
        let me = SplitInflight {
            base,
            size,
            counter: 0,
        };
        mem.check(base, S_DESC + S_ENTRY * u64::from(size))?;
        let version = mem.read_u16(base + S_VERSION)?;
        match version {
            0 => {
                // Fresh: clear the entries (a zeroed memfd already is) and
                // stamp the header last.
                let zero = [0u8; 16];
                for i in 0..size {
                    mem.write(me.entry(i), &zero)?;
                }
                mem.write(base, &zero)?;
                mem.write_u16(base + S_DESC_NUM, size)?;
                mem.write_u16(base + S_VERSION, VERSION)?;
                Ok((me, true))
            }
            VERSION => {
                let n = mem.read_u16(base + S_DESC_NUM)?;
                if n != size {
                    return Err(InflightError::SizeMismatch {
                        area: n,
                        ring: size,
                    });
                }
                Ok((me, false))
            }
            v => Err(InflightError::Version(v)),
        }
    }

    /// After a restart: repairs the last batch if it was published to the
    /// ring (`ring_used_idx` is the guest's used.idx) but not fully
    /// recorded, then lists the requests still in flight in fetch order
    /// into `out`. The fetch counter continues after the largest one.
    /// The ring's next avail index is `ring_used_idx + out.len()`.
    pub fn recover<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        mem: &M,
        ring_used_idx: u16,
        out: &mut Vec<Resubmit, N>,
    ) -> Result<(), InflightError> {
        out.clear();
        self.repair(mem, ring_used_idx)?;
        self.counter = collect_in_flight(mem, self.entries(), out, |_, _| Ok(()))?;
        Ok(())
    }

    /// [`recover`](Self::recover) without a list: repairs the last batch
    /// and returns how many requests are in flight; hand them out with
    /// [`next_resubmit`](Self::next_resubmit).
    pub fn recover_count<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        ring_used_idx: u16,
    ) -> Result<u16, InflightError> {
        self.repair(mem, ring_used_idx)?;
        let mut n = 0u16;
        self.counter = visit_in_flight(mem, self.entries(), |_, _, _| {
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }

    /// The request in flight that follows `after` in fetch order (the
    /// first one for `None`).
    pub fn next_resubmit<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        after: Option<Resubmit>,
    ) -> Result<Option<Resubmit>, InflightError> {
        next_in_flight(mem, self.entries(), after)
    }

    fn repair<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        ring_used_idx: u16,
    ) -> Result<(), InflightError> {
        let used = mem.read_u16(self.base + S_USED_IDX)?;
        let batch = ring_used_idx.wrapping_sub(used);
        if batch > self.size {
            return Err(InflightError::UsedIndex {
                area: used,
                ring: ring_used_idx,
            });
        }
        if batch != 0 {
            // The batch reached the guest: its requests are complete.
            let mut i = mem.read_u16(self.base + S_LAST_BATCH_HEAD)?;
            for _ in 0..batch {
                if i >= self.size {
                    return Err(InflightError::OutOfRange(i));
                }
                mem.write(self.entry(i), &[0])?;
                i = mem.read_u16(self.entry(i) + 6)?;
            }
            mem.write_u16(self.base + S_USED_IDX, ring_used_idx)?;
        }
        Ok(())
    }

    /// Records that the request with head `head` was fetched.
    pub fn fetched<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
    ) -> Result<(), InflightError> {
        if head >= self.size {
            return Err(InflightError::OutOfRange(head));
        }
        let e = self.entry(head);
        mem.write_u64(e + 8, self.counter)?;
        self.counter = self.counter.wrapping_add(1);
        mem.store_fence();
        mem.write(e, &[1])?;
        Ok(())
    }

    /// Before publishing a used batch: links the batch's heads into the
    /// last-batch list.
    pub fn batch_begin<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        heads: &[u16],
    ) -> Result<(), InflightError> {
        let mut last = mem.read_u16(self.base + S_LAST_BATCH_HEAD)?;
        for &h in heads {
            if h >= self.size {
                return Err(InflightError::OutOfRange(h));
            }
            mem.write_u16(self.entry(h) + 6, last)?;
            last = h;
        }
        mem.write_u16(self.base + S_LAST_BATCH_HEAD, last)?;
        mem.store_fence();
        Ok(())
    }

    /// After publishing the batch (the ring's used.idx is now `used_idx`):
    /// the heads are no longer in flight.
    pub fn batch_end<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        heads: &[u16],
        used_idx: u16,
    ) -> Result<(), InflightError> {
        mem.store_fence();
        for &h in heads {
            if h >= self.size {
                return Err(InflightError::OutOfRange(h));
            }
            mem.write(self.entry(h), &[0])?;
        }
        mem.store_fence();
        mem.write_u16(self.base + S_USED_IDX, used_idx)?;
        Ok(())
    }
}

// --------------------------------------------------------------- packed --

const P_VERSION: u64 = 8;
const P_DESC_NUM: u64 = 10;
const P_FREE_HEAD: u64 = 12;
const P_OLD_FREE_HEAD: u64 = 14;
const P_USED_IDX: u64 = 16;
const P_OLD_USED_IDX: u64 = 18;
const P_USED_WRAP: u64 = 20;
const P_OLD_USED_WRAP: u64 = 21;
const P_DESC: u64 = 32;
const P_ENTRY: u64 = 32;

// Entry fields.
const E_NEXT: u64 = 2;
const E_LAST: u64 = 4;
const E_NUM: u64 = 6;
const E_COUNTER: u64 = 8;
const E_ID: u64 = 16;

/// A copy of one packed ring descriptor, as recorded in the area.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PackedDescCopy {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// Buffer id.
    pub id: u16,
    /// Descriptor flags.
    pub flags: u16,
}

/// The committed ring position after recovery: where the device's next
/// used descriptor goes and where its next available one is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PackedPosition {
    /// Next used slot and its wrap counter.
    pub used: (u16, bool),
    /// Next avail slot and its wrap counter (after the resubmitted
    /// requests' descriptors).
    pub avail: (u16, bool),
}

impl PackedPosition {
    /// The position in the GET/SET_VRING_BASE encoding of packed rings.
    pub fn base(&self) -> u32 {
        u32::from(self.avail.0)
            | u32::from(self.avail.1) << 15
            | u32::from(self.used.0) << 16
            | u32::from(self.used.1) << 31
    }
}

/// Whether the device made the descriptor at `slot` of `ring` used in the
/// round of wrap counter `wrap` (for [`PackedInflight::recover`]).
pub fn packed_used_at<M: GuestMemory + ?Sized>(
    guest: &M,
    ring: &PackedQueue,
    slot: u16,
    wrap: bool,
) -> Result<bool, InflightError> {
    let f = guest.load_u16_acquire(ring.addrs().desc + 16 * u64::from(slot) + 14)?;
    Ok((f & DESC_F_AVAIL != 0) == wrap && (f & DESC_F_USED != 0) == wrap)
}

/// One packed ring's region of the area.
#[derive(Clone, Copy, Debug)]
pub struct PackedInflight {
    base: u64,
    size: u16,
    counter: u64,
}

fn advance(pos: (u16, bool), n: u16, size: u16) -> (u16, bool) {
    let next = u32::from(pos.0) + u32::from(n);
    if next >= u32::from(size) {
        ((next - u32::from(size)) as u16, !pos.1)
    } else {
        (next as u16, pos.1)
    }
}

impl PackedInflight {
    fn entry(&self, i: u16) -> u64 {
        self.entries().at(i)
    }

    fn entries(&self) -> Entries {
        Entries {
            first: self.base + P_DESC,
            stride: P_ENTRY,
            size: self.size,
        }
    }

    fn link(&self, mem: &(impl GuestMemory + ?Sized), at: u64) -> Result<u16, InflightError> {
        let v = mem.read_u16(at)?;
        // `size` itself ends a list.
        if v > self.size {
            return Err(InflightError::OutOfRange(v));
        }
        Ok(v)
    }

    /// Opens the region at `base` for a packed ring of `size` whose device
    /// position is `used` (slot and wrap counter). A fresh region is
    /// initialised with every entry on the free list.
    pub fn open<M: GuestMemory + ?Sized>(
        mem: &M,
        base: u64,
        size: u16,
        used: (u16, bool),
    ) -> Result<(Self, bool), InflightError> {
        check_queue_size(size)?;
        let me = PackedInflight {
            base,
            size,
            counter: 0,
        };
        mem.check(base, P_DESC + P_ENTRY * u64::from(size))?;
        match mem.read_u16(base + P_VERSION)? {
            0 => {
                let mut e = [0u8; 32];
                for i in 0..size {
                    e[2..4].copy_from_slice(&(i + 1).to_le_bytes());
                    mem.write(me.entry(i), &e)?;
                }
                mem.write(base, &[0u8; 32])?;
                mem.write_u16(base + P_DESC_NUM, size)?;
                for (f, v) in [(P_USED_IDX, used.0), (P_OLD_USED_IDX, used.0)] {
                    mem.write_u16(base + f, v)?;
                }
                mem.write(base + P_USED_WRAP, &[u8::from(used.1), u8::from(used.1)])?;
                mem.write_u16(base + P_VERSION, VERSION)?;
                Ok((me, true))
            }
            VERSION => {
                let n = mem.read_u16(base + P_DESC_NUM)?;
                if n != size {
                    return Err(InflightError::SizeMismatch {
                        area: n,
                        ring: size,
                    });
                }
                Ok((me, false))
            }
            v => Err(InflightError::Version(v)),
        }
    }

    /// Records the descriptors of one fetched request, in ring order.
    /// Returns the request's area entry (what [`batch_begin`] and
    /// [`batch_end`] take).
    ///
    /// [`batch_begin`]: Self::batch_begin
    /// [`batch_end`]: Self::batch_end
    pub fn fetched<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        descs: &[PackedDescCopy],
    ) -> Result<u16, InflightError> {
        let n = u16::try_from(descs.len()).map_err(|_| InflightError::BadCount(u16::MAX))?;
        self.fetched_with(mem, n, |k| {
            descs
                .get(usize::from(k))
                .copied()
                .ok_or(InflightError::BadCount(n))
        })
    }

    /// [`fetched`](Self::fetched) for `n` descriptors produced one at a
    /// time by `desc(k)`, `k` in `0..n`: nothing is staged.
    pub fn fetched_with<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        n: u16,
        mut desc: impl FnMut(u16) -> Result<PackedDescCopy, InflightError>,
    ) -> Result<u16, InflightError> {
        if n == 0 || n > self.size {
            return Err(InflightError::BadCount(n));
        }
        let head = self.link(mem, self.base + P_OLD_FREE_HEAD)?;
        let mut free = self.link(mem, self.base + P_FREE_HEAD)?;
        if head >= self.size {
            return Err(InflightError::OutOfRange(head));
        }
        let h = self.entry(head);
        mem.write_u16(h + E_NUM, 0)?;
        mem.write_u64(h + E_COUNTER, self.counter)?;
        self.counter = self.counter.wrapping_add(1);
        mem.store_fence();
        mem.write(h, &[1])?;
        for k in 0..n {
            let d = desc(k)?;
            if free >= self.size {
                return Err(InflightError::OutOfRange(free));
            }
            if k + 1 == n {
                mem.write_u16(h + E_LAST, free)?;
            }
            mem.write_u16(h + E_NUM, k + 1)?;
            let e = self.entry(free);
            let mut copy = [0u8; 16];
            copy[0..2].copy_from_slice(&d.id.to_le_bytes());
            copy[2..4].copy_from_slice(&d.flags.to_le_bytes());
            copy[4..8].copy_from_slice(&d.len.to_le_bytes());
            copy[8..16].copy_from_slice(&d.addr.to_le_bytes());
            mem.write(e + E_ID, &copy)?;
            free = self.link(mem, e + E_NEXT)?;
            mem.write_u16(self.base + P_FREE_HEAD, free)?;
        }
        mem.store_fence();
        mem.write_u16(self.base + P_OLD_FREE_HEAD, free)?;
        Ok(head)
    }

    /// Records the chain `ring` just popped: the `descs` ring descriptors
    /// from slot `start`, copied again from guest memory (the driver does
    /// not touch them until they are used). Returns the area entry.
    pub fn fetched_from_ring<A: GuestMemory + ?Sized, M: GuestMemory + ?Sized>(
        &mut self,
        area: &A,
        guest: &M,
        ring: &PackedQueue,
        start: u16,
        descs: u16,
    ) -> Result<u16, InflightError> {
        let size = u32::from(ring.size());
        let table = ring.addrs().desc;
        self.fetched_with(area, descs, |k| {
            let slot = (u32::from(start) + u32::from(k)) % size;
            let (addr, len, id, flags) =
                crate::vring::decode_words(guest.read_desc(table + 16 * u64::from(slot))?);
            Ok(PackedDescCopy {
                addr,
                len,
                id,
                flags,
            })
        })
    }

    /// The area entry of the request whose head descriptor has buffer id
    /// `id`, among those in flight.
    pub fn entry_of<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        id: u16,
    ) -> Result<Option<u16>, InflightError> {
        for i in 0..self.size {
            let mut b = [0u8; 1];
            mem.read(self.entry(i), &mut b)?;
            if b[0] == 1 {
                // The buffer id of a request is that of its last descriptor.
                let last = self.link(mem, self.entry(i) + E_LAST)?;
                if last < self.size && mem.read_u16(self.entry(last) + E_ID)? == id {
                    return Ok(Some(i));
                }
            }
        }
        Ok(None)
    }

    /// Before publishing used descriptors: returns each completed
    /// request's entries (`entries`: area entry of each head) to the free
    /// list and advances the recorded used position by their descriptor
    /// counts.
    pub fn batch_begin<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        entries: &[u16],
    ) -> Result<(), InflightError> {
        let mut free = self.link(mem, self.base + P_FREE_HEAD)?;
        let mut pos = (
            mem.read_u16(self.base + P_USED_IDX)?,
            mem.read_u16(self.base + P_USED_WRAP)? & 0xff != 0,
        );
        for &h in entries {
            if h >= self.size {
                return Err(InflightError::OutOfRange(h));
            }
            let num = mem.read_u16(self.entry(h) + E_NUM)?;
            if num == 0 || num > self.size {
                return Err(InflightError::BadCount(num));
            }
            let last = self.link(mem, self.entry(h) + E_LAST)?;
            if last >= self.size {
                return Err(InflightError::OutOfRange(last));
            }
            mem.write_u16(self.entry(last) + E_NEXT, free)?;
            free = h;
            pos = advance(pos, num, self.size);
        }
        mem.write_u16(self.base + P_FREE_HEAD, free)?;
        mem.write_u16(self.base + P_USED_IDX, pos.0)?;
        mem.write(self.base + P_USED_WRAP, &[u8::from(pos.1)])?;
        mem.store_fence();
        Ok(())
    }

    /// After publishing: the requests are no longer in flight, and the
    /// new state is committed.
    pub fn batch_end<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        entries: &[u16],
    ) -> Result<(), InflightError> {
        mem.store_fence();
        for &h in entries {
            if h >= self.size {
                return Err(InflightError::OutOfRange(h));
            }
            mem.write(self.entry(h), &[0])?;
        }
        mem.store_fence();
        self.commit(mem)
    }

    fn commit<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), InflightError> {
        let free = mem.read_u16(self.base + P_FREE_HEAD)?;
        let used = mem.read_u16(self.base + P_USED_IDX)?;
        let mut wrap = [0u8; 1];
        mem.read(self.base + P_USED_WRAP, &mut wrap)?;
        mem.write_u16(self.base + P_OLD_FREE_HEAD, free)?;
        mem.write_u16(self.base + P_OLD_USED_IDX, used)?;
        mem.write(self.base + P_OLD_USED_WRAP, &wrap)?;
        Ok(())
    }

    /// After a restart: if the last batch reached the ring (the ring's
    /// descriptor at the old used position is marked used, read through
    /// `ring_used_at`) it is committed, otherwise rolled back; entries on
    /// the free list are not in flight; the rest are listed in fetch order
    /// in `out`. Returns the ring position to continue from.
    pub fn recover<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        mem: &M,
        ring_used_at: impl Fn(u16, bool) -> Result<bool, InflightError>,
        out: &mut Vec<Resubmit, N>,
    ) -> Result<PackedPosition, InflightError> {
        out.clear();
        let used = self.rollback(mem, ring_used_at)?;
        let mut slots: u32 = 0;
        let me = *self;
        self.counter = collect_in_flight(mem, self.entries(), out, |head, e| {
            count_slots(e, me.size, &mut slots)?;
            me.check_chain(mem, head, e)
        })?;
        self.position(used, slots)
    }

    /// [`recover`](Self::recover) without a list: returns the ring position
    /// and how many requests are in flight; hand them out with
    /// [`next_resubmit`](Self::next_resubmit).
    pub fn recover_count<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        ring_used_at: impl Fn(u16, bool) -> Result<bool, InflightError>,
    ) -> Result<(PackedPosition, u16), InflightError> {
        let used = self.rollback(mem, ring_used_at)?;
        let mut slots: u32 = 0;
        let mut n = 0u16;
        let me = *self;
        self.counter = visit_in_flight(mem, self.entries(), |head, e, _| {
            n += 1;
            count_slots(e, me.size, &mut slots)?;
            me.check_chain(mem, head, e)
        })?;
        Ok((self.position(used, slots)?, n))
    }

    /// The request in flight that follows `after` in fetch order (the
    /// first one for `None`); its `head` is its area entry.
    pub fn next_resubmit<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        after: Option<Resubmit>,
    ) -> Result<Option<Resubmit>, InflightError> {
        next_in_flight(mem, self.entries(), after)
    }

    /// Checks a request in flight at entry `head` (first bytes `e`) before
    /// it is resubmitted: its `num` descriptors are linked through entries
    /// of the area and the last of them is the one the request records.
    /// Recovery refuses the area otherwise, so a ring never starts with a
    /// request it could not hand out.
    fn check_chain<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        head: u16,
        e: &[u8; 16],
    ) -> Result<(), InflightError> {
        let num = u16::from_le_bytes([e[6], e[7]]);
        let last = u16::from_le_bytes([e[4], e[5]]);
        let mut i = head;
        for _ in 1..num {
            i = self.link(mem, self.entry(i) + E_NEXT)?;
            if i >= self.size {
                return Err(InflightError::OutOfRange(i));
            }
        }
        if i != last {
            return Err(InflightError::OutOfRange(last));
        }
        Ok(())
    }

    fn position(&self, used: (u16, bool), slots: u32) -> Result<PackedPosition, InflightError> {
        if slots > u32::from(self.size) {
            return Err(InflightError::BadCount(
                slots.min(u32::from(u16::MAX)) as u16
            ));
        }
        Ok(PackedPosition {
            used,
            avail: advance(used, slots as u16, self.size),
        })
    }

    /// Commits or rolls back the last batch, clears the in-flight flag of
    /// every entry on the free list and returns the used position.
    fn rollback<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        ring_used_at: impl Fn(u16, bool) -> Result<bool, InflightError>,
    ) -> Result<(u16, bool), InflightError> {
        let used = mem.read_u16(self.base + P_USED_IDX)?;
        let old_used = mem.read_u16(self.base + P_OLD_USED_IDX)?;
        let mut w = [0u8; 2];
        mem.read(self.base + P_USED_WRAP, &mut w)?;
        if used >= self.size || old_used >= self.size {
            return Err(InflightError::OutOfRange(used.max(old_used)));
        }
        if used != old_used || w[0] != w[1] {
            // A batch was recorded but not committed: did the guest see it?
            if ring_used_at(old_used, w[1] != 0)? {
                self.commit(mem)?;
            }
        }
        // Roll back to the committed state.
        let free = self.link(mem, self.base + P_OLD_FREE_HEAD)?;
        let used = mem.read_u16(self.base + P_OLD_USED_IDX)?;
        let mut ow = [0u8; 1];
        mem.read(self.base + P_OLD_USED_WRAP, &mut ow)?;
        mem.write_u16(self.base + P_FREE_HEAD, free)?;
        mem.write_u16(self.base + P_USED_IDX, used)?;
        mem.write(self.base + P_USED_WRAP, &ow)?;
        // Whatever is on the free list is not in flight (a fetch that was
        // cut short leaves its head there).
        let mut i = free;
        let mut steps = 0u32;
        while i < self.size {
            steps += 1;
            if steps > u32::from(self.size) {
                return Err(InflightError::Cycle);
            }
            mem.write(self.entry(i), &[0])?;
            i = self.link(mem, self.entry(i) + E_NEXT)?;
        }
        Ok((used, ow[0] != 0))
    }

    /// Rebuilds the chain of the request at area entry `head` from its
    /// recorded descriptors, one at a time (an indirect descriptor's table
    /// is read again from `guest`). The chain's head is its buffer id (the
    /// last descriptor's) and its descriptor count.
    pub fn chain_of<A: GuestMemory + ?Sized, M: GuestMemory + ?Sized, const S: usize>(
        &self,
        area: &A,
        guest: &M,
        indirect_ok: bool,
        head: u16,
        chain: &mut Chain<S>,
    ) -> Result<(), InflightError> {
        if head >= self.size {
            return Err(InflightError::OutOfRange(head));
        }
        let num = area.read_u16(self.entry(head) + E_NUM)?;
        if num == 0 || num > self.size {
            return Err(InflightError::BadCount(num));
        }
        chain.reset();
        let mut i = head;
        let mut id = 0;
        for k in 0..num {
            if i >= self.size {
                return Err(InflightError::OutOfRange(i));
            }
            let d = self.desc_copy(area, i)?;
            push_packed_desc(guest, indirect_ok, &d, chain)?;
            id = d.id;
            if k + 1 < num {
                i = self.link(area, self.entry(i) + E_NEXT)?;
            }
        }
        chain.set_head(crate::vring::Head { id, descs: num });
        Ok(())
    }

    fn desc_copy<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        i: u16,
    ) -> Result<PackedDescCopy, InflightError> {
        let mut c = [0u8; 16];
        mem.read(self.entry(i) + E_ID, &mut c)?;
        Ok(PackedDescCopy {
            id: u16::from_le_bytes([c[0], c[1]]),
            flags: u16::from_le_bytes([c[2], c[3]]),
            len: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            addr: u64::from_le_bytes([c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]]),
        })
    }

    /// The recorded descriptors of the request at area entry `head`, in
    /// ring order, into `out` (cleared first).
    pub fn descriptors<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: u16,
        out: &mut Vec<PackedDescCopy, N>,
    ) -> Result<(), InflightError> {
        out.clear();
        if head >= self.size {
            return Err(InflightError::OutOfRange(head));
        }
        let num = mem.read_u16(self.entry(head) + E_NUM)?;
        if num == 0 || num > self.size {
            return Err(InflightError::BadCount(num));
        }
        let mut i = head;
        for k in 0..num {
            if i >= self.size {
                return Err(InflightError::OutOfRange(i));
            }
            out.push(self.desc_copy(mem, i)?)
                .map_err(|_| InflightError::ListFull)?;
            if k + 1 < num {
                i = self.link(mem, self.entry(i) + E_NEXT)?;
            }
        }
        Ok(())
    }
}

/// Checks one packed request's descriptor count as recorded in an entry
/// (bytes 6-7) and adds it to `slots`.
fn count_slots(e: &[u8; 16], size: u16, slots: &mut u32) -> Result<(), InflightError> {
    let num = u16::from_le_bytes([e[6], e[7]]);
    if num == 0 || num > size {
        return Err(InflightError::BadCount(num));
    }
    *slots += u32::from(num);
    Ok(())
}

/// Appends one recorded packed descriptor (or the indirect table it points
/// to) to `chain`.
fn push_packed_desc<M: GuestMemory + ?Sized, const S: usize>(
    mem: &M,
    indirect_ok: bool,
    d: &PackedDescCopy,
    chain: &mut Chain<S>,
) -> Result<(), InflightError> {
    if d.flags & DESC_F_INDIRECT != 0 {
        let n = crate::vring::indirect_table(mem, indirect_ok, d.flags, d.addr, d.len)?;
        for i in 0..u64::from(n) {
            let (a, l, _, f) = crate::vring::decode_words(mem.read_desc(d.addr + 16 * i)?);
            if f & DESC_F_INDIRECT != 0 {
                return Err(VringError::IndirectNested.into());
            }
            chain.push_outlined(mem, a, l, f & DESC_F_WRITE != 0)?;
        }
    } else {
        chain.push_outlined(mem, d.addr, d.len, d.flags & DESC_F_WRITE != 0)?;
    }
    Ok(())
}

/// Rebuilds a packed request's chain from its recorded descriptors (an
/// indirect descriptor's table is read again from guest memory).
pub fn packed_chain<M: GuestMemory + ?Sized, const S: usize>(
    mem: &M,
    indirect_ok: bool,
    descs: &[PackedDescCopy],
    chain: &mut Chain<S>,
) -> Result<(), InflightError> {
    let last = descs.last().ok_or(InflightError::BadCount(0))?;
    chain.reset();
    for d in descs {
        push_packed_desc(mem, indirect_ok, d, chain)?;
    }
    chain.set_head(crate::vring::Head {
        id: last.id,
        descs: descs.len() as u16,
    });
    Ok(())
}

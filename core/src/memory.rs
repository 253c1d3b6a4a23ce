//! Guest memory: the access trait the vring engine uses, and the region
//! table built from SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG.
//!
//! Guest memory is shared with a guest that may change it at any moment, so
//! the core never holds a `&[u8]` into it. Everything goes through
//! [`GuestMemory`]: bytes are copied in and out, 16-bit ring indices are
//! loaded with acquire and stored with release ordering as single aligned
//! accesses. Adapters implement the trait: the Linux adapter over the
//! regions of a [`MemoryTable`] it has mmap'd, the test adapter over owned
//! buffers.
//!
//! All addresses given to [`GuestMemory`] are guest physical addresses
//! (GPAs). Ring addresses arrive from SET_VRING_ADDR as front-end virtual
//! addresses and are turned into GPAs once with
//! [`MemoryTable::translate_user`].

use core::fmt;

use heapless::Vec;

use crate::message::MemRegionMsg;

/// Why a guest memory access or a region table change was refused.
///
/// One byte, so that every `Result` of a guest memory access is returned
/// in registers (the size is asserted below): the refused address is not
/// part of the value. [`MemoryError::unmapped`] logs it (at debug level)
/// where the access fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MemoryError {
    /// Some byte of the accessed range is not backed by any region.
    Unmapped,
    /// `addr + len` does not fit in 64 bits.
    Overflow,
    /// A ring index access was not 2-byte aligned.
    Misaligned,
    /// A new region overlaps (or duplicates) an existing one, in guest
    /// physical or in front-end virtual addresses.
    Overlap,
    /// The region table is full.
    TableFull,
    /// REM_MEM_REG named a region that is not in the table.
    NoSuchRegion,
    /// A region of size 0, or whose end overflows.
    BadRegion,
    /// The memory cannot carry out this access (an atomic OR, see
    /// [`GuestMemory::fetch_or_u8`]).
    Unsupported,
}

const _: () = assert!(core::mem::size_of::<MemoryError>() == 1);

impl MemoryError {
    /// [`MemoryError::Unmapped`] for the range `[addr, addr + len)`, which
    /// is logged (at debug level) for the operator.
    #[inline]
    pub fn unmapped(addr: u64, len: u64) -> Self {
        debug!("guest range {:#x}+{:#x} is not mapped", addr, len);
        MemoryError::Unmapped
    }

    /// [`MemoryError::Misaligned`] for the ring index at `addr`, which is
    /// logged (at debug level) for the operator.
    #[inline]
    pub fn misaligned(addr: u64) -> Self {
        debug!("ring index address {:#x} is misaligned", addr);
        MemoryError::Misaligned
    }
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::Unmapped => f.write_str("guest range is not mapped"),
            MemoryError::Overflow => f.write_str("guest address range overflows"),
            MemoryError::Misaligned => f.write_str("ring index address is misaligned"),
            MemoryError::Overlap => f.write_str("memory region overlaps an existing region"),
            MemoryError::TableFull => f.write_str("memory region table is full"),
            MemoryError::NoSuchRegion => f.write_str("no such memory region"),
            MemoryError::BadRegion => f.write_str("memory region is empty or overflows"),
            MemoryError::Unsupported => f.write_str("access not supported by this memory"),
        }
    }
}

impl core::error::Error for MemoryError {}

/// Access to guest memory by guest physical address.
///
/// Implementations must be bounds-checked: an access to any byte that is
/// not backed by guest memory fails with [`MemoryError::Unmapped`] and
/// touches nothing. An access that spans two adjacent regions (the end of
/// one is the start of the next) may be performed as a split copy, or
/// refused; it must never read or write past a mapping.
///
/// Methods take `&self` so one memory object can be shared between the
/// threads that serve different queues; implementations use interior
/// mutability (volatile or atomic accesses over a mapping).
pub trait GuestMemory {
    /// Copy `dst.len()` bytes at `gpa` into `dst`.
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError>;

    /// Copy `src` to guest memory at `gpa`.
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError>;

    /// Load the little-endian 16-bit ring index at `gpa` (2-byte aligned)
    /// with acquire ordering, as one single aligned access.
    fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError>;

    /// Store the little-endian 16-bit ring index `v` at `gpa` (2-byte
    /// aligned) with release ordering, as one single aligned access.
    fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError>;

    /// A full memory fence (store-load ordering), used between publishing
    /// used entries and reading the guest's event index (EVENT_IDX), and
    /// between re-arming notifications and re-checking the ring.
    fn fence(&self);

    /// Orders the stores before it before the stores after it, as another
    /// process sees them (the inflight area's crash-safe records: a
    /// request is recorded before it is flagged, a batch linked before
    /// the used index is published). A release fence is enough; the
    /// default is the full [`fence`](Self::fence).
    fn store_fence(&self) {
        self.fence();
    }

    /// Check that every byte of `[gpa, gpa + len)` is backed by guest
    /// memory, without touching it. With `len == 0`, checks that `gpa`
    /// itself is a mapped address.
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError>;

    /// Atomically ORs `bits` into the byte at `gpa`: the dirty log's
    /// bitmap ([`crate::log`]), which the front-end reads and clears while
    /// several rings set bits in it. The default refuses with
    /// [`MemoryError::Unsupported`]: a read-modify-write made of
    /// [`read`](Self::read) and [`write`](Self::write) would lose bits
    /// set concurrently, so a memory that cannot OR atomically cannot hold
    /// a dirty log.
    fn fetch_or_u8(&self, gpa: u64, bits: u8) -> Result<(), MemoryError> {
        let _ = (gpa, bits);
        Err(MemoryError::Unsupported)
    }

    /// Read a little-endian `u16` (no ordering guarantee).
    #[inline]
    fn read_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Read 16 bytes (one descriptor).
    #[inline]
    fn read_16(&self, gpa: u64) -> Result<[u8; 16], MemoryError> {
        let mut b = [0u8; 16];
        self.read(gpa, &mut b)?;
        Ok(b)
    }

    /// Read one 16-byte descriptor as two little-endian `u64` words
    /// (bytes 0-7 and 8-15), with one copy.
    #[inline]
    fn read_desc(&self, gpa: u64) -> Result<[u64; 2], MemoryError> {
        let b = self.read_16(gpa)?;
        Ok(desc_words(&b))
    }

    /// Write a little-endian `u16` (no ordering guarantee).
    #[inline]
    fn write_u16(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Write a little-endian `u32` (no ordering guarantee).
    #[inline]
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Write a little-endian `u64` (no ordering guarantee; `gpa` need only
    /// be 4-aligned, as a used-ring element is).
    #[inline]
    fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

/// The two little-endian `u64` words of a 16-byte descriptor copy.
#[inline(always)]
pub fn desc_words(b: &[u8; 16]) -> [u64; 2] {
    let (lo, hi) = b.split_at(8);
    let mut a = [0u8; 8];
    a.copy_from_slice(lo);
    let mut c = [0u8; 8];
    c.copy_from_slice(hi);
    [u64::from_le_bytes(a), u64::from_le_bytes(c)]
}

impl<M: GuestMemory + ?Sized> GuestMemory for &M {
    #[inline]
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read(gpa, dst)
    }
    #[inline]
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        (**self).write(gpa, src)
    }
    #[inline]
    fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError> {
        (**self).load_u16_acquire(gpa)
    }
    #[inline]
    fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        (**self).store_u16_release(gpa, v)
    }
    #[inline]
    fn fence(&self) {
        (**self).fence()
    }
    #[inline]
    fn store_fence(&self) {
        (**self).store_fence()
    }
    #[inline]
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        (**self).check(gpa, len)
    }
    #[inline]
    fn fetch_or_u8(&self, gpa: u64, bits: u8) -> Result<(), MemoryError> {
        (**self).fetch_or_u8(gpa, bits)
    }
    #[inline]
    fn read_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        (**self).read_u16(gpa)
    }
    #[inline]
    fn read_16(&self, gpa: u64) -> Result<[u8; 16], MemoryError> {
        (**self).read_16(gpa)
    }
    #[inline]
    fn read_desc(&self, gpa: u64) -> Result<[u64; 2], MemoryError> {
        (**self).read_desc(gpa)
    }
    #[inline]
    fn write_u16(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        (**self).write_u16(gpa, v)
    }
    #[inline]
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemoryError> {
        (**self).write_u32(gpa, v)
    }
    #[inline]
    fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        (**self).write_u64(gpa, v)
    }
}

/// Where a guest physical address lives: the answer of
/// [`MemoryTable::translate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Translation {
    /// Slot of the region (stable while the region is in the table; the
    /// adapter keeps its mapping under this index).
    pub slot: usize,
    /// Offset of the address from the start of the region.
    pub offset: u64,
    /// Bytes from the address to the end of the region (at least 1).
    pub remaining: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    region: MemRegionMsg,
    slot: u16,
}

impl Entry {
    /// Last guest physical address (inclusive; regions are never empty).
    fn gpa_last(&self) -> u64 {
        self.region.guest_addr + (self.region.size - 1)
    }
}

/// The table of guest memory regions, up to `N` of them.
///
/// Each region has a stable slot number in `0..N`, assigned when it is
/// added (SET_MEM_TABLE assigns slots in message order, matching the fd
/// order; ADD_MEM_REG takes the lowest free slot) and kept until it is
/// removed. Adapters keep their mapping of a region under its slot.
///
/// Regions never overlap, neither in guest physical addresses nor in
/// front-end virtual addresses; a change that would make them overlap is
/// refused and leaves the table unchanged.
#[derive(Clone, Debug)]
pub struct MemoryTable<const N: usize = 8> {
    /// Sorted by guest address.
    entries: Vec<Entry, N>,
}

/// Swaps entries `i - 1` and `i` through two disjoint borrows, which
/// compiles to plain loads and stores (`slice::swap` may call memmove).
fn swap_adjacent(entries: &mut [Entry], i: usize) {
    if let (Some(a), Some(b)) = (i.checked_sub(1), Some(i)) {
        let (lo, hi) = entries.split_at_mut(b);
        if let (Some(x), Some(y)) = (lo.get_mut(a), hi.first_mut()) {
            core::mem::swap(x, y);
        }
    }
}

impl<const N: usize> Default for MemoryTable<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> MemoryTable<N> {
    /// An empty table.
    pub const fn new() -> Self {
        MemoryTable {
            entries: Vec::new(),
        }
    }

    /// A table holding `regions` in slots `0..regions.len()` (SET_MEM_TABLE).
    pub fn from_regions(regions: &[MemRegionMsg]) -> Result<Self, MemoryError> {
        let mut t = Self::new();
        if regions.len() > N {
            return Err(MemoryError::TableFull);
        }
        for (slot, r) in regions.iter().enumerate() {
            t.insert(*r, slot as u16)?;
        }
        Ok(t)
    }

    /// Replace the whole table (SET_MEM_TABLE). On error the table is left
    /// unchanged.
    pub fn set(&mut self, regions: &[MemRegionMsg]) -> Result<(), MemoryError> {
        *self = Self::from_regions(regions)?;
        Ok(())
    }

    /// Remove every region.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the table holds no region.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Add one region (ADD_MEM_REG) in the lowest free slot, returned.
    pub fn add(&mut self, region: MemRegionMsg) -> Result<usize, MemoryError> {
        if self.entries.is_full() {
            return Err(MemoryError::TableFull);
        }
        let slot = (0..N)
            .find(|s| !self.entries.iter().any(|e| usize::from(e.slot) == *s))
            .ok_or(MemoryError::TableFull)?;
        self.insert(region, slot as u16)?;
        Ok(slot)
    }

    /// Remove the region matching `region` by guest address, front-end
    /// address and size (REM_MEM_REG; the mmap offset is ignored). Returns
    /// the slot it occupied.
    pub fn remove(&mut self, region: &MemRegionMsg) -> Result<usize, MemoryError> {
        let pos = self
            .entries
            .iter()
            .position(|e| {
                e.region.guest_addr == region.guest_addr
                    && e.region.user_addr == region.user_addr
                    && e.region.size == region.size
            })
            .ok_or(MemoryError::NoSuchRegion)?;
        // Bubble it to the end and pop: the order of the others is kept,
        // with no memmove (a bare-metal build pays 1.5 KiB for one).
        for i in pos + 1..self.entries.len() {
            swap_adjacent(&mut self.entries, i);
        }
        let e = self.entries.pop().ok_or(MemoryError::NoSuchRegion)?;
        Ok(usize::from(e.slot))
    }

    /// The region in `slot`, if any.
    pub fn get(&self, slot: usize) -> Option<&MemRegionMsg> {
        self.entries
            .iter()
            .find(|e| usize::from(e.slot) == slot)
            .map(|e| &e.region)
    }

    /// The regions and their slots, in guest address order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &MemRegionMsg)> + '_ {
        self.entries
            .iter()
            .map(|e| (usize::from(e.slot), &e.region))
    }

    /// One past the last guest physical address of the highest region (0
    /// when the table is empty): what a dirty log must cover.
    pub fn end(&self) -> u64 {
        // Sorted by guest address and never overlapping: the last region
        // ends highest.
        self.entries
            .last()
            .map_or(0, |e| e.region.guest_addr.saturating_add(e.region.size))
    }

    fn insert(&mut self, region: MemRegionMsg, slot: u16) -> Result<(), MemoryError> {
        if region.size == 0 {
            return Err(MemoryError::BadRegion);
        }
        let last = region.size - 1;
        let gpa_last = region
            .guest_addr
            .checked_add(last)
            .ok_or(MemoryError::BadRegion)?;
        let va_last = region
            .user_addr
            .checked_add(last)
            .ok_or(MemoryError::BadRegion)?;
        region
            .mmap_offset
            .checked_add(last)
            .ok_or(MemoryError::BadRegion)?;
        for e in self.entries.iter() {
            let r = &e.region;
            let overlap_gpa = region.guest_addr <= e.gpa_last() && r.guest_addr <= gpa_last;
            let overlap_va =
                region.user_addr <= r.user_addr + (r.size - 1) && r.user_addr <= va_last;
            if overlap_gpa || overlap_va {
                return Err(MemoryError::Overlap);
            }
        }
        let pos = self
            .entries
            .iter()
            .position(|e| e.region.guest_addr > region.guest_addr)
            .unwrap_or(self.entries.len());
        self.entries
            .push(Entry { region, slot })
            .map_err(|_| MemoryError::TableFull)?;
        // Bubble it down to its place (see `remove`).
        for i in (pos + 1..self.entries.len()).rev() {
            swap_adjacent(&mut self.entries, i);
        }
        Ok(())
    }

    #[inline]
    fn find_gpa(&self, gpa: u64) -> Option<&Entry> {
        // Last entry whose start is <= gpa.
        let idx = self.entries.partition_point(|e| e.region.guest_addr <= gpa);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        (gpa <= e.gpa_last()).then_some(e)
    }

    /// Where guest physical address `gpa` lives.
    #[inline]
    pub fn translate(&self, gpa: u64) -> Result<Translation, MemoryError> {
        let e = self
            .find_gpa(gpa)
            .ok_or_else(|| MemoryError::unmapped(gpa, 1))?;
        let offset = gpa - e.region.guest_addr;
        Ok(Translation {
            slot: usize::from(e.slot),
            offset,
            remaining: e.region.size - offset,
        })
    }

    /// Check that `[gpa, gpa + len)` is backed by regions. The range may
    /// span adjacent regions (one ends where the next begins). With
    /// `len == 0`, checks that `gpa` itself is mapped.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let unmapped = || MemoryError::unmapped(gpa, len);
        if len == 0 {
            return self.find_gpa(gpa).map(|_| ()).ok_or_else(unmapped);
        }
        let last = gpa.checked_add(len - 1).ok_or(MemoryError::Overflow)?;
        let mut at = gpa;
        // Each step moves to the next region: at most N steps.
        for _ in 0..self.entries.len() {
            let e = self.find_gpa(at).ok_or_else(unmapped)?;
            let end = e.gpa_last();
            if end >= last {
                return Ok(());
            }
            at = end + 1;
        }
        Err(unmapped())
    }

    /// Translate a front-end virtual address (SET_VRING_ADDR, or a GPA when
    /// GPA_ADDRESSES is negotiated and the front-end sends GPAs as user
    /// addresses) into a guest physical address.
    pub fn translate_user(&self, va: u64) -> Result<u64, MemoryError> {
        self.entries
            .iter()
            .find(|e| va >= e.region.user_addr && va - e.region.user_addr < e.region.size)
            .map(|e| e.region.guest_addr + (va - e.region.user_addr))
            .ok_or_else(|| MemoryError::unmapped(va, 1))
    }

    /// Translate the front-end virtual range `[va, va + len)`, which must lie
    /// inside one region, into a guest physical address.
    pub fn translate_user_range(&self, va: u64, len: u64) -> Result<u64, MemoryError> {
        let last = va
            .checked_add(len.saturating_sub(1))
            .ok_or(MemoryError::Overflow)?;
        let e = self
            .entries
            .iter()
            .find(|e| va >= e.region.user_addr && va - e.region.user_addr < e.region.size)
            .ok_or_else(|| MemoryError::unmapped(va, len))?;
        if last - e.region.user_addr >= e.region.size {
            return Err(MemoryError::unmapped(va, len));
        }
        Ok(e.region.guest_addr + (va - e.region.user_addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(gpa: u64, size: u64, va: u64) -> MemRegionMsg {
        MemRegionMsg {
            guest_addr: gpa,
            size,
            user_addr: va,
            mmap_offset: 0,
            xen: None,
        }
    }

    #[test]
    fn set_table_assigns_slots_in_order_and_translates() {
        let t = MemoryTable::<4>::from_regions(&[
            reg(0x10_0000, 0x1000, 0x7000_0000),
            reg(0, 0x1000, 0x6000_0000),
        ])
        .unwrap();
        assert_eq!(
            t.translate(0x10_0010).unwrap(),
            Translation {
                slot: 0,
                offset: 0x10,
                remaining: 0xff0
            }
        );
        assert_eq!(
            t.translate(0xfff).unwrap(),
            Translation {
                slot: 1,
                offset: 0xfff,
                remaining: 1
            }
        );
        assert_eq!(t.translate(0x1000), Err(MemoryError::Unmapped));
        assert!(t.translate(0x10_1000).is_err());
        assert_eq!(t.translate_user(0x6000_0004).unwrap(), 4);
        assert_eq!(t.translate_user(0x7000_0fff).unwrap(), 0x10_0fff);
        assert!(t.translate_user(0x7000_1000).is_err());
        assert!(t.translate_user(0x5fff_ffff).is_err());
    }

    #[test]
    fn overlapping_and_duplicate_regions_are_refused() {
        let mut t = MemoryTable::<4>::new();
        t.add(reg(0x1000, 0x1000, 0x10_0000)).unwrap();
        // Duplicate.
        assert_eq!(
            t.add(reg(0x1000, 0x1000, 0x10_0000)),
            Err(MemoryError::Overlap)
        );
        // GPA overlap by one byte at either end.
        assert_eq!(
            t.add(reg(0x1fff, 0x10, 0x20_0000)),
            Err(MemoryError::Overlap)
        );
        assert_eq!(
            t.add(reg(0x0, 0x1001, 0x20_0000)),
            Err(MemoryError::Overlap)
        );
        // Front-end address overlap.
        assert_eq!(
            t.add(reg(0x8000, 0x10, 0x10_0fff)),
            Err(MemoryError::Overlap)
        );
        // Adjacent is fine.
        assert_eq!(t.add(reg(0x2000, 0x1000, 0x10_1000)), Ok(1));
        assert_eq!(t.len(), 2);
        // SET_MEM_TABLE with overlapping regions is refused whole.
        assert_eq!(
            t.set(&[reg(0, 0x2000, 0), reg(0x1000, 0x10, 0x10_0000)]),
            Err(MemoryError::Overlap)
        );
        assert_eq!(t.len(), 2, "failed set leaves the table unchanged");
    }

    #[test]
    fn region_end_overflow_and_empty_refused() {
        let mut t = MemoryTable::<4>::new();
        assert_eq!(t.add(reg(u64::MAX, 2, 0)), Err(MemoryError::BadRegion));
        assert_eq!(t.add(reg(0, 2, u64::MAX)), Err(MemoryError::BadRegion));
        assert_eq!(t.add(reg(0, 0, 0)), Err(MemoryError::BadRegion));
        // A region ending exactly at the top of the address space is fine.
        assert_eq!(t.add(reg(u64::MAX - 0xfff, 0x1000, 0)), Ok(0));
        assert_eq!(t.check(u64::MAX, 1), Ok(()));
        assert_eq!(t.check(u64::MAX, 2), Err(MemoryError::Overflow));
        assert_eq!(t.translate(u64::MAX).unwrap().remaining, 1);
    }

    #[test]
    fn add_remove_reuses_slots_and_rem_ignores_offset() {
        let mut t = MemoryTable::<2>::new();
        assert_eq!(t.add(reg(0, 0x1000, 0)), Ok(0));
        assert_eq!(t.add(reg(0x1000, 0x1000, 0x1000)), Ok(1));
        assert_eq!(
            t.add(reg(0x4000, 0x1000, 0x4000)),
            Err(MemoryError::TableFull)
        );
        let mut rem = reg(0, 0x1000, 0);
        rem.mmap_offset = 0x1234;
        assert_eq!(t.remove(&rem), Ok(0));
        assert_eq!(t.remove(&rem), Err(MemoryError::NoSuchRegion));
        // Size must match.
        assert_eq!(
            t.remove(&reg(0x1000, 0x800, 0x1000)),
            Err(MemoryError::NoSuchRegion)
        );
        assert!(t.translate(0x10).is_err());
        assert_eq!(t.translate(0x1010).unwrap().slot, 1);
        assert_eq!(t.add(reg(0x8000, 0x1000, 0x8000)), Ok(0));
        assert_eq!(t.get(0).unwrap().guest_addr, 0x8000);
        assert_eq!(
            t.iter().map(|(s, _)| s).collect::<std::vec::Vec<_>>(),
            [1, 0]
        );
        assert!(MemoryTable::<1>::from_regions(&[reg(0, 1, 0), reg(1, 1, 1)]).is_err());
    }

    #[test]
    fn check_spans_adjacent_regions_but_not_holes() {
        let t = MemoryTable::<4>::from_regions(&[
            reg(0, 0x1000, 0x10_0000),
            reg(0x1000, 0x1000, 0x50_0000),
            reg(0x3000, 0x1000, 0x90_0000),
        ])
        .unwrap();
        assert_eq!(t.check(0xff0, 0x20), Ok(()));
        assert_eq!(t.check(0, 0x2000), Ok(()));
        assert!(t.check(0, 0x2001).is_err());
        assert!(t.check(0x1ff0, 0x20).is_err(), "hole at 0x2000");
        assert!(t.check(0x2000, 0).is_err());
        assert_eq!(t.check(0x3fff, 0), Ok(()));
        assert!(t.check(0x3fff, 2).is_err());
        assert_eq!(t.check(0x10, u64::MAX), Err(MemoryError::Overflow));
        // A user range must lie in one region.
        assert_eq!(t.translate_user_range(0x10_0ff0, 0x10), Ok(0xff0));
        assert!(t.translate_user_range(0x10_0ff0, 0x11).is_err());
        assert!(t.translate_user_range(u64::MAX, 2).is_err());
    }
}

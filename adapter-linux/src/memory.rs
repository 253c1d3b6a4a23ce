//! Guest memory mapped from the fds of SET_MEM_TABLE / ADD_MEM_REG,
//! implementing the core's [`GuestMemory`] trait.
//!
//! The session's [`MemoryTable`](vhost_user_core::memory::MemoryTable)
//! decides which regions exist and in which slot; this type only holds the
//! mappings, keyed by the same slots, and translates guest physical
//! addresses to them. Accesses that span two adjacent regions are split,
//! so a buffer, an indirect table or a single descriptor may straddle two
//! regions from different fds (memory hotplug).
//!
//! # Files that shrink
//!
//! A mapped file that shrinks under its mapping raises SIGBUS on the next
//! access to the lost pages, which would kill the daemon; catching SIGBUS
//! and jumping out of a copy cannot be done soundly in Rust. So
//! [`LinuxGuestMemory::map`] first makes sure the file can no longer
//! shrink, then checks its size covers the region:
//!
//! - a file already sealed with `F_SEAL_SHRINK` (QEMU's
//!   `memory-backend-memfd`, whose `seal` property is on by default) is
//!   mapped;
//! - a memfd that allows sealing gets `F_SEAL_SHRINK` from us, then is
//!   mapped: the front-end can no longer shrink it (it can still write
//!   it, grow it or punch holes in it, none of which faults);
//! - a memfd that cannot be sealed (created without `MFD_ALLOW_SEALING`,
//!   as `memory-backend-memfd,seal=off` does) is refused;
//! - any other file (`memory-backend-file` on tmpfs or hugetlbfs, a file
//!   on another file system) cannot be sealed and is mapped anyway, so
//!   QEMU's file backends keep working: its owner (the front-end, or
//!   whoever else may write the file) can still truncate it and crash the
//!   daemon with SIGBUS. Trusting that owner not to is what remains.
//!
//! # I/O straight into guest memory
//!
//! [`LinuxGuestMemory::io_bufs`] hands out the host ranges of a guest
//! buffer as [`IoBuf`]s for the kernel to read into or write from
//! (io_uring, a thread pool) after the worker's round, and so after the
//! memory lock, is over. Each holds a reference to its mapping: a region
//! the front-end removes (SET_MEM_TABLE, REM_MEM_REG) while I/O on it is
//! in flight leaves the table at once, but stays mapped until the last
//! such I/O completes, so the kernel never writes into an address that a
//! new mapping reused. The I/O then lands in memory the guest no longer
//! sees, which is what a guest that changes its memory under a request
//! in flight gets anyway.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vhost_user_core::log::LoggedMemory;
use vhost_user_core::memory::{GuestMemory, MemoryError};
use vhost_user_core::message::MemRegionMsg;

use crate::sys::memfd::{self, ShrinkSeal};
use crate::sys::mmap::{Access, AccessError, IoBuf, MmapRegion};

#[derive(Debug)]
struct Region {
    slot: usize,
    gpa: u64,
    size: u64,
    map: Arc<MmapRegion>,
}

impl Region {
    fn end(&self) -> u64 {
        // Cannot overflow: checked when mapped.
        self.gpa + self.size
    }
}

/// The guest memory a device's requests write through: the mapped memory,
/// with the writes marked in the dirty log while VHOST_F_LOG_ALL is on
/// (see [`vhost_user_core::log`]). I/O the kernel does straight into
/// guest memory ([`LinuxGuestMemory::io_bufs`] of
/// [`inner`](LoggedMemory::inner)) is reported with
/// [`mark`](LoggedMemory::mark) once it is done.
pub type Mapped<'a> = LoggedMemory<'a, LinuxGuestMemory, LinuxGuestMemory>;

/// The mapped guest memory of one front-end connection.
#[derive(Debug, Default)]
pub struct LinuxGuestMemory {
    /// Never overlapping; the largest first.
    regions: Vec<Region>,
}

fn access_err(e: AccessError, addr: u64, len: u64) -> MemoryError {
    match e {
        AccessError::Misaligned => MemoryError::misaligned(addr),
        AccessError::OutOfBounds | AccessError::ReadOnly => MemoryError::unmapped(addr, len),
    }
}

impl LinuxGuestMemory {
    /// No memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// `size` bytes of `fd` from `offset` as one region at address 0: the
    /// inflight area (SET_INFLIGHT_FD), addressed by byte offset.
    pub fn single(fd: OwnedFd, offset: u64, size: u64) -> io::Result<Self> {
        let mut m = Self::new();
        let region = MemRegionMsg {
            guest_addr: 0,
            size,
            user_addr: 0,
            mmap_offset: offset,
            xen: None,
        };
        m.map(0, region, fd)?;
        Ok(m)
    }

    /// Maps `region` from `fd` into `slot` (replacing what was there). The
    /// fd is closed once mapped, as the mapping keeps the memory alive.
    ///
    /// The file is sealed against shrinking first if it allows it; a memfd
    /// that can shrink and cannot be sealed is refused (see the module
    /// documentation on files that shrink).
    pub fn map(&mut self, slot: usize, region: MemRegionMsg, fd: OwnedFd) -> io::Result<()> {
        self.map_trusting(slot, region, fd, false)
    }

    /// [`map`](Self::map), and with `trust_unsealable` a memfd that cannot
    /// be sealed is mapped too, like a plain file: the front-end is
    /// trusted not to shrink it (DPDK's virtio-user without hugepages
    /// shares such memfds). A shrink would kill the daemon with SIGBUS.
    pub fn map_trusting(
        &mut self,
        slot: usize,
        region: MemRegionMsg,
        fd: OwnedFd,
        trust_unsealable: bool,
    ) -> io::Result<()> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        let end = region
            .guest_addr
            .checked_add(region.size)
            .ok_or_else(|| invalid("region end overflows"))?;
        self.unmap(slot);
        if self
            .regions
            .iter()
            .any(|r| region.guest_addr < r.end() && r.gpa < end)
        {
            return Err(invalid("region overlaps a mapped region"));
        }
        // Seal before the size check in `MmapRegion::map`, so the size it
        // checks is the size for good.
        if memfd::seal_shrink(fd.as_fd())? == ShrinkSeal::Unsealable
            && !trust_unsealable
            && memfd::is_memfd(fd.as_fd())
        {
            return Err(invalid(
                "a memfd that can shrink and cannot be sealed with F_SEAL_SHRINK \
                 (created without MFD_ALLOW_SEALING); a shrink would raise SIGBUS",
            ));
        }
        let map = MmapRegion::map(
            fd.as_fd(),
            region.mmap_offset,
            region.size,
            Access::ReadWrite,
        )?;
        drop(fd);
        // Largest first: `find` tries the first region before the others.
        let pos = self.regions.partition_point(|r| r.size >= region.size);
        self.regions.insert(
            pos,
            Region {
                slot,
                gpa: region.guest_addr,
                size: region.size,
                map: Arc::new(map),
            },
        );
        Ok(())
    }

    /// Unmaps `slot` if it is mapped.
    pub fn unmap(&mut self, slot: usize) {
        self.regions.retain(|r| r.slot != slot);
    }

    /// Unmaps everything.
    pub fn clear(&mut self) {
        self.regions.clear();
    }

    /// Number of mapped regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// True if nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The region holding `gpa`.
    #[inline(always)]
    fn find(&self, gpa: u64) -> Option<&Region> {
        // Few regions (QEMU uses one to a handful): a linear scan beats a
        // binary search. The first region, the largest (most of guest RAM,
        // where most buffers are), is tried before the loop.
        let (first, rest) = self.regions.split_first()?;
        if gpa.wrapping_sub(first.gpa) < first.size {
            return Some(first);
        }
        rest.iter().find(|r| gpa.wrapping_sub(r.gpa) < r.size)
    }

    /// The region holding all of `[gpa, gpa + len)` and the offset in it.
    #[inline(always)]
    fn within(&self, gpa: u64, len: u64) -> Option<(&Region, u64)> {
        let r = self.find(gpa)?;
        let off = gpa - r.gpa;
        (r.size - off >= len).then_some((r, off))
    }

    /// `f` of the `N` bytes at `gpa`: the mapping checks the bounds once; a
    /// range that leaves its region takes the general path. (`f` applied
    /// here, not by the caller, keeps the bytes out of a `Result` in
    /// memory.)
    #[inline(always)]
    fn read_array_as<const N: usize, T>(
        &self,
        gpa: u64,
        f: impl Fn(&[u8; N]) -> T,
    ) -> Result<T, MemoryError> {
        if let Some(r) = self.find(gpa) {
            if let Ok(v) = r.map.read_array(gpa - r.gpa) {
                return Ok(f(&v));
            }
        }
        self.read_array_slow(gpa).map(|v| f(&v))
    }

    #[cold]
    #[inline(never)]
    fn read_array_slow<const N: usize>(&self, gpa: u64) -> Result<[u8; N], MemoryError> {
        let mut b = [0u8; N];
        self.read(gpa, &mut b)?;
        Ok(b)
    }

    #[inline(always)]
    fn write_array<const N: usize>(&self, gpa: u64, v: [u8; N]) -> Result<(), MemoryError> {
        if let Some(r) = self.find(gpa) {
            if r.map.write_array(gpa - r.gpa, v).is_ok() {
                return Ok(());
            }
        }
        self.write_array_slow(gpa, v)
    }

    #[cold]
    #[inline(never)]
    fn write_array_slow<const N: usize>(&self, gpa: u64, v: [u8; N]) -> Result<(), MemoryError> {
        self.write(gpa, &v)
    }

    /// Prefetches the cache lines of the first `len` bytes at `gpa` (at
    /// most `MAX_LINES` of them), a hint issued for buffers a batch will
    /// touch soon so their cache misses overlap. Unmapped bytes are
    /// skipped; `write` fetches the lines for writing.
    #[inline]
    pub fn prefetch_range(&self, gpa: u64, len: u32, write: bool) {
        const LINE: u64 = 64;
        const MAX_LINES: u64 = 2;
        let Some(r) = self.find(gpa) else { return };
        let off = gpa - r.gpa;
        let end = off
            .saturating_add(u64::from(len))
            .min(off + MAX_LINES * LINE);
        let mut at = off & !(LINE - 1);
        while at < end {
            r.map.prefetch(at.max(off), write);
            at += LINE;
        }
    }

    /// Appends to `out` the host ranges of `[gpa, gpa + len)`, one per
    /// region it crosses, each keeping its mapping alive (see the module
    /// documentation); `writable` if the I/O stores into them. Fails,
    /// appending nothing, if any byte is not mapped.
    pub fn io_bufs(
        &self,
        gpa: u64,
        len: u64,
        writable: bool,
        out: &mut Vec<IoBuf>,
    ) -> Result<(), MemoryError> {
        let start = out.len();
        let r = self.pieces(gpa, len, |r, off, _, n| {
            let b = IoBuf::new(&r.map, off, n, writable).map_err(|e| access_err(e, gpa, len))?;
            out.push(b);
            Ok(())
        });
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    /// [`GuestMemory::check`] of a range that is not inside one region.
    #[cold]
    #[inline(never)]
    fn check_slow(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Err(MemoryError::unmapped(gpa, 0));
        }
        self.pieces(gpa, len, |_, _, _, _| Ok(()))
    }

    /// Runs `f(region, offset in region, range start, range length)` over
    /// the pieces of `[gpa, gpa + len)`, which must be fully mapped.
    fn pieces(
        &self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(&Region, u64, usize, usize) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        let unmapped = || MemoryError::unmapped(gpa, len);
        gpa.checked_add(len).ok_or(MemoryError::Overflow)?;
        let mut done = 0u64;
        loop {
            let at = gpa + done;
            let r = self.find(at).ok_or_else(unmapped)?;
            let n = (len - done).min(r.end() - at);
            f(r, at - r.gpa, done as usize, n as usize)?;
            done += n;
            if done == len {
                return Ok(());
            }
        }
    }
}

impl GuestMemory for LinuxGuestMemory {
    #[inline]
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let len = dst.len() as u64;
        if len == 0 {
            return self.check(gpa, 0);
        }
        if let Some((r, off)) = self.within(gpa, len) {
            return r.map.read(off, dst).map_err(|e| access_err(e, gpa, len));
        }
        self.pieces(gpa, len, |r, off, start, n| {
            r.map
                .read(off, &mut dst[start..start + n])
                .map_err(|e| access_err(e, gpa, len))
        })
    }

    #[inline]
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        let len = src.len() as u64;
        if len == 0 {
            return self.check(gpa, 0);
        }
        if let Some((r, off)) = self.within(gpa, len) {
            return r.map.write(off, src).map_err(|e| access_err(e, gpa, len));
        }
        self.pieces(gpa, len, |r, off, start, n| {
            r.map
                .write(off, &src[start..start + n])
                .map_err(|e| access_err(e, gpa, len))
        })
    }

    #[inline]
    fn read_16(&self, gpa: u64) -> Result<[u8; 16], MemoryError> {
        self.read_array_as(gpa, |b| *b)
    }

    #[inline(always)]
    fn read_desc(&self, gpa: u64) -> Result<[u64; 2], MemoryError> {
        self.read_array_as(gpa, vhost_user_core::memory::desc_words)
    }

    #[inline]
    fn read_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        self.read_array_as(gpa, |b| u16::from_le_bytes(*b))
    }

    #[inline]
    fn write_u16(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        self.write_array(gpa, v.to_le_bytes())
    }

    #[inline]
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemoryError> {
        self.write_array(gpa, v.to_le_bytes())
    }

    #[inline(always)]
    fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.write_array(gpa, v.to_le_bytes())
    }

    #[inline]
    fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError> {
        if gpa % 2 != 0 {
            return Err(MemoryError::misaligned(gpa));
        }
        let r = self
            .find(gpa)
            .ok_or_else(|| MemoryError::unmapped(gpa, 2))?;
        r.map
            .load_u16_acquire(gpa - r.gpa)
            .map_err(|e| access_err(e, gpa, 2))
    }

    #[inline]
    fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        if gpa % 2 != 0 {
            return Err(MemoryError::misaligned(gpa));
        }
        let r = self
            .find(gpa)
            .ok_or_else(|| MemoryError::unmapped(gpa, 2))?;
        r.map
            .store_u16_release(gpa - r.gpa, v)
            .map_err(|e| access_err(e, gpa, 2))
    }

    #[inline]
    fn fetch_or_u8(&self, gpa: u64, bits: u8) -> Result<(), MemoryError> {
        let r = self
            .find(gpa)
            .ok_or_else(|| MemoryError::unmapped(gpa, 1))?;
        r.map
            .fetch_or_u8(gpa - r.gpa, bits)
            .map_err(|e| access_err(e, gpa, 1))
    }

    fn fence(&self) {
        fence(Ordering::SeqCst);
    }

    #[inline]
    fn store_fence(&self) {
        fence(Ordering::Release);
    }

    #[inline(always)]
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        // `within` finds the region holding `gpa`, so with `len == 0` it
        // checks that `gpa` is mapped.
        if self.within(gpa, len).is_some() {
            return Ok(());
        }
        self.check_slow(gpa, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn region(gpa: u64, size: u64, off: u64) -> MemRegionMsg {
        MemRegionMsg {
            guest_addr: gpa,
            size,
            user_addr: gpa.wrapping_add(0x7000_0000),
            mmap_offset: off,
            xen: None,
        }
    }

    #[test]
    fn split_copies_across_adjacent_regions_and_refuses_holes() {
        let fd = memfd::create("guest", 0x4000).unwrap();
        let mut m = LinuxGuestMemory::new();
        m.map(0, region(0x1000, 0x1000, 0x2000), fd.try_clone().unwrap())
            .unwrap();
        m.map(1, region(0x2000, 0x1000, 0x100), fd.try_clone().unwrap())
            .unwrap();
        m.map(2, region(0x8000, 0x1000, 0), fd).unwrap();
        m.write(0x1ffe, b"abcd").unwrap();
        let mut b = [0u8; 4];
        m.read(0x1ffe, &mut b).unwrap();
        assert_eq!(&b, b"abcd");
        // The second half landed at fd offset 0x100 (slot 1).
        let mut c = [0u8; 2];
        m.read(0x2000, &mut c).unwrap();
        assert_eq!(&c, b"cd");
        assert_eq!(m.read(0x2ffe, &mut b), Err(MemoryError::Unmapped));
        // Fixed-size accessors take the split path across the boundary too.
        m.write_u64(0x1ffc, 0x0807_0605_0403_0201).unwrap();
        assert_eq!(m.read_16(0x1ff8).unwrap()[4..12], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(m.read_u16(0x1ffe).unwrap(), 0x0403);
        let d = m.read_desc(0x1ff8).unwrap();
        assert_eq!(
            d,
            vhost_user_core::memory::desc_words(&m.read_16(0x1ff8).unwrap())
        );
        assert_eq!(d[0] >> 32, 0x0403_0201);
        assert_eq!(m.read_desc(0x2ff8), Err(MemoryError::Unmapped));
        // A zero-length check asks whether the address itself is mapped.
        assert!(m.check(0x2fff, 0).is_ok());
        assert_eq!(m.check(0x3000, 0), Err(MemoryError::Unmapped));
        assert!(m.check(0x1000, 0x2000).is_ok());
        assert!(m.check(0x1000, 0x2001).is_err());
        assert_eq!(m.check(u64::MAX, 2), Err(MemoryError::Overflow));
        assert_eq!(m.load_u16_acquire(0x1001), Err(MemoryError::Misaligned));
        m.store_u16_release(0x8002, 7).unwrap();
        assert_eq!(m.load_u16_acquire(0x8002).unwrap(), 7);
        m.unmap(1);
        assert!(m.read(0x1ffe, &mut b).is_err());
        assert_eq!(m.len(), 2);
        m.clear();
        assert!(m.is_empty());
    }

    #[test]
    fn two_memfds_at_adjacent_addresses_read_as_one_range() {
        // Memory hotplug: GPA-contiguous regions from different fds.
        let a = memfd::create("guest-a", 0x2000).unwrap();
        let b = memfd::create("guest-b", 0x3000).unwrap();
        let mut m = LinuxGuestMemory::new();
        m.map(0, region(0x10_0000, 0x2000, 0), a).unwrap();
        m.map(1, region(0x10_2000, 0x2000, 0x1000), b.try_clone().unwrap())
            .unwrap();
        // A 64-byte indirect table whose second descriptor is split 8/8.
        let mut table = [0u8; 64];
        for (i, d) in table.chunks_exact_mut(16).enumerate() {
            d[..8].copy_from_slice(&(0xa000 + i as u64).to_le_bytes());
            d[8..12].copy_from_slice(&(0x10 * i as u32 + 1).to_le_bytes());
            d[12..14].copy_from_slice(&1u16.to_le_bytes());
            d[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
        }
        let at = 0x10_2000 - 16 - 8;
        m.write(at, &table).unwrap();
        assert!(m.check(at, 64).is_ok());
        for i in 0..4u64 {
            let [w0, w1] = m.read_desc(at + 16 * i).unwrap();
            assert_eq!(w0, 0xa000 + i, "address word of descriptor {i}");
            assert_eq!(w1 as u32, 0x10 * i as u32 + 1, "length of descriptor {i}");
            assert_eq!((w1 >> 48) as u16, i as u16 + 1, "next of descriptor {i}");
            let mut d = [0u8; 16];
            d.copy_from_slice(&table[16 * i as usize..16 * i as usize + 16]);
            assert_eq!(m.read_16(at + 16 * i).unwrap(), d);
        }
        // The bytes past the boundary are in the second fd, from its
        // mmap offset.
        let mut tail = [0u8; 40];
        FileExt::read_exact_at(&std::fs::File::from(b), &mut tail, 0x1000).unwrap();
        assert_eq!(tail[..], table[24..]);
        // Past the second region: refused whole.
        assert!(m.check(0x10_4000 - 8, 16).is_err());
        assert!(m.read_desc(0x10_4000 - 8).is_err());
    }

    #[test]
    fn seals_a_memfd_against_shrinking_and_refuses_an_unsealable_one() {
        let fd = memfd::create("guest", 0x2000).unwrap();
        let mut m = LinuxGuestMemory::new();
        m.map(0, region(0, 0x2000, 0), fd.try_clone().unwrap())
            .unwrap();
        let e = std::fs::File::from(fd).set_len(0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "shrink refused");
        m.write(0x1ff0, &[1; 16]).unwrap();
        // Cannot be sealed and could shrink: refused, nothing mapped.
        let bad = memfd::create_unsealable("guest", 0x1000).unwrap();
        let e = m.map(1, region(0x4000, 0x1000, 0), bad).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(m.len(), 1);
        // A plain file cannot be sealed either but is mapped (QEMU's
        // memory-backend-file): documented as the remaining risk.
        let path = std::env::temp_dir().join(format!("vhu-mem-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.set_len(0x1000).unwrap();
        m.map(2, region(0x8000, 0x1000, 0), f.into()).unwrap();
        m.write(0x8000, b"file").unwrap();
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn io_bufs_split_at_regions_and_keep_an_unmapped_region_alive() {
        let fd = memfd::create("guest", 0x4000).unwrap();
        let mut m = LinuxGuestMemory::new();
        m.map(0, region(0x1000, 0x1000, 0), fd.try_clone().unwrap())
            .unwrap();
        m.map(1, region(0x2000, 0x1000, 0x3000), fd).unwrap();
        let mut bufs = Vec::new();
        m.io_bufs(0x1f00, 0x200, true, &mut bufs).unwrap();
        assert_eq!(bufs.len(), 2);
        assert_eq!((bufs[0].len(), bufs[1].len()), (0x100, 0x100));
        assert!(bufs.iter().all(|b| b.writable()));
        assert!(!bufs[0].same_mapping(&bufs[1]));
        // Not mapped in part: nothing appended.
        assert!(m.io_bufs(0x2f00, 0x200, false, &mut bufs).is_err());
        assert_eq!(bufs.len(), 2);
        assert!(m.io_bufs(u64::MAX, 2, false, &mut bufs).is_err());
        // The table lets go of slot 1; the buffer still holds its mapping,
        // which stays readable and writable through the address.
        assert_eq!(bufs[1].mapping_refs(), 2);
        m.unmap(1);
        assert_eq!(bufs[1].mapping_refs(), 1);
        let addr = bufs[1].addr();
        assert_ne!(addr, 0);
        drop(bufs);
    }

    #[test]
    fn refuses_overlap_and_short_files() {
        let fd = memfd::create("guest", 0x2000).unwrap();
        let mut m = LinuxGuestMemory::new();
        m.map(0, region(0x1000, 0x1000, 0), fd.try_clone().unwrap())
            .unwrap();
        assert!(m
            .map(1, region(0x1800, 0x1000, 0), fd.try_clone().unwrap())
            .is_err());
        assert!(m
            .map(1, region(0x4000, 0x3000, 0), fd.try_clone().unwrap())
            .is_err());
        assert!(m.map(1, region(u64::MAX - 10, 0x1000, 0), fd).is_err());
        assert_eq!(m.len(), 1);
    }
}

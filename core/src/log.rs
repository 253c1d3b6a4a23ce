//! Dirty-page logging for live migration (LOG_SHMFD, VHOST_F_LOG_ALL,
//! VHOST_VRING_F_LOG).
//!
//! While a guest migrates, the front-end copies its memory in passes and
//! needs to know which pages changed since the last pass. Pages the guest
//! writes are tracked by the hypervisor; pages the *back-end* writes (the
//! data of a read request, a status byte, the used ring) are reported by
//! the back-end in a bitmap the front-end shares with it (SET_LOG_BASE):
//!
//! - one bit per 4 KiB page of **guest physical** address space, from
//!   address 0: the page `gpa / 4096` is bit `page % 8` of byte `page / 8`;
//! - bits are only ever set by the back-end, with an atomic OR (the
//!   front-end reads and clears them concurrently, and several rings set
//!   them from several threads);
//! - a bit is set *after* the write it reports, so that a front-end pass
//!   that clears it either saw the new bytes or finds the bit again.
//!
//! This module holds the bitmap arithmetic, over a log area the host
//! maps and accesses through [`GuestMemory::fetch_or_u8`] (the area is
//! addressed by byte offset, like the inflight area):
//!
//! - [`DirtyLog`]: the log area and its size; [`mark`](DirtyLog::mark) sets
//!   the bits of a written range, refusing (never clamping) a range the
//!   log does not cover;
//! - [`LoggedMemory`]: a [`GuestMemory`] that forwards to another and marks
//!   every write it carries out, for the device's writes into descriptor
//!   buffers while VHOST_F_LOG_ALL is negotiated; a host that writes guest
//!   memory by other means (the kernel, through io_uring) reports those
//!   writes with [`LoggedMemory::mark`] once they are done;
//! - [`bitmap_bytes`]: the log size a guest memory needs, which
//!   SET_LOG_BASE is checked against.
//!
//! Used-ring writes are logged per ring when SET_VRING_ADDR carries
//! VHOST_VRING_F_LOG, at the ring's log address
//! ([`DataPlane::log_used`](crate::dataplane::DataPlane::log_used)).

use core::cell::Cell;
use core::fmt;

use crate::memory::{GuestMemory, MemoryError};

/// Bytes of guest memory one bit of the log stands for.
pub const LOG_PAGE_SIZE: u64 = 0x1000;
/// `log2(LOG_PAGE_SIZE)`.
pub const LOG_PAGE_SHIFT: u32 = 12;

/// Why a range could not be marked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LogError {
    /// The range's last page has no bit in the log (the log is smaller
    /// than the guest memory it must cover).
    BeyondLog,
    /// The range's end overflows 64 bits.
    Overflow,
    /// The log area refused the access (not mapped that far, or a memory
    /// that cannot OR atomically).
    Memory(MemoryError),
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::BeyondLog => f.write_str("range beyond the dirty log"),
            LogError::Overflow => f.write_str("range overflows"),
            LogError::Memory(e) => write!(f, "dirty log area: {e}"),
        }
    }
}

impl core::error::Error for LogError {}

/// Bytes of bitmap that cover guest physical addresses up to `end`
/// (exclusive): one bit per page, the last page included.
pub const fn bitmap_bytes(end: u64) -> u64 {
    if end == 0 {
        return 0;
    }
    ((end - 1) >> LOG_PAGE_SHIFT) / 8 + 1
}

/// A dirty log: `size` bytes of bitmap at offset 0 of `area`.
#[derive(Debug)]
pub struct DirtyLog<'a, L: ?Sized> {
    area: &'a L,
    size: u64,
}

impl<L: ?Sized> Clone for DirtyLog<'_, L> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<L: ?Sized> Copy for DirtyLog<'_, L> {}

impl<'a, L: GuestMemory + ?Sized> DirtyLog<'a, L> {
    /// The log of `size` bytes in `area` (byte offset 0 is the bit of
    /// guest page 0).
    pub fn new(area: &'a L, size: u64) -> Self {
        DirtyLog { area, size }
    }

    /// The log's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the log has a bit for every page below `end`.
    pub fn covers(&self, end: u64) -> bool {
        bitmap_bytes(end) <= self.size
    }

    /// Whether the pages `[gpa, gpa + len)` touches can be marked: what
    /// [`mark`](Self::mark) refuses (a range that overflows, pages the log
    /// has no bit for), with nothing marked.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), LogError> {
        self.pages(gpa, len).map(|_| ())
    }

    /// The first and last page `[gpa, gpa + len)` touches (`None`: an
    /// empty range), refused as [`check`](Self::check) says.
    fn pages(&self, gpa: u64, len: u64) -> Result<Option<(u64, u64)>, LogError> {
        if len == 0 {
            return Ok(None);
        }
        let last = gpa.checked_add(len - 1).ok_or(LogError::Overflow)?;
        let (first, last) = (gpa >> LOG_PAGE_SHIFT, last >> LOG_PAGE_SHIFT);
        if last / 8 >= self.size {
            return Err(LogError::BeyondLog);
        }
        Ok(Some((first, last)))
    }

    /// Sets the bits of the pages `[gpa, gpa + len)` touches; returns how
    /// many pages that is (0 for an empty range). A range whose last page
    /// has no bit is refused whole, before any bit is set.
    pub fn mark(&self, gpa: u64, len: u64) -> Result<u64, LogError> {
        let Some((first, last)) = self.pages(gpa, len)? else {
            return Ok(0);
        };
        let mut page = first;
        while page <= last {
            let byte = page / 8;
            // Pages of this byte from `page` to `last` (at most 8).
            let from = page % 8;
            let to = if last / 8 == byte { last % 8 } else { 7 };
            let bits = (0xffu8 << from) & (0xffu8 >> (7 - to));
            self.area
                .fetch_or_u8(byte, bits)
                .map_err(LogError::Memory)?;
            page = (byte + 1) * 8;
        }
        Ok(last - first + 1)
    }
}

/// Guest memory whose writes are marked in a dirty log: every write
/// through it goes to `mem`, then (when a log is set) sets the bits of the
/// pages it touched. Reads, index loads and checks go straight to `mem`.
///
/// A write whose pages cannot be marked (beyond the log) still happened;
/// it is reported as [`MemoryError::Unmapped`] so the request fails
/// rather than migrate a page the front-end was never told about, and
/// counted in [`failed`](Self::failed).
#[derive(Debug)]
pub struct LoggedMemory<'a, M: ?Sized, L: ?Sized> {
    mem: &'a M,
    log: Option<DirtyLog<'a, L>>,
    pages: Cell<u64>,
    failed: Cell<u64>,
}

impl<'a, M: GuestMemory + ?Sized, L: GuestMemory + ?Sized> LoggedMemory<'a, M, L> {
    /// `mem`, its writes marked in `log` (none: not logged).
    pub fn new(mem: &'a M, log: Option<DirtyLog<'a, L>>) -> Self {
        LoggedMemory {
            mem,
            log,
            pages: Cell::new(0),
            failed: Cell::new(0),
        }
    }

    /// The memory written through.
    pub fn inner(&self) -> &'a M {
        self.mem
    }

    /// Whether writes are being logged.
    pub fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// Marks `[gpa, gpa + len)`, written by other means (the kernel doing
    /// I/O into guest memory), once the write is done. Nothing without a
    /// log.
    pub fn mark(&self, gpa: u64, len: u64) -> Result<(), LogError> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        match log.mark(gpa, len) {
            Ok(n) => {
                self.pages.set(self.pages.get().wrapping_add(n));
                Ok(())
            }
            Err(e) => {
                self.failed.set(self.failed.get().wrapping_add(1));
                Err(e)
            }
        }
    }

    /// Pages marked so far through this value.
    pub fn pages(&self) -> u64 {
        self.pages.get()
    }

    /// Writes (or [`mark`](Self::mark)s) whose pages could not be marked.
    pub fn failed(&self) -> u64 {
        self.failed.get()
    }

    #[inline]
    fn logged(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if self.log.is_none() {
            return Ok(());
        }
        self.mark(gpa, len).map_err(|_| MemoryError::Unmapped)
    }
}

impl<M: GuestMemory + ?Sized, L: GuestMemory + ?Sized> GuestMemory for LoggedMemory<'_, M, L> {
    #[inline]
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        self.mem.read(gpa, dst)
    }
    #[inline]
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        self.mem.write(gpa, src)?;
        self.logged(gpa, src.len() as u64)
    }
    #[inline]
    fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError> {
        self.mem.load_u16_acquire(gpa)
    }
    #[inline]
    fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        self.mem.store_u16_release(gpa, v)?;
        self.logged(gpa, 2)
    }
    #[inline]
    fn fence(&self) {
        self.mem.fence()
    }
    #[inline]
    fn store_fence(&self) {
        self.mem.store_fence()
    }
    #[inline]
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.mem.check(gpa, len)
    }
    #[inline]
    fn fetch_or_u8(&self, gpa: u64, bits: u8) -> Result<(), MemoryError> {
        self.mem.fetch_or_u8(gpa, bits)?;
        self.logged(gpa, 1)
    }
    #[inline]
    fn read_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        self.mem.read_u16(gpa)
    }
    #[inline]
    fn read_16(&self, gpa: u64) -> Result<[u8; 16], MemoryError> {
        self.mem.read_16(gpa)
    }
    #[inline]
    fn read_desc(&self, gpa: u64) -> Result<[u64; 2], MemoryError> {
        self.mem.read_desc(gpa)
    }
    #[inline]
    fn write_u16(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        self.mem.write_u16(gpa, v)?;
        self.logged(gpa, 2)
    }
    #[inline]
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemoryError> {
        self.mem.write_u32(gpa, v)?;
        self.logged(gpa, 4)
    }
    #[inline]
    fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.mem.write_u64(gpa, v)?;
        self.logged(gpa, 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::vec::Vec;

    /// A byte array with atomic OR, at address 0.
    struct Bytes(Vec<AtomicU8>);

    impl Bytes {
        fn new(n: usize) -> Self {
            Bytes((0..n).map(|_| AtomicU8::new(0)).collect())
        }
        fn get(&self, i: u64) -> Result<&AtomicU8, MemoryError> {
            usize::try_from(i)
                .ok()
                .and_then(|i| self.0.get(i))
                .ok_or(MemoryError::Unmapped)
        }
        fn snapshot(&self) -> Vec<u8> {
            self.0.iter().map(|b| b.load(Ordering::Relaxed)).collect()
        }
    }

    impl GuestMemory for Bytes {
        fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = self.get(gpa + i as u64)?.load(Ordering::Relaxed);
            }
            Ok(())
        }
        fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
            self.check(gpa, src.len() as u64)?;
            for (i, s) in src.iter().enumerate() {
                self.get(gpa + i as u64)?.store(*s, Ordering::Relaxed);
            }
            Ok(())
        }
        fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError> {
            self.read_u16(gpa)
        }
        fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
            self.write_u16(gpa, v)
        }
        fn fence(&self) {}
        fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
            let end = gpa.checked_add(len).ok_or(MemoryError::Overflow)?;
            if end > self.0.len() as u64 || (len == 0 && gpa >= self.0.len() as u64) {
                return Err(MemoryError::Unmapped);
            }
            Ok(())
        }
        fn fetch_or_u8(&self, gpa: u64, bits: u8) -> Result<(), MemoryError> {
            self.get(gpa)?.fetch_or(bits, Ordering::Relaxed);
            Ok(())
        }
    }

    /// A memory without atomic OR (the trait's default).
    struct NoOr;
    impl GuestMemory for NoOr {
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), MemoryError> {
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), MemoryError> {
            Ok(())
        }
        fn load_u16_acquire(&self, _: u64) -> Result<u16, MemoryError> {
            Ok(0)
        }
        fn store_u16_release(&self, _: u64, _: u16) -> Result<(), MemoryError> {
            Ok(())
        }
        fn fence(&self) {}
        fn check(&self, _: u64, _: u64) -> Result<(), MemoryError> {
            Ok(())
        }
    }

    #[test]
    fn bitmap_size_covers_the_last_page() {
        assert_eq!(bitmap_bytes(0), 0);
        assert_eq!(bitmap_bytes(1), 1);
        assert_eq!(bitmap_bytes(8 * 4096), 1);
        assert_eq!(bitmap_bytes(8 * 4096 + 1), 2);
        // 256 MiB: 65536 pages, 8 KiB of bitmap.
        assert_eq!(bitmap_bytes(256 << 20), 8192);
        assert_eq!(bitmap_bytes(u64::MAX), (u64::MAX >> 12) / 8 + 1);
    }

    #[test]
    fn marks_one_bit_per_page_little_endian_bytes() {
        let area = Bytes::new(4);
        let log = DirtyLog::new(&area, 4);
        // One byte in page 0, then a range over pages 3..=9 (bytes 0 and 1).
        assert_eq!(log.mark(0x10, 1), Ok(1));
        assert_eq!(log.mark(3 * 4096 + 100, 6 * 4096), Ok(7));
        assert_eq!(area.snapshot(), [0b1111_1001, 0b0000_0011, 0, 0]);
        // Page 31, the last bit of the log.
        assert_eq!(log.mark(31 * 4096 + 4095, 1), Ok(1));
        assert_eq!(area.snapshot()[3], 0x80);
        // A whole middle byte at once, and nothing for an empty range.
        let area = Bytes::new(4);
        let log = DirtyLog::new(&area, 4);
        assert_eq!(log.mark(4 * 4096, 20 * 4096), Ok(20));
        assert_eq!(area.snapshot(), [0xf0, 0xff, 0xff, 0]);
        assert_eq!(log.mark(u64::MAX, 0), Ok(0));
    }

    #[test]
    fn refuses_ranges_beyond_the_log_or_overflowing_without_marking() {
        let area = Bytes::new(8);
        let log = DirtyLog::new(&area, 2);
        assert!(log.covers(16 * 4096));
        assert!(!log.covers(16 * 4096 + 1));
        // Pages 15 and 16: the second has no bit; nothing is set.
        assert_eq!(log.mark(15 * 4096, 4097), Err(LogError::BeyondLog));
        assert_eq!(area.snapshot(), [0; 8]);
        assert_eq!(log.mark(u64::MAX, 2), Err(LogError::Overflow));
        assert_eq!(log.mark(u64::MAX - 10, 5), Err(LogError::BeyondLog));
        // A log larger than its mapping: the area refuses.
        let log = DirtyLog::new(&area, 100);
        assert_eq!(
            log.mark(80 * 8 * 4096, 1),
            Err(LogError::Memory(MemoryError::Unmapped))
        );
        // A memory that cannot OR atomically cannot hold a log.
        let log = DirtyLog::new(&NoOr, 100);
        assert_eq!(
            log.mark(0, 1),
            Err(LogError::Memory(MemoryError::Unsupported))
        );
    }

    #[test]
    fn logged_memory_marks_every_kind_of_write_and_nothing_without_a_log() {
        let guest = Bytes::new(16 * 4096);
        let area = Bytes::new(2);
        let off = LoggedMemory::new(&guest, None::<DirtyLog<'_, Bytes>>);
        off.write(0, &[1; 8]).unwrap();
        off.write_u64(4096, 1).unwrap();
        assert_eq!(off.mark(0, 4096), Ok(()));
        assert!(!off.logging());
        assert_eq!(area.snapshot(), [0, 0]);

        let m = LoggedMemory::new(&guest, Some(DirtyLog::new(&area, 2)));
        assert!(m.logging());
        m.write(4096 - 2, &[7; 4]).unwrap(); // pages 0 and 1
        m.write_u16(2 * 4096, 1).unwrap(); // page 2
        m.write_u32(3 * 4096, 1).unwrap(); // page 3
        m.write_u64(4 * 4096, 1).unwrap(); // page 4
        m.store_u16_release(9 * 4096, 1).unwrap(); // page 9
        m.fetch_or_u8(10 * 4096, 1).unwrap(); // page 10
        m.mark(12 * 4096, 1).unwrap(); // page 12, written by the kernel
        assert_eq!(area.snapshot(), [0b0001_1111, 0b0001_0110]);
        assert_eq!(m.pages(), 8);
        // Reads and checks mark nothing.
        let mut b = [0u8; 4];
        m.read(15 * 4096, &mut b).unwrap();
        m.read_u16(15 * 4096).unwrap();
        m.check(15 * 4096, 8).unwrap();
        assert_eq!(area.snapshot()[1] & 0x80, 0);
        // A write the guest memory refuses marks nothing.
        assert!(m.write(16 * 4096, &[1]).is_err());
        assert_eq!(m.pages(), 8);
        assert_eq!(m.failed(), 0);
    }

    #[test]
    fn logged_memory_reports_a_write_it_cannot_mark() {
        let guest = Bytes::new(32 * 4096);
        let area = Bytes::new(1);
        let m = LoggedMemory::new(&guest, Some(DirtyLog::new(&area, 1)));
        // Page 20 has no bit in a one-byte log: the write happened, the
        // caller hears of it.
        assert_eq!(m.write(20 * 4096, &[9]), Err(MemoryError::Unmapped));
        assert_eq!(guest.snapshot()[20 * 4096], 9);
        assert_eq!(m.failed(), 1);
        assert_eq!(m.mark(20 * 4096, 1), Err(LogError::BeyondLog));
        assert_eq!(m.failed(), 2);
    }
}

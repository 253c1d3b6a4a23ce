//! Guest memory in owned buffers.
//!
//! [`TestMemory`] keeps a [`MemoryTable`] and, for each slot, a buffer of
//! 32-bit atomic words, exactly as the Linux adapter keeps an mmap per
//! slot. It implements [`GuestMemory`] with bounds checks, split copies
//! across adjacent regions, and single aligned atomic accesses for ring
//! indices, so it can be shared between a device thread and a driver
//! thread. No `unsafe`.

use std::sync::atomic::{fence, AtomicU32, Ordering};

use vhost_user_core::memory::{GuestMemory, MemoryError, MemoryTable};
use vhost_user_core::message::MemRegionMsg;

pub use crate::driver::USER_ADDR_OFFSET;

/// One region's backing: `[start, start + size)`, in 32-bit words.
#[derive(Debug)]
struct Backing {
    start: u64,
    size: u64,
    slot: usize,
    words: Box<[AtomicU32]>,
}

/// Guest memory made of owned buffers, up to `N` regions.
///
/// The [`MemoryTable`] decides which regions exist and their slots; the
/// access path looks regions up in a small sorted list of backings. The
/// memory is kept in 32-bit words, so regions start and end on 4-byte
/// boundaries (others are refused with [`MemoryError::BadRegion`]); guest
/// RAM regions are page-aligned anyway.
#[derive(Debug)]
pub struct TestMemory<const N: usize = 8> {
    table: MemoryTable<N>,
    /// Sorted by `start`.
    backings: Vec<Backing>,
}

/// A region's bytes are whole words: then a word slice's bounds are the
/// region's, and the fast paths check one bound.
fn word_aligned(r: &MemRegionMsg) -> Result<(), MemoryError> {
    if r.guest_addr % 4 != 0 || r.size % 4 != 0 {
        return Err(MemoryError::BadRegion);
    }
    Ok(())
}

fn words(size: u64) -> Box<[AtomicU32]> {
    // Whole words (`word_aligned`): the slice ends where the region does.
    let n = usize::try_from(size / 4).expect("region too large for a test buffer");
    (0..n).map(|_| AtomicU32::new(0)).collect()
}

/// A region message for `[gpa, gpa + size)` with the test adapter's user
/// address convention.
pub fn region(gpa: u64, size: u64) -> MemRegionMsg {
    MemRegionMsg {
        guest_addr: gpa,
        size,
        user_addr: gpa.wrapping_add(USER_ADDR_OFFSET),
        mmap_offset: 0,
        xen: None,
    }
}

impl<const N: usize> TestMemory<N> {
    /// Memory with the regions `(gpa, size)`, zero-filled.
    pub fn new(regions: &[(u64, u64)]) -> Result<Self, MemoryError> {
        let msgs: Vec<MemRegionMsg> = regions.iter().map(|&(g, s)| region(g, s)).collect();
        Self::from_regions(&msgs)
    }

    /// Memory with the given regions (SET_MEM_TABLE), zero-filled.
    pub fn from_regions(regions: &[MemRegionMsg]) -> Result<Self, MemoryError> {
        regions.iter().try_for_each(word_aligned)?;
        let table = MemoryTable::from_regions(regions)?;
        let mut m = TestMemory {
            table,
            backings: Vec::new(),
        };
        for (slot, r) in regions.iter().enumerate() {
            m.insert_backing(slot, r);
        }
        Ok(m)
    }

    fn insert_backing(&mut self, slot: usize, r: &MemRegionMsg) {
        let b = Backing {
            start: r.guest_addr,
            size: r.size,
            slot,
            words: words(r.size),
        };
        let pos = self.backings.partition_point(|x| x.start < b.start);
        self.backings.insert(pos, b);
    }

    /// The region table.
    pub fn table(&self) -> &MemoryTable<N> {
        &self.table
    }

    /// Add a zero-filled region (ADD_MEM_REG); returns its slot.
    pub fn add_region(&mut self, r: MemRegionMsg) -> Result<usize, MemoryError> {
        word_aligned(&r)?;
        let slot = self.table.add(r)?;
        self.insert_backing(slot, &r);
        Ok(slot)
    }

    /// Remove a region (REM_MEM_REG); its contents are dropped.
    pub fn remove_region(&mut self, r: &MemRegionMsg) -> Result<usize, MemoryError> {
        let slot = self.table.remove(r)?;
        self.backings.retain(|b| b.slot != slot);
        Ok(slot)
    }

    /// Read `len` bytes into a new vector.
    pub fn read_vec(&self, gpa: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        let mut v = vec![0; len];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// `read_desc` of a descriptor that is unaligned or spans backings.
    #[cold]
    fn read_desc_slow(&self, gpa: u64) -> Result<[u64; 2], MemoryError> {
        let mut b = [0u8; 16];
        self.read(gpa, &mut b)?;
        Ok(vhost_user_core::memory::desc_words(&b))
    }

    /// The backing holding `gpa` and the offset in it.
    #[inline(always)]
    fn find(&self, gpa: u64) -> Option<(&Backing, u64)> {
        for b in &self.backings {
            let off = gpa.wrapping_sub(b.start);
            if off < b.size {
                return Some((b, off));
            }
        }
        None
    }

    /// Run `f(words, byte offset, done, byte count)` over each region piece
    /// of `[gpa, gpa + len)`, after checking the whole range.
    #[inline]
    fn for_pieces(
        &self,
        gpa: u64,
        len: usize,
        mut f: impl FnMut(&[AtomicU32], usize, usize, usize),
    ) -> Result<(), MemoryError> {
        let unmapped = || MemoryError::unmapped(gpa, len as u64);
        // Fast path: the whole range in one region.
        let (b, off) = self.find(gpa).ok_or_else(unmapped)?;
        if b.size - off >= len as u64 {
            f(&b.words, off as usize, 0, len);
            return Ok(());
        }
        self.check(gpa, len as u64)?;
        let mut done = 0usize;
        while done < len {
            let (b, off) = self.find(gpa + done as u64).ok_or_else(unmapped)?;
            let n = (len - done).min(usize::try_from(b.size - off).unwrap_or(usize::MAX));
            f(&b.words, off as usize, done, n);
            done += n;
        }
        Ok(())
    }

    /// The word holding the aligned u16 at `gpa`, and its shift.
    #[inline]
    fn u16_cell(&self, gpa: u64) -> Result<(&AtomicU32, u32), MemoryError> {
        if gpa % 2 != 0 {
            return Err(MemoryError::misaligned(gpa));
        }
        match self.find(gpa) {
            Some((b, off)) if b.size - off >= 2 => {
                Ok((&b.words[off as usize / 4], 8 * (off as u32 % 4)))
            }
            _ => Err(MemoryError::unmapped(gpa, 2)),
        }
    }
}

#[inline]
fn read_words(w: &[AtomicU32], off: usize, dst: &mut [u8]) {
    let mut i = 0;
    if off % 4 == 0 {
        let whole = dst.len() / 4;
        let cells = &w[off / 4..off / 4 + whole];
        for (d, c) in dst.chunks_exact_mut(4).zip(cells) {
            d.copy_from_slice(&c.load(Ordering::Relaxed).to_le_bytes());
        }
        i = whole * 4;
    }
    while i < dst.len() {
        let pos = off + i;
        let b = pos % 4;
        let word = w[pos / 4].load(Ordering::Relaxed).to_le_bytes();
        let take = (4 - b).min(dst.len() - i);
        dst[i..i + take].copy_from_slice(&word[b..b + take]);
        i += take;
    }
}

#[inline]
fn write_words(w: &[AtomicU32], off: usize, src: &[u8]) {
    let mut i = 0;
    while i < src.len() {
        let pos = off + i;
        let b = pos % 4;
        let take = (4 - b).min(src.len() - i);
        let cell = &w[pos / 4];
        if take == 4 {
            let v = u32::from_le_bytes([src[i], src[i + 1], src[i + 2], src[i + 3]]);
            cell.store(v, Ordering::Relaxed);
        } else {
            let part = &src[i..i + take];
            let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                let mut bytes = old.to_le_bytes();
                bytes[b..b + take].copy_from_slice(part);
                Some(u32::from_le_bytes(bytes))
            });
        }
        i += take;
    }
}

impl<const N: usize> GuestMemory for TestMemory<N> {
    #[inline]
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let len = dst.len();
        if len == 0 {
            return self.check(gpa, 0);
        }
        self.for_pieces(gpa, len, |w, off, done, n| {
            read_words(w, off, &mut dst[done..done + n])
        })
    }

    #[inline]
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        if src.is_empty() {
            return self.check(gpa, 0);
        }
        self.for_pieces(gpa, src.len(), |w, off, done, n| {
            write_words(w, off, &src[done..done + n])
        })
    }

    #[inline]
    fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError> {
        let (cell, shift) = self.u16_cell(gpa)?;
        Ok((cell.load(Ordering::Acquire) >> shift) as u16)
    }

    #[inline]
    fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        let (cell, shift) = self.u16_cell(gpa)?;
        let mask = 0xffffu32 << shift;
        let _ = cell.fetch_update(Ordering::Release, Ordering::Relaxed, |old| {
            Some((old & !mask) | (u32::from(v) << shift))
        });
        Ok(())
    }

    /// An atomic OR on the byte's word (the dirty log's bitmap).
    #[inline]
    fn fetch_or_u8(&self, gpa: u64, bits: u8) -> Result<(), MemoryError> {
        let (b, off) = self
            .find(gpa)
            .ok_or_else(|| MemoryError::unmapped(gpa, 1))?;
        let word = &b.words[off as usize / 4];
        word.fetch_or(u32::from(bits) << (8 * (off % 4)), Ordering::Relaxed);
        Ok(())
    }

    #[inline]
    fn fence(&self) {
        fence(Ordering::SeqCst);
    }

    #[inline]
    fn store_fence(&self) {
        fence(Ordering::Release);
    }

    #[inline(always)]
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let unmapped = || MemoryError::unmapped(gpa, len);
        let (b, off) = self.find(gpa).ok_or_else(unmapped)?;
        if b.size - off >= len {
            return Ok(());
        }
        self.table.check(gpa, len)
    }

    #[inline]
    fn read_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        match self.u16_cell(gpa) {
            Ok((cell, shift)) => Ok((cell.load(Ordering::Relaxed) >> shift) as u16),
            Err(_) => {
                let mut b = [0u8; 2];
                self.read(gpa, &mut b)?;
                Ok(u16::from_le_bytes(b))
            }
        }
    }

    #[inline]
    fn read_16(&self, gpa: u64) -> Result<[u8; 16], MemoryError> {
        let [lo, hi] = self.read_desc(gpa)?;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&lo.to_le_bytes());
        b[8..].copy_from_slice(&hi.to_le_bytes());
        Ok(b)
    }

    #[inline(always)]
    fn read_desc(&self, gpa: u64) -> Result<[u64; 2], MemoryError> {
        // Fast path: four aligned words in one backing.
        if gpa % 4 == 0 {
            // The words end where the region does: the slice bound is the
            // range check.
            if let Some((b, off)) = self.find(gpa) {
                let i = off as usize / 4;
                if let Some(c) = b.words.get(i..i + 4) {
                    let w = |k: usize| u64::from(c[k].load(Ordering::Relaxed));
                    return Ok([w(0) | w(1) << 32, w(2) | w(3) << 32]);
                }
            }
        }
        self.read_desc_slow(gpa)
    }

    #[inline(always)]
    fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        if gpa % 4 == 0 {
            if let Some((b, off)) = self.find(gpa) {
                let i = off as usize / 4;
                if let Some(c) = b.words.get(i..i + 2) {
                    c[0].store(v as u32, Ordering::Relaxed);
                    c[1].store((v >> 32) as u32, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
        self.write(gpa, &v.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_copy_across_adjacent_regions() {
        let m = TestMemory::<4>::new(&[(0, 0x1000), (0x1000, 0x1000)]).unwrap();
        let data: Vec<u8> = (0..64u8).collect();
        m.write(0xfe1, &data).unwrap();
        assert_eq!(m.read_vec(0xfe1, 64).unwrap(), data);
        assert_eq!(m.read_16(0xffc).unwrap()[..], data[0x1b..0x2b]);
        // Past the end: refused, nothing written.
        assert!(m.write(0x1ff8, &[1; 9]).is_err());
        assert_eq!(m.read_vec(0x1ff8, 8).unwrap(), [0; 8]);
    }

    #[test]
    fn holes_refused_and_u16_accesses_aligned() {
        let m = TestMemory::<4>::new(&[(0, 0x1000), (0x2000, 0x1000)]).unwrap();
        assert!(m.read_vec(0xfff, 2).is_err());
        assert_eq!(m.load_u16_acquire(1), Err(MemoryError::Misaligned));
        m.store_u16_release(0x2002, 0xabcd).unwrap();
        m.store_u16_release(0x2000, 0x1234).unwrap();
        assert_eq!(m.read_vec(0x2000, 4).unwrap(), [0x34, 0x12, 0xcd, 0xab]);
        assert_eq!(m.load_u16_acquire(0x2002).unwrap(), 0xabcd);
        assert!(m.store_u16_release(0x1000, 1).is_err());
    }

    #[test]
    fn add_and_remove_regions() {
        let mut m = TestMemory::<4>::new(&[(0, 0x1000)]).unwrap();
        let r = region(0x4000, 0x100);
        assert_eq!(m.add_region(r).unwrap(), 1);
        m.write(0x4000, &[7]).unwrap();
        assert_eq!(m.remove_region(&r).unwrap(), 1);
        assert!(m.read_vec(0x4000, 1).is_err());
    }

    #[test]
    fn regions_are_whole_words_and_fast_paths_stop_at_their_end() {
        assert_eq!(
            TestMemory::<4>::new(&[(0, 0x1002)]).err(),
            Some(MemoryError::BadRegion)
        );
        assert_eq!(
            TestMemory::<4>::new(&[(2, 0x1000)]).err(),
            Some(MemoryError::BadRegion)
        );
        let mut m = TestMemory::<4>::new(&[(0, 0x1000), (0x2000, 0x1000)]).unwrap();
        assert_eq!(
            m.add_region(region(0x4001, 0x100)).err(),
            Some(MemoryError::BadRegion)
        );
        m.write(0xff0, &[0xaa; 16]).unwrap();
        assert_eq!(m.read_desc(0xff0).unwrap(), [u64::MAX / 255 * 0xaa; 2]);
        let unmapped = |addr, len| MemoryError::unmapped(addr, len);
        assert_eq!(m.read_desc(0xff4), Err(unmapped(0xff4, 16)));
        assert_eq!(m.write_u64(0xffc, 1), Err(unmapped(0xffc, 8)));
        assert_eq!(m.read_vec(0xff8, 8).unwrap(), [0xaa; 8]);
        m.write_u64(0xff8, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(m.read_vec(0xff8, 8).unwrap(), [8, 7, 6, 5, 4, 3, 2, 1]);
    }
}

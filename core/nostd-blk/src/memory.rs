//! Shared memory as the core sees it: [`SharedMemory`] implements the
//! core's [`GuestMemory`] over a window of 32-bit atomic words (a `static`
//! array in a firmware, shared with the front-end's side).
//!
//! Up to `N` slots each map a range of guest physical addresses onto a
//! range of the window (what a socket back-end does with `mmap` of a
//! region's fd). The same type serves the inflight area, mapped at address
//! 0 in slot 0. Every access is bounds-checked against its slot; an access
//! that crosses from one slot into another is refused (the trait allows
//! that), never performed past a slot's end.

use core::sync::atomic::{fence, AtomicU32, Ordering};

use vhost_user_core::memory::{GuestMemory, MemoryError};

#[derive(Clone, Copy, Debug)]
struct Slot {
    gpa: u64,
    size: u64,
    /// Byte offset of the slot in the window (4-aligned, like `gpa`).
    offset: usize,
}

/// Guest memory (or an inflight area) over a window of atomic words.
#[derive(Debug)]
pub struct SharedMemory<'a, const N: usize> {
    words: &'a [AtomicU32],
    slots: [Option<Slot>; N],
}

impl<'a, const N: usize> SharedMemory<'a, N> {
    /// Nothing mapped yet, over `words`.
    pub const fn new(words: &'a [AtomicU32]) -> Self {
        SharedMemory {
            words,
            slots: [None; N],
        }
    }

    /// Bytes of the window.
    pub fn window_len(&self) -> u64 {
        self.words.len() as u64 * 4
    }

    /// Maps `[gpa, gpa + size)` onto the window's bytes from `offset`, in
    /// slot `slot` (replacing what it mapped). Refused unless the range lies
    /// in the window, is not empty, and `gpa` and `offset` are 4-aligned
    /// (ring indices must be single aligned words).
    pub fn map(
        &mut self,
        slot: usize,
        gpa: u64,
        size: u64,
        offset: u64,
    ) -> Result<(), MemoryError> {
        let end = offset.checked_add(size).ok_or(MemoryError::Overflow)?;
        gpa.checked_add(size).ok_or(MemoryError::Overflow)?;
        if size == 0 || end > self.window_len() || (gpa | offset) % 4 != 0 {
            return Err(MemoryError::BadRegion);
        }
        let s = self.slots.get_mut(slot).ok_or(MemoryError::TableFull)?;
        *s = Some(Slot {
            gpa,
            size,
            offset: offset as usize,
        });
        Ok(())
    }

    /// Unmaps slot `slot`.
    pub fn unmap(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = None;
        }
    }

    /// Unmaps every slot.
    pub fn clear(&mut self) {
        self.slots = [None; N];
    }

    /// Whether any slot is mapped.
    pub fn is_mapped(&self) -> bool {
        self.slots.iter().any(Option::is_some)
    }

    /// Zeroes the window's first `len` bytes (a fresh inflight area).
    pub fn zero_window(&self, len: u64) -> Result<(), MemoryError> {
        if len > self.window_len() {
            return Err(MemoryError::BadRegion);
        }
        for w in self.words.iter().take(len.div_ceil(4) as usize) {
            w.store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The window byte offset of `[gpa, gpa + len)`, if one slot maps all
    /// of it.
    #[inline(never)]
    fn locate(&self, gpa: u64, len: u64) -> Result<usize, MemoryError> {
        for s in self.slots.iter().flatten() {
            let off = gpa.wrapping_sub(s.gpa);
            if off < s.size {
                if s.size - off >= len {
                    return Ok(s.offset + off as usize);
                }
                break;
            }
        }
        Err(MemoryError::unmapped(gpa, len))
    }

    /// The word holding the aligned `u16` at `gpa`, and its shift.
    #[inline]
    fn half(&self, gpa: u64) -> Result<(&AtomicU32, u32), MemoryError> {
        if gpa % 2 != 0 {
            return Err(MemoryError::misaligned(gpa));
        }
        let at = self.locate(gpa, 2)?;
        let w = self
            .words
            .get(at / 4)
            .ok_or_else(|| MemoryError::unmapped(gpa, 2))?;
        Ok((w, 8 * (at % 4) as u32))
    }
}

/// Copies window bytes from `at` into `dst` (the caller checked the range).
pub(crate) fn read_bytes(words: &[AtomicU32], at: usize, dst: &mut [u8]) {
    let mut out = dst.iter_mut();
    let mut skip = at % 4;
    for w in words.iter().skip(at / 4) {
        for b in w.load(Ordering::Relaxed).to_le_bytes().iter().skip(skip) {
            match out.next() {
                Some(d) => *d = *b,
                None => return,
            }
        }
        skip = 0;
    }
}

/// Copies `src` into window bytes from `at` (the caller checked the range).
/// Whole words are stored; a partial word is merged with a compare and
/// swap, so bytes beside it that the other side writes are never undone.
pub(crate) fn write_bytes(words: &[AtomicU32], at: usize, src: &[u8]) {
    let mut src = src;
    let mut skip = at % 4;
    for w in words.iter().skip(at / 4) {
        if src.is_empty() {
            return;
        }
        let take = (4 - skip).min(src.len());
        let (part, rest) = src.split_at(take);
        if let Ok(b) = <[u8; 4]>::try_from(part) {
            w.store(u32::from_le_bytes(b), Ordering::Relaxed);
        } else {
            let _ = w.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                let mut b = old.to_le_bytes();
                for (d, s) in b.iter_mut().skip(skip).zip(part) {
                    *d = *s;
                }
                Some(u32::from_le_bytes(b))
            });
        }
        src = rest;
        skip = 0;
    }
}

impl<const N: usize> GuestMemory for SharedMemory<'_, N> {
    #[inline(never)]
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let at = self.locate(gpa, dst.len() as u64)?;
        read_bytes(self.words, at, dst);
        Ok(())
    }

    #[inline(never)]
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        let at = self.locate(gpa, src.len() as u64)?;
        write_bytes(self.words, at, src);
        Ok(())
    }

    #[inline(never)]
    fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError> {
        let (w, shift) = self.half(gpa)?;
        Ok((w.load(Ordering::Acquire) >> shift) as u16)
    }

    #[inline(never)]
    fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        let (w, shift) = self.half(gpa)?;
        let mask = 0xffff_u32 << shift;
        let _ = w.fetch_update(Ordering::Release, Ordering::Relaxed, |old| {
            Some((old & !mask) | (u32::from(v) << shift))
        });
        Ok(())
    }

    fn fence(&self) {
        fence(Ordering::SeqCst);
    }

    #[inline]
    fn store_fence(&self) {
        fence(Ordering::Release);
    }

    #[inline(never)]
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.locate(gpa, len).map(|_| ())
    }

    // The provided methods, out of line: the core calls them from many
    // places, and inlined copies cost more flash than the calls' time.

    #[inline(never)]
    fn read_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    #[inline(never)]
    fn read_16(&self, gpa: u64) -> Result<[u8; 16], MemoryError> {
        let mut b = [0u8; 16];
        self.read(gpa, &mut b)?;
        Ok(b)
    }

    #[inline(never)]
    fn read_desc(&self, gpa: u64) -> Result<[u64; 2], MemoryError> {
        let b = self.read_16(gpa)?;
        Ok(vhost_user_core::memory::desc_words(&b))
    }

    #[inline(never)]
    fn write_u16(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    #[inline(never)]
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    #[inline(never)]
    fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

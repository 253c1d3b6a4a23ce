//! Guest memory as a table of host pointers the caller fills: a
//! [`vhu_mem`] names an array of [`vhu_region`]s (guest physical address,
//! size, where the region is mapped here), and implements the core's
//! [`GuestMemory`] for the duration of each call that takes it. A host
//! whose guest memory is not mapped as plain ranges (an IOMMU, a window
//! that moves, a simulator) gives callbacks instead ([`vhu_mem_ops`]).
//!
//! A caller that maps regions from SET_MEM_TABLE/ADD_MEM_REG indexes the
//! array by the slot of `VHU_ACTION_MAP_REGION` and leaves unused entries
//! zeroed (a NULL `host` or a zero `size` marks an unused entry). The
//! inflight area is a table of one region at guest address 0.
//!
//! A call refuses a table whose entries in use cover any of its states or
//! buffers, or the table itself (see `Footprint` in the state module).
//! Every access is bounds-checked against the table; an access that
//! spans two regions adjacent in guest addresses is split. Bytes are
//! copied in and out (the guest may change them at any time, so no
//! reference into guest memory is ever formed); 16-bit ring indices are
//! single aligned atomic accesses with acquire/release ordering; the
//! inflight area's records are ordered by a release fence.

use core::ffi::c_void;
use core::mem::size_of;
use core::ptr;
use core::sync::atomic::{fence, AtomicU16, AtomicU8, Ordering};

use vhost_user_core::memory::{GuestMemory, MemoryError};

use crate::result::vhu_result::{self, *};
use crate::state::{self, Footprint, Lend};
use crate::versioned::{self, Readable, Versioned};

/// One region of guest memory mapped into this address space. Its host
/// range shares no byte with a state or a buffer of the call it is given
/// to (`VHU_ERR_INVALID` otherwise): the library copies guest bytes into
/// it while it holds those.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_region {
    /// Guest physical address of the region's first byte.
    pub gpa: u64,
    /// Bytes; 0 marks an unused entry.
    pub size: u64,
    /// Where the region's first byte is mapped here; NULL marks an unused
    /// entry. The whole range must be readable and writable.
    pub host: *mut u8,
}

/// Guest memory: a table of `count` entries at `regions`, or, when `ops`
/// is not NULL, the callbacks of `*ops` (the table is then ignored).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_mem {
    /// The entries (may be NULL when `count` is 0).
    pub regions: *const vhu_region,
    /// Number of entries.
    pub count: usize,
    /// NULL, or the callbacks that access guest memory.
    pub ops: *const vhu_mem_ops,
}

/// Guest memory as callbacks, each given `ctx`. Every one is required.
/// Each returns false, touching nothing, when any byte of the range is not
/// guest memory. The 16-bit ring index accesses must be single aligned
/// atomic accesses of the little-endian value, with acquire (load) and
/// release (store) ordering; the library orders everything else with its
/// own fences. Start from `VHU_MEM_OPS_INIT`, or set `.struct_size =
/// sizeof(vhu_mem_ops)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_mem_ops {
    /// `sizeof(vhu_mem_ops)` (`VHU_ERR_ABI` for a size this library does
    /// not know).
    pub struct_size: usize,
    /// Passed to every callback.
    pub ctx: *mut c_void,
    /// Copies `len` bytes at guest address `gpa` into `dst`.
    pub read:
        Option<unsafe extern "C" fn(ctx: *mut c_void, gpa: u64, dst: *mut u8, len: usize) -> bool>,
    /// Copies `len` bytes from `src` to guest address `gpa`.
    pub write: Option<
        unsafe extern "C" fn(ctx: *mut c_void, gpa: u64, src: *const u8, len: usize) -> bool,
    >,
    /// Loads the ring index at `gpa` (2-aligned) into `*out`.
    pub load_u16_acquire:
        Option<unsafe extern "C" fn(ctx: *mut c_void, gpa: u64, out: *mut u16) -> bool>,
    /// Stores the ring index `value` at `gpa` (2-aligned).
    pub store_u16_release:
        Option<unsafe extern "C" fn(ctx: *mut c_void, gpa: u64, value: u16) -> bool>,
    /// Whether every byte of `[gpa, gpa + len)` is guest memory (with
    /// `len` 0: whether `gpa` is).
    pub check: Option<unsafe extern "C" fn(ctx: *mut c_void, gpa: u64, len: u64) -> bool>,
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct; every field is a raw pointer or an optional function pointer.
unsafe impl Versioned for vhu_mem_ops {
    const SIZES: &'static [usize] = &[size_of::<vhu_mem_ops>()];
}

// SAFETY: every field is an integer, a raw pointer or an optional
// function pointer.
unsafe impl Readable for vhu_mem_ops {
    const EMPTY: Self = vhu_mem_ops {
        struct_size: 0,
        ctx: ptr::null_mut(),
        read: None,
        write: None,
        load_u16_acquire: None,
        store_u16_release: None,
        check: None,
    };
}

impl Default for vhu_mem_ops {
    /// No callbacks, at this version's size (`VHU_MEM_OPS_INIT`).
    fn default() -> Self {
        vhu_mem_ops {
            struct_size: size_of::<vhu_mem_ops>(),
            ..vhu_mem_ops::EMPTY
        }
    }
}

type ReadFn = unsafe extern "C" fn(*mut c_void, u64, *mut u8, usize) -> bool;
type WriteFn = unsafe extern "C" fn(*mut c_void, u64, *const u8, usize) -> bool;
type LoadFn = unsafe extern "C" fn(*mut c_void, u64, *mut u16) -> bool;
type StoreFn = unsafe extern "C" fn(*mut c_void, u64, u16) -> bool;
type CheckFn = unsafe extern "C" fn(*mut c_void, u64, u64) -> bool;

/// A [`vhu_mem_ops`] with every callback present.
#[derive(Clone, Copy, Debug)]
struct Ops {
    ctx: *mut c_void,
    read: ReadFn,
    write: WriteFn,
    load: LoadFn,
    store: StoreFn,
    check: CheckFn,
}

#[derive(Clone, Copy, Debug)]
enum Backing {
    /// The regions of the table.
    Table,
    Ops(Ops),
}

/// A region as the description of a memory message (SET_MEM_TABLE,
/// ADD_MEM_REG), and as the front-end configures its regions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vhu_mem_region {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Front-end virtual address.
    pub user_addr: u64,
    /// Offset of the region in its fd.
    pub mmap_offset: u64,
}

/// Validated guest memory, for one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mem<'a> {
    /// The table (empty with callbacks).
    regions: &'a [vhu_region],
    backing: Backing,
    /// The call's footprint, complete: published while a callback runs.
    call: &'a Footprint<'a>,
}

/// Guest memory validated for one call ([`Mem::from_raw`]) while the call
/// still claims what it uses: [`bind`](Self::bind) it to the footprint
/// once that is complete. Only the bound [`Mem`] accesses guest memory,
/// so no callback runs before the call can publish all it holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unbound<'a> {
    regions: &'a [vhu_region],
    backing: Backing,
}

impl<'a> Unbound<'a> {
    /// This memory, for the call whose complete footprint is `call`.
    pub(crate) fn bind<'b>(self, call: &'b Footprint<'a>) -> Mem<'b>
    where
        'a: 'b,
    {
        Mem {
            regions: self.regions,
            backing: self.backing,
            call,
        }
    }

    fn table(regions: &'a [vhu_region]) -> Unbound<'a> {
        Unbound {
            regions,
            backing: Backing::Table,
        }
    }
}

impl<'a> Mem<'a> {
    /// The table at `p`; NULL is the empty table. Refuses an entry in use
    /// whose guest or host range overflows. The `vhu_mem`, its callbacks
    /// or its entries, and the host ranges of the entries in use are
    /// claimed in the call's footprint `fp` (each before it is read):
    /// `VHU_ERR_INVALID` if any shares a byte with what the call enters or
    /// writes, or a host range with anything else the call uses.
    ///
    /// # Safety
    ///
    /// A non-null `p` points at a `vhu_mem` whose entries are readable and
    /// unchanged for `'a`, and each entry in use maps `size` readable and
    /// writable bytes at `host` for `'a`.
    pub(crate) unsafe fn from_raw(
        p: *const vhu_mem,
        fp: &mut Footprint<'a>,
    ) -> Result<Unbound<'a>, vhu_result> {
        if p.is_null() {
            return Ok(Unbound::table(&[]));
        }
        if (p as usize) % core::mem::align_of::<vhu_mem>() != 0 {
            return Err(VHU_ERR_ALIGN);
        }
        fp.reads(p, 1)?;
        // SAFETY: non-null, aligned, readable by the caller's contract,
        // and apart from what the call holds a `&mut` to (claimed).
        let m = unsafe { p.read() };
        if !m.ops.is_null() {
            // SAFETY: the caller's contract.
            let o = unsafe { versioned::read(m.ops, fp) }?;
            let (Some(read), Some(write), Some(load), Some(store), Some(check)) = (
                o.read,
                o.write,
                o.load_u16_acquire,
                o.store_u16_release,
                o.check,
            ) else {
                return Err(VHU_ERR_NULL);
            };
            return Ok(Unbound {
                regions: &[],
                backing: Backing::Ops(Ops {
                    ctx: o.ctx,
                    read,
                    write,
                    load,
                    store,
                    check,
                }),
            });
        }
        fp.reads(m.regions, m.count)?;
        // SAFETY: the caller's contract on the entries; apart from what
        // the call holds a `&mut` to (claimed).
        let regions = unsafe { state::slice(m.regions, m.count) }?;
        for r in regions.iter().filter(|r| used(r)) {
            let fits = usize::try_from(r.size)
                .ok()
                .and_then(|n| (r.host as usize).checked_add(n))
                .is_some();
            if r.gpa.checked_add(r.size).is_none() || !fits {
                return Err(VHU_ERR_INVALID);
            }
        }
        // Once per call, before any access: the library copies into these
        // ranges (and the guest writes them) while it holds references to
        // the call's states and buffers.
        fp.guest(regions)?;
        Ok(Unbound::table(regions))
    }

    /// [`from_raw`](Self::from_raw), or `None` for NULL (an optional
    /// inflight area).
    ///
    /// # Safety
    ///
    /// As [`from_raw`](Self::from_raw).
    pub(crate) unsafe fn optional(
        p: *const vhu_mem,
        fp: &mut Footprint<'a>,
    ) -> Result<Option<Unbound<'a>>, vhu_result> {
        if p.is_null() {
            return Ok(None);
        }
        // SAFETY: the caller's contract.
        unsafe { Self::from_raw(p, fp) }.map(Some)
    }

    /// The entry holding `gpa`, and the offset in it.
    #[inline]
    fn find(&self, gpa: u64) -> Option<(&vhu_region, u64)> {
        self.regions.iter().filter(|r| used(r)).find_map(|r| {
            let off = gpa.wrapping_sub(r.gpa);
            (off < r.size).then_some((r, off))
        })
    }

    /// Host pointer of `[gpa, gpa + len)` if one entry holds all of it.
    #[inline]
    fn within(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let (r, off) = self.find(gpa)?;
        if r.size - off < len {
            return None;
        }
        // `off < size`, and `host + size` fits usize (checked in
        // `from_raw`): the address arithmetic cannot overflow.
        Some(r.host.wrapping_add(off as usize))
    }

    /// Runs `f(host pointer, start in the buffer, length)` over the pieces
    /// of `[gpa, gpa + len)`, each inside one entry; refuses the range
    /// (before calling `f`) unless all of it is mapped.
    fn pieces(
        &self,
        gpa: u64,
        len: usize,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), MemoryError> {
        let unmapped = MemoryError::unmapped(gpa, len as u64);
        gpa.checked_add(len as u64).ok_or(MemoryError::Overflow)?;
        // Check first, then copy: nothing is touched by a refused access.
        let mut done = 0usize;
        while done < len {
            let at = gpa + done as u64;
            let (r, off) = self.find(at).ok_or(unmapped)?;
            done += usize::try_from(r.size - off)
                .unwrap_or(usize::MAX)
                .min(len - done);
        }
        let mut done = 0usize;
        while done < len {
            let at = gpa + done as u64;
            let (r, off) = self.find(at).ok_or(unmapped)?;
            let n = usize::try_from(r.size - off)
                .unwrap_or(usize::MAX)
                .min(len - done);
            f(r.host.wrapping_add(off as usize), done, n);
            done += n;
        }
        Ok(())
    }

    /// The ring index at `gpa` as an atomic.
    fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16, MemoryError> {
        if gpa % 2 != 0 {
            return Err(MemoryError::misaligned(gpa));
        }
        let p = self.within(gpa, 2).ok_or(MemoryError::unmapped(gpa, 2))?;
        if (p as usize) % 2 != 0 {
            return Err(MemoryError::misaligned(gpa));
        }
        // SAFETY: `p` is 2-aligned and inside a mapped entry for 2 bytes
        // that lives for the call ('a); ring indices are only ever
        // accessed atomically here, and an AtomicU16 may alias memory that
        // other processes write.
        Ok(unsafe { AtomicU16::from_ptr(p.cast::<u16>()) })
    }
}

fn used(r: &vhu_region) -> bool {
    !r.host.is_null() && r.size != 0
}

/// The host range of an entry in use, as addresses (start, bytes).
pub(crate) fn host_range(r: &vhu_region) -> Option<(usize, usize)> {
    // `from_raw` refuses an entry in use whose size does not fit usize.
    used(r).then(|| {
        (
            r.host as usize,
            usize::try_from(r.size).unwrap_or(usize::MAX),
        )
    })
}

impl GuestMemory for Mem<'_> {
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        if let Backing::Ops(o) = self.backing {
            let (p, n) = (dst.as_mut_ptr(), dst.len());
            // SAFETY: the caller gave this callback for this `ctx`; `dst`
            // is a live buffer of `n` bytes, handed to the callback (and to
            // the calls it makes) to write.
            let ok = self
                .call
                .call_out(Lend::Writes(p, n), || unsafe { (o.read)(o.ctx, gpa, p, n) });
            return ok
                .then_some(())
                .ok_or(MemoryError::unmapped(gpa, dst.len() as u64));
        }
        if dst.is_empty() {
            return self.check(gpa, 0);
        }
        let out = dst.as_mut_ptr();
        self.pieces(gpa, dst.len(), |src, start, n| {
            // SAFETY: `src..src+n` is inside a mapped entry (`pieces`
            // checked it) and `out+start..out+start+n` inside `dst`, the
            // library's: a state or buffer of the call, which no entry
            // covers (`from_raw` claimed the entries in the call's
            // footprint), or its own stack. The guest may write the
            // source concurrently, which yields arbitrary bytes and no
            // reference to it exists.
            unsafe { ptr::copy_nonoverlapping(src, out.add(start), n) };
        })
    }

    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        if let Backing::Ops(o) = self.backing {
            let (p, n) = (src.as_ptr(), src.len());
            // SAFETY: as in `read`; `src` is live for the call, handed to
            // the callback to read.
            let ok = self
                .call
                .call_out(Lend::Reads(p, n), || unsafe { (o.write)(o.ctx, gpa, p, n) });
            return ok
                .then_some(())
                .ok_or(MemoryError::unmapped(gpa, src.len() as u64));
        }
        if src.is_empty() {
            return self.check(gpa, 0);
        }
        let from = src.as_ptr();
        self.pieces(gpa, src.len(), |dst, start, n| {
            // SAFETY: `dst..dst+n` is inside a mapped, writable entry and
            // `from+start..from+start+n` inside `src`, a buffer of the
            // library's that no entry covers (as in `read`).
            unsafe { ptr::copy_nonoverlapping(from.add(start), dst, n) };
        })
    }

    fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError> {
        if let Backing::Ops(o) = self.backing {
            if gpa % 2 != 0 {
                return Err(MemoryError::misaligned(gpa));
            }
            let mut v = 0u16;
            let p = ptr::from_mut(&mut v);
            let lend = Lend::Writes(p.cast(), size_of::<u16>());
            // SAFETY: as in `read`; `v` is a live u16, handed to the
            // callback to write.
            let ok = self
                .call
                .call_out(lend, || unsafe { (o.load)(o.ctx, gpa, p) });
            return ok.then_some(v).ok_or(MemoryError::unmapped(gpa, 2));
        }
        Ok(u16::from_le(self.atomic_u16(gpa)?.load(Ordering::Acquire)))
    }

    fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        if let Backing::Ops(o) = self.backing {
            if gpa % 2 != 0 {
                return Err(MemoryError::misaligned(gpa));
            }
            // SAFETY: as in `read`.
            let ok = self
                .call
                .call_out(Lend::Nothing, || unsafe { (o.store)(o.ctx, gpa, v) });
            return ok.then_some(()).ok_or(MemoryError::unmapped(gpa, 2));
        }
        self.atomic_u16(gpa)?.store(v.to_le(), Ordering::Release);
        Ok(())
    }

    /// A table's byte ORed atomically (a dirty log: the front-end clears
    /// bits concurrently). Callbacks have no atomic OR: a log given as
    /// callbacks is refused (`MemoryError::Unsupported`).
    fn fetch_or_u8(&self, gpa: u64, bits: u8) -> Result<(), MemoryError> {
        if let Backing::Ops(_) = self.backing {
            return Err(MemoryError::Unsupported);
        }
        let p = self.within(gpa, 1).ok_or(MemoryError::unmapped(gpa, 1))?;
        // SAFETY: `p` is inside a mapped entry for 1 byte that lives for
        // the call ('a); log bytes are only ever changed atomically here,
        // and an AtomicU8 may alias memory that other processes write.
        unsafe { AtomicU8::from_ptr(p) }.fetch_or(bits, Ordering::Release);
        Ok(())
    }

    fn fence(&self) {
        fence(Ordering::SeqCst);
    }

    fn store_fence(&self) {
        fence(Ordering::Release);
    }

    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if let Backing::Ops(o) = self.backing {
            // SAFETY: as in `read`.
            let ok = self
                .call
                .call_out(Lend::Nothing, || unsafe { (o.check)(o.ctx, gpa, len) });
            return ok.then_some(()).ok_or(MemoryError::unmapped(gpa, len));
        }
        if self.within(gpa, len).is_some() {
            return Ok(());
        }
        let n = usize::try_from(len).map_err(|_| MemoryError::unmapped(gpa, len))?;
        if n == 0 {
            return Err(MemoryError::unmapped(gpa, 0));
        }
        self.pieces(gpa, n, |_, _, _| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounds_checked_and_split_across_adjacent_entries() {
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        let regions = [
            vhu_region {
                gpa: 0x1000,
                size: 16,
                host: a.as_mut_ptr(),
            },
            vhu_region {
                gpa: 0,
                size: 0,
                host: ptr::null_mut(),
            },
            vhu_region {
                gpa: 0x1010,
                size: 16,
                host: b.as_mut_ptr(),
            },
        ];
        let raw = vhu_mem {
            regions: regions.as_ptr(),
            count: regions.len(),
            ops: ptr::null(),
        };
        let mut fp = Footprint::new();
        // SAFETY: the entries map `a` and `b`, alive for the test.
        let m = unsafe { Mem::from_raw(&raw, &mut fp) }.unwrap_or(Unbound::table(&[]));
        let m = m.bind(&fp);
        m.write(0x100e, b"abcd").unwrap_or_else(|e| panic!("{e}"));
        let mut got = [0u8; 4];
        m.read(0x100e, &mut got).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"abcd");
        assert!(m.read(0x101e, &mut got).is_err());
        assert!(m.write(0x0ffe, b"xy").is_err());
        assert!(m.check(0x1000, 32).is_ok());
        assert!(m.check(0x1000, 33).is_err());
        assert!(m.load_u16_acquire(0x1001).is_err());
        m.store_u16_release(0x1012, 0xbeef)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.load_u16_acquire(0x1012), Ok(0xbeef));
        assert_eq!(&a[14..], b"ab");
        assert_eq!(&b[..2], b"cd");
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 0xbeef);
    }

    #[test]
    fn an_entry_that_overflows_is_refused() {
        let regions = [vhu_region {
            gpa: u64::MAX - 4,
            size: 16,
            host: 0x1000 as *mut u8,
        }];
        let raw = vhu_mem {
            regions: regions.as_ptr(),
            count: 1,
            ops: ptr::null(),
        };
        // SAFETY: the table is refused before any entry is dereferenced.
        let r = unsafe { Mem::from_raw(&raw, &mut Footprint::new()) };
        assert_eq!(r.err(), Some(VHU_ERR_INVALID));
    }
}

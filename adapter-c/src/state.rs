//! Caller-owned state: a tag word followed by the Rust value, in storage
//! the caller allocated and sized with `vhu_*_size()`/`vhu_*_align()`.
//!
//! The tag also says whether a call is inside the state: [`get`] marks
//! it ([`BUSY`]) for as long as the [`Entered`] it gives lives, and
//! refuses a state so marked with `VHU_ERR_BUSY`. A C callback (guest
//! memory, a device) that calls back into the library on the state of
//! the call it runs in gets that error instead of a second `&mut` to a
//! value the first call holds.
//!
//! Within one call, [`Footprint`] keeps the rule that what the call holds
//! a `&mut` to or writes shares no byte with anything else it uses: every
//! entry point claims the states it enters and every buffer it reads or
//! writes, and guest memory tables claim their regions, before anything
//! is formed or written.

use core::mem::{align_of, size_of};
use core::ops::{Deref, DerefMut};
use core::ptr;

use crate::memory::{self, vhu_region};
use crate::result::vhu_result::{self, *};

/// A state kind: its tag, checked by every call that takes the state
/// (its top bit clear: that is [`BUSY`]).
pub(crate) trait Kind: Sized {
    const TAG: u32;
}

/// The tag bit of a state a call is inside.
const BUSY: u32 = 0x8000_0000;

/// The layout in the caller's storage.
#[repr(C)]
pub(crate) struct Tagged<T> {
    tag: u32,
    /// Bytes of storage the state occupies from its start: the `need` of
    /// its [`init`] (a data plane's token table follows the value). Apart
    /// from the value, as the tag is, so it can be read while a call is
    /// inside the state. (Every state is 8-aligned: this word takes the
    /// padding after the tag.)
    extent: u32,
    value: T,
}

/// Bytes of a state of kind `T`.
pub(crate) const fn size<T>() -> usize {
    size_of::<Tagged<T>>()
}

/// Alignment of a state of kind `T`.
pub(crate) const fn align<T>() -> usize {
    align_of::<Tagged<T>>()
}

/// `p` checked as storage of at least `size` bytes for a `T`.
pub(crate) fn storage<T, P>(
    p: *mut P,
    size: usize,
    need: usize,
) -> Result<*mut Tagged<T>, vhu_result> {
    if p.is_null() {
        return Err(VHU_ERR_NULL);
    }
    if (p as usize) % align::<T>() != 0 {
        return Err(VHU_ERR_ALIGN);
    }
    if size < need {
        return Err(VHU_ERR_SIZE);
    }
    Ok(p.cast())
}

/// Writes `value` as a fresh state into the storage at `p`.
///
/// # Safety
///
/// `p` (checked by [`storage`]) points at `need` writable bytes.
pub(crate) unsafe fn init<T: Kind, P>(
    p: *mut P,
    size: usize,
    need: usize,
    value: T,
) -> Result<(), vhu_result> {
    let t = storage::<T, P>(p, size, need)?;
    let extent = u32::try_from(need.max(self::size::<T>())).map_err(|_| VHU_ERR_SIZE)?;
    // SAFETY: `t` is non-null, aligned for Tagged<T> and (the caller's
    // contract) points at `need >= size_of::<Tagged<T>>()` writable bytes;
    // the old bytes are overwritten without being read or dropped (states
    // own no resource).
    unsafe {
        t.write(Tagged {
            tag: T::TAG,
            extent,
            value,
        })
    };
    Ok(())
}

/// The state of kind `T` at `p`, entered: marked busy until the
/// [`Entered`] is dropped. `VHU_ERR_BUSY` if a call is inside it already
/// (a callback called back).
///
/// # Safety
///
/// `p` is NULL, or points at storage that a `vhu_*_init` of some kind
/// initialised (or at least `size_of::<u32>()` readable bytes whose tag
/// is not `T`'s), that no one but these functions uses for the lifetime
/// `'a`.
pub(crate) unsafe fn get<'a, T: Kind, P>(p: *mut P) -> Result<Entered<'a, T>, vhu_result> {
    const { assert!(T::TAG & BUSY == 0) };
    if p.is_null() {
        return Err(VHU_ERR_NULL);
    }
    if (p as usize) % align::<T>() != 0 {
        return Err(VHU_ERR_ALIGN);
    }
    let t: *mut Tagged<T> = p.cast();
    // The tag is the first field of a repr(C) struct, so it is read and
    // written as a plain u32 without forming a reference to a value that
    // may not be there, and apart from the value (the `&mut` to the
    // value below does not cover it).
    // SAFETY: `t` is non-null and aligned.
    let tag = unsafe { ptr::addr_of_mut!((*t).tag) };
    // SAFETY: `tag` is non-null, aligned and readable (the contract).
    match unsafe { tag.read() } {
        v if v == T::TAG => {}
        v if v == T::TAG | BUSY => return Err(VHU_ERR_BUSY),
        _ => return Err(VHU_ERR_STATE),
    }
    // SAFETY: as for the read; a state is used by one thread at a time,
    // so no one changes the tag between the read and this write.
    unsafe { tag.write(T::TAG | BUSY) };
    // SAFETY: the tag says an init of this kind wrote a valid `T` here;
    // the contract and the busy tag (every other way in is refused until
    // `Entered` is dropped) give us exclusive use of it.
    let value = unsafe { &mut *ptr::addr_of_mut!((*t).value) };
    Ok(Entered { tag, value })
}

/// A state a call is inside (see [`get`]): the value, and its tag to set
/// back to not busy when the call leaves (also when it unwinds).
pub(crate) struct Entered<'a, T: Kind> {
    tag: *mut u32,
    value: &'a mut T,
}

impl<T: Kind> Deref for Entered<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value
    }
}

impl<T: Kind> DerefMut for Entered<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value
    }
}

impl<T: Kind> Drop for Entered<'_, T> {
    fn drop(&mut self) {
        // SAFETY: `get` found `tag` aligned and readable, and marked it
        // busy; the tag is not part of the value `self.value` borrows.
        unsafe { self.tag.write(T::TAG) };
    }
}

/// A slice from a C pointer and length: empty when `len` is 0 (the
/// pointer may then be NULL), else `p` must be non-null and aligned.
///
/// # Safety
///
/// A non-null `p` points at `len` readable `T`s that live, unchanged by
/// anyone else, for `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, len: usize) -> Result<&'a [T], vhu_result> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(VHU_ERR_NULL);
    }
    if (p as usize) % align_of::<T>() != 0 {
        return Err(VHU_ERR_ALIGN);
    }
    if len
        .checked_mul(size_of::<T>())
        .is_none_or(|n| n > isize::MAX as usize)
    {
        return Err(VHU_ERR_INVALID);
    }
    // SAFETY: non-null, aligned, the size fits isize, and the caller's
    // contract covers the rest.
    Ok(unsafe { core::slice::from_raw_parts(p, len) })
}

/// A mutable byte slice from a C pointer and length (see [`slice`]).
///
/// # Safety
///
/// A non-null `p` points at `len` writable bytes used by no one else for
/// `'a`.
pub(crate) unsafe fn bytes_mut<'a>(p: *mut u8, len: usize) -> Result<&'a mut [u8], vhu_result> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(VHU_ERR_NULL);
    }
    if len > isize::MAX as usize {
        return Err(VHU_ERR_INVALID);
    }
    // SAFETY: non-null, bytes need no alignment, the size fits isize, and
    // the caller's contract covers the rest.
    Ok(unsafe { core::slice::from_raw_parts_mut(p, len) })
}

/// Whether the byte ranges `[a, a + a_len)` and `[b, b + b_len)` share a
/// byte (an empty range shares none). Addresses as integers: no pointer
/// is formed or dereferenced.
fn overlap(a: usize, a_len: usize, b: usize, b_len: usize) -> bool {
    a_len != 0 && b_len != 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// How a call uses a range of the caller's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// Only read (a shared reference, or a read by value): may share
    /// bytes with other reads.
    Read,
    /// A state the call enters (a `&mut` to its value), or a buffer it
    /// writes: shares no byte with anything else of the call.
    Own,
    /// A state the call does not enter but whose callbacks it makes (a
    /// blk device whose control path is the call's `vhu_device`): as
    /// `Own` within the call.
    Lent,
}

#[derive(Clone, Copy, Debug)]
struct Claim {
    at: usize,
    len: usize,
    how: Use,
}

/// Most ranges one call claims (a pop: the data plane, three outputs and
/// two guest memory descriptions of up to three ranges each).
const MAX_CLAIMS: usize = 12;

/// What one call touches, checked as it is claimed: the storage of each
/// state it enters, each buffer it reads or writes, and the host ranges
/// of the guest memory tables it copies through. A claim that shares a
/// byte with an earlier one is refused with `VHU_ERR_INVALID` unless
/// both are reads (guest memory counts as written: the library copies
/// into it and the guest changes it at any time; two guest regions may
/// share bytes, as no reference is formed into either). Each range is
/// claimed before the call forms a reference to it or writes it, so
/// nothing of a refused call has aliased.
///
/// Addresses are compared as integers; a NULL pointer or an empty range
/// claims nothing (the call refuses NULL where it must, as before). What
/// the library cannot see stays the caller's contract: the bytes behind
/// guest memory given as callbacks, and the buffers of an outer call a
/// callback runs in.
#[derive(Debug)]
pub(crate) struct Footprint<'a> {
    claims: [Claim; MAX_CLAIMS],
    n: usize,
    tables: [&'a [vhu_region]; 2],
    ntables: usize,
}

impl<'a> Footprint<'a> {
    pub(crate) fn new() -> Self {
        Footprint {
            claims: [Claim {
                at: 0,
                len: 0,
                how: Use::Read,
            }; MAX_CLAIMS],
            n: 0,
            tables: [&[]; 2],
            ntables: 0,
        }
    }

    fn claim(&mut self, at: usize, len: usize, how: Use) -> Result<(), vhu_result> {
        if at == 0 || len == 0 {
            return Ok(());
        }
        let clash =
            |c: &Claim| (how != Use::Read || c.how != Use::Read) && overlap(at, len, c.at, c.len);
        if self.claims.iter().take(self.n).any(clash) || self.in_guest(at, len) {
            return Err(VHU_ERR_INVALID);
        }
        // Every entry point claims at most MAX_CLAIMS ranges; one more is
        // a bug of ours, not the caller's.
        let slot = self.claims.get_mut(self.n).ok_or(VHU_ERR_INTERNAL)?;
        *slot = Claim { at, len, how };
        self.n += 1;
        Ok(())
    }

    /// Whether `[at, at + len)` shares a byte with a region in use of a
    /// table claimed so far.
    fn in_guest(&self, at: usize, len: usize) -> bool {
        self.tables
            .iter()
            .take(self.ntables)
            .flat_map(|t| t.iter())
            .filter_map(memory::host_range)
            .any(|(h, n)| overlap(h, n, at, len))
    }

    /// The storage of the state of kind `T` at `p`, which the call enters:
    /// the extent its init recorded when the tag says it is such a state
    /// (a call may be inside it: the tag and the extent are apart from the
    /// value), else `size::<T>()` (the call refuses it anyway). Nothing
    /// for a NULL or misaligned `p`, which the call refuses.
    ///
    /// # Safety
    ///
    /// As [`get`].
    pub(crate) unsafe fn state<T: Kind, P>(&mut self, p: *const P) -> Result<(), vhu_result> {
        // SAFETY: the caller's contract.
        unsafe { self.state_as::<T, P>(p, Use::Own) }
    }

    /// The storage of the state of kind `T` at `p`, which the call does
    /// not enter but whose callbacks it makes: claimed as [`state`](Self::state)
    /// does.
    ///
    /// # Safety
    ///
    /// As [`get`].
    pub(crate) unsafe fn lent_state<T: Kind, P>(&mut self, p: *const P) -> Result<(), vhu_result> {
        // SAFETY: the caller's contract.
        unsafe { self.state_as::<T, P>(p, Use::Lent) }
    }

    /// # Safety
    ///
    /// As [`get`].
    unsafe fn state_as<T: Kind, P>(&mut self, p: *const P, how: Use) -> Result<(), vhu_result> {
        if p.is_null() || (p as usize) % align::<T>() != 0 {
            return Ok(());
        }
        let t: *const Tagged<T> = p.cast();
        // SAFETY: non-null and aligned; the tag is readable (the contract)
        // and no reference covers it (see `get`).
        let tag = unsafe { ptr::addr_of!((*t).tag).read() };
        let len = if tag & !BUSY == T::TAG {
            // SAFETY: the tag says an init of this kind wrote the extent,
            // which no reference covers either.
            let extent = unsafe { ptr::addr_of!((*t).extent).read() };
            usize::try_from(extent).map_or(usize::MAX, |e| e.max(size::<T>()))
        } else {
            size::<T>()
        };
        self.claim(p as usize, len, how)
    }

    /// `n` `T`s at `p` that the call reads.
    pub(crate) fn reads<T>(&mut self, p: *const T, n: usize) -> Result<(), vhu_result> {
        self.claim(p as usize, n.saturating_mul(size_of::<T>()), Use::Read)
    }

    /// `n` `T`s at `p` that the call writes (or holds a `&mut` to).
    pub(crate) fn writes<T>(&mut self, p: *const T, n: usize) -> Result<(), vhu_result> {
        self.claim(p as usize, n.saturating_mul(size_of::<T>()), Use::Own)
    }

    /// The host ranges of a guest memory table the call copies through:
    /// refused if a region in use shares a byte with anything claimed.
    pub(crate) fn guest(&mut self, regions: &'a [vhu_region]) -> Result<(), vhu_result> {
        for (h, n) in regions.iter().filter_map(memory::host_range) {
            let mut claimed = self.claims.iter().take(self.n);
            if claimed.any(|c| overlap(h, n, c.at, c.len)) {
                return Err(VHU_ERR_INVALID);
            }
        }
        let slot = self.tables.get_mut(self.ntables).ok_or(VHU_ERR_INTERNAL)?;
        *slot = regions;
        self.ntables += 1;
        Ok(())
    }
}

/// Writes `v` through the output pointer `p`.
///
/// # Safety
///
/// A non-null `p` points at writable storage for a `T`.
pub(crate) unsafe fn put<T>(p: *mut T, v: T) -> Result<(), vhu_result> {
    if p.is_null() {
        return Err(VHU_ERR_NULL);
    }
    if (p as usize) % align_of::<T>() != 0 {
        return Err(VHU_ERR_ALIGN);
    }
    // SAFETY: non-null and aligned; the caller's contract makes it
    // writable. `write` does not read or drop the old bytes.
    unsafe { p.write(v) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(host: usize, size: u64) -> vhu_region {
        vhu_region {
            gpa: 0,
            size,
            host: host as *mut u8,
        }
    }

    /// Reads may share bytes; what is entered or written shares none with
    /// anything; a range that ends where another begins shares none; a
    /// NULL pointer or an empty range claims nothing.
    #[test]
    fn claims_clash_unless_both_are_reads() {
        let mut fp = Footprint::new();
        assert_eq!(fp.reads(0x1000 as *const u8, 16), Ok(()));
        assert_eq!(fp.reads(0x1008 as *const u8, 16), Ok(()));
        assert_eq!(fp.writes(0x100f as *const u8, 1), Err(VHU_ERR_INVALID));
        assert_eq!(fp.writes(0x1018 as *const u8, 8), Ok(()));
        assert_eq!(fp.reads(0x101f as *const u8, 1), Err(VHU_ERR_INVALID));
        assert_eq!(fp.writes(0x1020 as *const u64, 1), Ok(()));
        assert_eq!(fp.writes(ptr::null::<u64>(), 1), Ok(()));
        assert_eq!(fp.writes(0x1000 as *const u8, 0), Ok(()));
        // A whole address space of u64s saturates instead of wrapping.
        assert_eq!(
            fp.reads(0x10 as *const u64, usize::MAX),
            Err(VHU_ERR_INVALID)
        );
    }

    /// Guest regions clash with every claim, before and after them, but
    /// not with each other; an unused entry (NULL or empty) with nothing.
    #[test]
    fn guest_regions_clash_with_every_claim() {
        let mut fp = Footprint::new();
        assert_eq!(fp.reads(0x1000 as *const u8, 16), Ok(()));
        let over = [region(0x100f, 1)];
        assert_eq!(fp.guest(&over), Err(VHU_ERR_INVALID));
        let apart = [region(0x2000, 0x100), region(0x2080, 0x100), region(0, 16)];
        let unused = [region(0x1000, 0)];
        assert_eq!(fp.guest(&apart), Ok(()));
        assert_eq!(fp.guest(&unused), Ok(()));
        assert_eq!(fp.reads(0x20ff as *const u8, 1), Err(VHU_ERR_INVALID));
        assert_eq!(fp.writes(0x2180 as *const u8, 1), Ok(()));
    }
}

//! Caller-owned state: a tag word followed by the Rust value, in storage
//! the caller allocated and sized with `vhu_*_size()`/`vhu_*_align()`.
//!
//! The tag also says whether a call is inside the state: [`get`] marks
//! it ([`BUSY`]) for as long as the [`Entered`] it gives lives, and
//! refuses a state so marked with `VHU_ERR_BUSY`. A C callback (guest
//! memory, a device) that calls back into the library on the state of
//! the call it runs in gets that error instead of a second `&mut` to a
//! value the first call holds.

use core::mem::{align_of, size_of};
use core::ops::{Deref, DerefMut};
use core::ptr;

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
    // SAFETY: `t` is non-null, aligned for Tagged<T> and (the caller's
    // contract) points at `need >= size_of::<Tagged<T>>()` writable bytes;
    // the old bytes are overwritten without being read or dropped (states
    // own no resource).
    unsafe { t.write(Tagged { tag: T::TAG, value }) };
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

/// Whether the caller's byte ranges `[a, a + a_len)` and `[b, b + b_len)`
/// share a byte (an empty range shares none). Compared as addresses: no
/// pointer is formed or dereferenced.
pub(crate) fn overlap(a: *const u8, a_len: usize, b: *const u8, b_len: usize) -> bool {
    let (a, b) = (a as usize, b as usize);
    a_len != 0 && b_len != 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
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

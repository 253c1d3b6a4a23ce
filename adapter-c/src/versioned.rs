//! The structs of the C ABI that may grow: those a caller hands in (a
//! device's callbacks, guest memory callbacks, the configurations) and
//! those the library writes out (what a message produced, an action, an
//! event, a popped token, ...). Each begins with `struct_size`, the
//! `sizeof` of the struct as the caller's header declared it
//! (`VHU_*_INIT` in the header fills it); for a struct the library writes
//! out, too, the caller sets it and the library keeps it.
//!
//! A struct grows only at its end, so the sizes of its versions are
//! prefixes of one another. The library reads a struct handed in at the
//! size the caller gave, if it is one it knows (`SIZES`); the fields that
//! size does not cover read as the struct's `EMPTY` value (NULL
//! callbacks, zero options). It writes a struct out at the size the
//! caller gave, if it is one it knows: the fields that size covers, and
//! no byte past it. A size it does not know (a program built against a
//! newer header, a struct that was not initialised, or, for a program
//! built before the field existed, its first field read as the size) is
//! refused with `VHU_ERR_ABI` before anything past the size is read or
//! anything is written.

use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::ptr;

use crate::result::vhu_result::{self, *};
use crate::state::Footprint;

/// A struct of the C ABI with a leading `struct_size` (see the module),
/// which the library may write at the caller's size ([`out`]).
///
/// # Safety
///
/// The implementer is `repr(C)` and `Copy`, its first field is
/// `struct_size: usize` (at offset 0), and each entry of `SIZES` ends on
/// a field boundary (a prefix of whole fields) and is at most
/// `size_of::<Self>()`.
pub(crate) unsafe trait Versioned: Copy {
    /// The sizes of the versions this library knows, the oldest first;
    /// the last is `size_of::<Self>()`.
    const SIZES: &'static [usize];
}

/// A [`Versioned`] struct that the library also reads from the caller
/// ([`read`]).
///
/// # Safety
///
/// Every byte pattern of a field is a valid value of it (integers, raw
/// pointers, optional function pointers): the caller's bytes are copied
/// into it as they are.
pub(crate) unsafe trait Readable: Versioned {
    /// The value whose fields are read for those a size does not cover.
    const EMPTY: Self;
}

/// The `struct_size` at `p` (non-null, aligned, and its first word
/// claimed by the caller), checked: one of `T::SIZES`.
///
/// # Safety
///
/// `p` points at a readable `T` of at least the size of its
/// `struct_size` field.
unsafe fn struct_size<T: Versioned>(p: *const T) -> Result<usize, vhu_result> {
    // SAFETY: non-null and aligned (checked by the callers); `struct_size`
    // is the first field of every version (the trait's contract), so the
    // caller's struct has it whatever its version; claimed by the callers,
    // so apart from everything the call writes.
    let n = unsafe { p.cast::<usize>().read() };
    if T::SIZES.contains(&n) {
        Ok(n)
    } else {
        Err(VHU_ERR_ABI)
    }
}

/// Checks a pointer to a `T`: non-null and aligned.
fn check<T>(p: *const T) -> Result<(), vhu_result> {
    if p.is_null() {
        return Err(VHU_ERR_NULL);
    }
    if (p as usize) % align_of::<T>() != 0 {
        return Err(VHU_ERR_ALIGN);
    }
    Ok(())
}

/// Reads the caller's `T` at `p` at the size it says (claimed in `fp`
/// as read before any of it is read): `VHU_ERR_NULL`, `VHU_ERR_ALIGN`,
/// or `VHU_ERR_ABI` for a size this library does not know.
///
/// # Safety
///
/// A non-null `p` points at a readable `T` of the size its `struct_size`
/// says.
pub(crate) unsafe fn read<T: Readable>(
    p: *const T,
    fp: &mut Footprint<'_>,
) -> Result<T, vhu_result> {
    check(p)?;
    fp.reads(p.cast::<usize>(), 1)?;
    // SAFETY: the caller's contract; the word is claimed above.
    let n = unsafe { struct_size(p) }?;
    let word = size_of::<usize>();
    fp.reads(p.cast::<u8>().wrapping_add(word), n.saturating_sub(word))?;
    let mut v = T::EMPTY;
    // SAFETY: `p` is readable for `n` bytes (the caller's contract), and
    // `v` is a `T` of `size_of::<T>() >= n` bytes (every size of `SIZES`
    // is): the copy stays inside both, which are apart (`v` is ours).
    // Every field the `n` bytes cover they cover whole (the trait's
    // contract), and any bytes are a valid value of it (`Readable`), so
    // `v` is a valid `T`.
    unsafe { ptr::copy_nonoverlapping(p.cast::<u8>(), ptr::from_mut(&mut v).cast::<u8>(), n) };
    Ok(v)
}

/// A caller's `T` that a call writes, checked and claimed by [`out`]:
/// [`put`](Out::put) writes the fields its `struct_size` covers.
pub(crate) struct Out<'a, T> {
    p: *mut T,
    /// The caller's `struct_size`: one of `T::SIZES`.
    n: usize,
    _to: PhantomData<&'a mut T>,
}

/// The caller's `T` at `p`, whose `struct_size` the caller set, for the
/// call to write: `VHU_ERR_NULL`, `VHU_ERR_ALIGN`, or `VHU_ERR_ABI` for a
/// size this library does not know (nothing is written then). The whole
/// struct of that size is claimed in `fp` as written, the `struct_size`
/// word before it is read (that word is only read, and kept, but an
/// output shares no byte with anything else of the call).
///
/// # Safety
///
/// A non-null `p` points at a `T` of the size its `struct_size` says,
/// writable for `'a` (the call).
pub(crate) unsafe fn out<'a, T: Versioned>(
    p: *mut T,
    fp: &mut Footprint<'_>,
) -> Result<Out<'a, T>, vhu_result> {
    check(p)?;
    fp.writes(p.cast::<usize>(), 1)?;
    // SAFETY: the caller's contract; the word is claimed above.
    let n = unsafe { struct_size(p.cast_const()) }?;
    let word = size_of::<usize>();
    fp.writes(p.cast::<u8>().wrapping_add(word), n.saturating_sub(word))?;
    Ok(Out {
        p,
        n,
        _to: PhantomData,
    })
}

impl<T: Versioned> Out<'_, T> {
    /// Writes `v`'s fields that the caller's `struct_size` covers (the
    /// size itself is kept).
    pub(crate) fn put(&self, v: T) {
        let word = size_of::<usize>();
        // SAFETY: the caller's `p` is writable for `n` bytes (the contract
        // of `out`, which checked it non-null and aligned and `n` one of
        // `SIZES`) and `v` holds `size_of::<T>() >= n` bytes: the copy of
        // the bytes past `struct_size` stays inside both, which are apart
        // (`v` is ours), and apart from everything else of the call
        // (claimed by `out`); the caller's fields are whole fields (the
        // trait's contract) of valid values.
        unsafe {
            ptr::copy_nonoverlapping(
                ptr::from_ref(&v).cast::<u8>().wrapping_add(word),
                self.p.cast::<u8>().wrapping_add(word),
                self.n.saturating_sub(word),
            );
        }
    }
}

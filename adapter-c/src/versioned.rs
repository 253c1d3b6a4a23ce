//! The structs a caller hands in that may grow (a device's callbacks,
//! guest memory callbacks, the configurations): each begins with
//! `struct_size`, the `sizeof` of the struct as the caller's header
//! declared it (`VHU_*_INIT` in the header fills it).
//!
//! A struct grows only at its end, so the sizes of its versions are
//! prefixes of one another. The library reads the struct at the size the
//! caller gave, if it is one it knows (`SIZES`); the fields that size
//! does not cover read as the struct's `EMPTY` value (NULL callbacks,
//! zero options). A size it does not know (a program built against a
//! newer header, a struct that was not initialised, or, for a program
//! built before the field existed, its first field read as the size) is
//! refused with `VHU_ERR_ABI` before anything past the size is read.
//! The same holds for a struct the library writes (`vhu_blk_device()`
//! fills a `vhu_device`): it writes the fields the caller's size covers.

use core::mem::{align_of, size_of};
use core::ptr;

use crate::result::vhu_result::{self, *};
use crate::state::Footprint;

/// A struct of the C ABI with a leading `struct_size` (see the module).
///
/// # Safety
///
/// The implementer is `repr(C)` and `Copy`, its first field is
/// `struct_size: usize` (at offset 0), each entry of `SIZES` ends on a
/// field boundary (a prefix of whole fields) and is at most
/// `size_of::<Self>()`, and every byte pattern of a field is a valid
/// value of it (integers, raw pointers, optional function pointers).
pub(crate) unsafe trait Versioned: Copy {
    /// The sizes of the versions this library knows, the oldest first;
    /// the last is `size_of::<Self>()`.
    const SIZES: &'static [usize];
    /// The value whose fields are read for those a size does not cover.
    const EMPTY: Self;
}

/// The `struct_size` at `p` (non-null, aligned), checked: one of
/// `T::SIZES`. The word is claimed in `fp` before it is read.
///
/// # Safety
///
/// `p` points at a readable `T` of at least the size of its
/// `struct_size` field.
unsafe fn struct_size<T: Versioned>(
    p: *const T,
    fp: &mut Footprint<'_>,
) -> Result<usize, vhu_result> {
    fp.reads(p.cast::<usize>(), 1)?;
    // SAFETY: non-null and aligned (checked by the callers); `struct_size`
    // is the first field of every version (the trait's contract), so the
    // caller's struct has it whatever its version; claimed above, so apart
    // from everything the call writes.
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
pub(crate) unsafe fn read<T: Versioned>(
    p: *const T,
    fp: &mut Footprint<'_>,
) -> Result<T, vhu_result> {
    check(p)?;
    // SAFETY: the caller's contract.
    let n = unsafe { struct_size(p, fp) }?;
    let word = size_of::<usize>();
    fp.reads(p.cast::<u8>().wrapping_add(word), n.saturating_sub(word))?;
    let mut v = T::EMPTY;
    // SAFETY: `p` is readable for `n` bytes (the caller's contract), and
    // `v` is a `T` of `size_of::<T>() >= n` bytes (every size of `SIZES`
    // is): the copy stays inside both, which are apart (`v` is ours).
    // Every field the `n` bytes cover they cover whole (the trait's
    // contract), and any bytes are a valid value of it, so `v` is a
    // valid `T`.
    unsafe { ptr::copy_nonoverlapping(p.cast::<u8>(), ptr::from_mut(&mut v).cast::<u8>(), n) };
    Ok(v)
}

/// Writes `v` into the caller's `T` at `p`, whose `struct_size` the
/// caller set: the fields that size covers (the size itself is kept).
/// Claimed in `fp` as written before anything is written.
///
/// # Safety
///
/// A non-null `p` points at a writable `T` of the size its `struct_size`
/// says.
pub(crate) unsafe fn write<T: Versioned>(
    p: *mut T,
    v: T,
    fp: &mut Footprint<'_>,
) -> Result<(), vhu_result> {
    check(p)?;
    // SAFETY: the caller's contract.
    let n = unsafe { struct_size(p.cast_const(), fp) }?;
    let word = size_of::<usize>();
    let rest = n.saturating_sub(word);
    fp.writes(p.cast::<u8>().wrapping_add(word), rest)?;
    // SAFETY: the caller's `p` is writable for `n` bytes (its contract)
    // and `v` holds `size_of::<T>() >= n` bytes: the copy of the bytes
    // past `struct_size` stays inside both, which are apart (`v` is
    // ours); the caller's fields are whole fields (the trait's contract)
    // of valid values.
    unsafe {
        ptr::copy_nonoverlapping(
            ptr::from_ref(&v).cast::<u8>().wrapping_add(word),
            p.cast::<u8>().wrapping_add(word),
            rest,
        );
    }
    Ok(())
}

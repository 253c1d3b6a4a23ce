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
//!
//! Across calls, it keeps the same rule for a call made from a callback
//! (a nested call, on another state or on none): while a callback of the
//! caller's runs, the footprint of the call it runs in is published to
//! the thread ([`Footprint::call_out`]), and every claim of a nested call
//! is checked against it too. A nested call may read what the outer call
//! reads, and use what the outer call handed the callback (its buffer
//! argument, and a blk device whose callbacks the call makes), but
//! nothing else of the outer call.

#[cfg(feature = "std")]
use core::cell::Cell;
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

/// A mutable byte slice from a C pointer and length (see [`slice()`]).
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
    /// `Own` within the call, and open to the calls those callbacks make.
    Lent,
}

#[derive(Clone, Copy, Debug)]
struct Claim {
    at: usize,
    len: usize,
    how: Use,
    /// The storage of a state: its first 8 bytes (the tag and the
    /// extent) are never covered by a reference, so a nested call may
    /// read them (to answer `VHU_ERR_BUSY`).
    state: bool,
}

const NO_CLAIM: Claim = Claim {
    at: 0,
    len: 0,
    how: Use::Read,
    state: false,
};

impl Claim {
    /// Whether `[at, at + len)` lies inside this range (which is not
    /// empty).
    fn holds(&self, at: usize, len: usize) -> bool {
        self.len != 0 && at >= self.at && at.saturating_add(len) <= self.at.saturating_add(self.len)
    }

    /// Whether a claim `how` of `[at, at + len)` clashes with this one:
    /// they share a byte and are not both reads.
    fn clashes(&self, at: usize, len: usize, how: Use) -> bool {
        (how != Use::Read || self.how != Use::Read) && overlap(at, len, self.at, self.len)
    }
}

/// Most ranges one call claims: 11 for a pop (the data plane, three
/// outputs, the token as two: its `struct_size` word and the rest, and
/// two guest memory descriptions of up to three ranges each) and for a
/// message handled (the back-end, the message, the device as two and the
/// blk device it lends, the reply, the outcome as two, and guest memory).
const MAX_CLAIMS: usize = 12;

/// Bytes of a state's tag and extent, before its value.
const HEADER: usize = 8;
const _: () = assert!(core::mem::offset_of!(Tagged<u8>, value) == HEADER);

/// What a callback of the caller's is handed of the library's bytes,
/// which a call it makes may use as the callback may.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lend {
    /// No buffer.
    Nothing,
    /// `len` bytes the callback reads (`vhu_mem_ops.write`'s `src`).
    Reads(*const u8, usize),
    /// `len` bytes the callback writes (`vhu_mem_ops.read`'s `dst`).
    Writes(*mut u8, usize),
}

impl Lend {
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    fn claim(self) -> Claim {
        let (at, len, how) = match self {
            Lend::Nothing => return NO_CLAIM,
            Lend::Reads(p, n) => (p as usize, n, Use::Read),
            Lend::Writes(p, n) => (p as usize, n, Use::Own),
        };
        Claim {
            at,
            len,
            how,
            state: false,
        }
    }
}

/// A call of this thread that a callback of the caller's runs in (see
/// [`Footprint::call_out`]): its footprint, what it handed the callback,
/// and the call (if any) that it runs in in turn.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
struct Link {
    /// The call's `Footprint`, whose lifetime this erases: the link lives
    /// in the call's frame, no longer than the footprint it borrows.
    fp: *const (),
    lent: Claim,
    outer: *const Link,
}

#[cfg(feature = "std")]
std::thread_local! {
    /// The innermost call of this thread a callback runs in (NULL: none).
    static OUTER: Cell<*const Link> = const { Cell::new(ptr::null()) };
}

/// The innermost call of this thread a callback runs in. Without `std`
/// the library has no thread-local storage and cannot see it: none.
fn outer() -> *const Link {
    #[cfg(feature = "std")]
    {
        OUTER.try_with(Cell::get).unwrap_or(ptr::null())
    }
    #[cfg(not(feature = "std"))]
    {
        ptr::null()
    }
}

#[cfg(feature = "std")]
fn set_outer(l: *const Link) {
    // A `Cell` of a pointer has no destructor: the slot is always there.
    let _ = OUTER.try_with(|c| c.set(l));
}

/// The calls `l` and those it runs in, innermost first, with their
/// footprints.
///
/// # Safety
///
/// `l` is NULL or a link [`Footprint::call_out`] published on this
/// thread whose callback has not returned.
unsafe fn chain<'l>(mut l: *const Link) -> impl Iterator<Item = (&'l Footprint<'l>, Claim)> {
    core::iter::from_fn(move || {
        // SAFETY: a published link lives in the frame of a call of this
        // thread that is waiting for its callback to return, which runs
        // the caller of this function: it outlives this iteration (the
        // contract), and so do the links it points to, further out.
        let link = unsafe { l.as_ref() }?;
        l = link.outer;
        // SAFETY: `fp` is the footprint the link borrows (see `Link`),
        // which no one changes while it is published (`call_out` holds a
        // shared borrow of it).
        let fp = unsafe { &*link.fp.cast::<Footprint<'l>>() };
        Some((fp, link.lent))
    })
}

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
/// A call made from a callback of the caller's (a nested call) checks
/// each claim, and each host range of its tables, against the calls it
/// runs in as well (see the module): a claim inside what the outer call
/// lent (the callback's buffer, a `Lent` state) only against how it was
/// lent, any other as if the outer call's claims were its own; the outer
/// call's guest ranges clash with every claim but the nested call's own
/// guest ranges.
///
/// Addresses are compared as integers; a NULL pointer or an empty range
/// claims nothing (the call refuses NULL where it must, as before). What
/// the library cannot see stays the caller's contract: the bytes behind
/// guest memory given as callbacks, and, without `std` (no thread-local
/// storage), the calls a nested call runs in.
#[derive(Debug)]
pub(crate) struct Footprint<'a> {
    claims: [Claim; MAX_CLAIMS],
    n: usize,
    tables: [&'a [vhu_region]; 2],
    ntables: usize,
    /// The innermost call of this thread a callback runs in, when this
    /// call began (NULL: none; this call is not nested).
    outer: *const Link,
}

impl<'a> Footprint<'a> {
    pub(crate) fn new() -> Self {
        Footprint {
            claims: [NO_CLAIM; MAX_CLAIMS],
            n: 0,
            tables: [&[]; 2],
            ntables: 0,
            outer: outer(),
        }
    }

    fn claim(&mut self, at: usize, len: usize, how: Use, state: bool) -> Result<(), vhu_result> {
        if at == 0 || len == 0 {
            return Ok(());
        }
        let clash = |c: &Claim| c.clashes(at, len, how);
        if self.claims.iter().take(self.n).any(clash)
            || self.in_guest(at, len)
            || self.outer_refuses(at, len, how, false)
        {
            return Err(VHU_ERR_INVALID);
        }
        // Every entry point claims at most MAX_CLAIMS ranges; one more is
        // a bug of ours, not the caller's.
        let slot = self.claims.get_mut(self.n).ok_or(VHU_ERR_INTERNAL)?;
        *slot = Claim {
            at,
            len,
            how,
            state,
        };
        self.n += 1;
        Ok(())
    }

    /// Whether a call that this one runs in refuses this (nested) call a
    /// claim `how` of `[at, at + len)`: a host range of a guest table of
    /// this call's (`guest`: counted as `Own`) or any other claim.
    fn outer_refuses(&self, at: usize, len: usize, how: Use, guest: bool) -> bool {
        // SAFETY: `outer` was the innermost published link of this thread
        // when this call began, and this call returns before the callback
        // that link runs (and those further out) does.
        let mut calls = unsafe { chain(self.outer) };
        calls.any(|(fp, lent)| fp.refuses_nested(lent, at, len, how, guest))
    }

    /// Whether this call, running the callback it handed `lent`, refuses
    /// a call made from it the claim `how` of `[at, at + len)`.
    fn refuses_nested(&self, lent: Claim, at: usize, len: usize, how: Use, guest: bool) -> bool {
        let claims = self.claims.get(..self.n).unwrap_or(&[]);
        let open = claims.iter().filter(|c| c.how == Use::Lent);
        if let Some(l) = core::iter::once(&lent)
            .chain(open)
            .find(|l| l.holds(at, len))
        {
            // Inside what this call handed on: used as it was handed.
            return how != Use::Read && l.how == Use::Read;
        }
        claims
            .iter()
            .chain(core::iter::once(&lent))
            .any(|c| c.clashes(at, len, how))
            || (!guest && self.in_guest(at, len))
    }

    /// Whether `at` is the first byte of the storage of a state a call
    /// this one runs in claimed: its tag and extent may be read.
    fn outer_state_at(&self, at: usize) -> bool {
        // SAFETY: as in `outer_refuses`.
        let mut calls = unsafe { chain(self.outer) };
        calls.any(|(fp, _)| fp.claims.iter().take(fp.n).any(|c| c.state && c.at == at))
    }

    /// Runs the callback `f`, handed `lend`, with this call published to
    /// the calls `f` makes on this thread (each checks its claims against
    /// this call's: see the type). Without `std`, `f` runs as is.
    pub(crate) fn call_out<R>(&self, lend: Lend, f: impl FnOnce() -> R) -> R {
        #[cfg(feature = "std")]
        {
            /// Puts back the link that was innermost, also on unwinding.
            struct Leave(*const Link);
            impl Drop for Leave {
                fn drop(&mut self) {
                    set_outer(self.0);
                }
            }
            let before = outer();
            let link = Link {
                fp: ptr::from_ref(self).cast(),
                lent: lend.claim(),
                outer: before,
            };
            set_outer(&link);
            let _leave = Leave(before);
            f()
        }
        #[cfg(not(feature = "std"))]
        {
            let _ = lend;
            f()
        }
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
    /// `VHU_ERR_BUSY` if a call is inside the state (a callback called
    /// back on it), before the bytes of a call this one runs in are
    /// compared with it.
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
    /// does, and open to the calls those callbacks make.
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
        let at = p as usize;
        // The tag is read only where no call this one runs in holds a
        // reference: outside them, or at the start of a state one of them
        // claimed (its tag and extent are apart from its value).
        if !self.outer_state_at(at) && self.outer_refuses(at, HEADER, Use::Read, false) {
            return Err(VHU_ERR_INVALID);
        }
        let t: *const Tagged<T> = p.cast();
        // SAFETY: non-null and aligned; the tag is readable (the contract)
        // and no reference covers it (see `get`, and above).
        let tag = unsafe { ptr::addr_of!((*t).tag).read() };
        if tag == T::TAG | BUSY {
            return Err(VHU_ERR_BUSY);
        }
        let len = if tag == T::TAG {
            // SAFETY: the tag says an init of this kind wrote the extent,
            // which no reference covers either.
            let extent = unsafe { ptr::addr_of!((*t).extent).read() };
            usize::try_from(extent).map_or(usize::MAX, |e| e.max(size::<T>()))
        } else {
            size::<T>()
        };
        self.claim(at, len, how, true)
    }

    /// `n` `T`s at `p` that the call reads.
    pub(crate) fn reads<T>(&mut self, p: *const T, n: usize) -> Result<(), vhu_result> {
        self.claim(
            p as usize,
            n.saturating_mul(size_of::<T>()),
            Use::Read,
            false,
        )
    }

    /// `n` `T`s at `p` that the call writes (or holds a `&mut` to).
    pub(crate) fn writes<T>(&mut self, p: *const T, n: usize) -> Result<(), vhu_result> {
        self.claim(
            p as usize,
            n.saturating_mul(size_of::<T>()),
            Use::Own,
            false,
        )
    }

    /// The host ranges of a guest memory table the call copies through:
    /// refused if a region in use shares a byte with anything claimed, or
    /// with what a call this one runs in uses (guest memory counts as
    /// written).
    pub(crate) fn guest(&mut self, regions: &'a [vhu_region]) -> Result<(), vhu_result> {
        for (h, n) in regions.iter().filter_map(memory::host_range) {
            let mut claimed = self.claims.iter().take(self.n);
            if claimed.any(|c| overlap(h, n, c.at, c.len))
                || self.outer_refuses(h, n, Use::Own, true)
            {
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

    /// A call made from a callback (with `std`, where the library sees
    /// it) may read what the outer call reads and use what the callback
    /// was handed as it was handed, but no byte more of the outer call;
    /// once the callback has returned, nothing of the outer call is
    /// claimed any more.
    #[cfg(feature = "std")]
    #[test]
    fn a_nested_call_uses_only_what_the_outer_call_handed_on() {
        let mut outer = Footprint::new();
        assert_eq!(outer.reads(0x1000 as *const u8, 16), Ok(()));
        assert_eq!(outer.writes(0x2000 as *const u8, 64), Ok(()));
        let guest = [region(0x8000, 0x100)];
        assert_eq!(outer.guest(&guest), Ok(()));
        let outer = &outer;
        let (over, beside) = ([region(0x1008, 8)], [region(0x8080, 0x100)]);
        outer.call_out(Lend::Writes(0x2010 as *mut u8, 16), || {
            let mut fp = Footprint::new();
            assert_eq!(fp.reads(0x1000 as *const u8, 16), Ok(()));
            assert_eq!(fp.writes(0x2010 as *const u8, 16), Ok(()));
            let mut fp = Footprint::new();
            assert_eq!(fp.writes(0x100f as *const u8, 1), Err(VHU_ERR_INVALID));
            assert_eq!(fp.writes(0x2018 as *const u8, 16), Err(VHU_ERR_INVALID));
            assert_eq!(fp.reads(0x2000 as *const u8, 1), Err(VHU_ERR_INVALID));
            assert_eq!(fp.reads(0x80ff as *const u8, 1), Err(VHU_ERR_INVALID));
            assert_eq!(fp.guest(&over), Err(VHU_ERR_INVALID));
            // Its own guest memory may share the outer call's.
            assert_eq!(fp.guest(&beside), Ok(()));
            // Handed to be read: only read.
            outer.call_out(Lend::Reads(0x2010 as *const u8, 8), || {
                let mut fp = Footprint::new();
                assert_eq!(fp.reads(0x2010 as *const u8, 8), Ok(()));
                assert_eq!(fp.writes(0x2010 as *const u8, 1), Err(VHU_ERR_INVALID));
            });
        });
        let mut fp = Footprint::new();
        assert_eq!(fp.writes(0x1000 as *const u8, 0x8000), Ok(()));
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

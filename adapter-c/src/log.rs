//! The dirty log of live migration (LOG_SHMFD, VHOST_F_LOG_ALL,
//! VHOST_VRING_F_LOG): while a guest migrates, the front-end copies its
//! memory in passes and the back-end sets a bit for every 4 KiB page of
//! guest memory it writes, in a bitmap the front-end shares
//! (SET_LOG_BASE). A C front-end sizes the bitmap with
//! [`vhu_log_bitmap_size`] (and asks for it with
//! `vhu_frontend_start_logging()`); the rest of this module is a C
//! back-end's.
//!
//! The session says what to do through actions: `VHU_ACTION_MAP_LOG`
//! (map the bitmap), `VHU_ACTION_SET_LOGGING` (VHOST_F_LOG_ALL on or off:
//! whether device writes are marked), `VHU_ACTION_SET_RING_LOG` (a
//! running ring's used ring is marked at a guest address, or no longer)
//! and `VHU_ACTION_SET_LOG_FD` (an eventfd to signal after marking). The
//! host marks with these calls, each given the mapped bitmap as a table
//! of one region at guest address 0 (as the inflight area) and the
//! bitmap's size from `VHU_ACTION_MAP_LOG`:
//!
//! - [`vhu_log_mark`]: a range it wrote into guest memory by itself;
//! - [`vhu_log_mark_written`]: the device-writable buffers of a chain, as
//!   far as the used length it completes the chain with;
//! - `vhu_dataplane_log_used()`: a ring's used ring (the descriptor ring
//!   and device area of a packed one), after its publishes.
//!
//! Bits are only ever set, each with an atomic OR (the front-end reads
//! and clears them concurrently), after the writes they report: mark once
//! the bytes are in guest memory, before the completion is published.

use core::mem::align_of;

use vhost_user_core::log::{bitmap_bytes, DirtyLog, LogError};
use vhost_user_core::memory::MemoryError;

use crate::dataplane::vhu_segment;
use crate::memory::{vhu_mem, Mem};
use crate::result::guard;
use crate::result::vhu_result::{self, *};
use crate::state::{self, Footprint};

/// Bytes of dirty log that cover guest physical memory up to `guest_end`
/// (the end of its highest region): one bit per 4 KiB page, in whole
/// 64-bit words (a front-end reads and clears the log a word at a time).
/// The least size `vhu_frontend_start_logging()` takes; a back-end's
/// session refuses a SET_LOG_BASE smaller than the bits alone.
#[no_mangle]
pub extern "C" fn vhu_log_bitmap_size(guest_end: u64) -> u64 {
    bitmap_bytes(guest_end).next_multiple_of(8)
}

/// How a log refusal reads in C.
fn log_error(e: LogError) -> vhu_result {
    #[allow(unreachable_patterns)]
    match e {
        LogError::Overflow => VHU_ERR_INVALID,
        LogError::Memory(MemoryError::Unsupported) => VHU_ERR_UNSUPPORTED,
        // Beyond the bitmap's size, or beyond what the table maps.
        _ => VHU_ERR_MEMORY,
    }
}

/// What the marking calls share: `mark` sets bits in the dirty log `log`
/// (a table, `size` bytes of bitmap) and gives the number of pages it
/// marked, added to `*pages` unless `pages` is NULL. `fp` holds the
/// call's other claims; `pages` and the table are claimed here, after
/// them (so a table whose host range covers any of them is refused).
///
/// # Safety
///
/// `log` is NULL or points at a valid table mapping the bitmap; `pages`
/// is NULL or points at a readable and writable `u64`.
pub(crate) unsafe fn mark_log(
    fp: &mut Footprint<'_>,
    log: *const vhu_mem,
    size: u64,
    pages: *mut u64,
    mark: impl FnOnce(&DirtyLog<'_, Mem<'_>>) -> Result<u64, LogError>,
) -> Result<(), vhu_result> {
    if log.is_null() {
        return Err(VHU_ERR_NULL);
    }
    fp.writes(pages, usize::from(!pages.is_null()))?;
    // SAFETY: the caller's contract.
    let log = unsafe { Mem::from_raw(log, fp) }?;
    let log = log.bind(fp);
    let n = mark(&DirtyLog::new(&log, size)).map_err(log_error)?;
    // SAFETY: the caller's contract; claimed above.
    unsafe { add_pages(pages, n) }
}

/// Adds `n` to `*pages` if `pages` is not NULL.
///
/// # Safety
///
/// A non-null `pages` points at a writable `u64` the call claimed.
unsafe fn add_pages(pages: *mut u64, n: u64) -> Result<(), vhu_result> {
    if pages.is_null() {
        return Ok(());
    }
    if (pages as usize) % align_of::<u64>() != 0 {
        return Err(VHU_ERR_ALIGN);
    }
    // SAFETY: non-null and aligned; the caller's contract makes it
    // readable and writable.
    let old = unsafe { pages.read() };
    // SAFETY: as above.
    unsafe { state::put(pages, old.wrapping_add(n)) }
}

/// Marks in the dirty log `log` (`size` bytes of bitmap) the pages of the
/// guest range `[gpa, gpa + len)`, which the host wrote; adds the number
/// of pages to `*pages` unless `pages` is NULL. An empty range marks
/// nothing. `VHU_ERR_MEMORY` if the range's last page has no bit in
/// `size` bytes (nothing marked) or the table does not map the bitmap's
/// bytes, `VHU_ERR_UNSUPPORTED` for a log given as callbacks (a bitmap
/// needs an atomic OR), `VHU_ERR_INVALID` if the range overflows.
///
/// # Safety
///
/// `log` points at a valid table mapping the bitmap; `pages` is NULL or
/// points at a readable and writable `u64`.
#[no_mangle]
pub unsafe extern "C" fn vhu_log_mark(
    log: *const vhu_mem,
    size: u64,
    gpa: u64,
    len: u64,
    pages: *mut u64,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { mark_log(&mut fp, log, size, pages, |d| d.mark(gpa, len)) }
    })
}

/// The guest ranges `written` bytes fill in the device-writable segments
/// of `segs`, in order.
fn written_ranges(segs: &[vhu_segment], written: u32) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut left = written;
    segs.iter().filter(|s| s.writable).map_while(move |s| {
        if left == 0 {
            return None;
        }
        let len = left.min(s.len);
        left -= len;
        Some((s.addr, u64::from(len)))
    })
}

/// Marks in the dirty log `log` (`size` bytes of bitmap) what a device
/// wrote into a chain: the first `written` bytes of its device-writable
/// segments, in order (`nsegs` of `segs`, as `vhu_dataplane_pop()` gave
/// them; the readable ones are skipped), where `written` is the used
/// length the chain is completed with. Adds the pages marked to `*pages`
/// unless `pages` is NULL (a page two segments touch counts twice).
/// `VHU_ERR_INVALID` if `written` is more than the writable segments
/// hold; otherwise as `vhu_log_mark()` for each segment, and refused
/// whole: a segment the log does not cover is `VHU_ERR_MEMORY` with
/// nothing marked (since ABI 1.2; 1.1 marked the segments before it).
///
/// # Safety
///
/// `log` points at a valid table mapping the bitmap; `segs` at `nsegs`
/// readable `vhu_segment`s (NULL when `nsegs` is 0); `pages` is NULL or
/// points at a readable and writable `u64`.
#[no_mangle]
pub unsafe extern "C" fn vhu_log_mark_written(
    log: *const vhu_mem,
    size: u64,
    segs: *const vhu_segment,
    nsegs: usize,
    written: u32,
    pages: *mut u64,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        fp.reads(segs, nsegs)?;
        // SAFETY: the caller's contract; claimed above.
        let segs = unsafe { state::slice(segs, nsegs) }?;
        let room = segs
            .iter()
            .filter(|s| s.writable)
            .fold(0u64, |n, s| n.saturating_add(u64::from(s.len)));
        if u64::from(written) > room {
            return Err(VHU_ERR_INVALID);
        }
        let mark = |dirty: &DirtyLog<'_, Mem<'_>>| {
            // Refused whole: every range checked before one is marked.
            for (addr, len) in written_ranges(segs, written) {
                dirty.check(addr, len)?;
            }
            written_ranges(segs, written).try_fold(0u64, |n, (addr, len)| {
                Ok(n.saturating_add(dirty.mark(addr, len)?))
            })
        };
        // SAFETY: the caller's contract.
        unsafe { mark_log(&mut fp, log, size, pages, mark) }
    })
}

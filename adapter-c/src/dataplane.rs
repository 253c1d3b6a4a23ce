//! The data plane of one started ring: pop a request (its chain and a
//! token), complete tokens in any order, publish with the notification
//! decision, stop by draining or suspending. With an inflight area, a
//! request is recorded before it is handed out and the requests recorded
//! by an earlier run are handed out first after a start.
//!
//! The state is variable-sized: a fixed part and a table of the tokens
//! handed out, one entry per ring slot (`vhu_dataplane_size(queue_size)`).
//! A token is a handle into that table, so C completes a request by the
//! handle it got from `vhu_dataplane_pop()`.

use core::mem::{align_of, size_of};

use vhost_user_core::dataplane::{DataPlane, Published, Stop, Token};
use vhost_user_core::feature::VirtioFeatures;
use vhost_user_core::vring::{Chain, Queue};

use crate::backend::vhu_ring_addrs;
use crate::memory::{vhu_mem, Mem};
use crate::result::vhu_result::{self, *};
use crate::result::{self, guard};
use crate::state::{self, Footprint, Kind};
use crate::versioned::{self, Readable, Versioned};

/// Most segments (descriptors with bytes) of one chain: the segment
/// buffer of `vhu_dataplane_pop()` has room for this many. A longer chain
/// breaks the ring.
pub const VHU_MAX_CHAIN: u32 = 64;

/// The token handle `vhu_dataplane_pop()` gives when nothing was popped.
pub const VHU_NO_TOKEN: u32 = 0xffff_ffff;

const CHAIN: usize = VHU_MAX_CHAIN as usize;

/// The data plane of one started ring (opaque; `vhu_dataplane_size()` of
/// the ring size bytes aligned to `vhu_dataplane_align()`).
#[derive(Debug)]
pub struct vhu_dataplane {
    _opaque: [u8; 0],
}

#[derive(Debug)]
pub(crate) struct Ring {
    dp: DataPlane,
    chain: Chain<CHAIN>,
    /// Entries of the token table after this state.
    slots: u16,
    /// Where the search for a free entry starts.
    hint: u16,
}

impl Kind for Ring {
    const TAG: u32 = 0x7668_7544;
}

type Slot = Option<Token>;

const _: () = assert!(state::align::<Ring>() >= align_of::<Slot>());

/// Offset of the token table in the storage.
const fn table_offset() -> usize {
    state::size::<Ring>().next_multiple_of(align_of::<Slot>())
}

/// Bytes of a data plane without its token table (the least storage
/// worth checking before a ring's size is known).
pub(crate) const fn fixed_size() -> usize {
    table_offset()
}

/// A request handed out by `vhu_dataplane_pop()` (start from
/// `VHU_TOKEN_INIT`, or `.struct_size = sizeof(vhu_token)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_token {
    /// `sizeof(vhu_token)`, set by the caller and kept by the library,
    /// which writes the fields it covers (`VHU_ERR_ABI`, and nothing
    /// written, for a size this library does not know).
    pub struct_size: usize,
    /// Give it back to `vhu_dataplane_complete()`; `VHU_NO_TOKEN` if
    /// nothing was popped.
    pub handle: u32,
    /// The chain's id (split: head descriptor index; packed: buffer id).
    pub id: u16,
    /// False for a request consumed from a started but disabled ring:
    /// complete it with length 0 and touch nothing.
    pub side_effects: bool,
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct.
unsafe impl Versioned for vhu_token {
    const SIZES: &'static [usize] = &[size_of::<vhu_token>()];
}

impl Default for vhu_token {
    /// No request (`VHU_NO_TOKEN`), at this version's size.
    fn default() -> Self {
        vhu_token {
            struct_size: size_of::<vhu_token>(),
            handle: VHU_NO_TOKEN,
            id: 0,
            side_effects: false,
        }
    }
}

/// One buffer of a chain, in guest physical memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vhu_segment {
    /// Guest physical address.
    pub addr: u64,
    /// Bytes (never 0).
    pub len: u32,
    /// Device-writable (the device-readable buffers come first).
    pub writable: bool,
}

/// What a publish did.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum vhu_published {
    /// Nothing was waiting to be published.
    VHU_PUBLISHED_NOTHING = 0,
    /// Used entries were published and the guest wants a notification:
    /// signal the ring's call eventfd.
    VHU_PUBLISHED_NOTIFY = 1,
    /// Used entries were published; the guest suppressed the notification.
    VHU_PUBLISHED_SUPPRESSED = 2,
}

fn published(p: Published) -> vhu_published {
    match p {
        Published::Nothing => vhu_published::VHU_PUBLISHED_NOTHING,
        Published::Notify => vhu_published::VHU_PUBLISHED_NOTIFY,
        Published::Suppressed => vhu_published::VHU_PUBLISHED_SUPPRESSED,
    }
}

/// A ring to start without a session (a host that configures rings
/// itself): `VHU_RING_CONFIG_INIT`, or `.struct_size =
/// sizeof(vhu_ring_config)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_ring_config {
    /// `sizeof(vhu_ring_config)` (`VHU_ERR_ABI` for a size this library
    /// does not know).
    pub struct_size: usize,
    /// Ring size (split: a power of two; 1 to 32768).
    pub size: u16,
    /// Guest physical addresses of the ring's areas.
    pub addrs: vhu_ring_addrs,
    /// Negotiated virtio features (ring layout, EVENT_IDX, indirect).
    pub features: u64,
    /// Where the ring starts (the GET/SET_VRING_BASE encoding).
    pub base: u32,
    /// Non-zero: the ring is enabled.
    pub enabled: u8,
    /// Non-zero: a disabled ring is consumed without side effects instead
    /// of paused.
    pub consume_disabled: u8,
    /// Offset of the ring's region in the inflight area (ignored without
    /// an area).
    pub inflight_offset: u64,
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct; every field is an integer (`addrs`: three).
unsafe impl Versioned for vhu_ring_config {
    const SIZES: &'static [usize] = &[size_of::<vhu_ring_config>()];
}

// SAFETY: every field is an integer, a raw pointer or an optional
// function pointer.
unsafe impl Readable for vhu_ring_config {
    const EMPTY: Self = vhu_ring_config {
        struct_size: 0,
        size: 0,
        addrs: vhu_ring_addrs {
            desc: 0,
            driver: 0,
            device: 0,
        },
        features: 0,
        base: 0,
        enabled: 0,
        consume_disabled: 0,
        inflight_offset: 0,
    };
}

impl Default for vhu_ring_config {
    /// Zero, at this version's size (`VHU_RING_CONFIG_INIT`).
    fn default() -> Self {
        vhu_ring_config {
            struct_size: size_of::<vhu_ring_config>(),
            ..vhu_ring_config::EMPTY
        }
    }
}

/// What a data plane knows about itself (written by
/// `vhu_dataplane_get_info()`; start from `VHU_DATAPLANE_INFO_INIT`, or
/// `.struct_size = sizeof(vhu_dataplane_info)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_dataplane_info {
    /// `sizeof(vhu_dataplane_info)`, set by the caller and kept by the
    /// library, which writes the fields it covers (`VHU_ERR_ABI`, and
    /// nothing written, for a size this library does not know).
    pub struct_size: usize,
    /// Ring size.
    pub size: u16,
    /// The GET_VRING_BASE value of the ring as it is now.
    pub base: u32,
    /// Requests handed out and not completed.
    pub outstanding: u16,
    /// Recorded requests not yet handed out again.
    pub resubmits_left: u16,
    /// The ring is enabled.
    pub enabled: bool,
    /// Pop takes nothing new now (stopping, stopped, broken, or disabled
    /// and not consumed).
    pub paused: bool,
    /// `vhu_dataplane_stop()` answered stopped.
    pub stopped: bool,
    /// Requests are recorded in an inflight area.
    pub tracked: bool,
    /// `VHU_OK`, or the error that broke the ring.
    pub error: vhu_result,
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct.
unsafe impl Versioned for vhu_dataplane_info {
    const SIZES: &'static [usize] = &[size_of::<vhu_dataplane_info>()];
}

impl Default for vhu_dataplane_info {
    /// Zero, at this version's size (`VHU_DATAPLANE_INFO_INIT`).
    fn default() -> Self {
        vhu_dataplane_info {
            struct_size: size_of::<vhu_dataplane_info>(),
            size: 0,
            base: 0,
            outstanding: 0,
            resubmits_left: 0,
            enabled: false,
            paused: false,
            stopped: false,
            tracked: false,
            error: VHU_OK,
        }
    }
}

/// Bytes of the storage of a data plane for a ring of `queue_size`
/// entries (size it for the largest ring the back-end accepts).
#[no_mangle]
pub extern "C" fn vhu_dataplane_size(queue_size: u16) -> usize {
    table_offset() + usize::from(queue_size) * size_of::<Slot>()
}

/// Alignment of a data plane's storage.
#[no_mangle]
pub extern "C" fn vhu_dataplane_align() -> usize {
    state::align::<Ring>()
}

/// Writes a fresh data plane for `dp` with an empty token table.
///
/// # Safety
///
/// `p` points at `size` writable bytes.
pub(crate) unsafe fn place(
    p: *mut vhu_dataplane,
    size: usize,
    dp: DataPlane,
) -> Result<(), vhu_result> {
    let slots = dp.size();
    let ring = Ring {
        dp,
        chain: Chain::new(),
        slots,
        hint: 0,
    };
    // SAFETY: the caller's contract; `init` checks size and alignment.
    unsafe { state::init(p, size, vhu_dataplane_size(slots), ring) }?;
    let t = table_ptr(p);
    for i in 0..usize::from(slots) {
        // SAFETY: the storage holds `slots` entries after the fixed part
        // (checked by `init`), aligned for `Slot` (see `table_ptr`);
        // `write` does not read the uninitialised bytes.
        unsafe { t.add(i).write(None) };
    }
    Ok(())
}

/// The first entry of the token table of the storage at `p`: the table
/// lies `table_offset()` bytes in, aligned for `Slot` (the storage is
/// aligned for `Ring`, whose alignment is at least `Slot`'s, and the
/// offset is a multiple of `Slot`'s).
fn table_ptr(p: *mut vhu_dataplane) -> *mut Slot {
    p.cast::<u8>().wrapping_add(table_offset()).cast::<Slot>()
}

/// The token table after the state at `p`, of `slots` entries.
///
/// # Safety
///
/// `p` holds a data plane with `slots` initialised table entries (`place`
/// wrote it);
/// the table is used by no one else for `'a`.
unsafe fn table<'a>(p: *mut vhu_dataplane, slots: u16) -> &'a mut [Slot] {
    // SAFETY: `table_ptr` is aligned and `place` checked that the storage
    // holds `slots` entries, and initialised them.
    unsafe { core::slice::from_raw_parts_mut(table_ptr(p), usize::from(slots)) }
}

/// The data plane at `p` and its token table.
///
/// # Safety
///
/// `p` is NULL or points at storage initialised by a `vhu_*_init` (or at
/// least a tag word), used by no one else for `'a`.
unsafe fn ring<'a>(
    p: *mut vhu_dataplane,
) -> Result<(state::Entered<'a, Ring>, &'a mut [Slot]), vhu_result> {
    // SAFETY: the caller's contract.
    let r = unsafe { state::get::<Ring, _>(p) }?;
    let slots = r.slots;
    // SAFETY: the tag says `place` wrote this data plane with `slots`
    // entries; the table does not overlap the fixed part.
    let t = unsafe { table(p, slots) };
    Ok((r, t))
}

/// Starts a ring without a session: the ring of `config` over `mem`,
/// with its region of the inflight area `area` (NULL: none) at
/// `config->inflight_offset`. `VHU_ERR_MEMORY` if a ring area is not in
/// `mem`; `VHU_ERR_UNSUPPORTED` for `VHU_VIRTIO_F_IN_ORDER` where this
/// library does not carry it (`vhu_backend_supported_features()`); a
/// split ring continues from the used index in guest memory. Storage as for `vhu_backend_start_ring()`.
/// A ring whose recorded requests cannot be trusted starts broken
/// (`vhu_dataplane_get_info()` says why), never half-started.
///
/// # Safety
///
/// `storage` points at `size` writable bytes; `config` at a readable
/// `vhu_ring_config` of its `struct_size`; `mem` and `area` are NULL or valid tables.
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_init(
    storage: *mut vhu_dataplane,
    size: usize,
    config: *const vhu_ring_config,
    mem: *const vhu_mem,
    area: *const vhu_mem,
) -> vhu_result {
    guard(|| {
        state::storage::<Ring, _>(storage, size, fixed_size())?;
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        let c = unsafe { versioned::read(config, &mut fp) }?;
        // The bytes `place` writes (a ring size `Queue::new` refuses
        // writes none).
        fp.writes(storage.cast::<u8>(), vhu_dataplane_size(c.size))?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        // SAFETY: the caller's contract.
        let area = unsafe { Mem::optional(area, &mut fp) }?;
        let (mem, area) = (mem.bind(&fp), area.map(|a| a.bind(&fp)));
        let features = VirtioFeatures::from_bits_retain(c.features);
        // An in-order ring whose completions this build would publish as
        // they come.
        if !cfg!(feature = "in-order") && features.contains(VirtioFeatures::IN_ORDER) {
            return Err(VHU_ERR_UNSUPPORTED);
        }
        let mut q = Queue::new(c.size, c.addrs.into(), features).map_err(result::vring)?;
        q.set_base(c.base).map_err(result::vring)?;
        q.check_areas(&mem).map_err(result::vring)?;
        if let Queue::Split(s) = &mut q {
            // A split ring's used index lives in guest memory: a restarted
            // ring continues from it, as the session's rings do.
            s.sync_used(&mem).map_err(result::vring)?;
        }
        let dp = DataPlane::start(
            q,
            c.enabled != 0,
            c.consume_disabled != 0,
            &mem,
            area.as_ref().map(|a| (a, c.inflight_offset)),
        );
        // SAFETY: the caller's contract on `storage`.
        unsafe { place(storage, size, dp) }
    })
}

/// Hands out the next request: a recorded one first (after a restart),
/// else the next available chain. Its buffers are written into `segs`
/// (room for `VHU_MAX_CHAIN` entries: `segs_cap` must be at least that)
/// and their number into `*nsegs`; `token` identifies the request. When
/// there is nothing to do now (the ring is empty, paused, stopping or
/// stopped), `token->handle` is `VHU_NO_TOKEN` and `*nsegs` 0. `*token`
/// is written at the `struct_size` it holds (`VHU_TOKEN_INIT`;
/// `VHU_ERR_ABI`, and nothing written, for a size this library does not
/// know).
///
/// `VHU_ERR_RING`/`VHU_ERR_MEMORY`: the guest broke a ring rule; the ring is
/// broken and pop returns the error from then on. `VHU_ERR_BUSY`: every
/// token is outstanding (complete some first).
///
/// # Safety
///
/// `dp` points at an initialised data plane; `mem` and `area` are NULL or
/// valid tables; `token` points at a writable `vhu_token` of its
/// `struct_size`; `segs` at
/// `segs_cap` writable `vhu_segment`s; `nsegs` at a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_pop(
    dp: *mut vhu_dataplane,
    mem: *const vhu_mem,
    area: *const vhu_mem,
    token: *mut vhu_token,
    segs: *mut vhu_segment,
    segs_cap: usize,
    nsegs: *mut usize,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Ring, _>(dp) }?;
        // SAFETY: the caller's contract.
        let token = unsafe { versioned::out(token, &mut fp) }?;
        fp.writes(nsegs, 1)?;
        fp.writes(segs, segs_cap)?;
        token.put(vhu_token::default());
        // SAFETY: the caller's contract.
        unsafe { state::put(nsegs, 0) }?;
        // SAFETY: the caller's contract.
        let (mut entered, table) = unsafe { ring(dp) }?;
        let r = &mut *entered;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        // SAFETY: the caller's contract.
        let area = unsafe { Mem::optional(area, &mut fp) }?;
        let (mem, area) = (mem.bind(&fp), area.map(|a| a.bind(&fp)));
        if segs.is_null() {
            return Err(VHU_ERR_NULL);
        }
        if (segs as usize) % align_of::<vhu_segment>() != 0 {
            return Err(VHU_ERR_ALIGN);
        }
        if segs_cap < CHAIN {
            return Err(VHU_ERR_SHORT_BUFFER);
        }
        // A free table entry before anything is taken from the ring.
        let n = table.len();
        let start = usize::from(r.hint);
        let free = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| table.get(i).is_some_and(Option::is_none));
        let Some(free) = free else {
            // Nothing can be outstanding in an empty table; a full one
            // waits for completions.
            return if n == 0 { Ok(()) } else { Err(VHU_ERR_BUSY) };
        };
        let Some(t) =
            r.dp.pop(&mem, area.as_ref(), &mut r.chain)
                .map_err(result::dataplane)?
        else {
            return Ok(());
        };
        if let Some(s) = table.get_mut(free) {
            *s = Some(t);
        }
        r.hint = ((free + 1) % n) as u16;
        let segments = r.chain.segments();
        for (i, s) in segments.iter().enumerate() {
            let v = vhu_segment {
                addr: s.addr,
                len: s.len,
                writable: s.writable,
            };
            // SAFETY: `segs` is non-null, aligned, has room for CHAIN
            // entries (the caller's contract, checked against
            // `segs_cap`), and a chain holds at most CHAIN segments; it is
            // apart from the data plane and guest memory (claimed).
            unsafe { segs.add(i).write(v) };
        }
        token.put(vhu_token {
            handle: free as u32,
            id: t.id(),
            side_effects: t.side_effects(),
            ..vhu_token::default()
        });
        // SAFETY: checked above.
        unsafe { state::put(nsegs, segments.len()) }
    })
}

/// Completes the request of token `handle` with `len` bytes written into
/// its chain, in any order relative to the others. The used entry reaches
/// the guest at the next publish (this call publishes itself when a
/// batch of tracked completions is full: then `*out` says whether to
/// notify; else it is `VHU_PUBLISHED_NOTHING`).
/// `VHU_ERR_NOT_OUTSTANDING` for a handle that is not outstanding.
///
/// # Safety
///
/// `dp` points at an initialised data plane; `mem` and `area` are NULL or
/// valid tables; `out` is NULL or points at a writable `vhu_published`.
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_complete(
    dp: *mut vhu_dataplane,
    mem: *const vhu_mem,
    area: *const vhu_mem,
    handle: u32,
    len: u32,
    out: *mut vhu_published,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Ring, _>(dp) }?;
        fp.writes(out, 1)?;
        if !out.is_null() {
            // SAFETY: the caller's contract.
            unsafe { state::put(out, vhu_published::VHU_PUBLISHED_NOTHING) }?;
        }
        // SAFETY: the caller's contract.
        let (mut r, table) = unsafe { ring(dp) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        // SAFETY: the caller's contract.
        let area = unsafe { Mem::optional(area, &mut fp) }?;
        let (mem, area) = (mem.bind(&fp), area.map(|a| a.bind(&fp)));
        let slot = usize::try_from(handle)
            .ok()
            .and_then(|i| table.get_mut(i))
            .ok_or(VHU_ERR_NOT_OUTSTANDING)?;
        let t = slot.take().ok_or(VHU_ERR_NOT_OUTSTANDING)?;
        match r.dp.complete(&mem, area.as_ref(), t, len) {
            Ok(p) => {
                if !out.is_null() {
                    // SAFETY: checked above.
                    unsafe { state::put(out, published(p)) }?;
                }
                Ok(())
            }
            Err(e) => {
                // Still outstanding (a missing area can be passed next
                // time); a stopped ring's tokens are dropped by the stop.
                *slot = Some(t);
                Err(result::dataplane(e))
            }
        }
    })
}

/// Publishes the completions since the last publish (one used-index
/// store, the inflight batch committed around it); `*out` says whether to
/// notify the guest.
///
/// # Safety
///
/// `dp` points at an initialised data plane; `mem` and `area` are NULL or
/// valid tables; `out` points at a writable `vhu_published`.
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_publish(
    dp: *mut vhu_dataplane,
    mem: *const vhu_mem,
    area: *const vhu_mem,
    out: *mut vhu_published,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Ring, _>(dp) }?;
        fp.writes(out, 1)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(out, vhu_published::VHU_PUBLISHED_NOTHING) }?;
        // SAFETY: the caller's contract.
        let (mut r, _) = unsafe { ring(dp) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        // SAFETY: the caller's contract.
        let area = unsafe { Mem::optional(area, &mut fp) }?;
        let (mem, area) = (mem.bind(&fp), area.map(|a| a.bind(&fp)));
        let p =
            r.dp.publish(&mem, area.as_ref())
                .map_err(result::dataplane)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(out, published(p)) }
    })
}

/// Asks the driver for kicks again before sleeping; `*work` true if work
/// arrived meanwhile (serve it instead of sleeping).
///
/// # Safety
///
/// `dp` points at an initialised data plane; `mem` is NULL or a valid
/// table; `work` points at a writable `bool`.
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_enable_notification(
    dp: *mut vhu_dataplane,
    mem: *const vhu_mem,
    work: *mut bool,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Ring, _>(dp) }?;
        fp.writes(work, 1)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(work, false) }?;
        // SAFETY: the caller's contract.
        let (mut r, _) = unsafe { ring(dp) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        let mem = mem.bind(&fp);
        let w = r.dp.enable_notification(&mem).map_err(result::dataplane)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(work, w) }
    })
}

/// Asks the driver not to kick (the device is polling the ring).
///
/// # Safety
///
/// `dp` points at an initialised data plane; `mem` is NULL or a valid
/// table.
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_disable_notification(
    dp: *mut vhu_dataplane,
    mem: *const vhu_mem,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Ring, _>(dp) }?;
        // SAFETY: the caller's contract.
        let (mut r, _) = unsafe { ring(dp) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        let mem = mem.bind(&fp);
        r.dp.disable_notification(&mem).map_err(result::dataplane)
    })
}

/// Stops the ring (GET_VRING_BASE). Publishes what was completed (`*out`
/// says whether to notify), then: with `suspend` and an inflight area,
/// stops at once (what is outstanding stays recorded for the next start;
/// its tokens are void); otherwise drains: `*stopped` is false while
/// requests are outstanding or recorded ones wait (pop hands out only
/// those; complete everything and call stop again). Once `*stopped` is
/// true, `*base` is the GET_VRING_BASE value. An error of the publish is
/// returned with `*stopped` and `*base` set all the same.
///
/// # Safety
///
/// `dp` points at an initialised data plane; `mem` and `area` are NULL or
/// valid tables; `stopped`, `base` and `out` point at writable values
/// (`out` may be NULL).
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_stop(
    dp: *mut vhu_dataplane,
    mem: *const vhu_mem,
    area: *const vhu_mem,
    suspend: bool,
    stopped: *mut bool,
    base: *mut u32,
    out: *mut vhu_published,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Ring, _>(dp) }?;
        fp.writes(stopped, 1)?;
        fp.writes(base, 1)?;
        fp.writes(out, 1)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(stopped, false) }?;
        // SAFETY: the caller's contract.
        unsafe { state::put(base, 0) }?;
        if !out.is_null() {
            // SAFETY: the caller's contract.
            unsafe { state::put(out, vhu_published::VHU_PUBLISHED_NOTHING) }?;
        }
        // SAFETY: the caller's contract.
        let (mut r, table) = unsafe { ring(dp) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        // SAFETY: the caller's contract.
        let area = unsafe { Mem::optional(area, &mut fp) }?;
        let (mem, area) = (mem.bind(&fp), area.map(|a| a.bind(&fp)));
        let (stop, p) = r.dp.stop(&mem, area.as_ref(), suspend);
        if let Stop::Stopped { base: b } = stop {
            for s in table.iter_mut() {
                *s = None;
            }
            // SAFETY: checked above.
            unsafe { state::put(stopped, true) }?;
            // SAFETY: checked above.
            unsafe { state::put(base, b) }?;
        }
        let p = p.map_err(result::dataplane)?;
        if !out.is_null() {
            // SAFETY: checked above.
            unsafe { state::put(out, published(p)) }?;
        }
        Ok(())
    })
}

/// SET_VRING_ENABLE on the running ring.
///
/// # Safety
///
/// `dp` points at an initialised data plane.
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_set_enabled(
    dp: *mut vhu_dataplane,
    enabled: bool,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Ring, _>(dp) }?;
        // SAFETY: the caller's contract.
        let (mut r, _) = unsafe { ring(dp) }?;
        r.dp.set_enabled(enabled);
        Ok(())
    })
}

/// The ring moved (the memory table changed while it runs): its new
/// addresses, from `vhu_backend_ring_addrs()`. A ring that no longer fits
/// is broken.
///
/// # Safety
///
/// `dp` points at an initialised data plane; `addrs` at a readable
/// `vhu_ring_addrs`.
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_set_addrs(
    dp: *mut vhu_dataplane,
    addrs: *const vhu_ring_addrs,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Ring, _>(dp) }?;
        fp.reads(addrs, 1)?;
        // SAFETY: the caller's contract.
        let (mut r, _) = unsafe { ring(dp) }?;
        if addrs.is_null() {
            return Err(VHU_ERR_NULL);
        }
        if (addrs as usize) % align_of::<vhu_ring_addrs>() != 0 {
            return Err(VHU_ERR_ALIGN);
        }
        // SAFETY: non-null, aligned, readable by the caller's contract.
        let a = unsafe { addrs.read() };
        r.dp.set_addrs(a.into()).map_err(result::dataplane)
    })
}

/// Marks in the dirty log `log` (`size` bytes of bitmap) the ring areas
/// the device writes, for a ring whose used ring is logged at guest
/// address `log_addr` (`VHU_ACTION_SET_RING_LOG`): a split ring's used
/// ring (`6 + 8 * size` bytes at `log_addr`, where the front-end said its
/// used ring is), a packed ring's descriptor ring and its device event
/// area (at `log_addr`). Call it after the publishes (and stops) of a
/// round, while the dirty log is mapped and the ring logs its used ring;
/// adds the pages marked to `*pages` unless `pages` is NULL. Errors as
/// `vhu_log_mark()`.
///
/// # Safety
///
/// `dp` points at an initialised data plane; `log` at a valid table
/// mapping the bitmap; `pages` is NULL or points at a readable and
/// writable `u64`.
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_log_used(
    dp: *mut vhu_dataplane,
    log: *const vhu_mem,
    size: u64,
    log_addr: u64,
    pages: *mut u64,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Ring, _>(dp) }?;
        // SAFETY: the caller's contract.
        let (r, _) = unsafe { ring(dp) }?;
        // SAFETY: the caller's contract.
        unsafe { crate::log::mark_log(&mut fp, log, size, pages, |d| r.dp.log_used(d, log_addr)) }
    })
}

/// What the data plane knows about itself, into `*out` at the
/// `struct_size` it holds (`VHU_DATAPLANE_INFO_INIT`; `VHU_ERR_ABI`, and
/// nothing written, for a size this library does not know).
///
/// # Safety
///
/// `dp` points at an initialised data plane; `out` at a writable
/// `vhu_dataplane_info` of its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn vhu_dataplane_get_info(
    dp: *mut vhu_dataplane,
    out: *mut vhu_dataplane_info,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Ring, _>(dp) }?;
        // SAFETY: the caller's contract.
        let out = unsafe { versioned::out(out, &mut fp) }?;
        // SAFETY: the caller's contract.
        let (r, _) = unsafe { ring(dp) }?;
        let d = &r.dp;
        out.put(vhu_dataplane_info {
            size: d.size(),
            base: d.base(),
            outstanding: d.outstanding(),
            resubmits_left: d.resubmits_left(),
            enabled: d.enabled(),
            paused: d.paused(),
            stopped: d.is_stopped(),
            tracked: d.tracked(),
            error: d.error().map_or(VHU_OK, result::dataplane),
            ..vhu_dataplane_info::default()
        });
        Ok(())
    })
}

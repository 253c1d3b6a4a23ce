//! The virtio-blk device model: config space and feature bits from a
//! description ([`vhu_blk_config`]), the device's control path as a
//! [`vhu_device`] for the session, and the request planner: a popped
//! chain in, what to do (read, write, flush, get id, or fail with a
//! status) out, with checked copies between the request's data buffers
//! and the caller's.

use core::ffi::c_void;
use core::mem::size_of;
use core::ptr;

#[cfg(feature = "migration")]
use vhost_user_core::device::blk::state::{self as blk_state, AreaShape};
use vhost_user_core::device::blk::{
    BlkConfig, BlkDevice, BlkOp, BlkRequest, BlkStatus, BLK_ID_BYTES,
};
use vhost_user_core::device::Segment;
use vhost_user_core::feature::VirtioFeatures;
use vhost_user_core::memory::{GuestMemory, MemoryError};
use vhost_user_core::message::ConfigWriteKind;

use crate::backend::vhu_device;
use crate::dataplane::{vhu_segment, VHU_MAX_CHAIN};
use crate::memory::{vhu_mem, Mem};
use crate::result::guard;
use crate::result::vhu_result::{self, *};
use crate::state::{self, Footprint, Kind};
use crate::versioned::{self, Readable, Versioned};

/// A virtio-blk device model (opaque; `vhu_blk_size()` bytes aligned to
/// `vhu_blk_align()`).
#[derive(Debug)]
pub struct vhu_blk {
    _opaque: [u8; 0],
}

/// A planned request (opaque; `vhu_blk_request_size()` bytes aligned to
/// `vhu_blk_request_align()`); one per request in progress.
#[derive(Debug)]
pub struct vhu_blk_request {
    _opaque: [u8; 0],
}

impl Kind for BlkDevice {
    const TAG: u32 = 0x7668_754b;
}

type Plan = BlkRequest<{ VHU_MAX_CHAIN as usize }, 16>;

impl Kind for Plan {
    const TAG: u32 = 0x7668_7552;
}

/// What a virtio-blk back-end serves (`VHU_BLK_CONFIG_INIT`, or
/// `.struct_size = sizeof(vhu_blk_config)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_blk_config {
    /// `sizeof(vhu_blk_config)` (`VHU_ERR_ABI` for a size this library
    /// does not know).
    pub struct_size: usize,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size (a power of two, 512 to 65536).
    pub blk_size: u32,
    /// Request queues (at least 1).
    pub num_queues: u16,
    /// Most data segments of a request (SEG_MAX when non-zero): at most
    /// `VHU_MAX_CHAIN - 2` and the ring size - 2.
    pub seg_max: u32,
    /// Most bytes of one segment (SIZE_MAX when non-zero).
    pub size_max: u32,
    /// Non-zero: offer RO (writes fail).
    pub read_only: u8,
    /// Non-zero: offer FLUSH.
    pub flush: u8,
    /// Non-zero: offer CONFIG_WCE (needs `flush`).
    pub config_wce: u8,
    /// Non-zero: start in writeback mode (else writethrough).
    pub writeback: u8,
    /// The GET_ID string (NUL padded).
    pub serial: [u8; 20],
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct; every field is an integer or an array of bytes.
unsafe impl Versioned for vhu_blk_config {
    const SIZES: &'static [usize] = &[size_of::<vhu_blk_config>()];
}

// SAFETY: every field is an integer, a raw pointer or an optional
// function pointer.
unsafe impl Readable for vhu_blk_config {
    const EMPTY: Self = vhu_blk_config {
        struct_size: 0,
        capacity: 0,
        blk_size: 0,
        num_queues: 0,
        seg_max: 0,
        size_max: 0,
        read_only: 0,
        flush: 0,
        config_wce: 0,
        writeback: 0,
        serial: [0; 20],
    };
}

impl Default for vhu_blk_config {
    /// Zero, at this version's size (`VHU_BLK_CONFIG_INIT`).
    fn default() -> Self {
        vhu_blk_config {
            struct_size: size_of::<vhu_blk_config>(),
            ..vhu_blk_config::EMPTY
        }
    }
}

/// What a planned request asks.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum vhu_blk_op_kind {
    /// Read `len` bytes at disk byte `offset` into the request's data.
    VHU_BLK_READ = 0,
    /// Write the request's `len` data bytes at disk byte `offset`.
    VHU_BLK_WRITE = 1,
    /// Make every completed write stable.
    VHU_BLK_FLUSH = 2,
    /// Write the first `len` bytes of the id string into the data
    /// (`vhu_blk_get_id()` does it).
    VHU_BLK_GET_ID = 3,
    /// Discard (not offered by this ABI's configuration; complete with
    /// `VHU_BLK_S_UNSUPP`).
    VHU_BLK_DISCARD = 4,
    /// Write zeroes (not offered; complete with `VHU_BLK_S_UNSUPP`).
    VHU_BLK_WRITE_ZEROES = 5,
    /// Malformed or unsupported: do nothing but complete with `status`.
    VHU_BLK_FAIL = 6,
}

/// A planned request, written by `vhu_blk_request_op()`: start from
/// `VHU_BLK_OP_INIT`, or `.struct_size = sizeof(vhu_blk_op)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_blk_op {
    /// `sizeof(vhu_blk_op)`, set by the caller and kept by the library,
    /// which writes the fields it covers (`VHU_ERR_ABI`, and nothing
    /// written, for a size this library does not know).
    pub struct_size: usize,
    /// What to do.
    pub kind: vhu_blk_op_kind,
    /// READ, WRITE: disk byte offset (checked against the capacity).
    pub offset: u64,
    /// READ, WRITE, GET_ID: bytes.
    pub len: u64,
    /// FAIL: the status to complete with.
    pub status: u32,
    /// The request changes the disk and the device is in writethrough
    /// mode: make the change stable before completing it.
    pub sync_after: bool,
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct.
unsafe impl Versioned for vhu_blk_op {
    const SIZES: &'static [usize] = &[size_of::<vhu_blk_op>()];
}

impl Default for vhu_blk_op {
    /// Zero (kind 0, status 0), at this version's size
    /// (`VHU_BLK_OP_INIT`).
    fn default() -> Self {
        vhu_blk_op {
            struct_size: size_of::<vhu_blk_op>(),
            kind: vhu_blk_op_kind::VHU_BLK_READ,
            offset: 0,
            len: 0,
            status: 0,
            sync_after: false,
        }
    }
}

/// VIRTIO_BLK_S_OK.
pub const VHU_BLK_S_OK: u32 = 0;
/// VIRTIO_BLK_S_IOERR.
pub const VHU_BLK_S_IOERR: u32 = 1;
/// VIRTIO_BLK_S_UNSUPP.
pub const VHU_BLK_S_UNSUPP: u32 = 2;

fn status(v: u32) -> Result<BlkStatus, vhu_result> {
    match v {
        VHU_BLK_S_OK => Ok(BlkStatus::Ok),
        VHU_BLK_S_IOERR => Ok(BlkStatus::IoErr),
        VHU_BLK_S_UNSUPP => Ok(BlkStatus::Unsupp),
        _ => Err(VHU_ERR_INVALID),
    }
}

/// Bytes of a blk device's storage.
#[no_mangle]
pub extern "C" fn vhu_blk_size() -> usize {
    state::size::<BlkDevice>()
}

/// Alignment of a blk device's storage.
#[no_mangle]
pub extern "C" fn vhu_blk_align() -> usize {
    state::align::<BlkDevice>()
}

/// Bytes of a request plan's storage.
#[no_mangle]
pub extern "C" fn vhu_blk_request_size() -> usize {
    state::size::<Plan>()
}

/// Alignment of a request plan's storage.
#[no_mangle]
pub extern "C" fn vhu_blk_request_align() -> usize {
    state::align::<Plan>()
}

/// Initialises a blk device in `storage` (`size` bytes) from `config`.
/// `VHU_ERR_CONFIG` for a configuration that does not hold together.
///
/// # Safety
///
/// `storage` points at `size` writable bytes; `config` at a readable
/// `vhu_blk_config` of its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_init(
    storage: *mut vhu_blk,
    size: usize,
    config: *const vhu_blk_config,
) -> vhu_result {
    guard(|| {
        state::storage::<BlkDevice, _>(storage, size, vhu_blk_size())?;
        let mut fp = Footprint::new();
        fp.writes(storage.cast::<u8>(), vhu_blk_size())?;
        // SAFETY: the caller's contract.
        let c = unsafe { versioned::read(config, &mut fp) }?;
        let mut b = BlkConfig::new(c.capacity);
        b.blk_size = c.blk_size;
        b.num_queues = c.num_queues;
        b.seg_max = c.seg_max;
        b.size_max = c.size_max;
        b.read_only = c.read_only != 0;
        b.flush = c.flush != 0;
        b.config_wce = c.config_wce != 0;
        b.writeback = c.writeback != 0;
        b.set_serial(&c.serial);
        let dev = BlkDevice::new(&b).map_err(|_| VHU_ERR_CONFIG)?;
        // SAFETY: checked storage; the caller's contract makes it writable.
        unsafe { state::init(storage, size, vhu_blk_size(), dev) }
    })
}

/// Initialises an empty request plan in `storage` (`size` bytes).
///
/// # Safety
///
/// `storage` points at `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_request_init(
    storage: *mut vhu_blk_request,
    size: usize,
) -> vhu_result {
    guard(|| {
        state::storage::<Plan, _>(storage, size, vhu_blk_request_size())?;
        let mut fp = Footprint::new();
        fp.writes(storage.cast::<u8>(), vhu_blk_request_size())?;
        // SAFETY: the caller's contract; `init` checks size and alignment.
        unsafe { state::init(storage, size, vhu_blk_request_size(), Plan::new()) }
    })
}

/// The virtio feature bits the device offers (add the ring and transport
/// bits to offer them in a `vhu_backend_config`).
///
/// # Safety
///
/// `blk` points at an initialised blk device; `out` at a writable
/// `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_offered_features(blk: *mut vhu_blk, out: *mut u64) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<BlkDevice, _>(blk) }?;
        fp.writes(out, 1)?;
        // SAFETY: the caller's contract.
        let d = unsafe { state::get::<BlkDevice, _>(blk) }?;
        // SAFETY: the caller's contract; apart from the device (claimed).
        unsafe { state::put(out, d.offered_features().bits()) }
    })
}

/// The disk is now `sectors` 512-byte sectors long (its image was
/// resized): the config space, and the one a reset returns to, say so,
/// and requests are checked against it from now on. `*changed` says
/// whether the capacity changed: then tell the front-end with a
/// CONFIG_CHANGE_MSG (`vhu_channel_config_change()`), and it reads the
/// config space again. `VHU_ERR_CONFIG` for a capacity whose bytes do not
/// fit 64 bits (nothing changes).
///
/// # Safety
///
/// `blk` points at an initialised blk device; `changed` at a writable
/// `bool`.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_set_capacity(
    blk: *mut vhu_blk,
    sectors: u64,
    changed: *mut bool,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<BlkDevice, _>(blk) }?;
        fp.writes(changed, 1)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(changed, false) }?;
        // SAFETY: the caller's contract.
        let mut d = unsafe { state::get::<BlkDevice, _>(blk) }?;
        let c = d.set_capacity(sectors).map_err(|_| VHU_ERR_CONFIG)?;
        // SAFETY: the caller's contract; apart from the device (claimed).
        unsafe { state::put(changed, c) }
    })
}

// The control-path callbacks `vhu_blk_device` hands out: C may call them
// directly, not only through `vhu_backend_handle`, so each runs its body
// under `guard` as the exported calls do (a panic never unwinds into C).

unsafe extern "C" fn dev_read_config(
    ctx: *mut c_void,
    offset: u32,
    dst: *mut u8,
    len: usize,
) -> bool {
    let r = guard(|| {
        #[cfg(all(test, feature = "std"))]
        tests::panic_point();
        let mut fp = Footprint::new();
        // SAFETY: `ctx` is the `vhu_blk` of `vhu_blk_device`, initialised
        // and used by this call only (the caller's contract).
        unsafe { fp.state::<BlkDevice, _>(ctx) }?;
        fp.writes(dst, len)?;
        // SAFETY: as above; `dst` holds `len` writable bytes (the session
        // passes a live buffer), apart from the device (claimed).
        let d = unsafe { state::get::<BlkDevice, _>(ctx) }?;
        // SAFETY: as above.
        let dst = unsafe { state::bytes_mut(dst, len) }?;
        d.read_config(offset, dst).map_err(|_| VHU_ERR_CONFIG)
    });
    r == VHU_OK
}

unsafe extern "C" fn dev_write_config(
    ctx: *mut c_void,
    offset: u32,
    src: *const u8,
    len: usize,
    migration: bool,
) -> bool {
    let r = guard(|| {
        #[cfg(all(test, feature = "std"))]
        tests::panic_point();
        let mut fp = Footprint::new();
        // SAFETY: as in `dev_read_config`.
        unsafe { fp.state::<BlkDevice, _>(ctx) }?;
        fp.reads(src, len)?;
        // SAFETY: as in `dev_read_config`.
        let mut d = unsafe { state::get::<BlkDevice, _>(ctx) }?;
        // SAFETY: as in `dev_read_config`; `src` holds `len` readable bytes.
        let src = unsafe { state::slice(src, len) }?;
        let kind = if migration {
            ConfigWriteKind::Migration
        } else {
            ConfigWriteKind::Frontend
        };
        d.write_config(offset, src, kind)
            .map_err(|_| VHU_ERR_CONFIG)
    });
    r == VHU_OK
}

unsafe extern "C" fn dev_features_acked(ctx: *mut c_void, features: u64) {
    // Nothing to tell C: a device that is not there acks nothing.
    let _ = guard(|| {
        #[cfg(all(test, feature = "std"))]
        tests::panic_point();
        let mut fp = Footprint::new();
        // SAFETY: as in `dev_read_config`.
        unsafe { fp.state::<BlkDevice, _>(ctx) }?;
        // SAFETY: as in `dev_read_config`.
        let mut d = unsafe { state::get::<BlkDevice, _>(ctx) }?;
        d.set_features(VirtioFeatures::from_bits_retain(features));
        Ok(())
    });
}

unsafe extern "C" fn dev_reset(ctx: *mut c_void) {
    // As in `dev_features_acked`.
    let _ = guard(|| {
        #[cfg(all(test, feature = "std"))]
        tests::panic_point();
        let mut fp = Footprint::new();
        // SAFETY: as in `dev_read_config`.
        unsafe { fp.state::<BlkDevice, _>(ctx) }?;
        // SAFETY: as in `dev_read_config`.
        let mut d = unsafe { state::get::<BlkDevice, _>(ctx) }?;
        d.reset();
        Ok(())
    });
}

/// Claims in `fp`, for the callbacks of `d` that a call makes, the blk
/// device they enter when any of them is this module's (its `ctx`): a
/// message handled with `vhu_blk_device()`'s control path uses the blk
/// device's storage as much as the session's, so it shares no byte with
/// the session, the message, the reply or anything else of the call. The
/// calls those callbacks make (the callbacks themselves) may enter it.
///
/// # Safety
///
/// `d`'s callbacks may be called with its `ctx` (a callback of this
/// module's: `ctx` is NULL, misaligned or a blk device, as `vhu_blk_device`
/// wrote it).
pub(crate) unsafe fn claim_for_callbacks(
    d: &vhu_device,
    fp: &mut Footprint<'_>,
) -> Result<(), vhu_result> {
    type ReadConfig = unsafe extern "C" fn(*mut c_void, u32, *mut u8, usize) -> bool;
    type WriteConfig = unsafe extern "C" fn(*mut c_void, u32, *const u8, usize, bool) -> bool;
    type Acked = unsafe extern "C" fn(*mut c_void, u64);
    type Reset = unsafe extern "C" fn(*mut c_void);
    // Compared by address: a callback of this module's that is not
    // recognised (another copy of it) leaves the blk device to the check
    // its callbacks make as calls made from a callback.
    let ours = d
        .read_config
        .is_some_and(|f| ptr::fn_addr_eq(f, dev_read_config as ReadConfig))
        || d.write_config
            .is_some_and(|f| ptr::fn_addr_eq(f, dev_write_config as WriteConfig))
        || d.features_acked
            .is_some_and(|f| ptr::fn_addr_eq(f, dev_features_acked as Acked))
        || d.reset
            .is_some_and(|f| ptr::fn_addr_eq(f, dev_reset as Reset));
    if !ours {
        return Ok(());
    }
    // SAFETY: the caller's contract.
    unsafe { fp.lent_state::<BlkDevice, _>(d.ctx) }
}

/// The blk device's control path as a `vhu_device` for
/// `vhu_backend_handle()` (config space reads and writes, features,
/// reset), written into `*out` at the `struct_size` it holds
/// (`VHU_DEVICE_INIT`; `VHU_ERR_ABI` for a size this library does not
/// know). The device must stay where it is while `*out` is used, and
/// shares no byte with anything else of a `vhu_backend_handle()` given
/// `*out` (`VHU_ERR_INVALID`).
///
/// # Safety
///
/// `blk` points at an initialised blk device; `out` at a writable
/// `vhu_device` of its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_device(blk: *mut vhu_blk, out: *mut vhu_device) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<BlkDevice, _>(blk) }?;
        // SAFETY: the caller's contract.
        unsafe { state::get::<BlkDevice, _>(blk) }?;
        let d = vhu_device {
            struct_size: 0,
            ctx: blk.cast(),
            read_config: Some(dev_read_config),
            write_config: Some(dev_write_config),
            features_acked: Some(dev_features_acked),
            reset: Some(dev_reset),
            set_mtu: None,
            send_rarp: None,
        };
        // SAFETY: the caller's contract.
        unsafe { versioned::out(out, &mut fp) }?.put(d);
        Ok(())
    })
}

/// Plans the request of a popped chain (`nsegs` buffers at `segs`, as
/// `vhu_dataplane_pop()` gave them) into `req`, reading its header from
/// guest memory. Never fails for a malformed request: that plans
/// `VHU_BLK_FAIL` with the status the guest gets.
///
/// # Safety
///
/// `blk` points at an initialised blk device; `segs` at `nsegs` readable
/// `vhu_segment`s; `mem` is NULL or a valid table; `req` points at an
/// initialised request plan.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_plan(
    blk: *mut vhu_blk,
    segs: *const vhu_segment,
    nsegs: usize,
    mem: *const vhu_mem,
    req: *mut vhu_blk_request,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<BlkDevice, _>(blk) }?;
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Plan, _>(req) }?;
        fp.reads(segs, nsegs)?;
        // SAFETY: the caller's contract.
        let d = unsafe { state::get::<BlkDevice, _>(blk) }?;
        // SAFETY: the caller's contract.
        let segs = unsafe { state::slice(segs, nsegs) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        let mem = mem.bind(&fp);
        // SAFETY: the caller's contract.
        let mut plan = unsafe { state::get::<Plan, _>(req) }?;
        let read = |gpa: u64, dst: &mut [u8]| -> Result<(), MemoryError> { mem.read(gpa, dst) };
        d.plan_into(segs, &read, &mut plan);
        Ok(())
    })
}

impl From<vhu_segment> for Segment {
    fn from(s: vhu_segment) -> Self {
        Segment {
            addr: s.addr,
            len: s.len,
            writable: s.writable,
        }
    }
}

/// What the planned request asks, into `*out` at the `struct_size` it
/// holds (`VHU_BLK_OP_INIT`; `VHU_ERR_ABI`, and nothing written, for a
/// size this library does not know).
///
/// # Safety
///
/// `req` points at an initialised request plan; `out` at a writable
/// `vhu_blk_op` of its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_request_op(
    req: *mut vhu_blk_request,
    out: *mut vhu_blk_op,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Plan, _>(req) }?;
        // SAFETY: the caller's contract.
        let out = unsafe { versioned::out(out, &mut fp) }?;
        // SAFETY: the caller's contract.
        let plan = unsafe { state::get::<Plan, _>(req) }?;
        let mut op = vhu_blk_op {
            kind: vhu_blk_op_kind::VHU_BLK_FAIL,
            status: VHU_BLK_S_IOERR,
            sync_after: plan.sync_after(),
            ..vhu_blk_op::default()
        };
        match plan.op() {
            BlkOp::Read { offset, len } => {
                op.kind = vhu_blk_op_kind::VHU_BLK_READ;
                op.offset = offset;
                op.len = len;
            }
            BlkOp::Write { offset, len } => {
                op.kind = vhu_blk_op_kind::VHU_BLK_WRITE;
                op.offset = offset;
                op.len = len;
            }
            BlkOp::Flush => op.kind = vhu_blk_op_kind::VHU_BLK_FLUSH,
            BlkOp::GetId { len } => {
                op.kind = vhu_blk_op_kind::VHU_BLK_GET_ID;
                op.len = u64::from(len);
            }
            BlkOp::Discard => op.kind = vhu_blk_op_kind::VHU_BLK_DISCARD,
            BlkOp::WriteZeroes => op.kind = vhu_blk_op_kind::VHU_BLK_WRITE_ZEROES,
            BlkOp::Fail { status, .. } => op.status = status as u32,
        }
        if op.kind != vhu_blk_op_kind::VHU_BLK_FAIL {
            op.status = VHU_BLK_S_OK;
        }
        out.put(op);
        Ok(())
    })
}

/// Copies `len` data bytes of a WRITE, from byte `at` of its data, out of
/// guest memory into `dst`. `VHU_ERR_INVALID` past the data's end (nothing
/// is copied), or if any byte of `dst` lies in guest memory of the table
/// `mem` (the guest may change it at any time: give the data a buffer of
/// its own) or in the request plan; `VHU_ERR_MEMORY` if guest memory
/// refuses.
///
/// # Safety
///
/// `req` points at an initialised request plan; `mem` is NULL or a valid
/// table; `dst` at `len` writable bytes, outside guest memory (with
/// guest memory as callbacks the library cannot check it).
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_request_read_data(
    req: *mut vhu_blk_request,
    mem: *const vhu_mem,
    at: u64,
    dst: *mut u8,
    len: usize,
) -> vhu_result {
    guard(|| {
        // The copy out of guest memory is a non-overlapping one into a
        // `&mut` over `dst`, and the guest may write its memory at any
        // time: a `dst` inside guest memory (or the plan) could be
        // neither.
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Plan, _>(req) }?;
        fp.writes(dst, len)?;
        // SAFETY: the caller's contract.
        let plan = unsafe { state::get::<Plan, _>(req) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        let mem = mem.bind(&fp);
        // SAFETY: the caller's contract; outside the plan and the table
        // (claimed).
        let dst = unsafe { state::bytes_mut(dst, len) }?;
        within_data(&plan, at, dst.len())?;
        let read = |gpa: u64, d: &mut [u8]| -> Result<(), MemoryError> { mem.read(gpa, d) };
        plan.read_data(&read, at, dst).map_err(data_error)
    })
}

/// Copies `len` bytes from `src` into the data of a READ (or GET_ID) at
/// byte `at` of its data. Errors as `vhu_blk_request_read_data()` (`src`
/// in guest memory of the table included).
///
/// # Safety
///
/// `req` points at an initialised request plan; `mem` is NULL or a valid
/// table; `src` at `len` readable bytes, outside guest memory (with
/// guest memory as callbacks the library cannot check it).
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_request_write_data(
    req: *mut vhu_blk_request,
    mem: *const vhu_mem,
    at: u64,
    src: *const u8,
    len: usize,
) -> vhu_result {
    guard(|| {
        // As in `vhu_blk_request_read_data`, the other way.
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Plan, _>(req) }?;
        fp.reads(src, len)?;
        // SAFETY: the caller's contract.
        let plan = unsafe { state::get::<Plan, _>(req) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        let mem = mem.bind(&fp);
        // SAFETY: the caller's contract; outside the plan and the table
        // (claimed).
        let src = unsafe { state::slice(src, len) }?;
        within_data(&plan, at, src.len())?;
        let write = |gpa: u64, s: &[u8]| -> Result<(), MemoryError> { mem.write(gpa, s) };
        plan.write_data(&write, at, src).map_err(data_error)
    })
}

/// Refuses a copy past the end of the request's data before any byte
/// moves.
fn within_data(plan: &Plan, at: u64, len: usize) -> Result<(), vhu_result> {
    match at.checked_add(len as u64) {
        Some(end) if end <= plan.data_len() => Ok(()),
        _ => Err(VHU_ERR_INVALID),
    }
}

fn data_error<E>(e: vhost_user_core::device::blk::DataError<E>) -> vhu_result {
    match e {
        vhost_user_core::device::blk::DataError::Short => VHU_ERR_INVALID,
        _ => VHU_ERR_MEMORY,
    }
}

/// GET_ID: writes the device's id string (as much as the request asks)
/// into the request's data.
///
/// # Safety
///
/// `blk` points at an initialised blk device; `req` at an initialised
/// request plan; `mem` is NULL or a valid table.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_get_id(
    blk: *mut vhu_blk,
    req: *mut vhu_blk_request,
    mem: *const vhu_mem,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<BlkDevice, _>(blk) }?;
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Plan, _>(req) }?;
        // SAFETY: the caller's contract.
        let d = unsafe { state::get::<BlkDevice, _>(blk) }?;
        // SAFETY: the caller's contract.
        let plan = unsafe { state::get::<Plan, _>(req) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        let mem = mem.bind(&fp);
        let BlkOp::GetId { len } = plan.op() else {
            return Err(VHU_ERR_INVALID);
        };
        let id = d.serial();
        let id = id.get(..(len as usize).min(BLK_ID_BYTES)).unwrap_or(id);
        let write = |gpa: u64, s: &[u8]| -> Result<(), MemoryError> { mem.write(gpa, s) };
        plan.write_data(&write, 0, id).map_err(data_error)
    })
}

/// Writes the status byte (`VHU_BLK_S_*`; nothing when the chain has no
/// writable byte) and the length to complete the request with into
/// `*used_len` (data read plus the status byte; 0 without a status byte).
///
/// # Safety
///
/// `req` points at an initialised request plan; `mem` is NULL or a valid
/// table; `used_len` at a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_request_finish(
    req: *mut vhu_blk_request,
    mem: *const vhu_mem,
    status_value: u32,
    used_len: *mut u32,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Plan, _>(req) }?;
        fp.writes(used_len, 1)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(used_len, 0) }?;
        // SAFETY: the caller's contract.
        let plan = unsafe { state::get::<Plan, _>(req) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        let mem = mem.bind(&fp);
        let st = status(status_value)?;
        let write = |gpa: u64, s: &[u8]| -> Result<(), MemoryError> { mem.write(gpa, s) };
        // A status the guest cannot be told about completes with length
        // 0 (the used entry still returns the buffers).
        let n = match plan.write_status(&write, st) {
            Ok(()) => plan.used_len(st),
            Err(_) => 0,
        };
        // SAFETY: the caller's contract.
        unsafe { state::put(used_len, n) }
    })
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use core::cell::Cell;
    use std::process::Command;

    std::thread_local! {
        /// The next [`panic_point`] on this thread panics.
        static PANIC: Cell<bool> = const { Cell::new(false) };
    }

    /// Panics once after [`PANIC`] was set: a bug in a callback's body,
    /// on demand (the code is written not to panic).
    pub(super) fn panic_point() {
        if PANIC.with(|p| p.replace(false)) {
            panic!("a bug in a device callback");
        }
    }

    /// Runs this test binary's test `name` alone in a child process with
    /// `VHU_CHILD` set, and gives its exit status and output: a panic
    /// that reaches C aborts the process, which the child makes visible
    /// without taking the other tests down.
    fn in_child(name: &str) -> std::process::Output {
        let exe = std::env::current_exe().expect("the test binary");
        Command::new(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env("VHU_CHILD", "1")
            .output()
            .expect("the test binary runs")
    }

    /// Each device callback, called by C directly with a panic inside,
    /// returns (false for those that answer) instead of unwinding into C,
    /// which aborts the process.
    #[test]
    fn a_panic_in_a_device_callback_stays_out_of_c() {
        const NAME: &str = "blk::tests::a_panic_in_a_device_callback_stays_out_of_c";
        if std::env::var_os("VHU_CHILD").is_none() {
            let out = in_child(NAME);
            assert!(
                out.status.success(),
                "{}: {}",
                out.status,
                std::string::String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let mut storage = std::vec![0u64; vhu_blk_size() / 8 + 1];
        let blk: *mut vhu_blk = storage.as_mut_ptr().cast();
        let config = vhu_blk_config {
            struct_size: size_of::<vhu_blk_config>(),
            capacity: 2048,
            blk_size: 512,
            num_queues: 1,
            seg_max: 14,
            size_max: 0,
            read_only: 0,
            flush: 1,
            config_wce: 0,
            writeback: 1,
            serial: [0; 20],
        };
        let mut dev = vhu_device {
            struct_size: size_of::<vhu_device>(),
            ctx: core::ptr::null_mut(),
            read_config: None,
            write_config: None,
            features_acked: None,
            reset: None,
            set_mtu: None,
            send_rarp: None,
        };
        let hook = std::panic::take_hook();
        std::panic::set_hook(std::boxed::Box::new(|_| {}));
        // SAFETY: storage of the blk's size, aligned to 8 (at least
        // vhu_blk_align()), alive throughout; the callbacks get it as
        // `ctx` and live buffers of the lengths given.
        unsafe {
            assert_eq!(vhu_blk_init(blk, vhu_blk_size(), &config), VHU_OK);
            assert_eq!(vhu_blk_device(blk, &mut dev), VHU_OK);
            let (Some(read), Some(write), Some(acked), Some(reset)) = (
                dev.read_config,
                dev.write_config,
                dev.features_acked,
                dev.reset,
            ) else {
                panic!("a callback is missing");
            };
            let mut buf = [0u8; 8];
            assert!(read(dev.ctx, 0, buf.as_mut_ptr(), buf.len()));
            PANIC.with(|p| p.set(true));
            assert!(!read(dev.ctx, 0, buf.as_mut_ptr(), buf.len()));
            PANIC.with(|p| p.set(true));
            assert!(!write(dev.ctx, 0, buf.as_ptr(), 1, false));
            PANIC.with(|p| p.set(true));
            acked(dev.ctx, 0);
            PANIC.with(|p| p.set(true));
            reset(dev.ctx);
            // The device is still there for the calls after.
            assert!(read(dev.ctx, 0, buf.as_mut_ptr(), buf.len()));
        }
        std::panic::set_hook(hook);
    }
}

/// Bytes of a blk device state carrying `inflight_len` bytes of inflight
/// area (0: none) into `*out` (the state format of the core's
/// `device::blk::state`: capacity, cache mode, the area, a checksum).
/// `VHU_ERR_UNSUPPORTED` in a library built without its `migration`
/// feature.
///
/// # Safety
///
/// `out` points at a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_state_size(inflight_len: usize, out: *mut usize) -> vhu_result {
    guard(|| {
        #[cfg(feature = "migration")]
        {
            let n = blk_state::HEADER_LEN
                .checked_add(inflight_len)
                .and_then(|n| n.checked_add(blk_state::TRAILER_LEN))
                .ok_or(VHU_ERR_INVALID)?;
            // SAFETY: the caller's contract.
            unsafe { state::put(out, n) }
        }
        #[cfg(not(feature = "migration"))]
        {
            let _ = (inflight_len, out);
            Err(VHU_ERR_UNSUPPORTED)
        }
    })
}

/// Saves the device's state (`VHU_ACTION_TRANSFER_STATE` with `flag`
/// true) into `buf` (`cap` bytes, at least `vhu_blk_state_size()` of the
/// area's bytes), its length into `*len`: the capacity, the driver's cache
/// mode and, with an inflight area (`area`, a table of one region at
/// guest address 0, and its layout `num_queues` by `queue_size` from
/// `vhu_backend_inflight_layout()`), the area's bytes: the requests
/// suspended at the rings' stop, for the destination to resubmit. `area`
/// NULL and `num_queues` 0: no area. `VHU_ERR_SHORT_BUFFER` for a short
/// `buf`; `VHU_ERR_INVALID` for a layout the inflight format refuses;
/// `VHU_ERR_INFLIGHT` if `area` does not map that layout's bytes.
///
/// # Safety
///
/// `blk` points at an initialised blk device; `area` is NULL or a valid
/// table; `buf` points at `cap` writable bytes; `len` at a writable
/// `size_t`.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_save_state(
    blk: *mut vhu_blk,
    area: *const vhu_mem,
    num_queues: u16,
    queue_size: u16,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<BlkDevice, _>(blk) }?;
        fp.writes(buf, cap)?;
        fp.writes(len, 1)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(len, 0) }?;
        // SAFETY: the caller's contract.
        let d = unsafe { state::get::<BlkDevice, _>(blk) }?;
        // SAFETY: the caller's contract.
        let area = unsafe { Mem::optional(area, &mut fp) }?;
        // SAFETY: the caller's contract; apart from the rest (claimed).
        let out = unsafe { state::bytes_mut(buf, cap) }?;
        #[cfg(feature = "migration")]
        {
            let shape = match (area, num_queues) {
                (None, 0) => None,
                (Some(_), n) if n != 0 => Some(AreaShape {
                    num_queues,
                    queue_size,
                }),
                _ => return Err(VHU_ERR_INVALID),
            };
            let n = match shape {
                None => 0,
                Some(s) => vhost_user_core::inflight::area_size(s.num_queues, s.queue_size)
                    .ok()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or(VHU_ERR_INVALID)?,
            };
            let out = out
                .get_mut(..blk_state::state_len(n))
                .ok_or(VHU_ERR_SHORT_BUFFER)?;
            if let Some(a) = area {
                // Copied out of the shared area straight into the state:
                // no reference into shared memory is formed.
                let a = a.bind(&fp);
                a.read(
                    0,
                    &mut out[blk_state::HEADER_LEN..blk_state::HEADER_LEN + n],
                )
                .map_err(|_| VHU_ERR_INFLIGHT)?;
            }
            let n = blk_state::seal(out, &d.state(shape)).map_err(|_| VHU_ERR_INVALID)?;
            // SAFETY: the caller's contract.
            unsafe { state::put(len, n) }
        }
        #[cfg(not(feature = "migration"))]
        {
            let _ = (d, area, num_queues, queue_size, out);
            Err(VHU_ERR_UNSUPPORTED)
        }
    })
}

/// Loads a state (`VHU_ACTION_TRANSFER_STATE` with `flag` false: `len`
/// bytes at `state`, the whole transfer) into the device: checked first,
/// whole (format, checksum, the disk's size, the cache mode against the
/// negotiated features, the area's layout against this connection's
/// `num_queues` by `queue_size`), then the driver's cache mode taken and
/// the source's inflight area written into `area` (a table of one region
/// at guest address 0; NULL and `num_queues` 0 without one), which the
/// next ring start resubmits from. `VHU_ERR_INVALID` for a state refused,
/// changing nothing; `VHU_ERR_INFLIGHT` if `area` does not map the
/// layout's bytes.
///
/// # Safety
///
/// `blk` points at an initialised blk device; `state` at `len` readable
/// bytes; `area` is NULL or a valid table.
#[no_mangle]
pub unsafe extern "C" fn vhu_blk_load_state(
    blk: *mut vhu_blk,
    state: *const u8,
    len: usize,
    area: *const vhu_mem,
    num_queues: u16,
    queue_size: u16,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<BlkDevice, _>(blk) }?;
        fp.reads(state, len)?;
        // SAFETY: the caller's contract.
        let mut d = unsafe { state::get::<BlkDevice, _>(blk) }?;
        // SAFETY: the caller's contract; apart from the rest (claimed).
        let bytes = unsafe { state::slice(state, len) }?;
        // SAFETY: the caller's contract.
        let area = unsafe { Mem::optional(area, &mut fp) }?;
        #[cfg(feature = "migration")]
        {
            let s = blk_state::check(bytes).map_err(|_| VHU_ERR_INVALID)?;
            let mine = match (area, num_queues) {
                (None, 0) => None,
                (Some(_), n) if n != 0 => Some(AreaShape {
                    num_queues,
                    queue_size,
                }),
                _ => return Err(VHU_ERR_INVALID),
            };
            // A state with an area goes only where the same layout is.
            if s.area.is_some() && s.area != mine {
                return Err(VHU_ERR_INVALID);
            }
            let area = area.map(|a| a.bind(&fp));
            let from = blk_state::area_bytes(bytes);
            if let (Some(a), Some(_)) = (&area, s.area) {
                // Mapped whole before the device changes.
                a.check(0, from.len() as u64)
                    .map_err(|_| VHU_ERR_INFLIGHT)?;
            }
            d.load_state(&s).map_err(|_| VHU_ERR_INVALID)?;
            if let (Some(a), Some(_)) = (&area, s.area) {
                a.write(0, from).map_err(|_| VHU_ERR_INFLIGHT)?;
            }
            Ok(())
        }
        #[cfg(not(feature = "migration"))]
        {
            let _ = (&mut d, bytes, area, num_queues, queue_size);
            Err(VHU_ERR_UNSUPPORTED)
        }
    })
}

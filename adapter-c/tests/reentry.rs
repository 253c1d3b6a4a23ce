//! A callback of the caller's that calls back into the library on the
//! state of the call it runs in (guest memory as callbacks during a pop
//! or a plan, a device callback during a message): `VHU_ERR_BUSY`, never
//! a second `&mut` to the state; the state works again once the call has
//! returned.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::ffi::c_void;
use core::ptr;

use vhost_user_c::backend::*;
use vhost_user_c::blk::*;
use vhost_user_c::dataplane::*;
use vhost_user_c::memory::{vhu_mem, vhu_mem_ops};
use vhost_user_c::vhu_result::{self, *};

const GUEST: usize = 0x4000;
const SIZE: u16 = 8;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUF: u64 = 0x3000;

/// Guest memory served by callbacks, and the call back into the library
/// each read makes, with what it returned.
struct Guest {
    bytes: Vec<u64>,
    again: Option<Box<dyn FnMut() -> vhu_result>>,
    got: Vec<vhu_result>,
}

impl Guest {
    fn new() -> Box<Guest> {
        Box::new(Guest {
            bytes: vec![0; GUEST / 8],
            again: None,
            got: Vec::new(),
        })
    }
    fn put(&mut self, at: u64, b: &[u8]) {
        let p = self.bytes.as_mut_ptr().cast::<u8>();
        assert!(at as usize + b.len() <= GUEST);
        // SAFETY: in bounds of the guest's bytes (checked).
        unsafe { ptr::copy_nonoverlapping(b.as_ptr(), p.add(at as usize), b.len()) };
    }
    /// The callbacks over this guest (which must stay where it is).
    fn ops(&mut self) -> vhu_mem_ops {
        vhu_mem_ops {
            struct_size: size_of::<vhu_mem_ops>(),
            ctx: ptr::from_mut(self).cast(),
            read: Some(cb_read),
            write: Some(cb_write),
            load_u16_acquire: Some(cb_load),
            store_u16_release: Some(cb_store),
            check: Some(cb_check),
        }
    }
}

fn inside(gpa: u64, len: u64) -> bool {
    gpa.checked_add(len).is_some_and(|end| end <= GUEST as u64)
}

/// The guest's bytes at `gpa`.
///
/// # Safety
///
/// `ctx` is a live `Guest` no one else uses during the callback.
unsafe fn at(ctx: *mut c_void, gpa: u64) -> *mut u8 {
    // SAFETY: the contract.
    let g = unsafe { &mut *ctx.cast::<Guest>() };
    g.bytes.as_mut_ptr().cast::<u8>().wrapping_add(gpa as usize)
}

unsafe extern "C" fn cb_read(ctx: *mut c_void, gpa: u64, dst: *mut u8, len: usize) -> bool {
    {
        // SAFETY: `ctx` is the test's `Guest`, which the test does not
        // touch during the library's call.
        let g = unsafe { &mut *ctx.cast::<Guest>() };
        if let Some(f) = g.again.as_mut() {
            let r = f();
            g.got.push(r);
        }
    }
    if !inside(gpa, len as u64) {
        return false;
    }
    // SAFETY: in bounds; `dst` holds `len` bytes.
    unsafe { ptr::copy_nonoverlapping(at(ctx, gpa), dst, len) };
    true
}

unsafe extern "C" fn cb_write(ctx: *mut c_void, gpa: u64, src: *const u8, len: usize) -> bool {
    if !inside(gpa, len as u64) {
        return false;
    }
    // SAFETY: as in `cb_read`.
    unsafe { ptr::copy_nonoverlapping(src, at(ctx, gpa), len) };
    true
}

unsafe extern "C" fn cb_load(ctx: *mut c_void, gpa: u64, out: *mut u16) -> bool {
    if !inside(gpa, 2) {
        return false;
    }
    // SAFETY: in bounds and 2-aligned (the library checks `gpa`, the
    // bytes are 8-aligned); one thread.
    unsafe { *out = u16::from_le(at(ctx, gpa).cast::<u16>().read_volatile()) };
    true
}

unsafe extern "C" fn cb_store(ctx: *mut c_void, gpa: u64, v: u16) -> bool {
    if !inside(gpa, 2) {
        return false;
    }
    // SAFETY: as in `cb_load`.
    unsafe { at(ctx, gpa).cast::<u16>().write_volatile(v.to_le()) };
    true
}

unsafe extern "C" fn cb_check(_: *mut c_void, gpa: u64, len: u64) -> bool {
    inside(gpa, len.max(1))
}

#[test]
fn a_memory_callback_that_calls_back_on_its_data_plane_is_refused() {
    let mut g = Guest::new();
    // One chain of one writable buffer, made available.
    g.put(DESC, &BUF.to_le_bytes());
    g.put(DESC + 8, &16u32.to_le_bytes());
    g.put(DESC + 12, &2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
    g.put(AVAIL + 2, &1u16.to_le_bytes());
    let ops = g.ops();
    let mem = vhu_mem {
        regions: ptr::null(),
        count: 0,
        ops: &ops,
    };
    let config = vhu_ring_config {
        struct_size: size_of::<vhu_ring_config>(),
        size: SIZE,
        addrs: vhu_ring_addrs {
            desc: DESC,
            driver: AVAIL,
            device: USED,
        },
        features: VHU_VIRTIO_F_VERSION_1,
        base: 0,
        enabled: 1,
        consume_disabled: 0,
        inflight_offset: 0,
    };
    let mut storage = vec![0u64; vhu_dataplane_size(SIZE) / 8 + 1];
    let dp: *mut vhu_dataplane = storage.as_mut_ptr().cast();
    let info = |dp: *mut vhu_dataplane| {
        let mut out = core::mem::MaybeUninit::<vhu_dataplane_info>::uninit();
        // SAFETY: a data plane's storage (initialised or being used) and
        // a live out-value.
        unsafe { vhu_dataplane_get_info(dp, out.as_mut_ptr()) }
    };
    // SAFETY: storage of vhu_dataplane_size(SIZE) bytes, aligned to 8 (at
    // least vhu_dataplane_align()); the callbacks' guest lives throughout.
    unsafe {
        assert!(vhu_dataplane_align() <= 8);
        assert_eq!(
            vhu_dataplane_init(dp, vhu_dataplane_size(SIZE), &config, &mem, ptr::null()),
            VHU_OK
        );
    }
    g.again = Some(Box::new(move || info(dp)));
    let mut t = vhu_token {
        handle: 0,
        id: 0,
        side_effects: false,
    };
    let mut segs = [vhu_segment::default(); VHU_MAX_CHAIN as usize];
    let mut n = 0;
    // SAFETY: live data plane, callbacks and out-buffers.
    let r = unsafe {
        vhu_dataplane_pop(
            dp,
            &mem,
            ptr::null(),
            &mut t,
            segs.as_mut_ptr(),
            segs.len(),
            &mut n,
        )
    };
    assert_eq!(r, VHU_OK);
    assert_eq!((t.handle, n), (0, 1));
    g.again = None;
    assert!(!g.got.is_empty(), "the pop read guest memory");
    assert!(g.got.iter().all(|&r| r == VHU_ERR_BUSY), "{:?}", g.got);
    // Out of the pop: the data plane is there again.
    assert_eq!(info(dp), VHU_OK);
}

#[test]
fn a_memory_callback_that_calls_back_on_its_blk_device_or_request_is_refused() {
    let mut g = Guest::new();
    // A READ of one sector: header, data, status.
    g.put(BUF, &0u32.to_le_bytes()); // VIRTIO_BLK_T_IN
    g.put(BUF + 8, &1u64.to_le_bytes());
    let segs = [
        vhu_segment {
            addr: BUF,
            len: 16,
            writable: false,
        },
        vhu_segment {
            addr: BUF + 0x100,
            len: 512,
            writable: true,
        },
        vhu_segment {
            addr: BUF + 0x300,
            len: 1,
            writable: true,
        },
    ];
    let ops = g.ops();
    let mem = vhu_mem {
        regions: ptr::null(),
        count: 0,
        ops: &ops,
    };
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
    let mut blk_storage = vec![0u64; vhu_blk_size() / 8 + 1];
    let mut req_storage = vec![0u64; vhu_blk_request_size() / 8 + 1];
    let blk: *mut vhu_blk = blk_storage.as_mut_ptr().cast();
    let req: *mut vhu_blk_request = req_storage.as_mut_ptr().cast();
    let mut dev = vhu_device {
        struct_size: size_of::<vhu_device>(),
        ctx: ptr::null_mut(),
        read_config: None,
        write_config: None,
        features_acked: None,
        reset: None,
        set_mtu: None,
        send_rarp: None,
    };
    // SAFETY: storages of the sizes asked, aligned to 8 (at least the
    // alignments asked); live config and out-value.
    unsafe {
        assert!(vhu_blk_align() <= 8 && vhu_blk_request_align() <= 8);
        assert_eq!(vhu_blk_init(blk, vhu_blk_size(), &config), VHU_OK);
        assert_eq!(vhu_blk_request_init(req, vhu_blk_request_size()), VHU_OK);
        assert_eq!(vhu_blk_device(blk, &mut dev), VHU_OK);
    }
    let read_config = dev.read_config.unwrap();
    g.again = Some(Box::new(move || {
        let mut op = core::mem::MaybeUninit::<vhu_blk_op>::uninit();
        let mut features = 0u64;
        let mut cfg = [0u8; 8];
        // SAFETY: the states of the plan this runs in; live out-values.
        let (op, features, config) = unsafe {
            (
                vhu_blk_request_op(req, op.as_mut_ptr()),
                vhu_blk_offered_features(blk, &mut features),
                read_config(dev.ctx, 0, cfg.as_mut_ptr(), cfg.len()),
            )
        };
        // The device callback answers refused, as a bool can.
        let config = if config { VHU_OK } else { VHU_ERR_BUSY };
        [op, features, config]
            .into_iter()
            .find(|&r| r != VHU_ERR_BUSY)
            .unwrap_or(VHU_ERR_BUSY)
    }));
    // SAFETY: live device, segments, callbacks and plan.
    let r = unsafe { vhu_blk_plan(blk, segs.as_ptr(), segs.len(), &mem, req) };
    assert_eq!(r, VHU_OK);
    g.again = None;
    assert!(!g.got.is_empty(), "the plan read the header");
    assert!(g.got.iter().all(|&r| r == VHU_ERR_BUSY), "{:?}", g.got);
    // Out of the plan: both are there again, and the plan is a READ.
    let mut op = core::mem::MaybeUninit::<vhu_blk_op>::uninit();
    let mut cfg = [0u8; 8];
    // SAFETY: live states and out-values.
    unsafe {
        assert_eq!(vhu_blk_request_op(req, op.as_mut_ptr()), VHU_OK);
        assert_eq!(op.assume_init().kind, vhu_blk_op_kind::VHU_BLK_READ);
        assert!(read_config(dev.ctx, 0, cfg.as_mut_ptr(), cfg.len()));
    }
}

/// What the device callback of the session test saw.
struct Seen {
    be: *mut vhu_backend,
    got: Option<vhu_result>,
}

unsafe extern "C" fn acked(ctx: *mut c_void, _features: u64) {
    // SAFETY: `ctx` is the test's `Seen`, untouched during the call.
    let s = unsafe { &mut *ctx.cast::<Seen>() };
    let mut f = 0u64;
    // SAFETY: the session this callback runs in; a live out-value.
    s.got = Some(unsafe { vhu_backend_features(s.be, &mut f, ptr::null_mut()) });
}

#[test]
fn a_device_callback_that_calls_back_on_its_session_is_refused() {
    let cfg = vhu_backend_config {
        struct_size: size_of::<vhu_backend_config>(),
        features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
        protocol_features: VHU_PROTOCOL_F_MQ,
        num_queues: 1,
        max_queue_size: 64,
    };
    let mut storage = vec![0u64; vhu_backend_size() / 8 + 1];
    let be: *mut vhu_backend = storage.as_mut_ptr().cast();
    let mut seen = Seen { be, got: None };
    let dev = vhu_device {
        struct_size: size_of::<vhu_device>(),
        ctx: ptr::from_mut(&mut seen).cast(),
        read_config: None,
        write_config: None,
        features_acked: Some(acked),
        reset: None,
        set_mtu: None,
        send_rarp: None,
    };
    // SET_FEATURES (2), version 1, 8 bytes: VERSION_1.
    let mut msg = Vec::new();
    msg.extend_from_slice(&2u32.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&VHU_VIRTIO_F_VERSION_1.to_le_bytes());
    let mut reply = vec![0u8; VHU_MAX_MESSAGE as usize];
    let mut out = core::mem::MaybeUninit::<vhu_outcome>::uninit();
    let handle = |dev: &vhu_device, out: *mut vhu_outcome, reply: &mut [u8]| -> vhu_result {
        // SAFETY: live session, message, callbacks, reply and out-value.
        unsafe {
            vhu_backend_handle(
                be,
                msg.as_ptr(),
                msg.len(),
                0,
                ptr::null(),
                dev,
                reply.as_mut_ptr(),
                reply.len(),
                out,
            )
        }
    };
    // SAFETY: storage of the session's size, aligned to 8 (at least
    // vhu_backend_align()); a live config.
    unsafe {
        assert!(vhu_backend_align() <= 8);
        assert_eq!(vhu_backend_init(be, vhu_backend_size(), &cfg), VHU_OK);
    }
    assert_eq!(handle(&dev, out.as_mut_ptr(), &mut reply), VHU_OK);
    assert_eq!(seen.got, Some(VHU_ERR_BUSY));
    // Out of the message: the session answers again.
    let mut f = 0u64;
    // SAFETY: live session and out-value.
    let r = unsafe { vhu_backend_features(be, &mut f, ptr::null_mut()) };
    assert_eq!(r, VHU_OK);
    assert_eq!(f, VHU_VIRTIO_F_VERSION_1);
}

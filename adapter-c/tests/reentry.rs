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
use vhost_user_c::memory::{vhu_mem, vhu_mem_ops, vhu_region};
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
    let mut storage = Vec::new();
    let (mut g, dp) = popping_guest(&mut storage);
    let info = |dp: *mut vhu_dataplane| {
        let mut out = core::mem::MaybeUninit::new(vhu_dataplane_info::default());
        // SAFETY: a data plane's storage (initialised or being used) and
        // a live out-value.
        unsafe { vhu_dataplane_get_info(dp, out.as_mut_ptr()) }
    };
    g.again = Some(Box::new(move || info(dp)));
    let mut segs = [vhu_segment::default(); VHU_MAX_CHAIN as usize];
    assert_eq!(pop_with_calls_back(&mut g, dp, &mut segs), VHU_OK);
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
    let config = blk_config();
    let mut blk_storage = vec![0u64; vhu_blk_size() / 8 + 1];
    let mut req_storage = vec![0u64; vhu_blk_request_size() / 8 + 1];
    let blk: *mut vhu_blk = blk_storage.as_mut_ptr().cast();
    let req: *mut vhu_blk_request = req_storage.as_mut_ptr().cast();
    let mut dev = vhu_device::default();
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
        let mut op = core::mem::MaybeUninit::new(vhu_blk_op::default());
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
    let mut op = core::mem::MaybeUninit::new(vhu_blk_op::default());
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
    let mut out = core::mem::MaybeUninit::new(vhu_outcome::default());
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

// A call made from a callback on another state, or on none, with
// buffers of its own: it may share what the call it runs in only reads,
// and what that call handed the callback, but nothing else of that call.
// What it would write (or hold a `&mut` to) over the call's states and
// buffers is refused with `VHU_ERR_INVALID` before anything is written.

/// A 12-byte header of a message without payload (GET_FEATURES).
const HEADER: [u8; 12] = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

/// `vhu_message_size` of `HEADER` into `total`.
///
/// # Safety
///
/// `total` is writable for a `size_t`, or refused.
unsafe fn message_size_into(total: *mut usize) -> vhu_result {
    // SAFETY: a live header; the caller's contract on `total`.
    unsafe { vhu_message_size(HEADER.as_ptr(), HEADER.len(), total) }
}

fn ring_config() -> vhu_ring_config {
    vhu_ring_config {
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
    }
}

/// A guest with one chain of one writable buffer available, its
/// callbacks, and a data plane over them in `storage`.
fn popping_guest(storage: &mut Vec<u64>) -> (Box<Guest>, *mut vhu_dataplane) {
    let mut g = Guest::new();
    g.put(DESC, &BUF.to_le_bytes());
    g.put(DESC + 8, &16u32.to_le_bytes());
    g.put(DESC + 12, &2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
    g.put(AVAIL + 2, &1u16.to_le_bytes());
    *storage = vec![0u64; vhu_dataplane_size(SIZE) / 8 + 1];
    let dp: *mut vhu_dataplane = storage.as_mut_ptr().cast();
    let ops = g.ops();
    let mem = vhu_mem {
        regions: ptr::null(),
        count: 0,
        ops: &ops,
    };
    // SAFETY: storage of vhu_dataplane_size(SIZE) bytes, aligned to 8 (at
    // least vhu_dataplane_align()); the callbacks' guest lives throughout.
    unsafe {
        assert!(vhu_dataplane_align() <= 8);
        assert_eq!(
            vhu_dataplane_init(
                dp,
                vhu_dataplane_size(SIZE),
                &ring_config(),
                &mem,
                ptr::null()
            ),
            VHU_OK
        );
    }
    (g, dp)
}

/// A blk device of 2048 sectors of 512 bytes, one queue, with FLUSH,
/// writeback.
fn blk_config() -> vhu_blk_config {
    vhu_blk_config {
        capacity: 2048,
        blk_size: 512,
        num_queues: 1,
        seg_max: 14,
        flush: 1,
        writeback: 1,
        ..Default::default()
    }
}

const SENTINEL: u64 = 0x5a5a_5a5a_5a5a_5a5a;

/// A pop through `g`'s callbacks into `segs`, its last entry a sentinel
/// the pop does not write (one segment is popped): the pop's result, and
/// what the callbacks' calls back returned.
fn pop_with_calls_back(
    g: &mut Guest,
    dp: *mut vhu_dataplane,
    segs: &mut [vhu_segment; VHU_MAX_CHAIN as usize],
) -> vhu_result {
    let ops = g.ops();
    let mem = vhu_mem {
        regions: ptr::null(),
        count: 0,
        ops: &ops,
    };
    segs[VHU_MAX_CHAIN as usize - 1].addr = SENTINEL;
    let mut t = vhu_token {
        handle: 0,
        id: 0,
        side_effects: false,
        ..Default::default()
    };
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
    if r == VHU_OK {
        assert_eq!((t.handle, n), (0, 1));
        assert_eq!(segs[0].addr, BUF);
    }
    r
}

/// A memory callback of a pop that writes (through `vhu_message_size`)
/// into the segment array the pop is filling: refused, and the entry the
/// pop does not write is still the sentinel. The same call into a value
/// of its own is taken.
#[test]
fn a_call_from_a_memory_callback_into_the_segments_of_its_pop_is_refused() {
    let mut storage = Vec::new();
    let (mut g, dp) = popping_guest(&mut storage);
    let mut segs = [vhu_segment::default(); VHU_MAX_CHAIN as usize];
    let last = ptr::from_mut(&mut segs[VHU_MAX_CHAIN as usize - 1]).cast::<usize>();
    g.again = Some(Box::new(move || {
        let mut own = 0usize;
        // SAFETY: a value of the callback's own; `last` is the pop's
        // segment entry (8-aligned), refused.
        unsafe {
            assert_eq!(message_size_into(&mut own), VHU_OK);
            assert_eq!(own, HEADER.len());
            message_size_into(last)
        }
    }));
    assert_eq!(pop_with_calls_back(&mut g, dp, &mut segs), VHU_OK);
    g.again = None;
    assert!(!g.got.is_empty(), "the pop read guest memory");
    assert!(g.got.iter().all(|&r| r == VHU_ERR_INVALID), "{:?}", g.got);
    assert_eq!(segs[VHU_MAX_CHAIN as usize - 1].addr, SENTINEL);
}

/// A memory callback of a pop that calls the library on a data plane of
/// its own, with a guest memory table of its own: taken; with a table
/// one of whose entries maps the pop's segment array (the call would
/// copy guest bytes into it): refused.
#[test]
fn a_call_from_a_memory_callback_whose_table_maps_the_segments_of_its_pop_is_refused() {
    let mut storage = Vec::new();
    let (mut g, dp) = popping_guest(&mut storage);
    // A second ring, over guest memory as a table.
    let mut guest2 = vec![0u64; GUEST / 8];
    let own = vhu_region {
        gpa: 0,
        size: GUEST as u64,
        host: guest2.as_mut_ptr().cast(),
    };
    let table = |regions: &[vhu_region]| vhu_mem {
        regions: regions.as_ptr(),
        count: regions.len(),
        ops: ptr::null(),
    };
    let mut storage2 = vec![0u64; vhu_dataplane_size(SIZE) / 8 + 1];
    let dp2: *mut vhu_dataplane = storage2.as_mut_ptr().cast();
    // SAFETY: storage of the data plane's size, aligned to 8; a live table.
    unsafe {
        let r = vhu_dataplane_init(
            dp2,
            vhu_dataplane_size(SIZE),
            &ring_config(),
            &table(&[own]),
            ptr::null(),
        );
        assert_eq!(r, VHU_OK);
    }
    let mut segs = [vhu_segment::default(); VHU_MAX_CHAIN as usize];
    let over = vhu_region {
        gpa: 0x10_0000,
        size: 64,
        host: segs.as_mut_ptr().wrapping_add(32).cast(),
    };
    g.again = Some(Box::new(move || {
        let mut p = vhu_published::VHU_PUBLISHED_NOTIFY;
        // SAFETY: the second data plane and its guest live throughout;
        // `over` maps bytes of the pop's segments (only compared).
        unsafe {
            let r = vhu_dataplane_publish(dp2, &table(&[own]), ptr::null(), &mut p);
            assert_eq!(r, VHU_OK);
            assert_eq!(p, vhu_published::VHU_PUBLISHED_NOTHING);
            vhu_dataplane_publish(dp2, &table(&[own, over]), ptr::null(), &mut p)
        }
    }));
    assert_eq!(pop_with_calls_back(&mut g, dp, &mut segs), VHU_OK);
    g.again = None;
    assert!(!g.got.is_empty(), "the pop read guest memory");
    assert!(g.got.iter().all(|&r| r == VHU_ERR_INVALID), "{:?}", g.got);
    assert_eq!(segs[VHU_MAX_CHAIN as usize - 1].addr, SENTINEL);
}

/// What the device callback of a message calls back with: the message
/// and reply of that message (8-aligned), its session, a second session,
/// and a blk device inside the reply with its control path.
struct Nested {
    msg: *mut u8,
    reply: *mut u8,
    be: *mut vhu_backend,
    other: *mut vhu_backend,
    blk: vhu_device,
    got: Vec<(&'static str, vhu_result)>,
}

unsafe extern "C" fn acked_nested(ctx: *mut c_void, _features: u64) {
    // SAFETY: `ctx` is the test's `Nested`, untouched during the call.
    let s = unsafe { &mut *ctx.cast::<Nested>() };
    let mut total = 0usize;
    let mut f = 0u64;
    // SAFETY: the message, reply and sessions of the test, live (the
    // session's storage holds a request plan); the calls that would
    // write into those are refused.
    unsafe {
        // Reading the message the session reads: taken.
        let r = vhu_message_size(s.msg, HEADER.len(), &mut total);
        s.got.push(("read the message", r));
        let r = message_size_into(s.reply.cast());
        s.got.push(("write the reply", r));
        let r = message_size_into(s.msg.cast());
        s.got.push(("write the message", r));
        let r = vhu_backend_features(s.other, &mut f, s.be.cast());
        s.got.push(("write the session", r));
        let req = s.reply.add(64).cast::<vhu_blk_request>();
        let r = vhu_blk_request_init(req, vhu_blk_request_size());
        s.got.push(("a request plan in the reply", r));
        let r = vhu_blk_request_init(s.be.cast(), vhu_blk_request_size());
        s.got.push(("a request plan over the session", r));
        // The blk device's own callback, on a device inside the reply:
        // refused (it answers nothing; the reply shows it).
        let acked = s.blk.features_acked.unwrap();
        acked(s.blk.ctx, VHU_VIRTIO_F_VERSION_1);
    }
}

/// A device callback of a message that calls the library on another
/// session, a blk device or no state, writing into the message, the
/// reply or the session of that message: refused, and none of them
/// changed (the session takes the message once the callback returns).
/// Reading the message is taken.
#[test]
fn a_call_from_a_device_callback_into_the_message_reply_or_session_of_its_call_is_refused() {
    let cfg = vhu_backend_config {
        struct_size: size_of::<vhu_backend_config>(),
        features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
        protocol_features: VHU_PROTOCOL_F_MQ,
        num_queues: 1,
        max_queue_size: 64,
    };
    let mut storage = vec![0u64; vhu_backend_size() / 8 + 1];
    let mut storage2 = vec![0u64; vhu_backend_size() / 8 + 1];
    let be: *mut vhu_backend = storage.as_mut_ptr().cast();
    let other: *mut vhu_backend = storage2.as_mut_ptr().cast();
    // SET_FEATURES (2), version 1, 8 bytes: VERSION_1, 8-aligned.
    let mut msg = vec![0u64; 3];
    let m = msg.as_mut_ptr().cast::<u8>();
    let cap = VHU_MAX_MESSAGE as usize;
    let mut reply = vec![SENTINEL; cap.div_ceil(8) + vhu_blk_size() / 8 + 1];
    let reply_p = reply.as_mut_ptr().cast::<u8>();
    // A request plan at 64 and a blk device at 2048 of the reply.
    assert!(64 + vhu_blk_request_size() <= 2048 && 2048 + vhu_blk_size() <= cap);
    assert!(vhu_blk_request_size() <= vhu_backend_size());
    let blk = reply_p.wrapping_add(2048).cast::<vhu_blk>();
    let blk_cfg = blk_config();
    let mut nested = Nested {
        msg: m,
        reply: reply_p,
        be,
        other,
        blk: vhu_device::default(),
        got: Vec::new(),
    };
    let dev = vhu_device {
        struct_size: size_of::<vhu_device>(),
        ctx: ptr::from_mut(&mut nested).cast(),
        read_config: None,
        write_config: None,
        features_acked: Some(acked_nested),
        reset: None,
        set_mtu: None,
        send_rarp: None,
    };
    let mut out = core::mem::MaybeUninit::new(vhu_outcome::default());
    // SAFETY: storages of the sizes asked, aligned to 8 (at least the
    // alignments asked); the message is 20 bytes of its 24; the blk
    // device fits in the reply's storage; live configs and out-values.
    unsafe {
        assert!(vhu_backend_align() <= 8 && vhu_blk_align() <= 8);
        assert_eq!(vhu_backend_init(be, vhu_backend_size(), &cfg), VHU_OK);
        assert_eq!(vhu_backend_init(other, vhu_backend_size(), &cfg), VHU_OK);
        assert_eq!(vhu_blk_init(blk, vhu_blk_size(), &blk_cfg), VHU_OK);
        assert_eq!(vhu_blk_device(blk, &mut nested.blk), VHU_OK);
        ptr::copy_nonoverlapping(2u32.to_le_bytes().as_ptr(), m, 4);
        ptr::copy_nonoverlapping(1u32.to_le_bytes().as_ptr(), m.add(4), 4);
        ptr::copy_nonoverlapping(8u32.to_le_bytes().as_ptr(), m.add(8), 4);
        let bits = VHU_VIRTIO_F_VERSION_1.to_le_bytes();
        ptr::copy_nonoverlapping(bits.as_ptr(), m.add(12), 8);
    }
    let msg_before = msg.clone();
    let reply_before = reply.clone();
    // SAFETY: live session, message, callbacks, reply and out-value.
    let r = unsafe {
        vhu_backend_handle(
            be,
            m,
            20,
            0,
            ptr::null(),
            &dev,
            reply_p,
            cap,
            out.as_mut_ptr(),
        )
    };
    assert_eq!(r, VHU_OK);
    assert_eq!(
        nested.got,
        [
            ("read the message", VHU_OK),
            ("write the reply", VHU_ERR_INVALID),
            ("write the message", VHU_ERR_INVALID),
            ("write the session", VHU_ERR_INVALID),
            ("a request plan in the reply", VHU_ERR_INVALID),
            ("a request plan over the session", VHU_ERR_INVALID),
        ]
    );
    assert!(msg == msg_before, "the message changed");
    assert!(
        reply == reply_before,
        "the reply or the blk device in it changed"
    );
    // The session took the message, and works.
    let mut f = 0u64;
    // SAFETY: live session and out-value.
    let r = unsafe { vhu_backend_features(be, &mut f, ptr::null_mut()) };
    assert_eq!((r, f), (VHU_OK, VHU_VIRTIO_F_VERSION_1));
}

/// A device whose `read_config` hands its buffer on to a blk device's
/// (with `extra` bytes more), and what that answered.
struct Forward {
    blk: vhu_device,
    extra: usize,
    got: Option<bool>,
}

unsafe extern "C" fn read_forward(ctx: *mut c_void, offset: u32, dst: *mut u8, len: usize) -> bool {
    // SAFETY: `ctx` is the test's `Forward`, untouched during the call.
    let f = unsafe { &mut *ctx.cast::<Forward>() };
    let read = f.blk.read_config.unwrap();
    // SAFETY: the blk device lives throughout; `dst` holds `len` bytes
    // (and no more for this callback: the library refuses the rest).
    let ok = unsafe { read(f.blk.ctx, offset, dst, len + f.extra) };
    f.got = Some(ok);
    ok
}

/// A message with `payload` (request `code`, version 1).
fn message(code: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// What a callback is handed it may hand on: a GET_CONFIG whose device's
/// `read_config` passes its buffer to the blk device's gets the blk
/// device's capacity, as it does with the blk device's control path
/// itself; passing the buffer with 8 bytes more than it holds is refused.
#[test]
fn a_device_callback_hands_its_buffer_on_to_a_blk_device_but_no_byte_more() {
    let cfg = vhu_backend_config {
        struct_size: size_of::<vhu_backend_config>(),
        features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
        protocol_features: VHU_PROTOCOL_F_CONFIG,
        num_queues: 1,
        max_queue_size: 64,
    };
    let mut storage = vec![0u64; vhu_backend_size() / 8 + 1];
    let be: *mut vhu_backend = storage.as_mut_ptr().cast();
    let mut blk_storage = vec![0u64; vhu_blk_size() / 8 + 1];
    let blk: *mut vhu_blk = blk_storage.as_mut_ptr().cast();
    let blk_cfg = blk_config();
    let none = vhu_device::default();
    let mut fwd = Forward {
        blk: none,
        extra: 0,
        got: None,
    };
    // SAFETY: storages of the sizes asked, aligned to 8; live configs.
    unsafe {
        assert_eq!(vhu_backend_init(be, vhu_backend_size(), &cfg), VHU_OK);
        assert_eq!(vhu_blk_init(blk, vhu_blk_size(), &blk_cfg), VHU_OK);
        assert_eq!(vhu_blk_device(blk, &mut fwd.blk), VHU_OK);
    }
    let blk_dev = fwd.blk;
    let fwd: *mut Forward = &mut fwd;
    let dev = vhu_device {
        ctx: fwd.cast(),
        read_config: Some(read_forward),
        ..none
    };
    let handle = |msg: &[u8], dev: &vhu_device| {
        let mut reply = vec![0u8; VHU_MAX_MESSAGE as usize];
        let mut out = core::mem::MaybeUninit::new(vhu_outcome::default());
        // SAFETY: live session, message, device, reply and out-value.
        let r = unsafe {
            vhu_backend_handle(
                be,
                msg.as_ptr(),
                msg.len(),
                0,
                ptr::null(),
                dev,
                reply.as_mut_ptr(),
                reply.len(),
                out.as_mut_ptr(),
            )
        };
        assert_eq!(r, VHU_OK);
        // SAFETY: written by the call that returned VHU_OK.
        let out = unsafe { out.assume_init() };
        assert_eq!(out.refused, VHU_OK);
        reply[24..32].to_vec()
    };
    let features = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES;
    handle(&message(2, &features.to_le_bytes()), &none);
    handle(&message(16, &VHU_PROTOCOL_F_CONFIG.to_le_bytes()), &none);
    // GET_CONFIG (24): offset 0, 8 bytes, flags 0, and room for them.
    let mut get = [0u8; 20];
    get[4..8].copy_from_slice(&8u32.to_le_bytes());
    let get = message(24, &get);
    let capacity = 2048u64.to_le_bytes().to_vec();
    assert_eq!(handle(&get, &blk_dev), capacity, "the blk device itself");
    assert_eq!(handle(&get, &dev), capacity, "the buffer handed on");
    // SAFETY: `fwd` is the device's context, used by no call now.
    let got = unsafe { (*fwd).got };
    assert_eq!(got, Some(true));
    // SAFETY: as above.
    unsafe { (*fwd).extra = 8 };
    handle(&get, &dev);
    // SAFETY: as above.
    let got = unsafe { (*fwd).got };
    assert_eq!(got, Some(false), "8 bytes past the buffer were taken");
}

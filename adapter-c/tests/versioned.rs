//! The structs that may grow carry their size, those a caller hands in
//! and those the library writes out alike: a size the library does not
//! know (a program built against another header, a struct not
//! initialised with its `VHU_*_INIT`, or one built before the field
//! existed, whose first field is read as the size) is refused with
//! `VHU_ERR_ABI`, before anything is written into an output; an output
//! of a size it knows is written at that size, its `struct_size` kept
//! and no byte past it touched; a `vhu_device` of the older size (without
//! the net callbacks) is read, and written by `vhu_blk_device`, at that
//! size and no further.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::ffi::c_void;
use core::mem::offset_of;
use core::ptr;

use vhost_user_c::backend::*;
use vhost_user_c::blk::*;
use vhost_user_c::dataplane::*;
use vhost_user_c::frontend::*;
use vhost_user_c::memory::{vhu_mem, vhu_mem_ops, vhu_region};
use vhost_user_c::vhu_result::{self, *};

/// Sizes no version of a struct of `size` bytes has: none, one word
/// short, one word more (a newer header), and a pointer (the first field
/// of a struct from before `struct_size`: `vhu_device`'s `ctx`).
fn unknown(size: usize) -> [usize; 4] {
    [0, size - 8, size + 8, 0x7ffd_1234_5670]
}

/// Zeroed storage of `n` bytes, 8-aligned.
fn storage(n: usize) -> Vec<u64> {
    vec![0u64; n / 8 + 1]
}

/// GET_PROTOCOL_FEATURES: `vhu_backend_handle`'s result with `dev` on
/// the back-end in `be`, and the features offered.
fn protocol_features(be: &mut [u64], dev: *const vhu_device) -> (vhu_result, u64) {
    let msg = [15u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let mut reply = vec![0u8; VHU_MAX_MESSAGE as usize];
    let mut out = core::mem::MaybeUninit::new(vhu_outcome::default());
    // SAFETY: a live back-end, message, device, reply and out-value,
    // apart from each other.
    let r = unsafe {
        vhu_backend_handle(
            be.as_mut_ptr().cast(),
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
    let offered = if r == VHU_OK {
        u64::from_le_bytes(reply[12..20].try_into().unwrap())
    } else {
        0
    };
    (r, offered)
}

fn backend(protocol: u64) -> Vec<u64> {
    let mut be = storage(vhu_backend_size());
    let cfg = vhu_backend_config {
        features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
        protocol_features: protocol,
        num_queues: 1,
        max_queue_size: 64,
        ..Default::default()
    };
    // SAFETY: storage of the session's size, 8-aligned; a live config.
    let r = unsafe { vhu_backend_init(be.as_mut_ptr().cast(), vhu_backend_size(), &cfg) };
    assert_eq!(r, VHU_OK);
    be
}

/// `init` refuses with `VHU_ERR_ABI` the struct `with_size` makes at
/// each size no version of it (`size` bytes) has.
fn sizes_refused<T>(
    name: &str,
    size: usize,
    with_size: impl Fn(usize) -> T,
    init: impl Fn(&T) -> vhu_result,
) {
    for n in unknown(size) {
        assert_eq!(init(&with_size(n)), VHU_ERR_ABI, "{name} of {n}");
    }
}

#[test]
fn a_config_of_a_size_the_library_does_not_know_is_refused() {
    let good = vhu_backend_config {
        features: VHU_VIRTIO_F_VERSION_1,
        num_queues: 1,
        max_queue_size: 64,
        ..Default::default()
    };
    let mut be = storage(vhu_backend_size());
    let be = be.as_mut_ptr().cast();
    // SAFETY: storage of the session's size; a live config.
    let init = |cfg: &vhu_backend_config| unsafe { vhu_backend_init(be, vhu_backend_size(), cfg) };
    let with_size = |struct_size| vhu_backend_config {
        struct_size,
        ..good
    };
    sizes_refused("vhu_backend_config", size_of_val(&good), with_size, init);
    assert_eq!(init(&good), VHU_OK);

    let good = vhu_blk_config {
        capacity: 8,
        blk_size: 512,
        num_queues: 1,
        ..Default::default()
    };
    let mut blk = storage(vhu_blk_size());
    let blk = blk.as_mut_ptr().cast();
    // SAFETY: storage of the device's size; a live config.
    let init = |cfg: &vhu_blk_config| unsafe { vhu_blk_init(blk, vhu_blk_size(), cfg) };
    let with_size = |struct_size| vhu_blk_config {
        struct_size,
        ..good
    };
    sizes_refused("vhu_blk_config", size_of_val(&good), with_size, init);
    assert_eq!(init(&good), VHU_OK);

    let good = vhu_frontend_config::default();
    let mut fe = storage(vhu_frontend_size());
    let fe = fe.as_mut_ptr().cast();
    // SAFETY: storage of the front-end's size; a live config.
    let init =
        |cfg: &vhu_frontend_config| unsafe { vhu_frontend_init(fe, vhu_frontend_size(), cfg) };
    let with_size = |struct_size| vhu_frontend_config {
        struct_size,
        ..good
    };
    sizes_refused("vhu_frontend_config", size_of_val(&good), with_size, init);
    assert_eq!(init(&good), VHU_OK);

    // A ring config, and guest memory callbacks, each refused on their
    // own (the other one right).
    let mut dp = storage(vhu_dataplane_size(8));
    let dp = dp.as_mut_ptr().cast();
    let guest = Guest::new();
    let table = guest.table();
    let good = ring8();
    // SAFETY: storage of the data plane's size; a live config and table.
    let init = |cfg: &vhu_ring_config, mem: &vhu_mem| unsafe {
        vhu_dataplane_init(dp, vhu_dataplane_size(8), cfg, mem, ptr::null())
    };
    let with_size = |struct_size| vhu_ring_config {
        struct_size,
        ..good
    };
    sizes_refused("vhu_ring_config", size_of_val(&good), with_size, |cfg| {
        init(cfg, &table)
    });
    let with_size = |struct_size| vhu_mem_ops {
        struct_size,
        ..vhu_mem_ops::default()
    };
    sizes_refused("vhu_mem_ops", size_of::<vhu_mem_ops>(), with_size, |ops| {
        let mem = vhu_mem {
            regions: ptr::null(),
            count: 0,
            ops,
        };
        init(&good, &mem)
    });
    assert_eq!(init(&good, &table), VHU_OK);
}

/// An enabled split ring of 8 at the start of a [`Guest`].
fn ring8() -> vhu_ring_config {
    vhu_ring_config {
        size: 8,
        addrs: vhu_ring_addrs {
            desc: 0,
            driver: 0x80,
            device: 0x100,
        },
        enabled: 1,
        ..Default::default()
    }
}

/// A guest of 512 bytes at guest address 0, as one region.
struct Guest {
    _words: Vec<u64>,
    region: vhu_region,
}

impl Guest {
    fn new() -> Guest {
        let mut words = vec![0u64; 64];
        let region = vhu_region {
            gpa: 0,
            size: 512,
            host: words.as_mut_ptr().cast(),
        };
        Guest {
            _words: words,
            region,
        }
    }

    /// Its table of one region (valid while the guest stays where it is).
    fn table(&self) -> vhu_mem {
        vhu_mem {
            regions: &self.region,
            count: 1,
            ops: ptr::null(),
        }
    }
}

#[test]
fn a_device_of_a_size_the_library_does_not_know_is_refused() {
    let mut be = backend(VHU_PROTOCOL_F_REPLY_ACK);
    for n in unknown(size_of::<vhu_device>()) {
        let dev = vhu_device {
            struct_size: n,
            ..Default::default()
        };
        assert_eq!(protocol_features(&mut be, &dev).0, VHU_ERR_ABI, "{n}");
    }
    let dev = vhu_device::default();
    assert_eq!(
        protocol_features(&mut be, &dev),
        (VHU_OK, VHU_PROTOCOL_F_REPLY_ACK)
    );

    // vhu_blk_device writes nothing into a struct of a size it does not
    // know.
    let mut blk = storage(vhu_blk_size());
    let cfg = vhu_blk_config {
        capacity: 8,
        blk_size: 512,
        num_queues: 1,
        ..Default::default()
    };
    // SAFETY: storage of the device's size; a live config.
    let r = unsafe { vhu_blk_init(blk.as_mut_ptr().cast(), vhu_blk_size(), &cfg) };
    assert_eq!(r, VHU_OK);
    for n in unknown(size_of::<vhu_device>()) {
        let mut dev = vhu_device {
            struct_size: n,
            ..Default::default()
        };
        // SAFETY: a live blk device and out-value.
        let r = unsafe { vhu_blk_device(blk.as_mut_ptr().cast(), &mut dev) };
        assert_eq!(r, VHU_ERR_ABI, "{n}");
        assert!(dev.ctx.is_null() && dev.read_config.is_none());
    }
}

/// `vhu_device` as a program built before the net callbacks has it, and
/// after it two words the library must not read or write (a callback
/// that is not the program's).
#[repr(C)]
struct OldDevice {
    struct_size: usize,
    ctx: *mut c_void,
    read_config: Option<unsafe extern "C" fn(*mut c_void, u32, *mut u8, usize) -> bool>,
    write_config: Option<unsafe extern "C" fn(*mut c_void, u32, *const u8, usize, bool) -> bool>,
    features_acked: Option<unsafe extern "C" fn(*mut c_void, u64)>,
    reset: Option<unsafe extern "C" fn(*mut c_void)>,
    /// Not part of the program's struct.
    after: [Option<unsafe extern "C" fn(*mut c_void, u16) -> bool>; 2],
}

unsafe extern "C" fn not_the_programs(_: *mut c_void, _: u16) -> bool {
    panic!("a callback past the struct's size was called");
}

const OLD_SIZE: usize = offset_of!(OldDevice, after);

#[test]
fn a_device_without_the_net_callbacks_is_read_at_its_size() {
    assert_eq!(OLD_SIZE, offset_of!(vhu_device, set_mtu));
    let mut old = OldDevice {
        struct_size: OLD_SIZE,
        ctx: ptr::null_mut(),
        read_config: None,
        write_config: None,
        features_acked: None,
        reset: None,
        after: [Some(not_the_programs); 2],
    };
    let dev = ptr::from_ref(&old).cast::<vhu_device>();
    // The words after it are not read as `set_mtu` and `send_rarp`: a
    // session offering MTU or RARP is refused as with NULL callbacks.
    for protocol in [VHU_PROTOCOL_F_MTU, VHU_PROTOCOL_F_RARP] {
        let mut be = backend(VHU_PROTOCOL_F_REPLY_ACK | protocol);
        assert_eq!(protocol_features(&mut be, dev).0, VHU_ERR_UNSUPPORTED);
    }
    let mut be = backend(VHU_PROTOCOL_F_REPLY_ACK);
    assert_eq!(
        protocol_features(&mut be, dev),
        (VHU_OK, VHU_PROTOCOL_F_REPLY_ACK)
    );

    // vhu_blk_device fills the callbacks the old struct has, and leaves
    // the words after it alone.
    let mut blk = storage(vhu_blk_size());
    let cfg = vhu_blk_config {
        capacity: 8,
        blk_size: 512,
        num_queues: 1,
        ..Default::default()
    };
    // SAFETY: storage of the device's size; a live config; `old` is a
    // live `vhu_device` of its `struct_size`.
    unsafe {
        assert_eq!(
            vhu_blk_init(blk.as_mut_ptr().cast(), vhu_blk_size(), &cfg),
            VHU_OK
        );
        let r = vhu_blk_device(blk.as_mut_ptr().cast(), ptr::from_mut(&mut old).cast());
        assert_eq!(r, VHU_OK);
    }
    assert_eq!(old.struct_size, OLD_SIZE);
    assert_eq!(old.ctx, blk.as_mut_ptr().cast());
    assert!(old.read_config.is_some() && old.write_config.is_some());
    assert!(old.features_acked.is_some() && old.reset.is_some());
    let trap: unsafe extern "C" fn(*mut c_void, u16) -> bool = not_the_programs;
    assert!(old
        .after
        .iter()
        .all(|f| f.is_some_and(|f| ptr::fn_addr_eq(f, trap))));
    // The filled device serves the session.
    let dev = ptr::from_ref(&old).cast::<vhu_device>();
    assert_eq!(protocol_features(&mut be, dev).0, VHU_OK);
}

/// Bytes an output is surrounded by, to show what a call wrote.
const SENTINEL: u8 = 0xa5;

/// 8-aligned storage for a `T` and 64 bytes after it, every byte
/// `SENTINEL`, with `struct_size` set to `n`.
fn output<T>(n: usize) -> Vec<u64> {
    let mut b = vec![u64::from_ne_bytes([SENTINEL; 8]); size_of::<T>() / 8 + 9];
    b[0] = n as u64;
    b
}

fn bytes(b: &[u64]) -> Vec<u8> {
    b.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// `call` writes a `T` out: given a `struct_size` no version of `T` has,
/// it answers `VHU_ERR_ABI` and writes no byte (the size is kept); given
/// `sizeof(T)`, it answers `expect`, keeps the size and writes inside
/// the struct only (some byte of it, none past it). Returns what the
/// last call wrote.
fn writes_at_its_size<T: Copy>(
    name: &str,
    expect: vhu_result,
    mut call: impl FnMut(*mut T) -> vhu_result,
) -> T {
    let size = size_of::<T>();
    for n in unknown(size) {
        let mut b = output::<T>(n);
        let before = bytes(&b);
        assert_eq!(call(b.as_mut_ptr().cast()), VHU_ERR_ABI, "{name} of {n}");
        assert_eq!(bytes(&b), before, "{name} of {n}: written");
    }
    let mut b = output::<T>(size);
    assert_eq!(call(b.as_mut_ptr().cast()), expect, "{name}");
    let after = bytes(&b);
    assert_eq!(b[0], size as u64, "{name}: struct_size changed");
    assert!(
        after[8..size].iter().any(|&x| x != SENTINEL),
        "{name}: nothing written"
    );
    assert!(
        after[size..].iter().all(|&x| x == SENTINEL),
        "{name}: written past its size"
    );
    // SAFETY: `b` holds a `T` the call wrote (every field), 8-aligned.
    unsafe { b.as_ptr().cast::<T>().read() }
}

/// `vhu_backend_handle` of `msg` (no fds, no memory, no device) into
/// `out`.
fn handle(be: &mut [u64], msg: &[u8], out: *mut vhu_outcome) -> vhu_result {
    let mut reply = vec![0u8; VHU_MAX_MESSAGE as usize];
    // SAFETY: a live back-end, message and reply; `out` is the caller's.
    unsafe {
        vhu_backend_handle(
            be.as_mut_ptr().cast(),
            msg.as_ptr(),
            msg.len(),
            0,
            ptr::null(),
            ptr::null(),
            reply.as_mut_ptr(),
            reply.len(),
            out,
        )
    }
}

#[test]
fn a_back_end_output_of_a_size_the_library_does_not_know_is_not_written() {
    let mut be = backend(VHU_PROTOCOL_F_REPLY_ACK);
    // SET_VRING_CALL of ring 0 without an fd: one action.
    let mut msg = vec![13u8, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0];
    msg.extend_from_slice(&0x100u64.to_le_bytes());
    let out = writes_at_its_size("vhu_outcome", VHU_OK, |out| handle(&mut be, &msg, out));
    assert_eq!(out.actions, 1);
    assert_eq!(out.reply, vhu_reply_kind::VHU_REPLY_NONE);
    let a = writes_at_its_size("vhu_action", VHU_OK, |out| {
        // SAFETY: a live back-end; `out` is the caller's.
        unsafe { vhu_backend_action(be.as_mut_ptr().cast(), 0, out) }
    });
    assert_eq!(a.kind, vhu_action_kind::VHU_ACTION_SET_CALL);
    assert_eq!((a.queue, a.fd), (0, -1));
    // A malformed message: refused, and the outcome written first (no
    // reply, no action) is what it leaves.
    let out = writes_at_its_size("vhu_outcome", VHU_ERR_SHORT_BUFFER, |out| {
        handle(&mut be, &msg[..5], out)
    });
    assert_eq!(out.actions, 0);
    assert_eq!(out.reply_len, 0);
}

#[test]
fn a_data_plane_output_of_a_size_the_library_does_not_know_is_not_written() {
    let mut dp = storage(vhu_dataplane_size(8));
    let dp = dp.as_mut_ptr().cast();
    let guest = Guest::new();
    let mem = guest.table();
    let cfg = ring8();
    // SAFETY: storage of the data plane's size; a live config and table.
    let r = unsafe { vhu_dataplane_init(dp, vhu_dataplane_size(8), &cfg, &mem, ptr::null()) };
    assert_eq!(r, VHU_OK);
    // An empty ring: the token says so.
    let mut segs = [vhu_segment::default(); VHU_MAX_CHAIN as usize];
    let t = writes_at_its_size("vhu_token", VHU_OK, |tok| {
        let mut n = 0;
        // SAFETY: a live data plane, table and buffers; `tok` is the
        // caller's.
        unsafe {
            vhu_dataplane_pop(
                dp,
                &mem,
                ptr::null(),
                tok,
                segs.as_mut_ptr(),
                segs.len(),
                &mut n,
            )
        }
    });
    assert_eq!(t.handle, VHU_NO_TOKEN);
    let info = writes_at_its_size("vhu_dataplane_info", VHU_OK, |out| {
        // SAFETY: a live data plane; `out` is the caller's.
        unsafe { vhu_dataplane_get_info(dp, out) }
    });
    assert_eq!((info.size, info.enabled), (8, true));
}

#[test]
fn a_front_end_output_of_a_size_the_library_does_not_know_is_not_written() {
    let mut fe = storage(vhu_frontend_size());
    let fe = fe.as_mut_ptr().cast();
    let cfg = vhu_frontend_config::default();
    // SAFETY: storage of the front-end's size; a live config.
    let r = unsafe { vhu_frontend_init(fe, vhu_frontend_size(), &cfg) };
    assert_eq!(r, VHU_OK);
    let mut buf = vec![0u8; VHU_FRONTEND_MAX_TRANSMIT as usize];
    // GET_FEATURES, the handshake's first message; an unknown size leaves
    // it queued.
    let tx = writes_at_its_size("vhu_transmit", VHU_OK, |tx| {
        // SAFETY: a live front-end and buffer; `tx` is the caller's.
        unsafe { vhu_frontend_poll_transmit(fe, buf.as_mut_ptr(), buf.len(), tx) }
    });
    assert_eq!((tx.request, tx.len), (1, 12));
    let ev = writes_at_its_size("vhu_event", VHU_OK, |ev| {
        // SAFETY: a live front-end; `ev` is the caller's.
        unsafe { vhu_frontend_poll_event(fe, ev) }
    });
    assert_eq!(ev.kind, vhu_event_kind::VHU_EVENT_NONE);
    // Before the handshake the back-end channel is not served, and the
    // notice says nothing.
    let msg = [2u8, 0, 0, 0, 1 | 8, 0, 0, 0, 0, 0, 0, 0];
    let mut ack = [0u8; VHU_FRONTEND_MAX_ACK as usize];
    let n = writes_at_its_size("vhu_backend_notice", VHU_ERR_BUSY, |out| {
        // SAFETY: a live front-end, message and ack; `out` is the caller's.
        unsafe {
            vhu_frontend_serve_backend(
                fe,
                msg.as_ptr(),
                msg.len(),
                0,
                ack.as_mut_ptr(),
                ack.len(),
                out,
            )
        }
    });
    assert_eq!((n.kind, n.ack_len), (vhu_notice_kind::VHU_NOTICE_NONE, 0));
}

#[test]
fn a_blk_op_of_a_size_the_library_does_not_know_is_not_written() {
    let mut blk = storage(vhu_blk_size());
    let blk = blk.as_mut_ptr().cast();
    let cfg = vhu_blk_config {
        capacity: 8,
        blk_size: 512,
        num_queues: 1,
        ..Default::default()
    };
    let mut req = storage(vhu_blk_request_size());
    let req = req.as_mut_ptr().cast();
    // A chain of one buffer: too short for a request header.
    let guest = Guest::new();
    let mem = guest.table();
    let seg = vhu_segment {
        addr: 0,
        len: 4,
        writable: false,
    };
    // SAFETY: storage of each state's size; a live config, segment and
    // table.
    unsafe {
        assert_eq!(vhu_blk_init(blk, vhu_blk_size(), &cfg), VHU_OK);
        assert_eq!(vhu_blk_request_init(req, vhu_blk_request_size()), VHU_OK);
        assert_eq!(vhu_blk_plan(blk, &seg, 1, &mem, req), VHU_OK);
    }
    let op = writes_at_its_size("vhu_blk_op", VHU_OK, |out| {
        // SAFETY: a live request plan; `out` is the caller's.
        unsafe { vhu_blk_request_op(req, out) }
    });
    assert_eq!(op.kind, vhu_blk_op_kind::VHU_BLK_FAIL);
}

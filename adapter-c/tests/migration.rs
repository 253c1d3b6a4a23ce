//! Migration through the C ABI. The dirty log: `vhu_log_mark`,
//! `vhu_log_mark_written` and `vhu_dataplane_log_used` set exactly the
//! bits of the pages named, refuse (setting none) what the log does not
//! cover, and refuse a log given as callbacks (no atomic OR). The device
//! state: SET_DEVICE_STATE_FD's action and CHECK_DEVICE_STATE's pending
//! reply, answered by `vhu_backend_finish_transfer`; a blk state saved
//! with its inflight area and loaded into another device's area, or
//! refused whole. And the features of the library's `migration` feature.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::ffi::c_void;
use core::ptr;

use vhost_user_c::backend::*;
use vhost_user_c::blk::*;
use vhost_user_c::dataplane::*;
use vhost_user_c::log::*;
use vhost_user_c::memory::{vhu_mem, vhu_mem_ops, vhu_region};
use vhost_user_c::vhu_result::{self, *};

const PAGE: u64 = 4096;

/// A log of `bytes` bytes of bitmap, as a table of one region at 0.
struct Log(Vec<u8>);

impl Log {
    fn new(bytes: usize) -> Log {
        Log(vec![0; bytes])
    }
    fn region(&mut self) -> vhu_region {
        vhu_region {
            gpa: 0,
            size: self.0.len() as u64,
            host: self.0.as_mut_ptr(),
        }
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    /// The pages whose bits are set.
    fn pages(&self) -> Vec<u64> {
        (0..self.0.len() as u64 * 8)
            .filter(|p| self.0[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    }
}

fn table(r: &vhu_region) -> vhu_mem {
    vhu_mem {
        regions: r,
        count: 1,
        ops: ptr::null(),
    }
}

fn mark(log: &mut Log, gpa: u64, len: u64) -> (vhu_result, u64) {
    let r = log.region();
    let size = log.size();
    let mut pages = 0u64;
    // SAFETY: the table maps the log's bytes, alive for the call; `pages`
    // is a live u64.
    let res = unsafe { vhu_log_mark(&table(&r), size, gpa, len, &mut pages) };
    (res, pages)
}

#[test]
fn a_range_marks_the_pages_it_touches() {
    let mut log = Log::new(4);
    // One byte of page 3; a range from the end of page 5 into page 6; an
    // empty range (nothing); 9 pages across a byte boundary.
    assert_eq!(mark(&mut log, 3 * PAGE + 7, 1), (VHU_OK, 1));
    assert_eq!(mark(&mut log, 6 * PAGE - 1, 2), (VHU_OK, 2));
    assert_eq!(mark(&mut log, 20 * PAGE, 0), (VHU_OK, 0));
    assert_eq!(log.pages(), [3, 5, 6]);
    assert_eq!(mark(&mut log, 14 * PAGE, 9 * PAGE), (VHU_OK, 9));
    assert_eq!(log.pages(), [3, 5, 6, 14, 15, 16, 17, 18, 19, 20, 21, 22]);
    // Bits already set stay set; others are untouched.
    assert_eq!(mark(&mut log, 3 * PAGE, 1), (VHU_OK, 1));
    assert_eq!(log.0[0], 0b0110_1000);
    // `pages` may be NULL.
    let r = log.region();
    // SAFETY: as in `mark`.
    let res = unsafe { vhu_log_mark(&table(&r), 4, 31 * PAGE, 1, ptr::null_mut()) };
    assert_eq!(res, VHU_OK);
    assert_eq!(log.pages().last(), Some(&31));
}

#[test]
fn what_the_log_does_not_cover_is_refused_whole() {
    let mut log = Log::new(2);
    // Pages 0 to 15 have bits: a range ending on page 16 sets none.
    assert_eq!(mark(&mut log, 15 * PAGE, 2 * PAGE).0, VHU_ERR_MEMORY);
    assert_eq!(mark(&mut log, u64::MAX - 10, 100).0, VHU_ERR_INVALID);
    assert!(log.pages().is_empty());
    // A size larger than the table maps: refused at the unmapped byte.
    let r = log.region();
    // SAFETY: as in `mark`; the call reads no byte past the table's.
    let res = unsafe { vhu_log_mark(&table(&r), 64, 40 * PAGE, 1, ptr::null_mut()) };
    assert_eq!(res, VHU_ERR_MEMORY);
    // SAFETY: a NULL log is refused before anything is read.
    let res = unsafe { vhu_log_mark(ptr::null(), 2, 0, 1, ptr::null_mut()) };
    assert_eq!(res, VHU_ERR_NULL);
    assert!(log.pages().is_empty());
}

unsafe extern "C" fn cb_read(_: *mut c_void, _: u64, _: *mut u8, _: usize) -> bool {
    true
}
unsafe extern "C" fn cb_write(_: *mut c_void, _: u64, _: *const u8, _: usize) -> bool {
    true
}
unsafe extern "C" fn cb_load(_: *mut c_void, _: u64, out: *mut u16) -> bool {
    // SAFETY: the library hands a live u16.
    unsafe { out.write(0) };
    true
}
unsafe extern "C" fn cb_store(_: *mut c_void, _: u64, _: u16) -> bool {
    true
}
unsafe extern "C" fn cb_check(_: *mut c_void, _: u64, _: u64) -> bool {
    true
}

#[test]
fn a_log_given_as_callbacks_is_refused() {
    let ops = vhu_mem_ops {
        struct_size: size_of::<vhu_mem_ops>(),
        ctx: ptr::null_mut(),
        read: Some(cb_read),
        write: Some(cb_write),
        load_u16_acquire: Some(cb_load),
        store_u16_release: Some(cb_store),
        check: Some(cb_check),
    };
    let mem = vhu_mem {
        regions: ptr::null(),
        count: 0,
        ops: &ops,
    };
    // SAFETY: the callbacks touch nothing.
    let res = unsafe { vhu_log_mark(&mem, 16, 0, 1, ptr::null_mut()) };
    assert_eq!(res, VHU_ERR_UNSUPPORTED);
}

/// A back-end session of one queue offering `features` and `protocol`, in
/// its storage, and what `vhu_backend_init` said.
fn session(features: u64, protocol: u64) -> (Vec<u64>, vhu_result) {
    let cfg = vhu_backend_config {
        struct_size: size_of::<vhu_backend_config>(),
        features,
        protocol_features: protocol,
        num_queues: 1,
        max_queue_size: 256,
    };
    let mut s = vec![0u64; vhu_backend_size() / 8 + 8];
    assert!(vhu_backend_align() <= 8);
    // SAFETY: storage of the session's size, aligned to 8 (checked).
    let r = unsafe { vhu_backend_init(s.as_mut_ptr().cast(), vhu_backend_size(), &cfg) };
    (s, r)
}

fn seg(addr: u64, len: u32, writable: bool) -> vhu_segment {
    vhu_segment {
        addr,
        len,
        writable,
    }
}

fn mark_written(log: &mut Log, segs: &[vhu_segment], written: u32) -> (vhu_result, u64) {
    let r = log.region();
    let size = log.size();
    let mut pages = 0u64;
    // SAFETY: the table maps the log; `segs` and `pages` are live.
    let res = unsafe {
        vhu_log_mark_written(
            &table(&r),
            size,
            segs.as_ptr(),
            segs.len(),
            written,
            &mut pages,
        )
    };
    (res, pages)
}

#[test]
fn a_chain_marks_what_the_device_wrote_into_its_writable_buffers() {
    // A blk read: header (readable, page 1), 8 KiB of data from the middle
    // of page 4 (pages 4 to 6), the status byte on page 9.
    let chain = [
        seg(PAGE, 16, false),
        seg(4 * PAGE + 0x800, 8192, true),
        seg(9 * PAGE, 1, true),
    ];
    let mut log = Log::new(4);
    assert_eq!(mark_written(&mut log, &chain, 8193), (VHU_OK, 4));
    assert_eq!(log.pages(), [4, 5, 6, 9]);

    // A short used length: only the bytes it covers, in order.
    let mut log = Log::new(4);
    assert_eq!(mark_written(&mut log, &chain, 0x800), (VHU_OK, 1));
    assert_eq!(log.pages(), [4]);
    // Nothing written: nothing marked; readable buffers never are.
    assert_eq!(mark_written(&mut log, &chain[..1], 0), (VHU_OK, 0));
    assert_eq!(log.pages(), [4]);

    // More than the writable buffers hold: refused, nothing marked.
    let mut log = Log::new(4);
    assert_eq!(mark_written(&mut log, &chain, 8194).0, VHU_ERR_INVALID);
    assert_eq!(mark_written(&mut log, &chain[..1], 1).0, VHU_ERR_INVALID);
    // A buffer beyond the log.
    let far = [seg(PAGE, 16, false), seg(64 * PAGE, 16, true)];
    assert_eq!(mark_written(&mut log, &far, 16).0, VHU_ERR_MEMORY);
    assert!(log.pages().is_empty());
    // One beyond the log after one within it: refused whole, the first
    // left unmarked too.
    let split = [seg(4 * PAGE, 16, true), seg(64 * PAGE, 16, true)];
    assert_eq!(mark_written(&mut log, &split, 32).0, VHU_ERR_MEMORY);
    assert!(log.pages().is_empty());
    // The same chain with the used length inside its first buffer: the
    // second is not written, so not looked at.
    assert_eq!(mark_written(&mut log, &split, 16), (VHU_OK, 1));
    assert_eq!(log.pages(), [4]);
}

/// A split ring of 8 entries: descriptors on page 0, avail ring on page
/// 1, used ring on page 2 (a used ring of 8 spans 70 bytes).
#[test]
fn a_ring_marks_its_used_ring_at_its_log_address() {
    const SIZE: u16 = 8;
    let mut guest = vec![0u64; 0x3000 / 8];
    let region = vhu_region {
        gpa: 0,
        size: 0x3000,
        host: guest.as_mut_ptr().cast(),
    };
    let mem = table(&region);
    let cfg = vhu_ring_config {
        struct_size: size_of::<vhu_ring_config>(),
        size: SIZE,
        addrs: vhu_ring_addrs {
            desc: 0,
            driver: 0x1000,
            device: 0x2000,
        },
        features: VHU_VIRTIO_F_VERSION_1,
        base: 0,
        enabled: 1,
        consume_disabled: 0,
        inflight_offset: 0,
    };
    let mut s = vec![0u64; vhu_dataplane_size(SIZE) / 8 + 1];
    let dp: *mut vhu_dataplane = s.as_mut_ptr().cast();
    let mut log = Log::new(8);
    let r = log.region();
    let size = log.size();
    let mut pages = 0u64;
    // SAFETY: storage of the data plane's size, aligned to 8; the tables
    // map `guest` and the log, alive throughout.
    unsafe {
        let res = vhu_dataplane_init(dp, vhu_dataplane_size(SIZE), &cfg, &mem, ptr::null());
        assert_eq!(res, VHU_OK);
        // The front-end names the used ring's guest address; a log address
        // elsewhere (a used ring the front-end maps at another guest
        // address) is marked there, across a page boundary.
        let res = vhu_dataplane_log_used(dp, &table(&r), size, 0x2000, &mut pages);
        assert_eq!((res, pages), (VHU_OK, 1));
        assert_eq!(log.pages(), [2]);
        let res = vhu_dataplane_log_used(dp, &table(&r), size, 0x7ff0, ptr::null_mut());
        assert_eq!(res, VHU_OK);
        assert_eq!(log.pages(), [2, 7, 8]);
        // Beyond the log: refused, nothing more set.
        let res = vhu_dataplane_log_used(dp, &table(&r), size, 64 * PAGE, &mut pages);
        assert_eq!(res, VHU_ERR_MEMORY);
        assert_eq!(log.pages(), [2, 7, 8]);
        assert_eq!(pages, 1);
        // Not a data plane.
        let mut junk = vec![0u64; vhu_dataplane_size(SIZE) / 8 + 1];
        let res = vhu_dataplane_log_used(
            junk.as_mut_ptr().cast(),
            &table(&r),
            size,
            0x2000,
            ptr::null_mut(),
        );
        assert_eq!(res, VHU_ERR_STATE);
    }
}

#[test]
fn the_dirty_log_is_offered_with_the_migration_feature() {
    let v = vhu_backend_supported_features();
    let p = vhu_backend_supported_protocol_features();
    let on = cfg!(feature = "migration");
    assert_eq!(v & VHU_F_LOG_ALL != 0, on);
    assert_eq!(p & VHU_PROTOCOL_F_LOG_SHMFD != 0, on);
    // LOG_ALL without LOG_SHMFD is refused (there would be no log).
    let features = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES | VHU_F_LOG_ALL;
    let (_, r) = session(features, VHU_PROTOCOL_F_MQ);
    assert_eq!(r, VHU_ERR_UNSUPPORTED);
    let (mut s, r) = session(features, VHU_PROTOCOL_F_MQ | VHU_PROTOCOL_F_LOG_SHMFD);
    assert_eq!(r, if on { VHU_OK } else { VHU_ERR_UNSUPPORTED });
    let be: *mut vhu_backend = s.as_mut_ptr().cast();
    // SAFETY: the session's storage, alive.
    unsafe {
        if on {
            // A ring that was never configured is not logged; a queue the
            // device lacks is refused.
            let (mut logged, mut at) = (true, 1u64);
            let r = vhu_backend_ring_log(be, 0, &mut logged, &mut at);
            assert_eq!((r, logged, at), (VHU_OK, false, 0));
            let r = vhu_backend_ring_log(be, 1, &mut logged, &mut at);
            assert_eq!(r, VHU_ERR_QUEUE);
        }
    }
}

/// A blk device of `capacity` sectors with FLUSH and CONFIG_WCE
/// negotiated (the driver's cache mode is part of its state).
fn blk(capacity: u64) -> Vec<u64> {
    let mut s = vec![0u64; vhu_blk_size() / 8 + 8];
    let cfg = vhu_blk_config {
        capacity,
        blk_size: 512,
        num_queues: 1,
        seg_max: 14,
        flush: 1,
        config_wce: 1,
        writeback: 1,
        ..Default::default()
    };
    // SAFETY: storage of the device's size, aligned to 8 (checked).
    unsafe {
        assert!(vhu_blk_align() <= 8);
        assert_eq!(
            vhu_blk_init(s.as_mut_ptr().cast(), vhu_blk_size(), &cfg),
            VHU_OK
        );
    }
    s
}

/// An inflight area of 1 queue of 16 entries, as a table: a 32-byte
/// header and 32 bytes per entry, 544, aligned to 64 bytes.
struct Area(Vec<u8>, vhu_region);

impl Area {
    fn new(fill: u8) -> Area {
        let mut b = vec![fill; 576];
        let r = vhu_region {
            gpa: 0,
            size: b.len() as u64,
            host: b.as_mut_ptr(),
        };
        Area(b, r)
    }
    fn mem(&self) -> vhu_mem {
        table(&self.1)
    }
}

#[test]
fn a_blk_state_carries_the_inflight_area_or_is_refused_whole() {
    let mut src = blk(2048);
    let src_area = Area::new(0);
    // Recognisable bytes in the source's area.
    // SAFETY: the area's bytes are the test's own.
    unsafe {
        for i in 0..src_area.0.len() {
            *src_area.1.host.add(i) = (i * 7 + 1) as u8;
        }
    }
    let mut need = 0usize;
    // SAFETY: live out-value.
    let r = unsafe { vhu_blk_state_size(src_area.0.len(), &mut need) };
    assert_eq!(r, VHU_OK);
    let mut buf = vec![0u8; need];
    let mut len = 0usize;
    let a = src_area.mem();
    // SAFETY: live device, table and buffers.
    unsafe {
        let r = vhu_blk_save_state(
            src.as_mut_ptr().cast(),
            &a,
            1,
            16,
            buf.as_mut_ptr(),
            10,
            &mut len,
        );
        assert_eq!(r, VHU_ERR_SHORT_BUFFER);
        let r = vhu_blk_save_state(
            src.as_mut_ptr().cast(),
            &a,
            1,
            16,
            buf.as_mut_ptr(),
            need,
            &mut len,
        );
        assert_eq!((r, len), (VHU_OK, need));
        // No area: a layout without a table, or a table without one, is
        // refused.
        let r = vhu_blk_save_state(
            src.as_mut_ptr().cast(),
            ptr::null(),
            1,
            16,
            buf.as_mut_ptr(),
            need,
            &mut len,
        );
        assert_eq!(r, VHU_ERR_INVALID);
    }
    assert_eq!(&buf[..8], b"vhu-blk\0");
    assert_eq!(&buf[40..40 + src_area.0.len()], &src_area.0[..]);

    let mut dst = blk(2048);
    let dst_area = Area::new(0xaa);
    let d = dst_area.mem();
    let load = |dev: &mut Vec<u64>, bytes: &[u8], area: &vhu_mem, nq: u16| {
        // SAFETY: live device, state bytes and table.
        unsafe {
            vhu_blk_load_state(
                dev.as_mut_ptr().cast(),
                bytes.as_ptr(),
                bytes.len(),
                area,
                nq,
                16,
            )
        }
    };
    // Refused whole, the area untouched: a flipped byte, another layout,
    // another disk size, a state that is not one.
    let mut flipped = buf.clone();
    flipped[50] ^= 1;
    assert_eq!(load(&mut dst, &flipped, &d, 1), VHU_ERR_INVALID);
    assert_eq!(load(&mut dst, &buf, &d, 2), VHU_ERR_INVALID);
    assert_eq!(load(&mut blk(4096), &buf, &d, 1), VHU_ERR_INVALID);
    assert_eq!(load(&mut dst, b"vhu-blk", &d, 1), VHU_ERR_INVALID);
    assert!(dst_area.0.iter().all(|b| *b == 0xaa));
    // A table that does not map the area's bytes.
    let short = vhu_region {
        size: 8,
        ..dst_area.1
    };
    assert_eq!(load(&mut dst, &buf, &table(&short), 1), VHU_ERR_INFLIGHT);
    assert!(dst_area.0.iter().all(|b| *b == 0xaa));
    // Taken: the source's area is the destination's.
    assert_eq!(load(&mut dst, &buf, &d, 1), VHU_OK);
    assert_eq!(dst_area.0, src_area.0);
}

/// A vhost-user message: header (version 1) and payload.
fn message(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// The back-end's outcome of `msg` with `nfds` fds, its reply's u64 (if
/// ready) and its first action.
fn handle(be: *mut vhu_backend, msg: &[u8], nfds: usize) -> (vhu_outcome, Option<u64>, vhu_action) {
    let mut reply = vec![0u8; VHU_MAX_MESSAGE as usize];
    let mut out = vhu_outcome::default();
    let mut a = vhu_action::default();
    // SAFETY: live session; the message, reply and out-values are live.
    unsafe {
        let r = vhu_backend_handle(
            be,
            msg.as_ptr(),
            msg.len(),
            nfds,
            ptr::null(),
            ptr::null(),
            reply.as_mut_ptr(),
            reply.len(),
            &mut out,
        );
        assert_eq!(r, VHU_OK);
        if out.actions > 0 {
            assert_eq!(vhu_backend_action(be, 0, &mut a), VHU_OK);
        }
    }
    let v = (out.reply == vhu_reply_kind::VHU_REPLY_READY && out.reply_len == 20)
        .then(|| u64::from_le_bytes(reply[12..20].try_into().unwrap()));
    (out, v, a)
}

#[test]
fn a_device_state_transfer_through_the_session() {
    if !cfg!(feature = "migration") {
        return;
    }
    const SET_FEATURES: u32 = 2;
    const SET_PROTOCOL_FEATURES: u32 = 16;
    const SET_DEVICE_STATE_FD: u32 = 42;
    const CHECK_DEVICE_STATE: u32 = 43;
    let features = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES;
    let (mut s, r) = session(features, VHU_PROTOCOL_F_DEVICE_STATE);
    assert_eq!(r, VHU_OK);
    let be: *mut vhu_backend = s.as_mut_ptr().cast();
    let features = features.to_le_bytes();
    handle(be, &message(SET_FEATURES, &features), 0);
    handle(
        be,
        &message(
            SET_PROTOCOL_FEATURES,
            &VHU_PROTOCOL_F_DEVICE_STATE.to_le_bytes(),
        ),
        0,
    );
    // Nothing to check yet: an error.
    let (_, v, _) = handle(be, &message(CHECK_DEVICE_STATE, &[]), 0);
    assert_eq!(v, Some(1));
    let mut reply = [0u8; 64];
    let mut n = 0usize;
    // SAFETY: live session and buffers.
    let r =
        unsafe { vhu_backend_finish_transfer(be, true, reply.as_mut_ptr(), reply.len(), &mut n) };
    assert_eq!(r, VHU_ERR_STATE, "no transfer");

    for (save, ok) in [(true, true), (false, false)] {
        // Direction (0 save, 1 load) and phase (0 stopped).
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&u32::from(!save).to_le_bytes());
        let (out, v, a) = handle(be, &message(SET_DEVICE_STATE_FD, &p), 1);
        assert_eq!(v, Some(0x100), "ok, no fd of the back-end's");
        assert_eq!(out.actions, 1);
        assert_eq!(
            (a.kind, a.fd, a.flag),
            (vhu_action_kind::VHU_ACTION_TRANSFER_STATE, 0, save)
        );
        // A second one before the check: refused (error, no fd).
        let (out, v, _) = handle(be, &message(SET_DEVICE_STATE_FD, &p), 1);
        assert_eq!((out.actions, v), (0, Some(0x101)));
        let (out, _, _) = handle(be, &message(CHECK_DEVICE_STATE, &[]), 0);
        assert_eq!(out.reply, vhu_reply_kind::VHU_REPLY_TRANSFER_PENDING);
        // SAFETY: live session and buffers.
        let r = unsafe { vhu_backend_finish_transfer(be, ok, reply.as_mut_ptr(), 8, &mut n) };
        assert_eq!(r, VHU_ERR_SHORT_BUFFER);
        // SAFETY: as above.
        let r =
            unsafe { vhu_backend_finish_transfer(be, ok, reply.as_mut_ptr(), reply.len(), &mut n) };
        assert_eq!((r, n), (VHU_OK, 20));
        assert_eq!(
            u32::from_le_bytes(reply[..4].try_into().unwrap()),
            CHECK_DEVICE_STATE
        );
        let v = u64::from_le_bytes(reply[12..20].try_into().unwrap());
        assert_eq!(v, u64::from(!ok), "0: the transfer went well");
    }
}

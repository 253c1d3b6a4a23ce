//! A call holds references into the state it enters and into the buffers
//! it reads or writes; an output pointer, a buffer or a guest memory
//! region of C's that shares a byte with any of those would make the
//! library write under its own live reference. Each is refused with
//! `VHU_ERR_INVALID` before anything is written, and a neighbour that
//! begins right after a state's or a buffer's last byte is still taken.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::mem::size_of;
use core::ptr;

use vhost_user_c::backend::*;
use vhost_user_c::blk::*;
use vhost_user_c::dataplane::*;
use vhost_user_c::frontend::*;
use vhost_user_c::memory::{vhu_mem, vhu_mem_region, vhu_region};
use vhost_user_c::vhu_result::{self, *};

/// Zeroed storage aligned to 64 (more than any state needs) with
/// `extra` bytes of room after `size`, and pointers into it.
struct Storage(Vec<u64>);

impl Storage {
    fn new(size: usize, extra: usize) -> Storage {
        Storage(vec![0u64; (size + extra) / 8 + 16])
    }
    fn at<T>(&mut self, off: usize) -> *mut T {
        let base = self.0.as_mut_ptr().cast::<u8>();
        base.wrapping_add(base.align_offset(64) + off).cast()
    }
}

fn blk_config() -> vhu_blk_config {
    vhu_blk_config {
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
    }
}

/// `vhu_blk_offered_features` with its output at `off` bytes of a blk
/// device's storage.
fn offered_features_at(off: usize) -> (vhu_result, u64) {
    let size = vhu_blk_size();
    let mut s = Storage::new(size, 64);
    let blk: *mut vhu_blk = s.at(0);
    // SAFETY: storage of the device's size and 64 bytes more, aligned;
    // `off` is 8-aligned and 8 bytes fit at it inside the storage.
    unsafe {
        assert_eq!(vhu_blk_init(blk, size, &blk_config()), VHU_OK);
        let out: *mut u64 = s.at(off);
        let r = vhu_blk_offered_features(blk, out);
        (r, out.read())
    }
}

#[test]
fn an_output_in_the_state_the_call_enters_is_refused() {
    let size = vhu_blk_size();
    assert_eq!(size % 8, 0);
    // Over the tag word, and over the value's last bytes.
    assert_eq!(offered_features_at(0).0, VHU_ERR_INVALID);
    assert_eq!(offered_features_at(size - 8).0, VHU_ERR_INVALID);
    // Right after the state's last byte: taken.
    let (r, bits) = offered_features_at(size);
    assert_eq!(r, VHU_OK);
    assert_ne!(bits, 0);

    // The same rule for every kind of state: a back-end session's
    // features, with one output inside it and one outside.
    let cfg = vhu_backend_config {
        struct_size: size_of::<vhu_backend_config>(),
        features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
        protocol_features: VHU_PROTOCOL_F_MQ,
        num_queues: 1,
        max_queue_size: 64,
    };
    let size = vhu_backend_size();
    let mut s = Storage::new(size, 64);
    let be: *mut vhu_backend = s.at(0);
    let mut outside = 0u64;
    // SAFETY: storage of the session's size and more, aligned; the
    // outputs are 8 writable bytes inside it or a live value.
    unsafe {
        assert_eq!(vhu_backend_init(be, size, &cfg), VHU_OK);
        let inside: *mut u64 = s.at(size / 2 / 8 * 8);
        let r = vhu_backend_features(be, &mut outside, inside);
        assert_eq!(r, VHU_ERR_INVALID);
        let after: *mut u64 = s.at(size);
        assert_eq!(vhu_backend_features(be, &mut outside, after), VHU_OK);
    }
}

/// A data plane's storage is its fixed part and, after it, its token
/// table: an output over the table is inside the state as much as one
/// over the fixed part.
#[test]
fn an_output_in_a_data_planes_token_table_is_refused() {
    let mut g = Guest::new();
    let regions = [g.region()];
    let mem = table(&regions);
    let size = vhu_dataplane_size(SIZE);
    let table_at = vhu_dataplane_size(0);
    assert!(size - table_at >= size_of::<vhu_dataplane_info>());
    let mut s = Storage::new(size, 256);
    let dp: *mut vhu_dataplane = s.at(0);
    // SAFETY: storage of the data plane's size and more, aligned; the
    // outputs fit in the storage at 8-aligned offsets (the table's offset
    // and the size are multiples of 8).
    unsafe {
        assert_eq!(
            vhu_dataplane_init(dp, size, &config(), &mem, ptr::null()),
            VHU_OK
        );
        // Refused before its `struct_size` (the table's bytes) is read.
        let r = vhu_dataplane_get_info(dp, s.at(table_at));
        assert_eq!(r, VHU_ERR_INVALID);
        let info: *mut vhu_dataplane_info = s.at(size);
        info.write(vhu_dataplane_info::default());
        let r = vhu_dataplane_get_info(dp, info);
        assert_eq!(r, VHU_OK);
        assert_eq!((*info).size, SIZE);
    }
}

/// A call's outputs are apart from each other and from what it reads:
/// an outcome inside the reply buffer of the same message, a transmit
/// description inside the message buffer it describes.
#[test]
fn outputs_that_overlap_another_buffer_of_the_call_are_refused() {
    let cfg = vhu_backend_config {
        struct_size: size_of::<vhu_backend_config>(),
        features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
        protocol_features: VHU_PROTOCOL_F_MQ,
        num_queues: 1,
        max_queue_size: 64,
    };
    let mut s = Storage::new(vhu_backend_size(), 0);
    let be: *mut vhu_backend = s.at(0);
    // GET_FEATURES: request 1, version 1, no payload.
    let msg = [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let cap = VHU_MAX_MESSAGE as usize;
    let mut buf = vec![0u64; (cap + size_of::<vhu_outcome>()) / 8 + 1];
    let reply = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: storage of the session's size, aligned; a live message;
    // `buf` holds the reply and an outcome at any 8-aligned offset up to
    // `cap`.
    unsafe {
        assert_eq!(vhu_backend_init(be, vhu_backend_size(), &cfg), VHU_OK);
        let handle = |reply_cap: usize, out: *mut vhu_outcome| {
            vhu_backend_handle(
                be,
                msg.as_ptr(),
                msg.len(),
                0,
                ptr::null(),
                ptr::null(),
                reply,
                reply_cap,
                out,
            )
        };
        // The outcome over the reply's first bytes.
        let out = reply.add(16).cast::<vhu_outcome>();
        out.write(vhu_outcome::default());
        assert_eq!(handle(cap, out), VHU_ERR_INVALID);
        // The reply buffer ends where the outcome begins: taken.
        let out = reply.add(24).cast::<vhu_outcome>();
        out.write(vhu_outcome::default());
        assert_eq!(handle(24, out), VHU_OK);
        assert_eq!((*out).reply, vhu_reply_kind::VHU_REPLY_READY);
        assert_eq!((*out).reply_len, 20);
    }

    let mut f = Storage::new(vhu_frontend_size(), 0);
    let fe: *mut vhu_frontend = f.at(0);
    let queues = [vhu_queue_config {
        size: 64,
        addrs: vhu_ring_addrs {
            desc: 0x1_0000,
            driver: 0x1_1000,
            device: 0x1_2000,
        },
        base: 0,
        kick_polling: 1,
        call_polling: 1,
    }];
    let regions = [vhu_mem_region {
        guest_addr: 0,
        size: 0x4000,
        user_addr: 0x1_0000,
        mmap_offset: 0,
    }];
    let fcfg = vhu_frontend_config {
        struct_size: size_of::<vhu_frontend_config>(),
        features: VHU_VIRTIO_F_VERSION_1,
        protocol_features: 0,
        queues: queues.as_ptr(),
        num_queues: 1,
        regions: regions.as_ptr(),
        num_regions: 1,
    };
    let cap = VHU_FRONTEND_MAX_TRANSMIT as usize;
    let mut buf = vec![0u64; (cap + size_of::<vhu_transmit>()) / 8 + 1];
    let tx_buf = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: storage of the front-end's size, aligned; `buf` holds the
    // message and a transmit description at any 8-aligned offset up to
    // `cap`.
    unsafe {
        assert_eq!(vhu_frontend_init(fe, vhu_frontend_size(), &fcfg), VHU_OK);
        let tx = tx_buf.add(8).cast::<vhu_transmit>();
        tx.write(vhu_transmit::default());
        assert_eq!(
            vhu_frontend_poll_transmit(fe, tx_buf, cap, tx),
            VHU_ERR_INVALID
        );
        let tx = tx_buf.add(cap.next_multiple_of(8)).cast::<vhu_transmit>();
        tx.write(vhu_transmit::default());
        assert_eq!(vhu_frontend_poll_transmit(fe, tx_buf, cap, tx), VHU_OK);
        assert_eq!((*tx).len, 12);
    }
}

const SIZE: u16 = 8;
const DESC: usize = 0;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
const BUF: usize = 0x3000;

/// Guest memory with one chain of one writable 16-byte buffer available.
struct Guest(Vec<u64>);

impl Guest {
    fn new() -> Guest {
        let mut g = Guest(vec![0; 0x4000 / 8]);
        g.put(DESC, &(BUF as u64).to_le_bytes());
        g.put(DESC + 8, &16u32.to_le_bytes());
        g.put(DESC + 12, &2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
        g.put(AVAIL + 2, &1u16.to_le_bytes());
        g
    }
    fn put(&mut self, at: usize, b: &[u8]) {
        let p = self.0.as_mut_ptr().cast::<u8>();
        assert!(at + b.len() <= self.0.len() * 8);
        // SAFETY: in bounds of the guest's bytes (checked).
        unsafe { ptr::copy_nonoverlapping(b.as_ptr(), p.add(at), b.len()) };
    }
    fn region(&mut self) -> vhu_region {
        vhu_region {
            gpa: 0,
            size: self.0.len() as u64 * 8,
            host: self.0.as_mut_ptr().cast(),
        }
    }
}

fn table(regions: &[vhu_region]) -> vhu_mem {
    vhu_mem {
        regions: regions.as_ptr(),
        count: regions.len(),
        ops: ptr::null(),
    }
}

fn config() -> vhu_ring_config {
    vhu_ring_config {
        struct_size: size_of::<vhu_ring_config>(),
        size: SIZE,
        addrs: vhu_ring_addrs {
            desc: DESC as u64,
            driver: AVAIL as u64,
            device: USED as u64,
        },
        features: VHU_VIRTIO_F_VERSION_1,
        base: 0,
        enabled: 1,
        consume_disabled: 0,
        inflight_offset: 0,
    }
}

/// A pop over `regions` into the given segment buffer.
fn pop(dp: *mut vhu_dataplane, regions: &[vhu_region], segs: &mut [vhu_segment]) -> vhu_result {
    let mem = table(regions);
    let mut t = vhu_token {
        handle: 0,
        id: 0,
        side_effects: false,
        ..Default::default()
    };
    let mut n = 0;
    // SAFETY: a live data plane, table and out-buffers of the stated sizes.
    unsafe {
        vhu_dataplane_pop(
            dp,
            &mem,
            ptr::null(),
            &mut t,
            segs.as_mut_ptr(),
            segs.len(),
            &mut n,
        )
    }
}

/// A guest memory table whose host range covers the data plane's own
/// storage, or the segment buffer the pop writes, is refused: the
/// library would copy guest bytes over what it holds references to. A
/// region that begins right after the storage's last byte is taken.
#[test]
fn a_memory_table_over_the_librarys_own_bytes_is_refused() {
    let mut g = Guest::new();
    let size = vhu_dataplane_size(SIZE);
    let mut s = Storage::new(size, 256);
    let dp: *mut vhu_dataplane = s.at(0);
    let guest = g.region();
    // The table points into `regions`, which must outlive it.
    let regions = [guest];
    let mem = table(&regions);
    // SAFETY: storage of the data plane's size and more, aligned; a live
    // table.
    unsafe {
        assert_eq!(
            vhu_dataplane_init(dp, size, &config(), &mem, ptr::null()),
            VHU_OK
        );
    }
    let mut segs = [vhu_segment::default(); VHU_MAX_CHAIN as usize];
    // A second region (at a guest address the ring never uses) mapping
    // the data plane's token table.
    let over_state = vhu_region {
        gpa: 0x10_0000,
        size: 64,
        host: s.at(vhu_dataplane_size(0)),
    };
    assert_eq!(pop(dp, &[guest, over_state], &mut segs), VHU_ERR_INVALID);
    // One mapping the segment buffer.
    let over_segs = vhu_region {
        gpa: 0x10_0000,
        size: 16,
        host: segs.as_mut_ptr().cast(),
    };
    assert_eq!(pop(dp, &[guest, over_segs], &mut segs), VHU_ERR_INVALID);
    // Right after the storage: taken, and the chain is popped.
    let after = vhu_region {
        gpa: 0x10_0000,
        size: 256,
        host: s.at(size),
    };
    assert_eq!(pop(dp, &[guest, after], &mut segs), VHU_OK);
    assert_eq!(segs[0].addr, BUF as u64);

    // A blk plan whose table maps its request plan.
    let mut b = Storage::new(vhu_blk_size(), 0);
    let mut q = Storage::new(vhu_blk_request_size(), 0);
    let blk: *mut vhu_blk = b.at(0);
    let req: *mut vhu_blk_request = q.at(0);
    let chain = [vhu_segment {
        addr: BUF as u64,
        len: 16,
        writable: false,
    }];
    let over_req = [
        guest,
        vhu_region {
            gpa: 0x10_0000,
            size: 8,
            host: q.at(vhu_blk_request_size() - 8),
        },
    ];
    // SAFETY: storages of the sizes asked, aligned; live tables and
    // segments.
    unsafe {
        assert_eq!(vhu_blk_init(blk, vhu_blk_size(), &blk_config()), VHU_OK);
        assert_eq!(vhu_blk_request_init(req, vhu_blk_request_size()), VHU_OK);
        let r = vhu_blk_plan(blk, chain.as_ptr(), 1, &table(&over_req), req);
        assert_eq!(r, VHU_ERR_INVALID);
        assert_eq!(vhu_blk_plan(blk, chain.as_ptr(), 1, &mem, req), VHU_OK);
    }
}

/// A table over the message or the reply of a back-end message.
#[test]
fn a_memory_table_over_a_message_or_its_reply_is_refused() {
    let cfg = vhu_backend_config {
        struct_size: size_of::<vhu_backend_config>(),
        features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
        protocol_features: VHU_PROTOCOL_F_MQ,
        num_queues: 1,
        max_queue_size: 64,
    };
    let mut s = Storage::new(vhu_backend_size(), 0);
    let be: *mut vhu_backend = s.at(0);
    let mut msg = [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let mut reply = vec![0u8; VHU_MAX_MESSAGE as usize];
    let mut out = core::mem::MaybeUninit::new(vhu_outcome::default());
    let region = |host: *mut u8, size: u64| vhu_region { gpa: 0, size, host };
    let over_msg = [region(msg.as_mut_ptr(), 12)];
    let over_reply = [region(reply.as_mut_ptr().wrapping_add(100), 8)];
    let apart = [region(reply.as_mut_ptr().wrapping_add(reply.len()), 8)];
    // SAFETY: storage of the session's size, aligned; a live message,
    // reply and out-value; the tables' last entry is only compared (no
    // message here reads guest memory).
    unsafe {
        assert_eq!(vhu_backend_init(be, vhu_backend_size(), &cfg), VHU_OK);
        let mut handle = |regions: &[vhu_region], reply_cap: usize| {
            vhu_backend_handle(
                be,
                msg.as_ptr(),
                msg.len(),
                0,
                &table(regions),
                ptr::null(),
                reply.as_mut_ptr(),
                reply_cap,
                out.as_mut_ptr(),
            )
        };
        let cap = VHU_MAX_MESSAGE as usize;
        assert_eq!(handle(&over_msg, cap), VHU_ERR_INVALID);
        assert_eq!(handle(&over_reply, cap), VHU_ERR_INVALID);
        assert_eq!(handle(&apart, cap), VHU_OK);
    }
}

/// SET_FEATURES (2), version 1, 8 bytes: VERSION_1.
fn set_features() -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&2u32.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&VHU_VIRTIO_F_VERSION_1.to_le_bytes());
    msg
}

/// A message handled with a blk device's control path (`vhu_blk_device`)
/// runs the device's callbacks, which enter the blk device: its storage
/// is part of the call as much as the session's. A blk device inside the
/// reply buffer or the outcome is refused before anything is written (the
/// reply, the outcome and the device are byte for byte as they were, and
/// the session did not take the features); one right after the reply
/// buffer is taken.
#[test]
fn a_blk_device_over_a_messages_reply_or_outcome_is_refused() {
    let cfg = vhu_backend_config {
        struct_size: size_of::<vhu_backend_config>(),
        features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
        protocol_features: VHU_PROTOCOL_F_MQ,
        num_queues: 1,
        max_queue_size: 64,
    };
    let mut s = Storage::new(vhu_backend_size(), 0);
    let be: *mut vhu_backend = s.at(0);
    let msg = set_features();
    let cap = VHU_MAX_MESSAGE as usize;
    let blk_size = vhu_blk_size();
    let out_size = size_of::<vhu_outcome>();
    // The reply buffer, then room for a blk device or an outcome after it.
    let mut r = Storage::new(cap.next_multiple_of(64) + blk_size, 64);
    let reply: *mut u8 = r.at(0);
    let bytes = |p: *const u8, n: usize| {
        // SAFETY: `p` points at `n` bytes of the test's storage.
        unsafe { core::slice::from_raw_parts(p, n) }.to_vec()
    };
    let features = |be: *mut vhu_backend| {
        let mut f = u64::MAX;
        // SAFETY: a live session and out-value.
        let r = unsafe { vhu_backend_features(be, &mut f, ptr::null_mut()) };
        assert_eq!(r, VHU_OK);
        f
    };
    // SAFETY: storages of the sizes asked (the reply's storage holds the
    // reply and a blk device or an outcome at the 64-aligned offsets
    // used), aligned to 64; a live message and config.
    unsafe {
        assert_eq!(vhu_backend_init(be, vhu_backend_size(), &cfg), VHU_OK);
        let handle = |blk: *mut vhu_blk, reply_cap: usize, out: *mut vhu_outcome| {
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
            assert_eq!(vhu_blk_device(blk, &mut dev), VHU_OK);
            vhu_backend_handle(
                be,
                msg.as_ptr(),
                msg.len(),
                0,
                ptr::null(),
                &dev,
                reply,
                reply_cap,
                out,
            )
        };
        // The blk device inside the reply buffer.
        ptr::write_bytes(reply, 0x5a, cap.next_multiple_of(64) + blk_size);
        let blk: *mut vhu_blk = r.at(1024);
        assert_eq!(vhu_blk_init(blk, blk_size, &blk_config()), VHU_OK);
        let mut out = [0xa5u8; 64];
        let out_p = out.as_mut_ptr().cast::<vhu_outcome>();
        assert!(out_size <= out.len() && out_p.is_aligned());
        let before = bytes(reply, cap);
        assert_eq!(handle(blk, cap, out_p), VHU_ERR_INVALID);
        assert_eq!(bytes(reply, cap), before, "the reply or the device changed");
        assert!(out.iter().all(|&b| b == 0xa5), "the outcome was written");
        assert_eq!(features(be), 0, "the session took the message");

        // The blk device where the outcome is.
        let blk: *mut vhu_blk = r.at(cap.next_multiple_of(64));
        assert_eq!(vhu_blk_init(blk, blk_size, &blk_config()), VHU_OK);
        let before = bytes(blk.cast(), blk_size);
        let out_p = r.at::<vhu_outcome>(cap.next_multiple_of(64) + 64);
        let r = handle(blk, cap, out_p);
        assert_eq!(r, VHU_ERR_INVALID);
        assert_eq!(bytes(blk.cast(), blk_size), before, "the device changed");
        assert_eq!(features(be), 0, "the session took the message");

        // Right after the reply buffer: taken, and the device acked.
        let mut out = core::mem::MaybeUninit::new(vhu_outcome::default());
        assert_eq!(handle(blk, cap, out.as_mut_ptr()), VHU_OK);
        assert_eq!(features(be), VHU_VIRTIO_F_VERSION_1);
    }
}

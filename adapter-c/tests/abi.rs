//! The C ABI's checks on what C hands it, called through the exported
//! functions as C calls them: NULL, misaligned and short storage, storage
//! initialised as another kind of state, malformed message headers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::ptr;

use vhost_user_c::backend::*;
use vhost_user_c::blk::*;
use vhost_user_c::dataplane::*;
use vhost_user_c::frontend::*;
use vhost_user_c::memory::{vhu_mem, vhu_region};
use vhost_user_c::vhu_result::*;

/// Zeroed storage of `size` bytes aligned to 64 (more than any state
/// needs), and a pointer `skew` bytes into it.
struct Storage(Vec<u64>);

impl Storage {
    fn new(size: usize) -> Storage {
        Storage(vec![0u64; size / 8 + 16])
    }
    fn at<T>(&mut self, skew: usize) -> *mut T {
        let base = self.0.as_mut_ptr().cast::<u8>();
        let aligned = base.wrapping_add(base.align_offset(64));
        aligned.wrapping_add(skew).cast()
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

#[test]
fn init_checks_null_alignment_and_size() {
    let cfg = vhu_backend_config {
        struct_size: size_of::<vhu_backend_config>(),
        features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
        protocol_features: VHU_PROTOCOL_F_MQ,
        num_queues: 1,
        max_queue_size: 64,
    };
    let size = vhu_backend_size();
    let mut s = Storage::new(size);
    // SAFETY: each call: the storage holds `size` bytes past any skew
    // used; the config is a live value.
    unsafe {
        assert_eq!(vhu_backend_init(ptr::null_mut(), size, &cfg), VHU_ERR_NULL);
        assert_eq!(vhu_backend_init(s.at(1), size, &cfg), VHU_ERR_ALIGN);
        assert_eq!(vhu_backend_init(s.at(0), size - 1, &cfg), VHU_ERR_SIZE);
        assert_eq!(vhu_backend_init(s.at(0), size, ptr::null()), VHU_ERR_NULL);
        // More queues than the ABI's session has: refused.
        let many = vhu_backend_config {
            num_queues: VHU_MAX_QUEUES + 1,
            ..cfg
        };
        assert_eq!(vhu_backend_init(s.at(0), size, &many), VHU_ERR_UNSUPPORTED);
        assert_eq!(vhu_backend_init(s.at(0), size, &cfg), VHU_OK);
    }
    let bc = blk_config();
    let mut b = Storage::new(vhu_blk_size());
    // SAFETY: as above.
    unsafe {
        assert_eq!(vhu_blk_init(b.at(0), vhu_blk_size() - 1, &bc), VHU_ERR_SIZE);
        let bad = vhu_blk_config {
            blk_size: 1000,
            ..bc
        };
        assert_eq!(vhu_blk_init(b.at(0), vhu_blk_size(), &bad), VHU_ERR_CONFIG);
        assert_eq!(vhu_blk_init(b.at(0), vhu_blk_size(), &bc), VHU_OK);
    }
}

/// A resized disk: the config space's capacity follows, and the call says
/// whether it changed (whether to send CONFIG_CHANGE_MSG); a capacity
/// whose bytes overflow is refused, changing nothing.
#[test]
fn a_blk_device_takes_a_new_capacity() {
    let mut b = Storage::new(vhu_blk_size());
    let blk: *mut vhu_blk = b.at(0);
    let mut dev = vhu_device::default();
    let capacity = |dev: &vhu_device| {
        let mut c = [0u8; 8];
        // SAFETY: the device's own callback and context; `c` is live.
        assert!(unsafe { (dev.read_config.unwrap())(dev.ctx, 0, c.as_mut_ptr(), 8) });
        u64::from_le_bytes(c)
    };
    let mut changed = true;
    // SAFETY: live storage, config and out-values.
    unsafe {
        assert_eq!(vhu_blk_init(blk, vhu_blk_size(), &blk_config()), VHU_OK);
        assert_eq!(vhu_blk_device(blk, &mut dev), VHU_OK);
        assert_eq!(vhu_blk_set_capacity(blk, 2048, &mut changed), VHU_OK);
        assert!(!changed, "the same size");
        assert_eq!(vhu_blk_set_capacity(blk, 4096, &mut changed), VHU_OK);
        assert!(changed);
        assert_eq!(capacity(&dev), 4096);
        assert_eq!(
            vhu_blk_set_capacity(blk, u64::MAX, &mut changed),
            VHU_ERR_CONFIG
        );
        assert!(!changed);
        assert_eq!(capacity(&dev), 4096);
    }
}

/// What a C back-end may offer is named one by one, whatever features the
/// core was built with (a workspace build turns on `net` and `migration`
/// for every crate): every protocol feature the session implements, RARP
/// and MTU among them (their messages reach the device's callbacks:
/// tests/net.rs), the back-end channel's requests and in-band
/// notifications (a `vhu_channel`: tests/session.rs), the dirty log
/// (LOG_SHMFD, LOG_ALL) and the device state (DEVICE_STATE) with the
/// library's `migration` feature (tests/migration.rs). One the session
/// does not implement, or LOG_ALL without a log, is refused.
#[test]
fn only_what_the_abi_carries_is_offered() {
    const BACKEND_REQ: u64 = 1 << 5;
    const INBAND_NOTIFICATIONS: u64 = 1 << 14;
    const SKIP_DRAIN: u64 = 1 << 23;
    let log = if cfg!(feature = "migration") {
        VHU_PROTOCOL_F_LOG_SHMFD | VHU_PROTOCOL_F_DEVICE_STATE
    } else {
        0
    };
    let supported = vhu_backend_supported_protocol_features();
    let named = VHU_PROTOCOL_F_MQ
        | VHU_PROTOCOL_F_REPLY_ACK
        | VHU_PROTOCOL_F_CONFIG
        | VHU_PROTOCOL_F_INFLIGHT_SHMFD
        | VHU_PROTOCOL_F_RESET_DEVICE
        | VHU_PROTOCOL_F_CONFIGURE_MEM_SLOTS
        | VHU_PROTOCOL_F_STATUS
        | VHU_PROTOCOL_F_GET_VRING_BASE_INFLIGHT
        | VHU_PROTOCOL_F_RARP
        | VHU_PROTOCOL_F_MTU;
    assert_eq!(
        supported,
        named | BACKEND_REQ | INBAND_NOTIFICATIONS | SKIP_DRAIN | log
    );
    let size = vhu_backend_size();
    let mut s = Storage::new(size);
    let base = vhu_backend_config {
        struct_size: size_of::<vhu_backend_config>(),
        features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
        protocol_features: VHU_PROTOCOL_F_REPLY_ACK,
        num_queues: 1,
        max_queue_size: 64,
    };
    // Host notifiers (bit 11), shared objects (bit 18): not implemented.
    for (extra_protocol, extra_virtio) in [(0, VHU_F_LOG_ALL), (1 << 11, 0), (1 << 18, 0)] {
        let cfg = vhu_backend_config {
            features: base.features | extra_virtio,
            protocol_features: base.protocol_features | extra_protocol,
            ..base
        };
        // SAFETY: the storage holds `size` bytes; the config is live.
        let r = unsafe { vhu_backend_init(s.at(0), size, &cfg) };
        assert_eq!(
            r, VHU_ERR_UNSUPPORTED,
            "protocol {extra_protocol:#x} virtio {extra_virtio:#x}"
        );
    }
    let all = vhu_backend_config {
        protocol_features: supported,
        ..base
    };
    // SAFETY: as above.
    assert_eq!(unsafe { vhu_backend_init(s.at(0), size, &all) }, VHU_OK);
    // IN_ORDER is carried with the library's `in-order` feature, on by
    // default (its data plane honours it: dataplane.rs), LOG_ALL with its
    // `migration` feature (never without LOG_SHMFD: refused above).
    let virtio = vhu_backend_supported_features();
    assert_eq!(virtio & VHU_VIRTIO_F_IN_ORDER, VHU_VIRTIO_F_IN_ORDER);
    let log_all = if log != 0 { VHU_F_LOG_ALL } else { 0 };
    let device_and_transport = ((1 << 24) - 1)
        | VHU_VIRTIO_F_INDIRECT_DESC
        | VHU_VIRTIO_F_EVENT_IDX
        | VHU_F_PROTOCOL_FEATURES
        | VHU_VIRTIO_F_VERSION_1
        | VHU_VIRTIO_F_RING_PACKED;
    assert_eq!(
        virtio,
        device_and_transport | VHU_VIRTIO_F_IN_ORDER | log_all
    );
    let in_order = vhu_backend_config {
        features: base.features | VHU_VIRTIO_F_IN_ORDER | VHU_VIRTIO_F_RING_PACKED,
        ..base
    };
    // SAFETY: as above.
    let r = unsafe { vhu_backend_init(s.at(0), size, &in_order) };
    assert_eq!(r, VHU_OK);
}

#[test]
fn a_state_of_another_kind_or_none_is_refused() {
    let mut s = Storage::new(vhu_blk_size().max(vhu_dataplane_size(64)));
    let bc = blk_config();
    let blk: *mut vhu_blk = s.at(0);
    let mut tok = vhu_token {
        handle: 0,
        id: 0,
        side_effects: false,
        ..Default::default()
    };
    let mut segs = [vhu_segment::default(); VHU_MAX_CHAIN as usize];
    let mut n = 0usize;
    let mut op = core::mem::MaybeUninit::new(vhu_blk_op::default());
    // SAFETY: the storage is large enough for every state used here and
    // zeroed (not a state) until the blk init.
    unsafe {
        // Zeroed storage holds no state.
        assert_eq!(vhu_blk_offered_features(blk, &mut 0u64), VHU_ERR_STATE);
        assert_eq!(vhu_blk_init(blk, vhu_blk_size(), &bc), VHU_OK);
        // A blk device is not a data plane, nor a request plan.
        let dp: *mut vhu_dataplane = s.at(0);
        let r = vhu_dataplane_pop(
            dp,
            ptr::null(),
            ptr::null(),
            &mut tok,
            segs.as_mut_ptr(),
            segs.len(),
            &mut n,
        );
        assert_eq!(r, VHU_ERR_STATE);
        assert_eq!(tok.handle, VHU_NO_TOKEN);
        let req: *mut vhu_blk_request = s.at(0);
        assert_eq!(vhu_blk_request_op(req, op.as_mut_ptr()), VHU_ERR_STATE);
        let fe: *mut vhu_frontend = s.at(0);
        assert_eq!(vhu_frontend_start(fe), VHU_ERR_STATE);
        // And it is still a blk device.
        let mut f = 0u64;
        assert_eq!(vhu_blk_offered_features(blk, &mut f), VHU_OK);
        assert_ne!(f, 0);
    }
}

#[test]
fn message_headers_are_validated() {
    let mut total = 0usize;
    let get_features = [1u8, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0];
    // SAFETY: each call: the buffers are live for their lengths.
    unsafe {
        assert_eq!(
            vhu_message_size(get_features.as_ptr(), 12, &mut total),
            VHU_OK
        );
        assert_eq!(total, 20);
        assert_eq!(
            vhu_message_size(get_features.as_ptr(), 11, &mut total),
            VHU_ERR_SHORT_BUFFER
        );
        let mut big = get_features;
        big[9] = 0x10; // a payload of 4 KiB + 8: above the maximum
        assert_eq!(vhu_message_size(big.as_ptr(), 12, &mut total), VHU_ERR_WIRE);
        let mut v2 = get_features;
        v2[4] = 2;
        assert_eq!(vhu_message_size(v2.as_ptr(), 12, &mut total), VHU_ERR_WIRE);
        assert_eq!(vhu_message_size(ptr::null(), 12, &mut total), VHU_ERR_NULL);
    }
}

/// Plans, over the guest memory table `mem` (one region at guest address
/// 0, mapped at `host`), a request of type `kind` (0 READ, 1 WRITE) for
/// one sector: its header at guest address 0, its data at 0x100 and its
/// status byte at 0x300.
fn plan_one_sector(host: *mut u8, mem: &vhu_mem, kind: u32, req: *mut vhu_blk_request) {
    // SAFETY: the region holds 16 bytes at its start, 8-aligned.
    unsafe {
        host.cast::<u64>().write(u64::from(kind).to_le()); // type, reserved
        host.cast::<u64>().add(1).write(1u64.to_le()); // sector
    }
    let segs = [
        vhu_segment {
            addr: 0,
            len: 16,
            writable: false,
        },
        vhu_segment {
            addr: 0x100,
            len: 512,
            writable: kind == 0,
        },
        vhu_segment {
            addr: 0x300,
            len: 1,
            writable: true,
        },
    ];
    let mut s = Storage::new(vhu_blk_size());
    let blk: *mut vhu_blk = s.at(0);
    let mut op = core::mem::MaybeUninit::new(vhu_blk_op::default());
    // SAFETY: storages of the sizes asked; live config, segments, table
    // (which maps `guest`) and out-value.
    unsafe {
        assert_eq!(vhu_blk_init(blk, vhu_blk_size(), &blk_config()), VHU_OK);
        assert_eq!(vhu_blk_request_init(req, vhu_blk_request_size()), VHU_OK);
        let r = vhu_blk_plan(blk, segs.as_ptr(), segs.len(), mem, req);
        assert_eq!(r, VHU_OK);
        assert_eq!(vhu_blk_request_op(req, op.as_mut_ptr()), VHU_OK);
        assert_eq!(op.assume_init().len, 512);
    }
}

/// A caller buffer for a request's data that lies in guest memory (where
/// the guest may change it at any time, and which the copy's other end
/// may overlap) is refused before anything is copied; one of its own is
/// taken. The guest's bytes are touched through `host` only.
#[test]
fn a_data_buffer_in_guest_memory_is_refused() {
    let mut guest = vec![0u64; 0x1000 / 8];
    let host = guest.as_mut_ptr().cast::<u8>();
    let regions = [vhu_region {
        gpa: 0,
        size: 0x1000,
        host,
    }];
    let mem = vhu_mem {
        regions: regions.as_ptr(),
        count: 1,
        ops: ptr::null(),
    };
    let mut s = Storage::new(vhu_blk_request_size());
    let req: *mut vhu_blk_request = s.at(0);
    let mut own = [0x5au8; 512];
    // A READ: the caller writes the data into the guest's buffer.
    plan_one_sector(host, &mem, 0, req);
    // SAFETY: live plan and table; every `src` is `len` readable bytes
    // (inside `guest`, or `own`).
    unsafe {
        // Elsewhere in guest memory than the data.
        let r = vhu_blk_request_write_data(req, &mem, 0, host.add(0x800), 512);
        assert_eq!(r, VHU_ERR_INVALID);
        // The data's own bytes, and a part of them.
        let r = vhu_blk_request_write_data(req, &mem, 0, host.add(0x100), 512);
        assert_eq!(r, VHU_ERR_INVALID);
        let r = vhu_blk_request_write_data(req, &mem, 0, host.add(0x2ff), 1);
        assert_eq!(r, VHU_ERR_INVALID);
        let r = vhu_blk_request_write_data(req, &mem, 0, own.as_ptr(), 512);
        assert_eq!(r, VHU_OK);
    }
    // SAFETY: the region's bytes at 0x100..0x300.
    let data = unsafe { core::slice::from_raw_parts(host.add(0x100), 512) };
    assert!(data.iter().all(|&b| b == 0x5a));
    // A WRITE: the caller reads the data out of the guest's buffer.
    plan_one_sector(host, &mem, 1, req);
    own = [0; 512];
    // SAFETY: as above, `dst` writable.
    unsafe {
        let r = vhu_blk_request_read_data(req, &mem, 0, host.add(0x800), 512);
        assert_eq!(r, VHU_ERR_INVALID);
        let r = vhu_blk_request_read_data(req, &mem, 0, host.add(0x100), 512);
        assert_eq!(r, VHU_ERR_INVALID);
        let r = vhu_blk_request_read_data(req, &mem, 0, own.as_mut_ptr(), 512);
        assert_eq!(r, VHU_OK);
    }
    assert!(own.iter().all(|&b| b == 0x5a));
    // The last byte of guest memory is in it, the address after it not.
    // SAFETY: as above; the address after the region is only compared
    // (a copy of 0 bytes touches nothing).
    unsafe {
        let r = vhu_blk_request_read_data(req, &mem, 0, host.add(0xfff), 1);
        assert_eq!(r, VHU_ERR_INVALID);
        let r = vhu_blk_request_read_data(req, &mem, 0, host.add(0x1000), 0);
        assert_eq!(r, VHU_OK);
    }
}

//! The data plane through the C ABI, without a session
//! (`vhu_dataplane_init`): a split ring in a guest memory table, requests
//! completed in another order than popped, a suspend that leaves one
//! request recorded in the inflight area, and the next data plane over the
//! same area handing it out again before anything new; and guest memory
//! given as callbacks instead of a table.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::ffi::c_void;
use core::ptr;

use vhost_user_c::backend::{vhu_ring_addrs, VHU_VIRTIO_F_IN_ORDER, VHU_VIRTIO_F_VERSION_1};
use vhost_user_c::dataplane::*;
use vhost_user_c::memory::{vhu_mem, vhu_mem_ops, vhu_region};
use vhost_user_c::vhu_result::*;

const SIZE: u16 = 8;
const DESC: usize = 0;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
const BUF: usize = 0x3000;

/// Guest memory: `n` chains of one writable 16-byte buffer each, made
/// available in order.
struct Guest(Vec<u64>);

impl Guest {
    fn new(n: u16) -> Guest {
        let mut g = Guest(vec![0; 0x4000 / 8]);
        for i in 0..n {
            let d = DESC + 16 * usize::from(i);
            g.put(d, &((BUF + 0x100 * usize::from(i)) as u64).to_le_bytes());
            g.put(d + 8, &16u32.to_le_bytes());
            g.put(d + 12, &2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
            g.put(AVAIL + 4 + 2 * usize::from(i), &i.to_le_bytes());
        }
        g.put(AVAIL + 2, &n.to_le_bytes());
        g
    }
    fn bytes(&mut self) -> &mut [u8] {
        let len = self.0.len() * 8;
        // SAFETY: the Vec's u64s are `len` initialised bytes, and u8 has
        // no alignment or validity requirement.
        unsafe { core::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), len) }
    }
    fn put(&mut self, at: usize, b: &[u8]) {
        self.bytes()[at..at + b.len()].copy_from_slice(b);
    }
    fn u32_at(&mut self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes()[at..at + 4].try_into().unwrap())
    }
    fn used(&mut self) -> (u16, Vec<(u32, u32)>) {
        let idx = self.u32_at(USED) >> 16;
        let entries = (0..idx as usize)
            .map(|i| (self.u32_at(USED + 4 + 8 * i), self.u32_at(USED + 8 + 8 * i)))
            .collect();
        (idx as u16, entries)
    }
    fn region(&mut self) -> vhu_region {
        vhu_region {
            gpa: 0,
            size: self.0.len() as u64 * 8,
            host: self.0.as_mut_ptr().cast(),
        }
    }
}

fn config(base: u32) -> vhu_ring_config {
    vhu_ring_config {
        struct_size: size_of::<vhu_ring_config>(),
        size: SIZE,
        addrs: vhu_ring_addrs {
            desc: DESC as u64,
            driver: AVAIL as u64,
            device: USED as u64,
        },
        features: VHU_VIRTIO_F_VERSION_1,
        base,
        enabled: 1,
        consume_disabled: 0,
        inflight_offset: 0,
    }
}

/// A guest memory table of `regions`.
fn table(regions: &[vhu_region]) -> vhu_mem {
    vhu_mem {
        regions: regions.as_ptr(),
        count: regions.len(),
        ops: ptr::null(),
    }
}

/// Storage for a data plane of SIZE entries.
fn storage() -> Vec<u64> {
    vec![0u64; vhu_dataplane_size(SIZE) / 8 + 1]
}

fn pop(dp: *mut vhu_dataplane, mem: &vhu_mem, area: *const vhu_mem) -> vhu_token {
    let mut t = vhu_token {
        handle: 0,
        id: 0,
        side_effects: false,
        ..Default::default()
    };
    let mut segs = [vhu_segment::default(); VHU_MAX_CHAIN as usize];
    let mut n = 0;
    // SAFETY: live data plane, tables and out-buffers of the stated sizes.
    let r =
        unsafe { vhu_dataplane_pop(dp, mem, area, &mut t, segs.as_mut_ptr(), segs.len(), &mut n) };
    assert_eq!(r, VHU_OK);
    if t.handle != VHU_NO_TOKEN {
        assert_eq!(n, 1);
        assert_eq!(segs[0].addr, (BUF + 0x100 * usize::from(t.id)) as u64);
        assert!(segs[0].writable);
    }
    t
}

#[test]
fn completions_in_any_order_reach_the_used_ring_in_that_order() {
    let mut g = Guest::new(3);
    let regions = [g.region()];
    let mem = table(&regions);
    any_order(&mut g, &mem);
}

/// With VIRTIO_F_IN_ORDER the used ring gets the completions in the
/// order the chains were popped, whatever order they came in: one that
/// comes early waits for those before it.
#[test]
fn an_in_order_ring_publishes_in_pop_order() {
    let mut g = Guest::new(3);
    let regions = [g.region()];
    let mem = table(&regions);
    let mut s = storage();
    let dp: *mut vhu_dataplane = s.as_mut_ptr().cast();
    let mut cfg = config(0);
    cfg.features |= VHU_VIRTIO_F_IN_ORDER;
    // SAFETY: storage of vhu_dataplane_size(SIZE) bytes, aligned to 8;
    // the table maps `g`, alive throughout.
    unsafe {
        assert_eq!(
            vhu_dataplane_init(dp, vhu_dataplane_size(SIZE), &cfg, &mem, ptr::null()),
            VHU_OK
        );
        let t: Vec<vhu_token> = (0..3).map(|_| pop(dp, &mem, ptr::null())).collect();
        let mut p = vhu_published::VHU_PUBLISHED_NOTHING;
        for (i, len) in [(2, 12), (1, 11)] {
            let r = vhu_dataplane_complete(dp, &mem, ptr::null(), t[i].handle, len, &mut p);
            assert_eq!(r, VHU_OK);
        }
        assert_eq!(vhu_dataplane_publish(dp, &mem, ptr::null(), &mut p), VHU_OK);
        // The first chain is not done: nothing may pass it.
        assert_eq!(g.used().0, 0);
        let r = vhu_dataplane_complete(dp, &mem, ptr::null(), t[0].handle, 10, &mut p);
        assert_eq!(r, VHU_OK);
        assert_eq!(vhu_dataplane_publish(dp, &mem, ptr::null(), &mut p), VHU_OK);
        assert_eq!(g.used(), (3, vec![(0, 10), (1, 11), (2, 12)]));
    }
}

const GUEST_LEN: u64 = 0x4000;

fn inside(gpa: u64, len: u64) -> bool {
    gpa.checked_add(len).is_some_and(|end| end <= GUEST_LEN)
}

unsafe extern "C" fn cb_read(ctx: *mut c_void, gpa: u64, dst: *mut u8, len: usize) -> bool {
    if !inside(gpa, len as u64) {
        return false;
    }
    // SAFETY: `ctx` is the guest's GUEST_LEN bytes and the range is inside;
    // `dst` holds `len` bytes.
    unsafe { ptr::copy_nonoverlapping(ctx.cast::<u8>().add(gpa as usize), dst, len) };
    true
}

unsafe extern "C" fn cb_write(ctx: *mut c_void, gpa: u64, src: *const u8, len: usize) -> bool {
    if !inside(gpa, len as u64) {
        return false;
    }
    // SAFETY: as in `cb_read`.
    unsafe { ptr::copy_nonoverlapping(src, ctx.cast::<u8>().add(gpa as usize), len) };
    true
}

unsafe extern "C" fn cb_load(ctx: *mut c_void, gpa: u64, out: *mut u16) -> bool {
    if !inside(gpa, 2) {
        return false;
    }
    // SAFETY: in bounds, 2-aligned (the library checks `gpa`, the buffer
    // is 8-aligned); one thread, so a volatile access is atomic enough.
    unsafe {
        *out = u16::from_le(
            ctx.cast::<u8>()
                .add(gpa as usize)
                .cast::<u16>()
                .read_volatile(),
        )
    };
    true
}

unsafe extern "C" fn cb_store(ctx: *mut c_void, gpa: u64, v: u16) -> bool {
    if !inside(gpa, 2) {
        return false;
    }
    // SAFETY: as in `cb_load`.
    unsafe {
        ctx.cast::<u8>()
            .add(gpa as usize)
            .cast::<u16>()
            .write_volatile(v.to_le())
    };
    true
}

unsafe extern "C" fn cb_check(_: *mut c_void, gpa: u64, len: u64) -> bool {
    inside(gpa, len.max(1))
}

#[test]
fn guest_memory_as_callbacks_serves_the_same_ring() {
    let mut g = Guest::new(3);
    let ops = vhu_mem_ops {
        struct_size: size_of::<vhu_mem_ops>(),
        ctx: g.0.as_mut_ptr().cast(),
        read: Some(cb_read),
        write: Some(cb_write),
        load_u16_acquire: Some(cb_load),
        store_u16_release: Some(cb_store),
        check: Some(cb_check),
    };
    // No table: every access goes through the callbacks.
    let mem = vhu_mem {
        regions: ptr::null(),
        count: 0,
        ops: &ops,
    };
    any_order(&mut g, &mem);
    // A callback missing is refused.
    let partial = vhu_mem_ops { check: None, ..ops };
    let bad = vhu_mem {
        ops: &partial,
        ..mem
    };
    let mut s = storage();
    // SAFETY: storage of the data plane's size; `bad` is refused before
    // any callback is called.
    let r = unsafe {
        vhu_dataplane_init(
            s.as_mut_ptr().cast(),
            vhu_dataplane_size(SIZE),
            &config(0),
            &bad,
            ptr::null(),
        )
    };
    assert_eq!(r, VHU_ERR_NULL);
}

/// Pops the guest's three chains, completes them out of order, publishes,
/// stops: the used ring holds them in completion order.
fn any_order(g: &mut Guest, mem: &vhu_mem) {
    let mut s = storage();
    let dp: *mut vhu_dataplane = s.as_mut_ptr().cast();
    // SAFETY: storage of vhu_dataplane_size(SIZE) bytes, aligned to 8 (at
    // least vhu_dataplane_align()); the tables map `g`, alive throughout.
    unsafe {
        assert!(vhu_dataplane_align() <= 8);
        assert_eq!(
            vhu_dataplane_init(
                dp,
                vhu_dataplane_size(SIZE) - 1,
                &config(0),
                mem,
                ptr::null()
            ),
            VHU_ERR_SIZE
        );
        let mut outside = config(0);
        outside.addrs.desc = 0x10_0000;
        assert_eq!(
            vhu_dataplane_init(dp, vhu_dataplane_size(SIZE), &outside, mem, ptr::null()),
            VHU_ERR_MEMORY
        );
        assert_eq!(
            vhu_dataplane_init(dp, vhu_dataplane_size(SIZE), &config(0), mem, ptr::null()),
            VHU_OK
        );
        let t: Vec<vhu_token> = (0..3).map(|_| pop(dp, mem, ptr::null())).collect();
        assert_eq!(t.iter().map(|t| t.id).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(pop(dp, mem, ptr::null()).handle, VHU_NO_TOKEN);
        let mut p = vhu_published::VHU_PUBLISHED_NOTHING;
        for (i, len) in [(2, 12), (0, 10), (1, 11)] {
            let r = vhu_dataplane_complete(dp, mem, ptr::null(), t[i].handle, len, &mut p);
            assert_eq!(r, VHU_OK);
        }
        let again = vhu_dataplane_complete(dp, mem, ptr::null(), t[0].handle, 1, ptr::null_mut());
        assert_eq!(again, VHU_ERR_NOT_OUTSTANDING);
        // Nothing reaches the guest before the publish.
        assert_eq!(g.used().0, 0);
        assert_eq!(vhu_dataplane_publish(dp, mem, ptr::null(), &mut p), VHU_OK);
        assert_eq!(p, vhu_published::VHU_PUBLISHED_NOTIFY);
        assert_eq!(g.used(), (3, vec![(2, 12), (0, 10), (1, 11)]));
        let (mut stopped, mut base) = (false, 0u32);
        let r = vhu_dataplane_stop(dp, mem, ptr::null(), false, &mut stopped, &mut base, &mut p);
        assert_eq!(r, VHU_OK);
        assert!(stopped);
        assert_eq!(base, 3);
        // A stopped ring's tokens are void.
        let late = vhu_dataplane_complete(dp, mem, ptr::null(), t[1].handle, 1, ptr::null_mut());
        assert_eq!(late, VHU_ERR_NOT_OUTSTANDING);
    }
}

#[test]
fn a_suspended_request_is_handed_out_again_by_the_next_data_plane() {
    let mut g = Guest::new(3);
    let regions = [g.region()];
    let mem = table(&regions);
    // The ring's region of the inflight area (64-byte aligned records of
    // 32 bytes per descriptor and a header), zeroed: a fresh area.
    let mut area_words = vec![0u64; 1024];
    let area_regions = [vhu_region {
        gpa: 0,
        size: 8 * 1024,
        host: area_words.as_mut_ptr().cast(),
    }];
    let area = vhu_mem {
        regions: area_regions.as_ptr(),
        count: 1,
        ops: ptr::null(),
    };
    let mut s1 = storage();
    let dp: *mut vhu_dataplane = s1.as_mut_ptr().cast();
    let mut s2 = storage();
    let dp2: *mut vhu_dataplane = s2.as_mut_ptr().cast();
    let size = vhu_dataplane_size(SIZE);
    // SAFETY: as in the test above; the area table maps `area_words`.
    unsafe {
        assert_eq!(
            vhu_dataplane_init(dp, size, &config(0), &mem, &area),
            VHU_OK
        );
        let a = pop(dp, &mem, &area);
        let b = pop(dp, &mem, &area);
        assert_eq!((a.id, b.id), (0, 1));
        let mut p = vhu_published::VHU_PUBLISHED_NOTHING;
        assert_eq!(
            vhu_dataplane_complete(dp, &mem, &area, b.handle, 7, &mut p),
            VHU_OK
        );
        // Without the area, a tracked ring refuses to complete.
        let none = vhu_dataplane_complete(dp, &mem, ptr::null(), a.handle, 1, &mut p);
        assert_eq!(none, VHU_ERR_INFLIGHT);
        let (mut stopped, mut base) = (false, 0u32);
        let r = vhu_dataplane_stop(dp, &mem, &area, true, &mut stopped, &mut base, &mut p);
        assert_eq!(r, VHU_OK);
        assert!(stopped, "suspend stops at once");
        assert_eq!(g.used(), (1, vec![(1, 7)]));

        // The next data plane, over the same ring and area, from the base.
        assert_eq!(
            vhu_dataplane_init(dp2, size, &config(base), &mem, &area),
            VHU_OK
        );
        let mut info = core::mem::MaybeUninit::new(vhu_dataplane_info::default());
        assert_eq!(vhu_dataplane_get_info(dp2, info.as_mut_ptr()), VHU_OK);
        let info = info.assume_init();
        assert_eq!((info.resubmits_left, info.error), (1, VHU_OK));
        assert!(info.tracked);
        let again = pop(dp2, &mem, &area);
        assert_eq!(again.id, 0, "the suspended request first");
        let next = pop(dp2, &mem, &area);
        assert_eq!(next.id, 2, "then what was never popped");
        assert_eq!(pop(dp2, &mem, &area).handle, VHU_NO_TOKEN);
        for t in [next, again] {
            let r = vhu_dataplane_complete(dp2, &mem, &area, t.handle, 3, &mut p);
            assert_eq!(r, VHU_OK);
        }
        assert_eq!(vhu_dataplane_publish(dp2, &mem, &area, &mut p), VHU_OK);
        assert_eq!(g.used(), (3, vec![(1, 7), (2, 3), (0, 3)]));
    }
}

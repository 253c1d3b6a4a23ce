//! The data plane's per-request cost: pop + complete + publish through
//! [`DataPlane`] on a 256-entry split ring over the Linux adapter's mmap'd
//! memory (as the daemon runs), without and with an inflight area, next to
//! the bare split queue (pop_into + add_used + flush_used) on the same ring
//! image: the difference is what the data plane adds per request.
//!
//! One iteration is a batch of 256 one-descriptor chains: the guest
//! publishes 256 more avail entries (one u16 store; the avail ring already
//! holds valid heads), the device takes and completes each, and publishes
//! (once per batch untracked; every 16 completions with an inflight area,
//! which is the publish batch of a tracked ring). Per-request time is the
//! batch time / 256.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use vhost_user_core::dataplane::DataPlane;
use vhost_user_core::feature::VirtioFeatures as V;
use vhost_user_core::inflight::queue_stride;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::vring::{Chain, Queue, RingFeatures, SplitQueue};
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_test::{Buf, SplitDriver};

const SIZE: u16 = 256;
const MEM: u64 = 0x20_0000;
const RING: u64 = 0x1000;
const DATA: u64 = 0x8_0000;

fn mmap(size: u64) -> LinuxGuestMemory {
    let fd = vhost_user_linux::sys::memfd::create("bench", size).unwrap();
    let mut m = LinuxGuestMemory::new();
    m.map(0, vhost_user_test::region(0, size), fd).unwrap();
    m
}

/// A split ring whose 256 avail entries hold one-descriptor chains,
/// avail.idx still 0.
fn ring(m: &LinuxGuestMemory) -> SplitDriver {
    let mut d = SplitDriver::new(m, SIZE, RING, true).unwrap();
    for c in 0..u64::from(SIZE) {
        d.add(m, &[Buf::writable(DATA + 0x100 * c, 64)]).unwrap();
    }
    d
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dataplane_split_256/1-desc");
    g.throughput(Throughput::Elements(u64::from(SIZE)));
    let features = V::VERSION_1 | V::EVENT_IDX | V::INDIRECT_DESC;

    // The bare queue: what the data plane is built on.
    let m = mmap(MEM);
    let d = ring(&m);
    let a = d.addrs();
    let rf = RingFeatures::from_virtio(features);
    let mut q = SplitQueue::new(SIZE, a, rf).unwrap();
    let mut chain: Chain = Chain::new();
    let mut avail: u16 = 0;
    g.bench_function("queue", |b| {
        b.iter(|| {
            avail = avail.wrapping_add(SIZE);
            m.store_u16_release(a.driver + 2, avail).unwrap();
            while q.pop_into(&m, &mut chain).unwrap() {
                let len = black_box(&chain).writable_len();
                q.add_used(&m, chain.head(), len).unwrap();
            }
            black_box(q.flush_used(&m).unwrap());
        })
    });

    for tracked in [false, true] {
        let m = mmap(MEM);
        let d = ring(&m);
        let a = d.addrs();
        let area = mmap(queue_stride(SIZE).next_multiple_of(4096));
        let inflight = tracked.then_some((&area, 0));
        let q = Queue::new(SIZE, a, features).unwrap();
        let mut dp = DataPlane::start(q, true, false, &m, inflight);
        let area = inflight.map(|(a, _)| a);
        let mut avail: u16 = 0;
        let name = if tracked {
            "dataplane+inflight"
        } else {
            "dataplane"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                avail = avail.wrapping_add(SIZE);
                m.store_u16_release(a.driver + 2, avail).unwrap();
                while let Some(t) = dp.pop(&m, area, &mut chain).unwrap() {
                    let len = black_box(&chain).writable_len();
                    black_box(dp.complete(&m, area, t, len).unwrap());
                }
                black_box(dp.publish(&m, area).unwrap());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

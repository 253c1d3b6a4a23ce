//! Split ring device-side cost: a 256-entry ring, one thread, pop a chain
//! (walking every descriptor) and complete it, for 1-descriptor and
//! 3-descriptor chains, next to rust-vmm's virtio-queue 0.18 over vm-memory
//! 0.18 (`GuestMemoryMmap`) on the same ring image. Ours runs twice:
//! `vhu-mmap` over the Linux adapter's mmap'd memory, as the daemon runs
//! and as virtio-queue's memory is (the like-for-like row), and `vhu` over
//! the test adapter's memory, whose 32-bit atomic words make each
//! descriptor four loads. Then the packed ring on its own.
//!
//! One iteration is a batch of 256 chains: the guest publishes 256 more
//! avail entries (one u16 store; the avail ring already holds valid heads),
//! the device pops and completes all of them and publishes the used index
//! once (ours: `flush_used`; virtio-queue: `add_used` stores used.idx per
//! entry, then `needs_notification`). Criterion reports time per batch and
//! chains per second; per-chain time is the batch time / 256.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vhost_user_core::memory::GuestMemory;
use vhost_user_core::vring::{Chain, PackedQueue, RingFeatures, SplitQueue};
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_test::{Buf, PackedDriver, SplitDriver, TestMemory};

const SIZE: u16 = 256;
const MEM: u64 = 0x20_0000;
const RING: u64 = 0x1000;
const DATA: u64 = 0x8_0000;

/// Lay out a split ring whose 256 avail entries reference chains of `n`
/// descriptors (heads reused round-robin), avail.idx still 0.
fn split_image(n: usize) -> (TestMemory<1>, SplitDriver) {
    let m = TestMemory::<1>::new(&[(0, MEM)]).unwrap();
    let d = split_ring(&m, n);
    (m, d)
}

/// The same image in mmap'd memory, as the daemon's rings see it.
fn split_image_mmap(n: usize) -> (LinuxGuestMemory, SplitDriver) {
    let fd = vhost_user_linux::sys::memfd::create("bench", MEM).unwrap();
    let mut m = LinuxGuestMemory::new();
    m.map(0, vhost_user_test::region(0, MEM), fd).unwrap();
    let d = split_ring(&m, n);
    (m, d)
}

fn split_ring<M: GuestMemory>(m: &M, n: usize) -> SplitDriver {
    let mut d = SplitDriver::new(m, SIZE, RING, true).unwrap();
    let chains = usize::from(SIZE) / n;
    let bufs: Vec<Buf> = match n {
        1 => vec![Buf::writable(DATA, 64)],
        _ => vec![
            Buf::readable(DATA, 16),
            Buf::readable(DATA + 0x100, 512),
            Buf::writable(DATA + 0x400, 1),
        ],
    };
    let mut heads = Vec::new();
    for c in 0..chains {
        let b: Vec<Buf> = bufs
            .iter()
            .map(|b| Buf {
                addr: b.addr + 0x1000 * c as u64,
                ..*b
            })
            .collect();
        heads.push(d.add(m, &b).unwrap());
    }
    for i in chains..usize::from(SIZE) {
        d.push_head(m, heads[i % chains]).unwrap();
    }
    d
}

fn bench_vhu<M: GuestMemory>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    m: &M,
    d: &SplitDriver,
) {
    let a = d.addrs();
    let mut q = SplitQueue::new(
        SIZE,
        a,
        RingFeatures {
            event_idx: true,
            indirect: true,
        },
    )
    .unwrap();
    let mut chain: Chain = Chain::new();
    let mut avail: u16 = 0;
    g.bench_function(name, |b| {
        b.iter(|| {
            avail = avail.wrapping_add(SIZE);
            m.store_u16_release(a.driver + 2, avail).unwrap();
            while q.pop_into(m, &mut chain).unwrap() {
                let len = black_box(&chain).writable_len();
                q.add_used(m, chain.head(), len).unwrap();
            }
            black_box(q.flush_used(m).unwrap());
        })
    });
}

fn bench_split(c: &mut Criterion) {
    for n in [1usize, 3] {
        let mut g = c.benchmark_group(format!("split_256/{n}-desc"));
        g.throughput(Throughput::Elements(u64::from(SIZE)));

        // Ours.
        let (m, d) = split_image(n);
        bench_vhu(&mut g, "vhu", &m, &d);
        let (m, d) = split_image_mmap(n);
        bench_vhu(&mut g, "vhu-mmap", &m, &d);

        let (m, d) = split_image(n);
        let image = m.read_vec(0, MEM as usize).unwrap();
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        gm.write_slice(&image, GuestAddress(0)).unwrap();
        let a = d.addrs();
        let mut vq = Queue::new(SIZE).unwrap();
        vq.set_desc_table_address(Some(a.desc as u32), Some((a.desc >> 32) as u32));
        vq.set_avail_ring_address(Some(a.driver as u32), Some((a.driver >> 32) as u32));
        vq.set_used_ring_address(Some(a.device as u32), Some((a.device >> 32) as u32));
        vq.set_event_idx(true);
        vq.set_ready(true);
        assert!(vq.is_valid(&gm));
        let mut avail: u16 = 0;
        g.bench_function("virtio-queue", |b| {
            b.iter(|| {
                avail = avail.wrapping_add(SIZE);
                gm.write_obj(avail, GuestAddress(a.driver + 2)).unwrap();
                while let Some(chain) = vq.pop_descriptor_chain(&gm) {
                    let head = chain.head_index();
                    let mut len = 0;
                    for desc in chain {
                        if desc.is_write_only() {
                            len += black_box(desc).len();
                        }
                    }
                    vq.add_used(&gm, head, len).unwrap();
                }
                black_box(vq.needs_notification(&gm).unwrap());
            })
        });
        g.finish();
    }
}

fn bench_packed(c: &mut Criterion) {
    let mut g = c.benchmark_group("packed_256");
    g.throughput(Throughput::Elements(u64::from(SIZE)));
    for n in [1usize, 3] {
        let m = TestMemory::<1>::new(&[(0, MEM)]).unwrap();
        let mut d = PackedDriver::new(&m, SIZE, RING).unwrap();
        let mut q = PackedQueue::new(
            SIZE,
            d.addrs(),
            RingFeatures {
                event_idx: true,
                indirect: true,
            },
        )
        .unwrap();
        let bufs: Vec<Buf> = match n {
            1 => vec![Buf::writable(DATA, 64)],
            _ => vec![
                Buf::readable(DATA, 16),
                Buf::readable(DATA + 0x100, 512),
                Buf::writable(DATA + 0x400, 1),
            ],
        };
        let per_batch = usize::from(SIZE) / n;
        let mut chain: Chain = Chain::new();
        g.throughput(Throughput::Elements(per_batch as u64));
        g.bench_function(format!("vhu/{n}-desc"), |b| {
            b.iter_batched(
                // The guest's side (not timed): harvest and re-post a full ring.
                || {
                    d.harvest_all(&m).unwrap();
                    for _ in 0..per_batch {
                        d.post(&m, &bufs).unwrap();
                    }
                },
                |()| {
                    while q.pop_into(&m, &mut chain).unwrap() {
                        let len = black_box(&chain).writable_len();
                        q.add_used(&m, chain.head(), len).unwrap();
                    }
                    black_box(q.flush_used(&m).unwrap());
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench_split, bench_packed);
criterion_main!(benches);

//! The vhost-user-blk device as the daemon runs it: the core's
//! [`BlkDevice`] (config space, negotiated features, request planning)
//! behind a lock for the control path, a [`BlockBackend`] shared by every
//! queue thread, and per-queue counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use vhost_user_core::backend::BackendDevice;
use vhost_user_core::device::blk::{BlkDevice, BlkOp, BlkRequest, BlkStatus, BLK_ID_BYTES};
use vhost_user_core::feature::VirtioFeatures;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::ConfigWriteKind;
use vhost_user_core::vring::Chain;

use super::{execute, BlockBackend};

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Bytes read from the disk into the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub write_bytes: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
}

/// A virtio-blk device over a block backend.
#[derive(Debug)]
pub struct BlkService<B: BlockBackend> {
    device: Mutex<BlkDevice>,
    backend: B,
    counters: Vec<QueueCounters>,
    delay: std::time::Duration,
}

/// Per-thread scratch space for request processing.
#[derive(Debug, Default)]
pub struct Scratch {
    plan: BlkRequest,
    bounce: Vec<u8>,
}

impl<B: BlockBackend> BlkService<B> {
    /// A service for `device` over `backend`, with `num_queues` counters.
    pub fn new(device: BlkDevice, backend: B, num_queues: u16) -> Self {
        BlkService {
            device: Mutex::new(device),
            backend,
            counters: (0..num_queues).map(|_| QueueCounters::default()).collect(),
            delay: std::time::Duration::ZERO,
        }
    }

    /// Delays every request by `delay` before carrying it out (for tests
    /// that need requests in flight when a ring stops or the daemon dies).
    pub fn with_delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = delay;
        self
    }

    fn device(&self) -> std::sync::MutexGuard<'_, BlkDevice> {
        // A panic while holding the lock leaves the device's plain data
        // consistent; keep serving.
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The features the device offers (device bits only).
    pub fn offered_features(&self) -> VirtioFeatures {
        self.device().offered_features()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The counters of queue `q`.
    pub fn counters(&self, q: u16) -> Option<&QueueCounters> {
        self.counters.get(usize::from(q))
    }

    /// Processes one chain and returns the bytes written into it (the used
    /// length). With `side_effects` false (a started but disabled ring) the
    /// request is consumed without touching the disk or guest memory.
    pub fn process<M: GuestMemory + ?Sized>(
        &self,
        queue: u16,
        chain: &Chain,
        mem: &M,
        side_effects: bool,
        scratch: &mut Scratch,
    ) -> u32 {
        if !side_effects {
            return 0;
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let read = |gpa: u64, dst: &mut [u8]| mem.read(gpa, dst);
        let write = |gpa: u64, src: &[u8]| mem.write(gpa, src);
        let serial: [u8; BLK_ID_BYTES];
        {
            let dev = self.device();
            dev.plan_into(chain.segments(), &read, &mut scratch.plan);
            serial = *dev.serial();
        }
        let c = execute(
            &scratch.plan,
            &serial,
            &self.backend,
            &read,
            &write,
            &mut scratch.bounce,
        );
        if let Some(k) = self.counters(queue) {
            k.requests.fetch_add(1, Ordering::Relaxed);
            if c.status != BlkStatus::Ok {
                k.errors.fetch_add(1, Ordering::Relaxed);
            } else {
                match scratch.plan.op() {
                    BlkOp::Read { len, .. } => {
                        k.read_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    BlkOp::Write { len, .. } => {
                        k.write_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }
        c.used_len
    }
}

/// The control path: config space, features, reset.
impl<B: BlockBackend> BackendDevice for &BlkService<B> {
    fn read_config(&self, offset: u32, dst: &mut [u8]) -> bool {
        self.device().read_config(offset, dst).is_ok()
    }

    fn write_config(&mut self, offset: u32, src: &[u8], kind: ConfigWriteKind) -> bool {
        self.device().write_config(offset, src, kind).is_ok()
    }

    fn features_acked(&mut self, features: VirtioFeatures) {
        log::info!(
            "front-end acked virtio features {:#x} ({features:?})",
            features.bits()
        );
        self.device().set_features(features);
    }

    fn reset(&mut self) {
        self.device().reset();
    }
}

/// The data path, as the Linux runtime's ring workers call it.
impl<B: BlockBackend + 'static> vhost_user_linux::backend::QueueDevice for BlkService<B> {
    type Scratch = Scratch;

    fn process(
        &self,
        queue: u16,
        chain: &Chain,
        mem: &vhost_user_linux::memory::LinuxGuestMemory,
        side_effects: bool,
        scratch: &mut Scratch,
    ) -> u32 {
        BlkService::process(self, queue, chain, mem, side_effects, scratch)
    }

    fn disconnected(&self) {
        for (q, k) in self.counters.iter().enumerate() {
            log::info!(
                "queue {q}: {} requests, {} bytes read, {} bytes written, {} errors",
                k.requests.load(Ordering::Relaxed),
                k.read_bytes.load(Ordering::Relaxed),
                k.write_bytes.load(Ordering::Relaxed),
                k.errors.load(Ordering::Relaxed),
            );
        }
    }
}

//! The vhost-user-blk device as the daemon runs it: the core's
//! [`BlkDevice`] (config space, negotiated features, request planning)
//! behind a lock for the control path, a [`BlockBackend`] shared by every
//! queue thread, and per-queue counters. [`BlkService`] is a cheap handle
//! (`Clone`) implementing the core's [`Device`]: the Linux runtime keeps
//! one for the control path and gives each ring's worker another.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vhost_user_core::dataplane::Token;
use vhost_user_core::device::blk::{BlkDevice, BlkOp, BlkRequest, BlkStatus, BLK_ID_BYTES};
use vhost_user_core::device::{Completion, Device, Segment};
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

#[derive(Debug)]
struct Inner<B> {
    device: Mutex<BlkDevice>,
    backend: B,
    counters: Vec<QueueCounters>,
}

/// A virtio-blk device over a block backend (a shared handle).
#[derive(Debug)]
pub struct BlkService<B: BlockBackend> {
    inner: Arc<Inner<B>>,
    /// See [`with_delay`](Self::with_delay).
    delay: Duration,
}

impl<B: BlockBackend> Clone for BlkService<B> {
    fn clone(&self) -> Self {
        BlkService {
            inner: Arc::clone(&self.inner),
            delay: self.delay,
        }
    }
}

/// A request the device holds back (see [`BlkService::with_delay`]).
#[derive(Debug)]
struct Delayed {
    due: Instant,
    token: Token,
    segments: Vec<Segment>,
}

/// Per-ring scratch space for request processing.
#[derive(Debug, Default)]
pub struct Scratch {
    plan: BlkRequest,
    bounce: Vec<u8>,
    delayed: VecDeque<Delayed>,
}

impl<B: BlockBackend> BlkService<B> {
    /// A service for `device` over `backend`, with `num_queues` counters.
    pub fn new(device: BlkDevice, backend: B, num_queues: u16) -> Self {
        BlkService {
            inner: Arc::new(Inner {
                device: Mutex::new(device),
                backend,
                counters: (0..num_queues).map(|_| QueueCounters::default()).collect(),
            }),
            delay: Duration::ZERO,
        }
    }

    /// Carries out the requests of a ring one after the other, each
    /// `delay` after the previous one finished, like a slow disk with
    /// requests queued in flight (for tests that need requests outstanding
    /// when a ring stops or the daemon dies). Clones made afterwards share
    /// it.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    fn device(&self) -> std::sync::MutexGuard<'_, BlkDevice> {
        // A panic while holding the lock leaves the device's plain data
        // consistent; keep serving.
        self.inner
            .device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The features the device offers (device bits only).
    pub fn offered_features(&self) -> VirtioFeatures {
        self.device().offered_features()
    }

    /// Reads the backend's size again and, if it changed, updates the
    /// device's capacity (whole 512-byte sectors). Returns the new capacity
    /// in sectors when it changed: tell the front-end
    /// ([`Control::config_changed`](vhost_user_linux::channel::Control::config_changed)).
    pub fn refresh_capacity(&self) -> std::io::Result<Option<u64>> {
        let sectors = self.inner.backend.refresh_capacity()? >> 9;
        match self.device().set_capacity(sectors) {
            Ok(true) => Ok(Some(sectors)),
            Ok(false) => Ok(None),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// The counters of queue `q`.
    pub fn counters(&self, q: u16) -> Option<&QueueCounters> {
        self.inner.counters.get(usize::from(q))
    }

    /// Carries out the request in `segments` now and returns the bytes
    /// written into it (the used length).
    pub fn execute<M: GuestMemory + ?Sized, T: Copy + Into<Segment>>(
        &self,
        queue: u16,
        segments: &[T],
        mem: &M,
        scratch: &mut Scratch,
    ) -> u32 {
        let read = |gpa: u64, dst: &mut [u8]| mem.read(gpa, dst);
        let write = |gpa: u64, src: &[u8]| mem.write(gpa, src);
        let serial: [u8; BLK_ID_BYTES];
        {
            let dev = self.device();
            dev.plan_into(segments, &read, &mut scratch.plan);
            serial = *dev.serial();
        }
        let c = execute(
            &scratch.plan,
            &serial,
            &self.inner.backend,
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

/// The control path (config space, features, reset) and the data path.
impl<B: BlockBackend> Device for BlkService<B> {
    type Scratch = Scratch;

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

    /// A request of a disabled ring (no side effects) completes with
    /// length 0 and touches nothing.
    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        queue: u16,
        chain: &Chain<S>,
        token: Token,
        mem: &M,
        scratch: &mut Scratch,
    ) -> Completion {
        if !token.side_effects() {
            return Completion::Done(0);
        }
        if !self.delay.is_zero() {
            // One request at a time, like a disk with one head: each is
            // due `delay` after the one before it.
            let start = scratch
                .delayed
                .back()
                .map_or_else(Instant::now, |d| d.due.max(Instant::now()));
            scratch.delayed.push_back(Delayed {
                due: start + self.delay,
                token,
                segments: chain.segments().iter().map(|&s| s.into()).collect(),
            });
            return Completion::Later;
        }
        Completion::Done(self.execute(queue, chain.segments(), mem, scratch))
    }

    /// Carries out the held-back requests that are due, oldest first.
    fn poll<M: GuestMemory + ?Sized>(
        &self,
        queue: u16,
        mem: &M,
        scratch: &mut Scratch,
        done: &mut dyn FnMut(Token, u32),
    ) {
        while scratch
            .delayed
            .front()
            .is_some_and(|d| d.due <= Instant::now())
        {
            let Some(d) = scratch.delayed.pop_front() else {
                break;
            };
            let len = self.execute(queue, &d.segments, mem, scratch);
            done(d.token, len);
        }
    }

    fn disconnected(&self) {
        for (q, k) in self.inner.counters.iter().enumerate() {
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

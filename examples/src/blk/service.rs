//! The vhost-user-blk device as the daemon runs it: the core's
//! [`BlkDevice`] (config space, negotiated features, request planning)
//! behind a lock for the control path, a [`BlockBackend`] shared by every
//! queue thread, and per-queue counters. [`BlkService`] is a cheap handle
//! (`Clone`) implementing the core's [`Device`]: the Linux runtime keeps
//! one for the control path and gives each ring's worker another.
//!
//! # Asynchronous I/O
//!
//! Over a backend with a file ([`BlockBackend::io_fd`]), the Linux
//! runtime's path ([`SharedDevice::process_mapped`]) submits reads,
//! writes and flushes as they are popped to the ring's I/O engine (an
//! io_uring, or a pool of threads: [`Aio`]), with iovecs pointing
//! straight into guest memory, and returns [`Completion::Later`];
//! [`SharedDevice::poll_mapped`] reaps the completions, writes each status
//! byte and reports them in the order they finish. The engine is created
//! with the ring's first request and lives in the ring's [`Scratch`]; its
//! eventfd wakes the worker ([`SharedDevice::completion_fd`]). In
//! writethrough mode a write's completion is followed by an `fdatasync`
//! before the request completes. With O_DIRECT, a request whose offset,
//! length or buffers are not aligned as the backend needs
//! ([`BlockBackend::direct_alignment`]) is refused with IOERR (and logged
//! once per ring). Discard and write zeroes go to the engine as
//! `fallocate`s, one range after the other, with the synchronous path's
//! fallbacks (a hole where the file system cannot punch one is no error
//! for a discard; write zeroes falls back from punching a hole to
//! `FALLOC_FL_ZERO_RANGE` to writing zeroes, the last one synchronously).
//! A write that only copies into the page cache
//! ([`BlockBackend::buffered_writes`], and no fdatasync after it) is done
//! at once in the worker with `pwritev`; with the thread pool, so is a
//! read of what the page cache holds (`preadv2` with `RWF_NOWAIT`, as an
//! io_uring copies it while it is submitted), the pool getting what the
//! cache did not hold. A short read or write is
//! resubmitted for the rest; a read that reaches the end of the file
//! zero-fills what is left. GET_ID is carried out at once.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vhost_user_core::dataplane::Token;
use vhost_user_core::device::blk::state::{self as blk_state, AreaShape};
use vhost_user_core::device::blk::{
    BlkDevice, BlkOp, BlkRange, BlkRequest, BlkStatus, BLK_ID_BYTES,
};
use vhost_user_core::device::{Completion, Device, Segment};
use vhost_user_core::feature::VirtioFeatures;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::ConfigWriteKind;
use vhost_user_core::vring::Chain;
use vhost_user_linux::aio::{Aio, AioMode, ThreadBudget};
use vhost_user_linux::backend::{
    bump, InflightArea, InflightAreaMut, RuntimeOptions, SharedDevice,
};
use vhost_user_linux::memory::Mapped;
use vhost_user_linux::sys::memfd;
use vhost_user_linux::sys::mmap::{Access, IoBuf, MmapRegion};
use vhost_user_linux::sys::uring::{perform, read_cached, IoRequest};

use super::file::{unsupported, PUNCH_HOLE, ZERO_RANGE};
use super::{check_range, execute, BlockBackend, DirectAlignment};

/// Submission slots of a ring's io_uring (more requests than this may be
/// in flight: each submission empties it).
const URING_DEPTH: u32 = 128;

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
    /// `fdatasync`s the ring's I/O engine completed (FLUSH requests, and
    /// writes in writethrough mode).
    pub syncs: AtomicU64,
    /// `fallocate`s the ring's I/O engine completed (discard and write
    /// zeroes).
    pub fallocates: AtomicU64,
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
    /// See [`with_aio`](Self::with_aio); `None`: synchronous.
    aio: Option<AioMode>,
    /// The threads of the rings' thread-pool engines, in all.
    io_threads: Arc<ThreadBudget>,
    /// Per ring: a lone request may run in its worker (see
    /// [`with_lone_requests`](Self::with_lone_requests)).
    lone: Arc<[bool]>,
}

impl<B: BlockBackend> Clone for BlkService<B> {
    fn clone(&self) -> Self {
        BlkService {
            inner: Arc::clone(&self.inner),
            delay: self.delay,
            aio: self.aio,
            io_threads: Arc::clone(&self.io_threads),
            lone: Arc::clone(&self.lone),
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

/// A request in the ring's I/O engine.
#[derive(Debug)]
struct Pending {
    token: Token,
    /// The status byte's address.
    status: Option<u64>,
    /// Used lengths on success and on error.
    used_ok: u32,
    used_err: u32,
    /// Bytes the read or write moves (0 for a flush).
    len: usize,
    /// Bytes moved so far (a short transfer resubmits the rest).
    moved: usize,
    op: BlkOp,
    /// Writethrough: an fdatasync follows the write.
    sync_after: bool,
    /// The fdatasync is under way.
    syncing: bool,
    /// With [`BlkService::with_delay`]: not completed before then.
    due: Option<Instant>,
    /// Discard and write zeroes: the ranges and the fallocate under way.
    zeroing: Option<Zeroing>,
    /// A read: the guest ranges the kernel writes into, marked in the
    /// dirty log once it is done (when the front-end logs then).
    written: Vec<(u64, u64)>,
    /// O_DIRECT with guest buffers not aligned for it: the aligned
    /// buffer the I/O uses instead (a read's data is copied to the guest
    /// ranges in `written` once it is done).
    bounce: Option<Arc<MmapRegion>>,
    /// Waits for the disk (counted in [`Scratch::slow`]): anything but a
    /// read from the page cache.
    slow: bool,
}

/// A discard or write zeroes in the engine: its ranges, carried out one
/// after the other.
#[derive(Debug)]
struct Zeroing {
    discard: bool,
    ranges: Vec<BlkRange>,
    /// The range under way.
    next: usize,
    /// Its fallocate mode.
    mode: i32,
}

impl Zeroing {
    /// The first fallocate mode for `r`: punch a hole for a discard, or
    /// for write zeroes that may unmap; else zero the range.
    fn first_mode(&self, r: &BlkRange) -> i32 {
        if self.discard || r.unmap {
            PUNCH_HOLE
        } else {
            ZERO_RANGE
        }
    }

    fn request(&self) -> IoRequest {
        let r = &self.ranges[self.next];
        IoRequest::Fallocate {
            mode: self.mode,
            offset: r.offset,
            len: r.len,
        }
    }
}

/// Per-ring scratch space for request processing.
#[derive(Debug, Default)]
pub struct Scratch {
    plan: BlkRequest,
    bounce: Vec<u8>,
    delayed: VecDeque<Delayed>,
    /// The ring's I/O engine, made with its first request.
    io: Option<Aio>,
    /// The engine could not be made: requests are carried out at once.
    io_failed: bool,
    /// Requests in the engine, by tag.
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Of those, the ones that wait for the disk ([`Pending::slow`]).
    slow: usize,
    /// Requests that waited for the disk, completed since the ring
    /// started ([`SharedDevice::slow_completions`]).
    slow_done: u64,
    /// Reads cannot be tried on the page cache first (`RWF_NOWAIT`
    /// refused): all go to the engine.
    no_cached_reads: bool,
    /// Completions of one reap.
    reaped: Vec<(u64, io::Result<usize>, IoRequest)>,
    /// An unaligned O_DIRECT request was logged.
    warned_alignment: bool,
    /// A bounced O_DIRECT request was logged.
    warned_bounce: bool,
    /// With a delay: requests whose I/O is done, held until they are due
    /// (due, token, used length).
    held: Vec<(Instant, Token, u32)>,
    /// With a delay: when the last request submitted is due.
    last_due: Option<Instant>,
    /// Emptied `Pending::written` lists, reused (no allocation per read).
    spare: Vec<Vec<(u64, u64)>>,
    /// Emptied buffer lists of finished reads and writes, reused (no
    /// allocation per request).
    spare_bufs: Vec<Vec<IoBuf>>,
}

/// Keeps the buffer list of a finished request for the next one.
fn recycle(spare: &mut Vec<Vec<IoBuf>>, request: IoRequest) {
    if let IoRequest::Read { mut bufs, .. } | IoRequest::Write { mut bufs, .. } = request {
        // Dropping the buffers lets go of the mappings they hold.
        bufs.clear();
        spare.push(bufs);
    }
}

impl Scratch {
    /// Requests in the ring's I/O engine.
    pub fn in_flight(&self) -> usize {
        self.io.as_ref().map_or(0, Aio::in_flight)
    }

    /// Scratch for a ring whose reads all go to the I/O engine, as on a
    /// kernel that refuses `RWF_NOWAIT` (found out with a ring's first
    /// read otherwise).
    pub fn without_cached_reads() -> Scratch {
        Scratch {
            no_cached_reads: true,
            ..Scratch::default()
        }
    }
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
            aio: Some(AioMode::IoUring),
            io_threads: ThreadBudget::new(64),
            lone: Arc::new([]),
        }
    }

    /// How the Linux runtime carries out reads, writes and flushes of a
    /// backend with a file: `Some(mode)` asynchronously through an
    /// io_uring or a thread pool per ring, the pools of all the rings
    /// running at most `threads` threads in all, shared as their loads
    /// ask ([`ThreadBudget`]; the default is io_uring, falling back to
    /// pools of 64 threads in all), `None` synchronously in the ring's
    /// worker through a bounce buffer. Clones made afterwards share it.
    pub fn with_aio(mut self, mode: Option<AioMode>, threads: usize) -> Self {
        self.aio = mode;
        self.io_threads = ThreadBudget::new(threads);
        self
    }

    /// The threads the rings' thread pools may run in all, and run now
    /// (see [`with_aio`](Self::with_aio)).
    pub fn io_threads(&self) -> &Arc<ThreadBudget> {
        &self.io_threads
    }

    /// Lets the thread pool of each ring that has its worker thread to
    /// itself (as `options` maps the service's rings to threads) run a
    /// lone read or write in the worker rather than hand it to a pool
    /// thread (see [`Aio::run_lone_requests`]). Clones made afterwards
    /// share it.
    pub fn with_lone_requests(mut self, options: &RuntimeOptions) -> Self {
        let n = u16::try_from(self.inner.counters.len()).unwrap_or(u16::MAX);
        self.lone = (0..n).map(|q| options.alone(q, n)).collect();
        self
    }

    /// Carries out the requests of a ring one after the other, each
    /// `delay` after the previous one finished, like a slow disk with
    /// requests queued in flight (for tests that need requests outstanding
    /// when a ring stops or the daemon dies). With asynchronous I/O the
    /// reads and writes go to the engine at once and their completions
    /// are held back until due. Clones made afterwards share it.
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
        let serial = self.plan(segments, mem, scratch);
        self.execute_planned(queue, &serial, mem, scratch)
    }

    /// Plans the request in `segments` into `scratch.plan`; returns the
    /// serial (for GET_ID).
    fn plan<M: GuestMemory + ?Sized, T: Copy + Into<Segment>>(
        &self,
        segments: &[T],
        mem: &M,
        scratch: &mut Scratch,
    ) -> [u8; BLK_ID_BYTES] {
        let read = |gpa: u64, dst: &mut [u8]| mem.read(gpa, dst);
        let dev = self.device();
        dev.plan_into(segments, &read, &mut scratch.plan);
        *dev.serial()
    }

    /// Carries out the request planned in `scratch.plan` now.
    fn execute_planned<M: GuestMemory + ?Sized>(
        &self,
        queue: u16,
        serial: &[u8; BLK_ID_BYTES],
        mem: &M,
        scratch: &mut Scratch,
    ) -> u32 {
        let read = |gpa: u64, dst: &mut [u8]| mem.read(gpa, dst);
        let write = |gpa: u64, src: &[u8]| mem.write(gpa, src);
        let c = execute(
            &scratch.plan,
            serial,
            &self.inner.backend,
            &read,
            &write,
            &mut scratch.bounce,
        );
        self.count(queue, scratch.plan.op(), c.status);
        c.used_len
    }

    fn count(&self, queue: u16, op: BlkOp, status: BlkStatus) {
        if let Some(k) = self.counters(queue) {
            bump(&k.requests, 1);
            if status != BlkStatus::Ok {
                bump(&k.errors, 1);
            } else {
                match op {
                    BlkOp::Read { len, .. } => {
                        bump(&k.read_bytes, len);
                    }
                    BlkOp::Write { len, .. } => {
                        bump(&k.write_bytes, len);
                    }
                    _ => {}
                }
            }
        }
    }

    /// The ring's engine, made now if it is not yet (`None` if the
    /// backend has no file, the service is synchronous, or it cannot be
    /// made).
    fn engine(&self, queue: u16, scratch: &mut Scratch) -> bool {
        let (Some(mode), Some(fd)) = (self.aio, self.inner.backend.io_fd()) else {
            return false;
        };
        if scratch.io.is_none() && !scratch.io_failed {
            match Aio::with_budget(mode, fd, URING_DEPTH, &self.io_threads) {
                Ok(mut a) => {
                    let lone = self.lone.get(usize::from(queue)).copied().unwrap_or(false);
                    if lone {
                        a.run_lone_requests();
                    }
                    let how = if lone && matches!(a, Aio::Threads(_)) {
                        ", a lone request run by the worker"
                    } else {
                        ""
                    };
                    log::info!("queue {queue}: {} I/O{how}", a.name());
                    scratch.io = Some(a);
                }
                Err(e) => {
                    log::error!("queue {queue}: no asynchronous I/O ({e}); requests are carried out one at a time");
                    scratch.io_failed = true;
                }
            }
        }
        scratch.io.is_some()
    }

    /// Ends a request without (or after) I/O: writes its status byte and
    /// returns the used length.
    fn finish(&self, queue: u16, mem: &Mapped<'_>, p: &Pending, status: BlkStatus) -> u32 {
        self.count(queue, p.op, status);
        let Some(addr) = p.status else { return 0 };
        if mem.write(addr, &[status as u8]).is_err() {
            log::warn!("virtio-blk: cannot write the status byte");
            return 0;
        }
        if status == BlkStatus::Ok {
            p.used_ok
        } else {
            p.used_err
        }
    }

    /// Ends a read or write whose transfer is over (`ok`: all of it
    /// moved): the guest ranges the kernel wrote go into the dirty log
    /// before the request completes (a migration pass that clears the
    /// bits after this copies the new bytes), then [`finish`](Self::finish);
    /// their list goes back to `spare`. Returns the used length.
    fn finish_transfer(
        &self,
        queue: u16,
        mem: &Mapped<'_>,
        p: &mut Pending,
        ok: bool,
        spare: &mut Vec<Vec<(u64, u64)>>,
    ) -> u32 {
        let mut logged = true;
        for &(addr, n) in &p.written {
            logged &= mem.mark(addr, n).is_ok();
        }
        let status = if ok && logged {
            BlkStatus::Ok
        } else {
            BlkStatus::IoErr
        };
        let len = self.finish(queue, mem, p, status);
        let mut written = std::mem::take(&mut p.written);
        written.clear();
        spare.push(written);
        len
    }

    /// Submits the read, write or flush planned in `scratch.plan` to the
    /// ring's engine; `None` if it is not one for the engine (or there is
    /// none): carry it out now.
    fn submit(
        &self,
        queue: u16,
        token: Token,
        mem: &Mapped<'_>,
        scratch: &mut Scratch,
    ) -> Option<Completion> {
        if !self.engine(queue, scratch) {
            return None;
        }
        let plan = &scratch.plan;
        let op = plan.op();
        let (offset, len) = match op {
            BlkOp::Read { offset, len } | BlkOp::Write { offset, len } => (offset, len),
            BlkOp::Flush | BlkOp::Discard | BlkOp::WriteZeroes => (0, 0),
            _ => return None,
        };
        let zeroing = match op {
            BlkOp::Discard | BlkOp::WriteZeroes => {
                // What the backend refuses (read-only, beyond its size)
                // and nothing to do are left to the synchronous path.
                let backend = &self.inner.backend;
                let capacity = backend.capacity();
                let ranges = plan.ranges();
                if backend.read_only()
                    || ranges.is_empty()
                    || ranges
                        .iter()
                        .any(|r| check_range(capacity, r.offset, r.len).is_err())
                {
                    return None;
                }
                let mut z = Zeroing {
                    discard: matches!(op, BlkOp::Discard),
                    ranges: ranges.to_vec(),
                    next: 0,
                    mode: 0,
                };
                z.mode = z.first_mode(&z.ranges[0]);
                Some(z)
            }
            _ => None,
        };
        let mut p = Pending {
            token,
            status: plan.status_addr(),
            used_ok: plan.used_len(BlkStatus::Ok),
            used_err: plan.used_len(BlkStatus::IoErr),
            len: usize::try_from(len).ok()?,
            moved: 0,
            op,
            sync_after: plan.sync_after(),
            syncing: false,
            due: None,
            zeroing: None,
            written: scratch.spare.pop().unwrap_or_default(),
            bounce: None,
            slow: false,
        };
        let direct = self.inner.backend.direct_alignment();
        let read = matches!(op, BlkOp::Read { .. });
        // A read without O_DIRECT copies from the page cache (unless it
        // misses); everything else waits for the disk.
        p.slow = !read || direct.is_some();
        let mut bufs = scratch.spare_bufs.pop().unwrap_or_default();
        let mut bad = None;
        if matches!(op, BlkOp::Read { .. } | BlkOp::Write { .. }) {
            let mut left = len;
            for s in plan.data() {
                if left == 0 {
                    break;
                }
                let n = u64::from(s.len).min(left);
                if mem.inner().io_bufs(s.addr, n, read, &mut bufs).is_err() {
                    bad = Some("a data buffer outside guest memory");
                    break;
                }
                if read {
                    p.written.push((s.addr, n));
                }
                left -= n;
            }
            if bad.is_none() && left != 0 {
                bad = Some("data buffers shorter than the request");
            }
            if bad.is_none() {
                if let Some(a) = direct {
                    if !aligned(offset, len, &bufs, a) {
                        let bounced = if (offset | len) & (u64::from(a.offset.max(1)) - 1) == 0 {
                            bounce(mem, plan.data(), p.len, read)
                        } else {
                            Err("offset or length not aligned")
                        };
                        match bounced {
                            Ok(region) => {
                                match IoBuf::new(&region, 0, p.len, read) {
                                    Ok(b) => {
                                        bufs.clear();
                                        bufs.push(b);
                                        p.bounce = Some(region);
                                    }
                                    Err(_) => bad = Some("bounce buffer"),
                                }
                                if !scratch.warned_bounce {
                                    scratch.warned_bounce = true;
                                    log::info!(
                                        "queue {queue}: guest buffers not aligned for O_DIRECT \
                                         (the image needs {}-byte aligned buffers); such \
                                         requests go through an aligned bounce buffer",
                                        a.memory
                                    );
                                }
                            }
                            Err(why) => {
                                if !scratch.warned_alignment {
                                    scratch.warned_alignment = true;
                                    log::warn!(
                                        "queue {queue}: refusing a request not aligned for \
                                         O_DIRECT (offset {offset}, {len} bytes: {why}; the \
                                         image needs {}-byte offsets and lengths); such \
                                         requests fail with IOERR",
                                        a.offset,
                                    );
                                }
                                bad = Some("not aligned for O_DIRECT");
                            }
                        }
                    }
                }
            }
        }
        if let Some(why) = bad {
            log::debug!("virtio-blk: request refused: {why}");
            return Some(Completion::Done(self.finish(
                queue,
                mem,
                &p,
                BlkStatus::IoErr,
            )));
        }
        if matches!(op, BlkOp::Write { .. })
            && !p.sync_after
            && self.delay.is_zero()
            && self.inner.backend.buffered_writes()
        {
            // Into the page cache: at once, in the worker.
            let mut request = IoRequest::Write { offset, bufs };
            let status = match self.inner.backend.io_fd() {
                Some(fd) => write_now(fd, &mut request),
                None => BlkStatus::IoErr,
            };
            recycle(&mut scratch.spare_bufs, request);
            return Some(Completion::Done(self.finish(queue, mem, &p, status)));
        }
        let mut request = match (op, &zeroing) {
            (BlkOp::Read { .. }, _) => IoRequest::Read { offset, bufs },
            (BlkOp::Write { .. }, _) => IoRequest::Write { offset, bufs },
            (_, Some(z)) => z.request(),
            _ => IoRequest::Sync,
        };
        if read
            && direct.is_none()
            && self.delay.is_zero()
            && !scratch.no_cached_reads
            && matches!(scratch.io, Some(Aio::Threads(_)))
        {
            // What the page cache holds is copied at once, in the
            // worker, as an io_uring would while it is submitted; the
            // threads get only what waits for the disk.
            let cached = match self.inner.backend.io_fd() {
                Some(fd) => read_cached(fd, &request),
                None => Err(io::Error::from(io::ErrorKind::Unsupported)),
            };
            match cached {
                Ok(n) if n == p.len => {
                    let len = self.finish_transfer(queue, mem, &mut p, true, &mut scratch.spare);
                    recycle(&mut scratch.spare_bufs, request);
                    return Some(Completion::Done(len));
                }
                Ok(n) if n > 0 && n < p.len && request.advance(n) => {
                    // The rest was not cached.
                    p.moved = n;
                    p.slow = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => p.slow = true,
                // Refused (a kernel without RWF_NOWAIT, or a policy
                // refusing preadv2): the threads' plain reads remain, and
                // report the errors of the file itself.
                Err(e)
                    if unsupported(&e)
                        || e.kind() == io::ErrorKind::Unsupported
                        || matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
                {
                    log::info!(
                        "queue {queue}: reads cannot be served from the page cache at once ({e}); \
                         all go to the I/O threads"
                    );
                    scratch.no_cached_reads = true;
                }
                // The end of the file, an error: the threads do it again
                // and report it.
                _ => {}
            }
        }
        let slot = match scratch.free.pop() {
            Some(s) => s,
            None => {
                scratch.pending.push(None);
                scratch.pending.len() - 1
            }
        };
        let engine = scratch.io.as_mut()?;
        match engine.push(slot as u64, request) {
            Ok(()) => {
                let mut p = p;
                p.zeroing = zeroing;
                if !self.delay.is_zero() {
                    // One after the other, as in the synchronous path.
                    let start = scratch
                        .last_due
                        .map_or_else(Instant::now, |d| d.max(Instant::now()));
                    p.due = Some(start + self.delay);
                    scratch.last_due = p.due;
                }
                scratch.slow += usize::from(p.slow);
                scratch.pending[slot] = Some(p);
                Some(Completion::Later)
            }
            Err((_, e)) => {
                scratch.free.push(slot);
                log::warn!("queue {queue}: cannot submit a request: {e}");
                Some(Completion::Done(self.finish(
                    queue,
                    mem,
                    &p,
                    BlkStatus::IoErr,
                )))
            }
        }
    }
}

impl<B: BlockBackend> BlkService<B> {
    /// Moves a discard or write zeroes on once its fallocate finished with
    /// `result`: the next fallback for an unsupported mode, else the next
    /// range. `None` once the next fallocate is pushed (under `tag`),
    /// else how the request ends.
    fn zeroing_step(
        &self,
        z: &mut Zeroing,
        result: io::Result<usize>,
        io: &mut Aio,
        tag: u64,
    ) -> Option<io::Result<()>> {
        let mut result = result.map(|_| ());
        loop {
            match result {
                Ok(()) => {
                    z.next += 1;
                    let Some(r) = z.ranges.get(z.next) else {
                        return Some(Ok(()));
                    };
                    z.mode = z.first_mode(r);
                }
                Err(e) if unsupported(&e) => {
                    if z.discard {
                        // A hint the file system cannot take: done.
                        result = Ok(());
                        continue;
                    }
                    if z.mode == PUNCH_HOLE {
                        z.mode = ZERO_RANGE;
                    } else {
                        // Neither: write zeroes (rare; synchronously).
                        let r = z.ranges[z.next];
                        result = self.inner.backend.write_zeroes(r.offset, r.len, false);
                        continue;
                    }
                }
                Err(e) => return Some(Err(e)),
            }
            return match io.push(tag, z.request()) {
                Ok(()) => None,
                Err((_, e)) => Some(Err(e)),
            };
        }
    }
}

/// Carries out a buffered write now (`pwritev`, the rest again after a
/// short one).
fn write_now(fd: BorrowedFd<'_>, request: &mut IoRequest) -> BlkStatus {
    loop {
        match perform(fd, request) {
            Ok(n) if n > 0 => {
                if !request.advance(n) {
                    return BlkStatus::Ok;
                }
            }
            Ok(_) => {
                log::debug!("virtio-blk: a write moved nothing");
                return BlkStatus::IoErr;
            }
            Err(e) => {
                log::debug!("virtio-blk: write failed: {e}");
                return BlkStatus::IoErr;
            }
        }
    }
}

/// An aligned buffer for `len` bytes of an O_DIRECT request whose guest
/// buffers are not aligned (a page-aligned mapping of a memfd); for a
/// write, it holds the data of the guest `segments` already.
fn bounce<T: Copy + Into<Segment>>(
    mem: &Mapped<'_>,
    segments: &[T],
    len: usize,
    read: bool,
) -> Result<Arc<MmapRegion>, &'static str> {
    let fd =
        memfd::create("vhu-bounce", len as u64).map_err(|_| "no memory for a bounce buffer")?;
    let region = MmapRegion::map(fd.as_fd(), 0, len as u64, Access::ReadWrite)
        .map_err(|_| "no memory for a bounce buffer")?;
    if !read {
        let mut at = 0usize;
        let mut chunk = vec![0u8; len.min(1 << 16)];
        for s in segments {
            let s: Segment = (*s).into();
            let n = (s.len as usize).min(len - at);
            let mut done = 0;
            while done < n {
                let k = (n - done).min(chunk.len());
                mem.inner()
                    .read(s.addr + done as u64, &mut chunk[..k])
                    .map_err(|_| "a data buffer outside guest memory")?;
                region
                    .write((at + done) as u64, &chunk[..k])
                    .map_err(|_| "bounce buffer")?;
                done += k;
            }
            at += n;
            if at == len {
                break;
            }
        }
    }
    Ok(Arc::new(region))
}

/// Copies a bounced read's data to the guest ranges it was for.
fn unbounce(mem: &Mapped<'_>, region: &MmapRegion, ranges: &[(u64, u64)]) -> bool {
    let mut chunk = vec![0u8; region.len().min(1 << 16)];
    let mut at = 0u64;
    for &(addr, n) in ranges {
        let mut done = 0;
        while done < n {
            let k = (n - done).min(chunk.len() as u64) as usize;
            if region.read(at + done, &mut chunk[..k]).is_err()
                || mem.inner().write(addr + done, &chunk[..k]).is_err()
            {
                return false;
            }
            done += k as u64;
        }
        at += n;
    }
    true
}

/// `offset` and `len` are multiples of the logical block size, and every
/// buffer's address and length of the memory alignment.
fn aligned(offset: u64, len: u64, bufs: &[IoBuf], a: DirectAlignment) -> bool {
    let off_mask = u64::from(a.offset.max(1)) - 1;
    let mem_mask = a.memory.max(1) as usize - 1;
    (offset | len) & off_mask == 0 && bufs.iter().all(|b| (b.addr() | b.len()) & mem_mask == 0)
}

/// The Linux runtime's data path: reads, writes and flushes go to the
/// ring's I/O engine and complete in [`poll_mapped`](SharedDevice::poll_mapped).
impl<B: BlockBackend + 'static> SharedDevice for BlkService<B> {
    /// The config-space state and the inflight area (the requests
    /// suspended at the stop), in the core's blk state format.
    fn save_state(&self, inflight: Option<InflightArea<'_>>) -> Result<Vec<u8>, String> {
        let (shape, bytes) = match &inflight {
            Some(a) => (
                Some(AreaShape {
                    num_queues: a.num_queues,
                    queue_size: a.queue_size,
                }),
                a.bytes,
            ),
            None => (None, &[][..]),
        };
        let state = self.device().state(shape);
        let mut out = vec![0u8; blk_state::state_len(bytes.len())];
        let mut w = &mut out[..];
        blk_state::save(&mut w, &state, bytes).map_err(|e| e.to_string())?;
        log::info!(
            "device state saved: {} sectors, writeback {}, inflight area {:?}",
            state.capacity,
            state.writeback,
            shape
        );
        Ok(out)
    }

    /// Checks the state against this device and its inflight area (same
    /// disk size, same area layout) and takes it: the driver's cache mode,
    /// and the source's area bytes, which the next ring start resubmits
    /// from.
    fn load_state(
        &mut self,
        state: &[u8],
        inflight: Option<InflightAreaMut<'_>>,
    ) -> Result<(), String> {
        // Loaded into a copy first: the area changes only if all is well.
        let (mine, mut copy) = match &inflight {
            Some(a) => (
                Some(AreaShape {
                    num_queues: a.num_queues,
                    queue_size: a.queue_size,
                }),
                a.bytes.to_vec(),
            ),
            None => (None, Vec::new()),
        };
        let s = blk_state::load(state, &mut copy).map_err(|e| e.to_string())?;
        if s.area.is_some() && s.area != mine {
            return Err(format!(
                "the state's inflight area {:?} is not this connection's {mine:?}",
                s.area
            ));
        }
        self.device().load_state(&s).map_err(|e| e.to_string())?;
        if let (Some(a), Some(_)) = (inflight, s.area) {
            a.bytes.copy_from_slice(&copy);
        }
        log::info!(
            "device state loaded: {} sectors, writeback {}, inflight area {:?}",
            s.capacity,
            s.writeback,
            s.area
        );
        Ok(())
    }

    fn process_mapped<const S: usize>(
        &self,
        queue: u16,
        chain: &Chain<S>,
        token: Token,
        mem: &Mapped<'_>,
        scratch: &mut Scratch,
    ) -> Completion {
        if !token.side_effects() || self.aio.is_none() || scratch.io_failed {
            return self.process(queue, chain, token, mem, scratch);
        }
        let serial = self.plan(chain.segments(), mem, scratch);
        match self.submit(queue, token, mem, scratch) {
            Some(c) => c,
            None => Completion::Done(self.execute_planned(queue, &serial, mem, scratch)),
        }
    }

    fn poll_mapped(
        &self,
        queue: u16,
        mem: &Mapped<'_>,
        scratch: &mut Scratch,
        done: &mut dyn FnMut(Token, u32),
    ) {
        if !self.delay.is_zero() {
            // Requests of the synchronous path (no engine).
            self.poll(queue, mem, scratch, done);
        }
        let Some(io) = scratch.io.as_mut() else {
            return;
        };
        io.submit();
        let reaped = &mut scratch.reaped;
        reaped.clear();
        io.reap(|tag, result, request| reaped.push((tag, result, request)));
        let mut resubmit = false;
        for (tag, result, mut request) in scratch.reaped.drain(..) {
            let Some(slot) = usize::try_from(tag)
                .ok()
                .filter(|&t| t < scratch.pending.len())
            else {
                continue;
            };
            let Some(mut p) = scratch.pending[slot].take() else {
                continue;
            };
            let result = match p.zeroing.as_mut() {
                Some(z) if !p.syncing => {
                    if result.is_ok() {
                        if let Some(k) = self.counters(queue) {
                            bump(&k.fallocates, 1);
                        }
                    }
                    match self.zeroing_step(z, result, io, tag) {
                        Some(r) => r.map(|()| 0),
                        None => {
                            // The next fallocate is in the engine.
                            scratch.pending[slot] = Some(p);
                            resubmit = true;
                            continue;
                        }
                    }
                }
                _ => result,
            };
            if let (Ok(n), false, BlkOp::Read { .. } | BlkOp::Write { .. }) =
                (&result, p.syncing, p.op)
            {
                p.moved = p.moved.saturating_add(*n);
                if p.moved < p.len {
                    if *n > 0 && request.advance(*n) {
                        // A short transfer (a signal, an odd file system):
                        // the rest goes in again.
                        match io.push(tag, request) {
                            Ok(()) => {
                                scratch.pending[slot] = Some(p);
                                resubmit = true;
                                continue;
                            }
                            Err((back, e)) => {
                                request = back;
                                log::debug!("virtio-blk: cannot resubmit the rest: {e}")
                            }
                        }
                    } else if *n == 0 && matches!(p.op, BlkOp::Read { .. }) {
                        // The end of the file (an image that shrank under
                        // its capacity): the rest reads as zeroes, as in
                        // QEMU.
                        if let IoRequest::Read { bufs, .. } = &request {
                            if bufs.iter().all(|b| b.fill_zero().is_ok()) {
                                p.moved = p.len;
                            }
                        }
                    }
                }
            }
            let ok = match &result {
                Ok(_) if p.syncing => true,
                Ok(_) if matches!(p.op, BlkOp::Read { .. } | BlkOp::Write { .. }) => {
                    p.moved == p.len
                }
                Ok(n) => *n == p.len,
                Err(_) => false,
            };
            if ok && (p.syncing || matches!(p.op, BlkOp::Flush)) {
                if let Some(k) = self.counters(queue) {
                    bump(&k.syncs, 1);
                }
            }
            if !ok {
                match &result {
                    Ok(_) => {
                        log::debug!("virtio-blk: short transfer: {} of {} bytes", p.moved, p.len)
                    }
                    Err(e) => log::debug!("virtio-blk: I/O failed: {e}"),
                }
            }
            if ok && p.sync_after && !p.syncing {
                // Writethrough: the write is stable before it completes.
                p.syncing = true;
                match io.push(tag, IoRequest::Sync) {
                    Ok(()) => {
                        scratch.pending[slot] = Some(p);
                        resubmit = true;
                        continue;
                    }
                    Err((_, e)) => {
                        log::debug!("virtio-blk: cannot submit the flush: {e}");
                        let len = self.finish(queue, mem, &p, BlkStatus::IoErr);
                        scratch.free.push(slot);
                        scratch.slow -= usize::from(p.slow);
                        scratch.slow_done += u64::from(p.slow);
                        done(p.token, len);
                        continue;
                    }
                }
            }
            let ok = ok
                && p.bounce
                    .as_ref()
                    .is_none_or(|b| unbounce(mem, b, &p.written));
            p.bounce = None;
            let len = self.finish_transfer(queue, mem, &mut p, ok, &mut scratch.spare);
            scratch.free.push(slot);
            scratch.slow -= usize::from(p.slow);
            scratch.slow_done += u64::from(p.slow);
            recycle(&mut scratch.spare_bufs, request);
            match p.due {
                Some(due) => scratch.held.push((due, p.token, len)),
                None => done(p.token, len),
            }
        }
        if !scratch.held.is_empty() {
            let now = Instant::now();
            scratch.held.retain(|&(due, token, len)| {
                let keep = due > now;
                if !keep {
                    done(token, len);
                }
                keep
            });
        }
        if resubmit {
            io.submit();
        }
    }

    /// None with a delay: held requests become due with time, so the
    /// worker polls.
    fn completion_fd<'a>(&self, _queue: u16, scratch: &'a Scratch) -> Option<BorrowedFd<'a>> {
        if !self.delay.is_zero() {
            return None;
        }
        scratch.io.as_ref().map(Aio::completion_fd)
    }

    /// Reads from the page cache by the thread pool: they come back in a
    /// few microseconds, sooner than the worker would sleep and be woken.
    /// That is where the worker cannot copy cached data itself (no
    /// `RWF_NOWAIT`); where it can, the pool only gets what the cache
    /// did not hold, which waits for the disk. Not with O_DIRECT, nor
    /// while a write, flush, discard or write zeroes is in the engine
    /// (they wait for the disk); nor through an io_uring, which copies a
    /// cached page while it is submitted (a read it holds after that
    /// missed the cache).
    fn quick_io(&self, _queue: u16, scratch: &Scratch) -> bool {
        scratch.slow == 0 && matches!(scratch.io, Some(Aio::Threads(_)))
    }

    fn slow_completions(&self, _queue: u16, scratch: &Scratch) -> u64 {
        scratch.slow_done
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
                "queue {q}: {} requests, {} bytes read, {} bytes written, {} syncs, {} fallocates, {} errors",
                k.requests.load(Ordering::Relaxed),
                k.read_bytes.load(Ordering::Relaxed),
                k.write_bytes.load(Ordering::Relaxed),
                k.syncs.load(Ordering::Relaxed),
                k.fallocates.load(Ordering::Relaxed),
                k.errors.load(Ordering::Relaxed),
            );
        }
    }
}

//! The back-end runtime: serves front-ends on a Unix socket, one at a time,
//! driving the core's [`Session`] and one worker thread per running ring.
//!
//! The control thread reads a message and its fds, lets the session decide,
//! and carries out the [`Action`]s: it maps and unmaps guest memory, hands
//! eventfds to workers, starts and stops them. A GET_VRING_BASE on a running
//! ring stops its worker, which completes the requests it had taken (the
//! device processes each request to the end before taking the next), hands
//! its ring back, and only then is the reply sent.
//!
//! When a front-end leaves, or sends a message the session refuses, every
//! worker is stopped, every mapping and fd of that connection is released,
//! and the next front-end is accepted.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use std::collections::VecDeque;
use vhost_user_core::backend::{
    Action, BackendConfig, BackendDevice, BackendError, Reply, Session,
};
use vhost_user_core::message::{HEADER_SIZE, MAX_MESSAGE};

use vhost_user_core::inflight::{
    packed_chain, packed_used_at, InflightError, PackedDescCopy, PackedInflight, Resubmit,
    SplitInflight,
};
use vhost_user_core::vring::packed::PackedQueue;
use vhost_user_core::vring::{Chain, Queue, RingAddrs, VringError};

use crate::memory::LinuxGuestMemory;
use crate::sys::epoll::{Epoll, EpollEvent, Interest};
use crate::sys::eventfd::EventFd;
use crate::sys::socket::{Listener, Stream};

/// The data path of a device: what a ring's worker does with each chain.
pub trait QueueDevice: Send + Sync + 'static {
    /// Per-worker scratch space.
    type Scratch: Default + Send;

    /// Processes one chain of `queue` and returns the bytes written into it.
    /// With `side_effects` false (started but disabled ring) the chain is
    /// consumed without side effects.
    fn process(
        &self,
        queue: u16,
        chain: &Chain,
        mem: &LinuxGuestMemory,
        side_effects: bool,
        scratch: &mut Self::Scratch,
    ) -> u32;

    /// Whether a started but disabled ring is consumed (each chain
    /// processed with `side_effects` false, e.g. a network device dropping
    /// TX packets) rather than left in the ring until it is enabled again.
    /// The default, false, suits storage: a disabled ring is paused, and
    /// requests taken while it was enabled still complete normally.
    fn consume_while_disabled(&self) -> bool {
        false
    }

    /// Called when a front-end disconnects (log counters, drop state).
    fn disconnected(&self) {}
}

/// Counters of one ring's worker.
#[derive(Debug, Default)]
pub struct RingCounters {
    /// Chains completed.
    pub completed: AtomicU64,
    /// Calls (interrupts) sent.
    pub calls: AtomicU64,
    /// Batches whose call was suppressed (EVENT_IDX / NO_INTERRUPT).
    pub suppressed: AtomicU64,
    /// Kicks received.
    pub kicks: AtomicU64,
}

/// How the runtime treats guest-caused ring errors and idle polling.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeOptions {
    /// Completions published per batch at most (one used-index store and at
    /// most one call per batch).
    pub batch: usize,
    /// Sleep between polls of a ring in polling mode (no kick fd).
    pub poll_interval: Duration,
    /// How long a worker that ran out of requests keeps polling its ring
    /// before it sleeps on the kick fd (QEMU's event loop does the same):
    /// a wake-up costs more than a short spin on a busy ring.
    pub spin: Duration,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            batch: 64,
            poll_interval: Duration::from_micros(50),
            spin: Duration::from_micros(50),
        }
    }
}

struct Shared {
    /// Our own notifier to wake the worker (stop, enable, new kick fd,
    /// remap); the front-end's kick fd is never written by us.
    wake: EventFd,
    stop: AtomicBool,
    /// With `stop`: leave fetched requests recorded in the inflight area
    /// instead of completing them (GET_VRING_BASE_INFLIGHT).
    suspend: AtomicBool,
    enabled: AtomicBool,
    kick: Mutex<Option<Arc<EventFd>>>,
    call: Mutex<Option<Arc<EventFd>>>,
    remap: Mutex<Option<RingAddrs>>,
    remap_pending: AtomicBool,
    counters: RingCounters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn wake(&self) {
        // Cannot fail for 1 unless the counter is near overflow, which
        // only our own writes could cause, and the worker resets it.
        let _ = self.wake.write(1);
    }
}

struct Worker {
    shared: Arc<Shared>,
    handle: JoinHandle<Queue>,
}

/// Per-ring state the control thread keeps.
#[derive(Default)]
struct RingFds {
    kick: Option<Arc<EventFd>>,
    call: Option<Arc<EventFd>>,
    err: Option<Arc<EventFd>>,
}

/// One front-end connection's state.
struct Connection<D: QueueDevice, const Q: usize, const R: usize> {
    session: Session<Q, R>,
    device: Arc<D>,
    memory: Arc<RwLock<LinuxGuestMemory>>,
    rings: Vec<RingFds>,
    workers: Vec<Option<Worker>>,
    options: RuntimeOptions,
    /// The area of SET_INFLIGHT_FD.
    inflight: Option<Arc<LinuxGuestMemory>>,
    /// The fd created for GET_INFLIGHT_FD, sent with its reply.
    inflight_reply_fd: Option<OwnedFd>,
    /// Per ring: whether the pending stop suspends.
    suspend: Vec<bool>,
}

/// Why a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The front-end closed the socket.
    Closed,
    /// The front-end sent something the session refused.
    Refused(BackendError),
    /// Socket I/O failed.
    Io(io::Error),
}

impl<D, const Q: usize, const R: usize> Connection<D, Q, R>
where
    D: QueueDevice,
    for<'a> &'a D: BackendDevice,
{
    fn new(
        config: BackendConfig,
        device: Arc<D>,
        options: RuntimeOptions,
    ) -> Result<Self, BackendError> {
        let session = Session::new(config)?;
        let n = usize::from(config.num_queues);
        Ok(Connection {
            session,
            device,
            memory: Arc::new(RwLock::new(LinuxGuestMemory::new())),
            rings: (0..n).map(|_| RingFds::default()).collect(),
            workers: (0..n).map(|_| None).collect(),
            options,
            inflight: None,
            inflight_reply_fd: None,
            suspend: vec![false; n],
        })
    }

    fn serve(&mut self, stream: &Stream) -> ConnectionEnd {
        let mut buf = Box::new([0u8; MAX_MESSAGE]);
        let mut out = Box::new([0u8; MAX_MESSAGE]);
        loop {
            let rx = match stream.recv_message(&mut buf) {
                Ok(Some(rx)) => rx,
                Ok(None) => return ConnectionEnd::Closed,
                Err(e) => return ConnectionEnd::Io(e),
            };
            let payload = &buf[HEADER_SIZE..HEADER_SIZE + rx.header.size as usize];
            let mut fds: Vec<Option<OwnedFd>> = rx.fds.into_iter().map(Some).collect();
            let result = {
                let mem = self.memory.read().unwrap_or_else(PoisonError::into_inner);
                let mut ctl = &*self.device;
                self.session.handle(
                    &rx.header,
                    payload,
                    fds.len(),
                    &*mem,
                    &mut ctl,
                    &mut out[..],
                )
            };
            let outcome = match result {
                Ok(o) => o,
                Err(e) => return ConnectionEnd::Refused(e),
            };
            if let Some(e) = outcome.refused {
                warn!("request {} refused: {e}", rx.header.request);
            }
            for action in outcome.actions {
                if let Err(e) = self.apply(action, &mut fds) {
                    return ConnectionEnd::Refused(e);
                }
            }
            let reply = match outcome.reply {
                Reply::None => None,
                Reply::Ready(n) => Some(n),
                Reply::Pending { queue } => match self.stop_worker(queue, self.suspend_of(queue)) {
                    Some(ring) => match self.session.finish_stop(queue, &ring, &mut out[..]) {
                        Ok(n) => Some(n),
                        Err(e) => return ConnectionEnd::Refused(e),
                    },
                    None => return ConnectionEnd::Refused(BackendError::NotStopping(queue)),
                },
            };
            if let Some(n) = reply {
                // GET_INFLIGHT_FD's reply carries the new area's fd; ours is
                // closed once sent.
                let fd = self.inflight_reply_fd.take();
                let fds: Vec<std::os::fd::BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
                if let Err(e) = stream.send_message(&out[..n], &fds) {
                    return ConnectionEnd::Io(e);
                }
            }
            // fds no action took are closed here.
            drop(fds);
        }
    }

    fn take_fd(fds: &mut [Option<OwnedFd>], i: u8) -> Result<OwnedFd, BackendError> {
        fds.get_mut(usize::from(i))
            .and_then(Option::take)
            .ok_or(BackendError::Wire(
                vhost_user_core::message::WireError::MissingFds {
                    needed: i + 1,
                    got: 0,
                },
            ))
    }

    fn eventfd(
        fds: &mut [Option<OwnedFd>],
        i: Option<u8>,
    ) -> Result<Option<Arc<EventFd>>, BackendError> {
        i.map(|i| Self::take_fd(fds, i).map(|fd| Arc::new(EventFd::from(fd))))
            .transpose()
    }

    fn apply(&mut self, action: Action, fds: &mut [Option<OwnedFd>]) -> Result<(), BackendError> {
        match action {
            Action::UnmapAll => self.memory_mut().clear(),
            Action::MapRegion { slot, fd, region } => {
                let fd = Self::take_fd(fds, fd)?;
                self.memory_mut()
                    .map(usize::from(slot), region, fd)
                    .map_err(|e| {
                        error!("cannot map guest memory region {slot}: {e}");
                        BackendError::Memory(vhost_user_core::memory::MemoryError::BadRegion)
                    })?;
            }
            Action::UnmapRegion { slot } => self.memory_mut().unmap(usize::from(slot)),
            Action::RemapRings => {
                for (q, w) in self.workers.iter().enumerate() {
                    if let Some(w) = w {
                        let addrs = self.session.ring_addrs(q as u16)?;
                        *lock(&w.shared.remap) = Some(addrs);
                        w.shared.remap_pending.store(true, Ordering::Release);
                        w.shared.wake();
                    }
                }
            }
            Action::SetKick { queue, fd } => {
                let kick = Self::eventfd(fds, fd)?;
                let q = usize::from(queue);
                if let Some(w) = &self.workers[q] {
                    *lock(&w.shared.kick) = kick.clone();
                    w.shared.wake();
                }
                self.rings[q].kick = kick;
            }
            Action::SetCall { queue, fd } => {
                let call = Self::eventfd(fds, fd)?;
                let q = usize::from(queue);
                if let Some(w) = &self.workers[q] {
                    *lock(&w.shared.call) = call.clone();
                }
                self.rings[q].call = call;
            }
            Action::SetErr { queue, fd } => {
                self.rings[usize::from(queue)].err = Self::eventfd(fds, fd)?;
            }
            Action::StartRing {
                queue,
                ring,
                enabled,
                inflight,
            } => {
                let area = match (inflight, &self.inflight) {
                    (Some(off), Some(a)) => Some((Arc::clone(a), off)),
                    (Some(_), None) => {
                        // The session only names an area it was given.
                        return Err(BackendError::Inflight(
                            vhost_user_core::inflight::InflightError::TooSmall { need: 1, have: 0 },
                        ));
                    }
                    _ => None,
                };
                self.start_worker(queue, ring, enabled, area)
            }
            Action::StopRing { queue, suspend } => {
                // The reply is pending; the worker is stopped when it is
                // sent (see `serve`).
                debug!("ring {queue} stopping (suspend: {suspend})");
                if let Some(s) = self.suspend.get_mut(usize::from(queue)) {
                    *s = suspend;
                }
            }
            Action::CreateInflight { size } => {
                let fd = crate::sys::memfd::create_sealed("vhu-inflight", size).map_err(|e| {
                    error!("cannot create the inflight area: {e}");
                    BackendError::Inflight(vhost_user_core::inflight::InflightError::TooSmall {
                        need: size,
                        have: 0,
                    })
                })?;
                self.inflight_reply_fd = Some(fd);
            }
            Action::MapInflight { fd, offset, size } => {
                let fd = Self::take_fd(fds, fd)?;
                let area = LinuxGuestMemory::single(fd, offset, size).map_err(|e| {
                    error!("cannot map the inflight area: {e}");
                    BackendError::Inflight(vhost_user_core::inflight::InflightError::TooSmall {
                        need: size,
                        have: 0,
                    })
                })?;
                info!("inflight area of {size} bytes mapped");
                self.inflight = Some(Arc::new(area));
            }
            Action::UnmapInflight => self.inflight = None,
            Action::SetEnabled { queue, enabled } => {
                if let Some(w) = &self.workers[usize::from(queue)] {
                    w.shared.enabled.store(enabled, Ordering::Release);
                    w.shared.wake();
                }
            }
            Action::ResetRings => {
                for q in 0..self.workers.len() {
                    let _ = self.stop_worker(q as u16, false);
                    self.rings[q] = RingFds::default();
                }
                self.session.rings_reset();
            }
        }
        Ok(())
    }

    fn memory_mut(&self) -> std::sync::RwLockWriteGuard<'_, LinuxGuestMemory> {
        self.memory.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn suspend_of(&self, queue: u16) -> bool {
        self.suspend
            .get(usize::from(queue))
            .copied()
            .unwrap_or(false)
    }

    fn start_worker(
        &mut self,
        queue: u16,
        ring: Queue,
        enabled: bool,
        inflight: Option<(Arc<LinuxGuestMemory>, u64)>,
    ) {
        let q = usize::from(queue);
        let (wake, waiter) = match EventFd::new(true).and_then(|w| Ok((w, Waiter::new()?))) {
            Ok(x) => x,
            Err(e) => {
                error!("cannot set up ring {queue}'s notifiers: {e}");
                return;
            }
        };
        let shared = Arc::new(Shared {
            wake,
            suspend: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            enabled: AtomicBool::new(enabled),
            kick: Mutex::new(self.rings[q].kick.clone()),
            call: Mutex::new(self.rings[q].call.clone()),
            remap: Mutex::new(None),
            remap_pending: AtomicBool::new(false),
            counters: RingCounters::default(),
        });
        let device = Arc::clone(&self.device);
        let memory = Arc::clone(&self.memory);
        let s = Arc::clone(&shared);
        let options = self.options;
        let spawned = std::thread::Builder::new()
            .name(format!("vhu-ring-{queue}"))
            .spawn(move || {
                run_ring(
                    queue, ring, &*device, &memory, &s, waiter, inflight, options,
                )
            });
        match spawned {
            Ok(handle) => self.workers[q] = Some(Worker { shared, handle }),
            Err(e) => error!("cannot start a thread for ring {queue}: {e}"),
        }
    }

    /// Stops a ring's worker and returns its ring.
    fn stop_worker(&mut self, queue: u16, suspend: bool) -> Option<Queue> {
        let w = self.workers.get_mut(usize::from(queue))?.take()?;
        w.shared.suspend.store(suspend, Ordering::Release);
        w.shared.stop.store(true, Ordering::Release);
        w.shared.wake();
        let c = &w.shared.counters;
        let ring = match w.handle.join() {
            Ok(ring) => ring,
            Err(_) => {
                error!("ring {queue} worker panicked");
                return None;
            }
        };
        info!(
            "ring {queue} stopped: {} requests, {} kicks, {} calls, {} calls suppressed",
            c.completed.load(Ordering::Relaxed),
            c.kicks.load(Ordering::Relaxed),
            c.calls.load(Ordering::Relaxed),
            c.suppressed.load(Ordering::Relaxed),
        );
        Some(ring)
    }

    fn teardown(&mut self) {
        // A front-end that leaves does not stop its rings: with an
        // inflight area, what is in flight stays recorded for the next
        // back-end; without one, it is completed.
        let keep = self.inflight.is_some();
        for q in 0..self.workers.len() {
            let _ = self.stop_worker(q as u16, keep);
        }
        self.rings.clear();
        self.inflight = None;
        self.memory_mut().clear();
        self.session.rings_reset();
        self.device.disconnected();
    }
}

/// Most recorded requests a ring resubmits after a restart (rings with
/// inflight tracking are at most this large).
pub const MAX_RESUBMIT: usize = 1024;

/// Where a ring records its requests.
enum Tracker {
    None,
    Split(SplitInflight),
    Packed(PackedInflight),
}

/// A request taken from the ring and not yet completed: its chain and its
/// inflight record (split: the head index; packed: the area entry).
struct Taken {
    chain: Chain,
    entry: u16,
    /// Taken while the ring was enabled: carried out in full.
    side_effects: bool,
}

/// Opens the ring's inflight region, repairs it and returns the requests to
/// resubmit, positioning the ring after them.
fn recover(
    ring: &mut Queue,
    mem: &LinuxGuestMemory,
    area: &LinuxGuestMemory,
    off: u64,
) -> Result<(Tracker, VecDeque<Taken>), InflightError> {
    let mut list: Box<heapless::Vec<Resubmit, MAX_RESUBMIT>> = Box::default();
    let mut out = VecDeque::new();
    match ring {
        Queue::Split(s) => {
            let (mut t, fresh) = SplitInflight::open(area, off, s.size())?;
            if !fresh {
                let used = s.next_used();
                t.recover(area, used, &mut list)?;
                s.set_next_avail(used.wrapping_add(list.len() as u16));
                for r in list.iter() {
                    let mut chain = Chain::new();
                    s.chain_at(mem, r.head, &mut chain)?;
                    out.push_back(Taken {
                        chain,
                        entry: r.head,
                        side_effects: true,
                    });
                }
            }
            Ok((Tracker::Split(t), out))
        }
        Queue::Packed(p) => {
            let (mut t, fresh) = PackedInflight::open(area, off, p.size(), p.next_used())?;
            if !fresh {
                let ring_now: &PackedQueue = p;
                let pos = t.recover(
                    area,
                    |slot, wrap| packed_used_at(mem, ring_now, slot, wrap),
                    &mut list,
                )?;
                p.set_base(pos.base())?;
                let indirect = p.features().indirect;
                let mut descs: heapless::Vec<PackedDescCopy, MAX_RESUBMIT> = heapless::Vec::new();
                for r in list.iter() {
                    t.descriptors(area, r.head, &mut descs)?;
                    let mut chain = Chain::new();
                    packed_chain(mem, indirect, &descs, &mut chain)?;
                    out.push_back(Taken {
                        chain,
                        entry: r.head,
                        side_effects: true,
                    });
                }
            }
            Ok((Tracker::Packed(t), out))
        }
    }
}

/// A ring's worker: processes the ring until told to stop, then returns it.
#[allow(clippy::too_many_arguments)]
fn run_ring<D: QueueDevice>(
    queue: u16,
    mut ring: Queue,
    device: &D,
    memory: &RwLock<LinuxGuestMemory>,
    shared: &Shared,
    mut waiter: Waiter,
    inflight: Option<(Arc<LinuxGuestMemory>, u64)>,
    options: RuntimeOptions,
) -> Queue {
    if let Err(e) = waiter.epoll.add(&shared.wake, Interest::READABLE, WAKE) {
        error!("ring {queue}: cannot watch the wake fd: {e}");
    }
    let mut w = WorkerState {
        queue,
        tracker: Tracker::None,
        area: None,
        taken: VecDeque::new(),
        done: Vec::with_capacity(options.batch),
        scratch: D::Scratch::default(),
    };
    let mut broken = false;
    if let Some((area, off)) = inflight {
        let mem = memory.read().unwrap_or_else(PoisonError::into_inner);
        match recover(&mut ring, &mem, &area, off) {
            Ok((tracker, taken)) => {
                if !taken.is_empty() {
                    info!(
                        "ring {queue}: resubmitting {} requests from the inflight area",
                        taken.len()
                    );
                }
                w.tracker = tracker;
                w.taken = taken;
                w.area = Some(area);
            }
            Err(e) => {
                error!(
                    "ring {queue}: inflight area refused: {e}; the ring is stopped until restarted"
                );
                broken = true;
            }
        }
    }
    loop {
        if shared.stop.load(Ordering::Acquire) {
            // Without an area nothing can be suspended: complete it all.
            let suspend = shared.suspend.load(Ordering::Acquire) && w.area.is_some();
            if !suspend && !broken && !w.taken.is_empty() {
                let mem = memory.read().unwrap_or_else(PoisonError::into_inner);
                while !w.taken.is_empty() {
                    if let Err(e) = w.complete(&mut ring, device, &mem, shared, options, false) {
                        error!("ring {queue}: {e}");
                        break;
                    }
                }
            }
            return ring;
        }
        if shared.remap_pending.swap(false, Ordering::AcqRel) {
            if let Some(addrs) = lock(&shared.remap).take() {
                if let Err(e) = ring.set_addrs(addrs) {
                    error!("ring {queue}: cannot move to new addresses: {e}");
                    broken = true;
                }
            }
        }
        let mut idle = broken;
        let mut paused = false;
        if !broken {
            let mem = memory.read().unwrap_or_else(PoisonError::into_inner);
            // A disabled ring is paused (unless the device consumes it):
            // sleep until SET_VRING_ENABLE wakes us.
            paused = !shared.enabled.load(Ordering::Acquire) && !device.consume_while_disabled();
            match w.drain(&mut ring, device, &mem, shared, options) {
                Ok(_) if paused => idle = true,
                Ok(more) => {
                    if !more {
                        // Re-arm notifications, then look once more so a
                        // request published meanwhile is not slept on.
                        idle = !matches!(ring.enable_notification(&*mem), Ok(true));
                    }
                }
                Err(e) => {
                    error!("ring {queue}: {e}; the ring is stopped until restarted");
                    broken = true;
                    idle = true;
                }
            }
        }
        if idle && !broken && !paused && !options.spin.is_zero() {
            // Poll a little before sleeping (notifications stay armed, so
            // a kick meanwhile is only a spurious wake-up later).
            let deadline = Instant::now() + options.spin;
            let done = shared.counters.completed.load(Ordering::Relaxed);
            while idle && Instant::now() < deadline {
                if shared.stop.load(Ordering::Acquire)
                    || shared.remap_pending.load(Ordering::Acquire)
                {
                    idle = false;
                    break;
                }
                let mem = memory.read().unwrap_or_else(PoisonError::into_inner);
                if w.drain(&mut ring, device, &mem, shared, options).is_err() {
                    // Reported by the next round of the main loop.
                    idle = false;
                }
                if shared.counters.completed.load(Ordering::Relaxed) != done {
                    idle = false;
                }
                std::hint::spin_loop();
            }
        }
        if idle {
            waiter.wait(queue, shared, options);
        }
    }
}

/// Why a worker stopped processing its ring.
#[derive(Debug)]
enum WorkerError {
    Vring(VringError),
    Inflight(InflightError),
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerError::Vring(e) => write!(f, "{e}"),
            WorkerError::Inflight(e) => write!(f, "inflight area: {e}"),
        }
    }
}

impl From<VringError> for WorkerError {
    fn from(e: VringError) -> Self {
        WorkerError::Vring(e)
    }
}

impl From<InflightError> for WorkerError {
    fn from(e: InflightError) -> Self {
        WorkerError::Inflight(e)
    }
}

struct WorkerState<S> {
    queue: u16,
    tracker: Tracker,
    area: Option<Arc<LinuxGuestMemory>>,
    /// Fetched (and recorded) but not completed, in order.
    taken: VecDeque<Taken>,
    /// Entries of the batch being completed.
    done: Vec<u16>,
    scratch: S,
}

impl<S> WorkerState<S> {
    /// Takes up to a batch from the ring, recording each fetch, then
    /// completes them; `Ok(true)` if more may be available.
    fn drain<D: QueueDevice<Scratch = S>>(
        &mut self,
        ring: &mut Queue,
        device: &D,
        mem: &LinuxGuestMemory,
        shared: &Shared,
        options: RuntimeOptions,
    ) -> Result<bool, WorkerError> {
        let mut more = true;
        let enabled = shared.enabled.load(Ordering::Acquire);
        let take = enabled || device.consume_while_disabled();
        while take && self.taken.len() < options.batch {
            let before = match ring {
                Queue::Packed(p) => p.next_avail(),
                Queue::Split(_) => (0, false),
            };
            let mut chain = Chain::new();
            if !ring.pop_into(mem, &mut chain)? {
                more = false;
                break;
            }
            let entry = self.record_fetch(ring, mem, &chain, before)?;
            self.taken.push_back(Taken {
                chain,
                entry,
                side_effects: enabled,
            });
        }
        if !self.taken.is_empty() {
            self.complete(ring, device, mem, shared, options, true)?;
        }
        Ok(more || !self.taken.is_empty())
    }

    fn record_fetch(
        &mut self,
        ring: &Queue,
        mem: &LinuxGuestMemory,
        chain: &Chain,
        before: (u16, bool),
    ) -> Result<u16, WorkerError> {
        let head = chain.head();
        let Some(area) = self.area.as_deref() else {
            return Ok(head.id);
        };
        match &mut self.tracker {
            Tracker::None => Ok(head.id),
            Tracker::Split(t) => {
                t.fetched(area, head.id)?;
                Ok(head.id)
            }
            Tracker::Packed(t) => match ring {
                Queue::Packed(p) => Ok(t.fetched_from_ring(area, mem, p, before.0, head.descs)?),
                Queue::Split(_) => Ok(head.id),
            },
        }
    }

    /// Processes the taken requests in order and publishes them as one
    /// batch. With `may_suspend`, stops early when a suspending stop is
    /// requested: the rest stay taken (and recorded).
    fn complete<D: QueueDevice<Scratch = S>>(
        &mut self,
        ring: &mut Queue,
        device: &D,
        mem: &LinuxGuestMemory,
        shared: &Shared,
        options: RuntimeOptions,
        may_suspend: bool,
    ) -> Result<(), WorkerError> {
        self.done.clear();
        while self.done.len() < options.batch {
            if may_suspend
                && self.area.is_some()
                && shared.stop.load(Ordering::Acquire)
                && shared.suspend.load(Ordering::Acquire)
            {
                break;
            }
            let Some(t) = self.taken.pop_front() else {
                break;
            };
            let len = device.process(self.queue, &t.chain, mem, t.side_effects, &mut self.scratch);
            ring.add_used(mem, t.chain.head(), len)?;
            self.done.push(t.entry);
        }
        if self.done.is_empty() {
            return Ok(());
        }
        let area = self.area.as_deref();
        match (&self.tracker, area) {
            (Tracker::Split(t), Some(a)) => t.batch_begin(a, &self.done)?,
            (Tracker::Packed(t), Some(a)) => t.batch_begin(a, &self.done)?,
            _ => {}
        }
        let c = &shared.counters;
        c.completed
            .fetch_add(self.done.len() as u64, Ordering::Relaxed);
        let notify = ring.flush_used(mem)?;
        match (&self.tracker, area, &*ring) {
            (Tracker::Split(t), Some(a), Queue::Split(s)) => {
                t.batch_end(a, &self.done, s.next_used())?
            }
            (Tracker::Packed(t), Some(a), _) => t.batch_end(a, &self.done)?,
            _ => {}
        }
        if notify {
            if let Some(call) = lock(&shared.call).as_ref() {
                let _ = call.write(1);
                c.calls.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            c.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

const WAKE: u64 = 0;
const KICK: u64 = 1;

/// A worker's epoll set: its wake fd and the ring's current kick fd.
struct Waiter {
    epoll: Epoll,
    kick: Option<Arc<EventFd>>,
}

impl Waiter {
    fn new() -> io::Result<Waiter> {
        Ok(Waiter {
            epoll: Epoll::new()?,
            kick: None,
        })
    }

    /// Sleeps until the front-end kicks or the control thread wakes us (in
    /// polling mode, at most one poll interval). Both counters are reset.
    fn wait(&mut self, queue: u16, shared: &Shared, options: RuntimeOptions) {
        let current = lock(&shared.kick).clone();
        let same = match (&self.kick, &current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            if let Some(old) = self.kick.take() {
                let _ = self.epoll.delete(&*old);
            }
            if let Some(k) = &current {
                match self.epoll.add(&**k, Interest::READABLE, KICK) {
                    Ok(()) => self.kick = current.clone(),
                    Err(e) => error!("ring {queue}: cannot watch the kick fd: {e}"),
                }
            }
        }
        // Without a kick fd the ring is polled.
        let timeout = if self.kick.is_some() {
            -1
        } else {
            i32::try_from(options.poll_interval.as_millis()).unwrap_or(i32::MAX)
        };
        let mut events = [EpollEvent::default(); 2];
        if timeout == 0 {
            std::thread::sleep(options.poll_interval);
        } else if let Err(e) = self.epoll.wait(&mut events, timeout) {
            warn!("ring {queue}: epoll_wait failed: {e}");
            std::thread::sleep(options.poll_interval);
        }
        // Reset both counters; the fds may be non-blocking (QEMU's are) or
        // blocking, so only read those that are signalled.
        if let Some(k) = &self.kick {
            if matches!(k.is_signalled(), Ok(true)) && k.read().is_ok() {
                shared.counters.kicks.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = shared.wake.read();
    }
}

/// Serves front-ends on `listener`, one at a time, until `stop` is set (the
/// caller then wakes the accept, e.g. by connecting once).
pub fn serve<D, const Q: usize, const R: usize>(
    listener: &Listener,
    config: BackendConfig,
    device: Arc<D>,
    options: RuntimeOptions,
    stop: &AtomicBool,
) -> Result<(), BackendError>
where
    D: QueueDevice,
    for<'a> &'a D: BackendDevice,
{
    // Refuse a bad configuration before accepting anyone.
    Session::<Q, R>::new(config)?;
    while !stop.load(Ordering::Acquire) {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if stop.load(Ordering::Acquire) {
            break;
        }
        info!("front-end connected");
        serve_one::<D, Q, R>(&stream, config, Arc::clone(&device), options);
    }
    Ok(())
}

/// Serves one front-end connection to its end.
pub fn serve_one<D, const Q: usize, const R: usize>(
    stream: &Stream,
    config: BackendConfig,
    device: Arc<D>,
    options: RuntimeOptions,
) -> ConnectionEnd
where
    D: QueueDevice,
    for<'a> &'a D: BackendDevice,
{
    let mut conn = match Connection::<D, Q, R>::new(config, device, options) {
        Ok(c) => c,
        Err(e) => return ConnectionEnd::Refused(e),
    };
    let end = conn.serve(stream);
    let f = conn.session.features();
    let p = conn.session.protocol_features();
    match &end {
        ConnectionEnd::Closed => info!(
            "front-end disconnected (features {:#x}, protocol features {:#x})",
            f.bits(),
            p.bits()
        ),
        ConnectionEnd::Refused(e) => error!("front-end error, disconnecting: {e}"),
        ConnectionEnd::Io(e) => error!("front-end socket error, disconnecting: {e}"),
    }
    conn.teardown();
    let _ = stream.as_fd();
    end
}

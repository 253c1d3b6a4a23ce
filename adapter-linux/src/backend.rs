//! The back-end runtime: serves front-ends on a Unix socket, one at a time,
//! driving the core's [`Session`] and worker threads serving the running
//! rings: one per ring, or [`RuntimeOptions::threads`] threads each serving
//! the rings mapped to it (ring `q` on thread `q % threads`).
//!
//! The control thread reads a message and its fds, lets the session decide,
//! and carries out the [`Action`]s: it maps and unmaps guest memory, hands
//! eventfds to workers, starts and stops them. A worker is threads and
//! syscalls only: it waits on epoll for kicks, and calls the ring's
//! [`DataPlane`] (pop, complete, publish, stop) and the [`Device`] (process,
//! poll); every virtio rule is in the core. A GET_VRING_BASE on a running
//! ring stops its worker, which drains or suspends as the data plane says,
//! and only then is the reply sent.
//!
//! When a front-end leaves, or sends a message the session refuses, every
//! worker is stopped, every mapping and fd of that connection is released,
//! and the next front-end is accepted.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vhost_user_core::backend::{
    Action, BackendConfig, BackendError, FdAccess, FdIndex, MessageFds, Reply, Session,
};
use vhost_user_core::dataplane::{DataPlane, Published, Stop, Token};
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::log::{DirtyLog, LoggedMemory};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{DeviceStateDirection, HEADER_SIZE, MAX_MESSAGE};
use vhost_user_core::vring::{Chain, RingAddrs};

use crate::channel::{BackChannel, Control};
use crate::memory::{LinuxGuestMemory, Mapped};
use crate::sys::epoll::{Epoll, EpollEvent, Interest};
use crate::sys::eventfd::EventFd;
use crate::sys::socket::{Listener, Stream};

/// Counters of one ring's worker.
#[derive(Debug, Default)]
pub struct RingCounters {
    /// Chains completed.
    pub completed: AtomicU64,
    /// Calls (interrupts) sent.
    pub calls: AtomicU64,
    /// Batches whose call was suppressed (EVENT_IDX / NO_INTERRUPT).
    pub suppressed: AtomicU64,
    /// Kicks received (on the kick eventfd, or in-band VRING_KICK).
    pub kicks: AtomicU64,
    /// Errors signalled (err eventfd, or in-band VRING_ERR), and call or
    /// err fds whose writes fail, once each.
    pub errors: AtomicU64,
}

/// A device the Linux runtime serves: the connection keeps one handle for
/// the control path, and each ring's worker thread gets a clone for the
/// data path.
///
/// The provided methods are the Linux side of the data path; their
/// defaults forward to [`Device`], so a device implements this with an
/// empty `impl SharedDevice for MyDevice {}`. A device that does its I/O
/// straight into guest memory (io_uring, see [`aio`](crate::aio))
/// overrides [`process_mapped`](Self::process_mapped) and
/// [`poll_mapped`](Self::poll_mapped), which see the mapped memory
/// ([`LinuxGuestMemory::io_bufs`]), and
/// [`completion_fd`](Self::completion_fd), so the worker sleeps until a
/// completion arrives instead of polling for it.
pub trait SharedDevice: Device + Clone + Send + Sync + 'static
where
    Self::Scratch: Send,
{
    /// [`Device::process`] with the mapped guest memory (whose writes are
    /// marked in the dirty log while the front-end logs them; I/O done
    /// into it by other means is reported with [`Mapped::mark`]).
    fn process_mapped<const S: usize>(
        &self,
        queue: u16,
        chain: &Chain<S>,
        token: Token,
        mem: &Mapped<'_>,
        scratch: &mut Self::Scratch,
    ) -> Completion {
        self.process(queue, chain, token, mem, scratch)
    }

    /// [`Device::poll`] with the mapped guest memory, as
    /// [`process_mapped`](Self::process_mapped).
    fn poll_mapped(
        &self,
        queue: u16,
        mem: &Mapped<'_>,
        scratch: &mut Self::Scratch,
        done: &mut dyn FnMut(Token, u32),
    ) {
        self.poll(queue, mem, scratch, done)
    }

    /// An fd that becomes readable when requests the device holds
    /// (returned [`Completion::Later`]) have completed: a non-blocking
    /// eventfd, which the worker resets before calling
    /// [`poll_mapped`](Self::poll_mapped). With one, a worker with
    /// requests outstanding sleeps until it is signalled; without (the
    /// default), it polls the device every
    /// [`RuntimeOptions::poll_interval`]. Asked before each sleep, so it
    /// may appear once the scratch has set up its I/O; once given, it
    /// stays the same fd, open, for the scratch's life.
    fn completion_fd<'a>(&self, queue: u16, scratch: &'a Self::Scratch) -> Option<BorrowedFd<'a>> {
        let _ = (queue, scratch);
        None
    }

    /// Whether the requests the device holds now complete about as soon
    /// as a short spin (copies from the page cache done by a thread),
    /// so a worker with nothing else to do polls through them instead of
    /// sleeping on the [`completion_fd`](Self::completion_fd): sleeping
    /// and being woken costs more than the wait. False (the default):
    /// they wait for a disk or a network, and the worker sleeps rather
    /// than take a core from the I/O. Asked as the worker decides
    /// whether to spin, with requests outstanding.
    fn quick_io(&self, queue: u16, scratch: &Self::Scratch) -> bool {
        let _ = (queue, scratch);
        false
    }

    /// How many of the requests that [`quick_io`](Self::quick_io) does not
    /// count as quick (they waited for a disk or a network) completed
    /// since the ring started: one that completed in the round that
    /// popped it (a disk that answered while the worker was held up) does
    /// not make the ring's next requests look quick. The default counts
    /// none (a device without slow requests, or one whose every request
    /// completes at once).
    fn slow_completions(&self, queue: u16, scratch: &Self::Scratch) -> u64 {
        let _ = (queue, scratch);
        0
    }

    /// DEVICE_STATE, save: the device's state as the bytes a destination's
    /// [`load_state`](Self::load_state) takes. `inflight` is the inflight
    /// area, if one is mapped (every ring is stopped: the requests
    /// suspended by GET_VRING_BASE_INFLIGHT are recorded there).
    /// Called on the control thread; the runtime writes the bytes into the
    /// front-end's fd on a helper thread. The default has no state to
    /// give: the transfer fails (CHECK_DEVICE_STATE answers an error).
    fn save_state(&self, inflight: Option<InflightArea<'_>>) -> Result<Vec<u8>, String> {
        let _ = inflight;
        Err("this device does not save its state".into())
    }

    /// DEVICE_STATE, load: takes the bytes a source's
    /// [`save_state`](Self::save_state) gave (read to the end of the
    /// front-end's fd), or refuses them, changing nothing. `inflight` is
    /// this connection's inflight area, whose bytes the device may
    /// overwrite (the runtime writes it back into the area, so the next
    /// ring start resubmits what it records). Called on the control thread
    /// while CHECK_DEVICE_STATE waits.
    fn load_state(
        &mut self,
        state: &[u8],
        inflight: Option<InflightAreaMut<'_>>,
    ) -> Result<(), String> {
        let _ = (state, inflight);
        Err("this device does not load a state".into())
    }
}

/// The inflight area as a device's state sees it: its layout and its
/// bytes ([`inflight::area_size`](vhost_user_core::inflight::area_size)).
#[derive(Debug)]
pub struct InflightArea<'a> {
    /// Queues.
    pub num_queues: u16,
    /// Ring size.
    pub queue_size: u16,
    /// The area's bytes.
    pub bytes: &'a [u8],
}

/// [`InflightArea`], writable.
#[derive(Debug)]
pub struct InflightAreaMut<'a> {
    /// Queues.
    pub num_queues: u16,
    /// Ring size.
    pub queue_size: u16,
    /// The area's bytes.
    pub bytes: &'a mut [u8],
}

/// Largest device state read from a front-end (its inflight area, at most
/// a few MiB, and a few bytes of config): more is refused.
pub const MAX_DEVICE_STATE: u64 = 64 << 20;

/// A device-state fd read or written until a deadline: non-blocking, each
/// call waits on epoll for at most what is left, then fails with
/// `TimedOut` (and the fd is closed when this is dropped), so a front-end
/// that never closes its end of the pipe cannot hold the transfer's thread,
/// nor CHECK_DEVICE_STATE waiting for it. A transfer given up
/// ([`Transfer::cancel`]) fails at once (not with `Interrupted`, which
/// `read_to_end` and `write_all` would retry).
struct Deadline {
    file: std::fs::File,
    epoll: Epoll,
    deadline: Instant,
    cancel: Arc<EventFd>,
}

impl Deadline {
    fn new(fd: OwnedFd, deadline: Instant, cancel: Arc<EventFd>) -> io::Result<Self> {
        crate::sys::file::set_nonblocking(fd.as_fd(), true)?;
        let epoll = Epoll::new()?;
        epoll.add(&fd, Interest::READABLE | Interest::WRITABLE, 0)?;
        epoll.add(&*cancel, Interest::READABLE, 1)?;
        Ok(Deadline {
            file: std::fs::File::from(fd),
            epoll,
            deadline,
            cancel,
        })
    }

    /// Runs `op` until it is not `WouldBlock`, waiting for the fd between
    /// tries, until the deadline or the transfer is given up.
    fn wait<T>(
        &mut self,
        mut op: impl FnMut(&mut std::fs::File) -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            // Checked before each try too: a front-end that keeps the pipe
            // busy never lets the fd wait.
            if self.cancel.is_signalled()? {
                return Err(io::Error::other("the device state transfer was given up"));
            }
            match op(&mut self.file) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the front-end did not finish the device state transfer in time",
                ));
            }
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            let mut ev = [EpollEvent::default(); 1];
            self.epoll.wait(&mut ev, ms)?;
        }
    }
}

impl io::Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.wait(|f| io::Read::read(f, buf))
    }
}

impl io::Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wait(|f| io::Write::write(f, buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A device state transfer running on a helper thread: what it read (load)
/// or nothing (save).
struct Transfer {
    save: bool,
    thread: JoinHandle<io::Result<Vec<u8>>>,
    /// Written to give the transfer up (see [`Transfer::cancel`]).
    cancel: Arc<EventFd>,
}

impl Transfer {
    /// Gives the transfer up and waits for its thread, which returns at
    /// its next wait and closes the front-end's fd. For a transfer the
    /// session no longer has (RESET_DEVICE dropped it and a new one
    /// starts, or the front-end left): a thread left to run out its
    /// deadline would keep the fd that long, and a front-end repeating
    /// SET_DEVICE_STATE_FD and RESET_DEVICE would pile up threads and fds
    /// without bound.
    fn cancel(self) {
        let _ = self.cancel.write(1);
        let _ = self.thread.join();
    }
}

/// Adds `n` to a counter that only one thread (a ring's worker) writes:
/// a load and a store instead of a locked add. A locked instruction waits
/// for every store before it to drain, and a request's stores into guest
/// memory go to cache lines the driver's core holds: per request, that
/// wait was most of a busy worker's time.
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// How the runtime treats guest-caused ring errors and idle polling.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeOptions {
    /// Completions published per batch at most (one used-index store and at
    /// most one call per batch). On a split ring a round takes at most
    /// half of what the driver has in flight, or all of it while the
    /// thread's other rings are busy too (see `Take`), so this bounds
    /// only a driver with more than it (or twice it) in flight; a
    /// packed ring (whose count would take a scan) takes this many. The
    /// default, 128, halves the round's fixed costs (the dirty log's
    /// lock, the publish's fence and read of the driver's event area, the
    /// call) against 64 for a ring of 1024 kept full: DPDK virtio-user
    /// `rxonly` from the null backend, 64-byte frames, packed ring, 9
    /// alternated runs, 1.02x DPDK's vhost against 0.95x with 64.
    pub batch: usize,
    /// Sleep between polls of a ring in polling mode (no kick fd).
    pub poll_interval: Duration,
    /// How long a worker that ran out of requests keeps polling its ring
    /// before it sleeps on the kick fd (QEMU's event loop does the same):
    /// a wake-up costs more than a short spin on a busy ring.
    pub spin: Duration,
    /// How long a back-end channel request waits for room in the socket
    /// (a front-end that does not read) or for the front-end's ack before
    /// the connection is ended.
    pub channel_timeout: Duration,
    /// How long a front-end's message may take to arrive whole (header,
    /// payload and fds) once its first byte came, and how long a reply
    /// may wait for the front-end to take it; past that the connection
    /// ends ([`ConnectionEnd::TimedOut`]). An idle front-end, between
    /// messages, is never timed out. `None`: no limit (a front-end that
    /// stops inside a message, or never reads its replies, holds the
    /// control thread until it leaves).
    pub message_timeout: Option<Duration>,
    /// How long a device-state transfer (SET_DEVICE_STATE_FD) may take to
    /// reach the end of its fd: a front-end that never closes its end is
    /// refused at CHECK_DEVICE_STATE once this has passed, and the
    /// transfer's fd closed.
    pub state_timeout: Duration,
    /// Worker threads serving the rings: ring `q` runs on thread
    /// `q % threads` ([`RuntimeOptions::thread_of`]); 0 (the default) is
    /// one thread per ring.
    pub threads: usize,
    /// Map guest memory memfds that cannot be sealed against shrinking
    /// (see [`LinuxGuestMemory::map_trusting`]); false by default.
    pub trust_unsealable_memfd: bool,
}

impl RuntimeOptions {
    /// The worker thread that serves ring `queue`.
    pub fn thread_of(&self, queue: u16) -> usize {
        match self.threads {
            0 => usize::from(queue),
            t => usize::from(queue) % t,
        }
    }

    /// Whether ring `queue` of `num_queues` has its worker thread to
    /// itself.
    pub fn alone(&self, queue: u16, num_queues: u16) -> bool {
        let t = self.thread_of(queue);
        (0..num_queues).filter(|&q| self.thread_of(q) == t).count() == 1
    }

    /// The queue-to-thread mapping of `num_queues` rings, for logs: one
    /// `"queue 0,2 -> thread 0"` line per thread.
    pub fn thread_map(&self, num_queues: u16) -> Vec<String> {
        let mut threads: Vec<Vec<u16>> = Vec::new();
        for q in 0..num_queues {
            let t = self.thread_of(q);
            if threads.len() <= t {
                threads.resize(t + 1, Vec::new());
            }
            threads[t].push(q);
        }
        threads
            .iter()
            .enumerate()
            .filter(|(_, qs)| !qs.is_empty())
            .map(|(t, qs)| {
                let qs: Vec<String> = qs.iter().map(u16::to_string).collect();
                format!("queue {} -> thread {t}", qs.join(","))
            })
            .collect()
    }
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            batch: 128,
            poll_interval: Duration::from_micros(50),
            spin: Duration::from_micros(50),
            channel_timeout: Duration::from_secs(5),
            message_timeout: Some(Duration::from_secs(5)),
            state_timeout: Duration::from_secs(30),
            threads: 0,
            trust_unsealable_memfd: false,
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
    call: Mutex<Signal>,
    err: Mutex<Signal>,
    remap: Mutex<Option<RingAddrs>>,
    remap_pending: AtomicBool,
    /// The ring's used-ring log address (VHOST_VRING_F_LOG).
    ring_log: Mutex<Option<u64>>,
    counters: RingCounters,
}

/// A connection's dirty log (SET_LOG_BASE), shared with its ring workers.
#[derive(Default)]
struct DirtyShared {
    /// The log's mapping and size. Replaced under the write lock: a
    /// worker marks it under the read lock, for a whole round, so it
    /// never marks a log being replaced or unmapped.
    area: RwLock<Option<(LinuxGuestMemory, u64)>>,
    /// A log is mapped (read before taking the lock, so a connection
    /// that never logs takes no lock).
    mapped: AtomicBool,
    /// VHOST_F_LOG_ALL: device writes are logged.
    all: AtomicBool,
    /// SET_LOG_FD's eventfd, signalled after a round set bits.
    fd: Mutex<Option<Arc<Notifier>>>,
    /// Pages marked, and marks refused (beyond the log), for the log.
    pages: AtomicU64,
    failed: AtomicU64,
}

impl DirtyShared {
    /// The log fd cannot be written (`e`): logged once per fd.
    fn log_fd_failed(fd: &Notifier, e: &io::Error) {
        if fd.first_failure() {
            error!("dirty log: the log fd cannot be written ({e}); the front-end is not told of marked pages");
        }
    }

    /// The log, read-locked, if one is mapped.
    fn read(&self) -> Option<std::sync::RwLockReadGuard<'_, Option<(LinuxGuestMemory, u64)>>> {
        self.mapped
            .load(Ordering::Acquire)
            .then(|| self.area.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Counts a round's marks and tells the front-end (SET_LOG_FD).
    fn marked(&self, pages: u64, failed: u64) {
        if failed != 0 && self.failed.fetch_add(failed, Ordering::Relaxed) == 0 {
            warn!("dirty log: a write could not be marked (beyond the log)");
        }
        if pages != 0 {
            self.pages.fetch_add(pages, Ordering::Relaxed);
            if let Some(fd) = lock(&self.fd).as_ref() {
                if let Err(e) = fd.write() {
                    Self::log_fd_failed(fd, &e);
                }
            }
        }
    }
}

/// Shared memory of the message's fd `index` could not be mapped.
fn unmappable(index: FdIndex) -> BackendError {
    BackendError::BadFd {
        index,
        access: FdAccess::Map,
    }
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

/// An fd the front-end gave for the runtime to write: a ring's call or
/// err fd, or the dirty log's fd (SET_LOG_FD). One opened read-only (the
/// read end of a pipe) is refused on the message that sets it
/// ([`Received`]). Any other fd is taken (the front-end chooses), so its
/// writes may still fail (a pipe whose reader is gone, a full device).
/// Such an fd is reported once per message that set it (each makes a new
/// `Notifier`), not at every signal.
struct Notifier {
    fd: EventFd,
    /// Its failure was reported.
    failed: AtomicBool,
}

impl Notifier {
    fn new(fd: OwnedFd) -> Self {
        Notifier {
            fd: EventFd::from(fd),
            failed: AtomicBool::new(false),
        }
    }

    /// Signals it. `Ok(false)`: not written, but not lost either (its
    /// counter is full, or a pipe's buffer: the front-end has a signal
    /// it did not take yet).
    fn write(&self) -> io::Result<bool> {
        match self.fd.write(1) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Marks it failed; whether this was the first failure (to report).
    fn first_failure(&self) -> bool {
        !self.failed.load(Ordering::Relaxed) && !self.failed.swap(true, Ordering::Relaxed)
    }
}

/// How a ring's calls or errors reach the front-end.
#[derive(Clone, Default)]
enum Signal {
    /// Not at all (no eventfd, no in-band notifications).
    #[default]
    None,
    /// A write to the fd the front-end gave.
    Fd(Arc<Notifier>),
    /// BACKEND_VRING_CALL / BACKEND_VRING_ERR on the back-end channel.
    InBand(Arc<BackChannel>),
}

impl Signal {
    /// Signals ring `queue` (its error if `err`): whether anything was
    /// sent, or how the front-end's fd failed (see [`Notifier::write`]).
    fn raise(&self, queue: u16, err: bool) -> io::Result<bool> {
        match self {
            Signal::None => Ok(false),
            Signal::Fd(fd) => fd.write(),
            Signal::InBand(ch) => Ok(ch
                .send(|c, out| {
                    if err {
                        c.vring_err(queue, out)
                    } else {
                        c.vring_call(queue, out)
                    }
                })
                .is_ok()),
        }
    }

    fn notifier(&self) -> Option<&Notifier> {
        match self {
            Signal::Fd(n) => Some(n),
            _ => None,
        }
    }
}

/// The control thread's handle on a running ring.
struct Worker {
    shared: Arc<Shared>,
    /// The ring's GET_VRING_BASE value, sent once it stopped.
    stopped: mpsc::Receiver<u32>,
    /// The worker thread serving it.
    thread: usize,
}

/// A worker thread serving one or more rings.
struct IoThread<D: SharedDevice>
where
    D::Scratch: Send,
{
    inbox: Arc<Inbox<D>>,
    handle: JoinHandle<()>,
    /// Rings given to it and not stopped; it exits when the last one
    /// stops.
    rings: usize,
}

/// Rings handed to a worker thread, which adopts them when woken.
struct Inbox<D: SharedDevice>
where
    D::Scratch: Send,
{
    rings: Mutex<Vec<Ring<D>>>,
    wake: EventFd,
}

/// Per-ring state the control thread keeps.
#[derive(Default)]
struct RingFds {
    kick: Option<Arc<EventFd>>,
    call: Option<Arc<Notifier>>,
    err: Option<Arc<Notifier>>,
}

/// A message's fds as the session looks at them ([`MessageFds`]): by
/// their access modes and kinds, so that one that cannot serve its use is
/// refused in the message's reply rather than found when first used: a
/// kick fd opened write-only, shared memory opened read-only, an `O_PATH`
/// fd; shared memory that is no file (a socket, a pipe or an eventfd,
/// even opened read-write) or a file shorter than what is mapped of it;
/// a back-end channel that is no Unix stream
/// socket. Any readable (kick) or writable (call, err, log) fd is of a
/// fitting kind: eventfds and pipes both serve.
struct Received<'a>(&'a [Option<OwnedFd>]);

impl MessageFds for Received<'_> {
    fn count(&self) -> usize {
        self.0.len()
    }

    fn allows(&self, index: FdIndex, access: FdAccess) -> bool {
        let Some(Some(fd)) = self.0.get(usize::from(index)) else {
            // Not there: the message's parse refuses it.
            return true;
        };
        let fd = fd.as_fd();
        // A mode or kind that cannot be read is taken as usable: its use
        // tells.
        let read = || crate::sys::file::readable(fd).unwrap_or(true);
        let write = || crate::sys::file::writable(fd).unwrap_or(true);
        match access {
            FdAccess::Read => read(),
            FdAccess::Write => write(),
            // The back-end channel, the one fd read and written: messages
            // (with fds) are framed on it as on the main socket.
            FdAccess::ReadWrite => {
                read() && write() && crate::sys::socket::is_stream(fd).unwrap_or(true)
            }
            FdAccess::Map => read() && write() && crate::sys::mmap::mappable(fd).unwrap_or(true),
        }
    }

    fn maps(&self, index: FdIndex, offset: u64, size: u64) -> bool {
        if !self.allows(index, FdAccess::Map) {
            return false;
        }
        let Some(Some(fd)) = self.0.get(usize::from(index)) else {
            return true;
        };
        // A file (or block device) shorter than the extent: the mapping
        // would refuse it after the reply. A length that cannot be read
        // is left to the mapping.
        let Some(end) = offset.checked_add(size) else {
            return false;
        };
        match crate::sys::mmap::file_size(fd.as_fd()) {
            Ok(Some(len)) => len >= end,
            // A character device has no length, and only some map (a DAX
            // device does, /dev/null does not): a mapping of the extent,
            // made and dropped here, tells.
            Ok(None) => {
                use crate::sys::mmap::{Access, MmapRegion};
                MmapRegion::map(fd.as_fd(), offset, size, Access::ReadWrite).is_ok()
            }
            Err(_) => true,
        }
    }
}

/// One front-end connection's state.
struct Connection<D: SharedDevice, const Q: usize, const R: usize>
where
    D::Scratch: Send,
{
    session: Session<Q, R>,
    device: D,
    memory: Arc<RwLock<LinuxGuestMemory>>,
    rings: Vec<RingFds>,
    workers: Vec<Option<Worker>>,
    threads: Vec<Option<IoThread<D>>>,
    options: RuntimeOptions,
    /// The area of SET_INFLIGHT_FD.
    inflight: Option<Arc<LinuxGuestMemory>>,
    /// The fd created for GET_INFLIGHT_FD, sent with its reply.
    inflight_reply_fd: Option<OwnedFd>,
    /// Per ring: whether the pending stop suspends.
    suspend: Vec<bool>,
    /// The back-end channel (SET_BACKEND_REQ_FD).
    channel: Option<Arc<BackChannel>>,
    /// Shares the back-end channel with the daemon.
    control: Control,
    /// The dirty log.
    log: Arc<DirtyShared>,
    /// The size of the inflight area of SET_INFLIGHT_FD.
    inflight_size: u64,
    /// The device state transfer of SET_DEVICE_STATE_FD, until
    /// CHECK_DEVICE_STATE.
    transfer: Option<Transfer>,
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
    /// A message of the front-end did not arrive whole, or it did not
    /// take a reply, within [`RuntimeOptions::message_timeout`] (the
    /// error is an [`io::ErrorKind::TimedOut`] one).
    TimedOut(io::Error),
}

impl<D, const Q: usize, const R: usize> Connection<D, Q, R>
where
    D: SharedDevice,
    D::Scratch: Send,
{
    fn new(
        config: BackendConfig,
        device: D,
        options: RuntimeOptions,
        control: Control,
    ) -> Result<Self, BackendError> {
        let session = Session::new(config)?;
        let n = usize::from(config.num_queues);
        Ok(Connection {
            session,
            device,
            memory: Arc::new(RwLock::new(LinuxGuestMemory::new())),
            rings: (0..n).map(|_| RingFds::default()).collect(),
            workers: (0..n).map(|_| None).collect(),
            threads: (0..n).map(|_| None).collect(),
            options,
            inflight: None,
            inflight_reply_fd: None,
            suspend: vec![false; n],
            channel: None,
            control,
            log: Arc::default(),
            inflight_size: 0,
            transfer: None,
        })
    }

    fn serve(&mut self, stream: &Stream) -> ConnectionEnd {
        let mut buf = Box::new([0u8; MAX_MESSAGE]);
        let mut out = Box::new([0u8; MAX_MESSAGE]);
        let limit = self.options.message_timeout;
        let ended = |e: io::Error| {
            if e.kind() == io::ErrorKind::TimedOut {
                ConnectionEnd::TimedOut(e)
            } else {
                ConnectionEnd::Io(e)
            }
        };
        loop {
            // Waits for the front-end's next request as long as it likes;
            // once it began, the rest is due within the limit.
            let received = match limit {
                Some(l) => stream.recv_message_started(&mut buf, l),
                None => stream.recv_message(&mut buf),
            };
            let rx = match received {
                Ok(Some(rx)) => rx,
                Ok(None) => return ConnectionEnd::Closed,
                Err(e) => return ended(e),
            };
            let payload = &buf[HEADER_SIZE..HEADER_SIZE + rx.header.size as usize];
            let mut fds: Vec<Option<OwnedFd>> = rx.fds.into_iter().map(Some).collect();
            let result = {
                let mem = self.memory.read().unwrap_or_else(PoisonError::into_inner);
                self.session.handle(
                    &rx.header,
                    payload,
                    &Received(&fds),
                    &*mem,
                    &mut self.device,
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
                if let Err(e) = self.apply(action, &mut fds, stream) {
                    return ConnectionEnd::Refused(e);
                }
            }
            let reply = match outcome.reply {
                Reply::None => None,
                Reply::Ready(n) => Some(n),
                Reply::Pending { queue } => match self.stop_worker(queue, self.suspend_of(queue)) {
                    Some(base) => match self.session.finish_stop(queue, base, &mut out[..]) {
                        Ok(n) => Some(n),
                        Err(e) => return ConnectionEnd::Refused(e),
                    },
                    None => return ConnectionEnd::Refused(BackendError::NotStopping(queue)),
                },
                Reply::TransferPending => {
                    let ok = self.finish_transfer();
                    match self.session.finish_transfer(ok, &mut out[..]) {
                        Ok(n) => Some(n),
                        Err(e) => return ConnectionEnd::Refused(e),
                    }
                }
            };
            if let Some(n) = reply {
                // GET_INFLIGHT_FD's reply carries the new area's fd; ours is
                // closed once sent.
                let fd = self.inflight_reply_fd.take();
                let fds: Vec<std::os::fd::BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
                // A front-end that does not take its reply in time is
                // left, not waited for.
                let sent = match limit {
                    Some(l) => stream.send_message_by(&out[..n], &fds, Instant::now() + l),
                    None => stream.send_message(&out[..n], &fds),
                };
                if let Err(e) = sent {
                    return ended(e);
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

    /// A kick, call, err or log eventfd of the front-end's, made
    /// non-blocking. A blocking one would let the front-end hold a worker
    /// (or the control thread) for good: a call written to an eventfd
    /// whose counter it filled, or a kick read after it emptied the
    /// counter between our poll and our read, waits until someone else
    /// touches the fd, and after a disconnect nobody does, so the
    /// teardown that stops the worker never ends. The flag is on the file
    /// description the front-end shares (QEMU's notifiers are
    /// non-blocking already); a call that finds the counter full is not
    /// lost, as the fd is signalled anyway.
    fn eventfd(
        fds: &mut [Option<OwnedFd>],
        i: Option<u8>,
    ) -> Result<Option<Arc<EventFd>>, BackendError> {
        i.map(|i| Ok(Arc::new(EventFd::from(Self::nonblocking_fd(fds, i)?))))
            .transpose()
    }

    /// An fd the runtime writes (call, err, log), its access mode looked
    /// at (see [`Notifier`]).
    fn notifier(
        fds: &mut [Option<OwnedFd>],
        i: Option<u8>,
    ) -> Result<Option<Arc<Notifier>>, BackendError> {
        i.map(|i| Ok(Arc::new(Notifier::new(Self::nonblocking_fd(fds, i)?))))
            .transpose()
    }

    fn nonblocking_fd(fds: &mut [Option<OwnedFd>], i: u8) -> Result<OwnedFd, BackendError> {
        let fd = Self::take_fd(fds, i)?;
        crate::sys::file::set_nonblocking(fd.as_fd(), true).map_err(|e| {
            error!("cannot make an eventfd of the front-end non-blocking: {e}");
            BackendError::Unsupported
        })?;
        Ok(fd)
    }

    fn apply(
        &mut self,
        action: Action,
        fds: &mut [Option<OwnedFd>],
        stream: &Stream,
    ) -> Result<(), BackendError> {
        match action {
            Action::UnmapAll => self.memory_mut().clear(),
            // A mapping that fails for what the fd's mode, kind and length
            // do not tell ([`Received`]: a memfd that cannot be sealed, a
            // character device that does not map, a file that shrank since)
            // ends the connection: the reply promised it.
            Action::MapRegion { slot, fd, region } => {
                let index = fd;
                let fd = Self::take_fd(fds, fd)?;
                let trust = self.options.trust_unsealable_memfd;
                self.memory_mut()
                    .map_trusting(usize::from(slot), region, fd, trust)
                    .map_err(|e| {
                        error!("cannot map guest memory region {slot}: {e}");
                        unmappable(index)
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
            // A read-only call or err fd was refused by the session
            // ([`Received`]); one whose writes fail is reported by the
            // ring's worker (see `RingWorker::notifier_failed`), and the
            // ring is served all the same.
            Action::SetCall { queue, fd } => {
                self.rings[usize::from(queue)].call = Self::notifier(fds, fd)?;
                self.resignal(queue);
            }
            Action::SetErr { queue, fd } => {
                self.rings[usize::from(queue)].err = Self::notifier(fds, fd)?;
                self.resignal(queue);
            }
            // An fd that is no Unix stream socket was refused by the
            // session ([`Received`]); the check here stays as a defence.
            Action::SetBackendChannel { fd } => {
                let socket = Stream::try_from(Self::take_fd(fds, fd)?);
                // The channel keeps a handle on the main socket to end the
                // connection with when the front-end does not answer.
                let made = match (socket, self.session.channel()) {
                    (Ok(socket), Some(c)) => stream.try_clone().and_then(|main| {
                        BackChannel::new(socket, main, c, self.options.channel_timeout)
                    }),
                    (Err(e), _) => Err(e),
                    (_, None) => Err(io::Error::other("no session channel")),
                };
                let channel = match made {
                    Ok(c) => Arc::new(c),
                    Err(e) => {
                        error!("cannot keep the back-end channel: {e}");
                        return Err(BackendError::Unsupported);
                    }
                };
                info!(
                    "back-end channel set (in-band notifications: {})",
                    channel.in_band()
                );
                self.channel = Some(Arc::clone(&channel));
                self.control.set(Some(channel));
                for q in 0..self.rings.len() {
                    self.resignal(q as u16);
                }
            }
            Action::Kick { queue } => {
                if let Some(w) = &self.workers[usize::from(queue)] {
                    w.shared.counters.kicks.fetch_add(1, Ordering::Relaxed);
                    w.shared.wake();
                }
            }
            Action::StartRing { queue } => {
                let area = self.inflight.clone();
                let dp = {
                    let mem = self.memory.read().unwrap_or_else(PoisonError::into_inner);
                    self.session.start_ring(
                        queue,
                        &*mem,
                        area.as_deref(),
                        self.device.consume_while_disabled(),
                    )?
                };
                self.start_worker(queue, dp, area)
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
                    BackendError::Inflight(vhost_user_core::inflight::InflightError::TooSmall)
                })?;
                self.inflight_reply_fd = Some(fd);
            }
            Action::MapInflight { fd, offset, size } => {
                let index = fd;
                let fd = Self::take_fd(fds, fd)?;
                let area = LinuxGuestMemory::single(fd, offset, size).map_err(|e| {
                    error!("cannot map the inflight area: {e}");
                    unmappable(index)
                })?;
                info!("inflight area of {size} bytes mapped");
                self.inflight = Some(Arc::new(area));
                self.inflight_size = size;
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
            Action::MapLog { fd, offset, size } => {
                let index = fd;
                let fd = Self::take_fd(fds, fd)?;
                let area = LinuxGuestMemory::single(fd, offset, size).map_err(|e| {
                    error!("cannot map the dirty log ({size} bytes at offset {offset}): {e}");
                    unmappable(index)
                })?;
                let mut log = self
                    .log
                    .area
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                *log = Some((area, size));
                self.log.mapped.store(true, Ordering::Release);
                info!("dirty log of {size} bytes mapped");
            }
            Action::SetLogFd { fd } => {
                // A read-only one was refused ([`Received`]).
                *lock(&self.log.fd) = Self::notifier(fds, Some(fd))?;
            }
            Action::SetLogging { all } => {
                let was = self.log.all.swap(all, Ordering::AcqRel);
                if was != all {
                    info!(
                        "dirty logging {} ({} pages marked so far)",
                        if all { "on" } else { "off" },
                        self.log.pages.load(Ordering::Relaxed)
                    );
                }
            }
            Action::SetRingLog { queue, log } => {
                if let Some(w) = &self.workers[usize::from(queue)] {
                    *lock(&w.shared.ring_log) = log;
                }
            }
            Action::TransferState { fd, direction } => {
                let fd = Self::take_fd(fds, fd)?;
                self.start_transfer(fd, direction == DeviceStateDirection::Save);
            }
        }
        Ok(())
    }

    /// The inflight area's layout and bytes, if one is mapped.
    fn inflight_bytes(&self) -> Option<(u16, u16, Vec<u8>)> {
        let area = self.inflight.as_ref()?;
        let (nq, qs) = self.session.inflight_layout()?;
        let len = vhost_user_core::inflight::area_size(nq, qs).ok()?;
        if len > self.inflight_size {
            return None;
        }
        let mut bytes = vec![0u8; usize::try_from(len).ok()?];
        match area.read(0, &mut bytes) {
            Ok(()) => Some((nq, qs, bytes)),
            Err(e) => {
                error!("cannot read the inflight area: {e:?}");
                None
            }
        }
    }

    /// SET_DEVICE_STATE_FD accepted: a helper thread writes the device's
    /// state into `fd` (save) or reads `fd` to its end (load), so that the
    /// connection goes on while the front-end reads or writes the other
    /// end; CHECK_DEVICE_STATE waits for it ([`Self::finish_transfer`]).
    fn start_transfer(&mut self, fd: OwnedFd, save: bool) {
        // One transfer at a time: one the session dropped (RESET_DEVICE)
        // is given up before the next starts.
        if let Some(old) = self.transfer.take() {
            old.cancel();
        }
        let deadline = Instant::now() + self.options.state_timeout;
        let cancel = match EventFd::new(true) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                // No transfer: CHECK_DEVICE_STATE answers an error.
                error!("cannot start the device state transfer: {e}");
                return;
            }
        };
        let theirs = Arc::clone(&cancel);
        let builder = std::thread::Builder::new().name("vhu-device-state".into());
        let thread = if save {
            let area = self.inflight_bytes();
            let state = self
                .device
                .save_state(area.as_ref().map(|(nq, qs, b)| InflightArea {
                    num_queues: *nq,
                    queue_size: *qs,
                    bytes: b,
                }));
            builder.spawn(move || {
                let state = state.map_err(io::Error::other)?;
                let mut f = Deadline::new(fd, deadline, theirs)?;
                io::Write::write_all(&mut f, &state)?;
                // Dropping `f` closes our end: the front-end reads EOF.
                Ok(Vec::new())
            })
        } else {
            builder.spawn(move || {
                let mut bytes = Vec::new();
                let f = Deadline::new(fd, deadline, theirs)?;
                io::Read::read_to_end(&mut io::Read::take(f, MAX_DEVICE_STATE + 1), &mut bytes)?;
                if bytes.len() as u64 > MAX_DEVICE_STATE {
                    return Err(io::Error::other("device state too long"));
                }
                Ok(bytes)
            })
        };
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                // No transfer: CHECK_DEVICE_STATE answers an error.
                error!("cannot start the device state transfer: {e}");
                return;
            }
        };
        info!(
            "device state {} started",
            if save { "save" } else { "load" }
        );
        self.transfer = Some(Transfer {
            save,
            thread,
            cancel,
        });
    }

    /// CHECK_DEVICE_STATE: waits for the transfer's helper thread (it ends
    /// once the front-end closed its end of the fd, or on an error) and,
    /// for a load, hands the bytes to the device and writes the inflight
    /// area it returns. Whether all of it went well.
    fn finish_transfer(&mut self) -> bool {
        let Some(t) = self.transfer.take() else {
            return false;
        };
        let result = t
            .thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("transfer thread panicked")));
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                warn!("device state transfer failed: {e}");
                return false;
            }
        };
        if t.save {
            info!("device state saved");
            return true;
        }
        let mut area = self.inflight_bytes();
        let view = area.as_mut().map(|(nq, qs, b)| InflightAreaMut {
            num_queues: *nq,
            queue_size: *qs,
            bytes: b,
        });
        if let Err(e) = self.device.load_state(&bytes, view) {
            warn!("device state of {} bytes refused: {e}", bytes.len());
            return false;
        }
        if let (Some(a), Some((_, _, bytes))) = (&self.inflight, &area) {
            if let Err(e) = a.write(0, bytes) {
                error!("cannot write the inflight area: {e:?}");
                return false;
            }
        }
        info!("device state of {} bytes loaded", bytes.len());
        true
    }

    /// How ring `queue` signals calls and errors: its eventfds, else
    /// in-band when the session says so, else not at all.
    fn signals(&self, queue: u16) -> (Signal, Signal) {
        let fds = &self.rings[usize::from(queue)];
        let pick = |fd: &Option<Arc<Notifier>>, in_band: bool| match (fd, &self.channel) {
            (Some(fd), _) => Signal::Fd(Arc::clone(fd)),
            (None, Some(ch)) if in_band => Signal::InBand(Arc::clone(ch)),
            _ => Signal::None,
        };
        (
            pick(&fds.call, self.session.call_in_band(queue)),
            pick(&fds.err, self.session.err_in_band(queue)),
        )
    }

    /// Gives a running ring's worker its current signals.
    fn resignal(&self, queue: u16) {
        if let Some(w) = &self.workers[usize::from(queue)] {
            let (call, err) = self.signals(queue);
            *lock(&w.shared.call) = call;
            *lock(&w.shared.err) = err;
            w.shared.wake();
        }
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

    fn start_worker(&mut self, queue: u16, dp: DataPlane, area: Option<Arc<LinuxGuestMemory>>) {
        let q = usize::from(queue);
        let wake = match EventFd::new(true) {
            Ok(w) => w,
            Err(e) => {
                error!("cannot set up ring {queue}'s notifiers: {e}");
                return;
            }
        };
        let (call, err) = self.signals(queue);
        let shared = Arc::new(Shared {
            wake,
            suspend: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            enabled: AtomicBool::new(dp.enabled()),
            kick: Mutex::new(self.rings[q].kick.clone()),
            call: Mutex::new(call),
            err: Mutex::new(err),
            remap: Mutex::new(None),
            remap_pending: AtomicBool::new(false),
            ring_log: Mutex::new(self.session.ring_log(queue)),
            counters: RingCounters::default(),
        });
        let (reply, stopped) = mpsc::channel();
        let ring = Ring {
            worker: RingWorker {
                queue,
                device: self.device.clone(),
                memory: Arc::clone(&self.memory),
                shared: Arc::clone(&shared),
                area,
                log: Arc::clone(&self.log),
                options: self.options,
            },
            dp,
            round: Round {
                scratch: D::Scratch::default(),
                chains: Box::new(core::array::from_fn(|_| Chain::new())),
                reported: false,
            },
            kick: None,
            kick_watched: false,
            kick_dead: false,
            completion: None,
            reply,
            notify: Notify::Unknown,
            spin_held: 0,
            disk_bound: false,
        };
        let t = self.options.thread_of(queue);
        if t >= self.threads.len() {
            self.threads.resize_with(t + 1, || None);
        }
        if let Some(thread) = &mut self.threads[t] {
            lock(&thread.inbox.rings).push(ring);
            let _ = thread.inbox.wake.write(1);
            thread.rings += 1;
        } else {
            let made = EventFd::new(true).and_then(|wake| Ok((wake, Epoll::new()?)));
            let (wake, epoll) = match made {
                Ok(x) => x,
                Err(e) => {
                    error!("cannot set up worker thread {t}'s notifiers: {e}");
                    return;
                }
            };
            let inbox = Arc::new(Inbox {
                rings: Mutex::new(vec![ring]),
                wake,
            });
            let theirs = Arc::clone(&inbox);
            let options = self.options;
            let spawned = std::thread::Builder::new()
                .name(format!("vhu-worker-{t}"))
                .spawn(move || run_thread(t, &theirs, epoll, options));
            match spawned {
                Ok(handle) => {
                    self.threads[t] = Some(IoThread {
                        inbox,
                        handle,
                        rings: 1,
                    })
                }
                Err(e) => {
                    error!("cannot start worker thread {t} for ring {queue}: {e}");
                    return;
                }
            }
        }
        self.workers[q] = Some(Worker {
            shared,
            stopped,
            thread: t,
        });
    }

    /// Stops a ring's worker and returns the ring's GET_VRING_BASE value.
    fn stop_worker(&mut self, queue: u16, suspend: bool) -> Option<u32> {
        let w = self.workers.get_mut(usize::from(queue))?.take()?;
        w.shared.suspend.store(suspend, Ordering::Release);
        w.shared.stop.store(true, Ordering::Release);
        w.shared.wake();
        let c = &w.shared.counters;
        let base = loop {
            match w.stopped.recv_timeout(Duration::from_millis(100)) {
                Ok(b) => break Ok(b),
                Err(mpsc::RecvTimeoutError::Disconnected) => break Err(()),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let gone = self
                        .threads
                        .get(w.thread)
                        .is_none_or(|t| t.as_ref().is_none_or(|t| t.handle.is_finished()));
                    if gone {
                        break Err(());
                    }
                }
            }
        };
        // The thread exits when its last ring stopped (or it panicked).
        if let Some(slot) = self.threads.get_mut(w.thread) {
            let last = match slot {
                Some(t) => {
                    t.rings = t.rings.saturating_sub(1);
                    t.rings == 0 || base.is_err()
                }
                None => false,
            };
            if last {
                if let Some(t) = slot.take() {
                    if t.handle.join().is_err() {
                        error!("worker thread {} panicked", w.thread);
                    }
                }
            }
        }
        let Ok(base) = base else {
            error!("ring {queue} worker panicked");
            return None;
        };
        info!(
            "ring {queue} stopped: {} requests, {} kicks, {} calls, {} calls suppressed, {} errors",
            c.completed.load(Ordering::Relaxed),
            c.kicks.load(Ordering::Relaxed),
            c.calls.load(Ordering::Relaxed),
            c.suppressed.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        );
        Some(base)
    }

    fn teardown(&mut self) {
        // A front-end that leaves does not stop its rings: with an
        // inflight area, what is in flight stays recorded for the next
        // back-end; without one, it is completed.
        let keep = self.inflight.is_some();
        for q in 0..self.workers.len() {
            let _ = self.stop_worker(q as u16, keep);
        }
        // A transfer not checked goes with its connection, and its fd
        // with it.
        if let Some(t) = self.transfer.take() {
            t.cancel();
        }
        self.rings.clear();
        self.control.set(None);
        self.channel = None;
        self.inflight = None;
        self.memory_mut().clear();
        self.session.rings_reset();
        let pages = self.log.pages.load(Ordering::Relaxed);
        if self.log.mapped.load(Ordering::Relaxed) {
            info!(
                "dirty log: {pages} pages marked, {} marks refused",
                self.log.failed.load(Ordering::Relaxed)
            );
        }
        self.log = Arc::default();
        self.device.disconnected();
    }
}

/// What a ring's worker thread owns besides its data plane.
struct RingWorker<D: SharedDevice>
where
    D::Scratch: Send,
{
    queue: u16,
    device: D,
    memory: Arc<RwLock<LinuxGuestMemory>>,
    shared: Arc<Shared>,
    /// The inflight area, when requests are tracked.
    area: Option<Arc<LinuxGuestMemory>>,
    /// The connection's dirty log.
    log: Arc<DirtyShared>,
    options: RuntimeOptions,
}

/// Chains a round pops before processing them.
const LOOKAHEAD: usize = 8;

/// The fewest requests a round takes when more wait (fewer rounds and
/// calls for a deep ring; see `RingWorker::round`).
const MIN_BATCH: usize = 16;

/// How much of what the driver has in flight a round takes (at least
/// [`MIN_BATCH`]) before giving completions back. A driver that sleeps
/// until its call refills only what it is given back: on a thread with
/// no other ring to serve, a round that took all of its requests would
/// leave it nothing to do while the worker works, and the worker nothing
/// while it refills.
#[derive(Clone, Copy)]
enum Take {
    /// Half, for a ring alone on its thread: the driver refills while the
    /// other half is served (at iodepth 32, 1.62x qemu-storage-daemon's
    /// IOPS from the page cache where all of it gave 1.20x).
    Half,
    /// All of it: the thread's other rings are served while the driver
    /// refills, and the driver is woken once for its depth rather than
    /// twice (a call's wake-up was a sixth of the worker's time). Measured
    /// with 4 KiB random I/O on 2 queues served by one thread, 9
    /// alternated runs against halves: from the page cache with io_uring,
    /// 0.92x and 0.89x the CPU per request for reads at iodepth 32 and
    /// 128 (1.10x and 1.12x the IOPS), 0.98x and 0.96x for writes; with
    /// O_DIRECT (io_uring or threads), the same within the noise.
    Whole,
}

/// The per-thread state of one round of [`RingWorker::serve`].
struct Round<S> {
    scratch: S,
    /// Chains popped ahead of their processing (see [`LOOKAHEAD`]).
    chains: Box<[Chain; LOOKAHEAD]>,
    /// The data plane's error was logged.
    reported: bool,
}

/// A ring on a worker thread: its worker, data plane and scratch, and
/// the fds of it that the thread's epoll set watches.
struct Ring<D: SharedDevice>
where
    D::Scratch: Send,
{
    worker: RingWorker<D>,
    dp: DataPlane,
    round: Round<D::Scratch>,
    /// The kick fd in the set.
    kick: Option<Arc<EventFd>>,
    /// `kick` could be added to the set (else the ring is polled).
    kick_watched: bool,
    /// `kick` turned out dead (end of file or a read error): out of the
    /// set, and the ring pops nothing until the front-end gives it a new
    /// kick fd (see [`Ring::kick_lost`]); what the device already holds
    /// is still collected and published.
    kick_dead: bool,
    /// The device's completion fd in the set (the scratch owns it).
    completion: Option<RawFd>,
    /// Where the GET_VRING_BASE value goes once stopped.
    reply: mpsc::Sender<u32>,
    /// What this worker last asked of the driver's notifications.
    notify: Notify,
    /// Requests the device held when the current spin began.
    spin_held: u16,
    /// The ring's requests wait for the disk: the last ones went to the
    /// device's slow I/O, and none since completed in the step that
    /// popped it. Such a ring does not spin when idle (see `Ring::step`).
    disk_bound: bool,
}

/// A ring's notification state as the worker last set it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Notify {
    /// Not set since the ring started (the driver's initial value).
    Unknown,
    /// Kicks asked for: the worker may sleep.
    Armed,
    /// Kicks suppressed: the worker polls (a kick costs a front-end
    /// without EVENT_IDX a system call per batch).
    Disarmed,
}

/// What one step of a ring left to do.
#[derive(Clone, Copy, Default)]
struct Step {
    /// Nothing more to pop now (kicks asked for again, unless the
    /// worker polls: then just before it sleeps).
    idle: bool,
    /// A short spin may find more (not waiting for the device's I/O, not
    /// broken or paused).
    spin: bool,
    /// Requests were popped or completed.
    worked: bool,
}

const THREAD_WAKE: u64 = u64::MAX;
const WAKE: u64 = 0;
const KICK: u64 = 1;
const COMPLETION: u64 = 2;

/// The epoll token of a ring's fd.
fn token(queue: u16, kind: u64) -> u64 {
    (u64::from(queue) << 2) | kind
}

impl<D: SharedDevice> Ring<D>
where
    D::Scratch: Send,
{
    fn queue(&self) -> u16 {
        self.worker.queue
    }

    /// Joins the thread's epoll set and logs what it resumes.
    fn adopt(&mut self, epoll: &Epoll) {
        let queue = self.queue();
        if let Err(e) = epoll.add(
            &self.worker.shared.wake,
            Interest::READABLE,
            token(queue, WAKE),
        ) {
            error!("ring {queue}: cannot watch the wake fd: {e}");
        }
        self.take_kick_fd(epoll);
        if self.dp.resubmits_left() > 0 {
            info!(
                "ring {queue}: resubmitting {} requests from the inflight area",
                self.dp.resubmits_left()
            );
        }
        self.worker.report(&self.dp, &mut self.round);
    }

    /// Leaves the thread's epoll set (before its fds go).
    fn leave(&mut self, epoll: &Epoll) {
        let _ = epoll.delete(&self.worker.shared.wake);
        if let (Some(k), true) = (self.kick.take(), self.kick_watched) {
            let _ = epoll.delete(&*k);
        }
        if let Some(fd) = self
            .worker
            .device
            .completion_fd(self.queue(), &self.round.scratch)
        {
            if self.completion == Some(fd.as_raw_fd()) {
                let _ = epoll.delete(fd);
            }
        }
        self.completion = None;
    }

    /// Serves what the ring has now: takes the control thread's news,
    /// pops and processes a batch, collects completions, publishes. A
    /// worker that `polls` (spins when idle) suppresses kicks while it
    /// works and re-arms them only before it sleeps ([`Ring::arm`]); one
    /// that does not re-arms them as soon as the ring is empty.
    fn step(&mut self, polls: bool, alone: bool) -> Step {
        let w = &self.worker;
        let dp = &mut self.dp;
        if w.shared.remap_pending.swap(false, Ordering::AcqRel) {
            if let Some(addrs) = lock(&w.shared.remap).take() {
                let _ = dp.set_addrs(addrs);
            }
        }
        dp.set_enabled(w.shared.enabled.load(Ordering::Acquire));
        if self.kick_dead {
            // Nothing new is popped, but what the device already holds
            // still reaches the guest once done (its completion fd, or
            // polling, wakes the worker for it: see `Ring::watch`).
            if dp.outstanding() > 0 {
                let mem = w.memory.read().unwrap_or_else(PoisonError::into_inner);
                w.round(dp, &mem, &mut self.round, 0, None);
                w.report(dp, &mut self.round);
            }
            return Step {
                idle: true,
                spin: false,
                worked: false,
            };
        }
        let held = dp.outstanding();
        let completed = &w.shared.counters.completed;
        let before = completed.load(Ordering::Relaxed);
        let slow_before = w.device.slow_completions(w.queue, &self.round.scratch);
        let idle = {
            let mem = w.memory.read().unwrap_or_else(PoisonError::into_inner);
            if polls && self.notify != Notify::Disarmed {
                if dp.disable_notification(&*mem).is_ok() {
                    self.notify = Notify::Disarmed;
                }
                // The write went to the used ring (its flags).
                w.log_ring(dp);
            }
            let more = w.serve(dp, &mem, &mut self.round, alone);
            !more && (polls || !Self::arm_with(w, dp, &mem, &mut self.notify))
        };
        w.report(dp, &mut self.round);
        // More completions than requests held before: one popped in this
        // step completed in it (the page cache, not the disk).
        let now = completed.load(Ordering::Relaxed);
        let quick = now.wrapping_sub(before) > u64::from(held);
        let worked = now != before || self.dp.outstanding() != held;
        // Requests the device holds that complete on its completion fd
        // are waited for there: spinning would take a core from the I/O
        // (and the guest) while the disk works. Nor does a ring whose
        // requests go to the disk spin once they are done: its next
        // request comes at the disk's pace, and measured at iodepth 1 on
        // O_DIRECT the spin took a quarter of the IOPS and half again
        // the CPU per request. A disk request that completed in the step
        // that popped it (the worker was held up meanwhile) is no sign of
        // quick I/O either.
        let slow_done = self
            .worker
            .device
            .slow_completions(self.worker.queue, &self.round.scratch)
            != slow_before;
        if self.waits_io() || slow_done {
            self.disk_bound = true;
        } else if quick {
            self.disk_bound = false;
        }
        let spin = idle && self.dp.error().is_none() && !self.dp.paused() && !self.disk_bound;
        Step { idle, spin, worked }
    }

    /// The device holds requests that complete on its completion fd, and
    /// not quickly enough to spin through them
    /// ([`SharedDevice::quick_io`]).
    fn waits_io(&self) -> bool {
        let (device, queue, scratch) =
            (&self.worker.device, self.worker.queue, &self.round.scratch);
        self.dp.outstanding() > 0
            && device.completion_fd(queue, scratch).is_some()
            && !device.quick_io(queue, scratch)
    }

    /// Asks the driver for kicks (before the worker sleeps), then looks
    /// once more so a request published meanwhile is not slept on.
    /// Returns whether there is one.
    fn arm(&mut self) -> bool {
        if self.notify == Notify::Armed || self.kick_dead {
            return false;
        }
        let w = &self.worker;
        let mem = w.memory.read().unwrap_or_else(PoisonError::into_inner);
        Self::arm_with(w, &mut self.dp, &mem, &mut self.notify)
    }

    fn arm_with(
        w: &RingWorker<D>,
        dp: &mut DataPlane,
        mem: &LinuxGuestMemory,
        notify: &mut Notify,
    ) -> bool {
        let more = matches!(dp.enable_notification(mem), Ok(true));
        // A broken ring stays unarmed: it is not served any more.
        if dp.error().is_none() {
            *notify = Notify::Armed;
        }
        // Re-arming wrote the used ring (its flags or the avail event).
        w.log_ring(dp);
        more
    }

    /// Brings the ring's kick and completion fds in the set up to date;
    /// returns whether the ring must be polled (no kick fd to sleep on,
    /// or requests the device completes without a completion fd).
    fn watch(&mut self, epoll: &Epoll) -> bool {
        let queue = self.queue();
        self.take_kick_fd(epoll);
        // A device keeps its completion fd for the scratch's life (see
        // `SharedDevice::completion_fd`), so there is no old fd to take
        // out of the set: closing it would have done that.
        let completion = self.worker.device.completion_fd(queue, &self.round.scratch);
        let raw = completion.map(|f| f.as_raw_fd());
        if raw != self.completion {
            self.completion = None;
            if let Some(fd) = completion {
                match epoll.add(fd, Interest::READABLE, token(queue, COMPLETION)) {
                    Ok(()) => self.completion = raw,
                    Err(e) => error!("ring {queue}: cannot watch the completion fd: {e}"),
                }
            }
        }
        let poll = self.dp.outstanding() > 0 && self.completion.is_none();
        // A ring whose kick fd died is not polled for requests (it waits
        // for a new kick fd, or its stop), only for what the device
        // still holds, if it has no completion fd to wake the worker.
        poll || (!self.kick_dead && !self.kick_watched)
    }

    /// Takes the kick fd the control thread set, if it changed, into the
    /// set. One that cannot carry a kick (opened write-only: it never
    /// polls readable) was refused when it was set ([`Received`]).
    fn take_kick_fd(&mut self, epoll: &Epoll) {
        let queue = self.queue();
        let current = lock(&self.worker.shared.kick).clone();
        let same = match (&self.kick, &current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        if let (Some(old), true) = (self.kick.take(), self.kick_watched) {
            let _ = epoll.delete(&*old);
        }
        self.kick_watched = false;
        self.kick_dead = false;
        self.kick = current;
        let Some(k) = self.kick.clone() else { return };
        match epoll.add(&*k, Interest::READABLE, token(queue, KICK)) {
            Ok(()) => self.kick_watched = true,
            Err(e) => error!("ring {queue}: cannot watch the kick fd: {e}"),
        }
    }

    /// The kick fd is at end of file or fails to read (a pipe or socket
    /// whose writer is gone): it never carries a kick, and stays readable
    /// for good. Watching it would keep the thread awake,
    /// and polling the ring instead would too, so it leaves the set and
    /// the ring is treated as broken: logged, signalled on its err fd
    /// like a ring error, and pops nothing until SET_VRING_KICK gives it
    /// a new kick fd (or it is stopped and started again). The requests
    /// the device already holds still complete: the worker collects and
    /// publishes them (woken by the device's completion fd, or polling),
    /// rather than leaving them to the ring's stop.
    fn kick_lost(&mut self, epoll: &Epoll, e: &io::Error) {
        let queue = self.queue();
        if let (Some(k), true) = (&self.kick, self.kick_watched) {
            let _ = epoll.delete(&**k);
        }
        self.kick_watched = false;
        self.kick_dead = true;
        error!("ring {queue}: the kick fd cannot be read ({e}); the ring is stopped until it gets a new kick fd");
        let w = &self.worker;
        if w.raise_err() {
            w.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Resets the fd of this ring that epoll reported (`kind`).
    fn reset(&mut self, kind: u64, epoll: &Epoll) {
        let shared = &self.worker.shared;
        match kind {
            KICK => {
                // The front-end chose the fd: it may be blocking, or not an
                // eventfd at all (`take_kick` reads only what polls
                // readable, and tells a dead fd).
                let taken = match &self.kick {
                    Some(k) if !self.kick_dead => k.take_kick(),
                    _ => Ok(false),
                };
                match taken {
                    Ok(true) => {
                        shared.counters.kicks.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(e) => self.kick_lost(epoll, &e),
                }
            }
            COMPLETION => {
                if let Some(fd) = self
                    .worker
                    .device
                    .completion_fd(self.queue(), &self.round.scratch)
                {
                    let _ = EventFd::read_fd(fd);
                }
            }
            _ => {
                let _ = shared.wake.read();
            }
        }
    }
}

/// A worker thread: serves the rings the control thread hands it
/// (through `inbox`) until the last one is stopped. Each round serves
/// every ring; when all are idle it spins a little (as long as a ring may
/// find more without waiting for I/O), then sleeps on epoll until a kick,
/// a completion or the control thread wakes it.
///
/// A ring whose stop is asked for leaves the rounds and drains alongside
/// them, one draining round per turn, so that a device slow to finish
/// what it holds does not hold up the thread's other rings; once it
/// stopped, it leaves the epoll set, is dropped, and then its base is
/// sent to the control thread.
fn run_thread<D: SharedDevice>(id: usize, inbox: &Inbox<D>, epoll: Epoll, options: RuntimeOptions)
where
    D::Scratch: Send,
{
    if let Err(e) = epoll.add(&inbox.wake, Interest::READABLE, THREAD_WAKE) {
        error!("worker thread {id}: cannot watch its wake fd: {e}");
    }
    let mut rings: Vec<Ring<D>> = Vec::new();
    // Rings whose stop was asked for, draining: one round each per turn
    // of the loop, so that the thread's other rings are served meanwhile.
    let mut stopping: Vec<Ring<D>> = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    let mut events = [EpollEvent::default(); 16];
    let polls = !options.spin.is_zero();
    loop {
        {
            let mut new = lock(&inbox.rings);
            if new.is_empty() && rings.is_empty() && stopping.is_empty() {
                return;
            }
            for mut r in new.drain(..) {
                r.adopt(&epoll);
                rings.push(r);
            }
        }
        let mut i = 0;
        while i < rings.len() {
            if rings[i].worker.shared.stop.load(Ordering::Acquire) {
                stopping.push(rings.swap_remove(i));
            } else {
                i += 1;
            }
        }
        let mut draining = false;
        let mut i = 0;
        while i < stopping.len() {
            let r = &mut stopping[i];
            match r.worker.stop_round(&mut r.dp, &mut r.round) {
                Drain::Stopped(base) => {
                    let mut r = stopping.swap_remove(i);
                    r.leave(&epoll);
                    let reply = r.reply.clone();
                    // The ring (its scratch and I/O) goes before the reply.
                    drop(r);
                    let _ = reply.send(base);
                    continue;
                }
                Drain::Progress => draining = true,
                Drain::Waiting => {}
            }
            i += 1;
        }
        // Rings that did work in the last turn: with several, each
        // round takes all its driver has in flight (see `Take`).
        let alone = steps.iter().filter(|s| s.worked).count() <= 1;
        steps.clear();
        for r in &mut rings {
            steps.push(r.step(polls, alone));
        }
        if draining || !steps.iter().all(|s| s.idle) {
            continue;
        }
        if rings.is_empty() && stopping.is_empty() {
            continue;
        }
        if polls {
            // No spin while a ring drains: its device's completion (or the
            // poll interval) is what the thread waits for.
            if stopping.is_empty()
                && steps.iter().any(|s| s.spin)
                && !spin(&mut rings, options, alone)
            {
                continue;
            }
            // About to sleep: kicks wanted again (and a last look).
            let mut more = false;
            for r in &mut rings {
                more |= r.arm();
            }
            if more {
                continue;
            }
        }
        let mut poll = false;
        for r in &mut rings {
            poll |= r.watch(&epoll);
        }
        // A draining ring waits for its device: on the completion fd if
        // it has one, else by polling it every poll interval (as it does
        // while what it still has to resubmit cannot be popped).
        for r in &mut stopping {
            r.watch(&epoll);
            poll |= r.completion.is_none() || r.dp.outstanding() == 0;
        }
        // Sub-millisecond poll intervals are kept (epoll_pwait2), and a
        // kick on another ring still wakes the thread at once.
        let timeout = poll.then_some(options.poll_interval);
        let n = epoll.wait_for(&mut events, timeout);
        crate::aio::note_wait();
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                warn!("worker thread {id}: epoll_wait failed: {e}");
                std::thread::sleep(options.poll_interval);
                0
            }
        };
        for ev in &events[..n] {
            let t = ev.token();
            if t == THREAD_WAKE {
                let _ = inbox.wake.read();
                continue;
            }
            let queue = (t >> 2) as u16;
            if let Some(r) = rings
                .iter_mut()
                .chain(&mut stopping)
                .find(|r| r.queue() == queue)
            {
                r.reset(t & 3, &epoll);
            }
        }
    }
}

/// Polls the thread's rings a little before sleeping (kicks stay
/// suppressed meanwhile: the caller asks for them again before it
/// sleeps). Returns whether they are all still idle.
fn spin<D: SharedDevice>(rings: &mut [Ring<D>], options: RuntimeOptions, alone: bool) -> bool
where
    D::Scratch: Send,
{
    let deadline = Instant::now() + options.spin;
    let done: u64 = rings
        .iter()
        .map(|r| r.worker.shared.counters.completed.load(Ordering::Relaxed))
        .sum();
    for r in rings.iter_mut() {
        r.spin_held = r.dp.outstanding();
    }
    // The clock is read every 64 rounds: a busy-polling worker (a long
    // spin) would otherwise spend a fifth of its time in clock_gettime.
    let mut rounds = 0u32;
    while rounds % 64 != 0 || Instant::now() < deadline {
        rounds = rounds.wrapping_add(1);
        for r in rings.iter_mut() {
            let shared = &r.worker.shared;
            if shared.stop.load(Ordering::Acquire) || shared.remap_pending.load(Ordering::Acquire) {
                return false;
            }
            if r.kick_dead {
                continue;
            }
            let mem = r
                .worker
                .memory
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            r.worker.serve(&mut r.dp, &mem, &mut r.round, alone);
            if r.dp.error().is_some() || (r.dp.outstanding() > r.spin_held && r.waits_io()) {
                // A new request went to the device's slow I/O: wait for
                // it on its completion fd (as `step` decides), not by
                // spinning.
                return false;
            }
        }
        let now: u64 = rings
            .iter()
            .map(|r| r.worker.shared.counters.completed.load(Ordering::Relaxed))
            .sum();
        if now != done {
            return false;
        }
        std::hint::spin_loop();
    }
    true
}

impl<D: SharedDevice> RingWorker<D>
where
    D::Scratch: Send,
{
    /// Logs the error that broke the ring and signals it to the front-end
    /// (err eventfd or in-band VRING_ERR), once.
    fn report(&self, dp: &DataPlane, round: &mut Round<D::Scratch>) {
        if let (Some(e), false) = (dp.error(), round.reported) {
            error!(
                "ring {}: {e}; the ring is stopped until restarted",
                self.queue
            );
            round.reported = true;
            if self.raise_err() {
                self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Signals the ring's error to the front-end; whether it was sent.
    fn raise_err(&self) -> bool {
        let err = lock(&self.shared.err).clone();
        match err.raise(self.queue, true) {
            Ok(sent) => sent,
            Err(e) => {
                if let Some(n) = err.notifier() {
                    self.notifier_failed(n, false, &e);
                }
                false
            }
        }
    }

    /// A write to the ring's call fd (`call`) or err fd failed (`e`).
    /// Logged and counted once per
    /// SET_VRING_CALL / SET_VRING_ERR that set it (the same fd set again
    /// is reported again; a ring restarted with the fd it had is not), and
    /// a bad call fd is signalled on the err fd. Nothing stands
    /// in for it: in-band calls are for rings the front-end gave no call
    /// fd, and the ring goes on being served (a driver that polls its
    /// used ring needs no call), until SET_VRING_CALL or SET_VRING_ERR
    /// gives a new fd.
    fn notifier_failed(&self, n: &Notifier, call: bool, e: &io::Error) {
        if !n.first_failure() {
            return;
        }
        let queue = self.queue;
        if call {
            error!("ring {queue}: the call fd cannot be written ({e}); the guest gets no calls until SET_VRING_CALL gives a new call fd");
        } else {
            error!("ring {queue}: the err fd cannot be written ({e}); ring errors are not signalled until SET_VRING_ERR gives a new err fd");
        }
        self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
        if call {
            self.raise_err();
        }
    }

    /// One round: up to a batch of requests popped and processed, the
    /// device's later completions collected, one publish, one call if the
    /// guest wants it. `alone`: no other ring of the thread worked in its
    /// last turn (the round takes half of what the driver has in flight,
    /// else all of it: see [`Take`]). Returns whether more may be
    /// available.
    fn serve(
        &self,
        dp: &mut DataPlane,
        mem: &LinuxGuestMemory,
        round: &mut Round<D::Scratch>,
        alone: bool,
    ) -> bool {
        // A stop is served between requests, not after the batch.
        let take = if alone { Take::Half } else { Take::Whole };
        self.round(dp, mem, round, self.options.batch, Some(take))
    }

    /// Pops and processes up to `batch` requests, collects the device's
    /// later completions, publishes once and signals. A round of the
    /// worker's own (`take` given: not a draining stop's) gives way to a
    /// pending stop between requests and takes that much of the driver's
    /// depth. Returns whether more may be available.
    fn round(
        &self,
        dp: &mut DataPlane,
        mem: &LinuxGuestMemory,
        round: &mut Round<D::Scratch>,
        batch: usize,
        take: Option<Take>,
    ) -> bool {
        let yield_to_stop = take.is_some();
        let area = self.area.as_deref();
        let queue = self.queue;
        // The dirty log, held for the round: device writes are marked
        // while VHOST_F_LOG_ALL is on, the used ring after the publish.
        let log = self.log.read();
        let dirty = log
            .as_deref()
            .and_then(Option::as_ref)
            .map(|(m, size)| DirtyLog::new(m, *size));
        let all = dirty.filter(|_| self.log.all.load(Ordering::Acquire));
        let dev_mem = LoggedMemory::new(mem, all);
        let mut published = Published::Nothing;
        let mut completed = 0u64;
        let mut done = |dp: &mut DataPlane, token, len| match dp.complete(mem, area, token, len) {
            Ok(p) => {
                published = published | p;
                completed += 1;
            }
            Err(e) => error!("ring {queue}: cannot complete a request: {e}"),
        };
        let mut more = true;
        let mut left = batch;
        // A batch of the worker's own rounds adapts to the ring's depth;
        // a draining stop takes everything.
        let mut adapt = take.filter(|_| batch > MIN_BATCH);
        let mut tokens = [None; LOOKAHEAD];
        let mut yielded = false;
        while more && !yielded && left != 0 {
            // Pop a few chains and prefetch the start of their buffers
            // before processing the first: the cache misses on buffers
            // the driver just wrote (or will read) overlap instead of
            // following one another.
            let mut n = 0;
            while n < LOOKAHEAD.min(left) {
                if yield_to_stop && self.shared.stop.load(Ordering::Relaxed) {
                    yielded = true;
                    break;
                }
                let chain = &mut round.chains[n];
                let Ok(Some(token)) = dp.pop(mem, area, chain) else {
                    more = false;
                    break;
                };
                if let Some(take) = adapt.take() {
                    if let Some(k) = dp.driver_in_flight() {
                        let k = usize::from(k);
                        let share = match take {
                            Take::Half => k.div_ceil(2),
                            Take::Whole => k,
                        };
                        left = left.min(share.max(MIN_BATCH)).max(1);
                    }
                }
                for s in chain.segments().iter().take(2) {
                    mem.prefetch_range(s.addr, s.len, s.writable);
                }
                tokens[n] = Some(token);
                n += 1;
            }
            left -= n;
            for (chain, token) in round.chains.iter().zip(&mut tokens).take(n) {
                let Some(token) = token.take() else { continue };
                let c =
                    self.device
                        .process_mapped(queue, chain, token, &dev_mem, &mut round.scratch);
                if let Completion::Done(len) = c {
                    done(dp, token, len);
                }
            }
        }
        self.device
            .poll_mapped(queue, &dev_mem, &mut round.scratch, &mut |token, len| {
                done(dp, token, len)
            });
        let last = dp.publish(mem, area).unwrap_or(Published::Nothing);
        let (mut pages, mut failed) = (dev_mem.pages(), dev_mem.failed());
        if let Some(d) = &dirty {
            self.log_used(dp, d, &mut pages, &mut failed);
        }
        if dirty.is_some() {
            self.log.marked(pages, failed);
        }
        self.signal(published | last, completed);
        more
    }

    /// Marks the ring's used ring in the log, if it logs it (F_LOG).
    fn log_used(
        &self,
        dp: &DataPlane,
        log: &DirtyLog<'_, LinuxGuestMemory>,
        pages: &mut u64,
        failed: &mut u64,
    ) {
        if let Some(at) = *lock(&self.shared.ring_log) {
            match dp.log_used(log, at) {
                Ok(n) => *pages += n,
                Err(e) => {
                    debug!("ring {}: used ring not logged: {e}", self.queue);
                    *failed += 1;
                }
            }
        }
    }

    /// Marks the ring's used ring after a write outside a round (the
    /// notification re-armed, the ring stopped).
    fn log_ring(&self, dp: &DataPlane) {
        let Some(log) = self.log.read() else { return };
        if let Some((m, size)) = log.as_ref() {
            let (mut pages, mut failed) = (0, 0);
            self.log_used(dp, &DirtyLog::new(m, *size), &mut pages, &mut failed);
            self.log.marked(pages, failed);
        }
    }

    fn signal(&self, published: Published, completed: u64) {
        let c = &self.shared.counters;
        // Only the ring's worker writes these.
        if completed != 0 {
            bump(&c.completed, completed);
        }
        match published {
            Published::Notify => {
                let call = lock(&self.shared.call).clone();
                match call.raise(self.queue, false) {
                    Ok(true) => bump(&c.calls, 1),
                    Ok(false) => {}
                    Err(e) => {
                        if let Some(n) = call.notifier() {
                            self.notifier_failed(n, true, &e);
                        }
                    }
                }
            }
            Published::Suppressed => {
                bump(&c.suppressed, 1);
            }
            Published::Nothing => {}
        }
    }

    /// GET_VRING_BASE (or the front-end left): one step towards the
    /// stop, draining or suspending as the data plane decides and serving
    /// what it still hands out. The worker thread calls it once per turn
    /// of its loop until the ring stopped, serving its other rings in
    /// between.
    fn stop_round(&self, dp: &mut DataPlane, round: &mut Round<D::Scratch>) -> Drain {
        let suspend = self.shared.suspend.load(Ordering::Acquire);
        let area = self.area.as_deref();
        let mem = self.memory.read().unwrap_or_else(PoisonError::into_inner);
        let (stop, published) = dp.stop(&*mem, area, suspend);
        self.signal(published.unwrap_or(Published::Nothing), 0);
        match stop {
            Stop::Stopped { base } => {
                self.log_ring(dp);
                Drain::Stopped(base)
            }
            Stop::Draining => {
                self.device.stopping(self.queue, &mut round.scratch);
                let before = dp.outstanding() + dp.resubmits_left();
                // While draining, the stop is the reason to go on;
                // recorded requests are all that pop hands out.
                self.round(dp, &mem, round, usize::MAX, None);
                self.report(dp, round);
                if dp.outstanding() + dp.resubmits_left() == before {
                    // The device still holds requests: let them finish.
                    Drain::Waiting
                } else {
                    Drain::Progress
                }
            }
        }
    }
}

/// Where one [`RingWorker::stop_round`] left a stopping ring.
enum Drain {
    /// Stopped, with its GET_VRING_BASE value.
    Stopped(u32),
    /// Requests completed (or were resubmitted): another round may do
    /// more at once.
    Progress,
    /// The device still holds requests: the thread waits for them (on
    /// the completion fd, else for the poll interval).
    Waiting,
}

/// Serves front-ends on `listener`, one at a time, until `stop` is set (the
/// caller then wakes the accept, e.g. by connecting once).
pub fn serve<D, const Q: usize, const R: usize>(
    listener: &Listener,
    config: BackendConfig,
    device: D,
    options: RuntimeOptions,
    stop: &AtomicBool,
    control: &Control,
) -> Result<(), BackendError>
where
    D: SharedDevice,
    D::Scratch: Send,
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
        serve_one::<D, Q, R>(&stream, config, device.clone(), options, control);
    }
    Ok(())
}

/// Serves one front-end connection to its end.
pub fn serve_one<D, const Q: usize, const R: usize>(
    stream: &Stream,
    config: BackendConfig,
    device: D,
    options: RuntimeOptions,
    control: &Control,
) -> ConnectionEnd
where
    D: SharedDevice,
    D::Scratch: Send,
{
    let mut conn = match Connection::<D, Q, R>::new(config, device, options, control.clone()) {
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
        ConnectionEnd::TimedOut(e) => error!("front-end too slow, disconnecting: {e}"),
    }
    conn.teardown();
    let _ = stream.as_fd();
    end
}

#[cfg(test)]
mod tests;

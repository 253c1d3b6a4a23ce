//! Asynchronous file I/O for a ring's worker: requests go in as they are
//! popped, completions come out in any order, and an eventfd wakes the
//! worker when one arrives ([`Aio::completion_fd`], see
//! [`SharedDevice::completion_fd`](crate::backend::SharedDevice::completion_fd)).
//!
//! Two engines behind one interface: an io_uring ([`Uring`]) when the
//! kernel allows it, else a pool of threads doing `preadv`/`pwritev`
//! ([`ThreadPool`]). Both move bytes straight between the file and guest
//! memory ([`IoBuf`](crate::sys::mmap::IoBuf)s), without a bounce copy.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::sys::eventfd::EventFd;
use crate::sys::uring::{perform, IoRequest, Uring};

/// Which engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AioMode {
    /// io_uring, falling back to threads (with a log line) where it cannot
    /// be set up.
    #[default]
    IoUring,
    /// A pool of threads doing synchronous I/O.
    Threads,
}

impl std::str::FromStr for AioMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "io_uring" | "io-uring" | "uring" => Ok(AioMode::IoUring),
            "threads" => Ok(AioMode::Threads),
            _ => Err(format!("unknown aio mode {s:?} (io_uring or threads)")),
        }
    }
}

thread_local! {
    /// Times the thread waited for an event (see [`note_wait`]).
    static WAITS: Cell<u64> = const { Cell::new(0) };
}

/// Tells the engines of the calling thread that it waited for an event
/// (a kick, a completion, a timeout) since it last submitted: a worker
/// calls it each time it returns from its wait. A pool that runs lone
/// requests in the submitting thread ([`Aio::run_lone_requests`]) takes
/// a request that comes without such a wait after one it ran itself as a
/// sign that the driver has more than one in flight.
pub fn note_wait() {
    WAITS.with(|w| w.set(w.get().wrapping_add(1)));
}

fn waits() -> u64 {
    WAITS.with(Cell::get)
}

/// The threads the I/O pools of one device may run in all, shared among
/// its rings' pools (`--io-threads`), as the one pool of a QEMU
/// AioContext is among the queues it serves: a busy ring's pool may use
/// the threads an idle ring's does not. A pool may always run one thread
/// (a ring is never without one, so the pools may run one each past the
/// budget), and more while the budget has room: up to its share (the
/// budget over the pools) at any time, past it only while no pool under
/// its share is refused one. While one is, a pool over its share lets a
/// thread go each time one finishes a request, down to its share, so
/// the ring that became busy gets its share within a request's time.
#[derive(Debug)]
pub struct ThreadBudget {
    max: usize,
    /// Threads running in all the pools.
    running: AtomicUsize,
    /// Pools sharing the budget.
    pools: AtomicUsize,
    /// Pools under their share that were refused a thread, and have not
    /// had one since nor run out of work.
    wanting: AtomicUsize,
}

impl ThreadBudget {
    /// A budget of `max` threads (at least one).
    pub fn new(max: usize) -> Arc<ThreadBudget> {
        Arc::new(ThreadBudget {
            max: max.max(1),
            running: AtomicUsize::new(0),
            pools: AtomicUsize::new(0),
            wanting: AtomicUsize::new(0),
        })
    }

    /// The threads the pools may run in all.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Threads the pools run now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// What each pool may count on: the budget over the pools, at least
    /// one thread.
    fn share(&self) -> usize {
        (self.max / self.pools.load(Ordering::Relaxed).max(1)).max(1)
    }

    /// Whether a pool running `own` threads may start one more (counted
    /// if so). `wants` is the pool's mark of a refusal under its share
    /// (see `wanting`), kept with the pool's queue.
    fn take(&self, own: usize, wants: &mut bool) -> bool {
        if own == 0 {
            self.running.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let share = self.share();
        let under = own < share;
        if !under && self.wanting.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let taken = self
            .running
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                (r < self.max).then_some(r + 1)
            })
            .is_ok();
        if taken {
            self.satisfied(wants);
        } else if under && !*wants {
            *wants = true;
            self.wanting.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Clears a pool's mark of a refusal (it got a thread, ran out of
    /// work, or goes).
    fn satisfied(&self, wants: &mut bool) {
        if std::mem::take(wants) {
            self.wanting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether a pool running `own` threads is to let one go: it is over
    /// its share while a pool under its share is refused one.
    fn over(&self, own: usize) -> bool {
        self.wanting.load(Ordering::Relaxed) > 0 && own > self.share()
    }

    /// A thread counted by [`take`](Self::take) is gone.
    fn give_back(&self) {
        self.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A completed request: its tag, the bytes moved or the error, and the
/// request itself (its buffers, to resubmit a remainder or drop).
pub type Done = (u64, io::Result<usize>, IoRequest);

/// The engine of one ring's worker.
#[derive(Debug)]
pub enum Aio {
    /// An io_uring (boxed: the ring's state is large), with what a pool
    /// needs should the ring break.
    Uring(Box<Uring>, Fallback),
    /// A thread pool (also one that took over from an io_uring that
    /// broke: see [`Aio::submit`]).
    Threads(ThreadPool),
}

/// The file and pool size of an io_uring engine, for the pool that takes
/// over if the ring breaks.
#[derive(Debug)]
pub struct Fallback {
    file: OwnedFd,
    threads: Arc<ThreadBudget>,
    lone: bool,
}

impl Aio {
    /// An engine for `file` as `mode` asks: an io_uring of `depth`
    /// submission slots, or, when that fails or `mode` says so, a pool of
    /// up to `threads` threads (at least one).
    pub fn new(mode: AioMode, file: BorrowedFd<'_>, depth: u32, threads: usize) -> io::Result<Aio> {
        Self::with_budget(mode, file, depth, &ThreadBudget::new(threads))
    }

    /// [`Aio::new`] with a pool (now or should the io_uring break) whose
    /// threads count against `threads`, a budget other engines may share.
    pub fn with_budget(
        mode: AioMode,
        file: BorrowedFd<'_>,
        depth: u32,
        threads: &Arc<ThreadBudget>,
    ) -> io::Result<Aio> {
        if mode == AioMode::IoUring {
            match Uring::new(depth, file) {
                Ok(u) => {
                    let fallback = Fallback {
                        file: file.try_clone_to_owned()?,
                        threads: Arc::clone(threads),
                        lone: false,
                    };
                    return Ok(Aio::Uring(Box::new(u), fallback));
                }
                Err(e) => warn!("io_uring unavailable ({e}); using a pool of I/O threads"),
            }
        }
        let pool = ThreadPool::with_budget(file.try_clone_to_owned()?, Arc::clone(threads))?;
        Ok(Aio::Threads(pool))
    }

    /// Lets the thread pool (this one, or one that takes over from an
    /// io_uring) carry out a read or a write in the submitting thread
    /// when it is the only request the engine has: for a worker with one
    /// ring to serve, whose driver keeps one request in flight (iodepth
    /// 1), where it saves the hand-off to a pool thread and the signal
    /// back, two thread wake-ups per request. The worker does not look at
    /// its ring meanwhile, so it must have no other ring to serve. A
    /// request that comes right after one run here, without the worker
    /// having waited for an event in between ([`note_wait`]), came while
    /// that one was at the file: the driver has more in flight, and it
    /// goes to the pool (as does every request while others are there),
    /// so a deeper queue is not served one at a time. Measured with 4 KiB
    /// O_DIRECT random I/O at iodepth 1, 7 alternated runs against the
    /// hand-off: on one queue 1.18x (reads) and 1.25x (writes) the IOPS
    /// at 0.73x and 0.68x the CPU per request; on two with a worker each,
    /// reads 1.15x at 0.60x; at iodepth 2 to 32 the same within the
    /// noise.
    pub fn run_lone_requests(&mut self) {
        match self {
            Aio::Uring(_, fallback) => fallback.lone = true,
            Aio::Threads(p) => p.lone = Some(None),
        }
    }

    /// The engine's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Aio::Uring(..) => "io_uring",
            Aio::Threads(_) => "threads",
        }
    }

    /// Queues `request` under `tag`: handed to the kernel or the threads
    /// at the next [`Aio::submit`] at the latest, or, where the kernel is
    /// too busy to take it, at a later one the completion fd calls for
    /// (see [`Uring::push`]). A refused request (one that must not reach
    /// the kernel, or no engine left to run it) is given back with the
    /// error.
    pub fn push(&mut self, tag: u64, request: IoRequest) -> Result<(), (IoRequest, io::Error)> {
        match self {
            Aio::Uring(u, _) => match u.push(tag, request) {
                // Its submit, to make room, broke the ring.
                Err((request, e)) if u.is_broken() => {
                    self.take_over(&e);
                    match self {
                        Aio::Threads(p) => {
                            p.push(tag, request);
                            Ok(())
                        }
                        // No pool could be made: the ring refuses.
                        Aio::Uring(..) => Err((request, e)),
                    }
                }
                r => r,
            },
            Aio::Threads(p) => {
                p.push(tag, request);
                Ok(())
            }
        }
    }

    /// An io_uring that broke (`e`) hands over to a thread pool on the
    /// same completion eventfd: the requests the kernel never took go to
    /// the pool, and so does everything after. Where the pool cannot be
    /// made, the ring stays: its requests end with its error, later ones
    /// are refused.
    fn take_over(&mut self, e: &io::Error) {
        let Aio::Uring(u, fallback) = self else {
            return;
        };
        let pool = u.completion_fd().try_clone_to_owned().and_then(|event| {
            let file = fallback.file.try_clone()?;
            ThreadPool::build(
                file,
                Arc::clone(&fallback.threads),
                IDLE_EXIT,
                COALESCE_FOR,
                EventFd::from(event),
            )
        });
        let mut pool = match pool {
            Ok(p) => p,
            Err(pe) => {
                error!("io_uring failed ({e}) and no thread pool can take over ({pe})");
                return;
            }
        };
        warn!("io_uring failed ({e}); a pool of I/O threads takes over");
        if fallback.lone {
            pool.lone = Some(None);
        }
        for (tag, request) in u.take_failed() {
            pool.push(tag, request);
        }
        pool.submit();
        if let Aio::Uring(ring, _) = std::mem::replace(self, Aio::Threads(pool)) {
            if let Aio::Threads(pool) = self {
                pool.predecessor = Some(ring);
            }
        }
    }

    /// Starts what [`Aio::push`] queued. Where `io_uring_enter` fails
    /// for good (not a busy kernel: see [`Uring::submit`]), here or in a
    /// push that makes room, a thread pool takes over, logged: it carries
    /// out the requests the ring did not take and every later one, on the
    /// same completion fd; those the kernel took complete through the
    /// ring. Nothing to report to the caller: a request that cannot be
    /// carried out ends with its error at [`Aio::reap`].
    pub fn submit(&mut self) {
        match self {
            Aio::Uring(u, _) => {
                // Only a ring that breaks fails its submit.
                if let Err(e) = u.submit() {
                    self.take_over(&e);
                }
            }
            Aio::Threads(p) => p.submit(),
        }
    }

    /// Reports each completed request, in completion order. Reset the
    /// [`completion_fd`](Aio::completion_fd) (read it) before, not after,
    /// so no completion goes unsignalled. The thread pool may keep
    /// completions it gathers while many jobs wait until it signals the
    /// fd for them.
    pub fn reap(&mut self, mut done: impl FnMut(u64, io::Result<usize>, IoRequest)) {
        match self {
            Aio::Uring(u, _) => u.reap(done),
            Aio::Threads(p) => p.reap(|(t, r, q)| done(t, r, q)),
        }
    }

    /// Requests pushed and not reaped.
    pub fn in_flight(&self) -> usize {
        match self {
            Aio::Uring(u, _) => u.in_flight(),
            Aio::Threads(p) => p.in_flight + p.predecessor.as_ref().map_or(0, |r| r.in_flight()),
        }
    }

    /// Readable when a completion is waiting to be reaped.
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        match self {
            Aio::Uring(u, _) => u.completion_fd(),
            // The same eventfd as the pool's, under the number the caller
            // watches (it keeps the engine's fd for the engine's life).
            Aio::Threads(ThreadPool {
                predecessor: Some(ring),
                ..
            }) => ring.completion_fd(),
            Aio::Threads(p) => p.shared.event.as_fd(),
        }
    }
}

/// A request for a pool thread: its tag and the request.
type Job = (u64, IoRequest);

/// A read or a write: a request that takes about as long as the others
/// at the file (not a flush or an fallocate, which may take much longer).
fn transfer(job: &Job) -> bool {
    matches!(job.1, IoRequest::Read { .. } | IoRequest::Write { .. })
}

#[derive(Default)]
struct Queue {
    /// Jobs no thread could take yet (every thread busy, at the maximum):
    /// the next thread to finish takes them.
    jobs: VecDeque<Job>,
    stop: bool,
    /// Threads running.
    threads: usize,
    /// Parked threads waiting for a job (their slot and handle), the last
    /// to park last: it is woken first (its stack and cache are warm).
    idle: Vec<(usize, Thread)>,
    /// The job handed to each thread slot while it is parked (or before
    /// its thread starts): a woken thread always finds one, so no wake-up
    /// is wasted on a job another thread took first.
    handed: Vec<Option<Job>>,
    /// Slots of threads that exited.
    free: Vec<usize>,
    /// Threads doing a read or a write ([`transfer`]).
    transferring: usize,
    /// The pool was refused a thread under its share of the budget
    /// ([`ThreadBudget::take`]).
    wants: bool,
}

impl Queue {
    /// Hands `job` to a parked thread (returned, to be unparked once the
    /// lock is dropped) or, if none is parked, queues it.
    fn hand(&mut self, job: Job) -> Option<Thread> {
        match self.idle.pop() {
            Some((slot, thread)) => {
                self.give(slot, job);
                Some(thread)
            }
            None => {
                self.jobs.push_back(job);
                None
            }
        }
    }

    /// Puts `job` in `slot` for its thread (counted if it is a transfer).
    fn give(&mut self, slot: usize, job: Job) {
        self.transferring += usize::from(transfer(&job));
        self.handed[slot] = Some(job);
    }

    /// Takes back the job in `slot` (its thread did not start).
    fn take_back(&mut self, slot: usize) -> Option<Job> {
        let job = self.handed[slot].take()?;
        self.transferring -= usize::from(transfer(&job));
        Some(job)
    }

    /// Whether `job`, a transfer, waits in the queue for a thread that is
    /// transferring: with `TRANSFERS_PER_WAITING` of them per waiting
    /// job, one finishes soon and takes it without parking.
    fn waits(&self, job: &Job) -> bool {
        transfer(job) && self.jobs.len() < self.transferring / TRANSFERS_PER_WAITING
    }

    /// The next queued job, counted if it is a transfer.
    fn pop(&mut self) -> Option<Job> {
        let job = self.jobs.pop_front()?;
        self.transferring += usize::from(transfer(&job));
        Some(job)
    }

    /// A slot for a new thread.
    fn slot(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.handed.push(None);
            self.handed.len() - 1
        })
    }
}

/// Holds pool threads before their I/O while closed (tests that need
/// requests to stay at the file), but for the jobs it is told to let
/// through.
#[cfg(test)]
#[derive(Default)]
struct Gate {
    /// `None`: open; `Some(n)`: closed after `n` more jobs.
    permits: Mutex<Option<usize>>,
    opened: Condvar,
}

#[cfg(test)]
impl Gate {
    fn set(&self, closed: bool) {
        *lock(&self.permits) = closed.then_some(0);
        self.opened.notify_all();
    }

    /// Lets `n` more jobs through a closed gate.
    fn let_through(&self, n: usize) {
        if let Some(p) = lock(&self.permits).as_mut() {
            *p += n;
        }
        self.opened.notify_all();
    }

    fn pass(&self) {
        let mut permits = lock(&self.permits);
        loop {
            match permits.as_mut() {
                None => return,
                Some(p) if *p > 0 => {
                    *p -= 1;
                    return;
                }
                Some(_) => {
                    permits = self
                        .opened
                        .wait(permits)
                        .unwrap_or_else(PoisonError::into_inner)
                }
            }
        }
    }
}

/// Completions not reaped yet.
#[derive(Default)]
struct Finished {
    list: Vec<Done>,
    /// The worker was signalled for them.
    signalled: bool,
    /// When the oldest completion the worker was not signalled for came.
    since: Option<Instant>,
}

struct PoolShared {
    file: OwnedFd,
    #[cfg(test)]
    gate: Gate,
    /// How long a thread that is to exit takes to (tests of what it
    /// leaves behind).
    #[cfg(test)]
    linger: Mutex<Duration>,
    queue: Mutex<Queue>,
    /// Signalled when a thread exits.
    gone: Condvar,
    done: Mutex<Finished>,
    /// Jobs waiting in the queue (its length, read without its lock).
    waiting: AtomicUsize,
    event: EventFd,
    threads: Arc<ThreadBudget>,
    idle_for: Duration,
    /// [`COALESCE_FOR`].
    coalesce_for: Duration,
}

impl PoolShared {
    /// Copies the queue's length to `waiting` (with its lock held, after
    /// the queue changed).
    fn note_waiting(&self, q: &Queue) {
        self.waiting.store(q.jobs.len(), Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Threads doing synchronous I/O on one file: the fallback where io_uring
/// is not available. The pool grows on demand, a thread for each request
/// no parked thread can take, as its [`ThreadBudget`] allows (so as many
/// requests are at the file as the guest has in flight, up to that many),
/// and a thread that finds nothing to do for [`IDLE_EXIT`] exits, or,
/// past the pool's share of the budget while another pool needs it, one
/// that finishes a request. A request goes
/// straight to the thread that is woken for it. Dropping the pool lets
/// the threads finish what was submitted, then waits for them.
pub struct ThreadPool {
    shared: Arc<PoolShared>,
    queued: Vec<Job>,
    /// Scratch of `submit`: threads to wake, slots of threads to start.
    wake: Vec<Thread>,
    start: Vec<usize>,
    in_flight: usize,
    spawned: usize,
    /// The threads started and not yet seen to have exited: joined when
    /// the pool drops, so that none outlives it (nor holds its file).
    handles: Vec<std::thread::JoinHandle<()>>,
    /// The io_uring this pool took over from (see [`Aio::submit`]): the
    /// requests the kernel took complete through it. Its eventfd is the
    /// pool's (the same file), so the completion fd does not change.
    predecessor: Option<Box<Uring>>,
    /// Lone requests run in the submitting thread
    /// ([`Aio::run_lone_requests`]): `Some` with the thread's
    /// [`note_wait`] count after the last one it ran, if any.
    lone: Option<Option<u64>>,
    /// Completions of the requests run in the submitting thread, for the
    /// next reap.
    ran: Vec<Done>,
    /// Thread starts to refuse, as the system may (tests of a pool that
    /// cannot start a thread).
    #[cfg(test)]
    refuse_spawn: usize,
}

/// Reads and writes at the file per read or write left waiting in the
/// queue for one of them to finish, rather than handed to a parked
/// thread. Waking a parked thread costs a futex wake with an
/// inter-processor interrupt (half the submitting worker's time at
/// iodepth 32, in a VM) and that thread's park after its request; a
/// thread that finishes and finds a job waiting goes on without either.
/// The file sees fewer requests at once (two in three of those in
/// flight, once four or more are), which the CPU saved pays for where
/// the back-end shares its cores: measured with 4 KiB O_DIRECT random
/// reads and writes at iodepth 32 on 1 and 2 queues, 1.18-1.42x the IOPS
/// and 0.74-0.84x the CPU per request; the same within the noise at
/// iodepth 1 and 128 (where the threads are all busy anyway) and from the
/// page cache. Flushes and fallocates, which may take far longer, are
/// never waited for, nor counted.
const TRANSFERS_PER_WAITING: usize = 2;

/// Completions gathered before the worker is signalled while at least as
/// many jobs wait in the queue (fewer waiting, fewer: see
/// [`WAITING_PER_GATHERED`]): the worker is woken once for them rather
/// than every one or two (each wake-up, its reap, publish and call to the
/// driver cost it about 6 us). The requests that wait keep the threads
/// busy, so the file sees as many at once, and IOPS do not change.
/// Measured with 4 KiB O_DIRECT random I/O at iodepth 128 on one queue
/// (64 threads, 64 waiting): 0.79-0.84x the CPU per request. With more
/// waiting, more are gathered: one per [`WAITING_PER_GATHERED`] waiting,
/// up to twice this (at iodepth 128 on two queues, 32 threads and about
/// 90 waiting per queue: 0.93x and 0.95x the CPU per request of 16, the
/// same IOPS; 0.97x and 0.98x on one queue).
const COALESCE: usize = 16;

/// Jobs waiting in the queue per completion gathered before the worker
/// is signalled, while fewer than [`COALESCE`] wait: the threads have
/// that much work left before they need the worker to feed them, so the
/// worker is woken once for several completions, and at once when none
/// wait (iodepth 1 is as before). Measured with 4 KiB O_DIRECT random
/// reads and writes at iodepth 32 on 1 and 2 queues (about 11 waiting
/// per queue), against signalling every completion then: 1.05-1.18x the
/// IOPS per back-end core, the same IOPS.
const WAITING_PER_GATHERED: usize = 2;

/// How long a completion may wait for others before the worker is
/// signalled anyway (a queue behind slow requests: few complete).
const COALESCE_FOR: Duration = Duration::from_millis(1);

/// How long a pool thread waits for work before it exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(10);

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads())
            .field("budget", &self.shared.threads.max)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl ThreadPool {
    /// A pool of at most `max` threads (at least one) doing I/O on
    /// `file`; none runs until there is work.
    pub fn new(file: OwnedFd, max: usize) -> io::Result<ThreadPool> {
        Self::with_budget(file, ThreadBudget::new(max))
    }

    /// A pool doing I/O on `file` whose threads count against `threads`,
    /// a budget other pools may share.
    pub fn with_budget(file: OwnedFd, threads: Arc<ThreadBudget>) -> io::Result<ThreadPool> {
        Self::build(file, threads, IDLE_EXIT, COALESCE_FOR, EventFd::new(true)?)
    }

    #[cfg(test)]
    fn with_timing(
        file: OwnedFd,
        max: usize,
        idle_for: Duration,
        coalesce_for: Duration,
        event: EventFd,
    ) -> io::Result<ThreadPool> {
        Self::build(file, ThreadBudget::new(max), idle_for, coalesce_for, event)
    }

    fn build(
        file: OwnedFd,
        threads: Arc<ThreadBudget>,
        idle_for: Duration,
        coalesce_for: Duration,
        event: EventFd,
    ) -> io::Result<ThreadPool> {
        let pools = threads.pools.fetch_add(1, Ordering::Relaxed) + 1;
        let shared = Arc::new(PoolShared {
            file,
            #[cfg(test)]
            gate: Gate::default(),
            #[cfg(test)]
            linger: Mutex::new(Duration::ZERO),
            queue: Mutex::new(Queue::default()),
            gone: Condvar::new(),
            done: Mutex::new(Finished::default()),
            waiting: AtomicUsize::new(0),
            event,
            threads,
            idle_for,
            coalesce_for,
        });
        info!(
            "I/O thread pool {pools} of a budget of {} threads",
            shared.threads.max
        );
        Ok(ThreadPool {
            shared,
            queued: Vec::new(),
            wake: Vec::new(),
            start: Vec::new(),
            in_flight: 0,
            spawned: 0,
            handles: Vec::new(),
            predecessor: None,
            lone: None,
            ran: Vec::new(),
            #[cfg(test)]
            refuse_spawn: 0,
        })
    }

    /// Threads running now.
    pub fn threads(&self) -> usize {
        lock(&self.shared.queue).threads
    }

    /// Threads parked for a job now.
    #[cfg(test)]
    fn parked(&self) -> usize {
        lock(&self.shared.queue).idle.len()
    }

    /// Jobs waiting in the queue now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        lock(&self.shared.queue).jobs.len()
    }

    fn push(&mut self, tag: u64, request: IoRequest) {
        self.queued.push((tag, request));
        self.in_flight += 1;
    }

    fn submit(&mut self) {
        if self.queued.is_empty() || self.run_lone() {
            return;
        }
        {
            // Each job to the queue if a thread that is transferring will
            // take it (`Queue::waits`), else to a parked thread, else to
            // a new thread (as the budget allows: the job waits in its
            // slot), else to the queue.
            let mut guard = lock(&self.shared.queue);
            let q = &mut *guard;
            for job in self.queued.drain(..) {
                if q.waits(&job) {
                    q.jobs.push_back(job);
                } else if !q.idle.is_empty() {
                    self.wake.extend(q.hand(job));
                } else if self.shared.threads.take(q.threads, &mut q.wants) {
                    q.threads += 1;
                    let slot = q.slot();
                    q.give(slot, job);
                    self.start.push(slot);
                } else {
                    q.jobs.push_back(job);
                }
            }
            self.shared.note_waiting(q);
        }
        for t in self.wake.drain(..) {
            t.unpark();
        }
        for slot in self.start.drain(..) {
            let shared = Arc::clone(&self.shared);
            let name = format!("vhu-io-{}", self.spawned);
            let builder = std::thread::Builder::new().name(name);
            #[cfg(test)]
            let spawned = match self.refuse_spawn.checked_sub(1) {
                Some(n) => {
                    self.refuse_spawn = n;
                    Err(io::Error::from_raw_os_error(libc::EAGAIN))
                }
                None => builder.spawn(move || run(&shared, slot)),
            };
            #[cfg(not(test))]
            let spawned = builder.spawn(move || run(&shared, slot));
            match spawned {
                Ok(h) => {
                    self.spawned += 1;
                    // Threads that idled out are gone: their handles too.
                    self.handles.retain(|h| !h.is_finished());
                    self.handles.push(h);
                }
                Err(e) => {
                    // The job leaves the slot for the threads already
                    // running.
                    let mut q = lock(&self.shared.queue);
                    q.threads -= 1;
                    self.shared.threads.give_back();
                    let job = q.take_back(slot);
                    q.free.push(slot);
                    let wake = job.and_then(|j| q.hand(j));
                    // With none running, nothing takes the queued jobs,
                    // and no later submit need come to start a thread for
                    // them (the worker waits for their completions): they
                    // are carried out here, and complete as a thread's
                    // would, signalled.
                    let jobs: Vec<Job> = if q.threads == 0 {
                        q.jobs.drain(..).collect()
                    } else {
                        Vec::new()
                    };
                    self.shared.note_waiting(&q);
                    if q.threads == 0 {
                        error!(
                            "I/O thread not started ({e}); {} requests carried out by the submitting thread",
                            jobs.len()
                        );
                    } else {
                        warn!("I/O thread not started ({e}); {} running", q.threads);
                    }
                    drop(q);
                    if let Some(t) = wake {
                        t.unpark();
                    }
                    for (tag, request) in jobs {
                        let result = perform(self.shared.file.as_fd(), &request);
                        complete(&self.shared, (tag, result, request));
                    }
                }
            }
        }
    }

    /// Carries out the one request queued here if it is a lone one (see
    /// [`Aio::run_lone_requests`]); returns whether it did.
    fn run_lone(&mut self) -> bool {
        let Some(last) = self.lone else {
            return false;
        };
        let lone = self.queued.len() == 1
            && self.in_flight == 1
            && self.predecessor.as_ref().map_or(0, |r| r.in_flight()) == 0
            && transfer(&self.queued[0])
            && last != Some(waits());
        if !lone {
            return false;
        }
        let Some((tag, request)) = self.queued.pop() else {
            return false;
        };
        let result = perform(self.shared.file.as_fd(), &request);
        self.ran.push((tag, result, request));
        self.lone = Some(Some(waits()));
        true
    }

    fn reap(&mut self, mut done: impl FnMut(Done)) {
        if let Some(ring) = &mut self.predecessor {
            ring.reap(|t, r, q| done((t, r, q)));
        }
        for d in self.ran.drain(..) {
            self.in_flight -= 1;
            done(d);
        }
        if self.in_flight == 0 {
            return;
        }
        let finished = {
            let mut f = lock(&self.shared.done);
            // With twice COALESCE jobs waiting, gathered completions wait
            // for the signal that comes once they are due: a worker woken
            // by the driver's kick leaves them, or it would hand them back
            // a few at a time, and each few would bring another kick.
            // Measured at depth 128 on one queue: the worker's calls went
            // from one per four requests to one per forty, its CPU per
            // request from 3.1 to 1.2 us. With fewer waiting (depth 32 on
            // one queue touches 16 now and then) the worker takes what is
            // there, as it did: holding them there measured 0.96x the
            // IOPS at 1.08x the CPU per request.
            let deep = self.shared.waiting.load(Ordering::Relaxed) >= 2 * COALESCE;
            if f.list.is_empty() || (deep && !f.signalled && !due(&self.shared, &mut f)) {
                return;
            }
            f.signalled = false;
            f.since = None;
            std::mem::take(&mut f.list)
        };
        for d in finished {
            self.in_flight -= 1;
            done(d);
        }
    }
}

/// A pool thread in slot `slot`, starting with the job handed to it.
fn run(shared: &PoolShared, slot: usize) {
    let mut job = lock(&shared.queue).handed[slot].take();
    while let Some(j) = job {
        let transferred = transfer(&j);
        let (tag, request) = j;
        #[cfg(test)]
        shared.gate.pass();
        let result = perform(shared.file.as_fd(), &request);
        complete(shared, (tag, result, request));
        job = next_job(shared, slot, transferred);
    }
    #[cfg(test)]
    std::thread::sleep(*lock(&shared.linger));
}

/// Hands a finished job's completion to the worker.
///
/// The eventfd is written once for the completions the worker takes
/// together (it resets the eventfd, then takes the whole list): by the
/// thread that finds the list not signalled for and its completions due
/// ([`due`]). A list that is not empty has a write to come (a thread that
/// finishes later finds it due) or one the worker has not yet seen.
fn complete(shared: &PoolShared, done: Done) {
    let signal = {
        let mut f = lock(&shared.done);
        f.list.push(done);
        let signal = !f.signalled && due(shared, &mut f);
        f.signalled |= signal;
        signal
    };
    if signal {
        let _ = shared.event.write(1);
    }
}

/// Whether the worker is to be signalled for the completions in `f` now:
/// once the list holds one per [`WAITING_PER_GATHERED`] jobs waiting in
/// the queue (the threads have work for a while, the worker need not
/// feed them), at least one, and [`COALESCE`] to twice it with that many
/// or more waiting, or once its oldest completion came [`COALESCE_FOR`]
/// ago. A list that is not due has a
/// completion to come that looks again: a job waits, so every thread is
/// at work or about to take it (see [`Queue::waits`]), and the one that
/// finishes looks.
fn due(shared: &PoolShared, f: &mut Finished) -> bool {
    let waiting = shared.waiting.load(Ordering::Relaxed);
    let gather = if waiting >= COALESCE {
        (waiting / WAITING_PER_GATHERED).clamp(COALESCE, 2 * COALESCE)
    } else {
        (waiting / WAITING_PER_GATHERED).max(1)
    };
    if f.list.len() >= gather {
        return true;
    }
    let now = Instant::now();
    now.duration_since(*f.since.get_or_insert(now)) >= shared.coalesce_for
}

/// The next job of the thread in `slot`, which finished a transfer or
/// not: a queued one, else one handed to it while it is parked; `None`
/// (the thread is counted out) when the pool stops or the thread has
/// been idle for `idle_for`.
fn next_job(shared: &PoolShared, slot: usize, transferred: bool) -> Option<Job> {
    let mut q = lock(&shared.queue);
    q.transferring -= usize::from(transferred);
    // Over its share of the budget while another pool is refused one:
    // the thread goes, unless it is the last at work with jobs waiting
    // (the threads at work take those; a parked one is not woken for
    // them).
    if shared.threads.over(q.threads) && (q.transferring > 0 || q.jobs.is_empty()) {
        leave(shared, &mut q, slot);
        return None;
    }
    if let Some(j) = q.pop() {
        shared.note_waiting(&q);
        return Some(j);
    }
    if q.stop {
        leave(shared, &mut q, slot);
        return None;
    }
    // Out of work: the pool no longer wants a thread.
    shared.threads.satisfied(&mut q.wants);
    q.idle.push((slot, std::thread::current()));
    let deadline = Instant::now() + shared.idle_for;
    loop {
        drop(q);
        std::thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
        q = lock(&shared.queue);
        // Taken off the idle list with a job, or still on it.
        if let Some(j) = q.handed[slot].take() {
            return Some(j);
        }
        if q.stop || Instant::now() >= deadline {
            q.idle.retain(|(s, _)| *s != slot);
            leave(shared, &mut q, slot);
            return None;
        }
    }
}

/// Counts out the thread in `slot`, which is about to exit, under the
/// same lock as its last look at the queue: a submit that finds the
/// thread counted also finds it able to take a job (parked, or still to
/// look at the queue), so a job is never queued for a thread that is
/// gone.
fn leave(shared: &PoolShared, q: &mut Queue, slot: usize) {
    q.threads -= 1;
    shared.threads.give_back();
    q.free.push(slot);
    shared.gone.notify_all();
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // Submitted requests are done before the pool goes (their buffers
        // are guest memory the caller is about to release); with no
        // thread to run them, submit runs them.
        self.submit();
        let mut q = lock(&self.shared.queue);
        q.stop = true;
        // Parked threads leave (a thread handed a job does it first).
        for (_, t) in &q.idle {
            t.unpark();
        }
        while q.threads > 0 {
            q = self
                .shared
                .gone
                .wait(q)
                .unwrap_or_else(PoisonError::into_inner);
        }
        // The pool leaves the budget: the others' shares grow.
        self.shared.threads.satisfied(&mut q.wants);
        self.shared.threads.pools.fetch_sub(1, Ordering::Relaxed);
        drop(q);
        // Counted out, the threads are on their way out: they hold the
        // shared state (the file) until they are gone.
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vhost_user_core::memory::GuestMemory;
    use vhost_user_core::message::MemRegionMsg;

    use super::*;
    use crate::memory::LinuxGuestMemory;
    use crate::sys::memfd;

    fn guest(size: u64) -> LinuxGuestMemory {
        let mut m = LinuxGuestMemory::new();
        let region = MemRegionMsg {
            guest_addr: 0,
            size,
            user_addr: 0,
            mmap_offset: 0,
            xen: None,
        };
        m.map(0, region, memfd::create("guest", size).unwrap())
            .unwrap();
        m
    }

    fn image(len: usize) -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "vhu-aio-{}-{:?}.img",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.set_len(len as u64).unwrap();
        f
    }

    /// A 4 KiB read of the file at `offset` into guest memory at `gpa`.
    fn read_4k(mem: &LinuxGuestMemory, gpa: u64, offset: u64) -> IoRequest {
        let mut bufs = Vec::new();
        mem.io_bufs(gpa, 4096, true, &mut bufs).unwrap();
        IoRequest::Read { offset, bufs }
    }

    fn wait_all(aio: &mut Aio, n: usize) -> Vec<(u64, usize)> {
        let mut got = Vec::new();
        aio.submit();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < n {
            assert!(std::time::Instant::now() < deadline, "completions lost");
            aio.reap(|tag, r, _| got.push((tag, r.unwrap())));
            std::thread::yield_now();
        }
        got
    }

    /// Writes a pattern from guest memory in many requests, reads it back
    /// into other guest memory, through both engines.
    fn round_trip(mode: AioMode) {
        let mem = guest(1 << 20);
        let file = image(1 << 20);
        let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 13 / 7) as u8).collect();
        mem.write(0, &pattern).unwrap();
        let mut aio = Aio::new(mode, file.as_fd(), 8, 3).unwrap();
        let want = if mode == AioMode::IoUring {
            "io_uring"
        } else {
            "threads"
        };
        assert_eq!(aio.name(), want);
        // 16 writes of 4 KiB, each from two guest ranges, more than the
        // ring's 8 slots.
        for i in 0..16u64 {
            let mut bufs = Vec::new();
            mem.io_bufs(i * 4096, 1024, false, &mut bufs).unwrap();
            mem.io_bufs(i * 4096 + 1024, 3072, false, &mut bufs)
                .unwrap();
            let w = IoRequest::Write {
                offset: i * 4096,
                bufs,
            };
            aio.push(i, w).unwrap();
        }
        let mut done = wait_all(&mut aio, 16);
        done.sort_unstable();
        assert_eq!(done, (0..16).map(|i| (i, 4096)).collect::<Vec<_>>());
        let mut on_disk = vec![0; 65536];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(on_disk, pattern);
        aio.push(99, IoRequest::Sync).unwrap();
        assert_eq!(wait_all(&mut aio, 1), [(99, 0)]);
        let mut bufs = Vec::new();
        mem.io_bufs(0x80000, 65536, true, &mut bufs).unwrap();
        aio.push(7, IoRequest::Read { offset: 0, bufs }).unwrap();
        assert_eq!(wait_all(&mut aio, 1), [(7, 65536)]);
        let mut back = vec![0; 65536];
        mem.read(0x80000, &mut back).unwrap();
        assert_eq!(back, pattern);
        // Into 16 scattered buffers of 4 KiB (more iovecs than a
        // synchronous read keeps on its stack), twice (a ring reuses its
        // iovec arrays).
        for tag in [8, 9] {
            mem.write(0xa0000, &[0u8; 0x20000]).unwrap();
            let mut bufs = Vec::new();
            for i in 0..16 {
                mem.io_bufs(0xa0000 + i * 8192, 4096, true, &mut bufs)
                    .unwrap();
            }
            assert_eq!(bufs.len(), 16);
            aio.push(tag, IoRequest::Read { offset: 0, bufs }).unwrap();
            assert_eq!(wait_all(&mut aio, 1), [(tag, 65536)]);
            for i in 0..16u64 {
                let mut page = vec![0; 4096];
                mem.read(0xa0000 + i * 8192, &mut page).unwrap();
                let at = i as usize * 4096;
                assert_eq!(page, pattern[at..at + 4096], "buffer {i}");
            }
        }
        // A read into a buffer not marked writable never reaches the
        // kernel.
        let mut bufs = Vec::new();
        mem.io_bufs(0, 512, false, &mut bufs).unwrap();
        if let Aio::Uring(..) = aio {
            let (_, e) = aio
                .push(1, IoRequest::Read { offset: 0, bufs })
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        } else {
            aio.push(1, IoRequest::Read { offset: 0, bufs }).unwrap();
            aio.submit();
            let mut errs = 0;
            while errs == 0 {
                aio.reap(|_, r, _| errs += usize::from(r.is_err()));
            }
        }
        assert_eq!(aio.in_flight(), 0);
    }

    /// A read of what the page cache holds is copied at once; a write is
    /// not one for `read_cached`.
    #[test]
    fn read_cached_copies_what_the_page_cache_holds() {
        use crate::sys::uring::read_cached;
        let mem = guest(1 << 20);
        let file = image(1 << 20);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 5) as u8).collect();
        file.write_all_at(&data, 4096).unwrap();
        let mut bufs = Vec::new();
        mem.io_bufs(0x1000, 4096, true, &mut bufs).unwrap();
        mem.io_bufs(0x3000, 4096, true, &mut bufs).unwrap();
        let read = IoRequest::Read { offset: 4096, bufs };
        match read_cached(file.as_fd(), &read) {
            Ok(n) => {
                assert_eq!(n, 8192);
                let mut back = vec![0; 4096];
                mem.read(0x1000, &mut back).unwrap();
                assert_eq!(back, data[..4096]);
                mem.read(0x3000, &mut back).unwrap();
                assert_eq!(back, data[4096..]);
            }
            // A kernel or file system without RWF_NOWAIT.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}"),
        }
        let mut bufs = Vec::new();
        mem.io_bufs(0x1000, 512, false, &mut bufs).unwrap();
        let write = IoRequest::Write { offset: 0, bufs };
        let e = read_cached(file.as_fd(), &write).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    /// A kernel too busy to take the requests (`io_uring_enter` failing
    /// with EAGAIN, EBUSY or EINTR) leaves them queued: the completion fd
    /// calls the caller back to submit them again, or a caller with
    /// nothing else in flight would sleep on it forever.
    #[test]
    fn a_busy_kernel_calls_the_submitter_back() {
        let mem = guest(1 << 20);
        let file = image(1 << 20);
        file.write_all_at(&[0x5au8; 4096], 8192).unwrap();
        let mut aio = match Aio::new(AioMode::IoUring, file.as_fd(), 8, 1) {
            Ok(a @ Aio::Uring(..)) => a,
            // No io_uring here (the fallback has its own tests).
            _ => return,
        };
        for (tag, errno) in [(1u64, libc::EAGAIN), (2, libc::EBUSY), (3, libc::EINTR)] {
            aio.push(tag, read_4k(&mem, tag * 4096, 8192)).unwrap();
            let Aio::Uring(u, _) = &mut aio else {
                unreachable!()
            };
            u.refuse_enter = Some(errno);
            aio.submit();
            // Signalled (and reset by the read).
            let signalled = crate::sys::eventfd::EventFd::read_fd(aio.completion_fd());
            assert!(
                matches!(signalled, Ok(n) if n > 0),
                "errno {errno}: nothing calls the submitter back: {signalled:?}"
            );
            let mut reaped = 0;
            aio.reap(|_, _, _| reaped += 1);
            assert_eq!(
                reaped, 0,
                "errno {errno}: the request never reached the kernel"
            );
            assert_eq!(wait_all(&mut aio, 1), [(tag, 4096)]);
            let mut back = vec![0; 4096];
            mem.read(tag * 4096, &mut back).unwrap();
            assert_eq!(back, [0x5a; 4096]);
        }
    }

    /// A request that finds the submission queue full while the kernel
    /// is too busy to take it (an EBUSY from completions kept aside from
    /// a full completion queue: a guest queue may hold more requests than
    /// it) is accepted, not refused (the guest would see an I/O error):
    /// it and the ones after it wait in the engine, the completion fd
    /// calls the caller back, and later rounds of submit and reap carry
    /// every one out once, with its data.
    #[test]
    fn a_full_queue_and_a_busy_kernel_keep_the_request() {
        for errno in [libc::EBUSY, libc::EAGAIN] {
            let (mem, file) = patterned(5);
            let mut aio = match Aio::new(AioMode::IoUring, file.as_fd(), 8, 1) {
                Ok(a @ Aio::Uring(..)) => a,
                // No io_uring here (the fallback has its own tests).
                _ => return,
            };
            let read = |block: u64| read_4k(&mem, block * 4096, block * 4096);
            // The submission queue's 8 entries, not submitted yet.
            for block in 0..8 {
                aio.push(block, read(block)).unwrap();
            }
            let Aio::Uring(u, _) = &mut aio else {
                unreachable!()
            };
            u.refuse_enter = Some(errno);
            if let Err((_, e)) = aio.push(8, read(8)) {
                panic!("errno {errno}: request refused: {e}");
            }
            let signalled = EventFd::read_fd(aio.completion_fd());
            assert!(
                matches!(signalled, Ok(n) if n > 0),
                "errno {errno}: nothing calls the submitter back: {signalled:?}"
            );
            // More while the first waits: accepted behind it.
            for block in 9..12 {
                aio.push(block, read(block)).unwrap();
            }
            assert_eq!(aio.in_flight(), 12, "errno {errno}");
            let mut got = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                // As a worker does: reset the fd, submit, reap, sleep on it.
                let _ = EventFd::read_fd(aio.completion_fd());
                aio.submit();
                aio.reap(|tag, r, _| {
                    assert_eq!(r.unwrap(), 4096, "errno {errno}: tag {tag}");
                    got.push(tag);
                });
                if got.len() >= 12 {
                    break;
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let fd = aio.completion_fd();
                let signalled =
                    crate::sys::eventfd::poll_readable(fd, left.as_millis() as i32).unwrap();
                assert!(
                    signalled,
                    "errno {errno}: {} of 12 reaped, no signal",
                    got.len()
                );
            }
            got.sort_unstable();
            assert_eq!(got, (0..12).collect::<Vec<_>>(), "errno {errno}");
            assert_eq!(aio.in_flight(), 0, "errno {errno}");
            check_blocks(&mem, 0..12, 5);
        }
    }

    /// `io_uring_enter` failing otherwise (a ring the kernel no longer
    /// takes entries from) breaks the ring: the requests it did not take
    /// are handed back (and the completion fd calls the caller back for
    /// them: nothing else would), later ones are refused, and one the
    /// kernel took before completes with its data.
    #[test]
    fn a_broken_ring_gives_back_what_it_did_not_take_and_refuses_more() {
        let mem = guest(1 << 20);
        let file = image(1 << 20);
        file.write_all_at(&[0x5au8; 4096], 8192).unwrap();
        let Ok(mut u) = Uring::new(8, file.as_fd()) else {
            // No io_uring here (the fallback has its own tests).
            return;
        };
        let read = |tag: u64| read_4k(&mem, tag * 4096, 8192);
        u.push(1, read(1)).unwrap();
        u.submit().unwrap();
        u.push(2, read(2)).unwrap();
        u.push(3, read(3)).unwrap();
        u.refuse_enter = Some(libc::EINVAL);
        let e = u.submit().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert!(u.is_broken());
        let signalled = EventFd::read_fd(u.completion_fd());
        assert!(
            matches!(signalled, Ok(n) if n > 0),
            "nothing calls the submitter back: {signalled:?}"
        );
        let (_, e) = u.push(4, read(4)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let back: Vec<u64> = u.take_failed().into_iter().map(|(t, _)| t).collect();
        assert_eq!(back, [2, 3]);
        assert_eq!(u.in_flight(), 1);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.is_empty() {
            assert!(std::time::Instant::now() < deadline, "completion lost");
            u.reap(|tag, r, _| got.push((tag, r.unwrap())));
            std::thread::yield_now();
        }
        assert_eq!(got, [(1, 4096)]);
        let mut data = vec![0; 4096];
        mem.read(4096, &mut data).unwrap();
        assert_eq!(data, [0x5a; 4096]);
        // The abandoned reads never ran.
        for tag in [2, 3] {
            mem.read(tag * 4096, &mut data).unwrap();
            assert!(data.iter().all(|&b| b == 0), "read {tag} ran");
        }
    }

    /// Drops a ring holding a read from a pipe that the kernel took (it
    /// completes only once the pipe is written), after `then` did
    /// something to the ring: the drop must wait for the read, then
    /// return, with the read's data in guest memory.
    fn drop_waits_for_a_pipe_read(then: impl FnOnce(&mut Uring, &LinuxGuestMemory)) {
        use std::io::Write;
        let mem = guest(1 << 20);
        let (r, w) = crate::sys::pipe::pipe().unwrap();
        let Ok(mut u) = Uring::new(8, r.as_fd()) else {
            return;
        };
        u.push(1, read_4k(&mem, 4096, 0)).unwrap();
        u.submit().unwrap();
        then(&mut u, &mem);
        let (send, recv) = std::sync::mpsc::channel();
        let dropper = std::thread::spawn(move || {
            drop(u);
            let _ = send.send(());
        });
        assert!(
            recv.recv_timeout(Duration::from_millis(300)).is_err(),
            "the drop did not wait for the read the kernel took"
        );
        std::fs::File::from(w).write_all(&[0x77; 4096]).unwrap();
        recv.recv_timeout(Duration::from_secs(10))
            .expect("the drop did not come back once the read completed");
        dropper.join().unwrap();
        let mut data = vec![0; 4096];
        mem.read(4096, &mut data).unwrap();
        assert_eq!(data, [0x77; 4096]);
        // A read abandoned by a broken ring never ran.
        mem.read(8192, &mut data).unwrap();
        assert!(data.iter().all(|&b| b == 0));
    }

    /// A broken ring that is dropped waits for the requests the kernel
    /// took (their buffers are guest memory the caller is about to
    /// release) without entering the abandoned ones.
    #[test]
    fn a_broken_ring_waits_for_the_kernel_s_requests_when_dropped() {
        drop_waits_for_a_pipe_read(|u, mem| {
            u.push(2, read_4k(mem, 8192, 0)).unwrap();
            u.refuse_enter = Some(libc::EINVAL);
            u.submit().unwrap_err();
            assert!(u.is_broken());
        });
    }

    /// A ring dropped while the kernel is busy (its enter refused with
    /// EBUSY, as with completions kept aside from a full completion
    /// queue) waits that out for the requests the kernel took, rather
    /// than keep their buffers for good.
    #[test]
    fn a_ring_dropped_while_the_kernel_is_busy_still_waits() {
        drop_waits_for_a_pipe_read(|u, _| u.refuse_enter = Some(libc::EBUSY));
    }

    /// More requests complete than the ring's completion queue holds (64
    /// entries for a ring of 8): the kernel keeps the rest aside until
    /// the ring is entered again. A worker that has nothing more to
    /// submit still gets them, each once, signalled on the completion fd.
    #[test]
    fn completions_beyond_the_completion_queue_are_reaped() {
        let (mem, file) = patterned(3);
        let Ok(mut u) = Uring::new(8, file.as_fd()) else {
            return;
        };
        for block in 0..100 {
            u.push(block, read_4k(&mem, block * 4096, block * 4096))
                .unwrap();
        }
        u.submit().unwrap();
        // All of them complete before the first reap.
        std::thread::sleep(Duration::from_millis(200));
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            // As a worker does: reset the fd, submit, reap, sleep on it.
            let _ = EventFd::read_fd(u.completion_fd());
            u.submit().unwrap();
            u.reap(|tag, r, _| {
                assert_eq!(r.unwrap(), 4096);
                got.push(tag);
            });
            if got.len() >= 100 {
                break;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let signalled =
                crate::sys::eventfd::poll_readable(u.completion_fd(), left.as_millis() as i32)
                    .unwrap();
            assert!(
                signalled,
                "{} of 100 reaped, {} in flight, no signal",
                got.len(),
                u.in_flight()
            );
        }
        got.sort_unstable();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert_eq!(u.in_flight(), 0);
        check_blocks(&mem, 0..100, 3);
    }

    /// An engine whose io_uring breaks carries on as a thread pool on the
    /// same completion fd: the requests the ring did not take and every
    /// later one are carried out by the pool, one the kernel took
    /// completes through the ring, each once, with its data. The pool
    /// runs lone requests itself if the engine was told to.
    #[test]
    fn a_thread_pool_takes_over_from_a_broken_ring() {
        use std::os::fd::AsRawFd;
        let (mem, file) = patterned(1);
        let mut aio = match Aio::new(AioMode::IoUring, file.as_fd(), 8, 2) {
            Ok(a @ Aio::Uring(..)) => a,
            _ => return,
        };
        aio.run_lone_requests();
        let fd = aio.completion_fd().as_raw_fd();
        let read = |block: u64| read_4k(&mem, block * 4096, block * 4096);
        aio.push(1, read(1)).unwrap();
        aio.submit();
        aio.push(2, read(2)).unwrap();
        aio.push(3, read(3)).unwrap();
        let Aio::Uring(u, _) = &mut aio else {
            unreachable!()
        };
        u.refuse_enter = Some(libc::EINVAL);
        aio.submit();
        assert_eq!(aio.name(), "threads");
        assert_eq!(aio.completion_fd().as_raw_fd(), fd);
        aio.push(4, read(4)).unwrap();
        aio.submit();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < 4 {
            assert!(std::time::Instant::now() < deadline, "completions lost");
            // Every completion is signalled on the one fd.
            let _ = EventFd::read_fd(aio.completion_fd());
            aio.reap(|tag, r, _| got.push((tag, r.unwrap())));
            if got.len() < 4 {
                crate::sys::eventfd::poll_readable(aio.completion_fd(), 1000).unwrap();
            }
        }
        got.sort_unstable();
        assert_eq!(got, [(1, 4096), (2, 4096), (3, 4096), (4, 4096)]);
        assert_eq!(aio.in_flight(), 0);
        // The pool runs lone requests as the ring was told to, once the
        // ring has none left.
        note_wait();
        aio.push(5, read(5)).unwrap();
        aio.submit();
        let mut now = Vec::new();
        aio.reap(|tag, r, _| now.push((tag, r.unwrap())));
        assert_eq!(now, [(5, 4096)]);
        check_blocks(&mem, 1..6, 1);
    }

    /// A ring that breaks while requests wait behind a full submission
    /// queue (a busy kernel) hands them to the pool that takes over with
    /// the ones queued, in order: every request completes once, with its
    /// data, on the one completion fd.
    #[test]
    fn a_thread_pool_takes_over_the_requests_waiting_in_a_broken_ring() {
        let (mem, file) = patterned(3);
        let mut aio = match Aio::new(AioMode::IoUring, file.as_fd(), 8, 2) {
            Ok(a @ Aio::Uring(..)) => a,
            _ => return,
        };
        let read = |block: u64| read_4k(&mem, block * 4096, block * 4096);
        // One in the kernel, eight queued, three waiting.
        aio.push(0, read(0)).unwrap();
        aio.submit();
        for block in 1..9 {
            aio.push(block, read(block)).unwrap();
        }
        let Aio::Uring(u, _) = &mut aio else {
            unreachable!()
        };
        u.refuse_enter = Some(libc::EBUSY);
        for block in 9..12 {
            aio.push(block, read(block)).unwrap();
        }
        let Aio::Uring(u, _) = &mut aio else {
            unreachable!()
        };
        assert_eq!(u.in_flight(), 12);
        u.refuse_enter = Some(libc::EINVAL);
        let e = u.submit().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // Handed back queued first, then waiting: as they came.
        let back: Vec<u64> = u.take_failed().into_iter().map(|(t, _)| t).collect();
        assert_eq!(back, (1..12).collect::<Vec<_>>());
        assert_eq!(u.in_flight(), 1);

        // The same through the engine, whose pool carries them out.
        let mut aio = match Aio::new(AioMode::IoUring, file.as_fd(), 8, 2) {
            Ok(a @ Aio::Uring(..)) => a,
            _ => return,
        };
        aio.push(0, read(20)).unwrap();
        aio.submit();
        for block in 21..29 {
            aio.push(block - 20, read(block)).unwrap();
        }
        let Aio::Uring(u, _) = &mut aio else {
            unreachable!()
        };
        u.refuse_enter = Some(libc::EAGAIN);
        for block in 29..32 {
            aio.push(block - 20, read(block)).unwrap();
        }
        let Aio::Uring(u, _) = &mut aio else {
            unreachable!()
        };
        u.refuse_enter = Some(libc::EINVAL);
        aio.submit();
        assert_eq!(aio.name(), "threads");
        aio.push(12, read(32)).unwrap();
        assert_eq!(aio.in_flight(), 13);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < 13 {
            assert!(std::time::Instant::now() < deadline, "completions lost");
            let _ = EventFd::read_fd(aio.completion_fd());
            aio.submit();
            aio.reap(|tag, r, _| got.push((tag, r.unwrap())));
            if got.len() < 13 {
                crate::sys::eventfd::poll_readable(aio.completion_fd(), 1000).unwrap();
            }
        }
        got.sort_unstable();
        assert_eq!(got, (0..13).map(|t| (t, 4096)).collect::<Vec<_>>());
        assert_eq!(aio.in_flight(), 0);
        check_blocks(&mem, 20..33, 3);
    }

    /// A ring dropped with requests waiting behind a full submission
    /// queue does not wait for them (the kernel never had them, and
    /// nothing would complete them): it waits for the queued ones, which
    /// it hands to the kernel, and lets the waiting ones go unread.
    #[test]
    fn a_ring_dropped_with_requests_waiting_does_not_wait_for_them() {
        let (mem, file) = patterned(7);
        let Ok(mut u) = Uring::new(8, file.as_fd()) else {
            return;
        };
        for block in 1..9 {
            u.push(block, read_4k(&mem, block * 4096, block * 4096))
                .unwrap();
        }
        u.refuse_enter = Some(libc::EBUSY);
        for block in 9..11 {
            u.push(block, read_4k(&mem, block * 4096, block * 4096))
                .unwrap();
        }
        assert_eq!(u.in_flight(), 10);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(u);
            let _ = tx.send(());
        });
        let dropped = rx.recv_timeout(Duration::from_secs(10));
        assert!(
            dropped.is_ok(),
            "drop waits for requests the kernel never had"
        );
        check_blocks(&mem, 1..9, 7);
        let mut data = [0u8; 4096];
        for block in 9..11 {
            mem.read(block * 4096, &mut data).unwrap();
            assert!(data.iter().all(|&b| b == 0), "read {block} ran");
        }
    }

    #[test]
    fn io_uring_round_trip() {
        round_trip(AioMode::IoUring);
    }

    #[test]
    fn thread_pool_round_trip() {
        round_trip(AioMode::Threads);
    }

    /// A read that crosses the end of the file comes back short; the
    /// rest ([`IoRequest::advance`], which splits a buffer in the
    /// middle) reads what the file has once it grew, into the right
    /// place, through both engines.
    #[test]
    fn short_read_and_the_rest_resubmitted() {
        for mode in [AioMode::IoUring, AioMode::Threads] {
            let mem = guest(1 << 20);
            let file = image(6144);
            let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + i / 251) as u8).collect();
            file.write_all_at(&pattern[..6144], 0).unwrap();
            let mut aio = Aio::new(mode, file.as_fd(), 4, 2).unwrap();
            let mut bufs = Vec::new();
            for (at, len) in [(0x1000, 3000), (0x3000, 3000), (0x5000, 2192)] {
                mem.io_bufs(at, len, true, &mut bufs).unwrap();
            }
            aio.push(1, IoRequest::Read { offset: 0, bufs }).unwrap();
            aio.submit();
            let mut got = None;
            while got.is_none() {
                aio.reap(|tag, r, req| got = Some((tag, r.unwrap(), req)));
            }
            let (tag, n, mut rest) = got.unwrap();
            assert_eq!((tag, n), (1, 6144), "{mode:?}");
            assert!(rest.advance(n));
            assert_eq!(rest.len(), 2048);
            let IoRequest::Read { offset, bufs } = &rest else {
                panic!("{rest:?}")
            };
            assert_eq!((*offset, bufs.len()), (6144, 1));
            file.write_all_at(&pattern[6144..], 6144).unwrap();
            aio.push(2, rest).unwrap();
            assert_eq!(wait_all(&mut aio, 1), [(2, 2048)], "{mode:?}");
            let mut back = vec![0; 8192];
            mem.read(0x1000, &mut back[..3000]).unwrap();
            mem.read(0x3000, &mut back[3000..6000]).unwrap();
            mem.read(0x5000, &mut back[6000..]).unwrap();
            assert_eq!(back, pattern, "{mode:?}");
            // Everything moved: nothing left.
            let mut bufs = Vec::new();
            mem.io_bufs(0, 100, false, &mut bufs).unwrap();
            let mut w = IoRequest::Write { offset: 0, bufs };
            assert!(!w.advance(100));
            assert!(!IoRequest::Sync.advance(0));
        }
    }

    /// The pool starts a thread for each request no idle thread takes (but
    /// those left for threads at work: a third), up to its maximum, and
    /// its threads exit when idle; it grows again for the next requests.
    #[test]
    fn the_thread_pool_grows_with_the_load_and_shrinks_when_idle() {
        let mem = guest(1 << 20);
        let file = image(1 << 20);
        for (max, batch) in [(64, 16), (4, 16)] {
            let idle = Duration::from_millis(200);
            let mut pool = ThreadPool::with_timing(
                file.as_fd().try_clone_to_owned().unwrap(),
                max,
                idle,
                COALESCE_FOR,
                EventFd::new(true).unwrap(),
            )
            .unwrap();
            assert_eq!(pool.threads(), 0);
            for round in 0..2 {
                for i in 0..batch {
                    let mut bufs = Vec::new();
                    mem.io_bufs(i * 4096, 4096, true, &mut bufs).unwrap();
                    pool.push(
                        i,
                        IoRequest::Read {
                            offset: i * 4096,
                            bufs,
                        },
                    );
                }
                pool.submit();
                let started = pool.threads();
                // Nobody idle: a thread for each request but one in three,
                // up to the cap.
                let batch_len = batch as usize;
                assert!(started <= batch_len.min(max), "round {round}: {started}");
                assert!(
                    started >= (batch_len * 2 / 3).min(max),
                    "round {round}: {started}"
                );
                let mut n = 0;
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while n < batch {
                    assert!(std::time::Instant::now() < deadline, "completions lost");
                    pool.reap(|(_, r, _)| {
                        assert_eq!(r.unwrap(), 4096);
                        n += 1
                    });
                    std::thread::yield_now();
                }
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while pool.threads() > 0 {
                    assert!(std::time::Instant::now() < deadline, "idle threads stay");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// A thread that idles out is counted out at its last look at the
    /// queue: a request submitted while it exits starts a new thread
    /// rather than wait, at the pool's maximum, for the one that is going.
    #[test]
    fn a_request_submitted_while_the_last_thread_exits_is_carried_out() {
        let (mem, file) = patterned(7);
        let fd = file.as_fd().try_clone_to_owned().unwrap();
        let idle = Duration::from_millis(20);
        let event = EventFd::new(true).unwrap();
        let mut pool = ThreadPool::with_timing(fd, 1, idle, COALESCE_FOR, event).unwrap();
        *lock(&pool.shared.linger) = Duration::from_millis(300);
        reads(&mut pool, &mem, 0, 1);
        assert_eq!(reap_n(&mut pool, 1), [0]);
        // The thread idles out after 20 ms and takes 300 ms to exit.
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(pool.threads(), 0);
        reads(&mut pool, &mem, 1, 1);
        assert_eq!(reap_n(&mut pool, 1), [1]);
        check_blocks(&mem, 0..2, 7);
    }

    /// A dropped pool leaves no thread behind, nor the file it holds for
    /// them: a thread counted out and still on its way out (it lingers)
    /// is waited for.
    #[test]
    fn a_dropped_pool_leaves_no_thread_behind() {
        let (mem, file) = patterned(3);
        let fd = file.as_fd().try_clone_to_owned().unwrap();
        let mut pool = ThreadPool::new(fd, 2).unwrap();
        *lock(&pool.shared.linger) = Duration::from_millis(300);
        reads(&mut pool, &mem, 0, 2);
        assert_eq!(reap_n(&mut pool, 2), [0, 1]);
        let shared = Arc::downgrade(&pool.shared);
        drop(pool);
        assert!(
            shared.upgrade().is_none(),
            "a pool thread outlived its pool"
        );
        check_blocks(&mem, 0..2, 3);
    }

    /// A pool that could start no thread for the three reads (of blocks
    /// 0..3, patterned with `mul`) submitted to it.
    fn pool_without_threads(mul: u32) -> (LinuxGuestMemory, std::fs::File, ThreadPool) {
        let (mem, file) = patterned(mul);
        let mut pool = ThreadPool::new(file.as_fd().try_clone_to_owned().unwrap(), 2).unwrap();
        pool.refuse_spawn = 2;
        for block in 0..3 {
            pool.push(block, read_4k(&mem, block * 4096, block * 4096));
        }
        pool.submit();
        assert_eq!(pool.threads(), 0);
        (mem, file, pool)
    }

    /// A pool that cannot start a thread (none running) still carries
    /// out what was submitted to it and signals the completions: the
    /// worker has nothing else to wait for, and a ring that stops waits
    /// for them. It starts threads again once it can.
    #[test]
    fn requests_are_carried_out_when_no_thread_can_start() {
        let (mem, _file, mut pool) = pool_without_threads(5);
        let signalled = crate::sys::eventfd::poll_readable(pool.shared.event.as_fd(), 2000);
        assert!(matches!(signalled, Ok(true)), "no signal: {signalled:?}");
        assert_eq!(reap_n(&mut pool, 3), [0, 1, 2]);
        reads(&mut pool, &mem, 3, 2);
        assert!(pool.threads() > 0);
        assert_eq!(reap_n(&mut pool, 2), [3, 4]);
        check_blocks(&mem, 0..5, 5);
    }

    /// A pool that could not start a thread carries out what was
    /// submitted to it before it goes (its buffers are guest memory the
    /// caller is about to release).
    #[test]
    fn a_pool_without_threads_carries_out_its_requests_before_it_goes() {
        let (mem, _file, pool) = pool_without_threads(9);
        drop(pool);
        check_blocks(&mem, 0..3, 9);
    }

    /// Guest memory and an image whose 4 KiB block `b` is filled with the
    /// byte `b * mul`.
    fn patterned(mul: u32) -> (LinuxGuestMemory, std::fs::File) {
        let file = image(1 << 20);
        let pattern: Vec<u8> = (0..1 << 20).map(|i: u32| (i / 4096 * mul) as u8).collect();
        file.write_all_at(&pattern, 0).unwrap();
        (guest(1 << 20), file)
    }

    /// Guest blocks `blocks` hold what [`patterned`]`(mul)` put in the
    /// image's blocks of the same numbers.
    fn check_blocks(mem: &LinuxGuestMemory, blocks: impl IntoIterator<Item = u64>, mul: u64) {
        for block in blocks {
            let mut b = [0u8; 4096];
            mem.read(block * 4096, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == (block * mul) as u8), "block {block}");
        }
    }

    /// Closes `pool`'s gate, and opens it when dropped: a failed assertion
    /// does not leave the pool's drop waiting for threads held at it.
    struct Closed(Arc<PoolShared>);

    impl Closed {
        fn gate(pool: &ThreadPool) -> Closed {
            pool.shared.gate.set(true);
            Closed(Arc::clone(&pool.shared))
        }
    }

    impl Drop for Closed {
        fn drop(&mut self) {
            self.0.gate.set(false);
        }
    }

    /// Reads read, from `mem` at 4 KiB blocks `first..first + n`, blocks of
    /// the file at the same offsets.
    fn reads(pool: &mut ThreadPool, mem: &LinuxGuestMemory, first: u64, n: u64) {
        for block in first..first + n {
            pool.push(block, read_4k(mem, block * 4096, block * 4096));
        }
        pool.submit();
    }

    /// Reaps `n` completions (tags), each a whole 4 KiB read or a sync.
    fn reap_n(pool: &mut ThreadPool, n: usize) -> Vec<u64> {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < n {
            assert!(std::time::Instant::now() < deadline, "completions lost");
            seen.extend(reap_now(pool));
            std::thread::yield_now();
        }
        seen.sort_unstable();
        seen
    }

    /// What one reap gives at once (tags of whole 4 KiB reads or syncs).
    fn reap_now(pool: &mut ThreadPool) -> Vec<u64> {
        let mut tags = Vec::new();
        pool.reap(|(t, r, req)| {
            let want = if matches!(req, IoRequest::Sync) {
                0
            } else {
                4096
            };
            assert_eq!(r.unwrap(), want);
            tags.push(t);
        });
        tags
    }

    /// Pushes `n` flushes (tags from `first`) and submits them: each goes
    /// to a thread of its own (a flush never waits for a busy one).
    fn syncs(pool: &mut ThreadPool, first: u64, n: u64) {
        for tag in first..first + n {
            pool.push(tag, IoRequest::Sync);
        }
        pool.submit();
    }

    /// Waits (up to 10 s) until `pool` runs `n` threads.
    fn wait_threads(pool: &ThreadPool, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.threads() != n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} threads",
                pool.threads()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Two pools sharing a budget of 4 threads: one busy alone takes all
    /// 4 (past its share of 2); the other still gets its first thread (5
    /// running), but not its second while the budget is spent. Refused
    /// under its share, it makes the first let threads go as they finish,
    /// down to its share, and then gets its second. A pool that goes
    /// gives its share back.
    #[test]
    fn pools_share_their_thread_budget() {
        let (_mem, file) = patterned(1);
        let fd = || file.as_fd().try_clone_to_owned().unwrap();
        let budget = ThreadBudget::new(4);
        let mut a = ThreadPool::with_budget(fd(), Arc::clone(&budget)).unwrap();
        let mut b = ThreadPool::with_budget(fd(), Arc::clone(&budget)).unwrap();
        assert_eq!(budget.share(), 2);
        let a_closed = Closed::gate(&a);
        let b_closed = Closed::gate(&b);
        syncs(&mut a, 0, 4);
        assert_eq!((a.threads(), budget.running()), (4, 4));
        syncs(&mut b, 10, 1);
        assert_eq!(
            (b.threads(), budget.running()),
            (1, 5),
            "a pool's first thread"
        );
        syncs(&mut b, 11, 1);
        assert_eq!(b.threads(), 1, "the budget is spent");
        assert_eq!(budget.wanting.load(Ordering::Relaxed), 1);
        // The busy pool's threads finish: two go, two stay (its share).
        drop(a_closed);
        assert_eq!(reap_n(&mut a, 4), [0, 1, 2, 3]);
        wait_threads(&a, 2);
        assert_eq!(budget.running(), 3);
        syncs(&mut b, 12, 1);
        assert_eq!(b.threads(), 2, "its share back");
        assert_eq!(budget.wanting.load(Ordering::Relaxed), 0);
        drop(b_closed);
        assert_eq!(reap_n(&mut b, 3), [10, 11, 12]);
        // With the other pool gone, one pool's share is the budget.
        drop(a);
        assert_eq!(budget.share(), 4);
        assert_eq!(budget.running(), 2);
        drop(b);
        assert_eq!(budget.running(), 0);
    }

    /// With lone requests on ([`Aio::run_lone_requests`]), a read that is
    /// the only request the pool has is carried out by the submitting
    /// thread: done at the submit (past a closed gate), no thread
    /// started, the completion fd not written. One that comes after it
    /// with no wait in between ([`note_wait`]) goes to a thread, and so
    /// do one while another is in the pool, two at once and a flush;
    /// after a wait, a lone read is carried out here again. With them
    /// off, a lone read goes to a thread.
    #[test]
    fn a_lone_request_runs_in_the_submitting_thread() {
        let (mem, file) = patterned(5);
        let fd = || file.as_fd().try_clone_to_owned().unwrap();
        let mut pool = ThreadPool::new(fd(), 4).unwrap();
        let closed = Closed::gate(&pool);
        note_wait();
        reads(&mut pool, &mem, 0, 1);
        assert_eq!(pool.threads(), 1, "off: a thread takes it");
        assert_eq!(reap_now(&mut pool), []);
        drop(closed);
        assert_eq!(reap_n(&mut pool, 1), [0]);
        drop(pool);

        let mut aio = Aio::new(AioMode::Threads, file.as_fd(), 8, 4).unwrap();
        aio.run_lone_requests();
        let Aio::Threads(pool) = &mut aio else {
            unreachable!()
        };
        let _closed = Closed::gate(pool);
        note_wait();
        reads(pool, &mem, 1, 1);
        assert_eq!(reap_now(pool), [1], "a lone read, done at the submit");
        assert_eq!(pool.threads(), 0);
        assert!(!pool.shared.event.is_signalled().unwrap());
        // No wait since: the driver had another in flight.
        reads(pool, &mem, 2, 1);
        assert_eq!(pool.threads(), 1);
        // One while another is in the pool.
        note_wait();
        reads(pool, &mem, 3, 1);
        assert_eq!(reap_now(pool), []);
        pool.shared.gate.let_through(2);
        assert_eq!(reap_n(pool, 2), [2, 3]);
        // Two at once, and a flush.
        note_wait();
        reads(pool, &mem, 4, 2);
        assert_eq!(reap_now(pool), []);
        pool.shared.gate.let_through(2);
        assert_eq!(reap_n(pool, 2), [4, 5]);
        note_wait();
        pool.push(100, IoRequest::Sync);
        pool.submit();
        assert_eq!(reap_now(pool), []);
        pool.shared.gate.let_through(1);
        assert_eq!(reap_n(pool, 1), [100]);
        // After a wait, alone again.
        note_wait();
        reads(pool, &mem, 6, 1);
        assert_eq!(reap_now(pool), [6]);
        assert_eq!(pool.in_flight, 0);
        check_blocks(&mem, 0..7, 5);
    }

    /// A read or a write is left in the queue, for a thread that finishes
    /// its own to take, while two or more per waiting job are at the file
    /// (waking a parked thread costs more than the wait); a flush never
    /// waits, and is not counted as a thread that will soon finish.
    #[test]
    fn a_transfer_waits_for_a_thread_at_work_rather_than_wake_one() {
        let (mem, file) = patterned(3);
        let mut pool = ThreadPool::new(file.as_fd().try_clone_to_owned().unwrap(), 64).unwrap();
        let _closed = Closed::gate(&pool);
        // Nobody parked: two threads start, the third read waits for
        // them, the fourth starts a thread (one waiting for three at
        // work is too many).
        reads(&mut pool, &mem, 0, 4);
        assert_eq!((pool.threads(), pool.waiting()), (3, 1));
        // A flush starts a thread of its own.
        pool.push(100, IoRequest::Sync);
        pool.submit();
        assert_eq!((pool.threads(), pool.waiting()), (4, 1));
        pool.shared.gate.set(false);
        assert_eq!(reap_n(&mut pool, 5), [0, 1, 2, 3, 100]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.parked() < 4 {
            assert!(std::time::Instant::now() < deadline, "threads do not park");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Parked threads: the first two reads wake two, the third waits.
        pool.shared.gate.set(true);
        reads(&mut pool, &mem, 10, 3);
        assert_eq!((pool.parked(), pool.waiting()), (2, 1));
        // A flush wakes one, and does not count as a thread at work: the
        // next read wakes the last (two at work, one already waiting).
        pool.push(101, IoRequest::Sync);
        pool.submit();
        assert_eq!((pool.parked(), pool.waiting()), (1, 1));
        reads(&mut pool, &mem, 13, 1);
        assert_eq!((pool.threads(), pool.parked(), pool.waiting()), (4, 0, 1));
        pool.shared.gate.set(false);
        assert_eq!(reap_n(&mut pool, 5), [10, 11, 12, 13, 101]);
        check_blocks(&mem, [0, 1, 2, 3, 10, 11, 12, 13], 3);
    }

    /// While as many jobs wait in the queue as [`COALESCE`], completions
    /// are gathered: the worker is signalled once for that many, or for
    /// fewer once the oldest waited `coalesce_for`, or once fewer jobs
    /// wait; a reap before then takes none; every completion is reaped
    /// once.
    #[test]
    fn completions_are_gathered_while_jobs_wait() {
        let (mem, file) = patterned(7);
        let wait = Duration::from_millis(300);
        let fd = file.as_fd().try_clone_to_owned().unwrap();
        let event = EventFd::new(true).unwrap();
        let mut pool = ThreadPool::with_timing(fd, 2, IDLE_EXIT, wait, event).unwrap();
        let _closed = Closed::gate(&pool);
        let signalled = |pool: &ThreadPool| match pool.shared.event.read() {
            Ok(n) => n > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("{e}"),
        };
        let until_waiting = |pool: &ThreadPool, n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while pool.waiting() != n {
                assert!(std::time::Instant::now() < deadline, "jobs not taken");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        // Two threads (the maximum) and 38 jobs waiting.
        reads(&mut pool, &mem, 0, 40);
        assert_eq!((pool.threads(), pool.waiting()), (2, 38));
        let mut seen = Vec::new();
        let reap = |pool: &mut ThreadPool, seen: &mut Vec<u64>| {
            let mut n = 0;
            pool.reap(|(t, r, _)| {
                assert_eq!(r.unwrap(), 4096);
                seen.push(t);
                n += 1;
            });
            n
        };
        // Two complete: not signalled for yet.
        pool.shared.gate.let_through(2);
        until_waiting(&pool, 36);
        assert!(!signalled(&pool), "signalled for 2 completions");
        // Nor are they handed out before then (a worker woken by a kick).
        assert_eq!(reap(&mut pool, &mut seen), 0, "reaped before they were due");
        // The oldest has waited long enough: the next one signals.
        std::thread::sleep(wait);
        pool.shared.gate.let_through(1);
        until_waiting(&pool, 35);
        assert!(signalled(&pool), "the oldest waited {wait:?}");
        assert_eq!(reap(&mut pool, &mut seen), 3);
        // Sixteen complete at once: signalled.
        pool.shared.gate.let_through(COALESCE);
        until_waiting(&pool, 35 - COALESCE);
        assert!(signalled(&pool));
        assert_eq!(reap(&mut pool, &mut seen), COALESCE);
        // Fewer waiting, fewer gathered: one per two waiting. Six more
        // complete with 19 down to 14 waiting (each thread looks before it
        // takes the next job): not signalled for (six gathered, fewer
        // than one per two of the 14 waiting); the seventh, with 13
        // waiting, is.
        pool.shared.gate.let_through(6);
        until_waiting(&pool, 13);
        assert!(!signalled(&pool), "signalled for 6 with 14 waiting");
        pool.shared.gate.let_through(1);
        until_waiting(&pool, 12);
        assert!(signalled(&pool), "not signalled for 7 with 13 waiting");
        assert_eq!(reap(&mut pool, &mut seen), 7);
        pool.shared.gate.set(false);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < 40 {
            assert!(std::time::Instant::now() < deadline, "completions lost");
            reap(&mut pool, &mut seen);
            std::thread::yield_now();
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
        check_blocks(&mem, 0..40, 7);
        // None waiting: a completion is signalled at once, not after
        // the wait for others.
        let _ = signalled(&pool);
        reads(&mut pool, &mem, 40, 1);
        let start = std::time::Instant::now();
        while !signalled(&pool) {
            assert!(start.elapsed() < wait / 2, "a lone completion waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(reap(&mut pool, &mut seen), 1);
    }

    /// With many jobs waiting, more completions are gathered before the
    /// worker is signalled: one per two waiting, up to twice `COALESCE`.
    #[test]
    fn more_completions_are_gathered_while_more_jobs_wait() {
        let (mem, file) = patterned(5);
        let wait = Duration::from_secs(2);
        let fd = file.as_fd().try_clone_to_owned().unwrap();
        let event = EventFd::new(true).unwrap();
        let mut pool = ThreadPool::with_timing(fd, 2, IDLE_EXIT, wait, event).unwrap();
        let _closed = Closed::gate(&pool);
        let until_waiting = |pool: &ThreadPool, n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while pool.waiting() != n {
                assert!(std::time::Instant::now() < deadline, "jobs not taken");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let signalled = |pool: &ThreadPool| match pool.shared.event.read() {
            Ok(n) => n > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("{e}"),
        };
        // Two threads (the maximum) and 78 jobs waiting.
        reads(&mut pool, &mem, 0, 80);
        assert_eq!((pool.threads(), pool.waiting()), (2, 78));
        // Twenty complete with 78 down to 59 waiting: each wants 29 or
        // more gathered.
        pool.shared.gate.let_through(20);
        until_waiting(&pool, 58);
        let early = signalled(&pool);
        // Thirty-two (the most ever gathered) are signalled for.
        pool.shared.gate.let_through(12);
        until_waiting(&pool, 46);
        let due = signalled(&pool);
        pool.shared.gate.set(false);
        let seen = reap_n(&mut pool, 80);
        assert!(!early, "signalled for 20 with 59 or more waiting");
        assert!(due, "not signalled for 32");
        assert_eq!(seen, (0..80).collect::<Vec<_>>());
        check_blocks(&mem, 0..80, 5);
    }

    /// Waves of requests, larger and smaller than the pool: at the
    /// maximum the rest queue and the threads that finish take them; a
    /// wave no larger than the parked threads goes to them (no thread is
    /// started); every request completes once, with its own data.
    #[test]
    fn the_thread_pool_hands_requests_to_parked_threads() {
        let (mem, file) = patterned(1);
        let max = 4;
        let mut pool = ThreadPool::new(file.as_fd().try_clone_to_owned().unwrap(), max).unwrap();
        let mut tag = 0u64;
        for wave in [9usize, 3, 1, 4, 17, 2] {
            let parked = pool.threads();
            for _ in 0..wave {
                let block = tag % 256;
                pool.push(tag, read_4k(&mem, block * 4096, block * 4096));
                tag += 1;
            }
            pool.submit();
            let threads = pool.threads();
            assert!(threads <= max, "wave {wave}: {threads} threads");
            if wave <= parked {
                assert_eq!(threads, parked, "wave {wave}: a thread started");
            }
            let mut seen = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while seen.len() < wave {
                assert!(std::time::Instant::now() < deadline, "completions lost");
                pool.reap(|(t, r, _)| {
                    assert_eq!(r.unwrap(), 4096);
                    seen.push(t);
                });
                std::thread::yield_now();
            }
            seen.sort_unstable();
            let first = tag - wave as u64;
            assert_eq!(seen, (first..tag).collect::<Vec<_>>(), "wave {wave}");
            for t in first..tag {
                let mut b = [0u8; 4096];
                mem.read((t % 256) * 4096, &mut b).unwrap();
                assert!(b.iter().all(|&x| x == (t % 256) as u8), "tag {t}");
            }
            // Let the threads park.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while pool.parked() < pool.threads() {
                assert!(std::time::Instant::now() < deadline, "threads not parked");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn drop_waits_for_requests_in_flight() {
        for mode in [AioMode::IoUring, AioMode::Threads] {
            let mem = guest(1 << 20);
            let file = image(1 << 20);
            file.write_all_at(&[0x5a; 1 << 20], 0).unwrap();
            let mut aio = Aio::new(mode, file.as_fd(), 4, 2).unwrap();
            for i in 0..32u64 {
                let mut bufs = Vec::new();
                mem.io_bufs(i * 32768, 32768, true, &mut bufs).unwrap();
                aio.push(
                    i,
                    IoRequest::Read {
                        offset: i * 32768,
                        bufs,
                    },
                )
                .unwrap();
            }
            aio.submit();
            drop(aio);
            // Every read finished before the engine went away.
            let mut back = vec![0; 1 << 20];
            mem.read(0, &mut back).unwrap();
            assert!(back.iter().all(|&b| b == 0x5a), "{mode:?}");
        }
    }
}

//! Asynchronous file I/O for a ring's worker: requests go in as they are
//! popped, completions come out in any order, and an eventfd wakes the
//! worker when one arrives ([`Aio::completion_fd`], see
//! [`SharedDevice::completion_fd`](crate::backend::SharedDevice::completion_fd)).
//!
//! Two engines behind one interface: an io_uring ([`Uring`]) when the
//! kernel allows it, else a small pool of threads doing `preadv`/`pwritev`
//! ([`ThreadPool`]). Both move bytes straight between the file and guest
//! memory ([`IoBuf`](crate::sys::mmap::IoBuf)s), without a bounce copy.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use log::{info, warn};

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

/// A completed request: its tag, the bytes moved or the error, and the
/// request itself (its buffers, to resubmit a remainder or drop).
pub type Done = (u64, io::Result<usize>, IoRequest);

/// The engine of one ring's worker.
#[derive(Debug)]
pub enum Aio {
    /// An io_uring (boxed: the ring's state is large).
    Uring(Box<Uring>),
    /// A thread pool.
    Threads(ThreadPool),
}

impl Aio {
    /// An engine for `file` as `mode` asks: an io_uring of `depth`
    /// submission slots, or, when that fails or `mode` says so, a pool of
    /// `threads` threads (at least one).
    pub fn new(mode: AioMode, file: BorrowedFd<'_>, depth: u32, threads: usize) -> io::Result<Aio> {
        if mode == AioMode::IoUring {
            match Uring::new(depth, file) {
                Ok(u) => return Ok(Aio::Uring(Box::new(u))),
                Err(e) => {
                    warn!("io_uring unavailable ({e}); using a pool of {threads} I/O threads")
                }
            }
        }
        let pool = ThreadPool::new(file.try_clone_to_owned()?, threads)?;
        Ok(Aio::Threads(pool))
    }

    /// The engine's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Aio::Uring(_) => "io_uring",
            Aio::Threads(_) => "threads",
        }
    }

    /// Queues `request` under `tag` (handed to the kernel or the threads
    /// at the next [`Aio::submit`] at the latest); a refused request is
    /// given back with the error.
    pub fn push(&mut self, tag: u64, request: IoRequest) -> Result<(), (IoRequest, io::Error)> {
        match self {
            Aio::Uring(u) => u.push(tag, request),
            Aio::Threads(p) => {
                p.push(tag, request);
                Ok(())
            }
        }
    }

    /// Starts what [`Aio::push`] queued.
    pub fn submit(&mut self) -> io::Result<()> {
        match self {
            Aio::Uring(u) => u.submit(),
            Aio::Threads(p) => {
                p.submit();
                Ok(())
            }
        }
    }

    /// Reports each completed request, in completion order. Reset the
    /// [`completion_fd`](Aio::completion_fd) (read it) before, not after,
    /// so no completion goes unsignalled.
    pub fn reap(&mut self, mut done: impl FnMut(u64, io::Result<usize>, IoRequest)) {
        match self {
            Aio::Uring(u) => u.reap(done),
            Aio::Threads(p) => p.reap(|(t, r, q)| done(t, r, q)),
        }
    }

    /// Requests pushed and not reaped.
    pub fn in_flight(&self) -> usize {
        match self {
            Aio::Uring(u) => u.in_flight(),
            Aio::Threads(p) => p.in_flight,
        }
    }

    /// Readable when a completion is waiting to be reaped.
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        match self {
            Aio::Uring(u) => u.completion_fd(),
            Aio::Threads(p) => p.shared.event.as_fd(),
        }
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<(u64, IoRequest)>,
    stop: bool,
}

struct PoolShared {
    file: OwnedFd,
    queue: Mutex<Queue>,
    more: Condvar,
    done: Mutex<Vec<Done>>,
    event: EventFd,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Threads doing synchronous I/O on one file: the fallback where io_uring
/// is not available. Dropping the pool lets the threads finish what was
/// submitted, then joins them.
pub struct ThreadPool {
    shared: Arc<PoolShared>,
    threads: Vec<JoinHandle<()>>,
    queued: Vec<(u64, IoRequest)>,
    in_flight: usize,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads.len())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl ThreadPool {
    /// `threads` threads (at least one) doing I/O on `file`.
    pub fn new(file: OwnedFd, threads: usize) -> io::Result<ThreadPool> {
        let shared = Arc::new(PoolShared {
            file,
            queue: Mutex::new(Queue::default()),
            more: Condvar::new(),
            done: Mutex::new(Vec::new()),
            event: EventFd::new(true)?,
        });
        let mut pool = ThreadPool {
            shared,
            threads: Vec::new(),
            queued: Vec::new(),
            in_flight: 0,
        };
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&pool.shared);
            let t = std::thread::Builder::new()
                .name(format!("vhu-io-{i}"))
                .spawn(move || run(&shared))?;
            pool.threads.push(t);
        }
        info!("{} I/O threads started", pool.threads.len());
        Ok(pool)
    }

    fn push(&mut self, tag: u64, request: IoRequest) {
        self.queued.push((tag, request));
        self.in_flight += 1;
    }

    fn submit(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let n = self.queued.len();
        lock(&self.shared.queue).jobs.extend(self.queued.drain(..));
        if n == 1 {
            self.shared.more.notify_one();
        } else {
            self.shared.more.notify_all();
        }
    }

    fn reap(&mut self, mut done: impl FnMut(Done)) {
        if self.in_flight == 0 {
            return;
        }
        let finished = std::mem::take(&mut *lock(&self.shared.done));
        for d in finished {
            self.in_flight -= 1;
            done(d);
        }
    }
}

fn run(shared: &PoolShared) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break Some(j);
                }
                if q.stop {
                    break None;
                }
                q = shared.more.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let Some((tag, request)) = job else { return };
        let result = perform(shared.file.as_fd(), &request);
        lock(&shared.done).push((tag, result, request));
        let _ = shared.event.write(1);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.submit();
        lock(&self.shared.queue).stop = true;
        self.shared.more.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
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

    fn wait_all(aio: &mut Aio, n: usize) -> Vec<(u64, usize)> {
        let mut got = Vec::new();
        aio.submit().unwrap();
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
        // A read into a buffer not marked writable never reaches the
        // kernel.
        let mut bufs = Vec::new();
        mem.io_bufs(0, 512, false, &mut bufs).unwrap();
        if let Aio::Uring(_) = aio {
            let (_, e) = aio
                .push(1, IoRequest::Read { offset: 0, bufs })
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        } else {
            aio.push(1, IoRequest::Read { offset: 0, bufs }).unwrap();
            aio.submit().unwrap();
            let mut errs = 0;
            while errs == 0 {
                aio.reap(|_, r, _| errs += usize::from(r.is_err()));
            }
        }
        assert_eq!(aio.in_flight(), 0);
    }

    #[test]
    fn io_uring_round_trip() {
        round_trip(AioMode::IoUring);
    }

    #[test]
    fn thread_pool_round_trip() {
        round_trip(AioMode::Threads);
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
            aio.submit().unwrap();
            drop(aio);
            // Every read finished before the engine went away.
            let mut back = vec![0; 1 << 20];
            mem.read(0, &mut back).unwrap();
            assert!(back.iter().all(|&b| b == 0x5a), "{mode:?}");
        }
    }
}

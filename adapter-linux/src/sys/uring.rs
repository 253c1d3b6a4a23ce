//! File I/O straight between a file and guest memory: asynchronously
//! through an io_uring ([`Uring`]), or synchronously ([`perform`], what a
//! thread pool runs).
//!
//! A request ([`IoRequest`]) owns what the kernel touches while it runs:
//! its [`IoBuf`]s (which keep their mappings alive) and, in the ring, the
//! `iovec` array built from them. The ring keeps both until the request's
//! completion has been reaped, and [`Uring`]'s drop waits for every
//! request still in the kernel, so no buffer is freed or unmapped under
//! an operation. The file is registered with the ring (a fixed file), so
//! closing the caller's descriptor cannot retarget an operation either.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, types, IoUring};

use super::eventfd::EventFd;
use super::mmap::IoBuf;
use super::{cvt, retry};

/// Most buffers of one read or write (`IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

/// Buffers of a [`perform`]ed read or write whose iovecs stay on the
/// stack.
const INLINE_IOVECS: usize = 8;

/// `io_uring_enter`'s flag to collect completions (the kernel's uapi
/// value).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// One file operation.
#[derive(Debug)]
pub enum IoRequest {
    /// `preadv` at byte `offset` into `bufs` (all writable).
    Read {
        /// File offset in bytes.
        offset: u64,
        /// Where the bytes go, in order.
        bufs: Vec<IoBuf>,
    },
    /// `pwritev` of `bufs` at byte `offset`.
    Write {
        /// File offset in bytes.
        offset: u64,
        /// Where the bytes come from, in order.
        bufs: Vec<IoBuf>,
    },
    /// `fdatasync`.
    Sync,
    /// `fallocate(mode, offset, len)`.
    Fallocate {
        /// `FALLOC_FL_*` bits.
        mode: i32,
        /// File offset in bytes.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

impl IoRequest {
    /// Bytes a read or write moves (0 for the others).
    pub fn len(&self) -> usize {
        match self {
            IoRequest::Read { bufs, .. } | IoRequest::Write { bufs, .. } => {
                bufs.iter().map(IoBuf::len).sum()
            }
            _ => 0,
        }
    }

    /// True if a read or write moves no bytes, and for the others.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// After a short transfer of `n` bytes: the read or write of what is
    /// left (the offset moved on by `n`, the first `n` bytes of the
    /// buffers dropped). Returns whether bytes are left (false for the
    /// other requests).
    pub fn advance(&mut self, n: usize) -> bool {
        match self {
            IoRequest::Read { offset, bufs } | IoRequest::Write { offset, bufs } => {
                *offset = offset.saturating_add(n as u64);
                let mut left = n;
                let mut whole = 0;
                for b in bufs.iter_mut() {
                    if left < b.len() {
                        b.advance(left);
                        break;
                    }
                    left -= b.len();
                    whole += 1;
                }
                bufs.drain(..whole);
                !bufs.is_empty()
            }
            _ => false,
        }
    }

    /// Refuses a request the kernel must not be given: a read into a
    /// buffer that is not writable, or more than [`MAX_IOVECS`] buffers.
    fn check(&self) -> io::Result<()> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        match self {
            IoRequest::Read { bufs, .. } if bufs.iter().any(|b| !b.writable()) => {
                Err(invalid("read into a buffer that is not writable"))
            }
            IoRequest::Read { bufs, .. } | IoRequest::Write { bufs, .. }
                if bufs.len() > MAX_IOVECS =>
            {
                Err(invalid("too many buffers"))
            }
            _ => Ok(()),
        }
    }
}

/// `iovec`s pointing into [`IoBuf`]s that the same in-flight entry owns.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers are plain addresses of shared mappings kept alive
// by the entry's `IoBuf`s; nothing about them is tied to a thread.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Fills the array (emptied first) with the iovecs of `bufs`.
    fn fill(&mut self, bufs: &[IoBuf]) {
        self.0.clear();
        self.0.extend(bufs.iter().map(iovec));
    }
}

fn iovec(b: &IoBuf) -> libc::iovec {
    libc::iovec {
        iov_base: b.addr() as *mut libc::c_void,
        iov_len: b.len(),
    }
}

/// The one buffer of a read or write that has one, of a length one
/// non-vectored operation takes.
fn single(bufs: &[IoBuf]) -> Option<&IoBuf> {
    match bufs {
        [b] if u32::try_from(b.len()).is_ok() => Some(b),
        _ => None,
    }
}

struct InFlight {
    tag: u64,
    request: IoRequest,
    /// Read by the kernel when it issues the operation; kept until the
    /// completion. Empty (no allocation) for a request of one buffer,
    /// which the entry points at directly.
    iovecs: IoVecs,
}

/// An io_uring over one file, signalling completions on an eventfd.
pub struct Uring {
    ring: IoUring,
    event: EventFd,
    /// Entries in the kernel (or queued for it), by user data.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    cqes: Vec<(u64, i32)>,
    /// Emptied iovec arrays of reaped requests, reused (no allocation per
    /// request of several buffers).
    spare: Vec<IoVecs>,
    /// Slots of the entries queued for the kernel and not yet taken by
    /// it, in queue order.
    unsubmitted: Vec<usize>,
    /// Requests accepted while the submission queue was full and the
    /// kernel too busy to take it, in order: they follow the queued
    /// entries into the queue as [`Uring::submit`] makes room.
    backlog: VecDeque<(u64, IoRequest)>,
    /// The error `io_uring_enter` failed with other than a busy kernel's
    /// (see [`Uring::submit`]): no more submissions enter the ring.
    broken: Option<i32>,
    /// Requests that never reached the kernel because the ring broke, in
    /// order: they end with its error at the next [`Uring::reap`].
    failed: Vec<(u64, IoRequest)>,
    /// The error the next `io_uring_enter` of `submit` or of a drop's wait
    /// fails with instead of entering (tests of a busy or broken kernel).
    #[cfg(test)]
    pub(crate) refuse_enter: Option<i32>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// Sends a no-op through `ring` and waits for it: a policy may allow
/// `io_uring_setup` and refuse `io_uring_enter` (then every request would
/// wait forever in the submission queue).
fn probe(ring: &mut IoUring) -> io::Result<()> {
    let nop = opcode::Nop::new().build().user_data(u64::MAX);
    // SAFETY: a no-op points at no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
    retry(|| ring.submit_and_wait(1))?;
    match ring.completion().next() {
        Some(c) if c.result() >= 0 => Ok(()),
        Some(c) => Err(io::Error::from_raw_os_error(-c.result())),
        None => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
    }
}

impl Uring {
    /// A ring of `entries` submission slots (more requests than that may
    /// be in flight) for `file`, which is registered with it, and an
    /// eventfd signalled at each completion ([`Uring::completion_fd`]).
    /// Fails where io_uring is not available (an old kernel, a seccomp
    /// policy, `kernel.io_uring_disabled`), also where a ring can be set
    /// up but not used: a no-op goes through it first.
    pub fn new(entries: u32, file: BorrowedFd<'_>) -> io::Result<Uring> {
        let mut ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(8).max(64))
            .build(entries)?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        probe(&mut ring)?;
        let event = EventFd::new(true)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Uring {
            ring,
            event,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            cqes: Vec::new(),
            spare: Vec::new(),
            unsubmitted: Vec::new(),
            backlog: VecDeque::new(),
            broken: None,
            failed: Vec::new(),
            #[cfg(test)]
            refuse_enter: None,
        })
    }

    /// The eventfd written at each completion (non-blocking): sleep on it
    /// while requests are in flight, then [`Uring::reap`].
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.event.as_fd()
    }

    /// Requests pushed and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether `io_uring_enter` failed for good (see [`Uring::submit`]).
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Takes the requests that never reached the kernel because the ring
    /// broke (see [`Uring::submit`]), to be carried out otherwise: they
    /// are no longer in flight here.
    pub fn take_failed(&mut self) -> Vec<(u64, IoRequest)> {
        self.in_flight -= self.failed.len();
        std::mem::take(&mut self.failed)
    }

    /// Queues `request`, identified by `tag` in [`Uring::reap`]; the kernel
    /// sees it at the next [`Uring::submit`] (or now, if the submission
    /// queue was full). Where the queue is full and the kernel too busy to
    /// take it, the request waits behind the others in the ring for a
    /// later submit, which the completion eventfd calls for (a busy
    /// kernel is no reason to fail it). A request that must not reach the
    /// kernel, or one pushed once the ring broke, is given back with the
    /// error.
    pub fn push(&mut self, tag: u64, request: IoRequest) -> Result<(), (IoRequest, io::Error)> {
        if let Some(errno) = self.broken {
            return Err((request, io::Error::from_raw_os_error(errno)));
        }
        if let Err(e) = request.check() {
            return Err((request, e));
        }
        // Behind requests already waiting, so that the kernel sees them
        // in the order they came.
        if self.backlog.is_empty() {
            if self.ring.submission().is_full() {
                if let Err(e) = self.submit() {
                    return Err((request, e));
                }
            }
            match self.queue(tag, request) {
                Ok(()) => {
                    self.in_flight += 1;
                    return Ok(());
                }
                // Still full: the kernel was busy, and `submit` signalled
                // the eventfd for the retry.
                Err(back) => self.backlog.push_back(back),
            }
        } else {
            self.backlog.push_back((tag, request));
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Puts `request` (checked) in the submission queue, or gives it back
    /// if the queue is full. Not counted in `in_flight` here: a request
    /// is counted once, when it is accepted.
    fn queue(&mut self, tag: u64, request: IoRequest) -> Result<(), (u64, IoRequest)> {
        if self.ring.submission().is_full() {
            return Err((tag, request));
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let mut iovecs = IoVecs(Vec::new());
        if let IoRequest::Read { bufs, .. } | IoRequest::Write { bufs, .. } = &request {
            if single(bufs).is_none() {
                iovecs = self.spare.pop().unwrap_or(IoVecs(Vec::new()));
                iovecs.fill(bufs);
            }
        }
        let file = types::Fixed(0);
        let n = iovecs.0.len() as u32; // at most MAX_IOVECS (checked)
        let entry = match &request {
            IoRequest::Read { offset, bufs } => match single(bufs) {
                Some(b) => opcode::Read::new(file, b.addr() as *mut u8, b.len() as u32)
                    .offset(*offset)
                    .build(),
                None => opcode::Readv::new(file, iovecs.0.as_ptr(), n)
                    .offset(*offset)
                    .build(),
            },
            IoRequest::Write { offset, bufs } => match single(bufs) {
                Some(b) => opcode::Write::new(file, b.addr() as *const u8, b.len() as u32)
                    .offset(*offset)
                    .build(),
                None => opcode::Writev::new(file, iovecs.0.as_ptr(), n)
                    .offset(*offset)
                    .build(),
            },
            IoRequest::Sync => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoRequest::Fallocate { mode, offset, len } => opcode::Fallocate::new(file, *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        }
        .user_data(slot as u64);
        // SAFETY: the entry points at the one `IoBuf` of `request`, or at
        // `iovecs` (a heap array that moving does not move), whose
        // addresses are the `IoBuf`s of `request` (inside live mappings,
        // writable for a read: `check`); both are stored in `slots` below and only
        // released in `reap`, after the kernel posted the entry's
        // completion, or never (drop waits for every entry, or leaks).
        // The file is the ring's registered file 0.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(slot);
            if iovecs.0.capacity() != 0 {
                self.spare.push(iovecs);
            }
            return Err((tag, request));
        }
        self.slots[slot] = Some(InFlight {
            tag,
            request,
            iovecs,
        });
        self.unsubmitted.push(slot);
        Ok(())
    }

    /// Moves waiting requests into the submission queue, in order, while
    /// it has room.
    fn fill(&mut self) {
        while let Some((tag, request)) = self.backlog.pop_front() {
            if let Err(back) = self.queue(tag, request) {
                self.backlog.push_front(back);
                return;
            }
        }
    }

    /// Hands the queued requests to the kernel, and the waiting ones
    /// behind them as it takes the queue (a system call per queueful). A
    /// busy kernel (out of resources, completion queue overflowing, a
    /// signal) leaves them queued or waiting for the next call, and the
    /// completion eventfd is signalled so the caller comes back to make
    /// it: with nothing else in flight no completion would, and the
    /// requests would wait forever. So it is whenever this returns with
    /// requests the kernel has not taken.
    ///
    /// Any other error breaks the ring, and is returned (once): the
    /// requests it did not take, queued or waiting, end with that error
    /// at the next [`Uring::reap`] (the eventfd is signalled for them),
    /// later ones are refused by [`Uring::push`], and the ring is never
    /// asked to submit again (it would take the abandoned entries, whose
    /// buffers are gone).
    /// Requests the kernel took complete as before.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.broken.is_some() {
            return Ok(());
        }
        loop {
            self.fill();
            if self.ring.submission().is_empty() {
                return Ok(());
            }
            let submitted = match self.refused() {
                Some(e) => Err(e),
                None => self.ring.submit(),
            };
            match submitted {
                Ok(n) => {
                    // The kernel takes entries from the head of the queue.
                    let n = n.min(self.unsubmitted.len());
                    self.unsubmitted.drain(..n);
                    if n == 0 {
                        // Nothing taken and no error: come back rather
                        // than spin here.
                        let _ = self.event.write(1);
                        return Ok(());
                    }
                    // Room for waiting requests, or entries the kernel
                    // left: another round.
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) =>
                {
                    let _ = self.event.write(1);
                    return Ok(());
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    self.broken = Some(errno);
                    // Queued first, then waiting: the order they came in.
                    for slot in self.unsubmitted.drain(..) {
                        if let Some(entry) = self.slots.get_mut(slot).and_then(Option::take) {
                            self.failed.push((entry.tag, entry.request));
                        }
                    }
                    self.failed.extend(self.backlog.drain(..));
                    let _ = self.event.write(1);
                    return Err(e);
                }
            }
        }
    }

    /// Calls `done(tag, result, request)` for each completed request: the
    /// bytes moved, or the error. The eventfd is the caller's to reset
    /// (read) before calling, so that a completion posted meanwhile
    /// signals it again.
    pub fn reap(&mut self, mut done: impl FnMut(u64, io::Result<usize>, IoRequest)) {
        if self.in_flight == 0 {
            return;
        }
        let errno = self.broken.unwrap_or(libc::EIO);
        for (tag, request) in std::mem::take(&mut self.failed) {
            self.in_flight -= 1;
            done(tag, Err(io::Error::from_raw_os_error(errno)), request);
        }
        self.cqes.clear();
        loop {
            self.cqes
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            // Completions that found the queue full (more requests in
            // flight than its entries) are kept aside by the kernel and
            // moved in only when the ring is entered: with nothing more
            // to submit, nothing else would enter it, and they would
            // never be reaped (nor signalled again).
            if !self.ring.submission().cq_overflow() {
                break;
            }
            // It only moves the kept completions into the queue, which is
            // empty now.
            let flushed = retry(|| self.get_events(0));
            if let Err(e) = flushed {
                // A busy kernel: the caller is called back to reap again
                // (as `submit` does for what it could not submit).
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) {
                    let _ = self.event.write(1);
                }
                break;
            }
        }
        for i in 0..self.cqes.len() {
            let (user, res) = self.cqes[i];
            let Some(entry) = usize::try_from(user)
                .ok()
                .and_then(|s| self.slots.get_mut(s))
                .and_then(Option::take)
            else {
                continue;
            };
            self.free.push(user as usize);
            self.in_flight -= 1;
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            let InFlight {
                tag,
                request,
                mut iovecs,
            } = entry;
            if iovecs.0.capacity() != 0 {
                iovecs.0.clear();
                self.spare.push(iovecs);
            }
            done(tag, result, request);
        }
    }

    /// Enters the ring to collect completions, waiting for `min` of them,
    /// without submitting: safe on a broken ring too, whose abandoned
    /// entries must never reach the kernel.
    fn get_events(&mut self, min: u32) -> io::Result<usize> {
        // SAFETY: an enter that submits nothing takes no submission entry
        // (so not the abandoned ones of a broken ring either, whose
        // buffers are gone) and passes no argument.
        unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(0, min, IORING_ENTER_GETEVENTS, None)
        }
    }

    /// The error a test set for the next `io_uring_enter` to fail with
    /// instead of entering (`Uring::refuse_enter`, a field of test
    /// builds); never outside tests.
    fn refused(&mut self) -> Option<io::Error> {
        #[cfg(test)]
        return self.refuse_enter.take().map(io::Error::from_raw_os_error);
        #[cfg(not(test))]
        None
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Never submitted: their buffers can go (and the wait below is
        // for the kernel's requests only).
        self.in_flight -= self.failed.len() + self.backlog.len();
        self.failed.clear();
        self.backlog.clear();
        // The kernel may still read or write the buffers of requests in
        // flight: wait for them before the buffers go. A busy kernel is
        // waited out for a while (reaping moves completions kept aside
        // from a full completion queue, which is what refuses an enter
        // with EBUSY).
        let mut busy = 0u32;
        while self.in_flight > 0 {
            let waited = match self.refused() {
                Some(e) => Err(e),
                // Not the abandoned entries of a broken ring.
                None if self.broken.is_some() => self.get_events(1),
                None => self.ring.submit_and_wait(1),
            };
            match waited {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                        && busy < DROP_BUSY_TRIES =>
                {
                    busy += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(_) => {
                    // Cannot wait: keep the buffers (and their mappings)
                    // for good rather than free them under the kernel.
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
            self.reap(|_, _, _| {});
        }
    }
}

/// How many times (a millisecond apart) a dropped ring waits out a busy
/// kernel before it keeps its requests' buffers for good instead.
const DROP_BUSY_TRIES: u32 = 1000;

/// Carries out `request` on `fd` now, in the calling thread, and returns
/// the bytes moved (what a thread pool runs where io_uring is not
/// available). Retries on `EINTR`; a short transfer is returned as such.
pub fn perform(fd: BorrowedFd<'_>, request: &IoRequest) -> io::Result<usize> {
    perform_with(fd, request, 0)
}

/// [`perform`] for a read that only copies what the page cache holds
/// (`preadv2` with `RWF_NOWAIT`): fails with `WouldBlock` where it would
/// wait for the disk (nothing of the start is cached), returns a short
/// read where only the start is cached, and fails with `Unsupported` (or
/// `EOPNOTSUPP`) where the kernel or the file cannot. Anything other than
/// a read is refused (`InvalidInput`).
pub fn read_cached(fd: BorrowedFd<'_>, request: &IoRequest) -> io::Result<usize> {
    if !matches!(request, IoRequest::Read { .. }) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    perform_with(fd, request, libc::RWF_NOWAIT)
}

fn perform_with(fd: BorrowedFd<'_>, request: &IoRequest, flags: libc::c_int) -> io::Result<usize> {
    request.check()?;
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    match request {
        IoRequest::Read { offset, bufs } | IoRequest::Write { offset, bufs } => {
            let off = libc::off_t::try_from(*offset).map_err(|_| einval())?;
            let read = matches!(request, IoRequest::Read { .. });
            // The iovecs on the stack when they fit (most requests have a
            // buffer or two), else on the heap.
            let mut inline = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; INLINE_IOVECS];
            let heap: Vec<libc::iovec>;
            let iovecs: &[libc::iovec] = if bufs.len() <= INLINE_IOVECS {
                for (v, b) in inline.iter_mut().zip(bufs) {
                    *v = iovec(b);
                }
                &inline[..bufs.len()]
            } else {
                heap = bufs.iter().map(iovec).collect();
                &heap
            };
            let n = iovecs.len() as libc::c_int; // at most MAX_IOVECS
            let moved = retry(|| {
                // SAFETY: the iovecs point into mappings kept alive by
                // `bufs` (borrowed for the whole call), writable for a
                // read (`check`); the kernel touches only those ranges.
                // (preadv2 only with flags: a seccomp policy or an old
                // kernel may allow preadv and not it.)
                cvt(unsafe {
                    match (read, flags) {
                        (true, 0) => libc::preadv(fd.as_raw_fd(), iovecs.as_ptr(), n, off),
                        (true, _) => libc::preadv2(fd.as_raw_fd(), iovecs.as_ptr(), n, off, flags),
                        (false, _) => libc::pwritev(fd.as_raw_fd(), iovecs.as_ptr(), n, off),
                    }
                })
            })?;
            Ok(moved as usize)
        }
        IoRequest::Sync => {
            // SAFETY: fdatasync takes no pointers; `fd` is borrowed.
            retry(|| cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }))?;
            Ok(0)
        }
        IoRequest::Fallocate { mode, offset, len } => {
            super::file::fallocate(fd, *mode, *offset, *len)?;
            Ok(0)
        }
    }
}

//! Unix stream sockets for vhost-user, with file descriptors passed as
//! SCM_RIGHTS ancillary data.
//!
//! This module only moves bytes and fds: [`StreamIo`] is a [`Stream`] seen
//! as an `embedded_io` byte stream ([`Read`], [`Write`]) with fd slots
//! ([`FdSlots`]), and the core's framer
//! ([`vhost_user_core::transport`]) makes messages of it: a 12-byte header
//! validated with [`Header::parse`], then exactly `size` payload bytes,
//! the fds counted against [`MAX_FDS`]. [`Stream::recv_message`] and
//! [`Stream::send_message`] are that framer over this socket.
//!
//! Reads use `recvmsg` (`MSG_CMSG_CLOEXEC`, a control buffer with room for
//! one fd more than [`MAX_FDS`] so surplus fds are seen, `MSG_CTRUNC`
//! refused). Every fd the kernel installs is wrapped in an [`OwnedFd`]
//! before anything else happens, so every error path closes it: a peer
//! cannot exhaust our fd table by attaching fds (DPDK CVE-2019-14818,
//! CVE-2022-0669).
//!
//! Sockets are blocking. A message is read or written whole, retrying on
//! `EINTR` and short reads or writes; an event loop that learns readability
//! through epoll then calls [`Stream::recv_message`], which blocks only for
//! the rest of a message the peer is sending.
//!
//! A socket timeout ([`Stream::set_read_timeout`]) bounds each `recvmsg`,
//! not a message: a peer that sends a byte just before each timeout
//! stretches one message without end. Against such a peer (and one that
//! never reads what we send) a message has a **deadline**, computed once:
//! [`Stream::recv_message_by`] and [`Stream::send_message_by`] take one,
//! [`Stream::recv_message_started`] sets one when the message's first
//! byte comes (a peer idle between messages is waited for). Each partial
//! read or write then polls for the time left and never blocks past it;
//! a missed deadline is an [`io::ErrorKind::TimedOut`] error, and leaves
//! the connection out of step.

use std::ffi::c_void;
use std::fmt;
use std::io;
use std::mem::{self, size_of};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::ptr;
use std::time::{Duration, Instant};

use embedded_io::{ErrorType, Read, Write};
use vhost_user_core::message::{Header, HEADER_SIZE, MAX_FDS, MAX_MESSAGE, MAX_PAYLOAD};
use vhost_user_core::transport::{self, FdSlots, Frame, TransportError};

use super::{cvt, retry};

/// Room for one fd more than any message may carry: the kernel installs at
/// most this many, and a message with more is detected (and all closed).
const FD_ROOM: usize = MAX_FDS + 1;

/// Bytes of control buffer for [`FD_ROOM`] fds.
// SAFETY: CMSG_SPACE is pure arithmetic on its argument.
const CMSG_BUF_LEN: usize =
    unsafe { libc::CMSG_SPACE((FD_ROOM * size_of::<RawFd>()) as u32) } as usize;

/// A control-message buffer aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF_LEN]);

const _: () = assert!(mem::align_of::<libc::cmsghdr>() <= 8);

fn invalid_data(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads an `int` socket option.
fn sockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes; the kernel writes at most
    // `len` bytes into `v` and updates `len`.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            ptr::addr_of_mut!(v).cast::<c_void>(),
            &mut len,
        )
    })?;
    Ok(v)
}

/// Checks that `fd` is a Unix stream socket, listening or not as asked.
fn check_unix_stream(fd: BorrowedFd<'_>, listening: bool) -> io::Result<()> {
    let not = |what: &'static str| io::Error::new(io::ErrorKind::InvalidInput, what);
    let domain = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            not("fd is not a socket")
        } else {
            e
        }
    })?;
    if domain != libc::AF_UNIX {
        return Err(not("socket is not a Unix domain socket"));
    }
    if sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(not("socket is not a stream socket"));
    }
    let acc = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0;
    match (listening, acc) {
        (true, false) => Err(not("socket is not listening")),
        (false, true) => Err(not("socket is a listening socket")),
        _ => Ok(()),
    }
}

/// Whether `fd` is what [`Stream::try_from`] takes: a Unix stream
/// socket that is not listening. `Ok(false)` for any other fd.
pub fn is_stream(fd: BorrowedFd<'_>) -> io::Result<bool> {
    match check_unix_stream(fd, false) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes a stale socket file at `path`: one nobody listens on. A live
/// socket or a file that is not a socket is left alone and reported.
fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("something is listening on {}", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A listening Unix stream socket.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: Option<PathBuf>,
}

impl Listener {
    /// Listens on `path` (`--socket-path`). A stale socket file there (one
    /// nobody listens on) is removed first; if something listens there the
    /// result is an [`io::ErrorKind::AddrInUse`] error, and a file that is
    /// not a socket is never removed ([`io::ErrorKind::AlreadyExists`]).
    /// The socket file is not removed when the listener is dropped.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Listener> {
        let path = path.as_ref();
        remove_stale(path)?;
        let inner = UnixListener::bind(path)?;
        Ok(Listener {
            inner,
            path: Some(path.to_path_buf()),
        })
    }

    /// Adopts an inherited listening socket (`--fd N`).
    ///
    /// The fd is duplicated (close-on-exec) and the duplicate checked to be
    /// a listening Unix stream socket; `fd` itself is neither taken nor
    /// closed, since this function cannot know that nothing else owns it
    /// (close it yourself if you do own it). Fails with
    /// [`io::ErrorKind::InvalidInput`] if it is the wrong kind of fd and
    /// with `EBADF` if it is not open.
    pub fn from_inherited_fd(fd: RawFd) -> io::Result<Listener> {
        if fd < 0 {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // SAFETY: F_DUPFD_CLOEXEC reads no memory of ours. Whatever `fd` is,
        // the call only creates a new descriptor; no existing descriptor is
        // changed or closed.
        let dup = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
        // SAFETY: `dup` was just returned by the kernel and nothing else
        // refers to it.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        Listener::try_from(owned)
    }

    /// Waits for and accepts a connection (close-on-exec). Returns
    /// [`io::ErrorKind::Interrupted`] if a signal interrupted the wait, so a
    /// caller can check a stop flag.
    pub fn accept(&self) -> io::Result<Stream> {
        let (s, _) = self.inner.accept()?;
        Ok(Stream { inner: s })
    }

    /// The path given to [`Listener::bind`], if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Makes [`Listener::accept`] return [`io::ErrorKind::WouldBlock`]
    /// instead of waiting (for an epoll-driven accept).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.inner.set_nonblocking(nonblocking)
    }
}

impl TryFrom<OwnedFd> for Listener {
    type Error = io::Error;

    /// Checks that `fd` is a listening Unix stream socket; on error the fd
    /// is closed.
    fn try_from(fd: OwnedFd) -> io::Result<Listener> {
        check_unix_stream(fd.as_fd(), true)?;
        Ok(Listener {
            inner: UnixListener::from(fd),
            path: None,
        })
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl From<Listener> for OwnedFd {
    fn from(l: Listener) -> OwnedFd {
        l.inner.into()
    }
}

/// One received message: its validated header, the payload length and the
/// fds that came with it.
///
/// The header and payload bytes are in the buffer given to
/// [`Stream::recv_message`]: the header at `[0, HEADER_SIZE)`, the payload
/// at `[HEADER_SIZE, HEADER_SIZE + payload_len)` ([`Received::payload`]).
/// Dropping it closes every fd that was not taken out.
#[derive(Debug)]
pub struct Received {
    /// The validated header.
    pub header: Header,
    /// Payload bytes (equal to `header.size`, at most [`MAX_PAYLOAD`]).
    pub payload_len: usize,
    /// The fds that came with the message, in order (at most [`MAX_FDS`]).
    pub fds: Vec<OwnedFd>,
}

impl Received {
    /// The payload, given the buffer the message was received into.
    pub fn payload<'b>(&self, buf: &'b [u8; MAX_MESSAGE]) -> &'b [u8] {
        let len = self.payload_len.min(MAX_PAYLOAD);
        &buf[HEADER_SIZE..HEADER_SIZE + len]
    }
}

/// A connected Unix stream socket carrying vhost-user messages.
pub struct Stream {
    inner: UnixStream,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("fd", &self.inner.as_raw_fd())
            .finish()
    }
}

impl Stream {
    /// Connects to a vhost-user socket at `path` (close-on-exec).
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Stream> {
        Ok(Stream {
            inner: UnixStream::connect(path)?,
        })
    }

    /// A connected pair (close-on-exec), for a back-end channel
    /// (SET_BACKEND_REQ_FD sends one end) and for tests.
    pub fn pair() -> io::Result<(Stream, Stream)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Stream { inner: a }, Stream { inner: b }))
    }

    /// A second handle on the same socket (close-on-exec).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(Stream {
            inner: self.inner.try_clone()?,
        })
    }

    /// Sends `bytes` (one or more whole messages) with `fds` attached as
    /// SCM_RIGHTS to the first bytes. Retries on `EINTR` and continues
    /// after short writes; the fds go with the first `sendmsg` only. Never
    /// raises SIGPIPE: a vanished peer is an [`io::ErrorKind::BrokenPipe`]
    /// error.
    ///
    /// Fails with [`io::ErrorKind::InvalidInput`] for more than [`MAX_FDS`]
    /// fds, or fds without bytes to carry them.
    pub fn send_message(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many fds for one message",
            ));
        }
        self.send_with_fds(bytes, fds, None)
    }

    /// Like [`Stream::send_message`] but allows one fd more than a message
    /// may carry (`MAX_FDS + 1`): for test peers that check how the other
    /// side handles a message with too many fds.
    pub fn send_message_with_excess_fd(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        if fds.len() > FD_ROOM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many fds for one message",
            ));
        }
        self.send_with_fds(bytes, fds, None)
    }

    /// [`Stream::send_message`], all of it (every partial write) by
    /// `deadline`: a peer that does not read (or reads a byte now and
    /// then) is an [`io::ErrorKind::TimedOut`] error once it passed,
    /// whatever the socket's write timeout. Part of the message may have
    /// gone: the connection is then out of step.
    pub fn send_message_by(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Instant,
    ) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many fds for one message",
            ));
        }
        self.send_with_fds(bytes, fds, Some(deadline))
    }

    fn send_with_fds(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Option<Instant>,
    ) -> io::Result<()> {
        if bytes.is_empty() && !fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fds need at least one byte",
            ));
        }
        let mut io = self.io();
        io.deadline = deadline;
        io.attach(fds)?;
        transport::write_message(&mut io, bytes).map_err(framing_error)
    }

    /// Receives one message into `buf` with the core's framer
    /// ([`transport::read_message`]): exactly the 12-byte header, validated
    /// with [`Header::parse`], then exactly `size` payload bytes; the fds
    /// must come with the header bytes.
    ///
    /// Returns `Ok(None)` when the peer closed the connection between
    /// messages. Errors (the connection is then out of step and should be
    /// dropped; every fd received so far is closed):
    /// - [`io::ErrorKind::UnexpectedEof`]: the peer closed inside a message
    ///   (after part of its header or payload, or after sending fds without
    ///   bytes); the inner error is the framer's
    ///   [`TransportError::Truncated`];
    /// - [`io::ErrorKind::InvalidData`]: a malformed header (the
    ///   [`WireError`](vhost_user_core::message::WireError) is the inner
    ///   error, see [`io::Error::get_ref`]), more than [`MAX_FDS`] fds or
    ///   fds arriving with payload bytes (a [`TransportError`] inner
    ///   error), or truncated control data (`MSG_CTRUNC`);
    /// - any socket error, with its own kind ([`io::ErrorKind::WouldBlock`]
    ///   after a [read timeout](Stream::set_read_timeout)).
    pub fn recv_message(&self, buf: &mut [u8; MAX_MESSAGE]) -> io::Result<Option<Received>> {
        self.io().recv(buf)
    }

    /// [`Stream::recv_message`], the whole message (header, payload and
    /// fds, waiting for its first byte included) by `deadline`: past it,
    /// an [`io::ErrorKind::TimedOut`] error, whatever the socket's read
    /// timeout. For a reply or an ack, due by a set time.
    pub fn recv_message_by(
        &self,
        buf: &mut [u8; MAX_MESSAGE],
        deadline: Instant,
    ) -> io::Result<Option<Received>> {
        let mut io = self.io();
        io.deadline = Some(deadline);
        io.recv(buf)
    }

    /// [`Stream::recv_message`] that waits for the first byte as long as
    /// it takes (a peer idle between messages; the socket's read timeout
    /// still applies to that wait), then for the rest of the message at
    /// most `limit` from that byte: past it, an
    /// [`io::ErrorKind::TimedOut`] error. For requests, which come when
    /// the peer likes but must not take forever once begun.
    pub fn recv_message_started(
        &self,
        buf: &mut [u8; MAX_MESSAGE],
        limit: Duration,
    ) -> io::Result<Option<Received>> {
        let mut io = self.io();
        io.limit = Some(limit);
        io.recv(buf)
    }

    /// This socket as a byte stream with fd slots, for the core's framer.
    pub fn io(&self) -> StreamIo<'_> {
        StreamIo {
            stream: &self.inner,
            fds: Vec::new(),
            attach: &[],
            deadline: None,
            limit: None,
        }
    }

    /// Shuts both directions down: a thread blocked in
    /// [`Stream::recv_message`] on this socket returns, and the peer sees
    /// end of file.
    pub fn shutdown(&self) -> io::Result<()> {
        self.inner.shutdown(std::net::Shutdown::Both)
    }

    /// Shuts the sending direction down: the peer sees end of file once it
    /// has read what was sent, while this side can still receive.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.inner.shutdown(std::net::Shutdown::Write)
    }

    /// Bounds how long [`Stream::recv_message`] waits for bytes (`None`:
    /// forever). A timeout is a [`io::ErrorKind::WouldBlock`] error; one in
    /// the middle of a message leaves the connection out of step.
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }

    /// Bounds how long [`Stream::send_message`] waits for room in the
    /// socket's buffer (`None`: forever), so a peer that stops reading
    /// cannot hold the sender. A timeout is a
    /// [`io::ErrorKind::WouldBlock`] error; one in the middle of a message
    /// leaves the connection out of step.
    pub fn set_write_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(timeout)
    }
}

/// The framer's error as an [`io::Error`]: a socket error as it is, a
/// truncated message as [`io::ErrorKind::UnexpectedEof`], a malformed header
/// (the [`WireError`](vhost_user_core::message::WireError) inside) or an fd
/// rule broken as [`io::ErrorKind::InvalidData`].
fn framing_error(e: TransportError<io::Error>) -> io::Error {
    match e {
        TransportError::Io(e) => e,
        TransportError::Wire(w) => io::Error::new(io::ErrorKind::InvalidData, w),
        e @ TransportError::Truncated { .. } => io::Error::new(io::ErrorKind::UnexpectedEof, e),
        e @ (TransportError::TooManyFds(_) | TransportError::LateFds) => {
            io::Error::new(io::ErrorKind::InvalidData, e)
        }
    }
}

/// A [`Stream`] as an `embedded_io` byte stream with fd slots: what the
/// core's framer ([`vhost_user_core::transport`]) reads and writes.
///
/// Each [`Read::read`] is one `recvmsg`; the fds that come with the bytes
/// are kept, as [`OwnedFd`]s, for the current message
/// ([`FdSlots::received`] counts them, [`StreamIo::take_fds`] hands them
/// out, [`FdSlots::start_message`] and dropping close them). Each
/// [`Write::write`] is one `sendmsg`; fds [attached](StreamIo::attach) go
/// with the first bytes written. Both retry on `EINTR`.
pub struct StreamIo<'a> {
    stream: &'a UnixStream,
    /// Fds received since the current message started.
    fds: Vec<OwnedFd>,
    /// Fds to send with the next bytes written.
    attach: &'a [BorrowedFd<'a>],
    /// When the message must be read or written whole: each `recvmsg` or
    /// `sendmsg` waits for the socket at most until then, and not at all
    /// after.
    deadline: Option<Instant>,
    /// Sets `deadline` this long after the first bytes read.
    limit: Option<Duration>,
}

impl fmt::Debug for StreamIo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamIo")
            .field("fd", &self.stream.as_raw_fd())
            .field("fds", &self.fds)
            .field("attach", &self.attach)
            .field("deadline", &self.deadline)
            .field("limit", &self.limit)
            .finish()
    }
}

impl<'a> StreamIo<'a> {
    /// Attaches `fds` (as SCM_RIGHTS) to the next bytes written. Fails with
    /// [`io::ErrorKind::InvalidInput`] for more than `MAX_FDS + 1` (the
    /// room of the control buffer; [`Stream::send_message`] allows only
    /// [`MAX_FDS`]).
    pub fn attach(&mut self, fds: &'a [BorrowedFd<'a>]) -> io::Result<()> {
        if fds.len() > FD_ROOM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many fds for one message",
            ));
        }
        self.attach = fds;
        Ok(())
    }

    /// Takes the fds received for the current message, in order.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        mem::take(&mut self.fds)
    }

    /// One message with the core's framer (see [`Stream::recv_message`]).
    fn recv(&mut self, buf: &mut [u8; MAX_MESSAGE]) -> io::Result<Option<Received>> {
        match transport::read_message(self, buf).map_err(framing_error)? {
            None => Ok(None),
            Some(Frame {
                header, payload, ..
            }) => Ok(Some(Received {
                header,
                payload_len: payload.len(),
                fds: self.take_fds(),
            })),
        }
    }

    /// Waits until the socket is ready for `events` (`POLLIN` or
    /// `POLLOUT`) if a deadline is set: an [`io::ErrorKind::TimedOut`]
    /// error once it passed. Returns the flags for the call that follows
    /// (`MSG_DONTWAIT` with a deadline, so that call never blocks past
    /// it; without one, the socket's own timeouts apply).
    fn ready(&self, events: libc::c_short) -> io::Result<libc::c_int> {
        let Some(deadline) = self.deadline else {
            return Ok(0);
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let what = if events == libc::POLLOUT {
                    "the peer did not take the message by its deadline"
                } else {
                    "the message did not arrive whole by its deadline"
                };
                return Err(io::Error::new(io::ErrorKind::TimedOut, what));
            }
            // Rounded up, so a wait shorter than a millisecond still waits.
            let ms =
                libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
            let mut p = libc::pollfd {
                fd: self.stream.as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: `p` is one valid pollfd, writable during the call.
            match cvt(unsafe { libc::poll(&mut p, 1, ms) }) {
                // Ready, or an error or hang-up the call will report.
                Ok(n) if n > 0 => return Ok(libc::MSG_DONTWAIT),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl ErrorType for StreamIo<'_> {
    type Error = io::Error;
}

impl FdSlots for StreamIo<'_> {
    fn start_message(&mut self) {
        self.fds.clear();
    }

    fn received(&self) -> usize {
        self.fds.len()
    }
}

impl Read for StreamIo<'_> {
    /// One `recvmsg` into `buf` (retrying on `EINTR`); fds that come with
    /// the bytes are kept before any check, so they are owned (and closed on
    /// error). Returns the number of bytes read (0 at end of stream).
    /// Truncated control data (`MSG_CTRUNC`) is an
    /// [`io::ErrorKind::InvalidData`] error.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut cmsg = CmsgBuf([0; CMSG_BUF_LEN]);
        let (n, flags) = loop {
            let dontwait = self.ready(libc::POLLIN)?;
            match self.recvmsg(buf, &mut cmsg, dontwait) {
                // Another reader took what the poll saw: wait again.
                Err(e) if dontwait != 0 && e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r?,
            }
        };
        if flags & libc::MSG_CTRUNC != 0 {
            return Err(invalid_data(
                "control data truncated: too many fds attached",
            ));
        }
        if n > 0 && self.deadline.is_none() {
            // The message began: the rest of it is due within the limit.
            self.deadline = self.limit.map(|l| Instant::now() + l);
        }
        Ok(n)
    }
}

impl StreamIo<'_> {
    /// One `recvmsg` into `buf` with `flags` besides `MSG_CMSG_CLOEXEC`,
    /// retrying on `EINTR`; the fds that come are kept. Returns the bytes
    /// read and the message flags.
    fn recvmsg(
        &mut self,
        buf: &mut [u8],
        cmsg: &mut CmsgBuf,
        flags: libc::c_int,
    ) -> io::Result<(usize, libc::c_int)> {
        let fds = &mut self.fds;
        retry(|| {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast::<c_void>(),
                iov_len: buf.len(),
            };
            // SAFETY: all-zero is a valid msghdr.
            let mut msg: libc::msghdr = unsafe { mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.0.as_mut_ptr().cast::<c_void>();
            msg.msg_controllen = CMSG_BUF_LEN as _;
            // SAFETY: `msg` points to one iovec over `buf` (writable for its
            // length) and to the aligned control buffer of CMSG_BUF_LEN
            // bytes; both outlive the call.
            let r = cvt(unsafe {
                libc::recvmsg(
                    self.stream.as_raw_fd(),
                    &mut msg,
                    libc::MSG_CMSG_CLOEXEC | flags,
                )
            })?;
            take_fds(&msg, fds);
            Ok((r as usize, msg.msg_flags))
        })
    }
}

impl Write for StreamIo<'_> {
    /// One `sendmsg` of `buf` (retrying on `EINTR`), with the attached fds
    /// if none were sent yet. Never raises SIGPIPE: a vanished peer is an
    /// [`io::ErrorKind::BrokenPipe`] error. An empty `buf` sends nothing
    /// (not even attached fds).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut cmsg = CmsgBuf([0; CMSG_BUF_LEN]);
        let control_len = if self.attach.is_empty() {
            0
        } else {
            let fds = self.attach;
            let data_len = (fds.len() * size_of::<RawFd>()) as u32;
            // SAFETY: pure arithmetic.
            let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
            // SAFETY: pure arithmetic.
            let cmsg_len = unsafe { libc::CMSG_LEN(data_len) } as usize;
            // `space` <= CMSG_BUF_LEN since fds.len() <= FD_ROOM (attach).
            let hdr = libc::cmsghdr {
                cmsg_len: cmsg_len as _,
                cmsg_level: libc::SOL_SOCKET,
                cmsg_type: libc::SCM_RIGHTS,
            };
            let base = cmsg.0.as_mut_ptr();
            // SAFETY: the buffer is aligned for cmsghdr (align(8), checked by
            // a const assert) and holds CMSG_SPACE(MAX_FDS + 1 ints) bytes,
            // more than the header plus `fds.len()` ints written here
            // (`attach` refuses more). CMSG_DATA is computed from the header
            // pointer inside the buffer; the ints are written unaligned-safe.
            unsafe {
                ptr::write(base.cast::<libc::cmsghdr>(), hdr);
                let data = libc::CMSG_DATA(base.cast::<libc::cmsghdr>());
                for (i, fd) in fds.iter().enumerate() {
                    ptr::write_unaligned(data.cast::<RawFd>().add(i), fd.as_raw_fd());
                }
            }
            space
        };
        let n = loop {
            let dontwait = self.ready(libc::POLLOUT)?;
            let sent = retry(|| {
                let mut iov = libc::iovec {
                    iov_base: buf.as_ptr() as *mut c_void,
                    iov_len: buf.len(),
                };
                // SAFETY: msghdr is a plain C struct for which all-zero is a valid
                // value (null pointers, zero lengths).
                let mut msg: libc::msghdr = unsafe { mem::zeroed() };
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                if control_len > 0 {
                    msg.msg_control = cmsg.0.as_mut_ptr().cast::<c_void>();
                    msg.msg_controllen = control_len as _;
                }
                // SAFETY: `msg` points to one iovec over `buf` (readable for its
                // length) and, if set, to the control buffer of `control_len`
                // initialised bytes; all outlive the call. The fds in it are
                // borrowed and open for the duration of the call.
                cvt(unsafe {
                    libc::sendmsg(self.stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | dontwait)
                })
            });
            match sent {
                // The room the poll saw went to another writer: wait again.
                Err(e) if dontwait != 0 && e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r?,
            }
        };
        if n == 0 {
            // `write_all` may not see Ok(0) for a non-empty buffer.
            return Err(io::ErrorKind::WriteZero.into());
        }
        // The fds went with these bytes.
        self.attach = &[];
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wraps every fd of the SCM_RIGHTS messages in `msg` (just filled by
/// `recvmsg`) into an [`OwnedFd`] appended to `fds`.
fn take_fds(msg: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    // SAFETY: `msg` was filled by recvmsg: msg_control points to our control
    // buffer and msg_controllen is the length the kernel wrote, so
    // CMSG_FIRSTHDR/CMSG_NXTHDR only return headers lying inside it (or
    // null).
    let mut c = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !c.is_null() {
        // SAFETY: `c` points to a complete cmsghdr inside the buffer (see
        // above); the buffer is aligned for it.
        let hdr = unsafe { ptr::read(c) };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: pure arithmetic.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let n = (hdr.cmsg_len as usize).saturating_sub(head) / size_of::<RawFd>();
            // SAFETY: CMSG_DATA of a header inside the buffer points at its
            // data, which the kernel filled with `n` ints within
            // msg_controllen.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..n {
                // SAFETY: `i < n` ints were written by the kernel at `data`
                // (read unaligned: CMSG_DATA need not be int-aligned in
                // general).
                let fd = unsafe { ptr::read_unaligned(data.add(i)) };
                // SAFETY: the kernel just installed `fd` in our table for this
                // message; nothing else refers to it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR; `c` is a header of `msg`.
        c = unsafe { libc::CMSG_NXTHDR(msg, c) };
    }
}

impl TryFrom<OwnedFd> for Stream {
    type Error = io::Error;

    /// Checks that `fd` is a connected-kind Unix stream socket (for
    /// instance the back-end channel a front-end sends with
    /// SET_BACKEND_REQ_FD) and puts it in blocking mode (its file
    /// description is ours alone once the sender closed its copy). On error
    /// the fd is closed.
    fn try_from(fd: OwnedFd) -> io::Result<Stream> {
        check_unix_stream(fd.as_fd(), false)?;
        let inner = UnixStream::from(fd);
        inner.set_nonblocking(false)?;
        Ok(Stream { inner })
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl From<Stream> for OwnedFd {
    fn from(s: Stream) -> OwnedFd {
        s.inner.into()
    }
}

#[cfg(test)]
mod tests;

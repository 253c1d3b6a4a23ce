//! Message framing: the one framer of vhu, over any byte stream
//! (`embedded_io::Read + Write`) plus a source of fd slots ([`FdSlots`]).
//!
//! [`read_message`] reads one message: the 12-byte header, validated with
//! [`Header::parse`], then exactly `size` payload bytes (never more than
//! [`MAX_PAYLOAD`], never a byte of the next message). File descriptors do
//! not travel in the byte stream: the stream's adapter receives them beside
//! the bytes (the Linux adapter's SCM_RIGHTS), keeps them in its slots and
//! tells the framer, through [`FdSlots::received`], how many came with the
//! bytes read so far. The framer only counts them and enforces the rules:
//!
//! - fds may arrive with any of the header's bytes (a sender attaches them to
//!   the first bytes of the message, and a reader may get them with the
//!   first or a later part of the header);
//! - at most [`MAX_FDS`] per message ([`TransportError::TooManyFds`]; an
//!   adapter should leave room for one more, so that a surplus is seen);
//! - none with payload bytes ([`TransportError::LateFds`]).
//!
//! A channel without fds (a serial line, shared memory) wraps its stream in
//! [`NoFds`].
//!
//! End of stream is told apart by where it falls: before the first byte of
//! a message (and with no fd received) it is a clean close, `Ok(None)`;
//! after part of a header or payload it is
//! [`TransportError::Truncated`].
//!
//! On any error the stream is out of step and should be dropped, along with
//! every fd the adapter holds for the message.

use core::fmt;

use embedded_io::{ErrorType, Read, Write};

use crate::message::{Header, WireError, HEADER_SIZE, MAX_FDS, MAX_MESSAGE, MAX_PAYLOAD};

/// The fds received beside a byte stream, counted per message.
///
/// The adapter that implements [`Read`] for the stream fills the slots: the
/// fds that arrive with bytes it reads are kept (owned, so that every error
/// path closes them) until the caller takes them after [`read_message`]
/// returned. The framer only asks how many there are.
pub trait FdSlots {
    /// A message starts: the framer calls this before reading its first
    /// byte. Fds still held for an earlier message are released (closed);
    /// take them before reading the next message.
    fn start_message(&mut self);

    /// How many fds arrived with the bytes read since
    /// [`start_message`](FdSlots::start_message). An adapter that receives
    /// more than [`MAX_FDS`] at once (its room should be `MAX_FDS + 1`)
    /// reports them all: the framer refuses the message.
    fn received(&self) -> usize;
}

impl<T: FdSlots + ?Sized> FdSlots for &mut T {
    fn start_message(&mut self) {
        T::start_message(self);
    }

    fn received(&self) -> usize {
        T::received(self)
    }
}

/// A byte stream that carries no fds (a serial line, shared memory): every
/// message has 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoFds<S>(pub S);

impl<S> FdSlots for NoFds<S> {
    fn start_message(&mut self) {}

    fn received(&self) -> usize {
        0
    }
}

impl<S: ErrorType> ErrorType for NoFds<S> {
    type Error = S::Error;
}

impl<S: Read> Read for NoFds<S> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, S::Error> {
        self.0.read(buf)
    }
}

impl<S: Write> Write for NoFds<S> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, S::Error> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> Result<(), S::Error> {
        self.0.flush()
    }
}

/// A framing failure. The stream is out of step afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportError<E> {
    /// The stream ended inside a message: after `got` of its bytes, of the
    /// `needed` ones (counting the header; `needed` is [`HEADER_SIZE`]
    /// while the header is incomplete, since its size is unknown). A close
    /// between messages is not an error (`Ok(None)`).
    Truncated {
        /// Bytes of the message read.
        got: usize,
        /// Bytes the message needed (header, then header and payload).
        needed: usize,
    },
    /// The stream failed.
    Io(E),
    /// The header was malformed.
    Wire(WireError),
    /// More fds than a message may carry ([`MAX_FDS`]) came with it.
    TooManyFds(usize),
    /// Fds arrived with payload bytes, not with the header.
    LateFds,
}

impl<E: fmt::Debug> fmt::Display for TransportError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::Truncated { got, needed } => {
                let part = if *got < HEADER_SIZE {
                    "header"
                } else {
                    "payload"
                };
                write!(
                    f,
                    "connection closed inside a message {part} (after {got} of {needed} bytes)"
                )
            }
            TransportError::Io(e) => write!(f, "I/O error: {e:?}"),
            TransportError::Wire(e) => write!(f, "{e}"),
            TransportError::TooManyFds(n) => {
                write!(f, "{n} fds with one message (at most {MAX_FDS})")
            }
            TransportError::LateFds => f.write_str("fds arrived with payload bytes"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for TransportError<E> {}

/// One message read by [`read_message`].
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'b> {
    /// The validated header.
    pub header: Header,
    /// The payload: `header.size` bytes, at most [`MAX_PAYLOAD`], in the
    /// buffer given to [`read_message`] right after the header bytes.
    pub payload: &'b [u8],
    /// How many fds came with the message (at most [`MAX_FDS`]); the
    /// stream's adapter holds them.
    pub fds: usize,
}

/// Checks the fds received so far for the message: at most [`MAX_FDS`],
/// and, once the header is read, exactly the `header_fds` that came with it.
fn check_fds<S: FdSlots, E>(s: &S, header_fds: Option<usize>) -> Result<usize, TransportError<E>> {
    let fds = s.received();
    if fds > MAX_FDS {
        return Err(TransportError::TooManyFds(fds));
    }
    match header_fds {
        Some(h) if fds != h => Err(TransportError::LateFds),
        _ => Ok(fds),
    }
}

/// Fills `dst`, bytes `[at, at + dst.len())` of a message of `needed`
/// bytes, checking the fds after every read (see [`check_fds`]).
fn fill<S: Read + FdSlots>(
    s: &mut S,
    dst: &mut [u8],
    at: usize,
    needed: usize,
    header_fds: Option<usize>,
) -> Result<(), TransportError<S::Error>> {
    let mut got = 0;
    while got < dst.len() {
        let n = s.read(&mut dst[got..]).map_err(TransportError::Io)?;
        check_fds(s, header_fds)?;
        if n == 0 {
            return Err(TransportError::Truncated {
                got: at + got,
                needed,
            });
        }
        got += n;
    }
    Ok(())
}

/// Reads one message into `buf`: the header at `[0, HEADER_SIZE)`, the
/// payload right after it.
///
/// Returns `Ok(None)` when the stream ends cleanly between messages (end of
/// stream before any byte, and no fd, of a new message). Reads only the
/// message's own bytes, so the next message stays in the stream.
pub fn read_message<'b, S: Read + FdSlots>(
    s: &mut S,
    buf: &'b mut [u8; MAX_MESSAGE],
) -> Result<Option<Frame<'b>>, TransportError<S::Error>> {
    s.start_message();
    let (head, rest) = buf.split_at_mut(HEADER_SIZE);
    // The first read on its own: end of stream here is a clean close.
    let n = s.read(head).map_err(TransportError::Io)?;
    let fds = check_fds(s, None)?;
    if n == 0 {
        if fds == 0 {
            return Ok(None);
        }
        return Err(TransportError::Truncated {
            got: 0,
            needed: HEADER_SIZE,
        });
    }
    fill(s, &mut head[n..], n, HEADER_SIZE, None)?;
    let header = Header::parse(head).map_err(TransportError::Wire)?;
    // Header::parse refuses more; `min` keeps the slice infallible.
    let size = (header.size as usize).min(MAX_PAYLOAD);
    let fds = check_fds(s, None)?;
    let payload = &mut rest[..size];
    fill(s, payload, HEADER_SIZE, HEADER_SIZE + size, Some(fds))?;
    Ok(Some(Frame {
        header,
        payload,
        fds,
    }))
}

/// Writes one encoded message (header and payload) and flushes. The fds
/// that go with it are the adapter's business (the Linux adapter attaches
/// them to the first bytes written).
pub fn write_message<W: Write>(w: &mut W, message: &[u8]) -> Result<(), TransportError<W::Error>> {
    w.write_all(message).map_err(TransportError::Io)?;
    w.flush().map_err(TransportError::Io)
}

#[cfg(test)]
mod tests;

//! Message framing over any byte stream (`embedded_io::Read + Write`).
//!
//! A message is read as the 12-byte header, validated, then exactly `size`
//! payload bytes, never more than [`MAX_PAYLOAD`]. File descriptors do not
//! travel in the byte stream: an adapter with fd passing (the Linux adapter's
//! SCM_RIGHTS) collects them itself; a channel without fds (serial, shared
//! memory) uses polling or in-band notifications.

use core::fmt;

use embedded_io::{Read, ReadExactError, Write};

use crate::message::{Header, WireError, HEADER_SIZE, MAX_MESSAGE, MAX_PAYLOAD};

/// A framing failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportError<E> {
    /// The stream ended (cleanly between messages, or in the middle of one).
    Eof,
    /// The stream failed.
    Io(E),
    /// The header was malformed.
    Wire(WireError),
}

impl<E: fmt::Debug> fmt::Display for TransportError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::Eof => write!(f, "connection closed"),
            TransportError::Io(e) => write!(f, "I/O error: {e:?}"),
            TransportError::Wire(e) => write!(f, "{e}"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for TransportError<E> {}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), TransportError<R::Error>> {
    r.read_exact(buf).map_err(|e| match e {
        ReadExactError::UnexpectedEof => TransportError::Eof,
        ReadExactError::Other(e) => TransportError::Io(e),
    })
}

/// Reads one message into `buf`: returns the validated header and its
/// payload (a slice of `buf`).
pub fn read_message<'b, R: Read>(
    r: &mut R,
    buf: &'b mut [u8; MAX_MESSAGE],
) -> Result<(Header, &'b [u8]), TransportError<R::Error>> {
    let (head, rest) = buf.split_at_mut(HEADER_SIZE);
    read_exact(r, head)?;
    let header = Header::parse(head).map_err(TransportError::Wire)?;
    let size = header.size as usize;
    debug_assert!(size <= MAX_PAYLOAD);
    let payload = &mut rest[..size];
    read_exact(r, payload)?;
    Ok((header, payload))
}

/// Writes one encoded message.
pub fn write_message<W: Write>(w: &mut W, message: &[u8]) -> Result<(), TransportError<W::Error>> {
    w.write_all(message).map_err(TransportError::Io)?;
    w.flush().map_err(TransportError::Io)
}

//! The channel: two one-way byte rings in shared memory ([`Mailbox`]), one
//! per direction, and a [`Port`] at each end implementing `embedded_io`'s
//! `Read` and `Write` for the core's framer (wrapped in
//! [`NoFds`](vhost_user_core::transport::NoFds): no fds travel).
//!
//! A writer's bytes become visible to the reader only at `flush`, and
//! [`write_message`](vhost_user_core::transport::write_message) flushes
//! after each message, so the reader sees whole messages: a read of an
//! empty mailbox returns 0, which the framer takes for "no message now"
//! between messages. A write that does not fit is refused whole
//! ([`ErrorKind::OutOfMemory`]).

use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use embedded_io::{ErrorKind, ErrorType, Read, Write};

/// A one-way byte ring of `N` bytes (a power of two) for one writer and
/// one reader.
pub struct Mailbox<const N: usize> {
    bytes: [AtomicU8; N],
    /// Bytes published by the writer (wrapping).
    head: AtomicU32,
    /// Bytes consumed by the reader (wrapping).
    tail: AtomicU32,
}

impl<const N: usize> fmt::Debug for Mailbox<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mailbox")
            .field("head", &self.head)
            .field("tail", &self.tail)
            .finish_non_exhaustive()
    }
}

impl<const N: usize> Default for Mailbox<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Mailbox<N> {
    const SIZE_OK: () = assert!(N.is_power_of_two() && N <= 1 << 30);

    /// An empty mailbox (`const`, for a `static`).
    pub const fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::SIZE_OK;
        Mailbox {
            bytes: [const { AtomicU8::new(0) }; N],
            head: AtomicU32::new(0),
            tail: AtomicU32::new(0),
        }
    }

    /// Bytes published and not yet read.
    pub fn len(&self) -> usize {
        let head = self.head.load(Ordering::Acquire);
        head.wrapping_sub(self.tail.load(Ordering::Relaxed)) as usize
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, pos: u32) -> &AtomicU8 {
        // N is a power of two: the mask keeps the index in bounds.
        &self.bytes[pos as usize & (N - 1)]
    }
}

/// One end of a channel: reads from `rx`, writes to `tx`.
#[derive(Debug)]
pub struct Port<'a, const N: usize> {
    rx: &'a Mailbox<N>,
    tx: &'a Mailbox<N>,
    /// `tx`'s head including the bytes written and not yet flushed.
    staged: u32,
}

impl<'a, const N: usize> Port<'a, N> {
    /// The end that reads `rx` and writes `tx` (the other end swaps them).
    pub fn new(rx: &'a Mailbox<N>, tx: &'a Mailbox<N>) -> Self {
        Port {
            rx,
            tx,
            staged: tx.head.load(Ordering::Relaxed),
        }
    }

    /// Whether bytes wait to be read.
    pub fn readable(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Drops every byte waiting to be read (after a protocol error the
    /// stream is out of step).
    pub fn discard(&mut self) {
        self.rx
            .tail
            .store(self.rx.head.load(Ordering::Acquire), Ordering::Release);
    }
}

impl<const N: usize> ErrorType for Port<'_, N> {
    type Error = ErrorKind;
}

impl<const N: usize> Read for Port<'_, N> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        let tail = self.rx.tail.load(Ordering::Relaxed);
        let n = self.rx.len().min(buf.len());
        let mut pos = tail;
        for b in buf.iter_mut().take(n) {
            *b = self.rx.slot(pos).load(Ordering::Relaxed);
            pos = pos.wrapping_add(1);
        }
        self.rx.tail.store(pos, Ordering::Release);
        Ok(n)
    }
}

impl<const N: usize> Write for Port<'_, N> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        let used = self
            .staged
            .wrapping_sub(self.tx.tail.load(Ordering::Acquire)) as usize;
        if buf.len() > N - used.min(N) {
            return Err(ErrorKind::OutOfMemory);
        }
        for &b in buf {
            self.tx.slot(self.staged).store(b, Ordering::Relaxed);
            self.staged = self.staged.wrapping_add(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), ErrorKind> {
        self.tx.head.store(self.staged, Ordering::Release);
        Ok(())
    }
}

//! The back-end channel of a served connection: the socket SET_BACKEND_REQ_FD
//! handed over, with the core's [`Channel`] encoding the requests.
//!
//! Any thread may send: the control thread, a ring worker (in-band
//! BACKEND_VRING_CALL/ERR) or the daemon ([`Control::config_changed`]). A
//! lock serialises them, a request and its ack together. An ack that does
//! not come whole within the timeout, a request the front-end does not
//! take within it (each a deadline for the whole message, not for each
//! read or write), a failed send or a malformed
//! reply ends the **connection** (both directions of the main socket are
//! shut down, so the control thread sees the front-end gone and tears the
//! connection down); the daemon goes on and accepts the next front-end.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, error};
use vhost_user_core::backend::{Channel, ChannelError, Sent};
use vhost_user_core::message::{HEADER_SIZE, MAX_MESSAGE};

use crate::sys::socket::Stream;

/// Why a back-end request did not go through.
#[derive(Debug)]
pub enum ChannelFailure {
    /// No front-end is connected, or it gave no back-end channel.
    NoChannel,
    /// The request's feature was not negotiated (nothing was sent).
    NotNegotiated,
    /// The front-end failed the request with this ack value; the
    /// connection goes on.
    Failed(u64),
    /// The channel broke (socket error, no ack in time, a malformed
    /// reply); the connection was ended.
    Broken(io::Error),
}

impl std::fmt::Display for ChannelFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelFailure::NoChannel => f.write_str("no back-end channel"),
            ChannelFailure::NotNegotiated => f.write_str("not negotiated"),
            ChannelFailure::Failed(v) => write!(f, "the front-end failed the request ({v})"),
            ChannelFailure::Broken(e) => write!(f, "back-end channel broken: {e}"),
        }
    }
}

impl std::error::Error for ChannelFailure {}

/// One connection's back-end channel.
pub(crate) struct BackChannel {
    socket: Stream,
    /// The main socket, shut down when the channel breaks.
    main: Stream,
    /// The encoder; its lock is held across a request and its ack.
    channel: Mutex<Channel>,
    /// How long a request may take to be sent, and its ack to come.
    timeout: Duration,
}

impl BackChannel {
    pub(crate) fn new(
        socket: Stream,
        main: Stream,
        channel: Channel,
        timeout: Duration,
    ) -> io::Result<Self> {
        // The senders (ring workers with in-band calls, the daemon's
        // config changes) must not block for good on a front-end that
        // stops reading the channel, or acks a byte at a time: a worker
        // stuck in a send is never stopped, and GET_VRING_BASE and the
        // teardown after a disconnect wait for it. `send` gives each
        // request and each ack a deadline.
        Ok(BackChannel {
            socket,
            main,
            channel: Mutex::new(channel),
            timeout,
        })
    }

    /// Whether in-band calls and errors may be sent.
    pub(crate) fn in_band(&self) -> bool {
        self.lock().in_band()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Channel> {
        self.channel.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Encodes a request with `make`, sends it and waits for its ack if one
    /// is asked.
    pub(crate) fn send(
        &self,
        make: impl FnOnce(&mut Channel, &mut [u8]) -> Result<Sent, ChannelError>,
    ) -> Result<(), ChannelFailure> {
        let mut ch = self.lock();
        let mut buf = [0u8; MAX_MESSAGE];
        let sent = match make(&mut ch, &mut buf) {
            Ok(s) => s,
            Err(ChannelError::NotNegotiated(_)) => return Err(ChannelFailure::NotNegotiated),
            Err(e) => return Err(self.broken(&mut ch, io::Error::other(e))),
        };
        let deadline = Instant::now() + self.timeout;
        if let Err(e) = self.socket.send_message_by(&buf[..sent.len], &[], deadline) {
            let e = if e.kind() == io::ErrorKind::TimedOut {
                io::Error::new(io::ErrorKind::TimedOut, "the front-end does not read")
            } else {
                e
            };
            return Err(self.broken(&mut ch, e));
        }
        if !sent.awaits_reply {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let rx = match self.socket.recv_message_by(&mut buf, deadline) {
            Ok(Some(rx)) => rx,
            Ok(None) => {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "channel closed");
                return Err(self.broken(&mut ch, e));
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                let e = io::Error::new(io::ErrorKind::TimedOut, "no ack in time");
                return Err(self.broken(&mut ch, e));
            }
            Err(e) => return Err(self.broken(&mut ch, e)),
        };
        let payload = &buf[HEADER_SIZE..HEADER_SIZE + rx.payload_len];
        match ch.reply(&rx.header, payload, rx.fds.len()) {
            Ok(()) => Ok(()),
            Err(ChannelError::Failed(v)) => Err(ChannelFailure::Failed(v)),
            Err(e) => Err(self.broken(&mut ch, io::Error::other(e))),
        }
    }

    fn broken(&self, ch: &mut Channel, e: io::Error) -> ChannelFailure {
        error!("back-end channel: {e}; ending the connection");
        ch.abandon();
        let _ = self.socket.shutdown();
        let _ = self.main.shutdown();
        ChannelFailure::Broken(e)
    }
}

/// A handle on the connection being served, for other threads of the
/// daemon: see [`Control::config_changed`]. Clones share it.
#[derive(Clone, Default)]
pub struct Control {
    channel: Arc<Mutex<Option<Arc<BackChannel>>>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("channel", &self.current().is_some())
            .finish()
    }
}

impl Control {
    /// A handle with no connection behind it yet.
    pub fn new() -> Self {
        Control::default()
    }

    pub(crate) fn set(&self, channel: Option<Arc<BackChannel>>) {
        *self.channel.lock().unwrap_or_else(PoisonError::into_inner) = channel;
    }

    fn current(&self) -> Option<Arc<BackChannel>> {
        self.channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Tells the connected front-end that the device's config space changed
    /// (BACKEND_CONFIG_CHANGE_MSG; it reads the config again and, for a
    /// disk that grew, tells the guest). Waits for the ack when REPLY_ACK
    /// was negotiated.
    pub fn config_changed(&self) -> Result<(), ChannelFailure> {
        let ch = self.current().ok_or(ChannelFailure::NoChannel)?;
        let r = ch.send(|c, out| c.config_change(out));
        debug!("config change sent: {r:?}");
        r
    }
}

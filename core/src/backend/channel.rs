//! The back-end's end of the back-end channel (the socket the front-end
//! hands over with SET_BACKEND_REQ_FD): back-end requests encoded into the
//! caller's buffer, and the front-end's acks checked.
//!
//! A [`Channel`] is made by [`Session::channel`](super::Session::channel)
//! from what was negotiated. It refuses a request whose protocol feature
//! was not negotiated ([`ChannelError::NotNegotiated`]): CONFIG_CHANGE_MSG
//! needs CONFIG, the in-band VRING_CALL and VRING_ERR need
//! INBAND_NOTIFICATIONS. With REPLY_ACK negotiated every request asks for an
//! ack (NEED_REPLY) and the channel takes no other request until
//! [`Channel::reply`] has seen it, or [`Channel::abandon`] gave up on it
//! (the adapter waits with a timeout and ends the connection when the
//! front-end never answers). In-band notifications need REPLY_ACK (the
//! session refuses INBAND_NOTIFICATIONS without it), so a call or an error
//! is always acked: the sender knows the front-end took it before it goes
//! on.

use core::fmt;

use crate::feature::ProtocolFeatures;
use crate::message::{BackendReq, BackendRequest, Header, WireError};

/// Why the channel refused a request or a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ChannelError {
    /// The request's protocol feature was not negotiated.
    NotNegotiated(BackendReq),
    /// A request was sent while the previous one still waits for its ack.
    Busy,
    /// A reply arrived while none was awaited.
    Unexpected,
    /// The reply is malformed or answers another request.
    Wire(WireError),
    /// The front-end answered with this failure value (non-zero).
    Failed(u64),
}

impl From<WireError> for ChannelError {
    fn from(e: WireError) -> Self {
        ChannelError::Wire(e)
    }
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelError::NotNegotiated(c) => write!(f, "{} without its feature", c.name()),
            ChannelError::Busy => f.write_str("the previous request still waits for its ack"),
            ChannelError::Unexpected => f.write_str("a reply that no request awaits"),
            ChannelError::Wire(e) => write!(f, "malformed reply: {e}"),
            ChannelError::Failed(v) => write!(f, "the front-end failed the request ({v})"),
        }
    }
}

impl core::error::Error for ChannelError {}

/// An encoded back-end request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Bytes of the caller's buffer to send.
    pub len: usize,
    /// The request asked for an ack: read the reply and pass it to
    /// [`Channel::reply`] before sending anything else.
    pub awaits_reply: bool,
}

/// The back-end's end of the back-end channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel {
    protocol: ProtocolFeatures,
    awaiting: Option<BackendReq>,
}

impl Channel {
    /// A channel for a session that negotiated `protocol`.
    pub fn new(protocol: ProtocolFeatures) -> Self {
        Channel {
            protocol,
            awaiting: None,
        }
    }

    /// Whether in-band notifications (BACKEND_VRING_CALL/ERR) may be sent.
    pub fn in_band(&self) -> bool {
        self.protocol
            .contains(ProtocolFeatures::INBAND_NOTIFICATIONS)
    }

    /// The request whose ack is awaited.
    pub fn awaiting(&self) -> Option<BackendReq> {
        self.awaiting
    }

    /// Encodes `req` into `out` (CONFIG_CHANGE_MSG, BACKEND_VRING_CALL and
    /// BACKEND_VRING_ERR; this engine sends no other).
    pub fn request(&mut self, req: &BackendRequest, out: &mut [u8]) -> Result<Sent, ChannelError> {
        match *req {
            BackendRequest::ConfigChange => self.send(BackendReq::ConfigChangeMsg, None, out),
            BackendRequest::VringCall(q) => self.send(BackendReq::VringCall, Some(q), out),
            BackendRequest::VringErr(q) => self.send(BackendReq::VringErr, Some(q), out),
            _ => Err(ChannelError::NotNegotiated(req.code())),
        }
    }

    /// CONFIG_CHANGE_MSG: the device's config space changed.
    pub fn config_change(&mut self, out: &mut [u8]) -> Result<Sent, ChannelError> {
        self.send(BackendReq::ConfigChangeMsg, None, out)
    }

    /// In-band BACKEND_VRING_CALL for ring `queue`.
    pub fn vring_call(&mut self, queue: u16, out: &mut [u8]) -> Result<Sent, ChannelError> {
        self.send(BackendReq::VringCall, Some(queue.into()), out)
    }

    /// In-band BACKEND_VRING_ERR for ring `queue`.
    pub fn vring_err(&mut self, queue: u16, out: &mut [u8]) -> Result<Sent, ChannelError> {
        self.send(BackendReq::VringErr, Some(queue.into()), out)
    }

    fn send(
        &mut self,
        code: BackendReq,
        ring: Option<u32>,
        out: &mut [u8],
    ) -> Result<Sent, ChannelError> {
        let needs = match ring {
            None => ProtocolFeatures::CONFIG,
            Some(_) => ProtocolFeatures::INBAND_NOTIFICATIONS,
        };
        if !self.protocol.contains(needs) {
            return Err(ChannelError::NotNegotiated(code));
        }
        if self.awaiting.is_some() {
            return Err(ChannelError::Busy);
        }
        let awaits_reply = self.protocol.contains(ProtocolFeatures::REPLY_ACK);
        let len = match ring {
            None => BackendRequest::encode_empty(code, awaits_reply, out)?,
            Some(q) => BackendRequest::encode_ring(code, q, awaits_reply, out)?,
        };
        if awaits_reply {
            self.awaiting = Some(code);
        }
        Ok(Sent { len, awaits_reply })
    }

    /// Checks the front-end's reply (header, payload, number of fds) to the
    /// awaited request. The channel is free again whatever the outcome.
    pub fn reply(
        &mut self,
        header: &Header,
        payload: &[u8],
        nfds: usize,
    ) -> Result<(), ChannelError> {
        let code = self.awaiting.take().ok_or(ChannelError::Unexpected)?;
        match BackendRequest::parse_reply(code, header, payload, nfds)? {
            0 => Ok(()),
            v => Err(ChannelError::Failed(v)),
        }
    }

    /// Gives up on the awaited ack (the adapter's timeout ran out; it ends
    /// the connection).
    pub fn abandon(&mut self) {
        self.awaiting = None;
    }
}

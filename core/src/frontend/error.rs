use core::fmt;

use crate::message::{FrontendReq, WireError};

use super::State;

/// Why the front-end engine refused a command or a reply.
///
/// Two kinds: **command errors** ([`Busy`](Self::Busy),
/// [`WrongState`](Self::WrongState), [`NotNegotiated`](Self::NotNegotiated),
/// the configuration errors, and [`WireError::BufferTooSmall`] from
/// `poll_transmit`) leave the engine as it was; **reply errors** (every
/// other variant, returned by `handle_reply`) are fatal: the engine enters
/// [`State::Failed`] and the adapter closes the connection, but for
/// [`StateRefused`](Self::StateRefused), a well-formed answer that ends
/// its flow and leaves the session going ([`is_fatal`](Self::is_fatal)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum FrontendError {
    /// A malformed reply: bad flags (not exactly `VERSION | REPLY`), another
    /// request id, a size or fd count the request does not allow, or (from
    /// `poll_transmit`) an output buffer that is too small.
    Wire(WireError),
    /// A reply arrived while none was awaited (the header's request id).
    UnexpectedReply {
        /// Request id of the reply.
        request: u32,
    },
    /// A well-formed reply of a kind this engine never asks for (e.g. a
    /// postcopy ADD_MEM_REG reply).
    UnexpectedPayload(FrontendReq),
    /// The back-end refused SET_DEVICE_STATE_FD (the error bits of its
    /// reply) or answered CHECK_DEVICE_STATE with a non-zero value: the
    /// device state did not move whole. Not fatal: the transfer's flow
    /// ends and the session goes on as it was, so a source whose state
    /// could not be saved keeps its device (and starts it again, as a
    /// VMM does after a failed migration), and a destination can try
    /// another state or drop the connection.
    StateRefused {
        /// SET_DEVICE_STATE_FD or CHECK_DEVICE_STATE.
        request: FrontendReq,
        /// The reply's error bits (SET_DEVICE_STATE_FD) or its value.
        value: u64,
    },
    /// The back-end answered a REPLY_ACK with a non-zero value.
    Nack {
        /// The refused request.
        request: FrontendReq,
        /// The ack value.
        value: u64,
    },
    /// The second GET_FEATURES of the init answered other features than the
    /// first.
    FeaturesChanged {
        /// First answer.
        before: u64,
        /// Second answer.
        after: u64,
    },
    /// GET_QUEUE_NUM answered fewer queues than configured.
    TooFewQueues {
        /// Queues configured.
        needed: u16,
        /// Queues the back-end has.
        offered: u64,
    },
    /// GET_VRING_BASE answered for another ring than the one asked.
    WrongRing {
        /// Ring asked.
        expected: u16,
        /// Ring in the reply.
        got: u32,
    },
    /// GET_VRING_BASE answered a base that cannot belong to the ring (split:
    /// reserved bits 16-31 set; packed: an index not below the ring size).
    BadBase {
        /// Ring.
        queue: u16,
        /// The base.
        base: u32,
    },
    /// GET_CONFIG answered another range than the one asked.
    ConfigMismatch {
        /// Offset in the reply.
        offset: u32,
        /// Length in the reply.
        len: u32,
    },
    /// A command while another flow (init, start, stop, memory update,
    /// config read) is still running.
    Busy,
    /// A command that the current state does not allow (e.g. `stop` before
    /// `start`).
    WrongState(State),
    /// A command that needs a protocol feature that was not negotiated (the
    /// request it would send).
    NotNegotiated(FrontendReq),
    /// More memory regions than the back-end accepts: 8 for SET_MEM_TABLE,
    /// GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS.
    TooManyRegions {
        /// Regions configured.
        regions: usize,
        /// The limit.
        limit: u64,
    },
    /// `start` without a memory region.
    NoRegions,
    /// `start` without a queue.
    NoQueues,
    /// A queue configuration is invalid (size 0 or above 32768, or more
    /// than 256 queues): the queue index.
    BadQueue(usize),
    /// A memory region is invalid (empty, overflowing, overlapping another,
    /// or carrying Xen fields): its index.
    BadRegion(usize),
    /// Protocol features this engine does not implement were configured
    /// (the bits).
    Unsupported(u64),
    /// `read_config` of an empty range or one past the 256-byte config
    /// space (nothing is sent; the session goes on).
    BadConfigRange {
        /// Offset asked for.
        offset: u32,
        /// Length asked for.
        len: u32,
    },
    /// `start_logging`: the back-end did not offer VHOST_F_LOG_ALL.
    LogAllNotOffered,
    /// `start_logging` with a log, or `set_memory` while logging with
    /// regions, that the log does not cover.
    LogTooSmall {
        /// The log's size in bytes.
        size: u64,
        /// Bytes needed ([`log_size`](super::log_size) of the regions).
        needed: u64,
    },
    /// `start_logging` while logging is on.
    AlreadyLogging,
    /// `stop_logging` while logging is off.
    NotLogging,
    /// The session failed earlier; only a new connection helps.
    Failed,
}

impl FrontendError {
    /// Whether the error ended the session ([`State::Failed`]).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            FrontendError::Wire(WireError::BufferTooSmall { .. })
                | FrontendError::Busy
                | FrontendError::WrongState(_)
                | FrontendError::NotNegotiated(_)
                | FrontendError::TooManyRegions { .. }
                | FrontendError::NoRegions
                | FrontendError::NoQueues
                | FrontendError::BadQueue(_)
                | FrontendError::BadRegion(_)
                | FrontendError::Unsupported(_)
                | FrontendError::BadConfigRange { .. }
                | FrontendError::LogAllNotOffered
                | FrontendError::LogTooSmall { .. }
                | FrontendError::AlreadyLogging
                | FrontendError::NotLogging
                | FrontendError::StateRefused { .. }
        )
    }
}

impl From<WireError> for FrontendError {
    fn from(e: WireError) -> Self {
        FrontendError::Wire(e)
    }
}

impl fmt::Display for FrontendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FrontendError::Wire(e) => write!(f, "malformed reply: {e}"),
            FrontendError::UnexpectedReply { request } => {
                write!(f, "reply to request {request} while none was awaited")
            }
            FrontendError::UnexpectedPayload(r) => write!(f, "unexpected kind of reply to {r}"),
            FrontendError::StateRefused { request, value } => {
                write!(
                    f,
                    "back-end refused {request} (value {value}): the device state did not move"
                )
            }
            FrontendError::Nack { request, value } => {
                write!(f, "back-end refused {request} (ack value {value})")
            }
            FrontendError::FeaturesChanged { before, after } => {
                write!(f, "offered features changed from {before:#x} to {after:#x}")
            }
            FrontendError::TooFewQueues { needed, offered } => {
                write!(f, "back-end has {offered} queues, {needed} needed")
            }
            FrontendError::WrongRing { expected, got } => {
                write!(
                    f,
                    "GET_VRING_BASE reply for ring {got}, ring {expected} asked"
                )
            }
            FrontendError::BadBase { queue, base } => {
                write!(f, "invalid base {base:#x} for ring {queue}")
            }
            FrontendError::ConfigMismatch { offset, len } => {
                write!(
                    f,
                    "GET_CONFIG reply for {offset}+{len}, not the range asked"
                )
            }
            FrontendError::Busy => f.write_str("another operation is running"),
            FrontendError::WrongState(s) => write!(f, "not allowed in state {s:?}"),
            FrontendError::NotNegotiated(r) => write!(f, "{r} needs a feature not negotiated"),
            FrontendError::TooManyRegions { regions, limit } => {
                write!(f, "{regions} memory regions, at most {limit} accepted")
            }
            FrontendError::NoRegions => f.write_str("no memory region configured"),
            FrontendError::NoQueues => f.write_str("no queue configured"),
            FrontendError::BadQueue(i) => write!(f, "invalid configuration of queue {i}"),
            FrontendError::BadRegion(i) => write!(f, "invalid memory region {i}"),
            FrontendError::Unsupported(bits) => {
                write!(f, "protocol features {bits:#x} not implemented")
            }
            FrontendError::BadConfigRange { offset, len } => {
                write!(f, "config range {offset}+{len} outside the config space")
            }
            FrontendError::LogAllNotOffered => {
                f.write_str("the back-end does not offer VHOST_F_LOG_ALL")
            }
            FrontendError::LogTooSmall { size, needed } => {
                write!(f, "dirty log of {size} bytes, {needed} needed")
            }
            FrontendError::AlreadyLogging => f.write_str("dirty logging is already on"),
            FrontendError::NotLogging => f.write_str("dirty logging is off"),
            FrontendError::Failed => f.write_str("the session failed earlier"),
        }
    }
}

impl core::error::Error for FrontendError {}

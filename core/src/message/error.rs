use core::fmt;

/// Everything that can be wrong with a message on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the header or payload needs.
    Truncated {
        /// Bytes needed.
        needed: u16,
        /// Bytes present (at most `u16::MAX`).
        got: u16,
    },
    /// Version bits other than 1.
    BadVersion(u8),
    /// Reserved header flag bits set (the whole flags word).
    ReservedFlags(u32),
    /// A request carried the REPLY bit.
    ReplyBitOnRequest,
    /// A reply's flags were not exactly `VERSION | REPLY`.
    BadReplyFlags(u32),
    /// A reply carried another request id than the one it answers.
    ReplyMismatch {
        /// The id of the request that was sent (at most `u16::MAX`).
        expected: u16,
        /// The id in the reply (at most `u16::MAX`).
        got: u16,
    },
    /// Request id 0 or an id this channel does not define.
    UnknownRequest(u32),
    /// Payload size above [`MAX_PAYLOAD`](super::MAX_PAYLOAD).
    PayloadTooLarge(u32),
    /// Payload size not allowed for this request id.
    BadSize {
        /// Request id (at most `u16::MAX`).
        request: u16,
        /// Payload size received (at most `u16::MAX`).
        size: u16,
    },
    /// More file descriptors than the message allows.
    TooManyFds {
        /// Most allowed.
        allowed: u8,
        /// Received.
        got: u8,
    },
    /// Fewer file descriptors than the message needs.
    MissingFds {
        /// Needed.
        needed: u8,
        /// Received.
        got: u8,
    },
    /// SET_MEM_TABLE with 0 or more than 8 regions.
    BadRegionCount(u32),
    /// A region of size 0.
    EmptyRegion,
    /// A region, log, IOTLB or shared-memory range whose end overflows u64.
    RangeOverflow,
    /// A ring index at or above the limit (at most `u32::MAX`; a larger
    /// one is logged in full).
    QueueIndex(u32),
    /// Reserved bits set in a payload field (the field's value, at most
    /// `u32::MAX`; a larger one is logged in full).
    ReservedBits(u32),
    /// A field outside its defined values (the value, at most `u32::MAX`;
    /// a larger one is logged in full).
    BadValue(u32),
    /// A config access outside the 256-byte config space.
    ConfigRange {
        /// Offset (at most `u16::MAX`).
        offset: u16,
        /// Size (at most `u16::MAX`).
        size: u16,
    },
    /// The output buffer is too small; this many bytes are needed.
    BufferTooSmall {
        /// Bytes needed.
        needed: u32,
    },
}

// No payload wider than 32 bits: a Result of a parser stays small to move,
// and so does every error that wraps this one.
const _: () = assert!(core::mem::size_of::<WireError>() <= 8);

impl WireError {
    /// The value a REPLY_ACK carries for this error (non-zero = failure).
    pub fn ack_value(&self) -> u64 {
        1
    }

    /// [`QueueIndex`](Self::QueueIndex) of a 64-bit field.
    pub(crate) fn queue_index(index: u64) -> WireError {
        debug!("ring index {} out of range", index);
        WireError::QueueIndex(sat32(index))
    }

    /// [`ReservedBits`](Self::ReservedBits) of a 64-bit field.
    pub(crate) fn reserved_bits(value: u64) -> WireError {
        debug!("reserved bits set in {:#x}", value);
        WireError::ReservedBits(sat32(value))
    }

    /// [`BadValue`](Self::BadValue) of a 64-bit field.
    pub(crate) fn bad_value(value: u64) -> WireError {
        debug!("invalid field value {}", value);
        WireError::BadValue(sat32(value))
    }
}

/// `v`, or `u32::MAX` if it does not fit.
fn sat32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// `v`, or `u16::MAX` if it does not fit (sizes and ids in errors).
pub(crate) fn sat16(v: impl TryInto<u16>) -> u16 {
    v.try_into().unwrap_or(u16::MAX)
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WireError::Truncated { needed, got } => {
                write!(f, "truncated message: {got} of {needed} bytes")
            }
            WireError::BadVersion(v) => write!(f, "unsupported protocol version {v}"),
            WireError::ReservedFlags(v) => write!(f, "reserved header flags set: {v:#x}"),
            WireError::ReplyBitOnRequest => write!(f, "REPLY flag set on a request"),
            WireError::BadReplyFlags(v) => write!(f, "reply flags {v:#x}, expected 0x5"),
            WireError::ReplyMismatch { expected, got } => {
                write!(f, "reply to request {got}, expected {expected}")
            }
            WireError::UnknownRequest(id) => write!(f, "unknown request id {id}"),
            WireError::PayloadTooLarge(s) => write!(f, "payload of {s} bytes exceeds the cap"),
            WireError::BadSize { request, size } => {
                write!(f, "payload size {size} not valid for request {request}")
            }
            WireError::TooManyFds { allowed, got } => {
                write!(f, "{got} file descriptors, at most {allowed} allowed")
            }
            WireError::MissingFds { needed, got } => {
                write!(f, "{got} file descriptors, {needed} needed")
            }
            WireError::BadRegionCount(n) => write!(f, "invalid memory region count {n}"),
            WireError::EmptyRegion => write!(f, "memory region of size 0"),
            WireError::RangeOverflow => write!(f, "address range overflows"),
            WireError::QueueIndex(i) => write!(f, "ring index {i} out of range"),
            WireError::ReservedBits(v) => write!(f, "reserved bits set in {v:#x}"),
            WireError::BadValue(v) => write!(f, "invalid field value {v}"),
            WireError::ConfigRange { offset, size } => {
                write!(
                    f,
                    "config access at {offset}+{size} outside the config space"
                )
            }
            WireError::BufferTooSmall { needed } => {
                write!(f, "output buffer too small, {needed} bytes needed")
            }
        }
    }
}

impl core::error::Error for WireError {}

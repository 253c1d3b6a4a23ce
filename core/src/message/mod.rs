//! The vhost-user wire format: the 12-byte header, the request codes of both
//! channels, a raw `zerocopy` struct for every payload ([`raw`]), typed and
//! validated views of every request and reply ([`Request`], [`Reply`],
//! [`BackendRequest`]), and encoding into caller-provided buffers.
//!
//! Parsing never trusts the peer: the header's version, reserved bits and
//! size are checked first, then the payload size is checked against the rule
//! of its request id, then every field that has a valid range is checked. The
//! number of file descriptors that arrived with the message is checked too;
//! the caller closes them all when parsing fails.

pub mod raw;

/// Declares a channel's request codes: a `#[repr(u32)]` enum, its name table,
/// and a checked conversion from the wire id (never a transmute).
macro_rules! request_codes {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $id:literal => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[cfg_attr(feature = "defmt", derive(defmt::Format))]
        #[repr(u32)]
        pub enum $name {
            $($(#[$vm])* $v = $id,)*
        }

        impl $name {
            /// Every code of this channel, in id order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];

            /// The id on the wire.
            pub const fn id(self) -> u32 {
                self as u32
            }

            /// The name used in the specification, without the `VHOST_USER_` prefix.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$v => $s,)*
                }
            }
        }

        impl TryFrom<u32> for $name {
            type Error = WireError;

            fn try_from(id: u32) -> Result<Self, WireError> {
                match id {
                    $($id => Ok($name::$v),)*
                    _ => Err(WireError::UnknownRequest(id)),
                }
            }
        }

        impl From<$name> for u32 {
            fn from(code: $name) -> u32 {
                code.id()
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

mod backend;
mod error;
mod reply;
mod request;

pub use backend::{BackendReq, BackendRequest, VringAreaMsg};
use error::sat16;
pub use error::WireError;
pub use reply::Reply;
pub use request::{
    ConfigMsg, ConfigWriteKind, DeviceStateDirection, Endian, FrontendReq, InflightMsg, IotlbKind,
    IotlbMsg, IotlbPerm, LogMsg, MemRegionMsg, MemTable, Request, ShmemMapMsg, VringAddrMsg,
    VringFdMsg, VringStateMsg,
};

use bitflags::bitflags;
use zerocopy::FromBytes;

/// Size of the message header.
pub const HEADER_SIZE: usize = 12;
/// The only protocol version.
pub const VERSION: u32 = 1;
/// Largest payload we accept or produce. The biggest defined payload is the
/// 2056-byte GET_SHMEM_CONFIG reply.
pub const MAX_PAYLOAD: usize = 4096;
/// Largest message (header and payload).
pub const MAX_MESSAGE: usize = HEADER_SIZE + MAX_PAYLOAD;
/// Most file descriptors any message may carry.
pub const MAX_FDS: usize = 8;
/// Most regions in one SET_MEM_TABLE.
pub const MAX_MEM_REGIONS: usize = 8;
/// Size of the device config space that GET/SET_CONFIG may address.
pub const MAX_CONFIG_SIZE: u32 = 256;
/// Ring indices are limited to what the u8 index of SET_VRING_KICK/CALL/ERR
/// can name.
pub const MAX_QUEUES: u32 = 256;

bitflags! {
    /// Header flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct HeaderFlags: u32 {
        /// Protocol version 1 (bits 0-1 hold the version).
        const VERSION_1 = 0x1;
        /// The message is a reply.
        const REPLY = 0x4;
        /// The sender asks for a REPLY_ACK.
        const NEED_REPLY = 0x8;
    }
}

const VERSION_MASK: u32 = 0x3;
const RESERVED_FLAGS: u32 = !0xf;

/// The flags every reply carries, exactly.
pub const REPLY_FLAGS: u32 = VERSION | HeaderFlags::REPLY.bits();

/// A validated message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Request id (validated against a channel's codes when the payload is
    /// parsed).
    pub request: u32,
    /// The flags.
    pub flags: HeaderFlags,
    /// Payload size, at most [`MAX_PAYLOAD`].
    pub size: u32,
}

impl Header {
    /// Parses and validates a header: version 1, no reserved bits, size at
    /// most [`MAX_PAYLOAD`]. Returns [`WireError::Truncated`] if `bytes` is
    /// shorter than [`HEADER_SIZE`].
    pub fn parse(bytes: &[u8]) -> Result<Header, WireError> {
        let (raw, _) = raw::Header::read_from_prefix(bytes).map_err(|_| WireError::Truncated {
            needed: HEADER_SIZE as u16,
            got: sat16(bytes.len()),
        })?;
        let flags = raw.flags.get();
        if flags & VERSION_MASK != VERSION {
            return Err(WireError::BadVersion((flags & VERSION_MASK) as u8));
        }
        if flags & RESERVED_FLAGS != 0 {
            return Err(WireError::ReservedFlags(flags));
        }
        let size = raw.size.get();
        if size as usize > MAX_PAYLOAD {
            return Err(WireError::PayloadTooLarge(size));
        }
        Ok(Header {
            request: raw.request.get(),
            flags: HeaderFlags::from_bits_retain(flags),
            size,
        })
    }

    /// A request header (never with REPLY), asking for an ack if `need_reply`.
    pub fn request(request: u32, size: u32, need_reply: bool) -> Header {
        let mut flags = HeaderFlags::VERSION_1;
        flags.set(HeaderFlags::NEED_REPLY, need_reply);
        Header {
            request,
            flags,
            size,
        }
    }

    /// A reply header: flags exactly `VERSION | REPLY`.
    pub fn reply(request: u32, size: u32) -> Header {
        Header {
            request,
            flags: HeaderFlags::VERSION_1 | HeaderFlags::REPLY,
            size,
        }
    }

    /// Whether the REPLY bit is set.
    pub fn is_reply(&self) -> bool {
        self.flags.contains(HeaderFlags::REPLY)
    }

    /// Whether the sender asks for a REPLY_ACK.
    pub fn need_reply(&self) -> bool {
        self.flags.contains(HeaderFlags::NEED_REPLY)
    }

    /// Checks that this header may start a request: no REPLY bit.
    pub fn check_request(&self) -> Result<(), WireError> {
        if self.is_reply() {
            return Err(WireError::ReplyBitOnRequest);
        }
        Ok(())
    }

    /// Checks that this header is a reply to `request`: same id, flags exactly
    /// `VERSION | REPLY`.
    pub fn check_reply_to(&self, request: u32) -> Result<(), WireError> {
        if self.flags.bits() != REPLY_FLAGS {
            return Err(WireError::BadReplyFlags(self.flags.bits()));
        }
        if self.request != request {
            return Err(WireError::ReplyMismatch {
                expected: sat16(request),
                got: sat16(self.request),
            });
        }
        Ok(())
    }

    /// Writes the header into the first [`HEADER_SIZE`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<(), WireError> {
        let raw = raw::Header {
            request: self.request.into(),
            flags: self.flags.bits().into(),
            size: self.size.into(),
        };
        put(out, 0, zerocopy::IntoBytes::as_bytes(&raw))
    }
}

/// How many file descriptors a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdRule {
    /// At least this many.
    pub min: u8,
    /// At most this many.
    pub max: u8,
}

impl FdRule {
    /// No fds.
    pub const NONE: FdRule = FdRule::exactly(0);
    /// Exactly one fd.
    pub const ONE: FdRule = FdRule::exactly(1);
    /// Zero or one fd.
    pub const OPTIONAL: FdRule = FdRule { min: 0, max: 1 };

    /// Exactly `n` fds.
    pub const fn exactly(n: u8) -> FdRule {
        FdRule { min: n, max: n }
    }

    /// Checks a count of received fds against the rule.
    pub fn check(self, nfds: usize) -> Result<(), WireError> {
        if nfds > self.max as usize {
            return Err(WireError::TooManyFds {
                allowed: self.max,
                got: nfds.min(255) as u8,
            });
        }
        if nfds < self.min as usize {
            return Err(WireError::MissingFds {
                needed: self.min,
                got: nfds as u8,
            });
        }
        Ok(())
    }
}

/// Parameters of parsing that depend on the session, not on the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseOptions {
    /// Ring indices must be below this (at most [`MAX_QUEUES`]).
    pub max_queues: u32,
    /// XEN_MMAP was negotiated: memory regions carry the Xen fields.
    pub xen_mmap: bool,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            max_queues: MAX_QUEUES,
            xen_mmap: false,
        }
    }
}

impl ParseOptions {
    pub(crate) fn check_queue(&self, index: u64) -> Result<u32, WireError> {
        if index >= u64::from(self.max_queues.min(MAX_QUEUES)) {
            return Err(WireError::queue_index(index));
        }
        Ok(index as u32)
    }
}

/// Writes `bytes` at `at` in `out`, or reports how much room was needed.
pub(crate) fn put(out: &mut [u8], at: usize, bytes: &[u8]) -> Result<(), WireError> {
    let end = at + bytes.len();
    match out.get_mut(at..end) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            Ok(())
        }
        None => Err(WireError::BufferTooSmall { needed: end as u32 }),
    }
}

/// Reads a fixed-size payload struct, requiring the payload to be exactly its
/// size.
pub(crate) fn exact<T: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable>(
    request: u32,
    payload: &[u8],
) -> Result<&T, WireError> {
    T::ref_from_bytes(payload).map_err(|_| WireError::BadSize {
        request: sat16(request),
        size: sat16(payload.len()),
    })
}

/// Checks that a payload is empty.
pub(crate) fn empty(request: u32, payload: &[u8]) -> Result<(), WireError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(WireError::BadSize {
            request: sat16(request),
            size: sat16(payload.len()),
        })
    }
}

#[cfg(test)]
mod tests;

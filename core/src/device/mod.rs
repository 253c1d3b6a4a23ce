//! Device models: the request formats of the virtio devices the examples
//! serve, as pure planners over a descriptor chain.
//!
//! A device model never touches guest memory directly. The vring engine
//! hands it the popped chain as a slice of [`Segment`]s (any type that
//! converts into one), and guest memory through the two tiny traits
//! [`ReadGuest`] and [`WriteGuest`], which every
//! `Fn(u64, &mut [u8]) -> Result<(), E>` / `Fn(u64, &[u8]) -> Result<(), E>`
//! closure implements:
//!
//! ```
//! use vhost_user_core::device::{ReadGuest, Segment};
//!
//! let guest = [7u8; 64];
//! let read = |gpa: u64, dst: &mut [u8]| -> Result<(), ()> {
//!     let start = usize::try_from(gpa).map_err(|_| ())?;
//!     let src = guest.get(start..start + dst.len()).ok_or(())?;
//!     dst.copy_from_slice(src);
//!     Ok(())
//! };
//! let mut b = [0u8; 4];
//! read.read(60, &mut b).unwrap();
//! assert_eq!(b, [7; 4]);
//! assert!(read.read(62, &mut b).is_err());
//! # let _ = Segment { addr: 0, len: 1, writable: true };
//! ```
//!
//! - [`blk`]: virtio-blk (feature bits, config space, request planner).

pub mod blk;

/// One buffer of a descriptor chain, in guest physical memory.
///
/// The same three fields as the vring engine's segment, so converting is a
/// field-by-field copy (`From` in either direction is trivial to write).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Segment {
    /// Guest physical address of the first byte.
    pub addr: u64,
    /// Length in bytes. Zero-length segments are ignored by the planners.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

impl Segment {
    /// A device-readable segment.
    pub const fn readable(addr: u64, len: u32) -> Self {
        Segment {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable segment.
    pub const fn writable(addr: u64, len: u32) -> Self {
        Segment {
            addr,
            len,
            writable: true,
        }
    }
}

/// Copy bytes out of guest memory.
///
/// Implemented by every `Fn(u64, &mut [u8]) -> Result<(), E>` closure, so a
/// caller holding a guest memory object passes
/// `|gpa, dst: &mut [u8]| mem.read(gpa, dst)`.
pub trait ReadGuest {
    /// Why an access failed (for example: the range is not mapped).
    type Error;

    /// Copy `dst.len()` bytes at guest physical address `gpa` into `dst`.
    /// Must fail, not panic, on any range it cannot serve.
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), Self::Error>;
}

impl<F, E> ReadGuest for F
where
    F: Fn(u64, &mut [u8]) -> Result<(), E>,
{
    type Error = E;

    #[inline]
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), E> {
        self(gpa, dst)
    }
}

/// Copy bytes into guest memory.
///
/// Implemented by every `Fn(u64, &[u8]) -> Result<(), E>` closure.
pub trait WriteGuest {
    /// Why an access failed.
    type Error;

    /// Copy `src` to guest physical address `gpa`. Must fail, not panic, on
    /// any range it cannot serve.
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), Self::Error>;
}

impl<F, E> WriteGuest for F
where
    F: Fn(u64, &[u8]) -> Result<(), E>,
{
    type Error = E;

    #[inline]
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), E> {
        self(gpa, src)
    }
}

impl From<crate::vring::Segment> for Segment {
    #[inline]
    fn from(s: crate::vring::Segment) -> Self {
        Segment {
            addr: s.addr,
            len: s.len,
            writable: s.writable,
        }
    }
}

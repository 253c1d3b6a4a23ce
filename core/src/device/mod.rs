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
//! - [`net`]: virtio-net (feature bits, config space, header, transmit
//!   gathering and receive filling).
//!
//! A back-end device implements [`Device`]: the control path the session
//! calls (config space, features, reset) and the data path the host's ring
//! loop calls with each request the [`DataPlane`](crate::dataplane::DataPlane)
//! hands out.

pub mod blk;
pub mod net;

use crate::dataplane::Token;
use crate::feature::VirtioFeatures;
use crate::memory::GuestMemory;
use crate::message::ConfigWriteKind;
use crate::vring::Chain;

/// How a request ended when [`Device::process`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Completion {
    /// Done: this many bytes were written into the chain. The caller
    /// completes the token.
    Done(u32),
    /// Still in progress: the device kept the token and reports the
    /// completion later through [`Device::poll`], in any order.
    Later,
}

/// A virtio device served by a vhost-user back-end.
///
/// The control methods take `&mut self` (the session calls them, one
/// message at a time); the data path takes `&self` and per-ring scratch
/// state, so a host may run rings on several threads over one shared
/// device (the Linux adapter shares `Clone` handles) or on one loop (a
/// bare-metal host). Nothing here needs `std` or an allocator.
pub trait Device {
    /// Per-ring state of the data path (request planning buffers, requests
    /// in progress); created when a ring starts.
    type Scratch: Default;

    /// Reads `dst.len()` bytes of config space at `offset`; `false` if the
    /// range is outside the device's config space.
    fn read_config(&self, offset: u32, dst: &mut [u8]) -> bool;

    /// Writes config space; `false` if refused (a read-only field, or a
    /// range outside the config space).
    fn write_config(&mut self, offset: u32, src: &[u8], kind: ConfigWriteKind) -> bool;

    /// SET_FEATURES was accepted: these are the negotiated features.
    fn features_acked(&mut self, features: VirtioFeatures) {
        let _ = features;
    }

    /// The device was reset (RESET_DEVICE): drop device state.
    fn reset(&mut self) {}

    /// Whether a started but disabled ring is consumed (each request
    /// handed out with [`Token::side_effects`] false, e.g. a network
    /// device dropping TX) rather than paused until it is enabled. The
    /// default, false, suits storage.
    fn consume_while_disabled(&self) -> bool {
        false
    }

    /// Processes one request of ring `queue`: `chain` is its validated
    /// descriptor chain (guest memory is accessed through `mem`, which
    /// checks every access), `token` identifies it. Returns
    /// [`Completion::Done`] with the bytes written, or
    /// [`Completion::Later`] if the device keeps the token and completes
    /// it through [`poll`](Self::poll). A request whose token has no side
    /// effects must not touch guest memory or storage.
    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        queue: u16,
        chain: &Chain<S>,
        token: Token,
        mem: &M,
        scratch: &mut Self::Scratch,
    ) -> Completion;

    /// Reports requests of ring `queue` that completed since the last
    /// call, as `(token, bytes written)`, in any order. Called by the
    /// host's ring loop after each round and while a stop drains. The
    /// default reports nothing (every request completes in `process`).
    fn poll<M: GuestMemory + ?Sized>(
        &self,
        queue: u16,
        mem: &M,
        scratch: &mut Self::Scratch,
        done: &mut dyn FnMut(Token, u32),
    ) {
        let _ = (queue, mem, scratch, done);
    }

    /// Ring `queue` is stopping and drains (GET_VRING_BASE, the
    /// front-end left): requests the device holds only because it waits
    /// for input that may never come (a network device's receive buffers
    /// with no frame for them) must complete at the next
    /// [`poll`](Self::poll), with what there is or with length 0. Called
    /// by the host before each poll of the drain. The default does
    /// nothing (every held request completes on its own).
    fn stopping(&self, queue: u16, scratch: &mut Self::Scratch) {
        let _ = (queue, scratch);
    }

    /// The front-end left (log counters, drop per-connection state).
    fn disconnected(&self) {}

    /// NET_SET_MTU (the `net` feature): the front-end tells the MTU it
    /// advertises to the driver, already checked by the session to be
    /// 68 to 65535. Returns whether the device takes it (a value above
    /// what it can carry is refused: a failed ack). The default refuses:
    /// a device that offers the MTU protocol feature implements this.
    #[cfg(feature = "net")]
    fn set_mtu(&mut self, mtu: u16) -> bool {
        let _ = mtu;
        false
    }

    /// SEND_RARP (the `net` feature): announce `mac` on the device's
    /// network (a gratuitous RARP; the guest lacks GUEST_ANNOUNCE and has
    /// just moved). Returns whether the device takes the request; a frame
    /// that could not be sent is the device's to log and count, not the
    /// front-end's concern. The default refuses: a device that offers the
    /// RARP protocol feature implements this.
    #[cfg(feature = "net")]
    fn send_rarp(&mut self, mac: [u8; 6]) -> bool {
        let _ = mac;
        false
    }
}

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

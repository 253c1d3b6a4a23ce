//! The vring engine: the per-ring state machine ([`state`]), split rings
//! ([`split`]) and packed rings ([`packed`]), descriptor-chain walking and
//! used-ring updates with notification suppression.
//!
//! A queue is a plain value; every method that touches the ring takes the
//! guest memory (`&impl GuestMemory`) per call. The engine copies each
//! descriptor out of guest memory exactly once, validates the copy, and
//! only then uses it: a guest that rewrites descriptors concurrently can
//! make its own requests fail but cannot make the engine read or write
//! outside guest memory, panic or loop.
//!
//! # Popping and completing
//!
//! ```text
//! let mut chain = Chain::new();
//! while queue.pop_into(&mem, &mut chain)? {
//!     // read chain.readable(), write chain.writable() through `mem` ...
//!     queue.add_used(&mem, chain.head(), written)?;
//! }
//! if queue.flush_used(&mem)? { /* signal the call fd */ }
//! ```
//!
//! `add_used` writes used entries but does not publish them;
//! `flush_used` publishes the whole batch with one release store and says
//! whether the guest asked to be notified.
//!
//! # Malformed chains
//!
//! A chain that breaks a rule (see [`VringError`]) is refused: `pop_into`
//! returns the error and does not advance, so the queue reports the same
//! error until it is reconfigured. This is what QEMU (`virtio_error`) and
//! Linux vhost (`vq_err`) do: a driver that posts such a chain is broken,
//! and the device should report DEVICE_NEEDS_RESET.

use core::fmt;

use heapless::Vec;

use crate::feature::VirtioFeatures;
use crate::memory::{GuestMemory, MemoryError};

pub mod packed;
pub mod split;
pub mod state;

pub use packed::PackedQueue;
pub use split::SplitQueue;
pub use state::{Processing, RingEvent, RingState};

/// Largest ring size (split and packed).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Largest indirect descriptor table accepted, in descriptors.
pub const MAX_INDIRECT_DESCS: u32 = 32768;

/// Default capacity of a [`Chain`], in segments.
pub const DEFAULT_CHAIN_CAPACITY: usize = 64;

/// Descriptor flag: the chain continues (split: at `next`; packed: in the
/// following slot).
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of indirect descriptors.
pub const DESC_F_INDIRECT: u16 = 4;

/// Why the engine refused a ring operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum VringError {
    /// A ring structure (descriptor table, avail/used ring, event area) is
    /// not accessible in guest memory.
    Memory(MemoryError),
    /// Ring size 0, above 32768, or not a power of two for a split ring
    /// (saturated at `u16::MAX`).
    BadSize(u16),
    /// A ring area address is not aligned as the layout requires (the
    /// alignment the area needs; the address is logged).
    Misaligned(u16),
    /// A ring area's end overflows 64 bits.
    AreaOverflow,
    /// The driver's avail index is more than the ring size ahead of the
    /// device's.
    AvailIndexJump {
        /// The avail index the driver published.
        avail: u16,
        /// The next index the device expected to process.
        next: u16,
    },
    /// A head descriptor index is not below the ring size.
    HeadOutOfRange(u16),
    /// A `next` index is not below the size of its table.
    NextOutOfRange(u16),
    /// The chain has more descriptors than its table (a loop, or a chain
    /// longer than the ring).
    ChainLoop,
    /// The chain has more buffers than the [`Chain`] capacity.
    ChainTooLong,
    /// The chain's buffers add up to more than `u32::MAX` bytes.
    ChainTooBig,
    /// An indirect descriptor although VIRTIO_RING_F_INDIRECT_DESC was not
    /// negotiated.
    IndirectNotNegotiated,
    /// An indirect descriptor with the NEXT flag.
    IndirectWithNext,
    /// An indirect descriptor inside an indirect table.
    IndirectNested,
    /// An indirect table whose length is 0, not a multiple of 16, or above
    /// [`MAX_INDIRECT_DESCS`] descriptors (saturated at `u16::MAX`).
    IndirectBadLength(u16),
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
    /// A buffer (or indirect table) that is not inside guest memory, or a
    /// zero-length descriptor whose address is not (its address and length
    /// are logged).
    BadBuffer,
    /// `add_used` with a head that is not below the ring size.
    BadUsedHead(u16),
    /// SET_VRING_BASE with an index not below the ring size: that index
    /// (a split base above 16 bits: `u16::MAX`; the whole value is logged).
    BadBase(u16),
    /// With VIRTIO_F_IN_ORDER, a split chain whose head is not where the
    /// previous chain's descriptors ended (the driver must use the table
    /// in ring order): that head.
    OutOfOrder(u16),
    /// VIRTIO_F_IN_ORDER in the features of a ring whose core was built
    /// without the `in-order` feature: its completions would be published
    /// out of order, which a driver that negotiated the bit may rely on
    /// not happening.
    InOrderNotBuilt,
}

const _: () = assert!(core::mem::size_of::<VringError>() <= 6);

impl From<MemoryError> for VringError {
    fn from(e: MemoryError) -> Self {
        VringError::Memory(e)
    }
}

impl fmt::Display for VringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VringError::Memory(e) => write!(f, "ring memory: {e}"),
            VringError::BadSize(n) => write!(f, "bad ring size {n}"),
            VringError::Misaligned(a) => write!(f, "ring area not {a}-byte aligned"),
            VringError::AreaOverflow => f.write_str("ring area overflows"),
            VringError::AvailIndexJump { avail, next } => {
                write!(f, "avail index {avail} too far ahead of {next}")
            }
            VringError::HeadOutOfRange(h) => write!(f, "head {h} out of range"),
            VringError::NextOutOfRange(n) => write!(f, "next {n} out of range"),
            VringError::ChainLoop => f.write_str("descriptor chain loops or exceeds its table"),
            VringError::ChainTooLong => f.write_str("descriptor chain exceeds chain capacity"),
            VringError::ChainTooBig => f.write_str("descriptor chain longer than 4 GiB"),
            VringError::IndirectNotNegotiated => f.write_str("indirect descriptor not negotiated"),
            VringError::IndirectWithNext => f.write_str("indirect descriptor with NEXT"),
            VringError::IndirectNested => f.write_str("nested indirect descriptor"),
            VringError::IndirectBadLength(l) => write!(f, "bad indirect table length {l}"),
            VringError::ReadableAfterWritable => {
                f.write_str("device-readable descriptor after a writable one")
            }
            VringError::BadBuffer => f.write_str("buffer outside guest memory"),
            VringError::BadUsedHead(h) => write!(f, "used head {h} out of range"),
            VringError::BadBase(b) => write!(f, "bad vring base {b:#x}"),
            VringError::OutOfOrder(h) => write!(f, "head {h} out of order"),
            VringError::InOrderNotBuilt => {
                f.write_str("VIRTIO_F_IN_ORDER without the in-order build feature")
            }
        }
    }
}

impl core::error::Error for VringError {}

/// Refuses VIRTIO_F_IN_ORDER in `features` unless the core was `built`
/// with its handling (the `in-order` feature).
fn in_order_built(features: VirtioFeatures, built: bool) -> Result<(), VringError> {
    if !built && features.contains(VirtioFeatures::IN_ORDER) {
        Err(VringError::InOrderNotBuilt)
    } else {
        Ok(())
    }
}

/// Where a ring lives, as guest physical addresses (translate the
/// front-end addresses of SET_VRING_ADDR first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RingAddrs {
    /// Descriptor table (split) or descriptor ring (packed).
    pub desc: u64,
    /// Driver area: avail ring (split) or driver event suppression (packed).
    pub driver: u64,
    /// Device area: used ring (split) or device event suppression (packed).
    pub device: u64,
}

/// Ring features that change the engine's behaviour, taken from the
/// negotiated virtio features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RingFeatures {
    /// VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// VIRTIO_RING_F_INDIRECT_DESC.
    pub indirect: bool,
}

impl RingFeatures {
    /// The ring features of a negotiated feature set.
    pub fn from_virtio(f: VirtioFeatures) -> Self {
        RingFeatures {
            event_idx: f.contains(VirtioFeatures::EVENT_IDX),
            indirect: f.contains(VirtioFeatures::INDIRECT_DESC),
        }
    }
}

/// What identifies a popped chain when it is completed: its id (split:
/// head descriptor index; packed: buffer id) and, for packed rings, how
/// many ring slots it occupied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Head {
    /// Head index (split) or buffer id (packed).
    pub id: u16,
    /// Descriptors the chain took in the ring (1 for an indirect chain).
    pub descs: u16,
}

/// One validated buffer of a chain, in guest physical memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes, never 0 (zero-length descriptors are checked and
    /// skipped).
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A popped, validated descriptor chain: its [`Head`] and up to `S`
/// segments, device-readable ones first.
///
/// Every segment lies inside guest memory as checked at pop time; the
/// device still accesses it through [`GuestMemory`], which checks again
/// (the memory table may change while requests are in flight).
#[derive(Clone, Debug, Default)]
pub struct Chain<const S: usize = DEFAULT_CHAIN_CAPACITY> {
    /// [`Head`] as one word (id, then descs in the high half): written
    /// with one store, so the word-sized read that follows a pop is
    /// forwarded from it instead of stalling on two half-word stores.
    head: u32,
    readable: u16,
    writable_seen: bool,
    readable_len: u32,
    writable_len: u32,
    segments: Vec<Segment, S>,
}

impl<const S: usize> Chain<S> {
    /// An empty chain, to be filled by `pop_into`.
    pub const fn new() -> Self {
        Chain {
            head: 0,
            readable: 0,
            writable_seen: false,
            readable_len: 0,
            writable_len: 0,
            segments: Vec::new(),
        }
    }

    /// The id to pass to `add_used` when the request completes.
    #[inline]
    pub fn head(&self) -> Head {
        Head {
            id: self.head as u16,
            descs: (self.head >> 16) as u16,
        }
    }

    /// All segments, device-readable first.
    #[inline]
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The device-readable segments.
    #[inline]
    pub fn readable(&self) -> &[Segment] {
        self.segments
            .get(..usize::from(self.readable))
            .unwrap_or(&[])
    }

    /// The device-writable segments.
    #[inline]
    pub fn writable(&self) -> &[Segment] {
        self.segments
            .get(usize::from(self.readable)..)
            .unwrap_or(&[])
    }

    /// Total bytes of the readable segments.
    #[inline]
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total bytes of the writable segments.
    #[inline]
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    #[inline(always)]
    pub(crate) fn reset(&mut self) {
        self.readable = 0;
        self.writable_seen = false;
        self.readable_len = 0;
        self.writable_len = 0;
        self.segments.clear();
    }

    #[inline(always)]
    pub(crate) fn set_head(&mut self, head: Head) {
        self.head = u32::from(head.id) | u32::from(head.descs) << 16;
    }

    /// [`push`](Self::push) for the first descriptor after
    /// [`reset`](Self::reset): nothing can come before it, and one
    /// descriptor's length always fits the chain's total.
    #[inline(always)]
    pub(crate) fn push_first<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> Result<(), VringError> {
        self.writable_seen = writable;
        self.append(mem, addr, len, writable)
    }

    /// Validate one copied descriptor and append it.
    #[inline(always)]
    pub(crate) fn push<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> Result<(), VringError> {
        if writable {
            self.writable_seen = true;
        } else if self.writable_seen {
            return Err(VringError::ReadableAfterWritable);
        }
        // The chain's total must fit in 32 bits (the used element's
        // length); the two sums already do, together (every push checks),
        // so adding them cannot wrap.
        if self
            .readable_len
            .wrapping_add(self.writable_len)
            .checked_add(len)
            .is_none()
        {
            return Err(VringError::ChainTooBig);
        }
        self.append(mem, addr, len, writable)
    }

    /// [`push`](Self::push) out of line, for the paths that are not
    /// the request path (rebuilding recorded chains): one copy of the
    /// checks rather than one per call site.
    #[inline(never)]
    pub(crate) fn push_outlined<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> Result<(), VringError> {
        self.push(mem, addr, len, writable)
    }

    /// Check a buffer against guest memory and append it, unless it is
    /// empty. The chain's total was checked (the sums cannot wrap).
    #[inline(always)]
    fn append<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> Result<(), VringError> {
        mem.check(addr, u64::from(len))
            .map_err(|_| bad_buffer(addr, len))?;
        if len == 0 {
            return Ok(());
        }
        if self
            .segments
            .push(Segment {
                addr,
                len,
                writable,
            })
            .is_err()
        {
            return Err(VringError::ChainTooLong);
        }
        if writable {
            self.writable_len = self.writable_len.wrapping_add(len);
        } else {
            self.readable += 1;
            self.readable_len = self.readable_len.wrapping_add(len);
        }
        Ok(())
    }
}

/// Decode a descriptor read as two words ([`GuestMemory::read_desc`]):
/// (addr, len, u16 at byte 12, u16 at byte 14).
#[inline(always)]
pub(crate) fn decode_words([a, b]: [u64; 2]) -> (u64, u32, u16, u16) {
    (a, b as u32, (b >> 32) as u16, (b >> 48) as u16)
}

/// Check an indirect descriptor of a ring's table and return its table
/// length in descriptors. (Walkers refuse an indirect descriptor found
/// inside a table as [`VringError::IndirectNested`] before calling this.)
#[inline]
pub(crate) fn indirect_table<M: GuestMemory + ?Sized>(
    mem: &M,
    negotiated: bool,
    flags: u16,
    addr: u64,
    len: u32,
) -> Result<u32, VringError> {
    if !negotiated {
        return Err(VringError::IndirectNotNegotiated);
    }
    if flags & DESC_F_NEXT != 0 {
        return Err(VringError::IndirectWithNext);
    }
    if len == 0 || len % 16 != 0 || len / 16 > MAX_INDIRECT_DESCS {
        return Err(VringError::IndirectBadLength(saturate(len)));
    }
    mem.check(addr, u64::from(len))
        .map_err(|_| bad_buffer(addr, len))?;
    Ok(len / 16)
}

/// [`VringError::BadBuffer`], logging the buffer (out of line: a cold
/// path).
#[cold]
#[inline(never)]
fn bad_buffer(addr: u64, len: u32) -> VringError {
    debug!("buffer {:#x}+{:#x} outside guest memory", addr, len);
    VringError::BadBuffer
}

/// `vring_need_event`: whether moving the used index from `old` to `new`
/// crossed the guest's `event` index.
#[inline]
/// `v` as a u16 error payload, saturated.
pub(crate) fn saturate(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

pub(crate) fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Check that `[addr, addr + len)` does not overflow and that `addr` is
/// aligned to `align` (a power of two).
pub(crate) fn check_area(addr: u64, len: u64, align: u16) -> Result<(), VringError> {
    if addr & (u64::from(align) - 1) != 0 {
        debug!("ring area {:#x} not {}-byte aligned", addr, align);
        return Err(VringError::Misaligned(align));
    }
    addr.checked_add(len).ok_or(VringError::AreaOverflow)?;
    Ok(())
}

/// A queue of either layout, for code that serves both.
#[derive(Clone, Debug)]
pub enum Queue {
    /// Split virtqueue.
    Split(SplitQueue),
    /// Packed virtqueue (VIRTIO_F_RING_PACKED).
    Packed(PackedQueue),
}

impl Queue {
    /// A queue of `size` entries at `addrs`, in the layout the negotiated
    /// `features` select (packed if VIRTIO_F_RING_PACKED).
    /// With the `in-order` feature, VIRTIO_F_IN_ORDER in `features` turns
    /// its handling on ([`set_in_order`](Self::set_in_order)); without it,
    /// the bit is refused ([`VringError::InOrderNotBuilt`]) rather than
    /// left unhonoured.
    pub fn new(size: u16, addrs: RingAddrs, features: VirtioFeatures) -> Result<Self, VringError> {
        in_order_built(features, cfg!(feature = "in-order"))?;
        let rf = RingFeatures::from_virtio(features);
        let q = if features.contains(VirtioFeatures::RING_PACKED) {
            PackedQueue::new(size, addrs, rf).map(Queue::Packed)
        } else {
            SplitQueue::new(size, addrs, rf).map(Queue::Split)
        };
        #[cfg(feature = "in-order")]
        let q = q.map(|mut q| {
            q.set_in_order(features.contains(VirtioFeatures::IN_ORDER));
            q
        });
        q
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        match self {
            Queue::Split(q) => q.size(),
            Queue::Packed(q) => q.size(),
        }
    }

    /// Move the ring to new guest physical addresses; indices are kept.
    pub fn set_addrs(&mut self, addrs: RingAddrs) -> Result<(), VringError> {
        match self {
            Queue::Split(q) => q.set_addrs(addrs),
            Queue::Packed(q) => q.set_addrs(addrs),
        }
    }

    /// The ring's guest physical addresses.
    pub fn addrs(&self) -> RingAddrs {
        match self {
            Queue::Split(q) => q.addrs(),
            Queue::Packed(q) => q.addrs(),
        }
    }

    /// Check that every ring area is inside guest memory.
    pub fn check_areas<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), VringError> {
        match self {
            Queue::Split(q) => q.check_areas(mem),
            Queue::Packed(q) => q.check_areas(mem),
        }
    }

    /// Pop the next available chain into `chain`. `Ok(false)`: none
    /// available.
    #[inline]
    pub fn pop_into<M: GuestMemory + ?Sized, const S: usize>(
        &mut self,
        mem: &M,
        chain: &mut Chain<S>,
    ) -> Result<bool, VringError> {
        match self {
            Queue::Split(q) => q.pop_into(mem, chain),
            Queue::Packed(q) => q.pop_into(mem, chain),
        }
    }

    /// Write a used entry for `head` (not yet visible to the guest).
    #[inline]
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: Head,
        len: u32,
    ) -> Result<(), VringError> {
        match self {
            Queue::Split(q) => q.add_used(mem, head, len),
            Queue::Packed(q) => q.add_used(mem, head, len),
        }
    }

    /// [`add_used`](Self::add_used) for a ring with VIRTIO_F_IN_ORDER
    /// handling on, in pop order (see
    /// [`SplitQueue::add_used_in_order`]).
    #[cfg(feature = "in-order")]
    #[inline]
    pub fn add_used_in_order<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: Head,
        len: u32,
        elide: bool,
    ) -> Result<(), VringError> {
        match self {
            Queue::Split(q) => q.add_used_in_order(mem, head, len, elide),
            Queue::Packed(q) => q.add_used_in_order(mem, head, len, elide),
        }
    }

    /// Turns VIRTIO_F_IN_ORDER handling on or off, before the first pop.
    #[cfg(feature = "in-order")]
    pub fn set_in_order(&mut self, on: bool) {
        match self {
            Queue::Split(q) => q.set_in_order(on),
            Queue::Packed(q) => q.set_in_order(on),
        }
    }

    /// Whether VIRTIO_F_IN_ORDER handling is on.
    #[cfg(feature = "in-order")]
    pub fn in_order(&self) -> bool {
        match self {
            Queue::Split(q) => q.in_order(),
            Queue::Packed(q) => q.in_order(),
        }
    }

    /// Whether used entries were added since the last flush.
    #[inline]
    pub fn has_unpublished(&self) -> bool {
        match self {
            Queue::Split(q) => q.has_unpublished(),
            Queue::Packed(q) => q.has_unpublished(),
        }
    }

    /// Publish the used entries added since the last flush; `Ok(true)` if
    /// the guest must be notified.
    #[inline]
    pub fn flush_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, VringError> {
        match self {
            Queue::Split(q) => q.flush_used(mem),
            Queue::Packed(q) => q.flush_used(mem),
        }
    }

    /// Ask the driver for kicks again; `Ok(true)` if buffers arrived
    /// meanwhile (process them before sleeping).
    pub fn enable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, VringError> {
        match self {
            Queue::Split(q) => q.enable_notification(mem),
            Queue::Packed(q) => q.enable_notification(mem),
        }
    }

    /// Ask the driver not to kick (the device is polling).
    pub fn disable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), VringError> {
        match self {
            Queue::Split(q) => q.disable_notification(mem),
            Queue::Packed(q) => q.disable_notification(mem),
        }
    }

    /// The GET_VRING_BASE value: the next avail index (split), or the
    /// packed encoding (see [`PackedQueue::base`]).
    pub fn base(&self) -> u32 {
        match self {
            Queue::Split(q) => u32::from(q.next_avail()),
            Queue::Packed(q) => q.base(),
        }
    }

    /// Apply a SET_VRING_BASE value. A split ring takes the low 16 bits as
    /// its next avail index (and refuses higher bits); a packed ring, see
    /// [`PackedQueue::set_base`].
    pub fn set_base(&mut self, num: u32) -> Result<(), VringError> {
        match self {
            Queue::Split(q) => {
                let v = u16::try_from(num).map_err(|_| {
                    debug!("split ring base {:#x} above 16 bits", num);
                    VringError::BadBase(u16::MAX)
                })?;
                q.set_next_avail(v);
                Ok(())
            }
            Queue::Packed(q) => q.set_base(num),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_is_refused_by_a_core_built_without_it() {
        let io = VirtioFeatures::IN_ORDER | VirtioFeatures::VERSION_1;
        assert_eq!(in_order_built(io, false), Err(VringError::InOrderNotBuilt));
        assert_eq!(in_order_built(io, true), Ok(()));
        assert_eq!(in_order_built(VirtioFeatures::VERSION_1, false), Ok(()));
        // This build's rings take the bit (the tests build the core with
        // `in-order`) and honour it.
        #[cfg(feature = "in-order")]
        assert!(Queue::new(8, RingAddrs::default(), io).is_ok_and(|q| q.in_order()));
    }
}

//! virtio-net (virtio 1.3, section 5.1): feature bits, the config space, the
//! per-packet header, and pure functions that move frames between guest
//! buffers and a caller's bytes.
//!
//! The flow for a back-end:
//!
//! 1. Build a [`NetDevice`] from a [`NetConfig`]; offer
//!    [`NetDevice::offered_features`] (plus the transport bits such as
//!    VERSION_1) in GET_FEATURES.
//! 2. On SET_FEATURES call [`NetDevice::set_features`]: it fixes the header
//!    length ([`NetDevice::hdr_len`]) and whether receive buffers merge
//!    ([`NetDevice::mergeable`]). Serve GET_CONFIG with
//!    [`NetDevice::read_config`].
//! 3. Queue `2k` receives and `2k + 1` transmits for pair `k`
//!    ([`QueueRole::of`]); a control queue, if any, is the front-end's.
//! 4. A transmit chain: [`tx_gather`] copies the header and the frame out
//!    (or [`tx_pieces`] names the frame's guest ranges); complete the chain
//!    with length 0.
//! 5. A receive chain: check it once with [`rx_capacity`] when it is popped,
//!    then write a frame with [`rx_fill`] (one chain), or with
//!    [`rx_fill_merged`] over several chains (MRG_RXBUF), which sets
//!    `num_buffers` in the first header; complete each chain with the
//!    length written into it.
//!
//! A chain that breaks a rule (a device-writable buffer in a transmit
//! chain, a device-readable one in a receive chain, an address range that
//! overflows) is refused with a [`NetError`]: the caller drops it, counts
//! it, and completes the chain with length 0. Nothing here panics,
//! allocates, or touches memory outside the ranges of the chain, and all
//! of it is checked again by the guest-memory accessors.
//!
//! All multi-byte fields are little-endian (VIRTIO_F_VERSION_1, or a
//! little-endian legacy guest).

// zerocopy's derives generate hidden helper types without Debug.
#![allow(missing_debug_implementations)]

use core::fmt;

use bitflags::bitflags;
use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{ReadGuest, Segment, WriteGuest};
use crate::feature::VirtioFeatures;
use crate::message::ConfigWriteKind;

/// Length of an Ethernet header: shorter frames are refused on transmit.
pub const ETH_HLEN: usize = 14;
/// Room for one VLAN tag on top of the MTU in a frame.
pub const VLAN_HLEN: usize = 4;
/// The default MTU when none is configured.
pub const DEFAULT_MTU: u16 = 1500;
/// The smallest MTU the spec allows a device to advertise (68, IPv4's
/// minimum).
pub const MIN_MTU: u16 = 68;
/// VIRTIO_NET_S_LINK_UP.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// VIRTIO_NET_S_ANNOUNCE.
pub const VIRTIO_NET_S_ANNOUNCE: u16 = 2;
/// Most queue pairs the spec allows (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX).
pub const MAX_QUEUE_PAIRS: u16 = 0x8000;

/// `flags` bit of the header: the checksum is partial (`csum_start`,
/// `csum_offset` say where to finish it).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags` bit of the header: the checksum was validated.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `gso_type`: not a GSO frame.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4 segmentation (TSO).
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation (UFO).
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `gso_type` bit: the segments carry ECN (with HOST_ECN / GUEST_ECN).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

bitflags! {
    /// The virtio-net device feature bits (0-23 of the virtio feature word).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct NetFeatures: u64 {
        /// VIRTIO_NET_F_CSUM: the device takes frames with a partial checksum.
        const CSUM = 1 << 0;
        /// VIRTIO_NET_F_GUEST_CSUM: the driver takes frames with a partial checksum.
        const GUEST_CSUM = 1 << 1;
        /// VIRTIO_NET_F_CTRL_GUEST_OFFLOADS.
        const CTRL_GUEST_OFFLOADS = 1 << 2;
        /// VIRTIO_NET_F_MTU: `mtu` is valid.
        const MTU = 1 << 3;
        /// VIRTIO_NET_F_MAC: `mac` is valid.
        const MAC = 1 << 5;
        /// VIRTIO_NET_F_GUEST_TSO4.
        const GUEST_TSO4 = 1 << 7;
        /// VIRTIO_NET_F_GUEST_TSO6.
        const GUEST_TSO6 = 1 << 8;
        /// VIRTIO_NET_F_GUEST_ECN.
        const GUEST_ECN = 1 << 9;
        /// VIRTIO_NET_F_GUEST_UFO.
        const GUEST_UFO = 1 << 10;
        /// VIRTIO_NET_F_HOST_TSO4.
        const HOST_TSO4 = 1 << 11;
        /// VIRTIO_NET_F_HOST_TSO6.
        const HOST_TSO6 = 1 << 12;
        /// VIRTIO_NET_F_HOST_ECN.
        const HOST_ECN = 1 << 13;
        /// VIRTIO_NET_F_HOST_UFO.
        const HOST_UFO = 1 << 14;
        /// VIRTIO_NET_F_MRG_RXBUF: a received frame may span several buffers.
        const MRG_RXBUF = 1 << 15;
        /// VIRTIO_NET_F_STATUS: `status` is valid.
        const STATUS = 1 << 16;
        /// VIRTIO_NET_F_CTRL_VQ (the front-end's business, never offered here).
        const CTRL_VQ = 1 << 17;
        /// VIRTIO_NET_F_CTRL_RX.
        const CTRL_RX = 1 << 18;
        /// VIRTIO_NET_F_CTRL_VLAN.
        const CTRL_VLAN = 1 << 19;
        /// VIRTIO_NET_F_GUEST_ANNOUNCE.
        const GUEST_ANNOUNCE = 1 << 21;
        /// VIRTIO_NET_F_MQ: `max_virtqueue_pairs` is valid.
        const MQ = 1 << 22;
        /// VIRTIO_NET_F_CTRL_MAC_ADDR.
        const CTRL_MAC_ADDR = 1 << 23;
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for NetFeatures {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "NetFeatures({=u64:#x})", self.bits());
    }
}

impl NetFeatures {
    /// The same bits as a virtio feature word.
    pub const fn to_virtio(self) -> VirtioFeatures {
        VirtioFeatures::from_bits_retain(self.bits())
    }

    /// The virtio-net bits of a virtio feature word (others dropped).
    pub const fn from_virtio(features: VirtioFeatures) -> Self {
        NetFeatures::from_bits_truncate(features.bits())
    }
}

// ---------------------------------------------------------------------------
// Wire structs.

/// `struct virtio_net_config`, the device config space (24 bytes, up to
/// `supported_hash_types`).
#[derive(
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Debug,
    Default,
)]
#[repr(C)]
pub struct VirtioNetConfig {
    /// MAC address (offset 0, MAC).
    pub mac: [u8; 6],
    /// Link status, `VIRTIO_NET_S_*` (offset 6, STATUS).
    pub status: U16,
    /// Queue pairs the device has (offset 8, MQ).
    pub max_virtqueue_pairs: U16,
    /// Largest MTU the driver should use (offset 10, MTU).
    pub mtu: U16,
    /// Link speed in Mbit/s, `u32::MAX` unknown (offset 12, SPEED_DUPLEX).
    pub speed: U32,
    /// 0 half, 1 full, 0xff unknown (offset 16, SPEED_DUPLEX).
    pub duplex: u8,
    /// RSS key size (offset 17, RSS; zero here).
    pub rss_max_key_size: u8,
    /// RSS indirection table length (offset 18, RSS; zero here).
    pub rss_max_indirection_table_length: U16,
    /// Hash types (offset 20, RSS / HASH_REPORT; zero here).
    pub supported_hash_types: U32,
}
const _: () = assert!(core::mem::size_of::<VirtioNetConfig>() == 24);

impl VirtioNetConfig {
    /// Size of the config space in bytes.
    pub const SIZE: usize = 24;
}

/// `struct virtio_net_hdr_v1`: the header in front of every frame, both
/// directions. Without VERSION_1 and without MRG_RXBUF (a legacy guest)
/// only its first [`VirtioNetHdr::LEGACY_SIZE`] bytes are on the wire.
#[derive(
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Debug,
    Default,
)]
#[repr(C)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment (GSO).
    pub hdr_len: U16,
    /// Payload bytes per segment (GSO).
    pub gso_size: U16,
    /// Where the partial checksum starts (NEEDS_CSUM).
    pub csum_start: U16,
    /// Where, from `csum_start`, the checksum goes (NEEDS_CSUM).
    pub csum_offset: U16,
    /// Receive buffers this frame spans (set by the device; 1 without
    /// MRG_RXBUF).
    pub num_buffers: U16,
}
const _: () = assert!(core::mem::size_of::<VirtioNetHdr>() == 12);

impl VirtioNetHdr {
    /// The header with `num_buffers` (VERSION_1 or MRG_RXBUF).
    pub const SIZE: usize = 12;
    /// The legacy header without `num_buffers`.
    pub const LEGACY_SIZE: usize = 10;
}

// ---------------------------------------------------------------------------
// Errors.

/// Why a chain or a frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NetError {
    /// A segment's `addr + len` overflows 64 bits.
    AddressOverflow,
    /// A device-writable buffer in a transmit chain.
    WritableInTx,
    /// A device-readable buffer in a receive chain.
    ReadableInRx,
    /// A transmit chain shorter than the header.
    HeaderTooShort,
    /// A transmitted frame shorter than an Ethernet header (its length).
    Runt(u32),
    /// A transmitted frame longer than the caller takes (its length).
    Oversize(u32),
    /// Not enough receive space for the frame: bytes needed (header
    /// included), bytes available.
    NoRoom {
        /// Bytes the header and the frame need.
        need: u32,
        /// Bytes the buffers offered.
        have: u32,
    },
    /// A receive buffer smaller than the header.
    BufferTooSmall(u32),
    /// Guest memory could not be read or written.
    GuestMemory,
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NetError::AddressOverflow => f.write_str("descriptor address range overflows"),
            NetError::WritableInTx => f.write_str("device-writable buffer in a transmit chain"),
            NetError::ReadableInRx => f.write_str("device-readable buffer in a receive chain"),
            NetError::HeaderTooShort => f.write_str("transmit chain shorter than the header"),
            NetError::Runt(l) => write!(f, "transmitted frame of {l} bytes is too short"),
            NetError::Oversize(l) => write!(f, "transmitted frame of {l} bytes is too long"),
            NetError::NoRoom { need, have } => {
                write!(f, "frame needs {need} bytes, receive buffers have {have}")
            }
            NetError::BufferTooSmall(l) => {
                write!(f, "receive buffer of {l} bytes cannot hold the header")
            }
            NetError::GuestMemory => f.write_str("guest memory access failed"),
        }
    }
}

impl core::error::Error for NetError {}

/// A device configuration that was refused, or a config-space access that
/// was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NetConfigError {
    /// Queue pairs not in 1..=0x8000.
    BadQueuePairs(u16),
    /// An MTU below 68.
    BadMtu(u16),
    /// A multicast MAC address (bit 0 of the first byte set).
    MulticastMac,
    /// A config access beyond the config space.
    OutOfRange {
        /// Offset of the access.
        offset: u32,
        /// Length of the access.
        len: u32,
    },
    /// A front-end write that changes a byte (its offset): the config
    /// space of this device is read-only to the driver.
    ReadOnlyField(u32),
}

impl fmt::Display for NetConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NetConfigError::BadQueuePairs(n) => write!(f, "{n} queue pairs: must be 1 to 32768"),
            NetConfigError::BadMtu(m) => write!(f, "MTU {m} is below {MIN_MTU}"),
            NetConfigError::MulticastMac => f.write_str("the MAC address is a multicast address"),
            NetConfigError::OutOfRange { offset, len } => {
                write!(f, "config access {offset}+{len} beyond 24 bytes")
            }
            NetConfigError::ReadOnlyField(o) => write!(f, "config byte {o} is read-only"),
        }
    }
}

impl core::error::Error for NetConfigError {}

// ---------------------------------------------------------------------------
// Queues.

/// What a queue index carries: pair `k` receives on `2k` and transmits on
/// `2k + 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum QueueRole {
    /// The receive queue of this pair (device writes frames).
    Rx(u16),
    /// The transmit queue of this pair (device reads frames).
    Tx(u16),
}

impl QueueRole {
    /// The role of queue `queue`.
    pub const fn of(queue: u16) -> Self {
        if queue % 2 == 0 {
            QueueRole::Rx(queue / 2)
        } else {
            QueueRole::Tx(queue / 2)
        }
    }

    /// The pair the queue belongs to.
    pub const fn pair(self) -> u16 {
        match self {
            QueueRole::Rx(p) | QueueRole::Tx(p) => p,
        }
    }
}

// ---------------------------------------------------------------------------
// Device configuration.

/// What a back-end serves: the description from which the config space
/// and the offered feature bits are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct NetConfig {
    /// The MAC address the driver should use (MAC offered when set).
    pub mac: Option<[u8; 6]>,
    /// Queue pairs (1..=0x8000); MQ is offered when above 1.
    pub queue_pairs: u16,
    /// MTU advertised to the driver (MTU offered when set).
    pub mtu: Option<u16>,
    /// Offer MRG_RXBUF.
    pub mrg_rxbuf: bool,
    /// Offer STATUS (the link status in the config space).
    pub status: bool,
    /// The link is up.
    pub link_up: bool,
    /// Offload bits to offer on top of the rest, for a back-end that
    /// carries offloaded frames (a tap): any of
    /// [`NetConfig::OFFLOADS`], others are ignored.
    pub offloads: NetFeatures,
}

impl NetConfig {
    /// One queue pair, no MAC, no MTU, MRG_RXBUF and STATUS offered, the
    /// link up.
    pub const fn new() -> Self {
        NetConfig {
            mac: None,
            queue_pairs: 1,
            mtu: None,
            mrg_rxbuf: true,
            status: true,
            link_up: true,
            offloads: NetFeatures::empty(),
        }
    }

    /// The offload bits a back-end may offer: partial checksums and
    /// segmentation offloads, both ways.
    pub const OFFLOADS: NetFeatures = NetFeatures::CSUM
        .union(NetFeatures::GUEST_CSUM)
        .union(NetFeatures::GUEST_TSO4)
        .union(NetFeatures::GUEST_TSO6)
        .union(NetFeatures::GUEST_ECN)
        .union(NetFeatures::GUEST_UFO)
        .union(NetFeatures::HOST_TSO4)
        .union(NetFeatures::HOST_TSO6)
        .union(NetFeatures::HOST_ECN)
        .union(NetFeatures::HOST_UFO);

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), NetConfigError> {
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(NetConfigError::BadQueuePairs(self.queue_pairs));
        }
        if let Some(m) = self.mtu {
            if m < MIN_MTU {
                return Err(NetConfigError::BadMtu(m));
            }
        }
        if let Some(mac) = self.mac {
            if mac[0] & 1 != 0 {
                return Err(NetConfigError::MulticastMac);
            }
        }
        Ok(())
    }

    /// The device feature bits this configuration offers.
    pub fn features(&self) -> NetFeatures {
        let mut f = NetFeatures::empty();
        f.set(NetFeatures::MAC, self.mac.is_some());
        f.set(NetFeatures::MTU, self.mtu.is_some());
        f.set(NetFeatures::MQ, self.queue_pairs > 1);
        f.set(NetFeatures::MRG_RXBUF, self.mrg_rxbuf);
        f.set(NetFeatures::STATUS, self.status);
        f | (self.offloads & NetConfig::OFFLOADS)
    }

    /// The config space for this configuration.
    pub fn config_space(&self) -> VirtioNetConfig {
        VirtioNetConfig {
            mac: self.mac.unwrap_or([0; 6]),
            status: if self.link_up {
                VIRTIO_NET_S_LINK_UP
            } else {
                0
            }
            .into(),
            max_virtqueue_pairs: self.queue_pairs.into(),
            mtu: self.mtu.unwrap_or(0).into(),
            speed: u32::MAX.into(),
            duplex: 0xff,
            ..VirtioNetConfig::default()
        }
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::new()
    }
}

/// A virtio-net device model: config space, offered and acked features,
/// and what the acked features make of the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetDevice {
    initial: VirtioNetConfig,
    space: VirtioNetConfig,
    offered: NetFeatures,
    acked: VirtioFeatures,
}

impl NetDevice {
    /// Builds the device; the configuration is validated first.
    pub fn new(config: &NetConfig) -> Result<Self, NetConfigError> {
        config.validate()?;
        let space = config.config_space();
        Ok(NetDevice {
            initial: space,
            space,
            offered: config.features(),
            acked: VirtioFeatures::empty(),
        })
    }

    /// The device feature bits to offer (GET_FEATURES), without the
    /// transport bits (VERSION_1, EVENT_IDX, ...) the back-end adds.
    pub fn offered_features(&self) -> VirtioFeatures {
        self.offered.to_virtio()
    }

    /// Records the negotiated features (SET_FEATURES): the whole word,
    /// since VERSION_1 decides the header length. Device bits that were
    /// not offered are ignored.
    pub fn set_features(&mut self, acked: VirtioFeatures) {
        let device = NetFeatures::from_virtio(acked) & self.offered;
        let transport = acked & !NetFeatures::all().to_virtio();
        self.acked = transport | device.to_virtio();
    }

    /// The negotiated device bits.
    pub fn acked_features(&self) -> NetFeatures {
        NetFeatures::from_virtio(self.acked)
    }

    /// Bytes of header in front of each frame: 12 with VERSION_1 or
    /// MRG_RXBUF, 10 otherwise.
    pub fn hdr_len(&self) -> usize {
        hdr_len(self.acked)
    }

    /// Whether a received frame may span several buffers (MRG_RXBUF).
    pub fn mergeable(&self) -> bool {
        self.acked_features().contains(NetFeatures::MRG_RXBUF)
    }

    /// Queue pairs the device has.
    pub fn queue_pairs(&self) -> u16 {
        self.space.max_virtqueue_pairs.get()
    }

    /// The MTU advertised (0 without one).
    pub fn mtu(&self) -> u16 {
        self.space.mtu.get()
    }

    /// The largest frame (Ethernet header, one VLAN tag and the MTU, or
    /// 1500 without one) a guest is expected to send, header not included.
    pub fn max_frame(&self) -> usize {
        let mtu = match self.mtu() {
            0 => DEFAULT_MTU,
            m => m,
        };
        usize::from(mtu) + ETH_HLEN + VLAN_HLEN
    }

    /// Back to the state after [`NetDevice::new`]: initial config space, no
    /// features acked.
    pub fn reset(&mut self) {
        self.space = self.initial;
        self.acked = VirtioFeatures::empty();
    }

    /// The current config space.
    pub fn config_space(&self) -> &VirtioNetConfig {
        &self.space
    }

    /// Sets the link status; returns whether it changed (then tell the
    /// front-end: BACKEND_CONFIG_CHANGE_MSG).
    pub fn set_link_up(&mut self, up: bool) -> bool {
        let old = self.space.status.get();
        let new = if up {
            old | VIRTIO_NET_S_LINK_UP
        } else {
            old & !VIRTIO_NET_S_LINK_UP
        };
        self.space.status = new.into();
        self.initial.status = new.into();
        old != new
    }

    /// GET_CONFIG: copies `dst.len()` config bytes from `offset`; refuses
    /// (and leaves `dst` untouched) any range outside the 24 bytes.
    pub fn read_config(&self, offset: u32, dst: &mut [u8]) -> Result<(), NetConfigError> {
        let range = config_range(offset, dst.len())?;
        dst.copy_from_slice(&self.space.as_bytes()[range]);
        Ok(())
    }

    /// SET_CONFIG: a [`ConfigWriteKind::Migration`] write may set any byte;
    /// a [`ConfigWriteKind::Frontend`] write may change nothing (the MAC
    /// is changed through the control queue, which the front-end serves).
    /// A refused write changes nothing.
    pub fn write_config(
        &mut self,
        offset: u32,
        src: &[u8],
        kind: ConfigWriteKind,
    ) -> Result<(), NetConfigError> {
        let range = config_range(offset, src.len())?;
        if kind == ConfigWriteKind::Frontend {
            let current = &self.space.as_bytes()[range.clone()];
            if let Some(i) = src.iter().zip(current).position(|(a, b)| a != b) {
                return Err(NetConfigError::ReadOnlyField((range.start + i) as u32));
            }
        }
        self.space.as_mut_bytes()[range].copy_from_slice(src);
        Ok(())
    }
}

/// Bytes of header in front of each frame for the negotiated `features`:
/// 12 with VERSION_1 or MRG_RXBUF, 10 otherwise.
pub fn hdr_len(features: VirtioFeatures) -> usize {
    if features.contains(VirtioFeatures::VERSION_1)
        || NetFeatures::from_virtio(features).contains(NetFeatures::MRG_RXBUF)
    {
        VirtioNetHdr::SIZE
    } else {
        VirtioNetHdr::LEGACY_SIZE
    }
}

fn config_range(offset: u32, len: usize) -> Result<core::ops::Range<usize>, NetConfigError> {
    let bad = NetConfigError::OutOfRange {
        offset,
        len: u32::try_from(len).unwrap_or(u32::MAX),
    };
    let start = offset as usize;
    let end = start.checked_add(len).ok_or(bad)?;
    if end > VirtioNetConfig::SIZE {
        return Err(bad);
    }
    Ok(start..end)
}

// ---------------------------------------------------------------------------
// Transmit.

/// The non-empty segments of a chain.
fn nonempty<T: Copy + Into<Segment>>(segments: &[T]) -> impl Iterator<Item = Segment> + '_ {
    segments
        .iter()
        .map(|&s| s.into())
        .filter(|s: &Segment| s.len != 0)
}

/// Checks a transmit chain: device-readable buffers only, no address
/// overflow, at least a header and an Ethernet header, at most `max_frame`
/// bytes of frame. Returns the frame's length (header excluded).
pub fn tx_check<T>(segments: &[T], hdr_len: usize, max_frame: usize) -> Result<u32, NetError>
where
    T: Copy + Into<Segment>,
{
    let mut total = 0u64;
    for s in nonempty(segments) {
        if s.writable {
            return Err(NetError::WritableInTx);
        }
        if s.addr.checked_add(u64::from(s.len)).is_none() {
            return Err(NetError::AddressOverflow);
        }
        total += u64::from(s.len);
    }
    let frame = total
        .checked_sub(hdr_len as u64)
        .ok_or(NetError::HeaderTooShort)?;
    let len = u32::try_from(frame).unwrap_or(u32::MAX);
    if frame > max_frame as u64 {
        return Err(NetError::Oversize(len));
    }
    if frame < ETH_HLEN as u64 {
        return Err(NetError::Runt(len));
    }
    Ok(len)
}

/// What [`tx_gather`] took out of a transmit chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxFrame {
    /// The header (its last two bytes zero with a 10-byte header).
    pub hdr: VirtioNetHdr,
    /// Bytes of frame copied to the start of the caller's buffer.
    pub len: usize,
}

/// Copies a transmit chain out: the first `hdr_len` bytes into the header,
/// the rest (the frame) to the start of `frame`. The chain is checked
/// first with [`tx_check`], with `frame.len()` as the largest frame.
pub fn tx_gather<T, M>(
    segments: &[T],
    mem: &M,
    hdr_len: usize,
    frame: &mut [u8],
) -> Result<TxFrame, NetError>
where
    T: Copy + Into<Segment>,
    M: ReadGuest + ?Sized,
{
    let hdr_len = hdr_len.min(VirtioNetHdr::SIZE);
    let len = tx_check(segments, hdr_len, frame.len())? as usize;
    let mut hdr = VirtioNetHdr::default();
    let mut pos = 0usize;
    let end = hdr_len + len;
    for s in nonempty(segments) {
        let seg_end = pos + s.len as usize;
        let mut at = pos;
        while at < seg_end && at < end {
            let gpa = s.addr + (at - pos) as u64;
            let n = if at < hdr_len {
                let n = (hdr_len - at).min(seg_end - at);
                mem.read(gpa, &mut hdr.as_mut_bytes()[at..at + n])
                    .map_err(|_| NetError::GuestMemory)?;
                n
            } else {
                let off = at - hdr_len;
                let n = (end - at).min(seg_end - at);
                mem.read(gpa, &mut frame[off..off + n])
                    .map_err(|_| NetError::GuestMemory)?;
                n
            };
            at += n;
        }
        pos = seg_end;
        if pos >= end {
            break;
        }
    }
    Ok(TxFrame { hdr, len })
}

/// Why [`check_tx_hdr`] refuses a transmit frame's virtio-net header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TxHdrError {
    /// Flags other than NEEDS_CSUM (a driver must not set DATA_VALID,
    /// which would have the host trust an unchecked checksum).
    Flags(u8),
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM negotiated.
    CsumNotNegotiated,
    /// The checksum field (`csum_start + csum_offset`, 2 bytes) is not
    /// inside the frame.
    CsumOutside {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// The frame's length.
        len: usize,
    },
    /// A `gso_type` the spec does not define.
    UnknownGso(u8),
    /// A segmentation offload the driver did not negotiate.
    GsoNotNegotiated(u8),
    /// Segmentation without NEEDS_CSUM, or with a zero `gso_size`.
    GsoIncomplete,
    /// `hdr_len` beyond the frame.
    HdrLenOutside {
        /// `hdr_len`.
        hdr_len: u16,
        /// The frame's length.
        len: usize,
    },
    /// TCP segmentation whose checksum field is not the TCP header's
    /// (`csum_offset` other than 16): the host cannot segment it (Linux
    /// refuses it, older kernels drop it after taking it).
    TcpCsumOffset(u16),
    /// A frame without segmentation longer than the MTU allows, from a
    /// driver that negotiated VIRTIO_NET_F_MTU (which forbids it).
    OverMtu {
        /// The frame's length.
        len: usize,
        /// The longest frame the MTU allows.
        max: usize,
    },
}

impl fmt::Display for TxHdrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TxHdrError::Flags(x) => write!(f, "header flags {x:#x} (only NEEDS_CSUM may be set)"),
            TxHdrError::CsumNotNegotiated => write!(f, "NEEDS_CSUM without VIRTIO_NET_F_CSUM"),
            TxHdrError::CsumOutside { start, offset, len } => write!(
                f,
                "checksum at {start} + {offset} outside the {len}-byte frame"
            ),
            TxHdrError::UnknownGso(t) => write!(f, "unknown gso_type {t:#x}"),
            TxHdrError::GsoNotNegotiated(t) => {
                write!(f, "gso_type {t:#x} without its offload negotiated")
            }
            TxHdrError::GsoIncomplete => {
                write!(f, "segmentation without NEEDS_CSUM or with gso_size 0")
            }
            TxHdrError::HdrLenOutside { hdr_len, len } => {
                write!(f, "hdr_len {hdr_len} beyond the {len}-byte frame")
            }
            TxHdrError::TcpCsumOffset(o) => {
                write!(f, "TCP segmentation with csum_offset {o} (not 16)")
            }
            TxHdrError::OverMtu { len, max } => write!(
                f,
                "{len}-byte frame without segmentation, above the MTU's {max}"
            ),
        }
    }
}

/// Checks the header of a `len`-byte frame the driver transmits against
/// the spec and the offloads it negotiated (`acked`), so a backend that
/// passes headers on (a tap) gets only what the device promised to take:
/// Linux's tap accepts some headers a driver must not send (a
/// segmentation offload that was not negotiated, DATA_VALID, a frame
/// longer than the MTU it negotiated) and refuses others only after work.
/// `max_frame` is the longest frame without segmentation the MTU allows
/// ([`NetDevice::max_frame`]), held to with VIRTIO_NET_F_MTU acked.
pub fn check_tx_hdr(
    hdr: &VirtioNetHdr,
    len: usize,
    acked: NetFeatures,
    max_frame: usize,
) -> Result<(), TxHdrError> {
    const NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    const ECN: u8 = VIRTIO_NET_HDR_GSO_ECN;
    if hdr.flags & !NEEDS_CSUM != 0 {
        return Err(TxHdrError::Flags(hdr.flags));
    }
    let csum = hdr.flags & NEEDS_CSUM != 0;
    if csum {
        if !acked.contains(NetFeatures::CSUM) {
            return Err(TxHdrError::CsumNotNegotiated);
        }
        let (start, offset) = (hdr.csum_start.get(), hdr.csum_offset.get());
        if usize::from(start) + usize::from(offset) + 2 > len {
            return Err(TxHdrError::CsumOutside { start, offset, len });
        }
    }
    let hdr_len = hdr.hdr_len.get();
    if usize::from(hdr_len) > len {
        return Err(TxHdrError::HdrLenOutside { hdr_len, len });
    }
    let t = hdr.gso_type;
    let needs = match t & !ECN {
        VIRTIO_NET_HDR_GSO_NONE if t & ECN == 0 => {
            // The host would pass such a frame on, to be dropped further
            // along (a bridge, a wire) while we count it sent.
            if acked.contains(NetFeatures::MTU) && len > max_frame {
                return Err(TxHdrError::OverMtu {
                    len,
                    max: max_frame,
                });
            }
            return Ok(());
        }
        VIRTIO_NET_HDR_GSO_NONE => return Err(TxHdrError::UnknownGso(t)),
        VIRTIO_NET_HDR_GSO_TCPV4 => NetFeatures::HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => NetFeatures::HOST_TSO6,
        VIRTIO_NET_HDR_GSO_UDP => NetFeatures::HOST_UFO,
        _ => return Err(TxHdrError::UnknownGso(t)),
    };
    let needs = if t & ECN != 0 {
        needs | NetFeatures::HOST_ECN
    } else {
        needs
    };
    if !acked.contains(needs) {
        return Err(TxHdrError::GsoNotNegotiated(t));
    }
    if !csum || hdr.gso_size.get() == 0 {
        return Err(TxHdrError::GsoIncomplete);
    }
    let offset = hdr.csum_offset.get();
    if matches!(
        t & !ECN,
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6
    ) && offset != 16
    {
        return Err(TxHdrError::TcpCsumOffset(offset));
    }
    Ok(())
}

/// Names the guest ranges of a checked transmit chain's frame (after the
/// `hdr_len` header bytes), in order, to a callback (for a gather write
/// straight from guest memory). Returns the frame's length.
pub fn tx_pieces<T>(
    segments: &[T],
    hdr_len: usize,
    max_frame: usize,
    mut piece: impl FnMut(u64, u32),
) -> Result<u32, NetError>
where
    T: Copy + Into<Segment>,
{
    let len = tx_check(segments, hdr_len, max_frame)?;
    let mut skip = hdr_len as u64;
    for s in nonempty(segments) {
        let l = u64::from(s.len);
        if skip >= l {
            skip -= l;
            continue;
        }
        piece(s.addr + skip, (l - skip) as u32);
        skip = 0;
    }
    Ok(len)
}

// ---------------------------------------------------------------------------
// Receive.

/// Checks a receive chain when it is popped: device-writable buffers only,
/// no address overflow, room for at least the header. Returns its
/// capacity in bytes.
pub fn rx_capacity<T>(segments: &[T], hdr_len: usize) -> Result<u32, NetError>
where
    T: Copy + Into<Segment>,
{
    let mut total = 0u32;
    for s in nonempty(segments) {
        if !s.writable {
            return Err(NetError::ReadableInRx);
        }
        if s.addr.checked_add(u64::from(s.len)).is_none() {
            return Err(NetError::AddressOverflow);
        }
        total = total.saturating_add(s.len);
    }
    if (total as usize) < hdr_len {
        return Err(NetError::BufferTooSmall(total));
    }
    Ok(total)
}

/// Writes `data` at byte `at` of the writable stream of `segments`;
/// returns the bytes written (fewer if the stream ends).
fn write_at<T, M>(segments: &[T], mem: &M, at: usize, data: &[u8]) -> Result<usize, NetError>
where
    T: Copy + Into<Segment>,
    M: WriteGuest + ?Sized,
{
    let mut pos = 0usize;
    let mut done = 0usize;
    for s in nonempty(segments) {
        if done == data.len() {
            break;
        }
        // Saturating: a receive chain's lengths may add up past a 32-bit
        // usize (its total is only saturated to u32 by `rx_capacity`), and
        // the stream ends at the largest position anyway.
        let seg_end = pos.saturating_add(s.len as usize);
        let want = at + done;
        if want < seg_end {
            let inner = want - pos;
            let n = (seg_end - want).min(data.len() - done);
            mem.write(s.addr + inner as u64, &data[done..done + n])
                .map_err(|_| NetError::GuestMemory)?;
            done += n;
        }
        pos = seg_end;
    }
    Ok(done)
}

/// Writes one received frame into one receive chain: the first `hdr_len`
/// bytes of `hdr` (with `num_buffers` 1), then `frame`. Returns the used
/// length. The chain is checked with [`rx_capacity`]; one too small for
/// the whole frame is refused with [`NetError::NoRoom`] and left
/// untouched (keep it for a smaller frame, or drop the frame).
pub fn rx_fill<T, M>(
    segments: &[T],
    mem: &M,
    hdr: &VirtioNetHdr,
    hdr_len: usize,
    frame: &[u8],
) -> Result<u32, NetError>
where
    T: Copy + Into<Segment>,
    M: WriteGuest + ?Sized,
{
    let hdr_len = hdr_len.min(VirtioNetHdr::SIZE);
    let have = rx_capacity(segments, hdr_len)?;
    let need = u32::try_from(hdr_len + frame.len()).unwrap_or(u32::MAX);
    if need > have {
        return Err(NetError::NoRoom { need, have });
    }
    let mut h = *hdr;
    h.num_buffers = 1.into();
    write_at(segments, mem, 0, &h.as_bytes()[..hdr_len])?;
    write_at(segments, mem, hdr_len, frame)?;
    Ok(need)
}

/// An error of [`rx_fill_merged`]: which chain, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeError {
    /// The index of the chain refused (the chain count for
    /// [`NetError::NoRoom`]: more chains are needed).
    pub chain: usize,
    /// Why.
    pub error: NetError,
}

/// Writes one received frame over as many of `chains` as it needs
/// (MRG_RXBUF, 12-byte header): the header and the frame's start in the
/// first, the rest in the following ones in order, `num_buffers` in the
/// first header. The used length of each chain goes to `used`; returns
/// how many chains were used (at most `used.len()`).
///
/// The chains are checked first ([`rx_capacity`]): a bad one is named in
/// the error, and with [`NetError::NoRoom`] (all of them, or `used.len()`
/// of them, are too small) nothing is written.
pub fn rx_fill_merged<C, T, M>(
    chains: &[C],
    mem: &M,
    hdr: &VirtioNetHdr,
    frame: &[u8],
    used: &mut [u32],
) -> Result<usize, MergeError>
where
    C: AsRef<[T]>,
    T: Copy + Into<Segment>,
    M: WriteGuest + ?Sized,
{
    let hdr_len = VirtioNetHdr::SIZE;
    let need = hdr_len + frame.len();
    let mut have = 0usize;
    let mut count = 0usize;
    let limit = used.len().min(chains.len()).min(usize::from(u16::MAX));
    for (i, c) in chains.iter().take(limit).enumerate() {
        let cap =
            rx_capacity(c.as_ref(), hdr_len).map_err(|error| MergeError { chain: i, error })?;
        used[i] = cap;
        // Saturating: chains of 4 GiB each add up past a 32-bit usize.
        have = have.saturating_add(cap as usize);
        count = i + 1;
        if have >= need {
            break;
        }
    }
    if have < need {
        return Err(MergeError {
            chain: count,
            error: NetError::NoRoom {
                need: u32::try_from(need).unwrap_or(u32::MAX),
                have: u32::try_from(have).unwrap_or(u32::MAX),
            },
        });
    }
    let mut h = *hdr;
    h.num_buffers = (count as u16).into();
    let mut rest = frame;
    for (i, c) in chains.iter().take(count).enumerate() {
        let segs = c.as_ref();
        let mut at = 0usize;
        if i == 0 {
            write_at(segs, mem, 0, h.as_bytes()).map_err(|error| MergeError { chain: 0, error })?;
            at = hdr_len;
        }
        let room = (used[i] as usize).saturating_sub(at);
        let n = room.min(rest.len());
        write_at(segs, mem, at, &rest[..n]).map_err(|error| MergeError { chain: i, error })?;
        rest = &rest[n..];
        used[i] = (at + n) as u32;
    }
    Ok(count)
}

#[cfg(test)]
mod tests;

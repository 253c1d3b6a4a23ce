//! virtio-blk (virtio 1.3, section 5.2): feature bits, the config space,
//! the request format and a pure request planner.
//!
//! The flow for a back-end:
//!
//! 1. Build a [`BlkDevice`] from a [`BlkConfig`]; offer
//!    [`BlkDevice::offered_features`] (plus the transport bits such as
//!    VERSION_1) in GET_FEATURES.
//! 2. On SET_FEATURES call [`BlkDevice::set_features`]; serve GET_CONFIG
//!    with [`BlkDevice::read_config`] and SET_CONFIG with
//!    [`BlkDevice::write_config`].
//! 3. For every popped chain call [`BlkDevice::plan_into`]: it validates the
//!    chain and the request header and yields a [`BlkRequest`], a plan that
//!    says what to do ([`BlkOp`]), where the data lives, and where the
//!    status byte goes. A malformed request becomes
//!    [`BlkOp::Fail`]: write its status and complete the chain.
//! 4. Do the I/O, then [`BlkRequest::write_status`] and complete the chain
//!    with [`BlkRequest::used_len`] bytes.
//!
//! All multi-byte fields of virtio-blk are little-endian (VIRTIO_F_VERSION_1);
//! the raw structs use zerocopy's little-endian types, alignment 1, so any
//! byte slice of the right length is a valid value.

// zerocopy's derives generate hidden helper types without Debug.
#![allow(missing_debug_implementations)]

use core::fmt;

use bitflags::bitflags;
use heapless::Vec;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{ReadGuest, Segment, WriteGuest};
use crate::feature::VirtioFeatures;
use crate::message::ConfigWriteKind;

/// The virtio-blk sector: offsets and capacity are counted in 512 bytes,
/// whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the device id string (VIRTIO_BLK_ID_BYTES).
pub const BLK_ID_BYTES: usize = 20;
/// Data segments a default [`BlkRequest`] holds (the vring engine's default
/// chain capacity: a chain never yields more data pieces than descriptors).
pub const DEFAULT_PLAN_SEGMENTS: usize = 64;
/// Discard / write-zeroes ranges a default [`BlkRequest`] holds.
pub const DEFAULT_PLAN_RANGES: usize = 16;

/// VIRTIO_BLK_T_IN: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// VIRTIO_BLK_T_OUT: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// VIRTIO_BLK_T_FLUSH.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// VIRTIO_BLK_T_GET_ID: the 20-byte device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// VIRTIO_BLK_T_GET_LIFETIME (not supported: answered UNSUPP).
pub const VIRTIO_BLK_T_GET_LIFETIME: u32 = 10;
/// VIRTIO_BLK_T_DISCARD.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// VIRTIO_BLK_T_WRITE_ZEROES.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// VIRTIO_BLK_T_SECURE_ERASE (not supported: answered UNSUPP).
pub const VIRTIO_BLK_T_SECURE_ERASE: u32 = 14;

/// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: bit 0 of a range's flags.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

bitflags! {
    /// The virtio-blk device feature bits (0-23 of the virtio feature word).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct BlkFeatures: u64 {
        /// VIRTIO_BLK_F_SIZE_MAX: `size_max` is valid.
        const SIZE_MAX = 1 << 1;
        /// VIRTIO_BLK_F_SEG_MAX: `seg_max` is valid.
        const SEG_MAX = 1 << 2;
        /// VIRTIO_BLK_F_GEOMETRY: `geometry` is valid.
        const GEOMETRY = 1 << 4;
        /// VIRTIO_BLK_F_RO: the device is read-only.
        const RO = 1 << 5;
        /// VIRTIO_BLK_F_BLK_SIZE: `blk_size` is valid.
        const BLK_SIZE = 1 << 6;
        /// VIRTIO_BLK_F_FLUSH: VIRTIO_BLK_T_FLUSH is supported.
        const FLUSH = 1 << 9;
        /// VIRTIO_BLK_F_TOPOLOGY: `topology` is valid.
        const TOPOLOGY = 1 << 10;
        /// VIRTIO_BLK_F_CONFIG_WCE: `writeback` can be read and set.
        const CONFIG_WCE = 1 << 11;
        /// VIRTIO_BLK_F_MQ: `num_queues` is valid.
        const MQ = 1 << 12;
        /// VIRTIO_BLK_F_DISCARD: VIRTIO_BLK_T_DISCARD is supported.
        const DISCARD = 1 << 13;
        /// VIRTIO_BLK_F_WRITE_ZEROES: VIRTIO_BLK_T_WRITE_ZEROES is supported.
        const WRITE_ZEROES = 1 << 14;
        /// VIRTIO_BLK_F_LIFETIME (never offered here).
        const LIFETIME = 1 << 15;
        /// VIRTIO_BLK_F_SECURE_ERASE (never offered here).
        const SECURE_ERASE = 1 << 16;
        /// VIRTIO_BLK_F_ZONED (never offered here).
        const ZONED = 1 << 17;
    }
}

impl BlkFeatures {
    /// The same bits as a virtio feature word.
    pub const fn to_virtio(self) -> VirtioFeatures {
        VirtioFeatures::from_bits_retain(self.bits())
    }

    /// The virtio-blk bits of a virtio feature word (others dropped).
    pub const fn from_virtio(features: VirtioFeatures) -> Self {
        BlkFeatures::from_bits_truncate(features.bits())
    }
}

// ---------------------------------------------------------------------------
// Raw wire structs.

/// `struct virtio_blk_geometry` (legacy disk geometry).
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
pub struct VirtioBlkGeometry {
    /// Cylinders.
    pub cylinders: U16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}
const _: () = assert!(core::mem::size_of::<VirtioBlkGeometry>() == 4);

/// `struct virtio_blk_topology`.
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
pub struct VirtioBlkTopology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: U16,
    /// Optimal (suggested maximum) I/O size, in logical blocks.
    pub opt_io_size: U32,
}
const _: () = assert!(core::mem::size_of::<VirtioBlkTopology>() == 8);

/// `struct virtio_blk_zoned_characteristics` (VIRTIO_BLK_F_ZONED; always
/// zero here, present so the config space has its full 96-byte size).
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
pub struct VirtioBlkZoned {
    /// Zone size in sectors.
    pub zone_sectors: U32,
    /// Maximum open zones.
    pub max_open_zones: U32,
    /// Maximum active zones.
    pub max_active_zones: U32,
    /// Maximum zone-append size in sectors.
    pub max_append_sectors: U32,
    /// Write granularity in bytes.
    pub write_granularity: U32,
    /// Zoned model.
    pub model: u8,
    /// Padding.
    pub unused2: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<VirtioBlkZoned>() == 24);

/// `struct virtio_blk_config`, the device config space (96 bytes, as in
/// Linux's `include/uapi/linux/virtio_blk.h` and virtio 1.3 section 5.2.4).
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
pub struct VirtioBlkConfig {
    /// Capacity in 512-byte sectors (offset 0).
    pub capacity: U64,
    /// Maximum size of one segment (offset 8, SIZE_MAX).
    pub size_max: U32,
    /// Maximum number of data segments of a request (offset 12, SEG_MAX).
    pub seg_max: U32,
    /// Geometry (offset 16, GEOMETRY).
    pub geometry: VirtioBlkGeometry,
    /// Logical block size (offset 20, BLK_SIZE).
    pub blk_size: U32,
    /// Topology (offset 24, TOPOLOGY).
    pub topology: VirtioBlkTopology,
    /// Cache mode: 0 writethrough, 1 writeback (offset 32, CONFIG_WCE).
    pub writeback: u8,
    /// Padding (offset 33).
    pub unused0: u8,
    /// Number of request queues (offset 34, MQ).
    pub num_queues: U16,
    /// Maximum sectors of one discard range (offset 36, DISCARD).
    pub max_discard_sectors: U32,
    /// Maximum ranges of one discard request (offset 40, DISCARD).
    pub max_discard_seg: U32,
    /// Discard alignment hint in sectors (offset 44, DISCARD).
    pub discard_sector_alignment: U32,
    /// Maximum sectors of one write-zeroes range (offset 48, WRITE_ZEROES).
    pub max_write_zeroes_sectors: U32,
    /// Maximum ranges of one write-zeroes request (offset 52, WRITE_ZEROES).
    pub max_write_zeroes_seg: U32,
    /// Write zeroes may deallocate (offset 56, WRITE_ZEROES).
    pub write_zeroes_may_unmap: u8,
    /// Padding (offset 57).
    pub unused1: [u8; 3],
    /// Maximum sectors of one secure-erase range (offset 60, SECURE_ERASE).
    pub max_secure_erase_sectors: U32,
    /// Maximum ranges of one secure-erase request (offset 64, SECURE_ERASE).
    pub max_secure_erase_seg: U32,
    /// Secure-erase alignment in sectors (offset 68, SECURE_ERASE).
    pub secure_erase_sector_alignment: U32,
    /// Zoned characteristics (offset 72, ZONED).
    pub zoned: VirtioBlkZoned,
}
const _: () = assert!(core::mem::size_of::<VirtioBlkConfig>() == 96);

impl VirtioBlkConfig {
    /// Size of the config space in bytes.
    pub const SIZE: usize = 96;
    /// Offset of the `writeback` byte, the only field a front-end may write.
    pub const WRITEBACK_OFFSET: usize = core::mem::offset_of!(VirtioBlkConfig, writeback);
}

/// `struct virtio_blk_outhdr`: the 16 device-readable bytes that start
/// every request.
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
pub struct VirtioBlkOutHdr {
    /// Request type (`VIRTIO_BLK_T_*`).
    pub type_: U32,
    /// Reserved (ioprio in legacy drivers); ignored.
    pub ioprio: U32,
    /// First sector of IN/OUT.
    pub sector: U64,
}
const _: () = assert!(core::mem::size_of::<VirtioBlkOutHdr>() == 16);

impl VirtioBlkOutHdr {
    /// Size on the wire.
    pub const SIZE: usize = 16;
}

/// `struct virtio_blk_discard_write_zeroes`: one range of a discard or
/// write-zeroes request.
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
pub struct VirtioBlkDiscardWriteZeroes {
    /// First sector.
    pub sector: U64,
    /// Number of sectors.
    pub num_sectors: U32,
    /// Bit 0: UNMAP (write zeroes only); other bits reserved.
    pub flags: U32,
}
const _: () = assert!(core::mem::size_of::<VirtioBlkDiscardWriteZeroes>() == 16);

impl VirtioBlkDiscardWriteZeroes {
    /// Size on the wire.
    pub const SIZE: usize = 16;
}

// ---------------------------------------------------------------------------
// Status and errors.

/// The status byte written at the end of every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum BlkStatus {
    /// VIRTIO_BLK_S_OK.
    Ok = 0,
    /// VIRTIO_BLK_S_IOERR.
    IoErr = 1,
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupp = 2,
}

/// Why a request was refused; [`BlkError::status`] is the status byte the
/// guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BlkError {
    /// No device-writable byte for the status: the chain is completed
    /// without writing anything.
    NoStatus,
    /// A segment's `addr + len` overflows 64 bits.
    AddressOverflow,
    /// A device-readable segment follows a device-writable one.
    BadOrder,
    /// Fewer than 16 device-readable bytes: no complete header.
    HeaderTooShort,
    /// Guest memory could not be read (header or ranges).
    GuestMemory,
    /// Request type not supported (UNSUPP).
    UnknownType(u32),
    /// Request type whose feature was not negotiated (UNSUPP).
    NotNegotiated(u32),
    /// A write, discard or write zeroes to a read-only device.
    ReadOnly,
    /// Data in the wrong direction: device-writable data for a request that
    /// only reads guest memory, or device-readable data for one that only
    /// writes it.
    WrongDirection,
    /// Data length not a multiple of 512 bytes (the length).
    BadLength(u64),
    /// Offset or length not a multiple of the logical block size.
    Misaligned,
    /// The sector range overflows or ends beyond the capacity.
    OutOfRange,
    /// More data segments than `seg_max` or the plan can hold.
    TooManySegments,
    /// Discard / write-zeroes payload empty or not a multiple of 16 bytes.
    BadRanges,
    /// More ranges than `max_*_seg` or the plan can hold.
    TooManyRanges,
    /// A range longer than `max_*_sectors`.
    RangeTooLong,
    /// Unknown range flags, or UNMAP on a discard (UNSUPP).
    BadFlags(u32),
}

impl BlkError {
    /// The status byte for this error.
    pub const fn status(self) -> BlkStatus {
        match self {
            BlkError::UnknownType(_) | BlkError::NotNegotiated(_) | BlkError::BadFlags(_) => {
                BlkStatus::Unsupp
            }
            _ => BlkStatus::IoErr,
        }
    }
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BlkError::NoStatus => f.write_str("no device-writable status byte"),
            BlkError::AddressOverflow => f.write_str("descriptor address range overflows"),
            BlkError::BadOrder => f.write_str("device-readable descriptor after a writable one"),
            BlkError::HeaderTooShort => f.write_str("request header shorter than 16 bytes"),
            BlkError::GuestMemory => f.write_str("guest memory access failed"),
            BlkError::UnknownType(t) => write!(f, "unsupported request type {t}"),
            BlkError::NotNegotiated(t) => {
                write!(
                    f,
                    "request type {t} needs a feature that was not negotiated"
                )
            }
            BlkError::ReadOnly => f.write_str("write to a read-only device"),
            BlkError::WrongDirection => f.write_str("request data in the wrong direction"),
            BlkError::BadLength(l) => write!(f, "data length {l} is not a multiple of 512"),
            BlkError::Misaligned => f.write_str("request not aligned to the logical block size"),
            BlkError::OutOfRange => f.write_str("sector range beyond the capacity"),
            BlkError::TooManySegments => f.write_str("too many data segments"),
            BlkError::BadRanges => f.write_str("discard/write-zeroes payload malformed"),
            BlkError::TooManyRanges => f.write_str("too many discard/write-zeroes ranges"),
            BlkError::RangeTooLong => f.write_str("discard/write-zeroes range too long"),
            BlkError::BadFlags(fl) => write!(f, "unsupported range flags {fl:#x}"),
        }
    }
}

impl core::error::Error for BlkError {}

/// A device configuration that was refused, or a config-space access that
/// was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BlkConfigError {
    /// Logical block size not a power of two in 512..=65536.
    BadBlockSize(u32),
    /// Capacity in bytes does not fit in 64 bits.
    CapacityTooLarge,
    /// `num_queues` is 0.
    NoQueues,
    /// CONFIG_WCE offered without FLUSH (the spec requires FLUSH with it).
    WceWithoutFlush,
    /// Discard or write-zeroes limits with a zero maximum.
    BadLimits,
    /// A config access beyond the config space.
    OutOfRange {
        /// Offset of the access.
        offset: u32,
        /// Length of the access.
        len: u32,
    },
    /// A front-end write to a read-only field (the offset of the first
    /// changed byte).
    ReadOnlyField(u32),
    /// A front-end write of `writeback` without CONFIG_WCE negotiated.
    WceNotNegotiated,
    /// A `writeback` value other than 0 or 1.
    BadWriteback(u8),
}

impl fmt::Display for BlkConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BlkConfigError::BadBlockSize(s) => {
                write!(f, "block size {s} is not a power of two in 512..=65536")
            }
            BlkConfigError::CapacityTooLarge => f.write_str("capacity overflows 64-bit bytes"),
            BlkConfigError::NoQueues => f.write_str("num_queues must be at least 1"),
            BlkConfigError::WceWithoutFlush => f.write_str("CONFIG_WCE requires FLUSH"),
            BlkConfigError::BadLimits => {
                f.write_str("discard/write-zeroes limits must be non-zero")
            }
            BlkConfigError::OutOfRange { offset, len } => {
                write!(f, "config access {offset}+{len} beyond 96 bytes")
            }
            BlkConfigError::ReadOnlyField(o) => write!(f, "config byte {o} is read-only"),
            BlkConfigError::WceNotNegotiated => {
                f.write_str("writeback written without CONFIG_WCE negotiated")
            }
            BlkConfigError::BadWriteback(v) => write!(f, "writeback value {v} is not 0 or 1"),
        }
    }
}

impl core::error::Error for BlkConfigError {}

// ---------------------------------------------------------------------------
// Device configuration.

/// Optimal-I/O hints (VIRTIO_BLK_F_TOPOLOGY).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Topology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size, in logical blocks.
    pub opt_io_size: u32,
}

/// Discard support (VIRTIO_BLK_F_DISCARD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DiscardLimits {
    /// Maximum sectors of one range (non-zero).
    pub max_sectors: u32,
    /// Maximum ranges of one request (non-zero).
    pub max_seg: u32,
    /// Alignment hint for the driver, in sectors.
    pub sector_alignment: u32,
}

/// Write-zeroes support (VIRTIO_BLK_F_WRITE_ZEROES).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct WriteZeroesLimits {
    /// Maximum sectors of one range (non-zero).
    pub max_sectors: u32,
    /// Maximum ranges of one request (non-zero).
    pub max_seg: u32,
    /// The device may deallocate zeroed ranges (the UNMAP flag is honoured).
    pub may_unmap: bool,
}

/// What a back-end serves: the Rust-side description from which the config
/// space and the offered feature bits are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size in bytes (power of two, 512..=65536); offered as
    /// BLK_SIZE.
    pub blk_size: u32,
    /// Number of request queues (at least 1); MQ is always offered.
    pub num_queues: u16,
    /// Maximum data segments per request, SEG_MAX when non-zero. Keep it at
    /// most `queue size - 2` and the plan's segment capacity.
    pub seg_max: u32,
    /// Maximum bytes per segment, SIZE_MAX when non-zero.
    pub size_max: u32,
    /// Offer RO: writes, discards and write zeroes fail with IOERR.
    pub read_only: bool,
    /// Offer FLUSH.
    pub flush: bool,
    /// Offer CONFIG_WCE (requires `flush`).
    pub config_wce: bool,
    /// Initial cache mode: true = writeback, false = writethrough.
    pub writeback: bool,
    /// TOPOLOGY hints, offered when set.
    pub topology: Option<Topology>,
    /// DISCARD, offered when set.
    pub discard: Option<DiscardLimits>,
    /// WRITE_ZEROES, offered when set.
    pub write_zeroes: Option<WriteZeroesLimits>,
    /// The id string returned by GET_ID (NUL padded).
    pub serial: [u8; BLK_ID_BYTES],
}

impl BlkConfig {
    /// A read-write device of `capacity` 512-byte sectors with 512-byte
    /// blocks, one queue, `seg_max` = [`DEFAULT_PLAN_SEGMENTS`] - 2, FLUSH
    /// and CONFIG_WCE in writeback mode, no discard, no write zeroes, an
    /// empty serial.
    pub const fn new(capacity: u64) -> Self {
        BlkConfig {
            capacity,
            blk_size: 512,
            num_queues: 1,
            seg_max: DEFAULT_PLAN_SEGMENTS as u32 - 2,
            size_max: 0,
            read_only: false,
            flush: true,
            config_wce: true,
            writeback: true,
            topology: None,
            discard: None,
            write_zeroes: None,
            serial: [0; BLK_ID_BYTES],
        }
    }

    /// Sets the id string: `serial` truncated to 20 bytes, NUL padded.
    pub fn set_serial(&mut self, serial: &[u8]) {
        self.serial = [0; BLK_ID_BYTES];
        let n = serial.len().min(BLK_ID_BYTES);
        self.serial[..n].copy_from_slice(&serial[..n]);
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), BlkConfigError> {
        if !self.blk_size.is_power_of_two() || !(512..=65536).contains(&self.blk_size) {
            return Err(BlkConfigError::BadBlockSize(self.blk_size));
        }
        if self.capacity > u64::MAX >> SECTOR_SHIFT {
            return Err(BlkConfigError::CapacityTooLarge);
        }
        if self.num_queues == 0 {
            return Err(BlkConfigError::NoQueues);
        }
        if self.config_wce && !self.flush {
            return Err(BlkConfigError::WceWithoutFlush);
        }
        if let Some(d) = self.discard {
            if d.max_sectors == 0 || d.max_seg == 0 {
                return Err(BlkConfigError::BadLimits);
            }
        }
        if let Some(w) = self.write_zeroes {
            if w.max_sectors == 0 || w.max_seg == 0 {
                return Err(BlkConfigError::BadLimits);
            }
        }
        Ok(())
    }

    /// The device feature bits this configuration offers.
    pub fn features(&self) -> BlkFeatures {
        let mut f = BlkFeatures::BLK_SIZE | BlkFeatures::MQ;
        f.set(BlkFeatures::SIZE_MAX, self.size_max != 0);
        f.set(BlkFeatures::SEG_MAX, self.seg_max != 0);
        f.set(BlkFeatures::RO, self.read_only);
        f.set(BlkFeatures::FLUSH, self.flush);
        f.set(BlkFeatures::CONFIG_WCE, self.config_wce);
        f.set(BlkFeatures::TOPOLOGY, self.topology.is_some());
        f.set(BlkFeatures::DISCARD, self.discard.is_some());
        f.set(BlkFeatures::WRITE_ZEROES, self.write_zeroes.is_some());
        f
    }

    /// The config space for this configuration.
    pub fn config_space(&self) -> VirtioBlkConfig {
        let mut c = VirtioBlkConfig {
            capacity: self.capacity.into(),
            size_max: self.size_max.into(),
            seg_max: self.seg_max.into(),
            blk_size: self.blk_size.into(),
            writeback: u8::from(self.writeback),
            num_queues: self.num_queues.into(),
            ..VirtioBlkConfig::default()
        };
        if let Some(t) = self.topology {
            c.topology = VirtioBlkTopology {
                physical_block_exp: t.physical_block_exp,
                alignment_offset: t.alignment_offset,
                min_io_size: t.min_io_size.into(),
                opt_io_size: t.opt_io_size.into(),
            };
        }
        if let Some(d) = self.discard {
            c.max_discard_sectors = d.max_sectors.into();
            c.max_discard_seg = d.max_seg.into();
            c.discard_sector_alignment = d.sector_alignment.into();
        }
        if let Some(w) = self.write_zeroes {
            c.max_write_zeroes_sectors = w.max_sectors.into();
            c.max_write_zeroes_seg = w.max_seg.into();
            c.write_zeroes_may_unmap = u8::from(w.may_unmap);
        }
        c
    }
}

// ---------------------------------------------------------------------------
// The device.

/// `x` is not a multiple of `bs`, a power of two (a mask, not a 64-bit
/// division: bare-metal targets have no divide instruction for it).
#[inline]
fn misaligned(x: u64, bs: u64) -> bool {
    x & (bs - 1) != 0
}

/// A virtio-blk device model: config space, offered and acked features, the
/// id string, and the request planner.
///
/// The config space is the source of truth for the planner (capacity,
/// limits), so a migration write that changes a field takes effect at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkDevice {
    initial: VirtioBlkConfig,
    space: VirtioBlkConfig,
    offered: BlkFeatures,
    acked: BlkFeatures,
    serial: [u8; BLK_ID_BYTES],
}

impl BlkDevice {
    /// Builds the device; the configuration is validated first.
    pub fn new(config: &BlkConfig) -> Result<Self, BlkConfigError> {
        config.validate()?;
        let space = config.config_space();
        Ok(BlkDevice {
            initial: space,
            space,
            offered: config.features(),
            acked: BlkFeatures::empty(),
            serial: config.serial,
        })
    }

    /// The device feature bits to offer (GET_FEATURES), without the
    /// transport bits (VERSION_1, EVENT_IDX, ...) the back-end adds.
    pub fn offered_features(&self) -> VirtioFeatures {
        self.offered.to_virtio()
    }

    /// Records the negotiated features (SET_FEATURES). With CONFIG_WCE but
    /// not FLUSH the spec makes the device writethrough: `writeback` is set
    /// to 0. Bits that were not offered are ignored.
    pub fn set_features(&mut self, acked: VirtioFeatures) {
        self.acked = BlkFeatures::from_virtio(acked) & self.offered;
        if self.acked.contains(BlkFeatures::CONFIG_WCE) && !self.acked.contains(BlkFeatures::FLUSH)
        {
            self.space.writeback = 0;
        }
    }

    /// The negotiated device bits.
    pub fn acked_features(&self) -> BlkFeatures {
        self.acked
    }

    /// Back to the state after [`BlkDevice::new`]: initial config space, no
    /// features acked (device reset, new connection).
    pub fn reset(&mut self) {
        self.space = self.initial;
        self.acked = BlkFeatures::empty();
    }

    /// The current config space.
    pub fn config_space(&self) -> &VirtioBlkConfig {
        &self.space
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.space.capacity.get()
    }

    /// The disk is now `sectors` long (it was resized): the config space,
    /// and the one a reset returns to, say so; requests are checked against
    /// it from now on. Returns whether the capacity changed (then tell the
    /// front-end: BACKEND_CONFIG_CHANGE_MSG).
    pub fn set_capacity(&mut self, sectors: u64) -> Result<bool, BlkConfigError> {
        if sectors > u64::MAX >> SECTOR_SHIFT {
            return Err(BlkConfigError::CapacityTooLarge);
        }
        let changed = self.capacity() != sectors;
        self.space.capacity = sectors.into();
        self.initial.capacity = sectors.into();
        Ok(changed)
    }

    /// The device is read-only (RO offered).
    pub fn read_only(&self) -> bool {
        self.offered.contains(BlkFeatures::RO)
    }

    /// The id string GET_ID returns.
    pub fn serial(&self) -> &[u8; BLK_ID_BYTES] {
        &self.serial
    }

    /// Whether completed writes must be stable before they are reported
    /// (virtio 1.3 section 5.2.6.2): with CONFIG_WCE negotiated when
    /// `writeback` is 0, otherwise when FLUSH was not negotiated.
    pub fn writethrough(&self) -> bool {
        if self.acked.contains(BlkFeatures::CONFIG_WCE) {
            self.space.writeback == 0
        } else {
            !self.acked.contains(BlkFeatures::FLUSH)
        }
    }

    /// GET_CONFIG: copies `dst.len()` config bytes from `offset`.
    ///
    /// Refuses (and leaves `dst` untouched) any range that does not lie
    /// within the 96-byte config space.
    pub fn read_config(&self, offset: u32, dst: &mut [u8]) -> Result<(), BlkConfigError> {
        let range = config_range(offset, dst.len())?;
        dst.copy_from_slice(&self.space.as_bytes()[range]);
        Ok(())
    }

    /// SET_CONFIG: writes `src` at `offset`.
    ///
    /// A [`ConfigWriteKind::Frontend`] write may only change `writeback`
    /// (offset 32), to 0 or 1, and only with CONFIG_WCE negotiated; other
    /// bytes in the range must hold their current value. A
    /// [`ConfigWriteKind::Migration`] write may set any byte. A refused
    /// write changes nothing.
    pub fn write_config(
        &mut self,
        offset: u32,
        src: &[u8],
        kind: ConfigWriteKind,
    ) -> Result<(), BlkConfigError> {
        let range = config_range(offset, src.len())?;
        if kind == ConfigWriteKind::Frontend {
            let current = &self.space.as_bytes()[range.clone()];
            for (i, (&new, &old)) in src.iter().zip(current).enumerate() {
                let at = range.start + i;
                if at == VirtioBlkConfig::WRITEBACK_OFFSET {
                    if new > 1 {
                        return Err(BlkConfigError::BadWriteback(new));
                    }
                    if new != old && !self.acked.contains(BlkFeatures::CONFIG_WCE) {
                        return Err(BlkConfigError::WceNotNegotiated);
                    }
                } else if new != old {
                    return Err(BlkConfigError::ReadOnlyField(at as u32));
                }
            }
        }
        self.space.as_mut_bytes()[range].copy_from_slice(src);
        Ok(())
    }

    /// Plans the request in `segments` (a popped chain, device-readable
    /// segments first) into `out`, reading the header and any ranges from
    /// guest memory through `mem`. Never fails and never panics: a
    /// malformed request yields [`BlkOp::Fail`].
    ///
    /// The layout rules (virtio 1.3 section 5.2.6, any layout): the 16-byte
    /// header is the first 16 device-readable bytes, possibly spread over
    /// several segments; OUT data, discard and write-zeroes ranges are the
    /// device-readable bytes after it; IN and GET_ID data are the
    /// device-writable bytes; the status is the last byte of the last
    /// device-writable segment, which may also hold data.
    pub fn plan_into<T, M, const S: usize, const R: usize>(
        &self,
        segments: &[T],
        mem: &M,
        out: &mut BlkRequest<S, R>,
    ) where
        T: Copy + Into<Segment>,
        M: ReadGuest + ?Sized,
    {
        out.data.clear();
        out.ranges.clear();
        out.status = None;
        out.data_len = 0;
        out.writethrough = self.writethrough();
        out.op = match self.plan_inner(segments, mem, out) {
            Ok(op) => op,
            Err(error) => {
                out.data.clear();
                out.ranges.clear();
                out.data_len = 0;
                BlkOp::Fail {
                    status: error.status(),
                    error,
                }
            }
        };
    }

    /// [`BlkDevice::plan_into`] into a fresh default-sized [`BlkRequest`].
    pub fn plan<T, M>(&self, segments: &[T], mem: &M) -> BlkRequest
    where
        T: Copy + Into<Segment>,
        M: ReadGuest + ?Sized,
    {
        let mut req = BlkRequest::new();
        self.plan_into(segments, mem, &mut req);
        req
    }

    fn plan_inner<T, M, const S: usize, const R: usize>(
        &self,
        segments: &[T],
        mem: &M,
        out: &mut BlkRequest<S, R>,
    ) -> Result<BlkOp, BlkError>
    where
        T: Copy + Into<Segment>,
        M: ReadGuest + ?Sized,
    {
        // Layout: sizes, order, the status byte.
        let mut readable: u64 = 0;
        let mut writable: u64 = 0;
        let mut seen_writable = false;
        let mut bad_order = false;
        let mut overflow = false;
        let mut last_writable = None;
        for s in nonempty(segments) {
            if s.addr.checked_add(u64::from(s.len)).is_none() {
                overflow = true;
            }
            if s.writable {
                seen_writable = true;
                writable += u64::from(s.len);
                last_writable = Some(s);
            } else {
                bad_order |= seen_writable;
                readable += u64::from(s.len);
            }
        }
        let status = last_writable.and_then(|s| s.addr.checked_add(u64::from(s.len) - 1));
        out.status = status;
        if status.is_none() {
            return Err(if last_writable.is_some() {
                BlkError::AddressOverflow
            } else {
                BlkError::NoStatus
            });
        }
        if overflow {
            return Err(BlkError::AddressOverflow);
        }
        if bad_order {
            return Err(BlkError::BadOrder);
        }

        // The header.
        if readable < VirtioBlkOutHdr::SIZE as u64 {
            return Err(BlkError::HeaderTooShort);
        }
        let mut hdr = VirtioBlkOutHdr::default();
        read_readable(segments, 0, hdr.as_mut_bytes(), mem)?;
        let out_data = readable - VirtioBlkOutHdr::SIZE as u64;
        let in_data = writable - 1;

        let ty = hdr.type_.get();
        match ty {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let is_read = ty == VIRTIO_BLK_T_IN;
                if !is_read && self.read_only() {
                    return Err(BlkError::ReadOnly);
                }
                let (len, wrong) = if is_read {
                    (in_data, out_data)
                } else {
                    (out_data, in_data)
                };
                if wrong != 0 {
                    return Err(BlkError::WrongDirection);
                }
                let offset = self.check_io(hdr.sector.get(), len)?;
                if is_read {
                    self.collect(segments, true, 0, len, out)?;
                    Ok(BlkOp::Read { offset, len })
                } else {
                    self.collect(segments, false, VirtioBlkOutHdr::SIZE as u64, len, out)?;
                    Ok(BlkOp::Write { offset, len })
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.acked.contains(BlkFeatures::FLUSH) {
                    return Err(BlkError::NotNegotiated(ty));
                }
                Ok(BlkOp::Flush)
            }
            VIRTIO_BLK_T_GET_ID => {
                if out_data != 0 {
                    return Err(BlkError::WrongDirection);
                }
                let len = in_data.min(BLK_ID_BYTES as u64);
                self.collect(segments, true, 0, len, out)?;
                Ok(BlkOp::GetId { len: len as u32 })
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = ty == VIRTIO_BLK_T_DISCARD;
                let feature = if discard {
                    BlkFeatures::DISCARD
                } else {
                    BlkFeatures::WRITE_ZEROES
                };
                if !self.acked.contains(feature) {
                    return Err(BlkError::NotNegotiated(ty));
                }
                if self.read_only() {
                    return Err(BlkError::ReadOnly);
                }
                if in_data != 0 {
                    return Err(BlkError::WrongDirection);
                }
                self.ranges(segments, mem, discard, out_data, out)?;
                Ok(if discard {
                    BlkOp::Discard
                } else {
                    BlkOp::WriteZeroes
                })
            }
            _ => Err(BlkError::UnknownType(ty)),
        }
    }

    /// The logical block size the driver was told about (512 unless
    /// BLK_SIZE was negotiated with a sane value).
    /// The logical block size: a power of two (see [`misaligned`]).
    fn block_size(&self) -> u64 {
        let bs = self.space.blk_size.get();
        if self.acked.contains(BlkFeatures::BLK_SIZE) && bs.is_power_of_two() && bs >= 512 {
            u64::from(bs)
        } else {
            SECTOR_SIZE
        }
    }

    /// Validates an IN/OUT range; returns its byte offset.
    fn check_io(&self, sector: u64, len: u64) -> Result<u64, BlkError> {
        if len % SECTOR_SIZE != 0 {
            return Err(BlkError::BadLength(len));
        }
        let offset = self.check_range(sector, len >> SECTOR_SHIFT)?;
        let bs = self.block_size();
        if misaligned(offset, bs) || misaligned(len, bs) {
            return Err(BlkError::Misaligned);
        }
        Ok(offset)
    }

    /// `[sector, sector + sectors)` lies within the capacity; returns the
    /// byte offset.
    fn check_range(&self, sector: u64, sectors: u64) -> Result<u64, BlkError> {
        let end = sector.checked_add(sectors).ok_or(BlkError::OutOfRange)?;
        if end > self.capacity() {
            return Err(BlkError::OutOfRange);
        }
        sector.checked_mul(SECTOR_SIZE).ok_or(BlkError::OutOfRange)
    }

    /// Copies `take` bytes of the device-readable (`writable == false`) or
    /// device-writable stream, from byte `skip`, into the plan's data
    /// segments.
    fn collect<T, const S: usize, const R: usize>(
        &self,
        segments: &[T],
        writable: bool,
        skip: u64,
        take: u64,
        out: &mut BlkRequest<S, R>,
    ) -> Result<(), BlkError>
    where
        T: Copy + Into<Segment>,
    {
        let mut pos = 0u64;
        let end = skip + take;
        for s in nonempty(segments).filter(|s| s.writable == writable) {
            let (start, stop) = (pos, pos + u64::from(s.len));
            pos = stop;
            let lo = start.max(skip);
            let hi = stop.min(end);
            if lo < hi {
                let piece = Segment {
                    addr: s.addr + (lo - start),
                    len: (hi - lo) as u32,
                    writable,
                };
                out.data
                    .push(piece)
                    .map_err(|_| BlkError::TooManySegments)?;
            }
            if pos >= end {
                break;
            }
        }
        if self.acked.contains(BlkFeatures::SEG_MAX)
            && out.data.len() as u64 > u64::from(self.space.seg_max.get())
        {
            return Err(BlkError::TooManySegments);
        }
        out.data_len = take;
        Ok(())
    }

    /// Reads and validates the ranges of a discard / write-zeroes request
    /// (`payload` bytes after the header).
    fn ranges<T, M, const S: usize, const R: usize>(
        &self,
        segments: &[T],
        mem: &M,
        discard: bool,
        payload: u64,
        out: &mut BlkRequest<S, R>,
    ) -> Result<(), BlkError>
    where
        T: Copy + Into<Segment>,
        M: ReadGuest + ?Sized,
    {
        let size = VirtioBlkDiscardWriteZeroes::SIZE as u64;
        if payload == 0 || payload % size != 0 {
            return Err(BlkError::BadRanges);
        }
        let count = payload / size;
        let (max_seg, max_sectors) = if discard {
            (self.space.max_discard_seg, self.space.max_discard_sectors)
        } else {
            (
                self.space.max_write_zeroes_seg,
                self.space.max_write_zeroes_sectors,
            )
        };
        if count > u64::from(max_seg.get()) || count > R as u64 {
            return Err(BlkError::TooManyRanges);
        }
        let may_unmap = self.space.write_zeroes_may_unmap != 0;
        let bs = self.block_size();
        for i in 0..count {
            let mut raw = VirtioBlkDiscardWriteZeroes::default();
            read_readable(
                segments,
                VirtioBlkOutHdr::SIZE as u64 + i * size,
                raw.as_mut_bytes(),
                mem,
            )?;
            let flags = raw.flags.get();
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
                return Err(BlkError::BadFlags(flags));
            }
            let sectors = raw.num_sectors.get();
            if sectors > max_sectors.get() {
                return Err(BlkError::RangeTooLong);
            }
            let offset = self.check_range(raw.sector.get(), u64::from(sectors))?;
            let len = u64::from(sectors) << SECTOR_SHIFT;
            if misaligned(offset, bs) || misaligned(len, bs) {
                return Err(BlkError::Misaligned);
            }
            if sectors != 0 {
                let range = BlkRange {
                    offset,
                    len,
                    unmap: unmap && may_unmap,
                };
                // Cannot fail: count <= R was checked above.
                out.ranges
                    .push(range)
                    .map_err(|_| BlkError::TooManyRanges)?;
            }
        }
        Ok(())
    }
}

/// The byte range `[offset, offset + len)` of the config space, if valid.
fn config_range(offset: u32, len: usize) -> Result<core::ops::Range<usize>, BlkConfigError> {
    let bad = BlkConfigError::OutOfRange {
        offset,
        len: u32::try_from(len).unwrap_or(u32::MAX),
    };
    let start = offset as usize;
    let end = start.checked_add(len).ok_or(bad)?;
    if end > VirtioBlkConfig::SIZE {
        return Err(bad);
    }
    Ok(start..end)
}

/// The non-empty segments of a chain.
fn nonempty<T: Copy + Into<Segment>>(segments: &[T]) -> impl Iterator<Item = Segment> + '_ {
    segments
        .iter()
        .map(|&s| s.into())
        .filter(|s: &Segment| s.len != 0)
}

/// Reads `dst.len()` bytes of the device-readable stream, from byte `skip`.
/// The caller has checked that the stream is long enough.
fn read_readable<T, M>(segments: &[T], skip: u64, dst: &mut [u8], mem: &M) -> Result<(), BlkError>
where
    T: Copy + Into<Segment>,
    M: ReadGuest + ?Sized,
{
    let mut pos = 0u64;
    let mut done = 0usize;
    for s in nonempty(segments).filter(|s| !s.writable) {
        if done == dst.len() {
            break;
        }
        let (start, stop) = (pos, pos + u64::from(s.len));
        pos = stop;
        let want = skip + done as u64;
        if want >= stop {
            continue;
        }
        let inner = want - start;
        let n = ((stop - want) as usize).min(dst.len() - done);
        mem.read(s.addr + inner, &mut dst[done..done + n])
            .map_err(|_| BlkError::GuestMemory)?;
        done += n;
    }
    if done == dst.len() {
        Ok(())
    } else {
        Err(BlkError::GuestMemory)
    }
}

// ---------------------------------------------------------------------------
// The plan.

/// One validated discard / write-zeroes range, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlkRange {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes (never 0: empty ranges are dropped).
    pub len: u64,
    /// Write zeroes only: the driver allows, and the device advertises,
    /// deallocation.
    pub unmap: bool,
}

/// What a planned request asks the back-end to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BlkOp {
    /// Read `len` bytes at disk byte `offset` into the data segments.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes (a multiple of 512; may be 0).
        len: u64,
    },
    /// Write the `len` bytes of the data segments at disk byte `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes (a multiple of 512; may be 0).
        len: u64,
    },
    /// Make every completed write stable.
    Flush,
    /// Write the first `len` bytes of the id string into the data segments.
    GetId {
        /// Bytes to write (at most 20).
        len: u32,
    },
    /// Discard the plan's ranges (advisory: doing nothing is correct).
    Discard,
    /// Zero the plan's ranges.
    WriteZeroes,
    /// A malformed or unsupported request: do nothing but write `status`.
    Fail {
        /// The status to write.
        status: BlkStatus,
        /// Why, for logs and counters.
        error: BlkError,
    },
}

/// A validated virtio-blk request: what to do, the data segments, the
/// ranges and where the status byte goes. Holds up to `S` data segments
/// and `R` ranges; reuse one per worker with [`BlkDevice::plan_into`].
#[derive(Clone, Debug)]
pub struct BlkRequest<const S: usize = DEFAULT_PLAN_SEGMENTS, const R: usize = DEFAULT_PLAN_RANGES>
{
    op: BlkOp,
    status: Option<u64>,
    writethrough: bool,
    data_len: u64,
    data: Vec<Segment, S>,
    ranges: Vec<BlkRange, R>,
}

impl<const S: usize, const R: usize> Default for BlkRequest<S, R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const S: usize, const R: usize> BlkRequest<S, R> {
    /// An empty plan (a request without status), to be filled by
    /// [`BlkDevice::plan_into`].
    pub const fn new() -> Self {
        BlkRequest {
            op: BlkOp::Fail {
                status: BlkStatus::IoErr,
                error: BlkError::NoStatus,
            },
            status: None,
            writethrough: false,
            data_len: 0,
            data: Vec::new(),
            ranges: Vec::new(),
        }
    }

    /// What to do.
    pub fn op(&self) -> BlkOp {
        self.op
    }

    /// Guest physical address of the status byte; `None` when the chain has
    /// no device-writable byte (then nothing is written).
    pub fn status_addr(&self) -> Option<u64> {
        self.status
    }

    /// The data segments (device-readable for [`BlkOp::Write`],
    /// device-writable for [`BlkOp::Read`] and [`BlkOp::GetId`], empty
    /// otherwise), clipped to the data bytes: never the header nor the
    /// status byte.
    pub fn data(&self) -> &[Segment] {
        &self.data
    }

    /// Total bytes of [`BlkRequest::data`].
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// The ranges of a [`BlkOp::Discard`] or [`BlkOp::WriteZeroes`].
    pub fn ranges(&self) -> &[BlkRange] {
        &self.ranges
    }

    /// The request changes the disk and the device is in writethrough
    /// mode: make the change stable (flush) before completing it.
    pub fn sync_after(&self) -> bool {
        self.writethrough
            && matches!(
                self.op,
                BlkOp::Write { .. } | BlkOp::Discard | BlkOp::WriteZeroes
            )
    }

    /// The length to report in the used ring once the request completed
    /// with `status`: the bytes written into the chain (data read plus the
    /// status byte), 0 when there is no status byte.
    pub fn used_len(&self, status: BlkStatus) -> u32 {
        if self.status.is_none() {
            return 0;
        }
        let data = match (self.op, status) {
            (BlkOp::Read { .. } | BlkOp::GetId { .. }, BlkStatus::Ok) => self.data_len(),
            _ => 0,
        };
        u32::try_from(data + 1).unwrap_or(u32::MAX)
    }

    /// Copies data bytes, from byte `at` of the data, out of guest memory
    /// into `dst` (for [`BlkOp::Write`]). Fails if the data is shorter than
    /// `at + dst.len()` or guest memory refuses an access.
    pub fn read_data<M>(&self, mem: &M, at: u64, dst: &mut [u8]) -> Result<(), DataError<M::Error>>
    where
        M: ReadGuest + ?Sized,
    {
        let mut done = 0usize;
        walk(&self.data, at, dst.len(), |gpa, range| {
            mem.read(gpa, &mut dst[range.clone()])
                .map_err(DataError::Guest)?;
            done = range.end;
            Ok(())
        })?;
        if done == dst.len() {
            Ok(())
        } else {
            Err(DataError::Short)
        }
    }

    /// Copies `src` into guest memory at byte `at` of the data (for
    /// [`BlkOp::Read`] and [`BlkOp::GetId`]). Fails if the data is shorter
    /// than `at + src.len()` or guest memory refuses an access.
    pub fn write_data<M>(&self, mem: &M, at: u64, src: &[u8]) -> Result<(), DataError<M::Error>>
    where
        M: WriteGuest + ?Sized,
    {
        let mut done = 0usize;
        walk(&self.data, at, src.len(), |gpa, range| {
            mem.write(gpa, &src[range.clone()])
                .map_err(DataError::Guest)?;
            done = range.end;
            Ok(())
        })?;
        if done == src.len() {
            Ok(())
        } else {
            Err(DataError::Short)
        }
    }

    /// Writes the status byte (nothing when there is no status byte).
    pub fn write_status<M>(&self, mem: &M, status: BlkStatus) -> Result<(), M::Error>
    where
        M: WriteGuest + ?Sized,
    {
        match self.status {
            Some(addr) => mem.write(addr, &[status as u8]),
            None => Ok(()),
        }
    }
}

/// Calls `f(gpa, range_in_buffer)` for each piece of `len` data bytes
/// starting at byte `at` of `segments`.
fn walk<E>(
    segments: &[Segment],
    at: u64,
    len: usize,
    mut f: impl FnMut(u64, core::ops::Range<usize>) -> Result<(), E>,
) -> Result<(), E> {
    let mut pos = 0u64;
    let mut done = 0usize;
    for s in segments {
        if done == len {
            break;
        }
        let (start, stop) = (pos, pos + u64::from(s.len));
        pos = stop;
        let want = at.saturating_add(done as u64);
        if want >= stop {
            continue;
        }
        let n = usize::try_from(stop - want)
            .unwrap_or(usize::MAX)
            .min(len - done);
        f(s.addr + (want - start), done..done + n)?;
        done += n;
    }
    Ok(())
}

/// A data copy between a plan's segments and a host buffer failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DataError<E> {
    /// The buffer range goes beyond the request's data.
    Short,
    /// Guest memory refused an access.
    Guest(E),
}

impl<E: fmt::Display> fmt::Display for DataError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Short => f.write_str("buffer beyond the request's data"),
            DataError::Guest(e) => write!(f, "guest memory: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for DataError<E> {}

#[cfg(feature = "migration")]
pub mod state;

#[cfg(test)]
mod tests;

//! The back-end session engine: one [`Session::handle`] call per front-end
//! message.
//!
//! The engine is sans-I/O. The adapter reads a message and its fds, calls
//! `handle` with the bytes, the number of fds, read access to guest memory
//! and the device's control interface, and gets back an [`Outcome`]: the
//! reply bytes (written into the caller's buffer), or a pending reply, and a
//! bounded list of [`Action`]s to carry out with the message's fds (map a
//! region, install a kick eventfd, start or stop a ring's worker, …).
//!
//! Every front-end message id 1-45 is either implemented or refused with
//! [`BackendError::NotNegotiated`] because the feature that gates it was not
//! negotiated (and a back-end never offers a feature it does not implement).
//!
//! With the `net` feature the session also serves virtio-net's two
//! messages: NET_SET_MTU (a value outside 68..=65535 is refused, the rest
//! goes to `Device::set_mtu`, which may refuse it too) and SEND_RARP
//! (`Device::send_rarp`); either refusal is a failed REPLY_ACK.
//!
//! GET_VRING_BASE stops a ring: when the ring is running the engine returns
//! [`Reply::Pending`] together with [`Action::StopRing`]; the adapter lets
//! the ring's in-flight requests complete, then calls
//! [`Session::finish_stop`] with the ring's final state for the reply.
//!
//! Errors: a malformed message ([`BackendError::Wire`]) ends the connection.
//! A well-formed request that cannot be honoured is answered with a failed
//! REPLY_ACK when the front-end asked for one, and otherwise also ends the
//! connection, as libvhost-user and QEMU's own back-ends do.
//!
//! # Ring sizes and addresses
//!
//! A ring's size and addresses are refused on the message that sets them,
//! not later when the ring starts:
//!
//! * SET_VRING_NUM: above the device's `max_queue_size`, or, for a split
//!   ring, not a power of two (0 and sizes above 32768 are malformed and end
//!   the connection, [`WireError::BadValue`]).
//! * SET_VRING_ADDR: an area that is not inside guest memory for the ring
//!   size in place (descriptor table 16 bytes an entry; split avail
//!   `6 + 2 * size`, used `6 + 8 * size`; packed event areas 4 bytes), or
//!   whose guest physical address is misaligned for the layout (descriptors
//!   16, split avail 2, split used 4, packed event areas 4). Each area must
//!   lie inside **one** memory region: the Linux adapter maps every region
//!   on its own, so two regions adjacent in guest physical addresses are not
//!   adjacent in the back-end's address space and an area straddling them
//!   could not be served as one range.
//!
//! The layout (split or packed) is only known once SET_FEATURES says
//! whether VIRTIO_F_RING_PACKED was negotiated. Before it (and only when
//! packed rings are offered) SET_VRING_NUM and SET_VRING_ADDR check what
//! holds for both layouts, and SET_FEATURES checks those rings again for the
//! layout it chooses: it is refused if one of them does not fit.
//! SET_VRING_KICK checks everything once more before the ring starts.
//!
//! SET_VRING_NUM checks the size alone, since the addresses in place may be
//! stale ones that the next SET_VRING_ADDR replaces (QEMU sends NUM, BASE,
//! then ADDR). A memory update (SET_MEM_TABLE, ADD/REM_MEM_REG) is refused
//! when a *running* ring would no longer translate, but never because of a
//! stopped ring: QEMU re-sends memory tables while rings are stopped with the
//! addresses of their previous start (a guest reboot, memory hot-unplug) and
//! sends SET_VRING_ADDR again before restarting them. A stopped ring whose
//! addresses no longer translate is refused when it is started
//! (SET_VRING_KICK).
//!
//! # fds that cannot serve
//!
//! The adapter describes the fds of each message ([`MessageFds`]): whether
//! each was opened for, and is of a kind that serves, what the message
//! uses it for ([`FdAccess`]). One that cannot serve is refused on the
//! message that brings it, with [`BackendError::BadFd`] and nothing
//! changed, like any request that cannot be honoured: a kick fd that
//! cannot be read (opened write-only, the write end of a pipe), a call,
//! err or dirty log fd that cannot be written (the read end of a pipe),
//! shared memory (a region, the inflight area, the dirty log) that cannot
//! be mapped read-write (opened read-only, no file: a socket, a pipe, an
//! eventfd, or shorter than what is mapped of it, [`MessageFds::maps`]),
//! a back-end channel that cannot be read and written, or
//! that is no stream the adapter frames messages on (for the Linux
//! adapter, a Unix stream socket). SET_DEVICE_STATE_FD answers with its
//! own reply (an error, and no fd) when the fd is not open in the
//! transfer's direction; SET_LOG_BASE, whose reply carries no verdict,
//! ends the connection. An fd's access mode and kind never change, so
//! what is taken stays usable as far as they go.
//!
//! # SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES
//!
//! Once SET_PROTOCOL_FEATURES was received, a SET_FEATURES without bit 30
//! is refused with [`BackendError::ProtocolFeaturesDropped`] (a failed ack
//! when REPLY_ACK was negotiated and asked for, else the connection ends);
//! nothing changes. The specification gives no way to withdraw protocol
//! features once set, and QEMU never does: `vhost_user_set_features` always
//! adds the back-end-only bits (`dev->backend_features`, bit 30) to what it
//! sends. Accepting it would silently drop REPLY_ACK and the other protocol
//! features mid-session, so a front-end that asked for an ack would never
//! get one. Without SET_PROTOCOL_FEATURES (a front-end that does not use
//! protocol features) SET_FEATURES without bit 30 is accepted and enables
//! every ring, as the specification requires.

mod channel;

pub use channel::{Channel, ChannelError, Sent};

use core::fmt;

use heapless::Vec;

use crate::dataplane::{DataPlane, DataPlaneError};
use crate::device::Device;
use crate::feature::{
    accept_protocol, accept_virtio, FeatureError, ProtocolFeatures, VirtioFeatures,
};
use crate::inflight::{self, InflightError};
use crate::memory::{GuestMemory, MemoryError, MemoryTable};
use crate::message::DeviceStateDirection;
use crate::message::{
    ConfigMsg, FrontendReq, Header, InflightMsg, LogMsg, MemRegionMsg, ParseOptions,
    Reply as WireReply, Request, VringAddrMsg, VringFdMsg, WireError,
};
use crate::vring::state::{Processing, RingEvent, RingState};
use crate::vring::{Queue, RingAddrs, VringError};

/// Most actions one message produces (SET_MEM_TABLE: unmap all, map up to
/// eight regions, remap rings).
pub const MAX_ACTIONS: usize = 12;

/// What the back-end offers and how big it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// Virtio features offered (device bits, ring bits, VERSION_1, and
    /// VHOST_USER_F_PROTOCOL_FEATURES if protocol features are offered).
    pub features: VirtioFeatures,
    /// Protocol features offered; each must be implemented by the engine
    /// and the adapter (see [`Session::new`]).
    pub protocol_features: ProtocolFeatures,
    /// Number of queues of the device.
    pub num_queues: u16,
    /// Largest ring size a front-end may set.
    pub max_queue_size: u16,
}

/// The protocol features this engine implements; [`Session::new`] refuses a
/// configuration that offers anything else.
pub const SUPPORTED_PROTOCOL_FEATURES: ProtocolFeatures = ProtocolFeatures::MQ
    .union(ProtocolFeatures::REPLY_ACK)
    .union(ProtocolFeatures::CONFIG)
    .union(ProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(ProtocolFeatures::STATUS)
    .union(ProtocolFeatures::RESET_DEVICE)
    .union(ProtocolFeatures::INFLIGHT_SHMFD)
    .union(ProtocolFeatures::GET_VRING_BASE_INFLIGHT)
    .union(ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN)
    .union(ProtocolFeatures::BACKEND_REQ)
    .union(ProtocolFeatures::INBAND_NOTIFICATIONS)
    .union(MIGRATION_PROTOCOL_FEATURES)
    .union(NET_PROTOCOL_FEATURES);

/// RARP and MTU (SEND_RARP, NET_SET_MTU), with the `net` feature.
const NET_PROTOCOL_FEATURES: ProtocolFeatures = if cfg!(feature = "net") {
    ProtocolFeatures::RARP.union(ProtocolFeatures::MTU)
} else {
    ProtocolFeatures::empty()
};

/// LOG_SHMFD and DEVICE_STATE, with the `migration` feature.
const MIGRATION_PROTOCOL_FEATURES: ProtocolFeatures = if cfg!(feature = "migration") {
    ProtocolFeatures::LOG_SHMFD.union(ProtocolFeatures::DEVICE_STATE)
} else {
    ProtocolFeatures::empty()
};

/// VHOST_F_LOG_ALL, with the `migration` feature.
const MIGRATION_VIRTIO_FEATURES: VirtioFeatures = if cfg!(feature = "migration") {
    VirtioFeatures::LOG_ALL
} else {
    VirtioFeatures::empty()
};

const IN_ORDER_VIRTIO_FEATURES: VirtioFeatures = if cfg!(feature = "in-order") {
    VirtioFeatures::IN_ORDER
} else {
    VirtioFeatures::empty()
};

/// The virtio features this engine implements (device-specific bits 0-23
/// are the device's business and pass through).
pub const SUPPORTED_VIRTIO_FEATURES: VirtioFeatures = VirtioFeatures::from_bits_retain(
    ((1 << 24) - 1)
        | VirtioFeatures::INDIRECT_DESC.bits()
        | VirtioFeatures::EVENT_IDX.bits()
        | VirtioFeatures::PROTOCOL_FEATURES.bits()
        | VirtioFeatures::VERSION_1.bits()
        | VirtioFeatures::RING_PACKED.bits()
        | MIGRATION_VIRTIO_FEATURES.bits()
        | IN_ORDER_VIRTIO_FEATURES.bits(),
);

/// An fd of the current message, by its position.
pub type FdIndex = u8;

/// What the back-end does with an fd of a message: what the adapter
/// checks the fd's access mode (and kind) against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FdAccess {
    /// Reads it: a kick eventfd (SET_VRING_KICK), the device state to
    /// load (SET_DEVICE_STATE_FD).
    Read,
    /// Writes it: a call, err or dirty log eventfd (SET_VRING_CALL,
    /// SET_VRING_ERR, SET_LOG_FD), the device state to save.
    Write,
    /// Reads and writes it: the back-end channel (SET_BACKEND_REQ_FD).
    ReadWrite,
    /// Maps it shared, to read and write: a memory region (SET_MEM_TABLE,
    /// ADD_MEM_REG), the inflight area (SET_INFLIGHT_FD), the dirty log
    /// (SET_LOG_BASE).
    Map,
}

/// The fds that came with a message, as the adapter describes them to
/// [`Session::handle`]: how many, and whether each was opened for, and
/// is of a kind that serves, what the message uses it for. A message whose fd cannot serve is refused
/// ([`BackendError::BadFd`]) before anything changes, so the front-end
/// hears of it in the reply (see the module documentation).
///
/// A count (`usize`) describes fds the adapter does not look at (or a
/// transport without fds): each is taken as usable, and its first use
/// tells.
pub trait MessageFds {
    /// Whether [`allows`](Self::allows) and [`maps`](Self::maps) may
    /// refuse anything: `false` for a count, whose messages the session
    /// then does not check at all (a build that only counts fds carries
    /// no code for the checks).
    const LOOKS: bool = true;
    /// How many fds came with the message.
    fn count(&self) -> usize;
    /// Whether fd `index` (below [`count`](Self::count)) can serve
    /// `access`. An adapter that cannot tell answers `true`.
    fn allows(&self, index: FdIndex, access: FdAccess) -> bool;
    /// Whether fd `index` can be mapped ([`FdAccess::Map`]) for `size`
    /// bytes from byte `offset`. By default, whether it
    /// [`allows`](Self::allows) `Map`; an adapter that can tell the fd's
    /// length also refuses one too short for the extent (memory past a
    /// file's end faults when accessed).
    fn maps(&self, index: FdIndex, offset: u64, size: u64) -> bool {
        let _ = (offset, size);
        self.allows(index, FdAccess::Map)
    }
}

impl MessageFds for usize {
    const LOOKS: bool = false;

    fn count(&self) -> usize {
        *self
    }

    fn allows(&self, _index: FdIndex, _access: FdAccess) -> bool {
        true
    }
}

/// Refuses fd `index` of the message unless it can serve `access`.
fn usable<F: MessageFds + ?Sized>(
    fds: &F,
    index: FdIndex,
    access: FdAccess,
) -> Result<(), BackendError> {
    if fds.allows(index, access) {
        Ok(())
    } else {
        Err(BackendError::BadFd { index, access })
    }
}

/// Refuses fd `index` of the message unless `size` bytes of it from
/// `offset` can be mapped.
fn mappable<F: MessageFds + ?Sized>(
    fds: &F,
    index: FdIndex,
    offset: u64,
    size: u64,
) -> Result<(), BackendError> {
    if fds.maps(index, offset, size) {
        Ok(())
    } else {
        Err(BackendError::BadFd {
            index,
            access: FdAccess::Map,
        })
    }
}

/// Refuses `req` if one of its fds cannot serve its use (see
/// [`MessageFds`]), before the message changes anything. (SET_DEVICE_STATE_FD
/// answers that refusal in its own reply: see `dispatch`.)
fn check_fds<F: MessageFds + ?Sized>(req: &Request<'_>, fds: &F) -> Result<(), BackendError> {
    match *req {
        // One fd per region, each mapped.
        Request::SetMemTable(ref table) => {
            for (i, r) in table.iter().enumerate() {
                mappable(fds, i as FdIndex, r.mmap_offset, r.size)?;
            }
        }
        Request::AddMemReg(ref r) => mappable(fds, 0, r.mmap_offset, r.size)?,
        Request::SetVringKick(v) => {
            if let Some(i) = fd_of(v) {
                usable(fds, i, FdAccess::Read)?;
            }
        }
        Request::SetVringCall(v) | Request::SetVringErr(v) => {
            if let Some(i) = fd_of(v) {
                usable(fds, i, FdAccess::Write)?;
            }
        }
        Request::SetBackendReqFd => usable(fds, 0, FdAccess::ReadWrite)?,
        Request::SetInflightFd(ref m) => mappable(fds, 0, m.mmap_offset, m.mmap_size)?,
        #[cfg(feature = "migration")]
        Request::SetLogBase(ref l) => mappable(fds, 0, l.offset, l.size)?,
        #[cfg(feature = "migration")]
        Request::SetLogFd => usable(fds, 0, FdAccess::Write)?,
        _ => {}
    }
    Ok(())
}

/// What the adapter must do after a message.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    /// Drop every memory mapping (SET_MEM_TABLE replaces the table; the
    /// [`Action::MapRegion`]s that follow map the new one).
    UnmapAll,
    /// Map `region` from fd `fd` into table slot `slot`.
    MapRegion {
        /// Slot in the session's [`MemoryTable`].
        slot: u16,
        /// The message fd holding the region.
        fd: FdIndex,
        /// The region.
        region: MemRegionMsg,
    },
    /// Unmap table slot `slot` (REM_MEM_REG).
    UnmapRegion {
        /// Slot that was removed.
        slot: u16,
    },
    /// The memory table changed while rings run: give each running ring its
    /// re-translated addresses ([`Session::ring_addrs`]).
    RemapRings,
    /// Install a kick notifier: an eventfd, or none (polling mode).
    SetKick {
        /// Ring index.
        queue: u16,
        /// The eventfd, or `None` to poll.
        fd: Option<FdIndex>,
    },
    /// Install a call notifier: an eventfd, or none (the front-end polls).
    SetCall {
        /// Ring index.
        queue: u16,
        /// The eventfd, or `None`.
        fd: Option<FdIndex>,
    },
    /// Install an error notifier.
    SetErr {
        /// Ring index.
        queue: u16,
        /// The eventfd, or `None`.
        fd: Option<FdIndex>,
    },
    /// Start processing a ring now (without waiting for a kick): build its
    /// data plane with [`Session::start_ring`] and serve it.
    StartRing {
        /// Ring index.
        queue: u16,
    },
    /// Stop a running ring: [`DataPlane::stop`] with `suspend` (drain its
    /// requests, or leave them recorded in the inflight area), then call
    /// [`Session::finish_stop`] with the base it returns.
    StopRing {
        /// Ring index.
        queue: u16,
        /// GET_VRING_BASE_INFLIGHT: suspend instead of draining.
        suspend: bool,
    },
    /// GET_INFLIGHT_FD: create a zeroed, sealed shared-memory fd of `size`
    /// bytes and send it with the reply. Any previous area is dropped.
    CreateInflight {
        /// Bytes.
        size: u64,
    },
    /// SET_INFLIGHT_FD: map `size` bytes at `offset` of the message's fd
    /// `fd` as the inflight area (replacing any previous one).
    MapInflight {
        /// The message fd.
        fd: FdIndex,
        /// Offset in the fd.
        offset: u64,
        /// Bytes.
        size: u64,
    },
    /// Drop the inflight area (RESET_DEVICE).
    UnmapInflight,
    /// A running ring was enabled or disabled.
    SetEnabled {
        /// Ring index.
        queue: u16,
        /// The new flag.
        enabled: bool,
    },
    /// RESET_DEVICE: stop every ring (completing what is in flight) and
    /// drop their notifiers; no reply waits for it.
    ResetRings,
    /// SET_BACKEND_REQ_FD: keep the message's fd `fd` as the back-end
    /// channel (replacing any previous one) and send back-end requests on
    /// it with the [`Channel`] of [`Session::channel`].
    SetBackendChannel {
        /// The message fd.
        fd: FdIndex,
    },
    /// In-band VRING_KICK for a running ring: the driver made buffers
    /// available; serve the ring now.
    Kick {
        /// Ring index.
        queue: u16,
    },
    /// SET_LOG_BASE: map `size` bytes at `offset` of the message's fd `fd`
    /// (shared memory) as the dirty log, in place of any previous one, at
    /// once for every ring (a ring never marks a log being replaced). A
    /// mapping that fails (an offset past the end of the fd, an fd that is
    /// not shared memory) ends the connection: the front-end would not
    /// hear of it otherwise, as it ignores the reply's content.
    MapLog {
        /// The message fd.
        fd: FdIndex,
        /// Offset of the log in the fd.
        offset: u64,
        /// Bytes of bitmap ([`crate::log`]).
        size: u64,
    },
    /// SET_LOG_FD: an eventfd to signal after setting bits in the log,
    /// in place of any previous one.
    SetLogFd {
        /// The message fd.
        fd: FdIndex,
    },
    /// VHOST_F_LOG_ALL was negotiated (`all`) or dropped by SET_FEATURES:
    /// from now on every device write into a descriptor buffer is marked
    /// in the log (when one is mapped), or none is.
    SetLogging {
        /// Whether device writes are logged.
        all: bool,
    },
    /// SET_VRING_ADDR on a running ring set or cleared VHOST_VRING_F_LOG:
    /// log its used-ring writes at this guest address
    /// ([`DataPlane::log_used`]), or stop.
    SetRingLog {
        /// Ring index.
        queue: u16,
        /// The ring's log address, or `None`.
        log: Option<u64>,
    },
    /// SET_DEVICE_STATE_FD, accepted (every ring stopped, no transfer
    /// pending): run the transfer on the message's fd `fd` (a pipe end)
    /// without blocking the connection: for [`DeviceStateDirection::Save`]
    /// write the device's state into it and close it, for
    /// [`DeviceStateDirection::Load`] read it to the end. The reply (u64
    /// 0x100: success, no fd of ours) is sent at once; the next
    /// CHECK_DEVICE_STATE answers [`Reply::TransferPending`] and waits
    /// for the transfer's end, which the adapter reports with
    /// [`Session::finish_transfer`].
    TransferState {
        /// The message fd.
        fd: FdIndex,
        /// Save or load.
        direction: DeviceStateDirection,
    },
}

/// The reply to a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// No reply is sent.
    None,
    /// This many bytes of the caller's buffer are the reply.
    Ready(usize),
    /// GET_VRING_BASE on a running ring: reply with
    /// [`Session::finish_stop`] once the ring has stopped.
    Pending {
        /// Ring index.
        queue: u16,
    },
    /// CHECK_DEVICE_STATE while a transfer runs: reply with
    /// [`Session::finish_transfer`] once it ended (on the adapter's word
    /// of how it went).
    TransferPending,
}

/// What a message produced.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The reply.
    pub reply: Reply,
    /// Actions to carry out, in order.
    pub actions: Vec<Action, MAX_ACTIONS>,
    /// A request that was refused with a failed REPLY_ACK (for the log);
    /// the connection goes on.
    pub refused: Option<BackendError>,
}

/// No reply, no action.
impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            reply: Reply::None,
            actions: Vec::new(),
            refused: None,
        }
    }
}

/// Why a message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BackendError {
    /// Malformed message.
    Wire(WireError),
    /// Refused feature negotiation.
    Feature(FeatureError),
    /// The message's feature was not negotiated.
    NotNegotiated(FrontendReq),
    /// Memory table error.
    Memory(MemoryError),
    /// Ring configuration error.
    Vring(VringError),
    /// A ring index at or above the device's queue count.
    NoSuchQueue(u32),
    /// Ring size above the device maximum.
    QueueSize(u32),
    /// The ring is running and this message would change its layout.
    RingRunning(u16),
    /// The ring cannot start: its size or addresses were never set.
    RingNotConfigured(u16),
    /// A ring area is not inside one region of the memory table.
    RingAddress(u16),
    /// SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES after protocol
    /// features were negotiated.
    ProtocolFeaturesDropped,
    /// VHOST_VRING_F_LOG without dirty logging (LOG_SHMFD not
    /// negotiated).
    LoggingNotSupported,
    /// SET_LOG_BASE with a log too small for the memory table's highest
    /// guest address.
    LogTooSmall,
    /// SET_FEATURES changing features while rings run.
    FeaturesWhileRunning,
    /// Config space access refused by the device.
    Config,
    /// `finish_stop` for a ring that is not being stopped.
    NotStopping(u16),
    /// A configuration that offers what the engine does not implement.
    Unsupported,
    /// An inflight area description or use refused.
    Inflight(InflightError),
    /// An fd of the message cannot serve its use ([`MessageFds`]): a kick
    /// fd opened write-only, a call fd opened read-only, shared memory
    /// that cannot be mapped read-write, ….
    BadFd {
        /// The fd, by its position in the message.
        index: FdIndex,
        /// What the message uses it for.
        access: FdAccess,
    },
    /// SET_DEVICE_STATE_FD while a ring runs (the device is not
    /// suspended).
    #[cfg(feature = "migration")]
    NotSuspended,
    /// SET_DEVICE_STATE_FD, or a ring start, while a device state
    /// transfer is not yet checked (CHECK_DEVICE_STATE).
    #[cfg(feature = "migration")]
    TransferPending,
    /// CHECK_DEVICE_STATE, or [`Session::finish_transfer`], without a
    /// transfer to check.
    #[cfg(feature = "migration")]
    NoTransfer,
    /// NET_SET_MTU with a value outside 68..=65535 (saturated to 32 bits).
    #[cfg(feature = "net")]
    BadMtu(u32),
    /// The device refused the request (NET_SET_MTU above what it
    /// carries, or a device without the function).
    #[cfg(feature = "net")]
    DeviceRefused(FrontendReq),
}

// Every nested error is at most 8 bytes and carries no 64-bit value; a
// Result of the session stays small to move.
const _: () = assert!(core::mem::size_of::<BackendError>() <= 12);

impl BackendError {
    /// The value a REPLY_ACK carries for this error.
    pub fn ack_value(&self) -> u64 {
        1
    }
}

impl From<WireError> for BackendError {
    fn from(e: WireError) -> Self {
        BackendError::Wire(e)
    }
}
impl From<FeatureError> for BackendError {
    fn from(e: FeatureError) -> Self {
        BackendError::Feature(e)
    }
}
impl From<MemoryError> for BackendError {
    fn from(e: MemoryError) -> Self {
        BackendError::Memory(e)
    }
}
impl From<InflightError> for BackendError {
    fn from(e: InflightError) -> Self {
        BackendError::Inflight(e)
    }
}
impl From<VringError> for BackendError {
    fn from(e: VringError) -> Self {
        BackendError::Vring(e)
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Wire(e) => write!(f, "malformed message: {e}"),
            BackendError::Feature(e) => write!(f, "feature negotiation: {e}"),
            BackendError::NotNegotiated(c) => write!(f, "{c} used without its feature"),
            BackendError::Memory(e) => write!(f, "memory table: {e}"),
            BackendError::Vring(e) => write!(f, "ring: {e}"),
            BackendError::Inflight(e) => write!(f, "inflight area: {e}"),
            BackendError::BadFd { index, access } => {
                let what = match access {
                    FdAccess::Read => "read",
                    FdAccess::Write => "written",
                    FdAccess::ReadWrite => "read and written",
                    FdAccess::Map => "mapped read-write",
                };
                write!(f, "fd {index} of the message cannot be {what}")
            }
            BackendError::NoSuchQueue(q) => write!(f, "no ring {q}"),
            BackendError::QueueSize(n) => write!(f, "ring size {n} above the maximum"),
            BackendError::RingRunning(q) => write!(f, "ring {q} is running"),
            BackendError::RingNotConfigured(q) => write!(f, "ring {q} has no size or addresses"),
            BackendError::RingAddress(q) => write!(f, "ring {q} address outside guest memory"),
            BackendError::ProtocolFeaturesDropped => {
                f.write_str("SET_FEATURES without bit 30 after protocol features were negotiated")
            }
            BackendError::LoggingNotSupported => f.write_str("dirty logging not negotiated"),
            BackendError::LogTooSmall => f.write_str("dirty log smaller than guest memory"),
            BackendError::FeaturesWhileRunning => f.write_str("features changed while rings run"),
            BackendError::Config => f.write_str("config space access refused"),
            BackendError::NotStopping(q) => write!(f, "ring {q} is not being stopped"),
            BackendError::Unsupported => f.write_str("offered feature not implemented"),
            #[cfg(feature = "migration")]
            BackendError::NotSuspended => f.write_str("device state transfer while a ring runs"),
            #[cfg(feature = "migration")]
            BackendError::TransferPending => {
                f.write_str("a device state transfer is not yet checked")
            }
            #[cfg(feature = "migration")]
            BackendError::NoTransfer => f.write_str("no device state transfer to check"),
            #[cfg(feature = "net")]
            BackendError::BadMtu(m) => write!(f, "MTU {m} outside 68 to 65535"),
            #[cfg(feature = "net")]
            BackendError::DeviceRefused(c) => write!(f, "{c} refused by the device"),
        }
    }
}

impl core::error::Error for BackendError {}

/// How a ring is notified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Notifier {
    /// Never set.
    #[default]
    Unset,
    /// An eventfd.
    Fd,
    /// No fd: polling (kick) or none (call, err).
    Polling,
}

/// One ring as the session sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingSlot {
    /// Ring size (0 = not set).
    pub num: u16,
    /// Addresses from SET_VRING_ADDR (front-end virtual addresses).
    pub addr: Option<VringAddrMsg>,
    /// The base from SET_VRING_BASE, or the state at the last stop.
    pub base: u32,
    /// Started/stopped × enabled/disabled.
    pub state: RingState,
    /// A worker runs the ring (between StartRing and finish_stop).
    pub running: bool,
    /// A stop is waiting for the worker.
    pub stopping: bool,
    /// The message the pending stop answers (GET_VRING_BASE or
    /// GET_VRING_BASE_SKIP_DRAIN).
    pub stop_code: Option<FrontendReq>,
    /// Kick notifier.
    pub kick: Notifier,
    /// Call notifier.
    pub call: Notifier,
    /// Error notifier.
    pub err: Notifier,
    /// Size or addresses were accepted before the ring layout was known;
    /// SET_FEATURES checks them for the layout it chooses.
    deferred: bool,
}

/// A ring layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Split,
    Packed,
}

impl Layout {
    fn of(features: VirtioFeatures) -> Layout {
        if features.contains(VirtioFeatures::RING_PACKED) {
            Layout::Packed
        } else {
            Layout::Split
        }
    }
}

/// The back-end side of one front-end connection.
///
/// `Q` bounds the number of queues, `R` the number of memory regions
/// (GET_MAX_MEM_SLOTS answers `R`).
#[derive(Debug)]
pub struct Session<const Q: usize = 16, const R: usize = 32> {
    config: BackendConfig,
    acked_features: Option<VirtioFeatures>,
    acked_protocol: ProtocolFeatures,
    protocol_negotiated: bool,
    owner: bool,
    status: u8,
    memory: MemoryTable<R>,
    rings: Vec<RingSlot, Q>,
    /// The area of the last SET_INFLIGHT_FD: (num_queues, queue_size,
    /// per-queue stride).
    inflight: Option<(u16, u16, u64)>,
    /// SET_BACKEND_REQ_FD was received.
    channel: bool,
    /// The dirty log of the last SET_LOG_BASE.
    log: Option<LogMsg>,
    /// The device state transfer accepted and not yet checked.
    #[cfg(feature = "migration")]
    transfer: Option<DeviceStateDirection>,
}

#[inline(never)]
fn push(actions: &mut Vec<Action, MAX_ACTIONS>, a: Action) {
    // MAX_ACTIONS bounds what any single message produces; see the const.
    let pushed = actions.push(a);
    debug_assert!(pushed.is_ok(), "MAX_ACTIONS too small");
}

impl<const Q: usize, const R: usize> Session<Q, R> {
    /// A session for a device with `config`. Refuses a configuration that
    /// offers protocol or virtio features the engine does not implement, or
    /// more queues than `Q`.
    pub fn new(config: BackendConfig) -> Result<Self, BackendError> {
        let extra_p = config
            .protocol_features
            .difference(SUPPORTED_PROTOCOL_FEATURES);
        let extra_v = config.features.bits() & !SUPPORTED_VIRTIO_FEATURES.bits();
        if !extra_p.is_empty()
            || extra_v != 0
            || config.num_queues == 0
            || usize::from(config.num_queues) > Q
            || config.max_queue_size == 0
            || u32::from(config.max_queue_size) > 32768
            || (!config.protocol_features.is_empty()
                && !config.features.contains(VirtioFeatures::PROTOCOL_FEATURES))
        {
            return Err(BackendError::Unsupported);
        }
        // A log for LOG_ALL comes only with LOG_SHMFD.
        if config.features.contains(MIGRATION_VIRTIO_FEATURES)
            && !MIGRATION_VIRTIO_FEATURES.is_empty()
            && !config
                .protocol_features
                .contains(ProtocolFeatures::LOG_SHMFD)
        {
            return Err(BackendError::Unsupported);
        }
        config.protocol_features.check_dependencies()?;
        let mut rings = Vec::new();
        for _ in 0..config.num_queues {
            let _ = rings.push(RingSlot::default());
        }
        Ok(Session {
            config,
            acked_features: None,
            acked_protocol: ProtocolFeatures::empty(),
            protocol_negotiated: false,
            owner: false,
            status: 0,
            memory: MemoryTable::default(),
            rings,
            inflight: None,
            channel: false,
            log: None,
            #[cfg(feature = "migration")]
            transfer: None,
        })
    }

    /// Back to the state [`new`](Self::new) returned, in place: nothing
    /// negotiated, no owner, no memory, every ring as never configured,
    /// no inflight area and no back-end channel (the front-end left; the
    /// next one starts afresh). Unlike building a new session this moves
    /// no second copy of it.
    pub fn reset(&mut self) {
        self.acked_features = None;
        self.acked_protocol = ProtocolFeatures::empty();
        self.protocol_negotiated = false;
        self.owner = false;
        self.status = 0;
        self.memory.clear();
        for r in self.rings.iter_mut() {
            *r = RingSlot::default();
        }
        self.inflight = None;
        self.channel = false;
        self.log = None;
        #[cfg(feature = "migration")]
        {
            self.transfer = None;
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BackendConfig {
        &self.config
    }

    /// The acked virtio features (empty before SET_FEATURES).
    pub fn features(&self) -> VirtioFeatures {
        self.acked_features.unwrap_or_default()
    }

    /// The acked protocol features.
    pub fn protocol_features(&self) -> ProtocolFeatures {
        self.acked_protocol
    }

    /// The memory table.
    pub fn memory(&self) -> &MemoryTable<R> {
        &self.memory
    }

    /// A ring's record.
    pub fn ring(&self, queue: u16) -> Option<&RingSlot> {
        self.rings.get(usize::from(queue))
    }

    /// The inflight area's layout of the last SET_INFLIGHT_FD, if any:
    /// (queue count, ring size); it spans
    /// [`inflight::area_size`] bytes of the mapping.
    pub fn inflight_layout(&self) -> Option<(u16, u16)> {
        self.inflight.map(|(nq, qs, _)| (nq, qs))
    }

    /// The dirty log the front-end gave (SET_LOG_BASE), if any.
    pub fn log(&self) -> Option<LogMsg> {
        self.log
    }

    /// Whether device writes are logged: VHOST_F_LOG_ALL is negotiated
    /// (they are marked once a log is mapped).
    pub fn logging_all(&self) -> bool {
        self.features().contains(VirtioFeatures::LOG_ALL)
    }

    /// Ring `queue`'s used-ring log address: set when its SET_VRING_ADDR
    /// carried VHOST_VRING_F_LOG. A host gives it to
    /// [`DataPlane::log_used`] while a log is mapped.
    pub fn ring_log(&self, queue: u16) -> Option<u64> {
        self.rings
            .get(usize::from(queue))?
            .addr
            .filter(|a| a.log)
            .map(|a| a.log_addr)
    }

    /// The virtio device status last set with SET_STATUS.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Whether SET_OWNER was received.
    pub fn has_owner(&self) -> bool {
        self.owner
    }

    /// The back-end channel's request encoder, once SET_BACKEND_REQ_FD gave
    /// one (the adapter keeps the socket).
    pub fn channel(&self) -> Option<Channel> {
        self.channel.then(|| Channel::new(self.acked_protocol))
    }

    /// Whether ring `queue`'s calls go in-band (BACKEND_VRING_CALL on the
    /// back-end channel): INBAND_NOTIFICATIONS was negotiated, the channel
    /// is there, and the front-end gave no call eventfd.
    pub fn call_in_band(&self, queue: u16) -> bool {
        self.in_band(queue, |s| s.call)
    }

    /// Whether ring `queue`'s errors go in-band (BACKEND_VRING_ERR), as
    /// [`call_in_band`](Self::call_in_band) for the err eventfd.
    pub fn err_in_band(&self, queue: u16) -> bool {
        self.in_band(queue, |s| s.err)
    }

    fn in_band(&self, queue: u16, which: impl Fn(&RingSlot) -> Notifier) -> bool {
        self.channel
            && self
                .acked_protocol
                .contains(ProtocolFeatures::INBAND_NOTIFICATIONS)
            && self
                .rings
                .get(usize::from(queue))
                .is_some_and(|s| which(s) != Notifier::Fd)
    }

    /// Parse options for this session's messages.
    pub fn parse_options(&self) -> ParseOptions {
        ParseOptions {
            max_queues: u32::from(self.config.num_queues),
            xen_mmap: false,
        }
    }

    /// A running ring's addresses as guest physical addresses, translated
    /// through the current memory table.
    pub fn ring_addrs(&self, queue: u16) -> Result<RingAddrs, BackendError> {
        self.ring_addrs_in(&self.memory, queue)
    }

    fn ring_addrs_in(&self, table: &MemoryTable<R>, queue: u16) -> Result<RingAddrs, BackendError> {
        let slot = self
            .rings
            .get(usize::from(queue))
            .ok_or(BackendError::NoSuchQueue(queue.into()))?;
        let addr = slot.addr.ok_or(BackendError::RingNotConfigured(queue))?;
        if slot.num == 0 {
            return Err(BackendError::RingNotConfigured(queue));
        }
        let layout = Layout::of(self.features());
        Self::areas_in(table, queue, addr, slot.num, Some(layout))
    }

    /// The ring layout: known from SET_FEATURES, or before it when packed
    /// rings are not offered.
    fn layout(&self) -> Option<Layout> {
        match self.acked_features {
            Some(f) => Some(Layout::of(f)),
            None if !self.config.features.contains(VirtioFeatures::RING_PACKED) => {
                Some(Layout::Split)
            }
            None => None,
        }
    }

    /// Checks a ring size for `layout` (`None`: what holds for both).
    fn check_size(&self, num: u32, layout: Option<Layout>) -> Result<(), BackendError> {
        if num == 0 {
            return Err(BackendError::Vring(VringError::BadSize(0)));
        }
        if num > u32::from(self.config.max_queue_size) {
            return Err(BackendError::QueueSize(num));
        }
        if layout == Some(Layout::Split) && !num.is_power_of_two() {
            return Err(BackendError::Vring(VringError::BadSize(
                crate::vring::saturate(num),
            )));
        }
        Ok(())
    }

    /// Translates a ring's areas through `table` for `num` entries and
    /// checks that each lies inside one region and is aligned for `layout`
    /// (`None`: the lengths and alignments both layouts need).
    fn areas_in(
        table: &MemoryTable<R>,
        queue: u16,
        addr: VringAddrMsg,
        num: u16,
        layout: Option<Layout>,
    ) -> Result<RingAddrs, BackendError> {
        let n = u64::from(num);
        // (length, alignment) of desc, driver and device areas.
        let (desc, driver, device) = match layout {
            Some(Layout::Split) => ((16 * n, 16), (6 + 2 * n, 2), (6 + 8 * n, 4)),
            Some(Layout::Packed) => ((16 * n, 16), (4, 4), (4, 4)),
            None => ((16 * n, 16), (4, 2), (4, 4)),
        };
        let area = |va: u64, (len, align): (u64, u16)| {
            let gpa = table
                .translate_user_range(va, len)
                .map_err(|_| BackendError::RingAddress(queue))?;
            // Alignments are powers of two: a mask, not a 64-bit division.
            if gpa & (u64::from(align) - 1) != 0 {
                debug!("ring {} area {:#x} not {}-byte aligned", queue, gpa, align);
                return Err(BackendError::Vring(VringError::Misaligned(align)));
            }
            Ok(gpa)
        };
        Ok(RingAddrs {
            desc: area(addr.desc, desc)?,
            driver: area(addr.avail, driver)?,
            device: area(addr.used, device)?,
        })
    }

    fn gate(&self, code: FrontendReq) -> Result<(), BackendError> {
        use FrontendReq as C;
        use ProtocolFeatures as P;
        let needs = match code {
            C::GetProtocolFeatures | C::SetProtocolFeatures => {
                return if self
                    .config
                    .features
                    .contains(VirtioFeatures::PROTOCOL_FEATURES)
                {
                    Ok(())
                } else {
                    Err(BackendError::NotNegotiated(code))
                };
            }
            C::SetVringEnable => {
                let ok = self.protocol_negotiated
                    || self.features().contains(VirtioFeatures::PROTOCOL_FEATURES);
                return if ok {
                    Ok(())
                } else {
                    Err(BackendError::NotNegotiated(code))
                };
            }
            C::GetFeatures
            | C::SetFeatures
            | C::SetOwner
            | C::ResetOwner
            | C::SetMemTable
            | C::SetVringNum
            | C::SetVringAddr
            | C::SetVringBase
            | C::GetVringBase
            | C::SetVringKick
            | C::SetVringCall
            | C::SetVringErr => return Ok(()),
            C::GetQueueNum => P::MQ,
            C::GetConfig | C::SetConfig => P::CONFIG,
            C::GetMaxMemSlots | C::AddMemReg | C::RemMemReg => P::CONFIGURE_MEM_SLOTS,
            C::SetStatus | C::GetStatus => P::STATUS,
            C::ResetDevice => P::RESET_DEVICE,
            C::SetLogBase | C::SetLogFd => P::LOG_SHMFD,
            C::SendRarp => P::RARP,
            C::NetSetMtu => P::MTU,
            C::SetBackendReqFd => P::BACKEND_REQ,
            C::SetVringEndian => P::CROSS_ENDIAN,
            C::CreateCryptoSession | C::CloseCryptoSession => P::CRYPTO_SESSION,
            C::PostcopyAdvise | C::PostcopyListen | C::PostcopyEnd => P::PAGEFAULT,
            C::GetInflightFd | C::SetInflightFd => P::INFLIGHT_SHMFD,
            C::VringKick => P::INBAND_NOTIFICATIONS,
            C::GetSharedObject => P::SHARED_OBJECT,
            C::SetDeviceStateFd | C::CheckDeviceState => P::DEVICE_STATE,
            C::GetShmemConfig => P::SHMEM,
            C::GetVringBaseSkipDrain => P::GET_VRING_BASE_SKIP_DRAIN,
            // The vhost-user-gpu side protocol is not implemented by any
            // device of this engine and has no feature bit: always refused.
            C::GpuSetSocket => return Err(BackendError::NotNegotiated(code)),
            C::IotlbMsg => {
                return if self.features().contains(VirtioFeatures::ACCESS_PLATFORM) {
                    Ok(())
                } else {
                    Err(BackendError::NotNegotiated(code))
                };
            }
        };
        if self.acked_protocol.contains(needs) {
            Ok(())
        } else {
            Err(BackendError::NotNegotiated(code))
        }
    }

    fn slot_mut(&mut self, index: u32) -> Result<&mut RingSlot, BackendError> {
        self.rings
            .get_mut(index as usize)
            .ok_or(BackendError::NoSuchQueue(index))
    }

    /// Handles one message.
    ///
    /// `header` was validated by [`Header::parse`]; `payload` is the
    /// `header.size` bytes after it; `fds` came with it (the adapter
    /// closes every fd no action took; a count if it does not look at
    /// them, see [`MessageFds`]). `mem` is the adapter's view of guest
    /// memory as mapped so far; `out` receives the reply.
    pub fn handle<M: GuestMemory + ?Sized, D: Device + ?Sized, F: MessageFds + ?Sized>(
        &mut self,
        header: &Header,
        payload: &[u8],
        fds: &F,
        mem: &M,
        device: &mut D,
        out: &mut [u8],
    ) -> Result<Outcome, BackendError> {
        let mut outcome = Outcome::default();
        self.handle_into(header, payload, fds, mem, device, out, &mut outcome)?;
        Ok(outcome)
    }

    /// [`handle`](Self::handle), with the outcome written into `outcome`
    /// (whatever it held is replaced; on `Err` it is empty) instead of
    /// returned: an [`Outcome`] is a few hundred bytes (up to
    /// [`MAX_ACTIONS`] actions), which a caller with a small stack keeps
    /// elsewhere.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_into<M: GuestMemory + ?Sized, D: Device + ?Sized, F: MessageFds + ?Sized>(
        &mut self,
        header: &Header,
        payload: &[u8],
        fds: &F,
        mem: &M,
        device: &mut D,
        out: &mut [u8],
        outcome: &mut Outcome,
    ) -> Result<(), BackendError> {
        *outcome = Outcome::default();
        let result = self.handle_inner(header, payload, fds, mem, device, out, outcome);
        if result.is_err() {
            *outcome = Outcome::default();
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_inner<M: GuestMemory + ?Sized, D: Device + ?Sized, F: MessageFds + ?Sized>(
        &mut self,
        header: &Header,
        payload: &[u8],
        fds: &F,
        mem: &M,
        device: &mut D,
        out: &mut [u8],
        outcome: &mut Outcome,
    ) -> Result<(), BackendError> {
        let opts = self.parse_options();
        let req = Request::parse(header, payload, fds.count(), &opts)?;
        let code = req.code();
        let result = self
            .gate(code)
            // A count refuses nothing: no code for it (`MessageFds::LOOKS`).
            .and_then(|()| {
                if F::LOOKS {
                    check_fds(&req, fds)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| self.dispatch(&req, fds, mem, device, out, outcome));
        let ack_asked = header.need_reply()
            && self.acked_protocol.contains(ProtocolFeatures::REPLY_ACK)
            && !code.has_reply();
        match result {
            Ok(()) => {
                if ack_asked {
                    outcome.reply = Reply::Ready(WireReply::encode_u64(code, 0, out)?);
                }
                Ok(())
            }
            Err(e) if ack_asked && !matches!(e, BackendError::Wire(_)) => {
                warn!("refusing {}: ack failure", code.id());
                *outcome = Outcome {
                    reply: Reply::Ready(WireReply::encode_u64(code, e.ack_value(), out)?),
                    actions: Vec::new(),
                    refused: Some(e),
                };
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn dispatch<M: GuestMemory + ?Sized, D: Device + ?Sized, F: MessageFds + ?Sized>(
        &mut self,
        req: &Request<'_>,
        fds: &F,
        mem: &M,
        device: &mut D,
        out: &mut [u8],
        outcome: &mut Outcome,
    ) -> Result<(), BackendError> {
        // The fds were checked (`check_fds`) but for SET_DEVICE_STATE_FD's.
        #[cfg(not(feature = "migration"))]
        let _ = fds;
        let code = req.code();
        // Each reply is encoded on its own (WireReply::encode_*): a
        // back-end links no other reply's encoding.
        let mut reply = |v: u64| -> Result<Reply, BackendError> {
            Ok(Reply::Ready(WireReply::encode_u64(code, v, out)?))
        };
        let actions = &mut outcome.actions;
        match *req {
            Request::GetFeatures => outcome.reply = reply(self.config.features.bits())?,
            Request::SetFeatures(v) => {
                let acked = accept_virtio(self.config.features, v)?;
                let before = self.acked_features;
                let running = self.rings.iter().any(|r| r.running);
                // VHOST_F_LOG_ALL is switched on and off while rings run
                // (migration); nothing else may change under them.
                let log_all = MIGRATION_VIRTIO_FEATURES;
                if running
                    && before.map(|b| b.difference(log_all)) != Some(acked.difference(log_all))
                {
                    return Err(BackendError::FeaturesWhileRunning);
                }
                let bit30 = acked.contains(VirtioFeatures::PROTOCOL_FEATURES);
                if !bit30 && self.protocol_negotiated {
                    // See the module docs: protocol features cannot be
                    // withdrawn.
                    return Err(BackendError::ProtocolFeaturesDropped);
                }
                // Rings set up before the layout was known: check them for
                // this one.
                let layout = Some(Layout::of(acked));
                for (q, slot) in self.rings.iter().enumerate() {
                    if slot.running || !slot.deferred {
                        continue;
                    }
                    if slot.num != 0 {
                        self.check_size(slot.num.into(), layout)?;
                    }
                    if let Some(a) = slot.addr {
                        Self::areas_in(&self.memory, q as u16, a, slot.num, layout)?;
                    }
                }
                for slot in self.rings.iter_mut() {
                    slot.deferred = false;
                }
                self.acked_features = Some(acked);
                #[cfg(feature = "migration")]
                {
                    let all = acked.contains(VirtioFeatures::LOG_ALL);
                    if before.unwrap_or_default().contains(VirtioFeatures::LOG_ALL) != all {
                        push(actions, Action::SetLogging { all });
                    }
                }
                device.features_acked(acked);
                self.apply_all(
                    RingEvent::SetFeatures {
                        protocol_features: bit30,
                    },
                    actions,
                );
                debug!("features acked: {:#x}", acked.bits());
            }
            Request::SetOwner => self.owner = true,
            Request::ResetOwner => self.apply_all(RingEvent::ResetOwner, actions),
            Request::GetProtocolFeatures => {
                outcome.reply = reply(self.config.protocol_features.bits())?
            }
            Request::SetProtocolFeatures(v) => {
                self.acked_protocol = accept_protocol(self.config.protocol_features, v)?;
                self.protocol_negotiated = true;
            }
            Request::GetQueueNum => outcome.reply = reply(self.config.num_queues.into())?,
            Request::GetMaxMemSlots => outcome.reply = reply(R as u64)?,
            Request::SetMemTable(ref table) => {
                // Region i in slot i, as `MemoryTable::set` places them,
                // without a copy of the regions on the stack.
                let mut next = MemoryTable::<R>::default();
                for r in table.iter() {
                    next.add(r)?;
                }
                let remap = self.commit_memory(next)?;
                push(actions, Action::UnmapAll);
                for (i, r) in table.iter().enumerate() {
                    push(
                        actions,
                        Action::MapRegion {
                            slot: i as u16,
                            fd: i as FdIndex,
                            region: r,
                        },
                    );
                }
                if remap {
                    push(actions, Action::RemapRings);
                }
            }
            Request::AddMemReg(region) => {
                let mut next = self.memory.clone();
                let slot = next.add(region)?;
                let remap = self.commit_memory(next)?;
                push(
                    actions,
                    Action::MapRegion {
                        slot: slot as u16,
                        fd: 0,
                        region,
                    },
                );
                if remap {
                    push(actions, Action::RemapRings);
                }
            }
            Request::RemMemReg(region) => {
                let mut next = self.memory.clone();
                let slot = next.remove(&region)?;
                let remap = self.commit_memory(next)?;
                push(actions, Action::UnmapRegion { slot: slot as u16 });
                if remap {
                    push(actions, Action::RemapRings);
                }
            }
            Request::SetVringNum(s) => {
                let layout = self.layout();
                self.check_size(s.num, layout)?;
                let slot = self.slot_mut(s.index)?;
                if slot.running {
                    return Err(BackendError::RingRunning(s.index as u16));
                }
                // At most max_queue_size (a u16): checked above.
                slot.num = s.num as u16;
                slot.deferred |= layout.is_none();
            }
            Request::SetVringAddr(a) => {
                if a.log
                    && !(cfg!(feature = "migration")
                        && self.acked_protocol.contains(ProtocolFeatures::LOG_SHMFD))
                {
                    return Err(BackendError::LoggingNotSupported);
                }
                let layout = self.layout();
                let q = a.index as u16;
                let slot = self.slot_mut(a.index)?;
                if slot.running {
                    // The same addresses again: nothing changes, except
                    // used-ring logging (migration switches it on and off
                    // while the ring runs).
                    if slot.addr == Some(a) {
                        return Ok(());
                    }
                    #[cfg(feature = "migration")]
                    if slot.addr.is_some_and(|b| same_areas(b, a)) {
                        slot.addr = Some(a);
                        let log = a.log.then_some(a.log_addr);
                        push(actions, Action::SetRingLog { queue: q, log });
                        return Ok(());
                    }
                    return Err(BackendError::RingRunning(q));
                }
                let num = slot.num;
                Self::areas_in(&self.memory, q, a, num, layout)?;
                let slot = self.slot_mut(a.index)?;
                slot.addr = Some(a);
                slot.deferred |= layout.is_none();
            }
            Request::SetVringBase(s) => {
                let slot = self.slot_mut(s.index)?;
                if slot.running {
                    return Err(BackendError::RingRunning(s.index as u16));
                }
                slot.base = s.num;
            }
            Request::GetVringBase(index) | Request::GetVringBaseSkipDrain(index) => {
                let q = index as u16;
                // Suspending needs an area to record the requests in. With
                // SKIP_DRAIN negotiated only message 45 suspends.
                let p = self.acked_protocol;
                let suspend = self.inflight.is_some()
                    && if p.contains(ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN) {
                        code == FrontendReq::GetVringBaseSkipDrain
                    } else {
                        p.contains(ProtocolFeatures::GET_VRING_BASE_INFLIGHT)
                    };
                let slot = self.slot_mut(index)?;
                slot.state = slot.state.apply(RingEvent::GetVringBase);
                if slot.running {
                    slot.stopping = true;
                    slot.stop_code = Some(code);
                    push(actions, Action::StopRing { queue: q, suspend });
                    outcome.reply = Reply::Pending { queue: q };
                } else {
                    slot.kick = Notifier::Unset;
                    slot.call = Notifier::Unset;
                    let base = slot.base;
                    let n = WireReply::encode_vring_state(code, index, base, out)?;
                    outcome.reply = Reply::Ready(n);
                }
            }
            Request::SetVringKick(v) => {
                let q = v.index as u16;
                push(
                    actions,
                    Action::SetKick {
                        queue: q,
                        fd: fd_of(v),
                    },
                );
                let slot = self.slot_mut(v.index)?;
                slot.kick = notifier(v);
                if !slot.running {
                    // A new kick fd for a running ring is just swapped.
                    self.start(q, mem, actions)?;
                }
            }
            Request::VringKick(index) => {
                // In-band kick: starts a stopped ring like SET_VRING_KICK
                // (amended spec), else says buffers are available.
                let q = index as u16;
                if self.slot_mut(index)?.running {
                    push(actions, Action::Kick { queue: q });
                } else {
                    self.start(q, mem, actions)?;
                }
            }
            Request::SetBackendReqFd => {
                self.channel = true;
                push(actions, Action::SetBackendChannel { fd: 0 });
            }
            Request::SetVringCall(v) => {
                self.slot_mut(v.index)?.call = notifier(v);
                push(
                    actions,
                    Action::SetCall {
                        queue: v.index as u16,
                        fd: fd_of(v),
                    },
                );
            }
            Request::SetVringErr(v) => {
                self.slot_mut(v.index)?.err = notifier(v);
                push(
                    actions,
                    Action::SetErr {
                        queue: v.index as u16,
                        fd: fd_of(v),
                    },
                );
            }
            Request::SetVringEnable { index, enable } => {
                let slot = self.slot_mut(index)?;
                slot.state = slot.state.apply(RingEvent::SetVringEnable(enable));
                if slot.running {
                    push(
                        actions,
                        Action::SetEnabled {
                            queue: index as u16,
                            enabled: enable,
                        },
                    );
                }
            }
            Request::GetConfig(c) => {
                outcome.reply = self.get_config(c, device, out)?;
            }
            Request::SetConfig(c) => {
                if !device.write_config(c.offset, c.data, c.kind) {
                    return Err(BackendError::Config);
                }
            }
            Request::SetStatus(s) => self.status = s,
            Request::GetStatus => outcome.reply = reply(self.status.into())?,
            Request::GetInflightFd(m) => {
                self.check_inflight(m.num_queues, m.queue_size)?;
                let size = inflight::area_size(m.num_queues, m.queue_size)?;
                // A new area: the old one (and what it recorded) is gone.
                self.inflight = None;
                push(actions, Action::UnmapInflight);
                push(actions, Action::CreateInflight { size });
                let m = InflightMsg {
                    mmap_size: size,
                    mmap_offset: 0,
                    ..m
                };
                outcome.reply = Reply::Ready(WireReply::encode_inflight(code, &m, out)?);
            }
            Request::SetInflightFd(m) => {
                self.check_inflight(m.num_queues, m.queue_size)?;
                let stride = inflight::check_area(m.num_queues, m.queue_size, m.mmap_size)?;
                // Running rings keep the area they started with; this one
                // is used from their next start.
                self.inflight = Some((m.num_queues, m.queue_size, stride));
                push(
                    actions,
                    Action::MapInflight {
                        fd: 0,
                        offset: m.mmap_offset,
                        size: m.mmap_size,
                    },
                );
            }
            Request::ResetDevice => {
                for slot in self.rings.iter_mut() {
                    *slot = RingSlot {
                        // Rings that run are stopped by the adapter.
                        running: false,
                        ..RingSlot::default()
                    };
                }
                self.acked_features = None;
                self.status = 0;
                device.reset();
                push(actions, Action::ResetRings);
                #[cfg(feature = "migration")]
                push(actions, Action::SetLogging { all: false });
                if self.inflight.take().is_some() {
                    push(actions, Action::UnmapInflight);
                }
                #[cfg(feature = "migration")]
                {
                    self.transfer = None;
                }
            }
            #[cfg(feature = "migration")]
            Request::SetLogBase(l) => {
                // The log must have a bit for every page of guest memory.
                let needed = crate::log::bitmap_bytes(self.memory.end());
                if l.size < needed {
                    debug!("log of {} bytes, {} needed", l.size, needed);
                    return Err(BackendError::LogTooSmall);
                }
                self.log = Some(l);
                push(
                    actions,
                    Action::MapLog {
                        fd: 0,
                        offset: l.offset,
                        size: l.size,
                    },
                );
                // The reply's content is not specified; QEMU only reads
                // one. A u64 0, as for a successful ack.
                outcome.reply = reply(0)?;
            }
            #[cfg(feature = "migration")]
            Request::SetLogFd => push(actions, Action::SetLogFd { fd: 0 }),
            #[cfg(feature = "migration")]
            Request::SetDeviceStateFd(direction) => {
                // Only while suspended (every ring stopped), one transfer
                // at a time (the next waits for its CHECK), and on an fd
                // open in the transfer's direction.
                let access = match direction {
                    DeviceStateDirection::Save => FdAccess::Write,
                    DeviceStateDirection::Load => FdAccess::Read,
                };
                let refusal = if self.rings.iter().any(|r| r.running) {
                    Some(BackendError::NotSuspended)
                } else if self.transfer.is_some() {
                    Some(BackendError::TransferPending)
                } else {
                    usable(fds, 0, access).err()
                };
                if let Some(e) = refusal {
                    // An error and no fd: never both an error and an fd.
                    outcome.reply = reply(DEVICE_STATE_ERROR | DEVICE_STATE_NO_FD)?;
                    outcome.refused = Some(e);
                    return Ok(());
                }
                self.transfer = Some(direction);
                push(actions, Action::TransferState { fd: 0, direction });
                outcome.reply = reply(DEVICE_STATE_NO_FD)?;
            }
            #[cfg(feature = "migration")]
            Request::CheckDeviceState => {
                if self.transfer.is_some() {
                    outcome.reply = Reply::TransferPending;
                } else {
                    outcome.reply = reply(DEVICE_STATE_ERROR)?;
                    outcome.refused = Some(BackendError::NoTransfer);
                }
            }
            #[cfg(not(feature = "migration"))]
            Request::SetLogBase(_)
            | Request::SetLogFd
            | Request::SetDeviceStateFd(_)
            | Request::CheckDeviceState => return Err(BackendError::NotNegotiated(code)),
            // QEMU sends it once, before the SET_FEATURES of the device's
            // start, when the driver negotiated VIRTIO_NET_F_MTU (so that
            // bit is not required here), with NEED_REPLY under REPLY_ACK.
            #[cfg(feature = "net")]
            Request::NetSetMtu(v) => {
                let mtu = u16::try_from(v)
                    .ok()
                    .filter(|m| *m >= crate::device::net::MIN_MTU)
                    .ok_or(BackendError::BadMtu(u32::try_from(v).unwrap_or(u32::MAX)))?;
                if !device.set_mtu(mtu) {
                    return Err(BackendError::DeviceRefused(code));
                }
            }
            // QEMU sends it (without NEED_REPLY) when it announces the
            // guest (after a migration, or QMP announce-self) and the
            // driver lacks VIRTIO_NET_F_GUEST_ANNOUNCE.
            #[cfg(feature = "net")]
            Request::SendRarp(mac) => {
                if !device.send_rarp(mac) {
                    return Err(BackendError::DeviceRefused(code));
                }
            }
            #[cfg(not(feature = "net"))]
            Request::SendRarp(_) | Request::NetSetMtu(_) => {
                return Err(BackendError::NotNegotiated(code))
            }
            // Gated by features this engine never offers (gate() refused
            // them before dispatch).
            Request::IotlbMsg(_)
            | Request::SetVringEndian { .. }
            | Request::CreateCryptoSession(_)
            | Request::CloseCryptoSession(_)
            | Request::PostcopyAdvise
            | Request::PostcopyListen
            | Request::PostcopyEnd
            | Request::GpuSetSocket
            | Request::GetSharedObject(_)
            | Request::GetShmemConfig => return Err(BackendError::NotNegotiated(code)),
        }
        Ok(())
    }

    /// Starts a stopped ring (SET_VRING_KICK, in-band VRING_KICK); refused
    /// here, on that message, if the ring cannot start.
    fn start<M: GuestMemory + ?Sized>(
        &mut self,
        q: u16,
        mem: &M,
        actions: &mut Vec<Action, MAX_ACTIONS>,
    ) -> Result<(), BackendError> {
        // A device whose state is being loaded (or saved) stays
        // suspended until the transfer is checked.
        #[cfg(feature = "migration")]
        if self.transfer.is_some() {
            return Err(BackendError::TransferPending);
        }
        let ring = self.build_ring(q, mem)?;
        self.inflight_offset(q, ring.size())?;
        let slot = self.slot_mut(q.into())?;
        slot.state = slot.state.apply(RingEvent::SetVringKick);
        slot.running = true;
        info!("ring {} started", q);
        push(actions, Action::StartRing { queue: q });
        Ok(())
    }

    fn get_config<D: Device + ?Sized>(
        &self,
        c: ConfigMsg<'_>,
        device: &D,
        out: &mut [u8],
    ) -> Result<Reply, BackendError> {
        let mut buf = [0u8; crate::message::MAX_CONFIG_SIZE as usize];
        let len = c.data.len();
        let data = &mut buf[..len];
        let ok = device.read_config(c.offset, data);
        let msg = ConfigMsg {
            offset: c.offset,
            kind: c.kind,
            data,
        };
        let n = WireReply::encode_config(FrontendReq::GetConfig, ok.then_some(&msg), out)?;
        Ok(Reply::Ready(n))
    }

    fn check_inflight(&self, num_queues: u16, queue_size: u16) -> Result<(), BackendError> {
        if num_queues == 0 || num_queues > self.config.num_queues {
            return Err(BackendError::Inflight(InflightError::NumQueues(num_queues)));
        }
        if queue_size == 0 || queue_size > self.config.max_queue_size {
            return Err(BackendError::Inflight(InflightError::QueueSize(queue_size)));
        }
        Ok(())
    }

    fn build_ring<M: GuestMemory + ?Sized>(&self, q: u16, mem: &M) -> Result<Queue, BackendError> {
        let slot = self
            .rings
            .get(usize::from(q))
            .ok_or(BackendError::NoSuchQueue(q.into()))?;
        if slot.num == 0 || slot.addr.is_none() {
            return Err(BackendError::RingNotConfigured(q));
        }
        let addrs = self.ring_addrs(q)?;
        let mut ring = Queue::new(slot.num, addrs, self.features())?;
        // A packed base with bits 16-31 zero is the avail position alone
        // (DPDK's virtio-user sends no more) when nothing can be in flight:
        // without an inflight area the last stop drained the ring, so used
        // = avail. With one, the full encoding says what is in flight.
        let untracked = !matches!(self.inflight_offset(q, ring.size()), Ok(Some(_)));
        match &mut ring {
            Queue::Packed(p) if untracked && slot.base >> 16 == 0 => {
                p.set_base_avail_only(slot.base as u16)?
            }
            _ => ring.set_base(slot.base)?,
        }
        ring.check_areas(mem)?;
        if let Queue::Split(s) = &mut ring {
            // The used index lives in guest memory (a restarted ring, or a
            // guest that reset its ring, must agree with it).
            s.sync_used(mem)?;
        }
        Ok(ring)
    }

    /// Installs a new memory table, unless a running ring would no longer
    /// translate in it (then nothing changes). Returns whether rings run
    /// and need [`Action::RemapRings`] after the mapping actions.
    fn commit_memory(&mut self, next: MemoryTable<R>) -> Result<bool, BackendError> {
        let mut any = false;
        for (q, slot) in self.rings.iter().enumerate() {
            if slot.running {
                self.ring_addrs_in(&next, q as u16)?;
                any = true;
            }
        }
        self.memory = next;
        Ok(any)
    }

    fn apply_all(&mut self, event: RingEvent, actions: &mut Vec<Action, MAX_ACTIONS>) {
        for (q, slot) in self.rings.iter_mut().enumerate() {
            let before = slot.state.is_enabled();
            slot.state = slot.state.apply(event);
            let after = slot.state.is_enabled();
            if slot.running && before != after {
                push(
                    actions,
                    Action::SetEnabled {
                        queue: q as u16,
                        enabled: after,
                    },
                );
            }
        }
    }

    /// The ring's region of the inflight area (its offset), if requests
    /// are tracked; refused if the area was made for another ring size.
    fn inflight_offset(&self, q: u16, size: u16) -> Result<Option<u64>, BackendError> {
        match self.inflight {
            Some((nq, qs, stride)) if q < nq => {
                if qs != size {
                    return Err(BackendError::Inflight(InflightError::SizeMismatch {
                        area: qs,
                        ring: size,
                    }));
                }
                Ok(Some(u64::from(q) * stride))
            }
            _ => Ok(None),
        }
    }

    /// After [`Action::StartRing`]: the ring's [`DataPlane`], built from
    /// its size, addresses, base and the negotiated features, with its
    /// region of the inflight area when one was set (`area` is that area
    /// as the adapter mapped it). `consume_disabled` is
    /// [`Device::consume_while_disabled`].
    ///
    /// Refused when the area's recorded state cannot be recovered: every
    /// field recovery reads (version, desc_num, used index, last batch,
    /// entry flags, counts and links of the requests to resubmit) is
    /// checked before the ring starts; the adapter ends the connection.
    // Out of line: the ring's build and recovery keep their stack to
    // themselves instead of adding it to every action a caller carries
    // out in the same function (the bare-metal back-end's budget).
    #[inline(never)]
    pub fn start_ring<M: GuestMemory + ?Sized>(
        &self,
        queue: u16,
        mem: &M,
        area: Option<&M>,
        consume_disabled: bool,
    ) -> Result<DataPlane, BackendError> {
        let ring = self.build_ring(queue, mem)?;
        let inflight = match (self.inflight_offset(queue, ring.size())?, area) {
            (Some(off), Some(a)) => Some((a, off)),
            (Some(_), None) => return Err(BackendError::Inflight(InflightError::TooSmall)),
            (None, _) => None,
        };
        let enabled = self
            .rings
            .get(usize::from(queue))
            .is_some_and(|s| s.state.is_enabled());
        // IN_ORDER, if acked, is on from the ring's build.
        let dp = DataPlane::start(ring, enabled, consume_disabled, mem, inflight);
        // Only recovery can break a ring at its start: an area it refused
        // (a header field, a link, a count, a flag out of range) is refused
        // here, before the ring runs.
        match dp.error() {
            Some(DataPlaneError::Inflight(e)) => Err(BackendError::Inflight(e)),
            Some(DataPlaneError::Vring(e)) => Err(BackendError::Vring(e)),
            _ => Ok(dp),
        }
    }

    /// Completes a pending GET_VRING_BASE: the ring's data plane has
    /// stopped ([`DataPlane::stop`]) at `base`. Writes the reply into `out`
    /// and returns its length.
    pub fn finish_stop(
        &mut self,
        queue: u16,
        base: u32,
        out: &mut [u8],
    ) -> Result<usize, BackendError> {
        let slot = self.slot_mut(queue.into())?;
        if !slot.stopping {
            return Err(BackendError::NotStopping(queue));
        }
        let code = slot.stop_code.unwrap_or(FrontendReq::GetVringBase);
        // The reply is encoded before the ring is marked stopped: an `out`
        // too short for it changes nothing, and the call can be made again
        // with room for the reply the front-end waits for.
        let n = WireReply::encode_vring_state(code, queue.into(), base, out)?;
        slot.stopping = false;
        slot.running = false;
        slot.stop_code = None;
        slot.base = base;
        slot.kick = Notifier::Unset;
        slot.call = Notifier::Unset;
        debug!("ring {} stopped at {:#x}", queue, base);
        Ok(n)
    }

    /// Answers a pending CHECK_DEVICE_STATE ([`Reply::TransferPending`]):
    /// the transfer of [`Action::TransferState`] ended, `ok` if the whole
    /// state was written (save) or read and loaded into the device (load).
    /// Writes the reply (u64 0, or 1 on failure) into `out` and returns its
    /// length; a new transfer may follow. A buffer too short for the reply
    /// leaves the transfer pending.
    #[cfg(feature = "migration")]
    pub fn finish_transfer(&mut self, ok: bool, out: &mut [u8]) -> Result<usize, BackendError> {
        let Some(direction) = self.transfer else {
            return Err(BackendError::NoTransfer);
        };
        let v = if ok { 0 } else { DEVICE_STATE_ERROR };
        // Encoded before the transfer is forgotten: a reply buffer too
        // short leaves it pending, for a call with room.
        let n = WireReply::encode_u64(FrontendReq::CheckDeviceState, v, out)?;
        self.transfer = None;
        debug!(
            "device state {:?}: {}",
            direction,
            if ok { "ok" } else { "failed" }
        );
        Ok(n)
    }

    /// The device state transfer accepted and not yet checked, if any.
    #[cfg(feature = "migration")]
    pub fn transfer(&self) -> Option<DeviceStateDirection> {
        self.transfer
    }

    /// After RESET_DEVICE's [`Action::ResetRings`], or when the connection
    /// ends: forget that workers run.
    pub fn rings_reset(&mut self) {
        for slot in self.rings.iter_mut() {
            slot.running = false;
            slot.stopping = false;
        }
    }

    /// Whether a ring may be processed, and how (started × enabled).
    pub fn processing(&self, queue: u16) -> Processing {
        self.rings
            .get(usize::from(queue))
            .map_or(Processing::Stopped, |s| s.state.processing())
    }
}

/// SET_DEVICE_STATE_FD's reply: no fd of the back-end's comes with it.
#[cfg(feature = "migration")]
const DEVICE_STATE_NO_FD: u64 = 0x100;
/// The error value of SET_DEVICE_STATE_FD's and CHECK_DEVICE_STATE's
/// replies (bits 0-7).
#[cfg(feature = "migration")]
const DEVICE_STATE_ERROR: u64 = 1;

/// Whether two SET_VRING_ADDRs name the same ring areas (they may differ
/// in used-ring logging).
#[cfg(feature = "migration")]
fn same_areas(a: VringAddrMsg, b: VringAddrMsg) -> bool {
    (a.index, a.desc, a.used, a.avail) == (b.index, b.desc, b.used, b.avail)
}

fn fd_of(v: VringFdMsg) -> Option<FdIndex> {
    if v.no_fd {
        None
    } else {
        Some(0)
    }
}

fn notifier(v: VringFdMsg) -> Notifier {
    if v.no_fd {
        Notifier::Polling
    } else {
        Notifier::Fd
    }
}

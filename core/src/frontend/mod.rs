//! The front-end session engine: builds the vhost-user handshake in QEMU's
//! order and validates every reply.
//!
//! The engine is a value ([`Frontend`]) in the quinn-proto mould. It never
//! sees a socket or a file descriptor:
//!
//! 1. [`Frontend::poll_transmit`] writes the next message into the caller's
//!    buffer and returns a [`Transmit`]: its length, the fds to attach (by
//!    [`FdRef`]; the adapter owns them) and whether a reply is awaited.
//! 2. The adapter sends it; if a reply is awaited it reads one message and
//!    hands it to [`Frontend::handle_reply`], which validates it.
//! 3. [`Frontend::poll_event`] reports progress ([`Event`]): negotiation
//!    done, kicks to inject, rings started and stopped (with their bases),
//!    config bytes.
//! 4. Commands ([`Frontend::start`], [`Frontend::stop`],
//!    [`Frontend::read_config`], [`Frontend::set_memory`]) queue a new flow;
//!    the init flow starts by itself in [`Frontend::new`].
//!
//! Loop until `poll_transmit` returns `Ok(None)` and no reply is awaited,
//! draining `poll_event` after each call.
//!
//! # Message order (notes §3.2, QEMU's `vhost-user.c` / `vhost.c`)
//!
//! Init: GET_FEATURES, GET_PROTOCOL_FEATURES and SET_PROTOCOL_FEATURES (if
//! VHOST_USER_F_PROTOCOL_FEATURES is offered and wanted), GET_QUEUE_NUM (MQ),
//! GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_BACKEND_REQ_FD (BACKEND_REQ),
//! SET_OWNER, GET_FEATURES (checked against the first answer).
//!
//! Start: SET_FEATURES, SET_STATUS(FEATURES_OK) (STATUS), the memory
//! (SET_MEM_TABLE, or with CONFIGURE_MEM_SLOTS one REM_MEM_REG per stale
//! region and one ADD_MEM_REG per new region; nothing if the back-end
//! already has the table), per ring SET_VRING_NUM, SET_VRING_BASE,
//! SET_VRING_ADDR, SET_VRING_KICK (then [`Event::InjectKick`]),
//! SET_VRING_CALL; then SET_VRING_ENABLE(1) per ring (bit 30 negotiated);
//! SET_STATUS(DRIVER_OK) (STATUS).
//!
//! Stop: SET_VRING_ENABLE(0) per ring (bit 30), GET_VRING_BASE per ring,
//! SET_STATUS(0) (STATUS). A later [`Frontend::start`] resumes every ring
//! from the base the back-end returned.
//!
//! With REPLY_ACK negotiated the engine sets NEED_REPLY on SET_MEM_TABLE,
//! ADD/REM_MEM_REG, SET_BACKEND_REQ_FD, SET_VRING_KICK, SET_VRING_CALL,
//! SET_VRING_ENABLE and SET_STATUS (as QEMU does) and waits for the ack
//! before the next message; a non-zero ack is [`FrontendError::Nack`].
//!
//! # Dirty logging (live migration, notes §5.2)
//!
//! [`Frontend::start_logging`] sends SET_LOG_BASE (the log's size and
//! offset 0, with [`FdRef::Log`]; the back-end's reply is awaited, its
//! content unspecified and not kept), SET_FEATURES with VHOST_F_LOG_ALL
//! added, and, while the rings run, SET_VRING_ADDR again for every ring
//! with VHOST_VRING_F_LOG and the used ring's guest physical address as
//! the log address (the same ring addresses: the spec lets a running ring
//! take it, as QEMU sends it). [`Frontend::stop_logging`] sends
//! SET_FEATURES without the bit and SET_VRING_ADDR without the flag. With
//! REPLY_ACK the SET_FEATURES and SET_VRING_ADDR of these flows are acked;
//! without it a GET_FEATURES round trip ends them, so that logging is
//! known to be on (or off) when [`Event::Logging`] arrives. While logging
//! is on, a start sends VHOST_F_LOG_ALL and VHOST_VRING_F_LOG too.

mod error;

pub use error::FrontendError;

use heapless::{Deque, Vec};

use crate::feature::{select_protocol, select_virtio, ProtocolFeatures, VirtioFeatures};
use crate::memory::MemoryTable;
use crate::message::{
    BackendReq, BackendRequest, ConfigMsg, ConfigWriteKind, DeviceStateDirection, FrontendReq,
    Header, InflightMsg, LogMsg, MemRegionMsg, MemTable, ParseOptions, Reply, Request,
    VringAddrMsg, VringFdMsg, VringStateMsg, WireError, HEADER_SIZE, MAX_CONFIG_SIZE, MAX_FDS,
    MAX_MEM_REGIONS, MAX_QUEUES,
};
use crate::vring::{RingAddrs, MAX_QUEUE_SIZE};

/// Default capacity for queues.
pub const DEFAULT_QUEUES: usize = 8;
/// Default capacity for memory regions.
pub const DEFAULT_REGIONS: usize = 8;
/// Largest message the engine produces (GET_CONFIG of 256 bytes); a
/// `poll_transmit` buffer of this size always suffices.
pub const MAX_TRANSMIT: usize = HEADER_SIZE + 12 + MAX_CONFIG_SIZE as usize;

/// Protocol features this engine implements. BACKEND_REQ means the engine
/// sends SET_BACKEND_REQ_FD with [`FdRef::BackendChannel`]; the adapter
/// serves that channel with [`Frontend::serve_backend`].
pub const SUPPORTED_PROTOCOL_FEATURES: ProtocolFeatures = ProtocolFeatures::MQ
    .union(ProtocolFeatures::REPLY_ACK)
    .union(ProtocolFeatures::BACKEND_REQ)
    .union(ProtocolFeatures::CONFIG)
    .union(ProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(ProtocolFeatures::STATUS)
    .union(ProtocolFeatures::INFLIGHT_SHMFD)
    .union(ProtocolFeatures::GET_VRING_BASE_INFLIGHT)
    .union(ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN)
    .union(ProtocolFeatures::INBAND_NOTIFICATIONS)
    .union(ProtocolFeatures::DEVICE_STATE)
    .union(ProtocolFeatures::LOG_SHMFD);

/// Virtio device status bits sent with SET_STATUS.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
}

/// Events the engine keeps before the caller drains them; the engine stops
/// producing messages while fewer than [`EVENT_HEADROOM`] slots are free.
const EVENT_CAPACITY: usize = 8;
/// Most events one completed message produces.
const EVENT_HEADROOM: usize = 2;

/// How a ring's kick or call is signalled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NotifyMode {
    /// An eventfd the adapter owns ([`FdRef::Kick`] / [`FdRef::Call`]).
    #[default]
    Eventfd,
    /// No fd (the no-fd bit): the back-end polls the ring (kick), or the
    /// front-end polls the used ring (call).
    Polling,
    /// In-band notifications (INBAND_NOTIFICATIONS negotiated, else
    /// [`Frontend::start`] refuses): the ring is started with VRING_KICK
    /// instead of SET_VRING_KICK and kicked with [`Frontend::kick`] (kick),
    /// or SET_VRING_CALL has the no-fd bit and the back-end sends
    /// BACKEND_VRING_CALL on the back-end channel (call).
    InBand,
}

/// One queue as the front-end sets it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QueueConfig {
    /// Ring size (1 to 32768).
    pub size: u16,
    /// Ring addresses as the front-end sends them in SET_VRING_ADDR:
    /// front-end virtual addresses (`desc`, `driver` = avail, `device` =
    /// used).
    pub addrs: RingAddrs,
    /// The first SET_VRING_BASE (split: next avail index; packed: the
    /// encoding of notes §1.3). Later starts use the base of the last stop.
    pub base: u32,
    /// Kick notification.
    pub kick: NotifyMode,
    /// Call notification.
    pub call: NotifyMode,
}

/// What the front-end wants and has.
///
/// `Q` bounds the queues, `R` the memory regions (more than 8 only work
/// with CONFIGURE_MEM_SLOTS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendConfig<const Q: usize = DEFAULT_QUEUES, const R: usize = DEFAULT_REGIONS> {
    /// Virtio features wanted; the engine acks those the back-end offers.
    /// Include [`VirtioFeatures::PROTOCOL_FEATURES`] to use protocol
    /// features at all.
    pub features: VirtioFeatures,
    /// Protocol features the front-end supports (a subset of
    /// [`SUPPORTED_PROTOCOL_FEATURES`]); the engine acks those the
    /// back-end offers, minus any whose dependencies are unmet.
    pub protocol_features: ProtocolFeatures,
    /// The queues, in ring index order.
    pub queues: Vec<QueueConfig, Q>,
    /// Guest memory regions; [`FdRef::Region`] names an index of this list.
    pub regions: Vec<MemRegionMsg, R>,
    /// With INFLIGHT_SHMFD negotiated: the inflight area of an earlier
    /// connection to hand back (after a reconnect), or `None` to ask the
    /// back-end for one with GET_INFLIGHT_FD at the first start. Either way
    /// every start sends SET_INFLIGHT_FD with [`FdRef::Inflight`].
    pub inflight: Option<InflightMsg>,
}

impl<const Q: usize, const R: usize> FrontendConfig<Q, R> {
    /// A configuration without queues or memory (push them onto
    /// [`queues`](Self::queues) and [`regions`](Self::regions)).
    pub fn new(features: VirtioFeatures, protocol_features: ProtocolFeatures) -> Self {
        FrontendConfig {
            features,
            protocol_features,
            queues: Vec::new(),
            regions: Vec::new(),
            inflight: None,
        }
    }

    /// The configuration of a probe (`vhu probe`): every virtio feature
    /// wanted, every implemented protocol feature but BACKEND_REQ and
    /// INBAND_NOTIFICATIONS (a probe has no back-end channel), no queues, no memory. After
    /// [`Event::Negotiated`], [`Frontend::backend_info`] holds the offer,
    /// the queue count and the memory slots; [`Frontend::read_config`] reads
    /// the config space.
    pub fn probe() -> Self {
        Self::new(
            VirtioFeatures::all(),
            SUPPORTED_PROTOCOL_FEATURES
                .difference(ProtocolFeatures::BACKEND_REQ)
                .difference(ProtocolFeatures::INBAND_NOTIFICATIONS),
        )
    }
}

/// A file descriptor the adapter attaches to a message. The engine names
/// fds; the adapter owns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FdRef {
    /// The fd of memory region `i` of the current region list
    /// ([`Frontend::regions`]).
    Region(u16),
    /// The kick eventfd of a ring.
    Kick(u16),
    /// The call eventfd of a ring.
    Call(u16),
    /// The front-end's end of the back-end channel (SET_BACKEND_REQ_FD).
    BackendChannel,
    /// The inflight area's fd (from GET_INFLIGHT_FD's reply, kept by the
    /// adapter across reconnects).
    Inflight,
    /// The back-end's end of the device state channel of
    /// [`Frontend::transfer_state`] (typically a pipe end).
    DeviceState,
    /// The dirty log's shared memory (SET_LOG_BASE, from
    /// [`Frontend::start_logging`]).
    Log,
}

/// A message to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The request.
    pub request: FrontendReq,
    /// Bytes of the caller's buffer that form the message.
    pub len: usize,
    /// The fds to attach, in order.
    pub fds: Vec<FdRef, MAX_FDS>,
    /// A reply must be read and passed to [`Frontend::handle_reply`] before
    /// anything else is sent.
    pub awaits_reply: bool,
}

/// What the front-end learnt about the back-end (for `vhu probe`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// Virtio features offered (GET_FEATURES).
    pub features: VirtioFeatures,
    /// Protocol features offered (GET_PROTOCOL_FEATURES; `None` if not
    /// asked because bit 30 was not offered or not wanted).
    pub protocol_features: Option<ProtocolFeatures>,
    /// GET_QUEUE_NUM (with MQ).
    pub queue_num: Option<u64>,
    /// GET_MAX_MEM_SLOTS (with CONFIGURE_MEM_SLOTS).
    pub max_mem_slots: Option<u64>,
}

/// Something that happened, from [`Frontend::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
// The config bytes ride inline (no allocator in the core); events are
// taken one at a time, so the size costs a copy, not memory.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// The init is done: what SET_FEATURES will ack at start, and the acked
    /// protocol features. Commands may follow.
    Negotiated {
        /// Virtio features: offered ∩ wanted.
        features: VirtioFeatures,
        /// Protocol features acked with SET_PROTOCOL_FEATURES.
        protocol_features: ProtocolFeatures,
    },
    /// SET_VRING_KICK went out (and was acked): write 1 to the ring's kick
    /// eventfd, for back-ends that only start on a kick.
    InjectKick(u16),
    /// The ring's notifiers are installed: the back-end processes it (until
    /// SET_VRING_ENABLE(1), without side effects).
    RingStarted(u16),
    /// The start is complete: every ring runs.
    Started,
    /// GET_VRING_BASE answered: the ring is stopped at `base`.
    RingStopped {
        /// Ring index.
        queue: u16,
        /// The base, used by the next start.
        base: u32,
    },
    /// Every ring is stopped.
    Stopped,
    /// A memory change ([`Frontend::set_memory`]) reached the back-end.
    MemoryUpdated,
    /// GET_CONFIG answered.
    Config {
        /// Offset in the config space.
        offset: u32,
        /// The bytes.
        data: Vec<u8, { MAX_CONFIG_SIZE as usize }>,
    },
    /// GET_CONFIG failed (the back-end answered with an empty payload).
    ConfigFailed {
        /// Offset asked.
        offset: u32,
        /// Length asked.
        len: u32,
    },
    /// SET_DEVICE_STATE_FD accepted: run the transfer now (save: read the
    /// channel to its end; load: write the state and close it), then
    /// [`Frontend::check_state`].
    StateTransfer {
        /// Save or load.
        direction: DeviceStateDirection,
        /// The back-end sent an fd of its own with the reply: the transfer
        /// uses that one (the adapter took it from the reply) instead of
        /// the channel the front-end gave.
        backend_fd: bool,
    },
    /// CHECK_DEVICE_STATE answered 0: the whole state was saved or
    /// loaded.
    StateChecked,
    /// Dirty logging is on (`true`, [`Frontend::start_logging`]) or off
    /// (`false`, [`Frontend::stop_logging`]) in the back-end.
    Logging(bool),
}

/// What a back-end channel request told the front-end
/// ([`Frontend::serve_backend`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BackendNotice {
    /// CONFIG_CHANGE_MSG: the device's config space changed; read it again
    /// ([`Frontend::read_config`]) and tell the driver.
    ConfigChanged,
    /// In-band BACKEND_VRING_CALL: the ring's used buffers are there, as a
    /// write to its call eventfd would say.
    Call(u16),
    /// In-band BACKEND_VRING_ERR: the ring broke on guest input and stopped.
    RingError(u16),
    /// A request this front-end does not serve (not negotiated, or not
    /// implemented: IOTLB, host notifiers, shared objects, shared memory);
    /// it was answered with a failure when an ack was asked.
    Refused(BackendReq),
}

/// A back-end channel request served by [`Frontend::serve_backend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// What the request said.
    pub notice: BackendNotice,
    /// Bytes of the caller's buffer to send back on the channel (the ack
    /// the back-end asked for with NEED_REPLY, REPLY_ACK negotiated).
    pub reply: Option<usize>,
}

/// Serves the back-end channel of a session ([`Frontend::backend_server`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendServer {
    protocol: ProtocolFeatures,
    queues: u32,
}

impl BackendServer {
    /// Serves one request the back-end sent on the back-end channel
    /// (header, payload, number of fds that came with it): what it says,
    /// and the ack to send back (written into `out`) if one was asked.
    ///
    /// CONFIG_CHANGE_MSG needs CONFIG negotiated, BACKEND_VRING_CALL and
    /// BACKEND_VRING_ERR need INBAND_NOTIFICATIONS and a configured ring;
    /// any other well-formed request is [`BackendNotice::Refused`] (a
    /// failed ack). A malformed request (bad flags, size, fds or ring
    /// index) is an error: the back-end misbehaves and the adapter closes
    /// the connection. Nothing of the session changes, so the channel may
    /// be served at any time, between any two main-channel messages.
    pub fn serve(
        &self,
        header: &Header,
        payload: &[u8],
        nfds: usize,
        out: &mut [u8],
    ) -> Result<Served, FrontendError> {
        let opts = ParseOptions {
            max_queues: self.queues,
            xen_mmap: false,
        };
        let req = BackendRequest::parse(header, payload, nfds, &opts)?;
        let p = self.protocol;
        let inband = p.contains(ProtocolFeatures::INBAND_NOTIFICATIONS);
        // Ring indices were checked against the configured queues.
        let notice = match req {
            BackendRequest::ConfigChange if p.contains(ProtocolFeatures::CONFIG) => {
                BackendNotice::ConfigChanged
            }
            BackendRequest::VringCall(q) if inband => BackendNotice::Call(q as u16),
            BackendRequest::VringErr(q) if inband => BackendNotice::RingError(q as u16),
            _ => BackendNotice::Refused(req.code()),
        };
        let reply = if header.need_reply() && p.contains(ProtocolFeatures::REPLY_ACK) {
            let value = u64::from(matches!(notice, BackendNotice::Refused(_)));
            Some(BackendRequest::encode_reply(req.code(), value, out)?)
        } else {
            None
        };
        Ok(Served { notice, reply })
    }
}

/// Where the session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum State {
    /// The init flow runs.
    Initializing,
    /// Negotiated; never started.
    Ready,
    /// The start flow runs.
    Starting,
    /// Every ring runs.
    Started,
    /// The stop flow runs.
    Stopping,
    /// Every ring is stopped; `start` resumes them.
    Stopped,
    /// A reply was refused; the connection must be closed.
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Init,
    Start,
    Stop,
    Memory,
    Config,
    /// One in-band VRING_KICK ([`Frontend::kick`]).
    Kick,
    /// The start's first half ([`Frontend::prepare`]).
    Prepare,
    /// SET_DEVICE_STATE_FD ([`Frontend::transfer_state`]).
    Transfer,
    /// CHECK_DEVICE_STATE ([`Frontend::check_state`]).
    Check,
    /// Dirty logging switched on or off ([`Frontend::start_logging`],
    /// [`Frontend::stop_logging`]).
    Log,
}

/// One message of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    GetFeatures,
    GetProtocolFeatures,
    SetProtocolFeatures,
    GetQueueNum,
    GetMaxMemSlots,
    SetBackendReqFd,
    SetOwner,
    CheckFeatures,
    SetFeatures,
    FeaturesOk,
    MemTable,
    RemRegion(MemRegionMsg),
    AddRegion(u16),
    VringNum(u16),
    VringBase(u16),
    VringAddr(u16),
    VringKick(u16),
    /// VRING_KICK: starts the ring (in-band kick mode), or kicks it.
    InBandKick(u16),
    VringCall(u16),
    Enable(u16),
    DriverOk,
    Disable(u16),
    GetBase(u16),
    ResetStatus,
    GetConfig {
        offset: u32,
        len: u32,
    },
    GetInflight,
    SetInflight,
    /// GET_VRING_BASE_SKIP_DRAIN (message 45).
    GetBaseNoDrain(u16),
    SetDeviceState(DeviceStateDirection),
    CheckDeviceState,
    /// SET_LOG_BASE.
    SetLogBase,
    /// SET_FEATURES switching VHOST_F_LOG_ALL (acked with REPLY_ACK).
    LogFeatures,
    /// SET_VRING_ADDR of a running ring switching VHOST_VRING_F_LOG
    /// (acked with REPLY_ACK).
    LogAddr(u16),
    /// GET_FEATURES ending a logging flow without REPLY_ACK (QEMU's way
    /// of knowing the back-end took the change).
    LogSync,
}

const INIT_ORDER: [Step; 8] = [
    Step::GetFeatures,
    Step::GetProtocolFeatures,
    Step::SetProtocolFeatures,
    Step::GetQueueNum,
    Step::GetMaxMemSlots,
    Step::SetBackendReqFd,
    Step::SetOwner,
    Step::CheckFeatures,
];

impl Step {
    fn code(self) -> FrontendReq {
        use FrontendReq as C;
        match self {
            Step::GetFeatures | Step::CheckFeatures | Step::LogSync => C::GetFeatures,
            Step::GetProtocolFeatures => C::GetProtocolFeatures,
            Step::SetProtocolFeatures => C::SetProtocolFeatures,
            Step::GetQueueNum => C::GetQueueNum,
            Step::GetMaxMemSlots => C::GetMaxMemSlots,
            Step::SetBackendReqFd => C::SetBackendReqFd,
            Step::SetOwner => C::SetOwner,
            Step::SetFeatures | Step::LogFeatures => C::SetFeatures,
            Step::FeaturesOk | Step::DriverOk | Step::ResetStatus => C::SetStatus,
            Step::MemTable => C::SetMemTable,
            Step::RemRegion(_) => C::RemMemReg,
            Step::AddRegion(_) => C::AddMemReg,
            Step::VringNum(_) => C::SetVringNum,
            Step::VringBase(_) => C::SetVringBase,
            Step::VringAddr(_) | Step::LogAddr(_) => C::SetVringAddr,
            Step::VringKick(_) => C::SetVringKick,
            Step::InBandKick(_) => C::VringKick,
            Step::VringCall(_) => C::SetVringCall,
            Step::Enable(_) | Step::Disable(_) => C::SetVringEnable,
            Step::GetBase(_) => C::GetVringBase,
            Step::GetBaseNoDrain(_) => C::GetVringBaseSkipDrain,
            Step::GetConfig { .. } => C::GetConfig,
            Step::GetInflight => C::GetInflightFd,
            Step::SetInflight => C::SetInflightFd,
            Step::SetDeviceState(_) => C::SetDeviceStateFd,
            Step::CheckDeviceState => C::CheckDeviceState,
            Step::SetLogBase => C::SetLogBase,
        }
    }

    /// Whether the engine asks for a REPLY_ACK on this step (when
    /// REPLY_ACK is negotiated): the messages QEMU synchronises on.
    fn wants_ack(self) -> bool {
        use FrontendReq as C;
        matches!(self, Step::LogFeatures | Step::LogAddr(_))
            || matches!(
                self.code(),
                C::SetMemTable
                    | C::AddMemReg
                    | C::RemMemReg
                    | C::SetBackendReqFd
                    | C::SetVringKick
                    | C::SetVringCall
                    | C::SetVringEnable
                    | C::SetStatus
                    | C::VringKick
            )
    }
}

static ZEROS: [u8; MAX_CONFIG_SIZE as usize] = [0; MAX_CONFIG_SIZE as usize];

/// The front-end side of one back-end connection.
///
/// `Q` bounds the queues and `R` the memory regions, as in
/// [`FrontendConfig`].
#[derive(Debug)]
pub struct Frontend<const Q: usize = DEFAULT_QUEUES, const R: usize = DEFAULT_REGIONS> {
    config: FrontendConfig<Q, R>,
    state: State,
    flow: Option<Flow>,
    /// The next message of the flow (sent by the next `poll_transmit`).
    next: Option<Step>,
    /// The message whose reply is awaited.
    awaiting: Option<Step>,
    info: BackendInfo,
    features: VirtioFeatures,
    protocol: ProtocolFeatures,
    /// Regions the back-end has (as sent).
    installed: Vec<MemRegionMsg, R>,
    /// Per ring: the base the next start sends.
    bases: Vec<u32, Q>,
    /// The inflight area (from the config, or GET_INFLIGHT_FD).
    inflight: Option<InflightMsg>,
    /// The stop in progress uses message 45.
    no_drain: bool,
    /// While dirty logging is on (or being switched on): the log's size.
    log: Option<u64>,
    events: Deque<Event, EVENT_CAPACITY>,
}

impl<const Q: usize, const R: usize> Frontend<Q, R> {
    /// A session with `config`; the init flow is queued, so the first
    /// [`poll_transmit`](Self::poll_transmit) returns GET_FEATURES.
    ///
    /// Refuses protocol features the engine does not implement
    /// ([`FrontendError::Unsupported`]), more than 256 queues or an invalid
    /// ring size ([`FrontendError::BadQueue`]) and invalid or overlapping
    /// regions ([`FrontendError::BadRegion`]).
    pub fn new(config: FrontendConfig<Q, R>) -> Result<Self, FrontendError> {
        let extra = config
            .protocol_features
            .difference(SUPPORTED_PROTOCOL_FEATURES);
        if !extra.is_empty() {
            return Err(FrontendError::Unsupported(extra.bits()));
        }
        for (i, q) in config.queues.iter().enumerate() {
            if i >= MAX_QUEUES as usize || q.size == 0 || q.size > MAX_QUEUE_SIZE {
                return Err(FrontendError::BadQueue(i));
            }
        }
        check_regions::<R>(&config.regions)?;
        let mut bases = Vec::new();
        for q in &config.queues {
            // Same capacity as `config.queues`.
            let _ = bases.push(q.base);
        }
        let inflight = config.inflight;
        Ok(Frontend {
            config,
            state: State::Initializing,
            flow: Some(Flow::Init),
            next: Some(Step::GetFeatures),
            awaiting: None,
            info: BackendInfo::default(),
            features: VirtioFeatures::empty(),
            protocol: ProtocolFeatures::empty(),
            installed: Vec::new(),
            bases,
            inflight,
            no_drain: false,
            log: None,
            events: Deque::new(),
        })
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The configuration (regions as last set by
    /// [`set_memory`](Self::set_memory)).
    pub fn config(&self) -> &FrontendConfig<Q, R> {
        &self.config
    }

    /// The current memory regions; [`FdRef::Region`] indexes this list.
    pub fn regions(&self) -> &[MemRegionMsg] {
        &self.config.regions
    }

    /// What the back-end offered and answered so far.
    pub fn backend_info(&self) -> &BackendInfo {
        &self.info
    }

    /// The virtio features acked (or to be acked at start): offered ∩
    /// wanted. Empty before GET_FEATURES is answered.
    pub fn features(&self) -> VirtioFeatures {
        self.features
    }

    /// The acked protocol features.
    pub fn protocol_features(&self) -> ProtocolFeatures {
        self.protocol
    }

    /// The base ring `queue` starts from at the next start: the configured
    /// base, or the one the last stop returned.
    pub fn ring_base(&self, queue: u16) -> Option<u32> {
        self.bases.get(usize::from(queue)).copied()
    }

    /// Whether a reply is awaited (the adapter must read one message and
    /// call [`handle_reply`](Self::handle_reply)).
    pub fn awaits_reply(&self) -> bool {
        self.awaiting.is_some()
    }

    /// Whether nothing is left to do: no flow runs, no reply is awaited.
    pub fn is_idle(&self) -> bool {
        self.flow.is_none() && self.awaiting.is_none()
    }

    /// Writes the next message into `out` and says how to send it.
    ///
    /// Call it whenever the engine may have something to send: after
    /// [`new`](Self::new), after each [`handle_reply`](Self::handle_reply),
    /// after each command, until it returns `Ok(None)`. It returns
    /// `Ok(None)` while a reply is awaited, when no flow runs, and while
    /// undrained events fill the event queue (call
    /// [`poll_event`](Self::poll_event)).
    ///
    /// Errors: [`FrontendError::Failed`] after a fatal error;
    /// [`WireError::BufferTooSmall`]
    /// if `out` is shorter than the message (nothing changes; a buffer of
    /// [`MAX_TRANSMIT`] bytes always suffices).
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Result<Option<Transmit>, FrontendError> {
        if self.state == State::Failed {
            return Err(FrontendError::Failed);
        }
        if self.awaiting.is_some() || self.events.capacity() - self.events.len() < EVENT_HEADROOM {
            return Ok(None);
        }
        let Some(step) = self.next else {
            return Ok(None);
        };
        let code = step.code();
        let need_reply = !code.has_reply()
            && step.wants_ack()
            && self.protocol.contains(ProtocolFeatures::REPLY_ACK);
        let len = self.request(step)?.encode(need_reply, out)?;
        let fds = self.fds(step);
        let awaits_reply = code.has_reply() || need_reply;
        trace!("-> {} ({} bytes, {} fds)", code.id(), len, fds.len());
        if awaits_reply {
            self.awaiting = Some(step);
        } else {
            self.complete(step);
        }
        Ok(Some(Transmit {
            request: code,
            len,
            fds,
            awaits_reply,
        }))
    }

    /// Takes the reply to the message in flight.
    ///
    /// Call it with each message read while
    /// [`awaits_reply`](Self::awaits_reply): `header` validated by
    /// [`Header::parse`], `payload` the `header.size` bytes after it, `nfds`
    /// the number of fds that came with it (the adapter closes them; the
    /// engine accepts none). Returns `Ok(())` when the reply is valid and
    /// applied (then call [`poll_transmit`](Self::poll_transmit) and
    /// [`poll_event`](Self::poll_event)).
    ///
    /// Every error is fatal (the engine enters [`State::Failed`]): no reply
    /// awaited, another request id, flags other than exactly
    /// `VERSION | REPLY`, a size the request does not allow, a failed ack,
    /// or a value that is not sane for the request; but for a refused
    /// device state transfer ([`FrontendError::StateRefused`]), which ends
    /// its flow and leaves the session going.
    pub fn handle_reply(
        &mut self,
        header: &Header,
        payload: &[u8],
        nfds: usize,
    ) -> Result<(), FrontendError> {
        if self.state == State::Failed {
            return Err(FrontendError::Failed);
        }
        let Some(step) = self.awaiting else {
            return self.fail(FrontendError::UnexpectedReply {
                request: header.request,
            });
        };
        let code = step.code();
        let reply = match Reply::parse(code, header, payload, nfds, &ParseOptions::default()) {
            Ok(r) => r,
            Err(e) => return self.fail(e.into()),
        };
        match self.take_reply(step, reply) {
            Ok(()) => {}
            Err(e @ FrontendError::StateRefused { .. }) => {
                // The transfer's flow (this one message) ends; the
                // session goes on as it was.
                warn!("{}", e);
                self.awaiting = None;
                self.next = None;
                self.finish_flow();
                return Err(e);
            }
            Err(e) => return self.fail(e),
        }
        self.awaiting = None;
        self.complete(step);
        Ok(())
    }

    /// Serves one request the back-end sent on the back-end channel; see
    /// [`BackendServer::serve`].
    pub fn serve_backend(
        &self,
        header: &Header,
        payload: &[u8],
        nfds: usize,
        out: &mut [u8],
    ) -> Result<Served, FrontendError> {
        self.backend_server().serve(header, payload, nfds, out)
    }

    /// What serving the back-end channel needs of this session (the
    /// negotiated protocol features, the queue count), as a value a thread
    /// that reads the channel can keep.
    pub fn backend_server(&self) -> BackendServer {
        BackendServer {
            protocol: self.protocol,
            queues: self.config.queues.len() as u32,
        }
    }

    /// The next event, if any. Drain it after every `poll_transmit` and
    /// `handle_reply`.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Starts (or, after [`stop`](Self::stop), restarts) the device: sends
    /// the start sequence; [`Event::Started`] ends it.
    ///
    /// Allowed in [`State::Ready`] and [`State::Stopped`] when no other flow
    /// runs. Refused (nothing changes) without queues or memory regions, or
    /// with more regions than the back-end accepts.
    pub fn start(&mut self) -> Result<(), FrontendError> {
        self.check_command(&[State::Ready, State::Stopped])?;
        if self.config.queues.is_empty() {
            return Err(FrontendError::NoQueues);
        }
        self.check_region_limit(self.config.regions.len())?;
        let inband = ProtocolFeatures::INBAND_NOTIFICATIONS;
        let wants_inband = self
            .config
            .queues
            .iter()
            .any(|q| q.kick == NotifyMode::InBand || q.call == NotifyMode::InBand);
        if wants_inband && !self.protocol.contains(inband) {
            return Err(FrontendError::Unsupported(inband.bits()));
        }
        debug!("start: {} rings", self.config.queues.len());
        self.state = State::Starting;
        self.begin(Flow::Start, Some(Step::SetFeatures));
        Ok(())
    }

    /// Stops every ring: SET_VRING_ENABLE(0) per ring, then GET_VRING_BASE
    /// per ring ([`Event::RingStopped`] each), then [`Event::Stopped`].
    ///
    /// Allowed in [`State::Started`] when no other flow runs.
    pub fn stop(&mut self) -> Result<(), FrontendError> {
        self.stop_with(false)
    }

    /// Stops every ring without waiting for the requests in flight: they
    /// stay recorded in the inflight area and the back-end resubmits them at
    /// the next start. Needs GET_VRING_BASE_INFLIGHT negotiated (then
    /// GET_VRING_BASE suspends; with GET_VRING_BASE_SKIP_DRAIN also
    /// negotiated, message 45 is sent instead) and an inflight area.
    pub fn stop_suspending(&mut self) -> Result<(), FrontendError> {
        let p = ProtocolFeatures::GET_VRING_BASE_INFLIGHT;
        if !self.protocol.contains(p) || self.inflight.is_none() {
            return Err(FrontendError::Unsupported(p.bits()));
        }
        self.stop_with(true)
    }

    fn stop_with(&mut self, suspend: bool) -> Result<(), FrontendError> {
        self.check_command(&[State::Started])?;
        self.state = State::Stopping;
        self.no_drain = suspend
            && self
                .protocol
                .contains(ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN);
        let first = if self.bit30() {
            Step::Disable(0)
        } else {
            self.get_base(0)
        };
        self.begin(Flow::Stop, Some(first));
        Ok(())
    }

    fn get_base(&self, q: u16) -> Step {
        if self.no_drain {
            Step::GetBaseNoDrain(q)
        } else {
            Step::GetBase(q)
        }
    }

    /// The first half of [`start`](Self::start), for a migration
    /// destination: SET_FEATURES, SET_STATUS(FEATURES_OK), the memory and
    /// the inflight area (GET_INFLIGHT_FD and SET_INFLIGHT_FD, or
    /// SET_INFLIGHT_FD), and no ring: the device stays suspended, so a
    /// state can be loaded into it ([`transfer_state`](Self::transfer_state))
    /// before [`start`](Self::start) (which sends them again, changing
    /// nothing) starts the rings. The state stays [`State::Ready`] or
    /// [`State::Stopped`].
    ///
    /// Allowed in [`State::Ready`] and [`State::Stopped`] when no other
    /// flow runs; refused as [`start`](Self::start) refuses.
    pub fn prepare(&mut self) -> Result<(), FrontendError> {
        self.check_command(&[State::Ready, State::Stopped])?;
        if self.config.queues.is_empty() {
            return Err(FrontendError::NoQueues);
        }
        self.check_region_limit(self.config.regions.len())?;
        self.begin(Flow::Prepare, Some(Step::SetFeatures));
        Ok(())
    }

    /// Sets the base ring `queue` starts from at the next start (a
    /// migration destination starts from the source's bases).
    ///
    /// Allowed in [`State::Ready`] and [`State::Stopped`] when no other
    /// flow runs.
    pub fn set_ring_base(&mut self, queue: u16, base: u32) -> Result<(), FrontendError> {
        self.check_command(&[State::Ready, State::Stopped])?;
        self.check_base(queue, base)?;
        let b = self
            .bases
            .get_mut(usize::from(queue))
            .ok_or(FrontendError::BadQueue(usize::from(queue)))?;
        *b = base;
        Ok(())
    }

    /// SET_DEVICE_STATE_FD: the back-end saves its state into
    /// ([`DeviceStateDirection::Save`]) or loads it from
    /// ([`DeviceStateDirection::Load`]) the channel [`FdRef::DeviceState`]
    /// (the adapter's pipe end). [`Event::StateTransfer`] says it was
    /// accepted: the adapter then reads the other end to its end, or
    /// writes the state and closes it, and calls
    /// [`check_state`](Self::check_state). A refusal (error bits) is
    /// [`FrontendError::StateRefused`] from `handle_reply`: the session
    /// goes on, nothing moved.
    ///
    /// Needs DEVICE_STATE negotiated and the device suspended: allowed in
    /// [`State::Ready`] and [`State::Stopped`] when no other flow runs.
    pub fn transfer_state(&mut self, direction: DeviceStateDirection) -> Result<(), FrontendError> {
        self.check_command(&[State::Ready, State::Stopped])?;
        if !self.protocol.contains(ProtocolFeatures::DEVICE_STATE) {
            return Err(FrontendError::NotNegotiated(FrontendReq::SetDeviceStateFd));
        }
        self.begin(Flow::Transfer, Some(Step::SetDeviceState(direction)));
        Ok(())
    }

    /// CHECK_DEVICE_STATE, after the transfer's channel was read to its
    /// end or written and closed: [`Event::StateChecked`] when the back-end
    /// saved or loaded the whole state, else [`FrontendError::StateRefused`]
    /// from `handle_reply` (the session goes on: a source keeps its
    /// device, a destination may load another state).
    ///
    /// Needs DEVICE_STATE negotiated; allowed in [`State::Ready`] and
    /// [`State::Stopped`] when no other flow runs.
    pub fn check_state(&mut self) -> Result<(), FrontendError> {
        self.check_command(&[State::Ready, State::Stopped])?;
        if !self.protocol.contains(ProtocolFeatures::DEVICE_STATE) {
            return Err(FrontendError::NotNegotiated(FrontendReq::CheckDeviceState));
        }
        self.begin(Flow::Check, Some(Step::CheckDeviceState));
        Ok(())
    }

    /// Switches dirty logging on with a log of `size` bytes (at least
    /// [`log_size`] of the regions; the adapter shares it as
    /// [`FdRef::Log`], mapped from offset 0): SET_LOG_BASE (its reply
    /// awaited), SET_FEATURES with VHOST_F_LOG_ALL, and in
    /// [`State::Started`] SET_VRING_ADDR with VHOST_VRING_F_LOG for every
    /// ring; [`Event::Logging`]`(true)` ends it. From then on every write
    /// the back-end does into guest memory (request data, status bytes,
    /// used rings) sets the bit of its page in the log, and a start keeps
    /// logging on.
    ///
    /// Allowed in [`State::Started`] and [`State::Stopped`] (features were
    /// set) when no other flow runs and logging is off
    /// ([`FrontendError::AlreadyLogging`]). Refused (nothing changes) when
    /// the back-end did not offer VHOST_F_LOG_ALL
    /// ([`FrontendError::LogAllNotOffered`]), without LOG_SHMFD negotiated
    /// ([`FrontendError::NotNegotiated`] of SET_LOG_BASE), without memory
    /// regions ([`FrontendError::NoRegions`]) and for a log that does not
    /// cover the memory ([`FrontendError::LogTooSmall`]).
    pub fn start_logging(&mut self, size: u64) -> Result<(), FrontendError> {
        self.check_command(&[State::Started, State::Stopped])?;
        if self.log.is_some() {
            return Err(FrontendError::AlreadyLogging);
        }
        if !self.info.features.contains(VirtioFeatures::LOG_ALL) {
            return Err(FrontendError::LogAllNotOffered);
        }
        if !self.protocol.contains(ProtocolFeatures::LOG_SHMFD) {
            return Err(FrontendError::NotNegotiated(FrontendReq::SetLogBase));
        }
        if self.config.regions.is_empty() {
            return Err(FrontendError::NoRegions);
        }
        let needed = log_size(&self.config.regions);
        if size < needed {
            return Err(FrontendError::LogTooSmall { size, needed });
        }
        debug!("dirty logging on: {} bytes of log", size);
        self.log = Some(size);
        self.begin(Flow::Log, Some(Step::SetLogBase));
        Ok(())
    }

    /// Switches dirty logging off: SET_FEATURES without VHOST_F_LOG_ALL,
    /// and in [`State::Started`] SET_VRING_ADDR without VHOST_VRING_F_LOG
    /// for every ring; [`Event::Logging`]`(false)` ends it, after which the
    /// adapter may unmap and close the log.
    ///
    /// Allowed in [`State::Started`] and [`State::Stopped`] when no other
    /// flow runs and logging is on ([`FrontendError::NotLogging`]).
    pub fn stop_logging(&mut self) -> Result<(), FrontendError> {
        self.check_command(&[State::Started, State::Stopped])?;
        if self.log.is_none() {
            return Err(FrontendError::NotLogging);
        }
        debug!("dirty logging off");
        self.log = None;
        self.begin(Flow::Log, Some(Step::LogFeatures));
        Ok(())
    }

    /// The log's size while dirty logging is on.
    pub fn logging(&self) -> Option<u64> {
        self.log
    }

    /// Kicks ring `queue` in-band: sends VRING_KICK (acked, as REPLY_ACK
    /// comes with INBAND_NOTIFICATIONS) to say buffers are available.
    ///
    /// Needs the ring configured with [`NotifyMode::InBand`] kicks (so
    /// INBAND_NOTIFICATIONS negotiated); allowed in [`State::Started`] when
    /// no other flow runs.
    pub fn kick(&mut self, queue: u16) -> Result<(), FrontendError> {
        self.check_command(&[State::Started])?;
        let q = self
            .config
            .queues
            .get(usize::from(queue))
            .ok_or(FrontendError::BadQueue(usize::from(queue)))?;
        if q.kick != NotifyMode::InBand {
            return Err(FrontendError::NotNegotiated(FrontendReq::VringKick));
        }
        self.begin(Flow::Kick, Some(Step::InBandKick(queue)));
        Ok(())
    }

    /// Reads `len` bytes of config space at `offset` (GET_CONFIG);
    /// [`Event::Config`] or [`Event::ConfigFailed`] answers.
    ///
    /// Needs CONFIG negotiated and `0 < len`, `offset + len <= 256`; allowed
    /// in [`State::Ready`], [`State::Started`] and [`State::Stopped`] when
    /// no other flow runs.
    pub fn read_config(&mut self, offset: u32, len: u32) -> Result<(), FrontendError> {
        self.check_command(&[State::Ready, State::Started, State::Stopped])?;
        if !self.protocol.contains(ProtocolFeatures::CONFIG) {
            return Err(FrontendError::NotNegotiated(FrontendReq::GetConfig));
        }
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= MAX_CONFIG_SIZE => {}
            _ => return Err(FrontendError::BadConfigRange { offset, len }),
        }
        self.begin(Flow::Config, Some(Step::GetConfig { offset, len }));
        Ok(())
    }

    /// Replaces the memory regions. While the device runs the change is
    /// sent at once (SET_MEM_TABLE, or REM_MEM_REG for each region that
    /// went away then ADD_MEM_REG for each new one) and
    /// [`Event::MemoryUpdated`] follows; otherwise the next start sends it.
    /// [`FdRef::Region`] indexes the new list from now on.
    ///
    /// Allowed when no flow runs. Refused (nothing changes) for invalid or
    /// overlapping regions, or more than the back-end accepts.
    pub fn set_memory(&mut self, regions: &[MemRegionMsg]) -> Result<(), FrontendError> {
        self.check_command(&[State::Ready, State::Started, State::Stopped])?;
        let list = Vec::<MemRegionMsg, R>::from_slice(regions).map_err(|_| {
            FrontendError::TooManyRegions {
                regions: regions.len(),
                limit: R as u64,
            }
        })?;
        check_regions::<R>(&list)?;
        if self.state == State::Started {
            self.check_region_limit(list.len())?;
        }
        if let Some(size) = self.log {
            // The back-end would log beyond the log (or refuse it).
            let needed = log_size(&list);
            if size < needed {
                return Err(FrontendError::LogTooSmall { size, needed });
            }
        }
        self.config.regions = list;
        if self.state == State::Started {
            let first = self.memory_step();
            if first.is_some() {
                self.begin(Flow::Memory, first);
            }
        }
        Ok(())
    }

    // --- internals ---

    fn check_command(&self, allowed: &[State]) -> Result<(), FrontendError> {
        if self.state == State::Failed {
            return Err(FrontendError::Failed);
        }
        if self.flow.is_some() {
            return Err(FrontendError::Busy);
        }
        if !allowed.contains(&self.state) {
            return Err(FrontendError::WrongState(self.state));
        }
        Ok(())
    }

    fn check_region_limit(&self, n: usize) -> Result<(), FrontendError> {
        if n == 0 {
            return Err(FrontendError::NoRegions);
        }
        let limit = if self.slots_mode() {
            self.info.max_mem_slots.unwrap_or(0)
        } else {
            MAX_MEM_REGIONS as u64
        };
        if n as u64 > limit {
            return Err(FrontendError::TooManyRegions { regions: n, limit });
        }
        Ok(())
    }

    fn begin(&mut self, flow: Flow, first: Option<Step>) {
        self.flow = Some(flow);
        self.next = first;
        if first.is_none() {
            self.finish_flow();
        }
    }

    fn fail(&mut self, e: FrontendError) -> Result<(), FrontendError> {
        warn!("front-end session failed: {}", e);
        self.state = State::Failed;
        self.flow = None;
        self.next = None;
        self.awaiting = None;
        Err(e)
    }

    fn push_event(&mut self, e: Event) {
        // poll_transmit keeps EVENT_HEADROOM slots free before each message
        // and one message produces at most that many events.
        if self.events.push_back(e).is_err() {
            error!("front-end event queue full; event dropped");
        }
    }

    /// What SET_FEATURES sends: the acked features, with VHOST_F_LOG_ALL
    /// while logging.
    fn wire_features(&self) -> VirtioFeatures {
        if self.log.is_some() {
            self.features | VirtioFeatures::LOG_ALL
        } else {
            self.features
        }
    }

    fn bit30(&self) -> bool {
        self.features.contains(VirtioFeatures::PROTOCOL_FEATURES)
    }

    fn slots_mode(&self) -> bool {
        self.protocol
            .contains(ProtocolFeatures::CONFIGURE_MEM_SLOTS)
    }

    fn num_queues(&self) -> u16 {
        // At most MAX_QUEUES (checked in new).
        self.config.queues.len() as u16
    }

    fn queue(&self, q: u16) -> QueueConfig {
        // Steps only name configured queues.
        self.config
            .queues
            .get(usize::from(q))
            .copied()
            .unwrap_or(QueueConfig {
                size: 0,
                addrs: RingAddrs::default(),
                base: 0,
                kick: NotifyMode::Polling,
                call: NotifyMode::Polling,
            })
    }

    /// Builds the request of `step` (it may borrow the configuration).
    fn request(&self, step: Step) -> Result<Request<'_>, WireError> {
        let state = |q: u16, num: u32| VringStateMsg {
            index: u32::from(q),
            num,
        };
        let notify = |q: u16, mode: NotifyMode| VringFdMsg {
            index: u32::from(q),
            no_fd: mode != NotifyMode::Eventfd,
        };
        let req = match step {
            Step::GetFeatures | Step::CheckFeatures | Step::LogSync => Request::GetFeatures,
            Step::GetProtocolFeatures => Request::GetProtocolFeatures,
            Step::SetProtocolFeatures => Request::SetProtocolFeatures(self.protocol.bits()),
            Step::GetQueueNum => Request::GetQueueNum,
            Step::GetMaxMemSlots => Request::GetMaxMemSlots,
            Step::SetBackendReqFd => Request::SetBackendReqFd,
            Step::SetOwner => Request::SetOwner,
            Step::SetFeatures | Step::LogFeatures => {
                Request::SetFeatures(self.wire_features().bits())
            }
            Step::FeaturesOk => {
                Request::SetStatus(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK)
            }
            Step::DriverOk => Request::SetStatus(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
            Step::ResetStatus => Request::SetStatus(0),
            // start and set_memory checked 1 to 8 regions in this mode.
            Step::MemTable => Request::SetMemTable(MemTable::new(&self.config.regions)?),
            Step::RemRegion(r) => Request::RemMemReg(r),
            Step::AddRegion(i) => Request::AddMemReg(
                *self
                    .config
                    .regions
                    .get(usize::from(i))
                    .ok_or(WireError::BadRegionCount(i.into()))?,
            ),
            Step::VringNum(q) => Request::SetVringNum(state(q, self.queue(q).size.into())),
            Step::VringBase(q) => {
                Request::SetVringBase(state(q, self.ring_base(q).unwrap_or_default()))
            }
            Step::VringAddr(q) | Step::LogAddr(q) => {
                let a = self.queue(q).addrs;
                // Like QEMU, name the used ring's guest physical address as
                // the log address (only used if VHOST_VRING_F_LOG is set).
                let log_addr = self
                    .config
                    .regions
                    .iter()
                    .find(|r| a.device.wrapping_sub(r.user_addr) < r.size)
                    .map_or(0, |r| r.guest_addr + (a.device - r.user_addr));
                Request::SetVringAddr(VringAddrMsg {
                    index: q.into(),
                    log: self.log.is_some(),
                    desc: a.desc,
                    used: a.device,
                    avail: a.driver,
                    log_addr,
                })
            }
            Step::VringKick(q) => Request::SetVringKick(notify(q, self.queue(q).kick)),
            Step::InBandKick(q) => Request::VringKick(q.into()),
            Step::VringCall(q) => Request::SetVringCall(notify(q, self.queue(q).call)),
            Step::Enable(q) => Request::SetVringEnable {
                index: q.into(),
                enable: true,
            },
            Step::Disable(q) => Request::SetVringEnable {
                index: q.into(),
                enable: false,
            },
            Step::GetBase(q) => Request::GetVringBase(q.into()),
            Step::GetBaseNoDrain(q) => Request::GetVringBaseSkipDrain(q.into()),
            Step::GetInflight => Request::GetInflightFd(InflightMsg {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: self.num_queues(),
                queue_size: self.queue(0).size,
            }),
            Step::SetInflight => match self.inflight {
                Some(m) => Request::SetInflightFd(m),
                // inflight_step only picks SetInflight with an area.
                None => return Err(WireError::BadValue(0)),
            },
            Step::SetDeviceState(d) => Request::SetDeviceStateFd(d),
            Step::SetLogBase => Request::SetLogBase(LogMsg {
                size: self.log.unwrap_or_default(),
                offset: 0,
            }),
            Step::CheckDeviceState => Request::CheckDeviceState,
            Step::GetConfig { offset, len } => Request::GetConfig(ConfigMsg {
                offset,
                kind: ConfigWriteKind::Frontend,
                data: ZEROS.get(..len as usize).unwrap_or(&[]),
            }),
        };
        Ok(req)
    }

    fn fds(&self, step: Step) -> Vec<FdRef, MAX_FDS> {
        let mut v = Vec::new();
        let mut add = |f: FdRef| {
            // At most MAX_MEM_REGIONS (= MAX_FDS) fds per message.
            let _ = v.push(f);
        };
        match step {
            Step::MemTable => {
                for i in 0..self.config.regions.len().min(MAX_MEM_REGIONS) {
                    add(FdRef::Region(i as u16));
                }
            }
            Step::AddRegion(i) => add(FdRef::Region(i)),
            Step::SetBackendReqFd => add(FdRef::BackendChannel),
            Step::SetInflight => add(FdRef::Inflight),
            Step::SetDeviceState(_) => add(FdRef::DeviceState),
            Step::SetLogBase => add(FdRef::Log),
            Step::VringKick(q) if self.queue(q).kick == NotifyMode::Eventfd => add(FdRef::Kick(q)),
            Step::VringCall(q) if self.queue(q).call == NotifyMode::Eventfd => add(FdRef::Call(q)),
            _ => {}
        }
        v
    }

    /// Validates and applies the reply to `step`.
    fn take_reply(&mut self, step: Step, reply: Reply<'_>) -> Result<(), FrontendError> {
        let code = step.code();
        let value = match reply {
            Reply::U64(v) => Some(v),
            Reply::VringState { index, num } => {
                let (Step::GetBase(q) | Step::GetBaseNoDrain(q)) = step else {
                    return Err(FrontendError::UnexpectedPayload(code));
                };
                if index != u32::from(q) {
                    return Err(FrontendError::WrongRing {
                        expected: q,
                        got: index,
                    });
                }
                self.check_base(q, num)?;
                if let Some(b) = self.bases.get_mut(usize::from(q)) {
                    *b = num;
                }
                debug!("ring {} stopped at {:#x}", q, num);
                self.push_event(Event::RingStopped {
                    queue: q,
                    base: num,
                });
                None
            }
            Reply::Config(c) => {
                let Step::GetConfig { offset, len } = step else {
                    return Err(FrontendError::UnexpectedPayload(code));
                };
                if c.offset != offset || c.data.len() != len as usize {
                    return Err(FrontendError::ConfigMismatch {
                        offset: c.offset,
                        len: c.data.len() as u32,
                    });
                }
                let data = Vec::from_slice(c.data).map_err(|_| FrontendError::ConfigMismatch {
                    offset: c.offset,
                    len: c.data.len() as u32,
                })?;
                self.push_event(Event::Config { offset, data });
                None
            }
            Reply::Inflight(m) => {
                if step != Step::GetInflight {
                    return Err(FrontendError::UnexpectedPayload(code));
                }
                // mmap_size 0: the back-end has no area for us.
                self.inflight = (m.mmap_size != 0).then_some(InflightMsg {
                    num_queues: self.num_queues(),
                    queue_size: self.queue(0).size,
                    ..m
                });
                None
            }
            Reply::LogBaseDone => {
                if step != Step::SetLogBase {
                    return Err(FrontendError::UnexpectedPayload(code));
                }
                // Its content is unspecified (notes §2): nothing to check.
                None
            }
            Reply::DeviceStateFd { error, no_fd } => {
                let Step::SetDeviceState(direction) = step else {
                    return Err(FrontendError::UnexpectedPayload(code));
                };
                if error != 0 {
                    return Err(FrontendError::StateRefused {
                        request: code,
                        value: u64::from(error),
                    });
                }
                self.push_event(Event::StateTransfer {
                    direction,
                    backend_fd: !no_fd,
                });
                None
            }
            Reply::ConfigFailed => {
                let Step::GetConfig { offset, len } = step else {
                    return Err(FrontendError::UnexpectedPayload(code));
                };
                warn!("GET_CONFIG {}+{} failed", offset, len);
                self.push_event(Event::ConfigFailed { offset, len });
                None
            }
            _ => return Err(FrontendError::UnexpectedPayload(code)),
        };
        let Some(v) = value else {
            return Ok(());
        };
        match step {
            Step::GetFeatures => {
                self.info.features = VirtioFeatures::from_bits_retain(v);
                // VHOST_F_LOG_ALL is never acked by a start of its own:
                // start_logging switches it on.
                self.features =
                    select_virtio(v, self.config.features).difference(VirtioFeatures::LOG_ALL);
                debug!(
                    "features offered {:#x}, acking {:#x}",
                    v,
                    self.features.bits()
                );
            }
            Step::CheckFeatures | Step::LogSync => {
                if v != self.info.features.bits() {
                    return Err(FrontendError::FeaturesChanged {
                        before: self.info.features.bits(),
                        after: v,
                    });
                }
            }
            Step::GetProtocolFeatures => {
                self.info.protocol_features = Some(ProtocolFeatures::from_bits_retain(v));
                self.protocol = select_protocol(v, self.config.protocol_features);
                debug!(
                    "protocol features offered {:#x}, acking {:#x}",
                    v,
                    self.protocol.bits()
                );
            }
            Step::GetQueueNum => {
                self.info.queue_num = Some(v);
                let needed = self.num_queues();
                if v < u64::from(needed) || v == 0 {
                    return Err(FrontendError::TooFewQueues { needed, offered: v });
                }
            }
            Step::GetMaxMemSlots => self.info.max_mem_slots = Some(v),
            Step::CheckDeviceState => {
                if v != 0 {
                    return Err(FrontendError::StateRefused {
                        request: code,
                        value: v,
                    });
                }
                self.push_event(Event::StateChecked);
            }
            Step::GetBase(_) | Step::GetBaseNoDrain(_) | Step::GetConfig { .. } => {
                return Err(FrontendError::UnexpectedPayload(code))
            }
            // Everything else we only send without a reply of its own: this
            // is the REPLY_ACK.
            _ => {
                if v != 0 {
                    return Err(FrontendError::Nack {
                        request: code,
                        value: v,
                    });
                }
            }
        }
        Ok(())
    }

    fn check_base(&self, q: u16, num: u32) -> Result<(), FrontendError> {
        let size = u32::from(self.queue(q).size);
        let ok = if self.features.contains(VirtioFeatures::RING_PACKED) {
            num & 0x7fff < size && (num >> 16) & 0x7fff < size
        } else {
            num <= 0xffff
        };
        if ok {
            Ok(())
        } else {
            Err(FrontendError::BadBase {
                queue: q,
                base: num,
            })
        }
    }

    /// `step` went out (and was answered, if a reply was awaited): record
    /// its effect, report it, and pick the next message.
    fn complete(&mut self, step: Step) {
        match step {
            Step::MemTable => self.installed = self.config.regions.clone(),
            Step::RemRegion(r) => self.installed.retain(|x| *x != r),
            Step::AddRegion(i) => {
                if let Some(r) = self.config.regions.get(usize::from(i)) {
                    // installed ⊆ regions (after the REMs), same capacity.
                    let _ = self.installed.push(*r);
                }
            }
            Step::VringKick(q) if self.queue(q).kick == NotifyMode::Eventfd => {
                self.push_event(Event::InjectKick(q))
            }
            Step::VringCall(q) => {
                debug!("ring {} started", q);
                self.push_event(Event::RingStarted(q))
            }
            _ => {}
        }
        self.next = self.next_step(step);
        if self.next.is_none() {
            self.finish_flow();
        }
    }

    fn finish_flow(&mut self) {
        let Some(flow) = self.flow.take() else {
            return;
        };
        match flow {
            Flow::Init => {
                self.state = State::Ready;
                info!(
                    "negotiated features {:#x}, protocol features {:#x}",
                    self.features.bits(),
                    self.protocol.bits()
                );
                self.push_event(Event::Negotiated {
                    features: self.features,
                    protocol_features: self.protocol,
                });
            }
            Flow::Start => {
                self.state = State::Started;
                self.push_event(Event::Started);
            }
            Flow::Stop => {
                self.state = State::Stopped;
                self.push_event(Event::Stopped);
            }
            Flow::Memory => self.push_event(Event::MemoryUpdated),
            Flow::Log => {
                let on = self.log.is_some();
                info!("dirty logging {}", if on { "on" } else { "off" });
                self.push_event(Event::Logging(on));
            }
            Flow::Config | Flow::Kick | Flow::Prepare | Flow::Transfer | Flow::Check => {}
        }
    }

    fn applies(&self, step: Step) -> bool {
        use ProtocolFeatures as P;
        match step {
            Step::GetProtocolFeatures | Step::SetProtocolFeatures => self.bit30(),
            Step::GetQueueNum => self.protocol.contains(P::MQ),
            Step::GetMaxMemSlots => self.protocol.contains(P::CONFIGURE_MEM_SLOTS),
            Step::SetBackendReqFd => self.protocol.contains(P::BACKEND_REQ),
            Step::FeaturesOk | Step::DriverOk | Step::ResetStatus => {
                self.protocol.contains(P::STATUS)
            }
            Step::LogSync => !self.protocol.contains(P::REPLY_ACK),
            _ => true,
        }
    }

    /// The inflight message a start sends after the memory, if any.
    fn inflight_step(&self) -> Option<Step> {
        if !self.protocol.contains(ProtocolFeatures::INFLIGHT_SHMFD) {
            return None;
        }
        Some(if self.inflight.is_some() {
            Step::SetInflight
        } else {
            Step::GetInflight
        })
    }

    /// The inflight area in use (to hand to the next connection after a
    /// reconnect, with its fd).
    pub fn inflight(&self) -> Option<InflightMsg> {
        self.inflight
    }

    /// The memory message the back-end still needs, if any.
    fn memory_step(&self) -> Option<Step> {
        let wanted = &self.config.regions;
        if self.slots_mode() {
            if let Some(r) = self.installed.iter().find(|r| !wanted.contains(r)) {
                return Some(Step::RemRegion(*r));
            }
            wanted
                .iter()
                .position(|r| !self.installed.contains(r))
                .map(|i| Step::AddRegion(i as u16))
        } else if self.installed != *wanted {
            Some(Step::MemTable)
        } else {
            None
        }
    }

    fn next_step(&self, done: Step) -> Option<Step> {
        let n = self.num_queues();
        let first_enable = || {
            if self.bit30() {
                Some(Step::Enable(0))
            } else {
                Some(Step::DriverOk).filter(|s| self.applies(*s))
            }
        };
        match self.flow? {
            Flow::Init => {
                let at = INIT_ORDER.iter().position(|s| *s == done)?;
                INIT_ORDER
                    .get(at + 1..)?
                    .iter()
                    .copied()
                    .find(|s| self.applies(*s))
            }
            Flow::Start => match done {
                Step::SetFeatures if self.applies(Step::FeaturesOk) => Some(Step::FeaturesOk),
                Step::SetFeatures
                | Step::FeaturesOk
                | Step::MemTable
                | Step::RemRegion(_)
                | Step::AddRegion(_) => self
                    .memory_step()
                    .or_else(|| self.inflight_step())
                    .or(Some(Step::VringNum(0))),
                Step::GetInflight if self.inflight.is_some() => Some(Step::SetInflight),
                Step::GetInflight | Step::SetInflight => Some(Step::VringNum(0)),
                Step::VringNum(q) => Some(Step::VringBase(q)),
                Step::VringBase(q) => Some(Step::VringAddr(q)),
                Step::VringAddr(q) if self.queue(q).kick == NotifyMode::InBand => {
                    Some(Step::InBandKick(q))
                }
                Step::VringAddr(q) => Some(Step::VringKick(q)),
                Step::VringKick(q) | Step::InBandKick(q) => Some(Step::VringCall(q)),
                Step::VringCall(q) if q + 1 < n => Some(Step::VringNum(q + 1)),
                Step::VringCall(_) => first_enable(),
                Step::Enable(q) if q + 1 < n => Some(Step::Enable(q + 1)),
                Step::Enable(_) => Some(Step::DriverOk).filter(|s| self.applies(*s)),
                _ => None,
            },
            Flow::Stop => match done {
                Step::Disable(q) if q + 1 < n => Some(Step::Disable(q + 1)),
                Step::Disable(_) => Some(self.get_base(0)),
                Step::GetBase(q) | Step::GetBaseNoDrain(q) if q + 1 < n => {
                    Some(self.get_base(q + 1))
                }
                Step::GetBase(_) | Step::GetBaseNoDrain(_) => {
                    Some(Step::ResetStatus).filter(|s| self.applies(*s))
                }
                _ => None,
            },
            Flow::Prepare => match done {
                Step::SetFeatures if self.applies(Step::FeaturesOk) => Some(Step::FeaturesOk),
                Step::SetFeatures
                | Step::FeaturesOk
                | Step::MemTable
                | Step::RemRegion(_)
                | Step::AddRegion(_) => self.memory_step().or_else(|| self.inflight_step()),
                Step::GetInflight if self.inflight.is_some() => Some(Step::SetInflight),
                _ => None,
            },
            Flow::Memory => self.memory_step(),
            Flow::Log => {
                let sync = Some(Step::LogSync).filter(|s| self.applies(*s));
                let running = self.state == State::Started;
                match done {
                    Step::SetLogBase => Some(Step::LogFeatures),
                    Step::LogFeatures if running => Some(Step::LogAddr(0)),
                    Step::LogAddr(q) if q + 1 < n => Some(Step::LogAddr(q + 1)),
                    Step::LogFeatures | Step::LogAddr(_) => sync,
                    _ => None,
                }
            }
            Flow::Config | Flow::Kick | Flow::Transfer | Flow::Check => None,
        }
    }
}

/// The dirty log's size for guest memory `regions`: one bit per 4 KiB page
/// of guest physical address from 0 to the end of the highest region,
/// rounded up to whole u64 words (the front-end reads and clears it a word
/// at a time). 0 without regions.
pub fn log_size(regions: &[MemRegionMsg]) -> u64 {
    let end = regions
        .iter()
        .map(|r| r.guest_addr.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    crate::log::bitmap_bytes(end).next_multiple_of(8)
}

/// Checks a region list: each region non-empty, no range overflowing, no
/// overlap (in guest or front-end addresses), no Xen fields, at most `R`.
fn check_regions<const R: usize>(regions: &[MemRegionMsg]) -> Result<(), FrontendError> {
    for (i, r) in regions.iter().enumerate() {
        let ok = r.size != 0
            && r.xen.is_none()
            && [r.guest_addr, r.user_addr, r.mmap_offset]
                .iter()
                .all(|b| b.checked_add(r.size - 1).is_some());
        if !ok {
            return Err(FrontendError::BadRegion(i));
        }
    }
    if let Err(e) = MemoryTable::<R>::from_regions(regions) {
        warn!("memory regions refused: {:?}", e);
        // Find the first region that does not fit with those before it.
        let mut t = MemoryTable::<R>::new();
        for (i, r) in regions.iter().enumerate() {
            if t.add(*r).is_err() {
                return Err(FrontendError::BadRegion(i));
            }
        }
        return Err(FrontendError::BadRegion(0));
    }
    Ok(())
}

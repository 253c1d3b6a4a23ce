//! Front-end → back-end requests on the main socket.

use zerocopy::{FromBytes, IntoBytes};

use super::raw;
use super::{
    empty, exact, sat16, FdRule, Header, HeaderFlags, ParseOptions, WireError, MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS, MAX_PAYLOAD,
};

request_codes! {
    /// Request codes of the main socket (front-end → back-end).
    FrontendReq {
        /// Ask for the virtio features the back-end offers.
        GetFeatures = 1 => "GET_FEATURES",
        /// Ack the virtio features.
        SetFeatures = 2 => "SET_FEATURES",
        /// Start a session.
        SetOwner = 3 => "SET_OWNER",
        /// Deprecated: disable all rings.
        ResetOwner = 4 => "RESET_OWNER",
        /// Replace the memory table.
        SetMemTable = 5 => "SET_MEM_TABLE",
        /// Set the dirty-log area.
        SetLogBase = 6 => "SET_LOG_BASE",
        /// Set the dirty-log eventfd.
        SetLogFd = 7 => "SET_LOG_FD",
        /// Set a ring's size.
        SetVringNum = 8 => "SET_VRING_NUM",
        /// Set a ring's addresses.
        SetVringAddr = 9 => "SET_VRING_ADDR",
        /// Set a ring's next avail index.
        SetVringBase = 10 => "SET_VRING_BASE",
        /// Stop a ring and get its indices.
        GetVringBase = 11 => "GET_VRING_BASE",
        /// Set a ring's kick eventfd and start it.
        SetVringKick = 12 => "SET_VRING_KICK",
        /// Set a ring's call eventfd.
        SetVringCall = 13 => "SET_VRING_CALL",
        /// Set a ring's error eventfd.
        SetVringErr = 14 => "SET_VRING_ERR",
        /// Ask for the protocol features the back-end offers.
        GetProtocolFeatures = 15 => "GET_PROTOCOL_FEATURES",
        /// Ack the protocol features.
        SetProtocolFeatures = 16 => "SET_PROTOCOL_FEATURES",
        /// Ask for the number of queues.
        GetQueueNum = 17 => "GET_QUEUE_NUM",
        /// Enable or disable a ring.
        SetVringEnable = 18 => "SET_VRING_ENABLE",
        /// Broadcast a RARP for the guest's MAC.
        SendRarp = 19 => "SEND_RARP",
        /// Set the network MTU.
        NetSetMtu = 20 => "NET_SET_MTU",
        /// Hand over the back-end channel socket.
        SetBackendReqFd = 21 => "SET_BACKEND_REQ_FD",
        /// IOTLB update or invalidation.
        IotlbMsg = 22 => "IOTLB_MSG",
        /// Set a legacy ring's endianness.
        SetVringEndian = 23 => "SET_VRING_ENDIAN",
        /// Read device config space.
        GetConfig = 24 => "GET_CONFIG",
        /// Write device config space.
        SetConfig = 25 => "SET_CONFIG",
        /// Create a crypto session.
        CreateCryptoSession = 26 => "CREATE_CRYPTO_SESSION",
        /// Close a crypto session.
        CloseCryptoSession = 27 => "CLOSE_CRYPTO_SESSION",
        /// Open a userfaultfd for postcopy.
        PostcopyAdvise = 28 => "POSTCOPY_ADVISE",
        /// Enter postcopy listening mode.
        PostcopyListen = 29 => "POSTCOPY_LISTEN",
        /// Leave postcopy.
        PostcopyEnd = 30 => "POSTCOPY_END",
        /// Ask for the inflight tracking area.
        GetInflightFd = 31 => "GET_INFLIGHT_FD",
        /// Hand over the inflight tracking area.
        SetInflightFd = 32 => "SET_INFLIGHT_FD",
        /// Hand over the vhost-user-gpu socket.
        GpuSetSocket = 33 => "GPU_SET_SOCKET",
        /// Reset the device.
        ResetDevice = 34 => "RESET_DEVICE",
        /// In-band kick.
        VringKick = 35 => "VRING_KICK",
        /// Ask for the memory slot limit.
        GetMaxMemSlots = 36 => "GET_MAX_MEM_SLOTS",
        /// Add a memory region.
        AddMemReg = 37 => "ADD_MEM_REG",
        /// Remove a memory region.
        RemMemReg = 38 => "REM_MEM_REG",
        /// Set the virtio device status.
        SetStatus = 39 => "SET_STATUS",
        /// Get the virtio device status.
        GetStatus = 40 => "GET_STATUS",
        /// Look up a shared object.
        GetSharedObject = 41 => "GET_SHARED_OBJECT",
        /// Start a device state transfer.
        SetDeviceStateFd = 42 => "SET_DEVICE_STATE_FD",
        /// Check a finished device state transfer.
        CheckDeviceState = 43 => "CHECK_DEVICE_STATE",
        /// Ask for the shared memory regions.
        GetShmemConfig = 44 => "GET_SHMEM_CONFIG",
        /// Stop a ring without draining in-flight requests.
        GetVringBaseSkipDrain = 45 => "GET_VRING_BASE_SKIP_DRAIN",
    }
}

impl FrontendReq {
    /// Whether the back-end always answers this request with a reply of its
    /// own (otherwise it answers only with a REPLY_ACK, when asked).
    pub const fn has_reply(self) -> bool {
        use FrontendReq::*;
        matches!(
            self,
            GetFeatures
                | SetLogBase
                | GetVringBase
                | GetProtocolFeatures
                | GetQueueNum
                | IotlbMsg
                | GetConfig
                | CreateCryptoSession
                | PostcopyAdvise
                | PostcopyEnd
                | GetInflightFd
                | GetMaxMemSlots
                | GetStatus
                | GetSharedObject
                | SetDeviceStateFd
                | CheckDeviceState
                | GetShmemConfig
                | GetVringBaseSkipDrain
        )
    }
}

/// `struct vhost_vring_state` with a validated index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VringStateMsg {
    /// Ring index, below the session's queue limit.
    pub index: u32,
    /// The value.
    pub num: u32,
}

impl VringStateMsg {
    fn parse(request: u32, payload: &[u8], opts: &ParseOptions) -> Result<Self, WireError> {
        let raw: &raw::VringState = exact(request, payload)?;
        Ok(VringStateMsg {
            index: opts.check_queue(raw.index.get().into())?,
            num: raw.num.get(),
        })
    }

    pub(crate) fn raw(&self) -> raw::VringState {
        raw::VringState {
            index: self.index.into(),
            num: self.num.into(),
        }
    }
}

/// The u64 of SET_VRING_KICK/CALL/ERR: a ring index (bits 0-7) and the
/// no-fd flag (bit 8: polling, or in-band notifications).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VringFdMsg {
    /// Ring index.
    pub index: u32,
    /// No fd accompanies the message.
    pub no_fd: bool,
}

const VRING_INDEX_MASK: u64 = 0xff;
const VRING_NOFD: u64 = 0x100;

impl VringFdMsg {
    fn parse(request: u32, payload: &[u8], opts: &ParseOptions) -> Result<Self, WireError> {
        let v = exact::<raw::Word>(request, payload)?.value.get();
        if v & !(VRING_INDEX_MASK | VRING_NOFD) != 0 {
            return Err(WireError::reserved_bits(v));
        }
        Ok(VringFdMsg {
            index: opts.check_queue(v & VRING_INDEX_MASK)?,
            no_fd: v & VRING_NOFD != 0,
        })
    }

    fn value(&self) -> u64 {
        u64::from(self.index) & VRING_INDEX_MASK | if self.no_fd { VRING_NOFD } else { 0 }
    }

    fn fd_rule(&self) -> FdRule {
        vring_fd_rule(self.value())
    }
}

/// The fds a SET_VRING_KICK/CALL/ERR with this u64 carries.
fn vring_fd_rule(value: u64) -> FdRule {
    if value & VRING_NOFD != 0 {
        FdRule::NONE
    } else {
        FdRule::ONE
    }
}

/// SET_VRING_ADDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VringAddrMsg {
    /// Ring index.
    pub index: u32,
    /// Log used-ring writes at `log`.
    pub log: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Used ring address.
    pub used: u64,
    /// Available ring (driver area) address.
    pub avail: u64,
    /// Guest address for used-ring logging.
    pub log_addr: u64,
}

const VRING_F_LOG: u32 = 1;

/// A memory region (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG), with its
/// ranges checked for overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MemRegionMsg {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Size in bytes, never 0.
    pub size: u64,
    /// Front-end virtual address (GPA with GPA_ADDRESSES).
    pub user_addr: u64,
    /// Offset of the region in its fd.
    pub mmap_offset: u64,
    /// XEN_MMAP flags and domain id.
    pub xen: Option<(u32, u32)>,
}

impl MemRegionMsg {
    fn from_raw(r: &raw::MemRegion, xen: Option<(u32, u32)>) -> Result<Self, WireError> {
        let m = MemRegionMsg {
            guest_addr: r.guest_addr.get(),
            size: r.size.get(),
            user_addr: r.user_addr.get(),
            mmap_offset: r.mmap_offset.get(),
            xen,
        };
        if m.size == 0 {
            return Err(WireError::EmptyRegion);
        }
        for base in [m.guest_addr, m.user_addr, m.mmap_offset] {
            base.checked_add(m.size - 1)
                .ok_or(WireError::RangeOverflow)?;
        }
        Ok(m)
    }

    pub(crate) fn parse_one(bytes: &[u8], xen: bool) -> Result<Self, WireError> {
        if xen {
            let r = zerocopy::FromBytes::ref_from_bytes(bytes)
                .map(|r: &raw::XenMemRegion| r)
                .map_err(|_| WireError::BadSize {
                    request: 0,
                    size: sat16(bytes.len()),
                })?;
            Self::from_raw(&r.region, Some((r.xen_flags.get(), r.domid.get())))
        } else {
            let r = zerocopy::FromBytes::ref_from_bytes(bytes)
                .map(|r: &raw::MemRegion| r)
                .map_err(|_| WireError::BadSize {
                    request: 0,
                    size: sat16(bytes.len()),
                })?;
            Self::from_raw(r, None)
        }
    }

    /// The raw region (without the Xen fields).
    pub fn raw(&self) -> raw::MemRegion {
        raw::MemRegion {
            guest_addr: self.guest_addr.into(),
            size: self.size.into(),
            user_addr: self.user_addr.into(),
            mmap_offset: self.mmap_offset.into(),
        }
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        w.raw(&self.raw())?;
        if let Some((flags, domid)) = self.xen {
            w.bytes(&flags.to_ne_bytes())?;
            w.bytes(&domid.to_ne_bytes())?;
        }
        Ok(())
    }

    /// Bytes this region takes on the wire.
    fn wire_size(xen: bool) -> usize {
        if xen {
            raw::XenMemRegion::SIZE
        } else {
            raw::MemRegion::SIZE
        }
    }
}

/// SET_MEM_TABLE: 1 to 8 regions, one fd each, in order. A view over the
/// validated payload bytes (or over regions the caller built), copied out one
/// region at a time.
#[derive(Clone, Copy, Debug)]
pub struct MemTable<'a> {
    repr: TableRepr<'a>,
}

#[derive(Clone, Copy, Debug)]
enum TableRepr<'a> {
    Wire { regions: &'a [u8], xen: bool },
    Built(&'a [MemRegionMsg]),
}

impl<'a> MemTable<'a> {
    /// A table of caller-built regions (1 to 8), for encoding.
    pub fn new(regions: &'a [MemRegionMsg]) -> Result<Self, WireError> {
        if regions.is_empty() || regions.len() > MAX_MEM_REGIONS {
            return Err(WireError::BadRegionCount(regions.len() as u32));
        }
        Ok(MemTable {
            repr: TableRepr::Built(regions),
        })
    }

    pub(crate) fn parse(request: u32, payload: &'a [u8], xen: bool) -> Result<Self, WireError> {
        let bad = || WireError::BadSize {
            request: sat16(request),
            size: sat16(payload.len()),
        };
        let (head, rest) = payload
            .split_at_checked(raw::MemTableHead::SIZE)
            .ok_or_else(bad)?;
        let n = u32::from_ne_bytes([head[0], head[1], head[2], head[3]]);
        if n == 0 || n as usize > MAX_MEM_REGIONS {
            return Err(WireError::BadRegionCount(n));
        }
        let each = MemRegionMsg::wire_size(xen);
        if rest.len() != each * n as usize {
            return Err(bad());
        }
        for chunk in rest.chunks_exact(each) {
            MemRegionMsg::parse_one(chunk, xen)?;
        }
        Ok(MemTable {
            repr: TableRepr::Wire { regions: rest, xen },
        })
    }

    /// Number of regions (1 to 8).
    pub fn len(&self) -> usize {
        match self.repr {
            TableRepr::Wire { regions, xen } => regions.len() / MemRegionMsg::wire_size(xen),
            TableRepr::Built(r) => r.len(),
        }
    }

    /// Always false: a table has at least one region.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Region `i`, in the order of the message's fds.
    pub fn get(&self, i: usize) -> Option<MemRegionMsg> {
        match self.repr {
            TableRepr::Wire { regions, xen } => {
                let each = MemRegionMsg::wire_size(xen);
                let chunk = regions.get(i * each..(i + 1) * each)?;
                MemRegionMsg::parse_one(chunk, xen).ok()
            }
            TableRepr::Built(r) => r.get(i).copied(),
        }
    }

    /// The regions, in the order of the message's fds.
    pub fn iter(&self) -> impl Iterator<Item = MemRegionMsg> + 'a {
        let t = *self;
        (0..t.len()).filter_map(move |i| t.get(i))
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        w.raw(&raw::MemTableHead {
            nregions: (self.len() as u32).into(),
            padding: 0.into(),
        })?;
        for r in self.iter() {
            r.write(w)?;
        }
        Ok(())
    }
}

impl PartialEq for MemTable<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for MemTable<'_> {}

/// SET_LOG_BASE: the size and offset of the dirty log in its fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LogMsg {
    /// Size of the log.
    pub size: u64,
    /// Offset of the log in the fd.
    pub offset: u64,
}

/// IOTLB access permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum IotlbPerm {
    /// No access.
    None = 0,
    /// Read only.
    Read = 1,
    /// Write only.
    Write = 2,
    /// Read and write.
    ReadWrite = 3,
}

/// IOTLB message type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum IotlbKind {
    /// Back-end → front-end: translation miss.
    Miss = 1,
    /// Front-end → back-end: new translation.
    Update = 2,
    /// Front-end → back-end: drop translations.
    Invalidate = 3,
    /// Back-end → front-end: access failed.
    AccessFail = 4,
}

/// `struct vhost_iotlb_msg`, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IotlbMsg {
    /// I/O virtual address.
    pub iova: u64,
    /// Size of the range.
    pub size: u64,
    /// Front-end virtual address.
    pub uaddr: u64,
    /// Permission.
    pub perm: IotlbPerm,
    /// Type.
    pub kind: IotlbKind,
}

impl IotlbMsg {
    pub(crate) fn parse(request: u32, payload: &[u8]) -> Result<Self, WireError> {
        let r: &raw::Iotlb = exact(request, payload)?;
        let perm = match r.perm {
            0 => IotlbPerm::None,
            1 => IotlbPerm::Read,
            2 => IotlbPerm::Write,
            3 => IotlbPerm::ReadWrite,
            v => return Err(WireError::BadValue(v.into())),
        };
        let kind = match r.kind {
            1 => IotlbKind::Miss,
            2 => IotlbKind::Update,
            3 => IotlbKind::Invalidate,
            4 => IotlbKind::AccessFail,
            v => return Err(WireError::BadValue(v.into())),
        };
        let m = IotlbMsg {
            iova: r.iova.get(),
            size: r.size.get(),
            uaddr: r.uaddr.get(),
            perm,
            kind,
        };
        if m.kind == IotlbKind::Update {
            if m.size == 0 {
                return Err(WireError::EmptyRegion);
            }
            m.iova
                .checked_add(m.size - 1)
                .ok_or(WireError::RangeOverflow)?;
            m.uaddr
                .checked_add(m.size - 1)
                .ok_or(WireError::RangeOverflow)?;
        }
        Ok(m)
    }

    pub(crate) fn raw(&self) -> raw::Iotlb {
        raw::Iotlb {
            iova: self.iova.into(),
            size: self.size.into(),
            uaddr: self.uaddr.into(),
            perm: self.perm as u8,
            kind: self.kind as u8,
            padding: [0; 6],
        }
    }
}

/// Who writes the config space (the `flags` of SET_CONFIG).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ConfigWriteKind {
    /// A front-end write: only writable fields may change.
    Frontend,
    /// A live-migration write: read-only fields may change too.
    Migration,
}

/// GET_CONFIG / SET_CONFIG payload (and GET_CONFIG reply): a range of the
/// config space and its bytes. `offset + data.len()` is within 256 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigMsg<'a> {
    /// Offset in the config space.
    pub offset: u32,
    /// Flags.
    pub kind: ConfigWriteKind,
    /// The config bytes (for GET_CONFIG requests, ignored placeholder bytes).
    pub data: &'a [u8],
}

impl<'a> ConfigMsg<'a> {
    pub(crate) fn parse(request: u32, payload: &'a [u8]) -> Result<Self, WireError> {
        let bad = || WireError::BadSize {
            request: sat16(request),
            size: sat16(payload.len()),
        };
        let (head, data) = payload
            .split_at_checked(raw::ConfigHead::SIZE)
            .ok_or_else(bad)?;
        let head: &raw::ConfigHead = exact(request, head)?;
        let (offset, size) = (head.offset.get(), head.size.get());
        match offset.checked_add(size) {
            Some(end) if end <= MAX_CONFIG_SIZE => {}
            _ => {
                return Err(WireError::ConfigRange {
                    offset: sat16(offset),
                    size: sat16(size),
                })
            }
        }
        if data.len() != size as usize {
            return Err(bad());
        }
        let kind = match head.flags.get() {
            0 => ConfigWriteKind::Frontend,
            1 => ConfigWriteKind::Migration,
            v => return Err(WireError::BadValue(v)),
        };
        Ok(ConfigMsg { offset, kind, data })
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        w.raw(&raw::ConfigHead {
            offset: self.offset.into(),
            size: (self.data.len() as u32).into(),
            flags: match self.kind {
                ConfigWriteKind::Frontend => 0u32,
                ConfigWriteKind::Migration => 1,
            }
            .into(),
        })?;
        w.bytes(self.data)
    }
}

/// Inflight description (GET_INFLIGHT_FD request and reply, SET_INFLIGHT_FD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InflightMsg {
    /// Size of the area (0 in a GET request; 0 in a reply means "no area").
    pub mmap_size: u64,
    /// Offset of the area in the fd.
    pub mmap_offset: u64,
    /// Number of queues, never 0.
    pub num_queues: u16,
    /// Queue size, never 0.
    pub queue_size: u16,
}

impl InflightMsg {
    pub(crate) fn parse(request: u32, payload: &[u8]) -> Result<Self, WireError> {
        let r: &raw::Inflight = exact(request, payload)?;
        let m = InflightMsg {
            mmap_size: r.mmap_size.get(),
            mmap_offset: r.mmap_offset.get(),
            num_queues: r.num_queues.get(),
            queue_size: r.queue_size.get(),
        };
        if m.num_queues == 0 || m.queue_size == 0 {
            return Err(WireError::BadValue(0));
        }
        m.mmap_offset
            .checked_add(m.mmap_size)
            .ok_or(WireError::RangeOverflow)?;
        Ok(m)
    }

    pub(crate) fn raw(&self) -> raw::Inflight {
        raw::Inflight {
            mmap_size: self.mmap_size.into(),
            mmap_offset: self.mmap_offset.into(),
            num_queues: self.num_queues.into(),
            queue_size: self.queue_size.into(),
            padding: [0; 4],
        }
    }
}

/// Shared-memory map / unmap request (back-end channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ShmemMapMsg {
    /// Shared memory region id.
    pub shmid: u8,
    /// Offset into the fd.
    pub fd_offset: u64,
    /// Offset into the region.
    pub shm_offset: u64,
    /// Length, never 0.
    pub len: u64,
    /// Map read-write (else read-only).
    pub writable: bool,
}

/// Endianness of a legacy ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Endian {
    /// Little endian.
    Little,
    /// Big endian.
    Big,
}

/// Direction of a device state transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DeviceStateDirection {
    /// The back-end writes its state.
    Save,
    /// The back-end reads its state.
    Load,
}

/// A validated front-end request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// GET_FEATURES.
    GetFeatures,
    /// SET_FEATURES.
    SetFeatures(u64),
    /// SET_OWNER.
    SetOwner,
    /// RESET_OWNER.
    ResetOwner,
    /// SET_MEM_TABLE; one fd per region.
    SetMemTable(MemTable<'a>),
    /// SET_LOG_BASE; one fd.
    SetLogBase(LogMsg),
    /// SET_LOG_FD; one fd.
    SetLogFd,
    /// SET_VRING_NUM: ring size (1 to 32768).
    SetVringNum(VringStateMsg),
    /// SET_VRING_ADDR.
    SetVringAddr(VringAddrMsg),
    /// SET_VRING_BASE.
    SetVringBase(VringStateMsg),
    /// GET_VRING_BASE for a ring (the reserved num is not kept).
    GetVringBase(u32),
    /// SET_VRING_KICK.
    SetVringKick(VringFdMsg),
    /// SET_VRING_CALL.
    SetVringCall(VringFdMsg),
    /// SET_VRING_ERR.
    SetVringErr(VringFdMsg),
    /// GET_PROTOCOL_FEATURES.
    GetProtocolFeatures,
    /// SET_PROTOCOL_FEATURES.
    SetProtocolFeatures(u64),
    /// GET_QUEUE_NUM.
    GetQueueNum,
    /// SET_VRING_ENABLE.
    SetVringEnable {
        /// Ring index.
        index: u32,
        /// Enable (1) or disable (0).
        enable: bool,
    },
    /// SEND_RARP with the guest's MAC.
    SendRarp([u8; 6]),
    /// NET_SET_MTU.
    NetSetMtu(u64),
    /// SET_BACKEND_REQ_FD; one fd.
    SetBackendReqFd,
    /// IOTLB_MSG.
    IotlbMsg(IotlbMsg),
    /// SET_VRING_ENDIAN.
    SetVringEndian {
        /// Ring index.
        index: u32,
        /// Endianness.
        endian: Endian,
    },
    /// GET_CONFIG.
    GetConfig(ConfigMsg<'a>),
    /// SET_CONFIG.
    SetConfig(ConfigMsg<'a>),
    /// CREATE_CRYPTO_SESSION: host-ABI dependent bytes, kept opaque.
    CreateCryptoSession(&'a [u8]),
    /// CLOSE_CRYPTO_SESSION.
    CloseCryptoSession(u64),
    /// POSTCOPY_ADVISE.
    PostcopyAdvise,
    /// POSTCOPY_LISTEN.
    PostcopyListen,
    /// POSTCOPY_END.
    PostcopyEnd,
    /// GET_INFLIGHT_FD.
    GetInflightFd(InflightMsg),
    /// SET_INFLIGHT_FD; one fd.
    SetInflightFd(InflightMsg),
    /// GPU_SET_SOCKET; one fd.
    GpuSetSocket,
    /// RESET_DEVICE.
    ResetDevice,
    /// VRING_KICK (in-band) for a ring.
    VringKick(u32),
    /// GET_MAX_MEM_SLOTS.
    GetMaxMemSlots,
    /// ADD_MEM_REG; one fd.
    AddMemReg(MemRegionMsg),
    /// REM_MEM_REG; no fd (one tolerated, to be closed).
    RemMemReg(MemRegionMsg),
    /// SET_STATUS.
    SetStatus(u8),
    /// GET_STATUS.
    GetStatus,
    /// GET_SHARED_OBJECT.
    GetSharedObject([u8; 16]),
    /// SET_DEVICE_STATE_FD; one fd.
    SetDeviceStateFd(DeviceStateDirection),
    /// CHECK_DEVICE_STATE.
    CheckDeviceState,
    /// GET_SHMEM_CONFIG.
    GetShmemConfig,
    /// GET_VRING_BASE_SKIP_DRAIN for a ring.
    GetVringBaseSkipDrain(u32),
}

/// The fd rule of each id; for the ids whose rule depends on the payload,
/// the bounds every payload allows.
const FD_RULES: [FdRule; 46] = {
    let mut t = [FdRule::NONE; 46];
    t[FrontendReq::SetMemTable as usize] = FdRule {
        min: 0,
        max: u8::MAX,
    };
    t[FrontendReq::SetVringKick as usize] = FdRule::OPTIONAL;
    t[FrontendReq::SetVringCall as usize] = FdRule::OPTIONAL;
    t[FrontendReq::SetVringErr as usize] = FdRule::OPTIONAL;
    t[FrontendReq::SetLogBase as usize] = FdRule::ONE;
    t[FrontendReq::SetLogFd as usize] = FdRule::ONE;
    t[FrontendReq::SetBackendReqFd as usize] = FdRule::ONE;
    t[FrontendReq::SetInflightFd as usize] = FdRule::ONE;
    t[FrontendReq::GpuSetSocket as usize] = FdRule::ONE;
    t[FrontendReq::AddMemReg as usize] = FdRule::ONE;
    t[FrontendReq::SetDeviceStateFd as usize] = FdRule::ONE;
    t[FrontendReq::RemMemReg as usize] = FdRule::OPTIONAL;
    t
};

/// Payload layouts that requests share, each with its own parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// No payload.
    Empty,
    /// SET_FEATURES, SET_PROTOCOL_FEATURES.
    Features,
    /// A `vhost_vring_state`.
    State,
    /// The u64 of SET_VRING_KICK/CALL/ERR.
    VringFd,
    /// SET_VRING_ADDR.
    VringAddr,
    /// ADD_MEM_REG, REM_MEM_REG.
    Region,
    /// GET_CONFIG, SET_CONFIG.
    Config,
    /// Everything else: parsed with every check in order.
    Slow,
}

/// What [`Request::parse`] needs to know of an id before reading its
/// payload.
#[derive(Clone, Copy, Debug)]
struct Rule {
    code: FrontendReq,
    group: Group,
    /// The exact payload size, or [`ANY_SIZE`].
    size: u16,
    fd_min: u8,
    fd_max: u8,
}

const ANY_SIZE: u16 = u16::MAX;

impl Rule {
    /// Ids 0 and above 45.
    const SLOW: Rule = Rule {
        code: FrontendReq::GetFeatures,
        group: Group::Slow,
        size: ANY_SIZE,
        fd_min: 0,
        fd_max: u8::MAX,
    };
}

/// The rule of every id, indexed by id.
const RULES: [Rule; 46] = {
    use FrontendReq as C;
    let mut t = [Rule::SLOW; 46];
    let mut i = 0;
    while i < FrontendReq::ALL.len() {
        let code = FrontendReq::ALL[i];
        let fds = FD_RULES[code as usize];
        let (group, size) = match code {
            C::GetFeatures
            | C::SetOwner
            | C::ResetOwner
            | C::SetLogFd
            | C::GetProtocolFeatures
            | C::GetQueueNum
            | C::SetBackendReqFd
            | C::PostcopyAdvise
            | C::PostcopyListen
            | C::PostcopyEnd
            | C::GpuSetSocket
            | C::ResetDevice
            | C::GetMaxMemSlots
            | C::GetStatus
            | C::CheckDeviceState
            | C::GetShmemConfig => (Group::Empty, 0),
            C::SetFeatures | C::SetProtocolFeatures => (Group::Features, raw::Word::SIZE),
            C::SetVringNum
            | C::SetVringBase
            | C::GetVringBase
            | C::SetVringEnable
            | C::VringKick
            | C::GetVringBaseSkipDrain => (Group::State, raw::VringState::SIZE),
            C::SetVringKick | C::SetVringCall | C::SetVringErr => (Group::VringFd, raw::Word::SIZE),
            C::SetVringAddr => (Group::VringAddr, raw::VringAddr::SIZE),
            C::AddMemReg | C::RemMemReg => (Group::Region, 8 + raw::MemRegion::SIZE),
            C::GetConfig | C::SetConfig => (Group::Config, ANY_SIZE as usize),
            _ => (Group::Slow, ANY_SIZE as usize),
        };
        t[code as usize] = Rule {
            code,
            group,
            size: size as u16,
            fd_min: fds.min,
            fd_max: fds.max,
        };
        i += 1;
    }
    t
};

/// Largest ring size a SET_VRING_NUM may ask for.
pub const MAX_RING_SIZE: u32 = 32768;

/// A shared-object UUID; the nil and max UUIDs name no object.
pub(crate) fn uuid(request: u32, payload: &[u8]) -> Result<[u8; 16], WireError> {
    let u = exact::<raw::SharedObject>(request, payload)?.uuid;
    if u == [0; 16] || u == [0xff; 16] {
        return Err(WireError::BadValue(0));
    }
    Ok(u)
}

fn word(request: u32, payload: &[u8]) -> Result<u64, WireError> {
    Ok(exact::<raw::Word>(request, payload)?.value.get())
}

fn single_region(request: u32, payload: &[u8], xen: bool) -> Result<MemRegionMsg, WireError> {
    let need = 8 + MemRegionMsg::wire_size(xen);
    if payload.len() != need {
        return Err(WireError::BadSize {
            request: sat16(request),
            size: sat16(payload.len()),
        });
    }
    MemRegionMsg::parse_one(&payload[8..], xen)
}

impl<'a> Request<'a> {
    /// Parses a request whose header was validated by [`Header::parse`].
    ///
    /// `payload` must be the `header.size` bytes that followed the header and
    /// `nfds` the number of file descriptors that arrived with the message.
    /// On error the caller drops the message and closes every fd.
    #[inline]
    pub fn parse(
        header: &Header,
        payload: &'a [u8],
        nfds: usize,
        opts: &ParseOptions,
    ) -> Result<Self, WireError> {
        // The common case first: one table entry says whether the header, the
        // payload size and the fd count fit the id; then the id's group
        // parser checks the fields. Anything else, and the rare ids, take
        // the long way, which finds the exact error.
        let rule = RULES
            .get(header.request as usize)
            .copied()
            .unwrap_or(Rule::SLOW);
        let fits = (header.flags.bits() & HeaderFlags::REPLY.bits() == 0)
            & (payload.len() == header.size as usize)
            & ((rule.size == ANY_SIZE) | (payload.len() == usize::from(rule.size)))
            & (nfds.wrapping_sub(usize::from(rule.fd_min))
                <= usize::from(rule.fd_max - rule.fd_min));
        if !fits {
            return Self::parse_slow(header, payload, nfds, opts);
        }
        let code = rule.code;
        match rule.group {
            Group::Empty => Self::parse_empty(code, payload),
            Group::Features => Self::parse_features(code, payload),
            Group::State => Self::parse_state(code, payload, opts),
            Group::VringFd => Self::parse_vring_fd(code, payload, opts, Some(nfds)),
            Group::VringAddr => Self::parse_vring_addr(payload, opts),
            Group::Region => Self::parse_region(code, payload, opts),
            Group::Config => Self::parse_config(code, payload),
            Group::Slow => Self::parse_slow(header, payload, nfds, opts),
        }
    }

    /// [`Request::parse`] with every check in order, for the rare ids and for
    /// messages that are wrong somewhere.
    #[cold]
    #[inline(never)]
    pub(crate) fn parse_slow(
        header: &Header,
        payload: &'a [u8],
        nfds: usize,
        opts: &ParseOptions,
    ) -> Result<Self, WireError> {
        header.check_request()?;
        if payload.len() != header.size as usize {
            return Err(WireError::Truncated {
                needed: sat16(header.size),
                got: sat16(payload.len()),
            });
        }
        let code = FrontendReq::try_from(header.request)?;
        // Most ids have a fixed fd rule, read from a table; the three eventfd
        // messages and SET_MEM_TABLE have a looser bound there, and their
        // exact rule, which depends on the payload, is checked here once the
        // payload has the right size.
        FD_RULES[code as usize].check(nfds)?;
        match code {
            FrontendReq::SetVringKick | FrontendReq::SetVringCall | FrontendReq::SetVringErr => {
                if let Ok(w) = raw::Word::ref_from_bytes(payload) {
                    vring_fd_rule(w.value.get()).check(nfds)?;
                }
            }
            FrontendReq::SetMemTable => {
                if let Ok((head, _)) = raw::MemTableHead::ref_from_prefix(payload) {
                    let n = head.nregions.get();
                    if n != nfds as u32 && (1..=MAX_MEM_REGIONS as u32).contains(&n) {
                        FdRule::exactly(n as u8).check(nfds)?;
                    }
                }
            }
            _ => {}
        }
        Self::parse_payload(code, payload, opts)
    }

    /// Parses the payload of a request with a known code.
    ///
    /// The ids are sorted into groups whose requests share a payload layout;
    /// each group has its own parser, which builds its variant directly in
    /// the result, so a parse does not pay for the layouts of the others.
    #[inline]
    pub fn parse_payload(
        code: FrontendReq,
        payload: &'a [u8],
        opts: &ParseOptions,
    ) -> Result<Self, WireError> {
        use FrontendReq as C;
        match code {
            C::GetFeatures
            | C::SetOwner
            | C::ResetOwner
            | C::SetLogFd
            | C::GetProtocolFeatures
            | C::GetQueueNum
            | C::SetBackendReqFd
            | C::PostcopyAdvise
            | C::PostcopyListen
            | C::PostcopyEnd
            | C::GpuSetSocket
            | C::ResetDevice
            | C::GetMaxMemSlots
            | C::GetStatus
            | C::CheckDeviceState
            | C::GetShmemConfig => Self::parse_empty(code, payload),
            C::SetFeatures | C::SetProtocolFeatures => Self::parse_features(code, payload),
            C::SetVringNum
            | C::SetVringBase
            | C::GetVringBase
            | C::SetVringEnable
            | C::VringKick
            | C::GetVringBaseSkipDrain => Self::parse_state(code, payload, opts),
            C::SetVringKick | C::SetVringCall | C::SetVringErr => {
                Self::parse_vring_fd(code, payload, opts, None)
            }
            C::SetVringAddr => Self::parse_vring_addr(payload, opts),
            C::AddMemReg | C::RemMemReg => Self::parse_region(code, payload, opts),
            C::GetConfig | C::SetConfig => Self::parse_config(code, payload),
            _ => Self::parse_other(code, payload, opts),
        }
    }

    #[inline(never)]
    fn parse_empty(code: FrontendReq, payload: &'a [u8]) -> Result<Self, WireError> {
        use FrontendReq as C;
        empty(code.id(), payload)?;
        Ok(match code {
            C::GetFeatures => Request::GetFeatures,
            C::SetOwner => Request::SetOwner,
            C::ResetOwner => Request::ResetOwner,
            C::SetLogFd => Request::SetLogFd,
            C::GetProtocolFeatures => Request::GetProtocolFeatures,
            C::GetQueueNum => Request::GetQueueNum,
            C::SetBackendReqFd => Request::SetBackendReqFd,
            C::PostcopyAdvise => Request::PostcopyAdvise,
            C::PostcopyListen => Request::PostcopyListen,
            C::PostcopyEnd => Request::PostcopyEnd,
            C::GpuSetSocket => Request::GpuSetSocket,
            C::ResetDevice => Request::ResetDevice,
            C::GetMaxMemSlots => Request::GetMaxMemSlots,
            C::GetStatus => Request::GetStatus,
            C::CheckDeviceState => Request::CheckDeviceState,
            _ => Request::GetShmemConfig,
        })
    }

    #[inline(never)]
    fn parse_features(code: FrontendReq, payload: &'a [u8]) -> Result<Self, WireError> {
        let v = word(code.id(), payload)?;
        Ok(match code {
            FrontendReq::SetFeatures => Request::SetFeatures(v),
            _ => Request::SetProtocolFeatures(v),
        })
    }

    #[inline(never)]
    fn parse_state(
        code: FrontendReq,
        payload: &'a [u8],
        opts: &ParseOptions,
    ) -> Result<Self, WireError> {
        use FrontendReq as C;
        let s = VringStateMsg::parse(code.id(), payload, opts)?;
        Ok(match code {
            C::SetVringNum => {
                if s.num == 0 || s.num > MAX_RING_SIZE {
                    return Err(WireError::BadValue(s.num));
                }
                Request::SetVringNum(s)
            }
            C::SetVringBase => Request::SetVringBase(s),
            C::GetVringBase => Request::GetVringBase(s.index),
            C::SetVringEnable => {
                let enable = match s.num {
                    0 => false,
                    1 => true,
                    v => return Err(WireError::BadValue(v)),
                };
                Request::SetVringEnable {
                    index: s.index,
                    enable,
                }
            }
            C::VringKick => Request::VringKick(s.index),
            _ => Request::GetVringBaseSkipDrain(s.index),
        })
    }

    /// SET_VRING_KICK/CALL/ERR; with `nfds`, also checks the fd count
    /// against the no-fd bit, before the other fields (as [`Request::parse`]
    /// does).
    #[inline(never)]
    fn parse_vring_fd(
        code: FrontendReq,
        payload: &'a [u8],
        opts: &ParseOptions,
        nfds: Option<usize>,
    ) -> Result<Self, WireError> {
        if let (Some(n), Ok(w)) = (nfds, raw::Word::ref_from_bytes(payload)) {
            vring_fd_rule(w.value.get()).check(n)?;
        }
        let v = VringFdMsg::parse(code.id(), payload, opts)?;
        Ok(match code {
            FrontendReq::SetVringKick => Request::SetVringKick(v),
            FrontendReq::SetVringCall => Request::SetVringCall(v),
            _ => Request::SetVringErr(v),
        })
    }

    #[inline(never)]
    fn parse_vring_addr(payload: &'a [u8], opts: &ParseOptions) -> Result<Self, WireError> {
        let r: &raw::VringAddr = exact(FrontendReq::SetVringAddr.id(), payload)?;
        let flags = r.flags.get();
        if flags & !VRING_F_LOG != 0 {
            return Err(WireError::ReservedBits(flags));
        }
        Ok(Request::SetVringAddr(VringAddrMsg {
            index: opts.check_queue(r.index.get().into())?,
            log: flags & VRING_F_LOG != 0,
            desc: r.desc.get(),
            used: r.used.get(),
            avail: r.avail.get(),
            log_addr: r.log.get(),
        }))
    }

    #[inline(never)]
    fn parse_region(
        code: FrontendReq,
        payload: &'a [u8],
        opts: &ParseOptions,
    ) -> Result<Self, WireError> {
        let r = single_region(code.id(), payload, opts.xen_mmap)?;
        Ok(match code {
            FrontendReq::AddMemReg => Request::AddMemReg(r),
            _ => Request::RemMemReg(r),
        })
    }

    #[inline(never)]
    fn parse_config(code: FrontendReq, payload: &'a [u8]) -> Result<Self, WireError> {
        let c = ConfigMsg::parse(code.id(), payload)?;
        Ok(match code {
            FrontendReq::GetConfig => Request::GetConfig(c),
            _ => Request::SetConfig(c),
        })
    }

    /// The requests outside the groups above (rare in a session's life).
    #[inline(never)]
    fn parse_other(
        code: FrontendReq,
        payload: &'a [u8],
        opts: &ParseOptions,
    ) -> Result<Self, WireError> {
        use FrontendReq as C;
        let id = code.id();
        Ok(match code {
            C::SetMemTable => Request::SetMemTable(MemTable::parse(id, payload, opts.xen_mmap)?),
            C::SetLogBase => {
                let r: &raw::Log = exact(id, payload)?;
                let (size, offset) = (r.mmap_size.get(), r.mmap_offset.get());
                if size == 0 {
                    return Err(WireError::EmptyRegion);
                }
                offset.checked_add(size).ok_or(WireError::RangeOverflow)?;
                Request::SetLogBase(LogMsg { size, offset })
            }
            C::SendRarp => {
                let v = word(id, payload)?.to_ne_bytes();
                Request::SendRarp([v[0], v[1], v[2], v[3], v[4], v[5]])
            }
            C::NetSetMtu => Request::NetSetMtu(word(id, payload)?),
            C::IotlbMsg => {
                let m = IotlbMsg::parse(id, payload)?;
                if !matches!(m.kind, IotlbKind::Update | IotlbKind::Invalidate) {
                    return Err(WireError::BadValue(m.kind as u32));
                }
                Request::IotlbMsg(m)
            }
            C::SetVringEndian => {
                let s = VringStateMsg::parse(id, payload, opts)?;
                let endian = match s.num {
                    0 => Endian::Little,
                    1 => Endian::Big,
                    v => return Err(WireError::BadValue(v)),
                };
                Request::SetVringEndian {
                    index: s.index,
                    endian,
                }
            }
            C::CreateCryptoSession => {
                if payload.len() < 16 {
                    return Err(WireError::BadSize {
                        request: sat16(id),
                        size: sat16(payload.len()),
                    });
                }
                Request::CreateCryptoSession(payload)
            }
            C::CloseCryptoSession => Request::CloseCryptoSession(word(id, payload)?),
            C::GetInflightFd => Request::GetInflightFd(InflightMsg::parse(id, payload)?),
            C::SetInflightFd => {
                let m = InflightMsg::parse(id, payload)?;
                if m.mmap_size == 0 {
                    return Err(WireError::EmptyRegion);
                }
                Request::SetInflightFd(m)
            }
            C::SetStatus => {
                let v = word(id, payload)?;
                let status = u8::try_from(v).map_err(|_| WireError::bad_value(v))?;
                Request::SetStatus(status)
            }
            C::GetSharedObject => Request::GetSharedObject(uuid(id, payload)?),
            C::SetDeviceStateFd => {
                let r: &raw::DeviceStateTransfer = exact(id, payload)?;
                let direction = match r.direction.get() {
                    0 => DeviceStateDirection::Save,
                    1 => DeviceStateDirection::Load,
                    v => return Err(WireError::BadValue(v)),
                };
                if r.phase.get() != 0 {
                    return Err(WireError::BadValue(r.phase.get()));
                }
                Request::SetDeviceStateFd(direction)
            }
            _ => return Err(WireError::UnknownRequest(id)),
        })
    }

    /// The request code.
    pub fn code(&self) -> FrontendReq {
        use FrontendReq as C;
        match self {
            Request::GetFeatures => C::GetFeatures,
            Request::SetFeatures(_) => C::SetFeatures,
            Request::SetOwner => C::SetOwner,
            Request::ResetOwner => C::ResetOwner,
            Request::SetMemTable(_) => C::SetMemTable,
            Request::SetLogBase(_) => C::SetLogBase,
            Request::SetLogFd => C::SetLogFd,
            Request::SetVringNum(_) => C::SetVringNum,
            Request::SetVringAddr(_) => C::SetVringAddr,
            Request::SetVringBase(_) => C::SetVringBase,
            Request::GetVringBase(_) => C::GetVringBase,
            Request::SetVringKick(_) => C::SetVringKick,
            Request::SetVringCall(_) => C::SetVringCall,
            Request::SetVringErr(_) => C::SetVringErr,
            Request::GetProtocolFeatures => C::GetProtocolFeatures,
            Request::SetProtocolFeatures(_) => C::SetProtocolFeatures,
            Request::GetQueueNum => C::GetQueueNum,
            Request::SetVringEnable { .. } => C::SetVringEnable,
            Request::SendRarp(_) => C::SendRarp,
            Request::NetSetMtu(_) => C::NetSetMtu,
            Request::SetBackendReqFd => C::SetBackendReqFd,
            Request::IotlbMsg(_) => C::IotlbMsg,
            Request::SetVringEndian { .. } => C::SetVringEndian,
            Request::GetConfig(_) => C::GetConfig,
            Request::SetConfig(_) => C::SetConfig,
            Request::CreateCryptoSession(_) => C::CreateCryptoSession,
            Request::CloseCryptoSession(_) => C::CloseCryptoSession,
            Request::PostcopyAdvise => C::PostcopyAdvise,
            Request::PostcopyListen => C::PostcopyListen,
            Request::PostcopyEnd => C::PostcopyEnd,
            Request::GetInflightFd(_) => C::GetInflightFd,
            Request::SetInflightFd(_) => C::SetInflightFd,
            Request::GpuSetSocket => C::GpuSetSocket,
            Request::ResetDevice => C::ResetDevice,
            Request::VringKick(_) => C::VringKick,
            Request::GetMaxMemSlots => C::GetMaxMemSlots,
            Request::AddMemReg(_) => C::AddMemReg,
            Request::RemMemReg(_) => C::RemMemReg,
            Request::SetStatus(_) => C::SetStatus,
            Request::GetStatus => C::GetStatus,
            Request::GetSharedObject(_) => C::GetSharedObject,
            Request::SetDeviceStateFd(_) => C::SetDeviceStateFd,
            Request::CheckDeviceState => C::CheckDeviceState,
            Request::GetShmemConfig => C::GetShmemConfig,
            Request::GetVringBaseSkipDrain(_) => C::GetVringBaseSkipDrain,
        }
    }

    /// How many fds this request must carry.
    #[inline]
    pub fn fd_rule(&self) -> FdRule {
        match self {
            Request::SetMemTable(t) => FdRule::exactly(t.len() as u8),
            Request::SetVringKick(v) | Request::SetVringCall(v) | Request::SetVringErr(v) => {
                v.fd_rule()
            }
            Request::SetLogBase(_)
            | Request::SetLogFd
            | Request::SetBackendReqFd
            | Request::SetInflightFd(_)
            | Request::GpuSetSocket
            | Request::AddMemReg(_)
            | Request::SetDeviceStateFd(_) => FdRule::ONE,
            Request::RemMemReg(_) => FdRule::OPTIONAL,
            _ => FdRule::NONE,
        }
    }

    /// The ring this request addresses, if any.
    pub fn queue(&self) -> Option<u32> {
        match self {
            Request::SetVringNum(s) | Request::SetVringBase(s) => Some(s.index),
            Request::SetVringAddr(a) => Some(a.index),
            Request::GetVringBase(i)
            | Request::VringKick(i)
            | Request::GetVringBaseSkipDrain(i) => Some(*i),
            Request::SetVringKick(v) | Request::SetVringCall(v) | Request::SetVringErr(v) => {
                Some(v.index)
            }
            Request::SetVringEnable { index, .. } | Request::SetVringEndian { index, .. } => {
                Some(*index)
            }
            _ => None,
        }
    }

    /// Encodes the request (header and payload) into `out`, asking for a
    /// REPLY_ACK if `need_reply`. Returns the message length.
    pub fn encode(&self, need_reply: bool, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        let state = |index: u32, num: u32| raw::VringState {
            index: index.into(),
            num: num.into(),
        };
        match self {
            Request::GetFeatures
            | Request::SetOwner
            | Request::ResetOwner
            | Request::SetLogFd
            | Request::GetProtocolFeatures
            | Request::GetQueueNum
            | Request::SetBackendReqFd
            | Request::PostcopyAdvise
            | Request::PostcopyListen
            | Request::PostcopyEnd
            | Request::GpuSetSocket
            | Request::ResetDevice
            | Request::GetMaxMemSlots
            | Request::GetStatus
            | Request::CheckDeviceState
            | Request::GetShmemConfig => {}
            Request::SetFeatures(v)
            | Request::SetProtocolFeatures(v)
            | Request::NetSetMtu(v)
            | Request::CloseCryptoSession(v) => w.word(*v)?,
            Request::SetStatus(v) => w.word(u64::from(*v))?,
            Request::SetMemTable(t) => t.write(&mut w)?,
            Request::SetLogBase(l) => w.raw(&raw::Log {
                mmap_size: l.size.into(),
                mmap_offset: l.offset.into(),
            })?,
            Request::SetVringNum(s) | Request::SetVringBase(s) => w.raw(&s.raw())?,
            Request::SetVringAddr(a) => w.raw(&raw::VringAddr {
                index: a.index.into(),
                flags: if a.log { VRING_F_LOG } else { 0 }.into(),
                desc: a.desc.into(),
                used: a.used.into(),
                avail: a.avail.into(),
                log: a.log_addr.into(),
            })?,
            Request::GetVringBase(i)
            | Request::VringKick(i)
            | Request::GetVringBaseSkipDrain(i) => w.raw(&state(*i, 0))?,
            Request::SetVringKick(v) | Request::SetVringCall(v) | Request::SetVringErr(v) => {
                w.word(v.value())?
            }
            Request::SetVringEnable { index, enable } => {
                w.raw(&state(*index, u32::from(*enable)))?
            }
            Request::SendRarp(mac) => {
                let mut b = [0u8; 8];
                b[..6].copy_from_slice(mac);
                w.bytes(&b)?
            }
            Request::IotlbMsg(m) => w.raw(&m.raw())?,
            Request::SetVringEndian { index, endian } => {
                w.raw(&state(*index, (*endian == Endian::Big).into()))?
            }
            Request::GetConfig(c) | Request::SetConfig(c) => c.write(&mut w)?,
            Request::CreateCryptoSession(b) => w.bytes(b)?,
            Request::GetInflightFd(m) | Request::SetInflightFd(m) => w.raw(&m.raw())?,
            Request::AddMemReg(r) | Request::RemMemReg(r) => {
                w.word(0)?;
                r.write(&mut w)?
            }
            Request::GetSharedObject(u) => w.bytes(u)?,
            Request::SetDeviceStateFd(d) => w.raw(&raw::DeviceStateTransfer {
                direction: match d {
                    DeviceStateDirection::Save => 0u32,
                    DeviceStateDirection::Load => 1,
                }
                .into(),
                phase: 0.into(),
            })?,
        }
        w.finish(Header::request(self.code().id(), 0, need_reply))
    }
}

/// Writes a payload after the header's room, then the header.
pub(crate) struct Writer<'b> {
    out: &'b mut [u8],
    at: usize,
}

impl<'b> Writer<'b> {
    pub(crate) fn new(out: &'b mut [u8]) -> Self {
        Writer {
            out,
            at: super::HEADER_SIZE,
        }
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) -> Result<(), WireError> {
        if self.at - super::HEADER_SIZE + b.len() > MAX_PAYLOAD {
            return Err(WireError::PayloadTooLarge(
                (self.at - super::HEADER_SIZE + b.len()) as u32,
            ));
        }
        super::put(self.out, self.at, b)?;
        self.at += b.len();
        Ok(())
    }

    pub(crate) fn raw<T: IntoBytes + zerocopy::Immutable>(
        &mut self,
        v: &T,
    ) -> Result<(), WireError> {
        self.bytes(v.as_bytes())
    }

    pub(crate) fn word(&mut self, v: u64) -> Result<(), WireError> {
        self.bytes(&v.to_ne_bytes())
    }

    pub(crate) fn finish(self, header: Header) -> Result<usize, WireError> {
        Header {
            size: (self.at - super::HEADER_SIZE) as u32,
            ..header
        }
        .encode(self.out)?;
        Ok(self.at)
    }
}

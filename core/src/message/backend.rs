//! Back-end → front-end requests on the back-end channel (the socket handed
//! over with SET_BACKEND_REQ_FD).

use super::raw;
use super::request::{uuid, IotlbKind, IotlbMsg, ShmemMapMsg, Writer};
use super::{empty, exact, sat16, FdRule, Header, ParseOptions, WireError};

request_codes! {
    /// Request codes of the back-end channel (back-end → front-end).
    BackendReq {
        /// IOTLB miss or access failure.
        IotlbMsg = 1 => "BACKEND_IOTLB_MSG",
        /// The device config changed.
        ConfigChangeMsg = 2 => "BACKEND_CONFIG_CHANGE_MSG",
        /// Set or remove a ring's host notifier.
        VringHostNotifierMsg = 3 => "BACKEND_VRING_HOST_NOTIFIER_MSG",
        /// In-band call.
        VringCall = 4 => "BACKEND_VRING_CALL",
        /// In-band error.
        VringErr = 5 => "BACKEND_VRING_ERR",
        /// Export a shared object.
        SharedObjectAdd = 6 => "BACKEND_SHARED_OBJECT_ADD",
        /// Withdraw a shared object.
        SharedObjectRemove = 7 => "BACKEND_SHARED_OBJECT_REMOVE",
        /// Look up a shared object.
        SharedObjectLookup = 8 => "BACKEND_SHARED_OBJECT_LOOKUP",
        /// Map an fd into a shared memory region.
        ShmemMap = 9 => "BACKEND_SHMEM_MAP",
        /// Unmap a range of a shared memory region.
        ShmemUnmap = 10 => "BACKEND_SHMEM_UNMAP",
    }
}

/// BACKEND_VRING_HOST_NOTIFIER_MSG: a ring's notification area in an fd, or
/// its removal (`no_fd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VringAreaMsg {
    /// Ring index.
    pub index: u32,
    /// No fd: remove the notifier.
    pub no_fd: bool,
    /// Size of the area.
    pub size: u64,
    /// Offset of the area in the fd.
    pub offset: u64,
}

const AREA_INDEX_MASK: u64 = 0xff;
const AREA_NOFD: u64 = 0x100;

/// A validated back-end channel request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendRequest {
    /// BACKEND_IOTLB_MSG (miss or access failure).
    IotlbMsg(IotlbMsg),
    /// BACKEND_CONFIG_CHANGE_MSG.
    ConfigChange,
    /// BACKEND_VRING_HOST_NOTIFIER_MSG; one fd unless `no_fd`.
    VringHostNotifier(VringAreaMsg),
    /// BACKEND_VRING_CALL for a ring.
    VringCall(u32),
    /// BACKEND_VRING_ERR for a ring.
    VringErr(u32),
    /// BACKEND_SHARED_OBJECT_ADD.
    SharedObjectAdd([u8; 16]),
    /// BACKEND_SHARED_OBJECT_REMOVE.
    SharedObjectRemove([u8; 16]),
    /// BACKEND_SHARED_OBJECT_LOOKUP.
    SharedObjectLookup([u8; 16]),
    /// BACKEND_SHMEM_MAP; one fd.
    ShmemMap(ShmemMapMsg),
    /// BACKEND_SHMEM_UNMAP.
    ShmemUnmap(ShmemMapMsg),
}

const SHMEM_WRITABLE: u64 = 1;

fn shmem(id: u32, payload: &[u8]) -> Result<ShmemMapMsg, WireError> {
    let r: &raw::ShmemMap = exact(id, payload)?;
    let flags = r.flags.get();
    if flags & !SHMEM_WRITABLE != 0 {
        return Err(WireError::reserved_bits(flags));
    }
    let m = ShmemMapMsg {
        shmid: r.shmid,
        fd_offset: r.fd_offset.get(),
        shm_offset: r.shm_offset.get(),
        len: r.len.get(),
        writable: flags & SHMEM_WRITABLE != 0,
    };
    if m.len == 0 {
        return Err(WireError::EmptyRegion);
    }
    m.fd_offset
        .checked_add(m.len)
        .ok_or(WireError::RangeOverflow)?;
    m.shm_offset
        .checked_add(m.len)
        .ok_or(WireError::RangeOverflow)?;
    Ok(m)
}

impl BackendRequest {
    /// Parses a back-end channel request whose header was validated by
    /// [`Header::parse`]; `nfds` is the number of fds that came with it.
    pub fn parse(
        header: &Header,
        payload: &[u8],
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
        let code = BackendReq::try_from(header.request)?;
        let id = code.id();
        let ring = |p: &[u8]| -> Result<u32, WireError> {
            let s: &raw::VringState = exact(id, p)?;
            opts.check_queue(s.index.get().into())
        };
        let req = match code {
            BackendReq::IotlbMsg => {
                let m = IotlbMsg::parse(id, payload)?;
                if !matches!(m.kind, IotlbKind::Miss | IotlbKind::AccessFail) {
                    return Err(WireError::BadValue(m.kind as u32));
                }
                BackendRequest::IotlbMsg(m)
            }
            BackendReq::ConfigChangeMsg => {
                empty(id, payload)?;
                BackendRequest::ConfigChange
            }
            BackendReq::VringHostNotifierMsg => {
                let r: &raw::VringArea = exact(id, payload)?;
                let v = r.index_flags.get();
                if v & !(AREA_INDEX_MASK | AREA_NOFD) != 0 {
                    return Err(WireError::reserved_bits(v));
                }
                let m = VringAreaMsg {
                    index: opts.check_queue(v & AREA_INDEX_MASK)?,
                    no_fd: v & AREA_NOFD != 0,
                    size: r.size.get(),
                    offset: r.offset.get(),
                };
                m.offset
                    .checked_add(m.size)
                    .ok_or(WireError::RangeOverflow)?;
                BackendRequest::VringHostNotifier(m)
            }
            BackendReq::VringCall => BackendRequest::VringCall(ring(payload)?),
            BackendReq::VringErr => BackendRequest::VringErr(ring(payload)?),
            BackendReq::SharedObjectAdd => BackendRequest::SharedObjectAdd(uuid(id, payload)?),
            BackendReq::SharedObjectRemove => {
                BackendRequest::SharedObjectRemove(uuid(id, payload)?)
            }
            BackendReq::SharedObjectLookup => {
                BackendRequest::SharedObjectLookup(uuid(id, payload)?)
            }
            BackendReq::ShmemMap => BackendRequest::ShmemMap(shmem(id, payload)?),
            BackendReq::ShmemUnmap => BackendRequest::ShmemUnmap(shmem(id, payload)?),
        };
        req.fd_rule().check(nfds)?;
        Ok(req)
    }

    /// The request code.
    pub fn code(&self) -> BackendReq {
        match self {
            BackendRequest::IotlbMsg(_) => BackendReq::IotlbMsg,
            BackendRequest::ConfigChange => BackendReq::ConfigChangeMsg,
            BackendRequest::VringHostNotifier(_) => BackendReq::VringHostNotifierMsg,
            BackendRequest::VringCall(_) => BackendReq::VringCall,
            BackendRequest::VringErr(_) => BackendReq::VringErr,
            BackendRequest::SharedObjectAdd(_) => BackendReq::SharedObjectAdd,
            BackendRequest::SharedObjectRemove(_) => BackendReq::SharedObjectRemove,
            BackendRequest::SharedObjectLookup(_) => BackendReq::SharedObjectLookup,
            BackendRequest::ShmemMap(_) => BackendReq::ShmemMap,
            BackendRequest::ShmemUnmap(_) => BackendReq::ShmemUnmap,
        }
    }

    /// How many fds this request must carry.
    pub fn fd_rule(&self) -> FdRule {
        match self {
            BackendRequest::VringHostNotifier(m) if !m.no_fd => FdRule::ONE,
            BackendRequest::ShmemMap(_) => FdRule::ONE,
            _ => FdRule::NONE,
        }
    }

    /// Encodes the request into `out`, asking for an ack if `need_reply`.
    pub fn encode(&self, need_reply: bool, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        let shmem = |m: &ShmemMapMsg| raw::ShmemMap {
            shmid: m.shmid,
            padding: [0; 7],
            fd_offset: m.fd_offset.into(),
            shm_offset: m.shm_offset.into(),
            len: m.len.into(),
            flags: u64::from(m.writable).into(),
        };
        match self {
            BackendRequest::IotlbMsg(m) => w.raw(&m.raw())?,
            BackendRequest::ConfigChange => {
                return Self::encode_empty(BackendReq::ConfigChangeMsg, need_reply, out)
            }
            BackendRequest::VringHostNotifier(m) => w.raw(&raw::VringArea {
                index_flags: (u64::from(m.index) & AREA_INDEX_MASK
                    | if m.no_fd { AREA_NOFD } else { 0 })
                .into(),
                size: m.size.into(),
                offset: m.offset.into(),
            })?,
            BackendRequest::VringCall(i) | BackendRequest::VringErr(i) => {
                return Self::encode_ring(self.code(), *i, need_reply, out)
            }
            BackendRequest::SharedObjectAdd(u)
            | BackendRequest::SharedObjectRemove(u)
            | BackendRequest::SharedObjectLookup(u) => w.bytes(u)?,
            BackendRequest::ShmemMap(m) | BackendRequest::ShmemUnmap(m) => w.raw(&shmem(m))?,
        }
        w.finish(Header::request(self.code().id(), 0, need_reply))
    }

    // The requests a back-end session sends, each on its own, so that a
    // back-end links none of the others' encoding.

    /// A request without payload (CONFIG_CHANGE_MSG).
    pub fn encode_empty(
        request: BackendReq,
        need_reply: bool,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        Writer::new(out).finish(Header::request(request.id(), 0, need_reply))
    }

    /// A request naming ring `index` (in-band VRING_CALL, VRING_ERR).
    pub fn encode_ring(
        request: BackendReq,
        index: u32,
        need_reply: bool,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        w.raw(&raw::VringState {
            index: index.into(),
            num: 0.into(),
        })?;
        w.finish(Header::request(request.id(), 0, need_reply))
    }

    /// Parses the front-end's reply to a back-end request with code
    /// `request`: a u64 (0 = success). A successful SHARED_OBJECT_LOOKUP
    /// reply may carry one dma-buf fd.
    pub fn parse_reply(
        request: BackendReq,
        header: &Header,
        payload: &[u8],
        nfds: usize,
    ) -> Result<u64, WireError> {
        header.check_reply_to(request.id())?;
        let v = exact::<raw::Word>(request.id(), payload)?.value.get();
        let rule = if request == BackendReq::SharedObjectLookup && v == 0 {
            FdRule::OPTIONAL
        } else {
            FdRule::NONE
        };
        rule.check(nfds)?;
        Ok(v)
    }

    /// Encodes the front-end's u64 reply to a back-end request.
    pub fn encode_reply(
        request: BackendReq,
        value: u64,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        w.word(value)?;
        w.finish(Header::reply(request.id(), 0))
    }
}

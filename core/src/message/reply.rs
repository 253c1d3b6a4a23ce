//! Back-end → front-end replies on the main socket.

use super::raw;
use super::request::{ConfigMsg, InflightMsg, MemRegionMsg, MemTable, Writer};
use super::{exact, sat16, FdRule, FrontendReq, Header, ParseOptions, WireError};

/// A validated reply on the main socket. Which variant a reply parses into is
/// decided by the request it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A u64: features, protocol features, queue count, memory slots,
    /// status, a REPLY_ACK (0 = success), or the status of IOTLB_MSG,
    /// POSTCOPY_END, CHECK_DEVICE_STATE, GET_SHARED_OBJECT.
    U64(u64),
    /// GET_VRING_BASE / GET_VRING_BASE_SKIP_DRAIN: the ring's index and base.
    VringState {
        /// Ring index.
        index: u32,
        /// The base (encoding depends on the ring layout).
        num: u32,
    },
    /// GET_CONFIG: the config bytes asked for.
    Config(ConfigMsg<'a>),
    /// GET_CONFIG failed (a reply with an empty payload).
    ConfigFailed,
    /// GET_INFLIGHT_FD: the area's size and offset (size 0 = no area); one fd
    /// when the size is not 0.
    Inflight(InflightMsg),
    /// SET_LOG_BASE: the back-end has mapped the log (the payload, whose
    /// content the spec leaves open, is 0, 8 or 16 bytes and not kept).
    LogBaseDone,
    /// SET_MEM_TABLE in postcopy: each region's user address replaced by the
    /// back-end's mapping base.
    MemTable(MemTable<'a>),
    /// ADD_MEM_REG in postcopy: the region with the back-end's mapping base.
    MemRegion(MemRegionMsg),
    /// CREATE_CRYPTO_SESSION: opaque, host-ABI dependent bytes.
    CryptoSession(&'a [u8]),
    /// POSTCOPY_ADVISE: no payload, one userfaultfd.
    PostcopyAdvise,
    /// SET_DEVICE_STATE_FD: an error code (0 = ok) and whether the back-end
    /// returned no fd (if it returned one, the front-end must use it).
    DeviceStateFd {
        /// Error code (bits 0-7), 0 = success.
        error: u8,
        /// No fd accompanies the reply.
        no_fd: bool,
    },
    /// GET_SHMEM_CONFIG.
    ShmemConfig(&'a raw::ShmemConfig),
}

const DEVICE_STATE_NOFD: u64 = 0x100;

impl<'a> Reply<'a> {
    /// A REPLY_ACK: 0 for success, non-zero for failure.
    pub fn ack(ok: bool) -> Reply<'static> {
        Reply::U64(u64::from(!ok))
    }

    /// Parses the reply to a request with code `request`: flags exactly
    /// `VERSION | REPLY`, the same id, a size allowed for that request, and
    /// the fds it allows.
    pub fn parse(
        request: FrontendReq,
        header: &Header,
        payload: &'a [u8],
        nfds: usize,
        opts: &ParseOptions,
    ) -> Result<Self, WireError> {
        let id = request.id();
        header.check_reply_to(id)?;
        if payload.len() != header.size as usize {
            return Err(WireError::Truncated {
                needed: sat16(header.size),
                got: sat16(payload.len()),
            });
        }
        let bad = || WireError::BadSize {
            request: sat16(id),
            size: sat16(payload.len()),
        };
        use FrontendReq as C;
        let reply = match request {
            C::GetVringBase | C::GetVringBaseSkipDrain => {
                let s: &raw::VringState = exact(id, payload)?;
                Reply::VringState {
                    index: opts.check_queue(s.index.get().into())?,
                    num: s.num.get(),
                }
            }
            C::GetConfig if payload.is_empty() => Reply::ConfigFailed,
            C::GetConfig => Reply::Config(ConfigMsg::parse(id, payload)?),
            C::GetInflightFd => {
                let r: &raw::Inflight = exact(id, payload)?;
                let m = InflightMsg {
                    mmap_size: r.mmap_size.get(),
                    mmap_offset: r.mmap_offset.get(),
                    num_queues: r.num_queues.get(),
                    queue_size: r.queue_size.get(),
                };
                m.mmap_offset
                    .checked_add(m.mmap_size)
                    .ok_or(WireError::RangeOverflow)?;
                Reply::Inflight(m)
            }
            C::SetLogBase => match payload.len() {
                0 | 8 | 16 => Reply::LogBaseDone,
                _ => return Err(bad()),
            },
            C::SetMemTable if payload.len() != 8 => {
                Reply::MemTable(MemTable::parse(id, payload, opts.xen_mmap)?)
            }
            C::AddMemReg if payload.len() != 8 => {
                let each = if opts.xen_mmap {
                    raw::XenSingleMemRegion::SIZE
                } else {
                    raw::SingleMemRegion::SIZE
                };
                if payload.len() != each {
                    return Err(bad());
                }
                Reply::MemRegion(MemRegionMsg::parse_one(&payload[8..], opts.xen_mmap)?)
            }
            C::CreateCryptoSession => {
                if payload.len() < 16 {
                    return Err(bad());
                }
                Reply::CryptoSession(payload)
            }
            C::PostcopyAdvise => {
                if !payload.is_empty() {
                    return Err(bad());
                }
                Reply::PostcopyAdvise
            }
            C::SetDeviceStateFd => {
                let v = exact::<raw::Word>(id, payload)?.value.get();
                if v & !(0xff | DEVICE_STATE_NOFD) != 0 {
                    return Err(WireError::reserved_bits(v));
                }
                Reply::DeviceStateFd {
                    error: (v & 0xff) as u8,
                    no_fd: v & DEVICE_STATE_NOFD != 0,
                }
            }
            C::GetShmemConfig => Reply::ShmemConfig(exact(id, payload)?),
            C::GetSharedObject if payload.len() == raw::SharedObject::SIZE => {
                // libvhost-user echoes the UUID; that means success.
                Reply::U64(0)
            }
            _ => Reply::U64(exact::<raw::Word>(id, payload)?.value.get()),
        };
        reply.fd_rule(request).check(nfds)?;
        Ok(reply)
    }

    /// How many fds this reply to `request` must carry.
    pub fn fd_rule(&self, request: FrontendReq) -> FdRule {
        match self {
            Reply::Inflight(m) if m.mmap_size != 0 => FdRule::ONE,
            Reply::PostcopyAdvise => FdRule::ONE,
            Reply::DeviceStateFd { error: 0, no_fd } if !no_fd => FdRule::ONE,
            Reply::U64(0) if request == FrontendReq::GetSharedObject => FdRule::OPTIONAL,
            _ => FdRule::NONE,
        }
    }

    /// Encodes this reply to `request` into `out` with flags exactly
    /// `VERSION | REPLY`. Returns the message length.
    pub fn encode(&self, request: FrontendReq, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        match self {
            Reply::U64(v) => return Self::encode_u64(request, *v, out),
            Reply::VringState { index, num } => {
                return Self::encode_vring_state(request, *index, *num, out)
            }
            Reply::Config(c) => return Self::encode_config(request, Some(c), out),
            Reply::Inflight(m) => return Self::encode_inflight(request, m, out),
            Reply::ConfigFailed | Reply::PostcopyAdvise | Reply::LogBaseDone => {}
            Reply::MemTable(t) => t.write(&mut w)?,
            Reply::MemRegion(r) => {
                w.word(0)?;
                w.raw(&r.raw())?;
                if let Some((flags, domid)) = r.xen {
                    w.bytes(&flags.to_ne_bytes())?;
                    w.bytes(&domid.to_ne_bytes())?;
                }
            }
            Reply::CryptoSession(b) => w.bytes(b)?,
            Reply::DeviceStateFd { error, no_fd } => {
                w.word(u64::from(*error) | if *no_fd { DEVICE_STATE_NOFD } else { 0 })?
            }
            Reply::ShmemConfig(c) => w.raw(*c)?,
        }
        w.finish(Header::reply(request.id(), 0))
    }

    // The replies a back-end session sends, each on its own, so that a
    // back-end links none of the others' encoding.

    /// [`Reply::U64`]`(v)` to `request`.
    pub fn encode_u64(request: FrontendReq, v: u64, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        w.word(v)?;
        w.finish(Header::reply(request.id(), 0))
    }

    /// [`Reply::VringState`] to `request` (GET_VRING_BASE or message 45).
    pub fn encode_vring_state(
        request: FrontendReq,
        index: u32,
        num: u32,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        w.raw(&raw::VringState {
            index: index.into(),
            num: num.into(),
        })?;
        w.finish(Header::reply(request.id(), 0))
    }

    /// [`Reply::Config`] to `request` (GET_CONFIG), or
    /// [`Reply::ConfigFailed`] for `None`.
    pub fn encode_config(
        request: FrontendReq,
        c: Option<&ConfigMsg<'_>>,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        if let Some(c) = c {
            c.write(&mut w)?;
        }
        w.finish(Header::reply(request.id(), 0))
    }

    /// [`Reply::Inflight`] to `request` (GET_INFLIGHT_FD).
    pub fn encode_inflight(
        request: FrontendReq,
        m: &InflightMsg,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        w.raw(&m.raw())?;
        w.finish(Header::reply(request.id(), 0))
    }
}

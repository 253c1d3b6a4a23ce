//! The front-end engine: the handshake, start, stop and config reads,
//! every reply validated.
//!
//! The caller loops: `vhu_frontend_poll_transmit()` gives the next message
//! (and which fds to attach); when it awaits a reply, the caller reads one
//! message and hands it to `vhu_frontend_handle_reply()`; events
//! (`vhu_frontend_poll_event()`) say what happened. Commands
//! (`vhu_frontend_start()`, `vhu_frontend_stop()`, ...) queue a flow.
//! With BACKEND_REQ negotiated, each request the back-end sends on its
//! channel goes to `vhu_frontend_serve_backend()`, between any two of
//! these calls.

use core::mem::size_of;
use core::ptr;

use vhost_user_core::feature::{ProtocolFeatures, VirtioFeatures};
use vhost_user_core::frontend::{
    BackendNotice, Event, FdRef, Frontend, FrontendConfig, NotifyMode, QueueConfig, State,
};
use vhost_user_core::message::{DeviceStateDirection, MemRegionMsg, HEADER_SIZE};
use vhost_user_core::vring::RingAddrs;

use crate::backend::{vhu_ring_addrs, whole_message};
use crate::memory::vhu_mem_region;
use crate::result::vhu_result::{self, *};
use crate::result::{self, guard};
use crate::state::{self, Footprint, Kind};
use crate::versioned::{self, Readable, Versioned};

/// Most queues a front-end configures.
pub const VHU_FRONTEND_MAX_QUEUES: u32 = 16;
/// Most memory regions a front-end configures.
pub const VHU_FRONTEND_MAX_REGIONS: u32 = 8;
/// Bytes of a transmit buffer that holds any message the front-end sends.
pub const VHU_FRONTEND_MAX_TRANSMIT: u32 = 280;

/// Bytes of an ack buffer that holds any ack
/// `vhu_frontend_serve_backend()` writes (a header and a u64).
pub const VHU_FRONTEND_MAX_ACK: u32 = 20;

/// VHOST_USER_PROTOCOL_F_BACKEND_REQ: the front-end sends its end of the
/// back-end channel (SET_BACKEND_REQ_FD, `VHU_FD_BACKEND_CHANNEL`) and
/// serves the requests that come on it (`vhu_frontend_serve_backend()`).
pub const VHU_PROTOCOL_F_BACKEND_REQ: u64 = 1 << 5;
/// VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS: the back-end may signal
/// used buffers and ring errors as requests on the back-end channel
/// (`VHU_NOTICE_CALL`, `VHU_NOTICE_RING_ERROR`); needs BACKEND_REQ and
/// REPLY_ACK (negotiation drops it without them).
pub const VHU_PROTOCOL_F_INBAND_NOTIFICATIONS: u64 = 1 << 14;

const _: () = {
    assert!(VHU_FRONTEND_MAX_TRANSMIT as usize == vhost_user_core::frontend::MAX_TRANSMIT);
    assert!(VHU_FRONTEND_MAX_ACK as usize == HEADER_SIZE + size_of::<u64>());
    assert!(VHU_PROTOCOL_F_BACKEND_REQ == ProtocolFeatures::BACKEND_REQ.bits());
    assert!(VHU_PROTOCOL_F_INBAND_NOTIFICATIONS == ProtocolFeatures::INBAND_NOTIFICATIONS.bits());
};

type CFrontend =
    Frontend<{ VHU_FRONTEND_MAX_QUEUES as usize }, { VHU_FRONTEND_MAX_REGIONS as usize }>;
type CConfig =
    FrontendConfig<{ VHU_FRONTEND_MAX_QUEUES as usize }, { VHU_FRONTEND_MAX_REGIONS as usize }>;

/// A front-end engine (opaque; `vhu_frontend_size()` bytes aligned to
/// `vhu_frontend_align()`).
#[derive(Debug)]
pub struct vhu_frontend {
    _opaque: [u8; 0],
}

impl Kind for CFrontend {
    const TAG: u32 = 0x7668_7546;
}

/// One queue as the front-end sets it up.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_queue_config {
    /// Ring size (1 to 32768).
    pub size: u16,
    /// Ring addresses as SET_VRING_ADDR sends them: front-end virtual
    /// addresses.
    pub addrs: vhu_ring_addrs,
    /// The first SET_VRING_BASE.
    pub base: u32,
    /// Non-zero: no kick eventfd (the back-end polls the ring).
    pub kick_polling: u8,
    /// Non-zero: no call eventfd (the front-end polls the used ring).
    pub call_polling: u8,
}

/// What the front-end wants and has (`VHU_FRONTEND_CONFIG_INIT`, or
/// `.struct_size = sizeof(vhu_frontend_config)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_frontend_config {
    /// `sizeof(vhu_frontend_config)` (`VHU_ERR_ABI` for a size this
    /// library does not know).
    pub struct_size: usize,
    /// Virtio features wanted (include `VHU_F_PROTOCOL_FEATURES` to use
    /// protocol features at all).
    pub features: u64,
    /// Protocol features the front-end supports.
    pub protocol_features: u64,
    /// The queues, in ring index order (at most
    /// `VHU_FRONTEND_MAX_QUEUES`).
    pub queues: *const vhu_queue_config,
    /// Number of queues.
    pub num_queues: usize,
    /// Guest memory regions (at most `VHU_FRONTEND_MAX_REGIONS`);
    /// `VHU_FD_REGION` names an index of this list.
    pub regions: *const vhu_mem_region,
    /// Number of regions.
    pub num_regions: usize,
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct; every field is an integer or a raw pointer.
unsafe impl Versioned for vhu_frontend_config {
    const SIZES: &'static [usize] = &[size_of::<vhu_frontend_config>()];
}

// SAFETY: every field is an integer, a raw pointer or an optional
// function pointer.
unsafe impl Readable for vhu_frontend_config {
    const EMPTY: Self = vhu_frontend_config {
        struct_size: 0,
        features: 0,
        protocol_features: 0,
        queues: ptr::null(),
        num_queues: 0,
        regions: ptr::null(),
        num_regions: 0,
    };
}

impl Default for vhu_frontend_config {
    /// Nothing, at this version's size (`VHU_FRONTEND_CONFIG_INIT`).
    fn default() -> Self {
        vhu_frontend_config {
            struct_size: size_of::<vhu_frontend_config>(),
            ..vhu_frontend_config::EMPTY
        }
    }
}

/// Which fd to attach.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum vhu_fd_kind {
    /// The fd of memory region `index`.
    VHU_FD_REGION = 0,
    /// The kick eventfd of ring `index`.
    VHU_FD_KICK = 1,
    /// The call eventfd of ring `index`.
    VHU_FD_CALL = 2,
    /// The front-end's end of the back-end channel.
    VHU_FD_BACKEND_CHANNEL = 3,
    /// The inflight area's fd.
    VHU_FD_INFLIGHT = 4,
    /// The dirty log's shared memory (SET_LOG_BASE, after
    /// `vhu_frontend_start_logging()`): an fd of at least the size given
    /// there, zeroed, which the host keeps mapped to read the log.
    VHU_FD_LOG = 5,
    /// The back-end's end of the device state channel
    /// (SET_DEVICE_STATE_FD, after `vhu_frontend_transfer_state()`): a
    /// pipe end, the write end to save, the read end to load.
    VHU_FD_DEVICE_STATE = 6,
    /// An fd this version of the ABI does not name.
    VHU_FD_OTHER = 255,
}

/// An fd to attach to a message.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_fd_ref {
    /// Which fd.
    pub kind: vhu_fd_kind,
    /// Region or ring index.
    pub index: u16,
}

/// A message to send, written by `vhu_frontend_poll_transmit()`: start
/// from `VHU_TRANSMIT_INIT`, or `.struct_size = sizeof(vhu_transmit)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_transmit {
    /// `sizeof(vhu_transmit)`, set by the caller and kept by the library,
    /// which writes the fields it covers (`VHU_ERR_ABI`, and nothing
    /// written, for a size this library does not know).
    pub struct_size: usize,
    /// The request id.
    pub request: u32,
    /// Bytes of the buffer that form the message; 0: nothing to send now.
    pub len: usize,
    /// A reply must be read and handed to `vhu_frontend_handle_reply()`
    /// before anything else is sent.
    pub awaits_reply: bool,
    /// Number of fds to attach.
    pub nfds: u32,
    /// The fds, in order.
    pub fds: [vhu_fd_ref; 8],
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct.
unsafe impl Versioned for vhu_transmit {
    const SIZES: &'static [usize] = &[size_of::<vhu_transmit>()];
}

impl Default for vhu_transmit {
    /// Nothing to send, at this version's size.
    fn default() -> Self {
        vhu_transmit {
            struct_size: size_of::<vhu_transmit>(),
            request: 0,
            len: 0,
            awaits_reply: false,
            nfds: 0,
            fds: [vhu_fd_ref {
                kind: vhu_fd_kind::VHU_FD_OTHER,
                index: 0,
            }; 8],
        }
    }
}

/// What happened.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum vhu_event_kind {
    /// No event.
    VHU_EVENT_NONE = 0,
    /// The handshake is done: `features` and `protocol_features` are what
    /// was negotiated.
    VHU_EVENT_NEGOTIATED = 1,
    /// SET_VRING_KICK went out: write 1 to ring `queue`'s kick eventfd.
    VHU_EVENT_INJECT_KICK = 2,
    /// Ring `queue` is processed by the back-end.
    VHU_EVENT_RING_STARTED = 3,
    /// The start is complete.
    VHU_EVENT_STARTED = 4,
    /// Ring `queue` stopped at `base`.
    VHU_EVENT_RING_STOPPED = 5,
    /// Every ring is stopped.
    VHU_EVENT_STOPPED = 6,
    /// A memory change reached the back-end.
    VHU_EVENT_MEMORY_UPDATED = 7,
    /// GET_CONFIG answered `len` bytes at `offset` into `data`.
    VHU_EVENT_CONFIG = 8,
    /// GET_CONFIG of `len` bytes at `offset` failed.
    VHU_EVENT_CONFIG_FAILED = 9,
    /// Dirty logging is on at the back-end (`vhu_frontend_start_logging()`
    /// is done): from now on it marks every page it writes.
    VHU_EVENT_LOGGING_ON = 10,
    /// Dirty logging is off (`vhu_frontend_stop_logging()` is done): the
    /// log may be unmapped and closed.
    VHU_EVENT_LOGGING_OFF = 11,
    /// SET_DEVICE_STATE_FD was accepted: run the transfer now on the other
    /// end of the channel (save: read it to its end; load: write the state
    /// and close it), then `vhu_frontend_check_state()`.
    VHU_EVENT_STATE_TRANSFER = 12,
    /// As `VHU_EVENT_STATE_TRANSFER`, on the fd the back-end sent with its
    /// reply instead (the host took it from the reply).
    VHU_EVENT_STATE_TRANSFER_BACKEND_FD = 13,
    /// CHECK_DEVICE_STATE answered 0: the back-end saved or loaded the
    /// whole state.
    VHU_EVENT_STATE_CHECKED = 14,
    /// An event this version of the ABI does not name.
    VHU_EVENT_OTHER = 255,
}

/// An event (the fields its kind does not name are 0), written by
/// `vhu_frontend_poll_event()`: start from `VHU_EVENT_INIT`, or
/// `.struct_size = sizeof(vhu_event)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_event {
    /// `sizeof(vhu_event)`, set by the caller and kept by the library,
    /// which writes the fields it covers (`VHU_ERR_ABI`, and nothing
    /// written, for a size this library does not know).
    pub struct_size: usize,
    /// What happened.
    pub kind: vhu_event_kind,
    /// Ring index.
    pub queue: u16,
    /// RING_STOPPED: the base.
    pub base: u32,
    /// NEGOTIATED: virtio features.
    pub features: u64,
    /// NEGOTIATED: protocol features.
    pub protocol_features: u64,
    /// CONFIG, CONFIG_FAILED: offset.
    pub offset: u32,
    /// CONFIG, CONFIG_FAILED: length.
    pub len: u32,
    /// CONFIG: the bytes.
    pub data: [u8; 256],
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct.
unsafe impl Versioned for vhu_event {
    const SIZES: &'static [usize] = &[size_of::<vhu_event>()];
}

impl Default for vhu_event {
    /// No event (`VHU_EVENT_NONE`), at this version's size
    /// (`VHU_EVENT_INIT`).
    fn default() -> Self {
        vhu_event {
            struct_size: size_of::<vhu_event>(),
            kind: vhu_event_kind::VHU_EVENT_NONE,
            queue: 0,
            base: 0,
            features: 0,
            protocol_features: 0,
            offset: 0,
            len: 0,
            data: [0; 256],
        }
    }
}

/// Where the front-end is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum vhu_frontend_state {
    /// The handshake runs.
    VHU_FRONTEND_INITIALIZING = 0,
    /// Negotiated; never started.
    VHU_FRONTEND_READY = 1,
    /// The start runs.
    VHU_FRONTEND_STARTING = 2,
    /// Every ring runs.
    VHU_FRONTEND_STARTED = 3,
    /// The stop runs.
    VHU_FRONTEND_STOPPING = 4,
    /// Every ring is stopped.
    VHU_FRONTEND_STOPPED = 5,
    /// A reply was refused: close the connection.
    VHU_FRONTEND_FAILED = 6,
}

/// What a request on the back-end channel said.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum vhu_notice_kind {
    /// Nothing (what an error leaves).
    VHU_NOTICE_NONE = 0,
    /// BACKEND_CONFIG_CHANGE_MSG (CONFIG negotiated): the device's config
    /// space changed; read it again (`vhu_frontend_read_config()`) and
    /// tell the driver.
    VHU_NOTICE_CONFIG_CHANGED = 1,
    /// In-band BACKEND_VRING_CALL (INBAND_NOTIFICATIONS negotiated): ring
    /// `queue` has used buffers, as a write to its call eventfd would say.
    VHU_NOTICE_CALL = 2,
    /// In-band BACKEND_VRING_ERR (INBAND_NOTIFICATIONS negotiated): ring
    /// `queue` broke on guest input and stopped.
    VHU_NOTICE_RING_ERROR = 3,
    /// A well-formed request this front-end does not serve (its feature
    /// not negotiated, or not implemented: IOTLB, host notifiers, shared
    /// objects, shared memory); `request` is its code, and the ack, if
    /// one was asked, says it failed.
    VHU_NOTICE_REFUSED = 4,
    /// A notice this version of the ABI does not name.
    VHU_NOTICE_OTHER = 255,
}

/// What `vhu_frontend_serve_backend()` made of one back-end request
/// (start from `VHU_BACKEND_NOTICE_INIT`, or `.struct_size =
/// sizeof(vhu_backend_notice)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_backend_notice {
    /// `sizeof(vhu_backend_notice)`, set by the caller and kept by the library,
    /// which writes the fields it covers (`VHU_ERR_ABI`, and nothing
    /// written, for a size this library does not know).
    pub struct_size: usize,
    /// What the request said.
    pub kind: vhu_notice_kind,
    /// CALL, RING_ERROR: the ring index (below the configured queues).
    pub queue: u16,
    /// The request's code (BACKEND_CONFIG_CHANGE_MSG is 2,
    /// BACKEND_VRING_CALL 4, BACKEND_VRING_ERR 5, ...).
    pub request: u32,
    /// Bytes of the ack buffer to send back on the channel (the ack the
    /// back-end asked for with NEED_REPLY, REPLY_ACK negotiated); 0: send
    /// nothing.
    pub ack_len: usize,
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct.
unsafe impl Versioned for vhu_backend_notice {
    const SIZES: &'static [usize] = &[size_of::<vhu_backend_notice>()];
}

impl Default for vhu_backend_notice {
    /// Nothing (`VHU_NOTICE_NONE`), at this version's size
    /// (`VHU_BACKEND_NOTICE_INIT`).
    fn default() -> Self {
        vhu_backend_notice {
            struct_size: size_of::<vhu_backend_notice>(),
            kind: vhu_notice_kind::VHU_NOTICE_NONE,
            queue: 0,
            request: 0,
            ack_len: 0,
        }
    }
}

/// Bytes of a front-end's storage.
#[no_mangle]
pub extern "C" fn vhu_frontend_size() -> usize {
    state::size::<CFrontend>()
}

/// Alignment of a front-end's storage.
#[no_mangle]
pub extern "C" fn vhu_frontend_align() -> usize {
    state::align::<CFrontend>()
}

/// Initialises a front-end in `storage` (`size` bytes) with `config`;
/// the handshake is queued (the first `vhu_frontend_poll_transmit()`
/// gives GET_FEATURES). `VHU_ERR_INVALID` for more queues or regions than
/// fit, an invalid ring size or overlapping regions;
/// `VHU_ERR_UNSUPPORTED` for protocol features the engine does not
/// implement.
///
/// # Safety
///
/// `storage` points at `size` writable bytes; `config` at a readable
/// `vhu_frontend_config` of its `struct_size` whose arrays hold their counts of entries.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_init(
    storage: *mut vhu_frontend,
    size: usize,
    config: *const vhu_frontend_config,
) -> vhu_result {
    guard(|| {
        state::storage::<CFrontend, _>(storage, size, vhu_frontend_size())?;
        let mut fp = Footprint::new();
        fp.writes(storage.cast::<u8>(), vhu_frontend_size())?;
        // SAFETY: the caller's contract.
        let c = unsafe { versioned::read(config, &mut fp) }?;
        fp.reads(c.queues, c.num_queues)?;
        fp.reads(c.regions, c.num_regions)?;
        // SAFETY: the caller's contract.
        let queues = unsafe { state::slice(c.queues, c.num_queues) }?;
        // SAFETY: the caller's contract.
        let regions = unsafe { state::slice(c.regions, c.num_regions) }?;
        let mut cfg = CConfig::new(
            VirtioFeatures::from_bits_retain(c.features),
            ProtocolFeatures::from_bits_retain(c.protocol_features),
        );
        let mode = |polling: u8| {
            if polling != 0 {
                NotifyMode::Polling
            } else {
                NotifyMode::Eventfd
            }
        };
        for q in queues {
            cfg.queues
                .push(QueueConfig {
                    size: q.size,
                    addrs: RingAddrs::from(q.addrs),
                    base: q.base,
                    kick: mode(q.kick_polling),
                    call: mode(q.call_polling),
                })
                .map_err(|_| VHU_ERR_INVALID)?;
        }
        for r in regions {
            cfg.regions
                .push(MemRegionMsg {
                    guest_addr: r.guest_addr,
                    size: r.size,
                    user_addr: r.user_addr,
                    mmap_offset: r.mmap_offset,
                    xen: None,
                })
                .map_err(|_| VHU_ERR_INVALID)?;
        }
        let fe = CFrontend::new(cfg).map_err(result::frontend)?;
        // SAFETY: `storage` was checked; the caller's contract makes it
        // writable.
        unsafe { state::init(storage, size, vhu_frontend_size(), fe) }
    })
}

fn fd_ref(f: FdRef) -> vhu_fd_ref {
    let (kind, index) = match f {
        FdRef::Region(i) => (vhu_fd_kind::VHU_FD_REGION, i),
        FdRef::Kick(i) => (vhu_fd_kind::VHU_FD_KICK, i),
        FdRef::Call(i) => (vhu_fd_kind::VHU_FD_CALL, i),
        FdRef::BackendChannel => (vhu_fd_kind::VHU_FD_BACKEND_CHANNEL, 0),
        FdRef::Inflight => (vhu_fd_kind::VHU_FD_INFLIGHT, 0),
        FdRef::Log => (vhu_fd_kind::VHU_FD_LOG, 0),
        FdRef::DeviceState => (vhu_fd_kind::VHU_FD_DEVICE_STATE, 0),
        #[allow(unreachable_patterns)]
        _ => (vhu_fd_kind::VHU_FD_OTHER, 0),
    };
    vhu_fd_ref { kind, index }
}

/// Writes the next message into `buf` (`cap` bytes;
/// `VHU_FRONTEND_MAX_TRANSMIT` always suffice) and says how to send it in
/// `*tx`; `tx->len` 0: nothing to send now (a reply is awaited, no flow
/// runs, or events wait to be polled). `*tx` is written at the
/// `struct_size` it holds (`VHU_TRANSMIT_INIT`; `VHU_ERR_ABI`, and
/// nothing written, for a size this library does not know).
///
/// # Safety
///
/// `fe` points at an initialised front-end; `buf` at `cap` writable bytes;
/// `tx` at a writable `vhu_transmit` of its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_poll_transmit(
    fe: *mut vhu_frontend,
    buf: *mut u8,
    cap: usize,
    tx: *mut vhu_transmit,
) -> vhu_result {
    guard(|| {
        let mut t = vhu_transmit::default();
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<CFrontend, _>(fe) }?;
        fp.writes(buf, cap)?;
        // SAFETY: the caller's contract.
        let tx = unsafe { versioned::out(tx, &mut fp) }?;
        tx.put(t);
        // SAFETY: the caller's contract.
        let mut f = unsafe { state::get::<CFrontend, _>(fe) }?;
        // SAFETY: the caller's contract.
        let out = unsafe { state::bytes_mut(buf, cap) }?;
        if let Some(m) = f.poll_transmit(out).map_err(result::frontend)? {
            t.request = m.request.id();
            t.len = m.len;
            t.awaits_reply = m.awaits_reply;
            for (slot, r) in t.fds.iter_mut().zip(m.fds.iter()) {
                *slot = fd_ref(*r);
                t.nfds += 1;
            }
        }
        tx.put(t);
        Ok(())
    })
}

/// Takes the reply to the message in flight: `len` bytes at `msg` (header
/// and payload) that came with `nfds` fds (the caller closes them). Every
/// error of the reply's is fatal: the connection must end (the engine
/// fails on each it sees; a header that does not parse is `VHU_ERR_WIRE`
/// before it does), but for `VHU_ERR_NACK` to SET_DEVICE_STATE_FD or
/// CHECK_DEVICE_STATE (the device state did not move), after which the
/// engine goes on (since ABI 1.2). A `len` that is not exactly one
/// message is the caller's framing, refused before the engine sees it
/// (nothing changes: the reply given exactly is taken):
/// `VHU_ERR_SHORT_BUFFER` for fewer bytes than the header announces,
/// `VHU_ERR_INVALID` for more (another message's, which would be lost).
///
/// # Safety
///
/// `fe` points at an initialised front-end; `msg` at `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_handle_reply(
    fe: *mut vhu_frontend,
    msg: *const u8,
    len: usize,
    nfds: usize,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<CFrontend, _>(fe) }?;
        fp.reads(msg, len)?;
        // SAFETY: the caller's contract.
        let mut f = unsafe { state::get::<CFrontend, _>(fe) }?;
        // SAFETY: the caller's contract.
        let msg = unsafe { state::slice(msg, len) }?;
        let (header, payload) = whole_message(msg)?;
        f.handle_reply(&header, payload, nfds)
            .map_err(result::frontend)
    })
}

/// The next event into `*ev` (`ev->kind` `VHU_EVENT_NONE`: none), at the
/// `struct_size` it holds (`VHU_EVENT_INIT`; `VHU_ERR_ABI`, and nothing
/// written, for a size this library does not know). Drain events after
/// every transmit and reply.
///
/// # Safety
///
/// `fe` points at an initialised front-end; `ev` at a writable
/// `vhu_event` of its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_poll_event(
    fe: *mut vhu_frontend,
    ev: *mut vhu_event,
) -> vhu_result {
    guard(|| {
        let mut e = vhu_event::default();
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<CFrontend, _>(fe) }?;
        // SAFETY: the caller's contract.
        let ev = unsafe { versioned::out(ev, &mut fp) }?;
        ev.put(e);
        // SAFETY: the caller's contract.
        let mut f = unsafe { state::get::<CFrontend, _>(fe) }?;
        #[allow(unreachable_patterns)]
        match f.poll_event() {
            None => {}
            Some(Event::Negotiated {
                features,
                protocol_features,
            }) => {
                e.kind = vhu_event_kind::VHU_EVENT_NEGOTIATED;
                e.features = features.bits();
                e.protocol_features = protocol_features.bits();
            }
            Some(Event::InjectKick(q)) => {
                e.kind = vhu_event_kind::VHU_EVENT_INJECT_KICK;
                e.queue = q;
            }
            Some(Event::RingStarted(q)) => {
                e.kind = vhu_event_kind::VHU_EVENT_RING_STARTED;
                e.queue = q;
            }
            Some(Event::Started) => e.kind = vhu_event_kind::VHU_EVENT_STARTED,
            Some(Event::RingStopped { queue, base }) => {
                e.kind = vhu_event_kind::VHU_EVENT_RING_STOPPED;
                e.queue = queue;
                e.base = base;
            }
            Some(Event::Stopped) => e.kind = vhu_event_kind::VHU_EVENT_STOPPED,
            Some(Event::MemoryUpdated) => e.kind = vhu_event_kind::VHU_EVENT_MEMORY_UPDATED,
            Some(Event::Config { offset, data }) => {
                e.kind = vhu_event_kind::VHU_EVENT_CONFIG;
                e.offset = offset;
                e.len = data.len() as u32;
                for (d, s) in e.data.iter_mut().zip(data.iter()) {
                    *d = *s;
                }
            }
            Some(Event::ConfigFailed { offset, len }) => {
                e.kind = vhu_event_kind::VHU_EVENT_CONFIG_FAILED;
                e.offset = offset;
                e.len = len;
            }
            Some(Event::StateTransfer { backend_fd, .. }) => {
                e.kind = if backend_fd {
                    vhu_event_kind::VHU_EVENT_STATE_TRANSFER_BACKEND_FD
                } else {
                    vhu_event_kind::VHU_EVENT_STATE_TRANSFER
                };
            }
            Some(Event::StateChecked) => e.kind = vhu_event_kind::VHU_EVENT_STATE_CHECKED,
            Some(Event::Logging(true)) => e.kind = vhu_event_kind::VHU_EVENT_LOGGING_ON,
            Some(Event::Logging(false)) => e.kind = vhu_event_kind::VHU_EVENT_LOGGING_OFF,
            Some(_) => e.kind = vhu_event_kind::VHU_EVENT_OTHER,
        }
        ev.put(e);
        Ok(())
    })
}

/// Serves one request the back-end sent on the back-end channel: `len`
/// bytes at `msg` (header and payload, one whole message: read the header,
/// then the rest `vhu_message_size()` gives) that came with `nfds` fds
/// (the caller closes them: no request served takes one). `*out` says
/// what the back-end said; an ack asked for (NEED_REPLY, with REPLY_ACK
/// negotiated) is written into `ack` (`ack_cap` bytes;
/// `VHU_FRONTEND_MAX_ACK` always suffice) and `out->ack_len` is its
/// length: a reply header (flags: version 1 and REPLY) and a u64, 0 for a
/// request served and 1 for one refused. Nothing of the engine changes:
/// call it between any two calls on the engine, on the thread that uses
/// it.
///
/// Only once the handshake is done (`VHU_EVENT_NEGOTIATED` was queued):
/// `VHU_ERR_BUSY` before (leave the request on the channel until then),
/// `VHU_ERR_NOT_NEGOTIATED` if BACKEND_REQ was not negotiated (no channel
/// was sent), `VHU_ERR_FAILED` after the engine failed. A malformed
/// request (a bad header, flags, payload size, fd count or ring index)
/// is `VHU_ERR_WIRE`: the back-end misbehaves, close the channel.
/// `VHU_ERR_SHORT_BUFFER` for `len` below `VHU_HEADER_SIZE`, or below the
/// size the header announces, or an ack that does not fit `ack_cap`;
/// `VHU_ERR_INVALID` for `len` beyond the announced size (bytes of
/// another message), for `msg`, `ack` or `out` sharing a byte with the
/// engine, and for `ack` or `out` sharing one with another buffer of the
/// call. `*out` is written at the `struct_size` it holds
/// (`VHU_BACKEND_NOTICE_INIT`; `VHU_ERR_ABI`, and nothing written, for a
/// size this library does not know). Once `out` is checked, an error
/// leaves it `VHU_NOTICE_NONE` with `ack_len` 0, and nothing is to be
/// sent.
///
/// # Safety
///
/// `fe` points at an initialised front-end; `msg` at `len` readable
/// bytes; `ack` at `ack_cap` writable bytes; `out` at a writable
/// `vhu_backend_notice` of its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_serve_backend(
    fe: *mut vhu_frontend,
    msg: *const u8,
    len: usize,
    nfds: usize,
    ack: *mut u8,
    ack_cap: usize,
    out: *mut vhu_backend_notice,
) -> vhu_result {
    guard(|| {
        let mut n = vhu_backend_notice::default();
        // The request is read while the ack is written: each has its own
        // bytes, apart from the engine's.
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<CFrontend, _>(fe) }?;
        fp.reads(msg, len)?;
        fp.writes(ack, ack_cap)?;
        // SAFETY: the caller's contract.
        let out = unsafe { versioned::out(out, &mut fp) }?;
        out.put(n);
        // SAFETY: the caller's contract.
        let f = unsafe { state::get::<CFrontend, _>(fe) }?;
        // SAFETY: the caller's contract.
        let msg = unsafe { state::slice(msg, len) }?;
        // SAFETY: the caller's contract; apart from everything else the
        // call uses (claimed).
        let ack = unsafe { state::bytes_mut(ack, ack_cap) }?;
        match f.state() {
            State::Initializing => return Err(VHU_ERR_BUSY),
            State::Failed => return Err(VHU_ERR_FAILED),
            _ => {}
        }
        if !f
            .protocol_features()
            .contains(ProtocolFeatures::BACKEND_REQ)
        {
            return Err(VHU_ERR_NOT_NEGOTIATED);
        }
        let (header, payload) = whole_message(msg)?;
        let served = f
            .backend_server()
            .serve(&header, payload, nfds, ack)
            .map_err(result::frontend)?;
        n.request = header.request;
        #[allow(unreachable_patterns)]
        match served.notice {
            BackendNotice::ConfigChanged => n.kind = vhu_notice_kind::VHU_NOTICE_CONFIG_CHANGED,
            BackendNotice::Call(q) => {
                n.kind = vhu_notice_kind::VHU_NOTICE_CALL;
                n.queue = q;
            }
            BackendNotice::RingError(q) => {
                n.kind = vhu_notice_kind::VHU_NOTICE_RING_ERROR;
                n.queue = q;
            }
            BackendNotice::Refused(_) => n.kind = vhu_notice_kind::VHU_NOTICE_REFUSED,
            _ => n.kind = vhu_notice_kind::VHU_NOTICE_OTHER,
        }
        n.ack_len = served.reply.unwrap_or(0);
        out.put(n);
        Ok(())
    })
}

/// Runs `f` on the front-end at `fe`.
///
/// # Safety
///
/// `fe` is NULL or points at an initialised front-end.
unsafe fn command(
    fe: *mut vhu_frontend,
    f: impl FnOnce(&mut CFrontend) -> Result<(), vhost_user_core::frontend::FrontendError>,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<CFrontend, _>(fe) }?;
        // SAFETY: the caller's contract.
        let mut fe = unsafe { state::get::<CFrontend, _>(fe) }?;
        f(&mut fe).map_err(result::frontend)
    })
}

/// Starts (or restarts after a stop) the device; `VHU_EVENT_STARTED` ends
/// it. `VHU_ERR_BUSY` unless ready or stopped with no flow running.
///
/// # Safety
///
/// `fe` points at an initialised front-end.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_start(fe: *mut vhu_frontend) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe { command(fe, |f| f.start()) }
}

/// Stops every ring, draining their requests; `VHU_EVENT_STOPPED` ends
/// it.
///
/// # Safety
///
/// `fe` points at an initialised front-end.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_stop(fe: *mut vhu_frontend) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe { command(fe, |f| f.stop()) }
}

/// Stops every ring without waiting for the requests in flight (they
/// stay recorded in the inflight area). Needs GET_VRING_BASE_INFLIGHT and
/// an inflight area.
///
/// # Safety
///
/// `fe` points at an initialised front-end.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_stop_suspending(fe: *mut vhu_frontend) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe { command(fe, |f| f.stop_suspending()) }
}

/// Reads `len` bytes of config space at `offset`; `VHU_EVENT_CONFIG`
/// answers.
///
/// # Safety
///
/// `fe` points at an initialised front-end.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_read_config(
    fe: *mut vhu_frontend,
    offset: u32,
    len: u32,
) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe { command(fe, |f| f.read_config(offset, len)) }
}

/// Switches dirty logging on for a migration: SET_LOG_BASE with a log of
/// `size` bytes (its fd is `VHU_FD_LOG`: shared memory the host created,
/// zeroed, and keeps mapped), SET_FEATURES with VHOST_F_LOG_ALL and, while
/// started, SET_VRING_ADDR with VHOST_VRING_F_LOG for every ring (a ring
/// started later gets it too); `VHU_EVENT_LOGGING_ON` ends it. The host
/// reads and clears the bitmap (one bit per 4 KiB page of guest physical
/// memory: `vhu_log_bitmap_size()` of the memory's end is the least
/// `size`) with atomic exchanges: the back-end sets bits concurrently.
/// Allowed started or stopped with no flow running (`VHU_ERR_BUSY`, also
/// when logging is on already); `VHU_ERR_UNSUPPORTED` if the back-end did
/// not offer VHOST_F_LOG_ALL, `VHU_ERR_NOT_NEGOTIATED` without LOG_SHMFD,
/// `VHU_ERR_INVALID` for a log that does not cover the memory regions or
/// without any.
///
/// # Safety
///
/// `fe` points at an initialised front-end.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_start_logging(
    fe: *mut vhu_frontend,
    size: u64,
) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe { command(fe, |f| f.start_logging(size)) }
}

/// Moves the device's state (DEVICE_STATE negotiated, the device
/// suspended: ready, or stopped): SET_DEVICE_STATE_FD with the back-end's
/// end of a pipe the host made (`VHU_FD_DEVICE_STATE`), to save the state
/// into (`save`, the write end) or load it from (the read end);
/// `VHU_EVENT_STATE_TRANSFER` (or `_BACKEND_FD`) says to run the transfer
/// on the other end, then `vhu_frontend_check_state()`. A refusal is
/// `VHU_ERR_NACK` from `vhu_frontend_handle_reply()`, and the engine goes
/// on as it was (since ABI 1.2; 1.1 failed it): a source may start its
/// device again, a destination try another state.
/// `VHU_ERR_NOT_NEGOTIATED` without DEVICE_STATE, `VHU_ERR_BUSY` in
/// another state or while another flow runs.
///
/// # Safety
///
/// `fe` points at an initialised front-end.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_transfer_state(
    fe: *mut vhu_frontend,
    save: bool,
) -> vhu_result {
    let direction = if save {
        DeviceStateDirection::Save
    } else {
        DeviceStateDirection::Load
    };
    // SAFETY: the caller's contract.
    unsafe { command(fe, |f| f.transfer_state(direction)) }
}

/// CHECK_DEVICE_STATE, once the transfer's channel was read to its end
/// (save) or written and closed (load): `VHU_EVENT_STATE_CHECKED` when
/// the back-end saved or loaded the whole state; its failure is
/// `VHU_ERR_NACK` from `vhu_frontend_handle_reply()`, and the engine goes
/// on (as for a refused `vhu_frontend_transfer_state()`, whose states
/// allowed are this one's too).
///
/// # Safety
///
/// `fe` points at an initialised front-end.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_check_state(fe: *mut vhu_frontend) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe { command(fe, |f| f.check_state()) }
}

/// Switches dirty logging off: SET_FEATURES without VHOST_F_LOG_ALL and,
/// while started, SET_VRING_ADDR without VHOST_VRING_F_LOG for every ring;
/// `VHU_EVENT_LOGGING_OFF` ends it. `VHU_ERR_BUSY` unless logging, started
/// or stopped, with no flow running.
///
/// # Safety
///
/// `fe` points at an initialised front-end.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_stop_logging(fe: *mut vhu_frontend) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe { command(fe, |f| f.stop_logging()) }
}

/// The front-end's state, and whether a reply is awaited.
///
/// # Safety
///
/// `fe` points at an initialised front-end; `state_out` at a writable
/// `vhu_frontend_state`; `awaits_reply` is NULL or points at a writable
/// `bool`.
#[no_mangle]
pub unsafe extern "C" fn vhu_frontend_get_state(
    fe: *mut vhu_frontend,
    state_out: *mut vhu_frontend_state,
    awaits_reply: *mut bool,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<CFrontend, _>(fe) }?;
        fp.writes(state_out, 1)?;
        fp.writes(awaits_reply, 1)?;
        // SAFETY: the caller's contract.
        let f = unsafe { state::get::<CFrontend, _>(fe) }?;
        use vhu_frontend_state::*;
        let s = match f.state() {
            State::Initializing => VHU_FRONTEND_INITIALIZING,
            State::Ready => VHU_FRONTEND_READY,
            State::Starting => VHU_FRONTEND_STARTING,
            State::Started => VHU_FRONTEND_STARTED,
            State::Stopping => VHU_FRONTEND_STOPPING,
            State::Stopped => VHU_FRONTEND_STOPPED,
            State::Failed => VHU_FRONTEND_FAILED,
        };
        // SAFETY: the caller's contract.
        unsafe { state::put(state_out, s) }?;
        if !awaits_reply.is_null() {
            // SAFETY: the caller's contract.
            unsafe { state::put(awaits_reply, f.awaits_reply()) }?;
        }
        Ok(())
    })
}

//! The back-end session: one front-end message per
//! [`vhu_backend_handle`] call, its reply written into the caller's
//! buffer, and the actions the caller carries out read one by one with
//! [`vhu_backend_action`].
//!
//! The caller reads a message and its fds from its channel, hands the
//! bytes and the fd count to `vhu_backend_handle`, carries out each action
//! in order with the message's fds (map a region, install an eventfd,
//! start a ring with [`vhu_backend_start_ring`], ...), closes the fds no
//! action took, and sends the reply. A `VHU_REPLY_PENDING` reply
//! (GET_VRING_BASE on a running ring) is sent once the ring has stopped:
//! [`vhu_dataplane_stop`](crate::dataplane::vhu_dataplane_stop) until it
//! answers stopped, then [`vhu_backend_finish_stop`] for the reply bytes.

use core::ffi::c_void;
use core::mem::{offset_of, size_of};
use core::ptr;

use vhost_user_core::backend::{
    Action, BackendConfig, Outcome, Reply, Session, MAX_ACTIONS, SUPPORTED_PROTOCOL_FEATURES,
};
use vhost_user_core::dataplane::Token;
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::{ProtocolFeatures, VirtioFeatures};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{
    ConfigWriteKind, DeviceStateDirection, Header, HEADER_SIZE, MAX_FDS, MAX_MESSAGE,
};
use vhost_user_core::vring::{Chain, RingAddrs};

use crate::dataplane::{self, vhu_dataplane};
use crate::memory::{vhu_mem, vhu_mem_region, Mem};
use crate::result::vhu_result::{self, *};
use crate::result::{self, guard};
use crate::state::{self, Footprint, Kind, Lend};
use crate::versioned::{self, Readable, Versioned};

/// Most queues a back-end session has.
pub const VHU_MAX_QUEUES: u16 = 16;
/// Memory slots of a back-end session (GET_MAX_MEM_SLOTS answers this):
/// the slot of `VHU_ACTION_MAP_REGION` is below it.
pub const VHU_MAX_REGIONS: u16 = 32;
/// Most actions one message produces.
pub const VHU_MAX_ACTIONS: u32 = 12;
/// Most fds one message carries.
pub const VHU_MAX_FDS: u32 = 8;
/// Bytes of the largest message (header and payload): a receive buffer
/// of this size holds any message, and a reply buffer of this size any
/// reply.
pub const VHU_MAX_MESSAGE: u32 = 4108;
/// Bytes of a message header.
pub const VHU_HEADER_SIZE: u32 = 12;

/// VIRTIO_RING_F_INDIRECT_DESC.
pub const VHU_VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const VHU_VIRTIO_F_EVENT_IDX: u64 = 1 << 29;
/// VHOST_F_LOG_ALL: device writes into guest memory are marked in the
/// dirty log while it is negotiated (`VHU_ACTION_SET_LOGGING`); offered
/// only with `VHU_PROTOCOL_F_LOG_SHMFD`, by a library built with its
/// `migration` feature (the default).
pub const VHU_F_LOG_ALL: u64 = 1 << 26;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const VHU_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VIRTIO_F_VERSION_1.
pub const VHU_VIRTIO_F_VERSION_1: u64 = 0x0001_0000_0000;
/// VIRTIO_F_RING_PACKED.
pub const VHU_VIRTIO_F_RING_PACKED: u64 = 0x0004_0000_0000;
/// VIRTIO_F_IN_ORDER: the data plane publishes completions in the order
/// the chains were popped (holding those that come early). Carried by a
/// library built with its `in-order` feature (the default; see
/// `vhu_backend_supported_features()`).
pub const VHU_VIRTIO_F_IN_ORDER: u64 = 0x0008_0000_0000;

/// VHOST_USER_PROTOCOL_F_MQ.
pub const VHU_PROTOCOL_F_MQ: u64 = 1 << 0;
/// VHOST_USER_PROTOCOL_F_LOG_SHMFD: SET_LOG_BASE shares the dirty log
/// (`VHU_ACTION_MAP_LOG`). Carried by a library built with its
/// `migration` feature (the default).
pub const VHU_PROTOCOL_F_LOG_SHMFD: u64 = 1 << 1;
/// VHOST_USER_PROTOCOL_F_RARP: SEND_RARP reaches `vhu_device.send_rarp`
/// (offered only with that callback).
pub const VHU_PROTOCOL_F_RARP: u64 = 1 << 2;
/// VHOST_USER_PROTOCOL_F_REPLY_ACK.
pub const VHU_PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
/// VHOST_USER_PROTOCOL_F_MTU: NET_SET_MTU reaches `vhu_device.set_mtu`
/// (offered only with that callback).
pub const VHU_PROTOCOL_F_MTU: u64 = 1 << 4;
/// VHOST_USER_PROTOCOL_F_CONFIG.
pub const VHU_PROTOCOL_F_CONFIG: u64 = 1 << 9;
/// VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD.
pub const VHU_PROTOCOL_F_INFLIGHT_SHMFD: u64 = 1 << 12;
/// VHOST_USER_PROTOCOL_F_RESET_DEVICE.
pub const VHU_PROTOCOL_F_RESET_DEVICE: u64 = 1 << 13;
/// VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS.
pub const VHU_PROTOCOL_F_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
/// VHOST_USER_PROTOCOL_F_STATUS.
pub const VHU_PROTOCOL_F_STATUS: u64 = 1 << 16;
/// VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT.
pub const VHU_PROTOCOL_F_GET_VRING_BASE_INFLIGHT: u64 = 1 << 20;
/// VHOST_USER_PROTOCOL_F_DEVICE_STATE: SET_DEVICE_STATE_FD and
/// CHECK_DEVICE_STATE move the device's state through a pipe
/// (`VHU_ACTION_TRANSFER_STATE`). Carried by a library built with its
/// `migration` feature (the default).
pub const VHU_PROTOCOL_F_DEVICE_STATE: u64 = 1 << 19;

// The header's literals (cbindgen writes literals only) are the core's.
const _: () = {
    assert!(VHU_MAX_ACTIONS as usize == MAX_ACTIONS);
    assert!(VHU_MAX_FDS as usize == MAX_FDS);
    assert!(VHU_MAX_MESSAGE as usize == MAX_MESSAGE);
    assert!(VHU_HEADER_SIZE as usize == HEADER_SIZE);
    assert!(VHU_VIRTIO_F_INDIRECT_DESC == VirtioFeatures::INDIRECT_DESC.bits());
    assert!(VHU_VIRTIO_F_EVENT_IDX == VirtioFeatures::EVENT_IDX.bits());
    assert!(VHU_F_PROTOCOL_FEATURES == VirtioFeatures::PROTOCOL_FEATURES.bits());
    assert!(VHU_F_LOG_ALL == VirtioFeatures::LOG_ALL.bits());
    assert!(VHU_PROTOCOL_F_LOG_SHMFD == ProtocolFeatures::LOG_SHMFD.bits());
    assert!(VHU_PROTOCOL_F_DEVICE_STATE == ProtocolFeatures::DEVICE_STATE.bits());
    assert!(VHU_VIRTIO_F_VERSION_1 == VirtioFeatures::VERSION_1.bits());
    assert!(VHU_VIRTIO_F_RING_PACKED == VirtioFeatures::RING_PACKED.bits());
    assert!(VHU_VIRTIO_F_IN_ORDER == VirtioFeatures::IN_ORDER.bits());
    assert!(VHU_PROTOCOL_F_MQ == ProtocolFeatures::MQ.bits());
    assert!(VHU_PROTOCOL_F_RARP == ProtocolFeatures::RARP.bits());
    assert!(VHU_PROTOCOL_F_REPLY_ACK == ProtocolFeatures::REPLY_ACK.bits());
    assert!(VHU_PROTOCOL_F_MTU == ProtocolFeatures::MTU.bits());
    assert!(VHU_PROTOCOL_F_CONFIG == ProtocolFeatures::CONFIG.bits());
    assert!(VHU_PROTOCOL_F_INFLIGHT_SHMFD == ProtocolFeatures::INFLIGHT_SHMFD.bits());
    assert!(VHU_PROTOCOL_F_RESET_DEVICE == ProtocolFeatures::RESET_DEVICE.bits());
    assert!(VHU_PROTOCOL_F_CONFIGURE_MEM_SLOTS == ProtocolFeatures::CONFIGURE_MEM_SLOTS.bits());
    assert!(VHU_PROTOCOL_F_STATUS == ProtocolFeatures::STATUS.bits());
    assert!(
        VHU_PROTOCOL_F_GET_VRING_BASE_INFLIGHT == ProtocolFeatures::GET_VRING_BASE_INFLIGHT.bits()
    );
};

/// The session of the C ABI.
type CSession = Session<{ VHU_MAX_QUEUES as usize }, { VHU_MAX_REGIONS as usize }>;

/// A back-end session (opaque; `vhu_backend_size()` bytes aligned to
/// `vhu_backend_align()`, initialised by `vhu_backend_init()`).
#[derive(Debug)]
pub struct vhu_backend {
    _opaque: [u8; 0],
}

#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) session: CSession,
    outcome: Outcome,
}

impl Kind for Backend {
    const TAG: u32 = 0x7668_7542;
}

/// What a back-end offers and how big it is (`VHU_BACKEND_CONFIG_INIT`,
/// or `.struct_size = sizeof(vhu_backend_config)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_backend_config {
    /// `sizeof(vhu_backend_config)` (`VHU_ERR_ABI` for a size this
    /// library does not know).
    pub struct_size: usize,
    /// Virtio features offered: device bits, ring bits
    /// (`VHU_VIRTIO_F_*`), and `VHU_F_PROTOCOL_FEATURES` when protocol
    /// features are offered.
    pub features: u64,
    /// Protocol features offered (`VHU_PROTOCOL_F_*`), a subset of
    /// `vhu_backend_supported_protocol_features()`.
    pub protocol_features: u64,
    /// Queues of the device (1 to `VHU_MAX_QUEUES`).
    pub num_queues: u16,
    /// Largest ring size a front-end may set (1 to 32768).
    pub max_queue_size: u16,
}

/// A device's control path, as callbacks (every one may be NULL: no
/// config space, features and resets ignored, and neither SEND_RARP nor
/// NET_SET_MTU offered). Start from `VHU_DEVICE_INIT` (every callback
/// NULL) and set what the device has.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_device {
    /// `sizeof(vhu_device)`. A size this library does not know is
    /// refused (`VHU_ERR_ABI`); a smaller size it knows (a program built
    /// before the trailing callbacks were added: from
    /// `offsetof(vhu_device, set_mtu)` on) reads the callbacks it does
    /// not cover as NULL.
    pub struct_size: usize,
    /// Passed to every callback.
    pub ctx: *mut c_void,
    /// Reads `len` bytes of config space at `offset` into `dst`; false if
    /// the range is outside the config space.
    pub read_config: Option<
        unsafe extern "C" fn(ctx: *mut c_void, offset: u32, dst: *mut u8, len: usize) -> bool,
    >,
    /// Writes `len` bytes of config space at `offset`; `migration` is true
    /// for a live-migration write (read-only fields may change). False if
    /// refused.
    pub write_config: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            offset: u32,
            src: *const u8,
            len: usize,
            migration: bool,
        ) -> bool,
    >,
    /// SET_FEATURES was accepted with these features.
    pub features_acked: Option<unsafe extern "C" fn(ctx: *mut c_void, features: u64)>,
    /// RESET_DEVICE: drop device state.
    pub reset: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
    /// NET_SET_MTU: the front-end advertises `mtu` to the driver (68 to
    /// 65535: the session refuses any other value before this is called,
    /// as `VHU_ERR_BAD_MTU`). True if the device takes it; false refuses
    /// it (a failed REPLY_ACK, or the connection ends if no ack was
    /// asked; `VHU_ERR_REFUSED` either way). NULL: the device
    /// cannot, and a configuration offering `VHU_PROTOCOL_F_MTU` is
    /// refused by `vhu_backend_handle()`.
    pub set_mtu: Option<unsafe extern "C" fn(ctx: *mut c_void, mtu: u16) -> bool>,
    /// SEND_RARP: announce the guest's MAC (the 6 bytes at `mac`, live for
    /// the call) on the device's network with a gratuitous RARP. True if
    /// the device takes the request (a frame it could not send is its own
    /// to count); false refuses it as `set_mtu` does. NULL: the device
    /// cannot, and a configuration offering `VHU_PROTOCOL_F_RARP` is
    /// refused by `vhu_backend_handle()`.
    pub send_rarp: Option<unsafe extern "C" fn(ctx: *mut c_void, mac: *const u8) -> bool>,
}

/// A [`vhu_device`] as the core's [`Device`] (the control path only: the
/// caller drives the data path through the data plane), for a call whose
/// complete footprint it publishes while a callback runs.
struct CDevice<'f> {
    dev: Option<vhu_device>,
    call: &'f Footprint<'f>,
}

/// A [`vhu_device`] read for a call that still claims what it uses (see
/// [`memory::Unbound`](crate::memory::Unbound)).
struct Unbound(Option<vhu_device>);

impl Unbound {
    /// The device at `p` (NULL: none), claimed in `fp` as read, and the
    /// blk device its callbacks enter, if any are the blk device's own
    /// (claimed for the callbacks: see `blk::claim_for_callbacks`).
    ///
    /// # Safety
    ///
    /// A non-null `p` points at a readable `vhu_device` (of its
    /// `struct_size`) whose callbacks may be called with its `ctx` during
    /// the call.
    unsafe fn from_raw(p: *const vhu_device, fp: &mut Footprint<'_>) -> Result<Self, vhu_result> {
        if p.is_null() {
            return Ok(Unbound(None));
        }
        // SAFETY: the caller's contract.
        let d = unsafe { versioned::read(p, fp) }?;
        // SAFETY: the caller's contract: the callbacks may be called with
        // `ctx`, so a blk device's are given its device.
        unsafe { crate::blk::claim_for_callbacks(&d, fp) }?;
        Ok(Unbound(Some(d)))
    }

    /// This device, for the call whose complete footprint is `call`.
    fn bind<'f>(self, call: &'f Footprint<'_>) -> CDevice<'f> {
        CDevice { dev: self.0, call }
    }

    /// The protocol features whose messages this device's callbacks take
    /// (RARP with `send_rarp`, MTU with `set_mtu`).
    fn carries(&self) -> ProtocolFeatures {
        let mut p = ProtocolFeatures::empty();
        if let Some(d) = self.0 {
            p.set(ProtocolFeatures::RARP, d.send_rarp.is_some());
            p.set(ProtocolFeatures::MTU, d.set_mtu.is_some());
        }
        p
    }
}

/// The protocol features offered only with the device's callback for
/// their message (`Unbound::carries`).
const DEVICE_PROTOCOL_FEATURES: ProtocolFeatures =
    ProtocolFeatures::RARP.union(ProtocolFeatures::MTU);

// SAFETY: repr(C) and Copy, `struct_size` first; the sizes end after
// `reset` (before the net callbacks) and after `send_rarp`; every field
// is an integer, a raw pointer or an optional function pointer.
unsafe impl Versioned for vhu_device {
    const SIZES: &'static [usize] = &[offset_of!(vhu_device, set_mtu), size_of::<vhu_device>()];
}

// SAFETY: every field is an integer, a raw pointer or an optional
// function pointer.
unsafe impl Readable for vhu_device {
    const EMPTY: Self = vhu_device {
        struct_size: 0,
        ctx: ptr::null_mut(),
        read_config: None,
        write_config: None,
        features_acked: None,
        reset: None,
        set_mtu: None,
        send_rarp: None,
    };
}

impl Default for vhu_device {
    /// No callbacks, at this version's size (`VHU_DEVICE_INIT`).
    fn default() -> Self {
        vhu_device {
            struct_size: size_of::<vhu_device>(),
            ..vhu_device::EMPTY
        }
    }
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct; every field is an integer.
unsafe impl Versioned for vhu_backend_config {
    const SIZES: &'static [usize] = &[size_of::<vhu_backend_config>()];
}

// SAFETY: every field is an integer, a raw pointer or an optional
// function pointer.
unsafe impl Readable for vhu_backend_config {
    const EMPTY: Self = vhu_backend_config {
        struct_size: 0,
        features: 0,
        protocol_features: 0,
        num_queues: 0,
        max_queue_size: 0,
    };
}

impl Default for vhu_backend_config {
    /// Zero, at this version's size (`VHU_BACKEND_CONFIG_INIT`).
    fn default() -> Self {
        vhu_backend_config {
            struct_size: size_of::<vhu_backend_config>(),
            ..vhu_backend_config::EMPTY
        }
    }
}

impl Device for CDevice<'_> {
    type Scratch = ();

    fn read_config(&self, offset: u32, dst: &mut [u8]) -> bool {
        match self.dev {
            Some(vhu_device {
                ctx,
                read_config: Some(f),
                ..
            }) => {
                let (p, n) = (dst.as_mut_ptr(), dst.len());
                // SAFETY: the caller gave this callback for this `ctx`;
                // `dst` is a live buffer of `n` bytes, handed to the
                // callback (and the calls it makes) to write.
                self.call
                    .call_out(Lend::Writes(p, n), || unsafe { f(ctx, offset, p, n) })
            }
            _ => false,
        }
    }

    fn write_config(&mut self, offset: u32, src: &[u8], kind: ConfigWriteKind) -> bool {
        match self.dev {
            Some(vhu_device {
                ctx,
                write_config: Some(f),
                ..
            }) => {
                let migration = matches!(kind, ConfigWriteKind::Migration);
                let (p, n) = (src.as_ptr(), src.len());
                // SAFETY: as in `read_config`; `src` is live for the call,
                // handed to the callback to read.
                self.call.call_out(Lend::Reads(p, n), || unsafe {
                    f(ctx, offset, p, n, migration)
                })
            }
            _ => false,
        }
    }

    fn features_acked(&mut self, features: VirtioFeatures) {
        if let Some(vhu_device {
            ctx,
            features_acked: Some(f),
            ..
        }) = self.dev
        {
            // SAFETY: the caller gave this callback for this `ctx`.
            self.call
                .call_out(Lend::Nothing, || unsafe { f(ctx, features.bits()) })
        }
    }

    fn reset(&mut self) {
        if let Some(vhu_device {
            ctx,
            reset: Some(f),
            ..
        }) = self.dev
        {
            // SAFETY: the caller gave this callback for this `ctx`.
            self.call.call_out(Lend::Nothing, || unsafe { f(ctx) })
        }
    }

    fn set_mtu(&mut self, mtu: u16) -> bool {
        match self.dev {
            Some(vhu_device {
                ctx,
                set_mtu: Some(f),
                ..
            }) => {
                // SAFETY: the caller gave this callback for this `ctx`.
                self.call.call_out(Lend::Nothing, || unsafe { f(ctx, mtu) })
            }
            _ => false,
        }
    }

    fn send_rarp(&mut self, mac: [u8; 6]) -> bool {
        match self.dev {
            Some(vhu_device {
                ctx,
                send_rarp: Some(f),
                ..
            }) => {
                let p = mac.as_ptr();
                // SAFETY: the caller gave this callback for this `ctx`;
                // `mac` is 6 live bytes for the call, handed to the
                // callback to read.
                self.call
                    .call_out(Lend::Reads(p, mac.len()), || unsafe { f(ctx, p) })
            }
            _ => false,
        }
    }

    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _queue: u16,
        _chain: &Chain<S>,
        _token: Token,
        _mem: &M,
        _scratch: &mut (),
    ) -> Completion {
        // The session never processes requests; the C caller does.
        Completion::Done(0)
    }
}

/// What a reply is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum vhu_reply_kind {
    /// No reply is sent.
    VHU_REPLY_NONE = 0,
    /// `reply_len` bytes of the reply buffer are the reply: send them.
    VHU_REPLY_READY = 1,
    /// GET_VRING_BASE on a running ring: stop ring `queue`, then
    /// `vhu_backend_finish_stop()` gives the reply.
    VHU_REPLY_PENDING = 2,
    /// CHECK_DEVICE_STATE while the transfer of `VHU_ACTION_TRANSFER_STATE`
    /// has not been reported: once it ended, `vhu_backend_finish_transfer()`
    /// gives the reply.
    VHU_REPLY_TRANSFER_PENDING = 3,
}

/// What a message produced (written by `vhu_backend_handle()`; start
/// from `VHU_OUTCOME_INIT`, or `.struct_size = sizeof(vhu_outcome)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_outcome {
    /// `sizeof(vhu_outcome)`, set by the caller and kept by the library,
    /// which writes the fields it covers (`VHU_ERR_ABI`, and nothing
    /// written, for a size this library does not know).
    pub struct_size: usize,
    /// The reply.
    pub reply: vhu_reply_kind,
    /// Bytes of the reply (`VHU_REPLY_READY`).
    pub reply_len: usize,
    /// The ring to stop (`VHU_REPLY_PENDING`).
    pub queue: u16,
    /// Actions to carry out, in order (`vhu_backend_action()` 0 to
    /// `actions - 1`).
    pub actions: u32,
    /// `VHU_OK`, or why a request was refused with a failed REPLY_ACK (the
    /// connection goes on; for the log).
    pub refused: vhu_result,
}

/// What an action asks.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum vhu_action_kind {
    /// Drop every guest memory mapping (the MAP_REGIONs that follow map
    /// the new table).
    VHU_ACTION_UNMAP_ALL = 0,
    /// Map `region` from message fd `fd` into slot `slot` of the guest
    /// memory table.
    VHU_ACTION_MAP_REGION = 1,
    /// Unmap slot `slot`.
    VHU_ACTION_UNMAP_REGION = 2,
    /// The memory table changed while rings run: give each running ring
    /// `vhu_backend_ring_addrs()` with `vhu_dataplane_set_addrs()`.
    VHU_ACTION_REMAP_RINGS = 3,
    /// Install ring `queue`'s kick eventfd: message fd `fd`, or none
    /// (`fd` -1: poll the ring).
    VHU_ACTION_SET_KICK = 4,
    /// Install ring `queue`'s call eventfd: message fd `fd`, or none (-1;
    /// `flag` true: calls go in-band, `vhu_channel_vring_call()`).
    VHU_ACTION_SET_CALL = 5,
    /// Install ring `queue`'s error eventfd: message fd `fd`, or none (-1;
    /// `flag` true: errors go in-band, `vhu_channel_vring_err()`).
    VHU_ACTION_SET_ERR = 6,
    /// Start serving ring `queue` now: `vhu_backend_start_ring()`.
    VHU_ACTION_START_RING = 7,
    /// Ring `queue` is to stop (the pending reply follows); `flag`: suspend
    /// instead of draining.
    VHU_ACTION_STOP_RING = 8,
    /// GET_INFLIGHT_FD: create a zeroed shared-memory fd of `size` bytes
    /// and send it with the reply.
    VHU_ACTION_CREATE_INFLIGHT = 9,
    /// SET_INFLIGHT_FD: map `size` bytes at `offset` of message fd `fd` as
    /// the inflight area (replacing any previous one).
    VHU_ACTION_MAP_INFLIGHT = 10,
    /// Drop the inflight area.
    VHU_ACTION_UNMAP_INFLIGHT = 11,
    /// Running ring `queue` was enabled (`flag` true) or disabled:
    /// `vhu_dataplane_set_enabled()`.
    VHU_ACTION_SET_ENABLED = 12,
    /// RESET_DEVICE: stop every ring (completing what is in flight), drop
    /// their notifiers, then `vhu_backend_rings_reset()`.
    VHU_ACTION_RESET_RINGS = 13,
    /// SET_BACKEND_REQ_FD: keep message fd `fd` as the back-end channel
    /// (in place of any previous one) and make its `vhu_channel` with
    /// `vhu_backend_channel()`.
    VHU_ACTION_SET_BACKEND_CHANNEL = 14,
    /// In-band VRING_KICK for running ring `queue`: serve it now.
    VHU_ACTION_KICK = 15,
    /// SET_LOG_BASE: map `size` bytes at `offset` of message fd `fd` as
    /// the dirty log, in place of any previous one (`vhu_log_mark()`). A
    /// mapping that fails ends the connection (the front-end ignores the
    /// reply's content).
    VHU_ACTION_MAP_LOG = 16,
    /// SET_LOG_FD: keep message fd `fd` (an eventfd) to signal after
    /// marking the log, in place of any previous one.
    VHU_ACTION_SET_LOG_FD = 17,
    /// VHOST_F_LOG_ALL was negotiated (`flag` true) or dropped: from now
    /// on every device write into guest memory is marked in the log while
    /// one is mapped (`vhu_log_mark_written()`), or none is.
    VHU_ACTION_SET_LOGGING = 18,
    /// SET_VRING_ADDR set (`flag` true) or cleared VHOST_VRING_F_LOG on
    /// ring `queue`: mark its used ring at guest address `offset`
    /// (`vhu_dataplane_log_used()`) while the log is mapped, or stop.
    /// A ring that starts logged is told by `vhu_backend_ring_log()`.
    VHU_ACTION_SET_RING_LOG = 19,
    /// SET_DEVICE_STATE_FD accepted (every ring stopped): `flag` true
    /// (save): write the device's state into message fd `fd` (a pipe end)
    /// and close it; false (load): read it to its end and load it into the
    /// device. After the reply (`VHU_REPLY_READY`, sent at once): the
    /// front-end may read the pipe only once it has it. The next
    /// CHECK_DEVICE_STATE is `VHU_REPLY_TRANSFER_PENDING`;
    /// `vhu_backend_finish_transfer()` says how the transfer ended. For a
    /// blk device: `vhu_blk_save_state()`, `vhu_blk_load_state()`.
    VHU_ACTION_TRANSFER_STATE = 20,
    /// An action this version of the ABI does not name (ignore it).
    VHU_ACTION_OTHER = 255,
}

/// One action (the fields its kind does not name are 0), written by
/// `vhu_backend_action()`: start from `VHU_ACTION_INIT`, or
/// `.struct_size = sizeof(vhu_action)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vhu_action {
    /// `sizeof(vhu_action)`, set by the caller and kept by the library,
    /// which writes the fields it covers (`VHU_ERR_ABI`, and nothing
    /// written, for a size this library does not know).
    pub struct_size: usize,
    /// What to do.
    pub kind: vhu_action_kind,
    /// Ring index.
    pub queue: u16,
    /// Memory table slot.
    pub slot: u16,
    /// Index of the message fd the action takes, or -1.
    pub fd: i32,
    /// SET_ENABLED: enabled; STOP_RING: suspend; SET_CALL, SET_ERR: in-band;
    /// SET_LOGGING: logging;
    /// SET_RING_LOG: logged; TRANSFER_STATE: save (else load).
    pub flag: bool,
    /// MAP_REGION: the region.
    pub region: vhu_mem_region,
    /// MAP_INFLIGHT, MAP_LOG: offset in the fd; SET_RING_LOG: the used
    /// ring's log address.
    pub offset: u64,
    /// CREATE_INFLIGHT, MAP_INFLIGHT, MAP_LOG: bytes.
    pub size: u64,
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct.
unsafe impl Versioned for vhu_outcome {
    const SIZES: &'static [usize] = &[size_of::<vhu_outcome>()];
}

impl Default for vhu_outcome {
    /// No reply and no action, at this version's size
    /// (`VHU_OUTCOME_INIT`).
    fn default() -> Self {
        vhu_outcome {
            struct_size: size_of::<vhu_outcome>(),
            reply: vhu_reply_kind::VHU_REPLY_NONE,
            reply_len: 0,
            queue: 0,
            actions: 0,
            refused: VHU_OK,
        }
    }
}

// SAFETY: repr(C) and Copy, `struct_size` first; one size, the whole
// struct.
unsafe impl Versioned for vhu_action {
    const SIZES: &'static [usize] = &[size_of::<vhu_action>()];
}

impl Default for vhu_action {
    /// Zero (kind 0, fd 0), at this version's size (`VHU_ACTION_INIT`).
    fn default() -> Self {
        vhu_action {
            struct_size: size_of::<vhu_action>(),
            kind: vhu_action_kind::VHU_ACTION_UNMAP_ALL,
            queue: 0,
            slot: 0,
            fd: 0,
            flag: false,
            region: vhu_mem_region::default(),
            offset: 0,
            size: 0,
        }
    }
}

/// A ring's addresses as guest physical addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vhu_ring_addrs {
    /// Descriptor table (split) or descriptor ring (packed).
    pub desc: u64,
    /// Avail ring (split) or driver event suppression area (packed).
    pub driver: u64,
    /// Used ring (split) or device event suppression area (packed).
    pub device: u64,
}

impl From<RingAddrs> for vhu_ring_addrs {
    fn from(a: RingAddrs) -> Self {
        vhu_ring_addrs {
            desc: a.desc,
            driver: a.driver,
            device: a.device,
        }
    }
}

impl From<vhu_ring_addrs> for RingAddrs {
    fn from(a: vhu_ring_addrs) -> Self {
        RingAddrs {
            desc: a.desc,
            driver: a.driver,
            device: a.device,
        }
    }
}

/// Bytes of a back-end session's storage.
#[no_mangle]
pub extern "C" fn vhu_backend_size() -> usize {
    state::size::<Backend>()
}

/// Alignment of a back-end session's storage.
#[no_mangle]
pub extern "C" fn vhu_backend_align() -> usize {
    state::align::<Backend>()
}

/// The protocol features a configuration may offer: those the session
/// implements and this interface carries (all the session implements),
/// the same in every build of this library but for
/// `VHU_PROTOCOL_F_LOG_SHMFD` and `VHU_PROTOCOL_F_DEVICE_STATE` (with its
/// `migration` feature, on by default). RARP and MTU are offered only
/// with a device whose `send_rarp` and `set_mtu` are set
/// (`vhu_backend_handle()`); BACKEND_REQ's requests are sent with a
/// `vhu_channel` (`vhu_backend_channel()`), INBAND_NOTIFICATIONS's too. A
/// program offers the bits it handles, not this whole set: a later minor
/// version of the ABI may add to it.
#[no_mangle]
pub extern "C" fn vhu_backend_supported_protocol_features() -> u64 {
    C_PROTOCOL_FEATURES.bits()
}

/// The virtio features a configuration may offer: the device's bits
/// (0 to 23) and the transport's the engine implements, the same in every
/// build of this library but for `VHU_VIRTIO_F_IN_ORDER` (with its
/// `in-order` feature, on by default) and `VHU_F_LOG_ALL` (with its
/// `migration` feature, on by default).
#[no_mangle]
pub extern "C" fn vhu_backend_supported_features() -> u64 {
    C_VIRTIO_FEATURES.bits()
}

/// VIRTIO_F_IN_ORDER where this crate's `in-order` feature is on: the
/// core's handling may be on in a build without it (another crate turned
/// it on), and is then not used (`vhu_dataplane_init` refuses the bit
/// the same way).
const C_IN_ORDER: VirtioFeatures = if cfg!(feature = "in-order") {
    VirtioFeatures::IN_ORDER
} else {
    VirtioFeatures::empty()
};

/// VHOST_F_LOG_ALL, LOG_SHMFD and DEVICE_STATE where this crate's
/// `migration` feature is on (as [`C_IN_ORDER`]).
const C_LOG_ALL: VirtioFeatures = if cfg!(feature = "migration") {
    VirtioFeatures::LOG_ALL
} else {
    VirtioFeatures::empty()
};
const C_MIGRATION: ProtocolFeatures = if cfg!(feature = "migration") {
    ProtocolFeatures::LOG_SHMFD.union(ProtocolFeatures::DEVICE_STATE)
} else {
    ProtocolFeatures::empty()
};

/// What a C back-end may offer in virtio features, named one by one as
/// [`C_PROTOCOL_FEATURES`] is (the core's build features would otherwise
/// change it).
const C_VIRTIO_FEATURES: VirtioFeatures = VirtioFeatures::from_bits_retain((1 << 24) - 1)
    .union(VirtioFeatures::INDIRECT_DESC)
    .union(VirtioFeatures::EVENT_IDX)
    .union(VirtioFeatures::PROTOCOL_FEATURES)
    .union(VirtioFeatures::VERSION_1)
    .union(VirtioFeatures::RING_PACKED)
    .union(C_IN_ORDER)
    .union(C_LOG_ALL);

/// What a C back-end may offer: what the session implements and this
/// interface carries, named one by one so that the core's build features
/// (a workspace build turns on `net` and `migration` for every crate) do
/// not change it (this crate builds the core with `net`, for RARP and
/// MTU). RARP and MTU need the device's callbacks
/// (`DEVICE_PROTOCOL_FEATURES`).
const C_PROTOCOL_FEATURES: ProtocolFeatures = ProtocolFeatures::MQ
    .union(ProtocolFeatures::RARP)
    .union(ProtocolFeatures::REPLY_ACK)
    .union(ProtocolFeatures::MTU)
    .union(ProtocolFeatures::CONFIG)
    .union(ProtocolFeatures::INFLIGHT_SHMFD)
    .union(ProtocolFeatures::RESET_DEVICE)
    .union(ProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(ProtocolFeatures::STATUS)
    .union(ProtocolFeatures::GET_VRING_BASE_INFLIGHT)
    .union(ProtocolFeatures::GET_VRING_BASE_SKIP_DRAIN)
    .union(ProtocolFeatures::BACKEND_REQ)
    .union(ProtocolFeatures::INBAND_NOTIFICATIONS)
    .union(C_MIGRATION)
    .intersection(SUPPORTED_PROTOCOL_FEATURES);

/// Initialises a back-end session in `storage` (`size` bytes) for a
/// device with `config`, waiting for a front-end's first message.
/// `VHU_ERR_UNSUPPORTED` if the configuration offers what this library
/// does not carry (`vhu_backend_supported_features()`,
/// `vhu_backend_supported_protocol_features()`), or more than
/// `VHU_MAX_QUEUES` queues; `VHU_ERR_ABI`
/// if its `struct_size` is not one this library knows. A configuration
/// offering `VHU_PROTOCOL_F_RARP` or `VHU_PROTOCOL_F_MTU` must be handled
/// with a device whose `send_rarp` or `set_mtu` is set
/// (`vhu_backend_handle()`).
///
/// # Safety
///
/// `storage` points at `size` writable bytes; `config` at a
/// `vhu_backend_config` of its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_init(
    storage: *mut vhu_backend,
    size: usize,
    config: *const vhu_backend_config,
) -> vhu_result {
    guard(|| {
        state::storage::<Backend, _>(storage, size, vhu_backend_size())?;
        let mut fp = Footprint::new();
        fp.writes(storage.cast::<u8>(), vhu_backend_size())?;
        // SAFETY: the caller's contract.
        let c = unsafe { versioned::read(config, &mut fp) }?;
        if !C_PROTOCOL_FEATURES.contains(ProtocolFeatures::from_bits_retain(c.protocol_features))
            || !C_VIRTIO_FEATURES.contains(VirtioFeatures::from_bits_retain(c.features))
        {
            return Err(VHU_ERR_UNSUPPORTED);
        }
        let session = CSession::new(BackendConfig {
            features: VirtioFeatures::from_bits_retain(c.features),
            protocol_features: ProtocolFeatures::from_bits_retain(c.protocol_features),
            num_queues: c.num_queues,
            max_queue_size: c.max_queue_size,
        })
        .map_err(result::backend)?;
        let value = Backend {
            session,
            outcome: Outcome::default(),
        };
        // SAFETY: `storage` was checked for the size; the caller's contract
        // makes it writable.
        // SAFETY: the caller's contract.
        unsafe { state::init(storage, size, vhu_backend_size(), value) }
    })
}

/// The total size (header and payload) of the message whose header is the
/// first `len` bytes at `header` (at least `VHU_HEADER_SIZE`), validated:
/// `VHU_ERR_WIRE` for a header that is not a version-1 vhost-user header
/// or announces a payload above the maximum. For reading a message off a
/// stream: the header, then the rest.
///
/// # Safety
///
/// `header` points at `len` readable bytes; `total` at a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn vhu_message_size(
    header: *const u8,
    len: usize,
    total: *mut usize,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        fp.reads(header, len)?;
        fp.writes(total, 1)?;
        // SAFETY: the caller's contract.
        let bytes = unsafe { state::slice(header, len) }?;
        if bytes.len() < HEADER_SIZE {
            return Err(VHU_ERR_SHORT_BUFFER);
        }
        let h = Header::parse(bytes).map_err(result::wire)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(total, HEADER_SIZE + h.size as usize) }
    })
}

/// One whole message, `msg`, as its header and payload:
/// `VHU_ERR_SHORT_BUFFER` for fewer bytes than the header or than the
/// size it announces, `VHU_ERR_INVALID` for more (bytes of another
/// message: a framing mistake of the caller's that would lose that
/// message), `VHU_ERR_WIRE` for a header that does not parse.
pub(crate) fn whole_message(msg: &[u8]) -> Result<(Header, &[u8]), vhu_result> {
    if msg.len() < HEADER_SIZE {
        return Err(VHU_ERR_SHORT_BUFFER);
    }
    let header = Header::parse(msg).map_err(result::wire)?;
    let payload = msg.get(HEADER_SIZE..).ok_or(VHU_ERR_SHORT_BUFFER)?;
    match payload.len().cmp(&(header.size as usize)) {
        core::cmp::Ordering::Less => Err(VHU_ERR_SHORT_BUFFER),
        core::cmp::Ordering::Greater => Err(VHU_ERR_INVALID),
        core::cmp::Ordering::Equal => Ok((header, payload)),
    }
}

/// Handles one message: `len` bytes at `msg` (header and payload,
/// exactly: `VHU_ERR_SHORT_BUFFER` for fewer than the header announces,
/// `VHU_ERR_INVALID` for more, which would be another message's; see
/// `vhu_message_size`) that came with `nfds` fds. `mem` is guest memory
/// as mapped so far (NULL: none yet), `device` the device's control path
/// (NULL: none). The reply is written into `reply` (`reply_cap` bytes;
/// `VHU_MAX_MESSAGE` always suffice) and `out` says what to do.
///
/// An error means the message was refused and the connection must end
/// (`VHU_ERR_WIRE` for a malformed message); a request refused with a
/// failed REPLY_ACK is not an error (`out->refused` says why). On error
/// `out` holds no reply and no action. `VHU_ERR_UNSUPPORTED`, before the
/// session sees the message, if the configuration offers
/// `VHU_PROTOCOL_F_RARP` or `VHU_PROTOCOL_F_MTU` and `device` (or its
/// `send_rarp` or `set_mtu`) is NULL: no front-end is offered a message
/// that no callback would take. `VHU_ERR_ABI` if the `struct_size` of
/// `device` or `out` is not one this library knows (`out` is not written
/// then). `VHU_ERR_INVALID` if `reply` or
/// `out` shares a byte with the back-end, `msg`, `mem`, `device` or each
/// other, or an entry of the table `mem` maps any of them (the message is
/// read while the reply is written: give each its own bytes); so does a
/// blk device whose control path `device` is (`vhu_blk_device()`: its
/// callbacks enter it during the call).
///
/// # Safety
///
/// `be` points at an initialised back-end; `msg` at `len` readable bytes;
/// `mem` is NULL or a valid table (see `vhu_mem`); `device` is NULL or
/// points at a `vhu_device` of its `struct_size` whose callbacks may be
/// called during the call; `reply` points
/// at `reply_cap` writable bytes; `out` at a writable `vhu_outcome` of
/// its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_handle(
    be: *mut vhu_backend,
    msg: *const u8,
    len: usize,
    nfds: usize,
    mem: *const vhu_mem,
    device: *const vhu_device,
    reply: *mut u8,
    reply_cap: usize,
    out: *mut vhu_outcome,
) -> vhu_result {
    guard(|| {
        let mut outcome = vhu_outcome::default();
        // Every pointer is checked before the session changes. The
        // session reads the message while it writes the reply: a `&mut`
        // over bytes that `msg` (or the session's own value) also covers
        // would break Rust's aliasing rules.
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Backend, _>(be) }?;
        fp.reads(msg, len)?;
        // SAFETY: the caller's contract.
        let device = unsafe { Unbound::from_raw(device, &mut fp) }?;
        fp.writes(reply, reply_cap)?;
        // SAFETY: the caller's contract.
        let out = unsafe { versioned::out(out, &mut fp) }?;
        out.put(outcome);
        // SAFETY: the caller's contract.
        let mut entered = unsafe { state::get::<Backend, _>(be) }?;
        let b = &mut *entered;
        // The actions of the message before are gone whatever happens
        // next: a message refused here, before the session sees it, must
        // leave none for `vhu_backend_action` (its fd indices would name
        // this message's fds).
        b.outcome = Outcome::default();
        // SAFETY: the caller's contract.
        let msg = unsafe { state::slice(msg, len) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        // Every pointer is claimed: the callbacks run with them published.
        let mem = mem.bind(&fp);
        // A front-end is never offered (nor handed) a message that no
        // callback of this device takes.
        let offered = b.session.config().protocol_features;
        if !device
            .carries()
            .contains(offered.intersection(DEVICE_PROTOCOL_FEATURES))
        {
            return Err(VHU_ERR_UNSUPPORTED);
        }
        let mut device = device.bind(&fp);
        // SAFETY: the caller's contract; apart from everything else the
        // call uses (claimed).
        let reply = unsafe { state::bytes_mut(reply, reply_cap) }?;
        let (header, payload) = whole_message(msg)?;
        b.session
            .handle_into(
                &header,
                payload,
                &nfds,
                &mem,
                &mut device,
                reply,
                &mut b.outcome,
            )
            .map_err(result::backend)?;
        match b.outcome.reply {
            Reply::None => {}
            Reply::Ready(n) => {
                outcome.reply = vhu_reply_kind::VHU_REPLY_READY;
                outcome.reply_len = n;
            }
            Reply::Pending { queue } => {
                outcome.reply = vhu_reply_kind::VHU_REPLY_PENDING;
                outcome.queue = queue;
            }
            Reply::TransferPending => {
                outcome.reply = vhu_reply_kind::VHU_REPLY_TRANSFER_PENDING;
            }
        }
        outcome.actions = b.outcome.actions.len() as u32;
        outcome.refused = b.outcome.refused.map_or(VHU_OK, result::backend);
        out.put(outcome);
        Ok(())
    })
}

fn fd_index(fd: Option<u8>) -> i32 {
    fd.map_or(-1, i32::from)
}

fn action(a: &Action) -> vhu_action {
    use vhu_action_kind::*;
    let mut v = vhu_action {
        kind: VHU_ACTION_OTHER,
        fd: -1,
        ..vhu_action::default()
    };
    #[allow(unreachable_patterns)]
    match *a {
        Action::UnmapAll => v.kind = VHU_ACTION_UNMAP_ALL,
        Action::MapRegion { slot, fd, region } => {
            v.kind = VHU_ACTION_MAP_REGION;
            v.slot = slot;
            v.fd = i32::from(fd);
            v.region = vhu_mem_region {
                guest_addr: region.guest_addr,
                size: region.size,
                user_addr: region.user_addr,
                mmap_offset: region.mmap_offset,
            };
        }
        Action::UnmapRegion { slot } => {
            v.kind = VHU_ACTION_UNMAP_REGION;
            v.slot = slot;
        }
        Action::RemapRings => v.kind = VHU_ACTION_REMAP_RINGS,
        Action::SetKick { queue, fd } => {
            v.kind = VHU_ACTION_SET_KICK;
            v.queue = queue;
            v.fd = fd_index(fd);
        }
        Action::SetCall { queue, fd } => {
            v.kind = VHU_ACTION_SET_CALL;
            v.queue = queue;
            v.fd = fd_index(fd);
        }
        Action::SetErr { queue, fd } => {
            v.kind = VHU_ACTION_SET_ERR;
            v.queue = queue;
            v.fd = fd_index(fd);
        }
        Action::StartRing { queue } => {
            v.kind = VHU_ACTION_START_RING;
            v.queue = queue;
        }
        Action::StopRing { queue, suspend } => {
            v.kind = VHU_ACTION_STOP_RING;
            v.queue = queue;
            v.flag = suspend;
        }
        Action::CreateInflight { size } => {
            v.kind = VHU_ACTION_CREATE_INFLIGHT;
            v.size = size;
        }
        Action::MapInflight { fd, offset, size } => {
            v.kind = VHU_ACTION_MAP_INFLIGHT;
            v.fd = i32::from(fd);
            v.offset = offset;
            v.size = size;
        }
        Action::UnmapInflight => v.kind = VHU_ACTION_UNMAP_INFLIGHT,
        Action::SetEnabled { queue, enabled } => {
            v.kind = VHU_ACTION_SET_ENABLED;
            v.queue = queue;
            v.flag = enabled;
        }
        Action::ResetRings => v.kind = VHU_ACTION_RESET_RINGS,
        Action::SetBackendChannel { fd } => {
            v.kind = VHU_ACTION_SET_BACKEND_CHANNEL;
            v.fd = i32::from(fd);
        }
        Action::Kick { queue } => {
            v.kind = VHU_ACTION_KICK;
            v.queue = queue;
        }
        Action::MapLog { fd, offset, size } => {
            v.kind = VHU_ACTION_MAP_LOG;
            v.fd = i32::from(fd);
            v.offset = offset;
            v.size = size;
        }
        Action::SetLogFd { fd } => {
            v.kind = VHU_ACTION_SET_LOG_FD;
            v.fd = i32::from(fd);
        }
        Action::SetLogging { all } => {
            v.kind = VHU_ACTION_SET_LOGGING;
            v.flag = all;
        }
        Action::TransferState { fd, direction } => {
            v.kind = VHU_ACTION_TRANSFER_STATE;
            v.fd = i32::from(fd);
            v.flag = direction == DeviceStateDirection::Save;
        }
        Action::SetRingLog { queue, log } => {
            v.kind = VHU_ACTION_SET_RING_LOG;
            v.queue = queue;
            v.flag = log.is_some();
            v.offset = log.unwrap_or(0);
        }
        _ => {}
    }
    v
}

/// Action `index` of the last message (0 to `out->actions - 1` of its
/// `vhu_backend_handle()`) into `*out`, at the `struct_size` it holds
/// (`VHU_ACTION_INIT`; `VHU_ERR_ABI`, and nothing written, for a size
/// this library does not know); `VHU_ERR_INVALID` past the last one.
///
/// # Safety
///
/// `be` points at an initialised back-end; `out` at a writable
/// `vhu_action` of its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_action(
    be: *mut vhu_backend,
    index: usize,
    out: *mut vhu_action,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Backend, _>(be) }?;
        // SAFETY: the caller's contract.
        let out = unsafe { versioned::out(out, &mut fp) }?;
        // SAFETY: the caller's contract.
        let b = unsafe { state::get::<Backend, _>(be) }?;
        let a = b.outcome.actions.get(index).ok_or(VHU_ERR_INVALID)?;
        let mut v = action(a);
        // Without an eventfd, whether the ring's calls or errors go
        // in-band (BACKEND_VRING_CALL/ERR on the back-end channel).
        match (a, v.fd) {
            (Action::SetCall { queue, .. }, -1) => v.flag = b.session.call_in_band(*queue),
            (Action::SetErr { queue, .. }, -1) => v.flag = b.session.err_in_band(*queue),
            _ => {}
        }
        out.put(v);
        Ok(())
    })
}

/// Completes a pending GET_VRING_BASE: ring `queue` stopped at `base`
/// (what `vhu_dataplane_stop()` answered). Writes the reply into `reply`
/// (`reply_cap` bytes) and its length into `*reply_len`.
/// `VHU_ERR_STATE` if the ring is not being stopped.
///
/// # Safety
///
/// `be` points at an initialised back-end; `reply` at `reply_cap`
/// writable bytes; `reply_len` at a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_finish_stop(
    be: *mut vhu_backend,
    queue: u16,
    base: u32,
    reply: *mut u8,
    reply_cap: usize,
    reply_len: *mut usize,
) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe {
        late_reply(be, reply, reply_cap, reply_len, |b, buf| {
            b.session
                .finish_stop(queue, base, buf)
                .map_err(result::backend)
        })
    }
}

/// A reply the session gives after the message (a stop's, a transfer's
/// check): `write` writes it into the caller's `reply` (`reply_cap`
/// bytes) and gives its length, for `*reply_len` (0 on error).
///
/// # Safety
///
/// As the callers': `be` points at an initialised back-end; `reply` at
/// `reply_cap` writable bytes; `reply_len` at a writable `size_t`.
unsafe fn late_reply(
    be: *mut vhu_backend,
    reply: *mut u8,
    reply_cap: usize,
    reply_len: *mut usize,
    write: impl FnOnce(&mut Backend, &mut [u8]) -> Result<usize, vhu_result>,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Backend, _>(be) }?;
        fp.writes(reply, reply_cap)?;
        fp.writes(reply_len, 1)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(reply_len, 0) }?;
        // SAFETY: the caller's contract.
        let mut b = unsafe { state::get::<Backend, _>(be) }?;
        // SAFETY: the caller's contract.
        let buf = unsafe { state::bytes_mut(reply, reply_cap) }?;
        let n = write(&mut b, buf)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(reply_len, n) }
    })
}

/// Answers CHECK_DEVICE_STATE (`VHU_REPLY_TRANSFER_PENDING`) once the
/// transfer of `VHU_ACTION_TRANSFER_STATE` ended: `ok` if the whole state
/// was written (save) or read and loaded into the device (load). Writes
/// the reply into `reply` (`reply_cap` bytes; its length in
/// `*reply_len`); a new transfer may follow. `VHU_ERR_STATE` without a
/// transfer to report, `VHU_ERR_UNSUPPORTED` in a library built without
/// its `migration` feature.
///
/// # Safety
///
/// `be` points at an initialised back-end; `reply` at `reply_cap`
/// writable bytes; `reply_len` at a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_finish_transfer(
    be: *mut vhu_backend,
    ok: bool,
    reply: *mut u8,
    reply_cap: usize,
    reply_len: *mut usize,
) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe {
        late_reply(be, reply, reply_cap, reply_len, |b, buf| {
            #[cfg(feature = "migration")]
            {
                if b.session.transfer().is_none() {
                    return Err(VHU_ERR_STATE);
                }
                b.session.finish_transfer(ok, buf).map_err(result::backend)
            }
            #[cfg(not(feature = "migration"))]
            {
                let _ = (ok, buf, b);
                Err(VHU_ERR_UNSUPPORTED)
            }
        })
    }
}

/// The inflight area's layout of the last SET_INFLIGHT_FD: queues and ring
/// size (what a device state carries with the area's bytes).
/// `VHU_ERR_INFLIGHT` if no inflight area was set.
///
/// # Safety
///
/// `be` points at an initialised back-end; `num_queues` and `queue_size`
/// at writable `uint16_t`s.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_inflight_layout(
    be: *mut vhu_backend,
    num_queues: *mut u16,
    queue_size: *mut u16,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Backend, _>(be) }?;
        fp.writes(num_queues, 1)?;
        fp.writes(queue_size, 1)?;
        // SAFETY: the caller's contract.
        let b = unsafe { state::get::<Backend, _>(be) }?;
        let (nq, qs) = b.session.inflight_layout().ok_or(VHU_ERR_INFLIGHT)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(num_queues, nq) }?;
        // SAFETY: the caller's contract.
        unsafe { state::put(queue_size, qs) }
    })
}

/// After `VHU_ACTION_START_RING`: builds ring `queue`'s data plane in
/// `storage` (`size` bytes, at least `vhu_dataplane_size()` of the ring's
/// size, aligned to `vhu_dataplane_align()`), from the ring's size,
/// addresses, base and the negotiated features. With an inflight area
/// (`area`, NULL if none was set) the requests recorded there are handed
/// out first by `vhu_dataplane_pop()`. `consume_disabled`: a started but
/// disabled ring is consumed without side effects instead of paused.
///
/// # Safety
///
/// `be` points at an initialised back-end; `mem` and `area` are NULL or
/// valid tables; `storage` points at `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_start_ring(
    be: *mut vhu_backend,
    queue: u16,
    mem: *const vhu_mem,
    area: *const vhu_mem,
    consume_disabled: bool,
    storage: *mut vhu_dataplane,
    size: usize,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Backend, _>(be) }?;
        // SAFETY: the caller's contract.
        let b = unsafe { state::get::<Backend, _>(be) }?;
        // The storage must hold the ring's token table before the session
        // starts the ring (an unknown queue is the session's error), and
        // be apart from the session and the tables (the ring is started
        // from guest memory while the session is held).
        let num = b.session.ring(queue).map_or(0, |r| r.num);
        let need = dataplane::vhu_dataplane_size(num).max(dataplane::fixed_size());
        state::storage::<dataplane::Ring, _>(storage, size, need)?;
        fp.writes(storage.cast::<u8>(), need)?;
        // SAFETY: the caller's contract.
        let mem = unsafe { Mem::from_raw(mem, &mut fp) }?;
        // SAFETY: the caller's contract.
        let area = unsafe { Mem::optional(area, &mut fp) }?;
        let (mem, area) = (mem.bind(&fp), area.map(|a| a.bind(&fp)));
        let dp = b
            .session
            .start_ring(queue, &mem, area.as_ref(), consume_disabled)
            .map_err(result::backend)?;
        // Leave the session before the data plane's storage is written
        // (apart from it: claimed above).
        drop(b);
        // SAFETY: the caller's contract on `storage`.
        unsafe { dataplane::place(storage, size, dp) }
    })
}

/// Ring `queue`'s addresses translated through the current memory table
/// (for `VHU_ACTION_REMAP_RINGS`).
///
/// # Safety
///
/// `be` points at an initialised back-end; `out` at a writable
/// `vhu_ring_addrs`.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_ring_addrs(
    be: *mut vhu_backend,
    queue: u16,
    out: *mut vhu_ring_addrs,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Backend, _>(be) }?;
        fp.writes(out, 1)?;
        // SAFETY: the caller's contract.
        let b = unsafe { state::get::<Backend, _>(be) }?;
        let a = b.session.ring_addrs(queue).map_err(result::backend)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(out, a.into()) }
    })
}

/// Whether ring `queue`'s used ring is marked in the dirty log
/// (`*logged`: its SET_VRING_ADDR carried VHOST_VRING_F_LOG), and at
/// which guest address (`*log_addr`, 0 when not logged): what a ring
/// that starts (`VHU_ACTION_START_RING`) gives `vhu_dataplane_log_used()`;
/// a running ring learns of changes from `VHU_ACTION_SET_RING_LOG`.
/// `VHU_ERR_QUEUE` for a queue the device does not have.
///
/// # Safety
///
/// `be` points at an initialised back-end; `logged` at a writable `bool`
/// and `log_addr` at a writable `u64`.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_ring_log(
    be: *mut vhu_backend,
    queue: u16,
    logged: *mut bool,
    log_addr: *mut u64,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Backend, _>(be) }?;
        fp.writes(logged, 1)?;
        fp.writes(log_addr, 1)?;
        // SAFETY: the caller's contract.
        let b = unsafe { state::get::<Backend, _>(be) }?;
        if queue >= b.session.config().num_queues {
            return Err(VHU_ERR_QUEUE);
        }
        let log = b.session.ring_log(queue);
        // SAFETY: the caller's contract.
        unsafe { state::put(logged, log.is_some()) }?;
        // SAFETY: the caller's contract.
        unsafe { state::put(log_addr, log.unwrap_or(0)) }
    })
}

/// After `VHU_ACTION_RESET_RINGS` (or when the connection ends): forget
/// that rings run.
///
/// # Safety
///
/// `be` points at an initialised back-end.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_rings_reset(be: *mut vhu_backend) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Backend, _>(be) }?;
        // SAFETY: the caller's contract.
        let mut b = unsafe { state::get::<Backend, _>(be) }?;
        b.session.rings_reset();
        Ok(())
    })
}

/// The negotiated virtio and protocol features (0 before they are set).
///
/// # Safety
///
/// `be` points at an initialised back-end; `features` and `protocol` are
/// NULL or point at writable `uint64_t`s.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_features(
    be: *mut vhu_backend,
    features: *mut u64,
    protocol: *mut u64,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Backend, _>(be) }?;
        fp.writes(features, 1)?;
        fp.writes(protocol, 1)?;
        // SAFETY: the caller's contract.
        let b = unsafe { state::get::<Backend, _>(be) }?;
        if !features.is_null() {
            // SAFETY: the caller's contract.
            unsafe { state::put(features, b.session.features().bits()) }?;
        }
        if !protocol.is_null() {
            // SAFETY: the caller's contract.
            unsafe { state::put(protocol, b.session.protocol_features().bits()) }?;
        }
        Ok(())
    })
}

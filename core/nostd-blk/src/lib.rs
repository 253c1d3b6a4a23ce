//! A whole vhost-user-blk back-end for bare metal, with no allocator, no
//! threads, no fds and no `unsafe`: the core's [`Session`] and a
//! [`DataPlane`] per ring, the core's virtio-blk planner over a RAM disk
//! ([`disk::RamDisk`]), guest memory and the inflight area in static
//! shared memory ([`memory::SharedMemory`]), messages over a mailbox
//! channel ([`mailbox`]) framed by the core's
//! [`read_message`]/[`write_message`].
//!
//! The firmware in `core/nostd-check` links it for `thumbv7em-none-eabihf`
//! and `aarch64-unknown-none`, and the host tests of this crate drive the
//! same code through a whole front-end conversation.
//!
//! # Shared memory instead of fds
//!
//! A socket back-end receives an fd with SET_MEM_TABLE, ADD_MEM_REG and
//! SET_INFLIGHT_FD and maps it. Here the front-end and the back-end share
//! two windows agreed on beforehand (guest RAM, and the inflight area), and
//! every fd such a message would carry stands for its window: the
//! message's `mmap_offset` says where in it the region lies. The framer
//! reports no fds ([`NoFds`]); [`implicit_fds`] tells the session how many
//! the message stands for. Eventfds have no such stand-in: kick and call
//! are polled (SET_VRING_KICK/CALL with the no-fd flag), the back-end loop
//! polls the rings and the front-end polls the used rings.
//!
//! # In-band notifications
//!
//! With the `inband` feature (on by default; about 0.9 KiB of `.text`,
//! so the firmware held to the budgets is built without it) the back-end
//! offers BACKEND_REQ and INBAND_NOTIFICATIONS. With them (and REPLY_ACK)
//! negotiated the front-end may do without polling: it starts and kicks rings with
//! VRING_KICK, and SET_BACKEND_REQ_FD names a second mailbox pair agreed
//! beforehand as the back-end channel. A completion the guest wants to hear
//! of, or a ring the guest broke, is then owed to the front-end as
//! BACKEND_VRING_CALL or BACKEND_VRING_ERR: [`Backend::poll_backend`] sends
//! what is owed, one message at a time, each acked before the next (calls
//! owed meanwhile are merged, as eventfd writes are).
//!
//! # Why these sizes
//!
//! - [`QUEUES`] = 2 rings.
//! - [`REGIONS`] = 4 memory slots (GET_MAX_MEM_SLOTS answers 4): every
//!   region lies in the one RAM window, so a front-end needs one or two
//!   (below and above a hole); 4 leaves room, and each slot costs about
//!   56 bytes of session state, which with 8 would break the 1 KiB budget
//!   of session plus data planes.
//! - [`MAX_QUEUE_SIZE`] = 16 and [`CHAIN_CAPACITY`] = 16: a chain has at
//!   most 16 descriptors (`seg_max` 14 plus header and status), and the
//!   chain buffer, a request plan per ring and the inflight area stay
//!   small (the area: 2 × 576 bytes).
//!
//! # Budgets
//!
//! `core/nostd-check/check-budgets.sh` (CI's no_std step) holds the
//! thumbv7em firmware to its budgets: the deepest stack of one message
//! ([`Backend::on_message`]) and of one request
//! ([`Backend::serve_request`]) at most 2 KiB, and `.text` under a ratchet.
//! The `.text` target is 32 KiB and the firmware meets it (31,914 bytes),
//! most of it the core's control path and inflight recovery.
//! The core's error types are kept small (size assertions next to each)
//! so that moving them up through `?` stays cheap.
//! [`STATE_BYTES`] (session plus data planes) is held to 1 KiB here.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod disk;
pub mod mailbox;
pub mod memory;

use core::sync::atomic::AtomicU32;

use embedded_io::{Read, Write};
#[cfg(feature = "inband")]
use vhost_user_core::backend::ChannelError;
use vhost_user_core::backend::{
    Action, BackendConfig, BackendError, Channel, Outcome, Reply, Session,
};
use vhost_user_core::dataplane::{DataPlane, Published, Stop, IN_ORDER_STATE_BYTES};
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::{ProtocolFeatures, VirtioFeatures};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{FrontendReq, Header, MAX_MEM_REGIONS, MAX_MESSAGE};
use vhost_user_core::transport::{read_message, write_message, NoFds};
use vhost_user_core::vring::Chain;

use disk::{Plan, RamDisk};
use memory::SharedMemory;

/// Rings of the device.
pub const QUEUES: usize = 2;
/// Memory slots of the session (see the [crate documentation](crate)).
pub const REGIONS: usize = 4;
/// Largest ring size a front-end may set.
pub const MAX_QUEUE_SIZE: u16 = 16;
/// Descriptors a chain may have.
pub const CHAIN_CAPACITY: usize = 16;
/// Bytes of the reply buffer: the largest reply this back-end sends is
/// GET_CONFIG's (12 + 12 + 256 bytes at most).
pub const REPLY_CAPACITY: usize = 320;

/// The session of this back-end.
pub type BlkSession = Session<QUEUES, REGIONS>;
/// Guest memory and the inflight area.
pub type Memory<'a> = SharedMemory<'a, REGIONS>;

/// Session plus the rings' data-plane state: the RAM budget of the
/// protocol state, checked for every target this crate builds for. The
/// firmware builds the core without its `in-order` feature; a workspace
/// build unifies it in (the hosted crates enable it), so what it adds to
/// a data plane ([`IN_ORDER_STATE_BYTES`], 0 in the firmware) is not
/// counted.
pub const STATE_BYTES: usize = core::mem::size_of::<BlkSession>()
    + QUEUES * (core::mem::size_of::<DataPlane>() - IN_ORDER_STATE_BYTES);
/// The budget of [`STATE_BYTES`].
pub const STATE_BUDGET: usize = 1024;
const _: () = assert!(STATE_BYTES <= STATE_BUDGET);

/// 32-bit words of an inflight area for `queues` rings of `queue_size`
/// (the core's layout: each ring's region 64-aligned, room for 32 bytes
/// per descriptor plus a header), for sizing a `static`.
pub const fn inflight_words(queues: usize, queue_size: u16) -> usize {
    let stride = (32 * (queue_size as usize + 1)).next_multiple_of(64);
    queues * stride / 4
}

/// The protocol features offered.
pub const PROTOCOL_FEATURES: ProtocolFeatures = ProtocolFeatures::MQ
    .union(ProtocolFeatures::REPLY_ACK)
    .union(ProtocolFeatures::CONFIG)
    .union(ProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(ProtocolFeatures::STATUS)
    .union(ProtocolFeatures::RESET_DEVICE)
    .union(ProtocolFeatures::INFLIGHT_SHMFD)
    .union(ProtocolFeatures::GET_VRING_BASE_INFLIGHT)
    .union(IN_BAND_FEATURES);

/// The protocol features of in-band notifications (none without the
/// `inband` feature).
pub const IN_BAND_FEATURES: ProtocolFeatures = if cfg!(feature = "inband") {
    ProtocolFeatures::BACKEND_REQ.union(ProtocolFeatures::INBAND_NOTIFICATIONS)
} else {
    ProtocolFeatures::empty()
};

/// The transport features offered besides the device's: both ring
/// layouts, so the front-end's SET_FEATURES picks split or packed.
pub const RING_FEATURES: VirtioFeatures = VirtioFeatures::VERSION_1
    .union(VirtioFeatures::PROTOCOL_FEATURES)
    .union(VirtioFeatures::RING_PACKED)
    .union(VirtioFeatures::EVENT_IDX)
    .union(VirtioFeatures::INDIRECT_DESC);

/// Why the back-end dropped the conversation (it is then ready for a new
/// one: [`Backend::disconnect`] was called).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The channel broke framing, or a reply did not fit.
    Transport,
    /// The session refused a message.
    Session(BackendError),
    /// A memory region does not lie in the RAM window.
    Memory,
    /// The inflight area does not fit its window, or was to change while
    /// rings run.
    Inflight,
    /// A ring did not stop.
    Stop,
}

/// What the back-end did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages handled.
    pub messages: u32,
    /// Requests refused with a failed REPLY_ACK.
    pub refused: u32,
    /// Guest requests completed.
    pub requests: u32,
    /// Publishes after which the guest asked to be notified (it polls).
    pub notifications: u32,
    /// Conversations dropped.
    pub faults: u32,
    /// In-band calls and errors sent on the back-end channel.
    pub in_band: u32,
}

/// The back-end: everything a firmware keeps (a few KiB, mostly the
/// message buffer).
#[derive(Debug)]
pub struct Backend<'a> {
    session: BlkSession,
    device: RamDisk<'a>,
    mem: Memory<'a>,
    area: Memory<'a>,
    rings: [Option<DataPlane>; QUEUES],
    plans: [Plan; QUEUES],
    suspend: [bool; QUEUES],
    chain: Chain<CHAIN_CAPACITY>,
    rx: [u8; MAX_MESSAGE],
    tx: [u8; REPLY_CAPACITY],
    /// The last message's outcome (kept here, not on the stack).
    outcome: Outcome,
    counters: Counters,
    /// The back-end channel, once SET_BACKEND_REQ_FD named it.
    channel: Option<Channel>,
    /// Per ring (bit `q`): an in-band call, and an in-band error, owed.
    owed_calls: u8,
    owed_errors: u8,
}

/// How many fds a message would carry on a socket, which on this channel
/// stand for the shared windows (see the [crate documentation](crate)).
pub fn implicit_fds(header: &Header, payload: &[u8]) -> usize {
    match FrontendReq::try_from(header.request) {
        Ok(FrontendReq::SetMemTable) => payload
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, |b| u32::from_ne_bytes(b) as usize)
            .min(MAX_MEM_REGIONS),
        Ok(FrontendReq::AddMemReg | FrontendReq::SetInflightFd | FrontendReq::SetBackendReqFd) => 1,
        _ => 0,
    }
}

impl<'a> Backend<'a> {
    /// A back-end over the RAM window `ram`, the disk `disk` and the
    /// inflight window `inflight`.
    // Out of line, and the arrays from `from_fn` rather than whole
    // constants: the firmware then builds the back-end in one place
    // instead of assembling and copying it in its entry point (.text).
    #[inline(never)]
    pub fn new(
        ram: &'a [AtomicU32],
        disk: &'a [AtomicU32],
        inflight: &'a [AtomicU32],
    ) -> Result<Self, BackendError> {
        let device = RamDisk::new(disk, b"vhu-nostd-ramdisk").map_err(|_| BackendError::Config)?;
        let config = BackendConfig {
            features: RING_FEATURES.union(device.offered_features()),
            protocol_features: PROTOCOL_FEATURES,
            num_queues: QUEUES as u16,
            max_queue_size: MAX_QUEUE_SIZE,
        };
        Ok(Backend {
            session: Session::new(config)?,
            device,
            mem: SharedMemory::new(ram),
            area: SharedMemory::new(inflight),
            rings: core::array::from_fn(|_| None),
            plans: core::array::from_fn(|_| Plan::new()),
            suspend: [false; QUEUES],
            chain: Chain::default(),
            rx: [0; MAX_MESSAGE],
            tx: [0; REPLY_CAPACITY],
            outcome: Outcome::default(),
            counters: Counters::default(),
            channel: None,
            owed_calls: 0,
            owed_errors: 0,
        })
    }

    /// The session.
    pub fn session(&self) -> &BlkSession {
        &self.session
    }

    /// Ring `queue`'s data plane, while it runs.
    pub fn ring(&self, queue: usize) -> Option<&DataPlane> {
        self.rings.get(queue)?.as_ref()
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// One round of the main loop: the next message if one is waiting,
    /// then up to a ring's worth of requests of each running ring. Returns
    /// whether anything was done. On a fault the conversation is dropped
    /// ([`disconnect`](Self::disconnect)); the caller discards what is
    /// left in the channel.
    pub fn poll<C: Read + Write>(&mut self, chan: &mut NoFds<C>) -> Result<bool, Fault> {
        let mut busy = match self.on_message(chan) {
            Ok(b) => b,
            Err(e) => {
                self.counters.faults = self.counters.faults.wrapping_add(1);
                self.disconnect();
                return Err(e);
            }
        };
        for q in 0..QUEUES {
            for _ in 0..MAX_QUEUE_SIZE {
                if !self.serve_request(q) {
                    break;
                }
                busy = true;
            }
        }
        Ok(busy)
    }

    /// Reads and handles one message, if one is waiting, and sends its
    /// reply. Returns whether there was one.
    #[inline(never)]
    pub fn on_message<C: Read + Write>(&mut self, chan: &mut NoFds<C>) -> Result<bool, Fault> {
        if !self.receive(chan)? {
            return Ok(false);
        }
        self.counters.messages = self.counters.messages.wrapping_add(1);
        if self.outcome.refused.is_some() {
            self.counters.refused = self.counters.refused.wrapping_add(1);
        }
        let mut i = 0;
        while let Some(&a) = self.outcome.actions.get(i) {
            self.apply(&a)?;
            i += 1;
        }
        let n = match self.outcome.reply {
            Reply::None => return Ok(true),
            Reply::Ready(n) => n,
            Reply::Pending { queue } => {
                let suspend = self.suspend.get(usize::from(queue)) == Some(&true);
                let base = self.halt(usize::from(queue), suspend).ok_or(Fault::Stop)?;
                self.session
                    .finish_stop(queue, base, &mut self.tx)
                    .map_err(Fault::Session)?
            }
            // DEVICE_STATE is never offered here (nor built without the
            // core's `migration` feature).
            Reply::TransferPending => return Err(Fault::Session(BackendError::Unsupported)),
        };
        let reply = self.tx.get(..n).ok_or(Fault::Transport)?;
        write_message(chan, reply).map_err(|_| Fault::Transport)?;
        Ok(true)
    }

    /// Reads the next message, if one is waiting, and lets the session
    /// handle it into `self.outcome` (out of line: its stack is not
    /// added to that of the actions).
    #[inline(never)]
    fn receive<C: Read + Write>(&mut self, chan: &mut NoFds<C>) -> Result<bool, Fault> {
        let frame = match read_message(chan, &mut self.rx) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(false),
            Err(_) => return Err(Fault::Transport),
        };
        let nfds = implicit_fds(&frame.header, frame.payload);
        self.session
            .handle_into(
                &frame.header,
                frame.payload,
                &nfds,
                &self.mem,
                &mut self.device,
                &mut self.tx,
                &mut self.outcome,
            )
            .map_err(Fault::Session)?;
        Ok(true)
    }

    /// Serves one request of ring `queue`: pop, process, complete,
    /// publish. Returns whether there was one.
    #[inline(never)]
    pub fn serve_request(&mut self, queue: usize) -> bool {
        let (Some(Some(dp)), Some(plan)) = (self.rings.get_mut(queue), self.plans.get_mut(queue))
        else {
            return false;
        };
        let area = self.area.is_mapped().then_some(&self.area);
        let mem = &self.mem;
        let healthy = dp.error().is_none();
        let served = serve_one(dp, mem, area, &mut self.chain, &self.device, queue, plan);
        // A ring the guest just broke owes the front-end an error (in-band
        // when the session says so).
        if cfg!(feature = "inband")
            && healthy
            && dp.error().is_some()
            && self.session.err_in_band(queue as u16)
        {
            self.owed_errors |= 1 << queue;
        }
        let Some(p) = served else {
            return false;
        };
        let p = p | dp.publish(mem, area).unwrap_or(Published::Nothing);
        if p.notify() {
            self.counters.notifications = self.counters.notifications.wrapping_add(1);
            if cfg!(feature = "inband") && self.session.call_in_band(queue as u16) {
                self.owed_calls |= 1 << queue;
            }
        }
        self.counters.requests = self.counters.requests.wrapping_add(1);
        true
    }

    /// The front-end left (or broke the conversation): rings are dropped
    /// as they are (with an inflight area, what they hold stays recorded
    /// for the next conversation to resubmit), memory is unmapped, and a
    /// fresh session waits for the next front-end.
    pub fn disconnect(&mut self) {
        self.rings = [const { None }; QUEUES];
        self.channel = None;
        self.owed_calls = 0;
        self.owed_errors = 0;
        self.mem.clear();
        self.area.clear();
        self.session.reset();
        self.device.reset();
    }

    /// The back-end channel's turn (call it in the main loop after
    /// [`poll`](Self::poll), with the second mailbox pair's end): takes the
    /// front-end's ack if one is awaited and waiting, then sends the next
    /// in-band error or call owed, if the channel is free. Returns whether
    /// anything was done. A malformed ack drops the conversation.
    #[cfg(feature = "inband")]
    #[inline(never)]
    pub fn poll_backend<C: Read + Write>(&mut self, back: &mut NoFds<C>) -> Result<bool, Fault> {
        let Some(ch) = &mut self.channel else {
            return Ok(false);
        };
        let mut busy = false;
        if ch.awaiting().is_some() {
            let frame = match read_message(back, &mut self.rx) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(false),
                Err(_) => return Err(self.fault(Fault::Transport)),
            };
            // A failed ack is the front-end's answer; a malformed one ends
            // the conversation.
            if let Err(ChannelError::Wire(_) | ChannelError::Unexpected) =
                ch.reply(&frame.header, frame.payload, 0)
            {
                return Err(self.fault(Fault::Transport));
            }
            busy = true;
        }
        let (errors, calls) = (self.owed_errors, self.owed_calls);
        let (bits, err) = if errors != 0 {
            (errors, true)
        } else {
            (calls, false)
        };
        if bits == 0 {
            return Ok(busy);
        }
        let q = bits.trailing_zeros() as u16;
        let sent = if err {
            self.owed_errors &= !(1 << q);
            ch.vring_err(q, &mut self.tx)
        } else {
            self.owed_calls &= !(1 << q);
            ch.vring_call(q, &mut self.tx)
        };
        let n = sent.map_err(|_| Fault::Transport)?.len;
        let msg = self.tx.get(..n).ok_or(Fault::Transport)?;
        write_message(back, msg).map_err(|_| Fault::Transport)?;
        self.counters.in_band = self.counters.in_band.wrapping_add(1);
        Ok(true)
    }

    #[cfg(feature = "inband")]
    fn fault(&mut self, e: Fault) -> Fault {
        self.counters.faults = self.counters.faults.wrapping_add(1);
        self.disconnect();
        e
    }

    fn running(&self) -> bool {
        self.rings.iter().any(Option::is_some)
    }

    #[inline(never)]
    fn apply(&mut self, action: &Action) -> Result<(), Fault> {
        match *action {
            Action::UnmapAll => self.mem.clear(),
            Action::MapRegion { slot, region, .. } => self
                .mem
                .map(
                    slot.into(),
                    region.guest_addr,
                    region.size,
                    region.mmap_offset,
                )
                .map_err(|_| Fault::Memory)?,
            Action::UnmapRegion { slot } => self.mem.unmap(slot.into()),
            Action::RemapRings => {
                for (q, ring) in self.rings.iter_mut().enumerate() {
                    if let Some(dp) = ring {
                        let addrs = self.session.ring_addrs(q as u16).map_err(Fault::Session)?;
                        // A ring that no longer fits is broken, as the
                        // data plane decides.
                        let _ = dp.set_addrs(addrs);
                    }
                }
            }
            // No eventfds on this channel: rings are polled, so an in-band
            // kick has nothing to wake.
            Action::SetKick { .. }
            | Action::SetCall { .. }
            | Action::SetErr { .. }
            | Action::Kick { .. } => {}
            // Dirty logging is never offered here (LOG_SHMFD is not in
            // PROTOCOL_FEATURES, and the firmware builds the core without
            // its `migration` feature).
            Action::MapLog { .. }
            | Action::SetLogFd { .. }
            | Action::SetLogging { .. }
            | Action::SetRingLog { .. }
            | Action::TransferState { .. } => {
                return Err(Fault::Session(BackendError::Unsupported))
            }
            // The back-end channel is the second mailbox pair (never set
            // without the `inband` feature: BACKEND_REQ is not offered).
            Action::SetBackendChannel { .. } => {
                if cfg!(feature = "inband") {
                    self.channel = self.session.channel();
                }
            }
            Action::StartRing { queue } => {
                let q = usize::from(queue);
                let area = self.area.is_mapped().then_some(&self.area);
                let dp = self
                    .session
                    .start_ring(queue, &self.mem, area, self.device.consume_while_disabled())
                    .map_err(Fault::Session)?;
                if let (Some(r), Some(p)) = (self.rings.get_mut(q), self.plans.get_mut(q)) {
                    *r = Some(dp);
                    *p = Plan::new();
                }
            }
            Action::StopRing { queue, suspend } => {
                if let Some(s) = self.suspend.get_mut(usize::from(queue)) {
                    *s = suspend;
                }
            }
            // The area's window is the one of SET_INFLIGHT_FD; running
            // rings keep using it, so it does not change under them.
            Action::CreateInflight { size } => {
                if self.running() {
                    return Err(Fault::Inflight);
                }
                self.area.zero_window(size).map_err(|_| Fault::Inflight)?;
            }
            Action::MapInflight { offset, size, .. } => {
                if self.running() {
                    return Err(Fault::Inflight);
                }
                self.area
                    .map(0, 0, size, offset)
                    .map_err(|_| Fault::Inflight)?;
            }
            Action::UnmapInflight => {
                if self.running() {
                    return Err(Fault::Inflight);
                }
                self.area.clear();
            }
            Action::SetEnabled { queue, enabled } => {
                if let Some(Some(dp)) = self.rings.get_mut(usize::from(queue)) {
                    dp.set_enabled(enabled);
                }
            }
            Action::ResetRings => {
                for q in 0..QUEUES {
                    let _ = self.halt(q, false);
                }
                self.session.rings_reset();
            }
        }
        Ok(())
    }

    /// Stops ring `q` (draining, or suspending into the inflight area) and
    /// drops its data plane; returns its GET_VRING_BASE value.
    #[inline(never)]
    fn halt(&mut self, q: usize, suspend: bool) -> Option<u32> {
        let mut dp = self.rings.get_mut(q)?.take()?;
        let plan = self.plans.get_mut(q)?;
        let area = self.area.is_mapped().then_some(&self.area);
        // The RAM disk completes every request at once, so a drain only
        // has the recorded requests left to serve: a ring's worth of
        // rounds is plenty.
        for _ in 0..=MAX_QUEUE_SIZE {
            match dp.stop(&self.mem, area, suspend).0 {
                Stop::Stopped { base } => return Some(base),
                Stop::Draining => {
                    while serve_one(
                        &mut dp,
                        &self.mem,
                        area,
                        &mut self.chain,
                        &self.device,
                        q,
                        plan,
                    )
                    .is_some()
                    {}
                }
            }
        }
        None
    }
}

/// Pops, processes and completes one request; `None` if there was none
/// (or the ring refused it).
fn serve_one<M: GuestMemory + ?Sized>(
    dp: &mut DataPlane,
    mem: &M,
    area: Option<&M>,
    chain: &mut Chain<CHAIN_CAPACITY>,
    device: &RamDisk<'_>,
    queue: usize,
    plan: &mut Plan,
) -> Option<Published> {
    let token = dp.pop(mem, area, chain).ok()??;
    match device.process(queue as u16, chain, token, mem, plan) {
        Completion::Done(len) => dp.complete(mem, area, token, len).ok(),
        // The RAM disk never defers.
        Completion::Later => Some(Published::Nothing),
    }
}

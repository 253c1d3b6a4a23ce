//! A deterministic in-memory pair: the core's front-end engine and back-end
//! session connected by function calls, over one guest memory, with the
//! guest's rings laid out by [`SplitDriver`] and [`PackedDriver`] (in the
//! mould of quinn-proto's test `Pair` and rustls' `make_pair` /
//! `do_handshake`).
//!
//! - [`Backend`]: a back-end host as a Linux adapter would be, without
//!   sockets or threads: a [`Session`], the guest RAM ([`TestMemory`], shared
//!   with the guest), the inflight area, one [`DataPlane`] per running ring,
//!   the [`Device`], and the worker steps ([`serve`](Backend::serve),
//!   [`take`](Backend::take), [`complete_held`](Backend::complete_held)).
//!   [`send`](Backend::send) delivers hand-written (possibly hostile)
//!   messages and returns what the session made of them.
//! - [`Pair`]: the core's [`Frontend`] engine driven against a [`Backend`]
//!   ([`drive`](Pair::drive)), recording the messages sent and the events.
//! - [`RingSpec`] and [`GuestRing`]: where a guest ring lives, what the
//!   front-end is told about it, and the guest driver that posts to it.
//! - [`TestDevice`]: a small device for protocol tests.
//!
//! Everything is deterministic: no threads, no clocks, no randomness. A
//! ring is served only when a test says so.
//!
//! ```
//! use vhost_user_core::backend::{BackendConfig, SUPPORTED_PROTOCOL_FEATURES};
//! use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
//! use vhost_user_core::frontend::FrontendConfig;
//! use vhost_user_test::pair::{Backend, Pair, RingSpec, TestDevice};
//! use vhost_user_test::{region, Buf};
//!
//! let features = V::VERSION_1 | V::PROTOCOL_FEATURES;
//! let config = BackendConfig {
//!     features,
//!     protocol_features: SUPPORTED_PROTOCOL_FEATURES,
//!     num_queues: 1,
//!     max_queue_size: 256,
//! };
//! let be = Backend::<_, 1, 8>::new(config, TestDevice::default(), &[(0, 1 << 20)]).unwrap();
//! let ring = RingSpec::split(16, 0x1000);
//! let mut fc = FrontendConfig::new(features, P::MQ | P::REPLY_ACK);
//! fc.queues.push(ring.queue(0)).unwrap();
//! fc.regions.push(region(0, 1 << 20)).unwrap();
//! let mut p = Pair::new(be, fc).unwrap();
//! let mut guest = ring.lay_out(&p.be.mem).unwrap();
//! p.drive();
//! p.start().unwrap();
//!
//! p.be.device.fill = 0xab;
//! guest.post(&p.be.mem, &[Buf::writable(0x8000, 4)]).unwrap();
//! assert_eq!(p.be.serve(0).unwrap(), 1);
//! assert_eq!(guest.harvest(&p.be.mem).unwrap().unwrap().len, 4);
//! assert_eq!(p.be.mem.read_vec(0x8000, 4).unwrap(), [0xab; 4]);
//! assert_eq!(p.stop().unwrap(), [0]);
//! ```

use std::fmt;

use vhost_user_core::backend::{
    Action, BackendConfig, BackendError, Channel, Outcome, Reply, Session,
    SUPPORTED_PROTOCOL_FEATURES,
};
use vhost_user_core::dataplane::{DataPlane, DataPlaneError, Published, Stop, Token};
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::{ProtocolFeatures, VirtioFeatures};
use vhost_user_core::frontend::{
    BackendNotice, Event, FdRef, Frontend, FrontendConfig, FrontendError, NotifyMode, QueueConfig,
    MAX_TRANSMIT,
};
use vhost_user_core::inflight::InflightError;
use vhost_user_core::log::{DirtyLog, LoggedMemory};
use vhost_user_core::memory::{GuestMemory, MemoryError};
use vhost_user_core::message::{
    ConfigWriteKind, DeviceStateDirection, FrontendReq, Header, ParseOptions, Reply as WireReply,
    Request, HEADER_SIZE, MAX_MESSAGE,
};
use vhost_user_core::vring::{Chain, RingAddrs};

use crate::driver::{self, Buf, DriverError, PackedDriver, SplitDriver, Used};
use crate::memory::TestMemory;

/// The largest inflight area the back-end allocates: a larger size (a
/// hostile front-end's) is refused, as a failed mmap would be.
pub const MAX_AREA: u64 = 64 << 20;

/// A request taken from a ring and not yet handed to the device
/// ([`Backend::take`]).
#[derive(Clone, Debug)]
pub struct Held {
    /// The data plane's token.
    pub token: Token,
    /// The descriptor chain, as popped.
    pub chain: Chain,
}

/// A ring stop the back-end carried out (GET_VRING_BASE, RESET_DEVICE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingStop {
    /// Ring index.
    pub queue: u16,
    /// The GET_VRING_BASE value.
    pub base: u32,
    /// Requests completed while the stop drained the ring.
    pub drained: usize,
    /// The stop was asked to suspend (GET_VRING_BASE_INFLIGHT, message 45).
    pub suspend: bool,
}

/// One running ring: its data plane and its worker's state.
struct Ring<S> {
    dp: DataPlane,
    scratch: S,
    held: Vec<Held>,
    chain: Box<Chain>,
}

/// What the back-end lends a ring's worker for one step.
struct Host<'a, D> {
    q: u16,
    mem: &'a TestMemory,
    area: Option<&'a TestMemory>,
    device: &'a D,
    /// The dirty log, when one is mapped.
    log: Option<DirtyLog<'a, TestMemory>>,
    /// VHOST_F_LOG_ALL: device writes are logged.
    all: bool,
    /// The ring's used-ring log address (VHOST_VRING_F_LOG).
    ring_log: Option<u64>,
}

impl<D> Host<'_, D> {
    /// Marks the ring's used ring, if it logs it.
    fn log_used(&self, dp: &DataPlane, t: &mut Tally) {
        if let (Some(log), Some(at)) = (&self.log, self.ring_log) {
            match dp.log_used(log, at) {
                Ok(n) => t.pages += n,
                Err(_) => t.log_failed += 1,
            }
        }
    }
}

/// The completions of one worker step.
struct Tally {
    completed: usize,
    published: Published,
    /// Pages marked in the dirty log, and marks refused.
    pages: u64,
    log_failed: u64,
}

impl Tally {
    fn complete<D>(
        &mut self,
        h: &Host<'_, D>,
        dp: &mut DataPlane,
        token: Token,
        len: u32,
    ) -> Result<(), DataPlaneError> {
        self.published = self.published | dp.complete(h.mem, h.area, token, len)?;
        self.completed += 1;
        Ok(())
    }
}

/// Hands one request to the device (writing through `dev`); completes it
/// if it is done at once.
fn process<D: Device>(
    h: &Host<'_, D>,
    dev: &LoggedMemory<'_, TestMemory, TestMemory>,
    dp: &mut DataPlane,
    scratch: &mut D::Scratch,
    (token, chain): (Token, &Chain),
    t: &mut Tally,
) -> Result<(), DataPlaneError> {
    match h.device.process(h.q, chain, token, dev, scratch) {
        Completion::Done(len) => t.complete(h, dp, token, len),
        Completion::Later => Ok(()),
    }
}

impl<S> Ring<S> {
    /// One worker round: the `held` requests processed in that order, then
    /// (with `pop`) every request the ring hands out, then the device's
    /// later completions, then one publish.
    fn round<D: Device<Scratch = S>>(
        &mut self,
        h: &Host<'_, D>,
        held: Vec<Held>,
        pop: bool,
    ) -> Result<Tally, DataPlaneError> {
        let mut t = Tally {
            completed: 0,
            published: Published::Nothing,
            pages: 0,
            log_failed: 0,
        };
        // Device writes are marked while VHOST_F_LOG_ALL is on.
        let dev = LoggedMemory::new(h.mem, h.log.filter(|_| h.all));
        let (dp, scratch) = (&mut self.dp, &mut self.scratch);
        for x in held {
            process(h, &dev, dp, scratch, (x.token, &x.chain), &mut t)?;
        }
        if pop {
            while let Some(token) = dp.pop(h.mem, h.area, &mut *self.chain)? {
                process(h, &dev, dp, scratch, (token, &self.chain), &mut t)?;
            }
        }
        let mut later = Vec::new();
        h.device.poll(h.q, &dev, scratch, &mut |token, len| {
            later.push((token, len))
        });
        for (token, len) in later {
            t.complete(h, dp, token, len)?;
        }
        t.published = t.published | dp.publish(h.mem, h.area)?;
        t.pages += dev.pages();
        t.log_failed += dev.failed();
        h.log_used(dp, &mut t);
        Ok(t)
    }

    /// Takes `order`'s positions of the held requests out, in that order.
    fn pick(&mut self, order: &[usize]) -> Vec<Held> {
        let mut slots: Vec<Option<Held>> = self.held.drain(..).map(Some).collect();
        let picked = order
            .iter()
            .map(|&i| {
                slots
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or_else(|| panic!("no held request {i} (or named twice)"))
            })
            .collect();
        self.held = slots.into_iter().flatten().collect();
        picked
    }
}

/// A back-end host in memory: what a Linux adapter does with a
/// [`Session`]'s actions and a ring's requests, without sockets, threads or
/// clocks.
///
/// The guest RAM ([`mem`](Self::mem)) is shared with the guest (and the
/// front-end): mapping actions are no-ops on it, and a region the
/// front-end names that it does not back simply faults on access. The
/// inflight area ([`area`](Self::area)) stands for the shared-memory fd: it
/// is created by GET_INFLIGHT_FD (or by the first SET_INFLIGHT_FD of a
/// front-end that brings its own), and survives [`kill`](Self::kill), as
/// the front-end keeps the fd across a back-end restart.
///
/// Rings run only when told to: [`serve`](Self::serve) is one round of a
/// ring's worker. A stop ([`Action::StopRing`], RESET_DEVICE) drains the
/// ring (the requests [`take`](Self::take) holds are processed, the
/// device's later completions polled) or suspends it, as the data plane
/// decides; a device must complete what it holds when polled, or the drain
/// panics.
pub struct Backend<D: Device, const Q: usize = 4, const R: usize = 8> {
    /// The session engine.
    pub session: Session<Q, R>,
    /// The guest RAM.
    pub mem: TestMemory,
    /// The device.
    pub device: D,
    /// The inflight area, when one was created or mapped.
    pub area: Option<TestMemory>,
    /// The ring stops carried out, in order.
    pub stops: Vec<RingStop>,
    rings: Vec<Option<Ring<D::Scratch>>>,
    /// Per ring: the pending stop suspends (from [`Action::StopRing`]).
    suspend: Vec<bool>,
    /// Per ring: publishes after which the guest wanted a notification.
    calls: Vec<u32>,
    /// A GET_VRING_BASE answered with [`Reply::Pending`].
    pending: Option<u16>,
    /// The back-end channel's encoder, once SET_BACKEND_REQ_FD came.
    pub channel: Option<Channel>,
    /// Back-end requests sent on the channel and not yet delivered to the
    /// front-end (in-band calls and errors; [`Pair::drive`] delivers them).
    pub outbox: Vec<Vec<u8>>,
    /// Per ring: in-band VRING_KICKs received for a running ring.
    pub kicks: Vec<u32>,
    /// Per ring: ring errors reported (the data plane broke on guest
    /// input), in-band or not.
    pub errors: Vec<u32>,
    /// The fd the front-end's next SET_LOG_BASE carries, as mapping it
    /// would find it.
    pub log_fd: LogFd,
    /// The dirty log (SET_LOG_BASE), as mapped: the front-end's shared
    /// memory, where a test reads the bits.
    pub log: Option<TestMemory>,
    /// The log's size in bytes.
    pub log_size: u64,
    /// VHOST_F_LOG_ALL is on (from [`Action::SetLogging`]).
    pub log_all: bool,
    /// Per ring: the used-ring log address (VHOST_VRING_F_LOG).
    pub ring_log: Vec<Option<u64>>,
    /// SET_LOG_FD gave an eventfd; how many times it was signalled (after
    /// a step that set bits).
    pub log_signals: Option<u32>,
    /// Pages marked in the log, and marks refused (beyond the log).
    pub dirty_pages: u64,
    /// Marks refused.
    pub log_failed: u64,
    /// Device state transfers started (SET_DEVICE_STATE_FD accepted), in
    /// order.
    pub transfers: Vec<DeviceStateDirection>,
    /// A CHECK_DEVICE_STATE answered with [`Reply::TransferPending`]
    /// waits for [`finish_transfer`](Self::finish_transfer).
    pub check_pending: bool,
}

/// The fd of a SET_LOG_BASE, as the Linux adapter would find it when
/// mapping it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFd {
    /// Shared memory (a memfd) of this many bytes.
    Shared(u64),
    /// Not shared memory (a pipe, a socket, a file opened read-only): the
    /// mapping fails.
    NotShared,
}

impl<D: Device, const Q: usize, const R: usize> fmt::Debug for Backend<D, Q, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let running: Vec<usize> = (0..self.rings.len())
            .filter(|&q| self.rings[q].is_some())
            .collect();
        f.debug_struct("Backend")
            .field("session", &self.session)
            .field("running", &running)
            .field("area", &self.area.is_some())
            .field("stops", &self.stops)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<D: Device, const Q: usize, const R: usize> Backend<D, Q, R> {
    /// A back-end for `device` offering `config`, over guest RAM made of
    /// the zero-filled regions `ram` (`(gpa, size)`).
    pub fn new(config: BackendConfig, device: D, ram: &[(u64, u64)]) -> Result<Self, BackendError> {
        let session = Session::new(config)?;
        let n = usize::from(config.num_queues);
        Ok(Backend {
            session,
            mem: TestMemory::new(ram)?,
            device,
            area: None,
            stops: Vec::new(),
            rings: (0..n).map(|_| None).collect(),
            suspend: vec![false; n],
            calls: vec![0; n],
            pending: None,
            channel: None,
            outbox: Vec::new(),
            kicks: vec![0; n],
            errors: vec![0; n],
            log_fd: LogFd::Shared(MAX_AREA),
            log: None,
            log_size: 0,
            log_all: false,
            ring_log: vec![None; n],
            log_signals: None,
            dirty_pages: 0,
            log_failed: 0,
            transfers: Vec::new(),
            check_pending: false,
        })
    }

    /// Encodes `req` (with NEED_REPLY if `need_reply`) and delivers it with
    /// as many fds as it must carry; see [`send_raw`](Self::send_raw).
    pub fn send(
        &mut self,
        req: &Request<'_>,
        need_reply: bool,
    ) -> Result<(Outcome, Vec<u8>), BackendError> {
        let mut msg = [0u8; MAX_MESSAGE];
        let n = req.encode(need_reply, &mut msg)?;
        self.send_raw(&msg[..n], usize::from(req.fd_rule().min))
    }

    /// Delivers the message `msg` (header and payload, any bytes) with
    /// `nfds` fds, carries out the session's actions, and returns the
    /// outcome and the reply bytes (empty without a reply, and while a stop
    /// is pending: see [`finish_stop`](Self::finish_stop)). An error is
    /// what ends the connection (the session's, or an action that could
    /// not be carried out).
    pub fn send_raw(
        &mut self,
        msg: &[u8],
        nfds: usize,
    ) -> Result<(Outcome, Vec<u8>), BackendError> {
        let header = Header::parse(msg)?;
        let payload = msg.get(HEADER_SIZE..).unwrap_or_default();
        let mut out = vec![0u8; MAX_MESSAGE];
        let o = self.session.handle(
            &header,
            payload,
            &nfds,
            &self.mem,
            &mut self.device,
            &mut out,
        )?;
        for a in &o.actions {
            self.apply(a)?;
        }
        let reply = match o.reply {
            Reply::Ready(n) => out[..n].to_vec(),
            Reply::Pending { queue } => {
                self.pending = Some(queue);
                Vec::new()
            }
            Reply::TransferPending => {
                self.check_pending = true;
                Vec::new()
            }
            Reply::None => Vec::new(),
        };
        Ok((o, reply))
    }

    /// [`send`](Self::send) of a request answered with a u64 (GET_FEATURES,
    /// GET_STATUS, …): the value.
    ///
    /// # Panics
    ///
    /// If the request is refused or not answered with a u64.
    pub fn u64_reply(&mut self, req: Request<'_>) -> u64 {
        let (_, reply) = self.send(&req, false).expect("request refused");
        u64_of(req.code(), &reply)
    }

    /// [`send`](Self::send) with NEED_REPLY: the outcome and the REPLY_ACK
    /// value (0: success).
    ///
    /// # Panics
    ///
    /// If the request ends the connection or is not acked.
    pub fn ack(&mut self, req: Request<'_>) -> (Outcome, u64) {
        let (o, reply) = self.send(&req, true).expect("request refused");
        (o, u64_of(req.code(), &reply))
    }

    /// What a Linux adapter does with one action.
    fn apply(&mut self, action: &Action) -> Result<(), BackendError> {
        match *action {
            // The guest RAM is shared; the session's table decides what
            // translates. Notifiers are not modelled (see `calls`).
            Action::UnmapAll
            | Action::MapRegion { .. }
            | Action::UnmapRegion { .. }
            | Action::SetKick { .. }
            | Action::SetCall { .. }
            | Action::SetErr { .. } => {}
            Action::RemapRings => {
                for (q, r) in self.rings.iter_mut().enumerate() {
                    if let Some(r) = r {
                        // A ring that no longer fits is broken (its error).
                        let _ = r.dp.set_addrs(self.session.ring_addrs(q as u16)?);
                    }
                }
            }
            Action::StartRing { queue } => {
                if let Some(l) = self.ring_log.get_mut(usize::from(queue)) {
                    *l = self.session.ring_log(queue);
                }
                let dp = self.session.start_ring(
                    queue,
                    &self.mem,
                    self.area.as_ref(),
                    self.device.consume_while_disabled(),
                )?;
                if let Some(slot) = self.rings.get_mut(usize::from(queue)) {
                    *slot = Some(Ring {
                        dp,
                        scratch: D::Scratch::default(),
                        held: Vec::new(),
                        chain: Box::default(),
                    });
                }
            }
            Action::StopRing { queue, suspend } => {
                if let Some(s) = self.suspend.get_mut(usize::from(queue)) {
                    *s = suspend;
                }
            }
            Action::CreateInflight { size } => self.area = Some(new_area(size)?),
            Action::MapInflight { size, .. } => match &self.area {
                // The fd the back-end created (or the front-end kept across
                // a restart): the same bytes.
                Some(a) if a.check(0, size).is_ok() => {}
                Some(_) => return Err(area_error()),
                None => self.area = Some(new_area(size)?),
            },
            Action::UnmapInflight => self.area = None,
            Action::SetEnabled { queue, enabled } => {
                if let Some(r) = self.ring_mut(queue) {
                    r.dp.set_enabled(enabled);
                }
            }
            Action::ResetRings => {
                for q in 0..self.rings.len() {
                    self.stop_ring(q as u16, false);
                }
                self.session.rings_reset();
            }
            Action::SetBackendChannel { .. } => self.channel = self.session.channel(),
            Action::Kick { queue } => {
                if let Some(k) = self.kicks.get_mut(usize::from(queue)) {
                    *k += 1;
                }
            }
            Action::MapLog { offset, size, .. } => {
                // What mmap of the fd would say: past its end, or not
                // shared memory, is refused (the connection ends).
                let fits = match self.log_fd {
                    LogFd::Shared(len) => offset.checked_add(size).is_some_and(|end| end <= len),
                    LogFd::NotShared => false,
                };
                if !fits {
                    return Err(BackendError::LogTooSmall);
                }
                // A fresh area: the front-end's new log.
                self.log = Some(new_area(size)?);
                self.log_size = size;
            }
            Action::SetLogFd { .. } => self.log_signals = Some(0),
            Action::SetLogging { all } => self.log_all = all,
            Action::SetRingLog { queue, log } => {
                if let Some(l) = self.ring_log.get_mut(usize::from(queue)) {
                    *l = log;
                }
            }
            Action::TransferState { direction, .. } => self.transfers.push(direction),
        }
        Ok(())
    }

    /// Encodes a back-end request on the channel into the outbox; a
    /// request the channel refuses (not negotiated, the previous ack not
    /// yet delivered) is not sent.
    fn send_backend(
        &mut self,
        make: impl FnOnce(
            &mut Channel,
            &mut [u8],
        ) -> Result<
            vhost_user_core::backend::Sent,
            vhost_user_core::backend::ChannelError,
        >,
    ) {
        if let Some(ch) = &mut self.channel {
            let mut buf = vec![0u8; MAX_MESSAGE];
            if let Ok(sent) = make(ch, &mut buf) {
                buf.truncate(sent.len);
                self.outbox.push(buf);
            }
        }
    }

    /// Tells the front-end the config space changed (CONFIG_CHANGE_MSG
    /// into the outbox).
    pub fn config_changed(&mut self) {
        self.send_backend(|c, out| c.config_change(out));
    }

    fn ring_mut(&mut self, q: u16) -> Option<&mut Ring<D::Scratch>> {
        self.rings.get_mut(usize::from(q))?.as_mut()
    }

    /// Ring `q`'s worker state and what it borrows from the back-end.
    fn worker(&mut self, q: u16) -> Result<(&mut Ring<D::Scratch>, Host<'_, D>), DataPlaneError> {
        let Backend {
            rings,
            mem,
            area,
            device,
            log,
            log_size,
            log_all,
            ring_log,
            ..
        } = self;
        let ring = rings
            .get_mut(usize::from(q))
            .and_then(Option::as_mut)
            .ok_or(DataPlaneError::Stopped)?;
        let host = Host {
            q,
            mem,
            area: area.as_ref(),
            device,
            log: log.as_ref().map(|l| DirtyLog::new(l, *log_size)),
            all: *log_all,
            ring_log: ring_log.get(usize::from(q)).copied().flatten(),
        };
        Ok((ring, host))
    }

    /// Counts a step's marks; signals the log eventfd if bits were set.
    fn logged(&mut self, pages: u64, failed: u64) {
        self.dirty_pages += pages;
        self.log_failed += failed;
        if pages > 0 {
            if let Some(n) = &mut self.log_signals {
                *n += 1;
            }
        }
    }

    fn notified(&mut self, q: u16, published: Published) {
        if published.notify() {
            if let Some(c) = self.calls.get_mut(usize::from(q)) {
                *c += 1;
            }
            if self.session.call_in_band(q) {
                self.send_backend(|c, out| c.vring_call(q, out));
            }
        }
    }

    /// Reports a ring broken on guest input: in-band VRING_ERR when the
    /// session says so (an err eventfd would be written otherwise).
    fn broken(&mut self, q: u16) {
        if let Some(e) = self.errors.get_mut(usize::from(q)) {
            *e += 1;
        }
        if self.session.err_in_band(q) {
            self.send_backend(|c, out| c.vring_err(q, out));
        }
    }

    /// One round of ring `q`'s worker: pops every request available, hands
    /// each to the device ([`Device::process`]), completes those done at
    /// once, completes those the device reports ([`Device::poll`]), and
    /// publishes. Returns the requests completed. A ring that is not
    /// running answers [`DataPlaneError::Stopped`].
    pub fn serve(&mut self, q: u16) -> Result<usize, DataPlaneError> {
        let (ring, host) = self.worker(q)?;
        let healthy = ring.dp.error().is_none();
        let round = ring.round(&host, Vec::new(), true);
        // Reported once, when the round broke the ring.
        let broke = healthy && ring.dp.error().is_some();
        if broke {
            self.broken(q);
        }
        let t = round?;
        self.logged(t.pages, t.log_failed);
        self.notified(q, t.published);
        Ok(t.completed)
    }

    /// Pops every request available on ring `q` and holds it without
    /// handing it to the device (requests in flight). Returns how many.
    pub fn take(&mut self, q: u16) -> Result<usize, DataPlaneError> {
        let (ring, host) = self.worker(q)?;
        let mut n = 0;
        while let Some(token) = ring.dp.pop(host.mem, host.area, &mut *ring.chain)? {
            ring.held.push(Held {
                token,
                chain: (*ring.chain).clone(),
            });
            n += 1;
        }
        Ok(n)
    }

    /// Hands the held requests at positions `order` of
    /// [`held`](Self::held) to the device in that order (the others stay
    /// held), completes them as the device says, polls it, and publishes.
    /// Returns the requests completed.
    ///
    /// # Panics
    ///
    /// If `order` names a position twice or past the end.
    pub fn complete_held(&mut self, q: u16, order: &[usize]) -> Result<usize, DataPlaneError> {
        let (ring, host) = self.worker(q)?;
        let picked = ring.pick(order);
        let t = ring.round(&host, picked, false)?;
        self.logged(t.pages, t.log_failed);
        self.notified(q, t.published);
        Ok(t.completed)
    }

    /// The requests ring `q` holds, in the order they were taken.
    pub fn held(&self, q: u16) -> &[Held] {
        self.ring_state(q).map_or(&[], |r| &r.held)
    }

    /// Ring `q`'s data plane, while it runs.
    pub fn ring(&self, q: u16) -> Option<&DataPlane> {
        self.ring_state(q).map(|r| &r.dp)
    }

    fn ring_state(&self, q: u16) -> Option<&Ring<D::Scratch>> {
        self.rings.get(usize::from(q))?.as_ref()
    }

    /// How many publishes of ring `q` asked for a guest notification (what
    /// the call eventfd would have been signalled).
    pub fn calls(&self, q: u16) -> u32 {
        self.calls.get(usize::from(q)).copied().unwrap_or(0)
    }

    /// The ring whose GET_VRING_BASE waits for
    /// [`finish_stop`](Self::finish_stop).
    pub fn pending_stop(&self) -> Option<u16> {
        self.pending
    }

    /// Stops ring `q` for a pending GET_VRING_BASE: drains or suspends it
    /// (as its [`Action::StopRing`] said) and returns the reply.
    pub fn finish_stop(&mut self, q: u16) -> Result<Vec<u8>, BackendError> {
        let suspend = self.suspend.get(usize::from(q)).copied().unwrap_or(false);
        let base = match self.stop_ring(q, suspend) {
            Some(base) => base,
            None => self.session.ring(q).map_or(0, |s| s.base),
        };
        if self.pending == Some(q) {
            self.pending = None;
        }
        let mut out = [0u8; HEADER_SIZE + 8];
        let n = self.session.finish_stop(q, base, &mut out)?;
        Ok(out[..n].to_vec())
    }

    /// Answers a pending CHECK_DEVICE_STATE: the transfer ended, `ok` or
    /// not. Returns the reply bytes.
    pub fn finish_transfer(&mut self, ok: bool) -> Result<Vec<u8>, BackendError> {
        self.check_pending = false;
        let mut out = [0u8; HEADER_SIZE + 8];
        let n = self.session.finish_transfer(ok, &mut out)?;
        Ok(out[..n].to_vec())
    }

    /// Stops ring `q`'s data plane, if it runs, and returns its base.
    fn stop_ring(&mut self, q: u16, suspend: bool) -> Option<u32> {
        let mut ring = self.rings.get_mut(usize::from(q))?.take()?;
        let mut drained = 0;
        let mut marks = Tally {
            completed: 0,
            published: Published::Nothing,
            pages: 0,
            log_failed: 0,
        };
        let base = loop {
            let host = Host {
                q,
                mem: &self.mem,
                area: self.area.as_ref(),
                device: &self.device,
                log: self.log.as_ref().map(|l| DirtyLog::new(l, self.log_size)),
                all: self.log_all,
                ring_log: self.ring_log.get(usize::from(q)).copied().flatten(),
            };
            let (stop, published) = ring.dp.stop(host.mem, host.area, suspend);
            let mut published = published.unwrap_or(Published::Nothing);
            let base = match stop {
                Stop::Stopped { base } => {
                    host.log_used(&ring.dp, &mut marks);
                    Some(base)
                }
                Stop::Draining => {
                    let waiting = ring.dp.resubmits_left();
                    host.device.stopping(q, &mut ring.scratch);
                    let held = std::mem::take(&mut ring.held);
                    let done = match ring.round(&host, held, true) {
                        Ok(t) => {
                            published = published | t.published;
                            marks.pages += t.pages;
                            marks.log_failed += t.log_failed;
                            t.completed
                        }
                        Err(_) => 0,
                    };
                    drained += done;
                    assert!(
                        done > 0 || ring.dp.resubmits_left() < waiting || ring.dp.error().is_some(),
                        "ring {q} cannot drain: the device holds {} requests and completes none",
                        ring.dp.outstanding()
                    );
                    None
                }
            };
            self.notified(q, published);
            if let Some(base) = base {
                break base;
            }
        };
        self.logged(marks.pages, marks.log_failed);
        self.stops.push(RingStop {
            queue: q,
            base,
            drained,
            suspend,
        });
        Some(base)
    }

    /// The back-end dies: the session, the data planes, the held requests
    /// and the device's per-ring scratch are gone, without a drain (what
    /// was in flight stays recorded in the inflight area); the guest RAM,
    /// the inflight area (the front-end keeps its fd) and the device stay.
    /// The back-end is ready for a new connection.
    pub fn kill(&mut self) {
        self.rings.iter_mut().for_each(|r| *r = None);
        self.suspend.fill(false);
        self.pending = None;
        // The log's mapping dies with the back-end; the next front-end
        // sends SET_LOG_BASE again.
        self.log = None;
        self.log_size = 0;
        self.log_all = false;
        self.ring_log.fill(None);
        self.log_signals = None;
        self.session =
            Session::new(*self.session.config()).expect("the configuration was accepted before");
    }
}

fn u64_of(code: FrontendReq, reply: &[u8]) -> u64 {
    let h = Header::parse(reply).expect("a reply");
    match WireReply::parse(code, &h, &reply[HEADER_SIZE..], 0, &ParseOptions::default()) {
        Ok(WireReply::U64(v)) => v,
        other => panic!("{code:?} answered {other:?}"),
    }
}

fn area_error() -> BackendError {
    BackendError::Inflight(InflightError::TooSmall)
}

/// A zeroed inflight area of `size` bytes (whole words).
fn new_area(size: u64) -> Result<TestMemory, BackendError> {
    if size == 0 || size > MAX_AREA {
        return Err(area_error());
    }
    TestMemory::new(&[(0, size.next_multiple_of(4))]).map_err(|_| area_error())
}

/// One message the front-end sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The request.
    pub code: FrontendReq,
    /// NEED_REPLY was set.
    pub need_reply: bool,
    /// The message: header and payload.
    pub bytes: Vec<u8>,
    /// The fds attached.
    pub fds: Vec<FdRef>,
}

impl Sent {
    /// The message, parsed.
    ///
    /// # Panics
    ///
    /// If the front-end engine sent a message that does not parse.
    pub fn request(&self) -> Request<'_> {
        let h = Header::parse(&self.bytes).expect("a header");
        Request::parse(
            &h,
            &self.bytes[HEADER_SIZE..],
            self.fds.len(),
            &ParseOptions::default(),
        )
        .expect("the front-end sent a valid message")
    }
}

/// Why [`Pair::try_drive`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveError {
    /// The front-end refused a reply or a command.
    Frontend(FrontendError),
    /// The back-end ended the connection.
    Backend(BackendError),
}

impl From<FrontendError> for DriveError {
    fn from(e: FrontendError) -> Self {
        DriveError::Frontend(e)
    }
}

impl From<BackendError> for DriveError {
    fn from(e: BackendError) -> Self {
        DriveError::Backend(e)
    }
}

impl fmt::Display for DriveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriveError::Frontend(e) => write!(f, "front-end: {e}"),
            DriveError::Backend(e) => write!(f, "back-end: {e}"),
        }
    }
}

impl std::error::Error for DriveError {}

/// The core's [`Frontend`] engine connected to a [`Backend`]: every message
/// is encoded by one side and parsed by the other; fds travel as counts and
/// are checked by index (each action's fd must be the one the front-end
/// attached for it).
pub struct Pair<D: Device, const Q: usize = 4, const R: usize = 8> {
    /// The front-end engine.
    pub fe: Frontend<Q, R>,
    /// The back-end.
    pub be: Backend<D, Q, R>,
    /// The messages the front-end sent, in order.
    pub sent: Vec<Sent>,
    /// The front-end's events, in order.
    pub events: Vec<Event>,
    /// Hold the reply to the first message with this code: [`drive`]
    /// stops there and keeps it in [`held_reply`](Self::held_reply)
    /// instead of handing it to the front-end.
    ///
    /// [`drive`]: Self::drive
    pub hold_at: Option<FrontendReq>,
    /// The reply held by [`hold_at`](Self::hold_at).
    pub held_reply: Option<Vec<u8>>,
    /// What the back-end's channel requests said, in order
    /// ([`deliver_backend`](Self::deliver_backend)).
    pub notices: Vec<BackendNotice>,
}

impl<D: Device, const Q: usize, const R: usize> fmt::Debug for Pair<D, Q, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pair")
            .field("fe", &self.fe)
            .field("be", &self.be)
            .field("sent", &self.sent.len())
            .field("events", &self.events)
            .field("hold_at", &self.hold_at)
            .finish_non_exhaustive()
    }
}

/// The test kit's usual pair: one ring of 16 at 0x1000, split or packed,
/// in 1 MiB of RAM; the back-end offers every protocol feature the engine
/// implements (ring sizes up to 64, both layouts), the front-end wants
/// `protocol` and kicks and calls by `notify`. Driven through the init;
/// not started.
///
/// # Panics
///
/// If the init does not go through.
pub fn one_ring(
    packed: bool,
    protocol: ProtocolFeatures,
    notify: NotifyMode,
) -> (Pair<TestDevice, 1, 8>, GuestRing) {
    const MIB: u64 = 1 << 20;
    let config = BackendConfig {
        features: VirtioFeatures::VERSION_1
            | VirtioFeatures::PROTOCOL_FEATURES
            | VirtioFeatures::RING_PACKED,
        protocol_features: SUPPORTED_PROTOCOL_FEATURES,
        num_queues: 1,
        max_queue_size: 64,
    };
    let be = Backend::new(config, TestDevice::default(), &[(0, MIB)]).expect("back-end");
    let mut features = VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES;
    let (ring, base) = if packed {
        features |= VirtioFeatures::RING_PACKED;
        (RingSpec::packed(16, 0x1000), 1 << 15 | 1 << 31)
    } else {
        (RingSpec::split(16, 0x1000), 0)
    };
    let mut fc = FrontendConfig::new(features, protocol);
    let mut q = ring.queue(base);
    q.kick = notify;
    q.call = notify;
    let _ = fc.queues.push(q);
    let _ = fc.regions.push(crate::region(0, MIB));
    let mut p = Pair::new(be, fc).expect("front-end");
    let guest = ring.lay_out(&p.be.mem).expect("ring layout");
    p.drive();
    (p, guest)
}

impl<D: Device, const Q: usize, const R: usize> Pair<D, Q, R> {
    /// A front-end engine with `config` facing `be`; nothing is sent until
    /// [`drive`](Self::drive).
    pub fn new(be: Backend<D, Q, R>, config: FrontendConfig<Q, R>) -> Result<Self, FrontendError> {
        Ok(Pair {
            fe: Frontend::new(config)?,
            be,
            sent: Vec::new(),
            events: Vec::new(),
            hold_at: None,
            held_reply: None,
            notices: Vec::new(),
        })
    }

    fn drain_events(&mut self) {
        while let Some(e) = self.fe.poll_event() {
            self.events.push(e);
        }
    }

    /// [`try_drive`](Self::try_drive).
    ///
    /// # Panics
    ///
    /// If either side refuses the other.
    pub fn drive(&mut self) {
        if let Err(e) = self.try_drive() {
            panic!("{e} (after {:?})", self.sent.last().map(|s| s.code));
        }
    }

    /// Delivers the back-end's channel requests ([`Backend::outbox`]) to
    /// the front-end engine ([`Frontend::serve_backend`]), records what
    /// they said in [`notices`](Self::notices), and hands each ack back to
    /// the back-end's channel. A refused ack is a back-end error.
    pub fn deliver_backend(&mut self) -> Result<(), DriveError> {
        for msg in std::mem::take(&mut self.be.outbox) {
            let h = Header::parse(&msg).map_err(FrontendError::from)?;
            let payload = msg.get(HEADER_SIZE..).unwrap_or_default();
            let mut out = [0u8; MAX_TRANSMIT];
            let served = self.fe.serve_backend(&h, payload, 0, &mut out)?;
            self.notices.push(served.notice);
            if let (Some(n), Some(ch)) = (served.reply, self.be.channel.as_mut()) {
                let rh = Header::parse(&out[..n]).map_err(FrontendError::from)?;
                ch.reply(&rh, &out[HEADER_SIZE..n], 0)
                    .map_err(|_| DriveError::Backend(BackendError::Unsupported))?;
            }
        }
        Ok(())
    }

    /// Moves messages both ways until the front-end has nothing to send or
    /// a reply is held ([`hold_at`](Self::hold_at)). A pending
    /// GET_VRING_BASE is finished by the back-end at once
    /// ([`Backend::finish_stop`]).
    pub fn try_drive(&mut self) -> Result<(), DriveError> {
        let mut buf = [0u8; MAX_TRANSMIT];
        loop {
            self.deliver_backend()?;
            self.drain_events();
            if self.held_reply.is_some() {
                return Ok(());
            }
            let Some(t) = self.fe.poll_transmit(&mut buf)? else {
                assert!(!self.fe.awaits_reply(), "reply awaited but none came");
                self.drain_events();
                return Ok(());
            };
            let msg = &buf[..t.len];
            let h = Header::parse(msg).map_err(FrontendError::from)?;
            assert_eq!(h.request, t.request.id());
            let sent = Sent {
                code: t.request,
                need_reply: h.need_reply(),
                bytes: msg.to_vec(),
                fds: t.fds.iter().copied().collect(),
            };
            // Every reply-less message that asks for an ack awaits it.
            assert_eq!(
                t.awaits_reply,
                t.request.has_reply() || sent.need_reply,
                "{sent:?}"
            );
            self.sent.push(sent);
            let (o, mut reply) = self.be.send_raw(msg, t.fds.len())?;
            self.check_fds(&o.actions, &t.fds);
            // The back-end attaches the area it created to the reply.
            let nfds = usize::from(
                o.actions
                    .iter()
                    .any(|a| matches!(a, Action::CreateInflight { .. })),
            );
            match o.reply {
                Reply::None => {
                    assert!(!t.awaits_reply, "no reply to {:?}", t.request);
                    continue;
                }
                Reply::Ready(_) => assert!(t.awaits_reply, "unexpected reply to {:?}", t.request),
                Reply::Pending { queue } => {
                    assert!(t.awaits_reply);
                    reply = self.be.finish_stop(queue)?;
                }
                // The in-memory transfer has nothing to move: it went well.
                Reply::TransferPending => {
                    assert!(t.awaits_reply);
                    reply = self.be.finish_transfer(true)?;
                }
            }
            if self.hold_at == Some(t.request) {
                self.held_reply = Some(reply);
                continue;
            }
            self.deliver(&reply, nfds)?;
        }
    }

    /// The fd indices of the back-end's actions name the fds the front-end
    /// attached for them.
    fn check_fds(&self, actions: &[Action], fds: &[FdRef]) {
        let fd = |i: u8| *fds.get(usize::from(i)).expect("an fd the message carries");
        for a in actions {
            match *a {
                Action::MapRegion { fd: i, region, .. } => {
                    let FdRef::Region(r) = fd(i) else {
                        panic!("region mapped from {:?}", fd(i));
                    };
                    assert_eq!(self.fe.regions()[usize::from(r)], region);
                }
                Action::SetKick { queue, fd: i } => {
                    assert_eq!(i.map(fd), i.map(|_| FdRef::Kick(queue)));
                }
                Action::SetCall { queue, fd: i } => {
                    assert_eq!(i.map(fd), i.map(|_| FdRef::Call(queue)));
                }
                Action::MapInflight { fd: i, .. } => assert_eq!(fd(i), FdRef::Inflight),
                Action::SetBackendChannel { fd: i } => assert_eq!(fd(i), FdRef::BackendChannel),
                Action::TransferState { fd: i, .. } => assert_eq!(fd(i), FdRef::DeviceState),
                Action::MapLog { fd: i, .. } => assert_eq!(fd(i), FdRef::Log),
                _ => {}
            }
        }
    }

    /// Hands `reply` (header and payload, any bytes) to the front-end with
    /// `nfds` fds, as the answer to the message in flight.
    pub fn deliver(&mut self, reply: &[u8], nfds: usize) -> Result<(), FrontendError> {
        let h = Header::parse(reply)?;
        self.fe
            .handle_reply(&h, reply.get(HEADER_SIZE..).unwrap_or_default(), nfds)
    }

    /// Starts the device ([`Frontend::start`]) and drives the start.
    pub fn start(&mut self) -> Result<(), DriveError> {
        self.fe.start()?;
        self.try_drive()
    }

    /// Stops the device ([`Frontend::stop`]) and drives the stop; returns,
    /// per ring stopped, the requests its drain completed.
    pub fn stop(&mut self) -> Result<Vec<usize>, DriveError> {
        let from = self.be.stops.len();
        self.fe.stop()?;
        self.try_drive()?;
        Ok(self.be.stops[from..].iter().map(|s| s.drained).collect())
    }

    /// The codes of the messages sent, with their NEED_REPLY flags.
    pub fn codes(&self) -> Vec<(FrontendReq, bool)> {
        self.sent.iter().map(|s| (s.code, s.need_reply)).collect()
    }

    /// The events so far, emptying the record.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The back-end crashes and the front-end reconnects: the back-end is
    /// [killed](Backend::kill), and a new front-end engine starts the init
    /// with the configuration of the old one, handing over its inflight
    /// area and resuming each ring from the base it knew. Drive it (and
    /// start it) as a new connection.
    pub fn restart(&mut self) -> Result<(), FrontendError> {
        let mut config = self.fe.config().clone();
        config.inflight = self.fe.inflight();
        for (q, c) in config.queues.iter_mut().enumerate() {
            c.base = self.fe.ring_base(q as u16).unwrap_or(c.base);
        }
        self.be.kill();
        self.fe = Frontend::new(config)?;
        self.held_reply = None;
        Ok(())
    }
}

/// Where a guest ring lives: its kind, size and guest physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSpec {
    /// Packed (else split).
    pub packed: bool,
    /// Entries.
    pub size: u16,
    /// Guest physical address (16-aligned).
    pub gpa: u64,
    /// The split driver decides kicks with EVENT_IDX.
    pub event_idx: bool,
}

impl RingSpec {
    /// A split ring of `size` entries at `gpa`.
    pub fn split(size: u16, gpa: u64) -> Self {
        RingSpec {
            packed: false,
            size,
            gpa,
            event_idx: false,
        }
    }

    /// A packed ring of `size` entries at `gpa`.
    pub fn packed(size: u16, gpa: u64) -> Self {
        RingSpec {
            packed: true,
            ..Self::split(size, gpa)
        }
    }

    /// The ring's areas (guest physical addresses).
    pub fn addrs(&self) -> RingAddrs {
        if self.packed {
            PackedDriver::layout(self.size, self.gpa)
        } else {
            SplitDriver::layout(self.size, self.gpa)
        }
    }

    /// The ring's areas as the front-end sends them (user addresses).
    pub fn user_addrs(&self) -> RingAddrs {
        driver::user_addrs(self.addrs())
    }

    /// The front-end's configuration of the ring, starting at `base`, with
    /// eventfd kick and call.
    pub fn queue(&self, base: u32) -> QueueConfig {
        QueueConfig {
            size: self.size,
            addrs: self.user_addrs(),
            base,
            kick: NotifyMode::Eventfd,
            call: NotifyMode::Eventfd,
        }
    }

    /// Lays the ring out in `mem` (zeroed) and returns its driver.
    pub fn lay_out<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<GuestRing, MemoryError> {
        Ok(if self.packed {
            GuestRing::Packed(PackedDriver::new(mem, self.size, self.gpa)?)
        } else {
            GuestRing::Split(SplitDriver::new(mem, self.size, self.gpa, self.event_idx)?)
        })
    }
}

/// The guest driver of a split or a packed ring.
#[derive(Debug)]
pub enum GuestRing {
    /// A split ring.
    Split(SplitDriver),
    /// A packed ring.
    Packed(PackedDriver),
}

impl GuestRing {
    /// Posts a chain of direct descriptors and makes it available; returns
    /// its id (split: head index; packed: buffer id).
    pub fn post<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        match self {
            GuestRing::Split(d) => d.post(mem, bufs),
            GuestRing::Packed(d) => d.post(mem, bufs),
        }
    }

    /// Posts `bufs` through an indirect table at `table` and makes it
    /// available; returns its id.
    pub fn post_indirect<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        table: u64,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        match self {
            GuestRing::Split(d) => {
                let id = d.add_indirect(mem, table, bufs)?;
                d.publish(mem)?;
                Ok(id)
            }
            GuestRing::Packed(d) => d.post_indirect(mem, table, bufs),
        }
    }

    /// Harvests one used entry.
    pub fn harvest<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<Used>, MemoryError> {
        match self {
            GuestRing::Split(d) => d.harvest(mem),
            GuestRing::Packed(d) => d.harvest(mem),
        }
    }

    /// Harvests every used entry available, in order.
    pub fn harvest_all<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Vec<Used>, MemoryError> {
        match self {
            GuestRing::Split(d) => d.harvest_all(mem),
            GuestRing::Packed(d) => d.harvest_all(mem),
        }
    }
}

/// A small device for protocol tests.
///
/// A 16-byte config space ([`config`](Self::config), initially 0, 1, 2, …)
/// whose byte 8 the front-end may write (a migration may write any byte);
/// resets are counted. Each request gets [`fill`](Self::fill) written into
/// every writable buffer and completes with their total length, at once,
/// or, with [`later`](Self::later), through [`Device::poll`] in reverse
/// order of arrival. A request without side effects completes with 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestDevice {
    /// The config space.
    pub config: [u8; 16],
    /// The byte written into writable buffers.
    pub fill: u8,
    /// RESET_DEVICE count.
    pub resets: u32,
    /// Complete through `poll`, newest first.
    pub later: bool,
    /// NET_SET_MTU: the largest MTU taken (`None`: every value refused,
    /// as a device without the function does).
    pub max_mtu: Option<u16>,
    /// NET_SET_MTU: the MTUs taken, in order.
    pub mtus: Vec<u16>,
    /// SEND_RARP: whether the device takes it.
    pub announces: bool,
    /// SEND_RARP: the MACs announced, in order.
    pub rarps: Vec<[u8; 6]>,
}

impl Default for TestDevice {
    fn default() -> Self {
        TestDevice {
            config: core::array::from_fn(|i| i as u8),
            fill: 0,
            resets: 0,
            later: false,
            max_mtu: None,
            mtus: Vec::new(),
            announces: false,
            rarps: Vec::new(),
        }
    }
}

impl TestDevice {
    /// Writes `fill` into the writable buffers; returns the bytes written.
    fn fill_buffers<M: GuestMemory + ?Sized>(&self, mem: &M, writable: &[(u64, u32)]) -> u32 {
        let mut written = 0;
        for &(addr, len) in writable {
            if mem.write(addr, &vec![self.fill; len as usize]).is_ok() {
                written += len;
            }
        }
        written
    }
}

impl Device for TestDevice {
    /// The requests held for `poll`, with their writable buffers.
    type Scratch = Vec<(Token, Vec<(u64, u32)>)>;

    fn read_config(&self, offset: u32, dst: &mut [u8]) -> bool {
        let at = offset as usize;
        match self.config.get(at..at + dst.len()) {
            Some(s) => {
                dst.copy_from_slice(s);
                true
            }
            None => false,
        }
    }

    fn write_config(&mut self, offset: u32, src: &[u8], kind: ConfigWriteKind) -> bool {
        let writable = kind == ConfigWriteKind::Migration || (offset == 8 && src.len() == 1);
        let at = offset as usize;
        match self.config.get_mut(at..at + src.len()) {
            Some(d) if writable => {
                d.copy_from_slice(src);
                true
            }
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.resets += 1;
    }

    fn set_mtu(&mut self, mtu: u16) -> bool {
        let ok = self.max_mtu.is_some_and(|m| mtu <= m);
        if ok {
            self.mtus.push(mtu);
        }
        ok
    }

    fn send_rarp(&mut self, mac: [u8; 6]) -> bool {
        if self.announces {
            self.rarps.push(mac);
        }
        self.announces
    }

    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _: u16,
        chain: &Chain<S>,
        token: Token,
        mem: &M,
        scratch: &mut Self::Scratch,
    ) -> Completion {
        if !token.side_effects() {
            return Completion::Done(0);
        }
        let writable: Vec<(u64, u32)> = chain.writable().iter().map(|s| (s.addr, s.len)).collect();
        if self.later {
            scratch.push((token, writable));
            return Completion::Later;
        }
        Completion::Done(self.fill_buffers(mem, &writable))
    }

    fn poll<M: GuestMemory + ?Sized>(
        &self,
        _: u16,
        mem: &M,
        scratch: &mut Self::Scratch,
        done: &mut dyn FnMut(Token, u32),
    ) {
        while let Some((token, writable)) = scratch.pop() {
            done(token, self.fill_buffers(mem, &writable));
        }
    }
}

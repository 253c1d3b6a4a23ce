//! The front-end side over a Unix socket: drives the core's
//! [`Frontend`] engine, attaching the
//! fds it names (memory regions, kick and call eventfds) and handing it the
//! replies.
//!
//! [`FrontendLink::probe`] is what `vhu probe` runs: the init sequence and
//! an optional config read against any back-end.
//!
//! With BACKEND_REQ wanted, the link makes a socket pair, hands one end to
//! the back-end with SET_BACKEND_REQ_FD and serves the other on a thread
//! of its own (so a back-end request is answered even while the link waits
//! for a main-channel reply): config changes, in-band calls and ring
//! errors are counted in [`ChannelCounters`] and acked.
//!
//! For live migration the link saves and loads the device state
//! ([`FrontendLink::save_state`], [`FrontendLink::load_state`]) and keeps
//! the dirty log ([`FrontendLink::start_logging`]): a sealed memfd of one
//! bit per 4 KiB guest page, shared with the back-end by SET_LOG_BASE,
//! read and cleared with [`FrontendLink::take_dirty_pages`].

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost_user_core::feature::ProtocolFeatures;
use vhost_user_core::frontend::{
    log_size, BackendInfo, BackendNotice, BackendServer, Event, FdRef, Frontend, FrontendConfig,
    FrontendError, State, DEFAULT_QUEUES, DEFAULT_REGIONS,
};
use vhost_user_core::message::{DeviceStateDirection, FrontendReq, HEADER_SIZE, MAX_MESSAGE};

use crate::sys::eventfd::EventFd;
use crate::sys::mmap::{Access, MmapRegion};
use crate::sys::socket::Stream;

/// Why the front-end link failed.
#[derive(Debug)]
pub enum LinkError {
    /// Socket I/O failed.
    Io(io::Error),
    /// The back-end closed the connection.
    Closed,
    /// The back-end did not answer `request` within the reply timeout
    /// ([`FrontendLink::set_reply_timeout`], default [`REPLY_TIMEOUT`]):
    /// no reply, or one that did not arrive whole in time.
    Timeout(FrontendReq),
    /// The back-end did not take `request` within the reply timeout (it
    /// does not read its socket); part of it may have gone, so the
    /// connection is out of step.
    NotRead(FrontendReq),
    /// The engine refused a reply (or was used wrongly).
    Engine(FrontendError),
    /// The engine named an fd the link does not have.
    MissingFd(FdRef),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Io(e) => write!(f, "socket: {e}"),
            LinkError::Closed => f.write_str("the back-end closed the connection"),
            LinkError::Timeout(r) => write!(f, "the back-end did not answer {r:?} in time"),
            LinkError::NotRead(r) => write!(f, "the back-end did not read {r:?} in time"),
            LinkError::Engine(e) => write!(f, "{e}"),
            LinkError::MissingFd(r) => write!(f, "no fd for {r:?}"),
        }
    }
}

impl std::error::Error for LinkError {}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        LinkError::Io(e)
    }
}

impl From<FrontendError> for LinkError {
    fn from(e: FrontendError) -> Self {
        LinkError::Engine(e)
    }
}

/// How long the link waits for a reply before failing with
/// [`LinkError::Timeout`] (a back-end that never answers is an error, not a
/// hang), and for the back-end to take a request ([`LinkError::NotRead`]).
/// Each is a deadline for the whole message, not for each read or write:
/// a back-end that trickles its reply a byte at a time misses it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a probe found.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The back-end's offer, queue count and memory slots.
    pub info: BackendInfo,
    /// The config space bytes read (empty if CONFIG is not offered or the
    /// read was refused).
    pub config: Vec<u8>,
}

/// What the back-end said on the back-end channel, counted by the
/// link's channel thread.
#[derive(Debug, Default)]
pub struct ChannelCounters {
    /// BACKEND_CONFIG_CHANGE_MSG received.
    pub config_changes: AtomicU64,
    /// In-band BACKEND_VRING_CALLs received.
    pub calls: AtomicU64,
    /// BACKEND_VRING_ERRs received (a ring broke on guest input).
    pub ring_errors: AtomicU64,
    /// Requests refused (not negotiated or not implemented).
    pub refused: AtomicU64,
}

/// The back-end channel of one connection.
#[derive(Debug)]
struct BackendChannel {
    /// The end SET_BACKEND_REQ_FD sends (dropped once sent).
    theirs: Option<Stream>,
    /// Our end, until its thread starts (at negotiation).
    ours: Option<Stream>,
    /// A handle on our end, to stop the thread.
    shutdown: Stream,
    counters: Arc<ChannelCounters>,
    /// Written at each in-band call, for a caller that sleeps on it.
    calls: Arc<EventFd>,
}

impl BackendChannel {
    fn new() -> io::Result<Self> {
        let (ours, theirs) = Stream::pair()?;
        Ok(BackendChannel {
            theirs: Some(theirs),
            shutdown: ours.try_clone()?,
            ours: Some(ours),
            counters: Arc::default(),
            calls: Arc::new(EventFd::new(true)?),
        })
    }

    /// Serves our end until the back-end closes it (or sends garbage).
    fn spawn(&mut self, server: BackendServer) {
        let Some(ours) = self.ours.take() else {
            return;
        };
        let counters = Arc::clone(&self.counters);
        let calls = Arc::clone(&self.calls);
        let spawned = std::thread::Builder::new()
            .name("vhu-backend-channel".into())
            .spawn(move || serve_channel(&ours, server, &counters, &calls));
        if let Err(e) = spawned {
            log::error!("cannot serve the back-end channel: {e}");
        }
    }
}

impl Drop for BackendChannel {
    fn drop(&mut self) {
        let _ = self.shutdown.shutdown();
    }
}

fn serve_channel(
    ours: &Stream,
    server: BackendServer,
    counters: &ChannelCounters,
    calls: &EventFd,
) {
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let mut out = [0u8; 64];
    loop {
        // The back-end sends when it likes; a request it began is due
        // whole within the reply timeout.
        let rx = match ours.recv_message_started(&mut buf, REPLY_TIMEOUT) {
            Ok(Some(rx)) => rx,
            Ok(None) => return,
            Err(e) => {
                log::debug!("back-end channel: {e}");
                return;
            }
        };
        let payload = &buf[HEADER_SIZE..HEADER_SIZE + rx.payload_len];
        let served = match server.serve(&rx.header, payload, rx.fds.len(), &mut out) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("back-end channel: malformed request: {e}; closing it");
                let _ = ours.shutdown();
                return;
            }
        };
        let counter = match served.notice {
            BackendNotice::ConfigChanged => &counters.config_changes,
            BackendNotice::Call(_) => {
                let _ = calls.write(1);
                &counters.calls
            }
            BackendNotice::RingError(q) => {
                log::warn!("the back-end reports ring {q} broken");
                &counters.ring_errors
            }
            BackendNotice::Refused(c) => {
                log::debug!("back-end request {c:?} refused");
                &counters.refused
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = served.reply {
            let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
            if let Err(e) = ours.send_message_by(&out[..n], &[], deadline) {
                log::debug!("back-end channel: {e}");
                let _ = ours.shutdown();
                return;
            }
        }
    }
}

/// The dirty log while logging is on: the memfd shared with the back-end
/// and our mapping of it.
#[derive(Debug)]
struct LogArea {
    fd: OwnedFd,
    map: MmapRegion,
}

/// A front-end connection: the socket, the engine and the fds it names.
#[derive(Debug)]
pub struct FrontendLink<const Q: usize = DEFAULT_QUEUES, const R: usize = DEFAULT_REGIONS> {
    /// Blocking, without socket timeouts: each request and each reply has
    /// one deadline ([`Stream::send_message_by`],
    /// [`Stream::recv_message_by`]), waited for with `poll` before each
    /// call, which then does not block.
    stream: Stream,
    /// With BACKEND_REQ wanted: the back-end channel.
    channel: Option<BackendChannel>,
    fe: Frontend<Q, R>,
    regions: Vec<OwnedFd>,
    kicks: Vec<Option<EventFd>>,
    calls: Vec<Option<EventFd>>,
    inflight: Option<OwnedFd>,
    /// The back-end's end of the device state channel, while
    /// SET_DEVICE_STATE_FD is sent.
    state_fd: Option<OwnedFd>,
    /// The fd SET_DEVICE_STATE_FD's reply carried (the back-end's own
    /// channel), if any.
    state_reply_fd: Option<OwnedFd>,
    /// The dirty log, while logging is on.
    log: Option<LogArea>,
    events: VecDeque<Event>,
    reply_timeout: Duration,
}

impl<const Q: usize, const R: usize> FrontendLink<Q, R> {
    /// Connects to `path` with `config`. `regions[i]` backs
    /// `config.regions[i]`; `kicks[q]`/`calls[q]` are ring `q`'s notifiers
    /// (`None` in polling mode).
    ///
    /// With BACKEND_REQ in the config the link serves a back-end channel
    /// ([`channel_counters`](Self::channel_counters)).
    pub fn connect(
        path: impl AsRef<Path>,
        config: FrontendConfig<Q, R>,
        regions: Vec<OwnedFd>,
        kicks: Vec<Option<EventFd>>,
        calls: Vec<Option<EventFd>>,
    ) -> Result<Self, LinkError> {
        let channel = Self::channel_for(&config)?;
        let stream = Stream::connect(path)?;
        Ok(FrontendLink {
            stream,
            channel,
            fe: Frontend::new(config)?,
            regions,
            kicks,
            calls,
            inflight: None,
            state_fd: None,
            state_reply_fd: None,
            log: None,
            events: VecDeque::new(),
            reply_timeout: REPLY_TIMEOUT,
        })
    }

    fn channel_for(config: &FrontendConfig<Q, R>) -> io::Result<Option<BackendChannel>> {
        if config
            .protocol_features
            .contains(ProtocolFeatures::BACKEND_REQ)
        {
            BackendChannel::new().map(Some)
        } else {
            Ok(None)
        }
    }

    /// What the back-end said on the back-end channel so far (`None`
    /// without BACKEND_REQ wanted); shared with the channel's thread.
    pub fn channel_counters(&self) -> Option<Arc<ChannelCounters>> {
        self.channel.as_ref().map(|c| Arc::clone(&c.counters))
    }

    /// An eventfd written at each in-band call (BACKEND_VRING_CALL), to
    /// sleep on as on a call eventfd (`None` without BACKEND_REQ wanted).
    pub fn channel_calls(&self) -> Option<Arc<EventFd>> {
        self.channel.as_ref().map(|c| Arc::clone(&c.calls))
    }

    /// Kicks ring `q` in-band (VRING_KICK, acked): for rings configured
    /// with [`NotifyMode::InBand`](vhost_user_core::frontend::NotifyMode)
    /// kicks.
    pub fn kick_in_band(&mut self, q: u16) -> Result<(), LinkError> {
        self.fe.kick(q)?;
        self.drive()
    }

    /// Sets how long [`drive`](Self::drive) waits for each reply, and for
    /// the back-end to take each request (default [`REPLY_TIMEOUT`]);
    /// kept across [`reconnect`](Self::reconnect).
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.reply_timeout = timeout;
    }

    /// The engine (for commands: start, stop, read_config, set_memory).
    pub fn engine(&mut self) -> &mut Frontend<Q, R> {
        &mut self.fe
    }

    fn fd(&self, r: FdRef) -> Option<BorrowedFd<'_>> {
        match r {
            FdRef::Region(i) => self.regions.get(usize::from(i)).map(|f| f.as_fd()),
            FdRef::Kick(q) => self.kicks.get(usize::from(q))?.as_ref().map(|e| e.as_fd()),
            FdRef::Call(q) => self.calls.get(usize::from(q))?.as_ref().map(|e| e.as_fd()),
            FdRef::Inflight => self.inflight.as_ref().map(|f| f.as_fd()),
            FdRef::DeviceState => self.state_fd.as_ref().map(|f| f.as_fd()),
            FdRef::BackendChannel => self.channel.as_ref()?.theirs.as_ref().map(|s| s.as_fd()),
            FdRef::Log => self.log.as_ref().map(|l| l.fd.as_fd()),
        }
    }

    /// Sends what the engine has queued and feeds it the replies until it
    /// is idle; injects the kicks it asks for. Events are kept for
    /// [`take_events`](Self::take_events).
    pub fn drive(&mut self) -> Result<(), LinkError> {
        let mut out = Box::new([0u8; MAX_MESSAGE]);
        let mut buf = Box::new([0u8; MAX_MESSAGE]);
        loop {
            let Some(t) = self.fe.poll_transmit(&mut out[..])? else {
                self.collect_events();
                return Ok(());
            };
            let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(t.fds.len());
            for r in &t.fds {
                fds.push(self.fd(*r).ok_or(LinkError::MissingFd(*r))?);
            }
            let deadline = std::time::Instant::now() + self.reply_timeout;
            match self.stream.send_message_by(&out[..t.len], &fds, deadline) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(LinkError::NotRead(t.request))
                }
                Err(e) => return Err(e.into()),
            }
            drop(fds);
            if t.request == FrontendReq::SetBackendReqFd {
                // The back-end has its copy; ours would hide its close.
                if let Some(c) = &mut self.channel {
                    c.theirs = None;
                }
            }
            if t.awaits_reply {
                // One deadline for the whole reply, not one per read.
                let deadline = std::time::Instant::now() + self.reply_timeout;
                let rx = match self.stream.recv_message_by(&mut buf, deadline) {
                    Ok(Some(rx)) => rx,
                    Ok(None) => return Err(LinkError::Closed),
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        return Err(LinkError::Timeout(t.request))
                    }
                    Err(e) => return Err(e.into()),
                };
                let n = rx.header.size as usize;
                self.fe.handle_reply(
                    &rx.header,
                    &buf[HEADER_SIZE..HEADER_SIZE + n],
                    rx.fds.len(),
                )?;
                // GET_INFLIGHT_FD's area: kept (for every start and the next
                // connection); any other fd a reply carries is closed.
                if t.request == FrontendReq::GetInflightFd {
                    self.inflight = rx.fds.into_iter().next();
                } else if t.request == FrontendReq::SetDeviceStateFd {
                    self.state_reply_fd = rx.fds.into_iter().next();
                }
            }
            self.collect_events();
        }
    }

    fn collect_events(&mut self) {
        while let Some(e) = self.fe.poll_event() {
            if let (Event::Negotiated { .. }, Some(c)) = (&e, &mut self.channel) {
                c.spawn(self.fe.backend_server());
            }
            if let Event::InjectKick(q) = e {
                // Seed 1: front-ends SHOULD kick after SET_VRING_KICK.
                if let Some(Some(k)) = self.kicks.get(usize::from(q)) {
                    let _ = k.write(1);
                }
            }
            self.events.push_back(e);
        }
    }

    /// After the back-end went away: connects to `path` again (retrying
    /// until `timeout`), replays the init with the same configuration,
    /// hands the inflight area back (SET_INFLIGHT_FD with the fd kept from
    /// GET_INFLIGHT_FD) and restarts every ring from `bases` (for split
    /// rings the used index: a dead back-end cannot be asked for its base).
    /// The back-end resubmits what the area records as in flight.
    pub fn reconnect(
        &mut self,
        path: impl AsRef<Path>,
        bases: &[u32],
        timeout: Duration,
    ) -> Result<(), LinkError> {
        let mut cfg = self.fe.config().clone();
        cfg.inflight = self.fe.inflight();
        for (q, b) in cfg.queues.iter_mut().zip(bases) {
            q.base = *b;
        }
        let t0 = std::time::Instant::now();
        loop {
            match self.try_reconnect(path.as_ref(), cfg.clone()) {
                Ok(()) => return Ok(()),
                Err(e) if t0.elapsed() >= timeout => return Err(e),
                Err(e) => {
                    log::debug!("reconnect: {e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    fn try_reconnect(&mut self, path: &Path, cfg: FrontendConfig<Q, R>) -> Result<(), LinkError> {
        let stream = Stream::connect(path)?;
        self.stream = stream;
        // A new channel for the new connection; the counters and the calls
        // eventfd go on.
        let old = self
            .channel
            .as_ref()
            .map(|c| (Arc::clone(&c.counters), Arc::clone(&c.calls)));
        self.channel = Self::channel_for(&cfg)?;
        if let (Some(c), Some((counters, calls))) = (&mut self.channel, old) {
            c.counters = counters;
            c.calls = calls;
        }
        self.fe = Frontend::new(cfg)?;
        // A new session does not log until asked.
        self.log = None;
        self.events.clear();
        self.drive()?;
        if self.fe.state() != State::Ready {
            return Err(LinkError::Engine(FrontendError::Failed));
        }
        self.fe.start()?;
        self.drive()?;
        if self.fe.state() != State::Started {
            return Err(LinkError::Engine(FrontendError::Failed));
        }
        Ok(())
    }

    /// Takes the first kept event `pick` matches.
    fn take_event(&mut self, pick: impl Fn(&Event) -> bool) -> Option<Event> {
        let i = self.events.iter().position(pick)?;
        self.events.remove(i)
    }

    /// SET_DEVICE_STATE_FD with one end of a new pipe as the channel
    /// (`ours` is the other end), or the back-end's own fd if the reply
    /// carried one. Returns the fd the front-end transfers on.
    fn begin_transfer(
        &mut self,
        direction: DeviceStateDirection,
        theirs: OwnedFd,
        ours: OwnedFd,
    ) -> Result<OwnedFd, LinkError> {
        self.state_fd = Some(theirs);
        self.state_reply_fd = None;
        let sent = self
            .fe
            .transfer_state(direction)
            .map_err(LinkError::from)
            .and_then(|()| self.drive());
        // Our copy of the back-end's end is closed: the back-end's close
        // (save) is then the pipe's end.
        self.state_fd = None;
        sent?;
        let Some(Event::StateTransfer { backend_fd, .. }) =
            self.take_event(|e| matches!(e, Event::StateTransfer { .. }))
        else {
            return Err(LinkError::Engine(FrontendError::Failed));
        };
        if backend_fd {
            self.state_reply_fd
                .take()
                .ok_or(LinkError::MissingFd(FdRef::DeviceState))
        } else {
            Ok(ours)
        }
    }

    /// CHECK_DEVICE_STATE: whether the back-end saved or loaded it all.
    fn check_transfer(&mut self) -> Result<(), LinkError> {
        self.fe.check_state()?;
        self.drive()?;
        self.take_event(|e| matches!(e, Event::StateChecked))
            .map(|_| ())
            .ok_or(LinkError::Engine(FrontendError::Failed))
    }

    /// Ends the transfer the link ran (`ran`, its outcome) with
    /// CHECK_DEVICE_STATE, also when the link gave up on it (a state too
    /// long, a read or write error: its channel end is closed by then, so
    /// the back-end's transfer ends too), so that the back-end holds no
    /// transfer and another may follow; the link's own error comes first,
    /// but for a broken pipe (the back-end closed its end early), whose
    /// cause the back-end's refusal tells. A transfer that timed out is
    /// not checked: the back-end may still be at it, and would answer the
    /// check only then.
    fn end_transfer<T>(&mut self, ran: Result<T, LinkError>) -> Result<T, LinkError> {
        if matches!(ran, Err(LinkError::Timeout(_))) {
            return ran;
        }
        let checked = self.check_transfer();
        match ran {
            Err(LinkError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                checked?;
                Err(LinkError::Io(e))
            }
            Err(e) => Err(e),
            Ok(v) => checked.map(|()| v),
        }
    }

    /// Runs `f` on a helper thread, waiting at most the reply timeout: a
    /// back-end that never closes its end is a timeout, not a hang.
    fn bounded<T: Send + 'static>(
        &self,
        request: FrontendReq,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, LinkError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(self.reply_timeout) {
            Ok(r) => Ok(r?),
            Err(_) => Err(LinkError::Timeout(request)),
        }
    }

    /// Saves the device's state (DEVICE_STATE negotiated, every ring
    /// stopped, e.g. by [`Frontend::stop_suspending`]): SET_DEVICE_STATE_FD
    /// with a pipe's write end, the state read to its end (at most
    /// `limit` bytes), CHECK_DEVICE_STATE. The bytes are the back-end's
    /// own format, for a destination's [`load_state`](Self::load_state).
    ///
    /// A back-end that refuses the transfer or fails it is
    /// [`FrontendError::StateRefused`] (as [`LinkError::Engine`]), and the
    /// link goes on: the device can start again, as after a failed
    /// migration. So does a transfer the link gives up on (a state over
    /// `limit`, a read error), which it checks all the same, returning its
    /// own error.
    pub fn save_state(&mut self, limit: u64) -> Result<Vec<u8>, LinkError> {
        let (r, w) = crate::sys::pipe::pipe()?;
        let fd = self.begin_transfer(DeviceStateDirection::Save, w, r)?;
        let bytes = self.bounded(FrontendReq::SetDeviceStateFd, move || {
            let mut bytes = Vec::new();
            io::Read::read_to_end(
                &mut io::Read::take(std::fs::File::from(fd), limit + 1),
                &mut bytes,
            )?;
            if bytes.len() as u64 > limit {
                return Err(io::Error::other("device state too long"));
            }
            Ok(bytes)
        });
        self.end_transfer(bytes)
    }

    /// Loads `state` into the back-end (DEVICE_STATE negotiated, no ring
    /// running: before the first start, or after
    /// [`Frontend::prepare`]): SET_DEVICE_STATE_FD with a pipe's read end,
    /// the state written and the pipe closed, CHECK_DEVICE_STATE. A
    /// refusal leaves the link going, as for
    /// [`save_state`](Self::save_state): another state may be loaded.
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), LinkError> {
        let (r, w) = crate::sys::pipe::pipe()?;
        let fd = self.begin_transfer(DeviceStateDirection::Load, r, w)?;
        let state = state.to_vec();
        let written = self.bounded(FrontendReq::SetDeviceStateFd, move || {
            let mut f = std::fs::File::from(fd);
            io::Write::write_all(&mut f, &state)
        });
        self.end_transfer(written)
    }

    /// Switches dirty logging on (the rings running, or stopped after a
    /// start): a sealed memfd of [`log_size`] bytes for the memory regions
    /// (one bit per 4 KiB page of guest physical address, whole u64
    /// words), mapped here and sent with SET_LOG_BASE, then VHOST_F_LOG_ALL
    /// and, for running rings, VHOST_VRING_F_LOG
    /// ([`Frontend::start_logging`]). Returns the log's size in bytes. The
    /// engine's refusals (logging already on, VHOST_F_LOG_ALL not offered,
    /// LOG_SHMFD not negotiated, wrong state) come back as
    /// [`LinkError::Engine`] and leave nothing behind.
    pub fn start_logging(&mut self) -> Result<u64, LinkError> {
        // Refusals first, before a memfd is made for nothing.
        if self.fe.logging().is_some() {
            return Err(FrontendError::AlreadyLogging.into());
        }
        let size = log_size(self.fe.regions());
        if size == 0 {
            return Err(FrontendError::NoRegions.into());
        }
        let fd = crate::sys::memfd::create_sealed("vhu-dirty-log", size)?;
        let map = MmapRegion::map(fd.as_fd(), 0, size, Access::ReadWrite)?;
        self.fe.start_logging(size)?;
        self.log = Some(LogArea { fd, map });
        let sent = self.drive();
        if let Err(e) = sent {
            self.log = None;
            return Err(e);
        }
        self.take_event(|e| matches!(e, Event::Logging(true)))
            .ok_or(LinkError::Engine(FrontendError::Failed))?;
        Ok(size)
    }

    /// Switches dirty logging off (SET_FEATURES without VHOST_F_LOG_ALL,
    /// SET_VRING_ADDR without VHOST_VRING_F_LOG for running rings), then
    /// unmaps and closes the log. Read it with
    /// [`take_dirty_pages`](Self::take_dirty_pages) before, if the last
    /// bits matter.
    pub fn stop_logging(&mut self) -> Result<(), LinkError> {
        self.fe.stop_logging()?;
        let sent = self.drive();
        self.log = None;
        sent?;
        self.take_event(|e| matches!(e, Event::Logging(false)))
            .map(|_| ())
            .ok_or(LinkError::Engine(FrontendError::Failed))
    }

    /// Whether dirty logging is on.
    pub fn is_logging(&self) -> bool {
        self.log.is_some()
    }

    /// Reads and clears the dirty log: the guest page numbers (guest
    /// physical address / 4096) whose bits the back-end set since logging
    /// began or the last call, in ascending order. Each u64 word is
    /// swapped with 0 atomically, so a bit the back-end sets meanwhile is
    /// either in this answer or in the next. Empty when logging is off.
    pub fn take_dirty_pages(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        let Some(log) = &self.log else {
            return pages;
        };
        let words = log.map.len() as u64 / 8;
        for w in 0..words {
            // In bounds and 8-aligned: the mapping is page aligned and
            // `words` whole words long.
            let Ok(v) = log.map.swap_u64(w * 8, 0) else {
                continue;
            };
            // The bitmap is bytes (page p is bit p % 8 of byte p / 8): as
            // a little-endian word, bit j is page 64 w + j.
            let mut bits = u64::from_le(v);
            while bits != 0 {
                let j = u64::from(bits.trailing_zeros());
                pages.push(w * 64 + j);
                bits &= bits - 1;
            }
        }
        pages
    }

    /// Gives the link the inflight area's fd of an earlier connection (with
    /// [`FrontendConfig::inflight`] naming the area).
    pub fn set_inflight_fd(&mut self, fd: OwnedFd) {
        self.inflight = Some(fd);
    }

    /// A duplicate of the inflight area's fd, to hand to the next
    /// connection after a reconnect.
    pub fn inflight_fd(&self) -> Option<OwnedFd> {
        self.inflight.as_ref().and_then(|f| f.try_clone().ok())
    }

    /// The socket, to watch for the back-end going away (it becomes
    /// readable at end of file). It has no read or write timeout: a
    /// caller that reads or writes a copy of it bounds its own waits.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Kicks ring `q` (writes its kick eventfd); false if it has none.
    pub fn kick(&self, q: u16) -> bool {
        match self.kicks.get(usize::from(q)) {
            Some(Some(k)) => k.write(1).is_ok(),
            _ => false,
        }
    }

    /// The events seen so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }
}

impl FrontendLink<1, 1> {
    /// Probes the back-end at `path`: its features, protocol features,
    /// queue count, memory slots and (with CONFIG) its config space: the
    /// first of `config_lens` the back-end answers (one connection: some
    /// back-ends serve a single front-end and exit).
    pub fn probe(path: impl AsRef<Path>, config_lens: &[u32]) -> Result<Probe, LinkError> {
        let mut link = FrontendLink::<1, 1>::connect(
            path,
            FrontendConfig::probe(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        )?;
        link.drive()?;
        if link.fe.state() != State::Ready {
            return Err(LinkError::Engine(FrontendError::Failed));
        }
        let info = *link.fe.backend_info();
        let mut config = Vec::new();
        let offered_config = info
            .protocol_features
            .is_some_and(|p| p.contains(ProtocolFeatures::CONFIG));
        for &len in config_lens.iter().filter(|_| offered_config) {
            if len == 0 || !config.is_empty() {
                continue;
            }
            link.fe.read_config(0, len)?;
            match link.drive() {
                Ok(()) => {
                    for e in link.take_events() {
                        if let Event::Config { data, .. } = e {
                            config = data.to_vec();
                        }
                    }
                }
                // A refused read leaves the probe's other answers valid.
                Err(LinkError::Engine(_)) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Probe { info, config })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    use super::*;

    /// A fake back-end on a fresh socket: `serve` gets the accepted
    /// connection.
    fn backend(
        tag: &str,
        serve: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static,
    ) -> (PathBuf, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!(
            "vhu-link-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            serve(c);
            let _ = std::fs::remove_dir_all(dir);
        });
        (path, h)
    }

    fn link(path: &Path) -> FrontendLink<1, 1> {
        FrontendLink::connect(
            path,
            FrontendConfig::probe(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        )
        .unwrap()
    }

    /// Reads one request header and its payload; returns the request id.
    fn read_request(c: &mut std::os::unix::net::UnixStream) -> u32 {
        let mut h = [0u8; HEADER_SIZE];
        c.read_exact(&mut h).unwrap();
        let size = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let mut p = vec![0u8; size as usize];
        c.read_exact(&mut p).unwrap();
        u32::from_le_bytes([h[0], h[1], h[2], h[3]])
    }

    fn reply(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn a_silent_back_end_is_a_timeout() {
        let (path, h) = backend("silent", |mut c| {
            read_request(&mut c);
            // Hold the connection open without answering.
            let mut b = [0u8; 1];
            let _ = c.read(&mut b);
        });
        let mut l = link(&path);
        l.set_reply_timeout(Duration::from_millis(100));
        let t0 = std::time::Instant::now();
        let e = l.drive().unwrap_err();
        assert!(
            matches!(e, LinkError::Timeout(FrontendReq::GetFeatures)),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        drop(l);
        h.join().unwrap();
    }

    #[test]
    fn a_back_end_that_trickles_a_reply_is_a_timeout() {
        let (path, h) = backend("trickle", |mut c| {
            let id = read_request(&mut c);
            // The reply one byte every 200 ms: each byte well within the
            // reply timeout, the reply (4 s) not.
            for b in reply(id, 0x5, &(1u64 << 32).to_le_bytes()) {
                if c.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let mut l = link(&path);
        l.set_reply_timeout(Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        let e = l.drive().unwrap_err();
        let took = t0.elapsed();
        drop(l);
        h.join().unwrap();
        assert!(
            matches!(e, LinkError::Timeout(FrontendReq::GetFeatures)),
            "{e} after {took:?}"
        );
        assert!(took < Duration::from_secs(1), "timed out after {took:?}");
    }

    #[test]
    fn a_back_end_that_hangs_up_is_closed() {
        let (path, h) = backend("closed", |mut c| {
            read_request(&mut c);
        });
        let mut l = link(&path);
        assert!(matches!(l.drive().unwrap_err(), LinkError::Closed));
        h.join().unwrap();
    }

    #[test]
    fn a_back_end_that_hangs_up_inside_a_reply_is_an_unexpected_eof() {
        let (path, h) = backend("truncated", |mut c| {
            let id = read_request(&mut c);
            // The header and 3 of the 8 payload bytes, then close.
            let r = reply(id, 0x5, &0u64.to_le_bytes());
            c.write_all(&r[..HEADER_SIZE + 3]).unwrap();
        });
        let mut l = link(&path);
        let e = l.drive().unwrap_err();
        assert!(
            matches!(&e, LinkError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof),
            "{e}"
        );
        h.join().unwrap();
    }

    #[test]
    fn a_reply_without_the_reply_flag_is_an_engine_error() {
        let (path, h) = backend("flags", |mut c| {
            let id = read_request(&mut c);
            // VERSION only, no REPLY bit.
            c.write_all(&reply(id, 0x1, &0u64.to_le_bytes())).unwrap();
            let mut b = [0u8; 1];
            let _ = c.read(&mut b);
        });
        let mut l = link(&path);
        let e = l.drive().unwrap_err();
        assert!(matches!(e, LinkError::Engine(_)), "{e}");
        assert_eq!(l.engine().state(), State::Failed);
        drop(l);
        h.join().unwrap();
    }

    /// A back-end that stops reading its socket once started: the
    /// requests that need no reply (SET_MEM_TABLE without REPLY_ACK) fill
    /// the socket's buffer, and the one that finds no room is not taken
    /// by the reply timeout.
    #[test]
    fn a_back_end_that_does_not_read_a_request_is_not_read() {
        use std::sync::atomic::AtomicBool;
        use vhost_user_core::feature::VirtioFeatures;
        use vhost_user_core::frontend::{NotifyMode, QueueConfig};
        use vhost_user_core::message::MemRegionMsg;
        use vhost_user_core::vring::RingAddrs;
        let deaf = Arc::new(AtomicBool::new(false));
        let (done, hold) = std::sync::mpsc::channel::<()>();
        let theirs = Arc::clone(&deaf);
        let (path, h) = backend("deaf", move |mut c| {
            c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            // Answers GET_FEATURES (VERSION_1 only), takes the rest, until
            // told to stop and idle; then holds the connection, unread.
            loop {
                let mut h = [0u8; HEADER_SIZE];
                match c.read_exact(&mut h) {
                    Ok(()) => {}
                    Err(_) if theirs.load(Ordering::Relaxed) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                }
                let size = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
                c.set_read_timeout(None).unwrap();
                c.read_exact(&mut vec![0u8; size as usize]).unwrap();
                c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                let id = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                if id == FrontendReq::GetFeatures.id() {
                    c.write_all(&reply(id, 0x5, &(1u64 << 32).to_le_bytes()))
                        .unwrap();
                }
            }
            let _ = hold.recv();
        });
        const RAM: u64 = 0x10000;
        let region = |size| MemRegionMsg {
            guest_addr: 0,
            size,
            user_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
            xen: None,
        };
        let mut cfg =
            FrontendConfig::<1, 1>::new(VirtioFeatures::VERSION_1, ProtocolFeatures::empty());
        cfg.regions.push(region(RAM)).unwrap();
        // One ring in the first half of RAM, polled both ways (no fds).
        let queue = QueueConfig {
            size: 8,
            addrs: RingAddrs {
                desc: 0x7f00_0000_0000,
                driver: 0x7f00_0000_0100,
                device: 0x7f00_0000_0200,
            },
            base: 0,
            kick: NotifyMode::Polling,
            call: NotifyMode::Polling,
        };
        cfg.queues.push(queue).unwrap();
        let ram = crate::sys::memfd::create("link-deaf", RAM).unwrap();
        let mut l = FrontendLink::connect(&path, cfg, vec![ram], Vec::new(), Vec::new()).unwrap();
        l.drive().unwrap();
        l.engine().start().unwrap();
        l.drive().unwrap();
        assert_eq!(l.engine().state(), State::Started);
        deaf.store(true, Ordering::Relaxed);
        // The back-end sees it once its read times out.
        std::thread::sleep(Duration::from_millis(100));
        l.set_reply_timeout(Duration::from_millis(100));
        let t0 = std::time::Instant::now();
        let mut sent = 0u32;
        let e = loop {
            // A table that differs from the last one is sent at once.
            let size = if sent % 2 == 0 { RAM / 2 } else { RAM };
            l.engine().set_memory(&[region(size)]).unwrap();
            match l.drive() {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{sent} tables taken by a back-end that does not read"
            );
        };
        let took = t0.elapsed();
        drop(l);
        let _ = done.send(());
        h.join().unwrap();
        assert!(
            matches!(e, LinkError::NotRead(FrontendReq::SetMemTable)),
            "{e} after {sent} tables"
        );
        assert!(sent > 0, "the first table was not taken");
        assert!(took < Duration::from_secs(5), "not read after {took:?}");
    }

    #[test]
    fn probe_of_a_back_end_without_protocol_features() {
        let (path, h) = backend("plain", |mut c| {
            // GET_FEATURES, SET_OWNER, GET_FEATURES: VERSION_1 only.
            for _ in 0..3 {
                let id = read_request(&mut c);
                if id == 1 {
                    c.write_all(&reply(1, 0x5, &(1u64 << 32).to_le_bytes()))
                        .unwrap();
                }
            }
        });
        let p = FrontendLink::probe(&path, &[60]).unwrap();
        assert_eq!(p.info.features.bits(), 1 << 32);
        assert_eq!(p.info.protocol_features, None);
        assert!(p.config.is_empty());
        h.join().unwrap();
    }
}

//! The vhost-user-net device: the core's virtio-net model
//! ([`NetDevice`], [`tx_gather`], [`rx_fill`], [`rx_fill_merged`]) over a
//! packet backend, served by the Linux runtime.
//!
//! Queue `2k` receives and `2k + 1` transmits for pair `k`. A transmit
//! chain is gathered into the ring's buffer and handed to the backend at
//! once. A receive chain is checked and held (`Completion::Later`) until
//! a frame is there for it (the null backend, which always has one, fills
//! it at once when nothing is held before it): [`Device::poll`] pairs
//! held chains with frames, across several chains with MRG_RXBUF. Receiving is driven by
//! frames, not by kicks: the loopback's transmit side signals the pair's
//! eventfd after each round that queued frames, and the receive ring's
//! worker sleeps on it ([`SharedDevice::completion_fd`]). A ring that
//! stops while it holds receive chains completes them with length 0
//! ([`Device::stopping`]).
//!
//! Backends:
//! - [`NetBackend::Loopback`]: what a pair transmits comes back on its
//!   receive queue, in order; frames that find the queue full (the guest
//!   does not receive: [`LOOPBACK_FRAMES`] frames or [`LOOPBACK_BYTES`]
//!   bytes) are dropped and counted.
//! - [`NetBackend::Null`]: transmitted frames are counted and dropped
//!   unread (the chain checked as a copy would check it); every receive
//!   buffer gets a copy of a template frame at once.
//! - [`NetBackend::Tap`]: a TAP interface, one queue of it per pair
//!   (multi-queue with several pairs). Transmitted frames are written to
//!   the pair's tap queue with their virtio-net header, once it is
//!   checked against the spec and the negotiated offloads
//!   ([`check_tx_hdr`]: refused, counted as errors); a reader thread
//!   per pair moves the tap's frames (header included, so offloaded
//!   frames pass) to the pair's receive side as the loopback's are, and
//!   signals the same eventfd. It reads only while the pair's receive
//!   ring runs (from its first chain until it stops): before, the frames
//!   wait in the tap's own bounded queue. The header length and the
//!   offloads the tap may hand over follow the driver's features
//!   (TUNSETVNETHDRSZ, TUNSETOFFLOAD); frames queued or read across a
//!   change of them are dropped (see `RxMode`). SEND_RARP writes a
//!   gratuitous RARP to the tap.
//!
//! NET_SET_MTU is taken up to the MTU the daemon offers (`--mtu`); with
//! a tap it sets the tap's MTU too (SIOCSIFMTU), or is refused. The
//! tap's MTU from before the connection's first NET_SET_MTU is put back
//! at RESET_DEVICE and when the front-end leaves.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use vhost_user_core::dataplane::Token;
use vhost_user_core::device::net::{
    check_tx_hdr, rx_capacity, rx_fill, rx_fill_merged, tx_check, tx_gather, NetDevice, NetError,
    NetFeatures, QueueRole, VirtioNetHdr, DEFAULT_MTU,
};
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::VirtioFeatures;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::ConfigWriteKind;
use vhost_user_core::vring::{Chain, Segment};
use vhost_user_linux::backend::{bump, SharedDevice};
use vhost_user_linux::sys::eventfd::EventFd;
use vhost_user_linux::sys::tap::Tap;
use zerocopy::IntoBytes;

pub mod tap;

/// Frames a loopback or tap pair queues for its receive side, at most.
pub const LOOPBACK_FRAMES: usize = 1024;
/// Frame bytes a loopback or tap pair queues for its receive side, at
/// most (virtio headers and bookkeeping not counted): 64 frames of the
/// largest a tap or an MTU of 65535 gives. [`LOOPBACK_FRAMES`] alone
/// would let a guest that transmits 64 KiB frames and posts no receive
/// buffers have the daemon hold 64 MiB per pair. A loopback frame
/// beyond either bound is dropped and counted in the transmit queue's
/// `drops`; the tap reader stops reading while the largest frame would
/// not fit (the frames wait in the tap, which drops beyond its own
/// queue).
pub const LOOPBACK_BYTES: usize = 4 << 20;
/// Receive chains one frame may span with MRG_RXBUF, at most.
const MAX_MERGE: usize = 64;

/// Where frames go and come from.
#[derive(Clone, Debug)]
pub enum NetBackend {
    /// A pair's transmitted frames come back on its receive queue.
    Loopback,
    /// Transmitted frames are dropped; receive buffers get this frame.
    Null {
        /// The frame every receive buffer gets.
        template: Vec<u8>,
    },
    /// Frames go to and come from the TAP interface of this name (created
    /// if missing, which needs CAP_NET_ADMIN).
    Tap {
        /// The interface.
        name: String,
    },
}

impl NetBackend {
    /// A null backend whose template is a broadcast Ethernet frame of
    /// `len` bytes (at least 14) from `mac`, EtherType 0x88b5 (local
    /// experimental), the payload counting up.
    pub fn null(len: usize, mac: [u8; 6]) -> Self {
        let mut t = vec![0u8; len.max(14)];
        t[..6].copy_from_slice(&[0xff; 6]);
        t[6..12].copy_from_slice(&mac);
        t[12..14].copy_from_slice(&[0x88, 0xb5]);
        for (i, b) in t[14..].iter_mut().enumerate() {
            *b = i as u8;
        }
        NetBackend::Null { template: t }
    }

    /// The offload feature bits this backend can carry (a tap's).
    pub fn offloads(&self) -> NetFeatures {
        match self {
            NetBackend::Tap { .. } => tap::TAP_OFFLOADS,
            _ => NetFeatures::empty(),
        }
    }
}

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Frames transmitted (TX) or delivered to the guest (RX).
    pub packets: AtomicU64,
    /// Their bytes, virtio header excluded.
    pub bytes: AtomicU64,
    /// Frames dropped: TX frames the loopback had no room for, RX frames
    /// no buffer could take.
    pub drops: AtomicU64,
    /// Chains refused (hostile or malformed), completed with length 0.
    pub errors: AtomicU64,
    /// The largest frame, in bytes (above the MTU: a segmentation
    /// offload at work).
    pub largest: AtomicU64,
}

impl QueueCounters {
    /// Counts a frame of `len` bytes.
    fn frame(&self, len: usize) {
        let len = len as u64;
        bump(&self.packets, 1);
        bump(&self.bytes, len);
        // Only this queue's worker counts its frames.
        if len > self.largest.load(Ordering::Relaxed) {
            self.largest.store(len, Ordering::Relaxed);
        }
    }
}

/// A frame waiting for receive buffers, and the header to give it.
#[derive(Debug)]
struct Frame {
    hdr: VirtioNetHdr,
    data: Vec<u8>,
    /// The [`RxMode::gen`] it was read (or queued) under: delivered only
    /// under the same one.
    gen: u32,
}

/// How frames are framed for the guest, as the negotiated features say
/// (the virtio-net header's length and the tap's offloads), and a count
/// of its changes: one word, so that a thread takes it whole.
///
/// A change (SET_FEATURES with other features, RESET_DEVICE) first makes
/// `gen` odd, then reconfigures the taps, then stores the new mode with
/// `gen` even again. The tap reader takes the mode before it reads and
/// queues the frame only if the mode is still the same (and stable)
/// after the read: a read that may have met the tap's new header length
/// with the old one in hand is dropped. The receive side delivers only
/// frames of its own (stable) `gen`, so none queued under one header
/// length or set of offloads reaches the guest under another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RxMode {
    gen: u32,
    hdr_len: usize,
    mergeable: bool,
    guest_csum: bool,
}

impl RxMode {
    fn pack(self) -> u64 {
        (u64::from(self.gen) << 32)
            | (self.hdr_len as u64 & 0xff)
            | (u64::from(self.mergeable) << 8)
            | (u64::from(self.guest_csum) << 9)
    }

    fn unpack(w: u64) -> Self {
        RxMode {
            gen: (w >> 32) as u32,
            hdr_len: (w & 0xff) as usize,
            mergeable: w & (1 << 8) != 0,
            guest_csum: w & (1 << 9) != 0,
        }
    }

    /// A change is under way: the taps may have either header length.
    fn changing(self) -> bool {
        self.gen & 1 == 1
    }
}

/// A pair's queued frames, held to [`LOOPBACK_FRAMES`] frames and
/// [`LOOPBACK_BYTES`] bytes.
#[derive(Debug, Default)]
struct Frames {
    queue: VecDeque<Frame>,
    /// The bytes of the frames in `queue`.
    bytes: usize,
}

impl Frames {
    /// Whether a frame of `len` bytes finds room.
    fn has_room(&self, len: usize) -> bool {
        self.queue.len() < LOOPBACK_FRAMES && self.bytes.saturating_add(len) <= LOOPBACK_BYTES
    }

    /// Queues `frame` if it finds room; gives it back if not.
    fn push(&mut self, frame: Frame) -> Result<(), Frame> {
        if !self.has_room(frame.data.len()) {
            return Err(frame);
        }
        self.bytes += frame.data.len();
        self.queue.push_back(frame);
        Ok(())
    }

    fn front_mut(&mut self) -> Option<&mut Frame> {
        self.queue.front_mut()
    }

    fn pop_front(&mut self) {
        if let Some(f) = self.queue.pop_front() {
            self.bytes -= f.data.len();
        }
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.bytes = 0;
    }
}

/// One queue pair's frames from its loopback TX side or its tap queue,
/// waiting for RX buffers, and the eventfd the RX side sleeps on.
#[derive(Debug)]
struct Pair {
    frames: Mutex<Frames>,
    /// Signalled when the RX side took frames (the tap reader waits for
    /// room).
    space: Condvar,
    ready: Arc<EventFd>,
    tap: Option<Arc<Tap>>,
    /// Held for reading by a transmit to the tap from its mode read to
    /// its write, and for writing by [`NetService::change_mode`] while it
    /// reconfigures the tap and stores the new mode: a frame framed with
    /// one header length reaches the tap while the tap reads that
    /// length. (A frame written cannot be taken back, so the two are
    /// kept apart rather than a mismatch counted after the fact.)
    framing: RwLock<()>,
    /// Receive rings of the pair that run (a ring's scratch holds one
    /// [`RxRunning`]; 0 or 1 but for the moment a restarted ring's new
    /// scratch overlaps the old): the tap reader reads only while one
    /// does, and waits on `space` otherwise.
    rx_running: AtomicUsize,
}

/// A running receive ring of a tap pair, held in its scratch: the pair's
/// tap reader may read while one is there.
#[derive(Debug)]
struct RxRunning {
    inner: Arc<Inner>,
    pair: usize,
}

impl RxRunning {
    fn new(inner: &Arc<Inner>, pair: usize) -> Option<Self> {
        let p = inner.pairs.get(pair)?;
        // Under the frames lock, so a reader about to wait sees it.
        let q = lock(&p.frames);
        p.rx_running.fetch_add(1, Ordering::Relaxed);
        drop(q);
        p.space.notify_all();
        Some(RxRunning {
            inner: Arc::clone(inner),
            pair,
        })
    }
}

impl Drop for RxRunning {
    fn drop(&mut self) {
        if let Some(p) = self.inner.pairs.get(self.pair) {
            p.rx_running.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct Inner {
    device: Mutex<NetDevice>,
    /// The [`RxMode`], packed. GUEST_CSUM in it: the driver takes the
    /// tap's checksum flags.
    mode: AtomicU64,
    max_frame: usize,
    /// The longest frame without segmentation the offered MTU allows
    /// (held to where the driver negotiated VIRTIO_NET_F_MTU).
    mtu_frame: usize,
    /// The largest MTU NET_SET_MTU may set (the one offered, or 1500).
    max_mtu: u16,
    /// The MTU of the last NET_SET_MTU (0: none).
    mtu: AtomicU16,
    /// The tap's MTU before the connection's first NET_SET_MTU changed
    /// it (0: unchanged), put back at RESET_DEVICE and at disconnect.
    tap_mtu_before: AtomicU16,
    /// The negotiated net features' bits (transmit headers are checked
    /// against them), changed with the mode by
    /// [`NetService::change_mode`].
    acked: AtomicU64,
    /// SEND_RARP requests.
    rarps: AtomicU64,
    backend: NetBackend,
    /// The null backend's template behind a 12-byte header
    /// (`num_buffers` 1): what a receive buffer gets, in one copy.
    null_framed: Vec<u8>,
    pairs: Vec<Pair>,
    counters: Vec<QueueCounters>,
}

/// The net device the daemon serves; clones share everything.
#[derive(Clone, Debug)]
pub struct NetService {
    inner: Arc<Inner>,
}

/// A receive chain held until a frame is there for it.
#[derive(Debug)]
struct Held {
    token: Token,
    segments: Vec<Segment>,
}

impl AsRef<[Segment]> for Held {
    fn as_ref(&self) -> &[Segment] {
        &self.segments
    }
}

/// Per-ring state of the data path.
#[derive(Debug, Default)]
pub struct Scratch {
    /// RX: chains waiting for frames, in the order they were popped.
    held: VecDeque<Held>,
    /// RX: segment vectors of completed chains, for reuse.
    spare: Vec<Vec<Segment>>,
    /// RX: the ring stops: complete what is held.
    stopping: bool,
    /// RX: the pair's eventfd, signalled when frames are queued.
    ready: Option<Arc<EventFd>>,
    /// TX: the gather buffer (the largest frame).
    buf: Vec<u8>,
    /// TX: frames were queued for the pair's RX since the last poll.
    pushed: bool,
    /// RX with MRG_RXBUF: used lengths of one frame's chains.
    used: Vec<u32>,
    /// RX of a tap pair: the ring runs (from its first chain until it
    /// stops), so the pair's reader reads the tap.
    running: Option<RxRunning>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    /// The mode now (see [`RxMode`]).
    fn mode(&self) -> RxMode {
        RxMode::unpack(self.mode.load(Ordering::SeqCst))
    }

    /// Sets the mode. A read-modify-write, so the store is visible before
    /// the tap is reconfigured after it.
    fn set_mode(&self, m: RxMode) {
        self.mode.swap(m.pack(), Ordering::SeqCst);
    }
}

impl NetService {
    /// A service for `device` over `backend`; the pairs' eventfds are
    /// made here, a tap's queues attached and their reader threads
    /// started (they end when the service is dropped).
    pub fn new(device: NetDevice, backend: NetBackend) -> std::io::Result<Self> {
        let mut taps = match &backend {
            NetBackend::Tap { name } => {
                tap::open_pairs(name, device.queue_pairs(), device.hdr_len())?
            }
            _ => Vec::new(),
        }
        .into_iter();
        let pairs = (0..device.queue_pairs())
            .map(|_| {
                Ok(Pair {
                    frames: Mutex::new(Frames::default()),
                    space: Condvar::new(),
                    ready: Arc::new(EventFd::new(true)?),
                    tap: taps.next(),
                    framing: RwLock::new(()),
                    rx_running: AtomicUsize::new(0),
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let queues = usize::from(device.queue_pairs()) * 2;
        let max_frame = match backend {
            NetBackend::Tap { .. } => tap::TAP_MAX_FRAME,
            _ => device.max_frame(),
        };
        let max_mtu = match device.mtu() {
            0 => DEFAULT_MTU,
            m => m,
        };
        let service = NetService {
            inner: Arc::new(Inner {
                mode: AtomicU64::new(
                    RxMode {
                        gen: 0,
                        hdr_len: device.hdr_len(),
                        mergeable: false,
                        guest_csum: false,
                    }
                    .pack(),
                ),
                max_frame,
                mtu_frame: device.max_frame(),
                max_mtu,
                mtu: AtomicU16::new(0),
                tap_mtu_before: AtomicU16::new(0),
                acked: AtomicU64::new(0),
                rarps: AtomicU64::new(0),
                device: Mutex::new(device),
                null_framed: match &backend {
                    NetBackend::Null { template } => {
                        let h = VirtioNetHdr {
                            num_buffers: 1.into(),
                            ..VirtioNetHdr::default()
                        };
                        [h.as_bytes(), template].concat()
                    }
                    _ => Vec::new(),
                },
                backend,
                pairs,
                counters: (0..queues).map(|_| QueueCounters::default()).collect(),
            }),
        };
        for (k, p) in service.inner.pairs.iter().enumerate() {
            if let Some(t) = &p.tap {
                let (weak, t) = (Arc::downgrade(&service.inner), t.clone());
                std::thread::Builder::new()
                    .name(format!("tap-rx-{k}"))
                    .spawn(move || tap::reader(weak, k, t))?;
            }
        }
        Ok(service)
    }

    /// The name of the tap the service is attached to, if any.
    pub fn tap_name(&self) -> Option<&str> {
        self.inner.pairs.first()?.tap.as_deref().map(Tap::name)
    }

    /// The MTU of the last NET_SET_MTU, if any.
    pub fn mtu(&self) -> Option<u16> {
        Some(self.inner.mtu.load(Ordering::Relaxed)).filter(|&m| m != 0)
    }

    /// SEND_RARP requests received.
    pub fn rarps(&self) -> u64 {
        self.inner.rarps.load(Ordering::Relaxed)
    }

    /// The tap's header length and offloads for the negotiated features
    /// (and after a reset: none).
    fn configure_taps(&self, hdr_len: usize, acked: NetFeatures) {
        let flags = tap::tun_offloads(acked);
        for (k, p) in self.inner.pairs.iter().enumerate() {
            let Some(t) = &p.tap else { continue };
            if let Err(e) = t
                .set_vnet_hdr_len(hdr_len)
                .and_then(|()| t.set_offload(flags))
            {
                log::error!(
                    "tap {} queue {k}: cannot set the header and offloads: {e}",
                    t.name()
                );
            } else if k == 0 {
                log::info!(
                    "tap {}: virtio-net header {hdr_len} bytes, offloads {flags:#x}",
                    t.name()
                );
            }
        }
    }

    /// Puts back the tap's MTU as it was before the connection's first
    /// NET_SET_MTU (the next front-end, or none, finds the tap as the
    /// operator left it).
    fn restore_tap_mtu(&self) {
        let before = self.inner.tap_mtu_before.swap(0, Ordering::Relaxed);
        if before == 0 {
            return;
        }
        if let Some(t) = self.pair(0).and_then(|p| p.tap.as_deref()) {
            match t.set_mtu(before) {
                Ok(()) => log::info!("tap {} MTU put back to {before}", t.name()),
                Err(e) => log::warn!("cannot put tap {}'s MTU back to {before}: {e}", t.name()),
            }
        }
    }

    /// Drops the frames every pair queued; returns how many, per pair.
    fn clear_frames(&self) -> Vec<u64> {
        self.inner
            .pairs
            .iter()
            .map(|p| {
                let mut q = lock(&p.frames);
                let n = q.queue.len() as u64;
                q.clear();
                drop(q);
                p.space.notify_all();
                n
            })
            .collect()
    }

    /// The taps and the mode for a header of `hdr_len` bytes and the
    /// `acked` features: the mode marked changing while the taps are
    /// reconfigured (see [`RxMode`]), and no transmit to a tap between
    /// its mode read and its write meanwhile (see [`Pair::framing`]).
    fn change_mode(&self, hdr_len: usize, acked: NetFeatures) {
        let _framing: Vec<_> = self
            .inner
            .pairs
            .iter()
            .filter(|p| p.tap.is_some())
            .map(|p| p.framing.write().unwrap_or_else(PoisonError::into_inner))
            .collect();
        self.inner.acked.store(acked.bits(), Ordering::Relaxed);
        let before = self.inner.mode();
        self.inner.set_mode(RxMode {
            gen: before.gen | 1,
            ..before
        });
        self.configure_taps(hdr_len, acked);
        self.inner.set_mode(RxMode {
            gen: (before.gen | 1).wrapping_add(1),
            hdr_len,
            mergeable: acked.contains(NetFeatures::MRG_RXBUF),
            guest_csum: acked.contains(NetFeatures::GUEST_CSUM),
        });
    }

    /// The counters of queue `queue`.
    pub fn counters(&self, queue: u16) -> Option<&QueueCounters> {
        self.inner.counters.get(usize::from(queue))
    }

    fn count(&self, queue: u16) -> &QueueCounters {
        // Queues beyond the device's are refused by the session; the last
        // counter takes anything else rather than panicking.
        let c = &self.inner.counters;
        c.get(usize::from(queue)).unwrap_or_else(|| &c[c.len() - 1])
    }

    /// The frames and their bytes pair `pair` holds for its receive side
    /// (a loopback's or a tap's).
    pub fn queued(&self, pair: u16) -> Option<(usize, usize)> {
        let q = lock(&self.pair(pair)?.frames);
        Some((q.queue.len(), q.bytes))
    }

    fn pair(&self, pair: u16) -> Option<&Pair> {
        self.inner.pairs.get(usize::from(pair))
    }

    /// Pair `pair`'s [`Pair::framing`], read-locked, if it has a tap.
    fn tap_framing(&self, pair: u16) -> Option<RwLockReadGuard<'_, ()>> {
        self.pair(pair)
            .filter(|p| p.tap.is_some())
            .map(|p| p.framing.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn transmit<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        queue: u16,
        pair: u16,
        chain: &Chain<S>,
        mem: &M,
        scratch: &mut Scratch,
    ) {
        let inner = &*self.inner;
        let k = self.count(queue);
        if let NetBackend::Null { .. } = inner.backend {
            // Dropped unread: counted at the length a copy would take,
            // the chain checked as a copy would check it (its buffers were
            // found mapped when it was popped). No tap: nothing to keep
            // in step with the mode, so no lock.
            let hdr_len = inner.mode().hdr_len.min(VirtioNetHdr::SIZE);
            match tx_check(chain.segments(), hdr_len, inner.max_frame) {
                Ok(len) => k.frame(len as usize),
                Err(e) => {
                    bump(&k.errors, 1);
                    log::debug!("queue {queue}: transmit chain refused: {e}");
                }
            }
            return;
        }
        // A tap's header length changes only under the write lock (see
        // `Pair::framing`): the mode read here is the tap's until the
        // frame is written.
        let _framing = self.tap_framing(pair);
        let mode = inner.mode();
        let hdr_len = mode.hdr_len;
        if scratch.buf.len() < inner.max_frame {
            scratch.buf.resize(inner.max_frame, 0);
        }
        let read = |gpa: u64, dst: &mut [u8]| mem.read(gpa, dst);
        let frame = match tx_gather(chain.segments(), &read, hdr_len, &mut scratch.buf) {
            Ok(f) => f,
            Err(e) => {
                bump(&k.errors, 1);
                log::debug!("queue {queue}: transmit chain refused: {e}");
                return;
            }
        };
        if let NetBackend::Tap { .. } = inner.backend {
            let acked = NetFeatures::from_bits_retain(inner.acked.load(Ordering::Relaxed));
            if let Err(e) = check_tx_hdr(&frame.hdr, frame.len, acked, inner.mtu_frame) {
                bump(&k.errors, 1);
                log::debug!("queue {queue}: transmit frame refused: {e}");
                return;
            }
        }
        k.frame(frame.len);
        match &inner.backend {
            NetBackend::Null { .. } => {} // Dropped unread above.
            NetBackend::Loopback => {
                let Some(p) = self.pair(pair) else { return };
                let mut q = lock(&p.frames);
                // Looked at before the copy: a full queue costs none.
                if !q.has_room(frame.len) {
                    bump(&k.drops, 1);
                } else if q
                    .push(Frame {
                        hdr: VirtioNetHdr::default(),
                        data: scratch.buf[..frame.len].to_vec(),
                        gen: mode.gen,
                    })
                    .is_ok()
                {
                    scratch.pushed = true;
                }
            }
            NetBackend::Tap { .. } => {
                let Some(t) = self.pair(pair).and_then(|p| p.tap.as_deref()) else {
                    return;
                };
                let hdr = &frame.hdr.as_bytes()[..hdr_len.min(VirtioNetHdr::SIZE)];
                if let Err(e) = t.write(hdr, &scratch.buf[..frame.len]) {
                    // The tap refuses what the host cannot take (a bad
                    // offload header) or has no room: the frame is lost,
                    // as on a wire.
                    bump(&k.drops, 1);
                    log::debug!("queue {queue}: tap write failed: {e}");
                }
            }
        }
    }

    /// Pairs held receive chains with frames, oldest first; completes
    /// them. While stopping, completes what is left with length 0.
    fn receive<M: GuestMemory + ?Sized>(
        &self,
        queue: u16,
        pair: u16,
        mem: &M,
        scratch: &mut Scratch,
        done: &mut dyn FnMut(Token, u32),
    ) {
        let inner = &*self.inner;
        let k = self.count(queue);
        let write = |gpa: u64, src: &[u8]| mem.write(gpa, src);
        let mode = inner.mode();
        let RxMode {
            hdr_len,
            mergeable,
            guest_csum,
            ..
        } = mode;
        let default_hdr = VirtioNetHdr::default();
        // While the mode changes, nothing is delivered (the frames queued
        // are of the old mode, and go).
        let mut frames = match (&inner.backend, self.pair(pair)) {
            (NetBackend::Loopback | NetBackend::Tap { .. }, Some(p))
                if !scratch.held.is_empty() && !mode.changing() =>
            {
                Some(lock(&p.frames))
            }
            _ => None,
        };
        let mut taken = false;
        while !scratch.held.is_empty() {
            if let Some(q) = frames.as_deref_mut() {
                // Frames of another mode (read before the features
                // changed): dropped, not given the new header layout.
                while q.front_mut().is_some_and(|f| f.gen != mode.gen) {
                    q.pop_front();
                    bump(&k.drops, 1);
                    taken = true;
                }
            }
            let (frame, hdr): (&[u8], &VirtioNetHdr) = match (&inner.backend, frames.as_deref_mut())
            {
                (NetBackend::Null { template }, _) => (template, &default_hdr),
                (_, Some(q)) => match q.front_mut() {
                    Some(f) => {
                        // Without GUEST_CSUM the flags must be zero (the
                        // tap hands over checksummed frames then).
                        if !guest_csum {
                            f.hdr.flags = 0;
                        }
                        (&f.data, &f.hdr)
                    }
                    None => break,
                },
                _ => break,
            };
            let mut consumed_frame = true;
            if mergeable {
                scratch.used.resize(MAX_MERGE, 0);
                let chains = scratch.held.make_contiguous();
                match rx_fill_merged(chains, &write, hdr, frame, &mut scratch.used) {
                    Ok(n) => {
                        for i in 0..n {
                            let h = scratch.held.pop_front();
                            if let Some(h) = h {
                                done(h.token, scratch.used[i]);
                                scratch.spare.push(h.segments);
                            }
                        }
                        k.frame(frame.len());
                    }
                    Err(e) if matches!(e.error, NetError::NoRoom { .. }) => {
                        if chains.len() < MAX_MERGE {
                            // More chains may come: keep the frame.
                            break;
                        }
                        // Even the most chains a frame may take are too
                        // small: drop it.
                        bump(&k.drops, 1);
                        if frames.is_none() {
                            // The null backend's next frame is the same
                            // template, which these chains will never
                            // take either: give the oldest back empty, as
                            // a single buffer too small is, or this loop
                            // would not end.
                            self.refuse(queue, scratch, 0, e.error, done);
                        }
                    }
                    Err(e) => {
                        // A chain that went bad: complete it empty.
                        consumed_frame = false;
                        self.refuse(queue, scratch, e.chain, e.error, done);
                    }
                }
            } else {
                let Some(h) = scratch.held.front() else { break };
                match rx_fill(&h.segments, &write, hdr, hdr_len, frame) {
                    Ok(n) => {
                        if let Some(h) = scratch.held.pop_front() {
                            done(h.token, n);
                            scratch.spare.push(h.segments);
                        }
                        k.frame(frame.len());
                    }
                    Err(e) => {
                        // A buffer too small for the frame (the driver
                        // should post buffers for the largest frame), or
                        // one that went bad: drop the frame, complete the
                        // chain empty.
                        if matches!(e, NetError::NoRoom { .. }) {
                            bump(&k.drops, 1);
                        } else {
                            consumed_frame = false;
                        }
                        self.refuse(queue, scratch, 0, e, done);
                    }
                }
            }
            if consumed_frame {
                if let Some(q) = frames.as_deref_mut() {
                    q.pop_front();
                    taken = true;
                }
            }
        }
        drop(frames);
        if taken {
            if let Some(p) = self.pair(pair) {
                p.space.notify_all();
            }
        }
        if scratch.stopping {
            while let Some(h) = scratch.held.pop_front() {
                done(h.token, 0);
                scratch.spare.push(h.segments);
            }
        }
    }

    /// Completes held chain `i` with length 0 (refused).
    fn refuse(
        &self,
        queue: u16,
        scratch: &mut Scratch,
        i: usize,
        error: NetError,
        done: &mut dyn FnMut(Token, u32),
    ) {
        if let Some(h) = scratch.held.remove(i) {
            log::debug!("queue {queue}: receive chain refused: {error}");
            bump(&self.count(queue).errors, 1);
            done(h.token, 0);
            scratch.spare.push(h.segments);
        }
    }
}

impl Device for NetService {
    type Scratch = Scratch;

    fn read_config(&self, offset: u32, dst: &mut [u8]) -> bool {
        lock(&self.inner.device).read_config(offset, dst).is_ok()
    }

    fn write_config(&mut self, offset: u32, src: &[u8], kind: ConfigWriteKind) -> bool {
        lock(&self.inner.device)
            .write_config(offset, src, kind)
            .is_ok()
    }

    fn features_acked(&mut self, features: VirtioFeatures) {
        log::info!(
            "front-end acked virtio features {:#x} ({features:?})",
            features.bits()
        );
        let (hdr_len, acked, changed) = {
            let mut d = lock(&self.inner.device);
            let before = (d.hdr_len(), d.acked_features());
            d.set_features(features);
            let after = (d.hdr_len(), d.acked_features());
            (after.0, after.1, before != after)
        };
        // QEMU repeats SET_FEATURES for each queue pair, possibly while
        // the first pair runs: the same features change nothing.
        if !changed {
            return;
        }
        // Frames read or queued before are dropped, counted: their
        // header may have the old length, their offloads ones the driver
        // no longer takes (see `RxMode`).
        self.change_mode(hdr_len, acked);
        let dropped = self.clear_frames();
        for (k, n) in dropped.into_iter().enumerate() {
            if n != 0 {
                bump(&self.count((k * 2) as u16).drops, n);
            }
        }
    }

    fn reset(&mut self) {
        let hdr_len = {
            let mut d = lock(&self.inner.device);
            d.reset();
            d.hdr_len()
        };
        self.change_mode(hdr_len, NetFeatures::empty());
        self.inner.mtu.store(0, Ordering::Relaxed);
        self.restore_tap_mtu();
        self.clear_frames();
    }

    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        queue: u16,
        chain: &Chain<S>,
        token: Token,
        mem: &M,
        scratch: &mut Scratch,
    ) -> Completion {
        if !token.side_effects() {
            return Completion::Done(0);
        }
        match QueueRole::of(queue) {
            QueueRole::Tx(pair) => {
                self.transmit(queue, pair, chain, mem, scratch);
                Completion::Done(0)
            }
            QueueRole::Rx(pair) => {
                let mode = self.inner.mode();
                let hdr_len = mode.hdr_len;
                if let Err(e) = rx_capacity(chain.segments(), hdr_len) {
                    log::debug!("queue {queue}: receive chain refused: {e}");
                    bump(&self.count(queue).errors, 1);
                    return Completion::Done(0);
                }
                if scratch.ready.is_none() {
                    scratch.ready = self.pair(pair).map(|p| p.ready.clone());
                }
                if scratch.running.is_none()
                    && !scratch.stopping
                    && matches!(self.inner.backend, NetBackend::Tap { .. })
                {
                    scratch.running = RxRunning::new(&self.inner, usize::from(pair));
                }
                // The null backend has a frame for every chain: fill it now
                // when none is waiting before it (one that needs more
                // chains, or that the fill refuses, is held and goes the
                // way of the others).
                if let NetBackend::Null { template } = &self.inner.backend {
                    if scratch.held.is_empty() && !scratch.stopping {
                        // One buffer with room for the 12-byte header and
                        // the frame (what DPDK and Linux post): both in one
                        // copy.
                        let framed = &self.inner.null_framed;
                        if let ([s], VirtioNetHdr::SIZE) = (chain.segments(), hdr_len) {
                            if s.len as usize >= framed.len() && mem.write(s.addr, framed).is_ok() {
                                self.count(queue).frame(template.len());
                                return Completion::Done(framed.len() as u32);
                            }
                        }
                        let write = |gpa: u64, src: &[u8]| mem.write(gpa, src);
                        let hdr = VirtioNetHdr::default();
                        let filled = if mode.mergeable {
                            let mut used = [0u32; 1];
                            match rx_fill_merged(
                                &[chain.segments()],
                                &write,
                                &hdr,
                                template,
                                &mut used,
                            ) {
                                Ok(1) => Some(used[0]),
                                _ => None,
                            }
                        } else {
                            rx_fill(chain.segments(), &write, &hdr, hdr_len, template).ok()
                        };
                        if let Some(n) = filled {
                            self.count(queue).frame(template.len());
                            return Completion::Done(n);
                        }
                    }
                }
                let mut segments = scratch.spare.pop().unwrap_or_default();
                segments.clear();
                segments.extend_from_slice(chain.segments());
                scratch.held.push_back(Held { token, segments });
                Completion::Later
            }
        }
    }

    fn poll<M: GuestMemory + ?Sized>(
        &self,
        queue: u16,
        mem: &M,
        scratch: &mut Scratch,
        done: &mut dyn FnMut(Token, u32),
    ) {
        match QueueRole::of(queue) {
            QueueRole::Tx(pair) => {
                if std::mem::take(&mut scratch.pushed) {
                    if let Some(p) = self.pair(pair) {
                        let _ = p.ready.write(1);
                    }
                }
            }
            QueueRole::Rx(pair) => self.receive(queue, pair, mem, scratch, done),
        }
    }

    fn stopping(&self, _queue: u16, scratch: &mut Scratch) {
        scratch.stopping = true;
        // The tap's frames stay in the tap from now on.
        scratch.running = None;
    }

    fn disconnected(&self) {
        for (q, k) in self.inner.counters.iter().enumerate() {
            let dir = if q % 2 == 0 { "rx" } else { "tx" };
            log::info!(
                "queue {q} ({dir}): {} packets, {} bytes, {} drops, {} errors, {} bytes in the largest frame",
                k.packets.load(Ordering::Relaxed),
                k.bytes.load(Ordering::Relaxed),
                k.drops.load(Ordering::Relaxed),
                k.errors.load(Ordering::Relaxed),
                k.largest.load(Ordering::Relaxed),
            );
        }
        let rarps = self.inner.rarps.load(Ordering::Relaxed);
        if rarps != 0 {
            log::info!("SEND_RARP: {rarps} received");
        }
        self.restore_tap_mtu();
        self.clear_frames();
    }

    fn set_mtu(&mut self, mtu: u16) -> bool {
        let max = self.inner.max_mtu;
        if mtu > max {
            log::warn!("NET_SET_MTU {mtu} refused: above the MTU offered, {max}");
            return false;
        }
        // The tap's host side takes frames of that size too (one
        // interface for all the queues); a tap that refuses it leaves
        // the request refused, nothing changed.
        if let Some(t) = self.pair(0).and_then(|p| p.tap.as_deref()) {
            if self.inner.tap_mtu_before.load(Ordering::Relaxed) == 0 {
                match t.mtu() {
                    Ok(before) => self.inner.tap_mtu_before.store(before, Ordering::Relaxed),
                    Err(e) => log::warn!(
                        "cannot read tap {}'s MTU (it is not put back): {e}",
                        t.name()
                    ),
                }
            }
            if let Err(e) = t.set_mtu(mtu) {
                log::warn!(
                    "NET_SET_MTU {mtu} refused: cannot set tap {}'s MTU: {e}",
                    t.name()
                );
                return false;
            }
            log::info!("NET_SET_MTU: tap {} MTU set to {mtu}", t.name());
        }
        log::info!("NET_SET_MTU: the front-end advertises MTU {mtu} (at most {max})");
        self.inner.mtu.store(mtu, Ordering::Relaxed);
        true
    }

    fn send_rarp(&mut self, mac: [u8; 6]) -> bool {
        self.inner.rarps.fetch_add(1, Ordering::Relaxed);
        let m = format_mac(mac);
        match self.pair(0).and_then(|p| p.tap.as_deref()) {
            Some(t) => {
                let _framing = self.tap_framing(0);
                let hdr_len = self.inner.mode().hdr_len;
                let hdr = [0u8; VirtioNetHdr::SIZE];
                match t.write(&hdr[..hdr_len.min(hdr.len())], &tap::rarp_frame(mac)) {
                    Ok(()) => log::info!("SEND_RARP: announced {m} on tap {}", t.name()),
                    Err(e) => log::warn!("SEND_RARP: cannot announce {m} on tap {}: {e}", t.name()),
                }
            }
            None => log::info!("SEND_RARP: {m} (counted: no network to announce it on)"),
        }
        true
    }
}

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

impl SharedDevice for NetService {
    /// The receive ring of a loopback or tap pair sleeps on the pair's
    /// eventfd while it holds chains.
    fn completion_fd<'a>(&self, _queue: u16, scratch: &'a Scratch) -> Option<BorrowedFd<'a>> {
        match self.inner.backend {
            NetBackend::Loopback | NetBackend::Tap { .. } => {
                scratch.ready.as_deref().map(AsFd::as_fd)
            }
            NetBackend::Null { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests;

//! The data plane of one ring: the request path of a back-end as a plain
//! value, for any host.
//!
//! A [`DataPlane`] owns a started ring (split or packed, its private
//! business) and, with INFLIGHT_SHMFD, the ring's region of the inflight
//! area. It carries out the crash-safe sequence every back-end needs:
//!
//! ```text
//! start ─► recover (requests recorded in the area are handed out first,
//!          in fetch order)
//! pop ───► the chain is recorded in the area before it is handed out;
//!          the caller gets a Token
//! complete(token, len) ─► in any order, at any time: the used entry is
//!          written at once, the inflight record waits for the publish
//! publish ─► one used-index store, the inflight batch committed around
//!          it, and the notification decision (EVENT_IDX, NO_INTERRUPT,
//!          packed event suppression) returned as a value
//! stop ──► drain (the caller completes what it holds, then asks again)
//!          or suspend (GET_VRING_BASE_INFLIGHT: what is outstanding stays
//!          recorded in the area; the base is where the ring resumes)
//! ```
//!
//! Every method takes guest memory, and the inflight area, per call; the
//! data plane holds no reference. It never blocks and never allocates: the
//! state is a few words plus the inflight entries of completions not yet
//! published (at most [`PUBLISH_BATCH`]; completing more publishes).
//!
//! Ring states follow the amended specification: a stopped ring is not
//! touched; a started but disabled ring is paused, or consumed without side
//! effects when the device asks for it (each token says whether its
//! request may have side effects); a started and enabled ring is served.
//!
//! A guest that breaks a ring rule, or an inflight area that cannot be
//! trusted, breaks the ring: [`pop`](DataPlane::pop) returns the error from
//! then on, nothing more is taken, and [`stop`](DataPlane::stop) answers at
//! once with the ring's position.

use core::fmt;

use heapless::Vec;

use crate::inflight::{packed_used_at, InflightError, PackedInflight, Resubmit, SplitInflight};
use crate::log::{DirtyLog, LogError};
use crate::memory::GuestMemory;
use crate::vring::{Chain, Head, Queue, RingAddrs, VringError};

#[cfg(feature = "in-order")]
mod order;
#[cfg(feature = "in-order")]
pub use order::WINDOW as IN_ORDER_WINDOW;

/// Bytes of a [`DataPlane`] that hold IN_ORDER completions: 0 without the
/// `in-order` feature. A crate that budgets the data plane's RAM for a
/// build without the feature (the bare-metal back-end) subtracts it when
/// a workspace build unifies the feature in.
#[cfg(feature = "in-order")]
pub const IN_ORDER_STATE_BYTES: usize = core::mem::size_of::<order::Order>();
/// Bytes of a [`DataPlane`] that hold IN_ORDER completions: 0 without the
/// `in-order` feature.
#[cfg(not(feature = "in-order"))]
pub const IN_ORDER_STATE_BYTES: usize = 0;

/// Completions whose inflight records wait for one publish, at most;
/// completing one more publishes first. Without an inflight area there is
/// no bound: the used ring holds the batch.
pub const PUBLISH_BATCH: usize = 16;

/// A request handed out by [`DataPlane::pop`]: give it back to
/// [`DataPlane::complete`] with the number of bytes written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Token {
    /// The chain's id (bits 0..16), the descriptors it took (16..32), its
    /// inflight entry (32..48) and its pop order (48..64, IN_ORDER): one
    /// word built in a register, so a token is stored and copied whole
    /// (separate narrow stores read back as one word stall the CPU).
    bits: u64,
    /// [`Token::SIDE_EFFECTS`], [`Token::READONLY`].
    flags: u8,
}

impl Token {
    const SIDE_EFFECTS: u8 = 1;
    /// The chain has no device-writable buffer (IN_ORDER may elide its
    /// used entry when its length is 0).
    #[cfg(feature = "in-order")]
    const READONLY: u8 = 2;

    #[inline(always)]
    fn new(head: Head, entry: u16, seq: u16, flags: u8) -> Self {
        Token {
            bits: u64::from(head.id)
                | u64::from(head.descs) << 16
                | u64::from(entry) << 32
                | u64::from(seq) << 48,
            flags,
        }
    }

    /// The chain's id (split: head descriptor index; packed: buffer id).
    #[inline]
    pub fn id(&self) -> u16 {
        self.bits as u16
    }

    #[inline(always)]
    fn head(&self) -> Head {
        Head {
            id: self.bits as u16,
            descs: (self.bits >> 16) as u16,
        }
    }

    #[inline(always)]
    fn entry(&self) -> u16 {
        (self.bits >> 32) as u16
    }

    /// Pop order (IN_ORDER).
    #[cfg(feature = "in-order")]
    #[inline(always)]
    fn seq(&self) -> u16 {
        (self.bits >> 48) as u16
    }

    #[cfg(feature = "in-order")]
    #[inline(always)]
    fn readonly(&self) -> bool {
        self.flags & Self::READONLY != 0
    }

    /// Whether the request may have side effects: false for a request
    /// consumed from a started but disabled ring (complete it with length
    /// 0 and touch nothing).
    #[inline]
    pub fn side_effects(&self) -> bool {
        self.flags & Self::SIDE_EFFECTS != 0
    }
}

/// Why the data plane refused an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DataPlaneError {
    /// The guest broke a ring rule, or the ring is not accessible.
    Vring(VringError),
    /// The inflight area was refused or could not be written.
    Inflight(InflightError),
    /// The ring tracks requests in an inflight area and none was passed.
    NoInflightArea,
    /// `complete` without a request outstanding.
    NotOutstanding,
    /// The ring was stopped; its tokens are void.
    Stopped,
}

impl From<VringError> for DataPlaneError {
    fn from(e: VringError) -> Self {
        DataPlaneError::Vring(e)
    }
}

impl From<InflightError> for DataPlaneError {
    fn from(e: InflightError) -> Self {
        DataPlaneError::Inflight(e)
    }
}

impl fmt::Display for DataPlaneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataPlaneError::Vring(e) => write!(f, "{e}"),
            DataPlaneError::Inflight(e) => write!(f, "inflight area: {e}"),
            DataPlaneError::NoInflightArea => f.write_str("inflight area missing"),
            DataPlaneError::NotOutstanding => f.write_str("no request outstanding"),
            DataPlaneError::Stopped => f.write_str("ring stopped"),
        }
    }
}

impl core::error::Error for DataPlaneError {}

/// What a publish did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Published {
    /// Nothing was waiting to be published.
    Nothing,
    /// Used entries were published and the guest wants a notification:
    /// signal the ring's call notifier.
    Notify,
    /// Used entries were published; the guest suppressed the notification.
    Suppressed,
}

impl Published {
    /// Whether the guest must be notified.
    pub fn notify(self) -> bool {
        self == Published::Notify
    }
}

/// The answer to [`DataPlane::stop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Stop {
    /// Requests are outstanding (or recorded ones not yet resubmitted):
    /// keep popping and completing, then call `stop` again.
    Draining,
    /// The ring is stopped; `base` is the GET_VRING_BASE value.
    Stopped {
        /// Where the ring resumes.
        base: u32,
    },
}

#[derive(Clone, Copy, Debug)]
enum Tracker {
    None,
    Split(SplitInflight),
    Packed(PackedInflight),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// Stop asked for: hand out only recorded requests (drain).
    Draining,
    Stopped,
}

/// One started ring's request path. See the [module documentation](self).
#[derive(Clone, Debug)]
pub struct DataPlane {
    queue: Queue,
    tracker: Tracker,
    phase: Phase,
    enabled: bool,
    consume_disabled: bool,
    broken: Option<DataPlaneError>,
    /// Popped and not completed.
    outstanding: u16,
    /// Recorded requests still to hand out, and the last one handed out.
    resubmit_left: u16,
    resubmit_after: Option<Resubmit>,
    /// Inflight entries of completions not yet published.
    pending: Vec<u16, PUBLISH_BATCH>,
    /// `pop` may go straight to the ring: running, not broken, nothing to
    /// resubmit, and not paused (kept by [`refresh`](Self::refresh)).
    fast: bool,
    /// VIRTIO_F_IN_ORDER: pop order and the completions held to keep it.
    #[cfg(feature = "in-order")]
    order: order::Order,
}

impl DataPlane {
    /// Starts serving `queue` (built by the session from the ring's size,
    /// addresses, base and features). `enabled` is the ring's
    /// enabled flag; `consume_disabled` is the device's choice for a
    /// started but disabled ring (consume without side effects, instead of
    /// pausing).
    ///
    /// With `inflight` (the area and this ring's offset in it), the ring's
    /// region is opened (a fresh one is initialised), a batch cut short
    /// by a crash is repaired, and the requests recorded there are handed
    /// out by [`pop`](Self::pop) before any new one, in fetch order, with
    /// the ring positioned after them. A region that cannot be trusted
    /// leaves the data plane broken (see [`error`](Self::error)), never
    /// half-started.
    pub fn start<M: GuestMemory + ?Sized>(
        queue: Queue,
        enabled: bool,
        consume_disabled: bool,
        mem: &M,
        inflight: Option<(&M, u64)>,
    ) -> Self {
        let mut dp = DataPlane {
            queue,
            tracker: Tracker::None,
            phase: Phase::Running,
            enabled,
            consume_disabled,
            broken: None,
            outstanding: 0,
            resubmit_left: 0,
            resubmit_after: None,
            pending: Vec::new(),
            fast: false,
            #[cfg(feature = "in-order")]
            order: order::Order::new(),
        };
        #[cfg(feature = "in-order")]
        {
            dp.order.on = dp.queue.in_order();
        }
        if let Some((area, offset)) = inflight {
            if let Err(e) = dp.recover(mem, area, offset) {
                dp.broken = Some(e);
            }
        }
        dp.refresh();
        dp
    }

    /// VIRTIO_F_IN_ORDER was negotiated (a queue built by
    /// [`Queue::new`] from features with the bit is started with this on
    /// already; this is for a queue built otherwise): from now on
    /// completions reach the
    /// used ring in the order the requests were handed out (an early one
    /// is held, in fixed storage, until those before it are done; at most
    /// [`IN_ORDER_WINDOW`] requests past the oldest unfinished one are
    /// handed out), runs of completions that wrote nothing into chains
    /// without a device-writable buffer are published as one used entry
    /// (split) or descriptor (packed), and a split chain that does not
    /// start where the previous one ended breaks the ring
    /// ([`VringError::OutOfOrder`]). Call it right after
    /// [`start`](Self::start), before the first pop.
    #[cfg(feature = "in-order")]
    pub fn set_in_order(&mut self) {
        self.order.on = true;
        self.queue.set_in_order(true);
    }

    /// Whether VIRTIO_F_IN_ORDER handling is on.
    #[cfg(feature = "in-order")]
    pub fn in_order(&self) -> bool {
        self.order.on
    }

    /// Recomputes the fast-path flag after a state change.
    fn refresh(&mut self) {
        self.fast = !self.paused() && self.resubmit_left == 0;
    }

    fn recover<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        area: &M,
        offset: u64,
    ) -> Result<(), DataPlaneError> {
        match &mut self.queue {
            Queue::Split(s) => {
                let (mut t, fresh) = SplitInflight::open(area, offset, s.size())?;
                if !fresh {
                    let used = s.next_used();
                    let n = t.recover_count(area, used)?;
                    s.set_next_avail(used.wrapping_add(n));
                    self.resubmit_left = n;
                }
                self.tracker = Tracker::Split(t);
            }
            Queue::Packed(p) => {
                let (mut t, fresh) = PackedInflight::open(area, offset, p.size(), p.next_used())?;
                if !fresh {
                    let ring: &crate::vring::PackedQueue = p;
                    let (pos, n) =
                        t.recover_count(area, |slot, wrap| packed_used_at(mem, ring, slot, wrap))?;
                    p.set_base(pos.base())?;
                    self.resubmit_left = n;
                }
                self.tracker = Tracker::Packed(t);
            }
        }
        Ok(())
    }

    /// The error that broke the ring, if one did.
    pub fn error(&self) -> Option<DataPlaneError> {
        self.broken
    }

    /// Recorded requests not yet handed out again.
    pub fn resubmits_left(&self) -> u16 {
        self.resubmit_left
    }

    /// Requests handed out and not completed.
    pub fn outstanding(&self) -> u16 {
        self.outstanding
    }

    /// Whether requests are recorded in an inflight area.
    pub fn tracked(&self) -> bool {
        !matches!(self.tracker, Tracker::None)
    }

    /// Whether the ring is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// SET_VRING_ENABLE (or SET_FEATURES without bit 30) on the running
    /// ring.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        self.refresh();
    }

    /// Whether [`pop`](Self::pop) takes nothing new from the ring now:
    /// stopping, stopped, broken, or disabled and not consumed. Recorded
    /// requests are still handed out.
    pub fn paused(&self) -> bool {
        self.phase != Phase::Running
            || self.broken.is_some()
            || (!self.enabled && !self.consume_disabled)
    }

    /// The ring moved (the memory table changed while it runs).
    pub fn set_addrs(&mut self, addrs: RingAddrs) -> Result<(), DataPlaneError> {
        self.queue.set_addrs(addrs).map_err(|e| self.fail(e.into()))
    }

    /// The ring's size.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// The GET_VRING_BASE value of the ring as it is now.
    pub fn base(&self) -> u32 {
        self.queue.base()
    }

    fn fail(&mut self, e: DataPlaneError) -> DataPlaneError {
        if matches!(e, DataPlaneError::Vring(_) | DataPlaneError::Inflight(_)) {
            self.broken = Some(e);
            self.fast = false;
        }
        e
    }

    fn area<'m, M: GuestMemory + ?Sized>(
        &self,
        area: Option<&'m M>,
    ) -> Result<Option<&'m M>, DataPlaneError> {
        match (&self.tracker, area) {
            (Tracker::None, _) => Ok(None),
            (_, Some(a)) => Ok(Some(a)),
            (_, None) => Err(DataPlaneError::NoInflightArea),
        }
    }

    /// Hands out the next request: a recorded one first (after a restart),
    /// else the next available chain, recorded in the inflight area before
    /// it is returned. `Ok(None)`: nothing to do now (the ring is empty,
    /// paused, stopping or stopped). The chain is written into `chain`.
    #[inline]
    pub fn pop<M: GuestMemory + ?Sized, const S: usize>(
        &mut self,
        mem: &M,
        area: Option<&M>,
        chain: &mut Chain<S>,
    ) -> Result<Option<Token>, DataPlaneError> {
        if self.fast {
            return self.pop_ring(mem, area, chain).map_err(|e| self.fail(e));
        }
        self.pop_slow(mem, area, chain)
    }

    /// `pop` when the fast path is closed: the error that broke the ring,
    /// a recorded request, or nothing.
    #[inline(never)]
    fn pop_slow<M: GuestMemory + ?Sized, const S: usize>(
        &mut self,
        mem: &M,
        area: Option<&M>,
        chain: &mut Chain<S>,
    ) -> Result<Option<Token>, DataPlaneError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        if self.phase == Phase::Stopped {
            return Ok(None);
        }
        if self.resubmit_left > 0 {
            return self.resubmit(mem, area, chain).map_err(|e| self.fail(e));
        }
        // Paused (disabled, or stopping): the ring itself is popped only on
        // the fast path, which `refresh` opens whenever it may be.
        debug_assert!(self.paused());
        Ok(None)
    }

    #[inline(always)]
    fn pop_ring<M: GuestMemory + ?Sized, const S: usize>(
        &mut self,
        mem: &M,
        area: Option<&M>,
        chain: &mut Chain<S>,
    ) -> Result<Option<Token>, DataPlaneError> {
        #[cfg(feature = "in-order")]
        if self.order.full() {
            return Ok(None);
        }
        let entry = match (&mut self.tracker, &mut self.queue) {
            (Tracker::None, q) => {
                if !q.pop_into(mem, chain)? {
                    return Ok(None);
                }
                chain.head().id
            }
            (Tracker::Split(t), q) => {
                let a = area.ok_or(DataPlaneError::NoInflightArea)?;
                if !q.pop_into(mem, chain)? {
                    return Ok(None);
                }
                let id = chain.head().id;
                t.fetched(a, id)?;
                id
            }
            (Tracker::Packed(t), Queue::Packed(p)) => {
                let a = area.ok_or(DataPlaneError::NoInflightArea)?;
                let before = p.next_avail().0;
                if !p.pop_into(mem, chain)? {
                    return Ok(None);
                }
                t.fetched_from_ring(a, mem, p, before, chain.head().descs)?
            }
            // A packed tracker is only made for a packed ring.
            (Tracker::Packed(_), Queue::Split(_)) => return Err(DataPlaneError::NoInflightArea),
        };
        self.outstanding += 1;
        Ok(Some(self.token(chain, entry, self.enabled)))
    }

    #[inline(always)]
    fn token<const S: usize>(&mut self, chain: &Chain<S>, entry: u16, side_effects: bool) -> Token {
        let flags = if side_effects { Token::SIDE_EFFECTS } else { 0 };
        #[cfg(feature = "in-order")]
        let flags = if chain.writable_len() == 0 {
            flags | Token::READONLY
        } else {
            flags
        };
        #[cfg(feature = "in-order")]
        let seq = self.order.take();
        #[cfg(not(feature = "in-order"))]
        let seq = 0;
        Token::new(chain.head(), entry, seq, flags)
    }

    #[inline(never)]
    fn resubmit<M: GuestMemory + ?Sized, const S: usize>(
        &mut self,
        mem: &M,
        area: Option<&M>,
        chain: &mut Chain<S>,
    ) -> Result<Option<Token>, DataPlaneError> {
        let Some(a) = self.area(area)? else {
            self.resubmit_left = 0;
            self.refresh();
            return Ok(None);
        };
        #[cfg(feature = "in-order")]
        if self.order.full() {
            return Ok(None);
        }
        let next = match &self.tracker {
            Tracker::Split(t) => t.next_resubmit(a, self.resubmit_after)?,
            Tracker::Packed(t) => t.next_resubmit(a, self.resubmit_after)?,
            Tracker::None => None,
        };
        let Some(r) = next else {
            // The area changed under us (only a hostile front-end does
            // that): nothing more to resubmit.
            self.resubmit_left = 0;
            self.refresh();
            return Ok(None);
        };
        match (&self.tracker, &self.queue) {
            (Tracker::Split(_), Queue::Split(s)) => s.chain_at(mem, r.head, chain)?,
            (Tracker::Packed(t), Queue::Packed(p)) => {
                t.chain_of(a, mem, p.features().indirect, r.head, chain)?
            }
            _ => return Err(DataPlaneError::NoInflightArea),
        }
        self.resubmit_left -= 1;
        self.resubmit_after = Some(r);
        self.refresh();
        self.outstanding += 1;
        Ok(Some(self.token(chain, r.head, true)))
    }

    /// Completes a request with `len` bytes written into its chain, in any
    /// order relative to the others. The used entry is written now and
    /// reaches the guest at the next [`publish`](Self::publish) (which this
    /// call does itself when [`PUBLISH_BATCH`] tracked completions are
    /// waiting; then its result says whether to notify).
    #[inline]
    pub fn complete<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        area: Option<&M>,
        token: Token,
        len: u32,
    ) -> Result<Published, DataPlaneError> {
        #[cfg(feature = "in-order")]
        if self.order.on {
            return self.complete_in_order(mem, area, token, len);
        }
        if self.phase == Phase::Stopped {
            return Err(DataPlaneError::Stopped);
        }
        if self.outstanding == 0 {
            return Err(DataPlaneError::NotOutstanding);
        }
        let mut published = Published::Nothing;
        if !matches!(self.tracker, Tracker::None) {
            if area.is_none() {
                return Err(DataPlaneError::NoInflightArea);
            }
            if self.pending.is_full() {
                published = self.publish(mem, area)?;
            }
            // Not full: published above if it was.
            let _ = self.pending.push(token.entry());
        }
        if let Err(e) = self.queue.add_used(mem, token.head(), len) {
            if !matches!(self.tracker, Tracker::None) {
                self.pending.pop();
            }
            return Err(self.fail(e.into()));
        }
        self.outstanding -= 1;
        Ok(published)
    }

    /// [`complete`](Self::complete) with IN_ORDER: the completion goes to
    /// the used ring if its request is the oldest one not there yet,
    /// followed by the later ones held; otherwise it is held. A held
    /// completion's request stays recorded in the inflight area (it is
    /// resubmitted after a crash or a suspending stop, as if unfinished:
    /// the guest has not seen it).
    #[cfg(feature = "in-order")]
    #[inline(never)]
    fn complete_in_order<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        area: Option<&M>,
        token: Token,
        len: u32,
    ) -> Result<Published, DataPlaneError> {
        if self.phase == Phase::Stopped {
            return Err(DataPlaneError::Stopped);
        }
        if self.tracked() && area.is_none() {
            return Err(DataPlaneError::NoInflightArea);
        }
        let Some(k) = self.order.position(token.seq()) else {
            return Err(DataPlaneError::NotOutstanding);
        };
        if self.outstanding == 0 {
            return Err(DataPlaneError::NotOutstanding);
        }
        let held = order::Held {
            len,
            id: token.id(),
            descs: token.head().descs,
            entry: token.entry(),
            readonly: token.readonly(),
        };
        if k != 0 {
            self.order.hold(token.seq(), held);
            self.outstanding -= 1;
            return Ok(Published::Nothing);
        }
        let mut published = self.append_in_order(mem, area, held)?;
        self.outstanding -= 1;
        self.order.head = self.order.head.wrapping_add(1);
        while let Some(h) = self.order.take_head() {
            published = published | self.append_in_order(mem, area, h)?;
            self.order.head = self.order.head.wrapping_add(1);
        }
        Ok(published)
    }

    /// One completion into the used ring, in order (publishing first if
    /// the inflight batch is full).
    #[cfg(feature = "in-order")]
    fn append_in_order<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        area: Option<&M>,
        h: order::Held,
    ) -> Result<Published, DataPlaneError> {
        let tracked = self.tracked();
        let mut published = Published::Nothing;
        if tracked {
            if self.pending.is_full() {
                published = self.publish(mem, area)?;
            }
            let _ = self.pending.push(h.entry);
        }
        let head = Head {
            id: h.id,
            descs: h.descs,
        };
        if let Err(e) = self.queue.add_used_in_order(mem, head, h.len, h.readonly) {
            if tracked {
                self.pending.pop();
            }
            return Err(self.fail(e.into()));
        }
        Ok(published)
    }

    /// Publishes the completions since the last publish: the inflight
    /// batch is linked, the used index stored (one release store), the
    /// batch's records cleared. Returns whether to notify the guest.
    #[inline]
    pub fn publish<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        area: Option<&M>,
    ) -> Result<Published, DataPlaneError> {
        self.publish_inner(mem, area).map_err(|e| self.fail(e))
    }

    #[inline(always)]
    fn publish_inner<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        area: Option<&M>,
    ) -> Result<Published, DataPlaneError> {
        if !self.queue.has_unpublished() {
            return Ok(Published::Nothing);
        }
        let area = self.area(area)?;
        let notify = match (&self.tracker, area) {
            (Tracker::Split(t), Some(a)) => {
                t.batch_begin(a, &self.pending)?;
                let notify = self.queue.flush_used(mem)?;
                let used = match &self.queue {
                    Queue::Split(s) => s.next_used(),
                    Queue::Packed(_) => 0,
                };
                t.batch_end(a, &self.pending, used)?;
                notify
            }
            (Tracker::Packed(t), Some(a)) => {
                t.batch_begin(a, &self.pending)?;
                let notify = self.queue.flush_used(mem)?;
                t.batch_end(a, &self.pending)?;
                notify
            }
            _ => self.queue.flush_used(mem)?,
        };
        self.pending.clear();
        Ok(if notify {
            Published::Notify
        } else {
            Published::Suppressed
        })
    }

    /// How many requests the driver has outstanding (made available, as of
    /// the ring's last read of the driver's index, and not yet used),
    /// popped or not: its queue depth (split rings; `None` for packed
    /// ones, whose count would take a scan). A hint for how much to take
    /// before giving completions back.
    pub fn driver_in_flight(&self) -> Option<u16> {
        match &self.queue {
            Queue::Split(s) => Some(s.driver_in_flight()),
            Queue::Packed(_) => None,
        }
    }

    /// Ask the driver for kicks again before sleeping; `Ok(true)` if work
    /// arrived meanwhile (serve it instead of sleeping).
    pub fn enable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, DataPlaneError> {
        // IN_ORDER window full: nothing is popped, not even a recorded
        // request, until a completion makes room (that completion, not a
        // kick, is what to wait for).
        #[cfg(feature = "in-order")]
        if self.order.full() {
            return Ok(false);
        }
        if self.resubmit_left > 0 {
            return Ok(true);
        }
        if self.paused() {
            return Ok(false);
        }
        self.queue
            .enable_notification(mem)
            .map_err(|e| self.fail(e.into()))
    }

    /// Ask the driver not to kick (the device is polling).
    pub fn disable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), DataPlaneError> {
        self.queue
            .disable_notification(mem)
            .map_err(|e| self.fail(e.into()))
    }

    /// GET_VRING_BASE: stop the ring. Publishes what was completed (the
    /// caller notifies if [`Published::notify`]), then:
    ///
    /// - with `suspend` and an inflight area (GET_VRING_BASE_INFLIGHT or
    ///   message 45), stops at once: the requests outstanding and those not
    ///   yet resubmitted stay recorded, unfinished and unseen by the guest,
    ///   for the next start (here or at a migration destination) to
    ///   resubmit; their tokens are void;
    /// - otherwise drains: [`Stop::Draining`] while requests are
    ///   outstanding or recorded ones wait (pop hands out only those; the
    ///   caller completes everything and calls `stop` again);
    /// - a broken ring stops at once.
    ///
    /// [`Stop::Stopped`] carries the GET_VRING_BASE value; the data plane
    /// touches the ring no more.
    pub fn stop<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        area: Option<&M>,
        suspend: bool,
    ) -> (Stop, Result<Published, DataPlaneError>) {
        if self.phase == Phase::Stopped {
            return (Stop::Stopped { base: self.base() }, Ok(Published::Nothing));
        }
        let published = if self.broken.is_some() {
            Ok(Published::Nothing)
        } else {
            self.publish(mem, area)
        };
        let suspend = suspend && self.tracked();
        let drained = self.outstanding == 0 && self.resubmit_left == 0;
        if suspend || drained || self.broken.is_some() {
            self.phase = Phase::Stopped;
            self.fast = false;
            (Stop::Stopped { base: self.base() }, published)
        } else {
            self.phase = Phase::Draining;
            self.fast = false;
            (Stop::Draining, published)
        }
    }

    /// Whether [`stop`](Self::stop) answered [`Stop::Stopped`].
    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// Marks in `log` the ring areas the device writes, for a ring whose
    /// SET_VRING_ADDR carried VHOST_VRING_F_LOG with the log address
    /// `log_addr` ([`Session::ring_log`](crate::backend::Session::ring_log)):
    ///
    /// - split: the whole used ring (flags, index, elements, avail event:
    ///   `6 + 8 * size` bytes) at `log_addr`, where the front-end said its
    ///   used ring is;
    /// - packed: the descriptor ring, which the device writes used
    ///   descriptors back into, at its own guest address, and the device
    ///   event area at `log_addr`.
    ///
    /// Returns the pages marked. A host calls it after the writes it
    /// reports (after a round that published, or changed notifications,
    /// and after [`stop`](Self::stop)), while logging is on; the data
    /// plane itself never looks at a log, so it costs nothing otherwise.
    /// The areas are a few pages at most: marking them whole is cheaper
    /// than tracking which entries changed.
    pub fn log_used<L: GuestMemory + ?Sized>(
        &self,
        log: &DirtyLog<'_, L>,
        log_addr: u64,
    ) -> Result<u64, LogError> {
        let n = u64::from(self.size());
        match &self.queue {
            Queue::Split(_) => log.mark(log_addr, 6 + 8 * n),
            Queue::Packed(_) => {
                let desc = log.mark(self.queue.addrs().desc, 16 * n)?;
                Ok(desc + log.mark(log_addr, 4)?)
            }
        }
    }
}

/// Both publish results of one call together (the auto-publish inside
/// `complete` and an explicit one): notify if either asks.
impl core::ops::BitOr for Published {
    type Output = Published;
    fn bitor(self, rhs: Published) -> Published {
        match (self, rhs) {
            (Published::Notify, _) | (_, Published::Notify) => Published::Notify,
            (Published::Suppressed, _) | (_, Published::Suppressed) => Published::Suppressed,
            _ => Published::Nothing,
        }
    }
}

//! VIRTIO_F_IN_ORDER for the data plane: completions reach the used ring
//! in the order their chains were popped, whatever order the device
//! finishes them in.
//!
//! Each popped request gets a sequence number. A completion for the
//! oldest request not yet in the used ring goes there at once, followed
//! by every later one already finished; a completion that comes early is
//! held here until the ones before it are done. The holding is fixed
//! storage: [`WINDOW`] requests from the oldest unfinished one, at most,
//! are handed out (pop answers "nothing now" beyond, and the next
//! completion makes room), so a ring larger than the window, or a driver
//! that re-posts buffers in flight, never needs more.

use core::fmt;

/// Requests a ring with IN_ORDER hands out past its oldest unfinished
/// one, at most (the largest net ring QEMU and DPDK set up).
pub const WINDOW: usize = 1024;

const WORDS: usize = WINDOW / 64;

/// What a held completion needs to reach the used ring later.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Held {
    pub(super) len: u32,
    pub(super) id: u16,
    pub(super) descs: u16,
    /// Inflight area entry (tracked rings).
    pub(super) entry: u16,
    /// The chain had no device-writable buffer (its used entry may be
    /// elided when its length is 0).
    pub(super) readonly: bool,
}

/// The in-order state of one ring.
#[derive(Clone)]
pub(super) struct Order {
    pub(super) on: bool,
    /// Sequence number of the next request handed out.
    next: u16,
    /// Sequence number of the oldest request not in the used ring.
    pub(super) head: u16,
    /// Finished and held, by sequence number modulo the window.
    done: [u64; WORDS],
    held: [Held; WINDOW],
}

impl fmt::Debug for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held: u32 = self.done.iter().map(|w| w.count_ones()).sum();
        f.debug_struct("Order")
            .field("on", &self.on)
            .field("next", &self.next)
            .field("head", &self.head)
            .field("held", &held)
            .finish()
    }
}

impl Order {
    pub(super) const fn new() -> Self {
        Order {
            on: false,
            next: 0,
            head: 0,
            done: [0; WORDS],
            held: [Held {
                len: 0,
                id: 0,
                descs: 0,
                entry: 0,
                readonly: false,
            }; WINDOW],
        }
    }

    /// Whether the window is full: hand out nothing more now.
    #[inline]
    pub(super) fn full(&self) -> bool {
        self.on && usize::from(self.next.wrapping_sub(self.head)) >= WINDOW
    }

    /// The sequence number for a request handed out now.
    #[inline]
    pub(super) fn take(&mut self) -> u16 {
        let s = self.next;
        self.next = s.wrapping_add(1);
        s
    }

    /// Where `seq` stands from the oldest request not in the used ring:
    /// `Some(0)` it is that one, `Some(k)` k after it, `None` not
    /// outstanding (never handed out, or finished already).
    pub(super) fn position(&self, seq: u16) -> Option<u16> {
        let k = seq.wrapping_sub(self.head);
        if k >= self.next.wrapping_sub(self.head) || self.is_done(seq) {
            return None;
        }
        Some(k)
    }

    fn bit(seq: u16) -> (usize, u64) {
        let i = usize::from(seq) % WINDOW;
        (i / 64, 1 << (i % 64))
    }

    fn is_done(&self, seq: u16) -> bool {
        let (w, b) = Self::bit(seq);
        self.done.get(w).is_some_and(|x| x & b != 0)
    }

    /// Holds the completion of `seq` until the ones before it are done.
    pub(super) fn hold(&mut self, seq: u16, h: Held) {
        let (w, b) = Self::bit(seq);
        if let (Some(x), Some(slot)) = (
            self.done.get_mut(w),
            self.held.get_mut(usize::from(seq) % WINDOW),
        ) {
            *x |= b;
            *slot = h;
        }
    }

    /// The held completion of the oldest request, if it is there (it
    /// leaves the holding; the caller advances `head`).
    pub(super) fn take_head(&mut self) -> Option<Held> {
        let seq = self.head;
        let (w, b) = Self::bit(seq);
        let x = self.done.get_mut(w)?;
        if *x & b == 0 {
            return None;
        }
        *x &= !b;
        self.held.get(usize::from(seq) % WINDOW).copied()
    }
}

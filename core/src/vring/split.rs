//! Split virtqueue: descriptor table, avail ring, used ring.
//!
//! Layout (little-endian, guest physical addresses):
//!
//! | area | content | size | alignment |
//! |---|---|---|---|
//! | descriptor table | `{ addr: u64, len: u32, flags: u16, next: u16 }` × n | 16 n | 16 |
//! | avail ring | `flags: u16, idx: u16, ring: [u16; n], used_event: u16` | 6 + 2 n | 2 |
//! | used ring | `flags: u16, idx: u16, ring: [{id: u32, len: u32}; n], avail_event: u16` | 6 + 8 n | 4 |
//!
//! Indices are free-running `u16` values; arithmetic wraps at 16 bits and
//! positions in the rings are `idx & (n - 1)` (n is a power of two).

use crate::memory::GuestMemory;

use super::{
    check_area, decode_words, indirect_table, need_event, Chain, Head, RingAddrs, RingFeatures,
    VringError, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_QUEUE_SIZE,
};

/// avail.flags: the driver does not want interrupts (without EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// used.flags: the device does not want kicks (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Avail ring entries read with one copy, at most.
const HEAD_BATCH: usize = 16;

/// A split virtqueue's device-side state.
///
/// Avail entries are read in runs of up to 16: only entries
/// below the avail.idx already loaded with acquire, each read once.
#[derive(Clone, Debug)]
pub struct SplitQueue {
    size: u16,
    mask: u16,
    desc: u64,
    avail: u64,
    used: u64,
    features: RingFeatures,
    /// Next avail index to process.
    next_avail: u16,
    /// Last avail.idx read from the guest (entries up to it are ordered
    /// after that acquire load).
    avail_shadow: u16,
    /// Next used index to write.
    next_used: u16,
    /// used.idx as last published.
    published_used: u16,
    /// `published_used` is meaningful for EVENT_IDX (false after a base
    /// change: the first flush notifies).
    signalled_valid: bool,
    /// Last avail_event value written, if any.
    avail_event: Option<u16>,
    /// EVENT_IDX kicks suppressed ([`SplitQueue::disable_notification`]):
    /// finding the ring empty leaves avail_event where it is.
    quiet: bool,
    /// Heads read ahead: `heads[i]` is the entry of avail index
    /// `heads_at + i`, for `i < heads_len`.
    heads: [u16; HEAD_BATCH],
    heads_at: u16,
    heads_len: u16,
    /// VIRTIO_F_IN_ORDER: the order the driver must keep, and the batch
    /// being written.
    #[cfg(feature = "in-order")]
    order: SplitOrder,
}

/// A split ring's in-order state (VIRTIO_F_IN_ORDER).
#[cfg(feature = "in-order")]
#[derive(Clone, Copy, Debug, Default)]
struct SplitOrder {
    on: bool,
    /// The head the next chain must start at: the driver uses the
    /// descriptor table in order, so a chain starts where the previous
    /// one ended. Unknown after a (re)start.
    expect: Option<u16>,
    /// The unpublished batch of elided completions, if one is open: the
    /// used index of the entry that stands for it and the buffer id the
    /// entry names, its last (written once, when the batch closes).
    batch: Option<(u16, u16)>,
}

impl SplitQueue {
    /// A split queue of `size` entries (a power of two, at most 32768) at
    /// `addrs`. Checks sizes and alignment; use
    /// [`check_areas`](Self::check_areas) to check the areas are mapped.
    /// Indices start at 0; see [`set_next_avail`](Self::set_next_avail)
    /// and [`sync_used`](Self::sync_used).
    pub fn new(size: u16, addrs: RingAddrs, features: RingFeatures) -> Result<Self, VringError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(VringError::BadSize(size));
        }
        let n = u64::from(size);
        check_area(addrs.desc, 16 * n, 16)?;
        check_area(addrs.driver, 6 + 2 * n, 2)?;
        check_area(addrs.device, 6 + 8 * n, 4)?;
        Ok(SplitQueue {
            size,
            mask: size - 1,
            desc: addrs.desc,
            avail: addrs.driver,
            used: addrs.device,
            features,
            next_avail: 0,
            avail_shadow: 0,
            next_used: 0,
            published_used: 0,
            signalled_valid: false,
            avail_event: None,
            quiet: false,
            heads: [0; HEAD_BATCH],
            heads_at: 0,
            heads_len: 0,
            #[cfg(feature = "in-order")]
            order: SplitOrder::default(),
        })
    }

    /// Move the ring to new guest physical addresses (the memory table
    /// changed while the ring runs); indices are kept. Checks alignment.
    pub fn set_addrs(&mut self, addrs: RingAddrs) -> Result<(), VringError> {
        let n = u64::from(self.size);
        check_area(addrs.desc, 16 * n, 16)?;
        check_area(addrs.driver, 6 + 2 * n, 2)?;
        check_area(addrs.device, 6 + 8 * n, 4)?;
        self.desc = addrs.desc;
        self.avail = addrs.driver;
        self.used = addrs.device;
        self.heads_len = 0;
        Ok(())
    }

    /// Check that the descriptor table, avail ring and used ring are
    /// inside guest memory.
    pub fn check_areas<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), VringError> {
        let n = u64::from(self.size);
        mem.check(self.desc, 16 * n)?;
        mem.check(self.avail, 6 + 2 * n)?;
        mem.check(self.used, 6 + 8 * n)?;
        Ok(())
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Ring addresses.
    pub fn addrs(&self) -> RingAddrs {
        RingAddrs {
            desc: self.desc,
            driver: self.avail,
            device: self.used,
        }
    }

    /// Ring features in effect.
    pub fn features(&self) -> RingFeatures {
        self.features
    }

    /// Change the ring features (SET_FEATURES after the ring was set up).
    pub fn set_features(&mut self, features: RingFeatures) {
        self.features = features;
    }

    /// The next avail index the device will process (GET_VRING_BASE).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Requests the driver has outstanding: made available (as of the
    /// device's last read of avail.idx) and not given back in the used
    /// ring, popped or not.
    pub fn driver_in_flight(&self) -> u16 {
        self.avail_shadow.wrapping_sub(self.next_used)
    }

    /// Set the next avail index (SET_VRING_BASE).
    pub fn set_next_avail(&mut self, idx: u16) {
        self.next_avail = idx;
        self.avail_shadow = idx;
        self.avail_event = None;
        self.heads_len = 0;
        #[cfg(feature = "in-order")]
        {
            self.order.expect = None;
        }
    }

    /// The next used index the device will write.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Set the next used index (and consider it published).
    pub fn set_next_used(&mut self, idx: u16) {
        self.next_used = idx;
        self.published_used = idx;
        self.signalled_valid = false;
        #[cfg(feature = "in-order")]
        {
            self.order.batch = None;
        }
    }

    /// Read used.idx from the guest and continue from there: call when the
    /// ring is (re)configured, so a guest that reset its ring and a device
    /// that restarts agree on the used index.
    pub fn sync_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u16, VringError> {
        let idx = mem.load_u16_acquire(self.used + 2)?;
        self.set_next_used(idx);
        Ok(idx)
    }

    /// Reload avail.idx. `Ok(true)` if chains are available.
    #[inline(never)]
    fn refresh_avail<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, VringError> {
        let idx = self.load_avail_idx(mem)?;
        if idx != self.next_avail {
            return Ok(true);
        }
        if !self.features.event_idx || self.quiet || self.avail_event == Some(self.next_avail) {
            return Ok(false);
        }
        // Empty with EVENT_IDX: ask for a kick at the next entry, then look
        // again (the driver may have added one before seeing avail_event).
        self.write_avail_event(mem)?;
        mem.fence();
        Ok(self.load_avail_idx(mem)? != self.next_avail)
    }

    #[inline]
    fn load_avail_idx<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u16, VringError> {
        let idx = mem.load_u16_acquire(self.avail + 2)?;
        if idx.wrapping_sub(self.next_avail) > self.size {
            return Err(VringError::AvailIndexJump {
                avail: idx,
                next: self.next_avail,
            });
        }
        self.avail_shadow = idx;
        Ok(idx)
    }

    fn write_avail_event<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), VringError> {
        let at = self.used + 4 + 8 * u64::from(self.size);
        mem.store_u16_release(at, self.next_avail)?;
        self.avail_event = Some(self.next_avail);
        Ok(())
    }

    /// Pop the next available chain into `chain` (its previous content is
    /// replaced). `Ok(false)` if the ring is empty. On error nothing is
    /// consumed (see the module documentation of [`super`]).
    ///
    /// With EVENT_IDX, finding the ring empty re-arms avail_event, so a
    /// device that pops until `Ok(false)` and then sleeps gets the next
    /// kick (unless [`disable_notification`](Self::disable_notification)
    /// asked for none).
    #[inline(always)]
    pub fn pop_into<M: GuestMemory + ?Sized, const S: usize>(
        &mut self,
        mem: &M,
        chain: &mut Chain<S>,
    ) -> Result<bool, VringError> {
        if self.next_avail == self.avail_shadow && !self.refresh_avail(mem)? {
            return Ok(false);
        }
        let head = self.next_head(mem)?;
        #[cfg(feature = "in-order")]
        if self.order.on {
            return self.pop_in_order(mem, head, chain);
        }
        self.walk::<M, S, true>(mem, head, chain)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(true)
    }

    /// [`pop_into`](Self::pop_into) with VIRTIO_F_IN_ORDER: the chain must
    /// start where the previous one's descriptors ended (the driver uses
    /// the table in ring order); one that does not is refused as
    /// [`VringError::OutOfOrder`] and nothing is consumed.
    #[cfg(feature = "in-order")]
    #[inline(never)]
    fn pop_in_order<M: GuestMemory + ?Sized, const S: usize>(
        &mut self,
        mem: &M,
        head: u16,
        chain: &mut Chain<S>,
    ) -> Result<bool, VringError> {
        if let Some(expected) = self.order.expect {
            if head != expected {
                debug!("in-order ring: head {} where {} was due", head, expected);
                return Err(VringError::OutOfOrder(head));
            }
        }
        let descs = self.walk::<M, S, true>(mem, head, chain)?;
        self.order.expect = Some(head.wrapping_add(descs) & self.mask);
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(true)
    }

    /// Turns VIRTIO_F_IN_ORDER handling on or off (before the first pop):
    /// chains must come in table order, and
    /// [`add_used_in_order`](Self::add_used_in_order) may stand one used
    /// entry for a batch.
    #[cfg(feature = "in-order")]
    pub fn set_in_order(&mut self, on: bool) {
        self.order = SplitOrder {
            on,
            ..SplitOrder::default()
        };
    }

    /// Whether VIRTIO_F_IN_ORDER handling is on.
    #[cfg(feature = "in-order")]
    pub fn in_order(&self) -> bool {
        self.order.on
    }

    /// [`add_used`](Self::add_used) for an in-order ring, in the order the
    /// chains were popped. With `elide` (the completion wrote nothing into
    /// a chain that has no device-writable buffer, so every driver infers
    /// its length, 0), a run of such completions is written as one used
    /// entry at the run's first position carrying the last one's id, and
    /// the used index moves by the run's length (the spec's batched use:
    /// the driver walks its own in-order list up to that id). A run never
    /// spans a [`flush_used`](Self::flush_used).
    #[cfg(feature = "in-order")]
    pub fn add_used_in_order<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: Head,
        len: u32,
        elide: bool,
    ) -> Result<(), VringError> {
        if head.id >= self.size {
            return Err(VringError::BadUsedHead(head.id));
        }
        let elide = elide && len == 0;
        match &mut self.order.batch {
            // The batch's entry names this buffer from now on.
            Some((_, id)) if elide => *id = head.id,
            _ => {
                self.close_batch(mem)?;
                if elide {
                    self.order.batch = Some((self.next_used, head.id));
                } else {
                    let e = u64::from(head.id) | u64::from(len) << 32;
                    mem.write_u64(self.used_entry(self.next_used), e)?;
                }
            }
        }
        self.next_used = self.next_used.wrapping_add(1);
        Ok(())
    }

    #[cfg(feature = "in-order")]
    fn used_entry(&self, idx: u16) -> u64 {
        self.used + 4 + 8 * u64::from(idx & self.mask)
    }

    /// Writes the open batch's entry, naming its last buffer (before a
    /// new entry, and before a flush publishes it).
    #[cfg(feature = "in-order")]
    #[inline]
    fn close_batch<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), VringError> {
        if let Some((at, id)) = self.order.batch.take() {
            mem.write_u64(self.used_entry(at), u64::from(id))?;
        }
        Ok(())
    }

    /// The avail entry at `next_avail`, which is below `avail_shadow`: from
    /// the entries read ahead, or read with the ones after it (up to
    /// `avail_shadow`, the ring's end and [`HEAD_BATCH`]).
    #[inline(always)]
    fn next_head<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u16, VringError> {
        let k = self.next_avail.wrapping_sub(self.heads_at);
        if k < self.heads_len {
            return Ok(self.heads[usize::from(k)]);
        }
        let slot = self.next_avail & self.mask;
        let n = usize::from(
            self.avail_shadow
                .wrapping_sub(self.next_avail)
                .min(self.size - slot),
        )
        .clamp(1, HEAD_BATCH);
        let mut b = [0u8; 2 * HEAD_BATCH];
        mem.read(self.avail + 4 + 2 * u64::from(slot), &mut b[..2 * n])?;
        for (h, w) in self.heads.iter_mut().zip(b[..2 * n].chunks_exact(2)) {
            *h = u16::from_le_bytes([w[0], w[1]]);
        }
        self.heads_at = self.next_avail;
        self.heads_len = n as u16;
        Ok(self.heads[0])
    }

    /// Read the chain whose head descriptor is `head` into `chain`, without
    /// touching the avail ring or the indices: for resubmitting a request
    /// recorded in the inflight area.
    pub fn chain_at<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        mem: &M,
        head: u16,
        chain: &mut Chain<S>,
    ) -> Result<(), VringError> {
        // Not the request path: the descriptor checks out of line, one
        // copy of them rather than two more.
        self.walk::<M, S, false>(mem, head, chain).map(|_| ())
    }

    /// Pop the next available chain (see [`pop_into`](Self::pop_into)).
    pub fn pop<M: GuestMemory + ?Sized, const S: usize>(
        &mut self,
        mem: &M,
    ) -> Result<Option<Chain<S>>, VringError> {
        let mut c = Chain::new();
        Ok(self.pop_into(mem, &mut c)?.then_some(c))
    }

    /// Walk the chain at `head`: copy each descriptor once, validate, push.
    /// Bounded by the ring size plus one indirect table. `HOT`: the
    /// descriptor checks inline (the request path), or out of line.
    /// Returns how many descriptors of the ring's table the chain took.
    #[inline(always)]
    fn walk<M: GuestMemory + ?Sized, const S: usize, const HOT: bool>(
        &self,
        mem: &M,
        head: u16,
        chain: &mut Chain<S>,
    ) -> Result<u16, VringError> {
        if head >= self.size {
            return Err(VringError::HeadOutOfRange(head));
        }
        chain.reset();
        chain.set_head(Head { id: head, descs: 1 });
        let (addr, len, flags, next) =
            decode_words(mem.read_desc(self.desc + 16 * u64::from(head))?);
        if flags & DESC_F_INDIRECT != 0 {
            self.walk_indirect(mem, addr, len, flags, chain)?;
            return Ok(1);
        }
        if HOT {
            chain.push_first(mem, addr, len, flags & DESC_F_WRITE != 0)?;
        } else {
            chain.push_outlined(mem, addr, len, flags & DESC_F_WRITE != 0)?;
        }
        if flags & DESC_F_NEXT == 0 {
            return Ok(1);
        }
        self.walk_on::<M, S, HOT>(mem, next, chain)
    }

    /// The rest of [`walk`](Self::walk) through the ring's table, from
    /// the head's `next` on; returns the table descriptors of the whole
    /// chain.
    #[inline(always)]
    fn walk_on<M: GuestMemory + ?Sized, const S: usize, const HOT: bool>(
        &self,
        mem: &M,
        mut next: u16,
        chain: &mut Chain<S>,
    ) -> Result<u16, VringError> {
        let size = u32::from(self.size);
        // Descriptors that may still be read (the head was).
        let mut budget = size - 1;
        loop {
            if u32::from(next) >= size {
                return Err(VringError::NextOutOfRange(next));
            }
            if budget == 0 {
                return Err(VringError::ChainLoop);
            }
            budget -= 1;
            let (addr, len, flags, n) =
                decode_words(mem.read_desc(self.desc + 16 * u64::from(next))?);
            // The head and the descriptors read since: size - budget.
            let walked = (size - budget) as u16;
            if flags & DESC_F_INDIRECT != 0 {
                self.walk_indirect(mem, addr, len, flags, chain)?;
                return Ok(walked);
            }
            if HOT {
                chain.push(mem, addr, len, flags & DESC_F_WRITE != 0)?;
            } else {
                chain.push_outlined(mem, addr, len, flags & DESC_F_WRITE != 0)?;
            }
            if flags & DESC_F_NEXT == 0 {
                return Ok(walked);
            }
            next = n;
        }
    }

    /// The end of a chain: the indirect table at `addr` (the descriptor
    /// pointing to it had `flags`), walked from its entry 0.
    #[inline(never)]
    fn walk_indirect<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        mem: &M,
        addr: u64,
        len: u32,
        flags: u16,
        chain: &mut Chain<S>,
    ) -> Result<(), VringError> {
        let n = indirect_table(mem, self.features.indirect, flags, addr, len)?;
        let mut budget = n;
        let mut idx = 0u16;
        loop {
            if budget == 0 {
                return Err(VringError::ChainLoop);
            }
            budget -= 1;
            let (a, l, f, next) = decode_words(mem.read_desc(addr + 16 * u64::from(idx))?);
            if f & DESC_F_INDIRECT != 0 {
                return Err(VringError::IndirectNested);
            }
            chain.push(mem, a, l, f & DESC_F_WRITE != 0)?;
            if f & DESC_F_NEXT == 0 {
                return Ok(());
            }
            if u32::from(next) >= n {
                return Err(VringError::NextOutOfRange(next));
            }
            idx = next;
        }
    }

    /// Write a used entry `{head.id, len}` at the next used position. The
    /// entry becomes visible to the guest at the next
    /// [`flush_used`](Self::flush_used).
    #[inline]
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: Head,
        len: u32,
    ) -> Result<(), VringError> {
        if head.id >= self.size {
            return Err(VringError::BadUsedHead(head.id));
        }
        let slot = u64::from(self.next_used & self.mask);
        let e = u64::from(head.id) | u64::from(len) << 32;
        mem.write_u64(self.used + 4 + 8 * slot, e)?;
        self.next_used = self.next_used.wrapping_add(1);
        Ok(())
    }

    /// Whether used entries were written since the last flush.
    #[inline]
    pub fn has_unpublished(&self) -> bool {
        self.next_used != self.published_used
    }

    /// Publish the used entries written since the last flush with one
    /// release store of used.idx. Returns whether the guest wants a
    /// notification: with EVENT_IDX, if the new used index crossed
    /// used_event; without, unless avail.flags has NO_INTERRUPT. Returns
    /// `Ok(false)` without touching memory when nothing was added.
    #[inline]
    pub fn flush_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, VringError> {
        let new = self.next_used;
        let old = self.published_used;
        if new == old {
            return Ok(false);
        }
        #[cfg(feature = "in-order")]
        self.close_batch(mem)?;
        mem.store_u16_release(self.used + 2, new)?;
        self.published_used = new;
        // Order the used.idx store before reading the guest's suppression
        // state (pairs with the driver's barrier when it re-enables).
        mem.fence();
        if self.features.event_idx {
            let valid = self.signalled_valid;
            self.signalled_valid = true;
            let event = mem.read_u16(self.avail + 4 + 2 * u64::from(self.size))?;
            Ok(!valid || need_event(event, new, old))
        } else {
            let flags = mem.read_u16(self.avail)?;
            Ok(flags & AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Ask the driver for kicks: with EVENT_IDX write avail_event = next
    /// avail index, else clear NO_NOTIFY. Then re-check the ring:
    /// `Ok(true)` if chains are available.
    pub fn enable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, VringError> {
        self.quiet = false;
        if self.features.event_idx {
            self.write_avail_event(mem)?;
        } else {
            self.write_used_flags(mem, 0)?;
        }
        mem.fence();
        Ok(self.load_avail_idx(mem)? != self.next_avail)
    }

    /// Ask the driver not to kick (without EVENT_IDX: set NO_NOTIFY; with
    /// EVENT_IDX the driver kicks only when it passes avail_event, which
    /// is left as it is, also when the ring is found empty, until
    /// [`enable_notification`](Self::enable_notification)).
    pub fn disable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), VringError> {
        self.quiet = true;
        if !self.features.event_idx {
            self.write_used_flags(mem, USED_F_NO_NOTIFY)?;
        }
        Ok(())
    }

    fn write_used_flags<M: GuestMemory + ?Sized>(&self, mem: &M, v: u16) -> Result<(), VringError> {
        mem.store_u16_release(self.used, v)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_alignment() {
        let a = RingAddrs {
            desc: 0x1000,
            driver: 0x2000,
            device: 0x3000,
        };
        let f = RingFeatures::default();
        for bad in [0u16, 3, 6, 1000] {
            assert_eq!(
                SplitQueue::new(bad, a, f).err(),
                Some(VringError::BadSize(bad))
            );
        }
        assert!(SplitQueue::new(1, a, f).is_ok());
        assert!(SplitQueue::new(32768, a, f).is_ok());
        assert_eq!(
            SplitQueue::new(8, RingAddrs { desc: 0x1008, ..a }, f).err(),
            Some(VringError::Misaligned(16))
        );
        assert_eq!(
            SplitQueue::new(
                8,
                RingAddrs {
                    driver: 0x2001,
                    ..a
                },
                f
            )
            .err(),
            Some(VringError::Misaligned(2))
        );
        assert_eq!(
            SplitQueue::new(
                8,
                RingAddrs {
                    device: 0x3002,
                    ..a
                },
                f
            )
            .err(),
            Some(VringError::Misaligned(4))
        );
        assert_eq!(
            SplitQueue::new(
                8,
                RingAddrs {
                    device: u64::MAX - 3,
                    ..a
                },
                f
            )
            .err(),
            Some(VringError::AreaOverflow)
        );
    }

    #[test]
    fn need_event_wraps() {
        // Crossed: old < event < new.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(10, 10, 0));
        assert!(!need_event(5, 5, 0));
        // Wrapping at 16 bits.
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(need_event(0, 2, 0xfffe));
        assert!(!need_event(2, 2, 0xfffe));
    }
}

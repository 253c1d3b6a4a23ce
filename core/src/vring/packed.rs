//! Packed virtqueue (VIRTIO_F_RING_PACKED).
//!
//! Layout (little-endian, guest physical addresses):
//!
//! | area | content | size | alignment |
//! |---|---|---|---|
//! | descriptor ring | `{ addr: u64, len: u32, id: u16, flags: u16 }` × n | 16 n | 16 |
//! | driver event suppression | `{ off_wrap: u16, flags: u16 }` (driver writes) | 4 | 4 |
//! | device event suppression | `{ off_wrap: u16, flags: u16 }` (device writes) | 4 | 4 |
//!
//! A descriptor is available when its AVAIL bit equals the driver's wrap
//! counter and its USED bit does not; the device marks a used descriptor
//! with both bits equal to its own wrap counter. Wrap counters start at 1
//! and flip each time an index passes the end of the ring.
//!
//! The buffer id of a chain is taken from its last descriptor. Used
//! descriptors are written in order; the flags of the first one of a batch
//! are stored last, with release ordering, which publishes the batch.

use crate::memory::GuestMemory;

use super::{
    check_area, decode_words, indirect_table, need_event, Chain, Head, RingAddrs, RingFeatures,
    VringError, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_QUEUE_SIZE,
};

/// Packed descriptor flag: available (compared with the driver wrap
/// counter).
pub const DESC_F_AVAIL: u16 = 1 << 7;
/// Packed descriptor flag: used (compared with the device wrap counter).
pub const DESC_F_USED: u16 = 1 << 15;

/// Event suppression flags: notifications enabled.
pub const EVENT_FLAG_ENABLE: u16 = 0;
/// Event suppression flags: notifications disabled.
pub const EVENT_FLAG_DISABLE: u16 = 1;
/// Event suppression flags: notify at the descriptor in off_wrap (needs
/// EVENT_IDX).
pub const EVENT_FLAG_DESC: u16 = 2;

/// A packed virtqueue's device-side state.
#[derive(Clone, Debug)]
pub struct PackedQueue {
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
    features: RingFeatures,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// Slot and flags of the first used descriptor of the pending batch.
    pending_first: Option<(u16, u16)>,
    /// Used position at the last flush (for event suppression).
    signalled_used: u16,
    signalled_valid: bool,
    /// VIRTIO_F_IN_ORDER handling on.
    #[cfg(feature = "in-order")]
    in_order: bool,
    /// With IN_ORDER, the unpublished batch of elided completions, if one
    /// is open: the slot of the used descriptor that stands for it and
    /// the buffer id it must name, its last (written when the batch
    /// closes, not once per completion).
    #[cfg(feature = "in-order")]
    batch: Option<(u16, u16)>,
}

#[inline]
fn wrap_flags(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL | DESC_F_USED
    } else {
        0
    }
}

impl PackedQueue {
    /// A packed queue of `size` entries (1..=32768) at `addrs`. Checks
    /// sizes and alignment; use [`check_areas`](Self::check_areas) to check
    /// the areas are mapped. Indices start at 0 with wrap counters 1.
    pub fn new(size: u16, addrs: RingAddrs, features: RingFeatures) -> Result<Self, VringError> {
        if size == 0 || size > MAX_QUEUE_SIZE {
            return Err(VringError::BadSize(size));
        }
        check_area(addrs.desc, 16 * u64::from(size), 16)?;
        check_area(addrs.driver, 4, 4)?;
        check_area(addrs.device, 4, 4)?;
        Ok(PackedQueue {
            size,
            desc: addrs.desc,
            driver: addrs.driver,
            device: addrs.device,
            features,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            pending_first: None,
            signalled_used: 0,
            signalled_valid: false,
            #[cfg(feature = "in-order")]
            in_order: false,
            #[cfg(feature = "in-order")]
            batch: None,
        })
    }

    /// Move the ring to new guest physical addresses (the memory table
    /// changed while the ring runs); indices and wrap counters are kept.
    pub fn set_addrs(&mut self, addrs: RingAddrs) -> Result<(), VringError> {
        check_area(addrs.desc, 16 * u64::from(self.size), 16)?;
        check_area(addrs.driver, 4, 4)?;
        check_area(addrs.device, 4, 4)?;
        self.desc = addrs.desc;
        self.driver = addrs.driver;
        self.device = addrs.device;
        Ok(())
    }

    /// Check that the descriptor ring and both event suppression areas are
    /// inside guest memory.
    pub fn check_areas<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), VringError> {
        mem.check(self.desc, 16 * u64::from(self.size))?;
        mem.check(self.driver, 4)?;
        mem.check(self.device, 4)?;
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
            driver: self.driver,
            device: self.device,
        }
    }

    /// Ring features in effect.
    pub fn features(&self) -> RingFeatures {
        self.features
    }

    /// Change the ring features.
    pub fn set_features(&mut self, features: RingFeatures) {
        self.features = features;
    }

    /// Next avail position and driver wrap counter.
    pub fn next_avail(&self) -> (u16, bool) {
        (self.next_avail, self.avail_wrap)
    }

    /// Next used position and device wrap counter.
    pub fn next_used(&self) -> (u16, bool) {
        (self.next_used, self.used_wrap)
    }

    /// The GET_VRING_BASE value: bits 0-14 next avail index, bit 15 avail
    /// wrap counter, bits 16-30 next used index, bit 31 used wrap counter.
    pub fn base(&self) -> u32 {
        u32::from(self.next_avail)
            | u32::from(self.avail_wrap) << 15
            | u32::from(self.next_used) << 16
            | u32::from(self.used_wrap) << 31
    }

    /// Apply a SET_VRING_BASE value in the encoding of [`base`](Self::base).
    /// Both indices must be below the ring size. (A front-end that sends
    /// only bits 0-15, as DPDK's virtio-user does, is read by the session:
    /// [`set_base_avail_only`](Self::set_base_avail_only) when nothing can
    /// be in flight.)
    #[inline(never)]
    pub fn set_base(&mut self, num: u32) -> Result<(), VringError> {
        let avail = (num & 0x7fff) as u16;
        let used = ((num >> 16) & 0x7fff) as u16;
        if avail >= self.size || used >= self.size {
            debug!("packed ring base {:#x} out of range", num);
            return Err(VringError::BadBase(if avail >= self.size {
                avail
            } else {
                used
            }));
        }
        self.next_avail = avail;
        self.avail_wrap = num & (1 << 15) != 0;
        self.next_used = used;
        self.used_wrap = num & (1 << 31) != 0;
        self.pending_first = None;
        self.signalled_used = used;
        self.signalled_valid = false;
        #[cfg(feature = "in-order")]
        {
            self.batch = None;
        }
        Ok(())
    }

    /// Apply a SET_VRING_BASE value whose bits 16-31 are not used (DPDK,
    /// QEMU's own encoding): the used position and wrap counter are set
    /// equal to the avail ones, i.e. nothing is in flight.
    pub fn set_base_avail_only(&mut self, num: u16) -> Result<(), VringError> {
        let v = u32::from(num);
        self.set_base(v | (v & 0x7fff) << 16 | (v & 0x8000) << 16)
    }

    #[inline]
    fn desc_addr(&self, slot: u16) -> u64 {
        self.desc + 16 * u64::from(slot)
    }

    #[inline]
    fn is_avail(&self, flags: u16) -> bool {
        let avail = flags & DESC_F_AVAIL != 0;
        let used = flags & DESC_F_USED != 0;
        avail == self.avail_wrap && used != self.avail_wrap
    }

    /// Pop the next available chain into `chain`. `Ok(false)` if the
    /// descriptor at the next avail position is not available. On error
    /// nothing is consumed.
    #[inline]
    pub fn pop_into<M: GuestMemory + ?Sized, const S: usize>(
        &mut self,
        mem: &M,
        chain: &mut Chain<S>,
    ) -> Result<bool, VringError> {
        let first = self.desc_addr(self.next_avail);
        let flags = mem.load_u16_acquire(first + 14)?;
        if !self.is_avail(flags) {
            return Ok(false);
        }
        chain.reset();
        let mut pos = self.next_avail;
        let mut wrap = self.avail_wrap;
        let mut count: u16 = 0;
        let id = loop {
            // A chain can take at most every slot of the ring.
            if count == self.size {
                return Err(VringError::ChainLoop);
            }
            // Copied once; only the copy is used (including its flags).
            let (addr, len, id, flags) = decode_words(mem.read_desc(self.desc_addr(pos))?);
            count += 1;
            pos += 1;
            if pos == self.size {
                pos = 0;
                wrap = !wrap;
            }
            if flags & DESC_F_INDIRECT != 0 {
                let n = indirect_table(mem, self.features.indirect, flags, addr, len)?;
                for i in 0..u64::from(n) {
                    let (a, l, _, f) = decode_words(mem.read_desc(addr + 16 * i)?);
                    if f & DESC_F_INDIRECT != 0 {
                        return Err(VringError::IndirectNested);
                    }
                    chain.push(mem, a, l, f & DESC_F_WRITE != 0)?;
                }
                break id;
            }
            chain.push(mem, addr, len, flags & DESC_F_WRITE != 0)?;
            if flags & DESC_F_NEXT == 0 {
                break id;
            }
        };
        chain.set_head(Head { id, descs: count });
        self.next_avail = pos;
        self.avail_wrap = wrap;
        Ok(true)
    }

    /// Pop the next available chain (see [`pop_into`](Self::pop_into)).
    pub fn pop<M: GuestMemory + ?Sized, const S: usize>(
        &mut self,
        mem: &M,
    ) -> Result<Option<Chain<S>>, VringError> {
        let mut c = Chain::new();
        Ok(self.pop_into(mem, &mut c)?.then_some(c))
    }

    /// Write a used descriptor `{id: head.id, len}` at the next used
    /// position and advance it by `head.descs` slots. Chains must be
    /// completed in the order they are to be seen by the driver; the entry
    /// becomes visible at the next [`flush_used`](Self::flush_used).
    #[inline]
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: Head,
        len: u32,
    ) -> Result<(), VringError> {
        if head.descs == 0 || head.descs > self.size {
            return Err(VringError::BadUsedHead(head.id));
        }
        let slot = self.next_used;
        let at = self.desc_addr(slot);
        let flags = wrap_flags(self.used_wrap);
        if self.pending_first.is_none() {
            // The first of the batch: flags are stored at flush time.
            mem.write_u32(at + 8, len)?;
            mem.write_u16(at + 12, head.id)?;
            self.pending_first = Some((slot, flags));
        } else {
            // len, id, flags: one little-endian word.
            let e = u64::from(len) | u64::from(head.id) << 32 | u64::from(flags) << 48;
            mem.write_u64(at + 8, e)?;
        }
        let next = u32::from(slot) + u32::from(head.descs);
        if next >= u32::from(self.size) {
            self.next_used = (next - u32::from(self.size)) as u16;
            self.used_wrap = !self.used_wrap;
        } else {
            self.next_used = next as u16;
        }
        Ok(())
    }

    /// Turns VIRTIO_F_IN_ORDER handling on or off: with it,
    /// [`add_used_in_order`](Self::add_used_in_order) may stand one used
    /// descriptor for a batch.
    #[cfg(feature = "in-order")]
    pub fn set_in_order(&mut self, on: bool) {
        self.in_order = on;
        self.batch = None;
    }

    /// Whether VIRTIO_F_IN_ORDER handling is on.
    #[cfg(feature = "in-order")]
    pub fn in_order(&self) -> bool {
        self.in_order
    }

    /// [`add_used`](Self::add_used) for an in-order ring, in the order the
    /// chains were popped (so each used descriptor lands on the slot its
    /// chain was made available at). With `elide` (the completion wrote
    /// nothing into a chain that has no device-writable buffer, so every
    /// driver infers its length, 0), a run of such completions is one used
    /// descriptor at the run's first slot carrying the last one's buffer
    /// id, and the used position moves past all of their descriptors (the
    /// spec's batched use). A run never spans a
    /// [`flush_used`](Self::flush_used).
    #[cfg(feature = "in-order")]
    pub fn add_used_in_order<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: Head,
        len: u32,
        elide: bool,
    ) -> Result<(), VringError> {
        if head.descs == 0 || head.descs > self.size {
            return Err(VringError::BadUsedHead(head.id));
        }
        let elide = elide && len == 0;
        match &mut self.batch {
            Some((_, id)) if elide => {
                // Unpublished (a flush closes the batch): the driver has not
                // read it; it names this buffer, the batch's last, once the
                // batch closes.
                *id = head.id;
                let next = u32::from(self.next_used) + u32::from(head.descs);
                if next >= u32::from(self.size) {
                    self.next_used = (next - u32::from(self.size)) as u16;
                    self.used_wrap = !self.used_wrap;
                } else {
                    self.next_used = next as u16;
                }
            }
            _ => {
                self.close_batch(mem)?;
                let slot = self.next_used;
                self.add_used(mem, head, len)?;
                self.batch = elide.then_some((slot, head.id));
            }
        }
        Ok(())
    }

    /// Writes the open batch's descriptor's buffer id, its last (before a
    /// new used descriptor, and before a flush publishes them).
    #[cfg(feature = "in-order")]
    #[inline]
    fn close_batch<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), VringError> {
        if let Some((at, id)) = self.batch.take() {
            mem.write_u16(self.desc_addr(at) + 12, id)?;
        }
        Ok(())
    }

    /// Whether used descriptors were written since the last flush.
    #[inline]
    pub fn has_unpublished(&self) -> bool {
        self.pending_first.is_some()
    }

    /// Publish the used descriptors written since the last flush (one
    /// release store of the first one's flags) and say whether the driver
    /// wants a notification, per its event suppression area: ENABLE yes,
    /// DISABLE no, DESC (with EVENT_IDX) if the used position passed the
    /// given descriptor. `Ok(false)` without touching memory when nothing
    /// was added.
    #[inline]
    pub fn flush_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, VringError> {
        let Some((slot, flags)) = self.pending_first else {
            return Ok(false);
        };
        #[cfg(feature = "in-order")]
        self.close_batch(mem)?;
        mem.store_u16_release(self.desc_addr(slot) + 14, flags)?;
        self.pending_first = None;
        mem.fence();
        let new = self.next_used;
        let mut old = self.signalled_used;
        let valid = self.signalled_valid;
        self.signalled_used = new;
        self.signalled_valid = true;
        let ev_flags = mem.load_u16_acquire(self.driver + 2)?;
        match ev_flags {
            EVENT_FLAG_DISABLE => Ok(false),
            EVENT_FLAG_DESC if self.features.event_idx => {
                if !valid {
                    return Ok(true);
                }
                let off_wrap = mem.read_u16(self.driver)?;
                let mut off = off_wrap & 0x7fff;
                let wrap = off_wrap & 0x8000 != 0;
                if new <= old {
                    old = old.wrapping_sub(self.size);
                }
                if wrap != self.used_wrap {
                    off = off.wrapping_sub(self.size);
                }
                Ok(need_event(off, new, old))
            }
            _ => Ok(true),
        }
    }

    /// Ask the driver for kicks (device area ENABLE, or DESC at the next
    /// avail position with EVENT_IDX), then re-check: `Ok(true)` if a chain
    /// is available.
    pub fn enable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, VringError> {
        if self.features.event_idx {
            let off_wrap = self.next_avail | u16::from(self.avail_wrap) << 15;
            mem.write_u16(self.device, off_wrap)?;
            mem.store_u16_release(self.device + 2, EVENT_FLAG_DESC)?;
        } else {
            mem.store_u16_release(self.device + 2, EVENT_FLAG_ENABLE)?;
        }
        mem.fence();
        let flags = mem.load_u16_acquire(self.desc_addr(self.next_avail) + 14)?;
        Ok(self.is_avail(flags))
    }

    /// Ask the driver not to kick (device area DISABLE).
    pub fn disable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), VringError> {
        mem.store_u16_release(self.device + 2, EVENT_FLAG_DISABLE)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(size: u16) -> PackedQueue {
        PackedQueue::new(
            size,
            RingAddrs {
                desc: 0x1000,
                driver: 0x2000,
                device: 0x3000,
            },
            RingFeatures::default(),
        )
        .unwrap()
    }

    #[test]
    fn any_size_up_to_32768() {
        assert!(PackedQueue::new(3, RingAddrs::default(), RingFeatures::default()).is_ok());
        assert!(PackedQueue::new(32768, RingAddrs::default(), RingFeatures::default()).is_ok());
        assert_eq!(
            PackedQueue::new(0, RingAddrs::default(), RingFeatures::default()).err(),
            Some(VringError::BadSize(0))
        );
        assert_eq!(
            PackedQueue::new(32769, RingAddrs::default(), RingFeatures::default()).err(),
            Some(VringError::BadSize(32769))
        );
        let bad = RingAddrs {
            driver: 2,
            ..RingAddrs::default()
        };
        assert_eq!(
            PackedQueue::new(4, bad, RingFeatures::default()).err(),
            Some(VringError::Misaligned(4))
        );
    }

    #[test]
    fn base_encoding_round_trips() {
        let mut p = q(300);
        assert_eq!(p.base(), 1 << 15 | 1 << 31, "initial wrap counters are 1");
        let num = 17 | 299 << 16 | 1 << 31; // avail wrap 0
        p.set_base(num).unwrap();
        assert_eq!(p.next_avail(), (17, false));
        assert_eq!(p.next_used(), (299, true));
        assert_eq!(p.base(), num);
        // Indices must be below the ring size.
        assert_eq!(p.set_base(300), Err(VringError::BadBase(300)));
        assert_eq!(p.set_base(300 << 16), Err(VringError::BadBase(300)));
        assert_eq!(p.base(), num, "refused base leaves state unchanged");
        p.set_base_avail_only(5 | 1 << 15).unwrap();
        assert_eq!(p.base(), 5 | 1 << 15 | 5 << 16 | 1 << 31);
    }

    /// The queue reads every value as the full encoding (used 0 wrap 0
    /// with the avail bits alone: the whole ring in flight at used 0);
    /// `set_base_avail_only` reads the 16-bit form.
    #[test]
    fn queue_base_is_the_full_encoding() {
        let mut q = crate::vring::Queue::Packed(q(300));
        q.set_base(7 | 1 << 15).unwrap();
        assert_eq!(q.base(), 7 | 1 << 15);
        let full = 17 | 299 << 16 | 1 << 31;
        q.set_base(full).unwrap();
        assert_eq!(q.base(), full);
        let crate::vring::Queue::Packed(p) = &mut q else {
            unreachable!()
        };
        p.set_base_avail_only(7 | 1 << 15).unwrap();
        assert_eq!(q.base(), 7 | 1 << 15 | 7 << 16 | 1 << 31);
    }
}

//! A guest driver for split and packed rings: lays rings out in guest
//! memory, posts chains (direct and indirect), publishes them, says
//! whether a kick is due, and harvests used entries. Hooks write raw,
//! possibly hostile, descriptors and indices.
//!
//! The driver is the guest's side: it only uses [`GuestMemory`] and the
//! ring layouts of the virtio specification, never the core's engine.

use std::collections::VecDeque;
use std::fmt;

use vhost_user_core::memory::{GuestMemory, MemoryError};
use vhost_user_core::vring::packed::{DESC_F_AVAIL, DESC_F_USED};
use vhost_user_core::vring::{RingAddrs, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

/// The front-end virtual address convention of the in-memory test harness
/// and of `vhu`: a region's front-end address is its guest physical
/// address plus this.
pub const USER_ADDR_OFFSET: u64 = 0x7f00_0000_0000;

/// A buffer the driver posts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Guest physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// A used entry harvested by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head index (split) or buffer id (packed).
    pub id: u16,
    /// Bytes the device wrote.
    pub len: u32,
}

/// Why the driver could not post.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverError {
    /// Not enough free descriptors (or buffer ids).
    RingFull,
    /// An empty chain.
    Empty,
    /// Guest memory refused an access.
    Memory(MemoryError),
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::RingFull => f.write_str("ring full"),
            DriverError::Empty => f.write_str("empty chain"),
            DriverError::Memory(e) => write!(f, "guest memory: {e}"),
        }
    }
}

impl std::error::Error for DriverError {}

impl From<MemoryError> for DriverError {
    fn from(e: MemoryError) -> Self {
        DriverError::Memory(e)
    }
}

/// Encode a 16-byte descriptor: addr, len, then two u16 (split: flags,
/// next; packed: id, flags).
pub fn encode_desc(addr: u64, len: u32, a: u16, b: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&a.to_le_bytes());
    d[14..].copy_from_slice(&b.to_le_bytes());
    d
}

/// Write a split-ring indirect table for `bufs` at `table` (NEXT links
/// i → i + 1).
pub fn write_indirect_table<M: GuestMemory + ?Sized>(
    mem: &M,
    table: u64,
    bufs: &[Buf],
) -> Result<(), MemoryError> {
    for (i, b) in bufs.iter().enumerate() {
        let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
        if i + 1 < bufs.len() {
            flags |= DESC_F_NEXT;
        }
        mem.write(
            table + 16 * i as u64,
            &encode_desc(b.addr, b.len, flags, (i + 1) as u16),
        )?;
    }
    Ok(())
}

/// Write a packed-ring indirect table for `bufs` at `table`: packed
/// descriptors (addr, len, id 0, flags), WRITE the only flag; the table's
/// length gives the number of entries.
pub fn write_packed_indirect_table<M: GuestMemory + ?Sized>(
    mem: &M,
    table: u64,
    bufs: &[Buf],
) -> Result<(), MemoryError> {
    for (i, b) in bufs.iter().enumerate() {
        let flags = if b.writable { DESC_F_WRITE } else { 0 };
        mem.write(table + 16 * i as u64, &encode_desc(b.addr, b.len, 0, flags))?;
    }
    Ok(())
}

/// Ring addresses as a front-end sends them in SET_VRING_ADDR: the guest
/// physical addresses `addrs` plus [`USER_ADDR_OFFSET`].
pub fn user_addrs(addrs: RingAddrs) -> RingAddrs {
    RingAddrs {
        desc: addrs.desc + USER_ADDR_OFFSET,
        driver: addrs.driver + USER_ADDR_OFFSET,
        device: addrs.device + USER_ADDR_OFFSET,
    }
}

fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver side of a split ring.
#[derive(Debug)]
pub struct SplitDriver {
    size: u16,
    addrs: RingAddrs,
    /// Next avail index to fill.
    avail_idx: u16,
    /// avail.idx as last published.
    published: u16,
    /// Published avail.idx at the previous kick check.
    kicked: u16,
    last_used: u16,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
    event_idx: bool,
    /// VIRTIO_F_IN_ORDER driving (see [`set_in_order`](Self::set_in_order)).
    order: Option<DriverOrder>,
}

/// An in-order driver's bookkeeping: what it made available, in order,
/// and the used entry that stands for the batch being harvested.
#[derive(Debug, Default)]
struct DriverOrder {
    /// Split: next descriptor to use. Packed: unused.
    next_desc: u16,
    posted: VecDeque<u16>,
    batch_last: Option<Used>,
}

impl DriverOrder {
    /// One buffer of the batch: the next one made available, with the
    /// batch entry's length if it is the batch's last, else 0 (a
    /// skipped entry: what the driver infers for a buffer the device
    /// wrote nothing into).
    fn next(&mut self) -> Option<Used> {
        let last = self.batch_last?;
        let id = self.posted.pop_front()?;
        if id == last.id {
            self.batch_last = None;
            return Some(last);
        }
        Some(Used { id, len: 0 })
    }
}

impl SplitDriver {
    /// Bytes a split ring of `size` entries takes from `base`.
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        (16 * n + 6 + 2 * n).next_multiple_of(4) + 6 + 8 * n
    }

    /// Where [`new`](Self::new) puts a ring of `size` entries at `base`
    /// (guest physical addresses), without touching memory.
    pub fn layout(size: u16, base: u64) -> RingAddrs {
        let n = u64::from(size);
        let avail = base + 16 * n;
        RingAddrs {
            desc: base,
            driver: avail,
            device: (avail + 6 + 2 * n).next_multiple_of(4),
        }
    }

    /// Lay out a split ring of `size` entries at `base` (16-aligned):
    /// descriptor table, avail ring, used ring (4-aligned), all zeroed.
    pub fn new<M: GuestMemory + ?Sized>(
        mem: &M,
        size: u16,
        base: u64,
        event_idx: bool,
    ) -> Result<Self, MemoryError> {
        let zero = vec![0u8; Self::footprint(size) as usize];
        mem.write(base, &zero)?;
        Ok(SplitDriver {
            size,
            addrs: Self::layout(size, base),
            avail_idx: 0,
            published: 0,
            kicked: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            event_idx,
            order: None,
        })
    }

    /// Drive the ring as VIRTIO_F_IN_ORDER requires: descriptors are
    /// used in table order from the next one (0 for a new ring), and a
    /// used entry stands for every buffer made available up to the one
    /// it names (those before it are reported with length 0).
    pub fn set_in_order(&mut self) {
        let next_desc = self.avail_idx % self.size;
        self.order = Some(DriverOrder {
            next_desc,
            ..DriverOrder::default()
        });
    }

    /// The descriptors a new chain of `n` takes: the next ones in table
    /// order when in order, else any free ones.
    fn take_descs(&mut self, n: usize) -> Result<Vec<u16>, DriverError> {
        if n > self.free.len() {
            return Err(DriverError::RingFull);
        }
        let size = self.size;
        let Some(o) = self.order.as_mut() else {
            return Ok((0..n).filter_map(|_| self.free.pop()).collect());
        };
        // In order, descriptors are freed in the order they were taken:
        // the free ones are the `free.len()` from `next_desc` on, and the
        // list only counts them.
        let ids: Vec<u16> = (0..n as u16)
            .map(|i| o.next_desc.wrapping_add(i) % size)
            .collect();
        self.free.truncate(self.free.len() - n);
        o.next_desc = o.next_desc.wrapping_add(n as u16) % size;
        o.posted.push_back(ids[0]);
        Ok(ids)
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Ring addresses (guest physical).
    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// Ring addresses as a front-end sends them in SET_VRING_ADDR (user
    /// addresses: guest physical + [`USER_ADDR_OFFSET`]).
    pub fn user_addrs(&self) -> RingAddrs {
        user_addrs(self.addrs)
    }

    /// Free descriptors.
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// Write a chain of direct descriptors and its avail entry (not
    /// published). Returns the head index.
    pub fn add<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        let ids = self.take_descs(bufs.len())?;
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(mem, ids[i], b.addr, b.len, flags, next)?;
        }
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        self.push_head(mem, head)?;
        Ok(head)
    }

    /// Write `bufs` as an indirect table at `table` and one descriptor
    /// pointing to it, plus its avail entry (not published).
    pub fn add_indirect<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        table: u64,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        let head = self.take_descs(1)?[0];
        write_indirect_table(mem, table, bufs)?;
        self.write_desc(mem, head, table, 16 * bufs.len() as u32, DESC_F_INDIRECT, 0)?;
        self.chains[usize::from(head)] = vec![head];
        self.push_head(mem, head)?;
        Ok(head)
    }

    /// [`add`](Self::add) and [`publish`](Self::publish).
    pub fn post<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        let h = self.add(mem, bufs)?;
        self.publish(mem)?;
        Ok(h)
    }

    /// Make every added chain visible: release-store avail.idx.
    pub fn publish<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), MemoryError> {
        mem.store_u16_release(self.addrs.driver + 2, self.avail_idx)?;
        self.published = self.avail_idx;
        Ok(())
    }

    /// Whether the device wants a kick for what was published since the
    /// last call (EVENT_IDX: avail_event crossed; else used.flags
    /// NO_NOTIFY clear).
    pub fn kick_needed<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, MemoryError> {
        mem.fence();
        let old = self.kicked;
        let new = self.published;
        self.kicked = new;
        if self.event_idx {
            let ev = mem.read_u16(self.addrs.device + 4 + 8 * u64::from(self.size))?;
            Ok(vring_need_event(ev, new, old))
        } else {
            Ok(mem.read_u16(self.addrs.device)? & 1 == 0)
        }
    }

    /// Harvest one used entry, freeing its descriptors.
    pub fn harvest<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<Used>, MemoryError> {
        let batch_open = self.order.as_ref().is_some_and(|o| o.batch_last.is_some());
        let idx = mem.load_u16_acquire(self.addrs.device + 2)?;
        if idx == self.last_used && !batch_open {
            return Ok(None);
        }
        let slot = u64::from(self.last_used % self.size);
        let e = mem.read_vec_8(self.addrs.device + 4 + 8 * slot)?;
        self.last_used = self.last_used.wrapping_add(1);
        let mut id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as u16;
        let mut len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        if let Some(o) = self.order.as_mut() {
            // In order: the entry at the batch's first position names its
            // last buffer; the ones before it are skipped.
            if o.batch_last.is_none() {
                o.batch_last = Some(Used { id, len });
            }
            match o.next() {
                Some(u) => (id, len) = (u.id, u.len),
                None => return Ok(None),
            }
        }
        if let Some(c) = self.chains.get_mut(usize::from(id)) {
            self.free.append(c);
        }
        Ok(Some(Used { id, len }))
    }

    /// Harvest every used entry available.
    pub fn harvest_all<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Vec<Used>, MemoryError> {
        let mut v = Vec::new();
        for _ in 0..self.size {
            match self.harvest(mem)? {
                Some(u) => v.push(u),
                None => break,
            }
        }
        Ok(v)
    }

    /// Hook: write a raw descriptor at `idx` of the descriptor table.
    pub fn write_desc<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), MemoryError> {
        mem.write(
            self.addrs.desc + 16 * u64::from(idx),
            &encode_desc(addr, len, flags, next),
        )
    }

    /// Hook: put any head index in the next avail entry (not published).
    pub fn push_head<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
    ) -> Result<(), MemoryError> {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_u16(self.addrs.driver + 4 + 2 * slot, head)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Start the ring at index `idx` (the SET_VRING_BASE a front-end
    /// sends): avail.idx, used.idx and avail_event all `idx` (the state a
    /// device that processed `idx` requests leaves), nothing outstanding.
    /// Lets tests run the 16-bit indices across their wrap.
    pub fn start_at<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        idx: u16,
    ) -> Result<(), MemoryError> {
        self.avail_idx = idx;
        self.published = idx;
        self.kicked = idx;
        self.last_used = idx;
        mem.store_u16_release(self.addrs.device + 2, idx)?;
        mem.write_u16(self.addrs.device + 4 + 8 * u64::from(self.size), idx)?;
        self.publish(mem)
    }

    /// Hook: publish an arbitrary avail.idx.
    pub fn set_avail_idx<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        idx: u16,
    ) -> Result<(), MemoryError> {
        self.avail_idx = idx;
        self.publish(mem)
    }

    /// Set avail.flags (NO_INTERRUPT is bit 0).
    pub fn set_avail_flags<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        flags: u16,
    ) -> Result<(), MemoryError> {
        mem.store_u16_release(self.addrs.driver, flags)
    }

    /// The next used index the driver will harvest.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Set used_event (EVENT_IDX).
    pub fn set_used_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        v: u16,
    ) -> Result<(), MemoryError> {
        mem.store_u16_release(self.addrs.driver + 4 + 2 * u64::from(self.size), v)
    }

    /// The device's avail_event (EVENT_IDX).
    pub fn avail_event<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, MemoryError> {
        mem.load_u16_acquire(self.addrs.device + 4 + 8 * u64::from(self.size))
    }

    /// used.flags (NO_NOTIFY is bit 0).
    pub fn used_flags<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, MemoryError> {
        mem.load_u16_acquire(self.addrs.device)
    }

    /// used.idx.
    pub fn used_idx<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, MemoryError> {
        mem.load_u16_acquire(self.addrs.device + 2)
    }
}

trait Read8 {
    fn read_vec_8(&self, gpa: u64) -> Result<[u8; 8], MemoryError>;
}

impl<M: GuestMemory + ?Sized> Read8 for M {
    fn read_vec_8(&self, gpa: u64) -> Result<[u8; 8], MemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(b)
    }
}

/// A raw packed descriptor for the hostile hooks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDesc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// Buffer id.
    pub id: u16,
    /// Flags other than AVAIL/USED (NEXT, WRITE, INDIRECT).
    pub flags: u16,
}

/// The driver side of a packed ring.
#[derive(Debug)]
pub struct PackedDriver {
    size: u16,
    addrs: RingAddrs,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    free_slots: u16,
    free_ids: Vec<u16>,
    /// Descriptors taken by each buffer id.
    id_descs: Vec<u16>,
    /// Position at the last kick check.
    kicked: (u16, bool),
    /// VIRTIO_F_IN_ORDER harvesting (see [`set_in_order`](Self::set_in_order)).
    order: Option<DriverOrder>,
}

impl PackedDriver {
    /// Bytes a packed ring of `size` entries takes from `base`.
    pub fn footprint(size: u16) -> u64 {
        16 * u64::from(size) + 8
    }

    /// Where [`new`](Self::new) puts a ring of `size` entries at `base`
    /// (guest physical addresses), without touching memory.
    pub fn layout(size: u16, base: u64) -> RingAddrs {
        let ring = 16 * u64::from(size);
        RingAddrs {
            desc: base,
            driver: base + ring,
            device: base + ring + 4,
        }
    }

    /// Lay out a packed ring of `size` entries at `base` (16-aligned):
    /// descriptor ring, then driver and device event areas, zeroed.
    pub fn new<M: GuestMemory + ?Sized>(
        mem: &M,
        size: u16,
        base: u64,
    ) -> Result<Self, MemoryError> {
        mem.write(base, &vec![0u8; Self::footprint(size) as usize])?;
        Ok(PackedDriver {
            size,
            addrs: Self::layout(size, base),
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            free_slots: size,
            free_ids: (0..size).rev().collect(),
            id_descs: vec![0; usize::from(size)],
            kicked: (0, true),
            order: None,
        })
    }

    /// Harvest as VIRTIO_F_IN_ORDER allows the device to write: a used
    /// descriptor names the last buffer of a batch made available from
    /// its slot on (those before it are reported with length 0).
    pub fn set_in_order(&mut self) {
        self.order = Some(DriverOrder::default());
    }

    /// Ring addresses (guest physical).
    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// Ring addresses as a front-end sends them in SET_VRING_ADDR (user
    /// addresses: guest physical + [`USER_ADDR_OFFSET`]).
    pub fn user_addrs(&self) -> RingAddrs {
        user_addrs(self.addrs)
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Next avail position and wrap counter.
    pub fn next_avail(&self) -> (u16, bool) {
        (self.next_avail, self.avail_wrap)
    }

    /// Next used position the driver looks at, and its wrap counter.
    pub fn next_used(&self) -> (u16, bool) {
        (self.next_used, self.used_wrap)
    }

    /// The AVAIL/USED bits that make a descriptor available now.
    pub fn avail_bits(&self) -> u16 {
        if self.avail_wrap {
            DESC_F_AVAIL
        } else {
            DESC_F_USED
        }
    }

    /// Hook: write `descs` at the next slots with the current AVAIL/USED
    /// bits (added to their flags), the first one last with a release
    /// store, and advance. The chain is recorded under the id of its last
    /// descriptor, for harvesting. No validation: anything can be posted.
    pub fn post_raw<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        descs: &[PackedDesc],
    ) -> Result<(), DriverError> {
        if descs.is_empty() {
            return Err(DriverError::Empty);
        }
        if descs.len() > usize::from(self.free_slots) {
            return Err(DriverError::RingFull);
        }
        let start = self.next_avail;
        let mut head_flags = 0;
        for (i, d) in descs.iter().enumerate() {
            let flags = d.flags | self.avail_bits();
            let at = self.addrs.desc + 16 * u64::from(self.next_avail);
            if i == 0 {
                head_flags = flags;
                mem.write(at, &encode_desc(d.addr, d.len, d.id, 0)[..14])?;
            } else {
                mem.write(at, &encode_desc(d.addr, d.len, d.id, flags))?;
            }
            self.next_avail += 1;
            if self.next_avail == self.size {
                self.next_avail = 0;
                self.avail_wrap = !self.avail_wrap;
            }
        }
        mem.store_u16_release(self.addrs.desc + 16 * u64::from(start) + 14, head_flags)?;
        self.free_slots -= descs.len() as u16;
        if let Some(last) = descs.last() {
            if let Some(n) = self.id_descs.get_mut(usize::from(last.id)) {
                *n = descs.len() as u16;
            }
            if let Some(o) = self.order.as_mut() {
                o.posted.push_back(last.id);
            }
        }
        Ok(())
    }

    /// Post a chain of direct descriptors; returns its buffer id.
    pub fn post<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        if bufs.len() > usize::from(self.free_slots) {
            return Err(DriverError::RingFull);
        }
        let id = self.free_ids.pop().ok_or(DriverError::RingFull)?;
        let descs: Vec<PackedDesc> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| PackedDesc {
                addr: b.addr,
                len: b.len,
                id,
                flags: if b.writable { DESC_F_WRITE } else { 0 }
                    | if i + 1 < bufs.len() { DESC_F_NEXT } else { 0 },
            })
            .collect();
        if let Err(e) = self.post_raw(mem, &descs) {
            self.free_ids.push(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Post `bufs` through an indirect table at `table`; returns the
    /// buffer id.
    pub fn post_indirect<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        table: u64,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        let id = self.free_ids.pop().ok_or(DriverError::RingFull)?;
        write_packed_indirect_table(mem, table, bufs)?;
        let d = PackedDesc {
            addr: table,
            len: 16 * bufs.len() as u32,
            id,
            flags: DESC_F_INDIRECT,
        };
        if let Err(e) = self.post_raw(mem, &[d]) {
            self.free_ids.push(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Harvest one used descriptor.
    pub fn harvest<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<Used>, MemoryError> {
        let at = self.addrs.desc + 16 * u64::from(self.next_used);
        let batch_open = self.order.as_ref().is_some_and(|o| o.batch_last.is_some());
        let (mut id, mut len) = (0, 0);
        if !batch_open {
            let flags = mem.load_u16_acquire(at + 14)?;
            let avail = flags & DESC_F_AVAIL != 0;
            let used = flags & DESC_F_USED != 0;
            if avail != self.used_wrap || used != self.used_wrap {
                return Ok(None);
            }
            let d = mem.read_16(at)?;
            len = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
            id = u16::from_le_bytes([d[12], d[13]]);
        }
        if let Some(o) = self.order.as_mut() {
            if o.batch_last.is_none() {
                o.batch_last = Some(Used { id, len });
            }
            match o.next() {
                Some(u) => (id, len) = (u.id, u.len),
                None => return Ok(None),
            }
        }
        let n = self
            .id_descs
            .get(usize::from(id))
            .copied()
            .filter(|&n| n > 0)
            .unwrap_or(1);
        let next = u32::from(self.next_used) + u32::from(n);
        if next >= u32::from(self.size) {
            self.next_used = (next - u32::from(self.size)) as u16;
            self.used_wrap = !self.used_wrap;
        } else {
            self.next_used = next as u16;
        }
        self.free_slots = (self.free_slots + n).min(self.size);
        if usize::from(id) < self.id_descs.len() && !self.free_ids.contains(&id) {
            self.free_ids.push(id);
        }
        Ok(Some(Used { id, len }))
    }

    /// Harvest every used descriptor available.
    pub fn harvest_all<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Vec<Used>, MemoryError> {
        let mut v = Vec::new();
        for _ in 0..self.size {
            match self.harvest(mem)? {
                Some(u) => v.push(u),
                None => break,
            }
        }
        Ok(v)
    }

    /// Write the driver event suppression area (off_wrap, flags).
    pub fn set_driver_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        off_wrap: u16,
        flags: u16,
    ) -> Result<(), MemoryError> {
        mem.write_u16(self.addrs.driver, off_wrap)?;
        mem.store_u16_release(self.addrs.driver + 2, flags)
    }

    /// The device event suppression area (off_wrap, flags).
    pub fn device_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<(u16, u16), MemoryError> {
        Ok((
            mem.read_u16(self.addrs.device)?,
            mem.load_u16_acquire(self.addrs.device + 2)?,
        ))
    }

    /// Whether the device wants a kick for what was posted since the last
    /// call, per the device event suppression area.
    pub fn kick_needed<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, MemoryError> {
        mem.fence();
        let (off_wrap, flags) = self.device_event(mem)?;
        let (old, _) = self.kicked;
        self.kicked = (self.next_avail, self.avail_wrap);
        Ok(match flags {
            1 => false,
            2 => {
                let new = self.next_avail;
                let mut old = old;
                if new <= old {
                    old = old.wrapping_sub(self.size);
                }
                let mut off = off_wrap & 0x7fff;
                if (off_wrap & 0x8000 != 0) != self.avail_wrap {
                    off = off.wrapping_sub(self.size);
                }
                vring_need_event(off, new, old)
            }
            _ => true,
        })
    }
}

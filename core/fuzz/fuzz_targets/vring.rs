//! Fuzzer bytes become a guest memory image, ring addresses, features and
//! indices; the split or packed engine pops, completes and flushes until
//! the ring is empty or refused. It must never panic, never loop, and only
//! touch memory inside the image (every access is checked here too).
#![no_main]

use std::cell::{Cell, RefCell};

use libfuzzer_sys::fuzz_target;
use vhost_user_core::memory::{GuestMemory, MemoryError};
use vhost_user_core::vring::{
    Chain, PackedQueue, Queue, RingAddrs, RingFeatures, SplitQueue, VringError,
};

/// The image at guest address `BASE`, with a gap before it so addresses
/// below `BASE` are unmapped.
const BASE: u64 = 0x1000;

struct Image {
    bytes: RefCell<Vec<u8>>,
    /// Accesses (not checks) that reached this object with a bad range:
    /// all are refused, none may succeed.
    accesses: Cell<u64>,
}

impl Image {
    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, MemoryError> {
        self.accesses.set(self.accesses.get() + 1);
        let bad = || MemoryError::unmapped(gpa, len as u64);
        let off = gpa.checked_sub(BASE).ok_or_else(bad)?;
        let off = usize::try_from(off).map_err(|_| bad())?;
        let end = off.checked_add(len).ok_or_else(bad)?;
        if end > self.bytes.borrow().len() {
            return Err(bad());
        }
        Ok(off..end)
    }
}

impl GuestMemory for Image {
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let r = self.range(gpa, dst.len())?;
        dst.copy_from_slice(&self.bytes.borrow()[r]);
        Ok(())
    }
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        let r = self.range(gpa, src.len())?;
        self.bytes.borrow_mut()[r].copy_from_slice(src);
        Ok(())
    }
    fn load_u16_acquire(&self, gpa: u64) -> Result<u16, MemoryError> {
        assert_eq!(gpa % 2, 0, "ring index access must be aligned");
        let mut b = [0; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        assert_eq!(gpa % 2, 0, "ring index access must be aligned");
        self.write(gpa, &v.to_le_bytes())
    }
    fn fence(&self) {}
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let n = self.bytes.borrow().len() as u64;
        let bad = || MemoryError::unmapped(gpa, len);
        let off = gpa.checked_sub(BASE).ok_or_else(bad)?;
        let end = off.checked_add(len).ok_or(MemoryError::Overflow)?;
        if end > n || (len == 0 && off >= n) {
            return Err(bad());
        }
        Ok(())
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fuzz_target!(|data: &[u8]| {
    // Header: size, flags, base, three ring offsets; the rest is the image.
    let Some((h, img)) = data.split_at_checked(16) else {
        return;
    };
    let mut image = img.to_vec();
    image.resize(image.len().max(4096), 0);
    let mem = Image {
        bytes: RefCell::new(image),
        accesses: Cell::new(0),
    };
    let flags = h[2];
    let packed = flags & 1 != 0;
    let features = RingFeatures {
        event_idx: flags & 2 != 0,
        indirect: flags & 4 != 0,
    };
    let raw_size = u16_at(h, 0);
    let size = if packed {
        raw_size % 64 + 1
    } else {
        1u16 << (raw_size % 7)
    };
    // Ring addresses: offsets into the image, or wild values.
    let addr = |i: usize, align: u64| {
        let v = u64::from(u16_at(h, i));
        if flags & 8 != 0 && i == 10 {
            v << 40
        } else {
            (BASE + v) & !(align - 1)
        }
    };
    let addrs = RingAddrs {
        desc: addr(8, 16),
        driver: addr(10, 4),
        device: addr(12, 4),
    };
    let base = u32::from_le_bytes([h[3], h[4], h[5], h[6]]);
    let mut q = if packed {
        match PackedQueue::new(size, addrs, features) {
            Ok(q) => Queue::Packed(q),
            Err(_) => return,
        }
    } else {
        match SplitQueue::new(size, addrs, features) {
            Ok(q) => Queue::Split(q),
            Err(_) => return,
        }
    };
    if q.set_base(base & if packed { !0 } else { 0xffff }).is_err() {
        return;
    }
    if let Queue::Split(s) = &mut q {
        let _ = s.sync_used(&mem);
    }
    // VIRTIO_F_IN_ORDER: split chains must come in table order, runs of
    // read-only completions are one used entry.
    let in_order = flags & 16 != 0;
    q.set_in_order(in_order);
    let _ = q.check_areas(&mem);
    let mut chain: Chain<16> = Chain::new();
    // At most two rings' worth of chains: the engine must not loop.
    for i in 0..2 * u32::from(size) + 2 {
        match q.pop_into(&mem, &mut chain) {
            Ok(true) => {
                for s in chain.segments() {
                    // Every segment is inside the image.
                    mem.check(s.addr, u64::from(s.len))
                        .expect("validated segment");
                }
                let readonly = chain.writable_len() == 0;
                let _ = if in_order {
                    q.add_used_in_order(&mem, chain.head(), chain.writable_len(), readonly)
                } else {
                    q.add_used(&mem, chain.head(), chain.writable_len())
                };
                if i % 3 == h[7] as u32 % 3 {
                    let _ = q.flush_used(&mem);
                }
            }
            Ok(false) => break,
            Err(e) => {
                // Refused cleanly, and again the same way.
                assert!(matches!(
                    q.pop_into(&mem, &mut chain),
                    Err(e2) if e2 == e || matches!(e2, VringError::Memory(_))
                ));
                break;
            }
        }
    }
    let _ = q.flush_used(&mem);
    let _ = q.enable_notification(&mem);
    let _ = q.disable_notification(&mem);
    let _ = q.base();
    assert!(mem.accesses.get() < 1 << 24, "unbounded work");
});

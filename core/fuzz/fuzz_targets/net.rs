//! Fuzzer bytes become guest memory and hostile descriptor chains
//! (readable buffers in receive chains, zero-length, overlapping, wild or
//! overflowing addresses, too many or too few), a frame and header
//! lengths; the virtio-net receive fill (single and mergeable) and the
//! transmit check, gather and pieces run over them. None may panic, touch
//! bytes outside the chains' buffers of the right direction, or report
//! lengths that disagree with what it wrote or read.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use vhost_user_core::device::net::{
    rx_capacity, rx_fill, rx_fill_merged, tx_check, tx_gather, tx_pieces, VirtioNetHdr, ETH_HLEN,
};
use vhost_user_core::vring::Segment;
use zerocopy::IntoBytes;

#[path = "common/input.rs"]
#[allow(dead_code)]
mod input;
use input::In;

/// The image's guest address; below it nothing is mapped.
const BASE: u64 = 0x1000;
const IMAGE: usize = 8192;

struct Image {
    bytes: RefCell<Vec<u8>>,
    /// Every successful access: (address, length, write).
    log: RefCell<Vec<(u64, usize, bool)>>,
}

impl Image {
    fn range(&self, gpa: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let off = usize::try_from(gpa.checked_sub(BASE)?).ok()?;
        let end = off.checked_add(len)?;
        (end <= IMAGE).then_some(off..end)
    }
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), ()> {
        let r = self.range(gpa, dst.len()).ok_or(())?;
        dst.copy_from_slice(&self.bytes.borrow()[r]);
        self.log.borrow_mut().push((gpa, dst.len(), false));
        Ok(())
    }
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), ()> {
        let r = self.range(gpa, src.len()).ok_or(())?;
        self.bytes.borrow_mut()[r].copy_from_slice(src);
        self.log.borrow_mut().push((gpa, src.len(), true));
        Ok(())
    }
    /// Checks every access since the last call lies inside one segment of
    /// `chains` of the access's direction.
    fn check_accesses(&self, chains: &[Vec<Segment>]) {
        for (gpa, len, write) in self.log.borrow_mut().drain(..) {
            let end = gpa + len as u64;
            let inside = chains
                .iter()
                .flatten()
                .any(|s| s.writable == write && s.addr <= gpa && end <= s.addr + u64::from(s.len));
            assert!(
                inside,
                "{len} bytes at {gpa:#x} (write {write}) outside the chains"
            );
        }
    }
}

/// A segment from fuzzer bytes.
fn segment(input: &mut In) -> Segment {
    let kind = input.u8();
    let addr = match kind & 3 {
        // Wild, or overflowing with its length.
        0 if kind & 4 != 0 => u64::MAX - u64::from(input.u16()),
        0 => u64::from(input.u16()) << 32,
        // Inside the image or just past it (often overlapping).
        _ => BASE + u64::from(input.u16()) % (IMAGE as u64 + 64),
    };
    let len = match kind >> 5 {
        0 => 0,
        1 => u32::from(input.u8()),
        2 => u32::MAX - u32::from(input.u8()),
        _ => u32::from(input.u16()) % 2048,
    };
    Segment {
        addr,
        len,
        writable: kind & 8 != 0,
    }
}

/// Whether no two nonempty segments of `chains` share a byte.
fn disjoint(chains: &[Vec<Segment>]) -> bool {
    let mut all: Vec<(u64, u64)> = chains
        .iter()
        .flatten()
        .filter(|s| s.len != 0)
        .map(|s| (s.addr, s.addr.saturating_add(u64::from(s.len))))
        .collect();
    all.sort_unstable();
    all.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// The first `n` bytes of the buffers of `chain`, in order (the reads
/// are not checked accesses).
fn written(mem: &Image, chain: &[Segment], mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for s in chain.iter().filter(|s| s.len != 0) {
        if n == 0 {
            break;
        }
        let k = n.min(s.len as usize);
        let mut b = vec![0; k];
        mem.read(s.addr, &mut b).unwrap();
        out.extend(b);
        n -= k;
    }
    mem.log.borrow_mut().clear();
    out
}

fuzz_target!(|data: &[u8]| {
    let mut input = In(data);
    let mut chains: Vec<Vec<Segment>> = Vec::new();
    for _ in 0..1 + input.u8() % 6 {
        let n = input.u8() % 6;
        chains.push((0..n).map(|_| segment(&mut input)).collect());
    }
    let flen = usize::from(input.u16()) % 3000;
    let frame: Vec<u8> = (0..flen).map(|i| (i * 7 + 3) as u8).collect();
    let hdr_len = [0, 10, 12, 13, 40][usize::from(input.u8()) % 5];
    let slots = usize::from(input.u8()) % 8;
    let max_frame = usize::from(input.u16()) % 4000;
    let mut image = input.0.to_vec();
    image.resize(IMAGE, 0);
    let mem = Image {
        bytes: RefCell::new(image),
        log: RefCell::new(Vec::new()),
    };
    let write = |gpa: u64, src: &[u8]| mem.write(gpa, src);
    let read = |gpa: u64, dst: &mut [u8]| mem.read(gpa, dst);
    let hdr = VirtioNetHdr::default();
    let first = &chains[..1];
    let chain = &chains[0];

    // Receive into one chain.
    let hl = hdr_len.min(VirtioNetHdr::SIZE);
    let capacity = rx_capacity(chain, hl);
    if let Ok(n) = rx_fill(chain, &write, &hdr, hdr_len, &frame) {
        assert_eq!(n as usize, hl + flen);
        assert!(n <= capacity.unwrap());
        mem.check_accesses(first);
        if disjoint(first) {
            let got = written(&mem, chain, n as usize);
            // Without mergeable buffers a frame takes one buffer.
            let mut h = hdr;
            h.num_buffers = 1.into();
            assert_eq!(&got[..hl], &h.as_bytes()[..hl]);
            assert_eq!(&got[hl..], &frame[..]);
        }
    }
    mem.check_accesses(first);

    // Receive with mergeable buffers over all the chains.
    let mut used = vec![0u32; slots];
    if let Ok(count) = rx_fill_merged(&chains, &write, &hdr, &frame, &mut used) {
        assert!(count >= 1 && count <= slots.min(chains.len()));
        let sum: u64 = used[..count].iter().map(|&u| u64::from(u)).sum();
        assert_eq!(sum, (VirtioNetHdr::SIZE + flen) as u64);
        for (c, &u) in chains.iter().zip(&used[..count]) {
            assert!(u64::from(u) <= u64::from(rx_capacity(c, 0).unwrap()));
        }
        mem.check_accesses(&chains);
        if disjoint(&chains) {
            let mut got = Vec::new();
            for (c, &u) in chains.iter().zip(&used[..count]) {
                got.extend(written(&mem, c, u as usize));
            }
            let (h, f) = got.split_at(VirtioNetHdr::SIZE);
            assert_eq!(usize::from(u16::from_le_bytes([h[10], h[11]])), count);
            assert_eq!(&h[..10], &hdr.as_bytes()[..10]);
            assert_eq!(f, &frame[..]);
        }
    }
    mem.check_accesses(&chains);

    // Transmit from one chain.
    let checked = tx_check(chain, hdr_len, max_frame);
    if let Ok(len) = checked {
        assert!(len as usize <= max_frame && len as usize >= ETH_HLEN);
    }
    let mut buf = vec![0u8; max_frame];
    match tx_gather(chain, &read, hdr_len, &mut buf) {
        Ok(out) => {
            // The gather reads at most the 12-byte header (`hl`).
            assert!(out.len <= max_frame && out.len >= ETH_HLEN);
            if hl == hdr_len {
                assert_eq!(Ok(out.len as u32), checked);
            }
            mem.check_accesses(first);
            let whole = written(&mem, chain, hl + out.len);
            assert_eq!(&whole[..hl], &out.hdr.as_bytes()[..hl]);
            assert_eq!(&whole[hl..], &buf[..out.len]);
        }
        Err(_) => mem.check_accesses(first),
    }
    let mut pieces = 0u64;
    if let Ok(len) = tx_pieces(chain, hdr_len, max_frame, |addr, n| {
        let end = addr.checked_add(u64::from(n)).unwrap();
        assert!(chain
            .iter()
            .any(|s| !s.writable && s.addr <= addr && end <= s.addr + u64::from(s.len)));
        pieces += u64::from(n);
    }) {
        assert_eq!(Ok(len), checked);
        assert_eq!(pieces, u64::from(len));
    }
});

//! virtio-net unit tests: config space, features, header length, and the
//! transmit and receive functions on a fake guest memory, hostile chains
//! included.

use core::cell::RefCell;
use core::mem::offset_of;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;

/// A flat fake guest memory: GPA 0..MEM_SIZE, everything else unmapped.
struct Mem(RefCell<Vec<u8>>);

const MEM_SIZE: usize = 0x10000;

impl Mem {
    fn new() -> Self {
        Mem(RefCell::new(vec![0xEE; MEM_SIZE]))
    }

    fn put(&self, gpa: u64, bytes: &[u8]) {
        let a = gpa as usize;
        self.0.borrow_mut()[a..a + bytes.len()].copy_from_slice(bytes);
    }

    fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let a = gpa as usize;
        self.0.borrow()[a..a + len].to_vec()
    }

    fn range(gpa: u64, len: usize) -> Result<core::ops::Range<usize>, ()> {
        let a = usize::try_from(gpa).map_err(|_| ())?;
        let end = a.checked_add(len).ok_or(())?;
        if end > MEM_SIZE {
            return Err(());
        }
        Ok(a..end)
    }

    fn reader(&self) -> impl Fn(u64, &mut [u8]) -> Result<(), ()> + '_ {
        move |gpa, dst| {
            let r = Self::range(gpa, dst.len())?;
            dst.copy_from_slice(&self.0.borrow()[r]);
            Ok(())
        }
    }

    fn writer(&self) -> impl Fn(u64, &[u8]) -> Result<(), ()> + '_ {
        move |gpa, src| {
            let r = Self::range(gpa, src.len())?;
            self.0.borrow_mut()[r].copy_from_slice(src);
            Ok(())
        }
    }
}

const R: fn(u64, u32) -> Segment = Segment::readable;
const W: fn(u64, u32) -> Segment = Segment::writable;

fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

fn hdr_bytes(flags: u8, csum_start: u16, num_buffers: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0] = flags;
    b[6..8].copy_from_slice(&csum_start.to_le_bytes());
    b[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    b
}

// ---------------------------------------------------------------------------
// Layouts, config space, features.

#[test]
fn wire_layouts() {
    assert_eq!(offset_of!(VirtioNetConfig, mac), 0);
    assert_eq!(offset_of!(VirtioNetConfig, status), 6);
    assert_eq!(offset_of!(VirtioNetConfig, max_virtqueue_pairs), 8);
    assert_eq!(offset_of!(VirtioNetConfig, mtu), 10);
    assert_eq!(offset_of!(VirtioNetConfig, speed), 12);
    assert_eq!(offset_of!(VirtioNetConfig, supported_hash_types), 20);
    assert_eq!(offset_of!(VirtioNetHdr, gso_type), 1);
    assert_eq!(offset_of!(VirtioNetHdr, hdr_len), 2);
    assert_eq!(offset_of!(VirtioNetHdr, gso_size), 4);
    assert_eq!(offset_of!(VirtioNetHdr, csum_start), 6);
    assert_eq!(offset_of!(VirtioNetHdr, csum_offset), 8);
    assert_eq!(offset_of!(VirtioNetHdr, num_buffers), 10);
}

fn config() -> NetConfig {
    NetConfig {
        mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        queue_pairs: 2,
        mtu: Some(9000),
        ..NetConfig::new()
    }
}

#[test]
fn config_space_bytes() {
    let dev = NetDevice::new(&config()).unwrap();
    let mut b = [0u8; 24];
    dev.read_config(0, &mut b).unwrap();
    assert_eq!(
        b[..16],
        [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 2, 0, 0x28, 0x23, 0xff, 0xff, 0xff, 0xff]
    );
    assert_eq!(b[16], 0xff);
    let mut mtu = [0u8; 2];
    dev.read_config(10, &mut mtu).unwrap();
    assert_eq!(u16::from_le_bytes(mtu), 9000);
    // Outside the space: refused, untouched.
    let mut big = [9u8; 4];
    assert_eq!(
        dev.read_config(22, &mut big),
        Err(NetConfigError::OutOfRange { offset: 22, len: 4 })
    );
    assert_eq!(big, [9; 4]);
    assert!(dev.read_config(u32::MAX, &mut [0u8; 1]).is_err());
}

#[test]
fn config_writes() {
    let mut dev = NetDevice::new(&config()).unwrap();
    // The driver may not change anything; rewriting the same bytes is fine.
    assert_eq!(
        dev.write_config(
            0,
            &[0x52, 0x54, 0, 0x12, 0x34, 0x57],
            ConfigWriteKind::Frontend
        ),
        Err(NetConfigError::ReadOnlyField(5))
    );
    dev.write_config(0, &[0x52, 0x54], ConfigWriteKind::Frontend)
        .unwrap();
    // A migration write sets anything; reset goes back.
    dev.write_config(6, &[0, 0], ConfigWriteKind::Migration)
        .unwrap();
    assert_eq!(dev.config_space().status.get(), 0);
    dev.reset();
    assert_eq!(dev.config_space().status.get(), VIRTIO_NET_S_LINK_UP);
    assert!(dev
        .write_config(23, &[0, 0], ConfigWriteKind::Migration)
        .is_err());
}

#[test]
fn link_status() {
    let mut dev = NetDevice::new(&config()).unwrap();
    assert!(!dev.set_link_up(true));
    assert!(dev.set_link_up(false));
    assert_eq!(dev.config_space().status.get(), 0);
    dev.reset();
    assert_eq!(
        dev.config_space().status.get(),
        0,
        "a reset keeps the link state"
    );
}

#[test]
fn bad_configs() {
    let mut c = NetConfig::new();
    c.queue_pairs = 0;
    assert_eq!(NetDevice::new(&c), Err(NetConfigError::BadQueuePairs(0)));
    c.queue_pairs = 0x8001;
    assert!(NetDevice::new(&c).is_err());
    let mut c = NetConfig::new();
    c.mtu = Some(67);
    assert_eq!(NetDevice::new(&c), Err(NetConfigError::BadMtu(67)));
    let mut c = NetConfig::new();
    c.mac = Some([1, 0, 0, 0, 0, 0]);
    assert_eq!(NetDevice::new(&c), Err(NetConfigError::MulticastMac));
}

#[test]
fn offered_and_acked_features() {
    let dev = NetDevice::new(&config()).unwrap();
    let f = NetFeatures::from_virtio(dev.offered_features());
    assert_eq!(
        f,
        NetFeatures::MAC
            | NetFeatures::MTU
            | NetFeatures::MQ
            | NetFeatures::MRG_RXBUF
            | NetFeatures::STATUS
    );
    let single = NetDevice::new(&NetConfig::new()).unwrap();
    let f = NetFeatures::from_virtio(single.offered_features());
    assert!(!f.contains(NetFeatures::MQ) && !f.contains(NetFeatures::MAC));
    assert!(!f.contains(NetFeatures::CTRL_VQ));

    let mut dev = dev;
    // Legacy, no MRG_RXBUF: 10-byte header.
    dev.set_features(NetFeatures::MAC.to_virtio());
    assert_eq!(dev.hdr_len(), 10);
    assert!(!dev.mergeable());
    // MRG_RXBUF alone makes it 12.
    dev.set_features(NetFeatures::MRG_RXBUF.to_virtio());
    assert_eq!(dev.hdr_len(), 12);
    assert!(dev.mergeable());
    // VERSION_1 alone makes it 12; bits not offered are ignored.
    dev.set_features(VirtioFeatures::VERSION_1 | NetFeatures::HOST_TSO4.to_virtio());
    assert_eq!(dev.hdr_len(), 12);
    assert!(!dev.mergeable());
    assert!(dev.acked_features().is_empty());
    dev.reset();
    assert_eq!(dev.hdr_len(), 10);
    assert_eq!(dev.max_frame(), 9000 + 18);
    assert_eq!(NetDevice::new(&NetConfig::new()).unwrap().max_frame(), 1518);
}

#[test]
fn queue_roles() {
    assert_eq!(QueueRole::of(0), QueueRole::Rx(0));
    assert_eq!(QueueRole::of(1), QueueRole::Tx(0));
    assert_eq!(QueueRole::of(4), QueueRole::Rx(2));
    assert_eq!(QueueRole::of(5).pair(), 2);
}

// ---------------------------------------------------------------------------
// Transmit.

#[test]
fn tx_gather_header_and_frame_across_segments() {
    let mem = Mem::new();
    let f = frame(100);
    let mut wire = hdr_bytes(VIRTIO_NET_HDR_F_NEEDS_CSUM, 34, 0).to_vec();
    wire.extend_from_slice(&f);
    // Split: 5 bytes of header, the rest of the header and 20 bytes of
    // frame, an empty descriptor, then the rest.
    mem.put(0x1000, &wire[..5]);
    mem.put(0x2000, &wire[5..37]);
    mem.put(0x3000, &wire[37..]);
    let segs = [R(0x1000, 5), R(0x2000, 32), R(0x9000, 0), R(0x3000, 75)];
    let mut buf = [0u8; 1518];
    let out = tx_gather(&segs, &mem.reader(), 12, &mut buf).unwrap();
    assert_eq!(out.len, 100);
    assert_eq!(&buf[..100], &f[..]);
    assert_eq!(out.hdr.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
    assert_eq!(out.hdr.csum_start.get(), 34);

    // The same with a 10-byte header: the frame starts 2 bytes earlier.
    let out = tx_gather(&segs, &mem.reader(), 10, &mut buf).unwrap();
    assert_eq!(out.len, 102);
    assert_eq!(out.hdr.num_buffers.get(), 0);
    assert_eq!(&buf[2..102], &f[..]);

    // tx_pieces names the frame's ranges.
    let mut pieces = Vec::new();
    let len = tx_pieces(&segs, 12, 1518, |a, l| pieces.push((a, l))).unwrap();
    assert_eq!(len, 100);
    assert_eq!(pieces, [(0x2007, 25), (0x3000, 75)]);
}

#[test]
fn tx_hostile_chains_are_refused() {
    let mem = Mem::new();
    let mut buf = [0u8; 1518];
    let rd = mem.reader();
    // A device-writable buffer in a transmit chain.
    assert_eq!(
        tx_gather(&[R(0x1000, 64), W(0x2000, 64)], &rd, 12, &mut buf),
        Err(NetError::WritableInTx)
    );
    // Address overflow.
    assert_eq!(
        tx_gather(&[R(u64::MAX - 10, 64)], &rd, 12, &mut buf),
        Err(NetError::AddressOverflow)
    );
    // Shorter than the header, and a runt frame.
    assert_eq!(
        tx_gather(&[R(0x1000, 11)], &rd, 12, &mut buf),
        Err(NetError::HeaderTooShort)
    );
    assert_eq!(
        tx_gather(&[R(0x1000, 12 + 13)], &rd, 12, &mut buf),
        Err(NetError::Runt(13))
    );
    // Longer than the caller takes (and far longer: u32 lengths add up
    // in 64 bits).
    assert_eq!(
        tx_gather(&[R(0x1000, 12 + 1519)], &rd, 12, &mut buf),
        Err(NetError::Oversize(1519))
    );
    let huge = [R(0, u32::MAX), R(0, u32::MAX), R(0, u32::MAX)];
    assert!(matches!(
        tx_gather(&huge, &rd, 12, &mut buf),
        Err(NetError::Oversize(_))
    ));
    // Unmapped memory.
    assert_eq!(
        tx_gather(&[R(MEM_SIZE as u64 - 20, 100)], &rd, 12, &mut buf),
        Err(NetError::GuestMemory)
    );
    assert!(tx_pieces(&[W(0x1000, 100)], 12, 1518, |_, _| panic!()).is_err());
}

// ---------------------------------------------------------------------------
// Receive.

#[test]
fn rx_fill_one_chain() {
    let mem = Mem::new();
    let f = frame(60);
    let segs = [W(0x1000, 8), W(0x2000, 2048)];
    let hdr = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_DATA_VALID,
        num_buffers: 7.into(),
        ..VirtioNetHdr::default()
    };
    let n = rx_fill(&segs, &mem.writer(), &hdr, 12, &f).unwrap();
    assert_eq!(n, 72);
    assert_eq!(
        mem.get(0x1000, 8),
        hdr_bytes(VIRTIO_NET_HDR_F_DATA_VALID, 0, 1)[..8]
    );
    // num_buffers is 1 whatever the caller's header said.
    assert_eq!(mem.get(0x2000, 4), [0, 0, 1, 0]);
    assert_eq!(mem.get(0x2004, 60), f);
    assert_eq!(mem.get(0x2004 + 60, 1), [0xEE], "nothing past the frame");

    // A 10-byte header: no num_buffers.
    let n = rx_fill(&[W(0x3000, 100)], &mem.writer(), &hdr, 10, &f).unwrap();
    assert_eq!(n, 70);
    assert_eq!(mem.get(0x300a, 60), f);
}

#[test]
fn rx_hostile_or_small_chains_are_refused_untouched() {
    let mem = Mem::new();
    let hdr = VirtioNetHdr::default();
    let f = frame(100);
    let wr = mem.writer();
    assert_eq!(
        rx_fill(&[W(0x1000, 64), R(0x2000, 64)], &wr, &hdr, 12, &f),
        Err(NetError::ReadableInRx)
    );
    assert_eq!(
        rx_fill(&[W(u64::MAX - 3, 64)], &wr, &hdr, 12, &f),
        Err(NetError::AddressOverflow)
    );
    assert_eq!(
        rx_fill(&[W(0x1000, 11)], &wr, &hdr, 12, &f),
        Err(NetError::BufferTooSmall(11))
    );
    assert_eq!(
        rx_fill(&[W(0x1000, 64), W(0x2000, 47)], &wr, &hdr, 12, &f),
        Err(NetError::NoRoom {
            need: 112,
            have: 111
        })
    );
    assert_eq!(
        mem.get(0x1000, 64),
        [0xEE; 64],
        "a refused chain is untouched"
    );
    assert_eq!(
        rx_fill(&[W(MEM_SIZE as u64 - 10, 200)], &wr, &hdr, 12, &f),
        Err(NetError::GuestMemory)
    );
    // Lengths that add up past u32 saturate instead of wrapping.
    let huge = [W(0, u32::MAX), W(0, u32::MAX)];
    assert_eq!(rx_capacity(&huge, 12), Ok(u32::MAX));
}

#[test]
fn rx_merged_over_three_chains() {
    let mem = Mem::new();
    let f = frame(3000);
    let chains: [&[Segment]; 4] = [
        &[W(0x1000, 1500)],
        &[W(0x2000, 1000), W(0x2800, 500)],
        &[W(0x3000, 1500)],
        &[W(0x4000, 1500)],
    ];
    let mut used = [0u32; 8];
    let hdr = VirtioNetHdr::default();
    let n = rx_fill_merged(&chains, &mem.writer(), &hdr, &f, &mut used).unwrap();
    assert_eq!(n, 3);
    assert_eq!(used[..3], [1500, 1500, 12]);
    assert_eq!(mem.get(0x1000, 12), hdr_bytes(0, 0, 3));
    assert_eq!(mem.get(0x100c, 1488), f[..1488]);
    assert_eq!(mem.get(0x2000, 1000), f[1488..2488]);
    assert_eq!(mem.get(0x2800, 500), f[2488..2988]);
    assert_eq!(mem.get(0x3000, 12), f[2988..]);
    assert_eq!(
        mem.get(0x4000, 4),
        [0xEE; 4],
        "the fourth chain is not used"
    );

    // A small frame takes one chain, num_buffers 1.
    let n = rx_fill_merged(&chains, &mem.writer(), &hdr, &f[..60], &mut used).unwrap();
    assert_eq!((n, used[0]), (1, 72));
    assert_eq!(mem.get(0x100a, 2), [1, 0]);
}

#[test]
fn rx_merged_refusals() {
    let mem = Mem::new();
    let f = frame(3000);
    let hdr = VirtioNetHdr::default();
    let mut used = [0u32; 8];
    let two: [&[Segment]; 2] = [&[W(0x1000, 1500)], &[W(0x2000, 1500)]];
    // Not enough room: nothing written, the count of chains checked.
    assert_eq!(
        rx_fill_merged(&two, &mem.writer(), &hdr, &f, &mut used),
        Err(MergeError {
            chain: 2,
            error: NetError::NoRoom {
                need: 3012,
                have: 3000
            }
        })
    );
    assert_eq!(mem.get(0x1000, 4), [0xEE; 4]);
    // Fewer used slots than chains needed.
    let three: [&[Segment]; 3] = [&[W(0x1000, 1500)], &[W(0x2000, 1500)], &[W(0x3000, 1500)]];
    assert!(matches!(
        rx_fill_merged(&three, &mem.writer(), &hdr, &f, &mut used[..2]),
        Err(MergeError {
            chain: 2,
            error: NetError::NoRoom { .. }
        })
    ));
    // A hostile second chain is named.
    let bad: [&[Segment]; 2] = [&[W(0x1000, 1500)], &[R(0x2000, 1500)]];
    assert_eq!(
        rx_fill_merged(&bad, &mem.writer(), &hdr, &f, &mut used),
        Err(MergeError {
            chain: 1,
            error: NetError::ReadableInRx
        })
    );
    // A buffer smaller than the header, anywhere, is refused.
    let tiny: [&[Segment]; 2] = [&[W(0x1000, 1500)], &[W(0x2000, 4)]];
    assert_eq!(
        rx_fill_merged(&tiny, &mem.writer(), &hdr, &f, &mut used),
        Err(MergeError {
            chain: 1,
            error: NetError::BufferTooSmall(4)
        })
    );
    let none: [&[Segment]; 0] = [];
    assert!(rx_fill_merged(&none, &mem.writer(), &hdr, &f, &mut used).is_err());
}

proptest! {
    /// Any frame written over any valid chains reads back the same, and
    /// the used lengths add up to header plus frame.
    #[test]
    fn rx_then_read_back(
        lens in proptest::collection::vec(12u32..700, 1..6),
        split in 1u32..50,
        flen in 0usize..2000,
    ) {
        let mem = Mem::new();
        let f = frame(flen);
        // Each chain: two segments (the first `split` bytes, the rest), in
        // its own 4 KiB page.
        let chains: Vec<Vec<Segment>> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let base = 0x1000 * (i as u64 + 1);
                let a = split.min(l);
                vec![W(base, a), W(base + 0x800, l - a)]
            })
            .collect();
        let mut used = [0u32; 8];
        let total: u32 = lens.iter().sum();
        let wr = mem.writer();
        let result = rx_fill_merged(&chains, &wr, &VirtioNetHdr::default(), &f, &mut used);
        match result {
            Ok(n) => {
                let sum: u32 = used[..n].iter().sum();
                prop_assert_eq!(sum as usize, 12 + flen);
                // Read it back as a transmit chain would be read.
                let mut segs = Vec::new();
                for (c, &u) in chains.iter().zip(&used[..n]) {
                    let mut left = u;
                    for s in c {
                        let l = s.len.min(left);
                        segs.push(R(s.addr, l));
                        left -= l;
                    }
                }
                let mut buf = vec![0u8; 4096];
                if flen >= ETH_HLEN {
                    let out = tx_gather(&segs, &mem.reader(), 12, &mut buf).unwrap();
                    prop_assert_eq!(out.hdr.num_buffers.get() as usize, n);
                    prop_assert_eq!(&buf[..out.len], &f[..]);
                }
            }
            Err(e) => {
                let no_room = matches!(e.error, NetError::NoRoom { .. });
                prop_assert!(no_room);
                prop_assert!((total as usize) < 12 + flen);
            }
        }
    }
}

#[test]
fn offloads_are_offered_and_acked_only_from_the_allowed_set() {
    let c = NetConfig {
        offloads: NetFeatures::CSUM | NetFeatures::GUEST_TSO4 | NetFeatures::CTRL_VQ,
        ..config()
    };
    let mut dev = NetDevice::new(&c).unwrap();
    let offered = NetFeatures::from_virtio(dev.offered_features());
    assert!(offered.contains(NetFeatures::CSUM | NetFeatures::GUEST_TSO4));
    assert!(!offered.contains(NetFeatures::CTRL_VQ));
    dev.set_features((NetFeatures::GUEST_TSO4 | NetFeatures::HOST_TSO4).to_virtio());
    assert_eq!(dev.acked_features(), NetFeatures::GUEST_TSO4);
    assert!(
        !NetFeatures::from_virtio(NetDevice::new(&config()).unwrap().offered_features())
            .intersects(NetConfig::OFFLOADS)
    );
}

#[test]
fn transmit_headers_follow_the_spec_and_the_offloads() {
    use NetFeatures as F;
    let hdr = |flags, gso_type, hdr_len: u16, gso_size: u16, start: u16, off: u16| VirtioNetHdr {
        flags,
        gso_type,
        hdr_len: hdr_len.into(),
        gso_size: gso_size.into(),
        csum_start: start.into(),
        csum_offset: off.into(),
        num_buffers: 0.into(),
    };
    let all = F::CSUM | F::HOST_TSO4 | F::HOST_TSO6 | F::HOST_ECN;
    let ok = |h: VirtioNetHdr, acked| check_tx_hdr(&h, 100, acked, 100);
    assert_eq!(ok(hdr(0, 0, 0, 0, 0, 0), F::empty()), Ok(()));
    // The checksum field's last byte is the frame's last.
    assert_eq!(ok(hdr(1, 0, 0, 0, 34, 64), all), Ok(()));
    assert_eq!(
        ok(hdr(1, 0, 0, 0, 34, 65), all),
        Err(TxHdrError::CsumOutside {
            start: 34,
            offset: 65,
            len: 100
        })
    );
    assert_eq!(
        ok(hdr(1, 0, 0, 0, 34, 16), F::HOST_TSO4),
        Err(TxHdrError::CsumNotNegotiated)
    );
    assert_eq!(ok(hdr(2, 0, 0, 0, 0, 0), all), Err(TxHdrError::Flags(2)));
    assert_eq!(ok(hdr(1, 1, 54, 1448, 34, 16), all), Ok(()));
    assert_eq!(ok(hdr(1, 0x84, 74, 1428, 54, 16), all), Ok(()));
    assert_eq!(
        ok(hdr(1, 0x81, 54, 1448, 34, 16), F::CSUM | F::HOST_TSO4),
        Err(TxHdrError::GsoNotNegotiated(0x81))
    );
    assert_eq!(
        ok(hdr(1, 1, 54, 1448, 34, 16), F::CSUM | F::HOST_TSO6),
        Err(TxHdrError::GsoNotNegotiated(1))
    );
    assert_eq!(
        ok(hdr(1, 3, 42, 1000, 34, 6), all),
        Err(TxHdrError::GsoNotNegotiated(3))
    );
    for t in [2, 5, 6, 0x7f, 0x80, 0xff] {
        assert_eq!(
            ok(hdr(1, t, 54, 1448, 34, 16), all),
            Err(TxHdrError::UnknownGso(t)),
            "{t}"
        );
    }
    assert_eq!(
        ok(hdr(1, 1, 54, 0, 34, 16), all),
        Err(TxHdrError::GsoIncomplete)
    );
    assert_eq!(
        ok(hdr(0, 1, 54, 1448, 0, 0), all),
        Err(TxHdrError::GsoIncomplete)
    );
    assert_eq!(
        ok(hdr(0, 0, 101, 0, 0, 0), all),
        Err(TxHdrError::HdrLenOutside {
            hdr_len: 101,
            len: 100
        })
    );
    // Sums that would overflow 16 bits are not wrapped.
    assert!(ok(hdr(1, 0, 0, 0, 0xffff, 0xffff), all).is_err());
    // TCP segmentation checksums the TCP header's field, 16 bytes in.
    assert_eq!(
        ok(hdr(1, 1, 54, 1448, 34, 6), all),
        Err(TxHdrError::TcpCsumOffset(6))
    );
    assert_eq!(
        ok(hdr(1, 0x84, 74, 1428, 54, 17), all),
        Err(TxHdrError::TcpCsumOffset(17))
    );
    // With VIRTIO_NET_F_MTU, a frame without segmentation is held to the
    // MTU's longest; a segmented one is not (the host segments it).
    let mtu = |h: VirtioNetHdr, len, acked| check_tx_hdr(&h, len, acked, 1518);
    assert_eq!(mtu(hdr(0, 0, 0, 0, 0, 0), 1518, F::MTU), Ok(()));
    assert_eq!(
        mtu(hdr(0, 0, 0, 0, 0, 0), 1519, F::MTU),
        Err(TxHdrError::OverMtu {
            len: 1519,
            max: 1518
        })
    );
    assert_eq!(mtu(hdr(0, 0, 0, 0, 0, 0), 9000, F::empty()), Ok(()));
    assert_eq!(mtu(hdr(1, 1, 54, 1448, 34, 16), 9000, all | F::MTU), Ok(()));
}

/// Receive buffers whose lengths add up past 4 GiB (a chain's own total
/// only saturates) neither wrap the position in the chain nor the room
/// counted over several chains where usize is 32 bits (the bare-metal
/// targets; the core's tests also run on a 32-bit host): the frame lands
/// where it belongs.
#[test]
fn receive_buffers_past_4_gib_in_all_keep_their_positions() {
    let mem = Mem::new();
    let f = frame(100);
    let h = VirtioNetHdr::default();
    let huge = [W(0x100, 12), W(0x200, u32::MAX)];
    assert_eq!(rx_fill(&huge, &mem.writer(), &h, 12, &f), Ok(112));
    assert_eq!(mem.get(0x200, 100), f);
    assert_eq!(mem.get(0x100, 12), hdr_bytes(0, 0, 1));

    let mem = Mem::new();
    let chains = [vec![W(0x100, 12)], vec![W(0x200, u32::MAX)]];
    let mut used = [0u32; 4];
    assert_eq!(
        rx_fill_merged(&chains, &mem.writer(), &h, &f, &mut used),
        Ok(2)
    );
    assert_eq!(used[..2], [12, 100]);
    assert_eq!(mem.get(0x100, 12), hdr_bytes(0, 0, 2));
    assert_eq!(mem.get(0x200, 100), f);
}

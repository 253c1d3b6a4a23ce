//! virtio-blk unit tests: config-space layout, config access, and the
//! request planner on byte vectors in a fake guest memory.

use core::cell::RefCell;
use core::mem::offset_of;
use std::string::ToString;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;

// ---------------------------------------------------------------------------
// A flat fake guest memory: GPA 0..size, everything else unmapped.

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

fn hdr(ty: u32, sector: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&ty.to_le_bytes());
    b[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // ioprio: ignored
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    b
}

fn range_bytes(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&num.to_le_bytes());
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    b
}

const R: fn(u64, u32) -> Segment = Segment::readable;
const W: fn(u64, u32) -> Segment = Segment::writable;

const HDR: u64 = 0x100;
const DATA: u64 = 0x1000;
const STATUS: u64 = 0x8000;

/// 1 MiB, every feature this module supports.
fn full_config() -> BlkConfig {
    let mut c = BlkConfig::new(2048);
    c.discard = Some(DiscardLimits {
        max_sectors: 1024,
        max_seg: 4,
        sector_alignment: 8,
    });
    c.write_zeroes = Some(WriteZeroesLimits {
        max_sectors: 512,
        max_seg: 2,
        may_unmap: true,
    });
    c.set_serial(b"vhu-serial-0001");
    c
}

fn device(config: &BlkConfig) -> BlkDevice {
    let mut d = BlkDevice::new(config).unwrap();
    d.set_features(d.offered_features());
    d
}

fn plan(dev: &BlkDevice, mem: &Mem, segs: &[Segment]) -> BlkRequest {
    dev.plan(segs, &mem.reader())
}

fn fail(req: &BlkRequest) -> (BlkStatus, BlkError) {
    match req.op() {
        BlkOp::Fail { status, error } => (status, error),
        op => panic!("expected a failure, got {op:?}"),
    }
}

/// Plans `segs` and checks it fails with `error` (and its status), and that
/// the status byte lands at `STATUS` with nothing else in the plan.
fn assert_fails(dev: &BlkDevice, mem: &Mem, segs: &[Segment], error: BlkError) {
    let req = plan(dev, mem, segs);
    assert_eq!(fail(&req), (error.status(), error), "{segs:?}");
    assert!(req.data().is_empty());
    assert!(req.ranges().is_empty());
    assert_eq!(req.data_len(), 0);
    req.write_status(&mem.writer(), error.status()).unwrap();
    if req.status_addr().is_some() {
        assert_eq!(mem.get(STATUS, 1), [error.status() as u8]);
        assert_eq!(req.used_len(error.status()), 1);
    }
}

// ---------------------------------------------------------------------------
// Layout.

#[test]
fn config_layout_matches_the_spec_offsets() {
    type C = VirtioBlkConfig;
    let expected = [
        (offset_of!(C, capacity), 0),
        (offset_of!(C, size_max), 8),
        (offset_of!(C, seg_max), 12),
        (offset_of!(C, geometry), 16),
        (offset_of!(C, blk_size), 20),
        (offset_of!(C, topology), 24),
        (offset_of!(C, writeback), 32),
        (offset_of!(C, unused0), 33),
        (offset_of!(C, num_queues), 34),
        (offset_of!(C, max_discard_sectors), 36),
        (offset_of!(C, max_discard_seg), 40),
        (offset_of!(C, discard_sector_alignment), 44),
        (offset_of!(C, max_write_zeroes_sectors), 48),
        (offset_of!(C, max_write_zeroes_seg), 52),
        (offset_of!(C, write_zeroes_may_unmap), 56),
        (offset_of!(C, unused1), 57),
        (offset_of!(C, max_secure_erase_sectors), 60),
        (offset_of!(C, max_secure_erase_seg), 64),
        (offset_of!(C, secure_erase_sector_alignment), 68),
        (offset_of!(C, zoned), 72),
    ];
    for (i, (got, want)) in expected.iter().enumerate() {
        assert_eq!(got, want, "field #{i}");
    }
    assert_eq!(offset_of!(VirtioBlkGeometry, heads), 2);
    assert_eq!(offset_of!(VirtioBlkGeometry, sectors), 3);
    assert_eq!(offset_of!(VirtioBlkTopology, alignment_offset), 1);
    assert_eq!(offset_of!(VirtioBlkTopology, min_io_size), 2);
    assert_eq!(offset_of!(VirtioBlkTopology, opt_io_size), 4);
    assert_eq!(offset_of!(VirtioBlkZoned, model), 20);
    assert_eq!(core::mem::size_of::<C>(), 96);
    assert_eq!(VirtioBlkConfig::WRITEBACK_OFFSET, 32);
    assert_eq!(offset_of!(VirtioBlkOutHdr, sector), 8);
    assert_eq!(offset_of!(VirtioBlkDiscardWriteZeroes, num_sectors), 8);
    assert_eq!(offset_of!(VirtioBlkDiscardWriteZeroes, flags), 12);
}

#[test]
fn config_space_bytes_are_little_endian_at_known_offsets() {
    let mut c = full_config();
    c.capacity = 0x0102_0304_0506_0708;
    c.blk_size = 4096;
    c.num_queues = 4;
    c.seg_max = 126;
    c.size_max = 0x10_0000;
    c.topology = Some(Topology {
        physical_block_exp: 3,
        alignment_offset: 1,
        min_io_size: 0x0201,
        opt_io_size: 0x0605_0403,
    });
    let space = c.config_space();
    let b = space.as_bytes();
    assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(&b[8..12], &0x10_0000u32.to_le_bytes());
    assert_eq!(&b[12..16], &126u32.to_le_bytes());
    assert_eq!(&b[16..20], &[0, 0, 0, 0]); // geometry not offered
    assert_eq!(&b[20..24], &4096u32.to_le_bytes());
    assert_eq!(&b[24..32], &[3, 1, 1, 2, 3, 4, 5, 6]);
    assert_eq!(b[32], 1); // writeback
    assert_eq!(b[33], 0);
    assert_eq!(&b[34..36], &4u16.to_le_bytes());
    assert_eq!(&b[36..40], &1024u32.to_le_bytes());
    assert_eq!(&b[40..44], &4u32.to_le_bytes());
    assert_eq!(&b[44..48], &8u32.to_le_bytes());
    assert_eq!(&b[48..52], &512u32.to_le_bytes());
    assert_eq!(&b[52..56], &2u32.to_le_bytes());
    assert_eq!(b[56], 1);
    assert!(b[57..].iter().all(|&x| x == 0));
    // And back: any 96 bytes are a config.
    let parsed = VirtioBlkConfig::read_from_bytes(b).unwrap();
    assert_eq!(parsed.capacity.get(), 0x0102_0304_0506_0708);
}

#[test]
fn request_structs_parse_little_endian() {
    let h = VirtioBlkOutHdr::read_from_bytes(&hdr(VIRTIO_BLK_T_OUT, 0x1122_3344_5566)).unwrap();
    assert_eq!(h.type_.get(), 1);
    assert_eq!(h.sector.get(), 0x1122_3344_5566);
    let r = VirtioBlkDiscardWriteZeroes::read_from_bytes(&range_bytes(9, 7, 1)).unwrap();
    assert_eq!(
        (r.sector.get(), r.num_sectors.get(), r.flags.get()),
        (9, 7, 1)
    );
}

#[test]
fn offered_features_follow_the_config() {
    let plain = BlkConfig::new(8).features();
    assert_eq!(
        plain,
        BlkFeatures::BLK_SIZE
            | BlkFeatures::MQ
            | BlkFeatures::SEG_MAX
            | BlkFeatures::FLUSH
            | BlkFeatures::CONFIG_WCE
    );
    let mut c = full_config();
    c.read_only = true;
    c.size_max = 4096;
    c.seg_max = 0;
    c.topology = Some(Topology::default());
    let f = c.features();
    assert!(f.contains(
        BlkFeatures::RO
            | BlkFeatures::SIZE_MAX
            | BlkFeatures::TOPOLOGY
            | BlkFeatures::DISCARD
            | BlkFeatures::WRITE_ZEROES
    ));
    assert!(!f.contains(BlkFeatures::SEG_MAX));
    let dev = BlkDevice::new(&c).unwrap();
    assert_eq!(dev.offered_features().bits(), f.bits());
    assert!(dev.read_only());
    // Only the device bits: no transport bit leaks in.
    assert_eq!(dev.offered_features().bits() >> 24, 0);
}

#[test]
fn invalid_configs_are_refused() {
    let ok = BlkConfig::new(8);
    assert_eq!(ok.validate(), Ok(()));
    for bs in [0, 256, 513, 1000, 131072] {
        let c = BlkConfig { blk_size: bs, ..ok };
        assert_eq!(BlkDevice::new(&c), Err(BlkConfigError::BadBlockSize(bs)));
    }
    let c = BlkConfig {
        capacity: u64::MAX / 256,
        ..ok
    };
    assert_eq!(c.validate(), Err(BlkConfigError::CapacityTooLarge));
    let c = BlkConfig {
        num_queues: 0,
        ..ok
    };
    assert_eq!(c.validate(), Err(BlkConfigError::NoQueues));
    let c = BlkConfig { flush: false, ..ok };
    assert_eq!(c.validate(), Err(BlkConfigError::WceWithoutFlush));
    let mut c = full_config();
    c.discard = Some(DiscardLimits {
        max_sectors: 0,
        max_seg: 1,
        sector_alignment: 0,
    });
    assert_eq!(c.validate(), Err(BlkConfigError::BadLimits));
    let mut c = full_config();
    c.write_zeroes = Some(WriteZeroesLimits {
        max_sectors: 1,
        max_seg: 0,
        may_unmap: false,
    });
    assert_eq!(c.validate(), Err(BlkConfigError::BadLimits));
}

#[test]
fn serial_is_truncated_and_padded() {
    let mut c = BlkConfig::new(8);
    c.set_serial(b"0123456789abcdefghijKLMN");
    assert_eq!(&c.serial, b"0123456789abcdefghij");
    c.set_serial(b"ab");
    assert_eq!(&c.serial[..3], b"ab\0");
    assert!(c.serial[2..].iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------------------
// Config access.

#[test]
fn read_config_is_bounds_checked() {
    let dev = device(&full_config());
    let mut all = [0u8; 96];
    dev.read_config(0, &mut all).unwrap();
    assert_eq!(&all[..], dev.config_space().as_bytes());
    let mut wb = [0xff; 1];
    dev.read_config(32, &mut wb).unwrap();
    assert_eq!(wb, [1]);
    let mut tail = [0xff; 4];
    dev.read_config(92, &mut tail).unwrap();
    let mut buf = [0xAA; 8];
    assert_eq!(
        dev.read_config(90, &mut buf),
        Err(BlkConfigError::OutOfRange { offset: 90, len: 8 })
    );
    assert_eq!(buf, [0xAA; 8], "a refused read leaves the buffer alone");
    assert!(dev.read_config(96, &mut [0u8; 1]).is_err());
    assert!(dev.read_config(u32::MAX, &mut [0u8; 2]).is_err());
    // An empty read at the end is fine.
    assert!(dev.read_config(96, &mut []).is_ok());
}

#[test]
fn frontend_may_only_toggle_writeback() {
    let mut dev = device(&full_config());
    assert!(!dev.writethrough());
    dev.write_config(32, &[0], ConfigWriteKind::Frontend)
        .unwrap();
    assert_eq!(dev.config_space().writeback, 0);
    assert!(dev.writethrough());
    dev.write_config(32, &[1], ConfigWriteKind::Frontend)
        .unwrap();
    assert!(!dev.writethrough());
    assert_eq!(
        dev.write_config(32, &[2], ConfigWriteKind::Frontend),
        Err(BlkConfigError::BadWriteback(2))
    );
    // A capacity write is refused and changes nothing.
    let before = *dev.config_space();
    assert_eq!(
        dev.write_config(0, &[0xff], ConfigWriteKind::Frontend),
        Err(BlkConfigError::ReadOnlyField(0))
    );
    assert_eq!(
        dev.write_config(33, &[1], ConfigWriteKind::Frontend),
        Err(BlkConfigError::ReadOnlyField(33))
    );
    assert_eq!(*dev.config_space(), before);
    // A wider write that only changes writeback is accepted.
    let mut block = [0u8; 8];
    dev.read_config(30, &mut block).unwrap();
    block[2] = 0;
    dev.write_config(30, &block, ConfigWriteKind::Frontend)
        .unwrap();
    assert_eq!(dev.config_space().writeback, 0);
    // ... and one that also changes num_queues is refused entirely.
    block[2] = 1;
    block[4] = 9;
    assert_eq!(
        dev.write_config(30, &block, ConfigWriteKind::Frontend),
        Err(BlkConfigError::ReadOnlyField(34))
    );
    assert_eq!(dev.config_space().writeback, 0);
    assert_eq!(
        dev.write_config(95, &[0, 0], ConfigWriteKind::Frontend),
        Err(BlkConfigError::OutOfRange { offset: 95, len: 2 })
    );
}

#[test]
fn writeback_needs_config_wce_negotiated() {
    let mut dev = BlkDevice::new(&full_config()).unwrap();
    dev.set_features(BlkFeatures::FLUSH.to_virtio());
    assert_eq!(
        dev.write_config(32, &[0], ConfigWriteKind::Frontend),
        Err(BlkConfigError::WceNotNegotiated)
    );
    // Writing the current value is harmless.
    dev.write_config(32, &[1], ConfigWriteKind::Frontend)
        .unwrap();
}

#[test]
fn migration_write_sets_any_field_and_the_planner_follows() {
    let mut dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 2048));
    let segs = [R(HDR, 16), W(DATA, 512), W(STATUS, 1)];
    assert_eq!(fail(&plan(&dev, &mem, &segs)).1, BlkError::OutOfRange);
    dev.write_config(0, &4096u64.to_le_bytes(), ConfigWriteKind::Migration)
        .unwrap();
    assert_eq!(dev.capacity(), 4096);
    assert_eq!(
        plan(&dev, &mem, &segs).op(),
        BlkOp::Read {
            offset: 2048 * 512,
            len: 512
        }
    );
    assert!(dev
        .write_config(90, &[0; 7], ConfigWriteKind::Migration)
        .is_err());
    // Reset brings the initial space back.
    dev.reset();
    assert_eq!(dev.capacity(), 2048);
    assert_eq!(dev.acked_features(), BlkFeatures::empty());
}

#[test]
fn cache_mode_follows_negotiation() {
    let mut dev = BlkDevice::new(&full_config()).unwrap();
    // Nothing negotiated: writethrough.
    dev.set_features(VirtioFeatures::VERSION_1);
    assert!(dev.writethrough());
    // FLUSH without CONFIG_WCE: writeback.
    dev.set_features(BlkFeatures::FLUSH.to_virtio());
    assert!(!dev.writethrough());
    // CONFIG_WCE without FLUSH: the device must start writethrough.
    dev.set_features(BlkFeatures::CONFIG_WCE.to_virtio());
    assert_eq!(dev.config_space().writeback, 0);
    assert!(dev.writethrough());
    // Bits never offered are not acked.
    let mut plain = BlkDevice::new(&BlkConfig::new(8)).unwrap();
    plain.set_features((BlkFeatures::DISCARD | BlkFeatures::FLUSH).to_virtio());
    assert_eq!(plain.acked_features(), BlkFeatures::FLUSH);
}

#[test]
fn writethrough_marks_writes_for_sync() {
    let mut dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 0));
    let segs = [R(HDR, 16), R(DATA, 512), W(STATUS, 1)];
    assert!(!plan(&dev, &mem, &segs).sync_after());
    dev.write_config(32, &[0], ConfigWriteKind::Frontend)
        .unwrap();
    assert!(plan(&dev, &mem, &segs).sync_after());
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    let segs = [R(HDR, 16), W(DATA, 512), W(STATUS, 1)];
    assert!(!plan(&dev, &mem, &segs).sync_after(), "reads never sync");
}

// ---------------------------------------------------------------------------
// Well-formed requests.

#[test]
fn read_with_separate_descriptors() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 8));
    let segs = [R(HDR, 16), W(DATA, 4096), W(STATUS, 1)];
    let req = plan(&dev, &mem, &segs);
    assert_eq!(
        req.op(),
        BlkOp::Read {
            offset: 4096,
            len: 4096
        }
    );
    assert_eq!(req.data(), &[W(DATA, 4096)]);
    assert_eq!(req.status_addr(), Some(STATUS));
    assert_eq!(req.used_len(BlkStatus::Ok), 4097);
    assert_eq!(req.used_len(BlkStatus::IoErr), 1);
    // Scatter the disk bytes in and the status.
    let disk: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    req.write_data(&mem.writer(), 0, &disk).unwrap();
    req.write_status(&mem.writer(), BlkStatus::Ok).unwrap();
    assert_eq!(mem.get(DATA, 4096), disk);
    assert_eq!(mem.get(STATUS, 1), [0]);
}

#[test]
fn read_status_shares_the_last_data_descriptor() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    let segs = [R(HDR, 16), W(DATA, 512), W(0x3000, 513)];
    let req = plan(&dev, &mem, &segs);
    assert_eq!(
        req.op(),
        BlkOp::Read {
            offset: 0,
            len: 1024
        }
    );
    assert_eq!(req.data(), &[W(DATA, 512), W(0x3000, 512)]);
    assert_eq!(req.status_addr(), Some(0x3000 + 512));
    let src = [0x5a; 1024];
    req.write_data(&mem.writer(), 0, &src).unwrap();
    req.write_status(&mem.writer(), BlkStatus::Ok).unwrap();
    assert_eq!(mem.get(0x3000, 513)[..512], [0x5a; 512]);
    assert_eq!(mem.get(0x3000 + 512, 1), [0]);
    // A copy past the data is refused.
    assert_eq!(
        req.write_data(&mem.writer(), 1000, &[0; 25]),
        Err(DataError::Short)
    );
}

#[test]
fn header_spread_over_three_descriptors() {
    let dev = device(&full_config());
    let mem = Mem::new();
    let h = hdr(VIRTIO_BLK_T_IN, 3);
    mem.put(0x200, &h[..5]);
    mem.put(0x300, &h[5..12]);
    mem.put(0x400, &h[12..]);
    let segs = [R(0x200, 5), R(0x300, 7), R(0x400, 4), W(DATA, 513)];
    let req = plan(&dev, &mem, &segs);
    assert_eq!(
        req.op(),
        BlkOp::Read {
            offset: 1536,
            len: 512
        }
    );
    assert_eq!(req.data(), &[W(DATA, 512)]);
    assert_eq!(req.status_addr(), Some(DATA + 512));
}

#[test]
fn write_with_header_and_data_in_one_descriptor() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 1));
    mem.put(HDR + 16, &[0x11; 1024]);
    let segs = [R(HDR, 16 + 1024), W(STATUS, 1)];
    let req = plan(&dev, &mem, &segs);
    assert_eq!(
        req.op(),
        BlkOp::Write {
            offset: 512,
            len: 1024
        }
    );
    assert_eq!(req.data(), &[R(HDR + 16, 1024)]);
    let mut buf = [0u8; 1024];
    req.read_data(&mem.reader(), 0, &mut buf).unwrap();
    assert_eq!(buf, [0x11; 1024]);
    assert_eq!(req.used_len(BlkStatus::Ok), 1);
}

#[test]
fn write_gathers_many_segments_in_chunks() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 0));
    // Header split with the first data piece; odd sized pieces.
    mem.put(0x2000, &[1; 100]);
    mem.put(0x3000, &[2; 900]);
    mem.put(0x4000, &[3; 24]);
    let segs = [
        R(HDR, 16),
        R(0x2000, 100),
        R(0x3000, 900),
        R(0x4000, 24),
        W(STATUS, 1),
    ];
    let req = plan(&dev, &mem, &segs);
    assert_eq!(
        req.op(),
        BlkOp::Write {
            offset: 0,
            len: 1024
        }
    );
    assert_eq!(req.data().len(), 3);
    // Gather in two chunks across the segment boundaries.
    let mut a = [0u8; 600];
    let mut b = [0u8; 424];
    req.read_data(&mem.reader(), 0, &mut a).unwrap();
    req.read_data(&mem.reader(), 600, &mut b).unwrap();
    assert_eq!(a[..100], [1; 100]);
    assert_eq!(a[100..], [2; 500]);
    assert_eq!(b[..400], [2; 400]);
    assert_eq!(b[400..], [3; 24]);
    assert_eq!(
        req.read_data(&mem.reader(), 1024, &mut [0u8; 1]),
        Err(DataError::Short)
    );
}

#[test]
fn zero_length_read_and_empty_segments() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 2048));
    // Zero-length descriptors anywhere are ignored (even "readable after
    // writable" ones); a zero-length read at the very end is in range.
    let segs = [R(HDR, 16), R(0x50, 0), W(DATA, 0), W(STATUS, 1), R(0x60, 0)];
    let req = plan(&dev, &mem, &segs);
    assert_eq!(
        req.op(),
        BlkOp::Read {
            offset: 2048 * 512,
            len: 0
        }
    );
    assert!(req.data().is_empty());
    assert_eq!(req.used_len(BlkStatus::Ok), 1);
}

#[test]
fn flush_is_planned_when_negotiated() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_FLUSH, 0));
    let req = plan(&dev, &mem, &[R(HDR, 16), W(STATUS, 1)]);
    assert_eq!(req.op(), BlkOp::Flush);
    assert!(!req.sync_after());
    assert_eq!(req.used_len(BlkStatus::Ok), 1);
}

#[test]
fn flush_on_a_read_only_device_is_fine() {
    let mut c = full_config();
    c.read_only = true;
    let dev = device(&c);
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_FLUSH, 0));
    assert_eq!(
        plan(&dev, &mem, &[R(HDR, 16), W(STATUS, 1)]).op(),
        BlkOp::Flush
    );
}

#[test]
fn get_id_returns_the_padded_serial() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_GET_ID, 0));
    let segs = [R(HDR, 16), W(DATA, 20), W(STATUS, 1)];
    let req = plan(&dev, &mem, &segs);
    assert_eq!(req.op(), BlkOp::GetId { len: 20 });
    let id = dev.serial();
    req.write_data(&mem.writer(), 0, &id[..]).unwrap();
    assert_eq!(mem.get(DATA, 20), b"vhu-serial-0001\0\0\0\0\0");
    assert_eq!(req.used_len(BlkStatus::Ok), 21);
}

#[test]
fn get_id_is_truncated_to_the_buffer_and_to_20_bytes() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_GET_ID, 0));
    // 8-byte buffer sharing the status descriptor.
    let req = plan(&dev, &mem, &[R(HDR, 16), W(DATA, 9)]);
    assert_eq!(req.op(), BlkOp::GetId { len: 8 });
    assert_eq!(req.data(), &[W(DATA, 8)]);
    assert_eq!(req.status_addr(), Some(DATA + 8));
    // A 64-byte buffer gets 20 bytes, over two descriptors.
    let req = plan(&dev, &mem, &[R(HDR, 16), W(DATA, 12), W(0x2000, 53)]);
    assert_eq!(req.op(), BlkOp::GetId { len: 20 });
    assert_eq!(req.data(), &[W(DATA, 12), W(0x2000, 8)]);
    assert_eq!(req.status_addr(), Some(0x2000 + 52));
    assert_eq!(req.used_len(BlkStatus::Ok), 21);
}

#[test]
fn discard_ranges_are_copied_and_validated() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_DISCARD, 0));
    mem.put(DATA, &range_bytes(8, 16, 0));
    mem.put(DATA + 16, &range_bytes(100, 0, 0)); // empty: dropped
    mem.put(DATA + 32, &range_bytes(2040, 8, 0)); // up to the end
    let segs = [R(HDR, 16), R(DATA, 48), W(STATUS, 1)];
    let req = plan(&dev, &mem, &segs);
    assert_eq!(req.op(), BlkOp::Discard);
    assert_eq!(
        req.ranges(),
        &[
            BlkRange {
                offset: 4096,
                len: 8192,
                unmap: false
            },
            BlkRange {
                offset: 2040 * 512,
                len: 4096,
                unmap: false
            },
        ]
    );
    assert!(req.data().is_empty());
    assert!(!req.sync_after());
    assert_eq!(req.used_len(BlkStatus::Ok), 1);
}

#[test]
fn write_zeroes_ranges_split_across_descriptors() {
    let dev = device(&full_config());
    let mem = Mem::new();
    let mut payload = Vec::new();
    payload.extend_from_slice(&hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0));
    payload.extend_from_slice(&range_bytes(0, 512, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
    payload.extend_from_slice(&range_bytes(1024, 1, 0));
    // 48 bytes spread as 20 + 20 + 8.
    mem.put(0x2000, &payload[..20]);
    mem.put(0x3000, &payload[20..40]);
    mem.put(0x4000, &payload[40..]);
    let segs = [R(0x2000, 20), R(0x3000, 20), R(0x4000, 8), W(STATUS, 1)];
    let req = plan(&dev, &mem, &segs);
    assert_eq!(req.op(), BlkOp::WriteZeroes);
    assert_eq!(
        req.ranges(),
        &[
            BlkRange {
                offset: 0,
                len: 512 * 512,
                unmap: true
            },
            BlkRange {
                offset: 1024 * 512,
                len: 512,
                unmap: false
            },
        ]
    );
}

#[test]
fn write_zeroes_unmap_needs_may_unmap() {
    let mut c = full_config();
    c.write_zeroes = Some(WriteZeroesLimits {
        max_sectors: 8,
        max_seg: 1,
        may_unmap: false,
    });
    let dev = device(&c);
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0));
    mem.put(DATA, &range_bytes(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
    let req = plan(&dev, &mem, &[R(HDR, 16), R(DATA, 16), W(STATUS, 1)]);
    assert_eq!(req.op(), BlkOp::WriteZeroes);
    assert!(!req.ranges()[0].unmap);
}

#[test]
fn plan_reuse_clears_the_previous_request() {
    let dev = device(&full_config());
    let mem = Mem::new();
    let mut req: BlkRequest<8, 4> = BlkRequest::new();
    assert_eq!(req.status_addr(), None);
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    dev.plan_into(&[R(HDR, 16), W(DATA, 513)], &mem.reader(), &mut req);
    assert_eq!(req.data().len(), 1);
    mem.put(HDR, &hdr(VIRTIO_BLK_T_DISCARD, 0));
    mem.put(DATA, &range_bytes(0, 1, 0));
    dev.plan_into(
        &[R(HDR, 16), R(DATA, 16), W(STATUS, 1)],
        &mem.reader(),
        &mut req,
    );
    assert_eq!(req.op(), BlkOp::Discard);
    assert!(req.data().is_empty());
    assert_eq!(req.data_len(), 0);
    assert_eq!(req.ranges().len(), 1);
    mem.put(HDR, &hdr(99, 0));
    dev.plan_into(
        &[R(HDR, 16), R(DATA, 16), W(STATUS, 1)],
        &mem.reader(),
        &mut req,
    );
    assert!(req.ranges().is_empty());
}

// ---------------------------------------------------------------------------
// Malformed requests: each yields IOERR (or UNSUPP), never a panic.

#[test]
fn unknown_types_are_unsupported() {
    let dev = device(&full_config());
    let mem = Mem::new();
    for ty in [
        2,
        3,
        VIRTIO_BLK_T_GET_LIFETIME,
        VIRTIO_BLK_T_SECURE_ERASE,
        15,
        16,
        26,
        0x8000_0000,
        u32::MAX,
    ] {
        mem.put(HDR, &hdr(ty, 0));
        assert_fails(
            &dev,
            &mem,
            &[R(HDR, 16), W(STATUS, 1)],
            BlkError::UnknownType(ty),
        );
        assert_eq!(BlkError::UnknownType(ty).status(), BlkStatus::Unsupp);
    }
}

#[test]
fn no_writable_byte_means_no_status() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    for segs in [
        &[R(HDR, 16)][..],
        &[R(HDR, 16), R(DATA, 512)][..],
        &[R(HDR, 16), W(STATUS, 0)][..],
        &[][..],
    ] {
        let req = plan(&dev, &mem, segs);
        assert_eq!(fail(&req), (BlkStatus::IoErr, BlkError::NoStatus));
        assert_eq!(req.status_addr(), None);
        assert_eq!(req.used_len(BlkStatus::IoErr), 0);
        // Writing the status is a no-op, not an error.
        let never = |_: u64, _: &[u8]| -> Result<(), ()> { panic!("no write expected") };
        req.write_status(&never, BlkStatus::IoErr).unwrap();
    }
}

#[test]
fn header_shorter_than_16_bytes() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 15), W(STATUS, 1)],
        BlkError::HeaderTooShort,
    );
    assert_fails(&dev, &mem, &[W(STATUS, 1)], BlkError::HeaderTooShort);
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 8), R(HDR + 8, 7), W(STATUS, 1)],
        BlkError::HeaderTooShort,
    );
}

#[test]
fn readable_after_writable_is_refused() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 0));
    // The status is still the last byte of the last writable descriptor.
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), W(STATUS, 1), R(DATA, 512)],
        BlkError::BadOrder,
    );
}

#[test]
fn address_overflow_is_refused() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), W(u64::MAX - 10, 512), W(STATUS, 1)],
        BlkError::AddressOverflow,
    );
    // The last byte of the status descriptor itself overflows: no status.
    let req = plan(&dev, &mem, &[R(HDR, 16), W(u64::MAX, 2)]);
    assert_eq!(fail(&req).1, BlkError::AddressOverflow);
    assert_eq!(req.status_addr(), None);
    assert_eq!(req.used_len(BlkStatus::IoErr), 0);
    // A status descriptor ending exactly at 2^64 still has a status byte.
    let req = plan(&dev, &mem, &[R(HDR, 16), W(u64::MAX, 1)]);
    assert_eq!(fail(&req).1, BlkError::AddressOverflow);
    assert_eq!(req.status_addr(), Some(u64::MAX));
}

#[test]
fn unreadable_header_is_an_io_error() {
    let dev = device(&full_config());
    let mem = Mem::new();
    assert_fails(
        &dev,
        &mem,
        &[R(MEM_SIZE as u64 - 8, 16), W(STATUS, 1)],
        BlkError::GuestMemory,
    );
}

#[test]
fn read_with_readable_data_is_refused() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), R(DATA, 512), W(STATUS, 1)],
        BlkError::WrongDirection,
    );
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16 + 512), W(STATUS, 1)],
        BlkError::WrongDirection,
    );
}

#[test]
fn write_with_writable_data_is_refused() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), W(DATA, 512), W(STATUS, 1)],
        BlkError::WrongDirection,
    );
    // Status descriptor longer than one byte: writable data for an OUT.
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), R(DATA, 512), W(STATUS, 2)],
        BlkError::WrongDirection,
    );
}

#[test]
fn get_id_with_readable_data_is_refused() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_GET_ID, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 20), W(DATA, 20), W(STATUS, 1)],
        BlkError::WrongDirection,
    );
}

#[test]
fn data_length_must_be_a_multiple_of_512() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), W(DATA, 511), W(STATUS, 1)],
        BlkError::BadLength(511),
    );
    mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), R(DATA, 700), W(STATUS, 1)],
        BlkError::BadLength(700),
    );
}

#[test]
fn requests_beyond_capacity_or_overflowing_are_refused() {
    let dev = device(&full_config()); // 2048 sectors
    let mem = Mem::new();
    for (ty, sector, len) in [
        (VIRTIO_BLK_T_IN, 2048, 512),     // starts at the end
        (VIRTIO_BLK_T_IN, 2047, 1024),    // ends one sector beyond
        (VIRTIO_BLK_T_OUT, 4096, 512),    // far beyond
        (VIRTIO_BLK_T_IN, u64::MAX, 512), // sector + len overflows
        (VIRTIO_BLK_T_OUT, 1 << 60, 512), // sector * 512 overflows
        (VIRTIO_BLK_T_IN, 2049, 0),       // empty but past the end
    ] {
        mem.put(HDR, &hdr(ty, sector));
        let data = if ty == VIRTIO_BLK_T_IN {
            W(DATA, len)
        } else {
            R(DATA, len)
        };
        assert_fails(
            &dev,
            &mem,
            &[R(HDR, 16), data, W(STATUS, 1)],
            BlkError::OutOfRange,
        );
    }
    // Huge capacity (migration): sector * 512 overflow is still caught.
    let mut dev = dev;
    dev.write_config(0, &u64::MAX.to_le_bytes(), ConfigWriteKind::Migration)
        .unwrap();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 1 << 60));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), W(DATA, 512), W(STATUS, 1)],
        BlkError::OutOfRange,
    );
}

#[test]
fn requests_must_align_to_a_negotiated_block_size() {
    let mut c = full_config();
    c.blk_size = 4096;
    let dev = device(&c);
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 1));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), W(DATA, 4096), W(STATUS, 1)],
        BlkError::Misaligned,
    );
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 8));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), W(DATA, 512), W(STATUS, 1)],
        BlkError::Misaligned,
    );
    let ok = plan(&dev, &mem, &[R(HDR, 16), W(DATA, 4096), W(STATUS, 1)]);
    assert_eq!(
        ok.op(),
        BlkOp::Read {
            offset: 4096,
            len: 4096
        }
    );
    // Without BLK_SIZE negotiated the driver only knows 512-byte sectors.
    let mut dev = BlkDevice::new(&c).unwrap();
    dev.set_features(BlkFeatures::FLUSH.to_virtio());
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 1));
    let req = plan(&dev, &mem, &[R(HDR, 16), W(DATA, 512), W(STATUS, 1)]);
    assert_eq!(
        req.op(),
        BlkOp::Read {
            offset: 512,
            len: 512
        }
    );
    // Discard ranges too.
    let dev = device(&c);
    mem.put(HDR, &hdr(VIRTIO_BLK_T_DISCARD, 0));
    mem.put(DATA, &range_bytes(4, 8, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), R(DATA, 16), W(STATUS, 1)],
        BlkError::Misaligned,
    );
}

#[test]
fn writes_to_a_read_only_device_fail() {
    let mut c = full_config();
    c.read_only = true;
    let dev = device(&c);
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), R(DATA, 512), W(STATUS, 1)],
        BlkError::ReadOnly,
    );
    mem.put(DATA, &range_bytes(0, 1, 0));
    for ty in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        mem.put(HDR, &hdr(ty, 0));
        assert_fails(
            &dev,
            &mem,
            &[R(HDR, 16), R(DATA, 16), W(STATUS, 1)],
            BlkError::ReadOnly,
        );
    }
    assert_eq!(BlkError::ReadOnly.status(), BlkStatus::IoErr);
    // Reads still work.
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    let req = plan(&dev, &mem, &[R(HDR, 16), W(DATA, 512), W(STATUS, 1)]);
    assert_eq!(
        req.op(),
        BlkOp::Read {
            offset: 0,
            len: 512
        }
    );
}

#[test]
fn features_not_negotiated_are_unsupported() {
    let mut dev = BlkDevice::new(&full_config()).unwrap();
    dev.set_features(VirtioFeatures::VERSION_1);
    let mem = Mem::new();
    mem.put(DATA, &range_bytes(0, 1, 0));
    for ty in [
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        mem.put(HDR, &hdr(ty, 0));
        assert_fails(
            &dev,
            &mem,
            &[R(HDR, 16), R(DATA, 16), W(STATUS, 1)],
            BlkError::NotNegotiated(ty),
        );
    }
    // FLUSH never offered: the same.
    let mut c = BlkConfig::new(8);
    c.flush = false;
    c.config_wce = false;
    let dev = device(&c);
    mem.put(HDR, &hdr(VIRTIO_BLK_T_FLUSH, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), W(STATUS, 1)],
        BlkError::NotNegotiated(VIRTIO_BLK_T_FLUSH),
    );
}

#[test]
fn too_many_data_segments() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    // More pieces than the plan holds.
    let segs: Vec<Segment> = core::iter::once(R(HDR, 16))
        .chain((0..5).map(|i| W(DATA + i * 512, 512)))
        .chain([W(STATUS, 1)])
        .collect();
    let mut small: BlkRequest<4, 1> = BlkRequest::new();
    dev.plan_into(&segs, &mem.reader(), &mut small);
    assert_eq!(
        small.op(),
        BlkOp::Fail {
            status: BlkStatus::IoErr,
            error: BlkError::TooManySegments
        }
    );
    assert!(small.data().is_empty());
    assert_eq!(small.status_addr(), Some(STATUS));
    // Exactly at capacity is fine.
    dev.plan_into(&segs[1..], &mem.reader(), &mut small);
    assert!(matches!(small.op(), BlkOp::Fail { .. }), "header missing");
    let segs4: Vec<Segment> = segs[..5].iter().copied().chain([W(STATUS, 1)]).collect();
    dev.plan_into(&segs4, &mem.reader(), &mut small);
    assert_eq!(
        small.op(),
        BlkOp::Read {
            offset: 0,
            len: 2048
        }
    );
    // More than the negotiated seg_max.
    let mut c = full_config();
    c.seg_max = 3;
    let dev = device(&c);
    assert_fails(&dev, &mem, &segs4, BlkError::TooManySegments);
    // seg_max not negotiated: no limit but the plan's.
    let mut dev = BlkDevice::new(&c).unwrap();
    dev.set_features(BlkFeatures::FLUSH.to_virtio());
    assert_eq!(
        plan(&dev, &mem, &segs4).op(),
        BlkOp::Read {
            offset: 0,
            len: 2048
        }
    );
}

#[test]
fn discard_payload_must_be_whole_ranges() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_DISCARD, 0));
    mem.put(DATA, &[0; 64]);
    for len in [0u32, 15, 17, 31] {
        let segs = if len == 0 {
            vec![R(HDR, 16), W(STATUS, 1)]
        } else {
            vec![R(HDR, 16), R(DATA, len), W(STATUS, 1)]
        };
        assert_fails(&dev, &mem, &segs, BlkError::BadRanges);
    }
}

#[test]
fn too_many_ranges() {
    let dev = device(&full_config()); // max_discard_seg 4, max_write_zeroes_seg 2
    let mem = Mem::new();
    for i in 0..5 {
        mem.put(DATA + 16 * i, &range_bytes(i, 1, 0));
    }
    mem.put(HDR, &hdr(VIRTIO_BLK_T_DISCARD, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), R(DATA, 80), W(STATUS, 1)],
        BlkError::TooManyRanges,
    );
    let ok = plan(&dev, &mem, &[R(HDR, 16), R(DATA, 64), W(STATUS, 1)]);
    assert_eq!(ok.ranges().len(), 4);
    mem.put(HDR, &hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), R(DATA, 48), W(STATUS, 1)],
        BlkError::TooManyRanges,
    );
    // The plan's own capacity.
    let mut small: BlkRequest<4, 1> = BlkRequest::new();
    dev.plan_into(
        &[R(HDR, 16), R(DATA, 32), W(STATUS, 1)],
        &mem.reader(),
        &mut small,
    );
    assert_eq!(
        small.op(),
        BlkOp::Fail {
            status: BlkStatus::IoErr,
            error: BlkError::TooManyRanges
        }
    );
}

#[test]
fn ranges_longer_than_the_limit() {
    let dev = device(&full_config()); // discard 1024, write zeroes 512 sectors
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_DISCARD, 0));
    mem.put(DATA, &range_bytes(0, 1025, 0));
    let segs = [R(HDR, 16), R(DATA, 16), W(STATUS, 1)];
    assert_fails(&dev, &mem, &segs, BlkError::RangeTooLong);
    mem.put(HDR, &hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0));
    mem.put(DATA, &range_bytes(0, 513, 0));
    assert_fails(&dev, &mem, &segs, BlkError::RangeTooLong);
}

#[test]
fn ranges_beyond_capacity() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0));
    let segs = [R(HDR, 16), R(DATA, 32), W(STATUS, 1)];
    mem.put(DATA, &range_bytes(0, 1, 0));
    for bad in [
        range_bytes(2048, 1, 0),
        range_bytes(2047, 2, 0),
        range_bytes(u64::MAX, 1, 0),
        range_bytes(u64::MAX, 0, 0),
    ] {
        // The bad range is the second one: nothing of the first survives.
        mem.put(DATA + 16, &bad);
        assert_fails(&dev, &mem, &segs, BlkError::OutOfRange);
    }
}

#[test]
fn range_flags_are_checked() {
    let dev = device(&full_config());
    let mem = Mem::new();
    let segs = [R(HDR, 16), R(DATA, 16), W(STATUS, 1)];
    // UNMAP on a discard: UNSUPP.
    mem.put(HDR, &hdr(VIRTIO_BLK_T_DISCARD, 0));
    mem.put(DATA, &range_bytes(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
    assert_fails(&dev, &mem, &segs, BlkError::BadFlags(1));
    // Unknown flags: UNSUPP, for both types.
    for ty in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        mem.put(HDR, &hdr(ty, 0));
        mem.put(DATA, &range_bytes(0, 1, 0b10));
        assert_fails(&dev, &mem, &segs, BlkError::BadFlags(2));
        mem.put(DATA, &range_bytes(0, 1, 0x8000_0001));
        assert_fails(&dev, &mem, &segs, BlkError::BadFlags(0x8000_0001));
    }
    assert_eq!(BlkError::BadFlags(2).status(), BlkStatus::Unsupp);
}

#[test]
fn discard_with_writable_data_is_refused() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_DISCARD, 0));
    mem.put(DATA, &range_bytes(0, 1, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), R(DATA, 16), W(0x3000, 16), W(STATUS, 1)],
        BlkError::WrongDirection,
    );
}

#[test]
fn unreadable_ranges_are_an_io_error() {
    let dev = device(&full_config());
    let mem = Mem::new();
    mem.put(HDR, &hdr(VIRTIO_BLK_T_DISCARD, 0));
    assert_fails(
        &dev,
        &mem,
        &[R(HDR, 16), R(MEM_SIZE as u64 - 4, 16), W(STATUS, 1)],
        BlkError::GuestMemory,
    );
}

#[test]
fn errors_display() {
    let msgs = [
        BlkError::NoStatus.to_string(),
        BlkError::BadLength(7).to_string(),
        BlkError::UnknownType(99).to_string(),
        BlkConfigError::OutOfRange { offset: 1, len: 2 }.to_string(),
        DataError::Guest("x").to_string(),
    ];
    assert!(msgs[1].contains('7'));
    assert!(msgs[2].contains("99"));
    assert!(msgs.iter().all(|m| !m.is_empty()));
}

// ---------------------------------------------------------------------------
// Properties: arbitrary chains and memory never panic, and every plan's
// data lies inside the chain, in the right direction, summing to its length.

fn seg() -> impl Strategy<Value = Segment> {
    (0u64..0x3000, 0u32..1200, any::<bool>(), any::<bool>()).prop_map(|(a, l, w, far)| Segment {
        addr: if far { u64::MAX - a } else { a },
        len: l,
        writable: w,
    })
}

proptest! {
    #[test]
    fn planner_never_panics_and_plans_inside_the_chain(
        segs in proptest::collection::vec(seg(), 0..10),
        ty in prop_oneof![0u32..16, any::<u32>()],
        sector in prop_oneof![0u64..2100, any::<u64>()],
        junk in proptest::collection::vec(any::<u8>(), 0..256),
        ro in any::<bool>(),
        acked in any::<u64>(),
    ) {
        let mut c = full_config();
        c.read_only = ro;
        let mut dev = BlkDevice::new(&c).unwrap();
        dev.set_features(VirtioFeatures::from_bits_retain(acked));
        let mem = Mem::new();
        // The header at every readable segment start, junk after it.
        for s in &segs {
            if s.addr < 0x3000 {
                mem.put(s.addr, &hdr(ty, sector));
                mem.put(s.addr + 16, &junk);
            }
        }
        let mut req: BlkRequest<4, 2> = BlkRequest::new();
        dev.plan_into(&segs, &mem.reader(), &mut req);
        let has_writable = segs.iter().any(|s| s.writable && s.len > 0);
        if req.status_addr().is_none() {
            let expected = if has_writable {
                BlkError::AddressOverflow
            } else {
                BlkError::NoStatus
            };
            prop_assert_eq!(
                req.op(),
                BlkOp::Fail { status: BlkStatus::IoErr, error: expected }
            );
        }
        let total: u64 = req.data().iter().map(|s| u64::from(s.len)).sum();
        prop_assert_eq!(total, req.data_len());
        for d in req.data() {
            prop_assert!(d.len > 0);
            prop_assert!(segs.iter().any(|s| s.writable == d.writable
                && s.addr <= d.addr
                && d.addr + u64::from(d.len) <= s.addr + u64::from(s.len)));
            prop_assert_ne!(Some(d.addr + u64::from(d.len) - 1), req.status_addr());
        }
        match req.op() {
            BlkOp::Read { offset, len } | BlkOp::Write { offset, len } => {
                prop_assert_eq!(len, total);
                prop_assert_eq!(len % 512, 0);
                prop_assert!(offset + len <= dev.capacity() * 512);
                let is_write = matches!(req.op(), BlkOp::Write { .. });
                prop_assert!(!(ro && is_write));
            }
            BlkOp::GetId { len } => prop_assert_eq!(u64::from(len), total),
            BlkOp::Discard | BlkOp::WriteZeroes => {
                prop_assert!(!ro);
                for r in req.ranges() {
                    prop_assert!(r.len > 0 && r.offset + r.len <= dev.capacity() * 512);
                }
            }
            BlkOp::Flush => {}
            BlkOp::Fail { status, error } => {
                prop_assert_eq!(status, error.status());
                prop_assert!(req.data().is_empty() && req.ranges().is_empty());
            }
        }
    }
}

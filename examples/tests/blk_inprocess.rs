//! The vhost-user-blk device end to end in one process: this file plays the
//! front-end (messages into the core's back-end session) and the Linux
//! runtime (popping chains and handing them to `BlkService`), while
//! `adapter-test`'s memory and drivers play the guest. Every virtio-blk
//! request type, on split and packed rings, direct and indirect, against a
//! real image file that the test reads back from the host side.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;

use vhost_user_core::backend::{Action, BackendConfig, Reply, Session};
use vhost_user_core::dataplane::DataPlane;
use vhost_user_core::device::blk::{
    BlkConfig, BlkDevice, DiscardLimits, WriteZeroesLimits, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{
    Header, MemTable, ParseOptions, Reply as WireReply, Request, VringAddrMsg, VringFdMsg,
    VringStateMsg, HEADER_SIZE, MAX_MESSAGE,
};
use vhost_user_core::vring::{Chain, RingAddrs};
use vhost_user_test::{region, Buf, PackedDriver, SplitDriver, TestMemory, USER_ADDR_OFFSET};
use vhu_examples::blk::{BlkService, FileBackend, Scratch, TempImage};

const MIB: u64 = 1 << 20;
const IMAGE: u64 = 4 * MIB;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

enum Driver {
    Split(SplitDriver),
    Packed(PackedDriver),
}

struct Rig {
    session: Session<2, 8>,
    mem: TestMemory,
    service: BlkService<FileBackend>,
    _image: TempImage,
    file: std::fs::File,
    ring: Option<DataPlane>,
    driver: Driver,
    indirect: bool,
    scratch: Scratch,
    serial: &'static [u8],
}

fn device(read_only: bool, serial: &[u8]) -> BlkDevice {
    let mut c = BlkConfig::new(IMAGE / 512);
    c.read_only = read_only;
    c.seg_max = 62;
    c.discard = Some(DiscardLimits {
        max_sectors: 1 << 20,
        max_seg: 1,
        sector_alignment: 8,
    });
    c.write_zeroes = Some(WriteZeroesLimits {
        max_sectors: 1 << 20,
        max_seg: 1,
        may_unmap: true,
    });
    c.set_serial(serial);
    BlkDevice::new(&c).unwrap()
}

impl Rig {
    fn new(packed: bool, indirect: bool, read_only: bool) -> Rig {
        let image = TempImage::new(IMAGE).unwrap();
        let backend = image.open(read_only).unwrap();
        let file = std::fs::File::open(image.path()).unwrap();
        let serial: &'static [u8] = b"inprocess-serial";
        let dev = device(read_only, serial);
        let offered = dev.offered_features()
            | V::VERSION_1
            | V::PROTOCOL_FEATURES
            | V::INDIRECT_DESC
            | V::RING_PACKED
            | V::EVENT_IDX;
        let service = BlkService::new(dev, backend, 1);
        let config = BackendConfig {
            features: offered,
            protocol_features: P::MQ | P::REPLY_ACK | P::CONFIG | P::STATUS,
            num_queues: 1,
            max_queue_size: 256,
        };
        // Two regions, so requests can straddle the boundary at 1 MiB.
        let mem = TestMemory::new(&[(0, MIB), (MIB, MIB)]).unwrap();
        let (driver, user) = if packed {
            let d = PackedDriver::new(&mem, 64, 0x1000).unwrap();
            let a = d.addrs();
            let user = RingAddrs {
                desc: a.desc + USER_ADDR_OFFSET,
                driver: a.driver + USER_ADDR_OFFSET,
                device: a.device + USER_ADDR_OFFSET,
            };
            (Driver::Packed(d), user)
        } else {
            let d = SplitDriver::new(&mem, 64, 0x1000, false).unwrap();
            let user = d.user_addrs();
            (Driver::Split(d), user)
        };
        let mut rig = Rig {
            session: Session::new(config).unwrap(),
            mem,
            service,
            _image: image,
            file,
            ring: None,
            driver,
            indirect,
            scratch: Scratch::default(),
            serial,
        };
        // QEMU's start, acked feature by feature.
        let features = rig.u64_reply(Request::GetFeatures);
        assert_eq!(features, offered.bits());
        let proto = rig.u64_reply(Request::GetProtocolFeatures);
        rig.send(Request::SetProtocolFeatures(proto));
        rig.send(Request::SetOwner);
        let mut want = offered & !V::EVENT_IDX;
        if !packed {
            want &= !V::RING_PACKED;
        }
        rig.send(Request::SetFeatures(want.bits()));
        let t = [region(0, MIB), region(MIB, MIB)];
        rig.send(Request::SetMemTable(MemTable::new(&t).unwrap()));
        rig.send(Request::SetVringNum(VringStateMsg { index: 0, num: 64 }));
        let base = if packed { 1 << 15 | 1 << 31 } else { 0 };
        rig.send(Request::SetVringBase(VringStateMsg {
            index: 0,
            num: base,
        }));
        rig.send(Request::SetVringAddr(VringAddrMsg {
            index: 0,
            log: false,
            desc: user.desc,
            used: user.device,
            avail: user.driver,
            log_addr: 0,
        }));
        rig.send(Request::SetVringKick(VringFdMsg {
            index: 0,
            no_fd: false,
        }));
        rig.send(Request::SetVringEnable {
            index: 0,
            enable: true,
        });
        assert!(rig.ring.is_some(), "SET_VRING_KICK started the ring");
        rig
    }

    fn send(&mut self, req: Request<'_>) -> Vec<u8> {
        let mut msg = [0u8; MAX_MESSAGE];
        let n = req.encode(false, &mut msg).unwrap();
        let h = Header::parse(&msg[..n]).unwrap();
        let mut out = [0u8; MAX_MESSAGE];
        let o = self
            .session
            .handle(
                &h,
                &msg[HEADER_SIZE..n],
                req.fd_rule().min as usize,
                &self.mem,
                &mut self.service,
                &mut out,
            )
            .unwrap();
        assert!(
            o.refused.is_none(),
            "{:?} refused: {:?}",
            req.code(),
            o.refused
        );
        for a in &o.actions {
            if let Action::StartRing { queue } = a {
                let dp = self
                    .session
                    .start_ring(*queue, &self.mem, None, false)
                    .unwrap();
                self.ring = Some(dp);
            }
            if let (Action::SetEnabled { enabled, .. }, Some(dp)) = (a, self.ring.as_mut()) {
                dp.set_enabled(*enabled);
            }
        }
        match o.reply {
            Reply::Ready(n) => out[..n].to_vec(),
            _ => Vec::new(),
        }
    }

    fn u64_reply(&mut self, req: Request<'_>) -> u64 {
        let code = req.code();
        let r = self.send(req);
        let h = Header::parse(&r).unwrap();
        match WireReply::parse(code, &h, &r[HEADER_SIZE..], 0, &ParseOptions::default()).unwrap() {
            WireReply::U64(v) => v,
            other => panic!("{other:?}"),
        }
    }

    /// Posts one request, lets the device process everything available,
    /// and returns the used length.
    fn request(&mut self, bufs: &[Buf]) -> u32 {
        let table = 0x3000;
        match (&mut self.driver, self.indirect) {
            (Driver::Split(d), false) => {
                d.post(&self.mem, bufs).unwrap();
            }
            (Driver::Split(d), true) => {
                d.add_indirect(&self.mem, table, bufs).unwrap();
                d.publish(&self.mem).unwrap();
            }
            (Driver::Packed(d), false) => {
                d.post(&self.mem, bufs).unwrap();
            }
            (Driver::Packed(d), true) => {
                d.post_indirect(&self.mem, table, bufs).unwrap();
            }
        }
        // The runtime's worker: pop, process, complete, publish.
        let ring = self.ring.as_mut().unwrap();
        let mut chain: Chain = Chain::new();
        let mut n = 0;
        while let Some(token) = ring.pop(&self.mem, None, &mut chain).unwrap() {
            let c = self
                .service
                .process(0, &chain, token, &self.mem, &mut self.scratch);
            let Completion::Done(len) = c else {
                panic!("the service completes at once")
            };
            ring.complete(&self.mem, None, token, len).unwrap();
            n += 1;
        }
        assert_eq!(n, 1, "one chain per request");
        ring.publish(&self.mem, None).unwrap();
        let used = match &mut self.driver {
            Driver::Split(d) => d.harvest(&self.mem).unwrap(),
            Driver::Packed(d) => d.harvest(&self.mem).unwrap(),
        };
        used.expect("the request completed").len
    }

    fn status(&self) -> u8 {
        self.mem.read_vec(STATUS, 1).unwrap()[0]
    }

    fn host_read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.file.read_exact_at(&mut b, offset).unwrap();
        b
    }
}

const HDR: u64 = 0x8000;
const STATUS: u64 = 0x8100;
const RANGES: u64 = 0x8200;

fn hdr(mem: &TestMemory, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write(HDR, &h).unwrap();
    mem.write(STATUS, &[0xff]).unwrap();
}

fn range(mem: &TestMemory, sector: u64, num: u32, flags: u32) {
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&num.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write(RANGES, &r).unwrap();
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Every request type on one ring flavour.
fn every_request_type(packed: bool, indirect: bool) {
    let mut r = Rig::new(packed, indirect, false);
    // Data straddles the boundary between the two memory regions.
    let data = MIB - 2048;
    let head = Buf::readable(HDR, 16);
    let status = Buf::writable(STATUS, 1);

    // OUT: 8 KiB at sector 8, split over two descriptors.
    let p = pattern(7, 8192);
    r.mem.write(data, &p).unwrap();
    hdr(&r.mem, VIRTIO_BLK_T_OUT, 8);
    let len = r.request(&[
        head,
        Buf::readable(data, 4096),
        Buf::readable(data + 4096, 4096),
        status,
    ]);
    assert_eq!((r.status(), len), (S_OK, 1));
    assert_eq!(r.host_read(8 * 512, 8192), p, "the image holds the write");

    // IN: read it back into a cleared buffer.
    r.mem.write(data, &[0u8; 8192]).unwrap();
    hdr(&r.mem, VIRTIO_BLK_T_IN, 8);
    let len = r.request(&[head, Buf::writable(data, 8192), status]);
    assert_eq!((r.status(), len), (S_OK, 8193));
    assert_eq!(r.mem.read_vec(data, 8192).unwrap(), p);

    // FLUSH.
    hdr(&r.mem, VIRTIO_BLK_T_FLUSH, 0);
    let len = r.request(&[head, status]);
    assert_eq!((r.status(), len), (S_OK, 1));

    // GET_ID: the serial, zero-padded to 20 bytes.
    r.mem.write(0x9000, &[0xaa; 20]).unwrap();
    hdr(&r.mem, VIRTIO_BLK_T_GET_ID, 0);
    let len = r.request(&[head, Buf::writable(0x9000, 20), status]);
    assert_eq!(r.status(), S_OK);
    assert_eq!(len, 21);
    let mut want = r.serial.to_vec();
    want.resize(20, 0);
    assert_eq!(r.mem.read_vec(0x9000, 20).unwrap(), want);

    // WRITE_ZEROES over the first half of what was written.
    range(&r.mem, 8, 8, 0);
    hdr(&r.mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let len = r.request(&[head, Buf::readable(RANGES, 16), status]);
    assert_eq!((r.status(), len), (S_OK, 1));
    assert_eq!(r.host_read(8 * 512, 4096), vec![0u8; 4096]);
    assert_eq!(
        r.host_read(16 * 512, 4096),
        p[4096..],
        "only the range was zeroed"
    );

    // DISCARD of the second half: succeeds; the data may or may not stay.
    range(&r.mem, 16, 8, 0);
    hdr(&r.mem, VIRTIO_BLK_T_DISCARD, 0);
    let len = r.request(&[head, Buf::readable(RANGES, 16), status]);
    assert_eq!((r.status(), len), (S_OK, 1));

    // A read beyond the capacity: IOERR, and no data written.
    r.mem.write(data, &[0x5a; 1024]).unwrap();
    hdr(&r.mem, VIRTIO_BLK_T_IN, IMAGE / 512 - 1);
    let len = r.request(&[head, Buf::writable(data, 1024), status]);
    assert_eq!(r.status(), S_IOERR);
    assert_eq!(len, 1);
    assert_eq!(r.mem.read_vec(data, 1024).unwrap(), vec![0x5a; 1024]);

    // A write whose sector overflows: IOERR, the image unchanged.
    hdr(&r.mem, VIRTIO_BLK_T_OUT, u64::MAX);
    let len = r.request(&[head, Buf::readable(data, 512), status]);
    assert_eq!((r.status(), len), (S_IOERR, 1));

    // An unknown type: UNSUPP.
    hdr(&r.mem, 0x7777, 0);
    let len = r.request(&[head, status]);
    assert_eq!((r.status(), len), (S_UNSUPP, 1));

    // Malformed: a header shorter than 16 bytes. IOERR.
    hdr(&r.mem, VIRTIO_BLK_T_IN, 0);
    let len = r.request(&[Buf::readable(HDR, 8), Buf::writable(data, 512), status]);
    assert_eq!(r.status(), S_IOERR);
    assert_eq!(len, 1);

    let c = r.service.counters(0).unwrap();
    assert_eq!(c.requests.load(std::sync::atomic::Ordering::Relaxed), 10);
}

#[test]
fn split_ring_every_request_type() {
    every_request_type(false, false);
}

#[test]
fn split_ring_indirect_every_request_type() {
    every_request_type(false, true);
}

#[test]
fn packed_ring_every_request_type() {
    every_request_type(true, false);
}

#[test]
fn packed_ring_indirect_every_request_type() {
    every_request_type(true, true);
}

#[test]
fn read_only_device_refuses_writes_and_offers_ro() {
    let mut r = Rig::new(false, false, true);
    let features = r.u64_reply(Request::GetFeatures);
    assert!(features & (1 << 5) != 0, "VIRTIO_BLK_F_RO offered");
    let before = r.host_read(0, 512);
    r.mem.write(0x20000, &[0x11; 512]).unwrap();
    hdr(&r.mem, VIRTIO_BLK_T_OUT, 0);
    let len = r.request(&[
        Buf::readable(HDR, 16),
        Buf::readable(0x20000, 512),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!((r.status(), len), (S_IOERR, 1));
    assert_eq!(r.host_read(0, 512), before);
    // Reads still work.
    hdr(&r.mem, VIRTIO_BLK_T_IN, 0);
    let len = r.request(&[
        Buf::readable(HDR, 16),
        Buf::writable(0x20000, 512),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!((r.status(), len), (S_OK, 513));
}

//! The vhost-user-blk device end to end in one process: `adapter-test`'s
//! [`Pair`] plays the front-end (the core's front-end engine) and the Linux
//! runtime (a back-end host handing each popped chain to `BlkService`),
//! while its memory and drivers play the guest. Every virtio-blk request
//! type, on split and packed rings, direct and indirect, against a real
//! image file that the test reads back from the host side; and requests
//! completed out of order, with the inflight area on.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;

use vhost_user_core::backend::BackendConfig;
use vhost_user_core::dataplane::Token;
use vhost_user_core::device::blk::{
    BlkConfig, BlkDevice, DiscardLimits, WriteZeroesLimits, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use vhost_user_core::device::{Completion, Device, Segment};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{ConfigWriteKind, Request};
use vhost_user_core::vring::Chain;
use vhost_user_linux::aio::AioMode;
use vhost_user_linux::backend::SharedDevice;
use vhost_user_test::{region, Backend, Buf, GuestRing, Pair, RingSpec, TestMemory};
use vhu_examples::blk::{BlkService, CacheMode, FileBackend, Scratch, TempImage};

const MIB: u64 = 1 << 20;
const IMAGE: u64 = 4 * MIB;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

type Service = BlkService<FileBackend>;

struct Rig<D: Device = Service> {
    p: Pair<D, 2, 8>,
    _image: TempImage,
    file: std::fs::File,
    driver: GuestRing,
    indirect: bool,
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
        Rig::with(packed, indirect, read_only, P::empty(), |s| s)
    }
}

impl<D: Device> Rig<D> {
    /// The service (wrapped by `wrap`) started by the front-end engine on
    /// one ring of 64, with the protocol features `extra` on top of MQ,
    /// REPLY_ACK, CONFIG and STATUS.
    fn with(
        packed: bool,
        indirect: bool,
        read_only: bool,
        extra: P,
        wrap: impl FnOnce(Service) -> D,
    ) -> Self {
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
            | V::EVENT_IDX
            | V::LOG_ALL;
        let service = BlkService::new(dev, backend, 1);
        let protocol = P::MQ | P::REPLY_ACK | P::CONFIG | P::STATUS | extra;
        let config = BackendConfig {
            features: offered,
            // Offered, not asked for by the engine: a test negotiates it
            // by hand when a migration starts.
            protocol_features: protocol | P::LOG_SHMFD,
            num_queues: 1,
            max_queue_size: 256,
        };
        // Two regions, so requests can straddle the boundary at 1 MiB.
        let be = Backend::new(config, wrap(service), &[(0, MIB), (MIB, MIB)]).unwrap();
        let (ring, base) = if packed {
            (RingSpec::packed(64, 0x1000), 1 << 15 | 1 << 31)
        } else {
            (RingSpec::split(64, 0x1000), 0)
        };
        let mut want = offered & !V::EVENT_IDX & !V::LOG_ALL;
        if !packed {
            want &= !V::RING_PACKED;
        }
        let mut fc = FrontendConfig::new(want, protocol);
        fc.queues.push(ring.queue(base)).unwrap();
        for r in [region(0, MIB), region(MIB, MIB)] {
            fc.regions.push(r).unwrap();
        }
        let mut p = Pair::new(be, fc).unwrap();
        let driver = ring.lay_out(&p.be.mem).unwrap();
        // QEMU's init and start, every message acked.
        p.drive();
        assert_eq!(p.fe.backend_info().features, offered);
        p.start().unwrap();
        assert!(p.be.ring(0).is_some(), "SET_VRING_KICK started the ring");
        Rig {
            p,
            _image: image,
            file,
            driver,
            indirect,
            serial,
        }
    }

    fn mem(&self) -> &TestMemory {
        &self.p.be.mem
    }

    /// Makes one request available (through an indirect table at 0x3000
    /// on an indirect rig); returns its id.
    fn post(&mut self, bufs: &[Buf]) -> u16 {
        let mem = &self.p.be.mem;
        if self.indirect {
            self.driver.post_indirect(mem, 0x3000, bufs).unwrap()
        } else {
            self.driver.post(mem, bufs).unwrap()
        }
    }

    /// Posts one request, lets the device process everything available,
    /// and returns the used length.
    fn request(&mut self, bufs: &[Buf]) -> u32 {
        self.post(bufs);
        assert_eq!(self.p.be.serve(0).unwrap(), 1, "one chain per request");
        let used = self.driver.harvest(&self.p.be.mem).unwrap();
        used.expect("the request completed").len
    }

    fn status(&self) -> u8 {
        self.mem().read_vec(STATUS, 1).unwrap()[0]
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
    hdr_at(mem, (HDR, STATUS), ty, sector)
}

/// A request header at `at.0` and its status byte (0xff) at `at.1`.
fn hdr_at(mem: &TestMemory, at: (u64, u64), ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write(at.0, &h).unwrap();
    mem.write(at.1, &[0xff]).unwrap();
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
    r.mem().write(data, &p).unwrap();
    hdr(r.mem(), VIRTIO_BLK_T_OUT, 8);
    let len = r.request(&[
        head,
        Buf::readable(data, 4096),
        Buf::readable(data + 4096, 4096),
        status,
    ]);
    assert_eq!((r.status(), len), (S_OK, 1));
    assert_eq!(r.host_read(8 * 512, 8192), p, "the image holds the write");

    // IN: read it back into a cleared buffer.
    r.mem().write(data, &[0u8; 8192]).unwrap();
    hdr(r.mem(), VIRTIO_BLK_T_IN, 8);
    let len = r.request(&[head, Buf::writable(data, 8192), status]);
    assert_eq!((r.status(), len), (S_OK, 8193));
    assert_eq!(r.mem().read_vec(data, 8192).unwrap(), p);

    // FLUSH.
    hdr(r.mem(), VIRTIO_BLK_T_FLUSH, 0);
    let len = r.request(&[head, status]);
    assert_eq!((r.status(), len), (S_OK, 1));

    // GET_ID: the serial, zero-padded to 20 bytes.
    r.mem().write(0x9000, &[0xaa; 20]).unwrap();
    hdr(r.mem(), VIRTIO_BLK_T_GET_ID, 0);
    let len = r.request(&[head, Buf::writable(0x9000, 20), status]);
    assert_eq!(r.status(), S_OK);
    assert_eq!(len, 21);
    let mut want = r.serial.to_vec();
    want.resize(20, 0);
    assert_eq!(r.mem().read_vec(0x9000, 20).unwrap(), want);

    // WRITE_ZEROES over the first half of what was written.
    range(r.mem(), 8, 8, 0);
    hdr(r.mem(), VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let len = r.request(&[head, Buf::readable(RANGES, 16), status]);
    assert_eq!((r.status(), len), (S_OK, 1));
    assert_eq!(r.host_read(8 * 512, 4096), vec![0u8; 4096]);
    assert_eq!(
        r.host_read(16 * 512, 4096),
        p[4096..],
        "only the range was zeroed"
    );

    // DISCARD of the second half: succeeds; the data may or may not stay.
    range(r.mem(), 16, 8, 0);
    hdr(r.mem(), VIRTIO_BLK_T_DISCARD, 0);
    let len = r.request(&[head, Buf::readable(RANGES, 16), status]);
    assert_eq!((r.status(), len), (S_OK, 1));

    // A read beyond the capacity: IOERR, and no data written.
    r.mem().write(data, &[0x5a; 1024]).unwrap();
    hdr(r.mem(), VIRTIO_BLK_T_IN, IMAGE / 512 - 1);
    let len = r.request(&[head, Buf::writable(data, 1024), status]);
    assert_eq!(r.status(), S_IOERR);
    assert_eq!(len, 1);
    assert_eq!(r.mem().read_vec(data, 1024).unwrap(), vec![0x5a; 1024]);

    // A write whose sector overflows: IOERR, the image unchanged.
    hdr(r.mem(), VIRTIO_BLK_T_OUT, u64::MAX);
    let len = r.request(&[head, Buf::readable(data, 512), status]);
    assert_eq!((r.status(), len), (S_IOERR, 1));

    // An unknown type: UNSUPP.
    hdr(r.mem(), 0x7777, 0);
    let len = r.request(&[head, status]);
    assert_eq!((r.status(), len), (S_UNSUPP, 1));

    // Malformed: a header shorter than 16 bytes. IOERR.
    hdr(r.mem(), VIRTIO_BLK_T_IN, 0);
    let len = r.request(&[Buf::readable(HDR, 8), Buf::writable(data, 512), status]);
    assert_eq!(r.status(), S_IOERR);
    assert_eq!(len, 1);

    let c = r.p.be.device.counters(0).unwrap();
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
    let features = r.p.be.u64_reply(Request::GetFeatures);
    assert!(features & (1 << 5) != 0, "VIRTIO_BLK_F_RO offered");
    let before = r.host_read(0, 512);
    r.mem().write(0x20000, &[0x11; 512]).unwrap();
    hdr(r.mem(), VIRTIO_BLK_T_OUT, 0);
    let len = r.request(&[
        Buf::readable(HDR, 16),
        Buf::readable(0x20000, 512),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!((r.status(), len), (S_IOERR, 1));
    assert_eq!(r.host_read(0, 512), before);
    // Reads still work.
    hdr(r.mem(), VIRTIO_BLK_T_IN, 0);
    let len = r.request(&[
        Buf::readable(HDR, 16),
        Buf::writable(0x20000, 512),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!((r.status(), len), (S_OK, 513));
}

/// `BlkService` completing out of order: `process` keeps every request,
/// and `poll` carries them out newest first.
struct Reversed(Service);

#[derive(Default)]
struct ReversedScratch {
    blk: Scratch,
    kept: Vec<(Token, Vec<Segment>)>,
}

impl Device for Reversed {
    type Scratch = ReversedScratch;

    fn read_config(&self, offset: u32, dst: &mut [u8]) -> bool {
        self.0.read_config(offset, dst)
    }

    fn write_config(&mut self, offset: u32, src: &[u8], kind: ConfigWriteKind) -> bool {
        self.0.write_config(offset, src, kind)
    }

    fn features_acked(&mut self, features: V) {
        self.0.features_acked(features)
    }

    fn reset(&mut self) {
        self.0.reset()
    }

    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _: u16,
        chain: &Chain<S>,
        token: Token,
        _: &M,
        scratch: &mut ReversedScratch,
    ) -> Completion {
        if !token.side_effects() {
            return Completion::Done(0);
        }
        let segments = chain.segments().iter().map(|&s| s.into()).collect();
        scratch.kept.push((token, segments));
        Completion::Later
    }

    fn poll<M: GuestMemory + ?Sized>(
        &self,
        queue: u16,
        mem: &M,
        scratch: &mut ReversedScratch,
        done: &mut dyn FnMut(Token, u32),
    ) {
        while let Some((token, segments)) = scratch.kept.pop() {
            done(
                token,
                self.0.execute(queue, &segments, mem, &mut scratch.blk),
            );
        }
    }
}

#[test]
fn requests_completed_in_reverse_order_with_the_inflight_area() {
    const N: u64 = 8;
    // Request i: header, status byte and 4 KiB of data of its own.
    let at = |i: u64| (0x8000 + 0x20 * i, 0x8400 + i, 0x10000 + 0x1000 * i);
    for packed in [false, true] {
        let mut r = Rig::with(packed, false, false, P::INFLIGHT_SHMFD, Reversed);
        assert!(r.p.be.ring(0).unwrap().tracked(), "requests are recorded");
        let post = |r: &mut Rig<Reversed>, ty: u32, i: u64| {
            let (h, s, data) = at(i);
            hdr_at(r.mem(), (h, s), ty, 8 * i);
            let buf = if ty == VIRTIO_BLK_T_OUT {
                Buf::readable(data, 4096)
            } else {
                Buf::writable(data, 4096)
            };
            r.post(&[Buf::readable(h, 16), buf, Buf::writable(s, 1)])
        };
        let check = |r: &mut Rig<Reversed>, ids: &[u16], len: u32| {
            let used = r.driver.harvest_all(&r.p.be.mem).unwrap();
            let got: Vec<(u16, u32)> = used.iter().map(|u| (u.id, u.len)).collect();
            let want: Vec<(u16, u32)> = ids.iter().rev().map(|&id| (id, len)).collect();
            assert_eq!(got, want, "used entries newest first (packed: {packed})");
            for i in 0..N {
                assert_eq!(r.mem().read_vec(at(i).1, 1).unwrap(), [S_OK], "request {i}");
            }
        };

        // Writes, served in one round: all kept, then done newest first.
        let mut ids = Vec::new();
        for i in 0..N {
            r.mem().write(at(i).2, &pattern(i as u8, 4096)).unwrap();
            ids.push(post(&mut r, VIRTIO_BLK_T_OUT, i));
        }
        assert_eq!(r.p.be.serve(0).unwrap(), N as usize);
        check(&mut r, &ids, 1);
        for i in 0..N {
            assert_eq!(r.host_read(8 * i * 512, 4096), pattern(i as u8, 4096));
        }

        // Reads in flight when the ring stops: the stop's drain hands them
        // to the device and polls it; they complete newest first too.
        let mut ids = Vec::new();
        for i in 0..N {
            r.mem().write(at(i).2, &[0; 4096]).unwrap();
            ids.push(post(&mut r, VIRTIO_BLK_T_IN, i));
        }
        assert_eq!(r.p.be.take(0).unwrap(), N as usize);
        assert_eq!(r.p.stop().unwrap(), [N as usize]);
        check(&mut r, &ids, 4097);
        for i in 0..N {
            let data = r.mem().read_vec(at(i).2, 4096).unwrap();
            assert_eq!(data, pattern(i as u8, 4096), "request {i}");
        }
        let c = r.p.be.device.0.counters(0).unwrap();
        assert_eq!(c.requests.load(std::sync::atomic::Ordering::Relaxed), 2 * N);
        assert_eq!(c.errors.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}

/// The pages whose bits are set in the pair's dirty log.
fn dirty_pages(r: &Rig) -> Vec<u64> {
    let be = &r.p.be;
    let bytes = be
        .log
        .as_ref()
        .unwrap()
        .read_vec(0, be.log_size as usize)
        .unwrap();
    (0..be.log_size * 8)
        .filter(|&p| bytes[(p / 8) as usize] >> (p % 8) & 1 == 1)
        .collect()
}

fn clear_log(r: &Rig) {
    let be = &r.p.be;
    let log = be.log.as_ref().unwrap();
    log.write(0, &vec![0; be.log_size as usize]).unwrap();
}

/// A migration starts (LOG_SHMFD, SET_LOG_BASE, VHOST_F_LOG_ALL while the
/// ring runs): the blk device's writes into guest memory are marked (the
/// data of a read, the status byte, GET_ID's id), the pages it only reads
/// are not; with LOG_ALL off again nothing is.
#[test]
fn blk_writes_are_marked_in_the_dirty_log() {
    use vhost_user_core::log::bitmap_bytes;
    use vhost_user_core::message::LogMsg;
    const STATUS_PAGE: u64 = 0x9000;
    let mut r = Rig::new(false, false, false);
    let p = P::MQ | P::REPLY_ACK | P::CONFIG | P::STATUS | P::LOG_SHMFD;
    assert_eq!(r.p.be.ack(Request::SetProtocolFeatures(p.bits())).1, 0);
    let size = bitmap_bytes(2 * MIB);
    let (_, reply) =
        r.p.be
            .send(&Request::SetLogBase(LogMsg { size, offset: 0 }), false)
            .unwrap();
    assert_eq!(reply[12..], 0u64.to_le_bytes());
    let f = r.p.be.session.features() | V::LOG_ALL;
    assert_eq!(r.p.be.ack(Request::SetFeatures(f.bits())).1, 0);
    let head = Buf::readable(HDR, 16);
    let status = Buf::writable(STATUS_PAGE, 1);

    // OUT: the device reads the data; only the status byte is written.
    let data = 0x20000;
    r.mem().write(data, &pattern(3, 8192)).unwrap();
    hdr_at(r.mem(), (HDR, STATUS_PAGE), VIRTIO_BLK_T_OUT, 8);
    r.request(&[head, Buf::readable(data, 8192), status]);
    assert_eq!(dirty_pages(&r), [0x9]);

    // IN: the data pages (0x30 and 0x31, the second in part) and the
    // status byte.
    clear_log(&r);
    hdr_at(r.mem(), (HDR, STATUS_PAGE), VIRTIO_BLK_T_IN, 8);
    r.request(&[head, Buf::writable(0x30000, 4096 + 512), status]);
    assert_eq!(r.mem().read_vec(0x30000, 4096).unwrap(), pattern(3, 4096));
    assert_eq!(dirty_pages(&r), [0x9, 0x30, 0x31]);

    // GET_ID: the id's page and the status byte.
    clear_log(&r);
    hdr_at(r.mem(), (HDR, STATUS_PAGE), VIRTIO_BLK_T_GET_ID, 0);
    r.request(&[head, Buf::writable(0x40000, 20), status]);
    assert_eq!(dirty_pages(&r), [0x9, 0x40]);

    // LOG_ALL off: nothing.
    clear_log(&r);
    let f = r.p.be.session.features() - V::LOG_ALL;
    assert_eq!(r.p.be.ack(Request::SetFeatures(f.bits())).1, 0);
    hdr_at(r.mem(), (HDR, STATUS_PAGE), VIRTIO_BLK_T_IN, 8);
    r.request(&[head, Buf::writable(0x30000, 4096), status]);
    assert_eq!(dirty_pages(&r), Vec::<u64>::new());
    assert_eq!(r.p.be.log_failed, 0);
}

/// A ring over mapped guest memory for the Linux runtime's data path
/// (`process_mapped`, `poll_mapped`), without a front-end: the test pops
/// the chains itself.
struct MappedRing {
    mem: vhost_user_linux::memory::LinuxGuestMemory,
    driver: vhost_user_test::SplitDriver,
    dp: vhost_user_core::dataplane::DataPlane,
}

impl MappedRing {
    fn new() -> MappedRing {
        let mut mem = vhost_user_linux::memory::LinuxGuestMemory::new();
        let fd = vhost_user_linux::sys::memfd::create("guest", 2 * MIB).unwrap();
        mem.map(0, region(0, 2 * MIB), fd).unwrap();
        let driver = vhost_user_test::SplitDriver::new(&mem, 64, 0x1000, false).unwrap();
        let q = vhost_user_core::vring::Queue::new(64, driver.addrs(), V::VERSION_1).unwrap();
        let dp = vhost_user_core::dataplane::DataPlane::start(q, true, false, &mem, None);
        MappedRing { mem, driver, dp }
    }

    /// Posts a request of type `ty` (a 4 KiB read or write at `sector`,
    /// or a flush) whose header, data and status sit at `at`, pops it and
    /// hands it to `s`; returns what it said.
    fn submit(
        &mut self,
        s: &Service,
        scratch: &mut Scratch,
        ty: u32,
        at: u64,
        sector: u64,
    ) -> Completion {
        let (hdr, data, status) = (at, at + 0x1000, at + 0x2000);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(hdr, &h).unwrap();
        let mut bufs = vec![Buf::readable(hdr, 16)];
        match ty {
            VIRTIO_BLK_T_IN => bufs.push(Buf::writable(data, 4096)),
            VIRTIO_BLK_T_OUT => bufs.push(Buf::readable(data, 4096)),
            _ => {}
        }
        bufs.push(Buf::writable(status, 1));
        self.driver.post(&self.mem, &bufs).unwrap();
        let mut chain: Chain = Chain::new();
        let token = self.dp.pop(&self.mem, None, &mut chain).unwrap().unwrap();
        let mapped = vhost_user_linux::memory::Mapped::new(&self.mem, None);
        s.process_mapped(0, &chain, token, &mapped, scratch)
    }

    fn read(&self, at: u64, len: usize) -> Result<Vec<u8>, vhost_user_core::memory::MemoryError> {
        let mut b = vec![0; len];
        self.mem.read(at, &mut b)?;
        Ok(b)
    }

    /// Reaps until the device holds nothing; returns the completions.
    fn drain(&mut self, s: &Service, scratch: &mut Scratch, held: usize) -> usize {
        let mapped = vhost_user_linux::memory::Mapped::new(&self.mem, None);
        let mut n = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while n < held {
            assert!(std::time::Instant::now() < deadline, "the I/O completes");
            s.poll_mapped(0, &mapped, scratch, &mut |_, _| n += 1);
            std::thread::yield_now();
        }
        n
    }
}

/// An image whose sector 8 holds 4 KiB of `pattern(seed)`, written
/// through the page cache (so cached); the image and the pattern.
fn cached_image(seed: u8) -> (TempImage, Vec<u8>) {
    let image = TempImage::new(IMAGE).unwrap();
    let data = pattern(seed, 4096);
    std::fs::File::options()
        .write(true)
        .open(image.path())
        .unwrap()
        .write_all_at(&data, 8 * 512)
        .unwrap();
    (image, data)
}

/// A service over `image` in `cache` mode through `aio`, FLUSH
/// negotiated as a Linux guest does (writes are not followed by one of
/// their own).
fn engine_service(image: &TempImage, cache: CacheMode, aio: AioMode) -> Service {
    let backend = FileBackend::open_with(image.path(), false, cache).unwrap();
    let mut s = BlkService::new(device(false, b"quick"), backend, 1).with_aio(Some(aio), 4);
    let features = s.offered_features() | V::VERSION_1;
    s.features_acked(features);
    s
}

/// The rings' thread pools count their threads in the service's one
/// budget (`--io-threads`, shared by the queues): a flush on each of two
/// rings runs on a thread of its ring's pool, two threads in the budget.
#[test]
fn the_rings_pools_share_one_thread_budget() {
    let image = TempImage::new(IMAGE).unwrap();
    let s = engine_service(&image, CacheMode::Writeback, AioMode::Threads);
    assert_eq!((s.io_threads().max(), s.io_threads().running()), (4, 0));
    let mut rings = [
        (MappedRing::new(), Scratch::default()),
        (MappedRing::new(), Scratch::default()),
    ];
    for (r, scratch) in &mut rings {
        let c = r.submit(&s, scratch, VIRTIO_BLK_T_FLUSH, 0x30000, 0);
        assert_eq!(c, Completion::Later, "the flush goes to the pool");
        assert_eq!(r.drain(&s, scratch, 1), 1);
        assert_eq!(r.read(0x32000, 1).unwrap(), [S_OK]);
    }
    // Threads stay counted while parked (until they idle out).
    assert_eq!(s.io_threads().running(), 2);
    drop(rings);
    assert_eq!(s.io_threads().running(), 0, "the pools' threads are gone");
}

/// Through the thread pool over the page cache, a read of cached data is
/// copied at once by the worker (as an io_uring copies it while it is
/// submitted), and what the pool gets waits for the disk: the worker
/// sleeps on its completion fd rather than spin through it, as for
/// O_DIRECT, for an io_uring's held reads and while a flush or a write is
/// in the engine.
#[test]
fn cached_reads_complete_at_once_and_disk_io_is_waited_for() {
    let (image, data) = cached_image(3);
    let uring = {
        let f = std::fs::File::open(image.path()).unwrap();
        vhost_user_linux::sys::uring::Uring::new(8, std::os::fd::AsFd::as_fd(&f)).is_ok()
    };
    for (aio, cache) in [
        (AioMode::Threads, CacheMode::Writeback),
        (AioMode::Threads, CacheMode::Writethrough),
        (AioMode::Threads, CacheMode::None),
        (AioMode::IoUring, CacheMode::Writeback),
    ] {
        let what = format!("{aio:?}, cache {cache:?}");
        let threads = aio == AioMode::Threads || !uring;
        let s = engine_service(&image, cache, aio);
        let mut scratch = Scratch::default();
        let mut r = MappedRing::new();
        let c = r.submit(&s, &mut scratch, VIRTIO_BLK_T_IN, 0x10000, 8);
        if threads && cache != CacheMode::None {
            assert_eq!(c, Completion::Done(4097), "{what}: a cached read");
        } else {
            assert_eq!(c, Completion::Later, "{what}: the read goes to the engine");
            assert!(!s.quick_io(0, &scratch), "{what}: a read in the engine");
            assert_eq!(r.drain(&s, &mut scratch, 1), 1);
        }
        assert_eq!(r.read(0x11000, 4096).unwrap(), data, "{what}");
        assert_eq!(r.read(0x12000, 1).unwrap(), [S_OK], "{what}");
        // A range never read nor written: what goes to the engine was not
        // in the cache.
        let c = r.submit(&s, &mut scratch, VIRTIO_BLK_T_IN, 0x20000, 4096);
        if c == Completion::Later {
            assert!(!s.quick_io(0, &scratch), "{what}: a read that missed");
            assert_eq!(r.drain(&s, &mut scratch, 1), 1);
        }
        assert_eq!(r.read(0x21000, 4096).unwrap(), [0; 4096]);
        // A flush waits for the disk.
        let c = r.submit(&s, &mut scratch, VIRTIO_BLK_T_FLUSH, 0x30000, 0);
        assert_eq!(c, Completion::Later, "{what}: the flush goes to the engine");
        assert!(!s.quick_io(0, &scratch), "{what}: a flush");
        assert_eq!(r.drain(&s, &mut scratch, 1), 1);
        if cache == CacheMode::Writethrough {
            // So does a write (O_DSYNC).
            let c = r.submit(&s, &mut scratch, VIRTIO_BLK_T_OUT, 0x10000, 8);
            assert_eq!(c, Completion::Later);
            assert!(!s.quick_io(0, &scratch), "{what}: a write");
            assert_eq!(r.drain(&s, &mut scratch, 1), 1);
        }
    }
}

/// Where the worker cannot copy cached data itself (a kernel without
/// `RWF_NOWAIT`), a read from the page cache goes to the thread pool and
/// comes back in microseconds: quick I/O, which the worker spins through
/// rather than sleep; a write in the pool (writethrough: it waits for
/// the disk) or any O_DIRECT read is not, nor is anything through an
/// io_uring.
#[test]
fn pool_reads_from_the_page_cache_are_quick_io() {
    let (image, data) = cached_image(5);
    for (cache, quick) in [(CacheMode::Writethrough, true), (CacheMode::None, false)] {
        let s = engine_service(&image, cache, AioMode::Threads);
        let mut scratch = Scratch::without_cached_reads();
        let mut r = MappedRing::new();
        let c = r.submit(&s, &mut scratch, VIRTIO_BLK_T_IN, 0x10000, 8);
        assert_eq!(c, Completion::Later, "{cache:?}: the read goes to the pool");
        assert_eq!(
            s.quick_io(0, &scratch),
            quick,
            "{cache:?}: a read in the pool"
        );
        // A write joins it: now something waits for the disk.
        let c = r.submit(&s, &mut scratch, VIRTIO_BLK_T_OUT, 0x20000, 64);
        assert_eq!(c, Completion::Later);
        assert!(!s.quick_io(0, &scratch), "{cache:?}: a write in the pool");
        assert_eq!(r.drain(&s, &mut scratch, 2), 2);
        assert_eq!(r.read(0x11000, 4096).unwrap(), data, "{cache:?}");
        assert_eq!(r.read(0x12000, 1).unwrap(), [S_OK]);
        assert_eq!(r.read(0x22000, 1).unwrap(), [S_OK]);
        // Nothing in the pool: the next cached read is quick again.
        let c = r.submit(&s, &mut scratch, VIRTIO_BLK_T_IN, 0x30000, 8);
        assert_eq!(c, Completion::Later);
        assert_eq!(s.quick_io(0, &scratch), quick, "{cache:?}: after the write");
        assert_eq!(r.drain(&s, &mut scratch, 1), 1);
        // Through an io_uring a read held after submission missed the
        // cache: never quick.
        if cache == CacheMode::Writethrough {
            let s = engine_service(&image, cache, AioMode::IoUring);
            let mut scratch = Scratch::without_cached_reads();
            if r.submit(&s, &mut scratch, VIRTIO_BLK_T_IN, 0x40000, 8) == Completion::Later {
                assert!(!s.quick_io(0, &scratch), "io_uring");
                assert_eq!(r.drain(&s, &mut scratch, 1), 1);
            }
        }
    }
}

/// The synchronous path (`--aio sync`, or no engine at all) over
/// O_DIRECT: its bounce buffer is a plain allocation, whose address the
/// kernel refuses for an O_DIRECT transfer that crosses a page (EINVAL:
/// every request failed); the backend copies through an aligned buffer.
#[test]
fn the_synchronous_path_reads_and_writes_o_direct() {
    let (image, data) = cached_image(7);
    let backend = FileBackend::open_with(image.path(), false, CacheMode::None).unwrap();
    let mut s = BlkService::new(device(false, b"sync"), backend, 1).with_aio(None, 4);
    let features = s.offered_features() | V::VERSION_1;
    s.features_acked(features);
    let mut scratch = Scratch::default();
    let mut r = MappedRing::new();
    let c = r.submit(&s, &mut scratch, VIRTIO_BLK_T_IN, 0x10000, 8);
    assert_eq!(c, Completion::Done(4097));
    assert_eq!(r.read(0x12000, 1).unwrap(), [S_OK], "the read's status");
    assert_eq!(r.read(0x11000, 4096).unwrap(), data);
    // The same data written back 4 KiB further, read from the file.
    let c = r.submit(&s, &mut scratch, VIRTIO_BLK_T_OUT, 0x10000, 16);
    assert_eq!(c, Completion::Done(1));
    assert_eq!(r.read(0x12000, 1).unwrap(), [S_OK], "the write's status");
    let mut on_disk = vec![0; 4096];
    std::fs::File::open(image.path())
        .unwrap()
        .read_exact_at(&mut on_disk, 16 * 512)
        .unwrap();
    assert_eq!(on_disk, data);
}

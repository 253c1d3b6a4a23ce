//! Guest memory a front-end lays out in unusual or hostile ways, over a
//! real socket, against the `vhost-user-blk` daemon:
//!
//! - guest RAM as regions from several memfds at adjacent guest addresses
//!   (as with memory hotplug), with an indirect table, one of its
//!   descriptors and the data buffers straddling the boundary: the
//!   requests complete with the right data;
//! - a front-end that shrinks a memfd the daemon has mapped: the daemon
//!   sealed it against shrinking when it mapped it, so the shrink fails
//!   with EPERM and the daemon goes on serving;
//! - a memfd that cannot be sealed is refused, so shrinking it afterwards
//!   harms nothing: the daemon survives and serves the next front-end.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{recv_reply, send, u64_of, Daemon, TempDir};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{
    FrontendReq, MemRegionMsg, MemTable, Request, VringAddrMsg, VringFdMsg, VringStateMsg,
};
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_linux::sys::eventfd::EventFd;
use vhost_user_linux::sys::memfd;
use vhost_user_linux::sys::socket::Stream;
use vhost_user_test::{Buf, SplitDriver};

const MIB: u64 = 1 << 20;
const QS: u16 = 16;
/// virtio-blk request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// The reply to a REPLY_ACK request: 0 is success; `None` if the daemon
/// closed the connection instead.
fn ack_code(s: &Stream, req: Request<'_>, fds: &[BorrowedFd<'_>]) -> Option<u64> {
    let code = req.code();
    send(s, &req, true, fds);
    recv_reply(s, code).map(|r| u64_of(code, &r))
}

fn ack(s: &Stream, req: Request<'_>, fds: &[BorrowedFd<'_>]) {
    let code = req.code();
    assert_eq!(ack_code(s, req, fds), Some(0), "{code:?} acked");
}

/// The daemon process is alive and, once `s` (its current front-end) has
/// gone, a fresh connection is served.
fn assert_alive_and_serving(d: &mut Daemon, s: Stream) {
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon died: {}",
        d.log()
    );
    drop(s);
    let s = d.connect();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send(&s, &Request::GetFeatures, false, &[]);
    let r = recv_reply(&s, FrontendReq::GetFeatures).expect("the next front-end is served");
    assert!(u64_of(FrontendReq::GetFeatures, &r) & V::VERSION_1.bits() != 0);
}

/// A front-end with one split ring over guest memory made of `regions`
/// (each with its own fd).
struct Fe {
    d: Daemon,
    s: Stream,
    mem: LinuxGuestMemory,
    drv: SplitDriver,
    kick: EventFd,
    call: EventFd,
    image: std::fs::File,
    _dir: TempDir,
}

impl Fe {
    /// Starts the daemon on a fresh image and negotiates features
    /// (INDIRECT_DESC, REPLY_ACK); no memory yet.
    fn connect() -> (Daemon, Stream, std::fs::File, TempDir) {
        let dir = TempDir::new("hostile-memory");
        let (img, image) = dir.image(4 * MIB);
        let d = Daemon::start_with(&["--blk-file", img.to_str().unwrap(), "--num-queues", "1"]);
        let s = d.connect();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        send(&s, &Request::GetFeatures, false, &[]);
        let f = u64_of(
            FrontendReq::GetFeatures,
            &recv_reply(&s, FrontendReq::GetFeatures).unwrap(),
        );
        let want = V::VERSION_1 | V::PROTOCOL_FEATURES | V::INDIRECT_DESC;
        assert_eq!(f & want.bits(), want.bits(), "the daemon offers {want:?}");
        send(&s, &Request::GetProtocolFeatures, false, &[]);
        let p = u64_of(
            FrontendReq::GetProtocolFeatures,
            &recv_reply(&s, FrontendReq::GetProtocolFeatures).unwrap(),
        );
        assert!(p & P::REPLY_ACK.bits() != 0);
        send(
            &s,
            &Request::SetProtocolFeatures(P::REPLY_ACK.bits()),
            false,
            &[],
        );
        send(&s, &Request::SetOwner, false, &[]);
        send(&s, &Request::SetFeatures(want.bits()), false, &[]);
        (d, s, image, dir)
    }

    /// Connects, sends SET_MEM_TABLE with `regions` and their fds (which
    /// the front-end maps too), and starts ring 0 at guest address 0x1000.
    fn new(regions: &[(MemRegionMsg, OwnedFd)]) -> Fe {
        let (d, s, image, dir) = Fe::connect();
        let mut mem = LinuxGuestMemory::new();
        for (i, (r, fd)) in regions.iter().enumerate() {
            mem.map(i, *r, fd.try_clone().unwrap()).unwrap();
        }
        let msgs: Vec<MemRegionMsg> = regions.iter().map(|(r, _)| *r).collect();
        let fds: Vec<BorrowedFd<'_>> = regions.iter().map(|(_, f)| f.as_fd()).collect();
        ack(
            &s,
            Request::SetMemTable(MemTable::new(&msgs).unwrap()),
            &fds,
        );
        let drv = SplitDriver::new(&mem, QS, 0x1000, false).unwrap();
        let fe = Fe {
            d,
            s,
            mem,
            drv,
            kick: EventFd::new(false).unwrap(),
            call: EventFd::new(false).unwrap(),
            image,
            _dir: dir,
        };
        fe.start(&msgs[0]);
        fe
    }

    /// The start sequence of ring 0, whose areas are in `region`.
    fn start(&self, region: &MemRegionMsg) {
        let s = &self.s;
        let num = VringStateMsg {
            index: 0,
            num: QS.into(),
        };
        send(s, &Request::SetVringNum(num), false, &[]);
        let base = VringStateMsg { index: 0, num: 0 };
        send(s, &Request::SetVringBase(base), false, &[]);
        let a = self.drv.addrs();
        let va = |gpa: u64| gpa - region.guest_addr + region.user_addr;
        let addr = VringAddrMsg {
            index: 0,
            log: false,
            desc: va(a.desc),
            used: va(a.device),
            avail: va(a.driver),
            log_addr: 0,
        };
        send(s, &Request::SetVringAddr(addr), false, &[]);
        let fd = VringFdMsg {
            index: 0,
            no_fd: false,
        };
        ack(s, Request::SetVringCall(fd), &[self.call.as_fd()]);
        ack(s, Request::SetVringKick(fd), &[self.kick.as_fd()]);
        let enable = Request::SetVringEnable {
            index: 0,
            enable: true,
        };
        ack(s, enable, &[]);
    }

    /// Posts one request through an indirect table at `table`: a 16-byte
    /// header at `hdr`, `data` (readable for OUT, writable for IN), a
    /// status byte at `status`; kicks, waits for it and returns its
    /// status.
    fn request(
        &mut self,
        table: u64,
        hdr: u64,
        kind: u32,
        sector: u64,
        data: Buf,
        status: u64,
    ) -> u8 {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(hdr, &h).unwrap();
        self.mem.write(status, &[0xff]).unwrap();
        let bufs = [Buf::readable(hdr, 16), data, Buf::writable(status, 1)];
        self.drv.add_indirect(&self.mem, table, &bufs).unwrap();
        self.drv.publish(&self.mem).unwrap();
        let before = self.drv.used_idx(&self.mem).unwrap();
        self.kick.write(1).unwrap();
        let t0 = Instant::now();
        while self.drv.used_idx(&self.mem).unwrap() == before {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the request never completed: {}",
                self.d.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let used = self.drv.harvest_all(&self.mem).unwrap();
        assert_eq!(used.len(), 1, "{used:?}");
        let mut b = [0u8; 1];
        self.mem.read(status, &mut b).unwrap();
        b[0]
    }
}

/// A region of `size` bytes at `gpa`, from a fresh sealable memfd with
/// `offset` bytes before it; front-end addresses at `va`.
fn memfd_region(name: &str, gpa: u64, size: u64, offset: u64, va: u64) -> (MemRegionMsg, OwnedFd) {
    let fd = memfd::create(name, offset + size).unwrap();
    let r = MemRegionMsg {
        guest_addr: gpa,
        size,
        user_addr: va,
        mmap_offset: offset,
        xen: None,
    };
    (r, fd)
}

#[test]
fn indirect_table_across_two_memfd_regions_completes_with_the_right_data() {
    // GPA-contiguous regions from three fds, far apart in front-end
    // addresses, two at non-zero fd offsets: the indirect tables straddle
    // the a/b boundary, the data buffers the b/c one.
    let a = memfd_region("guest-a", 0, MIB, 0, 0x7f00_0000_0000);
    let b = memfd_region("guest-b", MIB, MIB, 0x1000, 0x7f40_0000_0000);
    let c = memfd_region("guest-c", 2 * MIB, MIB, 0x3000, 0x7e00_0000_0000);
    let c_fd = c.1.try_clone().unwrap();
    let mut fe = Fe::new(&[a, b, c]);
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    // A write: its three descriptors from MIB - 24, so the second one is
    // split 8/8 (its address in region a, its length and flags in b); its
    // data half in b, half in c.
    let out = 2 * MIB - 0x200;
    fe.mem.write(out, &data).unwrap();
    let st = fe.request(
        MIB - 16 - 8,
        0x10000,
        T_OUT,
        2,
        Buf::readable(out, 1024),
        MIB + 0x800,
    );
    assert_eq!(st, 0, "write status");
    let mut disk = vec![0u8; 1024];
    fe.image.read_exact_at(&mut disk, 2 * 512).unwrap();
    assert_eq!(
        disk, data,
        "the image holds the data that straddled the regions"
    );
    // Read it back through a table from MIB - 8 (the first descriptor
    // split 8/8) into a buffer 0x300 bytes in b, 0x100 in c.
    let into = 2 * MIB - 0x300;
    fe.mem.write(into, &[0u8; 1024]).unwrap();
    let st = fe.request(
        MIB - 8,
        0x10000,
        T_IN,
        2,
        Buf::writable(into, 1024),
        MIB + 0x900,
    );
    assert_eq!(st, 0, "read status");
    let mut back = vec![0u8; 1024];
    fe.mem.read(into, &mut back).unwrap();
    assert_eq!(back, data);
    // The part past the boundary landed in the third fd at its offset.
    let mut tail = vec![0u8; 0x100];
    std::fs::File::from(c_fd)
        .read_exact_at(&mut tail, 0x3000)
        .unwrap();
    assert_eq!(tail[..], data[0x300..0x400]);
    let Fe { mut d, s, .. } = fe;
    assert_alive_and_serving(&mut d, s);
}

#[test]
fn shrinking_a_mapped_memfd_fails_and_the_daemon_keeps_serving() {
    let (r, fd) = memfd_region("guest", 0, MIB, 0, 0x7f00_0000_0000);
    let ram = std::fs::File::from(fd.try_clone().unwrap());
    let mut fe = Fe::new(&[(r, fd)]);
    // The daemon sealed the memfd against shrinking when it mapped it.
    let e = ram.set_len(0).expect_err("the daemon sealed F_SEAL_SHRINK");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    assert_eq!(ram.metadata().unwrap().len(), MIB);
    // Requests still work on the whole region, up to its last byte.
    fe.mem.write(MIB - 512, &[0x5a; 512]).unwrap();
    let st = fe.request(
        0x8000,
        0x9000,
        T_OUT,
        5,
        Buf::readable(MIB - 512, 512),
        MIB - 513,
    );
    assert_eq!(st, 0);
    let mut disk = [0u8; 512];
    fe.image.read_exact_at(&mut disk, 5 * 512).unwrap();
    assert_eq!(disk, [0x5a; 512]);
    let Fe { mut d, s, .. } = fe;
    assert_alive_and_serving(&mut d, s);
}

#[test]
fn an_unsealable_memfd_is_refused_so_shrinking_it_harms_nothing() {
    let (mut d, s, _image, _dir) = Fe::connect();
    // As QEMU's memory-backend-memfd,seal=off makes it: F_SEAL_SEAL only.
    let fd = memfd::create_unsealable("guest", MIB).unwrap();
    let r = MemRegionMsg {
        guest_addr: 0,
        size: MIB,
        user_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        xen: None,
    };
    let reply = ack_code(
        &s,
        Request::SetMemTable(MemTable::new(&[r]).unwrap()),
        &[fd.as_fd()],
    );
    assert_ne!(reply, Some(0), "the region is refused (nack or close)");
    assert_eq!(d.guest_mappings(), 0, "nothing of it is mapped");
    // Now the front-end can shrink it: nothing of the daemon maps it.
    let ram = std::fs::File::from(fd);
    ram.set_len(0).unwrap();
    if reply.is_some() {
        // The connection survived the nack: ring messages pointing into
        // the refused region, then a kick, fail without touching it.
        let mut mem = LinuxGuestMemory::new();
        let scratch = memfd_region("scratch", 0, MIB, 0, 0);
        mem.map(0, scratch.0, scratch.1).unwrap();
        let drv = SplitDriver::new(&mem, QS, 0x1000, false).unwrap();
        let a = drv.addrs();
        let num = VringStateMsg {
            index: 0,
            num: QS.into(),
        };
        send(&s, &Request::SetVringNum(num), false, &[]);
        let addr = VringAddrMsg {
            index: 0,
            log: false,
            desc: a.desc + r.user_addr,
            used: a.device + r.user_addr,
            avail: a.driver + r.user_addr,
            log_addr: 0,
        };
        let _ = ack_code(&s, Request::SetVringAddr(addr), &[]);
        let kick = EventFd::new(false).unwrap();
        let fdm = VringFdMsg {
            index: 0,
            no_fd: false,
        };
        let _ = ack_code(&s, Request::SetVringKick(fdm), &[kick.as_fd()]);
        let enable = Request::SetVringEnable {
            index: 0,
            enable: true,
        };
        let _ = ack_code(&s, enable, &[]);
        let _ = kick.write(1);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_alive_and_serving(&mut d, s);
}

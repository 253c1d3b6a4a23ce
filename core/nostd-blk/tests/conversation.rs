//! The bare-metal back-end (the same code the firmware in
//! `core/nostd-check` links) driven through a whole front-end
//! conversation: messages hand-encoded with the core's `Request::encode`
//! and sent through the mailbox channel, a guest posting virtio-blk
//! requests with adapter-test's split and packed drivers, inflight
//! tracking on. Also the RAM budget of the protocol state.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::AtomicU32;

use vhost_user_core::backend::Session;
use vhost_user_core::dataplane::{DataPlane, IN_ORDER_STATE_BYTES};
use vhost_user_core::device::blk::{VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::inflight;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{
    ConfigMsg, ConfigWriteKind, FrontendReq, Header, InflightMsg, MemRegionMsg, MemTable,
    ParseOptions, Reply, Request, VringAddrMsg, VringFdMsg, VringStateMsg, HEADER_SIZE,
    MAX_MESSAGE,
};
use vhost_user_core::transport::{read_message, write_message, NoFds};
use vhost_user_nostd_blk::mailbox::{Mailbox, Port};
use vhost_user_nostd_blk::memory::SharedMemory;
use vhost_user_nostd_blk::{
    inflight_words, Backend, Memory, MAX_QUEUE_SIZE, QUEUES, REGIONS, STATE_BUDGET, STATE_BYTES,
};
use vhost_user_test::{Buf, PackedDriver, SplitDriver, USER_ADDR_OFFSET};

const MB: usize = 8192;
const RAM_BYTES: u64 = 16 * 1024;
/// Where guest RAM starts (guest physical).
const GPA: u64 = 0x4_0000;
const DISK_BYTES: usize = 4096;
const RING: u16 = 16;

fn words(bytes: usize) -> &'static [AtomicU32] {
    Box::leak((0..bytes / 4).map(|_| AtomicU32::new(0)).collect())
}

/// The two sides: the back-end and its channel end, the front-end's
/// channel end and its view of guest RAM and the disk.
struct Rig {
    be: Backend<'static>,
    be_chan: NoFds<Port<'static, MB>>,
    fe_chan: NoFds<Port<'static, MB>>,
    /// Guest RAM as the guest sees it.
    guest: Memory<'static>,
    disk: &'static [AtomicU32],
    buf: Box<[u8; MAX_MESSAGE]>,
}

impl Rig {
    fn new() -> Rig {
        let ram = words(RAM_BYTES as usize);
        let disk = words(DISK_BYTES);
        let area = words(4 * inflight_words(QUEUES, MAX_QUEUE_SIZE));
        let to_be: &'static Mailbox<MB> = Box::leak(Box::default());
        let to_fe: &'static Mailbox<MB> = Box::leak(Box::default());
        let mut guest = SharedMemory::new(ram);
        guest.map(0, GPA, RAM_BYTES, 0).unwrap();
        Rig {
            be: Backend::new(ram, disk, area).unwrap(),
            be_chan: NoFds(Port::new(to_be, to_fe)),
            fe_chan: NoFds(Port::new(to_fe, to_be)),
            guest,
            disk,
            buf: Box::new([0; MAX_MESSAGE]),
        }
    }

    /// Sends `req`, lets the back-end run one round, and returns the reply
    /// (parsed as the reply to `req`), if one came.
    fn call(&mut self, req: Request<'_>, need_reply: bool) -> Option<OwnedReply> {
        let mut out = [0u8; MAX_MESSAGE];
        let n = req.encode(need_reply, &mut out).unwrap();
        write_message(&mut self.fe_chan, &out[..n]).unwrap();
        assert!(
            self.be.poll(&mut self.be_chan).unwrap(),
            "{req:?} not handled"
        );
        let frame = read_message(&mut self.fe_chan, &mut self.buf).unwrap()?;
        assert_eq!(frame.fds, 0);
        // GET_INFLIGHT_FD's reply would carry the area's fd: here it
        // stands for the inflight window.
        let fds = usize::from(req.code() == FrontendReq::GetInflightFd);
        let r = Reply::parse(
            req.code(),
            &frame.header,
            frame.payload,
            fds,
            &ParseOptions::default(),
        )
        .unwrap();
        Some(match r {
            Reply::U64(v) => OwnedReply::U64(v),
            Reply::VringState { index, num } => OwnedReply::VringState { index, num },
            Reply::Config(c) => OwnedReply::Config(c.data.to_vec()),
            Reply::Inflight(m) => OwnedReply::Inflight(m),
            other => panic!("unexpected reply {other:?}"),
        })
    }

    /// A request that gets a REPLY_ACK: asserts success.
    fn ack(&mut self, req: Request<'_>) {
        let code = req.code();
        assert_eq!(self.call(req, true), Some(OwnedReply::U64(0)), "{code:?}");
    }

    fn u64(&mut self, req: Request<'_>) -> u64 {
        match self.call(req, false) {
            Some(OwnedReply::U64(v)) => v,
            r => panic!("{r:?}"),
        }
    }

    /// Lets the back-end serve its rings.
    fn serve(&mut self) {
        assert!(self.be.poll(&mut self.be_chan).unwrap());
        assert!(!self.fe_chan.0.readable(), "no reply was sent");
    }

    fn disk_bytes(&self, at: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let mut m = SharedMemory::<'_, 1>::new(self.disk);
        m.map(0, 0, DISK_BYTES as u64, 0).unwrap();
        m.read(at as u64, &mut v).unwrap();
        v
    }
}

#[derive(Debug, PartialEq, Eq)]
enum OwnedReply {
    U64(u64),
    VringState { index: u32, num: u32 },
    Config(Vec<u8>),
    Inflight(InflightMsg),
}

/// Either driver, for the conversation.
enum Driver {
    Split(SplitDriver),
    Packed(PackedDriver),
}

impl Driver {
    fn post(&mut self, mem: &Memory<'_>, bufs: &[Buf]) -> u16 {
        match self {
            Driver::Split(d) => d.post(mem, bufs).unwrap(),
            Driver::Packed(d) => d.post(mem, bufs).unwrap(),
        }
    }

    fn harvest(&mut self, mem: &Memory<'_>) -> Vec<(u16, u32)> {
        match self {
            Driver::Split(d) => d.harvest_all(mem).unwrap(),
            Driver::Packed(d) => d.harvest_all(mem).unwrap(),
        }
        .into_iter()
        .map(|u| (u.id, u.len))
        .collect()
    }

    fn addrs(&self) -> vhost_user_core::vring::RingAddrs {
        match self {
            Driver::Split(d) => d.addrs(),
            Driver::Packed(d) => d.addrs(),
        }
    }

    /// The GET_VRING_BASE value of a ring stopped with everything
    /// completed.
    fn base(&self, consumed: u16) -> u32 {
        match self {
            Driver::Split(_) => u32::from(consumed),
            Driver::Packed(d) => {
                let (idx, wrap) = d.next_avail();
                let w = u32::from(wrap);
                u32::from(idx) | w << 15 | u32::from(idx) << 16 | w << 31
            }
        }
    }
}

/// A virtio-blk request header at `at`.
fn header(mem: &Memory<'_>, at: u64, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write(at, &h).unwrap();
}

fn conversation(packed: bool) {
    let mut rig = Rig::new();

    // Features: both ring layouts offered, the front-end picks one.
    let offered = V::from_bits_retain(rig.u64(Request::GetFeatures));
    assert!(offered.contains(V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED));
    let mut acked = offered & !(V::RING_PACKED | V::INDIRECT_DESC);
    if packed {
        acked |= V::RING_PACKED;
    }
    assert_eq!(rig.call(Request::SetFeatures(acked.bits()), false), None);
    let protocol = P::from_bits_retain(rig.u64(Request::GetProtocolFeatures));
    let want = P::MQ | P::REPLY_ACK | P::CONFIG | P::INFLIGHT_SHMFD;
    assert!(protocol.contains(want));
    assert_eq!(
        rig.call(Request::SetProtocolFeatures(want.bits()), false),
        None
    );
    assert_eq!(rig.u64(Request::GetQueueNum), QUEUES as u64);
    rig.ack(Request::SetOwner);

    // The config space: capacity 8 sectors.
    let placeholder = [0u8; 8];
    let cfg = rig.call(
        Request::GetConfig(ConfigMsg {
            offset: 0,
            kind: ConfigWriteKind::Frontend,
            data: &placeholder,
        }),
        false,
    );
    assert_eq!(
        cfg,
        Some(OwnedReply::Config(
            (DISK_BYTES as u64 / 512).to_le_bytes().to_vec()
        ))
    );

    // Memory: one region, all of the shared RAM window.
    let regions = [MemRegionMsg {
        guest_addr: GPA,
        size: RAM_BYTES,
        user_addr: GPA + USER_ADDR_OFFSET,
        mmap_offset: 0,
        xen: None,
    }];
    rig.ack(Request::SetMemTable(MemTable::new(&regions).unwrap()));

    // The inflight area, made by the back-end in its window.
    let get = InflightMsg {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: QUEUES as u16,
        queue_size: RING,
    };
    let Some(OwnedReply::Inflight(area)) = rig.call(Request::GetInflightFd(get), false) else {
        panic!("no inflight area")
    };
    assert_eq!(
        area.mmap_size,
        inflight::area_size(QUEUES as u16, RING).unwrap()
    );
    assert_eq!(area.mmap_size, 4 * inflight_words(QUEUES, RING) as u64);
    rig.ack(Request::SetInflightFd(area));

    // Two rings, polled (no fds).
    let mut drivers = Vec::new();
    for q in 0..QUEUES as u32 {
        let base = GPA + 0x400 * u64::from(q);
        let d = if packed {
            Driver::Packed(PackedDriver::new(&rig.guest, RING, base).unwrap())
        } else {
            Driver::Split(SplitDriver::new(&rig.guest, RING, base, false).unwrap())
        };
        let a = d.addrs();
        rig.ack(Request::SetVringNum(VringStateMsg {
            index: q,
            num: u32::from(RING),
        }));
        let start = if packed { 1 << 15 | 1 << 31 } else { 0 };
        rig.ack(Request::SetVringBase(VringStateMsg {
            index: q,
            num: start,
        }));
        rig.ack(Request::SetVringAddr(VringAddrMsg {
            index: q,
            log: false,
            desc: a.desc + USER_ADDR_OFFSET,
            used: a.device + USER_ADDR_OFFSET,
            avail: a.driver + USER_ADDR_OFFSET,
            log_addr: 0,
        }));
        let nofd = VringFdMsg {
            index: q,
            no_fd: true,
        };
        rig.ack(Request::SetVringCall(nofd));
        rig.ack(Request::SetVringKick(nofd));
        rig.ack(Request::SetVringEnable {
            index: q,
            enable: true,
        });
        let dp = rig.be.ring(q as usize).unwrap();
        assert!(
            dp.tracked(),
            "ring {q} records requests in the inflight area"
        );
        assert!(dp.enabled());
        drivers.push(d);
    }

    // Guest buffers.
    let bufs = GPA + 0x1000;
    let (hdr, data, status) = (bufs, bufs + 0x100, bufs + 0x400);
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();

    // Ring 0: write sector 1.
    header(&rig.guest, hdr, VIRTIO_BLK_T_OUT, 1);
    rig.guest.write(data, &pattern).unwrap();
    rig.guest.write(status, &[0xff]).unwrap();
    let id = drivers[0].post(
        &rig.guest,
        &[
            Buf::readable(hdr, 16),
            Buf::readable(data, 512),
            Buf::writable(status, 1),
        ],
    );
    rig.serve();
    assert_eq!(drivers[0].harvest(&rig.guest), vec![(id, 1)]);
    assert_eq!(rig.guest.read_u16(status).unwrap() & 0xff, 0, "status OK");
    assert_eq!(rig.disk_bytes(512, 512), pattern, "the disk has the data");

    // Ring 1: read it back, into a zeroed buffer.
    header(&rig.guest, hdr, VIRTIO_BLK_T_IN, 1);
    rig.guest.write(data, &[0; 512]).unwrap();
    rig.guest.write(status, &[0xff]).unwrap();
    let id = drivers[1].post(
        &rig.guest,
        &[
            Buf::readable(hdr, 16),
            Buf::writable(data, 512),
            Buf::writable(status, 1),
        ],
    );
    rig.serve();
    assert_eq!(drivers[1].harvest(&rig.guest), vec![(id, 513)]);
    let mut back = vec![0u8; 512];
    rig.guest.read(data, &mut back).unwrap();
    assert_eq!(back, pattern, "read back what was written");
    let mut st = [0xffu8];
    rig.guest.read(status, &mut st).unwrap();
    assert_eq!(st, [0], "status OK");

    // Ring 0 again: the device id.
    header(&rig.guest, hdr, VIRTIO_BLK_T_GET_ID, 0);
    let id = drivers[0].post(
        &rig.guest,
        &[
            Buf::readable(hdr, 16),
            Buf::writable(data, 20),
            Buf::writable(status, 1),
        ],
    );
    rig.serve();
    assert_eq!(drivers[0].harvest(&rig.guest), vec![(id, 21)]);
    let mut serial = [0u8; 17];
    rig.guest.read(data, &mut serial).unwrap();
    assert_eq!(&serial, b"vhu-nostd-ramdisk");

    // Nothing is left in flight: the area records no request.
    let c = rig.be.counters();
    assert_eq!(c.requests, 3);
    assert_eq!(c.faults, 0);

    // Stop both rings: the base says where each would resume.
    for (q, consumed) in [(0u32, 2u16), (1, 1)] {
        let want = drivers[q as usize].base(consumed);
        assert_eq!(
            rig.call(Request::GetVringBase(q), false),
            Some(OwnedReply::VringState {
                index: q,
                num: want
            })
        );
        assert!(rig.be.ring(q as usize).is_none(), "ring {q} stopped");
    }
    assert_eq!(rig.be.counters().refused, 0);
}

#[test]
fn split_rings_end_to_end() {
    conversation(false);
}

#[test]
fn packed_rings_end_to_end() {
    conversation(true);
}

/// A message the session refuses without REPLY_ACK drops the conversation;
/// the back-end is then ready for a new front-end.
#[test]
fn a_broken_conversation_resets_the_backend() {
    let mut rig = Rig::new();
    let mut out = [0u8; 64];
    // SET_VRING_NUM on a ring that does not exist.
    let n = Header::request(FrontendReq::SetVringNum.id(), 8, false)
        .encode(&mut out)
        .map(|()| HEADER_SIZE + 8)
        .unwrap();
    out[HEADER_SIZE..n].copy_from_slice(&[9, 0, 0, 0, 16, 0, 0, 0]);
    write_message(&mut rig.fe_chan, &out[..n]).unwrap();
    assert!(rig.be.poll(&mut rig.be_chan).is_err());
    rig.be_chan.0.discard();
    assert_eq!(rig.be.counters().faults, 1);
    // A new conversation works.
    assert!(V::from_bits_retain(rig.u64(Request::GetFeatures)).contains(V::RING_PACKED));
}

/// Session plus both rings' data-plane state fit the 1 KiB budget (also a
/// compile-time assertion in the crate, for every target).
#[test]
fn protocol_state_fits_its_budget() {
    let session = size_of::<Session<QUEUES, REGIONS>>();
    // Without what a workspace build's unified `in-order` feature adds
    // (the firmware does not enable it).
    let dp = size_of::<DataPlane>() - IN_ORDER_STATE_BYTES;
    println!(
        "state: Session<{QUEUES}, {REGIONS}> {session} B + {QUEUES} x DataPlane {dp} B = {} B (budget {STATE_BUDGET} B)",
        session + QUEUES * dp
    );
    assert_eq!(STATE_BYTES, session + QUEUES * dp);
    assert!(session + QUEUES * dp <= STATE_BUDGET);
}

/// In-band notifications (the `inband` feature, on by default): no fd and
/// no polling flag at all. The back-end channel is a second mailbox pair
/// (SET_BACKEND_REQ_FD names it), rings are started and kicked with
/// VRING_KICK, each completion the guest wants to hear of comes back as
/// BACKEND_VRING_CALL, acked before the next, and a ring the guest breaks
/// as BACKEND_VRING_ERR. Split and packed.
#[test]
fn in_band_notifications_end_to_end() {
    use vhost_user_core::message::{BackendReq, BackendRequest};
    use vhost_user_nostd_blk::IN_BAND_FEATURES;

    for packed in [false, true] {
        let mut rig = Rig::new();
        let to_be: &'static Mailbox<MB> = Box::leak(Box::default());
        let to_fe: &'static Mailbox<MB> = Box::leak(Box::default());
        let mut be_back = NoFds(Port::new(to_be, to_fe));
        let mut fe_back = NoFds(Port::new(to_fe, to_be));

        let offered = V::from_bits_retain(rig.u64(Request::GetFeatures));
        let mut acked = offered & !(V::RING_PACKED | V::INDIRECT_DESC | V::EVENT_IDX);
        if packed {
            acked |= V::RING_PACKED;
        }
        assert_eq!(rig.call(Request::SetFeatures(acked.bits()), false), None);
        let protocol = P::from_bits_retain(rig.u64(Request::GetProtocolFeatures));
        assert!(protocol.contains(IN_BAND_FEATURES));
        let want = P::MQ | P::REPLY_ACK | IN_BAND_FEATURES;
        assert_eq!(
            rig.call(Request::SetProtocolFeatures(want.bits()), false),
            None
        );
        rig.ack(Request::SetOwner);
        rig.ack(Request::SetBackendReqFd);
        let regions = [MemRegionMsg {
            guest_addr: GPA,
            size: RAM_BYTES,
            user_addr: GPA + USER_ADDR_OFFSET,
            mmap_offset: 0,
            xen: None,
        }];
        rig.ack(Request::SetMemTable(MemTable::new(&regions).unwrap()));

        // Ring 0, started by VRING_KICK alone (no SET_VRING_KICK, no
        // SET_VRING_CALL).
        let d = if packed {
            Driver::Packed(PackedDriver::new(&rig.guest, RING, GPA).unwrap())
        } else {
            Driver::Split(SplitDriver::new(&rig.guest, RING, GPA, false).unwrap())
        };
        let mut d = d;
        let a = d.addrs();
        rig.ack(Request::SetVringNum(VringStateMsg {
            index: 0,
            num: u32::from(RING),
        }));
        let start = if packed { 1 << 15 | 1 << 31 } else { 0 };
        rig.ack(Request::SetVringBase(VringStateMsg {
            index: 0,
            num: start,
        }));
        rig.ack(Request::SetVringAddr(VringAddrMsg {
            index: 0,
            log: false,
            desc: a.desc + USER_ADDR_OFFSET,
            used: a.device + USER_ADDR_OFFSET,
            avail: a.driver + USER_ADDR_OFFSET,
            log_addr: 0,
        }));
        assert!(rig.be.ring(0).is_none());
        rig.ack(Request::VringKick(0));
        assert!(rig.be.ring(0).is_some(), "VRING_KICK started the ring");
        rig.ack(Request::SetVringEnable {
            index: 0,
            enable: true,
        });

        let bufs = GPA + 0x1000;
        let (hdr, data, status) = (bufs, bufs + 0x100, bufs + 0x400);
        let mut buf = Box::new([0u8; MAX_MESSAGE]);
        for round in 1..=3u32 {
            header(&rig.guest, hdr, VIRTIO_BLK_T_GET_ID, 0);
            let id = d.post(
                &rig.guest,
                &[
                    Buf::readable(hdr, 16),
                    Buf::writable(data, 20),
                    Buf::writable(status, 1),
                ],
            );
            // Kicked in-band: acked, and served in the same round.
            rig.ack(Request::VringKick(0));
            assert_eq!(d.harvest(&rig.guest), vec![(id, 21)]);
            // The call owed goes out on the back-end channel ...
            assert!(rig.be.poll_backend(&mut be_back).unwrap());
            let f = read_message(&mut fe_back, &mut buf).unwrap().unwrap();
            let req = BackendRequest::parse(
                &f.header,
                f.payload,
                0,
                &ParseOptions {
                    max_queues: QUEUES as u32,
                    xen_mmap: false,
                },
            )
            .unwrap();
            assert_eq!(req, BackendRequest::VringCall(0));
            assert!(f.header.need_reply());
            // ... and nothing more until it is acked.
            assert!(!rig.be.poll_backend(&mut be_back).unwrap());
            let mut ack = [0u8; 64];
            let n = BackendRequest::encode_reply(BackendReq::VringCall, 0, &mut ack).unwrap();
            write_message(&mut fe_back, &ack[..n]).unwrap();
            assert!(rig.be.poll_backend(&mut be_back).unwrap());
            assert_eq!(rig.be.counters().in_band, round);
        }

        // The guest breaks its ring: a head beyond it (split), or a
        // descriptor out of guest memory (packed).
        match &mut d {
            Driver::Split(s) => {
                s.push_head(&rig.guest, 99).unwrap();
                s.publish(&rig.guest).unwrap();
            }
            Driver::Packed(p) => {
                p.post(&rig.guest, &[Buf::writable(0x7fff_0000, 4)])
                    .unwrap();
            }
        }
        rig.ack(Request::VringKick(0));
        assert!(rig.be.ring(0).unwrap().error().is_some());
        assert!(rig.be.poll_backend(&mut be_back).unwrap());
        let f = read_message(&mut fe_back, &mut buf).unwrap().unwrap();
        assert_eq!(f.header.request, BackendReq::VringErr.id());
        assert_eq!(rig.be.counters().faults, 0);
    }
}

//! Property tests: for every message kind, encode then parse is the identity;
//! for arbitrary bytes, whatever parses encodes to something that parses to
//! the same value.

use proptest::prelude::*;
use std::vec;
use std::vec::Vec;

use super::super::*;
use super::OPTS;

fn ring() -> impl Strategy<Value = u32> {
    0u32..OPTS.max_queues
}

fn region() -> impl Strategy<Value = MemRegionMsg> {
    (any::<u32>(), 1u64..=1 << 40, any::<u32>(), any::<u32>()).prop_map(|(ga, size, ua, off)| {
        MemRegionMsg {
            guest_addr: u64::from(ga) << 12,
            size,
            user_addr: u64::from(ua) << 16,
            mmap_offset: u64::from(off) << 12,
            xen: None,
        }
    })
}

fn vfd() -> impl Strategy<Value = VringFdMsg> {
    (ring(), any::<bool>()).prop_map(|(index, no_fd)| VringFdMsg { index, no_fd })
}

fn inflight() -> impl Strategy<Value = InflightMsg> {
    (1u64..1 << 40, 0u64..1 << 40, 1u16.., 1u16..).prop_map(|(s, o, n, q)| InflightMsg {
        mmap_size: s,
        mmap_offset: o,
        num_queues: n,
        queue_size: q,
    })
}

fn iotlb(kinds: &'static [IotlbKind]) -> impl Strategy<Value = IotlbMsg> {
    (
        0u64..1 << 48,
        1u64..1 << 32,
        0u64..1 << 48,
        0u8..4,
        proptest::sample::select(kinds),
    )
        .prop_map(|(iova, size, uaddr, perm, kind)| IotlbMsg {
            iova,
            size,
            uaddr,
            perm: [
                IotlbPerm::None,
                IotlbPerm::Read,
                IotlbPerm::Write,
                IotlbPerm::ReadWrite,
            ][perm as usize],
            kind,
        })
}

/// Owned inputs for the borrowed variants.
#[derive(Clone, Debug)]
enum Spec {
    Plain(Request<'static>),
    Config {
        set: bool,
        offset: u32,
        kind: ConfigWriteKind,
        data: Vec<u8>,
    },
    Crypto(Vec<u8>),
    Table(Vec<MemRegionMsg>),
}

fn request() -> impl Strategy<Value = Spec> {
    use Request as R;
    let state = || (ring(), any::<u32>()).prop_map(|(index, num)| VringStateMsg { index, num });
    prop_oneof![
        Just(R::GetFeatures),
        any::<u64>().prop_map(R::SetFeatures),
        Just(R::SetOwner),
        Just(R::ResetOwner),
        (1u64..1 << 40, 0u64..1 << 40)
            .prop_map(|(size, offset)| R::SetLogBase(LogMsg { size, offset })),
        Just(R::SetLogFd),
        (ring(), 1u32..=32768)
            .prop_map(|(index, num)| R::SetVringNum(VringStateMsg { index, num })),
        (ring(), any::<bool>(), any::<[u64; 4]>()).prop_map(|(index, log, a)| R::SetVringAddr(
            VringAddrMsg {
                index,
                log,
                desc: a[0],
                used: a[1],
                avail: a[2],
                log_addr: a[3]
            }
        )),
        state().prop_map(R::SetVringBase),
        ring().prop_map(R::GetVringBase),
        vfd().prop_map(R::SetVringKick),
        vfd().prop_map(R::SetVringCall),
        vfd().prop_map(R::SetVringErr),
        Just(R::GetProtocolFeatures),
        any::<u64>().prop_map(R::SetProtocolFeatures),
        Just(R::GetQueueNum),
        (ring(), any::<bool>()).prop_map(|(index, enable)| R::SetVringEnable { index, enable }),
        any::<[u8; 6]>().prop_map(R::SendRarp),
        any::<u64>().prop_map(R::NetSetMtu),
        Just(R::SetBackendReqFd),
        iotlb(&[IotlbKind::Update, IotlbKind::Invalidate]).prop_map(R::IotlbMsg),
        (ring(), any::<bool>()).prop_map(|(index, big)| R::SetVringEndian {
            index,
            endian: if big { Endian::Big } else { Endian::Little }
        }),
        any::<u64>().prop_map(R::CloseCryptoSession),
        Just(R::PostcopyAdvise),
        Just(R::PostcopyListen),
        Just(R::PostcopyEnd),
        inflight().prop_map(|m| R::GetInflightFd(InflightMsg { mmap_size: 0, ..m })),
        inflight().prop_map(R::SetInflightFd),
        Just(R::GpuSetSocket),
        Just(R::ResetDevice),
        ring().prop_map(R::VringKick),
        Just(R::GetMaxMemSlots),
        region().prop_map(R::AddMemReg),
        region().prop_map(R::RemMemReg),
        any::<u8>().prop_map(R::SetStatus),
        Just(R::GetStatus),
        any::<[u8; 16]>()
            .prop_filter("named", |u| *u != [0; 16] && *u != [0xff; 16])
            .prop_map(R::GetSharedObject),
        any::<bool>().prop_map(|l| R::SetDeviceStateFd(if l {
            DeviceStateDirection::Load
        } else {
            DeviceStateDirection::Save
        })),
        Just(R::CheckDeviceState),
        Just(R::GetShmemConfig),
        ring().prop_map(R::GetVringBaseSkipDrain),
    ]
    .prop_map(Spec::Plain)
    .boxed()
    .prop_union(
        prop_oneof![
            (
                any::<bool>(),
                0u32..256,
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_filter_map("fits", |(set, offset, mig, data)| {
                    (offset as usize + data.len() <= 256).then_some(Spec::Config {
                        set,
                        offset,
                        kind: if mig {
                            ConfigWriteKind::Migration
                        } else {
                            ConfigWriteKind::Frontend
                        },
                        data,
                    })
                }),
            proptest::collection::vec(any::<u8>(), 16..1024).prop_map(Spec::Crypto),
            proptest::collection::vec(region(), 1..=8).prop_map(Spec::Table),
        ]
        .boxed(),
    )
}

fn nfds(r: &Request<'_>) -> usize {
    r.fd_rule().min as usize
}

fn roundtrip(r: &Request<'_>, need_reply: bool) {
    let mut out = [0u8; MAX_MESSAGE];
    let n = r.encode(need_reply, &mut out).unwrap();
    let h = Header::parse(&out[..n]).unwrap();
    assert_eq!(h.need_reply(), need_reply);
    assert_eq!(h.size as usize, n - HEADER_SIZE);
    let back = Request::parse(&h, &out[HEADER_SIZE..n], nfds(r), &OPTS).unwrap();
    assert_eq!(&back, r);
}

proptest! {
    #[test]
    fn request_encode_then_parse_is_identity(spec in request(), need_reply in any::<bool>()) {
        match spec {
            Spec::Plain(r) => roundtrip(&r, need_reply),
            Spec::Config { set, offset, kind, data } => {
                let c = ConfigMsg { offset, kind, data: &data };
                roundtrip(&if set { Request::SetConfig(c) } else { Request::GetConfig(c) }, need_reply);
            }
            Spec::Crypto(b) => roundtrip(&Request::CreateCryptoSession(&b), need_reply),
            Spec::Table(r) => roundtrip(&Request::SetMemTable(MemTable::new(&r).unwrap()), need_reply),
        }
    }

    #[test]
    fn reply_encode_then_parse_is_identity(v in any::<u64>(), index in ring(), num in any::<u32>(), err in any::<u8>(), no_fd in any::<bool>()) {
        let cases: [(FrontendReq, Reply<'_>); 5] = [
            (FrontendReq::GetFeatures, Reply::U64(v)),
            (FrontendReq::SetVringNum, Reply::U64(v)),
            (FrontendReq::GetVringBase, Reply::VringState { index, num }),
            (FrontendReq::SetDeviceStateFd, Reply::DeviceStateFd { error: err, no_fd }),
            (FrontendReq::GetInflightFd, Reply::Inflight(InflightMsg { mmap_size: v >> 1, mmap_offset: 0, num_queues: 1, queue_size: 2 })),
        ];
        for (code, r) in cases {
            let mut out = [0u8; MAX_MESSAGE];
            let n = r.encode(code, &mut out).unwrap();
            let h = Header::parse(&out[..n]).unwrap();
            let fds = r.fd_rule(code).min as usize;
            prop_assert_eq!(Reply::parse(code, &h, &out[12..n], fds, &OPTS).unwrap(), r);
        }
    }

    #[test]
    fn backend_encode_then_parse_is_identity(index in ring(), u in any::<[u8; 16]>(), len in 1u64..1 << 40, w in any::<bool>(), nr in any::<bool>()) {
        prop_assume!(u != [0; 16] && u != [0xff; 16]);
        let m = ShmemMapMsg { shmid: 3, fd_offset: 4096, shm_offset: 0, len, writable: w };
        for r in [
            BackendRequest::ConfigChange,
            BackendRequest::VringCall(index),
            BackendRequest::VringErr(index),
            BackendRequest::SharedObjectAdd(u),
            BackendRequest::SharedObjectRemove(u),
            BackendRequest::SharedObjectLookup(u),
            BackendRequest::ShmemMap(m),
            BackendRequest::ShmemUnmap(m),
            BackendRequest::VringHostNotifier(VringAreaMsg { index, no_fd: w, size: len, offset: 0 }),
        ] {
            let mut out = [0u8; MAX_MESSAGE];
            let n = r.encode(nr, &mut out).unwrap();
            let h = Header::parse(&out[..n]).unwrap();
            let fds = r.fd_rule().min as usize;
            prop_assert_eq!(BackendRequest::parse(&h, &out[12..n], fds, &OPTS).unwrap(), r);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_reparse(id in 0u32..50, flags in prop_oneof![Just(1u32), Just(9), Just(5), any::<u32>()], payload in proptest::collection::vec(any::<u8>(), 0..300), nfds in 0usize..10) {
        let mut msg = Vec::new();
        msg.extend_from_slice(&id.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        msg.extend_from_slice(&payload);
        if let Ok(h) = Header::parse(&msg) {
            if let Ok(r) = Request::parse(&h, &msg[12..], nfds, &OPTS) {
                let mut out = [0u8; MAX_MESSAGE];
                let n = r.encode(h.need_reply(), &mut out).unwrap();
                let h2 = Header::parse(&out[..n]).unwrap();
                prop_assert_eq!(Request::parse(&h2, &out[12..n], nfds, &OPTS).unwrap(), r);
            }
            if let Ok(code) = FrontendReq::try_from(id) {
                let _ = Reply::parse(code, &h, &msg[12..], nfds, &OPTS);
            }
            let _ = BackendRequest::parse(&h, &msg[12..], nfds, &OPTS);
        }
    }

    /// The table-driven path of `Request::parse` gives exactly what the path
    /// that checks everything in order gives: the same request or the same
    /// error. Payloads have the sizes the ids use, and first bytes that make
    /// valid ring indices and flags likely.
    #[test]
    fn fast_path_agrees_with_the_checked_path(
        id in 0u32..48,
        flags in prop_oneof![Just(1u32), Just(9), Just(5), Just(13), any::<u32>()],
        len in prop_oneof![Just(0usize), Just(8), Just(40), Just(48), Just(52), 0usize..80],
        size_off in prop_oneof![Just(0u32), Just(0), Just(0), Just(1)],
        head in proptest::collection::vec(0u8..4, 16),
        rest in proptest::collection::vec(any::<u8>(), 80),
        nfds in 0usize..4,
    ) {
        let mut payload: Vec<u8> = head.iter().chain(rest.iter()).copied().take(len).collect();
        payload.resize(len, 0);
        let h = Header { request: id, flags: HeaderFlags::from_bits_retain(flags), size: len as u32 + size_off };
        prop_assert_eq!(
            Request::parse(&h, &payload, nfds, &OPTS),
            Request::parse_slow(&h, &payload, nfds, &OPTS)
        );
    }
}

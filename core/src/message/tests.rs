//! Byte-vector tests (bytes → typed value → the same bytes) for every
//! request and reply of both channels, and one test per malformed-input
//! class the wire layer can see.

use std::format;
use std::string::String;
use std::vec::Vec;

use super::*;

/// Hex with whitespace and `_` ignored.
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(core::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

const OPTS: ParseOptions = ParseOptions {
    max_queues: 8,
    xen_mmap: false,
};

/// Parses `msg` (header + payload) as a front-end request.
fn parse_req(msg: &[u8], nfds: usize) -> Result<Request<'_>, WireError> {
    let h = Header::parse(msg)?;
    Request::parse(&h, &msg[HEADER_SIZE..], nfds, &OPTS)
}

/// bytes → value, value → the same bytes.
fn vector(msg: &str, nfds: usize, expected: Request<'_>) {
    let bytes = hex(msg);
    let got = parse_req(&bytes, nfds).unwrap_or_else(|e| panic!("{msg}: {e}"));
    assert_eq!(got, expected, "{msg}");
    let need_reply = Header::parse(&bytes).unwrap().need_reply();
    let mut out = [0u8; MAX_MESSAGE];
    let n = expected.encode(need_reply, &mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..], "encoding of {expected:?}");
}

fn region(ga: u64, size: u64, ua: u64, off: u64) -> MemRegionMsg {
    MemRegionMsg {
        guest_addr: ga,
        size,
        user_addr: ua,
        mmap_offset: off,
        xen: None,
    }
}

// Little-endian field helpers for readable vectors.
fn le32(v: u32) -> String {
    v.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect()
}
fn le64(v: u64) -> String {
    v.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect()
}
fn head(id: u32, flags: u32, size: u32) -> String {
    format!("{} {} {}", le32(id), le32(flags), le32(size))
}

#[test]
fn vectors_every_frontend_request() {
    use Request as R;
    // 1 GET_FEATURES
    vector("01000000 01000000 00000000", 0, R::GetFeatures);
    // 2 SET_FEATURES: VERSION_1 | PROTOCOL_FEATURES | EVENT_IDX
    vector(
        "02000000 01000000 08000000 00000060 01000000",
        0,
        R::SetFeatures(0x1_6000_0000),
    );
    // 3 SET_OWNER, 4 RESET_OWNER
    vector("03000000 01000000 00000000", 0, R::SetOwner);
    vector("04000000 01000000 00000000", 0, R::ResetOwner);
    // 5 SET_MEM_TABLE with two regions, NEED_REPLY
    let t = format!(
        "{} {} {} {} {} {} {} {} {} {}",
        head(5, 9, 8 + 64),
        le32(2),
        le32(0),
        le64(0),
        le64(0x8000_0000),
        le64(0x7f00_0000_0000),
        le64(0),
        le64(0x1_0000_0000),
        le64(0x4000_0000),
        le64(0x7f00_8000_0000),
    ) + &le64(0x8000_0000);
    let regions = [
        region(0, 0x8000_0000, 0x7f00_0000_0000, 0),
        region(0x1_0000_0000, 0x4000_0000, 0x7f00_8000_0000, 0x8000_0000),
    ];
    vector(&t, 2, R::SetMemTable(MemTable::new(&regions).unwrap()));
    // 6 SET_LOG_BASE
    vector(
        &format!("{} {} {}", head(6, 1, 16), le64(0x2000), le64(0)),
        1,
        R::SetLogBase(LogMsg {
            size: 0x2000,
            offset: 0,
        }),
    );
    // 7 SET_LOG_FD
    vector(&head(7, 1, 0), 1, R::SetLogFd);
    // 8 SET_VRING_NUM ring 1, 256 entries
    vector(
        "08000000 01000000 08000000 01000000 00010000",
        0,
        R::SetVringNum(VringStateMsg { index: 1, num: 256 }),
    );
    // 9 SET_VRING_ADDR with F_LOG: desc, used, avail, log
    vector(
        &format!(
            "{} {} {} {} {} {} {}",
            head(9, 1, 40),
            le32(0),
            le32(1),
            le64(0x7f00_0000_1000),
            le64(0x7f00_0000_3000),
            le64(0x7f00_0000_2000),
            le64(0x3000)
        ),
        0,
        R::SetVringAddr(VringAddrMsg {
            index: 0,
            log: true,
            desc: 0x7f00_0000_1000,
            used: 0x7f00_0000_3000,
            avail: 0x7f00_0000_2000,
            log_addr: 0x3000,
        }),
    );
    // 10 SET_VRING_BASE, 11 GET_VRING_BASE
    vector(
        "0a000000 01000000 08000000 00000000 feff0000",
        0,
        R::SetVringBase(VringStateMsg {
            index: 0,
            num: 0xfffe,
        }),
    );
    vector(
        "0b000000 01000000 08000000 02000000 00000000",
        0,
        R::GetVringBase(2),
    );
    // 12-14 SET_VRING_KICK/CALL/ERR: with an fd, and no-fd (bit 8)
    let fd = |index, no_fd| VringFdMsg { index, no_fd };
    vector(
        "0c000000 09000000 08000000 01000000 00000000",
        1,
        R::SetVringKick(fd(1, false)),
    );
    vector(
        "0c000000 01000000 08000000 00010000 00000000",
        0,
        R::SetVringKick(fd(0, true)),
    );
    vector(
        "0d000000 09000000 08000000 03000000 00000000",
        1,
        R::SetVringCall(fd(3, false)),
    );
    vector(
        "0e000000 01000000 08000000 07010000 00000000",
        0,
        R::SetVringErr(fd(7, true)),
    );
    // 15 GET_PROTOCOL_FEATURES, 16 SET_PROTOCOL_FEATURES
    vector("0f000000 01000000 00000000", 0, R::GetProtocolFeatures);
    vector(
        "10000000 01000000 08000000 09b00000 00000000",
        0,
        R::SetProtocolFeatures(0xb009),
    );
    // 17 GET_QUEUE_NUM
    vector("11000000 01000000 00000000", 0, R::GetQueueNum);
    // 18 SET_VRING_ENABLE
    vector(
        "12000000 09000000 08000000 01000000 01000000",
        0,
        R::SetVringEnable {
            index: 1,
            enable: true,
        },
    );
    vector(
        "12000000 01000000 08000000 00000000 00000000",
        0,
        R::SetVringEnable {
            index: 0,
            enable: false,
        },
    );
    // 19 SEND_RARP
    vector(
        "13000000 01000000 08000000 52540012 34560000",
        0,
        R::SendRarp([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
    );
    // 20 NET_SET_MTU
    vector(
        "14000000 09000000 08000000 dc050000 00000000",
        0,
        R::NetSetMtu(1500),
    );
    // 21 SET_BACKEND_REQ_FD
    vector("15000000 09000000 00000000", 1, R::SetBackendReqFd);
    // 22 IOTLB_MSG update and invalidate
    vector(
        &format!(
            "{} {} {} {} 0302 000000000000",
            head(22, 9, 32),
            le64(0x1000),
            le64(0x2000),
            le64(0x7f00_0000_0000)
        ),
        0,
        R::IotlbMsg(IotlbMsg {
            iova: 0x1000,
            size: 0x2000,
            uaddr: 0x7f00_0000_0000,
            perm: IotlbPerm::ReadWrite,
            kind: IotlbKind::Update,
        }),
    );
    vector(
        &format!(
            "{} {} {} {} 0003 000000000000",
            head(22, 9, 32),
            le64(0x1000),
            le64(0x2000),
            le64(0)
        ),
        0,
        R::IotlbMsg(IotlbMsg {
            iova: 0x1000,
            size: 0x2000,
            uaddr: 0,
            perm: IotlbPerm::None,
            kind: IotlbKind::Invalidate,
        }),
    );
    // 23 SET_VRING_ENDIAN
    vector(
        "17000000 01000000 08000000 01000000 01000000",
        0,
        R::SetVringEndian {
            index: 1,
            endian: Endian::Big,
        },
    );
    // 24 GET_CONFIG: 60 bytes of virtio-blk config, placeholder zeroes
    let zeros60 = "00".repeat(60);
    let cfg = [0u8; 60];
    vector(
        &format!(
            "{} {} {} {} {}",
            head(24, 1, 72),
            le32(0),
            le32(60),
            le32(0),
            zeros60
        ),
        0,
        R::GetConfig(ConfigMsg {
            offset: 0,
            kind: ConfigWriteKind::Frontend,
            data: &cfg,
        }),
    );
    // 25 SET_CONFIG: writeback byte at offset 32, migration write
    vector(
        &format!(
            "{} {} {} {} 01",
            head(25, 9, 13),
            le32(32),
            le32(1),
            le32(1)
        ),
        0,
        R::SetConfig(ConfigMsg {
            offset: 32,
            kind: ConfigWriteKind::Migration,
            data: &[1],
        }),
    );
    // 26 CREATE_CRYPTO_SESSION: opaque
    let blob: Vec<u8> = (0u8..24).collect();
    vector(
        &format!(
            "{} {}",
            head(26, 1, 24),
            blob.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
        0,
        R::CreateCryptoSession(&blob),
    );
    // 27 CLOSE_CRYPTO_SESSION
    vector(
        "1b000000 01000000 08000000 05000000 00000000",
        0,
        R::CloseCryptoSession(5),
    );
    // 28-30 POSTCOPY_*
    vector("1c000000 01000000 00000000", 0, R::PostcopyAdvise);
    vector("1d000000 09000000 00000000", 0, R::PostcopyListen);
    vector("1e000000 01000000 00000000", 0, R::PostcopyEnd);
    // 31 GET_INFLIGHT_FD, 32 SET_INFLIGHT_FD
    vector(
        &format!(
            "{} {} {} 0200 0001 00000000",
            head(31, 1, 24),
            le64(0),
            le64(0)
        ),
        0,
        R::GetInflightFd(InflightMsg {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 256,
        }),
    );
    vector(
        &format!(
            "{} {} {} 0200 0001 00000000",
            head(32, 1, 24),
            le64(0x2080),
            le64(0)
        ),
        1,
        R::SetInflightFd(InflightMsg {
            mmap_size: 0x2080,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 256,
        }),
    );
    // 33 GPU_SET_SOCKET, 34 RESET_DEVICE
    vector("21000000 01000000 00000000", 1, R::GpuSetSocket);
    vector("22000000 01000000 00000000", 0, R::ResetDevice);
    // 35 VRING_KICK
    vector(
        "23000000 09000000 08000000 01000000 00000000",
        0,
        R::VringKick(1),
    );
    // 36 GET_MAX_MEM_SLOTS
    vector("24000000 01000000 00000000", 0, R::GetMaxMemSlots);
    // 37 ADD_MEM_REG, 38 REM_MEM_REG
    let single = format!(
        "{} {} {} {}",
        le64(0x1_0000_0000),
        le64(0x100_0000),
        le64(0x7f00_1000_0000),
        le64(0x1000)
    );
    let r = region(0x1_0000_0000, 0x100_0000, 0x7f00_1000_0000, 0x1000);
    vector(
        &format!("{} {} {}", head(37, 9, 40), le64(0), single),
        1,
        R::AddMemReg(r),
    );
    vector(
        &format!("{} {} {}", head(38, 9, 40), le64(0), single),
        0,
        R::RemMemReg(r),
    );
    // REM_MEM_REG tolerates one fd.
    assert_eq!(
        parse_req(
            &hex(&format!("{} {} {}", head(38, 9, 40), le64(0), single)),
            1
        ),
        Ok(R::RemMemReg(r))
    );
    // 39 SET_STATUS, 40 GET_STATUS
    vector(
        "27000000 09000000 08000000 0f000000 00000000",
        0,
        R::SetStatus(0x0f),
    );
    vector("28000000 01000000 00000000", 0, R::GetStatus);
    // 41 GET_SHARED_OBJECT
    vector(
        "29000000 01000000 10000000 00112233445566778899aabbccddeeff",
        0,
        R::GetSharedObject([
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ]),
    );
    // 42 SET_DEVICE_STATE_FD (load), 43 CHECK_DEVICE_STATE
    vector(
        "2a000000 01000000 08000000 01000000 00000000",
        1,
        R::SetDeviceStateFd(DeviceStateDirection::Load),
    );
    vector("2b000000 01000000 00000000", 0, R::CheckDeviceState);
    // 44 GET_SHMEM_CONFIG, 45 GET_VRING_BASE_SKIP_DRAIN
    vector("2c000000 01000000 00000000", 0, R::GetShmemConfig);
    vector(
        "2d000000 01000000 08000000 01000000 00000000",
        0,
        R::GetVringBaseSkipDrain(1),
    );
}

#[test]
fn every_frontend_code_has_a_vector() {
    // The vector test above names each id once; this keeps the list honest if
    // a code is added without one.
    assert_eq!(FrontendReq::ALL.len(), 45);
    for (i, code) in FrontendReq::ALL.iter().enumerate() {
        assert_eq!(code.id(), i as u32 + 1);
        assert_eq!(FrontendReq::try_from(code.id()), Ok(*code));
    }
    assert_eq!(BackendReq::ALL.len(), 10);
    for (i, code) in BackendReq::ALL.iter().enumerate() {
        assert_eq!(code.id(), i as u32 + 1);
    }
}

/// reply bytes → value → the same bytes.
fn reply_vector(request: FrontendReq, msg: &str, nfds: usize, expected: Reply<'_>) {
    let bytes = hex(msg);
    let h = Header::parse(&bytes).unwrap();
    let got = Reply::parse(request, &h, &bytes[HEADER_SIZE..], nfds, &OPTS)
        .unwrap_or_else(|e| panic!("{msg}: {e}"));
    assert_eq!(got, expected);
    let mut out = [0u8; MAX_MESSAGE];
    let n = expected.encode(request, &mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..]);
}

#[test]
fn vectors_every_frontend_reply() {
    use FrontendReq as C;
    // u64 replies
    for (code, v) in [
        (C::GetFeatures, 0x1_7000_0000u64),
        (C::GetProtocolFeatures, 0xb209),
        (C::GetQueueNum, 2),
        (C::GetMaxMemSlots, 509),
        (C::GetStatus, 0x0f),
        (C::IotlbMsg, 0),
        (C::PostcopyEnd, 0),
        (C::CheckDeviceState, 0),
        (C::CloseCryptoSession, 0),
    ] {
        reply_vector(
            code,
            &format!("{} {}", head(code.id(), 5, 8), le64(v)),
            0,
            Reply::U64(v),
        );
    }
    // REPLY_ACK for every request without a reply of its own
    for code in FrontendReq::ALL.iter().filter(|c| !c.has_reply()) {
        reply_vector(
            *code,
            &format!("{} {}", head(code.id(), 5, 8), le64(1)),
            0,
            Reply::ack(false),
        );
    }
    // GET_VRING_BASE, SKIP_DRAIN
    for code in [C::GetVringBase, C::GetVringBaseSkipDrain] {
        reply_vector(
            code,
            &format!(
                "{} {} {}",
                head(code.id(), 5, 8),
                le32(1),
                le32(0x8010_8010)
            ),
            0,
            Reply::VringState {
                index: 1,
                num: 0x8010_8010,
            },
        );
    }
    // GET_CONFIG success and failure
    let data = [7u8; 8];
    reply_vector(
        C::GetConfig,
        &format!(
            "{} {} {} {} {}",
            head(24, 5, 20),
            le32(0),
            le32(8),
            le32(0),
            "07".repeat(8)
        ),
        0,
        Reply::Config(ConfigMsg {
            offset: 0,
            kind: ConfigWriteKind::Frontend,
            data: &data,
        }),
    );
    reply_vector(C::GetConfig, &head(24, 5, 0), 0, Reply::ConfigFailed);
    // GET_INFLIGHT_FD with an area and an fd, and without
    let infl = |size| InflightMsg {
        mmap_size: size,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 128,
    };
    reply_vector(
        C::GetInflightFd,
        &format!(
            "{} {} {} 0100 8000 00000000",
            head(31, 5, 24),
            le64(4096),
            le64(0)
        ),
        1,
        Reply::Inflight(infl(4096)),
    );
    reply_vector(
        C::GetInflightFd,
        &format!(
            "{} {} {} 0100 8000 00000000",
            head(31, 5, 24),
            le64(0),
            le64(0)
        ),
        0,
        Reply::Inflight(infl(0)),
    );
    // SET_LOG_BASE reply (content unspecified, 0/8/16 bytes accepted)
    reply_vector(C::SetLogBase, &head(6, 5, 0), 0, Reply::LogBaseDone);
    for size in [8usize, 16] {
        let msg = format!("{} {}", head(6, 5, size as u32), "00".repeat(size));
        let b = hex(&msg);
        let h = Header::parse(&b).unwrap();
        assert_eq!(
            Reply::parse(C::SetLogBase, &h, &b[12..], 0, &OPTS),
            Ok(Reply::LogBaseDone)
        );
    }
    // SET_MEM_TABLE / ADD_MEM_REG postcopy replies
    let regions = [region(0, 0x1000, 0x7f12_0000_0000, 0)];
    reply_vector(
        C::SetMemTable,
        &format!(
            "{} {} {} {} {} {} {}",
            head(5, 5, 40),
            le32(1),
            le32(0),
            le64(0),
            le64(0x1000),
            le64(0x7f12_0000_0000),
            le64(0)
        ),
        0,
        Reply::MemTable(MemTable::new(&regions).unwrap()),
    );
    reply_vector(
        C::AddMemReg,
        &format!(
            "{} {} {} {} {} {}",
            head(37, 5, 40),
            le64(0),
            le64(0),
            le64(0x1000),
            le64(0x7f12_0000_0000),
            le64(0)
        ),
        0,
        Reply::MemRegion(region(0, 0x1000, 0x7f12_0000_0000, 0)),
    );
    // CREATE_CRYPTO_SESSION reply
    let blob = [0xabu8; 16];
    reply_vector(
        C::CreateCryptoSession,
        &format!("{} {}", head(26, 5, 16), "ab".repeat(16)),
        0,
        Reply::CryptoSession(&blob),
    );
    // POSTCOPY_ADVISE: no payload, one userfaultfd
    reply_vector(C::PostcopyAdvise, &head(28, 5, 0), 1, Reply::PostcopyAdvise);
    // SET_DEVICE_STATE_FD: ok without fd (0x100), ok with fd (0), error (1)
    reply_vector(
        C::SetDeviceStateFd,
        &format!("{} {}", head(42, 5, 8), le64(0x100)),
        0,
        Reply::DeviceStateFd {
            error: 0,
            no_fd: true,
        },
    );
    reply_vector(
        C::SetDeviceStateFd,
        &format!("{} {}", head(42, 5, 8), le64(0)),
        1,
        Reply::DeviceStateFd {
            error: 0,
            no_fd: false,
        },
    );
    reply_vector(
        C::SetDeviceStateFd,
        &format!("{} {}", head(42, 5, 8), le64(0x101)),
        0,
        Reply::DeviceStateFd {
            error: 1,
            no_fd: true,
        },
    );
    // GET_SHARED_OBJECT: u64 0 with an optional dma-buf fd
    reply_vector(
        C::GetSharedObject,
        &format!("{} {}", head(41, 5, 8), le64(0)),
        1,
        Reply::U64(0),
    );
    // GET_SHMEM_CONFIG
    let mut cfg = <raw::ShmemConfig as zerocopy::FromZeros>::new_zeroed();
    cfg.nregions = 1.into();
    cfg.memory_sizes[3] = 0x20_0000.into();
    let mut msg = head(44, 5, 2056);
    msg += &le32(1);
    msg += &le32(0);
    for i in 0..256 {
        msg += &le64(if i == 3 { 0x20_0000 } else { 0 });
    }
    reply_vector(C::GetShmemConfig, &msg, 0, Reply::ShmemConfig(&cfg));
}

fn parse_backend(msg: &[u8], nfds: usize) -> Result<BackendRequest, WireError> {
    let h = Header::parse(msg)?;
    BackendRequest::parse(&h, &msg[HEADER_SIZE..], nfds, &OPTS)
}

fn backend_vector(msg: &str, nfds: usize, expected: BackendRequest) {
    let bytes = hex(msg);
    assert_eq!(parse_backend(&bytes, nfds), Ok(expected), "{msg}");
    let mut out = [0u8; MAX_MESSAGE];
    let n = expected
        .encode(Header::parse(&bytes).unwrap().need_reply(), &mut out)
        .unwrap();
    assert_eq!(&out[..n], &bytes[..]);
}

#[test]
fn vectors_every_backend_request_and_reply() {
    use BackendRequest as B;
    backend_vector(
        &format!(
            "{} {} {} {} 0101 000000000000",
            head(1, 9, 32),
            le64(0x5000),
            le64(0),
            le64(0)
        ),
        0,
        B::IotlbMsg(IotlbMsg {
            iova: 0x5000,
            size: 0,
            uaddr: 0,
            perm: IotlbPerm::Read,
            kind: IotlbKind::Miss,
        }),
    );
    backend_vector(
        &format!(
            "{} {} {} {} 0204 000000000000",
            head(1, 1, 32),
            le64(0x5000),
            le64(0),
            le64(0)
        ),
        0,
        B::IotlbMsg(IotlbMsg {
            iova: 0x5000,
            size: 0,
            uaddr: 0,
            perm: IotlbPerm::Write,
            kind: IotlbKind::AccessFail,
        }),
    );
    backend_vector(&head(2, 9, 0), 0, B::ConfigChange);
    backend_vector(
        &format!(
            "{} {} {} {}",
            head(3, 9, 24),
            le64(2),
            le64(4096),
            le64(0x3000)
        ),
        1,
        B::VringHostNotifier(VringAreaMsg {
            index: 2,
            no_fd: false,
            size: 4096,
            offset: 0x3000,
        }),
    );
    backend_vector(
        &format!("{} {} {} {}", head(3, 9, 24), le64(0x102), le64(0), le64(0)),
        0,
        B::VringHostNotifier(VringAreaMsg {
            index: 2,
            no_fd: true,
            size: 0,
            offset: 0,
        }),
    );
    backend_vector(
        &format!("{} {} {}", head(4, 9, 8), le32(1), le32(0)),
        0,
        B::VringCall(1),
    );
    backend_vector(
        &format!("{} {} {}", head(5, 9, 8), le32(0), le32(0)),
        0,
        B::VringErr(0),
    );
    let u = [0x42u8; 16];
    let uh = "42".repeat(16);
    backend_vector(
        &format!("{} {uh}", head(6, 1, 16)),
        0,
        B::SharedObjectAdd(u),
    );
    backend_vector(
        &format!("{} {uh}", head(7, 1, 16)),
        0,
        B::SharedObjectRemove(u),
    );
    backend_vector(
        &format!("{} {uh}", head(8, 1, 16)),
        0,
        B::SharedObjectLookup(u),
    );
    let m = ShmemMapMsg {
        shmid: 1,
        fd_offset: 0,
        shm_offset: 0x20_0000,
        len: 0x1000,
        writable: true,
    };
    let mh = format!(
        "01 00000000000000 {} {} {} {}",
        le64(0),
        le64(0x20_0000),
        le64(0x1000),
        le64(1)
    );
    backend_vector(&format!("{} {mh}", head(9, 9, 40)), 1, B::ShmemMap(m));
    backend_vector(&format!("{} {mh}", head(10, 9, 40)), 0, B::ShmemUnmap(m));

    // Replies: u64, LOOKUP may carry one fd on success only.
    for code in BackendReq::ALL {
        let mut out = [0u8; 32];
        let n = BackendRequest::encode_reply(*code, 0, &mut out).unwrap();
        assert_eq!(
            &out[..n],
            &hex(&format!("{} {}", head(code.id(), 5, 8), le64(0)))[..]
        );
        let h = Header::parse(&out).unwrap();
        assert_eq!(
            BackendRequest::parse_reply(*code, &h, &out[12..n], 0),
            Ok(0)
        );
        let lookup = *code == BackendReq::SharedObjectLookup;
        assert_eq!(
            BackendRequest::parse_reply(*code, &h, &out[12..n], 1).is_ok(),
            lookup
        );
    }
    let mut out = [0u8; 32];
    let n = BackendRequest::encode_reply(BackendReq::SharedObjectLookup, 1, &mut out).unwrap();
    let h = Header::parse(&out).unwrap();
    assert!(
        BackendRequest::parse_reply(BackendReq::SharedObjectLookup, &h, &out[12..n], 1).is_err()
    );
}

// ---- malformed input, one test per class of notes §7.2 the wire sees ----

#[test]
fn malformed_header_version_bits() {
    for flags in [0u32, 2, 3, 0x0b, 0x0e] {
        assert_eq!(
            Header::parse(&hex(&head(1, flags, 0))),
            Err(WireError::BadVersion((flags & 3) as u8))
        );
    }
}

#[test]
fn malformed_header_reserved_flags() {
    for flags in [0x11u32, 0x8000_0001, 0x101] {
        assert_eq!(
            Header::parse(&hex(&head(1, flags, 0))),
            Err(WireError::ReservedFlags(flags))
        );
    }
}

#[test]
fn malformed_reply_bit_on_request() {
    assert_eq!(
        parse_req(&hex(&head(1, 5, 0)), 0),
        Err(WireError::ReplyBitOnRequest)
    );
    assert_eq!(
        parse_backend(&hex(&head(2, 5, 0)), 0),
        Err(WireError::ReplyBitOnRequest)
    );
}

#[test]
fn malformed_reply_flags_and_id() {
    // NEED_REPLY left set in a reply: QEMU refuses it, so do we.
    let b = hex(&format!("{} {}", head(1, 0xd, 8), le64(0)));
    let h = Header::parse(&b).unwrap();
    assert_eq!(
        Reply::parse(FrontendReq::GetFeatures, &h, &b[12..], 0, &OPTS),
        Err(WireError::BadReplyFlags(0xd))
    );
    // A reply without the REPLY bit.
    let b = hex(&format!("{} {}", head(1, 1, 8), le64(0)));
    let h = Header::parse(&b).unwrap();
    assert_eq!(
        Reply::parse(FrontendReq::GetFeatures, &h, &b[12..], 0, &OPTS),
        Err(WireError::BadReplyFlags(1))
    );
    // A reply to another request.
    let b = hex(&format!("{} {}", head(15, 5, 8), le64(0)));
    let h = Header::parse(&b).unwrap();
    assert_eq!(
        Reply::parse(FrontendReq::GetFeatures, &h, &b[12..], 0, &OPTS),
        Err(WireError::ReplyMismatch {
            expected: 1,
            got: 15
        })
    );
}

#[test]
fn malformed_request_id_zero_and_unknown() {
    for id in [0u32, 46, 1000, 1002, u32::MAX] {
        assert_eq!(
            parse_req(&hex(&head(id, 1, 0)), 0),
            Err(WireError::UnknownRequest(id))
        );
    }
    for id in [0u32, 11, 1006] {
        assert_eq!(
            parse_backend(&hex(&head(id, 1, 0)), 0),
            Err(WireError::UnknownRequest(id))
        );
    }
}

#[test]
fn malformed_payload_size_wrong_for_id() {
    // Every fixed-size request with one byte too few and one too many.
    for code in FrontendReq::ALL {
        for size in [0usize, 4, 7, 9, 16, 24, 39, 41] {
            let msg: Vec<u8> = hex(&head(code.id(), 1, size as u32))
                .into_iter()
                .chain(core::iter::repeat_n(0, size))
                .collect();
            let ok = parse_req(&msg, 0).is_ok() || parse_req(&msg, 1).is_ok();
            let allowed = match code {
                FrontendReq::GetFeatures
                | FrontendReq::SetOwner
                | FrontendReq::ResetOwner
                | FrontendReq::SetLogFd
                | FrontendReq::GetProtocolFeatures
                | FrontendReq::GetQueueNum
                | FrontendReq::SetBackendReqFd
                | FrontendReq::PostcopyAdvise
                | FrontendReq::PostcopyListen
                | FrontendReq::PostcopyEnd
                | FrontendReq::GpuSetSocket
                | FrontendReq::ResetDevice
                | FrontendReq::GetMaxMemSlots
                | FrontendReq::GetStatus
                | FrontendReq::CheckDeviceState
                | FrontendReq::GetShmemConfig => &[0usize][..],
                // Zero-filled u64/state payloads that are valid.
                FrontendReq::SetFeatures
                | FrontendReq::SetProtocolFeatures
                | FrontendReq::NetSetMtu
                | FrontendReq::SendRarp
                | FrontendReq::CloseCryptoSession
                | FrontendReq::SetStatus
                | FrontendReq::SetVringKick
                | FrontendReq::SetVringCall
                | FrontendReq::SetVringErr
                | FrontendReq::SetVringBase
                | FrontendReq::GetVringBase
                | FrontendReq::GetVringBaseSkipDrain
                | FrontendReq::SetVringEnable
                | FrontendReq::SetVringEndian
                | FrontendReq::VringKick
                | FrontendReq::SetDeviceStateFd => &[8][..],
                // Zero-filled and valid: crypto blobs of 16 bytes or more,
                // an address-0 vring (validity of addresses is not the
                // wire's business), a 0-byte config read.
                FrontendReq::CreateCryptoSession => &[16, 24, 39, 41][..],
                FrontendReq::SetVringAddr => &[40][..],
                FrontendReq::GetConfig | FrontendReq::SetConfig => &[][..],
                // Zero-filled is invalid for the rest (num 0, size 0, …).
                _ => &[][..],
            };
            assert_eq!(ok, allowed.contains(&size), "{code} size {size}");
        }
    }
}

#[test]
fn malformed_size_above_cap() {
    assert_eq!(
        Header::parse(&hex(&head(5, 1, MAX_PAYLOAD as u32 + 1))),
        Err(WireError::PayloadTooLarge(MAX_PAYLOAD as u32 + 1))
    );
    assert_eq!(
        Header::parse(&hex(&head(5, 1, u32::MAX))),
        Err(WireError::PayloadTooLarge(u32::MAX))
    );
}

#[test]
fn malformed_truncated() {
    // Header itself truncated.
    assert!(matches!(
        Header::parse(&hex("01000000 01000000 0000")),
        Err(WireError::Truncated {
            needed: 12,
            got: 10
        })
    ));
    // Payload shorter than the header says.
    let b = hex("02000000 01000000 08000000 00000000");
    assert_eq!(
        parse_req(&b, 0),
        Err(WireError::Truncated { needed: 8, got: 4 })
    );
}

#[test]
fn malformed_fd_counts() {
    // A message that takes none, with one.
    assert_eq!(
        parse_req(&hex(&head(1, 1, 0)), 1),
        Err(WireError::TooManyFds { allowed: 0, got: 1 })
    );
    // A kick with the no-fd bit, with an fd.
    assert_eq!(
        parse_req(&hex("0c000000 01000000 08000000 00010000 00000000"), 1),
        Err(WireError::TooManyFds { allowed: 0, got: 1 })
    );
    // A kick without the no-fd bit, without an fd.
    assert_eq!(
        parse_req(&hex("0c000000 01000000 08000000 00000000 00000000"), 0),
        Err(WireError::MissingFds { needed: 1, got: 0 })
    );
    // Too many for anything.
    assert_eq!(
        parse_req(&hex(&head(21, 1, 0)), 9),
        Err(WireError::TooManyFds { allowed: 1, got: 9 })
    );
    // ADD_MEM_REG needs exactly one; REM_MEM_REG at most one.
    let single = format!(
        "{} {} {} {} {}",
        le64(0),
        le64(0),
        le64(0x1000),
        le64(0),
        le64(0)
    );
    assert!(matches!(
        parse_req(&hex(&format!("{} {single}", head(37, 1, 40))), 0),
        Err(WireError::MissingFds { .. })
    ));
    assert!(matches!(
        parse_req(&hex(&format!("{} {single}", head(38, 1, 40))), 2),
        Err(WireError::TooManyFds { .. })
    ));
}

fn mem_table(n: u32, regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut s = format!(
        "{} {} {}",
        head(5, 1, 8 + 32 * regions.len() as u32),
        le32(n),
        le32(0)
    );
    for r in regions {
        s += &format!(" {} {} {} {}", le64(r.0), le64(r.1), le64(r.2), le64(r.3));
    }
    hex(&s)
}

#[test]
fn malformed_nregions() {
    let r = (0u64, 0x1000u64, 0x7000_0000u64, 0u64);
    // 0 regions.
    assert_eq!(
        parse_req(&mem_table(0, &[]), 0),
        Err(WireError::BadRegionCount(0))
    );
    // Above 8.
    assert_eq!(
        parse_req(&mem_table(9, &[r; 9]), 9),
        Err(WireError::BadRegionCount(9))
    );
    // nregions disagreeing with the payload size.
    assert!(matches!(
        parse_req(&mem_table(3, &[r; 2]), 3),
        Err(WireError::BadSize { .. })
    ));
    // nregions different from the fd count.
    assert_eq!(
        parse_req(&mem_table(2, &[r, (0x1000, 0x1000, 0x7001_0000, 0)]), 1),
        Err(WireError::MissingFds { needed: 2, got: 1 })
    );
    assert_eq!(
        parse_req(&mem_table(1, &[r]), 2),
        Err(WireError::TooManyFds { allowed: 1, got: 2 })
    );
}

#[test]
fn malformed_region_overflow_and_empty() {
    for bad in [
        (u64::MAX - 0xfff, 0x2000, 0, 0),
        (0, 0x2000, u64::MAX, 0),
        (0, 0x2000, 0, u64::MAX - 1),
        (0, u64::MAX, 2, 0),
    ] {
        assert_eq!(
            parse_req(&mem_table(1, &[bad]), 1),
            Err(WireError::RangeOverflow),
            "{bad:x?}"
        );
    }
    // The very last byte of the address space is fine.
    assert!(parse_req(&mem_table(1, &[(u64::MAX - 0xfff, 0x1000, 0, 0)]), 1).is_ok());
    assert_eq!(
        parse_req(&mem_table(1, &[(0, 0, 0, 0)]), 1),
        Err(WireError::EmptyRegion)
    );
}

#[test]
fn malformed_ring_index_u32() {
    // OPTS allows 8 rings.
    for id in [8u32, 10, 11, 18, 23, 35, 45] {
        for index in [8u32, 256, 0x1_0000, u32::MAX] {
            let b = hex(&format!("{} {} {}", head(id, 1, 8), le32(index), le32(1)));
            assert_eq!(
                parse_req(&b, 0),
                Err(WireError::QueueIndex(index)),
                "id {id} index {index}"
            );
        }
    }
    let b = hex(&format!(
        "{} {} {} {} {} {} {}",
        head(9, 1, 40),
        le32(0x1_0003),
        le32(0),
        le64(0),
        le64(0),
        le64(0),
        le64(0)
    ));
    assert_eq!(parse_req(&b, 0), Err(WireError::QueueIndex(0x1_0003)));
    // GET_VRING_BASE reply with a ring index out of range.
    let b = hex(&format!("{} {} {}", head(11, 5, 8), le32(9), le32(0)));
    let h = Header::parse(&b).unwrap();
    assert_eq!(
        Reply::parse(FrontendReq::GetVringBase, &h, &b[12..], 0, &OPTS),
        Err(WireError::QueueIndex(9))
    );
}

#[test]
fn malformed_ring_index_u8_in_u64() {
    for id in [12u32, 13, 14] {
        // Index 8..255 out of range for 8 rings.
        let b = hex(&format!("{} {}", head(id, 1, 8), le64(0x108)));
        assert_eq!(parse_req(&b, 0), Err(WireError::QueueIndex(8)));
        // Bits above the no-fd flag: an index ≥ 256 smuggled in, refused.
        // A value above 32 bits is reported saturated.
        for (v, reported) in [
            (0x200u64, 0x200u32),
            (0x1_0000_0001, u32::MAX),
            (1 << 63, u32::MAX),
        ] {
            let b = hex(&format!("{} {}", head(id, 1, 8), le64(v)));
            assert_eq!(parse_req(&b, 1), Err(WireError::ReservedBits(reported)));
        }
    }
}

#[test]
fn malformed_ring_index_u64_vring_area() {
    let b = hex(&format!(
        "{} {} {} {}",
        head(3, 1, 24),
        le64(9),
        le64(4096),
        le64(0)
    ));
    assert_eq!(parse_backend(&b, 1), Err(WireError::QueueIndex(9)));
    let b = hex(&format!(
        "{} {} {} {}",
        head(3, 1, 24),
        le64(0x1_0000_0001),
        le64(4096),
        le64(0)
    ));
    assert_eq!(parse_backend(&b, 1), Err(WireError::ReservedBits(u32::MAX)));
    // Offset + size overflow.
    let b = hex(&format!(
        "{} {} {} {}",
        head(3, 1, 24),
        le64(1),
        le64(4096),
        le64(u64::MAX)
    ));
    assert_eq!(parse_backend(&b, 1), Err(WireError::RangeOverflow));
}

#[test]
fn malformed_inflight_num_queues_zero() {
    for (id, nfds) in [(31u32, 0usize), (32, 1)] {
        let b = hex(&format!(
            "{} {} {} 0000 0001 00000000",
            head(id, 1, 24),
            le64(4096),
            le64(0)
        ));
        assert_eq!(parse_req(&b, nfds), Err(WireError::BadValue(0)));
        let b = hex(&format!(
            "{} {} {} 0100 0000 00000000",
            head(id, 1, 24),
            le64(4096),
            le64(0)
        ));
        assert_eq!(parse_req(&b, nfds), Err(WireError::BadValue(0)));
    }
    // SET_INFLIGHT_FD with size 0, and with offset + size overflowing.
    let b = hex(&format!(
        "{} {} {} 0100 0001 00000000",
        head(32, 1, 24),
        le64(0),
        le64(0)
    ));
    assert_eq!(parse_req(&b, 1), Err(WireError::EmptyRegion));
    let b = hex(&format!(
        "{} {} {} 0100 0001 00000000",
        head(32, 1, 24),
        le64(2),
        le64(u64::MAX)
    ));
    assert_eq!(parse_req(&b, 1), Err(WireError::RangeOverflow));
}

#[test]
fn malformed_config_range() {
    // Offset and size are reported saturated to 16 bits.
    for (offset, size, reported) in [
        (0u32, 257u32, (0u16, 257u16)),
        (200, 57, (200, 57)),
        (256, 1, (256, 1)),
        (u32::MAX, 2, (u16::MAX, 2)),
        (1, u32::MAX, (1, u16::MAX)),
    ] {
        let data = "00".repeat(size.min(300) as usize);
        let b = hex(&format!(
            "{} {} {} {} {data}",
            head(25, 1, 12 + size.min(300)),
            le32(offset),
            le32(size),
            le32(0)
        ));
        assert_eq!(
            parse_req(&b, 0),
            Err(WireError::ConfigRange {
                offset: reported.0,
                size: reported.1
            }),
            "{offset}+{size}"
        );
    }
    // The full 256 bytes are fine; size disagreeing with the payload is not.
    let b = hex(&format!(
        "{} {} {} {} {}",
        head(25, 1, 268),
        le32(0),
        le32(256),
        le32(0),
        "00".repeat(256)
    ));
    assert!(parse_req(&b, 0).is_ok());
    let b = hex(&format!(
        "{} {} {} {} {}",
        head(25, 1, 14),
        le32(0),
        le32(4),
        le32(0),
        "0000"
    ));
    assert!(matches!(parse_req(&b, 0), Err(WireError::BadSize { .. })));
    // Unknown flags.
    let b = hex(&format!(
        "{} {} {} {} 00",
        head(25, 1, 13),
        le32(0),
        le32(1),
        le32(2)
    ));
    assert_eq!(parse_req(&b, 0), Err(WireError::BadValue(2)));
}

#[test]
fn malformed_field_values() {
    // SET_VRING_NUM 0 and above 32768.
    for num in [0u32, 32769, u32::MAX] {
        let b = hex(&format!("{} {} {}", head(8, 1, 8), le32(0), le32(num)));
        assert_eq!(parse_req(&b, 0), Err(WireError::BadValue(num)));
    }
    // SET_VRING_ENABLE other than 0/1.
    let b = hex(&format!("{} {} {}", head(18, 1, 8), le32(0), le32(2)));
    assert_eq!(parse_req(&b, 0), Err(WireError::BadValue(2)));
    // SET_VRING_ADDR with unknown flags.
    let b = hex(&format!(
        "{} {} {} {} {} {} {}",
        head(9, 1, 40),
        le32(0),
        le32(2),
        le64(0),
        le64(0),
        le64(0),
        le64(0)
    ));
    assert_eq!(parse_req(&b, 0), Err(WireError::ReservedBits(2)));
    // SET_STATUS above a byte.
    let b = hex(&format!("{} {}", head(39, 1, 8), le64(0x100)));
    assert_eq!(parse_req(&b, 0), Err(WireError::BadValue(0x100)));
    // SET_LOG_BASE with size + offset overflowing (CVE-2020-10722 class).
    let b = hex(&format!(
        "{} {} {}",
        head(6, 1, 16),
        le64(0x1000),
        le64(u64::MAX - 0x10)
    ));
    assert_eq!(parse_req(&b, 1), Err(WireError::RangeOverflow));
    // IOTLB with bad type / perm; a miss on the main socket.
    for (perm, kind) in [(4u8, 2u8), (3, 0), (3, 5), (3, 1)] {
        let b = hex(&format!(
            "{} {} {} {} {perm:02x}{kind:02x} 000000000000",
            head(22, 1, 32),
            le64(0),
            le64(0x1000),
            le64(0)
        ));
        assert!(parse_req(&b, 0).is_err(), "perm {perm} kind {kind}");
    }
    // Device state transfer with an unknown direction or phase.
    for (d, p) in [(2u32, 0u32), (0, 1)] {
        let b = hex(&format!("{} {} {}", head(42, 1, 8), le32(d), le32(p)));
        assert!(parse_req(&b, 1).is_err());
    }
    // Shared-object nil and max UUIDs on the back-end channel.
    for u in ["00", "ff"] {
        let b = hex(&format!("{} {}", head(6, 1, 16), u.repeat(16)));
        assert_eq!(parse_backend(&b, 0), Err(WireError::BadValue(0)));
    }
    // SHMEM_MAP with len 0, overflow, unknown flags.
    for (off, len, flags) in [(0u64, 0u64, 0u64), (u64::MAX, 2, 0), (0, 4096, 2)] {
        let b = hex(&format!(
            "{} 01 00000000000000 {} {} {} {}",
            head(9, 1, 40),
            le64(0),
            le64(off),
            le64(len),
            le64(flags)
        ));
        assert!(parse_backend(&b, 1).is_err(), "{off} {len} {flags}");
    }
}

#[test]
fn encoding_refuses_small_buffers() {
    let mut out = [0u8; 15];
    assert_eq!(
        Request::SetFeatures(1).encode(false, &mut out),
        Err(WireError::BufferTooSmall { needed: 20 })
    );
    let mut out = [0u8; 4];
    assert!(Request::GetFeatures.encode(false, &mut out).is_err());
}

#[test]
fn replies_are_version_and_reply_only() {
    let mut out = [0u8; 32];
    let n = Reply::U64(3)
        .encode(FrontendReq::GetQueueNum, &mut out)
        .unwrap();
    let h = Header::parse(&out[..n]).unwrap();
    assert_eq!(h.flags.bits(), REPLY_FLAGS);
    assert_eq!(REPLY_FLAGS, 0x5);
}

mod props;

#[test]
fn fixed_fd_table_agrees_with_fd_rule() {
    // The table used on the parse fast path must say what `fd_rule` says.
    let cases: [(&str, usize); 8] = [
        (
            &format!("{} {} {}", head(6, 1, 16), le64(0x1000), le64(0)),
            1,
        ),
        (&head(7, 1, 0), 1),
        (&head(21, 1, 0), 1),
        (
            &format!(
                "{} {} {} 0100 0100 00000000",
                head(32, 1, 24),
                le64(64),
                le64(0)
            ),
            1,
        ),
        (&head(33, 1, 0), 1),
        (
            &format!(
                "{} {} {} {} {} {}",
                head(37, 1, 40),
                le64(0),
                le64(0),
                le64(4096),
                le64(0),
                le64(0)
            ),
            1,
        ),
        (&format!("{} {} {}", head(42, 1, 8), le32(0), le32(0)), 1),
        (&head(3, 1, 0), 0),
    ];
    for (msg, nfds) in cases {
        let b = hex(msg);
        let r = parse_req(&b, nfds).unwrap();
        assert_eq!(r.fd_rule().min as usize, nfds, "{r:?}");
        assert!(parse_req(&b, nfds + 1).is_err(), "{r:?} with an extra fd");
        if nfds > 0 {
            assert!(parse_req(&b, nfds - 1).is_err(), "{r:?} missing its fd");
        }
    }
}

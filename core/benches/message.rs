//! Parse and encode of QEMU 10's real start sequence (recorded against
//! qemu-storage-daemon, `tests/vectors/qemu-start-qsd.txt`), in time per
//! message, next to rust-vmm's `vhost` crate decoding the same bytes.
//!
//! rust-vmm's header type is private to its crate, so its side is built from
//! its public pieces: the request id's `TryFrom`, the checks its header
//! `is_valid` makes, its handler's check of which ids may carry fds, and each
//! body struct read with `ByteValued` and checked with `VhostUserMsgValidator::is_valid`, exactly as its back-end request
//! handler does. Its handler also receives every body into a fresh `Vec`
//! (`recv_data`); the `rust-vmm` row includes that allocation, the
//! `rust-vmm (no alloc)` row leaves it out. Every decoded value is handed to
//! `black_box` by reference on both sides. The `header only` row is the
//! floor under both: the loop and the 12-byte header check, no payload.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vhost::vhost_user::message::{
    FrontendReq as RvReq, VhostUserConfig, VhostUserMsgValidator, VhostUserSingleMemoryRegion,
    VhostUserU64, VhostUserVringAddr, VhostUserVringState,
};
use vhost_user_core::message::{
    FrontendReq, Header, ParseOptions, Reply, Request, HEADER_SIZE, MAX_MESSAGE,
};
use vm_memory::ByteValued;

/// The front-end → back-end messages of the recording, with their fd counts.
fn qemu_requests() -> Vec<(Vec<u8>, usize)> {
    include_str!("../tests/vectors/qemu-start-qsd.txt")
        .lines()
        .filter(|l| l.starts_with("F>B"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let id: u32 = f[1].parse().expect("id");
            let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).expect("flags");
            let nfds: usize = f[4].parse().expect("nfds");
            let payload: Vec<u8> = match f.get(5) {
                Some(h) if *h != "-" => (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
                    .collect(),
                _ => Vec::new(),
            };
            let mut m = Vec::new();
            m.extend_from_slice(&id.to_ne_bytes());
            m.extend_from_slice(&flags.to_ne_bytes());
            m.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
            m.extend_from_slice(&payload);
            (m, nfds)
        })
        .collect()
}

fn rv_body<T: ByteValued + Default + VhostUserMsgValidator>(p: &[u8]) -> bool {
    if p.len() != std::mem::size_of::<T>() {
        return false;
    }
    let mut t = T::default();
    t.as_mut_slice().copy_from_slice(p);
    black_box(&t).is_valid()
}

fn rv_decode(msg: &[u8], nfds: usize, alloc: bool) -> bool {
    let word = |i: usize| u32::from_ne_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    let Ok(code) = RvReq::try_from(request) else {
        return false;
    };
    if size as usize > 0x1000 || flags & 0x3 != 1 || flags & !0xf != 0 {
        return false;
    }
    // Its handler's fd check: only these ids may carry fds (their count is
    // not checked).
    let may_carry_fds = matches!(
        code,
        RvReq::SET_MEM_TABLE
            | RvReq::SET_VRING_CALL
            | RvReq::SET_VRING_KICK
            | RvReq::SET_VRING_ERR
            | RvReq::SET_LOG_BASE
            | RvReq::SET_LOG_FD
            | RvReq::SET_BACKEND_REQ_FD
            | RvReq::SET_INFLIGHT_FD
            | RvReq::ADD_MEM_REG
            | RvReq::REM_MEM_REG
            | RvReq::SET_DEVICE_STATE_FD
            | RvReq::GPU_SET_SOCKET
    );
    if nfds > 0 && !may_carry_fds {
        return false;
    }
    let owned;
    let p = if alloc && size > 0 {
        owned = msg[HEADER_SIZE..].to_vec();
        &owned[..]
    } else {
        &msg[HEADER_SIZE..]
    };
    match code {
        RvReq::GET_FEATURES
        | RvReq::SET_OWNER
        | RvReq::GET_PROTOCOL_FEATURES
        | RvReq::GET_QUEUE_NUM
        | RvReq::GET_MAX_MEM_SLOTS
        | RvReq::SET_BACKEND_REQ_FD => p.is_empty(),
        RvReq::SET_FEATURES
        | RvReq::SET_PROTOCOL_FEATURES
        | RvReq::SET_VRING_KICK
        | RvReq::SET_VRING_CALL
        | RvReq::SET_VRING_ERR => rv_body::<VhostUserU64>(p),
        RvReq::SET_VRING_NUM
        | RvReq::SET_VRING_BASE
        | RvReq::GET_VRING_BASE
        | RvReq::SET_VRING_ENABLE => rv_body::<VhostUserVringState>(p),
        RvReq::SET_VRING_ADDR => rv_body::<VhostUserVringAddr>(p),
        RvReq::GET_CONFIG => p.len() >= 12 && rv_body::<VhostUserConfig>(&p[..12]),
        RvReq::ADD_MEM_REG => rv_body::<VhostUserSingleMemoryRegion>(p),
        _ => false,
    }
}

fn ours_parse(msg: &[u8], nfds: usize, opts: &ParseOptions) -> bool {
    match Header::parse(msg) {
        // By reference, as the rust-vmm side hands over its body: the value is
        // made, but not copied again.
        Ok(h) => black_box(&Request::parse(&h, &msg[HEADER_SIZE..], nfds, opts)).is_ok(),
        Err(_) => false,
    }
}

fn bench(c: &mut Criterion) {
    let msgs = qemu_requests();
    let opts = ParseOptions::default();
    // Every message parses on both sides, or the comparison is meaningless.
    for (m, nfds) in &msgs {
        assert!(ours_parse(m, *nfds, &opts));
        assert!(rv_decode(m, *nfds, true));
    }
    let parsed: Vec<Request<'_>> = msgs
        .iter()
        .map(|(m, n)| {
            let h = Header::parse(m).expect("header");
            Request::parse(&h, &m[HEADER_SIZE..], *n, &opts).expect("request")
        })
        .collect();

    let mut g = c.benchmark_group("qemu_start_sequence");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function("vhu parse", |b| {
        b.iter(|| {
            for (m, nfds) in black_box(&msgs) {
                black_box(ours_parse(m, *nfds, &opts));
            }
        })
    });
    // The floor both sides stand on: walking the messages and checking each
    // 12-byte header, with no payload parsed.
    g.bench_function("header only", |b| {
        b.iter(|| {
            for (m, _) in black_box(&msgs) {
                black_box(black_box(&Header::parse(m)).is_ok());
            }
        })
    });
    g.bench_function("rust-vmm decode", |b| {
        b.iter(|| {
            for (m, nfds) in black_box(&msgs) {
                black_box(rv_decode(m, *nfds, true));
            }
        })
    });
    g.bench_function("rust-vmm decode (no alloc)", |b| {
        b.iter(|| {
            for (m, nfds) in black_box(&msgs) {
                black_box(rv_decode(m, *nfds, false));
            }
        })
    });
    g.bench_function("vhu encode", |b| {
        let mut out = [0u8; MAX_MESSAGE];
        b.iter(|| {
            for r in black_box(&parsed) {
                black_box(r.encode(false, black_box(&mut out)).expect("encode"));
            }
        })
    });
    g.bench_function("vhu encode reply", |b| {
        let mut out = [0u8; MAX_MESSAGE];
        b.iter(|| {
            for r in black_box(&parsed) {
                black_box(
                    Reply::U64(0)
                        .encode(black_box(r.code()), black_box(&mut out))
                        .expect("encode"),
                );
            }
        })
    });
    g.finish();
    let _ = FrontendReq::GetFeatures;
}

criterion_group!(benches, bench);
criterion_main!(benches);

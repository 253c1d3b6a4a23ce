//! Replays QEMU 10's real start sequences, recorded against
//! qemu-storage-daemon (see the header of each file under `tests/vectors/`),
//! through our parser and encoder: every request and every reply must parse,
//! and encoding the parsed value must give back QEMU's or qsd's exact bytes.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;

use vhost_user_core::message::{
    FrontendReq, Header, ParseOptions, Reply, Request, HEADER_SIZE, MAX_MESSAGE,
};

struct Line {
    to_backend: bool,
    id: u32,
    nfds: usize,
    bytes: Vec<u8>,
}

fn load(name: &str) -> Vec<Line> {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (id, flags, size, nfds) = (
                f[1].parse::<u32>().unwrap(),
                u32::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap(),
                f[3].parse::<u32>().unwrap(),
                f[4].parse::<usize>().unwrap(),
            );
            let payload = f
                .get(5)
                .filter(|h| **h != "-")
                .map(|h| hex(h))
                .unwrap_or_default();
            assert_eq!(payload.len(), size as usize, "{l}");
            let mut bytes = Vec::new();
            for v in [id, flags, size] {
                bytes.extend_from_slice(&v.to_ne_bytes());
            }
            bytes.extend_from_slice(&payload);
            Line {
                to_backend: f[0] == "F>B",
                id,
                nfds,
                bytes,
            }
        })
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Returns the request codes seen, in order.
fn replay(name: &str) -> Vec<FrontendReq> {
    let opts = ParseOptions::default();
    let mut awaiting: VecDeque<FrontendReq> = VecDeque::new();
    let mut seen = Vec::new();
    let mut out = [0u8; MAX_MESSAGE];
    for (n, line) in load(name).iter().enumerate() {
        let h = Header::parse(&line.bytes).unwrap();
        let payload = &line.bytes[HEADER_SIZE..];
        if line.to_backend {
            let req = Request::parse(&h, payload, line.nfds, &opts)
                .unwrap_or_else(|e| panic!("{name}:{n}: request {}: {e}", line.id));
            let len = req.encode(h.need_reply(), &mut out).unwrap();
            assert_eq!(&out[..len], &line.bytes[..], "{name}:{n}: {req:?}");
            if req.code().has_reply() || h.need_reply() {
                awaiting.push_back(req.code());
            }
            seen.push(req.code());
        } else {
            let code = awaiting
                .pop_front()
                .unwrap_or_else(|| panic!("{name}:{n}: reply with no request"));
            let reply = Reply::parse(code, &h, payload, line.nfds, &opts)
                .unwrap_or_else(|e| panic!("{name}:{n}: reply to {code}: {e}"));
            let len = reply.encode(code, &mut out).unwrap();
            assert_eq!(&out[..len], &line.bytes[..], "{name}:{n}: {reply:?}");
        }
    }
    assert!(
        awaiting.is_empty(),
        "{name}: replies missing for {awaiting:?}"
    );
    seen
}

#[test]
fn qemu_start_against_qsd_single_queue() {
    let seen = replay("qemu-start-qsd.txt");
    // QEMU's init order (notes §3.2), as recorded.
    use FrontendReq as C;
    assert_eq!(
        &seen[..7],
        &[
            C::GetFeatures,
            C::GetProtocolFeatures,
            C::SetProtocolFeatures,
            C::GetQueueNum,
            C::GetMaxMemSlots,
            C::SetBackendReqFd,
            C::SetOwner
        ]
    );
    // With CONFIGURE_MEM_SLOTS, QEMU 10 never sends SET_MEM_TABLE.
    assert!(seen.contains(&C::AddMemReg));
    assert!(!seen.contains(&C::SetMemTable));
    // Each ring start ends with SET_VRING_KICK, each stop is GET_VRING_BASE.
    assert!(seen.contains(&C::SetVringKick) && seen.contains(&C::GetVringBase));
}

#[test]
fn qemu_start_against_qsd_two_queues() {
    let seen = replay("qemu-start-qsd-mq-packed.txt");
    let kicks = seen
        .iter()
        .filter(|c| **c == FrontendReq::SetVringKick)
        .count();
    assert!(kicks >= 2, "both rings started: {kicks}");
}

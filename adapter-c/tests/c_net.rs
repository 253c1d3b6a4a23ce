//! virtio-net's callbacks from C: `tests/c/net.c`, built by gcc against
//! the header and the staticlib, serves a back-end session whose
//! `vhu_device` has `set_mtu` (up to 9000) and `send_rarp`, on its stdin
//! and stdout. This test is the front-end: it negotiates RARP and MTU and
//! sends NET_SET_MTU and SEND_RARP as QEMU does, checks each REPLY_ACK
//! (a refused MTU is a failed ack), and checks what the program's
//! callbacks saw (its stderr).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use vhost_user_core::feature::ProtocolFeatures as P;
use vhost_user_core::message::{FrontendReq, Header, Request, HEADER_SIZE, MAX_MESSAGE};

/// The front-end's end of the C program's channel.
struct Front {
    child: Child,
    to: ChildStdin,
    from: ChildStdout,
}

impl Front {
    fn send(&mut self, req: &Request<'_>, need_reply: bool) {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = req.encode(need_reply, &mut buf).unwrap();
        self.to.write_all(&buf[..n]).unwrap();
    }

    /// The u64 reply to `code` (a value, or a REPLY_ACK: 0 taken).
    fn reply_u64(&mut self, code: FrontendReq) -> u64 {
        let mut head = [0u8; HEADER_SIZE];
        self.from.read_exact(&mut head).expect("a reply");
        let h = Header::parse(&head).unwrap();
        h.check_reply_to(code as u32).unwrap();
        assert_eq!(h.size, 8, "reply to {code:?}");
        let mut v = [0u8; 8];
        self.from.read_exact(&mut v).unwrap();
        u64::from_le_bytes(v)
    }

    /// `req` with NEED_REPLY: its REPLY_ACK.
    fn ack(&mut self, req: &Request<'_>) -> u64 {
        self.send(req, true);
        self.reply_u64(req.code())
    }
}

#[test]
fn a_c_net_device_takes_mtu_and_rarp_through_its_callbacks() {
    let dir = std::env::temp_dir().join(format!("vhu-c-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = common::built_c_program(&dir, "net");
    let mut child = Command::new(&bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the C program");
    let mut fe = Front {
        to: child.stdin.take().unwrap(),
        from: child.stdout.take().unwrap(),
        child,
    };

    // The handshake's protocol part, as QEMU does it.
    fe.send(&Request::GetFeatures, false);
    let features = fe.reply_u64(FrontendReq::GetFeatures);
    assert_ne!(features & (1 << 30), 0, "PROTOCOL_FEATURES offered");
    fe.send(&Request::GetProtocolFeatures, false);
    let offered = P::from_bits_retain(fe.reply_u64(FrontendReq::GetProtocolFeatures));
    assert_eq!(offered, P::REPLY_ACK | P::MTU | P::RARP);
    fe.send(&Request::SetProtocolFeatures(offered.bits()), false);
    fe.send(&Request::SetOwner, false);

    // NET_SET_MTU with an ack asked (as QEMU sends it): taken up to the
    // device's 9000, refused above it by the callback, and refused
    // outside 68..=65535 by the session before the callback hears of it.
    assert_eq!(fe.ack(&Request::NetSetMtu(1500)), 0);
    assert_eq!(fe.ack(&Request::NetSetMtu(9000)), 0);
    assert_eq!(fe.ack(&Request::NetSetMtu(9001)), 1, "a failed ack");
    assert_eq!(fe.ack(&Request::NetSetMtu(67)), 1, "a failed ack");
    assert_eq!(fe.ack(&Request::NetSetMtu(1 << 16)), 1, "a failed ack");
    // SEND_RARP without an ack (as QEMU sends it), then with one.
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    fe.send(&Request::SendRarp(mac), false);
    assert_eq!(fe.ack(&Request::SendRarp([2, 0, 0, 0, 0, 1])), 0);

    drop(fe.to);
    let mut rest = Vec::new();
    fe.from.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no reply unasked: {rest:?}");
    let out = fe.child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}:\n{log}", out.status);
    let lines: Vec<&str> = log.lines().collect();
    let mtu_refused = |what: &str| format!("refused 20: {what}: ");
    assert_eq!(lines.len(), 9, "{log}");
    assert_eq!(
        lines[0..3],
        [
            "set_mtu 1500 taken",
            "set_mtu 9000 taken",
            "set_mtu 9001 refused"
        ]
    );
    // The callback's refusal, then the session's two (no callback).
    assert!(
        lines[3].starts_with(&mtu_refused("VHU_ERR_REFUSED")),
        "{log}"
    );
    assert!(
        lines[4].starts_with(&mtu_refused("VHU_ERR_BAD_MTU")),
        "{log}"
    );
    assert!(
        lines[5].starts_with(&mtu_refused("VHU_ERR_BAD_MTU")),
        "{log}"
    );
    assert_eq!(
        lines[6..],
        [
            "send_rarp 52:54:00:12:34:56 taken",
            "send_rarp 02:00:00:00:00:01 taken",
            "end: 2 MTUs taken, 2 RARPs",
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

//! The back-end channel served from C: `tests/c/backend_channel.c`, built
//! by gcc against the header and the staticlib, takes a front-end engine
//! through the handshake (BACKEND_REQ, CONFIG, INBAND_NOTIFICATIONS and
//! REPLY_ACK negotiated) and then serves the back-end requests that come
//! on its stdin, acks on its stdout. This test is the back-end: it sends
//! a config change, in-band calls and errors and a request the front-end
//! does not serve, with and without NEED_REPLY, checks each ack's bytes
//! (and that none comes unasked), then a malformed request that closes
//! the channel, and checks what the program logged (its stderr).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use vhost_user_core::message::{BackendRequest, HEADER_SIZE};

/// The ack the spec describes: a reply to `request` (flags REPLY 0x4 and
/// version 0x1, size 8) whose u64 is `value`.
fn ack(request: u32, value: u64) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&0x5u32.to_le_bytes());
    m.extend_from_slice(&8u32.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

#[test]
fn a_c_front_end_serves_the_backend_channel() {
    let dir = std::env::temp_dir().join(format!("vhu-c-bereq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = common::built_c_program(&dir, "backend_channel");
    let mut child = Command::new(&bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the C program");
    let mut to = child.stdin.take().unwrap();
    let mut from = child.stdout.take().unwrap();
    let mut send = |req: BackendRequest, need_reply: bool| {
        let mut buf = [0u8; 64];
        let n = req.encode(need_reply, &mut buf).unwrap();
        to.write_all(&buf[..n]).unwrap();
    };
    let mut read_ack = || {
        let mut a = [0u8; HEADER_SIZE + 8];
        from.read_exact(&mut a).expect("an ack");
        a.to_vec()
    };

    // Each ack is read before the next request goes: one sent unasked
    // would be read in place of the next one's and differ from it.
    send(BackendRequest::ConfigChange, true);
    assert_eq!(
        read_ack(),
        [2, 0, 0, 0, 0x5, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    send(BackendRequest::VringCall(1), false);
    send(BackendRequest::VringErr(0), true);
    assert_eq!(read_ack(), ack(5, 0));
    // Not served (shared objects): a failed ack.
    send(BackendRequest::SharedObjectAdd([7; 16]), true);
    assert_eq!(read_ack(), ack(6, 1));
    send(BackendRequest::VringCall(1), true);
    assert_eq!(read_ack(), ack(4, 0));
    // A ring past the two configured: malformed, the channel closes.
    send(BackendRequest::VringCall(7), true);
    drop(to);

    let mut rest = Vec::new();
    from.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "nothing after the malformed request: {rest:?}"
    );
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}:\n{log}", out.status);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 9, "{log}");
    assert!(
        lines[0].starts_with("before negotiation: VHU_ERR_BUSY:"),
        "{log}"
    );
    // MQ | REPLY_ACK | BACKEND_REQ | CONFIG | INBAND_NOTIFICATIONS, and
    // SET_BACKEND_REQ_FD went out with the channel's fd.
    assert_eq!(lines[1], "negotiated 0x4229, channel sent", "{log}");
    assert!(
        lines[2].starts_with("ack over the request: VHU_ERR_INVALID:"),
        "{log}"
    );
    assert_eq!(
        lines[3..8],
        [
            "config changed, ack 20",
            "call 1",
            "ring error 0, ack 20",
            "refused 6, ack 20",
            "call 1, ack 20",
        ],
        "{log}"
    );
    assert!(lines[8].starts_with("closed: VHU_ERR_WIRE:"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

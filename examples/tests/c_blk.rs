//! The C back-end `examples/c/blk.c` (the C ABI's header and staticlib,
//! and libc) built by gcc and driven by a real front-end: `vhu bench
//! --verify` with two queues, split and packed rings, interrupt and poll
//! mode, one connection after another on one back-end process. The bytes
//! the guest side wrote are checked on every read, and the image file
//! holds what was written.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::CBlk;

fn bench(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["bench", "--socket-path"])
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

/// Runs a verified bench and returns its report.
fn verified(b: &CBlk, extra: &[&str]) -> String {
    let mut args = vec![
        "--rw",
        "randrw",
        "--verify",
        "--requests",
        "2000",
        "--iodepth",
        "8",
        "--bs",
        "8192",
        "--queues",
        "2",
    ];
    args.extend_from_slice(extra);
    let out = bench(&b.sock, &args);
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "vhu bench {args:?} failed:\n{s}{}\n--- back-end ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.log()
    );
    assert!(s.contains("requests 2000 in"), "{s}");
    println!("bench {extra:?}: {}", s.lines().next().unwrap_or(""));
    s
}

#[test]
fn c_backend_passes_bench_verify_split_and_packed_two_queues() {
    let b = CBlk::start(2);
    verified(&b, &[]);
    verified(&b, &["--packed"]);
    verified(&b, &["--poll"]);
    verified(&b, &["--packed", "--poll"]);
    // Sequential 1 MiB writes then reads: chains of many segments, and
    // the pattern lands in the image file.
    for rw in ["write", "read"] {
        let out = bench(
            &b.sock,
            &[
                "--rw",
                rw,
                "--bs",
                "1048576",
                "--requests",
                "16",
                "--queues",
                "2",
            ],
        );
        assert!(
            out.status.success(),
            "{}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            b.log()
        );
    }
    let log = b.log();
    println!("--- back-end ---\n{log}");
    // One line per connection, each after serving its requests.
    assert_eq!(
        log.matches("connection closed after 2000 requests").count(),
        4,
        "{log}"
    );
    assert!(!log.contains("refused"), "{log}");
    let img = std::fs::read(b.dir.join("disk.img")).unwrap();
    assert!(
        img.iter().any(|&x| x != 0),
        "nothing reached the image file"
    );
}

/// In-band notifications against the C back-end: rings kicked with
/// VRING_KICK (its `VHU_ACTION_KICK`), completions announced with
/// BACKEND_VRING_CALL on the back-end channel (its `vhu_channel`), no
/// eventfd at all; verified, split and packed, two queues.
#[test]
fn c_backend_passes_bench_verify_with_in_band_notifications() {
    let b = CBlk::start(2);
    for extra in [&["--inband"][..], &["--inband", "--packed"][..]] {
        let s = verified(&b, extra);
        let line = s
            .lines()
            .find(|l| l.starts_with("back-end channel:"))
            .unwrap_or_else(|| panic!("no channel line: {s}"));
        let calls: u64 = line
            .split(", ")
            .find_map(|p| p.strip_suffix(" in-band calls"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(calls > 0, "{line}");
        assert!(s.contains(" kicks, 0 calls)"), "no eventfd call: {s}");
    }
}

#[test]
fn c_backend_serves_one_queue_and_survives_a_malformed_message() {
    let b = CBlk::start(1);
    // A header with reserved flag bits: the C ABI refuses it
    // (vhu_message_size), the back-end drops that connection and serves
    // the next.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&b.sock).unwrap();
        let mut msg = Vec::new();
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&0xffu32.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        s.write_all(&msg).unwrap();
        let mut buf = [0u8; 16];
        use std::io::Read;
        // The back-end closes the connection: EOF, no reply.
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    }
    let out = bench(
        &b.sock,
        &[
            "--rw",
            "randwrite",
            "--verify",
            "--requests",
            "500",
            "--iodepth",
            "4",
        ],
    );
    assert!(out.status.success(), "{}", b.log());
    let log = b.log();
    assert!(log.contains("VHU_ERR_WIRE"), "{log}");
    assert!(
        log.contains("connection closed after 500 requests"),
        "{log}"
    );
}

/// Guest memory the front-end could shrink under the mapping is refused,
/// and memory it can seal is sealed: a hostile front-end cannot kill the C
/// back-end with SIGBUS. Also a region that lies past the end of its file.
#[test]
fn c_backend_seals_guest_memory_and_refuses_what_could_shrink() {
    use std::os::fd::AsFd;
    use vhost_user_core::message::{FrontendReq, MemRegionMsg, MemTable, Request};
    use vhost_user_linux::sys::memfd;
    use vhost_user_linux::sys::socket::Stream;

    const MIB: u64 = 1 << 20;
    let b = CBlk::start(2);
    let region = |size: u64| MemRegionMsg {
        guest_addr: 0,
        size,
        user_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        xen: None,
    };
    let set_mem = |s: &Stream, fd: std::os::fd::BorrowedFd<'_>, size: u64| {
        let regions = [region(size)];
        let req = Request::SetMemTable(MemTable::new(&regions).unwrap());
        common::send(s, &req, true, &[fd]);
        common::recv_reply(s, FrontendReq::SetMemTable)
            .map(|r| common::u64_of(FrontendReq::SetMemTable, &r))
    };
    let connect = || {
        let s = Stream::connect(&b.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let p = common::handshake(&s);
        assert!(p & vhost_user_core::feature::ProtocolFeatures::REPLY_ACK.bits() != 0);
        s
    };

    // A sealable memfd is mapped and sealed against shrinking.
    let s = connect();
    let fd = memfd::create("guest", MIB).unwrap();
    assert_eq!(set_mem(&s, fd.as_fd(), MIB), Some(0));
    let ram = std::fs::File::from(fd);
    let e = ram.set_len(0).expect_err("sealed F_SEAL_SHRINK");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    drop(s);

    // One that can be neither sealed nor is sealed is refused.
    let s = connect();
    let fd = memfd::create_unsealable("guest", MIB).unwrap();
    assert_ne!(set_mem(&s, fd.as_fd(), MIB), Some(0), "refused");
    // Shrinking it now harms nothing.
    std::fs::File::from(fd).set_len(0).unwrap();
    drop(s);

    // A region past the end of its file is refused.
    let s = connect();
    let fd = memfd::create("guest", MIB).unwrap();
    assert_ne!(set_mem(&s, fd.as_fd(), 2 * MIB), Some(0), "refused");
    drop(s);

    // The back-end is alive and serves the next front-end.
    assert!(verified(&b, &[]).contains("requests"));
    let log = b.log();
    assert!(log.contains("not sealable"), "{log}");
    assert!(log.contains("past the end of its"), "{log}");
}

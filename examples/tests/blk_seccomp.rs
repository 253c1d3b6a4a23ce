//! The blk daemon under a seccomp policy that refuses what it would rather
//! use: io_uring (as container runtimes' default policies and old kernels
//! do), and `preadv2` or its `RWF_NOWAIT` reads (as kernels and file
//! systems without them do). The daemon must fall back to its thread pool
//! and to plain reads, say so in its log, and serve verified I/O: no
//! request failed or lost.

#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;

use common::{bench, bench_ok};

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// What a policy refuses, and with which errno.
#[derive(Clone, Copy, Debug)]
enum Deny {
    /// The whole system call.
    Call(libc::c_long, i32),
    /// `preadv2` with `RWF_NOWAIT` in its flags.
    NowaitRead(i32),
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// A seccomp filter: each `deny` answered with its errno, every other
/// call allowed. Offsets are into `struct seccomp_data`: the call number
/// at 0, the architecture at 4, the arguments from 16, 8 bytes each
/// (the low half first on these little-endian targets).
fn filter(deny: &[Deny]) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W, SECCOMP_RET_ALLOW,
        SECCOMP_RET_ERRNO,
    };
    let load = BPF_LD | BPF_W | BPF_ABS;
    let ret = BPF_RET | BPF_K;
    let mut f = vec![
        stmt(load, 4),
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH, 1, 0),
        stmt(ret, SECCOMP_RET_ALLOW),
        stmt(load, 0),
    ];
    let errno = |e: i32| SECCOMP_RET_ERRNO | e as u32;
    for d in deny {
        if let Deny::Call(nr, e) = *d {
            f.push(jump(BPF_JMP | BPF_JEQ | BPF_K, nr as u32, 0, 1));
            f.push(stmt(ret, errno(e)));
        }
    }
    // Last: it loads an argument over the call number.
    for d in deny {
        if let Deny::NowaitRead(e) = *d {
            f.push(jump(
                BPF_JMP | BPF_JEQ | BPF_K,
                libc::SYS_preadv2 as u32,
                0,
                3,
            ));
            f.push(stmt(load, 16 + 8 * 5));
            f.push(jump(
                BPF_JMP | BPF_JSET | BPF_K,
                libc::RWF_NOWAIT as u32,
                0,
                1,
            ));
            f.push(stmt(ret, errno(e)));
        }
    }
    f.push(stmt(ret, SECCOMP_RET_ALLOW));
    f
}

/// Our daemon with `args`, run under a filter of `deny`.
fn confined(args: &[&str], deny: &[Deny]) -> common::Daemon {
    let prog = filter(deny);
    let mut d = common::Daemon::start_prepared(args, |c: &mut Command| {
        // SAFETY: the closure runs in the child between fork and exec; it
        // makes two prctl calls with pointers into `prog`, allocated
        // before the fork and alive for the call (the closure owns it),
        // and builds errors without allocating.
        unsafe {
            c.pre_exec(move || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fprog = libc::sock_fprog {
                    len: prog.len() as u16,
                    filter: prog.as_ptr().cast_mut(),
                };
                let p: *const libc::sock_fprog = &fprog;
                if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, p) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    drop(d.connect_retry());
    d
}

const LOAD: &[&str] = &[
    "--rw",
    "randrw",
    "--verify",
    "--requests",
    "4000",
    "--iodepth",
    "32",
    "--bs",
    "4096",
    "--queues",
    "2",
];

/// Checks the daemon fell back as `expect` says and that the verified
/// load saw every request served.
fn serves_verified(d: &common::Daemon, expect: &[&str]) {
    bench_ok(bench(&d.sock, LOAD), 4000);
    // The start-up connection's two queues, then the bench's.
    let log = d.log_with_counters(4);
    for e in expect {
        assert!(log.contains(e), "no {e:?} in:\n{log}");
    }
    assert!(log.contains("queue 0: threads I/O"), "{log}");
    assert!(log.contains("queue 1: threads I/O"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    let served = common::served(&log, 2);
    assert_eq!(served, 4000, "{log}");
}

/// An old kernel: no io_uring (ENOSYS), no `RWF_NOWAIT` (EOPNOTSUPP).
#[test]
fn without_io_uring_or_nowait_reads_the_pool_serves() {
    let deny = [
        Deny::Call(libc::SYS_io_uring_setup, libc::ENOSYS),
        Deny::NowaitRead(libc::EOPNOTSUPP),
    ];
    for cache in ["writeback", "none"] {
        let d = confined(
            &["--size", "32M", "--num-queues", "2", "--cache", cache],
            &deny,
        );
        let mut expect = vec!["io_uring unavailable"];
        if cache == "writeback" {
            expect.push("reads cannot be served from the page cache at once");
        }
        serves_verified(&d, &expect);
    }
}

/// A container's policy: io_uring can be set up but not entered, and
/// `preadv2` is refused outright (EPERM, as such policies answer).
#[test]
fn a_policy_refusing_io_uring_enter_and_preadv2_gets_the_pool() {
    let deny = [
        Deny::Call(libc::SYS_io_uring_enter, libc::EPERM),
        Deny::Call(libc::SYS_preadv2, libc::EPERM),
    ];
    let d = confined(
        &["--size", "32M", "--num-queues", "2", "--cache", "writeback"],
        &deny,
    );
    serves_verified(
        &d,
        &[
            "io_uring unavailable",
            "reads cannot be served from the page cache at once",
        ],
    );
}

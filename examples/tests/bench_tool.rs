//! `vhu bench` against qemu-storage-daemon and our daemon, both on a raw
//! file and started by the test: verified random reads and writes in
//! interrupt and poll mode, and a wrong status turned into a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child, PathBuf);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn qsd(queues: u16) -> (Kill, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "vhu-bench-qsd-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let sock = dir.join("qsd.sock");
    let mut c = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=n0,filename={}", img.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(c.try_wait().unwrap().is_none(), "qsd exited");
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    (Kill(c, dir), sock)
}

fn bench(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["bench", "--socket-path"])
        .arg(sock)
        .args(args)
        .arg("--json")
        .output()
        .unwrap()
}

fn ok(out: Output, requests: u64) -> String {
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.contains(&format!("\"requests\": {requests},")), "{s}");
    s
}

const VERIFIED: &[&str] = &[
    "--rw",
    "randrw",
    "--verify",
    "--requests",
    "3000",
    "--iodepth",
    "8",
    "--bs",
    "8192",
];

#[test]
fn bench_verifies_against_qsd() {
    let (_q, sock) = qsd(2);
    ok(bench(&sock, VERIFIED), 3000);
    let mut two = VERIFIED.to_vec();
    two.extend(["--queues", "2", "--poll"]);
    ok(bench(&sock, &two), 3000);
}

#[test]
fn bench_verifies_against_our_daemon() {
    let d =
        common::Daemon::start_with(&["--size", "32M", "--num-queues", "2", "--log-level", "warn"]);
    ok(bench(&d.sock, VERIFIED), 3000);
    let mut two = VERIFIED.to_vec();
    two.extend(["--queues", "2", "--poll"]);
    ok(bench(&d.sock, &two), 3000);
    // Sequential writes then reads, 1 MiB blocks.
    ok(
        bench(
            &d.sock,
            &[
                "--rw",
                "write",
                "--bs",
                "1048576",
                "--requests",
                "64",
                "--iodepth",
                "4",
            ],
        ),
        64,
    );
    ok(
        bench(
            &d.sock,
            &[
                "--rw",
                "read",
                "--bs",
                "1048576",
                "--requests",
                "64",
                "--iodepth",
                "4",
            ],
        ),
        64,
    );
}

#[test]
fn a_failed_request_fails_the_bench() {
    let d = common::Daemon::start_with(&["--size", "32M", "--read-only", "--log-level", "warn"]);
    let out = bench(&d.sock, &["--rw", "randwrite", "--requests", "10"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("status 1"), "{err}");
}

/// issue: `vhu bench --verify --reconnect` against our daemon while the
/// test kills the daemon with SIGKILL twenty times at random moments and
/// restarts it on the same image. The bench fails on any completion of a
/// request that is not outstanding (a duplicate), any bad status or verify
/// mismatch, and never finishes if a request is lost.
#[test]
fn kill_9_twenty_times_under_vhu_bench_reconnect() {
    const REQUESTS: u64 = 4000;
    const KILLS: usize = 20;
    // The same image for every daemon (a temporary one would be new each
    // time).
    let img = std::env::temp_dir().join(format!("vhu-kill9-{}.img", std::process::id()));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let img_arg = img.to_str().unwrap().to_string();
    let mut d = common::Daemon::start_with(&["--blk-file", &img_arg, "--io-delay-us", "500"]);
    let mut bench = Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["bench", "--socket-path"])
        .arg(&d.sock)
        .args([
            "--rw",
            "randrw",
            "--verify",
            "--reconnect",
            "--iodepth",
            "8",
            "--json",
        ])
        .args(["--requests", &REQUESTS.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut kills = 0;
    while kills < KILLS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(20 + seed % 120));
        if bench.try_wait().unwrap().is_some() {
            break;
        }
        d.kill_and_restart();
        kills += 1;
    }
    let t0 = Instant::now();
    while bench.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = bench.kill();
            panic!("vhu bench never finished: a request was lost");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = bench.wait_with_output().unwrap();
    let s = ok(out, REQUESTS);
    println!("kills {kills}: {s}");
    assert_eq!(kills, KILLS, "the bench finished before every kill: {s}");
    assert!(!s.contains("\"reconnects\": 0,"), "{s}");
    let log = std::fs::read_to_string(d.dir.join("daemon.log")).unwrap();
    assert!(
        log.contains("resubmitting"),
        "no restart found requests in flight"
    );
}

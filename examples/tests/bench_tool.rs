//! `vhu bench` against qemu-storage-daemon and our daemon, both on a raw
//! file and started by the test: verified random reads and writes in
//! interrupt and poll mode, and a wrong status turned into a failure.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{bench, bench_ok as ok};

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
    let dir = common::temp_path("bench-qsd");
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

/// Our daemon with `args`, once it accepts connections (its socket file
/// appears at bind, a moment before it listens).
fn daemon(args: &[&str]) -> common::Daemon {
    let mut d = common::Daemon::start_with(args);
    drop(d.connect_retry());
    d
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
    let d = daemon(&["--size", "32M", "--num-queues", "2", "--log-level", "warn"]);
    // IN_ORDER offered and negotiated: io_uring completes out of order,
    // the data plane holds early completions.
    let mut ordered = VERIFIED.to_vec();
    ordered.push("--in-order");
    let s = ok(bench(&d.sock, &ordered), 3000);
    assert!(s.contains("\"in_order\": true,"), "{s}");
    let mut two = ordered.clone();
    two.extend(["--queues", "2", "--poll"]);
    let s = ok(bench(&d.sock, &two), 3000);
    assert!(s.contains("\"in_order\": true,"), "{s}");
    // Not asked for by the front-end (as QEMU by default), or not offered
    // by the back-end.
    let s = ok(bench(&d.sock, VERIFIED), 3000);
    assert!(s.contains("\"in_order\": false,"), "{s}");
    let plain = daemon(&["--size", "32M", "--no-in-order", "--log-level", "warn"]);
    let s = ok(bench(&plain.sock, &ordered), 3000);
    assert!(s.contains("\"in_order\": false,"), "{s}");
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

/// Packed rings against our daemon (qsd offers none): verified random
/// reads and writes, two queues, interrupt and poll mode; the rings wrap
/// many times.
#[test]
fn bench_verifies_packed_rings_against_our_daemon() {
    let d = daemon(&["--size", "32M", "--num-queues", "2", "--log-level", "warn"]);
    let mut packed = VERIFIED.to_vec();
    packed.push("--packed");
    let s = ok(bench(&d.sock, &packed), 3000);
    assert!(s.contains("\"in_order\": false,"), "{s}");
    packed.extend(["--queues", "2", "--poll"]);
    ok(bench(&d.sock, &packed), 3000);
    let mut ordered = packed.clone();
    ordered.push("--in-order");
    let s = ok(bench(&d.sock, &ordered), 3000);
    assert!(s.contains("\"in_order\": true,"), "{s}");
    let out = bench(&d.sock, &["--packed", "--reconnect", "--requests", "10"]);
    assert!(!out.status.success());
}

/// The JSON report's counter `key`.
fn counter(json: &str, key: &str) -> u64 {
    let at = json
        .find(&format!("\"{key}\": "))
        .unwrap_or_else(|| panic!("no {key} in {json}"));
    let rest = &json[at + key.len() + 4..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap();
    rest[..end].parse().unwrap()
}

/// In-band notifications against our daemon: rings started and kicked
/// with VRING_KICK, completions announced with BACKEND_VRING_CALL on the
/// back-end channel, no eventfd at all; verified, split and packed, one
/// and two queues, interrupt and poll mode.
#[test]
fn bench_verifies_with_in_band_notifications() {
    let d = daemon(&["--size", "32M", "--num-queues", "2", "--log-level", "warn"]);
    for extra in [
        &[][..],
        &["--packed"][..],
        &["--queues", "2"][..],
        &["--packed", "--queues", "2", "--poll"][..],
    ] {
        let mut args = VERIFIED.to_vec();
        args.push("--inband");
        args.extend(extra);
        let s = ok(bench(&d.sock, &args), 3000);
        assert_eq!(counter(&s, "calls"), 0, "no call eventfd: {s}");
        assert!(counter(&s, "kicks") > 0, "{s}");
        if !extra.contains(&"--poll") {
            assert!(counter(&s, "backend_calls") > 0, "{s}");
        }
        assert_eq!(counter(&s, "ring_errors"), 0, "{s}");
    }
    // Without in-band notifications the same load uses eventfds only.
    let s = ok(bench(&d.sock, VERIFIED), 3000);
    assert!(counter(&s, "calls") > 0, "{s}");
    assert_eq!(counter(&s, "backend_calls"), 0, "{s}");
}

#[test]
fn a_failed_request_fails_the_bench() {
    let d = daemon(&["--size", "32M", "--read-only", "--log-level", "warn"]);
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
    let mut d = daemon(&["--blk-file", &img_arg, "--io-delay-us", "500"]);
    let mut bench = Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["bench", "--socket-path"])
        .arg(&d.sock)
        .args([
            "--rw",
            "randrw",
            "--verify",
            "--reconnect",
            "--in-order",
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
    assert!(s.contains("\"in_order\": true,"), "{s}");
    assert_eq!(kills, KILLS, "the bench finished before every kill: {s}");
    assert!(!s.contains("\"reconnects\": 0,"), "{s}");
    let log = std::fs::read_to_string(d.dir.join("daemon.log")).unwrap();
    assert!(
        log.contains("resubmitting"),
        "no restart found requests in flight"
    );
}

/// Runs `vhu bench` for up to 30 s in the background, does `to_daemon`
/// half a second in, and returns its output once it exits (it must within
/// 10 s).
fn bench_while(
    d: &mut common::Daemon,
    args: &[&str],
    to_daemon: impl FnOnce(&mut Child),
) -> Output {
    let bench = Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["bench", "--socket-path"])
        .arg(&d.sock)
        .args(["--runtime", "30", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut bench = Kill(bench, PathBuf::new());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        bench.0.try_wait().unwrap().is_none(),
        "the bench ended early"
    );
    to_daemon(&mut d.child);
    let t0 = Instant::now();
    while bench.0.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "vhu bench did not notice"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let child = std::mem::replace(&mut bench.0, Command::new("true").spawn().unwrap());
    child.wait_with_output().unwrap()
}

/// A back-end that dies under a busy-polling bench ends the run with an
/// error (the bench watches the socket while it spins).
#[test]
fn a_vanished_back_end_fails_a_polling_bench() {
    let mut d = daemon(&["--null", "--size", "32M", "--log-level", "warn"]);
    let out = bench_while(&mut d, &["--poll", "--iodepth", "4"], |c| {
        c.kill().unwrap();
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("went away"), "{err}");
}

/// A back-end that stops completing requests (SIGSTOP) fails the bench
/// after --timeout, in interrupt mode and in poll mode.
#[test]
fn a_hung_back_end_fails_the_bench_after_the_timeout() {
    for poll in [false, true] {
        let mut d = daemon(&["--null", "--size", "32M", "--log-level", "warn"]);
        let mut args = vec!["--timeout", "1", "--iodepth", "4"];
        if poll {
            args.push("--poll");
        }
        let pid = d.child.id().to_string();
        let signal = |sig: &str| {
            let st = Command::new("kill").args([sig, &pid]).status().unwrap();
            assert!(st.success(), "kill {sig}");
        };
        let out = bench_while(&mut d, &args, |_| signal("-STOP"));
        signal("-CONT");
        assert!(!out.status.success(), "poll {poll}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no completion for"), "poll {poll}: {err}");
    }
}

#[test]
fn bad_options_are_refused() {
    let d = daemon(&["--null", "--size", "32M", "--log-level", "warn"]);
    let out = bench(
        &d.sock,
        &["--rw", "randread", "--verify", "--requests", "10"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--verify needs a load that writes"), "{err}");
    for bad in [
        ["--runtime", "-1"],
        ["--runtime", "nan"],
        ["--timeout", "0"],
    ] {
        let out = bench(Path::new("/nonexistent.sock"), &bad);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid"), "{bad:?}: {err}");
    }
}

/// Deep queues through each I/O engine and cache mode: 128 requests in
/// flight per queue, verified reads and writes on two queues, the
/// completions reaped as they arrive (the thread pool finishes them out
/// of order). The daemon's log names the engine and counts no error.
#[test]
fn deep_queues_verify_through_io_uring_and_threads() {
    for (aio, cache) in [
        ("io_uring", "writeback"),
        ("io_uring", "none"),
        ("threads", "writeback"),
        ("threads", "none"),
    ] {
        let d = daemon(&[
            "--size",
            "32M",
            "--num-queues",
            "2",
            "--aio",
            aio,
            "--cache",
            cache,
        ]);
        let args = [
            "--rw",
            "randrw",
            "--verify",
            "--requests",
            "6000",
            "--iodepth",
            "128",
            "--bs",
            "4096",
            "--queues",
            "2",
        ];
        ok(bench(&d.sock, &args), 6000);
        // The counters are logged when the front-end has left; the
        // first connection (the start-up probe's) logged zeroes.
        let log = d.log_with_counters(4);
        assert!(
            log.contains(&format!("queue 0: {aio} I/O")),
            "{aio}/{cache}: {log}"
        );
        assert!(
            log.contains(&format!("queue 1: {aio} I/O")),
            "{aio}/{cache}: {log}"
        );
        assert!(!log.contains("ERROR"), "{aio}/{cache}: {log}");
        let served = common::served(&log, 2);
        assert_eq!(served, 6000, "{aio}/{cache}: {log}");
    }
}

/// With the thread pool over O_DIRECT, each queue has a worker of its
/// own by default (up to the CPUs), which carries out a lone request
/// itself: verified random reads and writes at iodepth 1 on two queues,
/// then at 16 (where requests go to the pool), every one served.
#[test]
fn each_queue_has_a_worker_that_runs_its_lone_requests() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let d = daemon(&[
        "--size",
        "32M",
        "--num-queues",
        "2",
        "--aio",
        "threads",
        "--cache",
        "none",
    ]);
    for depth in ["1", "16"] {
        let args = [
            "--rw",
            "randrw",
            "--verify",
            "--requests",
            "2000",
            "--iodepth",
            depth,
            "--queues",
            "2",
        ];
        ok(bench(&d.sock, &args), 2000);
    }
    let log = d.log_with_counters(6);
    assert!(!log.contains("ERROR"), "{log}");
    // The counters run on from one connection to the next.
    assert_eq!(common::served(&log, 4), 4000, "{log}");
    if cpus >= 2 {
        assert!(log.contains("queue 0 -> thread 0"), "{log}");
        assert!(log.contains("queue 1 -> thread 1"), "{log}");
        for q in 0..2 {
            let line = format!("queue {q}: threads I/O, a lone request run by the worker");
            assert!(log.contains(&line), "{log}");
        }
    } else {
        assert!(log.contains("queue 0,1 -> thread 0"), "{log}");
        assert!(!log.contains("a lone request"), "{log}");
    }
}

/// The daemon's log once the bench's connection has left: the last
/// counter line of each of `queues` queues (the start-up probe logged
/// the first ones).
fn counters_after(d: &common::Daemon, queues: usize, connections: usize) -> Vec<String> {
    let log = d.log_with_counters(queues * connections);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("bytes written"))
        .collect();
    lines[lines.len() - queues..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// The number before `what` in a counter line ("... 12 syncs, ...").
fn count(line: &str, what: &str) -> u64 {
    let (head, _) = line.split_once(&format!(" {what}")).unwrap();
    head.rsplit(' ').next().unwrap().parse().unwrap()
}

/// With O_DIRECT, data buffers that are not aligned to 512 bytes are
/// refused with IOERR (and the refusal is logged); through the page cache
/// the same requests are served.
#[test]
fn o_direct_bounces_unaligned_buffers() {
    // Buffers 256 bytes into their pages: an aligned bounce buffer
    // carries the data, verified both ways.
    let args = [
        "--rw",
        "randrw",
        "--verify",
        "--requests",
        "400",
        "--iodepth",
        "8",
        "--bs",
        "8192",
        "--buffer-offset",
        "256",
    ];
    let d = daemon(&["--size", "8M", "--cache", "none"]);
    ok(bench(&d.sock, &args), 400);
    let line = &counters_after(&d, 1, 2)[0];
    assert_eq!(count(line, "errors"), 0, "{line}");
    let log = d.log();
    assert!(log.contains("aligned bounce buffer"), "{log}");
    assert!(!log.contains("refusing"), "{log}");
    // Aligned buffers do not bounce: a daemon that served only those
    // never says so.
    let d = daemon(&["--size", "8M", "--cache", "none"]);
    ok(
        bench(
            &d.sock,
            &["--rw", "randrw", "--verify", "--requests", "200"],
        ),
        200,
    );
    drop(counters_after(&d, 1, 2));
    assert!(!d.log().contains("bounce"), "{}", d.log());

    let d = daemon(&["--size", "8M", "--cache", "writeback"]);
    ok(bench(&d.sock, &args), 400);
}

/// FLUSH reaches the disk: with FLUSH negotiated, `--flush-every 4` makes
/// one fdatasync per four writes and plain writes none; a driver that
/// does not negotiate FLUSH gets writethrough, an fdatasync after every
/// write.
#[test]
fn flushes_and_writethrough_reach_the_disk() {
    let d = daemon(&["--size", "8M"]);
    // 100 requests: 80 writes and 20 flushes.
    let out = ok(
        bench(
            &d.sock,
            &["--rw", "write", "--requests", "100", "--flush-every", "4"],
        ),
        100,
    );
    assert!(out.contains("\"requests\": 100,"), "{out}");
    let line = &counters_after(&d, 1, 2)[0];
    assert_eq!(count(line, "syncs"), 20, "{line}");
    assert_eq!(count(line, "bytes written"), 80 * 4096, "{line}");
    // Writeback, no flushes asked: none made.
    ok(
        bench(&d.sock, &["--rw", "randwrite", "--requests", "50"]),
        50,
    );
    let line = &counters_after(&d, 1, 3)[0];
    assert_eq!(count(line, "syncs"), 20, "{line}");
    // Without FLUSH: writethrough.
    ok(
        bench(
            &d.sock,
            &[
                "--rw",
                "randwrite",
                "--requests",
                "30",
                "--no-guest-features",
            ],
        ),
        30,
    );
    let line = &counters_after(&d, 1, 4)[0];
    assert_eq!(count(line, "syncs"), 50, "{line}");
    // --flush-every without FLUSH is refused by the bench.
    let out = bench(
        &d.sock,
        &[
            "--requests",
            "3",
            "--no-guest-features",
            "--flush-every",
            "2",
        ],
    );
    assert!(!out.status.success());
}

/// The names of the daemon's threads now (`/proc/PID/task/*/comm`).
fn thread_names(d: &common::Daemon) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{}/task", d.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// The names of the daemon's worker threads now, sorted.
fn worker_threads(d: &common::Daemon) -> Vec<String> {
    let mut names: Vec<String> = thread_names(d)
        .into_iter()
        .filter(|n| n.starts_with("vhu-worker-"))
        .collect();
    names.sort();
    names
}

/// `--threads T` serves N queues on T worker threads (queue q on thread
/// q % T, as logged at start), and without it each queue has its own up
/// to half the CPUs:
/// verified random I/O on all four queues, the threads counted while it
/// runs, every queue served without an error.
#[test]
fn threads_serve_queues_round_robin() {
    // Without --threads: one per queue, at most half the CPUs.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let default = (cpus / 2).clamp(1, 4);
    for (threads, want) in [(Some("2"), 2), (Some("4"), 4), (None, default)] {
        let mut args = vec!["--size", "32M", "--num-queues", "4"];
        if let Some(t) = threads {
            args.extend(["--threads", t]);
        }
        let d = daemon(&args);
        let bench = Command::new(env!("CARGO_BIN_EXE_vhu"))
            .args(["bench", "--socket-path"])
            .arg(&d.sock)
            .args([
                "--rw",
                "randrw",
                "--verify",
                "--queues",
                "4",
                "--iodepth",
                "16",
            ])
            .args(["--runtime", "2", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut bench = Kill(bench, PathBuf::new());
        let mut most = Vec::new();
        while bench.0.try_wait().unwrap().is_none() {
            let now = worker_threads(&d);
            if now.len() > most.len() {
                most = now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let child = std::mem::replace(&mut bench.0, Command::new("true").spawn().unwrap());
        let out = child.wait_with_output().unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{s}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names: Vec<String> = (0..want).map(|t| format!("vhu-worker-{t}")).collect();
        assert_eq!(most, names, "{threads:?}");
        let lines = counters_after(&d, 4, 2);
        for l in &lines {
            assert!(count(l, "requests") > 0, "{l}");
            assert_eq!(count(l, "errors"), 0, "{l}");
        }
        let log = d.log();
        match want {
            1 => assert!(log.contains("queue 0,1,2,3 -> thread 0"), "{log}"),
            2 => {
                assert!(log.contains("queue 0,2 -> thread 0"), "{log}");
                assert!(log.contains("queue 1,3 -> thread 1"), "{log}");
            }
            4 => assert!(log.contains("queue 3 -> thread 3"), "{log}"),
            _ => assert!(log.contains(&format!("-> thread {}", want - 1)), "{log}"),
        }
        // Threads exit with the front-end's rings.
        let t0 = Instant::now();
        while !worker_threads(&d).is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // More threads than queues is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .args([
            "--socket-path",
            "/nonexistent/x.sock",
            "--num-queues",
            "2",
            "--threads",
            "3",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads"));
}

/// A loop device, detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A block device served with O_DIRECT: a loop device with 4096-byte
/// logical blocks over an image. The daemon reads the logical block size
/// from sysfs, logs it and offers it as BLK_SIZE (`vhu probe` sees
/// blk_size 4096), 4 KiB verified random I/O passes, and 512-byte
/// requests (fine for a file on this file system) are refused with IOERR,
/// by the O_DIRECT check when the driver ignored BLK_SIZE.
/// Skipped, with the reason printed, where no loop device can be set up
/// (not root, no losetup, no loop driver).
#[test]
fn a_loop_device_with_4k_blocks_under_o_direct() {
    let dir = common::TempDir::new("loop");
    let (img, _f) = dir.image(32 << 20);
    let made = Command::new("losetup")
        .args(["--find", "--show", "--sector-size", "4096"])
        .arg(&img)
        .output();
    let dev = match made {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
        Ok(o) => {
            println!(
                "skipped: losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            println!("skipped: no losetup: {e}");
            return;
        }
    };
    let _loop = Loop(dev.clone());
    let sysfs = format!(
        "/sys/block/{}/queue/logical_block_size",
        dev.trim_start_matches("/dev/")
    );
    assert_eq!(std::fs::read_to_string(&sysfs).unwrap().trim(), "4096");
    let d = daemon(&["--blk-file", &dev, "--cache", "none", "--num-queues", "2"]);
    // The socket takes connections from bind, a moment before the daemon
    // logs what it serves.
    let t0 = std::time::Instant::now();
    while !d.log().contains("serving ") && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = d.log();
    assert!(
        log.contains(
            "serving 33554432 bytes (read-write, cache=None, aio=io_uring, 4096-byte blocks)"
        ),
        "{log}"
    );
    let probe = Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["probe", "--json", "--socket-path"])
        .arg(&d.sock)
        .output()
        .unwrap();
    let j = String::from_utf8_lossy(&probe.stdout);
    assert!(probe.status.success(), "{j}");
    assert!(j.contains("\"blk.BLK_SIZE\""), "{j}");
    assert!(j.contains("\"blk_size\": 4096"), "{j}");
    let mut args = VERIFIED.to_vec();
    args.extend(["--queues", "2"]);
    ok(bench(&d.sock, &args), 3000);
    // Buffers not 512-byte aligned (what O_DIRECT needs of memory here):
    // bounced, verified.
    args.extend(["--buffer-offset", "256"]);
    ok(bench(&d.sock, &args), 3000);
    assert!(d.log().contains("aligned bounce buffer"), "{}", d.log());
    // 512-byte reads: refused by the planner when BLK_SIZE was
    // negotiated, and by the O_DIRECT check when it was not.
    for extra in [None, Some("--no-guest-features")] {
        let mut args = vec!["--rw", "randread", "--bs", "512", "--requests", "20"];
        args.extend(extra);
        let out = bench(&d.sock, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("status 1"), "{err}");
    }
    let log = d.log();
    assert!(log.contains("not aligned for O_DIRECT"), "{log}");
    assert!(log.contains("4096-byte offsets and lengths"), "{log}");
}

/// The names of all the daemon's threads seen while `vhu bench` runs with
/// `args` (sampled every 20 ms), the bench's output checked.
fn threads_during(d: &common::Daemon, args: &[&str]) -> std::collections::BTreeSet<String> {
    let mut bench = Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["bench", "--socket-path"])
        .arg(&d.sock)
        .args(args)
        .args(["--runtime", "2", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while bench.try_wait().unwrap().is_none() {
        seen.extend(thread_names(d));
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = bench.wait_with_output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    seen
}

/// With the page cache, writes are copies the worker makes itself: a
/// deep buffered write load never wakes io_uring's worker threads (which
/// would cost a thread hand-off per write). Flushes, which io_uring does
/// block on its workers, show that those threads are seen when they run.
#[test]
fn page_cache_writes_stay_off_io_uring_worker_threads() {
    let d = daemon(&["--size", "32M", "--cache", "writeback"]);
    let writes = threads_during(&d, &["--rw", "randwrite", "--iodepth", "32"]);
    assert!(
        writes.iter().any(|n| n.starts_with("vhu-worker-")),
        "{writes:?}"
    );
    let io_wq: Vec<_> = writes.iter().filter(|n| n.starts_with("iou-wrk")).collect();
    assert!(io_wq.is_empty(), "buffered writes went to {io_wq:?}");
    let flushes = threads_during(
        &d,
        &["--rw", "randwrite", "--iodepth", "32", "--flush-every", "1"],
    );
    assert!(
        flushes.iter().any(|n| n.starts_with("iou-wrk")),
        "flushes through io_uring ran on no worker thread: {flushes:?}"
    );
}

/// The most I/O pool threads the daemon (two queues, six I/O threads)
/// runs at once through 2 s of writes each followed by a flush at
/// iodepth 32 on `queues` queues (flushes never wait for a busy thread:
/// each takes one, as the budget allows), and its log.
fn most_io_threads(queues: &str) -> (usize, String) {
    let d = daemon(&[
        "--size",
        "32M",
        "--aio",
        "threads",
        "--num-queues",
        "2",
        "--io-threads",
        "6",
    ]);
    let mut bench = Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["bench", "--socket-path"])
        .arg(&d.sock)
        .args(["--rw", "randwrite", "--flush-every", "1", "--iodepth", "32"])
        .args(["--queues", queues])
        .args(["--runtime", "2", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut most = 0;
    while bench.try_wait().unwrap().is_none() {
        let io = thread_names(&d)
            .iter()
            .filter(|n| n.starts_with("vhu-io-"))
            .count();
        most = most.max(io);
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = bench.wait_with_output().unwrap();
    let log = d.log();
    assert!(out.status.success(), "{out:?}\n{log}");
    (most, log)
}

/// The queues' thread pools share `--io-threads` (six, on two queues): a
/// queue busy alone uses more than an even part of them (three), up to
/// all six; two busy queues run six in all, or seven for a moment (a
/// pool's first thread is never refused: the busy pool lets its threads
/// past its share go as they finish).
#[test]
fn the_queues_share_the_io_thread_budget() {
    let (most, log) = most_io_threads("1");
    assert!(
        (4..=6).contains(&most),
        "{most} I/O threads at once, one queue busy:\n{log}"
    );
    assert_eq!(log.matches("of a budget of 6 threads").count(), 1, "{log}");
    let (most, log) = most_io_threads("2");
    assert!(
        (2..=7).contains(&most),
        "{most} I/O threads at once, two queues busy:\n{log}"
    );
    assert!(
        log.contains("I/O thread pool 2 of a budget of 6 threads"),
        "{log}"
    );
}

//! A Linux guest under QEMU (TCG) uses our `vhost-user-blk` daemon: the
//! guest writes a pattern with O_DIRECT, reads it back and compares, and
//! after poweroff the host checks the image bytes. With 1 and 2 queues, and
//! with packed rings; and the same on the C back-end (`examples/c/blk.c`).
//! And a disk that grows while the guest runs: the daemon (`--watch`)
//! tells QEMU with BACKEND_CONFIG_CHANGE_MSG and the guest sees the new
//! size in `/sys/block/vda/size`.
//!
//! The guest (a Debian cloud kernel and a busybox initramfs) is built and
//! cached by `tests/guest/build-guest.sh`, which also installs QEMU.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::guest::{base64, guest, pattern, wait_for, Kill};

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Run {
    console: String,
    daemon_log: String,
    /// Times the daemon was killed and restarted.
    kills: usize,
}

/// How to run the guest.
struct Opts<'a> {
    queues: u16,
    packed: bool,
    /// Extra daemon arguments.
    daemon_args: &'a [&'a str],
    /// Kill the daemon with SIGKILL this long after the guest's test
    /// starts (each), and start a new one on the same socket and image;
    /// QEMU reconnects (`reconnect-ms`).
    kills: &'a [Duration],
    /// Grow the image to this size once the guest printed `vda before:`.
    grow_to: Option<u64>,
    /// The back-end program (it takes the same arguments); `None`: our
    /// `vhost-user-blk` daemon.
    program: Option<&'a Path>,
}

fn spawn_daemon(sock: &Path, image: &Path, o: &Opts<'_>, log: &Path) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let program = o
        .program
        .unwrap_or(Path::new(env!("CARGO_BIN_EXE_vhost-user-blk")));
    let mut daemon = Command::new(program)
        .arg("--socket-path")
        .arg(sock)
        .arg("--blk-file")
        .arg(image)
        .args(["--num-queues", &o.queues.to_string(), "--log-level", "info"])
        .args(o.daemon_args)
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start the back-end");
    wait_for(sock, &mut daemon, "vhost-user-blk");
    daemon
}

/// Boots the guest on our daemon; the guest runs `script`.
fn boot(o: &Opts<'_>, image: &Path, script: &str) -> Run {
    let g = guest();
    let dir = common::temp_path("guest");
    let sock = dir.join("blk.sock");
    let log = dir.join("daemon.log");
    let mut daemon = Kill(spawn_daemon(&sock, image, o, &log));

    let device = format!(
        "vhost-user-blk-pci,chardev=c0,num-queues={}{}",
        o.queues,
        if o.packed { ",packed=on" } else { "" }
    );
    let append = format!(
        "console=ttyS0 panic=-1 quiet vhu.timeout=200 vhu.test={}",
        base64(script.as_bytes())
    );
    let reconnect = if o.kills.is_empty() {
        ""
    } else {
        ",reconnect-ms=200"
    };
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .args(["-smp", &o.queues.to_string()])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args(["-append", &append])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}{reconnect}", sock.display()))
        .args(["-device", &device])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let out = qemu.stdout.take().unwrap();
    let mut qemu = Kill(qemu);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut console = String::new();
    let mut started: Option<Instant> = None;
    let mut kills = 0;
    loop {
        if let Some(t) = started {
            if let Some(due) = o.kills.get(kills) {
                if t.elapsed() >= *due {
                    let _ = daemon.0.kill();
                    let _ = daemon.0.wait();
                    kills += 1;
                    daemon = Kill(spawn_daemon(&sock, image, o, &log));
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(20))) {
            Ok(line) => {
                if line.contains("VHU-GUEST: TEST-START") {
                    started = Some(Instant::now());
                }
                // Grown once the guest has read the size it starts with.
                if let (Some(size), true) = (o.grow_to, line.contains("vda before:")) {
                    let f = std::fs::File::options().write(true).open(image).unwrap();
                    f.set_len(size).unwrap();
                }
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(!left.is_zero(), "guest timed out:\n{console}");
            }
        }
    }
    let status = qemu.0.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = qemu.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    drop(daemon);
    let daemon_log = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        status.success(),
        "qemu failed ({status}): {err}\n{console}\n{daemon_log}"
    );
    Run {
        console,
        daemon_log,
        kills,
    }
}

fn image(size: u64) -> PathBuf {
    let p = common::temp_path("guest").join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

const OFF: u64 = 1 << 20;
const LEN: usize = 768 << 10;

fn script(queues: u16, seed: u64) -> String {
    format!(
        "set -e\n\
         echo \"vda: $(cat /sys/block/vda/size) sectors, queues: $(ls /sys/block/vda/mq | wc -l)\"\n\
         test \"$(ls /sys/block/vda/mq | wc -l)\" = {queues}\n\
         vhu-dio write /dev/vda {OFF} {LEN} {seed}\n\
         vhu-dio flush /dev/vda\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         vhu-dio verify /dev/vda {OFF} {LEN} {seed}\n\
         vhu-dio read /dev/vda 0 4096\n"
    )
}

fn check(queues: u16, packed: bool, seed: u64) {
    check_on(None, queues, packed, seed);
}

fn check_on(program: Option<&Path>, queues: u16, packed: bool, seed: u64) {
    let img = image(64 << 20);
    let o = Opts {
        queues,
        packed,
        daemon_args: &[],
        kills: &[],
        grow_to: None,
        program,
    };
    let run = boot(&o, &img, &script(queues, seed));
    println!("--- guest console ---\n{}", run.console);
    println!("--- daemon log ---\n{}", run.daemon_log);
    assert!(
        run.console.contains("VHU-GUEST: RESULT PASS"),
        "guest test failed:\n{}\n--- daemon ---\n{}",
        run.console,
        run.daemon_log
    );
    assert!(
        run.console.contains("vda: 131072 sectors"),
        "{}",
        run.console
    );
    if program.is_some() {
        // QEMU takes the inflight area the C back-end offers: requests
        // are recorded in it.
        assert!(
            run.daemon_log.contains("inflight area of"),
            "{}",
            run.daemon_log
        );
    }
    // The host sees exactly what the guest wrote.
    let bytes = std::fs::read(&img).unwrap();
    let got = &bytes[OFF as usize..OFF as usize + LEN];
    assert!(
        got == pattern(seed, OFF, LEN).as_slice(),
        "image bytes differ from the pattern"
    );
    assert!(
        bytes[..OFF as usize].iter().all(|b| *b == 0),
        "bytes before the pattern changed"
    );
    let _ = std::fs::remove_dir_all(img.parent().unwrap());
}

#[test]
fn guest_boots_and_checks_data_one_queue() {
    check(1, false, 7);
}

#[test]
fn guest_boots_and_checks_data_two_queues() {
    check(2, false, 11);
}

#[test]
fn guest_boots_and_checks_data_packed_ring() {
    check(1, true, 13);
}

/// The same guest on the C back-end (`examples/c/blk.c` over the C ABI),
/// with two queues, split and packed rings.
#[test]
fn guest_boots_on_the_c_backend_two_queues() {
    let dir = common::TempDir::new("c-blk-guest");
    let bin = common::build_c_blk(&dir.0);
    check_on(Some(&bin), 2, false, 17);
}

#[test]
fn guest_boots_on_the_c_backend_packed_ring() {
    let dir = common::TempDir::new("c-blk-guest");
    let bin = common::build_c_blk(&dir.0);
    check_on(Some(&bin), 2, true, 19);
}

/// The guest writes and verifies several areas while the daemon (slowed
/// down, so requests are in flight) is killed with SIGKILL three times and
/// restarted; QEMU reconnects and the inflight area carries the requests
/// across. The guest's checks pass and the host sees every byte.
fn reconnect(packed: bool, seed: u64) {
    reconnect_on(None, packed, seed);
}

fn reconnect_on(program: Option<&Path>, packed: bool, seed: u64) {
    const ROUNDS: u64 = 10;
    let img = image(64 << 20);
    let mut script = String::from("set -e\n");
    for r in 0..ROUNDS {
        let off = OFF + r * LEN as u64;
        script.push_str(&format!(
            "vhu-dio write /dev/vda {off} {LEN} {}\n\
             echo 3 > /proc/sys/vm/drop_caches\n\
             vhu-dio verify /dev/vda {off} {LEN} {}\n",
            seed + r,
            seed + r
        ));
    }
    let kills = [
        Duration::from_millis(500),
        Duration::from_millis(1500),
        Duration::from_millis(2500),
    ];
    let o = Opts {
        queues: 1,
        packed,
        // Slow enough that the guest spends most of its test waiting on a
        // request, so each kill finds one in flight even when TCG runs
        // slowly on a loaded machine.
        daemon_args: &["--io-delay-us", "250000"],
        kills: &kills,
        grow_to: None,
        program,
    };
    let run = boot(&o, &img, &script);
    println!("--- guest console ---\n{}", run.console);
    println!("--- daemon log ---\n{}", run.daemon_log);
    assert_eq!(
        run.kills,
        kills.len(),
        "the guest finished before every kill"
    );
    assert!(
        run.console.contains("VHU-GUEST: RESULT PASS"),
        "guest test failed:\n{}\n--- daemon ---\n{}",
        run.console,
        run.daemon_log
    );
    assert!(
        run.daemon_log.contains("resubmitting"),
        "no restart found requests in flight:\n{}",
        run.daemon_log
    );
    // Our daemon's I/O engine (the C back-end does pread/pwrite).
    assert!(
        program.is_some() || run.daemon_log.contains("queue 0: io_uring I/O"),
        "the requests did not go through io_uring:\n{}",
        run.daemon_log
    );
    let bytes = std::fs::read(&img).unwrap();
    for r in 0..ROUNDS {
        let off = OFF + r * LEN as u64;
        let got = &bytes[off as usize..off as usize + LEN];
        assert!(
            got == pattern(seed + r, off, LEN).as_slice(),
            "round {r} differs on the image"
        );
    }
    let _ = std::fs::remove_dir_all(img.parent().unwrap());
}

#[test]
fn guest_sees_the_disk_grow() {
    const GROWN: u64 = 96 << 20;
    let img = image(64 << 20);
    // The guest waits (up to a minute) for the new size, then writes and
    // verifies a pattern past the old end.
    let past = 80u64 << 20;
    let script = format!(
        "set -e\n\
         echo \"vda before: $(cat /sys/block/vda/size) sectors\"\n\
         i=0\n\
         while [ \"$(cat /sys/block/vda/size)\" = 131072 ]; do\n\
           i=$((i+1)); [ $i -lt 600 ]; sleep 0.1\n\
         done\n\
         echo \"vda after: $(cat /sys/block/vda/size) sectors\"\n\
         vhu-dio write /dev/vda {past} 65536 7\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         vhu-dio verify /dev/vda {past} 65536 7\n"
    );
    let o = Opts {
        queues: 1,
        packed: false,
        daemon_args: &["--watch"],
        kills: &[],
        grow_to: Some(GROWN),
        program: None,
    };
    let run = boot(&o, &img, &script);
    println!("--- guest console ---\n{}", run.console);
    println!("--- daemon log ---\n{}", run.daemon_log);
    assert!(
        run.console.contains("VHU-GUEST: RESULT PASS"),
        "guest test failed:\n{}\n--- daemon ---\n{}",
        run.console,
        run.daemon_log
    );
    assert!(
        run.console.contains("vda before: 131072 sectors"),
        "{}",
        run.console
    );
    assert!(
        run.console.contains("vda after: 196608 sectors"),
        "{}",
        run.console
    );
    assert!(
        run.daemon_log
            .contains("front-end told of the new capacity"),
        "{}",
        run.daemon_log
    );
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len() as u64, GROWN);
    let got = &bytes[past as usize..past as usize + 65536];
    assert!(
        got == pattern(7, past, 65536).as_slice(),
        "pattern past the old end"
    );
    let _ = std::fs::remove_dir_all(img.parent().unwrap());
}

#[test]
fn guest_survives_backend_kills_split_ring() {
    reconnect(false, 100);
}

#[test]
fn guest_survives_backend_kills_packed_ring() {
    reconnect(true, 200);
}

/// The same kills on the C back-end: what it had popped and not completed
/// is recorded in the inflight area, and the restarted back-end's data
/// plane hands it out again (inflight recovery through the C ABI).
#[test]
fn guest_survives_c_backend_kills_split_ring() {
    let dir = common::TempDir::new("c-blk-guest");
    let bin = common::build_c_blk(&dir.0);
    reconnect_on(Some(&bin), false, 300);
}

#[test]
fn guest_survives_c_backend_kills_packed_ring() {
    let dir = common::TempDir::new("c-blk-guest");
    let bin = common::build_c_blk(&dir.0);
    reconnect_on(Some(&bin), true, 400);
}

#[test]
fn host_pattern_matches_the_guest_helper() {
    // mix() of word 0 with seed 0 is the SplitMix64 finaliser of 0: 0.
    assert_eq!(pattern(0, 0, 8), vec![0; 8]);
    // Windows of one pattern agree.
    let whole = pattern(5, 4096, 64);
    assert_eq!(&whole[16..48], pattern(5, 4096 + 16, 32).as_slice());
    assert_eq!(base64(b"vhu"), "dmh1");
    assert_eq!(base64(b"ab"), "YWI=");
}

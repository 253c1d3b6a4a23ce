//! A live migration under QEMU (TCG): a source QEMU and a destination
//! QEMU (`-incoming`), each on its own `vhost-user-blk` daemon serving the
//! same image. The guest writes and verifies a pattern in rounds while
//! QMP `migrate` moves it; the dirty pages our daemon logs (LOG_SHMFD,
//! VHOST_F_LOG_ALL, VHOST_VRING_F_LOG) are what keeps the guest's buffers
//! and rings right on the destination, where the guest finishes its
//! rounds and prints its PASS marker. The host then checks the image.
//!
//! QEMU refuses to migrate a vhost-user device whose back-end cannot log
//! ("Migration disabled: vhost lacks VHOST_F_LOG_ALL feature", and
//! LOG_SHMFD for vhost-user), so a migration that completes is itself the
//! proof that it was not blocked (the daemon offers logging by default;
//! with `--no-migration` QEMU refuses, which the second test checks).
//! QEMU's stop here is its plain GET_VRING_BASE (it drains the rings).
//!
//! The same migration runs between two C back-ends (`examples/c/blk.c`,
//! the C ABI's dirty log). A migration cancelled at its switch-over (the
//! source's device stopped while logging) resumes the guest on the
//! source, on either back-end.
//!
//! The guest kit (kernel, initramfs, QEMU) comes from
//! `tests/guest/build-guest.sh`, as for `qemu_guest.rs`.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::guest::{base64, guest, pattern, wait_for, Guest, Kill, Qmp};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The C back-end `examples/c/blk.c` (offers logging) on `image`, built
/// into `dir` by the first call.
fn c_backend(dir: &Path, sock: &Path, image: &Path, log: &Path) -> Kill {
    let bin = dir.join("vhu-c-blk");
    let bin = if bin.exists() {
        bin
    } else {
        common::build_c_blk(dir)
    };
    let log = std::fs::File::create(log).unwrap();
    let mut d = Command::new(bin)
        .arg("--socket-path")
        .arg(sock)
        .arg("--blk-file")
        .arg(image)
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start vhu-c-blk");
    wait_for(sock, &mut d, "vhu-c-blk");
    Kill(d)
}

fn daemon(sock: &Path, image: &Path, log: &Path, migration: bool) -> Kill {
    let log = std::fs::File::create(log).unwrap();
    let mut d = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .arg("--socket-path")
        .arg(sock)
        .arg("--blk-file")
        .arg(image)
        .args(["--log-level", "info"])
        .args(if migration {
            &[][..]
        } else {
            &["--no-migration"]
        })
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start vhost-user-blk");
    wait_for(sock, &mut d, "vhost-user-blk");
    Kill(d)
}

/// A number field of a flat QMP answer (`"name": 123`).
fn field(json: &str, name: &str) -> Option<u64> {
    let key = format!("\"{name}\": ");
    let at = json.find(&key)? + key.len();
    let digits: String = json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn qemu(g: &Guest, dir: &Path, name: &str, sock: &Path, append: &str, extra: &[&str]) -> Kill {
    let q = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-smp", "1"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args(["-append", append])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join(format!("{name}.qmp")).display()
        ))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    Kill(q)
}

/// The console lines of a QEMU, as they come.
fn console(q: &mut Kill) -> mpsc::Receiver<String> {
    let out = q.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads console lines into `text` until one contains `marker`.
fn until(rx: &mpsc::Receiver<String>, text: &mut String, marker: &str, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(marker);
                text.push_str(&line);
                text.push('\n');
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}

const OFF: u64 = 1 << 20;
const LEN: usize = 512 << 10;
const ROUNDS: u64 = 100;

/// The guest's kernel command line: rounds of write, drop caches, verify,
/// each on its own area with its own seed, the migration somewhere in the
/// middle. (A loop: the kernel command line holds 2 KiB.)
fn rounds() -> String {
    let script = format!(
        "set -e\n\
         r=0\n\
         while [ $r -lt {ROUNDS} ]; do\n\
           off=$(({OFF} + r * {LEN})); seed=$((300 + r))\n\
           vhu-dio write /dev/vda $off {LEN} $seed\n\
           echo 3 > /proc/sys/vm/drop_caches\n\
           vhu-dio verify /dev/vda $off {LEN} $seed\n\
           echo \"round $r ok\"\n\
           r=$((r + 1))\n\
         done\n"
    );
    format!(
        "console=ttyS0 panic=-1 quiet vhu.timeout=200 vhu.test={}",
        base64(script.as_bytes())
    )
}

/// A source QEMU on back-end `a` and a destination QEMU (`-incoming`)
/// on `b`, in `dir`, the guest running [`rounds`]; returned once its
/// second round passed on the source.
struct Qemus {
    src: Kill,
    dst: Kill,
    src_out: mpsc::Receiver<String>,
    dst_out: mpsc::Receiver<String>,
    /// The destination's migration address.
    incoming: String,
    /// The source's console so far.
    text: String,
}

fn qemus(g: &Guest, dir: &Path) -> Qemus {
    let append = rounds();
    let incoming = format!("unix:{}", dir.join("mig.sock").display());
    let mut src = qemu(g, dir, "src", &dir.join("a.sock"), &append, &[]);
    let mut dst = qemu(
        g,
        dir,
        "dst",
        &dir.join("b.sock"),
        &append,
        &["-incoming", &incoming],
    );
    let src_out = console(&mut src);
    let dst_out = console(&mut dst);
    let mut text = String::new();
    assert!(
        until(&src_out, &mut text, "round 1 ok", 240),
        "the guest did not start its rounds on the source:\n{text}"
    );
    Qemus {
        src,
        dst,
        src_out,
        dst_out,
        incoming,
        text,
    }
}

/// QMP `migrate` to `incoming`.
fn migrate(qs: &mut Qmp, incoming: &str) {
    let r = qs.cmd(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"{incoming}"}}}}"#
    ));
    assert!(r.contains("\"return\""), "migrate refused: {r}");
}

/// Every round's bytes are on the image.
fn check_rounds(image: &Path) {
    let bytes = std::fs::read(image).unwrap();
    for r in 0..ROUNDS {
        let off = OFF + r * LEN as u64;
        let got = &bytes[off as usize..off as usize + LEN];
        assert!(
            got == pattern(300 + r, off, LEN).as_slice(),
            "round {r} differs on the image"
        );
    }
}

/// A 64 MiB image in `dir`, and two daemons on it (sockets and logs
/// `a` and `b`), each started by `start`.
fn two_backends(dir: &Path, start: &Start) -> (std::path::PathBuf, [Kill; 2]) {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let a = start(dir, &dir.join("a.sock"), &image, &dir.join("a.log"));
    let b = start(dir, &dir.join("b.sock"), &image, &dir.join("b.log"));
    (image, [a, b])
}

#[test]
fn guest_migrates_between_two_daemons_under_load() {
    migrates_under_load("migrate", &|_, sock, image, log| {
        daemon(sock, image, log, true)
    });
}

#[test]
fn guest_migrates_between_two_c_backends_under_load() {
    migrates_under_load("migrate-c", &|dir, sock, image, log| {
        c_backend(dir, sock, image, log)
    });
}

/// Starts a back-end: the test's directory, its socket, the image and
/// the file for its log.
type Start = dyn Fn(&Path, &Path, &Path, &Path) -> Kill;

/// A migration between two back-ends `start` starts on one image while
/// the guest writes and verifies rounds; the source's dirty log kept the
/// destination right.
fn migrates_under_load(tag: &str, start: &Start) {
    let g = guest();
    let dir = common::temp_path(tag);
    let (image, [_da, _db]) = two_backends(&dir, start);
    let (log_a, log_b) = (dir.join("a.log"), dir.join("b.log"));

    let Qemus {
        mut src,
        mut dst,
        src_out,
        dst_out,
        incoming,
        mut text,
    } = qemus(&g, &dir);
    let mut qs = Qmp::connect(&dir.join("src.qmp"), &mut src.0);
    let mut qd = Qmp::connect(&dir.join("dst.qmp"), &mut dst.0);
    let started = Instant::now();
    migrate(&mut qs, &incoming);
    let info = loop {
        let r = qs.cmd(r#"{"execute":"query-migrate"}"#);
        if r.contains("\"completed\"") {
            break r;
        }
        assert!(
            !r.contains("\"failed\"") && !r.contains("\"cancelled\""),
            "migration failed: {r}\n{text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "migration did not complete: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    // The source's console up to the switch.
    while let Ok(l) = src_out.try_recv() {
        text.push_str(&l);
        text.push('\n');
    }
    let rounds_on_source = text.matches("ok\n").count();
    // The source may have exited once its part was done.
    let _ = qs.try_cmd(r#"{"execute":"quit"}"#);
    // The destination may already have finished and powered off.
    let status = qd
        .try_cmd(r#"{"execute":"query-status"}"#)
        .unwrap_or_else(|| "(the destination QEMU has exited)".into());
    let mut dtext = String::new();
    let passed = until(&dst_out, &mut dtext, "VHU-GUEST: RESULT", 240);
    let _ = dst.0.wait();
    drop(_da);
    drop(_db);
    let (la, lb) = (
        std::fs::read_to_string(&log_a).unwrap_or_default(),
        std::fs::read_to_string(&log_b).unwrap_or_default(),
    );
    println!("--- source console ---\n{text}--- destination console ---\n{dtext}");
    println!("--- source daemon ---\n{la}--- destination daemon ---\n{lb}");
    assert!(
        passed && dtext.contains("VHU-GUEST: RESULT PASS"),
        "the guest did not pass on the destination ({status}):\n{dtext}"
    );
    let rounds_on_dest = dtext.matches("ok\n").count();
    // The figures for the operator: QEMU's own, and our daemon's.
    let dirty = la
        .lines()
        .find(|l| l.contains("dirty log:"))
        .unwrap_or("(no dirty-log line)");
    println!("query-migrate: {}", info.trim());
    println!(
        "migration: completed in {:.2} s; QEMU reports downtime {} ms, total {} ms, \
         {} bytes transferred ({} pages sent whole, {} dirty-bitmap syncs); \
         guest rounds on the source {rounds_on_source}, on the destination {rounds_on_dest}; \
         source daemon: {}",
        took.as_secs_f64(),
        field(&info, "downtime").unwrap_or(0),
        field(&info, "total-time").unwrap_or(0),
        field(&info, "transferred").unwrap_or(0),
        field(&info, "normal").unwrap_or(0),
        field(&info, "dirty-sync-count").unwrap_or(0),
        dirty.trim()
    );
    assert!(
        rounds_on_dest > 0,
        "the guest finished before the migration: nothing ran on the destination"
    );
    assert!(la.contains("dirty logging on"), "{la}");
    let pages = dirty
        .split("dirty log: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(pages > 0, "the source daemon logged no page: {la}");
    // The host sees every round's bytes.
    check_rounds(&image);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A migration cancelled at its switch-over, as a VMM cancels one whose
/// destination fails at the last step: with QEMU's
/// `pause-before-switchover` the source stops the guest and its device
/// (GET_VRING_BASE while the dirty log is on) and waits; `migrate_cancel`
/// then starts them again on the source (the ring from the base it
/// stopped at, logging off), and the guest finishes its rounds there,
/// every round's bytes on the image.
#[test]
fn a_migration_cancelled_at_the_switchover_resumes_on_the_source() {
    cancelled_at_the_switchover("migrate-cancel", &|_, sock, image, log| {
        daemon(sock, image, log, true)
    });
}

/// The same between two C back-ends (their restart while logging).
#[test]
fn a_migration_cancelled_at_the_switchover_resumes_on_a_c_backend() {
    cancelled_at_the_switchover("migrate-cancel-c", &|dir, sock, image, log| {
        c_backend(dir, sock, image, log)
    });
}

fn cancelled_at_the_switchover(tag: &str, start: &Start) {
    let g = guest();
    let dir = common::temp_path(tag);
    let (image, [da, db]) = two_backends(&dir, start);
    let Qemus {
        mut src,
        dst,
        src_out,
        dst_out: _dst_out,
        incoming,
        mut text,
    } = qemus(&g, &dir);
    let mut qs = Qmp::connect(&dir.join("src.qmp"), &mut src.0);
    let r = qs.cmd(
        r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"pause-before-switchover","state":true}]}}"#,
    );
    assert!(r.contains("\"return\""), "capability refused: {r}");
    migrate(&mut qs, &incoming);
    let query = |qs: &mut Qmp, want: &str| {
        let t0 = Instant::now();
        loop {
            let r = qs.cmd(r#"{"execute":"query-migrate"}"#);
            if r.contains(want) {
                return r;
            }
            assert!(
                !r.contains("\"failed\"") && !r.contains("\"completed\""),
                "waiting for {want}: {r}"
            );
            assert!(t0.elapsed() < Duration::from_secs(60), "no {want}: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The source's guest and device are stopped here, its pages sent.
    query(&mut qs, "\"pre-switchover\"");
    let stopped = qs.cmd(r#"{"execute":"query-status"}"#);
    let r = qs.cmd(r#"{"execute":"migrate_cancel"}"#);
    assert!(r.contains("\"return\""), "migrate_cancel refused: {r}");
    query(&mut qs, "\"cancelled\"");
    let passed = until(&src_out, &mut text, "VHU-GUEST: RESULT", 240);
    let _ = src.0.wait();
    drop(dst);
    drop(da);
    drop(db);
    let (la, lb) = (
        std::fs::read_to_string(dir.join("a.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("b.log")).unwrap_or_default(),
    );
    println!("--- source console ---\n{text}");
    println!("--- source daemon ---\n{la}--- destination daemon ---\n{lb}");
    assert!(stopped.contains("\"finish-migrate\""), "{stopped}");
    assert!(
        passed && text.contains("VHU-GUEST: RESULT PASS"),
        "the guest did not pass on the source:\n{text}"
    );
    // The source back-end: logging on, then (the daemon logs its rings)
    // the ring stopped at the pause and started again at the cancel, then
    // logging off.
    let after = |from: usize, what: &str| {
        la[from..]
            .find(what)
            .map(|i| from + i + what.len())
            .unwrap_or_else(|| panic!("no {what:?} after byte {from}:\n{la}"))
    };
    let mut at = after(0, "dirty logging on");
    if la.contains("ring 0 started") {
        at = after(after(at, "ring 0 stopped"), "ring 0 started");
    }
    after(at, "dirty logging off");
    check_rounds(&image);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `--no-migration` the daemon offers no dirty logging, and QEMU
/// refuses to migrate its guest (a migration blocker), rather than moving
/// a guest whose device writes would be lost.
#[test]
fn migration_is_refused_when_the_daemon_does_not_log() {
    let g = guest();
    let dir = common::temp_path("nomigrate");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sock = dir.join("a.sock");
    let log = dir.join("a.log");
    let _d = daemon(&sock, &image, &log, false);
    let append = format!(
        "console=ttyS0 panic=-1 quiet vhu.timeout=200 vhu.test={}",
        base64(b"sleep 30\n")
    );
    let mut src = qemu(&g, &dir, "src", &sock, &append, &[]);
    let _out = console(&mut src);
    let mut qs = Qmp::connect(&dir.join("src.qmp"), &mut src.0);
    // QEMU connects to the back-end at start-up; the blocker is set once
    // the device is initialised.
    let mig = dir.join("mig.sock");
    let r = qs.cmd(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#,
        mig.display()
    ));
    println!("migrate without logging: {}", r.trim());
    assert!(r.contains("\"error\""), "migration was not refused: {r}");
    let _ = qs.cmd(r#"{"execute":"quit"}"#);
    let _ = src.0.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

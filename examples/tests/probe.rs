//! `vhu probe` against qemu-storage-daemon and against our daemon, each
//! started by the test on a socket in a temporary directory.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(sock: &Path, child: &mut Child) {
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(child.try_wait().unwrap().is_none(), "back-end exited");
        assert!(t0.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn probe(sock: &Path, json: bool) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vhu"));
    c.args(["probe", "--socket-path"]).arg(sock);
    if json {
        c.arg("--json");
    }
    c.output().unwrap()
}

fn ok_json(sock: &Path) -> String {
    let out = probe(sock, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn probe_qemu_storage_daemon() {
    let dir = std::env::temp_dir().join(format!("vhu-probe-qsd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("qsd.sock");
    let mut qsd = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            "driver=null-co,node-name=n0,size=67108864,read-zeroes=on",
            "--export",
        ])
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon");
    wait_for(&sock, &mut qsd);
    let _qsd = Kill(qsd);
    let j = ok_json(&sock);
    println!("{j}");
    assert!(j.contains("\"queues\": 2,"), "{j}");
    for name in [
        "\"MQ\"",
        "\"REPLY_ACK\"",
        "\"CONFIG\"",
        "\"CONFIGURE_MEM_SLOTS\"",
        "\"blk.FLUSH\"",
    ] {
        assert!(j.contains(name), "{name} missing: {j}");
    }
    // 64 MiB in 512-byte sectors, read from the config space.
    assert!(j.contains("\"capacity\": 131072"), "{j}");
    assert!(j.contains("\"num_queues\": 2"), "{j}");
    // qsd serves the next front-end: a second probe works (text form).
    let out = probe(&sock, false);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("blk.capacity: 131072"), "{text}");
    drop(_qsd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn probe_our_daemon() {
    let d = common::Daemon::start_with(&["--size", "32M", "--num-queues", "3", "--read-only"]);
    let j = ok_json(&d.sock);
    println!("{j}");
    assert!(j.contains("\"queues\": 3,"), "{j}");
    assert!(j.contains("\"max_mem_slots\": 32,"), "{j}");
    for name in [
        "\"INFLIGHT_SHMFD\"",
        "\"GET_VRING_BASE_INFLIGHT\"",
        "\"RING_PACKED\"",
        "\"blk.RO\"",
    ] {
        assert!(j.contains(name), "{name} missing: {j}");
    }
    assert!(j.contains("\"capacity\": 65536"), "{j}");
}

#[test]
fn probe_without_a_back_end_fails_cleanly() {
    let out = probe(Path::new("/nonexistent/vhu.sock"), false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vhu.sock"));
}

/// `vhu probe --device net` against our vhost-user-net daemon: the device
/// bits named as virtio-net's and the config space decoded (mac, status,
/// queue pairs, mtu) as the daemon was told.
#[test]
fn probe_our_net_daemon() {
    let dir = common::temp_path("probe-net");
    let sock = dir.join("net.sock");
    let mut d = Command::new(env!("CARGO_BIN_EXE_vhost-user-net"))
        .arg("--socket-path")
        .arg(&sock)
        .args([
            "--backend",
            "null",
            "--mac",
            "52:54:00:12:34:56",
            "--queue-pairs",
            "2",
            "--mtu",
            "9000",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&sock, &mut d);
    let _d = Kill(d);
    let run = |args: &[&str]| {
        let t0 = Instant::now();
        loop {
            let out = Command::new(env!("CARGO_BIN_EXE_vhu"))
                .args(["probe", "--socket-path"])
                .arg(&sock)
                .args(args)
                .output()
                .unwrap();
            // The socket file appears at bind, a moment before listen.
            if out.status.success() || t0.elapsed() > Duration::from_secs(10) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let out = run(&["--device", "net", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = String::from_utf8(out.stdout).unwrap();
    assert!(
        j.contains(r#""net": {"mac": "52:54:00:12:34:56", "status": 1, "max_virtqueue_pairs": 2, "mtu": 9000"#),
        "{j}"
    );
    assert!(
        j.contains("\"net.MRG_RXBUF\"") && j.contains("\"net.MQ\""),
        "{j}"
    );
    assert!(j.contains("\"queues\": 4"), "{j}");
    let text = String::from_utf8(run(&["--device", "net"]).stdout).unwrap();
    assert!(text.contains("net.mac: 52:54:00:12:34:56"), "{text}");
    assert!(text.contains("net.mtu: 9000"), "{text}");
    // As a block device the 24-byte config is not decoded.
    let blk = String::from_utf8(run(&["--json"]).stdout).unwrap();
    assert!(
        !blk.contains("\"blk\":") && !blk.contains("\"net\":"),
        "{blk}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

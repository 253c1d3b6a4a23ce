//! The C ABI from Python: `ctypes_session.py` (standard library only)
//! loads the cdylib and runs a handshake, a start, a virtio-blk READ and a
//! stop against the back-end session, the data plane and the blk planner,
//! and checks the error codes of misuse.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>` of this test binary, with the cdylib built there
/// (a `cargo test` builds the library for the test, but only `cargo
/// build` puts the cdylib under its plain name).
fn cdylib() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--quiet", "-p", "vhost-user-c"])
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build -p vhost-user-c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // target/<profile>/deps/ctypes-<hash>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let so = dir.join("libvhost_user_c.so");
    assert!(so.exists(), "{} missing", so.display());
    so
}

#[test]
fn python_ctypes_drives_session_dataplane_and_blk() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ctypes_session.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(cdylib())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "ctypes test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ctypes: handshake, start, one READ, stop: ok"));
}

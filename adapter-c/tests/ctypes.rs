//! The C ABI from Python: `ctypes_session.py` (standard library only)
//! loads the cdylib and runs a handshake, a start, a virtio-blk READ and a
//! stop against the back-end session, the data plane and the blk planner,
//! and checks the error codes of misuse.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

#[test]
fn python_ctypes_drives_session_dataplane_and_blk() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ctypes_session.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(common::built_library("libvhost_user_c.so"))
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

//! The library built without its `in-order` feature (`tests/c/no_in_order.c`,
//! built by gcc against the header and that build's staticlib): it does
//! not carry VIRTIO_F_IN_ORDER, and refuses a session or a ring that asks
//! for it, whatever the core's build (a workspace build turns the core's
//! in-order handling on for every crate). Nor, without `migration`, the
//! dirty log (LOG_SHMFD, VHOST_F_LOG_ALL) or the device state.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

#[test]
fn a_library_without_in_order_refuses_it() {
    let dir = std::env::temp_dir().join(format!("vhu-c-no-in-order-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = common::built_c_program_with(&dir, "no_in_order", Some("std"));
    let out = Command::new(&bin).output().expect("run the C program");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

//! What the C ABI's test binaries that go through the built library
//! share.

use std::path::PathBuf;
use std::process::Command;

/// `file` (`libvhost_user_c.so` or `.a`) in `target/<profile>` of this
/// test binary, built there first (a `cargo test` builds the library for
/// the test, but only `cargo build` puts the cdylib and the staticlib
/// under their plain names).
pub fn built_library(file: &str) -> PathBuf {
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
    // target/<profile>/deps/<test>-<hash>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let lib = dir.join(file);
    assert!(lib.exists(), "{} missing", lib.display());
    lib
}

//! What the C ABI's test binaries that go through the built library
//! share.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `file` (`libvhost_user_c.so` or `.a`) in `target/<profile>` of this
/// test binary, built there first (a `cargo test` builds the library for
/// the test, but only `cargo build` puts the cdylib and the staticlib
/// under their plain names).
#[allow(dead_code)] // A test binary may only build with other features.
pub fn built_library(file: &str) -> PathBuf {
    built_library_with(file, None)
}

/// [`built_library`], or with `features` (the crate's own, instead of its
/// defaults) into a target directory of their own beside this one (so
/// that the other tests' library is not replaced under them).
pub fn built_library_with(file: &str, features: Option<&str>) -> PathBuf {
    // target/<profile>/deps/<test>-<hash>: the library is built for the
    // same profile (a `cargo test --release` would otherwise link a stale
    // release build, or none).
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let mut args = vec!["build", "--quiet", "-p", "vhost-user-c"];
    let release = dir.ends_with("release");
    if release {
        args.push("--release");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    if let Some(f) = features {
        args.extend(["--no-default-features", "--features", f]);
        let target = dir
            .parent()
            .unwrap()
            .join(format!("c-features-{}", f.replace(',', "-")));
        cmd.env("CARGO_TARGET_DIR", &target);
        dir = target.join(if release { "release" } else { "debug" });
    }
    let out = cmd.args(&args).output().expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build -p vhost-user-c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = dir.join(file);
    assert!(lib.exists(), "{} missing", lib.display());
    lib
}

/// `tests/c/<name>.c` built by gcc into `dir` against the header and the
/// staticlib (with what the hosted staticlib needs from the C library,
/// vhu.pc's `Libs.private`); returns the program's path.
#[allow(dead_code)] // Not every test binary that shares this builds C.
pub fn built_c_program(dir: &Path, name: &str) -> PathBuf {
    built_c_program_with(dir, name, None)
}

/// [`built_c_program`] against the library built with `features`
/// ([`built_library_with`]).
#[allow(dead_code)]
pub fn built_c_program_with(dir: &Path, name: &str, features: Option<&str>) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = dir.join(format!("vhu-c-{name}"));
    let out = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-I"])
        .arg(root.join("include"))
        .arg(root.join(format!("tests/c/{name}.c")))
        .arg(built_library_with("libvhost_user_c.a", features))
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ])
        .arg("-o")
        .arg(&bin)
        .output()
        .expect("run gcc");
    assert!(
        out.status.success(),
        "gcc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

//! The guest kit and what the QEMU tests share: the kernel and initramfs
//! `tests/guest/build-guest.sh` builds (and caches), the script encoding
//! for the kernel command line, the pattern the guest's `vhu-dio` writes,
//! child processes killed on drop, and a QMP client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn guest() -> Guest {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build-guest.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run build-guest.sh");
    assert!(
        out.status.success(),
        "build-guest.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{k} missing from build-guest.sh output:\n{text}"))
    };
    Guest {
        kernel: get("VHU_GUEST_KERNEL="),
        initrd: get("VHU_GUEST_INITRD="),
    }
}

/// Kills the child on drop (a failed assertion must not leak processes).
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The pattern `vhu-dio write` puts at absolute device offset `off`.
pub fn pattern(seed: u64, off: u64, len: usize) -> Vec<u8> {
    let mix = |word: u64| {
        let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(word);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut v = Vec::with_capacity(len);
    let mut o = off;
    while v.len() < len {
        v.extend_from_slice(&mix(o / 8).to_le_bytes());
        o += 8;
    }
    v.truncate(len);
    v
}

/// Waits until `path` exists while `child` (`what`) runs.
pub fn wait_for(path: &Path, child: &mut Child, what: &str) {
    let t0 = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited early: {status}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what}: no {path:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A QMP connection: capabilities negotiated, commands answered in order
/// (events skipped).
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path, qemu: &mut Child) -> Qmp {
        wait_for(path, qemu, "qemu");
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t0.elapsed() < Duration::from_secs(20), "QMP {path:?}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let greeting = q.line();
        assert!(greeting.contains("QMP"), "{greeting}");
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("QMP read");
        assert!(!l.is_empty(), "QMP closed");
        l
    }

    /// [`cmd`](Self::cmd) for a QEMU that may have exited meanwhile (its
    /// guest powered off): `None` then.
    pub fn try_cmd(&mut self, json: &str) -> Option<String> {
        self.w.write_all(json.as_bytes()).ok()?;
        self.w.write_all(b"\n").ok()?;
        loop {
            let mut l = String::new();
            if self.r.read_line(&mut l).ok()? == 0 {
                return None;
            }
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return Some(l);
            }
        }
    }

    /// Sends `json`; returns its answer (`return` or `error`).
    pub fn cmd(&mut self, json: &str) -> String {
        self.w.write_all(json.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        loop {
            let l = self.line();
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return l;
            }
        }
    }
}

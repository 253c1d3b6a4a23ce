//! Shared by the socket-level tests: our daemon started on a socket in a
//! temporary directory, and a raw front-end's message helpers.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod front;
pub mod guest;
pub mod netns;

use std::io::Read;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost_user_core::feature::VirtioFeatures as V;
use vhost_user_core::message::{
    FrontendReq, Header, ParseOptions, Reply, Request, HEADER_SIZE, MAX_MESSAGE,
};
use vhost_user_linux::sys::socket::Stream;

/// A fresh, empty directory under the temporary directory.
pub fn temp_path(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "vhu-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// A temporary directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        TempDir(temp_path(tag))
    }

    /// A zeroed image file of `len` bytes in this directory, open for
    /// reading and writing, and its path.
    pub fn image(&self, len: u64) -> (PathBuf, std::fs::File) {
        let path = self.0.join("disk.img");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        (path, file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `vhu bench` on `sock` with `args`, its results as JSON.
pub fn bench(sock: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vhu"))
        .args(["bench", "--socket-path"])
        .arg(sock)
        .args(args)
        .arg("--json")
        .output()
        .unwrap()
}

/// The JSON of a bench that succeeded with `requests` requests.
pub fn bench_ok(out: std::process::Output, requests: u64) -> String {
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.contains(&format!("\"requests\": {requests},")), "{s}");
    s
}

/// The requests a blk daemon's counter lines in `log` count after the
/// first `skip` (the start-up probe's), each of which must count no error.
pub fn served(log: &str, skip: usize) -> u64 {
    log.lines()
        // Whole counter lines (one being written may be read in part).
        .filter(|l| l.contains("bytes written") && l.ends_with(" errors"))
        .skip(skip)
        .filter_map(|l| {
            assert!(l.ends_with(" 0 errors"), "{l}");
            let (head, _) = l.split_once(" requests,")?;
            head.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}

pub struct Daemon {
    pub child: Child,
    pub sock: PathBuf,
    pub dir: PathBuf,
    args: Vec<String>,
}

impl Daemon {
    /// The daemon as most socket tests want it: a 16 MiB temporary image,
    /// two queues of up to 256 (dirty logging and device state offered,
    /// the default).
    pub fn start() -> Daemon {
        Daemon::start_with(&["--size", "16M", "--num-queues", "2", "--queue-size", "256"])
    }

    /// The daemon with `args` after `--socket-path`.
    pub fn start_with(args: &[&str]) -> Daemon {
        Daemon::start_prepared(args, |_| {})
    }

    /// [`start_with`](Self::start_with), its command first handed to
    /// `prepare` (a restart does not prepare it again).
    pub fn start_prepared(args: &[&str], prepare: impl FnOnce(&mut Command)) -> Daemon {
        let dir = temp_path("daemon");
        let sock = dir.join("blk.sock");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut child = Self::spawn(&dir, &sock, &args, prepare);
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(child.try_wait().unwrap().is_none(), "daemon exited");
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            child,
            sock,
            dir,
            args,
        }
    }

    fn spawn(
        dir: &std::path::Path,
        sock: &std::path::Path,
        args: &[String],
        prepare: impl FnOnce(&mut Command),
    ) -> Child {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
        c.arg("--socket-path")
            .arg(sock)
            .args(args)
            .stderr(Stdio::from(log));
        prepare(&mut c);
        c.spawn().unwrap()
    }

    /// Kills the daemon with SIGKILL and starts a new one with the same
    /// arguments on the same socket (its stale file is still there).
    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.dir, &self.sock, &self.args, |_| {});
    }

    /// Connects, retrying while a restarted daemon is not listening yet.
    pub fn connect_retry(&mut self) -> Stream {
        let t0 = Instant::now();
        loop {
            match Stream::connect(&self.sock) {
                Ok(s) => return s,
                Err(e) => {
                    assert!(self.child.try_wait().unwrap().is_none(), "daemon exited");
                    assert!(
                        t0.elapsed() < Duration::from_secs(10),
                        "cannot connect: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Connects; the socket file appears at bind, a moment before the
    /// daemon listens, so a refused connection is retried briefly.
    pub fn connect(&self) -> Stream {
        let t0 = Instant::now();
        loop {
            match Stream::connect(&self.sock) {
                Ok(s) => return s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && t0.elapsed() < Duration::from_secs(5) =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("cannot connect to the daemon: {e}"),
            }
        }
    }

    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Mappings of the test's guest memfds in the daemon.
    pub fn guest_mappings(&self) -> usize {
        let s = std::fs::read_to_string(format!("/proc/{}/maps", self.child.id())).unwrap();
        s.lines().filter(|l| l.contains("memfd:guest")).count()
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        std::fs::File::open(self.dir.join("daemon.log"))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    /// The log once it has `n` blk counter lines (one per queue, logged
    /// when a connection ends; the start-up probe's come first).
    pub fn log_with_counters(&self, n: usize) -> String {
        let t0 = Instant::now();
        loop {
            let log = self.log();
            // Whole counter lines only (each ends with its errors).
            let lines = log
                .lines()
                .filter(|l| l.contains("bytes written") && l.ends_with(" errors"));
            if lines.count() >= n {
                return log;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the daemon's fd count is back to `n` (it closes a
    /// connection's fds right after the connection ends).
    /// The fd count once it has not changed for 300 ms (at most 5 s).
    pub fn stable_fds(&self) -> usize {
        let t0 = Instant::now();
        let (mut last, mut since) = (self.fds(), Instant::now());
        while t0.elapsed() < Duration::from_secs(5) && since.elapsed() < Duration::from_millis(300)
        {
            std::thread::sleep(Duration::from_millis(10));
            let now = self.fds();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        last
    }

    pub fn settle_fds(&self, n: usize) -> usize {
        let t0 = Instant::now();
        loop {
            let now = self.fds();
            if now == n || t0.elapsed() > Duration::from_secs(5) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn send(s: &Stream, req: &Request<'_>, need_reply: bool, fds: &[BorrowedFd<'_>]) {
    let mut buf = [0u8; MAX_MESSAGE];
    let n = req.encode(need_reply, &mut buf).unwrap();
    s.send_message(&buf[..n], fds).unwrap();
}

pub fn send_raw(s: &Stream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    // The daemon may already have closed the connection.
    let _ = s.send_message(bytes, fds);
}

pub fn recv_reply(s: &Stream, code: FrontendReq) -> Option<Vec<u8>> {
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let rx = s.recv_message(&mut buf).ok()??;
    let n = rx.header.size as usize;
    assert_eq!(rx.header.request, code.id());
    Some(buf[..HEADER_SIZE + n].to_vec())
}

pub fn u64_of(code: FrontendReq, msg: &[u8]) -> u64 {
    let h = Header::parse(msg).unwrap();
    match Reply::parse(code, &h, &msg[HEADER_SIZE..], 0, &ParseOptions::default()).unwrap() {
        Reply::U64(v) => v,
        r => panic!("{r:?}"),
    }
}

/// A well-behaved handshake; returns the negotiated protocol features.
pub fn handshake(s: &Stream) -> u64 {
    send(s, &Request::GetFeatures, false, &[]);
    let f = u64_of(
        FrontendReq::GetFeatures,
        &recv_reply(s, FrontendReq::GetFeatures).unwrap(),
    );
    assert!(f & V::PROTOCOL_FEATURES.bits() != 0);
    send(s, &Request::GetProtocolFeatures, false, &[]);
    let p = u64_of(
        FrontendReq::GetProtocolFeatures,
        &recv_reply(s, FrontendReq::GetProtocolFeatures).unwrap(),
    );
    send(s, &Request::SetProtocolFeatures(p), false, &[]);
    send(s, &Request::SetOwner, false, &[]);
    send(
        s,
        &Request::SetFeatures((V::VERSION_1 | V::PROTOCOL_FEATURES).bits()),
        false,
        &[],
    );
    p
}

/// The C back-end `examples/c/blk.c` ([`build_c_blk`]) serving a 32 MiB
/// image in its own temporary directory; killed on drop (a failed
/// assertion must not leak it).
pub struct CBlk {
    pub child: Child,
    pub dir: PathBuf,
    pub sock: PathBuf,
}

impl Drop for CBlk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl CBlk {
    /// The back-end with `queues` queues, its socket up.
    pub fn start(queues: u16) -> CBlk {
        let dir = temp_path("c-blk");
        let bin = build_c_blk(&dir);
        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let sock = dir.join("blk.sock");
        let log = std::fs::File::create(dir.join("backend.log")).unwrap();
        let mut child = Command::new(&bin)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&img)
            .args(["--num-queues", &queues.to_string()])
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "vhu-c-blk exited");
            assert!(t0.elapsed() < Duration::from_secs(10), "no socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        CBlk { child, dir, sock }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("backend.log")).unwrap_or_default()
    }
}

/// The C back-end `examples/c/blk.c`, built by gcc against the header
/// and the staticlib of the C ABI (built first with `cargo build -p
/// vhost-user-c`, so the library is the current one), into `dir`.
pub fn build_c_blk(dir: &std::path::Path) -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    // This test binary is target/<profile>/deps/<name>-<hash>: the
    // library is built for the same profile (else a `cargo test
    // --release` links a stale release build, or none).
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(|d| d.parent()).unwrap();
    let mut args = vec!["build", "--quiet", "-p", "vhost-user-c"];
    if profile.ends_with("release") {
        args.push("--release");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(&args)
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build -p vhost-user-c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = profile.join("libvhost_user_c.a");
    assert!(lib.exists(), "{} missing", lib.display());
    let bin = dir.join("vhu-c-blk");
    let out = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-I"])
        .arg(root.join("adapter-c/include"))
        .arg(root.join("examples/c/blk.c"))
        .arg(&lib)
        // What the hosted staticlib needs from the C library (vhu.pc's
        // Libs.private).
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

/// A front-end that sends GET_FEATURES' header a byte every 100 ms (each
/// within any per-read timeout) to the back-end listening at `sock`:
/// whether the back-end ended the connection within `within`.
pub fn trickled_out(sock: &std::path::Path, within: Duration) -> bool {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let header = [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let t0 = Instant::now();
    for b in header.iter().cycle() {
        if t0.elapsed() > within {
            return false;
        }
        // Written, then an end of file or a reset from the back-end.
        if s.write_all(&[*b]).is_err() {
            return true;
        }
        let mut one = [0u8; 1];
        match std::io::Read::read(&mut s, &mut one) {
            Ok(0) => return true,
            Ok(_) => {} // A reply (the header came whole, then more).
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    unreachable!()
}

//! A network namespace for tests that need a tap: the host's own
//! networking stays untouched, and deleting the namespace removes what
//! was made in it.

use std::process::{Command, Stdio};

/// A network namespace, deleted on drop (with the tap in it, once the
/// daemon holding it is gone).
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("vhu-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]));
        Netns(name)
    }

    /// `ip -n NS args...`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        run(Command::new("ip").args(["-n", &self.0]).args(args));
    }

    /// A command run inside the namespace.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }

    /// A counter of interface `dev`, as the namespace's sysfs shows it.
    pub fn stat(&self, dev: &str, name: &str) -> u64 {
        let out = self
            .exec("cat")
            .arg(format!("/sys/class/net/{dev}/statistics/{name}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("tap statistic {name}: {out:?}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn run(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! Signals handled synchronously: block a set of signals, then wait for
//! one of them with `sigwait` in a dedicated thread instead of running an
//! asynchronous handler.
//!
//! ```no_run
//! use vhost_user_linux::sys::signal::{self, SignalSet};
//!
//! # fn main() -> std::io::Result<()> {
//! // First thing in `main`: threads spawned later inherit the mask.
//! let set = SignalSet::new(&[libc::SIGTERM, libc::SIGINT])?;
//! signal::block(&set)?;
//! std::thread::spawn(move || {
//!     if let Ok(sig) = signal::wait(&set) {
//!         eprintln!("signal {sig}");
//!     }
//!     std::process::exit(0);
//! });
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io;
use std::ptr;

use super::cvt;

/// Signal numbers on Linux are `1..NSIG`.
const NSIG: libc::c_int = 65;

/// A set of signals (`sigset_t`), always initialised.
#[derive(Clone, Copy)]
pub struct SignalSet {
    set: libc::sigset_t,
}

impl SignalSet {
    /// The set of `signals`; an invalid signal number is an
    /// [`io::ErrorKind::InvalidInput`] error (`EINVAL`).
    pub fn new(signals: &[libc::c_int]) -> io::Result<SignalSet> {
        // SAFETY: sigset_t is plain data (an array of integers), for which
        // all zeroes is a valid value; sigemptyset then initialises it as
        // POSIX requires before any other use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a live, writable sigset_t for the whole call.
        cvt(unsafe { libc::sigemptyset(&mut set) })?;
        for &sig in signals {
            // SAFETY: `set` is a live, initialised sigset_t; an invalid
            // `sig` is reported as EINVAL, not undefined behaviour.
            cvt(unsafe { libc::sigaddset(&mut set, sig) })?;
        }
        Ok(SignalSet { set })
    }

    /// Whether `sig` is in the set (false for an invalid signal number).
    pub fn contains(&self, sig: libc::c_int) -> bool {
        // SAFETY: `self.set` is an initialised sigset_t, only read during
        // the call; an invalid `sig` returns -1 (EINVAL).
        unsafe { libc::sigismember(&self.set, sig) == 1 }
    }
}

impl fmt::Debug for SignalSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries((1..NSIG).filter(|&s| self.contains(s)))
            .finish()
    }
}

/// Blocks the signals of `set` in the calling thread (`pthread_sigmask`
/// with `SIG_BLOCK`), adding them to its mask. Threads inherit the mask of
/// the thread that spawns them, so calling this first in `main`, before
/// any thread exists, blocks them for the whole process; then only
/// [`wait`] receives them.
pub fn block(set: &SignalSet) -> io::Result<()> {
    // SAFETY: `set.set` is an initialised sigset_t that outlives the call;
    // a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set.set, ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits until one of the signals of `set` is pending and takes it
/// (`sigwait`), returning its number. The signals must be blocked (see
/// [`block`]) in every thread, or the default action may run instead.
/// Retries on `EINTR`.
pub fn wait(set: &SignalSet) -> io::Result<libc::c_int> {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set.set` is an initialised sigset_t and `sig` a writable
        // c_int, both live for the whole call.
        let rc = unsafe { libc::sigwait(&set.set, &mut sig) };
        match rc {
            0 => return Ok(sig),
            libc::EINTR => continue,
            rc => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_membership_and_invalid_numbers() {
        let set = SignalSet::new(&[libc::SIGTERM, libc::SIGINT]).unwrap();
        assert!(set.contains(libc::SIGTERM));
        assert!(set.contains(libc::SIGINT));
        assert!(!set.contains(libc::SIGHUP));
        assert!(!set.contains(0));
        assert_eq!(
            format!("{set:?}"),
            format!("{{{}, {}}}", libc::SIGINT, libc::SIGTERM)
        );
        let e = SignalSet::new(&[1000]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn blocked_signal_is_taken_by_wait() {
        // A real-time signal nothing else in the test process uses, blocked
        // in this thread only, and sent to this thread only.
        let sig = libc::SIGRTMIN() + 3;
        let set = SignalSet::new(&[sig]).unwrap();
        block(&set).unwrap();
        // SAFETY: test only; pthread_kill on the calling thread, with a
        // signal it blocks, so it stays pending until `wait` takes it.
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), sig) };
        assert_eq!(rc, 0);
        assert_eq!(wait(&set).unwrap(), sig);
    }
}

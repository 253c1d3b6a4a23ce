//! Clean exit on SIGTERM and SIGINT: the signals are blocked in every
//! thread and a dedicated thread waits for them with `sigwait`, runs the
//! cleanup (remove the socket file, the temporary image) and exits 0.

use std::io;

/// Blocks SIGTERM and SIGINT in the calling thread (call it first in
/// `main`, so every thread spawned later inherits the mask) and starts the
/// waiting thread, which runs `cleanup` and exits the process.
pub fn exit_cleanly_on_term<F: FnOnce() + Send + 'static>(cleanup: F) -> io::Result<()> {
    let set = term_set();
    // SAFETY: `set` is a valid, initialised signal set; a null old-set
    // pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("vhu-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is valid and `sig` is a valid out pointer.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc == 0 {
                log::info!("signal {sig} received, exiting");
            }
            cleanup();
            std::process::exit(0);
        })?;
    Ok(())
}

fn term_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any
    // other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` points to a live sigset_t; SIGTERM and SIGINT are valid
    // signal numbers.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    set
}

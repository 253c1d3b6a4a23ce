//! Clean exit on SIGTERM and SIGINT: the signals are blocked in every
//! thread and a dedicated thread waits for them with `sigwait`, runs the
//! cleanup (remove the socket file, the temporary image) and exits 0.
//! SIGHUP is waited for the same way and runs a handler each time.

use std::io;

use vhost_user_linux::sys::signal::{self, SignalSet};

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (call it first
/// in `main`, so every thread spawned later inherits the mask) and starts
/// the thread waiting for the first two, which runs `cleanup` and exits the
/// process.
pub fn exit_cleanly_on_term<F: FnOnce() + Send + 'static>(cleanup: F) -> io::Result<()> {
    let set = SignalSet::new(&[libc::SIGTERM, libc::SIGINT])?;
    // SIGHUP too, before this first thread exists: it is waited for by
    // [`on_hangup`]'s thread, and must never reach one that does not block
    // it (its default action ends the process).
    signal::block(&SignalSet::new(&[
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
    ])?)?;
    std::thread::Builder::new()
        .name("vhu-signals".into())
        .spawn(move || {
            if let Ok(sig) = signal::wait(&set) {
                log::info!("signal {sig} received, exiting");
            }
            cleanup();
            std::process::exit(0);
        })?;
    Ok(())
}

/// Blocks SIGHUP in the calling thread (call it before spawning threads)
/// and starts a thread that runs `handler` at each SIGHUP.
pub fn on_hangup<F: FnMut() + Send + 'static>(mut handler: F) -> io::Result<()> {
    let set = SignalSet::new(&[libc::SIGHUP])?;
    signal::block(&set)?;
    std::thread::Builder::new()
        .name("vhu-sighup".into())
        .spawn(move || {
            while signal::wait(&set).is_ok() {
                log::info!("SIGHUP received");
                handler();
            }
        })?;
    Ok(())
}

//! Clean exit on SIGTERM and SIGINT: the signals are blocked in every
//! thread and a dedicated thread waits for them with `sigwait`, runs the
//! cleanup (remove the socket file, the temporary image) and exits 0.

use std::io;

use vhost_user_linux::sys::signal::{self, SignalSet};

/// Blocks SIGTERM and SIGINT in the calling thread (call it first in
/// `main`, so every thread spawned later inherits the mask) and starts the
/// waiting thread, which runs `cleanup` and exits the process.
pub fn exit_cleanly_on_term<F: FnOnce() + Send + 'static>(cleanup: F) -> io::Result<()> {
    let set = SignalSet::new(&[libc::SIGTERM, libc::SIGINT])?;
    signal::block(&set)?;
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

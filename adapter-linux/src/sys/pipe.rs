//! pipe: the channel of a device state transfer (SET_DEVICE_STATE_FD).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use super::cvt;

/// A new pipe, close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` is writable for the two ints pipe2 stores.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just returned by the kernel; nothing else owns
    // them.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((r, w))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    #[test]
    fn bytes_written_are_read_to_the_end() {
        let (r, w) = super::pipe().unwrap();
        let mut w = std::fs::File::from(w);
        w.write_all(b"state").unwrap();
        drop(w);
        let mut s = Vec::new();
        std::fs::File::from(r).read_to_end(&mut s).unwrap();
        assert_eq!(s, b"state");
    }
}

//! The core's framer over a real socketpair: messages with fds, clean
//! closes against truncated messages, and the fd rules (too many, late,
//! truncated control data), each checked to leave no fd open.

#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::time::Duration;

use vhost_user_core::message::{WireError, HEADER_SIZE};

use super::*;

/// A message: header (request 1, version 1) and `payload`.
fn message(payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; HEADER_SIZE];
    Header::request(1, payload.len() as u32, false)
        .encode(&mut m)
        .unwrap();
    m.extend_from_slice(payload);
    m
}

fn buf() -> Box<[u8; MAX_MESSAGE]> {
    Box::new([0u8; MAX_MESSAGE])
}

/// An fd to send whose closing can be watched: one end of a socketpair.
/// [`Watched::all_closed`] tells whether every copy of it (ours, the ones
/// in flight and the ones the receiver got) is closed, as the other end
/// then reads end of file. Unlike counting `/proc/self/fd`, this is not
/// disturbed by tests running in parallel.
struct Watched {
    sent: UnixStream,
    watch: UnixStream,
}

impl Watched {
    fn new() -> Watched {
        let (sent, watch) = UnixStream::pair().unwrap();
        Watched { sent, watch }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.sent.as_fd()
    }

    /// Closes our copy and waits (up to 2 s) for the other end to read end
    /// of file.
    fn all_closed(self) -> bool {
        self.closed_within(Duration::from_secs(2))
    }

    fn closed_within(self, timeout: Duration) -> bool {
        drop(self.sent);
        let mut w = self.watch;
        w.set_read_timeout(Some(timeout)).unwrap();
        matches!(w.read(&mut [0u8; 1]), Ok(0))
    }
}

#[test]
fn a_watched_fd_with_a_copy_left_open_is_not_closed() {
    let w = Watched::new();
    let copy = w.sent.try_clone().unwrap();
    assert!(!w.closed_within(Duration::from_millis(50)));
    drop(copy);
}

/// The framer's error inside an [`io::Error`].
fn transport_error(e: &io::Error) -> TransportError<io::Error> {
    match e
        .get_ref()
        .and_then(|i| i.downcast_ref::<TransportError<io::Error>>())
    {
        Some(TransportError::Truncated { got, needed }) => TransportError::Truncated {
            got: *got,
            needed: *needed,
        },
        Some(TransportError::TooManyFds(n)) => TransportError::TooManyFds(*n),
        Some(TransportError::LateFds) => TransportError::LateFds,
        other => panic!("not a framing error: {e} ({other:?})"),
    }
}

#[test]
fn a_message_and_its_fds_arrive_together() {
    let (a, b) = Stream::pair().unwrap();
    let w1 = Watched::new();
    let w2 = Watched::new();
    a.send_message(&message(b"payload"), &[w1.fd(), w2.fd()])
        .unwrap();
    let mut buf = buf();
    let rx = b.recv_message(&mut buf).unwrap().unwrap();
    assert_eq!(rx.header, Header::request(1, 7, false));
    assert_eq!(rx.payload(&buf), b"payload");
    assert_eq!(rx.fds.len(), 2);
    // The fds are the ones sent: writing to a received copy reaches the
    // watching end.
    let mut copy = UnixStream::from(rx.fds.into_iter().next().unwrap());
    std::io::Write::write_all(&mut copy, b"x").unwrap();
    let mut got = [0u8; 1];
    let mut watch = &w1.watch;
    watch.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"x");
    drop(copy);
    // The other received fd was closed with `rx`.
    assert!(w1.all_closed());
    assert!(w2.all_closed());
}

#[test]
fn back_to_back_messages_keep_their_own_fds_then_close_cleanly() {
    let (a, b) = Stream::pair().unwrap();
    let w = Watched::new();
    a.send_message(&message(b"first"), &[w.fd()]).unwrap();
    a.send_message(&message(b"second"), &[]).unwrap();
    a.send_message(&message(b""), &[]).unwrap();
    a.shutdown_write().unwrap();
    let mut buf = buf();
    let rx = b.recv_message(&mut buf).unwrap().unwrap();
    assert_eq!(rx.payload(&buf), b"first");
    assert_eq!(rx.fds.len(), 1);
    drop(rx);
    let rx = b.recv_message(&mut buf).unwrap().unwrap();
    assert_eq!(rx.payload(&buf), b"second");
    assert!(rx.fds.is_empty());
    let rx = b.recv_message(&mut buf).unwrap().unwrap();
    assert_eq!(rx.payload_len, 0);
    assert!(b.recv_message(&mut buf).unwrap().is_none());
    assert!(w.all_closed());
}

#[test]
fn a_close_between_messages_is_none() {
    let (a, b) = Stream::pair().unwrap();
    drop(a);
    assert!(b.recv_message(&mut buf()).unwrap().is_none());
}

#[test]
fn a_close_inside_a_header_is_unexpected_eof() {
    let (a, b) = Stream::pair().unwrap();
    a.send_message(&message(b"payload")[..5], &[]).unwrap();
    drop(a);
    let e = b.recv_message(&mut buf()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("header"), "{e}");
    assert!(matches!(
        transport_error(&e),
        TransportError::Truncated {
            got: 5,
            needed: HEADER_SIZE
        }
    ));
}

#[test]
fn a_close_inside_a_payload_is_unexpected_eof_and_closes_the_fds() {
    let (a, b) = Stream::pair().unwrap();
    let w = Watched::new();
    a.send_message(&message(b"payload")[..HEADER_SIZE + 2], &[w.fd()])
        .unwrap();
    a.shutdown_write().unwrap();
    let e = b.recv_message(&mut buf()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("payload"), "{e}");
    assert!(matches!(
        transport_error(&e),
        TransportError::Truncated {
            got,
            needed
        } if got == HEADER_SIZE + 2 && needed == HEADER_SIZE + 7
    ));
    assert!(w.all_closed());
}

#[test]
fn fds_with_a_later_part_of_the_header_count() {
    let (a, b) = Stream::pair().unwrap();
    let w = Watched::new();
    let m = message(b"payload");
    a.send_message(&m[..4], &[]).unwrap();
    a.send_message(&m[4..], &[w.fd()]).unwrap();
    let mut buf = buf();
    let rx = b.recv_message(&mut buf).unwrap().unwrap();
    assert_eq!(rx.payload(&buf), b"payload");
    assert_eq!(rx.fds.len(), 1);
    drop(rx);
    assert!(w.all_closed());
}

#[test]
fn fds_with_payload_bytes_are_refused_and_closed() {
    let (a, b) = Stream::pair().unwrap();
    let w = Watched::new();
    let m = message(b"payload");
    a.send_message(&m[..HEADER_SIZE], &[]).unwrap();
    a.send_message(&m[HEADER_SIZE..], &[w.fd()]).unwrap();
    let e = b.recv_message(&mut buf()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(matches!(transport_error(&e), TransportError::LateFds));
    assert!(w.all_closed());
}

#[test]
fn one_fd_too_many_is_refused_and_all_are_closed() {
    let (a, b) = Stream::pair().unwrap();
    let ws: Vec<Watched> = (0..=MAX_FDS).map(|_| Watched::new()).collect();
    let fds: Vec<BorrowedFd<'_>> = ws.iter().map(Watched::fd).collect();
    a.send_message_with_excess_fd(&message(b""), &fds).unwrap();
    drop(fds);
    let e = b.recv_message(&mut buf()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(matches!(
        transport_error(&e),
        TransportError::TooManyFds(n) if n == MAX_FDS + 1
    ));
    for w in ws {
        assert!(w.all_closed());
    }
}

/// Sends `bytes` with `fds` attached, however many (for a control-data
/// overflow the API refuses to produce).
fn send_raw_fds(s: &Stream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let data_len = (fds.len() * size_of::<RawFd>()) as u32;
    // SAFETY: pure arithmetic.
    let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
    // SAFETY: pure arithmetic.
    let cmsg_len = unsafe { libc::CMSG_LEN(data_len) } as usize;
    // u64 elements: aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let base = control.as_mut_ptr().cast::<u8>();
    // SAFETY: `control` is 8-aligned and `space` bytes long, room for the
    // header and `fds.len()` ints at CMSG_DATA.
    unsafe {
        ptr::write(
            base.cast::<libc::cmsghdr>(),
            libc::cmsghdr {
                cmsg_len: cmsg_len as _,
                cmsg_level: libc::SOL_SOCKET,
                cmsg_type: libc::SCM_RIGHTS,
            },
        );
        let data = libc::CMSG_DATA(base.cast::<libc::cmsghdr>());
        for (i, fd) in fds.iter().enumerate() {
            ptr::write_unaligned(data.cast::<RawFd>().add(i), fd.as_raw_fd());
        }
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = base.cast::<c_void>();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points to one iovec over `bytes` and to the control
    // buffer of `space` initialised bytes; both outlive the call, and the
    // fds are borrowed and open.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    assert_eq!(n, bytes.len() as isize);
}

#[test]
fn truncated_control_data_is_refused_and_all_fds_are_closed() {
    let (a, b) = Stream::pair().unwrap();
    // More than the receiver's control buffer holds, even with its
    // alignment padding.
    let ws: Vec<Watched> = (0..MAX_FDS + 8).map(|_| Watched::new()).collect();
    let fds: Vec<BorrowedFd<'_>> = ws.iter().map(Watched::fd).collect();
    send_raw_fds(&a, &message(b""), &fds);
    drop(fds);
    let e = b.recv_message(&mut buf()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("truncated"), "{e}");
    for w in ws {
        assert!(w.all_closed());
    }
}

#[test]
fn a_malformed_header_is_invalid_data_with_the_wire_error() {
    let (a, b) = Stream::pair().unwrap();
    let mut m = message(b"");
    m[4] = 0x2; // version 2
    a.send_message(&m, &[]).unwrap();
    let e = b.recv_message(&mut buf()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    let w = e.get_ref().and_then(|i| i.downcast_ref::<WireError>());
    assert_eq!(w, Some(&WireError::BadVersion(2)));
}

#[test]
fn a_read_timeout_stays_would_block() {
    let (a, b) = Stream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let e = b.recv_message(&mut buf()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    drop(a);
}

#[test]
fn a_message_that_trickles_in_misses_its_deadline() {
    let (a, b) = Stream::pair().unwrap();
    let m = message(b"payload");
    let t = std::thread::spawn(move || {
        for byte in m {
            if a.send_message(&[byte], &[]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    // Whole-message deadline, from the call: 19 bytes 50 ms apart do not
    // make it in 200 ms.
    let t0 = std::time::Instant::now();
    let e = b
        .recv_message_by(&mut buf(), t0 + Duration::from_millis(200))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "{:?}",
        t0.elapsed()
    );
    drop(b);
    t.join().unwrap();
}

#[test]
fn a_started_message_has_a_deadline_and_an_idle_peer_none() {
    let (a, b) = Stream::pair().unwrap();
    let m = message(b"payload");
    let whole = m.clone();
    let t = std::thread::spawn(move || {
        // Idle for longer than the limit, then a whole message, then one
        // that trickles.
        std::thread::sleep(Duration::from_millis(300));
        a.send_message(&whole, &[]).unwrap();
        for byte in m {
            if a.send_message(&[byte], &[]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let limit = Duration::from_millis(200);
    let rx = b.recv_message_started(&mut buf(), limit).unwrap().unwrap();
    assert_eq!(rx.payload_len, 7);
    let t0 = std::time::Instant::now();
    let e = b.recv_message_started(&mut buf(), limit).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "{:?}",
        t0.elapsed()
    );
    drop(b);
    t.join().unwrap();
}

#[test]
fn a_send_to_a_peer_that_does_not_read_misses_its_deadline() {
    let (a, b) = Stream::pair().unwrap();
    let m = message(&[0u8; MAX_PAYLOAD]);
    let t0 = std::time::Instant::now();
    let e = loop {
        if let Err(e) = a.send_message_by(
            &m,
            &[],
            std::time::Instant::now() + Duration::from_millis(100),
        ) {
            break e;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never filled");
    };
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    drop(b);
}

#[test]
fn send_message_limits() {
    let (a, _b) = Stream::pair().unwrap();
    let ws: Vec<Watched> = (0..=MAX_FDS).map(|_| Watched::new()).collect();
    let fds: Vec<BorrowedFd<'_>> = ws.iter().map(Watched::fd).collect();
    let e = a.send_message(&message(b""), &fds).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    let e = a.send_message(&[], &fds[..1]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    a.send_message(&[], &[]).unwrap();
}

#[test]
fn a_stream_io_drives_the_core_framer_directly() {
    let (a, b) = Stream::pair().unwrap();
    let w = Watched::new();
    let fds = [w.fd()];
    let mut tx = a.io();
    tx.attach(&fds).unwrap();
    transport::write_message(&mut tx, &message(b"direct")).unwrap();
    let mut rx = b.io();
    let mut buf = buf();
    let f = transport::read_message(&mut rx, &mut buf).unwrap().unwrap();
    assert_eq!(f.payload, b"direct");
    assert_eq!(f.fds, 1);
    assert_eq!(rx.take_fds().len(), 1);
    assert!(w.all_closed());
}

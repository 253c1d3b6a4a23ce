//! Framer tests on in-memory byte streams: a plain slice (no fds) and a
//! scripted stream that hands out bytes in chosen chunks with fds attached
//! to some of them, as a Unix socket does.

use std::collections::VecDeque;
use std::vec;
use std::vec::Vec;

use embedded_io::ErrorKind;
use proptest::prelude::*;

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

/// A header with raw fields (to make malformed ones).
fn raw_header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [request, flags, size] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// One step of a scripted stream.
enum Step {
    /// Bytes that arrive together, with `fds` fds attached to the first of
    /// them (an empty chunk with fds: fds that arrive with end of stream).
    Chunk(Vec<u8>, usize),
    /// The stream fails.
    Fail(ErrorKind),
}

/// A byte stream with fd slots, read chunk by chunk: a read returns bytes of
/// one chunk only (at most the buffer's length; the rest of the chunk stays,
/// without its fds, as a Unix socket does). After the script, end of stream.
#[derive(Default)]
struct Script {
    steps: VecDeque<Step>,
    /// Fds received since the last `start_message`.
    fds: usize,
    /// How many times the framer started a message.
    starts: usize,
}

impl Script {
    fn new(steps: impl IntoIterator<Item = Step>) -> Script {
        Script {
            steps: steps.into_iter().collect(),
            ..Script::default()
        }
    }

    /// Bytes not read yet.
    fn left(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Chunk(b, _) => b.len(),
                Step::Fail(_) => 0,
            })
            .sum()
    }
}

fn chunk(bytes: &[u8], fds: usize) -> Step {
    Step::Chunk(bytes.to_vec(), fds)
}

impl ErrorType for Script {
    type Error = ErrorKind;
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        match self.steps.pop_front() {
            None => Ok(0),
            Some(Step::Fail(e)) => Err(e),
            Some(Step::Chunk(mut bytes, fds)) => {
                self.fds += fds;
                let n = bytes.len().min(buf.len());
                buf[..n].copy_from_slice(&bytes[..n]);
                if n < bytes.len() {
                    self.steps.push_front(Step::Chunk(bytes.split_off(n), 0));
                }
                Ok(n)
            }
        }
    }
}

impl FdSlots for Script {
    fn start_message(&mut self) {
        self.fds = 0;
        self.starts += 1;
    }

    fn received(&self) -> usize {
        self.fds
    }
}

fn buf() -> std::boxed::Box<[u8; MAX_MESSAGE]> {
    std::boxed::Box::new([0u8; MAX_MESSAGE])
}

// ---------------------------------------------------------------------------
// Messages and clean ends.

#[test]
fn reads_a_header_and_its_payload() {
    let m = message(b"abcdefgh");
    let mut s = NoFds(&m[..]);
    let mut b = buf();
    let f = read_message(&mut s, &mut b).unwrap().unwrap();
    assert_eq!(f.header, Header::request(1, 8, false));
    assert_eq!(f.payload, b"abcdefgh");
    assert_eq!(f.fds, 0);
    // The header and payload sit in the buffer as documented.
    assert_eq!(&b[..HEADER_SIZE + 8], &m[..]);
}

#[test]
fn an_empty_payload_reads() {
    let m = message(b"");
    let mut b = buf();
    let f = read_message(&mut NoFds(&m[..]), &mut b).unwrap().unwrap();
    assert_eq!(f.header.size, 0);
    assert!(f.payload.is_empty());
}

#[test]
fn a_largest_payload_reads() {
    let p = vec![0xa5; MAX_PAYLOAD];
    let m = message(&p);
    let mut b = buf();
    let f = read_message(&mut NoFds(&m[..]), &mut b).unwrap().unwrap();
    assert_eq!(f.payload, &p[..]);
}

#[test]
fn back_to_back_messages_are_read_apart_then_a_clean_close() {
    let mut bytes = message(b"first");
    bytes.extend(message(b"second!"));
    let mut s = NoFds(&bytes[..]);
    let mut b = buf();
    let f = read_message(&mut s, &mut b).unwrap().unwrap();
    assert_eq!(f.payload, b"first");
    // Not a byte of the next message was read.
    assert_eq!(s.0.len(), HEADER_SIZE + 7);
    let f = read_message(&mut s, &mut b).unwrap().unwrap();
    assert_eq!(f.payload, b"second!");
    assert_eq!(read_message(&mut s, &mut b), Ok(None));
}

#[test]
fn end_of_stream_before_a_message_is_a_clean_close() {
    let mut b = buf();
    assert_eq!(read_message(&mut NoFds(&[][..]), &mut b), Ok(None));
    let mut s = Script::new([]);
    assert_eq!(read_message(&mut s, &mut b), Ok(None));
}

// ---------------------------------------------------------------------------
// Truncation: end of stream inside a message.

#[test]
fn end_of_stream_inside_a_header_is_truncated() {
    let m = message(b"payload");
    let mut b = buf();
    let e = read_message(&mut NoFds(&m[..5]), &mut b).unwrap_err();
    assert_eq!(
        e,
        TransportError::Truncated {
            got: 5,
            needed: HEADER_SIZE
        }
    );
    assert!(std::format!("{e}").contains("header"), "{e}");
}

#[test]
fn end_of_stream_right_after_a_header_is_truncated() {
    let m = message(b"payload");
    let mut b = buf();
    let e = read_message(&mut NoFds(&m[..HEADER_SIZE]), &mut b).unwrap_err();
    assert_eq!(
        e,
        TransportError::Truncated {
            got: HEADER_SIZE,
            needed: HEADER_SIZE + 7
        }
    );
    assert!(std::format!("{e}").contains("payload"), "{e}");
}

#[test]
fn end_of_stream_inside_a_payload_is_truncated() {
    let m = message(b"payload");
    let mut b = buf();
    let e = read_message(&mut NoFds(&m[..HEADER_SIZE + 3]), &mut b).unwrap_err();
    assert_eq!(
        e,
        TransportError::Truncated {
            got: HEADER_SIZE + 3,
            needed: HEADER_SIZE + 7
        }
    );
}

#[test]
fn end_of_stream_after_a_message_and_part_of_the_next_is_truncated() {
    let mut bytes = message(b"one");
    bytes.extend_from_slice(&message(b"two")[..1]);
    let mut s = NoFds(&bytes[..]);
    let mut b = buf();
    assert!(read_message(&mut s, &mut b).unwrap().is_some());
    assert_eq!(
        read_message(&mut s, &mut b),
        Err(TransportError::Truncated {
            got: 1,
            needed: HEADER_SIZE
        })
    );
}

#[test]
fn fds_with_end_of_stream_are_a_truncated_message_not_a_close() {
    let mut s = Script::new([chunk(b"", 2)]);
    let mut b = buf();
    assert_eq!(
        read_message(&mut s, &mut b),
        Err(TransportError::Truncated {
            got: 0,
            needed: HEADER_SIZE
        })
    );
}

// ---------------------------------------------------------------------------
// Short reads.

#[test]
fn one_byte_reads_make_the_same_message() {
    let m = message(b"one byte at a time");
    let mut s = Script::new(m.iter().map(|b| chunk(&[*b], 0)));
    let mut b = buf();
    let f = read_message(&mut s, &mut b).unwrap().unwrap();
    assert_eq!(f.payload, b"one byte at a time");
    assert_eq!(read_message(&mut s, &mut b), Ok(None));
}

// ---------------------------------------------------------------------------
// Fds.

#[test]
fn fds_with_the_first_header_bytes_count_for_the_message() {
    let m = message(b"payload");
    let mut s = Script::new([chunk(&m[..4], 3), chunk(&m[4..], 0)]);
    let mut b = buf();
    let f = read_message(&mut s, &mut b).unwrap().unwrap();
    assert_eq!(f.fds, 3);
    assert_eq!(f.payload, b"payload");
}

#[test]
fn fds_with_a_later_part_of_the_header_count_for_the_message() {
    let m = message(b"payload");
    let mut s = Script::new([chunk(&m[..4], 1), chunk(&m[4..9], 2), chunk(&m[9..], 0)]);
    let mut b = buf();
    let f = read_message(&mut s, &mut b).unwrap().unwrap();
    assert_eq!(f.fds, 3);
}

#[test]
fn fds_sent_with_the_whole_message_count_once() {
    let m = message(b"payload");
    // The socket hands the header out first; the fds come with it.
    let mut s = Script::new([chunk(&m, MAX_FDS)]);
    let mut b = buf();
    let f = read_message(&mut s, &mut b).unwrap().unwrap();
    assert_eq!(f.fds, MAX_FDS);
    assert_eq!(f.payload, b"payload");
}

#[test]
fn more_fds_than_a_message_may_carry_are_refused() {
    let m = message(b"");
    let mut s = Script::new([chunk(&m, MAX_FDS + 1)]);
    let mut b = buf();
    assert_eq!(
        read_message(&mut s, &mut b),
        Err(TransportError::TooManyFds(MAX_FDS + 1))
    );
    // Also when they add up over the header's parts.
    let mut s = Script::new([chunk(&m[..6], MAX_FDS), chunk(&m[6..], 1)]);
    assert_eq!(
        read_message(&mut s, &mut b),
        Err(TransportError::TooManyFds(MAX_FDS + 1))
    );
}

#[test]
fn too_many_fds_with_end_of_stream_are_too_many() {
    let mut s = Script::new([chunk(b"", MAX_FDS + 1)]);
    let mut b = buf();
    assert_eq!(
        read_message(&mut s, &mut b),
        Err(TransportError::TooManyFds(MAX_FDS + 1))
    );
}

#[test]
fn fds_with_payload_bytes_are_refused() {
    let m = message(b"payload");
    let mut s = Script::new([chunk(&m[..HEADER_SIZE], 1), chunk(&m[HEADER_SIZE..], 1)]);
    let mut b = buf();
    assert_eq!(read_message(&mut s, &mut b), Err(TransportError::LateFds));
    // Also when the header brought none.
    let mut s = Script::new([chunk(&m[..HEADER_SIZE], 0), chunk(&m[HEADER_SIZE..], 1)]);
    assert_eq!(read_message(&mut s, &mut b), Err(TransportError::LateFds));
}

#[test]
fn the_fd_count_starts_over_with_every_message() {
    let a = message(b"a");
    let c = message(b"c");
    let mut s = Script::new([chunk(&a, 2), chunk(&c, 0)]);
    let mut b = buf();
    assert_eq!(read_message(&mut s, &mut b).unwrap().unwrap().fds, 2);
    assert_eq!(read_message(&mut s, &mut b).unwrap().unwrap().fds, 0);
    assert_eq!(read_message(&mut s, &mut b), Ok(None));
    assert_eq!(s.starts, 3);
}

#[test]
fn fd_slots_through_a_mutable_reference() {
    let m = message(b"x");
    let mut s = Script::new([chunk(&m, 1)]);
    let mut b = buf();
    let mut r = &mut s;
    assert_eq!(read_message(&mut r, &mut b).unwrap().unwrap().fds, 1);
    assert_eq!(s.starts, 1);
}

// ---------------------------------------------------------------------------
// Malformed headers and stream errors.

#[test]
fn a_malformed_header_is_a_wire_error_and_no_payload_is_read() {
    let mut bytes = raw_header(1, 0x2, 4);
    bytes.extend_from_slice(b"body");
    let mut s = NoFds(&bytes[..]);
    let mut b = buf();
    assert_eq!(
        read_message(&mut s, &mut b),
        Err(TransportError::Wire(WireError::BadVersion(2)))
    );
    assert_eq!(s.0, b"body");
}

#[test]
fn a_payload_above_the_cap_is_refused_before_reading_it() {
    let mut bytes = raw_header(1, 0x1, MAX_PAYLOAD as u32 + 1);
    bytes.extend(vec![0; MAX_PAYLOAD + 1]);
    let mut s = NoFds(&bytes[..]);
    let mut b = buf();
    assert_eq!(
        read_message(&mut s, &mut b),
        Err(TransportError::Wire(WireError::PayloadTooLarge(
            MAX_PAYLOAD as u32 + 1
        )))
    );
    assert_eq!(s.0.len(), MAX_PAYLOAD + 1);
}

#[test]
fn reserved_flags_are_a_wire_error() {
    let bytes = raw_header(1, 0x1 | 0x100, 0);
    let mut b = buf();
    assert_eq!(
        read_message(&mut NoFds(&bytes[..]), &mut b),
        Err(TransportError::Wire(WireError::ReservedFlags(0x101)))
    );
}

#[test]
fn stream_errors_pass_through() {
    let m = message(b"payload");
    let mut b = buf();
    let mut s = Script::new([Step::Fail(ErrorKind::ConnectionReset)]);
    assert_eq!(
        read_message(&mut s, &mut b),
        Err(TransportError::Io(ErrorKind::ConnectionReset))
    );
    let mut s = Script::new([chunk(&m[..3], 0), Step::Fail(ErrorKind::TimedOut)]);
    assert_eq!(
        read_message(&mut s, &mut b),
        Err(TransportError::Io(ErrorKind::TimedOut))
    );
    let mut s = Script::new([
        chunk(&m[..HEADER_SIZE + 1], 0),
        Step::Fail(ErrorKind::Interrupted),
    ]);
    assert_eq!(
        read_message(&mut s, &mut b),
        Err(TransportError::Io(ErrorKind::Interrupted))
    );
}

// ---------------------------------------------------------------------------
// Writing.

#[test]
fn a_written_message_reads_back() {
    let m = message(b"round trip");
    let mut out = [0u8; 64];
    let mut w = &mut out[..];
    write_message(&mut w, &m).unwrap();
    let mut b = buf();
    let f = read_message(&mut NoFds(&out[..m.len()]), &mut b)
        .unwrap()
        .unwrap();
    assert_eq!(f.payload, b"round trip");
    // A sink too small is the sink's error.
    let mut small = [0u8; 4];
    assert!(matches!(
        write_message(&mut NoFds(&mut small[..]), &m),
        Err(TransportError::Io(_))
    ));
}

// ---------------------------------------------------------------------------
// Any chunking, any cut.

proptest! {
    /// However the bytes of two messages are split into reads, both read
    /// back whole, then the stream closes cleanly.
    #[test]
    fn any_chunking_reads_the_same_messages(
        p1 in proptest::collection::vec(any::<u8>(), 0..64),
        p2 in proptest::collection::vec(any::<u8>(), 0..64),
        cuts in proptest::collection::vec(1usize..16, 1..64),
        fds in 0..=MAX_FDS,
    ) {
        let mut bytes = message(&p1);
        let first = bytes.len();
        bytes.extend(message(&p2));
        let mut steps = Vec::new();
        let mut at = 0;
        let mut cut = cuts.iter().cycle();
        while at < bytes.len() {
            // Chunks never straddle the two messages: a socket does not
            // merge sends with fds into one read.
            let end = if at < first { first } else { bytes.len() };
            let n = (*cut.next().unwrap()).min(end - at);
            steps.push(chunk(&bytes[at..at + n], if at == 0 { fds } else { 0 }));
            at += n;
        }
        let mut s = Script::new(steps);
        let mut b = buf();
        let f = read_message(&mut s, &mut b).unwrap().unwrap();
        prop_assert_eq!(f.payload, &p1[..]);
        prop_assert_eq!(f.fds, fds);
        prop_assert_eq!(s.left(), bytes.len() - first);
        let f = read_message(&mut s, &mut b).unwrap().unwrap();
        prop_assert_eq!(f.payload, &p2[..]);
        prop_assert_eq!(f.fds, 0);
        prop_assert_eq!(read_message(&mut s, &mut b), Ok(None));
    }

    /// A stream cut anywhere inside a message is truncated at that point,
    /// never a clean close.
    #[test]
    fn any_cut_inside_a_message_is_truncated(
        p in proptest::collection::vec(any::<u8>(), 0..64),
        cut in 1usize..76,
    ) {
        let m = message(&p);
        let cut = cut.min(m.len() - 1);
        let mut b = buf();
        let needed = if cut < HEADER_SIZE { HEADER_SIZE } else { m.len() };
        prop_assert_eq!(
            read_message(&mut NoFds(&m[..cut]), &mut b),
            Err(TransportError::Truncated { got: cut, needed })
        );
    }
}

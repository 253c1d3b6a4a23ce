//! The virtio-blk device state a migration carries (DEVICE_STATE): what a
//! destination back-end needs to go on where the source stopped.
//!
//! * The config-space fields a driver may have changed or relies on:
//!   `capacity` (checked: the destination must serve a disk of the same
//!   size) and `writeback` (the cache mode the driver chose with
//!   CONFIG_WCE).
//! * The inflight area's bytes: the requests the source suspended with
//!   GET_VRING_BASE_INFLIGHT (or message 45) are recorded there. The
//!   destination writes them into its own area, of the same layout, and
//!   the next ring start resubmits them.
//!
//! The byte format (little endian), version 1:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `vhu-blk\0` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | flags: bit 0 `writeback`; other bits 0 |
//! | 16 | 8 | capacity, 512-byte sectors |
//! | 24 | 2 | inflight area: queue count (0: no area) |
//! | 26 | 2 | inflight area: queue size |
//! | 28 | 4 | reserved, 0 |
//! | 32 | 8 | inflight bytes that follow |
//! | 40 | n | the inflight area |
//! | 40 + n | 8 | FNV-1a 64 of every byte before it |
//!
//! [`save`] writes it through `embedded_io::Write`; [`load`] takes the
//! whole stream as a byte slice (a transfer is read to its end first) and
//! refuses, with a typed [`StateError`], anything that is not exactly one
//! well-formed state: a wrong magic or version, unknown flags, a length
//! that does not add up, an area layout the inflight format refuses, a
//! checksum mismatch. Nothing is written into the caller's area unless the
//! whole state is valid.

use core::fmt;

use crate::inflight;

/// The magic at the start of a state.
pub const MAGIC: [u8; 8] = *b"vhu-blk\0";
/// The version [`save`] writes and [`load`] reads.
pub const VERSION: u32 = 1;
/// Bytes before the inflight area.
pub const HEADER_LEN: usize = 40;
/// Bytes after it (the checksum).
pub const TRAILER_LEN: usize = 8;

const FLAG_WRITEBACK: u32 = 1;

/// The inflight area's layout: `num_queues` regions for rings of
/// `queue_size` entries ([`inflight::area_size`] bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AreaShape {
    /// Queues.
    pub num_queues: u16,
    /// Ring size.
    pub queue_size: u16,
}

/// The state of a virtio-blk device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlkState {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// The cache mode: writeback (else writethrough).
    pub writeback: bool,
    /// The inflight area's layout, if the source had one.
    pub area: Option<AreaShape>,
}

/// Why a state was not saved or loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StateError<E = core::convert::Infallible> {
    /// Writing failed.
    Io(E),
    /// Shorter than a header and a trailer.
    Truncated,
    /// Not a vhu blk state.
    BadMagic,
    /// A version this code does not read.
    BadVersion(u32),
    /// Unknown flag bits or a non-zero reserved field.
    BadFlags(u32),
    /// The inflight length does not match the bytes there are, or the
    /// area's layout.
    BadLength,
    /// An area layout the inflight format refuses.
    BadArea(inflight::InflightError),
    /// The inflight area given to [`save`] or [`load`] is not the size
    /// of the state's layout (the destination's area differs).
    AreaMismatch,
    /// The checksum does not match: the bytes changed on the way.
    BadChecksum,
    /// The destination's disk is not the size of the source's.
    CapacityMismatch {
        /// The state's capacity.
        state: u64,
        /// The device's.
        device: u64,
    },
    /// Writeback in a state for a device whose driver did not negotiate
    /// FLUSH (it would be writethrough).
    BadWriteback,
}

impl<E: fmt::Debug> fmt::Display for StateError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Io(e) => write!(f, "writing the state: {e:?}"),
            StateError::Truncated => f.write_str("state truncated"),
            StateError::BadMagic => f.write_str("not a vhu blk device state"),
            StateError::BadVersion(v) => write!(f, "state version {v} not supported"),
            StateError::BadFlags(v) => write!(f, "state flags {v:#x} not known"),
            StateError::BadLength => f.write_str("state length does not add up"),
            StateError::BadArea(e) => write!(f, "state's inflight area: {e}"),
            StateError::AreaMismatch => f.write_str("inflight area of another layout"),
            StateError::BadChecksum => f.write_str("state checksum mismatch"),
            StateError::CapacityMismatch { state, device } => write!(
                f,
                "state for a disk of {state} sectors, this one has {device}"
            ),
            StateError::BadWriteback => f.write_str("writeback without FLUSH negotiated"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for StateError<E> {}

/// FNV-1a, 64 bits.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The bytes of the area layout `shape` (0 without an area).
fn area_len(shape: Option<AreaShape>) -> Result<u64, inflight::InflightError> {
    match shape {
        None => Ok(0),
        Some(s) => inflight::area_size(s.num_queues, s.queue_size),
    }
}

/// Total length of a state carrying `inflight_len` area bytes.
pub fn state_len(inflight_len: usize) -> usize {
    HEADER_LEN + inflight_len + TRAILER_LEN
}

fn header(state: &BlkState, inflight_len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let flags = if state.writeback { FLAG_WRITEBACK } else { 0 };
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    h[16..24].copy_from_slice(&state.capacity.to_le_bytes());
    let (nq, qs) = state.area.map_or((0, 0), |a| (a.num_queues, a.queue_size));
    h[24..26].copy_from_slice(&nq.to_le_bytes());
    h[26..28].copy_from_slice(&qs.to_le_bytes());
    h[32..40].copy_from_slice(&inflight_len.to_le_bytes());
    h
}

/// Writes `state` with the inflight area's bytes `inflight` (empty
/// without an area) into `w`. Refused before anything is written if
/// `inflight` is not the size of `state.area`'s layout.
pub fn save<W: embedded_io::Write>(
    w: &mut W,
    state: &BlkState,
    inflight: &[u8],
) -> Result<(), StateError<W::Error>> {
    let len = area_len(state.area).map_err(StateError::BadArea)?;
    if len != inflight.len() as u64 {
        return Err(StateError::AreaMismatch);
    }
    let h = header(state, len);
    let mut sum = Fnv::new();
    sum.update(&h);
    sum.update(inflight);
    w.write_all(&h).map_err(StateError::Io)?;
    w.write_all(inflight).map_err(StateError::Io)?;
    w.write_all(&sum.0.to_le_bytes()).map_err(StateError::Io)?;
    w.flush().map_err(StateError::Io)
}

/// Completes a state in `buf` around the inflight area's bytes the
/// caller already put at `HEADER_LEN` (as many as `state.area`'s layout
/// holds; none without an area): writes the header before them and the
/// checksum after; returns the state's length. For a host that copies the
/// area out of shared memory itself, straight into its output, rather
/// than hand [`save`] a slice of it. Refused, writing nothing, if `buf` is
/// shorter than the state.
pub fn seal(buf: &mut [u8], state: &BlkState) -> Result<usize, StateError> {
    let len = area_len(state.area).map_err(StateError::BadArea)?;
    let n = usize::try_from(len).map_err(|_| StateError::AreaMismatch)?;
    let total = HEADER_LEN
        .checked_add(n)
        .and_then(|t| t.checked_add(TRAILER_LEN))
        .ok_or(StateError::AreaMismatch)?;
    if buf.len() < total {
        return Err(StateError::Truncated);
    }
    let h = header(state, len);
    buf[..HEADER_LEN].copy_from_slice(&h);
    let mut sum = Fnv::new();
    sum.update(&buf[..HEADER_LEN + n]);
    buf[HEADER_LEN + n..total].copy_from_slice(&sum.0.to_le_bytes());
    Ok(total)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    v.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(v)
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Reads a whole state from `bytes`. With an area in the state, its bytes
/// are copied into `inflight`, which must be exactly that long (the
/// destination's area, of the same layout); without one `inflight` is
/// left alone. Nothing is copied unless the whole state is valid.
pub fn load(bytes: &[u8], inflight: &mut [u8]) -> Result<BlkState, StateError> {
    let state = check(bytes)?;
    if state.area.is_some() {
        let area = area_bytes(bytes);
        if inflight.len() != area.len() {
            return Err(StateError::AreaMismatch);
        }
        inflight.copy_from_slice(area);
    }
    Ok(state)
}

/// The inflight area's bytes of a state [`check`] took (empty without an
/// area).
pub fn area_bytes(bytes: &[u8]) -> &[u8] {
    bytes
        .get(HEADER_LEN..bytes.len().saturating_sub(TRAILER_LEN))
        .unwrap_or(&[])
}

/// Checks that `bytes` is exactly one well-formed state, as [`load`]
/// does, without copying its area anywhere: a host that must check the
/// state against its device before its area changes reads it with this,
/// then copies [`area_bytes`].
pub fn check(bytes: &[u8]) -> Result<BlkState, StateError> {
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(StateError::Truncated);
    }
    let (h, rest) = bytes.split_at(HEADER_LEN);
    if h[0..8] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u32_at(h, 8);
    if version != VERSION {
        return Err(StateError::BadVersion(version));
    }
    let flags = u32_at(h, 12);
    if flags & !FLAG_WRITEBACK != 0 {
        return Err(StateError::BadFlags(flags));
    }
    let reserved = u32_at(h, 28);
    if reserved != 0 {
        return Err(StateError::BadFlags(reserved));
    }
    let n = u64_at(h, 32);
    let body = rest.len() - TRAILER_LEN;
    if n != body as u64 {
        return Err(StateError::BadLength);
    }
    let (area_bytes, trailer) = rest.split_at(body);
    let mut sum = Fnv::new();
    sum.update(h);
    sum.update(area_bytes);
    if sum.0 != u64_at(trailer, 0) {
        return Err(StateError::BadChecksum);
    }
    let (nq, qs) = (u16_at(h, 24), u16_at(h, 26));
    let area = match (nq, qs) {
        (0, 0) => None,
        (num_queues, queue_size) => Some(AreaShape {
            num_queues,
            queue_size,
        }),
    };
    if area_len(area).map_err(StateError::BadArea)? != n {
        return Err(StateError::BadLength);
    }
    Ok(BlkState {
        capacity: u64_at(h, 16),
        writeback: flags & FLAG_WRITEBACK != 0,
        area,
    })
}

impl super::BlkDevice {
    /// The device's state for [`save`], with the inflight area's layout
    /// `area` (the connection's, if one is mapped).
    pub fn state(&self, area: Option<AreaShape>) -> BlkState {
        BlkState {
            capacity: self.capacity(),
            writeback: self.config_space().writeback != 0,
            area,
        }
    }

    /// Takes a state [`load`] read: refused, changing nothing, if the disk
    /// is not the source's size, or if it says writeback while the driver
    /// negotiated CONFIG_WCE without FLUSH. With CONFIG_WCE negotiated the
    /// driver's cache mode is restored; without it the mode follows from
    /// FLUSH, as at the source.
    pub fn load_state(&mut self, state: &BlkState) -> Result<(), StateError> {
        if state.capacity != self.capacity() {
            return Err(StateError::CapacityMismatch {
                state: state.capacity,
                device: self.capacity(),
            });
        }
        let acked = self.acked_features();
        if acked.contains(super::BlkFeatures::CONFIG_WCE) {
            if state.writeback && !acked.contains(super::BlkFeatures::FLUSH) {
                return Err(StateError::BadWriteback);
            }
            self.space.writeback = u8::from(state.writeback);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    fn shape() -> AreaShape {
        AreaShape {
            num_queues: 2,
            queue_size: 16,
        }
    }

    fn saved(state: &BlkState, area: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; state_len(area.len())];
        let mut w = &mut buf[..];
        save(&mut w, state, area).unwrap();
        assert!(w.is_empty(), "exactly state_len bytes");
        buf
    }

    fn area_bytes() -> Vec<u8> {
        let n = inflight::area_size(2, 16).unwrap() as usize;
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    fn state() -> BlkState {
        BlkState {
            capacity: 2048,
            writeback: true,
            area: Some(shape()),
        }
    }

    #[test]
    fn a_saved_state_loads_back_with_its_area() {
        let area = area_bytes();
        let bytes = saved(&state(), &area);
        let mut dst = vec![0u8; area.len()];
        assert_eq!(load(&bytes, &mut dst), Ok(state()));
        assert_eq!(dst, area);
        // Without an area: nothing is copied.
        let s = BlkState {
            capacity: 8,
            writeback: false,
            area: None,
        };
        let bytes = saved(&s, &[]);
        let mut dst = vec![0x55u8; 16];
        assert_eq!(load(&bytes, &mut dst), Ok(s));
        assert_eq!(dst, [0x55; 16]);
    }

    #[test]
    fn a_state_sealed_around_its_area_is_the_state_saved() {
        let area = area_bytes();
        let want = saved(&state(), &area);
        let mut buf = vec![0xeeu8; want.len() + 5];
        buf[HEADER_LEN..HEADER_LEN + area.len()].copy_from_slice(&area);
        assert_eq!(seal(&mut buf, &state()), Ok(want.len()));
        assert_eq!(&buf[..want.len()], &want[..]);
        assert_eq!(&buf[want.len()..], [0xee; 5], "nothing past the state");
        // Checked, not copied: the same state, its area in place.
        assert_eq!(check(&want), Ok(state()));
        assert_eq!(super::area_bytes(&want), &area[..]);
        // Too short: refused, nothing written.
        let mut short = vec![0u8; want.len() - 1];
        assert_eq!(seal(&mut short, &state()), Err(StateError::Truncated));
        assert!(short.iter().all(|b| *b == 0));
        let s = BlkState {
            capacity: 8,
            writeback: false,
            area: None,
        };
        let mut buf = vec![0u8; state_len(0)];
        assert_eq!(seal(&mut buf, &s), Ok(state_len(0)));
        assert_eq!(buf, saved(&s, &[]));
        assert_eq!(super::area_bytes(&buf), &[] as &[u8]);
    }

    #[test]
    fn a_device_takes_the_cache_mode_and_refuses_another_disk_size() {
        use crate::device::blk::{BlkConfig, BlkDevice, BlkFeatures};
        let cfg = BlkConfig::new(2048);
        let mut src = BlkDevice::new(&cfg).unwrap();
        let wce = (BlkFeatures::CONFIG_WCE | BlkFeatures::FLUSH).to_virtio();
        src.set_features(wce);
        src.space.writeback = 0;
        let s = src.state(None);
        assert_eq!((s.capacity, s.writeback), (2048, false));
        let mut dst = BlkDevice::new(&cfg).unwrap();
        dst.set_features(wce);
        assert!(!dst.writethrough());
        dst.load_state(&s).unwrap();
        assert!(dst.writethrough(), "the driver's writethrough mode goes on");
        let big = BlkState {
            capacity: 4096,
            ..s
        };
        assert_eq!(
            dst.load_state(&big),
            Err(StateError::CapacityMismatch {
                state: 4096,
                device: 2048
            })
        );
        let mut no_flush = BlkDevice::new(&cfg).unwrap();
        no_flush.set_features(BlkFeatures::CONFIG_WCE.to_virtio());
        let wb = BlkState {
            writeback: true,
            ..s
        };
        assert_eq!(no_flush.load_state(&wb), Err(StateError::BadWriteback));
    }

    #[test]
    fn save_refuses_an_area_of_another_size() {
        let mut buf = vec![0u8; 4096];
        let mut w = &mut buf[..];
        assert_eq!(
            save(&mut w, &state(), &[0u8; 10]),
            Err(StateError::AreaMismatch)
        );
        let bad = BlkState {
            area: Some(AreaShape {
                num_queues: 1,
                queue_size: 0,
            }),
            ..state()
        };
        assert!(matches!(
            save(&mut w, &bad, &[]),
            Err(StateError::BadArea(_))
        ));
        // A writer that runs out of room is an I/O error.
        let mut small = [0u8; 20];
        let mut w = &mut small[..];
        assert!(matches!(
            save(&mut w, &state(), &area_bytes()),
            Err(StateError::Io(_))
        ));
    }

    /// Rewrites header field bytes and fixes the checksum, so that the
    /// check under test is the one that refuses.
    fn patched(bytes: &[u8], at: usize, new: &[u8]) -> Vec<u8> {
        let mut b = bytes.to_vec();
        b[at..at + new.len()].copy_from_slice(new);
        let end = b.len() - TRAILER_LEN;
        let mut sum = Fnv::new();
        sum.update(&b[..end]);
        b[end..].copy_from_slice(&sum.0.to_le_bytes());
        b
    }

    #[test]
    fn malformed_states_are_refused_and_the_area_left_alone() {
        let area = area_bytes();
        let good = saved(&state(), &area);
        let mut dst = vec![0xeeu8; area.len()];
        let cases: Vec<(Vec<u8>, StateError)> = vec![
            (Vec::new(), StateError::Truncated),
            (good[..HEADER_LEN].to_vec(), StateError::Truncated),
            (patched(&good, 0, b"vhu-net\0"), StateError::BadMagic),
            (
                patched(&good, 8, &2u32.to_le_bytes()),
                StateError::BadVersion(2),
            ),
            (
                patched(&good, 12, &3u32.to_le_bytes()),
                StateError::BadFlags(3),
            ),
            (
                patched(&good, 28, &1u32.to_le_bytes()),
                StateError::BadFlags(1),
            ),
            (
                patched(&good, 32, &1u64.to_le_bytes()),
                StateError::BadLength,
            ),
            (
                patched(&good, 32, &u64::MAX.to_le_bytes()),
                StateError::BadLength,
            ),
            // The layout says another size than the bytes there are.
            (
                patched(&good, 24, &1u16.to_le_bytes()),
                StateError::BadLength,
            ),
            (
                patched(&good, 26, &0u16.to_le_bytes()),
                StateError::BadArea(inflight::InflightError::QueueSize(0)),
            ),
            (good[..good.len() - 1].to_vec(), StateError::BadLength),
        ];
        for (bytes, want) in cases {
            assert_eq!(load(&bytes, &mut dst), Err(want));
        }
        // One flipped bit anywhere: the checksum (or an earlier check).
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            assert!(load(&b, &mut dst).is_err(), "byte {i} flipped");
        }
        // A trailing byte.
        let mut b = good.clone();
        b.push(0);
        assert!(load(&b, &mut dst).is_err());
        // An area of another layout at the destination.
        let mut small = vec![0u8; area.len() - 1];
        assert_eq!(load(&good, &mut small), Err(StateError::AreaMismatch));
        assert!(dst.iter().all(|b| *b == 0xee), "nothing copied");
    }

    proptest::proptest! {
        /// Any bytes (a header with a valid checksum and random fields
        /// included): a typed answer, never a panic.
        #[test]
        fn any_bytes_load_without_panic(
            fields in proptest::collection::vec(proptest::prelude::any::<u8>(), 40),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&fields[8..]);
            b.extend_from_slice(&tail);
            b.extend_from_slice(&[0u8; TRAILER_LEN]);
            let b = patched(&b, 8, &1u32.to_le_bytes());
            let mut dst = vec![0u8; 128];
            let _ = load(&b, &mut dst);
            let _ = load(&tail, &mut dst);
        }
    }
}

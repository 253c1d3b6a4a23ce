//! [`NullBackend`]: a disk that stores nothing.

use std::io;

use super::{check_range, read_only_error, BlockBackend};

/// Reads return zeroes, writes are dropped: for benchmarking the data path
/// without storage (`--null`). Bounds and read-only are still enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NullBackend {
    capacity: u64,
    read_only: bool,
}

impl NullBackend {
    /// A read-write null disk of `capacity` bytes.
    pub const fn new(capacity: u64) -> Self {
        NullBackend {
            capacity,
            read_only: false,
        }
    }

    /// The same disk, read-only or not.
    pub const fn with_read_only(self, read_only: bool) -> Self {
        NullBackend { read_only, ..self }
    }

    fn check_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(self.capacity, offset, len)
    }
}

impl BlockBackend for NullBackend {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len() as u64)?;
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_write(offset, buf.len() as u64)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_write(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.check_write(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zeroes_and_drops_writes() {
        let b = NullBackend::new(1 << 20);
        assert_eq!(b.capacity(), 1 << 20);
        assert_eq!(b.capacity_sectors(), 2048);
        b.write_at(&[0xff; 4096], 0).unwrap();
        let mut buf = [0xAA; 4096];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 4096]);
        b.flush().unwrap();
        b.discard(0, 4096).unwrap();
        b.write_zeroes(0, 4096, true).unwrap();
    }

    #[test]
    fn bounds_and_read_only_are_enforced() {
        let b = NullBackend::new(4096);
        let mut buf = [0xAA; 512];
        let e = b.read_at(&mut buf, 4096 - 256).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(buf, [0xAA; 512], "a refused read leaves the buffer alone");
        assert!(b.write_at(&[0; 1], 4096).is_err());
        assert!(b.discard(u64::MAX, 2).is_err());
        let ro = b.with_read_only(true);
        assert!(ro.read_only());
        ro.read_at(&mut buf, 0).unwrap();
        for e in [
            ro.write_at(&[0; 512], 0).unwrap_err(),
            ro.discard(0, 512).unwrap_err(),
            ro.write_zeroes(0, 512, false).unwrap_err(),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        }
    }
}

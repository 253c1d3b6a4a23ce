//! Carrying out a planned virtio-blk request.

use vhost_user_core::device::blk::{BlkOp, BlkRequest, BlkStatus, BLK_ID_BYTES};
use vhost_user_core::device::{ReadGuest, WriteGuest};

use super::BlockBackend;

/// The largest bounce-buffer chunk [`execute`] copies at once: a request is
/// processed in pieces of at most this many bytes, so the buffer stays
/// bounded whatever the request size.
pub const MAX_CHUNK: usize = 1 << 20;

/// How a request ended: the status written and the length to put in the
/// used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The status byte (also when it could not be written).
    pub status: BlkStatus,
    /// Bytes written into the chain; 0 when the status byte could not be
    /// written.
    pub used_len: u32,
}

/// Carries out `req` against `backend`: copies data between guest memory
/// (`read`, `write`) and the backend through `buf` (grown up to
/// [`MAX_CHUNK`] bytes and kept for reuse), flushes after modifications
/// when the device is in writethrough mode, and writes the status byte.
///
/// `serial` is the device id string for GET_ID. Never panics: a backend or
/// guest-memory error becomes VIRTIO_BLK_S_IOERR.
pub fn execute<B, Rd, Wr, const S: usize, const R: usize>(
    req: &BlkRequest<S, R>,
    serial: &[u8; BLK_ID_BYTES],
    backend: &B,
    read: &Rd,
    write: &Wr,
    buf: &mut Vec<u8>,
) -> Completion
where
    B: BlockBackend + ?Sized,
    Rd: ReadGuest + ?Sized,
    Wr: WriteGuest + ?Sized,
{
    let status = match run(req, serial, backend, read, write, buf) {
        Ok(()) => BlkStatus::Ok,
        Err(status) => status,
    };
    let used_len = match req.write_status(write, status) {
        Ok(()) => req.used_len(status),
        Err(_) => {
            log::warn!("virtio-blk: cannot write the status byte");
            0
        }
    };
    Completion { status, used_len }
}

fn run<B, Rd, Wr, const S: usize, const R: usize>(
    req: &BlkRequest<S, R>,
    serial: &[u8; BLK_ID_BYTES],
    backend: &B,
    read: &Rd,
    write: &Wr,
    buf: &mut Vec<u8>,
) -> Result<(), BlkStatus>
where
    B: BlockBackend + ?Sized,
    Rd: ReadGuest + ?Sized,
    Wr: WriteGuest + ?Sized,
{
    let io = |what: &str, e: std::io::Error| {
        log::debug!("virtio-blk: {what} failed: {e}");
        BlkStatus::IoErr
    };
    let guest = |what: &str| {
        log::debug!("virtio-blk: guest memory {what} failed");
        BlkStatus::IoErr
    };
    match req.op() {
        BlkOp::Read { offset, len } => {
            let mut done = 0u64;
            while done < len {
                let chunk = chunk(buf, len - done);
                backend
                    .read_at(chunk, offset + done)
                    .map_err(|e| io("read", e))?;
                req.write_data(write, done, chunk)
                    .map_err(|_| guest("write"))?;
                done += chunk.len() as u64;
            }
        }
        BlkOp::Write { offset, len } => {
            let mut done = 0u64;
            while done < len {
                let chunk = chunk(buf, len - done);
                req.read_data(read, done, chunk)
                    .map_err(|_| guest("read"))?;
                backend
                    .write_at(chunk, offset + done)
                    .map_err(|e| io("write", e))?;
                done += chunk.len() as u64;
            }
        }
        BlkOp::Flush => backend.flush().map_err(|e| io("flush", e))?,
        BlkOp::GetId { len } => {
            let id = serial.get(..len as usize).unwrap_or(serial);
            req.write_data(write, 0, id).map_err(|_| guest("write"))?;
        }
        BlkOp::Discard => {
            for r in req.ranges() {
                backend
                    .discard(r.offset, r.len)
                    .map_err(|e| io("discard", e))?;
            }
        }
        BlkOp::WriteZeroes => {
            for r in req.ranges() {
                backend
                    .write_zeroes(r.offset, r.len, r.unmap)
                    .map_err(|e| io("write zeroes", e))?;
            }
        }
        BlkOp::Fail { status, error } => {
            log::debug!("virtio-blk: request refused: {error}");
            return Err(status);
        }
    }
    if req.sync_after() {
        backend.flush().map_err(|e| io("flush", e))?;
    }
    Ok(())
}

/// The next chunk of `buf` for `remaining` bytes.
fn chunk(buf: &mut Vec<u8>, remaining: u64) -> &mut [u8] {
    let n = usize::try_from(remaining).map_or(MAX_CHUNK, |r| r.min(MAX_CHUNK));
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::Mutex;

    use vhost_user_core::device::blk::{
        BlkConfig, BlkDevice, BlkError, DiscardLimits, WriteZeroesLimits, VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_WRITE_ZEROES,
    };
    use vhost_user_core::device::Segment;
    use vhost_user_core::message::ConfigWriteKind;

    use super::super::{FileBackend, NullBackend};
    use super::*;

    const MEM: usize = 8 << 20;
    const HDR: u64 = 0x100;
    const STATUS: u64 = 0x200;
    const DATA: u64 = 0x10000;

    struct Mem(RefCell<Vec<u8>>);

    impl Mem {
        fn new() -> Self {
            Mem(RefCell::new(vec![0xEE; MEM]))
        }
        fn put(&self, gpa: u64, b: &[u8]) {
            let a = gpa as usize;
            self.0.borrow_mut()[a..a + b.len()].copy_from_slice(b);
        }
        fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
            let a = gpa as usize;
            self.0.borrow()[a..a + len].to_vec()
        }
        fn range(gpa: u64, len: usize) -> Result<std::ops::Range<usize>, ()> {
            let a = usize::try_from(gpa).map_err(|_| ())?;
            match a.checked_add(len) {
                Some(end) if end <= MEM => Ok(a..end),
                _ => Err(()),
            }
        }
        fn reader(&self) -> impl Fn(u64, &mut [u8]) -> Result<(), ()> + '_ {
            |gpa, dst| {
                dst.copy_from_slice(&self.0.borrow()[Self::range(gpa, dst.len())?]);
                Ok(())
            }
        }
        fn writer(&self) -> impl Fn(u64, &[u8]) -> Result<(), ()> + '_ {
            |gpa, src| {
                self.0.borrow_mut()[Self::range(gpa, src.len())?].copy_from_slice(src);
                Ok(())
            }
        }
    }

    fn hdr(ty: u32, sector: u64) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&ty.to_le_bytes());
        b[8..].copy_from_slice(&sector.to_le_bytes());
        b
    }

    fn device(capacity_bytes: u64) -> BlkDevice {
        let mut c = BlkConfig::new(capacity_bytes / 512);
        c.discard = Some(DiscardLimits {
            max_sectors: 1 << 16,
            max_seg: 1,
            sector_alignment: 1,
        });
        c.write_zeroes = Some(WriteZeroesLimits {
            max_sectors: 1 << 16,
            max_seg: 1,
            may_unmap: true,
        });
        c.set_serial(b"exec-test");
        let mut d = BlkDevice::new(&c).unwrap();
        d.set_features(d.offered_features());
        d
    }

    struct Rig {
        dev: BlkDevice,
        mem: Mem,
        buf: Vec<u8>,
    }

    impl Rig {
        fn new(capacity: u64) -> Self {
            Rig {
                dev: device(capacity),
                mem: Mem::new(),
                buf: Vec::new(),
            }
        }
        fn run(&mut self, backend: &dyn BlockBackend, segs: &[Segment]) -> Completion {
            let req = self.dev.plan(segs, &self.mem.reader());
            execute(
                &req,
                self.dev.serial(),
                backend,
                &self.mem.reader(),
                &self.mem.writer(),
                &mut self.buf,
            )
        }
    }

    const R: fn(u64, u32) -> Segment = Segment::readable;
    const W: fn(u64, u32) -> Segment = Segment::writable;

    #[test]
    fn write_then_read_back_through_a_file() {
        let disk = FileBackend::temp(1 << 20).unwrap();
        let mut rig = Rig::new(disk.capacity());
        let data: Vec<u8> = (0..3072u32).map(|i| (i % 251) as u8).collect();
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 16));
        rig.mem.put(DATA, &data[..1024]);
        rig.mem.put(DATA + 0x1000, &data[1024..]);
        let done = rig.run(
            &disk,
            &[
                R(HDR, 16),
                R(DATA, 1024),
                R(DATA + 0x1000, 2048),
                W(STATUS, 1),
            ],
        );
        assert_eq!(
            done,
            Completion {
                status: BlkStatus::Ok,
                used_len: 1
            }
        );
        assert_eq!(rig.mem.get(STATUS, 1), [0]);
        let mut on_disk = vec![0; 3072];
        disk.read_at(&mut on_disk, 16 * 512).unwrap();
        assert_eq!(on_disk, data);

        // Read it back into a buffer that shares the status descriptor.
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 16));
        let done = rig.run(&disk, &[R(HDR, 16), W(0x40000, 3073)]);
        assert_eq!(done.status, BlkStatus::Ok);
        assert_eq!(done.used_len, 3073);
        assert_eq!(rig.mem.get(0x40000, 3072), data);
        assert_eq!(rig.mem.get(0x40000 + 3072, 1), [0]);
    }

    #[test]
    fn large_requests_are_chunked() {
        let disk = FileBackend::temp(4 << 20).unwrap();
        let big: Vec<u8> = (0..(3 << 20) + 4096u32).map(|i| (i / 512) as u8).collect();
        disk.write_at(&big, 0).unwrap();
        let mut rig = Rig::new(disk.capacity());
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
        let len = big.len() as u32;
        let done = rig.run(&disk, &[R(HDR, 16), W(DATA, len), W(STATUS, 1)]);
        assert_eq!(done.status, BlkStatus::Ok);
        assert_eq!(done.used_len, len + 1);
        assert_eq!(rig.mem.get(DATA, big.len()), big);
        assert_eq!(rig.buf.len(), MAX_CHUNK, "the bounce buffer stays bounded");
    }

    #[test]
    fn get_id_and_flush() {
        let disk = NullBackend::new(1 << 20);
        let mut rig = Rig::new(disk.capacity());
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_GET_ID, 0));
        let done = rig.run(&disk, &[R(HDR, 16), W(DATA, 20), W(STATUS, 1)]);
        assert_eq!(done.used_len, 21);
        assert_eq!(rig.mem.get(DATA, 20), b"exec-test\0\0\0\0\0\0\0\0\0\0\0");
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_FLUSH, 0));
        let done = rig.run(&disk, &[R(HDR, 16), W(STATUS, 1)]);
        assert_eq!(done.status, BlkStatus::Ok);
    }

    #[test]
    fn discard_and_write_zeroes_reach_the_file() {
        let disk = FileBackend::temp(1 << 20).unwrap();
        disk.write_at(&[0xff; 1 << 20], 0).unwrap();
        let mut rig = Rig::new(disk.capacity());
        let mut range = [0u8; 16];
        range[..8].copy_from_slice(&8u64.to_le_bytes());
        range[8..12].copy_from_slice(&16u32.to_le_bytes());
        range[12..].copy_from_slice(&1u32.to_le_bytes()); // UNMAP
        rig.mem.put(DATA, &range);
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0));
        let segs = [R(HDR, 16), R(DATA, 16), W(STATUS, 1)];
        assert_eq!(rig.run(&disk, &segs).status, BlkStatus::Ok);
        let mut b = vec![0xAA; 24 * 512];
        disk.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0xff));
        assert!(b[4096..4096 + 8192].iter().all(|&x| x == 0));
        assert!(b[4096 + 8192..].iter().all(|&x| x == 0xff));
        // Discard: the UNMAP flag is refused with UNSUPP, and nothing changes.
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_DISCARD, 0));
        let done = rig.run(&disk, &segs);
        assert_eq!(done.status, BlkStatus::Unsupp);
        assert_eq!(rig.mem.get(STATUS, 1), [2]);
        range[12..].copy_from_slice(&0u32.to_le_bytes());
        rig.mem.put(DATA, &range);
        assert_eq!(rig.run(&disk, &segs).status, BlkStatus::Ok);
    }

    #[test]
    fn refused_requests_only_write_the_status() {
        let disk = FileBackend::temp(1 << 20).unwrap();
        let mut rig = Rig::new(disk.capacity());
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 2048)); // one past the end
        rig.mem.put(DATA, &[0x77; 512]);
        let done = rig.run(&disk, &[R(HDR, 16), R(DATA, 512), W(STATUS, 1)]);
        assert_eq!(
            done,
            Completion {
                status: BlkStatus::IoErr,
                used_len: 1
            }
        );
        assert_eq!(rig.mem.get(STATUS, 1), [1]);
        assert_eq!(disk.file().metadata().unwrap().len(), 1 << 20);
        rig.mem.put(HDR, &hdr(77, 0));
        assert_eq!(
            rig.run(&disk, &[R(HDR, 16), W(STATUS, 1)]).status,
            BlkStatus::Unsupp
        );
        // No status byte: nothing written, nothing used.
        let done = rig.run(&disk, &[R(HDR, 16)]);
        assert_eq!(done.used_len, 0);
    }

    #[test]
    fn backend_and_guest_errors_are_io_errors() {
        // A device that believes it is writable over a read-only file.
        let image = super::super::TempImage::new(1 << 20).unwrap();
        let ro = image.open(true).unwrap();
        let mut rig = Rig::new(ro.capacity());
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 0));
        let done = rig.run(&ro, &[R(HDR, 16), R(DATA, 512), W(STATUS, 1)]);
        assert_eq!(done.status, BlkStatus::IoErr);
        assert_eq!(rig.mem.get(STATUS, 1), [1]);
        // Data outside guest memory.
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
        let far = MEM as u64 - 256;
        let done = rig.run(&ro, &[R(HDR, 16), W(far, 512), W(STATUS, 1)]);
        assert_eq!(done.status, BlkStatus::IoErr);
        assert_eq!(done.used_len, 1);
        // The status byte itself outside guest memory.
        let done = rig.run(&ro, &[R(HDR, 16), W(DATA, 512), W(MEM as u64, 1)]);
        assert_eq!(done.status, BlkStatus::Ok);
        assert_eq!(done.used_len, 0);
    }

    /// Counts flushes around a null disk.
    #[derive(Debug, Default)]
    struct Counting {
        flushes: Mutex<u32>,
    }

    impl BlockBackend for Counting {
        fn capacity(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            NullBackend::new(1 << 20).read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            NullBackend::new(1 << 20).write_at(buf, offset)
        }
        fn flush(&self) -> std::io::Result<()> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writethrough_flushes_after_each_write() {
        let disk = Counting::default();
        let mut rig = Rig::new(disk.capacity());
        let write = [R(HDR, 16), R(DATA, 512), W(STATUS, 1)];
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 0));
        rig.run(&disk, &write);
        assert_eq!(*disk.flushes.lock().unwrap(), 0, "writeback: no flush");
        rig.dev
            .write_config(32, &[0], ConfigWriteKind::Frontend)
            .unwrap();
        assert_eq!(rig.run(&disk, &write).status, BlkStatus::Ok);
        assert_eq!(*disk.flushes.lock().unwrap(), 1);
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
        rig.run(&disk, &[R(HDR, 16), W(DATA, 512), W(STATUS, 1)]);
        assert_eq!(*disk.flushes.lock().unwrap(), 1, "reads never flush");
        // A refused write does not flush either.
        rig.mem.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 1 << 40));
        let req = rig.dev.plan(&write, &rig.mem.reader());
        assert!(matches!(
            req.op(),
            BlkOp::Fail {
                error: BlkError::OutOfRange,
                ..
            }
        ));
        rig.run(&disk, &write);
        assert_eq!(*disk.flushes.lock().unwrap(), 1);
    }
}

//! The device: the core's virtio-blk planner ([`BlkDevice`]) over a RAM
//! disk of atomic words, implementing the core's [`Device`].

use core::sync::atomic::AtomicU32;

use vhost_user_core::dataplane::Token;
use vhost_user_core::device::blk::{
    BlkConfig, BlkConfigError, BlkDevice, BlkOp, BlkRequest, BlkStatus, SECTOR_SIZE,
};
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::VirtioFeatures;
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::ConfigWriteKind;
use vhost_user_core::vring::Chain;

use crate::memory::{read_bytes, write_bytes};
use crate::CHAIN_CAPACITY;

/// Bytes copied between the disk and guest memory at a time (a stack
/// buffer; the stack budget counts it).
const BOUNCE: usize = 64;

/// A request plan for a chain of at most [`CHAIN_CAPACITY`] descriptors
/// (no discard or write-zeroes ranges: not offered).
pub type Plan = BlkRequest<CHAIN_CAPACITY, 1>;

/// A virtio-blk device over a RAM disk.
#[derive(Debug)]
pub struct RamDisk<'a> {
    blk: BlkDevice,
    disk: &'a [AtomicU32],
}

impl<'a> RamDisk<'a> {
    /// A disk of `disk.len() * 4` bytes rounded down to whole sectors,
    /// with FLUSH (a no-op: RAM is as stable as it gets here), GET_ID and
    /// `seg_max` matching the chain capacity.
    pub fn new(disk: &'a [AtomicU32], serial: &[u8]) -> Result<Self, BlkConfigError> {
        let mut c = BlkConfig::new(disk.len() as u64 * 4 / SECTOR_SIZE);
        // Header and status take two descriptors.
        c.seg_max = CHAIN_CAPACITY as u32 - 2;
        c.config_wce = false;
        c.set_serial(serial);
        Ok(RamDisk {
            blk: BlkDevice::new(&c)?,
            disk,
        })
    }

    /// The device bits to offer.
    pub fn offered_features(&self) -> VirtioFeatures {
        self.blk.offered_features()
    }

    /// Carries out a planned request; returns its status.
    fn execute<M: GuestMemory + ?Sized>(&self, plan: &Plan, mem: &M) -> BlkStatus {
        let mut buf = [0u8; BOUNCE];
        let (offset, len, read) = match plan.op() {
            BlkOp::Read { offset, len } => (offset, len, true),
            BlkOp::Write { offset, len } => (offset, len, false),
            BlkOp::Flush => return BlkStatus::Ok,
            BlkOp::GetId { len } => {
                let id = self.blk.serial();
                let id = id.get(..len as usize).unwrap_or(id);
                return match plan.write_data(&write_fn(mem), 0, id) {
                    Ok(()) => BlkStatus::Ok,
                    Err(_) => BlkStatus::IoErr,
                };
            }
            BlkOp::Fail { status, .. } => return status,
            // Not offered: the planner fails them before they get here.
            BlkOp::Discard | BlkOp::WriteZeroes => return BlkStatus::Unsupp,
        };
        // The planner checked the range against the capacity, which is
        // the disk's size.
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(BOUNCE as u64) as usize;
            let chunk = &mut buf[..n];
            let disk_at = (offset + at) as usize;
            let ok = if read {
                read_bytes(self.disk, disk_at, chunk);
                plan.write_data(&write_fn(mem), at, chunk).is_ok()
            } else {
                let ok = plan.read_data(&read_fn(mem), at, chunk).is_ok();
                if ok {
                    write_bytes(self.disk, disk_at, chunk);
                }
                ok
            };
            if !ok {
                return BlkStatus::IoErr;
            }
            at += n as u64;
        }
        BlkStatus::Ok
    }
}

fn read_fn<M: GuestMemory + ?Sized>(
    mem: &M,
) -> impl Fn(u64, &mut [u8]) -> Result<(), vhost_user_core::memory::MemoryError> + '_ {
    move |gpa, dst| mem.read(gpa, dst)
}

fn write_fn<M: GuestMemory + ?Sized>(
    mem: &M,
) -> impl Fn(u64, &[u8]) -> Result<(), vhost_user_core::memory::MemoryError> + '_ {
    move |gpa, src| mem.write(gpa, src)
}

impl Device for RamDisk<'_> {
    type Scratch = Plan;

    fn read_config(&self, offset: u32, dst: &mut [u8]) -> bool {
        self.blk.read_config(offset, dst).is_ok()
    }

    fn write_config(&mut self, offset: u32, src: &[u8], kind: ConfigWriteKind) -> bool {
        self.blk.write_config(offset, src, kind).is_ok()
    }

    fn features_acked(&mut self, features: VirtioFeatures) {
        self.blk.set_features(features);
    }

    fn reset(&mut self) {
        self.blk.reset();
    }

    /// Plans and carries out the request at once (RAM does not wait).
    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _queue: u16,
        chain: &Chain<S>,
        token: Token,
        mem: &M,
        plan: &mut Plan,
    ) -> Completion {
        if !token.side_effects() {
            return Completion::Done(0);
        }
        self.blk.plan_into(chain.segments(), &read_fn(mem), plan);
        let status = self.execute(plan, mem);
        // A status the guest cannot be told about (no writable byte, or
        // the byte is not in guest memory) completes with length 0.
        if plan.write_status(&write_fn(mem), status).is_err() {
            return Completion::Done(0);
        }
        Completion::Done(plan.used_len(status))
    }
}

//! In-memory test harness for vhu back-ends and front-ends.
//!
//! - [`TestMemory`]: guest memory in owned buffers, behind the core's
//!   [`MemoryTable`](vhost_user_core::memory::MemoryTable), implementing
//!   [`GuestMemory`](vhost_user_core::memory::GuestMemory) without `unsafe`.
//! - [`SplitDriver`] and [`PackedDriver`]: the guest's side of a ring:
//!   post direct and indirect chains, publish, decide kicks, harvest used
//!   entries, and hooks that write hostile descriptors and indices.
//!
//! - [`pair`]: the front-end engine and a back-end host connected in
//!   memory ([`Pair`], [`Backend`]), deterministic, generic over the
//!   device: the test kit of every host.
//!
//! Device tests build on these: lay a ring out with a driver, hand its
//! [`addrs`](SplitDriver::addrs) to the device's queue, post, run the
//! device, harvest.
#![forbid(unsafe_code)]

pub mod driver;
pub mod memory;
pub mod pair;

pub use driver::{Buf, DriverError, PackedDesc, PackedDriver, SplitDriver, Used};
pub use memory::{region, TestMemory, USER_ADDR_OFFSET};
pub use pair::{Backend, GuestRing, Pair, RingSpec, TestDevice};

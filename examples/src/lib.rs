//! Shared code of the vhu example daemons and tools.
#![forbid(unsafe_code)]

pub mod bench;
pub mod blk;
pub mod cli;
pub mod logger;
pub mod net;
pub mod signals;

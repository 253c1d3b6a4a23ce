//! `vhu bench`: a load generator for any vhost-user-blk back-end.
//!
//! One thread drives every queue: it keeps `iodepth` requests in flight per
//! queue on split rings in memfd guest memory (two regions), kicks as the
//! back-end asks (EVENT_IDX), and sleeps in epoll on the call eventfds, or
//! with `poll` spins on the used rings (and asks the back-end for no
//! calls: VRING_AVAIL_F_NO_INTERRUPT). Any completion for a request that
//! is not outstanding, any status other than OK, any verify mismatch, a
//! back-end that goes away (without `reconnect`) and a back-end that
//! completes nothing for `timeout` while requests are in flight is an error.
//!
//! With `migrate`, the load moves between two back-ends every so often
//! while it runs: the rings are stopped without waiting for the requests
//! in flight (GET_VRING_BASE with GET_VRING_BASE_INFLIGHT, or message 45
//! with GET_VRING_BASE_SKIP_DRAIN), the source's device state (with the
//! inflight area recording those requests) is saved through a pipe
//! (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE) and loaded into the other
//! back-end, which starts from the source's bases over the same guest
//! memory and rings and resubmits them. Each request must complete exactly
//! once (and with `verify`, read back what was written).
//!
//! The source logs dirty pages as a migration source does: logging goes on
//! (SET_LOG_BASE, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG) at the start of each
//! interval, and at the switch, once the rings are stopped, the bitmap is
//! read and cleared and logging goes off. The pages logged must be
//! plausible: some when requests posted under logging completed (their
//! status bytes and used-ring entries), and only pages the back-end may
//! write (used rings, request headers with their status bytes, data
//! buffers); never a descriptor table or an avail ring.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost_user_core::device::blk::{BlkFeatures, VIRTIO_BLK_T_FLUSH};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::{
    Event, FrontendConfig, FrontendError, NotifyMode, QueueConfig, State,
};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::MemRegionMsg;
use vhost_user_core::vring::RingAddrs;
use vhost_user_linux::frontend::{FrontendLink, LinkError};
use vhost_user_linux::memory::LinuxGuestMemory;
use vhost_user_linux::sys::epoll::{Epoll, EpollEvent, Interest};
use vhost_user_linux::sys::eventfd::EventFd;
use vhost_user_linux::sys::memfd;
use vhost_user_test::driver::{Buf, DriverError, PackedDriver, SplitDriver, Used};

/// The access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Random reads and writes, half each.
    RandRw,
}

impl std::str::FromStr for Rw {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "read" => Rw::Read,
            "write" => Rw::Write,
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "randrw" => Rw::RandRw,
            _ => return Err(format!("unknown --rw {s:?}")),
        })
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Access pattern.
    pub rw: Rw,
    /// Block size in bytes (a multiple of 512).
    pub bs: u32,
    /// Requests in flight per queue.
    pub iodepth: u16,
    /// Queues used.
    pub queues: u16,
    /// Stop after this long ...
    pub runtime: Option<Duration>,
    /// ... or after this many requests.
    pub requests: Option<u64>,
    /// Spin on the used rings instead of sleeping on call eventfds.
    pub poll: bool,
    /// Writes carry a per-request pattern that reads of the same block
    /// check.
    pub verify: bool,
    /// Print a progress line each second (to stderr).
    pub progress: bool,
    /// Negotiate inflight tracking; when the back-end goes away, reconnect
    /// (retrying for up to 30 s), replay the handshake, hand the inflight
    /// area back and restart the rings from their used index, so the
    /// requests in flight complete.
    pub reconnect: bool,
    /// Fail when no request completes for this long while some are in
    /// flight (a back-end that hangs).
    pub timeout: Duration,
    /// Packed rings instead of split ones (not with `reconnect`).
    pub packed: bool,
    /// In-band notifications (INBAND_NOTIFICATIONS): rings are started and
    /// kicked with VRING_KICK messages, and the back-end calls with
    /// BACKEND_VRING_CALL on the back-end channel; no kick or call
    /// eventfds.
    pub inband: bool,
    /// Also negotiate, where offered, what a Linux guest's driver does
    /// (FLUSH, CONFIG_WCE, SEG_MAX, BLK_SIZE, MQ), so writes see the cache
    /// mode guests get: a device without FLUSH is writethrough.
    pub guest_features: bool,
    /// A FLUSH request after every this many writes (all queues together),
    /// counted as requests; needs FLUSH.
    pub flush_every: Option<u64>,
    /// Data buffers start this many bytes past their natural alignment
    /// (to check how a back-end treats unaligned guest buffers).
    pub buffer_offset: u32,
    /// Migrate the running load between the back-end and another one,
    /// back and forth (split rings, eventfd notifications).
    pub migrate: Option<Migrate>,
    /// Negotiate VIRTIO_F_IN_ORDER where offered: descriptors are used in
    /// table order and a used entry may stand for a batch.
    pub in_order: bool,
}

/// Live migration between two back-ends under load.
#[derive(Clone, Debug)]
pub struct Migrate {
    /// Migrate this often.
    pub every: Duration,
    /// The other back-end's socket.
    pub to: PathBuf,
    /// Negotiate GET_VRING_BASE_SKIP_DRAIN: stop with message 45 (else
    /// GET_VRING_BASE suspends, with GET_VRING_BASE_INFLIGHT).
    pub message_45: bool,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Requests completed.
    pub requests: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency percentiles in nanoseconds: p50, p99, p99.9.
    pub latency_ns: [u64; 3],
    /// Kicks sent.
    pub kicks: u64,
    /// Calls received (eventfd wake-ups).
    pub calls: u64,
    /// Reconnections after the back-end went away.
    pub reconnects: u64,
    /// Back-end channel: BACKEND_CONFIG_CHANGE_MSGs received.
    pub config_changes: u64,
    /// Back-end channel: in-band BACKEND_VRING_CALLs received.
    pub backend_calls: u64,
    /// Back-end channel: BACKEND_VRING_ERRs received.
    pub ring_errors: u64,
    /// Migrations between the two back-ends.
    pub migrations: u64,
    /// Migrations that failed because the state did not move (the source
    /// could not save it, or the destination refused it): the source ran
    /// again, as a VMM resumes its guest.
    pub failed_migrations: u64,
    /// Requests in flight at the migrations' stops (all of them, summed):
    /// the destination completed them.
    pub carried: u64,
    /// Requests sent and never completed.
    pub lost: u64,
    /// Completions of requests that were not outstanding (counted, with
    /// migrations; an error otherwise).
    pub duplicated: u64,
    /// Dirty pages the sources logged, all migrations together.
    pub dirty_pages: u64,
    /// Fewest and most dirty pages one migration logged.
    pub dirty_pages_range: (u64, u64),
    /// VIRTIO_F_IN_ORDER was negotiated.
    pub in_order: bool,
}

impl Report {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Megabytes (10^6) per second.
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Notifications (kicks and calls) per request.
    pub fn notifications_per_request(&self) -> f64 {
        (self.kicks + self.calls) as f64 / (self.requests.max(1)) as f64
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "requests {} in {:.2} s: {:.0} IOPS, {:.1} MB/s",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.iops(),
            self.mbps()
        );
        let _ = writeln!(
            s,
            "latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
            self.latency_ns[0] as f64 / 1e3,
            self.latency_ns[1] as f64 / 1e3,
            self.latency_ns[2] as f64 / 1e3
        );
        let _ = writeln!(
            s,
            "notifications per request {:.3} ({} kicks, {} calls)",
            self.notifications_per_request(),
            self.kicks,
            self.calls
        );
        let _ = writeln!(
            s,
            "back-end channel: {} config changes, {} in-band calls, {} ring errors",
            self.config_changes, self.backend_calls, self.ring_errors
        );
        let _ = writeln!(s, "in-order: {}", if self.in_order { "yes" } else { "no" });
        if self.migrations + self.failed_migrations > 0 {
            let _ = writeln!(
                s,
                "migrations {} ({} failed, the source resumed; {} requests in flight carried): \
                 {} requests lost, {} duplicated",
                self.migrations, self.failed_migrations, self.carried, self.lost, self.duplicated
            );
            let _ = writeln!(
                s,
                "dirty pages logged: {} ({} to {} per migration)",
                self.dirty_pages, self.dirty_pages_range.0, self.dirty_pages_range.1
            );
        }
        s
    }

    /// The report as JSON.
    pub fn json(&self) -> String {
        format!(
            "{{\"requests\": {}, \"seconds\": {:.6}, \"iops\": {:.1}, \"mbps\": {:.3}, \"p50_ns\": {}, \"p99_ns\": {}, \"p999_ns\": {}, \"kicks\": {}, \"calls\": {}, \"reconnects\": {}, \"config_changes\": {}, \"backend_calls\": {}, \"ring_errors\": {}, \"migrations\": {}, \"failed_migrations\": {}, \"carried\": {}, \"lost\": {}, \"duplicated\": {}, \"dirty_pages\": {}, \"dirty_pages_min\": {}, \"dirty_pages_max\": {}, \"in_order\": {}, \"notifications_per_request\": {:.4}}}\n",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.iops(),
            self.mbps(),
            self.latency_ns[0],
            self.latency_ns[1],
            self.latency_ns[2],
            self.kicks,
            self.calls,
            self.reconnects,
            self.config_changes,
            self.backend_calls,
            self.ring_errors,
            self.migrations,
            self.failed_migrations,
            self.carried,
            self.lost,
            self.duplicated,
            self.dirty_pages,
            self.dirty_pages_range.0,
            self.dirty_pages_range.1,
            self.in_order,
            self.notifications_per_request()
        )
    }
}

const MIB: u64 = 1 << 20;
/// Front-end virtual address of guest physical address 0.
const VA: u64 = 0x7f00_0000_0000;
/// The second region starts here (guest physical).
const HIGH: u64 = 0x1_0000_0000;
const RING_SIZE: u16 = 512;

struct Slot {
    req: u64,
    block: u64,
    write: bool,
    /// A FLUSH (no block, no data).
    flush: bool,
    seed: u64,
    at: Instant,
    buf: u64,
}

fn pattern(seed: u64, block: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const SOCKET: u64 = 1 << 32;
/// The epoll token of the in-band calls' eventfd.
const INBAND_CALLS: u64 = 1 << 33;
/// Descriptors of each request: header, data, status.
const CHAIN: u16 = 3;
/// Packed driver event flags: notify on every completion, or never.
const RING_EVENT_FLAGS_ENABLE: u16 = 0;
const RING_EVENT_FLAGS_DISABLE: u16 = 1;

/// The driver side of one ring.
enum Ring {
    Split(SplitDriver),
    /// A packed ring and where its next used descriptor is (position and
    /// used wrap counter), followed here to look for completions without
    /// taking them. Every chain is [`CHAIN`] descriptors.
    Packed(PackedDriver, u16, bool),
}

impl Ring {
    fn post(&mut self, mem: &LinuxGuestMemory, bufs: &[Buf]) -> Result<u16, DriverError> {
        match self {
            Ring::Split(d) => d.post(mem, bufs),
            Ring::Packed(d, ..) => d.post(mem, bufs),
        }
    }

    fn kick_needed(&mut self, mem: &LinuxGuestMemory) -> Result<bool, String> {
        match self {
            Ring::Split(d) => d.kick_needed(mem),
            Ring::Packed(d, ..) => d.kick_needed(mem),
        }
        .map_err(|e| e.to_string())
    }

    fn harvest(&mut self, mem: &LinuxGuestMemory) -> Result<Option<Used>, String> {
        match self {
            Ring::Split(d) => d.harvest(mem).map_err(|e| e.to_string()),
            Ring::Packed(d, pos, wrap) => {
                let u = d.harvest(mem).map_err(|e| e.to_string())?;
                if u.is_some() {
                    *pos += CHAIN;
                    if *pos >= d.size() {
                        *pos -= d.size();
                        *wrap = !*wrap;
                    }
                }
                Ok(u)
            }
        }
    }

    /// Asks for a call at the next completion (split with EVENT_IDX:
    /// used_event; packed: notifications enabled, which they stay).
    fn arm(&self, mem: &LinuxGuestMemory) -> Result<(), String> {
        match self {
            Ring::Split(d) => d.set_used_event(mem, d.last_used()),
            Ring::Packed(..) => Ok(()),
        }
        .map_err(|e| e.to_string())
    }

    /// Whether a completion is waiting (after [`arm`](Self::arm) and a
    /// fence: the look that makes sleeping safe).
    fn ready(&self, mem: &LinuxGuestMemory) -> Result<bool, String> {
        match self {
            Ring::Split(d) => d.used_idx(mem).map(|i| i != d.last_used()),
            Ring::Packed(d, pos, wrap) => mem
                .load_u16_acquire(d.addrs().desc + 16 * u64::from(*pos) + 14)
                .map(|f| {
                    // AVAIL (bit 7) and USED (bit 15) both equal the wrap.
                    (f >> 7 & 1 != 0) == *wrap && (f >> 15 != 0) == *wrap
                }),
        }
        .map_err(|e| e.to_string())
    }
}
/// In poll mode, the loop iterations between looks at the socket (for a
/// back-end that went away) and at the stall timer.
const POLL_CHECK_EVERY: u32 = 1024;

/// A latency histogram with bounded memory: values below 64 ns exactly,
/// larger ones in buckets of 1/64 of their power of two (under 1.6 %
/// error), so a run of any length costs a few kilobytes.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

/// Sub-buckets per power of two (as a shift).
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; SUB + (64 - SUB_BITS as usize) * SUB],
            total: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS
        let sub = (v >> (e - SUB_BITS)) as usize & (SUB - 1);
        SUB + (e - SUB_BITS) as usize * SUB + sub
    }

    /// The smallest value of bucket `i`.
    fn lower(i: usize) -> u64 {
        if i < SUB {
            return i as u64;
        }
        let e = (i - SUB) / SUB + SUB_BITS as usize;
        let sub = ((i - SUB) % SUB) as u64;
        (1u64 << e) | sub << (e - SUB_BITS as usize)
    }

    /// Counts one value.
    pub fn record(&mut self, v: u64) {
        if let Some(c) = self.counts.get_mut(Self::index(v)) {
            *c += 1;
            self.total += 1;
        }
    }

    /// Values recorded.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The value at quantile `q` (0 to 1): the lower bound of the bucket
    /// holding the `ceil(q * n)`-th smallest value; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::lower(i);
            }
        }
        0
    }
}

type Link = FrontendLink<8, 2>;

fn dup(e: &EventFd) -> Result<Option<EventFd>, String> {
    e.as_fd()
        .try_clone_to_owned()
        .map(|f| Some(EventFd::from(f)))
        .map_err(|e| e.to_string())
}

/// Connects and runs the init sequence.
fn open(
    path: &Path,
    cfg: FrontendConfig<8, 2>,
    fds: &[OwnedFd],
    kicks: &[EventFd],
    calls: &[EventFd],
) -> Result<Link, String> {
    let fds: Vec<OwnedFd> = fds
        .iter()
        .map(|f| f.try_clone())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let kicks = kicks.iter().map(dup).collect::<Result<_, _>>()?;
    let calls = calls.iter().map(dup).collect::<Result<_, _>>()?;
    let mut link =
        FrontendLink::connect(path, cfg, fds, kicks, calls).map_err(|e| e.to_string())?;
    link.drive().map_err(|e| e.to_string())?;
    if link.engine().state() != State::Ready {
        return Err("the handshake failed".into());
    }
    Ok(link)
}

/// Largest device state taken from a source back-end.
const MAX_STATE: u64 = 64 << 20;

/// How a migration ended.
enum Migrated {
    /// The destination runs the device: the dirty pages the source logged.
    Moved(Vec<u64>),
    /// The state did not move (the source could not save it, or the
    /// destination refused it): the source runs again, from where it
    /// stopped (it resubmits what it suspended), as a VMM resumes its
    /// guest after a failed migration. Why.
    Resumed(String),
}

/// A back-end refused a device state transfer: the link goes on.
fn refused(e: &LinkError) -> bool {
    matches!(e, LinkError::Engine(FrontendError::StateRefused { .. }))
}

/// Moves the device from `from` (running, logging) to `to` (connected,
/// stopped or never started): stop without draining, the dirty log's last
/// pass (read and cleared, logging off), save, load, start from the same
/// bases; a state that does not move starts `from` again.
fn migrate(from: &mut Link, to: &mut Link, queues: u16) -> Result<Migrated, String> {
    from.engine()
        .stop_suspending()
        .map_err(|e| format!("stop: {e}"))?;
    from.drive().map_err(|e| format!("stop: {e}"))?;
    if from.engine().state() != State::Stopped {
        return Err("the rings did not stop".into());
    }
    let _ = from.take_events();
    // Suspended: the back-end writes nothing more, so this pass is final.
    let dirty = from.take_dirty_pages();
    from.stop_logging()
        .map_err(|e| format!("switching logging off: {e}"))?;
    let resume = |from: &mut Link, why: String| {
        start(from).map_err(|e| format!("{why}; resuming the source: {e}"))?;
        let _ = from.take_events();
        Ok(Migrated::Resumed(why))
    };
    let state = match from.save_state(MAX_STATE) {
        Ok(s) => s,
        Err(e) if refused(&e) => return resume(from, format!("saving the device state: {e}")),
        Err(e) => return Err(format!("saving the device state: {e}")),
    };
    for q in 0..queues {
        let base = from.engine().ring_base(q).ok_or("no base for a ring")?;
        to.engine()
            .set_ring_base(q, base)
            .map_err(|e| e.to_string())?;
    }
    to.engine().prepare().map_err(|e| e.to_string())?;
    to.drive()
        .map_err(|e| format!("preparing the destination: {e}"))?;
    match to.load_state(&state) {
        Ok(()) => {}
        Err(e) if refused(&e) => return resume(from, format!("loading the device state: {e}")),
        Err(e) => return Err(format!("loading the device state: {e}")),
    }
    start(to)?;
    let _ = to.take_events();
    Ok(Migrated::Moved(dirty))
}

/// The guest pages a back-end may write, and those it must not (guest
/// page numbers), for the dirty-log check.
struct PageMap {
    /// Used rings, request headers (status bytes), data buffers.
    writable: std::collections::HashSet<u64>,
    /// Used rings only.
    used: std::collections::HashSet<u64>,
    /// Request headers with their status bytes only.
    headers: std::collections::HashSet<u64>,
    /// Descriptor tables and avail rings (pages they do not share with a
    /// used ring).
    never: std::collections::HashSet<u64>,
}

const PAGE: u64 = 4096;

fn pages(start: u64, len: u64) -> impl Iterator<Item = u64> {
    (start / PAGE)..(start + len).div_ceil(PAGE)
}

impl PageMap {
    fn new(rings: &[RingAddrs], q: u64, depth: u64, data_bytes: u64) -> PageMap {
        let mut m = PageMap {
            writable: Default::default(),
            used: Default::default(),
            headers: pages(0x10000 * q, 0x1000 * q * depth).collect(),
            never: Default::default(),
        };
        let n = u64::from(RING_SIZE);
        for a in rings {
            m.used.extend(pages(a.device, 6 + 8 * n));
        }
        m.writable.extend(m.used.iter().copied());
        m.writable.extend(m.headers.iter().copied());
        m.writable.extend(pages(HIGH, data_bytes));
        for a in rings {
            for p in pages(a.desc, 16 * n).chain(pages(a.driver, 6 + 2 * n)) {
                if !m.used.contains(&p) {
                    m.never.insert(p);
                }
            }
        }
        m
    }

    /// Whether one migration's dirty pages are plausible; `completed`:
    /// requests posted while logging was on that completed.
    fn check(&self, dirty: &[u64], completed: u64) -> Result<(), String> {
        if let Some(p) = dirty.iter().find(|p| self.never.contains(p)) {
            return Err(format!(
                "the back-end logged page {p:#x}, a descriptor table or avail ring"
            ));
        }
        if let Some(p) = dirty.iter().find(|p| !self.writable.contains(p)) {
            return Err(format!(
                "the back-end logged page {p:#x}, which it never writes"
            ));
        }
        if completed > 0 && !dirty.iter().any(|p| self.used.contains(p)) {
            return Err(format!(
                "{completed} requests completed under logging, no used ring page logged"
            ));
        }
        if completed > 0 && !dirty.iter().any(|p| self.headers.contains(p)) {
            return Err(format!(
                "{completed} requests completed under logging, no status byte page logged"
            ));
        }
        Ok(())
    }
}

/// Switches dirty logging on in the source.
fn log_on(link: &mut Link) -> Result<(), String> {
    link.start_logging()
        .map(|_| ())
        .map_err(|e| format!("switching dirty logging on: {e}"))
}

/// Starts every ring.
fn start(link: &mut Link) -> Result<(), String> {
    link.engine().start().map_err(|e| e.to_string())?;
    link.drive().map_err(|e| e.to_string())?;
    if link.engine().state() != State::Started {
        return Err("the rings did not start".into());
    }
    Ok(())
}

/// Runs the load against the vhost-user-blk back-end at `path`.
pub fn run(path: &Path, o: &Options) -> Result<Report, String> {
    if o.bs == 0 || o.bs % 512 != 0 || o.iodepth == 0 || o.queues == 0 {
        return Err("--bs must be a multiple of 512, --iodepth and --queues at least 1".into());
    }
    if usize::from(o.iodepth) * 3 > usize::from(RING_SIZE) {
        return Err(format!("--iodepth at most {}", RING_SIZE / 3));
    }
    if o.queues > 8 {
        return Err("--queues at most 8".into());
    }
    let q = u64::from(o.queues);
    let depth = u64::from(o.iodepth);
    // Region 0: rings and request headers; region 1: data buffers.
    let ring_bytes = 0x10000 * q;
    let data_bytes = (q * depth * u64::from(o.bs) + u64::from(o.buffer_offset))
        .next_multiple_of(MIB)
        .max(MIB);
    let low = (ring_bytes + 0x1000 * q * depth).next_multiple_of(MIB);
    let fd =
        memfd::create("vhu-bench", MIB + low + data_bytes).map_err(|e| format!("memfd: {e}"))?;
    let regions = [
        MemRegionMsg {
            guest_addr: 0,
            size: low,
            user_addr: VA,
            mmap_offset: MIB,
            xen: None,
        },
        MemRegionMsg {
            guest_addr: HIGH,
            size: data_bytes,
            user_addr: VA + HIGH,
            mmap_offset: MIB + low,
            xen: None,
        },
    ];
    let mut mem = LinuxGuestMemory::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        let dup = fd.try_clone().map_err(|e| e.to_string())?;
        mem.map(i, *r, dup).map_err(|e| format!("mmap: {e}"))?;
        fds.push(fd.try_clone().map_err(|e| e.to_string())?);
    }
    if o.verify && matches!(o.rw, Rw::Read | Rw::RandRead) {
        // Reads are checked against the pattern of an earlier write of the
        // run: a read-only load would check nothing.
        return Err("--verify needs a load that writes (write, randwrite, randrw)".into());
    }
    if o.packed && o.reconnect {
        return Err("--reconnect works with split rings only".into());
    }
    if o.migrate.is_some() && (o.packed || o.reconnect || o.inband || o.poll) {
        return Err(
            "--migrate-every works with split rings, eventfds and without --reconnect".into(),
        );
    }
    if o.timeout.is_zero() {
        return Err("--timeout must be positive".into());
    }
    let event_idx = !o.poll;
    let mut features = V::VERSION_1 | V::PROTOCOL_FEATURES | V::INDIRECT_DESC;
    if event_idx {
        features |= V::EVENT_IDX;
    }
    if o.packed {
        features |= V::RING_PACKED;
    }
    // The back-end channel is served (config changes, in-band calls and
    // ring errors are counted); calls still use eventfds, and with no err
    // eventfd a broken ring is reported in-band.
    let mut protocol =
        P::MQ | P::REPLY_ACK | P::CONFIG | P::STATUS | P::BACKEND_REQ | P::INBAND_NOTIFICATIONS;
    if o.reconnect {
        protocol |= P::INFLIGHT_SHMFD;
    }
    let migration = P::INFLIGHT_SHMFD | P::GET_VRING_BASE_INFLIGHT | P::DEVICE_STATE | P::LOG_SHMFD;
    let migration = match &o.migrate {
        Some(m) if m.message_45 => migration | P::GET_VRING_BASE_SKIP_DRAIN,
        Some(_) => migration,
        None => P::empty(),
    };
    protocol |= migration;
    let guest = if o.guest_features {
        (BlkFeatures::FLUSH
            | BlkFeatures::CONFIG_WCE
            | BlkFeatures::SEG_MAX
            | BlkFeatures::BLK_SIZE
            | BlkFeatures::MQ)
            .to_virtio()
    } else {
        V::empty()
    };
    // In order where offered (not required: a back-end without it runs as
    // before).
    let order = if o.in_order { V::IN_ORDER } else { V::empty() };
    let mut cfg: FrontendConfig<8, 2> = FrontendConfig::new(features | guest | order, protocol);
    for r in &regions {
        let _ = cfg.regions.push(*r);
    }
    let notify = if o.inband {
        NotifyMode::InBand
    } else {
        NotifyMode::Eventfd
    };
    let mut drivers = Vec::new();
    let mut ring_addrs = Vec::new();
    for i in 0..q {
        let at = 0x10000 * i;
        let (ring, a, base) = if o.packed {
            let d = PackedDriver::new(&mem, RING_SIZE, at).map_err(|e| e.to_string())?;
            let flags = if o.poll {
                RING_EVENT_FLAGS_DISABLE
            } else {
                RING_EVENT_FLAGS_ENABLE
            };
            d.set_driver_event(&mem, 0, flags)
                .map_err(|e| e.to_string())?;
            let a = d.addrs();
            // Avail and used at 0, both wrap counters 1.
            (Ring::Packed(d, 0, true), a, 1 << 15 | 1 << 31)
        } else {
            let d = SplitDriver::new(&mem, RING_SIZE, at, event_idx).map_err(|e| e.to_string())?;
            if o.poll {
                // We never sleep: the back-end need not signal completions.
                d.set_avail_flags(&mem, 1).map_err(|e| e.to_string())?;
            }
            let a = d.addrs();
            (Ring::Split(d), a, 0)
        };
        ring_addrs.push(a);
        let _ = cfg.queues.push(QueueConfig {
            size: RING_SIZE,
            addrs: RingAddrs {
                desc: a.desc + VA,
                driver: a.driver + VA,
                device: a.device + VA,
            },
            base,
            kick: notify,
            call: notify,
        });
        drivers.push(ring);
    }
    let kick_fds: Vec<EventFd> = (0..q)
        .map(|_| EventFd::new(true))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let calls: Vec<EventFd> = (0..q)
        .map(|_| EventFd::new(true))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    // The other back-end of a migration shares the guest memory, the rings
    // and the notifiers.
    let mut other = match &o.migrate {
        Some(m) => {
            let l = open(&m.to, cfg.clone(), &fds, &kick_fds, &calls)
                .map_err(|e| format!("{}: {e}", m.to.display()))?;
            Some(l)
        }
        None => None,
    };
    let mut link = open(path, cfg, &fds, &kick_fds, &calls)?;
    for l in std::iter::once(&mut link).chain(other.as_mut()) {
        let got = l.engine().protocol_features();
        if !got.contains(migration) {
            return Err(format!(
                "--migrate-every needs a back-end that offers {:?} (vhost-user-blk does unless --no-migration)",
                migration.difference(got)
            ));
        }
        if o.migrate.is_some() && !l.engine().backend_info().features.contains(V::LOG_ALL) {
            return Err("--migrate-every needs a back-end that offers VHOST_F_LOG_ALL".into());
        }
    }
    if o.inband
        && !link
            .engine()
            .protocol_features()
            .contains(P::INBAND_NOTIFICATIONS)
    {
        return Err("--inband needs a back-end that offers INBAND_NOTIFICATIONS".into());
    }
    let inband_calls = if o.inband { link.channel_calls() } else { None };
    if o.reconnect
        && !link
            .engine()
            .protocol_features()
            .contains(P::INFLIGHT_SHMFD)
    {
        return Err("--reconnect needs a back-end that offers INFLIGHT_SHMFD".into());
    }
    if (link.engine().features() & features) != features {
        return Err(format!(
            "the back-end does not offer {:?}",
            features.difference(link.engine().features())
        ));
    }
    let in_order = link.engine().features().contains(V::IN_ORDER);
    if in_order {
        for d in &mut drivers {
            match d {
                Ring::Split(d) => d.set_in_order(),
                Ring::Packed(d, ..) => d.set_in_order(),
            }
        }
    }
    let flush = BlkFeatures::FLUSH.to_virtio();
    if o.flush_every.is_some() && !link.engine().features().contains(flush) {
        return Err("--flush-every needs FLUSH (not offered, or --no-guest-features)".into());
    }
    if usize::from(o.queues)
        > link
            .engine()
            .backend_info()
            .queue_num
            .map_or(1, |n| n as usize)
    {
        return Err("the back-end has fewer queues than --queues".into());
    }
    // Capacity from the config space.
    link.engine().read_config(0, 8).map_err(|e| e.to_string())?;
    link.drive().map_err(|e| e.to_string())?;
    let mut sectors = 0u64;
    for e in link.take_events() {
        if let Event::Config { data, .. } = e {
            sectors = data.iter().rev().fold(0u64, |a, b| a << 8 | u64::from(*b));
        }
    }
    let blocks = sectors * 512 / u64::from(o.bs);
    if blocks < q * depth * 2 {
        return Err(format!(
            "the device ({sectors} sectors) is too small for this load"
        ));
    }
    start(&mut link)?;
    // With migrations: the source logs dirty pages, requests from number
    // `log_from` on were posted under logging, `logged_done` of them
    // completed.
    let page_map = PageMap::new(&ring_addrs, q, depth, data_bytes);
    if o.migrate.is_some() {
        log_on(&mut link)?;
    }
    let (mut log_from, mut logged_done) = (0u64, 0u64);

    let epoll = Epoll::new().map_err(|e| e.to_string())?;
    if let Some(c) = &inband_calls {
        epoll
            .add(&**c, Interest::READABLE, INBAND_CALLS)
            .map_err(|e| e.to_string())?;
    } else {
        for (i, c) in calls.iter().enumerate() {
            epoll
                .add(c, Interest::READABLE, i as u64)
                .map_err(|e| e.to_string())?;
        }
    }
    // The socket turns readable (end of file) when the back-end goes away.
    epoll
        .add(link.socket(), Interest::READABLE, SOCKET)
        .map_err(|e| e.to_string())?;
    let mut gone = false;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut writes_since_flush = 0u64;
    let mut outstanding: Vec<HashMap<u16, Slot>> = (0..q).map(|_| HashMap::new()).collect();
    let mut free_bufs: Vec<Vec<u64>> = (0..q)
        .map(|i| (0..depth).map(|d| i * depth + d).collect())
        .collect();
    // Verify: the seed of the last completed write of each block, and the
    // blocks with a request in flight (never two at once on one block).
    let mut written: HashMap<u64, u64> = HashMap::new();
    let mut busy: std::collections::HashSet<u64> = Default::default();
    let mut lat = Histogram::new();
    let mut rep = Report {
        in_order,
        ..Report::default()
    };
    let (mut next_req, mut seq) = (0u64, 0u64);
    let t0 = Instant::now();
    let mut last_progress = (t0, 0u64);
    let mut last_completion = t0;
    let mut spins = 0u32;
    let mut last_migration = t0;
    let bs = o.bs as usize;
    let done = |rep: &Report, issued: u64| {
        o.requests.is_some_and(|n| issued >= n)
            || o.runtime
                .is_some_and(|t| t0.elapsed() >= t && rep.requests > 0)
    };
    loop {
        let stop_issuing = done(&rep, next_req);
        // Fill every queue.
        for (qi, drv) in drivers.iter_mut().enumerate() {
            let mut posted = false;
            while !stop_issuing
                && outstanding[qi].len() < usize::from(o.iodepth)
                && !done(&rep, next_req)
            {
                let mut write = match o.rw {
                    Rw::Read | Rw::RandRead => false,
                    Rw::Write | Rw::RandWrite => true,
                    Rw::RandRw => rand() & 1 == 0,
                };
                let flush = write && o.flush_every.is_some_and(|n| writes_since_flush >= n);
                if flush {
                    writes_since_flush = 0;
                    write = false;
                } else if write {
                    writes_since_flush += 1;
                }
                let mut block = match o.rw {
                    Rw::Read | Rw::Write => {
                        seq += 1;
                        (seq - 1) % blocks
                    }
                    _ => rand() % blocks,
                };
                if o.verify && !flush {
                    let mut tries = 0;
                    while busy.contains(&block)
                        || (!write && !written.contains_key(&block) && tries < 8)
                    {
                        block = rand() % blocks;
                        tries += 1;
                    }
                    if busy.contains(&block) {
                        break;
                    }
                }
                let Some(bufn) = free_bufs[qi].pop() else {
                    break;
                };
                let hdr = 0x10000 * q + 0x1000 * bufn;
                let data = HIGH + u64::from(o.bs) * bufn + u64::from(o.buffer_offset);
                let seed = rand();
                let mut h = [0u8; 16];
                let ty = if flush {
                    VIRTIO_BLK_T_FLUSH
                } else {
                    u32::from(write)
                };
                h[0..4].copy_from_slice(&ty.to_le_bytes());
                h[8..16].copy_from_slice(&(block * u64::from(o.bs) / 512).to_le_bytes());
                mem.write(hdr, &h).map_err(|e| e.to_string())?;
                mem.write(hdr + 16, &[0xff]).map_err(|e| e.to_string())?;
                if write && o.verify {
                    mem.write(data, &pattern(seed, block, bs))
                        .map_err(|e| e.to_string())?;
                }
                let bufs = [
                    Buf::readable(hdr, 16),
                    if write {
                        Buf::readable(data, o.bs)
                    } else {
                        Buf::writable(data, o.bs)
                    },
                    Buf::writable(hdr + 16, 1),
                ];
                let flush_bufs = [bufs[0], bufs[2]];
                let bufs: &[Buf] = if flush { &flush_bufs } else { &bufs };
                let head = drv.post(&mem, bufs).map_err(|e| format!("{e:?}"))?;
                if o.verify && !flush {
                    busy.insert(block);
                }
                outstanding[qi].insert(
                    head,
                    Slot {
                        req: next_req,
                        block,
                        write,
                        flush,
                        seed,
                        at: Instant::now(),
                        buf: bufn,
                    },
                );
                next_req += 1;
                posted = true;
            }
            if posted && drv.kick_needed(&mem)? {
                if o.inband {
                    link.kick_in_band(qi as u16)
                        .map_err(|e| format!("in-band kick: {e}"))?;
                } else {
                    link.kick(qi as u16);
                }
                rep.kicks += 1;
            }
        }
        // Harvest.
        let mut got = 0;
        for (qi, drv) in drivers.iter_mut().enumerate() {
            while let Some(u) = drv.harvest(&mem)? {
                let Some(s) = outstanding[qi].remove(&u.id) else {
                    if o.migrate.is_some() {
                        rep.duplicated += 1;
                        continue;
                    }
                    return Err(format!(
                        "queue {qi}: completion for head {} which is not outstanding",
                        u.id
                    ));
                };
                let hdr = 0x10000 * q + 0x1000 * s.buf;
                let mut st = [0u8; 1];
                mem.read(hdr + 16, &mut st).map_err(|e| e.to_string())?;
                if st[0] != 0 {
                    return Err(format!(
                        "request {} (block {}): status {}",
                        s.req, s.block, st[0]
                    ));
                }
                if o.verify && !s.flush {
                    busy.remove(&s.block);
                    if s.write {
                        written.insert(s.block, s.seed);
                    } else if let Some(seed) = written.get(&s.block) {
                        let mut b = vec![0u8; bs];
                        let data = HIGH + u64::from(o.bs) * s.buf + u64::from(o.buffer_offset);
                        mem.read(data, &mut b).map_err(|e| e.to_string())?;
                        if b != pattern(*seed, s.block, bs) {
                            return Err(format!(
                                "request {}: block {} does not read back what was written",
                                s.req, s.block
                            ));
                        }
                    }
                }
                if s.req >= log_from {
                    logged_done += 1;
                }
                lat.record(s.at.elapsed().as_nanos() as u64);
                free_bufs[qi].push(s.buf);
                rep.requests += 1;
                if !s.flush {
                    rep.bytes += u64::from(o.bs);
                }
                got += 1;
            }
        }
        let in_flight: usize = outstanding.iter().map(|m| m.len()).sum();
        if done(&rep, next_req) && in_flight == 0 {
            break;
        }
        if let (Some(m), Some(to)) = (&o.migrate, other.as_mut()) {
            if last_migration.elapsed() >= m.every && !done(&rep, next_req) {
                let _ = epoll.delete(link.socket());
                let n = rep.migrations + rep.failed_migrations + 1;
                match migrate(&mut link, to, o.queues).map_err(|e| format!("migration {n}: {e}"))? {
                    Migrated::Moved(dirty) => {
                        page_map
                            .check(&dirty, logged_done)
                            .map_err(|e| format!("migration {n}: dirty log: {e}"))?;
                        let d = dirty.len() as u64;
                        rep.dirty_pages += d;
                        rep.dirty_pages_range = if rep.migrations == 0 {
                            (d, d)
                        } else {
                            (
                                rep.dirty_pages_range.0.min(d),
                                rep.dirty_pages_range.1.max(d),
                            )
                        };
                        std::mem::swap(&mut link, to);
                        rep.migrations += 1;
                        rep.carried += in_flight as u64;
                    }
                    Migrated::Resumed(why) => {
                        eprintln!("vhu bench: migration {n} failed ({why}); the source resumed");
                        rep.failed_migrations += 1;
                    }
                }
                log_on(&mut link)?;
                log_from = next_req;
                logged_done = 0;
                epoll
                    .add(link.socket(), Interest::READABLE, SOCKET)
                    .map_err(|e| e.to_string())?;
                last_migration = Instant::now();
                last_completion = Instant::now();
                continue;
            }
        }
        if o.progress && last_progress.0.elapsed() >= Duration::from_secs(1) {
            let n = rep.requests - last_progress.1;
            eprintln!(
                "{:>5.1} s: {:.0} IOPS, {} requests",
                t0.elapsed().as_secs_f64(),
                n as f64 / last_progress.0.elapsed().as_secs_f64(),
                rep.requests
            );
            last_progress = (Instant::now(), rep.requests);
        }
        if got > 0 {
            last_completion = Instant::now();
        }
        let mut look = false;
        if o.poll {
            spins = spins.wrapping_add(1);
            look = spins % POLL_CHECK_EVERY == 0;
            if look {
                let mut ev = [EpollEvent::default(); 8];
                let n = epoll.wait(&mut ev, 0).map_err(|e| e.to_string())?;
                gone |= ev[..n].iter().any(|e| e.token() == SOCKET);
            }
        }
        if (look || (!o.poll && got == 0)) && in_flight > 0 && !gone {
            let idle = last_completion.elapsed();
            if idle >= o.timeout {
                return Err(format!(
                    "no completion for {:.1} s with {in_flight} requests in flight",
                    idle.as_secs_f64()
                ));
            }
        }
        if gone {
            if !o.reconnect {
                return Err("the back-end went away".into());
            }
            let _ = epoll.delete(link.socket());
            // A back-end that died cannot be asked for its base: restart
            // from the used index, as QEMU does.
            let bases = drivers
                .iter()
                .map(|d| match d {
                    Ring::Split(d) => d.used_idx(&mem).map(u32::from).map_err(|e| e.to_string()),
                    Ring::Packed(..) => Err("--reconnect works with split rings only".into()),
                })
                .collect::<Result<Vec<u32>, String>>()?;
            link.reconnect(path, &bases, Duration::from_secs(30))
                .map_err(|e| format!("cannot reconnect: {e}"))?;
            epoll
                .add(link.socket(), Interest::READABLE, SOCKET)
                .map_err(|e| e.to_string())?;
            rep.reconnects += 1;
            gone = false;
            last_completion = Instant::now();
            continue;
        }
        if got == 0 && !o.poll && in_flight > 0 {
            // Ask for a call at the next completion, then look once more
            // before sleeping.
            for d in drivers.iter() {
                d.arm(&mem)?;
            }
            mem.fence();
            let mut ready = false;
            for d in drivers.iter() {
                ready |= d.ready(&mem)?;
            }
            if !ready {
                let mut ev = [EpollEvent::default(); 8];
                let ms = o.timeout.as_millis().clamp(1, 1000) as i32;
                let n = epoll.wait(&mut ev, ms).map_err(|e| e.to_string())?;
                for e in &ev[..n] {
                    if e.token() == SOCKET {
                        gone = true;
                    } else if e.token() == INBAND_CALLS {
                        if let Some(c) = &inband_calls {
                            let _ = c.read();
                        }
                    } else if let Some(c) = calls.get(e.token() as usize) {
                        let _ = c.read();
                        rep.calls += 1;
                    }
                }
            }
        }
    }
    rep.elapsed = t0.elapsed();
    rep.lost = next_req.saturating_sub(rep.requests + rep.duplicated);
    rep.latency_ns = [lat.quantile(0.5), lat.quantile(0.99), lat.quantile(0.999)];
    link.engine().stop().map_err(|e| e.to_string())?;
    link.drive().map_err(|e| e.to_string())?;
    if let Some(c) = link.channel_counters() {
        use std::sync::atomic::Ordering::Relaxed;
        rep.config_changes = c.config_changes.load(Relaxed);
        rep.backend_calls = c.calls.load(Relaxed);
        rep.ring_errors = c.ring_errors.load(Relaxed);
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn histogram_quantiles_within_two_percent() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile(0.5), 0);
        // 1..=100_000 ns, each once.
        for v in 1..=100_000u64 {
            h.record(v);
        }
        assert_eq!(h.len(), 100_000);
        for (q, exact) in [(0.5, 50_000f64), (0.99, 99_000.0), (0.999, 99_900.0)] {
            let got = h.quantile(q) as f64;
            assert!(
                got <= exact && got >= exact * 0.98,
                "quantile {q}: {got} vs {exact}"
            );
        }
        // Small values are exact, huge ones do not overflow.
        let mut h = Histogram::new();
        for v in [3, 3, 3, 40, u64::MAX] {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 3);
        assert_eq!(h.quantile(0.8), 40);
        assert!(h.quantile(1.0) >= 1 << 63);
    }

    #[test]
    fn histogram_bucket_bounds_are_monotonic() {
        let mut last = 0;
        for i in 1..Histogram::new().counts.len() {
            let lo = Histogram::lower(i);
            assert!(lo > last, "bucket {i}");
            assert_eq!(Histogram::index(lo), i);
            assert_eq!(Histogram::index(lo - 1), i - 1);
            last = lo;
        }
    }
}

//! The runtime against a hostile front-end, in this process over a socket
//! pair: what the front-end controls (its fds, whether it reads) must not
//! hold the control thread or a ring's worker for good.

#![allow(clippy::unwrap_used)]

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vhost_user_core::backend::BackendConfig;
use vhost_user_core::dataplane::Token;
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::memory::GuestMemory;
use vhost_user_core::message::{
    ConfigWriteKind, FrontendReq, MemRegionMsg, MemTable, Request, VringAddrMsg, VringFdMsg,
    VringStateMsg, MAX_MESSAGE,
};
use vhost_user_core::vring::Chain;

use super::{serve_one, ConnectionEnd, RuntimeOptions, SharedDevice};
use crate::channel::Control;
use crate::sys::eventfd::EventFd;
use crate::sys::memfd;
use crate::sys::socket::Stream;

/// Completes every request at once, writing nothing.
#[derive(Clone)]
struct Nop;

impl Device for Nop {
    type Scratch = ();

    fn read_config(&self, _offset: u32, _dst: &mut [u8]) -> bool {
        false
    }

    fn write_config(&mut self, _offset: u32, _src: &[u8], _kind: ConfigWriteKind) -> bool {
        false
    }

    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _queue: u16,
        _chain: &Chain<S>,
        _token: Token,
        _mem: &M,
        _scratch: &mut (),
    ) -> Completion {
        Completion::Done(0)
    }
}

impl SharedDevice for Nop {}

/// [`Nop`] that records the id of the thread processing its requests
/// (the ring's worker).
#[derive(Clone, Default)]
struct ThreadOf(Arc<AtomicI32>);

impl Device for ThreadOf {
    type Scratch = ();

    fn read_config(&self, _offset: u32, _dst: &mut [u8]) -> bool {
        false
    }

    fn write_config(&mut self, _offset: u32, _src: &[u8], _kind: ConfigWriteKind) -> bool {
        false
    }

    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _queue: u16,
        _chain: &Chain<S>,
        _token: Token,
        _mem: &M,
        _scratch: &mut (),
    ) -> Completion {
        // /proc/thread-self is /proc/<pid>/task/<tid>.
        let me = std::fs::read_link("/proc/thread-self").unwrap();
        let tid = me.file_name().unwrap().to_str().unwrap().parse().unwrap();
        self.0.store(tid, Ordering::Relaxed);
        Completion::Done(0)
    }
}

impl SharedDevice for ThreadOf {}

/// Holds every request (`Completion::Later`) until the test releases
/// them, then completes them (length 0) on its next poll. With `with_fd`
/// it has a completion fd (its scratch's eventfd, which the test writes
/// once it released them), as a device doing its I/O on a thread pool or
/// io_uring; without, the worker polls it.
#[derive(Clone)]
struct Holds {
    with_fd: bool,
    /// Its requests count as waiting for the disk
    /// ([`SharedDevice::slow_completions`]).
    slow: bool,
    state: Arc<Mutex<Held>>,
}

#[derive(Default)]
struct Held {
    tokens: Vec<Token>,
    processed: usize,
    release: bool,
    /// Requests completed.
    completed: u64,
    /// The completion fd of the scratch that holds the requests.
    wake: Option<Arc<EventFd>>,
}

/// [`Holds`]'s scratch: its completion eventfd.
struct HoldScratch(Arc<EventFd>);

impl Default for HoldScratch {
    fn default() -> Self {
        HoldScratch(Arc::new(EventFd::new(true).unwrap()))
    }
}

impl Holds {
    fn new(with_fd: bool) -> Self {
        Holds {
            with_fd,
            slow: false,
            state: Arc::default(),
        }
    }

    fn processed(&self) -> usize {
        self.state.lock().unwrap().processed
    }

    /// Lets the held requests complete, and signals the completion fd.
    fn release(&self) {
        let mut s = self.state.lock().unwrap();
        s.release = true;
        if let Some(w) = &s.wake {
            w.write(1).unwrap();
        }
    }
}

impl Device for Holds {
    type Scratch = HoldScratch;

    fn read_config(&self, _offset: u32, _dst: &mut [u8]) -> bool {
        false
    }

    fn write_config(&mut self, _offset: u32, _src: &[u8], _kind: ConfigWriteKind) -> bool {
        false
    }

    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _queue: u16,
        _chain: &Chain<S>,
        token: Token,
        _mem: &M,
        scratch: &mut HoldScratch,
    ) -> Completion {
        let mut s = self.state.lock().unwrap();
        s.tokens.push(token);
        s.processed += 1;
        s.wake = Some(Arc::clone(&scratch.0));
        Completion::Later
    }

    fn poll<M: GuestMemory + ?Sized>(
        &self,
        _queue: u16,
        _mem: &M,
        _scratch: &mut HoldScratch,
        done: &mut dyn FnMut(Token, u32),
    ) {
        let mut s = self.state.lock().unwrap();
        if s.release {
            for t in std::mem::take(&mut s.tokens) {
                s.completed += 1;
                done(t, 0);
            }
        }
    }
}

impl SharedDevice for Holds {
    fn completion_fd<'a>(&self, _queue: u16, scratch: &'a HoldScratch) -> Option<BorrowedFd<'a>> {
        self.with_fd.then(|| scratch.0.as_fd())
    }

    fn slow_completions(&self, _queue: u16, _scratch: &HoldScratch) -> u64 {
        if self.slow {
            self.state.lock().unwrap().completed
        } else {
            0
        }
    }
}

/// The CPU time thread `tid` of this process has used so far (the
/// first field of its schedstat, in nanoseconds).
fn cpu_time(tid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
    let ns = stat.split_whitespace().next().unwrap().parse().unwrap();
    Duration::from_nanos(ns)
}

const RAM: u64 = 0x10000;
const VA: u64 = 0x7f00_0000_0000;
const SIZE: u16 = 8;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

/// The runtime serving one connection on a thread; returns our end and
/// how the connection ended, once it did.
fn runtime(protocol: P) -> (Stream, mpsc::Receiver<ConnectionEnd>) {
    runtime_with(protocol, RuntimeOptions::default(), Control::new())
}

fn runtime_with(
    protocol: P,
    options: RuntimeOptions,
    control: Control,
) -> (Stream, mpsc::Receiver<ConnectionEnd>) {
    runtime_for(Nop, protocol, options, control)
}

fn runtime_for<D: SharedDevice>(
    device: D,
    protocol: P,
    options: RuntimeOptions,
    control: Control,
) -> (Stream, mpsc::Receiver<ConnectionEnd>)
where
    D::Scratch: Send,
{
    let (ours, theirs) = Stream::pair().unwrap();
    let config = BackendConfig {
        features: V::VERSION_1 | V::PROTOCOL_FEATURES,
        protocol_features: protocol,
        num_queues: 1,
        max_queue_size: 256,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let end = serve_one::<D, 1, 1>(&theirs, config, device, options, &control);
        let _ = tx.send(end);
    });
    (ours, rx)
}

fn send(s: &Stream, req: &Request<'_>, fds: &[std::os::fd::BorrowedFd<'_>]) {
    let mut buf = [0u8; MAX_MESSAGE];
    let n = req.encode(false, &mut buf).unwrap();
    s.send_message(&buf[..n], fds).unwrap();
}

/// Guest RAM with ring 0 laid out at DESC/AVAIL/USED and one readable
/// request of 16 bytes made available.
/// VERSION_1 and PROTOCOL_FEATURES, then `protocol`, then SET_OWNER.
fn negotiate(s: &Stream, protocol: P) {
    send(
        s,
        &Request::SetFeatures((V::VERSION_1 | V::PROTOCOL_FEATURES).bits()),
        &[],
    );
    send(s, &Request::SetProtocolFeatures(protocol.bits()), &[]);
    send(s, &Request::SetOwner, &[]);
}

fn guest_ram_with_a_request() -> (std::os::fd::OwnedFd, MemRegionMsg) {
    let fd = memfd::create("guest", RAM).unwrap();
    let f = std::fs::File::from(fd.try_clone().unwrap());
    // Descriptor 0: 16 bytes at 0x1000, no flags.
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&0x1000u64.to_le_bytes());
    d[8..12].copy_from_slice(&16u32.to_le_bytes());
    f.write_all_at(&d, DESC).unwrap();
    // Avail: flags 0, idx 1, ring[0] = 0.
    f.write_all_at(&[0, 0, 1, 0, 0, 0], AVAIL).unwrap();
    let region = MemRegionMsg {
        guest_addr: 0,
        size: RAM,
        user_addr: VA,
        mmap_offset: 0,
        xen: None,
    };
    (fd, region)
}

/// Sets up ring 0 (without protocol features: it runs once kicked) with
/// `call` as its call fd, then starts it; returns the guest RAM.
fn start_ring(s: &Stream, call: &EventFd, kick: &EventFd) -> std::fs::File {
    start_ring_with(s, call.as_fd(), None, kick.as_fd())
}

/// [`start_ring`] with any fds as the call and kick fds, and `err` as
/// the err fd.
fn start_ring_with(
    s: &Stream,
    call: BorrowedFd<'_>,
    err: Option<BorrowedFd<'_>>,
    kick: BorrowedFd<'_>,
) -> std::fs::File {
    let (ram, region) = guest_ram_with_a_request();
    send(s, &Request::SetFeatures(V::VERSION_1.bits()), &[]);
    send(s, &Request::SetOwner, &[]);
    send(
        s,
        &Request::SetMemTable(MemTable::new(&[region]).unwrap()),
        &[ram.as_fd()],
    );
    send(
        s,
        &Request::SetVringNum(VringStateMsg {
            index: 0,
            num: u32::from(SIZE),
        }),
        &[],
    );
    send(
        s,
        &Request::SetVringAddr(VringAddrMsg {
            index: 0,
            log: false,
            desc: VA + DESC,
            used: VA + USED,
            avail: VA + AVAIL,
            log_addr: 0,
        }),
        &[],
    );
    send(
        s,
        &Request::SetVringBase(VringStateMsg { index: 0, num: 0 }),
        &[],
    );
    let ring = VringFdMsg {
        index: 0,
        no_fd: false,
    };
    send(s, &Request::SetVringCall(ring), &[call]);
    if let Some(err) = err {
        send(s, &Request::SetVringErr(ring), &[err]);
    }
    send(s, &Request::SetVringKick(ring), &[kick]);
    std::fs::File::from(ram)
}

/// Waits until the ring's used index is `n` (at most 5 s).
fn wait_used(ram: &std::fs::File, n: u16) {
    let t0 = std::time::Instant::now();
    loop {
        let mut idx = [0u8; 2];
        ram.read_exact_at(&mut idx, USED + 2).unwrap();
        if u16::from_le_bytes(idx) == n {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "request not served");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for the reply to GET_VRING_BASE of ring 0, at most `timeout`.
fn vring_base(s: &Stream, timeout: Duration) -> std::io::Result<u32> {
    send(s, &Request::GetVringBase(0), &[]);
    s.set_read_timeout(Some(timeout))?;
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let rx = s
        .recv_message(&mut buf)?
        .ok_or(std::io::ErrorKind::UnexpectedEof)?;
    assert_eq!(rx.header.request, FrontendReq::GetVringBase.id());
    let p = rx.payload(&buf);
    Ok(u32::from_le_bytes([p[4], p[5], p[6], p[7]]))
}

#[test]
fn a_call_eventfd_that_cannot_take_a_signal_does_not_hold_the_worker() {
    let (s, ended) = runtime(P::empty());
    // A blocking eventfd whose counter is at its largest: a blocking write
    // of 1 waits until someone reads it, and the front-end never does.
    let call = EventFd::new(false).unwrap();
    call.write(u64::MAX - 1).unwrap();
    let kick = EventFd::new(true).unwrap();
    let ram = start_ring(&s, &call, &kick);
    // The request is completed and the guest wants a call: the worker
    // signals, then GET_VRING_BASE stops it.
    wait_used(&ram, 1);
    let base = vring_base(&s, Duration::from_secs(5));
    // Let a stuck worker go before judging, so a failure leaves no thread
    // behind.
    let _ = call.read();
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert_eq!(
        base.unwrap(),
        1,
        "the worker served the request and stopped"
    );
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

#[test]
fn a_front_end_that_never_reads_the_back_end_channel_does_not_hold_its_senders() {
    let options = RuntimeOptions {
        channel_timeout: Duration::from_millis(200),
        ..RuntimeOptions::default()
    };
    let control = Control::new();
    let (s, ended) = runtime_with(P::BACKEND_REQ | P::CONFIG, options, control.clone());
    negotiate(&s, P::BACKEND_REQ | P::CONFIG);
    // The front-end keeps its end of the channel open and never reads it.
    let (unread, theirs) = Stream::pair().unwrap();
    send(&s, &Request::SetBackendReqFd, &[theirs.as_fd()]);
    drop(theirs);
    let t0 = std::time::Instant::now();
    while matches!(
        control.config_changed(),
        Err(crate::channel::ChannelFailure::NoChannel)
    ) {
        assert!(t0.elapsed() < Duration::from_secs(5), "no channel");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Config changes until the channel's socket buffer is full: the
    // sender must give up (and end the connection), not wait for ever.
    let (tx, rx) = mpsc::channel();
    let sender = control.clone();
    let t = std::thread::spawn(move || {
        for _ in 0..1_000_000 {
            if let Err(e) = sender.config_changed() {
                let _ = tx.send(e);
                return;
            }
        }
    });
    let failure = rx.recv_timeout(Duration::from_secs(5));
    // Let a stuck sender go before judging.
    drop(unread);
    t.join().unwrap();
    assert!(
        matches!(failure, Ok(crate::channel::ChannelFailure::Broken(_))),
        "{failure:?}"
    );
    // The broken channel ended the connection.
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

/// Whether the back-end closed its end of a pipe whose write end we hold,
/// within 2 s (a write then fails with EPIPE).
fn reader_gone(w: &std::os::fd::OwnedFd) -> bool {
    let t0 = std::time::Instant::now();
    let mut f = std::fs::File::from(w.try_clone().unwrap());
    crate::sys::file::set_nonblocking(w.as_fd(), true).unwrap();
    loop {
        match std::io::Write::write(&mut f, b"x") {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return true,
            _ if t0.elapsed() > Duration::from_secs(2) => return false,
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[test]
fn a_device_state_transfer_the_session_dropped_lets_go_of_its_fd() {
    let (s, ended) = runtime(P::DEVICE_STATE | P::RESET_DEVICE);
    negotiate(&s, P::DEVICE_STATE | P::RESET_DEVICE);
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let load = vhost_user_core::message::DeviceStateDirection::Load;
    // A load whose pipe the front-end never closes, dropped by
    // RESET_DEVICE, then a second one: one transfer at a time, and
    // the first one's fd goes.
    let (r1, w1) = crate::sys::pipe::pipe().unwrap();
    send(&s, &Request::SetDeviceStateFd(load), &[r1.as_fd()]);
    drop(r1);
    s.recv_message(&mut buf).unwrap().unwrap();
    send(&s, &Request::ResetDevice, &[]);
    let (r2, w2) = crate::sys::pipe::pipe().unwrap();
    send(&s, &Request::SetDeviceStateFd(load), &[r2.as_fd()]);
    drop(r2);
    s.recv_message(&mut buf).unwrap().unwrap();
    let first_gone = reader_gone(&w1);
    // The front-end leaves with the second transfer running.
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    let second_gone = reader_gone(&w2);
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
    assert!(first_gone, "the dropped transfer still holds its fd");
    assert!(second_gone, "the transfer outlives its connection");
}

#[test]
fn a_kick_fd_at_end_of_file_does_not_keep_the_worker_busy() {
    let worker = Arc::new(AtomicI32::new(0));
    let device = ThreadOf(Arc::clone(&worker));
    let (s, ended) = runtime_for(
        device,
        P::empty(),
        RuntimeOptions::default(),
        Control::new(),
    );
    // The kick fd is the read end of a pipe whose writer is gone: it polls
    // readable for good, and every read finds end of file.
    let (pipe, writer) = crate::sys::pipe::pipe().unwrap();
    drop(writer);
    let call = EventFd::new(true).unwrap();
    let err = EventFd::new(true).unwrap();
    let ram = start_ring_with(&s, call.as_fd(), Some(err.as_fd()), pipe.as_fd());
    drop(pipe);
    // The ring runs (started with its kick fd) and serves the request
    // made available; its worker is the thread that processed it.
    wait_used(&ram, 1);
    let tid = worker.load(Ordering::Relaxed);
    let before = cpu_time(tid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let busy = cpu_time(tid).saturating_sub(before);
    let window = t0.elapsed();
    // The front-end hears of the broken kick as of a broken ring.
    let reported = err.wait(Some(Duration::from_secs(1))).unwrap();
    // A new kick fd brings the ring back: a second request is served once
    // kicked.
    let kick = EventFd::new(true).unwrap();
    let ring = VringFdMsg {
        index: 0,
        no_fd: false,
    };
    send(&s, &Request::SetVringKick(ring), &[kick.as_fd()]);
    ram.write_all_at(&[0, 0, 2, 0, 0, 0, 0, 0], AVAIL).unwrap();
    kick.write(1).unwrap();
    wait_used(&ram, 2);
    let base = vring_base(&s, Duration::from_secs(5));
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(
        busy < Duration::from_millis(60),
        "the worker used {busy:?} of CPU in {window:?} with nothing to do"
    );
    assert!(reported.is_some(), "the broken kick was not reported");
    assert_eq!(base.unwrap(), 2);
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

/// A request the device holds when the ring's kick fd dies is still
/// completed and published once the device is done with it: the ring
/// pops nothing new, but what it popped reaches the guest without a
/// GET_VRING_BASE (it was left in the device until the ring stopped).
fn a_held_request_completes_after_the_kick_fd_died(with_fd: bool) {
    let device = Holds::new(with_fd);
    let (s, ended) = runtime_for(
        device.clone(),
        P::empty(),
        RuntimeOptions::default(),
        Control::new(),
    );
    let (pipe, writer) = crate::sys::pipe::pipe().unwrap();
    let call = EventFd::new(true).unwrap();
    let err = EventFd::new(true).unwrap();
    let ram = start_ring_with(&s, call.as_fd(), Some(err.as_fd()), pipe.as_fd());
    drop(pipe);
    // The request made available is popped and held by the device.
    let t0 = Instant::now();
    while device.processed() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "request not popped");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The kick fd dies (its writer is gone), and the front-end hears of it.
    drop(writer);
    let reported = err.wait(Some(Duration::from_secs(2))).unwrap();
    // A second request is made available: a dead-kick ring must not pop it.
    ram.write_all_at(&[0, 0, 2, 0, 0, 0, 0, 0], AVAIL).unwrap();
    device.release();
    let mut used = [0u8; 2];
    let t0 = Instant::now();
    while u16::from_le_bytes(used) != 1 && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(1));
        ram.read_exact_at(&mut used, USED + 2).unwrap();
    }
    let called = call.wait(Some(Duration::from_millis(500))).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let processed = device.processed();
    let base = vring_base(&s, Duration::from_secs(5));
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(reported.is_some(), "the dead kick was not reported");
    assert_eq!(
        u16::from_le_bytes(used),
        1,
        "the held request was not published after the kick fd died"
    );
    assert!(called.is_some(), "the guest was not called");
    assert_eq!(processed, 1, "a dead-kick ring popped a new request");
    assert_eq!(base.unwrap(), 1);
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

#[test]
fn a_held_request_completes_on_its_completion_fd_after_the_kick_fd_died() {
    a_held_request_completes_after_the_kick_fd_died(true);
}

#[test]
fn a_held_request_completes_by_polling_after_the_kick_fd_died() {
    a_held_request_completes_after_the_kick_fd_died(false);
}

/// Without REPLY_ACK a refusal cannot be answered: a kick, call, err or
/// dirty log fd that cannot serve ends the connection, as any refused
/// request does, with the fd named as the reason, and nothing is served
/// with it. (With REPLY_ACK it is refused in the ack: see
/// `refused_in_the_ack`.)
#[test]
fn without_an_ack_an_unusable_notifier_fd_ends_the_connection() {
    use vhost_user_core::backend::{BackendError, FdAccess};
    let (reader, writer) = crate::sys::pipe::pipe().unwrap();
    let cases = [
        (Request::SetVringKick(RING0), writer.as_fd(), FdAccess::Read),
        (
            Request::SetVringCall(RING0),
            reader.as_fd(),
            FdAccess::Write,
        ),
        (Request::SetVringErr(RING0), reader.as_fd(), FdAccess::Write),
        (Request::SetLogFd, reader.as_fd(), FdAccess::Write),
    ];
    for (req, fd, access) in cases {
        let (s, ended) = runtime(P::LOG_SHMFD);
        negotiate(&s, P::LOG_SHMFD);
        send(&s, &req, &[fd]);
        let end = ended.recv_timeout(Duration::from_secs(5));
        assert!(
            matches!(
                end,
                Ok(ConnectionEnd::Refused(BackendError::BadFd { index: 0, access: a })) if a == access
            ),
            "{:?}: {end:?}",
            req.code()
        );
    }
}

/// The error records logged so far in this test binary (tests run in
/// parallel: look for what only the test at hand can cause).
static LOGGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Error
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            LOGGED.lock().unwrap().push(r.args().to_string());
        }
    }

    fn flush(&self) {}
}

/// Captures error records into [`LOGGED`] (once per test binary).
fn capture_errors() {
    static CAPTURE: Capture = Capture;
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Error);
    }
}

/// How many error records logged so far contain `what`.
fn logged(what: &str) -> usize {
    LOGGED
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.contains(what))
        .count()
}

/// Makes a second request available (descriptor 0 again) and kicks.
fn second_request(ram: &std::fs::File, kick: &EventFd) {
    ram.write_all_at(&[0, 0, 2, 0, 0, 0, 0, 0], AVAIL).unwrap();
    kick.write(1).unwrap();
}

/// A call fd whose writes fail (`call`, opened for writing: one that is
/// not is refused when set): the ring is still served, and the
/// front-end hears of it once, on the err fd, however many calls fail;
/// the log says so once (with `what`).
fn a_bad_call_fd_is_reported_once(call: BorrowedFd<'_>, what: &str) {
    capture_errors();
    let (s, ended) = runtime(P::empty());
    let err = EventFd::new(true).unwrap();
    let kick = EventFd::new(true).unwrap();
    let ram = start_ring_with(&s, call, Some(err.as_fd()), kick.as_fd());
    wait_used(&ram, 1);
    let reported = err.wait(Some(Duration::from_secs(2))).unwrap();
    // A second call fails as the first did: not reported again.
    second_request(&ram, &kick);
    wait_used(&ram, 2);
    let base = vring_base(&s, Duration::from_secs(5));
    let again = err.wait(Some(Duration::from_millis(100))).unwrap();
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert_eq!(
        reported,
        Some(1),
        "the call fd that cannot be written was not reported on the err fd"
    );
    assert_eq!(again, None, "the bad call fd was reported more than once");
    let line = format!("ring 0: the call fd cannot be written ({what}");
    assert_eq!(logged(&line), 1, "{line:?} logged once");
    assert_eq!(base.unwrap(), 2);
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

/// A call fd whose writes fail (the write end of a pipe whose reader is
/// gone: EPIPE) is reported at its first failed call.
#[test]
fn a_call_fd_whose_writes_fail_is_reported_on_the_err_fd() {
    let (reader, pipe) = crate::sys::pipe::pipe().unwrap();
    drop(reader);
    a_bad_call_fd_is_reported_once(pipe.as_fd(), "Broken pipe");
}

/// A front-end that sends `bytes` one at a time, `pause` apart, on a
/// thread of its own (until the back-end is gone).
fn trickle(s: &Stream, bytes: Vec<u8>, pause: Duration) -> std::thread::JoinHandle<()> {
    let s = s.try_clone().unwrap();
    std::thread::spawn(move || {
        for b in bytes {
            if s.send_message(&[b], &[]).is_err() {
                return;
            }
            std::thread::sleep(pause);
        }
    })
}

fn get_features(s: &Stream) -> u64 {
    send(s, &Request::GetFeatures, &[]);
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let rx = s.recv_message(&mut buf).unwrap().unwrap();
    assert_eq!(rx.header.request, FrontendReq::GetFeatures.id());
    u64::from_le_bytes(rx.payload(&buf).try_into().unwrap())
}

#[test]
fn a_front_end_that_trickles_a_message_is_timed_out() {
    let options = RuntimeOptions {
        message_timeout: Some(Duration::from_millis(300)),
        ..RuntimeOptions::default()
    };
    let (s, ended) = runtime_with(P::empty(), options, Control::new());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Idle between messages for longer than the timeout: still served.
    assert_ne!(get_features(&s), 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(get_features(&s), 0);
    // A header one byte every 200 ms: each byte comes well within the
    // timeout, the message (2.4 s) does not.
    let mut head = [0u8; MAX_MESSAGE];
    let n = Request::GetFeatures.encode(false, &mut head).unwrap();
    let t0 = Instant::now();
    let t = trickle(&s, head[..n].to_vec(), Duration::from_millis(200));
    let end = ended.recv_timeout(Duration::from_millis(1500));
    let took = t0.elapsed();
    drop(s);
    t.join().unwrap();
    assert!(
        matches!(&end, Ok(ConnectionEnd::TimedOut(e)) if e.kind() == std::io::ErrorKind::TimedOut),
        "{end:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(1), "ended after {took:?}");
}

#[test]
fn a_front_end_that_never_reads_its_replies_is_timed_out() {
    let options = RuntimeOptions {
        message_timeout: Some(Duration::from_millis(300)),
        ..RuntimeOptions::default()
    };
    let (s, ended) = runtime_with(P::empty(), options, Control::new());
    // Requests that each want a reply, sent until the back-end stops
    // reading them: it is stuck sending replies nobody reads.
    s.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut m = [0u8; MAX_MESSAGE];
    let n = Request::GetFeatures.encode(false, &mut m).unwrap();
    let t0 = Instant::now();
    let mut sent = 0u32;
    while s.send_message(&m[..n], &[]).is_ok() {
        sent += 1;
        assert!(t0.elapsed() < Duration::from_secs(10), "never filled");
    }
    let t1 = Instant::now();
    let end = ended.recv_timeout(Duration::from_secs(3));
    let took = t1.elapsed();
    // Let a stuck back-end go before judging.
    drop(s);
    assert!(
        matches!(&end, Ok(ConnectionEnd::TimedOut(e)) if e.kind() == std::io::ErrorKind::TimedOut),
        "{end:?} after {took:?} ({sent} requests sent)"
    );
    assert!(took < Duration::from_secs(2), "ended after {took:?}");
}

#[test]
fn a_front_end_that_trickles_its_ack_on_the_back_end_channel_is_left() {
    let options = RuntimeOptions {
        channel_timeout: Duration::from_millis(300),
        ..RuntimeOptions::default()
    };
    let control = Control::new();
    let protocol = P::BACKEND_REQ | P::CONFIG | P::REPLY_ACK;
    let (s, ended) = runtime_with(protocol, options, control.clone());
    negotiate(&s, protocol);
    let (ours, theirs) = Stream::pair().unwrap();
    send(&s, &Request::SetBackendReqFd, &[theirs.as_fd()]);
    drop(theirs);
    // The front-end reads the config change and acks it one byte every
    // 150 ms: each byte well within the timeout, the ack (3 s) not.
    let acker = std::thread::spawn(move || {
        let mut buf = Box::new([0u8; MAX_MESSAGE]);
        let Ok(Some(rx)) = ours.recv_message(&mut buf) else {
            return;
        };
        let mut ack = Vec::new();
        ack.extend_from_slice(&rx.header.request.to_le_bytes());
        ack.extend_from_slice(&0x5u32.to_le_bytes());
        ack.extend_from_slice(&8u32.to_le_bytes());
        ack.extend_from_slice(&0u64.to_le_bytes());
        for b in ack {
            if ours.send_message(&[b], &[]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    });
    let t0 = Instant::now();
    let r = loop {
        match control.config_changed() {
            Err(crate::channel::ChannelFailure::NoChannel) => {
                assert!(t0.elapsed() < Duration::from_secs(5), "no channel");
                std::thread::sleep(Duration::from_millis(1));
            }
            r => break r,
        }
    };
    let took = t0.elapsed();
    let end = ended.recv_timeout(Duration::from_secs(5));
    drop(s);
    acker.join().unwrap();
    assert!(
        matches!(r, Err(crate::channel::ChannelFailure::Broken(_))),
        "{r:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(1), "gave up after {took:?}");
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

// fds whose access mode cannot serve their purpose are refused on the
// message that brings them, in its reply, and closed; the connection
// goes on (or, for SET_LOG_BASE, whose reply carries no verdict, ends).

/// Sends `req` with NEED_REPLY and `fds`: the u64 of its reply (for an
/// ack, 0 is success), or `None` if the back-end closed the connection
/// instead of answering.
fn ask(s: &Stream, req: &Request<'_>, fds: &[BorrowedFd<'_>]) -> Option<u64> {
    let mut buf = [0u8; MAX_MESSAGE];
    let n = req.encode(true, &mut buf).unwrap();
    s.send_message(&buf[..n], fds).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rx_buf = Box::new([0u8; MAX_MESSAGE]);
    let rx = s.recv_message(&mut rx_buf).ok()??;
    assert_eq!(rx.header.request, req.code().id());
    Some(u64::from_le_bytes(rx.payload(&rx_buf).try_into().unwrap()))
}

/// Whether the back-end closed its copies of a pipe's write end whose read
/// end we hold (and whose write end we closed), within 2 s: the read end
/// then reads end of file.
fn writer_gone(r: &std::os::fd::OwnedFd) -> bool {
    let t0 = Instant::now();
    let mut f = std::fs::File::from(r.try_clone().unwrap());
    crate::sys::file::set_nonblocking(r.as_fd(), true).unwrap();
    loop {
        match std::io::Read::read(&mut f, &mut [0u8; 64]) {
            Ok(0) => return true,
            _ if t0.elapsed() > Duration::from_secs(2) => return false,
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// How many fds of this process are the memfd named `name`.
fn copies_of(name: &str) -> usize {
    let prefix = format!("/memfd:{name} ");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with(&prefix))
        })
        .count()
}

/// Whether every copy of the memfd `name` is closed within 2 s.
fn memfd_gone(name: &str) -> bool {
    let t0 = Instant::now();
    while copies_of(name) != 0 {
        if t0.elapsed() > Duration::from_secs(2) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// `fd` opened again through `/proc/self/fd` as `how` says: `"r"`
/// read-only, `"w"` write-only, `"path"` `O_PATH`.
fn reopened(fd: &std::os::fd::OwnedFd, how: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    match how {
        "r" => o.read(true),
        "w" => o.write(true),
        _ => o.read(true).custom_flags(libc::O_PATH),
    };
    o.open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .into()
}

/// Ring 0 with a size, addresses and a base in guest RAM (a memfd named
/// `name`), protocol features negotiated: SET_VRING_KICK starts it.
fn configure_ring(s: &Stream, protocol: P, name: &str) {
    negotiate(s, protocol);
    let ram = memfd::create(name, RAM).unwrap();
    let region = MemRegionMsg {
        guest_addr: 0,
        size: RAM,
        user_addr: VA,
        mmap_offset: 0,
        xen: None,
    };
    let regions = [region];
    let table = Request::SetMemTable(MemTable::new(&regions).unwrap());
    assert_eq!(ask(s, &table, &[ram.as_fd()]), Some(0));
    let num = VringStateMsg {
        index: 0,
        num: u32::from(SIZE),
    };
    assert_eq!(ask(s, &Request::SetVringNum(num), &[]), Some(0));
    let addr = VringAddrMsg {
        index: 0,
        log: false,
        desc: VA + DESC,
        used: VA + USED,
        avail: VA + AVAIL,
        log_addr: 0,
    };
    assert_eq!(ask(s, &Request::SetVringAddr(addr), &[]), Some(0));
}

const RING0: VringFdMsg = VringFdMsg {
    index: 0,
    no_fd: false,
};

/// `req` with the fd `bad` is refused in its ack; `released` (called once
/// our copy of `bad` is closed) says whether the back-end closed its
/// copy; then the connection goes on: `req` with `good` is acked.
fn refused_in_the_ack(
    s: &Stream,
    ended: &mpsc::Receiver<ConnectionEnd>,
    req: &Request<'_>,
    bad: std::os::fd::OwnedFd,
    released: impl FnOnce() -> bool,
    good: BorrowedFd<'_>,
) {
    let refused = ask(s, req, &[bad.as_fd()]);
    drop(bad);
    let closed = released();
    let taken = ask(s, req, &[good]);
    let features = ask(s, &Request::GetFeatures, &[]);
    let end = ended.try_recv();
    let code = req.code();
    assert_eq!(refused, Some(1), "{code:?} with an unusable fd: its ack");
    assert!(closed, "{code:?}: the refused fd was not closed");
    assert_eq!(taken, Some(0), "{code:?} with a usable fd after it");
    assert!(features.is_some(), "the connection ended ({end:?})");
}

#[test]
fn a_write_only_kick_fd_is_refused_in_the_ack() {
    let (s, ended) = runtime(P::REPLY_ACK);
    configure_ring(&s, P::REPLY_ACK, "kick-refused");
    // The front-end keeps the read end; we send the write end.
    let (reader, writer) = crate::sys::pipe::pipe().unwrap();
    let kick = EventFd::new(true).unwrap();
    let req = Request::SetVringKick(RING0);
    refused_in_the_ack(
        &s,
        &ended,
        &req,
        writer,
        || writer_gone(&reader),
        kick.as_fd(),
    );
    assert_eq!(vring_base(&s, Duration::from_secs(5)).unwrap(), 0);
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

/// An `O_PATH` fd reads as opened read-only, but can be neither read
/// nor polled.
#[test]
fn an_o_path_kick_fd_is_refused_in_the_ack() {
    let (s, ended) = runtime(P::REPLY_ACK);
    configure_ring(&s, P::REPLY_ACK, "kick-path-ram");
    let file = memfd::create("kick-path", 4096).unwrap();
    let bad = reopened(&file, "path");
    drop(file);
    let kick = EventFd::new(true).unwrap();
    let req = Request::SetVringKick(RING0);
    refused_in_the_ack(
        &s,
        &ended,
        &req,
        bad,
        || memfd_gone("kick-path"),
        kick.as_fd(),
    );
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

#[test]
fn a_read_only_call_fd_is_refused_in_the_ack() {
    let (s, ended) = runtime(P::REPLY_ACK);
    negotiate(&s, P::REPLY_ACK);
    let (reader, writer) = crate::sys::pipe::pipe().unwrap();
    let call = EventFd::new(true).unwrap();
    let req = Request::SetVringCall(RING0);
    refused_in_the_ack(
        &s,
        &ended,
        &req,
        reader,
        || reader_gone(&writer),
        call.as_fd(),
    );
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

#[test]
fn a_read_only_err_fd_is_refused_in_the_ack() {
    let (s, ended) = runtime(P::REPLY_ACK);
    negotiate(&s, P::REPLY_ACK);
    let (reader, writer) = crate::sys::pipe::pipe().unwrap();
    let err = EventFd::new(true).unwrap();
    let req = Request::SetVringErr(RING0);
    refused_in_the_ack(
        &s,
        &ended,
        &req,
        reader,
        || reader_gone(&writer),
        err.as_fd(),
    );
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

#[test]
fn a_read_only_log_fd_is_refused_in_the_ack() {
    let protocol = P::REPLY_ACK | P::LOG_SHMFD;
    let (s, ended) = runtime(protocol);
    negotiate(&s, protocol);
    let (reader, writer) = crate::sys::pipe::pipe().unwrap();
    let log = EventFd::new(true).unwrap();
    let req = Request::SetLogFd;
    refused_in_the_ack(
        &s,
        &ended,
        &req,
        reader,
        || reader_gone(&writer),
        log.as_fd(),
    );
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

/// A pipe end that is not a socket cannot be the back-end channel.
#[test]
fn a_pipe_end_as_the_back_end_channel_is_refused_in_the_ack() {
    let protocol = P::REPLY_ACK | P::BACKEND_REQ;
    let (s, ended) = runtime(protocol);
    negotiate(&s, protocol);
    let (reader, writer) = crate::sys::pipe::pipe().unwrap();
    let (_ours, theirs) = Stream::pair().unwrap();
    let req = Request::SetBackendReqFd;
    refused_in_the_ack(
        &s,
        &ended,
        &req,
        reader,
        || reader_gone(&writer),
        theirs.as_fd(),
    );
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

/// A memory region, the inflight area: shared memory the back-end maps
/// read-write, so an fd opened write-only, read-only or `O_PATH` cannot
/// serve.
fn an_unmappable_fd_is_refused_in_the_ack(
    protocol: P,
    how: &str,
    req: impl Fn() -> Request<'static>,
) {
    let name = format!("unmappable-{}-{how}", req().code().id());
    let (s, ended) = runtime(P::REPLY_ACK | protocol);
    negotiate(&s, P::REPLY_ACK | protocol);
    let memory = memfd::create(&name, RAM).unwrap();
    let bad = reopened(&memory, how);
    drop(memory);
    let good = memfd::create("mappable", RAM).unwrap();
    refused_in_the_ack(&s, &ended, &req(), bad, || memfd_gone(&name), good.as_fd());
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

const REGION: MemRegionMsg = MemRegionMsg {
    guest_addr: 0,
    size: RAM,
    user_addr: VA,
    mmap_offset: 0,
    xen: None,
};

#[test]
fn a_write_only_memory_region_fd_is_refused_in_the_ack() {
    an_unmappable_fd_is_refused_in_the_ack(P::empty(), "w", || {
        Request::SetMemTable(MemTable::new(&[REGION]).unwrap())
    });
}

#[test]
fn an_o_path_added_region_fd_is_refused_in_the_ack() {
    an_unmappable_fd_is_refused_in_the_ack(P::CONFIGURE_MEM_SLOTS, "path", || {
        Request::AddMemReg(REGION)
    });
}

#[test]
fn a_read_only_inflight_fd_is_refused_in_the_ack() {
    let area = vhost_user_core::inflight::area_size(1, SIZE).unwrap();
    an_unmappable_fd_is_refused_in_the_ack(P::INFLIGHT_SHMFD, "r", move || {
        Request::SetInflightFd(vhost_user_core::message::InflightMsg {
            mmap_size: area,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: SIZE,
        })
    });
}

/// SET_DEVICE_STATE_FD answers with its own reply: an error, and no fd.
fn a_device_state_fd_of_the_wrong_direction_is_refused(save: bool) {
    use vhost_user_core::message::DeviceStateDirection as Dir;
    let (s, ended) = runtime(P::DEVICE_STATE);
    negotiate(&s, P::DEVICE_STATE);
    let (reader, writer) = crate::sys::pipe::pipe().unwrap();
    // Save: the back-end writes, and is given the read end; load: the
    // other way round.
    let (req, bad, closed): (_, _, Box<dyn FnOnce() -> bool>) = if save {
        (
            Request::SetDeviceStateFd(Dir::Save),
            reader,
            Box::new(move || reader_gone(&writer)),
        )
    } else {
        (
            Request::SetDeviceStateFd(Dir::Load),
            writer,
            Box::new(move || writer_gone(&reader)),
        )
    };
    let reply = ask(&s, &req, &[bad.as_fd()]);
    drop(bad);
    let closed = closed();
    let check = ask(&s, &Request::CheckDeviceState, &[]);
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert_eq!(reply, Some(0x101), "an error and no fd");
    assert!(closed, "the refused fd was not closed");
    assert_eq!(check, Some(1), "no transfer to check");
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

#[test]
fn a_read_only_fd_to_save_the_device_state_into_is_refused() {
    a_device_state_fd_of_the_wrong_direction_is_refused(true);
}

#[test]
fn a_write_only_fd_to_load_the_device_state_from_is_refused() {
    a_device_state_fd_of_the_wrong_direction_is_refused(false);
}

/// SET_LOG_BASE's reply carries no verdict (the front-end ignores its
/// content): a log fd that cannot be mapped read-write ends the
/// connection, with the fd named as the reason, and closed.
#[test]
fn a_read_only_dirty_log_fd_ends_the_connection() {
    let protocol = P::REPLY_ACK | P::LOG_SHMFD;
    let (s, ended) = runtime(protocol);
    negotiate(&s, protocol);
    let log = memfd::create("log-read-only", 4096).unwrap();
    let bad = reopened(&log, "r");
    drop(log);
    let req = Request::SetLogBase(vhost_user_core::message::LogMsg {
        size: 4096,
        offset: 0,
    });
    let reply = ask(&s, &req, &[bad.as_fd()]);
    drop(bad);
    let end = ended.recv_timeout(Duration::from_secs(5));
    let closed = memfd_gone("log-read-only");
    assert_eq!(reply, None, "answered");
    let named = vhost_user_core::backend::BackendError::BadFd {
        index: 0,
        access: vhost_user_core::backend::FdAccess::Map,
    };
    assert!(
        matches!(end, Ok(ConnectionEnd::Refused(e)) if e == named),
        "{end:?}"
    );
    assert!(closed, "the log fd was not closed");
}

/// A memfd that can shrink and cannot be sealed (created without
/// `MFD_ALLOW_SEALING`) is of the right kind and mode, so it passes the
/// reply's look; it is found only when mapped, after the reply was
/// decided, so the connection ends, with the fd named as the reason, and
/// the fd is closed.
#[test]
fn an_unsealable_inflight_memfd_ends_the_connection() {
    let protocol = P::REPLY_ACK | P::INFLIGHT_SHMFD;
    let (s, ended) = runtime(protocol);
    negotiate(&s, protocol);
    let size = vhost_user_core::inflight::area_size(1, SIZE).unwrap();
    let area = memfd::create_unsealable("inflight-unsealable", size).unwrap();
    let req = Request::SetInflightFd(vhost_user_core::message::InflightMsg {
        mmap_size: size,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: SIZE,
    });
    let reply = ask(&s, &req, &[area.as_fd()]);
    drop(area);
    let end = ended.recv_timeout(Duration::from_secs(5));
    let closed = memfd_gone("inflight-unsealable");
    let named = vhost_user_core::backend::BackendError::BadFd {
        index: 0,
        access: vhost_user_core::backend::FdAccess::Map,
    };
    assert_eq!(reply, None, "answered");
    assert!(
        matches!(end, Ok(ConnectionEnd::Refused(e)) if e == named),
        "{end:?}"
    );
    assert!(closed, "the inflight fd was not closed");
}

// fds opened read-write that still cannot serve, for their kind: not
// shared memory where memory is mapped, not a Unix stream socket as the
// back-end channel. Refused in the reply, closed; the connection goes on.

/// Whether every fd of this process whose `/proc/self/fd` link reads
/// `link` (a socket's or a pipe's, which name their inode) is closed
/// within 2 s.
fn link_gone(link: &str) -> bool {
    let t0 = Instant::now();
    loop {
        let copies = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == link))
            .count();
        if copies == 0 {
            return true;
        }
        if t0.elapsed() > Duration::from_secs(2) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The `/proc/self/fd` link of `fd`.
fn link_of(fd: BorrowedFd<'_>) -> String {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    std::fs::read_link(path)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Whether every eventfd of this process whose counter is `count` (a
/// value only the test at hand writes) is closed within 2 s: eventfds
/// share one inode, so their links do not tell them apart.
fn eventfd_gone(count: u64) -> bool {
    let line = format!("eventfd-count: {count:16x}");
    let t0 = Instant::now();
    loop {
        let copies = std::fs::read_dir("/proc/self/fdinfo")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|info| info.contains(&line)))
            .count();
        if copies == 0 {
            return true;
        }
        if t0.elapsed() > Duration::from_secs(2) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An eventfd (opened read-write) whose counter is `count`.
fn eventfd_counting(count: u64) -> std::os::fd::OwnedFd {
    let e = EventFd::new(true).unwrap();
    e.write(count).unwrap();
    e.into()
}

/// A Unix stream socket (opened read-write) whose peer is gone, and the
/// link that names it.
fn lone_socket() -> (std::os::fd::OwnedFd, String) {
    let (_peer, sock) = Stream::pair().unwrap();
    let link = link_of(sock.as_fd());
    (sock.into(), link)
}

/// A pipe opened read-write (through `/proc/self/fd`), its own ends
/// closed, and the link that names it.
fn pipe_read_write() -> (std::os::fd::OwnedFd, String) {
    use std::os::fd::AsRawFd;
    let (reader, _writer) = crate::sys::pipe::pipe().unwrap();
    let path = format!("/proc/self/fd/{}", reader.as_raw_fd());
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let link = link_of(fd.as_fd());
    (fd.into(), link)
}

/// `req` with `bad` (of the wrong kind) is refused in its ack and `bad`
/// closed (`released`); `req` with `good` is then acked, and the
/// connection ends only when we close it.
fn refused_for_its_kind(
    protocol: P,
    req: &Request<'_>,
    bad: std::os::fd::OwnedFd,
    released: impl FnOnce() -> bool,
    good: BorrowedFd<'_>,
) {
    let (s, ended) = runtime(P::REPLY_ACK | protocol);
    negotiate(&s, P::REPLY_ACK | protocol);
    refused_in_the_ack(&s, &ended, req, bad, released, good);
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

#[test]
fn a_socket_as_a_memory_region_is_refused_in_the_ack() {
    let (bad, link) = lone_socket();
    let good = memfd::create("region-after-socket", RAM).unwrap();
    refused_for_its_kind(
        P::empty(),
        &Request::SetMemTable(MemTable::new(&[REGION]).unwrap()),
        bad,
        || link_gone(&link),
        good.as_fd(),
    );
}

#[test]
fn an_eventfd_as_an_added_region_is_refused_in_the_ack() {
    const COUNT: u64 = 0xadd_0e7e;
    let good = memfd::create("added-after-eventfd", RAM).unwrap();
    refused_for_its_kind(
        P::CONFIGURE_MEM_SLOTS,
        &Request::AddMemReg(REGION),
        eventfd_counting(COUNT),
        || eventfd_gone(COUNT),
        good.as_fd(),
    );
}

#[test]
fn a_pipe_opened_read_write_as_the_inflight_area_is_refused_in_the_ack() {
    let size = vhost_user_core::inflight::area_size(1, SIZE).unwrap();
    let (bad, link) = pipe_read_write();
    let good = memfd::create("inflight-after-pipe", size).unwrap();
    let req = Request::SetInflightFd(vhost_user_core::message::InflightMsg {
        mmap_size: size,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: SIZE,
    });
    refused_for_its_kind(
        P::INFLIGHT_SHMFD,
        &req,
        bad,
        || link_gone(&link),
        good.as_fd(),
    );
}

#[test]
fn an_eventfd_as_the_back_end_channel_is_refused_in_the_ack() {
    const COUNT: u64 = 0xc4a_77e1;
    let (_ours, theirs) = Stream::pair().unwrap();
    refused_for_its_kind(
        P::BACKEND_REQ,
        &Request::SetBackendReqFd,
        eventfd_counting(COUNT),
        || eventfd_gone(COUNT),
        theirs.as_fd(),
    );
}

/// A Unix socket, but one that does not keep the byte stream the
/// channel's messages are framed in.
#[test]
fn a_datagram_socket_as_the_back_end_channel_is_refused_in_the_ack() {
    let (_peer, datagram) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let link = link_of(datagram.as_fd());
    let (_ours, theirs) = Stream::pair().unwrap();
    refused_for_its_kind(
        P::BACKEND_REQ,
        &Request::SetBackendReqFd,
        datagram.into(),
        || link_gone(&link),
        theirs.as_fd(),
    );
}

/// Shared memory `short` bytes long, for `req` that maps it up to byte
/// `end`: refused in the ack (a mapping past a file's end faults when
/// accessed) and closed; a file `end` bytes long is taken after it.
fn a_short_file_is_refused_in_the_ack(protocol: P, req: &Request<'_>, short: u64, end: u64) {
    let name = format!("short-{}", req.code().id());
    let bad = memfd::create(&name, short).unwrap();
    let good = memfd::create("long-enough", end).unwrap();
    refused_for_its_kind(protocol, req, bad, || memfd_gone(&name), good.as_fd());
}

#[test]
fn a_memory_region_fd_shorter_than_the_region_is_refused_in_the_ack() {
    a_short_file_is_refused_in_the_ack(
        P::empty(),
        &Request::SetMemTable(MemTable::new(&[REGION]).unwrap()),
        RAM / 2,
        RAM,
    );
}

#[test]
fn an_added_region_past_its_fd_s_end_is_refused_in_the_ack() {
    let region = MemRegionMsg {
        mmap_offset: RAM,
        ..REGION
    };
    a_short_file_is_refused_in_the_ack(
        P::CONFIGURE_MEM_SLOTS,
        &Request::AddMemReg(region),
        RAM,
        2 * RAM,
    );
}

#[test]
fn an_inflight_area_past_its_fd_s_end_is_refused_in_the_ack() {
    let size = vhost_user_core::inflight::area_size(1, SIZE).unwrap();
    let req = Request::SetInflightFd(vhost_user_core::message::InflightMsg {
        mmap_size: size,
        mmap_offset: 4096,
        num_queues: 1,
        queue_size: SIZE,
    });
    a_short_file_is_refused_in_the_ack(P::INFLIGHT_SHMFD, &req, size, 4096 + size);
}

/// `/dev/urandom` opened read-write: a character device, the kind a DAX
/// device is, but one whose driver maps nothing.
fn urandom() -> std::os::fd::OwnedFd {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/urandom")
        .unwrap()
        .into()
}

#[test]
fn a_character_device_that_does_not_map_is_refused_as_a_memory_region() {
    let good = memfd::create("region-after-urandom", RAM).unwrap();
    refused_for_its_kind(
        P::empty(),
        &Request::SetMemTable(MemTable::new(&[REGION]).unwrap()),
        urandom(),
        || link_gone("/dev/urandom"),
        good.as_fd(),
    );
}

#[test]
fn a_character_device_that_does_not_map_is_refused_as_the_inflight_area() {
    let size = vhost_user_core::inflight::area_size(1, SIZE).unwrap();
    let good = memfd::create("inflight-after-urandom", size).unwrap();
    let req = Request::SetInflightFd(vhost_user_core::message::InflightMsg {
        mmap_size: size,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: SIZE,
    });
    refused_for_its_kind(
        P::INFLIGHT_SHMFD,
        &req,
        urandom(),
        || link_gone("/dev/urandom"),
        good.as_fd(),
    );
}

/// A call fd whose writes fail is reported once per SET_VRING_CALL that
/// sets it: again after the ring's restart with the same fd set again,
/// not after a restart that keeps it.
#[test]
fn a_failing_call_fd_is_reported_once_each_time_it_is_set() {
    let (s, ended) = runtime(P::empty());
    // Every write to /dev/full fails (ENOSPC).
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let err = EventFd::new(true).unwrap();
    let kick = EventFd::new(true).unwrap();
    let ram = start_ring_with(&s, full.as_fd(), Some(err.as_fd()), kick.as_fd());
    wait_used(&ram, 1);
    let first = err.wait(Some(Duration::from_secs(2))).unwrap();
    // Stopped, set again with the same fd, restarted, a request served.
    let base1 = vring_base(&s, Duration::from_secs(5));
    send(&s, &Request::SetVringCall(RING0), &[full.as_fd()]);
    send(&s, &Request::SetVringKick(RING0), &[kick.as_fd()]);
    second_request(&ram, &kick);
    wait_used(&ram, 2);
    let second = err.wait(Some(Duration::from_secs(2))).unwrap();
    // Stopped and restarted with it kept: not reported again.
    let base2 = vring_base(&s, Duration::from_secs(5));
    send(&s, &Request::SetVringKick(RING0), &[kick.as_fd()]);
    ram.write_all_at(&[0, 0, 3, 0, 0, 0, 0, 0], AVAIL).unwrap();
    kick.write(1).unwrap();
    wait_used(&ram, 3);
    let third = err.wait(Some(Duration::from_millis(200))).unwrap();
    drop(s);
    let end = ended.recv_timeout(Duration::from_secs(5));
    assert_eq!(first, Some(1), "not reported when first set");
    assert_eq!(second, Some(1), "not reported when set again");
    assert_eq!(third, None, "reported again without being set again");
    assert_eq!((base1.unwrap(), base2.unwrap()), (1, 2));
    assert!(matches!(end, Ok(ConnectionEnd::Closed)), "{end:?}");
}

/// A request that waited for the disk but completed in the very round
/// that popped it (the disk answered while the worker was held up: here,
/// released before it came) does not set the worker spinning as a quick
/// one would: it asks for kicks again at once (used.flags' NO_NOTIFY
/// cleared), not after the spin.
#[test]
fn a_slow_request_done_in_the_round_that_popped_it_starts_no_spin() {
    let mut device = Holds::new(true);
    device.slow = true;
    device.release();
    let options = RuntimeOptions {
        spin: Duration::from_secs(3),
        ..RuntimeOptions::default()
    };
    let (s, _ended) = runtime_for(device.clone(), P::empty(), options, Control::new());
    let call = EventFd::new(true).unwrap();
    let kick = EventFd::new(true).unwrap();
    let ram = start_ring(&s, &call, &kick);
    wait_used(&ram, 1);
    let t0 = Instant::now();
    loop {
        let mut flags = [0u8; 2];
        ram.read_exact_at(&mut flags, USED).unwrap();
        if u16::from_le_bytes(flags) & 1 == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "kicks still suppressed {:?} after a slow request: the worker spins",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(vring_base(&s, Duration::from_secs(5)).unwrap(), 1);
}

/// A ring has its worker thread to itself when no other ring maps to the
/// same thread (`q % threads`; 0 threads: one per ring), and the thread
/// map says the same.
#[test]
fn a_ring_alone_on_its_thread() {
    let with = |threads| RuntimeOptions {
        threads,
        ..RuntimeOptions::default()
    };
    let alone = |o: &RuntimeOptions, n: u16| (0..n).map(|q| o.alone(q, n)).collect::<Vec<_>>();
    assert_eq!(alone(&with(0), 3), [true, true, true]);
    assert_eq!(alone(&with(1), 1), [true]);
    assert_eq!(alone(&with(1), 2), [false, false]);
    assert_eq!(alone(&with(2), 2), [true, true]);
    assert_eq!(alone(&with(2), 3), [false, true, false]);
    assert_eq!(
        with(2).thread_map(3),
        ["queue 0,2 -> thread 0", "queue 1 -> thread 1"]
    );
}

//! The vhost-user-net service over a tap whose front-end renegotiates
//! the virtio-net header length while frames flow, in each direction:
//! the service in this process, `vhost-user-test`'s [`Pair`] as the
//! front-end and the guest, the tap in a network namespace of its own
//! (needs root; skipped otherwise), captured with a raw packet socket
//! for the transmit side. The two tests take turns (each floods its
//! tap).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vhost_user_core::backend::BackendConfig;
use vhost_user_core::device::net::{NetConfig, NetDevice, NetFeatures};
use vhost_user_core::device::Device;
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_core::memory::GuestMemory;
use vhost_user_test::{region, Backend, Buf, GuestRing, Pair, RingSpec};
use vhu_examples::net::{NetBackend, NetService};

const MIB: u64 = 1 << 20;
/// Entries of each ring.
const SIZE: u16 = 64;
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
/// Where the guest's buffers start.
const BUFS: u64 = 0x10_0000;
/// Where the guest's transmit buffers start, [`SLOT`] bytes apart.
const SLOT: u64 = 2048;
/// The MTU offered: the device refuses a frame (without GSO) longer than
/// it, its Ethernet header and a VLAN tag.
const MTU: u16 = 1500;
/// The longest frame the device takes: [`MTU`] + 14 + 4.
const MAX_FRAME: usize = 1518;
/// The guest's buffers: a 12-byte header and a frame of [`MAX_FRAME`]
/// bytes.
const BUF_LEN: usize = 12 + MAX_FRAME;

/// A started service over tap `dev` offering `mtu`, one queue pair of
/// [`SIZE`] entries; the guest's receive and transmit rings.
fn rig(dev: &str, mtu: Option<u16>) -> (Pair<NetService, 2, 8>, GuestRing, GuestRing) {
    let config = NetConfig {
        mtu,
        ..NetConfig::new()
    };
    let dev_model = NetDevice::new(&config).unwrap();
    let offered = dev_model.offered_features() | V::VERSION_1 | V::PROTOCOL_FEATURES;
    let service = NetService::new(
        dev_model,
        NetBackend::Tap {
            name: dev.to_string(),
        },
    )
    .unwrap();
    let protocol = P::MQ | P::REPLY_ACK | P::CONFIG;
    let config = BackendConfig {
        features: offered,
        protocol_features: protocol,
        num_queues: 2,
        max_queue_size: 256,
    };
    let be = Backend::new(config, service, &[(0, 4 * MIB)]).unwrap();
    let rx = RingSpec::split(SIZE, RX_RING);
    let tx = RingSpec::split(SIZE, TX_RING);
    let mut fc = FrontendConfig::new(offered, protocol);
    fc.queues.push(rx.queue(0)).unwrap();
    fc.queues.push(tx.queue(0)).unwrap();
    fc.regions.push(region(0, 4 * MIB)).unwrap();
    let mut p = Pair::new(be, fc).unwrap();
    let rx = rx.lay_out(&p.be.mem).unwrap();
    let tx = tx.lay_out(&p.be.mem).unwrap();
    p.drive();
    p.start().unwrap();
    (p, rx, tx)
}

/// A network namespace the calling thread joins (and the threads it
/// then starts, the tap reader among them), so a tap made there leaves
/// the host's networking alone; deleted on drop.
struct Netns(String);

impl Netns {
    fn enter(tag: &str) -> Option<Netns> {
        let name = format!("vhu-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let _ = ip(&["netns", "del", &name]);
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns(name);
        let f = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).ok()?;
        // SAFETY: setns takes no pointer; `f` is open for the call. It
        // moves only this thread.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        (r == 0).then_some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// Taken by each test for its run: the two flood their taps.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The frame the host sends out of the tap, numbered `i`.
fn host_frame(i: u32) -> [u8; 64] {
    let mut f = [0u8; 64];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f[14..18].copy_from_slice(&i.to_be_bytes());
    f
}

/// A raw packet socket (AF_PACKET, every protocol) and the link-layer
/// address of interface `dev`, for `sendto` or `bind`.
fn packet_socket(dev: &str) -> (libc::c_int, libc::sockaddr_ll) {
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: `name` is a NUL-terminated string live for the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {name:?}");
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket takes no pointer.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
    let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    at.sll_family = libc::AF_PACKET as u16;
    at.sll_protocol = proto;
    at.sll_ifindex = index as i32;
    (fd, at)
}

/// Sends [`host_frame`]s out of interface `dev` (AF_PACKET) until `stop`.
fn flood(dev: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    let dev = dev.to_string();
    std::thread::spawn(move || {
        let (fd, mut to) = packet_socket(&dev);
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let mut sent = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let f = host_frame(sent);
            // SAFETY: `f` and `to` are live for the call, of the lengths
            // given; `fd` is our open socket.
            let n = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    std::ptr::from_ref(&to).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n > 0 {
                sent += 1;
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: `fd` is ours, closed once.
        unsafe { libc::close(fd) };
        sent
    })
}

/// The front-end renegotiates the virtio-net header length (12 bytes
/// with VERSION_1, 10 without) again and again while the tap floods the
/// receive side: no frame the tap reader read under one length may reach
/// the guest under the other (its bytes shifted by the 2 bytes of
/// difference). Needs root (a tap in a network namespace).
#[test]
fn a_header_length_change_lets_no_frame_through_with_the_old_layout() {
    let _turn = one_at_a_time();
    let Some(_ns) = Netns::enter("renego") else {
        eprintln!("skipped: no network namespace (not root?)");
        return;
    };
    let dev = "vhurenego0";
    let (mut p, mut rx, _tx) = rig(dev, None);
    let up = std::process::Command::new("ip")
        .args(["link", "set", dev, "up"])
        .status()
        .unwrap();
    assert!(up.success());
    let stop = Arc::new(AtomicBool::new(false));
    let sender = flood(dev, Arc::clone(&stop));
    const BUF: u64 = 2048;
    let mut slot_of = std::collections::HashMap::new();
    let mut free: Vec<u64> = (0..u64::from(SIZE)).collect();
    let mut service = p.be.device.clone();
    let mut bad = Vec::new();
    let mut delivered = 0usize;
    let t0 = Instant::now();
    let mut rounds = 0;
    while rounds < 400 && t0.elapsed() < Duration::from_secs(20) {
        rounds += 1;
        let features = if rounds % 2 == 0 {
            V::VERSION_1 | NetFeatures::MRG_RXBUF.to_virtio()
        } else {
            V::empty()
        };
        service.features_acked(features);
        let hdr_len = if rounds % 2 == 0 { 12 } else { 10 };
        while let Some(s) = free.pop() {
            let id = rx
                .post(&p.be.mem, &[Buf::writable(BUFS + s * BUF, BUF as u32)])
                .unwrap();
            slot_of.insert(id, s);
        }
        // What the reader queued since the change, delivered.
        let until = Instant::now() + Duration::from_millis(3);
        while Instant::now() < until {
            p.be.serve(0).unwrap();
        }
        for u in rx.harvest_all(&p.be.mem).unwrap() {
            let s = slot_of.remove(&u.id).unwrap();
            free.push(s);
            if u.len == 0 {
                continue;
            }
            delivered += 1;
            // Ours start with the same 14 bytes; the host's own (IPv6
            // multicast as the link comes up) are let be. One read under
            // the other header length is ours shifted by 2 bytes.
            let at = BUFS + s * BUF + hdr_len - 2;
            let got = p.be.mem.read_vec(at, 18).unwrap();
            let ours = &host_frame(0)[..14];
            let shifted = got[..14] == *ours || got[4..] == *ours;
            if shifted || (got[2..16] == *ours && u64::from(u.len) != hdr_len + 64) {
                bad.push((rounds, hdr_len, u.len, got));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let drops =
        p.be.device
            .counters(0)
            .unwrap()
            .drops
            .load(Ordering::Relaxed);
    assert!(delivered > 0, "nothing delivered ({sent} frames sent)");
    assert!(
        drops > 0,
        "the frames dropped at the changes were not counted"
    );
    assert!(
        bad.is_empty(),
        "{} of {delivered} frames delivered with another header layout in {rounds} renegotiations, first {:?}",
        bad.len(),
        bad.first()
    );
}

/// The Ethernet header of the guest's frames (broadcast, a local
/// experimental ethertype).
const ETH: [u8; 14] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 2, 0x88, 0xb5,
];

/// The guest's buffer for frame `i`: a 12-byte virtio-net header (no
/// offloads; `num_buffers`, which a 10-byte header does not have, set
/// to 0xabcd) and a frame of [`MAX_FRAME`] bytes. Under the 12-byte
/// layout the frame is as long as the device takes; read under the
/// 10-byte one it is 2 bytes longer, and refused.
fn guest_buf(i: u32) -> Vec<u8> {
    let mut b = vec![0u8; BUF_LEN];
    b[10..12].copy_from_slice(&[0xcd, 0xab]);
    b[12..26].copy_from_slice(&ETH);
    b[26..30].copy_from_slice(&i.to_be_bytes());
    for (k, x) in b[30..].iter_mut().enumerate() {
        *x = k as u8;
    }
    b
}

/// Frames seen on the tap's host side: ours as sent, and ours read by
/// the tap under another header length than the one they were framed
/// with.
#[derive(Default)]
struct Seen {
    good: AtomicU64,
    bad: AtomicU64,
    /// The first bad frame's length and first bytes.
    first_bad: std::sync::Mutex<Option<(usize, Vec<u8>)>>,
}

/// Captures what enters the host from interface `dev` (AF_PACKET)
/// until `stop`, sorting our frames into `seen`.
fn capture(dev: &str, stop: Arc<AtomicBool>, seen: Arc<Seen>) -> std::thread::JoinHandle<()> {
    let (fd, at) = packet_socket(dev);
    // SAFETY: `at` is live for the call, of the length given; `fd` is
    // our open socket.
    let r = unsafe {
        libc::bind(
            fd,
            std::ptr::from_ref(&at).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    let rcvbuf: libc::c_int = 8 << 20;
    // SAFETY: the options point to live values of the lengths given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&rcvbuf).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let ours = &guest_buf(0)[12..26];
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `buf` is writable for its length; `fd` is ours.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            let f = &buf[..n];
            if n >= 14 && f[..14] == *ours {
                if n == MAX_FRAME {
                    seen.good.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            } else if !(n >= 16 && f[2..16] == *ours) {
                // Not ours: the host's own (IPv6 as the link comes up).
                continue;
            }
            // Ours at another length, or shifted by the 2 bytes the
            // header lengths differ by.
            seen.bad.fetch_add(1, Ordering::Relaxed);
            seen.first_bad
                .lock()
                .unwrap()
                .get_or_insert_with(|| (n, f[..20].to_vec()));
        }
        // SAFETY: `fd` is ours, closed once.
        unsafe { libc::close(fd) };
    })
}

/// The front-end renegotiates the virtio-net header length (12 bytes
/// with VERSION_1, 10 without; MTU acked either way) again and again on
/// a thread of its own while the guest transmits: a frame the service
/// framed with one length must reach the tap while the tap reads that
/// length. The guest's frames are sized so that the service takes them
/// only under the 12-byte layout; one taken under it and read by the
/// tap at 10 bytes would enter the host 2 bytes longer than the MTU
/// allows, starting with the header's `num_buffers`. Needs root (a tap
/// in a network namespace).
#[test]
fn a_header_length_change_lets_no_transmitted_frame_reach_the_tap_with_the_old_layout() {
    let _turn = one_at_a_time();
    let Some(_ns) = Netns::enter("txrenego") else {
        eprintln!("skipped: no network namespace (not root?)");
        return;
    };
    let dev = "vhutxrenego0";
    let (mut p, _rx, mut tx) = rig(dev, Some(MTU));
    let up = std::process::Command::new("ip")
        .args(["link", "set", dev, "up"])
        .status()
        .unwrap();
    assert!(up.success());
    let stop = Arc::new(AtomicBool::new(false));
    let captured = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let catcher = capture(dev, Arc::clone(&captured), Arc::clone(&seen));
    let with = V::VERSION_1 | NetFeatures::MTU.to_virtio();
    let without = NetFeatures::MTU.to_virtio();
    let mut service = p.be.device.clone();
    service.features_acked(with);
    // The front-end: renegotiates until told to stop.
    let toggles = Arc::new(AtomicU64::new(0));
    let toggler = {
        let (stop, toggles) = (Arc::clone(&stop), Arc::clone(&toggles));
        let mut service = service.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = toggles.fetch_add(1, Ordering::Relaxed);
                service.features_acked(if n % 2 == 0 { without } else { with });
                std::thread::yield_now();
            }
        })
    };
    // The guest: keeps the transmit ring full, the service's worker
    // (this thread) transmits.
    let mut free: Vec<u64> = (0..u64::from(SIZE)).collect();
    let mut slot_of = std::collections::HashMap::new();
    let mut posted = 0u32;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        while let Some(s) = free.pop() {
            let at = BUFS + s * SLOT;
            p.be.mem.write(at, &guest_buf(posted)).unwrap();
            let id = tx
                .post(&p.be.mem, &[Buf::readable(at, BUF_LEN as u32)])
                .unwrap();
            slot_of.insert(id, s);
            posted += 1;
        }
        p.be.serve(1).unwrap();
        for u in tx.harvest_all(&p.be.mem).unwrap() {
            free.push(slot_of.remove(&u.id).unwrap());
        }
    }
    stop.store(true, Ordering::Relaxed);
    toggler.join().unwrap();
    // What the tap took is in the host by now; the capture reads it.
    std::thread::sleep(Duration::from_millis(200));
    captured.store(true, Ordering::Relaxed);
    catcher.join().unwrap();
    let toggles = toggles.load(Ordering::Relaxed);
    let good = seen.good.load(Ordering::Relaxed);
    let bad = seen.bad.load(Ordering::Relaxed);
    eprintln!("{posted} frames posted, {toggles} renegotiations: {good} intact, {bad} bad");
    assert!(toggles > 100, "only {toggles} renegotiations in the run");
    assert!(good > 0, "no frame reached the host ({posted} posted)");
    assert_eq!(
        bad,
        0,
        "{bad} of {} frames reached the host read under another header length in {toggles} renegotiations, first (length, bytes) {:?}",
        good + bad,
        seen.first_bad.lock().unwrap()
    );
}

//! The vhost-user-net service over a tap whose front-end renegotiates
//! the virtio-net header length while frames flow: the service in this
//! process, `vhost-user-test`'s [`Pair`] as the front-end and the guest,
//! the tap in a network namespace of its own (needs root; skipped
//! otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost_user_core::backend::BackendConfig;
use vhost_user_core::device::net::{NetConfig, NetDevice, NetFeatures};
use vhost_user_core::device::Device;
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_test::{region, Backend, Buf, GuestRing, Pair, RingSpec};
use vhu_examples::net::{NetBackend, NetService};

const MIB: u64 = 1 << 20;
/// Entries of each ring.
const SIZE: u16 = 64;
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
/// Where the guest's receive buffers start.
const BUFS: u64 = 0x10_0000;

/// A started service over tap `dev`, one queue pair of [`SIZE`] entries.
fn rig(dev: &str) -> (Pair<NetService, 2, 8>, GuestRing) {
    let dev_model = NetDevice::new(&NetConfig::new()).unwrap();
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
    let _tx = tx.lay_out(&p.be.mem).unwrap();
    p.drive();
    p.start().unwrap();
    (p, rx)
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

/// The frame the host sends out of the tap, numbered `i`.
fn host_frame(i: u32) -> [u8; 64] {
    let mut f = [0u8; 64];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f[14..18].copy_from_slice(&i.to_be_bytes());
    f
}

/// Sends [`host_frame`]s out of interface `dev` (AF_PACKET) until `stop`.
fn flood(dev: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    let name = std::ffi::CString::new(dev).unwrap();
    std::thread::spawn(move || {
        // SAFETY: `name` is a NUL-terminated string live for the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no interface {name:?}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket takes no pointer.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = proto;
        to.sll_ifindex = index as i32;
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
    let Some(_ns) = Netns::enter("renego") else {
        eprintln!("skipped: no network namespace (not root?)");
        return;
    };
    let dev = "vhurenego0";
    let (mut p, mut rx) = rig(dev);
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
    let t0 = std::time::Instant::now();
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
        let until = std::time::Instant::now() + Duration::from_millis(3);
        while std::time::Instant::now() < until {
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

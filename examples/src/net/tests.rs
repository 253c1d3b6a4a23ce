//! The net service in one process: `adapter-test`'s [`Pair`] plays the
//! front-end and the runtime, its memory and drivers the guest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use vhost_user_core::backend::BackendConfig;
use vhost_user_core::device::net::{NetConfig, NetDevice};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::frontend::FrontendConfig;
use vhost_user_test::{region, Backend, Buf, GuestRing, Pair, RingSpec};

use super::{NetBackend, NetService, LOOPBACK_BYTES};

const MIB: u64 = 1 << 20;
/// Entries of each ring.
const SIZE: u16 = 64;
/// Where the receive and the transmit rings live.
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
/// Where the guest's buffers start.
const BUFS: u64 = 0x10_0000;

/// A started service over `backend` with one queue pair of [`SIZE`]
/// entries, split rings, VERSION_1 and MRG_RXBUF acked.
fn rig(backend: NetBackend) -> (Pair<NetService, 2, 8>, GuestRing, GuestRing) {
    rig_with(&NetConfig::new(), backend)
}

/// [`rig`] for the device `config` describes.
fn rig_with(
    config: &NetConfig,
    backend: NetBackend,
) -> (Pair<NetService, 2, 8>, GuestRing, GuestRing) {
    let dev = NetDevice::new(config).unwrap();
    let offered = dev.offered_features() | V::VERSION_1 | V::PROTOCOL_FEATURES;
    let service = NetService::new(dev, backend).unwrap();
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
    assert!(p.be.ring(0).is_some() && p.be.ring(1).is_some());
    (p, rx, tx)
}

/// Runs `f` on a thread; panics if it does not return within 10 s (the
/// thread is left behind, spinning).
fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (send, recv) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(f());
    });
    recv.recv_timeout(Duration::from_secs(10))
        .expect("the receive ring's worker did not come back")
}

/// With MRG_RXBUF, a guest that posts only header-sized receive buffers,
/// more than a frame may span, cannot take the null backend's template:
/// the frame is dropped, and the worker comes back (it once tried the
/// same template against the same chains forever).
#[test]
fn null_template_too_big_for_the_most_chains_a_frame_may_span() {
    let (mut p, mut rx, _tx) = rig(NetBackend::null(1000, [0x52, 0x54, 0, 0, 0, 1]));
    for i in 0..u64::from(SIZE) {
        rx.post(&p.be.mem, &[Buf::writable(BUFS + i * 16, 12)])
            .unwrap();
    }
    let (mut p, mut rx) = within_10s(move || {
        p.be.serve(0).unwrap();
        (p, rx)
    });
    // The oldest chain came back empty; the others wait for a frame.
    let used = rx.harvest_all(&p.be.mem).unwrap();
    assert_eq!(
        used.iter().map(|u| (u.id, u.len)).collect::<Vec<_>>(),
        [(0, 0)]
    );
    let k = p.be.device.clone();
    let k = k.counters(0).unwrap();
    assert_eq!(k.drops.load(Ordering::Relaxed), 1);
    assert_eq!(k.packets.load(Ordering::Relaxed), 0);
    // A buffer with room for the rest: the frame spans all of them.
    rx.post(&p.be.mem, &[Buf::writable(BUFS + 0x1000, 2048)])
        .unwrap();
    assert_eq!(p.be.serve(0).unwrap(), usize::from(SIZE));
    assert_eq!(k.packets.load(Ordering::Relaxed), 1);
}

/// A guest that transmits the largest frames its MTU allows and posts no
/// receive buffers has the loopback hold at most [`LOOPBACK_BYTES`] of
/// them; the rest are dropped and counted (the count bound alone held
/// 1024 such frames: 64 MiB).
#[test]
fn loopback_holds_at_most_its_bytes_for_a_guest_that_does_not_receive() {
    let mut config = NetConfig::new();
    config.mtu = Some(65535);
    let (mut p, _rx, mut tx) = rig_with(&config, NetBackend::Loopback);
    const FRAME: usize = 1 << 16;
    const ROUNDS: usize = 3;
    // One buffer, the header then the frame, for every chain.
    for _ in 0..ROUNDS {
        for _ in 0..SIZE {
            tx.post(&p.be.mem, &[Buf::readable(BUFS, (12 + FRAME) as u32)])
                .unwrap();
        }
        assert_eq!(p.be.serve(1).unwrap(), usize::from(SIZE));
        assert_eq!(tx.harvest_all(&p.be.mem).unwrap().len(), usize::from(SIZE));
    }
    let sent = ROUNDS * usize::from(SIZE);
    let fit = LOOPBACK_BYTES / FRAME;
    assert!(fit < sent);
    let k = p.be.device.clone();
    let k = k.counters(1).unwrap();
    assert_eq!(k.packets.load(Ordering::Relaxed), sent as u64);
    assert_eq!(k.drops.load(Ordering::Relaxed), (sent - fit) as u64);
    assert_eq!(p.be.device.queued(0), Some((fit, fit * FRAME)));
}

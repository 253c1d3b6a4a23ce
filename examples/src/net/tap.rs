//! The tap backend's pieces: the offloads offered and set, the frame
//! SEND_RARP announces, and the reader that moves frames from a tap
//! queue to its pair's receive side.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use vhost_user_core::device::net::{NetFeatures, VirtioNetHdr, ETH_HLEN, VLAN_HLEN};
use vhost_user_linux::backend::bump;
use vhost_user_linux::sys::tap::{offload, Tap};
use zerocopy::FromBytes;

use super::{lock, Frame, Inner};

/// The largest frame a tap carries either way: a 64 KiB IP packet
/// (segmentation offloads) with its Ethernet header and a VLAN tag.
pub const TAP_MAX_FRAME: usize = 65535 + ETH_HLEN + VLAN_HLEN;

/// The virtio-net offloads the tap backend offers: partial checksums and
/// TCP segmentation, both ways (the kernel's tap takes and gives them
/// with the virtio-net header).
pub const TAP_OFFLOADS: NetFeatures = NetFeatures::CSUM
    .union(NetFeatures::GUEST_CSUM)
    .union(NetFeatures::GUEST_TSO4)
    .union(NetFeatures::GUEST_TSO6)
    .union(NetFeatures::GUEST_ECN)
    .union(NetFeatures::HOST_TSO4)
    .union(NetFeatures::HOST_TSO6)
    .union(NetFeatures::HOST_ECN);

/// The TUNSETOFFLOAD flags for what the driver accepts (`acked`): the
/// tap may hand over only frames the guest can take. Segmentation needs
/// partial checksums (GUEST_CSUM), ECN a segmentation offload; the kernel
/// refuses the flags otherwise.
pub fn tun_offloads(acked: NetFeatures) -> u32 {
    if !acked.contains(NetFeatures::GUEST_CSUM) {
        return 0;
    }
    let mut f = offload::CSUM;
    if acked.contains(NetFeatures::GUEST_TSO4) {
        f |= offload::TSO4;
    }
    if acked.contains(NetFeatures::GUEST_TSO6) {
        f |= offload::TSO6;
    }
    if f & (offload::TSO4 | offload::TSO6) != 0 && acked.contains(NetFeatures::GUEST_ECN) {
        f |= offload::TSO_ECN;
    }
    if acked.contains(NetFeatures::GUEST_UFO) {
        f |= offload::UFO;
    }
    f
}

/// The gratuitous RARP a moved guest is announced with (RFC 903, as
/// QEMU's self-announcement): broadcast, from `mac`, EtherType 0x8035,
/// Ethernet/IPv4 addresses, opcode 3 (reverse request), sender and target
/// hardware address `mac`, protocol addresses zero, padded to the 60
/// bytes of a minimal Ethernet frame.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

/// Attaches `pairs` queues of tap `name` (multi-queue when more than
/// one), each with a `hdr_len`-byte header and no offloads until the
/// driver's features say which.
pub fn open_pairs(name: &str, pairs: u16, hdr_len: usize) -> io::Result<Vec<Arc<Tap>>> {
    (0..pairs)
        .map(|_| {
            let t = Tap::open(name, pairs > 1)?;
            t.set_vnet_hdr_len(hdr_len)?;
            t.set_offload(0)?;
            Ok(Arc::new(t))
        })
        .collect()
}

/// Moves frames from tap queue `tap` to pair `pair`'s receive side: reads
/// while the pair's receive ring runs and its queue has room (else waits
/// for the ring or for room: a guest that does not receive leaves the
/// frames to the tap, which drops them), signals the pair's eventfd after
/// each batch. Ends when the service is gone.
pub(super) fn reader(inner: Weak<Inner>, pair: usize, tap: Arc<Tap>) {
    let mut buf = vec![0u8; TAP_MAX_FRAME + VirtioNetHdr::SIZE];
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let Some(p) = inner.pairs.get(pair) else {
            return;
        };
        if p.rx_running.load(Ordering::Relaxed) == 0 {
            // No receive ring runs: the frames stay in the tap (whose
            // own bounded queue drops beyond it, as a NIC that is down).
            // Woken when one starts (or to look at whether the service
            // is still there).
            let q = lock(&p.frames);
            if p.rx_running.load(Ordering::Relaxed) == 0 {
                let _ = p.space.wait_timeout(q, Duration::from_millis(100));
            }
            continue;
        }
        let mut pushed = false;
        let mut full = false;
        while p.rx_running.load(Ordering::Relaxed) != 0 {
            // Room for the largest frame, so the one read is kept.
            if !lock(&p.frames).has_room(TAP_MAX_FRAME) {
                full = true;
                break;
            }
            // The mode before the read: the frame is kept only if it is
            // still the same, and stable, after it (see `RxMode`).
            let mode = inner.mode();
            if mode.changing() {
                break;
            }
            let hdr_len = mode.hdr_len;
            match tap.read(&mut buf) {
                Ok(n) if n >= hdr_len + ETH_HLEN => {
                    let mut hdr = VirtioNetHdr::default();
                    if let Ok((h, _)) = VirtioNetHdr::read_from_prefix(&buf[..VirtioNetHdr::SIZE]) {
                        hdr = h;
                    }
                    if hdr_len < VirtioNetHdr::SIZE {
                        hdr.num_buffers = 0.into();
                    }
                    // Only this thread adds to the queue: the room looked
                    // at above is still there.
                    let mut q = lock(&p.frames);
                    if inner.mode() != mode {
                        // The header length may have changed under the
                        // read: the frame is dropped, as on a wire.
                        drop(q);
                        if let Some(k) = inner.counters.get(pair * 2) {
                            bump(&k.drops, 1);
                        }
                    } else if q
                        .push(Frame {
                            hdr,
                            data: buf[hdr_len..n].to_vec(),
                            gen: mode.gen,
                        })
                        .is_ok()
                    {
                        pushed = true;
                    }
                }
                Ok(n) => log::debug!("tap {}: runt frame of {n} bytes dropped", tap.name()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("tap {}: read failed: {e}", tap.name());
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
        if pushed {
            let _ = p.ready.write(1);
        }
        if full {
            // Woken when the receive side takes frames (or to look at
            // whether the service is still there).
            let q = lock(&p.frames);
            if !q.has_room(TAP_MAX_FRAME) {
                let _ = p.space.wait_timeout(q, Duration::from_millis(100));
            }
            continue;
        }
        drop(inner);
        if let Err(e) = tap.wait_readable(Duration::from_millis(100)) {
            log::warn!("tap {}: poll failed: {e}", tap.name());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_flags_follow_what_the_driver_takes() {
        use NetFeatures as F;
        assert_eq!(tun_offloads(F::empty()), 0);
        // Segmentation without partial checksums: nothing.
        assert_eq!(tun_offloads(F::GUEST_TSO4 | F::GUEST_TSO6), 0);
        assert_eq!(tun_offloads(F::GUEST_CSUM), offload::CSUM);
        assert_eq!(
            tun_offloads(F::GUEST_CSUM | F::GUEST_TSO4 | F::GUEST_ECN),
            offload::CSUM | offload::TSO4 | offload::TSO_ECN
        );
        // ECN without segmentation is not a flag the kernel takes.
        assert_eq!(tun_offloads(F::GUEST_CSUM | F::GUEST_ECN), offload::CSUM);
        assert_eq!(
            tun_offloads(TAP_OFFLOADS | F::GUEST_UFO),
            offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN | offload::UFO
        );
        // Host-side offloads (what the guest sends) set no flag.
        assert_eq!(tun_offloads(F::CSUM | F::HOST_TSO4 | F::HOST_TSO6), 0);
    }

    #[test]
    fn rarp_frame_bytes() {
        let f = rarp_frame([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // broadcast
            0x52, 0x54, 0, 0x12, 0x34, 0x56, // source
            0x80, 0x35, // RARP
            0, 1, 8, 0, 6, 4, 0, 3, // Ethernet, IPv4, 6, 4, reverse request
            0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 0, 0, 0, // sender
            0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 0, 0, 0, // target
        ];
        assert_eq!(f[..42], want);
        assert!(f[42..].iter().all(|&b| b == 0));
    }
}

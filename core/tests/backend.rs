//! The back-end session engine driven in memory: `adapter-test`'s
//! [`Backend`] carries out the engine's actions and serves the rings (its
//! [`TestDevice`] fills writable buffers), its guest memory and drivers
//! play the guest, and this file plays the front-end, message by message.

#![allow(clippy::unwrap_used)]

use vhost_user_core::backend::{
    Action, BackendConfig, BackendError, FdAccess, MessageFds, Notifier, Outcome, Reply, Session,
    SUPPORTED_PROTOCOL_FEATURES,
};
use vhost_user_core::feature::{ProtocolFeatures as P, VirtioFeatures as V};
use vhost_user_core::message::{
    ConfigMsg, ConfigWriteKind, FrontendReq, Header, MemTable, ParseOptions, Reply as WireReply,
    Request, VringAddrMsg, VringFdMsg, VringStateMsg, WireError, HEADER_SIZE,
};
use vhost_user_core::vring::state::Processing;
use vhost_user_test::{region, Buf, PackedDriver, SplitDriver, TestDevice};

const RAM: u64 = 1 << 20;

type Fe = vhost_user_test::Backend<TestDevice, 4, 8>;

fn config(protocol: P) -> BackendConfig {
    BackendConfig {
        features: V::VERSION_1
            | V::PROTOCOL_FEATURES
            | V::EVENT_IDX
            | V::INDIRECT_DESC
            | V::RING_PACKED
            | V::from_bits_retain(1 << 9),
        protocol_features: protocol,
        num_queues: 2,
        max_queue_size: 256,
    }
}

fn new_fe(protocol: P) -> Fe {
    fe_with(config(protocol))
}

fn fe_with(c: BackendConfig) -> Fe {
    Fe::new(c, TestDevice::default(), &[(0, RAM)]).unwrap()
}

/// The worker serves ring `q`, writing `fill` into each writable buffer.
fn serve(fe: &mut Fe, q: u16, fill: u8) -> usize {
    fe.device.fill = fill;
    fe.serve(q).unwrap()
}

/// The front-end's side of the scripts.
trait Script {
    fn handshake(&mut self, features: V);
    fn configure(&mut self, q: u32, size: u16, user: vhost_user_core::vring::RingAddrs, base: u32);
    fn kick(&mut self, q: u32) -> Outcome;
}

impl Script for Fe {
    /// QEMU's init and start for ring 0 of a split ring at `base`.
    fn handshake(&mut self, features: V) {
        assert_eq!(
            self.u64_reply(Request::GetFeatures),
            config(P::empty()).features.bits()
        );
        let offered = self.u64_reply(Request::GetProtocolFeatures);
        self.send(&Request::SetProtocolFeatures(offered), false)
            .unwrap();
        self.send(&Request::SetOwner, false).unwrap();
        self.send(&Request::SetFeatures(features.bits()), false)
            .unwrap();
        let t = [region(0, RAM)];
        let (o, _) = self
            .send(&Request::SetMemTable(MemTable::new(&t).unwrap()), false)
            .unwrap();
        assert!(matches!(o.actions[0], Action::UnmapAll));
        assert!(matches!(
            o.actions[1],
            Action::MapRegion { slot: 0, fd: 0, .. }
        ));
    }

    fn configure(&mut self, q: u32, size: u16, user: vhost_user_core::vring::RingAddrs, base: u32) {
        self.send(
            &Request::SetVringNum(VringStateMsg {
                index: q,
                num: size.into(),
            }),
            false,
        )
        .unwrap();
        self.send(
            &Request::SetVringBase(VringStateMsg {
                index: q,
                num: base,
            }),
            false,
        )
        .unwrap();
        let a = VringAddrMsg {
            index: q,
            log: false,
            desc: user.desc,
            used: user.device,
            avail: user.driver,
            log_addr: 0,
        };
        self.send(&Request::SetVringAddr(a), false).unwrap();
    }

    fn kick(&mut self, q: u32) -> Outcome {
        let o = self
            .send(
                &Request::SetVringKick(VringFdMsg {
                    index: q,
                    no_fd: false,
                }),
                false,
            )
            .unwrap()
            .0;
        // A ring that starts starts sound.
        assert_eq!(self.ring(q as u16).and_then(|r| r.error()), None);
        o
    }
}

fn all_protocol() -> P {
    SUPPORTED_PROTOCOL_FEATURES
}

#[test]
fn split_ring_start_process_stop_restart() {
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let mut drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
    fe.configure(0, 16, drv.user_addrs(), 0);
    assert_eq!(fe.session.processing(0), Processing::Stopped);
    // Requests posted before the ring starts are processed without a kick.
    drv.post(
        &fe.mem,
        &[Buf::readable(0x8000, 16), Buf::writable(0x9000, 32)],
    )
    .unwrap();
    let o = fe.kick(0);
    assert!(matches!(
        o.actions[0],
        Action::SetKick {
            queue: 0,
            fd: Some(0)
        }
    ));
    assert!(matches!(o.actions[1], Action::StartRing { queue: 0 }));
    assert!(!fe.ring(0).unwrap().enabled());
    assert_eq!(fe.session.processing(0), Processing::WithoutSideEffects);
    let (o, ack) = fe.ack(Request::SetVringEnable {
        index: 0,
        enable: true,
    });
    assert_eq!(ack, 0);
    assert!(matches!(
        o.actions[0],
        Action::SetEnabled {
            queue: 0,
            enabled: true
        }
    ));
    assert_eq!(fe.session.processing(0), Processing::Normal);
    assert_eq!(serve(&mut fe, 0, 0xab), 1);
    let used = drv.harvest(&fe.mem).unwrap().unwrap();
    assert_eq!(used.len, 32);
    assert_eq!(fe.mem.read_vec(0x9000, 32).unwrap(), vec![0xab; 32]);

    // Stop: GET_VRING_BASE is pending until the worker hands its ring back.
    drv.post(&fe.mem, &[Buf::writable(0x9000, 8)]).unwrap();
    let (o, r) = fe.send(&Request::GetVringBase(0), false).unwrap();
    assert!(r.is_empty());
    assert_eq!(o.reply, Reply::Pending { queue: 0 });
    assert!(matches!(
        o.actions[0],
        Action::StopRing {
            queue: 0,
            suspend: false
        }
    ));
    assert_eq!(fe.session.processing(0), Processing::Stopped);
    // The worker drains (completes what it had) and stops.
    assert_eq!(serve(&mut fe, 0, 0xcd), 1);
    assert_eq!(fe.pending_stop(), Some(0));
    let out = fe.finish_stop(0).unwrap();
    assert_eq!(
        fe.stops.last().unwrap().drained,
        0,
        "nothing is outstanding"
    );
    let h = Header::parse(&out).unwrap();
    assert_eq!(
        WireReply::parse(
            FrontendReq::GetVringBase,
            &h,
            &out[HEADER_SIZE..],
            0,
            &ParseOptions::default()
        ),
        Ok(WireReply::VringState { index: 0, num: 2 })
    );
    // A second finish_stop has nothing to finish.
    assert_eq!(fe.finish_stop(0), Err(BackendError::NotStopping(0)));

    // Restart with the base the front-end got: requests posted while
    // stopped are resumed.
    drv.post(&fe.mem, &[Buf::writable(0xa000, 8)]).unwrap();
    fe.configure(0, 16, drv.user_addrs(), 2);
    let o = fe.kick(0);
    assert!(o
        .actions
        .iter()
        .any(|a| matches!(a, Action::StartRing { queue: 0 })));
    assert!(fe.ring(0).unwrap().enabled());
    assert_eq!(serve(&mut fe, 0, 0xef), 1);
    assert_eq!(drv.harvest_all(&fe.mem).unwrap().len(), 2);
    assert_eq!(fe.mem.read_vec(0xa000, 8).unwrap(), vec![0xef; 8]);
}

#[test]
fn packed_ring_start_and_base_encoding() {
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED);
    let mut drv = PackedDriver::new(&fe.mem, 8, 0x2000).unwrap();
    // Base: avail index 0 with wrap counter 1, used index 0 with wrap 1.
    fe.configure(0, 8, drv.user_addrs(), 1 << 15 | 1 << 31);
    fe.ack(Request::SetVringEnable {
        index: 0,
        enable: true,
    });
    fe.kick(0);
    assert!(fe.ring(0).is_some());
    for i in 0..3 {
        drv.post(&fe.mem, &[Buf::writable(0x8000 + 0x100 * i, 16)])
            .unwrap();
    }
    assert_eq!(serve(&mut fe, 0, 1), 3);
    assert_eq!(drv.harvest_all(&fe.mem).unwrap().len(), 3);
    fe.send(&Request::GetVringBase(0), false).unwrap();
    let out = fe.finish_stop(0).unwrap();
    assert_eq!(
        fe.stops.last().unwrap().drained,
        0,
        "nothing is outstanding"
    );
    let num = u32::from_ne_bytes(out[HEADER_SIZE + 4..HEADER_SIZE + 8].try_into().unwrap());
    assert_eq!(out.len(), HEADER_SIZE + 8);
    // 3 avail and 3 used, both wrap counters still 1.
    assert_eq!(num, 3 | 1 << 15 | 3 << 16 | 1 << 31);
}

/// A packed SET_VRING_BASE of 16 bits (DPDK's virtio-user sends only the
/// avail position and wrap counter): without an inflight area nothing can
/// be in flight, so the used position is the avail one. (With an area the
/// value is the full encoding: what the front-end says is in flight.)
#[test]
fn packed_base_of_sixteen_bits_without_inflight_tracking() {
    for (avail, wrap) in [(0u32, 1u32), (5, 1), (5, 0)] {
        let mut fe = new_fe(all_protocol());
        fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED);
        let drv = PackedDriver::new(&fe.mem, 8, 0x2000).unwrap();
        fe.configure(0, 8, drv.user_addrs(), avail | wrap << 15);
        fe.kick(0);
        let dp = fe.ring(0).unwrap();
        assert_eq!(
            dp.base(),
            avail | wrap << 15 | avail << 16 | wrap << 31,
            "used = avail"
        );
    }
}

#[test]
fn reply_ack_success_and_failure() {
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let (o, v) = fe.ack(Request::SetVringNum(VringStateMsg { index: 1, num: 64 }));
    assert_eq!((v, o.refused), (0, None));
    // Above max_queue_size: refused with a failed ack, the session goes on.
    let (o, v) = fe.ack(Request::SetVringNum(VringStateMsg { index: 1, num: 512 }));
    assert_eq!((v, o.refused), (1, Some(BackendError::QueueSize(512))));
    // The same without NEED_REPLY ends the connection (an error).
    assert_eq!(
        fe.send(
            &Request::SetVringNum(VringStateMsg { index: 1, num: 512 }),
            false
        )
        .err(),
        Some(BackendError::QueueSize(512))
    );
    // Replies carry flags exactly VERSION | REPLY.
    let (_, r) = fe.send(&Request::SetOwner, true).unwrap();
    assert_eq!(u32::from_ne_bytes(r[4..8].try_into().unwrap()), 0x5);
}

#[test]
fn no_ack_without_reply_ack_negotiated() {
    // In-band notifications need REPLY_ACK: not offered either.
    let mut fe = new_fe(all_protocol().difference(P::REPLY_ACK | P::INBAND_NOTIFICATIONS));
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let (o, r) = fe.send(&Request::SetOwner, true).unwrap();
    assert!(r.is_empty());
    assert_eq!(o.reply, Reply::None);
}

#[test]
fn protocol_features_never_offered_are_refused() {
    let mut fe = new_fe(P::MQ | P::REPLY_ACK);
    fe.send(&Request::GetProtocolFeatures, false).unwrap();
    let e = fe
        .send(
            &Request::SetProtocolFeatures((P::MQ | P::INFLIGHT_SHMFD).bits()),
            false,
        )
        .unwrap_err();
    assert!(matches!(e, BackendError::Feature(_)), "{e:?}");
    // And a message gated by a feature that was never negotiated.
    fe.send(&Request::SetProtocolFeatures(P::MQ.bits()), false)
        .unwrap();
    assert_eq!(
        fe.send(&Request::GetStatus, false).err(),
        Some(BackendError::NotNegotiated(FrontendReq::GetStatus))
    );
    // SET_FEATURES with a bit never offered.
    assert!(matches!(
        fe.send(&Request::SetFeatures(V::ACCESS_PLATFORM.bits()), false),
        Err(BackendError::Feature(_))
    ));
}

#[test]
fn every_message_is_handled_or_refused() {
    // Each id 1-45 with a valid payload: either it succeeds or it is refused
    // as not negotiated; nothing else, and nothing panics.
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
    let ua = drv.user_addrs();
    let t = [region(0, RAM)];
    let cfg = [0u8; 4];
    let uuid = [7u8; 16];
    let crypto = [0u8; 32];
    let r0 = region(RAM, 0x1000);
    let inflight = vhost_user_core::message::InflightMsg {
        mmap_size: 4224,
        mmap_offset: 0,
        num_queues: 2,
        queue_size: 64,
    };
    use Request as R;
    let requests: Vec<Request<'_>> = vec![
        R::GetFeatures,
        R::SetFeatures((V::VERSION_1 | V::PROTOCOL_FEATURES).bits()),
        R::SetOwner,
        R::ResetOwner,
        R::SetMemTable(MemTable::new(&t).unwrap()),
        R::SetLogBase(vhost_user_core::message::LogMsg {
            size: 4096,
            offset: 0,
        }),
        R::SetLogFd,
        R::SetVringNum(VringStateMsg { index: 0, num: 16 }),
        R::SetVringAddr(VringAddrMsg {
            index: 0,
            log: false,
            desc: ua.desc,
            used: ua.device,
            avail: ua.driver,
            log_addr: 0,
        }),
        R::SetVringBase(VringStateMsg { index: 0, num: 0 }),
        R::GetVringBase(0),
        R::SetVringKick(VringFdMsg {
            index: 0,
            no_fd: true,
        }),
        R::SetVringCall(VringFdMsg {
            index: 0,
            no_fd: false,
        }),
        R::SetVringErr(VringFdMsg {
            index: 0,
            no_fd: true,
        }),
        R::GetProtocolFeatures,
        R::SetProtocolFeatures(all_protocol().bits()),
        R::GetQueueNum,
        R::SetVringEnable {
            index: 0,
            enable: true,
        },
        R::SendRarp([0; 6]),
        R::NetSetMtu(1500),
        R::SetBackendReqFd,
        R::IotlbMsg(vhost_user_core::message::IotlbMsg {
            iova: 0,
            size: 4096,
            uaddr: 0,
            perm: vhost_user_core::message::IotlbPerm::ReadWrite,
            kind: vhost_user_core::message::IotlbKind::Update,
        }),
        R::SetVringEndian {
            index: 0,
            endian: vhost_user_core::message::Endian::Little,
        },
        R::GetConfig(ConfigMsg {
            offset: 0,
            kind: ConfigWriteKind::Frontend,
            data: &cfg,
        }),
        R::SetConfig(ConfigMsg {
            offset: 8,
            kind: ConfigWriteKind::Frontend,
            data: &cfg[..1],
        }),
        R::CreateCryptoSession(&crypto),
        R::CloseCryptoSession(1),
        R::PostcopyAdvise,
        R::PostcopyListen,
        R::PostcopyEnd,
        R::GetInflightFd(vhost_user_core::message::InflightMsg {
            mmap_size: 0,
            ..inflight
        }),
        R::SetInflightFd(inflight),
        R::GpuSetSocket,
        R::ResetDevice,
        R::VringKick(0),
        R::GetMaxMemSlots,
        R::AddMemReg(r0),
        R::RemMemReg(r0),
        R::SetStatus(0xf),
        R::GetStatus,
        R::GetSharedObject(uuid),
        R::SetDeviceStateFd(vhost_user_core::message::DeviceStateDirection::Save),
        R::CheckDeviceState,
        R::GetShmemConfig,
        R::GetVringBaseSkipDrain(0),
    ];
    assert_eq!(requests.len(), 45);
    let refused = [
        FrontendReq::SendRarp,
        FrontendReq::NetSetMtu,
        FrontendReq::IotlbMsg,
        FrontendReq::SetVringEndian,
        FrontendReq::CreateCryptoSession,
        FrontendReq::CloseCryptoSession,
        FrontendReq::PostcopyAdvise,
        FrontendReq::PostcopyListen,
        FrontendReq::PostcopyEnd,
        FrontendReq::GpuSetSocket,
        FrontendReq::GetSharedObject,
        FrontendReq::SetDeviceStateFd,
        FrontendReq::CheckDeviceState,
        FrontendReq::GetShmemConfig,
    ];
    // DEVICE_STATE comes with the `migration` feature, RARP and MTU with
    // `net` (and the test device, as any device by default, refuses them).
    let device_state = [FrontendReq::SetDeviceStateFd, FrontendReq::CheckDeviceState];
    let migration = cfg!(feature = "migration");
    let net = [FrontendReq::SendRarp, FrontendReq::NetSetMtu];
    for (i, r) in requests.iter().enumerate() {
        assert_eq!(r.code().id(), i as u32 + 1);
        let res = fe.send(r, false);
        if cfg!(feature = "net") && net.contains(&r.code()) {
            assert!(
                matches!(res, Err(BackendError::DeviceRefused(c)) if c == r.code()),
                "{r:?}: {res:?}"
            );
            let (o, v) = fe.ack(r.clone());
            assert_eq!(
                (v, o.refused),
                (1, Some(BackendError::DeviceRefused(r.code())))
            );
        } else if refused.contains(&r.code()) && !(migration && device_state.contains(&r.code())) {
            assert_eq!(
                res.err(),
                Some(BackendError::NotNegotiated(r.code())),
                "{r:?}"
            );
            // With NEED_REPLY: a failed ack for messages without a reply of
            // their own.
            if !r.code().has_reply() {
                let (o, v) = fe.ack(r.clone());
                assert_eq!(v, 1, "{r:?}");
                assert!(o.refused.is_some());
            }
        } else if r.code() == FrontendReq::VringKick {
            // Handled, but RESET_DEVICE just forgot ring 0's layout: an
            // in-band kick cannot start it.
            assert_eq!(res.err(), Some(BackendError::RingNotConfigured(0)));
        } else {
            assert!(res.is_ok(), "{r:?}: {res:?}");
        }
        // A ring that starts starts sound.
        assert_eq!(fe.ring(0).and_then(|r| r.error()), None);
    }
    assert_eq!(fe.device.resets, 1);
}

#[test]
fn get_and_set_config() {
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    fe.device.config = core::array::from_fn(|i| i as u8);
    let placeholder = [0u8; 4];
    let (_, r) = fe
        .send(
            &Request::GetConfig(ConfigMsg {
                offset: 4,
                kind: ConfigWriteKind::Frontend,
                data: &placeholder,
            }),
            false,
        )
        .unwrap();
    assert_eq!(&r[HEADER_SIZE + 12..], &[4, 5, 6, 7]);
    // Beyond the device's config space: an empty (error) reply.
    let big = [0u8; 32];
    let (_, r) = fe
        .send(
            &Request::GetConfig(ConfigMsg {
                offset: 0,
                kind: ConfigWriteKind::Frontend,
                data: &big,
            }),
            false,
        )
        .unwrap();
    assert_eq!(r.len(), HEADER_SIZE);
    // A front-end write of a read-only field is refused; a migration write
    // is not; the writable byte is.
    let (o, v) = fe.ack(Request::SetConfig(ConfigMsg {
        offset: 0,
        kind: ConfigWriteKind::Frontend,
        data: &[9],
    }));
    assert_eq!((v, o.refused), (1, Some(BackendError::Config)));
    assert_eq!(fe.device.config[0], 0);
    let (_, v) = fe.ack(Request::SetConfig(ConfigMsg {
        offset: 0,
        kind: ConfigWriteKind::Migration,
        data: &[9],
    }));
    assert_eq!((v, fe.device.config[0]), (0, 9));
    let (_, v) = fe.ack(Request::SetConfig(ConfigMsg {
        offset: 8,
        kind: ConfigWriteKind::Frontend,
        data: &[1],
    }));
    assert_eq!((v, fe.device.config[8]), (0, 1));
}

#[test]
fn memory_slots_and_ring_remap() {
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    assert_eq!(fe.u64_reply(Request::GetMaxMemSlots), 8);
    let mut drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
    fe.configure(0, 16, drv.user_addrs(), 0);
    fe.kick(0);
    fe.ack(Request::SetVringEnable {
        index: 0,
        enable: true,
    });
    // Another region while the ring runs: mapped, rings re-translated.
    let r = region(RAM, 0x10000);
    fe.mem.add_region(r).unwrap();
    let (o, v) = fe.ack(Request::AddMemReg(r));
    assert_eq!(v, 0, "{:?}", o.refused);
    assert!(matches!(
        o.actions[0],
        Action::MapRegion { slot: 1, fd: 0, .. }
    ));
    assert!(matches!(o.actions[1], Action::RemapRings));
    assert_eq!(fe.session.ring_addrs(0).unwrap(), drv.addrs());
    // Overlapping region refused.
    let (o, v) = fe.ack(Request::AddMemReg(region(RAM + 0x8000, 0x10000)));
    assert_eq!(v, 1);
    assert!(matches!(o.refused, Some(BackendError::Memory(_))));
    // Removing the region that holds the running ring is refused: its
    // addresses would no longer translate.
    let (o, v) = fe.ack(Request::RemMemReg(region(0, RAM)));
    assert_eq!(v, 1, "{o:?}");
    assert_eq!(o.refused, Some(BackendError::RingAddress(0)));
    // Removing the other one works; unknown regions are refused.
    let (o, v) = fe.ack(Request::RemMemReg(r));
    assert_eq!(v, 0);
    assert!(matches!(o.actions[0], Action::UnmapRegion { slot: 1 }));
    let (_, v) = fe.ack(Request::RemMemReg(r));
    assert_eq!(v, 1);
    drv.post(&fe.mem, &[Buf::writable(0x9000, 4)]).unwrap();
    assert_eq!(serve(&mut fe, 0, 3), 1);
}

#[test]
fn ring_messages_refused_while_running_and_bad_indices() {
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
    // Kick before the ring is configured: refused.
    assert_eq!(
        fe.send(
            &Request::SetVringKick(VringFdMsg {
                index: 0,
                no_fd: false
            }),
            false
        )
        .err(),
        Some(BackendError::RingNotConfigured(0))
    );
    fe.configure(0, 16, drv.user_addrs(), 0);
    fe.kick(0);
    for r in [
        Request::SetVringNum(VringStateMsg { index: 0, num: 32 }),
        Request::SetVringBase(VringStateMsg { index: 0, num: 5 }),
    ] {
        assert_eq!(fe.send(&r, false).err(), Some(BackendError::RingRunning(0)));
    }
    assert_eq!(
        fe.send(
            &Request::SetFeatures((V::VERSION_1 | V::PROTOCOL_FEATURES | V::EVENT_IDX).bits()),
            false
        )
        .err(),
        Some(BackendError::FeaturesWhileRunning)
    );
    // A second kick fd for a running ring only swaps the fd.
    let o = fe.kick(0);
    assert_eq!(o.actions.len(), 1);
    // Ring index 2 of a 2-queue device: refused by the wire layer.
    let mut msg = [0u8; 64];
    let n = Request::SetVringNum(VringStateMsg { index: 1, num: 16 })
        .encode(false, &mut msg)
        .unwrap();
    msg[HEADER_SIZE] = 2;
    assert_eq!(
        fe.send_raw(&msg[..n], 0).err(),
        Some(BackendError::Wire(WireError::QueueIndex(2)))
    );
    // Ring addresses outside guest memory: refused on SET_VRING_ADDR.
    fe.send(
        &Request::SetVringNum(VringStateMsg { index: 1, num: 16 }),
        false,
    )
    .unwrap();
    assert_eq!(
        fe.send(&Request::SetVringAddr(addr_msg(1, 0x10, 0x20, 0x40)), false)
            .err(),
        Some(BackendError::RingAddress(1))
    );
}

#[test]
fn features_without_bit_30_enable_every_ring_and_reset_device() {
    let mut c = config(P::empty());
    c.features.remove(V::PROTOCOL_FEATURES);
    let mut fe = fe_with(c);
    assert_eq!(
        fe.send(&Request::GetProtocolFeatures, false).err(),
        Some(BackendError::NotNegotiated(
            FrontendReq::GetProtocolFeatures
        ))
    );
    fe.send(&Request::SetFeatures(V::VERSION_1.bits()), false)
        .unwrap();
    let t = [region(0, RAM)];
    fe.send(&Request::SetMemTable(MemTable::new(&t).unwrap()), false)
        .unwrap();
    let drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
    fe.configure(0, 16, drv.user_addrs(), 0);
    let o = fe.kick(0);
    assert!(o
        .actions
        .iter()
        .any(|a| matches!(a, Action::StartRing { .. })));
    assert!(fe.ring(0).unwrap().enabled());
    assert_eq!(fe.session.processing(0), Processing::Normal);
    // SET_VRING_ENABLE needs bit 30.
    assert_eq!(
        fe.send(
            &Request::SetVringEnable {
                index: 0,
                enable: false
            },
            false
        )
        .err(),
        Some(BackendError::NotNegotiated(FrontendReq::SetVringEnable))
    );
    // RESET_DEVICE is gated by its protocol feature.
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
    fe.configure(0, 16, drv.user_addrs(), 0);
    fe.kick(0);
    fe.send(&Request::SetStatus(0xf), false).unwrap();
    let (o, v) = fe.ack(Request::ResetDevice);
    assert_eq!(v, 0);
    assert!(matches!(o.actions[0], Action::ResetRings));
    assert_eq!(fe.session.processing(0), Processing::Stopped);
    assert_eq!(fe.u64_reply(Request::GetStatus), 0);
    assert_eq!(fe.session.ring(0).unwrap().kick, Notifier::Unset);
    assert_eq!(fe.session.features(), V::empty());
    assert_eq!(fe.device.resets, 1);
}

#[test]
fn reset_returns_a_session_to_its_state_when_new() {
    let fresh = format!(
        "{:?}",
        Session::<4, 8>::new(config(all_protocol())).unwrap()
    );
    let mut fe = new_fe(all_protocol());
    assert_eq!(format!("{:?}", fe.session), fresh);
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
    fe.configure(0, 16, drv.user_addrs(), 0);
    fe.kick(0);
    fe.send(&Request::SetStatus(0xf), false).unwrap();
    assert_ne!(format!("{:?}", fe.session), fresh);
    fe.session.reset();
    assert_eq!(format!("{:?}", fe.session), fresh);
    // And it serves a new front-end from the start.
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    assert_eq!(fe.session.features(), V::VERSION_1 | V::PROTOCOL_FEATURES);
}

#[test]
fn status_round_trip() {
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    fe.send(&Request::SetStatus(0x0b), false).unwrap();
    assert_eq!(fe.u64_reply(Request::GetStatus), 0x0b);
    assert_eq!(fe.u64_reply(Request::GetQueueNum), 2);
}

#[test]
fn offer_must_be_implemented() {
    let mut c = config(P::MQ | P::CROSS_ENDIAN);
    assert_eq!(
        Session::<4, 8>::new(c).err(),
        Some(BackendError::Unsupported)
    );
    // VHOST_F_LOG_ALL needs a log, which only LOG_SHMFD gives.
    c.protocol_features = P::MQ;
    c.features |= V::LOG_ALL;
    assert_eq!(
        Session::<4, 8>::new(c).err(),
        Some(BackendError::Unsupported)
    );
    c.protocol_features = P::MQ | P::LOG_SHMFD;
    assert!(Session::<4, 8>::new(c).is_ok());
    c.features.remove(V::LOG_ALL);
    c.protocol_features = P::MQ;
    c.num_queues = 5;
    assert_eq!(
        Session::<4, 8>::new(c).err(),
        Some(BackendError::Unsupported)
    );
    c.num_queues = 1;
    c.features |= V::ACCESS_PLATFORM;
    assert_eq!(
        Session::<4, 8>::new(c).err(),
        Some(BackendError::Unsupported)
    );
}

/// Starts ring 0 (split, 16 entries) with an inflight area set.
fn start_with_area(protocol: P) -> (Fe, SplitDriver) {
    let mut fe = new_fe(protocol);
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let desc = vhost_user_core::message::InflightMsg {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 2,
        queue_size: 16,
    };
    // GET_INFLIGHT_FD: the size of our layout, and an fd to create.
    let (o, r) = fe.send(&Request::GetInflightFd(desc), false).unwrap();
    let size = vhost_user_core::inflight::area_size(2, 16).unwrap();
    assert!(matches!(o.actions[0], Action::UnmapInflight));
    assert!(matches!(o.actions[1], Action::CreateInflight { size: s } if s == size));
    let h = Header::parse(&r).unwrap();
    let got = WireReply::parse(
        FrontendReq::GetInflightFd,
        &h,
        &r[HEADER_SIZE..],
        1,
        &ParseOptions::default(),
    )
    .unwrap();
    assert_eq!(
        got,
        WireReply::Inflight(vhost_user_core::message::InflightMsg {
            mmap_size: size,
            ..desc
        })
    );
    // SET_INFLIGHT_FD: too small is refused, the right size mapped.
    let small = vhost_user_core::message::InflightMsg {
        mmap_size: size - 1,
        ..desc
    };
    assert!(matches!(
        fe.send(&Request::SetInflightFd(small), false),
        Err(BackendError::Inflight(_))
    ));
    let full = vhost_user_core::message::InflightMsg {
        mmap_size: size,
        ..desc
    };
    let (o, _) = fe.send(&Request::SetInflightFd(full), false).unwrap();
    assert!(matches!(
        o.actions[0],
        Action::MapInflight { fd: 0, offset: 0, size: s } if s == size
    ));
    let drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
    fe.configure(0, 16, drv.user_addrs(), 0);
    let o = fe.kick(0);
    assert!(o
        .actions
        .iter()
        .any(|a| matches!(a, Action::StartRing { queue: 0 })));
    assert!(fe.ring(0).unwrap().tracked());
    (fe, drv)
}

fn stop_suspends(fe: &mut Fe, req: Request<'_>) -> bool {
    let (o, _) = fe.send(&req, false).unwrap();
    let suspend = match o.actions[0] {
        Action::StopRing { queue: 0, suspend } => suspend,
        ref a => panic!("{a:?}"),
    };
    // The reply answers the message that asked.
    let out = fe.finish_stop(0).unwrap();
    assert_eq!(
        fe.stops.last().unwrap().drained,
        0,
        "nothing is outstanding"
    );
    assert_eq!(fe.stops.last().unwrap().suspend, suspend);
    assert_eq!(Header::parse(&out).unwrap().request, req.code().id());
    suspend
}

#[test]
fn inflight_area_and_suspending_stops() {
    let base = P::MQ | P::REPLY_ACK | P::RESET_DEVICE;
    // Bit 20 alone: GET_VRING_BASE suspends.
    let (mut fe, drv) = start_with_area(base | P::INFLIGHT_SHMFD | P::GET_VRING_BASE_INFLIGHT);
    assert!(stop_suspends(&mut fe, Request::GetVringBase(0)));
    // ... and message 45 is not negotiated.
    assert_eq!(
        fe.send(&Request::GetVringBaseSkipDrain(0), false).err(),
        Some(BackendError::NotNegotiated(
            FrontendReq::GetVringBaseSkipDrain
        ))
    );
    // Restart: the area is still there.
    fe.configure(0, 16, drv.user_addrs(), 0);
    let o = fe.kick(0);
    assert!(o
        .actions
        .iter()
        .any(|a| matches!(a, Action::StartRing { .. })));
    assert!(fe.ring(0).unwrap().tracked());
    // RESET_DEVICE drops it: the next start has none.
    let (o, _) = fe.send(&Request::ResetDevice, false).unwrap();
    assert!(o.actions.iter().any(|a| matches!(a, Action::UnmapInflight)));

    // Bits 20 and 23: plain GET_VRING_BASE drains, message 45 suspends.
    let all = base | P::INFLIGHT_SHMFD | P::GET_VRING_BASE_INFLIGHT | P::GET_VRING_BASE_SKIP_DRAIN;
    let (mut fe, drv) = start_with_area(all);
    assert!(!stop_suspends(&mut fe, Request::GetVringBase(0)));
    fe.configure(0, 16, drv.user_addrs(), 0);
    fe.kick(0);
    assert!(stop_suspends(&mut fe, Request::GetVringBaseSkipDrain(0)));

    // INFLIGHT_SHMFD without bit 20: always drains.
    let (mut fe, _) = start_with_area(base | P::INFLIGHT_SHMFD);
    assert!(!stop_suspends(&mut fe, Request::GetVringBase(0)));
}

#[test]
fn inflight_area_must_match_the_ring_and_the_device() {
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let m = |nq, qs| vhost_user_core::message::InflightMsg {
        mmap_size: 1 << 20,
        mmap_offset: 0,
        num_queues: nq,
        queue_size: qs,
    };
    // More queues than the device, or rings larger than allowed.
    assert!(matches!(
        fe.send(&Request::GetInflightFd(m(3, 16)), false),
        Err(BackendError::Inflight(_))
    ));
    assert!(matches!(
        fe.send(&Request::SetInflightFd(m(2, 512)), false),
        Err(BackendError::Inflight(_))
    ));
    // An area for 32-entry rings, a ring of 16: the start is refused.
    fe.send(&Request::SetInflightFd(m(2, 32)), false).unwrap();
    let drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
    fe.configure(0, 16, drv.user_addrs(), 0);
    let r = fe.send(
        &Request::SetVringKick(VringFdMsg {
            index: 0,
            no_fd: false,
        }),
        false,
    );
    assert!(matches!(r, Err(BackendError::Inflight(_))), "{r:?}");
}

fn addr_msg(index: u32, desc: u64, avail: u64, used: u64) -> VringAddrMsg {
    VringAddrMsg {
        index,
        log: false,
        desc,
        used,
        avail,
        log_addr: 0,
    }
}

fn num(index: u32, num: u32) -> Request<'static> {
    Request::SetVringNum(VringStateMsg { index, num })
}

fn kick_req(index: u32) -> Request<'static> {
    Request::SetVringKick(VringFdMsg {
        index,
        no_fd: false,
    })
}

/// A refusal with a failed ack (the session goes on), then the same
/// without NEED_REPLY: an error, which ends the connection.
fn refused(fe: &mut Fe, req: Request<'_>, e: BackendError) {
    let (o, v) = fe.ack(req.clone());
    assert_eq!((v, o.refused), (1, Some(e)), "{req:?}");
    assert_eq!(fe.send(&req, false).err(), Some(e), "{req:?}");
}

#[test]
fn ring_sizes_refused_on_set_vring_num() {
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    use vhost_user_core::vring::VringError as VE;
    // 0 and above 32768 are malformed: the connection ends, ack or not.
    for n in [0, 32769, 1 << 20] {
        for ack in [false, true] {
            assert_eq!(
                fe.send(&num(0, n), ack).err(),
                Some(BackendError::Wire(WireError::BadValue(n)))
            );
        }
    }
    refused(&mut fe, num(0, 100), BackendError::Vring(VE::BadSize(100)));
    refused(&mut fe, num(0, 512), BackendError::QueueSize(512));
    refused(&mut fe, num(0, 32768), BackendError::QueueSize(32768));
    assert_eq!(fe.session.ring(0).unwrap().num, 0, "nothing was stored");
    assert_eq!(fe.ack(num(0, 256)).1, 0);
    // Packed rings take any size from 1 to the maximum.
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED);
    assert_eq!(fe.ack(num(0, 100)).1, 0);
    assert_eq!(fe.ack(num(1, 1)).1, 0);
    refused(&mut fe, num(0, 257), BackendError::QueueSize(257));
}

#[test]
fn ring_addresses_refused_on_set_vring_addr() {
    use vhost_user_core::vring::VringError as VE;
    // Two regions adjacent in guest physical and in user addresses.
    let half = RAM / 2;
    let mut fe = Fe::new(
        config(all_protocol()),
        TestDevice::default(),
        &[(0, half), (half, half)],
    )
    .unwrap();
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let t = [region(0, half), region(half, half)];
    fe.send(&Request::SetMemTable(MemTable::new(&t).unwrap()), false)
        .unwrap();
    let u = region(0, 1).user_addr;
    assert_eq!(fe.ack(num(0, 16)).1, 0);
    let good = (u + 0x1000, u + 0x2000, u + 0x3000);
    let at = |d: u64, a: u64, us: u64| Request::SetVringAddr(addr_msg(0, d, a, us));
    // Outside guest memory (each area in turn).
    for (d, a, us) in [
        (u + RAM, good.1, good.2),
        (good.0, u - 0x1000, good.2),
        (good.0, good.1, 0x10),
    ] {
        refused(&mut fe, at(d, a, us), BackendError::RingAddress(0));
    }
    // An area whose end is past the end of guest memory (16 entries of the
    // used ring are 134 bytes).
    refused(
        &mut fe,
        at(good.0, good.1, u + RAM - 64),
        BackendError::RingAddress(0),
    );
    // Straddling the boundary of two regions, although both are mapped.
    refused(
        &mut fe,
        at(u + half - 0x80, good.1, good.2),
        BackendError::RingAddress(0),
    );
    // Misaligned for a split ring: desc 16, avail 2, used 4.
    refused(
        &mut fe,
        at(good.0 + 8, good.1, good.2),
        BackendError::Vring(VE::Misaligned(16)),
    );
    refused(
        &mut fe,
        at(good.0, good.1 + 1, good.2),
        BackendError::Vring(VE::Misaligned(2)),
    );
    refused(
        &mut fe,
        at(good.0, good.1, good.2 + 2),
        BackendError::Vring(VE::Misaligned(4)),
    );
    assert!(fe.session.ring(0).unwrap().addr.is_none(), "nothing stored");
    // Each area inside a region (not the same one) is fine.
    assert_eq!(fe.ack(at(good.0, u + half + 0x100, good.2)).1, 0);
    // Packed: the driver event area must be 4-aligned.
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES | V::RING_PACKED);
    assert_eq!(fe.ack(num(0, 100)).1, 0);
    refused(
        &mut fe,
        at(good.0, good.1 + 2, good.2),
        BackendError::Vring(VE::Misaligned(4)),
    );
    assert_eq!(fe.ack(at(good.0, good.1 + 4, good.2 + 4)).1, 0);
}

#[test]
fn ring_set_before_set_features_is_checked_there_and_at_kick() {
    use vhost_user_core::vring::VringError as VE;
    let mut fe = new_fe(all_protocol());
    fe.send(&Request::SetProtocolFeatures(all_protocol().bits()), false)
        .unwrap();
    let t = [region(0, RAM)];
    fe.send(&Request::SetMemTable(MemTable::new(&t).unwrap()), false)
        .unwrap();
    let u = region(0, 1).user_addr;
    // The layout is not known yet: a packed size and a 2-aligned driver
    // area are accepted (both are fine for one of the layouts) ...
    assert_eq!(fe.ack(num(0, 100)).1, 0);
    assert_eq!(fe.ack(num(1, 64)).1, 0);
    let a1 = addr_msg(1, u + 0x1000, u + 0x2002, u + 0x3000);
    assert_eq!(fe.ack(Request::SetVringAddr(a1)).1, 0);
    // ... but what holds for neither is refused at once.
    refused(&mut fe, num(0, 300), BackendError::QueueSize(300));
    refused(
        &mut fe,
        Request::SetVringAddr(addr_msg(1, u + 0x1000, u + 0x2001, u + 0x3000)),
        BackendError::Vring(VE::Misaligned(2)),
    );
    // SET_FEATURES for split rings: ring 0's size does not fit.
    let split = V::VERSION_1 | V::PROTOCOL_FEATURES;
    refused(
        &mut fe,
        Request::SetFeatures(split.bits()),
        BackendError::Vring(VE::BadSize(100)),
    );
    assert_eq!(fe.session.features(), V::empty(), "nothing changed");
    // For packed rings: ring 1's driver area is misaligned.
    let packed = split | V::RING_PACKED;
    refused(
        &mut fe,
        Request::SetFeatures(packed.bits()),
        BackendError::Vring(VE::Misaligned(4)),
    );
    // Fix ring 1; packed is accepted now.
    let a1 = addr_msg(1, u + 0x1000, u + 0x2004, u + 0x3000);
    assert_eq!(fe.ack(Request::SetVringAddr(a1)).1, 0);
    assert_eq!(fe.ack(Request::SetFeatures(packed.bits())).1, 0);
    // SET_VRING_KICK checks again: features back to split (no ring runs),
    // and ring 0, size 100, cannot start.
    assert_eq!(fe.ack(Request::SetFeatures(split.bits())).1, 0);
    let a0 = addr_msg(0, u + 0x8000, u + 0x9000, u + 0xa000);
    assert_eq!(fe.ack(Request::SetVringAddr(a0)).1, 0);
    refused(&mut fe, kick_req(0), BackendError::Vring(VE::BadSize(100)));
}

#[test]
fn qemu_order_and_resent_memory_tables_still_work() {
    let mut fe = new_fe(all_protocol());
    // QEMU: SET_FEATURES, SET_MEM_TABLE, then per ring NUM, BASE, ADDR,
    // KICK; all acked.
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let mut drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
    let ua = drv.user_addrs();
    assert_eq!(fe.ack(num(0, 16)).1, 0);
    let base = Request::SetVringBase(VringStateMsg { index: 0, num: 0 });
    assert_eq!(fe.ack(base.clone()).1, 0);
    let a = addr_msg(0, ua.desc, ua.driver, ua.device);
    assert_eq!(fe.ack(Request::SetVringAddr(a)).1, 0);
    assert_eq!(fe.ack(kick_req(0)).1, 0);
    fe.ack(Request::SetVringEnable {
        index: 0,
        enable: true,
    });
    // The same table again while the ring runs, and the same addresses.
    let t = [region(0, RAM)];
    let mt = Request::SetMemTable(MemTable::new(&t).unwrap());
    assert_eq!(fe.ack(mt.clone()).1, 0);
    assert_eq!(fe.ack(Request::SetVringAddr(a)).1, 0);
    drv.post(&fe.mem, &[Buf::writable(0x9000, 4)]).unwrap();
    assert_eq!(serve(&mut fe, 0, 1), 1);
    // Stop the ring; its addresses stay recorded.
    let (o, _) = fe.send(&Request::GetVringBase(0), false).unwrap();
    assert_eq!(o.reply, Reply::Pending { queue: 0 });
    fe.serve(0).unwrap();
    fe.finish_stop(0).unwrap();
    // A table that no longer holds the stopped ring is a legal update, and
    // so is removing and adding regions under it.
    let r = region(RAM, 0x10000);
    let t2 = [r];
    assert_eq!(
        fe.ack(Request::SetMemTable(MemTable::new(&t2).unwrap())).1,
        0
    );
    assert_eq!(fe.ack(Request::RemMemReg(r)).1, 0);
    assert_eq!(fe.ack(Request::AddMemReg(region(0, RAM))).1, 0);
    assert_eq!(fe.ack(Request::RemMemReg(region(0, RAM))).1, 0);
    assert_eq!(fe.ack(Request::AddMemReg(r)).1, 0);
    // Starting it there is refused ...
    refused(&mut fe, kick_req(0), BackendError::RingAddress(0));
    // ... and QEMU's restart (memory, then NUM, BASE, ADDR, KICK) works.
    assert_eq!(fe.ack(mt).1, 0);
    assert_eq!(fe.ack(num(0, 16)).1, 0);
    let base = Request::SetVringBase(VringStateMsg {
        index: 0,
        num: fe.session.ring(0).unwrap().base,
    });
    assert_eq!(fe.ack(base).1, 0);
    assert_eq!(fe.ack(Request::SetVringAddr(a)).1, 0);
    assert_eq!(fe.ack(kick_req(0)).1, 0);
    drv.post(&fe.mem, &[Buf::writable(0x9000, 4)]).unwrap();
    assert_eq!(serve(&mut fe, 0, 2), 1);
}

#[test]
fn set_features_dropping_bit_30_after_protocol_features_is_refused() {
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    refused(
        &mut fe,
        Request::SetFeatures(V::VERSION_1.bits()),
        BackendError::ProtocolFeaturesDropped,
    );
    // Nothing changed: protocol features (REPLY_ACK) still hold.
    assert_eq!(fe.session.protocol_features(), all_protocol());
    assert_eq!(fe.session.features(), V::VERSION_1 | V::PROTOCOL_FEATURES);
    assert_eq!(fe.ack(Request::SetOwner).1, 0);
    // Also before any SET_FEATURES.
    let mut fe = new_fe(all_protocol());
    fe.send(&Request::SetProtocolFeatures(P::REPLY_ACK.bits()), false)
        .unwrap();
    refused(
        &mut fe,
        Request::SetFeatures(V::VERSION_1.bits()),
        BackendError::ProtocolFeaturesDropped,
    );
    // A front-end that never set protocol features may leave bit 30 out:
    // the rings start enabled.
    let mut fe = new_fe(all_protocol());
    fe.send(&Request::SetFeatures(V::VERSION_1.bits()), false)
        .unwrap();
    assert_eq!(fe.session.protocol_features(), P::empty());
    assert_eq!(fe.session.features(), V::VERSION_1);
}

/// NET_SET_MTU and SEND_RARP (the core's `net` feature): checked by the
/// session, handed to the device, refused with a failed ack when the
/// value is out of range or the device says no, and refused as not
/// negotiated without their protocol features.
#[test]
fn net_set_mtu_and_send_rarp() {
    let mut fe = new_fe(P::MQ | P::REPLY_ACK | P::RARP | P::MTU);
    fe.device.max_mtu = Some(9000);
    fe.device.announces = true;
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    // Taken: the bounds of the range, and below the device's maximum.
    for mtu in [68u64, 1500, 9000] {
        let (o, v) = fe.ack(Request::NetSetMtu(mtu));
        assert_eq!((v, o.refused), (0, None), "{mtu}");
    }
    // Outside 68..=65535: the session refuses, the device never hears.
    for (mtu, e) in [
        (0u64, BackendError::BadMtu(0)),
        (67, BackendError::BadMtu(67)),
        (65536, BackendError::BadMtu(65536)),
        (1 << 40, BackendError::BadMtu(u32::MAX)),
    ] {
        let (o, v) = fe.ack(Request::NetSetMtu(mtu));
        assert_eq!((v, o.refused), (1, Some(e)), "{mtu}");
    }
    // Above the device's maximum: the device refuses.
    let (o, v) = fe.ack(Request::NetSetMtu(9001));
    assert_eq!(
        (v, o.refused),
        (1, Some(BackendError::DeviceRefused(FrontendReq::NetSetMtu)))
    );
    assert_eq!(fe.device.mtus, [68, 1500, 9000]);
    // Without NEED_REPLY a refusal ends the connection, as every refusal.
    assert_eq!(
        fe.send(&Request::NetSetMtu(20), false).err(),
        Some(BackendError::BadMtu(20))
    );

    // SEND_RARP as QEMU sends it (no NEED_REPLY): no reply at all.
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let (o, r) = fe.send(&Request::SendRarp(mac), false).unwrap();
    assert_eq!((o.reply, r.len()), (Reply::None, 0));
    let (o, v) = fe.ack(Request::SendRarp([2, 0, 0, 0, 0, 1]));
    assert_eq!((v, o.refused), (0, None));
    assert_eq!(fe.device.rarps, [mac, [2, 0, 0, 0, 0, 1]]);
    fe.device.announces = false;
    let (o, v) = fe.ack(Request::SendRarp(mac));
    assert_eq!(
        (v, o.refused),
        (1, Some(BackendError::DeviceRefused(FrontendReq::SendRarp)))
    );
    assert_eq!(fe.device.rarps.len(), 2);

    // Offered but not negotiated: refused before the device hears.
    let mut fe = new_fe(P::MQ | P::REPLY_ACK | P::RARP | P::MTU);
    fe.device.max_mtu = Some(9000);
    fe.device.announces = true;
    fe.send(&Request::GetProtocolFeatures, false).unwrap();
    fe.send(
        &Request::SetProtocolFeatures((P::MQ | P::REPLY_ACK).bits()),
        false,
    )
    .unwrap();
    for (r, c) in [
        (Request::NetSetMtu(1500), FrontendReq::NetSetMtu),
        (Request::SendRarp(mac), FrontendReq::SendRarp),
    ] {
        let (o, v) = fe.ack(r);
        assert_eq!((v, o.refused), (1, Some(BackendError::NotNegotiated(c))));
    }
    assert!(fe.device.mtus.is_empty() && fe.device.rarps.is_empty());
}

/// fds as an adapter describes them ([`MessageFds`]): `count` fds, none
/// of which can serve `denied`.
struct Denies {
    count: usize,
    denied: FdAccess,
}

impl MessageFds for Denies {
    fn count(&self) -> usize {
        self.count
    }

    fn allows(&self, _index: u8, access: FdAccess) -> bool {
        access != self.denied
    }
}

/// The session handles `req` (with NEED_REPLY) with `fds`: its result and
/// reply bytes.
fn handle_with(
    fe: &mut Fe,
    req: &Request<'_>,
    fds: &impl MessageFds,
) -> Result<(Outcome, Vec<u8>), BackendError> {
    let mut msg = [0u8; vhost_user_core::message::MAX_MESSAGE];
    let n = req.encode(true, &mut msg).unwrap();
    let header = Header::parse(&msg[..n]).unwrap();
    let mut out = [0u8; vhost_user_core::message::MAX_MESSAGE];
    let o = fe.session.handle(
        &header,
        &msg[HEADER_SIZE..n],
        fds,
        &fe.mem,
        &mut fe.device,
        &mut out,
    )?;
    let reply = match o.reply {
        Reply::Ready(len) => out[..len].to_vec(),
        _ => Vec::new(),
    };
    Ok((o, reply))
}

/// fds an adapter can tell the length of: `count` fds, each `len` bytes
/// long.
struct Lengths {
    count: usize,
    len: u64,
}

impl MessageFds for Lengths {
    fn count(&self) -> usize {
        self.count
    }

    fn allows(&self, _index: u8, _access: FdAccess) -> bool {
        true
    }

    fn maps(&self, _index: u8, offset: u64, size: u64) -> bool {
        offset.checked_add(size).is_some_and(|end| end <= self.len)
    }
}

/// Shared memory is asked for with the extent the message maps of it
/// ([`MessageFds::maps`]): one shorter than that is refused in the ack
/// with [`BackendError::BadFd`], before anything changes; one just long
/// enough is taken.
#[test]
fn shared_memory_shorter_than_its_extent_is_refused_before_anything_changes() {
    use vhost_user_core::message::{InflightMsg, MemRegionMsg};
    let table = [MemRegionMsg {
        mmap_offset: 0x3000,
        ..region(0, RAM / 2)
    }];
    let added = MemRegionMsg {
        mmap_offset: 0x1000,
        ..region(RAM, 4096)
    };
    let area = vhost_user_core::inflight::area_size(2, 256).unwrap();
    let inflight = InflightMsg {
        mmap_size: area,
        mmap_offset: 0x2000,
        num_queues: 2,
        queue_size: 256,
    };
    let cases = [
        (
            Request::SetMemTable(MemTable::new(&table).unwrap()),
            0x3000 + RAM / 2,
        ),
        (Request::AddMemReg(added), 0x1000 + 4096),
        (Request::SetInflightFd(inflight), 0x2000 + area),
    ];
    for (req, end) in cases {
        let code = req.code();
        let mut fe = new_fe(all_protocol());
        fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
        let memory = fe.session.memory().clone();
        let short = Lengths {
            count: 1,
            len: end - 1,
        };
        let (o, reply) = handle_with(&mut fe, &req, &short).unwrap();
        let named = BackendError::BadFd {
            index: 0,
            access: FdAccess::Map,
        };
        assert_eq!(o.refused, Some(named), "{code:?}");
        assert_eq!(reply_u64(&reply), 1, "{code:?}: its ack");
        assert!(o.actions.is_empty(), "{code:?}: {:?}", o.actions);
        assert_eq!(fe.session.inflight_layout(), None, "{code:?}");
        assert!(
            fe.session.memory().iter().eq(memory.iter()),
            "{code:?} changed the memory table"
        );
        let long = Lengths { count: 1, len: end };
        let (o, reply) = handle_with(&mut fe, &req, &long).unwrap();
        assert_eq!(o.refused, None, "{code:?}");
        assert_eq!(reply_u64(&reply), 0, "{code:?}: its ack");
    }
}

/// The u64 a reply carries.
fn reply_u64(reply: &[u8]) -> u64 {
    u64::from_le_bytes(reply[HEADER_SIZE..HEADER_SIZE + 8].try_into().unwrap())
}

/// A message whose fd cannot serve its use is refused in its ack with
/// [`BackendError::BadFd`], before anything changes; an fd that can
/// serve it (the same message, another access denied) is taken.
#[test]
fn an_fd_that_cannot_serve_its_use_is_refused_before_anything_changes() {
    use vhost_user_core::message::{DeviceStateDirection as Dir, InflightMsg, LogMsg};
    let ring = VringFdMsg {
        index: 0,
        no_fd: false,
    };
    // Not the handshake's table (one region of RAM bytes at 0).
    let table = [region(0, RAM / 2)];
    let inflight = InflightMsg {
        mmap_size: vhost_user_core::inflight::area_size(2, 256).unwrap(),
        mmap_offset: 0,
        num_queues: 2,
        queue_size: 256,
    };
    let cases = [
        (
            Request::SetMemTable(MemTable::new(&table).unwrap()),
            FdAccess::Map,
        ),
        (Request::AddMemReg(region(RAM, 4096)), FdAccess::Map),
        (Request::SetVringKick(ring), FdAccess::Read),
        (Request::SetVringCall(ring), FdAccess::Write),
        (Request::SetVringErr(ring), FdAccess::Write),
        (Request::SetBackendReqFd, FdAccess::ReadWrite),
        (Request::SetInflightFd(inflight), FdAccess::Map),
        (Request::SetLogFd, FdAccess::Write),
    ];
    let other = |a| {
        if a == FdAccess::Read {
            FdAccess::Write
        } else {
            FdAccess::Read
        }
    };
    for (req, access) in cases {
        let code = req.code();
        let mut fe = new_fe(all_protocol());
        fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
        // Ring 0 is ready: SET_VRING_KICK would start it.
        let drv = SplitDriver::new(&fe.mem, 16, 0x1000, false).unwrap();
        fe.configure(0, 16, drv.user_addrs(), 0);
        let memory = fe.session.memory().clone();
        let bad = Denies {
            count: 1,
            denied: access,
        };
        let (o, reply) = handle_with(&mut fe, &req, &bad).unwrap();
        assert_eq!(
            o.refused,
            Some(BackendError::BadFd { index: 0, access }),
            "{code:?}"
        );
        assert_eq!(reply_u64(&reply), 1, "{code:?}: its ack");
        assert!(o.actions.is_empty(), "{code:?}: {:?}", o.actions);
        let slot = fe.session.ring(0).unwrap();
        assert!(!slot.running, "{code:?} started the ring");
        assert_eq!(
            (slot.kick, slot.call, slot.err),
            (Notifier::Unset, Notifier::Unset, Notifier::Unset),
            "{code:?}"
        );
        assert_eq!(fe.session.inflight_layout(), None, "{code:?}");
        assert!(fe.session.channel().is_none(), "{code:?}");
        assert!(
            fe.session.memory().iter().eq(memory.iter()),
            "{code:?} changed the memory table"
        );
        let good = Denies {
            count: 1,
            denied: other(access),
        };
        let (o, reply) = handle_with(&mut fe, &req, &good).unwrap();
        assert_eq!(o.refused, None, "{code:?}");
        assert_eq!(reply_u64(&reply), 0, "{code:?}: its ack");
    }
    // SET_DEVICE_STATE_FD: its own reply, an error and no fd.
    for (dir, access) in [(Dir::Save, FdAccess::Write), (Dir::Load, FdAccess::Read)] {
        let mut fe = new_fe(all_protocol());
        fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
        let req = Request::SetDeviceStateFd(dir);
        let bad = Denies {
            count: 1,
            denied: access,
        };
        let (o, reply) = handle_with(&mut fe, &req, &bad).unwrap();
        assert_eq!(
            o.refused,
            Some(BackendError::BadFd { index: 0, access }),
            "{dir:?}"
        );
        assert_eq!(reply_u64(&reply), 0x101, "{dir:?}: an error, no fd");
        assert_eq!(fe.session.transfer(), None, "{dir:?}");
    }
    // SET_LOG_BASE: its reply carries no verdict; the connection ends.
    let mut fe = new_fe(all_protocol());
    fe.handshake(V::VERSION_1 | V::PROTOCOL_FEATURES);
    let req = Request::SetLogBase(LogMsg {
        size: 4096,
        offset: 0,
    });
    let bad = Denies {
        count: 1,
        denied: FdAccess::Map,
    };
    let r = handle_with(&mut fe, &req, &bad);
    assert_eq!(
        r.err(),
        Some(BackendError::BadFd {
            index: 0,
            access: FdAccess::Map
        })
    );
    assert_eq!(fe.session.log(), None);
}

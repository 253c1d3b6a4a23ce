//! The back-end session through the C ABI, driven by the front-end engine
//! of the same ABI: what a C back-end can get wrong with its buffers is an
//! error code it can recover from, and an error leaves nothing behind for
//! the next call to act on; and a migration's dirty log, from
//! `vhu_frontend_start_logging` to the bits a back-end sets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::ptr;

use vhost_user_c::backend::*;
use vhost_user_c::channel::*;
use vhost_user_c::dataplane::*;
use vhost_user_c::frontend::*;
use vhost_user_c::log::*;
use vhost_user_c::memory::{vhu_mem, vhu_mem_region, vhu_region};
use vhost_user_c::vhu_result::{self, *};

const GUEST: usize = 0x10000;
const VA: u64 = 0x7000_0000;
const QSIZE: u16 = 8;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

/// Zeroed storage of `size` bytes aligned to 64.
struct Storage(Vec<u64>);

impl Storage {
    fn new(size: usize) -> Storage {
        Storage(vec![0u64; size / 8 + 16])
    }
    fn at<T>(&mut self) -> *mut T {
        let base = self.0.as_mut_ptr().cast::<u8>();
        base.wrapping_add(base.align_offset(64)).cast()
    }
}

/// A front-end and a back-end session in memory, the guest's memory, and
/// the back-end's memory table and data plane.
struct Pair {
    be: Storage,
    fe: Storage,
    dp: Storage,
    guest: Vec<u64>,
    table: Box<[vhu_region; VHU_MAX_REGIONS as usize]>,
    running: bool,
    /// The dirty log the front-end's host made (shared with the back-end
    /// in place of an fd), and what the back-end was told of it: mapped
    /// (the bytes of MAP_LOG), device writes logged, the ring's used ring
    /// logged at this address.
    log: Vec<u8>,
    log_mapped: u64,
    log_all: bool,
    ring_log: Option<u64>,
    /// TRANSFER_STATE actions: save (true) or load.
    transfers: Vec<bool>,
    /// How the back-end's host ends the transfers (`false`: failed), and
    /// the front-end's refusals of their checks (`VHU_ERR_NACK`) so far.
    transfers_ok: bool,
    state_nacks: usize,
    /// SET_CALL and SET_ERR actions: (call, queue, fd, in-band); the
    /// back-end channel was set.
    notifiers: Vec<(bool, u16, i32, bool)>,
    channel_set: bool,
    /// Events the front-end gave, and fds it attached, in order.
    events: Vec<vhu_event_kind>,
    fds: Vec<vhu_fd_kind>,
}

fn check(r: vhu_result, what: &str) {
    assert_eq!(r, VHU_OK, "{what}");
}

impl Pair {
    fn new() -> Pair {
        Pair::offering(
            VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
            VHU_PROTOCOL_F_MQ | VHU_PROTOCOL_F_REPLY_ACK,
        )
    }

    /// Both sides offering `features` and `protocol_features`.
    fn offering(features: u64, protocol_features: u64) -> Pair {
        let mut p = Pair {
            be: Storage::new(vhu_backend_size()),
            fe: Storage::new(vhu_frontend_size()),
            dp: Storage::new(vhu_dataplane_size(QSIZE)),
            guest: vec![0u64; GUEST / 8],
            table: Box::new(
                [vhu_region {
                    gpa: 0,
                    size: 0,
                    host: ptr::null_mut(),
                }; VHU_MAX_REGIONS as usize],
            ),
            running: false,
            log: Vec::new(),
            log_mapped: 0,
            log_all: false,
            ring_log: None,
            transfers: Vec::new(),
            transfers_ok: true,
            state_nacks: 0,
            notifiers: Vec::new(),
            channel_set: false,
            events: Vec::new(),
            fds: Vec::new(),
        };
        let cfg = vhu_backend_config {
            struct_size: size_of::<vhu_backend_config>(),
            features,
            protocol_features,
            num_queues: 1,
            max_queue_size: 256,
        };
        let queues = [vhu_queue_config {
            size: QSIZE,
            addrs: vhu_ring_addrs {
                desc: VA + DESC,
                driver: VA + AVAIL,
                device: VA + USED,
            },
            base: 0,
            kick_polling: 1,
            call_polling: 1,
        }];
        let regions = [vhu_mem_region {
            guest_addr: 0,
            size: GUEST as u64,
            user_addr: VA,
            mmap_offset: 0,
        }];
        let fcfg = vhu_frontend_config {
            struct_size: size_of::<vhu_frontend_config>(),
            features: cfg.features,
            protocol_features: cfg.protocol_features,
            queues: queues.as_ptr(),
            num_queues: 1,
            regions: regions.as_ptr(),
            num_regions: 1,
        };
        // SAFETY: the storages hold their sizes; the configs are live.
        unsafe {
            check(
                vhu_backend_init(p.be.at(), vhu_backend_size(), &cfg),
                "backend init",
            );
            check(
                vhu_frontend_init(p.fe.at(), vhu_frontend_size(), &fcfg),
                "frontend init",
            );
        }
        p
    }

    /// `vhu_backend_handle` of the first `len` bytes of `msg` (`nfds` fds
    /// with it) into `reply`: its result, and its outcome where it
    /// succeeded or wrote one.
    fn handle(
        &mut self,
        msg: &[u8],
        len: usize,
        nfds: usize,
        mem: &vhu_mem,
        reply: &mut [u8],
    ) -> (vhu_result, vhu_outcome) {
        assert!(len <= msg.len());
        // Values no call writes, so that one the call leaves shows.
        let mut out = vhu_outcome {
            reply: vhu_reply_kind::VHU_REPLY_NONE,
            reply_len: usize::MAX,
            queue: u16::MAX,
            actions: u32::MAX,
            refused: VHU_OK,
            ..Default::default()
        };
        // SAFETY: live session; `len` bytes of `msg`, the table and
        // `reply` are valid for the call.
        let r = unsafe {
            vhu_backend_handle(
                self.be.at(),
                msg.as_ptr(),
                len,
                nfds,
                mem,
                ptr::null(),
                reply.as_mut_ptr(),
                reply.len(),
                &mut out,
            )
        };
        (r, out)
    }

    /// `vhu_backend_finish_stop` of ring `queue` at `base`, its reply into
    /// the first `cap` bytes of `reply`: the result and the length given.
    fn finish_stop(
        &mut self,
        queue: u16,
        base: u32,
        reply: &mut [u8],
        cap: usize,
    ) -> (vhu_result, usize) {
        assert!(cap <= reply.len());
        let mut n = 99usize;
        // SAFETY: live session; `cap` writable bytes at `reply`; live
        // out-value.
        let r = unsafe {
            vhu_backend_finish_stop(self.be.at(), queue, base, reply.as_mut_ptr(), cap, &mut n)
        };
        (r, n)
    }

    fn mem(&self) -> vhu_mem {
        vhu_mem {
            regions: self.table.as_ptr(),
            count: self.table.len(),
            ops: ptr::null(),
        }
    }

    fn apply(&mut self, i: usize) {
        let mut a = core::mem::MaybeUninit::new(vhu_action::default());
        // SAFETY: live session and out-value.
        check(
            unsafe { vhu_backend_action(self.be.at(), i, a.as_mut_ptr()) },
            "action",
        );
        // SAFETY: written by the successful call.
        let a = unsafe { a.assume_init() };
        match a.kind {
            vhu_action_kind::VHU_ACTION_UNMAP_ALL => {
                for e in self.table.iter_mut() {
                    e.size = 0;
                    e.host = ptr::null_mut();
                }
            }
            vhu_action_kind::VHU_ACTION_MAP_REGION => {
                // The "fd" is the guest buffer itself.
                let host = self.guest.as_mut_ptr().cast::<u8>();
                self.table[usize::from(a.slot)] = vhu_region {
                    gpa: a.region.guest_addr,
                    size: a.region.size,
                    host: host.wrapping_add(a.region.mmap_offset as usize),
                };
            }
            vhu_action_kind::VHU_ACTION_START_RING => {
                let mem = self.mem();
                // SAFETY: live session, table and storage.
                let r = unsafe {
                    vhu_backend_start_ring(
                        self.be.at(),
                        a.queue,
                        &mem,
                        ptr::null(),
                        false,
                        self.dp.at(),
                        vhu_dataplane_size(QSIZE),
                    )
                };
                check(r, "start ring");
                self.running = true;
                let (mut logged, mut at) = (false, 0u64);
                // SAFETY: live session and out-values.
                let r =
                    unsafe { vhu_backend_ring_log(self.be.at(), a.queue, &mut logged, &mut at) };
                check(r, "ring log");
                self.ring_log = logged.then_some(at);
            }
            vhu_action_kind::VHU_ACTION_MAP_LOG => {
                // The "fd" is the front-end's log itself.
                assert_eq!(a.offset, 0);
                assert!(a.size <= self.log.len() as u64);
                self.log_mapped = a.size;
            }
            vhu_action_kind::VHU_ACTION_SET_LOGGING => self.log_all = a.flag,
            vhu_action_kind::VHU_ACTION_SET_CALL | vhu_action_kind::VHU_ACTION_SET_ERR => {
                let call = a.kind == vhu_action_kind::VHU_ACTION_SET_CALL;
                self.notifiers.push((call, a.queue, a.fd, a.flag));
            }
            vhu_action_kind::VHU_ACTION_SET_BACKEND_CHANNEL => self.channel_set = true,
            vhu_action_kind::VHU_ACTION_TRANSFER_STATE => {
                assert_eq!(a.fd, 0);
                self.transfers.push(a.flag);
            }
            vhu_action_kind::VHU_ACTION_SET_RING_LOG => {
                assert!(self.running);
                self.ring_log = a.flag.then_some(a.offset);
            }
            vhu_action_kind::VHU_ACTION_SET_ENABLED => {
                // SAFETY: live data plane.
                check(
                    unsafe { vhu_dataplane_set_enabled(self.dp.at(), a.flag) },
                    "enable",
                );
            }
            _ => {}
        }
    }

    /// Stops the running ring; its base.
    fn stop_ring(&mut self) -> u32 {
        let mem = self.mem();
        let mut stopped = false;
        let mut base = 0u32;
        // SAFETY: live data plane, table and out-values.
        let r = unsafe {
            vhu_dataplane_stop(
                self.dp.at(),
                &mem,
                ptr::null(),
                false,
                &mut stopped,
                &mut base,
                ptr::null_mut(),
            )
        };
        check(r, "stop");
        assert!(stopped);
        self.running = false;
        base
    }

    /// The front-end's next message into `buf` (`len` 0: none).
    fn transmit(&mut self, buf: &mut [u8]) -> vhu_transmit {
        let mut tx = core::mem::MaybeUninit::new(vhu_transmit::default());
        // SAFETY: live engine, buffer and out-value.
        unsafe {
            check(
                vhu_frontend_poll_transmit(
                    self.fe.at(),
                    buf.as_mut_ptr(),
                    buf.len(),
                    tx.as_mut_ptr(),
                ),
                "transmit",
            );
            tx.assume_init()
        }
    }

    /// Runs the front-end against the back-end until neither has work;
    /// `pending` answers a pending reply into the reply buffer and gives
    /// its length.
    fn pump(&mut self, pending: &mut dyn FnMut(&mut Pair, u16, &mut [u8]) -> usize) {
        let mut buf = [0u8; VHU_FRONTEND_MAX_TRANSMIT as usize];
        let mut reply = vec![0u8; VHU_MAX_MESSAGE as usize];
        loop {
            let tx = self.transmit(&mut buf);
            loop {
                let mut ev = core::mem::MaybeUninit::new(vhu_event::default());
                // SAFETY: live engine and out-value.
                check(
                    unsafe { vhu_frontend_poll_event(self.fe.at(), ev.as_mut_ptr()) },
                    "event",
                );
                // SAFETY: written by the call.
                let kind = unsafe { ev.assume_init() }.kind;
                if kind == vhu_event_kind::VHU_EVENT_NONE {
                    break;
                }
                self.events.push(kind);
            }
            if tx.len == 0 {
                return;
            }
            self.fds
                .extend(tx.fds[..tx.nfds as usize].iter().map(|f| f.kind));
            let mem = self.mem();
            let (r, out) = self.handle(&buf, tx.len, tx.nfds as usize, &mem, &mut reply);
            check(r, "handle");
            assert_eq!(out.refused, VHU_OK);
            for i in 0..out.actions as usize {
                self.apply(i);
            }
            let n = match out.reply {
                vhu_reply_kind::VHU_REPLY_NONE => continue,
                vhu_reply_kind::VHU_REPLY_READY => out.reply_len,
                vhu_reply_kind::VHU_REPLY_PENDING => pending(self, out.queue, &mut reply),
                // The transfer ran (in these tests, nothing moves).
                vhu_reply_kind::VHU_REPLY_TRANSFER_PENDING => {
                    let mut n = 0;
                    // SAFETY: live session, reply buffer and out-value.
                    let r = unsafe {
                        vhu_backend_finish_transfer(
                            self.be.at(),
                            self.transfers_ok,
                            reply.as_mut_ptr(),
                            reply.len(),
                            &mut n,
                        )
                    };
                    check(r, "finish transfer");
                    n
                }
            };
            // SAFETY: live engine; the reply is `n` bytes of `reply`.
            let r = unsafe { vhu_frontend_handle_reply(self.fe.at(), reply.as_ptr(), n, 0) };
            if r == VHU_ERR_NACK && !self.transfers_ok {
                self.state_nacks += 1;
            } else {
                check(r, "reply");
            }
        }
    }

    /// A device state transfer (`save`, else load) and its check, each
    /// pumped through.
    fn transfer(&mut self, save: bool) {
        // SAFETY: live engine.
        check(
            unsafe { vhu_frontend_transfer_state(self.fe.at(), save) },
            "transfer",
        );
        self.pump(&mut no_pending);
        // SAFETY: live engine.
        check(unsafe { vhu_frontend_check_state(self.fe.at()) }, "check");
        self.pump(&mut no_pending);
    }

    fn state(&mut self) -> vhu_frontend_state {
        let mut s = vhu_frontend_state::VHU_FRONTEND_FAILED;
        // SAFETY: live engine and out-value.
        check(
            unsafe { vhu_frontend_get_state(self.fe.at(), &mut s, ptr::null_mut()) },
            "state",
        );
        s
    }
}

fn no_pending(_: &mut Pair, _: u16, _: &mut [u8]) -> usize {
    panic!("no reply is pending before a stop")
}

/// A running ring, the handshake and the start done.
fn started() -> Pair {
    started_from(Pair::new())
}

/// `p` with its ring running, the handshake and the start done.
fn started_from(mut p: Pair) -> Pair {
    p.pump(&mut no_pending);
    assert_eq!(p.state(), vhu_frontend_state::VHU_FRONTEND_READY);
    // SAFETY: live engine.
    check(unsafe { vhu_frontend_start(p.fe.at()) }, "start");
    p.pump(&mut no_pending);
    assert_eq!(p.state(), vhu_frontend_state::VHU_FRONTEND_STARTED);
    assert!(p.running);
    p
}

#[test]
fn a_start_and_a_stop_through_the_abi() {
    let mut p = started();
    // SAFETY: live engine.
    check(unsafe { vhu_frontend_stop(p.fe.at()) }, "stop");
    p.pump(&mut |p, queue, reply| {
        let base = p.stop_ring();
        let (r, n) = p.finish_stop(queue, base, reply, reply.len());
        check(r, "finish stop");
        n
    });
    assert_eq!(p.state(), vhu_frontend_state::VHU_FRONTEND_STOPPED);
}

/// A reply buffer too short for the GET_VRING_BASE reply is
/// `VHU_ERR_SHORT_BUFFER`, and the reply stays pending: the same call with
/// room for it gives the reply, which the front-end waits for.
#[test]
fn finish_stop_into_a_short_buffer_can_be_retried() {
    let mut p = started();
    // SAFETY: live engine.
    check(unsafe { vhu_frontend_stop(p.fe.at()) }, "stop");
    p.pump(&mut |p, queue, reply| {
        let base = p.stop_ring();
        let (r, n) = p.finish_stop(queue, base, reply, 8);
        assert_eq!(r, VHU_ERR_SHORT_BUFFER);
        assert_eq!(n, 0);
        let (r, n) = p.finish_stop(queue, base, reply, reply.len());
        check(r, "finish stop again");
        n
    });
    assert_eq!(p.state(), vhu_frontend_state::VHU_FRONTEND_STOPPED);
}

/// A message refused before the session saw it (here: shorter than a
/// header) leaves no action of the message before it to be read: index 0
/// is past the last action, as `out->actions` (0) says.
#[test]
fn a_refused_message_leaves_no_actions_of_the_one_before() {
    let mut p = Pair::new();
    let mut buf = [0u8; VHU_FRONTEND_MAX_TRANSMIT as usize];
    let mut reply = vec![0u8; VHU_MAX_MESSAGE as usize];
    let mem = p.mem();
    // Through the handshake and into the start, to the first message
    // with an action (the memory table's UNMAP_ALL and MAP_REGION).
    let mut actions = 0;
    while actions == 0 {
        let tx = p.transmit(&mut buf);
        if tx.len == 0 {
            // The handshake is done: the start sends the memory table.
            // SAFETY: live engine.
            check(unsafe { vhu_frontend_start(p.fe.at()) }, "start");
            continue;
        }
        let (r, out) = p.handle(&buf, tx.len, tx.nfds as usize, &mem, &mut reply);
        check(r, "handle");
        actions = out.actions;
        // SAFETY: live engine; the reply is `reply_len` bytes of `reply`.
        unsafe {
            if out.reply == vhu_reply_kind::VHU_REPLY_READY {
                check(
                    vhu_frontend_handle_reply(p.fe.at(), reply.as_ptr(), out.reply_len, 0),
                    "reply",
                );
            }
        }
    }
    let mut a = core::mem::MaybeUninit::new(vhu_action::default());
    // SAFETY: live session and out-value.
    let r = unsafe { vhu_backend_action(p.be.at(), 0, a.as_mut_ptr()) };
    check(r, "action 0");
    let (r, out) = p.handle(&buf, 5, 0, &mem, &mut reply);
    assert_eq!(r, VHU_ERR_SHORT_BUFFER);
    assert_eq!(out.actions, 0);
    // SAFETY: live session and out-value.
    let r = unsafe { vhu_backend_action(p.be.at(), 0, a.as_mut_ptr()) };
    assert_eq!(r, VHU_ERR_INVALID);
}

/// One buffer for the message and its reply (a firmware with a single
/// message buffer) would be read as the message while the reply is
/// written into it: refused with `VHU_ERR_INVALID` before the session sees
/// the message, whether the buffers are the same or only overlap.
#[test]
fn a_reply_buffer_that_overlaps_the_message_is_refused() {
    let mut p = Pair::new();
    let mem = p.mem();
    // GET_FEATURES: request 1, version 1, no payload.
    let get_features = [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let mut buf = vec![0u8; 2 * VHU_MAX_MESSAGE as usize];
    let mut out = core::mem::MaybeUninit::new(vhu_outcome::default());
    for (at, reply_at) in [(0, 0), (0, 11), (100, 0)] {
        buf[at..at + 12].copy_from_slice(&get_features);
        let base = buf.as_mut_ptr();
        // SAFETY: live session and table; both ranges lie inside `buf`.
        let r = unsafe {
            vhu_backend_handle(
                p.be.at(),
                base.add(at),
                12,
                0,
                &mem,
                ptr::null(),
                base.add(reply_at),
                VHU_MAX_MESSAGE as usize,
                out.as_mut_ptr(),
            )
        };
        assert_eq!(r, VHU_ERR_INVALID, "message at {at}, reply at {reply_at}");
    }
    // Adjacent buffers do not overlap: served.
    buf[..12].copy_from_slice(&get_features);
    let base = buf.as_mut_ptr();
    // SAFETY: as above.
    let r = unsafe {
        vhu_backend_handle(
            p.be.at(),
            base,
            12,
            0,
            &mem,
            ptr::null(),
            base.add(12),
            VHU_MAX_MESSAGE as usize,
            out.as_mut_ptr(),
        )
    };
    check(r, "adjacent buffers");
    // SAFETY: written by the successful call.
    assert_eq!(unsafe { out.assume_init() }.reply_len, 20);
}

/// A buffer that holds more than one message (a caller that read past the
/// size the header announces) is refused whole, by the back-end and by
/// the front-end, before either sees it: the bytes of the next message
/// would otherwise be lost. Nothing changes: the same message, exactly,
/// is served after.
#[test]
fn a_message_with_the_bytes_of_another_is_refused() {
    let mut p = Pair::new();
    let mem = p.mem();
    let mut buf = [0u8; VHU_FRONTEND_MAX_TRANSMIT as usize];
    let mut reply = vec![0u8; VHU_MAX_MESSAGE as usize];
    let tx = p.transmit(&mut buf);
    assert!(tx.awaits_reply, "the handshake begins with a question");
    // The message and the first bytes of a copy of it.
    let (first, rest) = buf.split_at_mut(tx.len);
    rest[..4].copy_from_slice(&first[..4]);
    for extra in [1, 4] {
        let (r, out) = p.handle(&buf, tx.len + extra, 0, &mem, &mut reply);
        assert_eq!(r, VHU_ERR_INVALID, "{extra} bytes past the message");
        assert_eq!(out.reply, vhu_reply_kind::VHU_REPLY_NONE);
    }
    let (r, out) = p.handle(&buf, tx.len, 0, &mem, &mut reply);
    check(r, "the message alone");
    assert_eq!(out.reply, vhu_reply_kind::VHU_REPLY_READY);
    let n = out.reply_len;
    // The reply and a byte more: refused, the engine still waiting for it.
    for len in [n + 1, n + 12] {
        // SAFETY: live engine; `len` bytes of `reply` are readable.
        let r = unsafe { vhu_frontend_handle_reply(p.fe.at(), reply.as_ptr(), len, 0) };
        assert_eq!(r, VHU_ERR_INVALID, "{} bytes past the reply", len - n);
        assert_ne!(p.state(), vhu_frontend_state::VHU_FRONTEND_FAILED);
    }
    // SAFETY: as above, the reply alone.
    check(
        unsafe { vhu_frontend_handle_reply(p.fe.at(), reply.as_ptr(), n, 0) },
        "the reply alone",
    );
    // The handshake goes on to the end.
    p.pump(&mut no_pending);
    assert_eq!(p.state(), vhu_frontend_state::VHU_FRONTEND_READY);
}

/// The guest's 4 KiB pages whose bits `log` has set.
fn dirty_pages(log: &[u8]) -> Vec<u64> {
    (0..log.len() as u64 * 8)
        .filter(|p| log[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

/// A migration's dirty log from one C engine to the other:
/// `vhu_frontend_start_logging` reaches the back-end as MAP_LOG (the log's
/// fd attached), SET_LOGGING and SET_RING_LOG (the used ring's guest
/// address); what the back-end then marks for a request it serves is the
/// data it wrote and its used ring, nothing it only read; and
/// `vhu_frontend_stop_logging` undoes it. A ring that starts while logging
/// is told by `vhu_backend_ring_log`.
#[test]
fn the_dirty_log_from_front_end_to_back_end() {
    const DATA: u64 = 0x8800;
    let features = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES | VHU_F_LOG_ALL;
    let protocol = VHU_PROTOCOL_F_MQ | VHU_PROTOCOL_F_REPLY_ACK | VHU_PROTOCOL_F_LOG_SHMFD;
    let mut p = started_from(Pair::offering(features, protocol));
    // 16 pages of guest memory: 2 bytes of bits, one word.
    let size = vhu_log_bitmap_size(GUEST as u64);
    assert_eq!(size, 8);
    // SAFETY: live engine.
    let r = unsafe { vhu_frontend_start_logging(p.fe.at(), 1) };
    assert_eq!(r, VHU_ERR_INVALID, "a log too small for the memory");
    p.log = vec![0; size as usize];
    // SAFETY: live engine.
    check(
        unsafe { vhu_frontend_start_logging(p.fe.at(), size) },
        "start logging",
    );
    // SAFETY: live engine.
    let r = unsafe { vhu_frontend_start_logging(p.fe.at(), size) };
    assert_eq!(r, VHU_ERR_BUSY, "logging already");
    p.pump(&mut no_pending);
    assert!(p.fds.contains(&vhu_fd_kind::VHU_FD_LOG), "{:?}", p.fds);
    assert_eq!(p.events.last(), Some(&vhu_event_kind::VHU_EVENT_LOGGING_ON));
    assert_eq!((p.log_mapped, p.log_all), (size, true));
    assert_eq!(p.ring_log, Some(USED));

    // The driver makes one chain available: a writable 4 KiB buffer
    // across pages 8 and 9.
    let g = p.guest.as_mut_ptr().cast::<u8>();
    let put = |at: u64, b: &[u8]| {
        assert!(at as usize + b.len() <= GUEST);
        // SAFETY: inside the guest buffer, which nothing else uses now.
        unsafe { ptr::copy_nonoverlapping(b.as_ptr(), g.add(at as usize), b.len()) };
    };
    put(DESC, &DATA.to_le_bytes());
    put(DESC + 8, &4096u32.to_le_bytes());
    put(DESC + 12, &2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
    put(AVAIL + 4, &0u16.to_le_bytes());
    put(AVAIL + 2, &1u16.to_le_bytes());
    let mem = p.mem();
    let region = vhu_region {
        gpa: 0,
        size: p.log_mapped,
        host: p.log.as_mut_ptr(),
    };
    let log = vhu_mem {
        regions: &region,
        count: 1,
        ops: ptr::null(),
    };
    let dp = p.dp.at::<vhu_dataplane>();
    let mut tok = vhu_token::default();
    let mut segs = [vhu_segment::default(); VHU_MAX_CHAIN as usize];
    let (mut n, mut pages) = (0usize, 0u64);
    let mut published = vhu_published::VHU_PUBLISHED_NOTHING;
    // SAFETY: live data plane; the tables map the guest and the log, the
    // out-values are live.
    unsafe {
        let r = vhu_dataplane_pop(
            dp,
            &mem,
            ptr::null(),
            &mut tok,
            segs.as_mut_ptr(),
            segs.len(),
            &mut n,
        );
        check(r, "pop");
        assert_eq!((n, segs[0].addr, segs[0].writable), (1, DATA, true));
        // The device writes the buffer (here: the test), marks it, then
        // completes and publishes, then marks the used ring.
        put(DATA, &[0xab; 4096]);
        assert!(p.log_all);
        let r = vhu_log_mark_written(&log, size, segs.as_ptr(), n, 4096, &mut pages);
        check(r, "mark written");
        let r = vhu_dataplane_complete(dp, &mem, ptr::null(), tok.handle, 4096, &mut published);
        check(r, "complete");
        check(
            vhu_dataplane_publish(dp, &mem, ptr::null(), &mut published),
            "publish",
        );
        let at = p.ring_log.unwrap();
        check(
            vhu_dataplane_log_used(dp, &log, size, at, &mut pages),
            "log used",
        );
    }
    assert_eq!(pages, 3);
    assert_eq!(dirty_pages(&p.log), [USED / 4096, 8, 9]);

    // A restart while logging: the ring is logged from its start.
    // SAFETY: live engine.
    check(unsafe { vhu_frontend_stop(p.fe.at()) }, "stop");
    p.pump(&mut |p, queue, reply| {
        let base = p.stop_ring();
        let (r, n) = p.finish_stop(queue, base, reply, reply.len());
        check(r, "finish stop");
        n
    });
    p.ring_log = None;
    // SAFETY: live engine.
    check(unsafe { vhu_frontend_start(p.fe.at()) }, "start");
    p.pump(&mut no_pending);
    assert!(p.running);
    assert_eq!(p.ring_log, Some(USED));

    // SAFETY: live engine.
    check(
        unsafe { vhu_frontend_stop_logging(p.fe.at()) },
        "stop logging",
    );
    p.pump(&mut no_pending);
    assert_eq!(
        p.events.last(),
        Some(&vhu_event_kind::VHU_EVENT_LOGGING_OFF)
    );
    assert!(!p.log_all);
    assert_eq!(p.ring_log, None);
    // SAFETY: live engine.
    let r = unsafe { vhu_frontend_stop_logging(p.fe.at()) };
    assert_eq!(r, VHU_ERR_BUSY, "not logging");
}

/// A back-end that does not offer VHOST_F_LOG_ALL cannot be asked to log.
#[test]
fn logging_needs_a_back_end_that_offers_it() {
    let mut p = started();
    // SAFETY: live engine.
    let r = unsafe { vhu_frontend_start_logging(p.fe.at(), 4096) };
    assert_eq!(r, VHU_ERR_UNSUPPORTED);
    assert!(p.fds.iter().all(|f| *f != vhu_fd_kind::VHU_FD_LOG));
}

/// A device state transfer from one C engine to the other: the
/// front-end's SET_DEVICE_STATE_FD attaches the channel's fd and gives
/// the back-end's host its TRANSFER_STATE action; the accepted transfer
/// is an event, and CHECK_DEVICE_STATE, pending at the back-end until
/// `vhu_backend_finish_transfer`, ends as STATE_CHECKED; a save, then a
/// load. While started (not suspended) the front-end refuses.
#[test]
fn a_device_state_transfer_from_front_end_to_back_end() {
    use vhu_event_kind::*;
    let features = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES;
    let protocol = VHU_PROTOCOL_F_MQ | VHU_PROTOCOL_F_REPLY_ACK | VHU_PROTOCOL_F_DEVICE_STATE;
    let mut p = started_from(Pair::offering(features, protocol));
    // SAFETY: live engine.
    let r = unsafe { vhu_frontend_transfer_state(p.fe.at(), true) };
    assert_eq!(r, VHU_ERR_BUSY, "not while started");
    // SAFETY: live engine.
    check(unsafe { vhu_frontend_stop(p.fe.at()) }, "stop");
    p.pump(&mut |p, queue, reply| {
        let base = p.stop_ring();
        let (r, n) = p.finish_stop(queue, base, reply, reply.len());
        check(r, "finish stop");
        n
    });
    for save in [true, false] {
        p.events.clear();
        p.fds.clear();
        p.transfer(save);
        assert_eq!(p.fds, [vhu_fd_kind::VHU_FD_DEVICE_STATE]);
        assert_eq!(p.transfers.last(), Some(&save));
        assert_eq!(
            p.events,
            [VHU_EVENT_STATE_TRANSFER, VHU_EVENT_STATE_CHECKED]
        );
    }
    assert_eq!(p.transfers, [true, false]);
    assert_eq!(p.state(), vhu_frontend_state::VHU_FRONTEND_STOPPED);

    // A transfer the back-end fails: CHECK_DEVICE_STATE's reply is
    // VHU_ERR_NACK, and the engine goes on (ABI 1.2): still stopped, the
    // next transfer is taken, and the device starts again.
    p.transfers_ok = false;
    p.events.clear();
    p.transfer(true);
    assert_eq!(p.state_nacks, 1);
    assert_eq!(p.events, [VHU_EVENT_STATE_TRANSFER]);
    assert_eq!(p.state(), vhu_frontend_state::VHU_FRONTEND_STOPPED);
    p.transfers_ok = true;
    p.transfer(false);
    assert_eq!(p.events.last(), Some(&VHU_EVENT_STATE_CHECKED));
    assert_eq!(p.transfers, [true, false, true, false]);
    // SAFETY: live engine.
    check(unsafe { vhu_frontend_start(p.fe.at()) }, "start");
    p.pump(&mut no_pending);
    assert!(p.running);
    assert_eq!(p.state(), vhu_frontend_state::VHU_FRONTEND_STARTED);
}

/// Without DEVICE_STATE negotiated the front-end sends nothing.
#[test]
fn a_transfer_needs_device_state_negotiated() {
    let mut p = Pair::new();
    p.pump(&mut no_pending);
    // SAFETY: live engine.
    let r = unsafe { vhu_frontend_transfer_state(p.fe.at(), true) };
    assert_eq!(r, VHU_ERR_NOT_NEGOTIATED);
    // SAFETY: live engine.
    let r = unsafe { vhu_frontend_check_state(p.fe.at()) };
    assert_eq!(r, VHU_ERR_NOT_NEGOTIATED);
}

/// The back-end channel from one C engine to the other: a ring without a
/// call eventfd gets its calls in-band (SET_CALL's `flag`), and the
/// back-end's `vhu_channel` encodes BACKEND_VRING_CALL, BACKEND_VRING_ERR
/// and CONFIG_CHANGE_MSG that the front-end serves as notices, its acks
/// taken by `vhu_channel_reply`; one request at a time; an ack nobody
/// awaits, or a malformed one, is refused.
#[test]
fn the_back_end_channel_from_back_end_to_front_end() {
    use vhu_notice_kind::*;
    let features = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES;
    let protocol = VHU_PROTOCOL_F_MQ
        | VHU_PROTOCOL_F_REPLY_ACK
        | VHU_PROTOCOL_F_CONFIG
        | VHU_PROTOCOL_F_BACKEND_REQ
        | VHU_PROTOCOL_F_INBAND_NOTIFICATIONS;
    let mut p = started_from(Pair::offering(features, protocol));
    assert!(p.channel_set);
    assert!(p.fds.contains(&vhu_fd_kind::VHU_FD_BACKEND_CHANNEL));
    // The Pair's ring polls: no call eventfd, so calls go in-band.
    assert!(
        p.notifiers.contains(&(true, 0, -1, true)),
        "{:?}",
        p.notifiers
    );
    let mut store = vec![0u64; vhu_channel_size() / 8 + 1];
    assert!(vhu_channel_align() <= 8);
    let ch: *mut vhu_channel = store.as_mut_ptr().cast();
    // SAFETY: live session; storage of the channel's size, aligned to 8.
    check(
        unsafe { vhu_backend_channel(p.be.at(), ch, vhu_channel_size()) },
        "channel",
    );
    let mut buf = [0u8; 64];
    let mut ack = [0u8; VHU_FRONTEND_MAX_ACK as usize];
    let (mut len, mut awaits) = (0usize, false);
    // Sends what `send` encodes to the front-end and its ack back.
    let mut round = |p: &mut Pair, send: &dyn Fn(*mut u8, &mut usize, &mut bool) -> vhu_result| {
        check(send(buf.as_mut_ptr(), &mut len, &mut awaits), "send");
        assert!(awaits, "REPLY_ACK: every request is acked");
        let mut notice = vhu_backend_notice::default();
        // SAFETY: live engine, message, ack buffer and out-value.
        let r = unsafe {
            vhu_frontend_serve_backend(
                p.fe.at(),
                buf.as_ptr(),
                len,
                0,
                ack.as_mut_ptr(),
                ack.len(),
                &mut notice,
            )
        };
        check(r, "serve");
        // A second request before the ack: busy.
        let (mut l2, mut a2) = (0usize, false);
        // SAFETY: live channel and out-buffers.
        let busy = unsafe { vhu_channel_config_change(ch, buf.as_mut_ptr(), 64, &mut l2, &mut a2) };
        assert_eq!(busy, VHU_ERR_BUSY);
        // SAFETY: live channel; the ack is `ack_len` bytes of `ack`.
        check(
            unsafe { vhu_channel_reply(ch, ack.as_ptr(), notice.ack_len, 0) },
            "ack",
        );
        (notice.kind, notice.queue)
    };
    let call = |b: *mut u8, l: &mut usize, a: &mut bool| {
        // SAFETY: live channel; `b` is `round`'s 64-byte buffer.
        unsafe { vhu_channel_vring_call(ch, 0, b, 64, l, a) }
    };
    let err = |b: *mut u8, l: &mut usize, a: &mut bool| {
        // SAFETY: as above.
        unsafe { vhu_channel_vring_err(ch, 0, b, 64, l, a) }
    };
    let config = |b: *mut u8, l: &mut usize, a: &mut bool| {
        // SAFETY: as above.
        unsafe { vhu_channel_config_change(ch, b, 64, l, a) }
    };
    assert_eq!(round(&mut p, &call), (VHU_NOTICE_CALL, 0));
    assert_eq!(round(&mut p, &err), (VHU_NOTICE_RING_ERROR, 0));
    assert_eq!(round(&mut p, &config), (VHU_NOTICE_CONFIG_CHANGED, 0));

    // SAFETY: live channel; `ack` holds the last ack.
    unsafe {
        // No ack awaited now.
        assert_eq!(vhu_channel_reply(ch, ack.as_ptr(), 20, 0), VHU_ERR_PROTOCOL);
        // A short buffer: nothing awaited after it.
        let r = vhu_channel_vring_call(ch, 0, buf.as_mut_ptr(), 4, &mut len, &mut awaits);
        assert_eq!(r, VHU_ERR_SHORT_BUFFER);
        // A reply cut short: refused, and the ack is void.
        check(
            vhu_channel_vring_call(ch, 0, buf.as_mut_ptr(), 64, &mut len, &mut awaits),
            "call",
        );
        assert_eq!(
            vhu_channel_reply(ch, ack.as_ptr(), 5, 0),
            VHU_ERR_SHORT_BUFFER
        );
        // Given up: free again.
        check(
            vhu_channel_vring_call(ch, 0, buf.as_mut_ptr(), 64, &mut len, &mut awaits),
            "call",
        );
        check(vhu_channel_abandon(ch), "abandon");
        check(
            vhu_channel_config_change(ch, buf.as_mut_ptr(), 64, &mut len, &mut awaits),
            "config",
        );
    }
}

/// Without BACKEND_REQ there is no channel; without CONFIG or
/// INBAND_NOTIFICATIONS a channel refuses their requests.
#[test]
fn a_channel_sends_only_what_was_negotiated() {
    let mut p = started();
    let mut store = vec![0u64; vhu_channel_size() / 8 + 1];
    let ch: *mut vhu_channel = store.as_mut_ptr().cast();
    // SAFETY: live session; storage of the channel's size.
    let r = unsafe { vhu_backend_channel(p.be.at(), ch, vhu_channel_size()) };
    assert_eq!(r, VHU_ERR_STATE);
    let features = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES;
    let protocol = VHU_PROTOCOL_F_MQ | VHU_PROTOCOL_F_REPLY_ACK | VHU_PROTOCOL_F_BACKEND_REQ;
    let mut p = started_from(Pair::offering(features, protocol));
    assert!(
        p.notifiers.iter().all(|n| !n.3),
        "no in-band: {:?}",
        p.notifiers
    );
    let (mut buf, mut len, mut awaits) = ([0u8; 64], 0usize, false);
    // SAFETY: live session, channel storage and out-buffers.
    unsafe {
        check(
            vhu_backend_channel(p.be.at(), ch, vhu_channel_size()),
            "channel",
        );
        let r = vhu_channel_vring_call(ch, 0, buf.as_mut_ptr(), 64, &mut len, &mut awaits);
        assert_eq!(r, VHU_ERR_NOT_NEGOTIATED);
        let r = vhu_channel_config_change(ch, buf.as_mut_ptr(), 64, &mut len, &mut awaits);
        assert_eq!(r, VHU_ERR_NOT_NEGOTIATED);
    }
}

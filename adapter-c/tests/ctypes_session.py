"""The C ABI from a second language: Python's ctypes (standard library
only) loads the cdylib, drives the front-end engine against the back-end
session in memory through a handshake and a start, serves a virtio-blk
READ through the data plane and the blk planner as a guest driver would
see it, stops the ring, and checks the error codes of misuse.

Usage: python3 ctypes_session.py PATH/TO/libvhost_user_c.so
"""

import ctypes as C
import struct
import sys

lib = C.CDLL(sys.argv[1])

u8, u16, u32, u64, sz = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64, C.c_size_t

VHU_OK, VHU_ERR_NULL, VHU_ERR_ALIGN, VHU_ERR_SIZE = 0, 1, 2, 3
VHU_ERR_SHORT_BUFFER, VHU_ERR_INVALID, VHU_ERR_STATE, VHU_ERR_WIRE = 4, 5, 6, 7
VHU_ERR_NOT_OUTSTANDING, VHU_ERR_ABI = 16, 24
VHU_F_PROTOCOL_FEATURES = 1 << 30
VHU_VIRTIO_F_VERSION_1 = 1 << 32
PROTOCOL = (1 << 0) | (1 << 3) | (1 << 9)  # MQ, REPLY_ACK, CONFIG

# The ABI version these declarations were written against (VHU_ABI_MAJOR,
# VHU_ABI_MINOR of vhu.h): the library must serve it before anything else
# is called; a newer minor than the library's, or another major, it refuses.
ABI_MAJOR, ABI_MINOR = 1, 0
lib.vhu_abi_check.argtypes = [u32]
lib.vhu_abi_version.restype = u32
assert lib.vhu_abi_check((ABI_MAJOR << 16) | ABI_MINOR) == VHU_OK, hex(lib.vhu_abi_version())
assert lib.vhu_abi_version() >> 16 == ABI_MAJOR
assert lib.vhu_abi_check(lib.vhu_abi_version() + 1) == VHU_ERR_ABI
assert lib.vhu_abi_check((ABI_MAJOR + 1) << 16) == VHU_ERR_ABI


class Versioned(C.Structure):
    """A struct that may grow, handed in or written out: `struct_size` first,
    set to the struct's size (what VHU_X_INIT does in C)."""
    _fields_ = [("struct_size", sz)]

    def __init__(self, *args, **kw):
        super().__init__(C.sizeof(type(self)), *args, **kw)


class Region(C.Structure):
    _fields_ = [("gpa", u64), ("size", u64), ("host", C.c_void_p)]


class Mem(C.Structure):
    _fields_ = [("regions", C.POINTER(Region)), ("count", sz), ("ops", C.c_void_p)]


class MemRegion(C.Structure):
    _fields_ = [("guest_addr", u64), ("size", u64), ("user_addr", u64), ("mmap_offset", u64)]


class BackendConfig(Versioned):
    _fields_ = [("features", u64), ("protocol_features", u64), ("num_queues", u16),
                ("max_queue_size", u16)]


class Outcome(Versioned):
    _fields_ = [("reply", u32), ("reply_len", sz), ("queue", u16), ("actions", u32),
                ("refused", u32)]


class Action(Versioned):
    _fields_ = [("kind", u32), ("queue", u16), ("slot", u16), ("fd", C.c_int32),
                ("flag", C.c_bool), ("region", MemRegion), ("offset", u64), ("size", u64)]


class RingAddrs(C.Structure):
    _fields_ = [("desc", u64), ("driver", u64), ("device", u64)]


class QueueConfig(C.Structure):
    _fields_ = [("size", u16), ("addrs", RingAddrs), ("base", u32), ("kick_polling", u8),
                ("call_polling", u8)]


class FrontendConfig(Versioned):
    _fields_ = [("features", u64), ("protocol_features", u64),
                ("queues", C.POINTER(QueueConfig)), ("num_queues", sz),
                ("regions", C.POINTER(MemRegion)), ("num_regions", sz)]


class FdRef(C.Structure):
    _fields_ = [("kind", u32), ("index", u16)]


class Transmit(Versioned):
    _fields_ = [("request", u32), ("len", sz), ("awaits_reply", C.c_bool), ("nfds", u32),
                ("fds", FdRef * 8)]


class Event(Versioned):
    _fields_ = [("kind", u32), ("queue", u16), ("base", u32), ("features", u64),
                ("protocol_features", u64), ("offset", u32), ("len", u32), ("data", u8 * 256)]


class Token(Versioned):
    _fields_ = [("handle", u32), ("id", u16), ("side_effects", C.c_bool)]


class Segment(C.Structure):
    _fields_ = [("addr", u64), ("len", u32), ("writable", C.c_bool)]


class BlkConfig(Versioned):
    _fields_ = [("capacity", u64), ("blk_size", u32), ("num_queues", u16), ("seg_max", u32),
                ("size_max", u32), ("read_only", u8), ("flush", u8), ("config_wce", u8),
                ("writeback", u8), ("serial", u8 * 20)]


class BlkOp(Versioned):
    _fields_ = [("kind", u32), ("offset", u64), ("len", u64), ("status", u32),
                ("sync_after", C.c_bool)]


class Device(Versioned):
    _fields_ = [("ctx", C.c_void_p), ("read_config", C.c_void_p), ("write_config", C.c_void_p),
                ("features_acked", C.c_void_p), ("reset", C.c_void_p),
                ("set_mtu", C.c_void_p), ("send_rarp", C.c_void_p)]


for name in ["backend", "frontend", "blk", "blk_request"]:
    getattr(lib, f"vhu_{name}_size").restype = sz
    getattr(lib, f"vhu_{name}_align").restype = sz
lib.vhu_dataplane_size.restype = sz
lib.vhu_dataplane_size.argtypes = [u16]
lib.vhu_dataplane_align.restype = sz
lib.vhu_result_str.restype = C.c_char_p
lib.vhu_result_str.argtypes = [u32]
lib.vhu_backend_handle.argtypes = [C.c_void_p, C.c_void_p, sz, sz, C.c_void_p, C.c_void_p,
                                   C.c_void_p, sz, C.c_void_p]
lib.vhu_backend_action.argtypes = [C.c_void_p, sz, C.c_void_p]
lib.vhu_backend_start_ring.argtypes = [C.c_void_p, u16, C.c_void_p, C.c_void_p, C.c_bool,
                                       C.c_void_p, sz]
lib.vhu_backend_finish_stop.argtypes = [C.c_void_p, u16, u32, C.c_void_p, sz, C.c_void_p]
lib.vhu_frontend_poll_transmit.argtypes = [C.c_void_p, C.c_void_p, sz, C.c_void_p]
lib.vhu_frontend_handle_reply.argtypes = [C.c_void_p, C.c_void_p, sz, sz]
lib.vhu_dataplane_pop.argtypes = [C.c_void_p] * 5 + [sz, C.c_void_p]
lib.vhu_dataplane_complete.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p, u32, u32,
                                       C.c_void_p]
lib.vhu_dataplane_set_enabled.argtypes = [C.c_void_p, C.c_bool]
lib.vhu_dataplane_stop.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p, C.c_bool, C.c_void_p,
                                   C.c_void_p, C.c_void_p]
lib.vhu_blk_plan.argtypes = [C.c_void_p, C.c_void_p, sz, C.c_void_p, C.c_void_p]
lib.vhu_blk_request_write_data.argtypes = [C.c_void_p, C.c_void_p, u64, C.c_void_p, sz]
lib.vhu_blk_request_finish.argtypes = [C.c_void_p, C.c_void_p, u32, C.c_void_p]


def check(r, what):
    assert r == VHU_OK, f"{what}: {lib.vhu_result_str(r).decode()}"


def storage(size, align):
    """`size` bytes aligned to `align`, kept alive with their buffer."""
    buf = C.create_string_buffer(size + align)
    addr = (C.addressof(buf) + align - 1) & ~(align - 1)
    return buf, C.c_void_p(addr)


# --- Misuse is an error code, never a crash. -------------------------------
be_buf, be = storage(lib.vhu_backend_size(), lib.vhu_backend_align())
cfg = BackendConfig(0, 0, 1, 8)
assert lib.vhu_backend_init(None, 4096, C.byref(cfg)) == VHU_ERR_NULL
assert lib.vhu_backend_init(be, lib.vhu_backend_size() - 1, C.byref(cfg)) == VHU_ERR_SIZE
assert lib.vhu_backend_init(C.c_void_p(be.value + 1), 1 << 20, C.byref(cfg)) == VHU_ERR_ALIGN
out = Outcome()
msg = (u8 * 12)()
reply = (u8 * 4108)()
# Zeroed storage is not a session.
r = lib.vhu_backend_handle(be, msg, 12, 0, None, None, reply, 4108, C.byref(out))
assert r == VHU_ERR_STATE, r
print("sizes:", {n: getattr(lib, f"vhu_{n}_size")()
                 for n in ["backend", "frontend", "blk", "blk_request"]},
      "dataplane(256):", lib.vhu_dataplane_size(256))

# --- A blk device and a back-end session. ----------------------------------
blk_buf, blk = storage(lib.vhu_blk_size(), lib.vhu_blk_align())
serial = (u8 * 20)(*b"vhu-ctypes".ljust(20, b"\0"))
bcfg = BlkConfig(2048, 512, 1, 14, 0, 0, 1, 0, 1, serial)
check(lib.vhu_blk_init(blk, lib.vhu_blk_size(), C.byref(bcfg)), "blk init")
dev_features = u64()
check(lib.vhu_blk_offered_features(blk, C.byref(dev_features)), "blk features")
dev = Device()
check(lib.vhu_blk_device(blk, C.byref(dev)), "blk device")

cfg = BackendConfig(VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES | dev_features.value,
                    PROTOCOL, 1, 256)
check(lib.vhu_backend_init(be, lib.vhu_backend_size(), C.byref(cfg)), "backend init")
# A truncated message is refused; the session stays usable.
assert lib.vhu_backend_handle(be, msg, 5, 0, None, None, reply, 4108,
                              C.byref(out)) == VHU_ERR_SHORT_BUFFER
bad = (u8 * 12)(*struct.pack("<III", 1, 7, 0))  # version 3: malformed
assert lib.vhu_backend_handle(be, bad, 12, 0, None, None, reply, 4108,
                              C.byref(out)) == VHU_ERR_WIRE
# An outcome whose struct_size is not this library's: refused, not written.
stale = Outcome(reply=7, actions=7)
stale.struct_size += 8
assert lib.vhu_backend_handle(be, msg, 12, 0, None, None, reply, 4108,
                              C.byref(stale)) == VHU_ERR_ABI
assert (stale.struct_size, stale.reply, stale.actions) == (C.sizeof(Outcome) + 8, 7, 7)

# --- Guest memory: one region of 1 MiB at guest address 0. ------------------
GUEST = 1 << 20
VA = 0x7000_0000
guest_buf, guest = storage(GUEST, 4096)
table = (Region * 32)()
mem = Mem(table, 32)
area = None

QSIZE = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
HDR, DATA, STATUS = 0x10000, 0x11000, 0x12000

fq = (QueueConfig * 1)(QueueConfig(QSIZE, RingAddrs(VA + DESC, VA + AVAIL, VA + USED), 0, 1, 1))
fr = (MemRegion * 1)(MemRegion(0, GUEST, VA, 0))
fcfg = FrontendConfig(VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES, PROTOCOL, fq, 1, fr, 1)
fe_buf, fe = storage(lib.vhu_frontend_size(), lib.vhu_frontend_align())
check(lib.vhu_frontend_init(fe, lib.vhu_frontend_size(), C.byref(fcfg)), "frontend init")

dp_size = lib.vhu_dataplane_size(256)
dp_buf, dp = storage(dp_size, lib.vhu_dataplane_align())
events = []
started = []
enabled = []


def stop_ring(queue, suspend):
    stopped, base = C.c_bool(), u32()
    check(lib.vhu_dataplane_stop(dp, C.byref(mem), area, suspend, C.byref(stopped),
                                 C.byref(base), None), "stop")
    assert stopped.value, "nothing is outstanding: the ring stops at once"
    return base.value


def apply(i):
    a = Action()
    check(lib.vhu_backend_action(be, i, C.byref(a)), "action")
    if a.kind == 0:  # UNMAP_ALL
        for e in table:
            e.host, e.size = None, 0
    elif a.kind == 1:  # MAP_REGION: the "fd" is the guest buffer itself
        r = a.region
        table[a.slot] = Region(r.guest_addr, r.size, guest.value + r.mmap_offset)
    elif a.kind == 7:  # START_RING
        check(lib.vhu_backend_start_ring(be, a.queue, C.byref(mem), area, False, dp, dp_size),
              "start ring")
        started.append(a.queue)
    elif a.kind == 12:  # SET_ENABLED: the ring starts disabled until then
        check(lib.vhu_dataplane_set_enabled(dp, a.flag), "enable")
        enabled.append(a.flag)


def pump():
    """Runs the front-end against the back-end until neither has work."""
    buf = (u8 * 280)()
    while True:
        tx = Transmit()
        check(lib.vhu_frontend_poll_transmit(fe, buf, 280, C.byref(tx)), "transmit")
        while True:
            ev = Event()
            check(lib.vhu_frontend_poll_event(fe, C.byref(ev)), "event")
            if ev.kind == 0:
                break
            events.append((ev.kind, ev.queue, ev.base))
        if tx.len == 0:
            return
        r = lib.vhu_backend_handle(be, buf, tx.len, tx.nfds, C.byref(mem), C.byref(dev),
                                   reply, 4108, C.byref(out))
        check(r, f"handle request {tx.request}")
        assert out.refused == VHU_OK, out.refused
        for i in range(out.actions):
            apply(i)
        n = out.reply_len
        if out.reply == 2:  # PENDING: stop the ring, then the reply
            base = stop_ring(out.queue, False)
            n = sz()
            check(lib.vhu_backend_finish_stop(be, out.queue, base, reply, 4108, C.byref(n)),
                  "finish stop")
            n = n.value
        elif out.reply == 0:
            assert not tx.awaits_reply, f"request {tx.request} got no reply"
            continue
        check(lib.vhu_frontend_handle_reply(fe, reply, n, 0), f"reply to {tx.request}")


pump()
assert events[0][0] == 1, events  # NEGOTIATED
check(lib.vhu_frontend_start(fe), "start")
pump()
assert (4, 0, 0) in events, events  # STARTED
assert started == [0] and enabled == [True], (started, enabled)
assert table[0].size == GUEST and table[0].host == guest.value

# --- The guest driver: one READ of sector 1, three descriptors. -------------
g = (C.c_char * GUEST).from_address(guest.value)
struct.pack_into("<QIHH", g, DESC + 0, HDR, 16, 1, 1)        # NEXT
struct.pack_into("<QIHH", g, DESC + 16, DATA, 512, 3, 2)     # NEXT | WRITE
struct.pack_into("<QIHH", g, DESC + 32, STATUS, 1, 2, 0)     # WRITE
struct.pack_into("<IIQ", g, HDR, 0, 0, 1)                    # IN, sector 1
g[STATUS] = b"\xff"
struct.pack_into("<HHH", g, AVAIL, 0, 1, 0)                  # flags, idx 1, ring[0] = 0

tok = Token()
segs = (Segment * 64)()
nsegs = sz()
assert lib.vhu_dataplane_pop(dp, C.byref(mem), area, C.byref(tok), segs, 8,
                             C.byref(nsegs)) == VHU_ERR_SHORT_BUFFER
check(lib.vhu_dataplane_pop(dp, C.byref(mem), area, C.byref(tok), segs, 64, C.byref(nsegs)),
      "pop")
assert tok.handle != 0xFFFFFFFF and tok.id == 0 and tok.side_effects
assert nsegs.value == 3 and segs[1].addr == DATA and segs[1].writable, list(segs[:3])

req_buf, req = storage(lib.vhu_blk_request_size(), lib.vhu_blk_request_align())
check(lib.vhu_blk_request_init(req, lib.vhu_blk_request_size()), "request init")
check(lib.vhu_blk_plan(blk, segs, nsegs.value, C.byref(mem), req), "plan")
op = BlkOp()
check(lib.vhu_blk_request_op(req, C.byref(op)), "op")
assert (op.kind, op.offset, op.len) == (0, 512, 512), (op.kind, op.offset, op.len)
disk = bytes((i * 7 + 3) & 0xFF for i in range(512))
check(lib.vhu_blk_request_write_data(req, C.byref(mem), 0, disk, 512), "write data")
# Past the data's end: refused, and nothing is copied.
assert lib.vhu_blk_request_write_data(req, C.byref(mem), 1, disk, 512) == VHU_ERR_INVALID
used = u32()
check(lib.vhu_blk_request_finish(req, C.byref(mem), 0, C.byref(used)), "finish")
assert used.value == 513
pub = u32()
check(lib.vhu_dataplane_complete(dp, C.byref(mem), area, tok.handle, used.value,
                                 C.byref(pub)), "complete")
assert lib.vhu_dataplane_complete(dp, C.byref(mem), area, tok.handle, 0,
                                  None) == VHU_ERR_NOT_OUTSTANDING
check(lib.vhu_dataplane_publish(dp, C.byref(mem), area, C.byref(pub)), "publish")
assert pub.value == 1, pub.value  # NOTIFY: no suppression asked

flags, idx = struct.unpack_from("<HH", g, USED)
uid, ulen = struct.unpack_from("<II", g, USED + 4)
assert (idx, uid, ulen) == (1, 0, 513), (idx, uid, ulen)
assert bytes(g[DATA:DATA + 512]) == disk
assert g[STATUS] == b"\x00"

# Nothing more to pop.
check(lib.vhu_dataplane_pop(dp, C.byref(mem), area, C.byref(tok), segs, 64, C.byref(nsegs)),
      "pop empty")
assert tok.handle == 0xFFFFFFFF and nsegs.value == 0

# --- Stop: GET_VRING_BASE is pending until the ring stops. ------------------
check(lib.vhu_frontend_stop(fe), "stop")
pump()
assert (5, 0, 1) in events, events  # RING_STOPPED at base 1
assert events[-1][0] == 6, events   # STOPPED
print("ctypes: handshake, start, one READ, stop: ok")

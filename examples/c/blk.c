/*
 * vhu-c-blk: a vhost-user-blk back-end written in C against vhu.h and libc
 * only (socket, recvmsg with SCM_RIGHTS, mmap, eventfd reads and writes,
 * poll). The vhost-user protocol, the rings and the virtio-blk request
 * format are the core's business, through the C ABI; this file does the
 * I/O: the socket, the memory mappings, the notifiers and the disk file.
 *
 *   vhu-c-blk --socket-path PATH --blk-file FILE [--num-queues N]
 *             [--queue-size N] [--io-delay-us N] [--log-level LEVEL (ignored)]
 *
 * SIGHUP: the image was resized; the new capacity is announced to the
 * front-end with CONFIG_CHANGE_MSG on the back-end channel.
 *
 * --io-delay-us holds each request that long before it completes (so a
 * test can kill the back-end with requests in flight: they are recorded
 * in the inflight area, and the next back-end resubmits them).
 *
 * One front-end at a time, served on one thread: a poll loop over the
 * socket and the rings' kick eventfds. Every request completes before the
 * next is popped (pread/pwrite on the file), so a stop never has to wait.
 *
 * Live migration: with LOG_SHMFD and VHOST_F_LOG_ALL negotiated, the pages
 * a request wrote (read data, status byte) are marked in the front-end's
 * dirty log before the request completes, and a logged ring's used ring
 * after every round. With DEVICE_STATE the device's state (the driver's
 * cache mode and the inflight area: the requests suspended at the stop)
 * goes through the front-end's pipe, after the SET_DEVICE_STATE_FD reply,
 * within a deadline (a front-end that never reads or closes its end
 * fails the transfer rather than hold this thread).
 *
 * The back-end channel (BACKEND_REQ): CONFIG_CHANGE_MSG after a resize,
 * and, with INBAND_NOTIFICATIONS, the calls of a ring whose front-end gave
 * no call eventfd (BACKEND_VRING_CALL); each request's ack is awaited
 * within a deadline, and a front-end that does not ack loses the channel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "vhu.h"

#define LOG(...) (fprintf(stderr, "vhu-c-blk: " __VA_ARGS__), fputc('\n', stderr))

/* Bytes moved between the file and guest memory at a time. */
#define BOUNCE (128u << 10)

struct ring {
    vhu_dataplane *dp;      /* storage: vhu_dataplane_size(max queue size) */
    vhu_blk_request *req;   /* the plan of the request in progress */
    bool running;
    bool broken;
    bool suspend;           /* STOP_RING: suspend instead of draining */
    bool logged;            /* the used ring is marked in the dirty log */
    bool call_in_band;      /* no call eventfd: BACKEND_VRING_CALL */
    uint64_t log_addr;      /* ... at this guest address */
    int kick, call, err;
};

struct mapping {
    void *base;             /* what mmap returned (NULL: unused) */
    size_t len;
};

static struct {
    int disk;
    uint64_t disk_size;
    uint16_t queues, queue_size;
    unsigned long io_delay_us;
    vhu_backend *be;
    vhu_blk *blk;
    vhu_device dev;
    vhu_backend_config config;
    vhu_blk_config blk_config;
    vhu_region regions[VHU_MAX_REGIONS];
    struct mapping maps[VHU_MAX_REGIONS];
    vhu_mem mem;
    vhu_region area_region;
    struct mapping area_map;
    vhu_mem area;           /* count 0 while no inflight area is mapped */
    vhu_region log_region;
    struct mapping log_map;
    vhu_mem log;            /* the dirty log: count 0 while none is mapped */
    bool log_all;           /* VHOST_F_LOG_ALL: device writes are marked */
    int log_fd;             /* signalled after marking (SET_LOG_FD) */
    unsigned long logged_pages, log_refused;
    struct ring rings[VHU_MAX_QUEUES];
    int reply_fd;           /* sent with the next reply (GET_INFLIGHT_FD) */
    int transfer_fd;        /* TRANSFER_STATE's pipe end: run after the reply */
    int channel_fd;         /* the back-end channel (-1: none) */
    vhu_channel *channel;
    bool transfer_save;
    bool transfer_ok;       /* how the last transfer ended (CHECK_DEVICE_STATE) */
    unsigned long requests;
    unsigned char bounce[BOUNCE];
} S;

static void *alloc_state(size_t size, size_t align)
{
    size_t n = (size + align - 1) / align * align;
    void *p = aligned_alloc(align, n);
    if (!p) {
        LOG("out of memory");
        exit(1);
    }
    memset(p, 0, n);
    return p;
}

static int check(vhu_result r, const char *what)
{
    if (r != VHU_OK) {
        LOG("%s: %s", what, vhu_result_str(r));
        return -1;
    }
    return 0;
}

static const vhu_mem *area(void)
{
    return S.area.count ? &S.area : NULL;
}

static void unmap(struct mapping *m)
{
    if (m->base)
        munmap(m->base, m->len);
    m->base = NULL;
    m->len = 0;
}

/*
 * Whether `fd` can back `[offset, offset + size)` for as long as it is
 * mapped: the range lies inside the file, and a memfd is sealed against
 * shrinking (sealed here if the front-end allowed sealing; a memfd that
 * can neither be sealed nor is sealed already is refused, since shrinking
 * it under the mapping would kill this process with SIGBUS on the next
 * guest access). Files that take no seals (a hugetlbfs or disk file) are
 * the front-end's shared memory as it gave it.
 */
static int fd_can_back(int fd, uint64_t offset, uint64_t size)
{
    struct stat st;
    if (fstat(fd, &st)) {
        LOG("region fd: %s", strerror(errno));
        return 0;
    }
    if (S_ISREG(st.st_mode) &&
        (offset > (uint64_t)st.st_size || size > (uint64_t)st.st_size - offset)) {
        LOG("region %llu+%llu past the end of its %lld-byte file",
            (unsigned long long)offset, (unsigned long long)size, (long long)st.st_size);
        return 0;
    }
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) == 0)
        return 1;
    if (errno == EINVAL)
        return 1; /* not a memfd: takes no seals */
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals >= 0 && (seals & F_SEAL_SHRINK))
        return 1;
    LOG("region memfd can shrink under the mapping (not sealable): refused");
    return 0;
}

/* Maps `size` bytes at `offset` of `fd` (offset need not be page-aligned). */
static uint8_t *map_fd(int fd, uint64_t offset, uint64_t size, struct mapping *m)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t skip = offset % page;
    if (size == 0 || size > SIZE_MAX - skip)
        return NULL;
    if (!fd_can_back(fd, offset, size))
        return NULL;
    void *p = mmap(NULL, size + skip, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                   (off_t)(offset - skip));
    if (p == MAP_FAILED) {
        LOG("mmap: %s", strerror(errno));
        return NULL;
    }
    m->base = p;
    m->len = size + skip;
    return (uint8_t *)p + skip;
}

static void notify(int fd)
{
    uint64_t one = 1;
    if (fd >= 0 && write(fd, &one, sizeof one) < 0 && errno != EAGAIN)
        LOG("call eventfd: %s", strerror(errno));
}

static volatile sig_atomic_t hangup;

static void on_hangup(int sig)
{
    (void)sig;
    hangup = 1;
}

static long long now_ms(void);
static int wait_fd(int fd, short events, long long deadline);
static void set_fd(int *slot, int fd);

/* How long the front-end may take to ack a back-end request. */
#define ACK_MS 5000

/* Sends the request encoded into `buf` (`encoded`: how the encoding went)
 * on the back-end channel and takes its ack; the channel is closed (and
 * the ack given up) when that fails. */
static int channel_send(const char *what, vhu_result encoded, const uint8_t *buf, size_t len,
                        bool awaits)
{
    static uint8_t ack[VHU_MAX_MESSAGE];
    if (check(encoded, what))
        return -1;
    ssize_t n;
    do
        n = send(S.channel_fd, buf, len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)len)
        goto broken;
    if (!awaits)
        return 0;
    long long deadline = now_ms() + ACK_MS;
    size_t got = 0, total = VHU_HEADER_SIZE;
    while (got < total) {
        if (wait_fd(S.channel_fd, POLLIN, deadline))
            goto broken;
        n = recv(S.channel_fd, ack + got, total - got, 0);
        if (n <= 0) {
            if (n < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            goto broken;
        }
        got += (size_t)n;
        if (got == VHU_HEADER_SIZE && total == VHU_HEADER_SIZE &&
            check(vhu_message_size(ack, got, &total), "channel ack"))
            goto broken;
    }
    if (check(vhu_channel_reply(S.channel, ack, got, 0), what))
        goto broken;
    return 0;
broken:
    LOG("%s: the front-end did not take it; back-end channel closed", what);
    vhu_channel_abandon(S.channel);
    set_fd(&S.channel_fd, -1);
    return -1;
}

/* Signals ring `r`'s used buffers: its call eventfd, or in-band. */
static void call_ring(struct ring *r)
{
    static uint8_t msg[64];
    size_t len;
    bool awaits;
    if (r->call >= 0 || !r->call_in_band || S.channel_fd < 0) {
        notify(r->call);
        return;
    }
    vhu_result e = vhu_channel_vring_call(S.channel, (uint16_t)(r - S.rings), msg, sizeof msg,
                                          &len, &awaits);
    channel_send("vring call", e, msg, len, awaits);
}

/* The image's size again (SIGHUP): a new capacity goes to the device and,
 * in a session with a back-end channel, to the front-end. */
static void resized(bool in_session)
{
    struct stat st;
    bool changed = false;
    if (fstat(S.disk, &st)) {
        LOG("image size: %s", strerror(errno));
        return;
    }
    uint64_t sectors = (uint64_t)st.st_size / 512;
    S.blk_config.capacity = sectors; /* for the sessions to come */
    S.disk_size = (uint64_t)st.st_size;
    if (!in_session || check(vhu_blk_set_capacity(S.blk, sectors, &changed), "capacity") ||
        !changed)
        return;
    LOG("image resized: %llu bytes (%llu sectors)", (unsigned long long)st.st_size,
        (unsigned long long)sectors);
    if (S.channel_fd < 0) {
        LOG("no back-end channel: the front-end is not told of the new capacity");
        return;
    }
    static uint8_t msg[64];
    size_t len;
    bool awaits;
    vhu_result e = vhu_channel_config_change(S.channel, msg, sizeof msg, &len, &awaits);
    if (channel_send("config change", e, msg, len, awaits) == 0)
        LOG("front-end told of the new capacity");
}

/* Counts the pages a mark set; signals the log eventfd, if any. */
static void marked(uint64_t pages)
{
    S.logged_pages += pages;
    if (pages)
        notify(S.log_fd);
}

/* Marks ring `r`'s used ring in the dirty log if it is logged. */
static int log_used(struct ring *r)
{
    uint64_t pages = 0;
    if (!S.log.count || !r->logged)
        return 0;
    if (check(vhu_dataplane_log_used(r->dp, &S.log, S.log_region.size, r->log_addr, &pages),
              "log used ring")) {
        S.log_refused++;
        return -1;
    }
    marked(pages);
    return 0;
}

/* Serves one popped request; returns 0 or -1 (the ring is broken). */
static int process(struct ring *r, const vhu_token *tok, const vhu_segment *segs, size_t n)
{
    uint32_t used = 0;
    if (tok->side_effects) {
        vhu_blk_op op = VHU_BLK_OP_INIT;
        uint32_t status = VHU_BLK_S_OK;
        if (check(vhu_blk_plan(S.blk, segs, n, &S.mem, r->req), "plan") ||
            check(vhu_blk_request_op(r->req, &op), "op"))
            return -1;
        switch (op.kind) {
        case VHU_BLK_READ:
        case VHU_BLK_WRITE:
            for (uint64_t at = 0; at < op.len && status == VHU_BLK_S_OK;) {
                size_t chunk = op.len - at < BOUNCE ? (size_t)(op.len - at) : BOUNCE;
                off_t pos = (off_t)(op.offset + at);
                if (op.kind == VHU_BLK_READ) {
                    if (pread(S.disk, S.bounce, chunk, pos) != (ssize_t)chunk ||
                        vhu_blk_request_write_data(r->req, &S.mem, at, S.bounce, chunk))
                        status = VHU_BLK_S_IOERR;
                } else {
                    if (vhu_blk_request_read_data(r->req, &S.mem, at, S.bounce, chunk) ||
                        pwrite(S.disk, S.bounce, chunk, pos) != (ssize_t)chunk)
                        status = VHU_BLK_S_IOERR;
                }
                at += chunk;
            }
            break;
        case VHU_BLK_FLUSH:
            if (fdatasync(S.disk))
                status = VHU_BLK_S_IOERR;
            break;
        case VHU_BLK_GET_ID:
            if (vhu_blk_get_id(S.blk, r->req, &S.mem))
                status = VHU_BLK_S_IOERR;
            break;
        case VHU_BLK_FAIL:
            status = op.status;
            break;
        default: /* discard and write zeroes are not offered */
            status = VHU_BLK_S_UNSUPP;
            break;
        }
        if (S.io_delay_us)
            usleep((useconds_t)S.io_delay_us);
        if (op.sync_after && status == VHU_BLK_S_OK && fdatasync(S.disk))
            status = VHU_BLK_S_IOERR;
        if (check(vhu_blk_request_finish(r->req, &S.mem, status, &used), "finish"))
            return -1;
        /* What the request wrote is marked before it completes: a page
         * that cannot be (a log smaller than guest memory) would be lost
         * to a migration, so the ring stops instead. */
        uint64_t pages = 0;
        if (S.log_all && S.log.count) {
            if (check(vhu_log_mark_written(&S.log, S.log_region.size, segs, n, used, &pages),
                      "log request")) {
                S.log_refused++;
                return -1;
            }
            marked(pages);
        }
    }
    vhu_published pub;
    if (check(vhu_dataplane_complete(r->dp, &S.mem, area(), tok->handle, used, &pub),
              "complete"))
        return -1;
    if (pub == VHU_PUBLISHED_NOTIFY)
        call_ring(r);
    S.requests++;
    return 0;
}

/* Pops and serves every request there is; returns how many, or -1. */
static int drain(struct ring *r)
{
    static vhu_segment segs[VHU_MAX_CHAIN];
    int served = 0;
    for (;;) {
        vhu_token tok = VHU_TOKEN_INIT;
        size_t n;
        vhu_result res = vhu_dataplane_pop(r->dp, &S.mem, area(), &tok, segs, VHU_MAX_CHAIN, &n);
        if (check(res, "pop"))
            return -1;
        if (tok.handle == VHU_NO_TOKEN)
            return served;
        if (process(r, &tok, segs, n))
            return -1;
        served++;
    }
}

/* Serves ring `r` until it is empty with notifications enabled. */
static void serve_ring(struct ring *r)
{
    if (!r->running || r->broken)
        return;
    for (;;) {
        vhu_published pub;
        bool work = false;
        if (drain(r) < 0 ||
            check(vhu_dataplane_publish(r->dp, &S.mem, area(), &pub), "publish")) {
            r->broken = true;
            return;
        }
        if (pub == VHU_PUBLISHED_NOTIFY)
            call_ring(r);
        if (check(vhu_dataplane_enable_notification(r->dp, &S.mem, &work), "notification") ||
            log_used(r)) {
            r->broken = true;
            return;
        }
        if (!work)
            return;
    }
}

/* Stops ring `q` (GET_VRING_BASE); returns 0 with its base in *base. */
static int halt(uint16_t q, bool suspend, uint32_t *base)
{
    struct ring *r = &S.rings[q];
    if (!r->running)
        return -1;
    /* Every request completes when it is served: a ring's worth of rounds
     * serves what a drain still hands out (recorded requests). */
    for (unsigned round = 0; round <= S.queue_size; round++) {
        bool stopped;
        vhu_published pub;
        vhu_result res = vhu_dataplane_stop(r->dp, &S.mem, area(), suspend, &stopped, base, &pub);
        if (pub == VHU_PUBLISHED_NOTIFY)
            call_ring(r);
        if (stopped) {
            r->running = false;
            return check(res, "stop") || log_used(r) ? -1 : 0;
        }
        if (check(res, "stop") || drain(r) < 0)
            break;
    }
    r->running = false;
    return -1;
}

/* Device state transfers: how long a front-end may take to read or write
 * its end of the pipe, and the largest state read (a blk state is its
 * header, the inflight area and a checksum). */
#define TRANSFER_MS 5000
#define MAX_STATE (64u << 20)

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Waits until `fd` is ready for `events` before `deadline`; 0 or -1. */
static int wait_fd(int fd, short events, long long deadline)
{
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0)
            return -1;
        struct pollfd p = {fd, events, 0};
        int n = poll(&p, 1, (int)left);
        if (n > 0)
            return 0;
        if (n < 0 && errno != EINTR)
            return -1;
    }
}

/* The inflight area a device state carries, and its layout; NULL and 0x0
 * without one. */
static const vhu_mem *state_area(uint16_t *nq, uint16_t *qs)
{
    const vhu_mem *a = area();
    if (!a || vhu_backend_inflight_layout(S.be, nq, qs) != VHU_OK) {
        *nq = *qs = 0;
        return NULL;
    }
    return a;
}

/* Saves the device's state into `fd` (with the inflight area, if any). */
static int save_state(int fd)
{
    uint16_t nq, qs;
    const vhu_mem *a = state_area(&nq, &qs);
    size_t cap, len;
    if (check(vhu_blk_state_size(a ? (size_t)S.area_region.size : 0, &cap), "state size"))
        return -1;
    uint8_t *buf = malloc(cap);
    int rc = -1;
    if (!buf || check(vhu_blk_save_state(S.blk, a, nq, qs, buf, cap, &len), "save state"))
        goto out;
    long long deadline = now_ms() + TRANSFER_MS;
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(fd, buf + done, len - done);
        if (n > 0) {
            done += (size_t)n;
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            LOG("device state: %s", strerror(errno));
            goto out;
        }
        if (wait_fd(fd, POLLOUT, deadline)) {
            LOG("device state: the front-end did not read it in time");
            goto out;
        }
    }
    LOG("device state saved: %zu bytes, inflight area %ux%u", len, (unsigned)nq, (unsigned)qs);
    rc = 0;
out:
    free(buf);
    return rc;
}

/* Reads a state from `fd` to its end and loads it into the device. */
static int load_state(int fd)
{
    uint16_t nq, qs;
    const vhu_mem *a = state_area(&nq, &qs);
    size_t cap = 4096, len = 0;
    uint8_t *buf = malloc(cap);
    int rc = -1;
    long long deadline = now_ms() + TRANSFER_MS;
    while (buf) {
        if (len == cap) {
            uint8_t *more = cap < MAX_STATE ? realloc(buf, cap * 2) : NULL;
            if (!more) {
                LOG("device state: more than %u bytes", MAX_STATE);
                goto out;
            }
            buf = more;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n > 0) {
            len += (size_t)n;
            continue;
        }
        if (n == 0)
            break;
        if (errno != EAGAIN && errno != EINTR) {
            LOG("device state: %s", strerror(errno));
            goto out;
        }
        if (wait_fd(fd, POLLIN, deadline)) {
            LOG("device state: the front-end did not finish it in time");
            goto out;
        }
    }
    if (!buf || check(vhu_blk_load_state(S.blk, buf, len, a, nq, qs), "load state"))
        goto out;
    LOG("device state loaded: %zu bytes, inflight area %ux%u", len, (unsigned)nq, (unsigned)qs);
    rc = 0;
out:
    free(buf);
    return rc;
}

static int take_fd(int *fds, size_t nfds, int index)
{
    if (index < 0 || (size_t)index >= nfds)
        return -1;
    int fd = fds[index];
    fds[index] = -1;
    return fd;
}

static void set_fd(int *slot, int fd)
{
    if (*slot >= 0)
        close(*slot);
    *slot = fd;
}

static int apply(const vhu_action *a, int *fds, size_t nfds)
{
    struct ring *r = a->queue < VHU_MAX_QUEUES ? &S.rings[a->queue] : NULL;
    switch (a->kind) {
    case VHU_ACTION_UNMAP_ALL:
        for (unsigned i = 0; i < VHU_MAX_REGIONS; i++) {
            unmap(&S.maps[i]);
            memset(&S.regions[i], 0, sizeof S.regions[i]);
        }
        return 0;
    case VHU_ACTION_MAP_REGION: {
        if (a->slot >= VHU_MAX_REGIONS)
            return -1;
        int fd = take_fd(fds, nfds, a->fd);
        if (fd < 0)
            return -1;
        unmap(&S.maps[a->slot]);
        uint8_t *host = map_fd(fd, a->region.mmap_offset, a->region.size, &S.maps[a->slot]);
        close(fd);
        if (!host)
            return -1;
        S.regions[a->slot] = (vhu_region){a->region.guest_addr, a->region.size, host};
        return 0;
    }
    case VHU_ACTION_UNMAP_REGION:
        if (a->slot >= VHU_MAX_REGIONS)
            return -1;
        unmap(&S.maps[a->slot]);
        memset(&S.regions[a->slot], 0, sizeof S.regions[a->slot]);
        return 0;
    case VHU_ACTION_REMAP_RINGS:
        for (uint16_t q = 0; q < S.queues; q++) {
            vhu_ring_addrs addrs;
            if (!S.rings[q].running)
                continue;
            if (check(vhu_backend_ring_addrs(S.be, q, &addrs), "ring addresses"))
                return -1;
            if (vhu_dataplane_set_addrs(S.rings[q].dp, &addrs))
                S.rings[q].broken = true;
        }
        return 0;
    case VHU_ACTION_SET_KICK:
    case VHU_ACTION_SET_CALL:
    case VHU_ACTION_SET_ERR: {
        if (!r)
            return -1;
        int fd = a->fd < 0 ? -1 : take_fd(fds, nfds, a->fd);
        if (a->fd >= 0 && fd < 0)
            return -1;
        if (a->kind == VHU_ACTION_SET_KICK && fd >= 0)
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        set_fd(a->kind == VHU_ACTION_SET_KICK   ? &r->kick
               : a->kind == VHU_ACTION_SET_CALL ? &r->call
                                                : &r->err,
               fd);
        if (a->kind == VHU_ACTION_SET_CALL)
            r->call_in_band = fd < 0 && a->flag;
        return 0;
    }
    case VHU_ACTION_START_RING:
        if (!r)
            return -1;
        if (check(vhu_backend_start_ring(S.be, a->queue, &S.mem, area(), false, r->dp,
                                         vhu_dataplane_size(S.queue_size)),
                  "start ring"))
            return -1;
        r->running = true;
        r->broken = false;
        if (check(vhu_backend_ring_log(S.be, a->queue, &r->logged, &r->log_addr), "ring log"))
            return -1;
        vhu_dataplane_info info = VHU_DATAPLANE_INFO_INIT;
        if (!vhu_dataplane_get_info(r->dp, &info) && info.resubmits_left)
            LOG("ring %u: resubmitting %u requests recorded in the inflight area",
                (unsigned)a->queue, (unsigned)info.resubmits_left);
        serve_ring(r);
        return 0;
    case VHU_ACTION_STOP_RING:
        if (!r)
            return -1;
        r->suspend = a->flag;
        return 0;
    case VHU_ACTION_CREATE_INFLIGHT: {
        int fd = memfd_create("vhu-c-inflight", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (fd < 0 || ftruncate(fd, (off_t)a->size)) {
            LOG("inflight area: %s", strerror(errno));
            if (fd >= 0)
                close(fd);
            return -1;
        }
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
        set_fd(&S.reply_fd, fd);
        return 0;
    }
    case VHU_ACTION_MAP_INFLIGHT: {
        int fd = take_fd(fds, nfds, a->fd);
        if (fd < 0)
            return -1;
        unmap(&S.area_map);
        S.area.count = 0;
        uint8_t *host = map_fd(fd, a->offset, a->size, &S.area_map);
        close(fd);
        if (!host)
            return -1;
        S.area_region = (vhu_region){0, a->size, host};
        S.area.count = 1;
        LOG("inflight area of %llu bytes mapped", (unsigned long long)a->size);
        return 0;
    }
    case VHU_ACTION_UNMAP_INFLIGHT:
        unmap(&S.area_map);
        S.area.count = 0;
        return 0;
    case VHU_ACTION_SET_ENABLED:
        if (!r || !r->running)
            return 0;
        if (check(vhu_dataplane_set_enabled(r->dp, a->flag), "enable"))
            return -1;
        /* What the guest made available while the ring was disabled (before
         * a restart, say) was kicked for already: serve it now. */
        if (a->flag)
            serve_ring(r);
        return 0;
    case VHU_ACTION_RESET_RINGS:
        for (uint16_t q = 0; q < S.queues; q++) {
            uint32_t base;
            if (S.rings[q].running)
                halt(q, false, &base);
            set_fd(&S.rings[q].kick, -1);
            set_fd(&S.rings[q].call, -1);
            set_fd(&S.rings[q].err, -1);
        }
        return check(vhu_backend_rings_reset(S.be), "reset");
    case VHU_ACTION_SET_BACKEND_CHANNEL: {
        int fd = take_fd(fds, nfds, a->fd);
        if (fd < 0)
            return -1;
        set_fd(&S.channel_fd, fd);
        return check(vhu_backend_channel(S.be, S.channel, vhu_channel_size()), "channel");
    }
    case VHU_ACTION_TRANSFER_STATE: {
        int fd = take_fd(fds, nfds, a->fd);
        if (fd < 0)
            return -1;
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        set_fd(&S.transfer_fd, fd);
        S.transfer_save = a->flag;
        return 0;
    }
    case VHU_ACTION_KICK: /* in-band kick (not offered here) */
        if (r)
            serve_ring(r);
        return 0;
    case VHU_ACTION_MAP_LOG: {
        int fd = take_fd(fds, nfds, a->fd);
        if (fd < 0)
            return -1;
        unmap(&S.log_map);
        S.log.count = 0;
        uint8_t *host = map_fd(fd, a->offset, a->size, &S.log_map);
        close(fd);
        if (!host)
            return -1;
        S.log_region = (vhu_region){0, a->size, host};
        S.log.count = 1;
        LOG("dirty log of %llu bytes mapped", (unsigned long long)a->size);
        return 0;
    }
    case VHU_ACTION_SET_LOG_FD: {
        int fd = take_fd(fds, nfds, a->fd);
        if (fd < 0)
            return -1;
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        set_fd(&S.log_fd, fd);
        return 0;
    }
    case VHU_ACTION_SET_LOGGING:
        if (S.log_all != a->flag)
            LOG("dirty logging %s (%lu pages marked so far)", a->flag ? "on" : "off",
                S.logged_pages);
        S.log_all = a->flag;
        return 0;
    case VHU_ACTION_SET_RING_LOG:
        if (!r)
            return -1;
        r->logged = a->flag;
        r->log_addr = a->offset;
        return 0;
    default:
        return 0;
    }
}

static int read_full(int fd, uint8_t *buf, size_t len)
{
    while (len) {
        ssize_t n = read(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads one message and its fds; returns its length, 0 at EOF, -1. */
static ssize_t recv_message(int conn, uint8_t *buf, int *fds, size_t *nfds)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * VHU_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {buf, VHU_HEADER_SIZE};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.buf;
    mh.msg_controllen = sizeof control.buf;
    *nfds = 0;
    ssize_t n;
    do
        n = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (*nfds < VHU_MAX_FDS)
                fds[(*nfds)++] = fd;
            else
                close(fd);
        }
    }
    size_t total;
    if ((mh.msg_flags & MSG_CTRUNC) ||
        read_full(conn, buf + n, VHU_HEADER_SIZE - (size_t)n) ||
        check(vhu_message_size(buf, VHU_HEADER_SIZE, &total), "message header") ||
        read_full(conn, buf + VHU_HEADER_SIZE, total - VHU_HEADER_SIZE))
        return -1;
    return (ssize_t)total;
}

static int send_reply(int conn, const uint8_t *buf, size_t len)
{
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {(void *)buf, len};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (S.reply_fd >= 0) {
        memset(&control, 0, sizeof control);
        mh.msg_control = control.buf;
        mh.msg_controllen = sizeof control.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &S.reply_fd, sizeof(int));
    }
    ssize_t n;
    do
        n = sendmsg(conn, &mh, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    set_fd(&S.reply_fd, -1);
    return n == (ssize_t)len ? 0 : -1;
}

/* Handles one message; -1 ends the connection. */
static int on_message(int conn)
{
    static uint8_t msg[VHU_MAX_MESSAGE], reply[VHU_MAX_MESSAGE];
    int fds[VHU_MAX_FDS];
    size_t nfds;
    ssize_t len = recv_message(conn, msg, fds, &nfds);
    int rc = -1;
    if (len <= 0)
        goto out;
    vhu_outcome out = VHU_OUTCOME_INIT;
    vhu_result res = vhu_backend_handle(S.be, msg, (size_t)len, nfds, &S.mem, &S.dev, reply,
                                        sizeof reply, &out);
    if (res != VHU_OK) {
        uint32_t request;
        memcpy(&request, msg, sizeof request);
        LOG("request %u refused: %s", request, vhu_result_str(res));
        goto out;
    }
    if (out.refused != VHU_OK)
        LOG("request refused with a failed ack: %s", vhu_result_str(out.refused));
    for (uint32_t i = 0; i < out.actions; i++) {
        vhu_action a = VHU_ACTION_INIT;
        if (check(vhu_backend_action(S.be, i, &a), "action") || apply(&a, fds, nfds)) {
            LOG("action %u of request failed", (unsigned)a.kind);
            goto out;
        }
    }
    size_t n = out.reply_len;
    if (out.reply == VHU_REPLY_TRANSFER_PENDING &&
        check(vhu_backend_finish_transfer(S.be, S.transfer_ok, reply, sizeof reply, &n),
              "finish transfer"))
        goto out;
    if (out.reply == VHU_REPLY_PENDING) {
        uint32_t base;
        if (out.queue >= S.queues || halt(out.queue, S.rings[out.queue].suspend, &base) ||
            check(vhu_backend_finish_stop(S.be, out.queue, base, reply, sizeof reply, &n),
                  "finish stop"))
            goto out;
    }
    rc = out.reply == VHU_REPLY_NONE ? 0 : send_reply(conn, reply, n);
    /* A transfer runs once the front-end has the reply (it reads or writes
     * the pipe only then); CHECK_DEVICE_STATE reports how it ended. */
    if (rc == 0 && S.transfer_fd >= 0) {
        S.transfer_ok = (S.transfer_save ? save_state : load_state)(S.transfer_fd) == 0;
        set_fd(&S.transfer_fd, -1);
    }
out:
    if (len > 0)
        for (size_t i = 0; i < nfds; i++)
            if (fds[i] >= 0)
                close(fds[i]);
    return rc;
}

static int start_session(void)
{
    S.mem = (vhu_mem){S.regions, VHU_MAX_REGIONS, NULL};
    S.area = (vhu_mem){&S.area_region, 0, NULL};
    S.log = (vhu_mem){&S.log_region, 0, NULL};
    S.log_all = false;
    S.reply_fd = -1;
    S.log_fd = -1;
    S.transfer_fd = -1;
    S.transfer_ok = false;
    S.channel_fd = -1;
    S.dev = (vhu_device)VHU_DEVICE_INIT; /* vhu_blk_device() fills it */
    if (check(vhu_blk_init(S.blk, vhu_blk_size(), &S.blk_config), "blk init") ||
        check(vhu_blk_device(S.blk, &S.dev), "blk device") ||
        check(vhu_backend_init(S.be, vhu_backend_size(), &S.config), "backend init"))
        return -1;
    return 0;
}

static void end_session(void)
{
    for (uint16_t q = 0; q < VHU_MAX_QUEUES; q++) {
        struct ring *r = &S.rings[q];
        r->running = r->broken = r->suspend = r->logged = r->call_in_band = false;
        set_fd(&r->kick, -1);
        set_fd(&r->call, -1);
        set_fd(&r->err, -1);
    }
    for (unsigned i = 0; i < VHU_MAX_REGIONS; i++) {
        unmap(&S.maps[i]);
        memset(&S.regions[i], 0, sizeof S.regions[i]);
    }
    unmap(&S.area_map);
    S.area.count = 0;
    if (S.log.count)
        LOG("dirty log: %lu pages marked, %lu marks refused", S.logged_pages, S.log_refused);
    unmap(&S.log_map);
    S.log.count = 0;
    S.log_all = false;
    S.logged_pages = S.log_refused = 0;
    set_fd(&S.log_fd, -1);
    set_fd(&S.transfer_fd, -1);
    set_fd(&S.channel_fd, -1);
    set_fd(&S.reply_fd, -1);
}

static void serve(int conn)
{
    if (start_session())
        return;
    unsigned long before = S.requests;
    for (;;) {
        struct pollfd p[1 + VHU_MAX_QUEUES];
        uint16_t which[1 + VHU_MAX_QUEUES];
        nfds_t n = 0;
        int timeout = -1;
        p[n++] = (struct pollfd){conn, POLLIN, 0};
        for (uint16_t q = 0; q < S.queues; q++) {
            struct ring *r = &S.rings[q];
            if (!r->running || r->broken)
                continue;
            if (r->kick < 0) {
                timeout = 0; /* no kick eventfd: poll the ring */
                continue;
            }
            which[n] = q;
            p[n++] = (struct pollfd){r->kick, POLLIN, 0};
        }
        if (hangup) {
            hangup = 0;
            resized(true);
        }
        if (poll(p, n, timeout) < 0) {
            if (errno == EINTR)
                continue;
            LOG("poll: %s", strerror(errno));
            break;
        }
        if (p[0].revents) {
            if (on_message(conn))
                break;
            continue; /* the rings' notifiers may have changed */
        }
        for (nfds_t i = 1; i < n; i++) {
            uint64_t v;
            if (!p[i].revents)
                continue;
            if (read(p[i].fd, &v, sizeof v) < 0 && errno != EAGAIN)
                LOG("kick eventfd: %s", strerror(errno));
            serve_ring(&S.rings[which[i]]);
        }
        for (uint16_t q = 0; q < S.queues; q++)
            if (S.rings[q].running && S.rings[q].kick < 0)
                serve_ring(&S.rings[q]);
    }
    LOG("connection closed after %lu requests", S.requests - before);
    end_session();
}

static void usage(void)
{
    fprintf(stderr, "usage: vhu-c-blk --socket-path PATH --blk-file FILE "
                    "[--num-queues N] [--queue-size N] [--io-delay-us N]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *sock_path = NULL, *file = NULL;
    unsigned long queues = 1, queue_size = 1024;
    /* The library (a shared one may be another build) serves this header. */
    if (vhu_abi_check(VHU_ABI_VERSION) != VHU_OK) {
        LOG("libvhost_user_c ABI %#x does not serve vhu.h's %#x", (unsigned)vhu_abi_version(),
            (unsigned)VHU_ABI_VERSION);
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        if (!strcmp(argv[i], "--socket-path"))
            sock_path = v;
        else if (!strcmp(argv[i], "--blk-file"))
            file = v;
        else if (!strcmp(argv[i], "--num-queues"))
            queues = strtoul(v, NULL, 10);
        else if (!strcmp(argv[i], "--queue-size"))
            queue_size = strtoul(v, NULL, 10);
        else if (!strcmp(argv[i], "--io-delay-us"))
            S.io_delay_us = strtoul(v, NULL, 10);
        else if (strcmp(argv[i], "--log-level"))
            usage();
        i++;
    }
    if (!sock_path || !file || queues < 1 || queues > VHU_MAX_QUEUES || queue_size < 2 ||
        queue_size > 32768)
        usage();
    S.queues = (uint16_t)queues;
    S.queue_size = (uint16_t)queue_size;

    S.disk = open(file, O_RDWR | O_CLOEXEC);
    struct stat st;
    if (S.disk < 0 || fstat(S.disk, &st)) {
        LOG("%s: %s", file, strerror(errno));
        return 1;
    }
    S.disk_size = (uint64_t)st.st_size;

    /* Caller-owned state: sizes and alignments from the library. */
    S.be = alloc_state(vhu_backend_size(), vhu_backend_align());
    S.channel = alloc_state(vhu_channel_size(), vhu_channel_align());
    S.blk = alloc_state(vhu_blk_size(), vhu_blk_align());
    for (uint16_t q = 0; q < VHU_MAX_QUEUES; q++) {
        struct ring *r = &S.rings[q];
        r->kick = r->call = r->err = -1;
        if (q >= S.queues)
            continue;
        r->dp = alloc_state(vhu_dataplane_size(S.queue_size), vhu_dataplane_align());
        r->req = alloc_state(vhu_blk_request_size(), vhu_blk_request_align());
        if (check(vhu_blk_request_init(r->req, vhu_blk_request_size()), "request init"))
            return 1;
    }

    S.blk_config = (vhu_blk_config){
        .struct_size = sizeof(vhu_blk_config),
        .capacity = S.disk_size / 512,
        .blk_size = 512,
        .num_queues = S.queues,
        .seg_max = (S.queue_size < VHU_MAX_CHAIN ? S.queue_size : VHU_MAX_CHAIN) - 2,
        .flush = 1,
        .config_wce = 1,
        .writeback = 1,
    };
    memcpy(S.blk_config.serial, "vhu-c-blk", 9);
    uint64_t dev_features;
    if (check(vhu_blk_init(S.blk, vhu_blk_size(), &S.blk_config), "blk init") ||
        check(vhu_blk_offered_features(S.blk, &dev_features), "blk features"))
        return 1;
    S.config = (vhu_backend_config){
        .struct_size = sizeof(vhu_backend_config),
        .features = dev_features | VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES |
                    VHU_VIRTIO_F_RING_PACKED | VHU_VIRTIO_F_EVENT_IDX |
                    VHU_VIRTIO_F_INDIRECT_DESC | VHU_F_LOG_ALL,
        .protocol_features = VHU_PROTOCOL_F_MQ | VHU_PROTOCOL_F_REPLY_ACK |
                             VHU_PROTOCOL_F_CONFIG | VHU_PROTOCOL_F_CONFIGURE_MEM_SLOTS |
                             VHU_PROTOCOL_F_STATUS | VHU_PROTOCOL_F_RESET_DEVICE |
                             VHU_PROTOCOL_F_INFLIGHT_SHMFD | VHU_PROTOCOL_F_LOG_SHMFD |
                             VHU_PROTOCOL_F_DEVICE_STATE | VHU_PROTOCOL_F_BACKEND_REQ |
                             VHU_PROTOCOL_F_INBAND_NOTIFICATIONS,
        .num_queues = S.queues,
        .max_queue_size = S.queue_size,
    };

    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (ls < 0 || strlen(sock_path) >= sizeof addr.sun_path) {
        LOG("socket: %s", ls < 0 ? strerror(errno) : "path too long");
        return 1;
    }
    strcpy(addr.sun_path, sock_path);
    unlink(sock_path);
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) || listen(ls, 1)) {
        LOG("%s: %s", sock_path, strerror(errno));
        return 1;
    }
    LOG("serving %s (%llu bytes, %u queues) on %s; state: backend %zu, dataplane %zu, "
        "blk %zu, request %zu bytes",
        file, (unsigned long long)S.disk_size, (unsigned)S.queues, sock_path,
        vhu_backend_size(), vhu_dataplane_size(S.queue_size), vhu_blk_size(),
        vhu_blk_request_size());
    signal(SIGPIPE, SIG_IGN);
    /* No SA_RESTART: poll and accept return EINTR, and the loops look. */
    struct sigaction sa = {0};
    sa.sa_handler = on_hangup;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGHUP, &sa, NULL);
    for (;;) {
        int conn = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (hangup) {
            hangup = 0;
            resized(false);
        }
        if (conn < 0) {
            if (errno == EINTR)
                continue;
            LOG("accept: %s", strerror(errno));
            return 1;
        }
        serve(conn);
        close(conn);
    }
}

/*
 * A C front-end serving the back-end channel: a vhu_frontend that wants
 * REPLY_ACK, CONFIG, BACKEND_REQ and INBAND_NOTIFICATIONS goes through the
 * handshake against a scripted back-end in this program (it answers each
 * message that awaits a reply: features, protocol features, two queues,
 * acks), then serves the back-end requests that come on stdin with
 * vhu_frontend_serve_backend() and writes the acks to stdout (a test's
 * back-end stands at the other ends). Each step is logged to stderr, one
 * line each:
 *
 *   before negotiation: VHU_ERR_BUSY: ...
 *   negotiated 0x4229, channel sent
 *   ack over the request: VHU_ERR_INVALID: ...
 *   config changed, ack 20        call 1        ring error 0, ack 20
 *   refused 6, ack 20
 *   closed: VHU_ERR_WIRE: ...     (a malformed request: exits 2)
 *
 * Exits 0 at the end of stdin, 1 when a step does not go as it must, 2
 * when a request is refused as malformed (the channel is closed).
 *
 * Built and run by adapter-c/tests/c_backend_channel.rs.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhu.h"

#define WANTED                                                                                    \
    (VHU_PROTOCOL_F_MQ | VHU_PROTOCOL_F_REPLY_ACK | VHU_PROTOCOL_F_CONFIG |                       \
     VHU_PROTOCOL_F_BACKEND_REQ | VHU_PROTOCOL_F_INBAND_NOTIFICATIONS)

/* Front-end request codes the scripted back-end answers with a value. */
#define GET_FEATURES 1
#define GET_PROTOCOL_FEATURES 15
#define GET_QUEUE_NUM 17
#define SET_BACKEND_REQ_FD 21

/* Reads exactly len bytes; 0 at the end of input before any, -1 on a
 * short or failed read. */
static int read_all(int fd, uint8_t *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, buf + got, len - got);
        if (r <= 0)
            return got == 0 && r == 0 ? 0 : -1;
        got += (size_t)r;
    }
    return 1;
}

static int write_all(int fd, const uint8_t *buf, size_t len)
{
    while (len > 0) {
        ssize_t r = write(fd, buf, len);
        if (r <= 0)
            return -1;
        buf += r;
        len -= (size_t)r;
    }
    return 0;
}

static int fail(const char *what, vhu_result r)
{
    fprintf(stderr, "%s: %s\n", what, vhu_result_str(r));
    return 1;
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* The scripted back-end's reply to `request`: the header (REPLY, version
 * 1, size 8) and a u64. */
static size_t scripted_reply(uint32_t request, uint8_t *out)
{
    uint64_t v = 0;
    if (request == GET_FEATURES)
        v = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES;
    else if (request == GET_PROTOCOL_FEATURES)
        v = WANTED;
    else if (request == GET_QUEUE_NUM)
        v = 2;
    put32(out, request);
    put32(out + 4, 0x5);
    put32(out + 8, 8);
    put64(out + 12, v);
    return VHU_HEADER_SIZE + 8;
}

/* The handshake against the scripted back-end: 0 once negotiated. */
static int handshake(vhu_frontend *fe)
{
    static uint8_t tx_buf[VHU_FRONTEND_MAX_TRANSMIT];
    uint8_t reply[VHU_HEADER_SIZE + 8];
    uint64_t negotiated = 0;
    int channel_sent = 0, got_negotiated = 0;
    for (;;) {
        vhu_transmit tx = VHU_TRANSMIT_INIT;
        vhu_result r = vhu_frontend_poll_transmit(fe, tx_buf, sizeof tx_buf, &tx);
        if (r != VHU_OK)
            return fail("transmit", r);
        for (;;) {
            vhu_event ev = VHU_EVENT_INIT;
            r = vhu_frontend_poll_event(fe, &ev);
            if (r != VHU_OK)
                return fail("event", r);
            if (ev.kind == VHU_EVENT_NONE)
                break;
            if (ev.kind == VHU_EVENT_NEGOTIATED) {
                negotiated = ev.protocol_features;
                got_negotiated = 1;
            }
        }
        if (tx.len == 0)
            break;
        if (tx.request == SET_BACKEND_REQ_FD && tx.nfds == 1 &&
            tx.fds[0].kind == VHU_FD_BACKEND_CHANNEL)
            channel_sent = 1;
        if (!tx.awaits_reply)
            continue;
        size_t n = scripted_reply(tx.request, reply);
        r = vhu_frontend_handle_reply(fe, reply, n, 0);
        if (r != VHU_OK)
            return fail("reply", r);
    }
    if (!got_negotiated)
        return fail("no VHU_EVENT_NEGOTIATED", VHU_ERR_STATE);
    fprintf(stderr, "negotiated %#llx, %s\n", (unsigned long long)negotiated,
            channel_sent ? "channel sent" : "no channel");
    return 0;
}

static void log_notice(const vhu_backend_notice *n)
{
    switch (n->kind) {
    case VHU_NOTICE_CONFIG_CHANGED:
        fprintf(stderr, "config changed");
        break;
    case VHU_NOTICE_CALL:
        fprintf(stderr, "call %u", (unsigned)n->queue);
        break;
    case VHU_NOTICE_RING_ERROR:
        fprintf(stderr, "ring error %u", (unsigned)n->queue);
        break;
    case VHU_NOTICE_REFUSED:
        fprintf(stderr, "refused %u", (unsigned)n->request);
        break;
    default:
        fprintf(stderr, "notice %u", (unsigned)n->kind);
        break;
    }
    if (n->ack_len != 0)
        fprintf(stderr, ", ack %zu", n->ack_len);
    fprintf(stderr, "\n");
}

int main(void)
{
    size_t align = vhu_frontend_align();
    size_t size = (vhu_frontend_size() + align - 1) / align * align;
    vhu_frontend *fe = aligned_alloc(align, size);
    if (!fe)
        return 1;

    vhu_queue_config q = {0};
    q.size = 64;
    q.addrs.desc = 0x7000000;
    q.addrs.driver = 0x7001000;
    q.addrs.device = 0x7002000;
    q.kick_polling = 1;
    q.call_polling = 1;
    vhu_queue_config queues[2] = {q, q};
    vhu_mem_region region = {.guest_addr = 0, .size = 0x10000, .user_addr = 0x7000000};
    vhu_frontend_config cfg = VHU_FRONTEND_CONFIG_INIT;
    cfg.features = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES;
    cfg.protocol_features = WANTED;
    cfg.queues = queues;
    cfg.num_queues = 2;
    cfg.regions = &region;
    cfg.num_regions = 1;
    vhu_result r = vhu_frontend_init(fe, size, &cfg);
    if (r != VHU_OK)
        return fail("init", r);

    /* BACKEND_CONFIG_CHANGE_MSG with NEED_REPLY. */
    static uint8_t msg[VHU_MAX_MESSAGE];
    uint8_t ack[VHU_FRONTEND_MAX_ACK];
    vhu_backend_notice n = VHU_BACKEND_NOTICE_INIT;
    put32(msg, 2);
    put32(msg + 4, 0x1 | 0x8);
    put32(msg + 8, 0);
    r = vhu_frontend_serve_backend(fe, msg, VHU_HEADER_SIZE, 0, ack, sizeof ack, &n);
    fprintf(stderr, "before negotiation: %s\n", vhu_result_str(r));
    if (r != VHU_ERR_BUSY || n.kind != VHU_NOTICE_NONE || n.ack_len != 0)
        return 1;

    if (handshake(fe) != 0)
        return 1;

    /* The ack written over the request it answers: refused. */
    r = vhu_frontend_serve_backend(fe, msg, VHU_HEADER_SIZE, 0, msg, VHU_FRONTEND_MAX_ACK, &n);
    fprintf(stderr, "ack over the request: %s\n", vhu_result_str(r));
    if (r != VHU_ERR_INVALID || n.ack_len != 0)
        return 1;

    unsigned served = 0;
    for (;;) {
        int got = read_all(0, msg, VHU_HEADER_SIZE);
        if (got == 0)
            break;
        size_t total;
        if (got < 0 || vhu_message_size(msg, VHU_HEADER_SIZE, &total) != VHU_OK ||
            read_all(0, msg + VHU_HEADER_SIZE, total - VHU_HEADER_SIZE) < 0)
            return fail("read", VHU_ERR_WIRE);
        r = vhu_frontend_serve_backend(fe, msg, total, 0, ack, sizeof ack, &n);
        if (r != VHU_OK) {
            fprintf(stderr, "closed: %s\n", vhu_result_str(r));
            return 2;
        }
        served++;
        log_notice(&n);
        if (n.ack_len != 0 && write_all(1, ack, n.ack_len) < 0)
            return fail("write", VHU_ERR_INTERNAL);
    }
    fprintf(stderr, "end: %u served\n", served);
    free(fe);
    return 0;
}

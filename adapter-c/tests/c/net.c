/*
 * A vhost-user-net device's control path in C: the back-end session with
 * a vhu_device whose set_mtu and send_rarp callbacks take NET_SET_MTU
 * (up to MAX_MTU) and SEND_RARP. Messages come on stdin and replies go
 * to stdout (a test's front-end stands at the other ends); each callback
 * and each refusal is logged to stderr, one line each:
 *
 *   set_mtu 1500 taken            set_mtu 9001 refused
 *   send_rarp 52:54:00:12:34:56 taken
 *   refused 20: VHU_ERR_BAD_MTU: ...
 *
 * Exits 0 at the end of stdin, 1 when the session ends the connection
 * (a refusal without an ack asked) or a call fails.
 *
 * Built and run by adapter-c/tests/c_net.rs.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhu.h"

#define MAX_MTU 9000

struct net {
    unsigned mtus_taken, rarps;
};

static bool net_set_mtu(void *ctx, uint16_t mtu)
{
    struct net *n = ctx;
    bool ok = mtu <= MAX_MTU;
    n->mtus_taken += ok;
    fprintf(stderr, "set_mtu %u %s\n", (unsigned)mtu, ok ? "taken" : "refused");
    return ok;
}

static bool net_send_rarp(void *ctx, const uint8_t *mac)
{
    struct net *n = ctx;
    n->rarps++;
    fprintf(stderr, "send_rarp %02x:%02x:%02x:%02x:%02x:%02x taken\n", mac[0], mac[1], mac[2],
            mac[3], mac[4], mac[5]);
    return true;
}

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

int main(void)
{
    size_t align = vhu_backend_align();
    size_t size = (vhu_backend_size() + align - 1) / align * align;
    vhu_backend *be = aligned_alloc(align, size);
    if (!be)
        return 1;

    struct net net = {0};
    vhu_device dev = VHU_DEVICE_INIT;
    dev.ctx = &net;
    dev.set_mtu = net_set_mtu;
    dev.send_rarp = net_send_rarp;

    vhu_backend_config cfg = VHU_BACKEND_CONFIG_INIT;
    cfg.features = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES;
    cfg.protocol_features = VHU_PROTOCOL_F_REPLY_ACK | VHU_PROTOCOL_F_MTU | VHU_PROTOCOL_F_RARP;
    cfg.num_queues = 2;
    cfg.max_queue_size = 256;
    /* The library this program links was built on its own: IN_ORDER is
     * carried there too (a session offering it starts), not only where
     * another crate of a build turns the core's handling on. */
    vhu_backend_config in_order = cfg;
    in_order.features |= VHU_VIRTIO_F_IN_ORDER;
    vhu_result r = vhu_backend_init(be, size, &in_order);
    if (r != VHU_OK)
        return fail("init offering IN_ORDER", r);
    r = vhu_backend_init(be, size, &cfg);
    if (r != VHU_OK)
        return fail("init", r);

    static uint8_t msg[VHU_MAX_MESSAGE], reply[VHU_MAX_MESSAGE];
    for (;;) {
        int got = read_all(0, msg, VHU_HEADER_SIZE);
        if (got == 0)
            break;
        size_t total;
        if (got < 0 || vhu_message_size(msg, VHU_HEADER_SIZE, &total) != VHU_OK ||
            read_all(0, msg + VHU_HEADER_SIZE, total - VHU_HEADER_SIZE) < 0)
            return fail("read", VHU_ERR_WIRE);
        uint32_t request;
        memcpy(&request, msg, sizeof request); /* little-endian hosts only */
        vhu_outcome out = VHU_OUTCOME_INIT;
        r = vhu_backend_handle(be, msg, total, 0, NULL, &dev, reply, sizeof reply, &out);
        if (r != VHU_OK) {
            fprintf(stderr, "ended %u: %s\n", (unsigned)request, vhu_result_str(r));
            return 1;
        }
        if (out.refused != VHU_OK)
            fprintf(stderr, "refused %u: %s\n", (unsigned)request, vhu_result_str(out.refused));
        /* No message of this device produces an action or a pending reply. */
        if (out.actions != 0 || out.reply == VHU_REPLY_PENDING)
            return fail("unexpected outcome", VHU_ERR_INTERNAL);
        if (out.reply == VHU_REPLY_READY && write_all(1, reply, out.reply_len) < 0)
            return fail("write", VHU_ERR_INTERNAL);
    }
    fprintf(stderr, "end: %u MTUs taken, %u RARPs\n", net.mtus_taken, net.rarps);
    free(be);
    return 0;
}

/*
 * A bare-metal C program linking the C ABI's staticlib (built for
 * thumbv7em-none-eabihf without std): a vhost-user-blk back-end core for a
 * firmware whose front-end shares memory with it (no fds, no sockets, no
 * heap). Every state lives in static storage checked against the
 * library's sizes; guest RAM and the disk are static arrays. The
 * transport (a mailbox in shared memory) is the firmware's business: it
 * hands each message to on_message() and calls poll_rings() in its loop.
 *
 * main() answers a canned GET_FEATURES so the program does something
 * observable when run under a simulator; CI links it and prints .text.
 */
#include <stdint.h>
#include <string.h>

#include "vhu.h"

#define QUEUES 2
#define QUEUE_SIZE 16
#define RAM_BYTES (64u << 10)
#define DISK_BYTES (32u << 10)

#define STORAGE(name, bytes) static _Alignas(8) unsigned char name[bytes]
STORAGE(backend_mem, 4096);
STORAGE(blk_mem, 512);
STORAGE(plan_mem, 2048);
STORAGE(ring_mem[QUEUES], 2048);

static _Alignas(8) uint8_t ram[RAM_BYTES];
static uint8_t disk[DISK_BYTES];
static uint8_t reply[VHU_MAX_MESSAGE];
static vhu_region ram_table[VHU_MAX_REGIONS];
static vhu_mem mem = {ram_table, VHU_MAX_REGIONS, NULL};
static bool running[QUEUES];
static vhu_device device = VHU_DEVICE_INIT; /* vhu_blk_device() fills it */

#define BE ((vhu_backend *)backend_mem)
#define BLK ((vhu_blk *)blk_mem)
#define PLAN ((vhu_blk_request *)plan_mem)
#define RING(q) ((vhu_dataplane *)ring_mem[q])

static int setup(void)
{
    if (vhu_abi_check(VHU_ABI_VERSION) != VHU_OK)
        return -1;
    if (vhu_backend_size() > sizeof backend_mem || vhu_blk_size() > sizeof blk_mem ||
        vhu_blk_request_size() > sizeof plan_mem ||
        vhu_dataplane_size(QUEUE_SIZE) > sizeof ring_mem[0])
        return -1;
    vhu_blk_config bc = {
        .struct_size = sizeof bc,
        .capacity = DISK_BYTES / 512, .blk_size = 512, .num_queues = QUEUES,
        .seg_max = QUEUE_SIZE - 2, .flush = 1,
    };
    uint64_t dev_features;
    if (vhu_blk_init(BLK, sizeof blk_mem, &bc) || vhu_blk_offered_features(BLK, &dev_features) ||
        vhu_blk_device(BLK, &device) || vhu_blk_request_init(PLAN, sizeof plan_mem))
        return -1;
    vhu_backend_config cfg = {
        .struct_size = sizeof cfg,
        .features = dev_features | VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES |
                    VHU_VIRTIO_F_RING_PACKED | VHU_VIRTIO_F_EVENT_IDX,
        .protocol_features = VHU_PROTOCOL_F_MQ | VHU_PROTOCOL_F_REPLY_ACK |
                             VHU_PROTOCOL_F_CONFIG,
        .num_queues = QUEUES,
        .max_queue_size = QUEUE_SIZE,
    };
    return vhu_backend_init(BE, sizeof backend_mem, &cfg) ? -1 : 0;
}

/* Serves one request of ring q; returns 1 if there was one. */
static int serve_one(unsigned q)
{
    vhu_segment segs[VHU_MAX_CHAIN];
    vhu_token tok = VHU_TOKEN_INIT;
    size_t n;
    vhu_blk_op op = VHU_BLK_OP_INIT;
    uint32_t status = VHU_BLK_S_OK, used = 0;
    vhu_published pub;
    if (vhu_dataplane_pop(RING(q), &mem, NULL, &tok, segs, VHU_MAX_CHAIN, &n) ||
        tok.handle == VHU_NO_TOKEN)
        return 0;
    if (tok.side_effects) {
        vhu_blk_plan(BLK, segs, n, &mem, PLAN);
        vhu_blk_request_op(PLAN, &op);
        if (op.kind == VHU_BLK_READ)
            status = vhu_blk_request_write_data(PLAN, &mem, 0, disk + op.offset, (size_t)op.len)
                         ? VHU_BLK_S_IOERR : VHU_BLK_S_OK;
        else if (op.kind == VHU_BLK_WRITE)
            status = vhu_blk_request_read_data(PLAN, &mem, 0, disk + op.offset, (size_t)op.len)
                         ? VHU_BLK_S_IOERR : VHU_BLK_S_OK;
        else if (op.kind == VHU_BLK_GET_ID)
            status = vhu_blk_get_id(BLK, PLAN, &mem) ? VHU_BLK_S_IOERR : VHU_BLK_S_OK;
        else if (op.kind == VHU_BLK_FAIL)
            status = op.status;
        vhu_blk_request_finish(PLAN, &mem, status, &used);
    }
    vhu_dataplane_complete(RING(q), &mem, NULL, tok.handle, used, &pub);
    return 1;
}

void poll_rings(void)
{
    for (unsigned q = 0; q < QUEUES; q++) {
        vhu_published pub;
        if (!running[q])
            continue;
        while (serve_one(q))
            ;
        vhu_dataplane_publish(RING(q), &mem, NULL, &pub);
    }
}

/* One message from the front-end; returns the reply's length (0: none),
 * or -1: drop the conversation. */
long on_message(const uint8_t *msg, size_t len)
{
    vhu_outcome out = VHU_OUTCOME_INIT;
    if (vhu_backend_handle(BE, msg, len, 0, &mem, &device, reply, sizeof reply, &out))
        return -1;
    for (uint32_t i = 0; i < out.actions; i++) {
        vhu_action a = VHU_ACTION_INIT;
        vhu_backend_action(BE, i, &a);
        if (a.kind == VHU_ACTION_MAP_REGION && a.slot < VHU_MAX_REGIONS &&
            a.region.mmap_offset + a.region.size <= RAM_BYTES)
            ram_table[a.slot] = (vhu_region){a.region.guest_addr, a.region.size,
                                             ram + a.region.mmap_offset};
        else if (a.kind == VHU_ACTION_START_RING && a.queue < QUEUES)
            running[a.queue] = vhu_backend_start_ring(BE, a.queue, &mem, NULL, false,
                                                      RING(a.queue), sizeof ring_mem[0]) == VHU_OK;
        else if (a.kind == VHU_ACTION_SET_ENABLED && a.queue < QUEUES && running[a.queue])
            vhu_dataplane_set_enabled(RING(a.queue), a.flag);
    }
    if (out.reply == VHU_REPLY_PENDING && out.queue < QUEUES) {
        bool stopped = false;
        uint32_t base = 0;
        for (int i = 0; i <= QUEUE_SIZE && !stopped; i++) {
            vhu_dataplane_stop(RING(out.queue), &mem, NULL, false, &stopped, &base, NULL);
            while (!stopped && serve_one(out.queue))
                ;
        }
        running[out.queue] = false;
        size_t n;
        if (!stopped || vhu_backend_finish_stop(BE, out.queue, base, reply, sizeof reply, &n))
            return -1;
        return (long)n;
    }
    return out.reply == VHU_REPLY_READY ? (long)out.reply_len : 0;
}

int main(void)
{
    /* GET_FEATURES: request 1, flags version 1, no payload. */
    static const uint8_t get_features[12] = {1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0};
    if (setup())
        return 1;
    long n = on_message(get_features, sizeof get_features);
    poll_rings();
    /* A reply header and eight bytes of features. */
    return n == 20 ? 0 : 2;
}

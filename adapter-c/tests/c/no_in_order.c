/*
 * A program linking the library built without its `in-order` feature:
 * VHU_VIRTIO_F_IN_ORDER is not among the supported features, and a
 * session configuration or a ring that asks for it is refused with
 * VHU_ERR_UNSUPPORTED (its completions would be published as they come),
 * while the same without the bit starts. The build lacks `migration` too:
 * neither LOG_SHMFD, VHOST_F_LOG_ALL nor DEVICE_STATE is supported, and a
 * session offering them is refused. Exits 0 when all holds, else names the first
 * check that failed on stderr.
 */
#include <stdalign.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "vhu.h"

static int check(int ok, const char *what)
{
    if (!ok)
        fprintf(stderr, "failed: %s\n", what);
    return ok;
}

static alignas(64) uint8_t backend[1 << 16];
static alignas(64) uint8_t ring[1 << 14];
/* A guest of one 16 KiB region: a split ring of 8 at 0, 0x1000, 0x2000. */
static alignas(64) uint8_t guest[0x4000];

int main(void)
{
    if (!check(vhu_backend_size() <= sizeof backend, "backend storage") ||
        !check(vhu_dataplane_size(8) <= sizeof ring, "ring storage"))
        return 1;
    if (!check((vhu_backend_supported_features() & VHU_VIRTIO_F_IN_ORDER) == 0,
               "IN_ORDER not supported"))
        return 1;

    vhu_backend_config cfg = VHU_BACKEND_CONFIG_INIT;
    cfg.features = VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES;
    cfg.num_queues = 1;
    cfg.max_queue_size = 256;
    vhu_backend_config in_order = cfg;
    in_order.features |= VHU_VIRTIO_F_IN_ORDER;
    vhu_backend_config logged = cfg;
    logged.features |= VHU_F_LOG_ALL;
    logged.protocol_features = VHU_PROTOCOL_F_LOG_SHMFD;
    if (!check((vhu_backend_supported_features() & VHU_F_LOG_ALL) == 0 &&
                   (vhu_backend_supported_protocol_features() &
                    (VHU_PROTOCOL_F_LOG_SHMFD | VHU_PROTOCOL_F_DEVICE_STATE)) == 0,
               "the dirty log and the device state not supported") ||
        !check(vhu_backend_init((vhu_backend *)backend, sizeof backend, &logged) ==
                   VHU_ERR_UNSUPPORTED,
               "a session offering the dirty log refused"))
        return 1;
    if (!check(vhu_backend_init((vhu_backend *)backend, sizeof backend, &in_order) ==
                   VHU_ERR_UNSUPPORTED,
               "a session offering IN_ORDER refused") ||
        !check(vhu_backend_init((vhu_backend *)backend, sizeof backend, &cfg) == VHU_OK,
               "the same session without it started"))
        return 1;

    vhu_region region = {.gpa = 0, .size = sizeof guest, .host = guest};
    vhu_mem mem = {.regions = &region, .count = 1, .ops = NULL};
    vhu_ring_config rc = VHU_RING_CONFIG_INIT;
    rc.size = 8;
    rc.addrs.desc = 0;
    rc.addrs.driver = 0x1000;
    rc.addrs.device = 0x2000;
    rc.features = VHU_VIRTIO_F_VERSION_1 | VHU_VIRTIO_F_IN_ORDER;
    rc.enabled = 1;
    if (!check(vhu_dataplane_init((vhu_dataplane *)ring, sizeof ring, &rc, &mem, NULL) ==
                   VHU_ERR_UNSUPPORTED,
               "an IN_ORDER ring refused"))
        return 1;
    rc.features = VHU_VIRTIO_F_VERSION_1;
    if (!check(vhu_dataplane_init((vhu_dataplane *)ring, sizeof ring, &rc, &mem, NULL) == VHU_OK,
               "the same ring without it started"))
        return 1;
    return 0;
}

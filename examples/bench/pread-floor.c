/*
 * pread-floor: the CPU cost of synchronous I/O alone, the floor under any
 * back-end that does its I/O with blocking system calls from a thread
 * pool (`--aio threads`, qemu-storage-daemon's aio=threads): THREADS
 * threads each doing 4 KiB O_DIRECT preads (or pwrites) at random aligned
 * offsets of IMG, back to back, for SECONDS. No ring, no hand-off between
 * threads, no notification: what is left is the system call, the block
 * layer, the device and the context switch of each blocking call.
 *
 *   pread-floor IMG THREADS SECONDS [randread|randwrite]
 *
 * Prints "IOPS CPU_US_PER_REQUEST VOLUNTARY_SWITCHES_PER_REQUEST" (CPU is
 * user + system time of the process, from getrusage).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define BS 4096

static int fd;
static int writing;
static uint64_t blocks;
static atomic_int stop;
static atomic_uint_fast64_t done;
static atomic_int failed;

static void *run(void *arg)
{
    void *buf;
    if (posix_memalign(&buf, BS, BS) != 0) {
        atomic_store(&failed, 1);
        return NULL;
    }
    memset(buf, 0x5a, BS);
    uint64_t x = 0x9e3779b97f4a7c15ull * ((uintptr_t)arg + 1);
    uint64_t n = 0;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        off_t off = (off_t)(x % blocks) * BS;
        ssize_t r = writing ? pwrite(fd, buf, BS, off) : pread(fd, buf, BS, off);
        if (r != BS) {
            perror(writing ? "pwrite" : "pread");
            atomic_store(&failed, 1);
            break;
        }
        n++;
    }
    atomic_fetch_add(&done, n);
    free(buf);
    return NULL;
}

static double seconds(struct timeval t)
{
    return (double)t.tv_sec + (double)t.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: pread-floor IMG THREADS SECONDS [randread|randwrite]\n");
        return 2;
    }
    int threads = atoi(argv[2]);
    int secs = atoi(argv[3]);
    writing = argc > 4 && strcmp(argv[4], "randwrite") == 0;
    if (threads < 1 || threads > 1024 || secs < 1) {
        fprintf(stderr, "pread-floor: bad THREADS or SECONDS\n");
        return 2;
    }
    fd = open(argv[1], (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size < BS) {
        perror(argv[1]);
        return 1;
    }
    blocks = (uint64_t)st.st_size / BS;
    pthread_t *t = calloc((size_t)threads, sizeof *t);
    if (!t)
        return 1;
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    int started = 0;
    for (; started < threads; started++)
        if (pthread_create(&t[started], NULL, run, (void *)(uintptr_t)started) != 0)
            break;
    sleep((unsigned)secs);
    atomic_store(&stop, 1);
    for (int i = 0; i < started; i++)
        pthread_join(t[i], NULL);
    getrusage(RUSAGE_SELF, &r1);
    uint64_t n = atomic_load(&done);
    if (started < threads || atomic_load(&failed) || n == 0) {
        fprintf(stderr, "pread-floor: %d of %d threads started, %llu requests\n", started,
                threads, (unsigned long long)n);
        return 1;
    }
    double cpu = seconds(r1.ru_utime) - seconds(r0.ru_utime) + seconds(r1.ru_stime) -
                 seconds(r0.ru_stime);
    printf("%.0f %.2f %.2f\n", (double)n / secs, cpu * 1e6 / (double)n,
           (double)(r1.ru_nvcsw - r0.ru_nvcsw) / (double)n);
    free(t);
    return 0;
}

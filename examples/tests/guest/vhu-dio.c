/*
 * vhu-dio: tiny O_DIRECT block I/O helper for the vhu test guest.
 *
 * Built statically by build-guest.sh (gcc -static -O2) and installed as
 * /bin/vhu-dio in the guest initramfs. Unlike busybox dd, which silently
 * falls back to buffered I/O when O_DIRECT fails with EINVAL, this helper
 * fails loudly, so a test knows its I/O really reached the device.
 *
 *   vhu-dio write  DEV OFFSET LEN SEED   write a deterministic pattern
 *   vhu-dio verify DEV OFFSET LEN SEED   read back and compare (exit 1 on mismatch)
 *   vhu-dio read   DEV OFFSET LEN        read and print a checksum (FNV-1a 64)
 *   vhu-dio flush  DEV                   fdatasync the device (VIRTIO_BLK_T_FLUSH)
 *
 * OFFSET and LEN are bytes, multiples of 512 (4096 is safest). Numbers accept
 * 0x, k (KiB) and m (MiB) suffixes. The pattern for byte i (absolute device
 * offset o) is a 64-bit mix of (seed, o / 8), so any offset/length window of
 * one pattern can be verified independently. On success it prints one line
 * "vhu-dio: <op> ok off=... len=... sum=0x..." and exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define CHUNK (1u << 20)

static uint64_t parse_num(const char *s)
{
	char *end;
	uint64_t v = strtoull(s, &end, 0);
	if (end == s) {
		fprintf(stderr, "vhu-dio: bad number '%s'\n", s);
		exit(2);
	}
	switch (*end) {
	case 'k': case 'K': v <<= 10; break;
	case 'm': case 'M': v <<= 20; break;
	case '\0': break;
	default:
		fprintf(stderr, "vhu-dio: bad number '%s'\n", s);
		exit(2);
	}
	return v;
}

static uint64_t mix(uint64_t seed, uint64_t word)
{
	uint64_t z = seed * 0x9e3779b97f4a7c15ull + word;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void fill(unsigned char *buf, uint64_t off, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len; i += 8) {
		uint64_t v = mix(seed, (off + i) / 8);
		memcpy(buf + i, &v, 8);
	}
}

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

static int usage(void)
{
	fprintf(stderr,
		"usage: vhu-dio write|verify DEV OFFSET LEN SEED\n"
		"       vhu-dio read DEV OFFSET LEN\n"
		"       vhu-dio flush DEV\n");
	return 2;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return usage();
	const char *op = argv[1], *dev = argv[2];
	int is_write = !strcmp(op, "write"), is_verify = !strcmp(op, "verify");
	int is_read = !strcmp(op, "read"), is_flush = !strcmp(op, "flush");

	if (is_flush) {
		int fd = open(dev, O_WRONLY);
		if (fd < 0 || fdatasync(fd) < 0) {
			fprintf(stderr, "vhu-dio: flush %s: %s\n", dev, strerror(errno));
			return 1;
		}
		printf("vhu-dio: flush ok\n");
		return 0;
	}
	if (!((is_write || is_verify) && argc == 6) && !(is_read && argc == 5))
		return usage();

	uint64_t off = parse_num(argv[3]), len = parse_num(argv[4]);
	uint64_t seed = (is_write || is_verify) ? parse_num(argv[5]) : 0;
	if (off % 512 || len % 512 || len == 0) {
		fprintf(stderr, "vhu-dio: OFFSET and LEN must be non-zero multiples of 512\n");
		return 2;
	}
	int fd = open(dev, (is_write ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		fprintf(stderr, "vhu-dio: open %s O_DIRECT: %s\n", dev, strerror(errno));
		return 1;
	}
	/* Page-aligned buffers from mmap satisfy any O_DIRECT alignment. */
	unsigned char *buf = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *want = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED || want == MAP_FAILED) {
		perror("vhu-dio: mmap");
		return 1;
	}
	uint64_t sum = 0xcbf29ce484222325ull;
	for (uint64_t done = 0; done < len;) {
		size_t n = (len - done) < CHUNK ? (size_t)(len - done) : CHUNK;
		uint64_t at = off + done;
		ssize_t r;
		if (is_write) {
			fill(buf, at, n, seed);
			r = pwrite(fd, buf, n, (off_t)at);
		} else {
			r = pread(fd, buf, n, (off_t)at);
		}
		if (r < 0) {
			fprintf(stderr, "vhu-dio: %s %s at %llu: %s\n", op, dev,
				(unsigned long long)at, strerror(errno));
			return 1;
		}
		if ((size_t)r != n) {
			fprintf(stderr, "vhu-dio: short %s at %llu: %zd of %zu\n", op,
				(unsigned long long)at, r, n);
			return 1;
		}
		if (is_verify) {
			fill(want, at, n, seed);
			if (memcmp(buf, want, n)) {
				size_t i = 0;
				while (buf[i] == want[i])
					i++;
				fprintf(stderr,
					"vhu-dio: MISMATCH at byte %llu: got 0x%02x want 0x%02x\n",
					(unsigned long long)(at + i), buf[i], want[i]);
				return 1;
			}
		}
		sum = fnv(sum, buf, n);
		done += n;
	}
	if (close(fd) < 0) {
		fprintf(stderr, "vhu-dio: close: %s\n", strerror(errno));
		return 1;
	}
	printf("vhu-dio: %s ok off=%llu len=%llu sum=0x%016llx\n", op,
	       (unsigned long long)off, (unsigned long long)len,
	       (unsigned long long)sum);
	return 0;
}

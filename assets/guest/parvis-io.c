// parvis-io: a small disk benchmark for the test guest (fio cannot be put in a busybox
// initramfs). O_DIRECT, Linux native AIO through raw system calls, so one static binary.
//
//   parvis-io DEVICE [SECONDS] [REGION_MIB]
//
// Within the first REGION_MIB (default 64, at most the disk) it runs, SECONDS (default 5)
// each: sequential write and sequential read in 1 MiB requests at queue depth 8, then
// 4 KiB random reads at queue depth 1 and 32. Prints one marker per result:
//   PARVIS-IO-SEQ-WRITE-MBPS=…  PARVIS-IO-SEQ-READ-MBPS=…
//   PARVIS-IO-RAND-READ-QD1-IOPS=…  PARVIS-IO-RAND-READ-QD32-IOPS=…  PARVIS-IO-DONE
// or PARVIS-IO-ERROR=reason. The device's contents in the region are overwritten.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024L * 1024L)
#define MAX_QD 32

static aio_context_t ctx;
static int fd;
static uint64_t region;
static double seconds = 5;

static void fail(const char *what) {
	printf("PARVIS-IO-ERROR=%s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static double now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static uint64_t next_random(void) {
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

// Keep `depth` requests of `size` bytes in flight for `seconds`: sequential (wrapping at
// the region's end) or random 4 KiB-aligned offsets. Returns completed requests per second.
static double run(int write, int sequential, size_t size, int depth, char *bufs[]) {
	struct iocb cbs[MAX_QD], *list[MAX_QD];
	struct io_event events[MAX_QD];
	uint64_t next = 0;
	long done = 0;
	int inflight = 0;
	int free_slots[MAX_QD], nfree = depth;
	double start = now(), end = start + seconds;
	for (int i = 0; i < depth; i++) {
		memset(&cbs[i], 0, sizeof cbs[i]);
		cbs[i].aio_fildes = fd;
		cbs[i].aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
		cbs[i].aio_buf = (uint64_t)(uintptr_t)bufs[i];
		cbs[i].aio_nbytes = size;
		cbs[i].aio_data = i;
		free_slots[i] = depth - 1 - i;
	}
	for (;;) {
		int n = 0;
		int stop = now() >= end;
		while (!stop && inflight < depth) {
			// A slot is free again once its event came back.
			struct iocb *cb = &cbs[free_slots[--nfree]];
			if (sequential) {
				cb->aio_offset = next;
				next += size;
				if (next + size > region)
					next = 0;
			} else {
				cb->aio_offset = (next_random() % (region / size)) * size;
			}
			list[n++] = cb;
			inflight++;
		}
		if (n > 0 && syscall(SYS_io_submit, ctx, n, list) != n)
			fail("io_submit");
		if (inflight == 0)
			break;
		int got = syscall(SYS_io_getevents, ctx, 1, MAX_QD, events, NULL);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			fail("io_getevents");
		}
		for (int i = 0; i < got; i++) {
			if ((long)events[i].res != (long)size) {
				errno = events[i].res < 0 ? (int)-events[i].res : EIO;
				fail(write ? "write" : "read");
			}
			free_slots[nfree++] = (int)events[i].data;
		}
		inflight -= got;
		done += got;
	}
	return done / (now() - start);
}

int main(int argc, char **argv) {
	if (argc < 2) {
		fprintf(stderr, "usage: parvis-io DEVICE [SECONDS] [REGION_MIB]\n");
		return 2;
	}
	if (argc > 2)
		seconds = atof(argv[2]);
	uint64_t want = (argc > 3 ? strtoull(argv[3], NULL, 10) : 64) * MIB;
	fd = open(argv[1], O_RDWR | O_DIRECT);
	if (fd < 0)
		fail("open");
	uint64_t size;
	if (ioctl(fd, BLKGETSIZE64, &size) < 0)
		fail("BLKGETSIZE64");
	region = (want < size ? want : size) / MIB * MIB;
	if (region < 8 * MIB) {
		errno = ENOSPC;
		fail("the disk is smaller than 8 MiB");
	}
	if (syscall(SYS_io_setup, MAX_QD, &ctx) < 0)
		fail("io_setup");
	char *bufs[MAX_QD];
	for (int i = 0; i < MAX_QD; i++) {
		if (posix_memalign((void **)&bufs[i], 4096, MIB))
			fail("posix_memalign");
		memset(bufs[i], 0x5a + i, MIB);
	}
	printf("PARVIS-IO-DEVICE=%s,%llu,%llu\n", argv[1], (unsigned long long)size,
	       (unsigned long long)region);
	fflush(stdout);
	double w = run(1, 1, MIB, 8, bufs);
	if (fsync(fd) < 0)
		fail("fsync");
	printf("PARVIS-IO-SEQ-WRITE-MBPS=%.1f\n", w);
	fflush(stdout);
	printf("PARVIS-IO-SEQ-READ-MBPS=%.1f\n", run(0, 1, MIB, 8, bufs));
	fflush(stdout);
	printf("PARVIS-IO-RAND-READ-QD1-IOPS=%.0f\n", run(0, 0, 4096, 1, bufs));
	fflush(stdout);
	printf("PARVIS-IO-RAND-READ-QD32-IOPS=%.0f\n", run(0, 0, 4096, 32, bufs));
	printf("PARVIS-IO-DONE\n");
	fflush(stdout);
	return 0;
}

/*
 * A program written against the kernel's HMM test device (/dev/hmm_dmirror0..3 and the ioctls
 * of lib/test_hmm_uapi.h), in the style of the kernel's selftests: plain mmap, plain loads and
 * stores, one forked child per case. It knows nothing of hetmem: capi/tests/preload.rs runs it
 * with LD_PRELOAD=libhmm_dmirror.so (capi/preload/hmm_dmirror.c), which emulates the device on
 * hetmem. Prints one line per case; exits non-zero if any case failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

/* The test device's interface (lib/test_hmm_uapi.h). */
struct hmm_dmirror_cmd {
	uint64_t addr, ptr, npages, cpages, faults;
};
#define HMM_DMIRROR_READ _IOWR('H', 0x00, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_WRITE _IOWR('H', 0x01, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_MIGRATE_TO_DEV _IOWR('H', 0x02, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_MIGRATE_TO_SYS _IOWR('H', 0x03, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_SNAPSHOT _IOWR('H', 0x04, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_EXCLUSIVE _IOWR('H', 0x05, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_CHECK_EXCLUSIVE _IOWR('H', 0x06, struct hmm_dmirror_cmd)
#define DMIRROR_PROT_WRITE 0x02
#define PROT_DEV_PRIVATE_LOCAL 0x20
#define PROT_DEV_COHERENT_LOCAL 0x40

#define PAGE 4096UL
#define NPAGES 64UL
#define CHECK(cond)                                                                 \
	do {                                                                        \
		if (!(cond)) {                                                      \
			fprintf(stderr, "%s:%d: %s failed (errno %d)\n", __FILE__, \
				__LINE__, #cond, errno);                            \
			return 1;                                                   \
		}                                                                   \
	} while (0)

static int cmd(int fd, unsigned long req, void *addr, void *ptr, uint64_t npages,
	       struct hmm_dmirror_cmd *out)
{
	struct hmm_dmirror_cmd c = { .addr = (uint64_t)addr, .ptr = (uint64_t)ptr, .npages = npages };
	int r = ioctl(fd, req, &c);
	if (out)
		*out = c;
	return r < 0 ? -errno : 0;
}

/* The /proc/self/pagemap entry of the page at `addr`. */
static uint64_t pagemap_entry(const void *addr)
{
	uint64_t e = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		return 0;
	if (pread(fd, &e, sizeof(e), (off_t)((uintptr_t)addr / PAGE * sizeof(e))) != sizeof(e))
		e = 0;
	close(fd);
	return e;
}
#define PM_SWAP (1ULL << 62)
#define PM_PRESENT (1ULL << 63)

static int *buffer(void)
{
	void *p = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		       -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

static int anon_read(void)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(fd >= 0);
	int *buf = buffer(), *mirror = malloc(NPAGES * PAGE);
	CHECK(buf && mirror);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		buf[i] = (int)i;
	struct hmm_dmirror_cmd c;
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf, mirror, NPAGES, &c) == 0);
	CHECK(c.cpages == NPAGES);
	CHECK(c.faults == 1);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(mirror[i] == (int)i);
	CHECK(close(fd) == 0);
	return 0;
}

static int anon_write(void)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(fd >= 0);
	int *buf = buffer(), *mirror = malloc(NPAGES * PAGE);
	CHECK(buf && mirror);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		mirror[i] = (int)i * 5;
	struct hmm_dmirror_cmd c;
	CHECK(cmd(fd, HMM_DMIRROR_WRITE, buf, mirror, NPAGES, &c) == 0);
	CHECK(c.cpages == NPAGES);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(buf[i] == (int)i * 5);
	return 0;
}

static int migrate_and_fault_back(void)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR, 0);
	int other = open("/dev/hmm_dmirror1", O_RDWR, 0);
	CHECK(fd >= 0 && other >= 0);
	int *buf = buffer(), *mirror = malloc(NPAGES * PAGE);
	unsigned char snap[NPAGES];
	CHECK(buf && mirror);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		buf[i] = (int)i + 3;
	struct hmm_dmirror_cmd c;
	CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, NPAGES, &c) == 0);
	CHECK(c.cpages == NPAGES);
	CHECK(cmd(fd, HMM_DMIRROR_SNAPSHOT, buf, snap, NPAGES, &c) == 0);
	for (unsigned long i = 0; i < NPAGES; i++)
		CHECK(snap[i] == (PROT_DEV_PRIVATE_LOCAL | DMIRROR_PROT_WRITE));
	/* The kernel's pagemap shows a device-private page as a swap entry, not present. */
	for (unsigned long i = 0; i < NPAGES; i++) {
		uint64_t e = pagemap_entry((char *)buf + i * PAGE);
		CHECK((e & PM_SWAP) && !(e & PM_PRESENT));
	}
	/* Another device's snapshot (no fault) gets no valid entry for a page in a device's
	 * private memory that is not its own: NONE, as the kernel's hmm_range_fault answers. */
	CHECK(cmd(other, HMM_DMIRROR_SNAPSHOT, buf, snap, NPAGES, &c) == 0);
	for (unsigned long i = 0; i < NPAGES; i++)
		CHECK(snap[i] == 0);
	/* Plain loads fault the pages back. */
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(buf[i] == (int)i + 3);
	CHECK(pagemap_entry(buf) & PM_PRESENT);
	/* The kernel's errors: an unaligned address, an empty range. */
	CHECK(cmd(fd, HMM_DMIRROR_READ, (char *)buf + 1, mirror, 1, NULL) == -EINVAL);
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf, mirror, 0, NULL) == -EINVAL);
	/* munmap while the device holds pages, then the memory is gone for the device too. */
	CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, NPAGES, &c) == 0);
	CHECK(munmap(buf, NPAGES * PAGE) == 0);
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf, mirror, NPAGES, NULL) == -EFAULT);
	return 0;
}

static int coherent_device(void)
{
	int fd = open("/dev/hmm_dmirror2", O_RDWR, 0);
	CHECK(fd >= 0);
	int *buf = buffer(), *mirror = malloc(NPAGES * PAGE);
	unsigned char snap[NPAGES];
	CHECK(buf && mirror);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		buf[i] = (int)i ^ 0x55;
	struct hmm_dmirror_cmd c;
	CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, NPAGES, &c) == 0);
	CHECK(cmd(fd, HMM_DMIRROR_SNAPSHOT, buf, snap, NPAGES, &c) == 0);
	for (unsigned long i = 0; i < NPAGES; i++)
		CHECK(snap[i] == (PROT_DEV_COHERENT_LOCAL | DMIRROR_PROT_WRITE));
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(buf[i] == ((int)i ^ 0x55));
	CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, mirror, NPAGES, &c) == 0);
	CHECK(c.cpages == NPAGES);
	return 0;
}

static int exclusive_then_cpu_write(void)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(fd >= 0);
	int *buf = buffer(), *mirror = malloc(NPAGES * PAGE);
	CHECK(buf && mirror);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		buf[i] = (int)i;
	struct hmm_dmirror_cmd c;
	CHECK(cmd(fd, HMM_DMIRROR_EXCLUSIVE, buf, mirror, NPAGES, &c) == 0);
	CHECK(c.cpages == NPAGES);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(mirror[i] == (int)i);
	CHECK(cmd(fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, mirror, NPAGES, NULL) == -EPERM);
	/* CPU stores revoke the device's exclusive access. */
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		buf[i]++;
	CHECK(cmd(fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, mirror, NPAGES, NULL) == 0);
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf, mirror, NPAGES, &c) == 0);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(mirror[i] == (int)i + 1);
	return 0;
}

/* The kernel's gup_test driver (CONFIG_GUP_TEST), as hmm-tests uses it: get_user_pages and
 * pin_user_pages of pages in device memory. */
struct gup_test {
	uint64_t get_delta_usec, put_delta_usec, addr, size;
	uint32_t nr_pages_per_call, gup_flags, test_flags;
	uint32_t which_pages[8];
};
#define GUP_FAST_BENCHMARK _IOWR('g', 1, struct gup_test)
#define PIN_FAST_BENCHMARK _IOWR('g', 2, struct gup_test)
#define PIN_LONGTERM_BENCHMARK _IOWR('g', 3, struct gup_test)
#define GUP_BASIC_TEST _IOWR('g', 4, struct gup_test)
#define FOLL_WRITE 0x01
#define FOLL_LONGTERM 0x100

static int gup(int fd, unsigned long req, void *addr, unsigned flags)
{
	struct gup_test g = { .addr = (uint64_t)addr, .size = PAGE, .nr_pages_per_call = 1,
			      .gup_flags = FOLL_WRITE | flags };
	return ioctl(fd, req, &g) ? -errno : 0;
}

/* A get_user_pages brings a device-private page back to system memory; a device-coherent page
 * stays where it is but for a long-term pin, which moves it to system memory (hmm_gup_test). */
static int gup_of_device_pages(void)
{
	int gfd = open("/sys/kernel/debug/gup_test", O_RDWR);
	CHECK(gfd >= 0);
	for (int coherent = 0; coherent <= 1; coherent++) {
		int fd = open(coherent ? "/dev/hmm_dmirror2" : "/dev/hmm_dmirror0", O_RDWR, 0);
		CHECK(fd >= 0);
		int *buf = buffer(), *mirror = malloc(NPAGES * PAGE);
		unsigned char snap[4];
		CHECK(buf && mirror);
		for (unsigned long i = 0; i < 4 * PAGE / sizeof(int); i++)
			buf[i] = (int)i + 11;
		struct hmm_dmirror_cmd c;
		CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, 4, &c) == 0);
		CHECK(c.cpages == 4);
		CHECK(gup(gfd, GUP_BASIC_TEST, buf, 0) == 0);
		CHECK(gup(gfd, GUP_FAST_BENCHMARK, (char *)buf + PAGE, 0) == 0);
		CHECK(gup(gfd, PIN_FAST_BENCHMARK, (char *)buf + 2 * PAGE, FOLL_LONGTERM) == 0);
		CHECK(gup(gfd, PIN_LONGTERM_BENCHMARK, (char *)buf + 3 * PAGE, 0) == 0);
		CHECK(cmd(fd, HMM_DMIRROR_SNAPSHOT, buf, snap, 4, &c) == 0);
		unsigned char kept = coherent ? (PROT_DEV_COHERENT_LOCAL | DMIRROR_PROT_WRITE)
					      : DMIRROR_PROT_WRITE;
		CHECK(snap[0] == kept && snap[1] == kept);
		CHECK(snap[2] == DMIRROR_PROT_WRITE && snap[3] == DMIRROR_PROT_WRITE);
		for (unsigned long i = 0; i < 4 * PAGE / sizeof(int); i++)
			CHECK(buf[i] == (int)i + 11);
		/* Memory no device has used: plain pages, faulted in. */
		CHECK(gup(gfd, GUP_BASIC_TEST, (char *)buf + 8 * PAGE, 0) == 0);
		CHECK(close(fd) == 0);
	}
	/* Memory that is not mapped. */
	void *hole = mmap(NULL, PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(hole != MAP_FAILED && munmap(hole, PAGE) == 0);
	CHECK(gup(gfd, GUP_BASIC_TEST, hole, 0) == -EFAULT);
	CHECK(close(gfd) == 0);
	return 0;
}

/* mprotect(PROT_READ) of memory the device has used: the device may still read it, its write is
 * EPERM and leaves the memory as it was; made writable again, the write lands. */
static int write_protected(void)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(fd >= 0);
	int *buf = buffer(), *mirror = malloc(NPAGES * PAGE);
	CHECK(buf && mirror);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++) {
		buf[i] = (int)i;
		mirror[i] = -(int)i;
	}
	struct hmm_dmirror_cmd c;
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf, mirror, NPAGES, &c) == 0);
	CHECK(mprotect(buf, NPAGES * PAGE, PROT_READ) == 0);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		mirror[i] = -(int)i;
	CHECK(cmd(fd, HMM_DMIRROR_WRITE, buf, mirror, NPAGES, &c) == -EPERM);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(buf[i] == (int)i);
	CHECK(mprotect(buf, NPAGES * PAGE, PROT_READ | PROT_WRITE) == 0);
	CHECK(cmd(fd, HMM_DMIRROR_WRITE, buf, mirror, NPAGES, &c) == 0);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(buf[i] == -(int)i);
	return 0;
}

static int fork_child_reads_device_pages(void)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(fd >= 0);
	int *buf = buffer(), *mirror = malloc(NPAGES * PAGE);
	CHECK(buf && mirror);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		buf[i] = (int)i * 9;
	struct hmm_dmirror_cmd c;
	CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, NPAGES, &c) == 0);
	pid_t pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++) {
			if (buf[i] != (int)i * 9)
				_exit(10);
			buf[i] = 0;
		}
		_exit(0);
	}
	int st;
	CHECK(waitpid(pid, &st, 0) == pid);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(buf[i] == (int)i * 9);
	return 0;
}

/* As the kernel's anon_write_child: after the parent migrated its buffer, a forked child opens
 * a device of its own and writes the buffer it inherited through it; the parent's stays. */
static int fork_child_opens_its_own_device(void)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(fd >= 0);
	int *buf = buffer(), *mirror = malloc(NPAGES * PAGE);
	CHECK(buf && mirror);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		buf[i] = (int)i;
	struct hmm_dmirror_cmd c;
	CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, NPAGES, &c) == 0);
	pid_t pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
			if (buf[i] != (int)i)
				_exit(10);
		int cfd = open("/dev/hmm_dmirror0", O_RDWR, 0);
		if (cfd < 0)
			_exit(11);
		for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
			mirror[i] = -(int)i;
		if (cmd(cfd, HMM_DMIRROR_WRITE, buf, mirror, NPAGES, &c) != 0 || c.cpages != NPAGES)
			_exit(12);
		for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
			if (buf[i] != -(int)i)
				_exit(13);
		_exit(0);
	}
	int st;
	CHECK(waitpid(pid, &st, 0) == pid);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(buf[i] == (int)i);
	return 0;
}

/* An unlinked temporary file holding NPAGES pages of `data`: its descriptor, or -1. */
static int temp_file_with(const int *data)
{
	char path[] = "/tmp/dmirror_test_XXXXXX";
	int fd = mkstemp(path);
	if (fd < 0)
		return -1;
	unlink(path);
	if (pwrite(fd, data, NPAGES * PAGE, 0) != (ssize_t)(NPAGES * PAGE)) {
		close(fd);
		return -1;
	}
	return fd;
}

/* A shared file mapping (and shared anonymous memory): the device reads and writes the pages
 * in place, as the kernel's device does with page-cache pages; the file sees the device's
 * stores. */
static int file_shared_in_place(void)
{
	int dev = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(dev >= 0);
	int *mirror = malloc(NPAGES * PAGE);
	CHECK(mirror);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		mirror[i] = (int)i * 7;
	int fd = temp_file_with(mirror);
	CHECK(fd >= 0);
	int *map = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(map != MAP_FAILED);
	memset(mirror, 0, NPAGES * PAGE);
	struct hmm_dmirror_cmd c;
	CHECK(cmd(dev, HMM_DMIRROR_READ, map, mirror, NPAGES, &c) == 0);
	CHECK(c.cpages == NPAGES && c.faults == 1);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(mirror[i] == (int)i * 7);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		mirror[i] = -(int)i;
	CHECK(cmd(dev, HMM_DMIRROR_WRITE, map, mirror, NPAGES, &c) == 0);
	CHECK(c.cpages == NPAGES);
	CHECK(map[5] == -5);
	CHECK(pread(fd, mirror, NPAGES * PAGE, 0) == (ssize_t)(NPAGES * PAGE));
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(mirror[i] == -(int)i);
	/* A read-only mapping refuses the device's write (EFAULT), a migration finds no page it
	 * may move (ENOENT). */
	int *ro = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, 0);
	CHECK(ro != MAP_FAILED);
	CHECK(cmd(dev, HMM_DMIRROR_WRITE, ro, mirror, 1, NULL) == -EFAULT);
	CHECK(cmd(dev, HMM_DMIRROR_MIGRATE_TO_DEV, map, mirror, 1, NULL) == -ENOENT);
	/* Shared anonymous memory likewise. */
	int *shm = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(shm != MAP_FAILED);
	mirror[0] = 0x5eed;
	CHECK(cmd(dev, HMM_DMIRROR_WRITE, shm, mirror, 1, NULL) == 0);
	CHECK(shm[0] == 0x5eed);
	return 0;
}

/* A snapshot over a hole, a PROT_NONE page, the zero page, a read-only page, a written page and
 * pages two devices migrated (each adopted on its own): the kernel's answers, page by page. */
static int snapshot_across_holes_and_devices(void)
{
	int fd0 = open("/dev/hmm_dmirror0", O_RDWR, 0);
	int fd1 = open("/dev/hmm_dmirror1", O_RDWR, 0);
	CHECK(fd0 >= 0 && fd1 >= 0);
	char *p = mmap(NULL, 7 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(p != MAP_FAILED);
	CHECK(munmap(p + PAGE, PAGE) == 0);
	CHECK(mprotect(p + 2 * PAGE, PAGE, PROT_READ) == 0);
	CHECK(*(volatile int *)(p + 2 * PAGE) == 0);
	CHECK(mprotect(p + 3 * PAGE, PAGE, PROT_READ | PROT_WRITE) == 0);
	*(int *)(p + 3 * PAGE) = 3;
	CHECK(mprotect(p + 3 * PAGE, PAGE, PROT_READ) == 0);
	CHECK(mprotect(p + 4 * PAGE, 3 * PAGE, PROT_READ | PROT_WRITE) == 0);
	*(int *)(p + 4 * PAGE) = 4;
	char *mirror = malloc(7 * PAGE);
	CHECK(mirror);
	CHECK(cmd(fd0, HMM_DMIRROR_MIGRATE_TO_DEV, p + 5 * PAGE, mirror, 1, NULL) == 0);
	CHECK(cmd(fd1, HMM_DMIRROR_MIGRATE_TO_DEV, p + 6 * PAGE, mirror, 1, NULL) == 0);
	unsigned char m[7];
	struct hmm_dmirror_cmd c;
	CHECK(cmd(fd0, HMM_DMIRROR_SNAPSHOT, p, m, 7, &c) == 0);
	CHECK(c.cpages == 7);
	CHECK(m[0] == 0xFF); /* PROT_NONE: ERROR */
	CHECK(m[1] == 0xFF); /* hole: ERROR */
	CHECK(m[2] == (0x10 | 0x01)); /* ZERO | READ */
	CHECK(m[3] == 0x01); /* READ */
	CHECK(m[4] == DMIRROR_PROT_WRITE);
	CHECK(m[5] == (PROT_DEV_PRIVATE_LOCAL | DMIRROR_PROT_WRITE));
	CHECK(m[6] == 0); /* another device's private page: NONE */
	/* The pages are still where they were, with their data. */
	CHECK(*(int *)(p + 4 * PAGE) == 4);
	return 0;
}

/* A private file mapping the program wrote: migrated (as the kernel migrates its written,
 * anonymous pages), its data intact, the file unchanged. */
static int private_file_migrates(void)
{
	int dev = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(dev >= 0);
	int *mirror = malloc(NPAGES * PAGE);
	CHECK(mirror);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		mirror[i] = 7;
	int fd = temp_file_with(mirror);
	CHECK(fd >= 0);
	int *map = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	CHECK(map != MAP_FAILED);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int) / 2; i++)
		map[i] = (int)i;
	struct hmm_dmirror_cmd c;
	CHECK(cmd(dev, HMM_DMIRROR_MIGRATE_TO_DEV, map, mirror, NPAGES, &c) == 0);
	CHECK(c.cpages == NPAGES);
	unsigned char snap[NPAGES];
	CHECK(cmd(dev, HMM_DMIRROR_SNAPSHOT, map, snap, NPAGES, NULL) == 0);
	CHECK(snap[0] == (PROT_DEV_PRIVATE_LOCAL | DMIRROR_PROT_WRITE));
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(map[i] == (i < NPAGES * PAGE / sizeof(int) / 2 ? (int)i : 7));
	CHECK(pread(fd, mirror, PAGE, 0) == (ssize_t)PAGE);
	CHECK(mirror[0] == 7 && mirror[5] == 7);
	return 0;
}

/* A mapping of the device itself (mmap of its descriptor): pages the device inserted, mapped
 * read-only in a private mapping until written. */
static int device_mapping(void)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(fd >= 0);
	char *p = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	CHECK(p != MAP_FAILED);
	unsigned char m[2];
	CHECK(cmd(fd, HMM_DMIRROR_SNAPSHOT, p, m, 2, NULL) == 0);
	CHECK(m[0] == 0x01 && m[1] == 0x01);
	p[0] = 1;
	CHECK(cmd(fd, HMM_DMIRROR_SNAPSHOT, p, m, 2, NULL) == 0);
	CHECK(m[0] == DMIRROR_PROT_WRITE && m[1] == 0x01);
	return 0;
}

/* Commands over different, overlapping ranges of one malloc'd buffer (not a mapping of the
 * program's own): the kernel's device takes any range of the process. Under the emulation the
 * buffer is adopted command by command, so later ranges run into and across the pieces (found
 * from outside: four commands in five failed with EFAULT or EINVAL). */
static int malloc_overlapping_ranges(void)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(fd >= 0);
	char *raw = malloc((NPAGES + 1) * PAGE);
	int *mirror = malloc(NPAGES * PAGE);
	CHECK(raw && mirror);
	int *buf = (int *)(((uintptr_t)raw + PAGE - 1) & ~(PAGE - 1));
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		buf[i] = (int)i;
	struct hmm_dmirror_cmd c;
	/* Two pieces first, then ranges across them, into them and over all. */
	CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf + 8 * PAGE / sizeof(int), mirror, 8, &c) == 0);
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf + 32 * PAGE / sizeof(int), mirror, 8, &c) == 0);
	CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf + 4 * PAGE / sizeof(int), mirror, 32, &c) == 0);
	CHECK(c.cpages == 32);
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf, mirror, NPAGES, &c) == 0);
	CHECK(c.cpages == NPAGES);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(mirror[i] == (int)i);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		mirror[i] = (int)i * 3;
	CHECK(cmd(fd, HMM_DMIRROR_WRITE, buf, mirror, NPAGES, &c) == 0);
	CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf + 2 * PAGE / sizeof(int), mirror, 40, &c) == 0);
	for (unsigned long i = 0; i < NPAGES * PAGE / sizeof(int); i++)
		CHECK(buf[i] == (int)i * 3);
	CHECK(close(fd) == 0);
	return 0;
}

/* Bad buffers: the kernel's device copies with copy_to_user/copy_from_user, EFAULT for a null
 * or unmapped one (found from outside: the emulation said EINVAL for a null one). */
static int bad_buffers(void)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR, 0);
	CHECK(fd >= 0);
	int *buf = buffer();
	CHECK(buf);
	void *gone = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(gone != MAP_FAILED && munmap(gone, NPAGES * PAGE) == 0);
	struct hmm_dmirror_cmd c;
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf, NULL, NPAGES, &c) == -EFAULT);
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf, gone, NPAGES, &c) == -EFAULT);
	CHECK(cmd(fd, HMM_DMIRROR_WRITE, buf, gone, NPAGES, &c) == -EFAULT);
	/* A snapshot of memory no command has named yet (answered from the page tables). */
	int *fresh = buffer();
	CHECK(fresh);
	CHECK(cmd(fd, HMM_DMIRROR_SNAPSHOT, fresh, NULL, NPAGES, &c) == -EFAULT);
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf, (void *)(UINTPTR_MAX - 2047), 1, &c) == -EFAULT);
	/* Mapped but not writable (READ writes it), not readable (WRITE reads it). */
	void *ro = mmap(NULL, NPAGES * PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *none = mmap(NULL, NPAGES * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(ro != MAP_FAILED && none != MAP_FAILED);
	CHECK(cmd(fd, HMM_DMIRROR_READ, buf, ro, NPAGES, &c) == -EFAULT);
	CHECK(cmd(fd, HMM_DMIRROR_WRITE, buf, none, NPAGES, &c) == -EFAULT);
	/* A migration copies to the buffer after the work, as the kernel's: the pages moved. */
	CHECK(cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, ro, NPAGES, &c) == -EFAULT);
	CHECK(pagemap_entry(buf) & PM_SWAP);
	CHECK(close(fd) == 0);
	return 0;
}

int main(void)
{
	struct {
		const char *name;
		int (*run)(void);
	} cases[] = {
		{ "anon_read", anon_read },
		{ "anon_write", anon_write },
		{ "migrate_and_fault_back", migrate_and_fault_back },
		{ "coherent_device", coherent_device },
		{ "exclusive_then_cpu_write", exclusive_then_cpu_write },
		{ "write_protected", write_protected },
		{ "fork_child_reads_device_pages", fork_child_reads_device_pages },
		{ "fork_child_opens_its_own_device", fork_child_opens_its_own_device },
		{ "file_shared_in_place", file_shared_in_place },
		{ "snapshot_across_holes_and_devices", snapshot_across_holes_and_devices },
		{ "device_mapping", device_mapping },
		{ "private_file_migrates", private_file_migrates },
		{ "gup_of_device_pages", gup_of_device_pages },
		{ "malloc_overlapping_ranges", malloc_overlapping_ranges },
		{ "bad_buffers", bad_buffers },
	};
	int failed = 0;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		fflush(stdout);
		pid_t pid = fork();
		if (pid < 0)
			return 2;
		if (pid == 0)
			_exit(cases[i].run());
		int st;
		if (waitpid(pid, &st, 0) != pid)
			return 2;
		int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
		printf("%s %s", ok ? "ok  " : "FAIL", cases[i].name);
		if (!ok && WIFSIGNALED(st))
			printf(" (signal %d)", WTERMSIG(st));
		printf("\n");
		failed |= !ok;
	}
	return failed;
}

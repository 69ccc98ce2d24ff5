/*
 * hetmem's C API, tested in the style of the kernel's HMM selftests (tools/testing/selftests/mm/
 * hmm-tests.c): plain mmap, plain loads and stores, the test device's commands, one forked child
 * per case so that a crash fails that case only. Built and run by capi/tests/c_program.rs.
 * Prints one line per case; exits non-zero if any case failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hetmem.h"

#define PAGE 4096UL
#define CHECK(cond)                                                                     \
	do {                                                                            \
		if (!(cond)) {                                                          \
			fprintf(stderr, "%s:%d: %s failed (%s)\n", __FILE__, __LINE__, \
				#cond, hetmem_last_error());                            \
			return 1;                                                       \
		}                                                                       \
	} while (0)

static void *plain_map(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

/* Plain memory adopted, migrated to device-private memory, read back by plain loads. */
static int adopt_migrate_read_back(void)
{
	size_t npages = 256, len = npages * PAGE;
	int *buf = plain_map(len);
	CHECK(buf);
	for (size_t i = 0; i < len / sizeof(int); i++)
		buf[i] = (int)i;
	HetmemSpace *s;
	HetmemDevice *d;
	HetmemMirror *m;
	CHECK(hetmem_space_adopt(buf, len, &s) == 0);
	CHECK(hetmem_device_new(HETMEM_DEVICE_PRIVATE, 4 * len, &d) == 0);
	CHECK(hetmem_mirror_new(d, s, &m) == 0);
	CHECK(hetmem_migrate_to_device(m, buf, len) == 0);
	unsigned char snap[256];
	HetmemDmirrorCmd c = { .addr = (uint64_t)buf, .ptr = (uint64_t)snap, .npages = npages };
	CHECK(hetmem_mirror_cmd(m, HETMEM_CMD_SNAPSHOT, &c) == 0);
	CHECK(c.cpages == npages);
	for (size_t i = 0; i < npages; i++)
		CHECK((snap[i] & 0xF0) == 0x20); /* HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL */
	for (size_t i = 0; i < len / sizeof(int); i++)
		CHECK(buf[i] == (int)i);
	hetmem_mirror_free(m);
	hetmem_device_free(d);
	hetmem_space_free(s);
	/* Given back: plain memory again, every value in place. */
	CHECK(buf[12345] == 12345);
	buf[0] = 77;
	CHECK(munmap(buf, len) == 0);
	return 0;
}

/* Adopted with HETMEM_ADOPT_DEVICE_PRIVATE_AS_SWAP: pages in device-private memory read as swap
 * entries in /proc/self/pagemap; a pin brings them back (present, their data intact) and an
 * unknown flag is refused. */
static int adopt_as_swap_and_pin(void)
{
	size_t npages = 16, len = npages * PAGE;
	int *buf = plain_map(len);
	CHECK(buf);
	for (size_t i = 0; i < len / sizeof(int); i++)
		buf[i] = (int)i * 3;
	HetmemSpace *s;
	HetmemDevice *d;
	HetmemMirror *m;
	HetmemPin *pin;
	CHECK(hetmem_space_adopt_flags(buf, len, 0x80, &s) == -EINVAL);
	CHECK(hetmem_space_adopt_flags(buf, len, HETMEM_ADOPT_DEVICE_PRIVATE_AS_SWAP, &s) == 0);
	CHECK(hetmem_device_new(HETMEM_DEVICE_PRIVATE, 4 * len, &d) == 0);
	CHECK(hetmem_mirror_new(d, s, &m) == 0);
	CHECK(hetmem_migrate_to_device(m, buf, len) == 0);
	int pm = open("/proc/self/pagemap", O_RDONLY);
	CHECK(pm >= 0);
	uint64_t e;
	for (size_t i = 0; i < npages; i++) {
		CHECK(pread(pm, &e, 8, (off_t)(((uintptr_t)buf / PAGE + i) * 8)) == 8);
		CHECK((e >> 62 & 3) == 1); /* swapped, not present */
	}
	CHECK(hetmem_pin(s, buf, 4 * PAGE, 0, &pin) == 0);
	CHECK(pread(pm, &e, 8, (off_t)((uintptr_t)buf / PAGE * 8)) == 8);
	CHECK(e >> 63 == 1); /* present */
	hetmem_pin_free(pin);
	CHECK(hetmem_pin(s, (char *)buf + 1, PAGE, 0, &pin) == -EINVAL);
	for (size_t i = 0; i < len / sizeof(int); i++)
		CHECK(buf[i] == (int)i * 3);
	close(pm);
	hetmem_mirror_free(m);
	hetmem_device_free(d);
	hetmem_space_free(s);
	CHECK(munmap(buf, len) == 0);
	return 0;
}

/* The device writes adopted memory (the kernel's shape of the command); the CPU sees it. */
static int device_write_cpu_reads(void)
{
	size_t npages = 16, len = npages * PAGE;
	int *buf = plain_map(len);
	CHECK(buf);
	int *src = malloc(len);
	CHECK(src);
	for (size_t i = 0; i < len / sizeof(int); i++)
		src[i] = (int)(i * 7);
	HetmemSpace *s;
	HetmemDevice *d;
	HetmemMirror *m;
	CHECK(hetmem_space_adopt(buf, len, &s) == 0);
	CHECK(hetmem_device_new(HETMEM_DEVICE_PRIVATE, 4 * len, &d) == 0);
	CHECK(hetmem_mirror_new(d, s, &m) == 0);
	HetmemDmirrorCmd c = { .addr = (uint64_t)buf, .ptr = (uint64_t)src, .npages = npages };
	CHECK(hetmem_mirror_cmd(m, HETMEM_CMD_WRITE, &c) == 0);
	CHECK(c.cpages == npages);
	for (size_t i = 0; i < len / sizeof(int); i++)
		CHECK(buf[i] == (int)(i * 7));
	/* The kernel's errors: an unaligned address is EINVAL; so is an unknown command. */
	c.addr = (uint64_t)buf + 1;
	CHECK(hetmem_mirror_cmd(m, HETMEM_CMD_READ, &c) == -EINVAL);
	CHECK(hetmem_mirror_cmd(m, 99, &c) == -EINVAL);
	hetmem_mirror_free(m);
	hetmem_device_free(d);
	hetmem_space_free(s);
	free(src);
	munmap(buf, len);
	return 0;
}

/*
 * Read-mostly data (cudaMemAdviseSetReadMostly) in hetmem's own memory: the device's reads make
 * read-only replicas, the CPU keeps reading in place, a plain store drops the replica first and
 * the device reads the new value. Then hetmem's adaptive policy does the same without a hint.
 */
static int read_mostly_replicas(void)
{
	size_t npages = 64, len = npages * PAGE;
	HetmemSpace *s;
	HetmemDevice *d;
	HetmemMirror *m;
	void *p;
	CHECK(hetmem_space_new(0, &s) == 0);
	CHECK(hetmem_map_anon(s, len, HETMEM_PROT_READ | HETMEM_PROT_WRITE, &p) == 0);
	int *buf = p;
	for (size_t i = 0; i < len / sizeof(int); i++)
		buf[i] = (int)i;
	CHECK(hetmem_device_new(HETMEM_DEVICE_PRIVATE, 4 * len, &d) == 0);
	CHECK(hetmem_mirror_new(d, s, &m) == 0);
	CHECK(hetmem_advise(s, p, len, HETMEM_ADVICE_READ_MOSTLY) == 0);
	CHECK(hetmem_advise(s, p, len, 99) == -EINVAL);
	int *out = malloc(len);
	CHECK(out);
	for (int policy = 0; policy < 2; policy++) {
		CHECK(hetmem_device_read(m, p, len, out) == 0);
		for (size_t i = 0; i < len / sizeof(int); i++)
			CHECK(out[i] == buf[i]);
		/* The pages stayed in system memory: a plain store, then the device sees it. */
		buf[5 * PAGE / sizeof(int)] = -1 - policy;
		CHECK(hetmem_device_read(m, p, len, out) == 0);
		CHECK(out[5 * PAGE / sizeof(int)] == -1 - policy);
		/* Next round: the adaptive policy, no hint. */
		CHECK(hetmem_set_policy(s, HETMEM_POLICY_ADAPTIVE) == 0);
	}
	CHECK(hetmem_set_policy(s, 42) == -EINVAL);
	free(out);
	hetmem_mirror_free(m);
	hetmem_device_free(d);
	hetmem_space_free(s);
	return 0;
}

/* fork() with adopted pages in device memory: the child sees them, its stores stay its own. */
static int fork_with_device_pages(void)
{
	size_t npages = 32, len = npages * PAGE;
	int *buf = plain_map(len);
	CHECK(buf);
	for (size_t i = 0; i < len / sizeof(int); i++)
		buf[i] = (int)i + 1;
	HetmemSpace *s;
	HetmemDevice *d;
	HetmemMirror *m;
	CHECK(hetmem_space_adopt(buf, len, &s) == 0);
	CHECK(hetmem_device_new(HETMEM_DEVICE_PRIVATE, 4 * len, &d) == 0);
	CHECK(hetmem_mirror_new(d, s, &m) == 0);
	CHECK(hetmem_migrate_to_device(m, buf, len) == 0);
	pid_t pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		for (size_t i = 0; i < len / sizeof(int); i++) {
			if (buf[i] != (int)i + 1)
				_exit(10);
			buf[i] = -1;
		}
		_exit(0);
	}
	int st;
	CHECK(waitpid(pid, &st, 0) == pid);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	for (size_t i = 0; i < len / sizeof(int); i++)
		CHECK(buf[i] == (int)i + 1);
	hetmem_mirror_free(m);
	hetmem_device_free(d);
	hetmem_space_free(s);
	munmap(buf, len);
	return 0;
}

/* Memory hetmem creates, on a device-coherent device: the CPU keeps using it in place. */
static int hetmem_memory_on_a_coherent_device(void)
{
	size_t len = 64 * PAGE;
	HetmemSpace *s;
	HetmemDevice *d;
	HetmemMirror *m;
	void *p;
	CHECK(hetmem_space_new(1UL << 30, &s) == 0);
	CHECK(hetmem_map_anon(s, len, HETMEM_PROT_READ | HETMEM_PROT_WRITE, &p) == 0);
	long *w = p;
	for (size_t i = 0; i < len / sizeof(long); i++)
		w[i] = (long)i * 3;
	CHECK(hetmem_device_new(HETMEM_DEVICE_COHERENT, 4 * len, &d) == 0);
	CHECK(hetmem_mirror_new(d, s, &m) == 0);
	CHECK(hetmem_migrate_to_device(m, p, len) == 0);
	long *back = malloc(len);
	CHECK(back);
	CHECK(hetmem_device_read(m, p, len, back) == 0);
	CHECK(memcmp(back, p, len) == 0);
	CHECK(hetmem_migrate_to_system(m, p, len) == 0);
	CHECK(w[100] == 300);
	/* Bad input is a clear error, not a crash. */
	CHECK(hetmem_map_anon(s, 0, HETMEM_PROT_READ, &p) == -EINVAL);
	CHECK(hetmem_map_anon(NULL, PAGE, HETMEM_PROT_READ, &p) == -EINVAL);
	CHECK(strlen(hetmem_last_error()) > 0);
	/* The message's pointer stays valid; the next failure replaces its text. */
	const char *msg = hetmem_last_error();
	char before[64];
	snprintf(before, sizeof(before), "%s", msg);
	CHECK(hetmem_map_anon(s, 4096, 99, &p) == -EINVAL);
	CHECK(msg == hetmem_last_error() && strncmp(msg, before, sizeof(before) - 1) != 0);
	CHECK(hetmem_space_adopt((char *)w + 1, PAGE, &s) == -EINVAL);
	free(back);
	hetmem_mirror_free(m);
	hetmem_device_free(d);
	hetmem_space_free(s);
	return 0;
}

/* A file through hetmem's page cache: plain stores to a shared mapping, fsync, bytes on disk. */
static int file_store_fsync(const char *dir)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/hetmem-c-test-%d", dir, getpid());
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(fd >= 0);
	CHECK(ftruncate(fd, 8 * PAGE) == 0);
	HetmemSpace *s;
	HetmemFile *f;
	void *p;
	CHECK(hetmem_space_new(1UL << 30, &s) == 0);
	CHECK(hetmem_file_open(path, 1, &f) == 0);
	CHECK(hetmem_file_set_access(f, HETMEM_ACCESS_RANDOM) == 0);
	CHECK(hetmem_file_set_access(f, 7) == -EINVAL);
	CHECK(hetmem_map_file(s, f, 0, 8 * PAGE, HETMEM_PROT_READ | HETMEM_PROT_WRITE, 1, &p) == 0);
	memcpy((char *)p + 3 * PAGE, "hetmem", 6);
	CHECK(hetmem_file_fsync(f) == 0);
	char got[6];
	CHECK(pread(fd, got, 6, 3 * PAGE) == 6);
	CHECK(memcmp(got, "hetmem", 6) == 0);
	CHECK(hetmem_unmap(s, p, 8 * PAGE) == 0);
	hetmem_file_close(f);
	hetmem_space_free(s);
	HetmemFile *none;
	CHECK(hetmem_file_open("/nonexistent/hetmem", 0, &none) == -ENOENT);
	close(fd);
	unlink(path);
	return 0;
}

int main(int argc, char **argv)
{
	const char *dir = argc > 1 ? argv[1] : "/tmp";
	struct {
		const char *name;
		int (*run)(void);
	} cases[] = {
		{ "adopt_migrate_read_back", adopt_migrate_read_back },
		{ "device_write_cpu_reads", device_write_cpu_reads },
		{ "adopt_as_swap_and_pin", adopt_as_swap_and_pin },
		{ "fork_with_device_pages", fork_with_device_pages },
		{ "hetmem_memory_on_a_coherent_device", hetmem_memory_on_a_coherent_device },
		{ "read_mostly_replicas", read_mostly_replicas },
		{ "file_store_fsync", NULL },
	};
	int failed = 0;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 2;
		}
		if (pid == 0)
			_exit(cases[i].run ? cases[i].run() : file_store_fsync(dir));
		int st;
		if (waitpid(pid, &st, 0) != pid) {
			perror("waitpid");
			return 2;
		}
		int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
		printf("%s %s", ok ? "ok  " : "FAIL", cases[i].name);
		if (!ok && WIFSIGNALED(st))
			printf(" (signal %d)", WTERMSIG(st));
		printf("\n");
		failed |= !ok;
	}
	return failed;
}

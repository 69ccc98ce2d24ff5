/*
 * A drop-in emulation of the kernel's HMM test device (lib/test_hmm.c, /dev/hmm_dmirror0..3) on
 * top of hetmem, for kernels without CONFIG_DEVICE_PRIVATE (or without the test module): preload
 * it, and a program written against the test device's interface (open, the HMM_DMIRROR_* ioctls
 * of lib/test_hmm_uapi.h, plain mmap, loads and stores) runs unmodified against hetmem's
 * software devices.
 *
 *   cargo build --release -p hetmem-c
 *   cc -shared -fPIC -O2 capi/preload/hmm_dmirror.c -Icapi/include -Ltarget/release \
 *      -lhetmem_c -ldl -Wl,-rpath,$PWD/target/release -o libhmm_dmirror.so
 *   LD_PRELOAD=$PWD/libhmm_dmirror.so ./hmm-tests
 *
 * What it does:
 *  - open("/dev/hmm_dmirrorN") (N = 0..3) gives a real file descriptor (a memfd) that stands
 *    for a new mirror of device N: devices 0 and 1 are device-private, 2 and 3 device-coherent,
 *    as the kernel module creates them; two opens of one device are two mirrors of it.
 *  - ioctl(fd, HMM_DMIRROR_*, &cmd) runs the command through hetmem_mirror_cmd, which answers as
 *    the kernel's device does. The program's memory the command names is adopted on first use
 *    (hetmem_space_adopt_flags), so the program keeps using its own pointers: the whole
 *    anonymous private mapping the program made with mmap around cmd.addr (its mmap calls are
 *    recorded), else exactly the command's range. Its pages in device-private memory read as
 *    swapped out in /proc/self/pagemap, as the kernel reports device-private entries
 *    (HETMEM_ADOPT_DEVICE_PRIVATE_AS_SWAP).
 *  - munmap / mremap of adopted memory first give it back (its device pages come home, the
 *    mirrors of it go), then do what the program asked; mprotect of adopted memory goes through
 *    hetmem (hetmem_protect), so that devices lose what they may no longer do.
 *  - Memory that cannot be adopted (shared file mappings, shared anonymous memory): READ and
 *    WRITE go to the pages in place through the kernel (process_vm_readv/writev), as the
 *    kernel's device reads and writes page-cache pages in place; a migration answers ENOENT,
 *    but for a private file mapping (recorded at mmap), which a migration first replaces by
 *    anonymous memory with the same bytes, then adopts.
 *  - SNAPSHOT is answered piece by piece: parts in adopted spaces by hetmem, the rest from the
 *    CPU's page tables (/proc/self/maps, /proc/self/pagemap, PAGEMAP_SCAN), adopting nothing.
 *  - mmap of a test-device descriptor maps pages of its own, read-only until written (the
 *    kernel's device inserts pages at mmap).
 *  - open("/sys/kernel/debug/gup_test") gives a descriptor whose GUP and PIN ioctls (the
 *    kernel's CONFIG_GUP_TEST driver, which hmm-tests pins device pages through) pin and release
 *    the range through hetmem (hetmem_pin), bringing pages in device memory back as the
 *    kernel's get_user_pages does (see gup_ioctl).
 *  - close(fd) frees that mirror's state.
 *  - fork(): the child gets the parent's memory, pages in device memory included (hetmem's fork
 *    handlers), and starts with no device, mirror or adopted space (the parent's are hetmem
 *    objects of another process there): its own opens and commands work on its own copy.
 * Other file descriptors, ioctls and mappings go straight to the C library.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "hetmem.h"

#define MAX_FDS 64
#define MAX_SPACES 64
/* The bounce buffer of device commands (bounced_ioctl): 1 GiB of address space. */
#define BOUNCE_MAX (1UL << 30)
#define MAX_MAPS 1024
#define NDEV 4
/* fd_slot.dev of a descriptor of /sys/kernel/debug/gup_test (emulated: gup_ioctl). */
#define GUP_DEV NDEV

/* struct hmm_dmirror_cmd of lib/test_hmm_uapi.h: five __u64, as HetmemDmirrorCmd. */
#define DMIRROR_IOC_TYPE 'H'
/* dmirror_ioctl: not a test-device request (the descriptor may have been reused by dup2):
 * the C library's ioctl answers it. */
#define PASS_THROUGH 1

struct space_slot {
	uintptr_t start, end;
	HetmemSpace *space;
};

struct fd_slot {
	int fd; /* -1: free */
	int dev;
	HetmemMirror *mirrors[MAX_SPACES]; /* by space slot */
};

/* Recursive: hetmem, called under it, may itself call the C library functions interposed here
 * (open and close of /proc files, ioctl on its own descriptors), which pass through. */
/* The program's anonymous private mmaps (start, end; end 0: free slot). */
struct map_slot {
	uintptr_t start, end;
};
static struct map_slot maps[MAX_MAPS];
/* The program's private file mmaps (start, end, prot; end 0: free slot): turned into anonymous
 * memory with the same bytes when a device migrates them (anonymize). */
struct file_slot {
	uintptr_t start, end;
	int prot;
};
static struct file_slot private_files[MAX_MAPS];

static pthread_mutex_t lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;

/* Which file descriptors are test-device ones, readable without `lock`: close and ioctl of any
 * other descriptor go straight to the C library without taking it (hetmem's own threads close
 * their descriptors while a thread holding `lock` waits for them to exit). */
#define MAX_FD_NUM 65536
static _Atomic unsigned char ours[MAX_FD_NUM];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int is_ours(int fd)
{
	return fd >= 0 && fd < MAX_FD_NUM && atomic_load(&ours[fd]);
}
static HetmemDevice *devices[NDEV];
static struct space_slot spaces[MAX_SPACES];
static struct fd_slot fds[MAX_FDS];

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_close)(int);
static int (*real_ioctl)(int, unsigned long, ...);
static int (*real_munmap)(void *, size_t);
static void *(*real_mremap)(void *, size_t, size_t, int, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int (*real_mprotect)(void *, size_t, int);

static void resolve(void)
{
	real_open = dlsym(RTLD_NEXT, "open");
	real_open64 = dlsym(RTLD_NEXT, "open64");
	real_openat = dlsym(RTLD_NEXT, "openat");
	real_close = dlsym(RTLD_NEXT, "close");
	real_ioctl = dlsym(RTLD_NEXT, "ioctl");
	real_munmap = dlsym(RTLD_NEXT, "munmap");
	real_mremap = dlsym(RTLD_NEXT, "mremap");
	real_mmap = dlsym(RTLD_NEXT, "mmap");
	real_mprotect = dlsym(RTLD_NEXT, "mprotect");
	for (int i = 0; i < MAX_FDS; i++)
		fds[i].fd = -1;
}

static void init(void)
{
	pthread_once(&once, resolve);
}

/* The device number of a test-device path (GUP_DEV for the gup_test driver's), or -1. */
static int dmirror_of(const char *path)
{
	static const char prefix[] = "/dev/hmm_dmirror";
	if (path && strcmp(path, "/sys/kernel/debug/gup_test") == 0)
		return GUP_DEV;
	if (!path || strncmp(path, prefix, sizeof(prefix) - 1) != 0)
		return -1;
	const char *n = path + sizeof(prefix) - 1;
	if (n[0] < '0' || n[0] >= '0' + NDEV || n[1] != '\0')
		return -1;
	return n[0] - '0';
}

static int open_dmirror(int dev)
{
	init();
	pthread_mutex_lock(&lock);
	int fd = -1;
	if (dev < NDEV && !devices[dev] &&
	    hetmem_device_new(dev < 2 ? HETMEM_DEVICE_PRIVATE : HETMEM_DEVICE_COHERENT, 256UL << 20,
			      &devices[dev]) != 0) {
		errno = ENOMEM;
		goto out;
	}
	for (int i = 0; i < MAX_FDS; i++) {
		if (fds[i].fd >= 0)
			continue;
		char name[32];
		if (dev == GUP_DEV)
			snprintf(name, sizeof(name), "gup_test");
		else
			snprintf(name, sizeof(name), "hmm_dmirror%d", dev);
		fd = memfd_create(name, MFD_CLOEXEC);
		if (fd < 0)
			goto out;
		if (fd >= MAX_FD_NUM) {
			real_close(fd);
			fd = -1;
			errno = EMFILE;
			goto out;
		}
		atomic_store(&ours[fd], 1);
		fds[i].fd = fd;
		fds[i].dev = dev;
		memset(fds[i].mirrors, 0, sizeof(fds[i].mirrors));
		goto out;
	}
	errno = EMFILE;
out:
	pthread_mutex_unlock(&lock);
	return fd;
}

int open(const char *path, int flags, ...)
{
	int dev = dmirror_of(path);
	if (dev >= 0)
		return open_dmirror(dev);
	va_list ap;
	va_start(ap, flags);
	mode_t mode = va_arg(ap, mode_t);
	va_end(ap);
	init();
	return real_open(path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
	int dev = dmirror_of(path);
	if (dev >= 0)
		return open_dmirror(dev);
	va_list ap;
	va_start(ap, flags);
	mode_t mode = va_arg(ap, mode_t);
	va_end(ap);
	init();
	return real_open64(path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...)
{
	int dev = dmirror_of(path);
	if (dev >= 0)
		return open_dmirror(dev);
	va_list ap;
	va_start(ap, flags);
	mode_t mode = va_arg(ap, mode_t);
	va_end(ap);
	init();
	return real_openat(dirfd, path, flags, mode);
}

static struct fd_slot *slot_of(int fd)
{
	for (int i = 0; i < MAX_FDS; i++)
		if (fds[i].fd == fd)
			return &fds[i];
	return NULL;
}

/* Gives back the adopted space in slot `s` (every mirror of it first). Under `lock`. */
static void give_back(int s)
{
	for (int i = 0; i < MAX_FDS; i++) {
		if (fds[i].fd >= 0 && fds[i].mirrors[s]) {
			hetmem_mirror_free(fds[i].mirrors[s]);
			fds[i].mirrors[s] = NULL;
		}
	}
	hetmem_space_free(spaces[s].space);
	spaces[s].space = NULL;
}

/* Gives back every adopted space overlapping [start, end). Under `lock`. */
static void give_back_range(uintptr_t start, uintptr_t end)
{
	for (int s = 0; s < MAX_SPACES; s++)
		if (spaces[s].space && spaces[s].start < end && start < spaces[s].end)
			give_back(s);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void before_fork(void)
{
	pthread_mutex_lock(&lock);
}

static void after_fork_parent(void)
{
	pthread_mutex_unlock(&lock);
}

static void after_fork_child(void)
{
	/* The child's thread is not the owner the recursive mutex recorded (glibc checks the
	 * owner's thread id, so an unlock would fail with EPERM and leave it held: the child's
	 * next open of a test device hung). Start it afresh, unlocked. */
	static const pthread_mutex_t fresh = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
	memcpy(&lock, &fresh, sizeof lock);
	/* The parent's spaces, devices and mirrors are inert here (hetmem's objects belong to the
	 * process that made them): forget them, unfreed, so that the child opens devices of its
	 * own and adopts the memory it inherited (plain memory here), as a child of the kernel's
	 * test device does. Descriptors it inherited stand for nothing any more. The record of
	 * the program's mappings stays: the child's memory is laid out as the parent's. */
	for (int s = 0; s < MAX_SPACES; s++)
		spaces[s] = (struct space_slot){ 0 };
	for (int d = 0; d < NDEV; d++)
		devices[d] = NULL;
	for (int i = 0; i < MAX_FDS; i++) {
		if (fds[i].fd >= 0 && fds[i].fd < MAX_FD_NUM)
			atomic_store(&ours[fds[i].fd], 0);
		fds[i] = (struct fd_slot){ .fd = -1 };
	}
}

static void install_fork_handlers(void)
{
	pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

/* Forgets the recorded mmaps overlapping [start, end). Under `lock`. */
static void forget_maps(uintptr_t start, uintptr_t end)
{
	for (int i = 0; i < MAX_MAPS; i++) {
		if (maps[i].end && maps[i].start < end && start < maps[i].end)
			maps[i].end = 0;
		if (private_files[i].end && private_files[i].start < end &&
		    start < private_files[i].end)
			private_files[i].end = 0;
	}
}

/* A private file mapping holding [addr, addr + len) is replaced by anonymous private memory
 * with the same bytes (the program's written pages and the file's), at the same address and
 * protection, so that it can be adopted and migrated, as the kernel migrates a private file
 * mapping's written (anonymous) pages. POSIX leaves unspecified whether a private mapping sees
 * later changes of the file: from then on it does not. Pages past the end of the file read
 * zeros instead of raising SIGBUS. 0, or a negative errno (EINVAL: no such mapping). Under
 * `lock`. */
static int anonymize(uintptr_t addr, uintptr_t len)
{
	for (int i = 0; i < MAX_MAPS; i++) {
		struct file_slot *f = &private_files[i];
		if (!f->end || addr < f->start || addr + len > f->end)
			continue;
		size_t n = f->end - f->start;
		void *p = real_mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			return -ENOMEM;
		/* Through the kernel: a page past the end of the file stops the copy instead of
		 * raising SIGBUS here; the rest stays zeros. */
		if (f->prot & PROT_READ) {
			for (size_t off = 0; off < n;) {
				struct iovec local = { .iov_base = (char *)p + off, .iov_len = n - off };
				struct iovec remote = { .iov_base = (void *)(f->start + off), .iov_len = n - off };
				ssize_t got = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
				if (got <= 0)
					break;
				off += (size_t)got;
			}
		}
		if (real_mprotect(p, n, f->prot) != 0 ||
		    real_mremap(p, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)f->start) == MAP_FAILED) {
			real_munmap(p, n);
			return -ENOMEM;
		}
		for (int j = 0; j < MAX_MAPS; j++) {
			if (!maps[j].end) {
				maps[j].start = f->start;
				maps[j].end = f->end;
				break;
			}
		}
		f->end = 0;
		return 0;
	}
	return -EINVAL;
}

/* The adopted space slot holding addr, or -1. Under `lock`. */
static int adopted_at(uintptr_t addr)
{
	for (int s = 0; s < MAX_SPACES; s++)
		if (spaces[s].space && spaces[s].start <= addr && addr < spaces[s].end)
			return s;
	return -1;
}

/* The slot of the adopted space holding [addr, addr + len), adopting on first use the program's
 * mmap around it, else exactly that range; a negative errno if it cannot be adopted (ENOMEM: not
 * mapped, EACCES: not readable, EINVAL: not anonymous private memory). Under `lock`. */
static int space_for(uintptr_t addr, uintptr_t len)
{
	int found = adopted_at(addr);
	if (found >= 0)
		return found;
	uintptr_t start = addr, end = addr + len;
	for (int i = 0; i < MAX_MAPS; i++) {
		if (maps[i].end && maps[i].start <= addr && addr < maps[i].end) {
			start = maps[i].start;
			end = maps[i].end;
			break;
		}
	}
	for (int s = 0; s < MAX_SPACES; s++) {
		if (spaces[s].space)
			continue;
		int err = hetmem_space_adopt_flags((void *)start, end - start,
					       HETMEM_ADOPT_DEVICE_PRIVATE_AS_SWAP, &spaces[s].space);
		if (err != 0 && (start != addr || end != addr + len)) {
			/* The whole mmap cannot be adopted (the program unmapped or protected parts
			 * of it): exactly the command's range, as the kernel's device works on what
			 * the command names. */
			start = addr;
			end = addr + len;
			err = hetmem_space_adopt_flags((void *)start, end - start,
					       HETMEM_ADOPT_DEVICE_PRIVATE_AS_SWAP, &spaces[s].space);
		}
		if (err != 0) {
			spaces[s].space = NULL;
			return err;
		}
		spaces[s].start = start;
		spaces[s].end = end;
		/* After hetmem's fork handlers (installed with the first space): prepare handlers
		 * run in reverse order, so the shim takes `lock` before hetmem takes its fork gate,
		 * as a thread in a device command does. */
		pthread_once(&fork_once, install_fork_handlers);
		return s;
	}
	return -ENOSPC;
}

/* ---- Memory hetmem does not manage (file mappings, shared memory, never-adopted memory) ----
 * The kernel's device reads and writes such pages in place (hmm_range_fault faults page-cache
 * pages in and the device maps them), and a snapshot reports the CPU's page tables as they are
 * (no fault). The emulation does the same through the kernel: process_vm_readv/writev on this
 * process (which faults pages in, honours the mappings' protections: EFAULT for memory not
 * mapped, not readable, or, for a write, not writable), and /proc/self/maps, /proc/self/pagemap
 * and PAGEMAP_SCAN for a snapshot. */

#define PROT_ERROR 0xFF
#define PROT_NONE_ 0x00
#define PROT_READ_ 0x01
#define PROT_WRITE_ 0x02
#define PROT_ZERO 0x10

/* A device READ or WRITE of npages at addr, in place. */
static int plain_rw(HetmemDmirrorCmd *cmd, int write)
{
	size_t len = cmd->npages << 12;
	struct iovec local = { .iov_base = (void *)(uintptr_t)cmd->ptr, .iov_len = len };
	struct iovec remote = { .iov_base = (void *)(uintptr_t)cmd->addr, .iov_len = len };
	ssize_t n = write ? process_vm_writev(getpid(), &local, 1, &remote, 1, 0)
			  : process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
	if (n != (ssize_t)len)
		return -EFAULT;
	cmd->cpages = cmd->npages;
	/* The kernel's device mirrors nothing yet: one fault pass maps the whole range. */
	cmd->faults = 1;
	return 0;
}

/* PAGEMAP_SCAN (Linux 6.7), declared here for older system headers. */
struct hm_page_region {
	uint64_t start, end, categories;
};
struct hm_pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted,
		category_mask, category_anyof_mask, return_mask;
};
#define HM_PAGEMAP_SCAN _IOWR('f', 16, struct hm_pm_scan_arg)
#define HM_PAGE_IS_PFNZERO (1 << 5)
#define HM_PAGE_IS_HUGE (1 << 6)
#define PROT_PMD_ 0x04
#define PROT_PUD_ 0x08

/* The kernel page size (smaps' KernelPageSize, bytes) of the mapping holding addr: 4096 but for
 * hugetlb mappings; 0 if unknown. Read without stdio (no malloc: the program's heap may be
 * broken by then, as in the kernel's hmm-tests snapshot case). Under `lock`, which also guards
 * its static buffer (a snapshot runs under it). */
static unsigned long kernel_page_size(uintptr_t addr)
{
	int fd = real_open("/proc/self/smaps", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	static char buf[8192];
	size_t have = 0;
	int in = 0;
	unsigned long kps = 0;
	for (;;) {
		ssize_t n = read(fd, buf + have, sizeof(buf) - 1 - have);
		if (n <= 0)
			break;
		have += n;
		buf[have] = '\0';
		char *line = buf, *nl;
		while ((nl = strchr(line, '\n'))) {
			*nl = '\0';
			unsigned long s, e, kb;
			char *sp = strchr(line, ' '), *dash = strchr(line, '-');
			if (dash && sp && dash < sp && sscanf(line, "%lx-%lx", &s, &e) == 2)
				in = s <= addr && addr < e;
			else if (in && sscanf(line, "KernelPageSize: %lu kB", &kb) == 1) {
				kps = kb << 10;
				goto out;
			}
			line = nl + 1;
		}
		have = strlen(line);
		memmove(buf, line, have);
	}
out:
	real_close(fd);
	return kps;
}

/* The protection (mapped, readable, writable, shared) of the mapping holding addr, from
 * /proc/self/maps: 0 if none. Bits: 1 mapped, 2 readable, 4 writable, 8 shared. */
static int vma_bits(const char *maps, uintptr_t addr)
{
	for (const char *l = maps; l && *l;) {
		unsigned long s, e;
		char perms[5] = { 0 };
		if (sscanf(l, "%lx-%lx %4s", &s, &e, perms) == 3 && s <= addr && addr < e)
			return 1 | (perms[0] == 'r' ? 2 : 0) | (perms[1] == 'w' ? 4 : 0) |
			       (perms[3] == 's' ? 8 : 0);
		l = strchr(l, '\n');
		if (l)
			l++;
	}
	return 0;
}

/* A SNAPSHOT of npages at addr of memory hetmem does not manage: the kernel's answers from the
 * CPU's page tables (no fault): ERROR where nothing readable is mapped, NONE where no page is
 * present, ZERO|READ for the shared zero page, READ for a page the CPU may not write (read-only
 * mapping, a private page not written since a fork or a private file mapping's file page),
 * WRITE otherwise (a shared writable mapping's page is reported writable once present). */
static int plain_snapshot(uint64_t addr, uint64_t npages, unsigned char *out)
{
	static char maps[1 << 16];
	int mfd = real_open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
	if (mfd < 0)
		return -EFAULT;
	ssize_t got = 0, n;
	while (got < (ssize_t)sizeof(maps) - 1 && (n = read(mfd, maps + got, sizeof(maps) - 1 - got)) > 0)
		got += n;
	real_close(mfd);
	maps[got] = '\0';
	int pfd = real_open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pfd < 0)
		return -EFAULT;
	for (uint64_t i = 0; i < npages; i++) {
		uintptr_t a = addr + (i << 12);
		int vb = vma_bits(maps, a);
		if (!(vb & 2)) {
			out[i] = PROT_ERROR;
			continue;
		}
		uint64_t e = 0;
		if (pread(pfd, &e, 8, (off_t)(a >> 12) * 8) != 8 || !(e >> 63 & 1)) {
			out[i] = PROT_NONE_;
			continue;
		}
		int file = e >> 61 & 1, exclusive = e >> 56 & 1;
		/* The page's categories: the zero page; mapped by a large page-table entry (a
		 * PMD-mapped transparent huge page, or a hugetlb page), which the kernel's device
		 * reports as PMD (or PUD for a 1 GiB hugetlb page). */
		struct hm_page_region reg = { 0 };
		struct hm_pm_scan_arg arg = {
			.size = sizeof(arg), .start = a, .end = a + 4096,
			.vec = (uintptr_t)&reg, .vec_len = 1,
			.return_mask = HM_PAGE_IS_PFNZERO | HM_PAGE_IS_HUGE,
		};
		uint64_t cat = real_ioctl(pfd, HM_PAGEMAP_SCAN, &arg) == 1 ? reg.categories : 0;
		int level = 0;
		if (cat & HM_PAGE_IS_HUGE)
			level = kernel_page_size(a) >= (1UL << 30) ? PROT_PUD_ : PROT_PMD_;
		if (!(vb & 8) && !file && !exclusive) {
			/* A private page not the process's alone: the shared zero page, or a page
			 * shared with a child since a fork: read-only either way. */
			out[i] = PROT_READ_;
			if (cat & HM_PAGE_IS_PFNZERO)
				out[i] |= PROT_ZERO;
		} else if (!(vb & 4) || (!(vb & 8) && file)) {
			out[i] = PROT_READ_;
		} else {
			out[i] = PROT_WRITE_;
		}
		out[i] |= level;
	}
	real_close(pfd);
	return 0;
}

static int mirror_of(struct fd_slot *f, int s)
{
	if (!f->mirrors[s] && hetmem_mirror_new(devices[f->dev], spaces[s].space, &f->mirrors[s]) != 0)
		return -ENOMEM;
	return 0;
}

/* A SNAPSHOT over any memory: the parts in adopted spaces through hetmem (each through this
 * device's mirror of that space), the rest from the page tables (plain_snapshot). Nothing is
 * adopted for it: a snapshot faults nothing in. Under `lock`. */
static int snapshot_any(struct fd_slot *f, HetmemDmirrorCmd *cmd)
{
	unsigned char *out = (unsigned char *)(uintptr_t)cmd->ptr;
	uint64_t i = 0;
	while (i < cmd->npages) {
		uintptr_t a = cmd->addr + (i << 12);
		int s = adopted_at(a);
		uint64_t j = i + 1;
		if (s >= 0) {
			while (j < cmd->npages && cmd->addr + (j << 12) < spaces[s].end)
				j++;
			int r = mirror_of(f, s);
			if (r)
				return r;
			HetmemDmirrorCmd sub = { .addr = a, .ptr = (uintptr_t)(out + i), .npages = j - i };
			r = hetmem_mirror_cmd(f->mirrors[s], HETMEM_CMD_SNAPSHOT, &sub);
			if (r)
				return r;
		} else {
			while (j < cmd->npages && adopted_at(cmd->addr + (j << 12)) < 0)
				j++;
			int r = plain_snapshot(a, j - i, out + i);
			if (r)
				return r;
		}
		i = j;
	}
	cmd->cpages = cmd->npages;
	cmd->faults = 0;
	return 0;
}

/* The answer to command `nr` over memory that cannot be adopted (`err`, from space_for), as the
 * kernel's device answers for it: a migration of memory that is not anonymous private (shared,
 * file) finds no page it may move (ENOENT); one over memory that is not mapped or not readable
 * is EINVAL (its vma check); every other command faults (hmm_range_fault: EFAULT). */
static int unadoptable(unsigned nr, int err)
{
	if (nr == HETMEM_CMD_MIGRATE_TO_DEV && err == -EINVAL)
		return -ENOENT;
	if (nr == HETMEM_CMD_MIGRATE_TO_DEV || nr == HETMEM_CMD_MIGRATE_TO_SYS)
		return -EINVAL;
	return -EFAULT;
}

/* Whether [addr, addr + len) is not inside one adopted space while some adopted space overlaps
 * it: a program's malloc'd buffer is adopted command by command (exactly each command's range:
 * the whole heap cannot be, device buffers live there), so a later command over another range
 * of it runs into or across those pieces (found from outside: random 16-page commands on one
 * malloc'd buffer failed four in five with EFAULT or EINVAL). Under `lock`. */
static int crosses_spaces(uintptr_t addr, uintptr_t len)
{
	int s = adopted_at(addr);
	if (s >= 0)
		return addr + len > spaces[s].end;
	for (int t = 0; t < MAX_SPACES; t++)
		if (spaces[t].space && spaces[t].start < addr + len && addr < spaces[t].end)
			return 1;
	return 0;
}

/* A command over a range that several adopted spaces cover, or that runs into one: run piece
 * by piece, each piece in its own space (the gaps adopted as their own spaces), as the kernel's
 * device runs it over the one process; `cpages` summed, `faults` the most of any piece. The
 * buffer advances with the pieces (a page per page, a byte per page for SNAPSHOT). Under
 * `lock`. */
static int pieces_cmd(struct fd_slot *f, unsigned nr, HetmemDmirrorCmd *cmd)
{
	uintptr_t a = cmd->addr, end = cmd->addr + (cmd->npages << 12);
	uint64_t cpages = 0, faults = 0;
	while (a < end) {
		int s = adopted_at(a);
		uintptr_t pe = end;
		if (s >= 0) {
			if (spaces[s].end < pe)
				pe = spaces[s].end;
		} else {
			for (int t = 0; t < MAX_SPACES; t++)
				if (spaces[t].space && spaces[t].start > a && spaces[t].start < pe)
					pe = spaces[t].start;
			s = space_for(a, pe - a);
			if (s < 0)
				return unadoptable(nr, s);
			/* space_for may have taken a whole mmap that goes on past the gap's end. */
			if (spaces[s].end < pe)
				pe = spaces[s].end;
		}
		int r = mirror_of(f, s);
		if (r)
			return r;
		uint64_t skip = (a - cmd->addr) >> 12;
		uint64_t ptr = cmd->ptr;
		if (nr == HETMEM_CMD_SNAPSHOT)
			ptr += skip;
		else if (nr == HETMEM_CMD_READ || nr == HETMEM_CMD_WRITE ||
			 nr == HETMEM_CMD_MIGRATE_TO_DEV || nr == HETMEM_CMD_EXCLUSIVE)
			ptr += skip << 12;
		HetmemDmirrorCmd sub = { .addr = a, .ptr = ptr, .npages = (pe - a) >> 12 };
		r = hetmem_mirror_cmd(f->mirrors[s], nr, &sub);
		if (r)
			return r;
		cpages += sub.cpages;
		if (sub.faults > faults)
			faults = sub.faults;
		a = pe;
	}
	cmd->cpages = cpages;
	cmd->faults = faults;
	return 0;
}

static int dmirror_ioctl(struct fd_slot *f, unsigned long req, HetmemDmirrorCmd *cmd)
{
	if (_IOC_TYPE(req) != DMIRROR_IOC_TYPE || _IOC_SIZE(req) != sizeof(HetmemDmirrorCmd) ||
	    _IOC_NR(req) > HETMEM_CMD_FLAGS)
		return PASS_THROUGH;
	unsigned nr = _IOC_NR(req);
	/* The kernel's checks come first (an unaligned or wrapping range is EINVAL for every
	 * command): run them through any mirror of this device; a range in memory the program
	 * has not mapped is EFAULT, as hmm_range_fault says. */
	if ((cmd->addr & 4095) || cmd->npages == 0 || cmd->npages > (UINT64_MAX >> 12) ||
	    cmd->addr + (cmd->npages << 12) < cmd->addr)
		return -EINVAL;
	if (nr == HETMEM_CMD_SNAPSHOT) {
		int s0 = adopted_at((uintptr_t)cmd->addr);
		/* Within one adopted space: hetmem answers as for any command. */
		if (s0 < 0 || cmd->addr + (cmd->npages << 12) > spaces[s0].end)
			return snapshot_any(f, cmd);
	}
	if (nr != HETMEM_CMD_CHECK_EXCLUSIVE && nr != HETMEM_CMD_RELEASE && nr != HETMEM_CMD_FLAGS &&
	    crosses_spaces((uintptr_t)cmd->addr, (uintptr_t)(cmd->npages << 12)))
		return pieces_cmd(f, nr, cmd);
	int s = space_for((uintptr_t)cmd->addr, (uintptr_t)(cmd->npages << 12));
	if (s == -EINVAL && nr == HETMEM_CMD_MIGRATE_TO_DEV &&
	    anonymize((uintptr_t)cmd->addr, (uintptr_t)(cmd->npages << 12)) == 0)
		s = space_for((uintptr_t)cmd->addr, (uintptr_t)(cmd->npages << 12));
	if (s < 0 && s == -EINVAL && (nr == HETMEM_CMD_READ || nr == HETMEM_CMD_WRITE))
		return plain_rw(cmd, nr == HETMEM_CMD_WRITE);
	if (s < 0)
		return unadoptable(nr, s);
	int r = mirror_of(f, s);
	if (r)
		return r;
	return hetmem_mirror_cmd(f->mirrors[s], nr, cmd);
}

/* The bytes of the program's buffer a command uses: a page per page for READ, WRITE,
 * MIGRATE_TO_DEV and EXCLUSIVE, a byte per page for SNAPSHOT, none otherwise. */
static uint64_t buffer_len(unsigned nr, const HetmemDmirrorCmd *cmd)
{
	if (nr == HETMEM_CMD_READ || nr == HETMEM_CMD_WRITE || nr == HETMEM_CMD_MIGRATE_TO_DEV ||
	    nr == HETMEM_CMD_EXCLUSIVE)
		return cmd->npages << 12;
	return nr == HETMEM_CMD_SNAPSHOT ? cmd->npages : 0;
}

/* A device command with the program's buffer bounced through memory of the shim's own (mapped
 * for the command, never adopted), as the kernel's device bounces it: copy_from_user before the
 * work (WRITE), copy_to_user after it (the others), EFAULT where the program's buffer is not
 * mapped, readable or writable; the copies go through the kernel (process_vm_readv/writev), so
 * a bad buffer is an error, where hetmem's C API takes a valid one for granted (found from
 * outside: a null buffer was EINVAL, a wild one would have crashed the program inside
 * hetmem's copy). Under `lock`. */
static int bounced_ioctl(struct fd_slot *f, unsigned long req, HetmemDmirrorCmd *cmd)
{
	unsigned nr = _IOC_NR(req);
	if (_IOC_TYPE(req) != DMIRROR_IOC_TYPE || _IOC_SIZE(req) != sizeof(HetmemDmirrorCmd) ||
	    nr > HETMEM_CMD_FLAGS || (cmd->addr & 4095) || cmd->npages == 0 ||
	    cmd->npages > (UINT64_MAX >> 12) || cmd->addr + (cmd->npages << 12) < cmd->addr ||
	    buffer_len(nr, cmd) == 0)
		return dmirror_ioctl(f, req, cmd); /* its own checks and answers */
	size_t len = buffer_len(nr, cmd);
	/* Reserved once (address space only), at the first command: a mapping made per command
	 * could land in a hole the program has just unmapped, and the command would find it there
	 * (a READ of the unmapped range reading the bounce buffer). Bigger: ENOMEM, as the kernel's
	 * vmalloc'd bounce buffer gives for a huge range. */
	static void *bounce;
	if (!bounce) {
		void *b = real_mmap(NULL, BOUNCE_MAX, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (b == MAP_FAILED)
			return -ENOMEM;
		bounce = b;
	}
	if (len > BOUNCE_MAX)
		return -ENOMEM;
	void *b = bounce;
	struct iovec mine = { .iov_base = b, .iov_len = len };
	struct iovec theirs = { .iov_base = (void *)(uintptr_t)cmd->ptr, .iov_len = len };
	int r = 0;
	if (nr == HETMEM_CMD_WRITE && process_vm_readv(getpid(), &mine, 1, &theirs, 1, 0) != (ssize_t)len)
		r = -EFAULT;
	if (r == 0) {
		HetmemDmirrorCmd c = *cmd;
		c.ptr = (uintptr_t)b;
		r = dmirror_ioctl(f, req, &c);
		if (r == 0 && nr != HETMEM_CMD_WRITE &&
		    process_vm_writev(getpid(), &mine, 1, &theirs, 1, 0) != (ssize_t)len)
			r = -EFAULT;
		if (r == 0) {
			cmd->cpages = c.cpages;
			cmd->faults = c.faults;
		}
	}
	/* Its memory back to the kernel (no event: the bounce buffer is not managed). */
	madvise(b, len, MADV_DONTNEED);
	return r;
}

/* ---- /sys/kernel/debug/gup_test (mm/gup_test.c, CONFIG_GUP_TEST) ----
 * The kernel's hmm-tests pin pages in device memory through it: get_user_pages and
 * pin_user_pages bring a device-private page back to system memory, and a long-term pin
 * (FOLL_LONGTERM, or PIN_LONGTERM_BENCHMARK) a device-coherent one too. Emulated with
 * hetmem_pin: each command pins the pages of its range and releases them, as the benchmark and
 * basic-test commands get (or pin) and put them. Memory no adopted space holds is plain memory:
 * its pages are faulted in through the kernel (process_vm_readv), EFAULT where it is not mapped
 * or not readable. The timings reported are 0; which_pages is not dumped. */
struct gup_test {
	uint64_t get_delta_usec, put_delta_usec, addr, size;
	uint32_t nr_pages_per_call, gup_flags, test_flags;
	uint32_t which_pages[8];
};
#define GUP_IOC_TYPE 'g'
#define GUP_NR_FIRST 1 /* GUP_FAST_BENCHMARK */
#define GUP_NR_PIN_LONGTERM_BENCHMARK 3
#define GUP_NR_LAST 6 /* DUMP_USER_PAGES_TEST */
#define FOLL_LONGTERM_FLAG 0x100

static int gup_ioctl(unsigned long req, struct gup_test *g)
{
	if (_IOC_TYPE(req) != GUP_IOC_TYPE || _IOC_SIZE(req) != sizeof(struct gup_test) ||
	    _IOC_NR(req) < GUP_NR_FIRST || _IOC_NR(req) > GUP_NR_LAST)
		return PASS_THROUGH;
	g->get_delta_usec = 0;
	g->put_delta_usec = 0;
	uintptr_t start = g->addr & ~4095UL;
	if (g->size == 0)
		return 0;
	if (g->addr + g->size < g->addr || g->addr + g->size > UINTPTR_MAX - 4095)
		return -EINVAL;
	uintptr_t end = (g->addr + g->size + 4095) & ~4095UL;
	int long_term = _IOC_NR(req) == GUP_NR_PIN_LONGTERM_BENCHMARK ||
			(g->gup_flags & FOLL_LONGTERM_FLAG);
	for (uintptr_t a = start; a < end;) {
		int s = adopted_at(a);
		uintptr_t to = end;
		if (s >= 0) {
			if (spaces[s].end < to)
				to = spaces[s].end;
			HetmemPin *pin;
			int r = hetmem_pin(spaces[s].space, (void *)a, to - a, long_term, &pin);
			if (r)
				return r;
			hetmem_pin_free(pin);
		} else {
			for (int t = 0; t < MAX_SPACES; t++)
				if (spaces[t].space && a < spaces[t].start && spaces[t].start < to)
					to = spaces[t].start;
			char buf[4096];
			for (uintptr_t p = a; p < to; p += 4096) {
				struct iovec local = { .iov_base = buf, .iov_len = 1 };
				struct iovec remote = { .iov_base = (void *)p, .iov_len = 1 };
				if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != 1)
					return -EFAULT;
			}
		}
		a = to;
	}
	return 0;
}

int ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	va_start(ap, req);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	init();
	if (!is_ours(fd))
		return real_ioctl(fd, req, arg);
	pthread_mutex_lock(&lock);
	struct fd_slot *f = slot_of(fd);
	if (!f) {
		pthread_mutex_unlock(&lock);
		return real_ioctl(fd, req, arg);
	}
	int r = !arg ? -EFAULT : f->dev == GUP_DEV ? gup_ioctl(req, arg) : bounced_ioctl(f, req, arg);
	pthread_mutex_unlock(&lock);
	if (r == PASS_THROUGH)
		return real_ioctl(fd, req, arg);
	if (r < 0) {
		errno = -r;
		return -1;
	}
	return 0;
}

int close(int fd)
{
	init();
	if (!is_ours(fd))
		return real_close(fd);
	pthread_mutex_lock(&lock);
	struct fd_slot *f = slot_of(fd);
	if (f) {
		for (int s = 0; s < MAX_SPACES; s++) {
			if (f->mirrors[s]) {
				hetmem_mirror_free(f->mirrors[s]);
				f->mirrors[s] = NULL;
			}
		}
		f->fd = -1;
		atomic_store(&ours[fd], 0);
	}
	pthread_mutex_unlock(&lock);
	return real_close(fd);
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	init();
	if (is_ours(fd) && !(flags & MAP_ANONYMOUS)) {
		/* A mapping of the test device itself: the kernel's device inserts pages of its own
		 * there at once (dmirror_fops_mmap), which a private mapping maps read-only until
		 * written. Here: the device descriptor's memfd, grown to cover the range, each page
		 * read once so that it is mapped (read-only in a private mapping) as there. */
		struct stat sb;
		if (fstat(fd, &sb) == 0 && sb.st_size < off + (off_t)len && ftruncate(fd, off + len) != 0)
			return MAP_FAILED;
		void *p = real_mmap(addr, len, prot, flags, fd, off);
		if (p != MAP_FAILED && (prot & PROT_READ))
			for (size_t i = 0; i < len; i += 4096)
				(void)*(volatile char *)((char *)p + i);
		return p;
	}
	pthread_mutex_lock(&lock);
	void *p = real_mmap(addr, len, prot, flags, fd, off);
	if (p != MAP_FAILED && !(flags & MAP_ANONYMOUS) && (flags & MAP_PRIVATE) &&
	    !(prot & ~(PROT_READ | PROT_WRITE))) {
		uintptr_t s = (uintptr_t)p, e = s + ((len + 4095) & ~4095UL);
		give_back_range(s, e);
		forget_maps(s, e);
		for (int i = 0; i < MAX_MAPS; i++) {
			if (!private_files[i].end) {
				private_files[i] = (struct file_slot){ s, e, prot };
				break;
			}
		}
	}
	if (p != MAP_FAILED && (flags & MAP_ANONYMOUS) && (flags & MAP_PRIVATE)) {
		uintptr_t s = (uintptr_t)p, e = s + ((len + 4095) & ~4095UL);
		/* MAP_FIXED replaced whatever was there. */
		give_back_range(s, e);
		forget_maps(s, e);
		for (int i = 0; i < MAX_MAPS; i++) {
			if (!maps[i].end) {
				maps[i].start = s;
				maps[i].end = e;
				break;
			}
		}
	}
	pthread_mutex_unlock(&lock);
	return p;
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return mmap(addr, len, prot, flags, fd, off);
}

int munmap(void *addr, size_t len)
{
	init();
	pthread_mutex_lock(&lock);
	give_back_range((uintptr_t)addr, (uintptr_t)addr + len);
	forget_maps((uintptr_t)addr, (uintptr_t)addr + len);
	pthread_mutex_unlock(&lock);
	return real_munmap(addr, len);
}

void *mremap(void *old, size_t old_len, size_t new_len, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	void *new_addr = va_arg(ap, void *);
	va_end(ap);
	init();
	pthread_mutex_lock(&lock);
	give_back_range((uintptr_t)old, (uintptr_t)old + old_len);
	forget_maps((uintptr_t)old, (uintptr_t)old + old_len);
	pthread_mutex_unlock(&lock);
	return real_mremap(old, old_len, new_len, flags, new_addr);
}

int mprotect(void *addr, size_t len, int prot)
{
	init();
	pthread_mutex_lock(&lock);
	/* As the kernel: the length is rounded up to whole pages. */
	len = (len + 4095) & ~4095UL;
	uintptr_t a = (uintptr_t)addr, e = a + len;
	for (int s = 0; s < MAX_SPACES; s++) {
		if (spaces[s].space && spaces[s].start <= a && e <= spaces[s].end &&
		    !(prot & ~(PROT_READ | PROT_WRITE)) && (prot != PROT_WRITE)) {
			int hp = (prot & PROT_READ ? HETMEM_PROT_READ : 0) |
				 (prot & PROT_WRITE ? HETMEM_PROT_WRITE : 0);
			int r = hetmem_protect(spaces[s].space, addr, len, hp);
			pthread_mutex_unlock(&lock);
			if (r < 0) {
				errno = -r;
				return -1;
			}
			return 0;
		}
	}
	/* Partly adopted, or a protection hetmem does not model (exec): give it back first. */
	give_back_range(a, e);
	pthread_mutex_unlock(&lock);
	return real_mprotect(addr, len, prot);
}

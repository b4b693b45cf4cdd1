/*
 * Fault injection for the end-to-end tests, loaded into the plain walletd
 * build with LD_PRELOAD.  While the file named by $WALLETD_FAULT_META_EIO
 * exists, the next write of LMDB's meta page (a write shorter than a page
 * into data.mdb) fails with EIO and the file is removed: one fault per file.
 * $WALLETD_FAULT_SYNC_MS makes every fdatasync that many milliseconds slower
 * (a slow disk).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int
meta_fault(int fd, size_t n)
{
	const char *flag = getenv("WALLETD_FAULT_META_EIO");
	char link[64], path[PATH_MAX];
	ssize_t len;

	if (flag == NULL || n >= 4096 || access(flag, F_OK) != 0)
		return 0;
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	if ((len = readlink(link, path, sizeof(path) - 1)) < 0)
		return 0;
	path[len] = '\0';
	if (len < 8 || strcmp(path + len - 8, "data.mdb") != 0)
		return 0;
	return unlink(flag) == 0;
}

ssize_t
pwrite64(int fd, const void *buf, size_t n, off_t off)
{
	static ssize_t (*real)(int, const void *, size_t, off_t);

	if (real == NULL)
		real = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64");
	if (meta_fault(fd, n)) {
		errno = EIO;
		return -1;
	}
	return real(fd, buf, n, off);
}

ssize_t
pwrite(int fd, const void *buf, size_t n, off_t off)
{
	return pwrite64(fd, buf, n, off);
}

int
fdatasync(int fd)
{
	static int (*real)(int);
	const char *ms = getenv("WALLETD_FAULT_SYNC_MS");

	if (real == NULL)
		real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
	if (ms) {
		long v = atol(ms);
		struct timespec ts = { v / 1000, v % 1000 * 1000000L };

		nanosleep(&ts, NULL);
	}
	return real(fd);
}

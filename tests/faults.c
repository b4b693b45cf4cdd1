/*
 * Fault injection for the end-to-end tests, loaded into the plain walletd
 * build with LD_PRELOAD.  Each fault is off unless its variable is set:
 *
 * WALLETD_FAULT_META_EIO=FILE  while FILE exists, the next write of LMDB's
 *     meta page (a write shorter than a page into data.mdb) fails with EIO
 *     and FILE is removed: one fault per file.
 * WALLETD_FAULT_SYNC_MS=N  every fdatasync takes N ms longer (a slow disk).
 * WALLETD_FAULT_OTHER_SYNC_MS=N  every fdatasync of a file that is not
 *     data.mdb takes N ms longer (a backup onto a slow disk).
 * WALLETD_FAULT_POWERCUT=FILE  once FILE exists, the power goes out.  Until
 *     then every write into data.mdb that is not yet durable is kept in an
 *     undo log (the bytes it replaced); an fdatasync of the file makes what
 *     was written before it durable, and a write through a descriptor opened
 *     O_DSYNC (LMDB's meta page) is durable by itself.  At the cut, half the
 *     time the newest writes from a random point on are undone (the disk
 *     wrote back in order and stopped there), half the time a random subset
 *     of them (it wrote back in any order); the file loses the growth that
 *     did not survive, and the process ends at once with status 137, as if
 *     killed.
 *     Writes and syncs hold one lock, so the cut falls between them: once
 *     FILE exists, at a random one of the next writes or syncs of data.mdb
 *     (most often in the middle of a commit), or after 100 ms of none.
 * WALLETD_FAULT_CLOCK=FILE  while FILE holds a number, time() answers it
 *     (seconds since the epoch): a test sets walletd's wall clock to a
 *     day's last second, then to the next day's first.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*writev_fn)(int, const struct iovec *, int);
typedef ssize_t (*pwritev_fn)(int, const struct iovec *, int, off_t);
typedef int (*sync_fn)(int);

/* Declares real_NAME, libc's NAME. */
#define REAL(name, type) \
	static type real_##name; \
	if (real_##name == NULL) \
		real_##name = (type)dlsym(RTLD_NEXT, #name)

/* Whether fd is the store's data file; its path into path when so. */
static int
is_data(int fd, char path[PATH_MAX])
{
	char link[64];
	ssize_t len;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	if ((len = readlink(link, path, PATH_MAX - 1)) < 8)
		return 0;
	path[len] = '\0';
	return strcmp(path + len - 8, "data.mdb") == 0;
}

static int
meta_fault(int fd, size_t n)
{
	const char *flag = getenv("WALLETD_FAULT_META_EIO");
	char path[PATH_MAX];

	if (flag == NULL || n >= 4096 || access(flag, F_OK) != 0 || !is_data(fd, path))
		return 0;
	return unlink(flag) == 0;
}

/* The power cut's undo log: what the writes since the last sync replaced. */
struct undo {
	off_t off;
	size_t len;               /* bytes of old that were in the file */
	off_t end;                /* the write's end */
	char *old;
	char *new;                /* what was written, end - off bytes */
};

static struct {
	pthread_mutex_t lock;
	const char *trigger;
	char path[PATH_MAX];
	int rfd;                  /* data.mdb, for reading what a write replaces */
	off_t synced_size;
	struct undo *log;
	size_t n, cap;
	int armed;                /* FILE exists: cut at a random write or sync */
	unsigned seed;
} cut = { .lock = PTHREAD_MUTEX_INITIALIZER, .rfd = -1 };

/* Records a write of iov at off into data.mdb (fd), and what it replaces. */
static void
cut_record(int fd, off_t off, const struct iovec *iov, int cnt)
{
	struct undo *u;
	struct stat st;
	size_t len = 0;

	for (int i = 0; i < cnt; i++)
		len += iov[i].iov_len;
	if (cut.trigger == NULL || (fcntl(fd, F_GETFL) & O_DSYNC) || !is_data(fd, cut.path))
		return;
	if (cut.rfd < 0) {
		cut.rfd = open(cut.path, O_RDONLY | O_CLOEXEC);
		cut.synced_size = fstat(cut.rfd, &st) == 0 ? st.st_size : 0;
	}
	if (cut.n == cut.cap) {
		cut.cap = cut.cap ? cut.cap * 2 : 256;
		cut.log = realloc(cut.log, cut.cap * sizeof(*cut.log));
	}
	u = &cut.log[cut.n++];
	u->off = off;
	u->end = off + (off_t)len;
	u->old = malloc(len ? len : 1);
	u->new = malloc(len ? len : 1);
	u->len = 0;
	for (size_t at = 0, i = 0; u->new && i < (size_t)cnt; at += iov[i].iov_len, i++)
		memcpy(u->new + at, iov[i].iov_base, iov[i].iov_len);
	if (u->old && cut.rfd >= 0) {
		ssize_t got = pread(cut.rfd, u->old, len, off);

		u->len = got > 0 ? (size_t)got : 0;
	}
}

/* After a sync of data.mdb: everything logged before it is durable. */
static void
cut_synced(int fd)
{
	struct stat st;

	if (cut.trigger == NULL || !is_data(fd, cut.path))
		return;
	for (size_t i = 0; i < cut.n; i++) {
		free(cut.log[i].old);
		free(cut.log[i].new);
	}
	cut.n = 0;
	if (fstat(fd, &st) == 0)
		cut.synced_size = st.st_size;
}

/* The power goes out; called with cut.lock held. */
static void
power_cut(void)
{
	static const char zeros[1 << 16];
	int subset = rand_r(&cut.seed) % 2, fd;
	size_t keep = cut.n ? (size_t)rand_r(&cut.seed) % (cut.n + 1) : 0, kept = 0;
	off_t size = cut.synced_size;
	REAL(pwrite64, pwrite_fn); /* ours takes the lock */

	if ((fd = open(cut.path, O_WRONLY | O_CLOEXEC)) < 0)
		_exit(3);
	/* Back to the file as of the last sync, newest first (past its old
	 * end, a hole)... */
	for (size_t i = cut.n; i-- > 0;) {
		struct undo *u = &cut.log[i];

		if (real_pwrite64(fd, u->old, u->len, u->off) < 0)
			_exit(3);
		for (off_t at = u->off + (off_t)u->len; at < u->end; at += (off_t)sizeof(zeros))
			if (real_pwrite64(fd, zeros, u->end - at < (off_t)sizeof(zeros) ?
			    (size_t)(u->end - at) : sizeof(zeros), at) < 0)
				_exit(3);
	}
	/* ...then the writes that reached the disk, oldest first. */
	for (size_t i = 0; i < cut.n; i++) {
		struct undo *u = &cut.log[i];

		if (subset ? rand_r(&cut.seed) % 2 : i >= keep)
			continue;
		if (real_pwrite64(fd, u->new, (size_t)(u->end - u->off), u->off) < 0)
			_exit(3);
		kept++;
		if (u->end > size)
			size = u->end;
	}
	if (ftruncate(fd, size) != 0)
		_exit(3);
	fprintf(stderr, "faults: power cut, %zu of %zu unsynced writes kept (%s)\n", kept, cut.n,
	    subset ? "any of them" : "the oldest");
	_exit(137);
}

/* Called at each write or sync of data.mdb, with cut.lock held. */
static void
cut_maybe(void)
{
	if (cut.armed && rand_r(&cut.seed) % 4 == 0)
		power_cut();
}

static void *
cut_watch(void *arg)
{
	struct timespec ms = { 0, 1000000L }, idle = { 0, 100000000L };

	(void)arg;
	while (access(cut.trigger, F_OK) != 0)
		nanosleep(&ms, NULL);
	pthread_mutex_lock(&cut.lock);
	cut.armed = 1;
	pthread_mutex_unlock(&cut.lock);
	nanosleep(&idle, NULL);
	pthread_mutex_lock(&cut.lock); /* nothing written meanwhile: cut now */
	power_cut();
	return NULL;
}

__attribute__((constructor)) static void
cut_start(void)
{
	sigset_t all, old;
	pthread_t t;

	if ((cut.trigger = getenv("WALLETD_FAULT_POWERCUT")) == NULL)
		return;
	cut.seed = (unsigned)getpid() ^ (unsigned)time(NULL);
	sigfillset(&all); /* the watcher takes no signal of walletd's (SIGTERM would kill it) */
	pthread_sigmask(SIG_BLOCK, &all, &old);
	if (pthread_create(&t, NULL, cut_watch, NULL) != 0)
		cut.trigger = NULL;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}


ssize_t
writev(int fd, const struct iovec *iov, int cnt)
{
	ssize_t rc;
	REAL(writev, writev_fn);

	pthread_mutex_lock(&cut.lock);
	cut_record(fd, lseek(fd, 0, SEEK_CUR), iov, cnt);
	rc = real_writev(fd, iov, cnt);
	cut_maybe();
	pthread_mutex_unlock(&cut.lock);
	return rc;
}

ssize_t
pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
	ssize_t rc;
	REAL(pwritev, pwritev_fn);

	pthread_mutex_lock(&cut.lock);
	cut_record(fd, off, iov, cnt);
	rc = real_pwritev(fd, iov, cnt, off);
	cut_maybe();
	pthread_mutex_unlock(&cut.lock);
	return rc;
}

ssize_t
pwrite64(int fd, const void *buf, size_t n, off_t off)
{
	if (meta_fault(fd, n)) {
		errno = EIO;
		return -1;
	}
	return pwritev(fd, &(struct iovec){ (void *)buf, n }, 1, off);
}

ssize_t
pwrite(int fd, const void *buf, size_t n, off_t off)
{
	return pwrite64(fd, buf, n, off);
}

static int
sync_with(sync_fn real, int fd)
{
	const char *ms = getenv("WALLETD_FAULT_SYNC_MS");
	char path[PATH_MAX];
	int rc;

	if (ms == NULL && (ms = getenv("WALLETD_FAULT_OTHER_SYNC_MS")) != NULL && is_data(fd, path))
		ms = NULL;
	if (ms) {
		long v = atol(ms);
		struct timespec ts = { v / 1000, v % 1000 * 1000000L };

		nanosleep(&ts, NULL);
	}
	pthread_mutex_lock(&cut.lock);
	cut_maybe();
	if ((rc = real(fd)) == 0)
		cut_synced(fd);
	pthread_mutex_unlock(&cut.lock);
	return rc;
}

int
fdatasync(int fd)
{
	REAL(fdatasync, sync_fn);

	return sync_with(real_fdatasync, fd);
}

int
fsync(int fd)
{
	REAL(fsync, sync_fn);

	return sync_with(real_fsync, fd);
}

/* time(): FILE's number while WALLETD_FAULT_CLOCK names a FILE holding one. */
time_t
time(time_t *t)
{
	const char *file = getenv("WALLETD_FAULT_CLOCK");
	struct timespec ts;
	long long v;
	FILE *f;

	clock_gettime(CLOCK_REALTIME, &ts);
	if (file && (f = fopen(file, "r")) != NULL) {
		if (fscanf(f, "%lld", &v) == 1)
			ts.tv_sec = (time_t)v;
		fclose(f);
	}
	if (t)
		*t = ts.tv_sec;
	return ts.tv_sec;
}

/*
 * Fault injection for the end-to-end tests, loaded into the plain walletd
 * build with LD_PRELOAD.  Each fault is off unless its variable is set:
 *
 * WALLETD_FAULT_META_EIO=FILE  while FILE exists, the next write of LMDB's
 *     meta page (a write shorter than a page into data.mdb) fails with EIO
 *     and FILE is removed: one fault per file.
 * WALLETD_FAULT_SYNC_MS=N  every fdatasync takes N ms longer (a slow disk).
 * WALLETD_FAULT_OTHER_SYNC_MS=N  every fdatasync of a file that is not one
 *     of the store's takes N ms longer (a backup onto a slow disk).
 * WALLETD_FAULT_POWERCUT=FILE  once FILE exists, the power goes out.  The
 *     store's files (data.mdb, journal.N, checkpoint, checkpoint.tmp) are
 *     watched: until then every write into one that is not yet durable is
 *     kept in that file's undo log (the bytes it replaced), one entry for
 *     each 4 KiB piece of it; an fsync or fdatasync of the file makes what
 *     was written before it durable, and a write through a descriptor opened
 *     O_DSYNC is durable by itself.  Creations, renames and removals of
 *     those files are kept in the directory's log until the directory is
 *     synced.  At the cut, each file keeps, half the time, its writes up to
 *     a random point (the disk wrote back in order and stopped there), half
 *     the time a random subset of them (in any order); the file loses the
 *     growth that did not survive; the directory keeps its operations up to
 *     a random point, the later ones undone; the process ends at once with
 *     status 137, as if killed.  Each file's state after the cut is made in
 *     a copy renamed over it, so no thread still running sees a file half
 *     put back.
 *     Writes and syncs hold one lock, so the cut falls between them: once
 *     FILE exists, at a random one of the next writes or syncs of the store
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
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*pwritev_fn)(int, const struct iovec *, int, off_t);
typedef ssize_t (*writev_fn)(int, const struct iovec *, int);
typedef int (*sync_fn)(int);
typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*close_fn)(int);
typedef int (*rename_fn)(const char *, const char *);
typedef int (*renameat_fn)(int, const char *, int, const char *);
typedef int (*unlinkat_fn)(int, const char *, int);

/* Declares real_NAME, libc's NAME. */
#define REAL(name, type) \
	static type real_##name; \
	if (real_##name == NULL) \
		real_##name = (type)dlsym(RTLD_NEXT, #name)

#define PIECE 4096
#define FILES_MAX 16
#define FDS_MAX 4096

/* Whether path names one of the store's files (by its last component). */
static int
store_file(const char *path)
{
	const char *base = strrchr(path, '/');

	base = base ? base + 1 : path;
	return strcmp(base, "data.mdb") == 0 || strcmp(base, "checkpoint") == 0 ||
	    strcmp(base, "checkpoint.tmp") == 0 || (strncmp(base, "journal.", 8) == 0 && base[8] && !base[9]);
}

/* The path of fd into path; 0 if it has none. */
static int
fd_path(int fd, char path[PATH_MAX])
{
	char link[64];
	ssize_t len;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	if ((len = readlink(link, path, PATH_MAX - 1)) <= 0)
		return 0;
	path[len] = '\0';
	return 1;
}

static int
meta_fault(int fd, size_t n)
{
	const char *flag = getenv("WALLETD_FAULT_META_EIO");
	char path[PATH_MAX];

	if (flag == NULL || n >= 4096 || access(flag, F_OK) != 0 || !fd_path(fd, path) ||
	    strcmp(path + (strlen(path) > 8 ? strlen(path) - 8 : 0), "data.mdb") != 0)
		return 0;
	return unlink(flag) == 0;
}

/* ---- The power cut ---- */

/* One 4 KiB piece of a write not yet durable: what it replaced, what it wrote. */
struct undo {
	off_t off;
	size_t len;               /* bytes of old that were in the file */
	off_t end;
	char *old, *new;
};

/* A watched file: its path now, its size as of its last sync, its undo log. */
struct wfile {
	char path[PATH_MAX];
	off_t synced_size;
	struct undo *log;
	size_t n, cap;
};

/* A directory operation not yet durable. */
struct dirop {
	int kind;                 /* 'c' created, 'r' renamed from to to, 'u' removed */
	char from[PATH_MAX], to[PATH_MAX];
	char *saved;              /* what to (r) or from (u) held before, if it existed */
	size_t saved_len;
	int had;
};

static struct {
	pthread_mutex_t lock;
	const char *trigger;
	struct wfile files[FILES_MAX];
	int nfiles;
	signed char fds[FDS_MAX]; /* fd -> index in files + 1; 0 = not watched */
	struct dirop *ops;
	size_t nops, capops;
	int armed;                /* FILE exists: cut at a random write or sync */
	unsigned seed;
} cut = { .lock = PTHREAD_MUTEX_INITIALIZER };

/* The watched file of path (made when new); NULL when too many. */
static struct wfile *
file_of(const char *path)
{
	struct stat st;

	for (int i = 0; i < cut.nfiles; i++)
		if (strcmp(cut.files[i].path, path) == 0)
			return &cut.files[i];
	if (cut.nfiles == FILES_MAX)
		return NULL;
	snprintf(cut.files[cut.nfiles].path, PATH_MAX, "%s", path);
	cut.files[cut.nfiles].synced_size = stat(path, &st) == 0 ? st.st_size : 0;
	return &cut.files[cut.nfiles++];
}

/* Starts watching fd when it is one of the store's files (cut.lock held). */
static void
watch(int fd)
{
	char path[PATH_MAX];
	struct wfile *f;

	if (cut.trigger == NULL || fd < 0 || fd >= FDS_MAX)
		return;
	cut.fds[fd] = 0;
	if (fd_path(fd, path) && store_file(path) && (f = file_of(path)) != NULL)
		cut.fds[fd] = (signed char)(f - cut.files + 1);
}

/* libc's open and close, for this file's own use (ours take cut.lock). */
static int
raw_open(const char *path, int flags)
{
	REAL(open, open_fn);

	return real_open(path, flags | O_CLOEXEC, 0600);
}

static void
raw_close(int fd)
{
	REAL(close, close_fn);

	real_close(fd);
}

/* Reads len bytes of path at off into a new buffer; *got how many there were. */
static char *
read_at(const char *path, off_t off, size_t len, size_t *got)
{
	char *buf = malloc(len ? len : 1);
	int fd = raw_open(path, O_RDONLY);
	ssize_t n = fd >= 0 && buf ? pread(fd, buf, len, off) : -1;

	if (fd >= 0)
		raw_close(fd);
	*got = n > 0 ? (size_t)n : 0;
	return buf;
}

/* Records a write of iov at off into watched fd (cut.lock held), piece by piece. */
static void
cut_record(int fd, off_t off, const struct iovec *iov, int cnt)
{
	struct wfile *f;
	char *all;
	size_t len = 0;

	if (cut.trigger == NULL || fd < 0 || fd >= FDS_MAX || cut.fds[fd] == 0 || (fcntl(fd, F_GETFL) & O_DSYNC))
		return;
	f = &cut.files[cut.fds[fd] - 1];
	for (int i = 0; i < cnt; i++)
		len += iov[i].iov_len;
	if ((all = malloc(len ? len : 1)) == NULL)
		return;
	for (size_t at = 0, i = 0; i < (size_t)cnt; at += iov[i].iov_len, i++)
		memcpy(all + at, iov[i].iov_base, iov[i].iov_len);
	for (size_t done = 0; done < len;) {
		size_t piece = PIECE - (size_t)((off + (off_t)done) % PIECE);
		struct undo *u;

		if (piece > len - done)
			piece = len - done;
		if (f->n == f->cap) {
			f->cap = f->cap ? f->cap * 2 : 256;
			f->log = realloc(f->log, f->cap * sizeof(*f->log));
		}
		u = &f->log[f->n++];
		u->off = off + (off_t)done;
		u->end = u->off + (off_t)piece;
		u->old = read_at(f->path, u->off, piece, &u->len);
		if ((u->new = malloc(piece)) != NULL)
			memcpy(u->new, all + done, piece);
		done += piece;
	}
	free(all);
}

/* After a sync of fd (cut.lock held): a watched file's writes are durable; a directory's operations are. */
static void
cut_synced(int fd)
{
	struct stat st;

	if (cut.trigger == NULL || fd < 0 || fstat(fd, &st) != 0)
		return;
	if (S_ISDIR(st.st_mode)) {
		for (size_t i = 0; i < cut.nops; i++)
			free(cut.ops[i].saved);
		cut.nops = 0;
		return;
	}
	if (fd >= FDS_MAX || cut.fds[fd] == 0)
		return;
	{
		struct wfile *f = &cut.files[cut.fds[fd] - 1];

		for (size_t i = 0; i < f->n; i++) {
			free(f->log[i].old);
			free(f->log[i].new);
		}
		f->n = 0;
		f->synced_size = st.st_size;
	}
}

/* Records a directory operation (cut.lock held) before it is made. */
static void
cut_dirop(int kind, const char *from, const char *to)
{
	struct dirop *op;
	struct stat st;
	const char *saved = kind == 'r' ? to : from;

	if (cut.trigger == NULL || !store_file(from))
		return;
	if (cut.nops == cut.capops) {
		cut.capops = cut.capops ? cut.capops * 2 : 16;
		cut.ops = realloc(cut.ops, cut.capops * sizeof(*cut.ops));
	}
	op = &cut.ops[cut.nops++];
	memset(op, 0, sizeof(*op));
	op->kind = kind;
	snprintf(op->from, PATH_MAX, "%s", from);
	snprintf(op->to, PATH_MAX, "%s", to ? to : "");
	if (kind != 'c' && stat(saved, &st) == 0) {
		op->had = 1;
		op->saved = read_at(saved, 0, (size_t)st.st_size, &op->saved_len);
	}
}

/* Puts len bytes back as the whole of path (made if missing). */
static void
put_file(const char *path, const char *data, size_t len)
{
	REAL(pwrite64, pwrite_fn);
	int fd = raw_open(path, O_WRONLY | O_CREAT | O_TRUNC);

	if (fd < 0 || real_pwrite64(fd, data, len, 0) != (ssize_t)len)
		_exit(3);
	raw_close(fd);
}

/*
 * A copy of path beside it, path.cut, in which power_cut puts the bytes the
 * disk holds after the cut, then renames it over path: walletd's other
 * threads run on until the process ends, and LMDB's map of data.mdb must
 * not show them a file half put back (the writer read one, took the store
 * for broken, and aborted before the cut could end it).  Returns the copy's
 * descriptor, or -1 when path is gone.
 */
static int
beside(const char *path, char tmp[PATH_MAX + 8])
{
	char buf[1 << 16];
	int from = raw_open(path, O_RDONLY), to;
	ssize_t n;

	if (from < 0)
		return -1;
	snprintf(tmp, PATH_MAX + 8, "%s.cut", path);
	if ((to = raw_open(tmp, O_RDWR | O_CREAT | O_TRUNC)) < 0)
		_exit(3);
	while ((n = read(from, buf, sizeof(buf))) > 0)
		if (write(to, buf, (size_t)n) != n)
			_exit(3);
	raw_close(from);
	return to;
}

/* The power goes out; called with cut.lock held. */
static void
power_cut(void)
{
	static const char zeros[PIECE];
	size_t ops_kept = cut.nops ? (size_t)rand_r(&cut.seed) % (cut.nops + 1) : 0, pieces = 0, kept = 0;
	REAL(pwrite64, pwrite_fn); /* ours takes the lock */
	REAL(rename, rename_fn);

	for (int i = 0; i < cut.nfiles; i++) {
		struct wfile *f = &cut.files[i];
		int subset = rand_r(&cut.seed) % 2, fd;
		size_t keep = f->n ? (size_t)rand_r(&cut.seed) % (f->n + 1) : 0;
		off_t size = f->synced_size;
		char tmp[PATH_MAX + 8];

		if (f->n == 0 || (fd = beside(f->path, tmp)) < 0)
			continue;
		/* Back to the file as of its last sync, newest first (past its old end, a hole)... */
		for (size_t j = f->n; j-- > 0;) {
			struct undo *u = &f->log[j];

			if (real_pwrite64(fd, u->old, u->len, u->off) < 0 ||
			    (u->off + (off_t)u->len < u->end &&
			    real_pwrite64(fd, zeros, (size_t)(u->end - u->off) - u->len, u->off + (off_t)u->len) < 0))
				_exit(3);
		}
		/* ...then the pieces that reached the disk, oldest first. */
		for (size_t j = 0; j < f->n; j++) {
			struct undo *u = &f->log[j];

			pieces++;
			if (subset ? rand_r(&cut.seed) % 2 : j >= keep)
				continue;
			if (u->new && real_pwrite64(fd, u->new, (size_t)(u->end - u->off), u->off) < 0)
				_exit(3);
			kept++;
			if (u->end > size)
				size = u->end;
		}
		if (ftruncate(fd, size) != 0)
			_exit(3);
		raw_close(fd);
		if (real_rename(tmp, f->path) != 0)
			_exit(3);
	}
	/* The directory: its operations up to a random point; the later ones undone, newest first. */
	for (size_t j = cut.nops; j-- > ops_kept;) {
		struct dirop *op = &cut.ops[j];

		if (op->kind == 'c') {
			unlink(op->from);
		} else if (op->kind == 'r') {
			if (real_rename(op->to, op->from) != 0)
				_exit(3);
			if (op->had)
				put_file(op->to, op->saved, op->saved_len);
		} else if (op->had) {
			put_file(op->from, op->saved, op->saved_len);
		}
	}
	fprintf(stderr, "faults: power cut, %zu of %zu unsynced pieces kept, %zu of %zu directory operations\n",
	    kept, pieces, ops_kept, cut.nops);
	_exit(137);
}

/* Called at each write or sync of the store, with cut.lock held. */
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

/* ---- The calls watched ---- */

/* open, open64, openat, openat64: a store file opened is watched; one created is a directory operation. */
#define OPEN_BODY(call, path) \
	mode_t mode = 0; \
	int fd, existed = -1; \
	if (flags & (O_CREAT | O_TMPFILE)) { \
		va_list ap; \
		va_start(ap, flags); \
		mode = (mode_t)va_arg(ap, int); \
		va_end(ap); \
	} \
	pthread_mutex_lock(&cut.lock); \
	if (cut.trigger && (flags & O_CREAT)) \
		existed = dirfd_access(dirfd, path); \
	fd = call; \
	if (fd >= 0) { \
		watch(fd); \
		if (existed == 0 && fd < FDS_MAX && cut.fds[fd]) \
			cut_dirop('c', cut.files[cut.fds[fd] - 1].path, NULL); \
	} \
	pthread_mutex_unlock(&cut.lock); \
	return fd

/* 1 if path (relative to dirfd) exists, 0 if not. */
static int
dirfd_access(int dirfd, const char *path)
{
	return faccessat(dirfd, path, F_OK, 0) == 0;
}

int
open(const char *path, int flags, ...)
{
	REAL(open, open_fn);
	int dirfd = AT_FDCWD;

	OPEN_BODY(real_open(path, flags, mode), path);
}

int
open64(const char *path, int flags, ...)
{
	REAL(open64, open_fn);
	int dirfd = AT_FDCWD;

	OPEN_BODY(real_open64(path, flags, mode), path);
}

int
openat(int dirfd, const char *path, int flags, ...)
{
	REAL(openat, openat_fn);

	OPEN_BODY(real_openat(dirfd, path, flags, mode), path);
}

int
openat64(int dirfd, const char *path, int flags, ...)
{
	REAL(openat64, openat_fn);

	OPEN_BODY(real_openat64(dirfd, path, flags, mode), path);
}

int
close(int fd)
{
	REAL(close, close_fn);

	if (fd >= 0 && fd < FDS_MAX && cut.trigger) {
		pthread_mutex_lock(&cut.lock);
		cut.fds[fd] = 0;
		pthread_mutex_unlock(&cut.lock);
	}
	return real_close(fd);
}

/* The absolute path of path relative to dirfd, into out (cut to PATH_MAX). */
static void
resolve(int dirfd, const char *path, char out[PATH_MAX])
{
	char dir[PATH_MAX], whole[2 * PATH_MAX + 2];

	if (path[0] == '/' || (dirfd == AT_FDCWD ? getcwd(dir, sizeof(dir)) == NULL : !fd_path(dirfd, dir)))
		snprintf(whole, sizeof(whole), "%s", path);
	else
		snprintf(whole, sizeof(whole), "%s/%s", dir, path);
	snprintf(out, PATH_MAX, "%.*s", PATH_MAX - 1, whole);
}

/* A rename of store files: a directory operation; the watched file's path follows. */
static void
renamed(const char *from, const char *to)
{
	for (int i = 0; i < cut.nfiles; i++)
		if (strcmp(cut.files[i].path, to) == 0)
			cut.files[i].path[0] = '\0'; /* replaced */
	for (int i = 0; i < cut.nfiles; i++)
		if (strcmp(cut.files[i].path, from) == 0)
			snprintf(cut.files[i].path, PATH_MAX, "%s", to);
}

int
renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath)
{
	REAL(renameat, renameat_fn);
	char from[PATH_MAX], to[PATH_MAX];
	int rc;

	pthread_mutex_lock(&cut.lock);
	resolve(olddirfd, oldpath, from);
	resolve(newdirfd, newpath, to);
	cut_dirop('r', from, to);
	if ((rc = real_renameat(olddirfd, oldpath, newdirfd, newpath)) == 0 && cut.trigger)
		renamed(from, to);
	cut_maybe();
	pthread_mutex_unlock(&cut.lock);
	return rc;
}

int
rename(const char *oldpath, const char *newpath)
{
	return renameat(AT_FDCWD, oldpath, AT_FDCWD, newpath);
}

int
unlinkat(int dirfd, const char *path, int flags)
{
	REAL(unlinkat, unlinkat_fn);
	char abs[PATH_MAX];
	int rc;

	pthread_mutex_lock(&cut.lock);
	resolve(dirfd, path, abs);
	if (!(flags & AT_REMOVEDIR))
		cut_dirop('u', abs, NULL);
	rc = real_unlinkat(dirfd, path, flags);
	pthread_mutex_unlock(&cut.lock);
	return rc;
}

ssize_t
writev(int fd, const struct iovec *iov, int cnt)
{
	ssize_t rc;
	REAL(writev, writev_fn);

	pthread_mutex_lock(&cut.lock);
	cut_record(fd, lseek(fd, 0, SEEK_CUR), iov, cnt);
	rc = real_writev(fd, iov, cnt);
	if (fd >= 0 && fd < FDS_MAX && cut.fds[fd])
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
	if (fd >= 0 && fd < FDS_MAX && cut.fds[fd])
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

	if (ms == NULL && (ms = getenv("WALLETD_FAULT_OTHER_SYNC_MS")) != NULL && fd_path(fd, path) &&
	    store_file(path))
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

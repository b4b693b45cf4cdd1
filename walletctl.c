/*
 * walletctl - the command-line client of walletd, for people and scripts.
 *
 * Every sub-command is a row of the method table in protocol.h: the table
 * drives argument parsing, `walletctl help` and dispatch.  A few commands
 * are walletctl's own: help, rate export, bench.
 *
 * Exit codes: 0 success, 1 walletd answered an error, 2 usage error,
 * 3 cannot reach walletd, 4 insufficient_balance, 5 unavailable (retry).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <search.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <msgpack.h>
#include <openssl/evp.h>

#include "protocol.h"

static int json_output;
static const char *socket_path;

static void __attribute__((noreturn, format(printf, 2, 3)))
die(int code, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "walletctl: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(code);
}

/* ---------------------------------------------------------------------- */
/* Connection                                                             */
/* ---------------------------------------------------------------------- */

/*
 * Picks the socket: -s, $WALLETD_SOCKET, ./var/walletd.sock (what make run
 * serves), the installed default; *why says which, for an error message.
 */
static const char *
socket_pick(const char **why)
{
	struct stat st;

	if (socket_path)
		return *why = "from -s", socket_path;
	if (getenv("WALLETD_SOCKET") && *getenv("WALLETD_SOCKET"))
		return *why = "from $WALLETD_SOCKET", getenv("WALLETD_SOCKET");
	if (stat("./var/walletd.sock", &st) == 0 && S_ISSOCK(st.st_mode))
		return *why = "found in ./var, as make run serves it", "./var/walletd.sock";
	*why = "the installed default: no -s, no $WALLETD_SOCKET, no ./var/walletd.sock here";
	return "/run/walletd/walletd.sock";
}

/* Connects to walletd.  Returns the socket, or -1 (errno set). */
static int
sock_connect(const char *path)
{
	struct sockaddr_un sa;
	int fd;

	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sa.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(sa.sun_path, path);
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
		int saved = errno;

		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

/* Sends all of buf, passing fd_pass (if >= 0) with the first byte. */
static int
send_all(int fd, const char *buf, size_t len, int fd_pass)
{
	while (len > 0) {
		struct iovec iov = { (void *)buf, len };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
		char cbuf[CMSG_SPACE(sizeof(int))];
		ssize_t n;

		if (fd_pass >= 0) {
			struct cmsghdr *cm;

			memset(cbuf, 0, sizeof(cbuf));
			mh.msg_control = cbuf;
			mh.msg_controllen = sizeof(cbuf);
			cm = CMSG_FIRSTHDR(&mh);
			cm->cmsg_level = SOL_SOCKET;
			cm->cmsg_type = SCM_RIGHTS;
			cm->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(cm), &fd_pass, sizeof(int));
			fd_pass = -1;
		}
		n = sendmsg(fd, &mh, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * Reads one whole msgpack object from fd through up into *out.
 * Returns 0, or -1 when the connection ends or the bytes do not decode.
 */
static int
recv_object(int fd, msgpack_unpacker *up, msgpack_unpacked *out)
{
	for (;;) {
		msgpack_unpack_return ret = msgpack_unpacker_next(up, out);
		ssize_t n;

		if (ret == MSGPACK_UNPACK_SUCCESS)
			return 0;
		if (ret != MSGPACK_UNPACK_CONTINUE)
			return -1;
		if (!msgpack_unpacker_reserve_buffer(up, 65536))
			return -1;
		n = read(fd, msgpack_unpacker_buffer(up), msgpack_unpacker_buffer_capacity(up));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		msgpack_unpacker_buffer_consumed(up, (size_t)n);
	}
}

/* Packs a request [0, msgid, method, [params]] into sb; params may be NULL. */
static void
pack_request(msgpack_sbuffer *sb, uint32_t msgid, const char *method, const msgpack_sbuffer *params)
{
	msgpack_packer pk;

	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 4);
	msgpack_pack_int(&pk, 0);
	msgpack_pack_uint32(&pk, msgid);
	msgpack_pack_str_with_body(&pk, method, strlen(method));
	if (params && params->size) {
		msgpack_pack_array(&pk, 1);
		msgpack_sbuffer_write(sb, params->data, params->size);
	} else {
		msgpack_pack_array(&pk, 0);
	}
}

/*
 * The file walletd writes for us (backup).  It is created beside FILE as
 * FILE.partial-XXXXXX and renamed over FILE only when walletd answered ok;
 * otherwise it is removed.  A failed backup leaves no half a file behind and
 * does not destroy the last good one.
 */
static char out_final[4096], out_partial[4096 + 32], out_dir[4096];

static void
out_discard(void)
{
	if (out_partial[0])
		unlink(out_partial);
}

static int
out_open(const char *path)
{
	char lock[sizeof(out_dir) + 16], *slash;
	int fd;

	if (strlen(path) >= sizeof(out_final))
		die(EXIT_USAGE, "%s: the name is too long", path);
	strcpy(out_final, path);
	strcpy(out_dir, path);
	if ((slash = strrchr(out_dir, '/')) == NULL)
		strcpy(out_dir, ".");
	else if (slash == out_dir)
		out_dir[1] = '\0'; /* "/name": the root */
	else
		*slash = '\0';
	/* Into a store's own directory the copy would replace its data.mdb, and
	 * what walletd commits after that would be lost at its next start. */
	snprintf(lock, sizeof(lock), "%s/walletd.lock", out_dir);
	if (access(lock, F_OK) == 0)
		die(EXIT_USAGE, "%s is in a walletd store's directory (it holds walletd.lock); back up elsewhere", path);
	snprintf(out_partial, sizeof(out_partial), "%s.partial-XXXXXX", path);
	if ((fd = mkostemp(out_partial, O_CLOEXEC)) < 0) {
		out_partial[0] = '\0';
		die(EXIT_USAGE, "cannot create %s: %s", path, strerror(errno));
	}
	atexit(out_discard);
	return fd;
}

/* The result of a successful response; NULL for an error answer or anything else. */
static const msgpack_object *
ok_result(const msgpack_object *resp)
{
	if (resp->type != MSGPACK_OBJECT_ARRAY || resp->via.array.size != 4 ||
	    resp->via.array.ptr[2].type != MSGPACK_OBJECT_NIL)
		return NULL;
	return &resp->via.array.ptr[3];
}

/* After walletd's answer: gives the file its name when the answer is ok. */
static void
out_finish(const msgpack_object *resp)
{
	int dfd;

	if (out_partial[0] == '\0' || ok_result(resp) == NULL)
		return; /* out_discard removes it at exit */
	if (rename(out_partial, out_final) != 0)
		die(EXIT_ERROR, "cannot rename %s to %s: %s", out_partial, out_final, strerror(errno));
	out_partial[0] = '\0';
	if ((dfd = open(out_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
		fsync(dfd); /* the new name, durable like the file walletd synced */
		close(dfd);
	}
}

/*
 * Calls method with params (a packed map, or NULL) on a fresh connection and
 * leaves the response in *resp.  Exits 3 if walletd cannot be reached.
 */
static void
call(const char *method, const msgpack_sbuffer *params, int fd_pass, msgpack_unpacked *resp)
{
	const char *why, *path = socket_pick(&why);
	msgpack_sbuffer sb;
	msgpack_unpacker up;
	int fd = sock_connect(path);

	if (fd < 0)
		die(EXIT_CONNECT, "cannot connect to walletd at %s (%s): %s", path, why, strerror(errno));
	msgpack_sbuffer_init(&sb);
	pack_request(&sb, 1, method, params);
	msgpack_unpacker_init(&up, 65536);
	msgpack_unpacked_init(resp);
	if (send_all(fd, sb.data, sb.size, fd_pass) != 0) {
		int err = errno;

		/* walletd may have answered first and closed (too_many_connections) */
		if (recv_object(fd, &up, resp) != 0)
			die(EXIT_CONNECT, "cannot send to walletd at %s: %s", path, strerror(err));
	} else if (recv_object(fd, &up, resp) != 0) {
		die(EXIT_CONNECT, "walletd closed the connection without an answer");
	}
	msgpack_sbuffer_destroy(&sb);
	msgpack_unpacker_destroy(&up);
	close(fd);
}

/* ---------------------------------------------------------------------- */
/* Output                                                                 */
/* ---------------------------------------------------------------------- */

static void
json_string(FILE *f, const char *s, size_t n)
{
	fputc('"', f);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c == '\n')
			fputs("\\n", f);
		else if (c == '\r')
			fputs("\\r", f);
		else if (c == '\t')
			fputs("\\t", f);
		else if (c < 0x20)
			fprintf(f, "\\u%04x", c);
		else
			fputc(c, f);
	}
	fputc('"', f);
}

/* Prints o as JSON. */
static void
json_print(FILE *f, const msgpack_object *o)
{
	switch (o->type) {
	case MSGPACK_OBJECT_NIL: fputs("null", f); break;
	case MSGPACK_OBJECT_BOOLEAN: fputs(o->via.boolean ? "true" : "false", f); break;
	case MSGPACK_OBJECT_POSITIVE_INTEGER: fprintf(f, "%" PRIu64, o->via.u64); break;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER: fprintf(f, "%" PRId64, o->via.i64); break;
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64: fprintf(f, "%.17g", o->via.f64); break;
	case MSGPACK_OBJECT_STR: json_string(f, o->via.str.ptr, o->via.str.size); break;
	case MSGPACK_OBJECT_BIN: json_string(f, o->via.bin.ptr, o->via.bin.size); break;
	case MSGPACK_OBJECT_ARRAY:
		fputc('[', f);
		for (uint32_t i = 0; i < o->via.array.size; i++) {
			if (i)
				fputs(", ", f);
			json_print(f, &o->via.array.ptr[i]);
		}
		fputc(']', f);
		break;
	case MSGPACK_OBJECT_MAP:
		fputc('{', f);
		for (uint32_t i = 0; i < o->via.map.size; i++) {
			if (i)
				fputs(", ", f);
			if (o->via.map.ptr[i].key.type == MSGPACK_OBJECT_STR)
				json_print(f, &o->via.map.ptr[i].key);
			else
				json_string(f, "?", 1);
			fputs(": ", f);
			json_print(f, &o->via.map.ptr[i].val);
		}
		fputc('}', f);
		break;
	default: fputs("null", f); break;
	}
}

/* Keys whose values are amounts: shown with 2+ decimals and thousands separators. */
static int
is_amount_key(const char *k, size_t n)
{
	static const char *const keys[] = { "balance", "amount", "balance_after", "price", "threshold",
		"required", "available", "subtotal", "unit_price", "unit_cost", "cost", "credited",
		"paid_amount", "held", "remaining", "credit_limit", "daily_limit", NULL };

	for (int i = 0; keys[i]; i++)
		if (strlen(keys[i]) == n && memcmp(keys[i], k, n) == 0)
			return 1;
	return 0;
}

/* Formats an amount string for people: 1499.06 -> 1,499.06; 35 -> 35.00. */
static void
human_amount(const char *s, size_t n, char *out, size_t cap)
{
	char buf[64], raw[64];
	int64_t v;

	if (n >= sizeof(raw) || (memcpy(raw, s, n), raw[n] = '\0', amount_parse(raw, n, &v)) != 0) {
		snprintf(out, cap, "%.*s", (int)n, s);
		return;
	}
	amount_format(v, buf, 2);
	{
		char *dot = strchr(buf, '.'), *start = buf + (buf[0] == '-');
		size_t whole = (size_t)(dot - start), o = 0;

		if (buf[0] == '-')
			out[o++] = '-';
		for (size_t i = 0; i < whole && o + 2 < cap; i++) {
			if (i && (whole - i) % 3 == 0)
				out[o++] = ',';
			out[o++] = start[i];
		}
		snprintf(out + o, cap - o, "%s", dot);
	}
}

/* Formats a scalar (or a small nested value) for a table cell. */
static void
cell(const msgpack_object *k, const msgpack_object *v, char *out, size_t cap)
{
	switch (v->type) {
	case MSGPACK_OBJECT_NIL: snprintf(out, cap, "-"); break;
	case MSGPACK_OBJECT_BOOLEAN: snprintf(out, cap, "%s", v->via.boolean ? "yes" : "no"); break;
	case MSGPACK_OBJECT_POSITIVE_INTEGER: snprintf(out, cap, "%" PRIu64, v->via.u64); break;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER: snprintf(out, cap, "%" PRId64, v->via.i64); break;
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64: snprintf(out, cap, "%.2f", v->via.f64); break;
	case MSGPACK_OBJECT_STR:
		if (k && k->type == MSGPACK_OBJECT_STR && is_amount_key(k->via.str.ptr, k->via.str.size))
			human_amount(v->via.str.ptr, v->via.str.size, out, cap);
		else
			snprintf(out, cap, "%.*s", (int)v->via.str.size, v->via.str.ptr);
		break;
	default: {
		char *buf = NULL;
		size_t len = 0;
		FILE *f = open_memstream(&buf, &len);

		json_print(f, v);
		fclose(f);
		snprintf(out, cap, "%s", buf);
		free(buf);
	}
	}
}

/* Preferred columns of the lists walletd answers; others show every key. */
static const struct { const char *list; const char *columns[10]; } list_columns[] = {
	{ "transactions", { "id", "created_at", "type", "amount", "balance_after", "currency", "description" } },
	{ "wallets", { "wallet", "currency", "balance", "plan", "threshold", "status" } },
	{ "rates", { "plan", "channel", "prefix", "mccmnc", "route", "price", "currency", "base", "quote", "rate" } },
	{ "topups", { "ref", "status", "amount", "currency", "created_at", "expires_at", "credited", "late" } },
	{ "notifications", { "id", "created_at", "balance", "threshold", "currency", "email_state", "attempts", "emails" } },
	{ "breakdown", { "prefix", "mccmnc", "route", "count", "unit_price", "price_currency", "unit_cost", "subtotal" } },
	{ "holds", { "hold", "status", "amount", "remaining", "currency", "expires_at", "description" } },
	{ "results", { "id", "type", "amount", "balance_after", "ref", "error" } },
};

/* Prints a list of maps as an aligned table. */
static void
print_table(const char *name, const msgpack_object *list)
{
	const char *cols[32];
	int ncols = 0;
	size_t width[32];
	char text[256];

	for (size_t i = 0; i < sizeof(list_columns) / sizeof(list_columns[0]); i++)
		if (strcmp(list_columns[i].list, name) == 0)
			for (int c = 0; c < 9 && list_columns[i].columns[c]; c++) {
				int present = 0;

				for (uint32_t r = 0; r < list->via.array.size && !present; r++)
					present = map_get(&list->via.array.ptr[r], list_columns[i].columns[c]) != NULL;
				if (present)
					cols[ncols++] = list_columns[i].columns[c];
			}
	if (ncols == 0)
		for (uint32_t r = 0; r < list->via.array.size; r++) {
			const msgpack_object *m = &list->via.array.ptr[r];

			for (uint32_t i = 0; m->type == MSGPACK_OBJECT_MAP && i < m->via.map.size && ncols < 32; i++) {
				const msgpack_object *k = &m->via.map.ptr[i].key;
				int seen = 0;
				char *copy;

				if (k->type != MSGPACK_OBJECT_STR)
					continue;
				for (int c = 0; c < ncols; c++)
					seen |= strlen(cols[c]) == k->via.str.size &&
					    memcmp(cols[c], k->via.str.ptr, k->via.str.size) == 0;
				if (!seen && (copy = strndup(k->via.str.ptr, k->via.str.size)))
					cols[ncols++] = copy;
			}
		}
	for (int c = 0; c < ncols; c++)
		width[c] = strlen(cols[c]);
	for (int pass = 0; pass < 2; pass++) {
		if (pass == 1) {
			for (int c = 0; c < ncols; c++)
				printf("%-*s%s", (int)width[c], cols[c], c + 1 < ncols ? "  " : "\n");
		}
		for (uint32_t r = 0; r < list->via.array.size; r++) {
			const msgpack_object *m = &list->via.array.ptr[r];

			for (int c = 0; c < ncols; c++) {
				const msgpack_object *v = map_get(m, cols[c]);
				msgpack_object key = { .type = MSGPACK_OBJECT_STR };
				size_t len;

				key.via.str.ptr = cols[c];
				key.via.str.size = (uint32_t)strlen(cols[c]);
				if (v)
					cell(&key, v, text, sizeof(text));
				else
					strcpy(text, "");
				len = strlen(text);
				if (pass == 0 && len > width[c])
					width[c] = len;
				if (pass == 1) {
					int right = v && v->type == MSGPACK_OBJECT_STR &&
					    is_amount_key(cols[c], strlen(cols[c]));

					printf(right ? "%*s%s" : "%-*s%s", (int)width[c], text, c + 1 < ncols ? "  " : "\n");
				}
			}
		}
	}
}

/* Prints a result for people: scalars as `key: value`, lists of maps as tables. */
static void
print_human(const msgpack_object *o, const char *prefix)
{
	char text[1024];

	if (o->type != MSGPACK_OBJECT_MAP) {
		cell(NULL, o, text, sizeof(text));
		printf("%s\n", text);
		return;
	}
	for (uint32_t i = 0; i < o->via.map.size; i++) {
		const msgpack_object *k = &o->via.map.ptr[i].key, *v = &o->via.map.ptr[i].val;
		char name[128];

		if (k->type != MSGPACK_OBJECT_STR)
			continue;
		snprintf(name, sizeof(name), "%s%.*s", prefix, (int)k->via.str.size, k->via.str.ptr);
		if (v->type == MSGPACK_OBJECT_ARRAY && v->via.array.size > 0 &&
		    v->via.array.ptr[0].type == MSGPACK_OBJECT_MAP)
			continue; /* tables after the scalars */
		if (v->type == MSGPACK_OBJECT_MAP) {
			char sub[130];

			snprintf(sub, sizeof(sub), "%s.", name);
			print_human(v, sub);
			continue;
		}
		cell(k, v, text, sizeof(text));
		printf("%s: %s\n", name, text);
	}
	for (uint32_t i = 0; i < o->via.map.size; i++) {
		const msgpack_object *k = &o->via.map.ptr[i].key, *v = &o->via.map.ptr[i].val;
		char name[128];

		if (k->type != MSGPACK_OBJECT_STR || v->type != MSGPACK_OBJECT_ARRAY || v->via.array.size == 0 ||
		    v->via.array.ptr[0].type != MSGPACK_OBJECT_MAP)
			continue;
		snprintf(name, sizeof(name), "%.*s", (int)k->via.str.size, k->via.str.ptr);
		printf("\n%s:\n", name);
		print_table(name, v);
	}
}

/* Prints walletd's error map err (NULL: none readable) to stderr as
 * "who: code: message". */
static void
print_error(const char *who, const msgpack_object *err)
{
	const msgpack_object *code = err ? map_get(err, "code") : NULL, *msg = err ? map_get(err, "message") : NULL;

	fprintf(stderr, "%s: %.*s: %.*s\n", who,
	    code && code->type == MSGPACK_OBJECT_STR ? (int)code->via.str.size : 5,
	    code && code->type == MSGPACK_OBJECT_STR ? code->via.str.ptr : "error",
	    msg && msg->type == MSGPACK_OBJECT_STR ? (int)msg->via.str.size : 0,
	    msg && msg->type == MSGPACK_OBJECT_STR ? msg->via.str.ptr : "");
}

/*
 * Prints the response and returns the exit code: 0, or 1 for an error answer
 * (4 for insufficient_balance).
 */
static int
print_response(const msgpack_object *resp)
{
	const msgpack_object *err, *result;

	if (resp->type != MSGPACK_OBJECT_ARRAY || resp->via.array.size != 4)
		die(EXIT_ERROR, "walletd sent something that is not a response");
	err = &resp->via.array.ptr[2];
	result = &resp->via.array.ptr[3];
	if (err->type != MSGPACK_OBJECT_NIL) {
		const msgpack_object *code = map_get(err, "code");
		int c = code && code->type == MSGPACK_OBJECT_STR ? error_find(code->via.str.ptr, code->via.str.size) : -1;

		if (json_output) {
			json_print(stdout, err);
			putchar('\n');
		}
		print_error("walletctl", err);
		return c == E_INSUFFICIENT_BALANCE ? EXIT_INSUFFICIENT : c == E_UNAVAILABLE ? EXIT_UNAVAILABLE : EXIT_ERROR;
	}
	if (json_output) {
		json_print(stdout, result);
		putchar('\n');
	} else {
		print_human(result, "");
	}
	return EXIT_OK;
}

/* ---------------------------------------------------------------------- */
/* Arguments                                                              */
/* ---------------------------------------------------------------------- */

/* One param of a method, from its spec in the table. */
struct pspec {
	char name[32];
	char type;
	int optional;
	int admin_only;           /* `!`: only admin may pass it */
};

/* Short flags for long names: --block 2547 is --blocked-prefix 2547. */
static const char *const flag_aliases[][2] = {
	{ "block", "blocked_prefixes" }, { "allow", "allowed_prefixes" },
};

/* Flags that stand for a name and its value: --promo is --kind promo. */
static const char *const flag_values[][3] = {
	{ "promo", "kind", "promo" },
};

/* A required param another option stands in for: a mobile network's rate has no prefix. */
static const char *const param_instead[][4] = {
	{ "rate.set", "prefix", "--mccmnc", "--mccmnc MCCMNC stands in for PREFIX: a mobile network's rate" },
	{ "rate.delete", "prefix", "--mccmnc", "--mccmnc MCCMNC stands in for PREFIX: a mobile network's rate" },
};

/* Whether param name of method m is left out because argv gives the option that stands in for it. */
static int
param_replaced(int m, const char *name, int argc, char **argv)
{
	for (size_t a = 0; a < sizeof(param_instead) / sizeof(param_instead[0]); a++)
		if (strcmp(method_table[m].name, param_instead[a][0]) == 0 && strcmp(name, param_instead[a][1]) == 0)
			for (int i = 0; i < argc; i++)
				if (strcmp(argv[i], param_instead[a][2]) == 0)
					return 1;
	return 0;
}

/* Whether name (len bytes) is the singular of list param plural: emails/email, prefixes/prefix. */
static int
list_singular(const char *plural, const char *name, size_t len)
{
	size_t n = strlen(plural);

	return strncmp(plural, name, len) == 0 &&
	    ((n == len + 1 && plural[len] == 's') || (n == len + 2 && strcmp(plural + len, "es") == 0));
}

static int
spec_parse(const char *spec, struct pspec *out, int max)
{
	int n = 0;

	while (*spec && n < max) {
		size_t len = strcspn(spec, " ");
		const char *colon = memchr(spec, ':', len);
		struct pspec *p = &out[n++];

		p->optional = spec[0] == '?';
		p->admin_only = spec[p->optional] == '!';
		snprintf(p->name, sizeof(p->name), "%.*s",
		    (int)((colon ? (size_t)(colon - spec) : len) - (size_t)(p->optional + p->admin_only)),
		    spec + p->optional + p->admin_only);
		p->type = colon ? colon[1] : 's';
		spec += len;
		while (*spec == ' ')
			spec++;
	}
	return n;
}

/* Reads a whole file (or stdin for "-") into a NUL-terminated buffer. */
static char *
slurp(const char *path)
{
	FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "r");
	char *buf = NULL;
	size_t len = 0, cap = 0, n;

	if (f == NULL)
		die(EXIT_USAGE, "cannot open %s: %s", path, strerror(errno));
	do {
		if (len + 65536 + 1 > cap && (buf = realloc(buf, cap = cap * 2 + 65536 + 1)) == NULL)
			die(EXIT_ERROR, "out of memory");
		n = fread(buf + len, 1, 65536, f);
		len += n;
	} while (n > 0);
	buf[len] = '\0';
	if (f != stdin)
		fclose(f);
	return buf;
}

/* Splits one CSV line (no quotes needed for rate cards; "..." handled simply). */
static int
csv_split(char *line, char **fields, int max)
{
	int n = 0;
	char *p = line;

	while (n < max) {
		if (*p == '"') {
			char *end = strchr(p + 1, '"');

			fields[n++] = p + 1;
			if (end == NULL)
				break;
			*end = '\0';
			p = end + 1;
			if (*p == ',')
				p++;
			else
				break;
			continue;
		}
		fields[n++] = p;
		p += strcspn(p, ",");
		if (*p != ',')
			break;
		*p++ = '\0';
	}
	return n;
}

/* Keys of CSV rows sent as integers. */
static int
csv_int_key(const char *k)
{
	return strcmp(k, "segments") == 0 || strcmp(k, "txn") == 0 || strcmp(k, "failed_parts") == 0;
}

/* Keys of CSV rows left out when their field is empty (a rate's empty route is a route). */
static int
csv_omit_empty(const char *k)
{
	static const char *const keys[] = { "segments", "txn", "ref", "amount", "refund_ref", "text",
		"description", "reason", "hold", "effective_from", "failed_parts", "error", "on_failure", "failure_fee",
		"prefix", "mccmnc", NULL };

	for (int i = 0; keys[i]; i++)
		if (strcmp(k, keys[i]) == 0)
			return 1;
	return 0;
}

/*
 * Packs a file (or stdin for "-") as a list: pack_line packs one item for
 * each line that is not blank or a # comment, and returns 0 if it packed
 * nothing (a header).
 */
static void
pack_lines(msgpack_packer *pk, const char *path, int (*pack_line)(msgpack_packer *, char *, void *),
    void *arg)
{
	char *data = slurp(path), *save = NULL, *line;
	uint32_t n = 0;
	msgpack_sbuffer body;
	msgpack_packer bpk;

	msgpack_sbuffer_init(&body);
	msgpack_packer_init(&bpk, &body, msgpack_sbuffer_write);
	for (line = strtok_r(data, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		line[strcspn(line, "\r")] = '\0';
		while (*line == ' ' || *line == '\t')
			line++;
		if (*line != '\0' && *line != '#')
			n += (uint32_t)pack_line(&bpk, line, arg);
	}
	msgpack_pack_array(pk, n);
	msgpack_sbuffer_write(pk->data, body.data, body.size);
	msgpack_sbuffer_destroy(&body);
	free(data);
}

/* A CSV file being packed: its header's columns. */
struct csv {
	char *header[32];
	int ncols;
};

/* Packs one CSV line as a map keyed by the header (the first line). */
static int
pack_csv_line(msgpack_packer *pk, char *line, void *arg)
{
	struct csv *csv = arg;
	char *fields[32];
	int n, kept = 0;

	if (csv->ncols == 0) {
		csv->ncols = csv_split(line, csv->header, 32);
		return 0;
	}
	n = csv_split(line, fields, 32);
	if (n > csv->ncols)
		n = csv->ncols;
	for (int i = 0; i < n; i++)
		kept += !(*fields[i] == '\0' && csv_omit_empty(csv->header[i]));
	msgpack_pack_map(pk, (size_t)kept);
	for (int i = 0; i < n; i++) {
		char *end;
		unsigned long long v;

		if (*fields[i] == '\0' && csv_omit_empty(csv->header[i]))
			continue;
		msgpack_pack_str_with_body(pk, csv->header[i], strlen(csv->header[i]));
		errno = 0;
		v = strtoull(fields[i], &end, 10);
		if (csv_int_key(csv->header[i]) && *fields[i] && *end == '\0' && errno == 0)
			msgpack_pack_uint64(pk, v);
		else
			msgpack_pack_str_with_body(pk, fields[i], strlen(fields[i]));
	}
	return 1;
}

/* Packs one line of a numbers file: a number, or `number,count` for a group. */
static int
pack_number_line(msgpack_packer *pk, char *line, void *arg)
{
	char *comma = strchr(line, ',');

	(void)arg;
	if (comma == NULL) {
		msgpack_pack_str_with_body(pk, line, strlen(line));
		return 1;
	}
	*comma = '\0';
	msgpack_pack_map(pk, 2);
	msgpack_pack_str_with_body(pk, "to", 2);
	msgpack_pack_str_with_body(pk, line, strlen(line));
	msgpack_pack_str_with_body(pk, "count", 5);
	msgpack_pack_uint64(pk, strtoull(comma + 1, NULL, 10));
	return 1;
}

/*
 * Builds the params map of method m from args (positional values fill the
 * required params in order; --name value sets any).  *fd_pass receives an
 * opened output file for type F.  Exits 2 on a usage error.
 */
static void
build_params(int m, int argc, char **argv, msgpack_sbuffer *out, int *fd_pass)
{
	struct pspec ps[PARAMS_MAX];
	int np = spec_parse(method_table[m].params, ps, PARAMS_MAX);
	const char *values[PARAMS_MAX][EMAILS_MAX * 4];
	int counts[PARAMS_MAX] = { 0 }, replaced[PARAMS_MAX] = { 0 }, next_positional = 0, entries = 0;
	msgpack_packer pk;

	for (int j = 0; j < np; j++)
		replaced[j] = param_replaced(m, ps[j].name, argc, argv);
	for (int i = 0; i < argc; i++) {
		int p = -1;

		if (strncmp(argv[i], "--", 2) == 0 && argv[i][2]) {
			char name[64];
			size_t len;

			snprintf(name, sizeof(name), "%s", argv[i] + 2);
			for (char *c = name; *c; c++)
				if (*c == '-')
					*c = '_';
			for (size_t a = 0; a < sizeof(flag_aliases) / sizeof(flag_aliases[0]); a++)
				if (strcmp(name, flag_aliases[a][0]) == 0)
					snprintf(name, sizeof(name), "%s", flag_aliases[a][1]);
			for (size_t a = 0; a < sizeof(flag_values) / sizeof(flag_values[0]) && p < 0; a++)
				for (int j = 0; j < np && strcmp(name, flag_values[a][0]) == 0; j++)
					if (strcmp(ps[j].name, flag_values[a][1]) == 0 && counts[j] == 0) {
						p = j;
						values[p][counts[p]++] = flag_values[a][2];
						break;
					}
			if (p >= 0)
				continue;
			len = strlen(name);
			for (int j = 0; j < np && p < 0; j++)
				if (strcmp(ps[j].name, name) == 0 || (ps[j].type == 'l' && list_singular(ps[j].name, name, len)))
					p = j;
			for (int j = 0; j < np && p < 0; j++)
				if (ps[j].type == 'm' && strncmp(name, "no_", 3) == 0 && strcmp(ps[j].name, name + 3) == 0) {
					p = j; /* --no-auto-topup: none */
					if (counts[p])
						die(EXIT_USAGE, "%s given twice", ps[p].name);
					values[p][counts[p]++] = "none";
				}
			if (p < 0)
				die(EXIT_USAGE, "%s takes no option --%s (see: walletctl help %s)",
				    method_table[m].name, argv[i] + 2, method_table[m].name);
			if (strncmp(name, "no_", 3) == 0 && ps[p].type == 'm')
				continue;
			if (ps[p].type == 'b' && (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0)) {
				values[p][counts[p]++] = "true"; /* a bare --force */
				continue;
			}
			if (++i >= argc)
				die(EXIT_USAGE, "--%s needs a value", argv[i - 1] + 2);
		} else {
			while (next_positional < np && (ps[next_positional].optional || counts[next_positional] ||
			    replaced[next_positional]))
				next_positional++;
			if (next_positional >= np)
				die(EXIT_USAGE, "%s: unexpected argument '%s' (see: walletctl help %s)",
				    method_table[m].name, argv[i], method_table[m].name);
			p = next_positional;
		}
		if (counts[p] && ps[p].type != 'l')
			die(EXIT_USAGE, "%s given twice", ps[p].name);
		if (counts[p] >= EMAILS_MAX * 4)
			die(EXIT_USAGE, "too many values for %s", ps[p].name);
		values[p][counts[p]++] = argv[i];
	}
	for (int j = 0; j < np; j++)
		if (!ps[j].optional && counts[j] == 0 && !replaced[j])
			die(EXIT_USAGE, "%s: missing %s (usage: walletctl %s %s)", method_table[m].name,
			    ps[j].name, method_table[m].name, method_table[m].params);
	msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
	for (int j = 0; j < np; j++)
		entries += counts[j] > 0 && ps[j].type != 'F';
	msgpack_pack_map(&pk, (size_t)entries);
	for (int j = 0; j < np; j++) {
		const char *v = counts[j] ? values[j][0] : NULL;

		if (!v)
			continue;
		if (ps[j].type == 'F') {
			*fd_pass = out_open(v);
			continue;
		}
		msgpack_pack_str_with_body(&pk, ps[j].name, strlen(ps[j].name));
		switch (ps[j].type) {
		case 'i': {
			char *end;
			unsigned long long x;

			errno = 0;
			x = strtoull(v, &end, 10);
			if (*v == '\0' || *end != '\0' || errno || *v == '-')
				die(EXIT_USAGE, "%s must be a whole number, not '%s'", ps[j].name, v);
			msgpack_pack_uint64(&pk, x);
			break;
		}
		case 'b':
			if (strcmp(v, "true") != 0 && strcmp(v, "false") != 0)
				die(EXIT_USAGE, "%s takes true or false, not '%s'", ps[j].name, v);
			if (v[0] == 't')
				msgpack_pack_true(&pk);
			else
				msgpack_pack_false(&pk);
			break;
		case 'n':
			if (strcmp(v, "none") == 0)
				msgpack_pack_nil(&pk);
			else
				msgpack_pack_str_with_body(&pk, v, strlen(v));
			break;
		case 'I': {
			char *end;
			unsigned long long x;

			if (strcmp(v, "none") == 0) {
				msgpack_pack_nil(&pk);
				break;
			}
			errno = 0;
			x = strtoull(v, &end, 10);
			if (*v == '\0' || *end != '\0' || errno || *v == '-')
				die(EXIT_USAGE, "%s must be a whole number or none, not '%s'", ps[j].name, v);
			msgpack_pack_uint64(&pk, x);
			break;
		}
		case 'l': {
			const char *items[64];
			int n = 0;
			char *copies[EMAILS_MAX * 4];

			for (int k = 0; k < counts[j]; k++) {
				char *save = NULL;

				copies[k] = strdup(values[j][k]);
				for (char *t = strtok_r(copies[k], ",", &save); t && n < 64; t = strtok_r(NULL, ",", &save))
					items[n++] = t;
			}
			if (n == 1 && strcmp(items[0], "none") == 0)
				n = 0;
			msgpack_pack_array(&pk, (size_t)n);
			for (int k = 0; k < n; k++)
				msgpack_pack_str_with_body(&pk, items[k], strlen(items[k]));
			for (int k = 0; k < counts[j]; k++)
				free(copies[k]);
			break;
		}
		case 'm': {
			char *copy = strdup(v), *save = NULL;
			size_t n = 0;

			if (strcmp(v, "none") == 0) {
				msgpack_pack_nil(&pk);
				free(copy);
				break;
			}
			for (const char *c = v; *c; c++)
				n += *c == ',';
			msgpack_pack_map(&pk, n + 1);
			for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save), n--) {
				char *eq = strchr(t, '=');

				if (eq == NULL || eq == t)
					die(EXIT_USAGE, "%s takes key=value pairs separated by commas, not '%s'", ps[j].name, t);
				*eq++ = '\0';
				msgpack_pack_str_with_body(&pk, t, strlen(t));
				if (*eq && strspn(eq, "0123456789") == strlen(eq)) /* a count, or whole units */
					msgpack_pack_uint64(&pk, strtoull(eq, NULL, 10));
				else
					msgpack_pack_str_with_body(&pk, eq, strlen(eq));
			}
			if (n != (size_t)-1)
				die(EXIT_USAGE, "%s: an empty pair in '%s'", ps[j].name, v);
			free(copy);
			break;
		}
		case 'c': {
			struct csv csv = { .ncols = 0 };

			pack_lines(&pk, v, pack_csv_line, &csv);
			break;
		}
		case 'f':
			pack_lines(&pk, v, pack_number_line, NULL);
			break;
		default:
			msgpack_pack_str_with_body(&pk, v, strlen(v));
		}
	}
}

/* ---------------------------------------------------------------------- */
/* Commands                                                               */
/* ---------------------------------------------------------------------- */

/* The edit distance of a and b (insertions, deletions, substitutions), up to 63 bytes each. */
static int
edit_distance(const char *a, const char *b)
{
	int row[64], n = (int)strlen(b), m = (int)strlen(a);

	if (n > 63 || m > 63)
		return 64;
	for (int j = 0; j <= n; j++)
		row[j] = j;
	for (int i = 1; i <= m; i++) {
		int diag = row[0];

		row[0] = i;
		for (int j = 1; j <= n; j++) {
			int up = row[j], best = diag + (a[i - 1] != b[j - 1]);

			if (up + 1 < best)
				best = up + 1;
			if (row[j - 1] + 1 < best)
				best = row[j - 1] + 1;
			diag = up;
			row[j] = best;
		}
	}
	return row[n];
}

/*
 * Exits 2 for a command that is no method: word, or word next ("wallet
 * creat"), with the nearest command when one is near ("did you mean
 * wallet create?").
 */
static void __attribute__((noreturn))
no_command(const char *word, const char *next)
{
	char typed[128], best_name[64] = "", group[256] = "";
	int best = 4;

	snprintf(typed, sizeof(typed), "%s%s%s", word, next ? "." : "", next ? next : "");
	for (int m = 0; m < M__COUNT; m++) {
		const char *name = method_table[m].name;
		int d = edit_distance(strchr(name, '.') && next ? typed : word, name);

		if (d < best) {
			best = d;
			snprintf(best_name, sizeof(best_name), "%s", name);
		}
	}
	if (best_name[0]) {
		char *dot = strchr(best_name, '.');

		if (dot)
			*dot = ' ';
		die(EXIT_USAGE, "no command '%s%s%s': did you mean %s? (see: walletctl help)", word,
		    next && dot ? " " : "", next && dot ? next : "", best_name);
	}
	for (int m = 0; m < M__COUNT; m++) { /* "wallet": what may follow it */
		const char *name = method_table[m].name;
		size_t n = strlen(word), len = strlen(group);

		if (strncmp(name, word, n) == 0 && name[n] == '.')
			snprintf(group + len, sizeof(group) - len, "%s%s", len ? ", " : "", name + n + 1);
	}
	if (group[0])
		die(EXIT_USAGE, "no command '%s%s%s'; %s takes: %s (see: walletctl help)", word, next ? " " : "",
		    next ? next : "", word, group);
	die(EXIT_USAGE, "no command '%s' (see: walletctl help)", word);
}

/* The command-line name of method m: "rate.import" -> "rate import". */
static const char *
command_name(int m)
{
	static char buf[64];
	char *dot;

	snprintf(buf, sizeof(buf), "%s", method_table[m].name);
	if ((dot = strchr(buf, '.')) != NULL)
		*dot = ' ';
	return buf;
}

/* The roles that may call method m, as "admin, client, staff" (into buf). */
static const char *
roles_text(int m, char *buf, size_t size)
{
	size_t n = 0;

	buf[0] = '\0';
	for (int r = 0; r < ROLES_COUNT; r++)
		if (method_table[m].roles & (1u << r))
			n += (size_t)snprintf(buf + n, size - n, "%s%s", n ? ", " : "", role_names[r]);
	return buf;
}

/* Method m's params that only admin may pass, as "credit_limit, daily_limit" (into buf; "" if none). */
static const char *
admin_params_text(int m, char *buf, size_t size)
{
	struct pspec ps[PARAMS_MAX];
	int np = spec_parse(method_table[m].params, ps, PARAMS_MAX);
	size_t n = 0;

	buf[0] = '\0';
	for (int i = 0; i < np; i++)
		if (ps[i].admin_only)
			n += (size_t)snprintf(buf + n, size - n, "%s`%s`", n ? ", " : "", ps[i].name);
	return buf;
}

/*
 * walletctl help roles: who may call what, as a Markdown table (the
 * README's is this output), from the method table.
 */
static void
help_roles(void)
{
	char admin_params[256];

	printf("| method |");
	for (int r = 0; r < ROLES_COUNT; r++)
		printf(" %s |", role_names[r]);
	printf("\n|---|");
	for (int r = 0; r < ROLES_COUNT; r++)
		printf("---|");
	putchar('\n');
	for (int m = 0; m < M__COUNT; m++) {
		printf("| `%s` |", method_table[m].name);
		admin_params_text(m, admin_params, sizeof(admin_params));
		for (int r = 0; r < ROLES_COUNT; r++) {
			if (!(method_table[m].roles & (1u << r)))
				printf(" |");
			else if (r > 0 && admin_params[0])
				printf(" yes, but not %s |", admin_params);
			else
				printf(" yes |");
		}
		putchar('\n');
	}
}

static void
help_one(int m)
{
	struct pspec ps[PARAMS_MAX];
	int np = spec_parse(method_table[m].params, ps, PARAMS_MAX);
	char roles[64], admin_params[256];

	printf("walletctl %s", command_name(m));
	for (int i = 0; i < np; i++) {
		const char *type = ps[i].type == 'a' ? "AMOUNT" : ps[i].type == 'n' ? "AMOUNT|none" :
		    ps[i].type == 'b' ? "true|false" :
		    ps[i].type == 'i' ? "N" : ps[i].type == 'l' ? "A,B,..." : ps[i].type == 'c' ? "FILE.csv" :
		    ps[i].type == 'f' ? "FILE|-" : ps[i].type == 'F' ? "FILE" : NULL;
		char upper[32];

		for (size_t k = 0; k <= strlen(ps[i].name); k++)
			upper[k] = (char)(ps[i].name[k] >= 'a' && ps[i].name[k] <= 'z' ? ps[i].name[k] - 32 : ps[i].name[k]);
		if (ps[i].optional)
			printf(" [--%s %s]", ps[i].name, type ? type : upper);
		else
			printf(" %s", type && ps[i].type != 'i' && ps[i].type != 'a' ? type : upper);
	}
	roles_text(m, roles, sizeof(roles));
	admin_params_text(m, admin_params, sizeof(admin_params));
	printf("\n    %s\n    method %s; roles: %s%s%s%s.\n", method_table[m].summary, method_table[m].name,
	    roles, admin_params[0] ? " (only admin may pass " : "", admin_params, admin_params[0] ? ")" : "");
	for (size_t a = 0; a < sizeof(param_instead) / sizeof(param_instead[0]); a++)
		if (strcmp(method_table[m].name, param_instead[a][0]) == 0)
			printf("    %s.\n", param_instead[a][3]);
	if (method_table[m].flags & MF_WRITE)
		printf("    It changes the store.\n");
}

static void
help_all(FILE *f)
{
	fprintf(f,
	    "usage: walletctl [-s SOCKET] [--json] COMMAND [ARGS]\n"
	    "       walletctl help [COMMAND]\n"
	    "       walletctl -V             (the version)\n"
	    "       walletctl help roles     (who may call what)\n\n"
	    "Required arguments may be given in order or as --name VALUE; '_' in a name may be '-'.\n"
	    "Socket: -s, else $WALLETD_SOCKET, else ./var/walletd.sock, else /run/walletd/walletd.sock.\n"
	    "Exit codes: 0 success, 1 error answer, 2 usage, 3 cannot connect, 4 insufficient_balance,\n"
	    "5 unavailable (no leader yet: retry, with the same ref).\n\n"
	    "Commands:\n");
	for (int m = 0; m < M__COUNT; m++)
		fprintf(f, "  %-16s %s\n", command_name(m), method_table[m].summary);
	fprintf(f, "  %-16s %s\n", "rate export", "Write every rate as CSV (plan,channel,prefix,route,price,currency,...).");
	fprintf(f, "  %-16s %s\n", "verify-statement", "Check a statement or export CSV's hash chain and signed "
	    "heads, offline (FILE --key PUBKEY).");
	fprintf(f, "  %-16s %s\n", "bench", "Load generator with a self-check (walletctl help bench).");
}

/* A stats mean, or 0. */
static double
stat_f64(const msgpack_object *stats, const char *name)
{
	const msgpack_object *o = map_get(stats, name);

	return o && o->type == MSGPACK_OBJECT_FLOAT64 ? o->via.f64 : 0.0;
}

/* ---- Prometheus ---- */

/* Prints v plainly: 0.00005, 2.5, 64 (never an exponent). */
static void
prom_number(double v)
{
	char buf[64];
	size_t n = (size_t)snprintf(buf, sizeof(buf), "%.6f", v);

	while (n > 1 && buf[n - 1] == '0')
		buf[--n] = '\0';
	if (buf[n - 1] == '.')
		buf[--n] = '\0';
	fputs(buf, stdout);
}

/* Prints the HELP and TYPE lines of metric walletd_NAME. */
static void
prom_family(const char *name, const char *type, const char *help)
{
	printf("# HELP walletd_%s %s\n# TYPE walletd_%s %s\n", name, help, name, type);
}

/* Prints one sample of a metric without labels. */
static void
prom_value(const char *name, const char *type, const char *help, double v)
{
	prom_family(name, type, help);
	printf("walletd_%s ", name);
	prom_number(v);
	putchar('\n');
}

/*
 * Prints stats' histogram h ({le, counts, sum, count}) as walletd_NAME,
 * buckets made cumulative, bounds and sum multiplied by scale.
 */
static void
prom_histogram(const char *name, const char *help, const msgpack_object *h, double scale)
{
	const msgpack_object *le = map_get(h, "le"), *counts = map_get(h, "counts");
	uint64_t cumulative = 0;

	if (le == NULL || counts == NULL || le->type != MSGPACK_OBJECT_ARRAY ||
	    counts->type != MSGPACK_OBJECT_ARRAY || counts->via.array.size != le->via.array.size + 1)
		return;
	prom_family(name, "histogram", help);
	for (uint32_t i = 0; i < counts->via.array.size; i++) {
		cumulative += counts->via.array.ptr[i].via.u64;
		printf("walletd_%s_bucket{le=\"", name);
		if (i < le->via.array.size)
			prom_number((double)le->via.array.ptr[i].via.u64 * scale);
		else
			fputs("+Inf", stdout);
		printf("\"} %" PRIu64 "\n", cumulative);
	}
	printf("walletd_%s_sum ", name);
	prom_number((double)map_u64(h, "sum") * scale);
	printf("\nwalletd_%s_count %" PRIu64 "\n", name, map_u64(h, "count"));
}

/* The scalar metrics: name, type, help, and where stats has them (its map, NULL = the top; the key). */
static const struct prom_scalar {
	const char *name, *type, *help, *map, *key;
	double scale;
} prom_scalars[] = {
	{ "commits_total", "counter", "Durable commits.",
	  NULL, "commits", 1 },
	{ "committed_requests_total", "counter", "Requests in durable commits.",
	  NULL, "committed_requests", 1 },
	{ "failed_commits_total", "counter", "Commits that failed (every answer of the batch said so).",
	  "store", "failed_commits", 1 },
	{ "reads_off_loop_total", "counter", "Reads moved off the event loop past its budget.",
	  NULL, "reads_off_loop", 1 },
	{ "connections", "gauge", "Open client connections.",
	  "connections", "open", 1 },
	{ "connections_accepted_total", "counter", "Connections accepted.",
	  "connections", "total", 1 },
	{ "connections_refused_total", "counter", "Connections refused (too_many_connections).",
	  "connections", "refused", 1 },
	{ "connections_cut_off_total", "counter", "Connections cut off for leaving max_output unread.",
	  "connections", "cut_off", 1 },
	{ "queued_requests", "gauge", "Requests read and not yet answered.",
	  "connections", "queued_requests", 1 },
	{ "unread_bytes", "gauge", "Answers written and not yet read by their clients.",
	  "connections", "unread_bytes", 1 },
	{ "store_map_size_bytes", "gauge", "The LMDB map reserved.",
	  "store", "map_size", 1 },
	{ "store_map_used_bytes", "gauge", "The LMDB map in use (the store's size).",
	  "store", "map_used", 1 },
	{ "store_map_max_bytes", "gauge", "map_size_max: the map grows up to this.",
	  "store", "map_size_max", 1 },
	{ "store_map_grows_total", "counter", "Times the map grew.",
	  "store", "map_grows", 1 },
	{ "store_oldest_read_seconds", "gauge", "Age of the oldest backup or verify read (0: none).",
	  "store", "oldest_read_ms", 0.001 },
	{ "alerts_pending", "gauge", "Notifications whose e-mail is still to be sent.",
	  NULL, "alerts_pending", 1 },
	{ "webhooks_pending", "gauge", "Events still to be delivered to webhook_url.",
	  NULL, "webhooks_pending", 1 },
	{ "uptime_seconds", "gauge", "Seconds since walletd started.",
	  NULL, "uptime", 1 },
	{ "journal_bytes_total", "counter", "Bytes of commit records appended to the journal.",
	  "journal", "journal_bytes", 1 },
	{ "checkpoints_total", "counter", "Checkpoints made durable (LMDB synced, the journal before them reusable).",
	  "journal", "checkpoints", 1 },
	{ "checkpoint_age_seconds", "gauge", "Age of the last durable checkpoint.",
	  "journal", "checkpoint_age_ms", 0.001 },
	{ "journal_replayed_at_start", "gauge", "Journal records applied again when walletd started.",
	  "journal", "replayed_at_start", 1 },
};

/*
 * walletctl stats --prometheus: stats in the Prometheus text exposition
 * format (for node_exporter's textfile collector, or a scrape endpoint).
 * Every method and code is listed, with 0 until it is seen.
 */
static int
cmd_stats_prometheus(void)
{
	static const char *const roles[] = { "single", "leader", "follower", "catching_up", "diverged" };
	const msgpack_object *st, *requests, *errors, *histos, *repl;
	msgpack_unpacked resp;

	call("stats", NULL, -1, &resp);
	if ((st = ok_result(&resp.data)) == NULL)
		return print_response(&resp.data);
	requests = map_get(st, "requests");
	errors = map_get(st, "errors");
	histos = map_get(st, "histograms");

	prom_family("requests_total", "counter", "Requests answered, by method.");
	for (int m = 0; m < M__COUNT; m++)
		printf("walletd_requests_total{method=\"%s\"} %" PRIu64 "\n", method_table[m].name,
		    map_u64(map_get(requests, method_table[m].name), "calls"));
	prom_family("request_errors_total", "counter", "Requests answered with an error, by method.");
	for (int m = 0; m < M__COUNT; m++)
		printf("walletd_request_errors_total{method=\"%s\"} %" PRIu64 "\n", method_table[m].name,
		    map_u64(map_get(requests, method_table[m].name), "errors"));
	prom_family("errors_total", "counter", "Error answers, by code.");
	for (int e = 1; e < E__COUNT; e++)
		printf("walletd_errors_total{code=\"%s\"} %" PRIu64 "\n", error_name(e), map_u64(errors, error_name(e)));
	prom_histogram("request_duration_seconds", "Time from a request's frame to its answer.",
	    map_get(histos, "request_latency_us"), 1e-6);
	prom_histogram("commit_batch_size", "Requests in one durable commit (a charge.batch counts once).",
	    map_get(histos, "commit_batch_size"), 1);
	for (size_t i = 0; i < sizeof(prom_scalars) / sizeof(prom_scalars[0]); i++) {
		const struct prom_scalar *m = &prom_scalars[i];

		prom_value(m->name, m->type, m->help,
		    (double)map_u64(m->map ? map_get(st, m->map) : st, m->key) * m->scale);
	}
	repl = map_get(st, "replication");
	prom_family("replication_role", "gauge", "1 for this node's role: single (no replication), leader, "
	    "follower, catching_up or diverged.");
	for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++) {
		const msgpack_object *role = map_get(repl, "role");
		int is = role && role->type == MSGPACK_OBJECT_STR ?
		    role->via.str.size == strlen(roles[i]) && memcmp(role->via.str.ptr, roles[i], role->via.str.size) == 0 :
		    i == 0;

		printf("walletd_replication_role{role=\"%s\"} %d\n", roles[i], is);
	}
	if (repl != NULL && repl->type == MSGPACK_OBJECT_MAP) {
		const msgpack_object *role = map_get(repl, "role");

		prom_value("replication_leader", "gauge", "1 while this node leads its replicated group.",
		    role && role->type == MSGPACK_OBJECT_STR && role->via.str.size == 6 &&
		    memcmp(role->via.str.ptr, "leader", 6) == 0);
		prom_value("replication_records_published_total", "counter", "Commit records this node published.",
		    (double)map_u64(repl, "records_published"));
		prom_value("replication_records_applied_total", "counter", "Other nodes' records this node applied.",
		    (double)map_u64(repl, "records_applied"));
		prom_value("replication_forwarded_total", "counter", "Writes other nodes forwarded to this one.",
		    (double)map_u64(repl, "writes_forwarded_here"));
		prom_value("replication_fenced_total", "counter", "Records the stream refused (another node's turn).",
		    (double)map_u64(repl, "fenced"));
		prom_value("replication_lag_records", "gauge", "Stream records this node has yet to apply.",
		    (double)map_u64(repl, "lag_records"));
		prom_histogram("replication_publish_seconds", "Time for the stream to acknowledge a record.",
		    map_get(repl, "publish_us"), 1e-6);
	}
	msgpack_unpacked_destroy(&resp);
	return EXIT_OK;
}

static void
pk_kv(msgpack_packer *pk, const char *k, const char *v)
{
	msgpack_pack_str_with_body(pk, k, strlen(k));
	msgpack_pack_str_with_body(pk, v, strlen(v));
}

/* Whether column col of an export or statement holds a number (amounts are decimal strings, "-" first when negative). */
static int
csv_number(const char *col)
{
	static const char *const numbers[] = { "id", "amount", "balance_after", "segments", "price", "refund_of",
		"counterpart", "paid_amount", "opening_balance" };

	for (size_t i = 0; i < sizeof(numbers) / sizeof(numbers[0]); i++)
		if (strcmp(col, numbers[i]) == 0)
			return 1;
	return 0;
}

/*
 * Writes one CSV field of v (a string, an integer, or nil as empty), RFC
 * 4180 quoted when it must be.  Text (column col not a number) that a
 * spreadsheet would run as a formula, beginning with =, +, -, @, a tab or
 * a carriage return, is written after a ' (which the spreadsheet hides);
 * so is text beginning with ', so that a reader drops one ' of any text.
 */
static void
csv_field(const msgpack_object *v, const char *col)
{
	if (v == NULL || v->type == MSGPACK_OBJECT_NIL)
		return;
	if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
		printf("%" PRIu64, v->via.u64);
	} else if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
		printf("%" PRId64, v->via.i64);
	} else if (v->type == MSGPACK_OBJECT_STR) {
		const char *p = v->via.str.ptr;
		size_t n = v->via.str.size;
		const char *quote = n && p[0] && strchr("=+-@\t\r'", p[0]) && !csv_number(col) ? "'" : "";

		if (strcspn(p, ",\"\r\n") >= n && memchr(p, '\0', n) == NULL) {
			fputs(quote, stdout);
			fwrite(p, 1, n, stdout);
			return;
		}
		printf("\"%s", quote);
		for (size_t i = 0; i < n; i++) {
			if (p[i] == '"')
				putchar('"');
			putchar(p[i]);
		}
		putchar('"');
	}
}

/* ---- Signed heads in CSV (README: The ledger's hash chain) ---- */

/* A wallet's signed head as a CSV trailer row gives it, after "#head". */
enum { H_WALLET, H_ID, H_HASH, H_AT, H_SIGNATURE, H_BEFORE, H__COUNT };
static const char *const head_fields[H__COUNT] = { "wallet", "id", "hash", "at", "signature", "before" };

struct head {
	char *f[H__COUNT];
	unsigned char last[32]; /* verify-statement: the hash of the wallet's last row so far */
	char *last_id;
	unsigned rows;
};

static void *heads; /* a tsearch tree of struct head by wallet */

static int
head_compare(const void *a, const void *b)
{
	return strcmp(((const struct head *)a)->f[H_WALLET], ((const struct head *)b)->f[H_WALLET]);
}

/* The head of wallet, added (its fields NULL) if new. */
static struct head *
head_find(const char *wallet)
{
	struct head key = { .f[H_WALLET] = (char *)wallet }, *h, **node;

	if ((node = tfind(&key, &heads, head_compare)) != NULL)
		return *node;
	if ((h = calloc(1, sizeof(*h))) == NULL || (h->f[H_WALLET] = strdup(wallet)) == NULL ||
	    tsearch(h, &heads, head_compare) == NULL)
		die(EXIT_ERROR, "out of memory");
	return h;
}

/* A string or integer msgpack value as a new string ("" otherwise). */
static char *
value_text(const msgpack_object *v)
{
	char *out = NULL;

	if (v && v->type == MSGPACK_OBJECT_STR)
		out = strndup(v->via.str.ptr, v->via.str.size);
	else if (v && v->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
		if (asprintf(&out, "%" PRIu64, v->via.u64) < 0)
			out = NULL;
	} else {
		out = strdup("");
	}
	if (out == NULL)
		die(EXIT_ERROR, "out of memory");
	return out;
}

/* Takes a signed head from an answer: a later page's head of a wallet replaces all but its before. */
static void
head_take(const msgpack_object *o)
{
	char *wallet;
	struct head *h;

	if (o == NULL || o->type != MSGPACK_OBJECT_MAP)
		return;
	wallet = value_text(map_get(o, "wallet"));
	h = head_find(wallet);
	free(wallet);
	for (int i = H_ID; i < H__COUNT; i++)
		if (i != H_BEFORE || h->f[i] == NULL) {
			free(h->f[i]);
			h->f[i] = value_text(map_get(o, head_fields[i]));
		}
}

/* twalk: writes one head as a trailer row. */
static void
head_row(const void *node, VISIT which, int depth)
{
	const struct head *h = *(struct head *const *)node;

	(void)depth;
	if (which != postorder && which != leaf)
		return;
	fputs("#head", stdout);
	for (int i = 0; i < H__COUNT; i++) {
		msgpack_object v = { .type = MSGPACK_OBJECT_STR,
			.via.str = { (uint32_t)strlen(h->f[i]), h->f[i] } };

		putchar(',');
		csv_field(&v, "");
	}
	fputs("\r\n", stdout);
}

/* Writes the signed heads taken, a row each in wallet order: the CSV's trailer. */
static void
heads_write(void)
{
	twalk(heads, head_row);
}

/*
 * export --csv [--after-id N]: every transaction after N, in id order, as
 * RFC 4180 CSV (a header row, CRLF line ends, amounts as plain decimals),
 * paging through export until the log's end, then the signed head of each
 * wallet in it (heads_write).  To resume, pass the last row's id as
 * --after-id.
 */
static int
cmd_export_csv(int argc, char **argv)
{
	static const char *const cols[] = { "id", "created_at", "wallet", "type", "amount", "balance_after",
		"currency", "description", "ref", "channel", "to", "route", "segments", "price", "price_currency",
		"refund_of", "counterpart", "hold", "provider", "provider_ref", "paid_amount", "paid_currency", "hash" };
	const size_t ncols = sizeof(cols) / sizeof(cols[0]);
	uint64_t after = 0;

	for (int i = 0; i < argc; i++) {
		char *end;

		if (strcmp(argv[i], "--csv") == 0)
			continue;
		if ((strcmp(argv[i], "--after-id") == 0 || strcmp(argv[i], "--after_id") == 0) && i + 1 < argc) {
			after = strtoull(argv[++i], &end, 10);
			if (*end == '\0')
				continue;
		}
		die(EXIT_USAGE, "usage: walletctl export --csv [--after-id N]");
	}
	for (size_t k = 0; k < ncols; k++)
		printf("%s%s", cols[k], k + 1 < ncols ? "," : "\r\n");
	for (;;) {
		msgpack_sbuffer sb;
		msgpack_packer pk;
		msgpack_unpacked resp;
		const msgpack_object *result, *txns, *last, *last_heads;

		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		msgpack_pack_map(&pk, 2);
		msgpack_pack_str_with_body(&pk, "after_id", 8);
		msgpack_pack_uint64(&pk, after);
		msgpack_pack_str_with_body(&pk, "limit", 5);
		msgpack_pack_uint64(&pk, EXPORT_LIMIT_MAX);
		call("export", &sb, -1, &resp);
		msgpack_sbuffer_destroy(&sb);
		if ((result = ok_result(&resp.data)) == NULL)
			return print_response(&resp.data);
		txns = map_get(result, "transactions");
		last = map_get(result, "last_id");
		if (txns == NULL || txns->type != MSGPACK_OBJECT_ARRAY || txns->via.array.size == 0 ||
		    last == NULL || last->type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
			msgpack_unpacked_destroy(&resp);
			break;
		}
		for (uint32_t i = 0; i < txns->via.array.size; i++)
			for (size_t k = 0; k < ncols; k++) {
				csv_field(map_get(&txns->via.array.ptr[i], cols[k]), cols[k]);
				fputs(k + 1 < ncols ? "," : "\r\n", stdout);
			}
		last_heads = map_get(result, "heads");
		for (uint32_t i = 0; last_heads && last_heads->type == MSGPACK_OBJECT_ARRAY && i < last_heads->via.array.size; i++)
			head_take(&last_heads->via.array.ptr[i]);
		after = last->via.u64;
		msgpack_unpacked_destroy(&resp);
	}
	heads_write();
	if (fflush(stdout) != 0)
		die(EXIT_ERROR, "cannot write the CSV: %s", strerror(errno));
	return EXIT_OK;
}

/*
 * Reads the RFC 4180 record at *p in place: fields NUL-terminated, quotes
 * and "" undone, at most max kept.  Returns how many, 0 at the end.
 */
static int
csv_record(char **p, char **fields, int max)
{
	char *s = *p, *w, c;
	int n = 0;

	if (*s == '\0')
		return 0;
	do {
		w = s;
		if (n < max)
			fields[n++] = w;
		if (*s == '"')
			for (s++; *s && (*s != '"' || s[1] == '"'); s++)
				*w++ = *s == '"' ? *s++ : *s;
		s += *s == '"';
		while (*s && *s != ',' && *s != '\r' && *s != '\n')
			*w++ = *s++;
		c = *s;
		*w = '\0';
		s += c == '\r' && s[1] == '\n' ? 2 : c != '\0';
	} while (c == ',');
	*p = s;
	return n;
}

/* Writes f[n] as netstrings into buf (cap bytes): their length, or 0 if over cap. */
static size_t
netstrings(const char *const *f, int n, unsigned char *buf, size_t cap)
{
	size_t len = 0;

	for (int i = 0; i < n; i++) {
		int k = snprintf((char *)buf + len, cap - len, "%zu:", strlen(f[i]));

		if (k < 0 || strlen(f[i]) + (size_t)k + 1 >= cap - len)
			return 0;
		len += (size_t)k;
		memcpy(buf + len, f[i], strlen(f[i]));
		len += strlen(f[i]);
		buf[len++] = ',';
	}
	return len;
}

/* Reads 2n hex digits of text into out[n]: 0, or -1. */
static int
hex_read(const char *text, unsigned char *out, size_t n)
{
	if (strlen(text) != 2 * n)
		return -1;
	for (size_t i = 0; i < n; i++)
		if (sscanf(text + 2 * i, "%2hhx", &out[i]) != 1 || !isxdigit((unsigned char)text[2 * i + 1]))
			return -1;
	return 0;
}

/* Whether head h's signature verifies under key (Ed25519). */
static int
head_signed(const struct head *h, EVP_PKEY *key)
{
	const char *f[4] = { h->f[H_WALLET], h->f[H_ID], h->f[H_HASH], h->f[H_AT] };
	unsigned char buf[512], sig[64];
	size_t n = netstrings(f, 4, buf, sizeof(buf));
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	int ok = n && hex_read(h->f[H_SIGNATURE], sig, sizeof(sig)) == 0 && ctx &&
	    EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, key) == 1 && EVP_DigestVerify(ctx, sig, sizeof(sig), buf, n) == 1;

	EVP_MD_CTX_free(ctx);
	return ok;
}

static EVP_PKEY *verify_key;
static int verify_failed;

/* twalk: checks that a head ends its wallet's rows and is signed. */
static void
head_check(const void *node, VISIT which, int depth)
{
	const struct head *h = *(struct head *const *)node;
	unsigned char hash[32];

	(void)depth;
	if (which != postorder && which != leaf)
		return;
	if (hex_read(h->f[H_HASH] ? h->f[H_HASH] : "", hash, 32) != 0 || memcmp(hash, h->last, 32) != 0 ||
	    (h->rows && strcmp(h->last_id, h->f[H_ID]) != 0)) {
		fprintf(stderr, "walletctl: the rows of wallet %s do not end at its signed head (transaction %s): "
		    "a row was removed, added or changed after the last one that verified\n", h->f[H_WALLET],
		    h->f[H_ID] ? h->f[H_ID] : "?");
		verify_failed = 1;
	} else if (!head_signed(h, verify_key)) {
		fprintf(stderr, "walletctl: the head of wallet %s (transaction %s) is not signed by this key\n",
		    h->f[H_WALLET], h->f[H_ID]);
		verify_failed = 1;
	}
}

/* Drops the ' csv_field wrote before text. */
static const char *
csv_text(const char *v)
{
	return v[0] == '\'' ? v + 1 : v;
}

/*
 * verify-statement FILE --key PUBKEY: recomputes the hash chain of a
 * statement or export CSV (walletctl statement --csv, export --csv) row by
 * row from each wallet's signed head's before, and checks that each
 * wallet's rows end at its head and that the head is signed by PUBKEY (hex,
 * as ping answers ledger_key).  Offline.  Exit 0, or 1 naming the first
 * row that does not verify (a spreadsheet's row number: the header is 1).
 */
static int
cmd_verify_statement(int argc, char **argv)
{
	static const char *const names[CHAIN_FIELD_COUNT][2] = CHAIN_COLUMNS;
	const char *path = NULL, *key_hex = NULL;
	int col[CHAIN_FIELD_COUNT], hash_col = -1, ncols, nheads = 0, row;
	char *data, *copy, *p, *fields[64], *single = NULL;
	unsigned char raw[32];
	unsigned rows = 0;

	for (int i = 0; i < argc; i++) {
		if (strcmp(argv[i], "--key") == 0 && i + 1 < argc)
			key_hex = argv[++i];
		else if (path == NULL)
			path = argv[i];
		else
			path = NULL, i = argc;
	}
	if (path == NULL || key_hex == NULL)
		die(EXIT_USAGE, "usage: walletctl verify-statement FILE.csv --key PUBKEY");
	if (hex_read(key_hex, raw, 32) != 0 ||
	    (verify_key = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, raw, 32)) == NULL)
		die(EXIT_USAGE, "--key takes the 64 hex digits of an Ed25519 public key (ping's ledger_key)");
	data = slurp(path);
	if ((copy = strdup(data)) == NULL)
		die(EXIT_ERROR, "out of memory");
	/* The heads first: the trailer starts each wallet's chain. */
	for (p = copy; (ncols = csv_record(&p, fields, 64)) > 0;)
		if (strcmp(fields[0], "#head") == 0 && ncols == 1 + H__COUNT) {
			struct head *h = head_find(fields[1]);

			for (int i = H_ID; i < H__COUNT; i++)
				if ((h->f[i] = strdup(fields[1 + i])) == NULL)
					die(EXIT_ERROR, "out of memory");
			if (hex_read(h->f[H_BEFORE], h->last, 32) != 0)
				die(EXIT_ERROR, "%s: the head of %s has no before hash", path, h->f[H_WALLET]);
			single = h->f[H_WALLET];
			nheads++;
		}
	p = data;
	ncols = csv_record(&p, fields, 64);
	for (int k = 0; k < CHAIN_FIELD_COUNT; k++) {
		col[k] = -1;
		for (int i = 0; i < ncols; i++)
			if (strcmp(fields[i], names[k][0]) == 0 || strcmp(fields[i], names[k][1]) == 0)
				col[k] = i;
		if (col[k] < 0 && k != 1)
			die(EXIT_ERROR, "%s: no %s column: not a statement or export CSV", path, names[k][0]);
	}
	for (int i = 0; i < ncols; i++)
		if (strcmp(fields[i], "hash") == 0)
			hash_col = i;
	if (hash_col < 0 || nheads == 0 || (col[1] < 0 && nheads != 1))
		die(EXIT_ERROR, "%s: no hash column or no signed head: write it again with this walletctl", path);
	for (row = 2; (ncols = csv_record(&p, fields, 64)) > 0; row++) {
		const char *v[CHAIN_FIELD_COUNT];
		unsigned char buf[8192], hash[32], stored[32];
		struct head *h;
		size_t n;

		if (fields[0][0] == '#' || ncols <= hash_col || fields[col[0]][0] == '\0')
			continue; /* a head, a blank line, an opening or closing balance */
		for (int k = 0; k < CHAIN_FIELD_COUNT; k++)
			v[k] = col[k] < 0 ? single : csv_text(fields[col[k]]);
		if ((h = head_find(v[1]))->f[H_ID] == NULL) {
			fprintf(stderr, "walletctl: row %d (transaction %s): wallet %s has no signed head in the file\n",
			    row, v[0], v[1]);
			return EXIT_ERROR;
		}
		memcpy(buf, h->last, 32);
		n = netstrings(v, CHAIN_FIELD_COUNT, buf + 32, sizeof(buf) - 32);
		if (n == 0 || EVP_Digest(buf, 32 + n, hash, NULL, EVP_sha256(), NULL) != 1 ||
		    hex_read(fields[hash_col], stored, 32) != 0 || memcmp(hash, stored, 32) != 0) {
			fprintf(stderr, "walletctl: row %d (transaction %s of %s) does not verify: it, or a row of its "
			    "wallet before it, was changed, removed or moved\n", row, v[0], v[1]);
			return EXIT_ERROR;
		}
		memcpy(h->last, hash, 32);
		h->last_id = fields[col[0]];
		h->rows++;
		rows++;
	}
	twalk(heads, head_check);
	if (verify_failed)
		return EXIT_ERROR;
	printf("verified: %u transactions of %d wallets, each chain ending at a head signed by %s\n", rows, nheads,
	    key_hex);
	return EXIT_OK;
}

/* Copies string v into buf (size bytes, cut to fit), "" when v is not a string. */
static void
str_copy(char *buf, size_t size, const msgpack_object *v)
{
	int n = v && v->type == MSGPACK_OBJECT_STR ? (int)v->via.str.size : 0;

	snprintf(buf, size, "%.*s", n, n ? v->via.str.ptr : "");
}

/* Asks for one page of wallet's statement [from, until) after after_id (0: the first), limit rows (0: the default). */
static void
statement_page(const char *wallet, const char *from, const char *until, uint64_t after, uint64_t limit,
    msgpack_unpacked *resp)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;

	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 1 + (from != NULL) + (until != NULL) + (after != 0) + (limit != 0));
	pk_kv(&pk, "wallet", wallet);
	if (from)
		pk_kv(&pk, "from", from);
	if (until)
		pk_kv(&pk, "until", until);
	if (after) {
		msgpack_pack_str_with_body(&pk, "after_id", 8);
		msgpack_pack_uint64(&pk, after);
	}
	if (limit) {
		msgpack_pack_str_with_body(&pk, "limit", 5);
		msgpack_pack_uint64(&pk, limit);
	}
	call("statement", &sb, -1, resp);
	msgpack_sbuffer_destroy(&sb);
}

/* Writes one CSV row of the statement: date, id, type, description, amount, balance, currency, hash. */
static void
statement_row(const msgpack_object *t)
{
	static const char *const cols[] = { "created_at", "id", "type", "description", "amount", "balance_after",
		"currency", "hash" };

	for (int k = 0; k < 8; k++) {
		csv_field(map_get(t, cols[k]), cols[k]);
		fputs(k < 7 ? "," : "\r\n", stdout);
	}
}

/*
 * statement WALLET [--month YYYY-MM | --from T --until T] [--after-id N]
 * [--limit N] [--csv]: the statement method; --month names a UTC month;
 * --csv writes it for a spreadsheet: the opening balance, every transaction
 * of the period (page after page), the closing balance, the signed head.
 */
static int
cmd_statement(int argc, char **argv)
{
	const char *wallet = NULL, *month = NULL, *from = NULL, *until = NULL;
	char from_buf[40], until_buf[40], closing[40], currency[8], *end;
	uint64_t after = 0, limit = 0;
	int csv = 0, rc;
	msgpack_unpacked resp;
	const msgpack_object *r, *txns, *next;

	for (int i = 0; i < argc; i++) {
		if (strcmp(argv[i], "--csv") == 0)
			csv = 1;
		else if (strcmp(argv[i], "--month") == 0 && i + 1 < argc)
			month = argv[++i];
		else if (strcmp(argv[i], "--from") == 0 && i + 1 < argc)
			from = argv[++i];
		else if (strcmp(argv[i], "--until") == 0 && i + 1 < argc)
			until = argv[++i];
		else if (strcmp(argv[i], "--after-id") == 0 && i + 1 < argc &&
		    (after = strtoull(argv[i + 1], &end, 10), *end == '\0'))
			i++;
		else if (strcmp(argv[i], "--limit") == 0 && i + 1 < argc &&
		    (limit = strtoull(argv[i + 1], &end, 10), *end == '\0' && limit > 0))
			i++;
		else if (wallet == NULL && argv[i][0] != '-')
			wallet = argv[i];
		else
			wallet = NULL, i = argc;
	}
	if (month) {
		int y, m;

		if (sscanf(month, "%4d-%2d", &y, &m) != 2 || m < 1 || m > 12 || strlen(month) != 7 || from || until)
			die(EXIT_USAGE, "--month takes YYYY-MM (and no --from or --until)");
		snprintf(from_buf, sizeof(from_buf), "%04d-%02d-01", y, m);
		snprintf(until_buf, sizeof(until_buf), "%04d-%02d-01", m == 12 ? y + 1 : y, m == 12 ? 1 : m + 1);
		from = from_buf;
		until = until_buf;
	}
	if (wallet == NULL || (csv && (after || limit)))
		die(EXIT_USAGE, "usage: walletctl statement WALLET [--month YYYY-MM | --from T --until T] "
		    "[--after-id N] [--limit N] [--csv]");
	statement_page(wallet, from, until, after, csv ? STATEMENT_LIMIT_MAX : limit, &resp);
	if (!csv || (r = ok_result(&resp.data)) == NULL) {
		rc = print_response(&resp.data);
		msgpack_unpacked_destroy(&resp);
		return rc;
	}
	/* Every page of the period as the first answer bounds it, its closing balance last. */
	str_copy(from_buf, sizeof(from_buf), map_get(r, "from"));
	str_copy(until_buf, sizeof(until_buf), map_get(r, "until"));
	str_copy(closing, sizeof(closing), map_get(r, "closing_balance"));
	str_copy(currency, sizeof(currency), map_get(r, "currency"));
	printf("date,id,type,description,amount,balance,currency,hash\r\n");
	printf("%.10s,,opening_balance,Opening balance,,", from_buf);
	csv_field(map_get(r, "opening_balance"), "opening_balance");
	printf(",%s,\r\n", currency);
	head_take(map_get(r, "head"));
	for (;;) {
		txns = map_get(r, "transactions");
		for (uint32_t i = 0; txns && txns->type == MSGPACK_OBJECT_ARRAY && i < txns->via.array.size; i++)
			statement_row(&txns->via.array.ptr[i]);
		next = map_get(r, "next_after_id");
		if (next == NULL || next->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
			break;
		after = next->via.u64;
		msgpack_unpacked_destroy(&resp);
		statement_page(wallet, from_buf, until_buf, after, STATEMENT_LIMIT_MAX, &resp);
		if ((r = ok_result(&resp.data)) == NULL)
			return print_response(&resp.data);
	}
	printf("%.10s,,closing_balance,Closing balance,,%s,%s,\r\n", until_buf, closing, currency);
	heads_write();
	msgpack_unpacked_destroy(&resp);
	if (fflush(stdout) != 0)
		die(EXIT_ERROR, "cannot write the CSV: %s", strerror(errno));
	return EXIT_OK;
}

/* rate export [--plan P] [--channel C]: pages through rate.list into CSV. */
static int
cmd_rate_export(int argc, char **argv)
{
	const char *plan = NULL, *channel = NULL;

	for (int i = 0; i < argc; i++) {
		if (strcmp(argv[i], "--plan") == 0 && i + 1 < argc)
			plan = argv[++i];
		else if (strcmp(argv[i], "--channel") == 0 && i + 1 < argc)
			channel = argv[++i];
		else
			die(EXIT_USAGE, "usage: walletctl rate export [--plan PLAN] [--channel CHANNEL]");
	}
	printf("plan,channel,prefix,route,price,currency,on_failure,failure_fee,mccmnc\n");
	for (uint64_t page = 0;; page++) {
		msgpack_sbuffer sb;
		msgpack_packer pk;
		msgpack_unpacked resp;
		const msgpack_object *result, *rates;

		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		msgpack_pack_map(&pk, 2 + (plan != NULL) + (channel != NULL));
		msgpack_pack_str_with_body(&pk, "page", 4);
		msgpack_pack_uint64(&pk, page);
		msgpack_pack_str_with_body(&pk, "limit", 5);
		msgpack_pack_uint64(&pk, RATE_LIST_LIMIT_MAX);
		if (plan) {
			msgpack_pack_str_with_body(&pk, "plan", 4);
			msgpack_pack_str_with_body(&pk, plan, strlen(plan));
		}
		if (channel) {
			msgpack_pack_str_with_body(&pk, "channel", 7);
			msgpack_pack_str_with_body(&pk, channel, strlen(channel));
		}
		call("rate.list", &sb, -1, &resp);
		msgpack_sbuffer_destroy(&sb);
		if ((result = ok_result(&resp.data)) == NULL)
			return print_response(&resp.data);
		rates = map_get(result, "rates");
		if (rates == NULL || rates->type != MSGPACK_OBJECT_ARRAY || rates->via.array.size == 0)
			break;
		for (uint32_t i = 0; i < rates->via.array.size; i++) {
			const char *keys[9] = { "plan", "channel", "prefix", "route", "price", "currency", "on_failure",
				"failure_fee", "mccmnc" };

			for (int k = 0; k < 9; k++) {
				const msgpack_object *v = map_get(&rates->via.array.ptr[i], keys[k]);

				printf("%.*s%c", v && v->type == MSGPACK_OBJECT_STR ? (int)v->via.str.size : 0,
				    v && v->type == MSGPACK_OBJECT_STR ? v->via.str.ptr : "", k < 8 ? ',' : '\n');
			}
		}
		if (rates->via.array.size < RATE_LIST_LIMIT_MAX) {
			msgpack_unpacked_destroy(&resp);
			break;
		}
		msgpack_unpacked_destroy(&resp);
	}
	return EXIT_OK;
}

/* ---------------------------------------------------------------------- */
/* bench: a load generator speaking the real protocol                     */
/* ---------------------------------------------------------------------- */

static void
bench_usage(FILE *f)
{
	fprintf(f,
	    "usage: walletctl bench [-c CONNECTIONS] [-n REQUESTS] [-P PIPELINE] [--batch N]\n"
	    "                       [--method charge|precheck|balance|history|lookup] [--wallets N]\n"
	    "                       [--recipients N] [--random-refs] [--hold] [--controls] [--guard]\n"
	    "                       [--auto-topup] [--lots] [--json]\n"
	    "  Creates its own wallets (bench-RUN-N, plan bench-RUN) with a large balance, so no\n"
	    "  production wallet is touched, then sends REQUESTS requests over CONNECTIONS\n"
	    "  connections, PIPELINE in flight on each.  --batch N sends charge.batch of N items.\n"
	    "  Charge refs increase like a sequence's message ids; --random-refs scatters them\n"
	    "  like UUIDv4s (each then dirties a page of the refs index of its own).  --hold\n"
	    "  charges under a hold of each wallet's; --controls sets every spend control\n"
	    "  (none reached) on each wallet; --guard both counts of the fraud brake (none\n"
	    "  reached); --auto-topup sets automatic top-up (never reached: walletd's config\n"
	    "  needs a paystack_secret_file); --lots makes each wallet's money a promo lot.\n"
	    "  Prints requests/s, charges/s, latency percentiles, errors by code, and from stats\n"
	    "  the run's commits/s, mean batch size, and the time of a batch and of its durable\n"
	    "  commit (the syncs).  It checks that the wallets lost exactly what the\n"
	    "  successful charges cost (exit 1 if not).  Then it debits its wallets to zero,\n"
	    "  freezes them and deletes its rate: a run leaves no money on the store.\n"
	    "  Defaults: -c 16 -n 100000 -P 1 --method charge --wallets 100 --recipients 100000\n");
}

struct bench_conn {
	int fd;
	msgpack_unpacker up;
	uint64_t *sent_at;  /* by msgid % depth */
	uint32_t *wallet_of;
	uint32_t next_msgid;
	int inflight;
};

static uint64_t
mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int
cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

/* Calls method; returns its result (in *resp), or NULL after printing
 * walletd's error. */
static const msgpack_object *
bench_try(const char *method, msgpack_sbuffer *params, msgpack_unpacked *resp)
{
	const msgpack_object *a = NULL;
	char who[64];

	call(method, params, -1, resp);
	if (resp->data.type == MSGPACK_OBJECT_ARRAY && resp->data.via.array.size == 4) {
		a = resp->data.via.array.ptr;
		if (a[2].type == MSGPACK_OBJECT_NIL)
			return &a[3];
	}
	snprintf(who, sizeof(who), "bench: %s failed", method);
	print_error(who, a ? &a[2] : NULL);
	return NULL;
}

/* Calls method; exits if walletd answers an error. */
static const msgpack_object *
bench_call(const char *method, msgpack_sbuffer *params, msgpack_unpacked *resp)
{
	const msgpack_object *res = bench_try(method, params, resp);

	if (res == NULL)
		exit(EXIT_ERROR);
	return res;
}

static int bench_hold;          /* --hold: each wallet's charges draw on a hold of its own */
static int bench_auto;          /* --auto-topup: each wallet has automatic top-up set (never reached) */
static int bench_lots;          /* --lots: each wallet's money is a promo lot expiring in a year */

/*
 * Leaves no money behind: a bench wallet holding left is debited to zero and
 * frozen (walletd deletes no wallet: its history is the ledger).  Against a
 * production store, a run used to leave each of its wallets holding
 * 1,000,000,000: on every report of what customers hold, and chargeable by
 * anyone who named it.  Returns 0, or -1 after printing what failed.
 */
static int
bench_retire(const char *wallet, int64_t left)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_unpacked resp;
	char buf[48];
	int rc = 0;

	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	if (bench_auto) { /* off first: the debit to zero would ask for a top-up */
		msgpack_pack_map(&pk, 2);
		pk_kv(&pk, "wallet", wallet);
		msgpack_pack_str_with_body(&pk, "auto_topup", 10);
		msgpack_pack_nil(&pk);
		rc = bench_try("wallet.update", &sb, &resp) ? 0 : -1;
		msgpack_unpacked_destroy(&resp);
		msgpack_sbuffer_clear(&sb);
	}
	if (bench_hold && rc == 0) {
		msgpack_pack_map(&pk, 2);
		pk_kv(&pk, "wallet", wallet);
		pk_kv(&pk, "hold", "bench");
		rc = bench_try("hold.release", &sb, &resp) ? 0 : -1;
		msgpack_unpacked_destroy(&resp);
		msgpack_sbuffer_clear(&sb);
	}
	if (left > 0 && rc == 0) {
		msgpack_pack_map(&pk, 3);
		pk_kv(&pk, "wallet", wallet);
		pk_kv(&pk, "amount", amount_format(left, buf, 0));
		pk_kv(&pk, "reason", "walletctl bench: run over");
		rc = bench_try("debit", &sb, &resp) ? 0 : -1;
		msgpack_unpacked_destroy(&resp);
	}
	if (rc == 0) {
		msgpack_sbuffer_clear(&sb);
		msgpack_pack_map(&pk, 2);
		pk_kv(&pk, "wallet", wallet);
		pk_kv(&pk, "status", "frozen");
		rc = bench_try("wallet.update", &sb, &resp) ? 0 : -1;
		msgpack_unpacked_destroy(&resp);
	}
	msgpack_sbuffer_destroy(&sb);
	return rc;
}

/* The writer's counters from stats: commits, the requests they held, and
 * the microseconds spent in their batches and in their durable commits. */
struct bench_counts {
	uint64_t commits, requests;
	double batch_us, commit_us;
};

static struct bench_counts
bench_counts(void)
{
	struct bench_counts n;
	msgpack_unpacked resp;
	const msgpack_object *res = bench_call("stats", NULL, &resp);

	n.commits = map_u64(res, "commits");
	n.requests = map_u64(res, "committed_requests");
	/* stats gives means since walletd started: back to totals */
	n.batch_us = stat_f64(res, "mean_batch_us") * (double)n.commits;
	n.commit_us = stat_f64(res, "mean_commit_us") * (double)n.commits;
	msgpack_unpacked_destroy(&resp);
	return n;
}

static int bench_random_refs;
static uint64_t bench_ref_base;  /* the run's start, microseconds since the epoch */

/*
 * Packs one charge's params for bench wallet w.  Its ref is like a send
 * service's message id: increasing, across runs too (the run's start
 * time, then a sequence, like a ULID), or with --random-refs scattered
 * like a UUIDv4 (splitmix64 of seq).
 */
static void
bench_pack_charge(msgpack_packer *pk, const char *run, uint32_t w, uint64_t seq)
{
	char wallet[64], ref[64];

	snprintf(wallet, sizeof(wallet), "bench-%s-%u", run, w);
	if (bench_random_refs) {
		uint64_t z = seq + 0x9e3779b97f4a7c15u;

		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
		snprintf(ref, sizeof(ref), "%016" PRIx64 "%08" PRIx64, z ^ (z >> 31), seq);
	} else {
		snprintf(ref, sizeof(ref), "b%013" PRIx64 "%013" PRIu64, bench_ref_base, seq);
	}
	msgpack_pack_map(pk, 4 + bench_hold);
	pk_kv(pk, "wallet", wallet);
	pk_kv(pk, "channel", "sms");
	pk_kv(pk, "to", "+15550000000");
	pk_kv(pk, "ref", ref);
	if (bench_hold)
		pk_kv(pk, "hold", "bench");
}

/* One run of walletctl bench: its options, then what it measured. */
struct bench {
	unsigned conns, depth, batch, wallets, recipients;
	uint64_t total;
	const char *method;
	int json, controls, guard;
	char run[16];                /* names the run's plan bench-RUN and wallets bench-RUN-N */
	msgpack_sbuffer precheck;    /* precheck's params, packed once and sent as they are */
	uint64_t *charged;           /* answered charges, per wallet */
	uint64_t *lat, done, ok_charges, errors[E__COUNT];
	double secs;
	struct bench_counts n0, n1;
};

/* Reads bench's options into b.  Returns EXIT_OK, or EXIT_USAGE after saying how. */
static int
bench_options(struct bench *b, int argc, char **argv)
{
	*b = (struct bench){ .conns = 16, .depth = 1, .wallets = 100, .recipients = 100000, .total = 100000,
		.method = "charge", .json = json_output };
	const struct { const char *name; int *on; } flags[] = {
		{ "--json", &b->json }, { "--random-refs", &bench_random_refs }, { "--hold", &bench_hold },
		{ "--auto-topup", &bench_auto }, { "--lots", &bench_lots }, { "--controls", &b->controls },
		{ "--guard", &b->guard },
	};

	for (int i = 0; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		size_t f = 0;

		while (f < sizeof(flags) / sizeof(flags[0]) && strcmp(a, flags[f].name) != 0)
			f++;
		if (f < sizeof(flags) / sizeof(flags[0])) {
			*flags[f].on = 1;
			continue;
		}
		if (v == NULL) {
			bench_usage(stderr);
			return EXIT_USAGE;
		}
		i++;
		if (strcmp(a, "-c") == 0)
			b->conns = (unsigned)atoi(v);
		else if (strcmp(a, "-n") == 0)
			b->total = strtoull(v, NULL, 10);
		else if (strcmp(a, "-P") == 0)
			b->depth = (unsigned)atoi(v);
		else if (strcmp(a, "--batch") == 0)
			b->batch = (unsigned)atoi(v);
		else if (strcmp(a, "--method") == 0)
			b->method = v;
		else if (strcmp(a, "--wallets") == 0)
			b->wallets = (unsigned)atoi(v);
		else if (strcmp(a, "--recipients") == 0)
			b->recipients = (unsigned)atoi(v);
		else {
			bench_usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (b->conns == 0 || b->depth == 0 || b->wallets == 0 || b->total == 0 ||
	    (strcmp(b->method, "charge") && strcmp(b->method, "precheck") && strcmp(b->method, "balance") &&
	    strcmp(b->method, "history") && strcmp(b->method, "lookup")))
		die(EXIT_USAGE, "bench: bad options (see: walletctl help bench)");
	if (b->batch)
		b->method = "charge.batch";
	if (strcmp(b->method, "lookup") == 0)
		b->method = "rate.lookup";
	return EXIT_OK;
}

/*
 * Sets the run up: a plan of its own with one rate, its wallets (each
 * credited 1,000,000,000, half of it held with --hold, every spend control
 * set with --controls), 200 charges a wallet for history to page through,
 * and precheck's campaign.
 */
static void
bench_setup(struct bench *b)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_unpacked resp;
	char plan[32], wallet[64];

	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	snprintf(plan, sizeof(plan), "bench-%s", b->run);
	msgpack_pack_map(&pk, 6);
	pk_kv(&pk, "plan", plan);
	pk_kv(&pk, "channel", "sms");
	pk_kv(&pk, "prefix", "1");
	pk_kv(&pk, "route", "");
	pk_kv(&pk, "price", "0.001");
	pk_kv(&pk, "currency", "USD");
	bench_call("rate.set", &sb, &resp);
	msgpack_unpacked_destroy(&resp);
	for (unsigned w = 0; w < b->wallets; w++) {
		snprintf(wallet, sizeof(wallet), "bench-%s-%u", b->run, w);
		msgpack_sbuffer_clear(&sb);
		msgpack_pack_map(&pk, 3 + 4 * b->controls + 3 * b->guard);
		pk_kv(&pk, "wallet", wallet);
		pk_kv(&pk, "currency", "USD");
		pk_kv(&pk, "plan", plan);
		if (b->controls) { /* every control set, none reached: what checking them costs */
			pk_kv(&pk, "daily_limit", "1000000000");
			msgpack_pack_str_with_body(&pk, "hourly_messages", 15);
			msgpack_pack_uint32(&pk, UINT32_MAX);
			msgpack_pack_str_with_body(&pk, "allowed_prefixes", 16);
			msgpack_pack_array(&pk, 2);
			msgpack_pack_str_with_body(&pk, "44", 2);
			msgpack_pack_str_with_body(&pk, "1555", 4);
			msgpack_pack_str_with_body(&pk, "blocked_prefixes", 16);
			msgpack_pack_array(&pk, 3);
			msgpack_pack_str_with_body(&pk, "1900", 4);
			msgpack_pack_str_with_body(&pk, "1976", 4);
			msgpack_pack_str_with_body(&pk, "2547", 4);
		}
		if (b->guard) { /* both counts on, neither reached: what counting costs */
			msgpack_pack_str_with_body(&pk, "guard_range_max", 15);
			msgpack_pack_uint32(&pk, 1000000);
			msgpack_pack_str_with_body(&pk, "guard_country_spike", 19);
			msgpack_pack_uint32(&pk, 1000);
			msgpack_pack_str_with_body(&pk, "guard_min_messages", 18);
			msgpack_pack_uint32(&pk, 1000000);
		}
		bench_call("wallet.create", &sb, &resp);
		msgpack_unpacked_destroy(&resp);
		msgpack_sbuffer_clear(&sb);
		msgpack_pack_map(&pk, 3 + 2 * bench_lots);
		pk_kv(&pk, "wallet", wallet);
		pk_kv(&pk, "amount", "1000000000");
		pk_kv(&pk, "reason", "walletctl bench");
		if (bench_lots) { /* charges then draw on it */
			pk_kv(&pk, "kind", "promo");
			msgpack_pack_str_with_body(&pk, "expires_in", 10);
			msgpack_pack_uint32(&pk, 365);
		}
		bench_call("credit", &sb, &resp);
		msgpack_unpacked_destroy(&resp);
		if (bench_hold) { /* half the balance, held for the run's charges */
			msgpack_sbuffer_clear(&sb);
			msgpack_pack_map(&pk, 3);
			pk_kv(&pk, "wallet", wallet);
			pk_kv(&pk, "ref", "bench");
			pk_kv(&pk, "amount", "500000000");
			bench_call("hold.create", &sb, &resp);
			msgpack_unpacked_destroy(&resp);
		}
		if (bench_auto) { /* set, never reached: what looking costs */
			msgpack_sbuffer_clear(&sb);
			msgpack_pack_map(&pk, 2);
			pk_kv(&pk, "wallet", wallet);
			msgpack_pack_str_with_body(&pk, "auto_topup", 10);
			msgpack_pack_map(&pk, 5);
			pk_kv(&pk, "below", "1");
			pk_kv(&pk, "amount", "100");
			pk_kv(&pk, "provider", "paystack");
			pk_kv(&pk, "authorization", "AUTH_bench");
			pk_kv(&pk, "email", "bench@example.com");
			bench_call("wallet.update", &sb, &resp);
			msgpack_unpacked_destroy(&resp);
		}
	}
	if (strcmp(b->method, "history") == 0)
		for (unsigned w = 0; w < b->wallets; w++) {
			msgpack_sbuffer_clear(&sb);
			msgpack_pack_map(&pk, 1);
			msgpack_pack_str_with_body(&pk, "items", 5);
			msgpack_pack_array(&pk, 200);
			for (unsigned k = 0; k < 200; k++)
				bench_pack_charge(&pk, b->run, w, (uint64_t)w * 200 + k + (1ull << 40));
			bench_call("charge.batch", &sb, &resp);
			b->charged[w] += 200;
			msgpack_unpacked_destroy(&resp);
		}
	msgpack_sbuffer_destroy(&sb);
	msgpack_sbuffer_init(&b->precheck);
	if (strcmp(b->method, "precheck") == 0) {
		msgpack_packer_init(&pk, &b->precheck, msgpack_sbuffer_write);
		snprintf(wallet, sizeof(wallet), "bench-%s-0", b->run);
		msgpack_pack_map(&pk, 3);
		pk_kv(&pk, "wallet", wallet);
		pk_kv(&pk, "channel", "sms");
		msgpack_pack_str_with_body(&pk, "recipients", 10);
		msgpack_pack_array(&pk, b->recipients);
		for (unsigned r = 0; r < b->recipients; r++) {
			snprintf(wallet, sizeof(wallet), "+1%010u", r * 7919u % 1000000000u);
			msgpack_pack_str_with_body(&pk, wallet, strlen(wallet));
		}
	}
}

/* Packs request number sent (to wallet w) of the run's method into out. */
static void
bench_pack_request(struct bench *b, msgpack_sbuffer *out, uint32_t msgid, uint32_t w, uint64_t sent)
{
	msgpack_packer pk;
	char buf[64];

	msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 4);
	msgpack_pack_int(&pk, 0);
	msgpack_pack_uint32(&pk, msgid);
	msgpack_pack_str_with_body(&pk, b->method, strlen(b->method));
	msgpack_pack_array(&pk, 1);
	if (strcmp(b->method, "charge") == 0) {
		bench_pack_charge(&pk, b->run, w, sent);
	} else if (b->batch) {
		msgpack_pack_map(&pk, 1);
		msgpack_pack_str_with_body(&pk, "items", 5);
		msgpack_pack_array(&pk, b->batch);
		for (unsigned k = 0; k < b->batch; k++)
			bench_pack_charge(&pk, b->run, w, sent * b->batch + k);
	} else if (strcmp(b->method, "precheck") == 0) {
		msgpack_sbuffer_write(out, b->precheck.data, b->precheck.size);
	} else if (strcmp(b->method, "rate.lookup") == 0) {
		snprintf(buf, sizeof(buf), "bench-%s-%u", b->run, w);
		msgpack_pack_map(&pk, 3);
		pk_kv(&pk, "wallet", buf);
		pk_kv(&pk, "channel", "sms");
		snprintf(buf, sizeof(buf), "+1%010" PRIu64, sent * 7919u % 10000000000u);
		pk_kv(&pk, "to", buf);
	} else {
		snprintf(buf, sizeof(buf), "bench-%s-%u", b->run, w);
		msgpack_pack_map(&pk, strcmp(b->method, "history") == 0 ? 2 : 1);
		pk_kv(&pk, "wallet", buf);
		if (strcmp(b->method, "history") == 0) {
			msgpack_pack_str_with_body(&pk, "limit", 5);
			msgpack_pack_int(&pk, 50);
		}
	}
}

/* Counts an error answer (or a charge.batch item's error) by its code. */
static void
bench_count_error(struct bench *b, const msgpack_object *err)
{
	const msgpack_object *code = map_get(err, "code");
	int e = code ? error_find(code->via.str.ptr, code->via.str.size) : -1;

	b->errors[e > 0 ? e : E_INTERNAL]++;
}

/* Counts answer o to a request for wallet w: an error by its code, charges by wallet. */
static void
bench_answer(struct bench *b, const msgpack_object *o, uint32_t w)
{
	const msgpack_object *err = &o->via.array.ptr[2], *results;

	if (err->type != MSGPACK_OBJECT_NIL) {
		bench_count_error(b, err);
	} else if (strcmp(b->method, "charge") == 0) {
		b->ok_charges++;
		b->charged[w]++;
	} else if (b->batch && (results = map_get(&o->via.array.ptr[3], "results")) != NULL) {
		for (uint32_t k = 0; k < results->via.array.size; k++) {
			const msgpack_object *ie = map_get(&results->via.array.ptr[k], "error");

			if (ie) {
				bench_count_error(b, ie);
			} else {
				b->ok_charges++;
				b->charged[w]++;
			}
		}
	}
}

/*
 * The load: b->conns connections, each keeping b->depth requests in flight,
 * until b->total are answered; each answer's latency in b->lat.
 */
static void
bench_load(struct bench *b)
{
	struct bench_conn *bc = calloc(b->conns, sizeof(*bc));
	struct epoll_event *evs = calloc(b->conns, sizeof(*evs));
	unsigned *ready = calloc(b->conns, sizeof(*ready)), nready = b->conns, depth = b->depth;
	uint64_t sent = 0, t0;
	int ep;

	if (!bc || !evs || !ready || (b->lat = calloc(b->total, sizeof(*b->lat))) == NULL)
		die(EXIT_ERROR, "out of memory");
	if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
		die(EXIT_ERROR, "bench: epoll: %s", strerror(errno));
	for (unsigned i = 0; i < b->conns; i++) {
		const char *why, *path = socket_pick(&why);

		if ((bc[i].fd = sock_connect(path)) < 0)
			die(EXIT_CONNECT, "bench: cannot connect to %s (%s): %s", path, why, strerror(errno));
		msgpack_unpacker_init(&bc[i].up, 1 << 16);
		bc[i].sent_at = calloc(depth, sizeof(uint64_t));
		bc[i].wallet_of = calloc(depth, sizeof(uint32_t));
		evs[0] = (struct epoll_event){ .events = EPOLLIN, .data.u32 = i };
		if (epoll_ctl(ep, EPOLL_CTL_ADD, bc[i].fd, &evs[0]) != 0)
			die(EXIT_ERROR, "bench: epoll: %s", strerror(errno));
		ready[i] = i;
	}
	t0 = mono_ns();
	while (b->done < b->total) {
		int nev;

		/* Fill the pipelines of the connections that just had answers (all, at first). */
		for (unsigned q = 0; q < nready; q++) {
			struct bench_conn *c = &bc[ready[q]];
			msgpack_sbuffer out;

			msgpack_sbuffer_init(&out);
			while (c->inflight < (int)depth && sent < b->total) {
				uint32_t id = c->next_msgid++, w = (uint32_t)(sent % b->wallets);

				bench_pack_request(b, &out, id, w, sent);
				c->sent_at[id % depth] = mono_ns();
				c->wallet_of[id % depth] = w;
				c->inflight++;
				sent++;
			}
			if (out.size && send_all(c->fd, out.data, out.size, -1) != 0)
				die(EXIT_CONNECT, "bench: walletd went away");
			msgpack_sbuffer_destroy(&out);
		}
		if ((nev = epoll_wait(ep, evs, (int)b->conns, 10000)) <= 0)
			die(EXIT_ERROR, "bench: no answer for 10 s");
		nready = (unsigned)nev;
		for (unsigned q = 0; q < nready; q++) {
			struct bench_conn *c = &bc[ready[q] = evs[q].data.u32];
			msgpack_unpacked msg;
			ssize_t n;

			msgpack_unpacker_reserve_buffer(&c->up, 1 << 16);
			n = read(c->fd, msgpack_unpacker_buffer(&c->up), msgpack_unpacker_buffer_capacity(&c->up));
			if (n <= 0)
				die(EXIT_CONNECT, "bench: walletd closed a connection");
			msgpack_unpacker_buffer_consumed(&c->up, (size_t)n);
			msgpack_unpacked_init(&msg);
			while (msgpack_unpacker_next(&c->up, &msg) == MSGPACK_UNPACK_SUCCESS) {
				uint32_t id;

				if (msg.data.type != MSGPACK_OBJECT_ARRAY || msg.data.via.array.size != 4)
					die(EXIT_ERROR, "bench: not a response");
				id = (uint32_t)msg.data.via.array.ptr[1].via.u64;
				b->lat[b->done++] = mono_ns() - c->sent_at[id % depth];
				c->inflight--;
				bench_answer(b, &msg.data, c->wallet_of[id % depth]);
			}
			msgpack_unpacked_destroy(&msg);
		}
	}
	b->secs = (double)(mono_ns() - t0) / 1e9;
	for (unsigned i = 0; i < b->conns; i++) {
		close(bc[i].fd);
		msgpack_unpacker_destroy(&bc[i].up);
		free(bc[i].sent_at);
		free(bc[i].wallet_of);
	}
	free(bc);
	free(evs);
	free(ready);
	close(ep);
}

/*
 * The self-check, then the clean-up: each wallet lost exactly 0.001 per
 * answered charge; then each is retired and the plan's rate deleted.
 * Returns 1 when the check failed.
 */
static int
bench_check(struct bench *b)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_unpacked resp;
	char wallet[64], buf[48];
	unsigned retire_failed = 0;
	int failed = 0;

	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	for (unsigned w = 0; w < b->wallets; w++) {
		const msgpack_object *bal;
		int64_t have = -1, want = 1000000000LL * MICRO - (int64_t)b->charged[w] * 1000;

		snprintf(wallet, sizeof(wallet), "bench-%s-%u", b->run, w);
		msgpack_sbuffer_clear(&sb);
		msgpack_pack_map(&pk, 1);
		pk_kv(&pk, "wallet", wallet);
		bal = map_get(bench_call("balance", &sb, &resp), "balance");
		if (bal && bal->type == MSGPACK_OBJECT_STR && amount_parse(bal->via.str.ptr, bal->via.str.size, &have) != 0)
			have = -1;
		if (have != want) {
			fprintf(stderr, "bench: self-check FAILED: %s holds %.*s, expected %s\n", wallet,
			    have >= 0 ? (int)bal->via.str.size : 0, have >= 0 ? bal->via.str.ptr : "",
			    amount_format(want, buf, 0));
			failed = 1;
		}
		msgpack_unpacked_destroy(&resp);
		retire_failed += have < 0 || bench_retire(wallet, have) != 0;
	}
	msgpack_sbuffer_clear(&sb);
	msgpack_pack_map(&pk, 4);
	snprintf(wallet, sizeof(wallet), "bench-%s", b->run);
	pk_kv(&pk, "plan", wallet);
	pk_kv(&pk, "channel", "sms");
	pk_kv(&pk, "prefix", "1");
	pk_kv(&pk, "route", "");
	retire_failed += bench_try("rate.delete", &sb, &resp) == NULL;
	msgpack_unpacked_destroy(&resp);
	msgpack_sbuffer_destroy(&sb);
	if (retire_failed)
		fprintf(stderr, "bench: not all of this run's wallets (bench-%s-*) and its rate (plan bench-%s) "
		    "could be retired; debit and freeze them by hand\n", b->run, b->run);
	return failed;
}

/* Prints what the run measured, as a table or (--json) one JSON object. */
static void
bench_report(struct bench *b, int failed)
{
	static const double pct[5] = { 0.50, 0.90, 0.99, 0.999, 1.0 };
	static const char *const names[5] = { "p50", "p90", "p99", "p999", "max" };
	double ms[5], secs = b->secs;
	uint64_t nerr = 0, commits = b->n1.commits - b->n0.commits;
	double per = commits ? 1.0 / (double)commits : 0.0;
	double mean_batch = (double)(b->n1.requests - b->n0.requests) * per;
	double batch_us = (b->n1.batch_us - b->n0.batch_us) * per, commit_us = (b->n1.commit_us - b->n0.commit_us) * per;

	qsort(b->lat, b->done, sizeof(*b->lat), cmp_u64);
	for (int k = 0; k < 5; k++)
		ms[k] = (double)b->lat[(size_t)(pct[k] * (double)(b->done - 1) + 0.5)] / 1e6;
	for (int e = 1; e < E__COUNT; e++)
		nerr += b->errors[e];
	if (b->json) {
		printf("{\"method\": \"%s\", \"connections\": %u, \"pipeline\": %u, \"batch\": %u, "
		    "\"requests\": %" PRIu64 ", \"seconds\": %.3f, \"requests_per_s\": %.0f, "
		    "\"charges_per_s\": %.0f, \"commits_per_s\": %.0f, \"mean_batch\": %.1f, "
		    "\"mean_batch_us\": %.0f, \"mean_commit_us\": %.0f, \"latency_ms\": {",
		    b->method, b->conns, b->depth, b->batch, b->done, secs, (double)b->done / secs,
		    (double)b->ok_charges / secs, (double)commits / secs, mean_batch, batch_us, commit_us);
		for (int k = 0; k < 5; k++)
			printf("%s\"%s\": %.3f", k ? ", " : "", names[k], ms[k]);
		printf("}, \"errors\": {");
		for (int e = 1, first = 1; e < E__COUNT; e++)
			if (b->errors[e]) {
				printf("%s\"%s\": %" PRIu64, first ? "" : ", ", error_name(e), b->errors[e]);
				first = 0;
			}
		printf("}, \"self_check\": %s}\n", failed ? "false" : "true");
		return;
	}
	printf("%s: %" PRIu64 " requests, %u connections, pipeline %u%s in %.2f s\n", b->method, b->done,
	    b->conns, b->depth, b->batch ? ", batches" : "", secs);
	printf("  %.0f requests/s, %.0f charges/s\n", (double)b->done / secs, (double)b->ok_charges / secs);
	printf("  latency ms: p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f\n", ms[0], ms[1], ms[2], ms[3], ms[4]);
	printf("  commits/s %.0f, mean batch %.1f requests, %.0f us a batch of which %.0f us "
	    "its durable commit\n", (double)commits / secs, mean_batch, batch_us, commit_us);
	printf("  errors: %" PRIu64, nerr);
	for (int e = 1; e < E__COUNT; e++)
		if (b->errors[e])
			printf(" %s=%" PRIu64, error_name(e), b->errors[e]);
	printf("\n  self-check: %s\n", failed ? "FAILED" : "balances match the answered charges");
}

/* walletctl bench: set up, load, check and retire, report (walletctl help bench). */
static int
cmd_bench(int argc, char **argv)
{
	struct bench b;
	struct timespec ts;
	int rc, failed;

	if ((rc = bench_options(&b, argc, argv)) != EXIT_OK)
		return rc;
	snprintf(b.run, sizeof(b.run), "%x%04x", (unsigned)time(NULL) & 0xffffff, (unsigned)getpid() & 0xffff);
	clock_gettime(CLOCK_REALTIME, &ts);
	bench_ref_base = (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
	if ((b.charged = calloc(b.wallets, sizeof(*b.charged))) == NULL)
		die(EXIT_ERROR, "out of memory");
	bench_setup(&b);
	b.n0 = bench_counts();
	bench_load(&b);
	b.n1 = bench_counts();
	failed = bench_check(&b);
	bench_report(&b, failed);
	free(b.lat);
	free(b.charged);
	msgpack_sbuffer_destroy(&b.precheck);
	return failed ? EXIT_ERROR : EXIT_OK;
}

int
main(int argc, char **argv)
{
	char name[128];
	int i = 1, m = -1, used = 0, fd_pass = -1, rc;
	msgpack_sbuffer params;
	msgpack_unpacked resp;

	/* Global options, before the command. */
	for (; i < argc; i++) {
		if (strcmp(argv[i], "-s") == 0 && i + 1 < argc)
			socket_path = argv[++i];
		else if (strcmp(argv[i], "--json") == 0 || strcmp(argv[i], "-j") == 0)
			json_output = 1;
		else if (strcmp(argv[i], "-V") == 0 || strcmp(argv[i], "--version") == 0) {
			printf("walletctl %s\n", WALLETD_VERSION);
			return EXIT_OK;
		} else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
			help_all(stdout);
			return EXIT_OK;
		} else
			break;
	}
	if (i >= argc) {
		help_all(stderr);
		return EXIT_USAGE;
	}
	/* --json may also come after the command. */
	for (int j = i; j < argc; j++)
		if (strcmp(argv[j], "--json") == 0) {
			json_output = 1;
			memmove(&argv[j], &argv[j + 1], (size_t)(argc - j - 1) * sizeof(*argv));
			argc--;
			j--;
		}
	if (strcmp(argv[i], "help") == 0) {
		if (i + 1 >= argc) {
			help_all(stdout);
			return EXIT_OK;
		}
		if (strcmp(argv[i + 1], "bench") == 0) {
			bench_usage(stdout);
			return EXIT_OK;
		}
		if (strcmp(argv[i + 1], "roles") == 0) {
			help_roles();
			return EXIT_OK;
		}
		snprintf(name, sizeof(name), "%s%s%s", argv[i + 1], i + 2 < argc ? "." : "", i + 2 < argc ? argv[i + 2] : "");
		if ((m = method_find(name, strlen(name))) < 0 && (m = method_find(argv[i + 1], strlen(argv[i + 1]))) < 0)
			no_command(argv[i + 1], i + 2 < argc ? argv[i + 2] : NULL);
		help_one(m);
		return EXIT_OK;
	}
	if (strcmp(argv[i], "bench") == 0)
		return cmd_bench(argc - i - 1, argv + i + 1);
	if (i + 1 < argc && strcmp(argv[i], "rate") == 0 && strcmp(argv[i + 1], "export") == 0)
		return cmd_rate_export(argc - i - 2, argv + i + 2);
	if (i + 2 == argc && strcmp(argv[i], "stats") == 0 && strcmp(argv[i + 1], "--prometheus") == 0)
		return cmd_stats_prometheus();
	if (strcmp(argv[i], "statement") == 0)
		return cmd_statement(argc - i - 1, argv + i + 1);
	if (strcmp(argv[i], "verify-statement") == 0)
		return cmd_verify_statement(argc - i - 1, argv + i + 1);
	for (int j = i + 1; strcmp(argv[i], "export") == 0 && j < argc; j++)
		if (strcmp(argv[j], "--csv") == 0)
			return cmd_export_csv(argc - i - 1, argv + i + 1);
	if (i + 1 < argc) {
		snprintf(name, sizeof(name), "%s.%s", argv[i], argv[i + 1]);
		if ((m = method_find(name, strlen(name))) >= 0)
			used = 2;
	}
	if (m < 0 && (m = method_find(argv[i], strlen(argv[i]))) >= 0)
		used = 1;
	if (m < 0)
		no_command(argv[i], i + 1 < argc ? argv[i + 1] : NULL);
	msgpack_sbuffer_init(&params);
	build_params(m, argc - i - used, argv + i + used, &params, &fd_pass);
	call(method_table[m].name, &params, fd_pass, &resp);
	out_finish(&resp.data);
	rc = print_response(&resp.data);
	msgpack_unpacked_destroy(&resp);
	msgpack_sbuffer_destroy(&params);
	return rc;
}

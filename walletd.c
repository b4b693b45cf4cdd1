/*
 * walletd - prepaid wallets for SMS and WhatsApp messaging platforms.
 *
 * One process: an epoll event loop on a Unix socket speaking MessagePack-RPC
 * (protocol.h), a writer thread that runs every mutating request ready in
 * one turn of the loop in one LMDB write transaction - each request in its
 * own nested transaction, so a failing one leaves no trace - and answers them
 * after one durable commit (group commit), and an alert thread that e-mails
 * low-balance notifications over SMTP.
 *
 * Sections, each function defined before its first use (so each section
 * reads from its helpers up to what the next sections call), with a few
 * prototypes where a section calls into a later one (replication's are
 * gathered at the end of section 1):
 *   1. config, process state and logging
 *   2. utilities: money, text, time, MessagePack output
 *   3. store: layout, change capture, opening and committing, the journal
 *      and checkpoints, wallets, events, holds, the transaction log, rates
 *   4. methods, one m_<name> each, grouped as the README's method table
 *   5. protocol and connections: roles, requests, frames, accepting
 *   6. event loop, writer, syncer and the thread for slow reads
 *   7. replication (a group of nodes sharing a NATS JetStream stream)
 *   8. alert thread: the outbox, e-mails and webhook events
 *   9. main
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <netdb.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>
#include <lmdb.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <msgpack.h>
#include <nats/nats.h>
#include <openssl/sha.h>

#include "protocol.h"

/* ====================================================================== */
/* 1. Config, process state and logging                                   */
/* ====================================================================== */

#define ID_LIST_MAX 32
#define NAME_CHARS "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

struct config {
	char store[PATH_MAX];
	char socket[PATH_MAX];
	char socket_group[64];
	unsigned max_connections;
	unsigned reserved_connections;
	size_t max_frame;
	size_t max_output;
	size_t max_output_total;
	unsigned idle_timeout;
	unsigned long_read_warn;
	unsigned batch_max;
	size_t batch_bytes;
	unsigned commit_delay;
	unsigned charge_batch_max;
	unsigned max_queued;
	size_t map_size;
	size_t map_size_max;
	char durability[8];
	unsigned checkpoint_interval;
	size_t checkpoint_bytes;
	char admin_users[256], admin_groups[256];
	char client_users[256], client_groups[256];
	char payments_users[256], payments_groups[256];
	char staff_users[256], staff_groups[256];
	char topup_url[512];
	unsigned topup_ttl;
	char smtp_url[256];
	char smtp_user[128];
	char smtp_password_file[PATH_MAX];
	char smtp_from[256];
	unsigned smtp_timeout;
	unsigned alert_interval;
	unsigned alert_max_attempts;
	unsigned alert_remind;
	unsigned log_level;
	char receipts[8];
	char ops_emails[1024];
	char webhook_url[512];
	char webhook_secret_file[PATH_MAX];
	unsigned webhook_timeout;
	char paystack_api_url[256], paystack_secret_file[PATH_MAX];
	char flutterwave_api_url[256], flutterwave_secret_file[PATH_MAX];
	unsigned gateway_timeout;
	char ledger_key_file[PATH_MAX];
	char currencies[256];
	char nats_url[1024];
	char cluster[64];
	char node[64];
	unsigned stream_replicas;
	unsigned lease_ttl;
	unsigned stream_max_age;
	unsigned failover_wait;
	char nats_creds[PATH_MAX];
	char nats_ca[PATH_MAX];
	unsigned guard_range_max;
	unsigned guard_window;
	unsigned guard_country_spike;
	unsigned guard_min_messages;
	unsigned guard_block;
	char guard_safe_prefixes[512];
};

enum { CF_STR, CF_UINT, CF_SIZE };

struct config_key {
	const char *name;
	int type;
	size_t offset;
	size_t size;
	int reloadable;
	const char *help;
};

#define CK(name, type, reload, help) \
	{ #name, type, offsetof(struct config, name), \
	  sizeof(((struct config *)0)->name), reload, help }

/* Every key of walletd.conf; walletd -h prints this table. */
static const struct config_key config_keys[] = {
	CK(store, CF_STR, 0, "store directory (LMDB environment)"),
	CK(socket, CF_STR, 0, "Unix socket path"),
	CK(socket_group, CF_STR, 0, "group owning the socket (mode 0660): a name or a numeric gid"),
	CK(max_connections, CF_UINT, 1, "connections at once; beyond: too_many_connections"),
	CK(reserved_connections, CF_UINT, 1, "of those, kept for admin, payments and staff peers (at most half)"),
	CK(max_frame, CF_SIZE, 1, "largest request frame, bytes"),
	CK(max_output, CF_SIZE, 1, "unread answers a client may leave, bytes; beyond: cut off"),
	CK(max_output_total, CF_SIZE, 1, "unread answers across connections, bytes; beyond: those with 64K+ unread wait"),
	CK(idle_timeout, CF_UINT, 1, "seconds before an idle connection is closed (0 = never)"),
	CK(long_read_warn, CF_UINT, 1, "seconds a backup or verify may read before a warning, again each as long (0 = never)"),
	CK(batch_max, CF_UINT, 1, "most requests in one commit (a charge.batch counts its items)"),
	CK(batch_bytes, CF_SIZE, 1, "most request bytes in one commit"),
	CK(commit_delay, CF_UINT, 1, "microseconds the writer may wait, under load, for a fuller commit (0 = never)"),
	CK(charge_batch_max, CF_UINT, 1, "most items in one charge.batch"),
	CK(max_queued, CF_UINT, 1, "requests queued across connections before those with 64+ queued stop being read"),
	CK(map_size, CF_SIZE, 0, "the LMDB map reserved at start, bytes (address space, not memory or disk)"),
	CK(map_size_max, CF_SIZE, 1, "the map grows up to this; beyond: storage_full"),
	CK(durability, CF_STR, 0, "journal: a commit is one synced append to the journal, LMDB synced at checkpoints; "
	    "lmdb: LMDB's own two syncs per commit"),
	CK(checkpoint_interval, CF_UINT, 1, "milliseconds between checkpoints (LMDB synced, the journal before it reused)"),
	CK(checkpoint_bytes, CF_SIZE, 0, "journal bytes that call a checkpoint sooner; the journal's four files hold "
	    "twice this"),
	CK(admin_users, CF_STR, 1, "users (names or uids) with the admin role"),
	CK(admin_groups, CF_STR, 1, "groups (names or gids) with the admin role"),
	CK(client_users, CF_STR, 1, "users with the client role"),
	CK(client_groups, CF_STR, 1, "groups with the client role"),
	CK(payments_users, CF_STR, 1, "users with the payments role"),
	CK(payments_groups, CF_STR, 1, "groups with the payments role"),
	CK(staff_users, CF_STR, 1, "users with the staff role (support desk, dashboards: walletctl help roles)"),
	CK(staff_groups, CF_STR, 1, "groups with the staff role"),
	CK(topup_url, CF_STR, 1, "checkout URL template: {ref} {amount} {currency} {wallet}"),
	CK(topup_ttl, CF_UINT, 1, "seconds before a pending top-up expires"),
	CK(smtp_url, CF_STR, 1, "smtp://host:port (STARTTLS if offered) or smtps://host:port; empty = no e-mail"),
	CK(smtp_user, CF_STR, 1, "SMTP user name"),
	CK(smtp_password_file, CF_STR, 1, "file holding the SMTP password"),
	CK(smtp_from, CF_STR, 1, "From address of alert e-mails"),
	CK(smtp_timeout, CF_UINT, 1, "seconds an SMTP delivery may take"),
	CK(alert_interval, CF_UINT, 1, "seconds between alert runs"),
	CK(alert_max_attempts, CF_UINT, 1, "delivery attempts before a notification is failed"),
	CK(alert_remind, CF_UINT, 1, "seconds between reminders while below threshold (0 = off)"),
	CK(log_level, CF_UINT, 1, "0 errors, 1 warnings, 2 info, 3 debug"),
	CK(receipts, CF_STR, 1, "on: e-mail a receipt of each credited top-up to the wallet's alert e-mails; off: none"),
	CK(ops_emails, CF_STR, 1, "comma-separated: who is e-mailed a payment that could not be credited, and each suspension of the fraud brake"),
	CK(webhook_url, CF_STR, 1, "where events (low_balance, topup_paid, hold_expired, charge_settled, destination_suspended) are POSTed as JSON; empty = none"),
	CK(webhook_secret_file, CF_STR, 1, "file whose first line (and second, while rotating) is the secret events are signed with"),
	CK(webhook_timeout, CF_UINT, 1, "seconds a webhook delivery may take"),
	CK(paystack_api_url, CF_STR, 1, "Paystack's API, for automatic top-ups"),
	CK(paystack_secret_file, CF_STR, 1, "file whose first line is the Paystack secret key (empty = no automatic "
	    "top-up through Paystack)"),
	CK(flutterwave_api_url, CF_STR, 1, "Flutterwave's API, for automatic top-ups"),
	CK(flutterwave_secret_file, CF_STR, 1, "file whose first line is the Flutterwave secret key (empty = no "
	    "automatic top-up through Flutterwave)"),
	CK(gateway_timeout, CF_UINT, 1, "seconds a payment gateway's API call may take"),
	CK(ledger_key_file, CF_STR, 0, "the Ed25519 key (PEM) statements and exports are signed with, made at first start "
	    "if missing; empty = ledger.key in the store"),
	CK(currencies, CF_STR, 0, "a platform's own units beside ISO 4217, comma-separated 3-letter codes (CRD, ...)"),
	CK(nats_url, CF_STR, 0, "NATS server URLs, comma-separated: replicate through JetStream (empty = a single node)"),
	CK(cluster, CF_STR, 0, "the replicated group's name: its stream, subjects and lease are named after it"),
	CK(node, CF_STR, 0, "this node's name in the group; empty = the host name"),
	CK(stream_replicas, CF_UINT, 0, "copies JetStream keeps of the group's stream (1, 3 or 5)"),
	CK(lease_ttl, CF_UINT, 0, "seconds the leader's lease lasts without a refresh (a failover takes about this)"),
	CK(stream_max_age, CF_UINT, 0, "seconds the stream keeps a record; a node further behind must be re-seeded"),
	CK(failover_wait, CF_UINT, 1, "seconds a write waits for a leader before it answers unavailable"),
	CK(nats_creds, CF_STR, 0, "NATS .creds file (empty = none)"),
	CK(nats_ca, CF_STR, 0, "CA file for TLS to NATS (empty = the system's)"),
	CK(guard_range_max, CF_UINT, 1, "fraud brake: messages to one number range (a number less its last 3 digits) "
	    "within guard_window before it is suspended (0 = off); a wallet's own setting overrides each guard_* key"),
	CK(guard_window, CF_UINT, 1, "fraud brake: the window those messages are counted in, seconds (at most 86400)"),
	CK(guard_country_spike, CF_UINT, 1, "fraud brake: suspend a calling code past this many times the wallet's "
	    "usual messages to it per window, over the last 7 days (0 = off)"),
	CK(guard_min_messages, CF_UINT, 1, "fraud brake: a window's messages to a calling code below this are never a spike"),
	CK(guard_block, CF_UINT, 1, "fraud brake: seconds a suspension lasts, doubled for each repeat within a day"),
	CK(guard_safe_prefixes, CF_STR, 1, "fraud brake: destination prefixes never suspended, comma-separated"),
};

static void
config_defaults(struct config *cf)
{
	memset(cf, 0, sizeof(*cf));
	strcpy(cf->store, "/var/lib/walletd");
	strcpy(cf->socket, "/run/walletd/walletd.sock");
	cf->max_connections = 10240;
	cf->reserved_connections = 16;
	cf->max_frame = MAX_FRAME_DEFAULT;
	cf->max_output = 64u << 20;
	cf->max_output_total = 256u << 20;
	cf->idle_timeout = 3600;
	cf->long_read_warn = 600;
	cf->batch_max = 4096;
	cf->batch_bytes = 32u << 20;
	cf->commit_delay = 150;
	cf->charge_batch_max = BATCH_ITEMS_MAX;
	cf->max_queued = 65536;
	cf->map_size = (size_t)1 << 40;
	cf->map_size_max = (size_t)1 << 40;
	strcpy(cf->durability, "journal");
	cf->checkpoint_interval = 1000;
	cf->checkpoint_bytes = 64u << 20;
	strcpy(cf->topup_url, "https://pay.example.com/checkout?ref={ref}&amount={amount}&currency={currency}");
	cf->topup_ttl = 86400;
	strcpy(cf->smtp_from, "walletd@localhost");
	cf->smtp_timeout = 20;
	cf->alert_interval = 60;
	cf->alert_max_attempts = 8;
	cf->log_level = 2;
	strcpy(cf->receipts, "on");
	cf->webhook_timeout = 10;
	strcpy(cf->paystack_api_url, "https://api.paystack.co");
	strcpy(cf->flutterwave_api_url, "https://api.flutterwave.com");
	cf->gateway_timeout = 30;
	strcpy(cf->cluster, "walletd");
	cf->stream_replicas = 3;
	cf->lease_ttl = 4;
	cf->stream_max_age = 7 * 86400;
	cf->failover_wait = 15;
	cf->guard_window = 600;
	cf->guard_min_messages = 50;
	cf->guard_block = 1800;
}

static struct config config;

enum { L_ERR, L_WARN, L_INFO, L_DEBUG };
static const char *const level_names[] = { "error", "warning", "info", "debug" };

/* Logs one line to stderr: what walletd found itself. */
static void __attribute__((format(printf, 2, 3)))
log_x(int level, const char *fmt, ...)
{
	char line[1024];
	va_list ap;

	if ((unsigned)level > config.log_level)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	fprintf(stderr, "walletd: %s: %s\n", level_names[level], line);
}

/* Logs one error line to stderr with strerror(errno) appended. */
static void __attribute__((format(printf, 1, 2)))
log_p(const char *fmt, ...)
{
	char line[1024];
	int saved = errno;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	fprintf(stderr, "walletd: error: %s: %s\n", line, strerror(saved));
	errno = saved;
}

/* Parses "64M", "1G", "4096" into *out.  Returns 0, or -1. */
static int
parse_size(const char *s, size_t *out)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -1;
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	case 't': case 'T': v <<= 40; end++; break;
	}
	if (*end != '\0')
		return -1;
	*out = (size_t)v;
	return 0;
}

/* Sets one key of cf from text.  Returns 0, or -1 with a message logged. */
static int
config_set(struct config *cf, const char *key, const char *value)
{
	for (size_t i = 0; i < sizeof(config_keys) / sizeof(config_keys[0]); i++) {
		const struct config_key *k = &config_keys[i];
		char *field = (char *)cf + k->offset;
		size_t size;

		if (strcmp(k->name, key) != 0)
			continue;
		switch (k->type) {
		case CF_STR:
			if (strlen(value) >= k->size)
				goto bad;
			strcpy(field, value);
			return 0;
		case CF_UINT:
			if (parse_size(value, &size) != 0 || size > UINT_MAX)
				goto bad;
			*(unsigned *)field = (unsigned)size;
			return 0;
		case CF_SIZE:
			if (parse_size(value, &size) != 0)
				goto bad;
			*(size_t *)field = size;
			return 0;
		}
	}
	log_x(L_ERR, "unknown config key '%s'", key);
	return -1;
bad:
	log_x(L_ERR, "bad value for config key '%s': '%s'", key, value);
	return -1;
}

/* Formats key k of cf as walletd.conf takes it (sizes as 64M, 1T when exact) into buf. */
static const char *
config_format(const struct config *cf, const struct config_key *k, char *buf, size_t size)
{
	const char *field = (const char *)cf + k->offset;
	unsigned long long v;
	const char *units = "KMGT";
	int unit = -1;

	if (k->type == CF_STR) {
		snprintf(buf, size, "%s", *field ? field : "(none)");
		return buf;
	}
	v = k->type == CF_UINT ? *(const unsigned *)field : *(const size_t *)field;
	while (k->type == CF_SIZE && v >= 1024 && v % 1024 == 0 && unit < 3)
		v /= 1024, unit++;
	snprintf(buf, size, "%llu%.*s", v, unit >= 0, unit >= 0 ? units + unit : "");
	return buf;
}

/* Below these a key makes no sense: a frame of 0 bytes, an SMTP delivery
 * with no time limit (curl's 0), an alert run every 0 seconds. */
static const struct {
	const char *name;
	size_t min;
} config_mins[] = {
	{ "max_connections", 1 }, { "max_frame", 1024 }, { "max_output", 1u << 20 },
	{ "max_output_total", 1u << 20 }, { "batch_max", 1 }, { "batch_bytes", 1024 },
	{ "charge_batch_max", 1 }, { "max_queued", 1 }, { "map_size", 64u << 10 },
	{ "map_size_max", 64u << 10 }, { "checkpoint_interval", 10 }, { "checkpoint_bytes", 1u << 20 },
	{ "topup_ttl", 1 }, { "smtp_timeout", 1 },
	{ "alert_interval", 1 }, { "alert_max_attempts", 1 }, { "webhook_timeout", 1 }, { "gateway_timeout", 1 },
	{ "stream_replicas", 1 }, { "lease_ttl", 2 }, { "stream_max_age", 60 }, { "failover_wait", 1 },
	{ "guard_window", 1 }, { "guard_min_messages", 1 }, { "guard_block", 1 },
};

/* Checks cf against config_mins.  Returns 0, or -1 with a message logged. */
static int
config_check(const struct config *cf)
{
	int rc = 0;

	if (strcmp(cf->durability, "journal") != 0 && strcmp(cf->durability, "lmdb") != 0) {
		log_x(L_ERR, "config key 'durability' must be journal or lmdb, not '%s'", cf->durability);
		rc = -1;
	}
	if (strcmp(cf->receipts, "on") != 0 && strcmp(cf->receipts, "off") != 0) {
		log_x(L_ERR, "config key 'receipts' must be on or off, not '%s'", cf->receipts);
		rc = -1;
	}
	for (const char *p = cf->currencies + strspn(cf->currencies, ", "); *p; p += strspn(p, ", ")) {
		size_t n = strspn(p, "ABCDEFGHIJKLMNOPQRSTUVWXYZ");

		if (n != 3 || (p[n] && p[n] != ',' && p[n] != ' ')) {
			log_x(L_ERR, "config key 'currencies' takes 3-letter upper-case codes, comma-separated");
			rc = -1;
			break;
		}
		p += n;
	}
	if (cf->guard_window > 86400) {
		log_x(L_ERR, "config key 'guard_window' must be at most 86400, not %u", cf->guard_window);
		rc = -1;
	}
	for (const char *p = cf->guard_safe_prefixes; *p; p += *p == ',') {
		size_t n = strspn(p, "0123456789");

		if (n == 0 || n > 15 || *p == '0' || (p[n] && p[n] != ',')) {
			log_x(L_ERR, "config key 'guard_safe_prefixes' takes prefixes of 1-15 digits (the first not 0), "
			    "comma-separated");
			rc = -1;
			break;
		}
		p += n;
	}
	if (strspn(cf->cluster, NAME_CHARS) != strlen(cf->cluster) || !cf->cluster[0] ||
	    strspn(cf->node, NAME_CHARS) != strlen(cf->node)) {
		log_x(L_ERR, "config keys 'cluster' and 'node' take letters, digits, '-' and '_' only");
		rc = -1;
	}

	for (size_t i = 0; i < sizeof(config_mins) / sizeof(config_mins[0]); i++)
		for (size_t j = 0; j < sizeof(config_keys) / sizeof(config_keys[0]); j++) {
			const struct config_key *k = &config_keys[j];
			const char *field = (const char *)cf + k->offset;
			size_t v;

			if (strcmp(k->name, config_mins[i].name) != 0)
				continue;
			v = k->type == CF_UINT ? *(const unsigned *)field : *(const size_t *)field;
			if (v < config_mins[i].min) {
				log_x(L_ERR, "config key '%s' must be at least %zu, not %zu", k->name,
				    config_mins[i].min, v);
				rc = -1;
			}
		}
	return rc;
}

/* Reads a key = value file into cf.  Returns 0, or -1 with a message logged. */
static int
config_load(struct config *cf, const char *path)
{
	char line[1024];
	int lineno = 0, rc = 0;
	FILE *f = fopen(path, "r");

	if (f == NULL) {
		log_p("cannot open config %s", path);
		return -1;
	}
	while (fgets(line, sizeof(line), f) != NULL) {
		char *key = line, *eq, *value, *end;

		lineno++;
		while (isspace((unsigned char)*key))
			key++;
		if (*key == '#' || *key == '\0')
			continue;
		if ((eq = strchr(key, '=')) == NULL) {
			log_x(L_ERR, "%s:%d: expected key = value", path, lineno);
			rc = -1;
			continue;
		}
		value = eq + 1;
		for (end = eq; end > key && isspace((unsigned char)end[-1]); end--)
			;
		*end = '\0';
		while (isspace((unsigned char)*value))
			value++;
		for (end = value + strlen(value); end > value && isspace((unsigned char)end[-1]); end--)
			;
		*end = '\0';
		if (config_set(cf, key, value) != 0)
			rc = -1;
	}
	fclose(f);
	return config_check(cf) != 0 ? -1 : rc;
}

/* ---- The process state ---- */

struct req;
struct conn;

#define LAT_RING 65536 /* latencies kept for stats' percentiles */

/* The process state. */
static struct server {
	/* The event loop's own (the main thread; config_reload runs there too). */
	int listen_fd, epoll_fd, event_fd, signal_fd;
	int spare_fd;             /* held for taking a connection when out of descriptors */
	int accept_paused;        /* the listening socket is out of epoll until the next sweep */
	int accept_logged;        /* an accept problem was logged since the last sweep */
	uint64_t long_read_logged; /* when the last long_read_warn was logged */
	unsigned slow_running;    /* helper threads running */
	struct req *slow_head, *slow_tail; /* slow requests waiting for a helper */
	const char *config_path;
	unsigned nconns, nlinger; /* connections, and lingering ones (not in nconns) */
	size_t queued, queued_peak; /* requests in connections' queues, now and at most */
	size_t unread, unread_peak; /* bytes of answers in connections' output, now and at most */
	struct conn *conns;
	struct conn *dirty;
	struct conn *held;        /* connections whose next answer waits for the journal's sync */
	MDB_txn *rtxn;            /* the event loop's read transaction, reset between uses */
	struct req *pend_head, *pend_tail; /* for the writer at the end of this turn */
	size_t pend_count, pend_weight, pend_bytes;
	uid_t self_uid;
	uid_t role_uids[ROLES_COUNT][ID_LIST_MAX]; /* by role bit: admin, client, payments, staff */
	gid_t role_gids[ROLES_COUNT][ID_LIST_MAX];
	int role_nuids[ROLES_COUNT], role_ngids[ROLES_COUNT];

	/* Shared with the writer and the helpers: under lock. */
	pthread_mutex_t lock;     /* guards these, and the writer's stats */
	pthread_cond_t cond;
	struct req *wq_head, *wq_tail;     /* for the writer */
	size_t wq_count, wq_weight, wq_bytes;       /* requests, their weight and bytes */
	struct req *done_head, *done_tail; /* answered by the writer or a helper */
	int stopping;
	pthread_t writer;         /* set once at start */
} srv = { .spare_fd = -1 };

/*
 * A histogram for the Prometheus exposition (walletctl stats --prometheus):
 * counts per bucket (not cumulative; the last is above every bound), their
 * sum and count, since start.
 */
#define HISTO_BOUNDS 13
struct histogram {
	uint64_t counts[HISTO_BOUNDS + 1];
	uint64_t sum, count;
};

/* Request latency, microseconds; commit batch size, requests. */
static const uint64_t latency_bounds[HISTO_BOUNDS] = {
	50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000,
};
static const uint64_t batch_bounds[HISTO_BOUNDS] = {
	1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
};

/* Counts v in h, whose bucket bounds are bounds. */
static void
histogram_add(struct histogram *h, const uint64_t bounds[HISTO_BOUNDS], uint64_t v)
{
	int i = 0;

	while (i < HISTO_BOUNDS && v > bounds[i])
		i++;
	h->counts[i]++;
	h->sum += v;
	h->count++;
}

/* The counters of stats.  The writer's (commits to map_grows, batch_sizes)
 * change under srv.lock; the rest belong to the event loop. */
static struct stats {
	uint64_t requests[M__COUNT], errors[M__COUNT], codes[E__COUNT];
	uint64_t commits, committed, batch_max, batch_us, commit_us, failed_commits, map_grows;
	uint64_t conns_total, conns_refused, conns_dropped;
	uint64_t reads_off_loop;
	struct histogram batch_sizes;
	int64_t started;
} stats;

/* The latencies of the last LAT_RING requests, microseconds (event loop only). */
static struct latency {
	uint32_t us[LAT_RING];
	uint64_t n;
	struct histogram histogram; /* of every request since start */
} latency;

/* ---- Doorways into replication (section 7) ---- */

/*
 * Replication comes after everything it builds on; these are the calls the
 * earlier sections make into it, and why:
 *   the store (3): store_commit, replicated, packs the commit record
 *     (repl_prepare), publishes it (repl_send_record, outgoing_free) and
 *     notes the stream position it reached (repl_committed);
 *   the methods (4): status, replication.repair, and stats' replication part;
 *   connections and the writer (5, 6): a node too far behind refuses
 *     requests (repl_refuses), the writer hands each batch to replication
 *     (repl_run: run as leader, or forwarded to it), answers a write
 *     forwarded here (repl_answer), stamps answers with the stream
 *     position (repl_applied), and ends expired holds only where this
 *     node may write (repl_may_write: the leader).
 */
struct repl_pos;
struct outgoing;
struct call;
struct req;
static int repl_prepare(MDB_txn *txn, struct repl_pos *pos, struct outgoing *o);
static int repl_send_record(struct outgoing *o);
static void outgoing_free(struct outgoing *o);
static void repl_committed(const struct repl_pos *pos);
static int m_status(struct call *c);
static int m_replication_repair(struct call *c);
static void repl_stats_pack(msgpack_packer *pk);
static int repl_refuses(struct req *r);
static void repl_run(struct req *batch);
static void repl_answer(struct req *r);
static uint64_t repl_applied(void);
static int repl_may_write(void);

/* ====================================================================== */
/* 2. Utilities: money, text, time                                        */
/* ====================================================================== */

typedef __int128 i128;
#define FX_SCALE 1000000000000LL /* FX rates: 12 decimal places */

/* A byte string that is not NUL-terminated: msgpack hands them out. */
struct str {
	const char *p;
	size_t n;
};

/*
 * Divides n by d (d > 0), rounding half away from zero.  Returns 0 and sets
 * *out, or -1 if the quotient leaves int64.
 */
static int
div_round(i128 n, i128 d, int64_t *out)
{
	i128 q = n / d, r = n % d;

	if (r < 0)
		r = -r;
	if (2 * r >= d)
		q += n < 0 ? -1 : 1;
	if (q > INT64_MAX || q < INT64_MIN)
		return -1;
	*out = (int64_t)q;
	return 0;
}

/*
 * Converts amount (micro-units) with a rate (FX_SCALE units): multiplied when
 * direct, divided when inverse; rounded once, half away from zero.  Returns
 * 0, or -1 on overflow.
 */
static int
fx_apply(int64_t amount, i128 rate, int inverse, int64_t *out)
{
	i128 n;

	if (rate <= 0)
		return -1;
	if (inverse) {
		if (__builtin_mul_overflow((i128)amount, (i128)FX_SCALE, &n))
			return -1;
		return div_round(n, rate, out);
	}
	if (__builtin_mul_overflow((i128)amount, rate, &n))
		return -1;
	return div_round(n, FX_SCALE, out);
}

/*
 * Parses a positive FX rate with up to 12 decimals and at most 15 integer
 * digits.  Returns 0 and sets *out (FX_SCALE units), or -1.
 */
static int
fx_rate_parse(const char *s, size_t n, i128 *out)
{
	size_t i = 0, digits = 0, decimals = 0;
	i128 v = 0;

	for (; i < n && isdigit((unsigned char)s[i]); i++)
		if (++digits > 15)
			return -1;
		else
			v = v * 10 + (s[i] - '0');
	if (digits == 0)
		return -1;
	if (i < n && s[i] == '.') {
		for (i++; i < n && isdigit((unsigned char)s[i]); i++) {
			if (++decimals > 12)
				return -1;
			v = v * 10 + (s[i] - '0');
		}
		if (decimals == 0)
			return -1;
	}
	if (i != n)
		return -1;
	for (; decimals < 12; decimals++)
		v *= 10;
	if (v <= 0)
		return -1;
	*out = v;
	return 0;
}

/* Formats an FX rate into buf (at least 48 bytes), shortest exact decimal. */
static char *
fx_rate_format(i128 v, char *buf)
{
	unsigned long long whole = (unsigned long long)(v / FX_SCALE);
	unsigned long long frac = (unsigned long long)(v % FX_SCALE);
	int len = snprintf(buf, 48, "%llu.%012llu", whole, frac);

	while (buf[len - 1] == '0')
		buf[--len] = '\0';
	if (buf[len - 1] == '.')
		buf[--len] = '\0';
	return buf;
}

/*
 * Decodes one UTF-8 code point from s[*i..n).  Returns it and advances *i,
 * or returns -1 for an invalid, overlong or surrogate sequence.
 */
static int32_t
utf8_next(const unsigned char *s, size_t n, size_t *i)
{
	unsigned char c = s[*i];
	int32_t cp;
	int more;

	if (c < 0x80) {
		(*i)++;
		return c;
	} else if (c >= 0xc2 && c <= 0xdf) {
		cp = c & 0x1f, more = 1;
	} else if (c >= 0xe0 && c <= 0xef) {
		cp = c & 0x0f, more = 2;
	} else if (c >= 0xf0 && c <= 0xf4) {
		cp = c & 0x07, more = 3;
	} else {
		return -1;
	}
	if (*i + (size_t)more >= n)
		return -1;
	for (int k = 1; k <= more; k++) {
		if ((s[*i + k] & 0xc0) != 0x80)
			return -1;
		cp = (cp << 6) | (s[*i + k] & 0x3f);
	}
	if ((more == 2 && cp < 0x800) || (more == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return -1;
	*i += (size_t)more + 1;
	return cp;
}

/* GSM 03.38 default alphabet (one septet) and extension table (two). */
static const char *const gsm_basic =
	"@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
	"¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
static const char *const gsm_extension = "\f^{}\\[~]|€";

/* Septets per code point below 0x400, and for the euro sign; built once. */
static unsigned char gsm_table[0x400];

static void __attribute__((constructor))
gsm_init(void)
{
	const char *sets[2] = { gsm_basic, gsm_extension };

	for (int k = 0; k < 2; k++) {
		size_t i = 0, n = strlen(sets[k]);

		while (i < n) {
			int32_t cp = utf8_next((const unsigned char *)sets[k], n, &i);

			if (cp >= 0 && cp < 0x400)
				gsm_table[cp] = (unsigned char)(k + 1);
		}
	}
}

/* Septets cp takes in GSM 7-bit (1, or 2 in the extension table), or 0. */
static int
gsm_septets(int32_t cp)
{
	if (cp == 0x20ac) /* the euro sign, in the extension table */
		return 2;
	return cp >= 0 && cp < 0x400 ? gsm_table[cp] : 0;
}

/*
 * Counts the SMS parts of a UTF-8 text the way handsets do: GSM 7-bit
 * (160 septets, 153 per part when split) if every character has a septet
 * code, else UCS-2 (70 units, 67 per part); parts fill greedily and never
 * split an escape pair or a surrogate pair.  Returns 0 and sets *parts, or -1
 * for invalid UTF-8.
 */
static int
sms_segments(const char *text, size_t n, uint32_t *parts)
{
	const unsigned char *s = (const unsigned char *)text;
	uint32_t total = 0, used = 0, count = 1;
	int gsm = 1;
	size_t i = 0;

	while (i < n) {
		int32_t cp = utf8_next(s, n, &i);

		if (cp < 0)
			return -1;
		if (gsm && gsm_septets(cp) == 0)
			gsm = 0;
	}
	for (int pass = 0; pass < 2; pass++) {
		uint32_t cap = gsm ? (pass ? 153 : 160) : (pass ? 67 : 70);

		total = used = 0, count = 1;
		for (i = 0; i < n;) {
			int32_t cp = utf8_next(s, n, &i);
			uint32_t w = gsm ? (uint32_t)gsm_septets(cp) : (cp > 0xffff ? 2 : 1);

			total += w;
			if (used + w > cap)
				count++, used = w;
			else
				used += w;
		}
		if (pass == 0 && total <= cap) {
			*parts = 1;
			return 0;
		}
	}
	*parts = count;
	return 0;
}

/* Returns 1 if s is valid UTF-8 without NUL bytes. */
static int
utf8_valid(const char *text, size_t n)
{
	size_t i = 0;

	while (i < n && (unsigned char)text[i] - 1u < 0x7fu)
		i++; /* ASCII without NUL, the usual case: a compare a byte */
	while (i < n)
		if (text[i] == '\0' || utf8_next((const unsigned char *)text, n, &i) < 0)
			return 0;
	return 1;
}

/* Returns 1 if s is a wallet id: 1-64 of A-Za-z0-9._:- */
static int
valid_wallet_id(struct str s)
{
	if (s.n == 0 || s.n > WALLET_ID_MAX)
		return 0;
	for (size_t i = 0; i < s.n; i++)
		if (!isalnum((unsigned char)s.p[i]) && s.p[i] != '.' && s.p[i] != '_' &&
		    s.p[i] != ':' && s.p[i] != '-')
			return 0;
	return 1;
}

/* Returns 1 if s is 1-64 printable ASCII characters without commas (names). */
static int
valid_name(struct str s, size_t max)
{
	if (s.n == 0 || s.n > max)
		return 0;
	for (size_t i = 0; i < s.n; i++)
		if (s.p[i] <= ' ' || s.p[i] > '~' || s.p[i] == ',')
			return 0;
	return 1;
}

/* Returns 1 if s is 3 upper-case letters, the shape of a currency code. */
static int
currency_shaped(struct str s)
{
	return s.n == 3 && s.p[0] >= 'A' && s.p[0] <= 'Z' && s.p[1] >= 'A' &&
	    s.p[1] <= 'Z' && s.p[2] >= 'A' && s.p[2] <= 'Z';
}

/*
 * The active ISO 4217 codes (and those withdrawn since 2023 that a
 * gateway may still report), without XTS and XXX, space-separated in order.
 * A platform's own units (messaging credits) come from config currencies.
 */
static const char iso4217[] =
	"AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP "
	"BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB "
	"EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HRK HTG HUF IDR ILS INR IQD IRR ISK JMD JOD "
	"JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU "
	"MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD "
	"RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY "
	"TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD "
	"XCG XDR XOF XPD XPF XPT XSU XUA YER ZAR ZMW ZWG ZWL";

/* Whether code (3 letters) is in list (codes separated by spaces or commas). */
static int
currency_in(const char *list, const char *code)
{
	for (const char *p = list; (p = strstr(p, code)) != NULL; p++)
		if ((p == list || p[-1] == ' ' || p[-1] == ',') && (p[3] == '\0' || p[3] == ' ' || p[3] == ','))
			return 1;
	return 0;
}

/*
 * Returns 1 if s is a currency walletd takes: an ISO 4217 code, or one of
 * config currencies (a platform's own units).  Else 0, with the nearest
 * ISO codes in near (same first letter, most letters in common: KSH gives
 * "KES, KGS, KHR"), up to five.
 */
static int
valid_currency(struct str s, const char *units, char near[32])
{
	char code[4];
	int best = 0, named = 0;

	near[0] = '\0';
	if (!currency_shaped(s))
		return 0;
	memcpy(code, s.p, 3);
	code[3] = '\0';
	if (currency_in(iso4217, code) || currency_in(units, code))
		return 1;
	for (int pass = 0; pass < 2; pass++)
		for (const char *p = iso4217; *p; p += p[3] ? 4 : 3) {
			int score = (p[0] == code[0]) * 2, used[3] = { 0 }, n = (int)strlen(near);

			for (int i = 0; i < 3; i++)
				for (int j = 0; j < 3; j++)
					if (!used[j] && code[i] == p[j]) {
						used[j] = 1, score++;
						break;
					}
			if (pass == 0 && score > best)
				best = score;
			else if (pass == 1 && score == best && named++ < 5)
				snprintf(near + n, 32 - (size_t)n, "%s%.3s", n ? ", " : "", p);
		}
	return 0;
}

/*
 * Checks an E.164 destination (optional +, 1-15 digits, the first not 0: a
 * country code never starts with 0, a national number does) and copies its
 * digits into out (16 bytes).  Returns the digit count, or 0 if invalid.
 */
static size_t
e164_digits(struct str s, char *out)
{
	size_t i = 0, n = 0;

	if (s.n > 0 && s.p[0] == '+')
		i = 1;
	if (i < s.n && s.p[i] == '0')
		return 0;
	for (; i < s.n; i++) {
		if (!isdigit((unsigned char)s.p[i]) || n == 15)
			return 0;
		out[n++] = s.p[i];
	}
	out[n] = '\0';
	return n;
}

/* Returns 1 if s looks like an e-mail address: local@domain, no spaces. */
static int
valid_email(struct str s)
{
	const char *at = memchr(s.p, '@', s.n);

	return valid_name(s, 254) && at != NULL && at != s.p &&
	    at < s.p + s.n - 1 && memchr(at + 1, '@', (size_t)(s.p + s.n - at - 1)) == NULL;
}

/* The wall clock, in seconds since the epoch. */
static int64_t
now_seconds(void)
{
	return (int64_t)time(NULL);
}

static uint64_t
now_micros(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Formats t as RFC 3339 UTC (2026-05-02T12:00:01Z) into buf (>= 32 bytes).
 * The last second formatted is kept per thread: charges come many a second. */
static char *
time_format(int64_t t, char *buf)
{
	static _Thread_local int64_t last = INT64_MIN;
	static _Thread_local char text[32];
	struct tm tm;
	time_t tt = (time_t)t;

	if (t != last) {
		gmtime_r(&tt, &tm);
		strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &tm);
		last = t;
	}
	return memcpy(buf, text, sizeof(text));
}

/*
 * Parses RFC 3339 (2026-05-02T12:00:01Z, fractions ignored, or an offset
 * +03:00) or a plain date 2026-05-02.  Returns 0 and sets *out, or -1.
 */
static int
time_parse(struct str s, int64_t *out)
{
	char buf[40], *p;
	struct tm tm;
	long offset = 0;

	if (s.n >= sizeof(buf) || s.n < 10)
		return -1;
	memcpy(buf, s.p, s.n);
	buf[s.n] = '\0';
	memset(&tm, 0, sizeof(tm));
	if ((p = strptime(buf, "%Y-%m-%d", &tm)) == NULL)
		return -1;
	if (*p == 'T' || *p == 't' || *p == ' ') {
		if ((p = strptime(p + 1, "%H:%M:%S", &tm)) == NULL)
			return -1;
		if (*p == '.')
			for (p++; isdigit((unsigned char)*p); p++)
				;
		if (*p == 'Z' || *p == 'z') {
			p++;
		} else if ((*p == '+' || *p == '-') && isdigit((unsigned char)p[1]) &&
		    isdigit((unsigned char)p[2]) && p[3] == ':' &&
		    isdigit((unsigned char)p[4]) && isdigit((unsigned char)p[5])) {
			offset = ((p[1] - '0') * 10 + (p[2] - '0')) * 3600 +
			    ((p[4] - '0') * 10 + (p[5] - '0')) * 60;
			if (*p == '+')
				offset = -offset;
			p += 6;
		} else {
			return -1;
		}
	}
	if (*p != '\0')
		return -1;
	*out = (int64_t)timegm(&tm) + offset;
	return 0;
}

/*
 * A bounded text builder for the charge path, where snprintf was a tenth of
 * the writer's time.  Cuts at cap - 1 bytes and keeps p NUL-terminated.
 */
struct text {
	char *p;
	size_t n, cap;
};

static void
text_add(struct text *t, const char *s, size_t n)
{
	if (n > t->cap - 1 - t->n)
		n = t->cap - 1 - t->n;
	if (n)
		memcpy(t->p + t->n, s, n);
	t->n += n;
	t->p[t->n] = '\0';
}

static void
text_u32(struct text *t, uint32_t v)
{
	char d[10];
	int i = 10;

	do
		d[--i] = (char)('0' + v % 10);
	while ((v /= 10) != 0);
	text_add(t, d + i, (size_t)(10 - i));
}

/* Writes a big-endian u64 into 8 bytes at p. */
static void
be64_put(unsigned char *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (unsigned char)v;
}

static uint64_t
be64_get(const unsigned char *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

/* ---- MessagePack output ---- */

/* Writes the msgpack map header of n fields in 3 bytes (map16), always. */
static void
pack_map16(msgpack_packer *pk, unsigned n)
{
	unsigned char h[3] = { 0xde, (unsigned char)(n >> 8), (unsigned char)n };

	pk->callback(pk->data, (const char *)h, 3);
}

static void
pack_cstr(msgpack_packer *pk, const char *s)
{
	msgpack_pack_str_with_body(pk, s, strlen(s));
}

static void
pack_sstr(msgpack_packer *pk, struct str s)
{
	msgpack_pack_str_with_body(pk, s.p, s.n);
}

static void
pack_amount(msgpack_packer *pk, int64_t v)
{
	char buf[32];

	pack_cstr(pk, amount_format(v, buf, 0));
}

static void
pack_time(msgpack_packer *pk, int64_t t)
{
	char buf[32];

	pack_cstr(pk, time_format(t, buf));
}

/* Packs key k, a string literal (its length is known at compile time: a
 * strlen per key was 8% of a history page), then the value. */
#define KEY(pk, k)          msgpack_pack_str_with_body(pk, "" k, sizeof(k) - 1)
#define KV_STR(pk, k, v)    (KEY(pk, k), pack_cstr(pk, v))
#define KV_SSTR(pk, k, v)   (KEY(pk, k), pack_sstr(pk, v))
#define KV_AMOUNT(pk, k, v) (KEY(pk, k), pack_amount(pk, v))
#define KV_U64(pk, k, v)    (KEY(pk, k), msgpack_pack_uint64(pk, v))
#define KV_TIME(pk, k, v)   (KEY(pk, k), pack_time(pk, v))
#define KV_BOOL(pk, k, v)   (KEY(pk, k), (v) ? msgpack_pack_true(pk) : msgpack_pack_false(pk))

/*
 * Packs key name and a list of n items already packed into rows, then frees
 * rows: lists are packed aside because their length is known only at the end.
 */
static void
pack_rows(msgpack_packer *pk, const char *name, size_t n, msgpack_sbuffer *rows)
{
	pack_cstr(pk, name);
	msgpack_pack_array(pk, n);
	pk->callback(pk->data, rows->data, rows->size);
	msgpack_sbuffer_destroy(rows);
}

/* Packs a page of a list: {name: [...], total, page, limit}. */
static void
pack_page(msgpack_packer *pk, const char *name, size_t n, msgpack_sbuffer *rows,
    uint64_t total, uint64_t page, uint64_t limit)
{
	msgpack_pack_map(pk, 4);
	pack_rows(pk, name, n, rows);
	KV_U64(pk, "total", total);
	KV_U64(pk, "page", page);
	KV_U64(pk, "limit", limit);
}

/* ====================================================================== */
/* 3. Store                                                               */
/* ====================================================================== */

/* ---- Layout ---- */

/*
 * The LMDB environment holds these databases:
 *   meta     "wallet_seq" -> u64: the next wallet number; "version" -> u32;
 *            "journal" -> u64: the journal record the last commit was;
 *            "L" plan \0 channel -> u32: the prefix lengths that have rates
 *            (bit n for length n; set by rate.set, never cleared: a superset)
 *   wallets  wallet id -> struct wallet: its base fields, its extended ones
 *            (credit limit, holds, limits), slot counts and fraud brake
 *            settings when it has them, its allowed prefixes, blocked
 *            prefixes, e-mails and safe prefixes (wallet_decode; layout 4
 *            had nothing after plan but emails)
 *   txns     u64 id (MDB_INTEGERKEY) -> struct txn_head, then (flag
 *            TXN_HASHED, since layout 7: every record) its 32-byte hash in the
 *            ledger's hash chain (txn_hash), then the rest of the
 *            transaction as a msgpack array (txn_pack_stored; layout 3
 *            stored the whole msgpack map, and such records still read):
 *            the append-only log, ids increasing across the store.  The
 *            head links each transaction to the wallet's one before it
 *            (prev), so a wallet's history is a chain from wallet.last_txn
 *            back to 0.
 *   hist     BE64 wallet number . BE64 seq -> u64 txn id, for every
 *            HIST_STRIDE-th transaction of a wallet (seq = k * HIST_STRIDE - 1):
 *            a page starts at most HIST_STRIDE - 1 links from one of these.
 *            A sparse index: a charge writes one seldom, so it does not dirty
 *            a history leaf of its own in most commits.
 *   refs     ref . BE64 wallet number -> u64 txn id . fingerprint: idempotency
 *            (ref first: see ref_key)
 *   refunds  u64 charge id -> u64 refund ids, in order (one per partial refund)
 *   rrefs    refund_ref . BE64 wallet number -> u64 refund id . fingerprint:
 *            a partial refund's idempotency (as refs)
 *   holds    BE64 wallet number . ref -> struct hold (hold_put)
 *   holdexp  BE64 expires_at . BE64 wallet number . ref -> nothing: the active
 *            holds by expiry, for the writer to end them when due
 *   rates    plan \0 channel \0 prefix \0 route -> struct rate_val
 *   fx       BASEQUOTE (6 bytes) -> struct fx_val
 *   topups   ref -> struct topup
 *   notes    BE64 wallet number . BE64 seq -> struct note
 *   alertq   the keys of notes whose e-mail is still to be sent
 *   events   BE64 event number -> struct event, then its JSON body up to its
 *            NUL: what is still to be sent to the webhook (only with webhook_url)
 *   eventq   the keys of events still to be delivered
 *   replog   BE64 stream sequence -> the stream message published or applied
 *            there (replicated only; the last REPLOG_KEEP, for repair)
 *   guard    BE64 wallet number . 's' . prefix -> struct guard_block: a
 *            suspension of the fraud brake; BE64 wallet number . 'c' .
 *            calling code -> struct guard_stats: its daily counts (since
 *            2026-12; created in an older store when it opens)
 *   meta "replication" -> struct repl_pos: the last record applied
 * Numbers inside values are host-endian: a store lives on one host, and the
 * nodes of a replicated group share one byte order (x86-64 and arm64 do).
 *
 * The commit record (README: High availability): a replicated group writes each top-level
 * write transaction as one record in the stream "walletd_<cluster>": a
 * msgpack array of changes [db index (store_dbs), key (bin), value (bin) or
 * nil for a deletion], sorted by db and key, each key once with its final
 * value, the node's own "replication" key and replog left out.  It travels in
 * parts, each one stream message (see repl_part_pack):
 *   [RECORD_VERSION, prev_sha256, id, part, parts, record_sha256, bytes]
 * prev_sha256 is the record before it, so a node applies a record only on top
 * of the history it was made on; record_sha256 checks the parts put together.
 *
 * Flags: MDB_NOTLS (read transactions are reset and renewed, and the helper
 * threads have their own); MDB_NOMEMINIT (LMDB does not zero the unused part
 * of each page it copies: a third of the charge path's instructions were that
 * memset; durability is untouched, the file may hold stale heap bytes in
 * unused space, and it is 0600).  Never MDB_NOSYNC, MDB_NOMETASYNC or
 * MDB_WRITEMAP: every commit is durable, and nested transactions need
 * LMDB's own page copies.
 */
#define STORE_VERSION 7
#define EMAILS_BYTES 1024
#define PREFIXES_BYTES (PREFIXES_MAX * 16)
#define HIST_STRIDE 64

/* The rolling hour of hourly_messages, in HOUR_SLOTS steps of HOUR_SLOT seconds:
 * a message leaves it 55 to 60 minutes after it was charged. */
#define HOUR_SLOTS 12
#define HOUR_SLOT  300

#define WF_FROZEN    1u
#define WF_THRESHOLD 2u
#define WF_DAILY     4u           /* daily_limit set */
#define WF_HOURLY    8u           /* hourly_messages set */
#define WF_CREDIT_EVER 16u        /* a credit limit was set once: past balances may be negative */
#define WF_EXTENDED  32u          /* stored: the record holds the layout 5 fields (wallet_put) */
#define WF_COUNTS    64u          /* stored: the record holds slot_counts (wallet_put) */
#define WF_GUARD     128u         /* stored: the record holds the fraud brake's settings (wallet_put) */
#define WF_PARENT    256u         /* stored: a reseller's child, the record ends with its parent (wallet_put) */
#define WF_AUTO      512u         /* stored: the record holds automatic top-up settings (wallet_put) */
#define WF_SHARED    1024u        /* a reseller's child drawing on its parent; the record holds its draws */
#define WF_LOTS      2048u        /* stored: the record holds its credit lots' total and credit_validity */
#define WF_LOT_HEAD  4096u        /* stored: the record holds its first lot (lots_draw) */

/* The fraud brake's numeric settings: config's guard_* keys, or a wallet's own (bit 1 << G_* of guard_set). */
enum { G_RANGE_MAX, G_WINDOW, G_COUNTRY_SPIKE, G_MIN_MESSAGES, G_BLOCK, G__COUNT };
static const char *const guard_names[G__COUNT] = {
	"guard_range_max", "guard_window", "guard_country_spike", "guard_min_messages", "guard_block",
};
#define GS_SAFE (1u << G__COUNT) /* guard_set: guard_safe is the wallet's own */

/* A wallet's automatic top-up (README: Automatic top-up); provider AP_NONE = none. */
enum auto_provider { AP_NONE, AP_PAYSTACK, AP_FLUTTERWAVE, AP__COUNT };
static const char *const auto_provider_names[AP__COUNT] = { "", "paystack", "flutterwave" };
#define AUTO_ARMED 1u             /* a crossing below `below` requests one (re-armed at or above it) */
#define AUTO_OFF   2u             /* turned off by AUTO_FAILURES_MAX failures in a row */
#define AUTO_FAILURES_MAX 3
struct auto_topup {
	int64_t below;
	int64_t amount;           /* a fixed sum; 0 with to */
	int64_t to;               /* or up to this available balance; 0 with amount */
	int64_t day;              /* the UTC day (since the epoch) that today counts */
	uint32_t today;           /* requests made on that day */
	uint32_t max_per_day;
	uint32_t failures;        /* in a row */
	uint32_t state;           /* AUTO_* */
	uint32_t provider;        /* AP_* */
	uint32_t pad;
	char authorization[129];  /* Paystack's authorization_code, Flutterwave's token */
	char email[255];          /* the payer's, as the gateway knows it */
};
#define AUTO_NUMBERS offsetof(struct auto_topup, authorization)

/*
 * A credit lot: money credited with an expiry or as promo, kept in lots
 * under its wallet's number, its class (LOT_PROMO first), its expires_at
 * (LOT_NEVER last) and its id (the credit's transaction), the order
 * charges draw them in.  An expiring one is also in holdexp, under its
 * expires_at, wallet number, a NUL (no hold's ref has one), its class and
 * id: the writer ends it there, at the second; and under the seconds 7
 * days and 1 day before, the same and the days (a 27-byte key): the
 * writer then records a reminder for the wallet's alert e-mails.
 */
enum { LOT_PROMO, LOT_PAID };
#define LOT_NEVER INT64_MAX
#define LOT_KEY   25
struct lot {
	int64_t amount;
	int64_t remaining;
	int64_t expires_at;       /* LOT_NEVER: it does not expire */
	uint64_t id;
	uint32_t kind;            /* LOT_* */
	uint32_t pad;
	char wallet[WALLET_ID_MAX + 1];
};
#define LOT_FIELDS offsetof(struct lot, wallet) /* a wallet's head lot is stored without its wallet */

struct wallet {
	int64_t balance;
	int64_t threshold;        /* when WF_THRESHOLD */
	int64_t created_at;
	uint64_t number;          /* key prefix of its hist, refs, notes, holds */
	uint64_t txn_count;
	uint64_t last_txn;        /* head of its chain of transactions; 0 = none */
	uint64_t note_count;
	uint32_t flags;
	char currency[4];
	char plan[WALLET_ID_MAX + 1];
	/* Layout 5, stored only with WF_EXTENDED (0 without). */
	int64_t credit_limit;     /* the balance may go down to -credit_limit */
	int64_t held;             /* the remaining of its active holds, added up */
	int64_t hold_expiry;      /* the earliest expires_at among them (holds_active > 0) */
	uint32_t holds_active;
	uint32_t hourly_messages; /* when WF_HOURLY */
	int64_t daily_limit;      /* when WF_DAILY */
	int64_t day;              /* the UTC day (since the epoch) that day_spent counts */
	int64_t day_spent;        /* charged on that day */
	int64_t slot;             /* the last HOUR_SLOT (since the epoch) slot_counts holds */
	uint64_t hour_total;      /* slot_counts added up */
	/* Stored only while hour_total is not 0 (or with WF_HOURLY): every charge is
	 * counted, limit or none, so a limit set mid-hour applies at once. */
	uint32_t slot_counts[HOUR_SLOTS]; /* messages charged in each of the hour's slots, at slot % HOUR_SLOTS */
	/* Stored only with WF_GUARD (with guard_set or guard_until). */
	uint32_t guard_set;       /* which settings are the wallet's own: 1 << G_*, GS_SAFE */
	uint32_t guard[G__COUNT];
	int64_t guard_until;      /* when its last suspension ends: none to look up from then */
	char allowed[PREFIXES_BYTES]; /* comma-separated digit prefixes; "" = any */
	char blocked[PREFIXES_BYTES];
	char emails[EMAILS_BYTES]; /* comma-separated */
	char guard_safe[PREFIXES_BYTES]; /* stored with WF_GUARD only */
	char parent[WALLET_ID_MAX + 1];  /* its reseller's wallet, stored with WF_PARENT only; "" = none */
	struct auto_topup autotop;       /* stored with WF_AUTO only: its numbers, then its two strings */
	/* Stored with WF_SHARED only: what it drew from its parent in a UTC month (credit_limit caps it). */
	struct shared_draws {
		int64_t month;            /* months since 1970-01 */
		int64_t spent;
	} draws;
	/* Stored with WF_LOTS only (README: Credit that expires). */
	struct wallet_lots {
		int64_t total;            /* what its lots hold: the first money spent */
		int64_t validity;         /* credit_validity: seconds a top-up's lot lasts; 0 = it never expires */
		/* Stored with WF_LOT_HEAD only (id not 0): its first lot in draw order, whose remaining
		 * is the true one (its lots record's is as of when it became the head), so that a
		 * charge draws on it without reading or writing lots (lots_draw). */
		struct lot head;
	} lots;
};

#define LOT_REMINDERS { 7, 1 }

/* What a charge took from one lot, kept in its refs entry (up to LOT_DRAWS_MAX lots) for its refunds. */
struct lot_draw {
	int64_t amount;           /* taken */
	int64_t lot_amount;       /* the lot's own amount */
	int64_t expires_at;
	uint64_t id;
	uint32_t kind;
	uint32_t pad;
};
#define LOT_DRAWS_MAX 8
struct lot_draws {
	uint8_t n;
	struct lot_draw d[LOT_DRAWS_MAX];
};

/* A layout 4 wallet record: the fields up to plan, then emails. */
#define WALLET_V4_FIXED (offsetof(struct wallet, plan) + WALLET_ID_MAX + 1)

enum hold_status { HS_ACTIVE, HS_RELEASED, HS_EXPIRED };
static const char *const hold_status_names[] = { "active", "released", "expired" };

/* A hold: money of a wallet reserved for a campaign (README: Holds).  Stored as
 * its fields up to wallet, then wallet, ref and description, each up to its
 * NUL (a charge under it rewrites the record: small is cheaper). */
struct hold {
	int64_t amount;
	int64_t remaining;        /* not yet drawn by charges */
	int64_t created_at;
	int64_t expires_at;
	int64_t closed_at;        /* released or expired; 0 while active */
	uint32_t status;          /* HS_*; HS_EXPIRED is also derived on read past expires_at */
	uint32_t fingerprint;     /* of its params, for idempotency */
	char wallet[WALLET_ID_MAX + 1];
	char ref[REF_MAX + 1];
	char description[256];
};
#define HOLD_FIXED offsetof(struct hold, wallet)

/* The fixed head of a stored transaction: what history filters and verify need. */
struct txn_head {
	uint64_t prev;            /* the wallet's transaction before this one; 0 = first */
	uint64_t seq;             /* its place in the wallet's history, from 0 */
	int64_t amount;
	int64_t balance_after;
	int64_t created_at;
	uint32_t type;
	uint32_t flags;           /* TXN_REPORTED: a charge whose delivery report refs keeps */
};
#define TXN_REPORTED 1u
#define TXN_HASHED   2u /* its hash follows the head (layout 7) */

struct rate_val {
	int64_t price;
	char currency[4];
};

struct fx_val {
	i128 rate;
	int64_t updated_at;
};

enum topup_status { TS_PENDING, TS_PAID, TS_CANCELLED, TS_EXPIRED };
static const char *const topup_status_names[] = { "pending", "paid", "cancelled", "expired" };

struct topup {
	char ref[32];
	char wallet[WALLET_ID_MAX + 1];
	char currency[4];
	int64_t amount;
	int64_t created_at;
	int64_t expires_at;
	int64_t paid_at;
	int64_t paid_amount;      /* what the gateway reported, in paid_currency */
	int64_t credited;         /* what the wallet got, in currency */
	uint64_t txn_id;
	uint32_t status;          /* TS_*; TS_EXPIRED is derived on read */
	uint32_t late;
	char paid_currency[4];
	char provider[64];
	char provider_ref[REF_MAX + 1];
	char checkout_url[1024];
	/* Since layout 5: the last payment reported that could not be credited. */
	int64_t problem_at;       /* 0: none */
	char problem_code[32];
	char problem_message[256];
	/* Since 2026-12: made by an automatic top-up (README: Automatic top-up). */
	uint32_t automatic;
};

enum note_state { NS_PENDING, NS_SENT, NS_FAILED, NS_NO_RECIPIENT };
static const char *const note_state_names[] = { "pending", "sent", "failed", "no_recipient" };

struct note {
	uint64_t txn_id;
	int64_t created_at;
	int64_t balance;
	int64_t threshold;
	int64_t next_attempt;
	int64_t sent_at;
	uint32_t state;
	uint32_t attempts;
	uint32_t reminder;
	char currency[4];
	char wallet[WALLET_ID_MAX + 1];
	char last_error[256];
	char emails[EMAILS_BYTES];
	/* Since layout 5 (an older record reads as a low-balance alert): */
	uint32_t kind;            /* NK_* */
	int64_t amount;           /* a receipt: what was credited */
	char provider_ref[REF_MAX + 1];
	/* Since 2026-12 (a payment problem, or the fraud brake's suspension): */
	uint32_t to_ops;          /* to ops_emails, not the wallet's */
	int64_t until;
	char prefix[16];
	char reason[16];
};

/* An event for the webhook, until it is delivered: its retries, then its JSON body (stored up to its NUL). */
struct event {
	uint64_t number;
	int64_t next_attempt;
	uint32_t attempts;
	uint32_t pad;
	char last_error[256];
	char body[8192];
};
#define EVENT_FIXED offsetof(struct event, body)

/* NK_AUTO_TOPUP is no e-mail: the alert thread charges the saved payment method for its top-up (in provider_ref). */
enum note_kind { NK_LOW_BALANCE, NK_RECEIPT, NK_PAYMENT_PROBLEM, NK_SUSPENDED, NK_AUTO_TOPUP, NK_AUTO_TOPUP_OFF,
	NK_CREDIT_EXPIRING, NK__COUNT };
static const char *const note_kind_names[NK__COUNT] = { "low_balance", "receipt", "payment_problem",
	"destination_suspended", "auto_topup", "auto_topup_off", "credit_expiring" };

enum txn_type {
	T_CREDIT = 1, T_SMS_CHARGE, T_WHATSAPP_CHARGE, T_MANUAL_CREDIT,
	T_MANUAL_DEBIT, T_REFUND, T_TRANSFER_OUT, T_TRANSFER_IN, T_EXPIRY, T__COUNT
};
static const char *const txn_type_names[T__COUNT] = {
	[T_CREDIT] = "credit", [T_SMS_CHARGE] = "sms_charge",
	[T_WHATSAPP_CHARGE] = "whatsapp_charge", [T_MANUAL_CREDIT] = "manual_credit",
	[T_MANUAL_DEBIT] = "manual_debit", [T_REFUND] = "refund",
	[T_TRANSFER_OUT] = "transfer_out", [T_TRANSFER_IN] = "transfer_in", [T_EXPIRY] = "expiry",
};

/* A transaction being written; strings borrowed from the request. */
struct txn {
	uint64_t id;
	int type;
	struct str wallet;
	int64_t amount;
	int64_t balance_after;
	const char *currency;
	char description[600];
	int64_t created_at;
	struct str ref, channel, route, provider, provider_ref;
	struct str hold;            /* the hold a charge drew on, if any */
	char to[18];
	uint32_t segments;
	int64_t price;
	const char *price_currency; /* NULL: no price fields */
	uint64_t refund_of;         /* a refund's charge; a transfer's other transaction (its counterpart) */
	int has_actor;
	uint32_t actor_uid;
	struct str actor;
	struct str origin;          /* the node a forwarded write came through (section 7) */
	int64_t paid_amount;
	const char *paid_currency;  /* NULL unless a top-up was converted */
	const struct charge_fate *fate; /* a charge's delivery report, if it has one */
	struct str fate_error;
	int pending;                /* settle = delivery: held for its report (id 0: nil) */
	int hashed;                 /* hash is its place in the wallet's hash chain */
	unsigned char hash[32];
};

static struct store {
	MDB_env *env;
	MDB_dbi meta, wallets, txns, hist, refs, refunds, rates, fx, topups, notes, alertq;
	MDB_dbi rrefs, holds, holdexp, events, eventq, guard, lots;
	int64_t next_expiry;      /* writer only: when the first active hold expires (INT64_MAX: none) */
	pthread_rwlock_t maplock; /* readers: txns; writer: resizing the map */
	size_t map_size;
	int lock_fd;
	dev_t dir_dev;            /* the store's directory */
	ino_t dir_ino;
	atomic_int panicked;      /* MDB_PANIC seen: walletd is stopping to reopen it */
	MDB_dbi replog;
} store;

static int store_db_of[32]; /* dbi -> its index in store_dbs */

/* The databases, in the order a commit record numbers them: append only. */
static const struct store_db {
	MDB_dbi *dbi;
	const char *name;
	unsigned flags;
	int local;                /* this node's own: never in a stream record */
} store_dbs[] = {
	{ &store.meta, "meta", 0, 0 }, { &store.wallets, "wallets", 0, 0 },
	{ &store.txns, "txns", MDB_INTEGERKEY, 0 }, { &store.hist, "hist", 0, 0 },
	{ &store.refs, "refs", 0, 0 }, { &store.refunds, "refunds", MDB_INTEGERKEY, 0 },
	{ &store.rates, "rates", 0, 0 }, { &store.fx, "fx", 0, 0 },
	{ &store.topups, "topups", 0, 0 }, { &store.notes, "notes", 0, 0 },
	{ &store.alertq, "alertq", 0, 0 }, { &store.rrefs, "rrefs", 0, 0 },
	{ &store.holds, "holds", 0, 0 }, { &store.holdexp, "holdexp", 0, 0 },
	{ &store.events, "events", 0, 0 }, { &store.eventq, "eventq", 0, 0 },
	{ &store.replog, "replog", 0, 1 }, { &store.guard, "guard", 0, 0 },
	{ &store.lots, "lots", 0, 0 },
};
#define STORE_DBS (int)(sizeof(store_dbs) / sizeof(store_dbs[0]))

/* meta "replication": where this node's store stands in the group's stream. */
struct repl_pos {
	uint64_t applied;         /* the stream sequence of the last record applied (its last part) */
	unsigned char sum[32];    /* that record's SHA-256 */
};

/* ---- Change capture ---- */

/*
 * Every write to the store goes through these wrappers (captured_put,
 * captured_del, captured_cursor_del, in a captured_txn_begin transaction;
 * mdb_put and its kin are never called directly), which note (db, key) on
 * the writing thread; the commit record then reads each key's final value
 * from the transaction (record_pack), so a wallet charged 500 times in a
 * batch is written once, to the journal and to the stream alike.  With
 * durability = lmdb and no replication, nothing is noted (one branch a write).
 */
static int capture_on; /* set once at start: a journal or replication needs records */
static int repl_on;    /* set once at start: nats_url is configured */
/* Set when this node takes the lease: the holds (and pending charges) it applied as a follower are
 * unknown to the writer's next_expiry, which looks again (a replicated writer waits a second at most). */
static atomic_int expiry_unknown;

static __thread struct touched {
	char *p;
	size_t len, cap;
	int lost;                 /* out of memory: the record cannot be made */
} touched;

static void
touch(MDB_dbi dbi, const MDB_val *k)
{
	uint32_t head[2] = { dbi, (uint32_t)k->mv_size };
	size_t need = sizeof(head) + k->mv_size;

	if (touched.len + need > touched.cap) {
		size_t cap = touched.cap ? touched.cap : 65536;
		char *p;

		while (cap < touched.len + need)
			cap *= 2;
		if ((p = realloc(touched.p, cap)) == NULL) {
			touched.lost = 1;
			return;
		}
		touched.p = p;
		touched.cap = cap;
	}
	memcpy(touched.p + touched.len, head, sizeof(head));
	memcpy(touched.p + touched.len + sizeof(head), k->mv_data, k->mv_size);
	touched.len += need;
}

/* At the end of a thread that wrote. */
static void
touched_free(void)
{
	free(touched.p);
	memset(&touched, 0, sizeof(touched));
}

/* Begins a write transaction of the store: what it writes is noted from nothing. */
static int
captured_txn_begin(MDB_txn **txn)
{
	if (capture_on)
		touched.len = 0, touched.lost = 0;
	return mdb_txn_begin(store.env, NULL, 0, txn);
}

static int
captured_put(MDB_txn *txn, MDB_dbi dbi, MDB_val *k, MDB_val *v, unsigned flags)
{
	if (capture_on)
		touch(dbi, k);
	return mdb_put(txn, dbi, k, v, flags);
}

static int
captured_del(MDB_txn *txn, MDB_dbi dbi, MDB_val *k, MDB_val *v)
{
	if (capture_on)
		touch(dbi, k);
	return mdb_del(txn, dbi, k, v);
}

static int
captured_cursor_del(MDB_cursor *cur, unsigned flags)
{
	MDB_val k, v;

	if (capture_on && mdb_cursor_get(cur, &k, &v, MDB_GET_CURRENT) == 0)
		touch(mdb_cursor_dbi(cur), &k);
	return mdb_cursor_del(cur, flags);
}

struct touch_ref {
	uint32_t db, len;
	const char *key;
};

static int
touch_ref_cmp(const void *a, const void *b)
{
	const struct touch_ref *x = a, *y = b;
	int c;

	if (x->db != y->db)
		return x->db < y->db ? -1 : 1;
	if ((c = memcmp(x->key, y->key, x->len < y->len ? x->len : y->len)) != 0)
		return c;
	return (x->len > y->len) - (x->len < y->len);
}

/* Whether (db index, key) is this node's own, never in a stream record: its position, its replog. */
static int
key_node_local(int db, const char *key, uint32_t len)
{
	return store_dbs[db].local ||
	    (db == 0 && ((len == 11 && memcmp(key, "replication", 11) == 0) || (len == 7 && memcmp(key, "journal", 7) == 0)));
}

/*
 * Packs what the writing thread's transaction txn changed as a commit
 * record (see the layout): every key touched, once, with its final value;
 * for the stream, without this node's own keys (key_node_local).  Returns 0,
 * ENOMEM, or an LMDB error.
 */
static int
record_pack(MDB_txn *txn, msgpack_sbuffer *out, int stream)
{
	struct touch_ref *refs;
	msgpack_packer pk;
	size_t n = 0, count = 0;
	uint32_t head[2];
	int rc = 0;

	if (touched.lost)
		return ENOMEM;
	for (size_t off = 0; off < touched.len; off += sizeof(head) + head[1], n++)
		memcpy(head, touched.p + off, sizeof(head));
	if ((refs = malloc((n ? n : 1) * sizeof(*refs))) == NULL)
		return ENOMEM;
	n = 0;
	for (size_t off = 0; off < touched.len; off += sizeof(head) + head[1]) {
		const char *key = touched.p + off + sizeof(head);
		int db;

		memcpy(head, touched.p + off, sizeof(head));
		db = head[0] < 32 ? store_db_of[head[0]] : -1;
		if (db >= 0 && !(stream && key_node_local(db, key, head[1])))
			refs[n++] = (struct touch_ref){ (uint32_t)db, head[1], key };
	}
	if (n)
		qsort(refs, n, sizeof(*refs), touch_ref_cmp);
	for (size_t i = 0; i < n; i++)
		if (count == 0 || touch_ref_cmp(&refs[count - 1], &refs[i]) != 0)
			refs[count++] = refs[i];
	msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, (uint32_t)count);
	for (size_t i = 0; i < count && rc == 0; i++) {
		MDB_val k = { refs[i].len, (void *)refs[i].key }, v;

		if ((rc = mdb_get(txn, *store_dbs[refs[i].db].dbi, &k, &v)) != 0 && rc != MDB_NOTFOUND)
			break;
		msgpack_pack_array(&pk, 3);
		msgpack_pack_uint32(&pk, refs[i].db);
		msgpack_pack_bin_with_body(&pk, k.mv_data, k.mv_size);
		if (rc == 0)
			msgpack_pack_bin_with_body(&pk, v.mv_data, v.mv_size);
		else
			msgpack_pack_nil(&pk);
		rc = 0;
	}
	free(refs);
	return rc;
}

static int record_chain(MDB_txn *txn, const msgpack_object *r);
static int chain_one(MDB_txn *txn, uint64_t id, int captured);

/*
 * Applies a record's changes to txn (a stream record's: never to this
 * node's own databases; one of an older release gets its hashes here).
 * Returns an LMDB error, or EINVAL if it does not decode.
 */
static int
record_apply(MDB_txn *txn, const char *p, size_t n, int stream)
{
	msgpack_unpacked u;
	const msgpack_object *o;
	int rc = 0;

	msgpack_unpacked_init(&u);
	if (msgpack_unpack_next(&u, p, n, NULL) != MSGPACK_UNPACK_SUCCESS || u.data.type != MSGPACK_OBJECT_ARRAY) {
		msgpack_unpacked_destroy(&u);
		return EINVAL;
	}
	for (uint32_t i = 0; i < u.data.via.array.size && rc == 0; i++) {
		MDB_val k, v;

		o = &u.data.via.array.ptr[i];
		if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 3 ||
		    o->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
		    o->via.array.ptr[0].via.u64 >= (uint64_t)STORE_DBS ||
		    (stream && store_dbs[o->via.array.ptr[0].via.u64].local) || o->via.array.ptr[1].type != MSGPACK_OBJECT_BIN) {
			rc = EINVAL;
			break;
		}
		k = (MDB_val){ o->via.array.ptr[1].via.bin.size, (void *)o->via.array.ptr[1].via.bin.ptr };
		if (o->via.array.ptr[2].type == MSGPACK_OBJECT_NIL) {
			if ((rc = captured_del(txn, *store_dbs[o->via.array.ptr[0].via.u64].dbi, &k, NULL)) == MDB_NOTFOUND)
				rc = 0;
		} else if (o->via.array.ptr[2].type == MSGPACK_OBJECT_BIN) {
			v = (MDB_val){ o->via.array.ptr[2].via.bin.size, (void *)o->via.array.ptr[2].via.bin.ptr };
			rc = captured_put(txn, *store_dbs[o->via.array.ptr[0].via.u64].dbi, &k, &v, 0);
		} else {
			rc = EINVAL;
		}
	}
	if (rc == 0 && stream)
		rc = record_chain(txn, &u.data);
	msgpack_unpacked_destroy(&u);
	return rc;
}

static int
u64_order(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

/*
 * After a stream record r (applied in txn): hashes the transactions it
 * wrote without their hash (a leader of a release before the hash chain),
 * in id order, as a leader of this release would have (so a group's nodes
 * may be upgraded one by one, the leader last).  0 or an LMDB error.
 */
static int
record_chain(MDB_txn *txn, const msgpack_object *r)
{
	uint64_t *ids = NULL;
	size_t n = 0;
	int rc = 0;

	for (uint32_t i = 0; i < r->via.array.size; i++) {
		const msgpack_object *c = r->via.array.ptr[i].via.array.ptr;
		struct txn_head h;

		if (store_dbs[c[0].via.u64].dbi == &store.txns && c[1].via.bin.size == 8 && c[2].type == MSGPACK_OBJECT_BIN &&
		    c[2].via.bin.size > sizeof(h) && (memcpy(&h, c[2].via.bin.ptr, sizeof(h)), !(h.flags & TXN_HASHED))) {
			if (ids == NULL && (ids = malloc(r->via.array.size * sizeof(*ids))) == NULL)
				return ENOMEM;
			memcpy(&ids[n++], c[1].via.bin.ptr, 8);
		}
	}
	if (n > 1)
		qsort(ids, n, sizeof(*ids), u64_order);
	for (size_t i = 0; i < n && rc == 0; i++)
		rc = chain_one(txn, ids[i], 1);
	free(ids);
	return rc;
}

/* ---- Opening, growing, committing ---- */

/*
 * Once a commit's meta page write fails, LMDB refuses every transaction with
 * MDB_PANIC until the environment is reopened, so staying up would answer
 * internal to every request, pings and balances included.  walletd stops as
 * on SIGTERM and exits 1, so that its supervisor (systemd's
 * Restart=on-failure) restarts it, and the store reopens at its last durable
 * commit.  Any thread may call this.
 */
static void
store_panic(void)
{
	if (atomic_exchange(&store.panicked, 1) == 0) {
		log_x(L_ERR, "the store had a fatal error (LMDB: MDB_PANIC, a failed write of its meta page); "
		    "stopping so that a restart reopens it at its last durable commit");
		kill(getpid(), SIGTERM);
	}
}

/*
 * The refs key of (wallet, ref): the ref, then the wallet's number.  Ref
 * first, so refs that increase (message ids from a sequence, ULIDs, UUIDv7)
 * land on the last leaf whatever wallet they charge: a commit of many charges
 * dirties one or two refs pages, not one per wallet.  The number's fixed
 * width keeps the key unambiguous.
 */
static MDB_val
ref_key(unsigned char key[REF_MAX + 8], struct str ref, uint64_t number)
{
	memcpy(key, ref.p, ref.n);
	be64_put(key + ref.n, number);
	return (MDB_val){ ref.n + 8, key };
}

/*
 * Layout 2 keyed refs by wallet number, then ref; layout 3 (ref_key) by ref,
 * then number.  Re-keys them in txn: into a scratch database, then back.
 */
static int
store_rekey_refs(MDB_txn *txn)
{
	MDB_dbi tmp;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc, pass;

	if ((rc = mdb_dbi_open(txn, "refs-rekey", MDB_CREATE, &tmp)) != 0)
		return rc;
	for (pass = 0; pass < 2; pass++) {
		MDB_dbi from = pass ? tmp : store.refs, to = pass ? store.refs : tmp;

		if ((rc = mdb_cursor_open(txn, from, &cur)) != 0)
			return rc;
		for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
		    rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
			unsigned char key[REF_MAX + 8];
			MDB_val nk = k;

			if (pass == 0) {
				if (k.mv_size < 8 || k.mv_size > REF_MAX + 8) {
					rc = MDB_CORRUPTED;
					break;
				}
				nk = ref_key(key, (struct str){ (char *)k.mv_data + 8, k.mv_size - 8 },
				    be64_get(k.mv_data));
			}
			if ((rc = captured_put(txn, to, &nk, &v, pass ? MDB_APPEND : 0)) != 0)
				break;
		}
		mdb_cursor_close(cur);
		if (rc != MDB_NOTFOUND || (rc = mdb_drop(txn, from, pass)) != 0)
			return rc;
	}
	return 0;
}

/*
 * The map is reserved at its largest from the start (1 TiB of address space:
 * no memory, no disk), so it never has to grow.  A grow waits for every
 * read, and a read that runs long (a backup, a verify of a large store) also
 * keeps LMDB from reusing pages, so the store grows fastest just when the map
 * cannot: with the map filling, charges waited for the backup to end.  Where
 * the system refuses so large a map (a limit on address space), the map starts
 * at MAP_FALLBACK and grows (store_grow).
 */
#define MAP_FALLBACK (64u << 20)

/*
 * Opens the LMDB environment with a map of store.map_size bytes; with
 * nosync, its commits are not synced (a checkpoint was restored: its pin
 * keeps them from harming it).
 */
static int
store_env_open(const char *dir, int nosync)
{
	int rc;

	if ((rc = mdb_env_create(&store.env)) != 0)
		return rc;
	if ((rc = mdb_env_set_maxdbs(store.env, 24)) != 0 ||
	    (rc = mdb_env_set_maxreaders(store.env, 256)) != 0 ||
	    (rc = mdb_env_set_mapsize(store.env, store.map_size)) != 0 ||
	    (rc = mdb_env_open(store.env, dir, MDB_NOTLS | MDB_NOMEMINIT | (nosync ? MDB_NOSYNC : 0), 0600)) != 0) {
		mdb_env_close(store.env);
		store.env = NULL;
	}
	return rc;
}

static int wallet_put(MDB_txn *txn, struct str id, const struct wallet *w);

/* Rewrites every wallet record of layout 4 or before as layout 5: the new
 * fields 0 (no credit limit, no holds, no spend controls). */
static int
store_upgrade_wallets(MDB_txn *txn)
{
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, store.wallets, &cur)) != 0)
		return rc;
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		char id[WALLET_ID_MAX];
		struct wallet w;
		size_t tail;

		if (v.mv_size <= WALLET_V4_FIXED || k.mv_size > WALLET_ID_MAX) {
			rc = MDB_CORRUPTED;
			break;
		}
		memset(&w, 0, sizeof(w));
		memcpy(&w, v.mv_data, WALLET_V4_FIXED);
		tail = v.mv_size - WALLET_V4_FIXED;
		memcpy(w.emails, (char *)v.mv_data + WALLET_V4_FIXED, tail < EMAILS_BYTES ? tail : EMAILS_BYTES - 1);
		memcpy(id, k.mv_data, k.mv_size); /* the key's bytes are the page's, which the put rewrites */
		if ((rc = wallet_put(txn, (struct str){ id, k.mv_size }, &w)) != 0)
			break;
	}
	mdb_cursor_close(cur);
	return rc == MDB_NOTFOUND ? 0 : rc;
}

static int store_grow(int wait);
static int txn_read(MDB_txn *txn, uint64_t id, struct txn_head *h, MDB_val *raw);
static int chain_get(MDB_txn *txn, uint64_t id, unsigned char out[32]);
static int txn_fetch(MDB_txn *txn, uint64_t id, struct txn_head *h, MDB_val *rec);
static int txn_map_hash(const msgpack_object *m, const unsigned char prev[32], unsigned char out[32]);

/*
 * Hashes stored transaction id (without its hash yet), after its wallet's
 * one before it (hashed already), and writes its record again with the
 * hash; captured: as a change of the commit (else the store's own, an
 * upgrade's).  0 or an LMDB error.
 */
static int
chain_one(MDB_txn *txn, uint64_t id, int captured)
{
	unsigned char prev[32], hash[32];
	struct txn_head h;
	msgpack_unpacked m;
	MDB_val raw, rec, k = { sizeof(id), &id }, v;
	int rc;

	if ((rc = txn_fetch(txn, id, &h, &rec)) != 0 || (h.flags & TXN_HASHED))
		return rc; /* hashed already: nothing to do */
	if ((rc = txn_read(txn, id, NULL, &raw)) != 0 || (rc = chain_get(txn, h.prev, prev)) != 0)
		return rc;
	msgpack_unpacked_init(&m);
	if (msgpack_unpack_next(&m, raw.mv_data, raw.mv_size, NULL) != MSGPACK_UNPACK_SUCCESS ||
	    txn_map_hash(&m.data, prev, hash) != 0)
		rc = MDB_CORRUPTED;
	msgpack_unpacked_destroy(&m);
	if (rc != 0)
		return rc;
	h.flags |= TXN_HASHED; /* rec still points at the stored record: nothing was written since */
	v = (MDB_val){ sizeof(h) + sizeof(hash) + rec.mv_size, NULL };
	if ((v.mv_data = malloc(v.mv_size)) == NULL)
		return ENOMEM;
	memcpy(v.mv_data, &h, sizeof(h));
	memcpy((char *)v.mv_data + sizeof(h), hash, sizeof(hash));
	memcpy((char *)v.mv_data + sizeof(h) + sizeof(hash), rec.mv_data, rec.mv_size);
	rc = captured ? captured_put(txn, store.txns, &k, &v, 0) : mdb_put(txn, store.txns, &k, &v, 0);
	free(v.mv_data);
	return rc;
}

/* Hashes every transaction of a store of layout 6 or before into the chain, in id order. */
static int
store_chain_all(MDB_txn *txn)
{
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, store.txns, &cur)) != 0)
		return rc;
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		uint64_t id;

		memcpy(&id, k.mv_data, sizeof(id));
		if ((rc = chain_one(txn, id, 0)) != 0)
			break;
		k = (MDB_val){ sizeof(id), &id }; /* the record was written again: find its place anew */
		if ((rc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY)) != 0)
			break;
	}
	mdb_cursor_close(cur);
	return rc == MDB_NOTFOUND ? 0 : rc;
}

/* Sets store.next_expiry from holdexp's first key (INT64_MAX: no active hold). */
static int
store_first_expiry(MDB_txn *txn)
{
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	store.next_expiry = INT64_MAX;
	if ((rc = mdb_cursor_open(txn, store.holdexp, &cur)) != 0)
		return rc;
	if ((rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST)) == 0 && k.mv_size >= 8)
		store.next_expiry = (int64_t)be64_get(k.mv_data);
	mdb_cursor_close(cur);
	return rc == MDB_NOTFOUND ? 0 : rc;
}

/*
 * Brings the store in txn to layout STORE_VERSION: layout 2 has its refs
 * re-keyed; layout 3 is read as it is (its records still decode); layouts
 * 4 and before have their wallets rewritten; layout 5 reads as it is (6
 * adds meta "journal" and wallet records with WF_COUNTS, which layout 5's
 * walletd would misread); layouts 6 and before have every transaction
 * hashed into the chain; a new store is stamped.  Then sets store.next_expiry
 * (store_first_expiry).  Returns 0, an LMDB error, or -1 (a message logged)
 * for a layout this walletd does not read.
 */
static int
store_upgrade(MDB_txn *txn, const char *dir)
{
	uint32_t version = STORE_VERSION, found = STORE_VERSION;
	MDB_val k = { 7, "version" }, v;
	int rc = mdb_get(txn, store.meta, &k, &v);

	if (rc == 0 && v.mv_size == sizeof(found))
		memcpy(&found, v.mv_data, sizeof(found));
	else if (rc != 0 && rc != MDB_NOTFOUND)
		return rc;
	if (found != version && (found < 2 || found > 6)) {
		log_x(L_ERR, "store %s has layout version %u; this walletd reads version %u", dir, found, version);
		return -1;
	}
	if (found == 2) {
		log_x(L_INFO, "store %s: moving idempotency refs to layout %u", dir, version);
		if ((rc = store_rekey_refs(txn)) != 0)
			return rc;
	}
	if (found < 5) {
		log_x(L_INFO, "store %s: wallets to layout %u (credit limits, holds, spend controls)", dir, version);
		if ((rc = store_upgrade_wallets(txn)) != 0)
			return rc;
	}
	if (found < 6)
		log_x(L_INFO, "store %s: to layout 6 (journaled; spend counted without limits)", dir);
	if (found < 7) {
		log_x(L_INFO, "store %s: to layout 7 (every transaction hash-chained)", dir);
		if ((rc = store_chain_all(txn)) != 0)
			return rc;
	}
	v = (MDB_val){ sizeof(version), &version };
	return (rc = captured_put(txn, store.meta, &k, &v, 0)) ? rc : store_first_expiry(txn);
}

/* Opens (makes, if new) the store's databases in txn. */
static int
store_open_dbs(MDB_txn *txn, const char *dir)
{
	(void)dir;
	for (int i = 0; i < STORE_DBS; i++) {
		int rc = mdb_dbi_open(txn, store_dbs[i].name, store_dbs[i].flags | MDB_CREATE, store_dbs[i].dbi);

		if (rc != 0)
			return rc;
		store_db_of[*store_dbs[i].dbi] = (int)i;
	}
	return 0;
}

/*
 * Runs step in a write transaction of its own and commits it, the map grown
 * and all of it again whenever it, or the commit, finds the map full (a
 * journal replayed may have filled it).  Returns 0, an LMDB error, or
 * step's -1 (logged).
 */
static int
store_write_growing(int (*step)(MDB_txn *, const char *), const char *dir)
{
	MDB_txn *txn;
	int rc;

	for (;;) {
		if ((rc = captured_txn_begin(&txn)) != 0)
			return rc;
		if ((rc = step(txn, dir)) != 0)
			mdb_txn_abort(txn);
		else if ((rc = mdb_txn_commit(txn)) == 0)
			return 0;
		if (rc != MDB_MAP_FULL || store_grow(1) != 0)
			return rc;
	}
}

struct checkpoint_file;
static int journal_restore(const char *dir, struct checkpoint_file *f);
static int journal_pin(const struct checkpoint_file *f);
static int journal_recover(const struct checkpoint_file *f);
static int journal_ready(const char *dir, int restored);

/*
 * Opens (creating) the store in dir: put back to its last checkpoint and
 * its journal applied again (section "Journal and checkpoints"), upgraded to
 * this layout, checkpointed.  Returns 0, or -1 with a message logged.
 */
static int
store_open(const char *dir)
{
	char path[PATH_MAX + 32];
	unsigned char cp[512];    /* a struct checkpoint_file */
	pthread_rwlockattr_t attr;
	MDB_envinfo info;
	struct stat st;
	size_t fallback;
	int rc, restored;

	if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
		log_p("cannot create store directory %s", dir);
		return -1;
	}
	snprintf(path, sizeof(path), "%s/walletd.lock", dir);
	if ((store.lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) < 0) {
		log_p("cannot open %s", path);
		return -1;
	}
	if (flock(store.lock_fd, LOCK_EX | LOCK_NB) != 0) {
		log_x(L_ERR, "store %s is in use by another walletd", dir);
		return -1;
	}
	if (stat(dir, &st) == 0) {
		store.dir_dev = st.st_dev;
		store.dir_ino = st.st_ino;
	}
	pthread_rwlockattr_init(&attr);
	pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&store.maplock, &attr);
	if ((restored = journal_restore(dir, (struct checkpoint_file *)cp)) < 0)
		return -1;
	snprintf(path, sizeof(path), "%s/data.mdb", dir);
	if (stat(path, &st) != 0)
		st.st_size = 0;
	store.map_size = config.map_size < config.map_size_max ? config.map_size : config.map_size_max;
	if ((size_t)st.st_size > store.map_size)
		store.map_size = (size_t)st.st_size;
	fallback = (size_t)st.st_size > MAP_FALLBACK ? (size_t)st.st_size : MAP_FALLBACK;
	if ((rc = store_env_open(dir, restored)) == ENOMEM && store.map_size > fallback) {
		log_x(L_WARN, "cannot map %zu bytes for the store (a limit on address space?): "
		    "mapping %zu and growing it as the store fills", store.map_size, fallback);
		store.map_size = fallback;
		rc = store_env_open(dir, restored);
	}
	if (rc != 0) {
		log_x(L_ERR, "cannot open store %s: %s", dir, mdb_strerror(rc));
		return -1;
	}
	mdb_env_info(store.env, &info);
	store.map_size = info.me_mapsize;
	/* Pins the checkpoint before the first commit (journal_recover), opens the databases,
	 * applies the journal, then upgrades the layout: records are of the layout they were made in. */
	if (restored && journal_pin((struct checkpoint_file *)cp) != 0)
		return -1;
	if ((rc = store_write_growing(store_open_dbs, dir)) != 0)
		goto fail;
	if (restored && journal_recover((struct checkpoint_file *)cp) != 0)
		return -1;
	if ((rc = store_write_growing(store_upgrade, dir)) < 0)
		return -1;
	if (rc != 0)
		goto fail;
	if (journal_ready(dir, restored) != 0)
		return -1;
	return 0;
fail:
	log_x(L_ERR, "cannot initialise store %s: %s", dir, mdb_strerror(rc));
	return -1;
}

/*
 * Doubles the map, up to map_size_max.  Called by the writer with no write
 * transaction open.  Growing needs every reader gone: with wait it waits for
 * them, without it gives up at once if one is there.  Returns 0, or -1 if the
 * map is already at its maximum or did not grow.
 */
static int
store_grow(int wait)
{
	size_t next = store.map_size * 2;
	int rc;

	if (next > config.map_size_max)
		next = config.map_size_max;
	if (next <= store.map_size)
		return -1;
	if (wait)
		pthread_rwlock_wrlock(&store.maplock);
	else if (pthread_rwlock_trywrlock(&store.maplock) != 0)
		return -1;
	rc = mdb_env_set_mapsize(store.env, next);
	pthread_rwlock_unlock(&store.maplock);
	if (rc != 0) {
		log_x(L_ERR, "cannot grow the map to %zu bytes: %s", next, mdb_strerror(rc));
		return -1;
	}
	log_x(L_INFO, "map grown from %zu to %zu bytes", store.map_size, next);
	store.map_size = next;
	return 0;
}

/* ---- Room ahead ---- */

/*
 * Room ahead.  A commit's fdatasync costs more when the commit made the file
 * longer: ext4 must also make the inode's new size and block map durable
 * (measured here: 16 pages, 149 us written within the file, 268 us appended,
 * 198 us into fallocated space, whose unwritten extents are metadata work as
 * well).  LMDB appends, so a helper thread keeps the file written
 * with zeros AHEAD_BYTES past LMDB's last page, in the background, and every
 * commit writes inside the file.  LMDB writes the file only in
 * mdb_txn_commit, which runs under ahead.lock (store_commit); the helper
 * writes, under the same lock, only past the last committed page, so its
 * zeros can land only on pages no commit has written yet.  It syncs each
 * step at once: zeros left dirty would be flushed by the next commit's
 * fdatasync (p99.9 of a commit was 4.5 ms with 8 MiB synced at a time,
 * 0.9-1.4 ms with a sync per step).  The file stays up to AHEAD_BYTES longer
 * than the store; a backup copies only the store.  With durability = journal
 * the helper does the same for the journal's file being written (measured:
 * 512 bytes synced, 223 us appended, 135 us written within the file), up to
 * the segment's size; the writer writes an entry under ahead.lock.
 */
#define AHEAD_BYTES (16u << 20)
#define AHEAD_STEP  (256u << 10)

static struct {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_t thread;
	int fd, own_fd, stop, running;
	off_t end;             /* the file is written up to here */
	uint64_t used;         /* its data ends here: LMDB's pages as of the last commit, or the journal's entries */
	uint64_t cap;          /* the file needs no zeros past here (0: no cap) */
} ahead = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER, .fd = -1 };

/* The end of LMDB's last page, as of the last commit. */
static uint64_t
store_used(void)
{
	MDB_envinfo info;
	MDB_stat st;

	mdb_env_info(store.env, &info);
	mdb_env_stat(store.env, &st);
	return (uint64_t)(info.me_last_pgno + 1) * st.ms_psize;
}

/* Whether LMDB refuses every transaction after a failed commit (MDB_PANIC): then stops walletd (store_panic). */
static int
store_panicked(void)
{
	MDB_txn *probe;
	int rc = mdb_txn_begin(store.env, NULL, MDB_RDONLY, &probe);

	if (rc == 0)
		mdb_txn_abort(probe);
	else if (rc == MDB_PANIC)
		store_panic();
	return rc == MDB_PANIC;
}

/* Commits a top-level write transaction (see Room ahead); a failed commit
 * that leaves LMDB refusing every transaction stops walletd at once
 * (store_panic), not at the next request. */
static int
store_commit_local(MDB_txn *txn)
{
	int rc;

	pthread_mutex_lock(&ahead.lock);
	rc = mdb_txn_commit(txn);
	if (ahead.own_fd) { /* data.mdb's room ahead, with durability = lmdb */
		ahead.used = store_used();
		if (ahead.running && (uint64_t)ahead.end < ahead.used + AHEAD_BYTES / 2)
			pthread_cond_signal(&ahead.cond);
	}
	pthread_mutex_unlock(&ahead.lock);
	if (rc != 0)
		store_panicked();
	return rc;
}

static void *
ahead_main(void *arg)
{
	static const char zeros[AHEAD_STEP];
	int logged = 0;

	(void)arg;
	pthread_mutex_lock(&ahead.lock);
	while (!ahead.stop) {
		uint64_t target = ahead.used + AHEAD_BYTES;
		off_t at;
		ssize_t n;

		if (ahead.cap && target > ahead.cap)
			target = ahead.cap;
		if (ahead.fd < 0 || (uint64_t)ahead.end >= target) {
			pthread_cond_wait(&ahead.cond, &ahead.lock);
			continue;
		}
		at = ahead.end > (off_t)ahead.used ? ahead.end : (off_t)ahead.used;
		if ((n = pwrite(ahead.fd, zeros, AHEAD_STEP, at)) != (ssize_t)AHEAD_STEP) {
			/* A full disk, say: commits still work, only dearer. */
			if (!logged++)
				log_x(L_WARN, "cannot write room ahead in the store file: %s",
				    n < 0 ? strerror(errno) : "short write (is the disk full?)");
			ahead.end = (off_t)target;
			continue;
		}
		ahead.end = at + AHEAD_STEP;
		n = ahead.fd;
		pthread_mutex_unlock(&ahead.lock);
		fdatasync((int)n);
		pthread_mutex_lock(&ahead.lock);
	}
	pthread_mutex_unlock(&ahead.lock);
	return NULL;
}

/* Starts the helper; without it commits only cost more.  dir: the store's. */
static void
ahead_start(const char *dir)
{
	char path[PATH_MAX + 32];
	struct stat st;

	snprintf(path, sizeof(path), "%s/data.mdb", dir);
	if ((ahead.fd = open(path, O_WRONLY | O_CLOEXEC)) < 0 || fstat(ahead.fd, &st) != 0) {
		log_p("cannot open %s to keep room ahead", path);
		return;
	}
	pthread_mutex_lock(&ahead.lock);
	ahead.own_fd = 1;
	ahead.end = st.st_size;
	ahead.used = store_used();
	ahead.running = pthread_create(&ahead.thread, NULL, ahead_main, NULL) == 0;
	pthread_mutex_unlock(&ahead.lock);
}

/*
 * Points the helper at fd, a journal file written up to used, whose entries
 * end at cap (the segment's size); ahead.lock held.
 */
static void
ahead_follow(int fd, uint64_t used, uint64_t cap)
{
	struct stat st;

	if (ahead.fd != fd) {
		ahead.fd = fd;
		ahead.end = fstat(fd, &st) == 0 ? st.st_size : 0;
	}
	ahead.used = used;
	ahead.cap = cap;
	pthread_cond_signal(&ahead.cond);
}

static void
ahead_stop(void)
{
	pthread_mutex_lock(&ahead.lock);
	ahead.stop = 1;
	pthread_cond_signal(&ahead.cond);
	pthread_mutex_unlock(&ahead.lock);
	if (ahead.running)
		pthread_join(ahead.thread, NULL);
	if (ahead.fd >= 0 && ahead.own_fd)
		close(ahead.fd);
}

/* ---- Journal and checkpoints ---- */

/*
 * Durability (README: How it is built).  With durability = journal (the default) a commit is
 * one sequential append: a write transaction's record (every key it
 * changed, with its final value: the commit record of section 7, here with
 * the node's own keys too) is appended to the journal and synced, then LMDB
 * commits without a sync of its own (MDB_NOSYNC), then the writer answers.
 * LMDB is made durable at checkpoints, in two halves:
 *   - the capture, by whoever holds LMDB's write lock (a commit that finds
 *     one due, or the idle writer): a read transaction pinning the last
 *     commit T, so that LMDB reuses no page T's trees reference; T's meta
 *     page; the journal record N it holds last and where the next begins;
 *   - the checkpoint thread: fdatasync data.mdb (every page of T is then on
 *     disk), the side file "checkpoint" written, synced, renamed into place,
 *     the directory synced; then the previous checkpoint's pin is released.
 * At every start, before LMDB opens the store, the checkpoint's meta page
 * is written into both of data.mdb's meta slots (store_restore): the store
 * is then exactly the checkpoint, whatever a power cut left of the writes
 * after it (LMDB's newest meta may point at pages that never reached the
 * disk), and the journal's records after N are applied again, in order, up
 * to the first that is torn or corrupt: it was never answered.  A store
 * without a side file (a new one, one of the release before the journal, a
 * backup restored into an empty directory) was synced by LMDB itself.
 *
 * The journal is a ring of JOURNAL_FILES files journal.0 ... journal.3, of
 * segments of checkpoint_bytes / 2: segment k in file k % JOURNAL_FILES.
 * An entry that does not fit in what is left of its segment starts the next
 * one (an entry larger than a segment makes its file longer).  An entry:
 *   u32 JOURNAL_MAGIC, u32 length, u64 number, u8 sha256[32], record
 * where sha256 covers the number, the length and the record, and numbers
 * follow one another.  The writer enters segment k only when the durable
 * checkpoint lies in segment k - JOURNAL_FILES + 1 or later: a file is
 * reused only once everything it held is in a checkpoint.
 */
#define JOURNAL_FILES  4
#define JOURNAL_MAGIC  0x314a4457u        /* "WDJ1" */
#define JOURNAL_HEAD   48
#define CHECKPOINT_MAGIC 0x31504357u      /* "WCP1" */
#define META_BYTES     152                /* a meta page's header and MDB_meta (LMDB 0.9) */
#define HANDED_MAX     256                /* batches handed to the syncer at most (then the writer waits) */
#define META_TXNID     144                /* where in a meta page its txnid is */
#define META_LAST_PG   136                /* its last page number */
#define META_MAGIC     16                 /* its magic number, */
#define MDB_META_MAGIC 0xBEEFC0DEu        /* this (LMDB's MDB_MAGIC) */

struct journal_pos {
	uint64_t segment, offset;
};

/* The side file: what a restore puts back (store_restore). */
struct checkpoint_file {
	uint32_t magic, psize;
	uint64_t txnid;           /* LMDB's last commit in the checkpoint */
	uint64_t number;          /* the last journal record it holds (0: none yet) */
	struct journal_pos next;  /* where the record after it begins */
	unsigned char meta[META_BYTES]; /* txnid's meta page */
	unsigned char sum[32];    /* SHA-256 of the fields above */
};

/* A checkpoint's first half, for its second (checkpoint_write). */
struct capture {
	MDB_txn *pin;
	struct checkpoint_file file;
};

static struct journal {
	int on;                   /* durability = journal (set once at start) */
	int fds[JOURNAL_FILES];
	int dir_fd, data_fd;
	uint64_t segment_size;
	/* Whoever holds LMDB's write lock: */
	uint64_t number;          /* the last record appended (and committed) */
	struct journal_pos last;  /* where it went */
	struct journal_pos next;  /* where the next record goes */
	uint64_t captured_bytes;  /* journal.bytes at the last capture */
	uint64_t captured_us;     /* when */
	uint64_t captured_number; /* the last record the last capture held */
	/* Under lock: */
	pthread_mutex_t lock;
	pthread_cond_t cond;      /* a capture handed over, or a checkpoint durable */
	pthread_t thread;
	int running, stop;
	int pending;              /* a capture waits for the checkpoint thread */
	int unsettled;            /* the entry appended last waits for its commit's outcome */
	int ckpt_error;           /* the last checkpoint could not be written (a full disk), or 0 */
	struct capture capture;
	MDB_txn *pin;             /* on the durable checkpoint */
	uint64_t durable_segment; /* where the records after the durable checkpoint begin */
	uint64_t durable_number;
	uint64_t durable_us;      /* when it became durable (now_micros, for stats) */
	uint64_t bytes;           /* appended since start */
	uint64_t checkpoints, replayed;
	int failed;               /* a checkpoint could not be written: stopping */
	/* The pipeline: the writer runs the next batch while the syncer syncs the last. */
	pthread_t syncer;
	int syncing;              /* the syncer runs */
	_Atomic uint64_t written;   /* the last record written to the journal (maybe not yet committed) */
	_Atomic uint64_t committed; /* the last record LMDB committed (maybe not yet synced) */
	_Atomic uint64_t synced;  /* the last record synced: what answers may reveal */
	struct journal_pos written_end;   /* under lock: where the last written record ends */
	int sync_busy;            /* under lock: a round of the syncer's is syncing */
	struct journal_pos synced_end;    /* under lock: where the last synced one does */
	struct handed {
		struct req *first, *last;
		uint64_t need;    /* answered once this record is synced */
	} handed[HANDED_MAX];     /* under lock: batches the writer handed over, in order */
	unsigned handed_head, handed_count;
	int posting;              /* batches taken off handed, not yet on the done list */
	uint64_t syncs, sync_us;  /* fdatasyncs of the journal, and their time */
} journal = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER, .dir_fd = -1, .data_fd = -1,
	.fds = { -1, -1, -1, -1 } };

/* The SHA-256 of a journal entry: its number, its record's length, the record. */
static void
journal_sum(uint64_t number, uint32_t len, const void *record, unsigned char out[32])
{
	EVP_MD_CTX *c = EVP_MD_CTX_new();

	if (c == NULL) {
		memset(out, 0, 32); /* out of memory: an entry that never checks */
		return;
	}
	EVP_DigestInit_ex(c, EVP_sha256(), NULL);
	EVP_DigestUpdate(c, &number, 8);
	EVP_DigestUpdate(c, &len, 4);
	EVP_DigestUpdate(c, record, len);
	EVP_DigestFinal_ex(c, out, NULL);
	EVP_MD_CTX_free(c);
}

/* The SHA-256 of a side file's fields. */
static void
checkpoint_sum(const struct checkpoint_file *f, unsigned char out[32])
{
	SHA256((const unsigned char *)f, offsetof(struct checkpoint_file, sum), out);
}

/*
 * Writes all of n bytes at off of fd (pwrite until done).  Returns 0, or an
 * errno (ENOSPC for a full disk).
 */
static int
write_all(int fd, const void *p, size_t n, off_t off)
{
	while (n > 0) {
		ssize_t w = pwrite(fd, p, n, off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? errno : ENOSPC;
		p = (const char *)p + w;
		n -= (size_t)w;
		off += w;
	}
	return 0;
}

/*
 * The first half of a checkpoint, by a thread that holds LMDB's write lock
 * (inside a write transaction; no commit can come between): pins the last
 * commit and notes what a restore to it needs.  Returns 0, or an LMDB error
 * or errno.
 */
static int
checkpoint_capture(struct capture *c)
{
	unsigned char page[META_BYTES];
	MDB_stat st;
	int rc;

	memset(c, 0, sizeof(*c));
	if ((rc = mdb_txn_begin(store.env, NULL, MDB_RDONLY, &c->pin)) != 0)
		return rc;
	mdb_env_stat(store.env, &st);
	c->file.magic = CHECKPOINT_MAGIC;
	c->file.psize = st.ms_psize;
	c->file.txnid = (uint64_t)mdb_txn_id(c->pin);
	c->file.number = journal.number;
	c->file.next = journal.next;
	for (int slot = 0; slot < 2; slot++) {
		uint64_t txnid;

		if (pread(journal.data_fd, page, sizeof(page), (off_t)slot * st.ms_psize) != (ssize_t)sizeof(page)) {
			rc = errno ? errno : EIO;
			break;
		}
		memcpy(&txnid, page + META_TXNID, 8);
		if (txnid == c->file.txnid) {
			memcpy(c->file.meta, page, META_BYTES);
			checkpoint_sum(&c->file, c->file.sum);
			pthread_mutex_lock(&journal.lock);
			journal.captured_bytes = journal.bytes;
			journal.captured_us = now_micros();
			journal.captured_number = journal.number;
			pthread_mutex_unlock(&journal.lock);
			return 0;
		}
	}
	mdb_txn_abort(c->pin);
	c->pin = NULL;
	log_x(L_ERR, "checkpoint: no meta page of data.mdb holds transaction %" PRIu64, c->file.txnid);
	return rc ? rc : MDB_CORRUPTED;
}

/*
 * The second half: syncs data.mdb, then makes the side file durable: written
 * beside, synced, renamed, the directory synced.  Returns 0 or an errno.
 */
static int
checkpoint_write(const struct capture *c)
{
	int fd, rc = 0;

	if (fdatasync(journal.data_fd) != 0)
		return errno;
	if ((fd = openat(journal.dir_fd, "checkpoint.tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) < 0)
		return errno;
	if ((rc = write_all(fd, &c->file, sizeof(c->file), 0)) == 0 && fdatasync(fd) != 0)
		rc = errno;
	close(fd);
	if (rc == 0 && renameat(journal.dir_fd, "checkpoint.tmp", journal.dir_fd, "checkpoint") != 0)
		rc = errno;
	if (rc == 0 && fsync(journal.dir_fd) != 0)
		rc = errno;
	return rc;
}

/* After a checkpoint is durable: its pin replaces the last one, and the journal before it may be reused. */
static void
checkpoint_done(struct capture *c)
{
	MDB_txn *old;

	pthread_mutex_lock(&journal.lock);
	old = journal.pin;
	journal.pin = c->pin;
	journal.durable_segment = c->file.next.segment;
	journal.durable_number = c->file.number;
	journal.durable_us = now_micros();
	journal.checkpoints++;
	pthread_cond_broadcast(&journal.cond);
	pthread_mutex_unlock(&journal.lock);
	if (old)
		mdb_txn_abort(old);
}

/*
 * The checkpoint thread: writes each capture handed over (the second half of
 * a checkpoint).  Between them, every tenth of checkpoint_interval, it starts
 * the writeback of data.mdb's dirty pages (sync_file_range, no wait), so that
 * a checkpoint's fdatasync finds little left: one flush of a second's pages
 * at once held the journal's syncs up for tens of milliseconds.
 */
static void *
checkpoint_main(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&journal.lock);
	for (;;) {
		struct capture c;
		int rc;

		while (!journal.pending && !journal.stop) {
			struct timespec until;
			uint64_t step = config.checkpoint_interval * 100ull; /* a tenth, in microseconds */

			clock_gettime(CLOCK_REALTIME, &until);
			until.tv_sec += (time_t)(step / 1000000);
			until.tv_nsec += (long)(step % 1000000) * 1000;
			if (until.tv_nsec >= 1000000000)
				until.tv_sec++, until.tv_nsec -= 1000000000;
			if (pthread_cond_timedwait(&journal.cond, &journal.lock, &until) == ETIMEDOUT) {
				pthread_mutex_unlock(&journal.lock);
				sync_file_range(journal.data_fd, 0, 0, SYNC_FILE_RANGE_WRITE);
				pthread_mutex_lock(&journal.lock);
			}
		}
		if (!journal.pending)
			break;
		c = journal.capture;
		pthread_mutex_unlock(&journal.lock);
		if ((rc = checkpoint_write(&c)) == ENOSPC || rc == EDQUOT) {
			/* A full disk: the last checkpoint stays, and the journal fills until a write answers storage_full. */
			log_x(L_ERR, "checkpoint: cannot write the checkpoint file: %s", strerror(rc));
			mdb_txn_abort(c.pin);
			pthread_mutex_lock(&journal.lock);
			journal.ckpt_error = rc;
			journal.pending = 0;
			pthread_cond_broadcast(&journal.cond);
			continue;
		}
		if (rc != 0) {
			/* The journal can no longer be reused: better stopped, restarted at the last checkpoint. */
			log_x(L_ERR, "checkpoint: cannot make transaction %" PRIu64 " durable: %s; stopping", c.file.txnid,
			    strerror(rc));
			mdb_txn_abort(c.pin);
			pthread_mutex_lock(&journal.lock);
			journal.failed = 1;
			journal.pending = 0;
			pthread_cond_broadcast(&journal.cond);
			pthread_mutex_unlock(&journal.lock);
			store_panic();
			return NULL;
		}
		checkpoint_done(&c);
		pthread_mutex_lock(&journal.lock);
		journal.ckpt_error = 0;
		journal.pending = 0;
		pthread_cond_broadcast(&journal.cond);
	}
	pthread_mutex_unlock(&journal.lock);
	return NULL;
}

/*
 * With LMDB's write lock held: captures a checkpoint and hands it to the
 * checkpoint thread unless one is pending.  Returns 0, or an error of the
 * capture.
 */
static int
checkpoint_begin(void)
{
	struct capture c;
	int rc, pending;

	pthread_mutex_lock(&journal.lock);
	pending = journal.pending;
	pthread_mutex_unlock(&journal.lock);
	if (pending)
		return 0;
	if ((rc = checkpoint_capture(&c)) != 0)
		return rc;
	pthread_mutex_lock(&journal.lock);
	journal.capture = c;
	journal.pending = 1;
	pthread_cond_broadcast(&journal.cond);
	pthread_mutex_unlock(&journal.lock);
	return 0;
}

/*
 * With LMDB's write lock held: whether a checkpoint is due: records since
 * the last capture, and checkpoint_interval or checkpoint_bytes passed.
 */
static int
checkpoint_due(void)
{
	int due;

	pthread_mutex_lock(&journal.lock);
	due = journal.number != journal.captured_number && (journal.bytes - journal.captured_bytes >=
	    config.checkpoint_bytes || now_micros() - journal.captured_us >= config.checkpoint_interval * 1000ull);
	pthread_mutex_unlock(&journal.lock);
	return due;
}

/*
 * For the idle writer: with until, the microseconds until a checkpoint is
 * due (0: none waits: nothing was committed since the last capture);
 * without, whether one is due now.
 */
static uint64_t
checkpoint_idle(int until)
{
	uint64_t due, now = now_micros();

	pthread_mutex_lock(&journal.lock);
	due = journal.on && journal.number != journal.captured_number ?
	    journal.captured_us + config.checkpoint_interval * 1000ull : 0;
	pthread_mutex_unlock(&journal.lock);
	if (until)
		return due > now ? due - now : due ? 1 : 0;
	return due && due <= now;
}

/*
 * With LMDB's write lock held: waits until segment may be written, that is
 * until the durable checkpoint lies in segment - JOURNAL_FILES + 1 or later,
 * capturing one (the state before this commit) if none is pending.  Returns
 * 0, or an error.
 */
static int
journal_room(uint64_t segment)
{
	for (int tries = 0;; tries++) {
		int failed, room, error, rc;

		pthread_mutex_lock(&journal.lock);
		while (segment >= journal.durable_segment + JOURNAL_FILES && journal.pending && !journal.failed)
			pthread_cond_wait(&journal.cond, &journal.lock);
		room = segment < journal.durable_segment + JOURNAL_FILES;
		failed = journal.failed;
		error = journal.ckpt_error;
		pthread_mutex_unlock(&journal.lock);
		if (room)
			return 0;
		if (failed)
			return EIO;
		if (tries == 2)
			return error ? error : EAGAIN; /* the checkpoint of the state before this commit made no room */
		if ((rc = checkpoint_begin()) != 0)
			return rc;
	}
}

/*
 * Writes record (len bytes) to the journal as the next entry, with LMDB's
 * write lock held; the syncer makes it durable (journal_sync_main).
 * Returns 0 with journal.number and journal.next moved on, or an errno:
 * nothing then counts as written (a part written is overwritten by the next
 * entry, and fails its checksum until then).
 */
static int
journal_append(const char *record, size_t len)
{
	unsigned char head[JOURNAL_HEAD];
	uint32_t magic = JOURNAL_MAGIC, n32 = (uint32_t)len;
	uint64_t number = journal.number + 1;
	struct journal_pos at = journal.next;
	struct iovec iov[2] = { { head, JOURNAL_HEAD }, { (void *)record, len } };
	int fd, rc;

	if (len > UINT32_MAX - JOURNAL_HEAD)
		return EFBIG;
	if (at.offset > 0 && at.offset + JOURNAL_HEAD + len > journal.segment_size)
		at = (struct journal_pos){ at.segment + 1, 0 };
	if ((rc = journal_room(at.segment)) != 0)
		return rc;
	memcpy(head, &magic, 4);
	memcpy(head + 4, &n32, 4);
	memcpy(head + 8, &number, 8);
	journal_sum(number, n32, record, head + 16);
	fd = journal.fds[at.segment % JOURNAL_FILES];
	pthread_mutex_lock(&ahead.lock); /* no zeros of the helper's over it */
	ahead_follow(fd, at.offset + JOURNAL_HEAD + len, journal.segment_size);
	for (size_t done = 0, total = JOURNAL_HEAD + len; done < total;) {
		ssize_t w = pwritev(fd, iov, 2, (off_t)(at.offset + done));

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			pthread_mutex_unlock(&ahead.lock);
			return w < 0 ? errno : ENOSPC;
		}
		done += (size_t)w;
		for (int i = 0; i < 2 && w > 0; i++) {
			size_t used = (size_t)w < iov[i].iov_len ? (size_t)w : iov[i].iov_len;

			iov[i].iov_base = (char *)iov[i].iov_base + used;
			iov[i].iov_len -= used;
			w -= (ssize_t)used;
		}
	}
	pthread_mutex_unlock(&ahead.lock);
	pthread_mutex_lock(&journal.lock);
	journal.unsettled = 1;
	journal.number = number;
	journal.last = at;
	journal.next = (struct journal_pos){ at.segment, at.offset + JOURNAL_HEAD + len };
	journal.bytes += JOURNAL_HEAD + len;
	atomic_store(&journal.written, number);
	journal.written_end = journal.next;
	pthread_cond_broadcast(&journal.cond); /* the syncer */
	pthread_mutex_unlock(&journal.lock);
	return 0;
}

/*
 * Takes back the last entry appended, whose commit failed for want of room
 * in the map (the batch runs again): its magic overwritten and synced, so
 * that no replay applies it, and the journal's position set back.  Returns
 * 0, or an errno.
 */
static int
journal_unappend(void)
{
	static const uint32_t none = 0;
	struct journal_pos at = journal.last;
	int fd = journal.fds[at.segment % JOURNAL_FILES], rc;

	if ((rc = write_all(fd, &none, 4, (off_t)at.offset)) != 0 || (fdatasync(fd) != 0 && (rc = errno) != 0))
		return rc;
	pthread_mutex_lock(&journal.lock);
	while (journal.sync_busy) /* a round that took the entry for synced must end first */
		pthread_cond_wait(&journal.cond, &journal.lock);
	journal.number--;
	journal.next = at;
	atomic_store(&journal.written, journal.number);
	journal.written_end = at;
	if (atomic_load(&journal.synced) > journal.number)
		atomic_store(&journal.synced, journal.number);
	journal.synced_end = at;
	pthread_mutex_unlock(&journal.lock);
	return 0;
}

/* After the commit of the entry appended last: another may be appended (journal_append). */
static void
journal_settled(void)
{
	pthread_mutex_lock(&journal.lock);
	journal.unsettled = 0;
	pthread_cond_broadcast(&journal.cond);
	pthread_mutex_unlock(&journal.lock);
}

/*
 * Reads the entry at *at if it is record number: into rec (its bytes, which
 * the caller frees).  Returns 0 with *at past it, or -1 when there is no such
 * entry there (the end of the journal).
 */
static int
journal_read(struct journal_pos *at, uint64_t number, char **rec, uint32_t *len)
{
	unsigned char head[JOURNAL_HEAD], sum[32];
	uint32_t magic;
	uint64_t found;
	int fd = journal.fds[at->segment % JOURNAL_FILES];

	if (pread(fd, head, JOURNAL_HEAD, (off_t)at->offset) != JOURNAL_HEAD)
		return -1;
	memcpy(&magic, head, 4);
	memcpy(len, head + 4, 4);
	memcpy(&found, head + 8, 8);
	if (magic != JOURNAL_MAGIC || found != number || (*rec = malloc(*len ? *len : 1)) == NULL)
		return -1;
	if (pread(fd, *rec, *len, (off_t)(at->offset + JOURNAL_HEAD)) != (ssize_t)*len ||
	    (journal_sum(number, *len, *rec, sum), memcmp(sum, head + 16, 32) != 0)) {
		free(*rec);
		return -1;
	}
	at->offset += JOURNAL_HEAD + *len;
	return 0;
}

/*
 * Applies the journal's records after the checkpoint (number, from at), each
 * in its own commit, up to the first that is not there whole.  Returns 0,
 * or an LMDB error (-1 with a message logged for a record that does not
 * apply: a store it was not made on).
 */
/* Reads record number at *at, or at the start of the next segment; *at moves past it.  0, or -1: none. */
static int
journal_next(struct journal_pos *at, uint64_t number, char **rec, uint32_t *len)
{
	struct journal_pos here = *at;

	if (journal_read(&here, number, rec, len) != 0) {
		here = (struct journal_pos){ at->segment + 1, 0 };
		if (journal_read(&here, number, rec, len) != 0)
			return -1;
	}
	*at = here;
	return 0;
}

static int
journal_replay(uint64_t number, struct journal_pos at)
{
	char *rec, *after;
	uint32_t len, after_len;
	int rc = 0;

	journal.number = number;
	journal.next = at;
	for (;;) {
		struct journal_pos here = journal.next, peek;
		MDB_txn *txn;

		if (journal_next(&here, journal.number + 1, &rec, &len) != 0)
			break;
		peek = here;
		if (repl_on && journal_next(&peek, journal.number + 2, &after, &after_len) != 0) {
			/* A replicated node's last record may be one the stream never took (the
			 * leader journals a record while the stream acknowledges it): the stream
			 * says; the applier takes it from there if it is there. */
			log_x(L_INFO, "journal: record %" PRIu64 ", the last, is left to the stream", journal.number + 1);
			free(rec);
			break;
		}
		if (repl_on)
			free(after);
		do {
			if ((rc = captured_txn_begin(&txn)) != 0)
				break;
			if ((rc = record_apply(txn, rec, len, 0)) == 0)
				rc = mdb_txn_commit(txn);
			else
				mdb_txn_abort(txn);
		} while (rc == MDB_MAP_FULL && store_grow(1) == 0);
		free(rec);
		if (rc == EINVAL) {
			log_x(L_ERR, "journal: record %" PRIu64 " does not decode", journal.number + 1);
			return -1;
		}
		if (rc != 0)
			return rc;
		journal.number++;
		journal.next = here;
		journal.replayed++;
	}
	return 0;
}

/* Reads the side file of dir into f.  Returns 1, 0 when there is none, or -1 (logged) when it is bad. */
static int
checkpoint_read(struct checkpoint_file *f)
{
	unsigned char sum[32];
	int fd = openat(journal.dir_fd, "checkpoint", O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0) {
		if (errno == ENOENT)
			return 0;
		log_p("journal: cannot open the checkpoint file");
		return -1;
	}
	n = read(fd, f, sizeof(*f));
	close(fd);
	checkpoint_sum(f, sum);
	if (n != (ssize_t)sizeof(*f) || f->magic != CHECKPOINT_MAGIC || memcmp(sum, f->sum, 32) != 0 ||
	    f->psize < 512 || f->psize > 65536) {
		log_x(L_ERR, "journal: the checkpoint file is damaged");
		return -1;
	}
	return 1;
}

/*
 * Puts data.mdb back to the checkpoint f, before LMDB opens it: f's meta
 * page into both meta slots, synced.  Returns 0, or -1 with a message logged.
 */
static int
store_restore(const struct checkpoint_file *f)
{
	unsigned char page[META_BYTES];
	uint64_t last_pg, newest = 0;
	struct stat st;
	int other = 0;

	/* A data.mdb this checkpoint was not taken of (a backup copied over it) would be
	 * ruined by the restore: it is too short, its meta pages are older, or another. */
	memcpy(&last_pg, f->meta + META_LAST_PG, 8);
	for (uint64_t slot = 0; slot < 2; slot++) {
		uint32_t magic;
		uint64_t txnid;

		if (pread(journal.data_fd, page, META_BYTES, (off_t)(slot * f->psize)) != META_BYTES)
			continue;
		memcpy(&magic, page + META_MAGIC, 4);
		memcpy(&txnid, page + META_TXNID, 8);
		if (magic == MDB_META_MAGIC && txnid > newest)
			newest = txnid;
		other |= txnid == f->txnid && memcmp(page + 16, f->meta + 16, META_BYTES - 16) != 0;
	}
	if (fstat(journal.data_fd, &st) != 0 || (uint64_t)st.st_size < (last_pg + 1) * f->psize ||
	    newest < f->txnid || other) {
		log_x(L_ERR, "journal: data.mdb is not the store the checkpoint file was taken of (a backup copied "
		    "over it?): to restore a backup, start walletd on a directory holding only the backup, as data.mdb "
		    "(and ledger.key)");
		return -1;
	}
	for (uint64_t slot = 0; slot < 2; slot++) {
		memcpy(page, f->meta, META_BYTES);
		memcpy(page, &slot, 8); /* the page header's page number */
		if (write_all(journal.data_fd, page, META_BYTES, (off_t)(slot * f->psize)) != 0) {
			log_p("journal: cannot restore data.mdb to its checkpoint");
			return -1;
		}
	}
	if (fdatasync(journal.data_fd) != 0) {
		log_p("journal: cannot sync data.mdb");
		return -1;
	}
	return 0;
}

/*
 * Opens dir's journal files (creating the missing ones when create) and
 * data.mdb for the checkpoints.  Returns how many existed, or -1 (logged).
 */
static int
journal_files_open(const char *dir, int create)
{
	int existed = 0;

	if (journal.dir_fd < 0 && (journal.dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
		log_p("cannot open store directory %s", dir);
		return -1;
	}
	for (int i = 0; i < JOURNAL_FILES; i++) {
		char name[16];

		snprintf(name, sizeof(name), "journal.%d", i);
		if (journal.fds[i] < 0 && (journal.fds[i] = openat(journal.dir_fd, name, O_RDWR | O_CLOEXEC)) >= 0)
			existed++;
		else if (journal.fds[i] < 0 && create &&
		    (journal.fds[i] = openat(journal.dir_fd, name, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) < 0) {
			log_p("cannot create %s/%s", dir, name);
			return -1;
		}
	}
	if (create && fsync(journal.dir_fd) != 0) {
		log_p("cannot sync store directory %s", dir);
		return -1;
	}
	return existed;
}

/* Closes the journal files, and removes them and the side file when drop (durability = lmdb). */
static void
journal_files_close(int drop)
{
	for (int i = 0; i < JOURNAL_FILES; i++) {
		char name[16];

		if (journal.fds[i] >= 0)
			close(journal.fds[i]);
		journal.fds[i] = -1;
		snprintf(name, sizeof(name), "journal.%d", i);
		if (drop)
			unlinkat(journal.dir_fd, name, 0);
	}
	if (drop) {
		unlinkat(journal.dir_fd, "checkpoint", 0);
		fsync(journal.dir_fd);
	}
}

/*
 * A synchronous checkpoint (at start, and at a clean stop): capture under a
 * write transaction of its own, then write.  Returns 0, or an error (logged).
 */
static int
checkpoint_now(void)
{
	struct capture c;
	MDB_txn *txn;
	int rc;

	if ((rc = captured_txn_begin(&txn)) != 0)
		goto fail;
	rc = checkpoint_capture(&c);
	mdb_txn_abort(txn);
	if (rc != 0)
		goto fail;
	if ((rc = checkpoint_write(&c)) != 0) {
		mdb_txn_abort(c.pin);
		log_x(L_ERR, "checkpoint: %s", strerror(rc));
		return rc;
	}
	checkpoint_done(&c);
	return 0;
fail:
	log_x(L_ERR, "checkpoint: %s", mdb_strerror(rc));
	return rc;
}

static int journal_wait(uint64_t number);
static int journal_pipelined(void);
static void *journal_sync_main(void *arg);

/*
 * Before LMDB opens dir's store: opens data.mdb and the journal's files
 * that exist, reads the side file into f and puts data.mdb back to it
 * (store_restore).  Returns 1 when restored, 0 when there is no side file
 * (a store LMDB synced itself), -1 (logged).
 */
static int
journal_restore(const char *dir, struct checkpoint_file *f)
{
	char path[PATH_MAX + 32];
	int rc;

	journal.number = journal.durable_number = journal.durable_segment = 0;
	journal.next = journal.last = (struct journal_pos){ 0, 0 };
	journal.pending = journal.unsettled = journal.failed = journal.ckpt_error = 0;
	journal.on = strcmp(config.durability, "journal") == 0;
	journal.segment_size = config.checkpoint_bytes / 2;
	capture_on = journal.on || repl_on;
	if (journal_files_open(dir, 0) < 0)
		return -1;
	snprintf(path, sizeof(path), "%s/data.mdb", dir);
	if ((journal.data_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) < 0) {
		log_p("cannot open %s", path);
		return -1;
	}
	if ((rc = checkpoint_read(f)) <= 0)
		return rc;
	if (store_restore(f) != 0)
		return -1;
	log_x(L_INFO, "store %s: back to its checkpoint (LMDB transaction %" PRIu64 ", journal record %" PRIu64 ")",
	    dir, f->txnid, f->number);
	return 1;
}

/* Right after LMDB opened a restored store, before any commit: pins the checkpoint f. 0, or -1 (logged). */
static int
journal_pin(const struct checkpoint_file *f)
{
	int rc;

	if ((rc = mdb_txn_begin(store.env, NULL, MDB_RDONLY, &journal.pin)) != 0) {
		log_x(L_ERR, "journal: %s", mdb_strerror(rc));
		return -1;
	}
	if ((uint64_t)mdb_txn_id(journal.pin) != f->txnid) {
		log_x(L_ERR, "journal: the store opened at LMDB transaction %zu, not at its checkpoint's %" PRIu64,
		    mdb_txn_id(journal.pin), f->txnid);
		return -1;
	}
	journal.durable_segment = f->next.segment;
	journal.durable_number = f->number;
	return 0;
}

/*
 * With the checkpoint f pinned and the databases open: checks that the store
 * holds f's last record, and applies the journal's records after it.
 * Returns 0, or -1 (logged).
 */
static int
journal_recover(const struct checkpoint_file *f)
{
	MDB_val k = { 7, "journal" }, v;
	uint64_t stored = 0;
	MDB_txn *txn;
	int rc;

	if ((rc = mdb_txn_begin(store.env, NULL, MDB_RDONLY, &txn)) == 0) {
		if ((rc = mdb_get(txn, store.meta, &k, &v)) == 0 && v.mv_size == 8)
			memcpy(&stored, v.mv_data, 8);
		mdb_txn_abort(txn);
	}
	if ((rc != 0 && rc != MDB_NOTFOUND) || stored != f->number) {
		log_x(L_ERR, "journal: the checkpoint holds record %" PRIu64 ", its store says %" PRIu64 " (%s)",
		    f->number, stored, rc ? mdb_strerror(rc) : "disagree");
		return -1;
	}
	if ((rc = journal_replay(f->number, f->next)) != 0) {
		if (rc != -1)
			log_x(L_ERR, "journal: cannot apply record %" PRIu64 ": %s", journal.number + 1, mdb_strerror(rc));
		return -1;
	}
	if (journal.replayed)
		log_x(L_INFO, "journal: %" PRIu64 " records after the checkpoint applied again, up to record %" PRIu64,
		    journal.replayed, journal.number);
	return 0;
}

/*
 * Once the store is open, replayed and upgraded: with durability = journal,
 * a checkpoint of it as it is, the journal's files made (emptied, without a
 * restored checkpoint: what they hold belongs to no checkpoint), LMDB's own
 * syncs off, the checkpoint thread started; with durability = lmdb, the
 * store synced and the journal and side file removed.  0, or -1 (logged).
 */
static int
journal_ready(const char *dir, int restored)
{
	if (!journal.on) {
		if (restored) {
			int rc = mdb_env_sync(store.env, 1);

			if (rc != 0) {
				log_x(L_ERR, "cannot sync the store: %s", mdb_strerror(rc));
				return -1;
			}
			mdb_env_set_flags(store.env, MDB_NOSYNC, 0);
			mdb_txn_abort(journal.pin);
			journal.pin = NULL;
			log_x(L_INFO, "store %s: durability = lmdb: the journal is applied and removed", dir);
		}
		journal_files_close(1);
		close(journal.data_fd);
		journal.data_fd = -1;
		return 0;
	}
	for (int i = 0; i < JOURNAL_FILES && !restored; i++)
		if (journal.fds[i] >= 0 && (ftruncate(journal.fds[i], 0) != 0 || fdatasync(journal.fds[i]) != 0)) {
			log_p("cannot empty the journal of %s", dir);
			return -1;
		}
	if (checkpoint_now() != 0 || journal_files_open(dir, 1) < 0)
		return -1;
	mdb_env_set_flags(store.env, MDB_NOSYNC, 1);
	journal.captured_us = now_micros();
	journal.captured_number = journal.number;
	atomic_store(&journal.written, journal.number);
	atomic_store(&journal.committed, journal.number);
	atomic_store(&journal.synced, journal.number);
	journal.written_end = journal.synced_end = journal.next;
	return 0;
}

/* Starts the checkpoint thread (with signals blocked, as every thread).  0, or -1 (logged). */
static int
journal_start(void)
{
	if (!journal.on)
		return 0;
	if (pthread_create(&journal.thread, NULL, checkpoint_main, NULL) != 0) {
		log_x(L_ERR, "cannot start the checkpoint thread");
		return -1;
	}
	journal.running = 1;
	if (pthread_create(&journal.syncer, NULL, journal_sync_main, NULL) != 0) {
		log_x(L_ERR, "cannot start the journal's syncer");
		return -1;
	}
	journal.syncing = 1;
	pthread_mutex_lock(&ahead.lock);
	ahead_follow(journal.fds[journal.next.segment % JOURNAL_FILES], journal.next.offset, journal.segment_size);
	ahead.running = pthread_create(&ahead.thread, NULL, ahead_main, NULL) == 0;
	pthread_mutex_unlock(&ahead.lock);
	return 0;
}

/* stats' journal: {durability, journal_bytes, checkpoints, checkpoint_age_ms, replayed_at_start, record}. */
static void
journal_stats_pack(msgpack_packer *pk)
{
	uint64_t bytes, checkpoints, number, syncs, sync_us;
	uint64_t durable_us;

	pthread_mutex_lock(&journal.lock);
	syncs = journal.syncs;
	sync_us = journal.sync_us;
	bytes = journal.bytes;
	checkpoints = journal.checkpoints;
	durable_us = journal.durable_us;
	number = journal.number;
	pthread_mutex_unlock(&journal.lock);
	KEY(pk, "journal");
	msgpack_pack_map(pk, 8);
	KV_STR(pk, "durability", config.durability);
	KV_U64(pk, "journal_bytes", bytes);
	KV_U64(pk, "syncs", syncs);
	KEY(pk, "mean_sync_us");
	msgpack_pack_double(pk, syncs ? (double)sync_us / (double)syncs : 0.0);
	KV_U64(pk, "checkpoints", checkpoints);
	KEY(pk, "checkpoint_age_ms");
	if (journal.on)
		msgpack_pack_uint64(pk, (now_micros() - durable_us) / 1000);
	else
		msgpack_pack_nil(pk);
	KV_U64(pk, "replayed_at_start", journal.replayed);
	KV_U64(pk, "record", number);
}

/* At a clean stop, after the last commit: a last checkpoint, so that a start has nothing to apply again. */
static void
journal_stop(void)
{
	if (!journal.on)
		return;
	pthread_mutex_lock(&journal.lock);
	journal.stop = 1;
	pthread_cond_broadcast(&journal.cond);
	pthread_mutex_unlock(&journal.lock);
	if (journal.running)
		pthread_join(journal.thread, NULL);
	if (journal.syncing)
		pthread_join(journal.syncer, NULL);
	journal.syncing = 0;
	if (!journal.failed && !store.panicked)
		checkpoint_now();
	if (journal.pin)
		mdb_txn_abort(journal.pin);
	journal.pin = NULL;
	journal_files_close(0);
	close(journal.data_fd);
	close(journal.dir_fd);
	journal.data_fd = journal.dir_fd = -1;
	journal.running = journal.stop = 0;
}

/*
 * The first half of a journaled commit of the top-level write transaction
 * txn, with LMDB's write lock held: its record written to the journal as
 * *number (the syncer syncs it meanwhile).  A commit that finds a checkpoint
 * due captures it first.  Returns 0, or an error with txn aborted.
 */
static int
journal_prepare(MDB_txn *txn, uint64_t *number)
{
	msgpack_sbuffer rec;
	MDB_val k = { 7, "journal" }, v;
	int rc;

	pthread_mutex_lock(&journal.lock);
	while (journal.unsettled && !journal.failed) /* a commit that failed, taking its entry back */
		pthread_cond_wait(&journal.cond, &journal.lock);
	*number = journal.number + 1;
	rc = journal.failed ? EIO : 0;
	pthread_mutex_unlock(&journal.lock);
	if (rc == 0 && checkpoint_due())
		rc = checkpoint_begin();
	v = (MDB_val){ 8, number };
	if (rc == 0)
		rc = captured_put(txn, store.meta, &k, &v, 0);
	msgpack_sbuffer_init(&rec);
	if (rc == 0 && (rc = record_pack(txn, &rec, 0)) == 0)
		rc = journal_append(rec.data, rec.size);
	msgpack_sbuffer_destroy(&rec);
	if (rc != 0)
		mdb_txn_abort(txn);
	return rc;
}

/*
 * Takes back the record journal_prepare wrote (the stream refused it, or
 * LMDB could not commit it): no replay applies it.  Aborts txn when given.
 * Returns 0, or an error: then walletd stops (store_panic), for a restart
 * applies the record.
 */
static int
journal_cancel(MDB_txn *txn, uint64_t number, const char *why)
{
	int rc = journal_unappend();

	if (txn)
		mdb_txn_abort(txn);
	if (rc == 0) {
		journal_settled();
		return 0;
	}
	log_x(L_ERR, "journal: record %" PRIu64 " is in the journal, but %s, and it cannot be taken back (%s): "
	    "stopping; a restart applies it", number, why, strerror(rc));
	pthread_mutex_lock(&journal.lock);
	journal.failed = 1; /* nothing more is appended */
	pthread_cond_broadcast(&journal.cond);
	pthread_mutex_unlock(&journal.lock);
	store_panic();
	return rc;
}

/*
 * The second half: LMDB commits txn without a sync.  A commit LMDB refuses
 * (a full map or disk) takes the record back; one that leaves LMDB refusing
 * everything stops walletd (a restart applies the record).  0, or an error.
 */
static int
journal_finish(MDB_txn *txn, uint64_t number)
{
	int rc = mdb_txn_commit(txn);

	if (rc != 0 && !store_panicked() && journal_cancel(NULL, number, "LMDB's commit failed") == 0)
		return rc; /* nothing done: the writer grows the map and runs the batch again */
	if (rc != 0) {
		log_x(L_ERR, "journal: record %" PRIu64 " is in the journal, but LMDB's commit failed (%s): stopping; "
		    "a restart applies it", number, mdb_strerror(rc));
		pthread_mutex_lock(&journal.lock);
		journal.failed = 1; /* nothing more is appended */
		pthread_cond_broadcast(&journal.cond);
		pthread_mutex_unlock(&journal.lock);
		return rc;
	}
	pthread_mutex_lock(&journal.lock);
	journal.unsettled = 0;
	atomic_store(&journal.committed, number);
	pthread_cond_broadcast(&journal.cond);
	pthread_mutex_unlock(&journal.lock);
	return 0;
}

/*
 * Commits a top-level write transaction: in journal mode, its record
 * written to the journal, then LMDB without a sync, and with wait until the
 * syncer made the record durable (without, the caller hands its answers to
 * the syncer: journal_hand); in lmdb mode, with LMDB's own syncs (section
 * "Room ahead").  txn is gone either way.
 */
static int
store_commit_durable(MDB_txn *txn, int wait)
{
	uint64_t number;
	int rc;

	if (!journal.on)
		return store_commit_local(txn);
	if (touched.len == 0) {
		rc = store_commit_local(txn); /* nothing changed: no record */
		return rc == 0 && wait ? journal_wait(atomic_load(&journal.committed)) : rc;
	}
	if ((rc = journal_prepare(txn, &number)) != 0 || (rc = journal_finish(txn, number)) != 0)
		return rc;
	return wait ? journal_wait(number) : 0;
}

#define REPL_FENCED      (-31001) /* the stream refused the record: not this node's turn */
#define REPL_UNAVAILABLE (-31002) /* the stream did not answer within failover_wait */
/* A record on its way to the stream: its messages (repl_prepare) and what they are published after. */
struct outgoing {
	msgpack_sbuffer msgs;     /* each a u32 length, then the stream message */
	uint32_t parts;
	uint64_t expected;        /* the stream sequence its first part follows */
	uint64_t term;            /* the term it is published in */
	uint64_t t0;
	char id[160];
};

/* Commits a top-level write transaction: in a replicated group, once the
 * stream took its record (section 7); txn is gone either way. */
static int
store_commit(MDB_txn *txn)
{
	struct outgoing o;
	struct repl_pos pos;
	uint64_t number;
	int rc;

	if (!repl_on || touched.len == 0) /* single, or nothing changed: no stream record */
		return store_commit_durable(txn, !journal_pipelined());
	/* The record goes to the stream and to the journal at once; LMDB commits once both hold it. */
	if ((rc = repl_prepare(txn, &pos, &o)) != 0) {
		mdb_txn_abort(txn);
		return rc;
	}
	if (journal.on && (rc = journal_prepare(txn, &number)) != 0) {
		outgoing_free(&o);
		return rc;
	}
	rc = repl_send_record(&o);
	outgoing_free(&o);
	if (rc != 0) {
		if (journal.on)
			journal_cancel(txn, number, "the stream did not take it");
		else
			mdb_txn_abort(txn);
		return rc;
	}
	if (journal.on && (rc = journal_wait(number)) == 0)
		rc = journal_finish(txn, number);
	else if (!journal.on)
		rc = store_commit_local(txn);
	if (rc == 0)
		repl_committed(&pos);
	return rc;
}

/* ---- Wallets and transactions ---- */

/* Copies a stored record into dst: a shorter one (an older layout) is zero-filled. */
static void
record_copy(void *dst, size_t size, MDB_val v)
{
	memset(dst, 0, size);
	memcpy(dst, v.mv_data, v.mv_size < size ? v.mv_size : size);
}

/*
 * A wallet record holds its base fields (those of layout 4), then its
 * credit limit, hold and spend-control fields only with WF_EXTENDED (most
 * wallets have none: a small record keeps more wallets in a page, and a
 * commit of many charges writes fewer pages), then its slot counts only
 * with WF_COUNTS (layout 5 before 2026-12: with WF_HOURLY), then its fraud
 * brake settings only with WF_GUARD, then its automatic top-up's numbers
 * only with WF_AUTO, then a shared child's draws only with WF_SHARED, then
 * its lots' total and credit_validity only with WF_LOTS, then its head lot
 * (without its wallet) only with WF_LOT_HEAD, then its three strings (four with WF_GUARD: its safe
 * prefixes; then with WF_PARENT its parent; then with WF_AUTO the top-up's
 * authorization and e-mail), each up to its NUL.
 */
#define WALLET_BASE     offsetof(struct wallet, credit_limit)
#define WALLET_EXTENDED (offsetof(struct wallet, slot_counts) - WALLET_BASE)
#define WALLET_COUNTS   sizeof(((struct wallet *)0)->slot_counts)
#define WALLET_GUARD    (offsetof(struct wallet, allowed) - offsetof(struct wallet, guard_set))
#define WALLET_LOTS     offsetof(struct wallet_lots, head)

/* Whether w needs its extended fields stored. */
static int
wallet_extended(const struct wallet *w)
{
	return w->credit_limit || w->held || w->holds_active || w->day_spent || w->hour_total ||
	    (w->flags & (WF_DAILY | WF_HOURLY));
}

/* Whether a record with flags stores string i of allowed, blocked, emails, guard_safe, parent, and auto top-up's two. */
static int
wallet_string_stored(int i, uint32_t flags)
{
	return i < 3 || (i == 3 && (flags & WF_GUARD)) || (i == 4 && (flags & WF_PARENT)) || (i > 4 && (flags & WF_AUTO));
}

/* Decodes a stored wallet record v into *w.  Returns 0 or MDB_CORRUPTED. */
static int
wallet_decode(MDB_val v, struct wallet *w)
{
	char *strings[7] = { w->allowed, w->blocked, w->emails, w->guard_safe, w->parent, w->autotop.authorization,
		w->autotop.email };
	size_t sizes[7] = { PREFIXES_BYTES, PREFIXES_BYTES, EMAILS_BYTES, PREFIXES_BYTES, WALLET_ID_MAX + 1,
		sizeof(w->autotop.authorization), sizeof(w->autotop.email) };
	const char *p = (const char *)v.mv_data, *end = p + v.mv_size;
	uint32_t flags;

	if (v.mv_size < WALLET_BASE)
		return MDB_CORRUPTED;
	memcpy(w, p, WALLET_BASE);
	flags = w->flags;
	p += WALLET_BASE;
	memset((char *)w + WALLET_BASE, 0, WALLET_EXTENDED + WALLET_COUNTS + WALLET_GUARD);
	w->guard_safe[0] = w->parent[0] = '\0';
	if (w->flags & WF_EXTENDED) {
		if ((size_t)(end - p) < WALLET_EXTENDED)
			return MDB_CORRUPTED;
		memcpy((char *)w + WALLET_BASE, p, WALLET_EXTENDED);
		p += WALLET_EXTENDED;
	}
	if (w->flags & (WF_COUNTS | WF_HOURLY)) {
		if ((size_t)(end - p) < WALLET_COUNTS)
			return MDB_CORRUPTED;
		memcpy(w->slot_counts, p, WALLET_COUNTS);
		p += WALLET_COUNTS;
	} else {
		w->hour_total = 0; /* a record without counts counts nothing */
	}
	if (w->flags & WF_GUARD) {
		if ((size_t)(end - p) < WALLET_GUARD)
			return MDB_CORRUPTED;
		memcpy(&w->guard_set, p, WALLET_GUARD);
		p += WALLET_GUARD;
	}
	memset(&w->autotop, 0, sizeof(w->autotop));
	memset(&w->draws, 0, sizeof(w->draws));
	if (w->flags & WF_AUTO) {
		if ((size_t)(end - p) < AUTO_NUMBERS)
			return MDB_CORRUPTED;
		memcpy(&w->autotop, p, AUTO_NUMBERS);
		p += AUTO_NUMBERS;
	}
	if (w->flags & WF_SHARED) {
		if ((size_t)(end - p) < sizeof(w->draws))
			return MDB_CORRUPTED;
		memcpy(&w->draws, p, sizeof(w->draws));
		p += sizeof(w->draws);
	}
	memset(&w->lots, 0, sizeof(w->lots));
	if (w->flags & WF_LOTS) {
		if ((size_t)(end - p) < WALLET_LOTS)
			return MDB_CORRUPTED;
		memcpy(&w->lots, p, WALLET_LOTS);
		p += WALLET_LOTS;
	}
	if (w->flags & WF_LOT_HEAD) {
		if ((size_t)(end - p) < LOT_FIELDS)
			return MDB_CORRUPTED;
		memcpy(&w->lots.head, p, LOT_FIELDS);
		p += LOT_FIELDS;
	}
	w->flags &= ~(WF_EXTENDED | WF_COUNTS | WF_GUARD | WF_PARENT | WF_AUTO | WF_LOTS | WF_LOT_HEAD);
	for (int i = 0; i < 7; i++) {
		size_t n;

		if (!wallet_string_stored(i, flags))
			continue;
		if ((n = strnlen(p, (size_t)(end - p))) >= sizes[i])
			return MDB_CORRUPTED;
		memcpy(strings[i], p, n);
		strings[i][n] = '\0';
		p += n + (p + n < end);
	}
	return 0;
}

/* Reads wallet id into *w.  Returns 0, MDB_NOTFOUND or an LMDB error. */
static int
wallet_get(MDB_txn *txn, struct str id, struct wallet *w)
{
	MDB_val k = { id.n, (void *)id.p }, v;
	int rc;

	if (id.n == 0 || (rc = mdb_get(txn, store.wallets, &k, &v)) != 0)
		return id.n == 0 ? MDB_NOTFOUND : rc;
	return wallet_decode(v, w);
}

/* Whether w is wallet id's child (a reseller's). */
static int
wallet_child_of(const struct wallet *w, struct str id)
{
	return strlen(w->parent) == id.n && memcmp(w->parent, id.p, id.n) == 0;
}

/* Writes w under id, as wallet_decode reads it. */
static int
wallet_put(MDB_txn *txn, struct str id, const struct wallet *w)
{
	MDB_val k = { id.n, (void *)id.p };
	char buf[sizeof(*w)];
	size_t n = WALLET_BASE;
	const char *strings[7] = { w->allowed, w->blocked, w->emails, w->guard_safe, w->parent, w->autotop.authorization,
		w->autotop.email };
	uint32_t flags = w->flags & ~(WF_EXTENDED | WF_COUNTS | WF_GUARD | WF_PARENT | WF_AUTO | WF_LOTS | WF_LOT_HEAD);

	memcpy(buf, w, WALLET_BASE);
	if (wallet_extended(w)) {
		flags |= WF_EXTENDED;
		memcpy(buf + n, (const char *)w + WALLET_BASE, WALLET_EXTENDED);
		n += WALLET_EXTENDED;
	}
	if (w->hour_total || (w->flags & WF_HOURLY)) {
		flags |= WF_COUNTS;
		memcpy(buf + n, w->slot_counts, WALLET_COUNTS);
		n += WALLET_COUNTS;
	}
	if (w->guard_set || w->guard_until) {
		flags |= WF_GUARD;
		memcpy(buf + n, &w->guard_set, WALLET_GUARD);
		n += WALLET_GUARD;
	}
	if (w->parent[0])
		flags |= WF_PARENT;
	if (w->autotop.provider) { /* a commit that leaves the available balance at or above `below` re-arms it */
		struct auto_topup a = w->autotop;

		if (w->balance + w->credit_limit - w->held >= a.below)
			a.state |= AUTO_ARMED;
		flags |= WF_AUTO;
		memcpy(buf + n, &a, AUTO_NUMBERS);
		n += AUTO_NUMBERS;
	}
	if (flags & WF_SHARED) {
		memcpy(buf + n, &w->draws, sizeof(w->draws));
		n += sizeof(w->draws);
	}
	if (w->lots.total || w->lots.validity) {
		flags |= WF_LOTS;
		memcpy(buf + n, &w->lots, WALLET_LOTS);
		n += WALLET_LOTS;
	}
	if (w->lots.head.id) {
		flags |= WF_LOT_HEAD;
		memcpy(buf + n, &w->lots.head, LOT_FIELDS);
		n += LOT_FIELDS;
	}
	memcpy(buf + offsetof(struct wallet, flags), &flags, sizeof(flags));
	for (int i = 0; i < 7; i++) {
		size_t len = strlen(strings[i]) + 1;

		if (!wallet_string_stored(i, flags))
			continue;
		memcpy(buf + n, strings[i], len);
		n += len;
	}
	return captured_put(txn, store.wallets, &k, &(MDB_val){ n, buf }, 0);
}

/* ---- Events ---- */

/* Set by event_add (the writer's): the alert thread has events to deliver after this commit. */
static _Atomic int events_added; /* also set by the alert thread's automatic top-ups */

/*
 * Records an event for the webhook, in txn: {id, type, created_at, wallet,
 * data} as JSON (jansson), data taken over (decref'd).  Nothing without
 * webhook_url: events would pile up undelivered.  The alert thread POSTs
 * it, signed, until a 2xx answers.  Returns 0 or an LMDB error (ENOMEM when
 * JSON cannot be built).
 */
static int
event_add(MDB_txn *txn, const char *type, struct str wallet, json_t *data)
{
	MDB_val k = { 9, "event_seq" }, v;
	unsigned char key[8];
	char id[32], when[32];
	uint64_t number = 1;
	struct event e;
	json_t *event;
	char *body;
	int rc;

	if (config.webhook_url[0] == '\0' || data == NULL) {
		json_decref(data);
		return data == NULL && config.webhook_url[0] ? ENOMEM : 0;
	}
	if ((rc = mdb_get(txn, store.meta, &k, &v)) == 0 && v.mv_size == sizeof(number))
		memcpy(&number, v.mv_data, sizeof(number));
	else if (rc != 0 && rc != MDB_NOTFOUND) {
		json_decref(data);
		return rc;
	}
	snprintf(id, sizeof(id), "evt_%" PRIu64, number);
	event = json_pack("{s:s, s:s, s:s, s:s#, s:o}", "id", id, "type", type, "created_at",
	    time_format(now_seconds(), when), "wallet", wallet.p, (int)wallet.n, "data", data);
	body = event ? json_dumps(event, JSON_COMPACT) : NULL;
	json_decref(event);
	if (body == NULL || strlen(body) >= sizeof(e.body)) {
		free(body);
		return ENOMEM;
	}
	memset(&e, 0, EVENT_FIXED);
	e.number = number;
	e.next_attempt = now_seconds();
	memcpy(e.body, body, strlen(body) + 1);
	be64_put(key, number++);
	v = (MDB_val){ EVENT_FIXED + strlen(body) + 1, &e };
	free(body);
	if ((rc = captured_put(txn, store.events, &(MDB_val){ 8, key }, &v, 0)) ||
	    (rc = captured_put(txn, store.eventq, &(MDB_val){ 8, key }, &(MDB_val){ 0, "" }, 0)) ||
	    (rc = captured_put(txn, store.meta, &k, &(MDB_val){ sizeof(number), &number }, 0)))
		return rc;
	events_added = 1;
	return 0;
}

/* An amount as the JSON of events has it: a decimal string (never a float). */
static json_t *
json_amount(int64_t v)
{
	char buf[32];

	return json_string(amount_format(v, buf, 0));
}

/* ---- Holds ---- */

/* a + b, held at INT64_MAX / INT64_MIN instead of wrapping. */
static int64_t
add_saturating(int64_t a, int64_t b)
{
	int64_t r;

	if (__builtin_add_overflow(a, b, &r))
		return a > 0 ? INT64_MAX : INT64_MIN;
	return r;
}

/* The key of wallet number's hold ref: BE64 number . ref. */
static MDB_val
hold_key(unsigned char key[8 + REF_MAX], uint64_t number, struct str ref)
{
	be64_put(key, number);
	memcpy(key + 8, ref.p, ref.n);
	return (MDB_val){ 8 + ref.n, key };
}

/* A hold's key in holdexp: BE64 expires_at . BE64 number . ref. */
static MDB_val
holdexp_key(unsigned char key[16 + REF_MAX], const struct hold *h, uint64_t number)
{
	size_t n = strlen(h->ref);

	be64_put(key, (uint64_t)h->expires_at);
	be64_put(key + 8, number);
	memcpy(key + 16, h->ref, n);
	return (MDB_val){ 16 + n, key };
}

/* Decodes a stored hold record v into *h.  Returns 0 or MDB_CORRUPTED. */
static int
hold_decode(MDB_val v, struct hold *h)
{
	char *strings[3] = { h->wallet, h->ref, h->description };
	size_t sizes[3] = { sizeof(h->wallet), sizeof(h->ref), sizeof(h->description) };
	const char *p = (const char *)v.mv_data + HOLD_FIXED, *end = (const char *)v.mv_data + v.mv_size;

	if (v.mv_size < HOLD_FIXED)
		return MDB_CORRUPTED;
	memcpy(h, v.mv_data, HOLD_FIXED);
	for (int i = 0; i < 3; i++) {
		size_t n = strnlen(p, (size_t)(end - p));

		if (n >= sizes[i])
			return MDB_CORRUPTED;
		memcpy(strings[i], p, n);
		strings[i][n] = '\0';
		p += n + (p + n < end);
	}
	return 0;
}

/* Reads wallet number's hold ref into *h.  Returns 0, MDB_NOTFOUND or an LMDB error. */
static int
hold_get(MDB_txn *txn, uint64_t number, struct str ref, struct hold *h)
{
	unsigned char key[8 + REF_MAX];
	MDB_val k = hold_key(key, number, ref), v;
	int rc = mdb_get(txn, store.holds, &k, &v);

	return rc ? rc : hold_decode(v, h);
}

/*
 * Writes hold h of wallet number.  With queue set (a new hold, or one
 * ended), also enters an active one in holdexp, or takes an ended one out;
 * a charge drawing on a hold changes neither its status nor its expiry.
 */
static int
hold_put(MDB_txn *txn, uint64_t number, const struct hold *h, int queue)
{
	unsigned char key[16 + REF_MAX];
	MDB_val k = hold_key(key, number, (struct str){ h->ref, strlen(h->ref) });
	const char *strings[3] = { h->wallet, h->ref, h->description };
	char buf[sizeof(*h)];
	size_t n = HOLD_FIXED;
	int rc;

	memcpy(buf, h, HOLD_FIXED);
	for (int i = 0; i < 3; i++) {
		size_t len = strlen(strings[i]) + 1;

		memcpy(buf + n, strings[i], len);
		n += len;
	}
	if ((rc = captured_put(txn, store.holds, &k, &(MDB_val){ n, buf }, 0)) != 0 || !queue)
		return rc;
	k = holdexp_key(key, h, number);
	if (h->status == HS_ACTIVE)
		return captured_put(txn, store.holdexp, &k, &(MDB_val){ 0, "" }, 0);
	rc = captured_del(txn, store.holdexp, &k, NULL);
	return rc == MDB_NOTFOUND ? 0 : rc;
}

/*
 * Visits the holds of wallet number, in ref order: fn(h, arg) for each,
 * until it returns nonzero.  Returns 0 or an LMDB error.
 */
static int
holds_each(MDB_txn *txn, uint64_t number, int (*fn)(const struct hold *, void *), void *arg)
{
	unsigned char prefix[8];
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	be64_put(prefix, number);
	if ((rc = mdb_cursor_open(txn, store.holds, &cur)) != 0)
		return rc;
	k = (MDB_val){ 8, prefix };
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0 && k.mv_size >= 8 &&
	    memcmp(k.mv_data, prefix, 8) == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct hold h;

		if (hold_decode(v, &h) != 0) {
			rc = MDB_CORRUPTED;
			break;
		}
		if (fn(&h, arg))
			break;
	}
	mdb_cursor_close(cur);
	return rc == MDB_NOTFOUND || rc == 0 ? 0 : rc;
}

/* What the active holds still unexpired at `at` hold, and the first of their expiries. */
struct holds_sum {
	int64_t at, held, first_expiry;
	uint32_t active;
};

static int
holds_sum_add(const struct hold *h, void *arg)
{
	struct holds_sum *sum = arg;

	if (h->status == HS_ACTIVE && (h->expires_at > sum->at || strncmp(h->ref, "dlr:", 4) == 0)) {
		/* a charge held for its report stays held until the writer settles it, even past its timeout */
		sum->held += h->remaining;
		sum->active++;
		if (sum->active == 1 || h->expires_at < sum->first_expiry)
			sum->first_expiry = h->expires_at;
	}
	return 0;
}

/*
 * What w's holds reserve at time now: w->held, kept by every change of a
 * hold, unless one of them has passed its expires_at before the writer
 * ended it (holds_expire); then the active ones not yet expired are added
 * up (a scan of w's holds).  So available is right before the expiry runs.
 * Returns 0 or an LMDB error.
 */
static int
wallet_held(MDB_txn *txn, const struct wallet *w, int64_t now, int64_t *held)
{
	struct holds_sum sum = { now, 0, 0, 0 };
	int rc;

	*held = w->held;
	if (w->holds_active == 0 || now < w->hold_expiry)
		return 0;
	if ((rc = holds_each(txn, w->number, holds_sum_add, &sum)) == 0)
		*held = sum.held;
	return rc;
}

/* What w may spend at now: balance + credit_limit - held (both set).  0 or an LMDB error. */
/* The UTC month of t, in months since 1970-01. */
static int64_t
utc_month(int64_t t)
{
	time_t tt = (time_t)t;
	struct tm tm;

	gmtime_r(&tt, &tm);
	return (int64_t)(tm.tm_year - 70) * 12 + tm.tm_mon;
}

/* What shared child w may still draw from its parent in now's month: its credit_limit less the month's draws (none: no cap). */
static int64_t
shared_cap_left(const struct wallet *w, int64_t now)
{
	int64_t spent = w->draws.month == utc_month(now) ? w->draws.spent : 0;

	if (w->credit_limit == 0)
		return INT64_MAX;
	return w->credit_limit > spent ? w->credit_limit - spent : 0;
}

static int
wallet_available(MDB_txn *txn, const struct wallet *w, int64_t now, int64_t *held, int64_t *available)
{
	int rc = wallet_held(txn, w, now, held);

	*available = add_saturating(add_saturating(w->balance, w->credit_limit), -*held);
	if (rc == 0 && (w->flags & WF_SHARED)) { /* its own money, then its parent's up to the month's cap */
		int64_t parent_held, parent_available, cap = shared_cap_left(w, now);
		struct wallet pw;

		if ((rc = wallet_get(txn, (struct str){ w->parent, strlen(w->parent) }, &pw)) != 0 ||
		    (rc = wallet_available(txn, &pw, now, &parent_held, &parent_available)) != 0)
			return rc == MDB_NOTFOUND ? MDB_CORRUPTED : rc;
		if (parent_available < 0 || (pw.flags & WF_FROZEN))
			parent_available = 0;
		*available = add_saturating(w->balance - *held, parent_available < cap ? parent_available : cap);
	}
	return rc;
}

/*
 * Counts w's active holds, what their remaining adds up to and the first of
 * their expiries into w (after a hold ends): these count every hold whose
 * status is active, expired by time or not, until holds_expire ends it.
 * Returns 0 or an LMDB error.
 */
static int
wallet_holds_recount(MDB_txn *txn, struct wallet *w)
{
	struct holds_sum sum = { INT64_MIN, 0, 0, 0 };
	int rc = holds_each(txn, w->number, holds_sum_add, &sum);

	w->held = sum.held;
	w->holds_active = sum.active;
	w->hold_expiry = sum.first_expiry;
	return rc;
}

/*
 * Ends the holds whose expires_at has come, at most 1,000 a call: each
 * becomes expired and its remaining is its wallet's to spend again (and
 * the credit lots that expire: what is left of each leaves).  Runs
 * in the writer's batch transaction, before the batch's requests.  Leaves
 * in store.next_expiry when the first hold still active expires.  Returns
 * 0 or an LMDB error.
 */
static int pending_timeout(MDB_txn *txn, uint64_t number, struct str wallet, struct str ref); /* section 4 */
static int lot_expire(MDB_txn *txn, const unsigned char *key, size_t len); /* section 4 */

static int
holds_expire(MDB_txn *txn, int64_t now)
{
	MDB_cursor *cur;
	MDB_val k, v;
	int rc, ended = 0;

	if ((rc = mdb_cursor_open(txn, store.holdexp, &cur)) != 0)
		return rc;
	store.next_expiry = INT64_MAX;
	while ((rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST)) == 0 && k.mv_size > 16) {
		int64_t expires_at = (int64_t)be64_get(k.mv_data);
		uint64_t number = be64_get((unsigned char *)k.mv_data + 8);
		struct str ref = { (char *)k.mv_data + 16, k.mv_size - 16 };
		struct wallet w;
		struct hold h;

		if (expires_at > now || ended == 1000) {
			store.next_expiry = expires_at;
			break;
		}
		if (ref.p[0] == '\0') { /* a credit lot's, or its reminder's */
			if ((rc = lot_expire(txn, k.mv_data, k.mv_size)) != 0 || (rc = captured_cursor_del(cur, 0)) != 0)
				break;
			ended++;
			continue;
		}
		if ((rc = hold_get(txn, number, ref, &h)) == MDB_NOTFOUND || (rc == 0 && h.status != HS_ACTIVE)) {
			if ((rc = captured_cursor_del(cur, 0)) != 0)
				break;
			continue; /* not queued by hold_put: nothing to end */
		}
		if (rc != 0 || (rc = wallet_get(txn, (struct str){ h.wallet, strlen(h.wallet) }, &w)) != 0)
			break;
		if ((rc = captured_cursor_del(cur, 0)) != 0)
			break;
		if (strncmp(h.ref, "dlr:", 4) == 0) { /* a charge that waited in vain for its report (not ref: deleted) */
			if ((rc = pending_timeout(txn, number, (struct str){ h.wallet, strlen(h.wallet) },
			    (struct str){ h.ref + 4, strlen(h.ref) - 4 })) != 0)
				break;
			ended++;
			continue;
		}
		h.status = HS_EXPIRED;
		h.closed_at = h.expires_at;
		if ((rc = hold_put(txn, number, &h, 1)) != 0 ||
		    (rc = wallet_holds_recount(txn, &w)) != 0 ||
		    (rc = wallet_put(txn, (struct str){ h.wallet, strlen(h.wallet) }, &w)) != 0 ||
		    (rc = event_add(txn, "hold_expired", (struct str){ h.wallet, strlen(h.wallet) },
		    json_pack("{s:s, s:o, s:o, s:s, s:s}", "hold", h.ref, "amount", json_amount(h.amount),
		    "remaining", json_amount(h.remaining), "currency", w.currency, "expires_at",
		    time_format(h.expires_at, (char[32]){ 0 })))) != 0)
			break;
		ended++;
	}
	mdb_cursor_close(cur);
	return rc == MDB_NOTFOUND || rc == 0 ? 0 : rc;
}

/* ---- The transaction log ---- */

/*
 * A charge's entry in refs: its id and its fingerprint; then, when the
 * rate that priced it refunds failures or settles on delivery, once a
 * report came, or when it drew on credit lots, its tail: a NUL, REF_TAIL,
 * as LEB128 numbers its struct charge_fate's fields and the length of the
 * report's error, that error, with CF_LOTS what it took from lots (a
 * count, then each lot_draw's fields, expires_at 0 for LOT_NEVER), and for
 * a charge on a settle = delivery rate the charge to write when it
 * settles, as txns stores one (head, then record).  The id is 0 while such
 * a charge waits for its report, and stays 0 if it is released.  A tail
 * written before 2026-12-08 is a NUL, the struct charge_fate itself (its
 * first byte, on_failure's, is never REF_TAIL), a u16 and the error, the
 * record, and with CF_LOTS the lot_draws and their count in a byte.
 */
#define REF_TAIL 0xff
struct charge_fate {
	uint32_t on_failure;      /* OF_* of the rate that priced it */
	uint32_t status;          /* DS_*: DS_NONE until a final report */
	uint32_t failed_parts;    /* as reported; 0: not given */
	uint32_t flags;           /* CF_* */
	int64_t failure_fee;      /* OF_FEE: kept of a failed message, in the wallet's currency */
	int64_t at;               /* when the report came */
	uint64_t refund;          /* the refund it made, if any */
};
#define CF_PENDING 1u          /* settle = delivery: held, waiting for its report */
#define CF_RELEASE 2u          /* settle = delivery: released, not charged, if no report comes in time */
#define CF_LOTS    4u          /* its tail holds what the charge took from lots (ref_write: when it took any) */
enum { DS_NONE, DS_DELIVERED, DS_FAILED, DS_REJECTED, DS_EXPIRED, DS__COUNT };
static const char *const delivery_status_names[] = { "", "delivered", "failed", "rejected", "expired" };
#define DELIVERY_ERROR_MAX 256
#define REF_VALUE_MAX 4096

struct ref_entry {
	uint64_t id;
	struct str fp;
	struct charge_fate fate;
	struct str error;
	struct str record;
	struct lot_draws lots;    /* with CF_LOTS (a copy) */
};

/* LEB128: v, 7 bits a byte, the lowest first, into p (10 bytes at most).  Returns the bytes written. */
static size_t
uleb_put(char *p, uint64_t v)
{
	size_t n = 0;

	for (; v >= 0x80; v >>= 7)
		p[n++] = (char)(v | 0x80);
	p[n++] = (char)v;
	return n;
}

/* Reads a LEB128 number at *p (before end) into *v, past it.  0, or -1 if it is cut short. */
static int
uleb_get(const char **p, const char *end, uint64_t *v)
{
	*v = 0;
	for (int shift = 0; *p < end && shift < 64; shift += 7) {
		unsigned char b = (unsigned char)*(*p)++;

		*v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80))
			return 0;
	}
	return -1;
}

/* Reads a tail written since 2026-12-08 (q, after its REF_TAIL, to end) into e.  0, or -1 if it is not whole. */
static int
ref_tail_read(const char *q, const char *end, struct ref_entry *e)
{
	uint64_t x[8], n = 0; /* as ref_write writes them */

	for (size_t i = 0; i < 8; i++)
		if (uleb_get(&q, end, &x[i]))
			return -1;
	e->fate = (struct charge_fate){ (uint32_t)x[0], (uint32_t)x[1], (uint32_t)x[2], (uint32_t)x[3], (int64_t)x[4],
		(int64_t)x[5], x[6] };
	if (x[7] > (uint64_t)(end - q))
		return -1;
	e->error = (struct str){ q, x[7] };
	q += x[7];
	if ((e->fate.flags & CF_LOTS) && (uleb_get(&q, end, &n) || n > LOT_DRAWS_MAX))
		return -1;
	for (e->lots.n = 0; e->lots.n < n; e->lots.n++) {
		struct lot_draw *d = &e->lots.d[e->lots.n];
		uint64_t f[5];

		for (size_t i = 0; i < 5; i++)
			if (uleb_get(&q, end, &f[i]))
				return -1;
		*d = (struct lot_draw){ (int64_t)f[0], (int64_t)f[1], f[2] ? (int64_t)f[2] : LOT_NEVER, f[3],
			(uint32_t)f[4], 0 };
	}
	e->record = (struct str){ q, (size_t)(end - q) };
	return 0;
}

/* Reads a tail written before 2026-12-08 (q, after its NUL, to end) into e. */
static void
ref_tail_read_fixed(const char *q, const char *end, struct ref_entry *e)
{
	uint16_t elen;

	if ((size_t)(end - q) < sizeof(e->fate) + 2)
		return;
	memcpy(&e->fate, q, sizeof(e->fate));
	memcpy(&elen, q + sizeof(e->fate), 2);
	q += sizeof(e->fate) + 2;
	if (elen > end - q)
		elen = (uint16_t)(end - q);
	e->error = (struct str){ q, elen };
	e->record = (struct str){ q + elen, (size_t)(end - q - elen) };
	if ((e->fate.flags & CF_LOTS) && e->record.n >= 1) {
		size_t n = (unsigned char)e->record.p[e->record.n - 1], size = n * sizeof(e->lots.d[0]);

		if (n <= LOT_DRAWS_MAX && e->record.n >= 1 + size) {
			e->record.n -= 1 + size;
			e->lots.n = (uint8_t)n;
			memcpy(e->lots.d, e->record.p + e->record.n, size);
		}
	}
}

/* Reads refs value v into e (pointing into v); a tail it cannot read reads as none. */
static void
ref_read(MDB_val v, struct ref_entry *e)
{
	const char *p = v.mv_data, *end = p + v.mv_size, *nul = memchr(p + 8, '\0', v.mv_size - 8);

	memset(e, 0, sizeof(*e));
	memcpy(&e->id, p, 8);
	e->fp = (struct str){ p + 8, (size_t)((nul ? nul : end) - p) - 8 };
	e->error = e->record = (struct str){ "", 0 };
	if (nul == NULL || nul + 1 == end)
		return;
	if ((unsigned char)nul[1] != REF_TAIL) {
		ref_tail_read_fixed(nul + 1, end, e);
	} else if (ref_tail_read(nul + 2, end, e) != 0) {
		memset(&e->fate, 0, sizeof(e->fate));
		e->lots.n = 0;
		e->error = e->record = (struct str){ "", 0 };
	}
}

/* Writes e as a refs value into buf (REF_VALUE_MAX); its tail only when it has one.  ENOMEM if too long. */
static int
ref_write(char buf[REF_VALUE_MAX], const struct ref_entry *e, MDB_val *v)
{
	const struct charge_fate *f = &e->fate;
	uint32_t flags = (f->flags & ~CF_LOTS) | (e->lots.n ? CF_LOTS : 0);
	uint64_t numbers[] = { f->on_failure, f->status, f->failed_parts, flags, (uint64_t)f->failure_fee,
		(uint64_t)f->at, f->refund, e->error.n };
	size_t n = 8 + e->fp.n, lots = e->lots.n;

	if (n + 2 + 10 * (sizeof(numbers) / sizeof(numbers[0]) + 1 + 5 * lots) + e->error.n + e->record.n > REF_VALUE_MAX)
		return ENOMEM;
	memcpy(buf, &e->id, 8);
	memmove(buf + 8, e->fp.p, e->fp.n);
	if (f->on_failure || f->status || flags || e->record.n) {
		buf[n++] = '\0';
		buf[n++] = (char)REF_TAIL;
		for (size_t i = 0; i < sizeof(numbers) / sizeof(numbers[0]); i++)
			n += uleb_put(buf + n, numbers[i]);
		if (e->error.n)
			memmove(buf + n, e->error.p, e->error.n);
		n += e->error.n;
		if (lots)
			n += uleb_put(buf + n, lots);
		for (size_t i = 0; i < lots; i++) {
			const struct lot_draw *d = &e->lots.d[i];

			n += uleb_put(buf + n, (uint64_t)d->amount);
			n += uleb_put(buf + n, (uint64_t)d->lot_amount);
			n += uleb_put(buf + n, d->expires_at == LOT_NEVER ? 0 : (uint64_t)d->expires_at);
			n += uleb_put(buf + n, d->id);
			n += uleb_put(buf + n, d->kind);
		}
		if (e->record.n)
			memmove(buf + n, e->record.p, e->record.n);
		n += e->record.n;
	}
	*v = (MDB_val){ n, buf };
	return 0;
}

/* Packs "delivery": a charge's report {status, failed_parts, error, at}. */
static void
delivery_report_pack(msgpack_packer *pk, const struct charge_fate *fate, struct str error)
{
	KEY(pk, "delivery");
	msgpack_pack_map(pk, 4);
	KV_STR(pk, "status", delivery_status_names[fate->status < DS__COUNT ? fate->status : DS_NONE]);
	KEY(pk, "failed_parts");
	if (fate->failed_parts)
		msgpack_pack_uint32(pk, fate->failed_parts);
	else
		msgpack_pack_nil(pk);
	KEY(pk, "error");
	if (error.n)
		pack_sstr(pk, error);
	else
		msgpack_pack_nil(pk);
	KV_TIME(pk, "at", fate->at);
}

/* Room for the strings of a decoded transaction (txn_decode). */
struct txn_text {
	char currency[4], price_currency[4], paid_currency[4];
};

/* Points t (a charge, TXN_REPORTED) at its report, read into *fate, valid while txn is. */
static int
txn_fate(MDB_txn *txn, struct txn *t, struct charge_fate *fate)
{
	unsigned char key[REF_MAX + 8];
	struct ref_entry e;
	struct wallet w;
	MDB_val k, v;
	int rc;

	if ((rc = wallet_get(txn, t->wallet, &w)) != 0)
		return rc;
	k = ref_key(key, t->ref, w.number);
	if ((rc = mdb_get(txn, store.refs, &k, &v)) != 0)
		return rc;
	ref_read(v, &e);
	*fate = e.fate;
	t->fate_error = e.error;
	t->fate = fate->status != DS_NONE ? fate : NULL;
	return 0;
}

/* Builds the 16-byte key BE64(a) . BE64(b) into key. */
static MDB_val
key_pair(unsigned char key[16], uint64_t a, uint64_t b)
{
	be64_put(key, a);
	be64_put(key + 8, b);
	return (MDB_val){ 16, key };
}

/* ---- The ledger's hash chain ---- */

/* What a transaction's hash covers, in this order: CHAIN_FIELDS. */
enum { CF_ID, CF_WALLET, CF_CREATED_AT, CF_TYPE, CF_AMOUNT, CF_BALANCE_AFTER, CF_CURRENCY, CF_DESCRIPTION, CF__COUNT };
static const char *const chain_field_names[CF__COUNT] = CHAIN_FIELDS;

static EVP_MD *sha256_md;         /* fetched once (sha256_fetch) */
static pthread_key_t sha256_ctx; /* a context per thread, freed with it */

static void
sha256_ctx_free(void *ctx)
{
	EVP_MD_CTX_free(ctx);
}

static void
sha256_fetch(void)
{
	sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
	pthread_key_create(&sha256_ctx, sha256_ctx_free);
}

/*
 * SHA-256 of p[n] into out, on every transaction: with OpenSSL 3 the
 * one-shot SHA256() looks the algorithm up by name, and EVP_Digest
 * allocates a context, at each call; this fetches it once and keeps a
 * context per thread.  0, or -1.
 */
static int
sha256_fast(const void *p, size_t n, unsigned char out[32])
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;
	EVP_MD_CTX *ctx;

	pthread_once(&once, sha256_fetch);
	if ((ctx = pthread_getspecific(sha256_ctx)) == NULL &&
	    ((ctx = EVP_MD_CTX_new()) == NULL || pthread_setspecific(sha256_ctx, ctx) != 0)) {
		EVP_MD_CTX_free(ctx);
		return -1;
	}
	return sha256_md && EVP_DigestInit_ex2(ctx, sha256_md, NULL) == 1 && EVP_DigestUpdate(ctx, p, n) == 1 &&
	    EVP_DigestFinal_ex(ctx, out, NULL) == 1 ? 0 : -1;
}

/* Writes v in decimal into buf (>= 21 bytes, no NUL); returns its length.  (Not snprintf: on every charge.) */
static size_t
u64_text(uint64_t v, char *buf)
{
	char tmp[20];
	size_t n = 0, len;

	do
		tmp[n++] = (char)('0' + v % 10);
	while ((v /= 10) != 0);
	for (len = n; n > 0; n--)
		*buf++ = tmp[n - 1];
	return len;
}

/* Writes f[n] as netstrings (length in decimal, ":", the bytes, ",") into buf: their length, or 0 if over cap. */
static size_t
netstrings(const struct str *f, int n, unsigned char *buf, size_t cap)
{
	size_t len = 0;

	for (int i = 0; i < n; i++) {
		if (f[i].n + 24 > cap - len)
			return 0;
		len += u64_text(f[i].n, (char *)buf + len);
		buf[len++] = ':';
		memcpy(buf + len, f[i].p, f[i].n);
		len += f[i].n;
		buf[len++] = ',';
	}
	return len;
}

/*
 * A transaction's hash: SHA-256 of the hash of its wallet's transaction
 * before it (32 zero bytes for the first), then each field f[] as the
 * answers show it, as a netstring: its length in bytes, ":", the bytes,
 * ",".  Returns 0, or -1 for fields longer than any transaction has.
 */
static int
chain_hash(const unsigned char prev[32], const struct str f[CF__COUNT], unsigned char out[32])
{
	unsigned char buf[4096];
	size_t n;

	memcpy(buf, prev, 32);
	n = netstrings(f, CF__COUNT, buf + 32, sizeof(buf) - 32);
	return n ? sha256_fast(buf, 32 + n, out) : -1;
}

/* The hash of transaction t, its fields as txn_pack answers them, after prev: 0, or -1 (OpenSSL failed). */
static int
txn_hash(const struct txn *t, const unsigned char prev[32], unsigned char out[32])
{
	char id[24], at[32], amount[32], after[32];
	struct str f[CF__COUNT];

	f[CF_ID] = (struct str){ id, u64_text(t->id, id) };
	f[CF_WALLET] = t->wallet;
	f[CF_CREATED_AT] = (struct str){ at, strlen(time_format(t->created_at, at)) };
	f[CF_TYPE] = (struct str){ txn_type_names[t->type], strlen(txn_type_names[t->type]) };
	f[CF_AMOUNT] = (struct str){ amount, strlen(amount_format(t->amount, amount, 0)) };
	f[CF_BALANCE_AFTER] = (struct str){ after, strlen(amount_format(t->balance_after, after, 0)) };
	f[CF_CURRENCY] = (struct str){ t->currency, strlen(t->currency) };
	f[CF_DESCRIPTION] = (struct str){ t->description, strlen(t->description) };
	return chain_hash(prev, f, out); /* these fields always fit */
}

/* The hash of the transaction map m (as answered), after prev: 0, or -1 if it lacks a field. */
static int
txn_map_hash(const msgpack_object *m, const unsigned char prev[32], unsigned char out[32])
{
	struct str f[CF__COUNT];
	char id[24];

	for (int i = 0; i < CF__COUNT; i++) {
		const msgpack_object *o = map_get(m, chain_field_names[i]);

		if (o && i == CF_ID && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
			f[i] = (struct str){ id, (size_t)snprintf(id, sizeof(id), "%" PRIu64, o->via.u64) };
		else if (o && i != CF_ID && o->type == MSGPACK_OBJECT_STR)
			f[i] = (struct str){ o->via.str.ptr, o->via.str.size };
		else
			return -1;
	}
	return chain_hash(prev, f, out);
}

/*
 * Reads transaction id's hash into out (id 0: the 32 zero bytes before a
 * wallet's first).  0, MDB_NOTFOUND (none: a record of an older layout),
 * or an LMDB error.
 */
static int
chain_get(MDB_txn *txn, uint64_t id, unsigned char out[32])
{
	struct txn_head h;
	MDB_val rec;
	int rc;

	if (id == 0) {
		memset(out, 0, 32);
		return 0;
	}
	if ((rc = txn_fetch(txn, id, &h, &rec)) != 0)
		return rc;
	if (!(h.flags & TXN_HASHED))
		return MDB_NOTFOUND;
	memcpy(out, (const char *)rec.mv_data - 32, 32);
	return 0;
}

/* Whether transaction id (its map m, after transaction prev) holds the hash it was chained with: 0, or -1. */
static int
chain_verify(MDB_txn *txn, uint64_t id, uint64_t prev, const msgpack_object *m)
{
	unsigned char before[32], stored[32], computed[32];

	return chain_get(txn, prev, before) == 0 && chain_get(txn, id, stored) == 0 &&
	    txn_map_hash(m, before, computed) == 0 && memcmp(stored, computed, 32) == 0 ? 0 : -1;
}

/* Writes p[n] in lower-case hex into out (2n bytes, no NUL); returns 2n. */
static size_t
hex_text(const unsigned char *p, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < n; i++) {
		out[2 * i] = digits[p[i] >> 4];
		out[2 * i + 1] = digits[p[i] & 15];
	}
	return 2 * n;
}

/* Packs hash in hex. */
static void
hash_pack(msgpack_packer *pk, const unsigned char hash[32])
{
	char hex[64];

	msgpack_pack_str_with_body(pk, hex, hex_text(hash, 32, hex));
}

/* ---- Signed heads ---- */

static EVP_PKEY *ledger_key;   /* Ed25519, from ledger_key_file */
static char ledger_public[65]; /* its public key in hex, as ping answers it */

/*
 * Opens ledger_key_file (default: ledger.key in the store), first writing
 * a new Ed25519 key there (mode 0600, through a synced temporary file) if
 * there is none.  0, or -1 logged.
 */
static int
ledger_key_open(void)
{
	char path[PATH_MAX], tmp[PATH_MAX + 8];
	unsigned char pub[32];
	size_t n = sizeof(pub);
	FILE *f;

	if (config.ledger_key_file[0])
		snprintf(path, sizeof(path), "%s", config.ledger_key_file);
	else if ((size_t)snprintf(path, sizeof(path), "%s/ledger.key", config.store) >= sizeof(path))
		return log_x(L_ERR, "the store's path is too long for its ledger.key"), -1;
	if ((f = fopen(path, "re")) != NULL) {
		ledger_key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
		fclose(f);
	} else if (errno == ENOENT && (ledger_key = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519")) != NULL) {
		int fd, ok;

		snprintf(tmp, sizeof(tmp), "%s.new", path);
		if ((fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) < 0 || (f = fdopen(fd, "w")) == NULL)
			return log_p("%s", tmp), -1;
		ok = PEM_write_PrivateKey(f, ledger_key, NULL, NULL, 0, NULL, NULL) == 1 && fflush(f) == 0 &&
		    fsync(fd) == 0;
		if (fclose(f) != 0 || !ok || rename(tmp, path) != 0)
			return log_p("%s", path), -1;
		log_x(L_INFO, "made the ledger's signing key %s", path);
	} else {
		return log_p("%s", path), -1;
	}
	if (ledger_key == NULL || EVP_PKEY_get_base_id(ledger_key) != EVP_PKEY_ED25519 ||
	    EVP_PKEY_get_raw_public_key(ledger_key, pub, &n) != 1) {
		log_x(L_ERR, "%s: not an Ed25519 private key in PEM", path);
		return -1;
	}
	ledger_public[hex_text(pub, 32, ledger_public)] = '\0';
	return 0;
}

/*
 * Packs a signed head (README: The ledger's hash chain): {wallet, id, hash,
 * at, signature, before}: id is the wallet's newest transaction covered, of
 * that hash; signature, the Ed25519 signature in hex of wallet, id, hash
 * and at as netstrings; before, the hash before the first transaction
 * covered (not signed: the chain ties it to hash).
 */
static void
head_pack(msgpack_packer *pk, struct str wallet, uint64_t id, const unsigned char hash[32],
    const unsigned char before[32])
{
	char id_text[24], hex[64], at[32], sig_hex[128];
	unsigned char buf[512], sig[64];
	size_t n, sig_n = sizeof(sig);
	struct str f[4];
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();

	f[0] = wallet;
	f[1] = (struct str){ id_text, u64_text(id, id_text) };
	f[2] = (struct str){ hex, hex_text(hash, 32, hex) };
	f[3] = (struct str){ at, strlen(time_format(now_seconds(), at)) };
	n = netstrings(f, 4, buf, sizeof(buf));
	if (ctx == NULL || EVP_DigestSignInit(ctx, NULL, NULL, NULL, ledger_key) != 1 ||
	    EVP_DigestSign(ctx, sig, &sig_n, buf, n) != 1)
		sig_n = 0;
	EVP_MD_CTX_free(ctx);
	msgpack_pack_map(pk, 6);
	KV_SSTR(pk, "wallet", wallet);
	KV_U64(pk, "id", id);
	KEY(pk, "hash");
	hash_pack(pk, hash);
	KV_SSTR(pk, "at", f[3]);
	KEY(pk, "signature");
	if (sig_n)
		msgpack_pack_str_with_body(pk, sig_hex, hex_text(sig, sig_n, sig_hex));
	else
		msgpack_pack_nil(pk);
	KEY(pk, "before");
	hash_pack(pk, before);
}

/* Packs the signed head of wallet at transaction id (before_id: the one before the first covered); nil for id 0. */
static void
head_pack_at(MDB_txn *txn, msgpack_packer *pk, struct str wallet, uint64_t id, uint64_t before_id)
{
	unsigned char hash[32], before[32];

	if (id && chain_get(txn, id, hash) == 0 && chain_get(txn, before_id, before) == 0)
		head_pack(pk, wallet, id, hash, before);
	else
		msgpack_pack_nil(pk);
}

/*
 * Packs a transaction as its map: a map16 with every field that applies,
 * then "replayed" unless replayed is -1 (a charge's answer says whether it
 * was one).
 */
static void
txn_pack(msgpack_packer *pk, const struct txn *t, int replayed)
{
	unsigned n = 8 + (replayed >= 0);

	if (t->ref.n)
		n++;
	if (t->channel.n)
		n += 6; /* channel, to, route, segments, price, price_currency */
	if (t->refund_of)
		n++;
	if (t->has_actor)
		n++;
	if (t->provider.n)
		n += 2;
	if (t->paid_currency)
		n += 2;
	if (t->hold.n)
		n++;
	if (t->fate)
		n++;
	if (t->id == 0)
		n++; /* pending */
	if (t->hashed)
		n++;
	pack_map16(pk, n);
	KEY(pk, "id");
	if (t->id)
		msgpack_pack_uint64(pk, t->id);
	else
		msgpack_pack_nil(pk);
	KV_SSTR(pk, "wallet", t->wallet);
	KV_STR(pk, "type", txn_type_names[t->type]);
	KV_AMOUNT(pk, "amount", t->amount);
	KV_AMOUNT(pk, "balance_after", t->balance_after);
	KV_STR(pk, "currency", t->currency);
	KV_STR(pk, "description", t->description);
	KV_TIME(pk, "created_at", t->created_at);
	if (t->ref.n)
		KV_SSTR(pk, "ref", t->ref);
	if (t->channel.n) {
		KV_SSTR(pk, "channel", t->channel);
		KV_STR(pk, "to", t->to);
		KV_SSTR(pk, "route", t->route);
		KV_U64(pk, "segments", t->segments);
		KV_AMOUNT(pk, "price", t->price);
		KV_STR(pk, "price_currency", t->price_currency);
	}
	if (t->refund_of && (t->type == T_TRANSFER_OUT || t->type == T_TRANSFER_IN))
		KV_U64(pk, "counterpart", t->refund_of);
	else if (t->refund_of)
		KV_U64(pk, "refund_of", t->refund_of);
	if (t->has_actor) {
		KEY(pk, "actor");
		msgpack_pack_map(pk, 1 + (t->actor.n > 0) + (t->origin.n > 0));
		KV_U64(pk, "uid", t->actor_uid);
		if (t->actor.n)
			KV_SSTR(pk, "name", t->actor);
		if (t->origin.n)
			KV_SSTR(pk, "node", t->origin);
	}
	if (t->provider.n) {
		KV_SSTR(pk, "provider", t->provider);
		KV_SSTR(pk, "provider_ref", t->provider_ref);
	}
	if (t->paid_currency) {
		KV_AMOUNT(pk, "paid_amount", t->paid_amount);
		KV_STR(pk, "paid_currency", t->paid_currency);
	}
	if (t->hold.n)
		KV_SSTR(pk, "hold", t->hold);
	if (t->fate)
		delivery_report_pack(pk, t->fate, t->fate_error);
	if (t->id == 0)
		KV_BOOL(pk, "pending", t->pending);
	if (t->hashed) {
		KEY(pk, "hash");
		hash_pack(pk, t->hash);
	}
	if (replayed >= 0)
		KV_BOOL(pk, "replayed", replayed);
}

/*
 * Packs a transaction as stored after its head: an array of what the head
 * and the key do not hold, nil where a field does not apply.  Without the
 * map's keys, its type, amounts and time a record is about half the size
 * (the log is most of a commit's pages and of the store).  A charge under
 * a hold has one field more, the hold's ref.
 */
#define TXN_STORED_FIELDS 16

static void
pack_sstr_or_nil(msgpack_packer *pk, struct str s)
{
	if (s.n)
		pack_sstr(pk, s);
	else
		msgpack_pack_nil(pk);
}

static void
txn_pack_stored(msgpack_packer *pk, const struct txn *t)
{
	msgpack_pack_array(pk, TXN_STORED_FIELDS + (t->hold.n > 0));
	pack_sstr(pk, t->wallet);
	pack_cstr(pk, t->currency);
	pack_cstr(pk, t->description);
	pack_sstr_or_nil(pk, t->ref);
	if (t->channel.n) {
		pack_sstr(pk, t->channel);
		pack_cstr(pk, t->to);
		pack_sstr(pk, t->route);
		msgpack_pack_uint32(pk, t->segments);
		msgpack_pack_int64(pk, t->price);
		pack_cstr(pk, t->price_currency);
	} else {
		for (int i = 0; i < 6; i++)
			msgpack_pack_nil(pk);
	}
	if (t->refund_of)
		msgpack_pack_uint64(pk, t->refund_of);
	else
		msgpack_pack_nil(pk);
	if (t->has_actor) {
		msgpack_pack_array(pk, t->origin.n ? 3 : 2);
		msgpack_pack_uint32(pk, t->actor_uid);
		pack_sstr_or_nil(pk, t->actor);
		if (t->origin.n)
			pack_sstr(pk, t->origin);
	} else {
		msgpack_pack_nil(pk);
	}
	pack_sstr_or_nil(pk, t->provider);
	pack_sstr_or_nil(pk, t->provider_ref);
	if (t->paid_currency) {
		msgpack_pack_int64(pk, t->paid_amount);
		pack_cstr(pk, t->paid_currency);
	} else {
		msgpack_pack_nil(pk);
		msgpack_pack_nil(pk);
	}
	if (t->hold.n)
		pack_sstr(pk, t->hold);
}

/* A stored field: a string (nil gives an empty one).  0, or -1 if neither. */
static int
stored_str(const msgpack_object *o, struct str *s)
{
	if (o->type == MSGPACK_OBJECT_NIL) {
		*s = (struct str){ NULL, 0 };
		return 0;
	}
	if (o->type != MSGPACK_OBJECT_STR)
		return -1;
	*s = (struct str){ o->via.str.ptr, o->via.str.size };
	return 0;
}

/* A stored string field copied, NUL-terminated, into buf[size]. */
static int
stored_cstr(const msgpack_object *o, char *buf, size_t size)
{
	struct str s;

	if (stored_str(o, &s) != 0 || s.n >= size)
		return -1;
	memcpy(buf, s.p ? s.p : "", s.n);
	buf[s.n] = '\0';
	return 0;
}

/* A stored integer field (nil gives 0). */
static int
stored_int(const msgpack_object *o, int64_t *v)
{
	if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= INT64_MAX)
		*v = (int64_t)o->via.u64;
	else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
		*v = o->via.i64;
	else if (o->type == MSGPACK_OBJECT_NIL)
		*v = 0;
	else
		return -1;
	return 0;
}

/* Per-thread decoding room for txn_expand, kept between records: a history
 * page expands 50, and a fresh zone each time (msgpack_unpack_next) was an
 * 8 KiB malloc and free per record. */
static _Thread_local msgpack_zone *expand_zone;

/*
 * Packs stored record p[n] of transaction id, head h, as the map txn_pack
 * makes.  Returns 0, MDB_CORRUPTED if it does not decode (then it packed
 * nothing), or ENOMEM.
 */
static int
txn_decode(uint64_t id, const struct txn_head *h, const char *p, size_t n, struct txn *tp, struct txn_text *x)
{
	char to[sizeof(((struct txn *)0)->to)];
	const msgpack_object *f;
	msgpack_object o;
	struct txn t;
	int64_t segments = 0, refund_of = 0, uid = 0;
	size_t off = 0;

	memset(&t, 0, sizeof(t));
	if (expand_zone == NULL && (expand_zone = msgpack_zone_new(2048)) == NULL)
		return ENOMEM;
	msgpack_zone_clear(expand_zone);
	if (msgpack_unpack(p, n, &off, expand_zone, &o) != MSGPACK_UNPACK_SUCCESS ||
	    o.type != MSGPACK_OBJECT_ARRAY || o.via.array.size < TXN_STORED_FIELDS ||
	    o.via.array.size > TXN_STORED_FIELDS + 1 ||
	    h->type == 0 || h->type >= T__COUNT)
		return MDB_CORRUPTED;
	f = o.via.array.ptr;
	t.id = id;
	t.type = (int)h->type;
	t.amount = h->amount;
	t.balance_after = h->balance_after;
	t.created_at = h->created_at;
	if (stored_str(&f[0], &t.wallet) || stored_cstr(&f[1], x->currency, sizeof(x->currency)) ||
	    stored_cstr(&f[2], t.description, sizeof(t.description)) || stored_str(&f[3], &t.ref) ||
	    stored_str(&f[4], &t.channel) || stored_cstr(&f[5], to, sizeof(to)) ||
	    stored_str(&f[6], &t.route) || stored_int(&f[7], &segments) ||
	    stored_int(&f[8], &t.price) || stored_cstr(&f[9], x->price_currency, sizeof(x->price_currency)) ||
	    stored_int(&f[10], &refund_of) || stored_str(&f[12], &t.provider) ||
	    stored_str(&f[13], &t.provider_ref) || stored_int(&f[14], &t.paid_amount) ||
	    stored_cstr(&f[15], x->paid_currency, sizeof(x->paid_currency)) ||
	    (o.via.array.size > TXN_STORED_FIELDS && stored_str(&f[16], &t.hold)))
		return MDB_CORRUPTED;
	if (f[11].type == MSGPACK_OBJECT_ARRAY) {
		const msgpack_object *a = f[11].via.array.ptr;

		if (f[11].via.array.size < 2 || f[11].via.array.size > 3 || stored_int(&a[0], &uid) ||
		    stored_str(&a[1], &t.actor) || (f[11].via.array.size == 3 && stored_str(&a[2], &t.origin)))
			return MDB_CORRUPTED;
		t.has_actor = 1;
		t.actor_uid = (uint32_t)uid;
	} else if (f[11].type != MSGPACK_OBJECT_NIL) {
		return MDB_CORRUPTED;
	}
	memcpy(t.to, to, sizeof(to));
	t.currency = x->currency;
	t.segments = (uint32_t)segments;
	t.price_currency = t.channel.n ? x->price_currency : NULL;
	t.refund_of = (uint64_t)refund_of;
	t.paid_currency = x->paid_currency[0] ? x->paid_currency : NULL;
	*tp = t;
	return 0;
}

/* Packs stored transaction id (head h, record p) as its map, with its delivery report if it has one. */
static int
txn_expand(MDB_txn *txn, uint64_t id, const struct txn_head *h, const char *p, size_t n, msgpack_packer *pk)
{
	struct charge_fate fate;
	struct txn_text x;
	struct txn t;
	int rc;

	if ((rc = txn_decode(id, h, p, n, &t, &x)) != 0 ||
	    (txn && (h->flags & TXN_REPORTED) && (rc = txn_fate(txn, &t, &fate)) != 0))
		return rc;
	if ((t.hashed = (h->flags & TXN_HASHED) != 0))
		memcpy(t.hash, p - 32, 32); /* txn_split left it just before the record */
	txn_pack(pk, &t, -1);
	return 0;
}

/*
 * Appends t to the log and to wallet w's chain: gives t its id and its
 * created_at (now, or the last transaction's if the clock went back), sets
 * balance_after from w->balance (already changed by the caller), links it
 * after w->last_txn, hashes it after that one (the hash chain), and counts
 * it in w; every HIST_STRIDE-th one also goes
 * into the hist index.  The caller writes w.  scratch receives the record
 * as stored (txn_pack_stored).  Returns 0 or an LMDB error.
 */
static int
txn_append(MDB_txn *txn, struct wallet *w, struct txn *t, msgpack_sbuffer *scratch)
{
	MDB_cursor *cur;
	MDB_val k, v;
	unsigned char hkey[16], prev[32];
	struct txn_head h;
	msgpack_packer pk;
	int rc;

	if ((rc = mdb_cursor_open(txn, store.txns, &cur)) != 0)
		return rc;
	rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
	mdb_cursor_close(cur);
	t->created_at = now_seconds();
	if (rc == MDB_NOTFOUND) {
		t->id = 1;
	} else if (rc == 0) {
		memcpy(&t->id, k.mv_data, sizeof(t->id));
		t->id++;
		/* created_at never decreases with the id, whatever the clock does:
		 * a time range of the log is then a binary search */
		if (v.mv_size >= sizeof(h)) {
			memcpy(&h, v.mv_data, sizeof(h));
			if (h.created_at > t->created_at)
				t->created_at = h.created_at;
		}
	} else {
		return rc;
	}
	t->balance_after = w->balance;
	if ((rc = chain_get(txn, w->last_txn, prev)) != 0)
		return rc == MDB_NOTFOUND ? MDB_CORRUPTED : rc;
	if (txn_hash(t, prev, t->hash) != 0)
		return EIO;
	t->hashed = 1;
	msgpack_sbuffer_clear(scratch);
	msgpack_packer_init(&pk, scratch, msgpack_sbuffer_write);
	txn_pack_stored(&pk, t);
	memset(&h, 0, sizeof(h));
	h.prev = w->last_txn;
	h.seq = w->txn_count;
	h.amount = t->amount;
	h.balance_after = t->balance_after;
	h.created_at = t->created_at;
	h.type = (uint32_t)t->type;
	h.flags = TXN_HASHED;
	k = (MDB_val){ sizeof(t->id), &t->id };
	v = (MDB_val){ sizeof(h) + sizeof(t->hash) + scratch->size, NULL };
	if ((rc = captured_put(txn, store.txns, &k, &v, MDB_APPEND | MDB_RESERVE)) != 0)
		return rc;
	memcpy(v.mv_data, &h, sizeof(h));
	memcpy((char *)v.mv_data + sizeof(h), t->hash, sizeof(t->hash));
	memcpy((char *)v.mv_data + sizeof(h) + sizeof(t->hash), scratch->data, scratch->size);
	if (w->txn_count % HIST_STRIDE == HIST_STRIDE - 1) {
		k = key_pair(hkey, w->number, w->txn_count);
		v = (MDB_val){ sizeof(t->id), &t->id };
		if ((rc = captured_put(txn, store.hist, &k, &v, 0)) != 0)
			return rc;
	}
	w->last_txn = t->id;
	w->txn_count++;
	return 0;
}

/* ---- Credit lots ---- */

/* Per-thread room to pack a record before storing it. */
static _Thread_local msgpack_sbuffer scratch;

/* lots' key of lot l of wallet number: number, class, expires_at, id (big-endian: the draw order). */
static MDB_val
lot_key(unsigned char key[LOT_KEY], uint64_t number, const struct lot *l)
{
	be64_put(key, number);
	key[8] = (unsigned char)l->kind;
	be64_put(key + 9, (uint64_t)l->expires_at);
	be64_put(key + 17, l->id);
	return (MDB_val){ LOT_KEY, key };
}

/* holdexp's key of lot l of wallet number: expires_at, number, a NUL, class, id. */
static MDB_val
lot_expiry_key(unsigned char key[8 + 8 + 1 + 1 + 8], uint64_t number, const struct lot *l)
{
	be64_put(key, (uint64_t)l->expires_at);
	be64_put(key + 8, number);
	key[16] = '\0';
	key[17] = (unsigned char)l->kind;
	be64_put(key + 18, l->id);
	return (MDB_val){ 26, key };
}

/* Makes w's first lot in draw order its head: there is one while its lots hold anything.  0 or an LMDB error. */
static int
lot_head_load(MDB_txn *txn, struct wallet *w)
{
	unsigned char prefix[8];
	MDB_cursor *cur;
	MDB_val k = { 8, prefix }, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, store.lots, &cur)) != 0)
		return rc;
	be64_put(prefix, w->number);
	if ((rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE)) == 0 && (k.mv_size != LOT_KEY ||
	    be64_get(k.mv_data) != w->number))
		rc = MDB_NOTFOUND;
	if (rc == 0)
		record_copy(&w->lots.head, LOT_FIELDS, v);
	mdb_cursor_close(cur);
	return rc == MDB_NOTFOUND ? MDB_CORRUPTED : rc; /* lots that sum to more than there is */
}

/* Writes w's head lot's remaining into its lots record: w then has no head, until lots_draw loads one. */
static int
lot_head_store(MDB_txn *txn, struct wallet *w)
{
	unsigned char key[LOT_KEY];
	MDB_val k = lot_key(key, w->number, &w->lots.head), v;
	struct lot l;
	int rc;

	if (w->lots.head.id == 0)
		return 0;
	if ((rc = mdb_get(txn, store.lots, &k, &v)) != 0)
		return rc == MDB_NOTFOUND ? MDB_CORRUPTED : rc;
	record_copy(&l, sizeof(l), v);
	l.remaining = w->lots.head.remaining;
	w->lots.head.id = 0;
	return captured_put(txn, store.lots, &k, &(MDB_val){ sizeof(l), &l }, 0);
}

/* l, read from lots, with the remaining that w keeps when it is w's head lot. */
static void
lot_overlay(const struct wallet *w, struct lot *l)
{
	if (l->id == w->lots.head.id)
		l->remaining = w->lots.head.remaining;
}

/*
 * A new lot of w (id) for the credit t of amount: kind LOT_*, expiring at
 * expires_at (LOT_NEVER: never), in w's lots' total.  Returns 0 or an
 * LMDB error.
 */
static int
lot_add(MDB_txn *txn, struct str id, struct wallet *w, const struct txn *t, uint32_t kind, int64_t expires_at)
{
	unsigned char key[LOT_KEY], xkey[26];
	struct lot l = { .amount = t->amount, .remaining = t->amount, .expires_at = expires_at, .id = t->id,
		.kind = kind };
	MDB_val k = lot_key(key, w->number, &l), xk;
	int rc;

	memcpy(l.wallet, id.p, id.n);
	if ((rc = lot_head_store(txn, w)) != 0 ||
	    (rc = captured_put(txn, store.lots, &k, &(MDB_val){ sizeof(l), &l }, 0)) != 0)
		return rc;
	if (expires_at != LOT_NEVER) {
		const int days[] = LOT_REMINDERS;
		unsigned char rkey[27];

		xk = lot_expiry_key(xkey, w->number, &l);
		if ((rc = captured_put(txn, store.holdexp, &xk, &(MDB_val){ 1, "" }, 0)) != 0)
			return rc;
		for (size_t i = 0; i < sizeof(days) / sizeof(days[0]); i++) { /* reminders still to come */
			int64_t at = expires_at - days[i] * 86400;

			if (at <= now_seconds())
				continue;
			memcpy(rkey, xkey, 26);
			be64_put(rkey, (uint64_t)at);
			rkey[26] = (unsigned char)days[i];
			if ((rc = captured_put(txn, store.holdexp, &(MDB_val){ 27, rkey }, &(MDB_val){ 1, "" }, 0)) != 0)
				return rc;
			if (at < store.next_expiry)
				store.next_expiry = at;
		}
		if (expires_at < store.next_expiry)
			store.next_expiry = expires_at;
	}
	w->lots.total += t->amount;
	return 0;
}

/*
 * Takes amount, just taken from w's balance, from its lots in their draw
 * order (promo, then the soonest to expire, then those that never do): a
 * lot's money is the first spent, so w's lots never hold more than its
 * balance.  It draws on w's head lot, kept in w's record: most charges
 * read and write no lot.  A lot emptied leaves, and the next becomes the
 * head.  drawn (if not NULL) gets what each lot gave.  Returns 0 or an
 * LMDB error.
 */
static int
lots_draw(MDB_txn *txn, struct wallet *w, int64_t amount, struct lot_draws *drawn)
{
	struct lot *h = &w->lots.head;
	int rc;

	while (amount > 0 && w->lots.total > 0) {
		unsigned char key[LOT_KEY], xkey[26];
		MDB_val k, xk;
		int64_t take;

		if (h->id == 0 && (rc = lot_head_load(txn, w)) != 0)
			return rc;
		take = h->remaining < amount ? h->remaining : amount;
		if (drawn && drawn->n < LOT_DRAWS_MAX) /* beyond: a refund gives that back without a lot */
			drawn->d[drawn->n++] = (struct lot_draw){ take, h->amount, h->expires_at, h->id, h->kind, 0 };
		h->remaining -= take;
		w->lots.total -= take;
		amount -= take;
		if (h->remaining > 0)
			break;
		k = lot_key(key, w->number, h);
		if ((rc = captured_del(txn, store.lots, &k, NULL)) != 0)
			return rc;
		if (h->expires_at != LOT_NEVER && (xk = lot_expiry_key(xkey, w->number, h),
		    (rc = captured_del(txn, store.holdexp, &xk, NULL)) != 0 && rc != MDB_NOTFOUND))
			return rc;
		h->id = 0;
	}
	return 0;
}

static int lot_remind(MDB_txn *txn, struct str id, struct wallet *w, const struct lot *l); /* section 4 */

/*
 * A refund of amount, after earlier ones of refunded, of a charge that
 * took drawn from w's (id) lots returns to them, the last one first: a lot
 * that was emptied comes back, with its expires_at (past: the writer ends
 * it at once, as if the money had stayed).  What the charge took from no
 * lot stays without one.  Returns 0 or an LMDB error.
 */
static int
lots_give_back(MDB_txn *txn, struct str id, struct wallet *w, const struct lot_draws *drawn, int64_t refunded,
    int64_t amount)
{
	int rc;

	if ((rc = lot_head_store(txn, w)) != 0)
		return rc;
	for (size_t i = drawn->n; i-- > 0 && amount > 0;) {
		const struct lot_draw *d = &drawn->d[i];
		struct lot l = { .expires_at = d->expires_at, .id = d->id, .kind = d->kind };
		unsigned char key[LOT_KEY], xkey[26];
		int64_t left = d->amount - refunded, give = left < amount ? left : amount;
		MDB_val lk = lot_key(key, w->number, &l), lv;

		refunded = refunded > d->amount ? refunded - d->amount : 0; /* earlier refunds gave back the last first */
		if (give <= 0)
			continue;
		if ((rc = mdb_get(txn, store.lots, &lk, &lv)) == 0) {
			record_copy(&l, sizeof(l), lv);
		} else if (rc == MDB_NOTFOUND) { /* emptied: it comes back */
			l.amount = d->lot_amount;
			memcpy(l.wallet, id.p, id.n);
			if (l.expires_at != LOT_NEVER) {
				MDB_val xk = lot_expiry_key(xkey, w->number, &l);

				if ((rc = captured_put(txn, store.holdexp, &xk, &(MDB_val){ 1, "" }, 0)) != 0)
					return rc;
				if (l.expires_at < store.next_expiry)
					store.next_expiry = l.expires_at;
			}
		} else {
			return rc;
		}
		l.remaining += give;
		if ((rc = captured_put(txn, store.lots, &lk, &(MDB_val){ sizeof(l), &l }, 0)) != 0)
			return rc;
		w->lots.total += give;
		amount -= give;
	}
	return 0;
}

/*
 * The writer, at a lot's expires_at (its holdexp key): what is left of it
 * leaves the balance as an expiry transaction, written once (the lot goes
 * in the same commit).  Money held by a hold is spared: the hold keeps it.
 * At a reminder's key (xlen 27), a reminder instead.  Returns 0 or an
 * LMDB error.
 */
static int
lot_expire(MDB_txn *txn, const unsigned char *xkey, size_t xlen)
{
	int days = xlen == 27 ? xkey[26] : 0; /* a reminder's */
	struct lot l = { .expires_at = (int64_t)be64_get(xkey) + days * 86400, .kind = xkey[17],
		.id = be64_get(xkey + 18) };
	unsigned char key[LOT_KEY];
	MDB_val k = lot_key(key, be64_get(xkey + 8), &l), v;
	struct wallet w;
	struct txn t;
	struct str id;
	int64_t gone;
	int rc;

	if ((rc = mdb_get(txn, store.lots, &k, &v)) != 0)
		return rc == MDB_NOTFOUND ? 0 : rc; /* spent before it lapsed */
	record_copy(&l, sizeof(l), v);
	id = (struct str){ l.wallet, strlen(l.wallet) };
	if ((rc = wallet_get(txn, id, &w)) != 0)
		return rc;
	lot_overlay(&w, &l);
	if (days)
		return lot_remind(txn, id, &w, &l);
	if ((rc = captured_del(txn, store.lots, &k, NULL)) != 0)
		return rc;
	if (l.id == w.lots.head.id)
		w.lots.head.id = 0;
	gone = w.balance - w.held < l.remaining ? w.balance - w.held : l.remaining;
	w.lots.total -= l.remaining;
	if (gone > 0) {
		memset(&t, 0, sizeof(t));
		t.type = T_EXPIRY;
		t.wallet = id;
		t.amount = -gone;
		t.currency = w.currency;
		snprintf(t.description, sizeof(t.description), "%s credit of transaction %" PRIu64 " expired",
		    l.kind == LOT_PROMO ? "Promotional" : "Paid", l.id);
		w.balance -= gone;
		if ((rc = txn_append(txn, &w, &t, &scratch)) != 0)
			return rc;
	}
	return wallet_put(txn, id, &w);
}

/* Packs "lots": w's lots with something left, in draw order. */
static int
lots_pack(MDB_txn *txn, msgpack_packer *pk, const struct wallet *w)
{
	unsigned char prefix[8];
	msgpack_sbuffer rows;
	msgpack_packer rpk;
	MDB_cursor *cur;
	MDB_val k = { 8, prefix }, v;
	size_t n = 0;
	int rc = 0;

	msgpack_sbuffer_init(&rows);
	msgpack_packer_init(&rpk, &rows, msgpack_sbuffer_write);
	be64_put(prefix, w->number);
	if (w->lots.total && (rc = mdb_cursor_open(txn, store.lots, &cur)) == 0) {
		for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0 && k.mv_size == LOT_KEY &&
		    be64_get(k.mv_data) == w->number; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT), n++) {
			struct lot l;

			record_copy(&l, sizeof(l), v);
			lot_overlay(w, &l);
			msgpack_pack_map(&rpk, 5);
			KV_U64(&rpk, "id", l.id);
			KV_STR(&rpk, "kind", l.kind == LOT_PROMO ? "promo" : "paid");
			KV_AMOUNT(&rpk, "amount", l.amount);
			KV_AMOUNT(&rpk, "remaining", l.remaining);
			KEY(&rpk, "expires_at");
			if (l.expires_at == LOT_NEVER)
				msgpack_pack_nil(&rpk);
			else
				pack_time(&rpk, l.expires_at);
		}
		mdb_cursor_close(cur);
	}
	KEY(pk, "lots");
	msgpack_pack_array(pk, n);
	pk->callback(pk->data, rows.data, rows.size);
	msgpack_sbuffer_destroy(&rows);
	return rc == MDB_NOTFOUND ? 0 : rc;
}

/* Per-thread room for the map of the last record txn_read expanded. */
static _Thread_local msgpack_sbuffer expanded;

/*
 * Splits a stored transaction v into its head *h and its record *rec,
 * after its hash when it has one (TXN_HASHED: then 32 bytes before
 * rec).  0, or MDB_CORRUPTED.
 */
static int
txn_split(MDB_val v, struct txn_head *h, MDB_val *rec)
{
	size_t skip;

	if (v.mv_size <= sizeof(*h))
		return MDB_CORRUPTED;
	memcpy(h, v.mv_data, sizeof(*h));
	skip = sizeof(*h) + (h->flags & TXN_HASHED ? 32 : 0);
	if (v.mv_size <= skip)
		return MDB_CORRUPTED;
	*rec = (MDB_val){ v.mv_size - skip, (char *)v.mv_data + skip };
	return 0;
}

/*
 * Reads transaction id: its head into *h and what follows, the stored
 * record, into *rec.  Returns 0, MDB_NOTFOUND or an LMDB error.
 */
static int
txn_fetch(MDB_txn *txn, uint64_t id, struct txn_head *h, MDB_val *rec)
{
	MDB_val k = { sizeof(id), &id }, v;
	int rc = mdb_get(txn, store.txns, &k, &v);

	return rc != 0 ? rc : txn_split(v, h, rec);
}

/* A record of layout 3 is the transaction's map itself (a map16). */
static int
record_is_map(MDB_val rec)
{
	return *(const unsigned char *)rec.mv_data == 0xde;
}

/* Packs transaction id's map from its head h and stored record rec. */
static int
txn_pack_record(MDB_txn *txn, msgpack_packer *pk, uint64_t id, const struct txn_head *h, MDB_val rec)
{
	int rc = 0;

	if (!record_is_map(rec))
		return txn_expand(txn, id, h, rec.mv_data, rec.mv_size, pk);
	if (h->flags & TXN_HASHED) /* a layout 3 map, hashed at the upgrade: with its hash */
		rc = txn_read(txn, id, NULL, &rec);
	if (rc == 0)
		pk->callback(pk->data, rec.mv_data, rec.mv_size);
	return rc;
}

/*
 * Reads transaction id: its head into *h (if h) and its msgpack map into
 * *raw (if raw), valid until this thread's next txn_read.  Returns 0,
 * MDB_NOTFOUND or an LMDB error.
 */
static int
txn_read(MDB_txn *txn, uint64_t id, struct txn_head *h, MDB_val *raw)
{
	struct txn_head head;
	msgpack_packer pk;
	MDB_val rec;
	int rc;

	if ((rc = txn_fetch(txn, id, &head, &rec)) != 0)
		return rc;
	if (h)
		*h = head;
	if (raw == NULL)
		return 0;
	msgpack_sbuffer_clear(&expanded);
	msgpack_packer_init(&pk, &expanded, msgpack_sbuffer_write);
	if (record_is_map(rec)) {
		const unsigned char *p = rec.mv_data;

		if (!(head.flags & TXN_HASHED)) {
			*raw = rec;
			return 0;
		}
		pack_map16(&pk, ((unsigned)p[1] << 8 | p[2]) + 1);
		msgpack_sbuffer_write(&expanded, (const char *)p + 3, rec.mv_size - 3);
		KEY(&pk, "hash");
		hash_pack(&pk, p - 32);
		*raw = (MDB_val){ expanded.size, expanded.data };
		return 0;
	}
	if ((rc = txn_expand(txn, id, &head, rec.mv_data, rec.mv_size, &pk)) != 0)
		return rc;
	*raw = (MDB_val){ expanded.size, expanded.data };
	return 0;
}

/* Frees this thread's room for expanding records, at its end. */
static void
expand_free(void)
{
	msgpack_sbuffer_destroy(&expanded);
	msgpack_sbuffer_init(&expanded);
	if (expand_zone)
		msgpack_zone_free(expand_zone);
	expand_zone = NULL;
}

/* Reads transaction id's msgpack map into *raw.  0, MDB_NOTFOUND or error. */
static int
txn_get(MDB_txn *txn, uint64_t id, MDB_val *raw)
{
	return txn_read(txn, id, NULL, raw);
}

/*
 * Finds the id of wallet w's transaction number seq (< w->txn_count): from
 * the nearest hist entry at or after it, or from w->last_txn, back along
 * the chain - fewer than HIST_STRIDE links.  Returns 0 or an LMDB error.
 */
static int
wallet_txn_at(MDB_txn *txn, const struct wallet *w, uint64_t seq, uint64_t *id)
{
	uint64_t at = seq | (HIST_STRIDE - 1);
	struct txn_head h;
	int rc;

	if (at >= w->txn_count) {
		at = w->txn_count - 1;
		*id = w->last_txn;
	} else {
		unsigned char key[16];
		MDB_val k = key_pair(key, w->number, at), v;

		if ((rc = mdb_get(txn, store.hist, &k, &v)) != 0)
			return rc;
		memcpy(id, v.mv_data, sizeof(*id));
	}
	for (; at > seq; at--) {
		if ((rc = txn_read(txn, *id, &h, NULL)) != 0)
			return rc;
		*id = h.prev;
	}
	return 0;
}

/* ---- FX and rates ---- */

/*
 * Looks up the FX rate from -> to: the direct pair, else its inverse.
 * Returns 0 and sets *rate and *inverse, or MDB_NOTFOUND, or an LMDB error.
 */
static int
fx_get(MDB_txn *txn, const char *from, const char *to, i128 *rate, int *inverse)
{
	char key[6];
	MDB_val k = { 6, key }, v;
	struct fx_val fv;
	int rc;

	for (int inv = 0; inv < 2; inv++) {
		memcpy(key, inv ? to : from, 3);
		memcpy(key + 3, inv ? from : to, 3);
		rc = mdb_get(txn, store.fx, &k, &v);
		if (rc == 0) {
			memcpy(&fv, v.mv_data, sizeof(fv));
			*rate = fv.rate;
			*inverse = inv;
			return 0;
		}
		if (rc != MDB_NOTFOUND)
			return rc;
	}
	return MDB_NOTFOUND;
}

/*
 * Converts amount from one currency into another, rounding once, half away
 * from zero.  Returns E_OK, E_NO_FX_RATE, E_INVALID_ARGUMENT on overflow, or
 * -1 for an LMDB error, left in *err.
 */
static int
fx_convert(MDB_txn *txn, int64_t amount, const char *from, const char *to, int64_t *out, int *err)
{
	i128 rate;
	int inverse, rc;

	if (memcmp(from, to, 3) == 0) {
		*out = amount;
		return E_OK;
	}
	if ((rc = fx_get(txn, from, to, &rate, &inverse)) != 0) {
		*err = rc;
		return rc == MDB_NOTFOUND ? E_NO_FX_RATE : -1;
	}
	return fx_apply(amount, rate, inverse, out) == 0 ? E_OK : E_INVALID_ARGUMENT;
}

/* Builds the rate key plan\0channel\0prefix\0route into buf; returns its size. */
static size_t
rate_key(char *buf, struct str plan, struct str channel, const char *prefix,
    size_t prefix_len, struct str route)
{
	size_t n = 0;

	memcpy(buf + n, plan.p, plan.n), n += plan.n, buf[n++] = '\0';
	memcpy(buf + n, channel.p, channel.n), n += channel.n, buf[n++] = '\0';
	memcpy(buf + n, prefix, prefix_len), n += prefix_len, buf[n++] = '\0';
	memcpy(buf + n, route.p, route.n), n += route.n;
	return n;
}
#define RATE_KEY_MAX (WALLET_ID_MAX * 3 + 16 + 4)

/* Builds the meta key of a plan's prefix lengths into buf; returns its size. */
static size_t
rate_lengths_key(char *buf, struct str plan, struct str channel)
{
	buf[0] = 'L';
	memcpy(buf + 1, plan.p, plan.n);
	buf[1 + plan.n] = '\0';
	memcpy(buf + 2 + plan.n, channel.p, channel.n);
	return 2 + plan.n + channel.n;
}

/* The prefix lengths with rates in plan/channel, as bits; all of them if unknown. */
static uint32_t
rate_lengths(MDB_txn *txn, struct str plan, struct str channel)
{
	char key[RATE_KEY_MAX];
	MDB_val k = { rate_lengths_key(key, plan, channel), key }, v;
	uint32_t bits;

	if (mdb_get(txn, store.meta, &k, &v) != 0 || v.mv_size != sizeof(bits))
		return UINT32_MAX;
	memcpy(&bits, v.mv_data, sizeof(bits));
	return bits;
}

/*
 * A rate's prices: each in force from `from` (0: always) until the next
 * one's, sorted by from; stored as an array of these (layout 4 stored one
 * struct rate_val, read as one entry in force always), then, for a rate
 * whose refund policy is not keep, its struct rate_policy (16 bytes: the
 * size tells, as entries are 24).
 */
struct rate_entry {
	int64_t from;
	int64_t price;
	char currency[4];
	uint32_t pad;
};
#define RATE_SCHEDULE_MAX 8

/* What a failed delivery report does to a charge: nothing, a refund, a refund but a fee. */
enum { OF_KEEP, OF_REFUND, OF_FEE, OF__COUNT };
static const char *const on_failure_names[] = { "keep", "refund", "fee" };

struct rate_policy {
	int64_t failure_fee;      /* OF_FEE: what a failed message still costs, in the price's currency */
	uint8_t on_failure;       /* OF_* */
	uint8_t settle;           /* 1: a charge holds its cost until its delivery report (settle = delivery) */
	uint8_t timeout_release;  /* settle = delivery: 1 releases a charge no report came for, 0 charges it */
	uint8_t pad;
	uint32_t pending_timeout; /* settle = delivery: seconds a charge waits for its report (0: 72 h) */
};
#define PENDING_TIMEOUT_DEFAULT (72 * 3600)
#define PENDING_TIMEOUT_MAX (366 * 86400)

/* Reads stored rate v into e and pol (when given); returns the count of entries, 0 if it does not decode. */
static size_t
rate_entries(MDB_val v, struct rate_entry e[RATE_SCHEDULE_MAX], struct rate_policy *pol)
{
	size_t n = v.mv_size;

	if (pol)
		memset(pol, 0, sizeof(*pol));
	if (n == sizeof(struct rate_val)) {
		struct rate_val rv;

		memcpy(&rv, v.mv_data, sizeof(rv));
		e[0] = (struct rate_entry){ 0, rv.price, { 0 }, 0 };
		memcpy(e[0].currency, rv.currency, 4);
		return 1;
	}
	if (n % sizeof(*e) == sizeof(struct rate_policy)) {
		n -= sizeof(struct rate_policy);
		if (pol)
			memcpy(pol, (char *)v.mv_data + n, sizeof(*pol));
	}
	if (n % sizeof(*e) != 0 || n / sizeof(*e) > RATE_SCHEDULE_MAX)
		return 0;
	memcpy(e, v.mv_data, n);
	return n / sizeof(*e);
}

/* The entry of e[n] in force at `at` (the last from at or before it), or NULL. */
static const struct rate_entry *
rate_in_force(const struct rate_entry *e, size_t n, int64_t at)
{
	const struct rate_entry *hit = NULL;

	for (size_t i = 0; i < n && e[i].from <= at; i++)
		hit = &e[i];
	return hit;
}

/* The prefix part of a mobile network's rate key (no digit prefix starts so) into out; returns its length. */
static size_t
network_key(char out[8], const char *mccmnc)
{
	return (size_t)snprintf(out, 8, "m%s", mccmnc);
}

/* The rate chosen for one message: by its prefix, or by its mobile network (mccmnc, prefix ""). */
struct rate_hit {
	char prefix[16];
	char mccmnc[7];
	char route[WALLET_ID_MAX + 1];
	char currency[4];
	int64_t price;  /* per segment, in currency */
	int64_t cost;   /* price x segments, converted into the target currency */
	struct rate_policy policy;
};

/*
 * Finds the rate for a message to digits in plan/channel: the rate of its
 * mobile network mccmnc when given ("": none) and priced, else the longest prefix
 * that has a rate (for route, when route.p is set), and among its routes the
 * cheapest cost of segments converted into target (ties: route name
 * ascending), of the prices in force at `at`.  target NULL means the
 * first route's currency.  Costs ~15 seeks at worst, never a scan.  Returns E_OK, E_NO_RATE, E_NO_FX_RATE,
 * E_INVALID_ARGUMENT (overflow), or -1 for an LMDB error, left in *err.
 */
static int
rate_find(MDB_txn *txn, struct str plan, struct str channel, const char *digits,
    size_t ndigits, const char *mccmnc, struct str route, const char *target, uint32_t segments, int64_t at,
    struct rate_hit *hit, int *err)
{
	char key[RATE_KEY_MAX], first_currency[4], network[8];
	uint32_t lengths = rate_lengths(txn, plan, channel);
	size_t network_n = mccmnc[0] ? network_key(network, mccmnc) : 0;
	MDB_cursor *cur;
	int rc, result = E_NO_RATE;

	if ((rc = mdb_cursor_open(txn, store.rates, &cur)) != 0) {
		*err = rc;
		return -1;
	}
	/* len ndigits + 1 stands for the network's rate, looked up first */
	for (size_t len = ndigits + (network_n > 0); len > 0 && result == E_NO_RATE; len--) {
		int by_network = network_n && len == ndigits + 1;
		size_t klen;
		MDB_val k, v;
		int found = 0;

		if (!by_network && !(lengths & (1u << len)))
			continue; /* no rate has a prefix this long: no seek */
		klen = rate_key(key, plan, channel, by_network ? network : digits, by_network ? network_n : len,
		    route.p ? route : (struct str){ "", 0 });
		k = (MDB_val){ klen, key };
		rc = mdb_cursor_get(cur, &k, &v, route.p ? MDB_SET_KEY : MDB_SET_RANGE);
		for (; rc == 0; rc = route.p ? MDB_NOTFOUND : mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
			struct rate_entry entries[RATE_SCHEDULE_MAX];
			const struct rate_entry *rv;
			struct rate_policy pol;
			size_t route_len = k.mv_size - klen;
			int64_t cost, total;
			int conv;

			if (route.p == NULL && (k.mv_size < klen || memcmp(k.mv_data, key, klen) != 0))
				break;
			if ((rv = rate_in_force(entries, rate_entries(v, entries, &pol), at)) == NULL)
				continue; /* not in force yet */
			if (!found && target == NULL)
				target = memcpy(first_currency, rv->currency, 4);
			found = 1;
			if (__builtin_mul_overflow(rv->price, (int64_t)segments, &total)) {
				result = result == E_OK ? E_OK : E_INVALID_ARGUMENT;
				continue;
			}
			conv = fx_convert(txn, total, rv->currency, target, &cost, err);
			if (conv < 0) {
				mdb_cursor_close(cur);
				return conv;
			}
			if (conv != E_OK) {
				if (result != E_OK)
					result = conv;
				continue;
			}
			if (result == E_OK && cost >= hit->cost)
				continue;
			result = E_OK;
			hit->cost = cost;
			hit->price = rv->price;
			hit->policy = pol;
			memcpy(hit->currency, rv->currency, 4);
			snprintf(hit->prefix, sizeof(hit->prefix), "%.*s", by_network ? 0 : (int)len, digits);
			snprintf(hit->mccmnc, sizeof(hit->mccmnc), "%s", by_network ? mccmnc : "");
			route_len = route.p ? route.n : route_len;
			memcpy(hit->route, (char *)k.mv_data + k.mv_size - route_len, route_len);
			hit->route[route_len] = '\0';
		}
		if (rc != 0 && rc != MDB_NOTFOUND) {
			mdb_cursor_close(cur);
			*err = rc;
			return -1;
		}
	}
	mdb_cursor_close(cur);
	return result;
}

/* ====================================================================== */
/* 4. Methods                                                             */
/* ====================================================================== */

/* ---- Calls: params, errors, answers ---- */

/* One method call: its transaction, params, where its result goes, and its
 * error when it fails. */
struct call {
	MDB_txn *txn;               /* read txn, or the request's nested write txn */
	const msgpack_object *params; /* the params map, or NULL */
	msgpack_packer *pk;         /* the result is packed here */
	uid_t uid;                  /* the peer, for actor */
	struct str origin;          /* and its node, when another node forwarded the request */
	int fd;                     /* descriptor passed with the request, or -1 */
	int code;                   /* the error */
	const char *field;
	char field_buf[72];         /* field, when it names a key the caller sent */
	char message[512];
	int64_t required, available;
	char currency[4];
	uint64_t conflict_txn;
	uint64_t refunded;          /* already_refunded: the charge, whose refunds are packed */
	char hold[REF_MAX + 1];     /* unknown_hold, hold_closed: the hold */
	const char *hold_status;    /* hold_closed */
	char prefix[16];            /* destination_blocked: the blocked prefix; "" = not allowed; destination_suspended */
	const char *limit;          /* limit_exceeded: its name, max, used, when it resets; destination_suspended: */
	                            /* the reason, until (resets_at) */
	char limit_max[32], limit_used[32];
	int64_t resets_at;
	int alert;                  /* a notification was recorded */
	int mdb_rc;                 /* the first LMDB error met */
	uint64_t budget;            /* records a scan may visit (see over_budget); 0 = no limit */
};

typedef int (*method_fn)(struct call *);
static const method_fn method_fns[M__COUNT]; /* the handlers, at the end of this section */

/*
 * What a method returns when it ran out of its budget: a read on the event
 * loop may visit LOOP_BUDGET records, then stops and runs again on a helper
 * thread.  Otherwise a filtered history of a wallet with 500,000
 * transactions walks them all on the loop (57 ms, every other client
 * waiting), as does a far page of wallet.list or rate.list.
 */
#define E_OFF_LOOP  (-1)
#define LOOP_BUDGET 10000

/* Counts one record visited by a scan; nonzero when the budget is spent. */
static int
over_budget(struct call *c)
{
	return c->budget && --c->budget == 0;
}


/* Records error code with a message (and the param at fault); returns code. */
static int __attribute__((format(printf, 4, 5)))
fail(struct call *c, int code, const char *field, const char *fmt, ...)
{
	va_list ap;

	c->code = code;
	c->field = field;
	va_start(ap, fmt);
	vsnprintf(c->message, sizeof(c->message), fmt, ap);
	va_end(ap);
	return code;
}

/*
 * LMDB reports a short write as EIO.  On a full disk that is what the write
 * that fills it returns (seen on a full tmpfs: 16 of ~7,800 failed commits).
 * EIO with less than DISK_FULL_BYTES left on the store's disk is taken as
 * ENOSPC; with room left it stays an I/O error.
 */
#define DISK_FULL_BYTES (1u << 20)

static int
store_errno(int rc)
{
	struct statvfs fs;
	int fd;

	if (rc == EIO && mdb_env_get_fd(store.env, &fd) == 0 && fstatvfs(fd, &fs) == 0 &&
	    (uint64_t)fs.f_bavail * fs.f_frsize < DISK_FULL_BYTES)
		return ENOSPC;
	return rc;
}

/*
 * The one place that maps LMDB and system errors to our codes: a full map
 * or disk is storage_full, anything else internal (and logged loudly).
 * Returns the code.
 */
static int
store_error(struct call *c, int rc)
{
	rc = store_errno(rc);
	if (rc == MDB_PANIC)
		store_panic();
	if (c->mdb_rc == 0)
		c->mdb_rc = rc;
	if (rc == MDB_MAP_FULL || rc == ENOSPC || rc == EDQUOT || rc == MDB_TXN_FULL)
		return fail(c, E_STORAGE_FULL, NULL, "The store is full: %s", mdb_strerror(rc));
	if (rc == MDB_READERS_FULL)
		return fail(c, E_BUSY, NULL, "Too many reads at once; retry later");
	if (rc == EAGAIN)
		return fail(c, E_BUSY, NULL, "The journal waits for a checkpoint; retry later");
	log_x(L_ERR, "store error: %s", mdb_strerror(rc));
	return fail(c, E_INTERNAL, NULL, "Internal error: %s", mdb_strerror(rc));
}

/* Returns param name of the call, or NULL when absent. */
static const msgpack_object *
param(struct call *c, const char *name)
{
	return map_get(c->params, name);
}

/*
 * The names each method takes, from the method table's params column
 * (`?!name:type`; an F param is a descriptor passed beside the request,
 * never a map key), built once.
 */
static struct param_name {
	const char *p;
	size_t n;
	int admin_only;           /* `!`: a wallet's limits, which only admin may set */
} method_params[M__COUNT][PARAMS_MAX];

static void __attribute__((constructor))
method_params_init(void)
{
	for (int m = 0; m < M__COUNT; m++) {
		int k = 0;

		for (const char *p = method_table[m].params; *p;) {
			size_t len = strcspn(p, " ");  /* one `?!name:type` */
			const char *name = p + (*p == '?');
			int admin_only = *name == '!';
			size_t n = strcspn(name += admin_only, ": ");

			if (!(name[n] == ':' && name[n + 1] == 'F') && k < PARAMS_MAX - 1)
				method_params[m][k++] = (struct param_name){ name, n, admin_only };
			p += len + (p[len] == ' ');
		}
	}
}

/*
 * Returns the first key of params (a map, or NULL) that method m does not
 * take - a misspelt `text` must never charge one segment - or NULL when
 * every key is one of m's.  A key that is not a string is never m's.  With
 * admin_only, returns instead the first key of m's that only admin may pass.
 * Costs O(keys x m's params).
 */
static const msgpack_object *
param_unknown(int m, const msgpack_object *params, int admin_only)
{
	if (params == NULL || params->type != MSGPACK_OBJECT_MAP)
		return NULL;
	for (uint32_t i = 0; i < params->via.map.size; i++) {
		const msgpack_object *key = &params->via.map.ptr[i].key;
		const struct param_name *pn = method_params[m];

		if (key->type != MSGPACK_OBJECT_STR)
			return admin_only ? NULL : key;
		while (pn->p && !(pn->n == key->via.str.size && memcmp(pn->p, key->via.str.ptr, pn->n) == 0))
			pn++;
		if (admin_only ? pn->p && pn->admin_only : pn->p == NULL)
			return key;
	}
	return NULL;
}

/*
 * Fails c with invalid_argument naming key, a param method m does not take
 * (field holds at most 64 bytes of its name, NUL bytes as `?`).  Returns
 * the code.
 */
static int
fail_unknown_param(struct call *c, int m, const msgpack_object *key)
{
	size_t n = 0;

	if (key->type == MSGPACK_OBJECT_STR)
		for (; n < key->via.str.size && n < 64; n++)
			c->field_buf[n] = key->via.str.ptr[n] ? key->via.str.ptr[n] : '?';
	c->field_buf[n] = '\0';
	if (key->type != MSGPACK_OBJECT_STR)
		return fail(c, E_INVALID_ARGUMENT, "params", "param names must be strings");
	{
		char names[512];
		struct text t = { names, 0, sizeof(names) };

		names[0] = '\0';
		for (const struct param_name *pn = method_params[m]; pn->p; pn++) {
			text_add(&t, ", ", pn == method_params[m] ? 0 : 2);
			text_add(&t, pn->p, pn->n);
		}
		fail(c, E_INVALID_ARGUMENT, NULL, "%s takes no param '%s' (it takes: %s)",
		    method_table[m].name, c->field_buf, names[0] ? names : "none");
	}
	c->field = c->field_buf;
	return c->code;
}

/*
 * Reads string param name into *s (s->p NULL when absent or nil).  Returns
 * E_OK, or E_INVALID_ARGUMENT when required and missing, not a string,
 * longer than max bytes, or not UTF-8 without NUL bytes (the rule of every
 * string param: a NUL would cut a key or a message short).
 */
static int
p_str(struct call *c, const char *name, int required, size_t max, struct str *s)
{
	const msgpack_object *o = param(c, name);

	s->p = NULL;
	s->n = 0;
	if (o == NULL || o->type == MSGPACK_OBJECT_NIL)
		return required ? fail(c, E_INVALID_ARGUMENT, name, "%s is required", name) : E_OK;
	if (o->type != MSGPACK_OBJECT_STR)
		return fail(c, E_INVALID_ARGUMENT, name, "%s must be a string", name);
	if (o->via.str.size > max)
		return fail(c, E_INVALID_ARGUMENT, name, "%s is longer than %zu bytes", name, max);
	if (!utf8_valid(o->via.str.ptr, o->via.str.size))
		return fail(c, E_INVALID_ARGUMENT, name, "%s must be UTF-8 without NUL bytes", name);
	s->p = o->via.str.size ? o->via.str.ptr : "";
	s->n = o->via.str.size;
	return E_OK;
}

/* Reads a free text param (reason, description, actor): up to TEXT_MAX bytes. */
static int
p_text(struct call *c, const char *name, int required, struct str *s)
{
	return p_str(c, name, required, TEXT_MAX, s);
}

/* Reads the wallet id param (required). */
static int
p_wallet(struct call *c, struct str *s)
{
	int rc = p_str(c, "wallet", 1, WALLET_ID_MAX, s);

	if (rc == E_OK && !valid_wallet_id(*s))
		return fail(c, E_INVALID_ARGUMENT, "wallet",
		    "wallet must be 1-64 of A-Za-z0-9._:-");
	return rc;
}

/* Reads a name param (plan, route, provider): printable, no commas. */
static int
p_name(struct call *c, const char *name, int required, int allow_empty, struct str *s)
{
	int rc = p_str(c, name, required, WALLET_ID_MAX, s);

	if (rc == E_OK && s->p && !(allow_empty && s->n == 0) && !valid_name(*s, WALLET_ID_MAX))
		return fail(c, E_INVALID_ARGUMENT, name,
		    "%s must be 1-64 printable characters without spaces or commas", name);
	return rc;
}

static int
p_currency(struct call *c, const char *name, int required, struct str *s)
{
	char near[32];
	int rc = p_str(c, name, required, 3, s);

	if (rc != E_OK || s->p == NULL || valid_currency(*s, config.currencies, near))
		return rc;
	if (near[0])
		return fail(c, E_INVALID_ARGUMENT, name, "%s: '%.3s' is not an ISO 4217 currency code; nearest: %s "
		    "(a platform's own units go in config currencies)", name, s->p, near);
	return fail(c, E_INVALID_ARGUMENT, name, "%s must be an ISO 4217 currency code (3 upper-case letters, "
	    "e.g. KES, UGX, USD) or one of config currencies", name);
}

/*
 * Reads an amount param: a decimal string or a msgpack integer of whole
 * units.  *present is 0 when absent, -1 when nil, 1 when set.  sign is
 * AMOUNT_POSITIVE (zero and negatives rejected), AMOUNT_NONNEGATIVE or
 * AMOUNT_SIGNED (a threshold, under a credit limit).  Returns E_OK or
 * E_INVALID_ARGUMENT.
 */
enum { AMOUNT_SIGNED = -1, AMOUNT_NONNEGATIVE = 0, AMOUNT_POSITIVE = 1 };

static int
p_amount(struct call *c, const char *name, int required, int positive, int64_t *v, int *present)
{
	const msgpack_object *o = param(c, name);
	int64_t x;

	*present = 0;
	if (o == NULL || o->type == MSGPACK_OBJECT_NIL) {
		*present = o ? -1 : 0;
		return required ? fail(c, E_INVALID_ARGUMENT, name, "%s is required", name) : E_OK;
	}
	if (o->type == MSGPACK_OBJECT_STR) {
		if (amount_parse(o->via.str.ptr, o->via.str.size, &x) != 0)
			return fail(c, E_INVALID_ARGUMENT, name,
			    "%s must be a decimal like \"12.50\" with at most 6 decimals, within range", name);
	} else if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
		if (o->via.u64 > (uint64_t)(INT64_MAX / MICRO))
			return fail(c, E_INVALID_ARGUMENT, name, "%s is out of range", name);
		x = (int64_t)o->via.u64 * MICRO;
	} else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
		if (o->via.i64 < INT64_MIN / MICRO)
			return fail(c, E_INVALID_ARGUMENT, name, "%s is out of range", name);
		x = o->via.i64 * MICRO;
	} else {
		return fail(c, E_INVALID_ARGUMENT, name,
		    "%s must be a decimal string (floats are not accepted)", name);
	}
	if (positive == AMOUNT_POSITIVE && x <= 0)
		return fail(c, E_INVALID_ARGUMENT, name, "%s must be positive", name);
	if (positive == AMOUNT_NONNEGATIVE && x < 0)
		return fail(c, E_INVALID_ARGUMENT, name, "%s must not be negative", name);
	*v = x;
	*present = 1;
	return E_OK;
}

/* Reads boolean param name into *v (absent or nil: *v unchanged).  E_OK or invalid_argument. */
static int
p_bool(struct call *c, const char *name, int *v)
{
	const msgpack_object *o = param(c, name);

	if (o == NULL || o->type == MSGPACK_OBJECT_NIL)
		return E_OK;
	if (o->type != MSGPACK_OBJECT_BOOLEAN)
		return fail(c, E_INVALID_ARGUMENT, name, "%s must be true or false", name);
	*v = o->via.boolean;
	return E_OK;
}

/* Reads an unsigned integer param in [min, max]; *v keeps its default if absent. */
static int
p_uint(struct call *c, const char *name, int required, uint64_t min, uint64_t max, uint64_t *v)
{
	const msgpack_object *o = param(c, name);

	if (o == NULL || o->type == MSGPACK_OBJECT_NIL)
		return required ? fail(c, E_INVALID_ARGUMENT, name, "%s is required", name) : E_OK;
	if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 < min || o->via.u64 > max)
		return fail(c, E_INVALID_ARGUMENT, name,
		    "%s must be an integer from %" PRIu64 " to %" PRIu64, name, min, max);
	*v = o->via.u64;
	return E_OK;
}

/* Reads channel: "sms" or "whatsapp". */
static int
p_channel(struct call *c, struct str *s)
{
	int rc = p_str(c, "channel", 1, 16, s);

	if (rc == E_OK && !(s->n == 3 && memcmp(s->p, "sms", 3) == 0) &&
	    !(s->n == 8 && memcmp(s->p, "whatsapp", 8) == 0))
		return fail(c, E_INVALID_ARGUMENT, "channel", "channel must be sms or whatsapp");
	return rc;
}

/* Reads destination param name into digits (16 bytes); returns the count via *n. */
static int
p_e164(struct call *c, const char *name, char *digits, size_t *n)
{
	struct str s;
	int rc = p_str(c, name, 1, 32, &s);

	if (rc != E_OK)
		return rc;
	if ((*n = e164_digits(s, digits)) == 0)
		return fail(c, E_INVALID_ARGUMENT, name, "%s must be an E.164 number: optional + then 1-15 digits, "
		    "the first not 0 (use the international form, e.g. +256712345678)", name);
	return E_OK;
}

/*
 * Reads list param name: at most max strings, each passing valid (what
 * says what one must be, for the error), joined with commas into out (size
 * bytes); nil or [] is "".  An absent param leaves out as it was (an update
 * that does not name a list keeps it).  *present as p_amount.
 */
static int
p_list(struct call *c, const char *name, unsigned max, int (*valid)(struct str), const char *what,
    char *out, size_t size, int *present)
{
	const msgpack_object *o = param(c, name);
	size_t n = 0;

	*present = o == NULL ? 0 : 1;
	if (o == NULL)
		return E_OK;
	out[0] = '\0';
	if (o->type == MSGPACK_OBJECT_NIL)
		return E_OK;
	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size > max)
		return fail(c, E_INVALID_ARGUMENT, name, "%s must be a list of at most %u", name, max);
	for (uint32_t i = 0; i < o->via.array.size; i++) {
		const msgpack_object *e = &o->via.array.ptr[i];
		struct str s;

		if (e->type != MSGPACK_OBJECT_STR)
			return fail(c, E_INVALID_ARGUMENT, name, "%s must hold strings", name);
		s = (struct str){ e->via.str.ptr, e->via.str.size };
		if (!valid(s) || n + s.n + 2 > size)
			return fail(c, E_INVALID_ARGUMENT, name, "%s: '%.*s' is not %s", name,
			    (int)(s.n > 100 ? 100 : s.n), s.p, what);
		if (n)
			out[n++] = ',';
		memcpy(out + n, s.p, s.n);
		n += s.n;
		out[n] = '\0';
	}
	return E_OK;
}

/* Reads alert_emails: up to EMAILS_MAX addresses.  *present as p_amount. */
static int
p_emails(struct call *c, char out[EMAILS_BYTES], int *present)
{
	return p_list(c, "alert_emails", EMAILS_MAX, valid_email, "an e-mail address", out, EMAILS_BYTES, present);
}

/* Loads the wallet named by the wallet param; unknown_wallet if none. */
static int
load_wallet(struct call *c, struct str id, struct wallet *w)
{
	int rc = wallet_get(c->txn, id, w);

	if (rc == MDB_NOTFOUND)
		return fail(c, E_UNKNOWN_WALLET, "wallet", "No wallet '%.*s'", (int)id.n, id.p);
	return rc ? store_error(c, rc) : E_OK;
}

/* Packs key name and a comma-separated list as a list of strings. */
static void
pack_list(msgpack_packer *pk, const char *name, const char *list)
{
	size_t n = 0;

	pack_cstr(pk, name);
	for (const char *p = list; *p; p++)
		n += *p == ',';
	msgpack_pack_array(pk, list[0] ? n + 1 : 0);
	for (const char *p = list; *p;) {
		size_t len = strcspn(p, ",");

		msgpack_pack_str_with_body(pk, p, len);
		p += len + (p[len] == ',');
	}
}

/* Packs key name and the amount v, or nil unless set. */
static void
pack_amount_or_nil(msgpack_packer *pk, const char *name, int set, int64_t v)
{
	pack_cstr(pk, name);
	if (set)
		pack_amount(pk, v);
	else
		msgpack_pack_nil(pk);
}

/* Fraud brake setting i (G_*) of w: its own, or the config's. */
static uint32_t
guard_setting(const struct wallet *w, int i)
{
	const unsigned defaults[G__COUNT] = { config.guard_range_max, config.guard_window, config.guard_country_spike,
		config.guard_min_messages, config.guard_block };

	return w->guard_set & (1u << i) ? w->guard[i] : defaults[i];
}

/* The prefixes the fraud brake never suspends for w: its own, or the config's. */
static const char *
guard_safe(const struct wallet *w)
{
	return w->guard_set & GS_SAFE ? w->guard_safe : config.guard_safe_prefixes;
}

/* Packs a wallet as the methods answer it; held and available as of now. */
static int
wallet_pack(MDB_txn *txn, msgpack_packer *pk, struct str id, const struct wallet *w)
{
	int64_t held, available;
	int rc;

	if ((rc = wallet_available(txn, w, now_seconds(), &held, &available)) != 0)
		return rc;
	msgpack_pack_map(pk, 22 + G__COUNT);
	KV_SSTR(pk, "wallet", id);
	KV_STR(pk, "currency", w->currency);
	KEY(pk, "parent");
	if (w->parent[0])
		pack_cstr(pk, w->parent);
	else
		msgpack_pack_nil(pk);
	KV_BOOL(pk, "shared", (w->flags & WF_SHARED) != 0);
	KV_AMOUNT(pk, "balance", w->balance);
	KV_AMOUNT(pk, "held", held);
	KV_AMOUNT(pk, "available", available);
	KV_AMOUNT(pk, "credit_limit", w->credit_limit);
	KV_STR(pk, "plan", w->plan);
	pack_amount_or_nil(pk, "threshold", w->flags & WF_THRESHOLD, w->threshold);
	pack_list(pk, "alert_emails", w->emails);
	pack_amount_or_nil(pk, "daily_limit", w->flags & WF_DAILY, w->daily_limit);
	KEY(pk, "hourly_messages");
	if (w->flags & WF_HOURLY)
		msgpack_pack_uint32(pk, w->hourly_messages);
	else
		msgpack_pack_nil(pk);
	pack_list(pk, "allowed_prefixes", w->allowed);
	pack_list(pk, "blocked_prefixes", w->blocked);
	for (int i = 0; i < G__COUNT; i++) {
		pack_cstr(pk, guard_names[i]);
		msgpack_pack_uint32(pk, guard_setting(w, i));
	}
	pack_list(pk, "guard_safe_prefixes", guard_safe(w));
	KV_STR(pk, "status", w->flags & WF_FROZEN ? "frozen" : "active");
	KV_TIME(pk, "created_at", w->created_at);
	KV_U64(pk, "holds_active", w->holds_active);
	KEY(pk, "credit_validity");
	if (w->lots.validity)
		msgpack_pack_uint64(pk, (uint64_t)w->lots.validity / 86400);
	else
		msgpack_pack_nil(pk);
	KEY(pk, "auto_topup");
	if (w->autotop.provider) {
		const struct auto_topup *a = &w->autotop;

		msgpack_pack_map(pk, 9);
		KV_AMOUNT(pk, "below", a->below);
		pack_amount_or_nil(pk, "amount", a->amount != 0, a->amount);
		pack_amount_or_nil(pk, "to", a->to != 0, a->to);
		KV_STR(pk, "provider", auto_provider_names[a->provider % AP__COUNT]);
		{ /* its last four characters: a client may read this */
			char shown[8];
			size_t n = strlen(a->authorization);

			snprintf(shown, sizeof(shown), "...%s", a->authorization + (n > 4 ? n - 4 : 0));
			KV_STR(pk, "authorization", shown);
		}
		KV_STR(pk, "email", a->email);
		KV_U64(pk, "max_per_day", a->max_per_day);
		KV_BOOL(pk, "active", !(a->state & AUTO_OFF));
		KV_U64(pk, "failures", a->failures);
	} else {
		msgpack_pack_nil(pk);
	}
	return lots_pack(txn, pk, w);
}

/*
 * Writes the answer for a stored transaction raw: its map plus `replayed`.
 * The stored map always has a map16 header (txn_pack), so one more field
 * is a header rewrite, not a decode.
 */
static void
pack_txn_answer(msgpack_packer *pk, const void *raw, size_t len, int replayed)
{
	const unsigned char *p = raw;

	pack_map16(pk, ((unsigned)p[1] << 8 | p[2]) + 1);
	pk->callback(pk->data, (const char *)p + 3, len - 3);
	KV_BOOL(pk, "replayed", replayed);
}

/*
 * Records notification n of wallet w (id), in the commit of what it tells
 * of; the alert thread e-mails it to w's alert e-mails (with to_ops: to
 * ops_emails), or records it as having none.  Returns 0 or an LMDB error.
 */
static int
note_add(struct call *c, struct str id, struct wallet *w, struct note *n)
{
	unsigned char key[16];
	MDB_val k, v;
	int rc;

	n->created_at = n->next_attempt = now_seconds();
	n->balance = w->balance;
	if (n->kind == NK_AUTO_TOPUP_OFF) { /* both */
		struct text t = { n->emails, 0, sizeof(n->emails) };

		text_add(&t, w->emails, strlen(w->emails));
		text_add(&t, ",", w->emails[0] && config.ops_emails[0]);
		text_add(&t, config.ops_emails, strlen(config.ops_emails));
	} else {
		snprintf(n->emails, sizeof(n->emails), "%s", n->to_ops ? config.ops_emails : w->emails);
	}
	n->state = n->emails[0] || n->kind == NK_AUTO_TOPUP ? NS_PENDING : NS_NO_RECIPIENT;
	if (n->currency[0] == '\0') /* a payment problem's is the currency paid */
		memcpy(n->currency, w->currency, 4);
	memcpy(n->wallet, id.p, id.n);
	k = key_pair(key, w->number, w->note_count++);
	v = (MDB_val){ sizeof(*n), n };
	if ((rc = captured_put(c->txn, store.notes, &k, &v, 0)) != 0)
		return rc;
	if (n->state == NS_PENDING) {
		v = (MDB_val){ 1, "" };
		if ((rc = captured_put(c->txn, store.alertq, &k, &v, 0)) != 0)
			return rc;
		c->alert = 1;
	}
	return 0;
}

/* A new top-up's ref: "tp_" and 24 random hex digits.  Returns 0, or -1 without randomness. */
static int
topup_ref(char ref[32])
{
	unsigned char rnd[12];

	if (getrandom(rnd, sizeof(rnd), 0) != sizeof(rnd))
		return -1;
	strcpy(ref, "tp_");
	for (size_t i = 0; i < sizeof(rnd); i++)
		snprintf(ref + 3 + 2 * i, 3, "%02x", rnd[i]);
	return 0;
}

/*
 * Automatic top-up (README: Automatic top-up), in a commit that changed
 * wallet w (id): when its available balance is below `below` and the
 * request is armed, a pending top-up marked auto and a note the alert
 * thread acts on by charging the saved payment method, in this commit.
 * One per crossing: re-armed by a commit that leaves it at or above
 * `below` (wallet_put).  Past max_per_day it stays armed, for the next
 * day's first commit.  Returns 0 or an LMDB error (EIO without randomness).
 */
static int
auto_topup_request(struct call *c, struct str id, struct wallet *w)
{
	struct auto_topup *a = &w->autotop;
	int64_t available = w->balance + w->credit_limit - w->held, now = now_seconds();
	struct topup tp;
	struct note n;
	MDB_val k, v;
	int rc;

	if (available >= a->below || (a->state & (AUTO_ARMED | AUTO_OFF)) != AUTO_ARMED)
		return 0;
	if (a->day != now / 86400)
		a->day = now / 86400, a->today = 0;
	if (a->today >= a->max_per_day)
		return 0;
	memset(&tp, 0, sizeof(tp));
	if (topup_ref(tp.ref))
		return EIO;
	memcpy(tp.wallet, id.p, id.n);
	memcpy(tp.currency, w->currency, 4);
	tp.amount = a->to ? a->to - available : a->amount;
	tp.created_at = now;
	tp.expires_at = now + config.topup_ttl;
	tp.status = TS_PENDING;
	tp.automatic = 1;
	memset(&n, 0, sizeof(n));
	n.kind = NK_AUTO_TOPUP;
	n.amount = tp.amount;
	memcpy(n.provider_ref, tp.ref, sizeof(tp.ref));
	k = (MDB_val){ strlen(tp.ref), tp.ref };
	v = (MDB_val){ sizeof(tp), &tp };
	if ((rc = captured_put(c->txn, store.topups, &k, &v, 0)) || (rc = note_add(c, id, w, &n)))
		return rc;
	a->state &= ~AUTO_ARMED;
	a->today++;
	return 0;
}

/* The writer, 7 days and 1 day before lot l of w (id) lapses: a reminder of what is left, and when it goes. */
static int
lot_remind(MDB_txn *txn, struct str id, struct wallet *w, const struct lot *l)
{
	struct call c = { .txn = txn };
	struct note n;
	int rc;

	memset(&n, 0, sizeof(n));
	n.kind = NK_CREDIT_EXPIRING;
	n.amount = l->remaining;
	n.until = l->expires_at;
	snprintf(n.reason, sizeof(n.reason), "%s", l->kind == LOT_PROMO ? "promotional" : "paid");
	return (rc = note_add(&c, id, w, &n)) ? rc : wallet_put(txn, id, w);
}

/*
 * Records a low-balance notification when a change of balance from `before`
 * to w->balance crossed w's threshold downwards, and an automatic top-up
 * request when one is due.  Returns 0 or an LMDB error.
 */
static int
note_on_crossing(struct call *c, struct str id, struct wallet *w, int64_t before, uint64_t txn_id)
{
	struct note n;
	int rc;

	if (w->autotop.provider && (rc = auto_topup_request(c, id, w)) != 0)
		return rc;
	if (!(w->flags & WF_THRESHOLD) || before < w->threshold || w->balance >= w->threshold)
		return 0;
	memset(&n, 0, sizeof(n));
	n.kind = NK_LOW_BALANCE;
	n.txn_id = txn_id;
	n.threshold = w->threshold;
	if ((rc = note_add(c, id, w, &n)) != 0)
		return rc;
	return event_add(c->txn, "low_balance", id, json_pack("{s:o, s:o, s:s, s:I}", "balance",
	    json_amount(w->balance), "threshold", json_amount(w->threshold), "currency", w->currency,
	    "txn", (json_int_t)txn_id));
}

/* Fills the actor of t from the peer and the actor param. */
static int
p_actor(struct call *c, struct txn *t)
{
	int rc = p_text(c, "actor", 0, &t->actor);

	if (rc == E_OK && t->actor.n > WALLET_ID_MAX * 2)
		return fail(c, E_INVALID_ARGUMENT, "actor", "actor is longer than 128 bytes");
	t->has_actor = 1;
	t->actor_uid = (uint32_t)c->uid;
	t->origin = c->origin;
	return rc;
}

/* Refuses to take money out of shared child w (id, param name) but by a charge. */
static int
fail_shared(struct call *c, const char *name, struct str id, const struct wallet *w)
{
	return fail(c, E_INVALID_ARGUMENT, name, "Wallet '%.*s' is shared: its charges draw on '%s', and nothing "
	    "else takes money from it (hold, debit or transfer from '%s')", (int)id.n, id.p, w->parent, w->parent);
}

/* Writes insufficient_balance: required and available in currency. */
static int
fail_insufficient(struct call *c, int64_t required, int64_t available, const char *currency)
{
	char r[32], a[32];

	c->required = required;
	c->available = available;
	memcpy(c->currency, currency, 4);
	return fail(c, E_INSUFFICIENT_BALANCE, NULL,
	    "Insufficient balance. Required: %s %s, available: %s %s",
	    amount_format(required, r, 0), currency, amount_format(available, a, 0), currency);
}

/*
 * Packs already_refunded's details of charge id: "refund", the first of its
 * refunds, and "refunds", every one (from the refunds index, in txn).
 */
static void
pack_refunds(msgpack_packer *pk, MDB_txn *txn, uint64_t id)
{
	MDB_val k = { sizeof(id), &id }, v = { 0, NULL };
	uint64_t refund;
	size_t n;

	if (txn == NULL || mdb_get(txn, store.refunds, &k, &v) != 0)
		v.mv_size = 0;
	n = v.mv_size / 8;
	for (int pass = 0; pass < 2; pass++) {
		pack_cstr(pk, pass ? "refunds" : "refund");
		if (pass)
			msgpack_pack_array(pk, n);
		for (size_t i = 0; i < (pass ? n : 1); i++) {
			struct txn_head h;
			MDB_val rec;

			if (n == 0) {
				msgpack_pack_nil(pk);
				continue;
			}
			memcpy(&refund, (char *)v.mv_data + 8 * i, 8);
			if (txn_fetch(txn, refund, &h, &rec) != 0 || txn_pack_record(txn, pk, refund, &h, rec) != 0)
				msgpack_pack_nil(pk);
		}
	}
}

/* Packs the error of c as the wire's error map. */
static void
pack_error(msgpack_packer *pk, const struct call *c)
{
	static const unsigned char details[E__COUNT] = {
		[E_INSUFFICIENT_BALANCE] = 3, [E_IDEMPOTENCY_CONFLICT] = 1, [E_ALREADY_REFUNDED] = 2,
		[E_UNKNOWN_HOLD] = 1, [E_HOLD_CLOSED] = 2, [E_LIMIT_EXCEEDED] = 4, [E_DESTINATION_BLOCKED] = 1,
		[E_DESTINATION_SUSPENDED] = 3,
	};
	char a[32];
	int n = 2 + (c->field != NULL);

	if (c->code > 0 && c->code < E__COUNT)
		n += details[c->code];
	msgpack_pack_map(pk, (size_t)n);
	KV_STR(pk, "code", error_name(c->code));
	KV_STR(pk, "message", c->message);
	if (c->field)
		KV_STR(pk, "field", c->field);
	if (c->code == E_INSUFFICIENT_BALANCE) {
		KV_STR(pk, "required", amount_format(c->required, a, 0));
		KV_STR(pk, "available", amount_format(c->available, a, 0));
		KV_STR(pk, "currency", c->currency);
	}
	if (c->code == E_IDEMPOTENCY_CONFLICT)
		KV_U64(pk, "txn", c->conflict_txn);
	if (c->code == E_ALREADY_REFUNDED)
		pack_refunds(pk, c->txn, c->refunded);
	if (c->code == E_UNKNOWN_HOLD || c->code == E_HOLD_CLOSED)
		KV_STR(pk, "hold", c->hold);
	if (c->code == E_HOLD_CLOSED)
		KV_STR(pk, "status", c->hold_status);
	if (c->code == E_DESTINATION_BLOCKED) {
		KEY(pk, "prefix");
		if (c->prefix[0])
			pack_cstr(pk, c->prefix);
		else
			msgpack_pack_nil(pk);
	}
	if (c->code == E_DESTINATION_SUSPENDED) {
		KV_STR(pk, "prefix", c->prefix);
		KV_TIME(pk, "until", c->resets_at);
		KV_STR(pk, "reason", c->limit);
	}
	if (c->code == E_LIMIT_EXCEEDED) {
		KV_STR(pk, "limit", c->limit);
		KV_STR(pk, "max", c->limit_max);
		KV_STR(pk, "used", c->limit_used);
		KV_TIME(pk, "resets_at", c->resets_at);
	}
}

/* ---- ping and wallets ---- */

static int
m_ping(struct call *c)
{
	msgpack_pack_map(c->pk, 3);
	KV_STR(c->pk, "version", WALLETD_VERSION);
	KEY(c->pk, "api");
	msgpack_pack_int(c->pk, WALLETD_API);
	KV_STR(c->pk, "ledger_key", ledger_public);
	return E_OK;
}

/* Reads threshold (nil clears) into w. */
static int
p_threshold(struct call *c, struct wallet *w)
{
	int present, rc = p_amount(c, "threshold", 0, AMOUNT_SIGNED, &w->threshold, &present);

	if (rc == E_OK && present == 1)
		w->flags |= WF_THRESHOLD;
	else if (rc == E_OK && present == -1)
		w->flags &= ~WF_THRESHOLD;
	return rc;
}

/* Returns 1 if s is a destination prefix: 1-15 digits, the first not 0. */
static int
valid_prefix(struct str s)
{
	char digits[16];

	return s.n > 0 && e164_digits(s, digits) == s.n;
}

/* Reads a list of up to PREFIXES_MAX destination prefixes.  *present as p_amount. */
static int
p_prefixes(struct call *c, const char *name, char out[PREFIXES_BYTES], int *present)
{
	return p_list(c, name, PREFIXES_MAX, valid_prefix, "1-15 digits, the first not 0", out, PREFIXES_BYTES,
	    present);
}

/* Whether param name is there with the value nil (an explicit "clear"). */
static int
param_nil(struct call *c, const char *name)
{
	const msgpack_object *o = param(c, name);

	return o && o->type == MSGPACK_OBJECT_NIL;
}

/* Reads the fraud brake's settings into w, as p_controls. */
static int
p_guard(struct call *c, struct wallet *w)
{
	static const uint32_t min[G__COUNT] = { 0, 1, 0, 1, 1 }, max[G__COUNT] = { 1000000, 86400, 1000, 1000000,
		30 * 86400 };
	int present, rc;

	for (int i = 0; i < G__COUNT; i++) {
		uint64_t n = 0;

		if (param_nil(c, guard_names[i])) {
			w->guard_set &= ~(1u << i);
			w->guard[i] = 0;
		} else if (param(c, guard_names[i])) {
			if ((rc = p_uint(c, guard_names[i], 1, min[i], max[i], &n)))
				return rc;
			w->guard_set |= 1u << i;
			w->guard[i] = (uint32_t)n;
		}
	}
	if ((rc = p_prefixes(c, "guard_safe_prefixes", w->guard_safe, &present)))
		return rc;
	if (present) /* none (or nil): the config's */
		w->guard_set = w->guard_safe[0] ? w->guard_set | GS_SAFE : w->guard_set & ~GS_SAFE;
	return E_OK;
}

/*
 * Reads a wallet's credit limit and spend controls into w: credit_limit,
 * daily_limit, hourly_messages, allowed_prefixes, blocked_prefixes, and the
 * fraud brake's guard_* settings.  An absent param leaves w's; nil clears
 * it (credit_limit back to 0; a guard_* setting back to the config's).
 */
static int
p_controls(struct call *c, struct wallet *w)
{
	const msgpack_object *hourly = param(c, "hourly_messages");
	int64_t limit;
	int present, rc;

	if ((rc = p_amount(c, "credit_limit", 0, AMOUNT_NONNEGATIVE, &limit, &present)))
		return rc;
	if (present)
		w->credit_limit = present == 1 ? limit : 0;
	if (present == 1 && limit > 0)
		w->flags |= WF_CREDIT_EVER;
	if ((rc = p_amount(c, "daily_limit", 0, AMOUNT_POSITIVE, &limit, &present)))
		return rc;
	if (present == 1)
		w->flags |= WF_DAILY, w->daily_limit = limit;
	else if (present == -1)
		w->flags &= ~WF_DAILY;
	if (hourly && hourly->type == MSGPACK_OBJECT_NIL) {
		w->flags &= ~WF_HOURLY;
	} else if (hourly) {
		uint64_t n = 0;

		if ((rc = p_uint(c, "hourly_messages", 1, 1, UINT32_MAX, &n)))
			return rc;
		w->flags |= WF_HOURLY;
		w->hourly_messages = (uint32_t)n;
	}
	if ((rc = p_prefixes(c, "allowed_prefixes", w->allowed, &present)) ||
	    (rc = p_prefixes(c, "blocked_prefixes", w->blocked, &present)))
		return rc;
	if (param_nil(c, "credit_validity")) {
		w->lots.validity = 0;
	} else if (param(c, "credit_validity")) {
		uint64_t days = 0;

		if ((rc = p_uint(c, "credit_validity", 1, 1, 3650, &days)))
			return rc;
		w->lots.validity = (int64_t)days * 86400;
	}
	return p_guard(c, w);
}

/* Answers wallet w (id) with its held and available as of now. */
static int
wallet_answer(struct call *c, struct str id, const struct wallet *w)
{
	int rc = wallet_pack(c->txn, c->pk, id, w);

	return rc ? store_error(c, rc) : E_OK;
}

static int
m_wallet_create(struct call *c)
{
	struct str id, currency, plan, parent;
	struct wallet w, pw;
	MDB_val k = { 10, "wallet_seq" }, v;
	uint64_t seq = 1;
	int rc, present, shared = 0;

	memset(&w, 0, sizeof(w));
	if ((rc = p_wallet(c, &id)) || (rc = p_currency(c, "currency", 1, &currency)) ||
	    (rc = p_name(c, "plan", 0, 0, &plan)) || (rc = p_threshold(c, &w)) ||
	    (rc = p_emails(c, w.emails, &present)) || (rc = p_controls(c, &w)) ||
	    (rc = p_str(c, "parent", 0, WALLET_ID_MAX, &parent)) || (rc = p_bool(c, "shared", &shared)))
		return rc;
	if (shared && parent.p == NULL)
		return fail(c, E_INVALID_ARGUMENT, "shared", "a shared wallet draws on its parent: give parent");
	if (shared)
		w.flags |= WF_SHARED;
	if ((rc = wallet_get(c->txn, id, &pw)) == 0)
		return fail(c, E_WALLET_EXISTS, "wallet", "Wallet '%.*s' exists", (int)id.n, id.p);
	if (rc != MDB_NOTFOUND)
		return store_error(c, rc);
	if (parent.p) { /* a reseller's child: one level, the reseller's currency */
		if ((rc = wallet_get(c->txn, parent, &pw)) == MDB_NOTFOUND)
			return fail(c, E_UNKNOWN_WALLET, "parent", "No wallet '%.*s'", (int)parent.n, parent.p);
		if (rc)
			return store_error(c, rc);
		if (pw.parent[0])
			return fail(c, E_INVALID_ARGUMENT, "parent", "Wallet '%.*s' is a child of '%s': a reseller's "
			    "children have no children", (int)parent.n, parent.p, pw.parent);
		if (memcmp(pw.currency, currency.p, 3) != 0)
			return fail(c, E_INVALID_ARGUMENT, "currency", "a child wallet keeps its reseller's currency, %s",
			    pw.currency);
		memcpy(w.parent, parent.p, parent.n);
	}
	if ((rc = mdb_get(c->txn, store.meta, &k, &v)) == 0)
		memcpy(&seq, v.mv_data, sizeof(seq));
	else if (rc != MDB_NOTFOUND)
		return store_error(c, rc);
	w.number = seq++;
	v = (MDB_val){ sizeof(seq), &seq };
	if ((rc = captured_put(c->txn, store.meta, &k, &v, 0)) != 0)
		return store_error(c, rc);
	memcpy(w.currency, currency.p, 3);
	if (plan.p)
		memcpy(w.plan, plan.p, plan.n);
	else
		strcpy(w.plan, "default");
	w.created_at = now_seconds();
	if ((rc = wallet_put(c->txn, id, &w)) != 0)
		return store_error(c, rc);
	return wallet_answer(c, id, &w);
}

static int
m_wallet_get(struct call *c)
{
	struct str id;
	struct wallet w;
	int rc;

	if ((rc = p_wallet(c, &id)) || (rc = load_wallet(c, id, &w)))
		return rc;
	return wallet_answer(c, id, &w);
}

static int
m_balance(struct call *c)
{
	struct str id;
	struct wallet w;
	int64_t held, available;
	int rc;

	if ((rc = p_wallet(c, &id)) || (rc = load_wallet(c, id, &w)))
		return rc;
	if ((rc = wallet_available(c->txn, &w, now_seconds(), &held, &available)))
		return store_error(c, rc);
	msgpack_pack_map(c->pk, 4 + (w.lots.total != 0)); /* lots only when it has some */
	KV_AMOUNT(c->pk, "balance", w.balance);
	KV_AMOUNT(c->pk, "held", held);
	KV_AMOUNT(c->pk, "available", available);
	KV_STR(c->pk, "currency", w.currency);
	return w.lots.total && (rc = lots_pack(c->txn, c->pk, &w)) ? store_error(c, rc) : E_OK;
}

/*
 * Checks w's credit limit against its balance and holds: the balance may
 * not be below -credit_limit, the active holds must fit in balance +
 * credit_limit (available never negative), and that sum must stay in the
 * amount range.  E_OK or invalid_argument naming credit_limit.
 */
static int
wallet_fits_credit_limit(struct call *c, const struct wallet *w)
{
	int64_t held, room;
	int rc;

	if (__builtin_add_overflow(w->balance, w->credit_limit, &room))
		return fail(c, E_INVALID_ARGUMENT, "credit_limit",
		    "credit_limit is out of range: with the balance it passes the largest amount");
	if (room < 0)
		return fail(c, E_INVALID_ARGUMENT, "credit_limit",
		    "credit_limit must be at least what the wallet owes (its balance is below minus it)");
	if ((rc = wallet_held(c->txn, w, now_seconds(), &held)))
		return store_error(c, rc);
	if (held > room)
		return fail(c, E_INVALID_ARGUMENT, "credit_limit",
		    "credit_limit must leave room for the wallet's active holds (%s held; release holds first)",
		    amount_format(held, (char[32]){ 0 }, 0));
	return E_OK;
}

/* Rewrites c's error, met in auto_topup's map, to name it: field auto_topup.NAME.  Returns the code. */
static int
auto_topup_fail(struct call *c)
{
	char message[sizeof(c->message)];

	snprintf(c->field_buf, sizeof(c->field_buf), "auto_topup.%.60s", c->field ? c->field : "");
	c->field = c->field_buf;
	snprintf(message, sizeof(message), "auto_topup: %.*s", (int)sizeof(message) - 16, c->message);
	memcpy(c->message, message, sizeof(message));
	return c->code;
}

/*
 * Reads wallet.update's auto_topup into w: {below, amount | to, provider,
 * authorization, email, max_per_day?}, armed and with no failures; nil
 * turns it off.
 */
static int
p_auto_topup(struct call *c, struct wallet *w)
{
	static const char *const keys[] = { "below", "amount", "to", "provider", "authorization", "email",
		"max_per_day" };
	const msgpack_object *o = param(c, "auto_topup"), *saved = c->params;
	const char *secret[AP__COUNT] = { "", config.paystack_secret_file, config.flutterwave_secret_file };
	struct str provider, authorization, email;
	struct auto_topup a;
	uint64_t max_per_day = 3;
	int rc, present, has_amount, has_to;

	if (o == NULL)
		return E_OK;
	if (o->type == MSGPACK_OBJECT_NIL) {
		memset(&w->autotop, 0, sizeof(w->autotop));
		return E_OK;
	}
	if (o->type != MSGPACK_OBJECT_MAP)
		return fail(c, E_INVALID_ARGUMENT, "auto_topup", "auto_topup must be a map (below, amount or to, "
		    "provider, authorization, email, max_per_day) or nil");
	for (uint32_t i = 0; i < o->via.map.size; i++) {
		const msgpack_object *key = &o->via.map.ptr[i].key;
		size_t k = 0;

		while (k < sizeof(keys) / sizeof(keys[0]) && !(key->type == MSGPACK_OBJECT_STR &&
		    key->via.str.size == strlen(keys[k]) && memcmp(key->via.str.ptr, keys[k], key->via.str.size) == 0))
			k++;
		if (k == sizeof(keys) / sizeof(keys[0]))
			return fail(c, E_INVALID_ARGUMENT, "auto_topup", "auto_topup takes no key '%.*s' (it takes: below, "
			    "amount, to, provider, authorization, email, max_per_day)", key->type == MSGPACK_OBJECT_STR ?
			    (int)strnlen(key->via.str.ptr, key->via.str.size < 64 ? key->via.str.size : 64) : 0,
			    key->type == MSGPACK_OBJECT_STR ? key->via.str.ptr : "");
	}
	memset(&a, 0, sizeof(a));
	c->params = o;
	rc = p_amount(c, "below", 1, AMOUNT_NONNEGATIVE, &a.below, &present) ||
	    p_amount(c, "amount", 0, AMOUNT_POSITIVE, &a.amount, &has_amount) ||
	    p_amount(c, "to", 0, AMOUNT_POSITIVE, &a.to, &has_to) || p_name(c, "provider", 1, 0, &provider) ||
	    p_str(c, "authorization", 1, sizeof(a.authorization) - 1, &authorization) ||
	    p_str(c, "email", 1, sizeof(a.email) - 1, &email) || p_uint(c, "max_per_day", 0, 1, 1000, &max_per_day);
	c->params = saved;
	if (rc)
		return auto_topup_fail(c);
	for (a.provider = AP__COUNT - 1; a.provider > AP_NONE; a.provider--)
		if (strlen(auto_provider_names[a.provider]) == provider.n &&
		    memcmp(auto_provider_names[a.provider], provider.p, provider.n) == 0)
			break;
	c->field = "provider";
	if (a.provider == AP_NONE)
		fail(c, E_INVALID_ARGUMENT, "provider", "provider must be paystack or flutterwave");
	else if (secret[a.provider][0] == '\0')
		fail(c, E_INVALID_ARGUMENT, "provider", "walletd's config sets no %s_secret_file: it cannot charge "
		    "through %s", auto_provider_names[a.provider], auto_provider_names[a.provider]);
	else if ((has_amount == 1) == (has_to == 1))
		fail(c, E_INVALID_ARGUMENT, "amount", "give amount (a fixed sum) or to (a balance to top up to), one of them");
	else if (has_to == 1 && a.to <= a.below)
		fail(c, E_INVALID_ARGUMENT, "to", "to must be above below");
	else if (authorization.n == 0)
		fail(c, E_INVALID_ARGUMENT, "authorization", "authorization must not be empty");
	else if (!valid_email(email))
		fail(c, E_INVALID_ARGUMENT, "email", "email must be an e-mail address");
	else
		c->field = NULL;
	if (c->field)
		return auto_topup_fail(c);
	a.max_per_day = (uint32_t)max_per_day;
	a.state = AUTO_ARMED;
	memcpy(a.authorization, authorization.p, authorization.n);
	memcpy(a.email, email.p, email.n);
	w->autotop = a;
	return E_OK;
}

/*
 * wallet.update: a param that is absent stays; nil clears it (threshold:
 * alerts off; plan: back on "default"); status has no "cleared" state, so
 * status nil is invalid_argument.
 */
static int
m_wallet_update(struct call *c)
{
	struct str id, plan, status;
	struct wallet w;
	char emails[EMAILS_BYTES];
	int rc, present;

	if ((rc = p_wallet(c, &id)) || (rc = p_name(c, "plan", 0, 0, &plan)) ||
	    (rc = p_str(c, "status", 0, 16, &status)) || (rc = p_emails(c, emails, &present)))
		return rc;
	if (param_nil(c, "status"))
		return fail(c, E_INVALID_ARGUMENT, "status", "status must be active or frozen, not nil");
	if (param_nil(c, "plan"))
		plan = (struct str){ "default", 7 };
	if (status.p && !(status.n == 6 && memcmp(status.p, "active", 6) == 0) &&
	    !(status.n == 6 && memcmp(status.p, "frozen", 6) == 0))
		return fail(c, E_INVALID_ARGUMENT, "status", "status must be active or frozen");
	if ((rc = load_wallet(c, id, &w)) || (rc = p_threshold(c, &w)) || (rc = p_controls(c, &w)) ||
	    (rc = p_auto_topup(c, &w)))
		return rc;
	if (w.autotop.provider && param(c, "auto_topup") && (rc = auto_topup_request(c, id, &w))) /* below already */
		return store_error(c, rc);
	if (param(c, "credit_limit") && (rc = wallet_fits_credit_limit(c, &w)))
		return rc;
	if (plan.p) {
		memset(w.plan, 0, sizeof(w.plan));
		memcpy(w.plan, plan.p, plan.n);
	}
	if (present)
		strcpy(w.emails, emails);
	if (status.p && status.p[0] == 'f')
		w.flags |= WF_FROZEN;
	else if (status.p)
		w.flags &= ~WF_FROZEN;
	if ((rc = wallet_put(c->txn, id, &w)) != 0)
		return store_error(c, rc);
	return wallet_answer(c, id, &w);
}

/* Reads page (default 0) and limit (default def, at most max). */
static int
p_page(struct call *c, uint64_t def, uint64_t max, uint64_t *page, uint64_t *limit)
{
	int rc;

	*page = 0;
	*limit = def;
	if ((rc = p_uint(c, "page", 0, 0, UINT32_MAX, page)) ||
	    (rc = p_uint(c, "limit", 0, 1, max, limit)))
		return rc;
	return E_OK;
}

/* wallet.list {parent}: parent's children, a page of them, and how many in all (a scan of every wallet). */
static int
wallet_list_children(struct call *c, struct str parent, uint64_t page, uint64_t limit)
{
	uint64_t total = 0, packed = 0;
	msgpack_sbuffer rows;
	msgpack_packer rpk;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_cursor_open(c->txn, store.wallets, &cur)))
		return store_error(c, rc);
	msgpack_sbuffer_init(&rows);
	msgpack_packer_init(&rpk, &rows, msgpack_sbuffer_write);
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct wallet w;

		if (over_budget(c)) {
			rc = E_OFF_LOOP;
			break;
		}
		if ((rc = wallet_decode(v, &w)) != 0)
			break;
		if (!wallet_child_of(&w, parent) || total++ < page * limit || packed == limit)
			continue;
		if ((rc = wallet_pack(c->txn, &rpk, (struct str){ k.mv_data, k.mv_size }, &w)) != 0)
			break;
		packed++;
	}
	mdb_cursor_close(cur);
	if (rc != MDB_NOTFOUND) {
		msgpack_sbuffer_destroy(&rows);
		return rc == E_OFF_LOOP ? E_OFF_LOOP : store_error(c, rc);
	}
	pack_page(c->pk, "wallets", packed, &rows, total, page, limit);
	return E_OK;
}

static int
m_wallet_list(struct call *c)
{
	uint64_t page, limit, skip, count = 0;
	struct str parent;
	struct wallet pw;
	MDB_cursor *cur;
	MDB_stat st;
	MDB_val k, v;
	int rc;

	if ((rc = p_page(c, 100, HISTORY_LIMIT_MAX, &page, &limit)) ||
	    (rc = p_str(c, "parent", 0, WALLET_ID_MAX, &parent)))
		return rc;
	if (parent.p)
		return (rc = load_wallet(c, parent, &pw)) ? rc : wallet_list_children(c, parent, page, limit);
	if ((rc = mdb_stat(c->txn, store.wallets, &st)) ||
	    (rc = mdb_cursor_open(c->txn, store.wallets, &cur)))
		return store_error(c, rc);
	skip = page * limit;
	msgpack_pack_map(c->pk, 4);
	KEY(c->pk, "wallets");
	msgpack_pack_array(c->pk, skip >= st.ms_entries ? 0 :
	    (st.ms_entries - skip < limit ? st.ms_entries - skip : limit));
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0 && count < skip + limit;
	    rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT), count++) {
		struct wallet w;

		if (over_budget(c)) {
			mdb_cursor_close(cur);
			return E_OFF_LOOP;
		}
		if (count < skip)
			continue;
		if ((rc = wallet_decode(v, &w)) != 0 ||
		    (rc = wallet_pack(c->txn, c->pk, (struct str){ k.mv_data, k.mv_size }, &w)) != 0)
			break;
	}
	if (rc != 0 && rc != MDB_NOTFOUND) {
		mdb_cursor_close(cur);
		return store_error(c, rc);
	}
	mdb_cursor_close(cur);
	KV_U64(c->pk, "total", st.ms_entries);
	KV_U64(c->pk, "page", page);
	KV_U64(c->pk, "limit", limit);
	return E_OK;
}

/* ---- Rates and FX ---- */

/* Packs a rate's policy, 5 keys: on_failure, failure_fee (nil unless fee), settle, pending_timeout and its action. */
static void
rate_policy_pack(msgpack_packer *pk, const struct rate_policy *pol)
{
	KV_STR(pk, "on_failure", on_failure_names[pol->on_failure < OF__COUNT ? pol->on_failure : OF_KEEP]);
	pack_amount_or_nil(pk, "failure_fee", pol->on_failure == OF_FEE, pol->failure_fee);
	KV_STR(pk, "settle", pol->settle ? "delivery" : "send");
	KV_U64(pk, "pending_timeout", pol->pending_timeout ? pol->pending_timeout : PENDING_TIMEOUT_DEFAULT);
	KV_STR(pk, "pending_timeout_action", pol->timeout_release ? "release" : "charge");
}

/* Reads string param name, one of a and b, into *v (0 for a, 1 for b); absent leaves *v. */
static int
p_either(struct call *c, const char *name, const char *a, const char *b, uint8_t *v)
{
	struct str s;
	int rc;

	if ((rc = p_str(c, name, 0, 16, &s)) || s.p == NULL)
		return rc;
	if (s.n == strlen(a) && memcmp(s.p, a, s.n) == 0)
		*v = 0;
	else if (s.n == strlen(b) && memcmp(s.p, b, s.n) == 0)
		*v = 1;
	else
		return fail(c, E_INVALID_ARGUMENT, name, "%s must be %s or %s", name, a, b);
	return E_OK;
}

/*
 * Reads rate.set's policy params into pol, which holds the rate's policy
 * so far: an absent one stays (a new price keeps the policy); failure_fee
 * goes with on_failure fee only, and fee needs it.
 */
static int
p_rate_policy(struct call *c, struct rate_policy *pol)
{
	struct str of;
	int64_t fee = 0;
	uint64_t timeout = pol->pending_timeout;
	int rc, present, i;

	if ((rc = p_str(c, "on_failure", 0, 16, &of)) ||
	    (rc = p_amount(c, "failure_fee", 0, AMOUNT_NONNEGATIVE, &fee, &present)) ||
	    (rc = p_either(c, "settle", "send", "delivery", &pol->settle)) ||
	    (rc = p_either(c, "pending_timeout_action", "charge", "release", &pol->timeout_release)) ||
	    (rc = p_uint(c, "pending_timeout", 0, 1, PENDING_TIMEOUT_MAX, &timeout)))
		return rc;
	pol->pending_timeout = (uint32_t)timeout;
	if (of.p) {
		for (i = 0; i < OF__COUNT; i++)
			if (strlen(on_failure_names[i]) == of.n && memcmp(on_failure_names[i], of.p, of.n) == 0)
				break;
		if (i == OF__COUNT)
			return fail(c, E_INVALID_ARGUMENT, "on_failure", "on_failure must be keep, refund or fee");
		pol->on_failure = (uint8_t)i;
		pol->failure_fee = 0;
	}
	if (present == 1 && pol->on_failure != OF_FEE)
		return fail(c, E_INVALID_ARGUMENT, "failure_fee", "failure_fee goes with on_failure fee");
	if (present == 1)
		pol->failure_fee = fee;
	if (pol->on_failure == OF_FEE && present != 1 && of.p)
		return fail(c, E_INVALID_ARGUMENT, "failure_fee", "on_failure fee needs a failure_fee");
	return E_OK;
}

#define MCCMNC_RULE "mccmnc must be a mobile network's code: 5 or 6 digits (MCC, MNC)"

/* Reads a mobile network's code (MCC and MNC: 5 or 6 digits) from o into out; -1 if it is none. */
static int
mccmnc_read(const msgpack_object *o, char out[7])
{
	if (o->type != MSGPACK_OBJECT_STR || o->via.str.size < 5 || o->via.str.size > 6)
		return -1;
	for (uint32_t i = 0; i < o->via.str.size; i++)
		if (!isdigit((unsigned char)o->via.str.ptr[i]))
			return -1;
	memcpy(out, o->via.str.ptr, o->via.str.size);
	out[o->via.str.size] = '\0';
	return 0;
}

/* Reads the optional param mccmnc into out: "" when absent. */
static int
p_mccmnc(struct call *c, char out[7])
{
	const msgpack_object *o = param(c, "mccmnc");

	out[0] = '\0';
	if (o == NULL || o->type == MSGPACK_OBJECT_NIL || mccmnc_read(o, out) == 0)
		return E_OK;
	return fail(c, E_INVALID_ARGUMENT, "mccmnc", "%s", MCCMNC_RULE);
}

/* Packs where a rate applies: its prefix, or its mobile network (the other nil). */
static void
rate_where_pack(msgpack_packer *pk, const char *prefix, const char *mccmnc)
{
	KEY(pk, "prefix");
	mccmnc[0] ? msgpack_pack_nil(pk) : pack_cstr(pk, prefix);
	KEY(pk, "mccmnc");
	mccmnc[0] ? pack_cstr(pk, mccmnc) : msgpack_pack_nil(pk);
}

/*
 * Reads where a rate applies: prefix, or mccmnc (a mobile network, into
 * mccmnc), one of them; *key (in buf) is the rate key's part for it: the
 * prefix's digits, or m and the network's code.
 */
static int
p_rate_where(struct call *c, struct str *key, char buf[16], char mccmnc[7])
{
	int rc;

	if ((rc = p_str(c, "prefix", 0, 15, key)) || (rc = p_mccmnc(c, mccmnc)))
		return rc;
	if ((key->p != NULL) == (mccmnc[0] != '\0'))
		return fail(c, E_INVALID_ARGUMENT, "prefix", "give prefix or mccmnc, one of them");
	if (mccmnc[0]) {
		*key = (struct str){ buf, network_key(buf, mccmnc) };
		return E_OK;
	}
	if (key->n == 0 || e164_digits(*key, buf) != key->n)
		return fail(c, E_INVALID_ARGUMENT, "prefix", "prefix must be 1-15 digits, the first not 0");
	*key = (struct str){ buf, key->n };
	return E_OK;
}

static int
m_rate_set(struct call *c)
{
	struct str plan, channel, prefix, route, currency, eff;
	char key[RATE_KEY_MAX], where[16], mccmnc[7];
	struct rate_entry e, entries[RATE_SCHEDULE_MAX + 1];
	struct rate_policy pol = { 0 };
	unsigned char value[sizeof(entries) + sizeof(pol)];
	int64_t now = now_seconds();
	size_t n = 0, kept = 0, first = 0;
	uint32_t lengths;
	MDB_val k, v;
	int rc, present;

	memset(&e, 0, sizeof(e));
	if ((rc = p_name(c, "plan", 1, 0, &plan)) || (rc = p_channel(c, &channel)) ||
	    (rc = p_rate_where(c, &prefix, where, mccmnc)) || (rc = p_name(c, "route", 0, 1, &route)) ||
	    (rc = p_amount(c, "price", 1, 1, &e.price, &present)) ||
	    (rc = p_currency(c, "currency", 1, &currency)) || (rc = p_str(c, "effective_from", 0, 40, &eff)))
		return rc;
	if (eff.p && time_parse(eff, &e.from) != 0)
		return fail(c, E_INVALID_ARGUMENT, "effective_from", "effective_from must be an RFC 3339 time");
	if (route.p == NULL)
		route = (struct str){ "", 0 };
	memcpy(e.currency, currency.p, 3);
	k = (MDB_val){ rate_key(key, plan, channel, prefix.p, prefix.n, route), key };
	if ((rc = mdb_get(c->txn, store.rates, &k, &v)) == 0)
		n = rate_entries(v, entries, &pol);
	else if (rc != MDB_NOTFOUND)
		return store_error(c, rc);
	if ((rc = p_rate_policy(c, &pol)))
		return rc;
	/* The prices kept: not the one at e's time, and without effective_from
	 * none in force now (e is the price now); e goes in its place by time. */
	for (size_t i = 0; i < n; i++)
		if (entries[i].from != e.from && (eff.p || entries[i].from > now))
			entries[kept++] = entries[i];
	n = kept;
	while (kept > 0 && entries[kept - 1].from > e.from)
		kept--;
	memmove(&entries[kept + 1], &entries[kept], (n - kept) * sizeof(e));
	entries[kept] = e;
	n++;
	/* Of the prices in force by now only the latest can apply again. */
	while (first + 1 < n && entries[first + 1].from <= now)
		first++;
	if (n - first > RATE_SCHEDULE_MAX)
		return fail(c, E_INVALID_ARGUMENT, "effective_from", "a rate holds at most %d scheduled prices",
		    RATE_SCHEDULE_MAX);
	memcpy(value, &entries[first], (n - first) * sizeof(e));
	v = (MDB_val){ (n - first) * sizeof(e), value };
	if (pol.on_failure != OF_KEEP || pol.settle || pol.timeout_release || pol.pending_timeout) {
		memcpy(value + v.mv_size, &pol, sizeof(pol));
		v.mv_size += sizeof(pol);
	}
	if ((rc = captured_put(c->txn, store.rates, &k, &v, 0)) != 0)
		return store_error(c, rc);
	lengths = rate_lengths(c->txn, plan, channel);
	if (lengths == UINT32_MAX)
		lengths = 0;
	if (!mccmnc[0] && !(lengths & (1u << prefix.n))) {
		lengths |= 1u << prefix.n;
		k = (MDB_val){ rate_lengths_key(key, plan, channel), key };
		v = (MDB_val){ sizeof(lengths), &lengths };
		if ((rc = captured_put(c->txn, store.meta, &k, &v, 0)) != 0)
			return store_error(c, rc);
	}
	msgpack_pack_map(c->pk, 13);
	KV_SSTR(c->pk, "plan", plan);
	KV_SSTR(c->pk, "channel", channel);
	rate_where_pack(c->pk, where, mccmnc);
	KV_SSTR(c->pk, "route", route);
	KV_AMOUNT(c->pk, "price", e.price);
	KV_STR(c->pk, "currency", e.currency);
	rate_policy_pack(c->pk, &pol);
	KEY(c->pk, "effective_from");
	if (eff.p)
		pack_time(c->pk, e.from);
	else
		msgpack_pack_nil(c->pk);
	return E_OK;
}

static int
m_rate_delete(struct call *c)
{
	struct str plan, channel, prefix, route;
	char key[RATE_KEY_MAX], where[16], mccmnc[7];
	MDB_val k;
	int rc;

	if ((rc = p_name(c, "plan", 1, 0, &plan)) || (rc = p_channel(c, &channel)) ||
	    (rc = p_rate_where(c, &prefix, where, mccmnc)) || (rc = p_name(c, "route", 0, 1, &route)))
		return rc;
	if (route.p == NULL)
		route = (struct str){ "", 0 };
	k = (MDB_val){ rate_key(key, plan, channel, prefix.p, prefix.n, route), key };
	rc = captured_del(c->txn, store.rates, &k, NULL);
	if (rc == MDB_NOTFOUND)
		return fail(c, E_NO_RATE, "prefix", "No such rate");
	if (rc)
		return store_error(c, rc);
	msgpack_pack_map(c->pk, 1);
	KEY(c->pk, "deleted");
	msgpack_pack_true(c->pk);
	return E_OK;
}

/*
 * Packs the rate stored under key k (plan\0channel\0prefix\0route) as a
 * map: the price in force now (nil before the first), and the prices
 * scheduled after now.
 */
static void
rate_pack(msgpack_packer *pk, MDB_val k, MDB_val v)
{
	const char *p = k.mv_data, *end = p + k.mv_size;
	const char *names[4] = { "plan", "channel", "prefix", "route" };
	struct rate_entry entries[RATE_SCHEDULE_MAX];
	struct rate_policy pol;
	size_t n = rate_entries(v, entries, &pol), later = 0;
	int64_t now = now_seconds();
	const struct rate_entry *rv = rate_in_force(entries, n, now);

	for (size_t i = 0; i < n; i++)
		later += entries[i].from > now;
	msgpack_pack_map(pk, 13);
	for (int i = 0; i < 4; i++) {
		const char *nul = i < 3 ? memchr(p, '\0', (size_t)(end - p)) : end;

		if (i == 2) {
			char where[16];

			snprintf(where, sizeof(where), "%.*s", (int)(nul - p), p);
			rate_where_pack(pk, where, where[0] == 'm' ? where + 1 : ""); /* network_key */
		} else {
			pack_cstr(pk, names[i]);
			msgpack_pack_str_with_body(pk, p, (size_t)(nul - p));
		}
		p = nul + 1;
	}
	pack_amount_or_nil(pk, "price", rv != NULL, rv ? rv->price : 0);
	KEY(pk, "currency");
	if (rv)
		pack_cstr(pk, rv->currency);
	else
		msgpack_pack_nil(pk);
	rate_policy_pack(pk, &pol);
	KEY(pk, "scheduled");
	msgpack_pack_array(pk, later);
	for (size_t i = n - later; i < n; i++) {
		msgpack_pack_map(pk, 3);
		KV_TIME(pk, "effective_from", entries[i].from);
		KV_AMOUNT(pk, "price", entries[i].price);
		KV_STR(pk, "currency", entries[i].currency);
	}
}

static int
m_rate_list(struct call *c)
{
	struct str plan, channel;
	uint64_t page, limit, matched = 0, packed = 0;
	char start[RATE_KEY_MAX];
	size_t slen = 0;
	MDB_cursor *cur;
	MDB_val k, v;
	msgpack_sbuffer rows;
	msgpack_packer rpk;
	int rc;

	if ((rc = p_name(c, "plan", 0, 0, &plan)) || (rc = p_str(c, "channel", 0, 16, &channel)) ||
	    (rc = p_page(c, 1000, RATE_LIST_LIMIT_MAX, &page, &limit)))
		return rc;
	if (plan.p) {
		memcpy(start, plan.p, plan.n);
		start[plan.n] = '\0';
		slen = plan.n + 1;
		if (channel.p) {
			memcpy(start + slen, channel.p, channel.n);
			start[slen + channel.n] = '\0';
			slen += channel.n + 1;
		}
	}
	if ((rc = mdb_cursor_open(c->txn, store.rates, &cur)))
		return store_error(c, rc);
	msgpack_sbuffer_init(&rows);
	msgpack_packer_init(&rpk, &rows, msgpack_sbuffer_write);
	k = (MDB_val){ slen, start };
	for (rc = mdb_cursor_get(cur, &k, &v, slen ? MDB_SET_RANGE : MDB_FIRST); rc == 0;
	    rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (over_budget(c)) {
			mdb_cursor_close(cur);
			msgpack_sbuffer_destroy(&rows);
			return E_OFF_LOOP;
		}
		if (slen && (k.mv_size < slen || memcmp(k.mv_data, start, slen) != 0))
			break;
		if (!plan.p && channel.p) {
			const char *ch = memchr(k.mv_data, '\0', k.mv_size);

			if (ch == NULL || (size_t)((const char *)k.mv_data + k.mv_size - ch) <= channel.n + 1 ||
			    memcmp(ch + 1, channel.p, channel.n) != 0 || ch[1 + channel.n] != '\0')
				continue;
		}
		if (matched++ >= page * limit && packed < limit) {
			rate_pack(&rpk, k, v);
			packed++;
		}
	}
	mdb_cursor_close(cur);
	pack_page(c->pk, "rates", packed, &rows, matched, page, limit);
	return E_OK;
}

/*
 * Reads the optional param at (an RFC 3339 time: price as of then) into
 * *at; absent, now.
 */
static int
p_at(struct call *c, int64_t *at)
{
	struct str s;
	int rc = p_str(c, "at", 0, 40, &s);

	*at = now_seconds();
	if (rc == E_OK && s.p && time_parse(s, at) != 0)
		return fail(c, E_INVALID_ARGUMENT, "at", "at must be an RFC 3339 time");
	return rc;
}

/*
 * Finds the rate for one message, priced as of `at`, and maps failures to
 * errors naming `to`.  target is the currency costs are compared (and
 * converted) in.
 */
static int
rate_find_or_fail(struct call *c, struct str plan, struct str channel, const char *digits,
    size_t n, const char *mccmnc, struct str route, const char *target, uint32_t segments, int64_t at,
    struct rate_hit *hit)
{
	int err = 0, rc = rate_find(c->txn, plan, channel, digits, n, mccmnc, route, target, segments, at, hit, &err);

	switch (rc) {
	case E_OK:
		return E_OK;
	case E_NO_RATE:
		return fail(c, E_NO_RATE, "to", "No %.*s rate for +%s in plan '%.*s'%s%.*s",
		    (int)channel.n, channel.p, digits, (int)plan.n, plan.p,
		    route.p ? " on route " : "", (int)route.n, route.p ? route.p : "");
	case E_NO_FX_RATE:
		return fail(c, E_NO_FX_RATE, "to", "No exchange rate to price +%s in %s", digits,
		    target ? target : "the wallet's currency");
	case E_INVALID_ARGUMENT:
		return fail(c, E_INVALID_ARGUMENT, "segments", "The price of this message is out of range");
	default:
		return store_error(c, err);
	}
}

static int
m_rate_lookup(struct call *c)
{
	struct str channel, plan, wid, route;
	char digits[16], mccmnc[7];
	size_t n;
	struct wallet w;
	struct rate_hit hit;
	int64_t at;
	int rc;

	if ((rc = p_channel(c, &channel)) || (rc = p_e164(c, "to", digits, &n)) || (rc = p_mccmnc(c, mccmnc)) ||
	    (rc = p_name(c, "plan", 0, 0, &plan)) || (rc = p_str(c, "wallet", 0, WALLET_ID_MAX, &wid)) ||
	    (rc = p_name(c, "route", 0, 1, &route)) || (rc = p_at(c, &at)))
		return rc;
	if (wid.p) {
		if ((rc = load_wallet(c, wid, &w)))
			return rc;
		if (!plan.p)
			plan = (struct str){ w.plan, strlen(w.plan) };
	} else if (!plan.p) {
		plan = (struct str){ "default", 7 };
	}
	if ((rc = rate_find_or_fail(c, plan, channel, digits, n, mccmnc, route, wid.p ? w.currency : NULL, 1, at, &hit)))
		return rc;
	msgpack_pack_map(c->pk, wid.p ? 14 : 12);
	KV_SSTR(c->pk, "plan", plan);
	KV_SSTR(c->pk, "channel", channel);
	rate_where_pack(c->pk, hit.prefix, hit.mccmnc);
	KV_STR(c->pk, "route", hit.route);
	KV_AMOUNT(c->pk, "price", hit.price);
	KV_STR(c->pk, "currency", hit.currency);
	rate_policy_pack(c->pk, &hit.policy);
	if (wid.p) {
		KV_AMOUNT(c->pk, "cost", hit.cost);
		KV_STR(c->pk, "cost_currency", w.currency);
	}
	return E_OK;
}

/*
 * An operator's rate deck (rate.import's format mccmnc): each row's columns
 * MCCMNC, PriceSubmit, PriceDelivered, Currency and Effective (others, a
 * network's name say, are ignored) make a mobile network's rate in plan,
 * channel (and route).
 */
struct deck {
	struct str plan, channel, route;
	msgpack_sbuffer params;
	msgpack_unpacked unpacked;
};

/*
 * Deletes every rate of plan (all channels), or with a deck only the mobile
 * networks' rates of plan in its channel.  Returns 0 or an LMDB error.
 */
static int
rate_delete_plan(MDB_txn *txn, struct str plan, const struct deck *deck)
{
	char start[RATE_KEY_MAX];
	size_t n = deck ? rate_key(start, plan, deck->channel, "m", 1, (struct str){ "", 0 }) - 1 : plan.n + 1;
	MDB_cursor *cur;
	MDB_val k = { n, start }, v;
	int rc;

	memcpy(start, plan.p, plan.n);
	start[plan.n] = '\0';
	if ((rc = mdb_cursor_open(txn, store.rates, &cur)))
		return rc;
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0;
	    rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (k.mv_size < n || memcmp(k.mv_data, start, n) != 0)
			break;
		if ((rc = captured_cursor_del(cur, 0)))
			break;
	}
	mdb_cursor_close(cur);
	return rc == MDB_NOTFOUND ? 0 : rc;
}

/* Whether deck column o holds something: not absent, nil, "" (nor, with zero_empty, a zero amount). */
static int
deck_given(const msgpack_object *o, int zero_empty)
{
	int64_t x;

	if (o == NULL || o->type == MSGPACK_OBJECT_NIL || (o->type == MSGPACK_OBJECT_STR && o->via.str.size == 0))
		return 0;
	if (zero_empty && o->type == MSGPACK_OBJECT_STR && amount_parse(o->via.str.ptr, o->via.str.size, &x) == 0)
		return x != 0;
	return !zero_empty || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 != 0;
}

/*
 * Makes the rate.set params of deck row c->params, in d, c's params from
 * then on: PriceSubmit is the price charged at send; PriceDelivered instead
 * makes the rate settle on delivery at that price (a row prices one way,
 * not both); Effective is effective_from.  Returns E_OK or fails c.
 */
static int
deck_row(struct call *c, struct deck *d)
{
	const msgpack_object *net = param(c, "MCCMNC"), *submit = param(c, "PriceSubmit"),
	    *delivered = param(c, "PriceDelivered"), *currency = param(c, "Currency"), *eff = param(c, "Effective");
	int on_delivery = deck_given(delivered, 1);
	msgpack_packer pk;

	if (on_delivery && deck_given(submit, 1))
		return fail(c, E_INVALID_ARGUMENT, "PriceSubmit", "a row prices at submission or on delivery, not both");
	if (!deck_given(net, 0) || !deck_given(currency, 0) || (!on_delivery && !deck_given(submit, 0)))
		return fail(c, E_INVALID_ARGUMENT, !deck_given(net, 0) ? "MCCMNC" : !deck_given(currency, 0) ? "Currency" :
		    "PriceSubmit", "a deck's row needs MCCMNC, PriceSubmit or PriceDelivered, and Currency");
	msgpack_sbuffer_clear(&d->params);
	msgpack_packer_init(&pk, &d->params, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 5 + (d->route.p != NULL) + deck_given(eff, 0) + on_delivery);
	KV_SSTR(&pk, "plan", d->plan);
	KV_SSTR(&pk, "channel", d->channel);
	KEY(&pk, "mccmnc"), msgpack_pack_object(&pk, *net);
	KEY(&pk, "price"), msgpack_pack_object(&pk, on_delivery ? *delivered : *submit);
	KEY(&pk, "currency"), msgpack_pack_object(&pk, *currency);
	if (d->route.p)
		KV_SSTR(&pk, "route", d->route);
	if (deck_given(eff, 0))
		KEY(&pk, "effective_from"), msgpack_pack_object(&pk, *eff);
	if (on_delivery)
		KV_STR(&pk, "settle", "delivery");
	if (msgpack_unpack_next(&d->unpacked, d->params.data, d->params.size, NULL) != MSGPACK_UNPACK_SUCCESS)
		return fail(c, E_BUSY, NULL, "Out of memory");
	c->params = &d->unpacked.data;
	return E_OK;
}

static int
m_rate_import(struct call *c)
{
	const msgpack_object *rows = param(c, "rows"), *saved = c->params, *key;
	struct str mode, format;
	struct deck deck = { 0 };
	msgpack_sbuffer rejected;
	msgpack_packer rpk;
	uint32_t nrejected = 0, loaded = 0;
	char (*plans)[WALLET_ID_MAX + 1] = NULL;
	size_t nplans = 0;
	int rc, replace, is_deck;

	if ((rc = p_str(c, "mode", 0, 16, &mode)) || (rc = p_str(c, "format", 0, 16, &format)))
		return rc;
	replace = !mode.p || (mode.n == 7 && memcmp(mode.p, "replace", 7) == 0);
	if (mode.p && !replace && !(mode.n == 6 && memcmp(mode.p, "upsert", 6) == 0))
		return fail(c, E_INVALID_ARGUMENT, "mode", "mode must be replace or upsert");
	is_deck = format.p && format.n == 6 && memcmp(format.p, "mccmnc", 6) == 0;
	if (format.p && !is_deck && !(format.n == 5 && memcmp(format.p, "rates", 5) == 0))
		return fail(c, E_INVALID_ARGUMENT, "format", "format must be rates or mccmnc");
	if (!is_deck && (param(c, "plan") || param(c, "channel") || param(c, "route")))
		return fail(c, E_INVALID_ARGUMENT, param(c, "plan") ? "plan" : param(c, "channel") ? "channel" : "route",
		    "plan, channel and route go with format mccmnc (the rates format has them in its rows)");
	deck.plan = (struct str){ "default", 7 };
	deck.channel = (struct str){ "sms", 3 };
	if (is_deck && ((param(c, "plan") && (rc = p_name(c, "plan", 1, 0, &deck.plan))) ||
	    (param(c, "channel") && (rc = p_channel(c, &deck.channel))) || (rc = p_name(c, "route", 0, 1, &deck.route))))
		return rc;
	if (rows == NULL || rows->type != MSGPACK_OBJECT_ARRAY)
		return fail(c, E_INVALID_ARGUMENT, "rows", "rows must be a list of rate maps");
	msgpack_sbuffer_init(&rejected);
	msgpack_packer_init(&rpk, &rejected, msgpack_sbuffer_write);
	if (replace && (plans = calloc(rows->via.array.size + 1, sizeof(*plans))) == NULL) {
		msgpack_sbuffer_destroy(&rejected);
		return fail(c, E_BUSY, NULL, "Out of memory");
	}
	/* Pass 0 validates and, in replace mode, empties the plans named; pass 1 writes. */
	for (int pass = 0; pass < 2 && rc == E_OK; pass++) {
		for (uint32_t i = 0; i < rows->via.array.size; i++) {
			msgpack_object *row = &rows->via.array.ptr[i];
			struct call rowcall = *c;
			struct str plan;
			size_t j;

			rowcall.params = row;
			rowcall.pk = &rpk;
			if (row->type != MSGPACK_OBJECT_MAP)
				rc = fail(&rowcall, E_INVALID_ARGUMENT, "rows", "a row must be a map");
			else if (is_deck && (rc = deck_row(&rowcall, &deck)) != E_OK)
				;
			else if ((key = param_unknown(M_RATE_SET, rowcall.params, 0)) != NULL)
				rc = fail_unknown_param(&rowcall, M_RATE_SET, key);
			else if ((rc = p_name(&rowcall, "plan", 1, 0, &plan)) == E_OK && pass == 1) {
				msgpack_sbuffer sink;
				msgpack_packer spk;

				msgpack_sbuffer_init(&sink);
				msgpack_packer_init(&spk, &sink, msgpack_sbuffer_write);
				rowcall.pk = &spk;
				rc = m_rate_set(&rowcall);
				msgpack_sbuffer_destroy(&sink);
				if (rc == E_OK)
					loaded++;
			}
			if (rc != E_OK && rowcall.mdb_rc) {
				c->mdb_rc = rowcall.mdb_rc;
				rc = store_error(c, rowcall.mdb_rc);
				break;
			}
			if (rc != E_OK && pass == 1) {
				msgpack_pack_map(&rpk, 2);
				KV_U64(&rpk, "row", (uint64_t)i + 1);
				KEY(&rpk, "error");
				pack_error(&rpk, &rowcall);
				nrejected++;
			}
			if (rc != E_OK || pass == 1 || !replace) {
				rc = E_OK;
				continue;
			}
			for (j = 0; j < nplans; j++)
				if (strlen(plans[j]) == plan.n && memcmp(plans[j], plan.p, plan.n) == 0)
					break;
			if (j == nplans) {
				memcpy(plans[nplans], plan.p, plan.n);
				plans[nplans++][plan.n] = '\0';
				if ((rc = rate_delete_plan(c->txn, plan, is_deck ? &deck : NULL)))
					rc = store_error(c, rc);
			}
		}
	}
	c->params = saved;
	free(plans);
	msgpack_sbuffer_destroy(&deck.params);
	msgpack_unpacked_destroy(&deck.unpacked);
	if (rc == E_OK) {
		msgpack_pack_map(c->pk, 2);
		KEY(c->pk, "loaded");
		msgpack_pack_uint32(c->pk, loaded);
		pack_rows(c->pk, "rejected", nrejected, &rejected);
	} else {
		msgpack_sbuffer_destroy(&rejected);
	}
	return rc;
}

/* Packs the four fields of an FX pair: base, quote, rate, updated_at (the caller packs the map's head). */
static void
fx_pack_fields(msgpack_packer *pk, const char *pair, const struct fx_val *fv)
{
	char buf[48];

	KEY(pk, "base");
	msgpack_pack_str_with_body(pk, pair, 3);
	KEY(pk, "quote");
	msgpack_pack_str_with_body(pk, pair + 3, 3);
	KV_STR(pk, "rate", fx_rate_format(fv->rate, buf));
	KV_TIME(pk, "updated_at", fv->updated_at);
}

/* Packs one FX pair. */
static void
fx_pack(msgpack_packer *pk, const char *pair, const struct fx_val *fv)
{
	msgpack_pack_map(pk, 4);
	fx_pack_fields(pk, pair, fv);
}

/*
 * Formats FX rate v (FX_SCALE units) for people into out (48 bytes): at most
 * significant digits when significant > 0 (rounded half up), thousands
 * grouped, at least 2 decimals: 3,723.40, 0.000268572.
 */
static char *
fx_human(i128 v, int significant, char *out)
{
	char plain[48], *dot;
	size_t whole, n = 0;

	if (significant > 0) {
		i128 unit = 1;

		for (i128 x = v; x >= 10; x /= 10)
			unit *= 10;
		for (int i = 1; i < significant && unit > 1; i++)
			unit /= 10;
		v = (v + unit / 2) / unit * unit;
	}
	fx_rate_format(v, plain);
	if ((dot = strchr(plain, '.')) == NULL)
		strcat(plain, ".00");
	else if (strlen(dot) == 2)
		strcat(plain, "0");
	whole = (size_t)(strchr(plain, '.') - plain);
	for (size_t i = 0; plain[i]; i++) {
		if (i && i < whole && (whole - i) % 3 == 0)
			out[n++] = ',';
		out[n++] = plain[i];
	}
	out[n] = '\0';
	return out;
}

/* Reads the rate of pair (6 bytes: base then quote) into *rate.  0, MDB_NOTFOUND or an LMDB error. */
static int
fx_pair_get(MDB_txn *txn, const char *pair, i128 *rate)
{
	MDB_val k = { 6, (void *)pair }, v;
	struct fx_val fv;
	int rc = mdb_get(txn, store.fx, &k, &v);

	if (rc == 0) {
		memcpy(&fv, v.mv_data, sizeof(fv));
		*rate = fv.rate;
	}
	return rc;
}

/*
 * Whether rate for pair is more than 10 times away from what the store
 * says of it: the pair's own rate, or the inverse of its reverse pair's (a
 * reversed pair is the usual slip: TZS EUR 2800 meant as 1 EUR = 2,800
 * TZS).  Returns 0 (no or a near rate), 1 with the rate it is far from in
 * *known, or an LMDB error.
 */
static int
fx_far(MDB_txn *txn, const char *pair, i128 rate, i128 *known)
{
	char reverse[6];
	i128 r;
	int rc;

	if ((rc = fx_pair_get(txn, pair, &r)) == 0) {
		*known = r;
		return (long double)rate > 10.0L * (long double)r || 10.0L * (long double)rate < (long double)r;
	}
	if (rc != MDB_NOTFOUND)
		return rc;
	memcpy(reverse, pair + 3, 3);
	memcpy(reverse + 3, pair, 3);
	if ((rc = fx_pair_get(txn, reverse, &r)) != 0)
		return rc == MDB_NOTFOUND ? 0 : rc;
	/* rate against 1 / r, both in FX_SCALE units: rate * r against FX_SCALE^2 */
	*known = (i128)(((long double)FX_SCALE * (long double)FX_SCALE) / (long double)r + 0.5L);
	return (long double)rate * (long double)r > 10.0L * (long double)FX_SCALE * (long double)FX_SCALE ||
	    10.0L * (long double)rate * (long double)r < (long double)FX_SCALE * (long double)FX_SCALE;
}

/* "1 USD = 3,723.40 UGX; 1 UGX = 0.000268572 USD" for rate of pair, into out (160 bytes). */
static char *
fx_words(const char *pair, i128 rate, char *out)
{
	char direct[48], inverse[48];
	i128 inv = (i128)(((long double)FX_SCALE * (long double)FX_SCALE) / (long double)rate + 0.5L);

	snprintf(out, 160, "1 %.3s = %s %.3s; 1 %.3s = %s %.3s", pair, fx_human(rate, 0, direct), pair + 3,
	    pair + 3, fx_human(inv, 6, inverse), pair);
	return out;
}

/*
 * fx.set: 1 base = rate quote.  A rate more than 10 times away from what
 * the store says of the pair (fx_far) is invalid_argument unless force is
 * true.  Answers the pair and, in words, both directions.
 */
static int
m_fx_set(struct call *c)
{
	const msgpack_object *whole = param(c, "rate");
	struct str base, quote, rate = { NULL, 0 };
	struct fx_val fv;
	char pair[6], words[160];
	MDB_val k = { 6, pair }, v = { sizeof(fv), &fv };
	i128 known = 0;
	int rc, force = 0;

	memset(&fv, 0, sizeof(fv));
	if ((rc = p_currency(c, "base", 1, &base)) || (rc = p_currency(c, "quote", 1, &quote)) ||
	    (rc = p_bool(c, "force", &force)))
		return rc;
	if (whole && whole->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
		/* like an amount, a rate may be a msgpack integer of whole units */
		if (whole->via.u64 == 0 || whole->via.u64 >= 1000000000000000ull)
			return fail(c, E_INVALID_ARGUMENT, "rate", "rate must be positive, below 10^15");
		fv.rate = (i128)whole->via.u64 * FX_SCALE;
	} else if ((rc = p_str(c, "rate", 1, 40, &rate))) {
		return rc;
	} else if (fx_rate_parse(rate.p, rate.n, &fv.rate) != 0) {
		return fail(c, E_INVALID_ARGUMENT, "rate",
		    "rate must be a positive decimal string with at most 12 decimals");
	}
	if (memcmp(base.p, quote.p, 3) == 0)
		return fail(c, E_INVALID_ARGUMENT, "quote", "base and quote must differ");
	fv.updated_at = now_seconds();
	memcpy(pair, base.p, 3);
	memcpy(pair + 3, quote.p, 3);
	if (!force && (rc = fx_far(c->txn, pair, fv.rate, &known)) != 0) {
		char said[48], now[48];

		if (rc != 1)
			return store_error(c, rc);
		return fail(c, E_INVALID_ARGUMENT, "rate", "1 %.3s = %s %.3s is more than 10 times away from the "
		    "rate known now (1 %.3s = %s %.3s): is the pair reversed? If it is right, pass force: true "
		    "(walletctl fx set ... --force)",
		    pair, fx_human(fv.rate, 0, said), pair + 3, pair, fx_human(known, 6, now), pair + 3);
	}
	if ((rc = captured_put(c->txn, store.fx, &k, &v, 0)))
		return store_error(c, rc);
	msgpack_pack_map(c->pk, 5);
	fx_pack_fields(c->pk, pair, &fv);
	KV_STR(c->pk, "meaning", fx_words(pair, fv.rate, words));
	return E_OK;
}

static int
m_fx_list(struct call *c)
{
	MDB_cursor *cur;
	MDB_stat st;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_stat(c->txn, store.fx, &st)) || (rc = mdb_cursor_open(c->txn, store.fx, &cur)))
		return store_error(c, rc);
	msgpack_pack_map(c->pk, 1);
	KEY(c->pk, "rates");
	msgpack_pack_array(c->pk, st.ms_entries);
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct fx_val fv;

		memcpy(&fv, v.mv_data, sizeof(fv));
		fx_pack(c->pk, k.mv_data, &fv);
	}
	mdb_cursor_close(cur);
	return E_OK;
}

/* ---- Spend controls ---- */

/* The first prefix of list (comma-separated digits) that digits starts with, copied into out[16]; 0 if none. */
static int
prefix_match(const char *list, const char *digits, char out[16])
{
	for (const char *p = list; *p;) {
		size_t len = strcspn(p, ",");

		if (len < 16 && strncmp(p, digits, len) == 0) {
			memcpy(out, p, len);
			out[len] = '\0';
			return 1;
		}
		p += len + (p[len] == ',');
	}
	return 0;
}

/*
 * Whether w may send to digits: not under one of its blocked_prefixes, and
 * under one of its allowed_prefixes when it has any.  0, or 1 with the
 * blocked prefix in prefix ("" when the number is only not allowed).
 */
static int
destination_blocked(const struct wallet *w, const char *digits, char prefix[16])
{
	if (prefix_match(w->blocked, digits, prefix))
		return 1;
	prefix[0] = '\0';
	return w->allowed[0] && !prefix_match(w->allowed, digits, prefix);
}

/* Fails c with destination_blocked for digits. */
static int
fail_blocked(struct call *c, const char *digits, const char *prefix)
{
	memcpy(c->prefix, prefix, 16);
	if (prefix[0])
		return fail(c, E_DESTINATION_BLOCKED, "to", "+%s is blocked for this wallet (prefix %s)", digits, prefix);
	return fail(c, E_DESTINATION_BLOCKED, "to", "+%s is not in this wallet's allowed prefixes", digits);
}

/*
 * Messages counted in w's rolling hour at slot (since the epoch): its
 * running total, less the slots that have left the hour since w->slot
 * (none while charges come every few minutes; HOUR_SLOTS at most).
 */
static uint64_t
hourly_used(const struct wallet *w, int64_t slot)
{
	uint64_t used = w->hour_total;

	for (int64_t s = w->slot - (HOUR_SLOTS - 1); s <= slot - HOUR_SLOTS && s <= w->slot; s++)
		if (s >= 0)
			used -= w->slot_counts[s % HOUR_SLOTS];
	return used;
}

/* The first slot of w's rolling hour at slot that counts a message (0: none). */
static int64_t
hourly_oldest(const struct wallet *w, int64_t slot)
{
	for (int64_t s = w->slot - (HOUR_SLOTS - 1); s <= w->slot; s++)
		if (s >= 0 && s > slot - HOUR_SLOTS && w->slot_counts[s % HOUR_SLOTS])
			return s;
	return 0;
}

/*
 * Checks cost (in w's currency) and messages charged at now against w's
 * daily_limit (a UTC day) and hourly_messages (a rolling hour, by 5-minute slots).
 * Returns 0, or 1 with c's limit_exceeded details filled (c's code is
 * not set: precheck reports them, a charge fails with them).  O(60).
 */
static int
limits_exceeded(struct call *c, const struct wallet *w, int64_t now, int64_t cost, uint64_t messages)
{
	int64_t day = now / 86400, used;

	used = w->day == day ? w->day_spent : 0;
	if ((w->flags & WF_DAILY) && add_saturating(used, cost) > w->daily_limit) {
		c->limit = "daily_limit";
		amount_format(w->daily_limit, c->limit_max, 0);
		amount_format(used, c->limit_used, 0);
		c->resets_at = (day + 1) * 86400;
		return 1;
	}
	if (w->flags & WF_HOURLY) {
		uint64_t hourly = hourly_used(w, now / HOUR_SLOT);

		if (hourly + messages > w->hourly_messages) {
			c->limit = "hourly_messages";
			snprintf(c->limit_max, sizeof(c->limit_max), "%" PRIu32, w->hourly_messages);
			snprintf(c->limit_used, sizeof(c->limit_used), "%" PRIu64, hourly);
			c->resets_at = hourly ? (hourly_oldest(w, now / HOUR_SLOT) + HOUR_SLOTS) * HOUR_SLOT : now;
			return 1;
		}
	}
	return 0;
}

/* Counts a charge of cost and messages at now in w's day and hour, whether
 * or not w has limits: one set later applies at once to what was spent. */
static void
limits_count(struct wallet *w, int64_t now, int64_t cost, uint32_t messages)
{
	int64_t day = now / 86400, slot = now / HOUR_SLOT;

	if (w->day != day) {
		w->day = day;
		w->day_spent = 0;
	}
	w->day_spent = add_saturating(w->day_spent, cost);
	if (slot - w->slot >= HOUR_SLOTS) {
		memset(w->slot_counts, 0, sizeof(w->slot_counts));
		w->hour_total = 0;
	} else {
		for (int64_t s = w->slot + 1; s <= slot; s++) {
			w->hour_total -= w->slot_counts[s % HOUR_SLOTS];
			w->slot_counts[s % HOUR_SLOTS] = 0;
		}
	}
	if (slot > w->slot)
		w->slot = slot;
	w->slot_counts[w->slot % HOUR_SLOTS] += messages;
	w->hour_total += messages;
}

/* Whether a charge of need goes past shared child w's cap on a month's draws: c's limit_exceeded details set. */
static int
shared_cap_exceeded(struct call *c, const struct wallet *w, int64_t now, int64_t need)
{
	int64_t month = utc_month(now), cap = shared_cap_left(w, now);
	struct tm next = { .tm_year = (int)((month + 1) / 12) + 70, .tm_mon = (int)((month + 1) % 12), .tm_mday = 1 };

	if (need - (w->balance - w->held) <= cap)
		return 0;
	c->limit = "credit_limit";
	amount_format(w->credit_limit, c->limit_max, 0);
	amount_format(w->credit_limit - cap, c->limit_used, 0);
	c->resets_at = (int64_t)timegm(&next);
	return 1;
}

/* Fails c with the limit_exceeded limits_exceeded found. */
static int
fail_limit(struct call *c)
{
	return fail(c, E_LIMIT_EXCEEDED, NULL, "The wallet's %s is reached: used %s of %s", c->limit,
	    c->limit_used, c->limit_max);
}

/*
 * The E.164 country calling code that digits start with, into out[4]:
 * 1 and 7 are one digit, the 2-digit codes are the ones listed, every
 * other code has three (the codes are prefix-free).
 */
static void
calling_code(const char *digits, char out[4])
{
	static const char two[] = "20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 "
	    "60 61 62 63 64 65 66 81 82 84 86 90 91 92 93 94 95 98 ";
	size_t n = 3;

	if (digits[0] == '1' || digits[0] == '7')
		n = 1;
	else
		for (const char *p = two; *p; p += 3)
			if (p[0] == digits[0] && p[1] == digits[1])
				n = 2;
	memcpy(out, digits, n);
	out[n] = '\0';
}

/* ---- The fraud brake ---- */

/*
 * The fraud brake (README: The fraud brake) suspends, for one wallet, a
 * number range (a number less its last 3 digits) that gets more than
 * guard_range_max messages within guard_window seconds, or a calling code
 * that gets more than guard_country_spike times the wallet's usual
 * messages to it per window (over the 7 UTC days before today) once a
 * window holds guard_min_messages.  A count is a sliding window: the
 * current window's messages plus the last one's share of it.
 *
 * The guard database holds, under the wallet's number, 's' and the prefix,
 * each suspension (struct guard_block), and under its number, 'c' and the
 * calling code, that code's daily counts (struct guard_stats): a baseline of
 * 7 days survives restarts and failovers.  The counts themselves live in
 * the writer's memory: a range's only (a record for each range a wallet
 * ever reached would pile up; a restart or a failover starts them afresh),
 * a calling code's window too, and its messages of the day until the
 * writer adds them to its record, at the start of the first batch a second
 * or more after the last time (guard_flush): a record written for every
 * charge cost 8 % of a charge at 64 clients.  A batch that fails or runs
 * again (a full map) may leave a few counted twice or lost: they are a
 * statistic, not money.
 */
enum { GR_RANGE, GR_COUNTRY };
static const char *const guard_reasons[] = { "range_max", "country_spike" };

struct window_count {
	int64_t window;           /* now / guard_window when last counted */
	uint32_t cur, prev;       /* messages in that window, and in the one before */
};

/* Rolls n to now's window of seconds; returns the messages counted in the last `seconds`. */
static uint32_t
window_estimate(struct window_count *n, int64_t now, uint32_t seconds)
{
	int64_t window = now / seconds;

	if (n->window != window) {
		n->prev = n->window == window - 1 ? n->cur : 0;
		n->cur = 0;
		n->window = window;
	}
	return n->cur + (uint32_t)((uint64_t)n->prev * (uint64_t)(seconds - now % seconds) / seconds);
}

struct guard_block {
	int64_t since, until;
	uint32_t repeats;         /* of this prefix's suspensions before it, each within a day of the next */
	uint32_t reason;          /* GR_* */
	uint32_t count, limit;    /* the messages counted when it began, and what they were held to */
};

struct guard_stats {
	int64_t day;              /* the last UTC day counted */
	uint32_t days[8];         /* messages on each day, at day % 8 */
};

/* The key of wallet number's record of kind ('s', 'c') for prefix. */
static MDB_val
guard_key(unsigned char key[8 + 1 + 15], uint64_t number, char kind, const char *prefix)
{
	size_t n = strlen(prefix);

	be64_put(key, number);
	key[8] = (unsigned char)kind;
	memcpy(key + 9, prefix, n);
	return (MDB_val){ 9 + n, key };
}

/* Reads wallet number's record of kind for prefix into rec (size bytes).  0, MDB_NOTFOUND or an LMDB error. */
static int
guard_get(MDB_txn *txn, uint64_t number, char kind, const char *prefix, void *rec, size_t size)
{
	unsigned char key[24];
	MDB_val k = guard_key(key, number, kind, prefix), v;
	int rc = mdb_get(txn, store.guard, &k, &v);

	if (rc == 0)
		record_copy(rec, size, v);
	return rc;
}

static int
guard_put(MDB_txn *txn, uint64_t number, char kind, const char *prefix, void *rec, size_t size)
{
	unsigned char key[24];
	MDB_val k = guard_key(key, number, kind, prefix);

	return captured_put(txn, store.guard, &k, &(MDB_val){ size, rec }, 0);
}

/*
 * The counts in the writer's memory, a table of ranges and one of calling
 * codes: a count in one of GUARD_PROBE slots from its hash.  A calling
 * code's also keeps its day.
 */
#define GUARD_RANGES 65536
#define GUARD_CODES  4096
#define GUARD_PROBE  8
static struct guard_count {
	uint64_t wallet;          /* its number; 0: a free slot */
	uint64_t key;             /* its digits as a number, after a 1 (so 0256 and 256 differ) */
	struct window_count n;
	uint32_t unflushed;       /* a calling code's: messages of day not yet in its record */
	int64_t day;              /* the UTC day week and unflushed are of */
	uint64_t week;            /* messages on the 7 days before it, as its record had them */
} guard_ranges[GUARD_RANGES], guard_codes[GUARD_CODES];
static int64_t guard_flushed_at;  /* when guard_flush last ran */
static int guard_dirty;           /* a calling code has unflushed messages */

/*
 * The count of wallet's digits (n of them) in table (size slots), or NULL
 * with *least the slot of its probe counted least lately (the one to take)
 * and *key what its key is to be.
 */
static struct guard_count *
guard_find(struct guard_count *table, size_t size, uint64_t wallet, const char *digits, size_t n,
    struct guard_count **least, uint64_t *key)
{
	uint64_t h;

	*key = 1;
	for (size_t i = 0; i < n; i++)
		*key = *key * 10 + (uint64_t)(digits[i] - '0');
	h = (wallet * 0x9e3779b97f4a7c15ull) ^ (*key * 0xc2b2ae3d27d4eb4full);
	*least = NULL;
	for (int i = 0; i < GUARD_PROBE; i++) {
		struct guard_count *x = &table[((h >> 32) + (uint64_t)i) % size];

		if (x->wallet == wallet && x->key == *key)
			return x;
		if (*least == NULL || x->n.window < (*least)->n.window ||
		    (x->n.window == (*least)->n.window && x->n.cur < (*least)->n.cur))
			*least = x;
	}
	return NULL;
}

/* The count of wallet's range (digits, n of them), taking a slot when it has none (or with lookup, NULL). */
static struct guard_count *
guard_range(uint64_t wallet, const char *digits, size_t n, int lookup)
{
	struct guard_count *least, *r;
	uint64_t key;

	if ((r = guard_find(guard_ranges, GUARD_RANGES, wallet, digits, n, &least, &key)) || lookup)
		return r;
	*least = (struct guard_count){ .wallet = wallet, .key = key };
	return least;
}

/* Rolls a calling code's daily counts to today. */
static void
guard_stats_roll(struct guard_stats *st, int64_t today)
{
	for (int64_t d = st->day + 1; d <= today && d <= st->day + 8; d++)
		st->days[d % 8] = 0;
	if (today > st->day)
		st->day = today;
}

/* Adds calling code e's unflushed messages to its record, in txn.  0 or an LMDB error. */
static int
guard_code_flush(MDB_txn *txn, struct guard_count *e)
{
	struct guard_stats st;
	char key[24];
	int rc;

	if (e->unflushed == 0)
		return 0;
	snprintf(key, sizeof(key), "%" PRIu64, e->key); /* the code after a 1 */
	memset(&st, 0, sizeof(st));
	if ((rc = guard_get(txn, e->wallet, 'c', key + 1, &st, sizeof(st))) != 0 && rc != MDB_NOTFOUND)
		return rc;
	guard_stats_roll(&st, e->day);
	if (e->day > st.day - 8)
		st.days[e->day % 8] += e->unflushed;
	e->unflushed = 0;
	return guard_put(txn, e->wallet, 'c', key + 1, &st, sizeof(st));
}

/* The writer, at the start of a batch a second or more after the last: every slot's unflushed messages. */
static int
guard_flush(MDB_txn *txn, int64_t now)
{
	int rc;

	guard_flushed_at = now;
	for (size_t i = 0; guard_dirty && i < GUARD_CODES; i++)
		if ((rc = guard_code_flush(txn, &guard_codes[i])))
			return rc;
	guard_dirty = 0;
	return 0;
}

/*
 * The counts of wallet's calling code on today: its slot, (re)loaded from
 * its record in txn when new or of another day (a slot taken from another
 * code, or of another day, is flushed first).  NULL with an LMDB error in *rc.
 */
static struct guard_count *
guard_code(MDB_txn *txn, uint64_t wallet, const char code[4], int64_t today, int *rc)
{
	uint64_t key;
	struct guard_count *least, *e = guard_find(guard_codes, GUARD_CODES, wallet, code, strlen(code), &least, &key);
	struct guard_stats st;

	if (e == NULL) {
		if ((*rc = guard_code_flush(txn, least)))
			return NULL;
		*least = (struct guard_count){ .wallet = wallet, .key = key, .day = -1 };
		e = least;
	}
	if (e->day != today) {
		if ((*rc = guard_code_flush(txn, e)))
			return NULL;
		memset(&st, 0, sizeof(st));
		if ((*rc = guard_get(txn, wallet, 'c', code, &st, sizeof(st))) != 0 && *rc != MDB_NOTFOUND)
			return NULL;
		guard_stats_roll(&st, today);
		e->week = 0;
		for (int d = 1; d <= 7; d++)
			e->week += st.days[(today - d) % 8];
		e->day = today;
	}
	*rc = 0;
	return e;
}

/* Fails c with destination_suspended: prefix is suspended (b). */
static int
fail_suspended(struct call *c, const char *prefix, const struct guard_block *b)
{
	char until[32];

	snprintf(c->prefix, sizeof(c->prefix), "%s", prefix);
	c->resets_at = b->until;
	c->limit = guard_reasons[b->reason % 2];
	return fail(c, E_DESTINATION_SUSPENDED, "to", "Messages to +%s are suspended for this wallet until %s (%s: "
	    "%u messages counted, %u allowed)", prefix, time_format(b->until, until), c->limit, b->count, b->limit);
}

/*
 * Suspends prefix for wallet w (id) at now, why (GR_*) with count messages
 * against limit: guard_block seconds, doubled for each repeat within a day
 * of the last.  Records it with its event and its e-mails (to the wallet's
 * alert e-mails and to ops_emails) in c's transaction, and fails c with
 * destination_suspended.
 */
static int
guard_suspend(struct call *c, struct str id, struct wallet *w, const char *prefix, uint32_t why, uint32_t count,
    uint32_t limit, int64_t now)
{
	struct guard_block b;
	struct note n;
	char until[32];
	int rc = guard_get(c->txn, w->number, 's', prefix, &b, sizeof(b));

	if (rc != 0 && rc != MDB_NOTFOUND)
		return store_error(c, rc);
	b.repeats = rc == 0 && now - b.until < 86400 ? b.repeats + 1 : 0;
	b.since = now;
	b.until = now + ((int64_t)guard_setting(w, G_BLOCK) << (b.repeats < 10 ? b.repeats : 10));
	b.reason = why;
	b.count = count;
	b.limit = limit;
	if (b.until > w->guard_until)
		w->guard_until = b.until;
	memset(&n, 0, sizeof(n));
	n.kind = NK_SUSPENDED;
	n.until = b.until;
	snprintf(n.prefix, sizeof(n.prefix), "%s", prefix);
	snprintf(n.reason, sizeof(n.reason), "%s", guard_reasons[why]);
	if ((rc = guard_put(c->txn, w->number, 's', prefix, &b, sizeof(b))) || (rc = note_add(c, id, w, &n)))
		return store_error(c, rc);
	if (config.ops_emails[0]) {
		n.to_ops = 1;
		if ((rc = note_add(c, id, w, &n)))
			return store_error(c, rc);
	}
	if ((rc = wallet_put(c->txn, id, w)) || (rc = event_add(c->txn, "destination_suspended", id,
	    json_pack("{s:s, s:s, s:s, s:i, s:i, s:i}", "prefix", prefix, "reason", guard_reasons[why],
	    "until", time_format(b.until, until), "repeats", (int)b.repeats, "count", (int)count, "limit", (int)limit))))
		return store_error(c, rc);
	log_x(L_WARN, "fraud brake: messages to +%s suspended for wallet %.*s until %s (%s: %u counted, %u allowed)",
	    prefix, (int)id.n, id.p, until, guard_reasons[why], count, limit);
	return fail_suspended(c, prefix, &b);
}

/* Whether the fraud brake watches w's messages (to digits, unless NULL: not under a safe prefix). */
static int
guard_on(const struct wallet *w, const char *digits)
{
	char safe[16];

	return (guard_setting(w, G_RANGE_MAX) || guard_setting(w, G_COUNTRY_SPIKE)) &&
	    !(digits && prefix_match(guard_safe(w), digits, safe));
}

/* The range of digits (n of them): the number less its last 3 digits, into range. */
static void
guard_range_of(const char *digits, size_t n, char range[16])
{
	n = n > 3 ? n - 3 : n;
	memcpy(range, digits, n);
	range[n] = '\0';
}

/*
 * The prefix of digits (ndigits of them) suspended for w at now, if the
 * brake watches them (guard_on), copied into prefix with its block in *b;
 * 0 if none.
 */
static int
guard_suspended(MDB_txn *txn, const struct wallet *w, const char *digits, size_t ndigits, int64_t now,
    char prefix[16], struct guard_block *b)
{
	if (now >= w->guard_until) /* none runs: nothing to look up */
		return 0;
	guard_range_of(digits, ndigits, prefix);
	if (guard_get(txn, w->number, 's', prefix, b, sizeof(*b)) == 0 && b->until > now)
		return 1;
	calling_code(digits, prefix);
	return guard_get(txn, w->number, 's', prefix, b, sizeof(*b)) == 0 && b->until > now;
}

/*
 * The fraud brake on a charge of wallet w (id) to digits at now, its last
 * check: destination_suspended while the number's range or calling code
 * is, or when this message would pass either count (which suspends it).
 * Otherwise counts the message and returns E_OK.  Costs nothing for a
 * wallet with the brake off; otherwise counts in memory, and two lookups
 * while a suspension of the wallet's runs.
 */
static int
guard_check(struct call *c, struct str id, struct wallet *w, const char *digits, size_t ndigits, int64_t now)
{
	uint32_t range_max = guard_setting(w, G_RANGE_MAX), spike = guard_setting(w, G_COUNTRY_SPIKE);
	uint32_t window = guard_setting(w, G_WINDOW), count;
	char prefix[16], code[4];
	struct guard_count *r = NULL;
	struct guard_count *e = NULL;
	struct guard_block b;
	int rc;

	if (!guard_on(w, digits))
		return E_OK;
	if (guard_suspended(c->txn, w, digits, ndigits, now, prefix, &b))
		return fail_suspended(c, prefix, &b);
	if (range_max) {
		guard_range_of(digits, ndigits, prefix);
		r = guard_range(w->number, prefix, strlen(prefix), 0);
		if ((count = window_estimate(&r->n, now, window) + 1) > range_max)
			return guard_suspend(c, id, w, prefix, GR_RANGE, count, range_max, now);
	}
	if (spike) {
		double usual;

		calling_code(digits, code);
		if ((e = guard_code(c->txn, w->number, code, now / 86400, &rc)) == NULL)
			return store_error(c, rc);
		usual = (double)e->week * window / (7 * 86400.0);
		count = window_estimate(&e->n, now, window) + 1;
		if (count >= guard_setting(w, G_MIN_MESSAGES) && count > spike * usual)
			return guard_suspend(c, id, w, code, GR_COUNTRY, count, (uint32_t)(spike * usual), now);
		e->n.cur++;
		e->unflushed++;
		guard_dirty = 1;
	}
	if (r)
		r->n.cur++;
	return E_OK;
}

/* ---- Charges ---- */

/*
 * Settle on delivery.  A charge on such a rate holds its cost in a hold
 * named dlr:REF (pending_hold) and keeps the charge to write in its refs
 * entry; its report writes it (delivered) or releases the hold (a
 * failure), and so does the writer at the rate's pending_timeout
 * (pending_timeout: charge or release, as the rate said).
 */

/* Decodes the charge a pending entry keeps into t (strings in x and e's bytes). */
static int
pending_txn(const struct ref_entry *e, struct txn *t, struct txn_text *x)
{
	struct txn_head h;

	if (e->record.n <= sizeof(h))
		return MDB_CORRUPTED;
	memcpy(&h, e->record.p, sizeof(h));
	return txn_decode(0, &h, e->record.p + sizeof(h), e->record.n - sizeof(h), t, x);
}

/* Holds charge t's cost for its report for timeout seconds (0: 72 h); *record: t as txns would store it, in buf. */
static int
pending_hold(struct call *c, struct wallet *w, struct txn *t, int64_t now, uint32_t timeout, char buf[REF_VALUE_MAX],
    struct str *record)
{
	msgpack_sbuffer pending;
	struct txn_head h = { .amount = t->amount, .balance_after = w->balance, .created_at = now,
		.type = (uint32_t)t->type };
	struct hold hold = { .amount = -t->amount, .remaining = -t->amount, .created_at = now, .status = HS_ACTIVE };
	msgpack_packer pk;
	int rc;

	t->created_at = now;
	t->balance_after = w->balance;
	msgpack_sbuffer_init(&pending);
	msgpack_sbuffer_write(&pending, (const char *)&h, sizeof(h));
	msgpack_packer_init(&pk, &pending, msgpack_sbuffer_write);
	txn_pack_stored(&pk, t);
	*record = (struct str){ buf, pending.size };
	if (pending.size > REF_VALUE_MAX / 2) { /* a description of 600 bytes at most: cannot be */
		msgpack_sbuffer_destroy(&pending);
		return fail(c, E_INTERNAL, NULL, "a pending charge does not fit its entry");
	}
	memcpy(buf, pending.data, pending.size);
	msgpack_sbuffer_destroy(&pending);
	hold.expires_at = now + (timeout ? timeout : PENDING_TIMEOUT_DEFAULT);
	memcpy(hold.wallet, t->wallet.p, t->wallet.n);
	snprintf(hold.ref, sizeof(hold.ref), "dlr:%.*s", (int)t->ref.n, t->ref.p);
	snprintf(hold.description, sizeof(hold.description), "%.255s", t->description); /* the charge keeps it whole */
	w->held += hold.amount;
	if (w->holds_active++ == 0 || hold.expires_at < w->hold_expiry)
		w->hold_expiry = hold.expires_at;
	if ((rc = hold_put(c->txn, w->number, &hold, 1)))
		return store_error(c, rc);
	if (hold.expires_at < store.next_expiry)
		store.next_expiry = hold.expires_at;
	return E_OK;
}

/* Answers a charge that has no transaction (held for its report, or released) from its entry. */
static int
pending_pack(struct call *c, const struct ref_entry *e, int replayed)
{
	struct txn_text x;
	struct txn t;
	int rc;

	if ((rc = pending_txn(e, &t, &x)))
		return store_error(c, rc);
	t.pending = (e->fate.flags & CF_PENDING) != 0;
	txn_pack(c->pk, &t, replayed);
	return E_OK;
}

/*
 * Settles the pending charge of e (of ref, in wallet): writes its charge
 * (charge) or not, ends its hold, and announces it (charge_settled, why);
 * a charge that takes the balance below the threshold records its
 * low-balance notification (*alert set).  e's bytes must not point into
 * the store.  Returns 0 or an LMDB error.
 */
static int
pending_settle(MDB_txn *txn, struct str wallet, struct str ref, struct ref_entry *e, int charge, const char *why,
    int *alert)
{
	struct call low = { .txn = txn };
	char name[REF_MAX + 1];
	struct txn_text x;
	struct wallet w;
	struct hold h;
	struct txn t;
	int rc;

	snprintf(name, sizeof(name), "dlr:%.*s", (int)ref.n, ref.p);
	if ((rc = wallet_get(txn, wallet, &w)) || (rc = pending_txn(e, &t, &x)))
		return rc;
	if ((rc = hold_get(txn, w.number, (struct str){ name, strlen(name) }, &h)) == 0 && h.status == HS_ACTIVE) {
		h.status = HS_RELEASED;
		h.closed_at = now_seconds();
		rc = hold_put(txn, w.number, &h, 1);
	}
	if (rc != 0 && rc != MDB_NOTFOUND)
		return rc;
	if (charge) {
		int64_t before = w.balance;

		w.balance += t.amount;
		if ((rc = lots_draw(txn, &w, -t.amount, &e->lots)) || (rc = txn_append(txn, &w, &t, &scratch)) ||
		    (rc = note_on_crossing(&low, wallet, &w, before, t.id)))
			return rc;
		e->id = t.id;
		*alert |= low.alert;
	}
	e->fate.flags &= ~CF_PENDING;
	if ((rc = wallet_holds_recount(txn, &w)) || (rc = wallet_put(txn, wallet, &w)))
		return rc;
	return event_add(txn, "charge_settled", wallet, json_pack("{s:s%, s:o, s:o, s:s, s:s, s:s}", "ref", ref.p, ref.n,
	    "txn", e->id ? json_integer((json_int_t)e->id) : json_null(), "amount", json_amount(-t.amount),
	    "currency", t.currency, "outcome", charge ? "charged" : "released", "why", why));
}

/* The writer, at a pending charge's timeout (its hold dlr:REF): charged or released as its rate said. */
static int
pending_timeout(MDB_txn *txn, uint64_t number, struct str wallet, struct str ref)
{
	unsigned char key[REF_MAX + 8];
	char copy[REF_VALUE_MAX], val[REF_VALUE_MAX];
	MDB_val k = ref_key(key, ref, number), v;
	struct ref_entry e;
	int rc, alert = 0; /* the alert thread finds the note at its next run (the event wakes it) */

	if ((rc = mdb_get(txn, store.refs, &k, &v)) != 0 || v.mv_size > REF_VALUE_MAX)
		return rc == MDB_NOTFOUND ? 0 : rc ? rc : MDB_CORRUPTED;
	memcpy(copy, v.mv_data, v.mv_size);
	ref_read((MDB_val){ v.mv_size, copy }, &e);
	if (!(e.fate.flags & CF_PENDING))
		return 0;
	if ((rc = pending_settle(txn, wallet, ref, &e, !(e.fate.flags & CF_RELEASE), "pending_timeout", &alert)) ||
	    (rc = ref_write(val, &e, &v)))
		return rc;
	return captured_put(txn, store.refs, &k, &v, 0);
}

/* The failure fee of hit's rate in currency, converted as the charge was, into *fee. */
static int
charge_fee(struct call *c, const struct rate_hit *hit, const char *currency, int64_t *fee)
{
	int err = 0, rc = fx_convert(c->txn, hit->policy.failure_fee, hit->currency, currency, fee, &err);

	if (rc < 0)
		return store_error(c, err);
	return rc == E_OK ? E_OK : fail(c, rc, "failure_fee", "the failure fee cannot be converted into %s", currency);
}

/*
 * Loads wallet w's hold ref for drawing on at now: unknown_hold, or
 * hold_closed when released or past its expires_at.
 */
static int
load_open_hold(struct call *c, const struct wallet *w, struct str ref, int64_t now, struct hold *h)
{
	int rc = hold_get(c->txn, w->number, ref, h);

	if (rc == MDB_NOTFOUND || (rc == 0 && (h->status != HS_ACTIVE || now >= h->expires_at)))
		snprintf(c->hold, sizeof(c->hold), "%.*s", (int)ref.n, ref.p);
	if (rc == MDB_NOTFOUND)
		return fail(c, E_UNKNOWN_HOLD, "hold", "No hold '%.*s' in this wallet", (int)ref.n, ref.p);
	if (rc)
		return store_error(c, rc);
	if (h->status == HS_ACTIVE && now >= h->expires_at)
		h->status = HS_EXPIRED;
	if (h->status != HS_ACTIVE) {
		c->hold_status = hold_status_names[h->status];
		return fail(c, E_HOLD_CLOSED, "hold", "Hold '%.*s' is %s", (int)ref.n, ref.p, c->hold_status);
	}
	return E_OK;
}

/*
 * Reads segments or text for a message on channel: text is counted as SMS
 * parts; neither is 1; both is invalid_argument.  A WhatsApp message is one
 * unit: segments other than 1 on it is invalid_argument.
 */
static int
p_segments(struct call *c, struct str channel, uint32_t *segments)
{
	struct str text;
	uint64_t seg = 0;
	int rc;

	if ((rc = p_str(c, "text", 0, 64 * 1024, &text)) || (rc = p_uint(c, "segments", 0, 1, 1000, &seg)))
		return rc;
	if (text.p && seg)
		return fail(c, E_INVALID_ARGUMENT, "text", "give segments or text, not both");
	if (channel.p[0] == 'w' && seg > 1)
		return fail(c, E_INVALID_ARGUMENT, "segments", "a WhatsApp message is one unit: segments must be 1");
	*segments = seg ? (uint32_t)seg : 1;
	if (text.p == NULL || channel.p[0] == 'w')
		return E_OK;
	if (sms_segments(text.p, text.n, segments) != 0)
		return fail(c, E_INVALID_ARGUMENT, "text", "text is not valid UTF-8");
	if (*segments > 1000)
		return fail(c, E_INVALID_ARGUMENT, "text", "text is longer than 1000 SMS parts");
	return E_OK;
}

/*
 * charge: charges one message described by c->params against its wallet,
 * in c->txn: idempotent on (wallet, ref); checks frozen, the destination's
 * prefixes, rate, FX, the hold named (its remaining is drawn first), what
 * is available, the daily and hourly limits and the fraud brake (unless an
 * admin says risk_check: false); appends the transaction;
 * records a notification on a threshold crossing.  Packs the transaction plus `replayed`.  Returns E_OK or the
 * error.  Every check comes before the first write (MF_FLAT): an error of
 * its own leaves c->txn untouched, and once it writes, only a store error
 * (c->mdb_rc set, the whole batch rerun) can fail it.  charge.batch's items
 * and the writer's batch rely on this.
 */
/* ---- Resellers ---- */

/* The id the log's next transaction gets (txn_append). */
static int
log_next_id(MDB_txn *txn, uint64_t *id)
{
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, store.txns, &cur)) != 0)
		return rc;
	rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
	mdb_cursor_close(cur);
	*id = 1;
	if (rc == 0)
		memcpy(id, k.mv_data, sizeof(*id)), ++*id;
	return rc == MDB_NOTFOUND ? 0 : rc;
}

/*
 * Writes a transfer of amount from sender (from) to receiver (to) in txn:
 * out, a transfer_out, and in, a transfer_in, each naming the other (out
 * comes with its actor, ref and description, in with its description).
 * Checks nothing; the caller writes both wallets.  Returns 0 or an LMDB error.
 */
static int
transfer_write(MDB_txn *txn, struct str from, struct wallet *sender, struct str to, struct wallet *receiver,
    int64_t amount, struct txn *out, struct txn *in)
{
	char description[sizeof(in->description)];
	int rc;

	memcpy(description, in->description, sizeof(description));
	*in = *out; /* the actor and ref */
	memcpy(in->description, description, sizeof(description));
	out->type = T_TRANSFER_OUT, in->type = T_TRANSFER_IN;
	out->wallet = from, in->wallet = to;
	out->amount = -amount, in->amount = amount;
	out->currency = sender->currency, in->currency = receiver->currency;
	sender->balance -= amount;
	receiver->balance += amount;
	if ((rc = lots_draw(txn, sender, amount, NULL)) || (rc = log_next_id(txn, &in->refund_of)))
		return rc;
	out->refund_of = in->refund_of + 1; /* the two are appended one after the other */
	if ((rc = txn_append(txn, sender, out, &scratch)) || (rc = txn_append(txn, receiver, in, &scratch)))
		return rc;
	return in->id != out->refund_of || out->id != in->refund_of ? MDB_CORRUPTED : 0;
}

/*
 * What a charge t of need lacks beyond shared child w's own money (id),
 * drawn from its parent pw in this commit: a transfer whose transfer_out
 * names the child and the charge, counted in the month's draws.  Returns
 * E_OK or a store error.
 */
static int
shared_draw(struct call *c, struct str id, struct wallet *w, struct wallet *pw, int64_t need, const struct txn *t)
{
	struct str parent = { w->parent, strlen(w->parent) };
	int64_t draw = need - (w->balance - w->held), before = pw->balance, month = utc_month(now_seconds());
	struct txn out, in;
	int rc;

	if (draw <= 0)
		return E_OK;
	memset(&out, 0, sizeof(out));
	out.ref = t->ref;
	{
		struct text d = { out.description, 0, sizeof(out.description) };

		text_add(&d, "Charge of ", 10);
		text_add(&d, id.p, id.n);
		text_add(&d, ": ", 2);
		text_add(&d, t->description, strlen(t->description));
	}
	snprintf(in.description, sizeof(in.description), "Drawn from %s", w->parent);
	if ((rc = transfer_write(c->txn, parent, pw, id, w, draw, &out, &in)) ||
	    (rc = note_on_crossing(c, parent, pw, before, out.id)) || (rc = wallet_put(c->txn, parent, pw)))
		return store_error(c, rc);
	if (w->draws.month != month)
		w->draws.month = month, w->draws.spent = 0;
	w->draws.spent += draw;
	return E_OK;
}

static int
m_charge(struct call *c)
{
	struct str id, channel, ref, route, desc, hold_ref;
	char digits[16], fingerprint[64 + WALLET_ID_MAX], prefix[16], mccmnc[7];
	unsigned char refkey[8 + REF_MAX];
	size_t ndigits, flen;
	uint32_t segments;
	struct wallet w, parent;
	struct lot_draws drawn = { 0 };
	struct rate_hit hit;
	struct hold hold;
	struct txn t;
	MDB_val k, v;
	int64_t before, now, held, available, from_hold = 0, failure_fee = 0;
	int rc, risk_check = 1;

	if ((rc = p_wallet(c, &id)) || (rc = p_channel(c, &channel)) ||
	    (rc = p_e164(c, "to", digits, &ndigits)) || (rc = p_str(c, "ref", 1, REF_MAX, &ref)) ||
	    (rc = p_name(c, "route", 0, 1, &route)) || (rc = p_segments(c, channel, &segments)) ||
	    (rc = p_text(c, "description", 0, &desc)) || (rc = p_str(c, "hold", 0, REF_MAX, &hold_ref)) ||
	    (rc = p_bool(c, "risk_check", &risk_check)) || (rc = p_mccmnc(c, mccmnc)))
		return rc;
	if (ref.n == 0)
		return fail(c, E_INVALID_ARGUMENT, "ref", "ref must not be empty");
	if ((rc = load_wallet(c, id, &w)))
		return rc;

	/* Idempotency: the same ref with the same message is the same charge.
	 * The fingerprint is channel|digits|=route (or * when none was named)|segments. */
	{
		struct text f = { fingerprint, 0, sizeof(fingerprint) };

		text_add(&f, channel.p, channel.n);
		text_add(&f, "|", 1);
		text_add(&f, digits, ndigits);
		text_add(&f, route.p ? "|=" : "|*", 2);
		text_add(&f, route.p, route.n);
		text_add(&f, "|", 1);
		text_u32(&f, segments);
		flen = f.n;
	}
	k = ref_key(refkey, ref, w.number);
	if ((rc = mdb_get(c->txn, store.refs, &k, &v)) == 0) {
		struct ref_entry e;
		MDB_val raw;

		ref_read(v, &e);
		if (e.fp.n != flen || memcmp(e.fp.p, fingerprint, flen) != 0) {
			c->conflict_txn = e.id;
			return fail(c, E_IDEMPOTENCY_CONFLICT, "ref",
			    "ref '%.*s' was used for a different message (txn %" PRIu64 ")",
			    (int)ref.n, ref.p, e.id);
		}
		if (e.id == 0) /* held for its report, or released */
			return pending_pack(c, &e, 1);
		if ((rc = txn_get(c->txn, e.id, &raw)))
			return store_error(c, rc);
		pack_txn_answer(c->pk, raw.mv_data, raw.mv_size, 1);
		return E_OK;
	} else if (rc != MDB_NOTFOUND) {
		return store_error(c, rc);
	}

	if (w.flags & WF_FROZEN)
		return fail(c, E_WALLET_FROZEN, "wallet", "Wallet '%.*s' is frozen", (int)id.n, id.p);
	if ((w.flags & WF_SHARED) && (rc = load_wallet(c, (struct str){ w.parent, strlen(w.parent) }, &parent)))
		return rc;
	if ((w.flags & WF_SHARED) && (parent.flags & WF_FROZEN))
		return fail(c, E_WALLET_FROZEN, "wallet", "Wallet '%.*s' draws on '%s', which is frozen", (int)id.n, id.p,
		    w.parent);
	if (destination_blocked(&w, digits, prefix))
		return fail_blocked(c, digits, prefix);
	now = now_seconds();
	if ((rc = rate_find_or_fail(c, (struct str){ w.plan, strlen(w.plan) }, channel, digits, ndigits, mccmnc,
	    route, w.currency, segments, now, &hit)))
		return rc;
	if (hold_ref.p && (rc = load_open_hold(c, &w, hold_ref, now, &hold)))
		return rc;
	if ((rc = wallet_available(c->txn, &w, now, &held, &available)))
		return store_error(c, rc);
	if (hold_ref.p)
		from_hold = hit.cost < hold.remaining ? hit.cost : hold.remaining;
	if ((w.flags & WF_SHARED) && shared_cap_exceeded(c, &w, now, hit.cost))
		return fail_limit(c); /* a month's draws on its parent */
	if (hit.cost - from_hold > available) {
		int64_t required = hit.price * (int64_t)segments, shown; /* checked in rate_find */
		int err = 0;

		rc = fx_convert(c->txn, available + from_hold > 0 ? available + from_hold : 0, w.currency,
		    hit.currency, &shown, &err);
		if (rc < 0)
			return store_error(c, err);
		if (rc != E_OK)
			shown = 0;
		return fail_insufficient(c, required, shown, hit.currency);
	}
	if (limits_exceeded(c, &w, now, hit.cost, 1))
		return fail_limit(c);
	if (hit.policy.settle && hold_ref.p)
		return fail(c, E_INVALID_ARGUMENT, "hold", "a charge on a rate that settles on delivery draws on no hold");
	if (hit.policy.settle && ref.n > REF_MAX - 4)
		return fail(c, E_INVALID_ARGUMENT, "ref", "a rate that settles on delivery takes refs of at most %d bytes",
		    REF_MAX - 4);
	if (hit.policy.on_failure == OF_FEE && (rc = charge_fee(c, &hit, w.currency, &failure_fee)))
		return rc;
	if (risk_check && (rc = guard_check(c, id, &w, digits, ndigits, now)))
		return rc; /* the one write with an error: a suspension it decided on */
	memset(&t, 0, sizeof(t));
	t.type = channel.p[0] == 's' ? T_SMS_CHARGE : T_WHATSAPP_CHARGE;
	t.wallet = id;
	t.amount = -hit.cost;
	t.currency = w.currency;
	t.ref = ref;
	t.channel = channel;
	t.to[0] = '+';
	memcpy(t.to + 1, digits, ndigits + 1);
	t.route = (struct str){ hit.route, strlen(hit.route) };
	t.segments = segments;
	t.price = hit.price;
	t.price_currency = hit.currency;
	t.hold = hold_ref.p ? hold_ref : (struct str){ NULL, 0 };
	{
		/* "SMS to +256712345678 via ESMS_UG (1 seg)" unless the caller gave one */
		struct text d = { t.description, 0, sizeof(t.description) };

		if (desc.p) {
			text_add(&d, desc.p, desc.n);
		} else {
			text_add(&d, t.type == T_SMS_CHARGE ? "SMS to " : "WhatsApp to ",
			    t.type == T_SMS_CHARGE ? 7 : 12);
			text_add(&d, t.to, ndigits + 1);
			if (t.route.n) {
				text_add(&d, " via ", 5);
				text_add(&d, t.route.p, t.route.n);
			}
			text_add(&d, " (", 2);
			text_u32(&d, segments);
			text_add(&d, " seg)", 5);
		}
	}
	if ((w.flags & WF_SHARED) && (rc = shared_draw(c, id, &w, &parent, hit.cost - from_hold, &t)))
		return rc;
	before = w.balance;
	limits_count(&w, now, hit.cost, 1);
	if (!hit.policy.settle) {
		if ((rc = lots_draw(c->txn, &w, hit.cost, &drawn)))
			return store_error(c, rc);
		w.balance -= hit.cost;
	}
	if (hold_ref.p) {
		hold.remaining -= from_hold;
		w.held -= from_hold;
		if ((rc = hold_put(c->txn, w.number, &hold, 0)))
			return store_error(c, rc);
	}

	{
		/* its refund policy kept with it: a later rate change does not alter it */
		struct ref_entry e = { .fp = { fingerprint, flen }, .fate = { .on_failure = hit.policy.on_failure,
			.failure_fee = failure_fee } };
		char val[REF_VALUE_MAX], rec[REF_VALUE_MAX];

		if (hit.policy.settle) { /* held until its report: the charge is written then */
			e.fate.flags = CF_PENDING | (hit.policy.timeout_release ? CF_RELEASE : 0);
			if ((rc = pending_hold(c, &w, &t, now, hit.policy.pending_timeout, rec, &e.record)))
				return rc;
		} else if ((rc = txn_append(c->txn, &w, &t, &scratch))) {
			return store_error(c, rc);
		}
		e.lots = drawn; /* for its refunds */
		e.id = t.id;
		if ((rc = ref_write(val, &e, &v)) || (rc = captured_put(c->txn, store.refs, &k, &v, 0)))
			return store_error(c, rc);
	}
	if ((rc = note_on_crossing(c, id, &w, before, t.id)) || (rc = wallet_put(c->txn, id, &w)))
		return store_error(c, rc);
	if (hit.policy.settle)
		t.pending = 1;
	txn_pack(c->pk, &t, 0);
	return E_OK;
}

/*
 * A batch of method m (charge, refund): each item run as by m, in order, in
 * this request's transaction, its answer or {error} in `results`.  An item
 * needs no nested transaction of its own: m makes every check before its
 * first write, and a write can fail only with a store error, which fails
 * the whole request (the writer aborts the batch, grows the map if it was
 * full, and runs it again).  So an item's error leaves no trace and fails
 * only that item.
 */
static int
batch_run(struct call *c, int m)
{
	const msgpack_object *items = param(c, "items"), *saved = c->params, *key;
	int rc = E_OK;

	if (items == NULL || items->type != MSGPACK_OBJECT_ARRAY)
		return fail(c, E_INVALID_ARGUMENT, "items", "items must be a list of %s params", method_table[m].name);
	if (items->via.array.size > config.charge_batch_max)
		return fail(c, E_INVALID_ARGUMENT, "items", "at most %u items per batch",
		    config.charge_batch_max);
	msgpack_pack_map(c->pk, 1);
	KEY(c->pk, "results");
	msgpack_pack_array(c->pk, items->via.array.size);
	for (uint32_t i = 0; i < items->via.array.size; i++) {
		struct call item = *c;

		item.params = &items->via.array.ptr[i];
		if (item.params->type != MSGPACK_OBJECT_MAP)
			rc = fail(&item, E_INVALID_ARGUMENT, "items", "each item must be a map");
		else if ((key = param_unknown(m, item.params, 0)) != NULL)
			rc = fail_unknown_param(&item, m, key);
		else if (param(&item, "risk_check"))
			rc = fail(&item, E_INVALID_ARGUMENT, "risk_check", "risk_check is taken by charge, one message at a "
			    "time, not in a batch");
		else
			rc = method_fns[m](&item);
		if (rc != E_OK) {
			if (item.mdb_rc) {
				c->mdb_rc = item.mdb_rc;
				rc = store_error(c, item.mdb_rc);
				break;
			}
			msgpack_pack_map(c->pk, 1);
			KEY(c->pk, "error");
			pack_error(c->pk, &item);
			rc = E_OK;
		}
		c->alert |= item.alert;
	}
	c->params = saved;
	return rc;
}

static int m_charge_batch(struct call *c) { return batch_run(c, M_CHARGE); }

/* guard.list: the wallet's suspensions still running, by prefix (none while its brake is off). */
static int
m_guard_list(struct call *c)
{
	unsigned char key[24];
	struct str id;
	struct wallet w;
	msgpack_sbuffer rows;
	msgpack_packer pk;
	MDB_cursor *cur;
	MDB_val k, v;
	int64_t now = now_seconds();
	size_t n = 0;
	int rc;

	if ((rc = p_wallet(c, &id)) || (rc = load_wallet(c, id, &w)))
		return rc;
	if ((rc = mdb_cursor_open(c->txn, store.guard, &cur)))
		return store_error(c, rc);
	msgpack_sbuffer_init(&rows);
	msgpack_packer_init(&pk, &rows, msgpack_sbuffer_write);
	k = guard_key(key, w.number, 's', "");
	rc = guard_on(&w, NULL) ? mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE) : MDB_NOTFOUND; /* off: none hold */
	for (; rc == 0 && k.mv_size > 9 && k.mv_size < 9 + 16 &&
	    memcmp(k.mv_data, key, 9) == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct guard_block b;

		record_copy(&b, sizeof(b), v);
		if (b.until <= now)
			continue;
		msgpack_pack_map(&pk, 7);
		KEY(&pk, "prefix");
		msgpack_pack_str_with_body(&pk, (const char *)k.mv_data + 9, k.mv_size - 9);
		KV_STR(&pk, "reason", guard_reasons[b.reason % 2]);
		KV_TIME(&pk, "since", b.since);
		KV_TIME(&pk, "until", b.until);
		KV_U64(&pk, "repeats", b.repeats);
		KV_U64(&pk, "count", b.count);
		KV_U64(&pk, "limit", b.limit);
		n++;
	}
	mdb_cursor_close(cur);
	if (rc != 0 && rc != MDB_NOTFOUND) {
		msgpack_sbuffer_destroy(&rows);
		return store_error(c, rc);
	}
	msgpack_pack_map(c->pk, 1);
	pack_rows(c->pk, "suspensions", n, &rows);
	return E_OK;
}

/* guard.lift: ends prefix's suspension (if running) and starts its counts afresh. */
static int
m_guard_lift(struct call *c)
{
	unsigned char key[24];
	char prefix[16];
	struct str id, p;
	struct wallet w;
	struct guard_block b;
	struct guard_count *r, *e = NULL;
	MDB_val k;
	int rc, lifted;

	if ((rc = p_wallet(c, &id)) || (rc = p_str(c, "prefix", 1, 15, &p)))
		return rc;
	if (!valid_prefix(p))
		return fail(c, E_INVALID_ARGUMENT, "prefix", "prefix must be 1-15 digits, the first not 0");
	if ((rc = load_wallet(c, id, &w)))
		return rc;
	snprintf(prefix, sizeof(prefix), "%.*s", (int)p.n, p.p);
	rc = guard_get(c->txn, w.number, 's', prefix, &b, sizeof(b));
	if (rc != 0 && rc != MDB_NOTFOUND)
		return store_error(c, rc);
	lifted = rc == 0 && b.until > now_seconds();
	k = guard_key(key, w.number, 's', prefix);
	if (rc == 0 && (rc = captured_del(c->txn, store.guard, &k, NULL)))
		return store_error(c, rc);
	if ((r = guard_range(w.number, prefix, p.n, 1)) != NULL)
		r->n = (struct window_count){ 0, 0, 0 };
	if (p.n <= 3 && (e = guard_code(c->txn, w.number, prefix, now_seconds() / 86400, &rc)) == NULL)
		return store_error(c, rc);
	if (e)
		e->n = (struct window_count){ 0, 0, 0 };
	msgpack_pack_map(c->pk, 2);
	KV_STR(c->pk, "prefix", prefix);
	KV_BOOL(c->pk, "lifted", lifted);
	return E_OK;
}

/* ---- Pricing a campaign: precheck ---- */

static uint64_t
hash_bytes(uint64_t h, const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char)p[i]) * 0x100000001b3ull;
	return h;
}

/* The key of a group: up to GROUP_KEY_MAX bytes. */
#define GROUP_KEY_MAX 96
struct group_key {
	uint64_t hash;
	size_t len;
	char bytes[GROUP_KEY_MAX];
};

/*
 * A small open-addressing table of groups: entries of `size` bytes, each
 * starting with its struct group_key, the rest the caller's (zero when
 * group_find adds it).
 */
struct group_table {
	char *entries;
	uint32_t *slots;    /* index + 1 into entries, 0 = empty */
	size_t n, cap;      /* entries used, slots (a power of 2) */
	size_t size;        /* of an entry */
};

/* Entry i of t. */
static void *
group_at(const struct group_table *t, size_t i)
{
	return t->entries + i * t->size;
}

/* Returns the group of key (len bytes, at most GROUP_KEY_MAX), adding it.  NULL when out of memory. */
static void *
group_find(struct group_table *t, const char *key, size_t len)
{
	uint64_t h = hash_bytes(0xcbf29ce484222325ull, key, len);
	struct group_key *g;
	size_t i;

	if ((t->n + 1) * 2 > t->cap) {
		size_t cap = t->cap ? t->cap * 2 : 64;
		uint32_t *slots = calloc(cap, sizeof(*slots));
		char *entries = realloc(t->entries, cap / 2 * t->size);

		if (slots == NULL || entries == NULL) {
			free(slots);
			if (entries)
				t->entries = entries;
			return NULL;
		}
		t->entries = entries;
		for (size_t e = 0; e < t->n; e++) {
			for (i = ((struct group_key *)group_at(t, e))->hash & (cap - 1); slots[i]; i = (i + 1) & (cap - 1))
				;
			slots[i] = (uint32_t)e + 1;
		}
		free(t->slots);
		t->slots = slots;
		t->cap = cap;
	}
	for (i = h & (t->cap - 1); t->slots[i]; i = (i + 1) & (t->cap - 1)) {
		g = group_at(t, t->slots[i] - 1);
		if (g->hash == h && g->len == len && memcmp(g->bytes, key, len) == 0)
			return g;
	}
	g = group_at(t, t->n);
	memset(g, 0, t->size);
	g->hash = h;
	g->len = len;
	memcpy(g->bytes, key, len);
	t->slots[i] = (uint32_t)++t->n;
	return g;
}

/* One line of a precheck's breakdown: the messages priced at one prefix and route. */
struct price_group {
	struct group_key key; /* prefix \0 route */
	struct rate_hit hit;
	uint64_t count;
};

/* A campaign priced as precheck prices it (campaign_price). */
struct campaign {
	struct group_table groups;       /* what each prefix and route costs, and how many */
	msgpack_sbuffer unpriced, invalid, blocked;
	msgpack_packer upk, ipk, bpk;
	uint32_t nunpriced, ninvalid, nblocked;
	uint64_t messages;               /* priced */
	int64_t required;                /* their cost, in the wallet's currency */
};

static void
campaign_free(struct campaign *cp)
{
	msgpack_sbuffer_destroy(&cp->unpriced);
	msgpack_sbuffer_destroy(&cp->invalid);
	msgpack_sbuffer_destroy(&cp->blocked);
	free(cp->groups.entries);
	free(cp->groups.slots);
}

/*
 * Prices recipients (a list of numbers, or {to, count} maps) of segments
 * each on channel for wallet w, as its charges at `at` would be: each priced
 * number's per-message cost, times its count, added up in cp->required.
 * Numbers that are not E.164 go to invalid, blocked ones (w's prefixes) to
 * blocked, those without a rate to unpriced; the rest is still priced.
 * The caller frees cp (campaign_free) whatever this returns.
 */
static int
campaign_price(struct call *c, const struct wallet *w, struct str channel, uint32_t segments, int64_t at,
    const msgpack_object *rec, struct campaign *cp)
{
	int rc = E_OK;

	memset(cp, 0, sizeof(*cp));
	cp->groups.size = sizeof(struct price_group);
	msgpack_sbuffer_init(&cp->unpriced);
	msgpack_sbuffer_init(&cp->invalid);
	msgpack_sbuffer_init(&cp->blocked);
	msgpack_packer_init(&cp->upk, &cp->unpriced, msgpack_sbuffer_write);
	msgpack_packer_init(&cp->ipk, &cp->invalid, msgpack_sbuffer_write);
	msgpack_packer_init(&cp->bpk, &cp->blocked, msgpack_sbuffer_write);
	if (rec == NULL || rec->type != MSGPACK_OBJECT_ARRAY)
		return fail(c, E_INVALID_ARGUMENT, "recipients", "recipients must be a list");
	for (uint32_t i = 0; i < rec->via.array.size && rc == E_OK; i++) {
		const msgpack_object *r = &rec->via.array.ptr[i], *to = r, *net = NULL;
		uint64_t count = 1;
		char digits[16], prefix[16], plus[17] = "+", keybuf[GROUP_KEY_MAX], mccmnc[7] = "", network[8];
		size_t n = 0, key;
		struct guard_block b;
		struct rate_hit hit;
		struct price_group *g;
		int64_t sub;
		int err = 0;

		if (r->type == MSGPACK_OBJECT_MAP) {
			const msgpack_object *co = map_get(r, "count");

			to = map_get(r, "to");
			net = map_get(r, "mccmnc");
			if (co && (co->type != MSGPACK_OBJECT_POSITIVE_INTEGER || co->via.u64 > UINT32_MAX))
				return fail(c, E_INVALID_ARGUMENT, "recipients", "count must be a positive integer");
			if (net && net->type != MSGPACK_OBJECT_NIL && mccmnc_read(net, mccmnc) != 0)
				return fail(c, E_INVALID_ARGUMENT, "recipients", "%s", MCCMNC_RULE);
			count = co ? co->via.u64 : 1;
		}
		if (to && to->type == MSGPACK_OBJECT_STR)
			n = e164_digits((struct str){ to->via.str.ptr, to->via.str.size }, digits);
		if (n == 0) {
			if (to && to->type == MSGPACK_OBJECT_STR)
				msgpack_pack_str_with_body(&cp->ipk, to->via.str.ptr, to->via.str.size > 64 ? 64 : to->via.str.size);
			else
				msgpack_pack_nil(&cp->ipk);
			cp->ninvalid++;
			continue;
		}
		if (count == 0)
			continue;
		if (destination_blocked(w, digits, prefix) ||
		    (guard_on(w, digits) && guard_suspended(c->txn, w, digits, n, now_seconds(), prefix, &b))) {
			pack_cstr(&cp->bpk, strcat(plus, digits));
			cp->nblocked++;
			continue;
		}
		rc = rate_find(c->txn, (struct str){ w->plan, strlen(w->plan) }, channel, digits, n, mccmnc,
		    (struct str){ NULL, 0 }, w->currency, segments, at, &hit, &err);
		if (rc < 0)
			return store_error(c, err);
		if (rc != E_OK) {
			pack_cstr(&cp->upk, strcat(plus, digits));
			cp->nunpriced++;
			rc = E_OK;
			continue;
		}
		if (hit.mccmnc[0])
			network_key(network, hit.mccmnc);
		key = (size_t)snprintf(keybuf, sizeof(keybuf), "%s%c%s", hit.mccmnc[0] ? network : hit.prefix, 0, hit.route);
		if ((g = group_find(&cp->groups, keybuf, key < sizeof(keybuf) ? key : sizeof(keybuf) - 1)) == NULL)
			return fail(c, E_BUSY, NULL, "Out of memory");
		if (g->count == 0)
			g->hit = hit;
		g->count += count;
		cp->messages += count;
		if (__builtin_mul_overflow(hit.cost, (int64_t)count, &sub) ||
		    __builtin_add_overflow(cp->required, sub, &cp->required))
			rc = fail(c, E_INVALID_ARGUMENT, "recipients", "the campaign's cost is out of range");
	}
	return rc;
}

static int hold_ref_check(struct call *c, const char *name, struct str ref);
static int hold_find(struct call *c, const char *name, const struct wallet *w, struct str ref, int64_t amount,
    uint64_t expires_in, struct hold *h, int *found);
static int hold_place(struct call *c, struct wallet *w, struct str id, struct str ref, struct str desc, int64_t amount,
    uint64_t expires_in, int64_t now, struct hold *h);
static void hold_pack(msgpack_packer *pk, const struct hold *h, const char *currency, int64_t now, int replayed);

/*
 * precheck: prices a campaign (campaign_price) and says whether the wallet
 * may spend it now, and which of its limits it would cross; changes nothing
 * unless it names a hold.  sufficient: the whole campaign can go (every
 * recipient valid, priced and not blocked, no limit crossed, and the money
 * there); missing: how much more money it needs.  With hold (a campaign in
 * one step): a sufficient campaign's money is held under that ref in the
 * same commit, answered under hold (nil when not sufficient); the same ref
 * again answers the hold with replayed, its money counted as the
 * campaign's.
 */
static int
m_precheck(struct call *c)
{
	const msgpack_object *rec = param(c, "recipients");
	struct str id, channel, ref;
	struct wallet w;
	struct campaign cp;
	struct hold h;
	uint32_t segments;
	uint64_t expires_in = HOLD_TTL_DEFAULT;
	int64_t now = now_seconds(), held, available, reserved = 0, at;
	int rc, crossed, sufficient, found = 0;

	if ((rc = p_wallet(c, &id)) || (rc = p_channel(c, &channel)) ||
	    (rc = p_segments(c, channel, &segments)) || (rc = p_at(c, &at)) ||
	    (rc = p_str(c, "hold", 0, REF_MAX, &ref)) || (rc = p_uint(c, "expires_in", 0, 1, HOLD_TTL_MAX, &expires_in)))
		return rc;
	if (rec == NULL || rec->type != MSGPACK_OBJECT_ARRAY)
		return fail(c, E_INVALID_ARGUMENT, "recipients", "recipients must be a list");
	if (ref.p && (rc = hold_ref_check(c, "hold", ref)))
		return rc;
	if (ref.p && param(c, "at"))
		return fail(c, E_INVALID_ARGUMENT, "at", "a hold is priced now: at goes without hold");
	if (!ref.p && param(c, "expires_in"))
		return fail(c, E_INVALID_ARGUMENT, "expires_in", "expires_in goes with hold");
	if ((rc = load_wallet(c, id, &w)))
		return rc;
	if ((rc = wallet_available(c->txn, &w, now, &held, &available)))
		return store_error(c, rc);
	if ((rc = campaign_price(c, &w, channel, segments, at, rec, &cp)) == E_OK && ref.p &&
	    (rc = hold_find(c, "hold", &w, ref, cp.required, expires_in, &h, &found)) == E_OK && found &&
	    h.status == HS_ACTIVE && now < h.expires_at)
		reserved = h.remaining;
	if (rc == E_OK) {
		msgpack_packer *pk = c->pk;

		crossed = limits_exceeded(c, &w, now, cp.required, cp.messages);
		sufficient = cp.required <= available + reserved && !crossed && cp.nunpriced + cp.ninvalid + cp.nblocked == 0;
		if (ref.p && sufficient && !found) {
			if (w.flags & WF_FROZEN)
				rc = fail(c, E_WALLET_FROZEN, "wallet", "Wallet '%.*s' is frozen", (int)id.n, id.p);
			else
				rc = hold_place(c, &w, id, ref, (struct str){ "", 0 }, cp.required, expires_in, now, &h);
			if (rc != E_OK) {
				campaign_free(&cp);
				return rc;
			}
		}
		msgpack_pack_map(pk, 10 + (ref.p != NULL));
		KV_BOOL(pk, "sufficient", sufficient);
		KV_AMOUNT(pk, "required", cp.required);
		KV_AMOUNT(pk, "available", available);
		KV_AMOUNT(pk, "missing", cp.required > available + reserved ? cp.required - available - reserved : 0);
		if (ref.p) {
			KEY(pk, "hold");
			if (sufficient || found)
				hold_pack(pk, &h, w.currency, now, found);
			else
				msgpack_pack_nil(pk);
		}
		KV_STR(pk, "currency", w.currency);
		KEY(pk, "breakdown");
		msgpack_pack_array(pk, cp.groups.n);
		for (size_t i = 0; i < cp.groups.n; i++) {
			const struct price_group *g = group_at(&cp.groups, i);

			msgpack_pack_map(pk, 8);
			rate_where_pack(pk, g->hit.prefix, g->hit.mccmnc);
			KV_STR(pk, "route", g->hit.route);
			KV_U64(pk, "count", g->count);
			KV_AMOUNT(pk, "unit_price", g->hit.price);
			KV_STR(pk, "price_currency", g->hit.currency);
			KV_AMOUNT(pk, "unit_cost", g->hit.cost);
			KV_AMOUNT(pk, "subtotal", g->hit.cost * (int64_t)g->count);
		}
		pack_rows(pk, "unpriced", cp.nunpriced, &cp.unpriced);
		pack_rows(pk, "invalid", cp.ninvalid, &cp.invalid);
		pack_rows(pk, "blocked", cp.nblocked, &cp.blocked);
		KEY(pk, "limit_exceeded");
		if (crossed) {
			msgpack_pack_map(pk, 4);
			KV_STR(pk, "limit", c->limit);
			KV_STR(pk, "max", c->limit_max);
			KV_STR(pk, "used", c->limit_used);
			KV_TIME(pk, "resets_at", c->resets_at);
		} else {
			msgpack_pack_nil(pk);
		}
		msgpack_sbuffer_init(&cp.unpriced); /* pack_rows freed them */
		msgpack_sbuffer_init(&cp.invalid);
		msgpack_sbuffer_init(&cp.blocked);
	}
	campaign_free(&cp);
	return rc;
}

/* ---- Holds ---- */

/* Packs hold h of wallet currency, as the hold methods answer it; replayed unless -1. */
static void
hold_pack(msgpack_packer *pk, const struct hold *h, const char *currency, int64_t now, int replayed)
{
	int status = h->status == HS_ACTIVE && now >= h->expires_at ? HS_EXPIRED : (int)h->status;

	msgpack_pack_map(pk, 10 + (replayed >= 0));
	KV_STR(pk, "hold", h->ref);
	KV_STR(pk, "wallet", h->wallet);
	KV_STR(pk, "currency", currency);
	KV_AMOUNT(pk, "amount", h->amount);
	KV_AMOUNT(pk, "remaining", h->remaining);
	KV_STR(pk, "status", hold_status_names[status]);
	KV_STR(pk, "description", h->description);
	KV_TIME(pk, "created_at", h->created_at);
	KV_TIME(pk, "expires_at", h->expires_at);
	KEY(pk, "closed_at");
	if (status == HS_ACTIVE)
		msgpack_pack_nil(pk);
	else
		pack_time(pk, h->closed_at ? h->closed_at : h->expires_at);
	if (replayed >= 0)
		KV_BOOL(pk, "replayed", replayed);
}

/* A hold's fingerprint for idempotency: its amount and expires_in. */
static uint32_t
hold_fingerprint(int64_t amount, uint64_t expires_in)
{
	uint64_t h = hash_bytes(0xcbf29ce484222325ull, (const char *)&amount, sizeof(amount));

	h = hash_bytes(h, (const char *)&expires_in, sizeof(expires_in));
	return (uint32_t)(h ^ h >> 32);
}

/*
 * hold.create: reserves amount, or what recipients would cost (priced as
 * precheck prices them), of the wallet's available money until
 * expires_at.  Idempotent on ref: the same ref with the same amount and
 * expires_in answers the hold with replayed; another is
 * idempotency_conflict.  A frozen wallet refuses it (it could not charge).
 */
static int
m_hold_create(struct call *c)
{
	const msgpack_object *rec = param(c, "recipients");
	struct str id, ref, desc, channel = { NULL, 0 };
	uint64_t expires_in = HOLD_TTL_DEFAULT;
	uint32_t segments = 1;
	int64_t now = now_seconds(), held, available, amount = 0;
	struct wallet w;
	struct hold h;
	int rc, present, found;

	if ((rc = p_wallet(c, &id)) || (rc = p_str(c, "ref", 1, REF_MAX, &ref)) ||
	    (rc = p_amount(c, "amount", 0, AMOUNT_POSITIVE, &amount, &present)) ||
	    (rc = p_uint(c, "expires_in", 0, 1, HOLD_TTL_MAX, &expires_in)) ||
	    (rc = p_text(c, "description", 0, &desc)))
		return rc;
	if ((rc = hold_ref_check(c, "ref", ref)))
		return rc;
	if ((present == 1) == (rec != NULL))
		return fail(c, E_INVALID_ARGUMENT, "amount", "give amount, or channel and recipients, one of them");
	if (desc.n >= sizeof(h.description))
		return fail(c, E_INVALID_ARGUMENT, "description", "description is longer than %zu bytes",
		    sizeof(h.description) - 1);
	if (rec && ((rc = p_channel(c, &channel)) || (rc = p_segments(c, channel, &segments))))
		return rc;
	if (!rec && (param(c, "channel") || param(c, "segments") || param(c, "text")))
		return fail(c, E_INVALID_ARGUMENT, "recipients", "channel, segments and text go with recipients");
	if ((rc = load_wallet(c, id, &w)))
		return rc;
	if (rec) {
		struct campaign cp;

		rc = campaign_price(c, &w, channel, segments, now, rec, &cp);
		amount = cp.required;
		campaign_free(&cp);
		if (rc)
			return rc;
		if (amount == 0)
			return fail(c, E_INVALID_ARGUMENT, "recipients", "no recipient could be priced: nothing to hold");
	}
	if (w.flags & WF_SHARED)
		return fail_shared(c, "wallet", id, &w);
	if ((rc = hold_find(c, "ref", &w, ref, amount, expires_in, &h, &found)) || found) {
		if (rc == E_OK)
			hold_pack(c->pk, &h, w.currency, now, 1);
		return rc;
	}
	if (w.flags & WF_FROZEN)
		return fail(c, E_WALLET_FROZEN, "wallet", "Wallet '%.*s' is frozen", (int)id.n, id.p);
	if ((rc = wallet_available(c->txn, &w, now, &held, &available)))
		return store_error(c, rc);
	if (amount > available)
		return fail_insufficient(c, amount, available > 0 ? available : 0, w.currency);
	if ((rc = hold_place(c, &w, id, ref, desc, amount, expires_in, now, &h)))
		return rc;
	hold_pack(c->pk, &h, w.currency, now, 0);
	return E_OK;
}

/* Checks a new hold's ref (param name). */
static int
hold_ref_check(struct call *c, const char *name, struct str ref)
{
	if (ref.n == 0)
		return fail(c, E_INVALID_ARGUMENT, name, "%s must not be empty", name);
	if (ref.n >= 4 && memcmp(ref.p, "dlr:", 4) == 0)
		return fail(c, E_INVALID_ARGUMENT, name, "holds named dlr:... are the charges waiting for their reports");
	return E_OK;
}

/*
 * Looks up hold ref (param name) of w for a create that may be a replay:
 * *found with *h when it was made with amount and expires_in;
 * idempotency_conflict when it was made with others.
 */
static int
hold_find(struct call *c, const char *name, const struct wallet *w, struct str ref, int64_t amount,
    uint64_t expires_in, struct hold *h, int *found)
{
	int rc;

	*found = 0;
	if ((rc = hold_get(c->txn, w->number, ref, h)) == MDB_NOTFOUND)
		return E_OK;
	if (rc != 0)
		return store_error(c, rc);
	if (h->fingerprint != hold_fingerprint(amount, expires_in)) {
		snprintf(c->hold, sizeof(c->hold), "%.*s", (int)ref.n, ref.p);
		return fail(c, E_IDEMPOTENCY_CONFLICT, name, "hold '%.*s' was made with other params", (int)ref.n, ref.p);
	}
	*found = 1;
	return E_OK;
}

/* Holds amount of wallet id (w, written) under ref until now + expires_in: the caller checked the money. */
static int
hold_place(struct call *c, struct wallet *w, struct str id, struct str ref, struct str desc, int64_t amount,
    uint64_t expires_in, int64_t now, struct hold *h)
{
	int rc;

	memset(h, 0, sizeof(*h));
	h->amount = h->remaining = amount;
	h->created_at = now;
	h->expires_at = now + (int64_t)expires_in;
	h->status = HS_ACTIVE;
	h->fingerprint = hold_fingerprint(amount, expires_in);
	memcpy(h->wallet, id.p, id.n);
	memcpy(h->ref, ref.p, ref.n);
	memcpy(h->description, desc.p ? desc.p : "", desc.n);
	w->held += amount;
	if (w->holds_active++ == 0 || h->expires_at < w->hold_expiry)
		w->hold_expiry = h->expires_at;
	if ((rc = hold_put(c->txn, w->number, h, 1)) || (rc = note_on_crossing(c, id, w, w->balance, 0)) ||
	    (rc = wallet_put(c->txn, id, w)))
		return store_error(c, rc);
	if (h->expires_at < store.next_expiry)
		store.next_expiry = h->expires_at;
	return E_OK;
}

/* hold.release: ends an active hold; what remains of it is available again. */
static int
m_hold_release(struct call *c)
{
	struct str id, ref;
	int64_t now = now_seconds();
	struct wallet w;
	struct hold h;
	int rc;

	if ((rc = p_wallet(c, &id)) || (rc = p_str(c, "hold", 1, REF_MAX, &ref)) ||
	    (rc = load_wallet(c, id, &w)) || (rc = load_open_hold(c, &w, ref, now, &h)))
		return rc;
	if (ref.n >= 4 && memcmp(ref.p, "dlr:", 4) == 0)
		return fail(c, E_INVALID_ARGUMENT, "hold", "a charge waiting for its report settles with it (delivery)");
	h.status = HS_RELEASED;
	h.closed_at = now;
	if ((rc = hold_put(c->txn, w.number, &h, 1)) || (rc = wallet_holds_recount(c->txn, &w)) ||
	    (rc = wallet_put(c->txn, id, &w)))
		return store_error(c, rc);
	hold_pack(c->pk, &h, w.currency, now, -1);
	return E_OK;
}

static int
m_hold_get(struct call *c)
{
	struct str id, ref;
	struct wallet w;
	struct hold h;
	int rc;

	if ((rc = p_wallet(c, &id)) || (rc = p_str(c, "hold", 1, REF_MAX, &ref)) || (rc = load_wallet(c, id, &w)))
		return rc;
	snprintf(c->hold, sizeof(c->hold), "%.*s", (int)ref.n, ref.p);
	if ((rc = hold_get(c->txn, w.number, ref, &h)) == MDB_NOTFOUND)
		return fail(c, E_UNKNOWN_HOLD, "hold", "No hold '%.*s' in this wallet", (int)ref.n, ref.p);
	if (rc)
		return store_error(c, rc);
	hold_pack(c->pk, &h, w.currency, now_seconds(), -1);
	return E_OK;
}

/* What hold.list packs: the holds of one status (-1: any). */
struct hold_lister {
	msgpack_packer pk;
	const char *currency;
	int64_t now;
	int status;
	uint32_t n;
	struct call *c;
	int over;
};

static int
hold_list_one(const struct hold *h, void *arg)
{
	struct hold_lister *l = arg;
	int status = h->status == HS_ACTIVE && l->now >= h->expires_at ? HS_EXPIRED : (int)h->status;

	if ((l->over = over_budget(l->c)))
		return 1;
	if (l->status >= 0 && status != l->status)
		return 0;
	hold_pack(&l->pk, h, l->currency, l->now, -1);
	l->n++;
	return 0;
}

/* hold.list: a wallet's holds, by ref, of one status or all. */
static int
m_hold_list(struct call *c)
{
	struct str id, status;
	struct hold_lister l = { .now = now_seconds(), .status = -1, .c = c };
	msgpack_sbuffer rows;
	struct wallet w;
	int rc;

	if ((rc = p_wallet(c, &id)) || (rc = p_str(c, "status", 0, 16, &status)) || (rc = load_wallet(c, id, &w)))
		return rc;
	for (int i = 0; status.p && i < 3 && l.status < 0; i++)
		if (strlen(hold_status_names[i]) == status.n && memcmp(hold_status_names[i], status.p, status.n) == 0)
			l.status = i;
	if (status.p && l.status < 0)
		return fail(c, E_INVALID_ARGUMENT, "status", "status must be active, released or expired");
	l.currency = w.currency;
	msgpack_sbuffer_init(&rows);
	msgpack_packer_init(&l.pk, &rows, msgpack_sbuffer_write);
	rc = holds_each(c->txn, w.number, hold_list_one, &l);
	if (rc || l.over) {
		msgpack_sbuffer_destroy(&rows);
		return rc ? store_error(c, rc) : E_OFF_LOOP;
	}
	msgpack_pack_map(c->pk, 1);
	pack_rows(c->pk, "holds", l.n, &rows);
	return E_OK;
}

/* quote: how many one-segment messages an amount buys. */
static int
m_quote(struct call *c)
{
	struct str channel, wid, plan, currency;
	char digits[16], cur[4] = "", mccmnc[7];
	size_t n;
	int64_t amount;
	struct wallet w;
	struct rate_hit hit;
	int64_t at;
	int rc, present;

	if ((rc = p_channel(c, &channel)) || (rc = p_e164(c, "to", digits, &n)) || (rc = p_mccmnc(c, mccmnc)) ||
	    (rc = p_amount(c, "amount", 1, 1, &amount, &present)) ||
	    (rc = p_str(c, "wallet", 0, WALLET_ID_MAX, &wid)) || (rc = p_name(c, "plan", 0, 0, &plan)) ||
	    (rc = p_currency(c, "currency", 0, &currency)) || (rc = p_at(c, &at)))
		return rc;
	if (wid.p) {
		if ((rc = load_wallet(c, wid, &w)))
			return rc;
		if (!plan.p)
			plan = (struct str){ w.plan, strlen(w.plan) };
		memcpy(cur, w.currency, 4);
	} else if (!plan.p) {
		return fail(c, E_INVALID_ARGUMENT, "wallet", "give a wallet or a plan");
	}
	if (currency.p)
		memcpy(cur, currency.p, 3), cur[3] = '\0';
	if (!cur[0])
		return fail(c, E_INVALID_ARGUMENT, "currency", "currency is required with a plan");
	if ((rc = rate_find_or_fail(c, plan, channel, digits, n, mccmnc, (struct str){ NULL, 0 }, cur, 1, at, &hit)))
		return rc;
	msgpack_pack_map(c->pk, 6);
	KV_U64(c->pk, "messages", hit.cost > 0 ? (uint64_t)(amount / hit.cost) : 0);
	KV_AMOUNT(c->pk, "unit_cost", hit.cost);
	KV_STR(c->pk, "currency", cur);
	rate_where_pack(c->pk, hit.prefix, hit.mccmnc);
	KV_STR(c->pk, "route", hit.route);
	return E_OK;
}

/* ---- Top-ups ---- */

/* Copies what a top-up URL template needs, URL-encoded, into out. */
static void
url_encode_append(char *out, size_t cap, const char *s)
{
	size_t n = strlen(out);

	for (; *s && n + 4 < cap; s++) {
		if (isalnum((unsigned char)*s) || strchr("-._~", *s))
			out[n++] = *s;
		else
			n += (size_t)snprintf(out + n, cap - n, "%%%02X", (unsigned char)*s);
	}
	out[n] = '\0';
}

/* Expands config.topup_url for tp into tp->checkout_url. */
static void
topup_url(struct topup *tp)
{
	char amount[32];
	const char *p = config.topup_url;
	size_t cap = sizeof(tp->checkout_url);

	tp->checkout_url[0] = '\0';
	amount_format(tp->amount, amount, 2);
	while (*p) {
		const char *value = NULL;
		size_t skip = 0, n;

		if (strncmp(p, "{ref}", 5) == 0)
			value = tp->ref, skip = 5;
		else if (strncmp(p, "{amount}", 8) == 0)
			value = amount, skip = 8;
		else if (strncmp(p, "{currency}", 10) == 0)
			value = tp->currency, skip = 10;
		else if (strncmp(p, "{wallet}", 8) == 0)
			value = tp->wallet, skip = 8;
		if (value) {
			url_encode_append(tp->checkout_url, cap, value);
			p += skip;
			continue;
		}
		n = strlen(tp->checkout_url);
		if (n + 1 < cap) {
			tp->checkout_url[n] = *p;
			tp->checkout_url[n + 1] = '\0';
		}
		p++;
	}
}

/* Packs a top-up; a pending one past expires_at shows as expired. */
static void
topup_pack(msgpack_packer *pk, const struct topup *tp)
{
	uint32_t status = tp->status;
	int n = 10;

	if (status == TS_PENDING && now_seconds() >= tp->expires_at)
		status = TS_EXPIRED;
	if (tp->status == TS_PAID)
		n += 7;
	if (tp->problem_at)
		n++;
	msgpack_pack_map(pk, (size_t)n);
	KV_STR(pk, "ref", tp->ref);
	KV_STR(pk, "wallet", tp->wallet);
	KV_AMOUNT(pk, "amount", tp->amount);
	KV_STR(pk, "currency", tp->currency);
	KV_STR(pk, "status", topup_status_names[status]);
	KV_STR(pk, "checkout_url", tp->checkout_url);
	KV_TIME(pk, "created_at", tp->created_at);
	KV_TIME(pk, "expires_at", tp->expires_at);
	KV_BOOL(pk, "late", tp->late);
	KV_BOOL(pk, "auto", tp->automatic);
	if (tp->status == TS_PAID) {
		KV_TIME(pk, "paid_at", tp->paid_at);
		KV_AMOUNT(pk, "paid_amount", tp->paid_amount);
		KV_STR(pk, "paid_currency", tp->paid_currency);
		KV_AMOUNT(pk, "credited", tp->credited);
		KV_STR(pk, "provider", tp->provider);
		KV_STR(pk, "provider_ref", tp->provider_ref);
		KV_U64(pk, "txn", tp->txn_id);
	}
	if (tp->problem_at) { /* the last payment reported that could not be credited */
		KEY(pk, "problem");
		msgpack_pack_map(pk, 3);
		KV_STR(pk, "code", tp->problem_code);
		KV_STR(pk, "message", tp->problem_message);
		KV_TIME(pk, "at", tp->problem_at);
	}
}

/* Loads the top-up named by the ref param. */
static int
load_topup(struct call *c, struct topup *tp, struct str *ref)
{
	MDB_val k, v;
	int rc;

	if ((rc = p_str(c, "ref", 1, sizeof(tp->ref) - 1, ref)))
		return rc;
	k = (MDB_val){ ref->n, (void *)ref->p };
	if (ref->n == 0 || (rc = mdb_get(c->txn, store.topups, &k, &v)) == MDB_NOTFOUND)
		return fail(c, E_UNKNOWN_TOPUP, "ref", "No top-up '%.*s'", (int)ref->n, ref->p);
	if (rc)
		return store_error(c, rc);
	record_copy(tp, sizeof(*tp), v);
	return E_OK;
}

static int
topup_put(struct call *c, const struct topup *tp)
{
	MDB_val k = { strlen(tp->ref), (void *)tp->ref }, v = { sizeof(*tp), (void *)tp };
	int rc = captured_put(c->txn, store.topups, &k, &v, 0);

	return rc ? store_error(c, rc) : E_OK;
}

static int
m_topup_create(struct call *c)
{
	struct str id;
	struct wallet w;
	struct topup tp;
	int rc, present;

	memset(&tp, 0, sizeof(tp));
	if ((rc = p_wallet(c, &id)) || (rc = p_amount(c, "amount", 1, 1, &tp.amount, &present)) ||
	    (rc = load_wallet(c, id, &w)))
		return rc;
	if (w.flags & WF_FROZEN)
		return fail(c, E_WALLET_FROZEN, "wallet", "Wallet '%.*s' is frozen", (int)id.n, id.p);
	if (topup_ref(tp.ref))
		return fail(c, E_INTERNAL, NULL, "No randomness for a reference");
	memcpy(tp.wallet, id.p, id.n);
	memcpy(tp.currency, w.currency, 4);
	tp.created_at = now_seconds();
	tp.expires_at = tp.created_at + config.topup_ttl;
	tp.status = TS_PENDING;
	topup_url(&tp);
	if ((rc = topup_put(c, &tp)))
		return rc;
	topup_pack(c->pk, &tp);
	return E_OK;
}

/* Packs topup.confirm's answer: the top-up, its credit (t, just made, or on a
 * replay its stored map raw), whether this was a replay. */
static void
confirm_pack(msgpack_packer *pk, const struct topup *tp, const struct txn *t, MDB_val raw)
{
	msgpack_pack_map(pk, 3);
	KEY(pk, "topup");
	topup_pack(pk, tp);
	KEY(pk, "transaction");
	if (t)
		txn_pack(pk, t, -1);
	else
		pk->callback(pk->data, raw.mv_data, raw.mv_size);
	KV_BOOL(pk, "replayed", t == NULL);
}

/*
 * Keeps why a payment the gateway reported could not be credited (c's
 * error) in top-up tp, and a payment_problem notification for ops_emails:
 * a payment is never dropped unseen.  The one method that writes and then
 * answers an error: its writes are this record, by design.  Returns c's
 * code, or the store error.
 */
static int
topup_problem(struct call *c, struct topup *tp, struct wallet *w, int64_t paid, struct str currency,
    struct str provider_ref)
{
	struct str wallet = { tp->wallet, strlen(tp->wallet) };
	int code = c->code, rc;
	struct note n;

	tp->problem_at = now_seconds();
	snprintf(tp->problem_code, sizeof(tp->problem_code), "%s", error_name(code));
	snprintf(tp->problem_message, sizeof(tp->problem_message), "%.*s", (int)sizeof(tp->problem_message) - 1,
	    c->message);
	memset(&n, 0, sizeof(n));
	n.kind = NK_PAYMENT_PROBLEM;
	n.to_ops = 1;
	n.amount = paid;
	memcpy(n.currency, currency.p, 3);
	{
		/* what ops read: the gateway's reference, the currency paid, why */
		struct text t = { n.provider_ref, 0, sizeof(n.provider_ref) };

		text_add(&t, provider_ref.p, provider_ref.n);
		text_add(&t, " (", 2);
		text_add(&t, currency.p, 3);
		text_add(&t, "; ", 2);
		text_add(&t, tp->problem_message, strlen(tp->problem_message));
		text_add(&t, ")", 1);
	}
	if ((rc = topup_put(c, tp)))
		return rc; /* a store error, in c */
	if ((rc = note_add(c, wallet, w, &n)) || (rc = wallet_put(c->txn, wallet, w)))
		return store_error(c, rc);
	return code;
}

/*
 * topup.confirm: credits what the gateway says was paid, once, in the same
 * commit that marks the top-up paid.  A later confirm answers the first.  A
 * cancelled or expired top-up is still credited (the customer paid), flagged
 * late for staff.
 */
static int
m_topup_confirm(struct call *c)
{
	struct str ref, provider, provider_ref, currency;
	struct topup tp;
	struct wallet w;
	struct txn t;
	int64_t paid, credited;
	int err = 0;
	MDB_val raw;
	int rc, present;

	memset(&t, 0, sizeof(t));
	if ((rc = load_topup(c, &tp, &ref)) || (rc = p_amount(c, "amount", 1, 1, &paid, &present)) ||
	    (rc = p_name(c, "provider", 1, 0, &provider)) ||
	    (rc = p_str(c, "provider_ref", 1, REF_MAX, &provider_ref)) ||
	    (rc = p_currency(c, "currency", 0, &currency)))
		return rc;
	if (tp.status == TS_PAID) {
		if ((rc = txn_get(c->txn, tp.txn_id, &raw)))
			return store_error(c, rc);
		confirm_pack(c->pk, &tp, NULL, raw);
		return E_OK;
	}
	if ((rc = load_wallet(c, (struct str){ tp.wallet, strlen(tp.wallet) }, &w)))
		return rc;
	if (currency.p == NULL)
		currency = (struct str){ w.currency, 3 };
	rc = fx_convert(c->txn, paid, (char[4]){ currency.p[0], currency.p[1], currency.p[2], 0 },
	    w.currency, &credited, &err);
	if (rc < 0)
		return store_error(c, err);
	if (rc == E_NO_FX_RATE) {
		fail(c, E_NO_FX_RATE, "currency", "No exchange rate from %.3s to %s", currency.p, w.currency);
		return topup_problem(c, &tp, &w, paid, currency, provider_ref);
	}
	if (rc != E_OK || credited <= 0 || __builtin_add_overflow(w.balance, credited, &w.balance)) {
		fail(c, E_INVALID_ARGUMENT, "amount", "amount is out of range");
		return topup_problem(c, &tp, &w, paid, currency, provider_ref);
	}
	tp.late = tp.status == TS_CANCELLED || now_seconds() >= tp.expires_at;
	tp.status = TS_PAID;
	tp.paid_at = now_seconds();
	tp.paid_amount = paid;
	memcpy(tp.paid_currency, currency.p, 3);
	tp.credited = credited;
	snprintf(tp.provider, sizeof(tp.provider), "%.*s", (int)provider.n, provider.p);
	snprintf(tp.provider_ref, sizeof(tp.provider_ref), "%.*s", (int)provider_ref.n, provider_ref.p);

	t.type = T_CREDIT;
	t.wallet = (struct str){ tp.wallet, strlen(tp.wallet) };
	t.amount = credited;
	t.currency = w.currency;
	t.ref = ref;
	t.provider = provider;
	t.provider_ref = provider_ref;
	t.has_actor = 1;
	t.actor_uid = (uint32_t)c->uid;
	t.origin = c->origin;
	if (memcmp(currency.p, w.currency, 3) != 0) {
		t.paid_amount = paid;
		t.paid_currency = tp.paid_currency;
	}
	snprintf(t.description, sizeof(t.description), "%s via %c%.*s", tp.automatic ? "Automatic top-up" : "Top up",
	    toupper((unsigned char)provider.p[0]), (int)provider.n - 1, provider.p + 1);
	if ((rc = txn_append(c->txn, &w, &t, &scratch)) ||
	    (w.lots.validity && (rc = lot_add(c->txn, t.wallet, &w, &t, LOT_PAID, now_seconds() + w.lots.validity))))
		return store_error(c, rc);
	if (strcmp(config.receipts, "on") == 0) {
		struct note n;

		memset(&n, 0, sizeof(n));
		n.kind = NK_RECEIPT;
		n.txn_id = t.id;
		n.amount = credited;
		snprintf(n.provider_ref, sizeof(n.provider_ref), "%.*s", (int)provider_ref.n, provider_ref.p);
		if ((rc = note_add(c, t.wallet, &w, &n)))
			return store_error(c, rc);
	}
	if ((rc = wallet_put(c->txn, t.wallet, &w)) ||
	    (rc = event_add(c->txn, "topup_paid", t.wallet, json_pack("{s:s, s:o, s:s, s:o, s:s, s:s#, s:s#, s:I, s:o}",
	    "ref", tp.ref, "amount", json_amount(credited), "currency", w.currency, "paid_amount", json_amount(paid),
	    "paid_currency", tp.paid_currency, "provider", provider.p, (int)provider.n, "provider_ref",
	    provider_ref.p, (int)provider_ref.n, "txn", (json_int_t)t.id, "balance", json_amount(w.balance)))))
		return store_error(c, rc);
	tp.txn_id = t.id;
	if ((rc = topup_put(c, &tp)))
		return rc;
	confirm_pack(c->pk, &tp, &t, (MDB_val){ 0, NULL });
	return E_OK;
}

static int
m_topup_cancel(struct call *c)
{
	struct str ref;
	struct topup tp;
	int rc;

	if ((rc = load_topup(c, &tp, &ref)))
		return rc;
	if (tp.status == TS_PAID)
		return fail(c, E_INVALID_ARGUMENT, "ref", "Top-up '%s' is already paid", tp.ref);
	tp.status = TS_CANCELLED;
	if ((rc = topup_put(c, &tp)))
		return rc;
	topup_pack(c->pk, &tp);
	return E_OK;
}

static int
m_topup_get(struct call *c)
{
	struct str ref;
	struct topup tp;
	int rc;

	if ((rc = load_topup(c, &tp, &ref)))
		return rc;
	topup_pack(c->pk, &tp);
	return E_OK;
}

/* topup.list: a wallet's top-ups (all top-ups are scanned: an admin view). */
static int
m_topup_list(struct call *c)
{
	struct str id, status;
	struct wallet w;
	MDB_cursor *cur;
	MDB_val k, v;
	msgpack_sbuffer rows;
	msgpack_packer rpk;
	uint32_t n = 0;
	int rc, want = -1;

	if ((rc = p_wallet(c, &id)) || (rc = p_str(c, "status", 0, 16, &status)) ||
	    (rc = load_wallet(c, id, &w)))
		return rc;
	for (int s = 0; status.p && s < 4; s++)
		if (strlen(topup_status_names[s]) == status.n && memcmp(topup_status_names[s], status.p, status.n) == 0)
			want = s;
	if (status.p && status.n == 7 && memcmp(status.p, "problem", 7) == 0)
		want = 4; /* not paid, with a payment that could not be credited */
	if (status.p && want < 0)
		return fail(c, E_INVALID_ARGUMENT, "status", "status must be pending, paid, cancelled, expired or problem");
	if ((rc = mdb_cursor_open(c->txn, store.topups, &cur)))
		return store_error(c, rc);
	msgpack_sbuffer_init(&rows);
	msgpack_packer_init(&rpk, &rows, msgpack_sbuffer_write);
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct topup tp;
		int shown;

		if (over_budget(c)) {
			mdb_cursor_close(cur);
			msgpack_sbuffer_destroy(&rows);
			return E_OFF_LOOP;
		}
		record_copy(&tp, sizeof(tp), v);
		shown = tp.status == TS_PENDING && now_seconds() >= tp.expires_at ? TS_EXPIRED : (int)tp.status;
		if (want == 4 && tp.status != TS_PAID && tp.problem_at)
			shown = 4;
		if (strlen(tp.wallet) != id.n || memcmp(tp.wallet, id.p, id.n) != 0 || (want >= 0 && shown != want))
			continue;
		topup_pack(&rpk, &tp);
		n++;
	}
	mdb_cursor_close(cur);
	msgpack_pack_map(c->pk, 1);
	pack_rows(c->pk, "topups", n, &rows);
	return E_OK;
}

/* ---- Manual changes and refunds ---- */

/* credit and debit: a manual change by staff. */
static int
manual_change(struct call *c, int type)
{
	struct str id, reason;
	struct wallet w;
	struct txn t;
	int64_t amount, before, expires_at = LOT_NEVER;
	uint64_t expires_in = 0;
	uint32_t kind = LOT_PAID;
	struct str kind_s;
	int rc, present;

	memset(&t, 0, sizeof(t));
	if ((rc = p_wallet(c, &id)) || (rc = p_amount(c, "amount", 1, 1, &amount, &present)) ||
	    (rc = p_text(c, "reason", 1, &reason)) || (rc = p_actor(c, &t)) ||
	    (rc = p_uint(c, "expires_in", 0, 1, 3650, &expires_in)) || (rc = p_str(c, "kind", 0, 8, &kind_s)))
		return rc;
	if (kind_s.p && !(kind_s.n == 4 && memcmp(kind_s.p, "paid", 4) == 0) &&
	    !(kind_s.n == 5 && memcmp(kind_s.p, "promo", 5) == 0))
		return fail(c, E_INVALID_ARGUMENT, "kind", "kind must be paid or promo");
	if (kind_s.p && kind_s.n == 5)
		kind = LOT_PROMO;
	if (expires_in)
		expires_at = now_seconds() + (int64_t)expires_in * 86400;
	if (reason.n == 0)
		return fail(c, E_INVALID_ARGUMENT, "reason", "reason must not be empty");
	if ((rc = load_wallet(c, id, &w)))
		return rc;
	before = w.balance;
	if (type == T_MANUAL_DEBIT) {
		int64_t held, available;

		if (w.flags & WF_SHARED)
			return fail_shared(c, "wallet", id, &w);
		if (w.flags & WF_FROZEN)
			return fail(c, E_WALLET_FROZEN, "wallet", "Wallet '%.*s' is frozen", (int)id.n, id.p);
		if ((rc = wallet_available(c->txn, &w, now_seconds(), &held, &available)))
			return store_error(c, rc);
		if (amount > available) /* down to -credit_limit at most, and never into held money */
			return fail_insufficient(c, amount, available > 0 ? available : 0, w.currency);
		if ((rc = lots_draw(c->txn, &w, amount, NULL)))
			return store_error(c, rc);
		w.balance -= amount;
		t.amount = -amount;
	} else {
		if (__builtin_add_overflow(w.balance, amount, &w.balance))
			return fail(c, E_INVALID_ARGUMENT, "amount", "amount would overflow the balance");
		t.amount = amount;
	}
	t.type = type;
	t.wallet = id;
	t.currency = w.currency;
	snprintf(t.description, sizeof(t.description), "%.*s", (int)reason.n, reason.p);
	if ((rc = txn_append(c->txn, &w, &t, &scratch)) ||
	    ((expires_in || kind == LOT_PROMO) && (rc = lot_add(c->txn, id, &w, &t, kind, expires_at))) ||
	    (rc = note_on_crossing(c, id, &w, before, t.id)) ||
	    (rc = wallet_put(c->txn, id, &w)))
		return store_error(c, rc);
	txn_pack(c->pk, &t, -1);
	return E_OK;
}

static int m_credit(struct call *c) { return manual_change(c, T_MANUAL_CREDIT); }
static int m_debit(struct call *c) { return manual_change(c, T_MANUAL_DEBIT); }

/* Packs a transfer's answer: {transfer_out, transfer_in, replayed} from its transactions' ids. */
static int
transfer_pack(struct call *c, uint64_t out, uint64_t in, int replayed)
{
	MDB_val raw;
	int rc;

	msgpack_pack_map(c->pk, 3);
	KEY(c->pk, "transfer_out");
	if ((rc = txn_get(c->txn, out, &raw)) != 0)
		return store_error(c, rc);
	c->pk->callback(c->pk->data, raw.mv_data, raw.mv_size);
	KEY(c->pk, "transfer_in");
	if ((rc = txn_get(c->txn, in, &raw)) != 0)
		return store_error(c, rc);
	c->pk->callback(c->pk->data, raw.mv_data, raw.mv_size);
	KV_BOOL(c->pk, "replayed", replayed);
	return E_OK;
}

/*
 * transfer: amount from a reseller's wallet to its child's, or back, in
 * one commit: transfer_out on the sender and transfer_in on the receiver,
 * each naming the other (counterpart).  Never more than the sender may
 * spend (a reseller cannot oversell); a frozen sender sends nothing.
 * Idempotent on ref, kept in the sender's refs with the fingerprint
 * "transfer|TO|AMOUNT" (no charge, refund or report takes a transfer's ref).
 */
static int
m_transfer(struct call *c)
{
	struct str from, to, ref, reason;
	struct wallet sender, receiver;
	struct txn out, in;
	char fingerprint[32 + WALLET_ID_MAX], amount_text[32], value[REF_VALUE_MAX];
	unsigned char refkey[8 + REF_MAX];
	int64_t amount, held, available, sender_before, receiver_before;
	size_t flen;
	MDB_val k, v;
	int rc, present;

	memset(&out, 0, sizeof(out));
	if ((rc = p_str(c, "from", 1, WALLET_ID_MAX, &from)) || (rc = p_str(c, "to", 1, WALLET_ID_MAX, &to)) ||
	    (rc = p_amount(c, "amount", 1, 1, &amount, &present)) || (rc = p_str(c, "ref", 1, REF_MAX, &ref)) ||
	    (rc = p_text(c, "reason", 0, &reason)) || (rc = p_actor(c, &out)))
		return rc;
	if ((rc = load_wallet(c, from, &sender)) || (rc = load_wallet(c, to, &receiver)))
		return rc;
	if (!wallet_child_of(&receiver, from) && !wallet_child_of(&sender, to))
		return fail(c, E_INVALID_ARGUMENT, "to", "a transfer goes between a reseller's wallet and its child's: "
		    "'%.*s' is neither the parent nor a child of '%.*s'", (int)to.n, to.p, (int)from.n, from.p);
	{
		struct text f = { fingerprint, 0, sizeof(fingerprint) };

		text_add(&f, "transfer|", 9);
		text_add(&f, to.p, to.n);
		text_add(&f, "|", 1);
		text_add(&f, amount_text, strlen(amount_format(amount, amount_text, 0)));
		flen = f.n;
	}
	k = ref_key(refkey, ref, sender.number);
	if ((rc = mdb_get(c->txn, store.refs, &k, &v)) == 0) {
		struct ref_entry e;
		struct txn_head h;
		MDB_val rec;
		struct txn t;
		struct txn_text x;

		ref_read(v, &e);
		if (e.fp.n != flen || memcmp(e.fp.p, fingerprint, flen) != 0) {
			c->conflict_txn = e.id;
			return fail(c, E_IDEMPOTENCY_CONFLICT, "ref", "ref '%.*s' was used for something else (txn %" PRIu64 ")",
			    (int)ref.n, ref.p, e.id);
		}
		if ((rc = txn_fetch(c->txn, e.id, &h, &rec)) || (rc = txn_decode(e.id, &h, rec.mv_data, rec.mv_size, &t, &x)))
			return store_error(c, rc);
		return transfer_pack(c, e.id, t.refund_of, 1);
	} else if (rc != MDB_NOTFOUND) {
		return store_error(c, rc);
	}
	if (sender.flags & WF_SHARED)
		return fail_shared(c, "from", from, &sender);
	if (sender.flags & WF_FROZEN)
		return fail(c, E_WALLET_FROZEN, "from", "Wallet '%.*s' is frozen", (int)from.n, from.p);
	if ((rc = wallet_available(c->txn, &sender, now_seconds(), &held, &available)))
		return store_error(c, rc);
	if (amount > available) /* what the sender may spend: a reseller cannot oversell */
		return fail_insufficient(c, amount, available > 0 ? available : 0, sender.currency);
	if (receiver.balance > INT64_MAX - amount)
		return fail(c, E_INVALID_ARGUMENT, "amount", "amount would overflow the balance");
	sender_before = sender.balance;
	receiver_before = receiver.balance;
	out.ref = ref;
	snprintf(out.description, sizeof(out.description), "Transfer to %.*s%s%.*s", (int)to.n, to.p,
	    reason.n ? ": " : "", (int)reason.n, reason.p);
	snprintf(in.description, sizeof(in.description), "Transfer from %.*s%s%.*s", (int)from.n, from.p,
	    reason.n ? ": " : "", (int)reason.n, reason.p);
	if ((rc = transfer_write(c->txn, from, &sender, to, &receiver, amount, &out, &in)))
		return store_error(c, rc);
	{
		struct ref_entry e = { .id = out.id, .fp = { fingerprint, flen } };

		if ((rc = ref_write(value, &e, &v)) || (rc = captured_put(c->txn, store.refs, &k, &v, 0)))
			return store_error(c, rc);
	}
	if ((rc = note_on_crossing(c, from, &sender, sender_before, out.id)) ||
	    (rc = note_on_crossing(c, to, &receiver, receiver_before, in.id)) ||
	    (rc = wallet_put(c->txn, from, &sender)) || (rc = wallet_put(c->txn, to, &receiver)))
		return store_error(c, rc);
	return transfer_pack(c, out.id, in.id, 0);
}

/* Compares the string field name of a decoded map with s. */
static int
obj_str_eq(const msgpack_object *map, const char *name, struct str s)
{
	const msgpack_object *o = map_get(map, name);

	return o && o->type == MSGPACK_OBJECT_STR && o->via.str.size == s.n &&
	    memcmp(o->via.str.ptr, s.p, s.n) == 0;
}

/* The refunds of charge_id so far (ids, *n of them) and what they add up to. */
static int
charge_refunds(MDB_txn *txn, uint64_t charge_id, uint64_t ids[REFUNDS_MAX + 1], size_t *n, int64_t *sum)
{
	MDB_val k = { sizeof(charge_id), &charge_id }, v, rec;
	struct txn_head h;
	int rc;

	*n = 0;
	*sum = 0;
	if ((rc = mdb_get(txn, store.refunds, &k, &v)) == 0) {
		*n = v.mv_size / 8 < REFUNDS_MAX ? v.mv_size / 8 : REFUNDS_MAX;
		memcpy(ids, v.mv_data, *n * 8);
	} else if (rc != MDB_NOTFOUND) {
		return rc;
	}
	for (size_t i = 0; i < *n; i++) {
		if ((rc = txn_fetch(txn, ids[i], &h, &rec)))
			return rc;
		*sum += h.amount;
	}
	return 0;
}

/* refund: gives back exactly what a charge took, at most once. */
/* What charge map (of wallet number) took from lots, into *drawn: its ref's entry keeps it.  0 or an LMDB error. */
static int
charge_lots(MDB_txn *txn, const msgpack_object *map, uint64_t number, struct lot_draws *drawn)
{
	const msgpack_object *ref = map_get(map, "ref");
	unsigned char key[8 + REF_MAX];
	struct ref_entry e;
	MDB_val k, v;
	int rc;

	drawn->n = 0;
	if (ref == NULL || ref->type != MSGPACK_OBJECT_STR || ref->via.str.size > REF_MAX)
		return 0;
	k = ref_key(key, (struct str){ ref->via.str.ptr, ref->via.str.size }, number);
	if ((rc = mdb_get(txn, store.refs, &k, &v)) != 0)
		return rc == MDB_NOTFOUND ? 0 : rc;
	ref_read(v, &e);
	*drawn = e.lots;
	return 0;
}

static int
m_refund(struct call *c)
{
	struct str id, ref, reason, refund_ref;
	uint64_t charge_id = 0, ids[REFUNDS_MAX + 1];
	struct lot_draws drawn;
	struct wallet w;
	struct txn t;
	MDB_val k, v, raw;
	msgpack_unpacked orig;
	const msgpack_object *type, *amount_o, *to, *chan;
	unsigned char rkey[REF_MAX + 4 + 8]; /* a delivery's refund_ref is dlr:REF */
	char fingerprint[16];
	int64_t amount, asked = 0, refunded = 0, left;
	size_t nrefunds = 0;
	int rc, present;

	memset(&t, 0, sizeof(t));
	if ((rc = p_wallet(c, &id)) || (rc = p_uint(c, "txn", 0, 1, UINT64_MAX, &charge_id)) ||
	    (rc = p_str(c, "ref", 0, REF_MAX, &ref)) || (rc = p_text(c, "reason", 0, &reason)) ||
	    (rc = p_actor(c, &t)) || (rc = p_amount(c, "amount", 0, AMOUNT_POSITIVE, &asked, &present)) ||
	    (rc = p_str(c, "refund_ref", 0, REF_MAX + 4, &refund_ref)))
		return rc;
	if (!charge_id == !ref.p)
		return fail(c, E_INVALID_ARGUMENT, "txn", "give txn or ref, one of them");
	if (present == 1 && (refund_ref.p == NULL || refund_ref.n == 0))
		return fail(c, E_INVALID_ARGUMENT, "refund_ref",
		    "a partial refund (amount) needs a refund_ref, its idempotency key");
	if ((rc = load_wallet(c, id, &w)))
		return rc;
	if (ref.p) {
		unsigned char refkey[8 + REF_MAX];

		k = ref_key(refkey, ref, w.number);
		if ((rc = mdb_get(c->txn, store.refs, &k, &v)) == MDB_NOTFOUND)
			return fail(c, E_UNKNOWN_TXN, "ref", "No charge with ref '%.*s' in this wallet",
			    (int)ref.n, ref.p);
		if (rc)
			return store_error(c, rc);
		memcpy(&charge_id, v.mv_data, 8);
	}
	if ((rc = txn_get(c->txn, charge_id, &raw)) == MDB_NOTFOUND)
		return fail(c, E_UNKNOWN_TXN, "txn", "No transaction %" PRIu64, charge_id);
	if (rc)
		return store_error(c, rc);
	msgpack_unpacked_init(&orig);
	if (msgpack_unpack_next(&orig, raw.mv_data, raw.mv_size, NULL) != MSGPACK_UNPACK_SUCCESS) {
		msgpack_unpacked_destroy(&orig);
		log_x(L_ERR, "transaction %" PRIu64 " does not decode", charge_id);
		return fail(c, E_INTERNAL, NULL, "Transaction %" PRIu64 " is unreadable", charge_id);
	}
	if (!obj_str_eq(&orig.data, "wallet", id)) {
		msgpack_unpacked_destroy(&orig);
		return fail(c, E_UNKNOWN_TXN, "txn", "No transaction %" PRIu64 " in this wallet", charge_id);
	}
	type = map_get(&orig.data, "type");
	amount_o = map_get(&orig.data, "amount");
	to = map_get(&orig.data, "to");
	chan = map_get(&orig.data, "channel");
	if (!obj_str_eq(&orig.data, "type", (struct str){ "sms_charge", 10 }) &&
	    !obj_str_eq(&orig.data, "type", (struct str){ "whatsapp_charge", 15 })) {
		rc = fail(c, E_NOT_REFUNDABLE, "txn", "Transaction %" PRIu64 " is a %.*s, not a charge",
		    charge_id, type ? (int)type->via.str.size : 0, type ? type->via.str.ptr : "");
		msgpack_unpacked_destroy(&orig);
		return rc;
	}
	if (amount_o == NULL || amount_o->type != MSGPACK_OBJECT_STR ||
	    amount_parse(amount_o->via.str.ptr, amount_o->via.str.size, &amount) != 0) {
		msgpack_unpacked_destroy(&orig);
		return fail(c, E_INTERNAL, NULL, "Transaction %" PRIu64 " has no amount", charge_id);
	}
	if ((rc = charge_refunds(c->txn, charge_id, ids, &nrefunds, &refunded)) ||
	    (rc = charge_lots(c->txn, &orig.data, w.number, &drawn))) {
		msgpack_unpacked_destroy(&orig);
		return store_error(c, rc);
	}
	left = -amount - refunded;
	/* A refund_ref seen before answers its refund again, if asked the same. */
	memcpy(fingerprint, &charge_id, 8);
	memcpy(fingerprint + 8, &asked, 8);
	if (refund_ref.p && refund_ref.n) {
		k = ref_key(rkey, refund_ref, w.number);
		if ((rc = mdb_get(c->txn, store.rrefs, &k, &v)) == 0) {
			uint64_t orig_id;

			msgpack_unpacked_destroy(&orig);
			memcpy(&orig_id, v.mv_data, 8);
			if (v.mv_size != 8 + sizeof(fingerprint) || memcmp((char *)v.mv_data + 8, fingerprint, 16) != 0) {
				c->conflict_txn = orig_id;
				return fail(c, E_IDEMPOTENCY_CONFLICT, "refund_ref",
				    "refund_ref '%.*s' was used for another refund (txn %" PRIu64 ")",
				    (int)refund_ref.n, refund_ref.p, orig_id);
			}
			if ((rc = txn_get(c->txn, orig_id, &raw)))
				return store_error(c, rc);
			pack_txn_answer(c->pk, raw.mv_data, raw.mv_size, 1);
			return E_OK;
		} else if (rc != MDB_NOTFOUND) {
			msgpack_unpacked_destroy(&orig);
			return store_error(c, rc);
		}
	}
	if (left <= 0) {
		msgpack_unpacked_destroy(&orig);
		c->refunded = charge_id;
		return fail(c, E_ALREADY_REFUNDED, "txn", "Charge %" PRIu64 " was refunded by transaction %" PRIu64
		    "%s", charge_id, nrefunds ? ids[0] : 0, nrefunds > 1 ? " and others" : "");
	}
	if (present == 1 && asked > left) {
		char l[32];

		msgpack_unpacked_destroy(&orig);
		return fail(c, E_INVALID_ARGUMENT, "amount", "only %s of charge %" PRIu64 " is left to refund",
		    amount_format(left, l, 0), charge_id);
	}
	if (nrefunds == REFUNDS_MAX) {
		msgpack_unpacked_destroy(&orig);
		return fail(c, E_INVALID_ARGUMENT, "amount", "a charge takes at most %d refunds", REFUNDS_MAX);
	}
	t.type = T_REFUND;
	t.wallet = id;
	t.amount = present == 1 ? asked : left;
	t.currency = w.currency;
	t.refund_of = charge_id;
	snprintf(t.description, sizeof(t.description), "%s of %s to %.*s (txn %" PRIu64 ")%s%.*s",
	    t.amount < left ? "Partial refund" : "Refund",
	    chan && chan->type == MSGPACK_OBJECT_STR && chan->via.str.size && chan->via.str.ptr[0] == 'w' ?
	    "WhatsApp" : "SMS", to && to->type == MSGPACK_OBJECT_STR ? (int)to->via.str.size : 0,
	    to && to->type == MSGPACK_OBJECT_STR ? to->via.str.ptr : "", charge_id,
	    reason.n ? ": " : "", (int)reason.n, reason.p ? reason.p : "");
	msgpack_unpacked_destroy(&orig);
	if (__builtin_add_overflow(w.balance, t.amount, &w.balance))
		return fail(c, E_INVALID_ARGUMENT, "txn", "the refund would overflow the balance");
	if ((rc = txn_append(c->txn, &w, &t, &scratch)) || (rc = lots_give_back(c->txn, id, &w, &drawn, refunded, t.amount)))
		return store_error(c, rc);
	ids[nrefunds++] = t.id;
	k = (MDB_val){ sizeof(charge_id), &charge_id };
	if ((rc = captured_put(c->txn, store.refunds, &k, &(MDB_val){ nrefunds * 8, ids }, 0)) ||
	    (rc = wallet_put(c->txn, id, &w)))
		return store_error(c, rc);
	if (refund_ref.p && refund_ref.n) {
		char val[8 + sizeof(fingerprint)];

		memcpy(val, &t.id, 8);
		memcpy(val + 8, fingerprint, sizeof(fingerprint));
		k = ref_key(rkey, refund_ref, w.number);
		if ((rc = captured_put(c->txn, store.rrefs, &k, &(MDB_val){ sizeof(val), val }, 0)))
			return store_error(c, rc);
	}
	txn_pack(c->pk, &t, 0);
	return E_OK;
}

/* refund.batch: refunds in one commit (delivery-report storms), each alone. */
static int m_refund_batch(struct call *c) { return batch_run(c, M_REFUND); }

/* ---- Delivery reports ---- */

/* Flags charge id's head TXN_REPORTED, so that history, statements and exports show its report. */
static int
txn_mark_reported(MDB_txn *txn, uint64_t id)
{
	MDB_val k = { sizeof(id), &id }, v;
	struct txn_head h;
	char *copy;
	int rc;

	if ((rc = mdb_get(txn, store.txns, &k, &v)) != 0)
		return rc;
	if (v.mv_size <= sizeof(h))
		return MDB_CORRUPTED;
	if ((copy = malloc(v.mv_size)) == NULL)
		return ENOMEM;
	memcpy(copy, v.mv_data, v.mv_size);
	memcpy(&h, copy, sizeof(h));
	h.flags |= TXN_REPORTED;
	memcpy(copy, &h, sizeof(h));
	rc = captured_put(txn, store.txns, &k, &(MDB_val){ v.mv_size, copy }, 0);
	free(copy);
	return rc;
}

/* Packs a charge's delivery report as delivery answers it: {txn, delivery, refund (or nil), replayed}. */
static int
delivery_pack(struct call *c, uint64_t charge_id, const struct charge_fate *fate, struct str error, int replayed)
{
	MDB_val raw;
	int rc;

	msgpack_pack_map(c->pk, 4);
	KEY(c->pk, "txn");
	if (charge_id)
		msgpack_pack_uint64(c->pk, charge_id);
	else
		msgpack_pack_nil(c->pk); /* a pending charge its report released */
	delivery_report_pack(c->pk, fate, error);
	KEY(c->pk, "refund");
	if (fate->refund == 0)
		msgpack_pack_nil(c->pk);
	else if ((rc = txn_get(c->txn, fate->refund, &raw)))
		return store_error(c, rc);
	else
		pack_txn_answer(c->pk, raw.mv_data, raw.mv_size, replayed);
	KV_BOOL(c->pk, "replayed", replayed);
	return E_OK;
}

/*
 * Refunds amount of charge_id (of ref, in wallet) for a report of status:
 * an ordinary refund, refund_ref dlr:REF, reason "delivery STATUS: ERROR",
 * its id into *refund.  Its answer is not packed: delivery_pack packs it.
 */
static int
delivery_refund(struct call *c, struct str wallet, uint64_t charge_id, struct str ref, int64_t amount, int status,
    struct str error, uint64_t *refund)
{
	msgpack_sbuffer sb, sink;
	msgpack_packer pk;
	msgpack_unpacked u;
	struct call sub = *c;
	char refund_ref[4 + REF_MAX], reason[32 + DELIVERY_ERROR_MAX], amt[32];
	int rc;

	snprintf(refund_ref, sizeof(refund_ref), "dlr:%.*s", (int)ref.n, ref.p);
	snprintf(reason, sizeof(reason), "delivery %s%s%.*s", delivery_status_names[status], error.n ? ": " : "",
	    (int)error.n, error.p);
	msgpack_sbuffer_init(&sb);
	msgpack_sbuffer_init(&sink);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 5);
	KV_SSTR(&pk, "wallet", wallet);
	KV_U64(&pk, "txn", charge_id);
	KV_STR(&pk, "amount", amount_format(amount, amt, 0));
	KV_STR(&pk, "refund_ref", refund_ref);
	KV_STR(&pk, "reason", reason);
	msgpack_unpacked_init(&u);
	msgpack_unpack_next(&u, sb.data, sb.size, NULL);
	msgpack_packer_init(&pk, &sink, msgpack_sbuffer_write);
	sub.params = &u.data;
	sub.pk = &pk;
	if ((rc = m_refund(&sub)) == E_OK) {
		uint64_t ids[REFUNDS_MAX + 1];
		size_t n;
		int64_t sum;

		if ((rc = charge_refunds(c->txn, charge_id, ids, &n, &sum)) == 0)
			*refund = ids[n - 1];
		else
			rc = store_error(c, rc);
	} else { /* its error is the report's */
		msgpack_packer *keep_pk = c->pk;
		const msgpack_object *keep_params = c->params;

		*c = sub;
		c->pk = keep_pk;
		c->params = keep_params;
		if (sub.field == sub.field_buf)
			c->field = c->field_buf;
	}
	msgpack_unpacked_destroy(&u);
	msgpack_sbuffer_destroy(&sb);
	msgpack_sbuffer_destroy(&sink);
	return rc;
}

/*
 * delivery: a message's final delivery report, on the charge of its ref.
 * The first report stands: the same again answers it with replayed, another
 * is idempotency_conflict.  A failed, rejected or expired one refunds by
 * the policy of the rate that priced the charge (kept with it): refund, all
 * of it or failed_parts of its segments; fee, that less the failure fee;
 * keep, nothing; never beyond what is left of the charge.  The report is
 * kept after the charge's fingerprint in refs.
 */
static int
m_delivery(struct call *c)
{
	struct str id, ref, status, error;
	char copy[REF_VALUE_MAX], value[REF_VALUE_MAX];
	unsigned char refkey[8 + REF_MAX];
	uint64_t parts = 0, segments;
	struct ref_entry e;
	struct txn_text x;
	struct wallet w;
	struct txn t;
	MDB_val k, v;
	int rc, st;

	if ((rc = p_wallet(c, &id)) || (rc = p_str(c, "ref", 1, REF_MAX, &ref)) ||
	    (rc = p_str(c, "status", 1, 16, &status)) || (rc = p_uint(c, "failed_parts", 0, 1, 1000, &parts)) ||
	    (rc = p_text(c, "error", 0, &error)))
		return rc;
	for (st = DS_DELIVERED; st < DS__COUNT; st++)
		if (strlen(delivery_status_names[st]) == status.n && memcmp(delivery_status_names[st], status.p, status.n) == 0)
			break;
	if (st == DS__COUNT)
		return fail(c, E_INVALID_ARGUMENT, "status", "status must be delivered, failed, rejected or expired");
	if (parts && st == DS_DELIVERED)
		return fail(c, E_INVALID_ARGUMENT, "failed_parts", "failed_parts goes with a failed, rejected or expired report");
	if (error.n > DELIVERY_ERROR_MAX)
		return fail(c, E_INVALID_ARGUMENT, "error", "error takes at most %d bytes", DELIVERY_ERROR_MAX);
	if ((rc = load_wallet(c, id, &w)))
		return rc;
	k = ref_key(refkey, ref, w.number);
	if ((rc = mdb_get(c->txn, store.refs, &k, &v)) == MDB_NOTFOUND)
		return fail(c, E_UNKNOWN_TXN, "ref", "No charge with ref '%.*s' in this wallet", (int)ref.n, ref.p);
	if (rc)
		return store_error(c, rc);
	if (v.mv_size > REF_VALUE_MAX)
		return fail(c, E_INTERNAL, NULL, "the charge of ref '%.*s' has an unreadable entry", (int)ref.n, ref.p);
	memcpy(copy, v.mv_data, v.mv_size); /* v goes stale once this writes */
	ref_read((MDB_val){ v.mv_size, copy }, &e);
	if (e.fp.n >= 9 && memcmp(e.fp.p, "transfer|", 9) == 0)
		return fail(c, E_UNKNOWN_TXN, "ref", "ref '%.*s' is a transfer's, not a charge's", (int)ref.n, ref.p);
	if (e.fate.status != DS_NONE) {
		if (e.fate.status != (uint32_t)st || e.fate.failed_parts != parts || e.error.n != error.n ||
		    (error.n && memcmp(e.error.p, error.p, error.n) != 0)) {
			c->conflict_txn = e.id;
			return fail(c, E_IDEMPOTENCY_CONFLICT, "status", "the charge of ref '%.*s' already has its report: %s",
			    (int)ref.n, ref.p, delivery_status_names[e.fate.status]);
		}
		return delivery_pack(c, e.id, &e.fate, e.error, 1);
	}
	if (e.record.n) {
		if ((rc = pending_txn(&e, &t, &x)))
			return store_error(c, rc);
		segments = t.segments;
	} else {
		MDB_val raw;
		msgpack_unpacked orig;

		if ((rc = txn_get(c->txn, e.id, &raw)))
			return store_error(c, rc);
		msgpack_unpacked_init(&orig);
		segments = msgpack_unpack_next(&orig, raw.mv_data, raw.mv_size, NULL) == MSGPACK_UNPACK_SUCCESS ?
		    map_u64(&orig.data, "segments") : 0;
		msgpack_unpacked_destroy(&orig);
	}
	if (parts > segments)
		return fail(c, E_INVALID_ARGUMENT, "failed_parts", "the message has %" PRIu64 " parts", segments);
	e.fate.status = (uint32_t)st;
	e.fate.failed_parts = (uint32_t)parts;
	e.fate.at = now_seconds();
	if (e.fate.flags & CF_PENDING) { /* settle on delivery: charged now, or never */
		if ((rc = pending_settle(c->txn, id, ref, &e, st == DS_DELIVERED, delivery_status_names[st], &c->alert)))
			return store_error(c, rc);
	} else if (e.id && st != DS_DELIVERED && e.fate.on_failure != OF_KEEP) {
		uint64_t ids[REFUNDS_MAX + 1];
		struct txn_head h;
		int64_t amount, refunded;
		size_t n;
		MDB_val rec;

		if ((rc = txn_fetch(c->txn, e.id, &h, &rec)) ||
		    (rc = charge_refunds(c->txn, e.id, ids, &n, &refunded)))
			return store_error(c, rc);
		/* failed parts of the charge, rounded half away from zero; the fee is per message */
		amount = parts ? (int64_t)(((i128)-h.amount * (i128)parts * 2 + (i128)segments) / ((i128)segments * 2)) :
		    -h.amount;
		if (e.fate.on_failure == OF_FEE)
			amount -= e.fate.failure_fee;
		if (amount > -h.amount - refunded)
			amount = -h.amount - refunded;
		if (amount > 0 && (rc = delivery_refund(c, id, e.id, ref, amount, st, error, &e.fate.refund)))
			return rc;
	}
	e.error = error;
	if ((rc = ref_write(value, &e, &v)) || (rc = captured_put(c->txn, store.refs, &k, &v, 0)) ||
	    (e.id && (rc = txn_mark_reported(c->txn, e.id))))
		return store_error(c, rc);
	return delivery_pack(c, e.id, &e.fate, error, 0);
}

/* delivery.batch: a storm of reports in one commit, each alone. */
static int m_delivery_batch(struct call *c) { return batch_run(c, M_DELIVERY); }

/* ---- History and notifications ---- */

/*
 * Finds the newest transaction of w with an id below before_id: a binary
 * search over the hist index, then fewer than HIST_STRIDE links.  *id is 0
 * if there is none.  Returns 0 or an LMDB error.
 */
static int
wallet_txn_before(MDB_txn *txn, const struct wallet *w, uint64_t before_id, uint64_t *id)
{
	uint64_t lo = 0, hi = w->txn_count / HIST_STRIDE;
	struct txn_head h;
	int rc;

	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2, at;

		if ((rc = wallet_txn_at(txn, w, mid * HIST_STRIDE + HIST_STRIDE - 1, &at)) != 0)
			return rc;
		if (at < before_id)
			lo = mid + 1;
		else
			hi = mid;
	}
	*id = w->last_txn;
	if (lo < w->txn_count / HIST_STRIDE &&
	    (rc = wallet_txn_at(txn, w, lo * HIST_STRIDE + HIST_STRIDE - 1, id)) != 0)
		return rc;
	while (*id >= before_id) {
		if ((rc = txn_read(txn, *id, &h, NULL)) != 0)
			return rc;
		*id = h.prev;
	}
	return 0;
}

/* What a filtered history keeps: these types (a bit mask, 0 = any), created in [since, until). */
struct history_filter {
	unsigned types;
	int64_t since, until;
};

/* Whether the transaction with head h passes filter f. */
static int
history_match(const struct history_filter *f, const struct txn_head *h)
{
	if (f->types && !(f->types & (1u << h->type)))
		return 0;
	return h->created_at >= f->since && h->created_at < f->until;
}

/* Reads type (one type name, or a list of them) into *mask; absent or nil: 0. */
static int
p_types(struct call *c, unsigned *mask)
{
	const msgpack_object *o = param(c, "type"), *list;
	uint32_t n;

	*mask = 0;
	if (o == NULL || o->type == MSGPACK_OBJECT_NIL)
		return E_OK;
	n = o->type == MSGPACK_OBJECT_ARRAY ? o->via.array.size : 1;
	list = o->type == MSGPACK_OBJECT_ARRAY ? o->via.array.ptr : o;
	for (uint32_t i = 0; i < n; i++) {
		int t = 1;

		while (t < T__COUNT && !(list[i].type == MSGPACK_OBJECT_STR &&
		    list[i].via.str.size == strlen(txn_type_names[t]) &&
		    memcmp(list[i].via.str.ptr, txn_type_names[t], list[i].via.str.size) == 0))
			t++;
		if (t == T__COUNT) { /* the types, from their names */
			char names[256];
			struct text l = { names, 0, sizeof(names) };

			for (t = 1; t < T__COUNT; t++) {
				text_add(&l, ", ", t > 1 ? 2 : 0);
				text_add(&l, txn_type_names[t], strlen(txn_type_names[t]));
			}
			return fail(c, E_INVALID_ARGUMENT, "type", "type must be one of %s", names);
		}
		*mask |= 1u << t;
	}
	return E_OK;
}

/*
 * history: newest first.  Unfiltered, a page starts fewer than HIST_STRIDE
 * links from a hist entry: O(limit) however long the history; before_id is
 * a binary search.  With type/since/until filters the wallet's chain is
 * walked (transaction heads only) to count `total`.
 */
static int
m_history(struct call *c)
{
	struct history_filter f = { 0, INT64_MIN, INT64_MAX };
	struct str id, since_s, until_s;
	uint64_t page = 0, limit = 20, before_id = 0, total = 0, packed = 0, skip, next = 0;
	int filtered, rc;
	struct txn_head h;
	struct wallet w;
	msgpack_sbuffer rows;
	msgpack_packer rpk;

	if ((rc = p_wallet(c, &id)) || (rc = p_page(c, 20, HISTORY_LIMIT_MAX, &page, &limit)) ||
	    (rc = p_uint(c, "before_id", 0, 1, UINT64_MAX, &before_id)) ||
	    (rc = p_str(c, "since", 0, 40, &since_s)) || (rc = p_str(c, "until", 0, 40, &until_s)) ||
	    (rc = p_types(c, &f.types)))
		return rc;
	if (since_s.p && time_parse(since_s, &f.since) != 0)
		return fail(c, E_INVALID_ARGUMENT, "since", "since must be an RFC 3339 time");
	if (until_s.p && time_parse(until_s, &f.until) != 0)
		return fail(c, E_INVALID_ARGUMENT, "until", "until must be an RFC 3339 time");
	if ((rc = load_wallet(c, id, &w)))
		return rc;
	filtered = f.types || since_s.p || until_s.p;
	skip = before_id ? 0 : page * limit;

	/* next: the newest transaction this page may show. */
	if (filtered)
		next = w.last_txn;
	else if (before_id)
		rc = wallet_txn_before(c->txn, &w, before_id, &next);
	else if (skip < w.txn_count)
		rc = wallet_txn_at(c->txn, &w, w.txn_count - 1 - skip, &next);
	if (rc != 0)
		return store_error(c, rc);
	total = w.txn_count;
	msgpack_sbuffer_init(&rows);
	msgpack_packer_init(&rpk, &rows, msgpack_sbuffer_write);
	if (filtered)
		total = 0;
	/* Unfiltered, the walk starts at the page and stops when it is full;
	 * filtered, it walks the whole chain to count total. */
	for (uint64_t matched = 0; next != 0 && (filtered || packed < limit); next = h.prev) {
		MDB_val rec;

		if (over_budget(c)) {
			msgpack_sbuffer_destroy(&rows);
			return E_OFF_LOOP;
		}
		if ((rc = txn_fetch(c->txn, next, &h, &rec)) != 0)
			break;
		if (filtered && !history_match(&f, &h))
			continue;
		total += filtered;
		if (before_id && next >= before_id)
			continue; /* newer than the cursor: counted, not shown */
		if (matched++ < (filtered ? skip : 0) || packed == limit)
			continue; /* on an earlier page, or past this one */
		if ((rc = txn_pack_record(c->txn, &rpk, next, &h, rec)) != 0)
			break;
		packed++;
	}
	if (rc != 0) {
		msgpack_sbuffer_destroy(&rows);
		return store_error(c, rc);
	}
	pack_page(c->pk, "transactions", packed, &rows, total, page, limit);
	return E_OK;
}

/* Reads transaction id's map (txn_read) and decodes it into o, in zone. */
static int
txn_map(MDB_txn *txn, uint64_t id, struct txn_head *h, msgpack_zone *zone, msgpack_object *o)
{
	MDB_val raw;
	size_t off = 0;
	int rc = txn_read(txn, id, h, &raw);

	if (rc)
		return rc;
	msgpack_zone_clear(zone);
	if (msgpack_unpack(raw.mv_data, raw.mv_size, &off, zone, o) != MSGPACK_UNPACK_SUCCESS ||
	    o->type != MSGPACK_OBJECT_MAP)
		return MDB_CORRUPTED;
	return 0;
}

/* A string field of a decoded transaction, or "" (a str over the map's bytes). */
static struct str
txn_field(const msgpack_object *o, const char *name)
{
	const msgpack_object *v = map_get(o, name);

	return v && v->type == MSGPACK_OBJECT_STR ? (struct str){ v->via.str.ptr, v->via.str.size } :
	    (struct str){ "", 0 };
}

/* A wallet in a page of export: the transaction before its first there, and its last there. */
struct export_wallet {
	struct group_key key; /* the wallet */
	uint64_t before, last;
};

/*
 * export: every wallet's transactions in id order, after after_id, limit
 * (at most EXPORT_LIMIT_MAX) at a time: {transactions, last_id, heads};
 * the next page starts after last_id.  Each is the map history answers,
 * with its wallet; heads, the signed head of each wallet in the page.  A
 * seek, then O(limit).
 */
static int
m_export(struct call *c)
{
	uint64_t after = 0, limit = 1000, id = 0, n = 0;
	struct group_table wallets = { .size = sizeof(struct export_wallet) };
	msgpack_sbuffer rows;
	msgpack_packer rpk;
	msgpack_zone *zone;
	MDB_cursor *cur;
	MDB_val k, v, rec;
	int rc;

	if ((rc = p_uint(c, "after_id", 0, 0, UINT64_MAX - 1, &after)) ||
	    (rc = p_uint(c, "limit", 0, 1, EXPORT_LIMIT_MAX, &limit)))
		return rc;
	if ((zone = msgpack_zone_new(2048)) == NULL)
		return fail(c, E_BUSY, NULL, "Out of memory");
	if ((rc = mdb_cursor_open(c->txn, store.txns, &cur)) != 0) {
		msgpack_zone_free(zone);
		return store_error(c, rc);
	}
	msgpack_sbuffer_init(&rows);
	msgpack_packer_init(&rpk, &rows, msgpack_sbuffer_write);
	id = after + 1;
	k = (MDB_val){ sizeof(id), &id };
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0 && n < limit;
	    rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct txn_head h;
		struct export_wallet *e;
		struct str wallet;
		msgpack_object o;

		if (over_budget(c)) {
			rc = E_OFF_LOOP;
			break;
		}
		memcpy(&id, k.mv_data, sizeof(id));
		if ((rc = txn_split(v, &h, &rec)) != 0 || (rc = txn_pack_record(c->txn, &rpk, id, &h, rec)) != 0 ||
		    (rc = txn_map(c->txn, id, &h, zone, &o)) != 0)
			break;
		wallet = txn_field(&o, "wallet");
		if ((e = group_find(&wallets, wallet.p, wallet.n)) == NULL) {
			rc = ENOMEM;
			break;
		}
		if (e->last == 0)
			e->before = h.prev;
		e->last = after = id;
		n++;
	}
	mdb_cursor_close(cur);
	msgpack_zone_free(zone);
	if (rc == 0 || rc == MDB_NOTFOUND) { /* 0: the page is full; MDB_NOTFOUND: the log's end */
		msgpack_pack_map(c->pk, 3);
		pack_rows(c->pk, "transactions", n, &rows);
		KV_U64(c->pk, "last_id", after);
		KEY(c->pk, "heads");
		msgpack_pack_array(c->pk, wallets.n);
		for (size_t i = 0; i < wallets.n; i++) {
			const struct export_wallet *e = group_at(&wallets, i);

			head_pack_at(c->txn, c->pk, (struct str){ e->key.bytes, e->key.len }, e->last, e->before);
		}
	} else {
		msgpack_sbuffer_destroy(&rows);
	}
	free(wallets.entries);
	free(wallets.slots);
	return rc == 0 || rc == MDB_NOTFOUND ? E_OK : rc == E_OFF_LOOP ? E_OFF_LOOP : store_error(c, rc);
}

/* ---- Usage reports ---- */

/* The principal ISO 3166 country of a calling code (1: US, 7: RU, 44: GB), or NULL. */
static const char *
calling_country(const char *code, char out[3])
{
	static const char table[] =
	    " 1US 7RU 20EG 27ZA 30GR 31NL 32BE 33FR 34ES 36HU 39IT 40RO 41CH 43AT 44GB 45DK 46SE 47NO 48PL"
	    " 49DE 51PE 52MX 53CU 54AR 55BR 56CL 57CO 58VE 60MY 61AU 62ID 63PH 64NZ 65SG 66TH 81JP 82KR 84VN"
	    " 86CN 90TR 91IN 92PK 93AF 94LK 95MM 98IR 211SS 212MA 213DZ 216TN 218LY 220GM 221SN 222MR 223ML"
	    " 224GN 225CI 226BF 227NE 228TG 229BJ 230MU 231LR 232SL 233GH 234NG 235TD 236CF 237CM 238CV"
	    " 239ST 240GQ 241GA 242CG 243CD 244AO 245GW 246IO 248SC 249SD 250RW 251ET 252SO 253DJ 254KE"
	    " 255TZ 256UG 257BI 258MZ 260ZM 261MG 262RE 263ZW 264NA 265MW 266LS 267BW 268SZ 269KM 290SH"
	    " 291ER 297AW 298FO 299GL 350GI 351PT 352LU 353IE 354IS 355AL 356MT 357CY 358FI 359BG 370LT"
	    " 371LV 372EE 373MD 374AM 375BY 376AD 377MC 378SM 380UA 381RS 382ME 383XK 385HR 386SI 387BA"
	    " 389MK 420CZ 421SK 423LI 500FK 501BZ 502GT 503SV 504HN 505NI 506CR 507PA 508PM 509HT 590GP"
	    " 591BO 592GY 593EC 594GF 595PY 596MQ 597SR 598UY 599CW 670TL 672NF 673BN 674NR 675PG 676TO"
	    " 677SB 678VU 679FJ 680PW 681WF 682CK 683NU 685WS 686KI 687NC 688TV 689PF 690TK 691FM 692MH"
	    " 850KP 852HK 853MO 855KH 856LA 880BD 886TW 960MV 961LB 962JO 963SY 964IQ 965KW 966SA 967YE"
	    " 968OM 970PS 971AE 972IL 973BH 974QA 975BT 976MN 977NP 992TJ 993TM 994AZ 995GE 996KG 998UZ";
	char needle[6];
	const char *hit;
	size_t n = strlen(code);

	snprintf(needle, sizeof(needle), " %s", code);
	for (hit = strstr(table, needle); hit; hit = strstr(hit + 1, needle))
		if (hit[n + 1] >= 'A' && hit[n + 1] <= 'Z') {
			memcpy(out, hit + n + 1, 2);
			out[2] = '\0';
			return out;
		}
	return NULL;
}

/* A line of report.usage: one group and currency. */
struct usage_group {
	struct group_key key;  /* the group's value \0 currency */
	uint64_t messages, segments;
	int64_t charged, refunded;
};

/*
 * The first transaction id created at or after t (a binary search over the
 * log: created_at never decreases with the id); one past the last if none.
 */
static int
log_first_at(MDB_txn *txn, int64_t t, uint64_t *id)
{
	uint64_t lo = 1, hi;
	int rc;

	if ((rc = log_next_id(txn, &hi)) != 0)
		return rc;
	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2;
		struct txn_head h;
		MDB_val rec;

		if ((rc = txn_fetch(txn, mid, &h, &rec)) != 0)
			return rc;
		if (h.created_at < t)
			lo = mid + 1;
		else
			hi = mid;
	}
	*id = lo;
	return 0;
}

/* The group key of charge o by group_by (0 country, 1 route, 2 channel, 3 plan, 4 wallet), into key. */
static int
usage_key(MDB_txn *txn, const msgpack_object *o, int group_by, char key[GROUP_KEY_MAX], size_t *len)
{
	struct str v = { "", 0 }, currency = txn_field(o, "currency");
	char code[4];
	struct wallet w;
	int rc;

	switch (group_by) {
	case 0: {
		struct str to = txn_field(o, "to");
		char digits[16];

		if (e164_digits(to, digits) == 0)
			digits[0] = '\0', digits[1] = '\0';
		calling_code(digits, code);
		v = (struct str){ code, strlen(code) };
		break;
	}
	case 1: v = txn_field(o, "route"); break;
	case 2: v = txn_field(o, "channel"); break;
	case 3:
		v = txn_field(o, "wallet");
		if ((rc = wallet_get(txn, v, &w)) != 0)
			return rc;
		v = (struct str){ w.plan, strlen(w.plan) };
		break;
	default: v = txn_field(o, "wallet"); break;
	}
	*len = (size_t)snprintf(key, GROUP_KEY_MAX, "%.*s%c%.*s", (int)v.n, v.p, 0, (int)currency.n, currency.p);
	return 0;
}

/* Orders usage groups by their key (the group's value, then its currency). */
static int
usage_compare(const void *a, const void *b)
{
	const struct group_key *x = a, *y = b;
	int d = memcmp(x->bytes, y->bytes, x->len < y->len ? x->len : y->len);

	return d ? d : (x->len > y->len) - (x->len < y->len);
}

/*
 * report.usage: the charges and refunds created in [from, until), by
 * group_by (country: the E.164 calling code of the number; route; channel;
 * plan: the wallet's plan now; wallet) and currency: messages, segments,
 * charged, refunded (a refund counts in its charge's group) and net; with
 * parent, of that reseller's children only.  A binary search for from,
 * then O(the period's transactions).
 */
static int
m_report_usage(struct call *c)
{
	static const char *const groupings[] = { "country", "route", "channel", "plan", "wallet" };
	struct group_table groups = { .size = sizeof(struct usage_group) };
	struct str from_s, until_s, by, parent;
	struct wallet w;
	int64_t from, until;
	msgpack_zone *zone;
	uint64_t id;
	int group_by = -1, rc;

	if ((rc = p_str(c, "from", 1, 40, &from_s)) || (rc = p_str(c, "until", 1, 40, &until_s)) ||
	    (rc = p_str(c, "group_by", 1, 16, &by)) || (rc = p_str(c, "parent", 0, WALLET_ID_MAX, &parent)))
		return rc;
	if (parent.p && (rc = load_wallet(c, parent, &w)))
		return rc;
	if (time_parse(from_s, &from) != 0)
		return fail(c, E_INVALID_ARGUMENT, "from", "from must be an RFC 3339 time");
	if (time_parse(until_s, &until) != 0)
		return fail(c, E_INVALID_ARGUMENT, "until", "until must be an RFC 3339 time");
	for (int i = 0; i < 5; i++)
		if (strlen(groupings[i]) == by.n && memcmp(groupings[i], by.p, by.n) == 0)
			group_by = i;
	if (group_by < 0)
		return fail(c, E_INVALID_ARGUMENT, "group_by", "group_by must be country, route, channel, plan or wallet");
	if ((zone = msgpack_zone_new(2048)) == NULL)
		return fail(c, E_BUSY, NULL, "Out of memory");
	if ((rc = log_first_at(c->txn, from, &id)) != 0)
		goto out;
	for (;; id++) {
		struct txn_head h;
		msgpack_object o;
		struct usage_group *g;
		char key[GROUP_KEY_MAX];
		size_t len;
		int64_t refund = 0;

		if (over_budget(c)) {
			rc = E_OFF_LOOP;
			goto out;
		}
		if ((rc = txn_map(c->txn, id, &h, zone, &o)) == MDB_NOTFOUND) {
			rc = 0;
			break;
		}
		if (rc || h.created_at >= until)
			break;
		if (h.type == T_REFUND) { /* counted in its charge's group */
			const msgpack_object *of = map_get(&o, "refund_of");

			refund = h.amount;
			if (of == NULL || of->type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
			    (rc = txn_map(c->txn, of->via.u64, &h, zone, &o)) != 0)
				break;
		} else if (h.type != T_SMS_CHARGE && h.type != T_WHATSAPP_CHARGE) {
			continue;
		}
		if (parent.p) { /* the reseller's children only */
			if ((rc = wallet_get(c->txn, txn_field(&o, "wallet"), &w)) != 0)
				break;
			if (!wallet_child_of(&w, parent))
				continue;
		}
		if ((rc = usage_key(c->txn, &o, group_by, key, &len)) != 0)
			break;
		if ((g = group_find(&groups, key, len)) == NULL) {
			rc = ENOMEM;
			break;
		}
		if (refund) {
			g->refunded += refund;
		} else {
			const msgpack_object *seg = map_get(&o, "segments");

			g->messages++;
			g->segments += seg && seg->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? seg->via.u64 : 1;
			g->charged -= h.amount;
		}
	}
	if (rc == 0) {
		if (groups.n)
			qsort(groups.entries, groups.n, groups.size, usage_compare);
		msgpack_pack_map(c->pk, 4);
		KV_TIME(c->pk, "from", from);
		KV_TIME(c->pk, "until", until);
		KV_STR(c->pk, "group_by", groupings[group_by]);
		KEY(c->pk, "rows");
		msgpack_pack_array(c->pk, groups.n);
		for (size_t i = 0; i < groups.n; i++) {
			const struct usage_group *g = group_at(&groups, i);
			size_t n = strnlen(g->key.bytes, g->key.len);

			msgpack_pack_map(c->pk, 7);
			KEY(c->pk, "key");
			msgpack_pack_str_with_body(c->pk, g->key.bytes, n);
			KEY(c->pk, "currency");
			msgpack_pack_str_with_body(c->pk, g->key.bytes + n + 1, g->key.len - n - 1);
			KV_U64(c->pk, "messages", g->messages);
			KV_U64(c->pk, "segments", g->segments);
			KV_AMOUNT(c->pk, "charged", g->charged);
			KV_AMOUNT(c->pk, "refunded", g->refunded);
			KV_AMOUNT(c->pk, "net", g->charged - g->refunded);
		}
	}
out:
	msgpack_zone_free(zone);
	free(groups.entries);
	free(groups.slots);
	if (rc == ENOMEM)
		return fail(c, E_BUSY, NULL, "Out of memory");
	return rc == 0 || rc == E_OFF_LOOP ? rc : store_error(c, rc);
}

/* ---- Statements ---- */

/* The first of w's transactions (by seq) created at or after t: its seq, or w->txn_count. */
static int
wallet_seq_at(MDB_txn *txn, const struct wallet *w, int64_t t, uint64_t *seq)
{
	uint64_t lo = 0, hi = w->txn_count;
	int rc;

	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2, id;
		struct txn_head h;
		MDB_val rec;

		if ((rc = wallet_txn_at(txn, w, mid, &id)) || (rc = txn_fetch(txn, id, &h, &rec)))
			return rc;
		if (h.created_at < t)
			lo = mid + 1;
		else
			hi = mid;
	}
	*seq = lo;
	return 0;
}

/* The messages of one country in a statement. */
struct country_group {
	struct group_key key; /* the calling code */
	uint64_t messages, segments;
	int64_t amount;
};

#define STATEMENT_PAGE_DEFAULT 1000 /* transactions a statement lists at a time */

/*
 * statement: a wallet's period [from, until) (default: this UTC month):
 * opening balance (balance_after of the last transaction before it), totals
 * by type, messages by channel, by country (E.164 calling code), closing
 * balance (= opening + totals, exactly), all over the whole period, and a
 * page of its transactions: the first limit after after_id, in id order,
 * with transactions_total (the period's) and next_after_id (nil on the last
 * page).  Two binary searches, then O(the period's transactions).
 */
static int
m_statement(struct call *c)
{
	struct group_table countries = { .size = sizeof(struct country_group) };
	int64_t from, until, opening = 0, totals[T__COUNT] = { 0 }, closing;
	uint64_t seq_from, seq_until, n, *ids = NULL, sms[2] = { 0 }, wa = 0;
	uint64_t after = 0, limit = STATEMENT_PAGE_DEFAULT, first, end, head = 0, head_before = 0;
	int64_t sms_amount = 0, wa_amount = 0;
	struct str id, from_s, until_s;
	msgpack_zone *zone = NULL;
	struct wallet w;
	msgpack_packer *pk = c->pk;
	int rc;

	if ((rc = p_wallet(c, &id)) || (rc = p_str(c, "from", 0, 40, &from_s)) ||
	    (rc = p_str(c, "until", 0, 40, &until_s)) || (rc = p_uint(c, "after_id", 0, 0, UINT64_MAX, &after)) ||
	    (rc = p_uint(c, "limit", 0, 1, STATEMENT_LIMIT_MAX, &limit)))
		return rc;
	{
		time_t now = (time_t)now_seconds();
		struct tm tm;

		gmtime_r(&now, &tm);
		tm.tm_mday = 1, tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
		from = (int64_t)timegm(&tm);
		tm.tm_mon++;
		until = (int64_t)timegm(&tm);
	}
	if (from_s.p && time_parse(from_s, &from) != 0)
		return fail(c, E_INVALID_ARGUMENT, "from", "from must be an RFC 3339 time");
	if (until_s.p && time_parse(until_s, &until) != 0)
		return fail(c, E_INVALID_ARGUMENT, "until", "until must be an RFC 3339 time");
	if (until < from)
		return fail(c, E_INVALID_ARGUMENT, "until", "until must not be before from");
	if ((rc = load_wallet(c, id, &w)))
		return rc;
	if ((rc = wallet_seq_at(c->txn, &w, from, &seq_from)) || (rc = wallet_seq_at(c->txn, &w, until, &seq_until)))
		return store_error(c, rc);
	n = seq_until - seq_from;
	if ((n && (ids = malloc(n * sizeof(*ids))) == NULL) || (zone = msgpack_zone_new(2048)) == NULL) {
		free(ids);
		return fail(c, E_BUSY, NULL, "Out of memory");
	}
	if (n && (rc = wallet_txn_at(c->txn, &w, seq_until - 1, &ids[n - 1])) == 0) {
		for (uint64_t i = n - 1; rc == 0; i--) { /* back along the chain to the period's first */
			struct txn_head h;
			MDB_val rec;

			if ((rc = txn_fetch(c->txn, ids[i], &h, &rec)) != 0)
				break;
			if (i == 0) {
				opening = h.balance_after - h.amount;
				head = ids[n - 1], head_before = h.prev;
				break;
			}
			ids[i - 1] = h.prev;
		}
	} else if (rc == 0 && seq_from > 0) { /* nothing in the period: the balance it starts at */
		uint64_t last;
		struct txn_head h;

		if ((rc = wallet_txn_at(c->txn, &w, seq_from - 1, &last)) == 0)
			rc = txn_read(c->txn, last, &h, NULL);
		opening = rc == 0 ? h.balance_after : 0;
		head = head_before = last;
	}
	for (uint64_t i = 0; rc == 0 && i < n; i++) {
		struct txn_head h;
		msgpack_object o;
		const msgpack_object *seg;
		struct country_group *g;
		char digits[16], code[4];
		struct str to;

		if (over_budget(c)) {
			rc = E_OFF_LOOP;
			break;
		}
		if ((rc = txn_map(c->txn, ids[i], &h, zone, &o)) != 0)
			break;
		if (h.type > 0 && h.type < T__COUNT)
			totals[h.type] += h.amount;
		if (h.type != T_SMS_CHARGE && h.type != T_WHATSAPP_CHARGE)
			continue;
		seg = map_get(&o, "segments");
		to = txn_field(&o, "to");
		if (h.type == T_SMS_CHARGE) {
			sms[0]++;
			sms[1] += seg && seg->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? seg->via.u64 : 1;
			sms_amount -= h.amount;
		} else {
			wa++;
			wa_amount -= h.amount;
		}
		if (e164_digits(to, digits) == 0)
			digits[0] = digits[1] = '\0';
		calling_code(digits, code);
		if ((g = group_find(&countries, code, strlen(code))) == NULL) {
			rc = ENOMEM;
			break;
		}
		g->messages++;
		g->segments += seg && seg->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? seg->via.u64 : 1;
		g->amount -= h.amount;
	}
	for (first = 0, end = n; first < end;) { /* the page: the first id above after */
		uint64_t mid = first + (end - first) / 2;

		if (ids[mid] <= after)
			first = mid + 1;
		else
			end = mid;
	}
	end = n - first > limit ? first + limit : n;
	if (rc == 0) {
		if (countries.n)
			qsort(countries.entries, countries.n, countries.size, usage_compare);
		closing = opening;
		for (int t = 1; t < T__COUNT; t++)
			closing += totals[t];
		msgpack_pack_map(pk, 13);
		KV_SSTR(pk, "wallet", id);
		KV_STR(pk, "currency", w.currency);
		KEY(pk, "head");
		head_pack_at(c->txn, pk, id, head, head_before);
		KV_TIME(pk, "from", from);
		KV_TIME(pk, "until", until);
		KV_AMOUNT(pk, "opening_balance", opening);
		KV_AMOUNT(pk, "closing_balance", closing);
		KEY(pk, "totals");
		msgpack_pack_map(pk, T__COUNT - 1);
		for (int t = 1; t < T__COUNT; t++) {
			pack_cstr(pk, txn_type_names[t]);
			pack_amount(pk, totals[t]);
		}
		KEY(pk, "messages");
		msgpack_pack_map(pk, 2);
		KEY(pk, "sms");
		msgpack_pack_map(pk, 3);
		KV_U64(pk, "count", sms[0]);
		KV_U64(pk, "segments", sms[1]);
		KV_AMOUNT(pk, "amount", sms_amount);
		KEY(pk, "whatsapp");
		msgpack_pack_map(pk, 2);
		KV_U64(pk, "count", wa);
		KV_AMOUNT(pk, "amount", wa_amount);
		KEY(pk, "by_country");
		msgpack_pack_array(pk, countries.n);
		for (size_t i = 0; i < countries.n; i++) {
			const struct country_group *g = group_at(&countries, i);
			char code[4], iso[3];

			snprintf(code, sizeof(code), "%.*s", (int)g->key.len, g->key.bytes);
			msgpack_pack_map(pk, 5);
			KEY(pk, "country");
			if (calling_country(code, iso))
				pack_cstr(pk, iso);
			else
				msgpack_pack_nil(pk);
			KV_STR(pk, "calling_code", code);
			KV_U64(pk, "messages", g->messages);
			KV_U64(pk, "segments", g->segments);
			KV_AMOUNT(pk, "amount", g->amount);
		}
		KEY(pk, "transactions");
		msgpack_pack_array(pk, end - first);
		for (uint64_t i = first; i < end; i++) {
			struct txn_head h;
			MDB_val rec;

			if (txn_fetch(c->txn, ids[i], &h, &rec) != 0 || txn_pack_record(c->txn, pk, ids[i], &h, rec) != 0)
				msgpack_pack_nil(pk);
		}
		KV_U64(pk, "transactions_total", n);
		KEY(pk, "next_after_id");
		if (end < n)
			msgpack_pack_uint64(pk, ids[end - 1]);
		else
			msgpack_pack_nil(pk);
	}
	free(ids);
	msgpack_zone_free(zone);
	free(countries.entries);
	free(countries.slots);
	if (rc == ENOMEM)
		return fail(c, E_BUSY, NULL, "Out of memory");
	return rc == 0 || rc == E_OFF_LOOP ? rc : store_error(c, rc);
}

/* Packs a notification. */
static void
note_pack(msgpack_packer *pk, uint64_t seq, const struct note *n)
{
	int paid = n->kind == NK_RECEIPT || n->kind == NK_PAYMENT_PROBLEM, suspended = n->kind == NK_SUSPENDED;
	int automatic = n->kind == NK_AUTO_TOPUP || n->kind == NK_AUTO_TOPUP_OFF, expiring = n->kind == NK_CREDIT_EXPIRING;
	int fields = 11 + (n->sent_at != 0) + (n->last_error[0] != '\0') + 2 * (paid || automatic) + 3 * suspended +
	    3 * expiring;

	msgpack_pack_map(pk, (size_t)fields);
	KV_U64(pk, "id", seq + 1);
	KV_STR(pk, "type", note_kind_names[n->kind < NK__COUNT ? n->kind : 0]);
	if (paid || automatic) {
		KV_AMOUNT(pk, "amount", n->amount);
		/* a request: its top-up; turned off: the last failure */
		pack_cstr(pk, n->kind == NK_AUTO_TOPUP ? "topup" : n->kind == NK_AUTO_TOPUP_OFF ? "why" : "provider_ref");
		pack_cstr(pk, n->provider_ref);
	}
	if (suspended) {
		KV_STR(pk, "prefix", n->prefix);
		KV_STR(pk, "reason", n->reason);
		KV_TIME(pk, "until", n->until);
	}
	if (expiring) { /* what is left of a lot, and when it goes */
		KV_AMOUNT(pk, "amount", n->amount);
		KV_STR(pk, "kind", n->reason);
		KV_TIME(pk, "expires_at", n->until);
	}
	KV_STR(pk, "wallet", n->wallet);
	KV_U64(pk, "txn", n->txn_id);
	KV_TIME(pk, "created_at", n->created_at);
	KV_AMOUNT(pk, "balance", n->balance);
	KV_AMOUNT(pk, "threshold", n->threshold);
	KV_STR(pk, "currency", n->currency);
	KV_STR(pk, "email_state", note_state_names[n->state]);
	KV_U64(pk, "attempts", n->attempts);
	KV_STR(pk, "emails", n->emails);
	if (n->sent_at)
		KV_TIME(pk, "sent_at", n->sent_at);
	if (n->last_error[0])
		KV_STR(pk, "last_error", n->last_error);
}

/* notifications: a wallet's low-balance notifications, newest first (100). */
static int
m_notifications(struct call *c)
{
	struct str id;
	struct wallet w;
	uint64_t count;
	int rc;

	if ((rc = p_wallet(c, &id)) || (rc = load_wallet(c, id, &w)))
		return rc;
	count = w.note_count < 100 ? w.note_count : 100;
	msgpack_pack_map(c->pk, 2);
	KEY(c->pk, "notifications");
	msgpack_pack_array(c->pk, count);
	for (uint64_t i = 0; i < count; i++) {
		unsigned char key[16];
		uint64_t seq = w.note_count - 1 - i;
		MDB_val k = key_pair(key, w.number, seq), v;
		struct note n;

		memset(&n, 0, sizeof(n));
		if ((rc = mdb_get(c->txn, store.notes, &k, &v)) == 0)
			record_copy(&n, sizeof(n), v);
		note_pack(c->pk, seq, &n);
	}
	KV_U64(c->pk, "total", w.note_count);
	return E_OK;
}

/* ---- Verify, backup, stats ---- */

static uint64_t slow_oldest_ms(void); /* section 6: the helper threads' reads */

/* Appends one breach to the verify report. */
static void
verify_breach(msgpack_packer *pk, uint32_t *n, struct str wallet, uint64_t txn, const char *problem)
{
	msgpack_pack_map(pk, 3);
	KV_SSTR(pk, "wallet", wallet);
	KV_U64(pk, "txn", txn);
	KV_STR(pk, "problem", problem);
	(*n)++;
}

/* What verify_holds adds up of a wallet's holds, and what breaks the rules. */
struct holds_check {
	struct holds_sum sum;
	int bad;                  /* a hold with remaining below 0 or above its amount */
};

static int
holds_check_one(const struct hold *h, void *arg)
{
	struct holds_check *hc = arg;

	if (h->remaining < 0 || h->remaining > h->amount)
		hc->bad = 1;
	return holds_sum_add(h, &hc->sum);
}

/* Checks that w's counts of its holds are its holds' (and that each holds what it may). */
static void
verify_holds(MDB_txn *txn, const struct wallet *w, struct str id, msgpack_packer *pk, uint32_t *breaches)
{
	struct holds_check hc = { { INT64_MIN, 0, 0, 0 }, 0 };

	if (holds_each(txn, w->number, holds_check_one, &hc) != 0) {
		verify_breach(pk, breaches, id, 0, "its holds cannot be read");
		return;
	}
	if (hc.bad)
		verify_breach(pk, breaches, id, 0, "a hold's remaining is below zero or above its amount");
	if (hc.sum.held != w->held || hc.sum.active != w->holds_active ||
	    (w->holds_active && hc.sum.first_expiry != w->hold_expiry))
		verify_breach(pk, breaches, id, 0, "the wallet's held money disagrees with its active holds");
	if (w->held > add_saturating(w->balance, w->credit_limit))
		verify_breach(pk, breaches, id, 0, "its active holds exceed its balance plus credit limit "
		    "(available below zero)");
}

/* Checks that w's credit lots add up to what it says they hold, each holding what it may, and no more than its balance. */
static void
verify_lots(MDB_txn *txn, const struct wallet *w, struct str id, msgpack_packer *pk, uint32_t *breaches)
{
	unsigned char prefix[8];
	MDB_cursor *cur;
	MDB_val k = { 8, prefix }, v;
	int64_t sum = 0;
	int rc, bad = 0, first = 1, head_first = w->lots.head.id == 0;

	be64_put(prefix, w->number);
	if ((rc = mdb_cursor_open(txn, store.lots, &cur)) != 0) {
		verify_breach(pk, breaches, id, 0, "its credit lots cannot be read");
		return;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0 && k.mv_size == LOT_KEY &&
	    be64_get(k.mv_data) == w->number; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT), first = 0) {
		struct lot l;

		record_copy(&l, sizeof(l), v);
		head_first |= first && l.id == w->lots.head.id;
		lot_overlay(w, &l);
		bad |= l.remaining <= 0 || l.remaining > l.amount || strlen(l.wallet) != id.n ||
		    memcmp(l.wallet, id.p, id.n) != 0;
		sum = add_saturating(sum, l.remaining);
	}
	mdb_cursor_close(cur);
	if (bad)
		verify_breach(pk, breaches, id, 0, "a credit lot holds nothing, more than it was credited, or is another "
		    "wallet's");
	if (!head_first)
		verify_breach(pk, breaches, id, 0, "the credit lot it draws on first is not the first in draw order");
	if (sum != w->lots.total)
		verify_breach(pk, breaches, id, 0, "its credit lots do not add up to what it says they hold");
	if (w->lots.total > (w->balance > 0 ? w->balance : 0))
		verify_breach(pk, breaches, id, 0, "its credit lots hold more than its balance");
}

/* Checks that the refunds of every charge add up to no more than it, and refund it. */
static int
verify_refunds(MDB_txn *txn, msgpack_packer *pk, uint32_t *breaches)
{
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;

	if ((rc = mdb_cursor_open(txn, store.refunds, &cur)) != 0)
		return rc;
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct txn_head charge, refund;
		uint64_t charge_id, refund_id;
		int64_t refunded = 0;
		MDB_val rec;

		memcpy(&charge_id, k.mv_data, 8);
		if (txn_fetch(txn, charge_id, &charge, &rec) != 0 || v.mv_size % 8 != 0) {
			verify_breach(pk, breaches, (struct str){ "", 0 }, charge_id, "a refunded charge cannot be read");
			continue;
		}
		for (size_t i = 0; i < v.mv_size / 8; i++) {
			memcpy(&refund_id, (char *)v.mv_data + 8 * i, 8);
			if (txn_fetch(txn, refund_id, &refund, &rec) != 0 || refund.type != T_REFUND) {
				verify_breach(pk, breaches, (struct str){ "", 0 }, refund_id, "a charge's refund is not a refund");
				continue;
			}
			refunded += refund.amount;
		}
		if (refunded > -charge.amount)
			verify_breach(pk, breaches, (struct str){ "", 0 }, charge_id, "its refunds add up to more than the charge");
	}
	mdb_cursor_close(cur);
	return rc == MDB_NOTFOUND ? 0 : rc;
}

/*
 * verify: for every wallet, walks its chain of transactions from the newest:
 * each balance_after must be the balance less the amounts after it, the
 * first must start from zero, every record must agree with its head and the
 * hist index, and the log must hold no transaction that no wallet lists.
 * Costs a pass over the store; runs on a helper thread.
 */
/* Whether transfer id (head h) and its counterpart name each other, of opposite types and amounts: 0, or -1. */
static int
transfer_paired(MDB_txn *txn, uint64_t id, const struct txn_head *h, uint64_t counterpart)
{
	struct txn_head oh;
	struct txn t;
	struct txn_text x;
	MDB_val rec;

	return counterpart && txn_fetch(txn, counterpart, &oh, &rec) == 0 &&
	    txn_decode(counterpart, &oh, rec.mv_data, rec.mv_size, &t, &x) == 0 && t.refund_of == id &&
	    oh.type == (h->type == T_TRANSFER_OUT ? T_TRANSFER_IN : T_TRANSFER_OUT) && oh.amount == -h->amount ? 0 : -1;
}

static int
m_verify(struct call *c)
{
	MDB_cursor *wc;
	MDB_val k, v;
	MDB_stat st;
	msgpack_sbuffer rows;
	msgpack_packer rpk;
	uint64_t wallets = 0, txns = 0, top = 0;
	uint32_t breaches = 0;
	unsigned char sum[32];
	char hex[65];
	EVP_MD_CTX *digest = EVP_MD_CTX_new();
	int rc;

	if (digest == NULL || EVP_DigestInit_ex(digest, EVP_sha256(), NULL) != 1) {
		EVP_MD_CTX_free(digest);
		return fail(c, E_BUSY, NULL, "Out of memory");
	}
	if ((rc = mdb_cursor_open(c->txn, store.wallets, &wc))) {
		EVP_MD_CTX_free(digest);
		return store_error(c, rc);
	}
	msgpack_sbuffer_init(&rows);
	msgpack_packer_init(&rpk, &rows, msgpack_sbuffer_write);
	for (rc = mdb_cursor_get(wc, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(wc, &k, &v, MDB_NEXT)) {
		struct str id = { k.mv_data, k.mv_size };
		struct wallet w;
		int64_t after = 0;
		uint64_t seq, next;
		char problem[200];

		if (wallet_decode(v, &w) != 0) {
			verify_breach(&rpk, &breaches, id, 0, "the wallet record does not decode");
			continue;
		}
		wallets++;
		after = w.balance;
		/* The digest: each wallet's id, balance and last transaction, in id order. */
		EVP_DigestUpdate(digest, k.mv_data, k.mv_size);
		EVP_DigestUpdate(digest, "", 1);
		EVP_DigestUpdate(digest, &w.balance, sizeof(w.balance));
		EVP_DigestUpdate(digest, &w.last_txn, sizeof(w.last_txn));
		for (seq = w.txn_count, next = w.last_txn; next != 0; seq--) {
			struct txn_head h;
			MDB_val raw;
			msgpack_unpacked rec;
			const msgpack_object *a, *b;
			int64_t amount = 0, recorded = 0;
			uint64_t indexed;
			int read_rc = 0;

			txns++;
			if (seq == 0 || (read_rc = txn_read(c->txn, next, &h, &raw)) != 0) {
				verify_breach(&rpk, &breaches, id, next, read_rc == MDB_CORRUPTED ?
				    "the record does not decode" : "the chain of transactions is broken");
				break;
			}
			if (h.seq != seq - 1)
				verify_breach(&rpk, &breaches, id, next, "transaction out of its place in the history");
			if (h.balance_after != after) {
				snprintf(problem, sizeof(problem), "balance_after %" PRId64 " != running sum %" PRId64 " (micro-units)",
				    h.balance_after, after);
				verify_breach(&rpk, &breaches, id, next, problem);
			}
			if (h.balance_after < 0 && !(w.flags & WF_CREDIT_EVER))
				verify_breach(&rpk, &breaches, id, next, "balance below zero, and no credit limit was ever set");
			if (__builtin_sub_overflow(after, h.amount, &after))
				verify_breach(&rpk, &breaches, id, next, "running sum overflows");
			if (h.seq % HIST_STRIDE == HIST_STRIDE - 1 &&
			    (wallet_txn_at(c->txn, &w, h.seq, &indexed) != 0 || indexed != next))
				verify_breach(&rpk, &breaches, id, next, "the history index disagrees with the chain");
			msgpack_unpacked_init(&rec);
			if (msgpack_unpack_next(&rec, raw.mv_data, raw.mv_size, NULL) != MSGPACK_UNPACK_SUCCESS ||
			    !obj_str_eq(&rec.data, "wallet", id) || map_u64(&rec.data, "id") != next ||
			    (a = map_get(&rec.data, "amount")) == NULL || a->type != MSGPACK_OBJECT_STR ||
			    (b = map_get(&rec.data, "balance_after")) == NULL || b->type != MSGPACK_OBJECT_STR ||
			    amount_parse(a->via.str.ptr, a->via.str.size, &amount) != 0 ||
			    amount_parse(b->via.str.ptr, b->via.str.size, &recorded) != 0 ||
			    amount != h.amount || recorded != h.balance_after)
				verify_breach(&rpk, &breaches, id, next, "the record disagrees with its head");
			else if (chain_verify(c->txn, next, h.prev, &rec.data) != 0)
				verify_breach(&rpk, &breaches, id, next, "its hash does not follow from it and the transaction "
				    "before it (the hash chain)");
			else if ((h.type == T_TRANSFER_OUT || h.type == T_TRANSFER_IN) &&
			    transfer_paired(c->txn, next, &h, map_u64(&rec.data, "counterpart")) != 0)
				verify_breach(&rpk, &breaches, id, next, "a transfer without its counterpart (the other "
				    "wallet's transfer of the same amount, naming this one)");
			msgpack_unpacked_destroy(&rec);
			next = h.prev;
		}
		if (seq != 0)
			verify_breach(&rpk, &breaches, id, 0, "the wallet counts more transactions than its chain holds");
		if (w.balance < -w.credit_limit)
			verify_breach(&rpk, &breaches, id, 0, "balance below minus the credit limit");
		verify_holds(c->txn, &w, id, &rpk, &breaches);
		verify_lots(c->txn, &w, id, &rpk, &breaches);
		if (after != 0) {
			char b1[32], b2[32];

			snprintf(problem, sizeof(problem), "balance %s != sum of transactions %s",
			    amount_format(w.balance, b1, 0), amount_format(w.balance - after, b2, 0));
			verify_breach(&rpk, &breaches, id, 0, problem);
		}
	}
	mdb_cursor_close(wc);
	if (rc == MDB_NOTFOUND && (rc = mdb_cursor_open(c->txn, store.txns, &wc)) == 0) {
		if ((rc = mdb_cursor_get(wc, &k, &v, MDB_LAST)) == 0)
			memcpy(&top, k.mv_data, sizeof(top));
		mdb_cursor_close(wc);
	}
	EVP_DigestUpdate(digest, &top, sizeof(top));
	EVP_DigestFinal_ex(digest, sum, NULL);
	EVP_MD_CTX_free(digest);
	if (rc != MDB_NOTFOUND && rc != 0) {
		msgpack_sbuffer_destroy(&rows);
		return store_error(c, rc);
	}
	for (int i = 0; i < 32; i++)
		snprintf(hex + 2 * i, 3, "%02x", sum[i]);
	if ((rc = mdb_stat(c->txn, store.txns, &st)) == 0 && st.ms_entries != txns)
		verify_breach(&rpk, &breaches, (struct str){ "", 0 }, 0,
		    "the log holds transactions that no wallet's history lists");
	if ((rc = verify_refunds(c->txn, &rpk, &breaches)) != 0) {
		msgpack_sbuffer_destroy(&rows);
		return store_error(c, rc);
	}
	msgpack_pack_map(c->pk, 5);
	KV_BOOL(c->pk, "ok", breaches == 0);
	KV_U64(c->pk, "wallets", wallets);
	KV_U64(c->pk, "transactions", txns);
	KV_STR(c->pk, "digest", hex);
	pack_rows(c->pk, "breaches", breaches, &rows);
	return E_OK;
}

/*
 * Whether the file open on fd is in the store's own directory, where the
 * client's rename of the finished copy would replace data.mdb under the
 * running walletd: what it commits after that is lost at the next start.
 * walletctl and the bindings refuse such a path first, knowing the store's
 * directory only by its walletd.lock; a client of one's own may not.
 */
static int
in_store_dir(int fd)
{
	char link[64], path[PATH_MAX];
	struct stat st;
	char *slash;
	ssize_t n;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	if ((n = readlink(link, path, sizeof(path) - 1)) <= 0)
		return 0;
	path[n] = '\0';
	if ((slash = strrchr(path, '/')) == NULL)
		return 0;
	if (slash == path)
		slash++; /* a file in / */
	*slash = '\0';
	return stat(path, &st) == 0 && st.st_dev == store.dir_dev && st.st_ino == store.dir_ino;
}

/* backup: a compacted, consistent copy into the descriptor the caller passed, synced. */
static int
m_backup(struct call *c)
{
	struct stat st;
	int rc;

	if (c->fd < 0)
		return fail(c, E_INVALID_ARGUMENT, "file",
		    "backup needs a file descriptor passed with the request (SCM_RIGHTS)");
	if (fstat(c->fd, &st) != 0 || !S_ISREG(st.st_mode))
		return fail(c, E_INVALID_ARGUMENT, "file", "the descriptor passed is not a regular file");
	if (in_store_dir(c->fd))
		return fail(c, E_INVALID_ARGUMENT, "file",
		    "the file passed is in the store's own directory, where it would replace data.mdb; back up elsewhere");
	rc = mdb_env_copyfd2(store.env, c->fd, MDB_CP_COMPACT);
	if (rc == 0 && fdatasync(c->fd) != 0)
		rc = errno;
	if (rc == ENOSPC || rc == EDQUOT)
		return fail(c, E_STORAGE_FULL, "file", "backup failed: %s", mdb_strerror(rc));
	if (rc != 0)
		return fail(c, E_INTERNAL, "file", "backup failed: %s", mdb_strerror(rc));
	fstat(c->fd, &st);
	msgpack_pack_map(c->pk, 1);
	KV_U64(c->pk, "bytes", (uint64_t)st.st_size);
	return E_OK;
}

static int
compare_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

/* stats: the event loop's counters, the writer's, and the store's size. */
/* Packs h as {le: [bounds], counts: [per bucket, the last above every bound], sum, count}. */
static void
histogram_pack(msgpack_packer *pk, const struct histogram *h, const uint64_t bounds[HISTO_BOUNDS])
{
	msgpack_pack_map(pk, 4);
	KEY(pk, "le");
	msgpack_pack_array(pk, HISTO_BOUNDS);
	for (int i = 0; i < HISTO_BOUNDS; i++)
		msgpack_pack_uint64(pk, bounds[i]);
	KEY(pk, "counts");
	msgpack_pack_array(pk, HISTO_BOUNDS + 1);
	for (int i = 0; i <= HISTO_BOUNDS; i++)
		msgpack_pack_uint64(pk, h->counts[i]);
	KV_U64(pk, "sum", h->sum);
	KV_U64(pk, "count", h->count);
}

static int
m_stats(struct call *c)
{
	msgpack_packer *pk = c->pk;
	uint64_t n = latency.n < LAT_RING ? latency.n : LAT_RING;
	uint32_t *lat = malloc((n ? n : 1) * sizeof(*lat));
	double q[5] = { 0.5, 0.9, 0.99, 0.999, 1.0 };
	const char *qn[5] = { "p50", "p90", "p99", "p999", "max" };
	int methods = 0, codes = 0, rc;
	MDB_envinfo info;
	MDB_stat alertq, eventq;
	struct stats s;

	if (lat == NULL)
		return fail(c, E_BUSY, NULL, "Out of memory");
	pthread_mutex_lock(&srv.lock);
	s = stats;
	pthread_mutex_unlock(&srv.lock);
	memcpy(lat, latency.us, n * sizeof(*lat));
	qsort(lat, n, sizeof(*lat), compare_u32);
	mdb_env_info(store.env, &info);
	for (int i = 0; i < M__COUNT; i++)
		methods += s.requests[i] != 0;
	for (int i = 1; i < E__COUNT; i++)
		codes += s.codes[i] != 0;

	if ((rc = mdb_stat(c->txn, store.alertq, &alertq)) != 0 ||
	    (rc = mdb_stat(c->txn, store.eventq, &eventq)) != 0) {
		free(lat);
		return store_error(c, rc);
	}

	msgpack_pack_map(pk, 18);
	KV_U64(pk, "uptime", (uint64_t)(now_seconds() - s.started));
	journal_stats_pack(pk);
	KEY(pk, "requests");
	msgpack_pack_map(pk, (size_t)methods);
	for (int i = 0; i < M__COUNT; i++)
		if (s.requests[i]) {
			pack_cstr(pk, method_table[i].name);
			msgpack_pack_map(pk, 2);
			KV_U64(pk, "calls", s.requests[i]);
			KV_U64(pk, "errors", s.errors[i]);
		}
	KEY(pk, "errors");
	msgpack_pack_map(pk, (size_t)codes);
	for (int i = 1; i < E__COUNT; i++)
		if (s.codes[i])
			pack_cstr(pk, error_name(i)), msgpack_pack_uint64(pk, s.codes[i]);
	KV_U64(pk, "reads_off_loop", s.reads_off_loop);
	KV_U64(pk, "commits", s.commits);
	KV_U64(pk, "committed_requests", s.committed);
	KEY(pk, "mean_batch");
	msgpack_pack_double(pk, s.commits ? (double)s.committed / (double)s.commits : 0.0);
	KV_U64(pk, "max_batch", s.batch_max);
	KEY(pk, "mean_batch_us");
	msgpack_pack_double(pk, s.commits ? (double)s.batch_us / (double)s.commits : 0.0);
	KEY(pk, "mean_commit_us");
	msgpack_pack_double(pk, s.commits ? (double)s.commit_us / (double)s.commits : 0.0);
	KEY(pk, "latency_us");
	msgpack_pack_map(pk, 6);
	KV_U64(pk, "samples", n);
	for (int i = 0; i < 5; i++) {
		uint64_t idx = n ? (uint64_t)(q[i] * (double)(n - 1) + 0.5) : 0;

		pack_cstr(pk, qn[i]), msgpack_pack_uint64(pk, n ? lat[idx] : 0);
	}
	KEY(pk, "connections");
	msgpack_pack_map(pk, 8);
	KV_U64(pk, "open", srv.nconns);
	KV_U64(pk, "total", s.conns_total);
	KV_U64(pk, "refused", s.conns_refused);
	KV_U64(pk, "cut_off", s.conns_dropped);
	KV_U64(pk, "queued_requests", srv.queued);
	KV_U64(pk, "queued_peak", srv.queued_peak);
	KV_U64(pk, "unread_bytes", srv.unread);
	KV_U64(pk, "unread_peak", srv.unread_peak);
	KEY(pk, "store");
	msgpack_pack_map(pk, 6);
	KV_U64(pk, "map_size", info.me_mapsize);
	KV_U64(pk, "map_used", store_used());
	KV_U64(pk, "map_size_max", config.map_size_max);
	KV_U64(pk, "map_grows", s.map_grows);
	KV_U64(pk, "failed_commits", s.failed_commits);
	KV_U64(pk, "oldest_read_ms", slow_oldest_ms());
	KV_U64(pk, "alerts_pending", alertq.ms_entries);
	KV_U64(pk, "webhooks_pending", eventq.ms_entries);
	KEY(pk, "histograms");
	msgpack_pack_map(pk, 2);
	pack_cstr(pk, "request_latency_us");
	histogram_pack(pk, &latency.histogram, latency_bounds);
	pack_cstr(pk, "commit_batch_size");
	histogram_pack(pk, &s.batch_sizes, batch_bounds);
	KEY(pk, "replication");
	repl_stats_pack(pk);
	free(lat);
	return E_OK;
}

/* The handlers, from the method table: row `rate.import` is m_rate_import. */
static const method_fn method_fns[M__COUNT] = {
#define X(id, fn, name, roles, flags, params, summary) [id] = m_##fn,
	WALLETD_METHODS(X)
#undef X
};

/* ====================================================================== */
/* 5. Protocol and connections                                            */
/* ====================================================================== */

#define READ_CHUNK    (64u << 10)
#define QUEUE_MAX     4096  /* requests of one connection queued before it is not read */
#define QUEUE_FAIR    64    /* queued by a connection that is read whatever the others queued */
#define OUTPUT_FAIR   (64u << 10) /* unread by a connection that is served whatever the others left */
#define SLOW_READ_BYTES (64u << 10) /* a read this large runs on a helper thread */
#define SLOW_MAX      64    /* helper threads at once; each holds one of LMDB's 256 reader slots */
#define LINGER_MAX    16    /* closed connections kept open to drain at once (conn_linger) */
#define LINGER_US     1000000u /* ... for at most a second */

enum { RQ_WAITING, RQ_WRITER, RQ_SLOW, RQ_DONE };

/* ---- Requests and connections ---- */

/* One request, from its frame to its answer. */
struct req {
	struct req *next;         /* in its connection's FIFO */
	struct req *qnext;        /* in the writer's queue, or the done list */
	struct conn *conn;
	msgpack_unpacked msg;     /* owns the decoded frame */
	const msgpack_object *params;
	int method;               /* -1 when answered at decode time */
	unsigned flags;           /* its method's MF_*, or a write's for a precheck that holds */
	int state;                /* RQ_* */
	int code;                 /* the answer's error code, E_OK on success */
	int fd;                   /* descriptor passed with it, or -1 */
	int alert;
	int failed;               /* the store error it met in the writer; 0 = none */
	uid_t uid;
	uint32_t msgid;
	int has_msgid;
	size_t bytes;
	size_t weight;            /* what it counts for against batch_max (req_weight) */
	uint64_t t0;
	msgpack_sbuffer out;      /* the answer frame */
	struct remote *remote;    /* forwarded by a follower (section 7): conn is NULL */
	struct str origin;        /* ... that follower's node name */
	uint64_t seq;             /* replicated: the stream record that holds what it wrote */
	uint64_t wrote_at;        /* a read on a follower: the record of its connection's last write, to see */
	int64_t expires_ms;       /* forwarded: not run after this (wall clock, ms) */
	int done;                 /* replicated: answered in this turn of the writer */
	uint64_t need;            /* the journal record that must be synced before its answer leaves */
};

#define ANSWER_ROOM 512

struct buf {
	char *p;
	size_t len, off, cap;
};

struct conn {
	int fd;
	uid_t uid;
	gid_t gid;
	unsigned roles;
	msgpack_unpacker up;      /* while up_ready */
	int up_ready;
	struct buf out;
	struct req *head, *tail;  /* requests in order; answers leave from head */
	struct req *first_wait;   /* the first not yet dispatched */
	uint64_t wrote_at;        /* replicated: the stream record of its last write answered */
	int held;                 /* its next answer waits for the journal's sync (srv.held) */
	struct conn *held_next;
	unsigned queued;          /* requests in the queue, answered or not */
	unsigned inflight;        /* with the writer or a helper */
	size_t wweight, wbytes;   /* the weight and bytes of those with the writer */
	unsigned nslow;           /* with a helper */
	int passed_fd;
	int decode_paused;        /* whole frames wait in the decoder: the queue is full */
	int frame_has_msgid;      /* the frame being received shows its msgid */
	uint32_t frame_msgid;
	int closing;              /* answer what is queued, then close */
	int lingering;            /* answered and shut down for writing; see conn_linger */
	int dead;                 /* socket closed; freed when inflight is 0 */
	int dirty;
	unsigned events;          /* registered with epoll */
	uint64_t last_active;
	struct conn *dirty_next;
	struct conn *prev, *next;
};

/* ---- Roles ---- */

/* Parses a list of user or group names / ids into ids.  Returns the count. */
static int
roles_parse(const char *list, int groups, unsigned *ids, const char *key)
{
	char copy[256], *save = NULL;
	int n = 0;

	snprintf(copy, sizeof(copy), "%s", list);
	for (char *tok = strtok_r(copy, ", \t", &save); tok && n < ID_LIST_MAX;
	    tok = strtok_r(NULL, ", \t", &save)) {
		char *end;
		unsigned long v = strtoul(tok, &end, 10);

		if (*end != '\0') {
			struct passwd *pw = groups ? NULL : getpwnam(tok);
			struct group *gr = groups ? getgrnam(tok) : NULL;

			if (pw == NULL && gr == NULL) {
				log_x(L_WARN, "%s: no such %s '%s'", key, groups ? "group" : "user", tok);
				continue;
			}
			v = groups ? gr->gr_gid : pw->pw_uid;
		}
		ids[n++] = (unsigned)v;
	}
	return n;
}

/* Resolves the role lists of the config into ids. */
static void
roles_load(void)
{
	const char *users[ROLES_COUNT] = { config.admin_users, config.client_users, config.payments_users,
		config.staff_users };
	const char *groups[ROLES_COUNT] = { config.admin_groups, config.client_groups, config.payments_groups,
		config.staff_groups };

	for (int i = 0; i < ROLES_COUNT; i++) {
		srv.role_nuids[i] = roles_parse(users[i], 0, srv.role_uids[i], "role users");
		srv.role_ngids[i] = roles_parse(groups[i], 1, srv.role_gids[i], "role groups");
	}
}

/* The roles of a peer: root and walletd's own uid are admin; else the config's lists. */
static unsigned
roles_of(uid_t uid, gid_t gid)
{
	gid_t groups[64];
	int ngroups = 64;
	unsigned roles = 0;
	struct passwd *pw;

	if (uid == 0 || uid == srv.self_uid)
		return ROLE_ADMIN;
	groups[0] = gid;
	if ((pw = getpwuid(uid)) == NULL || getgrouplist(pw->pw_name, gid, groups, &ngroups) < 0)
		ngroups = 1;
	for (int r = 0; r < ROLES_COUNT; r++) {
		for (int i = 0; i < srv.role_nuids[r]; i++)
			if (srv.role_uids[r][i] == uid)
				roles |= 1u << r;
		for (int i = 0; i < srv.role_ngids[r]; i++)
			for (int g = 0; g < ngroups; g++)
				if (srv.role_gids[r][i] == groups[g])
					roles |= 1u << r;
	}
	return roles;
}

/* ---- Requests: run, answer, fail ---- */

/* Writes a response header [1, msgid, into out. */
static void
pack_response_head(msgpack_packer *pk, const struct req *r)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_int(pk, 1);
	if (r->has_msgid)
		msgpack_pack_uint32(pk, r->msgid);
	else
		msgpack_pack_nil(pk);
}

/*
 * Runs request r in txn: its answer frame is left in r->out, its error code
 * in r->code.  Returns the first LMDB error the method met (MDB_MAP_FULL
 * tells the writer to grow the map and run the batch again), or 0.
 */
static int
req_execute(struct req *r, MDB_txn *txn, uint64_t budget)
{
	struct call c;
	msgpack_packer pk;
	size_t mark;

	memset(&c, 0, sizeof(c));
	c.txn = txn;
	c.params = r->params;
	c.uid = r->uid;
	c.origin = r->origin;
	c.fd = r->fd;
	c.budget = budget;
	msgpack_sbuffer_clear(&r->out);
	msgpack_packer_init(&pk, &r->out, msgpack_sbuffer_write);
	pack_response_head(&pk, r);
	mark = r->out.size;
	msgpack_pack_nil(&pk);
	c.pk = &pk;
	r->code = method_fns[r->method](&c);
	if (r->code != E_OK && r->code != E_OFF_LOOP) {
		r->out.size = mark;
		pack_error(&pk, &c);
		msgpack_pack_nil(&pk);
	}
	r->alert = c.alert;
	return c.mdb_rc;
}

/* Answers r with an error made outside any method. */
static void __attribute__((format(printf, 4, 5)))
req_error(struct req *r, int code, const char *field, const char *fmt, ...)
{
	struct call c;
	msgpack_packer pk;
	va_list ap;

	memset(&c, 0, sizeof(c));
	c.code = code;
	c.field = field;
	va_start(ap, fmt);
	vsnprintf(c.message, sizeof(c.message), fmt, ap);
	va_end(ap);
	msgpack_sbuffer_clear(&r->out);
	msgpack_packer_init(&pk, &r->out, msgpack_sbuffer_write);
	pack_response_head(&pk, r);
	pack_error(&pk, &c);
	msgpack_pack_nil(&pk);
	r->code = code;
}

/* Answers r with the error LMDB code rc maps to. */
static void
req_store_error(struct req *r, int rc)
{
	struct call c;

	memset(&c, 0, sizeof(c));
	store_error(&c, rc);
	req_error(r, c.code, NULL, "%s", c.message);
}

static struct req *
req_new(struct conn *c)
{
	struct req *r = calloc(1, sizeof(*r));

	if (r == NULL)
		return NULL;
	r->conn = c;
	r->uid = c->uid;
	r->fd = -1;
	r->method = -1;
	r->t0 = now_micros();
	/* Room for a usual answer, allocated on this thread: the writer then packs
	 * without allocating, and the free comes back to this thread's cache. */
	r->out.data = malloc(ANSWER_ROOM);
	r->out.size = 0;
	r->out.alloc = r->out.data ? ANSWER_ROOM : 0;
	return r;
}

static void
req_free(struct req *r)
{
	msgpack_unpacked_destroy(&r->msg);
	msgpack_sbuffer_destroy(&r->out);
	if (r->fd >= 0)
		close(r->fd);
	free(r);
}

/* Counts a finished request in the stats. */
static void
stats_count(const struct req *r)
{
	uint64_t us = now_micros() - r->t0;

	if (r->method >= 0) {
		stats.requests[r->method]++;
		if (r->code != E_OK)
			stats.errors[r->method]++;
	}
	if (r->code > 0 && r->code < E__COUNT)
		stats.codes[r->code]++;
	latency.us[latency.n++ % LAT_RING] = (uint32_t)us;
	histogram_add(&latency.histogram, latency_bounds, us);
}

/* ---- Connections: queues and output ---- */

static void
conn_mark_dirty(struct conn *c)
{
	if (!c->dirty) {
		c->dirty = 1;
		c->dirty_next = srv.dirty;
		srv.dirty = c;
	}
}

/* Appends n bytes to the connection's output. Returns 0, or -1 out of memory. */
static int
buf_append(struct buf *b, const void *p, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		char *q;

		while (cap < b->len + n)
			cap *= 2;
		if ((q = realloc(b->p, cap)) == NULL)
			return -1;
		b->p = q;
		b->cap = cap;
	}
	memcpy(b->p + b->len, p, n);
	b->len += n;
	return 0;
}

/* Puts r at the tail of c's queue. */
static void
conn_queue(struct conn *c, struct req *r)
{
	if (c->tail)
		c->tail->next = r;
	else
		c->head = r;
	c->tail = r;
	c->queued++;
	if (++srv.queued > srv.queued_peak)
		srv.queued_peak = srv.queued;
	if (c->first_wait == NULL)
		c->first_wait = r;
	conn_mark_dirty(c);
}

/* What a request counts for against batch_max: a charge.batch its items. */
static size_t
req_weight(const struct req *r)
{
	const msgpack_object *items = r->method == M_CHARGE_BATCH ? map_get(r->params, "items") : NULL;

	return items && items->type == MSGPACK_OBJECT_ARRAY && items->via.array.size > 1 ?
	    items->via.array.size : 1;
}

/*
 * Reads request r's frame [0, msgid, method, params] (in r->msg) for a peer
 * with roles.  Returns 0 when r is ready to run, or -1 with r answered.
 */
static int
req_parse(struct req *r, unsigned roles)
{
	const msgpack_object *o = &r->msg.data, *m, *params, *key;
	int method;

	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 4 ||
	    o->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.array.ptr[0].via.u64 != 0) {
		req_error(r, E_MALFORMED_REQUEST, NULL, "Not a request: expected [0, msgid, method, params]");
		return -1;
	}
	if (o->via.array.ptr[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.array.ptr[1].via.u64 > UINT32_MAX) {
		req_error(r, E_MALFORMED_REQUEST, NULL, "msgid must be a uint32");
		return -1;
	}
	r->msgid = (uint32_t)o->via.array.ptr[1].via.u64;
	r->has_msgid = 1;
	m = &o->via.array.ptr[2];
	if (m->type != MSGPACK_OBJECT_STR && m->type != MSGPACK_OBJECT_BIN) {
		req_error(r, E_MALFORMED_REQUEST, NULL, "method must be a string");
		return -1;
	}
	method = m->type == MSGPACK_OBJECT_STR ? method_find(m->via.str.ptr, m->via.str.size) :
	    method_find(m->via.bin.ptr, m->via.bin.size);
	if (method < 0) {
		req_error(r, E_UNKNOWN_METHOD, NULL, "Unknown method '%.*s'",
		    (int)(m->via.str.size > 64 ? 64 : m->via.str.size), m->via.str.ptr);
		return -1;
	}
	r->method = method;
	params = &o->via.array.ptr[3];
	if (params->type != MSGPACK_OBJECT_ARRAY || params->via.array.size > 1 ||
	    (params->via.array.size == 1 && params->via.array.ptr[0].type != MSGPACK_OBJECT_MAP &&
	    params->via.array.ptr[0].type != MSGPACK_OBJECT_NIL)) {
		req_error(r, E_INVALID_ARGUMENT, "params", "params must be [] or [map]");
		return -1;
	}
	if (params->via.array.size == 1 && params->via.array.ptr[0].type == MSGPACK_OBJECT_MAP)
		r->params = &params->via.array.ptr[0];
	r->flags = method_table[method].flags;
	if (method == M_PRECHECK && (key = map_get(r->params, "hold")) && key->type != MSGPACK_OBJECT_NIL)
		r->flags |= MF_WRITE | MF_FLAT; /* a campaign in one step: its hold in the quote's commit */
	if (!(method_table[method].roles & roles)) {
		req_error(r, E_PERMISSION_DENIED, NULL, "uid %u may not call %s",
		    (unsigned)r->uid, method_table[method].name);
		return -1;
	}
	if ((key = param_unknown(method, r->params, 0)) != NULL) {
		struct call call;

		memset(&call, 0, sizeof(call));
		fail_unknown_param(&call, method, key);
		req_error(r, call.code, call.field, "%s", call.message);
		return -1;
	}
	if (!(roles & ROLE_ADMIN) && (key = param_unknown(method, r->params, 1)) != NULL) {
		char field[64];

		snprintf(field, sizeof(field), "%.*s", (int)key->via.str.size, key->via.str.ptr);
		req_error(r, E_PERMISSION_DENIED, field, "uid %u may not set %s: a wallet's limits are admin's",
		    (unsigned)r->uid, field);
		return -1;
	}
	return 0;
}

/*
 * Decodes the frame in msg (taking it over) into a request at the tail of
 * c's queue.  Frames that are not well-formed requests are answered here.
 */
static void
conn_frame(struct conn *c, msgpack_unpacked *msg, size_t bytes)
{
	struct req *r = req_new(c);
	const msgpack_object *o;

	if (r == NULL) {
		msgpack_unpacked_destroy(msg);
		c->closing = 1;
		return;
	}
	r->msg = *msg;
	msg->zone = NULL;
	r->bytes = bytes;
	o = &r->msg.data;
	if (o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size == 3 &&
	    o->via.array.ptr[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.array.ptr[0].via.u64 == 2) {
		req_free(r); /* a notification: never answered */
		return;
	}
	if (req_parse(r, c->roles) != 0) {
		r->state = RQ_DONE; /* answered here */
		conn_queue(c, r);
		return;
	}
	if (r->method == M_BACKUP) {
		r->fd = c->passed_fd;
		c->passed_fd = -1;
	}
	r->weight = req_weight(r);
	conn_queue(c, r);
}

/*
 * Whether c may not queue more requests for now: its own QUEUE_MAX, or, with
 * max_queued across all connections, QUEUE_FAIR of its own.  A connection
 * with fewer than QUEUE_FAIR queued is read whatever the others do, so
 * clients that pipeline deeply cannot stall one that does not.  Such a c is
 * paused until its own answers (which make it dirty) bring it under.
 * Without the bound across connections, 200 connections pipelining 4,096
 * charges each queued ~3.7 GB.
 */
static int
conn_queue_full(const struct conn *c)
{
	return c->queued >= QUEUE_MAX || (c->queued >= QUEUE_FAIR && srv.queued >= config.max_queued);
}

/*
 * Whether c leaves more unread than its share while, across connections,
 * max_output_total is unread: then c is neither read nor are its queued
 * requests run until its client reads (conn_pump pauses it only once its
 * socket is full, so that read makes it writable, and dirty).  A connection
 * that reads its answers keeps under OUTPUT_FAIR and is served whatever the
 * others do.  Without this bound, clients that never read held up to
 * max_output/2 each (max_connections of them: 320 GiB).
 */
static int
conn_output_full(const struct conn *c)
{
	return c->out.len - c->out.off >= OUTPUT_FAIR && srv.unread >= config.max_output_total;
}

/* Tells epoll what c waits for: input unless it is closing or too far
 * behind, output while answers wait. */
static void
conn_events(struct conn *c)
{
	unsigned want = 0;
	struct epoll_event ev;

	if (c->dead)
		return;
	if (c->lingering)
		want = EPOLLIN;
	else if (!c->closing && !c->decode_paused && !conn_queue_full(c) && !conn_output_full(c) &&
	    c->out.len - c->out.off < config.max_output / 2)
		want |= EPOLLIN;
	if (c->out.len > c->out.off)
		want |= EPOLLOUT;
	if (want == c->events)
		return;
	ev.events = want;
	ev.data.ptr = c;
	epoll_ctl(srv.epoll_fd, EPOLL_CTL_MOD, c->fd, &ev);
	c->events = want;
}

/* Frees c once nothing refers to it. */
static void
conn_free(struct conn *c)
{
	while (c->head) {
		struct req *r = c->head;

		c->head = r->next;
		srv.queued--;
		req_free(r);
	}
	if (c->up_ready)
		msgpack_unpacker_destroy(&c->up);
	for (struct conn **p = &srv.held; c->held && *p; p = &(*p)->held_next)
		if (*p == c) {
			*p = c->held_next;
			break;
		}
	free(c->out.p);
	if (c->passed_fd >= 0)
		close(c->passed_fd);
	free(c);
}

/*
 * Closes c's socket now.  Its requests with the writer or a helper still
 * complete (and commit); c is freed when the last one comes back.
 */
static void
conn_close(struct conn *c)
{
	if (c->dead)
		return;
	epoll_ctl(srv.epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	c->dead = 1;
	srv.unread -= c->out.len - c->out.off;
	c->out.off = c->out.len;
	if (c->lingering)
		srv.nlinger--;
	else
		srv.nconns--;
	if (c->prev)
		c->prev->next = c->next;
	else
		srv.conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	conn_mark_dirty(c); /* freed in before_sleep, never under a caller's feet */
}

/*
 * Closes c once answered, gently: shuts down its sending side and keeps it
 * open, reading and dropping what the client still sends, until the client
 * hangs up or LINGER_US passes.  Closed at once, a client whose next request
 * crossed the close got EPIPE on sending it, and a client that then does
 * not read (Node.js) never saw the answer that said why: the
 * too_many_connections refusal, a malformed_request.  At most LINGER_MAX
 * linger at once; beyond, c closes at once.
 */
static void
conn_linger(struct conn *c)
{
	if (srv.nlinger >= LINGER_MAX || shutdown(c->fd, SHUT_WR) != 0) {
		conn_close(c);
		return;
	}
	c->lingering = 1;
	srv.nconns--;
	srv.nlinger++;
	c->last_active = now_micros();
	conn_events(c);
}

/* Writes what c's output holds, until the socket is full; closes c on an error. */
static void
conn_send(struct conn *c)
{
	while (c->out.len > c->out.off) {
		ssize_t n = send(c->fd, c->out.p + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n <= 0) {
			conn_close(c);
			return;
		}
		c->out.off += (size_t)n;
		srv.unread -= (size_t)n;
		c->last_active = now_micros();
	}
}

/* Writes what c's output holds; cuts off a client that lets too much pile up. */
static void
conn_flush(struct conn *c)
{
	conn_send(c);
	if (c->dead)
		return;
	if (c->out.off == c->out.len) {
		c->out.off = c->out.len = 0;
		if (c->out.cap > (1u << 20)) {
			free(c->out.p);
			c->out.p = NULL;
			c->out.cap = 0;
		}
	} else if (c->out.len - c->out.off > config.max_output) {
		log_x(L_WARN, "uid %u left %zu bytes of answers unread: connection cut off",
		    (unsigned)c->uid, c->out.len - c->out.off);
		stats.conns_dropped++;
		conn_close(c);
		return;
	}
	if (c->closing && c->head == NULL && c->out.len == 0 && !c->lingering) {
		conn_linger(c);
		return;
	}
	conn_events(c);
}

static void writer_submit(struct req *r);
static void slow_submit(struct req *r);

/* ---- Running what was read ---- */

/*
 * Whether c already has its share of the writer: two commits' worth of its
 * requests (2 x batch_max weight, 2 x batch_bytes), one committing while the
 * next waits; the rest waits in c's queue until answers come back.  Without
 * it, one connection pipelining charge.batch requests of 1,000 items put
 * all 4,096 its queue holds ahead of every other client's charge: seconds
 * of commits.
 */
static int
writer_share_full(const struct conn *c, const struct req *r)
{
	return c->wweight > 0 && (c->wweight + r->weight > 2 * (size_t)config.batch_max ||
	    c->wbytes + r->bytes > 2 * config.batch_bytes);
}

/*
 * Runs a read in the event loop's read transaction; returns 0 when it is
 * answered.  Returns -1, having run nothing, while the writer waits to grow
 * the map: the loop must not wait with it (behind a backup, say); the caller
 * hands the read to the writer.  Returns 1 when the read outgrew the loop's
 * budget: the caller runs it again on a helper.
 */
static int
req_run_read(struct req *r)
{
	int rc;

	if (pthread_rwlock_tryrdlock(&store.maplock) != 0)
		return -1;
	rc = srv.rtxn ? mdb_txn_renew(srv.rtxn) : mdb_txn_begin(store.env, NULL, MDB_RDONLY, &srv.rtxn);
	if (rc == 0) {
		req_execute(r, srv.rtxn, LOOP_BUDGET);
		mdb_txn_reset(srv.rtxn);
	} else {
		req_store_error(r, rc);
	}
	r->need = atomic_load(&journal.committed); /* what the read may have seen */
	pthread_rwlock_unlock(&store.maplock);
	if (r->code == E_OFF_LOOP) {
		stats.reads_off_loop++;
		return 1;
	}
	r->state = RQ_DONE;
	return 0;
}

/*
 * Moves c's requests along: answers leave in order from the head; the next
 * waiting request is dispatched when its turn allows - a read with nothing
 * before it runs now, in the loop; a write, or a read behind a write of its
 * own connection (so it sees that write), or on a follower that has not
 * yet applied its connection's last write, goes to the writer; a slow one
 * (verify, backup, a read frame over SLOW_READ_BYTES, or a read that outgrew
 * the loop's budget) to a helper, alone.  A scan (MF_SCAN) never goes to the
 * writer, where it would hold up every commit: behind a write of its own
 * connection it waits for that write's answer.
 */
static void
conn_pump(struct conn *c)
{
	for (;;) {
		struct req *r;
		unsigned flags;

		while ((r = c->head) && r->state == RQ_DONE) {
			if (!c->dead && r->need > atomic_load(&journal.synced)) {
				/* It saw records not yet synced: out once they are (done_collect). */
				if (!c->held) {
					c->held = 1;
					c->held_next = srv.held;
					srv.held = c;
				}
				break;
			}
			if ((r->flags & MF_WRITE) && r->seq > c->wrote_at)
				c->wrote_at = r->seq;
			if (!c->dead) {
				if (buf_append(&c->out, r->out.data, r->out.size) != 0)
					c->closing = 1;
				else if ((srv.unread += r->out.size) > srv.unread_peak)
					srv.unread_peak = srv.unread;
			}
			c->head = r->next;
			c->queued--;
			srv.queued--;
			if (c->head == NULL)
				c->tail = NULL;
			if (c->first_wait == r)
				c->first_wait = r->next;
			req_free(r);
		}
		if ((r = c->first_wait) == NULL)
			break;
		if (r->state == RQ_DONE) {
			c->first_wait = r->next;
			continue;
		}
		if (conn_output_full(c)) {
			/* Paused only while its socket is full too: then its client's
			 * next read makes c writable, so dirty, and pumped again. */
			conn_send(c);
			if (c->dead || conn_output_full(c))
				break;
		}
		flags = r->flags;
		if (!(flags & MF_WRITE) && r->bytes > SLOW_READ_BYTES)
			flags |= MF_SLOW; /* a 100,000-number precheck: not on the loop */
		if (r != c->head && (c->nslow || (flags & (MF_SLOW | MF_SCAN))))
			break;
		if (!(flags & MF_SLOW) && ((flags & MF_WRITE) || r != c->head) && writer_share_full(c, r))
			break;
		c->first_wait = r->next;
		if (repl_refuses(r)) {
			stats_count(r);
			continue;
		}
		if (!(flags & MF_WRITE) && c->wrote_at && repl_applied() < c->wrote_at) {
			r->wrote_at = c->wrote_at; /* this follower lags its own write: the writer waits for it */
			flags &= ~MF_SLOW;
		} else if (!(flags & (MF_WRITE | MF_SLOW)) && r == c->head) {
			int ran = req_run_read(r);

			if (ran == 0) {
				stats_count(r);
				continue;
			}
			if (ran > 0 || (flags & MF_SCAN))
				flags |= MF_SLOW;
		}
		if (flags & MF_SLOW) {
			r->state = RQ_SLOW;
			c->inflight++;
			c->nslow++;
			slow_submit(r);
		} else {
			r->state = RQ_WRITER;
			c->inflight++;
			writer_submit(r);
		}
	}
}

/* ---- Frames in ---- */

/* Reads the msgid from the head of a frame [0, msgid, ...: 1 if it shows. */
static int
frame_msgid(const unsigned char *p, size_t n, uint32_t *msgid)
{
	if (n < 3 || p[0] != 0x94 || p[1] != 0x00)
		return 0;
	if (p[2] < 0x80)
		*msgid = p[2];
	else if (p[2] == 0xcc && n >= 4)
		*msgid = p[3];
	else if (p[2] == 0xcd && n >= 5)
		*msgid = (uint32_t)p[3] << 8 | p[4];
	else if (p[2] == 0xce && n >= 7)
		*msgid = (uint32_t)p[3] << 24 | (uint32_t)p[4] << 16 | (uint32_t)p[5] << 8 | p[6];
	else
		return 0;
	return 1;
}

/*
 * Decodes the whole frames in c's decoder into requests, until QUEUE_MAX
 * requests of c are queued: then the rest waits in the decoder
 * (decode_paused) and c is not read until its queue has room again.  Without
 * the bound, one read of 64 KiB of tiny frames queued ~7,000 requests of
 * ~4.6 KB each (a msgpack zone per request), whatever was in flight.
 */
static void
conn_decode(struct conn *c)
{
	msgpack_unpacked msg;
	msgpack_unpack_return ret = MSGPACK_UNPACK_CONTINUE;

	c->decode_paused = 0;
	msgpack_unpacked_init(&msg);
	for (;;) {
		size_t bytes = 0;

		if (conn_queue_full(c)) {
			c->decode_paused = c->up.used > c->up.off;
			break;
		}
		if (c->up.parsed == 0) /* a frame starts here: note its msgid for frame_too_large */
			c->frame_has_msgid = frame_msgid((unsigned char *)c->up.buffer + c->up.off,
			    c->up.used - c->up.off, &c->frame_msgid);
		ret = msgpack_unpacker_next_with_size(&c->up, &msg, &bytes);
		if (ret != MSGPACK_UNPACK_SUCCESS)
			break;
		conn_frame(c, &msg, bytes);
	}
	msgpack_unpacked_destroy(&msg);
	if (ret == MSGPACK_UNPACK_PARSE_ERROR || ret == MSGPACK_UNPACK_NOMEM_ERROR ||
	    (!c->decode_paused && msgpack_unpacker_message_size(&c->up) > config.max_frame)) {
		/* The frame is answered, then the connection closed. */
		struct req *r = req_new(c);

		if (ret == MSGPACK_UNPACK_NOMEM_ERROR)
			log_x(L_WARN, "out of memory decoding a frame of uid %u; closing it", (unsigned)c->uid);
		if (r && ret == MSGPACK_UNPACK_PARSE_ERROR) {
			req_error(r, E_MALFORMED_REQUEST, NULL, "The frame cannot be decoded as MessagePack");
		} else if (r) {
			r->has_msgid = c->frame_has_msgid;
			r->msgid = c->frame_msgid;
			if (ret == MSGPACK_UNPACK_NOMEM_ERROR)
				req_error(r, E_FRAME_TOO_LARGE, NULL, "The frame needs more memory to decode than walletd could get");
			else
				req_error(r, E_FRAME_TOO_LARGE, NULL, "The frame is larger than %zu bytes", config.max_frame);
		}
		if (r) {
			r->state = RQ_DONE;
			conn_queue(c, r);
		}
		c->closing = 1;
		conn_mark_dirty(c);
	}
}

/*
 * Reads what c sent and decodes every whole frame in it.  Bytes are read into
 * one shared buffer and copied into the connection's decoder, which exists
 * only while a frame is incomplete or being decoded.
 */
static void
conn_read(struct conn *c)
{
	static char read_buf[READ_CHUNK];

	if (c->lingering) {
		ssize_t n = recv(c->fd, read_buf, sizeof(read_buf), 0);

		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			conn_close(c);
		return;
	}
	for (int rounds = 0; rounds < 4 && !c->closing && !c->dead; rounds++) {
		char cbuf[CMSG_SPACE(sizeof(int))];
		struct iovec iov;
		struct msghdr mh;
		struct cmsghdr *cm;
		ssize_t n;

		iov.iov_base = read_buf;
		iov.iov_len = sizeof(read_buf);
		memset(&mh, 0, sizeof(mh));
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cbuf;
		mh.msg_controllen = sizeof(cbuf);
		n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC);
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
			break;
		if (n <= 0) {
			/* The peer left: its requests still complete, their answers are dropped. */
			conn_close(c);
			return;
		}
		for (cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
				if (c->passed_fd >= 0)
					close(c->passed_fd);
				memcpy(&c->passed_fd, CMSG_DATA(cm), sizeof(int));
			}
		c->last_active = now_micros();
		if ((!c->up_ready && !msgpack_unpacker_init(&c->up, (size_t)n)) ||
		    !msgpack_unpacker_reserve_buffer(&c->up, (size_t)n)) {
			c->closing = 1;
			break;
		}
		c->up_ready = 1;
		memcpy(msgpack_unpacker_buffer(&c->up), read_buf, (size_t)n);
		msgpack_unpacker_buffer_consumed(&c->up, (size_t)n);
		conn_decode(c);
		if (c->decode_paused)
			break;
		if ((size_t)n < iov.iov_len)
			break;
	}
}

/*
 * Drops the decoder of a connection quiet for a second with no partial frame:
 * 10,000 idle connections cost only their structs, while a busy one keeps
 * its decoder (three allocations fewer per request).
 */
static void
conn_drop_decoder(struct conn *c, uint64_t now)
{
	if (c->up_ready && c->up.used == c->up.off && c->up.parsed == 0 &&
	    now - c->last_active > 1000000u) {
		msgpack_unpacker_destroy(&c->up);
		c->up_ready = 0;
	}
}

/* ---- Accepting ---- */

/* Answers a new connection too_many_connections; closes it unless c holds it
 * (then it lingers). */
static void
conn_refuse(int fd, struct conn *c)
{
	static const char refusal[] = "\x94\x01\xc0\x82\xa4" "code" "\xb4" "too_many_connections"
	    "\xa7" "message" "\xd9\x1f" "Too many connections; try later" "\xc0";

	if (send(fd, refusal, sizeof(refusal) - 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
		log_p("refusing a connection");
	if (c)
		conn_linger(c);
	else
		close(fd);
	stats.conns_refused++;
}

/*
 * accept failed with err.  The listening socket stays readable, so the loop
 * must not simply return to epoll (it spun at 100% CPU, logging 1.8 million
 * lines in 1.5 s, out of descriptors).  Out of descriptors, the spare one
 * is closed to take the connection, which is refused like one over
 * max_connections, and reopened.  Otherwise the listening socket leaves
 * epoll until the next sweep, within a second.  Logs once a sweep.
 * Returns 1 when the caller should accept again.
 */
static int
accept_failed(int err)
{
	int shed = (err == EMFILE || err == ENFILE) && srv.spare_fd >= 0;

	if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR || err == ECONNABORTED)
		return 0;
	if (!srv.accept_logged) {
		srv.accept_logged = 1;
		log_x(L_ERR, "cannot accept connections: %s; %s", strerror(err),
		    shed ? "refusing them (raise the open-file limit)" : "pausing for a second");
	}
	if (shed) {
		int fd;

		close(srv.spare_fd);
		fd = accept4(srv.listen_fd, NULL, NULL, SOCK_CLOEXEC);
		err = errno;
		if (fd >= 0)
			conn_refuse(fd, NULL); /* no descriptor to spare for lingering */
		srv.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
		return fd >= 0 || err == ECONNABORTED || err == EINTR; /* EAGAIN: none left */
	}
	if (!srv.accept_paused && epoll_ctl(srv.epoll_fd, EPOLL_CTL_DEL, srv.listen_fd, NULL) == 0)
		srv.accept_paused = 1;
	return 0;
}

/* Accepts every waiting connection. */
static void
conn_accept(void)
{
	for (;;) {
		int fd = accept4(srv.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		struct ucred cred;
		socklen_t len = sizeof(cred);
		struct epoll_event ev;
		struct conn *c;
		unsigned roles, reserve;
		int refuse;

		if (fd < 0) {
			if (accept_failed(errno))
				continue;
			return;
		}
		stats.conns_total++;
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
			cred = (struct ucred){ .uid = (uid_t)-1, .gid = (gid_t)-1 };
		/* The last reserved_connections slots (at most half) are for admin
		 * and payments peers: a send service leaking connections must not
		 * lock out the payment webhook or the staff.  When all are taken,
		 * no roles are looked up (a storm of retries, say). */
		reserve = config.reserved_connections < config.max_connections / 2 ?
		    config.reserved_connections : config.max_connections / 2;
		roles = srv.nconns < config.max_connections ? roles_of(cred.uid, cred.gid) : 0;
		refuse = srv.nconns >= config.max_connections ||
		    (srv.nconns + reserve >= config.max_connections && !(roles & (ROLE_ADMIN | ROLE_PAYMENTS | ROLE_STAFF)));
		if (refuse && srv.nlinger >= LINGER_MAX) {
			conn_refuse(fd, NULL);
			continue;
		}
		if ((c = calloc(1, sizeof(*c))) == NULL) {
			close(fd);
			continue;
		}
		c->fd = fd;
		c->passed_fd = -1;
		c->uid = cred.uid;
		c->gid = cred.gid;
		c->roles = roles;
		c->last_active = now_micros();
		c->events = EPOLLIN;
		ev.events = EPOLLIN;
		ev.data.ptr = c;
		if (epoll_ctl(srv.epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
			log_p("epoll_ctl");
			free(c);
			close(fd);
			continue;
		}
		c->next = srv.conns;
		if (srv.conns)
			srv.conns->prev = c;
		srv.conns = c;
		srv.nconns++;
		if (refuse)
			conn_refuse(fd, c); /* it lingers, so the client reads why */
	}
}

/* ====================================================================== */
/* 6. Event loop, writer and helper threads                               */
/* ====================================================================== */

static void alert_wake(void);
static void alert_config_lock(void);
static void alert_config_unlock(void);

/* ---- Handing writes to the writer ---- */

/* Queues r for the writer; the queue is handed over at the end of the turn. */
static void
writer_submit(struct req *r)
{
	r->qnext = NULL;
	r->conn->wweight += r->weight;
	r->conn->wbytes += r->bytes;
	srv.pend_weight += r->weight;
	srv.pend_bytes += r->bytes;
	if (srv.pend_tail)
		srv.pend_tail->qnext = r;
	else
		srv.pend_head = r;
	srv.pend_tail = r;
	srv.pend_count++;
}

/* Hands what this turn of the loop read to the writer: one lock, one signal. */
static void
writer_handover(void)
{
	if (srv.pend_head == NULL)
		return;
	pthread_mutex_lock(&srv.lock);
	if (srv.wq_tail)
		srv.wq_tail->qnext = srv.pend_head;
	else
		srv.wq_head = srv.pend_head;
	srv.wq_tail = srv.pend_tail;
	srv.wq_count += srv.pend_count;
	srv.wq_weight += srv.pend_weight;
	srv.wq_bytes += srv.pend_bytes;
	pthread_cond_signal(&srv.cond);
	pthread_mutex_unlock(&srv.lock);
	srv.pend_head = srv.pend_tail = NULL;
	srv.pend_count = srv.pend_weight = srv.pend_bytes = 0;
}

/* Wakes the event loop (done_collect). */
static void
loop_wake(void)
{
	uint64_t one = 1;

	if (write(srv.event_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		log_p("eventfd");
}

/* Puts answered requests on the done list and wakes the event loop. */
static void
done_post(struct req *first, struct req *last)
{
	pthread_mutex_lock(&srv.lock);
	if (srv.done_tail)
		srv.done_tail->qnext = first;
	else
		srv.done_head = first;
	srv.done_tail = last;
	pthread_mutex_unlock(&srv.lock);
	loop_wake();
}

/* ---- The syncer ---- */

/*
 * Whether the caller, the writer, leaves its records' sync to the syncer
 * and hands it its answers (journal_hand) rather than waiting: a single node
 * with the journal.  The writer then runs the next batch while the last is
 * synced; what any answer reveals is synced first (the event loop holds a
 * read's answer until the records it saw are: conn_pump).
 */
static int
journal_pipelined(void)
{
	return journal.syncing && !repl_on && pthread_equal(pthread_self(), srv.writer);
}

/*
 * One round of the syncer's: syncs the journal's files that hold the records
 * committed since the last round, then posts the answers of the batches
 * handed over that are now durable, and wakes the event loop.  A failed
 * sync stops walletd: the kernel may have dropped what it could not write,
 * and a restart applies the journal as the disk holds it.
 */
static void
journal_sync_round(void)
{
	struct journal_pos from, to;
	struct req *first = NULL, *last = NULL;
	uint64_t target, t0 = now_micros();
	int advanced = 0;

	pthread_mutex_lock(&journal.lock);
	target = atomic_load(&journal.written);
	from = journal.synced_end;
	to = journal.written_end;
	journal.sync_busy = target > atomic_load(&journal.synced);
	pthread_mutex_unlock(&journal.lock);
	if (target > atomic_load(&journal.synced) && !journal.failed) {
		advanced = 1;
		for (uint64_t seg = from.segment; seg <= to.segment && seg < from.segment + JOURNAL_FILES; seg++)
			if (fdatasync(journal.fds[seg % JOURNAL_FILES]) != 0) {
				log_p("journal: cannot sync records up to %" PRIu64 "; stopping", target);
				pthread_mutex_lock(&journal.lock);
				journal.failed = 1;
				pthread_mutex_unlock(&journal.lock);
				store_panic();
				advanced = 0;
				break;
			}
	}
	pthread_mutex_lock(&journal.lock);
	journal.sync_busy = 0;
	if (advanced) {
		atomic_store(&journal.synced, target);
		journal.synced_end = to;
		journal.syncs++;
		journal.sync_us += now_micros() - t0;
	}
	while (journal.handed_count && (journal.failed ||
	    journal.handed[journal.handed_head].need <= atomic_load(&journal.synced))) {
		struct handed *h = &journal.handed[journal.handed_head];

		if (h->need > atomic_load(&journal.synced)) /* the journal failed first: unknown */
			for (struct req *r = h->first; r; r = r == h->last ? NULL : r->qnext)
				if (r->code == E_OK)
					req_error(r, E_INTERNAL, NULL, "The journal could not be synced: walletd is stopping; "
					    "whether this was done is unknown: retry (a write with the same ref) once it is back");
		if (last)
			last->qnext = h->first;
		else
			first = h->first;
		last = h->last;
		journal.handed_head = (journal.handed_head + 1) % HANDED_MAX;
		journal.handed_count--;
	}
	journal.posting += first != NULL;
	pthread_cond_broadcast(&journal.cond);
	pthread_mutex_unlock(&journal.lock);
	if (first) {
		done_post(first, last); /* wakes the loop, which also releases the reads it held */
		pthread_mutex_lock(&journal.lock);
		journal.posting--;
		pthread_cond_broadcast(&journal.cond);
		pthread_mutex_unlock(&journal.lock);
	} else if (advanced) {
		loop_wake();
	}
}

/* The syncer thread: a round each time records were committed, or batches handed over. */
static void *
journal_sync_main(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&journal.lock);
	for (;;) {
		/* Work: records to sync (unless the journal failed), or batches to post (all of them once it
		 * failed: their answers then say so). */
		int work = (!journal.failed && atomic_load(&journal.written) > atomic_load(&journal.synced)) ||
		    (journal.handed_count && (journal.failed ||
		    journal.handed[journal.handed_head].need <= atomic_load(&journal.synced)));

		if (!work && journal.stop)
			break;
		if (!work) {
			pthread_cond_wait(&journal.cond, &journal.lock);
			continue;
		}
		pthread_mutex_unlock(&journal.lock);
		journal_sync_round();
		pthread_mutex_lock(&journal.lock);
	}
	pthread_mutex_unlock(&journal.lock);
	return NULL;
}

/* Waits until record number is synced (a round of its own without the syncer).  0, or EIO. */
static int
journal_wait(uint64_t number)
{
	int rc;

	if (!journal.syncing)
		journal_sync_round();
	pthread_mutex_lock(&journal.lock);
	while (atomic_load(&journal.synced) < number && !journal.failed)
		pthread_cond_wait(&journal.cond, &journal.lock);
	rc = atomic_load(&journal.synced) >= number ? 0 : EIO;
	pthread_mutex_unlock(&journal.lock);
	return rc;
}

/*
 * The writer hands a batch's requests (first to last, answered) to the
 * syncer, which posts them once the records they may reveal are synced:
 * every record committed so far.  Waits while HANDED_MAX batches wait.
 */
static void
journal_hand(struct req *first, struct req *last)
{
	struct handed *h;

	pthread_mutex_lock(&journal.lock);
	while (journal.handed_count == HANDED_MAX && !journal.failed)
		pthread_cond_wait(&journal.cond, &journal.lock);
	h = &journal.handed[(journal.handed_head + journal.handed_count) % HANDED_MAX];
	h->first = first;
	h->last = last;
	h->need = atomic_load(&journal.committed);
	journal.handed_count++;
	pthread_cond_broadcast(&journal.cond);
	pthread_mutex_unlock(&journal.lock);
}

/* After the writer stopped: waits until the syncer has synced and posted everything. */
static void
journal_drain(void)
{
	pthread_mutex_lock(&journal.lock);
	while (journal.syncing && (journal.handed_count || journal.posting ||
	    (!journal.failed && atomic_load(&journal.written) > atomic_load(&journal.synced))))
		pthread_cond_wait(&journal.cond, &journal.lock);
	pthread_mutex_unlock(&journal.lock);
}

/* ---- The writer ---- */

/*
 * Runs one batch in one write transaction, then one durable commit.  Each
 * request stays atomic on its own.  An MF_FLAT method (every write method
 * today) makes every check before its first write, so when it fails with an
 * error of its own it has written nothing (but what protocol.h says it
 * keeps with its error), and it runs in the batch's
 * transaction directly; so does a read (one behind a write of its own
 * connection).  A method without MF_FLAT would run in a nested transaction,
 * committed into the batch if it succeeds and aborted if not: LMDB allocates
 * ~2.5 MB for each, so a batch of 4,096 requests spent seconds in them under
 * ASan (whose allocator hands out fresh pages each time), and a nested
 * transaction per charge cost more than the charge.  A store error in the
 * middle of any request (a full map, an I/O error) aborts the whole batch:
 * the map is grown and the batch runs again, or, when the map cannot grow,
 * the requests that met the error answer it and the others run again
 * without them.  If the commit fails every answer becomes that failure.
 * In a replicated group, returns REPL_FENCED or REPL_UNAVAILABLE when the
 * stream did not take the batch's record: nothing is committed or answered,
 * and repl_run sends the batch on (requests it answered already are done);
 * otherwise 0.
 */
static int
writer_run(struct req *batch)
{
	uint64_t t0 = now_micros(), n = 0, commit_us = 0, seq;
	int rc, alert = 0, grows = 0;

	for (;;) {
		MDB_txn *parent;
		int store_failed = 0, map_full = 0;

		if ((rc = captured_txn_begin(&parent)) != 0) {
			for (struct req *r = batch; r; r = r->qnext)
				req_store_error(r, rc);
			break;
		}
		if (now_seconds() >= store.next_expiry && (rc = holds_expire(parent, now_seconds())) != 0) {
			mdb_txn_abort(parent);
			log_x(L_ERR, "cannot end expired holds: %s", mdb_strerror(rc));
			store.next_expiry = now_seconds() + 1; /* try again in a second, with the next batch */
			continue;
		}
		if (guard_dirty && now_seconds() != guard_flushed_at && (rc = guard_flush(parent, now_seconds())) != 0) {
			mdb_txn_abort(parent);
			log_x(L_ERR, "cannot write the fraud brake's counts: %s", mdb_strerror(rc));
			continue; /* the batch again; the counts wait for the next second */
		}
		for (struct req *r = batch; r && !store_failed; r = r->qnext) {
			MDB_txn *child = parent;
			unsigned flags = r->flags;
			int mrc, flat = (flags & MF_FLAT) || !(flags & MF_WRITE);

			if (r->done)
				continue;
			if (r->expires_ms && now_seconds() * 1000 > r->expires_ms) {
				req_error(r, E_UNAVAILABLE, NULL, "the write reached the leader after its sender stopped "
				    "waiting: nothing was done");
				continue;
			}
			if (r->failed) {
				req_store_error(r, r->failed);
				continue;
			}
			if (!flat && (mrc = mdb_txn_begin(store.env, parent, 0, &child)) != 0) {
				r->failed = mrc;
				store_failed = 1;
				continue;
			}
			mrc = req_execute(r, child, 0);
			if (!flat && mrc == 0 && r->code == E_OK)
				mrc = mdb_txn_commit(child);
			else if (!flat)
				mdb_txn_abort(child);
			if (mrc != 0) {
				r->failed = mrc;
				store_failed = 1;
				map_full |= mrc == MDB_MAP_FULL;
			}
		}
		if (!store_failed) {
			uint64_t c0 = now_micros();

			rc = store_errno(store_commit(parent));
			commit_us = now_micros() - c0;
			if (rc == 0)
				break;
			store.next_expiry = now_seconds() + 1; /* holds it ended are not: look again soon */
			if (rc == REPL_FENCED || rc == REPL_UNAVAILABLE) {
				events_added = 0;
				return rc;
			}
			if (rc != MDB_MAP_FULL) {
				log_x(L_ERR, "commit failed: %s", mdb_strerror(rc));
				for (struct req *r = batch; r; r = r->qnext)
					req_store_error(r, rc);
				pthread_mutex_lock(&srv.lock);
				stats.failed_commits++;
				stats.map_grows += (uint64_t)grows;
				pthread_mutex_unlock(&srv.lock);
				return 0;
			}
			for (struct req *r = batch; r; r = r->qnext)
				r->failed = MDB_MAP_FULL; /* the commit itself needed room */
			map_full = 1;
		} else {
			mdb_txn_abort(parent);
			store.next_expiry = now_seconds() + 1; /* holds it ended are not: look again soon */
		}
		if (map_full && store_grow(1) == 0) {
			for (struct req *r = batch; r; r = r->qnext)
				if (r->failed == MDB_MAP_FULL)
					r->failed = 0;
			grows++;
		}
	}
	alert = rc == 0 && events_added; /* a commit that recorded events: the alert thread delivers them */
	events_added = 0;
	if (batch == NULL) {
		if (alert)
			alert_wake();
		return 0;
	}
	/* Half the map used: grow now, if no read is in the way, rather than
	 * when it is full, when the grow must wait for every read (a backup of
	 * a large store, say) and the writer with it. */
	if (rc == 0 && store_used() > store.map_size / 2 && store_grow(0) == 0)
		grows++;
	seq = repl_on && rc == 0 ? repl_applied() : 0;
	for (struct req *r = batch; r; r = r->qnext) {
		alert |= r->alert && r->code == E_OK;
		r->seq = seq;
		r->done = 1;
		n++;
	}
	pthread_mutex_lock(&srv.lock);
	stats.map_grows += (uint64_t)grows;
	stats.commits++;
	stats.committed += n;
	if (n > stats.batch_max)
		stats.batch_max = n;
	histogram_add(&stats.batch_sizes, batch_bounds, n);
	stats.batch_us += now_micros() - t0;
	stats.commit_us += commit_us;
	pthread_mutex_unlock(&srv.lock);
	if (alert)
		alert_wake();
	return 0;
}

/* The writer thread: takes what is queued, up to the batch caps, and runs it. */
static void *
writer_main(void *arg)
{
	size_t previous = 0;

	(void)arg;
	for (;;) {
		struct req *batch, *last;
		size_t weight = 0, bytes = 0, taken = 0;

		pthread_mutex_lock(&srv.lock);
		while (srv.wq_head == NULL && !srv.stopping && now_seconds() < store.next_expiry &&
		    !checkpoint_idle(0) && !atomic_load(&expiry_unknown)) {
			/* Idle: asleep until a request, the first hold expires, or a checkpoint is due. */
			struct timespec until = { (time_t)store.next_expiry, 0 };
			uint64_t due = checkpoint_idle(1);

			if (repl_on && until.tv_sec > time(NULL) + 1)
				until.tv_sec = time(NULL) + 1;

			if (due) {
				clock_gettime(CLOCK_REALTIME, &until);
				until.tv_sec += (time_t)(due / 1000000);
				until.tv_nsec += (long)(due % 1000000) * 1000;
				if (until.tv_nsec >= 1000000000)
					until.tv_sec++, until.tv_nsec -= 1000000000;
			}
			if (store.next_expiry == INT64_MAX && !due && !repl_on)
				pthread_cond_wait(&srv.cond, &srv.lock);
			else
				pthread_cond_timedwait(&srv.cond, &srv.lock, &until);
		}
		if (atomic_exchange(&expiry_unknown, 0))
			store.next_expiry = 0; /* holds_expire finds the first */
		if (srv.wq_head == NULL && !srv.stopping && checkpoint_idle(0)) {
			MDB_txn *txn;

			pthread_mutex_unlock(&srv.lock);
			if (captured_txn_begin(&txn) == 0) { /* LMDB's write lock: no commit meanwhile */
				if (checkpoint_begin() != 0)
					log_x(L_ERR, "checkpoint: cannot capture the store");
				mdb_txn_abort(txn);
			}
			continue;
		}
		if (srv.wq_head == NULL && !srv.stopping) {
			pthread_mutex_unlock(&srv.lock);
			if (repl_may_write())
				writer_run(NULL); /* no request: a commit that only ends expired holds */
			else
				store.next_expiry = now_seconds() + 1; /* the leader ends them; look again when leading */
			continue;
		}
		if (config.commit_delay && previous > 1 && (srv.wq_count * 2 < previous || (repl_on && srv.wq_count < previous))) {
			/* Under load, with less than half of the last commit's count
			 * queued: the answers just sent bring requests back within
			 * microseconds; wait a moment for them to share this commit.
			 * With half or more queued, go: waiting for the rest idled
			 * the writer (-c 64 and -P 16 measured 5-10% slower). */
			struct timespec until;
			uint64_t ns;

			clock_gettime(CLOCK_REALTIME, &until);
			ns = (uint64_t)until.tv_nsec + (uint64_t)config.commit_delay * (repl_on ? 5000u : 1000u);
			until.tv_sec += (time_t)(ns / 1000000000u);
			until.tv_nsec = (long)(ns % 1000000000u);
			while (!srv.stopping && srv.wq_count < previous &&
			    pthread_cond_timedwait(&srv.cond, &srv.lock, &until) == 0)
				;
		}
		if (srv.wq_head == NULL) {
			pthread_mutex_unlock(&srv.lock);
			msgpack_sbuffer_destroy(&scratch);
			expand_free();
			touched_free();
			return NULL;
		}
		batch = last = srv.wq_head;
		if (srv.wq_weight <= config.batch_max && srv.wq_bytes <= config.batch_bytes) {
			/* All of it fits: no walk, under the lock, over requests the
			 * loop's thread has just written (0.1 us each in cache misses). */
			last = srv.wq_tail;
			taken = srv.wq_count;
			weight = srv.wq_weight;
			bytes = srv.wq_bytes;
		} else {
			for (;;) {
				taken++;
				weight += last->weight;
				bytes += last->bytes;
				if (last->qnext == NULL || weight >= config.batch_max || bytes >= config.batch_bytes)
					break;
				last = last->qnext;
			}
		}
		srv.wq_head = last->qnext;
		if (srv.wq_head == NULL)
			srv.wq_tail = NULL;
		srv.wq_count -= taken;
		srv.wq_weight -= weight;
		srv.wq_bytes -= bytes;
		previous = taken;
		last->qnext = NULL;
		pthread_mutex_unlock(&srv.lock);
		if (repl_on)
			repl_run(batch);
		else
			writer_run(batch);
		if (journal_pipelined())
			journal_hand(batch, last);
		else
			done_post(batch, last);
	}
}

/*
 * When each running helper read began, in microseconds (0: a free slot), for
 * stats' oldest_read_ms.  A read held open (a backup onto a stuck disk) keeps
 * LMDB from reusing pages: the store file grows while it lasts.
 */
static _Atomic uint64_t slow_since[SLOW_MAX];

/* ---- Slow reads, off the loop ---- */

/* How long the oldest running helper read has been open, in ms; 0 = none. */
static uint64_t
slow_oldest_ms(void)
{
	uint64_t oldest = 0;

	for (int i = 0; i < SLOW_MAX; i++) {
		uint64_t since = atomic_load(&slow_since[i]);

		if (since && (oldest == 0 || since < oldest))
			oldest = since;
	}
	return oldest ? (now_micros() - oldest) / 1000 : 0;
}

/* Runs the read r in a read transaction of its own (a helper's, or a follower writer's). */
static void
req_run_alone(struct req *r)
{
	MDB_txn *txn;
	int rc;

	pthread_rwlock_rdlock(&store.maplock);
	if ((rc = mdb_txn_begin(store.env, NULL, MDB_RDONLY, &txn)) == 0) {
		req_execute(r, txn, 0);
		mdb_txn_abort(txn);
	} else {
		req_store_error(r, rc);
	}
	pthread_rwlock_unlock(&store.maplock);
}

/* A helper thread for one slow read (verify, backup), off the event loop. */
static void *
slow_main(void *arg)
{
	struct req *r = arg;
	int slot = -1;

	for (int i = 0; i < SLOW_MAX && slot < 0; i++) {
		uint64_t free_slot = 0;

		if (atomic_compare_exchange_strong(&slow_since[i], &free_slot, now_micros()))
			slot = i;
	}
	req_run_alone(r);
	r->need = atomic_load(&journal.committed);
	if (slot >= 0)
		atomic_store(&slow_since[slot], 0);
	expand_free();
	r->qnext = NULL;
	done_post(r, r);
	return NULL;
}

static void
slow_start(struct req *r)
{
	pthread_t t;
	pthread_attr_t attr;

	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, slow_main, r) != 0) {
		req_error(r, E_BUSY, NULL, "Cannot start a helper thread; retry later");
		r->qnext = NULL;
		done_post(r, r);
	}
	pthread_attr_destroy(&attr);
}

/*
 * Starts queued slow requests on helper threads while fewer than SLOW_MAX
 * run (none once stopping): 300 verifies at once, each on a thread of its
 * own, would run out of LMDB's reader slots.
 */
static void
slow_drain(void)
{
	while (srv.slow_head && srv.slow_running < SLOW_MAX && !srv.stopping) {
		struct req *r = srv.slow_head;

		if ((srv.slow_head = r->qnext) == NULL)
			srv.slow_tail = NULL;
		srv.slow_running++;
		slow_start(r);
	}
}

/* Queues r for a helper thread. */
static void
slow_submit(struct req *r)
{
	r->qnext = NULL;
	if (srv.slow_tail)
		srv.slow_tail->qnext = r;
	else
		srv.slow_head = r;
	srv.slow_tail = r;
	slow_drain();
}

/* ---- The event loop ---- */

/* Takes the answered requests back into their connections. */
static void
done_collect(void)
{
	uint64_t value;
	struct req *r, *next;

	if (read(srv.event_fd, &value, sizeof(value)) < 0 && errno != EAGAIN)
		log_p("eventfd");
	pthread_mutex_lock(&srv.lock);
	r = srv.done_head;
	srv.done_head = srv.done_tail = NULL;
	pthread_mutex_unlock(&srv.lock);
	for (; r; r = next) {
		struct conn *c = r->conn;

		next = r->qnext;
		if (r->remote) {
			stats_count(r);
			repl_answer(r);
			continue;
		}
		c->inflight--;
		if (r->state == RQ_SLOW) {
			c->nslow--;
			srv.slow_running--;
		} else {
			c->wweight -= r->weight;
			c->wbytes -= r->bytes;
		}
		r->state = RQ_DONE;
		stats_count(r);
		conn_mark_dirty(c);
	}
	for (struct conn *c = srv.held; c; c = c->held_next) { /* the journal's syncer moved on */
		c->held = 0;
		conn_mark_dirty(c);
	}
	srv.held = NULL;
	slow_drain();
}

/* Before sleeping: move every touched connection along, hand the writer its
 * batch, and write the answers. */
static void
before_sleep(void)
{
	struct conn *c, *next;

	/* Dispatch first, so the writer starts on this turn's requests while answers go out. */
	for (c = srv.dirty; c; c = c->dirty_next) {
		conn_pump(c);
		/* Frames read earlier, now that the queue has room; again while the
		 * pump makes room at once (reads at the head answer in place), or a
		 * connection left paused with nothing queued would never be woken. */
		while (c->decode_paused && !c->closing && !c->dead && !conn_queue_full(c)) {
			conn_decode(c);
			conn_pump(c);
		}
	}
	writer_handover();
	for (c = srv.dirty, srv.dirty = NULL; c; c = next) {
		next = c->dirty_next;
		c->dirty = 0;
		if (c->dead) {
			conn_pump(c);
			if (c->inflight == 0)
				conn_free(c);
			continue;
		}
		conn_flush(c);
	}
}

/* Once a second: warns of a long read, closes connections idle for longer
 * than idle_timeout. */
static void
idle_sweep(void)
{
	uint64_t now = now_micros(), read_ms = slow_oldest_ms();
	struct conn *c, *next;

	/* A read held open (a backup onto a stuck disk) lets the store file grow
	 * until the disk is full: say so in the log, not only in stats. */
	if (config.long_read_warn && read_ms >= config.long_read_warn * 1000ull &&
	    now - srv.long_read_logged >= config.long_read_warn * 1000000ull) {
		log_x(L_WARN, "a backup or verify has held its read for %" PRIu64 " s: LMDB cannot reuse "
		    "pages freed since it began, so the store file grows until it ends", read_ms / 1000);
		srv.long_read_logged = now;
	}

	for (c = srv.conns; c; c = next) {
		next = c->next;
		conn_drop_decoder(c, now);
		if (c->lingering && now - c->last_active > LINGER_US)
			conn_close(c);
	}
	srv.accept_logged = 0;
	if (srv.accept_paused) {
		struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &srv.listen_fd };

		if (epoll_ctl(srv.epoll_fd, EPOLL_CTL_ADD, srv.listen_fd, &ev) == 0)
			srv.accept_paused = 0;
		if (srv.spare_fd < 0)
			srv.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	}
	malloc_trim(0); /* give back what bursts (batches, big frames) left behind */
	if (config.idle_timeout == 0)
		return;
	for (c = srv.conns; c; c = next) {
		next = c->next;
		if (c->inflight == 0 && c->head == NULL &&
		    now - c->last_active > (uint64_t)config.idle_timeout * 1000000u) {
			log_x(L_DEBUG, "closing idle connection of uid %u", (unsigned)c->uid);
			conn_close(c);
		}
	}
}

/* Creates the listening socket, replacing a stale one; refuses if a walletd answers there. */
static int
listen_open(const char *path)
{
	struct sockaddr_un sa;
	struct group *gr;
	struct stat st;
	int fd;

	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sa.sun_path)) {
		log_x(L_ERR, "socket path too long: %s", path);
		return -1;
	}
	strcpy(sa.sun_path, path);
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0) {
		log_p("socket");
		return -1;
	}
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
		log_x(L_ERR, "another walletd is serving %s", path);
		close(fd);
		return -1;
	}
	close(fd);
	if (lstat(path, &st) == 0 && !S_ISSOCK(st.st_mode)) {
		/* a mistyped -s once pointed at the store's data.mdb, and it was gone */
		log_x(L_ERR, "%s exists and is not a socket; not replacing it", path);
		return -1;
	}
	unlink(path); /* stale, from a crash */
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) < 0) {
		log_p("socket");
		return -1;
	}
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 1024) != 0) {
		log_p("cannot listen on %s", path);
		close(fd);
		return -1;
	}
	if (chmod(path, 0660) != 0)
		log_p("chmod %s", path);
	if (config.socket_group[0]) {
		char *end;
		unsigned long gid = strtoul(config.socket_group, &end, 10);

		/* a group name, or a numeric gid (which needs no entry in /etc/group) */
		if (*end != '\0' || end == config.socket_group)
			gid = (gr = getgrnam(config.socket_group)) ? gr->gr_gid : (unsigned long)-1;
		if (gid == (unsigned long)-1 || chown(path, (uid_t)-1, (gid_t)gid) != 0)
			log_x(L_WARN, "cannot give %s to group %s", path, config.socket_group);
	}
	return fd;
}

/* SIGHUP: reloads what can change at run time from the config file. */
static void
config_reload(void)
{
	struct config next;

	if (srv.config_path == NULL) {
		log_x(L_INFO, "SIGHUP: no config file to reload");
		return;
	}
	next = config;
	if (config_load(&next, srv.config_path) != 0) {
		log_x(L_ERR, "SIGHUP: %s has errors; nothing changed", srv.config_path);
		return;
	}
	for (size_t i = 0; i < sizeof(config_keys) / sizeof(config_keys[0]); i++) {
		const struct config_key *k = &config_keys[i];
		char *old = (char *)&config + k->offset, *new = (char *)&next + k->offset;

		if (memcmp(old, new, k->size) == 0)
			continue;
		if (!k->reloadable) {
			log_x(L_WARN, "SIGHUP: %s changes only at restart", k->name);
			continue;
		}
		alert_config_lock();
		memcpy(old, new, k->size);
		alert_config_unlock();
		log_x(L_INFO, "SIGHUP: %s changed", k->name);
	}
	roles_load();
	alert_wake();
}

/* The event loop: until SIGTERM or SIGINT. */
static void
loop_run(void)
{
	struct epoll_event evs[256];
	uint64_t last_sweep = now_micros();

	for (;;) {
		int n = epoll_wait(srv.epoll_fd, evs, 256, 1000);

		if (n < 0 && errno != EINTR) {
			log_p("epoll_wait");
			break;
		}
		for (int i = 0; i < n; i++) {
			void *p = evs[i].data.ptr;

			if (p == &srv.listen_fd) {
				conn_accept();
			} else if (p == &srv.event_fd) {
				done_collect();
			} else if (p == &srv.signal_fd) {
				struct signalfd_siginfo si;

				if (read(srv.signal_fd, &si, sizeof(si)) != sizeof(si))
					continue;
				if (si.ssi_signo == SIGHUP) {
					config_reload();
					continue;
				}
				log_x(L_INFO, "signal %u: stopping", si.ssi_signo);
				return;
			} else {
				struct conn *c = p;

				if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
					conn_read(c);
				if (!c->dead && (evs[i].events & EPOLLOUT))
					conn_mark_dirty(c);
			}
		}
		before_sleep();
		if (now_micros() - last_sweep > 1000000u) {
			idle_sweep();
			last_sweep = now_micros();
		}
	}
}

/*
 * Stops cleanly: no new connections; the writer finishes what it holds and
 * commits it; those answers are written (briefly waiting for slow readers).
 * Running helper threads finish first (the store closes after this; a verify
 * cut off by it crashed walletd on its way out); queued ones never start.
 */
static void
loop_stop(void)
{
	uint64_t deadline;

	if (!srv.accept_paused)
		epoll_ctl(srv.epoll_fd, EPOLL_CTL_DEL, srv.listen_fd, NULL);
	close(srv.listen_fd);
	unlink(config.socket);
	before_sleep();
	pthread_mutex_lock(&srv.lock);
	srv.stopping = 1;
	pthread_cond_broadcast(&srv.cond);
	pthread_mutex_unlock(&srv.lock);
	pthread_join(srv.writer, NULL);
	journal_drain();
	if (srv.slow_running)
		log_x(L_INFO, "waiting for %u slow reads to finish", srv.slow_running);
	deadline = now_micros() + 2000000u;
	for (;;) {
		int writing = 0;

		done_collect();
		for (struct conn *c = srv.conns; c; c = c->next)
			conn_mark_dirty(c);
		before_sleep();
		for (struct conn *c = srv.conns; c; c = c->next)
			writing |= c->out.len > c->out.off;
		if ((!writing || now_micros() > deadline) && srv.slow_running == 0)
			break;
		usleep(10000);
	}
}


/* ====================================================================== */
/* 7. Replication                                                         */
/* ====================================================================== */

/*
 * README: High availability.  With nats_url set, walletd is one node of a group that shares
 * one JetStream stream of commit records (their format is with the store
 * layout).  The parts:
 *   - the writer (section 6): while this node leads, store_commit publishes
 *     each batch's record with the stream's expected last sequence and a
 *     unique message id, writes it to its journal meanwhile, and commits
 *     only once the stream acknowledged it and the journal synced it
 *     (repl_prepare, repl_send_record); while another node leads, it forwards the batch's
 *     writes to the leader and answers each with the leader's answer, once
 *     this node has applied it (repl_forward);
 *   - the leader's callback queues the writes forwarded to it for its writer
 *     (repl_on_forward); done_collect sends their answers back (repl_answer);
 *   - the applier thread applies the stream's records in order;
 *   - the lease thread keeps the lease while leading, and takes it when it
 *     expires if this node has applied the whole stream.
 * Safety rests on the stream, not on the lease: a publish whose expected
 * last sequence is stale is refused, so a node that lost its lease without
 * knowing it (paused, cut off) commits nothing the stream lacks.  The lease
 * only decides who tries.  Alerts and events are sent by the leader alone.
 */

#define RECORD_VERSION   1
#define REPLOG_KEEP      100000   /* stream messages each node keeps for repair */
#define LEASE_KEY        "leader"
#define PART_ROOM        1024     /* of max_payload, left for headers */

enum { RS_SINGLE, RS_LEADER, RS_FOLLOWER, RS_CATCHING_UP, RS_DIVERGED };
static const char *const repl_role_names[] = { "single", "leader", "follower", "catching_up", "diverged" };

static atomic_int repl_refusing; /* repl.refusing, for the event loop without the lock */

static struct repl {
	natsConnection *nc;
	jsCtx *js, *ajs;          /* ajs: the applier's, with a shorter wait */
	kvStore *kv;
	char stream[80], subject[96], writes[96];
	natsSubscription *wsub;   /* while leading: forwarded writes */
	int nurls;
	char *urls[16], names[16][64]; /* nats_url's servers and their server_name (from their INFO) */
	natsConnection *pnc[16];  /* the lease thread's, one per server once the stream's leader was there */
	jsCtx *pjs[16];
	int pub;                  /* under lock: the server to publish through (the stream's leader), -1 = any */
	int applier_started;
	pthread_t applier, leaser;
	size_t part_max;          /* record bytes in one stream message */
	int had_data;             /* the store held wallets before its first record: it may only begin a stream */

	pthread_mutex_t lock;     /* guards the rest */
	pthread_cond_t cond;      /* applied, role, leader or lease changed */
	int role;                 /* RS_* */
	int refusing;             /* further behind than the stream keeps: serves nothing */
	int stopping, refresh_now;
	char leader[64];          /* the leading node, "" = none known */
	char why[256];            /* why diverged or refusing */
	struct repl_pos pos;      /* the last record committed to the store */
	uint64_t tail;            /* the last stream message taken in (parts of a record included) */
	uint64_t last;            /* the stream's last sequence, as last seen */
	uint64_t lease_rev;       /* the lease's revision while leading */
	uint64_t leader_term;     /* the leader's term id, from the lease's value (0 = unknown) */
	uint64_t lease_until;     /* now_micros: lead no longer than this */
	int64_t lease_expires_ms; /* wall clock, for status (0 = unknown) */
	uint64_t leader_applied;  /* what the lease says its holder committed */
	int64_t applied_ms;       /* when the last record applied was published */
	uint64_t batch_no;
	uint64_t published, fenced, applied_records;
	uint64_t forwarded;       /* atomic: the forwarding callback takes no lock */
	struct histogram publish_us; /* the stream's acknowledgement of a record */
} repl = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

static void
repl_role_set(int role, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void repl_step_down(const char *why);
static int repl_stream_state(jsCtx *js, uint64_t *first, uint64_t *last, int prefer);
static int repl_behind(uint64_t applied, uint64_t first, uint64_t last);
static int repl_sleep(unsigned ms);

/* Waits on repl.cond (repl.lock held) for a change, or ms. */
static void
repl_wait(unsigned ms)
{
	struct timespec until;

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += (time_t)(ms / 1000);
	until.tv_nsec += (long)(ms % 1000) * 1000000;
	if (until.tv_nsec >= 1000000000)
		until.tv_sec++, until.tv_nsec -= 1000000000;
	pthread_cond_timedwait(&repl.cond, &repl.lock, &until);
}

/* Changes the role (repl.lock held) and logs the change. */
static void
repl_role_set(int role, const char *fmt, ...)
{
	va_list ap;

	if (fmt) {
		va_start(ap, fmt);
		vsnprintf(repl.why, sizeof(repl.why), fmt, ap);
		va_end(ap);
	} else {
		repl.why[0] = '\0';
	}
	if (repl.role != role)
		log_x(role == RS_DIVERGED ? L_ERR : L_INFO, "replication: %s, was %s%s%s", repl_role_names[role],
		    repl_role_names[repl.role], repl.why[0] ? ": " : "", repl.why);
	repl.role = role;
	pthread_cond_broadcast(&repl.cond);
}

/* The position stored in txn: zero when nothing was applied yet. */
static int
repl_pos_get(MDB_txn *txn, struct repl_pos *pos)
{
	MDB_val k = { 11, "replication" }, v;
	int rc = mdb_get(txn, store.meta, &k, &v);

	memset(pos, 0, sizeof(*pos));
	if (rc == 0)
		record_copy(pos, sizeof(*pos), v);
	return rc == MDB_NOTFOUND ? 0 : rc;
}

/* Stores pos and the stream messages of its record in txn, and forgets the oldest beyond REPLOG_KEEP. */
static int
repl_pos_put(MDB_txn *txn, const struct repl_pos *pos, uint64_t first, const msgpack_sbuffer *msgs, size_t nmsgs)
{
	MDB_val k = { 11, "replication" }, v = { sizeof(*pos), (void *)pos };
	unsigned char key[8];
	MDB_cursor *cur;
	size_t off = 0;
	int rc;

	if ((rc = captured_put(txn, store.meta, &k, &v, 0)) != 0)
		return rc;
	for (size_t i = 0; i < nmsgs; i++) {
		uint32_t len;

		memcpy(&len, msgs->data + off, 4);
		be64_put(key, first + i);
		if ((rc = captured_put(txn, store.replog, &(MDB_val){ 8, key }, &(MDB_val){ len, msgs->data + off + 4 }, 0)))
			return rc;
		off += 4 + len;
	}
	if ((rc = mdb_cursor_open(txn, store.replog, &cur)) != 0)
		return rc;
	for (int i = 0; i < 4 && (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST)) == 0 &&
	    be64_get(k.mv_data) + REPLOG_KEEP < pos->applied; i++)
		rc = captured_cursor_del(cur, 0);
	mdb_cursor_close(cur);
	return rc == MDB_NOTFOUND ? 0 : rc;
}

/* Appends one message (a length, then its bytes) to a list kept in an sbuffer. */
static void
msgs_add(msgpack_sbuffer *msgs, const void *p, size_t n)
{
	uint32_t len = (uint32_t)n;

	msgpack_sbuffer_write(msgs, (const char *)&len, 4);
	msgpack_sbuffer_write(msgs, p, n);
}

/* ---- Commit records ---- */

/* One stream message: part of a record (see the layout). */
static void
repl_part_pack(msgpack_sbuffer *out, const unsigned char prev[32], const char *id, uint32_t part,
    uint32_t parts, const unsigned char sum[32], const char *p, size_t n)
{
	msgpack_packer pk;

	msgpack_sbuffer_clear(out);
	msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 7);
	msgpack_pack_uint32(&pk, RECORD_VERSION);
	msgpack_pack_bin_with_body(&pk, prev, 32);
	msgpack_pack_str_with_body(&pk, id, strlen(id));
	msgpack_pack_uint32(&pk, part);
	msgpack_pack_uint32(&pk, parts);
	msgpack_pack_bin_with_body(&pk, sum, 32);
	msgpack_pack_bin_with_body(&pk, p, n);
}

struct part {
	const unsigned char *prev, *sum;
	struct str id;
	uint32_t part, parts;
	const char *p;
	size_t n;
};

/* Decodes a stream message into part (pointing into u).  Returns 0, or -1 if it is not one. */
static int
repl_part_parse(msgpack_unpacked *u, const void *data, size_t len, struct part *pt)
{
	const msgpack_object *a;

	if (msgpack_unpack_next(u, data, len, NULL) != MSGPACK_UNPACK_SUCCESS || u->data.type != MSGPACK_OBJECT_ARRAY ||
	    u->data.via.array.size != 7)
		return -1;
	a = u->data.via.array.ptr;
	if (a[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER || a[0].via.u64 != RECORD_VERSION ||
	    a[1].type != MSGPACK_OBJECT_BIN || a[1].via.bin.size != 32 || a[2].type != MSGPACK_OBJECT_STR ||
	    a[3].type != MSGPACK_OBJECT_POSITIVE_INTEGER || a[4].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
	    a[3].via.u64 >= a[4].via.u64 || a[4].via.u64 > UINT32_MAX || a[5].type != MSGPACK_OBJECT_BIN ||
	    a[5].via.bin.size != 32 || a[6].type != MSGPACK_OBJECT_BIN)
		return -1;
	pt->prev = (const unsigned char *)a[1].via.bin.ptr;
	pt->id = (struct str){ a[2].via.str.ptr, a[2].via.str.size };
	pt->part = (uint32_t)a[3].via.u64;
	pt->parts = (uint32_t)a[4].via.u64;
	pt->sum = (const unsigned char *)a[5].via.bin.ptr;
	pt->p = a[6].via.bin.ptr;
	pt->n = a[6].via.bin.size;
	return 0;
}

/*
 * Publishes one message right after stream sequence expected, with msgid:
 * the same id and expectation again after a timeout, so that a message that
 * did land is answered as a duplicate, with its sequence, until deadline.
 * The message names expected in its own header too (Walletd-After): a
 * stream leader just elected may take it elsewhere (nats-server 2.9 checks
 * the expectation before it applied all its predecessor committed), and
 * every applier then skips it, as its publisher did (repl_take).
 * Returns 0 with *seq, REPL_FENCED (the stream's last is another), or
 * REPL_UNAVAILABLE.  A leader's record (term: the term it leads in, or 0
 * for a repair) is given up too once that term is over: its writer is then
 * free for the next leader's turn, this node's or another's.
 */
static _Atomic uint64_t lead_term; /* while leading: this term's id, in the lease's value; else 0 */

static int
repl_send(const char *msgid, uint64_t expected, const void *data, size_t len, uint64_t deadline, uint64_t term,
    uint64_t *seq)
{
	char buf[24];

	snprintf(buf, sizeof(buf), "%" PRIu64, expected);
	for (int tries = 0;; tries++) {
		natsMsg *m = NULL;
		jsPubAck *pa = NULL;
		jsCtx *js;
		jsPubOptions o;
		jsErrCode err = 0;
		natsStatus s;

		jsPubOptions_Init(&o);
		o.MaxWait = 2000;
		pthread_mutex_lock(&repl.lock);
		js = repl.pub >= 0 ? repl.pjs[repl.pub] : repl.js;
		pthread_mutex_unlock(&repl.lock);
		if ((s = natsMsg_Create(&m, repl.subject, NULL, data, (int)len)) == NATS_OK &&
		    (s = natsMsgHeader_Set(m, "Nats-Expected-Last-Sequence", buf)) == NATS_OK &&
		    (s = natsMsgHeader_Set(m, "Walletd-After", buf)) == NATS_OK &&
		    (s = natsMsgHeader_Set(m, "Nats-Msg-Id", msgid)) == NATS_OK)
			s = js_PublishMsg(&pa, js, m, &o, &err);
		natsMsg_Destroy(m);
		if (s == NATS_OK) {
			*seq = pa->Sequence;
			jsPubAck_Destroy(pa);
			if (*seq == expected + 1)
				return 0;
			log_x(L_WARN, "replication: the stream took %s at %" PRIu64 ", not after %" PRIu64, msgid, *seq, expected);
			return REPL_FENCED;
		}
		if (err == JSStreamWrongLastSequenceErr) {
			log_x(L_INFO, "replication: the stream refused %s after %" PRIu64 ": %s", msgid, expected,
			    nats_GetLastError(NULL));
			return REPL_FENCED;
		}
		if (tries == 0 || tries % 20 == 0)
			log_x(L_WARN, "replication: publishing %s: %s (%d); trying again", msgid, natsStatus_GetText(s), (int)err);
		pthread_mutex_lock(&repl.lock);
		repl.pub = -1; /* through any server, until the lease thread finds the stream's leader again */
		pthread_mutex_unlock(&repl.lock);
		if (term && atomic_load(&lead_term) != term)
			deadline = 0; /* this term is over */
		if (now_micros() >= deadline)
			return REPL_UNAVAILABLE;
		usleep(100000);
	}
}

/*
 * The leader's first half of store_commit: packs the record of txn (from
 * the writing thread's touched keys) into its stream messages, in o, and
 * stores in txn the position it will have once the stream took them right
 * after its last sequence, with the messages (the journal's record then
 * holds them too).  Returns 0 with pos and o (outgoing_free), REPL_FENCED
 * when this node may not write now (not leading, its lease run out, the
 * store behind the stream), or an error.
 */
static int
repl_prepare(MDB_txn *txn, struct repl_pos *pos, struct outgoing *o)
{
	msgpack_sbuffer rec, part;
	struct repl_pos stored;
	unsigned char prev[32];
	int rc;

	memset(o, 0, sizeof(*o));
	msgpack_sbuffer_init(&o->msgs);
	o->t0 = now_micros();
	if ((rc = repl_pos_get(txn, &stored)) != 0)
		return rc;
	pthread_mutex_lock(&repl.lock);
	rc = repl.role != RS_LEADER || o->t0 >= repl.lease_until || stored.applied != repl.pos.applied ? REPL_FENCED : 0;
	o->expected = repl.tail;
	o->term = atomic_load(&lead_term);
	memcpy(prev, repl.pos.sum, 32);
	if (stored.applied == 0 && repl.had_data) /* no node can apply this on an empty store */
		SHA256((const unsigned char *)"a store that held data", 22, prev);
	snprintf(o->id, sizeof(o->id), "%s.%" PRIu64 ".%" PRIu64, config.node, repl.lease_rev, ++repl.batch_no);
	if (rc == REPL_FENCED) {
		repl.fenced++;
		repl.refresh_now = 1; /* is the lease still ours? */
		pthread_cond_broadcast(&repl.cond);
	}
	pthread_mutex_unlock(&repl.lock);
	if (rc != 0)
		return rc;
	msgpack_sbuffer_init(&rec);
	msgpack_sbuffer_init(&part);
	if ((rc = record_pack(txn, &rec, 1)) == 0) {
		SHA256((const unsigned char *)rec.data, rec.size, pos->sum);
		o->parts = (uint32_t)(rec.size / repl.part_max + 1);
		for (uint32_t i = 0; i < o->parts; i++) {
			size_t off = (size_t)i * repl.part_max, n = rec.size - off < repl.part_max ? rec.size - off : repl.part_max;

			repl_part_pack(&part, prev, o->id, i, o->parts, pos->sum, rec.data + off, n);
			msgs_add(&o->msgs, part.data, part.size);
		}
		pos->applied = o->expected + o->parts;
		rc = repl_pos_put(txn, pos, o->expected + 1, &o->msgs, o->parts);
	}
	msgpack_sbuffer_destroy(&rec);
	msgpack_sbuffer_destroy(&part);
	return rc;
}

static void
outgoing_free(struct outgoing *o)
{
	msgpack_sbuffer_destroy(&o->msgs);
}

/*
 * The second half: publishes o's messages, each right after the one before
 * (the first after o->expected), with unique message ids.  Returns 0 once
 * the stream took them all where repl_prepare said, REPL_FENCED (the stream's
 * last is another: not this node's turn), or REPL_UNAVAILABLE (no answer
 * within failover_wait: whether the stream holds them is unknown; if it does,
 * the applier applies them).
 */
static int
repl_send_record(struct outgoing *o)
{
	uint64_t expected = o->expected, seq = 0, deadline = o->t0 + config.failover_wait * 1000000ull, us;
	char msgid[180];
	size_t off = 0;
	int rc = 0;

	for (uint32_t i = 0; i < o->parts && rc == 0; i++) {
		uint32_t len;

		memcpy(&len, o->msgs.data + off, 4);
		snprintf(msgid, sizeof(msgid), "%s.%" PRIu32, o->id, i);
		if ((rc = repl_send(msgid, expected, o->msgs.data + off + 4, len, deadline, o->term, &seq)) == 0)
			expected = seq;
		off += 4 + len;
	}
	us = now_micros() - o->t0;
	if (rc == REPL_UNAVAILABLE)
		log_x(L_WARN, "replication: the stream did not answer for %s within failover_wait or this node's term: "
		    "its writes are answered unavailable (if the stream holds it, every node applies it)", o->id);
	pthread_mutex_lock(&repl.lock);
	if (rc == 0) {
		repl.published++;
		histogram_add(&repl.publish_us, latency_bounds, us);
	} else if (rc == REPL_FENCED) {
		repl.fenced++;
		repl.refresh_now = 1; /* is the lease still ours? */
		pthread_cond_broadcast(&repl.cond);
	}
	if (seq > repl.tail)
		repl.tail = seq; /* parts the stream took are in it, whatever became of the rest */
	pthread_mutex_unlock(&repl.lock);
	return rc;
}

/* After a published record's local commit: the node's position moves to it. */
static void
repl_committed(const struct repl_pos *pos)
{
	pthread_mutex_lock(&repl.lock);
	repl.pos = *pos;
	repl.applied_ms = now_seconds() * 1000;
	pthread_cond_broadcast(&repl.cond);
	pthread_mutex_unlock(&repl.lock);
}

/* ---- The applier ---- */

/* A record being put together from its parts. */
struct assembly {
	msgpack_sbuffer bytes, msgs;
	unsigned char prev[32], sum[32];
	char id[160];
	uint32_t next, parts;
	uint64_t first;
};

/* Marks this node diverged (the stream lost or forked history) and says why. */
static void __attribute__((format(printf, 1, 2)))
repl_diverge(const char *fmt, ...)
{
	char why[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	pthread_mutex_lock(&repl.lock);
	if (repl.role == RS_LEADER)
		repl_step_down(why);
	repl_role_set(RS_DIVERGED, "%s", why);
	pthread_mutex_unlock(&repl.lock);
}

/* The id of the record whose (last) message this node keeps at stream sequence seq, into id ("?": none kept). */
static void
replog_id(MDB_txn *txn, uint64_t seq, char id[160])
{
	unsigned char key[8];
	MDB_val k = { 8, key }, v;
	msgpack_unpacked u;
	struct part pt;

	be64_put(key, seq);
	snprintf(id, 160, "?");
	msgpack_unpacked_init(&u);
	if (mdb_get(txn, store.replog, &k, &v) == 0 && repl_part_parse(&u, v.mv_data, v.mv_size, &pt) == 0)
		snprintf(id, 160, "%.*s", (int)pt.id.n, pt.id.p);
	msgpack_unpacked_destroy(&u);
}

/*
 * Applies a whole record (seq: its last message) in one transaction, with
 * the position and its messages.  A record this node has already committed
 * (its own, as leader) is skipped; one made on another history than this
 * store's makes the node diverged.
 */
static void
repl_apply(struct assembly *a, uint64_t seq, int64_t published_ms)
{
	struct repl_pos stored, pos;
	unsigned char sum[32];
	MDB_txn *txn;
	int rc;

	pthread_mutex_lock(&repl.lock);
	rc = seq <= repl.pos.applied; /* this node's own, as leader: no write transaction to see so */
	pthread_mutex_unlock(&repl.lock);
	if (rc)
		return;
	SHA256((const unsigned char *)a->bytes.data, a->bytes.size, sum);
	if (memcmp(sum, a->sum, 32) != 0) {
		repl_diverge("the record ending at %" PRIu64 " fails its checksum (%zu bytes)", seq, a->bytes.size);
		return;
	}
	for (;;) {
		pthread_rwlock_rdlock(&store.maplock);
		if ((rc = captured_txn_begin(&txn)) == 0 && (rc = repl_pos_get(txn, &stored)) == 0) {
			if (seq <= stored.applied) {
				mdb_txn_abort(txn);
				pthread_rwlock_unlock(&store.maplock);
				break;
			}
			if (memcmp(a->prev, stored.sum, 32) != 0 || (stored.applied == 0 && repl.had_data)) {
				char mine[160];

				replog_id(txn, stored.applied, mine);
				mdb_txn_abort(txn);
				pthread_rwlock_unlock(&store.maplock);
				if (stored.applied == 0)
					repl_diverge("the stream holds records this node's store does not start from: seed it from a "
					    "backup of a node of the group (a store with data may only begin a new stream)");
				else
					repl_diverge("the record at %" PRIu64 " (%s) follows another history than the record at %"
					    PRIu64 " (%s) this node applied", seq, a->id, stored.applied, mine);
				return;
			}
			pos.applied = seq;
			memcpy(pos.sum, sum, 32);
			if ((rc = record_apply(txn, a->bytes.data, a->bytes.size, 1)) == 0 &&
			    (rc = repl_pos_put(txn, &pos, a->first, &a->msgs, a->parts)) == 0)
				rc = store_commit_durable(txn, 1);
			else
				mdb_txn_abort(txn);
		}
		pthread_rwlock_unlock(&store.maplock);
		if (rc == 0) {
			pthread_mutex_lock(&repl.lock);
			repl.pos = pos;
			repl.applied_records++;
			repl.applied_ms = published_ms;
			pthread_cond_broadcast(&repl.cond);
			pthread_mutex_unlock(&repl.lock);
			break;
		}
		if (rc == EINVAL) {
			repl_diverge("the record at %" PRIu64 " does not decode (%zu bytes)", seq, a->bytes.size);
			return;
		}
		if (rc == MDB_MAP_FULL && store_grow(1) == 0)
			continue;
		/* A full disk: nothing after this record can be applied either. */
		log_x(L_ERR, "replication: cannot apply the record at %" PRIu64 ": %s; trying again in a second",
		    seq, mdb_strerror(store_errno(rc)));
		sleep(1);
		pthread_mutex_lock(&repl.lock);
		rc = repl.stopping;
		pthread_mutex_unlock(&repl.lock);
		if (rc)
			return;
	}
}

/*
 * Takes in the stream message at seq: a part, or the whole, of a record.
 * One the stream took elsewhere than its publisher asked is skipped.
 */
static void
repl_take(struct assembly *a, natsMsg *m, uint64_t seq, int64_t published_ms)
{
	const char *after;
	msgpack_unpacked u;
	struct part pt;

	if (natsMsgHeader_Get(m, "Walletd-After", &after) == NATS_OK && strtoull(after, NULL, 10) + 1 != seq) {
		log_x(L_WARN, "replication: the stream took the message at %" PRIu64 " where its publisher did not "
		    "want it (after %s): it was never answered, skipped", seq, after);
		goto tail;
	}
	msgpack_unpacked_init(&u);
	if (repl_part_parse(&u, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), &pt) != 0) {
		msgpack_unpacked_destroy(&u);
		repl_diverge("the stream message at %" PRIu64 " is not a walletd record (version %" PRIu64 " is this one's)",
		    seq, (uint64_t)RECORD_VERSION);
		return;
	}
	if (pt.part == 0) {
		/* A new record; parts of one before it that never ended (its
		 * leader died between them) were never committed: dropped. */
		msgpack_sbuffer_clear(&a->bytes);
		msgpack_sbuffer_clear(&a->msgs);
		memcpy(a->prev, pt.prev, 32);
		memcpy(a->sum, pt.sum, 32);
		snprintf(a->id, sizeof(a->id), "%.*s", (int)pt.id.n, pt.id.p);
		a->parts = pt.parts;
		a->next = 0;
		a->first = seq;
	}
	if (pt.part == a->next && pt.parts == a->parts && strlen(a->id) == pt.id.n &&
	    memcmp(a->id, pt.id.p, pt.id.n) == 0) {
		msgpack_sbuffer_write(&a->bytes, pt.p, pt.n);
		msgs_add(&a->msgs, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m));
		if (++a->next == a->parts)
			repl_apply(a, seq, published_ms);
	}
	msgpack_unpacked_destroy(&u);
tail:
	pthread_mutex_lock(&repl.lock);
	if (seq > repl.tail)
		repl.tail = seq;
	pthread_cond_broadcast(&repl.cond);
	pthread_mutex_unlock(&repl.lock);
}

/* The applier: reads the stream from the record after this node's position, in order. */
static void *
repl_apply_main(void *arg)
{
	natsSubscription *sub = NULL;
	struct assembly a;
	uint64_t heard = 0;       /* when the subscription last delivered, or was made */
	uint64_t patience = 500000; /* how long it may stay silent while the stream moves on */
	unsigned failures = 0;

	(void)arg;
	memset(&a, 0, sizeof(a));
	msgpack_sbuffer_init(&a.bytes);
	msgpack_sbuffer_init(&a.msgs);
	for (;;) {
		natsMsg *m = NULL;
		jsMsgMetaData *meta = NULL;
		natsStatus s;
		int role, stop;

		pthread_mutex_lock(&repl.lock);
		while (!repl.stopping && (repl.role == RS_DIVERGED || repl.refusing))
			pthread_cond_wait(&repl.cond, &repl.lock);
		stop = repl.stopping;
		role = repl.role;
		if (sub == NULL)
			repl.tail = repl.pos.applied;
		pthread_mutex_unlock(&repl.lock);
		if (stop)
			break;
		if (sub == NULL) {
			uint64_t first, last;
			jsSubOptions so;
			jsErrCode err = 0;

			if (repl_stream_state(repl.ajs, &first, &last, 0) != 0) {
				repl_sleep(1000);
				continue;
			}
			if (repl_behind(repl_applied(), first, last))
				continue; /* serves nothing until seeded: waits above */
			jsSubOptions_Init(&so);
			so.Stream = repl.stream;
			so.Ordered = true;
			so.Config.DeliverPolicy = js_DeliverByStartSequence;
			so.Config.OptStartSeq = repl.tail + 1;
			if ((s = js_SubscribeSync(&sub, repl.ajs, repl.subject, NULL, &so, &err)) != NATS_OK) {
				if (failures++ % 20 == 0) /* tried again soon: catching up after a heal is quick */
					log_x(L_WARN, "replication: cannot read the stream: %s (%d)", nats_GetLastError(NULL),
					    (int)err);
				sub = NULL;
				repl_sleep(250);
				continue;
			}
			failures = 0;
			natsSubscription_SetPendingLimits(sub, -1, -1);
			a.parts = a.next = 0;
			heard = now_micros();
		}
		s = natsSubscription_NextMsg(&m, sub, 200);
		if (s == NATS_TIMEOUT && now_micros() - heard >= patience) {
			/*
			 * The stream moved on and nothing came for half a second: after a
			 * partition the consumer may live on a server that lost it, which
			 * the library notices only after missed heartbeats (seconds).  A
			 * new one silent too gets twice as long, up to 2 s (a busy server
			 * may take that long to start one).
			 */
			uint64_t first, last, tail;

			heard = now_micros();
			pthread_mutex_lock(&repl.lock);
			tail = repl.tail;
			pthread_mutex_unlock(&repl.lock);
			if (repl_stream_state(repl.ajs, &first, &last, 0) == 0 && last > tail) {
				log_x(L_INFO, "replication: the stream is at %" PRIu64 " and nothing came after %" PRIu64
				    " for %" PRIu64 " ms: reading it again", last, tail, patience / 1000);
				natsSubscription_Destroy(sub);
				sub = NULL;
				patience = patience < 1000000 ? patience * 2 : 2000000;
			}
			continue;
		}
		if (s == NATS_TIMEOUT)
			continue;
		heard = now_micros();
		patience = 500000;
		if (s != NATS_OK) {
			log_x(L_WARN, "replication: reading the stream: %s", natsStatus_GetText(s));
			natsSubscription_Destroy(sub);
			sub = NULL;
			continue;
		}
		if (natsMsg_GetMetaData(&meta, m) == NATS_OK) {
			if (role != RS_DIVERGED)
				repl_take(&a, m, meta->Sequence.Stream, meta->Timestamp / 1000000);
			jsMsgMetaData_Destroy(meta);
		}
		natsMsg_Destroy(m);
	}
	if (sub)
		natsSubscription_Destroy(sub);
	msgpack_sbuffer_destroy(&a.bytes);
	msgpack_sbuffer_destroy(&a.msgs);
	touched_free();
	expand_free(); /* record_chain read transactions */
	return NULL;
}

/* ---- Forwarded writes ---- */

/* The writes a follower forwarded in one message, being run by the leader's writer. */
struct remote {
	natsMsg *msg;             /* the (last) message: its reply subject, and the bytes env points into */
	char *data;               /* the bytes of a message that came in parts, or NULL */
	msgpack_unpacked env;
	struct req **reqs;
	uint32_t n, pending;
};

static int req_parse(struct req *r, unsigned roles);

static void
remote_free(struct remote *rm)
{
	for (uint32_t i = 0; i < rm->n; i++)
		if (rm->reqs[i])
			req_free(rm->reqs[i]);
	msgpack_unpacked_destroy(&rm->env);
	natsMsg_Destroy(rm->msg);
	free(rm->data);
	free(rm->reqs);
	free(rm);
}

/*
 * The leader's memory of the forward each follower has in flight (a follower
 * forwards one message at a time): a follower sends a forward again while no
 * answer came, for NATS drops a message on a route being cut, either way.
 * Here a forward seen again is answered again, never run again; one not seen
 * runs only if it was sent to this term.  Forgotten when a term starts.
 */
struct forward_seen {
	char origin[64];          /* the follower's node name */
	char reply[160];          /* its forward's reply subject: unique to that forward */
	msgpack_sbuffer answer;   /* empty until it is answered */
	struct forward_seen *next;
};

static struct {
	pthread_mutex_t lock;
	struct forward_seen *list; /* one per follower */
} forwards = { .lock = PTHREAD_MUTEX_INITIALIZER };


static void
forward_seen_forget(void)
{
	pthread_mutex_lock(&forwards.lock);
	while (forwards.list) {
		struct forward_seen *f = forwards.list;

		forwards.list = f->next;
		msgpack_sbuffer_destroy(&f->answer);
		free(f);
	}
	pthread_mutex_unlock(&forwards.lock);
}

/*
 * Whether the forward msg from the follower origin runs: not when it was seen
 * (then its answer, if any, goes again), nor when it is a retry sent to
 * another term (that term's leader may have run it).
 */
static int
forward_seen_runs(natsMsg *msg, const msgpack_object *origin)
{
	const char *reply = natsMsg_GetReply(msg), *retry = NULL;
	struct forward_seen *f;
	int runs = 1;

	if (origin->type != MSGPACK_OBJECT_STR || origin->via.str.size >= sizeof(f->origin) ||
	    strlen(reply) >= sizeof(f->reply))
		return 1;
	natsMsgHeader_Get(msg, "Walletd-Retry", &retry);
	pthread_mutex_lock(&forwards.lock);
	for (f = forwards.list; f && (strlen(f->origin) != origin->via.str.size ||
	    memcmp(f->origin, origin->via.str.ptr, origin->via.str.size) != 0); f = f->next)
		;
	if (f == NULL && (f = calloc(1, sizeof(*f))) != NULL) {
		memcpy(f->origin, origin->via.str.ptr, origin->via.str.size);
		msgpack_sbuffer_init(&f->answer);
		f->next = forwards.list;
		forwards.list = f;
	}
	if (f && strcmp(f->reply, reply) == 0) {
		if (f->answer.size)
			natsConnection_Publish(repl.nc, reply, f->answer.data, (int)f->answer.size);
		runs = 0;
	} else if (retry && strtoull(retry, NULL, 16) != atomic_load(&lead_term)) {
		runs = 0;
	} else if (f) {
		snprintf(f->reply, sizeof(f->reply), "%s", reply);
		msgpack_sbuffer_clear(&f->answer);
	}
	pthread_mutex_unlock(&forwards.lock);
	return runs;
}

/* Keeps the answer sent to the forward with the reply subject reply. */
static void
forward_seen_answer(const char *reply, const msgpack_sbuffer *answer)
{
	pthread_mutex_lock(&forwards.lock);
	for (struct forward_seen *f = forwards.list; f; f = f->next)
		if (strcmp(f->reply, reply) == 0)
			msgpack_sbuffer_write(&f->answer, answer->data, answer->size);
	pthread_mutex_unlock(&forwards.lock);
}

/* Sends rm's answers: [seq, [[code, answer frame], ...]], seq the record of the last write. */
static void
repl_reply(struct remote *rm)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	uint64_t seq = 0;

	for (uint32_t i = 0; i < rm->n; i++)
		seq = rm->reqs[i]->seq > seq ? rm->reqs[i]->seq : seq;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 2);
	msgpack_pack_uint64(&pk, seq);
	msgpack_pack_array(&pk, rm->n);
	for (uint32_t i = 0; i < rm->n; i++) {
		msgpack_pack_array(&pk, 2);
		msgpack_pack_int(&pk, rm->reqs[i]->code);
		msgpack_pack_bin_with_body(&pk, rm->reqs[i]->out.data, rm->reqs[i]->out.size);
	}
	forward_seen_answer(natsMsg_GetReply(rm->msg), &sb);
	if (natsConnection_Publish(repl.nc, natsMsg_GetReply(rm->msg), sb.data, (int)sb.size) != NATS_OK)
		log_x(L_WARN, "replication: cannot answer forwarded writes: %s", nats_GetLastError(NULL));
	msgpack_sbuffer_destroy(&sb);
	remote_free(rm);
}

/* done_collect: a forwarded write is answered; the last of its message sends them all back. */
static void
repl_answer(struct req *r)
{
	if (--r->remote->pending == 0)
		repl_reply(r->remote);
}

/*
 * A message too large for one NATS message travels in parts, each with the
 * headers Walletd-Forward (an id) and Walletd-Part ("i/n"); the leader
 * answers each but the last with an empty message.  One at a time per id.
 */
static struct pending_part {
	char id[96];
	char *data;
	size_t len;
	unsigned next;
	struct pending_part *next_one;
} *pending_parts; /* the callback's own: cnats calls it on one thread */

/* Puts a forwarded message's parts together: returns the whole once its last part is in (*data is then the
 * caller's), 1 when a part was kept, -1 when parts came out of order. */
static int
forward_part(natsMsg *msg, char **data, size_t *len)
{
	const char *id = NULL, *part = NULL;
	struct pending_part **pp, *p;
	unsigned i, n;

	if (natsMsgHeader_Get(msg, "Walletd-Part", &part) != NATS_OK || sscanf(part, "%u/%u", &i, &n) != 2 ||
	    natsMsgHeader_Get(msg, "Walletd-Forward", &id) != NATS_OK || i >= n)
		return 0;
	for (pp = &pending_parts; *pp && strcmp((*pp)->id, id) != 0; pp = &(*pp)->next_one)
		;
	if ((p = *pp) == NULL && i == 0 && (p = calloc(1, sizeof(*p))) != NULL) {
		snprintf(p->id, sizeof(p->id), "%s", id);
		p->next_one = pending_parts;
		pending_parts = p;
		pp = &pending_parts;
	}
	if (p == NULL || p->next != i) {
		if (p) {
			*pp = p->next_one;
			free(p->data);
			free(p);
		}
		return -1;
	}
	char *grown = realloc(p->data, p->len + (size_t)natsMsg_GetDataLength(msg) + 1);

	if (grown == NULL)
		return -1;
	p->data = grown;
	memcpy(p->data + p->len, natsMsg_GetData(msg), (size_t)natsMsg_GetDataLength(msg));
	p->len += (size_t)natsMsg_GetDataLength(msg);
	if (++p->next < n)
		return 1;
	*data = p->data;
	*len = p->len;
	*pp = p->next_one;
	free(p);
	return 0;
}

/*
 * The leader's callback for a follower's forwarded writes, [node, expires,
 * [[uid, frame], ...]]: each becomes a request for the writer, as if read
 * from a connection here, its roles already checked where its client is.
 */
static void
repl_on_forward(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *arg)
{
	struct remote *rm = calloc(1, sizeof(*rm));
	const msgpack_object *items;
	struct req *head = NULL, *tail = NULL;
	size_t count = 0, weight = 0, bytes = 0, len = (size_t)natsMsg_GetDataLength(msg);
	const char *data = natsMsg_GetData(msg);
	int part;

	(void)nc, (void)sub, (void)arg;
	if (rm == NULL || natsMsg_GetReply(msg) == NULL) {
		free(rm);
		natsMsg_Destroy(msg);
		return;
	}
	rm->msg = msg;
	msgpack_unpacked_init(&rm->env);
	if ((part = forward_part(msg, &rm->data, &len)) != 0) {
		if (part > 0)
			natsConnection_Publish(repl.nc, natsMsg_GetReply(msg), "", 0);
		remote_free(rm);
		return; /* a part kept; or one out of order, then the sender times out */
	}
	if (rm->data)
		data = rm->data;
	if (msgpack_unpack_next(&rm->env, data, len, NULL) != MSGPACK_UNPACK_SUCCESS ||
	    rm->env.data.type != MSGPACK_OBJECT_ARRAY || rm->env.data.via.array.size != 3 ||
	    rm->env.data.via.array.ptr[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
	    (items = &rm->env.data.via.array.ptr[2])->type != MSGPACK_OBJECT_ARRAY || items->via.array.size == 0 ||
	    (rm->reqs = calloc(items->via.array.size, sizeof(*rm->reqs))) == NULL)
		goto bad;
	if (!forward_seen_runs(msg, &rm->env.data.via.array.ptr[0])) {
		remote_free(rm);
		return;
	}
	for (uint32_t i = 0; i < items->via.array.size; i++) {
		const msgpack_object *it = &items->via.array.ptr[i];
		struct req *r;

		if (it->type != MSGPACK_OBJECT_ARRAY || it->via.array.size != 2 ||
		    it->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
		    it->via.array.ptr[1].type != MSGPACK_OBJECT_BIN || (r = calloc(1, sizeof(*r))) == NULL)
			goto bad; /* a follower of another version, or not a follower: nothing was queued */
		rm->reqs[rm->n++] = r;
		r->remote = rm;
		r->fd = -1;
		r->method = -1;
		r->uid = (uid_t)it->via.array.ptr[0].via.u64;
		r->expires_ms = (int64_t)rm->env.data.via.array.ptr[1].via.u64;
		if (rm->env.data.via.array.ptr[0].type == MSGPACK_OBJECT_STR)
			r->origin = (struct str){ rm->env.data.via.array.ptr[0].via.str.ptr,
			    rm->env.data.via.array.ptr[0].via.str.size };
		r->t0 = now_micros();
		r->bytes = it->via.array.ptr[1].via.bin.size;
		msgpack_unpacked_init(&r->msg);
		if (msgpack_unpack_next(&r->msg, it->via.array.ptr[1].via.bin.ptr, r->bytes, NULL) != MSGPACK_UNPACK_SUCCESS) {
			req_error(r, E_MALFORMED_REQUEST, NULL, "The forwarded frame does not decode");
			continue;
		}
		if (req_parse(r, R_ALL) != 0)
			continue;
		r->state = RQ_WRITER;
		r->weight = req_weight(r);
		weight += r->weight;
		bytes += r->bytes;
		count++;
		if (tail)
			tail->qnext = r;
		else
			head = r;
		tail = r;
	}
	__atomic_add_fetch(&repl.forwarded, rm->n, __ATOMIC_RELAXED);
	if (count == 0) {
		repl_reply(rm);
		return;
	}
	rm->pending = (uint32_t)count;
	tail->qnext = NULL;
	pthread_mutex_lock(&srv.lock);
	if (srv.wq_tail)
		srv.wq_tail->qnext = head;
	else
		srv.wq_head = head;
	srv.wq_tail = tail;
	srv.wq_count += count;
	srv.wq_weight += weight;
	srv.wq_bytes += bytes;
	pthread_cond_signal(&srv.cond);
	pthread_mutex_unlock(&srv.lock);
	return;
bad:
	log_x(L_WARN, "replication: a forwarded message does not decode: dropped (its sender times out)");
	remote_free(rm);
}

/* Publishes a forwarded message's part i of parts (data, n bytes), answers to subject; retry: the term it is sent again to. */
static natsStatus
forward_publish(const char *subject, const char *id, const char *data, size_t n, size_t i, size_t parts,
    uint64_t retry)
{
	char part[48], term[24];
	natsMsg *m = NULL;
	natsStatus s;

	snprintf(part, sizeof(part), "%zu/%zu", i, parts);
	snprintf(term, sizeof(term), "%" PRIx64, retry);
	if ((s = natsMsg_Create(&m, repl.writes, subject, data, (int)n)) == NATS_OK &&
	    (parts == 1 || ((s = natsMsgHeader_Set(m, "Walletd-Forward", id)) == NATS_OK &&
	    (s = natsMsgHeader_Set(m, "Walletd-Part", part)) == NATS_OK)) &&
	    (!retry || (s = natsMsgHeader_Set(m, "Walletd-Retry", term)) == NATS_OK))
		s = natsConnection_PublishMsg(repl.nc, m);
	natsMsg_Destroy(m);
	return s;
}

/*
 * Sends a forwarded message to leader, in parts when it is too large for one,
 * and returns the answer: NATS_NO_RESPONDERS when no leader took it (nothing
 * was done), NATS_TIMEOUT when the lease moved on from leader before it
 * answered, or when it took longer than its own failover_wait could explain
 * (it may have been done).  The writer's own inbox takes the answers.  A
 * message in one part goes again every half second until answered, to the
 * term it was sent to: NATS loses what crosses a route being cut, and that
 * leader runs it at most once (forward_seen_runs).
 */
static natsStatus
forward_send(const msgpack_sbuffer *sb, const char *leader, natsMsg **reply)
{
	static natsSubscription *inbox;
	static uint64_t counter, incarnation;
	size_t parts = sb->size / repl.part_max + 1;
	uint64_t deadline = now_micros() + config.failover_wait * 1000000ull + 5000000, again = now_micros() + 500000;
	uint64_t term;
	char subject[160], id[96];
	natsStatus s = NATS_OK;

	if (inbox == NULL) {
		incarnation = now_micros();
		snprintf(subject, sizeof(subject), "_INBOX.walletd.%s.%s.%" PRIx64 ".*", config.cluster, config.node,
		    incarnation);
		if ((s = natsConnection_SubscribeSync(&inbox, repl.nc, subject)) != NATS_OK) {
			inbox = NULL;
			return s;
		}
		natsSubscription_SetPendingLimits(inbox, -1, -1);
	}
	snprintf(subject, sizeof(subject), "_INBOX.walletd.%s.%s.%" PRIx64 ".%" PRIu64, config.cluster, config.node,
	    incarnation, ++counter);
	snprintf(id, sizeof(id), "%s.%" PRIu64, config.node, counter);
	pthread_mutex_lock(&repl.lock);
	term = strcmp(repl.leader, leader) == 0 ? repl.leader_term : 0;
	pthread_mutex_unlock(&repl.lock);
	for (size_t i = 0; i < parts && s == NATS_OK; i++) {
		size_t off = i * repl.part_max, n = sb->size - off < repl.part_max ? sb->size - off : repl.part_max;

		s = forward_publish(subject, id, sb->data + off, n, i, parts, 0);
	}
	while (s == NATS_OK) {
		int moved;

		*reply = NULL;
		if ((s = natsSubscription_NextMsg(reply, inbox, 100)) == NATS_OK) {
			if (strcmp(natsMsg_GetSubject(*reply), subject) != 0 || (natsMsg_GetDataLength(*reply) == 0 &&
			    !natsMsg_IsNoResponders(*reply))) {
				natsMsg_Destroy(*reply); /* an earlier forward's late answer, or a part's receipt */
				continue;
			}
			if (natsMsg_IsNoResponders(*reply)) {
				natsMsg_Destroy(*reply);
				*reply = NULL;
				return NATS_NO_RESPONDERS;
			}
			return NATS_OK;
		}
		if (s != NATS_TIMEOUT)
			break;
		pthread_mutex_lock(&repl.lock);
		moved = strcmp(repl.leader, leader) != 0 || repl.stopping;
		pthread_mutex_unlock(&repl.lock);
		s = moved || now_micros() >= deadline ? NATS_TIMEOUT : NATS_OK;
		if (s == NATS_OK && parts == 1 && term && now_micros() >= again) {
			again = now_micros() + 500000;
			s = forward_publish(subject, id, sb->data, sb->size, 0, 1, term);
		}
	}
	return s;
}

/* Waits until this node has applied seq, or until deadline.  Returns 0 once applied. */
static int
repl_wait_applied(uint64_t seq, uint64_t deadline)
{
	int rc;

	pthread_mutex_lock(&repl.lock);
	while (repl.pos.applied < seq && !repl.stopping && repl.role != RS_DIVERGED && now_micros() < deadline)
		repl_wait(50);
	rc = repl.pos.applied >= seq ? 0 : -1;
	pthread_mutex_unlock(&repl.lock);
	return rc;
}

/* Runs the read r on this node's store. */
static void
repl_read(struct req *r)
{
	req_run_alone(r);
	r->done = 1;
}

static uint64_t forward_answered; /* the writer's: the last record of the writes it answered as a follower */

/*
 * A follower's writer: forwards the batch's writes to the leader, in runs up
 * to the next read, and answers each with the leader's answer once this node
 * has applied its record, then runs the read here: a connection reads its
 * own writes.  Returns 0 when all are answered, -1 when no leader took them
 * (the caller waits for one and calls again: what is answered stays).
 */
static int
repl_forward(struct req *batch, uint64_t deadline)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	int rc = 0;

	msgpack_sbuffer_init(&sb);
	for (struct req *r = batch, *end; r && rc == 0; r = end) {
		natsMsg *reply = NULL;
		msgpack_unpacked u;
		natsStatus s;
		uint32_t n = 0;
		uint64_t seq;
		char leader[64];

		if (r->done || !(r->flags & MF_WRITE)) {
			/* It sees its connection's writes: the last answered here may be one */
			uint64_t need = r->wrote_at > forward_answered ? r->wrote_at : forward_answered;

			if (!r->done && need && repl_wait_applied(need, deadline) != 0) {
				req_error(r, E_UNAVAILABLE, NULL, "this node has not yet applied the record (%" PRIu64 ") of "
				    "this connection's last write: retry, or read through another node", need);
				r->done = 1;
			} else if (!r->done) {
				repl_read(r);
			}
			end = r->qnext;
			continue;
		}
		for (end = r; end && !end->done && (end->flags & MF_WRITE); end = end->qnext)
			n++;
		msgpack_sbuffer_clear(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		msgpack_pack_array(&pk, 3);
		msgpack_pack_str_with_body(&pk, config.node, strlen(config.node));
		/* Run by then or never: a message NATS held back (this node cut off, then
		 * back) must not charge after this node answered that it may not have. */
		msgpack_pack_int64(&pk, now_seconds() * 1000 + config.failover_wait * 1000);
		msgpack_pack_array(&pk, n);
		for (struct req *q = r; q != end; q = q->qnext) {
			msgpack_sbuffer frame;

			msgpack_sbuffer_init(&frame);
			msgpack_packer_init(&pk, &frame, msgpack_sbuffer_write);
			msgpack_pack_object(&pk, q->msg.data);
			msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
			msgpack_pack_array(&pk, 2);
			msgpack_pack_uint32(&pk, (uint32_t)q->uid);
			msgpack_pack_bin_with_body(&pk, frame.data, frame.size);
			msgpack_sbuffer_destroy(&frame);
		}
		pthread_mutex_lock(&repl.lock);
		snprintf(leader, sizeof(leader), "%s", repl.leader);
		pthread_mutex_unlock(&repl.lock);
		s = leader[0] ? forward_send(&sb, leader, &reply) : NATS_NO_RESPONDERS;
		if (s == NATS_NO_RESPONDERS) {
			rc = -1;
			break;
		}
		msgpack_unpacked_init(&u);
		if (s != NATS_OK || msgpack_unpack_next(&u, natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply),
		    NULL) != MSGPACK_UNPACK_SUCCESS || u.data.type != MSGPACK_OBJECT_ARRAY || u.data.via.array.size != 2 ||
		    u.data.via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
		    u.data.via.array.ptr[1].type != MSGPACK_OBJECT_ARRAY || u.data.via.array.ptr[1].via.array.size != n) {
			/* A timeout: the leader may have run them, or not. */
			for (struct req *q = r; q != end; q = q->qnext) {
				req_error(q, E_UNAVAILABLE, NULL, "the leader, %s, did not answer (%s): whether it was done is "
				    "unknown; retry with the same ref", leader, s == NATS_OK ? "a bad answer" : natsStatus_GetText(s));
				q->done = 1;
			}
		} else {
			const msgpack_object *ans = u.data.via.array.ptr[1].via.array.ptr;

			seq = u.data.via.array.ptr[0].via.u64;
			forward_answered = seq > forward_answered ? seq : forward_answered;
			for (struct req *q = r; q != end; q = q->qnext, ans++) {
				msgpack_sbuffer_clear(&q->out);
				if (ans->type == MSGPACK_OBJECT_ARRAY && ans->via.array.size == 2 &&
				    ans->via.array.ptr[1].type == MSGPACK_OBJECT_BIN) {
					msgpack_sbuffer_write(&q->out, ans->via.array.ptr[1].via.bin.ptr,
					    ans->via.array.ptr[1].via.bin.size);
					q->code = (int)ans->via.array.ptr[0].via.i64;
				} else {
					req_error(q, E_INTERNAL, NULL, "the leader's answer does not decode");
				}
				q->seq = seq;
				q->done = 1;
			}
			if (repl_wait_applied(seq, deadline) != 0)
				log_x(L_WARN, "replication: not applied the leader's record %" PRIu64 " in time: answering the "
				    "write; reads on its connection wait for the record", seq);
		}
		msgpack_unpacked_destroy(&u);
		natsMsg_Destroy(reply);
	}
	msgpack_sbuffer_destroy(&sb);
	return rc;
}

static int writer_run(struct req *batch);

/*
 * The writer's turn in a replicated group: runs the batch as leader, or
 * forwards it to the leader, whichever this node is, again after a fence or
 * a change of leader; a write that finds no leader for failover_wait
 * answers unavailable.  A diverged node answers reads and refuses writes.
 */
static void
repl_run(struct req *batch)
{
	uint64_t deadline = now_micros() + config.failover_wait * 1000000ull;

	for (struct req *r = batch; r; r = r->qnext)
		r->done = 0;
	for (;;) {
		int role, refusing;
		char why[256];

		pthread_mutex_lock(&repl.lock);
		role = repl.role;
		refusing = repl.refusing;
		snprintf(why, sizeof(why), "%s", repl.why);
		pthread_mutex_unlock(&repl.lock);
		if (refusing || role == RS_DIVERGED) {
			for (struct req *r = batch; r; r = r->qnext)
				if (!r->done && (refusing || (r->flags & MF_WRITE))) {
					req_error(r, E_UNAVAILABLE, NULL, "this node is %s (%s): it takes no writes",
					    repl_role_names[role], why);
					r->done = 1;
				} else if (!r->done) {
					repl_read(r);
				}
			return;
		}
		if (role == RS_LEADER) {
			int rc = writer_run(batch);

			if (rc == 0)
				return;
			if (rc == REPL_UNAVAILABLE) {
				for (struct req *r = batch; r; r = r->qnext)
					if (!r->done) {
						req_error(r, E_UNAVAILABLE, NULL, "the stream did not acknowledge the record within "
						    "failover_wait (%u s): whether it holds it is unknown; retry with the same ref",
						    config.failover_wait);
						r->done = 1;
					}
				return;
			}
		} else {
			/* Another node's writes this node took while leading: never passed on
			 * (their sender may have given up on them when the lease moved). */
			for (struct req *r = batch; r; r = r->qnext)
				if (r->remote && !r->done) {
					req_error(r, E_UNAVAILABLE, NULL, "%s stopped leading before it ran the write: nothing "
					    "was done", config.node);
					r->done = 1;
				}
			if (repl_forward(batch, deadline) == 0)
				return;
		}
		if (now_micros() >= deadline)
			break;
		pthread_mutex_lock(&repl.lock);
		if (repl.role == role && !repl.stopping)
			repl_wait(100);
		pthread_mutex_unlock(&repl.lock);
	}
	for (struct req *r = batch; r; r = r->qnext)
		if (!r->done) {
			req_error(r, E_UNAVAILABLE, NULL, "no leader within failover_wait (%u s): nothing was done; "
			    "retry with the same ref", config.failover_wait);
			r->done = 1;
		}
}

/* ---- The lease ---- */

/*
 * How long after the start of its last successful refresh the holder may
 * lead: the bucket deletes the key lease_ttl after it received the refresh,
 * so a second (or a tenth) less keeps clear of the next holder.
 */
static uint64_t
lease_span(void)
{
	uint64_t ttl = config.lease_ttl * 1000000ull;

	return ttl - (ttl / 10 > 1000000 ? ttl / 10 : 1000000);
}

/* Starts leading, term term, with the lease at revision rev (repl.lock held). */
static void
repl_lead(uint64_t rev, uint64_t t0, uint64_t term)
{
	natsStatus s = NATS_OK;

	if (repl.wsub == NULL)
		s = natsConnection_QueueSubscribe(&repl.wsub, repl.nc, repl.writes, "leader", repl_on_forward, NULL);
	if (s != NATS_OK) {
		log_x(L_ERR, "replication: cannot take forwarded writes: %s", nats_GetLastError(NULL));
		repl.wsub = NULL;
	}
	repl.lease_rev = rev;
	repl.lease_until = t0 + lease_span();
	repl.lease_expires_ms = now_seconds() * 1000 + config.lease_ttl * 1000;
	repl.leader_term = term;
	forward_seen_forget();
	atomic_store(&lead_term, term);
	snprintf(repl.leader, sizeof(repl.leader), "%s", config.node);
	repl_role_set(RS_LEADER, "took the lease at revision %" PRIu64 ", applied %" PRIu64, rev, repl.pos.applied);
	atomic_store(&expiry_unknown, 1);
	alert_wake(); /* what the last leader left unsent */
}

/* Stops leading (repl.lock held). */
static void
repl_step_down(const char *why)
{
	if (repl.wsub) {
		natsSubscription_Unsubscribe(repl.wsub);
		natsSubscription_Destroy(repl.wsub);
		repl.wsub = NULL;
	}
	repl.leader[0] = '\0';
	repl.lease_until = 0;
	atomic_store(&lead_term, 0);
	repl_role_set(RS_FOLLOWER, "%s", why);
}

/*
 * Reads the server_name a NATS server announces in its INFO line at url
 * (nats://[user:pass@]host:port) into name; "" when it cannot be read.
 */
static void
server_name(const char *url, char name[64])
{
	char host[256], line[4096], *p;
	struct addrinfo *ai = NULL, hints = { .ai_socktype = SOCK_STREAM };
	struct timeval tv = { 1, 0 };
	json_t *info = NULL;
	ssize_t n = -1;
	int fd = -1;

	name[0] = '\0';
	snprintf(host, sizeof(host), "%s", strstr(url, "://") ? strstr(url, "://") + 3 : url);
	if (strchr(host, '@'))
		memmove(host, strchr(host, '@') + 1, strlen(strchr(host, '@')));
	if ((p = strrchr(host, ':')) == NULL)
		p = host + strlen(host), strcpy(p, ":4222");
	*p = '\0';
	if (getaddrinfo(host, p + 1, &hints, &ai) == 0 &&
	    (fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0)) >= 0 &&
	    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0 &&
	    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) == 0 &&
	    connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 && (n = read(fd, line, sizeof(line) - 1)) > 5 &&
	    strncmp(line, "INFO ", 5) == 0) {
		line[n] = '\0';
		if ((info = json_loads(line + 5, JSON_DISABLE_EOF_CHECK, NULL)) != NULL && json_is_string(json_object_get(info, "server_name")))
			snprintf(name, 64, "%s", json_string_value(json_object_get(info, "server_name")));
	}
	json_decref(info);
	if (fd >= 0)
		close(fd);
	if (ai)
		freeaddrinfo(ai);
}

static int repl_connect(const char **servers, int n, natsConnection **nc, jsCtx **js);
static int repl_setup(void);

/*
 * Publishes go through the server that leads the stream when nats_url
 * names it: one hop less than through another (measured: half the time).
 */
static void
repl_prefer(const char *leader)
{
	int i;

	for (i = 0; i < repl.nurls && strcmp(repl.names[i], leader) != 0; i++)
		;
	if (i == repl.nurls || !leader[0] || repl.pub == i)
		return;
	if (repl.pnc[i] == NULL && repl_connect((const char **)&repl.urls[i], 1, &repl.pnc[i], &repl.pjs[i]) != 0) {
		repl.pnc[i] = NULL;
		return;
	}
	log_x(L_INFO, "replication: publishing through %s (%s), the stream's leader", repl.names[i], repl.urls[i]);
	pthread_mutex_lock(&repl.lock);
	repl.pub = i;
	pthread_mutex_unlock(&repl.lock);
}

/*
 * The stream's first and last sequences, asked through js; the lease thread
 * (prefer) also publishes through its leader.  Returns -1 when they cannot be
 * read, or when the answer is not a leader's with a quorum of current
 * replicas: while a stream has no leader (seconds after a heal) its replicas
 * answer with their own state, and one that was cut off knows only older
 * records.
 */
static int
repl_stream_state(jsCtx *js, uint64_t *first, uint64_t *last, int prefer)
{
	jsStreamInfo *si = NULL;
	jsErrCode err = 0;
	int current = 1;

	if (js_GetStreamInfo(&si, js, repl.stream, NULL, &err) != NATS_OK)
		return -1;
	for (int i = 0; si->Cluster && i < si->Cluster->ReplicasLen; i++)
		current += si->Cluster->Replicas[i]->Current;
	if (si->Cluster && (!si->Cluster->Leader || !si->Cluster->Leader[0] ||
	    2 * current <= si->Cluster->ReplicasLen + 1)) {
		jsStreamInfo_Destroy(si);
		return -1;
	}
	*first = si->State.FirstSeq;
	*last = si->State.LastSeq;
	if (prefer && si->Cluster && si->Cluster->Leader)
		repl_prefer(si->Cluster->Leader);
	jsStreamInfo_Destroy(si);
	return 0;
}

/*
 * Whether the stream, which holds first to last, no longer holds the records
 * after applied: then this node serves nothing until it is seeded again.
 */
static int
repl_behind(uint64_t applied, uint64_t first, uint64_t last)
{
	int behind;

	pthread_mutex_lock(&repl.lock);
	if (last > repl.last)
		repl.last = last;
	if ((behind = applied + 1 < first) && !repl.refusing) {
		repl.refusing = 1;
		atomic_store(&repl_refusing, 1);
		repl_role_set(RS_CATCHING_UP, "the stream starts at %" PRIu64 ", past this node's %" PRIu64 ": seed it "
		    "from a backup of another node", first, applied);
	}
	pthread_mutex_unlock(&repl.lock);
	return behind;
}

/*
 * Whether the stream, first to last, still holds the history up to pos, this
 * node's position read before them: the message at pos.applied is that
 * record's last.  One stream-info reply is not trusted (right after a heal it
 * may come from a server that was cut off): the record is read through the
 * stream's leader, and only a loss or fork seen on every check for two
 * seconds sets role to diverged.  Sets it back to follower when a repair
 * mended it.  Returns 0 when the history is not in doubt (no news is not doubt).
 */
static int
repl_check_history(struct repl_pos pos, uint64_t first, uint64_t last)
{
	static uint64_t since, seen; /* a loss or fork seen on every check from since to seen; 0 = none */
	char mine[160] = "?";
	natsMsg *m = NULL;
	msgpack_unpacked u;
	struct part pt;
	natsStatus s;
	int same;

	if (repl_behind(pos.applied, first, last) || pos.applied == 0 || pos.applied < first)
		return 0; /* nothing here to check it by */
	if ((s = js_GetMsg(&m, repl.js, repl.stream, pos.applied, NULL, NULL)) == NATS_OK) {
		msgpack_unpacked_init(&u);
		same = repl_part_parse(&u, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), &pt) == 0 &&
		    pt.part + 1 == pt.parts && memcmp(pt.sum, pos.sum, 32) == 0;
		msgpack_unpacked_destroy(&u);
		natsMsg_Destroy(m);
	} else if (s == NATS_NOT_FOUND || last < pos.applied) {
		same = 0;
	} else {
		return 0; /* not readable now: no news */
	}
	if (same) {
		since = 0;
	} else {
		uint64_t now = now_micros();

		if (since == 0 || now - seen > 1500000) { /* checks come every half second */
			since = now;
			log_x(L_WARN, "replication: the stream may have lost or changed the record at %" PRIu64 " this "
			    "node applied: checking again", pos.applied);
		}
		seen = now;
		if (now - since < 2000000)
			return -1;
	}
	if (!same) { /* the record's id, for the log: which write the stream lost */
		MDB_txn *txn;

		pthread_rwlock_rdlock(&store.maplock);
		if (mdb_txn_begin(store.env, NULL, MDB_RDONLY, &txn) == 0) {
			replog_id(txn, pos.applied, mine);
			mdb_txn_abort(txn);
		}
		pthread_rwlock_unlock(&store.maplock);
	}
	pthread_mutex_lock(&repl.lock);
	if (!same && repl.role != RS_DIVERGED) {
		if (repl.role == RS_LEADER)
			repl_step_down("the stream lost records");
		if (last < pos.applied)
			repl_role_set(RS_DIVERGED, "the stream ends at %" PRIu64 ", before the record at %" PRIu64
			    " (%s) this node applied", last, pos.applied, mine);
		else
			repl_role_set(RS_DIVERGED, "the stream holds another record at %" PRIu64 " than the record (%s) "
			    "this node applied", pos.applied, mine);
	} else if (same && repl.role == RS_DIVERGED) {
		repl_role_set(RS_FOLLOWER, "the stream holds this node's history again");
	}
	pthread_mutex_unlock(&repl.lock);
	return same ? 0 : -1;
}

/* The lease thread: refreshes the lease while leading; otherwise watches it, and takes it when free. */
static void *
repl_lease_main(void *arg)
{
	char value[128];

	(void)arg;
	if (repl_setup() != 0)
		return NULL;
	for (;;) {
		uint64_t rev = 0, first = 0, last = 0, t0 = now_micros(), wait_ms = 500, term;
		kvEntry *e = NULL;
		struct repl_pos pos;
		natsStatus s;
		int role;

		pthread_mutex_lock(&repl.lock);
		if (repl.stopping) {
			if (repl.role == RS_LEADER && kvStore_Delete(repl.kv, LEASE_KEY) == NATS_OK)
				log_x(L_INFO, "replication: handed the lease back");
			pthread_mutex_unlock(&repl.lock);
			break;
		}
		role = repl.role;
		rev = repl.lease_rev;
		term = role == RS_LEADER ? atomic_load(&lead_term) : now_micros(); /* a new id, should it lead */
		snprintf(value, sizeof(value), "%s %" PRIu64 " %" PRIx64, config.node, repl.pos.applied, term);
		repl.refresh_now = 0;
		pthread_mutex_unlock(&repl.lock);
		if (role == RS_LEADER) {
			s = kvStore_Update(&rev, repl.kv, LEASE_KEY, value, (int)strlen(value), rev);
			pthread_mutex_lock(&repl.lock);
			if (repl.role != RS_LEADER) {
			} else if (s == NATS_OK) {
				repl.lease_rev = rev;
				repl.lease_until = t0 + lease_span();
				repl.lease_expires_ms = now_seconds() * 1000 + config.lease_ttl * 1000;
			} else if (s == NATS_ERR) {
				repl_step_down("another node took the lease");
			} else if (now_micros() >= repl.lease_until) {
				repl_step_down("the lease could not be refreshed in time");
			}
			pthread_mutex_unlock(&repl.lock);
			repl_stream_state(repl.js, &first, &last, 1); /* where to publish */
			wait_ms = 1000; /* a refresh a second: a stall of the bucket's server (seconds) is outlived */
		} else if ((s = kvStore_Get(&e, repl.kv, LEASE_KEY)) == NATS_OK || s == NATS_NOT_FOUND) {
			char node[64] = "", held[128];
			unsigned long long applied = 0, leader_term = 0;
			int caught_up;

			if (e) {
				snprintf(held, sizeof(held), "%.*s", kvEntry_ValueLen(e), (const char *)kvEntry_Value(e));
				if (sscanf(held, "%63s %llu %llx", node, &applied, &leader_term) < 2)
					node[0] = '\0';
				rev = kvEntry_Revision(e);
			}
			pthread_mutex_lock(&repl.lock);
			pos = repl.pos; /* before the stream's state: the stream cannot be behind it then */
			pthread_mutex_unlock(&repl.lock);
			caught_up = repl_stream_state(repl.js, &first, &last, 1) == 0 &&
			    repl_check_history(pos, first, last) == 0;
			pthread_mutex_lock(&repl.lock);
			snprintf(repl.leader, sizeof(repl.leader), "%s", node);
			repl.leader_term = leader_term;
			if (e) {
				repl.leader_applied = applied;
				repl.lease_expires_ms = kvEntry_Created(e) / 1000000 + config.lease_ttl * 1000;
			}
			caught_up = caught_up && repl.tail >= last && repl.pos.applied >= repl.leader_applied;
			if (caught_up && repl.role == RS_CATCHING_UP && !repl.refusing)
				repl_role_set(RS_FOLLOWER, "applied the stream to its end, %" PRIu64, last);
			role = repl.role;
			pthread_mutex_unlock(&repl.lock);
			/* Free, or ours from before a restart: take it if this node has the whole stream. */
			if (caught_up && role == RS_FOLLOWER && (e == NULL || strcmp(node, config.node) == 0)) {
				t0 = now_micros();
				s = e ? kvStore_Update(&rev, repl.kv, LEASE_KEY, value, (int)strlen(value), rev) :
				    kvStore_Create(&rev, repl.kv, LEASE_KEY, value, (int)strlen(value));
				pthread_mutex_lock(&repl.lock);
				if (s == NATS_OK && repl.role == RS_FOLLOWER)
					repl_lead(rev, t0, term);
				pthread_mutex_unlock(&repl.lock);
			}
			kvEntry_Destroy(e);
		}
		pthread_mutex_lock(&repl.lock);
		if (!repl.stopping && !repl.refresh_now)
			repl_wait((unsigned)wait_ms);
		pthread_mutex_unlock(&repl.lock);
	}
	return NULL;
}

/* The stream sequence of the last record this node committed. */
static uint64_t
repl_applied(void)
{
	uint64_t applied;

	pthread_mutex_lock(&repl.lock);
	applied = repl.pos.applied;
	pthread_mutex_unlock(&repl.lock);
	return applied;
}

/*
 * A node further behind than the stream keeps serves nothing until it is
 * seeded again, but ping, status and stats: answers r so, and returns 1.
 */
static int
repl_refuses(struct req *r)
{
	char why[256];

	if (!atomic_load(&repl_refusing) || r->method == M_PING || r->method == M_STATUS || r->method == M_STATS)
		return 0;
	pthread_mutex_lock(&repl.lock);
	snprintf(why, sizeof(why), "%s", repl.why);
	pthread_mutex_unlock(&repl.lock);
	req_error(r, E_UNAVAILABLE, NULL, "this node serves nothing: %s", why);
	r->state = RQ_DONE;
	return 1;
}

/* Whether this node's side writers (alerts, events) may write: it leads, or it is single. */
static int
repl_may_write(void)
{
	int role;

	if (!repl_on)
		return 1;
	pthread_mutex_lock(&repl.lock);
	role = repl.role;
	pthread_mutex_unlock(&repl.lock);
	return role == RS_LEADER;
}

/* ---- status, stats and repair ---- */

static int
m_status(struct call *c)
{
	msgpack_packer *pk = c->pk;
	struct repl r;
	int64_t now_ms = now_seconds() * 1000;

	if (!repl_on) {
		msgpack_pack_map(pk, 8);
		KV_STR(pk, "node", config.node);
		KV_STR(pk, "role", repl_role_names[RS_SINGLE]);
		KEY(pk, "leader"), msgpack_pack_nil(pk);
		KEY(pk, "applied"), msgpack_pack_nil(pk);
		KEY(pk, "last"), msgpack_pack_nil(pk);
		KV_U64(pk, "lag_records", 0);
		KV_U64(pk, "lag_ms", 0);
		KEY(pk, "lease_expires_at"), msgpack_pack_nil(pk);
		return E_OK;
	}
	pthread_mutex_lock(&repl.lock);
	r = repl;
	pthread_mutex_unlock(&repl.lock);
	if (r.last < r.pos.applied)
		r.last = r.pos.applied;
	if (r.role != RS_DIVERGED && !r.refusing)
		r.why[0] = '\0';
	msgpack_pack_map(pk, r.why[0] ? 9 : 8);
	KV_STR(pk, "node", config.node);
	KV_STR(pk, "role", repl_role_names[r.role]);
	KEY(pk, "leader");
	r.leader[0] ? pack_cstr(pk, r.leader) : msgpack_pack_nil(pk);
	KV_U64(pk, "applied", r.pos.applied);
	KV_U64(pk, "last", r.last);
	KV_U64(pk, "lag_records", r.last - r.pos.applied);
	KEY(pk, "lag_ms"); /* since the last record applied was published; nil: none applied yet */
	if (r.last > r.pos.applied && r.applied_ms == 0)
		msgpack_pack_nil(pk);
	else
		msgpack_pack_uint64(pk, r.last > r.pos.applied && now_ms > r.applied_ms ? (uint64_t)(now_ms - r.applied_ms) : 0);
	KEY(pk, "lease_expires_at");
	if (r.lease_expires_ms && r.leader[0])
		pack_time(pk, r.lease_expires_ms / 1000);
	else
		msgpack_pack_nil(pk);
	if (r.why[0])
		KV_STR(pk, "why", r.why);
	return E_OK;
}

/* stats' "replication": nil for a single node. */
static void
repl_stats_pack(msgpack_packer *pk)
{
	struct repl r;

	if (!repl_on) {
		msgpack_pack_nil(pk);
		return;
	}
	pthread_mutex_lock(&repl.lock);
	r = repl;
	pthread_mutex_unlock(&repl.lock);
	msgpack_pack_map(pk, 7);
	KV_STR(pk, "role", repl_role_names[r.role]);
	KV_U64(pk, "records_published", r.published);
	KV_U64(pk, "records_applied", r.applied_records);
	KV_U64(pk, "writes_forwarded_here", r.forwarded);
	KV_U64(pk, "fenced", r.fenced);
	KV_U64(pk, "lag_records", r.last > r.pos.applied ? r.last - r.pos.applied : 0);
	pack_cstr(pk, "publish_us");
	histogram_pack(pk, &r.publish_us, latency_bounds);
}

/*
 * On a diverged node whose stream lost its last records: publishes this
 * node's copies of them (replog) after the stream's last, which must be the
 * message this node holds there.  The first publish fails if anything else
 * was appended meanwhile.
 */
static int
m_replication_repair(struct call *c)
{
	uint64_t first = 0, last = 0, seq, got, deadline = now_micros() + config.failover_wait * 1000000ull;
	struct repl_pos pos;
	unsigned char key[8];
	MDB_val k = { 8, key }, v;
	natsMsg *m = NULL;
	char msgid[128];
	int role, rc;

	if (!repl_on)
		return fail(c, E_UNAVAILABLE, NULL, "this walletd is a single node: there is nothing to repair");
	pthread_mutex_lock(&repl.lock);
	role = repl.role;
	pos = repl.pos;
	pthread_mutex_unlock(&repl.lock);
	if (role != RS_DIVERGED)
		return fail(c, E_UNAVAILABLE, NULL, "only a diverged node repairs the stream; this one is %s",
		    repl_role_names[role]);
	if (repl_stream_state(repl.js, &first, &last, 0) != 0)
		return fail(c, E_UNAVAILABLE, NULL, "cannot read the stream: %s", nats_GetLastError(NULL));
	if (last >= pos.applied)
		return fail(c, E_UNAVAILABLE, NULL, "the stream reaches this node's record %" PRIu64 " with another "
		    "history: seed this node from a backup of a node that follows it", pos.applied);
	if (last > 0) {
		be64_put(key, last);
		if ((rc = mdb_get(c->txn, store.replog, &k, &v)) != 0 ||
		    js_GetMsg(&m, repl.js, repl.stream, last, NULL, NULL) != NATS_OK ||
		    (size_t)natsMsg_GetDataLength(m) != v.mv_size || memcmp(natsMsg_GetData(m), v.mv_data, v.mv_size) != 0) {
			natsMsg_Destroy(m);
			return fail(c, E_UNAVAILABLE, NULL, "the stream's message %" PRIu64 " is not this node's copy of it "
			    "(or it has none): repair from the node that has the stream's history", last);
		}
		natsMsg_Destroy(m);
	}
	for (seq = last + 1; seq <= pos.applied; seq++) {
		be64_put(key, seq);
		if ((rc = mdb_get(c->txn, store.replog, &k, &v)) != 0)
			return fail(c, E_UNAVAILABLE, NULL, "this node no longer holds message %" PRIu64 " (it keeps "
			    "the last %u)", seq, REPLOG_KEEP);
		snprintf(msgid, sizeof(msgid), "repair.%s.%" PRIu64, config.node, seq);
		if (repl_send(msgid, seq - 1, v.mv_data, v.mv_size, deadline, 0, &got) != 0)
			return fail(c, E_UNAVAILABLE, NULL, "the stream did not take message %" PRIu64 " (%" PRIu64
			    " republished): was something else appended?", seq, seq - last - 1);
	}
	log_x(L_WARN, "replication: republished the stream's messages %" PRIu64 " to %" PRIu64, last + 1, pos.applied);
	pthread_mutex_lock(&repl.lock);
	repl.refresh_now = 1;
	pthread_cond_broadcast(&repl.cond);
	pthread_mutex_unlock(&repl.lock);
	msgpack_pack_map(c->pk, 2);
	KV_U64(c->pk, "republished", pos.applied - last);
	KV_U64(c->pk, "last", pos.applied);
	return E_OK;
}

/* ---- Start and stop ---- */

static void
repl_connected(natsConnection *nc, void *arg)
{
	(void)nc, (void)arg;
	log_x(L_INFO, "replication: connected to NATS");
}

/* Connects to servers (or goes on trying in the background), and opens a JetStream context on that connection. */
static int
repl_connect(const char **servers, int n, natsConnection **nc, jsCtx **js)
{
	natsOptions *opts = NULL;
	jsOptions jo;
	natsStatus s;

	jsOptions_Init(&jo);
	jo.Wait = 2000; /* a JetStream call that hangs (a server re-electing) is tried again sooner */
	if ((s = natsOptions_Create(&opts)) != NATS_OK ||
	    (s = natsOptions_SetServers(opts, servers, n)) != NATS_OK ||
	    (s = natsOptions_SetName(opts, config.node)) != NATS_OK ||
	    (s = natsOptions_SetMaxReconnect(opts, -1)) != NATS_OK ||
	    (s = natsOptions_SetReconnectWait(opts, 250)) != NATS_OK ||
	    (s = natsOptions_SetRetryOnFailedConnect(opts, true, repl_connected, NULL)) != NATS_OK ||
	    (config.nats_creds[0] && (s = natsOptions_SetUserCredentialsFromFiles(opts, config.nats_creds, NULL)) != NATS_OK) ||
	    (config.nats_ca[0] && (s = natsOptions_LoadCATrustedCertificates(opts, config.nats_ca)) != NATS_OK) ||
	    ((s = natsConnection_Connect(nc, opts)) != NATS_OK && s != NATS_NOT_YET_CONNECTED) ||
	    (s = natsConnection_JetStream(js, *nc, &jo)) != NATS_OK)
		log_x(L_ERR, "replication: cannot connect to %s: %s", servers[0], nats_GetLastError(NULL));
	natsOptions_Destroy(opts);
	return s == NATS_OK ? 0 : -1;
}

/* Waits ms, or less if walletd stops.  Returns whether it stops. */
static int
repl_sleep(unsigned ms)
{
	int stop;

	pthread_mutex_lock(&repl.lock);
	if (!repl.stopping)
		repl_wait(ms);
	stop = repl.stopping;
	pthread_mutex_unlock(&repl.lock);
	return stop;
}

/*
 * The lease thread's first work: connects to NATS (in the background: the
 * node serves reads meanwhile), makes the stream and the lease bucket if
 * missing, starts the applier.  Returns -1 if walletd stops first.
 */
static int
repl_setup(void)
{
	char bucket[96];
	jsStreamConfig sc;
	jsStreamInfo *si = NULL;
	kvConfig kc;
	jsErrCode err = 0;
	natsStatus s;
	jsOptions jo;
	const char *subjects[1] = { repl.subject };

	for (int i = 0; i < repl.nurls; i++)
		server_name(repl.urls[i], repl.names[i]);
	if (repl_connect((const char **)repl.urls, repl.nurls, &repl.nc, &repl.js) != 0)
		return -1;
	jsOptions_Init(&jo);
	jo.Wait = 500; /* the applier's: a reader's creation lost in a heal is tried again soon */
	if (natsConnection_JetStream(&repl.ajs, repl.nc, &jo) != NATS_OK)
		return -1;
	jsStreamConfig_Init(&sc);
	sc.Name = repl.stream;
	sc.Subjects = subjects;
	sc.SubjectsLen = 1;
	sc.Storage = js_FileStorage;
	sc.Replicas = (int64_t)config.stream_replicas;
	sc.MaxAge = (int64_t)config.stream_max_age * 1000000000;
	sc.Duplicates = (int64_t)120 * 1000000000;
	for (int tries = 0; (s = js_AddStream(&si, repl.js, &sc, NULL, &err)) != NATS_OK &&
	    err != JSStreamNameExistErr; tries++) {
		if ((err == JSStreamReplicasNotSupportedErr || err == JSClusterNoPeersErr) && tries % 10 == 0)
			log_x(L_ERR, "replication: NATS cannot keep %u copies of the stream %s (%s, error %d): a single "
			    "nats-server, or a cluster smaller than stream_replicas; set stream_replicas = 1 for one server",
			    config.stream_replicas, repl.stream, err == JSClusterNoPeersErr ? "too few servers" :
			    "not clustered", (int)err);
		else if (tries % 10 == 1)
			log_x(L_WARN, "replication: cannot make the stream %s yet: %s (%d); trying again", repl.stream,
			    natsStatus_GetText(s), (int)err);
		if (repl_sleep(1000))
			return -1;
	}
	jsStreamInfo_Destroy(si);
	snprintf(bucket, sizeof(bucket), "walletd_%s_lease", config.cluster);
	kvConfig_Init(&kc);
	kc.Bucket = bucket;
	kc.History = 1;
	kc.TTL = (int64_t)config.lease_ttl * 1000000000;
	kc.Replicas = (int)config.stream_replicas;
	kc.StorageType = js_FileStorage;
	for (int tries = 0; (s = js_CreateKeyValue(&repl.kv, repl.js, &kc)) != NATS_OK &&
	    (s = js_KeyValue(&repl.kv, repl.js, bucket)) != NATS_OK; tries++) {
		if (tries % 10 == 1)
			log_x(L_WARN, "replication: cannot make the lease bucket %s yet: %s", bucket, nats_GetLastError(NULL));
		if (repl_sleep(1000))
			return -1;
	}
	repl.part_max = (size_t)natsConnection_GetMaxPayload(repl.nc) - PART_ROOM;
	if (pthread_create(&repl.applier, NULL, repl_apply_main, NULL) != 0) {
		log_x(L_ERR, "replication: cannot start the applier");
		return -1;
	}
	repl.applier_started = 1;
	return 0;
}

/* Reads this node's position and starts the lease thread, which connects (repl_setup). */
static int
repl_start(void)
{
	char urls[sizeof(config.nats_url)], *save = NULL;
	MDB_txn *txn;
	MDB_stat st;

	if (strspn(config.node, NAME_CHARS) != strlen(config.node)) {
		log_x(L_ERR, "set 'node' in the config: the host name '%s' is not a node name", config.node);
		return -1;
	}
	snprintf(urls, sizeof(urls), "%s", config.nats_url);
	for (char *tok = strtok_r(urls, ", ", &save); tok && repl.nurls < 16; tok = strtok_r(NULL, ", ", &save))
		repl.urls[repl.nurls++] = strdup(tok);
	repl.pub = -1;
	snprintf(repl.stream, sizeof(repl.stream), "walletd_%s", config.cluster);
	snprintf(repl.subject, sizeof(repl.subject), "walletd.%s.records", config.cluster);
	snprintf(repl.writes, sizeof(repl.writes), "walletd.%s.writes", config.cluster);
	if (mdb_txn_begin(store.env, NULL, MDB_RDONLY, &txn) != 0 || repl_pos_get(txn, &repl.pos) != 0 ||
	    mdb_stat(txn, store.wallets, &st) != 0) {
		log_x(L_ERR, "replication: cannot read this node's position");
		return -1;
	}
	mdb_txn_abort(txn);
	repl.had_data = repl.pos.applied == 0 && st.ms_entries > 0;
	repl.tail = repl.pos.applied;
	repl.role = RS_CATCHING_UP;
	log_x(L_INFO, "replication: node %s of %s, stream %s, applied %" PRIu64 "; catching up", config.node,
	    config.cluster, repl.stream, repl.pos.applied);
	return pthread_create(&repl.leaser, NULL, repl_lease_main, NULL) == 0 ? 0 : -1;
}

/* Before the writer stops: no more forwarded writes for it. */
static void
repl_quiesce(void)
{
	if (!repl_on)
		return;
	pthread_mutex_lock(&repl.lock);
	if (repl.wsub)
		natsSubscription_Unsubscribe(repl.wsub);
	pthread_mutex_unlock(&repl.lock);
}

/* Hands the lease back when leading, stops the threads, closes the connection. */
static void
repl_stop(void)
{
	if (!repl_on)
		return;
	pthread_mutex_lock(&repl.lock);
	repl.stopping = 1;
	pthread_cond_broadcast(&repl.cond);
	pthread_mutex_unlock(&repl.lock);
	pthread_join(repl.leaser, NULL);
	if (repl.applier_started)
		pthread_join(repl.applier, NULL);
	if (repl.wsub)
		natsSubscription_Destroy(repl.wsub);
	kvStore_Destroy(repl.kv);
	jsCtx_Destroy(repl.ajs);
	jsCtx_Destroy(repl.js);
	natsConnection_Destroy(repl.nc);
	for (int i = 0; i < repl.nurls; i++) {
		jsCtx_Destroy(repl.pjs[i]);
		natsConnection_Destroy(repl.pnc[i]);
		free(repl.urls[i]);
	}
	nats_Close();
}

/* ====================================================================== */
/* 8. Alert thread                                                        */
/* ====================================================================== */

/*
 * Sends the e-mails of recorded notifications (low balance, receipts,
 * payment problems) and the webhook events.  Three calls: alert_spawn,
 * alert_wake, alert_stop.  It reads what is due in a read transaction,
 * talks SMTP or HTTP with no transaction open, then records each outcome
 * in a short write transaction of its own (the outbox).  It never touches
 * a client connection.
 */
static struct alerter {
	pthread_t thread;
	pthread_mutex_t lock;     /* guards wake, stop and the config it copies */
	pthread_cond_t cond;
	int wake, stop, running;
} alerter = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

static void alert_config_lock(void) { pthread_mutex_lock(&alerter.lock); }
static void alert_config_unlock(void) { pthread_mutex_unlock(&alerter.lock); }

/* ---- E-mails ---- */

struct payload {
	const char *data;
	size_t len, off;
};

static size_t
payload_read(char *buf, size_t size, size_t nmemb, void *arg)
{
	struct payload *p = arg;
	size_t n = size * nmemb;

	if (n > p->len - p->off)
		n = p->len - p->off;
	memcpy(buf, p->data + p->off, n);
	p->off += n;
	return n;
}

/*
 * Writes the head of notification n's (key) e-mail into buf (cap bytes):
 * its Message-ID names kind, its subject is fmt's.  Returns its length.
 */
static size_t
alert_head(char *buf, size_t cap, const struct config *cf, const struct note *n, const unsigned char key[16],
    const char *kind, const char *fmt, ...) __attribute__((format(printf, 7, 8)));
static size_t
alert_head(char *buf, size_t cap, const struct config *cf, const struct note *n, const unsigned char key[16],
    const char *kind, const char *fmt, ...)
{
	char date[64], host[128] = "localhost", subject[512];
	time_t now = time(NULL);
	struct tm tm;
	va_list ap;
	int len;

	gethostname(host, sizeof(host) - 1);
	gmtime_r(&now, &tm);
	strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
	va_start(ap, fmt);
	vsnprintf(subject, sizeof(subject), fmt, ap);
	va_end(ap);
	len = snprintf(buf, cap,
	    "Date: %s\r\n"
	    "Message-ID: <walletd.%" PRIu64 ".%" PRIu64 ".%s.%s@%s>\r\n"
	    "From: %s\r\n"
	    "To: %s\r\n"
	    "Subject: %s\r\n"
	    "MIME-Version: 1.0\r\n"
	    "Content-Type: text/plain; charset=UTF-8\r\n"
	    "Content-Transfer-Encoding: 8bit\r\n"
	    "Auto-Submitted: auto-generated\r\n"
	    "\r\n",
	    date, be64_get(key), be64_get(key + 8), kind, n->wallet, host, cf->smtp_from, n->emails, subject);
	return len < 0 ? 0 : (size_t)len < cap ? (size_t)len : cap - 1;
}

/*
 * Builds the RFC 5322 message for notification n into buf (cap bytes): a
 * low-balance alert, a receipt, a payment problem, a paused range, credit
 * about to expire, or automatic top-up turned off.
 */
static void
alert_message(const struct config *cf, const struct note *n, const unsigned char key[16], char *buf, size_t cap)
{
	char bal[32], thr[32], amt[32], until[32], reminder[16];
	size_t h;

	amount_format(n->balance, bal, 2);
	amount_format(n->threshold, thr, 2);
	amount_format(n->amount, amt, 2);
	time_format(n->until, until);
	switch (n->kind) {
	case NK_PAYMENT_PROBLEM:
		h = alert_head(buf, cap, cf, n, key, "problem", "Payment not credited: %s %s for wallet %s", amt,
		    n->currency, n->wallet);
		snprintf(buf + h, cap - h,
		    "A payment the gateway reported for wallet %s could not be credited.\r\n"
		    "\r\n"
		    "  Paid:      %s %s\r\n"
		    "  Reference: %s\r\n"
		    "\r\n"
		    "The top-up keeps the report (walletctl topup list %s --status problem).\r\n"
		    "Fix the cause; the gateway's next retry of the webhook, or walletctl\r\n"
		    "topup confirm, then credits it, once.\r\n"
		    "\r\n"
		    "-- \r\n"
		    "walletd\r\n",
		    n->wallet, amt, n->currency, n->provider_ref, n->wallet);
		return;
	case NK_SUSPENDED:
		h = alert_head(buf, cap, cf, n, key, "suspended", "Messages to +%s paused for wallet %s", n->prefix,
		    n->wallet);
		snprintf(buf + h, cap - h,
		    "Hello,\r\n"
		    "\r\n"
		    "Wallet %s sent far more messages to numbers starting +%s than it\r\n"
		    "usually does (%s), the pattern of SMS pumping: traffic to numbers that\r\n"
		    "earn a fraudster money, paid from your balance. Messages to them are\r\n"
		    "refused until %s; nothing was charged for them.\r\n"
		    "\r\n"
		    "If this traffic is yours, ask us to lift the pause.\r\n"
		    "\r\n"
		    "-- \r\n"
		    "walletd\r\n",
		    n->wallet, n->prefix, strcmp(n->reason, "range_max") == 0 ? "too many to one number range" :
		    "a spike to one country", until);
		return;
	case NK_CREDIT_EXPIRING:
		h = alert_head(buf, cap, cf, n, key, "credit_expiring", "%s %s of credit in wallet %s expire on %.10s", amt,
		    n->currency, n->wallet, until);
		snprintf(buf + h, cap - h,
		    "Hello,\r\n"
		    "\r\n"
		    "%s %s of %s credit in wallet %s expire at %s (UTC).\r\n"
		    "Messages sent before then use it first.\r\n"
		    "\r\n"
		    "-- \r\n"
		    "walletd\r\n",
		    amt, n->currency, n->reason, n->wallet, until);
		return;
	case NK_AUTO_TOPUP_OFF:
		h = alert_head(buf, cap, cf, n, key, "auto_topup_off", "Automatic top-up turned off for wallet %s", n->wallet);
		snprintf(buf + h, cap - h,
		    "Hello,\r\n"
		    "\r\n"
		    "The automatic top-up of wallet %s (%s %s) failed %d times in a row,\r\n"
		    "so it is turned off. The last failure: %s\r\n"
		    "\r\n"
		    "The balance is %s %s. Top up by hand, or update the saved payment\r\n"
		    "method to turn automatic top-up on again.\r\n"
		    "\r\n"
		    "-- \r\n"
		    "walletd\r\n",
		    n->wallet, amt, n->currency, AUTO_FAILURES_MAX, n->provider_ref, bal, n->currency);
		return;
	case NK_RECEIPT:
		h = alert_head(buf, cap, cf, n, key, "receipt", "Payment received: %s %s credited to %s", amt, n->currency,
		    n->wallet);
		snprintf(buf + h, cap - h,
		    "Hello,\r\n"
		    "\r\n"
		    "Thank you for your payment. We credited %s %s to wallet %s.\r\n"
		    "\r\n"
		    "  Payment reference: %s\r\n"
		    "  Transaction:       %" PRIu64 "\r\n"
		    "  New balance:       %s %s\r\n"
		    "\r\n"
		    "Keep this e-mail as your receipt.\r\n"
		    "\r\n"
		    "-- \r\n"
		    "walletd\r\n",
		    amt, n->currency, n->wallet, n->provider_ref, n->txn_id, bal, n->currency);
		return;
	default:
		break;
	}
	snprintf(reminder, sizeof(reminder), "%u", n->reminder); /* its Message-ID's kind: which one */
	h = alert_head(buf, cap, cf, n, key, reminder, "%sLow balance: %s is at %s %s (threshold %s %s)",
	    n->reminder ? "Reminder: " : "", n->wallet, bal, n->currency, thr, n->currency);
	snprintf(buf + h, cap - h,
	    "Hello,\r\n"
	    "\r\n"
	    "The balance of wallet %s is %s %s, below your alert threshold of %s %s.\r\n"
	    "\r\n"
	    "Messages are charged from this balance when they are sent; when it runs\r\n"
	    "out, sending stops. Top up now to keep your SMS and WhatsApp messages\r\n"
	    "flowing: open Billing, choose Top up, and pay by card or mobile money.\r\n"
	    "\r\n"
	    "You receive this e-mail once each time the balance falls below the\r\n"
	    "threshold. You can change the threshold in your notification settings.\r\n"
	    "\r\n"
	    "-- \r\n"
	    "walletd\r\n",
	    n->wallet, bal, n->currency, thr, n->currency);
}

/* Sends one notification's e-mail.  Returns 0, or -1 with the reason in err. */
static int
alert_send(const struct config *cf, const struct note *n, const unsigned char key[16], char *err, size_t errcap)
{
	char message[4096], from[300], errbuf[CURL_ERROR_SIZE] = "", password[256] = "";
	struct curl_slist *rcpt = NULL;
	struct payload p;
	CURL *curl;
	CURLcode res;

	alert_message(cf, n, key, message, sizeof(message));
	p = (struct payload){ message, strlen(message), 0 };
	if ((curl = curl_easy_init()) == NULL) {
		snprintf(err, errcap, "curl_easy_init failed");
		return -1;
	}
	for (const char *e = n->emails; *e;) {
		size_t len = strcspn(e, ",");
		char addr[300];

		snprintf(addr, sizeof(addr), "<%.*s>", (int)len, e);
		rcpt = curl_slist_append(rcpt, addr);
		e += len + (e[len] == ',');
	}
	snprintf(from, sizeof(from), "<%s>", cf->smtp_from);
	if (cf->smtp_password_file[0]) {
		FILE *f = fopen(cf->smtp_password_file, "r");

		if (f == NULL || fgets(password, sizeof(password), f) == NULL)
			log_x(L_WARN, "cannot read smtp_password_file %s", cf->smtp_password_file);
		if (f)
			fclose(f);
		password[strcspn(password, "\r\n")] = '\0';
	}
	curl_easy_setopt(curl, CURLOPT_URL, cf->smtp_url);
	curl_easy_setopt(curl, CURLOPT_MAIL_FROM, from);
	curl_easy_setopt(curl, CURLOPT_MAIL_RCPT, rcpt);
	curl_easy_setopt(curl, CURLOPT_READFUNCTION, payload_read);
	curl_easy_setopt(curl, CURLOPT_READDATA, &p);
	curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
	curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT, (long)(cf->smtp_timeout < 10 ? cf->smtp_timeout : 10));
	curl_easy_setopt(curl, CURLOPT_TIMEOUT, (long)cf->smtp_timeout);
	curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
	if (strncmp(cf->smtp_url, "smtp://", 7) == 0)
		curl_easy_setopt(curl, CURLOPT_USE_SSL, (long)CURLUSESSL_TRY);
	if (cf->smtp_user[0]) {
		curl_easy_setopt(curl, CURLOPT_USERNAME, cf->smtp_user);
		curl_easy_setopt(curl, CURLOPT_PASSWORD, password);
	}
	res = curl_easy_perform(curl);
	curl_slist_free_all(rcpt);
	curl_easy_cleanup(curl);
	memset(password, 0, sizeof(password));
	if (res != CURLE_OK) {
		snprintf(err, errcap, "%s", errbuf[0] ? errbuf : curl_easy_strerror(res));
		return -1;
	}
	return 0;
}

/* When to try a failed delivery again: alert_interval, doubled with each attempt, an hour at most. */
static int64_t
retry_at(const struct config *cf, uint32_t attempts)
{
	uint64_t backoff = (uint64_t)(cf->alert_interval ? cf->alert_interval : 1) << (attempts < 12 ? attempts - 1 : 11);

	return now_seconds() + (int64_t)(backoff < 3600 ? backoff : 3600);
}

/* ---- The outbox ---- */

/*
 * E-mails (notes) and webhook events wait the same way: a
 * queue db whose keys name records in a db of their own, each record with
 * its next attempt.  The alert thread reads what is due (outbox_due), tries
 * each outside any transaction, and records each outcome in a short write
 * of its own (outbox_record).
 */
struct outbox {
	MDB_dbi *queue, *records;
	size_t key_len;           /* notes 16, events 8 */
	size_t size, min;         /* a record's room, and the least a stored one holds */
	size_t next_at;           /* offsetof the record's int64_t next_attempt */
	const char *what;         /* for the log */
};

enum { OB_DUE, OB_DROP };               /* a record whose time has come: tried, or out of the queue */
enum { OB_KEEP, OB_DONE, OB_GONE };     /* what an outcome does: stays queued, leaves the queue, is deleted */
#define OUTBOX_RUN 32                   /* records tried in one run at most */

/* What a delivery came to, for outbox_record's apply. */
struct outcome {
	const struct config *cf;
	int ok;
	const char *err;
	uint32_t reminder;        /* a note's: which reminder was sent */
};

/* Removes keys from ob's queue, in one write. */
static void
outbox_drop(const struct outbox *ob, unsigned char keys[][16], int n)
{
	MDB_txn *txn;
	int rc;

	pthread_rwlock_rdlock(&store.maplock);
	if ((rc = captured_txn_begin(&txn)) == 0) {
		for (int i = 0; i < n; i++)
			captured_del(txn, *ob->queue, &(MDB_val){ ob->key_len, keys[i] }, NULL);
		rc = store_commit(txn);
	}
	pthread_rwlock_unlock(&store.maplock);
	if (rc != 0)
		log_x(L_ERR, "cannot update the queue of %s: %s", ob->what, mdb_strerror(rc));
}

/*
 * Reads into recs (ob->size each) and keys up to OUTBOX_RUN queued records
 * of ob whose next attempt has come, in queue order, and check (if any)
 * calls due; those it drops leave the queue.  *next: seconds until the
 * first one still waiting is due, if sooner.  Returns how many are due.
 */
static int
outbox_due(const struct outbox *ob, const struct config *cf, int (*check)(MDB_txn *, const struct config *, void *),
    void *recs, unsigned char keys[][16], int64_t *next)
{
	unsigned char drop[OUTBOX_RUN][16];
	int n = 0, ndrop = 0;
	int64_t now = now_seconds(), at;
	MDB_cursor *cur;
	MDB_txn *txn;
	MDB_val k, v, rv;

	pthread_rwlock_rdlock(&store.maplock);
	if (mdb_txn_begin(store.env, NULL, MDB_RDONLY, &txn) == 0) {
		if (mdb_cursor_open(txn, *ob->queue, &cur) == 0) {
			for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0 && n < OUTBOX_RUN && ndrop < OUTBOX_RUN;
			    rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
				char *rec = (char *)recs + (size_t)n * ob->size;

				if (k.mv_size != ob->key_len || mdb_get(txn, *ob->records, &k, &rv) != 0 ||
				    rv.mv_size < ob->min || rv.mv_size > ob->size)
					continue;
				record_copy(rec, ob->size, rv);
				memcpy(&at, rec + ob->next_at, sizeof(at));
				if (at > now) {
					*next = at - now < *next ? at - now : *next;
					continue;
				}
				switch (check ? check(txn, cf, rec) : OB_DUE) {
				case OB_DUE: memcpy(keys[n++], k.mv_data, ob->key_len); break;
				case OB_DROP: memcpy(drop[ndrop++], k.mv_data, ob->key_len); break;
				}
			}
			mdb_cursor_close(cur);
		}
		mdb_txn_abort(txn);
	}
	pthread_rwlock_unlock(&store.maplock);
	if (ndrop)
		outbox_drop(ob, drop, ndrop);
	return n;
}

/*
 * Records the outcome o of key's delivery in one short write: apply
 * updates the record (written back as long as it was) and says whether it
 * stays queued, leaves the queue or is deleted.
 */
static void
outbox_record(const struct outbox *ob, const unsigned char *key, int (*apply)(void *, const struct outcome *),
    const struct outcome *o)
{
	MDB_val k = { ob->key_len, (void *)key }, v;
	char *rec = malloc(ob->size);
	MDB_txn *txn;
	int rc = ENOMEM;

	pthread_rwlock_rdlock(&store.maplock);
	if (rec == NULL || (rc = captured_txn_begin(&txn)) != 0)
		goto out;
	if ((rc = mdb_get(txn, *ob->records, &k, &v)) == 0) {
		size_t len = v.mv_size < ob->size ? v.mv_size : ob->size;

		record_copy(rec, ob->size, v);
		switch (apply(rec, o)) {
		case OB_GONE:
			if ((rc = captured_del(txn, *ob->records, &k, NULL)) == 0)
				rc = captured_del(txn, *ob->queue, &k, NULL);
			break;
		case OB_DONE:
			if ((rc = captured_put(txn, *ob->records, &k, &(MDB_val){ len, rec }, 0)) == 0 &&
			    (rc = captured_del(txn, *ob->queue, &k, NULL)) == MDB_NOTFOUND)
				rc = 0;
			break;
		default:
			rc = captured_put(txn, *ob->records, &k, &(MDB_val){ len, rec }, 0);
		}
	}
	if (rc != 0)
		mdb_txn_abort(txn);
	else
		rc = store_commit(txn);
out:
	pthread_rwlock_unlock(&store.maplock);
	free(rec);
	if (rc != 0)
		log_x(L_ERR, "cannot record the outcome of %s: %s", ob->what, rc == ENOMEM ? "out of memory" : mdb_strerror(rc));
}

/* A note's record after its e-mail was tried: sent, or when to try again (failed for good after the last). */
static int
note_outcome(void *rec, const struct outcome *o)
{
	struct note *n = rec;
	int done;

	n->attempts++;
	if (o->ok) {
		n->state = NS_SENT;
		n->sent_at = now_seconds();
		n->last_error[0] = '\0';
		n->reminder = o->reminder;
		done = o->cf->alert_remind == 0;
		n->next_attempt = n->sent_at + o->cf->alert_remind;
	} else {
		snprintf(n->last_error, sizeof(n->last_error), "%s", o->err);
		done = n->attempts >= o->cf->alert_max_attempts && n->state == NS_PENDING;
		if (done) {
			n->state = NS_FAILED;
			log_x(L_ERR, "%s e-mail for %s failed after %u attempts: %s", note_kind_names[n->kind % NK__COUNT], n->wallet,
			    n->attempts, o->err);
		}
		n->next_attempt = retry_at(o->cf, n->attempts);
	}
	return done ? OB_DONE : OB_KEEP;
}

/*
 * Whether a sent notification still calls for a reminder: its wallet is
 * still below the same threshold.
 */
static int
alert_still_low(MDB_txn *txn, const struct note *n)
{
	struct wallet w;

	return wallet_get(txn, (struct str){ n->wallet, strlen(n->wallet) }, &w) == 0 &&
	    (w.flags & WF_THRESHOLD) && w.threshold == n->threshold && w.balance < w.threshold;
}

/* Whether a note in the queue is due: a pending one is; a sent one only for a reminder, else it leaves. */
static int
note_due(MDB_txn *txn, const struct config *cf, void *rec)
{
	struct note *n = rec;

	if (n->state != NS_SENT)
		return OB_DUE;
	if (n->kind != NK_LOW_BALANCE || cf->alert_remind == 0 || !alert_still_low(txn, n))
		return OB_DROP;
	n->reminder++;
	return OB_DUE;
}

static const struct outbox alert_outbox = { &store.alertq, &store.notes, 16, sizeof(struct note), 0,
	offsetof(struct note, next_attempt), "an e-mail" };

/* ---- Automatic top-up ---- */

/* What a gateway said of a top-up's charge. */
enum { GW_PAID, GW_DECLINED, GW_UNKNOWN, GW_NOT_FOUND };
struct gateway_answer {
	int outcome;              /* GW_* */
	int64_t paid;             /* GW_PAID: in micro-units of currency */
	char currency[4];
	char provider_ref[REF_MAX + 1];
	char why[256];            /* otherwise: the gateway's words, or the transport's */
};

/* Keeps up to 64 KiB of a gateway's answer (a struct text). */
static size_t
gateway_body(char *buf, size_t size, size_t nmemb, void *arg)
{
	text_add(arg, buf, size * nmemb);
	return size * nmemb;
}

/*
 * Calls provider's API at path: a GET, or a POST of body (JSON) when body
 * is not NULL, with the secret key of its *_secret_file as the bearer
 * token; then reads what it says of the charge into *ga.  verify: a GET of
 * a charge by reference, which may answer that there is none.
 */
static void
gateway_call(const struct config *cf, uint32_t provider, const char *path, json_t *body, int verify,
    struct gateway_answer *ga)
{
	const char *base = provider == AP_PAYSTACK ? cf->paystack_api_url : cf->flutterwave_api_url;
	const char *file = provider == AP_PAYSTACK ? cf->paystack_secret_file : cf->flutterwave_secret_file;
	char secret[512] = "", auth[600], url[1024], *answer = malloc(65536), *content = NULL, errbuf[CURL_ERROR_SIZE] = "";
	struct text t = { answer, 0, 65536 };
	struct curl_slist *headers = NULL;
	json_t *root = NULL, *data, *status;
	long http = 0;
	CURLcode res = CURLE_OUT_OF_MEMORY;
	CURL *curl;
	FILE *f;

	memset(ga, 0, sizeof(*ga));
	ga->outcome = GW_UNKNOWN;
	if (answer == NULL) {
		snprintf(ga->why, sizeof(ga->why), "out of memory");
		return;
	}
	if ((f = fopen(file, "r")) != NULL) {
		if (fgets(secret, sizeof(secret), f) == NULL)
			secret[0] = '\0';
		secret[strcspn(secret, "\r\n")] = '\0';
		fclose(f);
	}
	if (secret[0] == '\0') {
		snprintf(ga->why, sizeof(ga->why), "no secret key in %s_secret_file '%.100s'",
		    auto_provider_names[provider], file);
		free(answer);
		return;
	}
	snprintf(auth, sizeof(auth), "Authorization: Bearer %s", secret);
	snprintf(url, sizeof(url), "%s%s", base, path);
	if ((curl = curl_easy_init()) != NULL) {
		headers = curl_slist_append(headers, auth);
		headers = curl_slist_append(headers, "Content-Type: application/json");
		answer[0] = '\0';
		curl_easy_setopt(curl, CURLOPT_URL, url);
		if (body && (content = json_dumps(body, JSON_COMPACT)) != NULL)
			curl_easy_setopt(curl, CURLOPT_POSTFIELDS, content);
		curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
		curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, gateway_body);
		curl_easy_setopt(curl, CURLOPT_WRITEDATA, &t);
		curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
		curl_easy_setopt(curl, CURLOPT_TIMEOUT, (long)cf->gateway_timeout);
		curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
		res = curl_easy_perform(curl);
		curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &http);
		curl_slist_free_all(headers);
		curl_easy_cleanup(curl);
		free(content);
	}
	memset(secret, 0, sizeof(secret));
	memset(auth, 0, sizeof(auth));
	if (res != CURLE_OK) {
		snprintf(ga->why, sizeof(ga->why), "%s", errbuf[0] ? errbuf : curl_easy_strerror(res));
		free(answer);
		return;
	}
	root = json_loads(answer, 0, NULL);
	free(answer);
	data = json_object_get(root, "data");
	status = json_object_get(data, "status");
	if (http >= 500 || root == NULL) {
		snprintf(ga->why, sizeof(ga->why), "%s answered HTTP %ld%s", auto_provider_names[provider], http,
		    root ? "" : " without JSON");
	} else if (json_is_string(status) && strcmp(json_string_value(status),
	    provider == AP_PAYSTACK ? "success" : "successful") == 0) {
		json_t *amount = json_object_get(data, "amount"), *id = json_object_get(data, "id");
		const char *currency = json_string_value(json_object_get(data, "currency"));
		double major = json_number_value(amount);

		/* Paystack counts in the currency's smallest unit (a hundredth), Flutterwave in whole units */
		if (major > 0 && major < (provider == AP_PAYSTACK ? 9e14 : 9e11))
			ga->paid = provider == AP_PAYSTACK ? (int64_t)json_integer_value(amount) * 10000 :
			    (int64_t)(major * 1e6 + 0.5);
		if (currency && strlen(currency) == 3 && ga->paid > 0) {
			ga->outcome = GW_PAID;
			memcpy(ga->currency, currency, 4);
			if (json_is_integer(id))
				snprintf(ga->provider_ref, sizeof(ga->provider_ref), "%" JSON_INTEGER_FORMAT, json_integer_value(id));
			else
				snprintf(ga->provider_ref, sizeof(ga->provider_ref), "%s", json_string_value(id) ? json_string_value(id) : "");
		} else {
			snprintf(ga->why, sizeof(ga->why), "%s said paid without an amount and currency",
			    auto_provider_names[provider]);
		}
	} else if (json_is_string(status) && (strcmp(json_string_value(status), "failed") == 0 ||
	    strcmp(json_string_value(status), "abandoned") == 0 || strcmp(json_string_value(status), "reversed") == 0)) {
		const char *why = json_string_value(json_object_get(data, provider == AP_PAYSTACK ? "gateway_response" :
		    "processor_response"));

		ga->outcome = GW_DECLINED;
		snprintf(ga->why, sizeof(ga->why), "%s: %s", json_string_value(status), why ? why : "declined");
	} else if (http >= 400) { /* refused: by reference, none; a charge, declined */
		const char *why = json_string_value(json_object_get(root, "message"));

		ga->outcome = verify ? GW_NOT_FOUND : GW_DECLINED;
		snprintf(ga->why, sizeof(ga->why), "%s (HTTP %ld)", why ? why : "refused", http);
	} else { /* pending, send_otp, ...: its webhook, or the next try's look-up, tells */
		snprintf(ga->why, sizeof(ga->why), "%s says the charge is %s", auto_provider_names[provider],
		    json_is_string(status) ? json_string_value(status) : "of no known status");
	}
	json_decref(root);
}

/*
 * Charges top-up tp through auto top-up a: first looks it up by its
 * reference (a try whose answer was lost, here or on a leader that died,
 * may have been paid), then charges the saved payment method (Paystack's
 * charge_authorization, Flutterwave's tokenized charge) with the top-up's
 * ref as the reference, which the gateway takes once.
 */
static void
gateway_charge(const struct config *cf, const struct auto_topup *a, const struct topup *tp,
    struct gateway_answer *ga)
{
	char path[128];
	json_t *body;

	if (a->provider == AP_PAYSTACK)
		snprintf(path, sizeof(path), "/transaction/verify/%s", tp->ref);
	else
		snprintf(path, sizeof(path), "/v3/transactions/verify_by_reference?tx_ref=%s", tp->ref);
	gateway_call(cf, a->provider, path, NULL, 1, ga);
	if (ga->outcome != GW_NOT_FOUND)
		return;
	if (a->provider == AP_PAYSTACK)
		body = json_pack("{s:s, s:s, s:I, s:s, s:s}", "authorization_code", a->authorization, "email", a->email,
		    "amount", (json_int_t)((tp->amount + 9999) / 10000), "reference", tp->ref, "currency", tp->currency);
	else
		body = json_pack("{s:s, s:s, s:f, s:s, s:s}", "token", a->authorization, "email", a->email,
		    "amount", (double)tp->amount / 1e6, "tx_ref", tp->ref, "currency", tp->currency);
	gateway_call(cf, a->provider, a->provider == AP_PAYSTACK ? "/transaction/charge_authorization" :
	    "/v3/tokenized-charges", body, 0, ga);
	json_decref(body);
}

/* Credits top-up tp with what the gateway says was paid, as topup.confirm does (in txn, as c). */
static int
auto_topup_confirm(struct call *c, const struct topup *tp, const struct gateway_answer *ga, uint32_t provider)
{
	msgpack_sbuffer params, answer;
	msgpack_unpacked u;
	msgpack_packer pk;
	char paid[32];
	int rc;

	msgpack_sbuffer_init(&params);
	msgpack_sbuffer_init(&answer);
	msgpack_packer_init(&pk, &params, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 5);
	KV_STR(&pk, "ref", tp->ref);
	KV_STR(&pk, "amount", amount_format(ga->paid, paid, 0));
	KV_STR(&pk, "provider", auto_provider_names[provider]);
	KV_STR(&pk, "provider_ref", ga->provider_ref);
	KV_STR(&pk, "currency", ga->currency);
	msgpack_unpacked_init(&u);
	msgpack_unpack_next(&u, params.data, params.size, NULL);
	msgpack_packer_init(&pk, &answer, msgpack_sbuffer_write);
	c->params = &u.data;
	c->pk = &pk;
	rc = m_topup_confirm(c);
	if (rc != E_OK)
		log_x(L_ERR, "automatic top-up %s paid but not credited: %s", tp->ref, c->message);
	msgpack_unpacked_destroy(&u);
	msgpack_sbuffer_destroy(&params);
	msgpack_sbuffer_destroy(&answer);
	return c->mdb_rc;
}

/*
 * Records what the gateway said of the top-up of auto top-up request n
 * (key), in one write: paid, credited as topup.confirm does; declined,
 * the top-up cancelled with why, and the request tried again with a new
 * one; no answer, tried again with the same.  AUTO_FAILURES_MAX failures
 * in a row turn the wallet's auto top-up off and e-mail its alert e-mails
 * and ops_emails.  ga NULL: nothing to do any more (paid by its webhook,
 * or the wallet's auto top-up gone).
 */
static void
auto_topup_record(const struct config *cf, const unsigned char key[16], const struct gateway_answer *ga)
{
	struct call c = { .fd = -1, .uid = getuid() };
	MDB_val k = { 16, (void *)key }, v;
	struct wallet w;
	struct topup tp;
	struct note n;
	struct str id;
	int rc;

	pthread_rwlock_rdlock(&store.maplock);
	if ((rc = captured_txn_begin(&c.txn)) != 0)
		goto out;
	if ((rc = mdb_get(c.txn, store.notes, &k, &v)) != 0)
		goto abort;
	record_copy(&n, sizeof(n), v);
	id = (struct str){ n.wallet, strlen(n.wallet) };
	k = (MDB_val){ strlen(n.provider_ref), n.provider_ref };
	if ((rc = wallet_get(c.txn, id, &w)) != 0 || (rc = mdb_get(c.txn, store.topups, &k, &v)) != 0)
		goto abort;
	record_copy(&tp, sizeof(tp), v);
	n.attempts++;
	if (ga == NULL || ga->outcome == GW_PAID) {
		if (ga && ((rc = auto_topup_confirm(&c, &tp, ga, w.autotop.provider)) != 0 ||
		    (rc = wallet_get(c.txn, id, &w)) != 0))
			goto abort;
		if (ga || tp.status == TS_PAID) /* paid, by this answer or the webhook */
			w.autotop.failures = 0;
		n.state = NS_SENT;
		n.sent_at = now_seconds();
	} else {
		snprintf(n.last_error, sizeof(n.last_error), "%s", ga->why);
		log_x(L_WARN, "automatic top-up %s of %s not paid: %s", tp.ref, n.wallet, ga->why);
		if (ga->outcome == GW_DECLINED) {
			tp.status = TS_CANCELLED;
			tp.problem_at = now_seconds();
			snprintf(tp.problem_code, sizeof(tp.problem_code), "declined");
			snprintf(tp.problem_message, sizeof(tp.problem_message), "%s", ga->why);
			if ((rc = captured_put(c.txn, store.topups, &k, &(MDB_val){ sizeof(tp), &tp }, 0)) != 0)
				goto abort;
		}
		if (++w.autotop.failures >= AUTO_FAILURES_MAX) {
			struct note off;

			w.autotop.state |= AUTO_OFF;
			n.state = NS_FAILED;
			memset(&off, 0, sizeof(off));
			off.kind = NK_AUTO_TOPUP_OFF;
			off.amount = tp.amount;
			snprintf(off.provider_ref, sizeof(off.provider_ref), "%.*s", (int)sizeof(off.provider_ref) - 1, ga->why);
			if ((rc = note_add(&c, id, &w, &off)) != 0)
				goto abort;
		} else if (ga->outcome == GW_DECLINED) { /* its reference is spent: a new top-up */
			if (topup_ref(tp.ref) != 0) {
				rc = EIO;
				goto abort;
			}
			memset(tp.problem_code, 0, sizeof(tp.problem_code) + sizeof(tp.problem_message));
			tp.problem_at = 0;
			tp.status = TS_PENDING;
			tp.created_at = now_seconds();
			tp.expires_at = tp.created_at + cf->topup_ttl;
			memcpy(n.provider_ref, tp.ref, sizeof(tp.ref));
			k = (MDB_val){ strlen(tp.ref), tp.ref };
			if ((rc = captured_put(c.txn, store.topups, &k, &(MDB_val){ sizeof(tp), &tp }, 0)) != 0)
				goto abort;
		}
		n.next_attempt = retry_at(cf, n.attempts);
	}
	k = (MDB_val){ 16, (void *)key };
	if ((rc = wallet_put(c.txn, id, &w)) != 0 ||
	    (rc = captured_put(c.txn, store.notes, &k, &(MDB_val){ sizeof(n), &n }, 0)) != 0 ||
	    (n.state != NS_PENDING && (rc = captured_del(c.txn, store.alertq, &k, NULL)) != 0))
		goto abort;
	rc = store_commit(c.txn);
	goto out;
abort:
	mdb_txn_abort(c.txn);
out:
	pthread_rwlock_unlock(&store.maplock);
	if (rc != 0)
		log_x(L_ERR, "cannot record an automatic top-up's outcome: %s", mdb_strerror(rc));
}

/* Acts on auto top-up request n (key): charges its top-up unless it was paid, cancelled or expired meanwhile, or auto top-up is off. */
static void
auto_topup_attempt(const struct config *cf, const struct note *n, const unsigned char key[16])
{
	struct gateway_answer ga;
	struct wallet w;
	struct topup tp;
	MDB_txn *txn;
	MDB_val k = { strlen(n->provider_ref), (void *)n->provider_ref }, v;
	int rc, go;

	pthread_rwlock_rdlock(&store.maplock);
	if ((rc = mdb_txn_begin(store.env, NULL, MDB_RDONLY, &txn)) == 0) {
		if ((rc = wallet_get(txn, (struct str){ n->wallet, strlen(n->wallet) }, &w)) == 0 &&
		    (rc = mdb_get(txn, store.topups, &k, &v)) == 0)
			record_copy(&tp, sizeof(tp), v);
		mdb_txn_abort(txn);
	}
	pthread_rwlock_unlock(&store.maplock);
	if (rc != 0) {
		log_x(L_ERR, "cannot read automatic top-up %s of %s: %s", n->provider_ref, n->wallet, mdb_strerror(rc));
		return;
	}
	go = tp.status == TS_PENDING && now_seconds() < tp.expires_at && w.autotop.provider && !(w.autotop.state & AUTO_OFF);
	if (go)
		gateway_charge(cf, &w.autotop, &tp, &ga);
	auto_topup_record(cf, key, go ? &ga : NULL);
}

/* One run: sends the e-mails that are due.  Returns seconds until the next is due. */
static int64_t
alert_run(const struct config *cf)
{
	struct note *due;
	unsigned char keys[OUTBOX_RUN][16];
	int64_t next = cf->alert_interval;
	int ndue;

	if ((due = malloc(OUTBOX_RUN * sizeof(*due))) == NULL)
		return next;
	ndue = outbox_due(&alert_outbox, cf, note_due, due, keys, &next);
	for (int i = 0; i < ndue; i++) {
		char err[256] = "";
		struct outcome o = { cf, 0, err, due[i].reminder };

		if (due[i].kind == NK_AUTO_TOPUP) {
			auto_topup_attempt(cf, &due[i], keys[i]);
			next = 0; /* what it recorded may be due at once */
			continue;
		}
		if (cf->smtp_url[0] == '\0') { /* no SMTP configured: they wait */
			next = next < cf->alert_interval ? next : cf->alert_interval;
			continue;
		}
		o.ok = alert_send(cf, &due[i], keys[i], err, sizeof(err)) == 0;
		if (o.ok)
			log_x(L_INFO, "%s e-mail for %s sent to %s", note_kind_names[due[i].kind % NK__COUNT], due[i].wallet,
			    due[i].emails);
		else
			log_x(L_WARN, "%s e-mail for %s not sent: %s", note_kind_names[due[i].kind % NK__COUNT], due[i].wallet, err);
		outbox_record(&alert_outbox, keys[i], note_outcome, &o);
	}
	free(due);
	return ndue == OUTBOX_RUN ? 0 : next;
}

/* ---- Event webhooks ---- */

/* Discards a webhook's answer body. */
static size_t
discard(char *buf, size_t size, size_t nmemb, void *arg)
{
	(void)buf;
	(void)arg;
	return size * nmemb;
}

/*
 * The HMAC key of a secret line: a Standard Webhooks secret ("whsec_" and
 * base64) is the bytes it encodes, any other line its own bytes.  Returns
 * the key's length in key (room for 512).
 */
static int
webhook_key(const char *line, unsigned char key[512])
{
	size_t n = strlen(line);
	int len;

	if (strncmp(line, "whsec_", 6) == 0 && n > 6 && (n - 6) % 4 == 0 && n - 6 <= 512 / 3 * 4 &&
	    (len = EVP_DecodeBlock(key, (const unsigned char *)line + 6, (int)(n - 6))) >= 0)
		return len - (line[n - 1] == '=') - (line[n - 2] == '=');
	memcpy(key, line, n);
	return (int)n;
}

/*
 * POSTs event e to cf's webhook_url, signed as Standard Webhooks sign:
 * webhook-id, webhook-timestamp (of this attempt) and webhook-signature,
 * "v1," and the base64 HMAC-SHA256 of "id.timestamp.body" for each of the
 * first two lines of webhook_secret_file (two while a secret is rotated);
 * and with the deprecated X-Walletd-Signature, "sha256=" and the hex HMAC
 * of the body alone with the first line.  Returns 0 when a 2xx answered,
 * or -1 with the reason in err.
 */
static int
event_post(const struct config *cf, const struct event *e, char *err, size_t errcap)
{
	char lines[2][512], id[32], id_header[64], ts_header[64], sig_header[300] = "webhook-signature:",
	    legacy[128] = "X-Walletd-Signature: sha256=", errbuf[CURL_ERROR_SIZE] = "", *content;
	unsigned char key[512], mac[EVP_MAX_MD_SIZE];
	unsigned int maclen = 0;
	struct curl_slist *headers = NULL;
	int nsecrets = 0, n;
	long status = 0;
	CURLcode res;
	CURL *curl;
	FILE *f;

	if ((f = fopen(cf->webhook_secret_file, "r")) != NULL) {
		while (nsecrets < 2 && fgets(lines[nsecrets], sizeof(lines[0]), f) != NULL)
			if ((lines[nsecrets][strcspn(lines[nsecrets], "\r\n")] = '\0', lines[nsecrets][0]))
				nsecrets++;
		fclose(f);
	}
	if (nsecrets == 0) {
		snprintf(err, errcap, "no secret to sign with in webhook_secret_file '%.100s'", cf->webhook_secret_file);
		return -1;
	}
	snprintf(id, sizeof(id), "evt_%" PRIu64, e->number);
	snprintf(id_header, sizeof(id_header), "webhook-id: %s", id);
	snprintf(ts_header, sizeof(ts_header), "webhook-timestamp: %" PRId64, now_seconds());
	if ((n = asprintf(&content, "%s.%s.%s", id, ts_header + 19, e->body)) < 0) {
		snprintf(err, errcap, "out of memory");
		return -1;
	}
	for (int i = 0; i < nsecrets; i++) {
		size_t at = strlen(sig_header);

		HMAC(EVP_sha256(), key, webhook_key(lines[i], key), (const unsigned char *)content, (size_t)n, mac, &maclen);
		at += (size_t)snprintf(sig_header + at, sizeof(sig_header) - at, " v1,");
		EVP_EncodeBlock((unsigned char *)sig_header + at, mac, (int)maclen);
	}
	free(content);
	HMAC(EVP_sha256(), lines[0], (int)strlen(lines[0]), (const unsigned char *)e->body, strlen(e->body), mac, &maclen);
	memset(lines, 0, sizeof(lines));
	memset(key, 0, sizeof(key));
	for (unsigned int i = 0; i < maclen; i++)
		snprintf(legacy + 28 + 2 * i, 3, "%02x", mac[i]);
	if ((curl = curl_easy_init()) == NULL) {
		snprintf(err, errcap, "curl_easy_init failed");
		return -1;
	}
	headers = curl_slist_append(headers, "Content-Type: application/json");
	headers = curl_slist_append(headers, id_header);
	headers = curl_slist_append(headers, ts_header);
	headers = curl_slist_append(headers, sig_header);
	headers = curl_slist_append(headers, legacy);
	curl_easy_setopt(curl, CURLOPT_URL, cf->webhook_url);
	curl_easy_setopt(curl, CURLOPT_POSTFIELDS, e->body);
	curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard);
	curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(curl, CURLOPT_TIMEOUT, (long)cf->webhook_timeout);
	curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
	res = curl_easy_perform(curl);
	curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
	curl_slist_free_all(headers);
	curl_easy_cleanup(curl);
	if (res != CURLE_OK) {
		snprintf(err, errcap, "%s", errbuf[0] ? errbuf : curl_easy_strerror(res));
		return -1;
	}
	if (status < 200 || status > 299) {
		snprintf(err, errcap, "the webhook answered HTTP %ld", status);
		return -1;
	}
	return 0;
}

/* An event's record after it was posted: delivered (then it goes: the log and notes keep the facts), or when to try again. */
static int
event_outcome(void *rec, const struct outcome *o)
{
	struct event *e = rec;

	if (o->ok)
		return OB_GONE;
	e->attempts++;
	snprintf(e->last_error, sizeof(e->last_error), "%s", o->err);
	e->next_attempt = retry_at(o->cf, e->attempts);
	return OB_KEEP;
}

static const struct outbox event_outbox = { &store.eventq, &store.events, 8, sizeof(struct event), EVENT_FIXED + 1,
	offsetof(struct event, next_attempt), "a webhook event" };

/*
 * Delivers the events that are due (OUTBOX_RUN at most a run), in order,
 * until a 2xx answers each (retried with back-off, up to an hour apart: at
 * least once, with a stable id).  Returns seconds until the next is due.
 */
static int64_t
events_run(const struct config *cf)
{
	struct event *due;
	unsigned char keys[OUTBOX_RUN][16];
	int64_t next = cf->alert_interval;
	int ndue;

	if (cf->webhook_url[0] == '\0' || (due = malloc(OUTBOX_RUN * sizeof(*due))) == NULL)
		return next;
	ndue = outbox_due(&event_outbox, cf, NULL, due, keys, &next);
	for (int i = 0; i < ndue; i++) {
		char err[256] = "";
		struct outcome o = { cf, event_post(cf, &due[i], err, sizeof(err)) == 0, err, 0 };

		if (!o.ok)
			log_x(L_WARN, "event %" PRIu64 " not delivered to the webhook: %s", due[i].number, err);
		outbox_record(&event_outbox, keys[i], event_outcome, &o);
	}
	free(due);
	return ndue == OUTBOX_RUN ? 0 : next;
}

static void *
alert_main(void *arg)
{
	struct config cf;

	(void)arg;
	pthread_mutex_lock(&alerter.lock);
	while (!alerter.stop) {
		int64_t wait, events_wait;
		struct timespec until;

		cf = config;
		alerter.wake = 0;
		pthread_mutex_unlock(&alerter.lock);
		if (repl_may_write()) {
			wait = alert_run(&cf);
			events_wait = events_run(&cf);
		} else { /* a follower: the leader sends them, and records it */
			wait = events_wait = cf.alert_interval;
		}
		if (events_wait < wait)
			wait = events_wait;
		pthread_mutex_lock(&alerter.lock);
		if (wait < 1)
			wait = 1;
		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_sec += wait;
		while (!alerter.wake && !alerter.stop)
			if (pthread_cond_timedwait(&alerter.cond, &alerter.lock, &until) == ETIMEDOUT)
				break;
	}
	pthread_mutex_unlock(&alerter.lock);
	msgpack_sbuffer_destroy(&scratch); /* an automatic top-up's credit used them */
	expand_free();
	touched_free();
	return NULL;
}

static int
alert_spawn(void)
{
	if (pthread_create(&alerter.thread, NULL, alert_main, NULL) != 0)
		return -1;
	alerter.running = 1;
	return 0;
}

/* Wakes the alert thread: a notification was just committed, or the config changed. */
static void
alert_wake(void)
{
	pthread_mutex_lock(&alerter.lock);
	alerter.wake = 1;
	pthread_cond_signal(&alerter.cond);
	pthread_mutex_unlock(&alerter.lock);
}

/* Stops the alert thread after its current delivery (bounded by smtp_timeout). */
static void
alert_stop(void)
{
	if (!alerter.running)
		return;
	pthread_mutex_lock(&alerter.lock);
	alerter.stop = 1;
	pthread_cond_signal(&alerter.cond);
	pthread_mutex_unlock(&alerter.lock);
	pthread_join(alerter.thread, NULL);
	alerter.running = 0;
}

/* ====================================================================== */
/* 9. Main                                                                */
/* ====================================================================== */

#ifndef WALLETD_NO_MAIN
static void
usage(FILE *f)
{
	struct config defaults;
	char value[PATH_MAX];

	fprintf(f,
	    "usage: walletd [-c FILE] [-d STORE_DIR] [-s SOCKET_PATH] [-f] | -V | -h\n"
	    "  -c FILE  read this config file (key = value lines; SIGHUP reloads it)\n"
	    "  -d DIR   store directory (default /var/lib/walletd)\n"
	    "  -s PATH  socket path (default /run/walletd/walletd.sock)\n"
	    "  -f       stay in the foreground\n"
	    "  -V       print the version\n"
	    "  -h       this help\n"
	    "Flags override the config file, which overrides the built-in defaults.\n"
	    "\nConfig keys (* = reloaded on SIGHUP), each with its default:\n");
	config_defaults(&defaults);
	for (size_t i = 0; i < sizeof(config_keys) / sizeof(config_keys[0]); i++) {
		const struct config_key *k = &config_keys[i];

		fprintf(f, "  %-20s %s %s\n  %-22s default: %s\n", k->name, k->reloadable ? "*" : " ", k->help, "",
		    config_format(&defaults, k, value, sizeof(value)));
	}
}

/* Raises the open-file limit to what max_connections needs. */
static void
raise_nofile(void)
{
	struct rlimit rl;
	rlim_t want = (rlim_t)config.max_connections + 64;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= want)
		return;
	rl.rlim_cur = want <= rl.rlim_max ? want : rl.rlim_max;
	if (rl.rlim_cur < want && geteuid() == 0)
		rl.rlim_max = rl.rlim_cur = want;
	if (setrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur < want)
		log_x(L_WARN, "open-file limit is %llu, below the %llu that max_connections = %u needs",
		    (unsigned long long)rl.rlim_cur, (unsigned long long)want, config.max_connections);
}

int
main(int argc, char **argv)
{
	const char *store_dir = NULL, *socket_path = NULL;
	int foreground = 0, opt;
	struct epoll_event ev;
	sigset_t mask;

	config_defaults(&config);
	while ((opt = getopt(argc, argv, "c:d:s:fVh")) != -1) {
		switch (opt) {
		case 'c': srv.config_path = optarg; break;
		case 'd': store_dir = optarg; break;
		case 's': socket_path = optarg; break;
		case 'f': foreground = 1; break;
		case 'V': printf("walletd %s\n", WALLETD_VERSION); return 0;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return 2;
	}
	if (srv.config_path && config_load(&config, srv.config_path) != 0)
		return 1;
	if ((store_dir && config_set(&config, "store", store_dir) != 0) ||
	    (socket_path && config_set(&config, "socket", socket_path) != 0))
		return 2;
	stats.started = now_seconds();
	srv.self_uid = getuid();
	roles_load();
	raise_nofile();
	curl_global_init(CURL_GLOBAL_DEFAULT);
	signal(SIGPIPE, SIG_IGN);
	if (!config.node[0] && gethostname(config.node, sizeof(config.node) - 1) != 0)
		strcpy(config.node, "walletd");
	repl_on = config.nats_url[0] != '\0';
	if (store_open(config.store) != 0 || ledger_key_open() != 0)
		return 1;
	if ((srv.listen_fd = listen_open(config.socket)) < 0)
		return 1;
	if (!foreground && daemon(1, 1) != 0) {
		log_p("daemon");
		return 1;
	}
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &mask, NULL); /* before the threads: they inherit it */
	pthread_mutex_init(&srv.lock, NULL);
	pthread_cond_init(&srv.cond, NULL);
	if ((srv.epoll_fd = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
	    (srv.event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0 ||
	    (srv.signal_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) {
		log_p("cannot set up the event loop");
		return 1;
	}
	ev.events = EPOLLIN;
	ev.data.ptr = &srv.listen_fd;
	epoll_ctl(srv.epoll_fd, EPOLL_CTL_ADD, srv.listen_fd, &ev);
	srv.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	ev.data.ptr = &srv.event_fd;
	epoll_ctl(srv.epoll_fd, EPOLL_CTL_ADD, srv.event_fd, &ev);
	ev.data.ptr = &srv.signal_fd;
	epoll_ctl(srv.epoll_fd, EPOLL_CTL_ADD, srv.signal_fd, &ev);
	if (!journal.on)
		ahead_start(config.store); /* LMDB's own syncs cost less inside the file */
	if (journal_start() != 0 || pthread_create(&srv.writer, NULL, writer_main, NULL) != 0 || alert_spawn() != 0) {
		log_x(L_ERR, "cannot start threads");
		return 1;
	}
	if (repl_on && repl_start() != 0)
		return 1;
	printf("walletd %s ready: socket %s, store %s, pid %d\n", WALLETD_VERSION, config.socket,
	    config.store, (int)getpid());
	fflush(stdout);
	loop_run();
	repl_quiesce();
	loop_stop();
	repl_stop();
	alert_stop();
	ahead_stop();
	journal_stop();
	expand_free();
	if (srv.rtxn)
		mdb_txn_abort(srv.rtxn);
	mdb_env_close(store.env);
	curl_global_cleanup();
	log_x(L_INFO, "stopped");
	return store.panicked ? 1 : 0;
}
#endif /* WALLETD_NO_MAIN */

/*
 * protocol.h - what walletd and walletctl share: the method table, the error
 * codes, the limits and the amount helpers.
 *
 * The wire protocol is MessagePack-RPC over a SOCK_STREAM Unix socket:
 *   request      [0, msgid, method, params]   params = [map] or []
 *   response     [1, msgid, error, result]    exactly one of error/result nil
 *   notification [2, method, params]          never answered
 * An error is a map {code: str, message: str, ...details}; the details each
 * code carries are listed beside it below.
 */
#ifndef WALLETD_PROTOCOL_H
#define WALLETD_PROTOCOL_H

#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>

#include <msgpack.h>

#define WALLETD_VERSION "0.1.0"
#define WALLETD_API 1

/* What a transaction's hash covers, in this order (README: The ledger's hash chain). */
#define CHAIN_FIELDS { "id", "wallet", "created_at", "type", "amount", "balance_after", "currency", "description" }
#define CHAIN_FIELD_COUNT 8
/* Their columns in a statement or export CSV: the export's name, the statement's. */
#define CHAIN_COLUMNS { { "id", "id" }, { "wallet", "wallet" }, { "created_at", "date" }, { "type", "type" }, \
	{ "amount", "amount" }, { "balance_after", "balance" }, { "currency", "currency" }, \
	{ "description", "description" } }

/* Limits.  Those marked (config) are defaults that walletd.conf can change. */
#define MAX_FRAME_DEFAULT   (16u << 20) /* (config) max_frame, bytes */
#define WALLET_ID_MAX       64          /* 1-64 of A-Za-z0-9._:- */
#define REF_MAX             128         /* charge / top-up reference */
#define TEXT_MAX            4096        /* reason, description, actor: bytes */
#define HISTORY_LIMIT_MAX   1000
#define RATE_LIST_LIMIT_MAX 10000
#define EXPORT_LIMIT_MAX    10000
#define STATEMENT_LIMIT_MAX 10000       /* a statement's transactions, a page at a time */
#define BATCH_ITEMS_MAX     1000        /* (config) charge_batch_max */
#define EMAILS_MAX          8           /* alert_emails per wallet */
#define PREFIXES_MAX        32          /* allowed_prefixes, blocked_prefixes: each */
#define HOLD_TTL_DEFAULT    86400       /* a hold's expires_in, seconds */
#define HOLD_TTL_MAX        (30 * 86400)
#define REFUNDS_MAX         64          /* refunds of one charge (partial ones add up to it) */
#define PARAMS_MAX          24          /* params of one method */

/*
 * Roles, as bits, in the order of role_names.  admin may call everything;
 * client is a send service; payments the webhook receiver; staff a support
 * desk or a customer dashboard (no charges, rates, FX, exports or a
 * wallet's limits).
 */
#define ROLE_ADMIN    1u
#define ROLE_CLIENT   2u
#define ROLE_PAYMENTS 4u
#define ROLE_STAFF    8u
#define ROLES_COUNT   4
static const char *const role_names[ROLES_COUNT] = { "admin", "client", "payments", "staff" };
#define R_A   ROLE_ADMIN
#define R_AS  (ROLE_ADMIN | ROLE_STAFF)
#define R_AC  (ROLE_ADMIN | ROLE_CLIENT)
#define R_ACS (ROLE_ADMIN | ROLE_CLIENT | ROLE_STAFF)
#define R_AP  (ROLE_ADMIN | ROLE_PAYMENTS)
#define R_APS (ROLE_ADMIN | ROLE_PAYMENTS | ROLE_STAFF)
#define R_ALL (ROLE_ADMIN | ROLE_CLIENT | ROLE_PAYMENTS | ROLE_STAFF)

/* Method flags. */
#define MF_WRITE 1u /* changes the store: runs in the group-commit writer */
#define MF_SLOW  2u /* long read: runs on a helper thread, off the event loop */
#define MF_FLAT  4u /* makes every check before its first write, so the writer runs
                     * it without a nested transaction of its own (walletd.c); the
                     * writes kept with an error: topup.confirm's problem record, and
                     * the suspension a charge's destination_suspended records */
#define MF_SCAN  8u /* a read that may visit many records: never in the writer, and
                     * off the event loop once past its budget (walletd.c) */

/*
 * The method table: one row per method.  walletd dispatches and checks roles
 * and param names from it (its handler of `rate.import` is m_rate_import,
 * from the second column), walletctl parses arguments and prints help from
 * it, stats counts by it.  Columns: enum id, handler name, wire name, roles,
 * flags, params, summary.
 *
 * params, for walletctl: space-separated `name[:type]`; a leading `?` marks
 * an optional one, and a `!` after it one that only admin may pass (a
 * wallet's credit limit and spend controls: staff may change the rest).  Required params may be given in order as positional
 * arguments; any param may be given as `--name value` (`-` for `_`; a list
 * also repeated in the singular, `--alert-email a --alert-email b`).
 * Types: s string (default), a amount, n amount or `none` (nil), i integer,
 * I integer or `none` (nil), b true or false,
 * l list of strings, m map of `key=value` pairs, comma-separated, or `none`
 * (nil; also `--no-name`), c CSV file of rows, f file of numbers (`-` = stdin),
 * F output file passed as a descriptor (SCM_RIGHTS), not a map entry.
 */
#define WALLETD_METHODS(X) \
X(M_PING, ping, "ping", R_ALL, 0, "", \
  "Check that walletd answers; returns its version and API level.") \
X(M_WALLET_CREATE, wallet_create, "wallet.create", R_AS, MF_WRITE | MF_FLAT, \
  "wallet currency ?plan ?threshold:a ?alert_emails:l ?!credit_limit:a ?!daily_limit:a ?!hourly_messages:i " \
  "?!allowed_prefixes:l ?!blocked_prefixes:l ?!guard_range_max:I ?!guard_window:I ?!guard_country_spike:I " \
  "?!guard_min_messages:I ?!guard_block:I ?!guard_safe_prefixes:l ?parent ?shared:b ?!credit_validity:I", \
  "Create a wallet with a zero balance in one currency (with parent: a reseller's child, in its currency; " \
  "shared: its charges draw on the parent, credit_limit caps a month's).") \
X(M_WALLET_GET, wallet_get, "wallet.get", R_ACS, 0, "wallet", \
  "Show a wallet: balance, plan, threshold, alert e-mails, status.") \
X(M_BALANCE, balance, "balance", R_ACS, 0, "wallet", \
  "Show a wallet's balance and currency.") \
X(M_WALLET_UPDATE, wallet_update, "wallet.update", R_AS, MF_WRITE | MF_FLAT, \
  "wallet ?plan ?threshold:n ?alert_emails:l ?status ?!credit_limit:n ?!daily_limit:n ?!hourly_messages:I " \
  "?!allowed_prefixes:l ?!blocked_prefixes:l ?!guard_range_max:I ?!guard_window:I ?!guard_country_spike:I " \
  "?!guard_min_messages:I ?!guard_block:I ?!guard_safe_prefixes:l ?!auto_topup:m ?!credit_validity:I", \
  "Change a wallet's plan, threshold, alert e-mails, status (active|frozen), credit limit, spend controls, "\
  "fraud brake or automatic top-up; none = off (a guard_* setting: the config's).") \
X(M_WALLET_LIST, wallet_list, "wallet.list", R_AS, MF_SCAN, "?page:i ?limit:i ?parent", \
  "List wallets (or a reseller's children), a page at a time.") \
X(M_RATE_SET, rate_set, "rate.set", R_A, MF_WRITE | MF_FLAT, \
  "plan channel prefix price:a currency ?mccmnc ?route ?effective_from ?on_failure ?failure_fee:a ?settle " \
  "?pending_timeout:i ?pending_timeout_action", \
  "Set the price of a message on a channel to a number prefix, or a mobile network (mccmnc instead), and route; now, or from effective_from.") \
X(M_RATE_DELETE, rate_delete, "rate.delete", R_A, MF_WRITE | MF_FLAT, "plan channel prefix ?mccmnc ?route", \
  "Delete one rate.") \
X(M_RATE_LIST, rate_list, "rate.list", R_AS, MF_SCAN, "?plan ?channel ?page:i ?limit:i", \
  "List rates, a page at a time.") \
X(M_RATE_LOOKUP, rate_lookup, "rate.lookup", R_ACS, 0, "channel to ?mccmnc ?plan ?wallet ?route ?at", \
  "Show the rate that would apply to a message (its network's, else the longest prefix; cheapest route).") \
X(M_RATE_IMPORT, rate_import, "rate.import", R_A, MF_WRITE | MF_FLAT, "rows:c ?mode ?format ?plan ?channel ?route", \
  "Load a CSV rate card (plan,channel,prefix,route,price,currency), or with format mccmnc an operator's deck " \
  "(MCCMNC,PriceSubmit,PriceDelivered,Currency,Effective), in one commit; mode replace|upsert.") \
X(M_FX_SET, fx_set, "fx.set", R_A, MF_WRITE | MF_FLAT, "base quote rate ?force:b", \
  "Set an exchange rate: 1 base = rate quote; one 10 times away from the known rate needs --force true.") \
X(M_FX_LIST, fx_list, "fx.list", R_AS, 0, "", "List exchange rates.") \
X(M_CHARGE, charge, "charge", R_AC, MF_WRITE | MF_FLAT, \
  "wallet channel to ref ?mccmnc ?route ?segments:i ?text ?description ?hold ?!risk_check:b", \
  "Charge one message (from a hold's money first, when hold names one); idempotent on ref.") \
X(M_CHARGE_BATCH, charge_batch, "charge.batch", R_AC, MF_WRITE | MF_FLAT, "items:c", \
  "Charge many messages in one commit; each item succeeds or fails alone.") \
X(M_PRECHECK, precheck, "precheck", R_ACS, 0, \
  "wallet channel recipients:f ?segments:i ?text ?at ?hold ?expires_in:i", \
  "Price a campaign and say whether the balance covers it; with hold, reserve it when it does.") \
X(M_QUOTE, quote, "quote", R_ACS, 0, "channel to amount:a ?mccmnc ?wallet ?plan ?currency ?at", \
  "How many messages an amount buys.") \
X(M_HOLD_CREATE, hold_create, "hold.create", R_ACS, MF_WRITE | MF_FLAT, \
  "wallet ref ?amount:a ?channel ?recipients:f ?segments:i ?text ?expires_in:i ?description", \
  "Reserve money for a campaign: an amount, or recipients priced as precheck; idempotent on ref.") \
X(M_HOLD_RELEASE, hold_release, "hold.release", R_ACS, MF_WRITE | MF_FLAT, "wallet hold", \
  "End a hold: what remains of it is available again.") \
X(M_HOLD_GET, hold_get, "hold.get", R_ACS, 0, "wallet hold", "Show a hold.") \
X(M_HOLD_LIST, hold_list, "hold.list", R_ACS, MF_SCAN, "wallet ?status", \
  "List a wallet's holds (active|released|expired).") \
X(M_TOPUP_CREATE, topup_create, "topup.create", R_ACS, MF_WRITE | MF_FLAT, "wallet amount:a", \
  "Start a top-up: a reference and a checkout URL.") \
X(M_TOPUP_CONFIRM, topup_confirm, "topup.confirm", R_AP, MF_WRITE | MF_FLAT, \
  "ref amount:a provider provider_ref ?currency", \
  "Record a gateway's payment: credits the wallet once.") \
X(M_TOPUP_CANCEL, topup_cancel, "topup.cancel", R_APS, MF_WRITE | MF_FLAT, "ref", \
  "Cancel a pending top-up.") \
X(M_TOPUP_GET, topup_get, "topup.get", R_ALL, 0, "ref", "Show a top-up.") \
X(M_TOPUP_LIST, topup_list, "topup.list", R_AS, MF_SCAN, "wallet ?status", \
  "List a wallet's top-ups (status: pending|paid|cancelled|expired|problem).") \
X(M_CREDIT, credit, "credit", R_AS, MF_WRITE | MF_FLAT, "wallet amount:a reason ?actor ?expires_in:i ?kind", \
  "Add money by hand (manual_credit); with expires_in (days) or kind promo, as a lot of its own.") \
X(M_DEBIT, debit, "debit", R_AS, MF_WRITE | MF_FLAT, "wallet amount:a reason ?actor", \
  "Take money by hand (manual_debit); never below zero.") \
X(M_TRANSFER, transfer, "transfer", R_AP, MF_WRITE | MF_FLAT, "from to amount:a ref ?reason ?actor", \
  "Move money between a reseller's wallet and its child's, either way, in one commit; idempotent on ref.") \
X(M_REFUND, refund, "refund", R_ACS, MF_WRITE | MF_FLAT, \
  "wallet ?txn:i ?ref ?amount:a ?refund_ref ?reason ?actor", \
  "Refund a charge (by txn id or ref): what is left of it, or amount of it with a refund_ref.") \
X(M_REFUND_BATCH, refund_batch, "refund.batch", R_ACS, MF_WRITE | MF_FLAT, "items:c", \
  "Refund many charges in one commit; each item succeeds or fails alone.") \
X(M_DELIVERY, delivery, "delivery", R_ACS, MF_WRITE | MF_FLAT, "wallet ref status ?failed_parts:i ?error", \
  "Record a message's delivery report (delivered|failed|rejected|expired): refunds by its rate's on_failure.") \
X(M_DELIVERY_BATCH, delivery_batch, "delivery.batch", R_AC, MF_WRITE | MF_FLAT, "items:c", \
  "Record many delivery reports in one commit; each item succeeds or fails alone.") \
X(M_GUARD_LIST, guard_list, "guard.list", R_ACS, 0, "wallet", \
  "A wallet's destinations the fraud brake suspended, while they are.") \
X(M_GUARD_LIFT, guard_lift, "guard.lift", R_A, MF_WRITE | MF_FLAT, "wallet prefix", \
  "End a suspension of the fraud brake now; that destination's count starts afresh.") \
X(M_HISTORY, history, "history", R_ACS, MF_SCAN, \
  "wallet ?page:i ?before_id:i ?limit:i ?type:l ?since ?until", \
  "A wallet's transactions, newest first.") \
X(M_STATEMENT, statement, "statement", R_ACS, MF_SCAN, "wallet ?from ?until ?after_id:i ?limit:i", \
  "A wallet's statement: opening and closing balance, totals, messages, by country (default: this UTC month); " \
  "its transactions a page at a time.") \
X(M_EXPORT, export, "export", R_A, MF_SCAN, "?after_id:i ?limit:i", \
  "Every wallet's transactions in id order, a page at a time, for accounting (--csv: all of them).") \
X(M_REPORT_USAGE, report_usage, "report.usage", R_A, MF_SCAN, "from until group_by ?parent", \
  "Messages, segments and money charged and refunded in [from, until), by country|route|channel|plan|wallet; " \
  "with parent, of a reseller's children.") \
X(M_NOTIFICATIONS, notifications, "notifications", R_ACS, 0, "wallet", \
  "A wallet's low-balance notifications and their e-mail state.") \
X(M_VERIFY, verify, "verify", R_AS, MF_SLOW, "", \
  "Check that every balance equals the sum of its transactions.") \
X(M_BACKUP, backup, "backup", R_A, MF_SLOW, "file:F", \
  "Write a consistent, compacted copy of the store into FILE.") \
X(M_STATS, stats, "stats", R_AS, 0, "", \
  "Counters: requests, errors, commits, batch sizes, latency, store size, replication.") \
X(M_STATUS, status, "status", R_ALL, 0, "", \
  "This node: its role in a replicated group, the leader, its position in the stream and its lag.") \
X(M_REPLICATION_REPAIR, replication_repair, "replication.repair", R_A, MF_SLOW, "", \
  "On a diverged node: publish the records the stream lost from this node's copies.")

enum method_id {
#define X(id, fn, name, roles, flags, params, summary) id,
	WALLETD_METHODS(X)
#undef X
	M__COUNT
};

struct method_info {
	const char *name;
	unsigned roles;
	unsigned flags;
	const char *params;
	const char *summary;
};

static const struct method_info method_table[M__COUNT] = {
#define X(id, fn, name, roles, flags, params, summary) \
	[id] = { name, roles, flags, params, summary },
	WALLETD_METHODS(X)
#undef X
};

/* Returns the method called name (len bytes), or -1. */
static inline int
method_find(const char *name, size_t len)
{
	for (int i = 0; i < M__COUNT; i++)
		if (strlen(method_table[i].name) == len &&
		    memcmp(method_table[i].name, name, len) == 0)
			return i;
	return -1;
}

/*
 * Error codes.  Values are explicit and append-only: never renumber, never
 * reuse.  Each carries code and message, plus the details named here.
 */
#define WALLETD_ERRORS(X) \
X(E_MALFORMED_REQUEST,    1, "malformed_request")    /* frame undecodable; connection closed */ \
X(E_FRAME_TOO_LARGE,      2, "frame_too_large")      /* over max_frame; connection closed */ \
X(E_UNKNOWN_METHOD,       3, "unknown_method")       \
X(E_INVALID_ARGUMENT,     4, "invalid_argument")     /* field: the param at fault */ \
X(E_PERMISSION_DENIED,    5, "permission_denied")    \
X(E_UNKNOWN_WALLET,       6, "unknown_wallet")       \
X(E_WALLET_EXISTS,        7, "wallet_exists")        \
X(E_WALLET_FROZEN,        8, "wallet_frozen")        \
X(E_INSUFFICIENT_BALANCE, 9, "insufficient_balance") /* required, available, currency */ \
X(E_NO_RATE,             10, "no_rate")              \
X(E_NO_FX_RATE,          11, "no_fx_rate")           \
X(E_IDEMPOTENCY_CONFLICT,12, "idempotency_conflict") /* txn: the original id */ \
X(E_ALREADY_REFUNDED,    13, "already_refunded")     /* refund: the first refund; refunds: all */ \
X(E_NOT_REFUNDABLE,      14, "not_refundable")       \
X(E_UNKNOWN_TXN,         15, "unknown_txn")          \
X(E_UNKNOWN_TOPUP,       16, "unknown_topup")        \
X(E_STORAGE_FULL,        17, "storage_full")         \
X(E_TOO_MANY_CONNECTIONS,18, "too_many_connections") \
X(E_BUSY,                19, "busy")                 /* a limit reached; retry later */ \
X(E_INTERNAL,            20, "internal")             /* a bug in walletd; logged loudly */ \
X(E_UNKNOWN_HOLD,        21, "unknown_hold")         /* hold: the ref asked for */ \
X(E_HOLD_CLOSED,         22, "hold_closed")          /* hold, status: released or expired */ \
X(E_LIMIT_EXCEEDED,      23, "limit_exceeded")       /* limit, max, used, resets_at */ \
X(E_DESTINATION_BLOCKED, 24, "destination_blocked")  /* prefix: the blocked one (nil: not allowed) */ \
X(E_UNAVAILABLE,         25, "unavailable")          /* replicated: no leader, or this node may not serve */ \
X(E_DESTINATION_SUSPENDED, 26, "destination_suspended") /* prefix, until, reason: the fraud brake's */

enum error_code {
	E_OK = 0,
#define X(id, value, name) id = value,
	WALLETD_ERRORS(X)
#undef X
	E__COUNT
};

static const char *const error_names[E__COUNT] = {
	[E_OK] = "ok",
#define X(id, value, name) [id] = name,
	WALLETD_ERRORS(X)
#undef X
};

/* Returns the wire name of code, or "internal" for a value out of range. */
static inline const char *
error_name(int code)
{
	if (code < 0 || code >= E__COUNT || error_names[code] == NULL)
		return "internal";
	return error_names[code];
}

/* Returns the code called name, or -1. */
static inline int
error_find(const char *name, size_t len)
{
	for (int i = 1; i < E__COUNT; i++)
		if (strlen(error_names[i]) == len &&
		    memcmp(error_names[i], name, len) == 0)
			return i;
	return -1;
}

/* Returns the value of key name in map o, or NULL. */
static inline const msgpack_object *
map_get(const msgpack_object *o, const char *name)
{
	size_t len = strlen(name);

	if (o == NULL || o->type != MSGPACK_OBJECT_MAP)
		return NULL;
	for (uint32_t i = 0; i < o->via.map.size; i++) {
		const msgpack_object *k = &o->via.map.ptr[i].key;

		if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == len &&
		    memcmp(k->via.str.ptr, name, len) == 0)
			return &o->via.map.ptr[i].val;
	}
	return NULL;
}

/* The unsigned integer under key name in map o, or 0. */
static inline uint64_t
map_u64(const msgpack_object *o, const char *name)
{
	const msgpack_object *v = map_get(o, name);

	return v && v->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? v->via.u64 : 0;
}

/* walletctl's exit codes. */
#define EXIT_OK           0 /* success */
#define EXIT_ERROR        1 /* walletd answered with an error */
#define EXIT_USAGE        2 /* bad command line */
#define EXIT_CONNECT      3 /* cannot reach walletd */
#define EXIT_INSUFFICIENT 4 /* the answer was insufficient_balance */
#define EXIT_UNAVAILABLE  5 /* the answer was unavailable: retry (with the same ref) */

/*
 * Money.  Amounts inside are int64 micro-units (6 decimal places).  On the
 * wire they are decimal strings: -?[0-9]+(\.[0-9]{1,6})?
 */
#define MICRO 1000000LL

/*
 * Parses the n bytes at s as an amount.  Returns 0 and sets *out, or -1 for
 * anything outside the grammar (floats, exponents, spaces, 7+ decimals) or
 * beyond int64.
 */
static inline int
amount_parse(const char *s, size_t n, int64_t *out)
{
	size_t i = 0, digits = 0, decimals = 0;
	int64_t whole = 0, frac = 0;
	int neg = 0;

	if (i < n && s[i] == '-') {
		neg = 1;
		i++;
	}
	for (; i < n && s[i] >= '0' && s[i] <= '9'; i++, digits++)
		if (__builtin_mul_overflow(whole, 10, &whole) ||
		    __builtin_add_overflow(whole, s[i] - '0', &whole))
			return -1;
	if (digits == 0)
		return -1;
	if (i < n && s[i] == '.') {
		for (i++; i < n && s[i] >= '0' && s[i] <= '9'; i++) {
			if (++decimals > 6)
				return -1;
			frac = frac * 10 + (s[i] - '0');
		}
		if (decimals == 0)
			return -1;
	}
	if (i != n)
		return -1;
	for (; decimals < 6; decimals++)
		frac *= 10;
	if (__builtin_mul_overflow(whole, MICRO, &whole) ||
	    __builtin_add_overflow(whole, frac, &whole))
		return -1;
	*out = neg ? -whole : whole;
	return 0;
}

/*
 * Formats v into buf (at least 32 bytes) as the shortest exact decimal, with
 * at least min_decimals decimals (0 on the wire, 2 for people).  Returns buf.
 */
static inline char *
amount_format(int64_t v, char *buf, int min_decimals)
{
	uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
	uint64_t whole = mag / MICRO, frac = mag % MICRO;
	char digits[24];
	int n = 0, keep = 6;
	char *p = buf;

	if (v < 0)
		*p++ = '-';
	do
		digits[n++] = (char)('0' + whole % 10);
	while ((whole /= 10) != 0);
	while (n > 0)
		*p++ = digits[--n];
	for (; keep > min_decimals && frac % 10 == 0 && keep > 0; keep--)
		frac /= 10;
	if (keep > 0) {
		*p++ = '.';
		for (int i = keep - 1; i >= 0; i--, frac /= 10)
			p[i] = (char)('0' + frac % 10);
		p += keep;
	}
	*p = '\0';
	return buf;
}

#endif /* WALLETD_PROTOCOL_H */

/*
 * Unit tests of walletd's pieces, one suite per area: money, segments, fx,
 * store (rates, charge, refund, history: a fresh store per test), protocol.
 * walletd.c is included whole so its static functions can be reached.
 */
#define WALLETD_NO_MAIN
#include "../walletd.c"

#include <check.h>
#include <ftw.h>

/* ---- money ------------------------------------------------------------ */

static int64_t
parse_ok(const char *s)
{
	int64_t v = 0;

	ck_assert_msg(amount_parse(s, strlen(s), &v) == 0, "'%s' should parse", s);
	return v;
}

static void
parse_bad(const char *s)
{
	int64_t v;

	ck_assert_msg(amount_parse(s, strlen(s), &v) != 0, "'%s' should be rejected", s);
}

START_TEST(amount_parse_accepts_the_grammar)
{
	ck_assert_int_eq(parse_ok("35"), 35000000);
	ck_assert_int_eq(parse_ok("1499.06"), 1499060000);
	ck_assert_int_eq(parse_ok("-0.94"), -940000);
	ck_assert_int_eq(parse_ok("0.000001"), 1);
	ck_assert_int_eq(parse_ok("0"), 0);
	ck_assert_int_eq(parse_ok("007.5"), 7500000);
	ck_assert_int_eq(parse_ok("9223372036854.775807"), INT64_MAX);
}
END_TEST

START_TEST(amount_parse_rejects_everything_else)
{
	const char *bad[] = { "", "-", ".5", "5.", "1.2345678", "1e5", "1E5", " 1", "1 ", "+1",
		"1,000", "0x10", "1.2.3", "--1", "nan", "inf", "9223372036854.775808",
		"99999999999999999999", "1.0000000" };

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		parse_bad(bad[i]);
}
END_TEST

START_TEST(amount_format_is_shortest_exact)
{
	char buf[32];

	ck_assert_str_eq(amount_format(35000000, buf, 0), "35");
	ck_assert_str_eq(amount_format(1499060000, buf, 0), "1499.06");
	ck_assert_str_eq(amount_format(-940000, buf, 0), "-0.94");
	ck_assert_str_eq(amount_format(0, buf, 0), "0");
	ck_assert_str_eq(amount_format(1, buf, 0), "0.000001");
	ck_assert_str_eq(amount_format(INT64_MAX, buf, 0), "9223372036854.775807");
	ck_assert_str_eq(amount_format(INT64_MIN, buf, 0), "-9223372036854.775808");
	ck_assert_str_eq(amount_format(35000000, buf, 2), "35.00");
	ck_assert_str_eq(amount_format(4200000, buf, 2), "4.20");
}
END_TEST

START_TEST(amount_round_trips)
{
	int64_t samples[] = { 0, 1, -1, 999999, 1000000, 123456789012, -987654321, INT64_MAX, INT64_MIN + 1 };

	for (size_t i = 0; i < sizeof(samples) / sizeof(samples[0]); i++) {
		char buf[32];

		ck_assert_int_eq(parse_ok(amount_format(samples[i], buf, 0)), samples[i]);
	}
}
END_TEST

static Suite *
money_suite(void)
{
	Suite *s = suite_create("money");
	TCase *tc = tcase_create("amounts");

	tcase_add_test(tc, amount_parse_accepts_the_grammar);
	tcase_add_test(tc, amount_parse_rejects_everything_else);
	tcase_add_test(tc, amount_format_is_shortest_exact);
	tcase_add_test(tc, amount_round_trips);
	suite_add_tcase(s, tc);
	return s;
}

/* ---- segments ---------------------------------------------------------- */

static uint32_t
segs(const char *text)
{
	uint32_t n = 0;

	ck_assert_msg(sms_segments(text, strlen(text), &n) == 0, "text should be valid");
	return n;
}

static char *
append(char *buf, const char *unit, int times)
{
	for (int i = 0; i < times; i++)
		strcat(buf, unit);
	return buf;
}

static char *
repeat(const char *unit, int times, char *buf)
{
	buf[0] = '\0';
	return append(buf, unit, times);
}

START_TEST(gsm_160_is_one_161_is_two)
{
	char buf[2048];

	ck_assert_uint_eq(segs(""), 1);
	ck_assert_uint_eq(segs(repeat("a", 160, buf)), 1);
	ck_assert_uint_eq(segs(repeat("a", 161, buf)), 2);
	ck_assert_uint_eq(segs(repeat("a", 306, buf)), 2);
	ck_assert_uint_eq(segs(repeat("a", 307, buf)), 3);
	ck_assert_uint_eq(segs(repeat("@£$¥", 40, buf)), 1); /* 160 basic-table characters */
}
END_TEST

START_TEST(euro_takes_two_septets)
{
	char buf[2048];

	repeat("a", 158, buf);
	strcat(buf, "€");
	ck_assert_uint_eq(segs(buf), 1); /* 160 septets */
	repeat("a", 159, buf);
	strcat(buf, "€");
	ck_assert_uint_eq(segs(buf), 2); /* 161 septets */
}
END_TEST

START_TEST(escape_pair_never_straddles_parts)
{
	char buf[2048];

	repeat("a", 152, buf);
	strcat(buf, "€");
	append(buf, "a", 152);
	ck_assert_uint_eq(segs(buf), 3);
}
END_TEST

START_TEST(ucs2_70_is_one_71_is_two)
{
	char buf[4096];

	ck_assert_uint_eq(segs(repeat("Ж", 70, buf)), 1);
	ck_assert_uint_eq(segs(repeat("Ж", 71, buf)), 2);
	ck_assert_uint_eq(segs(repeat("Ж", 134, buf)), 2);
	ck_assert_uint_eq(segs(repeat("Ж", 135, buf)), 3);
}
END_TEST

START_TEST(emoji_is_two_units_and_never_split)
{
	char buf[4096];

	ck_assert_uint_eq(segs(repeat("😀", 35, buf)), 1);  /* 70 units */
	ck_assert_uint_eq(segs(repeat("😀", 36, buf)), 2);  /* 72 units */
	repeat("Ж", 66, buf);
	strcat(buf, "😀");                                   /* 66 + 2 = 68 > 67 */
	append(buf, "Ж", 10);
	ck_assert_uint_eq(segs(buf), 2);
	repeat("Ж", 66, buf);
	strcat(buf, "😀");
	append(buf, "Ж", 66); /* part 2: 2 + 65 = 67, then 1 more */
	ck_assert_uint_eq(segs(buf), 3);
}
END_TEST

START_TEST(invalid_utf8_is_refused)
{
	uint32_t n;
	const char *bad[] = { "\xff", "a\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80" };

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		ck_assert_int_eq(sms_segments(bad[i], strlen(bad[i]), &n), -1);
}
END_TEST

static Suite *
segments_suite(void)
{
	Suite *s = suite_create("segments");
	TCase *tc = tcase_create("sms");

	tcase_add_test(tc, gsm_160_is_one_161_is_two);
	tcase_add_test(tc, euro_takes_two_septets);
	tcase_add_test(tc, escape_pair_never_straddles_parts);
	tcase_add_test(tc, ucs2_70_is_one_71_is_two);
	tcase_add_test(tc, emoji_is_two_units_and_never_split);
	tcase_add_test(tc, invalid_utf8_is_refused);
	suite_add_tcase(s, tc);
	return s;
}

/* ---- fx ----------------------------------------------------------------- */

static i128
rate_of(const char *s)
{
	i128 r;

	ck_assert_int_eq(fx_rate_parse(s, strlen(s), &r), 0);
	return r;
}

START_TEST(fx_seed_example_rounds_per_message)
{
	int64_t out;

	/* 35 UGX into USD at 1 USD = 3723.40 UGX: inverse of the pair. */
	ck_assert_int_eq(fx_apply(35000000, rate_of("3723.40"), 1, &out), 0);
	ck_assert_int_eq(out, 9400);     /* 0.0094000107... -> 0.0094 */
	ck_assert_int_eq(fx_apply(3500000000, rate_of("3723.40"), 1, &out), 0);
	ck_assert_int_eq(out, 940001);   /* 0.94000107 */
	ck_assert_int_eq(fx_apply(2686, rate_of("3723.40"), 0, &out), 0);
	ck_assert_int_eq(out, 10001052); /* 0.002686 USD is 10.001052 UGX available */
}
END_TEST

START_TEST(fx_rounds_half_away_from_zero)
{
	int64_t out;

	ck_assert_int_eq(fx_apply(5, rate_of("0.5"), 0, &out), 0);
	ck_assert_int_eq(out, 3);
	ck_assert_int_eq(fx_apply(-5, rate_of("0.5"), 0, &out), 0);
	ck_assert_int_eq(out, -3);
	ck_assert_int_eq(fx_apply(4, rate_of("0.5"), 0, &out), 0);
	ck_assert_int_eq(out, 2);
	ck_assert_int_eq(fx_apply(1, rate_of("3"), 1, &out), 0);
	ck_assert_int_eq(out, 0);
	ck_assert_int_eq(fx_apply(2, rate_of("3"), 1, &out), 0);
	ck_assert_int_eq(out, 1);
}
END_TEST

START_TEST(fx_overflow_is_refused)
{
	int64_t out;

	ck_assert_int_eq(fx_apply(INT64_MAX, rate_of("2"), 0, &out), -1);
	ck_assert_int_eq(fx_apply(INT64_MAX, rate_of("0.000000000001"), 1, &out), -1);
	ck_assert_int_eq(fx_apply(INT64_MAX, rate_of("999999999999999.999999999999"), 0, &out), -1);
}
END_TEST

START_TEST(fx_rate_grammar)
{
	i128 r;
	char buf[48];

	ck_assert_str_eq(fx_rate_format(rate_of("3723.40"), buf), "3723.4");
	ck_assert_str_eq(fx_rate_format(rate_of("0.000000000001"), buf), "0.000000000001");
	ck_assert_int_eq(fx_rate_parse("0", 1, &r), -1);
	ck_assert_int_eq(fx_rate_parse("-1", 2, &r), -1);
	ck_assert_int_eq(fx_rate_parse("1e3", 3, &r), -1);
	ck_assert_int_eq(fx_rate_parse("1.0000000000001", 15, &r), -1);
}
END_TEST

static Suite *
fx_suite(void)
{
	Suite *s = suite_create("fx");
	TCase *tc = tcase_create("convert");

	tcase_add_test(tc, fx_seed_example_rounds_per_message);
	tcase_add_test(tc, fx_rounds_half_away_from_zero);
	tcase_add_test(tc, fx_overflow_is_refused);
	tcase_add_test(tc, fx_rate_grammar);
	suite_add_tcase(s, tc);
	return s;
}

/* ---- store: a fresh store per test --------------------------------------- */

static char store_dir[64];

static int
rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st, (void)flag, (void)ftw;
	return remove(path);
}

static void
store_setup(void)
{
	config_defaults(&config);
	config.log_level = 0;
	strcpy(store_dir, "/tmp/walletd-check-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(store_dir));
	ck_assert_int_eq(store_open(store_dir), 0);
}

static void
store_teardown(void)
{
	journal_stop();
	mdb_env_close(store.env);
	close(store.lock_fd);
	nftw(store_dir, rm_one, 8, FTW_DEPTH | FTW_PHYS);
}

/* The answer of one call: its code, and the decoded result or error. */
struct answer {
	int code;
	msgpack_unpacked result;
	msgpack_sbuffer buf;
};

/*
 * Calls method m in its own write transaction (committed on success) with
 * params given as "key", "value" pairs; a value starting with '#' is sent as
 * an integer.  NULL ends the list.
 */
static struct answer
run(int m, ...)
{
	struct answer a;
	msgpack_sbuffer pbuf;
	msgpack_packer ppk, rpk;
	msgpack_unpacked params;
	const char *keys[32], *values[32];
	int n = 0;
	struct call c;
	va_list ap;

	va_start(ap, m);
	while ((keys[n] = va_arg(ap, const char *)) != NULL)
		values[n++] = va_arg(ap, const char *);
	va_end(ap);
	msgpack_sbuffer_init(&pbuf);
	msgpack_packer_init(&ppk, &pbuf, msgpack_sbuffer_write);
	msgpack_pack_map(&ppk, (size_t)n);
	for (int i = 0; i < n; i++) {
		pack_cstr(&ppk, keys[i]);
		if (values[i][0] == '#')
			msgpack_pack_uint64(&ppk, strtoull(values[i] + 1, NULL, 10));
		else
			pack_cstr(&ppk, values[i]);
	}
	msgpack_unpacked_init(&params);
	ck_assert_int_eq(msgpack_unpack_next(&params, pbuf.data, pbuf.size, NULL), MSGPACK_UNPACK_SUCCESS);

	memset(&c, 0, sizeof(c));
	msgpack_sbuffer_init(&a.buf);
	msgpack_packer_init(&rpk, &a.buf, msgpack_sbuffer_write);
	c.pk = &rpk;
	c.params = &params.data;
	c.fd = -1;
	ck_assert_int_eq(mdb_txn_begin(store.env, NULL, 0, &c.txn), 0);
	a.code = method_fns[m](&c);
	if (a.code == E_OK) {
		ck_assert_int_eq(mdb_txn_commit(c.txn), 0);
	} else {
		msgpack_sbuffer_clear(&a.buf);
		pack_error(&rpk, &c);
		mdb_txn_abort(c.txn);
	}
	msgpack_unpacked_init(&a.result);
	ck_assert_int_eq(msgpack_unpack_next(&a.result, a.buf.data, a.buf.size, NULL), MSGPACK_UNPACK_SUCCESS);
	msgpack_unpacked_destroy(&params);
	msgpack_sbuffer_destroy(&pbuf);
	return a;
}

static void
answer_free(struct answer *a)
{
	msgpack_unpacked_destroy(&a->result);
	msgpack_sbuffer_destroy(&a->buf);
}

/* Asserts that field name of the answer is the string want. */
static void
assert_field(struct answer *a, const char *name, const char *want)
{
	const msgpack_object *o = map_get(&a->result.data, name);

	ck_assert_msg(o != NULL, "no field %s", name);
	ck_assert_msg(o->type == MSGPACK_OBJECT_STR && o->via.str.size == strlen(want) &&
	    memcmp(o->via.str.ptr, want, strlen(want)) == 0, "%s is not %s", name, want);
}

static void
ok(struct answer a)
{
	ck_assert_msg(a.code == E_OK, "call failed with %s", error_name(a.code));
	answer_free(&a);
}

/* A USD wallet "acme" holding `balance`, rates for Uganda, and the seed's FX. */
static void
seed_wallet(const char *balance)
{
	ok(run(M_WALLET_CREATE, "wallet", "acme", "currency", "USD", NULL));
	ok(run(M_CREDIT, "wallet", "acme", "amount", balance, "reason", "opening", NULL));
	ok(run(M_RATE_SET, "plan", "default", "channel", "sms", "prefix", "256", "price", "35",
	    "currency", "UGX", "route", "ESMS_UG", NULL));
	ok(run(M_FX_SET, "base", "USD", "quote", "UGX", "rate", "3723.40", NULL));
}

START_TEST(seed_example_100_sms_cost_0_94)
{
	char ref[16];

	seed_wallet("1500");
	for (int i = 0; i < 100; i++) {
		struct answer a;

		snprintf(ref, sizeof(ref), "m-%d", i);
		a = run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "+256712345678", "ref", ref, NULL);
		ck_assert_int_eq(a.code, E_OK);
		assert_field(&a, "amount", "-0.0094");
		assert_field(&a, "description", "SMS to +256712345678 via ESMS_UG (1 seg)");
		answer_free(&a);
	}
	{
		struct answer a = run(M_BALANCE, "wallet", "acme", NULL);

		assert_field(&a, "balance", "1499.06");
		answer_free(&a);
	}
}
END_TEST

START_TEST(insufficient_balance_reports_price_currency)
{
	struct answer a;

	ok(run(M_WALLET_CREATE, "wallet", "ug", "currency", "UGX", NULL));
	ok(run(M_CREDIT, "wallet", "ug", "amount", "10", "reason", "r", NULL));
	ok(run(M_RATE_SET, "plan", "default", "channel", "sms", "prefix", "256", "price", "35", "currency", "UGX", NULL));
	a = run(M_CHARGE, "wallet", "ug", "channel", "sms", "to", "256712345678", "ref", "x", NULL);
	ck_assert_int_eq(a.code, E_INSUFFICIENT_BALANCE);
	assert_field(&a, "message", "Insufficient balance. Required: 35 UGX, available: 10 UGX");
	assert_field(&a, "required", "35");
	assert_field(&a, "available", "10");
	assert_field(&a, "currency", "UGX");
	answer_free(&a);

	seed_wallet("0.002686");
	a = run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "256712345678", "ref", "x", NULL);
	ck_assert_int_eq(a.code, E_INSUFFICIENT_BALANCE);
	assert_field(&a, "available", "10.001052");
	assert_field(&a, "currency", "UGX");
	answer_free(&a);
}
END_TEST

START_TEST(longest_prefix_and_cheapest_route_win)
{
	struct answer a;

	seed_wallet("100");
	ok(run(M_RATE_SET, "plan", "default", "channel", "sms", "prefix", "2567", "price", "30", "currency", "UGX", "route", "B", NULL));
	ok(run(M_RATE_SET, "plan", "default", "channel", "sms", "prefix", "2567", "price", "0.005", "currency", "USD", "route", "C", NULL));
	ok(run(M_RATE_SET, "plan", "default", "channel", "sms", "prefix", "2567", "price", "0.005", "currency", "USD", "route", "A", NULL));
	/* 30 UGX = 0.008057 USD; 0.005 USD is cheaper; A and C tie: A by name. */
	a = run(M_RATE_LOOKUP, "wallet", "acme", "channel", "sms", "to", "+256712345678", NULL);
	ck_assert_int_eq(a.code, E_OK);
	assert_field(&a, "prefix", "2567");
	assert_field(&a, "route", "A");
	answer_free(&a);
	a = run(M_RATE_LOOKUP, "wallet", "acme", "channel", "sms", "to", "+256812345678", NULL);
	assert_field(&a, "prefix", "256");
	answer_free(&a);
	a = run(M_RATE_LOOKUP, "wallet", "acme", "channel", "sms", "to", "+256712345678", "route", "ESMS_UG", NULL);
	assert_field(&a, "prefix", "256");
	assert_field(&a, "route", "ESMS_UG");
	answer_free(&a);
	a = run(M_RATE_LOOKUP, "wallet", "acme", "channel", "sms", "to", "+254712345678", NULL);
	ck_assert_int_eq(a.code, E_NO_RATE);
	answer_free(&a);
	a = run(M_RATE_LOOKUP, "wallet", "acme", "channel", "whatsapp", "to", "+256712345678", NULL);
	ck_assert_int_eq(a.code, E_NO_RATE);
	answer_free(&a);
}
END_TEST

START_TEST(charge_same_ref_charges_once)
{
	struct answer a;

	seed_wallet("1");
	ok(run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "+256712345678", "ref", "m1", "segments", "#2", NULL));
	a = run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "+256712345678", "ref", "m1", "segments", "#2", NULL);
	ck_assert_int_eq(a.code, E_OK);
	ck_assert(map_get(&a.result.data, "replayed")->via.boolean);
	answer_free(&a);
	a = run(M_BALANCE, "wallet", "acme", NULL);
	assert_field(&a, "balance", "0.9812");
	answer_free(&a);
	a = run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "+256712345678", "ref", "m1", "segments", "#3", NULL);
	ck_assert_int_eq(a.code, E_IDEMPOTENCY_CONFLICT);
	answer_free(&a);
}
END_TEST

/* Writes layout version v into the store's meta, in txn. */
static void
put_version(MDB_txn *txn, uint32_t v)
{
	MDB_val k = { 7, "version" }, val = { sizeof(v), &v };

	ck_assert_int_eq(mdb_put(txn, store.meta, &k, &val, 0), 0);
}

/* Closes the store and opens it again, as a restart does; store_open's result. */
static int
store_reopen(void)
{
	journal_stop(); /* as a clean stop: a last checkpoint */
	mdb_env_close(store.env);
	close(store.lock_fd);
	return store_open(store_dir);
}

/* The layout version in the store's meta (also after a refused store_open). */
static uint32_t
stored_version(void)
{
	MDB_txn *txn;
	MDB_val k = { 7, "version" }, v;
	uint32_t version;

	ck_assert_int_eq(mdb_txn_begin(store.env, NULL, MDB_RDONLY, &txn), 0);
	ck_assert_int_eq(mdb_dbi_open(txn, "meta", 0, &store.meta), 0);
	ck_assert_int_eq(mdb_get(txn, store.meta, &k, &v), 0);
	memcpy(&version, v.mv_data, sizeof(version));
	mdb_txn_abort(txn);
	return version;
}

/* A layout-2 store (refs keyed wallet number first) is re-keyed on open: refs still replay. */
START_TEST(layout_2_refs_are_rekeyed)
{
	struct answer a;
	struct wallet w;
	unsigned char key[REF_MAX + 8], old[8 + 2];
	MDB_txn *txn;
	MDB_val k, v;
	char val[256];

	seed_wallet("1");
	ok(run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "+256712345678", "ref", "m1", NULL));
	ck_assert_int_eq(mdb_txn_begin(store.env, NULL, 0, &txn), 0);
	ck_assert_int_eq(wallet_get(txn, (struct str){ "acme", 4 }, &w), 0);
	k = ref_key(key, (struct str){ "m1", 2 }, w.number);
	ck_assert_int_eq(mdb_get(txn, store.refs, &k, &v), 0);
	ck_assert_uint_le(v.mv_size, sizeof(val));
	memcpy(val, v.mv_data, v.mv_size);
	v.mv_data = val;
	ck_assert_int_eq(mdb_del(txn, store.refs, &k, NULL), 0);
	be64_put(old, w.number);
	memcpy(old + 8, "m1", 2);
	k = (MDB_val){ sizeof(old), old };
	ck_assert_int_eq(mdb_put(txn, store.refs, &k, &v, 0), 0);
	put_version(txn, 2);
	ck_assert_int_eq(mdb_txn_commit(txn), 0);

	ck_assert_int_eq(store_reopen(), 0);
	a = run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "+256712345678", "ref", "m1", NULL);
	ck_assert_int_eq(a.code, E_OK);
	ck_assert(map_get(&a.result.data, "replayed")->via.boolean);
	answer_free(&a);
	a = run(M_BALANCE, "wallet", "acme", NULL);
	assert_field(&a, "balance", "0.9906");
	answer_free(&a);
	ck_assert_uint_eq(stored_version(), STORE_VERSION);
}
END_TEST

/* A transaction stored as txn_pack_stored expands to the very map txn_pack makes. */
START_TEST(stored_records_expand_to_the_map)
{
	struct txn t[4];
	struct txn_head h;

	memset(t, 0, sizeof(t));
	t[0] = (struct txn){ .id = 7, .type = T_SMS_CHARGE, .wallet = { "acme", 4 }, .amount = -9400,
		.balance_after = 990600, .currency = "UGX", .created_at = 1764085000,
		.ref = { "m1", 2 }, .channel = { "sms", 3 }, .to = "+256712345678",
		.route = { "ESMS_UG", 7 }, .segments = 2, .price = 4700, .price_currency = "UGX" };
	strcpy(t[0].description, "SMS to +256712345678 via ESMS_UG (2 seg)");
	t[1] = (struct txn){ .id = 8, .type = T_WHATSAPP_CHARGE, .wallet = { "w-2", 3 }, .amount = -1,
		.balance_after = 0, .currency = "USD", .created_at = 1, .ref = { "r", 1 },
		.channel = { "whatsapp", 8 }, .to = "+15550000000", .route = { "", 0 }, .segments = 1,
		.price = 1, .price_currency = "EUR" };
	strcpy(t[1].description, "caller's own words, \"quoted\" and \u00e9");
	t[2] = (struct txn){ .id = UINT64_MAX, .type = T_CREDIT, .wallet = { "acme", 4 },
		.amount = INT64_MAX, .balance_after = INT64_MAX, .currency = "KES", .created_at = 2,
		.ref = { "top-1", 5 }, .has_actor = 1, .actor_uid = 1000, .actor = { "ops", 3 },
		.provider = { "flutterwave", 11 }, .provider_ref = { "FLW-9", 5 },
		.paid_amount = 5000000, .paid_currency = "USD" };
	t[3] = (struct txn){ .id = 9, .type = T_REFUND, .wallet = { "acme", 4 }, .amount = 9400,
		.balance_after = INT64_MIN, .currency = "UGX", .created_at = 3, .refund_of = 7,
		.has_actor = 1, .actor_uid = 0 };
	for (int i = 0; i < 4; i++) {
		msgpack_sbuffer map, stored, out;
		msgpack_packer pk;

		msgpack_sbuffer_init(&map);
		msgpack_sbuffer_init(&stored);
		msgpack_sbuffer_init(&out);
		msgpack_packer_init(&pk, &map, msgpack_sbuffer_write);
		txn_pack(&pk, &t[i], -1);
		msgpack_packer_init(&pk, &stored, msgpack_sbuffer_write);
		txn_pack_stored(&pk, &t[i]);
		ck_assert_uint_lt(stored.size, map.size);
		memset(&h, 0, sizeof(h));
		h.type = (uint32_t)t[i].type;
		h.amount = t[i].amount;
		h.balance_after = t[i].balance_after;
		h.created_at = t[i].created_at;
		msgpack_packer_init(&pk, &out, msgpack_sbuffer_write);
		ck_assert_int_eq(txn_expand(NULL, t[i].id, &h, stored.data, stored.size, &pk), 0);
		ck_assert_uint_eq(out.size, map.size);
		ck_assert_msg(memcmp(out.data, map.data, map.size) == 0, "variant %d differs", i);
		ck_assert_int_eq(txn_expand(NULL, t[i].id, &h, stored.data, stored.size - 1, &pk), MDB_CORRUPTED);
		ck_assert_uint_eq(out.size, map.size); /* nothing packed */
		msgpack_sbuffer_destroy(&map);
		msgpack_sbuffer_destroy(&stored);
		msgpack_sbuffer_destroy(&out);
	}
}
END_TEST

/* A layout-3 store (records stored whole as maps) opens as layout 4 and its
 * records still read: replay, history, verify. */
START_TEST(layout_3_records_still_read)
{
	struct answer a;
	struct txn_head h;
	uint64_t id;
	MDB_txn *txn;
	MDB_val k, v, raw;
	char rec[1024];

	seed_wallet("1");
	a = run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "+256712345678", "ref", "m1", NULL);
	ck_assert_int_eq(a.code, E_OK);
	id = map_get(&a.result.data, "id")->via.u64;
	answer_free(&a);
	ck_assert_int_eq(mdb_txn_begin(store.env, NULL, 0, &txn), 0);
	ck_assert_int_eq(txn_read(txn, id, &h, &raw), 0);
	{ /* as layout 3 stored it: the map, without the hash it gained in layout 7 */
		msgpack_unpacked m;
		msgpack_sbuffer sb;
		msgpack_packer pk;
		const msgpack_object_kv *kv;
		uint32_t n;

		msgpack_unpacked_init(&m);
		ck_assert_int_eq(msgpack_unpack_next(&m, raw.mv_data, raw.mv_size, NULL), MSGPACK_UNPACK_SUCCESS);
		kv = m.data.via.map.ptr;
		n = m.data.via.map.size;
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		pack_map16(&pk, n - 1);
		for (uint32_t i = 0; i < n; i++)
			if (!(kv[i].key.via.str.size == 4 && memcmp(kv[i].key.via.str.ptr, "hash", 4) == 0)) {
				msgpack_pack_object(&pk, kv[i].key);
				msgpack_pack_object(&pk, kv[i].val);
			}
		h.flags &= ~TXN_HASHED;
		ck_assert_uint_le(sizeof(h) + sb.size, sizeof(rec));
		memcpy(rec, &h, sizeof(h));
		memcpy(rec + sizeof(h), sb.data, sb.size);
		v = (MDB_val){ sizeof(h) + sb.size, rec };
		msgpack_sbuffer_destroy(&sb);
		msgpack_unpacked_destroy(&m);
	}
	k = (MDB_val){ sizeof(id), &id };
	ck_assert_int_eq(mdb_put(txn, store.txns, &k, &v, 0), 0);
	put_version(txn, 3);
	ck_assert_int_eq(mdb_txn_commit(txn), 0);

	ck_assert_int_eq(store_reopen(), 0);
	ck_assert_uint_eq(stored_version(), STORE_VERSION);
	ck_assert_int_eq(mdb_txn_begin(store.env, NULL, MDB_RDONLY, &txn), 0);
	ck_assert_int_eq(mdb_get(txn, store.txns, &k, &v), 0);
	memcpy(&h, v.mv_data, sizeof(h));
	ck_assert(h.flags & TXN_HASHED); /* hashed at the upgrade, kept a map */
	ck_assert_uint_eq(((unsigned char *)v.mv_data)[sizeof(h) + 32], 0xde);
	mdb_txn_abort(txn);

	a = run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "+256712345678", "ref", "m1", NULL);
	ck_assert_int_eq(a.code, E_OK);
	ck_assert(map_get(&a.result.data, "replayed")->via.boolean);
	ck_assert_uint_eq(map_get(&a.result.data, "id")->via.u64, id);
	assert_field(&a, "amount", "-0.0094");
	assert_field(&a, "description", "SMS to +256712345678 via ESMS_UG (1 seg)");
	answer_free(&a);
	a = run(M_HISTORY, "wallet", "acme", NULL);
	ck_assert_uint_eq(map_get(&map_get(&a.result.data, "transactions")->via.array.ptr[0], "id")->via.u64, id);
	ck_assert_ptr_nonnull(map_get(&map_get(&a.result.data, "transactions")->via.array.ptr[0], "hash"));
	answer_free(&a);
	a = run(M_VERIFY, NULL);
	ck_assert(map_get(&a.result.data, "ok")->via.boolean);
	answer_free(&a);
}
END_TEST

/* A store of a layout this walletd does not know is refused, untouched. */
START_TEST(newer_layout_is_refused)
{
	MDB_txn *txn;

	ck_assert_int_eq(mdb_txn_begin(store.env, NULL, 0, &txn), 0);
	put_version(txn, STORE_VERSION + 1);
	ck_assert_int_eq(mdb_txn_commit(txn), 0);
	ck_assert_int_eq(store_reopen(), -1);
	/* store_open left the environment open (walletd exits): the version is unchanged */
	ck_assert_uint_eq(stored_version(), STORE_VERSION + 1);
}
END_TEST

START_TEST(refund_is_exact_and_once)
{
	struct answer a;

	seed_wallet("1");
	ok(run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "+256712345678", "ref", "m1", NULL));
	a = run(M_REFUND, "wallet", "acme", "ref", "m1", "reason", "failed DLR", NULL);
	ck_assert_int_eq(a.code, E_OK);
	assert_field(&a, "amount", "0.0094");
	assert_field(&a, "balance_after", "1");
	answer_free(&a);
	a = run(M_REFUND, "wallet", "acme", "ref", "m1", NULL);
	ck_assert_int_eq(a.code, E_ALREADY_REFUNDED);
	ck_assert_ptr_nonnull(map_get(&a.result.data, "refund"));
	answer_free(&a);
	a = run(M_REFUND, "wallet", "acme", "txn", "#1", NULL); /* the opening manual_credit */
	ck_assert_int_eq(a.code, E_NOT_REFUNDABLE);
	answer_free(&a);
}
END_TEST

START_TEST(history_pages_newest_first)
{
	struct answer a;
	const msgpack_object *txns;

	seed_wallet("1");
	for (int i = 0; i < 25; i++) {
		char ref[8];

		snprintf(ref, sizeof(ref), "r%d", i);
		ok(run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "256700000000", "ref", ref, NULL));
	}
	a = run(M_HISTORY, "wallet", "acme", "page", "#1", "limit", "#10", NULL);
	txns = map_get(&a.result.data, "transactions");
	ck_assert_uint_eq(txns->via.array.size, 10);
	ck_assert_uint_eq(map_get(&txns->via.array.ptr[0], "id")->via.u64, 16);
	ck_assert_uint_eq(map_get(&a.result.data, "total")->via.u64, 26);
	answer_free(&a);
	a = run(M_HISTORY, "wallet", "acme", "before_id", "#5", "limit", "#10", NULL);
	txns = map_get(&a.result.data, "transactions");
	ck_assert_uint_eq(txns->via.array.size, 4);
	ck_assert_uint_eq(map_get(&txns->via.array.ptr[0], "id")->via.u64, 4);
	answer_free(&a);
	a = run(M_HISTORY, "wallet", "acme", "type", "manual_credit", NULL);
	ck_assert_uint_eq(map_get(&a.result.data, "total")->via.u64, 1);
	answer_free(&a);
	a = run(M_HISTORY, "wallet", "acme", "limit", "#1001", NULL);
	ck_assert_int_eq(a.code, E_INVALID_ARGUMENT);
	assert_field(&a, "field", "limit");
	answer_free(&a);
}
END_TEST

/* Every page and every before_id across many HIST_STRIDE blocks gives the right ids. */
START_TEST(history_pages_across_index_blocks)
{
	int n = 3 * HIST_STRIDE + 5;

	ok(run(M_WALLET_CREATE, "wallet", "w", "currency", "USD", NULL));
	for (int i = 0; i < n; i++)
		ok(run(M_CREDIT, "wallet", "w", "amount", "1", "reason", "r", NULL));
	for (int limit = 1; limit <= 13; limit += 6)
		for (int page = 0; page * limit <= n; page++) {
			char lbuf[16], pbuf[16];
			struct answer a;
			const msgpack_object *txns;

			snprintf(lbuf, sizeof(lbuf), "#%d", limit);
			snprintf(pbuf, sizeof(pbuf), "#%d", page);
			a = run(M_HISTORY, "wallet", "w", "page", pbuf, "limit", lbuf, NULL);
			txns = map_get(&a.result.data, "transactions");
			for (uint32_t i = 0; i < txns->via.array.size; i++)
				ck_assert_uint_eq(map_get(&txns->via.array.ptr[i], "id")->via.u64,
				    (uint64_t)(n - page * limit - (int)i));
			ck_assert_uint_eq(txns->via.array.size,
			    (uint32_t)(n - page * limit < limit ? n - page * limit : limit));
			answer_free(&a);
		}
	for (int before = 1; before <= n + 1; before += 7) {
		char bbuf[16];
		struct answer a;
		const msgpack_object *txns;

		snprintf(bbuf, sizeof(bbuf), "#%d", before);
		a = run(M_HISTORY, "wallet", "w", "before_id", bbuf, "limit", "#3", NULL);
		txns = map_get(&a.result.data, "transactions");
		if (before > 1)
			ck_assert_uint_eq(map_get(&txns->via.array.ptr[0], "id")->via.u64, (uint64_t)before - 1);
		else
			ck_assert_uint_eq(txns->via.array.size, 0);
		answer_free(&a);
	}
	{
		struct answer a = run(M_VERIFY, NULL);

		ck_assert(map_get(&a.result.data, "ok")->via.boolean);
		answer_free(&a);
	}
}
END_TEST

START_TEST(bad_params_name_their_field)
{
	struct answer a;

	a = run(M_WALLET_CREATE, "wallet", "bad id", "currency", "USD", NULL);
	assert_field(&a, "field", "wallet");
	answer_free(&a);
	a = run(M_WALLET_CREATE, "wallet", "ok", "currency", "usd", NULL);
	assert_field(&a, "field", "currency");
	answer_free(&a);
	ok(run(M_WALLET_CREATE, "wallet", "ok", "currency", "USD", NULL));
	a = run(M_CREDIT, "wallet", "ok", "amount", "1e3", "reason", "x", NULL);
	assert_field(&a, "field", "amount");
	answer_free(&a);
	a = run(M_CREDIT, "wallet", "ok", "amount", "-1", "reason", "x", NULL);
	assert_field(&a, "field", "amount");
	answer_free(&a);
	ok(run(M_CREDIT, "wallet", "ok", "amount", "9223372036854", "reason", "x", NULL));
	a = run(M_CREDIT, "wallet", "ok", "amount", "1", "reason", "x", NULL);
	ck_assert_int_eq(a.code, E_INVALID_ARGUMENT);
	answer_free(&a);
	a = run(M_DEBIT, "wallet", "nobody", "amount", "1", "reason", "x", NULL);
	ck_assert_int_eq(a.code, E_UNKNOWN_WALLET);
	answer_free(&a);
	a = run(M_CHARGE, "wallet", "ok", "channel", "fax", "to", "1", "ref", "r", NULL);
	assert_field(&a, "field", "channel");
	answer_free(&a);
	a = run(M_CHARGE, "wallet", "ok", "channel", "sms", "to", "+1234567890123456", "ref", "r", NULL);
	assert_field(&a, "field", "to");
	answer_free(&a);
}
END_TEST

START_TEST(verify_is_clean_after_changes)
{
	struct answer a;

	seed_wallet("1");
	ok(run(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "256700000000", "ref", "a", NULL));
	ok(run(M_DEBIT, "wallet", "acme", "amount", "0.5", "reason", "fee", NULL));
	a = run(M_VERIFY, NULL);
	ck_assert(map_get(&a.result.data, "ok")->via.boolean);
	ck_assert_uint_eq(map_get(&a.result.data, "transactions")->via.u64, 3);
	answer_free(&a);
}
END_TEST

/* A transfer whose counterpart was rewritten (the hash chain does not cover
 * it, so only the pairing can tell) is a breach verify names. */
START_TEST(verify_finds_a_transfer_without_its_counterpart)
{
	struct answer a;
	struct txn_head h;
	struct txn t;
	struct txn_text x;
	uint64_t in;
	MDB_txn *txn;
	MDB_val k, v, rec;
	msgpack_sbuffer sb;
	msgpack_packer pk;
	char buf[2048];
	const msgpack_object *breaches;

	seed_wallet("10");
	ok(run(M_WALLET_CREATE, "wallet", "shop", "currency", "USD", "parent", "acme", NULL));
	a = run(M_TRANSFER, "from", "acme", "to", "shop", "amount", "3", "ref", "t1", NULL);
	ck_assert_int_eq(a.code, E_OK);
	in = map_get(map_get(&a.result.data, "transfer_in"), "id")->via.u64;
	answer_free(&a);
	a = run(M_VERIFY, NULL);
	ck_assert(map_get(&a.result.data, "ok")->via.boolean);
	answer_free(&a);

	ck_assert_int_eq(mdb_txn_begin(store.env, NULL, 0, &txn), 0);
	ck_assert_int_eq(txn_fetch(txn, in, &h, &rec), 0);
	ck_assert_int_eq(txn_decode(in, &h, rec.mv_data, rec.mv_size, &t, &x), 0);
	t.refund_of = in; /* names itself, not the transfer_out */
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	txn_pack_stored(&pk, &t);
	ck_assert_uint_le(sizeof(h) + 32 + sb.size, sizeof(buf));
	memcpy(buf, &h, sizeof(h));
	memcpy(buf + sizeof(h), (const char *)rec.mv_data - 32, 32);
	memcpy(buf + sizeof(h) + 32, sb.data, sb.size);
	k = (MDB_val){ sizeof(in), &in };
	v = (MDB_val){ sizeof(h) + 32 + sb.size, buf };
	ck_assert_int_eq(mdb_put(txn, store.txns, &k, &v, 0), 0);
	ck_assert_int_eq(mdb_txn_commit(txn), 0);
	msgpack_sbuffer_destroy(&sb);

	a = run(M_VERIFY, NULL);
	ck_assert(!map_get(&a.result.data, "ok")->via.boolean);
	breaches = map_get(&a.result.data, "breaches");
	ck_assert_uint_eq(breaches->via.array.size, 2); /* the transfer_in, and the transfer_out it no longer names */
	for (uint32_t i = 0; i < 2; i++)
		ck_assert_ptr_nonnull(strstr(map_get(&breaches->via.array.ptr[i], "problem")->via.str.ptr,
		    "a transfer without its counterpart"));
	answer_free(&a);
}
END_TEST

static Suite *
store_suite(void)
{
	Suite *s = suite_create("store");
	TCase *tc = tcase_create("methods");

	tcase_add_checked_fixture(tc, store_setup, store_teardown);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, seed_example_100_sms_cost_0_94);
	tcase_add_test(tc, insufficient_balance_reports_price_currency);
	tcase_add_test(tc, longest_prefix_and_cheapest_route_win);
	tcase_add_test(tc, charge_same_ref_charges_once);
	tcase_add_test(tc, layout_2_refs_are_rekeyed);
	tcase_add_test(tc, stored_records_expand_to_the_map);
	tcase_add_test(tc, layout_3_records_still_read);
	tcase_add_test(tc, newer_layout_is_refused);
	tcase_add_test(tc, refund_is_exact_and_once);
	tcase_add_test(tc, history_pages_newest_first);
	tcase_add_test(tc, history_pages_across_index_blocks);
	tcase_add_test(tc, bad_params_name_their_field);
	tcase_add_test(tc, verify_is_clean_after_changes);
	tcase_add_test(tc, verify_finds_a_transfer_without_its_counterpart);
	suite_add_tcase(s, tc);
	return s;
}

/* ---- charges' refs entries ------------------------------------------------- */

START_TEST(ref_entry_round_trips)
{
	char buf[REF_VALUE_MAX];
	struct ref_entry e = { .id = 77, .fp = { "sms|256712345678|*|1", 20 },
		.fate = { OF_FEE, DS_FAILED, 2, CF_LOTS | CF_PENDING, 5000, 1796000000, 91 },
		.error = { "absent subscriber", 17 }, .record = { "\x01\x00\x02head and record", 19 },
		.lots = { 2, { { 9400, 10000, 1796600000, 3, LOT_PROMO, 0 }, { 600, 50000, LOT_NEVER, 4, LOT_PAID, 0 } } } },
		got;
	MDB_val v;

	ck_assert_int_eq(ref_write(buf, &e, &v), 0);
	ck_assert_uint_lt(v.mv_size, 8 + 20 + 1 + sizeof(e.fate) + 2 + 17 + 19 + 1 + 2 * sizeof(e.lots.d[0]));
	ref_read(v, &got);
	ck_assert_uint_eq(got.id, 77);
	ck_assert(got.fp.n == 20 && memcmp(got.fp.p, e.fp.p, 20) == 0);
	ck_assert_mem_eq(&got.fate, &e.fate, sizeof(e.fate));
	ck_assert(got.error.n == 17 && memcmp(got.error.p, e.error.p, 17) == 0);
	ck_assert(got.record.n == 19 && memcmp(got.record.p, e.record.p, 19) == 0);
	ck_assert_int_eq(got.lots.n, 2);
	ck_assert_mem_eq(got.lots.d, e.lots.d, 2 * sizeof(e.lots.d[0]));
	v.mv_size -= 19 + 5; /* cut inside its second lot: the tail reads as none */
	ref_read(v, &got);
	ck_assert(got.id == 77 && got.fp.n == 20 && got.fate.flags == 0 && got.lots.n == 0 && got.record.n == 0);
	e = (struct ref_entry){ .id = 5, .fp = { "sms|1|*|1", 9 } }; /* a plain charge: no tail */
	ck_assert_int_eq(ref_write(buf, &e, &v), 0);
	ck_assert_uint_eq(v.mv_size, 8 + 9);
}
END_TEST

START_TEST(ref_entry_of_the_first_release_with_lots_still_reads)
{
	char buf[REF_VALUE_MAX];
	struct charge_fate fate = { OF_REFUND, 0, 0, CF_LOTS, 0, 0, 0 };
	struct lot_draw d = { 9400, 10000, 1796600000, 3, LOT_PROMO, 0 };
	uint16_t elen = 0;
	size_t n = 0;
	struct ref_entry got;

	memcpy(buf, &(uint64_t){ 12 }, 8), n += 8;
	memcpy(buf + n, "sms|1|*|1", 10), n += 10; /* with its NUL */
	memcpy(buf + n, &fate, sizeof(fate)), n += sizeof(fate);
	memcpy(buf + n, &elen, 2), n += 2;
	memcpy(buf + n, &d, sizeof(d)), n += sizeof(d);
	buf[n++] = 1;
	ref_read((MDB_val){ n, buf }, &got);
	ck_assert_uint_eq(got.id, 12);
	ck_assert_mem_eq(&got.fate, &fate, sizeof(fate));
	ck_assert(got.lots.n == 1 && got.record.n == 0 && got.error.n == 0);
	ck_assert_mem_eq(&got.lots.d[0], &d, sizeof(d));
}
END_TEST

static Suite *
refs_suite(void)
{
	Suite *s = suite_create("refs");
	TCase *tc = tcase_create("entries");

	tcase_add_test(tc, ref_entry_round_trips);
	tcase_add_test(tc, ref_entry_of_the_first_release_with_lots_still_reads);
	suite_add_tcase(s, tc);
	return s;
}

/* ---- protocol decoder ------------------------------------------------------ */

/* Decodes bytes as one frame on a connection with roles; returns the request. */
static struct req *
decode(const char *bytes, size_t n, unsigned roles)
{
	static struct conn c;
	msgpack_unpacked msg;

	memset(&c, 0, sizeof(c));
	c.roles = roles;
	c.passed_fd = -1;
	srv.dirty = NULL;
	msgpack_unpacked_init(&msg);
	ck_assert_int_eq(msgpack_unpack_next(&msg, bytes, n, NULL), MSGPACK_UNPACK_SUCCESS);
	conn_frame(&c, &msg, n);
	return c.head;
}

START_TEST(decoder_accepts_a_request)
{
	struct req *r = decode("\x94\x00\x07\xa4ping\x90", 9, R_ALL);

	ck_assert_ptr_nonnull(r);
	ck_assert_int_eq(r->method, M_PING);
	ck_assert_uint_eq(r->msgid, 7);
	ck_assert_int_eq(r->state, RQ_WAITING);
	req_free(r);
	r = decode("\x94\x00\x07\xc4\x04ping\x90", 10, R_ALL); /* method as bin */
	ck_assert_int_eq(r->method, M_PING);
	req_free(r);
}
END_TEST

START_TEST(decoder_answers_wrong_frames)
{
	struct req *r;

	r = decode("\x05", 1, R_ALL);
	ck_assert_int_eq(r->code, E_MALFORMED_REQUEST);
	req_free(r);
	r = decode("\x94\x00\x01\xa4nope\x90", 9, R_ALL);
	ck_assert_int_eq(r->code, E_UNKNOWN_METHOD);
	req_free(r);
	r = decode("\x94\x00\x01\xa4ping\x05", 9, R_ALL);
	ck_assert_int_eq(r->code, E_INVALID_ARGUMENT);
	req_free(r);
	r = decode("\x94\x00\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00\xa4ping\x90", 17, R_ALL); /* float msgid */
	ck_assert_int_eq(r->code, E_MALFORMED_REQUEST);
	req_free(r);
	r = decode("\x94\x00\x01\xa6verify\x90", 11, ROLE_CLIENT);
	ck_assert_int_eq(r->code, E_PERMISSION_DENIED);
	req_free(r);
}
END_TEST

START_TEST(decoder_ignores_notifications)
{
	ck_assert_ptr_null(decode("\x93\x02\xa4ping\x90", 8, R_ALL));
}
END_TEST

static Suite *
protocol_suite(void)
{
	Suite *s = suite_create("protocol");
	TCase *tc = tcase_create("decoder");

	tcase_add_test(tc, decoder_accepts_a_request);
	tcase_add_test(tc, decoder_answers_wrong_frames);
	tcase_add_test(tc, decoder_ignores_notifications);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(money_suite());
	int failed;

	srunner_add_suite(sr, segments_suite());
	srunner_add_suite(sr, fx_suite());
	srunner_add_suite(sr, store_suite());
	srunner_add_suite(sr, refs_suite());
	srunner_add_suite(sr, protocol_suite());
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? 0 : 1;
}

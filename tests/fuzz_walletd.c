/*
 * libFuzzer target: bytes from a client, through the frame decoder and the
 * method dispatch, against a real store.  Each input runs in one write
 * transaction that is aborted, so every input meets the same seeded store.
 *   make fuzz FUZZ_SECONDS=600
 */
#define WALLETD_NO_MAIN
#include "../walletd.c"

static int ready;

/* Runs method with string params "k", "v", ..., NULL, committed. */
static void
seed_call(int method, ...)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_unpacked msg;
	const char *kv[16];
	int n = 0;
	struct conn c;
	MDB_txn *txn;
	va_list ap;

	va_start(ap, method);
	while ((kv[n] = va_arg(ap, const char *)) != NULL)
		n++;
	va_end(ap);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 4);
	msgpack_pack_int(&pk, 0);
	msgpack_pack_int(&pk, 1);
	pack_cstr(&pk, method_table[method].name);
	msgpack_pack_array(&pk, 1);
	msgpack_pack_map(&pk, (size_t)n / 2);
	for (int i = 0; i < n; i++)
		pack_cstr(&pk, kv[i]);
	memset(&c, 0, sizeof(c));
	c.roles = ROLE_ADMIN;
	c.passed_fd = -1;
	msgpack_unpacked_init(&msg);
	if (msgpack_unpack_next(&msg, sb.data, sb.size, NULL) == MSGPACK_UNPACK_SUCCESS)
		conn_frame(&c, &msg, sb.size);
	msgpack_unpacked_destroy(&msg);
	if (c.head && c.head->method >= 0 && mdb_txn_begin(store.env, NULL, 0, &txn) == 0) {
		req_execute(c.head, txn, 0);
		mdb_txn_commit(txn);
	}
	while (c.head) {
		struct req *r = c.head;

		c.head = r->next;
		req_free(r);
	}
	msgpack_sbuffer_destroy(&sb); /* the strings of the request point into it */
}

/* A store with a wallet, a rate and an FX rate, so charges get far. */
static void
fuzz_init(void)
{
	static char dir[] = "/tmp/walletd-fuzz-XXXXXX";

	config_defaults(&config);
	config.log_level = 0;
	if (mkdtemp(dir) == NULL || store_open(dir) != 0)
		abort();
	seed_call(M_WALLET_CREATE, "wallet", "acme", "currency", "USD", NULL);
	seed_call(M_CREDIT, "wallet", "acme", "amount", "1500", "reason", "seed", NULL);
	seed_call(M_RATE_SET, "plan", "default", "channel", "sms", "prefix", "256", "price", "35",
	    "currency", "UGX", NULL);
	seed_call(M_FX_SET, "base", "USD", "quote", "UGX", "rate", "3723.40", NULL);
	seed_call(M_CHARGE, "wallet", "acme", "channel", "sms", "to", "+256712345678", "ref", "m1", NULL);
	ready = 1;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct conn c;
	msgpack_unpacked msg;
	MDB_txn *parent;

	if (!ready)
		fuzz_init();
	memset(&c, 0, sizeof(c));
	c.roles = size > 0 && (data[0] & 1) ? ROLE_CLIENT : ROLE_ADMIN;
	c.passed_fd = -1;
	srv.dirty = NULL;
	if (!msgpack_unpacker_init(&c.up, 4096))
		return 0;
	if (!msgpack_unpacker_reserve_buffer(&c.up, size))
		goto out;
	memcpy(msgpack_unpacker_buffer(&c.up), data, size);
	msgpack_unpacker_buffer_consumed(&c.up, size);
	msgpack_unpacked_init(&msg);
	for (int frames = 0; frames < 64; frames++) {
		size_t bytes = 0;

		if (msgpack_unpacker_next_with_size(&c.up, &msg, &bytes) != MSGPACK_UNPACK_SUCCESS)
			break;
		conn_frame(&c, &msg, bytes);
	}
	msgpack_unpacked_destroy(&msg);
	if (mdb_txn_begin(store.env, NULL, 0, &parent) != 0)
		goto out;
	for (struct req *r = c.head; r; r = r->next) {
		MDB_txn *child;
		unsigned flags;

		if (r->state == RQ_DONE || r->method < 0)
			continue;
		flags = method_table[r->method].flags;
		if (r->method == M_BACKUP || r->method == M_STATS)
			continue; /* a descriptor; process-wide counters */
		if ((flags & MF_SLOW) && r->method != M_VERIFY)
			continue;
		if (mdb_txn_begin(store.env, parent, 0, &child) != 0)
			break;
		/* a read first with a budget of 3 records, as on the loop, then
		 * again without one, as on a helper: both paths run */
		req_execute(r, child, flags & MF_WRITE ? 0 : 3);
		if (r->code == E_OFF_LOOP)
			req_execute(r, child, 0);
		if (r->code == E_OK)
			mdb_txn_commit(child);
		else
			mdb_txn_abort(child);
	}
	mdb_txn_abort(parent);
out:
	while (c.head) {
		struct req *r = c.head;

		c.head = r->next;
		req_free(r);
	}
	msgpack_unpacker_destroy(&c.up);
	return 0;
}

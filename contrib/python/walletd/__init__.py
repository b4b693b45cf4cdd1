"""Python client for walletd, the prepaid wallet daemon.

    from walletd import Client, InsufficientBalance
    with Client() as w:                       # $WALLETD_SOCKET, ./var/walletd.sock, /run/walletd/walletd.sock
        w.charge(wallet="acme", channel="sms", to="+256712345678", ref="msg-1", text="hi")
        print(w.balance(wallet="acme"))       # {'balance': Decimal('1499.9906'), 'currency': 'USD'}

Amounts go in as decimal.Decimal (or str / int) and come back as Decimal.
Every error code is an exception class under WalletdError.
Needs only Debian's python3-msgpack (verify_statement: python3-cryptography).
"""
import array
import decimal
import os
import socket as _socket
import stat
import tempfile

import msgpack

__all__ = ["Client", "WalletdError", "ConnectionLost", "verify_statement", "StatementError"]

# Keys whose values are amounts (decimal strings on the wire).
AMOUNT_KEYS = frozenset("""balance amount balance_after price threshold required available
    subtotal unit_price unit_cost cost credited paid_amount held remaining credit_limit
    daily_limit missing failure_fee""".split())


class WalletdError(Exception):
    """An error answer from walletd: .code, .message, and the details (e.g. .field)."""
    code = None

    def __init__(self, message, details=None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        for k, v in self.details.items():
            if k not in ("code", "message"):
                setattr(self, k, v)


class ConnectionLost(WalletdError, ConnectionError):
    """walletd cannot be reached, or the connection broke before an answer."""
    code = "connection_lost"


ERROR_CODES = """malformed_request frame_too_large unknown_method invalid_argument
    permission_denied unknown_wallet wallet_exists wallet_frozen insufficient_balance
    no_rate no_fx_rate idempotency_conflict already_refunded not_refundable unknown_txn
    unknown_topup storage_full too_many_connections busy internal unknown_hold hold_closed
    limit_exceeded destination_blocked unavailable destination_suspended""".split()

_ERRORS = {}
for _code in ERROR_CODES:
    _name = "".join(p.capitalize() for p in _code.split("_"))
    _cls = type(_name, (WalletdError,), {"code": _code, "__doc__": "walletd error %s" % _code})
    _ERRORS[_code] = _cls
    globals()[_name] = _cls
    __all__.append(_name)


def error_class(code):
    """The exception class of an error code (WalletdError for an unknown one)."""
    return _ERRORS.get(code, WalletdError)


def _to_wire(value):
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError("amount must be finite")
        text = format(value, "f")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text
    if isinstance(value, float):
        raise TypeError("pass amounts as decimal.Decimal or str, never float")
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    return value


def _from_wire(value, key=None):
    if isinstance(value, dict):
        return {k: _from_wire(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_wire(v) for v in value]
    if key in AMOUNT_KEYS and isinstance(value, str):
        return decimal.Decimal(value)
    return value


def default_socket():
    """-s is the caller's; else $WALLETD_SOCKET, ./var/walletd.sock, the installed default."""
    env = os.environ.get("WALLETD_SOCKET")
    if env:
        return env
    try:
        if stat.S_ISSOCK(os.stat("var/walletd.sock").st_mode):
            return "var/walletd.sock"
    except OSError:
        pass
    return "/run/walletd/walletd.sock"


# Python method name -> wire method name.
METHODS = {
    "ping": "ping", "wallet_create": "wallet.create", "wallet_get": "wallet.get",
    "balance": "balance", "wallet_update": "wallet.update", "wallet_list": "wallet.list",
    "rate_set": "rate.set", "rate_delete": "rate.delete", "rate_list": "rate.list",
    "rate_lookup": "rate.lookup", "rate_import": "rate.import", "fx_set": "fx.set",
    "fx_list": "fx.list", "charge": "charge", "charge_batch": "charge.batch",
    "precheck": "precheck", "quote": "quote", "topup_create": "topup.create",
    "topup_confirm": "topup.confirm", "topup_cancel": "topup.cancel", "topup_get": "topup.get",
    "topup_list": "topup.list", "credit": "credit", "debit": "debit", "transfer": "transfer", "refund": "refund",
    "refund_batch": "refund.batch", "delivery": "delivery", "delivery_batch": "delivery.batch",
    "guard_list": "guard.list", "guard_lift": "guard.lift",
    "hold_create": "hold.create", "hold_release": "hold.release",
    "hold_get": "hold.get", "hold_list": "hold.list",
    "history": "history", "statement": "statement", "export": "export", "report_usage": "report.usage", "notifications": "notifications", "verify": "verify",
    "stats": "stats", "status": "status", "replication_repair": "replication.repair",
}


class Client:
    """One connection to walletd.  Not thread-safe: use one Client per thread."""

    def __init__(self, socket=None, timeout=30.0):
        self.path = socket or default_socket()
        self.timeout = timeout
        self._sock = None
        self._unpacker = None
        self._msgid = 0

    # -- connection ---------------------------------------------------------
    def connect(self):
        if self._sock is None:
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except OSError as e:
                s.close()
                raise ConnectionLost("cannot connect to walletd at %s: %s" % (self.path, e)) from None
            self._sock = s
            self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        return self

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    # -- calls --------------------------------------------------------------
    def _request(self, method, params):
        self._msgid = (self._msgid + 1) & 0xFFFFFFFF
        params = {k[:-1] if k.endswith("_") else k: v for k, v in params.items()}  # transfer(from_=...)
        body = [0, self._msgid, method, [_to_wire(params)] if params else []]
        return self._msgid, msgpack.packb(body, use_bin_type=True)

    def _send(self, data, fds=None):
        try:
            if fds:
                sent = self._sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))])
                data = data[sent:]
            self._sock.sendall(data)
        except OSError as e:
            refusal = self._refusal()
            self.close()
            if refusal is not None:
                raise refusal from None
            raise ConnectionLost("connection to walletd lost: %s" % e) from None

    def _refusal(self):
        """The error walletd answered before it closed (too_many_connections), if any."""
        try:
            self._sock.setblocking(False)
            self._unpacker.feed(self._sock.recv(1 << 16))
            for msg in self._unpacker:
                self._result(msg)
        except WalletdError as e:
            return e
        except OSError:
            pass
        return None

    def _receive(self):
        while True:
            for msg in self._unpacker:
                return msg
            try:
                chunk = self._sock.recv(1 << 16)
            except OSError as e:
                self.close()
                raise ConnectionLost("connection to walletd lost: %s" % e) from None
            if not chunk:
                self.close()
                raise ConnectionLost("walletd closed the connection")
            self._unpacker.feed(chunk)

    @staticmethod
    def _result(msg):
        if not isinstance(msg, list) or len(msg) != 4 or msg[0] != 1:
            raise WalletdError("not a msgpack-rpc response: %r" % (msg,))
        if msg[2] is not None:
            err = msg[2]
            raise error_class(err.get("code"))(err.get("message", ""), _from_wire(err))
        return _from_wire(msg[3])

    def call(self, method, _fds=None, **params):
        """Calls a method by its wire name; returns the result or raises its error."""
        self.connect()
        msgid, data = self._request(method, params)
        self._send(data, _fds)
        while True:
            msg = self._receive()
            if isinstance(msg, list) and len(msg) == 4 and msg[1] in (msgid, None):
                return self._result(msg)

    def pipeline(self, calls):
        """Sends every (method, params) at once, then reads the answers, matched by msgid.
        Returns results in order; an error answer is returned as its exception object."""
        self.connect()
        ids, frames = [], []
        for method, params in calls:
            msgid, data = self._request(method, params or {})
            ids.append(msgid)
            frames.append(data)
        self._send(b"".join(frames))
        answers = {}
        while len(answers) < len(ids):
            msg = self._receive()
            answers[msg[1]] = msg
        out = []
        for msgid in ids:
            try:
                out.append(self._result(answers[msgid]))
            except WalletdError as e:
                out.append(e)
        return out

    def backup(self, path):
        """Writes a consistent, compacted copy of the store into path.

        walletd writes a new file beside path, which takes path's name only
        once walletd answered ok (as walletctl backup does): a failed backup
        leaves no partial file behind and keeps the last good one."""
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.exists(os.path.join(folder, "walletd.lock")):
            # the copy would replace the store's own data.mdb: what walletd commits after it is lost
            raise ValueError("%s is in a walletd store's directory; back up elsewhere" % path)
        fd, partial = tempfile.mkstemp(prefix=os.path.basename(path) + ".partial-", dir=folder)
        try:
            result = self.call("backup", _fds=[fd])
            os.rename(partial, path)
            partial = None
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return result
        finally:
            os.close(fd)
            if partial:
                os.unlink(partial)


def _make(wire):
    def method(self, **params):
        return self.call(wire, **params)
    method.__name__ = wire.replace(".", "_")
    method.__doc__ = "walletd method %s; keyword arguments are its params." % wire
    return method


for _py, _wire in METHODS.items():
    setattr(Client, _py, _make(_wire))


# What a transaction's hash covers, in this order (README: The ledger's hash chain),
# and the statement CSV's names for the two columns the export CSV names otherwise.
CHAIN_FIELDS = ("id", "wallet", "created_at", "type", "amount", "balance_after", "currency", "description")
_STATEMENT_COLUMNS = {"created_at": "date", "balance_after": "balance"}
_HEAD_FIELDS = ("wallet", "id", "hash", "at", "signature", "before")


class StatementError(ValueError):
    """A statement or export CSV that does not verify; .row is its spreadsheet row (the header is 1), or None."""

    def __init__(self, message, row=None):
        super().__init__(message)
        self.row = row


def _netstrings(values):
    return b"".join(b"%d:%s," % (len(v), v) for v in (s.encode() for s in values))


def verify_statement(path, key):
    """Checks a CSV that `walletctl statement --csv` or `walletctl export --csv` wrote, offline:
    recomputes each wallet's hash chain row by row from its signed head's `before`, and checks
    that the chain ends at the head and that the head is signed by key (hex, as ping answers
    ledger_key).  Returns how many transactions verified; raises StatementError naming the
    first row that does not.  Needs python3-cryptography."""
    import csv
    import hashlib
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    heads = {r[1]: dict(zip(_HEAD_FIELDS, r[1:])) for r in rows if len(r) == 7 and r[0] == "#head"}
    header = rows[0] if rows else []
    col = {name: header.index(alias) for name in CHAIN_FIELDS + ("hash",)
           for alias in (name, _STATEMENT_COLUMNS.get(name)) if alias in header}
    if "hash" not in col or not heads or ("wallet" not in col and len(heads) != 1):
        raise StatementError("%s: no hash column or no signed head: not a CSV this walletd wrote" % path)
    last = {w: bytes.fromhex(h["before"]) for w, h in heads.items()}
    last_id, count = {}, 0
    for n, r in enumerate(rows[1:], start=2):
        if not r or r[0].startswith("#") or len(r) <= col["hash"] or r[col["id"]] == "":
            continue  # a head, a blank line, an opening or closing balance
        values = [next(iter(heads)) if f not in col else r[col[f]] for f in CHAIN_FIELDS]
        values = [v[1:] if v.startswith("'") else v for v in values]  # the ' before text a spreadsheet would run
        txn, wallet = values[0], values[1]
        if wallet not in heads:
            raise StatementError("row %d (transaction %s): wallet %s has no signed head in the file"
                                 % (n, txn, wallet), n)
        digest = hashlib.sha256(last[wallet] + _netstrings(values)).digest()
        if digest.hex() != r[col["hash"]]:
            raise StatementError("row %d (transaction %s of %s) does not verify: it, or a row of its wallet "
                                 "before it, was changed, removed or moved" % (n, txn, wallet), n)
        last[wallet], last_id[wallet] = digest, txn
        count += 1
    for wallet, h in sorted(heads.items()):
        if last[wallet].hex() != h["hash"] or last_id.get(wallet, h["id"]) != h["id"]:
            raise StatementError("the rows of wallet %s do not end at its signed head (transaction %s): a row was "
                                 "removed, added or changed after the last one that verified" % (wallet, h["id"]))
        try:
            public.verify(bytes.fromhex(h["signature"]), _netstrings([wallet, h["id"], h["hash"], h["at"]]))
        except (InvalidSignature, ValueError):
            raise StatementError("the head of wallet %s (transaction %s) is not signed by this key"
                                 % (wallet, h["id"])) from None
    return count

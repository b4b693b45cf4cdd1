// Node.js client for walletd, the prepaid wallet daemon.
//
//   import { Client, InsufficientBalance } from 'walletd-client';
//   const w = new Client();                       // $WALLETD_SOCKET, ./var/walletd.sock, /run/walletd/walletd.sock
//   const t = await w.charge({ wallet: 'acme', channel: 'sms', to: '+256712345678', ref: 'msg-1', text: 'hi' });
//   console.log(t.balance_after);                  // amounts are decimal strings: "1499.9906"
//   w.close();
//
// Every call returns a promise; calls may be issued without waiting (they are
// pipelined on one connection and matched by msgid).  Errors reject with a
// subclass of WalletdError, one per error code.
import fs from 'node:fs';
import net from 'node:net';
import { encode, decodeMultiStream } from '@msgpack/msgpack';

export class WalletdError extends Error {
  constructor(message, details = {}) {
    super(message);
    this.name = this.constructor.name;
    this.code = details.code ?? this.constructor.code;
    Object.assign(this, details);
    this.message = message;
  }
}

const errorClass = (code) => {
  const name = code.split('_').map((p) => p[0].toUpperCase() + p.slice(1)).join('');
  const cls = { [name]: class extends WalletdError {} }[name];
  cls.code = code;
  return cls;
};

export const ConnectionLost = errorClass('connection_lost');
export const MalformedRequest = errorClass('malformed_request');
export const FrameTooLarge = errorClass('frame_too_large');
export const UnknownMethod = errorClass('unknown_method');
export const InvalidArgument = errorClass('invalid_argument');
export const PermissionDenied = errorClass('permission_denied');
export const UnknownWallet = errorClass('unknown_wallet');
export const WalletExists = errorClass('wallet_exists');
export const WalletFrozen = errorClass('wallet_frozen');
export const InsufficientBalance = errorClass('insufficient_balance');
export const NoRate = errorClass('no_rate');
export const NoFxRate = errorClass('no_fx_rate');
export const IdempotencyConflict = errorClass('idempotency_conflict');
export const AlreadyRefunded = errorClass('already_refunded');
export const NotRefundable = errorClass('not_refundable');
export const UnknownTxn = errorClass('unknown_txn');
export const UnknownTopup = errorClass('unknown_topup');
export const StorageFull = errorClass('storage_full');
export const TooManyConnections = errorClass('too_many_connections');
export const Busy = errorClass('busy');
export const Internal = errorClass('internal');
export const UnknownHold = errorClass('unknown_hold');
export const HoldClosed = errorClass('hold_closed');
export const LimitExceeded = errorClass('limit_exceeded');
export const DestinationBlocked = errorClass('destination_blocked');
export const Unavailable = errorClass('unavailable');
export const DestinationSuspended = errorClass('destination_suspended');

const ERRORS = Object.fromEntries([
  MalformedRequest, FrameTooLarge, UnknownMethod, InvalidArgument, PermissionDenied, UnknownWallet,
  WalletExists, WalletFrozen, InsufficientBalance, NoRate, NoFxRate, IdempotencyConflict,
  AlreadyRefunded, NotRefundable, UnknownTxn, UnknownTopup, StorageFull, TooManyConnections, Busy,
  Internal, UnknownHold, HoldClosed, LimitExceeded, DestinationBlocked, Unavailable, DestinationSuspended,
].map((c) => [c.code, c]));

export function defaultSocket() {
  if (process.env.WALLETD_SOCKET) return process.env.WALLETD_SOCKET;
  try {
    if (fs.statSync('var/walletd.sock').isSocket()) return 'var/walletd.sock';
  } catch { /* not there */ }
  return '/run/walletd/walletd.sock';
}

// JavaScript method name -> wire method name.
const METHODS = {
  ping: 'ping', walletCreate: 'wallet.create', walletGet: 'wallet.get', balance: 'balance',
  walletUpdate: 'wallet.update', walletList: 'wallet.list', rateSet: 'rate.set',
  rateDelete: 'rate.delete', rateList: 'rate.list', rateLookup: 'rate.lookup',
  rateImport: 'rate.import', fxSet: 'fx.set', fxList: 'fx.list', charge: 'charge',
  chargeBatch: 'charge.batch', precheck: 'precheck', quote: 'quote', holdCreate: 'hold.create',
  holdRelease: 'hold.release', holdGet: 'hold.get', holdList: 'hold.list', topupCreate: 'topup.create',
  topupConfirm: 'topup.confirm', topupCancel: 'topup.cancel', topupGet: 'topup.get',
  topupList: 'topup.list', credit: 'credit', debit: 'debit', transfer: 'transfer', refund: 'refund',
  refundBatch: 'refund.batch', delivery: 'delivery', deliveryBatch: 'delivery.batch',
  guardList: 'guard.list', guardLift: 'guard.lift', history: 'history', statement: 'statement', export: 'export', reportUsage: 'report.usage',
  notifications: 'notifications', verify: 'verify', stats: 'stats', status: 'status',
  replicationRepair: 'replication.repair',
};

export class Client {
  // new Client(), new Client('/run/walletd/walletd.sock') (as net.createConnection
  // takes a path) or new Client({socket}); anything else is a TypeError, never a
  // silent fall-back to the default socket.
  constructor(options = {}) {
    const socket = typeof options === 'string' ? options : options?.socket;
    const known = typeof options === 'string' ||
      (options !== null && typeof options === 'object' && !Array.isArray(options) &&
       Object.keys(options).every((k) => k === 'socket'));
    if (!known || (socket !== undefined && (typeof socket !== 'string' || socket === ''))) {
      throw new TypeError('new Client() takes a socket path or {socket: path}');
    }
    this.path = socket ?? defaultSocket();
    this.sock = null;
    this.connecting = null;
    this.pending = new Map();
    this.msgid = 0;
  }

  // Connects if not connected (again after walletd restarted).
  connect() {
    if (this.sock) return Promise.resolve(this);
    if (this.connecting) return this.connecting;
    this.connecting = new Promise((resolve, reject) => {
      const sock = net.createConnection(this.path);
      sock.once('error', (e) => {
        this.connecting = null;
        reject(new ConnectionLost(`cannot connect to walletd at ${this.path}: ${e.message}`));
      });
      sock.once('connect', () => {
        this.connecting = null;
        this.sock = sock;
        sock.removeAllListeners('error');
        sock.on('error', () => {});
        this.#read(sock);
        resolve(this);
      });
    });
    return this.connecting;
  }

  async #read(sock) {
    try {
      for await (const msg of decodeMultiStream(sock)) {
        if (!Array.isArray(msg) || msg[0] !== 1) continue;
        const [, id, err, result] = msg;
        if (id == null && err != null) {
          // about the connection, not one request (too_many_connections), then walletd closes it
          const e = new (ERRORS[err.code] ?? WalletdError)(err.message, err);
          for (const [, p] of this.pending) p.reject(e);
          this.pending.clear();
          continue;
        }
        const p = this.pending.get(id);
        if (!p) continue;
        this.pending.delete(id);
        if (err != null) {
          const Cls = ERRORS[err.code] ?? WalletdError;
          p.reject(new Cls(err.message, err));
        } else {
          p.resolve(result);
        }
      }
    } catch { /* the connection broke */ }
    if (this.sock === sock) this.sock = null;
    sock.destroy();
    for (const [, p] of this.pending) p.reject(new ConnectionLost('connection to walletd lost'));
    this.pending.clear();
  }

  // Calls a method by its wire name with a params object.
  async call(method, params) {
    await this.connect();
    this.msgid = (this.msgid + 1) >>> 0;
    const id = this.msgid;
    const frame = encode([0, id, method, params && Object.keys(params).length ? [params] : []]);
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.sock.write(frame);
    });
  }

  close() {
    if (this.sock) this.sock.end();
    this.sock = null;
  }
}

for (const [js, wire] of Object.entries(METHODS)) {
  Client.prototype[js] = function (params) { return this.call(wire, params); };
}

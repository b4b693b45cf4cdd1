// Tests of the Node.js client against a real walletd it starts itself
// (WALLETD: the daemon binary).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  Client, WalletdError, InsufficientBalance, UnknownWallet, IdempotencyConflict, AlreadyRefunded,
  InvalidArgument, WalletExists, NoRate, ConnectionLost, UnknownTopup, TooManyConnections, DestinationSuspended,
} from '../index.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'walletd-node-'));
const socket = path.join(dir, 'walletd.sock');
let daemon;

async function start() {
  const log = fs.openSync(path.join(dir, 'walletd.log'), 'a');
  daemon = spawn(process.env.WALLETD, ['-f', '-d', path.join(dir, 'db'), '-s', socket], { stdio: ['ignore', 'ignore', log] });
  for (let i = 0; i < 200; i++) {
    try { const c = new Client({ socket }); await c.ping(); c.close(); return; } catch { await new Promise((r) => setTimeout(r, 50)); }
  }
  throw new Error('walletd did not start');
}

async function stop(signal = 'SIGTERM') {
  const done = new Promise((r) => daemon.once('exit', r));
  daemon.kill(signal);
  await done;
}

before(start);
after(async () => {
  await stop();
  const log = fs.readFileSync(path.join(dir, 'walletd.log'), 'utf8');
  fs.rmSync(dir, { recursive: true, force: true });
  assert.doesNotMatch(log, /Sanitizer|runtime error/, log);
});

test('every method, amounts as strings', async () => {
  const w = new Client({ socket });
  assert.equal((await w.ping()).api, 1);
  const wallet = await w.walletCreate({ wallet: 'acme', currency: 'USD', threshold: '5', alert_emails: ['ops@acme.example'] });
  assert.equal(wallet.balance, '0');
  await assert.rejects(w.walletCreate({ wallet: 'acme', currency: 'USD' }), WalletExists);
  assert.equal((await w.credit({ wallet: 'acme', amount: '1500', reason: 'opening', actor: 'node' })).balance_after, '1500');
  assert.equal((await w.debit({ wallet: 'acme', amount: '0.5', reason: 'fee' })).amount, '-0.5');
  await w.rateSet({ plan: 'default', channel: 'sms', prefix: '256', price: '35', currency: 'UGX', route: 'ESMS_UG' });
  assert.equal((await w.rateImport({ rows: [{ plan: 'p2', channel: 'sms', prefix: '1', route: '', price: '0.01', currency: 'USD' }] })).loaded, 1);
  assert.equal((await w.rateList({ plan: 'p2' })).total, 1);
  await w.fxSet({ base: 'USD', quote: 'UGX', rate: '3723.40' });
  assert.equal((await w.fxList()).rates.length, 1);
  assert.equal((await w.rateLookup({ wallet: 'acme', channel: 'sms', to: '+256712345678' })).cost, '0.0094');
  const t = await w.charge({ wallet: 'acme', channel: 'sms', to: '+256712345678', ref: 'n-1', text: 'hi' });
  assert.equal(t.amount, '-0.0094');
  assert.equal(t.replayed, false);
  assert.equal((await w.charge({ wallet: 'acme', channel: 'sms', to: '+256712345678', ref: 'n-1', text: 'hi' })).replayed, true);
  await assert.rejects(w.charge({ wallet: 'acme', channel: 'sms', to: '+256712345678', ref: 'n-1', segments: 2 }), IdempotencyConflict);
  const batch = await w.chargeBatch({ items: [{ wallet: 'acme', channel: 'sms', to: '+256712345678', ref: 'b1' }, { wallet: 'nobody', channel: 'sms', to: '1', ref: 'b2' }] });
  assert.equal(batch.results[1].error.code, 'unknown_wallet');
  const p = await w.precheck({ wallet: 'acme', channel: 'sms', recipients: ['+256712345678', { to: '+256700000000', count: 9 }] });
  assert.equal(p.required, '0.094');
  assert.equal((await w.quote({ wallet: 'acme', channel: 'sms', to: '+256712345678', amount: '1' })).messages, 106);
  const r = await w.refund({ wallet: 'acme', ref: 'n-1', reason: 'DLR failed' });
  await assert.rejects(w.refund({ wallet: 'acme', ref: 'n-1' }), (e) => e instanceof AlreadyRefunded && e.refund.id === r.id);
  const top = await w.topupCreate({ wallet: 'acme', amount: '10' });
  assert.equal(top.status, 'pending');
  assert.equal((await w.topupConfirm({ ref: top.ref, amount: '10', provider: 'paystack', provider_ref: 'x' })).replayed, false);
  assert.equal((await w.topupGet({ ref: top.ref })).status, 'paid');
  assert.equal((await w.topupList({ wallet: 'acme' })).topups.length, 1);
  const other = await w.topupCreate({ wallet: 'acme', amount: '1' });
  assert.equal((await w.topupCancel({ ref: other.ref })).status, 'cancelled');
  await assert.rejects(w.topupGet({ ref: 'tp_nope' }), UnknownTopup);
  assert.ok((await w.history({ wallet: 'acme', limit: 5 })).total >= 6);
  assert.equal((await w.walletGet({ wallet: 'acme' })).currency, 'USD');
  assert.equal((await w.walletUpdate({ wallet: 'acme', threshold: null })).threshold, null);
  assert.equal((await w.walletList()).total, 1);
  assert.ok(Array.isArray((await w.notifications({ wallet: 'acme' })).notifications));
  const hold = await w.holdCreate({ wallet: 'acme', ref: 'node-hold', amount: '1' });
  assert.equal(hold.remaining, '1');
  assert.equal((await w.charge({ wallet: 'acme', channel: 'sms', to: '+256712345678', ref: 'n-h', hold: 'node-hold' })).hold, 'node-hold');
  assert.equal((await w.holdGet({ wallet: 'acme', hold: 'node-hold' })).remaining, '0.9906');
  assert.equal((await w.holdList({ wallet: 'acme', status: 'active' })).holds.length, 1);
  assert.equal((await w.holdRelease({ wallet: 'acme', hold: 'node-hold' })).status, 'released');
  const part = await w.refund({ wallet: 'acme', ref: 'n-h', amount: '0.0047', refund_ref: 'n-h-1' });
  assert.equal(part.amount, '0.0047');
  assert.equal((await w.refundBatch({ items: [{ wallet: 'acme', ref: 'n-h' }] })).results[0].amount, '0.0047');
  assert.equal((await w.delivery({ wallet: 'acme', ref: 'n-h', status: 'delivered' })).delivery.status, 'delivered');
  assert.equal((await w.deliveryBatch({ items: [{ wallet: 'acme', ref: 'n-h', status: 'delivered' }] })).results[0].replayed, true);
  await w.walletUpdate({ wallet: 'acme', guard_range_max: 1 });
  await w.charge({ wallet: 'acme', channel: 'sms', to: '+256700000001', ref: 'n-g1' });
  await assert.rejects(w.charge({ wallet: 'acme', channel: 'sms', to: '+256700000002', ref: 'n-g2' }),
    (e) => e instanceof DestinationSuspended && e.prefix === '256700000' && e.reason === 'range_max');
  assert.equal((await w.guardList({ wallet: 'acme' })).suspensions[0].prefix, '256700000');
  assert.equal((await w.guardLift({ wallet: 'acme', prefix: '256700000' })).lifted, true);
  await w.walletUpdate({ wallet: 'acme', guard_range_max: null });
  assert.equal((await w.verify()).ok, true);
  assert.ok((await w.stats()).commits > 0);
  await w.rateDelete({ plan: 'p2', channel: 'sms', prefix: '1' });
  w.close();
});

test('error classes carry their details', async () => {
  const w = new Client({ socket });
  await w.walletCreate({ wallet: 'ug', currency: 'UGX' });
  await w.credit({ wallet: 'ug', amount: '10', reason: 'r' });
  await assert.rejects(w.charge({ wallet: 'ug', channel: 'sms', to: '+256712345678', ref: 'x' }), (e) => {
    assert.ok(e instanceof InsufficientBalance && e instanceof WalletdError);
    assert.deepEqual([e.required, e.available, e.currency], ['35', '10', 'UGX']);
    assert.equal(e.message, 'Insufficient balance. Required: 35 UGX, available: 10 UGX');
    return true;
  });
  await assert.rejects(w.balance({ wallet: 'ghost' }), UnknownWallet);
  await assert.rejects(w.charge({ wallet: 'ug', channel: 'sms', to: '+1', ref: 'x' }), NoRate);
  await assert.rejects(w.credit({ wallet: 'ug', amount: 1.5, reason: 'float' }), (e) => e instanceof InvalidArgument && e.field === 'amount');
  w.close();
});

test('1,000 pipelined requests on one connection', async () => {
  const w = new Client({ socket });
  await w.walletCreate({ wallet: 'pipe', currency: 'USD' });
  await w.credit({ wallet: 'pipe', amount: '100', reason: 'r' });
  const calls = [];
  for (let i = 0; i < 1000; i++) calls.push(w.charge({ wallet: 'pipe', channel: 'sms', to: '+256712345678', ref: `p${i}` }));
  const res = await Promise.all(calls);
  assert.equal(new Set(res.map((t) => t.id)).size, 1000);
  assert.equal((await w.balance({ wallet: 'pipe' })).balance, '90.6');
  w.close();
});

test('reconnects after a daemon restart', async () => {
  const w = new Client({ socket });
  await w.ping();
  await stop('SIGKILL');
  await assert.rejects(w.ping(), ConnectionLost);
  await start();
  assert.equal((await w.balance({ wallet: 'pipe' })).balance, '90.6');
  w.close();
});

test('a refused connection says why', async () => {
  // walletd keeps a refused connection open a moment (conn_linger): closed at once, the
  // request crossed the close, Node got EPIPE and never read the refusal
  const sock2 = path.join(dir, 'full.sock');
  const conf = path.join(dir, 'full.conf');
  fs.writeFileSync(conf, `max_connections = 1\nstore = ${path.join(dir, 'db2')}\nsocket = ${sock2}\n`);
  const log = fs.openSync(path.join(dir, 'walletd.log'), 'a');
  const full = spawn(process.env.WALLETD, ['-f', '-c', conf], { stdio: ['ignore', 'ignore', log] });
  const held = new Client({ socket: sock2 });
  for (let i = 0; i < 200; i++) {
    try { await held.ping(); break; } catch { await new Promise((r) => setTimeout(r, 50)); }
  }
  for (let i = 0; i < 10; i++) {
    const c = new Client({ socket: sock2 });
    await assert.rejects(c.ping(), TooManyConnections);
    c.close();
  }
  assert.equal((await held.ping()).api, 1);
  held.close();
  const done = new Promise((r) => full.once('exit', r));
  full.kill('SIGTERM');
  assert.equal(await done, 0);
});

test('new Client takes a socket path or {socket}; anything else is a TypeError', async () => {
  const byPath = new Client(socket);
  assert.equal((await byPath.ping()).api, 1);
  byPath.close();
  const byOption = new Client({ socket });
  assert.equal((await byOption.ping()).api, 1);
  byOption.close();
  for (const wrong of [42, null, ['x'], { sock: socket }, { socket: 7 }, { socket: '' }, '']) {
    assert.throws(() => new Client(wrong), TypeError, String(wrong));
  }
  await assert.rejects(new Client(path.join(dir, 'nope.sock')).ping(), ConnectionLost);
});

<?php
/*
 * The PHP client against a real walletd:  php client_test.php SOCKET
 * Prints one line per check and exits 1 on the first that fails.
 */
require __DIR__ . '/../Walletd.php';

use Walletd\Client;

$socket = $argv[1];
$checks = 0;

function check(string $what, $got, $want): void
{
    global $checks;
    if ($got !== $want) {
        fwrite(STDERR, "FAIL $what: got " . var_export($got, true) . ', want ' . var_export($want, true) . "\n");
        exit(1);
    }
    $checks++;
}

function raises(string $what, string $class, callable $f): Walletd\WalletdError
{
    try {
        $f();
    } catch (Walletd\WalletdError $e) {
        check("$what raises", get_class($e), $class);
        return $e;
    }
    check("$what raises", 'nothing', $class);
}

$w = new Client($socket);
check('ping', $w->ping()['api'], 1);
check('create', $w->walletCreate(['wallet' => 'acme', 'currency' => 'USD', 'threshold' => '5'])['threshold'], '5');
check('credit', $w->credit(['wallet' => 'acme', 'amount' => '1500', 'reason' => 'opening', 'actor' => 'php'])['balance_after'], '1500');
$w->rateSet(['plan' => 'default', 'channel' => 'sms', 'prefix' => '256', 'price' => '35', 'currency' => 'UGX', 'route' => 'ESMS_UG']);
$w->fxSet(['base' => 'USD', 'quote' => 'UGX', 'rate' => '3723.40']);
$t = $w->charge(['wallet' => 'acme', 'channel' => 'sms', 'to' => '+256712345678', 'ref' => 'php-1', 'text' => 'hi']);
check('charge amount', $t['amount'], '-0.0094');
check('charge replayed', $t['replayed'], false);
check('replay', $w->charge(['wallet' => 'acme', 'channel' => 'sms', 'to' => '+256712345678', 'ref' => 'php-1', 'text' => 'hi'])['id'], $t['id']);
$b = $w->chargeBatch(['items' => [
    ['wallet' => 'acme', 'channel' => 'sms', 'to' => '+256712345678', 'ref' => 'php-b1'],
    ['wallet' => 'ghost', 'channel' => 'sms', 'to' => '+256712345678', 'ref' => 'php-b2'],
]])['results'];
check('batch item', $b[0]['balance_after'], '1499.9812');
check('batch error', $b[1]['error']['code'], 'unknown_wallet');
$p = $w->precheck(['wallet' => 'acme', 'channel' => 'sms', 'recipients' => ['+256712345678', '0712345678'], 'segments' => 2]);
check('precheck', [$p['required'], $p['invalid']], ['0.0188', ['0712345678']]);
check('refund', $w->refund(['wallet' => 'acme', 'ref' => 'php-1', 'reason' => 'DLR failed'])['amount'], '0.0094');
check('delivery', $w->delivery(['wallet' => 'acme', 'ref' => 'php-1', 'status' => 'failed'])['delivery']['status'], 'failed');
check('delivery batch', $w->deliveryBatch(['items' => [['wallet' => 'acme', 'ref' => 'php-1', 'status' => 'failed']]])['results'][0]['replayed'], true);
check('history', $w->history(['wallet' => 'acme', 'limit' => 2])['total'], 4);
check('balance', $w->balance(['wallet' => 'acme']), ['balance' => '1499.9906', 'held' => '0', 'available' => '1499.9906', 'currency' => 'USD']);
$top = $w->topupCreate(['wallet' => 'acme', 'amount' => '10']);
check('topup', $w->topupConfirm(['ref' => $top['ref'], 'amount' => '10', 'provider' => 'paystack', 'provider_ref' => 'PS-1'])['topup']['status'], 'paid');
$w->walletUpdate(['wallet' => 'acme', 'guard_range_max' => 1]);
$w->charge(['wallet' => 'acme', 'channel' => 'sms', 'to' => '+256700000001', 'ref' => 'php-g1']);
$e = raises('a suspended range', 'Walletd\\DestinationSuspended',
    fn() => $w->charge(['wallet' => 'acme', 'channel' => 'sms', 'to' => '+256700000002', 'ref' => 'php-g2']));
check('suspended prefix', $e->details['prefix'] ?? null, '256700000');
check('guard list', $w->guardList(['wallet' => 'acme'])['suspensions'][0]['reason'], 'range_max');
check('guard lift', $w->guardLift(['wallet' => 'acme', 'prefix' => '256700000'])['lifted'], true);
$w->walletUpdate(['wallet' => 'acme', 'guard_range_max' => null]);
check('verify', $w->verify()['ok'], true);

$e = raises('a charge past the balance', 'Walletd\InsufficientBalance', function () use ($w) {
    $w->walletCreate(['wallet' => 'ug', 'currency' => 'UGX']);
    $w->charge(['wallet' => 'ug', 'channel' => 'sms', 'to' => '+256712345678', 'ref' => 'x']);
});
check('insufficient details', [$e->walletdCode, $e->details['required'], $e->details['available'], $e->details['currency']],
      ['insufficient_balance', '35', '0', 'UGX']);
check('an error is a WalletdError', $e instanceof Walletd\WalletdError, true);
$e = raises('a misspelt param', 'Walletd\InvalidArgument', function () use ($w) {
    $w->charge(['wallet' => 'acme', 'channel' => 'sms', 'to' => '+256712345678', 'ref' => 'y', 'txt' => 'hi']);
});
check('field', $e->details['field'], 'txt');
raises('an unknown wallet', 'Walletd\UnknownWallet', function () use ($w) { $w->balance(['wallet' => 'nobody']); });
raises('a taken wallet id', 'Walletd\WalletExists', function () use ($w) { $w->walletCreate(['wallet' => 'acme', 'currency' => 'USD']); });
raises('an unknown method', 'Walletd\UnknownMethod', function () use ($w) { $w->call('no.such'); });
raises('a dead socket', 'Walletd\ConnectionLost', function () use ($socket) { (new Client($socket . '.nope'))->ping(); });
try {
    $w->credit(['wallet' => 'acme', 'amount' => 1.5, 'reason' => 'floats never leave']);
    check('a float amount', 'sent', 'TypeError');
} catch (TypeError $e) {
    check('a float amount', 'TypeError', 'TypeError');
}

echo "ok: $checks checks\n";

<?php
/*
 * PHP client for walletd, the prepaid wallet daemon for SMS and WhatsApp
 * platforms.  Needs Debian's php-cli and php-msgpack.
 *
 *   require 'Walletd.php';
 *   $w = new Walletd\Client();          // $WALLETD_SOCKET, ./var/walletd.sock, /run/walletd/walletd.sock
 *   $t = $w->charge(['wallet' => 'acme', 'channel' => 'sms', 'to' => '+256712345678',
 *                    'ref' => 'msg-1', 'text' => 'hi']);
 *   echo $w->balance(['wallet' => 'acme'])['balance'];   // "1499.9906": amounts are strings
 *
 * Every method of walletd is a method here, named as in Node.js
 * (wallet.create is walletCreate), taking one array of params.  Every error
 * code is an exception class under Walletd\WalletdError (InsufficientBalance,
 * UnknownWallet, ...); ->walletdCode and ->details carry the answer.
 * Amounts go in as strings (or ints of whole units), never floats.
 */
namespace Walletd;

class WalletdError extends \RuntimeException
{
    const CODE = null;
    /** @var string the error code, e.g. "insufficient_balance" */
    public $walletdCode;
    /** @var array the whole error map: code, message, field, required, ... */
    public $details;

    public function __construct(string $message, array $details = [])
    {
        parent::__construct($message);
        $this->walletdCode = $details['code'] ?? static::CODE;
        $this->details = $details;
    }

    /** The exception class of an error code (WalletdError for one this client does not know). */
    public static function classOf(string $code): string
    {
        $class = __NAMESPACE__ . '\\' . str_replace('_', '', ucwords($code, '_'));
        return class_exists($class) && is_subclass_of($class, self::class) ? $class : self::class;
    }
}

/** walletd cannot be reached, or the connection broke before an answer. */
class ConnectionLost extends WalletdError { const CODE = 'connection_lost'; }
class MalformedRequest extends WalletdError { const CODE = 'malformed_request'; }
class FrameTooLarge extends WalletdError { const CODE = 'frame_too_large'; }
class UnknownMethod extends WalletdError { const CODE = 'unknown_method'; }
class InvalidArgument extends WalletdError { const CODE = 'invalid_argument'; }
class PermissionDenied extends WalletdError { const CODE = 'permission_denied'; }
class UnknownWallet extends WalletdError { const CODE = 'unknown_wallet'; }
class WalletExists extends WalletdError { const CODE = 'wallet_exists'; }
class WalletFrozen extends WalletdError { const CODE = 'wallet_frozen'; }
class InsufficientBalance extends WalletdError { const CODE = 'insufficient_balance'; }
class NoRate extends WalletdError { const CODE = 'no_rate'; }
class NoFxRate extends WalletdError { const CODE = 'no_fx_rate'; }
class IdempotencyConflict extends WalletdError { const CODE = 'idempotency_conflict'; }
class AlreadyRefunded extends WalletdError { const CODE = 'already_refunded'; }
class NotRefundable extends WalletdError { const CODE = 'not_refundable'; }
class UnknownTxn extends WalletdError { const CODE = 'unknown_txn'; }
class UnknownTopup extends WalletdError { const CODE = 'unknown_topup'; }
class StorageFull extends WalletdError { const CODE = 'storage_full'; }
class TooManyConnections extends WalletdError { const CODE = 'too_many_connections'; }
class Busy extends WalletdError { const CODE = 'busy'; }
class Internal extends WalletdError { const CODE = 'internal'; }
class UnknownHold extends WalletdError { const CODE = 'unknown_hold'; }
class HoldClosed extends WalletdError { const CODE = 'hold_closed'; }
class LimitExceeded extends WalletdError { const CODE = 'limit_exceeded'; }
class DestinationBlocked extends WalletdError { const CODE = 'destination_blocked'; }
class Unavailable extends WalletdError { const CODE = 'unavailable'; }
class DestinationSuspended extends WalletdError { const CODE = 'destination_suspended'; }

/** One connection to walletd; reconnects on the next call after a restart. */
final class Client
{
    /** PHP method name => walletd method. */
    const METHODS = [
        'ping' => 'ping', 'walletCreate' => 'wallet.create', 'walletGet' => 'wallet.get',
        'balance' => 'balance', 'walletUpdate' => 'wallet.update', 'walletList' => 'wallet.list',
        'rateSet' => 'rate.set', 'rateDelete' => 'rate.delete', 'rateList' => 'rate.list',
        'rateLookup' => 'rate.lookup', 'rateImport' => 'rate.import', 'fxSet' => 'fx.set',
        'fxList' => 'fx.list', 'charge' => 'charge', 'chargeBatch' => 'charge.batch',
        'precheck' => 'precheck', 'quote' => 'quote', 'holdCreate' => 'hold.create',
        'holdRelease' => 'hold.release', 'holdGet' => 'hold.get', 'holdList' => 'hold.list',
        'topupCreate' => 'topup.create',
        'topupConfirm' => 'topup.confirm', 'topupCancel' => 'topup.cancel', 'topupGet' => 'topup.get',
        'topupList' => 'topup.list', 'credit' => 'credit', 'debit' => 'debit', 'transfer' => 'transfer', 'refund' => 'refund',
        'refundBatch' => 'refund.batch', 'delivery' => 'delivery', 'deliveryBatch' => 'delivery.batch',
        'guardList' => 'guard.list', 'guardLift' => 'guard.lift',
        'history' => 'history', 'statement' => 'statement', 'export' => 'export', 'reportUsage' => 'report.usage', 'notifications' => 'notifications', 'verify' => 'verify',
        'stats' => 'stats', 'status' => 'status', 'replicationRepair' => 'replication.repair',
    ];

    private $path;
    private $timeout;
    private $sock = null;
    private $unpacker = null;
    private $msgid = 0;

    public function __construct(?string $socket = null, float $timeout = 30.0)
    {
        $this->path = $socket ?? self::defaultSocket();
        $this->timeout = $timeout;
    }

    /** -s is the caller's; else $WALLETD_SOCKET, ./var/walletd.sock, the installed default. */
    public static function defaultSocket(): string
    {
        $env = getenv('WALLETD_SOCKET');
        if ($env !== false && $env !== '') {
            return $env;
        }
        // file_exists first: filetype() warns on a missing file (a dashboard's every request)
        return file_exists('var/walletd.sock') && filetype('var/walletd.sock') === 'socket'
            ? 'var/walletd.sock' : '/run/walletd/walletd.sock';
    }

    public function close(): void
    {
        if ($this->sock !== null) {
            fclose($this->sock);
            $this->sock = null;
        }
    }

    public function __call(string $name, array $args)
    {
        if (!isset(self::METHODS[$name])) {
            throw new \BadMethodCallException("walletd has no method $name");
        }
        return $this->call(self::METHODS[$name], $args[0] ?? []);
    }

    /** Calls walletd's method with params (an array of named params); returns the result. */
    public function call(string $method, array $params = [])
    {
        self::checkAmounts($params);
        $id = $this->msgid = ($this->msgid + 1) & 0xffffffff;
        $frame = msgpack_pack([0, $id, $method, $params ? [$params] : []]);
        $this->connect();
        for ($off = 0; $off < strlen($frame); $off += $n) {
            $n = @fwrite($this->sock, substr($frame, $off));
            if ($n === false || $n === 0) {
                $this->lost('the connection broke while sending');
            }
        }
        for (;;) {
            $msg = $this->next();
            if (is_array($msg) && count($msg) === 4 && $msg[0] === 1 && $msg[1] === $id) {
                break;
            }
        }
        if ($msg[2] !== null) {
            $err = $msg[2];
            $class = WalletdError::classOf((string)($err['code'] ?? ''));
            throw new $class((string)($err['message'] ?? 'walletd error'), $err);
        }
        return $msg[3];
    }

    private function connect(): void
    {
        if ($this->sock !== null) {
            return;
        }
        $sock = @stream_socket_client('unix://' . $this->path, $errno, $errstr, $this->timeout);
        if ($sock === false) {
            throw new ConnectionLost("cannot connect to walletd at {$this->path}: $errstr");
        }
        stream_set_timeout($sock, (int)$this->timeout, (int)(fmod($this->timeout, 1) * 1e6));
        $this->sock = $sock;
        $this->unpacker = new \MessagePackUnpacker();
    }

    /** The next whole object walletd sent. */
    private function next()
    {
        while (!$this->unpacker->execute()) {
            $data = fread($this->sock, 65536);
            if ($data === false || $data === '') {
                $timedOut = stream_get_meta_data($this->sock)['timed_out'];
                $this->lost($timedOut ? 'no answer within the timeout' : 'walletd closed the connection');
            }
            $this->unpacker->feed($data);
        }
        $msg = $this->unpacker->data();
        $this->unpacker->reset();
        return $msg;
    }

    private function lost(string $why): void
    {
        $this->close();
        throw new ConnectionLost("walletd at {$this->path}: $why");
    }

    /** Money never travels as a float. */
    private static function checkAmounts(array $params): void
    {
        array_walk_recursive($params, function ($v) {
            if (is_float($v)) {
                throw new \TypeError('pass amounts as strings ("12.50") or ints, never floats');
            }
        });
    }
}

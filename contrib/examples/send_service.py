#!/usr/bin/python3
"""A send service, the way a real integration with walletd looks.

1. precheck the campaign: is the balance enough for every message?
2. charge each message as it is handed to the SMS route, with the message id
   as `ref` (a retry after a timeout can never charge twice);
3. when delivery reports come back, refund the messages that failed.

Runs against `make run` (export WALLETD_SOCKET=.../var/walletd.sock); it sets
up a demo wallet, rate and FX rate of its own if they are missing.
"""
import decimal
import os
import random
import sys
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import walletd  # noqa: E402

WALLET = "demo-shop"


def setup(w):
    try:
        w.wallet_create(wallet=WALLET, currency="USD", threshold=decimal.Decimal("5"))
        w.credit(wallet=WALLET, amount=decimal.Decimal("20"), reason="demo opening balance", actor="example")
    except walletd.WalletExists:
        pass
    try:
        w.rate_lookup(plan="default", channel="sms", to="+256712345678")
    except walletd.NoRate:
        w.rate_set(plan="default", channel="sms", prefix="256", price="35", currency="UGX", route="ESMS_UG")
    if not any((r["base"], r["quote"]) in (("USD", "UGX"), ("UGX", "USD")) for r in w.fx_list()["rates"]):
        w.fx_set(base="USD", quote="UGX", rate="3723.40")


def send_to_route(message):
    """Stands in for the SMPP/HTTP submit; a delivery report follows later."""
    return random.random() > 0.1  # 1 in 10 is not delivered


def main():
    random.seed(7)
    campaign = ["+2567%08d" % random.randrange(10 ** 8) for _ in range(50)]
    text = "Your order has shipped. Track it at shop.example/t"
    with walletd.Client() as w:
        setup(w)
        check = w.precheck(wallet=WALLET, channel="sms", recipients=campaign, text=text)
        print("precheck: %d messages need %s %s, %s available" % (
            len(campaign), check["required"], check["currency"], check["available"]))
        if not check["sufficient"]:
            print("not enough balance: top up first")
            return 1
        sent = []
        for number in campaign:
            message_id = str(uuid.uuid4())
            try:
                t = w.charge(wallet=WALLET, channel="sms", to=number, ref=message_id, text=text)
            except walletd.InsufficientBalance as e:
                print("stopped: %s" % e.message)
                break
            sent.append((message_id, number, t["amount"]))
        print("charged %d messages, balance now %s" % (len(sent), w.balance(wallet=WALLET)["balance"]))
        refunded = 0
        for message_id, number, amount in sent:
            if not send_to_route(number):          # the delivery report says failed
                try:
                    w.refund(wallet=WALLET, ref=message_id, reason="delivery failed")
                    refunded += 1
                except walletd.AlreadyRefunded:
                    pass
        print("refunded %d undelivered messages, balance now %s" % (refunded, w.balance(wallet=WALLET)["balance"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

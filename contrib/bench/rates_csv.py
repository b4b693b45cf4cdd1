"""Writes a rate card of N prefixes for plan PLAN to stdout (for benchmarks), or with
PLAN "deck" an operator's deck of N mobile networks (rate import --format mccmnc).
usage: /usr/bin/python3 rates_csv.py PLAN N"""
import sys

plan, n = sys.argv[1], int(sys.argv[2])
if plan == "deck":
    print("Country,Network,MCCMNC,PriceSubmit,PriceDelivered,Currency,Effective")
    for i in range(n):  # MCC 200-999, 2- and 3-digit MNCs; every 4th priced on delivery
        mccmnc = "%d%0*d" % (200 + i // 10, 2 + i % 2, i % 10)
        price = "0.00%d" % (1 + i % 9)
        print("C%d,N%d,%s,%s,%s,EUR," % (i // 10, i, mccmnc, "" if i % 4 == 0 else price, price if i % 4 == 0 else ""))
    sys.exit(0)
print("plan,channel,prefix,route,price,currency")
for i in range(n):
    # 1 followed by 4-7 digits: distinct prefixes of mixed lengths under +1.
    digits = 4 + i % 4
    print("%s,sms,1%0*d,R%d,0.00%d,USD" % (plan, digits, i % (10 ** digits), i % 3, 1 + i % 9))

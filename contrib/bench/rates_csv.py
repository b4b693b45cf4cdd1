"""Writes a rate card of N prefixes for plan PLAN to stdout (for benchmarks).
usage: /usr/bin/python3 rates_csv.py PLAN N"""
import sys

plan, n = sys.argv[1], int(sys.argv[2])
print("plan,channel,prefix,route,price,currency")
for i in range(n):
    # 1 followed by 4-7 digits: distinct prefixes of mixed lengths under +1.
    digits = 4 + i % 4
    print("%s,sms,1%0*d,R%d,0.00%d,USD" % (plan, digits, i % (10 ** digits), i % 3, 1 + i % 9))

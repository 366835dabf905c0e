#!/usr/bin/env python3
"""Summarises a trace of scripts/gpu-trace/fluxprof.c: GPU busy time, kernel time by category and
the top kernels, over the last WINDOW seconds of the trace (the timed steps: WINDOW = steps x the
median step time `bench` reports, so that start-up and the warm-up step are left out).

    scripts/gpu-trace/summarize.py trace.tsv[.xz] WINDOW [TOP]
"""
import collections
import lzma
import re
import sys

CATEGORIES = [
    ("convolution (cuDNN)", r"cudnn|conv|xmma|fprop|dgrad|wgrad|nchw|nhwc|cutlass"),
    ("matmul", r"gemm|cublas"),
    ("bezier", r"bezier"),
    ("group norm", r"group_norm|gn_"),
    ("softmax", r"softmax"),
    ("reduction", r"reduce|sum|max|min"),
    ("cast/copy", r"cast|copy"),
    ("element-wise", r""),
]


def category(name):
    low = name.lower()
    return next(c for c, pat in CATEGORIES if re.search(pat, low))


def main():
    path, window = sys.argv[1], float(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    names, recs = {}, []
    with (lzma.open if path.endswith(".xz") else open)(path, "rt") as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if p[0] == "N":
                names[int(p[1])] = p[2]
            else:
                recs.append((p[0], int(p[1]), int(p[2]), int(p[3])))
    end = max(r[2] for r in recs)
    recs = [r for r in recs if r[1] >= end - window * 1e9]
    busy = sum(e - s for _, s, e, _ in recs)
    print(f"{path}: last {window:.3f} s, {len(recs)} records, GPU busy {busy / 1e9:.3f} s "
          f"({busy / window / 1e7:.0f}%)")
    by_cat = collections.defaultdict(lambda: [0, 0])
    by_name = collections.defaultdict(lambda: [0, 0])
    for kind, s, e, x in recs:
        if kind == "K":
            name = names.get(x, "?")
            cat = category(name)
        else:
            name = cat = {"C": f"memcpy (kind {x})", "S": "memset"}[kind]
        for d, k in ((by_cat, cat), (by_name, name)):
            d[k][0] += 1
            d[k][1] += e - s
    print(f"{'category':24s} {'calls':>7s} {'ms':>9s} {'share':>6s}")
    for c, (n, t) in sorted(by_cat.items(), key=lambda kv: -kv[1][1]):
        print(f"{c:24s} {n:7d} {t / 1e6:9.1f} {t / busy * 100:5.1f}%")
    print(f"\ntop {top} kernels: ms, calls, name")
    for n, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{t / 1e6:9.1f} {c:6d}  {n[:140]}")


if __name__ == "__main__":
    main()

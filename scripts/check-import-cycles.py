#!/usr/bin/env python3
"""Import circles between the crate's modules (files): `use crate::…` edges, test modules left
out; prints each circle (a strongly connected component) and exits 1 if there is one.

    python3 scripts/check-import-cycles.py [src]

A module importing its own submodule or parent does not count. `make test` runs it.
"""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else "src"
mods = {}
for dp, _, fs in os.walk(root):
    for f in fs:
        if not f.endswith(".rs"): continue
        p = os.path.join(dp, f)
        rel = os.path.relpath(p, root)[:-3]
        parts = rel.split(os.sep)
        if parts[-1] in ("mod", "lib", "main"): parts = parts[:-1]
        mods["::".join(parts)] = p
def resolve(path):
    # longest prefix that is a module
    parts = path.split("::")
    for k in range(len(parts), 0, -1):
        m = "::".join(parts[:k])
        if m in mods: return m
    return None
edges = {m: set() for m in mods}
for m, p in mods.items():
    text = open(p).read()
    text = re.sub(r"#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", text, flags=re.S)
    for u in re.findall(r"crate::([A-Za-z_:]+(?:::\{[^}]*\})?)", text):
        base = u.split("::{")[0]
        if "::{" in u:
            inner = u.split("::{")[1].rstrip("}")
            targets = [base + "::" + x.strip().split("::")[0] for x in inner.split(",") if x.strip()]
        else:
            targets = [base]
        for t in targets:
            r = resolve(t)
            if r and r != m and not m.startswith(r + "::") and not r.startswith(m + "::"):
                edges[m].add(r)
# super:: uses
# Tarjan SCC
index = {}; low = {}; st = []; on = set(); sccs = []; i = [0]
sys.setrecursionlimit(10000)
def sc(v):
    index[v] = low[v] = i[0]; i[0] += 1; st.append(v); on.add(v)
    for w in edges[v]:
        if w not in index: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(comp)
for v in mods:
    if v not in index: sc(v)
for c in sccs:
    print("cycle:", " <-> ".join(sorted(c)))
    for a in sorted(c):
        print("   ", a, "->", sorted(x for x in edges[a] if x in c))
print(len(sccs), "import circles")
sys.exit(1 if sccs else 0)

"""Markdown table + paired differences from a PHATGOOSE results JSON."""
import json, sys
import numpy as np
path = sys.argv[1]
out = json.load(open(path))
groups = {d: ts for d, ts in out["groups"].items() if d not in out["experts"]}
correct = out["correct"]
rows = [r for r in out["scores"] if out["scores"][r].get("held_out")]
cols = list(groups)
print("| row | " + " | ".join(cols) + " | held-out mean |")
print("|---|" + "---|" * (len(cols) + 1))
for r in rows:
  s = out["scores"][r]
  cells = [f"{s[c][0]:.3f} [{s[c][1]:.2f}, {s[c][2]:.2f}]" for c in cols]
  m = s["held_out"]
  print(f"| {r} | " + " | ".join(cells) + f" | **{m[0]:.3f}** [{m[1]:.3f}, {m[2]:.3f}] |")
n_ex = {t: len(correct[rows[0]][t]) for ts in groups.values() for t in ts}
print("\nexamples per template:", sorted(set(n_ex.values())), "tasks:", len(n_ex))

def paired(a, b, resamples=2000, seed=0):
  rng = np.random.default_rng(seed)
  boot = []
  point = []
  for d, ts in groups.items():
    da, db, pa, pb = [], [], [], []
    for t in ts:
      va, vb = np.asarray(correct[a][t], float), np.asarray(correct[b][t], float)
      idx = rng.integers(0, va.size, (resamples, va.size))
      da.append(va[idx].mean(1)); db.append(vb[idx].mean(1))
      pa.append(va.mean()); pb.append(vb.mean())
    boot.append(np.median(np.stack(da), 0) - np.median(np.stack(db), 0))
    point.append(np.median(pa) - np.median(pb))
  m = np.mean(np.stack(boot), 0)
  return float(np.mean(point)), *np.percentile(m, [2.5, 97.5])

if "phatgoose" in rows:
  print("\npaired held-out mean differences (95% paired bootstrap):")
  for b in rows:
    if b != "phatgoose":
      d, lo, hi = paired("phatgoose", b)
      print(f"  phatgoose - {b}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")

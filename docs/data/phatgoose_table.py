"""Markdown table + paired differences from PHATGOOSE / merging results JSONs.

  python docs/data/phatgoose_table.py RESULTS.json [MORE.json ...] \
      [--baseline=phatgoose] [--baseline=merged] [--mean=held_in]

--mean: the columns and mean of the held-out datasets (default) or of the
held-in ones (the experts' own tasks: the merging benchmarks' protocol).

Several files (e.g. the PHATGOOSE rows and the merging rows of one expert
library) are combined row by row; they must hold the same tasks, and every
row must have scored the same examples of each task, so paired differences
are meaningful: checked on the ids the experiment records per row and task
('example_ids', crc32 of each example's text). A row that scored other
examples is shown in a table of its own, with the task and the reason, and
left out of every paired difference. Files written before the ids were
recorded are checked on example counts only (a note says so).
"""
import json
import sys

import numpy as np

args = [a for a in sys.argv[1:] if not a.startswith("--")]
baselines = [a.split("=", 1)[1] for a in sys.argv[1:]
             if a.startswith("--baseline=")] or ["phatgoose"]
mean = next((a.split("=", 1)[1] for a in sys.argv[1:]
             if a.startswith("--mean=")), "held_out")
if mean not in ("held_in", "held_out"):
  sys.exit(f"--mean={mean}: use held_in or held_out")
outs = [json.load(open(p)) for p in args]
first = outs[0]
groups = {d: ts for d, ts in first["groups"].items()
          if (d in first["experts"]) == (mean == "held_in")}
scores, correct, ids, source = {}, {}, {}, {}
for path, out in zip(args, outs):
  if out["groups"] != first["groups"] or out["experts"] != first["experts"]:
    sys.exit(f"{path}: other tasks or experts than {args[0]}; not comparable")
  for r, s in out["scores"].items():
    if s.get(mean) and r not in scores:
      scores[r], correct[r] = s, out["correct"][r]
      ids[r], source[r] = out.get("example_ids", {}).get(r), path
rows = list(scores)
ref = rows[0]
tasks = [t for ts in groups.values() for t in ts]
with_ids = [r for r in rows if ids[r]]
if len(with_ids) < len(rows):
  old = sorted({source[r] for r in rows if not ids[r]})
  print(f"note: {', '.join(old)}: no example ids (written before they were "
        "recorded); only example counts were checked", file=sys.stderr)
id_ref = with_ids[0] if with_ids else None


def other_examples(r):
  """Why row r did not score the reference row's examples ('' if it did)."""
  for t in tasks:
    if len(correct[r][t]) != len(correct[ref][t]):
      return (f"{len(correct[r][t])} examples of {t}, {ref} has "
              f"{len(correct[ref][t])}")
    if ids[r] and id_ref and ids[r].get(t) != ids[id_ref].get(t):
      return f"other examples of {t} than {id_ref}"
  return ""


# A row that scored other examples (e.g. MHR-z on rows its allocation was
# not fitted on) is shown apart and never paired.
unpaired = {r: other_examples(r) for r in rows if other_examples(r)}
cols = list(groups)


def print_rows(names):
  print("| row | " + " | ".join(cols) + f" | {mean} mean |")
  print("|---|" + "---|" * (len(cols) + 1))
  for r in names:
    s = scores[r]
    cells = [f"{s[c][0]:.3f} [{s[c][1]:.2f}, {s[c][2]:.2f}]" for c in cols]
    m = s[mean]
    print(f"| {r} | " + " | ".join(cells)
          + f" | **{m[0]:.3f}** [{m[1]:.3f}, {m[2]:.3f}] |")


print_rows([r for r in rows if r not in unpaired])
if unpaired:
  print("\nrows scored on other examples (not paired with the rows above):")
  for r, why in unpaired.items():
    print(f"  {r} ({source[r]}): {why}")
  print_rows(list(unpaired))
rows = [r for r in rows if r not in unpaired]
n_ex = {t: len(correct[ref][t]) for ts in groups.values() for t in ts}
print("\nexamples per template:", sorted(set(n_ex.values())), "tasks:", len(n_ex))


def paired(a, b, resamples=2000, seed=0):
  """The mean over `groups` of a minus b, on the same resampled examples:
  one draw of example indices per dataset, for both rows and every template
  (templates of different sizes: one draw per template)."""
  rng = np.random.default_rng(seed)
  boot, point = [], []
  for ts in groups.values():
    da, db, pa, pb = [], [], [], []
    sizes = {len(correct[a][t]) for t in ts}
    shared = rng.integers(0, min(sizes), (resamples, min(sizes)))
    for t in ts:
      va = np.asarray(correct[a][t], float)
      vb = np.asarray(correct[b][t], float)
      idx = (shared if len(sizes) == 1
             else rng.integers(0, va.size, (resamples, va.size)))
      da.append(va[idx].mean(1))
      db.append(vb[idx].mean(1))
      pa.append(va.mean())
      pb.append(vb.mean())
    boot.append(np.median(np.stack(da), 0) - np.median(np.stack(db), 0))
    point.append(np.median(pa) - np.median(pb))
  m = np.mean(np.stack(boot), 0)
  return float(np.mean(point)), *np.percentile(m, [2.5, 97.5])


for base in baselines:
  if base not in rows:
    continue
  print(f"\npaired {mean} mean differences, X - {base} "
        "(95% paired bootstrap):")
  for r in rows:
    if r != base:
      d, lo, hi = paired(r, base)
      print(f"  {r} - {base}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")


# Routing diagnostics of the Soft Injection skills (configs :skills): per
# held-out task, the share of routed slots on experts of its own family
# (prompt tokens only), against the share by chance.
for r, diag in outs[0].get("diagnostics", {}).items():
  shares = {t: d for t, d in diag.items()
            if isinstance(d, dict) and "family_share" in d}
  if shares:
    print(f"\n{r}: routed slots on the task's own family (prompts only)")
    print("| held-out task | family | experts of the family | share | chance |")
    print("|---|---|---|---|---|")
    for t, d in shares.items():
      print(f"| {t} | {d['family']} | {len(d['family_experts'])} | "
            f"{d['family_share']:.3f} | {d['family_chance']:.3f} |")
overlaps = outs[0].get("diagnostics", {}).get("overlaps")
if overlaps:
  print("\nheld-out test rows scored vs the held-in train files")
  print("| held-out task | rows | input in a held-in train file | "
        "same input and output |")
  print("|---|---|---|---|")
  for t, v in overlaps["held_out"].items():
    print(f"| {t} | {v['rows']} | {v['input_seen']} | {v['pair_seen']} |")

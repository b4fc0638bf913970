"""docs/results.md quotes what docs/data/phatgoose_table.py computes from the
committed per-example files: every figure below is looked up in both."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs/data/phatgoose_table.py"
DATA = ROOT / "docs/data"

# (table script arguments, {figure as the script prints it: as the docs
# quote it}).
CASES = [
    (["merging_smollm2_words_rows.json",
      "merging_smollm2_words_rows_arrow_uniform.json", "--mean=held_in",
      "--baseline=uniform", "--baseline=task_arithmetic"],
     {"task_arithmetic - uniform: -0.076 [-0.140, -0.012]":
          "+0.076 [+0.012, +0.140]",
      "phatgoose - uniform: +0.084 [+0.024, +0.148]":
          "+0.084 [+0.024, +0.148]",
      "arrow - uniform: +0.040 [-0.016, +0.092]": "+0.040 [−0.016, +0.092]",
      "ties - task_arithmetic: +0.024 [-0.024, +0.072]":
          "+0.024 [−0.024, +0.072]"}),
    (["phatgoose_skills_rows.json", "--baseline=merged", "--baseline=base"],
     {"phatgoose - base: +0.076 [+0.056, +0.097]": "+0.076 [+0.056, +0.097]",
      "merged - base: +0.093 [+0.074, +0.113]": "+0.093 [+0.074, +0.113]",
      "phatgoose - merged: -0.017 [-0.035, -0.000]":
          "−0.017 [−0.035, −0.000]",
      "**0.155** [0.137, 0.173]": "**0.155** [0.137, 0.173]",
      "**0.172** [0.152, 0.192]": "**0.172** [0.152, 0.192]",
      "| si_qa_landmark_country.inst | entity_facts | 4 | 0.400 | 0.250 |":
          "| si_qa_landmark_country.inst | entity_facts | 4 | 0.400 | 0.250 |"}),
    (["phatgoose_skills_rows.json", "phatgoose_skills_rows_oracle.json",
      "--baseline=phatgoose"],
     {"oracle - phatgoose: +0.114 [+0.089, +0.136]":
          "+0.114 [+0.089, +0.136]",
      "**0.268** [0.246, 0.292]": "**0.268** [0.246, 0.292]"}),
    (["phatgoose_skills_rows.json", "phatgoose_skills_rows_oracle.json",
      "--mean=held_in", "--baseline=base"],
     {"oracle - base: +0.517 [+0.491, +0.541]": "+0.517 [+0.491, +0.541]",
      "**0.640** [0.619, 0.660]": "0.640 [0.619, 0.660]"}),
]


@pytest.mark.parametrize("args,figures", CASES)
def test_results_doc_quotes_the_table_script(args, figures):
  files = [str(DATA / a) if a.endswith(".json") else a for a in args]
  out = subprocess.run([sys.executable, str(TABLE), *files],
                       capture_output=True, text=True, check=True).stdout
  doc = (ROOT / "docs/results.md").read_text()
  for printed, quoted in figures.items():
    assert printed in out, printed
    assert quoted in doc, quoted

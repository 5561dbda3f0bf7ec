"""bench/quality.py's bookkeeping: the results table accumulates across calls (no training here: the harness's
figures are benchmarks, bench/QUALITY.md)."""
import importlib.util
import json
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_quality", os.path.join(os.path.dirname(__file__), "..", "bench", "quality.py"))
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def _rows(method, knn, pixels=0.79):
    base = {"knn_majority": None, "linear": None, "semi_1pct": None, "semi_10pct": None, "semi": {}}
    return [{**base, "method": method, "subject": "trained", "knn_weighted": knn, "command": f"run {method}",
             "train_minutes": 12.0, "curve": [[1.0, 2.0], [0.7, knn]]},
            {**base, "method": method, "subject": "pixels", "knn_weighted": pixels, "command": f"run {method}"}]


def _meta(date, flags, quick=False):
    return {"date": date, "cpu": "x86_64", "cpu_flags": flags, "tensorflow": "2.21.0", "split": quality.split(quick)}


def test_a_call_keeps_other_methods_rows_with_their_date_and_flags_and_replaces_its_own(tmp_path):
    out = str(tmp_path)
    quality.write_outputs(out, _rows("ressl", 0.82) + _rows("wcl", 0.80), _meta("2026-12-05", "avx2 fma"))
    rows, curves, pixels = quality.kept(out, ["wcl"], quick=False)
    assert [r["method"] for r in rows] == ["ressl", "ressl"]
    assert all(r["date"] == "2026-12-05" and r["cpu_flags"] == "avx2 fma" for r in rows)
    assert curves == {"ressl": ([1.0, 2.0], [0.7, 0.82])} and pixels == pytest.approx(0.79)
    quality.write_outputs(out, rows + _rows("wcl", 0.85), _meta("2026-12-06", "avx2 avx512f fma"))
    stored = json.load(open(os.path.join(out, "results.json")))["results"]
    assert [(r["method"], r["knn_weighted"]) for r in stored if r["subject"] == "trained"] == [("ressl", 0.82),
                                                                                              ("wcl", 0.85)]
    md = open(os.path.join(out, "results.md")).read()
    assert "| wcl | trained | 85.0 |" in md and "| ressl | trained | 82.0 |" in md
    assert "Rows of ressl were measured on 2026-12-05 with CPU flags (avx2 fma)." in md
    newer = [dict(r, date="2026-12-07", cpu_flags="avx2 fma") if r["method"] == "wcl" and r["subject"] == "trained" else r
             for r in json.load(open(os.path.join(out, "results.json")))["results"]]
    quality.write_outputs(out, newer, _meta("2026-12-07", "avx2 fma"))   # wcl's baselines stay at 2026-12-06
    md = open(os.path.join(out, "results.md")).read()
    assert "Rows of the baselines of wcl were measured on 2026-12-06 with CPU flags (avx2 avx512f fma)." in md
    assert "`run ressl`; `run wcl`" in md


def test_rows_of_the_other_split_are_not_kept(tmp_path):
    out = str(tmp_path)
    quality.write_outputs(out, _rows("ressl", 0.5), _meta("2026-12-06", "avx2", quick=True))
    assert quality.kept(out, ["wcl"], quick=False) == ([], {}, None)
    assert [r["method"] for r in quality.kept(out, ["wcl"], quick=True)[0]] == ["ressl", "ressl"]
    assert quality.kept(str(tmp_path / "nothing"), ["wcl"], quick=False) == ([], {}, None)

"""benchmarks/check_claims.py: the documents pass on main, and a figure changed by hand, a figure without a
reference or a byte figure in the wrong unit makes the checker fail."""

from __future__ import annotations

import csv
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "check_claims.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_claims", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_claims"] = module
    spec.loader.exec_module(module)
    return module


cc = _load()


def _errors(doc: Path) -> list[str]:
    return cc.check_document(doc, ROOT, doc.name).errors


def test_the_documents_pass_on_main() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    checked = int(out.stdout.split("check_claims: ")[1].split()[0])
    assert checked > 500  # the markup is really read, not skipped


@pytest.mark.parametrize(
    ("document", "old", "new"),
    [
        ("benchmarks/claims.md", "KL 0.0247 / 0.0576", "KL 0.0250 / 0.0576"),  # a prose figure
        ("benchmarks/claims.md", "| 5.26 / 5.14 |", "| 5.26 / 5.24 |"),  # a table with a columns spec
        ("benchmarks/README.md", "| 6.27 | 4.99 | 80% |", "| 6.27 | 4.99 | 81% |"),  # the GPU decode table
    ],
)
def test_a_figure_changed_by_hand_fails(tmp_path: Path, document: str, old: str, new: str) -> None:
    text = (ROOT / document).read_text(encoding="utf-8")
    assert text.count(old) == 1, f"the test's anchor moved in {document}: update it"
    copy = tmp_path / Path(document).name
    copy.write_text(text.replace(old, new), encoding="utf-8")
    errors = _errors(copy)
    assert len(errors) == 1 and "does not match" in errors[0], errors
    # the same copy through the command line fails too (what .ci/run runs)
    rc = subprocess.run([sys.executable, str(SCRIPT), str(copy)], cwd=ROOT, capture_output=True, timeout=60)
    assert rc.returncode == 1


def test_a_figure_without_a_reference_fails(tmp_path: Path) -> None:
    copy = tmp_path / "claims.md"
    shutil.copy(ROOT / "benchmarks" / "claims.md", copy)
    with open(copy, "a", encoding="utf-8") as f:
        f.write("\nA new sentence quoting 12.5 MiB and a 3.1x ratio without their rows.\n")
    errors = _errors(copy)
    assert len(errors) == 2 and all("has no reference" in e for e in errors), errors


def _doc(tmp_path: Path, body: str) -> Path:
    table = tmp_path / "rows.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "params", "budget", "kv_bytes_held", "kl", "top1"])
        w.writerow(["snapkv", "{}", "0.25", "24168960", "0.0246", "0.953"])
        w.writerow(["snapkv", '{"allocation":"adakv"}', "0.25", "24168960", "0.0217", "0.944"])
    doc = tmp_path / "doc.md"
    doc.write_text(f"<!--= def t = {table}; r = t[method=snapkv,params={{}},budget=0.25] -->\n\n{body}\n")
    return doc


def test_a_byte_figure_in_the_wrong_unit_fails(tmp_path: Path) -> None:
    assert _errors(_doc(tmp_path, "held 23.05 MiB<!--= r.kv_bytes_held --> (24.17 MB<!--= r.kv_bytes_held -->)")) == []
    errors = _errors(_doc(tmp_path, "held 24.2 MiB<!--= r.kv_bytes_held -->"))
    assert len(errors) == 1 and "MB, not MiB" in errors[0], errors
    errors = _errors(_doc(tmp_path, "held 24168960 tokens<!--= r.kv_bytes_held -->"))
    assert len(errors) == 1 and "without a byte unit" in errors[0], errors


def test_references_rounding_chains_and_exemptions(tmp_path: Path) -> None:
    ok = (
        "KL 0.025 / 0.022<!--= r.kl t[params={\"allocation\":\"adakv\"}].kl -->, top-1 95.3 %<!--= r.top1 -->, "
        "95 / 94 %<!--= r.top1 t[method=snapkv,params={\"allocation\":\"adakv\"},budget=0.25].top1 -->; "
        "mean KL 0.023<!--= mean(t[method=snapkv,*].kl) -->; a paper's 8.2× memory<!--= paper -->, a budget of "
        "25 %<!--= setting -->. Not figures: top-1, fp32, 2-bit, SmolLM2-135M, Llama-3.1-8B, torch 2.11.0, `12 MiB`."
        "\n\n```\nmemfit run ... 4.5 MB\n```"
    )
    assert _errors(_doc(tmp_path, ok)) == []
    # rounding is the written precision: 95.4 % is off by more than half a unit of its last digit
    errors = _errors(_doc(tmp_path, "top-1 95.4 %<!--= r.top1 -->"))
    assert len(errors) == 1 and "does not match" in errors[0]
    # a unit shared along a chain makes every number of it a figure that needs a reference
    errors = _errors(_doc(tmp_path, "needle 50/25/0 %<!--= r.top1 -->"))
    assert [e.split(": ", 1)[1] for e in errors if "no reference" in e] == [
        "figure '50' has no reference",
        "figure '25' has no reference",
    ]


def test_bad_references_are_errors(tmp_path: Path) -> None:
    errors = _errors(_doc(tmp_path, "1.0x<!--= t[method=snapkv].kl -->"))  # two rows match
    assert len(errors) == 1 and "matches 2 rows" in errors[0]
    errors = _errors(_doc(tmp_path, "1.0x<!--= r.nope -->"))
    assert len(errors) == 1 and "missing" in errors[0]
    errors = _errors(_doc(tmp_path, "1.0x<!--= nosuch.kl -->"))
    assert len(errors) == 1 and "unknown row" in errors[0]


def test_list_items_of_a_jsonl_row(tmp_path: Path) -> None:
    """`src[k=v].field[0].sub` reads an item of a list field (a profile's kernel table); `[0]` is not a selector."""
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"method": "h2o", "kernels": [{"device_ms": 879.5}, {"device_ms": 578.7}]}\n')
    doc = tmp_path / "doc.md"
    doc.write_text(f"<!--= def p = {rows} -->\n\n879.5 ms and 578.7 ms<!--= p[method=h2o].kernels[0].device_ms "
                   "p[method=h2o].kernels[1].device_ms -->\n")
    assert _errors(doc) == []
    doc.write_text(f"<!--= def p = {rows} -->\n\n578.7 ms<!--= p[method=h2o].kernels[0].device_ms -->\n")
    errors = _errors(doc)
    assert len(errors) == 1 and "does not match" in errors[0], errors

"""Check every figure quoted in the project's documents against the committed result files.

    python benchmarks/check_claims.py                 # README.md, benchmarks/README.md, benchmarks/claims.md
    python benchmarks/check_claims.py some/doc.md     # other documents (result paths stay relative to the repo)

A figure is written with a reference to the file and row it comes from, in an HTML comment that rendered Markdown
hides (the markup is described at the top of ``benchmarks/README.md``). The checker recomputes each referenced
figure from its file and fails on

- a figure that does not match its file beyond the rounding it is written with,
- a figure (a number with a unit: B/KB/MB/GB/KiB/MiB/GiB, GB/s, s/ms/us/min, tok/s, %, x or ×) without a reference,
- a byte figure whose unit does not match the bytes (e.g. MB printed as MiB), or bytes quoted without a byte unit,
- a reference to a file, row or field that does not exist (or a row selector that matches several rows).

Standard library only, so it runs in CI in well under a second.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "benchmarks/README.md", "benchmarks/claims.md")

BYTE_UNITS = {
    "B": 1,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "TB": 1e12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
BYTE_RATES = {"MB/s": 1e6, "GB/s": 1e9, "TB/s": 1e12}
# Longest first, so "MiB" is not read as "M" + "iB" and "ms" not as "m" + "s".
UNITS = sorted(
    [*BYTE_UNITS, "TB/s", "GB/s", "MB/s", "tokens/s", "tok/s", "ms", "us", "µs", "min", "s", "%", "x", "×"],
    key=len,
    reverse=True,
)
EXEMPT = {"paper", "setting"}

# A number: not glued to a word, a version or a selector ("top-1", "fp32", "@0.25", "5.17.0", "Llama-3.1-8B").
_NUMBER = re.compile(r"(?<![\w.@=^])(?<![A-Za-z][-/])([+\-−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\d.]?\d)")
_UNIT = re.compile(r"\s?(" + "|".join(re.escape(u) for u in UNITS) + r")(?![A-Za-z0-9])")
_CHAIN = re.compile(r"^\s?(?:/|-|–)\s?$")  # "50/25/0 %", "84-94 %": the unit belongs to every number
_COMMENT = re.compile(r"<!--(.*?)-->", re.S)
_MARK = re.compile(r"<!--=(.*?)-->", re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK_URL = re.compile(r"\]\([^)\s]*\)")
_VERSION = re.compile(r"\d+\.\d+\.\d+\S*")
_FIELD_UNITS = {u.lower(): u for u in BYTE_UNITS if u != "B"}
_FIELD_UNIT = re.compile(r"_(" + "|".join(_FIELD_UNITS) + r")$")
_FUNCS = {
    "min": min,
    "max": max,
    "sum": sum,
    "abs": lambda xs: abs(xs[0]),
    "mean": lambda xs: sum(xs) / len(xs),
}
_SELECTOR = re.compile(r"(?<![.\w])([A-Za-z_]\w*)\[([^\]]*[=*][^\]]*)\]")  # src[k=v,*]; not row.list[0]


class ClaimError(Exception):
    """A reference that cannot be resolved (bad file, row, field or expression)."""


# ------------------------------------------------------------------------------------------------ result files


def _cell(value: str) -> Any:
    """A CSV cell as the value it stands for: number, JSON object/list, None for an empty cell, else the string."""
    if value == "":
        return None
    if value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    try:
        return float(value)
    except ValueError:
        return value


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ClaimError(f"result file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return [{k: _cell(v) for k, v in r.items()} for r in csv.DictReader(text.splitlines())]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(text)
        rows = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ClaimError(f"{path}: expected a list of rows or an object with 'rows'")
        return rows
    raise ClaimError(f"{path}: unknown result format (use .jsonl, .json or .csv)")


def _get(row: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(row, list) and part.isdigit() and int(part) < len(row):  # list items: kl_per_step.0
            row = row[int(part)]
        elif isinstance(row, dict) and part in row:
            row = row[part]
        else:
            return _MISSING
    return row


_MISSING = object()


def _same(have: Any, want: Any) -> bool:
    if have is _MISSING:
        have = None
    if isinstance(have, str) and have[:1] in "{[":
        try:
            have = json.loads(have)
        except json.JSONDecodeError:
            pass
    if isinstance(want, int | float) and not isinstance(want, bool) and isinstance(have, int | float):
        return math.isclose(float(have), float(want), rel_tol=1e-12, abs_tol=1e-12)
    if isinstance(want, str) and not isinstance(have, str) and have is not None:
        return str(have) == want
    return have == want


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, braces and quotes."""
    parts, depth, quote, cur = [], 0, False, []
    for ch in text:
        if ch == '"':
            quote = not quote
        elif not quote and ch in "[{(":
            depth += 1
        elif not quote and ch in "]})":
            depth -= 1
        if ch == sep and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


@dataclass
class Scope:
    """The sources and row aliases a document defines, and the rows loaded so far."""

    root: Path
    sources: dict[str, Path] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    _files: dict[Path, list[dict[str, Any]]] = field(default_factory=dict)

    def select(self, source: str, selector: str) -> Any:
        """The one row of ``source`` that matches ``selector`` (``k=v,...``); with a ``*`` term, every matching row
        (a list, for mean/min/max/sum over rows)."""
        if source not in self.sources:
            raise ClaimError(f"unknown source '{source}' (define it: <!--= def {source} = path/to/file.jsonl -->)")
        path = self.sources[source]
        if path not in self._files:
            self._files[path] = load_rows(path)
        conds, many = [], False
        for part in _split_top(selector, ","):
            if part == "*":
                many = True
                continue
            key, eq, raw = part.partition("=")
            if not eq:
                raise ClaimError(f"selector term '{part}' is not key=value")
            try:
                want = json.loads(raw)
            except json.JSONDecodeError:
                want = raw
            conds.append((key.strip(), want))
        hits = [r for r in self._files[path] if all(_same(_get(r, k), v) for k, v in conds)]
        if many and hits:
            return hits
        if len(hits) != 1:
            where = path.relative_to(self.root) if path.is_relative_to(self.root) else path
            raise ClaimError(f"{source}[{selector}] matches {len(hits)} rows of {where}, not 1")
        return hits[0]

    def define(self, name: str, value: str) -> None:
        if name in self.sources or name in self.rows:
            raise ClaimError(f"'{name}' is defined twice")
        m = _SELECTOR.fullmatch(value)
        if m:
            self.rows[name] = self.select(m.group(1), m.group(2))
        else:
            self.sources[name] = (self.root / value).resolve()


@dataclass
class Value:
    number: float
    bytes_field: bool  # the expression reads a field of bytes, so a byte unit must be written with it


def evaluate(expr: str, scope: Scope, local: dict[str, dict[str, Any]]) -> Value:
    """Value of a reference expression: ``alias.field``, ``src[k=v,...].field``, + - * /, min, max, abs."""
    inline: dict[str, dict[str, Any]] = {}

    def lift(m: re.Match[str]) -> str:
        name = f"_sel{len(inline)}"
        inline[name] = scope.select(m.group(1), m.group(2))
        return name

    py = _SELECTOR.sub(lift, expr)
    names = {**scope.rows, **local, **inline}
    saw_bytes = False

    def ev(node: ast.AST) -> Any:
        nonlocal saw_bytes
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
            a, b = ev(node.left), ev(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}.get(type(node.op), a / b if b else math.nan)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
            args = [ev(a) for a in node.args]
            flat = [x for a in args for x in (a if isinstance(a, list) else [a])]
            return _FUNCS[node.func.id](flat)
        if isinstance(node, ast.Attribute | ast.Subscript):
            path = []  # row.field.sub[2] -> ["2", "sub", "field"]
            while isinstance(node, ast.Attribute | ast.Subscript):
                if isinstance(node, ast.Attribute):
                    path.append(node.attr)
                elif isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int):
                    path.append(str(node.slice.value))
                else:
                    raise ClaimError(f"'{expr}': only constant list indexes are allowed")
                node = node.value
            if not isinstance(node, ast.Name) or node.id not in names:
                raise ClaimError(f"'{expr}': unknown row '{getattr(node, 'id', '?')}'")
            dotted = ".".join(reversed(path))
            base = names[node.id]
            if isinstance(base, list):  # a "*" selector: the field of every row, for mean/min/max/sum
                return [field_value(r, dotted, node.id) for r in base]
            return field_value(base, dotted, node.id)
        raise ClaimError(f"'{expr}': only row.field, numbers, + - * /, min, max, mean, sum and abs are allowed")

    def field_value(row: dict[str, Any], dotted: str, name: str) -> float:
        nonlocal saw_bytes
        path = list(reversed(dotted.split(".")))
        value = _get(row, dotted)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                value = _MISSING
        if value is _MISSING or value is None or isinstance(value, bool):
            raise ClaimError(f"'{expr}': field '{dotted}' is missing or not a number in row '{name}'")
        leaf = next(p for p in path if not p.isdigit())
        unit = _FIELD_UNIT.search(leaf)
        if unit:  # a field already in a byte unit, e.g. peak_gib: back to bytes, like every bytes field
            value = float(value) * BYTE_UNITS[_FIELD_UNITS[unit.group(1)]]
        saw_bytes = saw_bytes or "bytes" in leaf or unit is not None
        return float(value)

    try:
        tree = ast.parse(py, mode="eval")
    except SyntaxError as exc:
        raise ClaimError(f"'{expr}' is not a valid reference expression") from exc
    value = ev(tree)
    if isinstance(value, list):
        raise ClaimError(f"'{expr}' gives several values: wrap it in mean(), min(), max() or sum()")
    return Value(value, saw_bytes)


# ------------------------------------------------------------------------------------------------ documents


@dataclass
class Number:
    """A number as written: its text, value, decimals (the rounding it claims), unit, line and offsets."""

    text: str
    value: float
    decimals: int
    unit: str | None
    line: int
    span: tuple[int, int] = (0, 0)


def _blank(text: str) -> str:
    """``text`` with every character except newlines replaced by spaces (keeps offsets and line numbers)."""
    return re.sub(r"[^\n]", " ", text)


def numbers(text: str, line_of: Callable[[int], int]) -> list[Number]:
    """The numbers of a piece of text, with the unit each is written with (shared along "a/b/c unit" chains)."""
    out: list[Number] = []
    for m in _NUMBER.finditer(text):
        sign, whole, frac = m.group(1), m.group(2), m.group(3) or ""
        tail = text[m.end() :]
        if re.match(r"-[A-Za-z]|[A-Za-z]", tail) and not _UNIT.match(tail):  # "2-bit", "8K", "135M"
            continue
        u = _UNIT.match(tail)
        unit = u.group(1) if u else None
        if unit in BYTE_UNITS and not tail.startswith(" "):  # "8B", "80GB": a model or a product, not bytes
            continue
        if unit in ("x", "×") and re.match(r"\s?[x×]\s*[~\d]", tail):  # "4 x 8K" multiplies, it is no ratio
            unit = None
        value = float((whole + frac).replace(",", "")) * (-1 if sign in "-−" and sign else 1)
        out.append(Number(m.group(0) + (u.group(0) if u else ""), value, len(frac) - 1 if frac else 0, unit,
                          line_of(m.start()), (m.start(), m.end())))
    for i in range(len(out) - 2, -1, -1):
        a, b = out[i], out[i + 1]
        if a.unit is None and b.unit is not None:
            between = text[a.span[1] : b.span[0]]
            if _CHAIN.match(between):
                a.unit = b.unit
    return out


@dataclass
class Report:
    """What a check found: figures checked, figures exempt (paper, setting), and one line per problem."""

    checked: int = 0
    exempt: int = 0
    errors: list[str] = field(default_factory=list)


def _check_one(num: Number, expr: str, scope: Scope, local: dict[str, Any], where: str, report: Report) -> None:
    tol_rel = 0.0
    if "~" in expr:
        expr, _, pct = expr.partition("~")
        tol_rel = float(pct.rstrip("%")) / 100.0
    try:
        val = evaluate(expr, scope, local)
    except ClaimError as exc:
        report.errors.append(f"{where}:{num.line}: {exc}")
        return
    x, unit = val.number, num.unit
    if unit in BYTE_UNITS:
        if not val.bytes_field:
            report.errors.append(f"{where}:{num.line}: '{num.text}' has a byte unit but '{expr}' reads no bytes field")
            return
        x = x / BYTE_UNITS[unit]
    elif unit in BYTE_RATES and val.bytes_field:
        x = x / BYTE_RATES[unit]
    elif val.bytes_field and unit not in ("x", "×", "%") and abs(num.value) > 0:
        report.errors.append(
            f"{where}:{num.line}: '{num.text}' quotes bytes ({val.number:,.0f} B from '{expr}') without a byte unit"
        )
        return
    elif unit == "%":
        x = 100.0 * x
    tol = 0.5 * 10.0 ** (-num.decimals) + 1e-9 * max(1.0, abs(x)) + tol_rel * abs(x)
    report.checked += 1
    if not math.isfinite(x) or abs(num.value - x) > tol:
        msg = f"{where}:{num.line}: '{num.text}' does not match {expr} = {x:.6g}"
        if unit in BYTE_UNITS:
            alt = {"MiB": "MB", "MB": "MiB", "GiB": "GB", "GB": "GiB", "KiB": "KB", "KB": "KiB", "TiB": "TB"}.get(unit)
            if alt and abs(num.value - val.number / BYTE_UNITS[alt]) <= tol:
                msg += f" {unit} (the bytes are {val.number:,.0f} B: {num.value} {alt}, not {unit})"
        report.errors.append(msg)


def _blocks(text: str) -> Iterator[tuple[int, str, bool]]:
    """(offset, text, is_table_row) units: a table row, a paragraph / list item / heading, or "" for a blank line."""
    offset, cur, start = 0, [], 0
    for line in text.splitlines(keepends=True):
        s = line.strip()
        new_block = not s or s.startswith(("|", "#", "- ", "* ")) or re.match(r"\d+\. ", s)
        if new_block and cur:
            yield start, "".join(cur), False
            cur = []
        if not s:
            yield offset, "", False
        elif s.startswith("|"):
            yield offset, line, True
        elif s:
            if not cur:
                start = offset
            cur.append(line)
        if s.startswith("#") and cur:
            yield start, "".join(cur), False
            cur = []
        offset += len(line)
    if cur:
        yield start, "".join(cur), False


def _cells(row: str) -> list[tuple[int, str]]:
    """(offset, text) of each cell of a table row (``\\|`` and pipes inside comments do not split)."""
    out, start, i = [], None, 0
    while i < len(row):
        if row.startswith("<!--", i):
            j = row.find("-->", i)
            i = len(row) if j < 0 else j + 3
            continue
        if row[i] == "|" and (i == 0 or row[i - 1] != "\\"):
            if start is not None:
                out.append((start, row[start:i]))
            start = i + 1
        i += 1
    return out


def check_document(path: Path, root: Path = ROOT, name: str | None = None) -> Report:
    """Check every figure of the Markdown file ``path``; result paths in its markup are relative to ``root``."""
    report = Report()
    where = name or str(path)
    raw = path.read_text(encoding="utf-8")
    line_starts = [0] + [m.end() for m in re.finditer("\n", raw)]

    def line_of(pos: int) -> int:
        lo, hi = 0, len(line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if line_starts[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1

    # Fenced code and inline code hold commands and versions, not figures; non-claim comments are notes.
    text = re.sub(r"^```.*?^```[^\n]*$", lambda m: _blank(m.group(0)), raw, flags=re.S | re.M)
    text = _CODE_SPAN.sub(lambda m: _blank(m.group(0)), text)
    text = _LINK_URL.sub(lambda m: "]" + _blank(m.group(0)[1:]), text)
    text = _VERSION.sub(lambda m: _blank(m.group(0)), text)
    text = _COMMENT.sub(lambda m: m.group(0) if m.group(0).startswith("<!--=") else _blank(m.group(0)), text)

    scope = Scope(root)
    for m in _MARK.finditer(text):  # definitions first, so a reference may use a name defined further down
        body = m.group(1).strip()
        if re.match(r"def\s", body):
            for item in _split_top(body[4:], ";"):
                key, eq, value = item.partition("=")
                try:
                    if not eq:
                        raise ClaimError(f"definition '{item}' is not name = value")
                    scope.define(key.strip(), value.strip())
                except ClaimError as exc:
                    report.errors.append(f"{where}:{line_of(m.start())}: {exc}")
            text = text[: m.start()] + _blank(m.group(0)) + text[m.end() :]

    columns: dict[str, list[str]] | None = None
    header: list[str] | None = None
    for offset, block, is_row in _blocks(text):
        marks = list(_MARK.finditer(block))
        if not block.strip():  # a blank line ends a table (and its columns spec)
            if header is not None:
                columns, header = None, None
            continue
        if not is_row:
            spec = [mk for mk in marks if mk.group(1).strip().startswith("columns ")]
            if spec:
                columns, header = {}, None
                for item in _split_top(spec[0].group(1).strip()[len("columns ") :], ";"):
                    col, _, exprs = item.partition("=")
                    columns[col.strip()] = _split_top(exprs, " ")
                marks = [mk for mk in marks if mk not in spec]
            elif block.strip():
                columns, header = None, None
            _check_segments(block, offset, marks, scope, {}, where, report, line_of)
            continue
        cells = _cells(block)
        if header is None:
            header = [_MARK.sub("", c).strip() for _, c in cells]
            if columns:
                unknown = set(columns) - set(header)
                if unknown:
                    report.errors.append(f"{where}:{line_of(offset)}: columns spec names no such column: {unknown}")
            _check_segments(block, offset, marks, scope, {}, where, report, line_of)
            continue
        if re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*", block.strip()):
            continue
        local: dict[str, Any] = {}
        for _, cell in cells:
            for mk in _MARK.finditer(cell):
                body = mk.group(1).strip()
                if body.startswith("row "):
                    for item in _split_top(body[4:], " "):
                        alias, _, sel = item.partition("=")
                        sm = _SELECTOR.fullmatch(sel)
                        try:
                            if sel in scope.rows:
                                local[alias] = scope.rows[sel]
                            elif not sm:
                                raise ClaimError(f"row alias '{item}' is neither a defined row nor source[selector]")
                            else:
                                local[alias] = scope.select(sm.group(1), sm.group(2))
                        except ClaimError as exc:
                            report.errors.append(f"{where}:{line_of(offset)}: {exc}")
        for i, (c_off, cell) in enumerate(cells):
            cmarks = [mk for mk in _MARK.finditer(cell) if not mk.group(1).strip().startswith("row ")]
            col = header[i] if i < len(header) else ""
            if columns and col in columns and not cmarks:
                nums = numbers(_MARK.sub(lambda m: _blank(m.group(0)), cell), lambda p, o=offset + c_off: line_of(o))
                exprs = columns[col]
                if nums and local:
                    _match(nums, exprs, scope, local, where, report, line_of(offset))
                    continue
            cell_text = cell
            _check_segments(cell_text, offset + c_off, cmarks, scope, local, where, report, line_of)
    return report


def _match(nums: list[Number], exprs: list[str], scope: Scope, local: dict[str, Any], where: str, report: Report,
           line: int) -> None:
    """Check the last len(exprs) numbers against exprs; every figure before them is unreferenced."""
    if exprs and exprs[0] in EXEMPT:
        report.exempt += sum(1 for n in nums if n.unit)
        return
    if len(exprs) > len(nums):
        report.errors.append(
            f"{where}:{line}: {len(exprs)} references but only {len(nums)} numbers before them: "
            f"{' '.join(exprs)} / {[n.text for n in nums]}"
        )
        return
    cut = len(nums) - len(exprs)
    for n in nums[:cut]:
        if n.unit:
            report.errors.append(f"{where}:{n.line}: figure '{n.text}' has no reference")
    for n, e in zip(nums[cut:], exprs, strict=True):
        _check_one(n, e, scope, local, where, report)


def _check_segments(block: str, offset: int, marks: list[re.Match[str]], scope: Scope, local: dict[str, Any],
                    where: str, report: Report, line_of: Any) -> None:
    pos = 0
    for mk in marks:
        body = mk.group(1).strip()
        seg = _MARK.sub(lambda m: _blank(m.group(0)), block[pos : mk.start()])
        nums = numbers(seg, lambda p, o=offset + pos: line_of(o + p))
        if body.startswith(("row ", "columns ")) or re.match(r"def\s", body):
            exprs: list[str] = []
        else:
            exprs = _split_top(body, " ")
        _match(nums, exprs, scope, local, where, report, line_of(offset + mk.start()))
        pos = mk.end()
    rest = _MARK.sub(lambda m: _blank(m.group(0)), block[pos:])
    for n in numbers(rest, lambda p, o=offset + pos: line_of(o + p)):
        if n.unit:
            report.errors.append(f"{where}:{n.line}: figure '{n.text}' has no reference")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("documents", nargs="*", help=f"Markdown files (default: {', '.join(DOCUMENTS)})")
    ap.add_argument("--root", type=Path, default=ROOT, help="where result paths are resolved (the repository)")
    args = ap.parse_args(argv)
    docs = [Path(d) for d in args.documents] or [args.root / d for d in DOCUMENTS]
    total = Report()
    for doc in docs:
        try:
            name = str(doc.resolve().relative_to(args.root.resolve()))
        except ValueError:
            name = str(doc)
        r = check_document(doc, args.root.resolve(), name)
        total.checked += r.checked
        total.exempt += r.exempt
        total.errors += r.errors
    for e in total.errors:
        print(e, file=sys.stderr)
    print(
        f"check_claims: {total.checked} figures checked against result files, {total.exempt} quoted from papers or "
        f"settings, {len(total.errors)} problems in {len(docs)} documents",
        file=sys.stderr if total.errors else sys.stdout,
    )
    return 1 if total.errors else 0


if __name__ == "__main__":
    sys.exit(main())

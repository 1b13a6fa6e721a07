"""report.html: the report for a browser, in one self-contained file (no network: its style, script and plots
are inline), beside report.md.

    the recommendation   as report.md says it
    the table            every file; a click on a column header sorts by it (again: the other way), the box
                         above it keeps the rows whose text holds what is typed
    the plots            the report's figures (runtime.report.plots: legend, Pareto front, labels, the
                         recommended file ringed) as inline SVG: hovering a point shows its file, variant,
                         format, accuracy with its interval, sizes and latency

Every text that came from outside (a manifest's names, a dataset name, a path) is escaped with html.escape;
the page runs no code but its own and loads nothing.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

from runtime.fsutil import atomic_write_text, relative
from runtime.report.decide import OBJECTIVES
from runtime.report.rows import label, points as points_text

HTML_FILE = "report.html"

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}code,pre{font:12px ui-monospace,Menlo,Consolas,monospace}
pre{background:#f5f5f5;padding:.8em;overflow-x:auto}code{background:#f5f5f5;padding:0 .2em}
table{border-collapse:collapse;font-size:12px;width:100%}th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:right}
th{cursor:pointer;background:#fafafa;position:sticky;top:0;user-select:none}th:hover{background:#eee}
td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}tr.over td{color:#888}tr.failed td{color:#b00}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
#filter{width:24em;padding:4px;margin:.5em 0}.plots figure{margin:0 0 1.5em}.plots svg{max-width:100%;height:auto}
.plots g[id^=ekpt]:hover path{stroke:#000;stroke-width:2}
.meta td{text-align:left}.meta{width:auto}
"""

_SCRIPT = """
(function(){
  var table=document.getElementById('files'),body=table.tBodies[0];
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
    th.addEventListener('click',function(){
      var up=th.getAttribute('aria-sort')!=='ascending';
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(o){o.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',up?'ascending':'descending');
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){
        var x=a.cells[col].getAttribute('data-v'),y=b.cells[col].getAttribute('data-v');
        var nx=parseFloat(x),ny=parseFloat(y),c;
        if(x===''&&y!=='')return 1;if(y===''&&x!=='')return -1;
        c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));
        return up?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  document.getElementById('filter').addEventListener('input',function(e){
    var q=e.target.value.toLowerCase();
    Array.prototype.forEach.call(body.rows,function(r){r.hidden=q!==''&&r.textContent.toLowerCase().indexOf(q)<0;});
  });
})();
"""

# (header, the row's field, how the cell shows it)
_COLUMNS = (
    ("variant", "variant", str), ("format", "format", str), ("file", "_shown_file", str),
    ("size KiB", "size_bytes", lambda v: f"{v / 1024:,.1f}"), ("gzip KiB", "gzip_bytes", lambda v: f"{v / 1024:,.1f}"),
    ("accuracy %", "accuracy", lambda v: f"{v * 100:.2f}"), ("95% CI", "accuracy_low", None),
    ("change pts", "accuracy_change_pts", lambda v: f"{v:+.2f}"), ("McNemar p", "p_value", lambda v: f"{v:.3g}"),
    ("p50 ms 1t", "latency_median_ms_1t", lambda v: f"{v:.3f}"), ("p50 ms all", "latency_median_ms_all",
                                                                   lambda v: f"{v:.3f}"),
    ("speed vs float 1t", "speedup_1t", lambda v: f"{v:.2f}x"), ("Pareto", "_pareto", str),
    ("budget", "_budget", str), ("status", "_status", str),
)


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _inline(md: str) -> str:
    """One line of report.md's recommendation as HTML: escaped, then its `code` and **bold** (the only Markdown it
    uses); backslash escapes that runtime.text.markdown added are undone outside code (the text is escaped for
    HTML instead)."""
    parts = re.split(r"(`[^`]*`)", md)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) >= 2:
            out.append(f"<code>{_e(part[1:-1])}</code>")
            continue
        for i, piece in enumerate(re.split(r"(?<!\\)\*\*(.+?)(?<!\\)\*\*", part)):  # odd pieces: **bold**
            text = _e(re.sub(r"\\(.)", r"\1", piece))  # an escaped \* from outside stays a star
            out.append(f"<strong>{text}</strong>" if i % 2 else text)
    return "".join(out)


def _markdown_block(lines: list[str]) -> str:
    """report.md's recommendation lines (headings, paragraphs, '- ' lists, one fenced block) as HTML."""
    out, in_list, fence = [], False, None
    for line in lines:
        if fence is not None:
            if line == fence:
                out.append("</pre>")
                fence = None
            else:
                out.append(_e(line))
            continue
        if line.startswith("```"):
            fence = re.match(r"`+", line).group()
            out.append("<pre>")
            continue
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("## "):
            out.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    if in_list:
        out.append("</ul>")
    if fence is not None:
        out.append("</pre>")
    return "\n".join(out)


def _cell(row: dict, field: str, show) -> tuple[str, str]:
    """(shown text, sort value)."""
    if field == "accuracy_low":
        if row.get("accuracy_low") is None:
            return "-", ""
        return f"{row['accuracy_low'] * 100:.1f}-{row['accuracy_high'] * 100:.1f}", f"{row['accuracy_low']:.6f}"
    value = row.get(field)
    if value is None or value == "":
        return "-", ""
    if isinstance(value, float) and not math.isfinite(value):
        return "-", ""
    return show(value), (f"{value:.9g}" if isinstance(value, (int, float)) and not isinstance(value, bool)
                         else str(value))


def _table(rows: list[dict], root: Path) -> str:
    head = "".join(f"<th scope=col>{_e(h)}</th>" for h, _, _ in _COLUMNS)
    body = []
    for r in rows:
        shown = dict(r)
        shown["_shown_file"] = relative(r.get("file"), root) or "-"
        shown["_pareto"] = ", ".join(o.key.replace("latency_", "") for o in OBJECTIVES if r.get(f"pareto_{o.key}"))
        shown["_budget"] = "over" if r.get("over_budget") else ("within" if "over_budget" in r else "")
        shown["_status"] = "verified" if r["status"] == "verified" else f"failed: {r.get('reason')}"
        cells = []
        for _, field, show in _COLUMNS:
            text, value = _cell(shown, field, show)
            cells.append(f"<td data-v=\"{_e(value)}\">{_e(text)}</td>")
        cls = "over" if r.get("over_budget") else ("failed" if r["status"] != "verified" else "")
        body.append(f"<tr class=\"{cls}\">{''.join(cells)}</tr>")
    return (f"<table id=files><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>")


def _tooltip(r: dict, root: Path) -> str:
    lines = [label(r), relative(r.get("file"), root) or "",
             f"accuracy {r['accuracy']:.2%} (95% CI {r['accuracy_low']:.1%} to {r['accuracy_high']:.1%}, "
             f"{r['test_images']} images)"]
    lines.append(f"size {r['size_bytes'] / 1024:,.1f} KiB, gzip {r['gzip_bytes'] / 1024:,.1f} KiB")
    for tag, name in (("1t", "1 thread"), ("all", "all threads")):
        if r.get(f"latency_median_ms_{tag}") is not None:
            lines.append(f"latency at {name} {r[f'latency_median_ms_{tag}']:.3f} ms (95% CI "
                         f"{r[f'latency_low_ms_{tag}']:.3f} to {r[f'latency_high_ms_{tag}']:.3f})")
    if r.get("over_budget"):
        lines.append("over the accuracy budget")
    return "\n".join(lines)


def _with_tooltips(svg: str, rows: list[dict], root: Path) -> str:
    """A report figure's SVG (runtime.report.plots) with a <title> in every point's group: what hovering shows."""
    def titled(match) -> str:
        index = int(match.group(2))
        return match.group(1) + (f"<title>{_e(_tooltip(rows[index], root))}</title>" if index < len(rows) else "")

    return re.sub(r'(<g id="ekpt-[a-z0-9_]+-(\d+)">)', titled, svg)


def write_html(root: Path, info: dict, recommendation: list[str], header_rows: list[tuple[str, str]]) -> None:
    """report.html beside report.md, written atomically."""

    rows = info["rows"]
    plots = [f"<figure>{_with_tooltips(svg, rows, root)}</figure>" for svg in info.get("plots_svg", {}).values()]
    title = f"EdgeKit report: {info.get('model') or root.name} on {info.get('dataset') or '?'}"
    meta = "".join(f"<tr><th scope=row>{_e(k)}</th><td>{_inline(str(v))}</td></tr>" for k, v in header_rows)
    notes = "".join(f"<li>{_inline(n)}</li>" for n in info["notes"])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>{_e(title)}</title><style>{_STYLE}</style></head><body>
<h1>{_e(title)}</h1>
{_markdown_block(recommendation)}
<table class=meta>{meta}</table>
<h2>All files</h2>
<p>Click a column to sort by it; type to keep the rows that hold the text. Accuracy within the budget of
{_e(points_text(info['budget']))} below the float baseline; grey rows are over it.</p>
<input id=filter type=search placeholder="filter: int8, pruned, over..." aria-label="filter the table">
{_table(rows, root)}
<h2>Plots</h2>
<p>Hover a point for its file and figures; the legend under each figure names every colour, marker and line
(the same figures as the PNG files beside this page).</p>
<div class=plots>{''.join(plots)}</div>
<h2>Notes</h2><ul>{notes}</ul>
<script>{_SCRIPT}</script>
</body></html>
"""
    atomic_write_text(root / HTML_FILE, page)

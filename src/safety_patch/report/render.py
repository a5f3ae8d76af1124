"""The blocks written as report.md and report.html; :func:`write_report`, the report stage."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..atomic import write_text
from .claims import claims
from .document import blocks
from .figure import tradeoff_figure
from .read import RunData


def to_markdown(B: list[tuple], root: Path) -> str:
    out = []
    for b in B:
        if b[0] == "h1":
            out.append(f"# {b[1]}\n")
        elif b[0] == "h2":
            out.append(f"## {b[1]}\n")
        elif b[0] == "p":
            out.append(b[1] + "\n")
        elif b[0] == "table":
            _, head, rows = b
            out.append("| " + " | ".join(str(h).replace("|", "\\|") for h in head) + " |")
            out.append("|" + "---|" * len(head))
            out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
            out.append("")
        elif b[0] == "img":
            out.append(f"![{b[2]}]({Path(b[1]).relative_to(root)})\n")
    return "\n".join(out) + "\n"


def to_html(B: list[tuple]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>safety-patch report</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 6px;"
             "vertical-align:top}th{background:#f3f3f3}img{max-width:100%}</style></head><body>"]
    for b in B:
        if b[0] in ("h1", "h2"):
            parts.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "table":
            _, head, rows = b
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


REPORT_FILES = ("report.md", "report.html", "tradeoff.png")
"""What :func:`write_report` writes in a run folder (and removes before it reads anything)."""


def write_report(run: str | Path) -> dict:
    """Write report.md, report.html and tradeoff.png for a run folder; returns the claims.

    Fails closed: any results file that is not JSON, is edited, or lacks a field the report reads
    is one SafetyPatchError line, and the run's earlier report files are removed first, so a failed
    regeneration never leaves an older report looking current; the error line names the files it
    removed (a user's trial found them gone with no word of why)."""
    from ..errors import SafetyPatchError

    run = Path(run)
    removed = [name for name in REPORT_FILES if (run / name).is_file()]
    for name in REPORT_FILES:
        (run / name).unlink(missing_ok=True)
    said = (f"; the earlier {', '.join(removed)} {'was' if len(removed) == 1 else 'were'} removed, so that no "
            "stale report looks current") if removed else ""
    try:
        rd = RunData(run)
        tradeoff_figure(rd, run)
        B = blocks(rd)
        out = {"claims": claims(rd)}
    except (KeyError, TypeError, ValueError, IndexError) as e:
        # a results file without a field the report reads (written by other code, or edited); the figure
        # drawn before the failure goes too: nothing of a failed report is left looking current
        (run / "tradeoff.png").unlink(missing_ok=True)
        raise SafetyPatchError(f"{run}: a results file lacks or mistypes a field the report reads "
                               f"({type(e).__name__}: {e}); run that stage again (`reproduce` re-runs it){said}") from None
    except SafetyPatchError as e:
        (run / "tradeoff.png").unlink(missing_ok=True)
        if not said:
            raise
        raise SafetyPatchError(f"{e}{said}") from None
    except BaseException:
        (run / "tradeoff.png").unlink(missing_ok=True)
        raise
    write_text(run / "report.md", to_markdown(B, run))
    write_text(run / "report.html", to_html(B))
    return out

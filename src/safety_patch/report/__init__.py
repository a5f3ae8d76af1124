"""The reproduce report: a pure reader of a run folder's stage outputs -> report.md + report.html
(docs/reproduce.md). Every verdict is computed here from the numbers and intervals in the stage
outputs, by the rules printed next to it; nothing is written by hand. One module per concern,
in the order data flows:

* :mod:`.read`: the stage outputs read and checked (``RunData``): a file its stage did not
  record, that is not JSON, or whose figures contradict their counts is refused.
* :mod:`.numbers`: how the report writes figures (rates with n, means, ratios) and compares two
  95% intervals.
* :mod:`.claims`: the paper's claims, each with a verdict computed by the rule printed beside it.
* :mod:`.figure`: the trade-off figure (safety against capability drift and over-refusal).
* :mod:`.document`: the report as blocks (headings, paragraphs, tables, images).
* :mod:`.render`: the blocks as report.md and report.html; ``write_report``, the report stage.

Each module imports only modules above it in this list, so there is no import cycle.
``write_report`` is also importable from the package itself (``from safety_patch.report import
write_report``).
"""

from .render import write_report

__all__ = ["write_report"]

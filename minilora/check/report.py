"""A check's findings: one row per tensor (or per position), a verdict each, the table a person
reads and the JSON a CI job reads.

Verdicts, best to worst: ``exact`` (the stored value is the reference rounded correctly to the
file's dtype), ``round-off`` (within the bound the dtype explains), ``unresolvable`` (within the
bound, but so is the base without the adapter: the file cannot show whether it was merged) and
``WRONG`` (outside the bound; ``diagnosis`` says what fits instead, when something does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from minilora import io

EXACT, ROUND_OFF, UNRESOLVABLE, WRONG = "exact", "round-off", "unresolvable", "WRONG"
VERDICTS = (EXACT, ROUND_OFF, UNRESOLVABLE, WRONG)


@dataclass
class Row:
    """One tensor (merge check) or one position (logits check).

    max_abs: max |theirs - reference|; max_rel: that over max |reference|; of_bound: the largest
    |theirs - reference| / bound over the elements (<= 1 is within the bound).
    diagnosis: what the values fit instead, for a WRONG row ("" when nothing fits, or not WRONG);
    code: the same as a short name for programs ("merged-twice", "transposed-delta", ...);
    related: the other layer a diagnosis names (whose delta this one holds, or received).
    """

    name: str
    kind: str
    dtype: str | None
    verdict: str
    max_abs: float | None = None
    max_rel: float | None = None
    of_bound: float | None = None
    diagnosis: str = ""
    code: str = ""
    related: str = ""


@dataclass
class Report:
    """Every row of a check, in order, plus what the reader needs to read them."""

    mode: str  # "merge" or "logits"
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def wrong(self) -> list[Row]:
        return [row for row in self.rows if row.verdict == WRONG]

    @property
    def exit_code(self) -> int:
        """0: nothing is WRONG; 1: something is (2, a usage error, is the command line's)."""
        return 1 if self.wrong else 0

    def to_json(self) -> dict:
        counts = {v: sum(row.verdict == v for row in self.rows) for v in VERDICTS}
        return {"mode": self.mode, "ok": not self.wrong, "exit_code": self.exit_code,
                "counts": counts, "summary": self.summary, "notes": self.notes,
                "rows": [asdict(row) for row in self.rows]}

    def save_json(self, path) -> None:
        io.save_json(path, self.to_json())

    def table(self, rows: list[Row] | None = None, first: str = "tensor") -> str:
        """The rows as an aligned text table (all of them unless ``rows`` is given)."""
        head = (first, "dtype", "max abs err", "rel err", "of bound", "verdict", "diagnosis")
        lines = [head] + [(row.name, row.dtype or "-", _g(row.max_abs), _g(row.max_rel),
                           _g(row.of_bound), row.verdict, row.diagnosis)
                          for row in (self.rows if rows is None else rows)]
        widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
        cells = ["  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True))
                 + "  " + line[-1] for line in lines]
        return "".join(line.rstrip() + "\n" for line in cells)


    def render(self, every_row: bool = False) -> str:
        """What ``minilora check`` prints: the rows worth reading (all with ``every_row``), a line
        for the rest, the notes and the verdict."""
        if every_row:
            shown = self.rows
        elif self.mode == "merge":
            shown = [r for r in self.rows if r.kind == "adapted" or r.verdict != EXACT]
        else:
            shown = self.wrong[:20] or sorted(self.rows, key=lambda r: -r.of_bound)[:5]
        text = self.table(shown, "tensor" if self.mode == "merge" else "batch,position")
        rest = len(self.rows) - len(shown)
        if rest and self.mode == "merge":
            text += f"... and {rest} other tensors, each exact (as the base holds it)\n"
        elif rest:
            worst = max(self.rows, key=lambda r: r.of_bound)
            text += (f"... {rest} more positions (--all shows them); worst relative error "
                     f"{worst.max_rel:.3g} at {worst.name}, tolerance "
                     f"{self.summary['tolerance']:.3g} ({self.summary['computed_in']})\n")
        text += "".join(f"note: {n}\n" for n in self.notes)
        counts = ", ".join(f"{sum(r.verdict == v for r in self.rows)} {v}" for v in VERDICTS
                           if any(r.verdict == v for r in self.rows))
        what = "tensors" if self.mode == "merge" else "positions"
        return text + (f"verdict: WRONG ({counts} {what})\n" if self.wrong
                       else f"verdict: OK, nothing is WRONG ({counts} {what})\n")


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"

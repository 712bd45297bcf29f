"""The one error type users see: a short paragraph that names the problem and the fix."""

from __future__ import annotations

import difflib
import textwrap


class NbalignError(Exception):
    """A user-facing error. Magics print its message without a traceback; the API raises it as is."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.strip()
        self.fix = fix.strip() if fix else None
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return self.problem if not self.fix else f"{self.problem} Fix: {self.fix}"

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing a traceback wall: the user gets one paragraph.
        return ["\x1b[31mnbalign:\x1b[0m " + textwrap.fill(self.message, 100, subsequent_indent="  ")]


def nearest(name: str, valid, n: int = 1) -> str | None:
    """The closest valid spelling of `name`, if any is close enough to be a likely typo."""
    hits = difflib.get_close_matches(name, sorted(valid), n=n, cutoff=0.6)
    if not hits:
        # Also match by substring, e.g. "lr" -> "learning_rate" is not a typo but "rate" -> "learning_rate" is.
        hits = [v for v in sorted(valid) if name and (name in v or v in name)][:n]
    return hits[0] if hits else None


def unknown_option(name: str, valid, where: str) -> NbalignError:
    guess = nearest(name, valid)
    fix = f"did you mean '{guess}'?" if guess else f"see the valid options with `{where} --help`."
    return NbalignError(f"'{name}' is not an option of {where}.", fix)

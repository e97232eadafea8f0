"""Writes the shipped calibration and held-out texts that come from CPython's own files.

Run by hand (Python 3.11; the files are committed, nothing runs this at install or run time):

    .venv/bin/python launch/data/assemble.py

Technical documentation: `pydoc_data.topics` (the reference and library chapters `help()` shows),
calibration on one set of topics. Source code: standard-library modules, calibration on some,
one other module held out. Technical manual (held out): the IDLE user manual, idlelib/help.html,
as plain text. All of it is CPython's, under the PSF licence (see README.md).
"""

from __future__ import annotations

import html.parser
import re
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])

# Calibration topics: statements, expressions, built-in types, the execution model. Held out from
# these on purpose: 'debugger' and 'formatstrings' (none of the chosen topics contain their text).
CALIBRATION_TOPICS = ("execmodel", "naming", "exceptions", "import", "assignment", "comparisons", "calls",
                      "typesmapping", "try", "raise", "with")
CALIBRATION_MODULES = ("textwrap.py", "shlex.py", "fractions.py", "graphlib.py", "queue.py", "fnmatch.py")
HELDOUT_MODULE = "calendar.py"


class _BodyText(html.parser.HTMLParser):
    """The text of a Sphinx page's main body: headings and paragraphs on lines of their own."""

    BLOCKS = {"p", "h1", "h2", "h3", "h4", "li", "dt", "dd", "pre", "div", "section", "tr"}

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 inside <div role="main">
        self.parts: list[str] = []
        self.in_pre = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth == 0 and tag == "div" and attrs.get("role") == "main":
            self.depth = 1
            return
        if self.depth:
            if tag == "div":
                self.depth += 1
            if tag in self.BLOCKS:
                self.parts.append("\n")
            self.in_pre |= tag == "pre"

    def handle_endtag(self, tag):
        if not self.depth:
            return
        if tag == "div":
            self.depth -= 1
        if tag == "pre":
            self.in_pre = False
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.depth:
            if self.in_pre:
                self.parts.append(data)
            else:  # runs of white space as one space, kept at the edges (between inline tags)
                self.parts.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.strip() if not line.startswith("    ") else line.rstrip()
                 for line in "".join(self.parts).replace("\u00b6", "").splitlines()]
        out, blank = [], False
        for line in lines:
            if line:
                out.append(line)
                blank = False
            elif not blank:
                out.append("")
                blank = True
        return "\n".join(out).strip() + "\n"


def docs_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in CALIBRATION_TOPICS) + "\n"


def code_text(modules) -> str:
    return "\n\n".join((STDLIB / m).read_text(encoding="utf-8").rstrip() for m in modules) + "\n"


def idle_manual_text() -> str:
    parser = _BodyText()
    parser.feed((STDLIB / "idlelib" / "help.html").read_text(encoding="utf-8"))
    return parser.text()


def main() -> int:
    if sys.version_info[:2] != (3, 11):
        print(f"warning: the shipped files were made with Python 3.11, this is {sys.version.split()[0]}")
    files = {"calibration_python_docs.txt": docs_text(),
             "calibration_python_code.txt": code_text(CALIBRATION_MODULES),
             "heldout_python_calendar_py.txt": code_text([HELDOUT_MODULE]),
             "heldout_idle_manual.txt": idle_manual_text()}
    for name, text in files.items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"{name}: {len(text)} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())

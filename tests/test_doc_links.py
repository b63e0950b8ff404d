"""Every relative link of the documentation resolves, and the README stays a short index.

Checked files: README.md, docs/*.md, results/**/README.md, BENCHMARKS.md, CONTRIBUTING.md,
data/README.md. A markdown link or image `[text](target)` outside code is checked when its target
is relative (http(s) and mailto are skipped): the path must exist relative to the file's folder,
and a `#anchor` into a .md file (or into the file itself) must name one of its headings by
GitHub's slug rule (lowercase, punctuation other than '-' and '_' dropped, spaces to '-', '-1',
'-2', ... for repeats). Also: README.md has at most 260 lines and links every docs/*.md page.
"""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MAX_README_LINES = 260  # issue 29: a README read in five minutes (~250 lines)

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)  # fenced code blocks
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)  # `code`, ``code``
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=[\"']([^\"']+)[\"']", re.I)
EXTERNAL = ("http://", "https://", "mailto:")


def doc_files() -> list[str]:
    names = ["README.md", "BENCHMARKS.md", "CONTRIBUTING.md", "data/README.md"]
    found = [os.path.join(ROOT, n) for n in names]
    found += sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    found += sorted(glob.glob(os.path.join(ROOT, "results", "**", "README.md"), recursive=True))
    return [f for f in found if os.path.isfile(f)]


def strip_code(text: str) -> str:
    """Text without fenced blocks and code spans, whose brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: "Speed/quality (SPEC 7)" -> "speedquality-spec-7"."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_'
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen: dict[str, int] = {}
    out = set(HTML_ANCHOR.findall(text))
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return LINK.findall(strip_code(f.read()))


def broken_links(path: str) -> list[str]:
    """Each relative link of `path` that does not resolve, with the reason."""
    problems = []
    for target in links(path):
        if target.lower().startswith(EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        dest = path  # "#anchor" alone: a heading of this file
        if file_part:
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        if not os.path.exists(dest):
            problems.append(f"{target}: {os.path.relpath(dest, ROOT)} does not exist")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor}")
    return problems


def test_slug_rule():
    assert github_slug("Speed/quality frontier at small scale (SPEC section 7)") == (
        "speedquality-frontier-at-small-scale-spec-section-7"
    )
    assert github_slug("GPU check (prepared; not run yet)") == "gpu-check-prepared-not-run-yet"
    assert github_slug("Add a `reward`, step_2") == "add-a-reward-step_2"
    assert github_slug("Sorting: the cliff again") == "sorting-the-cliff-again"


def test_link_parsing_skips_code():
    text = 'see [a](x.md) and `[b](y.md)`\n```\n[c](z.md)\n```\n![img](p.png "title")'
    assert LINK.findall(strip_code(text)) == ["x.md", "p.png"]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        num_lines = len(f.read().splitlines())
    assert num_lines <= MAX_README_LINES, f"README.md has {num_lines} lines; move detail to docs/"


def test_readme_lists_every_docs_page():
    linked = {os.path.normpath(t.partition("#")[0]) for t in links(README)}
    pages = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    assert pages, "docs/ has no pages"
    missing = [os.path.relpath(p, ROOT) for p in pages if os.path.relpath(p, ROOT) not in linked]
    assert missing == [], f"docs pages not linked from README.md: {missing}"

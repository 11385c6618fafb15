"""Every relative link in the README and docs/ resolves: the file exists and, with a ``#fragment``, the
page has a heading with that anchor (GitHub's rule: lower case, punctuation but ``-`` and ``_`` dropped,
spaces as ``-``, repeated headings numbered)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(md: str) -> set:
    out, seen = set(), {}
    text = re.sub(r"```.*?```", "", md, flags=re.S)  # headings inside code blocks are not headings
    for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(md: str) -> list:
    text = re.sub(r"```.*?```", "", md, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_there_are_docs():
    assert len(PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    bad = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked (no network)
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{target}: no heading with that anchor")
    assert not bad, bad


def test_anchor_rule():
    assert anchors("# Sharded runs (torch.distributed)\n## A\n## A\n") == {"sharded-runs-torchdistributed", "a", "a-1"}

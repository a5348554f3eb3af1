"""The README is a front door (STYLE.md #14): short, the two first commands near the top,
every link leading somewhere inside the repository. Holds README.md and docs/*.md."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 120
FIRST_COMMANDS_WITHIN = 40

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+).+?\1", re.S)
COMMENT = re.compile(r"<!--.*?-->", re.S)
# [text](target "title"), ![alt](target), [label]: target, <a href="target">, <img src="target">
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.I)
AUTOLINK = re.compile(r"<((?:https?|ftp)://[^>\s]+)>", re.I)
BARE_URL = re.compile(r"(?<![\w/])(?:https?://|www\.)\S+", re.I)


def prose(text: str) -> str:
    """The text a reader sees as prose: no code blocks, code spans or HTML comments, which
    may hold example URLs (`RAY_ADDRESS=http://head:8265`) that are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", COMMENT.sub("", text)))


def links(text: str) -> list[str]:
    body = prose(text)
    found = [m.group(1) for rx in (INLINE_LINK, REFERENCE_LINK, HTML_LINK, AUTOLINK) for m in rx.finditer(body)]
    stripped = body
    for rx in (INLINE_LINK, REFERENCE_LINK, HTML_LINK, AUTOLINK):
        stripped = rx.sub("", stripped)
    return found + BARE_URL.findall(stripped)


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_link_finder_sees_every_kind_of_link_and_skips_code():
    text = ("[a](docs/a.md) ![i](img.png \"t\") <a href=\"x/y\">y</a> <https://e.org>\n"
            "[ref]: ../b.md\nsee www.example.org and `http://in-code` here\n"
            "```bash\nexport RAY_ADDRESS=http://head:8265\n```\n<!-- [c](gone.md) -->\n")
    assert sorted(links(text)) == sorted(["docs/a.md", "img.png", "x/y", "https://e.org", "../b.md",
                                          "www.example.org"])


def test_readme_is_at_most_120_lines():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail to a page in docs/ (at most {MAX_README_LINES})"


def test_readme_shows_make_sweep_and_make_test_first():
    head = README.read_text().splitlines()[:FIRST_COMMANDS_WITHIN]
    for command in ("make sweep", "make test"):
        assert any(line.strip().startswith(command) for line in head), (
            f"README.md: no line starting with `{command}` in its first {FIRST_COMMANDS_WITHIN} lines")


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_stay_inside_the_repository(page):
    outside = [t for t in links(page.read_text()) if re.match(r"(?i)([a-z][a-z0-9+.-]*:|//|www\.)", t)]
    assert not outside, f"{rel(page)} links outside the repository (name it in plain text instead): {outside}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_lead_to_files_that_exist(page):
    broken = []
    for target in links(page.read_text()):
        if re.match(r"(?i)([a-z][a-z0-9+.-]*:|//|www\.)", target):
            continue  # the test above reports it
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not path:
            continue  # an anchor on the same page
        resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
        if not resolved.resolve().exists() or ROOT not in [resolved.resolve(), *resolved.resolve().parents]:
            broken.append(target)
    assert not broken, f"{rel(page)} links to paths that do not exist in the repository: {broken}"


@pytest.mark.parametrize("page", PAGES[1:], ids=rel)
def test_every_docs_page_has_a_title_and_a_link_back_to_the_readme(page):
    lines = page.read_text().splitlines()
    assert lines and lines[0].startswith("# "), f"{rel(page)}: the first line is not a one-line title"
    assert any("](../README.md)" in line for line in lines[1:4]), f"{rel(page)}: no link back to ../README.md at the top"

"""The README and `docs/` say what is true of the repository: the README stays short and opens with the two
commands, every link between the pages reaches a file (and a heading, where it names one), and every repository
file a guide names exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 350
TWO_COMMANDS = '```bash\npip install -e . && wemoe-demo\npip install -e ".[test]" && pytest\n```'
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {heading_anchor(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def test_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    first_block = text[text.index("```") :].split("```", 2)
    assert "```" + first_block[1] + "```" == TWO_COMMANDS


def test_readme_links_every_page_of_the_docs():
    linked = {(README.parent / target).resolve() for target in LINK.findall(README.read_text())}
    assert {page.resolve() for page in DOCS} <= {path.with_name(path.name.split("#")[0]) for path in linked}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: page.name)
def test_links_reach_their_files_and_headings(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert broken == []


def test_the_backbone_guide_names_only_files_that_exist():
    guide = (ROOT / "docs" / "adding-a-backbone.md").read_text()
    named = set(re.findall(r"`((?:conversion|modeling_wemoe|tests|docs)/[\w/.-]+\.(?:py|md))`", guide))
    named |= {target.removeprefix("../") for target in LINK.findall(guide) if target.startswith("../")}
    assert len(named) >= 8  # BERT's two files, the interface, the package init, the tests
    assert [path for path in sorted(named) if not (ROOT / path).exists()] == []

"""README is read by someone who has only the repository: it points at nothing outside it."""
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
LINK = re.compile(r"\]\(([^)\s]+)[^)]*\)")  # [text](target "title")


def test_readme_names_no_path_outside_the_repository():
    assert "../" not in (ROOT / "README.md").read_text()


def test_readme_links_resolve_inside_the_repository():
    bad = []
    for target in LINK.findall((ROOT / "README.md").read_text()):
        if target.startswith(("http://", "https://", "#")):
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT.resolve()) or not path.exists():
            bad.append(target)
    assert not bad, f"README links to what is not in the repository: {bad}"

"""The docs site (mkdocs.yml, docs/) builds with --strict, and the README stays a short door into it. No Spark."""

import os
import re
import subprocess
import sys

import yaml

from conftest import REPO

README_MAX_LINES = 200
# a markdown link or image target: [text](target) / ![alt](target), the target up to a space or ')'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _mkdocs_yml() -> dict:
    """mkdocs.yml as data; its YAML tags (`!relative`, `!ENV`, ...) read as None, the nav is all this needs."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load((REPO / "mkdocs.yml").read_text(), Loader=Loader)


def _nav_files(entries) -> list[str]:
    """Every page a nav names: entries are 'page.md', {title: 'page.md'} or {title: [more entries]}."""
    found = []
    for entry in entries:
        if isinstance(entry, str):
            found.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                found.extend(_nav_files(value) if isinstance(value, list) else [value])
    return found


def test_mkdocs_build_strict_passes(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs): broken links or anchors, pages outside the nav and
    docstrings mkdocstrings cannot render are warnings, which --strict turns into a failure."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (f"mkdocs build --strict exited {proc.returncode} (the docs extra: "
                                  f"pip install -e '.[docs]'):\n{output}")
    assert (tmp_path / "site" / "index.html").is_file(), output


def test_readme_is_a_short_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move the "
                                            f"reference into a page under docs/ and link it")


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = _nav_files(_mkdocs_yml()["nav"])
    pages = sorted(p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md"))
    assert pages, "no pages under docs/"
    missing_from_nav = sorted(set(pages) - set(nav))
    assert not missing_from_nav, f"pages under docs/ that mkdocs.yml's nav does not list: {missing_from_nav}"
    dangling = [entry for entry in nav if not (REPO / "docs" / entry).is_file()]
    assert not dangling, f"nav entries in mkdocs.yml without a file under docs/: {dangling}"
    assert len(nav) == len(set(nav)), f"a page is listed twice in the nav: {nav}"


def test_every_relative_link_in_the_readme_points_at_an_existing_file():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    docs_links = [t for t in targets if t.startswith("docs/")]
    assert docs_links, "README.md links to no page under docs/"
    broken = sorted({t for t in targets if not (REPO / t.split("#", 1)[0]).is_file()})
    assert not broken, f"README.md links to files that do not exist: {broken}"

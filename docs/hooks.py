"""MkDocs hooks: the home page is README.md; benchmarks/results/ is served with the site.

A page links `../benchmarks/results/X` (the path that also works on GitHub, from docs/); this hook adds each
file to the build under that source path and copies it to `benchmarks/results/X` in the site, so the link
resolves and `mkdocs build --strict` checks it like any other.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

RESULTS = "benchmarks/results"


class _ResultFile(File):
    """A results file copied as it is, .md included (a results table is a record, not a page of the site)."""

    def is_documentation_page(self) -> bool:
        return False


def on_files(files, config):
    root = Path(config["config_file_path"]).parent
    for path in sorted((root / RESULTS).iterdir()):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        file = _ResultFile(f"../{rel}", src_dir=config["docs_dir"], dest_dir=config["site_dir"],
                           use_directory_urls=config["use_directory_urls"])
        file.abs_src_path = str(path)
        file.dest_uri = rel
        file.inclusion = InclusionLevel.INCLUDED
        files.append(file)
    return files


def on_page_markdown(markdown, page, config, files):
    """The home page is README.md, its links into docs/ made relative to the site (one text, no copy to drift)."""
    if page.file.src_uri != "index.md":
        return markdown
    readme = (Path(config["config_file_path"]).parent / "README.md").read_text(encoding="utf-8")
    return readme.replace("](docs/index.md)", "](index.md)").replace("](docs/", "](")

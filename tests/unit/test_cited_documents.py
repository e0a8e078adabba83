"""Documents the tests cite (in comments and docstrings) exist in the repository: a reader
sent to a document or to a README section must find it in this repository."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("tests", "lab")
DOCUMENT = re.compile(r"(?<![\w./-])([\w./-]*[\w-]\.md)\b")
README_SECTION = re.compile(r"README(?:\.md)?(?:'s)? \"([^\"]+)\"")


def prose(source: str) -> list[str]:
    """The comments and docstrings of a Python source (string literals in code are data)."""
    texts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            texts.append(ast.get_docstring(node) or "")
    return texts


def citations(root: Path) -> list[tuple[str, str, str]]:
    """(file, kind, cited) for every document or README section named in the prose."""
    found = []
    for directory in SCANNED:
        for path in sorted((root / directory).rglob("*.py")):
            for text in prose(path.read_text()):
                where = str(path.relative_to(root))
                found += [(where, "document", m) for m in DOCUMENT.findall(text)]
                found += [(where, "README section", m) for m in README_SECTION.findall(text)]
    return found


def missing(root: Path) -> list[tuple[str, str, str]]:
    names = {p.name for p in root.rglob("*.md") if ".venv" not in p.parts}
    headings = {line.lstrip("#").strip() for line in (root / "README.md").read_text()
                .splitlines() if line.startswith("#")}
    gone = []
    for where, kind, cited in citations(root):
        exists = (cited in headings if kind == "README section"
                  else (root / cited).is_file() if "/" in cited else cited in names)
        if not exists:
            gone.append((where, kind, cited))
    return gone


def test_every_cited_document_and_readme_section_exists():
    assert citations(REPO), "the scan found no citation at all: it is blind"
    assert missing(REPO) == []


def test_a_citation_of_a_document_outside_the_repository_is_found(tmp_path):
    (tmp_path / "README.md").write_text("# x\n\n## Security\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "here.md").write_text("")
    (tmp_path / "lab").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        '"""As DESIGN.md says, and docs/here.md, and docs/gone.md."""\n'
        '# README.md\'s "Security" and README\'s "Layout"\n'
        'NAME = "data.md"   # a literal in code is no citation\n')
    assert sorted(missing(tmp_path)) == [("tests/test_x.py", "README section", "Layout"),
                                         ("tests/test_x.py", "document", "DESIGN.md"),
                                         ("tests/test_x.py", "document", "docs/gone.md")]

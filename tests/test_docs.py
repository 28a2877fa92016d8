"""The docs: mkdocs builds them strictly (no broken link or anchor, every page in the nav), and every
`bbt ...` command in a shell block of the README or a docs page is one bbt's own parser accepts."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bbt import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SHELL_FENCES = {"sh", "bash", "shell", "console"}
# what separates commands on one shell line
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
REDIRECTIONS = {"<", ">", ">>", ">|", "&>", ">&", "<&"}
# words that may stand before a command without being it
PREFIXES = {"do", "then", "else", "time", "exec", "nohup", "!"}


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def _nav_pages(nav) -> list[str]:
    """The page paths of mkdocs.yml's nav, nested sections included."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


# --- the build --------------------------------------------------------------------------------


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"
    assert config.get("strict") is True
    # broken anchors fail the strict build too, not only broken links
    assert config["validation"]["anchors"] == "warn"


def test_docs_build_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[test]')")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("quickstart", "concepts", "data", "tuning", "ensembles", "gradient-baselines", "budgets",
                 "runs", "serving", "vllm", "models", "python-api", "sweeps", "design", "benchmarks"):
        assert (site / page / "index.html").is_file(), page
    results = sorted(p.stem for p in (DOCS / "results").glob("*.md") if p.stem != "index")
    assert results and all(re.fullmatch(r"\d{4}-\d{2}-\d{2}-[a-z0-9-]+", name) for name in results), \
        "results pages are named by date: YYYY-MM-DD-topic.md"
    assert (site / "results" / "index.html").is_file()
    for name in results:
        assert (site / "results" / name / "index.html").is_file(), name


def test_the_readme_stays_short_and_points_into_the_docs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / target).is_file(), target


def test_the_documented_defaults_are_the_codes():
    from bbt.budget import Budget
    from bbt.config import TuneConfig

    d = TuneConfig()
    models = (DOCS / "models.md").read_text(encoding="utf-8")
    assert f"Without `--model`, `bbt tune` and `bbt sweep` tune `{d.model}`;" in models
    tuning = " ".join((DOCS / "tuning.md").read_text(encoding="utf-8").split())
    assert f"| `--model NAME\\|DIR` | `{d.model}` |" in tuning
    for row in (f"| `--intrinsic-dim D` | {d.intrinsic_dim} |", f"| `--popsize N` | {d.popsize} |",
                f"| `--seed S` | {d.seed} |", f"| `--k-shot K` | {d.k_shot} |"):
        assert row in tuning, row
    budgets = (DOCS / "budgets.md").read_text(encoding="utf-8")
    assert f"(default {Budget().queries})" in budgets and f"The default of {Budget().queries} queries" in budgets


# --- the commands -----------------------------------------------------------------------------


def _shell_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the opening fence, text) of each fenced shell block of a markdown file."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w-]*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence.group(1))), len(lines))
        if fence.group(2).lower() in SHELL_FENCES:
            blocks.append((i + 1, "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def _commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block, as argument lists: continuation lines joined, comments
    dropped, split at `&&`, `;`, `|` and the like, leading `VAR=value` and `do`/`then` left out."""
    commands = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        if line.lstrip().startswith("$ "):  # a console prompt
            line = line.lstrip()[2:]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        redirect = False
        for token in lexer:
            if redirect:  # the file of `< FILE` or `> FILE`: not an argument
                redirect = False
            elif token in REDIRECTIONS:
                redirect = True
            elif token in SEPARATORS:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    out = []
    for words in commands:
        while words and (words[0] in PREFIXES or re.fullmatch(r"[A-Za-z_]\w*=.*", words[0])):
            words = words[1:]
        if words:
            out.append(words)
    return out


def _fill_placeholders(args: list[str]) -> list[str]:
    """`...` (the options shown before) dropped; `$VAR` and `${VAR}` stand for a value: 1."""
    return [re.sub(r"\$\{?\w+\}?", "1", a) for a in args if a not in ("...", "…")]


class _Parsed(Exception):
    """Raised in place of running `bbt sweep report` once its arguments are parsed."""


def _parse(args: list[str], monkeypatch) -> str | None:
    """None when bbt's parser accepts the arguments of a `bbt` command line, else what it said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if args[:2] == ["sweep", "report"]:
                # its parser is built inside the command: stop the command right after parsing
                from bbt import sweeps

                with monkeypatch.context() as m:
                    m.setattr(sweeps, "load_spec", lambda *a, **k: (_ for _ in ()).throw(_Parsed()))
                    cli.cmd_sweep_report(args[2:])
            else:
                ns = cli.build_parser().parse_args(args)
                if ns.command is None:
                    return "no command"
    except _Parsed:
        return None
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip() or f"exit {exc.code}"
    return None


def _documented_bbt_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in _pages():
        for line, block in _shell_blocks(page):
            for words in _commands(block):
                if words[0] == "bbt":
                    found.append((f"{page.relative_to(REPO)}:{line}", words))
    return found


def _inline_bbt_commands() -> list[tuple[str, list[str]]]:
    """Whole `bbt ...` commands written inline in the prose (the results pages' commands are): code
    spans that start with a bbt command and give it at least three arguments; shorter spans name an
    option or a command rather than show one."""
    found = []
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        prose = re.sub(r"^(```|~~~).*?^\1", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
        for match in re.finditer(r"`(bbt (?:tune|evaluate|predict|export|sweep|watch|serve|demo)\b[^`]*)`", prose):
            words = shlex.split(" ".join(match.group(1).split()))
            if len(words) >= 5:
                line = prose.count("\n", 0, match.start()) + 1
                found.append((f"{page.relative_to(REPO)}:{line}", words))
    return found


def test_the_docs_show_bbt_commands_of_every_kind():
    kinds = {words[1] for _, words in _documented_bbt_commands() if len(words) > 1}
    assert {"tune", "evaluate", "predict", "export", "sweep", "watch", "serve", "demo"} <= kinds


def test_every_documented_bbt_command_parses(monkeypatch):
    failures = []
    for where, words in _documented_bbt_commands():
        problem = _parse(_fill_placeholders(words[1:]), monkeypatch)
        if problem is not None:
            failures.append(f"{where}: {shlex.join(words)}\n    {problem}")
    assert not failures, "documented commands that bbt's parser refuses:\n" + "\n".join(failures)


def test_every_bbt_command_in_the_prose_parses(monkeypatch):
    found = _inline_bbt_commands()
    assert len(found) >= 20  # the results pages name the command of every figure
    failures = []
    for where, words in found:
        # in prose an upper-case word stands for a value the reader picks: `--seed S`, `--out RUN`
        args = [re.sub(r"^[A-Z][A-Z0-9_]*$", "1", a) for a in _fill_placeholders(words[1:])]
        problem = _parse(args, monkeypatch)
        if problem is not None:
            failures.append(f"{where}: {shlex.join(words)}\n    {problem}")
    assert not failures, "commands in the docs' prose that bbt's parser refuses:\n" + "\n".join(failures)


def test_the_command_finder_reads_shell_as_a_shell_would():
    block = ("export BBT_API_KEY=$(head -1 keys.txt)   # a comment\n"
             "for s in 1 2; do bbt tune --seed 42 --search-seed $s \\\n    --out runs/s$s; done\n"
             "X=1 bbt watch runs/a && bbt evaluate --run runs/a   # bbt predict --run not-a-command\n"
             "bbt tune --model smollm2 ...\n"
             "bbt predict runs/a - < texts.txt > labels.jsonl\n")
    bbt = [w for w in _commands(block) if w[0] == "bbt"]
    assert bbt == [["bbt", "tune", "--seed", "42", "--search-seed", "$s", "--out", "runs/s$s"],
                   ["bbt", "watch", "runs/a"], ["bbt", "evaluate", "--run", "runs/a"],
                   ["bbt", "tune", "--model", "smollm2", "..."], ["bbt", "predict", "runs/a", "-"]]
    assert _fill_placeholders(bbt[0][1:]) == ["tune", "--seed", "42", "--search-seed", "1", "--out", "runs/s1"]
    assert _fill_placeholders(bbt[3][1:]) == ["tune", "--model", "smollm2"]


def test_a_command_bbt_refuses_is_caught(monkeypatch):
    assert _parse(["tune", "--budget", "lots"], monkeypatch) is not None
    assert _parse(["tune", "--no-such-option"], monkeypatch) is not None
    assert _parse(["sweep", "report"], monkeypatch) is not None  # its folder is required
    assert _parse(["sweep", "report", "runs/S", "--csv", "runs/S.csv"], monkeypatch) is None
    assert _parse(["tune", "--data", "d", "--out", "o", "--budget", "none", "--max-cost", "1"], monkeypatch) is None

"""The docs cannot drift: every command in the shell blocks of README.md and docs/*.md, and every link
between the pages, is checked in this process against the real parsers and files.

A command is one that runs `python dtrain/train.py`, `dtrain ...` or `accelerate launch ... dtrain/train.py`
(plus `sbatch launch/...` and `make TARGET`). Training flags go through `parse_config`; `dtrain launch` and
`dtrain slurm` run their own parsers and checks in CPU dry-run mode (so a launch profile passes `preflight`
as a CPU rehearsal would); `accelerate launch` flags go through Accelerate's `launch_command_parser()`;
`dtrain export`, `dtrain prepare`, `dtrain plot` and `dtrain plot-lr` through theirs. Files of the project
a command names must exist.
Placeholders for the user's own files start with `my_` (they stand in as empty files and directories; a
`--config my_recipe.yaml` is left out); a command that must be refused ends with `# fails` and is checked to be refused.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHIPPED = ("dtrain/", "accelerate_configs/", "ds_configs/", "launch/", "bench/", "tests/", "docs/")
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass
class Command:
    where: str  # file:line
    words: list[str]
    env: dict[str, str]
    fails: bool


def shell_commands(path: Path) -> list[Command]:
    """The commands of the ```bash (sh, shell) blocks: continuation lines joined, comments dropped,
    `a && b` split, leading VAR=value assignments taken as the environment."""
    commands, lang, pending, start = [], None, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(line.strip())
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        if lang not in ("bash", "sh", "shell"):
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = pending + line, ""
        fails = re.search(r"#\s*fails\b", text) is not None
        parts: list[list[str]] = [[]]
        for word in shlex.split(text, comments=True):
            if word in ("&&", "||", ";"):
                parts.append([])
            else:
                parts[-1].append(word)
        for words in parts:
            env = {}
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words:
                commands.append(Command(f"{path.relative_to(REPO)}:{start}", words, env, fails))
    return commands


def placeholder(word: str) -> bool:
    parts = Path(word).parts
    return any(p.startswith("my_") for p in parts) or "..." in word or "<" in word or "$" in word


STAND_IN_ROOT: list[Path] = []  # where the user's files stand in (set by problems_in)


def stand_ins(args: list[str]) -> list[str]:
    """The flags with the user's own files standing in under STAND_IN_ROOT, as the schema checks them: a
    file (a name with a suffix) is empty, a directory holds an empty config.json (a model directory to the
    schema; a checkpoint or prepared directory is any directory). A placeholder recipe is left out: its
    contents are the user's."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args) and placeholder(args[i + 1]):
            i += 2
            continue
        word = args[i]
        if placeholder(word) and not word.startswith("-"):
            stand_in = STAND_IN_ROOT[0] / word.strip("/")
            if stand_in.suffix:
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                stand_in.touch()
            else:
                stand_in.mkdir(parents=True, exist_ok=True)
                (stand_in / "config.json").write_text("{}")
            word = str(stand_in)
        out.append(word)
        i += 1
    return out


def missing_files(words: list[str]) -> list[str]:
    values = [v for w in words for v in w.split("=", 1)[-1].split()]
    return [w for w in values if w.startswith(SHIPPED) and not placeholder(w) and not (REPO / w).exists()]


def _train_flags(args: list[str]):
    from dtrain.config import parse_config

    try:
        return parse_config(stand_ins(args))
    except SystemExit as done:  # --print_config prints the config and exits 0
        if done.code:
            raise
        return None


def _check_dtrain(args: list[str]) -> None:
    command, rest = args[0], args[1:]
    if command == "train":
        _train_flags(rest)
    elif command in ("launch", "slurm"):
        import dtrain.launch
        import dtrain.slurm

        module = dtrain.launch if command == "launch" else dtrain.slurm
        parsed, train_args = module.parse_args(rest)
        parsed.dry_run = True  # every check, nothing started
        if command == "launch":
            parsed.cpu = True  # the profile's pre-flight as a CPU rehearsal
            run = dtrain.launch.launch
        else:
            if parsed.recipe and placeholder(parsed.recipe):
                parsed.recipe = None
            run = dtrain.slurm.submit
        run(parsed, stand_ins(train_args))
    elif command == "export":
        from dtrain.export import build_parser

        build_parser().parse_args(rest)
    elif command == "plan":
        from dtrain.plan import split_plan_args

        _, flags = split_plan_args(rest)
        _train_flags(flags)
    elif command == "prepare":
        from dtrain.config import UserError
        from dtrain.data.prepare import split_prepare_args

        out, _, flags = split_prepare_args(rest)
        if out is None:
            raise UserError("dtrain prepare: no OUT_DIR")
        _train_flags(flags)
    elif command == "plot":
        from dtrain.plots import build_parser as plot_parser

        plot_parser().parse_args(rest)
    elif command == "plot-lr":
        from dtrain.plots import lr_steps, split_plot_lr_args

        own, flags = split_plot_lr_args(rest)
        cfg = _train_flags(flags)
        if cfg is not None:
            lr_steps(own.steps, cfg.train.max_steps)
    else:
        from dtrain.cli import USAGE

        assert re.search(rf"^\s+{re.escape(command)}\s", USAGE, re.M), f"unknown command dtrain {command}"


def _check_accelerate(args: list[str]) -> None:
    from accelerate.commands.launch import launch_command_parser

    from dtrain.config import UserError
    from dtrain.launch import load_profile, preflight

    ns = launch_command_parser().parse_args(args)
    assert ns.training_script == "dtrain/train.py", ns.training_script
    cfg = _train_flags(ns.training_script_args)
    if ns.config_file:
        profile = load_profile(ns.config_file)
        nodes = ns.num_machines or 1
        problems = preflight(profile, cfg, (ns.num_processes or nodes) // nodes, True, 0, False, nodes)
        if problems:
            raise UserError("; ".join(problems))


def _check_sbatch(words: list[str], env: dict[str, str]) -> None:
    from dtrain.launch import load_profile

    scripts = [w for w in words if w.endswith(".sbatch")]
    assert scripts, "sbatch without a launch/slurm script"
    if "PROFILE" in env:
        load_profile(env["PROFILE"])
    if "TRAIN_ARGS" in env:
        _train_flags(shlex.split(env["TRAIN_ARGS"]))


def _check_make(words: list[str]) -> None:
    targets = re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M)
    for target in (w for w in words[1:] if "=" not in w and not w.startswith("-")):
        assert target in targets, f"make {target}: no such target"


def check(cmd: Command) -> str | None:
    """What is wrong with one command, or None. None too for a command dtrain does not own."""
    from dtrain.config import UserError

    words, fails = cmd.words, cmd.fails
    train = words.index("dtrain/train.py") if "dtrain/train.py" in words else None
    missing = missing_files(words)
    if missing:
        return f"names {', '.join(missing)}, which the project does not ship"
    try:
        if words[:2] == ["accelerate", "launch"]:
            _check_accelerate(words[2:])
        elif train is not None and re.fullmatch(r"(\S*/)?python3?", words[0]):
            _train_flags(words[train + 1 :])
        elif words[0] == "dtrain" and len(words) > 1:
            _check_dtrain(words[1:])
        elif words[0] == "sbatch":
            _check_sbatch(words, cmd.env)
        elif words[0] == "make":
            _check_make(words)
        else:
            return None
    except (UserError, SystemExit, AssertionError) as exc:  # SystemExit: argparse's own refusal
        if fails:
            return None
        return f"refused: {exc}" if str(exc) else "refused by its parser"
    return "is marked `# fails` but passes every check" if fails else None


def problems_in(paths: list[Path], root: Path) -> list[str]:
    """Every problem of every command in the pages (the user's files stand in under root)."""
    STAND_IN_ROOT[:] = [root]
    out = []
    for path in paths:
        for cmd in shell_commands(path):
            quiet = io.StringIO()  # argparse's usage lines, dry runs' commands, --print_config
            with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
                problem = check(cmd)
            if problem:
                out.append(f"{cmd.where}: `{shlex.join(cmd.words)}` {problem}")
    return out


# --------------------------------------------------------------------------------------------
# Links and anchors
# --------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out, fenced = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                out.append(f"{path.relative_to(REPO)}: link to {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                out.append(f"{path.relative_to(REPO)}: link to {target}: no such section")
    return out


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def test_every_documented_command_parses(tmp_path):
    commands = [c for p in DOCS for c in shell_commands(p)]
    owned = [c for c in commands if c.words[0] in ("dtrain", "accelerate") or "dtrain/train.py" in c.words]
    assert len(owned) >= 30 and any(c.fails for c in owned)  # the docs really are read
    assert problems_in(DOCS, tmp_path) == []


def test_every_link_and_anchor_resolves():
    assert broken_links(DOCS) == []


def test_the_front_page_is_short_and_reaches_the_manual():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for page in ("checkpoints.md", "failures.md", "profiles.md", "slurm.md"):  # resume, exit codes, launch
        assert f"docs/{page}" in readme


def test_a_misspelt_flag_or_a_dead_link_fails(tmp_path):
    doc = REPO / "docs" / "_drift_probe.md"  # inside the repo, so its links resolve as a page's would
    try:
        doc.write_text(
            "# Probe\n\n```bash\n"
            "python dtrain/train.py --config dtrain/recipes/smoke.yaml --train.max_step 5\n"
            "dtrain launch fsdp --cpu -- --optim.name adamw_8bit\n"
            "python dtrain/train.py --train.max_steps 5  # fails\n"
            "accelerate launch --config_file accelerate_configs/nope.yaml dtrain/train.py\n"
            "dtrain launch ddp --gpu 2 -- --train.max_steps 5\n"
            "```\n\n[resume](checkpoints.md#no-such-section) and [gone](gone.md)\n"
        )
        problems = problems_in([doc], tmp_path)
        links = broken_links([doc])
    finally:
        doc.unlink()
    assert len(problems) == 5, problems
    assert "_drift_probe.md:4" in problems[0] and "train.max_step" in problems[0]
    assert "adamw_8bit" in problems[1] and "fails" in problems[2]
    assert "accelerate_configs/nope.yaml" in problems[3] and "refused" in problems[4]
    assert links == [
        "docs/_drift_probe.md: link to checkpoints.md#no-such-section: no such section",
        "docs/_drift_probe.md: link to gone.md: no such file",
    ]


@pytest.mark.parametrize(
    "heading, slug",
    [("The benchmark: `make bench`", "the-benchmark-make-bench"), ("Resume, exactly", "resume-exactly")],
)
def test_anchors_follow_githubs_rule(tmp_path, heading, slug):
    page = tmp_path / "p.md"
    page.write_text(f"## {heading}\n\n## {heading}\n")
    assert anchors(page) == {slug, f"{slug}-1"}

"""The README's embedded-default commands, as written, in a fresh copy of the repository.

The commands come from README.md's `bash` blocks marked `<!-- readme-test: embedded -->`
(tests/readme.py), never from a copy kept here. They run in one bash script, in order, with a
tiny budget passed through the README's own flags, in an environment without any MLFLOW_*,
OPTUNA_*, SERVING_*, WORKBENCH_* or AWS_* variable, and inside a new network namespace that has
only its own loopback: the machine's PostgreSQL, S3 endpoint and MLflow server cannot be reached,
so the embedded default must not need them. Any file that appears outside `.workbench/` fails it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.readme import readme_blocks, script, with_tiny_budget

SCRUBBED = ("MLFLOW_", "OPTUNA_", "SERVING_", "WORKBENCH_", "AWS_")
SELF = "make test"  # the command that runs this test


def fresh_copy(target: Path) -> set[Path]:
    """The repository's files (tracked, and new ones git does not ignore) as they are in the work
    tree, with their times (so make sees the venv as installed), and the venv linked in."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = set()
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
            files.add(Path(name))
    (target / ".venv").symlink_to(ROOT / ".venv")
    return files


def files_in(repo: Path) -> set[Path]:
    return {p.relative_to(repo) for p in repo.rglob("*") if p.is_file() and ".venv" not in p.relative_to(repo).parts}


def stray(new: set[Path]) -> list[str]:
    """Files that appeared outside the project data folder (bytecode caches aside)."""
    return sorted(str(p) for p in new if p.parts[0] != ".workbench" and "__pycache__" not in p.parts)


def no_network_but_loopback() -> list[str]:
    """`unshare --net`: a new network namespace; the probe shows it can be made here."""
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        message = f"cannot make a network namespace (unshare --net): {probe.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return ["unshare", "--net", "bash", "-c", 'ip link set lo up && exec bash "$0"']


def test_every_readme_block_is_marked():
    kinds = [b.kind for b in readme_blocks(ROOT / "README.md")]
    assert kinds.count("embedded") >= 4 and "stack" in kinds


def test_tiny_budget_goes_through_the_readmes_own_flags():
    assert with_tiny_budget("make run") == "make run 'ARGS=--n-trials 2 --set training.epochs=2'"
    assert with_tiny_budget("python -m studies.run configs/digits.yaml --n-trials 5      # 8x8, CNN") == (
        "python -m studies.run configs/digits.yaml --n-trials 1 --set training.epochs=2  # 8x8, CNN")
    assert with_tiny_budget("python -m studies.select configs/x.yaml") == "python -m studies.select configs/x.yaml"


def test_readme_commands_work_on_the_embedded_default(tmp_path):
    blocks = [b for b in readme_blocks(ROOT / "README.md") if b.kind == "embedded"]
    blocks = [type(b)(b.kind, b.line, tuple(c for c in b.commands if c.text.split("#")[0].strip() != SELF))
              for b in blocks]
    repo = tmp_path / "repo"
    before = fresh_copy(repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)}
    (tmp_path / "readme.sh").write_text(script(blocks))
    log = tmp_path / "readme.log"
    with log.open("w") as out:
        done = subprocess.run([*no_network_but_loopback(), str(tmp_path / "readme.sh")], cwd=repo, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=1500, start_new_session=True)
    text = log.read_text()
    assert done.returncode == 0, text[-6000:]
    ran = [int(n) for n in re.findall(r"\+ README\.md:(\d+): ", text)]  # the script echoes each command first
    assert ran == [c.line for b in blocks for c in b.commands]
    # What the commands did, on the embedded stores only:
    assert re.search(r"trial \d+ registered as breast_cancer_mlp v1: .* alias @champion", text), text[-3000:]
    assert "@champion moved back from v2 to v1" in text
    assert '"model_name":"breast_cancer_mlp"' in text.replace(" ", "")
    assert (repo / ".workbench" / "scored.parquet").is_file()
    # The mixed-type table: raw records with an unseen category and a null, the raw file scored in full.
    assert re.search(r'"model_name":"churn_mlp".*"classes":\["no","yes"\]', text.replace(" ", ""))
    assert len((repo / ".workbench" / "churn-scored.csv").read_text().splitlines()) == 2001
    assert list((repo / ".workbench" / "reports").glob("compare-*.html"))
    left = stray(files_in(repo) - before)
    assert not left, f"files written outside .workbench/: {left}"
    # The study commands print their own lines only: no library start-up or INFO lines.
    noisy = [f"{command}: {line}" for command, output in outputs(text) if command.startswith(("make run", "python -m studies."))
             for line in output.splitlines() if NOISE.search(line)]
    assert not noisy, "\n".join(noisy[:20])


NOISE = re.compile(r"absl::InitializeLog|oneDNN|cpu_feature_guard|ExperimentalWarning| INFO |Downloading artifacts|"
                   r"UserWarning|DeprecationWarning|FutureWarning")


def outputs(text: str) -> list[tuple[str, str]]:
    """(command, what it printed) for each command the README script echoed."""
    parts = re.split(r"^\+ README\.md:\d+: (.*)$", text, flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def test_outputs_split_the_log_by_command():
    log = "setup\n+ README.md:3: make run\nline a\n+ README.md:9: python -m serving &\nline b\n"
    assert outputs(log) == [("make run", "\nline a\n"), ("python -m serving &", "\nline b\n")]

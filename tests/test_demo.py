import hashlib
import re
import shlex
from argparse import Namespace
from pathlib import Path

import pytest

from wemoe.cli import convert, demo, evaluate, tta
from wemoe.cli.demo import main, replay_commands

CLIS = {"wemoe-convert": convert.main, "wemoe-tta": tta.main, "wemoe-eval": evaluate.main}
README = Path(__file__).resolve().parents[1] / "README.md"


def printed_commands(printed: str) -> list[str]:
    return printed.split("Replay each step with the command-line tools:\n", 1)[1].strip().splitlines()


def weights_digest(artifact: Path) -> str:
    return hashlib.sha256((artifact / "model.safetensors").read_bytes()).hexdigest()


def test_demo_runs_end_to_end_and_prints_what_it_did(tmp_path, capsys):
    main(["--workspace", str(tmp_path / "demo"), "--variant", "e-wemoe"])
    printed = capsys.readouterr().out
    assert "(as `wemoe-convert` does)" in printed
    assert "(as `wemoe-tta` does)" in printed and "adapted WEMoE" in printed
    assert "Reloaded it with trust_remote_code (WEMoEForImageClassification, e-wemoe)" in printed
    assert (tmp_path / "demo" / "adapted" / "modeling_wemoe.py").exists()
    shapes = printed.split("scores over that task's classes):\n", 1)[1].split("\nand with no task", 1)[0]
    assert sorted(line.split()[0] for line in shapes.splitlines()) == ["circle", "square", "triangle"]


def accuracy_rows(printed: str) -> dict[str, list[float]]:
    """The demo's accuracy table: task -> chance, expert, task arithmetic, adapted WEMoE (in %)."""
    table = printed.split("Accuracy on the held-out images", 1)[1].splitlines()[2:]
    rows = {}
    for line in table:
        words = line.split()
        if len(words) != 5:
            break
        rows[words[0]] = [float(value) for value in words[1:]]
    return rows


def test_the_demo_shows_task_arithmetic_losing_and_adaptation_winning_it_back(tmp_path, capsys):
    """With the defaults, each toy expert has learnt its drawn task, task arithmetic loses part of that skill, and
    the adapted WEMoE, routing each held-out image on its own, wins it back: at least 10 points over task arithmetic
    on average, far above chance."""
    main(["--workspace", str(tmp_path / "demo")])
    rows = accuracy_rows(capsys.readouterr().out)
    assert list(rows) == ["shapes", "colors", "stripes", "average"]
    chance, expert, task_arithmetic, adapted = rows["average"]
    assert expert >= 90 and task_arithmetic < expert - 10
    assert adapted >= task_arithmetic + 10 and adapted >= chance + 50


def test_printed_commands_replay_the_demo(tmp_path, capsys):
    """The data.yaml and the command lines the demo leaves redo its conversion and adaptation exactly."""
    workspace = tmp_path / "demo"
    main(["--workspace", str(workspace), "--tta-steps", "4"])
    commands = printed_commands(capsys.readouterr().out)
    assert [shlex.split(line)[0] for line in commands] == ["wemoe-convert", "wemoe-tta", "wemoe-eval", "wemoe-eval"]
    digests = {stage: weights_digest(workspace / stage) for stage in ("merged", "adapted")}

    for line in commands:
        program, *argv = shlex.split(line)
        CLIS[program](argv)
    assert {stage: weights_digest(workspace / stage) for stage in digests} == digests
    assert "shapes" in capsys.readouterr().out  # the evaluations printed their tables


def test_readme_quick_start_is_what_the_demo_prints():
    defaults = demo.parse_args([])
    expected = replay_commands(defaults.workspace, Namespace(tta_steps=defaults.tta_steps, seed=defaults.seed))
    readme = README.read_text()
    assert "wemoe-demo\n" in readme
    for line in expected:
        assert re.search(rf"^{re.escape(line)}$", readme, re.MULTILINE), f"README lacks the demo's line: {line}"


def test_demo_keeps_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not made by wemoe-demo"):
        main(["--workspace", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

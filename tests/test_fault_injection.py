"""Killing `wemoe-convert --overwrite` and `wemoe-tta` at random moments (SIGKILL, 20 kills each) never leaves the
output name holding anything but a complete artifact, old or new, and the next run always succeeds; two runs writing
one output are refused at once, naming the lock."""

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from transformers import AutoModel

KILLS = 20


class ForkingRunner:
    """tests/forking_runner.py in a subprocess: runs CLI commands in forked children, killing them on request."""

    def __init__(self, tmp_path: Path):
        self.log = tmp_path / "runs.log"
        env = {**os.environ, "LOG": str(self.log), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forking_runner.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )

    def request(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def run(self, command: str, argv: list[str], kill_after: float | None = None) -> dict:
        result = self.request(command=command, argv=argv, kill_after=kill_after)
        if not result["killed"]:
            assert result["exit"] == 0, self.log.read_text()[-3000:]
        return result

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture
def runner(tmp_path):
    runner = ForkingRunner(tmp_path)
    yield runner
    runner.close()


def load_artifact_model(directory: Path):
    """The artifact as a user loads it, asserted complete: every tensor its config asks for, and no other."""
    model, info = AutoModel.from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


def write_yaml(content, path) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


class KillMoments:
    """Endless random moments in a run: every other one anywhere in the run, the others in its last fifth and a little
    past it, where the output is written and put in place. The run's length is the shortest seen so far (`saw` each
    result): a first run slowed by a busy machine must not push every later kill past the end."""

    def __init__(self, duration: float, seed: int):
        self.duration, self.rng = duration, random.Random(seed)

    def __iter__(self):
        while True:
            yield self.duration * self.rng.uniform(0.02, 1.0)
            yield self.duration * self.rng.uniform(0.8, 1.1)

    def saw(self, result: dict) -> None:
        if not result["killed"]:
            self.duration = min(self.duration, result["seconds"])


def until_killed_enough(runs):
    """Attempts (each a `ForkingRunner.run` result) until `KILLS` were killed; runs that finish count as reruns."""
    killed = attempts = 0
    for result in runs:
        attempts += 1
        killed += result["killed"]
        assert attempts <= 4 * KILLS, f"only {killed} of {attempts} runs were killed before they finished"
        if killed == KILLS:
            return attempts


def only_artifact_beside(output: Path) -> None:
    """Nothing but the output (and TTA's checkpoints) is left next to it once a run has finished."""
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert leftovers == [], leftovers


def test_killing_convert_overwrite_leaves_the_old_or_the_new_artifact(recipe, tmp_path, runner):
    recipes = {}
    for init_lambda in (0.25, 0.75):
        variant = copy.deepcopy(recipe)
        variant["router"]["init_lambda"] = init_lambda
        recipes[init_lambda] = write_yaml(variant, tmp_path / f"recipe-{init_lambda}.yaml")
    output = tmp_path / "out"
    runner.run("convert", [recipes[0.25], str(output)])
    duration = runner.run("convert", [recipes[0.75], str(output), "--overwrite"])["seconds"]

    states = []

    def attempts():
        moments = KillMoments(duration, seed=0)
        for moment in moments:
            wanted = 0.25 if load_artifact_model(output).config.init_lambda == 0.75 else 0.75  # always the other one
            result = runner.run("convert", [recipes[wanted], str(output), "--overwrite"], moment)
            model = load_artifact_model(output)  # complete and matching its config, or this raises
            assert model.config.init_lambda in (0.25, 0.75)
            states.append("new" if model.config.init_lambda == wanted else "old")
            moments.saw(result)
            yield result

    runs = until_killed_enough(attempts())
    print(f"convert: {KILLS} of {runs} runs killed; output after each: {states}")
    assert set(states) == {"old", "new"}, "kills must have left both the old and the new artifact in place"
    runner.run("convert", [recipes[0.25], str(output), "--overwrite"])
    assert load_artifact_model(output).config.init_lambda == 0.25
    only_artifact_beside(output)


def routers_of(directory: Path) -> dict:
    return {key: tensor for key, tensor in load_file(directory / "model.safetensors").items() if ".router." in key}


def same_tensors(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all((first[key] == second[key]).all() for key in first)


def test_killing_tta_leaves_the_old_or_the_new_artifact_and_resumes(artifact, task_data, tmp_path, runner):
    data = write_yaml(task_data, tmp_path / "data.yaml")
    common = [str(artifact), data, "--steps", "12", "--checkpointing-steps", "2", "--batch-size", "4", "--lr", "1e-2"]
    old, reference = tmp_path / "old", tmp_path / "reference"
    runner.run("tta", [*common, "--output", str(old), "--seed", "1"])
    duration = runner.run("tta", [*common, "--output", str(reference), "--seed", "0"])["seconds"]
    old_routers, new_routers = routers_of(old), routers_of(reference)
    assert not same_tensors(old_routers, new_routers)

    output, checkpoints = tmp_path / "out", tmp_path / "out-checkpoints"
    shutil.copytree(old, output)  # every run below replaces the old adaptation with the seed-0 one
    arguments = [*common, "--output", str(output), "--seed", "0", "--overwrite", "--checkpoint-dir", str(checkpoints)]
    states = []

    def attempts():
        moments = KillMoments(duration, seed=1)
        for moment in moments:
            resume = ["--resume"] if any(checkpoints.glob("step_*/wemoe_tta_step.json")) else []
            result = runner.run("tta", [*arguments, *resume], moment)  # a rerun after the previous kill
            load_artifact_model(output)  # complete and matching its config, or this raises
            routers = routers_of(output)
            # A resumed run ends exactly as an uninterrupted one: "new" means the reference's routers to the bit.
            assert same_tensors(routers, old_routers) or same_tensors(routers, new_routers)
            states.append("old" if same_tensors(routers, old_routers) else "new")
            if states[-1] == "new":  # start over from the old artifact, so that later kills can meet it again
                shutil.rmtree(output)
                shutil.copytree(old, output)
                shutil.rmtree(checkpoints, ignore_errors=True)
            moments.saw(result)
            yield result

    runs = until_killed_enough(attempts())
    print(f"tta: {KILLS} of {runs} runs killed; output after each: {states}")
    assert set(states) == {"old", "new"}, states
    resume = ["--resume"] if any(checkpoints.glob("step_*/wemoe_tta_step.json")) else []
    runner.run("tta", [*arguments, *resume])
    assert same_tensors(routers_of(output), new_routers)
    only_artifact_beside(output)


def test_a_second_convert_to_the_same_output_fails_at_once_naming_the_lock(recipe, tmp_path, runner):
    path = write_yaml(recipe, tmp_path / "recipe.yaml")
    output = tmp_path / "out"
    first = runner.request(command="convert", argv=[path, str(output)], wait=False)
    lock, deadline = tmp_path / ".out.lock", time.monotonic() + 60
    while not lock.exists():
        assert time.monotonic() < deadline, "the first run never took a lock on its output"
        time.sleep(0.001)
    second = runner.request(command="convert", argv=[path, str(output)], kill_after=None)
    done = runner.request(command="wait", pid=first["pid"])
    assert done["exit"] == 0 and second["exit"] == 1
    assert second["seconds"] < done["seconds"], "the second run must fail at once, not after the first"
    log = (tmp_path / "runs.log").read_text()
    assert f"is being written by another run (pid {first['pid']}" in log and ".out.lock" in log
    load_artifact_model(output)

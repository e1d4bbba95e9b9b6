"""``train`` checkpoints periodically and ``resume`` continues a killed run on the same loss curve (issue 15 item 3);
a previous run's directory is refused without ``overwrite``/``resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitnet_torch.training import TrainConfig, train_from_scratch
from bitnet_torch.training.from_scratch import OutputDirError, last_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _corpus(root: Path) -> Path:
    path = root / "corpus.txt"
    verses = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light.",
              "And God saw the light, that it was good.", "And the evening and the morning were the first day."]
    path.write_text("\n\n".join(verses[i % 4] + f" Verse {i}." for i in range(120)))
    return path


def _config(root: Path, out: str, **kw) -> dict:
    return dict(output_dir=str(root / out), data=str(root / "corpus.txt"), vocab_size=300, preset="5m",
                model_overrides=TINY, block_size=32, batch_size=4, max_steps=60, save_steps=10, logging_steps=1,
                eval_steps=0, eval_tokens=4 * 32, learning_rate=1e-2, num_threads=1, disable_tqdm=True,
                sample_tokens=4, save_master=False, **kw)


def _losses(log_history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in log_history if "loss" in h}


@pytest.mark.slow
def test_a_killed_run_resumes_on_the_same_loss_curve(tmp_path):
    _corpus(tmp_path)
    # The run to kill, in its own process: SIGKILL once a checkpoint is complete and before the run ends.
    script = ("import json, sys\nfrom bitnet_torch.training import TrainConfig, train_from_scratch\n"
              "train_from_scratch(TrainConfig(**json.loads(sys.argv[1])))\n")
    killed_cfg = _config(tmp_path, "killed")
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(killed_cfg)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    trainer_dir = tmp_path / "killed" / "trainer"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            checkpoint = last_complete_checkpoint(trainer_dir)
            if checkpoint is not None and int(checkpoint.name.split("-")[1]) >= 20:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "killed" / "train_result.json").exists(), "the killed run finished"
    killed_at = int(last_complete_checkpoint(trainer_dir).name.split("-")[1])
    assert 20 <= killed_at < 60
    assert len([p for p in trainer_dir.iterdir() if p.name.startswith("checkpoint-")]) <= 3, "checkpoints not bounded"

    with pytest.raises(OutputDirError, match="--resume"):
        train_from_scratch(TrainConfig(**killed_cfg))  # the same command again without --resume: refused
    with pytest.raises(ValueError, match="learning_rate"):
        train_from_scratch(TrainConfig(**{**killed_cfg, "learning_rate": 2e-2, "resume": True}))

    resumed = train_from_scratch(TrainConfig(**killed_cfg, resume=True))
    reference = train_from_scratch(TrainConfig(**_config(tmp_path, "reference")))
    assert resumed.resumed_from_step == killed_at and reference.resumed_from_step is None
    assert resumed.steps == reference.steps == 60
    expected, got = _losses(reference.log_history), _losses(resumed.log_history)
    assert sorted(got) == list(range(1, 61)), "the resumed log misses steps"
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), "the resumed run left the uninterrupted loss curve"
    assert resumed.validation_perplexity == pytest.approx(reference.validation_perplexity, rel=1e-4)
    saved = json.loads((tmp_path / "killed" / "train_result.json").read_text())
    assert saved["steps"] == 60 and saved["planned_steps"] == 60


def test_a_previous_run_directory_is_refused_unless_overwrite(tmp_path):
    _corpus(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = _config(tmp_path, "run", save_packed=False)
    cfg.update(max_steps=2, save_steps=0)
    with pytest.raises(OutputDirError, match="not empty .*--overwrite"):
        train_from_scratch(TrainConfig(**cfg))
    with pytest.raises(OutputDirError, match="nothing to resume"):
        train_from_scratch(TrainConfig(**cfg, resume=True))
    with pytest.raises(ValueError, match="exclude each other"):
        train_from_scratch(TrainConfig(**cfg, resume=True, overwrite=True))
    stale = out / "trainer" / "checkpoint-7"
    stale.mkdir(parents=True)
    first = train_from_scratch(TrainConfig(**cfg, overwrite=True))
    assert first.steps == 2
    assert not stale.exists(), "overwrite kept the previous run's checkpoint"
    assert (out / "notes.txt").read_text() == "keep me", "overwrite removed a file the run did not write"
    assert json.loads((out / "train_job.json").read_text())["total_steps"] == 2


def test_the_cli_refuses_a_non_empty_output_dir_in_one_line(tmp_path, capsys):
    from bitnet_torch.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    code = main(["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "error: the output directory" in err and "--resume" in err and "--overwrite" in err


def test_an_interrupted_checkpoint_is_skipped(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if complete:
            (path / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text('{"trunc')
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    assert last_complete_checkpoint(tmp_path / "missing") is None

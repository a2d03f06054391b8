"""Progress output: a tqdm bar on a terminal; off one (log files, pipes, SLURM) plain lines, one
per log interval, and no carriage returns."""

from __future__ import annotations

import io
import re

from helpers import tiny_config
from jaxformer.progress import Progress
from jaxformer.training.loop import train


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_report_is_one_plain_line():
    stream = io.StringIO()
    with Progress(10, initial=2, desc="train", unit="step", stream=stream) as progress:
        for _ in range(4):
            progress.update()
        progress.report(loss="1.2345")
    (line,) = stream.getvalue().splitlines()
    assert re.fullmatch(r"train 6/10 steps, loss=1\.2345, elapsed \d\d:\d\d, ETA \d\d:\d\d", line)


def test_on_a_terminal_the_bar_redraws_and_disabled_shows_nothing():
    terminal, quiet = Terminal(), io.StringIO()
    with Progress(10, desc="train", unit="step", stream=terminal) as progress:
        progress.update()
        progress.report(loss="1.2345")
    assert "\r" in terminal.getvalue() and "loss=1.2345" in terminal.getvalue()
    with Progress(10, desc="train", unit="step", stream=quiet, enabled=False) as progress:
        progress.update()
        progress.report(loss="1.2345")
    assert quiet.getvalue() == ""


def test_training_off_a_terminal_prints_a_line_per_log_interval(tmp_path, capsys):
    train(tiny_config(steps=6, log_every=2, progress=True), tmp_path)
    out, err = capsys.readouterr()  # pytest's capture: not a terminal
    assert "\r" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("train ")]
    assert [line.split(",")[0] for line in lines] == [
        "train 2/6 steps", "train 4/6 steps", "train 6/6 steps"]
    assert all(re.search(r", loss=\d+\.\d{4}, tok_s=\d+, elapsed .*, ETA ", line) for line in lines)
    assert "step 3: eval loss" in out and "step 6: eval loss" in out

"""Progress in a file: plain lines every `every` seconds and at the end, with the count, elapsed time and ETA."""

import io
import re

from rich.console import Console

from glitr_cli.progress import ProgressLine, track


def test_plain_lines_where_the_output_is_not_a_terminal():
    out = io.StringIO()
    with ProgressLine(Console(file=out), "epoch 1/2", 4, every=0) as progress:
        progress.advance(info="loss 2.0000")
        progress.advance(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"epoch 1/2 1/4 · loss 2\.0000 · elapsed 0:00:\d\d · eta (0:\d\d:\d\d|\?)", lines[0])
    assert lines[1].startswith("epoch 1/2 3/4 · loss 2.0000 · elapsed ")  # the info stays until replaced


def test_a_long_interval_still_reports_the_end_and_nothing_when_disabled():
    out = io.StringIO()
    assert list(track(range(5), "counting", 5, Console(file=out), every=3600)) == [0, 1, 2, 3, 4]
    assert [line.split(" · ")[0] for line in out.getvalue().splitlines()] == ["counting 5/5"]
    quiet = io.StringIO()
    assert list(track(range(3), "counting", 3, Console(file=quiet), every=0, enabled=False)) == [0, 1, 2]
    assert quiet.getvalue() == ""

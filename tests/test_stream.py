"""`glitr stream` on real encoded clips, from a file and from a local HTTP server: pacing, drops, the
JSON lines and the summary, the drawn video, and sources that cannot be opened."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import REPO
from data_helpers import make_frames
from rich.console import Console

from glitr_cli.data.video import encode_video
from glitr_cli.engine.decisions import decision_steps
from glitr_cli.errors import GlitrError
from glitr_cli.stream import default_every, source_format, stream

FPS = 25


def checkpoint(project: Path) -> Path:
    return project / "runs" / "tiny" / "checkpoints" / "last.pt"


def clip(tmp_path: Path, seconds: float, name: str = "clip.mp4") -> Path:
    """A real H.264 clip of `seconds` at 25 fps, 64x48."""
    frames = make_frames(round(seconds * FPS), 48, 64)
    return encode_video(tmp_path / name, frames, "h264", fps=FPS, options={"preset": "ultrafast"})


def read_lines(path: Path) -> tuple[list[dict], dict]:
    """(per-frame records, summary) of a --jsonl file whose last line is the summary."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert "summary" in records[-1] and all("summary" not in r for r in records[:-1])
    return records[:-1], records[-1]["summary"]


@pytest.fixture()
def server(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www without range requests; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_WholeFiles, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


class _WholeFiles(http.server.SimpleHTTPRequestHandler):
    """Sends the whole file whatever the request asks, as a server without range requests does."""

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            del self.headers["Range"]
        return ok

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


def test_default_stride_spaces_steps_like_training():
    assert default_every(12, 8, "toy") == 2  # 16 frames at 12 fps over T = 8: every 2nd
    assert default_every(25, 4, "toy") == 8
    assert default_every(12, 16, "ssv2") == 3  # 4 s at 12 fps over 16 steps
    assert default_every(30, 8, "my_clips") == 11  # unknown dataset: 3 s
    assert default_every(2, 16, "ssv2") == 1  # never below 1


def test_real_time_file_paces_writes_one_line_per_frame_and_a_summary(trained_tiny, tmp_path, glitr, monkeypatch):
    monkeypatch.chdir(trained_tiny)
    video = clip(tmp_path, 2.0)
    out, live = tmp_path / "lines.jsonl", tmp_path / "live.mp4"
    start = time.perf_counter()
    code, _, err = glitr("stream", video, "--jsonl", out, "--every", 2, "--out", live)
    elapsed = time.perf_counter() - start
    assert code == 0, err
    assert "using the newest GliTr checkpoint" in err and "done: 50 frames read" in err
    assert elapsed >= 0.8 * 2.0  # paced on the clip's own frame rate
    records, summary = read_lines(out)
    frames = [r["frame"] for r in records]
    assert frames == sorted(frames) and len(set(frames)) == len(frames) and all(f % 2 == 0 for f in frames)
    assert summary["frames_read"] == 50 and summary["frames_processed"] == len(records) > 0
    assert summary["frames_processed"] + summary["frames_dropped"] == 25
    latencies = [r["latency_ms"] for r in records]  # each rounded to 0.01 ms
    assert summary["latency_ms_p50"] == pytest.approx(np.percentile(latencies, 50), abs=0.01)
    assert summary["latency_ms_p95"] == pytest.approx(np.percentile(latencies, 95), abs=0.01)
    assert summary["latency_ms_max"] == pytest.approx(max(latencies), abs=0.01)
    assert summary["processed_fps"] > 0 and summary["interrupted"] is False
    first = records[0]
    assert set(first) == {"frame", "time", "top", "box", "step", "window", "latency_ms"}
    assert first["time"] == pytest.approx(first["frame"] / FPS, abs=1e-3)
    assert len(first["top"]) == 3 and abs(sum(p for _, p in first["top"])) <= 1 + 1e-6
    assert [r["step"] for r in records[:5]] == [1, 2, 3, 4, 4][: len(records[:5])]  # T = 4, then sliding
    with av.open(str(live)) as container:  # one drawn frame per processed frame
        assert sum(1 for _ in container.decode(video=0)) == len(records)


def test_as_fast_as_possible_is_not_paced_and_drops_nothing(trained_tiny, tmp_path):
    video = clip(tmp_path, 8.0)
    summary = stream(
        str(video), checkpoint=checkpoint(trained_tiny), jsonl=tmp_path / "l.jsonl", as_fast_as_possible=True
    )
    assert summary["frames_read"] == 200 and summary["frames_dropped"] == 0
    assert summary["frames_processed"] == -(-200 // default_every(FPS, 4, "toy"))  # every 8th: 25 frames
    # six frames 100 s apart: paced, the stream could not end before the last one's time stamp, 500 s
    sparse = encode_video(tmp_path / "sparse.mp4", make_frames(6, 48, 64), "h264", fps=0.01)
    start = time.monotonic()
    summary = stream(
        str(sparse), checkpoint=checkpoint(trained_tiny), jsonl=tmp_path / "s.jsonl", every=1, as_fast_as_possible=True
    )
    assert time.monotonic() - start < 500
    assert summary["frames_read"] == summary["frames_processed"] == 6


def test_a_model_slower_than_the_source_drops_frames_without_queueing(trained_tiny, tmp_path):
    """50 frames 1 ms apart and a model step of 3 s: the whole clip arrives during the first step, each
    frame replacing the one before, so the model takes one of the first frames, then the last, and the
    other 48 are dropped."""
    frames = make_frames(50, 48, 64)
    video = encode_video(tmp_path / "dense.mp4", frames, "h264", fps=1000, options={"preset": "ultrafast"})
    out = tmp_path / "slow.jsonl"
    summary = stream(str(video), checkpoint=checkpoint(trained_tiny), jsonl=out, every=1, step_delay=3.0)
    records, written = read_lines(out)
    assert written == summary
    assert summary["frames_read"] == 50
    assert len(records) == 2 and records[-1]["frame"] == 49
    assert summary["frames_processed"] == 2 and summary["frames_dropped"] == 48
    # the newest frame only: the last waited for one step, not for a queue of 48 (144 s)
    assert summary["latency_ms_max"] < 48 * 3000 / 2


def test_http_stream_gives_the_file_s_predictions(trained_tiny, tmp_path, glitr, server):
    url, root = server
    video = clip(root, 1.2, "served.mp4")
    ckpt = checkpoint(trained_tiny)
    results = []
    for source, name in ((video, "file.jsonl"), (f"{url}/served.mp4", "http.jsonl")):
        args = ("--every", 3, "--context", "restart", "--as-fast-as-possible", "--jsonl", tmp_path / name)
        code, _, err = glitr("stream", source, "-c", ckpt, *args)
        assert code == 0, err
        results.append(read_lines(tmp_path / name))
    (file_records, file_summary), (http_records, http_summary) = results
    assert file_summary["frames_dropped"] == http_summary["frames_dropped"] == 0
    assert file_summary["frames_processed"] == http_summary["frames_processed"] == 10
    drop = ("latency_ms",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in http_records] == [
        {k: v for k, v in r.items() if k not in drop} for r in file_records
    ]
    assert [r["step"] for r in file_records] == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]  # restart after T = 4
    assert [r["window"] for r in file_records] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]


def test_an_mp4_indexed_at_its_end_over_http_without_ranges_says_why(trained_tiny, tmp_path, glitr, server):
    url, root = server
    noise = np.random.default_rng(0).integers(0, 256, (25, 48, 64, 3), dtype=np.uint8)  # barely compressible
    late = encode_video(root / "late.mp4", noise, "h264", fps=FPS, options={"preset": "ultrafast"})
    data = late.read_bytes()
    assert data.index(b"moov") > data.index(b"mdat") > 0  # the index after 70 kB of frames
    args = ("-c", checkpoint(trained_tiny), "--as-fast-as-possible", "--jsonl", tmp_path / "x.jsonl")
    code, _, err = glitr("stream", f"{url}/late.mp4", *args)
    line = err.strip().splitlines()[-1]  # after the line that says what is streamed
    assert code == 2 and line.startswith("error:") and "Traceback" not in err, err
    assert "decoding failed after 0 frames" in line and "range requests" in line and "-movflags +faststart" in line
    # the advice works: the same frames with the index in front stream from the same server
    with av.open(str(late)) as src, av.open(str(root / "early.mp4"), "w", options={"movflags": "+faststart"}) as dst:
        stream_out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream_out
                dst.mux(packet)
    code, _, err = glitr("stream", f"{url}/early.mp4", *args)
    assert code == 0 and "done: 25 frames read" in err, err
    assert "each frame also waited for the model to finish the one before" in err  # the latency, explained


def test_sources_that_cannot_be_opened_exit_2_with_one_line(trained_tiny, tmp_path, glitr, server):
    url, root = server
    (root / "notes.mp4").write_text("not a video")
    ckpt = checkpoint(trained_tiny)
    for source, says in (
        (tmp_path / "missing.mp4", "no such video file"),
        (root / "notes.mp4", "cannot open as a video source"),
        (f"{url}/missing.mp4", "cannot open as a video source"),
        (f"{url}/notes.mp4", "cannot open as a video source"),
    ):
        code, out, err = glitr("stream", source, "-c", ckpt, "--jsonl", tmp_path / "x.jsonl")
        assert code == 2, (source, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
        assert str(source) in err and says in err, err
        assert out == ""
    video = clip(tmp_path, 0.4)
    code, _, err = glitr("stream", video, "-c", ckpt, "--jsonl", tmp_path)  # a folder, not a file
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"--jsonl {tmp_path}: cannot write there" in err


class _FailingDecoder:
    """A real container whose decoding raises an error PyAV does not raise (a bug, memory) after `after` frames."""

    def __init__(self, container: av.container.InputContainer, after: int) -> None:
        self._container, self._after = container, after

    def __getattr__(self, name: str) -> object:
        return getattr(self._container, name)

    def decode(self, *streams: object):
        for i, frame in enumerate(self._container.decode(*streams)):
            if i == self._after:
                raise MemoryError("cannot allocate the frame")
            yield frame


def test_any_reader_error_ends_the_stream_with_one_line_and_exit_2(trained_tiny, tmp_path, glitr, monkeypatch):
    """Not only PyAV's errors: whatever ends the reader thread is a failed stream, not its end."""
    import glitr_cli.stream as stream_module

    opened = stream_module.open_source
    monkeypatch.setattr(stream_module, "open_source", lambda source: _FailingDecoder(opened(source), after=6))
    video = clip(tmp_path, 0.8)
    out = tmp_path / "lines.jsonl"
    code, _, err = glitr("stream", video, "-c", checkpoint(trained_tiny), "--jsonl", out, "--as-fast-as-possible")
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # after the "streaming ..." line: no traceback, no "done:" summary
    assert err.count("\n") == 2 and last.startswith("error:"), err
    assert f"{video}: reading failed after 6 frames (MemoryError: cannot allocate the frame)" in last
    assert "summary" not in out.read_text()


def open_paths() -> set[str]:
    """The files this process holds open (Linux /proc)."""
    fds = Path("/proc/self/fd")
    return {os.path.realpath(fds / fd) for fd in os.listdir(fds)}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files in /proc")
def test_a_jsonl_target_that_cannot_be_written_closes_the_source(trained_tiny, tmp_path):
    video = clip(tmp_path, 0.4)
    (tmp_path / "file").write_text("")
    with pytest.raises(GlitrError, match="--jsonl .*: cannot write there") as failed:
        stream(str(video), checkpoint=checkpoint(trained_tiny), jsonl=tmp_path / "file" / "lines.jsonl")
    assert failed.traceback  # holds stream()'s frame, whose container is closed all the same
    assert str(video.resolve()) not in open_paths()


@pytest.mark.slow
def test_ctrl_c_stops_with_the_summary(trained_tiny, tmp_path):
    """Ctrl-C while a paced file waits for its next frame (six frames 100 s apart: the stream is
    still running when the signal comes, however loaded the machine) ends with the summary."""
    video = encode_video(tmp_path / "sparse.mp4", make_frames(6, 48, 64), "h264", fps=0.01)
    out = tmp_path / "lines.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "glitr_cli", "stream", str(video), "-c", str(checkpoint(trained_tiny))]
    # SIGINT as a terminal sends it: a shell starts background jobs (a CI script run with &) with SIGINT
    # ignored, and a Python child keeps it ignored, so the test sets it back for the stream
    proc = subprocess.Popen(
        [*cmd, "--every", "1", "--jsonl", str(out)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    records, summary = read_lines(out)
    assert summary["interrupted"] is True and "stopped:" in err
    assert summary["frames_processed"] == len(records) >= 1
    assert summary["frames_read"] < 6


def test_stream_is_in_the_help(glitr):
    code, out, _ = glitr("--help")
    assert code == 0 and "stream" in out
    code, out, _ = glitr("stream", "--help")
    assert code == 0 and "--as-fast-as-possible" in out and "--jsonl" in out


@pytest.mark.parametrize(
    ("backend", "step", "context", "box_tol", "prob_tol"),
    [
        ("onnx", "last.pt", "sliding", 0.02, 1e-4),
        ("onnx", "last.pt", "restart", 0.02, 1e-4),
        ("onnx", "last.pt.step.onnx", "sliding", 0.02, 1e-4),  # the file `glitr export` writes
        ("onnx-int8", "last.pt", "sliding", 0.5, 0.02),  # an approximation: boxes within half a source pixel
    ],
)
def test_onnx_backends_give_the_pytorch_predictions(
    exported_tiny, tmp_path, glitr, backend, step, context, box_tol, prob_tol
):
    """The exported step, from a checkpoint (its export cached beside it: not exported again) or from the
    exported file itself, writes PyTorch's lines: the first T frames through T_c's and T_l's caches, the
    rest sliding or restarting."""
    video = clip(tmp_path, 1.6)
    results = []
    for name, ckpt in (("pytorch", exported_tiny), (backend, exported_tiny.with_name(step))):
        out = tmp_path / f"{name}.jsonl"
        args = ("--every", 3, "--context", context, "--top-k", 8, "--as-fast-as-possible", "--jsonl", out)
        code, _, err = glitr("stream", video, "-c", ckpt, "--backend", name, "--threads", 1, *args)
        assert code == 0, err
        assert f"{name} on cpu" in err and "exporting" not in err
        results.append(read_lines(out)[0])
    torch_records, onnx_records = results
    assert len(torch_records) == len(onnx_records) == 14  # 40 frames, every 3rd
    for a, b in zip(torch_records, onnx_records, strict=True):
        assert (a["frame"], a["time"], a["step"], a["window"]) == (b["frame"], b["time"], b["step"], b["window"])
        assert b["box"] == pytest.approx(a["box"], abs=box_tol)
        pa, pb = dict(a["top"]), dict(b["top"])  # every class: no order ties at the cut
        assert pa.keys() == pb.keys() and all(abs(pa[k] - pb[k]) < prob_tol for k in pa)
    steps = [r["step"] for r in onnx_records]
    assert steps[:6] == ([1, 2, 3, 4, 1, 2] if context == "restart" else [1, 2, 3, 4, 4, 4])


def test_onnx_backend_runs_on_the_cpu_only(trained_tiny, tmp_path, glitr):
    code, _, err = glitr("stream", clip(tmp_path, 0.4), "-c", checkpoint(trained_tiny), "--backend", "tpu")
    assert code == 2 and "--backend must be one of pytorch, onnx" in err
    code, _, err = glitr(
        "stream", clip(tmp_path, 0.4), "-c", checkpoint(trained_tiny), "--backend", "onnx", "--device", "cuda"
    )
    assert code == 2 and "runs on the CPU" in err


def test_exported_files_that_do_not_fit_the_backend_are_one_line(exported_tiny, tmp_path, glitr):
    video = clip(tmp_path, 0.4)
    float_step, int8_step = (
        exported_tiny.with_name("last.pt.step.onnx"),
        exported_tiny.with_name("last.pt.step-int8.onnx"),
    )
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model")
    cases = [
        ((float_step,), "an exported step runs with --backend onnx"),
        ((float_step, "--backend", "onnx-int8"), "holds the float32 step: run it with --backend onnx"),
        ((int8_step, "--backend", "onnx"), "holds the int8 step: run it with --backend onnx-int8"),
        ((not_onnx, "--backend", "onnx"), "not an ONNX model ONNX Runtime can run"),
        ((tmp_path / "missing.onnx", "--backend", "onnx"), "no such file"),
    ]
    for (ckpt, *args), message in cases:
        code, _, err = glitr("stream", video, "-c", ckpt, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = glitr("stream", video, "-c", float_step, "--backend", "onnx", "--threads", -1)
    assert code == 2 and "--threads" in err


def test_capture_devices_open_through_their_pyav_format(trained_tiny, tmp_path, glitr):
    assert source_format("/dev/video0") == ("/dev/video0", "v4l2")
    assert source_format("avfoundation:0") == ("0", "avfoundation")
    assert source_format("dshow:video=Integrated Camera") == ("video=Integrated Camera", "dshow")
    assert source_format("rtsp://127.0.0.1/cam") == ("rtsp://127.0.0.1/cam", None)
    missing = "/dev/video99"  # no such camera here, or no v4l2 in this PyAV: one line either way
    code, out, err = glitr("stream", missing, "-c", checkpoint(trained_tiny))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and missing in err, err


def test_a_terminal_gets_a_live_panel_of_the_top_classes_and_latency(trained_tiny, tmp_path):
    video = clip(tmp_path, 1.0)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    stream(
        str(video), checkpoint=checkpoint(trained_tiny), jsonl=tmp_path / "l.jsonl", as_fast_as_possible=True,
        console=console,
    )  # fmt: skip
    shown = screen.getvalue()
    last = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()][-2]
    assert f"frame {last['frame']}" in shown and " ms" in shown and last["top"][0][0] in shown
    plain = Console(file=io.StringIO(), force_terminal=False)  # a log file, not a person: no panel
    stream(str(video), checkpoint=checkpoint(trained_tiny), jsonl=tmp_path / "m.jsonl", console=plain)
    assert not re.search(r"frame \d+ · ", plain.file.getvalue())


def test_glimpse_only_reads_the_window_and_predicts_as_the_whole_frame(trained_tiny, tmp_path, glitr):
    video = clip(tmp_path, 1.2)
    ckpt = checkpoint(trained_tiny)
    results = []
    for name, extra in (("whole.jsonl", ()), ("window.jsonl", ("--glimpse-only",))):
        args = ("--every", 2, "--as-fast-as-possible", "--jsonl", tmp_path / name, *extra)
        code, _, err = glitr("stream", video, "-c", ckpt, *args)
        assert code == 0, err
        results.append(read_lines(tmp_path / name))
    (whole, _), (window, summary) = results
    assert len(whole) == len(window) == 15  # beyond T = 4: sliding context
    for a, b in zip(whole, window, strict=True):
        assert a["frame"] == b["frame"] and a["box"] == pytest.approx(b["box"], abs=0.02)
        assert [n for n, _ in a["top"]] == [n for n, _ in b["top"]]
        assert [p for _, p in a["top"]] == pytest.approx([p for _, p in b["top"]], abs=1e-4)
    # a 2x2-patch glimpse of 16-px patches reads 32 px plus a one-pixel margin of the 64x64 input
    assert all(r["pixels_read"] <= 34 * 34 for r in window) and summary["model_input_pixels"] == 64 * 64
    assert summary["pixels_read_per_frame"] <= 34 * 34
    code, _, err = glitr("stream", video, "-c", ckpt, "--glimpse-only", "--backend", "onnx")
    assert code == 2 and "--glimpse-only runs on the PyTorch backend" in err


def test_the_decision_line_comes_at_the_first_step_over_the_threshold_and_can_end_the_stream(
    trained_tiny, tmp_path, glitr
):
    video = clip(tmp_path, 2.0)
    common = ("-c", checkpoint(trained_tiny), "--every", 2, "--as-fast-as-possible")
    # a threshold never reached: the T-th step decides, and the sliding context never decides again
    code, _, err = glitr("stream", video, *common, "--decide", 1.0, "--jsonl", tmp_path / "never.jsonl")
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "never.jsonl").read_text().splitlines()]
    decisions = [i for i, line in enumerate(lines) if "decision" in line]
    assert decisions == [4]  # right after the line of the 4th frame (T = 4)
    decision = lines[4]["decision"]
    assert decision["frame"] == lines[3]["frame"] and decision["step"] == 4 and decision["reached"] is False
    assert [decision["class"], decision["p"]] == lines[3]["top"][0]
    assert lines[-1]["summary"]["decisions"] == 1 and lines[-1]["summary"]["stopped_on_decision"] is False
    records = [line for line in lines if "frame" in line]

    # a threshold the first T - 1 steps reach: the decision follows the first frame that reaches it
    confidence = torch.tensor([[r["top"][0][1] for r in records[:4]]])  # (1, T)
    tau = float(confidence[0, 1:3].max()) - 5e-7  # below the rounded probability of that step
    first = int(decision_steps(confidence, tau)[0])
    assert first < 3
    out = tmp_path / "stop.jsonl"
    code, _, err = glitr("stream", video, *common, "--decide", tau, "--stop-on-decision", "--jsonl", out)
    assert code == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in lines[: first + 1]] == [r["frame"] for r in records[: first + 1]]
    decision, summary = lines[first + 1]["decision"], lines[first + 2]["summary"]
    assert len(lines) == first + 3  # the frames up to the decision, the decision, the summary
    assert decision["frame"] == records[first]["frame"] and decision["step"] == first + 1 and decision["reached"]
    assert decision["class"] == records[first]["top"][0][0] and decision["threshold"] == tau
    assert summary["stopped_on_decision"] is True and summary["interrupted"] is False
    assert summary["frames_processed"] == first + 1 and summary["decisions"] == 1
    assert "stopped at the decision" in err and err.rstrip().endswith("; 1 decision")
    # a slower model: the reader has decoded the next frames meanwhile; ending there drops none of them
    slow = dict(checkpoint=checkpoint(trained_tiny), every=2, as_fast_as_possible=True, step_delay=0.1)
    summary = stream(str(video), **slow, decide=tau, stop_on_decision=True, jsonl=tmp_path / "slow.jsonl")
    assert summary["frames_processed"] == first + 1 and summary["frames_dropped"] == 0

    code, _, err = glitr("stream", video, *common, "--stop-on-decision")
    assert code == 2 and "--stop-on-decision needs a threshold" in err

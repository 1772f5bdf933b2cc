"""static/index.html in Debian's chromium (playwright, never `playwright install`) against a real
server: a fake microphone plays Telugu speech; the page must connect, send it, receive and play
the reply, show its latency, and answer a pre-rendered sample question too."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from test_server import render_speech, start_server, stop_server

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


def fake_mic_wav(path: Path, speech: np.ndarray) -> Path:
    """The fake capture device runs at 44.1 kHz stereo: write the file that way."""
    import soundfile as sf
    import soxr

    audio = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(16000 * 8, np.float32)])
    audio = soxr.resample(audio, 16000, 44100).astype(np.float32)
    sf.write(path, np.stack([audio, audio], axis=1), 44100, subtype="PCM_16")
    return path


def wait(page, condition: str, timeout_s: float) -> None:
    """Wait for a JS condition; on timeout fail with the page's state, which says what went wrong."""
    try:
        page.wait_for_function(f"() => {condition}", timeout=1000 * timeout_s)
    except sync_api.TimeoutError:
        state = page.evaluate("() => window.agentState")
        log = page.inner_text("#log") if page.locator("#log").count() else ""
        raise AssertionError(f"timed out waiting for {condition}\nstate: {state}\npage log:\n{log}") from None


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    import streaming_server_advanced as srv

    tmp = tmp_path_factory.mktemp("browser")
    mic = fake_mic_wav(tmp / "mic.wav", render_speech()["question"])
    samples = tmp / "samples"
    srv.build_samples(samples, count=2)
    server = start_server(tmp / "server.log", "--max_reply_s", "1.0", "--min_reply_ms", "1000",
                          "--samples_dir", str(samples))
    yield server.address, mic
    stop_server(server)


def test_page_talks_to_the_agent(page_server, tmp_path):
    address, mic = page_server
    assert mic.is_file()  # a wrong path gives silence without an error
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}%noloop", "--autoplay-policy=no-user-gesture-required"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(f"http://{address}/?test=1")

        # The fake microphone's speech: sent, detected, answered, played, latency shown.
        wait(page, "window.agentState && agentState.latencies.length >= 1 && agentState.playedSamples > 8000", 60)
        state = page.evaluate("() => agentState")
        assert state["connection"] == "connected" and state["micStarted"] and state["sentFrames"] > 50
        for event in ("session_created", "speech_started", "speech_stopped", "response_started", "latency"):
            assert event in state["events"]
        assert state["receivedSamples"] >= 8000 and state["playbackStarted"] >= 1
        assert re.fullmatch(r"\d+ ms", page.inner_text("#latency"))
        assert page.locator("#history tr").count() == 1
        wait(page, "document.querySelector('#memory').textContent.includes('agent')", 15)

        # A sample question: streamed in real time in place of the microphone, answered as well.
        buttons = page.locator("#samples button")
        assert buttons.count() == 2
        buttons.first.click()
        wait(page, "agentState.latencies.length >= 2", 60)
        wait(page, "agentState.context.length >= 4", 15)
        assert page.locator("#history tr").count() == 2
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        state = page.evaluate("() => agentState")
        browser.close()
    assert not errors, errors
    assert not state["errors"], state["errors"]
    assert [t["role"] for t in state["context"]] == ["user", "agent", "user", "agent"]
    print(f"browser: latencies {[round(e['latency_ms']) for e in state['latencies']]} ms; "
          f"screenshot {tmp_path / 'page.png'}")

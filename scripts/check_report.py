"""Render an HTML report in headless Chromium the way a reader's browser would, and fail on what they would see.

    python scripts/check_report.py RUN/report.html [--screenshot page.png]

Fails (exit 1, one line per problem) on a console error, an uncaught script error, a resource
that failed to load, a request for anything outside the file (a report must be self-contained)
and an <img> that did not decode (naturalWidth 0). Writes a full-page screenshot when asked.

Speaks the DevTools protocol over ``--remote-debugging-pipe`` (NUL-terminated JSON on file
descriptors 3 and 4), so it needs nothing but the standard library and a Chromium binary.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
WIDTH = 1200  # CSS pixels: a laptop window; the page's own max-width is 1100
# What the page does after its load event: images decode, late errors surface.
SETTLE_S = 0.5

IMAGES = """JSON.stringify(Array.from(document.images).map((img, i) => ({
    index: i, alt: img.alt, src: img.src.slice(0, 60), complete: img.complete, width: img.naturalWidth})))"""


class CheckError(RuntimeError):
    """Chromium could not be started or did not answer."""


def find_chromium() -> str | None:
    for name in CHROMIUM:
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """One headless Chromium, driven over its DevTools pipe."""

    def __init__(self, binary: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="check_report_")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def plumb() -> None:  # in the child: the pipe ends on fds 3 (commands) and 4 (replies)
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [binary, "--headless", "--no-sandbox", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--hide-scrollbars", "--mute-audio", "--disable-dev-shm-usage", "about:blank"]
        try:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, preexec_fn=plumb, close_fds=False)
        except OSError as err:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise CheckError(f"{binary}: cannot be started ({err})") from None
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("Browser.close", wait=False)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.process.stderr is not None:
            self.process.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> DevTools:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, method: str, params: dict | None = None, session: str | None = None, wait: bool = True) -> dict:
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        if not wait:
            return {}
        reply = self._until(lambda m: m.get("id") == self._next_id, f"the reply to {method}")
        if "error" in reply:
            raise CheckError(f"Chromium refused {method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def wait_event(self, method: str) -> dict:
        return self._until(lambda m: m.get("method") == method, method)

    def drain(self, seconds: float) -> None:
        """Collect the events that arrive in the next ``seconds``."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if not self._read(left):
                break

    def _until(self, wanted, what: str) -> dict:
        end = time.monotonic() + self.timeout
        while True:
            for k, message in enumerate(self.events):
                if wanted(message):
                    return self.events.pop(k)
            left = end - time.monotonic()
            if left <= 0:
                raise CheckError(f"Chromium did not send {what} within {self.timeout:g} s")
            if not self._read(left) and self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace")[-500:] if self.process.stderr else ""
                raise CheckError(f"Chromium exited ({self.process.returncode}) before {what}: {err}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self._from_child], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(self._from_child, 1 << 20)
        if not chunk:
            return False
        self._buffer += chunk
        *messages, self._buffer = self._buffer.split(b"\0")
        self.events += [json.loads(m) for m in messages if m]
        return True


def check_page(page: Path | str, screenshot: Path | str | None = None, binary: str | None = None,
               timeout: float = 60.0) -> list[str]:
    """The problems a reader would meet opening ``page``; an empty list when there are none."""
    page = Path(page).resolve()
    if not page.is_file():
        raise CheckError(f"{page}: no such file")
    binary = binary or find_chromium()
    if binary is None:
        raise CheckError(f"no Chromium found (looked for {', '.join(CHROMIUM)}); install the Debian package chromium")
    with DevTools(binary, timeout) as tools:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.send(f"{domain}.enable", session=session)
        tools.send("Emulation.setDeviceMetricsOverride",
                   {"width": WIDTH, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        tools.events.clear()  # about:blank's own events
        navigation = tools.send("Page.navigate", {"url": page.as_uri()}, session=session)
        if navigation.get("errorText"):
            return [f"page did not load: {navigation['errorText']}"]
        tools.wait_event("Page.loadEventFired")
        tools.drain(SETTLE_S)
        problems = _problems(tools.events, page)
        images = json.loads(tools.send("Runtime.evaluate", {"expression": IMAGES, "returnByValue": True},
                                       session=session)["result"]["value"])
        for img in images:
            if not img["complete"] or img["width"] == 0:
                problems.append(f"image {img['index'] + 1} (alt {img['alt']!r}, src {img['src']}...) did not decode "
                                "(naturalWidth 0)")
        if screenshot is not None:
            _screenshot(tools, session, Path(screenshot))
    return problems


def _problems(events: list[dict], page: Path) -> list[str]:
    problems = []
    own = page.as_uri()
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            problems.append(f"uncaught script error: {str(text).splitlines()[0]} (line {details.get('lineNumber')})")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            problems.append(f"console error: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            where = f" {entry['url']}" if entry.get("url") else ""
            problems.append(f"console error ({entry.get('source')}): {entry.get('text')}{where}")
        elif method == "Network.loadingFailed":
            problems.append(f"failed to load a resource: {params.get('errorText')} ({params.get('type')})")
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if not url.startswith("data:") and url != own:
                problems.append(f"fetches something outside the page: {url[:120]}")
        elif method == "Network.responseReceived":
            status = params.get("response", {}).get("status", 0)
            if status >= 400:
                problems.append(f"failed to load a resource: HTTP {status} {params['response'].get('url', '')[:120]}")
    return problems


def _screenshot(tools: DevTools, session: str, path: Path) -> None:
    size = tools.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
    height = int(size["height"]) + 1
    tools.send("Emulation.setDeviceMetricsOverride",
               {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
    shot = tools.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(base64.b64decode(shot["data"]))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the HTML page, e.g. RUN/report.html")
    parser.add_argument("--screenshot", type=Path, help="write a full-page PNG screenshot here")
    parser.add_argument("--chromium", help="Chromium binary [found on PATH]")
    args = parser.parse_args(argv)
    try:
        problems = check_page(args.report, args.screenshot, args.chromium)
    except CheckError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"{args.report}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.report}: renders cleanly" + (f"; screenshot {args.screenshot}" if args.screenshot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

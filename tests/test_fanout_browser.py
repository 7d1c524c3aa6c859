"""The demo page (examples/tracking.html) in a real headless Chromium, driven over the DevTools protocol.

test-case-name: tests.test_fanout_browser

Chromium comes from Debian (``scripts/test`` installs it when missing); the
test skips, saying why, only when no chromium binary is there.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import unittest
import urllib.request
from typing import Any, List

from tests.harness import REPO_ROOT, RedisServer, RelaydProcess, free_port, wait_for

ROUTE = {"path": "/tracking/{team}", "stream": "tracking:{team}"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags known to work headless in containers (/work/.library/env/machines/python.md).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class Browser:
    """A headless Chromium with one page, evaluated through the DevTools websocket."""

    def __init__(self, test: unittest.TestCase, url: str) -> None:
        import websocket  # test extra (setup.py)

        profile = tempfile.mkdtemp(prefix="relayd-chromium-")
        test.addCleanup(shutil.rmtree, profile, True)
        assert CHROMIUM is not None
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        test.addCleanup(self.close)
        port_file = os.path.join(profile, "DevToolsActivePort")
        wait_for(lambda: os.path.exists(port_file) and open(port_file).read().strip(), 60.0, "Chromium's DevTools port")
        port = int(open(port_file).read().split()[0])

        def page() -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.load(r)
            return next(t for t in targets if t.get("type") == "page" and t["url"].startswith(url.split("?")[0]))

        target = wait_for(page, 30.0, "the demo page target")
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=10)
        self._next = 0

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        self._next += 1
        self.ws.send(json.dumps({"id": self._next, "method": "Runtime.evaluate",
                                 "params": {"expression": expression, "returnByValue": True}}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._next:
                return reply["result"]["result"].get("value")

    def close(self) -> None:
        """Quit the browser."""
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_examples(test: unittest.TestCase) -> int:
    """Serve examples/ over HTTP on a free port (the page's own origin); the port."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.path.join(REPO_ROOT, "examples"))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    return server.server_address[1]


@unittest.skipIf(CHROMIUM is None, "no chromium binary (scripts/test installs Debian's chromium; the install failed)")
class DemoPageTests(unittest.TestCase):
    """EventSource in a real browser: live events, then a reconnect with Last-Event-ID after the server closed."""

    def test_demo_page_live_and_after_reconnect(self) -> None:
        """Events posted after load appear; relayd restarts (closing the stream); the page resumes, nothing lost."""
        redis = RedisServer(self)
        a = RelaydProcess(self, routes=[ROUTE], redis_url=redis.url)
        b = RelaydProcess(self, routes=[ROUTE], redis_url=redis.url)  # a second "host" on the same Redis
        page_port = serve_examples(self)
        url = f"http://127.0.0.1:{page_port}/tracking.html?team=red&relayd=http://127.0.0.1:{a.ingest_port}"
        browser = Browser(self, url)
        wait_for(lambda: browser.evaluate("document.getElementById('state').textContent") == "live", 60.0,
                 "EventSource open")

        def post(relayd: RelaydProcess, seq: int) -> None:
            body = json.dumps({"worker": f"w{seq % 3}", "lat": 41.1 + seq / 1000, "lon": -8.6, "seq": seq})
            status, _, raw = relayd.post("/tracking/red", body.encode())
            self.assertEqual(status, 200, raw)

        def seqs() -> List[int]:
            return json.loads(browser.evaluate("JSON.stringify(window.relaydEvents.map(e => e.body.seq))") or "[]")

        for i in range(5):
            post(a, i)
        wait_for(lambda: seqs() == list(range(5)), 30.0, "the first events in the page")
        self.assertEqual(browser.evaluate("document.querySelectorAll('#rows tr').length"), 3)
        # The server side closes the stream: relayd stops (final chunk, then the port is closed).
        self.assertEqual(a.terminate(), 0, a.log_tail())
        wait_for(lambda: browser.evaluate("document.getElementById('state').textContent") == "reconnecting", 30.0,
                 "the page to notice")
        for i in range(5, 10):
            post(b, i)  # stored while the page is disconnected
        a.start()
        wait_for(lambda: browser.evaluate("document.getElementById('state').textContent") == "live", 60.0,
                 "EventSource reconnected")
        for i in range(10, 15):
            post(a, i)
        wait_for(lambda: len(seqs()) >= 15, 30.0, "missed and new events after the reconnect")
        # 5..9 were stored while the page was away: only a resume from its Last-Event-ID replays them.
        self.assertEqual(seqs(), list(range(15)), "resumed with Last-Event-ID: no gap, no duplicate")

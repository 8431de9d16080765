"""A real headless Chromium (Debian's ``chromium``), driven over the DevTools protocol with aiohttp's websocket
client: open a page, then report what it logged as errors, every request it made, what a script finds in it, and a
screenshot."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CHECK_PAGE = """(() => {
  const images = [...document.images];
  return {title: document.title, tables: document.querySelectorAll('table').length,
          rows: [...document.querySelectorAll('table')].map(t => t.rows.length),
          images: images.length, drawn: images.filter(i => i.complete && i.naturalWidth > 0).length,
          alts: images.map(i => i.alt)};
})()"""


def chromium() -> str | None:
    """The Chromium executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def open_page(url: str, width: int = 1400, height: int = 2000, timeout: float = 60) -> dict:
    """Load ``url`` in a fresh headless Chromium (its own profile): ``errors`` (console errors, uncaught
    exceptions, log entries at error level), ``requests`` (every URL it asked for), ``page`` (``CHECK_PAGE``'s
    findings) and ``screenshot`` (PNG bytes, ``width`` x ``height``)."""
    with tempfile.TemporaryDirectory(prefix="featx-chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + timeout
            while not (port_file.is_file() and len(port_file.read_text().split()) == 2):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"chromium did not open its DevTools port (exit status {process.poll()})")
                time.sleep(0.1)
            port, path = port_file.read_text().split()
            return asyncio.run(asyncio.wait_for(_drive(f"ws://127.0.0.1:{port}{path}", url, width, height), timeout))
        finally:  # the browser and its renderer, GPU and utility processes, by their process group
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            deadline = time.monotonic() + 10
            while _group_alive(process.pid) and time.monotonic() < deadline:  # they write to the profile until gone
                time.sleep(0.05)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


async def _drive(endpoint: str, url: str, width: int, height: int) -> dict:
    import aiohttp

    errors, requests, loaded = [], [], asyncio.Event()
    ids, waiting = itertools.count(1), {}
    async with aiohttp.ClientSession() as client, client.ws_connect(endpoint, max_msg_size=0) as socket:
        async def listen():
            async for message in socket:
                event = message.json()
                if "id" in event and event["id"] in waiting:
                    waiting.pop(event["id"]).set_result(event)
                    continue
                method, params = event.get("method"), event.get("params", {})
                if method == "Runtime.consoleAPICalled" and params["type"] == "error":
                    errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
                elif method == "Runtime.exceptionThrown":
                    errors.append(params["exceptionDetails"].get("text", "exception"))
                elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                    errors.append(params["entry"]["text"])
                elif method == "Network.requestWillBeSent":
                    requests.append(params["request"]["url"])
                elif method == "Page.loadEventFired":
                    loaded.set()

        async def send(method: str, session: str | None = None, **params) -> dict:
            number = next(ids)
            waiting[number] = asyncio.get_running_loop().create_future()
            await socket.send_json({"id": number, "method": method, "params": params,
                                    **({"sessionId": session} if session else {})})
            answer = await waiting[number]
            if "error" in answer:
                raise RuntimeError(f"{method}: {answer['error']}")
            return answer["result"]

        listener = asyncio.create_task(listen())
        target = (await send("Target.createTarget", url="about:blank"))["targetId"]
        session = (await send("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            await send(f"{domain}.enable", session)
        await send("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1,
                   mobile=False)
        await send("Page.navigate", session, url=url)
        await loaded.wait()
        await asyncio.sleep(0.5)  # late console messages and requests
        page = (await send("Runtime.evaluate", session, expression=CHECK_PAGE, returnByValue=True))["result"]["value"]
        shot = await send("Page.captureScreenshot", session, format="png")
        listener.cancel()
    return {"errors": errors, "requests": requests, "page": page, "screenshot": base64.b64decode(shot["data"])}

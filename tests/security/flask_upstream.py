"""A real Flask/Werkzeug upstream for tollgate's security tests (tests/it/e2e/security.rs).

Werkzeug's server routes a request target such as `foo:/paid/1` to `/paid/1`, which is what
made a target Pingora stores as `/` dangerous. Serves `/` and `/paid/<id>` on an ephemeral
loopback port, prints the port on its first line, and runs until stdin closes (the test's
handle on it), so it never outlives the test.
"""

import logging
import sys
import threading

from flask import Flask, request
from werkzeug.serving import make_server

app = Flask(__name__)
logging.getLogger("werkzeug").setLevel(logging.ERROR)


@app.get("/")
def home():
    return "home\n"


@app.route("/paid/<item>", methods=["GET", "POST"])
def paid(item):
    return f"PAID CONTENT {item} target={request.environ.get('REQUEST_URI', '')}\n"


def main():
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(server.server_port, flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()

"""moto's server for the tests, serving one request at a time.

moto's own `moto_server` serves requests on several threads, and its DynamoDB
check-then-update is not atomic across them; DynamoDB evaluates a condition and
applies the update atomically per item. Serving serially restores that, so the
exactness tests test PayFence, not the emulator. Usage: moto_server.py HOST PORT
"""

import os
import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import BaseWSGIServer, run_simple

# socketserver's default listen backlog is 5: bursts of connections would be refused.
BaseWSGIServer.request_queue_size = 4096

host, port = sys.argv[1], int(sys.argv[2])
os.environ.setdefault("MOTO_PORT", str(port))
run_simple(host, port, DomainDispatcherApplication(create_backend_app), threaded=False, use_reloader=False)

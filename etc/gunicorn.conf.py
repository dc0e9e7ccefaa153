"""gunicorn settings for an application that uses poolbroker's client.

    gunicorn -c etc/gunicorn.conf.py myapp:app

Workers hold no database connection: each asks the broker, whose cap
holds across all of them.  POOLBROKER_ENDPOINT selects the broker.
"""

import os

import client.gunicorn

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "4"))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gthread")
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
preload_app = os.environ.get("GUNICORN_PRELOAD", "1") == "1"

# Each worker starts with no socket or ZeroMQ context from the arbiter.
post_fork = client.gunicorn.post_fork

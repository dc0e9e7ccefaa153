"""A small WSGI app for the gunicorn end-to-end test: /?n=41 answers 42."""

import os

import client

client.configure(os.environ["POOLBROKER_ENDPOINT"], timeout=30)
# With preload_app the arbiter runs this before forking: its socket must
# never be reused by a worker.
client.execute("SELECT 1")


def app(environ, start_response):
    query = environ.get("QUERY_STRING", "")
    n = int(query.partition("n=")[2] or 0)
    if n % 5 == 0:
        with client.transaction() as tx:
            (value,) = tx.execute("SELECT %s::int + 1", [n]).rows[0]
    else:
        (value,) = client.execute("SELECT %s::int + 1", [n]).rows[0]
    body = str(value).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]

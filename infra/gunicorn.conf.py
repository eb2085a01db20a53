"""gunicorn settings for the API, read from the server's own config file ($SANDBOX_CONFIG).

    SANDBOX_CONFIG=server.toml python -m gunicorn -c infra/gunicorn.conf.py sandbox_server.wsgi:app

The supervisor (`interp-sandbox serve`) starts gunicorn exactly like this. Threads, not processes,
carry most concurrency: a request mostly waits (on SQLite, on a job with ?wait=), and the meta-device
model copies used for dry runs are per process. No preload: each web worker process opens its own
database connections after the fork.
"""
import os

from sandbox_server.config import ServerConfig

_config = ServerConfig.load(os.environ["SANDBOX_CONFIG"])

bind = f"{_config.host}:{_config.port}"
worker_class = "gthread"
workers = _config.web_workers
threads = _config.web_threads
# a request may block up to max_wait_s on GET /v1/jobs/<id>?wait=; leave room above it
timeout = int(_config.jobs.max_wait_s) + 30
graceful_timeout = 10
keepalive = 5
preload_app = False
accesslog = "-"          # stdout of gunicorn, which the supervisor passes through
errorlog = "-"
loglevel = "info"
# request size is bounded by the app (max_request_mb); these bound headers
limit_request_line = 8190
limit_request_fields = 100
# gunicorn >= 24 opens a control socket under $HOME by default: one path shared by every server of this
# user (two servers on one host would fight over it) and a management door we do not use
control_socket_disable = True

"""For running the API under the plain ``gunicorn`` command: the web tier's settings, from the server's config.

    SANDBOX_CONFIG=server.toml gunicorn -c infra/gunicorn.conf.py sandbox_server.wsgi:app
    SANDBOX_CONFIG=server.toml gunicorn -c infra/gunicorn.conf.py --bind unix:/run/sandbox.sock sandbox_server.wsgi:app

`interp-sandbox serve` does not read this file: it starts ``python -m sandbox_server.gunicorn_app``, which
sets the same settings in code (``sandbox_server.gunicorn_app.gunicorn_settings``), so a wheel install
serves the same way. Use this file when you want gunicorn's own command line, whose flags override it.
"""
import os

from sandbox_server.config import ServerConfig
from sandbox_server.gunicorn_app import gunicorn_settings

globals().update(gunicorn_settings(ServerConfig.load(os.environ["SANDBOX_CONFIG"])))

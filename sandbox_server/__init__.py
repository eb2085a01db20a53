"""interp-sandbox server: a Flask API (under gunicorn) in front of one worker process per model.

    interp-sandbox keys create --config server.toml --name alice       # prints the key once
    interp-sandbox serve --config server.toml                           # API + model workers + sweeper

Nothing imports this package; it uses the client's graph format and interpreter, the validator
and storage. See docs/ARCHITECTURE.md for the request's path and docs/api.md for the HTTP API.
"""

"""Sandbox server (issue 4): the HTTP API, keys, jobs and model workers that run validated graphs."""

"""sc.RemoteModel's parts that need no real server: the weightless tree, output lengths from the
shape template, error mapping, tokenizer files, result verification, job following;
then the whole client against a small in-process HTTP fake that runs graphs with a local model.

References: the HF model itself (named_modules, parameter shapes), forward hooks (output lengths),
storage's own signer and bundle encoder, and a local sc.LanguageModel on the same weights.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import torch
from conftest import ARCHS, build_tiny

import sandbox_client as sc
import storage
from sandbox_client.graph import Graph
from sandbox_client.interpreter.runner import probe_output_lengths
from sandbox_client.interpreter.shapes import ShapeTemplate
from sandbox_client.remote.api import error_from_response
from sandbox_client.remote.job import RemoteJob, job_error
from sandbox_client.remote.pins import CONFIG_ENV
from sandbox_client.remote.results import verified_values
from sandbox_client.remote.tokenizer import checked_files, tokenizer_from_files
from sandbox_client.remote.tree import module_tree
from validator.spec import ModelSpec

OTHER_KEY = storage.Signer.generate().public_key_b64   # a server key that signed nothing here
IDS = torch.tensor([[464, 412, 733, 8765, 318, 287, 262, 1748, 286]])


@pytest.fixture(scope="module")
def tiny() -> dict[str, torch.nn.Module]:
    return {arch: build_tiny(arch) for arch in ARCHS}


def spec_over_json(hf: torch.nn.Module, name: str = "tiny") -> ModelSpec:
    return ModelSpec.from_dict(json.loads(json.dumps(ModelSpec.from_module(hf, name=name).to_dict())))


def probe_template(hf: torch.nn.Module) -> ShapeTemplate:
    return ShapeTemplate.probe(hf, lambda b, t: {"input_ids": torch.randint(0, 1000, (b, t))})


# ----- the weightless tree -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_has_the_models_paths_types_and_tensor_specs(tiny, arch):
    hf = tiny[arch]
    tree = module_tree(spec_over_json(hf))
    assert [(p, type(m).__name__) for p, m in tree.named_modules()] == \
           [(p, type(m).__name__) for p, m in hf.named_modules()]
    got, want = dict(tree.named_modules()), dict(hf.named_modules())
    for path, module in want.items():
        assert list(got[path]._modules) == list(module._modules), path
        for kind in ("_parameters", "_buffers"):
            mine = {k: (v.shape, v.dtype, v.device.type) for k, v in getattr(got[path], kind).items()}
            theirs = {k: (v.shape, v.dtype, "meta") for k, v in getattr(module, kind).items() if v is not None}
            assert mine == theirs, (path, kind)
    assert sum(t.numel() for t in tree.parameters()) > 0
    assert all(t.is_meta for t in (*tree.parameters(), *tree.buffers()))


def test_tree_repr_indices_and_no_compute(tiny):
    tree = module_tree(spec_over_json(tiny["llama"]))
    assert "LlamaDecoderLayer" in repr(tree) and type(tree).__name__ == "LlamaForCausalLM"
    layer = tree.get_submodule
    assert type(layer("model.layers.0")) is type(layer("model.layers.3"))    # one class per type name
    lm = sc.Model(tree)
    assert lm.model.layers[-1]._path == "model.layers.3" and len(lm.model.layers) == 4
    with pytest.raises(sc.TraceError, match="runs only on the server"):
        tree(IDS)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_lengths_from_template_match_hooks(tiny, arch):
    hf = tiny[arch]
    template = ShapeTemplate.from_dict(json.loads(json.dumps(probe_template(hf).to_dict())))
    batch = sc.LanguageModel(hf).runner.probe_batch(Graph(invokes=[sc.graph.Invoke((IDS,), {})]).invokes)
    assert template.output_lengths() == probe_output_lengths(hf, batch)


# ----- HTTP errors -----------------------------------------------------------------------------------
def err_body(code: str, message: str = "m", node: int | None = None, source: str = "") -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "node": node, "source": source}}


@pytest.mark.parametrize(("status", "code", "cls"), [
    (401, "unauthorized", sc.AuthError), (403, "key_revoked", sc.AuthError), (403, "model_forbidden", sc.AuthError),
    (400, "unknown_target", sc.RemoteValidationError), (413, "request_too_large", sc.RemoteValidationError),
    (404, "model_not_found", sc.RemoteError), (503, "model_unavailable", sc.RemoteError),
    (410, "result_expired", sc.RemoteError),
])
def test_error_mapping(status, code, cls):
    err = error_from_response(status, err_body(code, "what to do", node=4, source="x = lm.foo  # t.py:3"))
    assert isinstance(err, cls) and isinstance(err, sc.SandboxError)
    assert type(err).__name__ == cls.__name__
    assert (err.code, err.status, err.node, err.message[:10]) == (code, status, 4, "what to do")
    assert err.source == "x = lm.foo  # t.py:3" and "(at x = lm.foo" in str(err)


@pytest.mark.parametrize(("code", "local"), [("shape", sc.InterventionError), ("module_path", sc.ModulePathError),
                                             ("order", sc.OrderError), ("too_many_nodes", None)])
def test_validation_codes_are_also_the_local_error_classes(code, local):
    err = error_from_response(400, err_body(code))
    assert isinstance(err, sc.RemoteValidationError)
    assert local is None or isinstance(err, local)
    assert type(err) is type(error_from_response(400, err_body(code)))


def test_rate_limit_has_retry_after_and_non_json_has_a_code():
    err = error_from_response(429, err_body("quota_exceeded"), {"Retry-After": "7"})
    assert isinstance(err, sc.RateLimitError) and err.retry_after == 7.0 and err.code == "quota_exceeded"
    plain = error_from_response(502, None)
    assert type(plain) is sc.RemoteError and plain.code == "http_502" and "502" in plain.message


# ----- tokenizer files ---------------------------------------------------------------------------------
def tokenizer_files(tok: Any, folder: Path) -> dict[str, str]:
    tok.save_pretrained(str(folder))
    return {p.name: p.read_text() for p in folder.iterdir() if p.is_file()}


def test_tokenizer_from_files_encodes_like_the_original(gpt2_tokenizer, tmp_path):
    tok = tokenizer_from_files(tokenizer_files(gpt2_tokenizer, tmp_path))
    text = "The Eiffel Tower is in the city of"
    assert tok(text)["input_ids"] == gpt2_tokenizer(text)["input_ids"]
    assert tok.pad_token_id == gpt2_tokenizer.pad_token_id


@pytest.mark.parametrize("name", ["../evil.json", "a/b.json", ".hidden", "", "x\\y", "a..b", 5])
def test_tokenizer_file_names_must_be_plain(name):
    with pytest.raises(sc.RemoteError, match="plain file names"):
        checked_files({name: "{}"})
    with pytest.raises(sc.RemoteError, match="not text"):
        checked_files({"vocab.json": b"{}"})


# ----- result verification -------------------------------------------------------------------------
SIGNER = storage.Signer.generate()


def signed(job_id: str, values: dict[str, Any], signer: storage.Signer = SIGNER) -> tuple[bytes, dict[str, Any]]:
    data = storage.encode_results(values)
    sha = hashlib.sha256(data).hexdigest()
    return data, {"url": f"/v1/jobs/{job_id}/result", "sha256": sha, "size": len(data),
                  "signature": signer.sign(storage.result_message(job_id, sha))}


def test_verified_values_decode_with_int_keys():
    value = torch.randn(2, 3, dtype=torch.bfloat16)
    data, result = signed("j1", {"3": value, "5": (1, None, "x")})
    out = verified_values("j1", data, result, SIGNER.public_key_b64)
    assert set(out) == {3, 5} and torch.equal(out[3], value) and out[5] == (1, None, "x")


def test_tampered_bytes_other_key_or_other_job_are_refused():
    data, result = signed("j1", {"0": torch.ones(4)})
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(sc.ResultVerificationError) as info:
        verified_values("j1", tampered, result, SIGNER.public_key_b64)
    assert info.value.code == "sha256_mismatch"
    with pytest.raises(sc.ResultVerificationError) as info:
        verified_values("j1", data, result, OTHER_KEY)
    assert info.value.code == "bad_signature" and "known_servers" in str(info.value)
    with pytest.raises(sc.ResultVerificationError, match="not signed"):
        verified_values("j2", data, {**result}, SIGNER.public_key_b64)   # j1's result offered as j2's
    with pytest.raises(sc.ResultVerificationError):
        verified_values("j1", data, {**result, "signature": "%%%"}, SIGNER.public_key_b64)


# ----- following a job ----------------------------------------------------------------------------------
class FakeApi:
    """Answers job GETs from a list of Job dicts (the last one repeats) and serves one result."""

    def __init__(self, states: list[dict[str, Any]], data: bytes = b"") -> None:
        self.states, self.data, self.calls = states, data, []

    def get_json(self, path: str, params: Any = None, **kwargs: Any) -> Any:
        self.calls.append(("GET", path, params))
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def delete_json(self, path: str) -> Any:
        self.calls.append(("DELETE", path, None))
        raise sc.RemoteError("already_finished", "the job has already finished", status=409)

    def download(self, url: str, progress: Callable[[int, int | None], None] | None = None) -> bytes:
        self.calls.append(("DOWNLOAD", url, None))
        return self.data


def job_dict(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "j1", "status": status, "position": None, "error": None, "result": None, **extra}


def test_job_follows_status_lines_then_verifies(capsys):
    data, result = signed("j1", {"2": torch.arange(3)})
    api = FakeApi([job_dict("RUNNING"), job_dict("COMPLETED", result=result)], data)
    job = RemoteJob(api, job_dict("QUEUED", position=2), lambda: SIGNER.public_key_b64)  # type: ignore[arg-type]
    assert torch.equal(job.wait()[2], torch.arange(3))
    assert job.wait() is job.wait()            # downloaded once
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["interp-sandbox: job j1: queued at position 2", "interp-sandbox: job j1: running",
                     "interp-sandbox: job j1: downloading"]
    assert [c[0] for c in api.calls] == ["GET", "GET", "DOWNLOAD"]
    assert all(c[2] and float(c[2]["wait"]) > 0 for c in api.calls if c[0] == "GET")   # long polls, no sleeps


def test_an_inline_result_is_verified_without_a_download():
    data, result = signed("j1", {"2": torch.arange(3)})
    inline = {**result, "data": base64.b64encode(data).decode()}
    api = FakeApi([job_dict("COMPLETED", result=inline)], b"never fetched")
    job = RemoteJob(api, job_dict("RUNNING"), lambda: SIGNER.public_key_b64, verbose=False)  # type: ignore[arg-type]
    assert torch.equal(job.wait()[2], torch.arange(3))
    assert [(c[0], c[2]["inline"]) for c in api.calls] == [("GET", "1")]      # asked for it; no download
    assert "data" not in job.info["result"]                                   # not kept twice


def test_altered_inline_bytes_are_refused_and_bad_base64_falls_back_to_the_url():
    data, result = signed("j1", {"2": torch.arange(3)})
    altered = bytearray(data)
    altered[len(altered) // 2] ^= 0xFF
    api = FakeApi([job_dict("COMPLETED", result={**result, "data": base64.b64encode(bytes(altered)).decode()})])
    with pytest.raises(sc.ResultVerificationError) as info:
        RemoteJob(api, job_dict("RUNNING"), lambda: SIGNER.public_key_b64,  # type: ignore[arg-type]
                  verbose=False).wait()
    assert info.value.code == "sha256_mismatch" and [c[0] for c in api.calls] == ["GET"]
    api = FakeApi([job_dict("COMPLETED", result={**result, "data": "not base64!"})], data)
    values = RemoteJob(api, job_dict("RUNNING"), lambda: SIGNER.public_key_b64,  # type: ignore[arg-type]
                       verbose=False).wait()
    assert torch.equal(values[2], torch.arange(3)) and [c[0] for c in api.calls] == ["GET", "DOWNLOAD"]


def test_quiet_job_errors_cancel_and_timeout(capsys):
    failed = job_dict("ERROR", error={"code": "intervention", "message": "shape mismatch", "node": 3,
                                      "source": "h[:, 99] = 0  # t.py:7"})
    api = FakeApi([failed])
    with pytest.raises(sc.JobError) as info:
        RemoteJob(api, job_dict("RUNNING"), lambda: "", verbose=False).wait()  # type: ignore[arg-type]
    assert (info.value.code, info.value.node, info.value.source) == ("intervention", 3, "h[:, 99] = 0  # t.py:7")
    assert isinstance(info.value, sc.InterventionError)    # as a local run would raise
    assert job_error(failed).message == "shape mismatch"
    with pytest.raises(sc.JobCancelled):
        RemoteJob(FakeApi([job_dict("CANCELLED")]), job_dict("QUEUED"), lambda: "",  # type: ignore[arg-type]
                  verbose=False).wait()
    slow = RemoteJob(FakeApi([job_dict("RUNNING")]), job_dict("RUNNING"), lambda: "",  # type: ignore[arg-type]
                     verbose=False)
    with pytest.raises(sc.JobTimeoutError):
        slow.wait(timeout=0.05)
    assert slow.cancel()["status"] == "RUNNING"    # already_finished is not an error: the state is returned
    assert capsys.readouterr().err == ""


# ----- the whole client against an in-process fake server --------------------------------------------------
class FakeServer:
    """A minimal HTTP API: model info, tokenizer, public key, and jobs run at once by a local model."""

    def __init__(self, hf: torch.nn.Module, tok: Any, tok_files: dict[str, str], signer: storage.Signer) -> None:
        self.lm = sc.LanguageModel(hf, tokenizer=tok)
        self.signer = signer
        self.info = {"name": "tiny-llama", "kind": "language_model", "status": "ready", "tokenizer": True,
                     "spec": ModelSpec.from_module(hf, name="tiny-llama").to_dict(),
                     "template": probe_template(hf).to_dict()}
        self.tok_files = tok_files
        self.results: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.key = "isk_a_b"

    def handle(self, method: str, path: str, query: dict[str, Any], headers: Any, body: bytes) -> tuple[int, Any]:
        if path == "/v1/public-key":
            return 200, {"algorithm": "ed25519", "public_key": self.signer.public_key_b64, "fingerprint": "SHA256:x"}
        if headers.get("Authorization") != f"Bearer {self.key}" and not path.startswith("/blobs/"):
            return 401, err_body("unauthorized", "bad key")
        if path == "/v1/models/tiny-llama":
            return 200, self.info
        if path == "/v1/models/tiny-llama/tokenizer":
            return 200, {"files": self.tok_files}
        if path == "/v1/jobs" and method == "POST":
            return 202, self.run(json.loads(body))
        if path.startswith("/blobs/"):
            return 200, self.results[path]
        job = self.jobs.get(path.split("/")[3])
        if job is None:
            return 404, err_body("job_not_found")
        return 200, job

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        job_id = f"j{len(self.jobs)}"
        values = self.lm.runner.run(Graph.from_json(request["graph"]))
        data, result = signed(job_id, {str(k): v for k, v in values.items()}, self.signer)
        result["url"] = f"{self.url}/blobs/{job_id}"   # absolute, like a presigned S3 URL
        self.results[f"/blobs/{job_id}"] = data
        self.jobs[job_id] = job_dict("COMPLETED", id=job_id, result=result)
        return job_dict("QUEUED", id=job_id, position=0)

    url = ""


@pytest.fixture(scope="module")
def fake(tiny, gpt2_tokenizer, tmp_path_factory) -> Iterator[FakeServer]:
    files = tokenizer_files(gpt2_tokenizer, tmp_path_factory.mktemp("tok"))
    server = FakeServer(tiny["llama"], gpt2_tokenizer, files, storage.Signer.generate())
    seen: list[tuple[str, str, bool]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, parts.path, "Authorization" in self.headers))
            status, out = server.handle(self.command, parts.path, parse_qs(parts.query), self.headers, body)
            raw = out if isinstance(out, bytes) else json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    server.seen = seen  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    httpd.shutdown()


@pytest.fixture
def remote(fake, tmp_path, monkeypatch) -> sc.RemoteModel:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path))
    return sc.RemoteModel("tiny-llama", host=fake.url, api_key=fake.key, verbose=False)


def test_remote_trace_equals_local_and_fetches_blob_without_key(fake, remote, tmp_path):
    assert (tmp_path / "known_servers").read_text().split() == [fake.url, "ed25519", fake.signer.public_key_b64]
    assert repr(remote) == f"RemoteModel('tiny-llama' on {fake.url}: LlamaForCausalLM)"
    with remote.trace(IDS):
        logits = remote.lm_head.output.save()
        h = remote.model.layers[1].output.save()
    with fake.lm.trace(IDS):
        want_logits = fake.lm.lm_head.output.save()
        want_h = fake.lm.model.layers[1].output.save()
    assert torch.equal(logits.value, want_logits.value) and torch.equal(h.value, want_h.value)
    blob = [s for s in fake.seen if s[1].startswith("/blobs/")][-1]
    assert blob[2] is False     # an absolute result URL gets no Authorization header


def test_remote_prompt_non_blocking_and_unpacking(fake, remote):
    prompt = "The Eiffel Tower is in the city of"
    tracer = remote.trace(prompt, blocking=False)
    with tracer:
        n = len(remote.model.layers[0].self_attn.output)
        attn, *_ = remote.model.layers[0].self_attn.output
        a = attn.save()
    assert isinstance(tracer.job, sc.RemoteJob)
    with fake.lm.trace(prompt):
        want = fake.lm.model.layers[0].self_attn.output[0].save()
    assert torch.equal(a.value, want.value)
    seen = []
    handle = fake.lm._module.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: seen.append(len(o)))
    with torch.no_grad():
        fake.lm._module(IDS)
    handle.remove()
    assert n == seen[0] == 2


def test_remote_scan_equals_local_scan_and_tokenizer_loads(fake, remote):
    with remote.scan("Hello there, world"):
        h = remote.model.layers[2].output.save()
        logits = remote.output.logits.save()
    with fake.lm.scan("Hello there, world"):
        want_h = fake.lm.model.layers[2].output.save()
        want_logits = fake.lm.output.logits.save()
    assert (h.value.shape, h.value.dtype) == (want_h.value.shape, want_h.value.dtype)
    assert logits.value.shape == want_logits.value.shape
    assert remote.tokenizer.decode(remote.tokenizer("Hello")["input_ids"]) == "Hello"
    with pytest.raises(sc.TraceError, match="local sc.LanguageModel"):
        with remote.scan("Hello"):
            remote.lm_head(remote.model.layers[0].output).save()


def test_bad_key_and_pin_mismatch_at_connect(fake, tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path))
    with pytest.raises(sc.AuthError) as info:
        sc.RemoteModel("tiny-llama", host=fake.url, api_key="isk_wrong_x", verbose=False)
    assert (info.value.code, info.value.status) == ("unauthorized", 401)
    (tmp_path / "known_servers").write_text(f"{fake.url} ed25519 {OTHER_KEY}\n")
    with pytest.raises(sc.ResultVerificationError, match="delete the line"):
        sc.RemoteModel("tiny-llama", host=fake.url, api_key=fake.key, verbose=False)
    monkeypatch.delenv("SANDBOX_HOST", raising=False)
    with pytest.raises(sc.RemoteError, match="SANDBOX_HOST"):
        sc.RemoteModel("tiny-llama", api_key=fake.key)
    monkeypatch.setenv("SANDBOX_HOST", fake.url)
    monkeypatch.setenv("SANDBOX_API_KEY", fake.key)
    os.remove(tmp_path / "known_servers")
    assert sc.RemoteModel("tiny-llama", verbose=False).info["name"] == "tiny-llama"

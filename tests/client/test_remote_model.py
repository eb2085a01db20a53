"""sc.RemoteModel against a real server (gunicorn + model workers, tests/serverproc.py): every core
feature gives bitwise the values a local sc.LanguageModel gives on the same weights, plus what
only remote runs have: non-blocking jobs, cancel, result verification and key pinning.

Reference: sc.LanguageModel(conftest.build_tiny(arch), gpt2 tokenizer) running the same user code
in this process (its own correctness is what the other tests in tests/client check against raw hooks).
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ARCHS, build_tiny
from refhooks import attn, layer

import sandbox_client as sc
from sandbox_client.remote.pins import CONFIG_ENV

EIFFEL = "The Eiffel Tower is in the city of"
ROME = "Rome is the capital of"
TOK = 6342   # ' Paris'

Run = Callable[[sc.LanguageModel, str], dict[str, Any]]


@pytest.fixture(scope="module")
def local_models(gpt2_tokenizer) -> dict[str, sc.LanguageModel]:
    return {arch: sc.LanguageModel(build_tiny(arch), tokenizer=gpt2_tokenizer) for arch in ARCHS}


@pytest.fixture(scope="module")
def remote_models(sandbox_server) -> dict[str, sc.RemoteModel]:
    server, key = sandbox_server
    return {arch: sc.RemoteModel(f"tiny-{arch}", host=server.url, api_key=key, verbose=False) for arch in ARCHS}


def values(saved: Any) -> Any:
    if isinstance(saved, sc.Proxy):
        return saved.value
    if isinstance(saved, dict):
        return {k: values(v) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        return [values(v) for v in saved]
    return saved


def assert_bitwise(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for k in want:
            assert_bitwise(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_bitwise(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def same_remotely(run: Run, arch: str, local_models: dict[str, sc.LanguageModel],
                  remote_models: dict[str, sc.RemoteModel]) -> dict[str, Any]:
    want = values(run(local_models[arch], arch))
    got = values(run(remote_models[arch], arch))
    assert_bitwise(got, want)
    return got


# ----- the same user code, locally and remotely ---------------------------------------------------
def plain_trace(lm: sc.LanguageModel, arch: str) -> dict[str, Any]:
    with lm.trace(EIFFEL):
        attn_out, _weights = attn(lm, arch, 1).output      # a 2-tuple: len() from the shape template remotely
        out = {"attn1": attn_out.save(), "h1": layer(lm, arch, 1).output.save(),
               "logits": lm.lm_head.output.save(), "top": lm.output.logits[:, -1].argmax(-1).save()}
    return out


def invokes_with_patch(lm: sc.LanguageModel, arch: str) -> dict[str, Any]:
    with lm.trace() as tracer:
        with tracer.invoke(EIFFEL):
            clean = layer(lm, arch, 2).output[:, -1]
            clean_logits = lm.output.logits[:, -1].save()
        with tracer.invoke(ROME):
            layer(lm, arch, 2).output[:, -1] = clean
            patched = lm.output.logits[:, -1].save()
    return {"clean": clean_logits, "patched": patched}


def gradients(lm: sc.LanguageModel, arch: str) -> dict[str, Any]:
    with lm.trace(EIFFEL):
        g1 = layer(lm, arch, 1).output.grad.save()
        layer(lm, arch, 2).output.grad = layer(lm, arch, 2).output.grad * 2
        loss = -lm.output.logits[0, -1].log_softmax(-1)[TOK]
        loss.backward()
        saved_loss = loss.save()
    return {"g1": g1, "loss": saved_loss}


def generate_with_steps(lm: sc.LanguageModel, arch: str) -> dict[str, Any]:
    with lm.generate(EIFFEL, max_new_tokens=4) as tracer:
        with tracer.all_steps():
            tops = lm.lm_head.output[:, -1].argmax(-1).save()
        with tracer.step(2):
            lm.lm_head.output[:, -1, 1000] = 1e4      # force token 1000 at the third step
        ids = tracer.result.save()
    return {"tops": tops, "ids": ids}


def skip_and_stop(lm: sc.LanguageModel, arch: str) -> dict[str, Any]:
    with lm.trace(EIFFEL) as tracer:
        layer(lm, arch, 1).skip(layer(lm, arch, 1).input)
        h2 = layer(lm, arch, 2).output.save()
        tracer.stop()
    return {"h2": h2}


def clamp_norms(h, limit):
    norms = h.norm(dim=-1, keepdim=True)
    return h * torch.where(norms > limit, limit / norms, torch.ones_like(norms))


def apply_function(lm: sc.LanguageModel, arch: str) -> dict[str, Any]:
    with lm.trace(EIFFEL):
        clamped = sc.apply(clamp_norms, layer(lm, arch, 3).output, 1.0).save()
        logits = lm.output.logits.save()
    return {"clamped": clamped, "logits": logits}


@pytest.mark.parametrize("arch", ARCHS)
def test_trace_and_unpacking_equal_local(local_models, remote_models, arch):
    got = same_remotely(plain_trace, arch, local_models, remote_models)
    assert got["logits"].shape == (1, 10, 50257) and got["attn1"].shape == (1, 10, 64)


@pytest.mark.parametrize("arch", ARCHS)
def test_invokes_with_patching_equal_local(local_models, remote_models, arch):
    got = same_remotely(invokes_with_patch, arch, local_models, remote_models)
    assert not torch.equal(got["clean"], got["patched"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradients_equal_local(local_models, remote_models, arch):
    got = same_remotely(gradients, arch, local_models, remote_models)
    assert got["g1"].abs().sum() > 0


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_generate_with_steps_equals_local(local_models, remote_models, arch):
    got = same_remotely(generate_with_steps, arch, local_models, remote_models)
    assert len(got["tops"]) == 4 and int(got["ids"][0, -2]) == 1000


@pytest.mark.parametrize("arch", ["llama"])
def test_skip_and_stop_equal_local(local_models, remote_models, arch):
    same_remotely(skip_and_stop, arch, local_models, remote_models)


@pytest.mark.parametrize("arch", ["gpt2"])
def test_apply_equals_local(local_models, remote_models, arch):
    same_remotely(apply_function, arch, local_models, remote_models)


def test_scan_equals_local_scan(local_models, remote_models):
    local, remote = local_models["llama"], remote_models["llama"]
    shapes = []
    for lm in (local, remote):
        with lm.scan(EIFFEL):
            h = lm.model.layers[1].output.save()
        shapes.append((h.value.shape, h.value.dtype))
    assert shapes[0] == shapes[1]


# ----- only remote ---------------------------------------------------------------------------------
def test_non_blocking_trace_and_generate(local_models, remote_models):
    remote, local = remote_models["llama"], local_models["llama"]
    tracer = remote.trace(EIFFEL, blocking=False)
    with tracer:
        logits = remote.lm_head.output.save()
    job = tracer.job
    assert isinstance(job, sc.RemoteJob)
    gen = remote.generate(ROME, max_new_tokens=3, blocking=False)
    with gen:
        ids = gen.result.save()
    with local.trace(EIFFEL):
        want = local.lm_head.output.save()
    assert torch.equal(logits.value, want.value)    # .value waits for the job
    assert job.status() == "COMPLETED" and job.info["result"]["sha256"]
    assert set(gen.job.wait()) == {ids._id}
    with local.generate(ROME, max_new_tokens=3) as t:
        want_ids = t.result.save()
    assert torch.equal(ids.value, want_ids.value)


def test_cancel_a_queued_job(remote_models):
    remote = remote_models["gpt2"]
    tracers = []
    for _ in range(4):   # the worker runs one job at a time: the last one is still queued when cancelled
        tracer = remote.generate(EIFFEL, max_new_tokens=40, blocking=False)
        with tracer:
            out = tracer.result.save()
        tracers.append((tracer, out))
    last, out = tracers[-1]
    info = last.job.cancel()
    assert info["status"] in ("CANCELLED", "RUNNING") or info["cancel_requested"]
    with pytest.raises(sc.JobCancelled):
        last.job.wait(timeout=30)
    with pytest.raises(sc.JobCancelled):
        _ = out.value
    assert last.job.status() == "CANCELLED"
    for tracer, _ in tracers[:-1]:
        tracer.job.wait(timeout=60)


def alter_once_completed(server: Any, job: sc.RemoteJob) -> None:
    """Wait until ``job`` is COMPLETED, then flip one byte of its stored result."""
    deadline = time.monotonic() + 60
    while job.refresh(wait=5)["status"] != "COMPLETED":
        assert time.monotonic() < deadline
    blob = stored_blob(Path(server.data_dir), job.info["result"]["sha256"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


def test_tampered_result_is_refused_and_nothing_is_loaded(sandbox_server, remote_models):
    server, _ = sandbox_server
    remote = remote_models["gpt2"]
    tracer = remote.trace(EIFFEL, blocking=False)
    with tracer:
        logits = remote.lm_head.output.save()
    alter_once_completed(server, tracer.job)
    with pytest.raises(sc.ResultVerificationError) as info:
        _ = logits.value
    assert info.value.code == "sha256_mismatch" and "nothing was loaded" in str(info.value)


def test_a_tampered_inline_result_is_refused_too(sandbox_server, remote_models):
    server, _ = sandbox_server
    remote = remote_models["gpt2"]
    tracer = remote.trace(EIFFEL, blocking=False)
    with tracer:
        h = remote.lm_head.output[:, -1].save()
    alter_once_completed(server, tracer.job)
    assert "data" in tracer.job.refresh(inline=True)["result"]       # the server now inlines the altered bytes
    with pytest.raises(sc.ResultVerificationError) as info:
        _ = h.value
    assert info.value.code == "sha256_mismatch"


def test_a_blocking_trace_is_one_request_unless_its_result_is_large(sandbox_server, remote_models, local_models):
    remote, local = remote_models["gpt2"], local_models["gpt2"]
    session = remote.session.api._session
    sent: list[str] = []
    send = session.request

    def counting(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(f"{method} {url.split('?')[0].rsplit('/', 2)[-2:]}")
        return send(method, url, *args, **kwargs)

    session.request = counting   # type: ignore[method-assign]
    try:
        with remote.trace(EIFFEL):
            small = remote.lm_head.output[:, -1].save()     # 50,257 floats: 200 KB, inside the answer
        assert len(sent) == 1 and sent[0].startswith("POST"), sent
        with remote.trace(EIFFEL):       # 10 tokens x 50,257 logits: 2 MB, over the 1 MiB inline limit
            big = remote.lm_head.output.save()
        assert len(sent) == 3 and sent[2].startswith("GET"), sent
    finally:
        del session.request
    with local.trace(EIFFEL):
        want_small = local.lm_head.output[:, -1].save()
        want_big = local.lm_head.output.save()
    assert_bitwise(small.value, want_small.value)
    assert_bitwise(big.value, want_big.value)


def stored_blob(data_dir: Path, sha256: str) -> Path:
    for path in data_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return path
    raise AssertionError(f"no stored result with sha256 {sha256} under {data_dir}")


def test_pin_mismatch_and_wrong_explicit_key_refuse_to_connect(sandbox_server, tmp_path, monkeypatch):
    server, key = sandbox_server
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path))
    first = sc.RemoteModel("tiny-gpt2", host=server.url, api_key=key, verbose=False)
    pin = (tmp_path / "known_servers").read_text().split()
    assert pin[:2] == [server.url, "ed25519"] and first.session.public_key == pin[2]
    other = "A" * 43 + "="
    (tmp_path / "known_servers").write_text(f"{server.url} ed25519 {other}\n")
    with pytest.raises(sc.ResultVerificationError, match="delete the line") as info:
        sc.RemoteModel("tiny-gpt2", host=server.url, api_key=key, verbose=False)
    assert info.value.code == "pin_mismatch"
    with pytest.raises(sc.ResultVerificationError, match="public_key="):
        sc.RemoteModel("tiny-gpt2", host=server.url, api_key=key, public_key=other, verbose=False)
    explicit = sc.RemoteModel("tiny-gpt2", host=server.url, api_key=key, public_key=pin[2], verbose=False)
    with explicit.trace(EIFFEL):
        top = explicit.output.logits[:, -1].argmax(-1).save()
    assert top.value.shape == (1,)


def test_server_errors_are_typed(sandbox_server, remote_models):
    server, key = sandbox_server
    with pytest.raises(sc.AuthError) as auth:
        sc.RemoteModel("tiny-gpt2", host=server.url, api_key="isk_nope_nope", verbose=False)
    assert (auth.value.code, auth.value.status) == ("unauthorized", 401)
    with pytest.raises(sc.RemoteError) as missing:
        sc.RemoteModel("no-such-model", host=server.url, api_key=key, verbose=False)
    assert (missing.value.code, missing.value.status) == ("model_not_found", 404)
    remote = remote_models["llama"]
    with pytest.raises(sc.InterventionError) as bad:
        with remote.trace(EIFFEL):
            remote.model.layers[1].output[:, :, 10**6].save()
    assert isinstance(bad.value, sc.RemoteError) and "test_remote_model.py" in bad.value.source


def test_status_lines_on_stderr(sandbox_server, capfd):
    server, key = sandbox_server
    remote = sc.RemoteModel("tiny-llama", host=server.url, api_key=key)
    with remote.trace(EIFFEL):
        remote.lm_head.output.save()
    err = capfd.readouterr().err
    assert "interp-sandbox: job " in err and "downloading" in err


def test_quota_and_model_permissions_are_typed(sandbox_server):
    server, _ = sandbox_server
    limited = sc.RemoteModel("tiny-gpt2", host=server.url, verbose=False,
                             api_key=server.create_key("one-a-day", models=["tiny-gpt2"], daily_jobs=1))
    with limited.trace(EIFFEL):
        limited.lm_head.output.save()
    with pytest.raises(sc.RateLimitError) as info:
        with limited.trace(EIFFEL):
            limited.lm_head.output.save()
    assert info.value.code == "quota_exceeded" and info.value.status == 429 and info.value.retry_after >= 1
    with pytest.raises(sc.AuthError) as forbidden:
        sc.RemoteModel("tiny-llama", host=server.url, verbose=False,
                       api_key=server.create_key("gpt2-only", models=["tiny-gpt2"]))
    assert (forbidden.value.code, forbidden.value.status) == ("model_forbidden", 403)

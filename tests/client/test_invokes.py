"""tracer.invoke(): several inputs batched into ONE forward, each invoke seeing only its own rows.

References are unpadded single-prompt runs of the same Hugging Face model with raw hooks. Strings are
left-padded, so an invoke's row is compared on its last n real tokens, with allclose (padding changes the
attention kernels' inputs, not the maths).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from reference import assert_same, count_calls, layer, mlp, run_hf, token_ids
from torch import nn

SHORT = "Hi there"                                  # 2 tokens
LONG = "The Eiffel Tower is in the city of"        # 10 tokens
CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"
TOL = 1e-5


def alone(hf: nn.Module, tok: Any, prompt: str, arch: str, k: int,
          **hooks: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, layer-k output) of the prompt run alone, unpadded, with optional raw hooks."""
    out, (h,) = run_hf(hf, token_ids(tok, prompt), capture=[layer(hf, arch, k)], **hooks)
    return out.logits, h


def last(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last n positions (the real tokens of a left-padded row)."""
    return x[:, x.shape[1] - n:]


def test_two_invokes_run_one_forward_and_match_single_runs(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                                           arch: str, wire: str) -> None:
    with count_calls(hf) as calls:
        with lm.trace() as tracer:
            with tracer.invoke(SHORT):
                h0 = layer(lm, arch, 2).output.save()
                l0 = lm.output.logits.save()
            with tracer.invoke(LONG):
                h1 = layer(lm, arch, 2).output.save()
                l1 = lm.output.logits.save()
    if wire != "remote":   # remotely the forward runs in the server's worker, where these hooks cannot count
        assert len(calls) == 1, f"expected one batched forward, got {len(calls)}"
        args, kwargs = calls[0]
        batch_ids = kwargs.get("input_ids", args[0] if args else None)
        assert batch_ids is not None and batch_ids.shape[0] == 2

    for prompt, h, logits in ((SHORT, h0, l0), (LONG, h1, l1)):
        n = token_ids(gpt2_tokenizer, prompt).shape[1]
        exp_logits, exp_h = alone(hf, gpt2_tokenizer, prompt, arch, 2)
        assert h.value.shape[0] == 1 and logits.value.shape[0] == 1
        assert_same(last(h.value, n), exp_h, exact=False, atol=TOL)
        assert_same(last(logits.value, n), exp_logits, exact=False, atol=TOL)


def test_edit_in_one_invoke_does_not_leak(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                          arch: str, wire: str) -> None:
    with lm.trace() as tracer:
        with tracer.invoke(LONG):
            l0 = lm.output.logits.save()
        with tracer.invoke(SHORT):
            mlp(lm, arch, 1).output[:] = 0
            l1 = lm.output.logits.save()

    def zero(_m: nn.Module, _a: Any, o: torch.Tensor) -> None:
        o[:] = 0

    exp0, _ = alone(hf, gpt2_tokenizer, LONG, arch, 0)
    exp1, _ = alone(hf, gpt2_tokenizer, SHORT, arch, 0, fwd=[(mlp(hf, arch, 1), zero)])
    assert_same(last(l0.value, 10), exp0, exact=False, atol=TOL)
    assert_same(last(l1.value, 2), exp1, exact=False, atol=TOL)


def test_replacement_in_one_invoke_does_not_leak(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                                 arch: str, wire: str) -> None:
    with lm.trace() as tracer:
        with tracer.invoke(SHORT):
            m = mlp(lm, arch, 2)
            m.output = m.output * 3
            l0 = lm.output.logits.save()
        with tracer.invoke(LONG):
            l1 = lm.output.logits.save()
    exp0, _ = alone(hf, gpt2_tokenizer, SHORT, arch, 0,
                    fwd=[(mlp(hf, arch, 2), lambda _m, _a, o: o * 3)])
    exp1, _ = alone(hf, gpt2_tokenizer, LONG, arch, 0)
    assert_same(last(l0.value, 2), exp0, exact=False, atol=TOL)
    assert_same(last(l1.value, 10), exp1, exact=False, atol=TOL)


def test_invoke_reads_see_only_their_rows(lm: Any, arch: str, wire: str) -> None:
    with lm.trace() as tracer:
        with tracer.invoke([SHORT, LONG]):
            s0 = layer(lm, arch, 1).output.shape.save()
            m0 = mlp(lm, arch, 1).output.save()
        with tracer.invoke(SHORT):
            s1 = layer(lm, arch, 1).output.shape.save()
            m1 = mlp(lm, arch, 1).output.save()
    assert s0.value[0] == 2 and m0.value.shape[0] == 2
    assert s1.value[0] == 1 and m1.value.shape[0] == 1
    assert s0.value[1:] == s1.value[1:]


def test_list_str_invoke_has_two_rows(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                      arch: str, wire: str) -> None:
    with count_calls(hf) as calls:
        with lm.trace() as tracer:
            with tracer.invoke([LONG, SHORT]):
                h01 = layer(lm, arch, 3).output.save()
                l01 = lm.output.logits.save()
            with tracer.invoke(CORRUPT):
                l2 = lm.output.logits.save()
    assert len(calls) == (0 if wire == "remote" else 1)
    assert h01.value.shape[0] == 2 and l01.value.shape[0] == 2 and l2.value.shape[0] == 1
    for row, prompt in enumerate((LONG, SHORT)):
        n = token_ids(gpt2_tokenizer, prompt).shape[1]
        exp_logits, exp_h = alone(hf, gpt2_tokenizer, prompt, arch, 3)
        assert_same(last(h01.value[row:row + 1], n), exp_h, exact=False, atol=TOL)
        assert_same(last(l01.value[row:row + 1], n), exp_logits, exact=False, atol=TOL)
    exp2, _ = alone(hf, gpt2_tokenizer, CORRUPT, arch, 0)
    assert_same(last(l2.value, exp2.shape[1]), exp2, exact=False, atol=TOL)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("prompts", ["same_length", "different_length"])
def test_activation_patching_clean_to_corrupted(lm: Any, hf: nn.Module, gpt2_tokenizer: Any, arch: str,
                                                k: int, prompts: str, wire: str) -> None:
    clean, corrupt = (CLEAN, CORRUPT) if prompts == "same_length" else (CLEAN, SHORT)
    with lm.trace() as tracer:
        with tracer.invoke(clean):
            clean_h = layer(lm, arch, k).output[:, -1, :]
            clean_logits = lm.output.logits.save()
        with tracer.invoke(corrupt):
            layer(lm, arch, k).output[:, -1, :] = clean_h
            patched_logits = lm.output.logits.save()

    # raw-hook two-pass reference: capture clean last-token output, then write it into the corrupted run
    exp_clean, clean_out = alone(hf, gpt2_tokenizer, clean, arch, k)

    def patch(_m: nn.Module, _a: Any, o: torch.Tensor) -> None:
        o[:, -1, :] = clean_out[:, -1, :]

    exp_patched, _ = alone(hf, gpt2_tokenizer, corrupt, arch, k, fwd=[(layer(hf, arch, k), patch)])
    exp_unpatched, _ = alone(hf, gpt2_tokenizer, corrupt, arch, k)
    n_clean, n_corrupt = exp_clean.shape[1], exp_patched.shape[1]
    assert_same(last(clean_logits.value, n_clean), exp_clean, exact=False, atol=TOL)
    assert_same(last(patched_logits.value, n_corrupt), exp_patched, exact=False, atol=TOL)
    assert not torch.allclose(exp_patched[:, -1], exp_unpatched[:, -1], atol=1e-4)  # the patch matters


def test_values_flow_from_earlier_invoke_as_whole_tensor(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                                         arch: str, wire: str) -> None:
    """Same-length prompts: replace the whole mlp output of invoke 1 with invoke 0's."""
    with lm.trace() as tracer:
        with tracer.invoke(CLEAN):
            src = mlp(lm, arch, 0).output
        with tracer.invoke(CORRUPT):
            mlp(lm, arch, 0).output = src
            patched = lm.output.logits.save()
    _, (clean_mlp,) = run_hf(hf, token_ids(gpt2_tokenizer, CLEAN), capture=[mlp(hf, arch, 0)])
    exp, _ = alone(hf, gpt2_tokenizer, CORRUPT, arch, 0,
                   fwd=[(mlp(hf, arch, 0), lambda _m, _a, _o: clean_mlp)])
    assert_same(patched.value, exp, exact=False, atol=TOL)


def test_trace_with_input_equals_single_invoke(lm: Any, hf: nn.Module, gpt2_tokenizer: Any,
                                               arch: str, wire: str) -> None:
    """lm.trace(x) is one implicit invoke: bitwise equal to lm.trace() + invoke(x) and to a plain forward."""
    with lm.trace(LONG):
        a = lm.output.logits.save()
    with lm.trace() as tracer:
        with tracer.invoke(LONG):
            b = lm.output.logits.save()
    exp, _ = alone(hf, gpt2_tokenizer, LONG, arch, 0)
    assert_same(a.value, exp)
    assert_same(b.value, exp)

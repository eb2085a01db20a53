"""Generation: tracer.result, tracer.step(i), tracer.all_steps(), edits per step, steps that never run.

References: hf.generate(ids, max_new_tokens=N, do_sample=False) with raw forward hooks that capture or edit
a module's output at the k-th forward call (refhooks.generate_capturing).
"""
from __future__ import annotations

import pytest
import torch
from conftest import lm_for
from refhooks import PROMPT_IDS, generate_capturing, layer

import sandbox_client as sc

N = 4
FORCED = 1000  # an arbitrary token id the edits force


@pytest.fixture
def lm(request, tiny_hf, gpt2_tokenizer):
    return lm_for(request, tiny_hf, gpt2_tokenizer)


@pytest.fixture
def plain(tiny_hf):
    """The unedited greedy generation; the tests need all N tokens generated (no early eos)."""
    tokens, _ = generate_capturing(tiny_hf, PROMPT_IDS, N)
    assert tokens.shape == (1, PROMPT_IDS.shape[1] + N)
    assert FORCED not in tokens[0, PROMPT_IDS.shape[1]:].tolist()
    return tokens


def force_token(out: torch.Tensor) -> torch.Tensor:
    out[:] = 0
    out[..., FORCED] = 1.0
    return out


def test_result_equals_hf_generate(lm, tiny_hf, plain, wire):
    with lm.generate(PROMPT_IDS, max_new_tokens=N) as tracer:
        out = tracer.result.save()
    direct = tiny_hf.generate(PROMPT_IDS, max_new_tokens=N, do_sample=False)
    assert torch.equal(out.value, plain)
    assert torch.equal(out.value, direct)


@pytest.mark.parametrize("i", [0, N - 1])
def test_step_reads_the_ith_forward_call(lm, tiny_hf, arch, plain, wire, i):
    with lm.generate(PROMPT_IDS, max_new_tokens=N) as tracer:
        with tracer.step(i):
            x = layer(lm, arch, 1).output.save()
    _, calls = generate_capturing(tiny_hf, PROMPT_IDS, N, capture=layer(tiny_hf, arch, 1))
    assert len(calls) == N
    expected_len = PROMPT_IDS.shape[1] if i == 0 else 1  # later steps run on the kv cache
    assert x.value.shape[1] == expected_len
    assert torch.equal(x.value, calls[i])


def test_several_steps_and_default_step_zero(lm, tiny_hf, arch, plain, wire):
    with lm.generate(PROMPT_IDS, max_new_tokens=N) as tracer:
        outside = layer(lm, arch, 2).output.save()  # outside any step block: step 0
        with tracer.step(1):
            s1 = layer(lm, arch, 2).output.save()
        with tracer.step(3):
            s3 = layer(lm, arch, 2).output.save()
            logits3 = lm.lm_head.output.save()
    _, calls = generate_capturing(tiny_hf, PROMPT_IDS, N, capture=layer(tiny_hf, arch, 2))
    _, head = generate_capturing(tiny_hf, PROMPT_IDS, N, capture=tiny_hf.lm_head)
    assert torch.equal(outside.value, calls[0])
    assert torch.equal(s1.value, calls[1])
    assert torch.equal(s3.value, calls[3])
    assert torch.equal(logits3.value, head[3])
    assert int(logits3.value[0, -1].argmax()) == int(plain[0, PROMPT_IDS.shape[1] + 3])


def test_all_steps_save_is_a_list_per_step(lm, tiny_hf, arch, plain, wire):
    with lm.generate(PROMPT_IDS, max_new_tokens=N) as tracer:
        with tracer.all_steps():
            hs = layer(lm, arch, 1).output.save()
    _, calls = generate_capturing(tiny_hf, PROMPT_IDS, N, capture=layer(tiny_hf, arch, 1))
    assert isinstance(hs.value, list)
    assert len(hs.value) == N == len(calls)
    for got, expected in zip(hs.value, calls, strict=True):
        assert torch.equal(got, expected)


def test_all_steps_derived_value_per_step(lm, tiny_hf, plain, wire):
    with lm.generate(PROMPT_IDS, max_new_tokens=N) as tracer:
        with tracer.all_steps():
            top = lm.lm_head.output[0, -1].argmax(-1).save()
    _, head = generate_capturing(tiny_hf, PROMPT_IDS, N, capture=tiny_hf.lm_head)
    assert isinstance(top.value, list) and len(top.value) == N
    for got, logits in zip(top.value, head, strict=True):
        assert torch.equal(got, logits[0, -1].argmax(-1))
    assert [int(t) for t in top.value] == plain[0, PROMPT_IDS.shape[1]:].tolist()


def test_edit_in_one_step_changes_that_token_onward(lm, tiny_hf, plain, wire):
    with lm.generate(PROMPT_IDS, max_new_tokens=N) as tracer:
        with tracer.step(2):
            lm.lm_head.output[:] = 0
            lm.lm_head.output[..., FORCED] = 1.0
        out = tracer.result.save()
    expected, _ = generate_capturing(
        tiny_hf, PROMPT_IDS, N, edit=(tiny_hf.lm_head, lambda k, o: force_token(o) if k == 2 else None))
    n = PROMPT_IDS.shape[1]
    assert int(expected[0, n + 2]) == FORCED
    assert torch.equal(out.value, expected)
    assert torch.equal(out.value[:, : n + 2], plain[:, : n + 2])  # tokens before step 2 untouched


def test_edit_in_all_steps_applies_to_every_step(lm, tiny_hf, wire):
    with lm.generate(PROMPT_IDS, max_new_tokens=N) as tracer:
        with tracer.all_steps():
            lm.lm_head.output[:] = 0
            lm.lm_head.output[..., FORCED] = 1.0
        out = tracer.result.save()
    every_call = (tiny_hf.lm_head, lambda k, o: force_token(o))
    expected, _ = generate_capturing(tiny_hf, PROMPT_IDS, N, edit=every_call)
    assert expected[0, PROMPT_IDS.shape[1]:].tolist() == [FORCED] * N
    assert torch.equal(out.value, expected)


def test_layer_replacement_in_one_step_matches_raw_hook(lm, tiny_hf, arch, wire):
    with lm.generate(PROMPT_IDS, max_new_tokens=N) as tracer:
        with tracer.step(1):
            layer(lm, arch, 1).output = layer(lm, arch, 1).output * 5
        out = tracer.result.save()
    expected, _ = generate_capturing(
        tiny_hf, PROMPT_IDS, N, edit=(layer(tiny_hf, arch, 1), lambda k, o: o * 5 if k == 1 else None))
    assert torch.equal(out.value, expected)


def test_step_that_never_runs_is_a_clear_error(lm, wire, arch):
    with pytest.raises(sc.SandboxError) as info:
        with lm.generate(PROMPT_IDS, max_new_tokens=3) as tracer:
            with tracer.step(50):
                layer(lm, arch, 1).output.save()
    assert type(info.value) is not sc.SandboxError, "expected a specific SandboxError subclass"
    assert "50" in str(info.value)

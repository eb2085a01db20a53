"""Logit lens, a prediction, an IOI prompt and activation patching on SmolLM2-135M with sandbox_client.

    bash scripts/main.sh                     # or: .venv/bin/python examples/smollm2_logit_lens.py

Everything runs locally on CPU through the public tracing API: each `with lm.trace(...)` block records
a graph of reads and edits, which runs as one forward pass when the block ends.
"""
from __future__ import annotations

import sandbox_client as sc
from sandbox_client.pretrained import smollm2_folder

EIFFEL = "The Eiffel Tower is in the city of"
COLOSSEUM = "The Colosseum is in the city of"
IOI = "When Mary and John went to the store, John gave a drink to"
NUM_LAYERS = 30  # SmolLM2-135M's decoder layers: lm.model.layers[0..29]
PATCH_LAYER = 28

lm = sc.LanguageModel(smollm2_folder())  # converts the packaged GGUF weights once, then reuses them
tok = lm.tokenizer
(PARIS,) = tok.encode(" Paris")


def show(token_id: int) -> str:
    return repr(tok.decode([token_id]))


# (a) + (b) Logit lens: decode every layer's last-token state with the final norm and the unembedding.
# One trace, one forward pass; only the top token and P(' Paris') per layer are saved.
with lm.trace(EIFFEL):
    lens_top, lens_paris = [], []
    for i in range(NUM_LAYERS):
        hidden = lm.model.layers[i].output[:, -1]
        probs = lm.lm_head(lm.model.norm(hidden)).softmax(-1)
        lens_top.append(probs.argmax(-1).save())
        lens_paris.append(probs[:, PARIS].save())
    final = lm.output.logits[:, -1].softmax(-1)
    final_top = final.argmax(-1).save()
    final_paris = final[:, PARIS].save()

print(f"Logit lens for {EIFFEL!r}")
print(f"{'layer':>5}  {'top token':<14} P(' Paris')")
for i in range(NUM_LAYERS):
    print(f"{i:>5}  {show(int(lens_top[i].value[0])):<14} {float(lens_paris[i].value[0]):.4f}")
print(f"model prediction: {show(int(final_top.value[0]))}, P(' Paris') = {float(final_paris.value[0]):.3f}\n")

# (c) Indirect object identification: the model should name the other person (' Mary').
with lm.trace(IOI):
    ioi_probs = lm.output.logits[:, -1].softmax(-1)
    ioi_top = ioi_probs.argmax(-1).save()
    ioi_p = ioi_probs.max(-1).values.save()
print(f"{IOI!r} -> {show(int(ioi_top.value[0]))} (p = {float(ioi_p.value[0]):.3f})\n")

# (d) Activation patching: both prompts are 9 tokens. Two invokes = one batched forward; the
# layer-28 last-token state of the Eiffel row is written into the Colosseum row.
with lm.trace(COLOSSEUM):
    before_top = lm.output.logits[:, -1].argmax(-1).save()

with lm.trace() as tracer:
    with tracer.invoke(EIFFEL):
        clean = lm.model.layers[PATCH_LAYER].output[:, -1]
    with tracer.invoke(COLOSSEUM):
        lm.model.layers[PATCH_LAYER].output[:, -1] = clean
        patched = lm.output.logits[:, -1].softmax(-1)
        after_top = patched.argmax(-1).save()
        after_paris = patched[:, PARIS].save()

print(f"Patching layer {PATCH_LAYER} (last token) from {EIFFEL!r} into {COLOSSEUM!r}")
print(f"  before: {show(int(before_top.value[0]))}")
print(f"  after:  {show(int(after_top.value[0]))} (P(' Paris') = {float(after_paris.value[0]):.3f})")

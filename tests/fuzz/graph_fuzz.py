"""What the graph fuzzers share: the outcome rule, the limits, and pools of real and hostile names.

    check_outcome(text_or_bytes, spec)     # returns, or raises whatever validate() wrongly let out

The rule: ``Graph.from_json`` either returns a Graph or raises GraphFormatError, and
``validate`` either returns a ValidatedGraph or raises ValidationError. Any other exception
(TypeError, OverflowError, RecursionError, MemoryError, ...) is a bug: on a server it would
be a 500 instead of a 4xx, or worse. Used by test_fuzz_graph_json.py (hypothesis) and
atheris_graph.py (coverage-guided).
"""
from __future__ import annotations

from sandbox_client.graph import OPS, Graph, GraphFormatError
from sandbox_client.interpreter import DryRun, validate_and_dry_run
from validator import Limits, ModelSpec, ValidatedGraph, ValidationError

#: smaller than the defaults so that mutated graphs reach the limit checks too
LIMITS = Limits(max_nodes=400, max_request_bytes=2**20, max_literal_tensor_bytes=2**16, max_depth=12,
                max_string_length=4_000, max_list_length=2_000, max_saves=50, max_invokes=8, max_batch_rows=16,
                max_tokens_per_row=512, max_new_tokens=16, max_factory_elements=2**20)

HOSTILE_OPS = ("exec", "eval", "import", "pickle", "OUTPUT", "", " output", "__init__", "call_function\x00")

FUNCTIONS = (
    # allowlisted, with argument rules
    "torch.arange", "torch.linspace", "torch.zeros", "torch.ones", "torch.full", "torch.randn", "torch.randint",
    "torch.eye", "torch.tensor", "operator.add", "operator.getitem", "torch.nn.functional.softmax", "torch.where",
    # refused
    "torch.empty", "torch.empty_like", "torch.load", "torch.save", "torch.from_file", "torch.set_default_device",
    "torch.ops.aten.empty", "torch._C._set_grad_enabled", "torch.nn.Module.__init__", "os.system", "builtins.eval",
    "builtins.exec", "builtins.__import__", "operator.attrgetter", "operator.methodcaller", "pickle.loads",
    "subprocess.run", "torch.Tensor.storage", "torch.", "torch..zeros", ".", "", "torch.zeros\x00",
)

METHODS = (
    "add_", "copy_", "fill_", "zero_", "expand", "repeat", "to", "type_as", "backward", "view", "t", "clone", "sum",
    "storage", "untyped_storage", "data_ptr", "numpy", "tofile", "share_memory_", "set_", "resize_", "as_strided",
    "cuda", "pin_memory", "apply_", "map_", "register_hook", "retain_grad", "__setitem__", "__reduce_ex__",
    "__class__", "_values", "to_", "",
)

ATTRIBUTES = ("shape", "logits", "T", "indices", "data", "grad", "grad_fn", "device", "_base", "__class__",
              "__dict__", "__globals__", "_modules", "")

PATHS = ("", "model", "model.layers.0", "model.layers.1.mlp", "lm_head", "model.layers.99", "model..layers",
         "model.layers.-1", "model.layers.01", "model.layers.0.__class__", "__class__", "lm_head.weight", ".", "²")

PARAMS = ("model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.rotary_emb.inv_freq", "model.layers.0",
          "weight", "model.layers.0.mlp.up_proj._parameters", "model.embed_tokens.weight.data", "")

APPLY_SOURCES = (
    "def f(x):\n    return x * 2\n",
    "def f(x, k):\n    out = []\n    for i in range(k):\n        out.append(x[i])\n    return torch.stack(out)\n",
    "import os\n", "def f(x):\n    import os\n    return os.system('id')\n",
    "def f(x):\n    return x.__class__.__bases__[0].__subclasses__()\n",
    "def f(x):\n    while True:\n        pass\n", "def f(x):\n    return eval('1')\n",
    "def f(x):\n    return (lambda: x)()\n", "class A:\n    pass\n", "@dec\ndef f(x):\n    return x\n",
    "def f(x):\n    return x\ndef g(x):\n    return x\n", "def f(x):\n    return x._base\n",
    "def f(x):\n    return x.storage()\n", "def f(x):\n    return torch.load('/etc/passwd')\n",
    "def f(x):\n    return f'{x}'\n", "def f(x):\n    return x\x00\n", "def f(:\n", "",
)

TARGETS = tuple(dict.fromkeys((*FUNCTIONS, *METHODS, *ATTRIBUTES, *PATHS, *PARAMS, *APPLY_SOURCES)))
OPS_POOL = (*OPS, *HOSTILE_OPS)

#: JSON keys of the format, so that random objects sometimes look like graphs, nodes or tagged values
FORMAT_KEYS = ("version", "kind", "options", "invokes", "nodes", "id", "op", "target", "args", "kwargs", "invoke",
               "step", "after", "source", "$ref", "$tuple", "$dict", "$slice", "$ellipsis", "$size", "$dtype",
               "$device", "$tensor", "$float", "input_ids", "attention_mask", "max_new_tokens", "do_sample")

#: numbers at the edges: huge, negative, float limits, and tagged non-finite floats
EDGE_NUMBERS = (0, -1, 1, 2, 7, 20, 255, 256, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30,
                -(10**30), 10**400, -(10**400), 0.5, -0.0, 1e-320, 1e308, -1e308, 1.7976931348623157e308,
                {"$float": "nan"}, {"$float": "inf"}, {"$float": "-inf"}, True, False, None, "1", "all", [], [1, -1])


def check_outcome(data: str | bytes, spec: ModelSpec, limits: Limits = LIMITS, dry: DryRun | None = None) -> None:
    """Raise (AssertionError or the stray exception itself) unless both outcomes are allowed ones."""
    try:
        graph = Graph.from_json(data)
    except GraphFormatError:
        pass
    else:
        assert isinstance(graph, Graph)
    try:
        checked = validate_and_dry_run(data, spec, limits, dry=dry)
    except ValidationError as err:
        assert isinstance(err.code, str) and err.code and isinstance(err.message, str)
        return
    assert isinstance(checked, ValidatedGraph)

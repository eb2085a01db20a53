"""Exactly which functions, tensor methods and attributes a graph may use. No prefixes, no patterns:
a name is allowed only if it is written out here, and adding one needs a hostile test (docs/security.md).

    >>> "torch.nn.functional.softmax" in FUNCTIONS
    True
    >>> "torch.load" in FUNCTIONS, "storage" in TENSOR_METHODS
    (False, False)
"""
from __future__ import annotations

_OPERATOR = {f"operator.{n}" for n in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
    "and_", "or_", "xor", "lt", "le", "gt", "ge", "eq", "ne", "getitem",
)}

_TORCH_PURE = {f"torch.{n}" for n in (
    "abs", "add", "addmm", "all", "allclose", "amax", "amin", "any", "argmax", "argmin", "argsort", "atan2",
    "baddbmm", "bmm", "broadcast_to", "cat", "ceil", "chunk", "clamp", "clip", "clone", "concat", "cos",
    "cosine_similarity", "count_nonzero", "cummax", "cumprod", "cumsum", "diag", "diagonal", "diff", "div",
    "dot", "einsum", "eq", "erf", "exp", "flatten", "flip", "floor", "gather", "ge", "gt", "hstack",
    "index_select", "isclose", "isfinite", "isinf", "isnan", "kthvalue", "layer_norm", "le", "lerp", "log",
    "log1p", "log_softmax", "logical_and", "logical_not", "logical_or", "logical_xor", "logsumexp", "lt",
    "masked_fill", "masked_select", "matmul", "max", "maximum", "mean", "median", "min", "minimum", "mm",
    "mode", "movedim", "mul", "mv", "nan_to_num", "narrow", "ne", "neg", "nonzero", "norm", "outer",
    "permute", "pow", "prod", "reciprocal", "relu", "remainder", "reshape", "roll", "round", "rsqrt",
    "scatter", "scatter_add", "select", "sigmoid", "sign", "sin", "softmax", "sort", "split", "sqrt",
    "square", "squeeze", "stack", "std", "std_mean", "sub", "sum", "swapaxes", "t", "take_along_dim",
    "tanh", "tensordot", "topk", "trace", "transpose", "tril", "triu", "unbind", "unique", "unsqueeze",
    "var", "var_mean", "vstack", "where", "zeros_like", "ones_like", "full_like", "rand_like",
    "randn_like", "randint_like", "multinomial", "bucketize", "searchsorted", "cdist", "kron",
    # the same objects as F.bilinear / F.pairwise_distance, which the client records under these names
    "bilinear", "pairwise_distance",
)}

#: factory functions whose size arguments must be literal and bounded (never torch.empty: it exposes
#: uninitialised memory, which on a shared server may hold another user's activations)
FACTORIES = {f"torch.{n}" for n in ("zeros", "ones", "full", "arange", "randn", "rand", "randint", "linspace",
                                    "eye", "tensor")}

_FUNCTIONAL = {f"torch.nn.functional.{n}" for n in (
    "softmax", "log_softmax", "gelu", "relu", "silu", "sigmoid", "tanh", "softplus", "elu", "leaky_relu",
    "layer_norm", "rms_norm", "group_norm", "linear", "bilinear", "normalize", "cosine_similarity",
    "pairwise_distance", "cross_entropy", "nll_loss", "kl_div", "mse_loss", "l1_loss", "smooth_l1_loss",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "one_hot", "pad", "embedding", "dropout",
    "scaled_dot_product_attention", "softmin", "glu", "hardtanh", "logsigmoid", "mish",
)}

_LINALG = {f"torch.linalg.{n}" for n in (
    "norm", "vector_norm", "matrix_norm", "svd", "svdvals", "qr", "eigh", "eigvalsh", "pinv", "solve",
    "lstsq", "matrix_rank", "det", "slogdet", "inv", "cholesky",
)}

FUNCTIONS: frozenset[str] = frozenset(_OPERATOR | _TORCH_PURE | FACTORIES | _FUNCTIONAL | _LINALG)

TENSOR_METHODS: frozenset[str] = frozenset({
    "abs", "add", "all", "amax", "amin", "any", "argmax", "argmin", "argsort", "backward", "bfloat16",
    "bmm", "bool", "ceil", "chunk", "clamp", "clip", "clone", "contiguous", "cos", "cumsum", "detach",
    "diagonal", "diff", "dim", "div", "double", "eq", "exp", "expand", "expand_as", "flatten", "flip",
    "float", "floor", "gather", "ge", "gt", "half", "index_select", "int", "isnan", "item", "le", "log",
    "log_softmax", "long", "lt", "masked_fill", "matmul", "max", "mean", "median", "min", "mm", "mul", "ne",
    "neg", "nonzero", "norm", "numel", "permute", "pow", "prod", "relu", "repeat", "reshape", "reshape_as",
    "round", "rsqrt", "select", "sigmoid", "sign", "sin", "size", "softmax", "sort", "split", "sqrt",
    "square", "squeeze", "std", "sub", "sum", "t", "tanh", "to", "tolist", "topk", "transpose", "type_as",
    "unbind", "unflatten", "unsqueeze", "var", "view", "view_as", "where", "narrow", "roll", "movedim",
    "swapaxes", "logsumexp", "count_nonzero", "cumprod", "kthvalue", "mode", "nan_to_num", "lerp", "outer",
    # in place (checked: never on a weight)
    "add_", "sub_", "mul_", "div_", "zero_", "fill_", "clamp_", "copy_", "masked_fill_", "neg_", "abs_",
    "scatter_", "index_fill_", "pow_", "sqrt_", "exp_", "normal_", "uniform_",
})

#: attributes a graph may read (``getattr``): tensor metadata and Hugging Face output fields
ATTRIBUTES: frozenset[str] = frozenset({
    "shape", "dtype", "T", "mT", "ndim", "real", "imag", "requires_grad", "is_leaf",
    "logits", "last_hidden_state", "hidden_states", "attentions", "loss", "sequences", "scores",
    "pooler_output", "values", "indices",
})

#: methods whose size arguments are bounded like factories
SIZED_METHODS: frozenset[str] = frozenset({"expand", "repeat"})

#: functions with an argument that sets the size of their result, bounded like factory sizes:
#: name -> (parameter, its positional index)
SIZED_FUNCTIONS: dict[str, tuple[str, int]] = {
    "torch.broadcast_to": ("size", 1), "torch.multinomial": ("num_samples", 1),
    "torch.nn.functional.one_hot": ("num_classes", 1), "torch.nn.functional.pad": ("pad", 1),
}

#: arguments that make a function write into an existing tensor (out=, inplace=True); never allowed,
#: since such writes bypass the in-place checks: name -> (parameter, its positional index)
WRITING_ARGUMENTS: dict[str, tuple[str, int]] = {
    **{f"torch.nn.functional.{n}": ("inplace", i) for n, i in (
        ("relu", 1), ("silu", 1), ("mish", 1), ("elu", 2), ("leaky_relu", 2), ("hardtanh", 3), ("dropout", 3))},
    "torch.nn.functional.normalize": ("out", 4), "torch.norm": ("out", 4), "torch.tensordot": ("out", 3),
}

#: dtype/device casts: allowed to change dtype only
CAST_METHODS: frozenset[str] = frozenset({"to", "type_as"})

#: generation options a graph may set, with their types
GENERATE_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "max_new_tokens": int, "do_sample": bool, "temperature": (int, float), "top_k": int,
    "top_p": (int, float), "repetition_penalty": (int, float), "min_new_tokens": int,
}

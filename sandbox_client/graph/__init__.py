"""The graph format: nodes, graphs, and their JSON wire codec. Imports nothing else of ours.

    >>> from sandbox_client.graph import Graph
    >>> Graph.from_json(text).to_json() == text
    True
"""
from .nodes import EVENT_OPS, FORMAT_VERSION, GRAD_OPS, OPS, Graph, Invoke, Node, Step
from .values import DTYPES, GraphFormatError, Ref, decode_value, encode_value

__all__ = [
    "DTYPES", "EVENT_OPS", "FORMAT_VERSION", "GRAD_OPS", "OPS", "Graph", "GraphFormatError",
    "Invoke", "Node", "Ref", "Step", "decode_value", "encode_value",
]

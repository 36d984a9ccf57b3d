"""A small evaluator for OpenMM (Lepton) energy expressions on torch tensors.

OpenMM's custom forces describe energies as strings such as
``"k*(r-r0)^2; k=100"``. To obtain *per-sample* energies of such forces for a whole batch, the
expression is parsed here once and evaluated on batched tensors (any shape, float64), exactly as
Lepton would evaluate it in double precision. The evaluation is differentiable: on the torch route of
the batched bridge, forces of custom and GB forces are its autograd gradients (step, delta, floor,
ceil and discrete tables have zero derivative, as in Lepton).

Supported syntax: numbers, variables, ``+ - * / ^``, unary minus, parentheses, ``;``-separated
definitions (in any order), Lepton's built-in functions (:data:`FUNCTIONS`) and OpenMM's discrete
tabulated functions (:func:`tabulated_function`). Continuous (spline) tabulated functions are not
supported (:class:`ExpressionError`); the callers fall back to an exact sequential route.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = ["ExpressionError", "Expression", "parse", "tokenize", "substitute_variables", "tabulated_function",
           "FUNCTIONS"]


class ExpressionError(ValueError):
    """An expression uses syntax or functions this evaluator does not support."""


def _where(cond, a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return torch.where(cond, a, b)


FUNCTIONS = {
    "sqrt": torch.sqrt, "exp": torch.exp, "log": torch.log, "sin": torch.sin, "cos": torch.cos,
    "sec": lambda a: 1.0 / torch.cos(a), "csc": lambda a: 1.0 / torch.sin(a), "tan": torch.tan,
    "cot": lambda a: 1.0 / torch.tan(a), "asin": torch.asin, "acos": torch.acos, "atan": torch.atan,
    "atan2": torch.atan2, "sinh": torch.sinh, "cosh": torch.cosh, "tanh": torch.tanh, "erf": torch.erf,
    "erfc": torch.erfc, "square": lambda a: a * a, "cube": lambda a: a * a * a, "recip": lambda a: 1.0 / a,
    "abs": torch.abs, "floor": torch.floor, "ceil": torch.ceil,
    "step": lambda a: (a >= 0).to(a.dtype), "delta": lambda a: (a == 0).to(a.dtype),
    "min": torch.minimum, "max": torch.maximum,
    "select": lambda c, a, b: _where(c != 0, a, b),
}

def tabulated_function(function):
    """A torch callable for an OpenMM Discrete1D/2D/3DFunction (arguments rounded to integers)."""
    kind = type(function).__name__
    if kind not in ("Discrete1DFunction", "Discrete2DFunction", "Discrete3DFunction"):
        raise ExpressionError(f"tabulated function of type {kind} is not supported")
    params = function.getFunctionParameters()
    sizes, values = list(params[:-1]), params[-1]  # 1D: (values,); 2D/3D: (xsize, ysize[, zsize], values)
    table = torch.as_tensor(list(values), dtype=torch.float64)
    strides = [1]
    for size in sizes[:-1]:
        strides.append(strides[-1] * int(size))

    def lookup(*args):
        index = sum(torch.round(torch.as_tensor(a)).long() * stride for a, stride in zip(args, strides))
        return table.to(index.device)[index]

    return lookup


_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                    r"|(?P<op>[-+*/^(),=;]))")


def tokenize(text: str) -> list[tuple[str, str]]:
    """Split an expression into (kind, text) tokens, kind in {"num", "name", "op"}."""
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ExpressionError(f"cannot parse expression {text!r} at {text[pos:pos + 20]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


def substitute_variables(text: str, mapping: dict[str, str]) -> str:
    """Replace whole-word variables of an expression, e.g. ``{"x": "(x-ox)"}`` (used to shift copies)."""
    return "".join(mapping.get(tok, tok) if kind == "name" else tok for kind, tok in tokenize(text))


@dataclass(frozen=True)
class _Num:
    value: float


@dataclass(frozen=True)
class _Var:
    name: str


@dataclass(frozen=True)
class _Call:
    name: str
    args: tuple


class _Parser:
    def __init__(self, tokens, source):
        self.tokens, self.pos, self.source = tokens, 0, source

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def take(self, text=None):
        kind, tok = self.peek()
        if kind is None or (text is not None and tok != text):
            raise ExpressionError(f"expected {text or 'more input'!r} in expression {self.source!r}")
        self.pos += 1
        return kind, tok

    def expr(self):
        node = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            node = _Call("add" if op == "+" else "sub", (node, self.term()))
        return node

    def term(self):
        node = self.unary()
        while self.peek()[1] in ("*", "/"):
            op = self.take()[1]
            node = _Call("mul" if op == "*" else "div", (node, self.unary()))
        return node

    def unary(self):
        if self.peek()[1] == "-":
            self.take()
            return _Call("neg", (self.unary(),))
        if self.peek()[1] == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek()[1] == "^":
            self.take()
            return _Call("pow", (base, self.unary()))
        return base

    def atom(self):
        kind, tok = self.take()
        if kind == "num":
            return _Num(float(tok))
        if tok == "(":
            node = self.expr()
            self.take(")")
            return node
        if kind != "name":
            raise ExpressionError(f"unexpected {tok!r} in expression {self.source!r}")
        if self.peek()[1] != "(":
            return _Var(tok)
        self.take("(")
        args = [self.expr()]
        while self.peek()[1] == ",":
            self.take()
            args.append(self.expr())
        self.take(")")
        return _Call(tok, tuple(args))


_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow}


class Expression:
    """A parsed expression: ``evaluate(values)`` with tensors (or floats) for its free variables.

    ``special`` maps function names whose arguments are *names* (e.g. ``distance(p1,p2)`` of a
    CustomCompoundBondForce) to callables taking those names.
    """

    def __init__(self, text: str, special_functions=(), functions=None):
        self.text = text
        self.functions = dict(functions or {})
        parts = text.split(";")
        self.main = self._parse(parts[0], special_functions)
        self.definitions = {}
        for part in parts[1:]:
            if not part.strip():
                continue
            name, sep, body = part.partition("=")
            if not sep or not re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*", name):
                raise ExpressionError(f"bad definition {part!r} in expression {text!r}")
            self.definitions[name.strip()] = self._parse(body, special_functions)
        self.special_functions = set(special_functions)
        self.variables = self._free_variables()

    def _parse(self, text, special):
        parser = _Parser(tokenize(text), text)
        node = parser.expr()
        if parser.pos != len(parser.tokens):
            raise ExpressionError(f"trailing input {parser.tokens[parser.pos][1]!r} in expression {self.text!r}")
        self._check_calls(node, special)
        return node

    def _check_calls(self, node, special):
        if isinstance(node, _Call):
            known = (node.name in FUNCTIONS or node.name in _BINARY or node.name == "neg" or node.name in special
                     or node.name in self.functions)
            if not known:
                raise ExpressionError(f"function {node.name!r} in expression {self.text!r} is not supported "
                                      "(tabulated or unknown function)")
            if node.name not in special:
                for arg in node.args:
                    self._check_calls(arg, special)

    def _free_variables(self) -> set[str]:
        found = set()

        def walk(node):
            if isinstance(node, _Var):
                found.add(node.name)
            elif isinstance(node, _Call) and node.name not in self.special_functions:
                for arg in node.args:
                    walk(arg)

        walk(self.main)
        for body in self.definitions.values():
            walk(body)
        return found - set(self.definitions)

    def evaluate(self, values: dict, special=None):
        """Evaluate with ``values`` (name -> tensor or float); tensors broadcast as in torch."""
        cache = {}
        special = special or {}

        def ev(node):
            if isinstance(node, _Num):
                return node.value
            if isinstance(node, _Var):
                if node.name in self.definitions:
                    if node.name not in cache:
                        cache[node.name] = ev(self.definitions[node.name])
                    return cache[node.name]
                if node.name not in values:
                    raise ExpressionError(f"variable {node.name!r} of expression {self.text!r} has no value")
                return values[node.name]
            if node.name in special:
                return special[node.name](*[arg.name for arg in node.args])
            args = [ev(arg) for arg in node.args]
            if node.name == "neg":
                return -args[0]
            if node.name in _BINARY:
                a, b = args
                if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
                    a = torch.tensor(a, dtype=torch.float64)
                return _BINARY[node.name](a, b)
            args = [a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.float64) for a in args]
            return (self.functions.get(node.name) or FUNCTIONS[node.name])(*args)

        return ev(self.main)


def parse(text: str, special_functions=(), functions=None) -> Expression:
    """Parse an OpenMM energy expression (see module docstring); ``functions``: name -> torch callable."""
    return Expression(text, special_functions, functions)

"""Thermodynamic states as predicates on collective variables, parsed without ``eval``.

Grammar (case-sensitive CV names; keywords ``and``, ``or``, ``not``; numbers may carry ``deg``)::

    state      := [LABEL ":"] expression
    expression := term ("or" term)*
    term       := factor ("and" factor)*
    factor     := "not" factor | "(" expression ")" | comparison
    comparison := operand (("<" | "<=" | ">" | ">=") operand)+      # chained: -2 < phi < 0
    operand    := ["-"] (NUMBER ["deg"] | "pi" | CV_NAME)

Examples: ``"A: phi < 0"``, ``"C: -2 < phi < 0 and psi > 1"``, ``"alpha_R: -160deg < phi < -20deg"``.
A state without a label is labelled by its expression.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import StateError

__all__ = ["State", "parse_state"]

_TOKEN = re.compile(r"""\s*(?:
    (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?P<deg>\s*(?:deg|°))? |
    (?P<op><=|>=|<|>) |
    (?P<paren>[()]) |
    (?P<minus>-) |
    (?P<name>[A-Za-z_]\w*(?:\[\w+\])?)
)""", re.VERBOSE)
_LABEL = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*:(.*)$", re.DOTALL)
_KEYWORDS = {"and", "or", "not"}
_COMPARE = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


def _tokenize(text: str, source: str) -> list[tuple[str, object]]:
    tokens, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if not match:
            raise StateError(f"state {source!r}: unexpected character {text[position:].strip()[0]!r} in "
                             f"{text[position:].strip()!r}; use CV names, numbers, <, <=, >, >=, and, or, not, ( )")
        position = match.end()
        if match.group("number"):
            value = float(match.group("number"))
            tokens.append(("number", math.radians(value) if match.group("deg") else value))
        elif match.group("name") in _KEYWORDS:
            tokens.append((match.group("name"), None))
        else:
            kind = next(k for k in ("op", "paren", "minus", "name") if match.group(k))
            tokens.append((kind, match.group(kind)))
    return tokens


class _Parser:
    """Recursive descent over the token list; builds a tree of tuples."""

    def __init__(self, tokens, source: str):
        self.tokens, self.index, self.source = tokens, 0, source

    def _peek(self):
        return self.tokens[self.index] if self.index < len(self.tokens) else ("end", None)

    def _fail(self, expected: str):
        kind, value = self._peek()
        found = "the end" if kind == "end" else repr(value if value is not None else kind)
        raise StateError(f"state {self.source!r}: expected {expected}, found {found}")

    def parse(self):
        tree = self._expression()
        if self._peek()[0] != "end":
            self._fail("'and', 'or' or the end")
        return tree

    def _expression(self):
        tree = self._term()
        while self._peek()[0] == "or":
            self.index += 1
            tree = ("or", tree, self._term())
        return tree

    def _term(self):
        tree = self._factor()
        while self._peek()[0] == "and":
            self.index += 1
            tree = ("and", tree, self._factor())
        return tree

    def _factor(self):
        kind, value = self._peek()
        if kind == "not":
            self.index += 1
            return ("not", self._factor())
        if (kind, value) == ("paren", "("):
            self.index += 1
            tree = self._expression()
            if self._peek() != ("paren", ")"):
                self._fail("')'")
            self.index += 1
            return tree
        return self._comparison()

    def _comparison(self):
        operands, operators = [self._operand()], []
        while self._peek()[0] == "op":
            operators.append(self._peek()[1])
            self.index += 1
            operands.append(self._operand())
        if not operators:
            self._fail("a comparison (<, <=, >, >=)")
        return ("compare", tuple(operands), tuple(operators))

    def _operand(self):
        kind, value = self._peek()
        if kind == "minus":
            self.index += 1
            return ("negate", self._operand())
        if kind == "number":
            self.index += 1
            return ("number", value)
        if kind == "name":
            self.index += 1
            return ("number", math.pi) if value == "pi" else ("cv", value)
        self._fail("a number or a CV name")


def _cv_names(tree) -> set[str]:
    if tree[0] == "cv":
        return {tree[1]}
    if tree[0] == "number":
        return set()
    children = tree[1] if tree[0] == "compare" else tree[1:]
    return set().union(*(_cv_names(child) for child in children))


def _evaluate(tree, values):
    kind = tree[0]
    if kind == "number":
        return tree[1]
    if kind == "cv":
        return values[tree[1]]
    if kind == "negate":
        return -_evaluate(tree[1], values)
    if kind == "not":
        return ~_evaluate(tree[1], values)
    if kind in ("and", "or"):
        combine = np.logical_and if kind == "and" else np.logical_or
        return combine(_evaluate(tree[1], values), _evaluate(tree[2], values))
    operands = [_evaluate(operand, values) for operand in tree[1]]
    result = True
    for left, operator, right in zip(operands, tree[2], operands[1:]):
        result = np.logical_and(result, _COMPARE[operator](left, right))
    return result


@dataclass(frozen=True)
class State:
    """A parsed state: ``label``, the ``expression`` text and the CV names it uses."""

    label: str
    expression: str
    tree: tuple

    @property
    def cv_names(self) -> tuple[str, ...]:
        """Names of the CVs the predicate reads, sorted."""
        return tuple(sorted(_cv_names(self.tree)))

    def mask(self, values: dict) -> np.ndarray:
        """Boolean mask (n_frames,) of the frames in the state, from ``{cv_name: (n_frames,) array}``."""
        missing = [name for name in self.cv_names if name not in values]
        if missing:
            raise StateError(f"state {self.label!r}: no values for CV(s) {', '.join(missing)}")
        lengths = {np.shape(values[name]) for name in self.cv_names}
        if len(lengths) != 1:
            raise StateError(f"state {self.label!r}: CV arrays differ in shape {sorted(lengths)}")
        return np.broadcast_to(_evaluate(self.tree, values), lengths.pop()).astype(bool)

    def __str__(self) -> str:
        return f"{self.label}: {self.expression}"


def parse_state(text: str) -> State:
    """Parse ``"LABEL: predicate"`` (label optional) into a :class:`State`; raises :class:`StateError`."""
    if not isinstance(text, str) or not text.strip():
        raise StateError(f"empty state definition {text!r}; write e.g. \"A: phi < 0\"")
    match = _LABEL.match(text)
    label, expression = (match.group(1), match.group(2).strip()) if match else (None, text.strip())
    if not expression:
        raise StateError(f"state {text!r}: the predicate after the label is empty; write e.g. \"A: phi < 0\"")
    tree = _Parser(_tokenize(expression, text), text).parse()
    if not _cv_names(tree):
        raise StateError(f"state {text!r} uses no collective variable")
    return State(label or expression, expression, tree)

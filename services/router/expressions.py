"""Rule conditions written in CEL, the Common Expression Language, evaluated by cel-python.

CEL has no statements, loops beyond its bounded macros, or access to the host language, and nothing
here is passed to `eval`. As a second line, an expression is checked when the rules load and
rejected if it names anything outside a fixed set: the variables below, the standard functions and
methods listed here, and no name starting with `_`, which is how an attempt to reach Python
internals (`__class__`, `__import__`, `__globals__`) looks. Message construction and qualified
names are rejected too.

Variables: `method` and `path` (strings, the path normalised), `headers` (lower-case name to the
list of values), `claims` (the verified token's claims) and `subject` (the token's `sub`).
"""

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import celpy
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError
from lark import Token, Tree

log = logging.getLogger(__name__)

VARIABLES = frozenset({"method", "path", "headers", "claims", "subject"})
# Standard CEL functions that only compute on their arguments.
FUNCTIONS = frozenset({
    "size", "has", "int", "uint", "double", "string", "bool", "bytes", "type", "dyn",
    "matches", "contains", "startsWith", "endsWith",
})
# Macros bind their first argument as a variable inside the second.
MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
METHODS = frozenset({"size", "matches", "contains", "startsWith", "endsWith"}) | MACROS
MAX_EXPRESSION_LENGTH = 1000
# Depth of the parse tree. Each level of CEL nesting adds about ten grammar levels, so this allows
# some forty levels of parentheses while keeping the evaluator far from Python's recursion limit.
MAX_TREE_DEPTH = 400
_REJECTED_FORMS = {
    "member_object": "message construction",
    "dot_ident": "a leading-dot qualified name",
    "dot_ident_arg": "a leading-dot qualified function",
}

_DUNDER = re.compile(r"__\w+__")
_ENVIRONMENT = celpy.Environment()


class ExpressionError(ValueError):
    """An expression that does not parse or names something outside the allowed set."""


@dataclass(frozen=True)
class Expression:
    """A checked CEL expression, ready to evaluate against a request's facts."""

    text: str
    program: Any  # celpy.Runner

    def evaluate(
        self,
        *,
        method: str,
        path: str,
        headers: Mapping[str, tuple[str, ...]],
        claims: Mapping[str, Any],
        subject: str | None,
    ) -> bool:
        """Return the expression's value; an evaluation error or a non-boolean result is False."""
        activation = {
            "method": celtypes.StringType(method),
            "path": celtypes.StringType(path),
            "headers": json_to_cel({name: list(values) for name, values in headers.items()}),
            "claims": json_to_cel(dict(claims)),
            "subject": celtypes.StringType(subject or ""),
        }
        try:
            result = self.program.evaluate(activation)
        except (CELEvalError, TypeError, ValueError, RecursionError) as error:
            log.debug("rule expression failed", extra={"expr": self.text, "error": str(error)})
            return False
        return isinstance(result, celtypes.BoolType) and bool(result)


def compile_expression(text: Any) -> Expression:
    """Parse and check an expression, or raise `ExpressionError` saying what is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(f"must be a non-empty string, got {text!r}")
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(
            f"has {len(text)} characters, more than the limit of {MAX_EXPRESSION_LENGTH}"
        )
    try:
        tree = _ENVIRONMENT.compile(text)
    except CELParseError as error:
        first_line = str(error).splitlines()[0] if str(error) else "syntax error"
        raise ExpressionError(f"is not valid CEL: {first_line}") from error
    except RecursionError as error:
        raise ExpressionError("is nested too deeply") from error
    _check_tree(tree)
    return Expression(text, _ENVIRONMENT.program(tree))


def _check_tree(tree: Tree[Any]) -> None:
    for value in tree.scan_values(lambda item: isinstance(item, Token)):
        if value.type == "IDENT" and value.startswith("_"):
            raise ExpressionError(
                f"uses the name {str(value)!r}; names starting with '_' are not allowed"
            )
        if value.type == "STRING_LIT" and _DUNDER.search(value):
            raise ExpressionError(
                f"contains the string {str(value)!r}, which names a Python attribute; such "
                "strings are not allowed"
            )

    bound: set[str] = set()
    depth = _depth(tree)
    if depth > MAX_TREE_DEPTH:
        raise ExpressionError("is nested too deeply; split it into simpler conditions")
    for node in tree.iter_subtrees():
        form = _REJECTED_FORMS.get(str(node.data))
        if form is not None:
            raise ExpressionError(f"uses {form}, which rule expressions do not allow")
        if node.data == "ident_arg":
            name = str(node.children[0])
            if name not in FUNCTIONS:
                raise ExpressionError(
                    f"calls {name}(), which is not an allowed function; use one of "
                    f"{', '.join(sorted(FUNCTIONS))}"
                )
        elif node.data == "member_dot_arg":
            name = str(node.children[1])
            if name not in METHODS:
                raise ExpressionError(
                    f"calls the method .{name}(), which is not allowed; use one of "
                    f"{', '.join(sorted(METHODS))}"
                )
            if name in MACROS:
                bound.update(_macro_variable(node))
    for node in tree.iter_subtrees():
        if node.data == "ident":
            name = str(node.children[0])
            if name not in VARIABLES and name not in bound:
                raise ExpressionError(
                    f"uses the unknown variable {name!r}; the variables are "
                    f"{', '.join(sorted(VARIABLES))}"
                )


def _macro_variable(node: Tree[Any]) -> list[str]:
    """Return the variable a macro call such as `list.exists(x, ...)` binds."""
    arguments = node.children[2] if len(node.children) > 2 else None
    if not isinstance(arguments, Tree) or not arguments.children:
        return []
    first = arguments.children[0]
    if not isinstance(first, Tree):
        return []
    names = [
        str(token)
        for token in first.scan_values(lambda item: isinstance(item, Token))
        if token.type == "IDENT"
    ]
    return names[:1] if len(names) == 1 else []


def _depth(tree: Tree[Any]) -> int:
    deepest = 0
    pending: list[tuple[Tree[Any], int]] = [(tree, 1)]
    while pending:
        node, level = pending.pop()
        deepest = max(deepest, level)
        pending.extend((child, level + 1) for child in node.children if isinstance(child, Tree))
    return deepest

"""The calculator tool, an MCP server verifiers starts (`python -m` this module) once per worker and
shares between the episodes (a taskset-scoped toolset: the tool is stateless)."""

import ast
import operator

import verifiers.v1 as vf

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """Integer arithmetic with + - * and parentheses; anything else raises ValueError."""

    def node_value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](node_value(node.left), node_value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -node_value(node.operand)
        raise ValueError(f"not plain integer arithmetic: {expression!r}")

    return node_value(ast.parse(expression.strip().rstrip("="), mode="eval").body)


class CalculatorToolset(vf.Toolset[vf.SharedToolsetConfig]):
    TOOL_PREFIX = "calc"

    @vf.tool
    def calculator(self, expression: str) -> str:
        """Evaluate an integer expression with + - * and parentheses, e.g. (12 + 7) * 3."""
        try:
            return str(evaluate(expression))
        except (ValueError, SyntaxError) as e:
            return f"Error: {e}"


if __name__ == "__main__":
    CalculatorToolset.run()

"""slime-vf-example: a verifiers environment (taskset) of arithmetic questions with a calculator tool.

verifiers resolves the id `slime-vf-example` by importing this module and taking the one `Taskset`
subclass in `__all__`.
"""

from slime_vf_example.taskset import ArithTaskset

__all__ = ["ArithTaskset"]

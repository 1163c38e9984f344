"""Command line for environments (`python -m envs`, from slime's virtual environment).

python -m envs list                # built-ins, `slime.envs` entry points, installed verifiers envs
python -m envs check NAME          # resolve NAME, check the contract, print its tools
python -m envs sample NAME [-n 3]  # print a few generated tasks (envs with make_tasks)
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m envs", description="Inspect slime environments.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list environments that can be named without a dotted path")
    check = sub.add_parser("check", help="resolve an environment and check its contract")
    check.add_argument("name")
    sample = sub.add_parser("sample", help="print generated tasks")
    sample.add_argument("name")
    sample.add_argument("-n", type=int, default=3)
    sample.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from envs.registry import BUILTIN_ENVS, list_envs, load_env_class

    if args.command == "list":
        from envs.verifiers_env import installed_environments

        envs = list_envs()
        # Other ecosystems' environments, trained through an adapter (env=verifiers env.id=NAME).
        verifiers_envs = installed_environments()
        width = max(len(n) for n in [*envs, *verifiers_envs])
        for name, target in envs.items():
            origin = "built-in" if BUILTIN_ENVS.get(name) == target else "entry point"
            print(f"{name:<{width}}  {target}  ({origin})")
        for vf_id, target in verifiers_envs.items():
            print(f"{vf_id:<{width}}  {target}  (verifiers: env=verifiers env.id={vf_id})")
        return 0
    try:
        cls = load_env_class(args.name)
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.command == "check":
        print(f"{args.name}: {cls.__module__}:{cls.__qualname__} satisfies the environment contract")
        print(f"generates tasks: {'yes' if hasattr(cls, 'make_tasks') else 'no (needs env.dataset.path)'}")
        try:
            tools = getattr(cls(), "tools", [])  # default kwargs; an env may require some
        except Exception as e:
            print(f"tools: unknown (constructing it without env.kwargs failed: {e})")
        else:
            names = [t["function"]["name"] for t in tools]
            print(f"tools (default kwargs): {', '.join(names) if names else 'none'}")
        return 0
    if not hasattr(cls, "make_tasks"):
        print(f"error: {args.name} has no make_tasks; it reads tasks from env.dataset.path", file=sys.stderr)
        return 1
    for task in cls.make_tasks(args.n, args.seed):
        print(json.dumps({"id": task.id, "prompt": task.prompt, "env_args": task.env_args}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

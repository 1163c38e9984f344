"""The floor every other package stands on: shared types, the config schema and its checks, what slime
knows about the model, core budgets, the checkpoint format and the weight transports.

Nothing here imports the driver (`slime.controller`, `slime.fleet`, ...), `rollout`, `trainer` or
`envs`; they all import from here. `import slime.core` loads no vLLM, DeepSpeed, Ray or torch.
"""

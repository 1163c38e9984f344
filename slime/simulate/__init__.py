"""The scheduling simulator of slime's loop (docs/scaling.md), one module per role:

    params.py       what a simulation takes: `Params` (every `--set` key), `Dist` (a workload
                    quantity's distribution), `RecordedEpisode` (one measured episode)
    model.py        the discrete-event model of the loop: `Simulation`, `simulate`, `summarize`, `predict`
    calibration.py  a recorded run read or packed (`read_run`, `pack_run`) and `Params` fitted to it
                    (`calibrate`, `retarget`, `measured_summary`)
    cli.py          `python -m slime.simulate` (`__main__.py` runs its `main`): tables, sweeps, --compare

Each module imports only those listed before it (`.importlinter` checks it). The package exports
nothing itself: import a name from the module it lives in.
"""

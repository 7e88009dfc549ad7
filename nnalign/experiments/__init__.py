"""``nnalign_experiment``: an experiment grid (teachers, students, evaluations, report) described by one TOML SPEC,
planned into runs with dependencies, and run on this machine or on a Slurm cluster with resumable state.

- :mod:`~nnalign.experiments.spec`: the SPEC (TOML, shipped presets, ``extends``), checked key by key;
- :mod:`~nnalign.experiments.grid`: the runs a SPEC needs, their commands, dependencies and GPU-hour estimate;
- :mod:`~nnalign.experiments.state`: per-run state files in the results folder, the submission lock, run states;
- :mod:`~nnalign.experiments.job`: one run executed (the same commands a user types), for every executor;
- :mod:`~nnalign.experiments.local` and :mod:`~nnalign.experiments.slurm`: the executors.

Planning and status import neither torch nor nnU-Net.
"""

"""The search layer: the space (what is searched and where a knob acts), sampling and pruning, the storage, the trial
record, the objective around one run, the confirmation over seeds, and the study's phases. Nothing here draws or
prints for the user: watchers are handed in as `hooks.SearchHooks`."""

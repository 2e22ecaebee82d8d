"""weightsmith's training core: everything that touches torch.

Runs as a child process per job (`python -m training_core SPEC.json`) and knows nothing of the
service's database: it reads a job spec, writes events and checkpoints into the job's run
directory, and leaves a `result.json` when it ends. See `spec.py` for that contract.
"""

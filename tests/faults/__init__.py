"""The fault suite: each scenario of issue 5 against a real local farm.

A farm here is `producer.local.LocalFarm`: a private Redis with AOF, SeaweedFS, the API (with its
dispatcher) and real worker processes on the tiny model, with its timeouts shortened through
settings (`harness.FARM_ENV`), never through code. Every scenario submits its own batch, breaks
something while it renders, and returns one `harness.Row`: jobs submitted, succeeded, failed,
lost (never terminal), duplicated (more than one object or more than one `succeeded` transition
for a job) and the recovery time.

`python -m tests.faults` (`make faults`) runs every scenario full size and prints the table;
`tests/test_faults.py` runs the same scenarios sized down, inside `make test`.
"""

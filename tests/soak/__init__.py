"""The chaos soak's engine (issue 16), shared by bench/soak.py and tests/e2e/test_soak.py: a seeded fault
schedule (schedule.py), a study driven through it (driver.py), the exact model it must end with (model.py)
and the checks at the end (invariants.py)."""

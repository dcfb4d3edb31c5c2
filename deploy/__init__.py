"""Operations: the Prefect deployments (schedules, the new-data trigger; deploy/serve.py). The
watcher's debounce logic is pipeline/watching.py. Schedules, triggers and serves only: no training
logic lives here."""

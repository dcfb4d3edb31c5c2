"""Operations: Prefect deployments (schedules, the new-data trigger) and the watcher's debounce logic.
Schedules, triggers and serves only: no training logic lives here."""

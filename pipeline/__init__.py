"""The pipeline around the PatchCore library: the step functions that both the Prefect tasks
(tasks/) and the DVC stages (dvc.yaml) call, data validation and versioning, MLflow tracking and
the model registry. Imports patchcore; patchcore never imports this package."""

"""Applications on top of the flows: the `patchcore` console script (apps/cli.py). The other
application, deploy/ (the Prefect deployments), and this package do not import each other."""

"""AutoIF steps as plain functions of frames and config (installed as ``autoif.tasks``). Nothing here imports
Prefect, the store or MLflow: ``autoif.flows.steps`` declares them as steps and ``autoif.runtime`` runs them."""

"""What the producer and the workers agree on: settings, jobs, the ledger, storage, Celery names."""

"""The SQL registry: runs, lineage, model versions, stages, schema migrations and schedules."""

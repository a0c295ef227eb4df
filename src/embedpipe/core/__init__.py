"""Storage, datasets, schemas and kinds, parallel map, seeding, stage results."""

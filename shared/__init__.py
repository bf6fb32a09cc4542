"""Common code of every SSB part: settings, schemas, prompts, grading, hint selection, datasets, pair storage."""

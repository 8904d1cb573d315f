"""The pipeline steps, one unit a file: compressing, exporting, building, measuring, selecting,
publishing, reporting."""

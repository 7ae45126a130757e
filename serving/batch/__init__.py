"""Batch scoring where the data lives: files, S3 prefixes and SQL tables in, the same out.

`python -m serving.batch` is the command. Below it: `sources` (what to read, split into parts),
`sinks` (where predictions go, and which rows are already done), `scoring` (one chunk of raw rows
to predictions and errors), `job` (the plan and the single-process engine), `cluster` (the same
parts on Dask), `schedule` (`--every`). The single-process engine and Dask run the same part
function, so their output is the same row for row.
"""

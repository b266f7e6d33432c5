"""``python3 -m blkjobs.jobmodel``: print the job tables (the text of docs/job-tables.md)."""
from .status import render_tables

print(render_tables(), end="")

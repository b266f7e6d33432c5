from blkjobs.cli.main import run

run()

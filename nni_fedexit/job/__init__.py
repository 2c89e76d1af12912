"""The main job: the run config (checked once), the pipeline of stages, the report, the CLI.

config.py    RunConfig: one YAML file, every section checked when it loads
pipeline.py  Run: S1 to S5 end to end, one NNI experiment per stage, in a run directory
report.py    report.md and the plots, every number read from the run directory
cli.py       ``nni-fedexit`` (click); nothing imports it
"""

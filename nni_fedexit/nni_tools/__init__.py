"""NNI tooling: the web UI binding, view/resume of a run's experiments, the nnictl trial, and the
narrow workarounds for NNI 3.0 on today's stack.

compat.py        import NNI quietly on torch 2.x; let a NAS experiment resume (ImportData)
webui.py         keep NNI's web server on 127.0.0.1; the URL and the SSH-tunnel hint
reopen.py        ``nni-fedexit view`` / ``resume``: reopen a run's NAS experiments
nnictl_trial.py  ``python -m nni_fedexit.nni_tools.nnictl_trial``: the trial of classic nnictl experiments
"""

"""The NNI layer on top of the stages: the web UI binding, view/resume of a run's experiments, the
nnictl trial. (NNI 3.0's workarounds, which every module that uses NNI needs, are the bottom-layer
module :mod:`nni_fedexit.nni_compat`.)

webui.py         keep NNI's web server on 127.0.0.1; the URL and the SSH-tunnel hint
reopen.py        ``nni-fedexit view`` / ``resume``: reopen a run's NAS experiments
nnictl_trial.py  ``python -m nni_fedexit.nni_tools.nnictl_trial``: the trial of classic nnictl experiments
"""

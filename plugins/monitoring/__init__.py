"""Run monitoring in the tools people already use: the ``tensorboard`` and ``mlflow`` callbacks.

Both read what they log from the run directory (``trials.jsonl``, ``validation.jsonl``,
``config.yaml``) through :class:`~calibri.plugins.monitoring.follow.RunFollower`, so a resumed run,
or a callback added on resume, logs the rounds it missed and never a round twice.
"""

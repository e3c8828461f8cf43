"""The client side: command lines and the daemon's socket client, standard library only.

    cli        the ``millstream`` console script
    flowcli    ``python flow.py ...``, the command line of every flow file
    launch     ``run``: submit, follow, exit code, Ctrl-C
    submit     the POST /v1/runs body: parameters, ``--with``, the code package
    progress   the event stream as Metaflow-style lines
    http       DaemonClient: HTTP/1.1 over the Unix socket
    daemonctl  find, start and stop the per-user daemon
    loader     import a flow file by path and find its flow class
    graphview  what ``check`` and ``show`` print
    runview    what ``runs`` and ``status`` print
    logs       a task's logs, whole or followed
    pathspec   ``Flow/run/step/task`` as users type it
    console    tables, times and error exits

Nothing here imports aiohttp, networkx or the daemon, so ``python flow.py run`` starts fast.
"""

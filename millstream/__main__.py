"""``python -m millstream``: the millstream command line."""

from millstream.client.cli import main

main()

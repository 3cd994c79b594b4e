"""Serve one reward over loopback HTTP so that training can score against it from another process or host.

    python rewards/serve.py pickscore --kwargs '{"device": "cuda:1"}' --port 8000
    python rewards/serve.py rewards/example_reward.py:brightness --port 8001

Then train with ``--reward.spec http://127.0.0.1:8000`` (see ``diffrl.rewards.server`` for the protocol).
"""

import sys

from diffrl.rewards.server import main

if __name__ == "__main__":
    sys.exit(main(prog="rewards/serve.py"))

"""The child side: what runs in zygote processes, their workers and helpers.
Nothing here may import zmq: libzmq starts threads, and a process that forks
must not have any (tests/test_layout.py checks it)."""

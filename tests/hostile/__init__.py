"""Hostile-code test support.

* ``harness``: the supervisor under test, driven over JSON lines, living in a
  throwaway PID namespace;
* ``client``: starts it there (in a pids cgroup as root, as uid 65534 when
  asked), drives it and cleans up;
* ``attacks``: our own hostile code, escape routes and OS-level attacks;
* ``samples`` and ``contract``: the shared samples' headers and their checks;
* ``checks``: what must hold on the host after every run, and the probes.
"""

"""A device reached over SSH: files copied there, checked by sha256, run by the device's own EdgeKit, results
brought back, nothing left behind.

    python -m runtime bench model.int8.tflite --host pi@raspberrypi.local
    python -m runtime eval model.int8.tflite --host pi@raspberrypi.local --remote-python /home/pi/venv/bin/python

The system's OpenSSH client does the connecting, so the user's ~/.ssh/config, agent and known_hosts apply; it
runs with BatchMode=yes (never a password prompt) and never accepts a host key by itself. On the device,
`python -m runtime.remote agent` (agent.py) talks to the host over the session's stdin and stdout, one JSON
object a line:

    device -> host   {"hello": {...}}                      what the device is (machine, CPU, board, versions)
    host -> device   {"files": [{name, size, sha256}], "dir": DIR|null}, then the files' bytes in that order
    device -> host   {"stored": N}
    host -> device   {"run": ["runtime.remote", "bench"|"classes"|"rounds", SPEC], "timeout": S}
    device -> host   {"progress": LINE}..., then {"done": {"returncode", "stdout", "stderr"}}
    host -> device   {"bye": true}, or end of input
    device -> host   {"error": ..., "kind": ...} at any point, and the agent exits 1

The agent makes a private directory (mode 0700) under DIR (default the device's TMPDIR): the files go in its
`uploads/`, and a job runs with its working directory in the empty `run/` and its TMPDIR in `tmp/`, so nothing the
host sent is ever on a job's import path (`python -m` puts the working directory first; PYTHONSAFEPATH too on
Python 3.11+); a job reaches the files by name through EDGEKIT_UPLOADS, and only those. The agent runs EdgeKit's
three jobs and nothing else. It removes its directory when the host says bye, when its input ends (the host was
interrupted or killed, the connection dropped) and on any error (a refused request, a line that is not the
protocol, JSON nested too deep, any exception: one error message, exit 1), and kills a running job's process group
first. What the device sends back is untrusted too: every line is bounded before it is held (stdout and stderr
alike), every figure checked for type and range, and text escaped before it reaches a terminal or a spreadsheet.

The parts: device.py (what a device is; the checks on what it sends), session.py (the host's side: --host and
its options, the SSH session), agent.py (the device's side of a session), jobs.py (the three jobs, both sides).
"""

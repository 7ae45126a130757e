"""The client that times POST requests for serving.probe, run as its own small process
(`python -m serving.probe_client HOST PORT`, standard library only): the server under test, a
thread of a study process or a served process, then shares no interpreter lock with the client
that times it, as with any real client.

Commands arrive on stdin, one JSON object a line: {"path", "bodies", "budget_seconds",
"max_calls"}; each answer is one line on stdout: {"median_ms": [float, ...]} (one per body) or
{"error": str}. The bodies are sent in turn, so each median is taken over the same moments: a
burst of load elsewhere on the machine weighs on all of them alike.
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import time

WARM = 5  # requests before timing: first-call costs are not the steady state


class Client:
    """One keep-alive HTTP/1.1 connection timing POST requests."""

    def __init__(self, host: str, port: int) -> None:
        self._connection = http.client.HTTPConnection(host, port, timeout=30)

    def post(self, path: str, body: bytes) -> bytes:
        try:
            response = self._send(path, body)
        except (http.client.HTTPException, OSError):  # the server closed an idle connection: a new one
            self._connection.close()
            response = self._send(path, body)
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path} answered {response.status}: {answer[:300]!r}")
        return answer

    def _send(self, path: str, body: bytes) -> http.client.HTTPResponse:
        self._connection.request("POST", path, body, {"content-type": "application/json"})
        return self._connection.getresponse()

    def medians_ms(self, path: str, bodies: list[bytes], budget_seconds: float, max_calls: int) -> list[float]:
        """Median wall time of the request with each body, sent in turn: at least 5 of each timed
        after the warm-up, more while the budget lasts (`max_calls` of each at most)."""
        for _ in range(WARM):
            for body in bodies:
                self.post(path, body)
        times: list[list[float]] = [[] for _ in bodies]
        deadline = time.perf_counter() + budget_seconds
        while len(times[0]) < max_calls and (len(times[0]) < 5 or time.perf_counter() < deadline):
            for body, timed in zip(bodies, times, strict=True):
                start = time.perf_counter()
                self.post(path, body)
                timed.append(time.perf_counter() - start)
        return [statistics.median(timed) * 1000.0 for timed in times]


def main() -> int:
    client = Client(sys.argv[1], int(sys.argv[2]))
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer: dict[str, object] = {"median_ms": client.medians_ms(
                command["path"], [body.encode() for body in command["bodies"]], float(command["budget_seconds"]),
                int(command["max_calls"]))}
        except Exception as e:  # reported to the caller, which raises it there
            answer = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

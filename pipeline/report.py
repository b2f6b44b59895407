"""Read the results summary from the store owner or the store itself."""

from __future__ import annotations

from typing import Any

from pipeline.errors import StoreError
from pipeline.settings import Settings


def fetch_summary(settings: Settings, line: str | None = None, run_id: str = "") -> dict[str, Any]:
    """Ask the running store owner; open the store directly when none runs.

    A chDB path can be open in one process only, so while ``faultline sink``
    runs, its HTTP API is the only way in.
    """
    from pipeline.api import read_owner

    url = read_owner(settings) if settings.store_url.startswith("chdb://") else None
    if url is None:
        from pipeline.store import ResultStore

        store = ResultStore(settings)
        try:
            return store.summary(line, run_id).as_dict()
        finally:
            store.close()
    import httpx

    params = {"run_id": run_id} | ({"line": line} if line else {})
    token = settings.view_token.get_secret_value()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"{url}/v1/summary", params=params, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise StoreError(f"the store owner at {url} did not respond: {exc}") from exc
    if response.status_code != 200:
        raise StoreError(f"the store owner at {url} responded {response.status_code}: {response.text}")
    return response.json()


def format_summary(summary: dict[str, Any]) -> str:
    frames = summary["frames"]
    failed = summary["failed_frames"]
    rate = f"{100.0 * failed / frames:.1f} %" if frames else "n/a"
    lines = [
        f"frames stored      {frames}",
        f"failed frames      {failed} ({rate})",
        f"detections         {summary['detections']}",
    ]
    if summary["lines"]:
        lines.append("frames per line    " + ", ".join(f"{k}: {v}" for k, v in summary["lines"].items()))
    if summary["defects_per_class"]:
        lines.append("defects per class")
        lines.extend(f"  {name:<12} {count}" for name, count in summary["defects_per_class"].items())
    if summary["latency_s"]:
        lines.append("latency per stage  p50 ms    p95 ms")
        for stage, values in summary["latency_s"].items():
            lines.append(f"  {stage:<12} {values['p50'] * 1000:>9.1f} {values['p95'] * 1000:>9.1f}")
    return "\n".join(lines)
